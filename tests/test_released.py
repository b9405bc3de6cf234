"""The released models by name (hub ids through the local Hugging Face cache, offline), the RGB head of SPEC
section 7, and eval.py --video: a forecast of a video file, with figures and a GIF."""
import math
import shutil
import sys
import time
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import eval as E
import heads as H
import predictor as P
import tokenizer as T
from test_data import write_video

SIZE = 64
MEAN, STD = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(T.IMAGENET_STD).view(3, 1, 1)


def put_in_hub_cache(cache, repo, path):
    """`path` as <repo>'s pytorch_model.bin, laid out as the hub client caches it (what `hf download` leaves)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    shutil.copy(path, folder / "snapshots" / commit / "pytorch_model.bin")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Tiny stand-ins for the released models under the ids Test/{deltaworld, seg-head, depth-head, rgb-head}, in
    a Hugging Face cache folder."""
    out = tmp_path_factory.mktemp("runs")
    common = ["--size", str(SIZE), "--num-workers", "0", "--dtype", "fp32", "--warmup", "1"]
    T.main(T.get_parser().parse_args(["--vfm", "tiny", "--model", "tiny", "--steps", "3", "--global-batch", "8",
                                      "--batch-size", "8", "--val-clips", "2", "--out", str(out / "tok"), *common]))
    P.main(P.get_parser().parse_args(["--tokenizer", str(out / "tok" / "ckpt.pt"), "--model", "tiny", "--steps", "2",
                                      "--global-batch", "4", "--batch-size", "4", "--bom", "4", "--val-clips", "2",
                                      "--out", str(out / "deltaworld"), *common]))
    for task in ("seg", "depth"):
        H.main(H.get_parser().parse_args(["--task", task, "--vfm", "tiny", "--steps", "5", "--batch-size", "4",
                                          "--val-sequences", "1", "--out", str(out / task), *common]))
    torch.manual_seed(0)
    torch.save(E.RGBHead(T.VFM("tiny").model.norm, 144, 2, 256, 4).state_dict(), out / "rgb.bin")
    cache = tmp_path_factory.mktemp("hub")
    for repo, path in [("tokenizer", "tok/ckpt.pt"), ("deltaworld", "deltaworld/ckpt.pt"), ("seg-head", "seg/ckpt.pt"),
                       ("depth-head", "depth/ckpt.pt"), ("rgb-head", "rgb.bin")]:
        put_in_hub_cache(cache, f"Test/{repo}", out / path)
    return SimpleNamespace(cache=cache, out=out)


@pytest.fixture
def offline_hub(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub.cache))  # read at each download
    return hub


