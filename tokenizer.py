"""
DeltaTok: compress the change between the frozen DINOv3 features of two consecutive frames into ONE token.

The encoder reads [z] + (x_prev + e0) + (y + e1) and keeps the output at z (through a LayerNorm): the delta token.
The decoder reads [delta] + x_prev and rebuilds y. Both are stacks of transformers' DINOv3 blocks with its 2D RoPE;
the decoder has no final LayerNorm, so with LayerScale 1e-5 it starts out as the identity on x_prev (appendix A).

Run it:
  # CPU, a few minutes: a tiny random DINOv3 and a tiny tokenizer on the built-in synthetic videos
  python tokenizer.py --vfm tiny --model tiny --size 64 --global-batch 32 --batch-size 32 --steps 300 \
      --warmup 30 --out runs/tok_tiny
  # one GPU, the paper's recipe (appendix A) on your videos (global batch 1024 by gradient accumulation)
  python tokenizer.py --data /path/to/videos --compile --out runs/deltatok
  # 8 GPUs (2 nodes: run it on each with --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500, not --standalone)
  torchrun --standalone --nproc_per_node=8 tokenizer.py --data /path/to/videos --compile --out runs/deltatok
  # speed and memory of one training step (SPEC section 6: 115 ms, 24.2 GiB at 256 px, batch 64, H200)
  python tokenizer.py --bench 20 --size 256 --batch-size 64 --compile
  # Table D's features: DINOv2 blocks 2, 5, 8, 11 and a PCA file of them, fitted here or DINO-Foresight's converted
  python tokenizer.py --vfm facebook/dinov2-with-registers-base --vfm-layers 2,5,8,11 --size 448x896 \
      --data /data/bdd100k --fit-pca 1152 200 --pca runs/pca_1152.pt
  python tokenizer.py --convert-pca "dinov2_pca_448_l[2_5_8_11]_1152.pth" --pca runs/pca_1152.pt
"""
import argparse
import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import pickle
import shlex
import signal
import sys
import time
import zipfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import constants, get_session, hf_hub_download
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, DINOv3ViTConfig
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTAttention, DINOv3ViTLayer, DINOv3ViTLayerScale, DINOv3ViTRopePositionEmbedding, apply_rotary_pos_emb,
    get_patches_center_coordinates)

import data

# ----------------------------------------------------------------------------------------------------------------
# The frozen feature source every stage reads (SPEC section 1; appendix C, Table D): DINOv3 by default, or DINOv2
# with or without registers, several blocks' outputs concatenated, projected by a PCA file. `VFM(name)` takes the
# one string a checkpoint records (`feature_source`), so every later stage builds the same features.

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
    if not os.path.isdir(name) and (name[:1] in "/.~" or name.count("/") > 1):  # a path, not a hub id 'org/name'
        raise data.UserError(f"could not load the VFM '{name}': there is no folder {name}: check the path")
    try:
        offline = not os.path.isdir(name) and hub_unreachable()  # a local folder needs no probe of the hub
        return AutoModel.from_pretrained(name, attn_implementation="sdpa", local_files_only=offline)
    except Exception as e:
        hint = (f"the folder {name} must hold config.json and model.safetensors (or pytorch_model.bin)"
                if os.path.isdir(name) else (hub_hint(name, e, "--vfm /path/to/a/local/copy") or f"'{name}' is neither "
                f"a hub id nor a folder (typo?); the paper uses {DINOV3_B16}") + "; offline without weights (--bench, "
                f"--flops): --vfm vitb16-random, a random ViT-B (random presets: {', '.join(VFM_PRESETS)})")
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


