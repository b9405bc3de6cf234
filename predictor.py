"""
DeltaWorld: a generative world model over delta tokens. Each frame of a clip is one DeltaTok token; a small
cross-attention predictor maps a noise query and the context tokens to the next token, trained with best-of-many
(BoM) over K noise queries (SPEC section 3, appendix A).

Run it:
  # CPU, a couple of minutes: a tiny predictor on a tiny tokenizer (train one first, see tokenizer.py)
  python predictor.py --tokenizer runs/tok_tiny/ckpt.pt --model tiny --size 64 --global-batch 32 \
      --batch-size 32 --steps 300 --warmup 30 --bom 64 --out runs/world_tiny
  # one GPU, the paper's recipe on your videos (global batch 1024 by gradient accumulation)
  python predictor.py --tokenizer runs/deltatok/ckpt.pt --data /path/to/videos --compile --out runs/deltaworld
  # 8 GPUs on one node
  torchrun --standalone --nproc_per_node=8 predictor.py --tokenizer runs/deltatok/ckpt.pt --data /path/to/videos \
      --compile --out runs/deltaworld
  # encode the training clips once, then train without the backbone and the tokenizer encoder
  python predictor.py --tokenizer runs/deltatok/ckpt.pt --data /path/to/videos --cache-tokens runs/cache --compile
  # speed and memory of one training step (SPEC section 6: 142 ms, 3.8 GiB at 256 px, batch 32 x 8, K=256, H200)
  python predictor.py --bench 20 --size 256 --batch-size 32 --compile
"""
import argparse
import contextlib
import glob
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import tokenizer as T

# ----------------------------------------------------------------------------------------------------------------
# The predictor (SPEC section 3): cross-attention blocks, RoPE over any number of axes. baseline_dinoworld.py
# imports it too.


def rope_angles(pos, axes, head_dim):
    """RoPE tables for positions pos (..., L, A) with one rotated slice of each head per axis (sizes `axes`, in
    order from dim 0); the last head_dim - sum(axes) dims stay unrotated. A slice of size a uses a/2 frequencies
    w_j = 10^(-u_j), u evenly spaced over [-2, 2], angle = 2 pi pos w_j, and rotates the pairs (j, j + a/2)
    (SPEC section 3). Returns (cos, signed sin, partner index) for apply_rope: cos/sin (..., L, head_dim)."""
    if len(axes) != pos.shape[-1] or sum(axes) > head_dim or any(a % 2 for a in axes):
        raise ValueError(f"RoPE axes {axes} do not fit {pos.shape[-1]} position axes and head dim {head_dim}")
    cos, sin, partner, start = [], [], [], 0
    for i, a in enumerate(axes):
        w = 10.0 ** -torch.linspace(-2, 2, a // 2, device=pos.device, dtype=torch.float32)
        angle = 2 * math.pi * pos[..., i:i + 1].float() * w                  # (..., L, a/2)
        cos += [angle.cos(), angle.cos()]
        sin += [-angle.sin(), angle.sin()]                                    # x1' = x1 c - x2 s, x2' = x2 c + x1 s
        partner.append(torch.arange(a, device=pos.device).roll(a // 2) + start)
        start += a
    rest = head_dim - start
    cos.append(pos.new_ones(*pos.shape[:-1], rest, dtype=torch.float32))
    sin.append(pos.new_zeros(*pos.shape[:-1], rest, dtype=torch.float32))
    partner.append(torch.arange(start, head_dim, device=pos.device))
    return torch.cat(cos, -1), torch.cat(sin, -1), torch.cat(partner)


def apply_rope(x, rope):
    """Rotate x (B, heads, L, head_dim) by the tables of rope_angles (positions (B, L, A))."""
    cos, sin, partner = rope
    return (x * cos.unsqueeze(-3) + x[..., partner] * sin.unsqueeze(-3)).to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim, init=1e-5):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.lambda1


class CrossAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)  # one projection of the context for k and v
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, context, q_rope, k_rope, mask):
        B, Q, C = x.shape
        K, h = context.shape[1], self.heads
        q = self.q_proj(x).view(B, Q, h, C // h).transpose(1, 2)                           # (B, h, Q, hd)
        k, v = self.kv_proj(context).view(B, K, 2, h, C // h).permute(2, 0, 3, 1, 4)       # (B, h, K, hd) each
        q, k = apply_rope(q, q_rope), apply_rope(k, k_rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.out_proj(out.transpose(1, 2).reshape(B, Q, C))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm cross-attention block. The LayerNorm is on the query stream only; the context tokens enter kv_proj
    as they are (the tokenizer's output is already layer-normalised) and are not updated from block to block."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, heads)
        self.layer_scale1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.layer_scale2 = LayerScale(dim)

    def forward(self, x, context, q_rope, k_rope, mask):
        x = x + self.layer_scale1(self.attention(self.norm1(x), context, q_rope, k_rope, mask))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Predictor(nn.Module):
    """Queries (B, Q, C) read the context (B, K, C) through `depth` cross-attention blocks; the queries never attend
    to each other. Positions q_pos (B, Q, A), k_pos (B, K, A) drive RoPE on `axes`; mask (B or 1, Q, K) bool, True
    = may attend (None: all). Returns (B, Q, C) after a final LayerNorm and a Linear head."""

    def __init__(self, dim=768, depth=12, heads=12, mlp_ratio=4.0, axes=(60,)):
        super().__init__()
        self.dim, self.heads, self.axes = dim, heads, tuple(axes)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)
        T.init_weights(self)  # truncated normal 0.02, zero biases (appendix A); LayerScale starts at 1e-5 above

    def forward(self, queries, context, q_pos, k_pos, mask=None):
        head_dim = self.dim // self.heads
        q_rope, k_rope = rope_angles(q_pos, self.axes, head_dim), rope_angles(k_pos, self.axes, head_dim)
        x = queries
        for block in self.blocks:
            x = block(x, context, q_rope, k_rope, mask)
        return self.head(self.norm(x))


PREDICTOR_PRESETS = {"tiny": dict(depth=2), "base": dict(depth=12)}  # width and heads follow the tokenizer
