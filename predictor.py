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
  # delta tokens of every frame of your videos, for another world model (README, "Other feature sources")
  python predictor.py --tokenizer runs/deltatok/ckpt.pt --data /path/to/videos --size 448x896 --export-tokens runs/tok
  # speed and memory of one training step (SPEC section 6: 142 ms, 3.8 GiB at 256 px, batch 32 x 8, K=256, H200)
  python predictor.py --bench 20 --size 256 --batch-size 32 --compile
"""
import argparse
import contextlib
import glob
import hashlib
import math
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DINOv3ViTConfig
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayerScale, DINOv3ViTMLP

import data
import tokenizer as T

# ----------------------------------------------------------------------------------------------------------------
# The predictor (SPEC section 3), DINO-world's too: cross-attention blocks, RoPE over any number of axes.


def rope_angles(pos, axes, head_dim):
    """RoPE tables for positions pos (..., L, A): each head rotates one slice per axis (sizes `axes`, all one even
    size, in order from dim 0) and leaves its last head_dim - sum(axes) dims as they are. A slice of size a uses a/2
    frequencies w_j = 10^(-u_j), u evenly spaced over [-2, 2], angle = 2 pi pos w_j, and rotates the pairs
    (j, j + a/2) (SPEC section 3). Returns (cos, signed sin, axes) for apply_rope, cos/sin (..., L, head_dim)."""
    if len(axes) != pos.shape[-1] or sum(axes) > head_dim or axes[0] % 2 or len(set(axes)) > 1:
        raise ValueError(f"RoPE axes {axes} do not fit {pos.shape[-1]} position axes and head dim {head_dim}")
    cos, sin = [], []
    for i, a in enumerate(axes):
        w = 10.0 ** -torch.linspace(-2, 2, a // 2, device=pos.device, dtype=torch.float32)
        angle = 2 * math.pi * pos[..., i:i + 1].float() * w                  # (..., L, a/2)
        cos += [angle.cos(), angle.cos()]
        sin += [-angle.sin(), angle.sin()]                                    # x1' = x1 c - x2 s, x2' = x2 c + x1 s
    rest = (0, head_dim - sum(axes))  # unrotated: cos 1, sin 0
    return F.pad(torch.cat(cos, -1), rest, value=1.0), F.pad(torch.cat(sin, -1), rest), axes


def apply_rope(x, rope):
    """Rotate x (B, heads, L, head_dim) by the tables of rope_angles (positions (B, L, A)). The halves of each axis'
    slice swap places by a flip, not a gather: a gather's backward (an accumulating index_put) sorts every element
    on a GPU, a cost that grows with DINO-world's thousands of patch queries."""
    cos, sin, axes = rope
    n = len(axes) * axes[0]
    swapped = torch.cat([x[..., :n].unflatten(-1, (len(axes), 2, -1)).flip(-2).flatten(-3), x[..., n:]], -1)
    return (x * cos.unsqueeze(-3) + swapped * sin.unsqueeze(-3)).to(x.dtype)


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