def dinov2_positions(emb, embeddings, height, width):
    """DINOv2's own position-embedding resize for its hub models without registers (vision_transformer.py): bicubic
    by (grid + 0.1) / M, no antialias; transformers' Dinov2Model resizes to the grid, as both do with registers."""
    pos, M = emb.position_embeddings, math.isqrt(emb.position_embeddings.shape[1] - 1)
    if embeddings.shape[1] - 1 == M * M and height == width:
        return pos
    scale = [(side // emb.patch_size + 0.1) / M for side in (height, width)]
    grid = F.interpolate(pos[:, 1:].mT.unflatten(2, (M, M)).float(), scale_factor=scale, mode="bicubic")  # (1, C, h, w)
    return torch.cat([pos[:, :1], grid.flatten(2).mT.to(pos.dtype)], 1)


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
        if cfg.model_type == "dinov2":  # without registers: resized as DINOv2's own code does (dinov2_positions)
            self.model.embeddings.interpolate_pos_encoding = functools.partial(dinov2_positions, self.model.embeddings)
        self.layers = [int(i) if i.isdigit() else cfg.num_hidden_layers for i in layers.split(",")] if layers else [-1]
        if max(self.layers) >= cfg.num_hidden_layers or len(set(self.layers)) < len(self.layers):
            raise data.UserError(f"--vfm-layers {layers}: want distinct blocks, 0 to {cfg.num_hidden_layers - 1}")
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
        self.check_size(h, w)
        self.caught = []  # the hooked blocks' outputs, in block order
        self.model(pixel_values=(frames.reshape(-1, c, h, w).float() / 255 - self.mean) / self.std)
        caught, self.caught = dict(zip(sorted(set(self.layers)), self.caught)), None  # not kept past the call
        norm = getattr(self.model, "layernorm", None) or self.model.norm  # DINOv2's name, DINOv3's
        tokens = torch.cat([norm(caught[i]) for i in self.layers], -1)[:, self.num_prefix:]
        if self.pca_proj is not None:
            tokens = tokens @ self.pca_proj - self.pca_shift
        return tokens.reshape(*lead, tokens.shape[1], self.dim)  # (..., N, C)

    def check_size(self, h, w):
        if h % self.patch_size or w % self.patch_size:
            raise data.UserError(f"frame size {h}x{w} is not divisible by the VFM patch size {self.patch_size}: "
                                 f"use --size a multiple of {self.patch_size}")

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
    standardised, then the k leading principal components, largest variance first (variance over n - 1, as sklearn)."""
    n = total = products = 0
    for x in batches:
        x = x.double().flatten(0, -2)
        n, total, products = n + len(x), total + x.sum(0), products + x.T @ x
    mean = total / n
    cov = products / n - mean[:, None] * mean
    std = cov.diagonal().clamp_min(1e-12).sqrt()
    variance, vectors = torch.linalg.eigh(cov / std[:, None] / std * n / (n - 1))  # ascending
    return dict(mean=mean.float(), std=std.float(), pca_mean=torch.zeros(len(mean)),
                components=vectors.flip(-1)[:, :k].T.float().contiguous(), variance=variance.flip(-1)[:k].float())


def convert_pca(src):
    """DINO-Foresight's PCA file {"pca_model": sklearn PCA, "mean", "std": numpy arrays}: torch.save's zip as its pca.py
    writes it, torch.save's old format or a pickle -> fit_pca's dict, through an exact allow-list: nothing else runs."""
    a = np.zeros(1)  # numpy's reducers of arrays, scalars and protocol 5's arrays, at numpy 1.x's and 2.x's paths
    named = {(f"numpy.{core}.{f.__module__.split('.')[-1]}", f.__name__): functools.partial(f)  # BUILD alters a copy
             for core in ("core", "_core") for f in (a.__reduce__()[0], a[0].__reduce__()[0], a.__reduce_ex__(5)[0])}
    named |= {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): str.encode,
              ("sklearn.decomposition._pca", "PCA"): type("PCA", (), {})}  # bytes (protocol 2); PCA: its attributes
    class Restricted(pickle.Unpickler):  # persistent ids (tensors) pickle refuses by itself
        def find_class(self, module, name):
            if (module, name) not in named:
                raise pickle.UnpicklingError(f"it names {module}.{name}, which a PCA file does not need")
            return named[module, name]
    try:
        with open(src, "rb") as f:
            if zipfile.is_zipfile(src):  # torch.save's: its one pickle
                f, = [z.open(n) for z in [zipfile.ZipFile(f)] for n in z.namelist() if n.split("/")[1:] == ["data.pkl"]]
            p = Restricted(f).load()
            if p == 0x1950a86a20f9469cfc6c:  # torch.save's old format: this magic number, version, system, the object
                p = [Restricted(f).load() for _ in range(3)][-1]
        t, pca = lambda v: torch.as_tensor(v, dtype=torch.float32), p["pca_model"].__dict__
        return dict(mean=t(p["mean"]).flatten(), std=t(p["std"]).flatten(), pca_mean=t(pca["mean_"]),
                    components=t(pca["components_"]), variance=t(pca["explained_variance_"]))
    except Exception as e:
        raise data.UserError(f"--convert-pca {src}: not DINO-Foresight's PCA ({type(e).__name__}: {e})".splitlines()[0])


def save_pca(pca, path, master=True):  # fit_pca's or convert_pca's, its folder made; rank 0 says what it wrote
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint(pca, path, master)
    if master:
        print(f"wrote {path}: a PCA of {pca['components'].shape[1]}-d features to {len(pca['components'])} components")


# ----------------------------------------------------------------------------------------------------------------
# DeltaTok (SPEC section 2)

@dataclass
class DeltaTokConfig:
    dim: int = 768
    depth: int = 12          # blocks in the encoder and in the decoder
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16     # of the VFM; only sets RoPE's patch grid
    aspect: float = 1.0      # width / height of the patch grid (of the training frames: --size); sets RoPE's grid
    mode: str = "delta"      # "delta" or "frame" (Table 2, step 2: no previous-frame information)
    qk_norm: bool = False    # the released variant: QK-norm, gated attention, SwiGLU MLP
    gated_attn: bool = False
    swiglu: bool = False
    rope_rescale: float | None = 2.0  # RoPE coordinate jitter while training (DeltaTok.jitter); None: off


MODEL_PRESETS = {
    # tiny uses the released block options: with plain tiny blocks the decoder sits for thousands of steps at the
    # saddle where it ignores the token (which starts out constant) and only blurs x_prev
    "tiny": dict(depth=2, qk_norm=True, gated_attn=True, swiglu=True),
    "base": dict(depth=12),                                              # the paper: plain ViT-B blocks
    "released": dict(depth=12, qk_norm=True, gated_attn=True, swiglu=True),  # reference/released_checkpoint_keys.md
}


class GatedAttention(DINOv3ViTAttention):
    """DINOv3 attention with the released options (SPEC section 2): bias-free LayerNorm of each head's q and k AFTER
    RoPE, as the release does (before it is another function), and a per-head sigmoid gate on each head's output."""

    def __init__(self, config, qk_norm, gated):
        super().__init__(config)
        norm = lambda: nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps, bias=False) if qk_norm else None
        self.q_norm, self.k_norm = norm(), norm()
        self.attn_gate = nn.Linear(self.embed_dim, self.num_heads) if gated else None

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        B, L, _ = hidden_states.shape
        q, k, v = (p(hidden_states).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)  # rotate, then normalise
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # (B, H, L, hd)
        if self.attn_gate is not None:
            out = out * torch.sigmoid(self.attn_gate(hidden_states)).transpose(1, 2).unsqueeze(-1)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), None


