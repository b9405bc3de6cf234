"""A user's mistake (a flag, a path, a file of the wrong kind) is one line on stderr and exit status 2, before
anything is built or written; no run writes over another's folder or its own inputs; a command with nothing to do
says so; the run folder is locked; a resume with other flags is refused unless allowed."""
import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import baseline_dinoworld as D
import data
import eval as E
import heads as H
import predictor as P
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"tokenizer": T, "predictor": P, "baseline_dinoworld": D, "heads": H, "eval": E, "data": data}
TINY = ["--vfm", "tiny", "--size", "32", "--num-workers", "0", "--steps", "1", "--global-batch", "2", "--batch-size",
        "2", "--val-clips", "1", "--dtype", "fp32"]
HEADS = ["--vfm", "tiny", "--size", "32", "--num-workers", "0", "--steps", "1", "--batch-size", "2",
         "--val-sequences", "1", "--dtype", "fp32"]


def cli(script, args, monkeypatch, capsys):
    """The script's command line in this process: (exit status, the lines it wrote on stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        data.cli(SCRIPTS[script].main, SCRIPTS[script].get_parser())
    return exit.value.code, capsys.readouterr().err.splitlines()  # not stripped: no blank line either


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints of every kind (only what the kind check reads), files that are no checkpoint at all, run folders
    holding a checkpoint, a tiny DeltaTok that loads, heads of other VFMs, a features file, frames, an audio file."""
    import av
    import numpy as np
    from PIL import Image
    d = tmp_path_factory.mktemp("files")
    out = {kind: d / f"{kind}.pt" for kind in ("deltatok", "deltaworld", "dinoworld", "seghead")}
    for kind, path in out.items():
        torch.save(dict(kind=kind, model={}), path)
    torch.save({"state_dict": {"encoder_blocks.0.norm1.weight": torch.zeros(2)}}, d / "released_deltatok.bin")
    torch.save({"predictor.blocks.0.norm1.weight": torch.zeros(2)}, d / "released_deltaworld.bin")
    (d / "truncated.pt").write_bytes((d / "released_deltatok.bin").read_bytes()[:200])
    (d / "notes.txt").write_text("not a checkpoint\n")
    (d / "md.md").write_text("# benchmarks\n<!-- bench-gpu -->\n<!-- /bench-gpu -->\n")
    torch.save(dict(dataset="synthetic", size=32, vfm="tiny", short=torch.zeros(1, 2, 1, 4, 64)), d / "features.pt")
    torch.save(torch.zeros(1, 2, 1, 4, 64), d / "tensor.pt")
    for run, state in (("tokrun", dict(kind="deltatok", model={}, step=5)), ("barerun", T.build_deltatok(
            "tiny", T.VFM("tiny")).state_dict())):  # a run of another stage; a bare state dict copied in as ckpt.pt
        (d / run).mkdir()
        torch.save(state, d / run / "ckpt.pt")
    tok = T.build_deltatok("tiny", T.VFM("tiny"))
    torch.save(dict(kind="deltatok", config=asdict(tok.cfg), vfm="tiny", model=tok.state_dict()), d / "tiny_tok.pt")
    other = T.build_deltatok("tiny", T.VFM("tiny"))  # the same kind, other weights
    torch.save(dict(kind="deltatok", config=asdict(other.cfg), vfm="tiny", model=other.state_dict()),
               d / "other_tok.pt")
    world = P.DeltaWorld(tok, model="tiny")  # trained on tiny_tok, as predictor.py records it
    torch.save(dict(kind="deltaworld", config=world.config, tokenizer=str(d / "tiny_tok.pt"), vfm="tiny",
                    tokenizer_sha1=P.file_sha1(str(d / "tiny_tok.pt")), model=world.state_dict()), d / "tiny_world.pt")
    (d / "export_other").mkdir()  # tokens exported by another tokenizer
    torch.save(dict(kind="token_export", tokenizer_sha1="0" * 40), d / "export_other" / "meta.pt")
    torch.save(dict(kind="deltaworld", tokenizer=str(d / "deleted.pt"), model={}), d / "orphan_world.pt")
    torch.save(H.SegHead(768, 4).state_dict(), d / "wide_head.bin")  # a released head: DINOv3 ViT-B, 768 wide
    torch.save(dict(kind="seghead", vfm="other", model=H.SegHead(64, 4).state_dict()), d / "other_head.pt")
    (d / "frames" / "v").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(d / "frames" / "v" / "000001.png")  # named by number: a frame folder, no video
    with av.open(str(d / "audio.mp4"), "w") as container:  # a file with no video stream
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return {**{k: str(v) for k, v in out.items()}, **{p.stem: str(p) for p in d.iterdir()}, "missing": str(d / "nope"),
            "dir": str(d)}


