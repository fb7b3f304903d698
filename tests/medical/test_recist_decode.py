"""Decoder utilities: box NMS, ghost suppression, per-image spacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaledl.medical.recist_decode import box_nms, decode_batch, suppress_ghosts


def test_box_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], float)
    scores = np.array([0.5, 0.9, 0.3, 0.8])
    # IoU(1, 0) = 81/119 > 0.5 and IoU(1, 3) = 72/118 > 0.5: both go; box 2 is apart
    assert box_nms(boxes, scores, 0.5).tolist() == [1, 2]
    # at 0.7, box 3 survives box 1 (IoU 0.61) but suppresses box 0 (IoU 90/100)
    assert box_nms(boxes, scores, 0.7).tolist() == [1, 3, 2]
    assert box_nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


def test_ghost_box_spanning_several_lesions_is_halved():
    boxes = np.array([[0, 0, 100, 100], [10, 10, 20, 20], [50, 50, 70, 70], [60, 0, 90, 20.0]])
    scores = np.array([0.3, 0.9, 0.8, 0.2])
    out = suppress_ghosts(boxes, scores, factor=4.0)
    # 0.9 + 0.8 + 0.2 = 1.9 > 4 * 0.3: the enclosing box is a ghost
    np.testing.assert_allclose(out, [0.15, 0.9, 0.8, 0.2])
    np.testing.assert_allclose(suppress_ghosts(boxes, scores, factor=8.0), scores)


def test_decode_batch_spacing_per_image():
    hm, off = torch.zeros(2, 5, 32, 32), torch.zeros(2, 8, 32, 32)
    for k, (x, y) in enumerate([(2, 10), (30, 10), (12, 2), (12, 14), (12, 10)]):
        hm[:, k, y, x] = 0.9
    dets = decode_batch(hm, off, stride=1, spacing=np.array([[1.0, 1.0], [0.5, 2.0]]))
    assert [d[0].long_mm for d in dets] == [28.0, 56.0]
    assert [d[0].short_mm for d in dets] == [12.0, 6.0]
    shared = decode_batch(hm, off, stride=1, spacing=(0.5, 2.0))
    assert [d[0].long_mm for d in shared] == [56.0, 56.0]
    with pytest.raises(ValueError, match="3 entries for 2 images"):
        decode_batch(hm, off, stride=1, spacing=np.ones((3, 2)))
    with pytest.raises(ValueError, match="center_pool"):
        decode_batch(hm, off, stride=1, spacing=1.0, center_pool=2)


def test_axes_crossing_near_an_end_are_rejected():
    """``crossing_min`` rejects a short axis that crosses the long one 11% from its end."""
    hm, off = torch.zeros(1, 5, 32, 32), torch.zeros(1, 8, 32, 32)
    # long (2, 10)-(30, 10), short (5, 2)-(5, 18): crossing at t = 3/28, u = 1/2
    for k, (x, y) in enumerate([(2, 10), (30, 10), (5, 2), (5, 18), (5, 10)]):
        hm[:, k, y, x] = 0.9
    assert decode_batch(hm, off, stride=1, spacing=1.0, crossing_min=0.15) == [[]]
    (det,) = decode_batch(hm, off, stride=1, spacing=1.0)[0]  # default: any crossing
    assert (det.long_mm, det.short_mm) == (28.0, 16.0)
    # the crossing at 3/28 = 0.107 passes a 0.1 bound
    assert len(decode_batch(hm, off, stride=1, spacing=1.0, crossing_min=0.1)[0]) == 1
    with pytest.raises(ValueError, match="crossing_min"):
        decode_batch(hm, off, stride=1, spacing=1.0, crossing_min=0.5)