def init_weights(module):
    """Appendix A: truncated normal (sigma 0.02) for Linear/embedding weights, zero biases, LayerScale 1e-5 -> module"""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, DINOv3ViTLayerScale):
            nn.init.constant_(m.lambda1, 1e-5)
    return module


class DeltaTok(nn.Module):
    def __init__(self, cfg: DeltaTokConfig):
        super().__init__()
        self.cfg = cfg
        hidden = int(cfg.dim * cfg.mlp_ratio * (2 / 3 if cfg.swiglu else 1))  # SwiGLU keeps the MLP's FLOPs
        vit = DINOv3ViTConfig(hidden_size=cfg.dim, num_attention_heads=cfg.heads, intermediate_size=hidden,
                              use_gated_mlp=cfg.swiglu, hidden_act="silu" if cfg.swiglu else "gelu",
                              layerscale_value=1e-5, patch_size=cfg.patch_size, attn_implementation="sdpa")
        self.encoder_blocks = nn.ModuleList([DINOv3ViTLayer(vit) for _ in range(cfg.depth)])
        self.decoder_blocks = nn.ModuleList([DINOv3ViTLayer(vit) for _ in range(cfg.depth)])
        for block in [*self.encoder_blocks, *self.decoder_blocks] if cfg.qk_norm or cfg.gated_attn else ():
            block.attention = GatedAttention(vit, cfg.qk_norm, cfg.gated_attn)  # the released options
        self.z_embed = nn.Embedding(1, cfg.dim)   # the learned z token
        self.xy_embed = nn.Embedding(2, cfg.dim)  # e0: previous frame, e1: current frame
        self.norm = nn.LayerNorm(cfg.dim)         # encoder only: the decoder has none, so it starts as identity
        self.rope = DINOv3ViTRopePositionEmbedding(vit)
        init_weights(self)

    def _rope(self, n, ref, repeat=1, scale=None):
        """(cos, sin) of DINOv3's 2D RoPE for a grid of n patches (patch_grid), tiled `repeat` times: (L, hd), or
        (B, 1, L, hd) with clip b's patch coordinates scaled by scale[b] (the RoPE jitter while training)."""
        coords = get_patches_center_coordinates(*patch_grid(n, self.cfg.aspect), torch.float32, ref.device)
        coords = coords.repeat(repeat, 1)                                                       # (L, 2)
        if scale is not None:
            coords = coords * scale.float().view(-1, 1, 1, 1)                                    # (B, 1, L, 2)
        angles = (2 * math.pi * coords[..., None] * self.rope.inv_freq).flatten(-2).tile(2)     # (..., L, hd)
        return angles.cos().to(ref.dtype), angles.sin().to(ref.dtype)

    def jitter(self, seed, step, clip_ids, device):
        """RoPE jitter (B, 2): factors of the encoder's and decoder's coordinates, log-uniform in [1/r, r] with r =
        rope_rescale (like DINOv3's), drawn per clip from (seed, step, clip) so any split over processes agrees."""
        if self.cfg.rope_rescale is None:
            return None
        u = data.clip_random(seed, step, clip_ids, (2,), device, torch.rand)  # uniform in [0, 1)
        return torch.exp((2 * u - 1) * math.log(self.cfg.rope_rescale))

    def _run(self, blocks, h, rope):
        for block in blocks:
            h = block(h, position_embeddings=rope)
        return h

    def encode(self, x_prev, y, scale=None):
        """(B, N, C) features of the previous and current frame -> (B, 1, C) delta token; scale (B,): RoPE jitter."""
        B, N, C = y.shape
        z = self.z_embed.weight.expand(B, 1, C)
        e0, e1 = self.xy_embed.weight
        frames = [x_prev + e0, y + e1] if self.cfg.mode == "delta" else [y + e1]
        # the frames share the same patch positions; z is an unrotated prefix
        h = self._run(self.encoder_blocks, torch.cat([z, *frames], 1), self._rope(N, y, len(frames), scale))
        return self.norm(h[:, :1])

    def decode(self, token, x_prev, scale=None):
        """(B, 1, C) token and (B, N, C) previous features -> (B, N, C) current features; scale (B,): RoPE jitter."""
        B, N, C = x_prev.shape
        x = x_prev if self.cfg.mode == "delta" else self.xy_embed.weight[0].expand(B, N, C)
        return self._run(self.decoder_blocks, torch.cat([token.to(x.dtype), x], 1), self._rope(N, x, 1, scale))[:, 1:]

    def forward(self, x_prev, y, jitter=None):
        """Reconstruct y from x_prev and the token of (x_prev, y); jitter (B, 2) from DeltaTok.jitter, or None."""
        enc, dec = (None, None) if jitter is None else jitter.unbind(1)
        return self.decode(self.encode(x_prev, y, enc), x_prev, dec)

    def tokenize(self, feats, first_prev):
        """A clip's features (B, T, N, C) -> its tokens (B, T, C), all pairs in parallel; frame 0 is encoded
        against `first_prev` (the black frame's features, (1 or B, N, C))."""
        B, T, N, C = feats.shape
        prev = torch.cat([first_prev.expand(B, N, C)[:, None], feats[:, :-1]], 1)
        return self.encode(prev.flatten(0, 1), feats.flatten(0, 1)).view(B, T, C)

    def reconstruct(self, targets, x0, sequential=True):
        """Rollout (B, T, N, C) of targets (B, T, N, C) from x0 (B, N, C), the true frame before them, each step
        decoding from the last reconstruction (SPEC section 2, "DeltaTok mid"). sequential (the release, appendix D's
        mitigation) encodes targets[:, t] against the last reconstruction, so errors do not accumulate; parallel
        (appendix D's wording) encodes all tokens from ground-truth pairs at once. The same for T = 1."""
        tokens = None if sequential else self.tokenize(targets, x0)[:, :, None]  # (B, T, 1, C)
        out, x = [], x0
        for t in range(targets.shape[1]):
            x = self.decode(self.encode(x, targets[:, t]) if sequential else tokens[:, t], x)
            out.append(x)
        return torch.stack(out, 1)


