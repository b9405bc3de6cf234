"""
Video data for every stage: where frames come from, and how training clips are cut from them.

Two sources share one interface (`len(source)`, `source.frame_times(i)`, `source.read(i, idx)`):
- `SyntheticVideos`: procedural moving shapes with class and depth labels, no download. The default
  (`--data synthetic`) of every script, so the whole pipeline runs on a laptop in minutes.
- `VideoFolder`: real videos, a folder tree of video files or of frame folders (one folder of images = one video).

`ClipDataset.sample(step, j)` cuts clip j of training step `step` (a pure function of seed, step and j), and
`make_loader` turns that into an infinite, resumable stream of micro-batches that is the same for any number of
workers and processes: the union over ranks and micro-steps of step s is always clips j = 0 .. global_batch - 1.

    python data.py --prepare /data/videos /data/videos288 --workers 16  # once: copies made for random access
    python data.py --bench /data/videos288 --workers 4                   # clips/s of the training loader
"""

import argparse
import functools
import itertools
import multiprocessing
import os
import sys
import time

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

class UserError(Exception):
    """A mistake in the user's input (a flag, a path, a file): one line on stderr and exit status 2, no traceback."""


def cli(main, parser):
    """Run main(args) from the command line: a UserError prints `<prog>: error: <message>` and exits 2, as argparse
    does for a bad flag; anything else is a bug and keeps its traceback."""
    try:
        return main(parser.parse_args())
    except UserError as e:
        sys.stderr.write(f"\n{parser.prog}: error: {e}\n")  # a new line: never after a progress bar
        sys.exit(2)


VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
PREPARED = "deltatok-prepared"  # the comment of a copy made by `prepare`, then the original's frame count and rate

# -----------------------------------------------------------------------------
# synthetic videos: moving shapes that turn at random moments, with class and depth labels

SPLITS = ("train", "val")
TINTS = np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.4, 0.9]], np.float32)  # circle, square, triangle
TURNS = np.deg2rad([0.0, 90.0, -90.0, 180.0])  # keep going, left, right, reverse: the modes of the future
TURN_EVERY = 0.75  # mean seconds between turn events (3 in 4 visibly turn): futures 0.6 s ahead fork


def _sinusoids(rng, ys, xs, n):
    """Sum of n random plane waves of small amplitude on the (H, W) grid: a smooth texture around 0."""
    out = np.zeros(ys.shape, np.float32)
    for _ in range(n):
        fy, fx = rng.uniform(-4, 4, 2)  # cycles per frame
        out += rng.uniform(0.05, 0.15) * np.sin(2 * np.pi * (fy * ys + fx * xs) + rng.uniform(0, 2 * np.pi))
    return out


@functools.lru_cache(maxsize=4)
def _grid(size):
    grid = ((np.arange(size) + 0.5) / size).astype(np.float32)
    return np.meshgrid(grid, grid, indexing="ij")  # (H, W) pixel centres in frame units, shared by every video


