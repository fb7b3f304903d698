"""RECIST geometry: mask_to_recist on ellipses of known axes, boxes, spacing."""

from __future__ import annotations

import numpy as np
import pytest

from scaledl.medical import mask_to_recist, recist_to_box
from scaledl.medical.recist_geometry import (
    canonicalize_recist,
    length_mm,
    mask_to_extreme_points,
    px_to_mm,
    recist_center,
)


def ellipse(a, b, theta_deg, cx=60.3, cy=57.6, size=128):
    yy, xx = np.mgrid[:size, :size]
    t = np.deg2rad(theta_deg)
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


@pytest.mark.parametrize(("a", "b", "theta"), [(30, 15, 0), (30, 15, 30), (40, 8, -50), (6, 4, 70)])
def test_ellipse_axes(a, b, theta):
    r = mask_to_recist(ellipse(a, b, theta), spacing=0.7)
    assert r.long_px == pytest.approx(2 * a, abs=1.0)
    assert r.short_px == pytest.approx(2 * b, abs=1.2)
    assert r.long_mm == pytest.approx(0.7 * r.long_px, rel=1e-9)
    assert r.short_mm == pytest.approx(0.7 * r.short_px, rel=1e-9)
    vl, vs = r.points[1] - r.points[0], r.points[3] - r.points[2]
    angle = np.degrees(np.arccos(abs(vl @ vs) / np.linalg.norm(vl) / np.linalg.norm(vs)))
    assert angle > 90 - 5.01 - 1e-6  # perpendicular within the RECIST tolerance
    long_dir = np.degrees(np.arctan2(vl[1], vl[0])) % 180
    assert min(abs(long_dir - theta % 180), 180 - abs(long_dir - theta % 180)) < 8
    assert np.linalg.norm(r.center - (60.3, 57.6)) < 0.2 * a
    # canonical order: 'a' endpoints have the smaller x
    assert r.points[0, 0] <= r.points[1, 0] and r.points[2, 0] <= r.points[3, 0]


def test_rotation_equivariance_and_anisotropic_spacing():
    m = ellipse(25, 12, 20)
    r, r90 = mask_to_recist(m, 1.0), mask_to_recist(np.rot90(m), 1.0)
    assert r90.long_px == pytest.approx(r.long_px, abs=1e-9)
    assert r90.short_px == pytest.approx(r.short_px, abs=0.5)
    # a 10 x 20 px rectangle: the farthest boundary edge-midpoints are 20 px apart in x and
    # 9 px in y; with 1 mm rows and 2 mm columns that is 40 mm by 9 mm
    rect = np.zeros((30, 40), bool)
    rect[10:20, 10:30] = True
    assert mask_to_recist(rect, 1.0).long_mm == pytest.approx(np.hypot(20, 9), abs=1e-9)
    rr = mask_to_recist(rect, spacing=(1.0, 2.0))
    assert rr.long_mm == pytest.approx(np.hypot(40, 9), abs=1e-9)
    assert length_mm(rr.points[0], rr.points[1], (1.0, 2.0)) == pytest.approx(rr.long_mm)


def test_box_padding_center_and_canonical_order():
    pts = np.array([[10, 20], [40, 30], [28, 12], [22, 38]], float)
    np.testing.assert_allclose(recist_to_box(pts), [5, 7, 45, 43])
    np.testing.assert_allclose(recist_to_box(pts, pad=0), [10, 12, 40, 38])
    np.testing.assert_allclose(recist_to_box(np.stack([pts, pts + 1]))[1], [6, 8, 46, 44])
    flipped = pts[[1, 0, 3, 2]]
    np.testing.assert_allclose(canonicalize_recist(flipped), pts[[0, 1, 3, 2]])
    c = recist_center(pts)  # lines y = 20 + (x - 10) / 3 and x = 28 - (y - 12) * 6 / 26
    assert c[1] == pytest.approx(20 + (c[0] - 10) / 3)
    assert c[0] == pytest.approx(28 - (c[1] - 12) * 6 / 26)
    np.testing.assert_allclose(recist_center(pts, "bbox"), [25, 25])
    assert px_to_mm(10, 0.5) == 5.0


def test_extreme_points():
    m = np.zeros((20, 20), bool)
    m[5:10, 3:15] = True
    m[2, 8] = True
    np.testing.assert_allclose(mask_to_extreme_points(m), [[8, 2], [3, 7], [8.5, 9], [14, 7]])


def test_bad_inputs():
    with pytest.raises(ValueError, match="spacing is required"):
        mask_to_recist(ellipse(5, 3, 0), None)
    with pytest.raises(ValueError, match="positive"):
        mask_to_recist(ellipse(5, 3, 0), (0.7, -1))
    with pytest.raises(ValueError, match="empty"):
        mask_to_recist(np.zeros((8, 8)), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        mask_to_recist(np.ones((2, 8, 8)), 1.0)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        recist_to_box(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="isotropic"):
        px_to_mm(1.0, (0.5, 0.7))


def test_augmentation_moves_points_with_the_image():
    import torch

    from scaledl.medical.recist_train import flip_points

    m = ellipse(20, 8, 35, cx=50.2, cy=40.7, size=96)[:, :80]  # not square: H 96, W 80
    p = mask_to_recist(m, 1.0).points
    img = torch.from_numpy(m.copy())
    for hf in (False, True):
        for vf in (False, True):
            for tr in (False, True):
                x = img
                if hf:
                    x = x.flip(-1)
                if vf:
                    x = x.flip(-2)
                if tr:
                    x = x.transpose(-1, -2)
                want = mask_to_recist(x.numpy(), 1.0).points
                got = flip_points(p, 80, 96, hf, vf, tr)[0]
                assert mask_to_recist(x.numpy(), 1.0).long_px == pytest.approx(
                    np.linalg.norm(got[1] - got[0]), abs=1e-6
                )
                np.testing.assert_allclose(got[:2], want[:2], atol=1e-6)
