"""Training and evaluation loops for RECIST-Net on a synthetic or user ``LesionDataset``.

Evaluation reports the DeepLesion FROC (with size strata) and, for every ground-truth lesion
hit by a detection (IoU >= 0.5, the highest-scoring one), the diameter errors in mm, the
endpoint error and the long-axis angle error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from scaledl.medical.froc_eval import DEFAULT_FP_RATES, box_overlap, froc
from scaledl.medical.lesion_data import DEFAULT_WINDOW, LesionDataset, window_hu
from scaledl.medical.recist_decode import RECISTDetection, detections_to_arrays
from scaledl.medical.recist_geometry import canonicalize_recist
from scaledl.medical.recist_net import RECISTNet


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def images_tensor(
    ds: LesionDataset, window: tuple[float, float] = DEFAULT_WINDOW, device: Any = "cpu"
) -> torch.Tensor:
    """All images windowed to [0, 1] as ``(N, 1, H, W)`` float32."""
    return torch.from_numpy(window_hu(ds.images, window))[:, None].to(device)


def lr_factor(progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up then cosine decay to zero over ``progress`` in [0, 1]."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


class TrainingClock:
    """Training progress in [0, 1]: the larger of steps done / ``steps`` and time spent /
    ``time_limit_s``, so the learning-rate schedule always completes, also when a time budget
    rather than the step count ends the run."""

    def __init__(self, steps: int, time_limit_s: float | None = None):
        self.steps, self.limit = steps, time_limit_s
        self.t0 = time.perf_counter()

    def progress(self, step: int) -> float:
        p = step / self.steps
        if self.limit:
            p = max(p, (time.perf_counter() - self.t0) / self.limit)
        return p

    def set_lr(self, opt: torch.optim.Optimizer, lr: float, step: int) -> bool:
        """Set the learning rate for ``step``; False once the run is over."""
        p = self.progress(step)
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(p)
        return p < 1.0


def to_device(a: np.ndarray | torch.Tensor, device: Any) -> torch.Tensor:
    """Copy to ``device``; to a GPU through pinned memory without blocking, because a copy
    from pageable memory waits for the GPU to finish its queued work, so the host could not
    prepare the next batch while the GPU computes this one."""
    t = torch.as_tensor(a)
    dev = torch.device(device)
    if dev.type != "cuda" or t.device.type != "cpu":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def flip_points(
    points: np.ndarray,
    width: int,
    height: int,
    hflip: bool,
    vflip: bool,
    transpose: bool = False,
) -> np.ndarray:
    """Move ``(n, 4, 2)`` endpoints with the image, then re-canonicalise a/b.

    The image ops, in this order: ``flip(-1)`` if ``hflip``, ``flip(-2)`` if ``vflip``, then
    ``transpose(-1, -2)`` if ``transpose`` (square images only).
    """
    p = np.array(points, dtype=np.float64, copy=True).reshape(-1, 4, 2)
    if hflip:
        p[..., 0] = width - 1 - p[..., 0]
    if vflip:
        p[..., 1] = height - 1 - p[..., 1]
    if transpose:
        p = p[..., ::-1].copy()
    return canonicalize_recist(p) if len(p) else p


def sample_batch(
    ds: LesionDataset,
    x_all: torch.Tensor,
    rng: np.random.Generator,
    batch_size: int,
    device: Any,
    augment: bool = True,
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """A random batch of windowed images and their *labelled* endpoints. With ``augment``,
    each image gets one of the 8 flips/rotations by 90° (transposes only when square)."""
    H, W = x_all.shape[-2:]
    idx = rng.integers(0, len(ds), batch_size)
    x = x_all[to_device(idx, x_all.device)].to(device)
    pts = []
    for j, i in enumerate(idx):
        hf, vf, tr = (rng.random(3) < 0.5) if augment else (False, False, False)
        tr = bool(tr) and H == W
        if hf:
            x[j] = x[j].flip(-1)
        if vf:
            x[j] = x[j].flip(-2)
        if tr:
            x[j] = x[j].transpose(-1, -2).clone()
        pts.append(flip_points(ds.train_points(int(i)), W, H, bool(hf), bool(vf), tr))
    return x, pts


def train_recist(
    model: RECISTNet,
    ds: LesionDataset,
    *,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    seed: int = 0,
    device: Any = None,
    amp: bool | None = None,
    images: torch.Tensor | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    time_limit_s: float | None = None,
    progress: bool = False,
) -> list[float]:
    """Train with AdamW, warm-up and cosine decay on random batches (flips, 90° rotations).

    Only each image's *labelled* lesions are targets (missing-label simulation). Returns the
    loss of every step (fewer than ``steps`` when ``time_limit_s`` runs out first: the
    schedule then follows elapsed time, see :class:`TrainingClock`). ``images`` may pass a
    pre-windowed ``(N, 1, H, W)`` tensor already on the device (saves a copy per call).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    dev = torch.device(device) if device is not None else default_device()
    use_amp = (dev.type == "cuda") if amp is None else amp
    model.to(dev).train()
    x_all = images if images is not None else images_tensor(ds, device=dev)
    H, W = x_all.shape[-2:]
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    clock = TrainingClock(steps, time_limit_s)
    losses: list[torch.Tensor] = []  # kept on the device: a float() each step would sync
    it: Any = range(steps)
    if progress:
        from scaledl.cli_utils import progress as bar

        it = bar(it, total=steps, description="training RECIST-Net")
    for step in it:
        if not clock.set_lr(opt, lr, step):
            break
        x, pts = sample_batch(ds, x_all, rng, batch_size, dev, augment)
        targets = {k: to_device(v, dev) for k, v in model.encode(pts, (H, W)).items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x)
        parts = model.loss(out, targets)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(parts["loss"].detach())
        if on_step is not None:
            on_step(step, {k: float(v.detach()) for k, v in parts.items()})
    return torch.stack(losses).tolist() if losses else []


