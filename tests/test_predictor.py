"""The predictor and DeltaWorld: masks, RoPE, best-of-many, sampling, learning, token cache, DDP, resume, --init."""
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import predictor as P
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--size", "32", "--num-workers", "0", "--val-clips", "4", "--val-samples", "2",
        "--eval-every", "1000", "--log-every", "1", "--warmup", "2", "--dtype", "fp32", "--bom", "8"]


def lift(module, scale=0.05):
    """Perturb every weight (LayerScale starts at 1e-5) so that every path carries signal."""
    torch.manual_seed(1)
    for p in module.parameters():
        p.data += scale * torch.randn_like(p)
    return module


def tiny_world(bom=True, tokenizer=None, vfm=None):
    tokenizer = tokenizer or SimpleNamespace(cfg=SimpleNamespace(dim=64, heads=4))  # only its width is read
    torch.manual_seed(0)
    return lift(P.DeltaWorld(tokenizer, vfm, "tiny", bom=bom))


def clip(B=2, L=8, C=64):
    torch.manual_seed(2)
    return torch.randn(B, L, C), torch.cumsum(torch.rand(B, L) * 0.3, 1) - 0.1  # tokens (B, T, C), times (B, T)


def train(out, *args):
    """predictor.py's main in this process (single process, as a plain `python predictor.py` run)."""
    torch.set_num_threads(1)
    P.main(P.get_parser().parse_args([*TINY, "--out", str(out), *args]))
    return T.load_checkpoint(os.path.join(out, "ckpt.pt"))


@pytest.fixture(scope="session")
def tok_ckpt(tmp_path_factory):
    """A tiny DeltaTok trained briefly on the synthetic videos (about 10 s): good enough to beat copy-last."""
    out = tmp_path_factory.mktemp("tok")
    torch.set_num_threads(1)
    T.main(T.get_parser().parse_args(["--vfm", "tiny", "--model", "tiny", "--size", "32", "--steps", "150",
                                      "--global-batch", "16", "--batch-size", "16", "--warmup", "10",
                                      "--num-workers", "0", "--val-clips", "4", "--eval-every", "1000",
                                      "--dtype", "fp32", "--out", str(out)]))
    return str(out / "ckpt.pt")


EARLY = ["ddp_run"]  # conftest.early


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, request):
    """`torchrun --nproc_per_node 2` of test_two_process_ddp_equals_one_process, started with the module's first test
    (before tok_ckpt: a one-step DeltaTok will do): (the process, its arguments but --batch-size and --out, its
    folder)."""
    tok, out = tmp_path_factory.mktemp("ddp") / "tok", tmp_path_factory.mktemp("ddp") / "two"
    T.main(T.get_parser().parse_args(["--vfm", "tiny", "--model", "tiny", "--size", "32", "--steps", "1",
                                      "--global-batch", "4", "--batch-size", "4", "--num-workers", "0", "--val-clips",
                                      "1", "--dtype", "fp32", "--out", str(tok)]))
    common = [*TINY, "--tokenizer", str(tok / "ckpt.pt"), "--steps", "3", "--global-batch", "8", "--ckpt-every", "3"]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "predictor.py", *common, "--batch-size", "2", "--out", str(out)],  # 2 x 2 x accum 2
                           cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    request.addfinalizer(two.terminate)  # if the test did not run to its wait
    return two, common, out


# ----------------------------------------------------------------------------------------------------------------
# the predictor

def test_rope_is_relative_and_leaves_the_rest_untouched():
    torch.manual_seed(0)
    for axes, head_dim in (((12,), 16), ((20, 20, 20), 64)):
        q, k = torch.randn(2, 3, 5, head_dim), torch.randn(2, 3, 7, head_dim)
        q_pos, k_pos = torch.randn(2, 5, len(axes)), torch.randn(2, 7, len(axes))
        shift = torch.rand(1, 1, len(axes)) * 2  # the same shift for every token, per axis (seconds)

        def scores(dq, dk):
            return P.apply_rope(q, P.rope_angles(q_pos + dq, axes, head_dim)) @ \
                P.apply_rope(k, P.rope_angles(k_pos + dk, axes, head_dim)).transpose(-1, -2)
        # angles reach 2 pi x 100 x 3 rad: float32 rounding of the angle allows ~1e-3 on scores of ~10
        torch.testing.assert_close(scores(shift, shift), scores(0, 0), atol=2e-3, rtol=1e-3)
        assert not torch.allclose(scores(shift, 0), scores(0, 0), atol=1e-2)  # positions do matter
        rotated = P.apply_rope(q, P.rope_angles(q_pos, axes, head_dim))
        rest = sum(axes)
        assert torch.equal(rotated[..., rest:], q[..., rest:])  # the last head_dim - sum(axes) dims: untouched
        torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))  # a rotation
    # each axis moves only its own slice: pairs (j, j + a/2) within the slice
    pos = torch.zeros(1, 1, 3)
    pos[..., 1] = 0.3
    x = torch.randn(1, 1, 1, 64)
    out = P.apply_rope(x, P.rope_angles(pos, (20, 20, 20), 64))
    assert torch.equal(out[..., :20], x[..., :20]) and torch.equal(out[..., 40:], x[..., 40:])
    assert not torch.allclose(out[..., 20:40], x[..., 20:40])