@functools.lru_cache(maxsize=1024)  # every video of both splits (~60 KB each): building a scene costs more than a frame
def _scene(seed, split, i, size, fps, seconds):
    """Everything about synthetic video i, drawn from its own seed: background, and per-frame object states."""
    rng = np.random.default_rng([seed, SPLITS.index(split), i])  # train and val draw from disjoint seeds
    ys, xs = _grid(size)
    bg = (rng.uniform(0.25, 0.75, 3) + _sinusoids(rng, ys, xs, 4)[..., None]).clip(0, 1)  # (H, W, 3) muted texture
    far, near = rng.uniform(40, 60), rng.uniform(15, 25)
    bg_depth = (far + (near - far) * ys).astype(np.float32)  # ground plane: far at the top, near at the bottom

    t = np.arange(round(seconds * fps)) / fps  # (F,)
    n = rng.integers(1, 3)
    cls = rng.integers(1, len(TINTS) + 1, n)  # class of each object, 0 is background
    colour = 0.8 * TINTS[cls - 1] + 0.2 * rng.uniform(0, 1, (n, 3))  # class-tinted: classes differ in colour
    pos, vel, depth = np.zeros((len(t), n, 2)), np.zeros((len(t), n, 2)), np.zeros((len(t), n))
    for o in range(n):
        # piecewise-constant velocity: constant speed, turning by one of TURNS at Poisson-distributed moments
        k = int(4 * seconds / TURN_EVERY) + 8  # more events than the video needs; later ones go unused
        starts = np.concatenate([[0.0], np.cumsum(rng.exponential(TURN_EVERY, k))])  # (k+1,)
        heading = rng.uniform(0, 2 * np.pi) + np.concatenate([[0.0], np.cumsum(rng.choice(TURNS, k))])
        v = rng.uniform(0.25, 0.5) * np.stack([np.sin(heading), np.cos(heading)], -1)  # frames/s, (y, x)
        p = rng.uniform(0, 1, 2) + np.concatenate([[[0, 0]], np.cumsum(v[:-1] * np.diff(starts)[:, None], 0)])
        seg = np.searchsorted(starts, t, side="right") - 1
        pos[:, o] = p[seg] + v[seg] * (t - starts[seg])[:, None]  # unfolded: a free walk in the plane
        vel[:, o] = v[seg]
        depth[:, o] = rng.uniform(4, 12) * (1 + 0.15 * np.sin(2 * np.pi * (t / rng.uniform(4, 10) + rng.uniform())))
    palette = (np.concatenate([bg.reshape(-1, 3), colour]) * 255 + 0.5).astype(np.uint8)  # (H*W + n, 3)
    return dict(palette=palette, bg_depth=bg_depth, ys=ys, xs=xs, cls=cls, pos=pos, vel=vel, depth=depth)


class SyntheticVideos:
    """Procedural videos: 1-2 shapes over a textured background, occluding each other by depth. Each moves at
    constant speed and at random moments keeps going, turns left, turns right or reverses, bouncing off the
    borders, so a short context has several distinct plausible futures. Frame k of video i is a pure function of
    (seed, split, i, k)."""

    NUM_CLASSES = 4  # background, circle, square, triangle

    def __init__(self, split="train", seed=0, num_videos=None, size=128, fps=15.0, seconds=8.0):
        if split not in SPLITS:
            raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
        self.split, self.seed, self.size, self.fps, self.seconds = split, seed, size, fps, seconds
        self.num_videos = num_videos or {"train": 512, "val": 64}[split]

    def __len__(self):
        return self.num_videos

    def frame_times(self, i):
        return np.arange(round(self.seconds * self.fps)) / self.fps

    def trajectory(self, i):
        """Object centres in frame units, folded into [0, 1] (bouncing), and the unfolded velocities: (F, n, 2)."""
        s = _scene(self.seed, self.split, i, self.size, self.fps, self.seconds)
        return 1 - np.abs(s["pos"] % 2 - 1), s["vel"]

    def _render(self, i, idx):
        s = _scene(self.seed, self.split, i, self.size, self.fps, self.seconds)
        if not 0 <= min(idx) <= max(idx) < len(s["pos"]):
            raise IndexError(f"frame indices {idx} out of range for {len(s['pos'])} frames")
        pos = self.trajectory(i)[0][idx].astype(np.float32)  # (T, n, 2)
        # paint indices into a palette (background pixels, then one colour per object): far cheaper than RGB writes
        hw = s["ys"].size
        index = np.tile(np.arange(hw, dtype=np.int32).reshape(s["ys"].shape), (len(idx), 1, 1))  # (T, H, W)
        depth = np.broadcast_to(s["bg_depth"], index.shape)  # (T, H, W)
        for o, c in enumerate(s["cls"]):
            d = s["depth"][idx, o, None, None].astype(np.float32)  # (T, 1, 1)
            r = 3.2 / d  # apparent radius shrinks with distance (depth is visible); 0.23-0.9 of the frame: every
            # object spans several patches of a 4 x 4 grid, or patch-level heads could not see it (present mIoU 45)
            dy = s["ys"] - pos[:, o, 0, None, None]  # (T, H, W)
            dx = s["xs"] - pos[:, o, 1, None, None]
            if c == 1:  # circle
                inside = dy**2 + dx**2 < r**2
            elif c == 2:  # square
                inside = np.maximum(np.abs(dy), np.abs(dx)) < 0.8 * r
            else:  # triangle pointing up
                inside = (dy < 0.5 * r) & (dy > -r + np.sqrt(3) * np.abs(dx))
            inside &= d < depth  # z-buffer: the nearest surface wins
            index[inside] = hw + o
            depth = np.where(inside, d, depth)
        classes = np.concatenate([np.zeros(hw, np.uint8), s["cls"].astype(np.uint8)])
        return np.take(s["palette"], index, axis=0), np.take(classes, index), depth

    def read(self, i, idx):
        return self._render(i, list(idx))[0]  # (T, H, W, 3) uint8

    def labels(self, i, idx):
        """Per-pixel class (T, H, W) uint8 in 0..NUM_CLASSES-1 and depth (T, H, W) float32 in metres."""
        _, classes, depth = self._render(i, list(idx))
        return classes, depth


