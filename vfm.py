"""
The frozen feature source every stage reads: DINOv3 (SPEC section 1) by default, or DINOv2 with or without
registers, several blocks' outputs concatenated, projected by a PCA file (appendix C, Table D: DINO-Foresight's
features). `VFM(name)` takes the one string a checkpoint records (`feature_source`), so every later stage builds
the same features. Weights come from a Hugging Face hub id, a local folder, or a random preset (offline tests).

    python tokenizer.py --vfm facebook/dinov2-with-registers-base --vfm-layers 2,5,8,11 --size 448x896 \
        --data /data/bdd100k --fit-pca 1152 200 --pca runs/pca_1152.pt       # a PCA file of these features
    python tokenizer.py --convert-pca dino_foresight_pca.pkl --pca runs/pca_1152.pt --trust-pickle  # or its own
"""
import functools
import hashlib
import os
import pickle
import zipfile

import torch
import torch.nn as nn
from huggingface_hub import constants, get_session
from transformers import AutoConfig, AutoModel

import data

DINOV3_B16 = "facebook/dinov3-vitb16-pretrain-lvd1689m"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Random configs, seeded (every script builds the same network): every stage runs offline on a CPU; dinov2-tiny: Table D
_TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_register_tokens=4)
VFM_PRESETS = {
    "tiny": dict(model_type="dinov3_vit", num_hidden_layers=2, patch_size=16, **_TINY),
    "dinov2-tiny": dict(model_type="dinov2_with_registers", num_hidden_layers=4, patch_size=14, image_size=28, **_TINY),
    "vitb16-random": dict(model_type="dinov3_vit", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, patch_size=16, num_register_tokens=4),
}


def load_backbone(name):
    """DINOv3 or DINOv2 (with registers or not) by preset, hub id or folder; a failed load says how to fix it."""
    if name in VFM_PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoModel.from_config(AutoConfig.for_model(**VFM_PRESETS[name]), attn_implementation="sdpa")
    try:
        offline = not os.path.isdir(name) and hub_unreachable()  # a local folder needs no probe of the hub
        return AutoModel.from_pretrained(name, attn_implementation="sdpa", local_files_only=offline)
    except Exception as e:
        hint = (f"the folder {name} must hold config.json and model.safetensors (or pytorch_model.bin)"
                if os.path.isdir(name) else hub_hint(name, e, "--vfm /path/to/a/local/copy") or
                f"'{name}' is neither a hub id nor a folder (typo?); the paper uses {DINOV3_B16}. For an offline "
                f"run without weights use a random preset: {', '.join(VFM_PRESETS)}")
        cause = f"{type(e).__name__}: {e}".splitlines()[0]
        raise data.UserError(f"could not load the VFM '{name}': {hint} (cause: {cause})") from None


@functools.lru_cache(maxsize=1)
def hub_unreachable():
    """HF_HUB_OFFLINE, or a 3 s probe failed: downloads look in the cache only, failing at once (no 30 s of retries)."""
    try:
        return constants.HF_HUB_OFFLINE or get_session().head(constants.ENDPOINT, timeout=3).is_server_error
    except Exception:  # no network, no name server, a firewall
        return True


def hub_hint(name, e, local):
    """How to fix a failed Hugging Face download of `name` (gated, offline), or None if the repo seems missing."""
    text = f"{e} {e.__cause__}".lower()
    if "RepositoryNotFoundError" in {type(e).__name__, type(e.__cause__).__name__}:  # its message mentions gated too
        return None
    if any(word in text for word in ("gated", "401", "403", "access")):
        return (f"{name} is gated: accept the licence on its Hugging Face page, then run `hf auth login` (or set "
                f"HF_TOKEN), or pass {local}")
    if hub_unreachable() or "offline" in text or "connect" in text:
        return (f"{name} is not in the local Hugging Face cache and the hub cannot be reached: download it once "
                f"online (`hf download {name}`), or pass {local}")


def feature_source(vfm, layers="", pca=""):
    """The string that checkpoints record as "vfm": the backbone, then "|layers=2,5,8,11" and "|pca=FILE" if given."""
    return vfm + (f"|layers={layers}" if layers else "") + (f"|pca={pca}" if pca else "")


