"""Data for shape-prior segmentation: a synthetic chest-X-ray-like generator and a folder loader.

The generator ("SynthCXR") draws subjects with a consistent anatomy and inter-subject variation:
right and left lungs, heart and clavicles, each a class of the label map. Lung shapes come from
the real lung masks shipped with ``torchxrayvision`` (read from its zip with ``zipfile``; the
package itself is never imported) when it is installed, else from a parametric model. Only
numpy, scipy and Pillow are used, so the same data can be generated on any machine.

Label maps are integer arrays: 0 background, 1..K the classes of :data:`CLASS_NAMES`.
"""

from __future__ import annotations

import importlib.util
import io
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

#: Foreground classes of the synthetic data, in label order (1..K). "right" is the patient's
#: right, which is the image's left on a PA radiograph.
CLASS_NAMES: tuple[str, ...] = ("lung_right", "lung_left", "heart", "clavicles")

_LUNG_ZIP = os.path.join("data", "semantic_masks_v7labs_lungs.zip")


@dataclass
class SegmentationData:
    """Images ``(N, 1, H, W)`` float32 in [0, 1] and label maps ``(N, H, W)`` int64."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"images must be (N, 1, H, W), got {self.images.shape}")
        if self.labels.shape != (self.images.shape[0], *self.images.shape[2:]):
            raise ValueError(f"labels {self.labels.shape} do not match images {self.images.shape}")

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K."""
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------- lung shapes


def torchxrayvision_lung_zip() -> Path | None:
    """Path of torchxrayvision's lung-mask zip, or None when the package is not installed."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _LUNG_ZIP
    return path if path.is_file() else None


@lru_cache(maxsize=4)
def _zip_members(path: str) -> tuple[str, ...]:
    with zipfile.ZipFile(path) as zf:
        return tuple(n for n in zf.namelist() if not n.endswith("/"))


@lru_cache(maxsize=2048)
def _real_lung_pair(path: str, member: str, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(right, left) lung masks at ``size``² from one zip member; None if it is not two lungs."""
    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        img = Image.open(io.BytesIO(zf.read(member))).convert("L")
    mask = np.asarray(img.resize((size, size), Image.BILINEAR)) > 127
    comp, n = ndimage.label(mask)
    if n < 2:
        return None
    areas = ndimage.sum(mask, comp, index=np.arange(1, n + 1))
    a, b = np.argsort(areas)[::-1][:2] + 1
    # both lungs must be substantial, otherwise the mask is a crop or a single lung
    if min(areas[a - 1], areas[b - 1]) < 0.02 * size * size:
        return None
    ma, mb = comp == a, comp == b
    xa, xb = np.nonzero(ma)[1].mean(), np.nonzero(mb)[1].mean()
    return (ma, mb) if xa < xb else (mb, ma)


