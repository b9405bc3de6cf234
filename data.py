"""
Video data for every stage, and the command line every script shares.

Sources (`len(source)`, `source.frame_times(i)`, `source.read(i, idx)`): `SyntheticVideos`, moving shapes with class
and depth labels, no download (`--data synthetic`, every script's default), and `VideoFolder`, real video files or
frame folders under a folder or in a list, indexed. `ClipDataset.sample(step, j)`: clip j of a step, a pure function
of (seed, step, j); `make_loader`: a resumable stream, step s clips 0 .. global_batch - 1 on any ranks and workers.

    python data.py --prepare /data/videos /data/videos288 --workers 16  # once: copies made for random access
    python data.py --bench /data/videos288 --workers 4                   # clips/s of the training loader
    python data.py --bench-table runs/bench/bench.jsonl BENCHMARKS.md    # make bench-gpu's rows into the table
"""

import argparse
import contextlib
import fcntl
import functools
import gc
import importlib.util
import itertools
import json
import multiprocessing
import os
import re
import resource
import signal
import sys
import threading
import time
import traceback

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

# -----------------------------------------------------------------------------
# the command line

class UserError(Exception):
    """A mistake in the user's input (a flag, a path, a file): one line on stderr and exit status 2, no traceback."""


def cli(main, parser):
    """Run main(args): a UserError or bad flag is `<prog>: error: <message>` and exit 2; a bug keeps its traceback."""
    parser.print_usage = lambda file=None: None
    try:
        args = parser.parse_args()
        if getattr(args, "wandb", None) and not importlib.util.find_spec("wandb"):  # before anything is written
            raise UserError("--wandb needs the wandb package: pip install wandb")
        return main(args)
    except UserError as e:  # from a DataLoader worker, the message ends with the worker's "data.UserError: ..."
        message = str(e).strip().splitlines()[-1].split("UserError: ")[-1]
        e.__traceback__ = None  # the run's frames go now (in gc.collect, a DataLoader whose worker raised waits 5 s)
    except (KeyboardInterrupt, SystemExit) as e:  # a Ctrl-C before a stage catches signals, a second one (tokenizer.
        sys.stdout.flush()  # catch_signals), or an exit (a stage's stop): a Ctrl-C while the loaders' workers end
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # then exits at once (in their __del__ it is "ignored")
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else e.code)
    if torch.distributed.is_initialized():  # the other ranks stop naming it (fail_together)
        torch.distributed.distributed_c10d._get_default_store().set("failed", f"rank {torch.distributed.get_rank()} "
                                                                              f"failed with {message}")
    if tqdm._instances:  # progress bars close (and end their line) now, not after the message (a collection: 0.2 s)
        gc.collect()
    sys.stderr.write(f"{parser.prog}: error: {message}\n")
    sys.exit(2)