class VFM(nn.Module):
    """A frozen feature source (feature_source's string): uint8 frames (..., 3, H, W) -> patch tokens (..., N, C), the
    given blocks' outputs (default: the last) through the final LayerNorm, concatenated, with a PCA file projected."""

    def __init__(self, name=DINOV3_B16):
        super().__init__()
        backbone, *options = name.split("|")
        options = dict(o.partition("=")[::2] for o in options)
        self.model = load_backbone(backbone).requires_grad_(False).eval()
        cfg, layers = self.model.config, options.get("layers", "")
        self.layers = [int(i) if i.isdigit() else cfg.num_hidden_layers for i in layers.split(",")] if layers else [-1]
        if max(self.layers) >= cfg.num_hidden_layers:
            raise data.UserError(f"--vfm-layers {layers}: want blocks of {backbone}, 0 to {cfg.num_hidden_layers - 1}")
        blocks = next(m for m in self.model.modules() if isinstance(m, nn.ModuleList))
        for i in sorted(set(self.layers)):  # not output_hidden_states: its hooks break each compiled block in 3 graphs
            blocks[i].register_forward_hook(lambda block, args, out: self.caught.append(out))
        self.patch_size, self.num_prefix = cfg.patch_size, 1 + getattr(cfg, "num_register_tokens", 0)  # CLS, registers
        width = cfg.hidden_size * len(self.layers)
        proj, shift, pca = load_pca(options["pca"], width) if "pca" in options else (None, None, "")
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        for key, value in dict(mean=mean, std=std, pca_proj=proj, pca_shift=shift).items():
            self.register_buffer(key, value, persistent=False)
        self.name = feature_source(backbone, layers, pca)
        self.dim = width if proj is None else proj.shape[1]
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
        self.caught = []  # the hooked blocks' outputs, in block order
        self.model(pixel_values=(frames.reshape(-1, c, h, w).float() / 255 - self.mean) / self.std)
        caught, self.caught = dict(zip(sorted(set(self.layers)), self.caught)), None  # not kept past the call
        norm = getattr(self.model, "layernorm", None) or self.model.norm  # DINOv2's name, DINOv3's
        tokens = torch.cat([norm(caught[i]) for i in self.layers], -1)[:, self.num_prefix:]
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
    if len(proj) != width:
        raise data.UserError(f"the PCA file {path} projects {len(proj)}-d features, not {width}-d ones")
    if recorded not in ("", digest):
        raise data.UserError(f"the PCA file {path} has changed since it was recorded (sha256 {recorded}...)")
    return proj.float(), shift.float(), f"{os.path.abspath(path)}@{digest}"


def fit_pca(batches, k):
    """A PCA file from feature batches (..., C), as DINO-Foresight's pca.py fits one with sklearn: each dimension
    standardised, then the k leading principal components, largest variance first (a float64 covariance, summed)."""
    n = total = products = 0
    for x in batches:
        x = x.double().flatten(0, -2)
        n, total, products = n + len(x), total + x.sum(0), products + x.T @ x
    mean = total / n
    cov = products / n - mean[:, None] * mean
    std = cov.diagonal().clamp_min(1e-12).sqrt()
    variance, vectors = torch.linalg.eigh(cov / std[:, None] / std)  # ascending
    return dict(mean=mean.float(), std=std.float(), pca_mean=torch.zeros(len(mean)),
                components=vectors.flip(-1)[:, :k].T.float().contiguous(), variance=variance.flip(-1)[:k].float())


def convert_pca(src, dst):
    """DINO-Foresight's PCA pickle {"pca_model": sklearn PCA, "mean", "std"} -> load_pca's file at dst.
    Unpickling runs what the file names: only numpy's and torch's classes pass (never torch.load's full unpickler)."""
    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("sklearn.decomposition") and name == "PCA":
                return type(name, (), {})  # a bare object keeps its attributes: no sklearn needed
            if module.split(".")[0] in ("numpy", "torch", "collections", "_codecs"):
                return super().find_class(module, name)
            raise data.UserError(f"--convert-pca {src} names {module}.{name}, which a PCA file does not need")
    if zipfile.is_zipfile(src):
        raise data.UserError(f"--convert-pca {src} is a torch.save file, not DINO-Foresight's pickle (pickle.dump)")
    with open(src, "rb") as f:
        p = Restricted(f).load()
    t, pca = lambda v: torch.as_tensor(v, dtype=torch.float32), p["pca_model"].__dict__
    torch.save(dict(mean=t(p["mean"]).flatten(), std=t(p["std"]).flatten(), pca_mean=t(pca["mean_"]),
                    components=t(pca["components_"]), variance=t(pca["explained_variance_"])), dst + ".tmp")
    os.replace(dst + ".tmp", dst)  # write, then rename: never half a file