@torch.no_grad()
def predict_recist(
    model: RECISTNet,
    ds: LesionDataset,
    *,
    batch_size: int = 32,
    device: Any = None,
    images: torch.Tensor | None = None,
    progress: bool = False,
    **decode_kwargs: Any,
) -> list[list[RECISTDetection]]:
    """Run the detector over a dataset; per image, its detections."""
    dev = torch.device(device) if device is not None else default_device()
    model.to(dev).eval()
    x_all = images if images is not None else images_tensor(ds, device="cpu")
    out: list[list[RECISTDetection]] = []
    starts: Any = range(0, len(ds), batch_size)
    if progress:
        from scaledl.cli_utils import progress as bar

        starts = bar(starts, total=math.ceil(len(ds) / batch_size), description="detecting")
    for s in starts:
        x = x_all[s : s + batch_size].to(dev)
        out += model.detect(x, ds.spacing[s : s + batch_size], **decode_kwargs)
    return out


def match_lesions(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    iou_th: float = 0.5,
) -> list[np.ndarray]:
    """For every ground-truth lesion, the index of the highest-scoring detection of its image
    with IoU >= ``iou_th`` ("+1 pixel" areas), or -1."""
    out = []
    for b, s, g in zip(pred_boxes, pred_scores, gt_boxes):
        g = np.asarray(g, dtype=np.float64).reshape(-1, 4)
        best = np.full(len(g), -1, dtype=np.int64)
        for d in np.argsort(-np.asarray(s), kind="stable"):
            hit = (box_overlap(np.asarray(b)[d], g) >= iou_th) & (best < 0)
            best[hit] = d
        out.append(best)
    return out


def diameter_errors(
    matches: Sequence[np.ndarray],
    pred_long_mm: Sequence[np.ndarray],
    pred_short_mm: Sequence[np.ndarray],
    ds: LesionDataset,
) -> dict[str, float]:
    """Median and mean absolute long/short diameter errors (mm) over the matched lesions."""
    el, es = [], []
    for i, m in enumerate(matches):
        ok = m >= 0
        el += list(np.abs(np.asarray(pred_long_mm[i])[m[ok]] - ds.long_mm[i][ok]))
        es += list(np.abs(np.asarray(pred_short_mm[i])[m[ok]] - ds.short_mm[i][ok]))
    nan = math.nan
    return {
        "n_matched": len(el),
        "median_long_err_mm": float(np.median(el)) if el else nan,
        "mean_long_err_mm": float(np.mean(el)) if el else nan,
        "median_short_err_mm": float(np.median(es)) if es else nan,
        "mean_short_err_mm": float(np.mean(es)) if es else nan,
    }


