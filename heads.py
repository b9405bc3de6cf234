"""
Task heads on frozen VFM features, the labelled datasets they are trained and scored on (VSPW, Cityscapes, KITTI
and the synthetic videos, in their on-disk layouts), and how their outputs are scored: the two-crop protocol and
the dataset-wide metrics, used by eval.py and the head training below (SPEC section 5, appendix A and B).

Training (our recipe; the paper gives none): frozen VFM features of random --size crops of labelled train frames,
labels sampled at the crop's pixels, losses in head_loss; AdamW, linear warm-up, cosine decay to 0 (with a constant
rate the final head is as noisy as the last steps: 58 or 70 present mIoU on the synthetic videos by where it stops).

Run it:
  # CPU, a minute: heads on the tiny random VFM and the synthetic videos
  python heads.py --task seg --vfm tiny --size 64 --steps 300 --batch-size 16 --out runs/seg_tiny
  python heads.py --task depth --vfm tiny --size 64 --steps 300 --batch-size 16 --out runs/depth_tiny
  # one GPU, on a real train split (VSPW and Cityscapes: seg; KITTI: depth, with a train list file)
  python heads.py --task seg --data vspw:/data/VSPW --size 512 --out runs/seg_vspw
  python heads.py --task depth --data kitti:/data/kitti --kitti-split eigen_train_files.txt --out runs/depth_kitti
  # 8 GPUs
  torchrun --standalone --nproc_per_node=8 heads.py --task seg --data cityscapes:/data/cityscapes --out runs/seg_cs
  # Table D's features (README, "Other feature sources"): DINOv2 blocks and a PCA file, at 448 x 896
  python heads.py --task seg --vfm facebook/dinov2-with-registers-base --vfm-layers 2,5,8,11 --pca runs/pca_1152.pt \
      --size 448x896 --data cityscapes:/data/cityscapes --out runs/seg_dinof
"""
import argparse
import itertools
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import tokenizer as T

# ----------------------------------------------------------------------------------------------------------------
# The heads (appendix A; keys as the released checkpoints: bn.*, head.*)

DEPTH_BINS = 256
DEPTH_RANGE = (1e-3, 80.0)  # metres (appendix A)


class SegHead(nn.Module):
    task = "seg"

    def __init__(self, dim, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.head = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x):
        return self.head(self.bn(x))  # (B, classes, h, w) logits


class DepthHead(SegHead):  # DINOv3's: the same layers, to logits over the depth bins
    task = "depth"

    def __init__(self, dim, bins=DEPTH_BINS):
        super().__init__(dim, bins)
        self.register_buffer("centres", torch.linspace(*DEPTH_RANGE, bins), persistent=False)

    def forward(self, x):
        p = F.relu(super().forward(x)) + 0.1          # rectified and shifted by 0.1 (appendix A)
        p = p / p.sum(1, keepdim=True)                # a distribution over the bins
        return torch.einsum("bkhw,k->bhw", p, self.centres)[:, None]  # (B, 1, h, w) expected depth in metres


def to_map(feats, size):
    """Patch tokens (..., N, C) of a crop of size (H, W) (or any of its aspect) -> (B, C, h, w) for the heads."""
    h, w = T.patch_grid(feats.shape[-2], size[1] / size[0])
    return feats.reshape(-1, h, w, feats.shape[-1]).permute(0, 3, 1, 2).float()


def load_head(path, task=None, device="cpu", vfm=None):
    """A head from a heads.py checkpoint or a released pytorch_model.bin (bare state dict or {"state_dict"}).
    Released files carry no task: `task` says it, else 256 outputs mean the depth head. One trained on another VFM
    than `vfm` (if given) is refused. Returns (head, vfm name or None for released heads: DINOv3 ViT-B/16)."""
    ckpt = T.load_checkpoint(path, ("seghead", "depthhead"), "--heads")
    state = ckpt["model"] if "kind" in ckpt else ckpt.get("state_dict", ckpt)
    out, dim = state["head.weight"].shape[:2]
    if vfm is not None and (ckpt.get("vfm", vfm.name) != vfm.name or dim != vfm.dim):
        raise data.UserError(f"head {path} was trained on VFM {ckpt.get('vfm', T.DINOV3_B16)!r} ({dim} wide), but "
                             f"the features come from {vfm.name!r} ({vfm.dim} wide): check --heads / --vfm")
    task = task if task and "kind" not in ckpt else T.checkpoint_kind(ckpt)[:-4]  # "seghead" -> "seg"
    head = DepthHead(dim, out) if task == "depth" else SegHead(dim, out)
    T.load_state_strict(head, ckpt, f"--heads {path}", f"is it a {task} head?")
    return head.to(device).eval().requires_grad_(False), ckpt.get("vfm")