def run_cli(monkeypatch, capsys, *args):
    """eval.py as a user runs it: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *map(str, args)])
    try:
        data.cli(E.main, E.get_parser())
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# hub ids


def test_an_unreachable_hub_fails_at_once_with_one_line_and_the_cache_still_serves(offline_hub, monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that cannot be reached (the probe fails) sends downloads to the local cache
    only: a cached id loads, a missing one is the one-line hint at once, not after half a minute of retries."""
    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")
    monkeypatch.setattr(T.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(T, "get_session", lambda: SimpleNamespace(head=no_network))
    T.hub_unreachable.cache_clear()
    try:
        assert T.checkpoint_path("Test/seg-head").endswith("pytorch_model.bin")
        start = time.perf_counter()
        with pytest.raises(data.UserError, match="the hub cannot be reached"):
            T.checkpoint_path("Test/missing")
        assert time.perf_counter() - start < 5  # no retries
    finally:
        T.hub_unreachable.cache_clear()


def test_deltaworld_trained_on_a_hub_tokenizer_records_the_id(offline_hub, tmp_path):
    """--tokenizer ORG/NAME with a token cache: the cache is keyed on the fetched file, and the checkpoint records
    the id itself (not a path made from it), so the DeltaWorld loads again from the id."""
    P.main(P.get_parser().parse_args(["--tokenizer", "Test/tokenizer", "--model", "tiny", "--steps", "1", "--size",
                                      str(SIZE), "--global-batch", "4", "--batch-size", "4", "--bom", "4",
                                      "--val-clips", "2", "--num-workers", "0", "--dtype", "fp32", "--cache-tokens",
                                      str(tmp_path / "cache"), "--cache-crops", str(8 / 512), "--out",
                                      str(tmp_path / "world")]))
    ckpt = T.load_checkpoint(str(tmp_path / "world" / "ckpt.pt"))
    assert ckpt["tokenizer"] == "Test/tokenizer"
    world = P.load_deltaworld(str(tmp_path / "world" / "ckpt.pt"))
    torch.testing.assert_close(world.tokenizer.z_embed.weight,
                               T.load_checkpoint(str(offline_hub.out / "tok" / "ckpt.pt"))["model"]["z_embed.weight"])


def test_hub_ids_load_from_the_cache_local_paths_win_and_failures_are_one_line(offline_hub, tmp_path, monkeypatch,
                                                                                  capsys):
    seg = T.load_checkpoint(str(offline_hub.out / "seg" / "ckpt.pt"))
    assert torch.equal(T.load_checkpoint("Test/seg-head")["model"]["head.weight"], seg["model"]["head.weight"])
    monkeypatch.chdir(tmp_path)  # a local file at the same name is used as it is
    (tmp_path / "Test").mkdir()
    shutil.copy(offline_hub.out / "depth" / "ckpt.pt", tmp_path / "Test" / "seg-head")
    assert T.load_checkpoint("Test/seg-head")["kind"] == "depthhead"
    with pytest.raises(data.UserError, match="not in the local Hugging Face cache.*hf download Test/missing"):
        T.load_checkpoint("Test/missing")
    status, err = run_cli(monkeypatch, capsys, "--video", "synthetic", "--ckpt", "Test/missing", "--out", tmp_path)
    assert status == 2 and err.strip().count("\n") == 0 and "Test/missing" in err, err


# ----------------------------------------------------------------------------------------------------------------
# the RGB head (SPEC section 7)


def released_rgb_shapes(depth=28):
    """SPEC section 7 written out: the tensors of Amazon-FAR/rgb-head-imagenet (28 blocks)."""
    W, M = 1152, 4096
    shapes = {"trainable_cls_token": (1, 1, W), "decoder_pos_embed": (1, 1025, W), "decoder_embed.weight": (W, 768),
              "decoder_embed.bias": (W,), "decoder_norm.weight": (W,), "decoder_norm.bias": (W,),
              "decoder_pred.weight": (768, W), "decoder_pred.bias": (768,)}
    for i in range(depth):
        for name, out, inp in [("attention.attention.query", W, W), ("attention.attention.key", W, W),
                               ("attention.attention.value", W, W), ("attention.output.dense", W, W),
                               ("layernorm_before", W, None), ("layernorm_after", W, None),
                               ("intermediate.dense", M, W), ("output.dense", W, M)]:
            shapes[f"decoder_layers.{i}.{name}.weight"] = (out, inp) if inp else (out,)
            shapes[f"decoder_layers.{i}.{name}.bias"] = (out,)
    return shapes


def test_rgb_head_has_the_released_layout_and_loads_strictly(tmp_path):
    shapes = released_rgb_shapes()
    assert len(shapes) == 456 and sum(math.prod(s) for s in shapes.values()) == 416_237_440
    with torch.device("meta"):
        full = E.RGBHead(nn.LayerNorm(768))
    assert {k: tuple(v.shape) for k, v in full.state_dict().items()} == shapes
    # the position table: SPEC's recipe, with numpy's 'xy' meshgrid
    g, D = 32, 1152
    y, x = np.meshgrid(np.arange(g), np.arange(g))
    grid = np.stack([x.flatten(), y.flatten()], -1)
    angles = grid[:, :, None] * (1 / 10000 ** (np.arange(D / 4) / (D / 4)))[None, None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], -1).reshape(g * g, D)
    assert torch.allclose(E.sincos_table(g, D).double(), torch.from_numpy(table), atol=1e-5)
    # a strict round trip of a random state dict in the released layout, one block deep (the full one is 1.7 GB)
    torch.manual_seed(0)
    state = {k: torch.randn(s) for k, s in released_rgb_shapes(depth=1).items()}
    torch.save({"state_dict": state}, tmp_path / "rgb.bin")
    vfm = SimpleNamespace(model=SimpleNamespace(norm=nn.LayerNorm(768)))
    head = E.load_rgb_head(str(tmp_path / "rgb.bin"), vfm)
    assert len(head.decoder_layers) == 1 and all(torch.equal(v, state[k]) for k, v in head.state_dict().items())
    del state["decoder_layers.0.layernorm_after.bias"]
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(data.UserError, match="layernorm_after.bias"):
        E.load_rgb_head(str(tmp_path / "broken.bin"), vfm)


