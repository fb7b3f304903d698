"""Synthetic CT lesions with RECIST labels on real CT backgrounds, and DICOM slice reading.

Backgrounds come from data shipped inside installed packages (nothing is downloaded):

- ``ct_small``: pydicom's ``CT_small.dcm`` (a real CT slice, converted to HU), up-sampled;
- ``phantom``: an abdominal phantom (body 40 HU in air, liver from pydicom's
  ``liver_1frame.dcm`` segmentation at 60 HU, spine 700 HU, aorta 150 HU);
- ``shepp_logan`` and ``*_streaks`` (filtered back-projection with 60-180 views) need
  scikit-image; they are skipped when it is missing, or loaded from a file written by
  :func:`save_backgrounds` (the benchmark ships one, so the GPU machine needs only numpy,
  scipy and pydicom).

Lesions are star-shaped blobs ``r(θ) = r0 (1 + Σ_k a_k cos(kθ + φ_k))``, elongated and
rotated, hypo- or hyper-dense relative to their host organ, with optional rims, blurred
edges and CT-like noise; labels are RECIST endpoints from
:func:`~scaledl.medical.recist_geometry.mask_to_recist`. The ``hard`` split has small
(< 6 mm) or faint (-20 HU) lesions plus bright tubular vessel mimics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from scaledl.medical.recist_geometry import DEEPLESION_PAD, mask_to_recist, recist_to_box

SPLITS = ("easy", "hard", "mixed")
#: soft-tissue window used to feed the networks
DEFAULT_WINDOW = (-160.0, 240.0)


def window_hu(hu: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """Clip HU to ``window`` and scale to [0, 1] (float32)."""
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with high > low, got {window}")
    return ((np.clip(np.asarray(hu, np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


def read_dicom_slice(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CT slice: ``(hu, spacing)`` with ``hu = pixel * RescaleSlope + RescaleIntercept``
    (float32, ``(H, W)``) and ``spacing = (row_mm, col_mm)`` from ``PixelSpacing``.

    Raises ``ValueError`` when the file has no single 2-D image or no ``PixelSpacing``.
    """
    import pydicom

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file has no pixel data")
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected one 2-D slice, got pixel array of shape {arr.shape}")
    spacing = getattr(ds, "PixelSpacing", None)
    if spacing is None:
        raise ValueError(f"{path}: no PixelSpacing; RECIST diameters in mm need the pixel spacing")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    hu = arr.astype(np.float32) * slope + intercept
    return hu, np.array([float(spacing[0]), float(spacing[1])])


# --------------------------------------------------------------------------- backgrounds


def _resize(img: np.ndarray, size: int, order: int = 1) -> np.ndarray:
    return ndi.zoom(img, (size / img.shape[0], size / img.shape[1]), order=order)


def _ct_small(size: int) -> tuple[np.ndarray, np.ndarray]:
    from pydicom.data import get_testdata_file

    hu, _ = read_dicom_slice(get_testdata_file("CT_small.dcm"))
    hu = _resize(hu, size)
    organ = ndi.binary_opening(ndi.gaussian_filter(hu, 2) > -60, iterations=3)
    organ &= ndi.gaussian_filter(hu, 2) < 160
    return hu.astype(np.float32), ndi.binary_erosion(organ, iterations=2)


def _phantom(size: int) -> tuple[np.ndarray, np.ndarray]:
    import pydicom
    from pydicom.data import get_testdata_file

    seg = pydicom.dcmread(get_testdata_file("liver_1frame.dcm")).pixel_array > 0
    liver = _resize(seg.astype(np.float32), size) > 0.5
    yy, xx = np.mgrid[:size, :size] / size
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.5) / 0.38) ** 2 <= 1
    spine = ((xx - 0.5) / 0.05) ** 2 + ((yy - 0.8) / 0.05) ** 2 <= 1
    aorta = ((xx - 0.56) / 0.03) ** 2 + ((yy - 0.68) / 0.03) ** 2 <= 1
    liver &= body & ~spine & ~aorta
    hu = np.full((size, size), -1000.0, np.float32)
    hu[body] = 40.0
    hu[liver] = 60.0
    hu[spine] = 700.0
    hu[aorta] = 150.0
    return ndi.gaussian_filter(hu, 0.8), ndi.binary_erosion(liver, iterations=2)


def _shepp_logan(size: int) -> tuple[np.ndarray, np.ndarray]:
    from skimage.data import shepp_logan_phantom

    v = _resize(shepp_logan_phantom(), size)
    hu = np.where(v < 0.05, -1000.0, v * 250.0 - 10.0).astype(np.float32)
    organ = ndi.binary_erosion((v > 0.15) & (v < 0.5), iterations=3)
    return hu, organ