def endpoint_distances(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Distances ``(4,)`` between predicted and true RECIST endpoints ``(4, 2)``, each
    diameter's two ends matched in the order (a-a, b-b or a-b, b-a) with the smaller sum."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    out = np.empty(4)
    for i in (0, 2):
        same = np.linalg.norm(pred[i : i + 2] - gt[i : i + 2], axis=1)
        swap = np.linalg.norm(pred[i : i + 2] - gt[i : i + 2][::-1], axis=1)
        out[i : i + 2] = same if same.sum() <= swap.sum() else swap
    return out


def endpoint_errors(
    matches: Sequence[np.ndarray], dets: Sequence[Sequence[RECISTDetection]], ds: LesionDataset
) -> dict[str, float]:
    """Median endpoint L2 error (px, mm) and long-axis angle error (degrees) of matched lesions.

    The two ends of a diameter are compared in whichever order fits better: the a/b order
    flips for a near-vertical axis when an end moves by a fraction of a pixel in x, which
    says nothing about the detection's accuracy.
    """
    e_px, e_mm, ang = [], [], []
    for i, m in enumerate(matches):
        for j in np.nonzero(m >= 0)[0]:
            p = dets[i][m[j]].points
            g = canonicalize_recist(ds.points[i][j])
            err = endpoint_distances(p, g)
            e_px.append(float(err.mean()))
            e_mm.append(float(err.mean() * ds.spacing[i].mean()))
            vp, vg = p[1] - p[0], g[1] - g[0]
            a = abs(math.degrees(math.atan2(vp[1], vp[0]) - math.atan2(vg[1], vg[0]))) % 180
            ang.append(min(a, 180 - a))
    nan = math.nan
    return {
        "median_endpoint_err_px": float(np.median(e_px)) if e_px else nan,
        "median_endpoint_err_mm": float(np.median(e_mm)) if e_mm else nan,
        "median_angle_err_deg": float(np.median(ang)) if ang else nan,
    }


def evaluate_boxes(
    ds: LesionDataset,
    boxes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    long_mm: Sequence[np.ndarray],
    short_mm: Sequence[np.ndarray],
    *,
    fp_rates: Sequence[float] = DEFAULT_FP_RATES,
    iou_th: float = 0.5,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """FROC (with strata) and diameter errors of any detector's per-image outputs."""
    gt = ds.boxes()
    res = froc(boxes, scores, gt, fp_rates=fp_rates, iou_th=iou_th, gt_sizes_mm=ds.long_mm)
    matches = match_lesions(boxes, scores, gt, iou_th)
    out = {"froc": res, **diameter_errors(matches, long_mm, short_mm, ds)}
    return out, matches


def evaluate_recist(
    dets: Sequence[Sequence[RECISTDetection]],
    ds: LesionDataset,
    *,
    fp_rates: Sequence[float] = DEFAULT_FP_RATES,
    iou_th: float = 0.5,
) -> dict[str, Any]:
    """FROC, diameter errors and endpoint/angle errors of RECIST-Net detections."""
    if len(dets) != len(ds):
        raise ValueError(f"{len(dets)} detection lists for {len(ds)} images")
    arrays = [detections_to_arrays(d) for d in dets]
    boxes = [a[0] for a in arrays]
    scores = [a[1] for a in arrays]
    longs = [np.array([d.long_mm for d in dl]) for dl in dets]
    shorts = [np.array([d.short_mm for d in dl]) for dl in dets]
    out, matches = evaluate_boxes(
        ds, boxes, scores, longs, shorts, fp_rates=fp_rates, iou_th=iou_th
    )
    out.update(endpoint_errors(matches, dets, ds))
    return out
