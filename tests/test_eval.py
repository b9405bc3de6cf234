"""eval.py: best / mean, predictions from a file, the whole run on the synthetic videos, and Table B's FLOPs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as E
import heads as H
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # a 4 x 4 patch grid: at 2 x 2 a briefly trained depth head cannot tell present from copy-last
COMMON = ["--size", str(SIZE), "--max-sequences", "8", "--batch-size", "4", "--num-workers", "0", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny DeltaTok (a few steps) and seg / depth heads trained on the tiny VFM's features."""
    out = tmp_path_factory.mktemp("ckpts")
    T.main(T.get_parser().parse_args(
        ["--vfm", "tiny", "--model", "tiny", "--size", str(SIZE), "--global-batch", "8", "--batch-size", "8",
         "--steps", "5", "--warmup", "1", "--num-workers", "0", "--val-clips", "2", "--out", str(out / "tok"),
         "--dtype", "fp32"]))
    for task, steps in (("seg", 40), ("depth", 20)):
        H.main(H.get_parser().parse_args(
            ["--task", task, "--vfm", "tiny", "--size", str(SIZE), "--steps", str(steps), "--batch-size", "8",
             "--lr", "1e-2", "--warmup", "1", "--num-workers", "0", "--val-sequences", "2", "--dtype", "fp32",
             "--out", str(out / task)]))
    return {k: str(out / k / "ckpt.pt") for k in ("tok", "seg", "depth")}


def test_best_picks_the_lowest_loss_sample_and_mean_averages_features():
    target = torch.randn(2, 4, 8)
    samples = target[:, None] + torch.stack([torch.full((4, 8), v) for v in (1.0, -0.05, 0.3, -1.25)])[None]
    best, mean, index = E.best_and_mean(samples, target)
    assert index.tolist() == [1, 1] and torch.equal(best, samples[:, 1])
    assert torch.allclose(mean, samples.mean(1))


def test_eval_runs_end_to_end_and_present_beats_copy_last(ckpts, tmp_path):
    out = tmp_path / "eval"
    results = E.main(E.get_parser().parse_args(
        ["--ckpt", ckpts["tok"], "--heads", ckpts["seg"], ckpts["depth"], "--figures", "1", "--out", str(out),
         *COMMON]))["synthetic"]
    saved = json.load(open(out / "results.json"))
    assert saved["kinds"] == ["deltatok", "deltatok_parallel"]
    assert len(saved["results"]["synthetic"]) == len(results) == 7
    present, copy_mid = results[("Present", "-", "-")], results[("Copy last", "mid", "-")]
    assert present["miou"] >= copy_mid["miou"]
    assert present["rmse"] <= copy_mid["rmse"]
    assert set(present) == {"miou", "rmse", "absrel", "delta1"}
    seq, par = "DeltaTok reconstruction (sequential)", "DeltaTok reconstruction (parallel)"
    assert results[(seq, "short", "best")] == results[(par, "short", "best")]  # one step: the same protocol
    assert results[(seq, "mid", "best")] != results[(par, "mid", "best")]
    assert sorted(os.listdir(out)) == ["results.json"] + [f"synthetic_0000_{h}_deltatok_reconstruction_{p}{r}.png"
                                                          for h in ("mid", "short") for p in ("parallel", "sequential")
                                                          for r in ("", "_rollout")]