CASES = [  # script, arguments, what the one line must name
    ("tokenizer", ["--size", "0"], "--size"),
    ("tokenizer", ["--size", "40"], "--size"),
    ("tokenizer", ["--batch-size", "0"], "--batch-size"),
    ("tokenizer", ["--steps", "-5"], "--steps"),
    ("tokenizer", ["--steps", "0"], "--steps"),
    ("tokenizer", ["--lr", "0"], "--lr"),
    ("tokenizer", ["--num-workers", "-1"], "--num-workers"),
    ("tokenizer", ["--fps", "0"], "--fps"),
    ("tokenizer", ["--global-batch", "6", "--batch-size", "4"], "--global-batch"),
    ("tokenizer", ["--data", "{missing}"], "{missing}"),
    # a file that is no list of videos, a list of nothing readable: refused before a lock or index goes beside them
    ("tokenizer", ["--data", "{deltatok}"], "{deltatok} is no folder or text list of videos"),
    ("tokenizer", ["--data", "{notes}"], "no usable video in '{notes}' (1 missing: {dir}/not a checkpoint)"),
    ("tokenizer", ["--init", "{missing}"], "{missing}"),
    ("tokenizer", ["--init", "{truncated}"], "{truncated}"),
    ("tokenizer", ["--init", "{notes}"], "{notes}"),
    ("tokenizer", ["--init", "{deltaworld}"], "{deltaworld} is a deltaworld checkpoint, not deltatok"),
    ("tokenizer", ["--init", "{released_deltaworld}"], "{released_deltaworld} is a deltaworld checkpoint"),
    ("predictor", [], "--tokenizer"),
    ("predictor", ["--tokenizer", "{deltaworld}"], "{deltaworld} is a deltaworld checkpoint, not deltatok"),
    ("predictor", ["--tokenizer", "{deltatok}", "--init", "{dinoworld}"], "{dinoworld} is a dinoworld checkpoint, "
     "not deltaworld"),
    ("predictor", ["--tokenizer", "{deltatok}", "--bom", "0"], "--bom"),
    ("baseline_dinoworld", ["--init", "{deltaworld}"], "{deltaworld} is a deltaworld checkpoint, not dinoworld"),
    ("baseline_dinoworld", ["--init", "{released_deltaworld}"], "{released_deltaworld} is a deltaworld checkpoint"),
    ("heads", ["--task", "seg", "--steps", "0"], "--steps"),
    ("heads", ["--task", "seg", "--data", "vspw:{missing}"], "{missing}"),
    ("eval", ["--ckpt", "{seghead}"], "{seghead} is a seghead checkpoint"),
    ("eval", ["--ckpt", "{truncated}"], "{truncated}"),
    ("eval", ["--ckpt", "{released_deltatok}", "--kind", "deltaworld"], "{released_deltatok} is a deltatok checkpoint"),
    ("eval", ["--features", "{features}", "--size", "32", "--max-sequences", "1", "--horizons", "short", "--heads",
              "{deltatok}"],
     "{deltatok} is a deltatok checkpoint, not seghead or depthhead"),
    ("eval", ["--features", "{features}", "--size", "32"], "{features} has fewer than the 320 sequences"),
    ("eval", ["--features", "{features}", "--size", "64"], "{features} holds synthetic at 32 px, not synthetic at 64"),
    ("eval", ["--features", "{features}", "--data", "kitti:{missing}"], "{missing}"),
    ("eval", ["--ckpt", "{deltatok}", "--samples", "0"], "--samples"),
    # round 2 (issue 16): a path is checked before anything is built or made, for the role it plays
    ("tokenizer", ["--out", "{notes}"], "--out {notes} must be a folder you can write, and {notes} is a file"),
    ("predictor", ["--tokenizer", "{deltatok}", "--cache-tokens", "{notes}"], "--cache-tokens {notes} is a file: give "
     "a folder"),
    ("predictor", ["--tokenizer", "{deltatok}", "--val-data", "{missing}"], "--val-data {missing} does not exist"),
    ("eval", ["--ckpt", "{tiny_tok}", "--save-features", "{notes}/f.pt"], "--save-features {notes} must be a folder"),
    ("data", ["--bench", "{missing}"], "--bench {missing} does not exist"),
    ("data", ["--prepare", "{missing}", "{dir}/copy"], "SRC {missing} does not exist"),
    ("data", ["--prepare", "{frames}", "{notes}"], "DST {notes} must be a folder"),
    # no run writes over another run's folder, nor into what it reads
    ("predictor", ["--tokenizer", "{tokrun}/ckpt.pt", "--out", "{tokrun}"], "--out {tokrun} is the folder of "
     "--tokenizer {tokrun}/ckpt.pt"),
    ("predictor", ["--tokenizer", "{deltatok}", "--out", "{tokrun}", "--resume"], "--out {tokrun} holds a deltatok "
     "checkpoint"),
    ("tokenizer", ["--out", "{tokrun}"], "--out {tokrun} holds a deltatok checkpoint ({tokrun}/ckpt.pt): --resume"),
    ("tokenizer", ["--data", "{frames}", "--out", "{frames}/run"], "--out {frames}/run is inside the folder of --data"),
    ("predictor", ["--tokenizer", "{deltatok}", "--cache-tokens", "{frames}", "--out", "{frames}/v"], "--out "
     "{frames}/v is inside the folder of --cache-tokens"),
    ("data", ["--prepare", "{frames}", "{frames}"], "DST {frames} is the folder of SRC {frames}"),
    ("data", ["--prepare", "{frames}", "{frames}/v/copy"], "DST {frames}/v/copy is inside the folder of SRC"),
    ("eval", ["--ckpt", "{tiny_tok}", "--save-features", "{deltatok}"], "--save-features {deltatok} is not a "
     "features file"),
    # a command that would do nothing says so
    ("data", ["--prepare", "{frames}", "{dir}/copy"], "no video files"),  # frames named by number: no --fps either
    # a loaded file is checked for what its kind needs
    ("tokenizer", ["--out", "{barerun}", "--resume"], "--resume: {barerun}/ckpt.pt holds no training state"),
    ("eval", ["--features", "{tensor}", "--size", "32"], "--features {tensor} is not a features file"),
    ("eval", ["--video", "synthetic", "--ckpt", "{tiny_tok}", "--heads", "{wide_head}", "--size", "32"],
     "head {wide_head} was trained on VFM"),
    ("eval", ["--ckpt", "{tiny_tok}", "--heads", "{other_head}", "--size", "32"], "head {other_head} was trained on "
     "VFM 'other'"),
    ("eval", ["--ckpt", "{orphan_world}"], "{orphan_world} records its tokenizer at {dir}/deleted.pt, which is gone"),
    ("eval", ["--video", "{audio}", "--ckpt", "{tiny_tok}"], "no video stream in {audio}"),
    # dataset readers: a task the dataset has no labels for
    ("heads", ["--task", "depth", "--data", "vspw:{dir}"], "vspw has seg labels, not depth"),
    # flag ranges
    ("data", ["--prepare", "{frames}", "{dir}/copy", "--workers", "0"], "--workers"),
    # more of the same kind, beyond the list
    ("tokenizer", ["--val-data", "{missing}"], "--val-data {missing} does not exist"),
    ("baseline_dinoworld", ["--out", "{tokrun}", "--resume"], "--out {tokrun} holds a deltatok checkpoint"),
    ("baseline_dinoworld", ["--init", "{missing}"], "--init {missing} does not exist"),
    ("heads", ["--task", "seg", "--data", "kitti:{dir}"], "kitti has depth labels, not seg"),
    ("heads", ["--task", "depth", "--data", "kitti:{dir}", "--kitti-split", "{missing}"], "--kitti-split {missing}"),
    ("heads", ["--task", "seg", "--out", "{tokrun}"], "--out {tokrun} holds a deltatok checkpoint"),
    ("heads", ["--task", "seg", "--size", "28x56"], "frame size 28x56 is not divisible by the VFM patch size 16"),
    ("eval", ["--ckpt", "{tiny_tok}", "--out", "{tokrun}"], "--out {tokrun} holds a deltatok checkpoint"),
    ("eval", ["--ckpt", "{tiny_tok}", "--heads", "cityscapes={missing}"], "--heads {missing} does not exist"),
    ("eval", ["--ckpt", "{tiny_tok}", "--rgb-head", "{missing}"], "--rgb-head {missing} does not exist"),
    ("eval", ["--ckpt", "{tiny_tok}", "--data", "synthetic", "kitti:{dir}", "--kitti-split", "{missing}"],
     "--kitti-split {missing} does not exist"),
    ("data", ["--prepare", "{frames}", "{dir}/copy", "--short-side", "1"], "--short-side"),
    # round 3 (issue 26): a PCA file goes to a new name (runs record it by SHA-256), checked before the index or a fit
    ("tokenizer", ["--fit-pca", "16", "1", "--pca", "{tokrun}/ckpt.pt"], "--pca {tokrun}/ckpt.pt exists"),
    ("tokenizer", ["--convert-pca", "{notes}", "--pca", "{deltatok}"], "--pca {deltatok} exists"),
    ("tokenizer", ["--fit-pca", "16", "1"], "--fit-pca and --convert-pca write --pca: give one"),
    ("tokenizer", ["--fit-pca", "80", "1", "--data", "{frames}", "--pca", "{dir}/new/pca.pt"], "--fit-pca 80: want at "
     "most the features' 64 components"),
    ("tokenizer", ["--fit-pca", "24", "1", "--data", "{frames}", "--pca", "{dir}/new/pca.pt"], "multiple of the head "
     "width 16"),
    ("tokenizer", ["--vfm-layers", "1,1", "--data", "{frames}"], "--vfm-layers 1,1: want distinct blocks, 0 to 1"),
    ("tokenizer", ["--convert-pca", "{notes}", "--pca", "{dir}/new/pca.pt"], "--convert-pca {notes}: not "
     "DINO-Foresight's PCA"),
    # round 3 (issue 26): what a run records is checked, never mixed in or written over
    ("eval", ["--ckpt", "{tiny_world}", "--tokenizer", "{other_tok}", "--size", "32"], "--ckpt {tiny_world} was "
     "trained with another tokenizer than {other_tok}"),
    ("eval", ["--ckpt", "{tiny_tok}", "--data", "synthetic", "synthetic", "--save-features", "{dir}/f.pt"],
     "--save-features takes one --ckpt, one --data"),
    ("predictor", ["--tokenizer", "{tiny_tok}", "--export-tokens", "{export_other}"], "--export-tokens {export_other} "
     "was made with other settings ({{'tokenizer_sha1': '0000"),
    ("predictor", ["--tokenizer", "{tiny_tok}", "--cache-tokens", "{export_other}"], "--cache-tokens "
     "{export_other}/meta.pt is a token_export checkpoint, not token_cache"),
    # every refusal comes before anything is written, the index of --data included
    ("tokenizer", ["--data", "{frames}", "--fps", "10", "--vfm-layers", "9"], "--vfm-layers 9"),
    ("tokenizer", ["--data", "{frames}", "--fps", "10", "--init", "{tiny_tok}", "--vfm", "dinov2-tiny"],
     "{tiny_tok} was trained on the features tiny, not dinov2-tiny"),
    ("predictor", ["--data", "{frames}", "--fps", "10", "--tokenizer", "{deltaworld}"], "{deltaworld} is a deltaworld "
     "checkpoint"),
    ("baseline_dinoworld", ["--data", "{frames}", "--fps", "10", "--vfm", "{missing}"], "VFM '{missing}': there is "
     "no folder {missing}"),
    # round 4 (issue 29): a missing folder is not looked for on the hub; a failed download names the offline way
    ("tokenizer", ["--vfm", "./nowhere/dinov3"], "VFM './nowhere/dinov3': there is no folder ./nowhere/dinov3"),
    ("tokenizer", ["--vfm", "facebook/no-such-dinov3", "--bench", "1"], "offline without weights (--bench, --flops): "
     "--vfm vitb16-random"),
    ("predictor", ["--tokenizer", "{tiny_tok}", "--data", "{frames}", "--fps", "10", "--export-tokens", "{tokrun}"],
     "--export-tokens {tokrun} holds files it did not make"),
]


