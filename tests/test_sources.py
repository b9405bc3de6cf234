"""Other feature sources (appendix C, Table D): DINOv2 and its block concatenation, the PCA file (fit, projection,
DINO-Foresight's pickle), non-square frames and the two-crop protocol at H x W, and a tokenizer and predictor over
them end to end, evaluated at that size."""
import itertools
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2WithRegistersModel

import data
import eval as E
import heads as H
import predictor as P
import tokenizer as T

FRAMES = torch.randint(0, 256, (2, 3, 28, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def reference_dinov2(vfm):
    """transformers' own DINOv2 with registers, with the weights of vfm's backbone, and its normalised input."""
    model = Dinov2WithRegistersModel(vfm.model.config).eval()
    model.load_state_dict(vfm.model.state_dict())
    mean, std = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    return model, (FRAMES.float() / 255 - mean) / std


def test_dinov2_features_equal_transformers_model_on_a_non_square_frame():
    vfm = T.VFM("dinov2-tiny")
    model, x = reference_dinov2(vfm)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state[:, 1 + 4:]  # class and 4 register tokens dropped
    assert vfm.patch_size == 14 and want.shape == (2, 2 * 4, 64)    # 28 x 56 px: 2 x 4 patches
    torch.testing.assert_close(vfm(FRAMES), want)


def test_layers_concatenate_each_blocks_output_through_the_final_layernorm():
    """get_intermediate_layers(x, n=[1, 3], norm=True) of DINOv2's own code, written out block by block."""
    vfm = T.VFM("dinov2-tiny|layers=1,3")
    model, x = reference_dinov2(vfm)
    with torch.no_grad():
        h, outs = model.embeddings(x), []
        for i, block in enumerate(model.encoder.layer):
            h = block(h)
            outs += [model.layernorm(h)[:, 5:]] if i in (1, 3) else []
    assert vfm.dim == 128 and vfm.heads == 8  # two 64-d blocks; the backbone's head width 16 is kept
    torch.testing.assert_close(vfm(FRAMES), torch.cat(outs, -1))


def test_bad_layers_are_a_user_error():
    for layers in ("1,4", "a", "1,,2"):
        with pytest.raises(data.UserError, match="--vfm-layers"):
            T.VFM(f"dinov2-tiny|layers={layers}")


def correlated(n=4000, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) @ torch.randn(c, c, generator=g, dtype=torch.float64) \
        * torch.linspace(1, 5, c, dtype=torch.float64) + 3


def test_fit_pca_orders_variance_and_gives_orthonormal_components_of_the_standardised_features():
    x = correlated()
    pca = T.fit_pca(x.split(1000), 5)  # in batches, as from a loader
    z = (x - x.mean(0)) / x.std(0, correction=0)
    assert torch.all(pca["variance"][:-1] >= pca["variance"][1:])
    torch.testing.assert_close(pca["components"] @ pca["components"].T, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(pca["mean"], x.mean(0).float())
    proj = z @ pca["components"].double().T  # the variance along each component is the one reported, uncorrelated
    torch.testing.assert_close(proj.T @ proj / len(x), torch.diag(pca["variance"]).double(), atol=1e-4, rtol=1e-4)
    top = torch.linalg.eigvalsh(z.T @ z / len(x)).flip(0)[:5]
    torch.testing.assert_close(pca["variance"].double(), top, atol=1e-5, rtol=1e-5)


def test_vfm_projects_by_the_pca_file_as_written_out(tmp_path):
    feats = T.VFM("dinov2-tiny|layers=1,3")(FRAMES)
    g = torch.Generator().manual_seed(1)
    pca = dict(mean=torch.randn(128, generator=g), std=torch.rand(128, generator=g) + 0.5,
               pca_mean=torch.randn(128, generator=g), components=torch.linalg.qr(torch.randn(128, 32, generator=g))[0].T)
    torch.save(pca, tmp_path / "pca.pt")
    vfm = T.VFM(T.feature_source("dinov2-tiny", "1,3", str(tmp_path / "pca.pt")))
    want = ((feats - pca["mean"]) / pca["std"] - pca["pca_mean"]) @ pca["components"].T
    assert vfm.dim == 32 and vfm.name.startswith("dinov2-tiny|layers=1,3|pca=/") and "@" in vfm.name
    torch.testing.assert_close(vfm(FRAMES), want, atol=1e-4, rtol=1e-4)
    assert T.VFM(vfm.name).name == vfm.name  # the recorded source rebuilds the same
    pca["mean"] += 1
    torch.save(pca, tmp_path / "pca.pt")  # the file changed since it was recorded: refused in one line
    with pytest.raises(data.UserError, match="has changed since it was recorded"):
        T.VFM(vfm.name)


def test_dino_foresight_pickle_converts_without_sklearn(tmp_path, monkeypatch):
    """A hand-made stand-in of DINO-Foresight's pickle: a class that pickles as sklearn.decomposition._pca.PCA."""
    class PCA:
        pass
    PCA.__module__, PCA.__qualname__ = "sklearn.decomposition._pca", "PCA"
    for name in ("sklearn", "sklearn.decomposition", "sklearn.decomposition._pca"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["sklearn.decomposition._pca"].PCA = PCA
    rng = np.random.default_rng(0)
    model = PCA()
    model.components_, model.mean_ = rng.standard_normal((16, 64)), rng.standard_normal(64)
    model.explained_variance_, model.n_components = np.arange(16.0, 0, -1), 16
    mean, std = torch.randn(1, 64), torch.rand(1, 64) + 0.5
    # DINO-Foresight's pca.py writes a plain pickle
    with open(tmp_path / "pca.pkl", "wb") as f:
        pickle.dump(dict(pca_model=model, mean=mean, std=std), f)
    monkeypatch.delitem(sys.modules, "sklearn.decomposition._pca")  # reading it needs no sklearn
    T.convert_pca(str(tmp_path / "pca.pkl"), str(tmp_path / "pca.pt"))
    proj, shift, _ = T.load_pca(str(tmp_path / "pca.pt"), 64)
    x = torch.randn(5, 64)
    want = ((x - mean) / std - torch.tensor(model.mean_, dtype=torch.float32)) @ \
        torch.tensor(model.components_, dtype=torch.float32).T
    torch.testing.assert_close(x @ proj - shift, want, atol=1e-4, rtol=1e-4)

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(dict(pca_model=Evil()), f)
    with pytest.raises(data.UserError, match="builtins.print"):
        T.convert_pca(str(tmp_path / "evil.pkl"), str(tmp_path / "out.pt"))
    torch.save(dict(pca_model={}), tmp_path / "zip.pt")  # torch.load would need its unsafe unpickler: refused
    with pytest.raises(data.UserError, match="torch.save file"):
        T.convert_pca(str(tmp_path / "zip.pt"), str(tmp_path / "out.pt"))


def test_non_square_rope_equals_dinov3s_on_an_h_by_w_image():
    tok = T.build_deltatok("tiny", T.VFM("tiny"), size=(32, 64)).eval()
    cos, sin = tok._rope(8, torch.zeros(1))  # 2 x 4 patches of 16 px
    torch.testing.assert_close((cos, sin), tok.rope(torch.zeros(1, 3, 32, 64)))  # DINOv3's own, on a 32 x 64 image
    with pytest.raises(data.UserError, match="width / height 2"):
        tok._rope(9, torch.zeros(1))


class Coordinates:
    """One 200 x 400 video whose red channel is x / 400 and green channel y / 200, scaled to 0..255."""

    def __len__(self):
        return 1

    def frame_times(self, i):
        return np.arange(10) / 10

    def read(self, i, idx):
        y, x = np.meshgrid((np.arange(200) + 0.5) / 200, (np.arange(400) + 0.5) / 400, indexing="ij")
        frame = np.stack([x * 255, y * 255, 0 * x], -1).round().astype(np.uint8)
        return np.repeat(frame[None], len(idx), 0)


def test_non_square_crops_keep_the_output_aspect():
    clips = data.ClipDataset(Coordinates(), num_frames=2, size=(16, 32), seed=0)
    aspects = []
    for j in range(20):
        frames = clips.sample(0, j)[0].float()  # (2, 3, 16, 32)
        assert frames.shape == (2, 3, 16, 32)
        width = (frames[0, 0, :, -1] - frames[0, 0, :, 0]).mean() / 255 * 400
        height = (frames[0, 1, -1] - frames[0, 1, 0]).mean() / 255 * 200
        aspects.append((width / height).item())
    # RandomResizedCrop's ratio range 3:4 - 4:3 around the output's 2:1 (up to the pixel centres' offsets)
    assert 2 * 3 / 4 * 0.85 < min(aspects) and max(aspects) < 2 * 4 / 3 * 1.15 and 1.6 < np.median(aspects) < 2.5


def test_size_flag_reads_square_and_h_by_w():
    assert data.frame_size("256") == (256, 256) and data.frame_size("448x896") == (448, 896)
    for bad in ("40", "0", "32x", "32x64x96", "ax32"):
        with pytest.raises(Exception):
            data.frame_size(bad)


def test_tokenizer_and_predictor_over_pca_features_at_28x56_reload_and_roll_out(tmp_path):
    common = ["--vfm", "dinov2-tiny", "--vfm-layers", "1,3", "--size", "28x56", "--num-workers", "0", "--dtype",
              "fp32", "--batch-size", "4"]
    pca = str(tmp_path / "pca.pt")
    T.main(T.get_parser().parse_args([*common, "--fit-pca", "32", "3", "--pca", pca]))
    T.main(T.get_parser().parse_args([*common, "--pca", pca, "--model", "tiny", "--global-batch", "4", "--steps", "3",
                                      "--warmup", "1", "--val-clips", "2", "--out", str(tmp_path / "tok")]))
    tok_ckpt = str(tmp_path / "tok" / "ckpt.pt")
    tok, source = T.load_deltatok(tok_ckpt)
    vfm = T.VFM(source)
    assert tok.cfg.dim == vfm.dim == 32 and tok.cfg.aspect == 2 and source.startswith("dinov2-tiny|layers=1,3|pca=")
    # the world model trains on the recorded source and rolls out 2 x 4 patch grids
    P.main(P.get_parser().parse_args(
        ["--size", "28x56", "--num-workers", "0", "--dtype", "fp32", "--batch-size", "4", "--tokenizer", tok_ckpt, "--model", "tiny", "--num-frames", "4", "--global-batch", "4",
         "--steps", "2", "--warmup", "1", "--bom", "2", "--val-clips", "2", "--val-samples", "2",
         "--out", str(tmp_path / "world")]))
    world_ckpt = str(tmp_path / "world" / "ckpt.pt")
    world = P.load_deltaworld(world_ckpt)
    feats = world.vfm(FRAMES[None].expand(1, 2, 3, 28, 56))  # (1, 2, 8, 32)
    out, tokens = world.sample(feats, torch.tensor([[0.0, 0.1, 0.2, 0.3]]), 2, 2)
    assert out.shape == (1, 2, 2, 8, 32) and tokens.shape == (1, 2, 2, 32) and out.isfinite().all()
    # a PCA fit needs no run folder: not refused by the checkpoint in --out
    T.main(T.get_parser().parse_args([*common, "--fit-pca", "16", "1", "--pca", str(tmp_path / "pca2.pt"), "--out",
                                      str(tmp_path / "tok")]))
    assert T.load_pca(str(tmp_path / "pca2.pt"), 128)[0].shape == (128, 16)
    # another feature source for the same weights is refused in one line
    with pytest.raises(data.UserError, match="was trained on the features"):
        T.main(T.get_parser().parse_args([*common, "--model", "tiny", "--init", tok_ckpt, "--steps", "1",
                                          "--global-batch", "4", "--out", str(tmp_path / "tok2")]))
    # the export: every frame's token of each video, as the tokenizer computes them (read 4 frames at a time)
    source_videos = Coordinates()
    P.export_tokens(tok, vfm, source_videos, str(tmp_path / "export"), dict(kind="token_export"), (28, 56),
                    torch.device("cpu"), "fp32", chunk=4)
    shard = torch.load(tmp_path / "export" / "shard_00000.pt", weights_only=True)
    frames = torch.nn.functional.interpolate(torch.from_numpy(source_videos.read(0, range(10))).permute(0, 3, 1, 2),
                                             (28, 56), mode="bilinear", antialias=True)
    want = tok.tokenize(vfm(frames)[None], vfm.black((28, 56), "cpu"))[0]
    assert shard["video"] == [0] and torch.equal(shard["times"][0], torch.tensor(np.arange(10) / 10))
    torch.testing.assert_close(shard["tokens"][0], want)
    # eval.py at 28x56 (the synthetic frames are square: two 28 x 56 crops, top and bottom), with a head on these
    # features: its predictions saved and scored from the file give its own scores; the video forecast; another
    # aspect than the model's is refused
    head = tmp_path / "seg.pt"
    torch.save(dict(kind="seghead", vfm=source, model=H.SegHead(vfm.dim, 4).state_dict()), head)
    run = lambda *more: E.main(E.get_parser().parse_args(["--heads", str(head), "--size", "28x56", "--samples", "2",
                                                          "--max-sequences", "2", "--num-workers", "0", "--dtype",
                                                          "fp32", *map(str, more)]))
    made = run("--ckpt", world_ckpt, "--save-features", tmp_path / "f.pt", "--figures", "1", "--out", tmp_path / "e")
    again = run("--features", tmp_path / "f.pt", "--figures", "0", "--out", tmp_path / "e2")["synthetic"]
    assert T.load_checkpoint(tmp_path / "f.pt")["size"] == (28, 56)
    for h in ("short", "mid"):  # the file is half precision: a pixel may flip
        assert again[("Features file", h, "best")]["miou"] == pytest.approx(
            made["synthetic"][("DeltaWorld", h, "best")]["miou"], abs=0.5)
    assert (tmp_path / "e" / "synthetic_0000_mid_deltaworld.png").exists()
    run("--video", "synthetic", "--ckpt", world_ckpt, "--out", tmp_path / "v")
    assert (tmp_path / "v" / "video_deltaworld_rollout.gif").exists()
    with pytest.raises(data.UserError, match="width / height 2, --size 28x28 is not"):
        run("--ckpt", world_ckpt, "--size", "28", "--out", tmp_path / "e3")


def test_two_crop_protocol_at_h_by_w_scores_each_label_pixel_once_from_its_crop():
    """At S x S the protocol as SPEC section 5 writes it; at H x W the frame, aspect kept, covers the crop (one axis
    exact, the other capped at twice the crop's), two H x W crops at either end of that other axis, and each label
    pixel comes from exactly one crop: the one on its side of that axis' midpoint (left / right if neither has any
    excess)."""
    p = 4
    for (hl, wl), (h, w) in itertools.product([(30, 70), (70, 30), (40, 40), (17, 101), (50, 100)],
                                              [(16, 16), (16, 32), (32, 16)]):
        hr, wr = H.resized_size(hl, wl, (h, w))
        tall = hl * w > wl * h  # taller than the crop: excess in height
        assert (hr, wr) == ((min(round(hl * w / wl), 2 * h), w) if tall else (h, min(round(wl * h / hl), 2 * w)))
        ys, xs = torch.meshgrid(torch.arange(hl) + 0.5, torch.arange(wl) + 0.5, indexing="ij")
        coords = F.interpolate(torch.stack([ys, xs])[None], (hr, wr), mode="bilinear")[0]  # (2, Hr, Wr)
        crops = H.two_crops(coords, (h, w))
        assert crops.shape == (2, 2, h, w) and H.label_at(ys, (hr, wr), 0, 0, (h, w)).shape == (h, w)
        if h == w:  # the square protocol: the shorter side -> S, crops at either end of the longer
            assert (hr, wr) == H.resized_size(hl, wl, h) == ((min(round(hl * h / wl), 2 * h), h) if hl > wl else
                                                               (h, min(round(wl * h / hl), 2 * h)))
            ends = [coords[..., :h, :], coords[..., -h:, :]] if hl > wl else [coords[..., :h], coords[..., -h:]]
            assert torch.equal(crops, torch.stack(ends))
        # a "head" that outputs its input's coordinates at patch resolution, and which crop it saw
        out = torch.cat([F.avg_pool2d(crops, p), torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, h // p, w // p)], 1)
        pasted = H.paste(out, (hl, wl), (hr, wr), (h, w))
        first = torch.zeros(hl, wl, dtype=torch.bool)
        if tall:
            first[:hl // 2] = True
        else:
            first[:, :wl // 2] = True
        assert pasted.shape == (3, hl, wl) and (pasted[2] - (~first).float()).abs().max() < 1e-5  # never a blend
        assert (pasted[:2] - torch.stack([ys, xs])).abs().max() <= (p / 2 + 1) * max(hl / hr, wl / wr)


def test_convert_needs_the_trust_flag_and_fit_needs_an_output(tmp_path):
    with pytest.raises(data.UserError, match="--trust-pickle"):
        T.main(T.get_parser().parse_args(["--convert-pca", str(tmp_path / "pca.pkl"), "--pca", str(tmp_path / "pca.pt")]))
    with pytest.raises(data.UserError, match="--pca"):
        T.main(T.get_parser().parse_args(["--vfm", "tiny", "--fit-pca", "16", "1"]))


def test_flops_count_h_times_w_patches(capsys):
    got = {s: E.flops(E.get_parser().parse_args(["--flops", "--vfm", "tiny", "--model", "tiny", "--size", s]))
           for s in ("32", "32x64", "64x32")}
    for name in got["32"]:  # 8 patches either way round, more than 32 x 32's 4 where patches count
        assert got["32x64"][name] == pytest.approx(got["64x32"][name]), name
        assert got["32"][name] < got["32x64"][name] or name.startswith("DeltaWorld predictor"), name
    assert "GFLOPs per 32x64 crop" in capsys.readouterr().out
