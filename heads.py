"""
Task heads on frozen VFM features, and how their outputs are scored (SPEC section 5, appendix A and B).

SegHead: BatchNorm2d -> 1x1 conv to the classes. DepthHead: BatchNorm2d -> 1x1 conv to 256 logits -> ReLU + 0.1
-> normalised over the bins -> expected depth over 256 bins evenly spaced in [1e-3, 80] m (DINOv3's depth head).
Both read features laid out as (B, C, h, w) and give a map at patch resolution that is upsampled bilinearly to the
labels. The two-crop protocol (resize the shorter side to S, longer capped at 2S; two S x S crops; labels split
into two halves at the midpoint, each half scored from its own crop) and the dataset-wide metrics live here too:
eval.py and the head training below both use them.

Training (our recipe; the paper gives none): frozen VFM features of random S x S crops of a dataset's labelled
train frames, labels sampled at the crop's pixels; segmentation: cross-entropy ignoring 255; depth:
scale-invariant log loss (SILog, lambda 0.85, x10 as in BTS / AdaBins) on valid pixels; AdamW with linear warm-up
and cosine decay to 0 (as linear probes usually are: with a constant rate the final head is as noisy as the last
steps, e.g. 58 or 70 present mIoU on the synthetic videos depending on where a short run stops).

Run it:
  # CPU, a minute: heads on the tiny random VFM and the synthetic videos
  python heads.py --task seg --vfm tiny --size 64 --steps 300 --batch-size 16 --out runs/seg_tiny
  python heads.py --task depth --vfm tiny --size 64 --steps 300 --batch-size 16 --out runs/depth_tiny
  # one GPU, on a real train split (VSPW and Cityscapes: seg; KITTI: depth, with a train list file)
  python heads.py --task seg --data vspw:/data/VSPW --size 512 --out runs/seg_vspw
  python heads.py --task depth --data kitti:/data/kitti --kitti-split eigen_train_files.txt --out runs/depth_kitti
  # 8 GPUs
  torchrun --standalone --nproc_per_node=8 heads.py --task seg --data cityscapes:/data/cityscapes --out runs/seg_cs
"""
import argparse
import itertools
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import tokenizer as T

# ----------------------------------------------------------------------------------------------------------------
# The heads (appendix A; keys as the released checkpoints: bn.*, head.*)

DEPTH_BINS = 256


class SegHead(nn.Module):
    task = "seg"

    def __init__(self, dim, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.head = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x):
        return self.head(self.bn(x))  # (B, classes, h, w) logits


class DepthHead(nn.Module):
    task = "depth"

    def __init__(self, dim, bins=DEPTH_BINS, min_depth=data.DEPTH_RANGE[0], max_depth=data.DEPTH_RANGE[1]):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.head = nn.Conv2d(dim, bins, 1)
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins), persistent=False)

    def forward(self, x):
        p = F.relu(self.head(self.bn(x))) + 0.1       # rectified and shifted by 0.1 (appendix A)
        p = p / p.sum(1, keepdim=True)                # a distribution over the bins
        return torch.einsum("bkhw,k->bhw", p, self.centres)[:, None]  # (B, 1, h, w) expected depth in metres


def to_map(feats):
    """Patch tokens (..., N, C) of a square grid -> (B, C, h, w) for the heads."""
    *lead, n, c = feats.shape
    side = math.isqrt(n)
    return feats.reshape(-1, side, side, c).permute(0, 3, 1, 2).float()


def load_head(path, task=None, device="cpu"):
    """A head from a heads.py checkpoint or a released pytorch_model.bin (bare state dict or {"state_dict"}).
    Released files carry no task: `task` says it, else 256 outputs mean the depth head. Returns (head, vfm name or
    None for released heads, whose VFM is DINOv3 ViT-B/16)."""
    ckpt = T.load_checkpoint(path)
    if "kind" in ckpt:
        task, state, vfm = {"seghead": "seg", "depthhead": "depth"}[ckpt["kind"]], ckpt["model"], ckpt["vfm"]
    else:
        state, vfm = ckpt.get("state_dict", ckpt), None
    if "head.weight" not in state:
        raise RuntimeError(f"{path} is not a task head: no head.weight among its keys {sorted(state)[:8]}")
    out, dim = state["head.weight"].shape[:2]
    task = task or ("depth" if out == DEPTH_BINS else "seg")
    head = DepthHead(dim, out) if task == "depth" else SegHead(dim, out)
    T.load_state_strict(head, state, f"{task} head {path}")
    return head.to(device).eval().requires_grad_(False), vfm