def test_released_layout_and_init_strict(tmp_path):
    with torch.device("meta"):  # shapes only: the ViT-B predictor without allocating it
        state = P.DeltaWorld(SimpleNamespace(cfg=SimpleNamespace(dim=768, heads=12)), model="base").state_dict()
    assert len(state) == 196 and round(sum(v.numel() for v in state.values()) / 1e6, 2) == 85.67
    assert state["predictor.blocks.11.attention.kv_proj.weight"].shape == (1536, 768)
    assert state["predictor.blocks.11.mlp.up_proj.weight"].shape == (3072, 768)
    world = tiny_world()
    assert world.config["axes"] == (60,) and world.config["heads"] == 1  # one 64-d head: 60 rotated + 4 (appendix A)
    assert P.DeltaWorld(SimpleNamespace(cfg=SimpleNamespace(dim=768, heads=12)), model="tiny").config["axes"] == (60,)
    assert P.Predictor(64, 1, 4, axes=(12,)).state_dict()["blocks.0.layer_scale1.lambda1"].eq(1e-5).all()
    released = {k: torch.randn_like(v) for k, v in world.state_dict().items()}  # keys `predictor.*`
    path = tmp_path / "deltaworld.bin"
    torch.save(released, path)
    init = lambda model: T.load_state_strict(model, T.load_checkpoint(str(path), ("deltaworld",)), "--init")
    init(world)
    assert torch.equal(world.state_dict()["predictor.head.weight"], released["predictor.head.weight"])
    disc = tiny_world(bom=False)  # the discriminative release adds q_embed
    torch.save(dict(released, **{"q_embed.weight": torch.randn(1, 64)}), path)
    init(disc)
    with pytest.raises(data.UserError, match="q_embed"):
        init(world)
    torch.save(dict(released, **{"predictor.norm.bias": torch.zeros(70)}), path)
    with pytest.raises(data.UserError, match="predictor.norm.bias"):
        init(world)


def test_causal_mask_hides_the_present_and_future():
    world = tiny_world(bom=False)
    tokens, times = clip()
    pred = world(tokens, times)[:, 0]  # (B, 7, C): prediction of token t at index t - 1
    for s in range(8):  # change context token s
        changed = tokens.clone()
        changed[:, s] += 1.0
        moved = (world(changed, times)[:, 0] - pred).abs().amax((0, 2)) > 1e-6  # (7,)
        for t in range(1, 8):
            assert moved[t - 1] == (s < t), (s, t)  # the query at t sees z_0 .. z_{t-1} only


def test_queries_do_not_interact():
    world = tiny_world()
    tokens, times = clip()
    torch.manual_seed(3)
    noise = torch.randn(2, 5, 7, 64) * 0.02
    together = world(tokens, times, noise)
    alone = world(tokens, times, noise[:, 2:3])
    torch.testing.assert_close(together[:, 2:3], alone, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# best-of-many

def test_bom_loss_is_the_argmin_candidate_and_its_gradient_is_the_chosen_query_alone():
    world = tiny_world()
    tokens, times = clip()
    noise = P.clip_noise(0, 0, range(2), 16, 7, 64, torch.device("cpu")).requires_grad_(True)
    loss, best = P.world_loss(world, world, tokens, times, noise, chunk=5)  # chunks of 5: 5 + 5 + 5 + 1
    with torch.no_grad():
        per = F.smooth_l1_loss(world(tokens, times, noise), tokens[:, None, 1:].expand(-1, 16, -1, -1), beta=0.1,
                               reduction="none").mean(-1)  # (B, K, 7)
    assert torch.equal(best, per.argmin(1))
    torch.testing.assert_close(loss, per.min(1).values.mean(), atol=1e-6, rtol=1e-6)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in world.named_parameters()}
    # only the chosen query of each (clip, position) gets a gradient
    hit = noise.grad.abs().sum(-1) > 0                                                   # (B, K, 7)
    assert torch.equal(hit, F.one_hot(best, 16).permute(0, 2, 1).bool())
    world.zero_grad()
    chosen = noise.detach().gather(1, best[:, None, :, None].expand(-1, 1, -1, 64))
    F.smooth_l1_loss(world(tokens, times, chosen)[:, 0], tokens[:, 1:], beta=0.1).backward()
    for n, p in world.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-7, rtol=1e-5)


