"""A training-free restoration front end for any segmenter: fill featureless regions, denoise.

Two classical steps, each triggered only by evidence in the image itself:

* **Featureless regions.** Acquisition noise makes every imaged region of a radiograph vary from
  pixel to pixel. A region whose local standard deviation stays far below the image's noise
  level over many pixels carries no image information: a burned-in label, a clipped detector
  area, a pasted occluder. :func:`flat_region_mask` finds them (3x3 local standard deviation
  below ``rel`` x the estimated noise sigma, connected regions of at least ``min_fraction`` of
  the image, grown by ``grow`` pixels) and :class:`Restorer` fills them from their surroundings
  with scikit-image's biharmonic inpainting.
* **Strong noise.** :func:`estimate_noise_sigma` (Immerkaer's mask, median form) is compared
  with the training images' typical level (:meth:`Restorer.fit`); above ``noise_factor`` times
  that level the image is denoised with scikit-image's total-variation (Chambolle) filter,
  weight = the estimated sigma.

Neither step learns anything, and on images like the training ones neither fires, so clean
inputs pass through unchanged. Limits: a region of real anatomy rendered without noise (some
synthetic or heavily post-processed images) would be filled; an occluder in a noisy image is not
flat and is not found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_LAPLACE_PAIR = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def _as_2d(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 3:
        raise ValueError(f"expected a 2D image of at least 3x3 pixels, got shape {img.shape}")
    return img


def estimate_noise_sigma(image: np.ndarray) -> float:
    """Standard deviation of additive white noise in a 2D image, from the response to
    Immerkaer's mask (a difference of two Laplacians, which cancels smooth structure; J.
    Immerkaer, "Fast noise variance estimation", CVIU 1996). White noise of sigma gives a
    response of standard deviation 6 sigma; its median absolute value (0.6745 x that) is used
    instead of Immerkaer's mean, so that the few pixels on sharp edges do not count."""
    img = _as_2d(image)
    response = ndimage.convolve(img, _LAPLACE_PAIR, mode="reflect")[1:-1, 1:-1]
    return float(np.median(np.abs(response)) / (0.6745 * 6.0))


#: Smallest featureless region filled, whatever the image size (a 3x3 block).
MIN_PIXELS = 9


def flat_region_mask(
    image: np.ndarray,
    *,
    rel: float = 0.2,
    min_fraction: float = 0.0007,
    grow: int = 2,
    sigma: float | None = None,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> np.ndarray:
    """Boolean mask of featureless regions: 3x3 local standard deviation below ``rel`` x the
    noise sigma (estimated unless given), in connected regions of at least ``min_fraction`` of
    the pixels (12 px at 128²; at least :data:`MIN_PIXELS`), dilated by ``grow`` pixels (their
    blurred rims). Pixels at the ``clip`` limits are left out: a saturated area is over-exposed
    anatomy whose extent still tells the segmenter something, not a foreign object (None keeps
    them)."""
    img = _as_2d(image)
    if rel <= 0 or not 0 <= min_fraction < 1 or grow < 0:
        raise ValueError(
            f"need rel > 0, 0 <= min_fraction < 1 and grow >= 0; got {rel}, {min_fraction}, {grow}"
        )
    level = estimate_noise_sigma(img) if sigma is None else float(sigma)
    mean = ndimage.uniform_filter(img, 3, mode="reflect")
    var = ndimage.uniform_filter(img * img, 3, mode="reflect") - mean * mean
    flat = np.sqrt(np.clip(var, 0.0, None)) < rel * max(level, 1e-6)
    if clip is not None:
        flat &= (img > clip[0]) & (img < clip[1])
    regions, n = ndimage.label(flat)
    if n == 0:
        return flat
    sizes = ndimage.sum_labels(flat, regions, np.arange(1, n + 1))
    keep = np.isin(regions, 1 + np.flatnonzero(sizes >= max(MIN_PIXELS, min_fraction * img.size)))
    return ndimage.binary_dilation(keep, iterations=grow) if grow and keep.any() else keep


@dataclass
class Restoration:
    """What :class:`Restorer` did to a batch: per image the filled mask and the noise level."""

    images: np.ndarray
    filled: np.ndarray
    sigma: np.ndarray
    denoised: np.ndarray

    def summary(self) -> dict[str, float]:
        return {
            "images": len(self.images),
            "filled_images": int(self.filled.any(axis=(1, 2)).sum()),
            "filled_fraction": float(self.filled.mean()),
            "denoised_images": int(self.denoised.sum()),
        }


@dataclass
class Restorer:
    """Fill featureless regions and denoise strong noise in (N, 1, H, W) images in [0, 1].

    ``reference_sigma`` is the typical noise of the images the segmenter was trained on
    (:meth:`fit`); without it the denoising step is off."""

    reference_sigma: float | None = None
    noise_factor: float = 3.0
    inpaint: bool = True
    denoise: bool = True
    rel: float = 0.2
    min_fraction: float = 0.0007
    grow: int = 2

    def __post_init__(self) -> None:
        if self.noise_factor <= 1:
            raise ValueError(f"noise_factor must be > 1, got {self.noise_factor}")
        if self.reference_sigma is not None and self.reference_sigma <= 0:
            raise ValueError(f"reference_sigma must be > 0, got {self.reference_sigma}")

    def fit(self, images: np.ndarray) -> Restorer:
        """Set ``reference_sigma`` to the median noise level of (N, 1, H, W) training images."""
        imgs = _batch(images)
        self.reference_sigma = float(np.median([estimate_noise_sigma(x[0]) for x in imgs]))
        if self.reference_sigma <= 0:
            raise ValueError("the training images show no noise: cannot set a reference level")
        return self

    def restore(self, images: np.ndarray) -> Restoration:
        """The restored batch (same shape and dtype) and what was done to each image."""
        from skimage.restoration import denoise_tv_chambolle, inpaint_biharmonic

        imgs = _batch(images)
        out = imgs.copy()
        filled = np.zeros((len(imgs), *imgs.shape[2:]), dtype=bool)
        sigma = np.zeros(len(imgs))
        denoised = np.zeros(len(imgs), dtype=bool)
        for i, x in enumerate(imgs[:, 0].astype(np.float64)):
            sigma[i] = level = estimate_noise_sigma(x)
            if self.inpaint:
                filled[i] = mask = flat_region_mask(
                    x, rel=self.rel, min_fraction=self.min_fraction, grow=self.grow, sigma=level
                )
                if mask.any() and not mask.all():
                    x = inpaint_biharmonic(x, mask)
            noisy = self.reference_sigma is not None and level > self.noise_factor * (
                self.reference_sigma
            )
            if self.denoise and noisy:
                x = denoise_tv_chambolle(x, weight=level)
                denoised[i] = True
            out[i, 0] = x
        return Restoration(out, filled, sigma, denoised)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.restore(images).images


def _batch(images: np.ndarray) -> np.ndarray:
    imgs = np.asarray(images)
    if imgs.ndim != 4 or imgs.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got {imgs.shape}")
    return imgs