def test_features_file_best_and_mean_through_the_head(ckpts, tmp_path):
    """Predictions from a file: mean of [GT + a, GT - a] is GT, so mean must score exactly as present (the head
    applied once to averaged features); best of [GT + a, GT, GT - a] is GT itself."""
    vfm = T.VFM("tiny")
    seq = H.SyntheticSequences("val")
    crops = torch.stack([E.Crops(seq, SIZE)[i]["crops"][:, E.TARGET] for i in range(8)])
    gt = vfm(crops)                                                         # (8, 2, N, C)
    a = 0.5 * torch.randn_like(gt)
    path = tmp_path / "pred.pt"
    torch.save(dict(dataset="synthetic", size=SIZE, vfm="tiny", short=torch.stack([gt + a, gt - a], 2),
                    mid=torch.stack([gt + a, gt, gt - a], 2)), path)
    out = tmp_path / "eval"  # the flags a user gives: the VFM is the file's, figures are drawn
    results = E.main(E.get_parser().parse_args(["--features", str(path), "--heads", ckpts["seg"], "--size", str(SIZE),
                                                "--max-sequences", "8", "--out", str(out)]))["synthetic"]
    assert len([f for f in os.listdir(out) if f.endswith("_rollout.png")]) == 4 * 2  # 4 sequences x 2 horizons
    present = results[("Present", "-", "-")]["miou"]
    assert results[("Features file", "short", "mean")]["miou"] == pytest.approx(present)
    assert results[("Features file", "short", "best")]["miou"] != pytest.approx(present)
    assert results[("Features file", "mid", "best")]["miou"] == pytest.approx(present)


def test_flops_match_table_b_for_deltaworld(capsys):
    got = E.main(E.get_parser().parse_args(["--flops", "--vfm", "vitb16-random"]))  # Table B's 256 px by default
    out = capsys.readouterr().out
    assert out.startswith("GFLOPs per 256x256 crop") and "DINO-world's rows fall 11-13% below Table B" in out
    ref = E.TABLE_B
    checks = [("Backbone (per frame)", ref["backbone"]), ("DeltaTok encoder (per frame)", ref["encoder"]),
              ("DeltaTok decoder (per step)", ref["decoder"])] + \
        [(f"DeltaWorld predictor ({k}-token context)", ref["predictor"][k]) for k in (4, 5, 6)]
    for name, value in checks:
        assert got[name] == pytest.approx(value, rel=0.02), name


def test_flops_count_the_model_size_given_and_say_which(capsys):
    count = lambda model: E.main(E.get_parser().parse_args(["--flops", "--vfm", "tiny", "--size", "64", "--model",
                                                             model]))
    tiny, base = count("tiny"), count("base")
    out = capsys.readouterr().out
    assert "--model tiny (blocks: DeltaTok 2 + 2, DeltaWorld 2, DINO-world 2)" in out
    assert "--model base (blocks: DeltaTok 12 + 12, DeltaWorld 12, DINO-world 12)" in out
    assert tiny["Backbone (per frame)"] == base["Backbone (per frame)"]  # the VFM is --vfm's
    assert all(tiny[k] < base[k] for k in tiny if "Backbone" not in k)


def test_save_features_under_torchrun_is_refused_up_front(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "setup_dist", lambda: (0, 2, torch.device("cpu")))  # as rank 0 of 2
    monkeypatch.setattr(sys, "argv", ["eval.py", "--ckpt", ckpts["tok"], "--save-features", str(tmp_path / "f.pt")])
    with pytest.raises(SystemExit) as exit:
        data.cli(E.main, E.get_parser())
    assert exit.value.code == 2 and "--save-features" in capsys.readouterr().err.strip().splitlines()[-1]


def test_saved_features_hold_one_model_and_score_as_it(ckpts, tmp_path):
    """--save-features of a DeltaTok (two rows, sequential and parallel) holds the sequential rollout once per
    sequence, in order over several batches: scored from the file, it gives the model's own scores."""
    args = ["--heads", ckpts["seg"], "--size", str(SIZE), "--max-sequences", "6", "--batch-size", "4", "--figures", "0",
            "--num-workers", "0"]
    path = tmp_path / "new" / "pred.pt"  # its folder is made
    run = lambda *more: E.main(E.get_parser().parse_args([*args, *map(str, more)]))["synthetic"]
    made = run("--ckpt", ckpts["tok"], "--save-features", path, "--out", tmp_path / "a")
    again = run("--features", path, "--out", tmp_path / "b")
    assert all(len(T.load_checkpoint(path)[h]) == 6 for h in ("short", "mid"))
    for h in ("short", "mid"):  # the file is half precision: a pixel may flip
        assert again[("Features file", h, "best")]["miou"] == pytest.approx(
            made[("DeltaTok reconstruction (sequential)", h, "best")]["miou"], abs=0.5)