def test_bom_candidate_pass_builds_no_graph():
    """What autograd keeps for the backward pass is the same for K = 64 candidates as for one query: the
    candidate pass stores no activations (appendix C: BoM needs the memory of the discriminative baseline)."""
    world = tiny_world()
    tokens, times = clip()

    def saved_bytes(K):
        noise = P.clip_noise(0, 0, range(2), K, 7, 64, torch.device("cpu"))
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            loss, _ = P.world_loss(world, world, tokens, times, noise)
        return sum(total), loss
    many, loss = saved_bytes(64)
    one, _ = saved_bytes(1)
    assert many == one
    assert loss.grad_fn is not None  # ... while the chosen query's pass does have its graph


# ----------------------------------------------------------------------------------------------------------------
# sampling

@pytest.fixture(scope="module")
def vfm():
    return T.VFM("tiny")


def test_sampling_rollout(vfm):
    torch.manual_seed(0)
    tok = lift(T.build_deltatok("tiny", vfm, rope_rescale=None)).eval()
    feats = vfm(torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8))  # (B, Tc, N, C)
    times = torch.arange(7.0).expand(2, 7) * 0.2
    world = tiny_world(tokenizer=tok, vfm=vfm)
    pred, tokens = world.sample(feats, times, 5, 3, torch.Generator().manual_seed(0))
    assert pred.shape == (2, 5, 3, 4, 64) and tokens.shape == (2, 5, 3, 64)
    assert (tokens[:, 1:] - tokens[:, :1]).abs().amax((-2, -1)).min() > 1e-3  # all 5 samples differ
    again, tokens2 = world.sample(feats, times, 5, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again, pred) and torch.equal(tokens2, tokens)  # same seed, same samples
    other, _ = world.sample(feats, times, 5, 3, torch.Generator().manual_seed(1))
    assert not torch.allclose(other, pred)
    # step 1 decodes from the last context frame, step 2 from step 1's prediction
    torch.testing.assert_close(pred[:, 0, 0], tok.decode(tokens[:, 0, :1], feats[:, -1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred[:, 0, 1], tok.decode(tokens[:, 0, 1:2], pred[:, 0, 0]), atol=1e-5, rtol=1e-5)
    # the predicted token joins the context as it is (never re-encoded): step 2's query sees z_0..z_3 + token 1
    context = torch.cat([tok.tokenize(feats, vfm.black((32, 32), "cpu")), tokens[:, 0, :1]], 1)
    pos = times[..., None]
    gen = torch.Generator().manual_seed(0)
    q = world.queries(10, 1, gen)  # the noise of step 1 for the 2 x 5 samples ...
    q = world.queries(10, 1, gen).view(2, 5, 1, 64)[:, 0]  # ... then step 2's, of sample 0
    step2 = world.predictor(q, context, pos[:, 5:6], pos[:, :5])
    torch.testing.assert_close(step2[:, 0], tokens[:, 0, 1], atol=1e-5, rtol=1e-5)
    learned = tiny_world(bom=False, tokenizer=tok, vfm=vfm)
    pred, tokens = learned.sample(feats, times, 4, 2, torch.Generator().manual_seed(0))
    assert torch.equal(pred, pred[:, :1].expand_as(pred))  # the learned query: all samples identical


# ----------------------------------------------------------------------------------------------------------------
# training

def test_tiny_deltaworld_learns_to_beat_copy_last(tok_ckpt, tmp_path):
    ckpt = train(tmp_path, "--tokenizer", tok_ckpt, "--steps", "40", "--global-batch", "16", "--batch-size", "16",
                 "--lr", "1e-3", "--warmup", "10", "--bom", "16", "--val-clips", "16", "--val-samples", "8",
                 "--eval-every", "40")
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    result = [r["eval"] for r in log if "eval" in r][-1]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] / 10, losses  # the token-space BoM loss
    for h in (1, 3):  # the held-out check, in feature space
        assert result[f"h{h}/best"] < result[f"h{h}/copy_last"], result
    world = P.load_deltaworld(str(tmp_path / "ckpt.pt"))
    assert ckpt["tokenizer"] == os.path.abspath(tok_ckpt) and world.config["bom"]


def test_token_cache_matches_on_the_fly(tok_ckpt, tmp_path):
    """The cache holds clips ClipDataset.sample(c // G, c % G), so training from it sees the same clips, crops and
    BoM noise as on the fly; tokens are encoded in the same batches, so the runs agree to float rounding."""
    common = ["--tokenizer", tok_ckpt, "--steps", "3", "--global-batch", "8", "--batch-size", "4"]
    fly = train(tmp_path / "fly", *common)
    cache = tmp_path / "cache"
    cached = train(tmp_path / "cached", *common, "--cache-tokens", str(cache), "--cache-crops", str(24 / 512))
    meta = T.load_checkpoint(cache / "meta.pt")
    assert meta["num_clips"] == 24 and os.path.exists(cache / "shard_00000.pt")
    for k in fly["model"]:
        torch.testing.assert_close(cached["model"][k], fly["model"][k], atol=1e-6, rtol=1e-5)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl") if "loss" in line]
              for d in ("fly", "cached")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_signal_stops_the_token_cache_build_after_its_shard_and_the_next_run_goes_on(tok_ckpt, tmp_path,
                                                                                       monkeypatch, capsys):
    """SIGUSR1 while the first of three shards is encoded: that shard is written, the run exits 3 and says so; the
    next run keeps it, encodes the other two and trains from the whole cache."""
    monkeypatch.setattr(P, "SHARD", 8)
    cache, save = tmp_path / "cache", T.save_checkpoint
    common = ["--tokenizer", tok_ckpt, "--steps", "1", "--global-batch", "8", "--batch-size", "4", "--cache-tokens",
              str(cache), "--cache-crops", str(24 / 512)]
    monkeypatch.setattr(T, "save_checkpoint", lambda *a: (os.kill(os.getpid(), signal.SIGUSR1), save(*a))[1])
    with pytest.raises(SystemExit) as stop:
        train(tmp_path / "run", *common)
    assert stop.value.code == T.PREEMPTED and "stopped by SIGUSR1: the token cache keeps" in capsys.readouterr().err
    assert sorted(os.listdir(cache)) == ["meta.pt", "shard_00000.pt"]  # meta.pt first: what made the shards
    first = (cache / "shard_00000.pt").stat().st_mtime_ns
    monkeypatch.setattr(T, "save_checkpoint", save)
    train(tmp_path / "run", *common, "--resume")
    assert sorted(os.listdir(cache)) == ["meta.pt", "shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]
    assert (cache / "shard_00000.pt").stat().st_mtime_ns == first  # kept, not encoded again


def test_token_cache_is_refused_after_the_tokenizer_changes(tok_ckpt, tmp_path):
    tok = tmp_path / "tok.pt"
    shutil.copy(tok_ckpt, tok)
    args = ["--tokenizer", str(tok), "--steps", "1", "--global-batch", "4", "--batch-size", "4",
            "--cache-tokens", str(tmp_path / "cache"), "--cache-crops", str(8 / 512)]
    train(tmp_path / "a", *args)
    ckpt = T.load_checkpoint(tok)
    ckpt["model"]["z_embed.weight"] += 1  # retrained in place: same path, other weights
    torch.save(ckpt, tok)
    with pytest.raises(data.UserError, match="other settings"):
        train(tmp_path / "b", *args)


def test_two_process_ddp_equals_one_process(ddp_run, tmp_path):
    two, common, out = ddp_run
    P.main(P.get_parser().parse_args([*common, "--batch-size", "8", "--out", str(tmp_path / "one")]))  # one process
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err
    w1, w2 = (T.load_checkpoint(d / "ckpt.pt")["model"] for d in (tmp_path / "one", out))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("cache", [False, True])  # the demo's way: from a token cache
def test_resume_equals_uninterrupted(tok_ckpt, tmp_path, cache):
    common = ["--tokenizer", tok_ckpt, "--global-batch", "4", "--batch-size", "4", "--ckpt-every", "2"]
    common += ["--cache-tokens", str(tmp_path / "cache"), "--cache-crops", str(8 / 512)] if cache else []
    full = train(tmp_path / "full", *common, "--steps", "4")
    train(tmp_path / "cut", *common, "--steps", "2")
    resumed = train(tmp_path / "cut", *common, "--steps", "4", "--resume")
    assert resumed["step"] == 4
    for k in full["model"]:
        assert torch.equal(resumed["model"][k], full["model"][k]), k
