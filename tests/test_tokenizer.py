"""DeltaTok and the frozen VFM: properties of the model, and of its training loop (DDP, resume, broken data)."""
import argparse
import functools
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch._dynamo.utils import counters

import data
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--vfm", "tiny", "--model", "tiny", "--size", "32", "--num-workers", "0", "--val-clips", "4",
        "--eval-every", "1000", "--log-every", "1", "--warmup", "2", "--dtype", "fp32"]  # RoPE jitter on: the default


@pytest.fixture(scope="module")
def vfm():
    return T.VFM("tiny")


@pytest.fixture(scope="module")
def feats(vfm):
    torch.manual_seed(0)
    return vfm(torch.randint(0, 256, (3, 4, 3, 32, 32), dtype=torch.uint8))  # (B, T, N, C)


EARLY = ["command_line"]  # conftest.early: its server starts with the first test


def train(*args):
    """tokenizer.py's main in this process (no interpreter start-up): the same code path as the command line."""
    return T.main(T.get_parser().parse_args([str(a) for a in args]))


def weights(out):
    return T.load_checkpoint(os.path.join(out, "ckpt.pt"))["model"]


def test_vfm_is_frozen_deterministic_and_checks_sizes(vfm, feats):
    assert feats.shape == (3, 4, 4, 64)  # 32 px / patch 16 = 2 x 2 patches of 64 channels
    assert not any(p.requires_grad for p in vfm.parameters())
    vfm.train()
    assert not vfm.model.training  # stays in eval mode: no RoPE jitter in the frozen backbone
    assert torch.equal(T.VFM("tiny").model.embeddings.patch_embeddings.weight,
                       vfm.model.embeddings.patch_embeddings.weight)  # every stage builds the same tiny VFM
    with pytest.raises(data.UserError, match="not divisible by the VFM patch size 16"):
        vfm(torch.zeros(1, 3, 30, 32, dtype=torch.uint8))


def test_missing_weights_error_says_how_to_fix():
    with pytest.raises(data.UserError, match="local Hugging Face cache|local copy"):
        T.VFM(T.DINOV3_B16)  # offline in tests
    with pytest.raises(data.UserError, match="config.json"):
        T.VFM(ROOT + "/tests")  # a folder without a DINOv3 config


def test_decoder_is_identity_at_init(vfm, feats):
    tok = T.build_deltatok("tiny", vfm).eval()
    x, y = feats[:, 0], feats[:, 1]
    out = tok.decode(tok.encode(x, y), x)
    # every block adds LayerScale(1e-5) x something of order 1: the output is x up to ~1e-5 per block
    assert (out - x).abs().max() < 1e-3 * x.abs().max()
    assert (out - x).abs().max() > 0  # ... but not exactly (the token does reach it)


def test_delta_mode_reads_previous_frame_and_frame_mode_does_not(vfm, feats):
    x, y = feats[:, 0], feats[:, 1]
    x2 = x + torch.randn_like(x)
    for mode, reads in (("delta", True), ("frame", False)):
        torch.manual_seed(0)
        tok = T.build_deltatok("tiny", vfm, mode).eval()  # eval: no RoPE jitter
        for p in tok.parameters():  # lift LayerScale so that every path carries signal
            p.data += 0.05 * torch.randn_like(p)
        token, token2 = tok.encode(x, y), tok.encode(x2, y)
        out, out2 = tok.decode(token, x), tok.decode(token, x2)
        assert (not torch.allclose(token, token2)) == reads
        assert (not torch.allclose(out, out2)) == reads


