"""Grouping decoder of RECIST-Net: heatmap peaks -> lesions with their RECIST diameters.

For every image: 3×3 max-pool peak extraction on the five maps; the top ``k`` peaks of each
endpoint map (refined by the predicted sub-pixel offsets); every (long_a, long_b) pair is
combined with every (short_a, short_b) pair (``k⁴`` candidates, vectorised and chunked);
candidates must pass the geometric checks (the two diameters cross, near-perpendicular,
long >= short, centre evidence on the centre heatmap, every keypoint score high enough);
score = (Σ of the 4 endpoint scores + 2 × centre score) / 6; the top candidates become boxes
(endpoints' box + DeepLesion padding), then greedy box NMS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scaledl.medical.recist_geometry import (
    DEEPLESION_PAD,
    as_spacing,
    canonicalize_recist,
    length_mm,
)
from scaledl.medical.recist_net import CELL_EPS


@dataclass
class RECISTDetection:
    """One detected lesion; points are ``(x, y)`` input pixels (long_a, long_b, short_a,
    short_b), the box is ``[x1, y1, x2, y2]`` with DeepLesion padding."""

    points: np.ndarray
    center: np.ndarray
    long_px: float
    short_px: float
    long_mm: float
    short_mm: float
    box: np.ndarray
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": self.points.tolist(),
            "center": self.center.tolist(),
            "long_px": self.long_px,
            "short_px": self.short_px,
            "long_mm": self.long_mm,
            "short_mm": self.short_mm,
            "box": self.box.tolist(),
            "score": self.score,
        }


def detections_to_arrays(dets: Sequence[RECISTDetection]) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes (N, 4), scores (N,))`` of a list of detections, as FROC input."""
    if not dets:
        return np.zeros((0, 4)), np.zeros(0)
    return np.stack([d.box for d in dets]), np.array([d.score for d in dets])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` boxes (continuous areas)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Greedy NMS; returns kept indices in descending score order."""
    order = np.argsort(-scores, kind="stable")
    if len(order) == 0:
        return order
    ious = box_iou(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed |= ious[i] > iou
    return np.array(keep, dtype=np.int64)


def suppress_ghosts(boxes: np.ndarray, scores: np.ndarray, factor: float = 4.0) -> np.ndarray:
    """ExtremeNet's ghost-box suppression: halve the score of a box (score > 0.2) whose
    contained boxes' scores sum to more than ``factor`` × its own (a box spanning several
    lesions); returns new scores."""
    out = scores.copy()
    for i in np.nonzero(scores > 0.2)[0]:
        inside = (
            (boxes[:, 0] >= boxes[i, 0])
            & (boxes[:, 1] >= boxes[i, 1])
            & (boxes[:, 2] <= boxes[i, 2])
            & (boxes[:, 3] <= boxes[i, 3])
        )
        inside[i] = False
        if scores[inside].sum() > factor * scores[i]:
            out[i] = scores[i] / 2
    return out


def _peaks(hm: torch.Tensor, offset: torch.Tensor, k: int, stride: int, vote: int = 0):
    """Top-``k`` 3×3 local maxima of each endpoint map: scores ``(4, k)``, points ``(4, k, 2)``.

    ``vote = 0``: each point is its peak cell plus that cell's offset. ``vote = r > 0``: the
    heatmap-weighted mean of the points predicted by every cell within ``r`` of the peak
    (cell + offset), for offsets trained around the peaks (``offset_radius >= r``): the
    votes of several cells average out the noise of one.
    """
    pooled = F.max_pool2d(hm[None, :4], 3, stride=1, padding=1)[0]
    peaks = torch.where(pooled == hm[:4], hm[:4], torch.zeros_like(hm[:4]))
    h, w = hm.shape[-2:]
    k = min(k, h * w)
    scores, idx = peaks.flatten(1).topk(k, dim=1)
    ys, xs = (idx // w), (idx % w)
    ch = torch.arange(4, device=hm.device)[:, None, None]
    d = torch.arange(-vote, vote + 1, device=hm.device)
    dy, dx = (t.reshape(-1) for t in torch.meshgrid(d, d, indexing="ij"))
    ny, nx = ys[..., None] + dy, xs[..., None] + dx  # (4, k, (2 vote + 1)²)
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    ny, nx = ny.clamp(0, h - 1), nx.clamp(0, w - 1)
    wt = torch.where(inside, hm[ch, ny, nx], torch.zeros_like(ny, dtype=hm.dtype))
    vx = nx + offset[2 * ch, ny, nx]
    vy = ny + offset[2 * ch + 1, ny, nx]
    norm = wt.sum(-1).clamp(min=1e-12)
    px, py = (wt * vx).sum(-1) / norm, (wt * vy).sum(-1) / norm
    pts = torch.stack([px * stride, py * stride], dim=-1)
    return scores, pts


def _pairs(scores: torch.Tensor, pts: torch.Tensor, a: int, b: int, thresh: float):
    """All (a, b) peak pairs whose two scores pass ``thresh``: ``(P, 2)`` scores, ``(P, 2, 2)``."""
    k = scores.shape[1]
    ia, ib = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    ia, ib = ia.reshape(-1).to(scores.device), ib.reshape(-1).to(scores.device)
    s = torch.stack([scores[a, ia], scores[b, ib]], dim=1)
    p = torch.stack([pts[a, ia], pts[b, ib]], dim=1)
    ok = (s >= thresh).all(dim=1)
    return s[ok], p[ok]


def decode(
    heatmap: torch.Tensor,
    offset: torch.Tensor,
    *,
    stride: int,
    spacing: float | Sequence[float] | None,
    k: int = 16,
    angle_tol: float = 30.0,
    center_thresh: float = 0.1,
    scores_thresh: float = 0.1,
    intersect_margin: float = 0.0,
    crossing_min: float = 0.0,
    center_mode: str = "intersection",
    top: int = 1000,
    nms_iou: float = 0.5,
    max_det: int = 100,
    pad: float = DEEPLESION_PAD,
    ghost: bool = False,
    center_pool: int = 1,
    vote: int = 0,
    chunk: int = 1 << 20,
) -> list[RECISTDetection]:
    """Group one image's keypoints into lesions.

    Args:
        heatmap: probabilities ``(5, h, w)`` (after sigmoid).
        offset: ``(8, h, w)`` or ``(10, h, w)`` sub-pixel offsets (x, y per endpoint).
        stride: input pixels per heatmap cell.
        spacing: ``(row_mm, col_mm)`` or a number, for the diameters in mm.
        k: peaks per endpoint map (the candidates are ``k⁴``; keep ``k <= 16`` on CPU).
        angle_tol: maximum deviation from perpendicular, degrees.
        center_thresh: minimum centre-heatmap evidence at the cell of the centre.
        scores_thresh: minimum score of each endpoint.
        intersect_margin: tolerance on the segments crossing, as a fraction of their lengths.
        crossing_min: the axes must cross at least this fraction of each axis' length away
            from its ends (a RECIST short axis crosses the long one inside the lesion; the
            synthetic ground truth crosses at 0.25-0.81 of the long axis). It rejects the
            ExtremeNet-style ghost that joins an endpoint of one lesion to another lesion whose
            short axis then crosses near the far end. 0 (the default) accepts any crossing;
            0.15 keeps every ground-truth lesion of the synthetic data.
        center_mode: how the centre is computed; must match training.
        top: candidates kept before NMS; ``max_det`` kept after.
        ghost: apply ghost-box suppression before NMS.
        center_pool: read the centre evidence as the max over a ``center_pool``² window
            (odd; 1 = the centre's own cell, as ExtremeNet).
        vote: 0 = each endpoint is its peak cell + offset (CenterNet); ``r > 0`` = the
            heatmap-weighted mean of the cell + offset predictions within ``r`` cells of the
            peak (needs a model trained with ``offset_radius >= r``; ``RECISTNet.detect``
            passes its own).
    """
    sp = as_spacing(spacing)
    if heatmap.ndim != 3 or heatmap.shape[0] != 5:
        raise ValueError(f"heatmap must be (5, h, w), got {tuple(heatmap.shape)}")
    if offset.ndim != 3 or offset.shape[0] not in (8, 10) or offset.shape[1:] != heatmap.shape[1:]:
        raise ValueError(
            f"offset must be (8 or 10, h, w) matching the heatmap, got {tuple(offset.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if vote < 0:
        raise ValueError(f"vote must be non-negative, got {vote}")
    if center_pool < 1 or center_pool % 2 == 0:
        raise ValueError(f"center_pool must be a positive odd number, got {center_pool}")
    if center_mode not in ("intersection", "bbox", "mean"):
        raise ValueError(f"center_mode must be intersection, bbox or mean, got {center_mode!r}")
    if not 0.0 <= crossing_min < 0.5:
        raise ValueError(f"crossing_min must be in [0, 0.5), got {crossing_min}")
    hm, off = heatmap.float(), offset.float()
    scores, pts = _peaks(hm, off, k, stride, vote)
    pts = pts.double()  # the geometry in float64: round-off must not move a centre's cell
    ls, lp = _pairs(scores, pts, 0, 1, scores_thresh)
    ss, spts = _pairs(scores, pts, 2, 3, scores_thresh)
    if len(ls) == 0 or len(ss) == 0:
        return []
    center_map = hm[4]
    if center_pool > 1:  # tolerate a centre peak that is off by a cell or two
        center_map = F.max_pool2d(center_map[None, None], center_pool, 1, center_pool // 2)[0, 0]
    h, w = center_map.shape
    cos_tol = math.sin(math.radians(angle_tol))  # |cos(angle)| < sin(tol) <=> |angle-90| < tol
    lo, hi = crossing_min - intersect_margin, 1 - crossing_min + intersect_margin
    cand_s, cand_p, cand_c = [], [], []
    step = max(1, chunk // len(ss))
    for i0 in range(0, len(ls), step):
        la = lp[i0 : i0 + step, None]  # (L, 1, 2, 2)
        s_l = ls[i0 : i0 + step, None]
        a, b = la[..., 0, :], la[..., 1, :]
        c, d = spts[None, :, 0, :], spts[None, :, 1, :]
        r, s = b - a, d - c
        len_r, len_s = r.norm(dim=-1), s.norm(dim=-1)
        den = r[..., 0] * s[..., 1] - r[..., 1] * s[..., 0]
        ca = c - a
        safe = torch.where(den.abs() > 1e-9, den, torch.ones_like(den))
        t = (ca[..., 0] * s[..., 1] - ca[..., 1] * s[..., 0]) / safe
        u = (ca[..., 0] * r[..., 1] - ca[..., 1] * r[..., 0]) / safe
        cross = (den.abs() > 1e-9) & (t >= lo) & (t <= hi) & (u >= lo) & (u <= hi)
        cosang = (r * s).sum(-1).abs() / (len_r * len_s).clamp(min=1e-9)
        ok = cross & (cosang < cos_tol) & (len_r >= len_s) & (len_s > 0)
        four = torch.stack(torch.broadcast_tensors(a, b, c, d), dim=-2)  # (L, S, 4, 2)
        if center_mode == "intersection":
            ctr = a + t[..., None] * r
        elif center_mode == "bbox":
            ctr = (four.amin(-2) + four.amax(-2)) / 2
        else:
            ctr = four.mean(-2)
        cx = (ctr[..., 0] / stride + CELL_EPS).floor().long().clamp(0, w - 1)
        cy = (ctr[..., 1] / stride + CELL_EPS).floor().long().clamp(0, h - 1)
        s_c = center_map[cy, cx]
        ok &= s_c >= center_thresh
        score = (s_l.sum(-1) + ss[None].sum(-1) + 2 * s_c) / 6
        cand_s.append(score[ok])
        cand_p.append(four[ok])
        cand_c.append(ctr[ok])
    cs = torch.cat(cand_s)
    if len(cs) == 0:
        return []
    order = cs.topk(min(top, len(cs))).indices
    cs = cs[order].cpu().numpy().astype(np.float64)
    cp = torch.cat(cand_p)[order].cpu().numpy().astype(np.float64)
    cc = torch.cat(cand_c)[order].cpu().numpy().astype(np.float64)
    boxes = np.concatenate([cp.min(1) - pad, cp.max(1) + pad], axis=1)
    if ghost:
        cs = suppress_ghosts(boxes, cs)
    keep = box_nms(boxes, cs, nms_iou)[:max_det]
    cp = canonicalize_recist(cp[keep])
    long_px = np.hypot(*(cp[:, 1] - cp[:, 0]).T)
    short_px = np.hypot(*(cp[:, 3] - cp[:, 2]).T)
    long_mm = length_mm(cp[:, 0], cp[:, 1], sp)
    short_mm = length_mm(cp[:, 2], cp[:, 3], sp)
    return [
        RECISTDetection(
            points=cp[j],
            center=cc[keep[j]],
            long_px=float(long_px[j]),
            short_px=float(short_px[j]),
            long_mm=float(long_mm[j]),
            short_mm=float(short_mm[j]),
            box=boxes[keep[j]],
            score=float(cs[keep[j]]),
        )
        for j in range(len(keep))
    ]


def decode_batch(
    heatmaps: torch.Tensor,
    offsets: torch.Tensor,
    *,
    stride: int,
    spacing: Any,
    **kwargs: Any,
) -> list[list[RECISTDetection]]:
    """:func:`decode` for a batch ``(B, 5, h, w)``; ``spacing`` is one value for all images
    or one ``(row_mm, col_mm)`` per image."""
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must be (B, 5, h, w), got {tuple(heatmaps.shape)}")
    B = heatmaps.shape[0]
    if spacing is None:
        as_spacing(None)  # raises the standard message
    sp = np.asarray(spacing, dtype=np.float64)
    per_image = sp.ndim == 2 or (sp.ndim == 1 and sp.size == B and B not in (1, 2))
    if per_image and len(sp) != B:
        raise ValueError(f"spacing has {len(sp)} entries for {B} images")
    return [
        decode(heatmaps[i], offsets[i], stride=stride, spacing=sp[i] if per_image else sp, **kwargs)
        for i in range(B)
    ]