# -----------------------------------------------------------------------------
# real videos: video files decoded with PyAV, or folders of frames


def _stem_seconds(name):
    """'12.480.jpg' -> 12.48; None when the stem is not a decimal number (plain '000123' counts as a frame number)."""
    stem = os.path.splitext(name)[0]
    try:
        return float(stem) if "." in stem else None
    except ValueError:
        return None


def _probe(path):
    """(number of frames, frame rate) from the metadata, without decoding (a `prepare` copy: the original's)."""
    with av.open(path) as container:
        tag = container.metadata.get("comment", "").split()
        if tag[:1] == [PREPARED]:
            return int(tag[1]), float(tag[2])
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate)
        n = stream.frames
        if not n:  # webm / mkv store no frame count: derive it from the duration
            seconds = stream.duration * stream.time_base if stream.duration else container.duration / av.time_base
            n = round(float(seconds) * rate)
    if n <= 0 or rate <= 0:
        raise ValueError(f"no frames in {path}")
    return n, rate


class VideoFolder:
    """Every video file under `root`, and every folder of images (one folder = one video, frames sorted by name).
    Frame folders take their frame times from file names in seconds ('12.480.jpg') or else from `fps`.
    Video files whose metadata cannot be read are left out, and counted, at start-up."""

    def __init__(self, root, fps=None):
        if os.path.isfile(root):  # one video file (eval.py --video)
            self.videos = [(root, _probe(root))]
            return
        if not os.path.isdir(root):
            raise FileNotFoundError(f"video root {root!r} does not exist (or is not a folder)")
        self.videos, unreadable = [], []  # (frame paths, times) per frame folder, (path, (frames, rate)) per file
        for folder, subfolders, files in os.walk(root, followlinks=True):
            subfolders.sort()  # walk in a fixed order so video i is the same on every rank
            images = sorted(f for f in files if f.lower().endswith(IMAGE_EXTS))
            if images:
                self.videos.append(self._frame_folder(folder, images, fps))
            for f in sorted(f for f in files if f.lower().endswith(VIDEO_EXTS)):
                path = os.path.join(folder, f)
                try:
                    n, rate = _probe(path)
                except Exception:
                    unreadable.append(path)
                    continue
                self.videos.append((path, (n, rate)))  # not times: a big corpus would hold them all in memory
        if unreadable:
            print(f"warning: skipped {len(unreadable)} unreadable videos: {', '.join(unreadable[:5])}")
        if not self.videos:
            raise FileNotFoundError(
                f"no usable video under {root!r}: expected video files ({' '.join(VIDEO_EXTS)}) or folders of "
                f"frames ({' '.join(IMAGE_EXTS)}, named by time in seconds like '12.480.jpg', or by order with --fps)")

    @staticmethod
    def _frame_folder(folder, images, fps):
        seconds = [_stem_seconds(f) for f in images]
        if None not in seconds:
            order = np.argsort(seconds, kind="stable")
            return [os.path.join(folder, images[k]) for k in order], np.array(seconds)[order]
        if fps is None:
            raise ValueError(f"frames in {folder!r} are not named by time in seconds (e.g. '12.480.jpg'): "
                             "give their frame rate with --fps")
        return [os.path.join(folder, f) for f in images], np.arange(len(images)) / fps

    def __len__(self):
        return len(self.videos)

    def frame_times(self, i):
        source, info = self.videos[i]
        return info if isinstance(source, list) else np.arange(info[0]) / info[1]  # (F,) seconds

    def read(self, i, idx):
        source, info = self.videos[i]
        idx = list(idx)
        if isinstance(source, list):
            return np.stack([np.asarray(Image.open(source[k]).convert("RGB")) for k in idx])
        want, frames = set(idx), {}
        # skip_frame=all: opening decodes nothing (probing H.264 decodes up to 7 frames, 13 ms at 720p)
        with av.open(source, options={"skip_frame": "all"}) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # threads add latency; one process per core is faster
            tb, t0, rate = float(stream.time_base), stream.start_time or 0, info[1]
            # seek to the key frame at or before the first wanted frame, then decode forward, skipping the frames
            # that no other frame refers to unless wanted (half the frames of H.264 with B-frames)
            container.seek(t0 + int(min(idx) / rate / tb), stream=stream)
            for packet in container.demux(stream):
                wanted = packet.pts is None or round((packet.pts - t0) * tb * rate) in want  # None: the last packet
                stream.codec_context.skip_frame = "DEFAULT" if wanted else "NONREF"
                for frame in packet.decode():
                    k = round((frame.pts - t0) * tb * rate)
                    if k in want:
                        frames[k] = frame.to_ndarray(format="rgb24")
                if len(frames) == len(want):
                    break
        if len(frames) < len(want):
            raise RuntimeError(f"could not decode frames {sorted(want - set(frames))} of {source}")
        return np.stack([frames[k] for k in idx])  # (T, H, W, 3) uint8


