"""
Dense forecasting evaluation (SPEC section 5, appendix B): predict the features of a sequence's labelled frame
from its context, put them through a segmentation / depth head, and score them over the whole dataset, with
copy-last (the last context frame's features) and present (the target frame's own features) beside them.

Short horizon: context frames 2..5, predict frame 6 (one step). Mid horizon: context 0..3, predict 4, 5, 6
autoregressively, score frame 6. Every frame is cut into two crops of --size, S x S or H x W (heads.py: the two-crop
protocol); each crop is predicted and scored on its half of the labels. Generative models draw N samples per crop:
*best* is the sample whose final features have the lowest smooth-L1 (beta 0.1) loss to the ground truth, *mean*
averages the samples' features and applies the head once.

What --ckpt can be (its "kind"; released files are recognised by their keys; every checkpoint flag takes a hub id):
  deltatok    reconstruction from the last context frame, two rows (SPEC section 2, "DeltaTok mid"): sequential
              (the release: each frame encoded against the previous reconstruction) and parallel (tokens from
              ground-truth pairs; errors accumulate); the same at the short horizon
  deltaworld  DeltaWorld (predictor.py); dinoworld: the DINO-world baseline (baseline_dinoworld.py)
--features FILE instead scores predictions made elsewhere: a torch file (torch.save) holding a dict
  {"dataset": "vspw" | "cityscapes" | "kitti" | "synthetic", "size": (H, W) or S, "vfm": name (optional),
   "short": (num_sequences, 2, num_samples, N, C) tensor, "mid": the same (either may be missing)}
  = the predicted VFM patch features (row-major, after DINOv3's final LayerNorm) of each sequence's labelled
  frame, sequences in this script's order (--save-features writes the same format from any --ckpt, which also
  lists the order), crops 0 = left / top and 1 = right / bottom. One file per dataset, in --data order.

Run it:
  # CPU, a minute: tiny checkpoints on the synthetic videos (train them with tokenizer.py, predictor.py, heads.py)
  python eval.py --ckpt runs/world_tiny/ckpt.pt --heads runs/seg_tiny/ckpt.pt runs/depth_tiny/ckpt.pt \
      --size 64 --samples 4 --max-sequences 32 --out runs/eval_tiny
  # the released models, one dataset per command (README: reproducing the paper's table); --rgb-head: RGB pictures
  python eval.py --ckpt Amazon-FAR/deltaworld-kinetics --kind deltaworld --tokenizer Amazon-FAR/deltatok-kinetics \
      --data vspw:/data/VSPW --heads Amazon-FAR/seg-head-vspw --rgb-head Amazon-FAR/rgb-head-imagenet
  # forecast your own video: 4 frames 0.2 s apart from --start, 8 sampled futures -> figures and a GIF in --out
  python eval.py --video my.mp4 --start 3 --ckpt ... (as above) --samples 8 --out runs/my_video
  # 8 GPUs: sequences are split over ranks, scores summed across them
  torchrun --standalone --nproc_per_node=8 eval.py --ckpt runs/deltaworld/ckpt.pt --data cityscapes:/data/cs ...
  # the compute breakdown of appendix Table B (ViT-B, 256 px; random weights, no download needed)
  python eval.py --flops --vfm vitb16-random
"""
import argparse
import collections
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import baseline_dinoworld as DW
import data
import heads as Hd
import predictor as P
import tokenizer as T

CONTEXT = {"short": [2, 3, 4, 5], "mid": [0, 1, 2, 3]}  # target: frame 6 (SPEC section 5)
TARGET = 6
NAMES = {"deltatok": "DeltaTok reconstruction (sequential)", "deltatok_parallel": "DeltaTok reconstruction (parallel)",
         "deltaworld": "DeltaWorld", "dinoworld": "DINO-world", "features": "Features file"}

# ----------------------------------------------------------------------------------------------------------------
# The model under evaluation: final-step features of each horizon, (B, samples, N, C)

def load_model(args, path, device, vfms):
    """(kind, model, VFM name) of one --ckpt; the kind is the checkpoint's (released files: by their keys; --kind
    must agree). vfms: {name: VFM} already built, shared by the models so that the backbone is loaded once."""
    ckpt = T.load_checkpoint(path, (args.kind,) if args.kind else ("deltatok", "deltaworld", "dinoworld"), "--ckpt")
    kind = T.checkpoint_kind(ckpt)
    if kind == "deltatok":
        return (kind, *T.load_deltatok(path, device, "--ckpt"))
    vfm = vfms.get(ckpt.get("vfm"))  # None: the loader builds the recorded one
    model = P.load_deltaworld(path, device, tokenizer=args.tokenizer or None, vfm=vfm) if kind == "deltaworld" else \
        DW.load_dinoworld(path, device, vfm=vfm)
    vfms.setdefault(model.vfm.name, model.vfm)
    return kind, model, model.vfm.name