def test_clip_tokens_do_not_depend_on_other_clips(vfm, feats):
    tok = T.build_deltatok("tiny", vfm).eval()
    for p in tok.parameters():
        p.data += 0.05 * torch.randn_like(p)
    black = vfm.black((32, 32), "cpu")
    tokens = tok.tokenize(feats, black)
    other = feats.clone()
    other[1:] = torch.randn_like(other[1:])
    assert tokens.shape == (3, 4, 64)
    torch.testing.assert_close(tok.tokenize(other, black)[0], tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tok.tokenize(feats[:1], black)[0], tokens[0], atol=1e-5, rtol=1e-5)
    # the first frame is encoded against the black frame, the others against their predecessor
    torch.testing.assert_close(tokens[:, 0:1], tok.encode(black.expand(3, -1, -1), feats[:, 0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 2:3], tok.encode(feats[:, 1], feats[:, 2]), atol=1e-5, rtol=1e-5)


def test_reconstruction_protocols(vfm, feats):
    """Sequential (the release): each frame is encoded against the previous reconstruction; parallel: tokens from
    ground-truth pairs, decoded one after the other. The same at one step, different after it."""
    tok = T.build_deltatok("tiny", vfm).eval()
    for p in tok.parameters():
        p.data += 0.05 * torch.randn_like(p)
    x0, y = feats[:, 0], feats[:, 1:]
    seq, par = tok.reconstruct(y, x0, True), tok.reconstruct(y, x0, False)
    r1 = tok.decode(tok.encode(x0, y[:, 0]), x0)
    torch.testing.assert_close(seq[:, 0], r1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(par[:, 0], r1, atol=1e-5, rtol=1e-5)  # short horizon: identical
    torch.testing.assert_close(seq[:, 1], tok.decode(tok.encode(r1, y[:, 1]), r1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(par[:, 1], tok.decode(tok.encode(y[:, 0], y[:, 1]), r1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seq[:, 1], par[:, 1], atol=1e-4)


def test_released_attention_rotates_then_normalises_q_and_k():
    """The released block, written out by hand for one sequence: q, k, v projections; DINOv3's RoPE on the patch
    tokens (the prefix token unrotated); THEN the per-head LayerNorm (no bias) on q and k; softmax attention; a
    sigmoid gate per head from the attention's input; o_proj. A strict load cannot tell the orders apart."""
    torch.manual_seed(0)
    tok = T.DeltaTok(T.DeltaTokConfig(dim=32, heads=2, **T.MODEL_PRESETS["released"] | dict(depth=1)))
    attn = tok.encoder_blocks[0].attention
    for p in attn.parameters():
        p.data = torch.randn_like(p)
    x = torch.randn(1, 1 + 4, 32)  # a prefix token and a 2 x 2 patch grid
    cos, sin = tok._rope(4, x)
    got = attn(x, position_embeddings=(cos, sin))[0]

    def rotate(t):  # (L, d): rotate the patch rows only, pairs (j, j + d/2)
        half = t.shape[-1] // 2
        rot = torch.cat([-t[:, half:], t[:, :half]], -1)
        return torch.cat([t[:1], t[1:] * cos + rot[1:] * sin])

    def norm(t, w):  # LayerNorm over the head's 16 dims, weight only
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5) * w

    heads = []
    for h in range(2):
        sl = slice(16 * h, 16 * h + 16)
        q = norm(rotate((x[0] @ attn.q_proj.weight.T + attn.q_proj.bias)[:, sl]), attn.q_norm.weight)
        k = norm(rotate((x[0] @ attn.k_proj.weight.T)[:, sl]), attn.k_norm.weight)  # k_proj has no bias
        v = (x[0] @ attn.v_proj.weight.T + attn.v_proj.bias)[:, sl]
        gate = torch.sigmoid(x[0] @ attn.attn_gate.weight[h] + attn.attn_gate.bias[h])[:, None]
        heads.append(gate * torch.softmax(q @ k.T / 4, -1) @ v)
    want = torch.cat(heads, -1) @ attn.o_proj.weight.T + attn.o_proj.bias
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
    assert attn.q_norm.eps == attn.k_norm.eps == 1e-5 and attn.q_norm.bias is None


def test_log_cosh_loss_is_stable_and_matches_the_definition():
    d = torch.linspace(-5, 5, 101)
    torch.testing.assert_close(T.feature_loss(d, torch.zeros(101), "log-cosh"), torch.log(torch.cosh(d)).mean())
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    loss = T.feature_loss(big, torch.zeros(2), "log-cosh")
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - (1e4 - 0.6931)) < 1e-2  # cosh overflows; this does not
    torch.testing.assert_close(big.grad, torch.tensor([0.5, -0.5]))  # d/dd log cosh = tanh, averaged over 2
    assert T.feature_loss(d, torch.zeros(101)) == (d ** 2).mean()  # the default stays the paper's MSE


def test_init_from_a_previous_stage_keeps_weights_and_starts_fresh(tmp_path, capsys):
    """The release's staged schedule: --init a tokenizer.py checkpoint; the weights carry over, step and optimizer
    start again, as a line says."""
    common = TINY + ["--global-batch", "4", "--batch-size", "4"]
    train(*common, "--steps", "3", "--loss", "log-cosh", "--out", tmp_path / "s1")
    capsys.readouterr()
    train(*common, "--steps", "1", "--lr", "1e-30", "--init", tmp_path / "s1/ckpt.pt", "--out", tmp_path / "s2")
    assert f"--init {tmp_path / 's1/ckpt.pt'}: loaded its weights (3 steps); step 0, new AdamW\n" in \
        capsys.readouterr().out
    s1, s2 = (T.load_checkpoint(tmp_path / f"{s}/ckpt.pt") for s in ("s1", "s2"))
    assert s2["step"] == 1 and s2["args"]["loss"] == "mse"
    assert all(v["step"].item() == 1 for v in s2["optimizer"]["state"].values())  # fresh AdamW moments
    for k, v in s1["model"].items():
        torch.testing.assert_close(s2["model"][k], v, atol=1e-6, rtol=0)


def test_tiny_tokenizer_overfits_small_set(vfm, feats):
    torch.manual_seed(0)
    tok = T.build_deltatok("tiny", vfm, rope_rescale=None)
    opt = T.make_optimizer(tok, 1e-3, 1e-4, torch.device("cpu"))
    x, y = feats[:, :-1].flatten(0, 1), feats[:, 1:].flatten(0, 1)  # 9 frame pairs
    losses = []
    for step in range(100):  # the loss falls 200-fold by then (a million-fold by step 200)
        for g in opt.param_groups:
            g["lr"] = T.lr_at(step, 1e-3, 20)
        loss = F.mse_loss(tok(x, y), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1e-2)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_weight_decay_only_on_linear_weights(vfm):
    tok = T.build_deltatok("tiny", vfm)
    decay, no_decay = T.make_optimizer(tok, 1e-3, 1e-4, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in tok.named_parameters()}
    linear = {n + ".weight" for n, m in tok.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {names[id(p)] for p in decay["params"]} == linear
    assert any("lambda1" in names[id(p)] for p in no_decay["params"])
    assert any("embed" in names[id(p)] for p in no_decay["params"])


def test_released_layout_loads_strictly_and_wrong_shape_fails(tmp_path):
    with torch.device("meta"):  # shapes only: no 170 M random weights
        state = T.DeltaTok(T.DeltaTokConfig(**T.MODEL_PRESETS["released"])).state_dict()
    assert len(state) == 556 and round(sum(v.numel() for v in state.values()) / 1e6, 2) == 170.38
    assert state["encoder_blocks.3.attention.attn_gate.weight"].shape == (12, 768)
    assert state["decoder_blocks.11.mlp.gate_proj.weight"].shape == (2048, 768)
    assert "encoder_blocks.0.attention.k_proj.bias" not in state
    # a file of this layout, every weight full-shaped but one value repeated (stride 0): kilobytes, not 680 MB
    state = {k: torch.tensor(float(i)).expand(v.shape) for i, (k, v) in enumerate(state.items())}
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": state}, path)
    model, vfm_name = T.load_deltatok(str(path))
    assert vfm_name == T.DINOV3_B16
    loaded = model.state_dict()
    assert all((loaded[k] == v).all() for k, v in state.items())  # every weight from the file
    torch.save(dict(state, **{"xy_embed.weight": torch.zeros(3, 768)}), path)
    with pytest.raises(data.UserError, match="xy_embed.weight"):
        T.load_deltatok(str(path))
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "norm.bias"}}, path)
    with pytest.raises(data.UserError, match="norm.bias"):
        T.load_deltatok(str(path))


def test_rope_jitter_is_per_clip_and_the_same_for_any_split(vfm, feats):
    """The jitter scales each clip's patch coordinates by its own factors, drawn from (seed, step, clip): a clip's
    output depends on its factors only, factor 1 is no jitter, and the factors of clips 4-7 are the same whether
    drawn with clips 0-3 or alone (2 processes x 4 clips == 1 x 8)."""
    tok = T.build_deltatok("tiny", vfm)
    for p in tok.parameters():
        p.data += 0.05 * torch.randn_like(p)
    x, y = feats[:, 0], feats[:, 1]
    jitter = tok.jitter(0, 5, range(3), "cpu")                                   # (3, 2)
    assert jitter.shape == (3, 2) and (jitter >= 0.5).all() and (jitter <= 2).all() and len(jitter.unique()) == 6
    out = tok(x, y, jitter)
    torch.testing.assert_close(tok(x, y, torch.ones(3, 2)), tok(x, y), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, tok(x, y), atol=1e-5)
    other = jitter.clone()
    other[1:] = 1.5
    torch.testing.assert_close(tok(x, y, other)[0], out[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(tok.jitter(0, 5, range(8), "cpu")[4:], tok.jitter(0, 5, range(4, 8), "cpu"))
    assert T.build_deltatok("tiny", vfm, rope_rescale=None).jitter(0, 5, range(3), "cpu") is None


def test_training_two_process_ddp_equals_one_process(command_line, tmp_path):
    """With the default flags (RoPE jitter on): 2 processes x 4 clips == 1 x 8 == 4 micro-batches of 2. (torchrun
    itself starts tokenizer.py's ranks in test_stop's failing-rank test.)"""
    common = [*TINY, "--steps", "3", "--global-batch", "8", "--ckpt-every", "3"]
    two = command_line("tokenizer.py", *common, "--batch-size", "4", "--out", tmp_path / "two", ranks=2,
                       stderr=tmp_path / "stderr")
    train(*common, "--batch-size", "8", "--out", tmp_path / "one")
    train(*common, "--batch-size", "8", "--no-rope-jitter", "--out", tmp_path / "still")
    train(*common, "--batch-size", "2", "--out", tmp_path / "acc")
    for p in two:
        p.join(300)
    assert [p.exitcode for p in two] == [0, 0], (tmp_path / "stderr0").read_text()
    w1, w2, w3 = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(tmp_path / "acc")
    init = T.build_deltatok("tiny", T.VFM("tiny")).state_dict()
    assert any(not torch.allclose(w1[k], init[k]) for k in w1)  # it did train ...
    still = weights(tmp_path / "still")
    assert any(not torch.allclose(w1[k], still[k], atol=1e-6) for k in w1)  # ... with the jitter
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)  # 2 processes x batch 4 == 1 x 8
        torch.testing.assert_close(w3[k], w1[k], atol=2e-5, rtol=1e-4)  # 4 micro-batches of 2 == 1 x 8
    log = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert any("eval" in r for r in log)


def test_kill_and_resume_equals_uninterrupted(command_line, tmp_path):
    common = [*TINY[:-2], "--steps", "8", "--global-batch", "4", "--batch-size", "4", "--ckpt-every", "2"]
    train(*common, "--out", tmp_path / "full")
    out = tmp_path / "killed"
    proc = command_line("tokenizer.py", *common, "--out", out)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL mid-run, after at least one checkpoint
    proc.join()
    step = T.load_checkpoint(out / "ckpt.pt")["step"]
    assert 2 <= step <= 8
    train(*common, "--out", out, "--resume")
    a, b = weights(tmp_path / "full"), weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 9))  # nothing logged twice


