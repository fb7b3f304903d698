"""DeepLesion-style FROC: pooled detections, box IoU, per-lesion hits, sensitivity at FPs/image.

The matching rules follow the DeepLesion evaluation used by MULAN/3DCE:

1. pool the detections of all images and sort them by score (descending, stable);
2. a detection is compared with the ground-truth boxes of *its own image* only, with
   "+1 pixel" box areas (``w = x2 - x1 + 1``);
3. no ground truth at ``overlap >= iou_th`` -> false positive; otherwise, if some matching
   lesion is not yet hit, *all* matching lesions become hit (one box may hit several) and the
   detection is a true positive; if all matching lesions were already hit, the detection is
   neither (duplicates are not penalised);
4. after each detection the curve gets the point ``(FP / N_img, hits / N_lesions)``, where
   ``N_img`` counts lesion-free images too.

Sensitivity at a rate of FPs/image is interpolated linearly on that curve. Two details the
reference does not pin down are fixed here and documented: several points at one FP count
keep the highest sensitivity, and the curve starts at ``(0, hits before the first FP)``;
past the curve's end the last sensitivity is used. Size strata keep only the stratum's
lesions and match them against *all* detections (a hit on another stratum's lesion then
counts as a false positive, unless ``ignore_other_strata``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: FP rates (per image) of the DeepLesion tables.
DEFAULT_FP_RATES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
#: Size strata by long diameter in mm: ``lo <= d < hi`` (the last one includes 30).
DEFAULT_STRATA: dict[str, tuple[float, float]] = {
    "<10mm": (0.0, 10.0),
    "10-30mm": (10.0, 30.0 + 1e-9),
    ">30mm": (30.0 + 1e-9, math.inf),
}
MATCH_MODES = ("iou", "iobb", "center")


@dataclass
class FROCResult:
    """Sensitivities at the requested FP rates, their mean, the curve and optional strata."""

    fp_rates: list[float]
    sensitivities: list[float]
    average: float
    curve_fps: np.ndarray
    curve_sens: np.ndarray
    n_images: int
    n_lesions: int
    n_detections: int
    strata: dict[str, FROCResult] = field(default_factory=dict)

    def at(self, rate: float) -> float:
        """Sensitivity at one of the requested FP rates."""
        for r, s in zip(self.fp_rates, self.sensitivities):
            if math.isclose(r, rate):
                return s
        raise ValueError(f"FP rate {rate} was not requested; requested {self.fp_rates}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp_rates": self.fp_rates,
            "sensitivities": self.sensitivities,
            "average": self.average,
            "n_images": self.n_images,
            "n_lesions": self.n_lesions,
            "n_detections": self.n_detections,
            "strata": {k: v.to_dict() for k, v in self.strata.items()},
        }

    def table_rows(self, name: str = "all") -> list[list[Any]]:
        """Rows ``[subset, n_lesions, sens@rates..., average]`` for this result and its strata."""
        rows = [[name, self.n_lesions, *self.sensitivities, self.average]]
        rows += [[k, v.n_lesions, *v.sensitivities, v.average] for k, v in self.strata.items()]
        return rows


def box_overlap(box: np.ndarray, gts: np.ndarray, mode: str = "iou") -> np.ndarray:
    """Overlap of one box ``[x1, y1, x2, y2]`` with ``(M, 4)`` boxes, "+1 pixel" areas.

    ``iou``: intersection over union (parity); ``iobb``: intersection over the *detected* box
    area (3DCE's IoBB, non-parity); ``center``: 1 where the detection's centre lies in the
    ground-truth box (non-parity).
    """
    gts = np.asarray(gts, dtype=np.float64).reshape(-1, 4)
    if mode == "center":
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        inside = (gts[:, 0] <= cx) & (cx <= gts[:, 2]) & (gts[:, 1] <= cy) & (cy <= gts[:, 3])
        return inside.astype(np.float64)
    iw = np.minimum(box[2], gts[:, 2]) - np.maximum(box[0], gts[:, 0]) + 1
    ih = np.minimum(box[3], gts[:, 3]) - np.maximum(box[1], gts[:, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_d = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    if mode == "iobb":
        return inter / area_d
    area_g = (gts[:, 2] - gts[:, 0] + 1) * (gts[:, 3] - gts[:, 1] + 1)
    return inter / (area_d + area_g - inter)


def _as_boxes(x: Any, what: str, i: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, 4))
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{what}[{i}] must have shape (N, 4) as [x1, y1, x2, y2], got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}[{i}] contains NaN or inf")
    if np.any(a[:, 2] < a[:, 0]) or np.any(a[:, 3] < a[:, 1]):
        raise ValueError(
            f"{what}[{i}] has a box with x2 < x1 or y2 < y1 (expected [x1, y1, x2, y2])"
        )
    return a


def froc_curve(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    *,
    iou_th: float = 0.5,
    mode: str = "iou",
    gt_ignore: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The raw DeepLesion FROC curve: ``(fps_per_image, sensitivity, n_lesions)`` per detection.

    ``gt_ignore[i]`` marks lesions of image ``i`` that are left out of the count; a detection
    that matches only ignored lesions is neither TP nor FP (``ignore_other_strata``).
    """
    n_img = len(gt_boxes)
    if not (len(pred_boxes) == len(pred_scores) == n_img):
        raise ValueError(
            f"pred_boxes, pred_scores and gt_boxes need one entry per image, got "
            f"{len(pred_boxes)}, {len(pred_scores)} and {n_img}"
        )
    if n_img == 0:
        raise ValueError("froc needs at least one image")
    if mode not in MATCH_MODES:
        raise ValueError(f"mode must be one of {MATCH_MODES}, got {mode!r}")
    gts = [_as_boxes(g, "gt_boxes", i) for i, g in enumerate(gt_boxes)]
    ignore = [
        np.zeros(len(g), bool) if gt_ignore is None else np.asarray(gt_ignore[i], bool)
        for i, g in enumerate(gts)
    ]
    boxes, scores, owner = [], [], []
    for i, (b, s) in enumerate(zip(pred_boxes, pred_scores)):
        b = _as_boxes(b, "pred_boxes", i)
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if len(s) != len(b):
            raise ValueError(f"image {i}: {len(b)} boxes but {len(s)} scores")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"pred_scores[{i}] contains NaN or inf")
        boxes.append(b)
        scores.append(s)
        owner.append(np.full(len(b), i))
    all_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    all_scores = np.concatenate(scores)
    all_owner = np.concatenate(owner).astype(np.int64)
    order = np.argsort(-all_scores, kind="stable")
    hit = [np.zeros(len(g), bool) for g in gts]
    n_gt = int(sum(int((~ig).sum()) for ig in ignore))
    n_fp = n_hits = 0
    fps, sens = [0.0], [0.0]
    for d in order:
        i = all_owner[d]
        match = box_overlap(all_boxes[d], gts[i], mode) >= iou_th
        counted = match & ~ignore[i]
        if not match.any():
            n_fp += 1
        elif counted.any() and not hit[i][counted].all():
            n_hits += int((counted & ~hit[i]).sum())
            hit[i] |= counted
        fps.append(n_fp / n_img)
        sens.append(n_hits / n_gt if n_gt else math.nan)
    return np.asarray(fps), np.asarray(sens), n_gt