def prepare(src, dst, short_side=288, workers=1):
    """Copy the video files under `src` to the same paths under `dst` (as .mp4), made for random access: H.264 at
    short side `short_side`, a key frame every 16 frames, and 3 B-frames between references that nothing refers
    to (read skips them). Frame k stays frame k, with the original's frame count and rate, so that ClipDataset cuts
    the same clips: the same frames, times and (RandomResizedCrop being relative to the frame) crop distribution."""
    jobs = [(path, os.path.join(dst, os.path.splitext(os.path.relpath(path, src))[0] + ".mp4"), info, short_side)
            for path, info in VideoFolder(src).videos if not isinstance(path, list)]  # frame folders are left out
    with multiprocessing.Pool(workers) as pool:
        for n, out in enumerate(pool.imap_unordered(_prepare_one, jobs)):
            print(f"{n + 1}/{len(jobs)} {out}", flush=True)


def _prepare_one(job):
    path, out, (n, rate), short_side = job
    if os.path.exists(out):  # copied by an earlier run
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with av.open(path) as src, av.open(out + ".tmp", "w", format="mp4") as dst:
        stream = src.streams.video[0]
        scale, fps = short_side / min(stream.height, stream.width), stream.average_rate or stream.guessed_rate
        copy = dst.add_stream("libx264", fps, width=2 * round(stream.width * scale / 2), pix_fmt="yuv420p",
                              height=2 * round(stream.height * scale / 2), gop_size=16, options=dict(
                                  sc_threshold="0", bf="3", tune="fastdecode", preset="veryfast", crf="20", threads="1",
                                  **{"x264-params": "b-pyramid=none:b-adapt=0"}))
        dst.metadata["comment"], last = f"{PREPARED} {n} {rate!r}", -1
        for frame in src.decode(stream):
            k = round((frame.pts - (stream.start_time or 0)) * float(stream.time_base) * rate)
            if k > last:  # frame k of the original is frame k of the copy
                frame = frame.reformat(copy.width, copy.height, "yuv420p", interpolation="AREA")
                frame.pts, frame.time_base, last = k, 1 / fps, k
                dst.mux(copy.encode(frame))
        dst.mux(copy.encode())
    os.replace(out + ".tmp", out)
    return out


def open_source(root, split="train", fps=None, seed=0):
    """'synthetic' -> the built-in videos of that split; anything else is a folder of real videos."""
    return SyntheticVideos(split, seed) if root == "synthetic" else VideoFolder(root, fps)


# -----------------------------------------------------------------------------
# training clips