def test_a_second_make_demo_resumes_and_more_steps_equal_one_longer_run(tmp_path):
    """`make demo TOK_STEPS=6000` after `make demo`: every training stage resumes from its checkpoint, and the
    tokenizer's 2 steps, then 4 with --resume, equal 4 steps in one run."""
    demo = subprocess.run(["make", "-n", "demo", "SETUP=", "RUN=python"], cwd=ROOT, capture_output=True, text=True)
    lines = demo.stdout.replace("\\\n", " ").splitlines()
    stages = [line.split() for line in lines if line.startswith("python") and "eval.py" not in line]
    assert len(stages) == 5 and all("--resume" in stage for stage in stages)
    common = [*TINY, "--global-batch", "4", "--batch-size", "4"]
    train(*common, "--steps", "4", "--out", tmp_path / "long")
    train(*common, "--steps", "2", "--out", tmp_path / "rerun")
    train(*common, "--steps", "4", "--out", tmp_path / "rerun", "--resume")
    a, b = weights(tmp_path / "long"), weights(tmp_path / "rerun")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    common = [*TINY, "--global-batch", "4", "--batch-size", "4", "--out", tmp_path]
    train(*common, "--steps", "2")
    with open(tmp_path / "log.jsonl", "a") as f:  # as if killed after logging steps 3 and 4 (the last line torn)
        f.write(json.dumps(dict(step=3, loss=1.0)) + "\n" + '{"step": 4, "lo')
    train(*common, "--steps", "3", "--resume")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert steps == [1, 2, 2, 3, 3]  # loss lines 1-3, the checks at steps 2 and 3, once each