@pytest.mark.parametrize("script,args,named", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_a_bad_input_is_one_line_exit_2_and_nothing_written(script, args, named, files, tmp_path, monkeypatch,
                                                            capsys):
    common = {"eval": [], "data": [], "heads": HEADS, "predictor": TINY[2:] + ["--model", "tiny"]}.get(
        script, TINY + ["--model", "tiny"])
    out = [] if script == "data" else ["--out", tmp_path / "run"]  # a case may give its own
    state = lambda: {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(files["dir"]).rglob("*")}
    before = state()
    status, err = cli(script, common + out + [a.format(**files) for a in args], monkeypatch, capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"{script}.py: error: ") and named.format(**files) in err[0], err
    assert not (tmp_path / "run").exists() and state() == before  # no folder made, no file changed


# the class, not the cases: every flag of every script that takes a string is classified here, by what it names, and
# each path flag is tried with each wrong path its role admits; a new flag fails test_every_string_flag_is_classified
# until it has a row. A row: (role, the flag in a command line: "{}" the wrong path, {name} a file of `files`). Roles:
# a file read (in), videos (a folder or a list), a dataset's folder (root), a backbone (vfm), the run folder (out), a
# folder of tokens (shards, cache), the index's folder, a folder written (DST), a file written over (file).
PATHS = {
    "data": {"--bench": ("videos", "--bench {}"), "SRC": ("videos", "--prepare {} {tmp}/copy"),
             "DST": ("folder", "--prepare {frames} {}"), "JSONL": ("in", "--bench-table {} {md}"),
             "MD": ("file", "--bench-table {tiny_tok} {}"), "--index": ("index", "--bench {frames} --index {}")},
    "tokenizer": {"--out": ("out", "--init {tiny_tok} --out {}"), "--vfm": ("vfm", "--vfm {}"), "--vfm-layers": None,
                  "--pca": ("in", "--pca {}"), "--init": ("in", "--init {}"), "--data": ("videos", "--data {}"),
                  "--convert-pca": ("in", "--convert-pca {} --pca {tmp}/pca.pt"),
                  "--val-data": ("videos", "--val-data {}"), "--index": ("index", "--index {}"), "--wandb": None},
    "predictor": {"--tokenizer": ("in", "--tokenizer {}"), "--out": ("out", "--out {}"), "--vfm": ("vfm", "--vfm {}"),
                  "--init": ("in", "--init {}"), "--cache-tokens": ("cache", "--cache-tokens {}"),
                  "--export-tokens": ("shards", "--export-tokens {}"), "--data": ("videos", "--data {}"),
                  "--val-data": ("videos", "--val-data {}"), "--index": ("index", "--index {}"), "--wandb": None},
    "baseline_dinoworld": {"--out": ("out", "--init {dinoworld} --out {}"), "--vfm": ("vfm", "--vfm {}"),
                           "--init": ("in", "--init {}"), "--data": ("videos", "--data {}"),
                           "--val-data": ("videos", "--val-data {}"), "--index": ("index", "--index {}"),
                           "--vfm-layers": None, "--pca": ("in", "--pca {}"), "--wandb": None},
    "heads": {"--data": ("root", "--data vspw:{}"), "--kitti-split": ("in", "--kitti-split {}"),
              "--kitti-val-split": ("in", "--kitti-val-split {}"), "--kitti-raw": ("root", "--kitti-raw {}"),
              "--out": ("out", "--kitti-split {notes} --out {}"), "--vfm": ("vfm", "--vfm {}"),
              "--vfm-layers": None, "--pca": ("in", "--pca {}"), "--wandb": None},
    "eval": {"--ckpt": ("in", "--ckpt {}"), "--tokenizer": ("in", "--ckpt {tiny_tok} --tokenizer {}"),
             "--features": ("in", "--features {}"), "--save-features": ("file", "--ckpt {tiny_tok} --save-features {}"),
             "--data": ("root", "--ckpt {tiny_tok} --data vspw:{}"),
             "--kitti-split": ("in", "--ckpt {tiny_tok} --data kitti:{dir} --kitti-split {}"),
             "--kitti-raw": ("root", "--ckpt {tiny_tok} --kitti-raw {}"),
             "--heads": ("in", "--ckpt {tiny_tok} --heads {}"), "--rgb-head": ("in", "--ckpt {tiny_tok} --rgb-head {}"),
             "--video": ("videos", "--ckpt {tiny_tok} --video {}"),
             "--vfm": ("vfm", "--ckpt {tiny_tok} --vfm {}"), "--out": ("out", "--ckpt {tiny_tok} --out {}"),
             "--wandb": None},
}
KINDS = {  # the wrong paths of each role: missing, a file where a folder is meant (file) and the reverse (dir), a link
    # to nothing, another run's folder or its checkpoint (run), an input of the same command or its folder (input),
    # --out itself (out), a file inside --out (in-out)
    "in": "missing dir dangling in-out", "videos": "missing dangling out", "root": "missing file dangling out",
    "vfm": "missing file dangling", "out": "file dangling run input", "shards": "file dangling run input",
    "cache": "file dangling run input out", "index": "file dangling", "folder": "file dangling input",
    "file": "dir dangling run input"}
XFAIL = {}  # (script, flag, kind): why, for what another helper fixes
ROWS = [(script, flag, kind) for script, flags in PATHS.items() for flag, row in flags.items() if row
        for kind in KINDS[row[0]].split()  # (data.py and --convert-pca write no --out)
        if kind not in ("out", "in-out") or script != "data" and "--convert-pca" not in row[1]]


def test_every_string_flag_is_classified():
    """Every flag that takes a string (no type, no choices) has a row in PATHS, and every row names such a flag."""
    for script, module in SCRIPTS.items():
        found = {name for a in module.get_parser()._actions if isinstance(a, argparse._StoreAction) and a.type is None
                 and a.choices is None for name in (a.metavar if isinstance(a.metavar, tuple) else a.option_strings)}
        assert found == set(PATHS[script]), (script, found ^ set(PATHS[script]))


@pytest.mark.parametrize("script,flag,kind", [pytest.param(*r, marks=pytest.mark.xfail(reason=XFAIL[r], strict=True))
                                              if r in XFAIL else r for r in ROWS], ids=map(" ".join, ROWS))
def test_every_path_flag_refuses_every_kind_of_wrong_path(script, flag, kind, files, tmp_path, monkeypatch, capsys):
    """A wrong path of each kind its role admits: one line that names the flag or the path, exit 2, nothing made,
    no input changed."""
    role, template = PATHS[script][flag]
    named = re.findall(r"{(\w+)}", template.replace("{tmp}", ""))  # the inputs it names (predictor: --tokenizer)
    given = files[named[0] if named else "tiny_tok"]
    written = role == "file"  # a file written, else a folder
    path = {"missing": tmp_path / "nowhere" / "x", "file": files["notes"], "dir": files["frames"],
            "dangling": tmp_path / "link", "run": Path(files["tokrun"]) / ("ckpt.pt" if written else ""),
            "input": given if written or os.path.isdir(given) else os.path.dirname(given), "out": tmp_path / "run",
            "in-out": tmp_path / "run" / "in.pt"}[kind]
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    if kind in ("out", "in-out"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "in.pt").write_bytes(Path(files["tiny_tok"]).read_bytes())
    common = {"data": [], "eval": ["--size", "32"], "heads": [*HEADS, "--task", "seg"],
              "predictor": [*TINY[2:], "--model", "tiny", "--tokenizer", files["tiny_tok"]]}.get(
        script, [*TINY, "--model", "tiny"])
    args = common + ["--out", tmp_path / "run"] * (script != "data") + [
        a.format(str(path), tmp=tmp_path, **files) for a in template.split()]
    state = lambda: {p: (p.stat(follow_symlinks=False).st_size, p.stat(follow_symlinks=False).st_mtime_ns)
                     for d in (files["dir"], tmp_path) for p in Path(d).rglob("*")}
    before = state()
    status, err = cli(script, args, monkeypatch, capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith(f"{script}.py: error: "), err
    assert flag in err[0] or str(path) in err[0], err
    assert state() == before  # nothing made, no input changed


EARLY = ["command_lines"]  # conftest.early


@pytest.fixture(scope="module")
def command_lines(tmp_path_factory, request):
    """tokenizer.py in its own interpreter, as a user runs it: converting a PCA file that would run `touch marker` (a
    dotted name through numpy, as pickle protocol 4 resolves it), and with data that the loader's worker rejects (the
    only video is too short for any clip). Both start with the module's first test; a test that reads one's (stderr,
    exit status) waits for it."""
    from PIL import Image
    d = tmp_path_factory.mktemp("cli")
    (d / "videos" / "v").mkdir(parents=True)
    for name in ("0.000.png", "0.010.png"):
        Image.new("RGB", (40, 40)).save(d / "videos" / "v" / name)
    touch = f"touch {d / 'marker'}".encode()
    (d / "evil.pth").write_bytes(b"\x80\x04\x8c\x05numpy\x8c\x0ef2py.os.system\x93\x8c%c%s\x85R." % (len(touch), touch))
    runs = {"pickle": ["--convert-pca", d / "evil.pth", "--pca", d / "pca" / "pca.pt"], "data": [
        *TINY, "--model", "tiny", "--data", d / "videos", "--val-data", "synthetic", "--num-workers", "1", "--out",
        d / "run"]}
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = {k: subprocess.Popen([sys.executable, "tokenizer.py", *map(str, args)], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, args in runs.items()}
    for p in procs.values():
        request.addfinalizer(p.terminate)  # if no test waited for it

    class Ended(dict):
        def __missing__(self, k):
            self[k] = procs[k].communicate(timeout=300)[1], procs[k].returncode
            return self[k]
    return Ended(run=d / "run")


def test_the_command_line_prints_no_traceback_and_a_crafted_pca_file_runs_nothing(command_lines):
    err, status = command_lines["pickle"]
    d = command_lines["run"].parent
    assert status == 2 and err == f"tokenizer.py: error: --convert-pca {d}/evil.pth: not DINO-Foresight's PCA " \
        "(UnpicklingError: it names numpy.f2py.os.system, which a PCA file does not need)\n", err
    assert not (d / "marker").exists() and not (d / "pca").exists()


def test_resume_with_other_flags_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    args = [*TINY, "--model", "tiny", "--out", tmp_path]
    T.main(T.get_parser().parse_args(map(str, [*args, "--resume"])))  # the first job of a requeue loop: no checkpoint
    assert f"--resume: no checkpoint in {tmp_path} yet: starting from step 0\n" in capsys.readouterr().out
    status, err = cli("tokenizer", [*args, "--steps", "2", "--resume", "--lr", "2e-3", "--seed", "1"], monkeypatch,
                      capsys)
    assert status == 2 and len(err) == 1 and "--lr 0.001 --seed 0, not --lr 0.002 --seed 1" in err[0], err
    assert T.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1
    T.main(T.get_parser().parse_args(map(str, [*args, "--steps", "2", "--resume", "--lr", "2e-3", "--allow-changes"])))
    assert T.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2  # more steps, a new --batch-size: always allowed


def test_a_deltaworld_takes_a_copy_of_the_tokenizer_it_records(files, tmp_path):
    """(Another tokenizer is refused: a row of CASES.)"""
    shutil.copy(files["tiny_tok"], tmp_path / "moved.pt")
    assert P.load_deltaworld(files["tiny_world"], tokenizer=str(tmp_path / "moved.pt")).config["model"] == "tiny"


def test_resume_takes_a_path_written_another_way_as_the_same(tmp_path, monkeypatch):
    """--data ./videos, videos/, its absolute path or a link to it name the folder the run recorded as videos: no
    change; another folder is one (heads.py's NAME:ROOT alike)."""
    monkeypatch.chdir(tmp_path)
    for folder in ("run", "videos", "other"):
        (tmp_path / folder).mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "videos")
    torch.save(dict(kind="deltatok", model={}, optimizer={}, step=1, args=dict(data="videos", spec="vspw:videos")),
               tmp_path / "run" / "ckpt.pt")
    run = lambda data, spec: T.check_run(argparse.Namespace(out="run", resume=True, allow_changes=False, data=data,
                                                            spec=spec), "deltatok")
    for same in ("./videos", "videos/", str(tmp_path / "videos"), "link"):
        assert run(same, "vspw:" + same)["step"] == 1
    for data_, spec in (("other", "vspw:videos"), ("videos", "vspw:other"), ("videos", "kitti:videos")):
        with pytest.raises(data.UserError, match="--resume: run/ckpt.pt was trained with"):
            run(data_, spec)


def test_a_run_folder_is_written_by_one_run_at_a_time(tmp_path, monkeypatch, capsys):
    with open(tmp_path / ".lock", "w") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, err = cli("tokenizer", [*TINY, "--model", "tiny", "--out", tmp_path], monkeypatch, capsys)
    assert status == 2 and len(err) == 1 and f"another run is writing to {tmp_path}" in err[0], err
    assert not (tmp_path / "ckpt.pt").exists()


def test_checkpoints_are_written_through_a_temporary_file_of_their_own_and_never_non_finite(tmp_path, monkeypatch):
    names = []
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: names.append(f.name) or save(obj, f))
    path = str(tmp_path / "ckpt.pt")
    T.save_checkpoint(dict(model={"w": torch.ones(2)}, step=1), path)
    assert names == [f"{path}.{os.getpid()}.tmp"] and os.listdir(tmp_path) == ["ckpt.pt"]
    with pytest.raises(SystemExit) as stop:
        T.save_checkpoint(dict(model={"w": torch.tensor([1.0, float("nan")])}, step=2), path)
    assert stop.value.code == 1 and T.load_checkpoint(path)["step"] == 1 and len(names) == 1


def test_a_data_error_in_a_loader_worker_is_the_last_line_after_the_progress_bar(command_lines):
    """The loader's worker fails inside the training loop, after the progress bar started. The error is still one
    line, the worker's message alone, and the last line printed."""
    stderr, status = command_lines["data"]
    err = stderr.strip().splitlines()
    assert status == 2 and "%|" in "".join(err[:-1]), err  # the bar was drawn ...
    assert err[-1].startswith("tokenizer.py: error: no readable video long enough for 2 frames"), err  # ... before
    assert "Traceback" not in stderr and "\n\n" not in stderr and os.listdir(command_lines["run"]) == []  # no lock



def test_prepare_with_every_copy_present_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from videos import make_video
    (tmp_path / "src").mkdir()
    make_video(str(tmp_path / "src" / "a.mp4"), height=32, seconds=0.2)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "a.mp4").write_bytes(b"copied by an earlier run")
    monkeypatch.setattr(sys, "argv", ["data.py", "--prepare", str(tmp_path / "src"), str(tmp_path / "dst")])
    data.cli(data.main, data.get_parser())
    out = capsys.readouterr()
    assert out.out == f"every video under {tmp_path / 'src'} (1) is already copied to {tmp_path / 'dst'}: nothing " \
        "to do\n" and out.err == ""
    assert (tmp_path / "dst" / "a.mp4").read_bytes() == b"copied by an earlier run"


