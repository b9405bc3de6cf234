"""The DINO-world baseline: its mask, positions, best-of-many and sampling, and its training loop (DDP, resume)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import baseline_dinoworld as D
import data
import tokenizer as T
from predictor import clip_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--vfm", "tiny", "--model", "tiny", "--size", "32", "--num-workers", "0", "--val-clips", "2",
        "--val-samples", "2", "--log-every", "1", "--warmup", "2", "--dtype", "fp32"]
B, FRAMES, N, C = 2, 5, 16, 64  # tiny VFM at 32 px: 4 x 4 patches of 64 channels


def lifted(bom=0, heads=4, seed=0):
    """A tiny DINO-world whose LayerScales are lifted off 1e-5, so that every path carries signal."""
    torch.manual_seed(seed)
    a = (C // heads - 4) // 6 * 2
    model = D.DinoWorld(D.DinoWorldConfig(dim=C, depth=2, heads=heads, axes=(a, a, a), bom=bom))
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return model


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    feats = torch.randn(B, FRAMES, N, C)                                        # (B, T, N, C)
    gaps = torch.rand(B, FRAMES - 1) * 0.3 + 0.04                               # in [1/25, 1/3] s
    times = torch.cat([torch.zeros(B, 1), gaps.cumsum(1)], 1)                   # (B, T) seconds from frame 0
    return feats, times


def test_tiny_preset_rope_slices():
    tiny = D.build_dinoworld("tiny", T.VFM("tiny")).cfg  # 64 wide: one 64-d head, the paper's per-head layout
    assert (tiny.heads, tiny.axes) == (1, (20, 20, 20))
    vitb = D.build_dinoworld("tiny", type("VFM", (), dict(dim=768, heads=12))).cfg
    assert (vitb.heads, vitb.axes) == (12, (20, 20, 20))  # appendix A: 20 + 20 + 20 + 4 in each of 12 heads


def test_block_causal_mask_hides_the_same_and_later_frames(clip):
    feats, times = clip
    model = lifted()
    pred = model(feats, times)[:, 0]  # (B, T-1, N, C): frames 1..T-1
    for s in range(FRAMES - 1):  # change one patch of context frame s
        for patch in (0, 9):
            other = feats.clone()
            other[:, s, patch] += torch.randn(C)
            pred2 = model(other, times)[:, 0]
            for t in range(1, FRAMES):
                if s >= t:  # frame t may not see frame s
                    torch.testing.assert_close(pred2[:, t - 1], pred[:, t - 1], atol=1e-6, rtol=0)
                else:  # ... but every patch of it sees every patch of an earlier frame
                    assert ((pred2[:, t - 1] - pred[:, t - 1]).abs().amax(-1) > 1e-4).all()


def test_rope_positions_are_timestamps_and_a_centred_grid(clip):
    feats, times = clip
    pos = D.patch_positions(times, N)  # (B, T N, 3)
    grid = torch.linspace(-1, 1, 4)
    assert pos.shape == (B, FRAMES * N, 3)
    torch.testing.assert_close(pos[..., 0], times.repeat_interleave(N, 1))
    torch.testing.assert_close(pos[0, :4, 1], grid)                   # x runs along a row of patches ...
    torch.testing.assert_close(pos[0, :16:4, 2], grid)                # ... y down a column (row-major)
    torch.testing.assert_close(pos[0, :N, 1:], pos[1, -N:, 1:])       # the same grid in every frame and clip
    model = lifted()
    seen = {}
    forward = model.predictor.forward
    model.predictor.forward = lambda q, ctx, q_pos, k_pos, mask: seen.update(q=q_pos, k=k_pos) or \
        forward(q, ctx, q_pos, k_pos, mask)
    pred = model(feats, times)
    torch.testing.assert_close(seen["k"], D.patch_positions(times[:, :-1], N))  # context: frames 0..T-2
    torch.testing.assert_close(seen["q"], D.patch_positions(times[:, 1:], N))   # queries: frames 1..T-1
    # RoPE is relative: shifting every timestamp changes nothing; stretching the gaps does
    torch.testing.assert_close(model(feats, times + 0.5), pred, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model(feats, times * 1.5), pred, atol=1e-3)


def test_bom_keeps_no_graph_and_trains_only_the_best_candidate(clip):
    feats, times = clip
    model, K = lifted(bom=8), 8

    def saved_bytes(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            out = fn()
        return out, sum(sizes)

    noise = clip_noise(0, 3, range(B), K, FRAMES - 1, C, "cpu")  # K noise vectors per (clip, frame)
    loss, bom_saved = saved_bytes(lambda: D.world_loss(model, model, feats, times, noise)[0])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():
        cands = model(feats, times, noise)  # (B, K, T-1, N, C): all candidates in one pass ...
        for k in (0, 5):  # ... equal running each candidate alone
            torch.testing.assert_close(cands[:, k], model(feats, times, noise[:, k:k + 1])[:, 0], atol=1e-5, rtol=1e-5)
        losses = D.frame_loss(cands, feats[:, None, 1:])  # (B, K, T-1)
    best = losses.argmin(1)
    assert len(best.unique()) > 1  # a different winner for different (clip, frame)
    torch.testing.assert_close(loss.detach(), losses.min(1).values.mean(), atol=1e-6, rtol=1e-5)

    # manual re-run of the chosen noise alone, frame by frame with only the earlier frames as context: the same
    # gradient, and the candidate pass stored nothing (as many saved activations as this one re-run)
    chosen = noise.gather(1, best[:, None, :, None].expand(B, 1, FRAMES - 1, C))[:, 0]  # (B, T-1, C)
    manual = torch.stack([D.frame_loss(model.predict(feats[:, :t], times[:, :t], chosen[:, t - 1:t],
                                                     times[:, t:t + 1])[:, 0], feats[:, t])
                          for t in range(1, FRAMES)], 1).mean()
    manual.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4)
    _, one_saved = saved_bytes(lambda: D.frame_loss(model(feats, times, chosen[:, None]), feats[:, None, 1:]))
    assert bom_saved == one_saved


def test_sampling_rollout(clip):
    feats, times = clip
    det = lifted()
    out, tokens = det.sample(feats[:, :3], times[:, :5], 4, 2)
    assert out.shape == (B, 4, 2, N, C) and tokens is None
    assert (out == out[:, :1]).all()  # deterministic: every sample is the one prediction
    q = det.q_embed.weight.expand(B, 1, C)
    step1 = det.predict(feats[:, :3], times[:, :3], q, times[:, 3:4])
    step2 = det.predict(torch.cat([feats[:, :3], step1], 1), times[:, :4], q, times[:, 4:5])  # appended as context
    torch.testing.assert_close(out[:, 0], torch.cat([step1, step2], 1), atol=1e-5, rtol=1e-5)
    # the teacher-forced training forward predicts the first step the same way
    torch.testing.assert_close(det(feats[:, :4], times[:, :4])[:, 0, -1], step1[:, 0], atol=1e-5, rtol=1e-5)

    gen = lifted(bom=16)
    draw = lambda seed: gen.sample(feats[:, :3], times[:, :5], 3, 2, torch.Generator().manual_seed(seed))[0]
    a = draw(0)
    assert all(not torch.allclose(a[:, i], a[:, j], atol=1e-4) for i in range(3) for j in range(i))
    assert torch.equal(draw(0), a) and not torch.allclose(draw(1), a, atol=1e-4)


def test_tiny_dinoworld_learns_on_synthetic_videos():
    vfm = T.VFM("tiny")

    def clips(split, n, seed):
        ds = data.ClipDataset(data.open_source("synthetic", split), num_frames=8, size=64, seed=seed)
        frames, times, _ = zip(*(ds.sample(0, j) for j in range(n)))
        return vfm(torch.stack(frames)), torch.stack(times)

    train, train_times = clips("train", 64, 0)
    val, val_times = clips("val", 16, 1)

    def held_out():  # horizon 1 from 4 context frames
        with torch.no_grad():
            pred = model.sample(val[:, :4], val_times[:, :5], 1, 1)[0][:, 0, 0]
        return D.frame_loss(pred, val[:, 4]).mean().item()

    torch.manual_seed(0)  # one head of 64: 20 + 20 + 20 + 4, RoPE fine enough to find a patch's past
    model = D.DinoWorld(D.DinoWorldConfig(dim=C, depth=2, heads=1, axes=(20, 20, 20)))
    opt = T.make_optimizer(model, 1e-2, 0.4, torch.device("cpu"))
    initial = held_out()
    for step in range(150):
        for g in opt.param_groups:
            g["lr"] = T.lr_at(step, 1e-2, 10)
        idx = torch.randint(0, len(train), (16,))
        D.world_loss(model, model, train[idx], train_times[idx])[0].backward()
        opt.step()
        opt.zero_grad()
    final = held_out()
    copy_last = D.frame_loss(val[:, 3], val[:, 4]).mean().item()
    assert final < 0.5 * initial, (initial, final, copy_last)


def weights(out):
    return T.load_checkpoint(os.path.join(out, "ckpt.pt"))["model"]


DDP = [*TINY, "--bom", "4", "--steps", "2", "--global-batch", "8", "--eval-every", "2", "--ckpt-every", "2"]
EARLY = ["ddp_run"]  # conftest.early


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, request):
    """`torchrun --nproc_per_node 2` of test_two_process_ddp_with_accumulation_equals_one_process, started with the
    module's first test."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "baseline_dinoworld.py", *map(str, DDP), "--batch-size", "2", "--out", str(out)], cwd=ROOT,
                           env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    request.addfinalizer(two.terminate)  # if the test did not run to its wait
    return two, out


