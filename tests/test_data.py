import fcntl
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from videos import make_video


def small_source(split="train", seed=0):
    return data.SyntheticVideos(split, seed, num_videos=8, size=32, fps=15.0, seconds=3.0)


def write_video(path, levels, codec, rate=10, size=(64, 48)):
    """A video whose frame k is a flat grey at levels[k]."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.codec_context.gop_size = 4  # several key frames, so reading mid-video needs a real seek
        for level in levels:
            frame = np.full((size[1], size[0], 3), level, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frames(folder, names, images):
    folder.mkdir(parents=True)
    for name, image in zip(names, images):
        Image.fromarray(image).save(folder / name)


# -----------------------------------------------------------------------------
# synthetic videos


def test_synthetic_is_a_pure_function_of_seed_split_and_index():
    idx = [0, 7, 30]
    a, b = data.SyntheticVideos(seed=0), data.SyntheticVideos(seed=0)
    assert np.array_equal(a.read(3, idx), b.read(3, idx))
    for x, y in zip(a.labels(3, idx), b.labels(3, idx)):
        assert np.array_equal(x, y)
    assert not np.array_equal(a.read(3, idx), data.SyntheticVideos(seed=1).read(3, idx))
    assert not np.array_equal(a.read(3, idx), data.SyntheticVideos("val", seed=0).read(3, idx))
    assert not np.array_equal(a.read(3, idx), a.read(4, idx))
    # frame k alone equals frame k read among others, with or without a warm cache
    together = a.read(5, [2, 40, 90])
    data._scene.cache_clear()
    assert np.array_equal(a.read(5, [40])[0], together[1])
    assert len(a) == 512 and len(data.SyntheticVideos("val")) == 64


def test_synthetic_labels_match_frames_and_depth_orders_objects_before_background():
    source = data.SyntheticVideos(seed=0)
    frames = source.read(2, [0, 50])
    classes, depth = source.labels(2, [0, 50])
    assert frames.shape == (2, 128, 128, 3) and frames.dtype == np.uint8
    assert classes.shape == depth.shape == (2, 128, 128)
    assert classes.dtype == np.uint8 and depth.dtype == np.float32
    seen = set()
    for i in range(16):
        classes, depth = source.labels(i, [0, 60])
        assert classes.max() < data.SyntheticVideos.NUM_CLASSES and (depth > 0).all()
        assert depth[classes > 0].max() < depth[classes == 0].min()  # objects are nearer than the background
        seen |= set(np.unique(classes).tolist())
    assert seen == set(range(data.SyntheticVideos.NUM_CLASSES))


def test_synthetic_occlusion_follows_depth_not_drawing_order(monkeypatch):
    source, hw, frames = data.SyntheticVideos(seed=0), 128 * 128, list(range(120))
    scenes = [data._scene(0, "train", i, 128, 15.0, 8.0) for i in range(8)]
    rendered = [source._render(i, frames) for i in range(8)]

    def reversed_objects(seed, split, i, *args):  # the same scene with the objects listed back to front
        s = scenes[i]
        palette = np.concatenate([s["palette"][:hw], s["palette"][hw:][::-1]])
        return dict(s, palette=palette, cls=s["cls"][::-1], pos=s["pos"][:, ::-1], depth=s["depth"][:, ::-1])

    monkeypatch.setattr(data, "_scene", reversed_objects)
    for i in range(8):
        for a, b in zip(rendered[i], source._render(i, frames)):
            assert np.array_equal(a, b)


def test_synthetic_objects_move_and_turn_every_way_at_random_times():
    source = data.SyntheticVideos(seed=0, num_videos=32)
    fps = source.fps
    turns, intervals = {"left": 0, "right": 0, "reverse": 0}, []
    for i in range(len(source)):
        pos, vel = source.trajectory(i)
        assert ((pos >= 0) & (pos <= 1)).all()  # bouncing keeps centres in the frame
        step = np.linalg.norm(pos[int(0.6 * fps)] - pos[0], axis=-1)
        assert (step > 0.02).any()  # something visibly moves over the 0.6 s horizon
        for o in range(vel.shape[1]):
            v = vel[:, o] / np.linalg.norm(vel[:, o], axis=-1, keepdims=True)
            dot = (v[1:] * v[:-1]).sum(-1)
            cross = v[:-1, 0] * v[1:, 1] - v[:-1, 1] * v[1:, 0]
            assert np.allclose(np.abs(dot) + np.abs(cross), 1, atol=1e-6)  # only 0, +-90 and 180 degree turns
            turns["reverse"] += int((dot < -0.5).sum())
            turns["left"] += int((cross > 0.5).sum())
            turns["right"] += int((cross < -0.5).sum())
            intervals += np.diff(np.flatnonzero(dot < 0.5)).tolist()
    total = sum(turns.values())
    assert all(n > 0.2 * total for n in turns.values()), turns  # every turn type is a real mode of the future
    assert 0.4 < np.mean(intervals) / fps < 2.0  # turns come on the time scale of the forecast horizon
    assert np.std(intervals) > 0.5 * np.mean(intervals)  # at random times, not on a clock


# -----------------------------------------------------------------------------
# training clips


def test_clip_sample_is_a_pure_function_of_seed_step_and_index():
    clips = data.ClipDataset(small_source(), num_frames=4, size=32, seed=0)
    frames, times, skipped = clips.sample(3, 5)
    assert frames.shape == (4, 3, 32, 32) and frames.dtype == torch.uint8 and times.dtype == torch.float32
    clips.sample(9, 9)
    data._scene.cache_clear()
    again = data.ClipDataset(small_source(), num_frames=4, size=32, seed=0).sample(3, 5)
    assert torch.equal(frames, again[0]) and torch.equal(times, again[1]) and skipped == again[2] == 0
    assert not torch.equal(frames, clips.sample(3, 6)[0])
    assert not torch.equal(frames, clips.sample(4, 5)[0])
    assert not torch.equal(frames, data.ClipDataset(small_source(), num_frames=4, size=32, seed=1).sample(3, 5)[0])


def test_clip_times_are_frame_times_with_gaps_in_the_stride_range():
    source = small_source()
    clips = data.ClipDataset(source, num_frames=8, size=16)
    frame = 1 / source.fps
    gaps = []
    for j in range(40):
        _, times, _ = clips.sample(0, j)
        times = times.double().numpy()
        assert times[0] == 0 and np.allclose(times * source.fps, np.round(times * source.fps), atol=1e-4)
        gaps += np.diff(times).tolist()
    gaps = np.array(gaps)
    # each time snaps to the nearest frame (half a frame either way), and never repeats a frame
    assert gaps.min() >= frame - 1e-4 and gaps.max() <= 1 / 3 + frame + 1e-4
    assert gaps.max() > 0.25  # the whole range is used


def test_one_crop_for_every_frame_of_a_clip(tmp_path):
    # frame k = a fixed noise image + 12 k: any difference between two crops would show up as more than a shift
    rng = np.random.default_rng(0)
    base = rng.integers(20, 120, (60, 90, 3)).astype(np.uint8)
    write_frames(tmp_path / "video", [f"f{k:03d}.png" for k in range(10)], [base + 12 * k for k in range(10)])
    clips = data.ClipDataset(data.VideoFolder(str(tmp_path), fps=10), num_frames=4, size=32)
    crops = set()
    for j in range(8):
        frames, times, _ = clips.sample(0, j)
        k = torch.round(times * 10).long()
        shift = frames.int() - frames[:1].int()
        assert (shift - 12 * k[:, None, None, None]).abs().max() <= 1  # bilinear resize commutes with a shift
        crops.add(frames[0].numpy().tobytes())
    assert len(crops) == 8  # and the crop itself is random


def test_crop_box_follows_random_resized_crop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = data._crop_box(rng, 360, 640, (0.6, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 360 and 0 <= left and left + w <= 640
        assert 0.59 <= h * w / (360 * 640) <= 1.01 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # nothing fits a very wide frame: centre crop at the widest allowed ratio
    assert data._crop_box(rng, 30, 900, (0.6, 1.0), (3 / 4, 4 / 3)) == (0, 430, 30, 40)


def test_clip_identity_crop_keeps_the_frame(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    write_frames(tmp_path / "video", ["0.000.png", "0.100.png"], [image, image])
    clips = data.ClipDataset(data.VideoFolder(str(tmp_path)), size=32, scale=(1, 1), ratio=(1, 1), stride=(0.1, 0.1))
    frames, times, _ = clips.sample(0, 0)
    assert np.array_equal(frames[0].permute(1, 2, 0).numpy(), image) and np.allclose(times.numpy(), [0, 0.1])


# -----------------------------------------------------------------------------
# loader


def micro_batches(dataset, n, **kwargs):
    return list(itertools.islice(data.make_loader(dataset, **kwargs), n))


def assert_same(a, b):
    assert a["step"] == b["step"] and a["skipped"] == b["skipped"]
    assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["times"], b["times"])


def test_loader_is_the_same_for_any_workers_resumable_and_split_across_ranks():
    clips = data.ClipDataset(small_source(), num_frames=3, size=16)
    run = micro_batches(clips, 6, batch_size=2, accum=2, num_workers=0)
    assert [m["step"] for m in run] == [0, 0, 1, 1, 2, 2]
    assert run[0]["frames"].shape == (2, 3, 3, 16, 16) and run[0]["times"].shape == (2, 3)
    for a, b in zip(run, micro_batches(clips, 6, batch_size=2, accum=2, num_workers=2)):
        assert_same(a, b)
    for a, b in zip(run[2:], micro_batches(clips, 4, batch_size=2, accum=2, start_step=1, num_workers=0)):
        assert_same(a, b)
    # one process, one micro-batch of 8 clips == two ranks x two micro-batches of 2 clips
    whole = micro_batches(clips, 3, batch_size=8, num_workers=0)
    ranks = [micro_batches(clips, 6, batch_size=2, rank=r, world_size=2, accum=2, num_workers=0) for r in (0, 1)]
    for s in range(3):
        # micro m of rank r holds clips (m * world_size + r) * B ...
        parts = [ranks[r][2 * s + m]["frames"] for m in (0, 1) for r in (0, 1)]
        assert torch.equal(whole[s]["frames"], torch.cat(parts))


# -----------------------------------------------------------------------------
# real videos


@pytest.mark.parametrize("name,codec", [("a.mp4", "libx264"), ("a.webm", "libvpx-vp9"), ("a.avi", "mpeg4")])
def test_video_file_frames_and_times(tmp_path, name, codec):
    levels = [10 + 16 * k for k in range(13)]
    write_video(tmp_path / name, levels, codec)
    source = data.VideoFolder(str(tmp_path))
    assert len(source) == 1 and np.allclose(source.frame_times(0), np.arange(13) / 10)
    frames = source.read(0, [7, 2, 12, 3])  # out of order, across key frames
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert np.allclose(frames.mean((1, 2, 3)), [levels[k] for k in (7, 2, 12, 3)], atol=6)


def test_broken_videos_are_left_out_or_skipped_and_counted(tmp_path, capsys):
    write_video(tmp_path / "good.webm", [10 + 6 * k for k in range(30)], "libvpx-vp9")
    good = (tmp_path / "good.webm").read_bytes()
    (tmp_path / "cut.webm").write_bytes(good[: len(good) // 2])  # header says 30 frames, only the first half decode
    write_video(tmp_path / "x.mp4", range(0, 200, 20), "libx264")
    (tmp_path / "cut.mp4").write_bytes((tmp_path / "x.mp4").read_bytes()[:300])  # mp4 index lost: unreadable
    (tmp_path / "x.mp4").unlink()
    (tmp_path / "noise.mkv").write_bytes(np.random.default_rng(0).bytes(5000))
    source = data.VideoFolder(str(tmp_path))
    assert len(source) == 2 and "skipped 2 unreadable videos" in capsys.readouterr().err
    clips = data.ClipDataset(source, num_frames=4, size=16)
    skipped = [clips.sample(0, j)[2] for j in range(30)]  # every sample comes back, from the good video if need be
    assert sum(skipped) > 0


def test_a_broken_video_is_named_once_with_its_cause_then_counted(tmp_path, capsys):
    """A frame folder whose images differ in size cannot be stacked: warned once, with its path and the error."""
    images = [np.full((32 + 8 * (k % 2), 32, 3), 10 * k, np.uint8) for k in range(10)]
    write_frames(tmp_path / "mixed", [f"{k:03d}.png" for k in range(10)], images)
    write_frames(tmp_path / "good", [f"{k:03d}.png" for k in range(10)], [np.zeros((32, 32, 3), np.uint8)] * 10)
    clips = data.ClipDataset(data.VideoFolder(str(tmp_path), fps=10), num_frames=4, size=16)
    skipped = sum(clips.sample(0, j)[2] for j in range(20))
    err = capsys.readouterr().err
    assert skipped > 1 and err.count("warning") == 1, (skipped, err)
    assert f"broken video {tmp_path / 'mixed'}: ValueError: " in err and "same shape" in err


def test_broken_reads_are_counted_in_the_micro_batch():
    class HalfBroken(data.SyntheticVideos):
        def read(self, i, idx):
            if i % 2:
                raise OSError("broken")
            return super().read(i, idx)

    clips = data.ClipDataset(HalfBroken(num_videos=8, size=32), num_frames=2, size=16)
    batch = next(data.make_loader(clips, batch_size=16, num_workers=0))
    assert batch["skipped"] == sum(clips.sample(0, j)[2] for j in range(16)) > 0


def test_frame_folders_take_times_from_names_or_fps(tmp_path):
    colours = [np.full((8, 8, 3), c, np.uint8) for c in (0, 100, 200, 50)]
    write_frames(tmp_path / "timed", ["0.400.png", "0.000.png", "1.000.png", "0.200.png"], colours)
    write_frames(tmp_path / "numbered", ["000.png", "001.png", "002.png"], colours[:3])
    with pytest.raises(data.UserError, match="--fps"):
        data.VideoFolder(str(tmp_path))
    source = data.VideoFolder(str(tmp_path), fps=5)
    assert len(source) == 2
    numbered, timed = (0, 1) if "numbered" in source.path(0) else (1, 0)
    assert np.allclose(source.frame_times(timed), [0, 0.2, 0.4, 1.0])
    assert source.read(timed, [0, 1, 2, 3])[:, 0, 0, 0].tolist() == [100, 50, 0, 200]  # sorted by time
    assert np.allclose(source.frame_times(numbered), [0, 0.2, 0.4])
    assert source.read(numbered, [2])[0, 0, 0, 0] == 200


def test_readmes_cityscapes_step_makes_each_sequence_one_30_frame_video(tmp_path):
    """README's snippet (Table D), run twice on a Cityscapes tree as it ships: a city's frames in one folder, two of
    Frankfurt's val sequences under one number, labels of the test split too. One folder per labelled frame of train
    and val, each read as one video of its 30 frames in order."""
    snippet = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().split("python - <<'PY'\n")[1]
    labelled = {"train": [("aachen", 3, 19)], "val": [("frankfurt", 0, 294), ("frankfurt", 0, 576)],
                "test": [("berlin", 0, 19)]}
    root = tmp_path / "cityscapes"
    for split, sequences in labelled.items():
        for city, seq, f in sequences:
            for folder, j, kind in [("gtFine", f, "gtFine_labelIds")] + [("leftImg8bit_sequence", j, "leftImg8bit")
                                                                         for j in range(f - 19, f + 11)]:
                (root / folder / split / city).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((2, 2, 3), j % 256, np.uint8)).save(
                    root / folder / split / city / f"{city}_{seq:06d}_{j:06d}_{kind}.png")
    for _ in range(2):  # the second run finds every link made
        exec(snippet.split("\nPY\n")[0].replace("/data/cityscapes", str(root)), {})
    assert sorted(os.listdir(tmp_path / "cityscapes_seq")) == ["train", "val"]
    for split in ("train", "val"):
        videos = data.VideoFolder(str(tmp_path / "cityscapes_seq" / split), fps=17)
        assert [os.path.basename(videos.path(i)) for i in range(len(videos))] == [
            f"{city}_{seq:06d}_{f:06d}" for city, seq, f in labelled[split]]
        for i, (_, _, f) in enumerate(labelled[split]):
            assert np.allclose(videos.frame_times(i), np.arange(30) / 17)
            assert videos.read(i, range(30))[:, 0, 0, 0].tolist() == [j % 256 for j in range(f - 19, f + 11)]


def test_missing_or_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(data.UserError, match="nowhere"):
        data.VideoFolder(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("no videos here")
    with pytest.raises(data.UserError, match=r"\.mp4.*\.jpg"):
        data.VideoFolder(str(tmp_path))
    assert isinstance(data.open_source("synthetic", "val"), data.SyntheticVideos)


@pytest.mark.parametrize("name,options", [("a.mp4", {}), ("b.mkv", {"x264-params": "open-gop=1"}),
                                          ("c.mov", {"bf": "0"})])
def test_read_gives_the_frames_of_a_full_decode(tmp_path, name, options):
    # H.264 with B-frames (some referenced, some not), an open GOP, none: every frame alone and random sets of them
    make_video(str(tmp_path / name), height=48, gop=12, seconds=2.4, options=options)
    with av.open(str(tmp_path / name)) as container:
        full = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    source, rng = data.VideoFolder(str(tmp_path)), np.random.default_rng(0)
    assert len(source.frame_times(0)) == len(full) == 60
    sets = [[k] for k in range(60)] + [sorted(rng.choice(60, rng.integers(2, 9), replace=False)) for _ in range(30)]
    for idx in sets:
        assert np.array_equal(source.read(0, idx), full[idx]), idx


def test_prepared_copy_gives_the_same_clips_at_a_lower_resolution(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    make_video(str(tmp_path / "src" / "a" / "v.webm"), height=96, gop=60, seconds=4.0, codec="libvpx-vp9")
    data.main(data.get_parser().parse_args(["--prepare", str(tmp_path / "src"), str(tmp_path / "dst"), "--short-side",
                                            "48"]))
    with av.open(str(tmp_path / "dst" / "a" / "v.mp4")) as container:
        stream = container.streams.video[0]
        keys = [p.pts * stream.time_base * 25 for p in container.demux(stream) if p.is_keyframe]
    assert (stream.height, stream.width) == (48, 84) and np.diff(keys).max() <= 16  # cheap random access
    original, copy = data.VideoFolder(str(tmp_path / "src")), data.VideoFolder(str(tmp_path / "dst"))
    assert np.array_equal(original.frame_times(0), copy.frame_times(0))
    frames = [torch.from_numpy(source.read(0, range(100))).permute(0, 3, 1, 2).float() for source in (original, copy)]
    dist = torch.cdist(F.interpolate(frames[0], (48, 84), mode="area").flatten(1), frames[1].flatten(1))
    assert (dist.argmin(0) == torch.arange(100)).float().mean() > 0.8  # frame k of the copy shows frame k
    a, b = (data.ClipDataset(source, num_frames=4, size=32) for source in (original, copy))
    near, far = [], []
    for j in range(8):
        (x, tx, _), (y, ty, _) = a.sample(0, j), b.sample(0, j)
        assert torch.equal(tx, ty)  # the same frames at the same times
        near.append((x.float() - y.float()).abs().mean())
        far.append((x.float() - a.sample(0, j + 100)[0].float()).abs().mean())
    # and nearly the same crop (drawn relative to the frame): far closer to the original clip than another clip is
    assert np.mean(near) < 0.25 * np.mean(far)


def test_prepare_never_upscales(tmp_path):
    """A video smaller than --short-side keeps its size (a copy 6x the pixels reads slower and trains no better)."""
    write_video(tmp_path / "small.mp4", [40, 120, 200], "libx264", size=(64, 48))
    out = str(tmp_path / "copy.mp4")
    data._prepare_one((str(tmp_path / "small.mp4"), out, data._probe(str(tmp_path / "small.mp4"))[:2], 288))
    with av.open(out) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (64, 48)


# -----------------------------------------------------------------------------
# the index of real videos


@pytest.fixture
def probed(monkeypatch):
    """The names of the files that VideoFolder probes (in this process, by a Pool that remembers its jobs)."""
    class Serial:
        def __init__(self, processes):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *error):
            pass

        def imap(self, probe, jobs, chunksize):
            names.extend(os.path.basename(job) for job in jobs)
            return map(probe, jobs)

    names = []
    monkeypatch.setattr(data.multiprocessing, "Pool", Serial)
    return names


def opened(probed, *args, **kwargs):
    """VideoFolder(*args, **kwargs), and the names of its videos and of the files it probed, sorted."""
    probed.clear()
    source = data.VideoFolder(*args, **kwargs)
    return source, [os.path.basename(source.path(i)) for i in range(len(source))], sorted(probed)


def test_index_probes_only_new_and_changed_files_and_remembers_unreadable_ones(tmp_path, probed, capsys):
    (tmp_path / "class").mkdir()
    for name, n in [("a.mp4", 6), ("b.mp4", 7), ("gone.mp4", 8), ("sick.mp4", 9)]:
        write_video(tmp_path / "class" / name, range(0, 10 * n, 10), "libx264", size=(16, 16))
    write_frames(tmp_path / "frames", ["0.000.png", "0.500.png"], [np.zeros((8, 8, 3), np.uint8)] * 2)
    first, videos, probes = opened(probed, str(tmp_path))
    assert probes == ["a.mp4", "b.mp4", "frames", "gone.mp4", "sick.mp4"]
    assert videos == ["a.mp4", "b.mp4", "gone.mp4", "sick.mp4", "frames"]  # in os.walk's order, sorted
    assert [len(first.frame_times(i)) for i in range(5)] == [6, 7, 8, 9, 2]
    again, same, probes = opened(probed, str(tmp_path))
    assert probes == [] and same == videos  # a later start probes nothing
    assert [len(again.frame_times(i)) for i in range(5)] == [6, 7, 8, 9, 2]

    write_video(tmp_path / "class" / "a.mp4", range(0, 120, 10), "libx264", size=(16, 16))  # changed: 12 frames
    write_video(tmp_path / "class" / "new.mp4", range(0, 50, 10), "libx264", size=(16, 16))
    (tmp_path / "class" / "gone.mp4").unlink()
    (tmp_path / "class" / "sick.mp4").write_bytes(b"no longer a video")
    write_frames(tmp_path / "frames" / "more", ["0.000.png"], [np.zeros((8, 8, 3), np.uint8)])
    capsys.readouterr()
    updated, videos, probes = opened(probed, str(tmp_path))
    assert probes == ["a.mp4", "frames", "more", "new.mp4", "sick.mp4"]  # a frame folder with a new subfolder too
    assert videos == ["a.mp4", "b.mp4", "new.mp4", "frames", "more"]
    assert [len(updated.frame_times(i)) for i in range(5)] == [12, 7, 5, 2, 1]
    assert f"skipped 1 unreadable videos: {tmp_path / 'class' / 'sick.mp4'} " in capsys.readouterr().err
    assert opened(probed, str(tmp_path))[1:] == (videos, [])  # the unreadable file is not probed again,
    assert "skipped 1 unreadable videos" in capsys.readouterr().err  # but named at each start

    write_video(tmp_path / "class" / "late.mp4", range(0, 50, 10), "libx264", size=(16, 16))
    assert opened(probed, str(tmp_path), trust=True)[1:] == (videos, [])  # trusted: the files are not looked at


def test_an_index_of_another_format_or_tree_is_rebuilt(tmp_path, probed):
    (tmp_path / "a").mkdir()
    for name in ("x.mp4", "y.mp4"):
        write_video(tmp_path / "a" / name, range(0, 60, 10), "libx264", size=(16, 16))
    assert opened(probed, str(tmp_path / "a"))[2] == ["x.mp4", "y.mp4"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # with its index, which names the tree it indexed
    assert opened(probed, str(tmp_path / "b"))[2] == ["x.mp4", "y.mp4"]
    file = tmp_path / "b" / ".deltatok-index.npz"
    saved = dict(np.load(file))  # an older format, whose frame counts would be wrong now
    np.savez(open(file, "wb"), **dict(saved, format=data.INDEX_FORMAT - 1, info=np.ones_like(saved["info"])))
    source, _, probes = opened(probed, str(tmp_path / "b"))
    assert probes == ["x.mp4", "y.mp4"] and len(source.frame_times(0)) == 6
    open(file, "wb").write(b"cut short")
    assert opened(probed, str(tmp_path / "b"))[2] == ["x.mp4", "y.mp4"]


def test_a_list_of_videos_is_read_in_its_order_with_its_index_beside_it(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4", range(0, 60, 10), "libx264", size=(16, 16))
    write_video(tmp_path / "videos" / "b.webm", range(0, 70, 10), "libvpx-vp9", size=(16, 16))
    write_frames(tmp_path / "videos" / "frames", ["0.000.png", "0.500.png"], [np.zeros((8, 8, 3), np.uint8)] * 2)
    (tmp_path / "lists").mkdir()
    listed = tmp_path / "lists" / "train.txt"  # relative to the list's folder, absolute, a frame folder, missing
    listed.write_text(f"../videos/b.webm\n\n{tmp_path / 'videos' / 'a.mp4'}\n../videos/frames\n../videos/lost.mp4\n")
    source = data.open_source(str(listed))
    assert [os.path.realpath(source.path(i)) for i in range(len(source))] == [
        str(tmp_path / "videos" / name) for name in ("b.webm", "a.mp4", "frames")]
    assert [len(source.frame_times(i)) for i in range(3)] == [7, 6, 2] and source.read(1, [5]).shape == (1, 16, 16, 3)
    assert f"skipped 1 missing: {tmp_path / 'lists' / '../videos/lost.mp4'} (" in capsys.readouterr().err
    assert os.path.exists(str(listed) + ".deltatok-index.npz")


def test_the_index_goes_beside_the_videos_else_in_the_run_folder(tmp_path, monkeypatch):
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4", range(0, 60, 10), "libx264", size=(16, 16))
    videos, run, mine = (str(tmp_path / name) for name in ("videos", "run", "mine"))
    data.VideoFolder(videos, out=run)
    assert sorted(os.listdir(videos)) == [".deltatok-index.npz", "a.mp4"]  # the lock goes when the index is written
    data.VideoFolder(videos, index=mine, out=run)  # --index
    assert [f for f in os.listdir(mine) if f.endswith(".npz")] == [videos.strip("/").replace("/", "_") +
                                                                     ".deltatok-index.npz"]
    monkeypatch.setattr(data.os, "access", lambda path, mode: False)  # read-only videos
    assert len(data.VideoFolder(videos, out=run)) == 1 and sorted(os.listdir(run)) == sorted(os.listdir(mine))


@pytest.fixture(scope="module")
def contents(tmp_path_factory):
    """What the files of WALKS hold: a tiny H.264 video (6 frames), a PNG frame, a zip archive."""
    folder = tmp_path_factory.mktemp("contents")
    write_video(folder / "v.mp4", range(0, 60, 10), "libx264", size=(16, 16))
    Image.new("RGB", (8, 8)).save(folder / "f.png")
    with zipfile.ZipFile(folder / "a.zip", "w") as archive:
        archive.write(folder / "f.png")
    return {kind: (folder / name).read_bytes() for kind, name in (("video", "v.mp4"), ("frame", "f.png"),
                                                                  ("zip", "a.zip"))}


WALKS = [  # the files under d/ ("video", "frame", "zip", "-> a link", else text), --data, then the videos found
    # (frames each) and the one warning, or the one error (no warning, nothing written)
    ("a link to nothing", {"a.mp4": "video", "b.mp4": "-> gone.mp4", "c.mkv": "-> c.mkv"}, "d",
     {"a.mp4": 6}, "skipped 2 missing: {d}/b.mp4, {d}/c.mkv ("),
    ("links that loop", {"a.mp4": "video", "x/up": "-> ..", "x/b.mp4": "video", "y": "-> ../e", "../e/c.mp4": "video",
                         "../e/back": "-> ../d"}, "d", {"a.mp4": 6, "x/b.mp4": 6, "y/c.mp4": 6}, ""),
    ("hidden files", {"a.mp4": "video", "._a.mp4": "\0\5\x16\7", "f/0.000.png": "frame", "f/0.040.png": "frame",
                      "f/._0.000.png": "\0\5\x16\7", ".git/b.mp4": "video"}, "d", {"a.mp4": 6, "f": 2}, ""),
    ("containers by their names", {f"v{ext}": "video" for ext in (".m4v", ".ts", ".mpg", ".3gp", ".wmv")} | {
        "notes.json": "{}"}, "d", {f"v{ext}": 6 for ext in (".m4v", ".ts", ".mpg", ".3gp", ".wmv")}, ""),
    ("a list from another system", {"a.mp4": "video", "s/b.mp4": "video", "l.txt": "\ufeffa.mp4\r\n# videos\r\n\r\n"
                                    " s/b.mp4 \r\n"}, "d/l.txt", {"a.mp4": 6, "s/b.mp4": 6}, ""),
    ("a list naming what is not there", {"a.mp4": "video", "l.txt": "a.mp4\nlost.mp4\n"}, "d/l.txt", {"a.mp4": 6},
     "skipped 1 missing: {d}/lost.mp4 ("),
    ("an archive", {"a.zip": "zip"}, "d/a.zip", "{d}/a.zip is no folder or text list of videos", None),
    ("only broken videos", {"x.mp4": "junk", "y.mp4": "-> z.mp4"}, "d",
     "no usable video in '{d}' (1 unreadable videos: {d}/x.mp4; 1 missing: {d}/y.mp4): expected", None),
    ("no video", {"notes.txt": "hi"}, "d", "no usable video in '{d}': expected video files", None),
    ("frames by number, no --fps", {"f/000.png": "frame", "f/001.png": "frame"}, "d", "give their frame rate", None),
]


@pytest.mark.parametrize("files,data_path,found,warning", [w[1:] for w in WALKS], ids=[w[0] for w in WALKS])
def test_the_walk_reads_what_it_can_names_the_rest_and_refuses_in_one_line(files, data_path, found, warning, contents,
                                                                          tmp_path, probed, capsys):
    for name, what in files.items():
        (path := tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        if what.startswith("-> "):
            path.symlink_to(what[3:])
        else:
            path.write_bytes(contents.get(what) or what.encode())
    before, d = sorted(tmp_path.rglob("*")), str(tmp_path / "d")
    if isinstance(found, str):
        with pytest.raises(data.UserError, match=re.escape(found.format(d=d))):
            data.VideoFolder(str(tmp_path / data_path))
        assert capsys.readouterr().err == "" and sorted(tmp_path.rglob("*")) == before  # no index, no lock
        return
    source = data.VideoFolder(str(tmp_path / data_path))
    assert {os.path.relpath(source.path(i), d): len(source.frame_times(i)) for i in range(len(source))} == found
    err = capsys.readouterr().err
    assert (warning.format(d=d) in err and err.count("\n") == 1) if warning else err == "", err
    assert not list(tmp_path.rglob("*.lock"))  # the index is written, and its lock gone


def test_a_video_gone_from_a_trusted_index_is_named_with_the_way_to_update_it(tmp_path, contents, capsys):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(contents["video"])
    data.VideoFolder(str(tmp_path))
    (tmp_path / "b.mp4").unlink()
    clips = data.ClipDataset(data.VideoFolder(str(tmp_path), trust=True), num_frames=2, size=16)
    assert sum(clips.sample(0, j)[2] for j in range(8)) > 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipping broken video {tmp_path / 'b.mp4'}: it is gone since its index was saved: start "
                   "once without --trust-index to update it"], err


def test_the_index_lock_goes_when_done_and_a_waiter_woken_on_a_removed_one_waits_again(tmp_path, contents, probed,
                                                                                       monkeypatch):
    """Run 1 holds the lock; run 2 waits on it. Run 1 ends (removes its lock, then lets go) while run 3 locks a new
    one: run 2 wakes holding a file that is gone, and must wait on run 3's instead of writing beside it."""
    (tmp_path / "a.mp4").write_bytes(contents["video"])
    lock, index, walked, opened = tmp_path / ".deltatok-index.npz.lock", tmp_path / ".deltatok-index.npz", [], []
    walk = data._found
    monkeypatch.setattr(data, "_found", lambda *args: walked.append(1) or walk(*args))
    first = open(lock, "a")
    fcntl.flock(first, fcntl.LOCK_EX)
    second = threading.Thread(target=lambda: opened.append(data.VideoFolder(str(tmp_path))))
    second.start()
    while not walked:
        time.sleep(0.01)
    time.sleep(0.2)  # run 2 has walked, found no index, and waits on the lock
    lock.unlink()
    third = open(lock, "a")
    fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
    first.close()
    second.join(0.3)
    assert second.is_alive() and not index.exists()  # it waits on run 3's lock
    lock.unlink()
    third.close()
    second.join(10)
    assert len(opened[0]) == 1 and index.exists() and not lock.exists()