def tiny_rgb_head():
    torch.manual_seed(0)
    norm = nn.LayerNorm(64)
    nn.init.normal_(norm.weight, 1, 0.3), nn.init.normal_(norm.bias, 0, 0.3)
    return E.RGBHead(norm, width=144, depth=2, mlp=256, grid=4).eval()


def test_rgb_head_undoes_the_vfm_norm_and_unpatchifies_rows_then_columns():
    head = tiny_rgb_head()
    seen = []
    head.decoder_embed.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    z = torch.randn(1, 6, 64)
    feats = head.norm_bias + head.norm_weight * torch.cat([torch.zeros(1, 1, 64), z[:, 1:]], 1)  # token 0: the bias
    # a decoder_pred that writes, for token k, value k + 0.01 * (3 * (16 * row + column) + channel)
    code = torch.arange(7.0)[:, None] + 0.01 * torch.arange(768.0)
    head.decoder_pred.forward = lambda x: code[None] - 1  # token 0 is the cls token, dropped
    img = head(feats.transpose(1, 2).reshape(1, 64, 2, 3))        # a 2 x 3 grid
    assert torch.equal(seen[0][0, 0], torch.zeros(64)) and torch.allclose(seen[0][0, 1:], z[0, 1:], atol=1e-5)
    assert img.shape == (1, 3, 32, 48)
    raw = (img[0] - MEAN) / STD
    for i, j, r, c, ch in [(0, 0, 0, 0, 0), (0, 2, 5, 11, 2), (1, 0, 15, 0, 1), (1, 2, 7, 3, 0)]:
        want = i * 3 + j + 0.01 * (3 * (16 * r + c) + ch)
        assert raw[ch, 16 * i + r, 16 * j + c].item() == pytest.approx(want, abs=1e-5), (i, j, r, c, ch)


def reference_rgb(state, norm_weight, norm_bias, feats, heads):
    """SPEC section 7, steps 1-5, by hand from the state dict."""
    B, C, h, w = feats.shape
    lin = lambda x, n: x @ state[n + ".weight"].T + state[n + ".bias"]
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], state[n + ".weight"], state[n + ".bias"], eps=1e-12)
    x = lin((feats.flatten(2).transpose(1, 2) - norm_bias) / norm_weight, "decoder_embed")
    pos = state["decoder_pos_embed"][0]
    g = math.isqrt(len(pos) - 1)
    grid = F.interpolate(pos[1:].T.reshape(1, -1, g, g), (h, w), mode="bicubic")[0].flatten(1).T
    x = torch.cat([state["trainable_cls_token"].expand(B, 1, -1), x], 1) + torch.cat([pos[:1], grid])
    for i in range(len({k.split(".")[1] for k in state if k.startswith("decoder_layers.")})):
        p = f"decoder_layers.{i}."
        y = ln(x, p + "layernorm_before")
        q, k, v = (lin(y, p + "attention.attention." + n).unflatten(-1, (heads, 72)).transpose(1, 2)
                   for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(72), -1) @ v
        x = x + lin(a.transpose(1, 2).flatten(2), p + "attention.output.dense")
        y = lin(ln(x, p + "layernorm_after"), p + "intermediate.dense")
        x = x + lin(0.5 * y * (1 + torch.erf(y / math.sqrt(2))), p + "output.dense")
    x = lin(ln(x, "decoder_norm"), "decoder_pred")[:, 1:]
    img = torch.zeros(B, 3, 16 * h, 16 * w)
    for i in range(h):
        for j in range(w):
            img[:, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16] = x[:, i * w + j].view(B, 16, 16, 3).permute(0, 3, 1, 2)
    return img * STD + MEAN


