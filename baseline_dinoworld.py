"""
DINO-world, the paper's re-implementation of the baseline (SPEC section 4, appendix A): predictor.py's predictor
over the VFM's patch tokens instead of delta tokens. Every patch of every next frame is a query that reads the patch
tokens of all earlier frames (block-causal mask, 3D RoPE over timestamp, x, y); all 7 next frames of an 8-frame clip
are predicted in parallel, the VFM features themselves the targets. Default: discriminative (one learned query);
--bom K: generative, best-of-many over K noise queries per frame (Table 2, step 1: K = 16).

Run it:
  # CPU, a couple of minutes: a tiny DINO-world on the built-in synthetic videos
  python baseline_dinoworld.py --vfm tiny --model tiny --size 64 --global-batch 32 --batch-size 32 --steps 300 \
      --warmup 30 --out runs/dinoworld_tiny
  # one GPU, the paper's recipe on your videos (global batch 1024 by gradient accumulation); + BoM 16: --bom 16
  python baseline_dinoworld.py --data /path/to/videos --compile --out runs/dinoworld
  # 8 GPUs on one node
  torchrun --standalone --nproc_per_node=8 baseline_dinoworld.py --data /path/to/videos --compile --out runs/dinoworld
  # one training step's speed and memory, the Table 2 / C reference (SPEC section 6); DINO-world + BoM: --bom 16
  python baseline_dinoworld.py --bench 20 --size 256 --batch-size 32 --compile
"""
import argparse
import contextlib
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import data
import tokenizer as T
from predictor import (HEAD_DIM, NOISE_STD, PREDICTOR_PRESETS, Predictor, bench_training, clip_noise, frame_loss,
                       heldout_check, world_flags, world_loss)

# ----------------------------------------------------------------------------------------------------------------
# The model (SPEC section 4)


@dataclass
class DinoWorldConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    axes: tuple = (20, 20, 20)  # RoPE slices of each head for (timestamp, x, y); the last 4 of 64 unrotated
    bom: int = 0                # K noise candidates per frame; 0: discriminative, one learned query
    aspect: float = 1.0         # width / height of the patch grid (of the training frames)


def patch_positions(times, n, aspect=1.0):
    """3D RoPE positions (timestamp, x, y) of the n patches of frames at `times` (B, T) -> (B, T * n, 3); x and y
    evenly spaced over [-1, 1] across the patch grid (tokenizer.patch_grid), row-major like the VFM's tokens."""
    h, w = T.patch_grid(n, aspect)
    y, x = torch.meshgrid(*(torch.linspace(-1, 1, s, device=times.device) for s in (h, w)), indexing="ij")
    xy = torch.stack([x.flatten(), y.flatten()], -1)  # (n, 2)
    B, L = times.shape
    return torch.cat([times[:, :, None, None].float().expand(B, L, n, 1), xy.expand(B, L, n, 2)], -1).flatten(1, 2)


