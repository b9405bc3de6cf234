"""
The frozen feature source every stage reads (SPEC section 1; appendix C, Table D): a DINOv3 or DINOv2 backbone
from Hugging Face transformers, by default its output after the final LayerNorm, or several of its blocks
concatenated, optionally projected by a PCA file. Checkpoints record the source as one string (feature_source).

  # DINO-Foresight's PCA pickle -> a PCA file (--pca); or fit one: tokenizer.py --fit-pca
  python features.py --convert-pca dino_foresight_pca.pkl runs/pca_1152.pt --trust-pickle
"""
import argparse
import hashlib
import os
import pickle
import types
import zipfile

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel

import data

DINOV3_B16 = "facebook/dinov3-vitb16-pretrain-lvd1689m"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Random-initialised configs so every stage runs offline on a CPU. The weights are drawn from a fixed seed, so every
# script that builds "tiny" gets the same network. dinov2-tiny: DINOv2 with registers, patch 14, as in Table D.
_TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_register_tokens=4)
VFM_PRESETS = {
    "tiny": dict(model_type="dinov3_vit", num_hidden_layers=2, patch_size=16, **_TINY),
    "dinov2-tiny": dict(model_type="dinov2_with_registers", num_hidden_layers=4, patch_size=14, image_size=28, **_TINY),
    "vitb16-random": dict(model_type="dinov3_vit", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, patch_size=16, num_register_tokens=4),
}


def load_backbone(name):
    """DINOv3 or DINOv2 by preset name, hub id or local folder, with an error that says how to fix a failed load."""
    if name in VFM_PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoModel.from_config(AutoConfig.for_model(**VFM_PRESETS[name]), attn_implementation="sdpa")
    try:
        return AutoModel.from_pretrained(name, attn_implementation="sdpa")  # DINOv3, DINOv2 (with registers or not)
    except Exception as e:
        hint = (f"the folder {name} must hold config.json and model.safetensors (or pytorch_model.bin)"
                if os.path.isdir(name) else hub_hint(name, e, "--vfm /path/to/a/local/copy") or
                f"'{name}' is neither a hub id nor a folder (typo?); the paper uses {DINOV3_B16}. For an offline "
                f"run without weights use a random preset: {', '.join(VFM_PRESETS)}")
        cause = f"{type(e).__name__}: {e}".splitlines()[0]
        raise data.UserError(f"could not load the VFM '{name}': {hint} (cause: {cause})") from None


def hub_hint(name, e, local):
    """How to fix a failed Hugging Face download of `name` (gated, offline), or None if the repo seems missing."""
    text, kinds = f"{e} {e.__cause__}".lower(), {type(e).__name__, type(e.__cause__).__name__}
    if "RepositoryNotFoundError" in kinds:  # its message mentions gated repos too
        return None
    if "gated" in text or "401" in text or "403" in text or "access" in text:
        return (f"{name} is gated: accept the licence on its Hugging Face page, then run `hf auth login` (or set "
                f"HF_TOKEN), or pass {local}")
    if os.environ.get("HF_HUB_OFFLINE") or "offline" in text or "connect" in text:
        return (f"{name} is not in the local Hugging Face cache and the hub cannot be reached: download it once "
                f"online (`hf download {name}`), or pass {local}")
    return None


def feature_source(vfm, layers="", pca=""):
    """The feature source as one string, which checkpoints record as "vfm" and later stages rebuild from and
    compare: the backbone, then "|layers=2,5,8,11" and "|pca=FILE" when given (VFM adds the file's digest)."""
    return vfm + (f"|layers={layers}" if layers else "") + (f"|pca={pca}" if pca else "")


class VFM(nn.Module):
    """A frozen feature source: uint8 frames (..., 3, H, W) -> patch tokens (..., N, C). By default the backbone's
    output (after its final LayerNorm); with layers, those blocks' outputs, each through the final LayerNorm,
    concatenated per patch (DINO-Foresight's features); with a PCA file, those projected by it (load_pca)."""

    def __init__(self, name=DINOV3_B16):
        super().__init__()
        backbone, *options = name.split("|")
        options = dict(o.partition("=")[::2] for o in options)
        self.model = load_backbone(backbone).requires_grad_(False).eval()
        cfg, layers = self.model.config, options.get("layers", "")
        self.layers = [int(i) for i in layers.split(",") if i.isdigit() and int(i) < cfg.num_hidden_layers] or None
        if layers and len(self.layers or ()) != len(layers.split(",")):
            raise data.UserError(f"--vfm-layers {layers}: want blocks of {backbone}, 0 to {cfg.num_hidden_layers - 1}")
        self.patch_size, self.dim = cfg.patch_size, cfg.hidden_size * len(self.layers or [0])
        self.num_prefix = 1 + getattr(cfg, "num_register_tokens", 0)  # CLS + registers come before the patches
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        proj, shift, pca = load_pca(options["pca"], self.dim) if "pca" in options else (None, None, "")
        self.register_buffer("pca_proj", proj, persistent=False)
        self.register_buffer("pca_shift", shift, persistent=False)
        self.name = feature_source(backbone, layers, pca)
        self.dim = self.dim if proj is None else proj.shape[1]
        head_dim = cfg.hidden_size // cfg.num_attention_heads  # a tokenizer as wide as the features keeps it
        if self.dim % head_dim:
            raise data.UserError(f"the PCA's component count {self.dim} is not a multiple of {head_dim} (head width)")
        self.heads = self.dim // head_dim

    def train(self, mode=True):  # frozen: always eval mode (no RoPE jitter)
        return super().train(False)

    @torch.no_grad()
    def forward(self, frames):
        *lead, c, h, w = frames.shape
        if h % self.patch_size or w % self.patch_size:
            raise data.UserError(f"frame size {h}x{w} is not divisible by the VFM patch size {self.patch_size}: "
                                 f"use --size a multiple of {self.patch_size}")
        x = (frames.reshape(-1, c, h, w).float() / 255 - self.mean) / self.std
        out = self.model(pixel_values=x, output_hidden_states=self.layers is not None)
        norm = getattr(self.model, "layernorm", None) or self.model.norm  # DINOv2's name, DINOv3's
        tokens = out.last_hidden_state if self.layers is None else \
            torch.cat([norm(out.hidden_states[i + 1]) for i in self.layers], -1)
        tokens = tokens[:, self.num_prefix:]
        if self.pca_proj is not None:
            tokens = tokens @ self.pca_proj - self.pca_shift
        return tokens.reshape(*lead, tokens.shape[1], self.dim)  # (..., N, C)

    def black(self, size, device):
        """Features of an all-black (H, W) frame: the 'previous frame' of a clip's first frame (SPEC section 2)."""
        return self(torch.zeros(1, 3, *size, dtype=torch.uint8, device=device))  # (1, N, C)