def _streaks(hu: np.ndarray, n_views: int) -> np.ndarray:
    from skimage.transform import iradon, radon

    mu = (hu + 1000.0) / 1000.0  # attenuation relative to water, >= 0
    theta = np.linspace(0.0, 180.0, n_views, endpoint=False)
    rec = iradon(radon(mu, theta=theta, circle=False), theta=theta, circle=False)
    return (rec[: hu.shape[0], : hu.shape[1]] * 1000.0 - 1000.0).astype(np.float32)


def ct_backgrounds(size: int = 256, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (hu, organ_mask)`` backgrounds of ``size``² pixels from packaged data.

    The scikit-image ones (Shepp-Logan and sparse-view streak variants) are added when
    scikit-image imports.
    """
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    out = {"ct_small": _ct_small(size), "phantom": _phantom(size)}
    try:
        import skimage  # noqa: F401
    except ImportError:
        return out
    out["shepp_logan"] = _shepp_logan(size)
    rng = np.random.default_rng(seed)
    for name in ("phantom", "shepp_logan"):
        hu, organ = out[name]
        out[f"{name}_streaks"] = (_streaks(hu, int(rng.integers(60, 181))), organ)
    return out


def save_backgrounds(path: str | Path, backgrounds: dict[str, tuple[np.ndarray, np.ndarray]]):
    """Store backgrounds compactly (HU as int16) in an ``.npz`` file."""
    arrays = {}
    for name, (hu, organ) in backgrounds.items():
        arrays[f"hu__{name}"] = np.rint(np.clip(hu, -2048, 3071)).astype(np.int16)
        arrays[f"organ__{name}"] = organ.astype(bool)
    np.savez_compressed(path, **arrays)


def resize_backgrounds(
    backgrounds: dict[str, tuple[np.ndarray, np.ndarray]], size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Resample backgrounds to ``size``² (HU bilinear, organ masks nearest)."""
    return {
        n: (_resize(hu, size).astype(np.float32), _resize(organ.astype(np.float32), size) > 0.5)
        for n, (hu, organ) in backgrounds.items()
    }


def load_backgrounds(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read backgrounds written by :func:`save_backgrounds`."""
    with np.load(path) as z:
        names = [k[len("hu__") :] for k in z.files if k.startswith("hu__")]
        if not names:
            raise ValueError(f"{path}: no backgrounds (expected hu__<name> arrays)")
        return {n: (z[f"hu__{n}"].astype(np.float32), z[f"organ__{n}"]) for n in names}


# --------------------------------------------------------------------------- lesions


@dataclass
class LesionDataset:
    """Images in HU with per-image RECIST labels.

    ``points[i]`` is ``(n_i, 4, 2)`` (long_a, long_b, short_a, short_b as ``(x, y)`` px),
    ``labelled[i]`` marks the lesions kept in the *training* labels (missing-label
    simulation); evaluation always uses every lesion.
    """

    images: np.ndarray  # (N, H, W) int16 HU
    spacing: np.ndarray  # (N, 2) row_mm, col_mm
    points: list[np.ndarray]
    long_mm: list[np.ndarray]
    short_mm: list[np.ndarray]
    labelled: list[np.ndarray]
    split: str = "easy"
    masks: list[np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def boxes(self, pad: float = DEEPLESION_PAD) -> list[np.ndarray]:
        """Ground-truth boxes per image (all lesions, DeepLesion padding)."""
        return [recist_to_box(p, pad) if len(p) else np.zeros((0, 4)) for p in self.points]

    def train_points(self, i: int) -> np.ndarray:
        """The lesions of image ``i`` that have training labels."""
        return self.points[i][self.labelled[i]]

    def n_lesions(self) -> int:
        return int(sum(len(p) for p in self.points))

    @classmethod
    def concat(cls, parts: Sequence[LesionDataset]) -> LesionDataset:
        """Join datasets (e.g. generated in parallel chunks) in order."""
        if not parts:
            raise ValueError("concat needs at least one dataset")

        def join(attr: str) -> list:
            return [x for p in parts for x in getattr(p, attr)]

        masks = None if any(p.masks is None for p in parts) else join("masks")
        return cls(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.spacing for p in parts]),
            join("points"),
            join("long_mm"),
            join("short_mm"),
            join("labelled"),
            parts[0].split,
            masks,
        )

    def subset(self, idx: Sequence[int]) -> LesionDataset:
        idx = list(idx)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return LesionDataset(
            self.images[idx],
            self.spacing[idx],
            pick(self.points),
            pick(self.long_mm),
            pick(self.short_mm),
            pick(self.labelled),
            self.split,
            pick(self.masks) if self.masks is not None else None,
        )


def _star_mask(shape, cx, cy, r0_px, elong, angle, amps, phases) -> np.ndarray:
    m = np.zeros(shape, bool)
    reach = int(np.ceil(r0_px * 1.4)) + 2  # r(θ) <= 1.3 r0 with the harmonics used here
    y0, y1 = max(0, int(cy) - reach), min(shape[0], int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(shape[1], int(cx) + reach + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u = dx * c + dy * s
    v = (-dx * s + dy * c) * elong  # undo the elongation, then test r(θ)
    theta = np.arctan2(v, u)
    rad = r0_px * (1 + sum(a * np.cos(k * theta + p) for k, a, p in zip(range(2, 7), amps, phases)))
    m[y0:y1, x0:x1] = np.hypot(u, v) <= rad
    return m


def _vessel(rng: np.random.Generator, shape, spacing_mm: float) -> np.ndarray:
    """A bright curved tube (quadratic Bézier) that mimics a vessel: the hard split's decoy."""
    h, w = shape
    p0 = rng.uniform(0.2, 0.8, 2) * (w, h)
    length = rng.uniform(15, 50) / spacing_mm
    ang = rng.uniform(0, np.pi)
    p2 = p0 + length * np.array([np.cos(ang), np.sin(ang)])
    p1 = (p0 + p2) / 2 + rng.normal(0, length / 4, 2)
    t = np.linspace(0, 1, int(length * 3) + 2)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    ij = np.rint(curve).astype(int)
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
    tube = np.zeros(shape, bool)
    if not ok.any():
        return tube
    x0, y0 = np.maximum(ij[ok].min(0) - 3, 0)
    x1, y1 = ij[ok].max(0) + 4
    line = np.zeros((min(y1, h) - y0, min(x1, w) - x0), bool)
    line[ij[ok, 1] - y0, ij[ok, 0] - x0] = True
    tube[y0 : y0 + line.shape[0], x0 : x0 + line.shape[1]] = ndi.distance_transform_edt(
        ~line
    ) <= rng.uniform(0.8, 1.8)
    return tube


def _draw_lesion_params(rng: np.random.Generator, hard: bool) -> tuple[float, float, float]:
    """``(r0_mm, elongation, contrast_hu)`` of one lesion."""
    if hard and rng.random() < 0.5:  # small: long diameter under 6 mm
        return (
            rng.uniform(1.6, 2.9),
            rng.uniform(1.0, 1.4),
            rng.choice([-1, 1]) * rng.uniform(30, 80),
        )
    r0 = float(np.exp(rng.uniform(np.log(2.5), np.log(25.0))))
    elong = rng.uniform(1.0, 2.5)
    if hard:  # faint
        return r0, elong, -20.0
    sign = -1.0 if rng.random() < 0.6 else 1.0
    return r0, elong, sign * rng.uniform(20, 80) if sign < 0 else rng.uniform(30, 80)


def make_sample(
    rng: np.random.Generator,
    backgrounds: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    hard: bool = False,
    empty_prob: float = 0.15,
    max_lesions: int = 3,
) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """One synthetic slice: ``(hu, spacing_mm, lesion_masks)``."""
    name = list(backgrounds)[int(rng.integers(len(backgrounds)))]
    hu, organ = backgrounds[name]
    size = hu.shape[0]
    # a random flip / shift so no two images share the same background pixels
    if rng.random() < 0.5:
        hu, organ = hu[:, ::-1], organ[:, ::-1]
    shift = rng.integers(-size // 16, size // 16 + 1, 2)
    hu = np.roll(hu, shift, axis=(0, 1)).astype(np.float32) + rng.uniform(-10, 10)
    organ = np.roll(organ, shift, axis=(0, 1))
    spacing = float(rng.uniform(0.66, 0.8))
    if hard:
        for _ in range(int(rng.integers(2, 6))):
            tube = _vessel(rng, hu.shape, spacing)
            hu = np.where(tube, hu + rng.uniform(150, 250), hu)
    n = 0 if rng.random() < empty_prob else int(rng.integers(1, max_lesions + 1))
    masks: list[np.ndarray] = []
    occupied = np.zeros(hu.shape, bool)
    host = organ if organ.any() else np.ones(hu.shape, bool)
    depth = ndi.distance_transform_edt(host)  # to keep lesions mostly inside the organ
    for _ in range(n):
        r0_mm, elong, contrast = _draw_lesion_params(rng, hard)
        r0 = r0_mm / spacing
        inner = depth > max(1.0, r0 * 0.6)
        pool = np.argwhere(inner if inner.any() else host)
        for _attempt in range(20):
            cy, cx = pool[int(rng.integers(len(pool)))] + rng.uniform(-0.5, 0.5, 2)
            amps = rng.uniform(0, 0.06, 5)
            m = _star_mask(
                hu.shape,
                cx,
                cy,
                r0,
                elong,
                rng.uniform(0, np.pi),
                amps,
                rng.uniform(0, 2 * np.pi, 5),
            )
            border = m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
            in_body = m.any() and (hu[m] > -400).mean() > 0.95
            if m.sum() >= 4 and in_body and not border and not (m & occupied).any():
                break
        else:
            continue
        occupied |= ndi.binary_dilation(m, iterations=4)
        soft = ndi.gaussian_filter(m.astype(np.float32), rng.uniform(0.5, 1.5))
        target = np.median(hu[m & host] if (m & host).any() else hu[m]) + contrast
        hu = hu + soft * (target - hu)
        if rng.random() < 0.3:  # an enhancing or hypodense rim
            rim = soft * (1 - ndi.gaussian_filter(ndi.binary_erosion(m, iterations=2) * 1.0, 1.0))
            hu = hu + rim * rng.choice([-1, 1]) * rng.uniform(10, 30)
        masks.append(m)
    noise = rng.normal(0, rng.uniform(10, 25), hu.shape)
    hu = hu + ndi.gaussian_filter(noise, 0.6) * 1.6  # mildly correlated like CT noise
    return hu.astype(np.float32), spacing, masks


def make_lesion_dataset(
    n_images: int,
    *,
    split: str = "easy",
    seed: int = 0,
    size: int = 256,
    backgrounds: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    missing_label_rate: float | tuple[float, float] = 0.0,
    empty_prob: float = 0.15,
    keep_masks: bool = False,
    progress: bool = False,
) -> LesionDataset:
    """Generate a synthetic RECIST dataset deterministically from ``seed``.

    Args:
        n_images: number of slices.
        split: ``easy``, ``hard`` or ``mixed`` (each image easy or hard with equal odds).
        size: image side in pixels (ignored when ``backgrounds`` are given).
        backgrounds: from :func:`ct_backgrounds` or :func:`load_backgrounds`.
        missing_label_rate: fraction of lesions dropped from the *training* labels, or a
            ``(lo, hi)`` range to draw it from (DeepLesion misses about half).
        empty_prob: probability of a lesion-free image.
        keep_masks: also return each lesion's mask.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    rng = np.random.default_rng(seed)
    lo, hi = (
        (missing_label_rate, missing_label_rate)
        if np.isscalar(missing_label_rate)
        else tuple(missing_label_rate)  # type: ignore[arg-type]
    )
    if not 0 <= lo <= hi < 1:
        raise ValueError(f"missing_label_rate must be in [0, 1), got {missing_label_rate!r}")
    drop = rng.uniform(lo, hi)
    bgs = backgrounds if backgrounds is not None else ct_backgrounds(size)
    h = next(iter(bgs.values()))[0].shape
    images = np.zeros((n_images, *h), np.int16)
    spacing = np.zeros((n_images, 2))
    pts, longs, shorts, labelled, masks = [], [], [], [], []
    it = range(n_images)
    if progress:
        from scaledl.cli_utils import progress as bar

        it = bar(it, total=n_images, description=f"generating {split} lesions")
    for i in it:
        hard = split == "hard" or (split == "mixed" and rng.random() < 0.5)
        hu, sp, ms = make_sample(rng, bgs, hard=hard, empty_prob=empty_prob)
        images[i] = np.rint(np.clip(hu, -2048, 3071)).astype(np.int16)
        spacing[i] = sp
        rec = [mask_to_recist(m, sp) for m in ms]
        pts.append(np.array([r.points for r in rec]).reshape(-1, 4, 2))
        longs.append(np.array([r.long_mm for r in rec]))
        shorts.append(np.array([r.short_mm for r in rec]))
        labelled.append(rng.random(len(rec)) >= drop)
        if keep_masks:
            masks.append(np.array(ms, bool).reshape(-1, *h))
    return LesionDataset(
        images, spacing, pts, longs, shorts, labelled, split, masks if keep_masks else None
    )