# ----------------------------------------------------------------------------------------------------------------
# RGB view: the released Amazon-FAR/rgb-head-imagenet (SPEC section 7), for pictures only

def sincos_table(grid, width):
    """MAE's 2D sin-cos position table (grid*grid, width): sin, cos of the row, then of the column, at width/4 rates."""
    omega = 1 / 10000 ** (torch.arange(width // 4) / (width // 4))
    rc = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).view(-1, 2, 1)
    angles = rc * omega                                                        # (g*g, 2, width/4)
    return torch.cat([angles.sin(), angles.cos()], -1).view(grid * grid, width)


class RGBBlock(nn.Module):
    """Pre-LayerNorm ViT block (eps 1e-12, heads of 72, exact GELU) with the released names."""

    def __init__(self, width, mlp):
        super().__init__()
        self.heads = width // 72
        self.attention = nn.Module()
        self.attention.attention = nn.ModuleDict({k: nn.Linear(width, width) for k in ("query", "key", "value")})
        self.attention.output = nn.ModuleDict({"dense": nn.Linear(width, width)})
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(width, 1e-12), nn.LayerNorm(width, 1e-12)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(width, mlp)})
        self.output = nn.ModuleDict({"dense": nn.Linear(mlp, width)})

    def forward(self, x):
        B, L, D = x.shape
        h = self.layernorm_before(x)
        q, k, v = (self.attention.attention[n](h).view(B, L, self.heads, -1).transpose(1, 2)
                   for n in ("query", "key", "value"))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)  # scale 1 / sqrt(72)
        x = x + self.attention.output["dense"](a)
        return x + self.output["dense"](F.gelu(self.intermediate["dense"](self.layernorm_after(x))))