def build_deltatok(model, vfm, mode="delta", rope_rescale=2.0, size=(1, 1)):
    return DeltaTok(DeltaTokConfig(dim=vfm.dim, heads=vfm.heads, patch_size=vfm.patch_size, mode=mode,
                                   rope_rescale=rope_rescale, aspect=size[1] / size[0], **MODEL_PRESETS[model]))


def patch_grid(n, aspect=1.0):
    """(h, w) of a row-major grid of n patches whose width is `aspect` times its height."""
    h = math.isqrt(round(n / aspect))
    if h * round(h * aspect) != n:
        raise data.UserError(f"{n} patches do not form a grid of width / height {aspect:g} (the tokenizer's "
                             "training frames'): use a --size of that aspect")
    return h, round(h * aspect)


def checkpoint_kind(ckpt):
    """A project checkpoint's "kind"; for a released bare state dict (possibly under "state_dict"), what its keys
    say (reference/released_checkpoint_keys.md): deltatok, deltaworld, rgbhead, seghead or depthhead (256 bins)."""
    state = ckpt.get("state_dict", ckpt)
    keys = {str(k).split(".")[0] for k in state}
    head = ("depthhead" if len(state.get("head.weight", ())) == 256 else "seghead") if {"bn", "head"} <= keys else None
    return ckpt.get("kind") or ("deltatok" if "encoder_blocks" in keys else "deltaworld" if "predictor" in keys else
                                "rgbhead" if "decoder_embed" in keys else head)


def checkpoint_path(path):
    """A local file as is; a Hugging Face repo id 'org/name' -> its pytorch_model.bin (downloaded once, cached)."""
    if not data.hub_id(path):
        return path
    try:
        return hf_hub_download(path, "pytorch_model.bin", local_files_only=hub_unreachable())
    except Exception as e:
        why = hub_hint(path, e, "a local path") or f"no such repo, or no pytorch_model.bin in it ({type(e).__name__})"
        raise data.UserError(f"no file {path}, nor a Hugging Face repo id that could be fetched: {why}") from None


