"""
The start-up of a Kinetics-size corpus (`make bench-index`): N hard links of one 10 s 640x360 H.264 video in
train/<class>/<video>.mp4 folders. Prints, in seconds and ms per video and extrapolated to Kinetics-700's 545,000
videos: the first start (the index built on all cores), a later start (one walk, nothing probed) and a start with
--trust-index; the first build's parallel efficiency against one process probing file after file (what every start
cost before the index); and the memory of an index of 545,000 entries, per process and per DataLoader worker.

    python tests/bench_index.py 20000 [FOLDER]   # the tree goes in FOLDER (default: a temporary folder in runs/)
"""

import multiprocessing
import os
import sys
import tempfile
import time

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from videos import make_video  # noqa: E402

KINETICS = 545_000


def timed(fn):
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def report(what, seconds, n):
    print(f"{what}: {seconds:.2f} s for {n:,} videos, {1000 * seconds / n:.4f} ms per video, "
          f"{seconds / n * KINETICS:.1f} s at {KINETICS:,}", flush=True)


def private_mb():
    """Memory this process does not share (copied-on-write pages included), from /proc/self/smaps_rollup."""
    return sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("Private")) / 1024


def worker_copies(source, read):
    """MB a forked process (a DataLoader worker) makes its own when it reads every video of `source` once."""
    def touch(pipe):
        before = private_mb()
        for i in range(len(source)):
            read(source, i)
        pipe.send(private_mb() - before)

    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(target=touch, args=(child,))
    process.start()
    copied = parent.recv()
    process.join()
    return copied


def main(n, folder):
    video, root = os.path.join(folder, "video.mp4"), os.path.join(folder, "train")
    make_video(video, height=360, gop=60, seconds=10.0)
    for i in range(n):
        os.makedirs(os.path.join(root, f"class{i // 780:03d}"), exist_ok=True)  # ~780 videos a class, as Kinetics
        os.link(video, os.path.join(root, f"class{i // 780:03d}", f"{i:011d}_000000_000010.mp4"))
    cores, one = os.cpu_count(), min(n, 300)
    today = timed(lambda: [av.open(video).close() for _ in range(one)])[1] / one  # the probe before: it decoded
    serial = timed(lambda: [data._probe(video) for _ in range(one)])[1] / one
    source, first = timed(lambda: data.VideoFolder(root))
    assert len(source) == n
    report(f"first start, the index built on {cores} cores", first, n)
    print(f"  before the index, every start probed file after file: {1000 * today:.3f} ms per video ({cores} cores: "
          f"{1000 * today / cores:.3f}); this probe file after file: {1000 * serial:.3f} ms per video, on {cores} "
          f"cores {1000 * first / n:.3f}: parallel efficiency {serial / (first / n) / cores:.0%}")
    report("later start (one walk, nothing probed)", timed(lambda: data.VideoFolder(root))[1], n)
    report("later start with --trust-index", timed(lambda: data.VideoFolder(root, trust=True))[1], n)

    # memory: an index of 545,000 synthetic entries with Kinetics-like paths
    synthetic = os.path.abspath(os.path.join(folder, "synthetic"))
    os.makedirs(synthetic)
    paths = [f"train/a kinetics class name {i % 700:03d}/{i:011d}_000000_000010.mp4" for i in range(KINETICS)]
    np.savez(open(os.path.join(synthetic, ".deltatok-index.npz"), "wb"), format=data.INDEX_FORMAT, root=synthetic,
             paths=data._pack(paths), stat=np.zeros((KINETICS, 2), np.int64),
             info=np.tile([250.0, 25.0, 0.0], (KINETICS, 1)))
    source, seconds = timed(lambda: data.VideoFolder(synthetic, trust=True))
    report("  a --trust-index start of the synthetic index", seconds, KINETICS)
    held = (source.paths.nbytes + source.ends.nbytes + source.info.nbytes) / 2 ** 20
    copied = worker_copies(source, lambda s, i: (s.path(i), s.frame_times(i)))
    print(f"index of {KINETICS:,} entries: {held:.1f} MB of flat arrays per process; a forked DataLoader worker that "
          f"reads every entry copies {copied:.1f} MB of it (at most {held:.1f} MB under spawn)")
    before = private_mb()
    tuples = [(os.path.join(synthetic, p), (250, 25.0)) for p in paths]  # what VideoFolder held before the index
    held = private_mb() - before
    copied = worker_copies(tuples, lambda s, i: np.arange(s[i][1][0]) / s[i][1][1])
    print(f"  before: a list of Python tuples, {held:.1f} MB per process; such a worker copies {copied:.1f} MB")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    os.makedirs("runs", exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sys.argv[2] if len(sys.argv) > 2 else "runs") as folder:
        main(n, folder)