def _parametric_lung(size: int, rng: np.random.Generator, side: int) -> np.ndarray:
    """A lung as a perturbed polar shape: r(θ) = r0(θ)(1 + Σ_k a_k cos(kθ + φ_k)), k = 2..5."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx = 0.5 + side * 0.19
    cy = 0.47
    dx, dy = (xx - cx) / 0.13, (yy - cy) / 0.29
    theta = np.arctan2(dy, dx)
    r = np.hypot(dx, dy)
    radius = np.ones_like(theta)
    for k in range(2, 6):
        radius += rng.uniform(0, 0.05) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    # flatten the medial side (towards the mediastinum) and the costophrenic base
    medial = side * (xx - cx) < 0
    radius = np.where(medial, radius * 0.85, radius)
    return r < radius


def lung_source(lungs: str = "auto") -> str:
    """Resolve ``lungs`` ("auto", "torchxrayvision" or "parametric") to the source used."""
    if lungs not in ("auto", "torchxrayvision", "parametric"):
        raise ValueError(f"lungs must be auto, torchxrayvision or parametric, got {lungs!r}")
    if lungs == "parametric":
        return lungs
    found = torchxrayvision_lung_zip() is not None
    if lungs == "torchxrayvision" and not found:
        raise ValueError("lungs='torchxrayvision' but torchxrayvision's lung-mask zip is missing")
    return "torchxrayvision" if found else "parametric"


def _lung_pair(size: int, rng: np.random.Generator, source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == "torchxrayvision":
        path = str(torchxrayvision_lung_zip())
        members = _zip_members(path)
        for _ in range(50):
            pair = _real_lung_pair(path, members[int(rng.integers(len(members)))], size)
            if pair is not None:
                return pair
    return _parametric_lung(size, rng, -1), _parametric_lung(size, rng, +1)


# --------------------------------------------------------------------------- anatomy


def _ellipse(size: int, cx: float, cy: float, a: float, b: float, angle_deg: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = np.deg2rad(angle_deg)
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _bezier_band(size: int, p0, p1, p2, width: float) -> np.ndarray:
    """A band of half-width ``width`` (fraction of size) around a quadratic Bézier curve."""
    t = np.linspace(0, 1, 4 * size)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    canvas = np.zeros((size, size), dtype=bool)
    ij = np.clip((pts * size).round().astype(int), 0, size - 1)
    canvas[ij[:, 1], ij[:, 0]] = True
    return ndimage.distance_transform_edt(~canvas) <= width * size


def _warp(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Subject-level affine (rot ±8°, scale 0.9–1.1, shift ±5%) plus a smooth elastic field."""
    size = labels.shape[0]
    ang = np.deg2rad(rng.uniform(-8, 8))
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.05, 0.05, size=2) * size
    c = (size - 1) / 2
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) / scale
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    coords = np.stack([yy - c - shift[0], xx - c - shift[1]])
    src = np.einsum("ij,jhw->ihw", rot, coords) + c
    # elastic: Gaussian-smoothed random displacement, ~2% of the size
    for d in range(2):
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 8)
        src[d] += field / (np.abs(field).max() + 1e-8) * 0.02 * size
    return ndimage.map_coordinates(labels, src, order=0, mode="constant", cval=0)


def synthetic_labels(size: int, rng: np.random.Generator, source: str) -> np.ndarray:
    """One subject's label map: lungs, heart (excluded from the lungs) and clavicles on top."""
    right, left = _lung_pair(size, rng, source)
    heart = _ellipse(
        size,
        0.55 + rng.uniform(-0.02, 0.03),
        0.64 + rng.uniform(-0.03, 0.03),
        rng.uniform(0.22, 0.30) / 2,
        rng.uniform(0.18, 0.24) / 2,
        rng.uniform(20, 40),
    )
    labels = np.zeros((size, size), dtype=np.int64)
    labels[right] = 1
    labels[left] = 2
    labels[heart] = 3
    # clavicles: bands above the apices, mirrored with independent jitter
    width = rng.uniform(0.01, 0.015)
    for side in (-1, 1):
        j = rng.uniform(-0.02, 0.02, size=3)
        p0 = (0.5 + side * 0.42, 0.12 + j[0])
        p1 = (0.5 + side * 0.25, 0.22 + j[1])
        p2 = (0.5 + side * 0.05, 0.17 + j[2])
        labels[_bezier_band(size, p0, p1, p2, width)] = 4
    return _warp(labels, rng)


