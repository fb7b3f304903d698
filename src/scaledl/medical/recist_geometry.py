"""RECIST geometry: long/short diameters from a lesion mask, boxes, pixel-spacing conversions.

Conventions used by every RECIST-Net module:

- a point is ``(x, y)`` = ``(column, row)`` in pixels, pixel centres at integer coordinates;
- ``spacing`` is ``(row_mm, col_mm)`` like DICOM ``PixelSpacing`` (a scalar means isotropic);
- the four RECIST endpoints are ordered ``long_a, long_b, short_a, short_b``; within each
  diameter ``a`` is the endpoint with the smaller x (ties: smaller y), see
  :func:`canonicalize_recist`;
- boxes are ``[x1, y1, x2, y2]``.

Only numpy and scipy are needed, so the data generator runs where scikit-image is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: DeepLesion pads the bounding box of the RECIST endpoints by 5 px on every side.
DEEPLESION_PAD = 5.0


def as_spacing(spacing: float | Sequence[float] | np.ndarray | None) -> np.ndarray:
    """``(row_mm, col_mm)`` as a float array; a scalar means isotropic pixels.

    Raises ``ValueError`` when the spacing is missing, not positive or not one/two numbers.
    """
    if spacing is None:
        raise ValueError(
            "spacing is required: pixel spacing in mm as (row_mm, col_mm) or one number "
            "(pass spacing=1.0 to measure in pixels)"
        )
    arr = np.atleast_1d(np.asarray(spacing, dtype=np.float64)).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 2)
    if arr.size != 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(
            f"spacing must be one or two positive numbers (row_mm, col_mm), got {spacing!r}"
        )
    return arr


def length_mm(p: np.ndarray, q: np.ndarray, spacing: float | Sequence[float]) -> np.ndarray:
    """Physical length of the segment(s) ``p``-``q`` (``(..., 2)`` as ``(x, y)``) in mm."""
    sp = as_spacing(spacing)
    d = np.asarray(q, dtype=np.float64) - np.asarray(p, dtype=np.float64)
    return np.hypot(d[..., 0] * sp[1], d[..., 1] * sp[0])


def px_to_mm(length_px: float | np.ndarray, spacing: float | Sequence[float]) -> np.ndarray:
    """Convert a length in pixels to mm; requires isotropic spacing (use :func:`length_mm`)."""
    sp = as_spacing(spacing)
    if not np.isclose(sp[0], sp[1]):
        raise ValueError(
            f"px_to_mm needs isotropic spacing, got {tuple(sp)}; use length_mm(p, q, spacing)"
        )
    return np.asarray(length_px, dtype=np.float64) * sp[0]


def mm_to_px(length_mm_: float | np.ndarray, spacing: float | Sequence[float]) -> np.ndarray:
    """Convert a length in mm to pixels; requires isotropic spacing."""
    return np.asarray(length_mm_, dtype=np.float64) / px_to_mm(1.0, spacing)


def canonicalize_recist(points: np.ndarray) -> np.ndarray:
    """Order each diameter's endpoints so that ``a`` has the smaller x (ties: smaller y).

    ``points`` is ``(..., 4, 2)``; returns a new array. Needed after flips, which swap sides.
    """
    pts = np.array(points, dtype=np.float64, copy=True)
    if pts.shape[-2:] != (4, 2):
        raise ValueError(f"RECIST points must have shape (..., 4, 2), got {pts.shape}")
    for i in (0, 2):
        a, b = pts[..., i, :].copy(), pts[..., i + 1, :].copy()
        swap = (b[..., 0] < a[..., 0]) | ((b[..., 0] == a[..., 0]) & (b[..., 1] < a[..., 1]))
        pts[..., i, :] = np.where(swap[..., None], b, a)
        pts[..., i + 1, :] = np.where(swap[..., None], a, b)
    return pts


def segment_intersection(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection of the long (``p0p1``) and short (``p2p3``) segments of ``(..., 4, 2)``.

    Returns ``(point, t, u)``: the intersection of the two lines and its parameters along each
    segment (inside both segments when ``0 <= t, u <= 1``). Parallel lines give NaN.
    """
    p = np.asarray(points, dtype=np.float64)
    a, b, c, d = p[..., 0, :], p[..., 1, :], p[..., 2, :], p[..., 3, :]
    r, s = b - a, d - c
    den = r[..., 0] * s[..., 1] - r[..., 1] * s[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ca = c - a
        t = (ca[..., 0] * s[..., 1] - ca[..., 1] * s[..., 0]) / den
        u = (ca[..., 0] * r[..., 1] - ca[..., 1] * r[..., 0]) / den
    return a + t[..., None] * r, t, u


def recist_center(points: np.ndarray, mode: str = "intersection") -> np.ndarray:
    """The lesion centre of ``(..., 4, 2)`` RECIST points.

    ``intersection`` (default) crosses the two diameters (midpoint of the long axis when they
    are parallel); ``bbox`` is the centre of the points' box (ExtremeNet); ``mean`` their mean.
    The training target and the decoder must use the same mode.
    """
    p = np.asarray(points, dtype=np.float64)
    if mode == "mean":
        return p.mean(axis=-2)
    if mode == "bbox":
        return (p.min(axis=-2) + p.max(axis=-2)) / 2
    if mode != "intersection":
        raise ValueError(f"center_mode must be 'intersection', 'bbox' or 'mean', got {mode!r}")
    c, _, _ = segment_intersection(p)
    mid = (p[..., 0, :] + p[..., 1, :]) / 2
    return np.where(np.isfinite(c), c, mid)


def recist_to_box(points: np.ndarray, pad: float = DEEPLESION_PAD) -> np.ndarray:
    """Box ``[x1, y1, x2, y2]`` of the RECIST endpoints, padded by ``pad`` px per side.

    ``points`` is ``(4, 2)`` or ``(N, 4, 2)``; DeepLesion's boxes use ``pad=5``.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim < 2 or p.shape[-2:] != (4, 2):
        raise ValueError(f"RECIST points must have shape (4, 2) or (N, 4, 2), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("RECIST points contain NaN or inf")
    lo, hi = p.min(axis=-2) - pad, p.max(axis=-2) + pad
    return np.concatenate([lo, hi], axis=-1)


@dataclass(frozen=True)
class RECIST:
    """RECIST measurement of one lesion (see the module docstring for conventions)."""

    points: np.ndarray  # (4, 2): long_a, long_b, short_a, short_b as (x, y)
    center: np.ndarray  # (2,)
    long_px: float
    short_px: float
    long_mm: float
    short_mm: float

    def box(self, pad: float = DEEPLESION_PAD) -> np.ndarray:
        return recist_to_box(self.points, pad)


def recist_from_points(
    points: np.ndarray, spacing: float | Sequence[float], center_mode: str = "intersection"
) -> RECIST:
    """Measure given endpoints ``(4, 2)`` (long_a, long_b, short_a, short_b)."""
    pts = canonicalize_recist(np.asarray(points, dtype=np.float64))
    return RECIST(
        points=pts,
        center=recist_center(pts, center_mode),
        long_px=float(np.hypot(*(pts[1] - pts[0]))),
        short_px=float(np.hypot(*(pts[3] - pts[2]))),
        long_mm=float(length_mm(pts[0], pts[1], spacing)),
        short_mm=float(length_mm(pts[2], pts[3], spacing)),
    )


def _check_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("mask is empty: a RECIST measurement needs at least one foreground pixel")
    return m


def boundary_points(mask: np.ndarray) -> np.ndarray:
    """Sub-pixel boundary of a binary mask as ``(N, 2)`` ``(x, y)`` points.

    Each foreground pixel contributes the midpoint of every edge it shares with background,
    which is where a 0.5 iso-contour (marching squares) crosses; so a disk of radius r has a
    Feret diameter close to 2r rather than 2r - 1.
    """
    m = np.pad(_check_mask(mask), 1)
    pts = []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nb = np.roll(m, shift=(-dy, -dx), axis=(0, 1))
        ys, xs = np.nonzero(m & ~nb)
        pts.append(np.stack([xs - 1 + 0.5 * dx, ys - 1 + 0.5 * dy], axis=1))
    return np.concatenate(pts).astype(np.float64)


def _farthest_pair(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import ConvexHull, QhullError

    try:
        cand = pts[ConvexHull(pts).vertices] if len(pts) >= 3 else pts
    except QhullError:  # collinear points (a one-pixel-wide mask): all points are candidates
        cand = pts
    d2 = ((cand[:, None, :] - cand[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
    return cand[i], cand[j]


def mask_to_recist(
    mask: np.ndarray,
    spacing: float | Sequence[float] | None,
    *,
    angle_tol_deg: float = 5.0,
    step_px: float = 0.5,
    center_mode: str = "intersection",
) -> RECIST:
    """RECIST diameters of a lesion mask (the slice of largest extent).

    Long axis: the maximum Feret diameter, by a farthest-pair search over the convex hull of
    the sub-pixel boundary (measured in mm, so anisotropic spacing is handled). Short axis: the
    longest in-mask chord within ``angle_tol_deg`` of perpendicular to it, searched at every
    ``step_px`` along the long axis. The centre is where the two cross.
    """
    m = _check_mask(mask)
    sp = as_spacing(spacing)
    scale = np.array([sp[1], sp[0]])  # (x, y) px -> mm
    bpts = boundary_points(m) * scale
    a, b = _farthest_pair(bpts)
    long_len = float(np.hypot(*(b - a)))
    if long_len == 0:  # a single pixel: its own width is the long axis
        a, b = bpts.min(0), bpts.max(0)
        long_len = float(np.hypot(*(b - a)))
    u = (b - a) / long_len
    unit = float(scale.min())  # mm per px along the finer axis
    ts = np.linspace(0.0, long_len, max(2, int(np.ceil(long_len / (step_px * unit))) + 1))
    hs = unit  # chord samples every pixel; crossings are then interpolated
    ss = np.arange(0, int(np.ceil(long_len / hs)) + 2) * hs
    angles = np.deg2rad(90.0 + np.linspace(-angle_tol_deg, angle_tol_deg, 11))
    rot = np.stack([np.cos(angles), np.sin(angles)], 1)
    vs = np.stack([u[0] * rot[:, 0] - u[1] * rot[:, 1], u[0] * rot[:, 1] + u[1] * rot[:, 0]], 1)
    base = a[None, :] + ts[:, None] * u[None, :]  # (T, 2) in mm
    mf = m.astype(np.float32)

    def run_length(sign: float) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        q = base[None, :, None, :] + sign * ss[None, None, :, None] * vs[:, None, None, :]
        px = q / scale
        # bilinear mask >= 0.5 is the same boundary as the edge midpoints used for the long axis
        val = map_coordinates(mf, [px[..., 1].ravel(), px[..., 0].ravel()], order=1, cval=0.0)
        val = val.reshape(px.shape[:-1])
        n_in = np.cumprod(val >= 0.5, axis=-1).sum(-1)  # samples inside before the first exit
        k = np.clip(n_in - 1, 0, len(ss) - 2)[..., None]
        v0 = np.take_along_axis(val, k, -1)[..., 0]
        v1 = np.take_along_axis(val, k + 1, -1)[..., 0]
        frac = np.clip((v0 - 0.5) / np.maximum(v0 - v1, 1e-9), 0.0, 1.0)
        return np.where(n_in > 0, (k[..., 0] + frac) * hs, -np.inf)

    pos, neg = run_length(1.0), run_length(-1.0)
    chord = pos + neg  # (angles, T)
    best = float(chord.max())
    if not np.isfinite(best):
        raise ValueError("mask_to_recist: no in-mask chord crosses the long axis")
    # among (near-)ties, take the chord closest to the middle of the long axis
    near = chord >= best - 0.05 * unit
    dist = np.where(near, np.abs(ts - long_len / 2)[None, :], np.inf)
    k_ang, k_t = np.unravel_index(int(np.argmin(dist)), dist.shape)
    c = base[k_t]
    v = vs[k_ang]
    pts_mm = np.stack([a, b, c + pos[k_ang, k_t] * v, c - neg[k_ang, k_t] * v])
    pts = canonicalize_recist(pts_mm / scale)
    return RECIST(
        points=pts,
        center=recist_center(pts, center_mode) if center_mode != "intersection" else c / scale,
        long_px=float(np.hypot(*(pts[1] - pts[0]))),
        short_px=float(np.hypot(*(pts[3] - pts[2]))),
        long_mm=long_len,
        short_mm=float(chord[k_ang, k_t]),
    )


def mask_to_extreme_points(mask: np.ndarray) -> np.ndarray:
    """ExtremeNet's four extreme points ``(top, left, bottom, right)`` as ``(4, 2)`` ``(x, y)``.

    Ties along an edge take the median of the extreme row/column.
    """
    m = _check_mask(mask)
    ys, xs = np.nonzero(m)
    top = (float(np.median(xs[ys == ys.min()])), float(ys.min()))
    left = (float(xs.min()), float(np.median(ys[xs == xs.min()])))
    bottom = (float(np.median(xs[ys == ys.max()])), float(ys.max()))
    right = (float(xs.max()), float(np.median(ys[xs == xs.max()])))
    return np.array([top, left, bottom, right], dtype=np.float64)