def load_checkpoint(path, expect=(), flag="checkpoint", mmap=False):
    """The dict saved at `path` (weights_only); unreadable, or of a kind not in `expect`: a UserError naming `flag`."""
    local = checkpoint_path(path)
    try:
        ckpt = torch.load(local, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # missing, truncated, not a torch file, ...
        raise data.UserError(f"{flag} {path} cannot be read as a checkpoint: " +
                             f"{type(e).__name__}: {e}".splitlines()[0]) from None
    kind = checkpoint_kind(ckpt) if isinstance(ckpt, dict) else None
    if expect and kind not in expect:
        raise data.UserError(f"{flag} {path} is a {kind or 'foreign'} checkpoint, not {' or '.join(expect)}")
    return ckpt


def load_state_strict(module, ckpt, what, fix="check --model / --vfm / --mode", say=False):
    """Load a checkpoint's "model" (a released file: its state dict) strictly; one line says what does not fit."""
    try:
        module.load_state_dict(ckpt["model"] if "kind" in ckpt else ckpt.get("state_dict", ckpt), strict=True)
    except RuntimeError as e:
        raise data.UserError(f"{what} does not fit this model ({' '.join(str(e).split())[:500]}): {fix}") from None
    if say:  # --init, rank 0: what was loaded
        print(f"{what}: loaded its weights" + f" ({ckpt.get('step')} steps)" * ("step" in ckpt) + "; step 0, new AdamW")


def load_deltatok(path, device="cpu", flag="--tokenizer"):
    """A frozen DeltaTok from a tokenizer.py checkpoint or a released pytorch_model.bin -> (model, vfm name)."""
    ckpt = load_checkpoint(path, ("deltatok",), flag)
    released = "kind" not in ckpt  # a bare state dict of the ViT-B "released" variant
    with torch.device("meta"):  # no random init of weights the file replaces (seconds for ViT-B on a CPU) ...
        model = DeltaTok(DeltaTokConfig(**(MODEL_PRESETS["released"] if released else ckpt["config"])))
    model.to_empty(device=device).rope = type(model.rope)(model.rope.config)  # ... but RoPE's, which it lacks
    load_state_strict(model, ckpt, f"{flag} {path}")
    return model.to(device).eval().requires_grad_(False), DINOV3_B16 if released else ckpt["vfm"]


# ----------------------------------------------------------------------------------------------------------------
# Run helpers shared by every stage: DDP, checkpoints, the run folder, optimizer, logging (data.py: the command
# line, the split of a step over processes, --bench)

def setup_dist():
    """(rank, world size, device) from torchrun's environment; one plain process otherwise."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    sys.excepthook = data.fail_together
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_dist(world, bar=None, done=""):
    """The end of a run: its progress bar closed, rank 0 (whose bar is drawn) says `done`; then wait for the slowest
    rank (rank 0 checks and saves) and tear down: an early teardown can hang the others."""
    if bar is not None:
        bar.close()
        if not bar.disable:
            print(done)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# flags that may change when a run resumes; any other difference to the checkpoint's needs --allow-changes
RESUMABLE = {"steps", "batch_size", "num_workers", "log_every", "eval_every", "ckpt_every", "val_clips", "val_samples",
             "val_sequences", "val_data", "dtype", "compile", "resume", "allow_changes", "out", "init", "bench",
             "index", "trust_index", "wandb"}
_LOCKS = {}  # run folders this process holds, by path


def check_run(args, kind, read=(), write=()):
    """Before anything is built: the paths read and written (data.check_paths), and the checkpoint in --out: none (->
    None), or this stage's with --resume, training state and the same flags (but RESUMABLE; else --allow-changes)."""
    path = os.path.join(args.out, "ckpt.pt")  # the timing, fitting and export modes write no run folder
    no_run = any(getattr(args, k, None) for k in ("bench", "fit_pca", "export_tokens"))
    data.check_paths(read, None if no_run else ("--out", args.out), [*write, ("--index", getattr(args, "index", ""))])
    if no_run or not os.path.exists(path):
        return None
    ckpt = load_checkpoint(path, (), "--out")
    found = checkpoint_kind(ckpt) if isinstance(ckpt, dict) else None
    if found != kind or not getattr(args, "resume", False):
        raise data.UserError(f"--out {args.out} holds a {found or 'foreign'} checkpoint ({path}): " + (
            "--resume to continue that run, or give another --out" if kind and found == kind else "give another --out"))
    if not all(isinstance(ckpt.get(k), dict) for k in ("model", "optimizer", "args")) or "step" not in ckpt:
        raise data.UserError(f"--resume: {path} holds no training state (model, optimizer, step, args), only weights: "
                             f"start a new run from them with --init {path} and another --out")
    old, new = ckpt["args"], vars(args)
    changed = [k for k in new if k not in RESUMABLE and k in old and not data.same_path(old[k], new[k])]
    if changed and not args.allow_changes:
        flags = lambda a: " ".join(f"--{k.replace('_', '-')} {a[k]}" for k in changed)
        raise data.UserError(f"--resume: {path} was trained with {flags(old)}, not {flags(new)}: pass the same "
                             "flags, or --allow-changes to go on with the new ones")
    return ckpt


def resume(args, model, opt, master, ckpt=None):
    """Lock --out (one run per folder, until the run ends), restore model and optimizer from check_run's `ckpt` and
    return it (else step 0), and cut log.jsonl back to its step. The data position is the step (data.make_loader)."""
    catch_signals()
    os.makedirs(args.out, exist_ok=True)
    log, lock = os.path.join(args.out, "log.jsonl"), os.path.abspath(os.path.join(args.out, ".lock"))
    if master and lock not in _LOCKS:
        f = open(lock, "w")
        try:  # and the file is still there: not the lock of a run that ended (and removed it) meanwhile
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            raise data.UserError(f"another run is writing to {args.out} (it holds {lock}): give another --out")
        _LOCKS[lock] = f
        atexit.register(lambda: os.path.exists(lock) and os.remove(lock))  # removed while still held
    if ckpt:
        load_state_strict(model, ckpt, f"--resume {args.out}")
        opt.load_state_dict(ckpt["optimizer"])
    if master and args.resume:
        print(f"resumed from {args.out} at step {ckpt['step']}" if ckpt else
              f"--resume: no checkpoint in {args.out} yet: starting from step 0")
    ckpt, last = ckpt or {"step": 0, "skipped": 0}, 0  # last: the step logged last, what a W&B run continued holds
    if master and os.path.exists(log):  # drop what was logged after the checkpoint (and a torn last line)
        lines = [(json.loads(x)["step"], x) for x in open(log) if x.endswith("\n")]
        open(log, "w").writelines(x for step, x in lines if step <= ckpt["step"])
        last = max([step for step, _ in lines], default=0)
    if master:  # the W&B run's id rides in the checkpoint's args: --resume continues that run
        args.wandb_id = data.wandb_start(args, ckpt.get("args", {}).get("wandb_id"), last)
    return ckpt


def compile_blocks(*modules):
    """--compile: torch.compile each block of every nn.ModuleList in place (regional compilation): one graph serves
    all blocks of a kind, so a start takes seconds, not minutes; the glue stays eager, the state dict keeps its keys."""
    for block in (b for m in modules for blocks in m.modules() if isinstance(blocks, nn.ModuleList) for b in blocks):
        block.compile()


def ddp(model, world, device):
    """DistributedDataParallel under torchrun, the module itself in one process."""
    ids = [device] if device.type == "cuda" else None
    return model if world == 1 else nn.parallel.DistributedDataParallel(model, device_ids=ids)


def stop_if_nonfinite(values, step, ckpt_path, master, what="loss or gradient norm"):
    """Exit 1 on every rank alike (the values are synchronised) before a non-finite value reaches weights or disk."""
    if all(v.isfinite().all() for v in values):
        return
    if master:
        kept = (f"the last good checkpoint is kept at {ckpt_path}: lower --lr or check the data, then --resume"
                if os.path.exists(ckpt_path) else "no checkpoint was written: lower --lr or check the data")
        print(f"\nnon-finite {what} at step {step}: stopping; {kept}.", file=sys.stderr)
    sys.exit(1)


def save_checkpoint(obj, path, master=True):
    """Never non-finite weights (every rank checks); `master` writes atomically through its own temporary file (a crash
    or full disk keeps the previous checkpoint). After a signal (stop_requested) all ranks exit PREEMPTED once saved."""
    stop_if_nonfinite([v for v in obj.get("model", {}).values() if v.is_floating_point()], obj.get("step"), path,
                      master, "weights")
    if master:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:  # to a Python file: a full disk is an OSError (to a file name, a torn zip and a RuntimeError)
            with open(tmp, "wb") as f:
                torch.save(obj, f)
            os.replace(tmp, path)
        except OSError as e:
            raise data.UserError(f"cannot write {path} ({e.strerror or e}): the previous checkpoint is kept; free "
                                 "space, then --resume") from None
        finally:  # after a full disk, a second Ctrl-C
            if os.path.exists(tmp):
                os.remove(tmp)
    if _stop["agreed"]:  # rank 0 has written before any rank exits (torchrun stops the others when one exits)
        if dist.is_initialized():
            dist.barrier()
        stopped(f"step {obj['step']} is saved in {path}", master)


PREEMPTED = 3  # exit status after a signal: the step in flight is saved; the same command with --resume goes on
_stop = {"signal": 0, "agreed": 0}  # the signal this process got, the one every rank agreed to stop on
# a forked helper (a Pool worker) still ends on SIGTERM; DataLoader workers: data.quiet_worker
os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))