class Block(nn.Module):
    """Pre-norm cross-attention block. The LayerNorm is on the query stream only; the context tokens enter kv_proj
    as they are (the tokenizer's output is already layer-normalised) and are not updated from block to block."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        vit = DINOv3ViTConfig(hidden_size=dim, intermediate_size=int(dim * mlp_ratio), layerscale_value=1e-5)
        self.norm1 = nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, heads)
        self.layer_scale1 = DINOv3ViTLayerScale(vit)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = DINOv3ViTMLP(vit)
        self.layer_scale2 = DINOv3ViTLayerScale(vit)

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
        q_rope, k_rope = (rope_angles(pos, self.axes, self.dim // self.heads) for pos in (q_pos, k_pos))
        for block in self.blocks:
            queries = block(queries, context, q_rope, k_rope, mask)
        return self.head(self.norm(queries))


PREDICTOR_PRESETS = {"tiny": dict(depth=2), "base": dict(depth=12)}  # the width follows the tokenizer
HEAD_DIM = 64  # ViT-B's: the RoPE layouts (60 + 4, 20 + 20 + 20 + 4) are per 64-d head, so narrower models have fewer
# heads rather than narrower ones (a 16-d head would leave 2 RoPE frequencies per DINO-world axis: 1e-2 and 1e2)


# ----------------------------------------------------------------------------------------------------------------
# DeltaWorld (SPEC section 3)

NOISE_STD = 0.02  # generative queries: N(0, 0.02^2 I) per predicted token and sample (SPEC section 3)


class DeltaWorld(nn.Module):
    """The predictor over a frozen DeltaTok. The tokenizer and the VFM are no submodules (not trained, saved or
    wrapped by DDP); the VFM only gives sample() the black frame (the 'previous frame' of a clip's first frame)."""

    def __init__(self, tokenizer, vfm=None, model="base", bom=True):
        super().__init__()
        cfg = tokenizer.cfg
        heads = max(1, cfg.dim // HEAD_DIM)
        self.config = dict(model=model, dim=cfg.dim, heads=heads, bom=bom, axes=(cfg.dim // heads - 4,),
                           **PREDICTOR_PRESETS[model])  # 1D RoPE on all but the last 4 dims per head (appendix A)
        self.predictor = Predictor(cfg.dim, PREDICTOR_PRESETS[model]["depth"], heads, axes=self.config["axes"])
        self.q_embed = None if bom else T.init_weights(nn.Embedding(1, cfg.dim))  # --no-bom's learned query
        self.__dict__.update(tokenizer=tokenizer, vfm=vfm, _black={})  # past nn.Module's __setattr__: no submodules

    def forward(self, tokens, times, queries=None):
        """Predict tokens 1..T-1 of clips (B, T, C) with timestamps (B, T) in seconds, each from the tokens before
        it. queries (B, M, T-1, C): M candidates per position (None: the learned query, M = 1). Since queries never
        attend to each other, the M candidates are just more queries on the same context. Returns (B, M, T-1, C)."""
        B, T, C = tokens.shape
        if queries is None:
            queries = self.q_embed.weight.expand(B, 1, T - 1, C)
        M = queries.shape[1]
        pos = times[..., None].float()                                                   # (B, T, 1)
        mask = torch.ones(T - 1, T - 1, dtype=torch.bool, device=tokens.device).tril()  # query t sees z_0..z_{t-1}
        out = self.predictor(queries.flatten(1, 2), tokens[:, :-1], pos[:, 1:].repeat(1, M, 1), pos[:, :-1],
                             mask.repeat(M, 1)[None])
        return out.view(B, M, T - 1, C)

    def black(self, num_patches, device):
        """The black frame's VFM features (1, N, C) for a grid of N patches (computed once per N)."""
        if num_patches not in self._black:
            if self.vfm is None:
                raise RuntimeError("DeltaWorld needs the VFM for the black frame: pass vfm= when building it")
            grid = T.patch_grid(num_patches, self.tokenizer.cfg.aspect)
            self._black[num_patches] = self.vfm.black([n * self.vfm.patch_size for n in grid], device).float()
        return self._black[num_patches].to(device)

    def queries(self, n, length, generator=None, device="cpu"):
        """n x length queries (n, length, C): fresh noise, or the learned query."""
        C = self.config["dim"]
        if self.q_embed is not None:
            return self.q_embed.weight.expand(n, length, C)
        gen_device = generator.device if generator is not None else device
        return (torch.randn(n, length, C, generator=generator, device=gen_device) * NOISE_STD).to(device)

    @torch.no_grad()
    def sample(self, feats, times, num_samples, horizon, generator=None):
        """Roll out `horizon` steps, `num_samples` times, from context features feats (B, Tc, N, C) with timestamps
        times (B, Tc + horizon) of context and target frames: one forward per step for all samples; each token is
        decoded from the previous features (first: the last context frame's) and appended to the context, never
        re-encoded. Returns features (B, S, H, N, C) and tokens (B, S, H, C); the noise comes from `generator`."""
        B, Tc, N, C = feats.shape
        S = num_samples
        feats = feats.float()
        context = self.tokenizer.tokenize(feats, self.black(N, feats.device)).float().repeat_interleave(S, 0)
        pos = times.float().to(feats.device).repeat_interleave(S, 0)[..., None]          # (B S, Tc + H, 1)
        x = feats[:, -1].repeat_interleave(S, 0)                                          # (B S, N, C)
        out = []
        for h in range(horizon):
            L = Tc + h
            q = self.queries(B * S, 1, generator, feats.device)
            token = self.predictor(q, context, pos[:, L:L + 1], pos[:, :L])              # (B S, 1, C)
            x = self.tokenizer.decode(token, x).float()
            context = torch.cat([context, token], 1)
            out.append(x)
        return torch.stack(out, 1).view(B, S, horizon, N, C), context[:, Tc:].view(B, S, horizon, C)


def load_deltaworld(path, device="cpu", tokenizer=None, vfm=None, flag="--ckpt"):
    """A trained DeltaWorld in eval mode, with its tokenizer (the recorded path, or `tokenizer` to override it)
    and the VFM (a VFM module to share, else built from the recorded name)."""
    ckpt = T.load_checkpoint(path, ("deltaworld",), flag)
    released = "kind" not in ckpt  # the released pytorch_model.bin: a bare state dict of the ViT-B predictor
    if released and not tokenizer:
        raise data.UserError(f"{flag} {path} is a bare state dict (released weights): pass the DeltaTok it goes with, "
                             "e.g. --tokenizer Amazon-FAR/deltatok-kinetics")
    if not (tokenizer or data.hub_id(ckpt["tokenizer"]) or os.path.exists(ckpt["tokenizer"])):
        raise data.UserError(f"{flag} {path} records its tokenizer at {ckpt['tokenizer']}, which is gone: pass "
                             "--tokenizer with that file (moved or copied), or with the released DeltaTok it used")
    tok, vfm_name = T.load_deltatok(tokenizer or ckpt["tokenizer"], device)
    if "tokenizer_sha1" in ckpt and ckpt["tokenizer_sha1"] != (sha1 := file_sha1(tokenizer or ckpt["tokenizer"])):
        raise data.UserError(f"{flag} {path} was trained with another tokenizer than {tokenizer or ckpt['tokenizer']} "
                             f"(sha1 {ckpt['tokenizer_sha1'][:12]}..., not {sha1[:12]}...): pass the one it records")
    vfm = vfm if vfm is not None else T.VFM(vfm_name if released else ckpt["vfm"] or vfm_name).to(device)
    cfg = dict(model="base", bom="q_embed.weight" not in ckpt.get("state_dict", ckpt)) if released else ckpt["config"]
    world = DeltaWorld(tok, vfm, cfg["model"], cfg["bom"])
    T.load_state_strict(world, ckpt, f"DeltaWorld checkpoint {path}", "check --tokenizer")
    return world.to(device).eval().requires_grad_(False)


def file_sha1(path):  # a checkpoint's (a hub id: its download's): what a DeltaWorld and its tokens keep of a tokenizer
    with open(T.checkpoint_path(path), "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def clip_noise(seed, step, clip_ids, K, length, dim, device):
    """BoM candidates (B, K, length, C) for the clips `clip_ids` of a step (data.clip_random): any split over processes
    and micro-batches, and the token cache, draw the same noise for the same clip. K = 0: None (the learned query)."""
    return data.clip_random(seed, step, clip_ids, (K, length, dim), device) * NOISE_STD if K else None


def frame_loss(pred, target, start=-2):
    """Smooth L1 (beta 0.1, appendix A) per frame: the mean over dims start.. (default: its patches and channels,
    (..., N, C) -> (...))."""
    loss = F.smooth_l1_loss(pred.float(), target.float().expand_as(pred), beta=0.1, reduction="none")
    return loss.flatten(start).mean(-1)


def world_loss(world, model, x, times, noise=None, chunk=256):
    """The training loss of both world models, the mean frame_loss of frames 1..T-1 of clips x at times (B, T): tokens
    (B, T, C) (DeltaWorld) or patch features (B, T, N, C) (DINO-world). BoM (noise (B, K, T-1, C)): a candidate pass
    without autograd through `world`, `chunk` candidates at a time, picks per clip and frame the query of lowest loss;
    only that query runs with gradients through `model` (world, or its DDP/compiled wrapper). noise None: the learned
    query. Returns (loss, index of the chosen candidate (B, T-1) or None)."""
    target, best = x[:, None, 1:], None                                                  # (B, 1, T-1, ...)
    if noise is not None:
        noise = noise.to(x.dtype)
        with torch.no_grad():  # no graph, no stored activations
            best = torch.cat([frame_loss(world(x, times, q), target, 3) for q in noise.split(chunk, 1)], 1).argmin(1)
        noise = noise.gather(1, best[:, None, :, None].expand(-1, 1, -1, noise.shape[-1]))        # (B, 1, T-1, C)
    return frame_loss(model(x, times, noise), target, 3).mean(), best


# ----------------------------------------------------------------------------------------------------------------
# Token cache: encode the training clips once (backbone + DeltaTok encoder, about 144 GFLOPs per frame, Table B),
# then train the predictor (about 0.3 GFLOPs per token) from disk. Cache clip c is clip c of the on-the-fly stream,
# ClipDataset.sample(c // global_batch, c % global_batch), so training from n cached clips sees exactly the on-the-fly
# clips (and BoM noise) for its first n / global_batch steps, then the cache again in a fresh order per epoch.

SHARD = 4096  # clips per shard file


class _StreamClips(torch.utils.data.Dataset):
    def __init__(self, dataset, global_batch):
        self.dataset, self.global_batch = dataset, global_batch

    def __getitem__(self, c):
        return self.dataset.sample(*divmod(c, self.global_batch))


def claim(folder, meta, flag):
    """Before anything is written, a folder of shards (token cache, export): shards made otherwise (its meta.pt, first
    written: tokenizer, features, data, size, ...) are refused, never mixed in, as are other files. -> whether new"""
    path = os.path.join(folder, "meta.pt")
    old = T.load_checkpoint(path, (meta["kind"],), flag) if os.path.exists(path) else {}
    if other := {k: old.get(k) for k in meta if old and old.get(k) != meta[k]}:
        raise data.UserError(f"{flag} {folder} was made with other settings ({other}): give another folder, or "
                             "delete it to make it again")
    if not old and os.path.isdir(folder) and any(not f.endswith(".tmp") for f in os.listdir(folder)):  # (rank 0's)
        raise data.UserError(f"{flag} {folder} holds files it did not make (no meta.pt): give a new or empty folder")
    return not old


@torch.no_grad()
def build_token_cache(folder, meta, train, encode, rank, world_size, batch_size, num_workers):
    """Encode meta["num_clips"] clips by `encode` into folder/shard_*.pt (tokens (n, T, C) float32, times (n, T));
    shard k is written by rank k % world_size, and shards already on disk are kept, so an interrupted build resumes."""
    os.makedirs(folder, exist_ok=True)
    T.save_checkpoint(meta, os.path.join(folder, "meta.pt"), rank == 0)  # first: what made the shards (claim)
    n, G = meta["num_clips"], meta["global_batch"]
    shards = [range(k * SHARD, min(n, (k + 1) * SHARD)) for k in range(rank, math.ceil(n / SHARD), world_size)]
    bar = tqdm(total=sum(map(len, shards)), desc="token cache", unit="clip", disable=rank != 0, dynamic_ncols=True)
    for ids in shards:
        path = os.path.join(folder, f"shard_{ids[0] // SHARD:05d}.pt")
        if os.path.exists(path):
            bar.update(len(ids))
            continue
        tokens, times, skipped = [], [], 0
        for frames, t, s in torch.utils.data.DataLoader(_StreamClips(train, G), batch_size, sampler=ids,
                                                        num_workers=num_workers, worker_init_fn=data.quiet_worker):
            tokens.append(encode(frames).cpu())                                          # (B, T, C)
            times.append(t)
            skipped += int(s.sum())
            bar.update(len(t))
        T.save_checkpoint(dict(tokens=torch.cat(tokens), times=torch.cat(times), skipped=skipped), path)
        if T.stop_requested(1):  # a signal: each rank stops after its shard (they write different numbers of them)
            T.stopped(f"the token cache keeps the shards written in {folder}", rank == 0)
    bar.close()
    if world_size > 1:  # every shard written before any rank reads them
        dist.barrier()


class TokenCache:
    """The shards, memory-mapped. sample(step, j) is ClipDataset.sample's clip as tokens (T, C), so data.make_loader
    batches the cache as it batches the clips (its "frames" then are tokens (B, T, C))."""

    def __init__(self, folder, meta):  # meta: what made the shards (claim)
        paths = sorted(glob.glob(os.path.join(folder, "shard_*.pt")))
        self.shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in paths]
        self.meta, self.n, self.perm = meta, meta["num_clips"], (0, None)
        if sum(len(s["tokens"]) for s in self.shards) != self.n:
            raise data.UserError(f"token cache {folder} is incomplete: delete it and run again")
        self.skipped = sum(s["skipped"] for s in self.shards)

    def sample(self, step, j):  # cache clip step G + j: tokens, times and no broken video
        epoch, r = divmod(step * self.meta["global_batch"] + j, self.n)
        if epoch:  # later epochs: a fresh order, the same on every rank
            if self.perm[0] != epoch:
                self.perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.meta["seed"] * 1_000_003 + epoch)))
            r = int(self.perm[1][r])
        shard = self.shards[r // SHARD]
        return shard["tokens"][r % SHARD], shard["times"][r % SHARD], 0


@torch.no_grad()
def export_tokens(tok, vfm, source, folder, meta, size, device, dtype, rank=0, world_size=1, shard=1000, chunk=64):
    """Delta tokens of every frame of every video of `source`, each frame resized whole to size (H, W), for another
    world model: folder/shard_KKKKK.pt holds videos k * shard onwards as {"video": [index in the source], "tokens":
    [(T, C) float32], "times": [(T,) seconds]}, and meta.pt `meta` (claim). Shard k is written by rank k % world_size,
    shards on disk are kept (a rerun goes on), frames read and encoded `chunk` at a time, broken videos skipped
    (README, Table D)."""
    os.makedirs(folder, exist_ok=True)
    T.save_checkpoint(meta, os.path.join(folder, "meta.pt"), rank == 0)
    for k in tqdm(range(rank * shard, len(source), world_size * shard), "export", unit="shard", disable=rank != 0):
        path, out = os.path.join(folder, f"shard_{k // shard:05d}.pt"), dict(video=[], tokens=[], times=[])
        if os.path.exists(path):
            continue
        for i in range(k, min(k + shard, len(source))):
            times, tokens, prev = source.frame_times(i), [], vfm.black(size, device)  # (1, N, C) before frame 0
            for t in range(0, len(times), chunk):
                try:
                    x = torch.from_numpy(source.read(i, range(t, min(t + chunk, len(times))))).permute(0, 3, 1, 2)
                except Exception as e:
                    data._warn_broken(source, i, e)
                    break
                with T.autocast(device, dtype):
                    feats = vfm(F.interpolate(x, size, mode="bilinear", antialias=True).to(device))  # (t, N, C)
                    tokens.append(tok.tokenize(feats[None], prev)[0].float().cpu())              # (t, C)
                prev = feats[-1:]
            else:  # every frame read
                out["video"].append(i), out["times"].append(torch.tensor(times))
                out["tokens"].append(torch.cat(tokens))
        T.save_checkpoint(out, path)
    if rank == 0:
        print(f"wrote the delta tokens of the {len(source)} videos of --data to {folder}: shard_*.pt ({shard:,} videos "
              "a file" + ", this rank's share" * (world_size > 1) + "), meta.pt")


# ----------------------------------------------------------------------------------------------------------------
# Training

def heldout_check(args, vfm, device, name, num_samples, metrics=(("", "smooth L1", frame_loss),), batch_size=16):
    """The held-out check of both world models, the mid-horizon protocol (SPEC section 5) on --val-clips clips of 4
    context + 3 target frames. Returns check(model, step), which logs {"h{h}/{best|mean|copy_last}{key}": mean over
    the clips} at horizons h = 1, 3: the best and the mean of `num_samples` rollouts (1: a deterministic model, said
    as such), and copy-last, for each (key, label, metric) of `metrics`, metric(pred, target) (..., N, C) -> (...)."""
    val = data.ClipDataset(data.open_source(args.val_data or args.data, "val", args.fps, args.seed, args),
                           num_frames=7, size=args.size, stride=tuple(args.stride), seed=args.seed + 1)
    clips, times, _ = zip(*(val.sample(0, j) for j in range(args.val_clips)))
    clips, times = torch.stack(clips), torch.stack(times)                                 # (V, 7, 3, H, W), (V, 7)
    labels = " / ".join(label for _, label, _ in metrics)

    @torch.no_grad()
    def check(model, step):
        model.eval()
        g, sums = torch.Generator(device).manual_seed(args.seed), {}
        for i in range(0, len(clips), batch_size):
            with T.autocast(device, args.dtype):
                feats = vfm(clips[i:i + batch_size].to(device)).float()                  # (B, 7, N, C)
                pred = model.sample(feats[:, :4], times[i:i + batch_size], num_samples, 3, g)[0]  # (B, S, 3, N, C)
            for h in (1, 3):
                samples, target = pred[:, :, h - 1].float(), feats[:, 3 + h]             # (B, S, N, C), (B, N, C)
                for key, _, fn in metrics:
                    for pick, v in (("best", fn(samples, target[:, None]).min(1).values),
                                    ("mean", fn(samples.mean(1), target)), ("copy_last", fn(feats[:, 3], target))):
                        sums[k] = sums.get(k := f"h{h}/{pick}{key}", 0.0) + v.sum().item()
        model.train()
        result = {k: v / len(clips) for k, v in sums.items()}
        T.log_jsonl(args.out, dict(step=step, eval=result))
        data.draw_curves(args.out, name, r"eval/(h\d/\w+)", "held-out loss (best, mean of K), h1, h3 ahead")
        value = lambda h, pick: " / ".join(f"{result[f'h{h}/{pick}{key}']:.4f}" for key, _, _ in metrics)
        model_says = lambda h: (f"best-of-{num_samples} {value(h, 'best')}   mean-of-{num_samples} "
                                f"{value(h, 'mean')}" if num_samples > 1 else f"{name} {value(h, 'best')}")
        tqdm.write(f"step {step} prediction check on held-out clips, context 4 (feature {labels}):" + "".join(
            f"\n  horizon {h}: {model_says(h)}   copy-last {value(h, 'copy_last')}" for h in (1, 3)))
    return check


def bench_training(args, world, opt, inputs, K, C, device, reference, chunk=256):
    """--bench of both world models: time training steps on random clips of frames 0.2 s apart; inputs(frames
    (b, T, 3, H, W) uint8) -> what `world` reads, tokens (b, T, C) or patch features (b, T, N, C)."""
    B, n = args.batch_size, args.num_frames
    frames = torch.randint(0, 256, (B, n, 3, *args.size), dtype=torch.uint8, device=device)
    times = (torch.arange(n, device=device) * 0.2).expand(B, n)                           # (B, T) seconds

    def step(update=True, b=B):
        noise = clip_noise(args.seed, 0, range(b), K, n - 1, C, device)
        with T.autocast(device, args.dtype):
            loss, _ = world_loss(world, world, inputs(frames[:b]), times[:b], noise, chunk)
        loss.backward()
        if update:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return data.run_bench(step, lambda: step(False, 1), B, args.bench, device, reference)


def main(args):
    rank, world_size, device = T.setup_dist()
    master = rank == 0
    # what the user gave is checked on every rank before anything is built (flag ranges: get_parser)
    if not (args.tokenizer or args.bench):  # timing needs no trained weights
        raise data.UserError("--tokenizer is required: a tokenizer.py checkpoint or the released DeltaTok weights")
    accum = 1 if args.bench else data.accumulation(args.global_batch, args.batch_size, world_size)
    cache = ("--cache-tokens", args.cache_tokens)  # read, or made (a folder of its own: not --out)
    ckpt = T.check_run(args, "deltaworld", [("--tokenizer", args.tokenizer), ("--data", args.data),
                       ("--val-data", args.val_data), ("--init", args.init), cache],
                       [cache, ("--export-tokens", args.export_tokens)])
    init = T.load_checkpoint(args.init, ("deltaworld",), "--init") if args.init else None
    tok, vfm_name = T.load_deltatok(args.tokenizer, device) if args.tokenizer else (None, T.DINOV3_B16)
    vfm = T.VFM(args.vfm or vfm_name).to(device)
    if tok is None:  # --bench without one: a random tokenizer
        tok = T.build_deltatok(args.model, vfm, args.bench_mode).to(device).eval().requires_grad_(False)
    if (tok.cfg.dim, tok.cfg.patch_size) != (vfm.dim, vfm.patch_size):
        raise data.UserError(f"the tokenizer (dim {tok.cfg.dim}, patch {tok.cfg.patch_size}) does not fit the VFM "
                             f"{vfm.name} (dim {vfm.dim}, patch {vfm.patch_size}): check --vfm")
    sha1 = file_sha1(args.tokenizer) if args.tokenizer else None  # a retrained tokenizer at the same path: other tokens
    if ckpt and ckpt.get("tokenizer_sha1", sha1) != sha1:
        raise data.UserError(f"--resume: {args.out} was trained with another --tokenizer than {args.tokenizer} (its "
                             "sha1 differs)")
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    world = DeltaWorld(tok, vfm, args.model, bom=not args.no_bom).to(device)
    if init:  # weights only (the released layout or a predictor.py checkpoint): optimizer and step start afresh
        T.load_state_strict(world, init, f"--init {args.init}", "check --model / --no-bom")
    made = dict(tokenizer_sha1=sha1, vfm=vfm.name, size=args.size, fps=args.fps,  # what makes the tokens (claim)
                data=os.path.realpath(args.data) if os.path.exists(args.data) else args.data)
    if args.export_tokens:
        claim(args.export_tokens, meta := dict(made, kind="token_export"), "--export-tokens")
    elif args.cache_tokens and not args.bench:  # (made after the run folder is locked)
        new = claim(args.cache_tokens, meta := dict(made, kind="token_cache", stride=args.stride, seed=args.seed,
                                                    num_frames=args.num_frames, global_batch=args.global_batch,
                                                    crops=args.cache_crops), "--cache-tokens")
    train = data.ClipDataset(data.open_source(args.data, "train", args.fps, args.seed, args),  # (its index: written)
                             num_frames=args.num_frames, size=args.size, stride=tuple(args.stride), seed=args.seed)
    if args.export_tokens:  # for another world model, instead of training (README, Table D)
        return export_tokens(tok, vfm, train.source, args.export_tokens, dict(meta, videos=len(train.source)),
                             args.size, device, args.dtype, rank, world_size)
    opt = T.make_optimizer(world, args.lr, args.weight_decay, device)
    black = world.black(math.prod(args.size) // vfm.patch_size ** 2, device)
    K, L, C = 0 if args.no_bom else args.bom, args.num_frames - 1, tok.cfg.dim  # BoM noise (B, K, L, C)
    if args.compile:
        T.compile_blocks(vfm, tok, world)

    def encode(frames):  # (B, T, 3, H, W) uint8 -> tokens (B, T, C) through the frozen VFM and DeltaTok encoder
        with torch.no_grad(), T.autocast(device, args.dtype):
            return tok.tokenize(vfm(frames.to(device, non_blocking=True)), black).float()

    if args.bench and args.bench_mode == "sample":  # eval's mid horizon: 4 context frames, 20 samples x 3 steps
        B = args.batch_size
        frames = torch.randint(0, 256, (B, 4, 3, *args.size), dtype=torch.uint8, device=device)
        times = (torch.arange(7, device=device) * 0.2).expand(B, 7)

        def sample(b=B):
            with torch.no_grad(), T.autocast(device, args.dtype):
                world.sample(vfm(frames[:b]), times[:b], 20, 3)
        return data.run_bench(sample, lambda: sample(1), B, args.bench, device, "the target: at most 50 ms per "
                               "sequence at 512 px, DeltaTok decoding included")
    if args.bench:
        cached = torch.randn(args.batch_size, args.num_frames, C, device=device)  # --cache-tokens: no VFM, no encoder
        inputs = (lambda frames: cached[:len(frames)]) if args.cache_tokens else encode
        return bench_training(args, world, opt, inputs, K, C, device, "authors' code, H200, bf16 + compile, batch 32 x "
                              "8 frames, K=256: 256 px 142 ms, 3.8 GiB; 512 px 585 ms, 9.2 GiB; DINO-world 256 px: "
                              "166 ms, 24.2 GiB (SPEC section 6)", args.bom_chunk)
    if args.cache_tokens:
        meta["num_clips"] = math.ceil(args.cache_crops * len(train.source))
    check = heldout_check(args, vfm, device, "DeltaWorld", 1 if args.no_bom else args.val_samples) if master else None

    ckpt_path = os.path.join(args.out, "ckpt.pt")
    # the tokenizer the checkpoint records: a file by its absolute path, a hub id as it is
    tokenizer = os.path.abspath(args.tokenizer) if os.path.exists(args.tokenizer) else args.tokenizer
    step, skipped = map(T.resume(args, world, opt, master, ckpt).get, ("step", "skipped"))
    model = T.ddp(world, world_size, device)
    if args.cache_tokens:
        start = time.perf_counter()
        build_token_cache(args.cache_tokens, meta, train, encode, rank, world_size, args.batch_size, args.num_workers)
        if new:  # make bench-gpu's row
            data.bench_record(clips_per_s=meta["num_clips"] / (time.perf_counter() - start))
        cache = TokenCache(args.cache_tokens, meta)
        loader = data.make_loader(cache, args.batch_size, rank, world_size, accum, step, num_workers=0)  # memory-mapped
        skipped = cache.skipped
    else:
        loader = data.make_loader(train, args.batch_size, rank, world_size, accum, step, args.num_workers)

    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True)
    while step < args.steps:
        lr = T.lr_at(step, args.lr, args.warmup)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = next(loader)
            first = (micro * world_size + rank) * args.batch_size  # global index of this micro-batch's first clip
            skipped += batch["skipped"]
            tokens = batch["frames"].to(device) if args.cache_tokens else encode(batch["frames"])  # (B, T, C)
            times = batch["times"].to(device, non_blocking=True)                          # (B, T)
            noise = clip_noise(args.seed, step, range(first, first + args.batch_size), K, L, C, device)
            with model.no_sync() if world_size > 1 and micro < accum - 1 else contextlib.nullcontext():
                with T.autocast(device, args.dtype):
                    loss, _ = world_loss(world, model, tokens, times, noise, args.bom_chunk)
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        grad_norm = T.optimizer_step(world, opt, lr, loss_sum, step, ckpt_path, master, world_size)  # not clipped
        step += 1
        T.log_step(bar, args, step, loss_sum, lr, grad_norm, skipped)
        if master and (step % args.eval_every == 0 or step == args.steps):
            check(world, step)
        if T.stop_requested(world_size) or step % args.ckpt_every == 0 or step == args.steps:
            T.save_checkpoint(dict(kind="deltaworld", config=world.config, tokenizer=tokenizer, tokenizer_sha1=sha1,
                                   tokenizer_config=asdict(tok.cfg), vfm=vfm.name, size=args.size,
                                   model=world.state_dict(), optimizer=opt.state_dict(), step=step, skipped=skipped,
                                   args=vars(args)), ckpt_path, master)
    T.cleanup_dist(world_size, bar, f"done: {step} steps, {skipped} broken videos skipped, checkpoint {ckpt_path}")


def get_parser():
    p = argparse.ArgumentParser(description="Train DeltaWorld (appendix A recipe as defaults).",
                                formatter_class=data.HelpFormatter)
    p.add_argument("--tokenizer", default="", help="tokenizer.py checkpoint (delta or frame mode) or released DeltaTok")
    p.add_argument("--out", default="runs/deltaworld", help="run folder: ckpt.pt, log.jsonl")
    p.add_argument("--vfm", default="", help="DINOv3 hub id or local folder (default: the one the tokenizer "
                   f"records; in --bench without --tokenizer {T.DINOV3_B16}); random presets {list(T.VFM_PRESETS)}")
    p.add_argument("--no-bom", action="store_true", help="discriminative: a learned query, no best-of-many (Table C)")
    p.add_argument("--bom", type=data.at_least(1), default=256, help="best-of-many candidates K per clip and position")
    p.add_argument("--bom-chunk", type=data.at_least(1), default=256, help="candidates per forward; lower saves memory")
    p.add_argument("--init", default="", help="start from these weights (released/predictor.py): new optimizer, step 0")
    p.add_argument("--cache-tokens", default="", help="train from the clips' tokens, encoded once into this folder")
    p.add_argument("--cache-crops", type=data.positive, default=4, help="cached clips (augmented crops) per video")
    p.add_argument("--export-tokens", default="", metavar="DIR", help="write the tokenizer's delta tokens of every "
                   "frame of every --data video, resized whole to --size, to DIR/shard_*.pt and exit")
    p.add_argument("--bench-mode", default="delta", choices=["delta", "frame", "sample"], help="delta / frame: "
                   "--bench's random tokenizer (Table 2); sample: time 20 samples x 3 steps from 4 context frames")
    return world_flags(p)


def world_flags(p):
    """The flags DeltaWorld and DINO-world share: the same recipe (appendix A), clips and run."""
    p.add_argument("--model", default="base", choices=list(PREDICTOR_PRESETS), help="predictor size")
    p.add_argument("--num-frames", type=data.at_least(2), default=8, help="frames per training clip")
    p.add_argument("--steps", type=data.at_least(1), default=300_000)
    p.add_argument("--global-batch", type=data.at_least(1), default=1024, help="clips per optimizer step, all GPUs")
    p.add_argument("--batch-size", type=data.at_least(1), default=32, help="clips per GPU per micro-step")
    p.add_argument("--lr", type=data.positive, default=1e-4)
    p.add_argument("--warmup", type=data.at_least(0), default=5_000)
    p.add_argument("--weight-decay", type=float, default=0.4)
    p.add_argument("--compile", action="store_true", help="torch.compile each model block (regional compilation)")
    p.add_argument("--val-clips", type=data.at_least(1), default=64)
    p.add_argument("--val-samples", type=data.at_least(1), default=8, help="samples per held-out clip (SPEC section 5)")
    p.add_argument("--bench", type=data.at_least(0), default=0, help="time N training steps on random frames and exit")
    data.clip_flags(p)
    data.run_flags(p, workers=8, eval_every=1000)
    return p


if __name__ == "__main__":
    data.cli(main, get_parser())