# ----------------------------------------------------------------------------------------------------------------
# The two-crop protocol (SPEC section 5, appendix B), for crops of size S (S x S) or (H, W)

def crop_hw(size):  # S -> (S, S)
    return (size, size) if isinstance(size, int) else tuple(size)


def resized_size(h, w, size):
    """An h x w frame scaled, aspect kept, to cover the crop (square crops: the shorter side -> S); the axis with
    excess is capped at twice the crop's extent on it (KITTI at S x S: the aspect clamped to 1:2)."""
    H, W = crop_hw(size)
    if H * w >= W * h:  # as wide as the crop or wider: excess in width
        return H, min(round(w * H / h), 2 * W)
    return min(round(h * W / w), 2 * H), W


def resize_frames(frames, size):
    """uint8 (T, H, W, 3) -> uint8 (T, 3, Hr, Wr) covering the crop (resized_size): plain bilinear with half-pixel
    centres and NO antialiasing, as OpenCV's INTER_LINEAR in the release, which the released heads were trained on
    (an antialiased 0.5x downscale differs by about 5 grey levels on average; SPEC section 5)."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2)
    return F.interpolate(x, resized_size(*x.shape[-2:], size), mode="bilinear", align_corners=False,
                         antialias=False)  # uint8 in and out: fixed-point weights like OpenCV's, within 1 level


def two_crops(x, size):
    """(..., Hr, Wr) -> (2, ..., H, W): the crops at either end of the axis with excess, left and right (top and
    bottom); they overlap when it is under twice the crop's, and coincide for frames of the crop's aspect."""
    H, W = crop_hw(size)
    return torch.stack([x[..., :H, :W], x[..., -H:, -W:]])


def paste(maps, label_hw, resized_hw, size):
    """Head outputs of the two crops (2, K, h, w) -> (K, Hl, Wl) at the labels' resolution. Each crop's output is
    upsampled (bilinear) to the size its crop covers in label pixels, anchored at its side of the frame, and cut to
    its label half (split at the midpoint of the axis with excess): every label pixel comes from exactly one crop."""
    (H, W), (hl, wl) = crop_hw(size), label_hw
    if resized_hw[0] - H > resized_hw[1] - W:  # excess in height: the same protocol on the transposed frame
        return paste(maps.transpose(-1, -2), label_hw[::-1], resized_hw[::-1], (W, H)).transpose(-1, -2)
    half = wl // 2
    cover = max(round(W * wl / resized_hw[1]), wl - half)  # label columns a crop covers: >= wl / 2 as Wr <= 2W
    up = F.interpolate(maps.float(), (hl, cover), mode="bilinear", align_corners=False)  # (2, K, Hl, cover)
    return torch.cat([up[0, ..., :half], up[1, ..., half - wl:]], -1)


def label_at(label, resized_hw, top, left, size):
    """Nearest label value at each pixel of the crop at (top, left) of the resized frame: (Hl, Wl) -> (H, W)."""
    (H, W), (hl, wl) = crop_hw(size), label.shape[-2:]
    rows = ((top + torch.arange(H) + 0.5) * hl / resized_hw[0]).long().clamp(max=hl - 1)
    cols = ((left + torch.arange(W) + 0.5) * wl / resized_hw[1]).long().clamp(max=wl - 1)
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
            keep = gt != IGNORE
            self.sums += torch.bincount(gt[keep] * self.k + pred[keep], minlength=self.k ** 2).view(self.k, self.k)
        else:
            valid = torch.as_tensor(label["valid"]).flatten()
            gt = torch.as_tensor(label["depth"]).double().flatten()[valid]
            pred = out[0].double().cpu().flatten()[valid]
            self.sums += torch.stack([valid.sum().double(), ((pred - gt) ** 2).sum(), ((pred - gt).abs() / gt).sum(),
                                      (torch.maximum(pred / gt, gt / pred) < 1.25).sum().double()])

    def update_crops(self, maps, label, resized_hw, size):
        """One sequence: the head's outputs on its two crops (2, K, h, w), pasted onto its labels."""
        self.update(paste(maps, np.shape(label.get("classes", label.get("depth"))), resized_hw, size), label)

    def reduce(self):
        if dist.is_initialized():
            sums = self.sums.cuda() if dist.get_backend() == "nccl" else self.sums
            dist.all_reduce(sums)
            self.sums = sums.cpu()

    def result(self):
        if self.task == "seg":
            inter, gt, pred = self.sums.diag(), self.sums.sum(1), self.sums.sum(0)
            return dict(miou=100 * (inter / (gt + pred - inter))[gt + pred > 0].mean().item())  # classes seen
        n, sq, absrel, d1 = self.sums.tolist()
        return dict(rmse=math.sqrt(sq / n), absrel=absrel / n, delta1=100 * d1 / n)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation datasets (SPEC section 5, appendix B): 7-frame sequences that end at a labelled frame.