def test_prepare_refuses_two_videos_that_would_make_one_copy(tmp_path, contents):
    (tmp_path / "src").mkdir()
    for name in ("a.mp4", "a.webm", "b.mp4"):
        (tmp_path / "src" / name).write_bytes(contents["video"])
    with pytest.raises(data.UserError, match=f"a.mp4 and a.webm in {tmp_path / 'src'} would both be copied to "
                                             f"{tmp_path / 'dst' / 'a.mp4'}: rename one"):
        data.prepare(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert not (tmp_path / "dst").exists()


def test_prepare_copies_a_list_of_videos_anywhere_to_their_paths_from_the_folder_they_share(tmp_path, contents):
    for name in ("a/x.mp4", "b/c/y.mp4"):
        (tmp_path / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "videos" / name).write_bytes(contents["video"])
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.txt").write_text(f"../videos/a/x.mp4\n{tmp_path / 'videos/b/c/y.mp4'}\n")  # outside
    (tmp_path / "videos" / "l.txt").write_text("b/c/y.mp4\n")  # inside its folder: paths from the list's folder
    for src, dst in (("lists/l.txt", "dst"), ("videos/l.txt", "dst2")):
        data.prepare(str(tmp_path / src), str(tmp_path / dst))
    copies = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("dst*/**/*.mp4"))
    assert copies == ["dst/a/x.mp4", "dst/b/c/y.mp4", "dst2/b/c/y.mp4"]