def test_figures_carry_a_title_and_a_legend_and_the_gif_every_sample(tmp_path):
    """Each figure has its title line on top and, under the tiles, the legend: the class colours and the depth bar
    (the ramp from far to near). The GIF: one frame per time step, at most 1600 px wide, every sample side by side
    (here an RGB 'head' paints sample s in the grey s / S, so each column shows which sample it holds)."""
    vfm, S = T.VFM("tiny"), 14
    item = E.Crops(H.SyntheticSequences("val"), SIZE)[0]
    feats = vfm(item["crops"][0])                                                    # (7, N, C)
    torch.manual_seed(0)
    heads = {"seg": H.SegHead(vfm.dim, 4).eval(), "depth": H.DepthHead(vfm.dim).eval()}
    rollout = feats[None, 4:] + torch.randn(S, 3, *feats.shape[1:])
    with torch.no_grad():
        E.figures(str(tmp_path / "a"), "DeltaWorld", item, feats, rollout, E.CONTEXT["mid"], heads, SIZE)
        E.figures(str(tmp_path / "b"), "DeltaWorld", item, feats, (torch.arange(S) / S).view(S, 1, 1, 1).expand_as(
            rollout), E.CONTEXT["mid"], {"rgb": lambda x: x[:, :3]}, SIZE, gif=True)
    for name in ("a_deltaworld.png", "a_deltaworld_rollout.png"):
        png = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
        assert (png[:16] < 100).all(-1).any()  # the title's text
        legend = png[18 + (png.shape[0] - 24) // (128 + 14) * (128 + 14):]  # under the last row of tiles
        assert any((legend == c).all(-1).any() for c in E.PALETTE[:4])  # a class colour
        for c in (E.RAMP[0], E.RAMP[-1]):  # the far and near ends of the depth bar
            assert (np.abs(legend - c).max(-1) <= 1).any(), (name, c)
    gif = Image.open(tmp_path / "b_deltaworld_rollout.gif")
    assert gif.n_frames == 7 and gif.width <= 1600
    gif.seek(6)  # the last frame: column 0 the frame, 1 present, then samples 0..S-1
    tile = 1600 // (S + 2)  # shrunk from 128 px to fit
    pixels = np.asarray(gif.convert("RGB")).astype(int)[32 + tile // 2, [(c + 2) * tile + tile // 2 for c in range(S)]]
    assert np.abs(pixels - (np.arange(S) / S * 255)[:, None]).max() <= 3


@pytest.fixture(scope="module")
def ranks_run(ckpts, tmp_path_factory, request):
    """`torchrun --nproc_per_node 2 eval.py` of the next test, started with the module's first test (after ckpts):
    (the process, its arguments but --out, its folder)."""
    args = ["--ckpt", ckpts["tok"], "--heads", ckpts["seg"], "--size", str(SIZE), "--max-sequences", "1"]
    out = tmp_path_factory.mktemp("ranks")
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "eval.py", *args, "--out", str(out)], cwd=ROOT,
                           env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    request.addfinalizer(two.terminate)  # if the test did not run to its wait
    return two, args, out


EARLY = ["ranks_run"]  # conftest.early


def test_torchrun_with_fewer_sequences_than_ranks_ends_and_equals_one_process(ranks_run, tmp_path):
    """Rank 1 has no sequence: it must still reach every collective (no hang), and the scores are one process's."""
    two, args, out = ranks_run
    E.main(E.get_parser().parse_args([*args, "--out", str(tmp_path)]))
    _, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    one, two = (json.load(open(d / "results.json"))["results"] for d in (tmp_path, out))
    assert one == two
