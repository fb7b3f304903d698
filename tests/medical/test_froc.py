"""DeepLesion FROC against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scaledl.medical import froc
from scaledl.medical.froc_eval import box_overlap, sensitivity_at

A = [0, 0, 9, 9]
B = [20, 0, 29, 9]
FAR = [50, 50, 59, 59]


def _arr(*boxes):
    return np.array(boxes, dtype=float).reshape(-1, 4)


def test_plus_one_pixel_iou_and_modes():
    # 10x10 boxes shifted by 5 px: inter 5*10 = 50, union 150
    assert box_overlap(np.array(A, float), _arr([5, 0, 14, 9]))[0] == pytest.approx(1 / 3)
    # IoBB divides by the detected box: a 4x4 box inside a 10x10 lesion scores 1
    assert box_overlap(np.array([2, 2, 5, 5.0]), _arr(A), "iobb")[0] == 1.0
    assert box_overlap(np.array([2, 2, 5, 5.0]), _arr(A), "iou")[0] == pytest.approx(16 / 100)
    assert box_overlap(np.array([8, 8, 12, 12.0]), _arr(A, B), "center").tolist() == [0.0, 0.0]
    assert box_overlap(np.array([6, 6, 12, 12.0]), _arr(A, B), "center").tolist() == [1.0, 0.0]


def test_duplicates_empty_images_and_interpolation():
    # image 0: lesions A, B; image 1: lesion-free; image 2: lesion A
    gts = [_arr(A, B), _arr(), _arr(A)]
    boxes = [_arr(A, A, B), _arr(A), _arr(FAR, A)]
    scores = [np.array([0.9, 0.7, 0.4]), np.array([0.8]), np.array([0.6, 0.5])]
    r = froc(boxes, scores, gts)
    # pooled order: TP(.9) FP(.8) duplicate(.7, neither) FP(.6) TP(.5) TP(.4)
    np.testing.assert_allclose(r.curve_fps, [0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r.curve_sens, [0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    # 0.5 FPs/image lies between (1/3, 1/3) and (2/3, 1); beyond the end: the last value
    np.testing.assert_allclose(r.sensitivities, [2 / 3, 1, 1, 1, 1])
    assert r.average == pytest.approx((2 / 3 + 4) / 5)
    assert r.n_images == 3 and r.n_lesions == 3 and r.n_detections == 6
    # below 1/3 FPs/image: from (0, 1/3) (hits before the first FP) to (1/3, 1/3)
    assert sensitivity_at(r.curve_fps, r.curve_sens, [0.0, 0.25]) == pytest.approx([1 / 3] * 2)


def test_one_box_hits_several_lesions():
    gts = [_arr(A, [0, 0, 9, 10])]
    r = froc([_arr(A)], [np.array([0.5])], gts, fp_rates=(0.5,))
    assert r.curve_sens[-1] == 1.0 and r.curve_fps[-1] == 0.0
    assert r.sensitivities == [1.0]


def test_lesion_free_images_count_in_fps_per_image():
    gts = [_arr(A), _arr(), _arr(), _arr()]
    boxes = [_arr(A), _arr(), _arr(), _arr(FAR, FAR)]
    scores = [np.array([0.1]), np.zeros(0), np.zeros(0), np.array([0.9, 0.8])]
    r = froc(boxes, scores, gts, fp_rates=(0.25, 0.5))
    # two FPs over four images = 0.5 FPs/image before the TP arrives
    assert r.sensitivities == pytest.approx([0.0, 1.0])


def test_no_detections_and_no_lesions():
    r = froc([_arr()], [np.zeros(0)], [_arr(A)])
    assert r.sensitivities == [0.0] * 5
    r = froc([_arr(A)], [np.array([0.3])], [_arr()])
    assert all(math.isnan(s) for s in r.sensitivities) and r.n_lesions == 0


def test_size_strata_literal_and_ignoring_other_strata():
    big = [50, 50, 99, 99]
    gts = [_arr(A, big)]
    sizes = [np.array([5.0, 40.0])]
    boxes, scores = [_arr(big, A)], [np.array([0.9, 0.8])]
    r = froc(boxes, scores, gts, gt_sizes_mm=sizes, fp_rates=(0.5, 1.0))
    small = r.strata["<10mm"]
    # literally, the hit on the 40 mm lesion is an FP for the <10 mm stratum
    assert small.n_lesions == 1 and small.sensitivities == pytest.approx([0.5, 1.0])
    assert r.strata["10-30mm"].n_lesions == 0
    assert r.strata[">30mm"].sensitivities == [1.0, 1.0]
    r2 = froc(boxes, scores, gts, gt_sizes_mm=sizes, fp_rates=(0.5,), ignore_other_strata=True)
    assert r2.strata["<10mm"].sensitivities == [1.0]
    assert r2.sensitivities == [1.0]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one entry per image"):
        froc([_arr(A)], [np.array([1.0])], [_arr(A), _arr()])
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        froc([np.zeros((1, 3))], [np.array([1.0])], [_arr(A)])
    with pytest.raises(ValueError, match="x2 < x1"):
        froc([_arr([5, 0, 1, 9])], [np.array([1.0])], [_arr(A)])
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        froc([_arr(A, B)], [np.array([1.0])], [_arr(A)])
    with pytest.raises(ValueError, match="gt_sizes_mm"):
        froc([_arr(A)], [np.array([1.0])], [_arr(A)], strata={"s": (0, 1)})
    with pytest.raises(ValueError, match="mode"):
        froc([_arr(A)], [np.array([1.0])], [_arr(A)], mode="dice")