FALLBACK = [("h264_closed.mp4", "libx264", {"bf": "3"}),
            ("h264_open_gop.mp4", "libx264", {"bf": "3", "x264-params": "open-gop=1"}),
            ("mpeg4.avi", "mpeg4", {"bf": "2"}), ("mpeg4.mp4", "mpeg4", {"bf": "2"}),
            ("vp9.webm", "libvpx-vp9", {}),
            ("hevc.mp4", "libx265", {"x265-params": "bframes=3:open-gop=1:log-level=none"}),
            ("av1.mp4", "libsvtav1", {})]


@pytest.mark.parametrize("name,codec,options", FALLBACK, ids=[case[0] for case in FALLBACK])
def test_read_gives_every_frame_of_a_full_decode_and_skips_no_clip(tmp_path, name, codec, options):
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"this PyAV cannot encode {codec}")
    make_video(str(tmp_path / name), height=32, gop=8, seconds=1.2, codec=codec, options=options)  # 30 frames
    with av.open(str(tmp_path / name)) as container:
        full = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    source, rng = data.VideoFolder(str(tmp_path)), np.random.default_rng(0)
    assert len(source.frame_times(0)) == len(full) == 30
    for idx in [[k] for k in range(30)] + [sorted(rng.choice(30, 4, replace=False)) for _ in range(10)]:
        assert np.array_equal(source.read(0, idx), full[idx]), idx
    clips = data.ClipDataset(source, num_frames=4, size=16, stride=(0.04, 0.2))
    assert sum(clips.sample(0, j)[2] for j in range(20)) == 0