class DinoWorld(nn.Module):
    """The predictor over patch tokens. The frozen VFM, if given, is kept aside (not a submodule: not trained, not
    in the state dict), for callers that start from frames, as with DeltaWorld."""

    def __init__(self, cfg: DinoWorldConfig, vfm=None):
        super().__init__()
        self.cfg = cfg
        object.__setattr__(self, "vfm", vfm)
        self.predictor = Predictor(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.axes)
        if not cfg.bom:  # the same learned query at every patch position: RoPE tells them apart
            self.q_embed = T.init_weights(nn.Embedding(1, cfg.dim))

    def predict(self, context, ctx_times, queries, q_times, frame_mask=None):
        """context (B, Tc, N, C) patch tokens at ctx_times (B, Tc); queries (B, Tq, C), one per target frame at
        q_times (B, Tq), shared by its N patch queries; frame_mask (Tq, Tc) bool, which context frames each target
        frame may read (None: all). -> (B, Tq, N, C)."""
        B, Tc, N, C = context.shape
        q = queries[:, :, None].expand(-1, -1, N, -1).flatten(1, 2)  # (B, Tq * N, C)
        mask = None if frame_mask is None else frame_mask.repeat_interleave(N, 0).repeat_interleave(N, 1)[None]
        return self.predictor(q, context.reshape(B, Tc * N, C), patch_positions(q_times, N, self.cfg.aspect),
                              patch_positions(ctx_times, N, self.cfg.aspect), mask).view(B, -1, N, C)

    def forward(self, feats, times, noise=None):
        """Teacher-forced prediction of frames 1..T-1 of clips feats (B, T, N, C) at times (B, T), in parallel under
        the block-causal mask (frame t reads frames < t). Queries: the learned one (K = 1), or noise (B, K, T-1, C),
        K candidates per frame, run as one batch of K (T-1) N queries (queries never attend to each other).
        -> (B, K, T-1, N, C)."""
        B, T, N, C = feats.shape
        if noise is None:
            noise = self.q_embed.weight.to(feats.dtype).expand(B, 1, T - 1, C)
        K = noise.shape[1]
        frame_mask = torch.ones(T - 1, T - 1, dtype=torch.bool, device=feats.device).tril().repeat(K, 1)
        return self.predict(feats[:, :-1], times[:, :-1], noise.reshape(B, K * (T - 1), C),
                            times[:, 1:].repeat(1, K), frame_mask).view(B, K, T - 1, N, C)

    @torch.no_grad()
    def sample(self, feats, times, num_samples, horizon, generator=None):
        """Rollout from context features feats (B, Tc, N, C); times (B, Tc + horizon) of context and targets. Each
        step predicts one frame from all earlier ones and appends it to the context. -> (predicted features
        (B, num_samples, horizon, N, C), None: no tokens). The learned query runs once: every sample is the same."""
        B, Tc, N, C = feats.shape
        S = num_samples if self.cfg.bom else 1
        context = feats[:, None].expand(B, S, Tc, N, C).flatten(0, 1)  # (B S, Tc, N, C)
        times = times.to(feats.device)[:, None].expand(B, S, -1).flatten(0, 1)
        for h in range(horizon):  # BoM: a fresh noise query per sample and step, shared by the frame's patches
            q = (NOISE_STD * torch.randn(B * S, 1, C, generator=generator, device=(generator or feats).device)
                 if self.cfg.bom else self.q_embed.weight.expand(B * S, 1, C)).to(feats.device, context.dtype)
            pred = self.predict(context, times[:, :Tc + h], q, times[:, Tc + h:Tc + h + 1])
            context = torch.cat([context, pred.to(context.dtype)], 1)
        return context[:, Tc:].view(B, S, horizon, N, C).expand(B, num_samples, horizon, N, C), None


