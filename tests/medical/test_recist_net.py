"""RECIST-Net: targets, losses, target/decoder round trip, training, persistence, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scaledl.medical import RECISTNet, froc
from scaledl.medical.recist_decode import decode, decode_batch, detections_to_arrays
from scaledl.medical.recist_geometry import canonicalize_recist, recist_to_box
from scaledl.medical.recist_net import (
    RECISTNetConfig,
    dense_offsets,
    encode_targets,
    focal_loss,
    gaussian_radius,
    offset_l1_loss,
)


def lesion_points(cx, cy, a, b, theta_deg):
    """Exact RECIST endpoints of an ellipse (long = 2a, short = 2b)."""
    t = np.deg2rad(theta_deg)
    u, v = np.array([np.cos(t), np.sin(t)]), np.array([-np.sin(t), np.cos(t)])
    c = np.array([cx, cy])
    return canonicalize_recist(np.array([c - a * u, c + a * u, c - b * v, c + b * v]))


def test_gaussian_radius_matches_cornernet_reference():
    # values of CornerNet/CenterNet's gaussian_radius(det_size=(h, w), min_overlap=0.7)
    ref = {(10, 20): 3.6779253585061333, (5, 5): 1.3666002653407556,
           (40, 12): 5.171143838003786, (1.5, 2.5): 0.5151168908501553}  # fmt: skip
    for (h, w), r in ref.items():
        assert gaussian_radius(h, w) == pytest.approx(r, rel=1e-12)
    with pytest.raises(ValueError, match="min_overlap"):
        gaussian_radius(3, 3, 1.5)


def test_focal_and_offset_losses_by_hand():
    logits = torch.tensor([[[[2.0, 0.0, -1.0]], [[1.0, -2.0, 0.5]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[[1.0, 0.5, 0.0]], [[0.5, 0.0, 0.0]]]])
    s = [1 / (1 + math.exp(-x)) for x in (2.0, 0.0, -1.0, 1.0, -2.0, 0.5)]
    pos = math.log(s[0]) * (1 - s[0]) ** 2
    neg1 = math.log(1 - s[1]) * s[1] ** 2 * 0.5**4 + math.log(1 - s[2]) * s[2] ** 2
    # the second map has no positive: its negative term alone, not normalised
    neg2 = sum(math.log(1 - p) * p**2 * (1 - y) ** 4 for p, y in zip(s[3:], (0.5, 0, 0)))
    expected = -(pos + neg1) / 1 - neg2
    assert float(focal_loss(logits, target)) == pytest.approx(expected, rel=1e-5)
    pred = torch.zeros(2, 4, 3, 3)  # two keypoints with (x, y) offsets
    pred[1, 2, 0, 1], pred[1, 3, 0, 1] = 0.25, 0.75
    peaks = torch.tensor([[0, 0, 2, 2], [1, 1, 0, 1], [1, 4, 1, 1]])  # the centre row is ignored
    offsets = torch.tensor([[0.5, 0.5], [0.5, 0.5], [9.0, 9.0]])
    # |0 - .5| * 2 + |.25 - .5| + |.75 - .5| = 1.5 over 4 entries
    assert float(offset_l1_loss(pred, peaks, offsets)) == pytest.approx(1.5 / 4, rel=1e-3)


def test_targets_decoder_round_trip():
    pts = [
        np.stack([lesion_points(40.3, 50.7, 20, 9, 25), lesion_points(95.2, 100.1, 12, 7, -60)]),
        np.zeros((0, 4, 2)),
        np.stack([lesion_points(64.6, 30.2, 6, 4, 80)]),
    ]
    for stride in (2, 4):
        t = encode_targets(pts, (128, 128), stride)
        assert t["heatmap"].shape == (3, 5, 128 // stride, 128 // stride)
        assert t["heatmap"].max() == 1.0 and len(t["peaks"]) == 15
        assert set(t["peaks"][:, 1].tolist()) == {0, 1, 2, 3, 4}
        assert t["offsets"].min() >= 0 and t["offsets"].max() < 1
        dets = decode_batch(
            torch.tensor(t["heatmap"]), torch.tensor(dense_offsets(t)), stride=stride,
            spacing=0.7, k=8,
        )  # fmt: skip
        for gt, dl in zip(pts, dets):
            for p in gt:
                err = min(np.abs(d.points - p).max() for d in dl)
                assert err < 1e-4
                best = min(dl, key=lambda d: np.abs(d.points - p).max())
                np.testing.assert_allclose(best.box, recist_to_box(p), atol=1e-4)
                assert best.long_mm == pytest.approx(0.7 * np.linalg.norm(p[1] - p[0]), rel=1e-5)
                assert best.score == pytest.approx(1.0)
        arrays = [detections_to_arrays(d) for d in dets]
        r = froc([a[0] for a in arrays], [a[1] for a in arrays], [recist_to_box(p) for p in pts])
        # every lesion is found before the first false positive
        assert r.curve_sens[r.curve_fps == 0].max() == 1.0


def _maps(points, center):
    hm, off = torch.zeros(5, 32, 32), torch.zeros(8, 32, 32)
    for k, (x, y) in enumerate([*points, center]):
        hm[k, y, x] = 0.9
    return hm, off


def test_decoder_geometric_checks():
    long_axis = [(2, 10), (30, 10)]
    # a short axis that does not reach the long one
    assert decode(*_maps([*long_axis, (12, 2), (12, 6)], (12, 10)), stride=1, spacing=1.0) == []
    # crossing at (12, 10), perpendicular: accepted
    (d,) = decode(*_maps([*long_axis, (12, 2), (12, 14)], (12, 10)), stride=1, spacing=(1, 2))
    assert d.score == pytest.approx(0.9) and d.long_px == 28 and d.short_px == 12
    assert d.long_mm == 56 and d.short_mm == 12  # columns are 2 mm, rows 1 mm
    np.testing.assert_allclose(d.box, [-3, -3, 35, 19])
    # (10, 4)-(22, 16) crosses at (16, 10) but is 45 degrees off perpendicular
    maps = _maps([*long_axis, (10, 4), (22, 16)], (16, 10))
    assert decode(*maps, stride=1, spacing=1.0) == []
    assert len(decode(*maps, stride=1, spacing=1.0, angle_tol=50)) == 1
    # no centre evidence where the diameters cross
    assert decode(*_maps([*long_axis, (12, 2), (12, 14)], (25, 25)), stride=1, spacing=1.0) == []
    # the "long" axis shorter than the short one
    assert decode(*_maps([(10, 10), (14, 10), (12, 2), (12, 14)], (12, 10)), stride=1,
                  spacing=1.0) == []  # fmt: skip


def test_short_training_lowers_the_loss_and_persistence(tmp_path):
    from scaledl.medical.lesion_data import (
        _phantom,  # packaged liver segmentation
        make_lesion_dataset,
        resize_backgrounds,
    )
    from scaledl.medical.recist_train import images_tensor, predict_recist, train_recist

    torch.manual_seed(0)
    bgs = resize_backgrounds({"phantom": _phantom(128)}, 64)
    ds = make_lesion_dataset(4, backgrounds=bgs, seed=3, empty_prob=0.0)
    model = RECISTNet(width=8, levels=4, stride=2, head_channels=16)
    losses = train_recist(model, ds, steps=30, batch_size=4, lr=5e-3, augment=False, device="cpu")
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    model.save_pretrained(tmp_path)
    again = RECISTNet.from_pretrained(tmp_path)
    x = images_tensor(ds)
    model.eval()
    again.eval()
    torch.testing.assert_close(again(x)["heatmap"], model(x)["heatmap"])
    dets = predict_recist(model, ds, device="cpu", k=8, scores_thresh=0.0, center_thresh=0.0)
    assert len(dets) == 4 and any(dets)
    d = max((d for dl in dets for d in dl), key=lambda d: d.score)
    assert d.long_px >= d.short_px


def test_bad_inputs():
    model = RECISTNet(width=4, levels=3, stride=4, head_channels=8)
    with pytest.raises(ValueError, match=r"expected input \(B, 1, H, W\)"):
        model(torch.zeros(1, 3, 32, 32))
    out = model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="does not match"):
        model.loss(out, encode_targets([np.zeros((0, 4, 2))], (64, 64), 4))
    with pytest.raises(ValueError, match="spacing is required"):
        model.detect(torch.zeros(1, 1, 32, 32), None)
    with pytest.raises(ValueError, match="keypoint_mode"):
        RECISTNetConfig(keypoint_mode="tlbr")
    with pytest.raises(ValueError, match="center_mode"):
        RECISTNet(center_mode="median")
    with pytest.raises(ValueError, match="heatmap must be"):
        decode(torch.zeros(4, 8, 8), torch.zeros(8, 8, 8), stride=4, spacing=1.0)
    with pytest.raises(ValueError, match="NaN"):
        encode_targets([np.full((1, 4, 2), np.nan)], (32, 32))
    with pytest.raises(ValueError, match="not a saved RECISTNet"):
        RECISTNet.from_pretrained("/nonexistent-dir")


def test_hourglass_backbone_shapes():
    hg = {"dims": (16, 16, 24), "modules": (1, 1, 1), "cnv_dim": 16, "stacks": 2}
    model = RECISTNet(backbone="hourglass", hourglass=hg)
    out = model(torch.zeros(2, 1, 64, 64))
    assert out["heatmap"].shape == (2, 5, 16, 16) and out["offset"].shape == (2, 8, 16, 16)


def _shifted_decode(
    offset_radius: int, vote: int, noise: float = 0.0, seed: int = 0, shift: int = 1, **kw
) -> tuple[float, float]:
    """Decode ground-truth targets whose endpoint peaks sit ``shift`` cells off (a typical
    peak localisation error of a trained model), with Gaussian noise on the offsets; returns
    the worst and the mean endpoint error in px."""
    rng = np.random.default_rng(seed)
    pts = [
        np.stack([lesion_points(40.3, 50.7, 20, 9, 25), lesion_points(95.2, 100.1, 12, 7, -60)]),
        np.stack([lesion_points(64.6, 60.2, 16, 8, 80)]),
    ]
    t = encode_targets(pts, (128, 128), 2, offset_radius=offset_radius, **kw)
    hm = torch.tensor(t["heatmap"])
    hm[:, :4] = hm[:, :4].roll(shift, dims=-1)  # every endpoint peak moved to the right
    off = torch.tensor(dense_offsets(t)) + noise * torch.tensor(rng.normal(size=(2, 8, 64, 64)))
    dets = decode_batch(hm, off.float(), stride=2, spacing=0.7, k=8, vote=vote)
    errs = [
        min(np.linalg.norm(d.points - p, axis=1) for d in dl if np.abs(d.points - p).max() < 4)
        for gt, dl in zip(pts, dets)
        for p in gt
    ]
    return float(np.max(errs)), float(np.mean(errs))


def test_neighbourhood_offsets_undo_a_peak_one_cell_off():
    one = [lesion_points(40.3, 50.7, 20, 9, 25)[None]]
    assert len(encode_targets(one, (128, 128), 2)["offset_cells"]) == 5  # default: the peaks
    t = encode_targets(one, (128, 128), 2, offset_radius=1)
    assert len(t["peaks"]) == 5 and len(t["offset_cells"]) == 5 * 9  # the 3×3 around each
    assert t["offset_targets"].min() >= -1 and t["offset_targets"].max() < 2
    # CenterNet's peak-only offsets: a peak one cell off decodes one cell (2 px) off
    assert _shifted_decode(offset_radius=0, vote=0)[0] > 1.9
    # offsets trained around the peak point back to the exact endpoint
    assert _shifted_decode(offset_radius=1, vote=0)[0] < 1e-4
    # two points of one map: a cell between them points to the nearer one
    two = np.stack([lesion_points(20.2, 20.2, 8, 4, 0), lesion_points(38.6, 20.2, 8, 4, 0)])
    t = encode_targets([two], (64, 64), 2, offset_radius=2)
    cells = {tuple(c): o for c, o in zip(t["offset_cells"].tolist(), t["offset_targets"])}
    # long_b of lesion 1 at x 28.2 (cell 14), long_a of lesion 2 at x 30.6 (cell 15)
    np.testing.assert_allclose(cells[(0, 1, 10, 13)], [14.1 - 13, 10.1 - 10], atol=1e-5)
    np.testing.assert_allclose(cells[(0, 0, 10, 16)], [15.3 - 16, 10.1 - 10], atol=1e-5)
    with pytest.raises(ValueError, match="offset_radius"):
        encode_targets([two], (64, 64), 2, offset_radius=-1)


def test_vote_averages_out_offset_noise():
    # noisy offsets (0.3 cells): the heatmap-weighted vote of the 3×3 cells around each peak
    # beats the peak cell alone
    errs = {
        v: np.mean([_shifted_decode(1, v, 0.3, s, shift=0, min_radius=2)[1] for s in range(3)])
        for v in (0, 1)
    }
    assert errs[1] < 0.7 * errs[0]