EARLY = ["index_ranks"]  # conftest.early


@pytest.fixture(scope="module")
def index_ranks(tmp_path_factory, request):
    """The torchrun of the next test, started with the module's first test: (torchrun, its folder)."""
    tmp_path = tmp_path_factory.mktemp("ranks")
    for c in range(3):
        (tmp_path / "videos" / f"c{c}").mkdir(parents=True)
        for v in range(2):
            write_video(tmp_path / "videos" / f"c{c}" / f"{v}.mp4", range(0, 10 * (4 + c + v), 10), "libx264",
                        size=(16, 16))
    script = tmp_path / "open.py"
    script.write_text(f"""
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {os.path.dirname(os.path.abspath(data.__file__))!r})
import multiprocessing.pool
import data
dist.init_process_group("gloo")  # as tokenizer.setup_dist does, before the scripts open their data
probed = []
class Counting(multiprocessing.pool.Pool):
    def imap(self, probe, jobs, chunksize):
        probed.extend(jobs)
        return super().imap(probe, jobs, chunksize)
data.multiprocessing.Pool = Counting
source = data.open_source(sys.argv[1])
videos = [(source.path(i), len(source.frame_times(i))) for i in range(len(source))]
json.dump(dict(videos=videos, probed=len(probed)), open(sys.argv[2] + os.environ["RANK"], "w"))
dist.destroy_process_group()
""")
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), str(tmp_path / "videos"), str(tmp_path / "rank")], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    request.addfinalizer(run.terminate)  # if the test did not run to its wait
    return run, tmp_path


def test_ranks_under_torchrun_share_one_index_build(index_ranks):
    """Two gloo processes open one folder at once: one probes, the other waits and reads its index; both see the
    same videos in the same order."""
    run, tmp_path = index_ranks
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}")) for r in (0, 1)]
    assert ranks[0]["videos"] == ranks[1]["videos"] and len(ranks[0]["videos"]) == 6
    assert [n for _, n in ranks[0]["videos"]] == [4, 5, 5, 6, 6, 7]  # c0/0, c0/1, c1/0, ...: in walk order
    assert sorted(r["probed"] for r in ranks) == [0, 6]  # one rank probed every video, the other none
    assert sorted(os.listdir(tmp_path / "videos"))[0] == ".deltatok-index.npz"  # and no lock stays