# Every dataset has len() and item(i) -> dict(frames uint8 (7, H, W, 3), times float (7,) seconds from the first
# frame, name str, and either classes uint8 (H, W) with 255 = ignore, or depth float32 (H, W) metres + valid
# bool (H, W)); `labelled(i)` -> (frame (H, W, 3), label dict) reads only the labelled frame (for head training).

SEQ_LEN = 7
IGNORE = 255
CITYSCAPES_TRAIN_IDS = np.full(256, IGNORE, np.uint8)  # labelIds -> the 19 train ids, everything else 255
CITYSCAPES_TRAIN_IDS[[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]] = np.arange(19)
KITTI_CROP = (352, 1216)                                         # Eigen crop: bottom rows, centred columns
GARG = (0.40810811, 0.99189189, 0.03594771, 0.96405229)          # rows, then columns, as fractions of the crop


def _need(path, what):
    if not os.path.exists(path):
        raise data.UserError(f"{what}: {path} does not exist")
    return path


def _read(path, mode=None):
    """An image file as an array (converted to `mode`, e.g. "RGB"); an unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as img:  # a writable copy: torch warns about read-only arrays
            return np.array(img.convert(mode) if mode else img)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise data.UserError(f"cannot read the image {path} ({type(e).__name__}: {e}): replace or remove it") from None


class _Sequences:
    """Items: (frame paths, label path, name) of sequences `stride` frames apart at `fps`."""

    task = "seg"

    def __len__(self):
        return len(self.items)

    def _indices(self, k):  # the frame indices of the sequence that ends at frame k
        return range(k - (SEQ_LEN - 1) * self.stride, k + 1, self.stride)

    def _frame(self, path):
        return _read(path, "RGB")

    def item(self, i):
        paths, label, name = self.items[i]
        times = np.arange(SEQ_LEN) * self.stride / self.fps  # seconds from the first frame
        return dict(frames=np.stack([self._frame(p) for p in paths]), times=times, name=name, **self._label(label))

    def labelled(self, i):
        paths, label, _ = self.items[i]
        return self._frame(paths[-1]), self._label(label)


class VSPWSequences(_Sequences):
    """VSPW: <root>/<split>.txt lists videos; frames data/<video>/origin/*.jpg, labels data/<video>/mask/<stem>.png.
    Labelled frames are every 20th (indices 19, 39, ...); 15 fps, stride 3 frames (0.2 s); class = value - 1."""

    num_classes, fps, stride = 124, 15.0, 3

    def __init__(self, root, split="val"):
        listing = _need(os.path.join(root, f"{split}.txt"), f"VSPW root {root!r} needs the video list {split}.txt")
        self.items = []
        for v in open(listing).read().split():
            folder = _need(os.path.join(root, "data", v, "origin"), f"VSPW video {v} listed in {split}.txt")
            frames = sorted(f for f in os.listdir(folder)  # the official download has macOS ._* files beside them
                            if f.lower().endswith(data.IMAGE_EXTS) and not f.startswith("."))
            for k in range(19, len(frames), 20):  # the sequence's first frame, k - 18, is >= 0
                stem = os.path.splitext(frames[k])[0]
                label = _need(os.path.join(root, "data", v, "mask", stem + ".png"), f"VSPW label of {v}/{frames[k]}")
                self.items.append(([os.path.join(folder, frames[j]) for j in self._indices(k)], label, f"{v}/{stem}"))
        if not self.items:
            raise data.UserError(f"no VSPW sequence under {root!r}: videos need >= 20 frames in data/<video>/origin")

    def _label(self, path):
        c = _read(path).astype(np.int64) - 1
        return dict(classes=np.where((c >= 0) & (c < self.num_classes), c, IGNORE).astype(np.uint8))


class CityscapesSequences(_Sequences):
    """Cityscapes: labels gtFine/<split>/<city>/*_gtFine_labelIds.png, frames under leftImg8bit_sequence/<split>;
    stride 3 frames at 16 fps (0.1875 s, as the release counts); labelIds -> the 19 train ids, everything else 255."""

    num_classes, fps, stride = 19, 16.0, 3

    def __init__(self, root, split="val"):
        labels = _need(os.path.join(root, "gtFine", split), f"Cityscapes root {root!r} needs gtFine/{split}")
        frames = _need(os.path.join(root, "leftImg8bit_sequence", split),
                       f"Cityscapes root {root!r} needs leftImg8bit_sequence/{split}")
        self.items = []
        for city in sorted(c for c in os.listdir(labels) if os.path.isdir(os.path.join(labels, c))):  # no .DS_Store
            for f in sorted(f for f in os.listdir(os.path.join(labels, city))  # not macOS ._ files, hidden files
                            if f.endswith("_gtFine_labelIds.png") and not f.startswith(".")):
                _, seq, frame = f[:-len("_gtFine_labelIds.png")].rsplit("_", 2)
                paths = [_need(os.path.join(frames, city, f"{city}_{seq}_{j:06d}_leftImg8bit.png"),
                               f"Cityscapes sequence frame of {f}") for j in self._indices(int(frame))]
                self.items.append((paths, os.path.join(labels, city, f), f"{city}_{seq}_{frame}"))
        if not self.items:
            raise data.UserError(f"no *_gtFine_labelIds.png under {labels!r}")

    def _label(self, path):
        return dict(classes=CITYSCAPES_TRAIN_IDS[_read(path)])


def kitti_crop(x):
    """The Eigen crop: bottom 352 rows, centred 1216 columns of (H, W, ...)."""
    h, w = x.shape[:2]
    top, left = h - KITTI_CROP[0], (w - KITTI_CROP[1]) // 2
    if top < 0 or left < 0:
        raise data.UserError(f"KITTI frame {h}x{w} is smaller than the {KITTI_CROP[0]}x{KITTI_CROP[1]} Eigen crop")
    return x[top:top + KITTI_CROP[0], left:left + KITTI_CROP[1]]


# The release's Eigen test list (Apache-2.0, from the DeltaTok release), the default KITTI evaluation split
KITTI_EIGEN_TEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits", "kitti_eigen_test.txt")
KITTI_MIN_TARGET = 19  # the release skips targets with a smaller frame index: 603 of its 697 lines remain


def kitti_targets(split_file):
    """The usable lines of an Eigen-format list, as the release reads it: [(line's image path, date, drive, frame
    index, depth path or None)], skipping lines whose depth is 'None' and targets before frame 19."""
    out = []
    for n, line in enumerate(open(_need(split_file, "KITTI split list (--kitti-split)"))):
        parts = line.split()
        if not parts or (len(parts) > 1 and parts[1] == "None"):
            continue
        image = parts[0].split("/")
        if len(image) != 5 or image[2:4] != ["image_02", "data"]:
            raise data.UserError(f"{split_file} line {n + 1}: expected '<date>/<drive>/image_02/data/<idx>.png', "
                                 f"got {parts[0]!r}")
        k = int(os.path.splitext(image[4])[0])
        if k >= KITTI_MIN_TARGET:
            out.append((parts[0], image[0], image[1], k, parts[1] if len(parts) > 1 else None))
    return out


class KITTISequences(_Sequences):
    """KITTI depth (SPEC section 5) on an Eigen-format list (kitti_targets): frames under raw_root (default root: raw
    drives and data_depth_annotated unzipped into one folder, as the release's README says), ground truth under root
    or root/{train,val} (uint16 / 256 m, 0 = none); both cut to the Eigen crop; valid: Garg region, 1e-3 < d < 80.
    skip (the held-out check of a training run): lines without ground truth or raw frames are left out, named once."""

    task, fps, stride = "depth", 10.0, 2

    def __init__(self, root, split_file, raw_root=None, skip=False):
        _need(root, "KITTI root")
        self.items, skipped = [], []
        for line, date, drive, k, depth in kitti_targets(split_file):
            depth = depth or os.path.join(drive, "proj_depth", "groundtruth", "image_02", f"{k:010d}.png")
            tries = [os.path.join(root, folder, depth) for folder in ("", "train", "val")]
            try:
                if (gt := next((t for t in tries if os.path.exists(t)), None)) is None:
                    raise data.UserError(f"KITTI ground truth for {line} is missing: looked for {', '.join(tries)}")
                paths = [_need(os.path.join(raw_root or root, date, drive, "image_02", "data", f"{j:010d}.png"),
                               f"KITTI raw frame for {line} (raw drives under --kitti-raw, default the root)")
                         for j in self._indices(k)]
                self.items.append((paths, gt, f"{drive}/{k:010d}"))
            except data.UserError as e:
                if not skip:
                    raise
                skipped.append(str(e))
        if not self.items:
            raise data.UserError(f"no usable KITTI sequence in {split_file}" + (f" under {root} ({skipped[0]}; and "
                                 f"{len(skipped) - 1} more): give --kitti-val-split FILE" if skipped else ""))
        if skipped and os.environ.get("RANK", "0") == "0":
            print(f"warning: the held-out check skips {len(skipped)} of the {len(skipped) + len(self.items)} KITTI "
                  f"sequences of {split_file} ({skipped[0]}; ...): --kitti-val-split FILE for others", file=sys.stderr)

    def _frame(self, path):
        return kitti_crop(_read(path, "RGB"))

    def _label(self, path):
        depth = kitti_crop(_read(path).astype(np.float32) / 256)
        (h, w), (r0, r1, c0, c1) = depth.shape, GARG
        garg = np.zeros((h, w), bool)
        garg[int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)] = True
        return dict(depth=depth, valid=garg & (depth > DEPTH_RANGE[0]) & (depth < DEPTH_RANGE[1]))


class SyntheticSequences(_Sequences):
    """The synthetic source's 7-frame sequences at 0.2 s (3 frames at 15 fps), 5 non-overlapping per video, or one
    per frame (every_frame: for head training, which reads `labelled` only); every frame has classes and depth."""

    task, stride, num_classes = "both", 3, data.SyntheticVideos.NUM_CLASSES

    def __init__(self, split="val", seed=0, num_videos=None, size=128, every_frame=False):
        self.source = data.SyntheticVideos(split, seed, num_videos, size)
        span, n = (SEQ_LEN - 1) * self.stride + 1, len(self.source.frame_times(0))
        ends = range(n) if every_frame else range(span - 1, n, span + 2)[:5]
        self.items = [(i, k) for i in range(len(self.source)) for k in ends]

    def item(self, i):
        v, k = self.items[i]
        idx = list(self._indices(k))
        times = self.source.frame_times(v)[idx]
        return dict(frames=self.source.read(v, idx), times=times - times[0], name=f"{self.source.split}{v}/{k}",
                    **self._label(v, k))

    def labelled(self, i):
        v, k = self.items[i]
        return self.source.read(v, [k])[0], self._label(v, k)

    def _label(self, v, k):
        classes, depth = self.source.labels(v, [k])
        return dict(classes=classes[0], depth=depth[0], valid=np.ones_like(depth[0], bool))


def open_eval(spec, split="val", kitti_split=None, kitti_raw=None, seed=0, task=None, skip=False):
    """'synthetic', 'vspw:ROOT', 'cityscapes:ROOT' or 'kitti:ROOT' -> the sequences of that split; a dataset without
    the labels of `task` (seg or depth, if given) is refused; skip: KITTISequences'."""
    name, _, root = spec.partition(":")
    if name == "synthetic":  # training reads every frame
        return SyntheticSequences(split, seed, every_frame=split == "train")
    reader = {"vspw": VSPWSequences, "cityscapes": CityscapesSequences, "kitti": KITTISequences}.get(name)
    if not reader or not root:
        raise data.UserError(f"dataset {spec!r}: give it as NAME:ROOT (vspw, cityscapes, kitti) or 'synthetic'")
    if task and reader.task != task:
        raise data.UserError(f"{name} has {reader.task} labels, not {task}: use --task {reader.task}, or other --data")
    if name != "kitti":
        return reader(root, split)
    if not kitti_split and split != "val":  # the default list is the test split: never train on it silently
        raise data.UserError("KITTI training needs a list of training frames (Eigen format): pass --kitti-split FILE")
    return KITTISequences(root, kitti_split or KITTI_EIGEN_TEST, kitti_raw, skip)


# ----------------------------------------------------------------------------------------------------------------
# Training data: random S x S or H x W crops of labelled frames, labels sampled at the crop's pixels

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
            x, (H, W) = resize_frames(frame[None], self.size)[0], crop_hw(self.size)  # (3, Hr, Wr)
            top, left = (int(rng.integers(side - s + 1)) for side, s in zip(x.shape[-2:], (H, W)))
            frames.append(x[:, top:top + H, left:left + W])
            at = lambda key: label_at(torch.as_tensor(label[key]), x.shape[-2:], top, left, self.size)  # (H, W)
            targets.append(at("classes").long() if self.task == "seg" else at("depth"))
            valids.append(targets[-1] != IGNORE if self.task == "seg" else at("valid"))
        return torch.stack(frames), torch.stack(targets), torch.stack(valids)


def head_loss(head, task, feats, target, valid):
    """Segmentation: cross-entropy ignoring 255. Depth: the scale-invariant log loss (SILog: Eigen et al., lambda
    0.85, x10 as in BTS / AdaBins) over the valid pixels."""
    out = F.interpolate(head(to_map(feats, target.shape[-2:])), target.shape[-2:], mode="bilinear", align_corners=False)
    if task == "seg":
        return F.cross_entropy(out, target, ignore_index=IGNORE)
    d = torch.log(out[:, 0][valid].clamp(min=1e-3)) - torch.log(target[valid])
    return 10 * torch.sqrt((d ** 2).mean() - 0.85 * d.mean() ** 2 + 1e-8)


@torch.no_grad()
def present_score(head, vfm, source, size, device, dtype, num):
    """Score of the head on the labelled frames of `num` held-out sequences, with the two-crop protocol."""
    score = Score(head.task, head.head.out_channels)
    for i in range(min(num, len(source))):
        frame, label = source.labelled(i)
        x = resize_frames(frame[None], size)[0]
        with T.autocast(device, dtype):
            feats = vfm(two_crops(x, size).to(device))  # (2, N, C)
        score.update_crops(head(to_map(feats, crop_hw(size))), label, x.shape[-2:], size)
    return score.result()


def main(args):
    rank, world, device = T.setup_dist()
    master = rank == 0
    ckpt = T.check_run(args, f"{args.task}head", [("--data", args.data.partition(":")[2]), ("--kitti-split",
                       args.kitti_split), ("--kitti-val-split", args.kitti_val_split), ("--kitti-raw", args.kitti_raw),
                       ("--pca", args.pca)])
    train = open_eval(args.data, "train", args.kitti_split, args.kitti_raw, args.seed, args.task)
    val = open_eval(args.data, "val", args.kitti_val_split, args.kitti_raw, args.seed, skip=True)
    vfm = T.VFM(T.feature_source(args.vfm, args.vfm_layers, args.pca)).to(device)
    vfm.check_size(*args.size)  # before the run folder is made
    torch.manual_seed(args.seed)
    head = (SegHead(vfm.dim, train.num_classes) if args.task == "seg" else DepthHead(vfm.dim)).to(device)
    opt = T.make_optimizer(head, args.lr, args.weight_decay, device)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step = T.resume(args, head, opt, master, ckpt)["step"]
    model = T.ddp(head, world, device)
    batches = _Batches(train, args.task, args.size, args.batch_size, rank, args.seed)
    loader = iter(torch.utils.data.DataLoader(batches, batch_size=None, sampler=itertools.count(step),
                                              num_workers=args.num_workers, worker_init_fn=data.quiet_worker))

    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True)
    t0 = time.perf_counter()
    while step < args.steps:
        lr = T.lr_at(step, args.lr, args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine
        frames, target, valid = (t.to(device, non_blocking=True) for t in next(loader))
        with T.autocast(device, args.dtype):
            feats = vfm(frames)  # (B, N, C), frozen
        loss = head_loss(model, args.task, feats.float(), target, valid)
        loss.backward()
        T.optimizer_step(head, opt, lr, loss := loss.detach(), step, ckpt_path, master, world)
        step += 1
        bar.update(1)
        if master and (step % args.log_every == 0 or step == args.steps):
            rate = args.batch_size * world * args.log_every / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.4g}", lr=f"{lr:.2e}")
            T.log_jsonl(args.out, dict(step=step, loss=loss.item(), lr=lr, frames_per_s=rate))
            t0 = time.perf_counter()
        if master and (step % args.eval_every == 0 or step == args.steps):
            result = present_score(head.eval(), vfm, val, args.size, device, args.dtype, args.val_sequences)
            head.train()
            T.log_jsonl(args.out, dict(step=step, val=result))
            data.draw_curves(args.out, f"{args.task} head", r"val/(miou|rmse)", "held-out mIoU / RMSE in m")
            tqdm.write(f"step {step} held-out check on the first {args.val_sequences} val sequences' labelled frames "
                       "(two-crop protocol; eval.py's Present row scores its own --max-sequences): " +
                       "  ".join(f"{k} {v:.2f}" for k, v in result.items()))
        if T.stop_requested(world) or step % args.ckpt_every == 0 or step == args.steps:
            T.save_checkpoint(dict(kind=f"{args.task}head", num_classes=head.head.out_channels, vfm=vfm.name,
                                   size=args.size, data=args.data, model=head.state_dict(), optimizer=opt.state_dict(),
                                   step=step, args=vars(args)), ckpt_path, master)
    T.cleanup_dist(world, bar, f"done: {step} steps, checkpoint {ckpt_path}")


def get_parser():
    p = argparse.ArgumentParser(description="Train a segmentation or depth head on frozen VFM features.",
                                formatter_class=data.HelpFormatter)
    p.add_argument("--task", required=True, choices=["seg", "depth"], help="segmentation or depth head")
    p.add_argument("--data", default="synthetic", help="'synthetic', 'vspw:ROOT', 'cityscapes:ROOT' or 'kitti:ROOT' "
                   "(its train split)")
    p.add_argument("--kitti-split", default="", help="KITTI list file of the training frames (Eigen split format)")
    p.add_argument("--kitti-val-split", default="", help="KITTI list for the held-out check (default: the Eigen "
                   "test list, splits/kitti_eigen_test.txt); its sequences not under ROOT are skipped, named once")
    p.add_argument("--kitti-raw", default=None, help="root of the raw KITTI drives (default: the KITTI ROOT itself)")
    p.add_argument("--out", default="runs/head", help="run folder: ckpt.pt, log.jsonl")
    data.vfm_flags(p, T.DINOV3_B16, T.VFM_PRESETS)
    p.add_argument("--size", type=data.frame_size, default=(512, 512), help="crop size, S or HxW: the evaluation's "
                   "(512 main, 256 ablations, 448x896 Table D)")
    p.add_argument("--steps", type=data.at_least(1), default=20_000)
    p.add_argument("--batch-size", type=data.at_least(1), default=16, help="crops per GPU per step")
    p.add_argument("--lr", type=data.positive, default=1e-3)
    p.add_argument("--warmup", type=data.at_least(0), default=500)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--val-sequences", type=data.at_least(1), default=64, help="held-out labelled frames for the check")
    data.run_flags(p, workers=4, eval_every=2000)
    return p


if __name__ == "__main__":
    data.cli(main, get_parser())