def catch_signals():
    """SIGTERM, SIGUSR1 (SLURM) and SIGINT (Ctrl-C) ask the run to stop: the ranks agree at the end of the step
    (stop_requested), rank 0 saves it, all exit PREEMPTED (save_checkpoint). A second Ctrl-C stops at once."""
    def ask(signum, frame):
        if signum == _stop["signal"] == signal.SIGINT:
            raise KeyboardInterrupt  # data.cli: exit 130, no traceback
        _stop["signal"] = signum
    _stop.update(signal=0, agreed=0)
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, ask)


def stop_requested(world):
    """The signal any rank got (0: none), on every rank alike: one all-reduce of one number per step."""
    flag = torch.tensor(_stop["signal"], device="cuda" if world > 1 and dist.get_backend() == "nccl" else "cpu")
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    _stop["agreed"] = int(flag)
    return _stop["agreed"]


def stopped(what, master):
    """Exit PREEMPTED; rank 0 says what is saved and how to go on: the command as it was launched."""
    if master:  # (torchrun's workers know its run id; srun or an environment set by hand start python itself)
        again = shlex.join(sys.argv + ["--resume"] * ("--resume" not in sys.argv))
        how = (": torchrun [its options]" if "TORCHELASTIC_RUN_ID" in os.environ else
               ", under the same launcher: python" if dist.is_initialized() else ": python")
        print(f"\nstopped by {signal.Signals(_stop['agreed']).name}: {what}; to go on{how} {again}", file=sys.stderr)
    sys.exit(PREEMPTED)


def optimizer_step(module, opt, lr, loss, step, ckpt_path, master, world, grad_clip=math.inf):
    """On every rank alike: the loss (detached) averaged over the ranks in place, the gradient norm of `module` (clipped
    to grad_clip), a stop before a non-finite value reaches the weights, the update at `lr`. -> the gradient norm"""
    if world > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    stop_if_nonfinite([loss, grad_norm], step, ckpt_path, master)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def log_step(bar, args, step, loss, lr, grad_norm, skipped):
    """The bar moves on; every --log-every steps rank 0 (whose bar is drawn) logs the step: loss, lr, clips/s, ..."""
    bar.update(1)
    if bar.disable or step % args.log_every and step != args.steps:
        return
    t0, logged = getattr(bar, "logged", (bar.start_t, bar.initial))
    rate = (step - logged) * args.global_batch / (time.time() - t0)
    bar.set_postfix(loss=f"{loss.item():.4g}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}", skipped=skipped)
    log_jsonl(args.out, dict(step=step, loss=loss.item(), lr=lr, grad_norm=grad_norm.item(), clips_per_s=rate,
                             skipped_videos=skipped))
    bar.logged = time.time(), step