def test_two_process_ddp_with_accumulation_equals_one_process(ddp_run, tmp_path, capsys):
    two, out = ddp_run
    D.main(D.get_parser().parse_args([*DDP, "--batch-size", "8", "--out", str(tmp_path / "one")]))  # one process
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err
    w1, w2 = weights(tmp_path / "one"), weights(out)
    init = D.build_dinoworld("tiny", T.VFM("tiny"), bom=4).state_dict()
    assert any(not torch.allclose(w1[k], init[k]) for k in w1)  # it did train
    for k in w1:  # 2 processes x 2 micro-steps of 2 clips == 1 process x 8 clips, BoM noise included
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)
    log = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    check = [r["eval"] for r in log if "eval" in r][-1]  # horizons 1 and 3: best, mean, copy-last, smooth L1 + MSE
    assert {f"h{h}/{n}{m}" for h in (1, 3) for n in ("best", "mean", "copy_last") for m in ("", "/mse")} == set(check)
    assert "horizon 3: best-of-2" in capsys.readouterr().out


def test_resume_equals_uninterrupted_and_checkpoint_loads(tmp_path):
    common = [*TINY, "--global-batch", "2", "--batch-size", "2", "--eval-every", "100",
              "--ckpt-every", "2"]
    D.main(D.get_parser().parse_args([*common, "--steps", "4", "--out", str(tmp_path / "full")]))
    D.main(D.get_parser().parse_args([*common, "--steps", "2", "--out", str(tmp_path / "cut")]))
    D.main(D.get_parser().parse_args([*common, "--steps", "4", "--out", str(tmp_path / "cut"), "--resume"]))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
    ckpt = T.load_checkpoint(tmp_path / "cut" / "ckpt.pt")
    assert ckpt["kind"] == "dinoworld" and ckpt["step"] == 4 and ckpt["config"]["bom"] == 0
    model = D.load_dinoworld(str(tmp_path / "cut" / "ckpt.pt"))
    assert model.vfm.name == "tiny" and not model.training and model.cfg.axes == (20, 20, 20)
    torch.testing.assert_close(model.q_embed.weight, a["q_embed.weight"], atol=0, rtol=0)
    with pytest.raises(data.UserError, match="q_embed"):  # the BoM variant has no learned query
        T.load_state_strict(D.build_dinoworld("tiny", T.VFM("tiny"), bom=4), ckpt["model"], "test")
