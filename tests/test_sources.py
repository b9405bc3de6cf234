"""Other feature sources (appendix C, Table D): DINOv2 and its block concatenation, the PCA file (fit, projection,
DINO-Foresight's pickle), non-square frames and the two-crop protocol at H x W, and a tokenizer and predictor over
them end to end, evaluated at that size."""
import itertools
import math
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
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


def original_dinov2_tokens(emb, x, interpolate_offset, interpolate_antialias):
    """DINOv2's own prepare_tokens_with_masks and interpolate_pos_encoding (facebookresearch/dinov2,
    dinov2/models/vision_transformer.py) transcribed, over the weights of transformers' embeddings `emb`."""
    B, nc, w, h = x.shape  # sic: its "w" is the height
    x = emb.patch_embeddings(x)
    x = torch.cat((emb.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    npatch, N = x.shape[1] - 1, emb.position_embeddings.shape[1] - 1
    if npatch == N and w == h:
        pos = emb.position_embeddings
    else:
        pos_embed = emb.position_embeddings.float()
        class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
        dim, w0, h0 = x.shape[-1], w // 14, h // 14
        M = int(math.sqrt(N))
        kwargs = {}
        if interpolate_offset:
            sx, sy = float(w0 + interpolate_offset) / M, float(h0 + interpolate_offset) / M
            kwargs["scale_factor"] = (sx, sy)
        else:
            kwargs["size"] = (w0, h0)
        patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                        antialias=interpolate_antialias, **kwargs)
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        pos = torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)
    x = x + pos
    if hasattr(emb, "register_tokens"):
        x = torch.cat((x[:, :1], emb.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
    return x


def test_dinov2_features_equal_dinov2s_own_code_with_and_without_registers_at_any_size(monkeypatch):
    """DINOv2's hubconf: without registers interpolate_offset 0.1, no antialias; with them 0.0, antialias."""
    monkeypatch.setitem(T.VFM_PRESETS, "dinov2-noreg", dict(
        model_type="dinov2", num_hidden_layers=2, patch_size=14, image_size=56, hidden_size=64, num_attention_heads=4,
        intermediate_size=256))  # a 4 x 4 grid of position embeddings
    mean, std = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(T.IMAGENET_STD).view(3, 1, 1)
    for name, offset, antialias in (("dinov2-noreg", 0.1, False), ("dinov2-tiny", 0.0, True)):
        vfm = T.VFM(name)
        model = type(vfm.model)(vfm.model.config).eval()  # transformers' own, with vfm's weights
        model.load_state_dict(vfm.model.state_dict())
        for h, w in ((28, 56), (42, 28), (14, 28), (56, 56)):  # down- and upsampled grids, and the trained one
            frames = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h))
            with torch.no_grad():
                x = original_dinov2_tokens(model.embeddings, (frames / 255 - mean) / std, offset, antialias)
                for block in model.encoder.layer:
                    x = block(x)
            torch.testing.assert_close(vfm(frames), model.layernorm(x)[:, vfm.num_prefix:], msg=f"{name} {h}x{w}")


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
    for layers in ("1,4", "a", "1,,2", "1,1"):
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
    torch.testing.assert_close(proj.T @ proj / (len(x) - 1), torch.diag(pca["variance"]).double(), atol=1e-4, rtol=1e-4)
    # sklearn's explained_variance_: the squared singular values of the centred data over n - 1, as converted files
    top = torch.linalg.svdvals(z)[:5] ** 2 / (len(x) - 1)
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