def fail_together(kind, e, tb):
    """sys.excepthook of a rank (tokenizer.setup_dist): its error (or its loader worker's) goes to the group's store;
    the others, whose collectives then fail, name it in one line. A rank killed silently: the survivors name it."""
    rank, world, stderr = torch.distributed.get_rank(), torch.distributed.get_world_size(), os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # (a store gone with its host logs a C++ backtrace at each call)
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        if not store.check(["failed"]) and "gloo" in str(e):  # a collective failed, and no rank said why: the
            store.set(f"alive{rank}", "")  # survivors mark the store, the lost do not. This rank's connections close
            traceback.clear_frames(tb)  # now (the failed collective's frames hold them), so that the ranks waiting
            torch.distributed.destroy_process_group()  # on them fail and mark too, and rank 0 (the store's host
            time.sleep(1 + (rank == 0))  # under env://) stays until all have read
            if lost := [str(r) for r in range(world) if not store.check([f"alive{r}"])]:
                store.set("failed", f"rank {', '.join(lost)} is gone without a word (killed: out of memory?)")
        if first := not store.check(["failed"]):  # (else another rank failed first: this error follows from it)
            store.set("failed", f"rank {rank} failed with " + f"{kind.__name__}: {e}".strip().splitlines()[-1])
        message = store.get("failed").decode()
    except torch.distributed.DistError:  # the store went with rank 0, its host (torchrun's survives)
        first, message = False, "rank 0 is gone, and the group's store with it (killed: out of memory?)"
    finally:
        os.dup2(stderr, 2)
    if first:
        return sys.__excepthook__(kind, e, tb)
    print(f"{os.path.basename(sys.argv[0])}: error: stopping: {message}", file=sys.stderr)


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each default once (a help text that says its default keeps its own words), and no empty one."""
    def _format_action(self, a):  # (a flag without help text too: argparse shows no line of help for it)
        if a.default not in (None, "", [], argparse.SUPPRESS) and "default" not in (a.help or ""):
            a.help = f"{a.help or ''} (default: %(default)s)".lstrip()
        return super()._format_action(a)


def hub_id(path):
    """Whether a checkpoint flag names a Hugging Face repo 'org/name' (and no local file) to fetch."""
    return not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.endswith((".pt", ".bin"))


def check_paths(read, out=None, write=()):
    """Before anything is built: each (flag, path) of `read` readable, a folder or file as its flag wants ('synthetic',
    hub ids pass); `out` and each (flag, folder or "") of `write` a writable folder or makeable; out not in one read."""
    dest = os.path.realpath(out[1]) if out else ""
    folders, either = ("--kitti-raw", "--cache-tokens"), ("--data", "--val-data", "--bench", "SRC", "--video")
    for flag, path in read:
        if not path or path == "synthetic" or hub_id(path) or (flag, path) in write and not os.path.exists(path):
            continue  # (a folder both read and written, the token cache, may not exist yet)
        if not os.access(path, os.R_OK):
            raise UserError(f"{flag} {path} does not exist (or cannot be read): check the path")
        if (isdir := os.path.isdir(path)) != (flag in folders) and flag not in either:  # any other flag: a file
            raise UserError(f"{flag} {path} is a {('file', 'folder')[isdir]}: give a {('folder', 'file')[isdir]}")
        folder = os.path.realpath(path if isdir else os.path.dirname(os.path.abspath(path)))
        if dest == folder or isdir and dest.startswith(folder + os.sep):
            raise UserError(f"{out[0]} {out[1]} is {'inside ' * (dest != folder)}the folder of {flag} {path}: it would "
                            f"write over what it reads; give another {out[0]}")
    for flag, path in [w for w in (out, *write) if w and w[1]]:
        parent = path
        while not os.path.lexists(parent):  # (a link to nothing is no folder to make)
            parent = os.path.dirname(os.path.abspath(parent))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path} must be a folder you can write, and {parent} is " + ("not writable" if
                            os.path.isdir(parent) else "a file" if os.path.exists(parent) else "a link to nothing"))


def same_path(a, b):
    """Whether two values of a flag are equal or name one file or folder (./videos, videos/, a link; vspw:ROOT)."""
    with contextlib.suppress(TypeError, OSError):  # not strings, or no such files
        (x, p), (y, q) = (s.split(":", 1) if ":" in s and not os.path.exists(s) else ("", s) for s in (a, b))
        return a == b or x == y and os.path.samefile(p, q)
    return a == b


def at_least(low, multiple=1):
    """An argparse type: an int >= low and a multiple of `multiple`, checked before anything is built."""
    def parse(text):
        if not int(text) >= low or int(text) % multiple:
            want = f"a multiple of {multiple}" if multiple > 1 else "an integer"
            raise argparse.ArgumentTypeError(f"{text}: want {want} >= {low}")
        return int(text)
    parse.__name__ = "int"
    return parse


def positive(text):
    """An argparse type: a float > 0."""
    if not float(text) > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return float(text)


def frame_size(text):
    """An argparse type: "S" (square) or "HxW" pixels -> (H, W), multiples of a patch size (16, or DINOv2's 14)."""
    size = tuple(int(v) if v.isdigit() else 0 for v in text.split("x"))
    if len(size) > 2 or any(v < 14 or v % 14 and v % 16 for v in size):
        raise argparse.ArgumentTypeError(f"{text}: want S or HxW pixels, multiples of the VFM's patch size (16 or 14)")
    return size if len(size) == 2 else size * 2


def clip_flags(p):
    """The flags of the training clips, shared by tokenizer.py, predictor.py and baseline_dinoworld.py."""
    p.add_argument("--data", default="synthetic", help="'synthetic', a folder of videos / frame folders, or a list")
    p.add_argument("--index", metavar="DIR", help="folder for the video index (default: beside the videos, or --out)")
    p.add_argument("--trust-index", action="store_true", help="use the index without looking at the files (NFS)")
    p.add_argument("--val-data", default="", help="videos of the held-out check (default: synthetic val, or --data)")
    p.add_argument("--fps", type=positive, default=None, help="frame rate of frame folders without timestamps")
    p.add_argument("--size", type=frame_size, default=(256, 256), help="crop size: S or HxW pixels (Table D: 448x896)")
    p.add_argument("--stride", type=positive, nargs=2, default=[1 / 25, 1 / 3], help="frame-gap range in seconds")


def vfm_flags(p, default, presets):
    """The feature source's flags (tokenizer.VFM), shared by tokenizer.py, heads.py and baseline_dinoworld.py."""
    p.add_argument("--vfm", default=default, help=f"DINOv3/DINOv2 hub id or folder, or a preset {list(presets)}")
    p.add_argument("--vfm-layers", default="", help="concatenate these blocks' outputs, each through the final "
                   "LayerNorm (Table D: 2,5,8,11); default: the last")
    p.add_argument("--pca", default="", help="PCA file that projects the features (tokenizer.py --fit-pca)")


def cpu_workers(most=8):
    """Loader processes per process: the cores it may use over torchrun's LOCAL_WORLD_SIZE, at most `most`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
    return max(1, min(most, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def run_flags(p, workers, eval_every):
    """The flags of a training run that every stage shares."""
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["bf16", "fp32"])
    p.add_argument("--num-workers", type=at_least(0), default=cpu_workers(workers), help="loader processes per GPU")
    p.add_argument("--seed", type=int, default=0)
    for flag, default in (("--log-every", 10), ("--eval-every", eval_every), ("--ckpt-every", 1000)):
        p.add_argument(flag, type=at_least(1), default=default)
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt if it exists")
    p.add_argument("--allow-changes", action="store_true", help="with --resume: go on with flags other than the "
                   "checkpoint's (--lr, --seed, --global-batch, ...); without it, such a resume is refused")
    p.add_argument("--wandb", metavar="[ENTITY/]PROJECT", help="also log to Weights & Biases (pip install wandb; "
                   "WANDB_MODE=offline keeps it on disk); --resume continues its run")


VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts", ".3gp", ".flv",
              ".wmv", ".ogv")  # what PyAV reads: other files in a folder are not probed (lists name any file)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
PREPARED = "deltatok-prepared"  # the comment of a copy made by `prepare`, then the original's frame count and rate
INDEX_FORMAT = 1  # an index file of another format, or of another root, is rebuilt
_wandb = {}  # --wandb (below): wandb.init's arguments, the run once started, the last step it held when it resumed
_WARNED = set()  # the broken videos this process has named (_warn_broken)
_video_folder = functools.lru_cache(maxsize=2)(lambda *a: VideoFolder(*a))  # open_source: reopened --data, read once

# -----------------------------------------------------------------------------
# the record of a run beside its log.jsonl: curves.png; Weights & Biases with --wandb (imported only then, rank 0)

def read_log(path, most=2000):
    """log.jsonl -> {key: [(step, value)]} of every number in it ('eval/h1/best': a check's), read line by line into
    buckets of steps that double in width when a key has more than `most`, each keeping its last point."""
    curves, width = {}, 1
    for line in open(path):
        record = json.loads(line)
        record |= {f"{k}/{j}": x for k, v in record.items() if isinstance(v, dict) for j, x in v.items()}
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                curves.setdefault(k, {})[record["step"] // width] = (record["step"], v)
        if any(len(curves.get(k, ())) > most for k in record):
            curves, width = {k: {b // 2: p for b, p in c.items()} for k, c in curves.items()}, width * 2
    return {k: list(c.values()) for k, c in curves.items()}


def draw_curves(out, stage, heldout, what, size=(1260, 340)):
    """out/curves.png (and to W&B) against step: loss (log scale), lr, and `what`: the metrics matching `heldout`."""
    log, img, font = read_log(os.path.join(out, "log.jsonl")), Image.new("RGB", size, "white"), ImageFont.load_default()
    last, w, pen = max([p[-1][0] for p in log.values()], default=1), size[0] // 3, ImageDraw.Draw(img)
    pen.text((10, 6), f"{stage} training, run folder {out}, step {last}", "black", font)
    panels = {"training loss (log scale)": {"loss": log.get("loss", [])}, "learning rate": {"lr": log.get("lr", [])},
              what: {m[1]: p for k, p in log.items() if (m := re.fullmatch(heldout, k))}}
    for i, (name, series) in enumerate(panels.items()):
        f, g = (float, float) if i else (np.log10, lambda v: 10 ** v)  # the loss on a log scale
        x0, y0, x1, y1 = i * w + 70, 48, (i + 1) * w - 20, size[1] - 80  # the axes
        series = {k: [(s, f(v)) for s, v in p if v > 0 or i] for k, p in series.items()}
        ys = [v for p in series.values() for _, v in p] or [0.0]
        lo, hi = min(ys) - (pad := 0.05 * (max(ys) - min(ys) or abs(ys[0]) or 1)), max(ys) + pad
        xy = lambda s, v: (x0 + (x1 - x0) * s / last, y1 - (y1 - y0) * (v - lo) / (hi - lo))
        pen.text((x0, y0 - 18), name, "black", font)
        pen.text(((x0 + x1) / 2, y1 + 18), "step", "black", font, anchor="ma")
        pen.rectangle((x0, y0, x1, y1), outline="black")
        for t in (0, 0.25, 0.5, 0.75, 1):  # ticks: steps to 2 significant digits, values to 3
            s = int(round(last * t, 2 - len(str(last))))
            pen.text((xy(s, 0)[0], y1 + 4), str(s), "black", font, anchor="ma")
            pen.text((x0 - 4, y1 - (y1 - y0) * t), f"{g(lo + (hi - lo) * t):.3g}", "black", font, anchor="rm")
        for c, (label, p) in enumerate(series.items()):
            colour, x, y = f"hsl({c * 137 % 360}, 75%, 42%)", x0 + (c % 2) * (x1 - x0) / 2, y1 + 34 + 14 * (c // 2)
            pen.line(points := [xy(*q) for q in p], colour, 2)
            for a, b in points if len(p) < 30 else ():  # a marker on each of a few points
                pen.ellipse((a - 2, b - 2, a + 2, b + 2), colour)
            pen.line((x, y + 6, x + 16, y + 6), colour, 2)
            pen.text((x + 20, y), label, "black", font)
    img.save(path := os.path.join(out, "curves.png"))
    wandb_log(dict(step=last, curves=path))


def wandb_start(args, run_id=None, last=-1):
    """--wandb [ENTITY/]PROJECT: a W&B run (from the first record) with the flags as config, or the checkpoint's
    `run_id` continued after the steps it holds, up to `last` (offline: a new file of it). Returns the id or run_id."""
    _wandb.clear()  # not the run of a stage before this one in this process
    if args.wandb:
        entity, _, project = args.wandb.rpartition("/")
        run_id, _wandb["last"] = run_id or os.urandom(4).hex(), last if run_id else -1
        _wandb["init"] = dict(project=project, entity=entity or None, id=run_id, resume="allow", name=args.out,
                              config=dict(vars(args)))
    return run_id


def wandb_log(record):
    """A record to W&B at its step (a .png path: an image, a list of dicts: a table); W&B failing: a warning, no W&B."""
    if "init" in _wandb and record["step"] > _wandb["last"]:
        try:
            import wandb
            if "run" not in _wandb:
                wandb.finish()  # the run of a stage before this one in this process (a run ends with its process)
                _wandb["run"] = wandb.init(**_wandb["init"])
            media = lambda v: wandb.Image(v) if str(v).endswith(".png") else wandb.Table(
                list(v[0]), [[r.get(k) for k in v[0]] for r in v]) if isinstance(v, list) else v
            _wandb["run"].log({k: media(v) for k, v in record.items() if k != "step"}, step=record["step"])
        except Exception as e:
            print(f"warning: Weights & Biases failed ({type(e).__name__}: {e}); going on without it", file=sys.stderr)
            _wandb.clear()


# -----------------------------------------------------------------------------
# synthetic videos: moving shapes that turn at random moments, with class and depth labels

TINTS = np.array([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.4, 0.9]], np.float32)  # circle, square, triangle
SHAPES = {1: lambda dy, dx, r: dy**2 + dx**2 < r**2,  # class -> its pixels at (dy, dx) from the centre: circle,
          2: lambda dy, dx, r: np.maximum(np.abs(dy), np.abs(dx)) < 0.8 * r,  # square,
          3: lambda dy, dx, r: (dy < 0.5 * r) & (dy > -r + np.sqrt(3) * np.abs(dx))}  # triangle pointing up
TURNS = np.deg2rad([0.0, 90.0, -90.0, 180.0])  # keep going, left, right, reverse: the modes of the future
TURN_EVERY = 0.75  # mean seconds between turn events (3 in 4 visibly turn): futures 0.6 s ahead fork


@functools.lru_cache(maxsize=1024)  # every video of both splits (~60 KB each): building a scene costs more than a frame
def _scene(seed, split, i, size, fps, seconds):
    """Everything about synthetic video i, drawn from its own seed: background, and per-frame object states."""
    rng = np.random.default_rng([seed, ("train", "val").index(split), i])  # train and val draw from disjoint seeds
    grid = ((np.arange(size) + 0.5) / size).astype(np.float32)
    ys, xs = grid[:, None], grid  # (H, 1) and (W,): pixel centres in frame units, broadcast to (H, W)
    bg, texture = rng.uniform(0.25, 0.75, 3), np.zeros((size, size), np.float32)
    for _ in range(4):  # random plane waves of small amplitude: a smooth texture around 0
        fy, fx = rng.uniform(-4, 4, 2)  # cycles per frame
        texture += rng.uniform(0.05, 0.15) * np.sin(2 * np.pi * (fy * ys + fx * xs) + rng.uniform(0, 2 * np.pi))
    bg = (bg + texture[..., None]).clip(0, 1)  # (H, W, 3) muted texture
    far, near = rng.uniform(40, 60), rng.uniform(15, 25)
    bg_depth = (far + (near - far) * ys).astype(np.float32)  # (H, 1) ground plane: far at the top, near at the bottom
    t, n = np.arange(round(seconds * fps)) / fps, rng.integers(1, 3)  # (F,) frame times, 1-2 objects
    cls = rng.integers(1, len(TINTS) + 1, n)  # class of each object, 0 is background
    colour = 0.8 * TINTS[cls - 1] + 0.2 * rng.uniform(0, 1, (n, 3))  # class-tinted: classes differ in colour
    pos, vel, depth = np.zeros((len(t), n, 2)), np.zeros((len(t), n, 2)), np.zeros((len(t), n))
    for o in range(n):  # piecewise-constant velocity: constant speed, turning by TURNS at Poisson-distributed moments
        k = int(4 * seconds / TURN_EVERY) + 8  # more events than the video needs; later ones go unused
        starts = np.concatenate([[0.0], np.cumsum(rng.exponential(TURN_EVERY, k))])  # (k+1,)
        heading = rng.uniform(0, 2 * np.pi) + np.concatenate([[0.0], np.cumsum(rng.choice(TURNS, k))])
        v = rng.uniform(0.25, 0.5) * np.stack([np.sin(heading), np.cos(heading)], -1)  # frames/s, (y, x)
        p = rng.uniform(0, 1, 2) + np.concatenate([[[0, 0]], np.cumsum(v[:-1] * np.diff(starts)[:, None], 0)])
        seg = np.searchsorted(starts, t, side="right") - 1
        pos[:, o], vel[:, o] = p[seg] + v[seg] * (t - starts[seg])[:, None], v[seg]  # unfolded: a free walk
        depth[:, o] = rng.uniform(4, 12) * (1 + 0.15 * np.sin(2 * np.pi * (t / rng.uniform(4, 10) + rng.uniform())))
    palette = (np.concatenate([bg.reshape(-1, 3), colour]) * 255 + 0.5).astype(np.uint8)  # (H*W + n, 3)
    return dict(palette=palette, bg_depth=bg_depth, ys=ys, xs=xs, cls=cls, pos=pos, vel=vel, depth=depth)


class SyntheticVideos:
    """Procedural videos: 1-2 shapes over a texture, occluding by depth, at constant speed, at random moments going on,
    turning or reversing (bouncing off the borders): several plausible futures. Frame k: f(seed, split, i, k)."""

    NUM_CLASSES = 4  # background, circle, square, triangle

    def __init__(self, split="train", seed=0, num_videos=None, size=128, fps=15.0, seconds=8.0):
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
        pos = self.trajectory(i)[0][idx].astype(np.float32)  # (T, n, 2)
        hw = self.size ** 2  # indices into a palette (background pixels, one colour per object): cheaper than RGB
        index = np.tile(np.arange(hw, dtype=np.int32).reshape(self.size, -1), (len(idx), 1, 1))  # (T, H, W)
        depth = np.broadcast_to(s["bg_depth"], index.shape)  # (T, H, W)
        for o, c in enumerate(s["cls"]):
            d = s["depth"][idx, o, None, None].astype(np.float32)  # (T, 1, 1)
            r = 3.2 / d  # apparent radius shrinks with distance (depth is visible); 0.23-0.9 of the frame: every
            # object spans several patches of a 4 x 4 grid, or patch-level heads could not see it (present mIoU 45)
            dy, dx = s["ys"] - pos[:, o, 0, None, None], s["xs"] - pos[:, o, 1, None, None]  # (T, H, 1), (T, 1, W)
            inside = SHAPES[c](dy, dx, r) & (d < depth)  # z-buffer: the nearest surface wins
            index[inside] = hw + o
            depth = np.where(inside, d, depth)
        classes = np.concatenate([np.zeros(hw, np.uint8), s["cls"].astype(np.uint8)])
        return np.take(s["palette"], index, axis=0), np.take(classes, index), depth

    def read(self, i, idx):
        return self._render(i, list(idx))[0]  # (T, H, W, 3) uint8

    def labels(self, i, idx):
        """Per-pixel class (T, H, W) uint8 in 0..NUM_CLASSES-1 and depth (T, H, W) float32 in metres."""
        return self._render(i, list(idx))[1:]


# -----------------------------------------------------------------------------
# real videos: video files decoded with PyAV, or folders of frames, found once and kept in an index file

@functools.lru_cache(maxsize=64)  # frame_times, then read, list the same folder
def _frame_folder(folder):
    """(image paths, times in seconds) sorted by the times their names give ('12.480.jpg'), or (paths sorted by name,
    None) when the names are not all times (a plain '000123' counts as a frame number); hidden files are no frames."""
    images = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS) and f[0] != ".")
    if not all("." in (s := os.path.splitext(f)[0]) and s.replace(".", "", 1).isdigit() for f in images):
        return [os.path.join(folder, f) for f in images], None
    images.sort(key=lambda f: float(os.path.splitext(f)[0]))  # stable: equal times keep their order by name
    return [os.path.join(folder, f) for f in images], np.array([float(os.path.splitext(f)[0]) for f in images])


def _probe(path, strict=False):
    """(frames, rate, first frame's time) from the metadata and first packets (a `prepare` copy: the original's count
    and rate); a frame folder: (images, 0 if named by time else -1, 0); unreadable: 0 frames, missing: -1, or strict."""
    try:
        if os.path.isdir(path):
            return len((files := _frame_folder(path))[0]), -1.0 if files[1] is None else 0.0, 0.0
        with av.open(path, options={"skip_frame": "all"}) as container:  # decodes nothing (as read): 4x faster
            if not container.streams.video:
                raise ValueError(f"no video stream in {path}")
            tag, stream = container.metadata.get("comment", "").split(), container.streams.video[0]
            n, rate = (int(tag[1]), float(tag[2])) if tag[:1] == [PREPARED] else (
                stream.frames, float(stream.average_rate or stream.guessed_rate))
            if not n:  # webm / mkv store no frame count: derive it from the duration
                seconds = stream.duration * stream.time_base if stream.duration else container.duration / av.time_base
                n = round(float(seconds) * rate)
            first = min(p.pts for p in itertools.islice(container.demux(stream), 16) if p.pts is not None and
                        not p.is_discard) * float(stream.time_base)  # not start_time (0 in an AVI with B-frames)
        if n <= 0 or rate <= 0:
            raise ValueError(f"no frames in {path}")
        return n, rate, first
    except Exception as e:
        if strict:
            raise UserError(str(e)) from None
        return 0 if os.path.exists(path) else -1, 0.0, 0.0


def _stat(path):
    """(size, mtime) of what `path` leads to; (-1, 0) where that is nothing (a link to nothing, or to itself)."""
    try:  # (not contextlib.suppress: 20% slower, and the walk stats every video)
        return (s := os.stat(path)).st_size, s.st_mtime_ns
    except OSError:
        return -1, 0


def _found(root, rel="", seen=()):
    """(path, size, mtime) of each video file and frame folder under the folder `root` (relative, files first, by name;
    a frame folder: size -1, mtime changes as images come or go; nothing: (-1, 0)), or of each path the list names."""
    if not os.path.isdir(root):  # a list written anywhere: a byte-order mark, CRLF, blank lines, '#' comments
        text = open(root, "rb").read().decode("utf-8-sig", "replace")
        if "\0" in text or "\ufffd" in text:  # an archive, an image: refused before an index or lock goes beside it
            raise UserError(f"{root} is no folder or text list of videos (UTF-8, one path a line): check it")
        paths = [p for p in map(str.strip, text.splitlines()) if p and p[0] != "#"]
        return [(p, *_stat(os.path.join(os.path.dirname(root), p))) for p in paths]
    here, found, seen = os.path.join(root, rel), [], seen or (os.path.realpath(root),)
    try:  # hidden entries are no videos (macOS '._*' files beside them, '.git'); a link: by what it leads to
        entries = sorted((os.path.isdir(e) if e.is_symlink() else e.is_dir(), e.name, e) for e in os.scandir(here)
                         if e.name[0] != ".")
    except OSError:  # a folder that cannot be listed: named unreadable, as a video would be
        return [(rel[:-1], -1, 0)]
    for folder, name, e in entries:  # seen: the real folders down to here, which a link back to would loop
        if folder and (real := os.path.realpath(e) if e.is_symlink() else os.path.join(seen[-1], name)) not in seen:
            found += _found(root, rel + name + "/", seen + (real,))
        elif not folder and name.lower().endswith(VIDEO_EXTS):
            found.append((rel + name, *_stat(e)))
    return [(rel[:-1], -1, _stat(here)[1])] * any(n.lower().endswith(IMAGE_EXTS) for _, n, _ in entries) + found


def _pack(paths):  # one flat buffer, each path ended by a 0 byte: no Python object per video
    return np.frombuffer("".join(p + "\0" for p in paths).encode(errors="surrogateescape"), np.uint8)


def _unpack(buffer):
    return buffer.tobytes().decode(errors="surrogateescape").split("\0")[:-1]


def _index(root, file, trust=False, check=lambda paths, info: None):
    """The paths (a list) and `_probe`'s info of each video of `root`, from the index `file` updated by (size, mtime):
    new or changed probed on all cores, removed dropped; trust: as saved, unchecked. check(paths, info) may refuse."""
    lock = None
    try:
        for locked in (False, True):  # all processes (ranks, runs) look at once; one at a time probes and writes
            old = {}  # an index of another format or tree, cut short or missing is rebuilt
            with contextlib.suppress(Exception), np.load(file) as saved:
                old = dict(saved) if saved["format"] == INDEX_FORMAT and saved["root"] == root else {}
            if old and trust:
                check(paths := _unpack(old["paths"]), old["info"])
                return paths, old["info"]
            found = found if locked else _found(root)  # [(path, size, mtime)]
            known = dict(zip(zip(_unpack(old["paths"]), *old["stat"].T.tolist()), old["info"].tolist())) if old else {}
            info = [known.get(f) for f in found]
            todo = [k for k, row in enumerate(info) if row is None]  # new or changed
            stale = not old or todo or len(known) > len(found)  # (or removed)
            if locked or not stale:
                break
            try:  # its holder removes the lock when done: a waiter that wakes holding a removed one tries again
                os.makedirs(os.path.dirname(file), exist_ok=True)
                while not lock:
                    fcntl.flock(f := open(file + ".lock", "a"), fcntl.LOCK_EX)
                    lock = os.fstat(f.fileno()).st_nlink and f  # (no one renames a lock: linked is still there)
            except OSError as e:
                raise UserError(f"cannot write {file}, the index of {root} ({e.strerror}): give --index DIR")
        if todo:  # the others wait: when their turn comes, the index is up to date
            folder = root if os.path.isdir(root) else os.path.dirname(root)
            with multiprocessing.Pool(min(len(todo), os.cpu_count())) as pool:
                probed = pool.imap(_probe, [os.path.join(folder, found[k][0]) for k in todo], chunksize=4)
                for row, k in zip(tqdm(probed, f"indexing {root}", len(todo), unit="video", disable=None), todo):
                    info[k] = row  # (the bar first: it closes at the end; disable=None: only on a terminal)
        check([f[0] for f in found], info)
        if stale:
            with open(file + ".tmp", "wb") as tmp:  # write, then rename: a reader never sees half an index
                np.savez(tmp, format=INDEX_FORMAT, root=root, paths=_pack(f[0] for f in found),
                         stat=np.array([f[1:] for f in found], np.int64), info=np.array(info))
            os.replace(file + ".tmp", file)
        return [f[0] for f in found], np.array(info)
    finally:
        if lock:  # removed while held: no empty lock file stays beside the videos
            os.remove(lock.name)
            lock.close()


class VideoFolder:
    """Every video file and frame folder (one video) under `root`, or the videos the list `root` names; counts and rates
    from the index (`_index`), frame folders' times from names ('12.480.jpg') or `fps`; broken ones left out, named."""

    def __init__(self, root, fps=None, index=None, trust=False, out=None):
        root, self.fps, self.trust = os.path.abspath(root), fps, trust
        if not os.path.exists(root):
            raise UserError(f"video folder or list {root!r} does not exist: check --data / --val-data")
        self.root = root if os.path.isdir(root) else os.path.dirname(root)
        file = os.path.join(root, ".deltatok-index.npz") if self.root == root else root + ".deltatok-index.npz"
        if index or out and not os.access(os.path.dirname(file), os.W_OK):  # in --index, else the run folder
            file = os.path.join(index or out, root.strip("/").replace("/", "_") + ".deltatok-index.npz")
        def check(paths, info):  # before the index is written: a refusal leaves nothing behind
            frames, rate = np.reshape(info, (-1, 3))[:, :2].T
            bad = "; ".join(f"{len(k)} {what}: " + ", ".join(os.path.join(self.root, paths[j]) for j in k[:5]) +
                            " ..." * (len(k) > 5) for what, k in (("unreadable videos", np.flatnonzero(frames == 0)),
                                                                  ("missing", np.flatnonzero(frames < 0))) if len(k))
            if not (frames > 0).any():
                raise UserError(f"no usable video in {root!r}{bad and f' ({bad})'}: expected video files ("
                                f"{' '.join(VIDEO_EXTS)}) or folders of frames ({' '.join(IMAGE_EXTS)}, named by time "
                                "in seconds like '12.480.jpg', or by order with --fps)")
            if fps is None and (numbered := (frames > 0) & (rate < 0)).any():
                raise UserError(f"frames in {os.path.join(self.root, paths[np.argmax(numbered)])!r} are not named by "
                                "time in seconds (e.g. '12.480.jpg'): give their frame rate with --fps")
            if bad and os.environ.get("RANK", "0") == "0":
                print(f"warning: skipped {bad} (remembered in {file} until they change)", file=sys.stderr)
        single = self.root != root and root.lower().endswith(VIDEO_EXTS)  # one video file (eval.py --video)
        paths, info = ([root], [_probe(root, True)]) if single else _index(root, file, trust, check)
        usable = (info := np.reshape(info, (-1, 3)))[:, 0] > 0
        self.paths, self.info = _pack(p for p, u in zip(paths, usable) if u), info[usable].astype(np.float32)
        self.ends = np.flatnonzero(self.paths == 0)  # path i ends at ends[i]; info[i]: frames, rate, start

    def __len__(self):
        return len(self.ends)

    def path(self, i):
        """The video file or frame folder of video i."""
        return os.path.join(self.root, _unpack(self.paths[self.ends[i - 1] + 1 if i else 0:self.ends[i] + 1])[0])

    def frame_times(self, i):
        frames, rate, _ = self.info[i]  # rate 0: a frame folder named by time, -1: by number (at --fps)
        return _frame_folder(self.path(i))[1] if rate == 0 else np.arange(frames) / (rate if rate > 0 else self.fps)

    def read(self, i, idx):
        (_, rate, t0), idx, want = self.info[i], list(idx), set(idx)
        if rate <= 0:  # a frame folder
            return np.stack([np.asarray(Image.open(_frame_folder(self.path(i))[0][k]).convert("RGB")) for k in idx])
        for fast in (True, False):  # the fast path misses frames of open GOPs: then a plain decode from the start
            with av.open(self.path(i), options={"skip_frame": "all"}) as container:  # opening decodes nothing
                stream, frames, tb = container.streams.video[0], {}, float(container.streams.video[0].time_base)
                stream.codec_context.thread_count = 1  # threads add latency; one process per core is faster
                if fast:  # from the key frame before the first wanted frame; unwanted unreferenced ones are skipped
                    container.seek(round((t0 + min(want) / rate) / tb), stream=stream)
                for packet in container.demux(stream):
                    wanted = not fast or packet.pts is None or round((packet.pts * tb - t0) * rate) in want
                    stream.codec_context.skip_frame = "DEFAULT" if wanted else "NONREF"  # pts None: the last packet
                    for frame in packet.decode():
                        if (k := round((frame.pts * tb - t0) * rate)) in want:
                            frames[k] = frame.to_ndarray(format="rgb24")
                    if len(frames) == len(want):
                        return np.stack([frames[k] for k in idx])  # (T, H, W, 3) uint8
        raise RuntimeError(f"could not decode frames {sorted(want - set(frames))} of {self.path(i)}")


def prepare(src, dst, short_side=288, workers=1, index=None):
    """Copy the video files under `src` (a list's: from the folder they share) to the same paths under `dst` (.mp4), in
    H.264 for random access (read skips the unreferenced B-frames); frame k stays frame k: the same clips and crops."""
    if not any(path.lower().endswith(VIDEO_EXTS) for path, _, _ in _found(os.path.abspath(src))):  # before indexing
        raise UserError(f"no video files ({' '.join(VIDEO_EXTS)}) under {src}: nothing to copy (frame folders are read "
                        "fast as they are: train on them directly)")
    source = VideoFolder(src, fps=1, index=index, out=dst)  # the index goes in DST where SRC is read-only
    videos = {os.path.normpath(source.path(i)): i for i in range(len(source)) if source.info[i, 1] > 0}
    outside = os.path.commonpath([source.root, *videos]) != source.root  # a list that names videos outside its folder
    base = os.path.commonpath([os.path.dirname(v) for v in videos]) if outside else source.root  # copies mirror them
    names = {os.path.relpath(video, base): i for video, i in videos.items()}
    copies = {os.path.splitext(name)[0] + ".mp4": name for name in names}  # a.mp4 and a.webm would make one a.mp4
    if lost := sorted(set(names) - set(copies.values())):
        raise UserError(f"{lost[0]} and {copies[copy := os.path.splitext(lost[0])[0] + '.mp4']} in {base} "
                        f"would both be copied to {os.path.join(dst, copy)}: rename one (or list the videos to copy)")
    jobs = [(source.path(names[name]), os.path.join(dst, copy), (int(source.info[names[name], 0]),
             float(source.info[names[name], 1])), short_side) for copy, name in copies.items()]
    todo = [job for job in jobs if not os.path.exists(job[1])]  # the rest was copied by an earlier run
    if not todo:
        return print(f"every video under {src} ({len(jobs)}) is already copied to {dst}: nothing to do")
    with multiprocessing.Pool(workers) as pool:
        for n, out in enumerate(pool.imap_unordered(_prepare_one, todo)):
            print(f"{n + 1}/{len(todo)} {out}", flush=True)


def _prepare_one(job):
    path, out, (n, rate), short_side = job
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with av.open(path) as src, av.open(out + ".tmp", "w", format="mp4") as dst:
        stream = src.streams.video[0]
        scale, fps = min(1, short_side / min(stream.height, stream.width)), stream.average_rate or stream.guessed_rate
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


def open_source(root, split="train", fps=None, seed=0, flags=None):
    """'synthetic': the built-in videos of `split`; else a folder or list of real videos, indexed as `flags` say."""
    index = (flags.index, flags.trust_index, flags.out) if flags else ()
    return SyntheticVideos(split, seed) if root == "synthetic" else _video_folder(root, fps, *index)


# -----------------------------------------------------------------------------
# training clips

def _crop_box(rng, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params with a given rng: (top, left, h, w)."""
    area, log_ratio = height * width, np.log(ratio)
    for _ in range(10):
        target, aspect = area * rng.uniform(*scale), np.exp(rng.uniform(*log_ratio))
        w, h = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    r = min(max(width / height, min(ratio)), max(ratio))  # fall back to the largest centre crop within the ratio range
    w, h = min(width, round(height * r)), min(height, round(width / r))
    return (height - h) // 2, (width - w) // 2, h, w


def _warn_broken(source, i, error):
    """Name a broken video and why, the first time this process meets it; later failures are only counted."""
    name = source.path(i) if isinstance(source, VideoFolder) else f"video {i}"
    if name not in _WARNED:
        _WARNED.add(name)
        gone = isinstance(error, FileNotFoundError) and getattr(source, "trust", False)  # (av's errors are ones too)
        print(f"\nwarning: skipping broken video {name}: " + (f"{type(error).__name__}: {error}" if not gone else
              "it is gone since its index was saved: start once without --trust-index to update it"), file=sys.stderr)


class ClipDataset:
    """Training clips. Sample j of step s is a pure function of (seed, s, j)."""

    def __init__(self, source, num_frames=2, size=256, stride=(1 / 25, 1 / 3), scale=(0.6, 1.0),
                 ratio=(3 / 4, 4 / 3), seed=0):
        self.source, self.num_frames, self.seed, self.stride, self.scale = source, num_frames, seed, stride, scale
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)
        self.ratio = [r * (self.size[1] / self.size[0]) for r in ratio]  # appendix A: 3:4-4:3 of the output's aspect

    def sample(self, step, j):
        """Clip j of `step`: frames (T, 3, H, W) uint8, times (T,) float32 s from the first, broken videos skipped."""
        skipped = 0
        for attempt in range(1000):  # gaps uniform in `stride` seconds, snapped to the video's frames
            rng = np.random.default_rng([self.seed, step, j, attempt])
            times = self.source.frame_times(i := int(rng.integers(len(self.source))))
            offsets = np.concatenate([[0.0], np.cumsum(rng.uniform(*self.stride, self.num_frames - 1))])  # (T,)
            starts = np.flatnonzero(times <= times[-1] - offsets[-1])
            if len(starts) == 0:  # a video too short: draw another
                continue
            target = times[rng.choice(starts)] + offsets
            idx = np.searchsorted(times, target).clip(1, len(times) - 1)
            idx -= target - times[idx - 1] < times[idx] - target  # nearest frame
            idx = np.maximum.accumulate(idx - (t := np.arange(len(idx)))) + t  # a gap under a frame still moves one
            if idx[-1] >= len(times):
                continue
            try:
                frames = self.source.read(i, idx.tolist())  # (T, H, W, 3)
            except Exception as e:
                skipped += 1
                _warn_broken(self.source, i, e)
                continue
            top, left, h, w = _crop_box(rng, *frames.shape[1:3], self.scale, self.ratio)  # one per clip (appendix A)
            crop = torch.from_numpy(frames[:, top:top + h, left:left + w]).permute(0, 3, 1, 2)  # aspect a little off
            crop = torch.nn.functional.interpolate(crop, self.size, mode="bilinear", antialias=True)  # uint8: 6x faster
            return crop, torch.tensor(times[idx] - times[idx[0]], dtype=torch.float32), skipped
        raise UserError(f"no readable video long enough for {self.num_frames} frames at stride {self.stride} s "
                        f"after 1000 draws ({skipped} broken)")


class _MicroBatches(torch.utils.data.Dataset):
    """Item n: micro-batch n % accum of step n // accum on this rank, a pure function of n (made in any order)."""

    def __init__(self, dataset, batch_size, rank, world_size, accum):
        self.dataset, self.batch_size, self.rank, self.world, self.accum = dataset, batch_size, rank, world_size, accum

    def __getitem__(self, n):
        step, m = divmod(n, self.accum)
        first = (m * self.world + self.rank) * self.batch_size
        frames, times, skipped = zip(*(self.dataset.sample(step, j) for j in range(first, first + self.batch_size)))
        return {"frames": torch.stack(frames), "times": torch.stack(times), "skipped": sum(skipped), "step": step}


def make_loader(dataset, batch_size, rank=0, world_size=1, accum=1, start_step=0, num_workers=2):
    """Infinite: for each step from `start_step`, `accum` dicts "frames" (B, T, 3, S, S) uint8, "times" (B, T) float32,
    "skipped", "step"; micro-batch m of rank r: clips (m * world_size + r) * batch_size + b (one at 2B = two at B)."""
    micro = _MicroBatches(dataset, batch_size, rank, world_size, accum)  # items are micro-batches: batch_size=None
    return iter(torch.utils.data.DataLoader(micro, batch_size=None, sampler=itertools.count(start_step * accum),
                                            num_workers=num_workers, worker_init_fn=quiet_worker))  # a fixed order


def quiet_worker(_):
    """A loader worker leaves a scheduler's SIGTERM to the main process (catch_signals); its parent's ends it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # and in the thread below, which takes it
    def wait():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
            pass
        os._exit(0)
    threading.Thread(target=wait, daemon=True).start()


def accumulation(global_batch, batch, world):
    """Micro-steps per optimizer step so that batch (per process) x world x accumulation = global_batch."""
    if global_batch % (batch * world):
        raise UserError(f"--global-batch {global_batch} is not a multiple of --batch-size {batch} x {world} processes")
    return global_batch // (batch * world)


def clip_random(seed, step, clip_ids, shape, device, draw=torch.randn):
    """Random numbers (B, *shape), row b a pure function of (seed, step, clip_ids[b]): any split of a step over
    processes and micro-batches draws the same for a clip (BoM noise, RoPE jitter), and resume needs no RNG state."""
    g = torch.Generator(device)
    return torch.stack([draw(*shape, generator=g.manual_seed((seed * 1_000_003 + step) * 1_000_033 + j), device=device)
                        for j in clip_ids])


# -----------------------------------------------------------------------------
# each script's --bench (nanoGPT's bench.py): time, memory and FLOPs of a step; BENCHMARKS.md's table of their rows

def count_flops(fn):
    """FLOPs (2 x multiply-adds) of fn(), attention included (SDPA's math path is counted; fused kernels are not)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return counter.get_total_flops()


def run_bench(step_fn, flops_fn, batch, n, device, reference):
    """Time n steps after 3 warm-up ones (compile_s: their time beyond 3 steps); peak memory, FLOPs, share of the matmul
    peak. flops_fn: the step eager on ONE sample (no compiled code to count; math attention on a batch: huge)."""
    sync = (lambda: torch.cuda.synchronize(device)) if (cuda := device.type == "cuda") else (lambda: None)
    def timed(fn, n):  # seconds of each of n calls of fn(), the device synchronised before and after each
        sync()
        stamps = [time.perf_counter()]
        for _ in range(n):  # the sync after a call is the one before the next
            fn()
            sync()
            stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])]
    with torch.compiler.set_stance("force_eager"):
        flops = count_flops(flops_fn) * batch
    warm = sum(timed(step_fn, 3))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ms = 1000 * sorted(timed(step_fn, n))[n // 2]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else  # CPU: the process' peak resident memory
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)  # (Linux reports KiB)
    side, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)  # the matmul peak
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    peak = 2 * side ** 3 / min(timed(lambda: a @ b, 6)[1:])  # FLOP/s
    result = dict(device=name, step_ms=round(ms, 2), compile_s=round(max(warm - 3 * ms / 1000, 0), 1),
                  peak_mem_gib=round(mem, 2), gflops_per_step=round(flops / 1e9, 1),
                  achieved_tflops=round(flops / ms / 1e9, 2), matmul_peak_tflops=round(peak / 1e12, 2),
                  fraction_of_matmul_peak=round(flops / (ms / 1000) / peak, 3), reference=reference)
    print(json.dumps(result, indent=1))
    return bench_record(batch=batch, **result)