def sensitivity_at(
    curve_fps: np.ndarray, curve_sens: np.ndarray, rates: Sequence[float]
) -> list[float]:
    """Interpolate a FROC curve at FP rates (max sensitivity per FP rate, last value beyond)."""
    fps, inv = np.unique(np.asarray(curve_fps), return_inverse=True)
    best = np.full(len(fps), -np.inf)
    np.maximum.at(best, inv, np.asarray(curve_sens))
    return [float(np.interp(r, fps, best)) for r in rates]


def froc(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    *,
    fp_rates: Sequence[float] = DEFAULT_FP_RATES,
    iou_th: float = 0.5,
    mode: str = "iou",
    gt_sizes_mm: Sequence[np.ndarray] | None = None,
    strata: dict[str, tuple[float, float]] | None = None,
    ignore_other_strata: bool = False,
) -> FROCResult:
    """DeepLesion FROC of per-image detections against per-image ground-truth boxes.

    Args:
        pred_boxes: per image, ``(N_i, 4)`` boxes ``[x1, y1, x2, y2]`` (all detections: do not
            threshold them first).
        pred_scores: per image, ``(N_i,)`` scores.
        gt_boxes: per image, ``(M_i, 4)`` boxes; lesion-free images have ``M_i = 0`` and still
            count in FPs/image.
        fp_rates: FP rates per image to report (DeepLesion: 0.5, 1, 2, 4, 8).
        iou_th: overlap threshold (0.5).
        mode: ``iou`` (parity), ``iobb`` or ``center`` (non-parity).
        gt_sizes_mm: per image, ``(M_i,)`` long diameters; enables size strata.
        strata: ``name -> (lo, hi)`` in mm (``lo <= d < hi``); default <10, 10-30, >30 mm.
        ignore_other_strata: within a stratum, a detection matching only other strata's
            lesions is neither TP nor FP (default False: it is an FP, the literal rule).

    Returns:
        :class:`FROCResult`; sensitivities are NaN when there are no lesions.
    """
    rates = [float(r) for r in fp_rates]
    if not rates or any(not math.isfinite(r) or r < 0 for r in rates):
        raise ValueError(f"fp_rates must be non-negative numbers, got {fp_rates!r}")
    if not 0 < iou_th <= 1:
        raise ValueError(f"iou_th must be in (0, 1], got {iou_th}")
    fps, sens, n_gt = froc_curve(pred_boxes, pred_scores, gt_boxes, iou_th=iou_th, mode=mode)
    result = _result(fps, sens, n_gt, rates, len(gt_boxes), pred_scores)
    if gt_sizes_mm is None:
        if strata:
            raise ValueError("strata need gt_sizes_mm (long diameter of every lesion in mm)")
        return result
    if len(gt_sizes_mm) != len(gt_boxes):
        raise ValueError(f"gt_sizes_mm has {len(gt_sizes_mm)} entries for {len(gt_boxes)} images")
    sizes = [np.asarray(s, dtype=np.float64).reshape(-1) for s in gt_sizes_mm]
    for i, (s, g) in enumerate(zip(sizes, gt_boxes)):
        if len(s) != len(np.asarray(g).reshape(-1, 4)):
            raise ValueError(f"image {i}: {len(s)} lesion sizes for {len(g)} ground-truth boxes")
    for name, (lo, hi) in (strata or DEFAULT_STRATA).items():
        keep = [(s >= lo) & (s < hi) for s in sizes]
        gts_k = [np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in gt_boxes]
        if ignore_other_strata:
            f, s_, n = froc_curve(
                pred_boxes, pred_scores, gts_k, iou_th=iou_th, mode=mode,
                gt_ignore=[~k for k in keep],
            )  # fmt: skip
        else:
            gts_k = [g[k] for g, k in zip(gts_k, keep)]
            f, s_, n = froc_curve(pred_boxes, pred_scores, gts_k, iou_th=iou_th, mode=mode)
        result.strata[name] = _result(f, s_, n, rates, len(gt_boxes), pred_scores)
    return result


def _result(
    fps: np.ndarray,
    sens: np.ndarray,
    n_gt: int,
    rates: list[float],
    n_img: int,
    pred_scores: Sequence[np.ndarray],
) -> FROCResult:
    n_det = int(sum(np.asarray(s).size for s in pred_scores))
    values = [math.nan] * len(rates) if n_gt == 0 else sensitivity_at(fps, sens, rates)
    return FROCResult(
        fp_rates=rates,
        sensitivities=values,
        average=float(np.mean(values)) if n_gt else math.nan,
        curve_fps=fps,
        curve_sens=sens,
        n_images=n_img,
        n_lesions=n_gt,
        n_detections=n_det,
    )