def load_models(args, device, vfms):
    """[(table name, kind, model)] for every --ckpt, and the VFM name they share."""
    models, names = [], set()
    for path in args.ckpt:
        kind, model, vfm = load_model(args, path, device, vfms)
        aspect = (model.tokenizer if kind == "deltaworld" else model).cfg.aspect  # RoPE's patch grid
        if aspect != args.size[1] / args.size[0]:
            raise data.UserError(f"--ckpt {path} was trained on frames of width / height {aspect:g}, --size "
                                 f"{args.size[0]}x{args.size[1]} is not: use a --size of that aspect")
        for kind in [kind, "deltatok_parallel"] if kind == "deltatok" else [kind]:  # both protocols
            run = f" ({os.path.basename(os.path.dirname(os.path.abspath(path)))})" * any(m[1] == kind for m in models)
            models.append((NAMES[kind] + run, kind, model))  # a second of a kind: named by its run folder too
        names.add(vfm)
    if len(names) > 1:
        raise data.UserError(f"checkpoints trained on different VFMs {sorted(names)}: evaluate them separately")
    return models, names.pop() if names else None


@torch.no_grad()
def predict(kind, model, feats, times, horizon, num_samples, generator):
    """The predicted rollout up to frame 6, (B, S, steps, N, C), from the ground-truth features feats (B, 7, N, C)."""
    ctx = CONTEXT[horizon]
    if kind.startswith("deltatok"):  # reconstruction of frames ctx[-1] + 1 .. 6 from the last context frame
        return model.reconstruct(feats[:, ctx[-1] + 1:], feats[:, ctx[-1]], kind == "deltatok")[:, None].float()
    t = times[:, ctx[0]:] - times[:, ctx[0]:ctx[0] + 1]  # seconds from the first context frame
    bom = model.config["bom"] if kind == "deltaworld" else model.cfg.bom  # generative: num_samples samples
    return model.sample(feats[:, ctx], t, num_samples if bom else 1, TARGET - ctx[-1], generator)[0].float()


def features_file(path, flag="--features"):
    """A file of predicted features (the docstring's format), its keys and types checked."""
    f = T.load_checkpoint(path, (), flag, mmap=True)
    if not (isinstance(f, dict) and {"dataset", "size"} <= f.keys() and
            all(torch.is_tensor(f[h]) and f[h].ndim == 5 for h in ("short", "mid") if h in f)):
        raise data.UserError(f"{flag} {path} is not a features file: a dict with dataset, size and the tensors short "
                             "/ mid (sequences, 2, samples, N, C), as eval.py's docstring says")
    return f


def best_and_mean(samples, target):
    """samples (B, S, N, C), truth (B, N, C) -> best sample (lowest smooth-L1, beta 0.1), their mean, best's index."""
    loss = F.smooth_l1_loss(samples, target[:, None].expand_as(samples), beta=0.1, reduction="none").mean((-2, -1))
    best = loss.argmin(1)
    return samples[torch.arange(len(samples)), best], samples.mean(1), best


# ----------------------------------------------------------------------------------------------------------------
# Sequences under the two-crop protocol

class Crops(torch.utils.data.Dataset):
    """Item i: the two crops of sequence i's frames (2, 7, 3, H, W) uint8, with its times and labels."""

    def __init__(self, sequences, size):
        self.sequences, self.size = sequences, size

    def __getitem__(self, i):
        item = self.sequences.item(i)
        x = Hd.resize_frames(item.pop("frames"), self.size)  # (7, 3, Hr, Wr)
        return dict(index=i, crops=Hd.two_crops(x, self.size), resized=tuple(x.shape[-2:]), **item)