def bench_record(**result):
    """Under `make bench-gpu` (BENCH_JSON set), append the result to its JSON lines as the row BENCH_ROW."""
    if os.environ.get("BENCH_JSON"):
        with open(os.environ["BENCH_JSON"], "a") as f:
            f.write(json.dumps(dict(row=os.environ.get("BENCH_ROW", " ".join(sys.argv)), **result)) + "\n")
    return result


def bench_table(jsonl, markdown):
    """`make bench-gpu`'s rows (JSON lines; {"row", "failed"}: failed or out of time) into `markdown`'s table."""
    text = open(markdown, errors="replace").read()
    if not (m := re.fullmatch(r"(.*?<!-- bench-gpu -->\n).*?(<!-- /bench-gpu -->.*)", text, re.S)):  # before a write
        raise UserError(f"MD {markdown} has no lines <!-- bench-gpu --> and <!-- /bench-gpu --> to put the table "
                        "between: give the markdown file to fill")
    rows = [json.loads(line) for line in open(jsonl)]
    lines = ["| step | batch | time | peak memory | share of matmul peak | device |", "|---|---|---|---|---|---|"]
    need = max([r["batch"] / r["step_ms"] * 1000 for r in rows if r["row"].startswith("DeltaTok") and "batch" in r],
               default=0)  # clips/s the fastest DeltaTok step eats: what the loader must feed
    for r in rows:
        if "batch" in r:
            r["per"] = f" ({r['step_ms'] / r['batch']:.1f} ms per sequence)" if "sampling" in r["row"] else ""
            lines.append("| {row} | {batch} | **{step_ms:.1f} ms**{per} | {peak_mem_gib:.1f} GiB | "
                         "{fraction_of_matmul_peak:.0%} of {matmul_peak_tflops:.0f} TFLOP/s | {device} |".format(**r))
        elif "clips_per_s" in r:  # the loader's (with workers: beside what it must feed) or the token cache's
            cells = f" (DeltaTok step: {need:.0f} clips/s) | | | cpu" if "workers" in r else " | | |"
            lines.append(f"| {r['row']} | | **{r['clips_per_s']:.0f} clips/s**{cells} |")
        else:  # eval's, or failed or out of time (the Makefile's {"row", "failed"}: no numbers)
            lines.append(f"| {r['row']} | | " + ("failed or out of time (see the log)" if r.get("failed") else
                                                 f"**{r.get('sequences_per_s', 0):.1f} sequences/s**") + " | | | |")
    with open(markdown + ".tmp", "w") as f:  # write, then rename: never half a file
        f.write(m[1] + "\n".join(lines) + "\n" + m[2])
    os.replace(markdown + ".tmp", markdown)