def test_rgb_head_computes_spec_section_7():
    head = tiny_rgb_head()
    with torch.no_grad():
        for p in head.parameters():  # LayerNorms and biases away from 1 / 0, so their order matters
            p.add_(0.1 * torch.randn_like(p))
    feats = torch.randn(2, 64, 3, 5)  # another grid than the table's 4 x 4: interpolated
    for _ in range(2):  # then with the residual stream at about 1e-3, where the LayerNorms' eps 1e-12 matters
        with torch.no_grad():
            want = reference_rgb(head.state_dict(), head.norm_weight, head.norm_bias, feats, heads=2)
            torch.testing.assert_close(head(feats), want, atol=1e-4, rtol=1e-4)
            for t in [head.decoder_embed.weight, head.decoder_embed.bias, head.trainable_cls_token,
                      head.decoder_pos_embed] + [p for n, p in head.named_parameters() if "output.dense" in n]:
                t.mul_(1e-3)


# ----------------------------------------------------------------------------------------------------------------
# eval.py --video


def test_video_forecast_from_hub_ids_writes_figures_and_a_gif(offline_hub, tmp_path, monkeypatch, capsys):
    video = tmp_path / "grey.mp4"
    write_video(video, [5 * k for k in range(48)], "libx264", rate=25, size=(80, 64))  # frame k: grey 5k, 1.92 s
    out = tmp_path / "forecast"
    common = ["--video", video, "--ckpt", "Test/deltaworld", "--heads", "Test/seg-head", "Test/depth-head",
              "--rgb-head", "Test/rgb-head", "--samples", "8", "--size", SIZE, "--dtype", "fp32", "--out", out]
    status, err = run_cli(monkeypatch, capsys, *common, "--start", "0.4")
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["video_deltaworld.png", "video_deltaworld_rollout.gif",
                                                     "video_deltaworld_rollout.png"]
    # final step: under the title, frames, then per view (seg, depth, rgb, PCA) a row and a row of the 8 samples;
    # rgb has the ground truth (the target frame itself) after the 4 context columns, the unlabelled video no other
    fig = np.asarray(Image.open(out / "video_deltaworld.png").convert("RGB")).astype(float)
    assert fig.shape[1:] == (9 * 128, 3) and (fig.shape[0] - 24) // 142 == 9  # then a few lines of legend
    tile = lambda img, r, c: img[32 + r * 142:32 + r * 142 + 128, c * 128:(c + 1) * 128]
    assert np.array_equal(tile(fig, 5, 4), tile(fig, 0, 4))
    # the GIF, frame t: per head (seg, depth, rgb), the true frame t (first row only), present, the 8 samples
    gif = Image.open(out / "video_deltaworld_rollout.gif")
    assert gif.n_frames == 7 and gif.width == (2 + 8) * 128 and (gif.height - 24) // 142 == 3
    for t in range(7):  # 0.2 s apart from --start 0.4: video frames 10, 15, ..., 40, grey 50, 75, ..., 200
        gif.seek(t)
        assert abs(tile(np.asarray(gif.convert("RGB")).astype(float), 0, 0).mean() - (50 + 25 * t)) < 4, t
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    for args, message in [((*common, "--start", "0.8"), "needs 1.2 s of video"),  # 0.8 + 1.2 s > 1.92 s
                          (("--video", tmp_path / "broken.mp4", "--ckpt", "Test/deltaworld"), "cannot read the video")]:
        status, err = run_cli(monkeypatch, capsys, *args)
        assert status == 2 and err.strip().count("\n") == 0 and message in err, err