def test_broken_video_is_skipped_counted_and_logged(tmp_path, capsys):
    import av
    import numpy as np
    root = tmp_path / "videos"
    root.mkdir()
    for i in range(2):
        with av.open(str(root / f"ok{i}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = 48, 48, "yuv420p"
            for k in range(20):
                img = np.full((48, 48, 3), (k * 10 + i * 50) % 256, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    (root / "broken.mp4").write_bytes(os.urandom(2000))
    train(*TINY, "--data", root, "--steps", "2", "--global-batch", "4", "--batch-size", "4", "--out", tmp_path / "run")
    out = capsys.readouterr()
    assert "broken.mp4" in out.out + out.err  # named, never silent
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.UserError, match=str(empty)):
        train(*TINY, "--data", empty, "--steps", "1", "--out", tmp_path / "x")


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train(*TINY, "--steps", "2", "--global-batch", "4", "--batch-size", "4", "--ckpt-every", "2", "--out", out)
    before = weights(out)
    with pytest.raises(SystemExit) as stop:
        train(*TINY, "--steps", "4", "--global-batch", "4", "--batch-size", "4", "--lr", "inf", "--out", out, "--resume",
              "--allow-changes")
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "non-finite" in err and f"kept at {out / 'ckpt.pt'}" in err
    after = T.load_checkpoint(out / "ckpt.pt")
    assert after["step"] == 2
    for k in before:
        assert torch.equal(after["model"][k], before[k])


def test_bench_flops_of_one_sample_scale_to_the_batch(vfm):
    """--bench counts FLOPs on one sample and multiplies by the batch: a step's FLOPs are linear in the batch."""
    tok = T.build_deltatok("tiny", vfm, "delta")
    frames = torch.randint(0, 256, (3, 2, 3, 64, 64), dtype=torch.uint8)

    def step(b):
        feats = vfm(frames[:b])
        F.mse_loss(tok(feats[:, 0], feats[:, 1]), feats[:, 1]).backward()
    assert data.count_flops(lambda: step(3)) == 3 * data.count_flops(lambda: step(1)) > 0


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_blocks_is_regional_and_equals_eager(backend, monkeypatch):
    """--compile compiles each block in place: one graph per kind of block whatever the depth (VFM layers without
    autograd; encoder and decoder blocks, which see other lengths), the outputs and gradients of eager, the same
    state dict keys. aot_eager traces what inductor compiles, in seconds; inductor takes a minute on a CPU."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch.nn.Module, "compile", functools.partialmethod(torch.nn.Module.compile, backend=backend))
    vfm = T.VFM("tiny")  # not the module's fixture, which stays eager
    torch.manual_seed(0)
    tok = T.build_deltatok("tiny", vfm, "delta")
    frames = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)

    def step():
        feats = vfm(frames)
        out = tok(feats[:, 0], feats[:, 1], torch.tensor([[1.5, 0.7], [0.6, 1.2]]))  # with the RoPE jitter
        out.pow(2).mean().backward()
        grads = [p.grad.clone() for p in tok.parameters()]
        tok.zero_grad()
        return [out.detach(), *grads]
    keys, eager = list(tok.state_dict()), step()
    T.compile_blocks(vfm, tok)
    counters.clear()
    compiled = step()
    assert counters["stats"]["unique_graphs"] == 3  # for 2 + 2 + 2 blocks
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    assert list(tok.state_dict()) == keys
    torch._dynamo.reset()


def wandb_runs(folder):
    """{run id: ([its run records, one a file], [history rows])} of W&B's offline files under `folder` (its transaction log: LevelDB's
    log format, 32 KiB blocks of chunks, each a 7-byte header (checksum, length, type) and data, after a 7-byte file
    header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    runs = {}
    for path in folder.glob("wandb/offline-run-*/run-*.wandb"):
        raw, pos, chunk = path.read_bytes(), 7, b""
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's padding
                pos += 32768 - pos % 32768
                continue
            n, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
            chunk, pos = chunk + raw[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):  # a whole record, or the last chunk of one
                record = pb.Record.FromString(chunk)
                chunk, which = b"", record.WhichOneof("record_type")
                if which == "run":
                    run = runs.setdefault(record.run.run_id, ([], []))
                    run[0].append(record.run)
                elif which == "history":
                    run[1].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return runs


def test_wandb_offline_keeps_one_run_across_resume_and_sends_no_step_twice(tmp_path, monkeypatch, capsys):
    """--wandb ENTITY/PROJECT with W&B offline (as its documentation says): every record of log.jsonl at its step,
    the flags as config, curves.png at each held-out check; a resume continues the same run and does not send the
    steps it replays after the checkpoint again; a W&B that fails warns once and the run goes on without it."""
    wandb = pytest.importorskip("wandb", reason="a test-only requirement: pip install -r requirements-test.txt")
    for k, v in dict(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true").items():
        monkeypatch.setenv(k, v)
    out, save = tmp_path / "run", T.save_checkpoint
    common = [*TINY, "--global-batch", "4", "--batch-size", "4", "--eval-every", "2", "--ckpt-every", "2", "--out", out,
              "--wandb", "team/deltatok"]
    monkeypatch.setattr(T, "save_checkpoint", lambda obj, path, master=True: obj["step"] <= 2 and save(obj, path))
    train(*common, "--steps", "4")  # killed, as it were, after logging steps 3 and 4: the checkpoint holds step 2
    first = (out / "curves.png").read_bytes()
    monkeypatch.setattr(T, "save_checkpoint", save)
    train(*common, "--steps", "6", "--resume")
    import eval as E  # and eval's table with the figures in its --out (here: curves.png)
    E.to_wandb(argparse.Namespace(wandb="eval", out=str(out)), 0, **{"results/synthetic": [dict(method="Present")]})
    wandb.teardown()  # the runs end and their files are written (wandb.finish may return before)
    runs = wandb_runs(tmp_path)
    starts, rows = runs.pop(run_id := T.load_checkpoint(out / "ckpt.pt")["args"]["wandb_id"])  # across the resume
    assert {(r.entity, r.project, r.display_name) for r in starts} == {("team", "deltatok", str(out))}
    configs = [{i.key: json.loads(i.value_json) for i in r.config.update} for r in starts]
    assert sorted(c["steps"] for c in configs) == [4, 6] and all(c["model"] == "tiny" for c in configs)
    assert sorted(r["_step"] for r in rows) == [1, 2, 3, 4, 5, 6]  # 3 and 4 once, though trained twice
    assert all({"loss", "lr", "grad_norm", "clips_per_s", "skipped_videos"} <= set(r) for r in rows)
    checks = [r["_step"] for r in rows if "eval/h3/deltatok/mse" in r and r["curves/_type"] == "image-file"]
    assert sorted(checks) == [2, 4, 6]
    [([run], [row])] = runs.values()  # no other run but eval's: its table, the figures in its --out
    assert run.project == "eval" and row["results/synthetic/_type"] == "table-file" and "curves/_type" in row
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl") if "loss" in line] == [1, 2, 3, 4, 5, 6]
    assert Image.open(out / "curves.png").size == (1260, 340) and (out / "curves.png").read_bytes() != first
    capsys.readouterr()
    monkeypatch.setattr(wandb, "init", lambda **kw: 1 / 0)  # W&B cannot start (nor finish, after teardown)
    train(*common, "--steps", "8", "--resume")
    err = [line for line in capsys.readouterr().err.splitlines() if "Weights & Biases" in line]
    assert len(err) == 1 and T.load_checkpoint(out / "ckpt.pt")["step"] == 8  # one warning, the run went on
    assert T.load_checkpoint(out / "ckpt.pt")["args"]["wandb_id"] == run_id  # a later --resume continues that run


def test_wandb_without_the_package_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import eval as E
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    for script, module in (("tokenizer", T), ("eval", E)):
        monkeypatch.setattr(sys, "argv", [f"{script}.py", "--wandb", "p", "--out", str(tmp_path / script)])
        with pytest.raises(SystemExit) as exit:
            data.cli(module.main, module.get_parser())
        assert exit.value.code == 2 and capsys.readouterr().err == f"{script}.py: error: --wandb needs the wandb " \
            "package: pip install wandb\n"
    assert not list(tmp_path.iterdir())


def test_curves_png_redraws_with_more_steps_from_a_log_read_in_bounded_memory(tmp_path):
    """curves.png has its size and is drawn again with the steps that came since; the log is read into at most
    `most` + 1 points a key, spread over all its steps, the last one kept."""
    def log(steps):
        with open(tmp_path / "log.jsonl", "a") as f:
            for s in steps:
                f.write(json.dumps(dict(step=s, loss=1 / s + (s * 7919 % 13) / 100, lr=1e-3)) + "\n")
                if s % 10 == 0:  # a held-out check
                    f.write(json.dumps(dict(step=s, eval={"h1/best": 1 / s, "h1/best/mse": 2.0})) + "\n")
    drawn = lambda: (np.ptp(np.asarray(Image.open(tmp_path / "curves.png")).astype(int), -1) > 60).sum()  # colour
    log(range(1, 11))
    data.draw_curves(str(tmp_path), "DeltaWorld", r"eval/(h\d/\w+)", "held-out loss")
    first, short = (tmp_path / "curves.png").read_bytes(), drawn()
    log(range(11, 20_011))
    data.draw_curves(str(tmp_path), "DeltaWorld", r"eval/(h\d/\w+)", "held-out loss")
    assert Image.open(tmp_path / "curves.png").size == (1260, 340) and (tmp_path / "curves.png").read_bytes() != first
    assert drawn() > 3 * short  # the noisy loss of 20,000 steps: far more drawn than of 10
    curves = data.read_log(tmp_path / "log.jsonl", most=100)
    assert set(curves) == {"loss", "lr", "eval/h1/best", "eval/h1/best/mse"}
    for points in curves.values():
        steps = [s for s, _ in points]
        assert len(steps) <= 101 and steps[-1] == 20_010 and steps[0] <= 256 and max(np.diff(steps)) <= 512