def build_dinoworld(model, vfm, bom=0, size=(1, 1)):
    """A DINO-world as wide as the VFM. RoPE: three equal even slices of each head for (timestamp, x, y) and the
    rest unrotated, 20 + 20 + 20 + 4 at head dim 64 (appendix A)."""
    heads = max(1, vfm.dim // HEAD_DIM)
    a = (vfm.dim // heads - 4) // 6 * 2
    return DinoWorld(DinoWorldConfig(dim=vfm.dim, heads=heads, axes=(a, a, a), bom=bom, aspect=size[1] / size[0],
                                     **PREDICTOR_PRESETS[model]), vfm)


def load_dinoworld(path, device="cpu", vfm=None, flag="--ckpt"):
    """A trained DINO-world in eval mode, with its VFM (`vfm` to share, else built from the recorded name) as `.vfm`."""
    ckpt = T.load_checkpoint(path, ("dinoworld",), flag)
    model = DinoWorld(DinoWorldConfig(**ckpt["config"]), vfm if vfm is not None else T.VFM(ckpt["vfm"]).to(device))
    T.load_state_strict(model, ckpt, f"DINO-world checkpoint {path}")
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Training

def main(args):
    rank, world, device = T.setup_dist()
    master = rank == 0
    # what the user gave is checked on every rank before anything is built (flag ranges: get_parser)
    accum = 1 if args.bench else data.accumulation(args.global_batch, args.batch_size, world)
    ckpt = T.check_run(args, "dinoworld", [("--data", args.data), ("--val-data", args.val_data), ("--init", args.init),
                                           ("--pca", args.pca)])
    init = T.load_checkpoint(args.init, ("dinoworld",), "--init") if args.init else None
    vfm = T.VFM(T.feature_source(args.vfm, args.vfm_layers, args.pca)).to(device)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    dw = build_dinoworld(args.model, vfm, args.bom, args.size).to(device)
    C, L = vfm.dim, args.num_frames - 1
    if init:  # weights only: optimizer and step start afresh
        T.load_state_strict(dw, init, f"--init {args.init}", "check --model / --vfm / --bom")
    train = data.ClipDataset(data.open_source(args.data, "train", args.fps, args.seed, args),  # (its index: written)
                             num_frames=args.num_frames, size=args.size, stride=tuple(args.stride), seed=args.seed)
    opt = T.make_optimizer(dw, args.lr, args.weight_decay, device)
    if args.compile:
        T.compile_blocks(vfm, dw)

    if args.bench:
        return bench_training(args, dw, opt, vfm, args.bom, C, device, "authors' code, H200, bf16 + compile: "
                              "DINO-world 256 px batch 32 x 8: 166 ms, 24.2 GiB (SPEC section 6); Table 2: + BoM 16 "
                              "needs about the same memory")

    if master:  # the held-out check in feature smooth L1 and MSE
        check = heldout_check(args, vfm, device, "DINO-world", args.val_samples if args.bom else 1, (
            ("", "smooth L1", frame_loss), ("/mse", "MSE", lambda p, y: (p - y).pow(2).mean((-2, -1)))))
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step, skipped = map(T.resume(args, dw, opt, master, ckpt).get, ("step", "skipped"))
    model = T.ddp(dw, world, device)
    loader = data.make_loader(train, args.batch_size, rank, world, accum, step, args.num_workers)

    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True)
    while step < args.steps:
        lr = T.lr_at(step, args.lr, args.warmup)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = next(loader)
            skipped += batch["skipped"]
            first = (micro * world + rank) * args.batch_size  # global index of this micro-batch's first clip
            noise = clip_noise(args.seed, step, range(first, first + args.batch_size), args.bom, L, C, device)
            with model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext():
                with T.autocast(device, args.dtype):
                    feats = vfm(batch["frames"].to(device, non_blocking=True))  # (B, T, N, C)
                    loss, _ = world_loss(dw, model, feats, batch["times"].to(device, non_blocking=True), noise)
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        grad_norm = T.optimizer_step(dw, opt, lr, loss_sum, step, ckpt_path, master, world)  # not clipped
        step += 1
        T.log_step(bar, args, step, loss_sum, lr, grad_norm, skipped)
        if master and (step % args.eval_every == 0 or step == args.steps):
            check(dw, step)
        if T.stop_requested(world) or step % args.ckpt_every == 0 or step == args.steps:
            T.save_checkpoint(dict(kind="dinoworld", config=asdict(dw.cfg), vfm=vfm.name, size=args.size,
                                   model=dw.state_dict(), optimizer=opt.state_dict(), step=step, skipped=skipped,
                                   args=vars(args)), ckpt_path, master)
    T.cleanup_dist(world, bar, f"done: {step} steps, {skipped} broken videos skipped, checkpoint {ckpt_path}")


def get_parser():
    p = argparse.ArgumentParser(description="Train the DINO-world baseline (appendix A recipe as defaults).",
                                formatter_class=data.HelpFormatter)
    p.add_argument("--out", default="runs/dinoworld", help="run folder: ckpt.pt, log.jsonl")
    data.vfm_flags(p, T.DINOV3_B16, T.VFM_PRESETS)
    p.add_argument("--bom", type=data.at_least(0), default=0, help="best-of-many over K noise queries per frame "
                   "(generative variant; Table 2 step 1: 16); 0: discriminative, one learned query")
    p.add_argument("--init", default="", help="start from the weights of a checkpoint of this script, with a fresh "
                   "optimizer and step")
    return world_flags(p)


if __name__ == "__main__":
    data.cli(main, get_parser())