def pick_heads(args, dataset, sequences, device, vfm):
    """The heads of this dataset: --heads PATH (for every dataset) or DATASET=PATH, one per task it has."""
    out, want = {}, ["seg", "depth"] if sequences.task == "both" else [sequences.task]
    for spec in args.heads:
        name, sep, path = spec.rpartition("=")
        if sep and name != dataset:
            continue
        head = Hd.load_head(path, want[0] if len(want) == 1 else None, device, vfm)[0]
        if head.task not in want:
            continue
        if head.task == "seg" and head.head.out_channels != sequences.num_classes:
            raise data.UserError(f"head {path} has {head.head.out_channels} classes, {dataset} has "
                                 f"{sequences.num_classes}")
        out[head.task] = head
    if not out:
        raise data.UserError(f"no head for {dataset} ({' / '.join(want)}): pass --heads PATH or {dataset}=PATH")
    return out


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
    state = T.load_checkpoint(path, ("rgbhead",), "--rgb-head")
    state = state.get("state_dict", state)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_layers."))
    head = RGBHead(vfm.model.norm, state["decoder_embed.weight"].shape[0], depth,
                   state["decoder_layers.0.intermediate.dense.weight"].shape[0],
                   math.isqrt(state["decoder_pos_embed"].shape[1] - 1))
    T.load_state_strict(head, state, f"RGB head {path}")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return head.to(device, dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Figures (Pillow only)

PALETTE = np.random.default_rng(0).integers(0, 256, (256, 3)).astype(np.uint8)
PALETTE[Hd.IGNORE] = 0
RAMP = np.array([[48, 18, 59], [70, 134, 251], [26, 228, 182], [164, 252, 60], [251, 185, 56], [122, 4, 3]], float)


def colour(out, task, lo=None, hi=None):
    """Head output (K, h, w) -> RGB uint8 (h, w, 3): class palette, inverse depth on a colour ramp, or the picture."""
    if task == "rgb":
        return (out.float().clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
    if task == "seg":
        return PALETTE[out.argmax(0).cpu().numpy() if out.ndim == 3 else out.cpu().numpy()]
    inv = 1 / out.reshape(out.shape[-2:]).float().clamp(min=1e-3).cpu().numpy()
    v = ((inv - lo) / (hi - lo + 1e-9)).clip(0, 1) * (len(RAMP) - 1)
    i = np.minimum(v.astype(int), len(RAMP) - 2)
    return (RAMP[i] + (RAMP[i + 1] - RAMP[i]) * (v - i)[..., None]).astype(np.uint8)


def pca_colours(feats, fit, size):
    """Features (M, N, C) of (H, W) crops -> RGB (M, h, w, 3) from the 3 principal components of `fit` (n, C)."""
    mean = fit.mean(0)
    v = torch.linalg.svd(fit - mean, full_matrices=False)[2][:3].T  # exact (pca_lowrank is random: figures varied)
    lo, hi = ((fit - mean) @ v).quantile(fit.new_tensor([0.01, 0.99]), 0)
    proj = ((feats - mean) @ v - lo) / (hi - lo + 1e-9)
    return Hd.to_map(proj.clamp(0, 1) * 255, size).byte().permute(0, 2, 3, 1).cpu().numpy()


def draw(rows, title, legend, tile=(128, 128)):
    """rows: lists of (caption, RGB array or None), one row per list, tiles of tile = (height, width) (nearest) under
    their captions; the title above, the legend below: lines of (key picture or None, text). Returns a PIL image."""
    font, (th, tw) = ImageFont.load_default(), tile
    span = lambda line: sum(font.getlength(text) + 10 + (0 if k is None else k.shape[1] + 3) for k, text in line)
    width = max([len(r) * tw for r in rows] + [span(line) for line in [[(None, title)], *legend]])
    canvas = Image.new("RGB", (math.ceil(width), 24 + len(rows) * (th + 14) + 14 * len(legend)), "white")
    pen = ImageDraw.Draw(canvas)
    pen.text((2, 3), title, "black", font)
    for r, row in enumerate(rows):
        for c, (caption, img) in enumerate(row):
            pen.text((c * tw + 2, 18 + r * (th + 14)), caption[:tw // 5], "black", font)
            if img is not None:
                canvas.paste(Image.fromarray(img).resize((tw, th), Image.NEAREST), (c * tw, 32 + r * (th + 14)))
    for y, line in enumerate(legend):
        x, y = 2, 22 + len(rows) * (th + 14) + 14 * y
        for key, text in line:
            if key is not None:
                canvas.paste(Image.fromarray(key).resize((key.shape[1], 10)), (round(x), y + 2))
                x += key.shape[1] + 3
            pen.text((x, y), text, "black", font)
            x += font.getlength(text) + 10
    return canvas


def key(task, out, lo, hi):
    """A head's legend line: the colours of the classes in its outputs (M, K, H, W), or the depth bar, far to near."""
    if task == "seg":
        return [(np.tile(PALETTE[k], (1, 10, 1)), f"class {k}") for k in out.argmax(1).unique().tolist()]
    return [(None, f"depth: far {1 / lo:.1f} m"), (colour(1 / torch.linspace(lo, hi, 120)[None], task, lo, hi),
                                                 f"{1 / hi:.1f} m near")] if task == "depth" else []


def figures(stem, name, item, feats, rollout, ctx, heads, size, num_samples=3, gif=False):
    """The figures of crop 0's rollout (S, steps, N, C) by model `name`: <stem>_<name>.png, the final step (per head
    and as PCA colours: context, ground truth, present, copy-last, best, mean, up to 8 samples); _rollout.png, frames
    0-6 left to right (per head: present, the best and `num_samples` other samples); gif: _rollout.gif."""
    stem += "_" + name.lower().replace(" ", "_").replace("(", "").replace(")", "")
    size = Hd.crop_hw(size)
    tile = lambda width=128: (round(width * size[0] / size[1]), width)  # (height, width) of the crops' aspect
    frames = item["crops"][0].permute(0, 2, 3, 1).numpy()  # (7, H, W, 3)
    final, first = rollout[:, -1], TARGET - rollout.shape[1] + 1  # the first predicted frame
    best = best_and_mean(final[None], feats[None, TARGET])[2].item()
    tiles, truth, keys = {}, {}, []  # tiles[task][s][t]: sample s (-1: present, -2: the samples' mean) at frame t
    for task, head in heads.items():
        maps = lambda x: F.interpolate(head(Hd.to_map(x, size)), size, mode="bilinear")  # (M, K, H, W)
        present = maps(feats)
        lo, hi = map(float, (1 / present.clamp(min=1e-3)).aminmax())  # inverse depth range of present
        paint = lambda x: [colour(o, task, lo, hi) for o in maps(x)]
        p, keys = [colour(o, task, lo, hi) for o in present], keys + [key(task, present, lo, hi)]
        tiles[task] = {s: p[:first] + paint(r) for s, r in enumerate(rollout)} | \
            {-1: p, -2: paint(final.mean(0, keepdim=True)) * 7}
        label = {"seg": "classes", "depth": "depth"}.get(task)
        truth[task] = frames[TARGET] if task == "rgb" else None if label not in item else \
            colour(Hd.label_at(torch.as_tensor(item[label]), item["resized"], 0, 0, size), task, lo, hi)
    pca = list(pca_colours(torch.cat([feats, final, final.mean(0, keepdim=True)]), feats[TARGET], size))  # final step
    tiles["PCA"] = {s: [pca[7 + s]] * 7 for s in range(len(final))} | {-1: pca[:7], -2: pca[-1:] * 7}
    truth["PCA"] = None
    title = (f"{name}, {'short' if ctx == CONTEXT['short'] else 'mid'} horizon (context: frames {ctx[0]}-{ctx[-1]}, "
             f"target: frame {TARGET}), {item['name']}, crop 0")
    sample = lambda s: f"sample {s}" + " best" * (s == best)
    notes = [[(None, f"best = sample {best}: the lowest smooth-L1 loss of its frame-{TARGET} features to the true "
               "ones; present = the head on the frame's own features")]]
    rows = [[(f"context {t}", frames[t]) for t in ctx] + [(f"target (frame {TARGET})", frames[TARGET])]]
    for task, ts in tiles.items():
        rows.append([(f"{task} context {t}", ts[-1][t]) for t in ctx] + [(f"{task} ground truth", truth[task])] *
                    (truth[task] is not None) + [(f"{task} {n}", ts[s][t]) for n, s, t in (
                        ("present", -1, TARGET), ("copy-last", -1, ctx[-1]), (f"best (sample {best})", best, TARGET),
                        ("mean", -2, TARGET))])
        rows += [[(f"{task} {sample(s)}", ts[s][TARGET]) for s in range(min(8, len(final)))]] * (len(final) > 1)
    draw(rows, title + ", the final step", keys + notes + [[(None, f"ground truth = the dataset's labels; copy-last = "
         f"the head on frame {ctx[-1]}'s features; mean = the samples' features averaged; PCA = features on the 3 "
         "principal components of frame 6's, as RGB")]], tile()).save(stem + ".png")
    shown = [-1, best] + [s for s in range(len(final)) if s != best][:num_samples]
    rows = [[(f"frame {t}" + " (context)" * (t in ctx), frames[t]) for t in range(TARGET + 1)]]
    rows += [[(f"{task} present {t}" if s < 0 or t < first else f"{task} {sample(s)}", tiles[task][s][t])
              for t in range(TARGET + 1)] for task in heads for s in shown]
    notes += [[(None, f"a sample's columns before frame {first} (the first predicted) show present")]]
    draw(rows, title, keys + notes, tile()).save(stem + "_rollout.png")
    if gif:  # frame t: per head, present beside every sample's prediction of frame t, at most 1600 px wide
        rows = lambda t: [[(f"frame {t}" * (i == 0), frames[t] if i == 0 else None), (f"{task} present",
                           tiles[task][-1][t])] + [(sample(s), tiles[task][s][t]) for s in range(len(final))]
                          for i, task in enumerate(heads)]
        gif_tile = tile(max(48, min(128, 1600 // (len(final) + 2))))
        pictures = [draw(rows(t), f"{title}, frame {t}", keys + notes, gif_tile) for t in range(TARGET + 1)]
        pictures[0].save(stem + "_rollout.gif", save_all=True, append_images=pictures[1:], duration=700, loop=0)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(args, dataset, sequences, models, vfm, heads, device, rank, world, features, rgb):
    """Metrics {(method, horizon, best|mean|-): {metric: value}} of the dataset, each rank scoring its share."""
    n = min(len(sequences), args.max_sequences or len(sequences))
    loader = torch.utils.data.DataLoader(Crops(sequences, args.size), args.batch_size, sampler=range(rank, n, world),
                                         collate_fn=list, num_workers=args.num_workers)
    scores = collections.defaultdict(lambda: {t: Hd.Score(t, head.head.out_channels) for t, head in heads.items()})
    saved, start = {h: [] for h in args.horizons}, time.perf_counter()

    def add(key, pred, items):
        for task, head in heads.items():
            maps = head(Hd.to_map(pred, args.size))  # (2B, K, h, w)
            for b, item in enumerate(items):
                scores[key][task].update_crops(maps[2 * b:2 * b + 2], item, item["resized"], args.size)

    for items in tqdm(loader, disable=rank != 0, desc=dataset, dynamic_ncols=True):
        crops = torch.stack([it["crops"] for it in items]).flatten(0, 1).to(device)    # (2B, 7, 3, H, W)
        times = torch.stack([torch.as_tensor(it["times"]) for it in items]).repeat_interleave(2, 0).to(device)
        with T.autocast(device, args.dtype):
            feats = vfm(crops).float()                                                  # (2B, 7, N, C)
        add(("Present", "-", "-"), feats[:, TARGET], items)
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + items[0]["index"])
        for h in args.horizons:
            add(("Copy last", h, "-"), feats[:, CONTEXT[h][-1]], items)
            for name, kind, model in models:
                if kind == "features":  # a file holds the final step only: the figures show that
                    rollout = torch.cat([features[h][it["index"]] for it in items]).to(device).float()[:, :, None]
                else:
                    with T.autocast(device, args.dtype):
                        rollout = predict(kind, model, feats, times, h, args.samples, gen)  # (2B, S, steps, N, C)
                samples = rollout[:, :, -1]  # (2B, S, N, C)
                if args.save_features and name == models[0][0]:  # a DeltaTok's first row: sequential
                    saved[h].append(samples.view(len(items), 2, *samples.shape[1:]).half().cpu())
                best, mean, _ = best_and_mean(samples, feats[:, TARGET])
                add((name, h, "best"), best, items)
                if samples.shape[1] > 1:
                    add((name, h, "mean"), mean, items)
                for b, item in enumerate(items):
                    if item["index"] < args.figures:
                        figures(os.path.join(args.out, f"{dataset}_{item['index']:04d}_{h}"), name, item,
                                feats[2 * b], rollout[2 * b], CONTEXT[h], heads | rgb, args.size)
    if args.save_features:  # write, then rename: a features file written over is never half a file
        os.makedirs(os.path.dirname(os.path.abspath(args.save_features)), exist_ok=True)
        T.save_checkpoint(dict(dataset=dataset, size=args.size, vfm=vfm.name, **{h: torch.cat(v) for h, v in
                                                                                 saved.items()}), args.save_features)
    data.bench_record(sequences_per_s=len(loader.sampler) / (time.perf_counter() - start))  # make bench-gpu's row
    # every score summed over the ranks: every rank reduces every key any rank has, in the same order (one without
    # sequences, when there are fewer than ranks, has none of its own but must reach each collective)
    keys = [list(scores)]
    if dist.is_initialized():
        keys = [None] * dist.get_world_size()
        dist.all_gather_object(keys, list(scores))
    out = {}
    for key in sorted(set().union(*keys)):
        for score in scores[key].values():
            score.reduce()
            out.setdefault(key, {}).update(score.result())
    return out


def table(results):
    """The paper's table: one row per method and horizon, best (mean) for generative models."""
    labels = dict(miou="mIoU", rmse="RMSE", absrel="AbsRel", delta1="d1")  # in the paper's column order
    cols, rows = [], {}
    for dataset, res in results.items():
        cols += [(dataset, m) for m in labels if any(m in r for r in res.values())]
        for (method, horizon, pick), r in res.items():
            rows.setdefault((method, horizon), {}).update({(dataset, m, pick): v for m, v in r.items()})
    lines = [["Method", "Horizon"] + [f"{d} {labels[m]}" for d, m in cols]]
    for method, horizon in sorted(rows, key=lambda k: (k[0] != "Present", k[0] == "Copy last",
                                                      ["-", "short", "mid"].index(k[1]))):
        row, cells = rows[method, horizon], []
        for d, m in cols:
            v, mean = row.get((d, m, "best"), row.get((d, m, "-"))), row.get((d, m, "mean"))
            cells.append("" if v is None else f"{v:.2f}" + ("" if mean is None else f" ({mean:.2f})"))
        lines.append([method + " best (mean)" * any(k[2] == "mean" for k in row), horizon] + cells)
    widths = [max(map(len, col)) for col in zip(*lines)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines[1:]])


def video_clip(args):
    """--video: 7 frames 0.2 s apart from --start (4 context frames, then the 3 that followed), one centre crop of
    --size -> (item for the figures, times (1, 7) in seconds from the first)."""
    try:
        source = data.open_source(args.video, "val", seed=args.seed)
        times = source.frame_times(0)
    except Exception as e:
        raise data.UserError(f"cannot read the video {args.video}: {e}") from None
    want = args.start + 0.2 * np.arange(TARGET + 1)
    if args.start < 0 or want[-1] > times[-1] + 0.02:
        raise data.UserError(f"--start {args.start}: the forecast needs 1.2 s of video from there (4 context frames "
                             f"and the 3 to compare with), and {args.video} is {times[-1]:.2f} s long")
    idx = np.abs(times[:, None] - want).argmin(0).tolist()
    x = Hd.resize_frames(source.read(0, idx), args.size)                             # (7, 3, Hr, Wr)
    (H, W), (hr, wr) = args.size, x.shape[-2:]
    crops = x[None, ..., (hr - H) // 2:(hr + H) // 2, (wr - W) // 2:(wr + W) // 2]  # (1, 7, 3, H, W); times (1, 7):
    return dict(crops=crops, name=f"{args.video} at {args.start} s"), torch.as_tensor(times[idx] - times[idx[0]])[None]


@torch.no_grad()
def forecast(args, item, t, models, vfm, heads, device):
    """Each model rolls out --samples futures of the video clip for 3 steps (the mid horizon) -> figures and a GIF."""
    os.makedirs(args.out, exist_ok=True)
    with T.autocast(device, args.dtype):
        feats = vfm(item["crops"][0].to(device)).float()                              # (7, N, C)
    for name, kind, model in models:
        gen = torch.Generator(device).manual_seed(args.seed)
        with T.autocast(device, args.dtype):
            rollout = predict(kind, model, feats[None], t.to(device), "mid", args.samples, gen)[0]  # (S, 3, N, C)
        figures(os.path.join(args.out, "video"), name, item, feats, rollout, CONTEXT["mid"], heads, args.size, 7, True)
    print(f"figures and GIFs in {args.out}")


def to_wandb(args, rank, **tables):
    """--wandb, rank 0: eval's table and the figures in --out, to a W&B run of their own with the flags as config."""
    if rank == 0 and data.wandb_start(args):
        pngs = {f[:-4]: os.path.join(args.out, f) for f in sorted(os.listdir(args.out)) if f.endswith(".png")}
        data.wandb_log(dict(step=0, **tables, **pngs))


# ----------------------------------------------------------------------------------------------------------------
# Compute (appendix Table B)

TABLE_B = dict(backbone=47.185, encoder=96.930, predictor={4: 0.26, 5: 0.28, 6: 0.31}, decoder=46.12,
               dinoworld={4: 84.88, 5: 96.96, 6: 109.04})


def flops(args):
    """GFLOPs per H x W crop of each part, on the meta device (no weights needed, nothing computed)."""
    kind, model, vfm_name = load_model(args, args.ckpt[0], "cpu", {}) if args.ckpt else (None, None, T.DINOV3_B16)
    with torch.device("meta"):
        vfm = T.VFM(args.vfm or vfm_name)
        tok = (model if kind == "deltatok" else model.tokenizer if kind == "deltaworld" else
               T.build_deltatok(args.model, vfm, size=args.size))
        world = (model if kind == "deltaworld" else P.DeltaWorld(tok, vfm, args.model)).predictor
        dino = model if kind == "dinoworld" else DW.build_dinoworld(args.model, vfm, size=args.size)
    tok, world, dino = tok.to("meta"), world.to("meta"), dino.to("meta")
    zeros = lambda *s: torch.zeros(*s, device="meta")
    n, c = math.prod(args.size) // vfm.patch_size ** 2, vfm.dim
    x = zeros(1, n, c)
    g = lambda fn: data.count_flops(fn) / 1e9
    backbone = g(lambda: vfm(torch.zeros(1, 3, *args.size, dtype=torch.uint8, device="meta")))
    encoder, decoder = g(lambda: tok.encode(x, x)), g(lambda: tok.decode(zeros(1, 1, c), x))
    predictor = {k: g(lambda: world(zeros(1, 1, c), zeros(1, k, c), zeros(1, 1, 1), zeros(1, k, 1))) for k in (4, 5, 6)}
    dinoworld = {k: g(lambda: dino.predict(zeros(1, k, n, c), zeros(1, k), zeros(1, 1, c), zeros(1, 1)))
                 for k in (4, 5, 6)}
    rows = [("Backbone (per frame)", backbone, TABLE_B["backbone"]),
            ("DeltaTok encoder (per frame)", encoder, TABLE_B["encoder"])]
    rows += [(f"DeltaWorld predictor ({k}-token context)", predictor[k], TABLE_B["predictor"][k]) for k in predictor]
    rows += [("DeltaTok decoder (per step)", decoder, TABLE_B["decoder"])]
    rows += [(f"DINO-world predictor ({k}-frame context)", dinoworld[k], TABLE_B["dinoworld"][k]) for k in dinoworld]
    reference = args.size == (256, 256) and vfm.dim == 768 and args.model == "base"
    print(f"GFLOPs per {args.size[0]}x{args.size[1]} crop = 2 x multiply-adds of one forward, attention included "
          f"(appendix Table B; the paper's other tables double these for the two crops).\nVFM {vfm.name}; models: "
          f"{f'{kind} from --ckpt, the rest ' if kind else ''}--model {args.model} (blocks: DeltaTok {tok.cfg.depth} + "
          f"{tok.cfg.depth}, DeltaWorld {len(world.blocks)}, DINO-world {dino.cfg.depth}). At ViT-B 256 px DINO-world's"
          " rows fall 11-13% below Table B: the fixed part agrees, a context frame costs 9.65 GFLOPs, not 12.08 "
          "(BENCHMARKS.md).")
    for name, v, ref in rows:
        print(f"  {name:<42} {v:9.3f}" + (f"   Table B {ref:8.3f} ({100 * (v / ref - 1):+.1f}%)" if reference else ""))
    shared, per_sample = 4 * (backbone + encoder), sum(predictor.values()) + 3 * decoder
    dino = 4 * backbone + sum(dinoworld.values())
    print(f"  mid horizon, DeltaWorld: shared {shared:.2f} + {per_sample:.2f} per sample; DINO-world: {dino:.2f}")
    return {name: v for name, v, _ in rows}


# ----------------------------------------------------------------------------------------------------------------

def main(args):
    args.size = args.size or ((256, 256) if args.flops else (512, 512))  # Table B's 256 px, the main table's 512
    if args.flops:
        return flops(args)
    rank, world, device = T.setup_dist()
    if bool(args.ckpt) == bool(args.features):
        raise data.UserError("give either --ckpt (a model to run) or --features (predictions made elsewhere)")
    if args.features and len(args.features) != len(args.data):
        raise data.UserError(f"--features needs one file per --data entry ({len(args.data)})")
    if args.video and not args.ckpt:
        raise data.UserError("--video forecasts with --ckpt models (not --features)")
    if args.save_features and (len(args.ckpt) != 1 or len(args.data) != 1 or world > 1):  # one file, one dataset
        raise data.UserError("--save-features takes one --ckpt, one --data and one process (python eval.py, not "
                             "torchrun): run it once per dataset")
    flags = ("ckpt", "features", "heads", "tokenizer", "rgb_head", "video", "kitti_split", "kitti_raw")
    read = [(f"--{k.replace('_', '-')}", v.split("=")[-1]) for k in flags for v in np.atleast_1d(vars(args)[k] or "")]
    read += [("--data", d.partition(":")[2]) for d in args.data]  # --heads DATASET=PATH, --data NAME:ROOT
    T.check_run(args, None, read, [("--save-features", args.save_features and os.path.dirname(os.path.abspath(
        args.save_features)))])
    if os.path.lexists(args.save_features):  # only a features file may be written over
        features_file(args.save_features, "--save-features")
    clip = video_clip(args) if args.video else None  # before loading any model: a mistake fails at once
    names = [spec.partition(":")[0] for spec in args.data]
    datasets = [] if args.video else [Hd.open_eval(spec, "val", args.kitti_split, args.kitti_raw, args.seed)
                                      for spec in args.data]
    files = [features_file(path) for path in args.features]
    for path, features, name, sequences in zip(args.features, files, names, datasets):
        n = min(len(sequences), args.max_sequences or len(sequences))
        if (features["dataset"], Hd.crop_hw(features["size"])) != (name, args.size):
            px = lambda s: f"{s[0]}" + f"x{s[1]}" * (s[0] != s[1])
            raise data.UserError(f"--features {path} holds {features['dataset']} at {px(Hd.crop_hw(features['size']))} "
                                 f"px, not {name} at {px(args.size)} px: check --data / --size")
        if any(len(features.get(h, ())) < n for h in args.horizons):
            raise data.UserError(f"--features {path} has fewer than the {n} sequences to evaluate for --horizons "
                                 f"{' '.join(args.horizons)}: check --max-sequences / --horizons")
    vfms = {}  # one backbone for every model and for the ground truth
    models, vfm_name = load_models(args, device, vfms) if args.ckpt else ([(NAMES["features"], "features", None)], None)
    vfm_name = args.vfm or vfm_name or (files[0].get("vfm") if files else None) or T.DINOV3_B16
    vfm = vfms.get(vfm_name) or T.VFM(vfm_name).to(device)
    rgb = {"rgb": load_rgb_head(args.rgb_head, vfm, device)} if args.rgb_head else {}
    if args.video:  # any head
        heads = {h.task: h for h in (Hd.load_head(p.split("=")[-1], None, device, vfm)[0] for p in args.heads)}
        forecast(args, *clip, models, vfm, heads | rgb, device)
        return to_wandb(args, rank)
    heads = [pick_heads(args, name, sequences, device, vfm) for name, sequences in zip(names, datasets)]
    os.makedirs(args.out, exist_ok=True)
    results = {name: evaluate(args, name, sequences, models, vfm, tasks, device, rank, world, features, rgb)
               for name, sequences, features, tasks in zip(names, datasets, files or [None] * len(names), heads)}
    if rank == 0:
        print(table(results) + "\nPresent: the heads on frame 6's own features (heads.py's check: other sequences)")
        path = os.path.join(args.out, "results.json")
        rows = {d: [dict(method=m, horizon=h, pick=p, **v) for (m, h, p), v in r.items()] for d, r in results.items()}
        with open(path, "w") as f:
            json.dump(dict(ckpt=args.ckpt, kinds=[m[1] for m in models], size=args.size, samples=args.samples,
                           data=args.data, results=rows), f, indent=1)
        print(f"results in {path}")
        to_wandb(args, rank, **{f"results/{d}": r for d, r in rows.items()})
    T.cleanup_dist(world)
    return results


def get_parser():
    p = argparse.ArgumentParser(description="Dense forecasting evaluation: segmentation and depth of predicted "
                                "features (SPEC section 5).", formatter_class=data.HelpFormatter)
    p.add_argument("--ckpt", nargs="+", default=[], help="checkpoints to evaluate (one table): DeltaTok, DeltaWorld, "
                   "DINO-world (files or hub ids such as Amazon-FAR/deltaworld-kinetics)")
    p.add_argument("--kind", default="", choices=["", "deltatok", "deltaworld", "dinoworld"],
                   help="what --ckpt must be (released files and hub ids are recognised by their keys)")
    p.add_argument("--tokenizer", default="", help="DeltaTok checkpoint for a DeltaWorld (default: the recorded one)")
    p.add_argument("--features", nargs="+", default=[], help="instead of --ckpt: predicted features, a file per "
                   "--data entry (format in the docstring)")
    p.add_argument("--save-features", default="", help="write the predictions as a --features file (one --data "
                   "entry: one file per dataset, as --features reads them)")
    p.add_argument("--data", nargs="+", default=["synthetic"], help="synthetic, vspw:ROOT, cityscapes:ROOT, kitti:ROOT")
    p.add_argument("--kitti-split", default="", help="KITTI list (default: the release's Eigen test list, "
                   "splits/kitti_eigen_test.txt: 603 sequences)")
    p.add_argument("--kitti-raw", default=None, help="root of the raw KITTI drives (default: the KITTI ROOT itself)")
    p.add_argument("--heads", nargs="+", default=[], help="head files: PATH (any dataset of its task) or DATASET=PATH")
    p.add_argument("--rgb-head", default="", help="RGB head (Amazon-FAR/rgb-head-imagenet): an RGB row in each figure")
    p.add_argument("--video", default="", help="forecast a video file (or 'synthetic'): figures and a GIF in --out")
    p.add_argument("--start", type=float, default=0.0, help="--video: seconds to its first context frame")
    p.add_argument("--vfm", default="", help="VFM override (default: the one the checkpoint records)")
    p.add_argument("--size", type=data.frame_size, help="crop size, S or HxW (default 512; --flops: 256, Table B's): "
                   "512 main, 256 ablations, 448x896 Table D (Cityscapes)")
    p.add_argument("--horizons", nargs="+", default=["short", "mid"], choices=["short", "mid"])
    p.add_argument("--samples", type=data.at_least(1), default=20, help="samples per crop for generative models")
    p.add_argument("--batch-size", type=data.at_least(1), default=4, help="sequences per forward (x2 crops)")
    p.add_argument("--max-sequences", type=data.at_least(0), default=0, help="only the first N sequences (0: all)")
    p.add_argument("--figures", type=data.at_least(0), default=4, help="draw PNG figures for the first N sequences")
    p.add_argument("--out", default="runs/eval", help="folder for results.json and figures")
    p.add_argument("--wandb", metavar="[ENTITY/]PROJECT", help="also log the table and figures to Weights & Biases")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["bf16", "fp32"])
    p.add_argument("--num-workers", type=data.at_least(0), default=data.cpu_workers(4), help="data loader processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops", action="store_true", help="print the compute breakdown of appendix Table B and exit")
    p.add_argument("--model", default="base", choices=list(P.PREDICTOR_PRESETS), help="--flops: size of the models")
    return p


if __name__ == "__main__":
    data.cli(main, get_parser())
