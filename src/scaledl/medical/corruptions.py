"""Test-time corruptions for segmentation robustness, at three severities, deterministic per seed.

Each corruption maps an image ``(H, W)`` in [0, 1] (optionally with its label map, used to aim
occlusions and opacities at anatomy) to a corrupted image in [0, 1]. Pixel-sized parameters are
given for 256² images and scale with the image size. Only numpy and scipy are used.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from scaledl.medical.segmentation_data import bias_field

#: Corruption names in report order.
CORRUPTIONS: tuple[str, ...] = ("noise", "occlusion", "gamma", "blur", "bias_field", "opacity")
SEVERITIES: tuple[int, ...] = (1, 2, 3)

_NOISE_SIGMA = (0.05, 0.1, 0.2)
_OCCLUDED_FRACTION = (0.05, 0.15, 0.25)
_GAMMA = (0.5, 1.5, 2.0)
_BLUR_SIGMA = (2.0, 4.0, 6.0)
_BIAS_STRENGTH = (0.2, 0.4, 0.6)
_OPACITY = (0.2, 0.35, 0.5)


def _noise(img, labels, sev, rng):
    return img + rng.normal(0.0, _NOISE_SIGMA[sev - 1], img.shape)


#: Corruptions aimed at one structure, and the label values they choose from.
TARGETED: dict[str, tuple[int, ...]] = {"occlusion": (1, 2, 3), "opacity": (1, 2)}


def _target_label(labels: np.ndarray | None, rng, classes) -> int:
    """The label of one randomly chosen structure present in ``labels`` (0 if none is).

    This is the first draw of the targeted corruptions, so replaying it with the same seed
    names the structure they hit (:func:`corruption_target`)."""
    if labels is None:
        return 0
    present = [c for c in classes if np.any(labels == c)]
    return present[int(rng.integers(len(present)))] if present else 0


def _target_region(img: np.ndarray, labels: np.ndarray | None, rng, classes) -> np.ndarray:
    """The mask of one randomly chosen structure (or the central box without labels)."""
    label = _target_label(labels, rng, classes)
    if label:
        return labels == label
    h, w = img.shape
    region = np.zeros((h, w), dtype=bool)
    region[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    return region


def _occlusion(img, labels, sev, rng):
    """1-3 boxes or disks inside one lung or the heart, together covering ~5/15/25% of it."""
    region = _target_region(img, labels, rng, TARGETED["occlusion"])
    ys, xs = np.nonzero(region)
    n = int(rng.integers(1, 4))
    area = _OCCLUDED_FRACTION[sev - 1] * region.sum() / n
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    out = img.copy()
    for _ in range(n):
        i = int(rng.integers(len(ys)))
        cy, cx = ys[i], xs[i]
        if rng.random() < 0.5:
            half = np.sqrt(area) / 2
            shape = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
        else:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= area / np.pi
        out[shape] = rng.uniform(0.4, 1.0)
    return out


def _gamma(img, labels, sev, rng):
    """Gamma {0.5, 1.5, 2.0} with a random intensity shift; the extreme also inverts."""
    out = np.clip(img, 0, 1) ** _GAMMA[sev - 1] + rng.uniform(-0.05, 0.05) * sev
    return 1.0 - out if sev == 3 else out


def _blur(img, labels, sev, rng):
    return ndimage.gaussian_filter(img, _BLUR_SIGMA[sev - 1] * img.shape[0] / 256)


def _bias(img, labels, sev, rng):
    return img * bias_field(img.shape[0], rng, _BIAS_STRENGTH[sev - 1])


def _opacity(img, labels, sev, rng):
    """A soft bright blob (consolidation-like) inside one lung."""
    region = _target_region(img, labels, rng, TARGETED["opacity"])
    ys, xs = np.nonzero(region)
    i = int(rng.integers(len(ys)))
    radius = np.sqrt(region.sum() / np.pi) * rng.uniform(0.4, 0.7)
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    blob = np.exp(-((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * (radius / 2) ** 2))
    return img + _OPACITY[sev - 1] * blob


_FUNCS: dict[str, Callable] = {
    "noise": _noise,
    "occlusion": _occlusion,
    "gamma": _gamma,
    "blur": _blur,
    "bias_field": _bias,
    "opacity": _opacity,
}


def corrupt(
    image: np.ndarray,
    kind: str,
    severity: int,
    seed: int,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Apply corruption ``kind`` at ``severity`` (1-3) to a 2D image; same seed, same output.

    ``labels`` aims occlusions (a lung or the heart) and opacities (a lung); without it they
    fall in the central half of the image.
    """
    if kind not in _FUNCS:
        raise ValueError(f"unknown corruption {kind!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1, 2 or 3, got {severity}")
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must be 2D (H, W), got shape {img.shape}")
    if labels is not None and labels.shape != img.shape:
        raise ValueError(f"labels {labels.shape} do not match image {img.shape}")
    rng = np.random.default_rng(seed)
    out = _FUNCS[kind](img, labels, severity, rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def corrupt_batch(
    images: np.ndarray,
    kind: str,
    severity: int,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Corrupt ``(N, 1, H, W)`` images; image ``i`` uses seed ``seed * 100003 + i``."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got {images.shape}")
    return np.stack(
        [
            corrupt(
                images[i, 0],
                kind,
                severity,
                seed * 100003 + i,
                None if labels is None else labels[i],
            )
            for i in range(images.shape[0])
        ]
    )[:, None]


def corruption_target(kind: str, seed: int, labels: np.ndarray) -> int:
    """The label value of the structure that :func:`corrupt` with this ``kind``, ``seed`` and
    ``labels`` aims at (it replays the corruption's first random draw); 0 when no structure it
    can aim at is present. Only for the targeted kinds in :data:`TARGETED`."""
    if kind not in TARGETED:
        raise ValueError(
            f"corruption {kind!r} does not aim at a structure; targeted: {', '.join(TARGETED)}"
        )
    return _target_label(np.asarray(labels), np.random.default_rng(seed), TARGETED[kind])


def corruption_targets(kind: str, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """:func:`corruption_target` for every image of :func:`corrupt_batch` with the same
    ``seed`` and ``labels`` (N, H, W); returns (N,) label values."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be (N, H, W), got {labels.shape}")
    return np.array(
        [corruption_target(kind, seed * 100003 + i, labels[i]) for i in range(labels.shape[0])],
        dtype=np.int64,
    )
