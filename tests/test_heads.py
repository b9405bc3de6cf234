"""Task heads, evaluation datasets, the two-crop protocol and the metrics: properties checked on small cases."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import data
import heads as H

# ----------------------------------------------------------------------------------------------------------------
# heads


def test_head_layouts_match_the_released_checkpoints(tmp_path):
    seg, depth = H.SegHead(768, 124), H.DepthHead(768)
    shapes = {k: tuple(v.shape) for k, v in seg.state_dict().items()}
    assert shapes == {"bn.weight": (768,), "bn.bias": (768,), "bn.running_mean": (768,), "bn.running_var": (768,),
                      "bn.num_batches_tracked": (), "head.weight": (124, 768, 1, 1), "head.bias": (124,)}
    assert tuple(depth.state_dict()["head.weight"].shape) == (256, 768, 1, 1)
    torch.save(depth.state_dict(), tmp_path / "bare.bin")
    torch.save({"state_dict": seg.state_dict()}, tmp_path / "nested.bin")
    assert H.load_head(str(tmp_path / "bare.bin"))[0].task == "depth"  # 256 outputs: the depth head
    loaded, vfm = H.load_head(str(tmp_path / "nested.bin"), "seg")
    assert vfm is None and torch.equal(loaded.head.weight, seg.head.weight)
    state = seg.state_dict()
    del state["bn.running_var"]
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(data.UserError, match="running_var"):
        H.load_head(str(tmp_path / "broken.bin"), "seg")


def test_depth_head_is_an_expectation_over_256_bins():
    head = H.DepthHead(8).eval()
    x = torch.randn(2, 8, 3, 5)
    d = head(x)
    assert d.shape == (2, 1, 3, 5) and (d > 1e-3).all() and (d < 80).all()
    with torch.no_grad():  # equal logits: uniform distribution, the mean of the bin centres
        head.head.weight.zero_()
        head.head.bias.fill_(1.0)
    assert torch.allclose(head(x), torch.full_like(d, (1e-3 + 80) / 2))


# ----------------------------------------------------------------------------------------------------------------
# evaluation datasets in their on-disk layouts


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def frame(value, h=8, w=12):
    return np.full((h, w, 3), value, np.uint8)


def test_vspw_sequences(tmp_path):
    root = tmp_path / "VSPW"
    for k in range(45):
        save(f"{root}/data/v1/origin/{k:05d}.jpg", frame(5 * k))
        mask = np.array([[0, 1, 124, 125, 255, 50]], np.uint8)
        save(f"{root}/data/v1/mask/{k:05d}.png", mask)
    (root / "val.txt").write_text("v1\n")
    (root / "data" / "v1" / "origin" / ".00001.jpg").write_text("")  # hidden files are skipped
    seq = H.open_eval(f"vspw:{root}")
    assert len(seq) == 2  # labelled frames 19 and 39
    with warnings.catch_warnings():  # no warning on good data (torch warns about read-only NumPy arrays)
        warnings.simplefilter("error")
        H._Batches(seq, "seg", 8, 2, 0, 0)[0]
    item = seq.item(1)
    assert item["frames"].shape == (7, 8, 12, 3)
    assert [round(f.mean() / 5) for f in item["frames"]] == [21, 24, 27, 30, 33, 36, 39]  # stride 3, ends at 39
    assert np.allclose(item["times"], np.arange(7) * 0.2)
    assert item["classes"].tolist() == [[255, 0, 123, 255, 255, 49]]  # value - 1; outside 0..123 ignored
    (root / "val.txt").write_text("v1\nv2\n")
    with pytest.raises(data.UserError, match="v2"):
        H.open_eval(f"vspw:{root}")
    with pytest.raises(data.UserError, match="train.txt"):
        H.open_eval(f"vspw:{root}", "train")


def test_cityscapes_sequences(tmp_path):
    root = tmp_path / "cs"
    for k in range(0, 30):
        save(f"{root}/leftImg8bit_sequence/val/ulm/ulm_000003_{k:06d}_leftImg8bit.png", frame(k))
    save(f"{root}/gtFine/val/ulm/ulm_000003_000019_gtFine_labelIds.png", np.array([[7, 33, 0, 26, 6]], np.uint8))
    save(f"{root}/gtFine/val/ulm/ulm_000003_000019_gtFine_color.png", frame(0))  # other label files are skipped
    (root / "gtFine" / "val" / ".DS_Store").write_text("")  # and stray files beside the city folders
    seq = H.open_eval(f"cityscapes:{root}")
    item = seq.item(0)
    assert len(seq) == 1 and item["name"] == "ulm_000003_000019"
    assert [int(f[0, 0, 0]) for f in item["frames"]] == [1, 4, 7, 10, 13, 16, 19]
    assert np.allclose(item["times"], np.arange(7) * 0.1875)
    assert item["classes"].tolist() == [[0, 18, 255, 13, 255]]
    os.remove(f"{root}/leftImg8bit_sequence/val/ulm/ulm_000003_000004_leftImg8bit.png")
    with pytest.raises(data.UserError, match="ulm_000003_000004_leftImg8bit"):
        H.open_eval(f"cityscapes:{root}")
    with pytest.raises(data.UserError, match="gtFine/train"):
        H.open_eval(f"cityscapes:{root}", "train")


def test_kitti_sequences_crop_and_valid_mask(tmp_path, capsys):
    root, h, w = tmp_path / "kitti", 360, 1232
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    drive = "2011_09_26_drive_0002_sync"
    for k in range(8, 21, 2):  # raw drives and ground truth unzipped into one root, as the release's README says
        img = np.stack([rows % 256, cols % 256, np.full_like(rows, k)], -1).astype(np.uint8)
        save(f"{root}/2011_09_26/{drive}/image_02/data/{k:010d}.png", img)
    depth = np.full((h, w), 10 * 256, np.uint16)
    depth[-1, :] = 0                  # no measurement
    depth[-2, :] = 90 * 256           # beyond 80 m
    gt = f"{root}/val/{drive}/proj_depth/groundtruth/image_02/{20:010d}.png"
    os.makedirs(os.path.dirname(gt))
    Image.fromarray(depth).save(gt)
    split = tmp_path / "eigen.txt"
    split.write_text(f"2011_09_26/{drive}/image_02/data/{20:010d}.png {drive}/proj_depth/groundtruth/image_02/"
                     f"{20:010d}.png 721.5\n"
                     f"2011_09_26/{drive}/image_02/data/{24:010d}.png None 721.5\n"     # no ground truth
                     f"2011_09_26/{drive}/image_02/data/{18:010d}.png\n")               # before frame 19: skipped
    seq = H.open_eval(f"kitti:{root}", kitti_split=str(split))
    assert len(seq) == 1
    item = seq.item(0)
    f = item["frames"]
    assert f.shape == (7, 352, 1216, 3)
    assert [int(x[0, 0, 2]) for x in f] == list(range(8, 21, 2)) and np.allclose(item["times"], np.arange(7) * 0.2)
    assert f[0, 0, 0, 0] == h - 352 and f[0, 0, 0, 1] == (w - 1216) // 2  # bottom rows, centred columns
    valid = item["valid"]
    assert item["depth"].shape == valid.shape == (352, 1216) and item["depth"][200, 600] == 10
    r0, r1, c0, c1 = int(0.40810811 * 352), int(0.99189189 * 352), int(0.03594771 * 1216), int(0.96405229 * 1216)
    assert valid[r0:r1, c0:c1][:-2].all()                       # Garg region, minus the two bad rows
    assert not valid[-2:].any()                                 # d = 0 and d >= 80 are invalid
    assert valid.sum() == (r1 - r0 - 2) * (c1 - c0) if r1 >= 350 else True
    assert not valid[:r0].any() and not valid[:, :c0].any() and not valid[:, c1:].any()
    with pytest.raises(data.UserError, match="--kitti-split"):  # training needs its own list, never the test one
        H.open_eval(f"kitti:{root}", "train")
    with pytest.raises(data.UserError, match="does not exist"):
        H.open_eval(f"kitti:{tmp_path}/nowhere", kitti_split=str(split))
    # the held-out check of a training run (heads.py's default): the Eigen test list's sequences that are there (one,
    # frame 69 of the drive, linked to the frames above), what it skips named once; an evaluation's list is complete
    folder = f"{root}/2011_09_26/{drive}/image_02/data"
    for j in range(7):
        os.symlink(f"{folder}/{8 + 2 * j:010d}.png", f"{folder}/{57 + 2 * j:010d}.png")
    os.symlink(gt, gt.replace(f"{20:010d}", f"{69:010d}"))
    capsys.readouterr()
    assert [item[2] for item in H.open_eval(f"kitti:{root}", skip=True).items] == [f"{drive}/{69:010d}"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: the held-out check skips 602 of the 603 KITTI sequences of "
                                               f"{H.KITTI_EIGEN_TEST} (KITTI ground truth for 2011_09_26/"), err
    with pytest.raises(data.UserError, match="KITTI ground truth for 2011_09_26/.* is missing"):
        H.open_eval(f"kitti:{root}")
    with pytest.raises(data.UserError, match=f"no usable KITTI sequence in .* under {tmp_path} .*: give --kitti-val"):
        H.open_eval(f"kitti:{tmp_path}", skip=True)


def test_kitti_default_split_is_the_releases_603_sequences():
    targets = H.kitti_targets(H.KITTI_EIGEN_TEST)
    assert len(targets) == 603 and all(k >= 19 and depth not in (None, "None") for _, _, _, k, depth in targets)
    assert sum(1 for line in open(H.KITTI_EIGEN_TEST) if line.strip()) == 697


def test_vspw_skips_macos_metadata_and_names_unreadable_files(tmp_path):
    root = tmp_path / "vspw"
    (root / "val.txt").parent.mkdir(parents=True)
    (root / "val.txt").write_text("v1\n")
    for k in range(20):
        save(f"{root}/data/v1/origin/{k:05d}.jpg", np.full((32, 48, 3), k, np.uint8))
        (root / f"data/v1/origin/._{k:05d}.jpg").write_bytes(b"\0\5\26\7 Mac OS X metadata")
    save(f"{root}/data/v1/mask/{19:05d}.png", np.full((32, 48), 3, np.uint8))
    (root / f"data/v1/mask/._{19:05d}.png").write_bytes(b"\0\5\26\7")
    seq = H.open_eval(f"vspw:{root}")
    assert len(seq) == 1 and seq.item(0)["frames"].shape == (7, 32, 48, 3)
    assert (seq.item(0)["classes"] == 2).all()
    (root / f"data/v1/origin/{19:05d}.jpg").write_text("not a jpeg")
    with pytest.raises(data.UserError, match=f"{19:05d}.jpg"):
        seq.item(0)


def test_resize_is_plain_bilinear_without_antialias():
    """OpenCV INTER_LINEAR (half-pixel centres, no antialias), as the released heads were trained on. Reference by
    hand: output pixel i reads the input at (i + 0.5) * scale - 0.5, between its two neighbours; 0.5x is then the
    mean of 2 x 2 blocks, and 9 -> 6 reads at 0.25, 1.75, 3.25, ..."""
    def weights(n_in, n_out):
        w = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0)
            i0 = int(src)
            w[i, i0] += 1 - (src - i0)
            w[i, min(i0 + 1, n_in - 1)] += src - i0
        return w
    rng = np.random.default_rng(0)
    for (h, w), size in (((8, 12), 4), ((6, 9), 4)):  # 0.5x and 1.5x downscales
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        got = H.resize_frames(img[None], size)[0].permute(1, 2, 0).numpy().astype(float)
        want = np.einsum("ih,hwc,jw->ijc", weights(h, size), img.astype(float), weights(w, got.shape[1]))
        assert got.shape[:2] == (size, round(w * size / h)) and np.abs(got - want).max() <= 1  # uint8 fixed point
    smooth = F.interpolate(torch.as_tensor(img).permute(2, 0, 1)[None].float(), (4, 6), mode="bilinear",
                           antialias=True)[0].permute(1, 2, 0).numpy()
    assert np.abs(smooth - want).max() > 5  # an antialiased resize would not pass


def test_synthetic_sequences_end_at_labelled_frames():
    seq = H.SyntheticSequences("val", num_videos=2, size=32)
    item = seq.item(3)
    v, k = seq.items[3]
    assert len(seq) == 10 and np.allclose(item["times"], np.arange(7) * 0.2)
    assert np.array_equal(item["frames"][-1], seq.source.read(v, [k])[0])
    assert np.array_equal(item["classes"], seq.source.labels(v, [k])[0][0])


# ----------------------------------------------------------------------------------------------------------------
# the two-crop protocol


@pytest.mark.parametrize("hw", [(30, 70), (70, 30), (40, 40), (32, 64), (24, 96), (17, 101)])
def test_two_crop_protocol_scores_every_label_pixel_once_from_the_right_crop(hw):
    S, p = 16, 4
    hl, wl = hw
    hr, wr = H.resized_size(hl, wl, S)
    assert min(hr, wr) == S and max(hr, wr) <= 2 * S
    # an image of its own label coordinates (pixel centres), resized like the frames
    ys, xs = torch.meshgrid(torch.arange(hl) + 0.5, torch.arange(wl) + 0.5, indexing="ij")
    coords = F.interpolate(torch.stack([ys, xs])[None], (hr, wr), mode="bilinear")[0]     # (2, Hr, Wr)
    crops = H.two_crops(coords, S)                                                         # (2, 2, S, S)
    assert crops.shape == (2, 2, S, S)
    # a "head" that outputs its input's coordinates at patch resolution, plus which crop it saw
    out = torch.cat([F.avg_pool2d(crops, p), torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, S // p, S // p)], 1)
    pasted = H.paste(out, (hl, wl), (hr, wr), S)
    assert pasted.shape == (3, hl, wl)
    # one crop per pixel: the first half (left / top, split at the midpoint) from crop 0, the rest from crop 1
    first = torch.zeros(hl, wl, dtype=torch.bool)
    if hr > wr:
        first[:hl // 2] = True
    else:
        first[:, :wl // 2] = True
    crop = pasted[2].round()
    assert (pasted[2] - crop).abs().max() < 1e-5  # never a blend of the two crops
    assert torch.equal(crop == 0, first) and torch.equal(crop == 1, ~first)
    # and from the right place: the pasted coordinates are each pixel's own, up to the patch's resolution
    scale = max(hl / hr, wl / wr)
    tol = (p / 2 + 1) * scale
    assert (pasted[0] - ys).abs().max() <= tol and (pasted[1] - xs).abs().max() <= tol
    assert (pasted[:2] - torch.stack([ys, xs])).abs().median() < 0.1 * scale  # exact away from crop borders


def test_label_at_samples_the_crop_pixels():
    label = torch.arange(20 * 40).view(20, 40)
    hr, wr = H.resized_size(20, 40, 10)  # 10 x 20: each resized pixel covers 2 x 2 label pixels
    out = H.label_at(label, (hr, wr), 0, 10, 10)
    assert torch.equal(out, label[1::2, 21::2])


# ----------------------------------------------------------------------------------------------------------------
# metrics


def test_miou_from_one_confusion_matrix():
    score = H.Score("seg", 4)
    logits = lambda pred: F.one_hot(torch.tensor(pred), 4).T.float()[:, None]  # (K, 1, W)
    score.update(logits([0, 1, 1, 2, 2]), dict(classes=np.array([[0, 0, 1, 255, 0]], np.uint8)))
    # class 0: 1 / 3, class 1: 1 / 2, class 2: 0 / 1 (predicted once on a scored pixel), class 3: absent: left out
    assert score.result()["miou"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 0) / 3)
    score.update(logits([3]), dict(classes=np.array([[3]], np.uint8)))  # accumulates over the dataset
    assert score.result()["miou"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 0 + 1) / 4)


def test_depth_metrics_over_all_valid_pixels():
    score = H.Score("depth")
    score.update(torch.tensor([[[2.0, 4.5]]]), dict(depth=np.array([[1.0, 5.0]]), valid=np.array([[True, True]])))
    score.update(torch.tensor([[[10.0, 99.0]]]), dict(depth=np.array([[7.0, 1.0]]), valid=np.array([[True, False]])))
    r = score.result()
    assert r["rmse"] == pytest.approx(math.sqrt((1 + 0.25 + 9) / 3))  # pooled, not a mean of per-image RMSEs
    assert r["absrel"] == pytest.approx((1 / 1 + 0.1 + 3 / 7) / 3)
    assert r["delta1"] == pytest.approx(100 * 1 / 3)  # only 4.5 vs 5 is within 1.25


@pytest.mark.parametrize("ckpt_every", [1, 1000])
def test_nonfinite_head_training_stops_without_writing_a_checkpoint(tmp_path, capsys, ckpt_every):
    """--lr inf: the first update makes the weights non-finite. Caught at the checkpoint due after it (ckpt_every
    1), or else at the next loss: exit 1, no ckpt.pt, and no claim that a good one is kept."""
    with pytest.raises(SystemExit) as stop:
        H.main(H.get_parser().parse_args(
            ["--task", "seg", "--vfm", "tiny", "--size", "32", "--steps", "5", "--batch-size", "2", "--lr", "inf",
             "--num-workers", "0", "--val-sequences", "1", "--dtype", "fp32", "--ckpt-every", str(ckpt_every),
             "--out", str(tmp_path)]))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "at step 1" in err and "no checkpoint was written" in err, err
    assert ("non-finite weights" in err) == (ckpt_every == 1)
    assert not (tmp_path / "ckpt.pt").exists()


def test_head_loss_is_the_same_through_the_ddp_wrapper(tmp_path):
    """Under torchrun the loss gets the DDP wrapper (which has no .task), not the head: same loss as the bare head."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for task, head, target in [("seg", H.SegHead(8, 3), torch.randint(0, 3, (2, 8, 8))),
                                   ("depth", H.DepthHead(8), torch.rand(2, 8, 8) + 1)]:
            feats, valid = torch.randn(2, 16, 8), torch.ones(2, 8, 8, dtype=torch.bool)
            wrapped = torch.nn.parallel.DistributedDataParallel(head)
            loss = H.head_loss(wrapped, task, feats, target, valid)
            assert torch.equal(loss, H.head_loss(head, task, feats, target, valid))
    finally:
        dist.destroy_process_group()