def foresight_pca(monkeypatch, c=64, k=16):
    """What DINO-Foresight's pca.py saves, {"pca_model": sklearn PCA, "mean", "std": numpy arrays}, with a stand-in
    that pickles as sklearn.decomposition._pca.PCA (registered under that path for pickle; no sklearn needed)."""
    class PCA:
        pass
    PCA.__module__, PCA.__qualname__ = "sklearn.decomposition._pca", "PCA"
    for name in ("sklearn", "sklearn.decomposition", "sklearn.decomposition._pca"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["sklearn.decomposition._pca"].PCA = PCA
    rng = np.random.default_rng(0)
    model = PCA()  # a fitted sklearn PCA's attributes, numpy scalars included
    model.__dict__.update(n_components=k, whiten=False, svd_solver="auto", random_state=None, n_features_in_=c,
                          _fit_svd_solver="randomized", mean_=rng.standard_normal(c).astype(np.float32),
                          components_=rng.standard_normal((k, c)).astype(np.float32), n_components_=k,
                          explained_variance_=np.arange(k, 0.0, -1), noise_variance_=np.float64(0.5),
                          n_samples_=np.int64(1000), _sklearn_version="1.9.1")
    mean, std = rng.standard_normal(c).astype(np.float32), rng.random(c).astype(np.float32) + 0.5
    return dict(pca_model=model, mean=mean, std=std)


def numpy1(path):
    """The torch.save zip at `path` as numpy 1.x writes it: its pickle names numpy.core, not numpy._core."""
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    assert any(b"numpy._core.multiarray\n_reconstruct" in v for v in entries.values())  # protocol 2's GLOBAL
    with zipfile.ZipFile(path, "w") as z:
        for n, v in entries.items():
            z.writestr(n, v.replace(b"numpy._core.", b"numpy.core.") if n.endswith("/data.pkl") else v)


def test_dino_foresight_pca_files_convert_as_its_pca_transform_projects(tmp_path, monkeypatch, capsys):
    """DINO-Foresight's pca.py saves with torch.save (a zip); its old format, plain pickles and numpy 1.x's paths
    read the same. The converted file projects as dino_f.py's pca_transform, ((x - mean) / std - mean_) @ components_.T,
    and keeps sklearn's explained variance."""
    p = foresight_pca(monkeypatch)
    x = torch.randn(5, 64)
    want = torch.from_numpy(((x.numpy() - p["mean"]) / p["std"] - p["pca_model"].mean_) @ p["pca_model"].components_.T)
    files = {"dinov2_pca_448_l[2_5_8_11]_1152.pth": lambda f: torch.save(p, f),  # the released file's name
             "numpy1.pth": lambda f: (torch.save(p, f), numpy1(f)),
             "old.pth": lambda f: torch.save(p, f, _use_new_zipfile_serialization=False)}
    for protocol in (2, 4, 5):
        files[f"{protocol}.pkl"] = lambda f, protocol=protocol: f.write_bytes(pickle.dumps(p, protocol))
    for name, write in files.items():
        write(tmp_path / name)
    monkeypatch.delitem(sys.modules, "sklearn.decomposition._pca")  # reading needs no sklearn
    for name in files:
        torch.save(pca := T.convert_pca(str(tmp_path / name)), tmp_path / "pca.pt")
        proj, shift, _ = T.load_pca(str(tmp_path / "pca.pt"), 64)
        torch.testing.assert_close(x @ proj - shift, want, atol=1e-4, rtol=1e-4, msg=name)
        assert torch.equal(pca["variance"], torch.arange(16, 0.0, -1)), name
    out = tmp_path / "new" / "pca.pt"  # the command line: a new file, its folder made, said in one line
    T.main(T.get_parser().parse_args(["--convert-pca", str(tmp_path / next(iter(files))), "--pca", str(out)]))
    assert capsys.readouterr().out == f"wrote {out}: a PCA of 64-d features to 16 components\n"
    assert torch.equal(T.load_pca(str(out), 64)[0], proj)


class Call:
    """A pickled call f(*args) (pickle's __reduce__)."""

    def __init__(self, f, *args):
        self.f, self.args = f, args

    def __reduce__(self):
        return self.f, self.args


def stack_global(module, name, arg):
    """Pickle protocol 4: module.name(arg), the name resolved (dots and all) by pickle's STACK_GLOBAL."""
    text = lambda s: b"\x8c" + bytes([len(s.encode())]) + s.encode()
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


def test_a_crafted_pca_file_runs_nothing_and_is_one_line(tmp_path, monkeypatch):
    """Files that run `touch marker` under pickle.load (checked), and dotted names through every module the allow-list
    knows: convert_pca refuses each in one line naming what it names, and nothing runs. Live: dotted names through
    numpy and torch (the old list's hole), __reduce__ to os.system / subprocess / eval / exec, a getattr chain."""
    import os
    import subprocess
    foresight_pca(monkeypatch)  # the stand-in PCA class registered, as when sklearn is installed
    marker = tmp_path / "marker"
    touch = f"touch {marker}"
    live = {f"{m}.{n}": stack_global(m, n, touch) for m, n in [("numpy", "f2py.os.system"), ("torch", "os.system")]}
    live |= {f"{f.__name__}, protocol {protocol}": pickle.dumps(dict(pca_model=Call(f, *args)), protocol)
             for protocol in (2, 4) for f, args in [(os.system, [touch]), (subprocess.call, [["touch", str(marker)]]),
                                                    (eval, [f"__import__('os').system({touch!r})"]),
                                                    (exec, [f"import os; os.system({touch!r})"])]}
    live["getattr chain"] = b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V%s\ntR." % touch.encode()
    dotted = [stack_global(m, n, touch) for m, n in [
        ("numpy", "ndarray.__class__"), ("numpy._core.multiarray", "_reconstruct.__self__"),
        ("numpy.core.multiarray", "scalar.__self__"), ("numpy._core.numeric", "_frombuffer.__call__"),
        ("numpy.core.numeric", "_frombuffer.__call__"), ("_codecs", "encode.__self__"),
        ("sklearn.decomposition._pca", "PCA.__init__")]]
    for name, payload in [*live.items(), *zip(itertools.repeat("dotted"), dotted)]:
        if name != "dotted":
            pickle.loads(payload)  # the file is live: it runs the command under pickle ...
            assert marker.exists(), name
            marker.unlink()
        (tmp_path / "evil.pkl").write_bytes(payload)
        with pytest.raises(data.UserError) as e:  # ... and not under convert_pca
            T.convert_pca(str(tmp_path / "evil.pkl"))
        assert not marker.exists() and "\n" not in str(e.value) and "which a PCA file does not need" in str(e.value)
    torch.save(dict(pca_model={}, mean=torch.zeros(2)), tmp_path / "tensors.pt")  # tensors: torch's globals, and
    (tmp_path / "persistent.pkl").write_bytes(b"\x80\x02X\x01\x00\x00\x000Q.")  # their storages' persistent ids
    for name, named in (("tensors.pt", "torch._utils._rebuild_tensor_v2"), ("persistent.pkl", "persistent id")):
        with pytest.raises(data.UserError, match=f"{name}: not DINO-Foresight's PCA .*{named}"):
            T.convert_pca(str(tmp_path / name))


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


def test_table_d_chain_from_one_set_of_flags_over_dinov2_layers_and_pca_at_28x56(tmp_path, capsys):
    """Table D inside the project: DeltaTok over DINOv2 blocks + PCA, the discriminative predictor (--no-bom), a head
    on the same features and eval.py, all at 28 x 56; each stage records one canonical feature source."""
    common = ["--vfm", "dinov2-tiny", "--vfm-layers", "1,3", "--size", "28x56", "--num-workers", "0", "--dtype",
              "fp32", "--batch-size", "4"]
    pca = str(tmp_path / "pcas" / "pca.pt")  # its folder is made
    T.main(T.get_parser().parse_args([*common, "--fit-pca", "32", "3", "--pca", pca]))
    T.main(T.get_parser().parse_args([*common, "--pca", pca, "--model", "tiny", "--global-batch", "4", "--steps", "3",
                                      "--warmup", "1", "--val-clips", "2", "--out", str(tmp_path / "tok")]))
    tok_ckpt = str(tmp_path / "tok" / "ckpt.pt")
    tok, source = T.load_deltatok(tok_ckpt)
    vfm = T.VFM(source)
    assert tok.cfg.dim == vfm.dim == 32 and tok.cfg.aspect == 2 and source.startswith("dinov2-tiny|layers=1,3|pca=")
    # the discriminative world model trains on the recorded source and rolls out 2 x 4 patch grids
    capsys.readouterr()
    P.main(P.get_parser().parse_args(
        ["--size", "28x56", "--num-workers", "0", "--dtype", "fp32", "--batch-size", "4", "--tokenizer", tok_ckpt,
         "--no-bom", "--model", "tiny", "--num-frames", "4", "--global-batch", "4", "--steps", "2", "--warmup", "1",
         "--val-clips", "2", "--val-samples", "2", "--out", str(tmp_path / "world")]))
    checked = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  horizon ")]  # deterministic:
    assert len(checked) == 2 and all(x.split()[2] == "DeltaWorld" and "best" not in x for x in checked)  # one row
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
    assert capsys.readouterr().out.endswith(f"\nwrote the delta tokens of the {len(source_videos)} videos of --data "
                                            f"to {tmp_path / 'export'}: shard_*.pt (1,000 videos a file), meta.pt\n")
    shard = torch.load(tmp_path / "export" / "shard_00000.pt", weights_only=True)
    frames = torch.nn.functional.interpolate(torch.from_numpy(source_videos.read(0, range(10))).permute(0, 3, 1, 2),
                                             (28, 56), mode="bilinear", antialias=True)
    want = tok.tokenize(vfm(frames)[None], vfm.black((28, 56), "cpu"))[0]
    assert shard["video"] == [0] and torch.equal(shard["times"][0], torch.tensor(np.arange(10) / 10))
    torch.testing.assert_close(shard["tokens"][0], want)
    # README's decode of an exported token: token t against frame t - 1's features is the tokenizer's reconstruction
    prev = vfm(frames[2:3])  # (1, N, C)
    torch.testing.assert_close(tok.decode(shard["tokens"][0][3].view(1, 1, -1), prev), tok(prev, vfm(frames[3:4])))
    # eval.py at 28x56 (the synthetic frames are square: two 28 x 56 crops, top and bottom), with a head on these
    # features: its predictions saved and scored from the file give its own scores; the video forecast; another
    # aspect than the model's is refused
    # the head, from the same flags (the PCA file given by a relative path): the tokenizer's canonical source recorded
    H.main(H.get_parser().parse_args([*common, "--pca", os.path.relpath(pca), "--task", "seg", "--steps", "2",
                                      "--val-sequences", "1", "--out", str(tmp_path / "seg")]))
    head = tmp_path / "seg" / "ckpt.pt"
    assert T.load_checkpoint(head)["vfm"] == source
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


def test_export_resizes_frames_as_dino_foresight_does():
    """DINO-Foresight resizes PIL images with torchvision's Resize, i.e. PIL's Image.resize((W, H), Image.BILINEAR);
    the export's antialiased bilinear resize of uint8 frames gives the same levels on Cityscapes' 1024 x 2048 ->
    448 x 896, and differs by at most one level (of 255) elsewhere, here on noise, where rounding differs most."""
    rng = np.random.default_rng(0)
    for (h, w), size in (((1024, 2048), (448, 896)), ((720, 1280), (448, 896)), ((200, 400), (28, 56))):
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = F.interpolate(torch.from_numpy(frame).permute(2, 0, 1)[None], size, mode="bilinear", antialias=True)
        pil = np.asarray(Image.fromarray(frame).resize(size[::-1], Image.BILINEAR))
        assert np.abs(ours[0].permute(1, 2, 0).numpy().astype(int) - pil).max() == (0 if h == 1024 else 1)


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


def test_flops_count_h_times_w_patches(capsys):
    got = {s: E.flops(E.get_parser().parse_args(["--flops", "--vfm", "tiny", "--model", "tiny", "--size", s]))
           for s in ("32", "32x64", "64x32")}
    for name in got["32"]:  # 8 patches either way round, more than 32 x 32's 4 where patches count
        assert got["32x64"][name] == pytest.approx(got["64x32"][name]), name
        assert got["32"][name] < got["32x64"][name] or name.startswith("DeltaWorld predictor"), name
    assert "GFLOPs per 32x64 crop" in capsys.readouterr().out