def load_pca(spec, width):
    """A PCA file (fit_pca) "FILE", or "FILE@SHA256" as recorded (a changed file is refused), over `width`-d features
    -> (proj (C, K), shift (K,), "FILE@SHA256"): ((x - mean) / std - pca_mean) @ components.T = x @ proj - shift."""
    path, _, recorded = spec.partition("@")
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        p = torch.load(path, map_location="cpu", weights_only=True)
        proj, shift = (p["components"] / p["std"]).T, (p["mean"] / p["std"] + p["pca_mean"]) @ p["components"].T
    except Exception as e:
        raise data.UserError(f"--pca {path}: not a PCA file of --fit-pca ({type(e).__name__}: {e})".splitlines()[0])
    if recorded not in ("", digest) or len(proj) != width:
        raise data.UserError(f"the PCA file {path} " + (f"has changed since it was recorded (sha256 {recorded}...)"
                             if len(proj) == width else f"projects {len(proj)}-d features, not {width}-d ones"))
    return proj.float(), shift.float(), f"{os.path.abspath(path)}@{digest}"


def fit_pca(batches, k):
    """A PCA file from feature batches (..., C): each dimension standardised with its mean and std over all of them,
    then the k leading principal components (largest variance first) as DINO-Foresight's pca.py does with sklearn,
    here from the covariance accumulated in float64 (no features are kept)."""
    n = s = ss = 0
    for x in batches:
        x = x.double().flatten(0, -2)
        n, s, ss = n + len(x), s + x.sum(0), ss + x.T @ x
    mean, cov = s / n, ss / n - (s / n)[:, None] * (s / n)
    std = cov.diagonal().clamp_min(1e-12).sqrt()
    variance, vectors = (v.flip(-1)[..., :k].float() for v in torch.linalg.eigh(cov / std[:, None] / std))
    mean, std = mean.float(), std.float()  # eigh's order is ascending, flipped above
    return dict(mean=mean, std=std, pca_mean=torch.zeros_like(mean), components=vectors.T.contiguous(),
                variance=variance)


def convert_pca(src, dst):
    """DINO-Foresight's PCA pickle {"pca_model": sklearn PCA, "mean", "std"} -> a PCA file (tokenizer.load_pca) at
    dst. Unpickling runs what the file names: only numpy's and torch's array classes are allowed, and sklearn's PCA
    is read into a plain object that keeps its attributes (components_, mean_), so sklearn is not needed."""
    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("sklearn.decomposition") and name == "PCA":
                return type(name, (), {})
            if module.split(".")[0] in ("numpy", "torch", "collections", "_codecs"):
                return super().find_class(module, name)
            raise data.UserError(f"--convert-pca {src} names {module}.{name}, which a PCA file does not need")
    restricted = types.SimpleNamespace(__name__="restricted", Unpickler=Unpickler)
    with open(src, "rb") as f:  # torch.save's zip file or a plain pickle
        p = Unpickler(f).load() if not zipfile.is_zipfile(src) else \
            torch.load(f, weights_only=False, pickle_module=restricted)
    t, pca = lambda v: torch.as_tensor(v, dtype=torch.float32), p["pca_model"].__dict__
    torch.save(dict(mean=t(p["mean"]).flatten(), std=t(p["std"]).flatten(), pca_mean=t(pca["mean_"]),
                    components=t(pca["components_"]), variance=t(pca["explained_variance_"])), dst)


def main(args):
    if not args.trust_pickle:  # unpickling can run code: only on the user's word
        raise data.UserError("--convert-pca unpickles the file, which can run code: add --trust-pickle if you trust it")
    data.check_paths([("--convert-pca", args.convert_pca[0])])
    convert_pca(*args.convert_pca)


def get_parser():
    p = argparse.ArgumentParser(description="Convert DINO-Foresight's PCA file (fit one with tokenizer.py --fit-pca).")
    p.add_argument("--convert-pca", nargs=2, required=True, metavar=("PICKLE", "DST"), help="DINO-Foresight's PCA "
                   "pickle -> a --pca file of tokenizer.py (Table D)")
    p.add_argument("--trust-pickle", action="store_true", help="let --convert-pca unpickle the file")
    return p


if __name__ == "__main__":
    data.cli(main, get_parser())