def render_cxr(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A radiograph-like image for ``labels``: body, lungs, heart, clavicles, rib arcs, blur."""
    size = labels.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / 0.47) ** 2 + ((yy - 0.55) / 0.62) ** 2 <= 1.0
    img = np.where(body, 0.55, 0.05)
    img = img * bias_field(size, rng, strength=0.1)
    img = np.where(labels == 1, 0.2, img)
    img = np.where(labels == 2, 0.2, img)
    # unlabelled rib arcs over the lungs (amplitude 0.08) make the lung texture non-trivial
    lungs = (labels == 1) | (labels == 2)
    phase = rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + 0.08 * np.cos(3 * xx + phase)) * 9 + phase)
    img = img + np.where(lungs, 0.08 * (ribs > 0.75), 0.0)
    img = np.where(labels == 3, 0.7, img)
    img = np.where(labels == 4, 0.9, img)
    img = ndimage.gaussian_filter(img, rng.uniform(1.0, 2.0) * size / 256)
    img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def bias_field(size: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field ``exp(p(x, y))`` with a random degree-3 polynomial ``p``."""
    yy, xx = np.mgrid[0:size, 0:size] / size * 2 - 1
    p = np.zeros((size, size))
    for i in range(4):
        for j in range(4 - i):
            p += rng.uniform(-1, 1) * xx**i * yy**j
    p = p / (np.abs(p).max() + 1e-8)
    return np.exp(strength * p)


def make_synthetic_cxr(
    n: int, size: int = 128, seed: int = 0, lungs: str = "auto"
) -> SegmentationData:
    """``n`` synthetic chest X-rays at ``size``² with label maps; deterministic for ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 32 or size % 16:
        raise ValueError(f"size must be a multiple of 16 and >= 32, got {size}")
    source = lung_source(lungs)
    rng = np.random.default_rng(seed)
    labels = np.stack([synthetic_labels(size, rng, source) for _ in range(n)])
    images = np.stack([render_cxr(lab, rng) for lab in labels])[:, None]
    return SegmentationData(images=images, labels=labels)


def synthetic_cxr_splits(
    size: int = 128,
    n_train: int = 200,
    n_val: int = 50,
    n_test: int = 200,
    seed: int = 0,
    lungs: str = "auto",
) -> dict[str, SegmentationData]:
    """SynthCXR train/val/test splits from fixed, disjoint seeds (templates come from train)."""
    return {
        name: make_synthetic_cxr(n, size, seed * 1000 + offset, lungs)
        for name, n, offset in (("train", n_train, 1), ("val", n_val, 2), ("test", n_test, 3))
        if n > 0
    }


# --------------------------------------------------------------------------- user folders

_IMAGE_SUFFIXES = (".png", ".nii", ".nii.gz")


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".nii", ".png"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def _read_2d_slices(path: Path) -> list[np.ndarray]:
    """A PNG as one slice; a NIfTI volume as its slices along the last axis."""
    if path.name.lower().endswith(".png"):
        from PIL import Image

        return [np.asarray(Image.open(path).convert("F"), dtype=np.float32)]
    import nibabel as nib

    arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32).squeeze()
    if arr.ndim == 2:
        return [arr]
    if arr.ndim == 3:
        return [arr[..., i] for i in range(arr.shape[-1])]
    raise ValueError(f"{path}: expected a 2D or 3D image, got shape {arr.shape}")


def _resize(arr: np.ndarray, size: int, order: int) -> np.ndarray:
    zoom = (size / arr.shape[0], size / arr.shape[1])
    return ndimage.zoom(arr, zoom, order=order, mode="nearest", grid_mode=True)


def load_segmentation_folder(
    image_dir: str | os.PathLike,
    mask_dir: str | os.PathLike,
    size: int | None = 128,
    class_names: tuple[str, ...] | None = None,
) -> SegmentationData:
    """Load images and integer label masks with matching names (PNG or NIfTI) from two folders.

    Images are scaled to [0, 1] by their 1st-99th percentiles and, with ``size``, resized to
    ``size``² (masks with nearest neighbour). 3D NIfTI volumes yield one sample per slice
    along the last axis. Label values must be 0..K; K is the largest label found unless
    ``class_names`` gives it.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise ValueError(f"folder {d} does not exist")
    files = sorted(p for p in image_dir.iterdir() if p.name.lower().endswith(_IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"no PNG or NIfTI images in {image_dir}")
    masks = {_stem(p): p for p in mask_dir.iterdir() if p.name.lower().endswith(_IMAGE_SUFFIXES)}
    images, labels = [], []
    for f in files:
        m = masks.get(_stem(f))
        if m is None:
            raise ValueError(f"no mask for image {f.name} in {mask_dir}")
        for img, lab in zip(_read_2d_slices(f), _read_2d_slices(m), strict=True):
            if img.shape != lab.shape:
                raise ValueError(f"{f.name}: image {img.shape} and mask {lab.shape} differ")
            if np.any(lab < 0) or np.any(lab != np.round(lab)):
                raise ValueError(f"{m.name}: mask values must be non-negative integers")
            lo, hi = np.percentile(img, [1, 99])
            img = np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1)
            if size is not None:
                img, lab = _resize(img, size, 1), _resize(lab, size, 0)
            images.append(img.astype(np.float32))
            labels.append(lab.astype(np.int64))
    if len({a.shape for a in images}) > 1:
        raise ValueError("images have different shapes; pass size= to resize them")
    lab_arr = np.stack(labels)
    k = int(lab_arr.max())
    if class_names is None:
        class_names = tuple(f"class_{i}" for i in range(1, k + 1))
    elif k > len(class_names):
        raise ValueError(f"masks contain label {k} but only {len(class_names)} classes are named")
    return SegmentationData(np.stack(images)[:, None], lab_arr, tuple(class_names))