def make_optimizer(model, lr, weight_decay, device):
    """AdamW; weight decay on Linear/conv weights only (not biases, norms, embeddings, LayerScale)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def lr_at(step, lr, warmup):
    return lr * min(1.0, (step + 1) / max(1, warmup))  # linear warm-up, then constant (appendix A)


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def log_jsonl(out, record):
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    data.wandb_log(record)


# ----------------------------------------------------------------------------------------------------------------
# Training

def feature_loss(pred, target, kind="mse"):
    """Reconstruction loss averaged over all elements: MSE (appendix A) or log-cosh (the release's recipe), computed
    stably as |d| + softplus(-2|d|) - log 2 with d = pred - target (SPEC section 2)."""
    d = pred.float() - target.float()
    return d.pow(2).mean() if kind == "mse" else (d.abs() + F.softplus(-2 * d.abs()) - math.log(2)).mean()


@torch.no_grad()
def reconstruction_check(tok, vfm, clips, device, dtype, batch_size=16):
    """Feature MSE and cosine of the reconstruction rollout from frame 0 at horizons 1 and 3 (clips of 4 frames),
    sequential and parallel (the same at horizon 1), with copy-last (frame 0) beside them."""
    sums = {}
    for i in range(0, len(clips), batch_size):
        with autocast(device, dtype):
            feats = vfm(clips[i:i + batch_size].to(device)).float()                        # (B, 4, N, C)
            seq, par = (tok.reconstruct(feats[:, 1:], feats[:, 0], s).float() for s in (True, False))  # (B, 3, N, C)
        for h in (1, 3):
            target = feats[:, h]
            for name, pred in (("deltatok", seq[:, h - 1]), ("deltatok_parallel", par[:, h - 1]),
                               ("copy_last", feats[:, 0])):
                for metric, v in (("mse", (pred - target).pow(2).mean((1, 2))),
                                  ("cos", F.cosine_similarity(pred, target, dim=-1).mean(1))):
                    sums[k] = sums.get(k := f"h{h}/{name}/{metric}", 0.0) + v.sum().item()
    return {k: v / len(clips) for k, v in sums.items()}


def main(args):
    if (args.fit_pca or args.convert_pca) and (not args.pca or os.path.lexists(args.pca)):  # never over another file
        raise data.UserError(f"--pca {args.pca} exists (runs record a PCA file by its SHA-256): give a new name, or "
                             "remove it yourself" if args.pca else "--fit-pca and --convert-pca write --pca: give one")
    if args.convert_pca:  # DINO-Foresight's PCA file, read through an allow-list: nothing in it runs
        data.check_paths([("--convert-pca", args.convert_pca)], write=[("--pca", os.path.dirname(args.pca) or ".")])
        return save_pca(convert_pca(args.convert_pca), args.pca)
    rank, world, device = setup_dist()
    master = rank == 0
    # what the user gave is checked on every rank before anything is built (flag ranges: get_parser)
    accum = 1 if args.bench else data.accumulation(args.global_batch, args.batch_size, world)
    read = [("--data", args.data), ("--val-data", args.val_data), ("--init", args.init), ("--pca", args.pca)]
    ckpt = check_run(args, "deltatok", read[:3 if args.fit_pca else 4],  # --fit-pca writes --pca, in its folder
                     [("--pca", os.path.dirname(os.path.abspath(args.pca)))] * bool(args.fit_pca))
    init = load_checkpoint(args.init, ("deltatok",), "--init") if args.init else None
    vfm = VFM(feature_source(args.vfm, args.vfm_layers, "" if args.fit_pca else args.pca)).to(device)
    if args.fit_pca and (args.fit_pca[0] > vfm.dim or args.fit_pca[0] % (vfm.dim // vfm.heads)):  # before any fit
        raise data.UserError(f"--fit-pca {args.fit_pca[0]}: want at most the features' {vfm.dim} components, a "
                             f"multiple of the head width {vfm.dim // vfm.heads}")
    if init and (trained := init.get("vfm", DINOV3_B16)) != vfm.name:  # released files: DINOv3 ViT-B/16
        raise data.UserError(f"--init {args.init} was trained on the features {trained}, not {vfm.name}")
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    tok = build_deltatok(args.model, vfm, args.mode, None if args.no_rope_jitter else 2.0, args.size).to(device)
    if init:  # weights only (a released file or a tokenizer.py checkpoint): optimizer and step start afresh
        load_state_strict(tok, init, f"--init {args.init}", say=master)
    train = data.ClipDataset(data.open_source(args.data, "train", args.fps, args.seed, args), num_frames=2,
                             size=args.size, stride=tuple(args.stride), seed=args.seed)  # (its index: written)
    if args.fit_pca:  # over all patches of N batches of training clips (2 frames each)
        loader = data.make_loader(train, args.batch_size, num_workers=args.num_workers)
        feats = (vfm(next(loader)["frames"].to(device)) for _ in tqdm(range(args.fit_pca[1]), "fit PCA"))
        return save_pca(fit_pca(feats, args.fit_pca[0]), args.pca, master)
    opt = make_optimizer(tok, args.lr, args.weight_decay, device)
    if args.compile:
        compile_blocks(vfm, tok)

    if args.bench:
        frames = torch.randint(0, 256, (args.batch_size, 2, 3, *args.size), dtype=torch.uint8, device=device)

        def step(update=True, b=args.batch_size):
            with autocast(device, args.dtype):
                feats = vfm(frames[:b])
                loss = feature_loss(tok(feats[:, 0], feats[:, 1]), feats[:, 1], args.loss)
            loss.backward()
            if update:
                torch.nn.utils.clip_grad_norm_(tok.parameters(), args.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return data.run_bench(step, lambda: step(False, 1), args.batch_size, args.bench, device,
                         "authors' code, H200, bf16 + compile: 256 px batch 64: 115 ms, 24.2 GiB; "
                         "512 px batch 64: 511 ms, 88.6 GiB (SPEC section 6)")

    if master:  # held-out clips of 4 frames for the reconstruction check
        val_src = data.open_source(args.val_data or args.data, "val", args.fps, args.seed, args)
        val = data.ClipDataset(val_src, num_frames=4, size=args.size, stride=tuple(args.stride), seed=args.seed + 1)
        val_clips = torch.stack([val.sample(0, j)[0] for j in range(args.val_clips)])
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step, skipped = map(resume(args, tok, opt, master, ckpt).get, ("step", "skipped"))
    model = ddp(tok, world, device)
    loader = data.make_loader(train, args.batch_size, rank, world, accum, step, args.num_workers)

    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True)
    while step < args.steps:
        lr = lr_at(step, args.lr, args.warmup)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = next(loader)
            skipped += batch["skipped"]
            first = (micro * world + rank) * args.batch_size  # global index of this micro-batch's first clip
            jitter = tok.jitter(args.seed, step, range(first, first + args.batch_size), device)  # (B, 2) or None
            with model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext():
                with autocast(device, args.dtype):
                    feats = vfm(batch["frames"].to(device, non_blocking=True))  # (B, 2, N, C)
                    loss = feature_loss(model(feats[:, 0], feats[:, 1], jitter), feats[:, 1], args.loss)
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        grad_norm = optimizer_step(tok, opt, lr, loss_sum, step, ckpt_path, master, world, args.grad_clip)
        step += 1
        log_step(bar, args, step, loss_sum, lr, grad_norm, skipped)
        if master and (step % args.eval_every == 0 or step == args.steps):
            tok.eval()
            result = reconstruction_check(tok, vfm, val_clips, device, args.dtype)
            tok.train()
            log_jsonl(args.out, dict(step=step, eval=result))
            data.draw_curves(args.out, "DeltaTok", r"eval/(h\d/\w+)/mse", "held-out feature MSE, h1 / h3 frames ahead")
            pair = lambda h, name: f"{result[f'h{h}/{name}/mse']:.4f} / {result[f'h{h}/{name}/cos']:.3f}"
            tqdm.write(f"step {step} reconstruction check on held-out clips (feature MSE / cosine):" + "".join(
                f"\n  horizon {h}: DeltaTok sequential {pair(h, 'deltatok')}   parallel "
                f"{pair(h, 'deltatok_parallel')}   copy-last {pair(h, 'copy_last')}" for h in (1, 3)))
        if stop_requested(world) or step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(dict(kind="deltatok", config=asdict(tok.cfg), vfm=vfm.name, size=args.size,
                                 model=tok.state_dict(), optimizer=opt.state_dict(), step=step, skipped=skipped,
                                 args=vars(args)), ckpt_path, master)
    cleanup_dist(world, bar, f"done: {step} steps, {skipped} broken videos skipped, checkpoint {ckpt_path}")


def get_parser():
    p = argparse.ArgumentParser(description="Train DeltaTok (appendix A recipe as defaults).",
                                formatter_class=data.HelpFormatter)
    p.add_argument("--out", default="runs/deltatok", help="run folder: ckpt.pt, log.jsonl")
    data.vfm_flags(p, DINOV3_B16, VFM_PRESETS)
    p.add_argument("--model", default="base", choices=list(MODEL_PRESETS), help="tokenizer size / variant")
    p.add_argument("--mode", default="delta", choices=["delta", "frame"], help="delta tokens or frame tokens")
    p.add_argument("--init", default="", help="start from these DeltaTok weights (a tokenizer.py ckpt.pt or the "
                   "released pytorch_model.bin); optimizer and step start fresh")
    p.add_argument("--loss", default="mse", choices=["mse", "log-cosh"], help="mse (the paper), log-cosh (the release)")
    p.add_argument("--steps", type=data.at_least(1), default=50_000)
    p.add_argument("--global-batch", type=data.at_least(1), default=1024, help="frame pairs per step, all GPUs")
    p.add_argument("--batch-size", type=data.at_least(1), default=64, help="frame pairs per GPU per micro-step")
    p.add_argument("--lr", type=data.positive, default=1e-3)
    p.add_argument("--warmup", type=data.at_least(0), default=5_000)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=data.positive, default=1e-2)
    p.add_argument("--no-rope-jitter", action="store_true", help="no RoPE coordinate jitter while training")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks of the VFM and the tokenizer")
    p.add_argument("--val-clips", type=data.at_least(1), default=64)
    p.add_argument("--bench", type=data.at_least(0), default=0, help="time N training steps on random frames and exit")
    p.add_argument("--fit-pca", type=data.at_least(1), nargs=2, metavar=("K", "N"), help="fit a K-component PCA of "
                   "the features of N batches of training clips, write it to --pca and exit")
    p.add_argument("--convert-pca", metavar="FILE", help="convert DINO-Foresight's PCA .pth to a --pca file, exit")
    data.clip_flags(p)
    data.run_flags(p, workers=8, eval_every=1000)
    return p


if __name__ == "__main__":
    data.cli(main, get_parser())