def _crop_box(rng, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params with a given rng: (top, left, h, w)."""
    area, log_ratio = height * width, np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w, h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    # fall back to the largest centre crop within the ratio range
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ClipDataset:
    """Training clips. Sample j of step s is a pure function of (seed, s, j)."""

    def __init__(self, source, num_frames=2, size=256, stride=(1 / 25, 1 / 3), scale=(0.6, 1.0),
                 ratio=(3 / 4, 4 / 3), seed=0):
        self.source, self.num_frames, self.size, self.seed = source, num_frames, size, seed
        self.stride, self.scale, self.ratio = stride, scale, ratio  # appendix A: crop scale 0.6-1, ratio 3:4-4:3

    def _frame_indices(self, rng, times):
        """Indices of a clip with gaps uniform in `stride` seconds, snapped to the video's frames; None if too short."""
        offsets = np.concatenate([[0.0], np.cumsum(rng.uniform(*self.stride, self.num_frames - 1))])  # (T,)
        starts = np.flatnonzero(times <= times[-1] - offsets[-1])
        if len(starts) == 0:
            return None
        target = times[rng.choice(starts)] + offsets
        idx = np.searchsorted(times, target).clip(1, len(times) - 1)
        idx -= target - times[idx - 1] < times[idx] - target  # nearest frame
        for t in range(1, len(idx)):  # a gap shorter than the frame interval still moves on by one frame
            idx[t] = max(idx[t], idx[t - 1] + 1)
        return idx.tolist() if idx[-1] < len(times) else None

    def sample(self, step, j):
        """Clip j of `step`: frames (T, 3, S, S) uint8, times (T,) float32 seconds from the first frame, and the
        number of broken videos skipped on the way."""
        skipped = 0
        for attempt in range(1000):
            rng = np.random.default_rng([self.seed, step, j, attempt])
            i = int(rng.integers(len(self.source)))
            times = self.source.frame_times(i)
            idx = self._frame_indices(rng, times)
            if idx is None:  # too short for this clip: draw another video
                continue
            try:
                frames = self.source.read(i, idx)  # (T, H, W, 3)
            except Exception:
                skipped += 1
                continue
            top, left, h, w = _crop_box(rng, frames.shape[1], frames.shape[2], self.scale, self.ratio)
            # one crop for the whole clip, resized to a square (a small aspect distortion, appendix A); resizing the
            # uint8 frames directly is 6x faster than through float
            crop = torch.from_numpy(frames[:, top:top + h, left:left + w]).permute(0, 3, 1, 2)
            crop = F.interpolate(crop, (self.size, self.size), mode="bilinear", antialias=True)
            clip_times = torch.tensor(times[idx] - times[idx[0]], dtype=torch.float32)
            return crop, clip_times, skipped
        raise RuntimeError(f"no readable video long enough for {self.num_frames} frames at stride {self.stride} s "
                           f"after 1000 draws ({skipped} broken)")


class _MicroBatches(torch.utils.data.Dataset):
    """Item n is micro-batch n of this rank, counted from `start_step`: a pure function of n, so workers can
    compute items in any order and the DataLoader still yields them in order."""

    def __init__(self, dataset, batch_size, rank, world_size, accum, start_step):
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.accum, self.start_step = accum, start_step

    def __getitem__(self, n):
        step, m = self.start_step + n // self.accum, n % self.accum
        first = (m * self.world_size + self.rank) * self.batch_size
        frames, times, skipped = zip(*(self.dataset.sample(step, j) for j in range(first, first + self.batch_size)))
        return {"frames": torch.stack(frames), "times": torch.stack(times), "skipped": sum(skipped), "step": step}


def make_loader(dataset, batch_size, rank=0, world_size=1, accum=1, start_step=0, num_workers=2):
    """Infinite iterator of micro-batches: for each step from `start_step`, `accum` dicts with "frames"
    (B, T, 3, S, S) uint8, "times" (B, T) float32, "skipped" (broken videos skipped) and "step". Micro-batch m of
    rank r holds clips j = (m * world_size + r) * batch_size + b, so one process at batch 2B equals two at B."""
    micro = _MicroBatches(dataset, batch_size, rank, world_size, accum, start_step)
    # batch_size=None: each item already is a micro-batch; an endless sequential sampler keeps the order fixed
    loader = torch.utils.data.DataLoader(micro, batch_size=None, sampler=itertools.count(), num_workers=num_workers)
    return iter(loader)


# =============================================================================
# Evaluation datasets (SPEC section 5, appendix B): 7-frame sequences that end at a labelled frame.
# Every dataset has len() and item(i) -> dict(frames uint8 (7, H, W, 3), times float (7,) seconds from the first
# frame, name str, and either classes uint8 (H, W) with 255 = ignore, or depth float32 (H, W) metres + valid
# bool (H, W)); `labelled(i)` -> (frame (H, W, 3), label dict) reads only the labelled frame (for head training).

SEQ_LEN = 7
IGNORE = 255
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
KITTI_CROP = (352, 1216)                                         # Eigen crop: bottom rows, centred columns
GARG = (0.40810811, 0.99189189, 0.03594771, 0.96405229)          # rows, then columns, as fractions of the crop
DEPTH_RANGE = (1e-3, 80.0)                                       # metres (appendix A)


def _need(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path} is missing")
    return path


def _read(path, mode=None):
    """An image file as an array (converted to `mode`, e.g. "RGB"); an unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode) if mode else img)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise UserError(f"cannot read the image {path} ({type(e).__name__}: {e}): replace or remove it") from None


def _image(path):
    return _read(path, "RGB")


class _Sequences:
    task = "seg"

    def __len__(self):
        return len(self.items)

    def item(self, i):
        frames, times, label_path, name = self.items[i]
        label = self._label(label_path)
        return dict(frames=np.stack([_image(f) for f in frames]), times=np.asarray(times, np.float64), name=name,
                    **label)

    def labelled(self, i):
        frames, _, label_path, _ = self.items[i]
        return _image(frames[-1]), self._label(label_path)


class VSPWSequences(_Sequences):
    """VSPW: <root>/<split>.txt lists videos; frames data/<video>/origin/*.jpg, labels data/<video>/mask/<stem>.png.
    Labelled frames are every 20th (indices 19, 39, ...); 15 fps, stride 3 frames (0.2 s); class = value - 1."""

    num_classes, fps, stride = 124, 15.0, 3

    def __init__(self, root, split="val"):
        listing = _need(os.path.join(root, f"{split}.txt"), f"VSPW root {root!r} needs the video list {split}.txt")
        videos = [v.strip() for v in open(listing) if v.strip()]
        self.items = []
        for v in videos:
            folder = _need(os.path.join(root, "data", v, "origin"), f"VSPW video {v} listed in {split}.txt")
            frames = sorted(f for f in os.listdir(folder)  # the official download has macOS ._* files beside them
                            if f.lower().endswith(IMAGE_EXTS) and not f.startswith("._"))
            for k in range(19, len(frames), 20):
                idx = range(k - (SEQ_LEN - 1) * self.stride, k + 1, self.stride)  # first index k - 18 >= 0
                stem = os.path.splitext(frames[k])[0]
                label = _need(os.path.join(root, "data", v, "mask", stem + ".png"), f"VSPW label of {v}/{frames[k]}")
                self.items.append(([os.path.join(folder, frames[j]) for j in idx],
                                   [(j - idx[0]) / self.fps for j in idx], label, f"{v}/{stem}"))
        if not self.items:
            raise FileNotFoundError(f"no VSPW sequence under {root!r}: videos need >= 20 frames in data/<video>/origin")

    def _label(self, path):
        c = _read(path).astype(np.int64) - 1
        return dict(classes=np.where((c >= 0) & (c < self.num_classes), c, IGNORE).astype(np.uint8))


class CityscapesSequences(_Sequences):
    """Cityscapes: labels gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png, frames
    leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png; stride 3 frames at 16 fps
    (0.1875 s, as the release counts); labelIds -> the 19 train ids, everything else 255."""

    num_classes, fps, stride = 19, 16.0, 3

    def __init__(self, root, split="val"):
        labels = _need(os.path.join(root, "gtFine", split), f"Cityscapes root {root!r} needs gtFine/{split}")
        frames = _need(os.path.join(root, "leftImg8bit_sequence", split),
                       f"Cityscapes root {root!r} needs leftImg8bit_sequence/{split}")
        self.items = []
        for city in sorted(os.listdir(labels)):
            for f in sorted(os.listdir(os.path.join(labels, city))):
                if not f.endswith("_gtFine_labelIds.png"):
                    continue
                _, seq, frame = f[:-len("_gtFine_labelIds.png")].rsplit("_", 2)
                k = int(frame)
                idx = range(k - (SEQ_LEN - 1) * self.stride, k + 1, self.stride)
                paths = [_need(os.path.join(frames, city, f"{city}_{seq}_{j:06d}_leftImg8bit.png"),
                               f"Cityscapes sequence frame of {f}") for j in idx]
                self.items.append((paths, [(j - idx[0]) / self.fps for j in idx], os.path.join(labels, city, f),
                                   f"{city}_{seq}_{frame}"))
        if not self.items:
            raise FileNotFoundError(f"no *_gtFine_labelIds.png under {labels!r}")
        self.lut = np.full(256, IGNORE, np.uint8)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            self.lut[label_id] = train_id

    def _label(self, path):
        return dict(classes=self.lut[_read(path)])


def kitti_crop(x):
    """The Eigen crop: bottom 352 rows, centred 1216 columns of (H, W, ...)."""
    h, w = x.shape[:2]
    top, left = h - KITTI_CROP[0], (w - KITTI_CROP[1]) // 2
    if top < 0 or left < 0:
        raise ValueError(f"KITTI frame {h}x{w} is smaller than the {KITTI_CROP[0]}x{KITTI_CROP[1]} Eigen crop")
    return x[top:top + KITTI_CROP[0], left:left + KITTI_CROP[1]]


def garg_mask(h, w):
    r0, r1, c0, c1 = GARG
    mask = np.zeros((h, w), bool)
    mask[int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)] = True
    return mask


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
            raise UserError(f"{split_file} line {n + 1}: expected '<date>/<drive>/image_02/data/<idx>.png', "
                            f"got {parts[0]!r}")
        k = int(os.path.splitext(image[4])[0])
        if k >= KITTI_MIN_TARGET:
            out.append((parts[0], image[0], image[1], k, parts[1] if len(parts) > 1 else None))
    return out


class KITTISequences(_Sequences):
    """KITTI depth on an Eigen-format list (kitti_targets). Frames from the raw drives, <raw_root>/<date>/<drive>/
    image_02/data/<idx:010d>.png (default raw_root: root itself, the raw drives and data_depth_annotated unzipped
    into one folder as the release's README says); ground truth <root>/[{train,val}/]<depth path> (uint16 / 256 m,
    0 = none), looked up by drive and index when a line has no depth path. 10 fps, stride 2 frames (0.2 s).
    Frames and depth are cut to the 352x1216 Eigen crop; valid = Garg region and 1e-3 < d < 80."""

    task, fps, stride = "depth", 10.0, 2

    def __init__(self, root, split_file, raw_root=None):
        _need(root, "KITTI root")
        raw_root = raw_root or root
        self.items = []
        for line, date, drive, k, depth in kitti_targets(split_file):
            rel = os.path.join(drive, "proj_depth", "groundtruth", "image_02", f"{k:010d}.png")
            tries = [p for d in [depth or rel] for p in (d, os.path.join("train", d), os.path.join("val", d))]
            gt = next((os.path.join(root, t) for t in tries if os.path.exists(os.path.join(root, t))), None)
            if gt is None:
                raise UserError(f"KITTI ground truth for {line} is missing: looked for "
                                f"{', '.join(os.path.join(root, t) for t in tries)}")
            idx = range(k - (SEQ_LEN - 1) * self.stride, k + 1, self.stride)
            paths = [_need(os.path.join(raw_root, date, drive, "image_02", "data", f"{j:010d}.png"),
                           f"KITTI raw frame for {line} (raw drives under --kitti-raw, default the root)") for j in idx]
            self.items.append((paths, [(j - idx[0]) / self.fps for j in idx], gt, f"{drive}/{k:010d}"))
        if not self.items:
            raise FileNotFoundError(f"no usable KITTI sequence in {split_file}")

    def item(self, i):
        out = super().item(i)
        out["frames"] = np.stack([kitti_crop(f) for f in out["frames"]])
        return out

    def labelled(self, i):
        frame, label = super().labelled(i)
        return kitti_crop(frame), label

    def _label(self, path):
        depth = kitti_crop(_read(path).astype(np.float32) / 256)
        valid = garg_mask(*depth.shape) & (depth > DEPTH_RANGE[0]) & (depth < DEPTH_RANGE[1])
        return dict(depth=depth, valid=valid)


class SyntheticSequences:
    """The synthetic source's sequences: 7 frames at 0.2 s (3 frames at 15 fps) ending at a labelled frame (every
    synthetic frame has labels); non-overlapping, `per_video` per video. Both tasks: classes and depth."""

    task, stride = "both", 3

    def __init__(self, split="val", seed=0, num_videos=None, size=128, per_video=5):
        self.source = SyntheticVideos(split, seed, num_videos, size)
        self.num_classes = SyntheticVideos.NUM_CLASSES
        span = (SEQ_LEN - 1) * self.stride + 1
        ends = range(span - 1, len(self.source.frame_times(0)), span + 2)[:per_video]
        self.items = [(i, k) for i in range(len(self.source)) for k in ends]

    def __len__(self):
        return len(self.items)

    def item(self, i):
        v, k = self.items[i]
        idx = list(range(k - (SEQ_LEN - 1) * self.stride, k + 1, self.stride))
        classes, depth = self.source.labels(v, [k])
        times = self.source.frame_times(v)[idx]
        return dict(frames=self.source.read(v, idx), times=times - times[0], name=f"{self.source.split}{v}/{k}",
                    classes=classes[0], depth=depth[0], valid=np.ones_like(depth[0], bool))

    def labelled(self, i):
        v, k = self.items[i]
        classes, depth = self.source.labels(v, [k])
        return self.source.read(v, [k])[0], dict(classes=classes[0], depth=depth[0], valid=np.ones_like(depth[0], bool))


def open_eval(spec, split="val", kitti_split=None, kitti_raw=None, seed=0):
    """'synthetic', 'vspw:ROOT', 'cityscapes:ROOT' or 'kitti:ROOT' -> the sequences of that split."""
    name, _, root = spec.partition(":")
    if name == "synthetic":
        return SyntheticSequences(split, seed)
    if not root:
        raise ValueError(f"dataset {spec!r}: give it as NAME:ROOT (vspw, cityscapes, kitti) or 'synthetic'")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{name} root {root!r} does not exist (or is not a folder)")
    if name == "vspw":
        return VSPWSequences(root, split)
    if name == "cityscapes":
        return CityscapesSequences(root, split)
    if name == "kitti":
        if not kitti_split and split != "val":  # the default list is the test split: never train on it silently
            raise UserError("KITTI training needs a list of training frames (Eigen format): pass --kitti-split FILE")
        return KITTISequences(root, kitti_split or KITTI_EIGEN_TEST, kitti_raw)
    raise ValueError(f"unknown dataset {name!r}: one of synthetic, vspw, cityscapes, kitti")


# -----------------------------------------------------------------------------
# command line: prepare real videos for training, or measure how fast clips are read


def main(args):
    if args.prepare:
        return prepare(*args.prepare, args.short_side, args.workers)
    loader = make_loader(ClipDataset(VideoFolder(args.bench), args.num_frames), 8, num_workers=args.workers)
    next(loader)  # workers started
    start, clips = time.perf_counter(), 0
    while time.perf_counter() < start + 20:
        clips += len(next(loader)["frames"])
    total = clips / (time.perf_counter() - start)
    print(f"{total:.1f} clips/s, {total / max(args.workers, 1):.1f} per worker ({args.num_frames}-frame clips, 256 px)")


def get_parser():
    parser = argparse.ArgumentParser(description="Copy real videos for fast reading, or measure reading speed.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--bench", metavar="DIR", help="read clips from the videos under DIR for 20 s as training does "
                      "(make_loader, 8 clips a batch)")
    mode.add_argument("--prepare", nargs=2, metavar=("SRC", "DST"), help="copy for fast random access; train on DST")
    parser.add_argument("--workers", type=int, default=1, help="processes, each with one thread")
    parser.add_argument("--short-side", type=int, default=288, help="--prepare: height of a landscape copy")
    parser.add_argument("--num-frames", type=int, default=2, help="--bench: frames per clip")
    return parser


if __name__ == "__main__":
    cli(main, get_parser())