class RGBHead(nn.Module):
    """VFM patch features (B, C, h, w), after DINOv3's final LayerNorm `norm` -> RGB (B, 3, 16h, 16w) in about
    [0, 1]. Defaults: the released size (28 blocks of width 1152, 16 heads, MLP 4096, a 32 x 32 position grid)."""
    task = "rgb"

    def __init__(self, norm, width=1152, depth=28, mlp=4096, grid=32, patch=16):
        super().__init__()
        self.patch = patch
        self.register_buffer("norm_weight", norm.weight.detach().clone(), persistent=False)
        self.register_buffer("norm_bias", norm.bias.detach().clone(), persistent=False)
        self.decoder_embed = nn.Linear(len(norm.weight), width)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("decoder_pos_embed", F.pad(sincos_table(grid, width), (0, 0, 1, 0))[None])  # cls: 0
        self.decoder_layers = nn.ModuleList([RGBBlock(width, mlp) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(width, 1e-12)
        self.decoder_pred = nn.Linear(width, patch * patch * 3)

    def forward(self, feats):
        B, C, h, w = feats.shape
        x = feats.flatten(2).transpose(1, 2).to(self.decoder_embed.weight.dtype)   # (B, h*w, C)
        x = self.decoder_embed((x - self.norm_bias) / self.norm_weight)            # the VFM's norm affine undone
        cls, pos = self.decoder_pos_embed[:, :1], self.decoder_pos_embed[:, 1:]
        g = math.isqrt(pos.shape[1])  # interpolated to the h x w grid (at g x g: exactly the identity)
        pos = F.interpolate(pos.view(1, g, g, -1).permute(0, 3, 1, 2), (h, w), mode="bicubic").flatten(2).mT
        x = torch.cat([self.trainable_cls_token.expand(B, -1, -1), x], 1) + torch.cat([cls, pos], 1)
        for layer in self.decoder_layers:
            x = layer(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:].float()                 # (B, h*w, p*p*3)
        p = self.patch
        x = x.view(B, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, h * p, w * p)
        return x * x.new_tensor(T.IMAGENET_STD).view(3, 1, 1) + x.new_tensor(T.IMAGENET_MEAN).view(3, 1, 1)


def load_rgb_head(path, vfm, device="cpu"):
    """The RGB head from a file or hub id (sizes read off its tensors), strictly; bf16 on a GPU (416 M values)."""
    state = T.load_checkpoint(path)
    state = state.get("state_dict", state)
    if "decoder_embed.weight" not in state:
        raise data.UserError(f"{path} is not an RGB head: no decoder_embed.weight among its keys {sorted(state)[:8]}")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_layers."))
    head = RGBHead(vfm.model.norm, state["decoder_embed.weight"].shape[0], depth,
                   state["decoder_layers.0.intermediate.dense.weight"].shape[0],
                   math.isqrt(state["decoder_pos_embed"].shape[1] - 1))
    T.load_state_strict(head, state, f"RGB head {path}")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return head.to(device, dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# The two-crop protocol (SPEC section 5, appendix B)

def resized_size(h, w, size):
    """Shorter side -> size, longer side scaled alike but capped at 2 x size (KITTI: aspect clamped to 1:2)."""
    if h <= w:
        return size, min(round(w * size / h), 2 * size)
    return min(round(h * size / w), 2 * size), size


def resize_frames(frames, size):
    """uint8 (T, H, W, 3) -> uint8 (T, 3, Hr, Wr) with the shorter side at `size`: plain bilinear with half-pixel
    centres and NO antialiasing, as OpenCV's INTER_LINEAR in the release, which the released heads were trained on
    (an antialiased 0.5x downscale differs by about 5 grey levels on average; SPEC section 5)."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2)
    return F.interpolate(x, resized_size(*x.shape[-2:], size), mode="bilinear", align_corners=False,
                         antialias=False)  # uint8 in and out: fixed-point weights like OpenCV's, within 1 level


def two_crops(x, size):
    """(..., Hr, Wr) -> (2, ..., S, S): left and right crops (top and bottom for tall frames); they overlap when the
    longer side is under 2S, and are the same crop for square frames."""
    if x.shape[-1] >= x.shape[-2]:
        return torch.stack([x[..., :size], x[..., -size:]])
    return torch.stack([x[..., :size, :], x[..., -size:, :]])


def paste(maps, label_hw, resized_hw, size):
    """Head outputs of the two crops (2, K, h, w) -> (K, Hl, Wl) at the labels' resolution. Each crop's output is
    upsampled (bilinear) to the size its crop covers in label pixels, anchored at its side of the frame, and cut to
    its label half (split at the midpoint): every label pixel comes from exactly one crop."""
    if resized_hw[0] > resized_hw[1]:  # tall frames: the same protocol on the transposed frame
        return paste(maps.transpose(-1, -2), label_hw[::-1], resized_hw[::-1], size).transpose(-1, -2)
    hl, wl = label_hw
    # label columns one crop covers: >= wl / 2, as the longer side is <= 2S (rounding must not drop below it)
    cover = max(round(size * wl / resized_hw[1]), wl - wl // 2)
    up = F.interpolate(maps.float(), (hl, cover), mode="bilinear", align_corners=False)  # (2, K, Hl, cover)
    half = wl // 2
    return torch.cat([up[0, :, :, :half], up[1, :, :, cover - (wl - half):]], -1)


def label_at(label, resized_hw, top, left, size):
    """Nearest label value at each pixel of the S x S crop at (top, left) of the resized frame: (Hl, Wl) -> (S, S)."""
    hl, wl = label.shape[-2:]
    rows = ((top + torch.arange(size) + 0.5) * hl / resized_hw[0]).long().clamp(max=hl - 1)
    cols = ((left + torch.arange(size) + 0.5) * wl / resized_hw[1]).long().clamp(max=wl - 1)
    return label[..., rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------------------------------------------
# Dataset-wide metrics: sums that add across batches and ranks (SPEC section 5)

class Score:
    """Segmentation: one confusion matrix over the dataset -> mIoU (255 ignored; classes absent from both ground
    truth and prediction left out of the mean). Depth: sums over all valid pixels -> RMSE, AbsRel, delta < 1.25."""

    def __init__(self, task, num_classes=None):
        self.task, self.k = task, num_classes
        self.sums = torch.zeros((num_classes, num_classes) if task == "seg" else 4, dtype=torch.float64)

    def update(self, out, label):
        """out (K, Hl, Wl): pasted logits (seg) or depth (depth, K = 1); label: the item's label dict."""
        if self.task == "seg":
            gt = torch.as_tensor(label["classes"]).long().flatten()
            pred = out.argmax(0).flatten().cpu()
            keep = gt != data.IGNORE
            self.sums += torch.bincount(gt[keep] * self.k + pred[keep], minlength=self.k ** 2).view(self.k, self.k)
        else:
            valid = torch.as_tensor(label["valid"]).flatten()
            gt = torch.as_tensor(label["depth"]).double().flatten()[valid]
            pred = out[0].double().cpu().flatten()[valid]
            ratio = torch.maximum(pred / gt, gt / pred)
            self.sums += torch.stack([valid.sum().double(), ((pred - gt) ** 2).sum(), ((pred - gt).abs() / gt).sum(),
                                      (ratio < 1.25).sum().double()])

    def reduce(self):
        if dist.is_initialized():
            sums = self.sums.cuda() if dist.get_backend() == "nccl" else self.sums
            dist.all_reduce(sums)
            self.sums = sums.cpu()

    def result(self):
        if self.task == "seg":
            inter, gt, pred = self.sums.diag(), self.sums.sum(1), self.sums.sum(0)
            seen = gt + pred > 0
            return dict(miou=100 * (inter[seen] / (gt + pred - inter)[seen]).mean().item())
        n, sq, absrel, d1 = self.sums.tolist()
        return dict(rmse=math.sqrt(sq / n), absrel=absrel / n, delta1=100 * d1 / n)


@torch.no_grad()
def score_crops(head, feats, label, resized_hw, size, score):
    """Score one sequence: features of its two crops (2, N, C) through the head, pasted, into `score`."""
    out = paste(head(to_map(feats)), np.shape(label.get("classes", label.get("depth"))), resized_hw, size)
    score.update(out, label)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training data: random S x S crops of labelled frames, labels sampled at the crop's pixels

class SyntheticFrames:
    """Every frame of the synthetic train videos, with its labels."""

    def __init__(self, split="train", seed=0):
        self.source = data.SyntheticVideos(split, seed)
        self.num_classes, self.per_video = data.SyntheticVideos.NUM_CLASSES, len(self.source.frame_times(0))

    def __len__(self):
        return len(self.source) * self.per_video

    def labelled(self, i):
        v, k = divmod(i, self.per_video)
        classes, depth = self.source.labels(v, [k])
        return self.source.read(v, [k])[0], dict(classes=classes[0], depth=depth[0], valid=np.ones_like(depth[0], bool))


def open_train(spec, kitti_split=None, kitti_raw=None, seed=0):
    if spec == "synthetic":
        return SyntheticFrames("train", seed)
    return data.open_eval(spec, "train", kitti_split, kitti_raw, seed)


class _Batches(torch.utils.data.Dataset):
    """Item n: the batch of step n for this rank, a pure function of (seed, n, rank) (resumable, any workers)."""

    def __init__(self, source, task, size, batch_size, rank, seed):
        self.source, self.task, self.size, self.batch_size, self.rank, self.seed = \
            source, task, size, batch_size, rank, seed

    def __getitem__(self, n):
        frames, targets, valids = [], [], []
        for j in range(self.batch_size):
            rng = np.random.default_rng([self.seed, n, self.rank, j])
            frame, label = self.source.labelled(int(rng.integers(len(self.source))))
            x = resize_frames(frame[None], self.size)[0]  # (3, Hr, Wr)
            hr, wr = x.shape[-2:]
            top, left = int(rng.integers(hr - self.size + 1)), int(rng.integers(wr - self.size + 1))
            frames.append(x[:, top:top + self.size, left:left + self.size])
            if self.task == "seg":
                targets.append(label_at(torch.as_tensor(label["classes"]).long(), (hr, wr), top, left, self.size))
                valids.append(targets[-1] != data.IGNORE)
            else:
                targets.append(label_at(torch.as_tensor(label["depth"]), (hr, wr), top, left, self.size))
                valids.append(label_at(torch.as_tensor(label["valid"]), (hr, wr), top, left, self.size))
        return torch.stack(frames), torch.stack(targets), torch.stack(valids)


def silog_loss(pred, target, valid, lam=0.85):
    """Scale-invariant log loss over the valid pixels (Eigen et al.; x10 as BTS / AdaBins)."""
    d = torch.log(pred[valid].clamp(min=1e-3)) - torch.log(target[valid])
    return 10 * torch.sqrt((d ** 2).mean() - lam * d.mean() ** 2 + 1e-8)


def head_loss(head, feats, target, valid):
    out = F.interpolate(head(to_map(feats)), target.shape[-2:], mode="bilinear", align_corners=False)
    if head.task == "seg":
        return F.cross_entropy(out, target, ignore_index=data.IGNORE)
    return silog_loss(out[:, 0], target, valid)


@torch.no_grad()
def present_score(head, vfm, source, size, device, dtype, num):
    """Score of the head on the labelled frames of `num` held-out sequences, with the two-crop protocol."""
    score = Score(head.task, getattr(head.head, "out_channels", None))
    for i in range(min(num, len(source))):
        frame, label = source.labelled(i)
        x = resize_frames(frame[None], size)[0]
        with T.autocast(device, dtype):
            feats = vfm(two_crops(x, size).to(device))  # (2, N, C)
        score_crops(head, feats, label, x.shape[-2:], size, score)
    return score.result()


def main(args):
    rank, world, device = T.setup_dist()
    master = rank == 0
    vfm = T.VFM(args.vfm).to(device)
    train = open_train(args.data, args.kitti_split, args.kitti_raw, args.seed)
    num_classes = train.num_classes if args.task == "seg" else DEPTH_BINS
    torch.manual_seed(args.seed)
    head = (SegHead(vfm.dim, num_classes) if args.task == "seg" else DepthHead(vfm.dim)).to(device)
    opt = T.make_optimizer(head, args.lr, args.weight_decay, device)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step = T.resume(args.out, head, opt, args.resume, master)["step"]
    model = T.ddp(head, world, device)
    batches = _Batches(train, args.task, args.size, args.batch_size, rank, args.seed)
    loader = iter(torch.utils.data.DataLoader(batches, batch_size=None, sampler=itertools.count(step),
                                              num_workers=args.num_workers))
    val = data.SyntheticSequences("val", args.seed) if args.data == "synthetic" else \
        data.open_eval(args.data, "val", args.kitti_val_split, args.kitti_raw)

    def checkpoint():
        if master:
            T.save_checkpoint(dict(kind=f"{args.task}head", num_classes=num_classes, vfm=args.vfm, size=args.size,
                                   data=args.data, model=head.state_dict(), optimizer=opt.state_dict(), step=step,
                                   args=vars(args)), ckpt_path)

    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True)
    t0 = time.perf_counter()
    while step < args.steps:
        lr = T.lr_at(step, args.lr, args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine
        for group in opt.param_groups:
            group["lr"] = lr
        frames, target, valid = (t.to(device, non_blocking=True) for t in next(loader))
        with T.autocast(device, args.dtype):
            feats = vfm(frames)  # (B, N, C), frozen
        loss = head_loss(model, feats.float(), target, valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if master and (step % args.log_every == 0 or step == args.steps):
            rate = args.batch_size * world * args.log_every / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.4g}", lr=f"{lr:.2e}")
            T.log_jsonl(args.out, dict(step=step, loss=loss.item(), lr=lr, frames_per_s=rate))
            t0 = time.perf_counter()
        if master and (step % args.eval_every == 0 or step == args.steps):
            head.eval()
            result = present_score(head, vfm, val, args.size, device, args.dtype, args.val_sequences)
            head.train()
            T.log_jsonl(args.out, dict(step=step, val=result))
            tqdm.write(f"step {step} held-out labelled frames (two-crop protocol): {result}")
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint()
    bar.close()
    if master:
        print(f"done: {step} steps, checkpoint {ckpt_path}")
    T.cleanup_dist(world)


def get_parser():
    p = argparse.ArgumentParser(description="Train a segmentation or depth head on frozen VFM features.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=["seg", "depth"], help="segmentation or depth head")
    p.add_argument("--data", default="synthetic", help="'synthetic', 'vspw:ROOT', 'cityscapes:ROOT' or 'kitti:ROOT' "
                   "(its train split)")
    p.add_argument("--kitti-split", default="", help="KITTI list file of the training frames (Eigen split format)")
    p.add_argument("--kitti-val-split", default="", help="KITTI list for the held-out check (default: the Eigen "
                   "test list, splits/kitti_eigen_test.txt)")
    p.add_argument("--kitti-raw", default=None, help="root of the raw KITTI drives (default: the KITTI ROOT itself)")
    p.add_argument("--out", default="runs/head", help="run folder: ckpt.pt, log.jsonl")
    p.add_argument("--vfm", default=T.DINOV3_B16, help=f"DINOv3 hub id, local folder or random preset {list(T.VFM_PRESETS)}")
    p.add_argument("--size", type=int, default=512, help="crop side: the evaluation's S (512 main, 256 ablations)")
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=16, help="crops per GPU per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["bf16", "fp32"])
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--val-sequences", type=int, default=64, help="held-out labelled frames for the check")
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt if it exists")
    return p


if __name__ == "__main__":
    data.cli(main, get_parser())
