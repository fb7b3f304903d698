"""The restoration front end: noise estimate, featureless-region mask, what Restorer changes."""

from __future__ import annotations

import numpy as np
import pytest

from scaledl.medical.corruptions import corrupt_batch
from scaledl.medical.restoration import Restorer, estimate_noise_sigma, flat_region_mask
from scaledl.medical.segmentation_data import make_synthetic_cxr


@pytest.fixture(scope="module")
def cxr():
    return make_synthetic_cxr(8, size=128, seed=5, lungs="parametric")


@pytest.mark.parametrize("sigma", [0.02, 0.1])
def test_noise_estimate_recovers_white_noise_on_smooth_images(sigma: float) -> None:
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    smooth = 0.3 + 0.4 * xx * yy + 0.1 * np.sin(3 * xx)
    assert estimate_noise_sigma(smooth) < 1e-3  # structure alone: (almost) no noise
    noisy = smooth + np.random.default_rng(0).normal(0, sigma, smooth.shape)
    assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.08)


def test_flat_mask_finds_the_occluders_and_nothing_on_clean_or_noisy_images(cxr) -> None:
    occluded = corrupt_batch(cxr.images, "occlusion", 3, 0, cxr.labels)
    noisy = corrupt_batch(cxr.images, "noise", 3, 0, cxr.labels)
    for i in range(len(cxr)):
        truth = np.abs(occluded[i, 0] - cxr.images[i, 0]) > 1e-6
        mask = flat_region_mask(occluded[i, 0])
        assert (mask & truth).sum() >= 0.95 * truth.sum()  # measured: 98-100% per image
        assert (mask & ~truth).sum() <= 0.6 * truth.sum()  # the grown rim only
        assert not flat_region_mask(cxr.images[i, 0]).any()
        assert not flat_region_mask(noisy[i, 0]).any()


def test_flat_mask_leaves_clipped_areas_and_rejects_bad_input() -> None:
    img = np.random.default_rng(1).normal(0.5, 0.02, (64, 64))
    img[10:30, 10:30] = 1.0  # saturated
    img[40:60, 40:60] = 0.7  # a pasted flat patch
    mask = flat_region_mask(img, grow=0)
    assert not mask[12:28, 12:28].any() and mask[42:58, 42:58].all()
    assert flat_region_mask(img, grow=0, clip=None)[12:28, 12:28].all()
    with pytest.raises(ValueError, match="expected a 2D image"):
        flat_region_mask(img[None])
    with pytest.raises(ValueError, match="need rel > 0"):
        flat_region_mask(img, rel=0)


def test_restorer_passes_clean_images_and_repairs_occlusion_and_noise(cxr) -> None:
    restorer = Restorer().fit(cxr.images)
    assert restorer.reference_sigma == pytest.approx(0.02, rel=0.25)
    clean = restorer.restore(cxr.images)
    assert np.array_equal(clean.images, cxr.images) and not clean.filled.any()
    assert clean.images.dtype == cxr.images.dtype

    occluded = corrupt_batch(cxr.images, "occlusion", 3, 0, cxr.labels)
    out = restorer.restore(occluded)
    truth = np.abs(occluded - cxr.images)[:, 0] > 1e-6
    before = np.abs(occluded - cxr.images)[:, 0][truth].mean()
    after = np.abs(out.images - cxr.images)[:, 0][truth].mean()
    assert after < 0.4 * before  # the fill is much closer to the hidden anatomy
    assert out.summary()["filled_images"] == len(cxr) and not out.denoised.any()

    noisy = corrupt_batch(cxr.images, "noise", 3, 0, cxr.labels)
    out = restorer.restore(noisy)
    assert out.denoised.all() and not out.filled.any()
    assert np.abs(out.images - cxr.images).mean() < 0.5 * np.abs(noisy - cxr.images).mean()
    # Mild noise (severity 1) stays under 3x the training level: left alone.
    mild = corrupt_batch(cxr.images, "noise", 1, 0, cxr.labels)
    assert np.array_equal(restorer(mild), mild)


def test_restorer_rejects_bad_input(cxr) -> None:
    with pytest.raises(ValueError, match="noise_factor must be > 1"):
        Restorer(noise_factor=1.0)
    with pytest.raises(ValueError, match="images must be"):
        Restorer().restore(cxr.images[:, 0])
    with pytest.raises(ValueError, match="show no noise"):
        Restorer().fit(np.full((2, 1, 32, 32), 0.5, dtype=np.float32))
    # Without a reference level only the inpainting runs.
    noisy = corrupt_batch(cxr.images[:2], "noise", 3, 0, cxr.labels[:2])
    assert not Restorer().restore(noisy).denoised.any()