# -----------------------------------------------------------------------------
# command line: prepare real videos for training, measure how fast clips are read, or fill BENCHMARKS.md's table

def main(args):
    if args.bench_table:
        check_paths([("JSONL", args.bench_table[0]), ("MD", args.bench_table[1])])
        return bench_table(*args.bench_table)
    if args.prepare:
        check_paths([("SRC", args.prepare[0])], ("DST", args.prepare[1]), [("--index", args.index)])
        return prepare(*args.prepare, args.short_side, args.workers, args.index)
    check_paths([("--bench", args.bench)], write=[("--index", args.index)])
    source = VideoFolder(args.bench, index=args.index)
    loader = make_loader(ClipDataset(source, args.num_frames), 8, num_workers=args.workers)
    next(loader)  # workers started
    start, clips = time.perf_counter(), 0
    while time.perf_counter() < start + 20:
        clips += len(next(loader)["frames"])
        print(f"\r{clips} clips in {time.perf_counter() - start:.0f} of 20 s", end="", flush=True)
    total = clips / (time.perf_counter() - start)
    print(f"\n{total:.1f} clips/s, {total / args.workers:.1f} per worker ({args.num_frames}-frame clips, 256 px)")
    bench_record(clips_per_s=total, workers=args.workers)


def get_parser():
    parser = argparse.ArgumentParser(description="Prepare videos for training, time the loader, or write the bench "
                                     "table.", formatter_class=HelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--bench", metavar="DIR", help="clips/s of the training loader over DIR (or a list), for 20 s")
    mode.add_argument("--prepare", nargs=2, metavar=("SRC", "DST"), help="copy SRC (a folder or list) for fast random "
                      "access, to the same paths under DST (a list's: from the folder they share); train on DST")
    mode.add_argument("--bench-table", nargs=2, metavar=("JSONL", "MD"), help="`make bench-gpu`'s rows (JSONL) into "
                      "the table of MD (between <!-- bench-gpu --> and <!-- /bench-gpu -->)")
    parser.add_argument("--workers", type=at_least(1), default=1, help="processes, each with one thread")
    parser.add_argument("--short-side", type=at_least(2), default=288, help="--prepare: short side, never upscaled")
    parser.add_argument("--num-frames", type=at_least(2), default=2, help="--bench: frames per clip")
    parser.add_argument("--index", metavar="DIR", help="folder for the index of the videos (default: beside them)")
    return parser


if __name__ == "__main__":
    cli(main, get_parser())