def test_released_files_are_recognised_by_their_keys():
    vfm = T.VFM("tiny")
    tok = T.build_deltatok("tiny", vfm)
    states = dict(deltatok=tok, deltaworld=P.DeltaWorld(tok, model="tiny"), seghead=H.SegHead(64, 19),
                  depthhead=H.DepthHead(64), rgbhead=E.RGBHead(vfm.model.norm, 144, 1, 256, 4))
    for kind, module in states.items():
        state = module.state_dict()
        assert T.checkpoint_kind(state) == T.checkpoint_kind({"state_dict": state}) == kind
    assert T.checkpoint_kind(dict(kind="dinoworld", model={})) == "dinoworld" and T.checkpoint_kind({"x": 1}) is None


def test_help_says_each_default_once():
    """Every flag's help names its default at most once (argparse adds "(default: X)" unless the text says it)."""
    for name, script in [*SCRIPTS.items(), ("data", data)]:
        flags = script.get_parser().format_help().split("\n  -")[1:]  # one entry per flag, its help wrapped
        for flag in flags:
            assert " ".join(flag.split()).count("default") <= 1, (name, flag)
            assert "(default: )" not in flag and "(default: None)" not in flag, (name, flag)


def test_worker_default_is_the_cores_per_process_at_most_8(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = lambda n: monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
    cores(2)
    assert T.get_parser().parse_args([]).num_workers == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 processes share the node's cores
    assert data.cpu_workers() == 1
    cores(64)
    assert data.cpu_workers() == 8 and P.get_parser().parse_args([]).num_workers == 8
    assert H.get_parser().parse_args(["--task", "seg"]).num_workers == 4 == E.get_parser().parse_args([]).num_workers
    monkeypatch.undo()  # this machine's cores: the default draws no "suggested max number of worker" warning
    loader = torch.utils.data.DataLoader(range(4), num_workers=D.get_parser().parse_args([]).num_workers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.check_worker_number_rationality()
