"""Pixel-level anomaly evidence from a denoising autoencoder trained on clean images only.

As in unsupervised anomaly detection for medical images with denoising autoencoders (Kascenas
et al., "Denoising autoencoders for unsupervised anomaly detection in brain MRI", MIDL 2022): a
small U-Net (MONAI ``BasicUNet``) learns to restore clean training images corrupted by *coarse*
Gaussian noise (drawn at low resolution and upsampled, so the corruption is blob-like rather
than pixel-wise). It learns to restore normal anatomy, so its residual x - DAE(x) is large where
the image shows something normal anatomy does not explain, e.g. a flat occluder biting a box out
of a lung's outline.

The evidence map (:meth:`DenoisingAutoencoder.residual_evidence`) smooths the *signed* residual
(white noise averages out, a coherent occluder does not), takes its magnitude, area-pools it to
a coarse grid and standardises it per image by its median and median absolute deviation, so a
corruption that raises the residual everywhere (noise) does not look anomalous, only regions
that stand out of the rest of the image do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def coarse_noise(
    shape: Sequence[int], resolution: int, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise (B, C, H, W) of standard deviation ``sigma`` drawn on a ``resolution`` ×
    ``resolution`` grid and upsampled bilinearly to (H, W): smooth blobs about H / resolution
    wide."""
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W), got {tuple(shape)}")
    if resolution < 1 or sigma < 0:
        raise ValueError(f"resolution must be >= 1 and sigma >= 0, got {resolution}, {sigma}")
    b, c, h, w = shape
    noise = torch.randn(b, c, resolution, resolution, generator=generator) * sigma
    return F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)


def flat_blobs(
    image: torch.Tensor, resolution: int, threshold: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``image`` (B, C, H, W) with irregular blobs, where unit coarse noise
    (:func:`coarse_noise`, ``resolution`` per side) exceeds ``threshold``, replaced by one
    uniform random intensity per image (at 128², resolution 6 and threshold 0.9 cover about
    10% of the image): regions whose content must be inferred from the anatomy around them."""
    b, _, h, w = image.shape
    blob = coarse_noise((b, 1, h, w), resolution, 1.0, generator).to(image.device) > threshold
    value = torch.rand(b, 1, 1, 1, generator=generator).to(image)
    return torch.where(blob, value.expand_as(image), image)


def _normalised_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur that ignores the zero padding (a mean over the pixels inside the image)."""
    from scaledl.medical.shape_prior import gaussian_blur

    if sigma <= 0:
        return x
    return gaussian_blur(x, sigma) / gaussian_blur(torch.ones_like(x[:1, :1]), sigma)


class DenoisingAutoencoder(nn.Module):
    """Image -> restored image with a MONAI ``BasicUNet`` (``features``: its six widths).

    Train it with :func:`train_denoising_autoencoder` on clean images; then
    :meth:`residual_evidence` is high where the image departs from normal anatomy and
    :meth:`restore` replaces a given region by the anatomy it infers there."""

    def __init__(self, in_channels: int = 1, features: Sequence[int] = (8, 16, 32, 64, 128, 8)):
        super().__init__()
        from monai.networks.nets import BasicUNet

        if len(features) != 6:
            raise ValueError(f"features must have 6 widths (BasicUNet), got {list(features)}")
        self.in_channels = in_channels
        self.net = BasicUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=in_channels, features=features
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"image must be (B, {self.in_channels}, H, W), got {tuple(image.shape)}"
            )
        if image.shape[-2] % 16 or image.shape[-1] % 16:
            raise ValueError(f"image height and width must be multiples of 16, got {image.shape}")
        return self.net(image)

    @torch.no_grad()
    def restore(self, image: torch.Tensor, gate: torch.Tensor, iterations: int = 3) -> torch.Tensor:
        """x' = g·x + (1 − g)·DAE(x'), iterated ``iterations`` times from x' = x: the image
        where the gate g (B, 1, H, W) in [0, 1] is open, the autoencoder's restoration where it
        is closed (each pass restores from the previous one, so the closed region is
        re-inferred from an ever more plausible context)."""
        if gate.ndim != 4 or gate.shape[1] != 1 or gate.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"gate must be (B, 1, H, W) like the image, got {tuple(gate.shape)}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        gate = gate.to(image)
        restored = image
        for _ in range(iterations):
            restored = gate * image + (1 - gate) * self(restored)
        return restored

    @torch.no_grad()
    def residual_evidence(
        self, image: torch.Tensor, sigma: float, pool: int = 1, batch_size: int = 32
    ) -> torch.Tensor:
        """Anomaly evidence (B, 1, H / pool, W / pool): |G_σ * (x - DAE(x))| (σ in pixels,
        summed over channels), area-pooled by ``pool`` and standardised per image as
        (a - median) / MAD; high where the image is not normal anatomy."""
        if pool < 1 or image.shape[-2] % pool or image.shape[-1] % pool:
            raise ValueError(f"pool {pool} must be >= 1 and divide the image size {image.shape}")
        res = torch.cat(
            [
                image[i : i + batch_size] - self(image[i : i + batch_size])
                for i in range(0, image.shape[0], batch_size)
            ]
        ).float()
        a = _normalised_blur(res, sigma).abs().sum(1, keepdim=True)
        a = F.avg_pool2d(a, pool)
        med = a.flatten(1).median(1).values[:, None, None, None]
        mad = (a - med).abs().flatten(1).median(1).values[:, None, None, None]
        return (a - med) / mad.clamp_min(1e-6)


def train_denoising_autoencoder(
    model: DenoisingAutoencoder,
    images: torch.Tensor,
    iterations: int = 600,
    batch_size: int = 8,
    lr: float = 2e-3,
    noise_resolution: int = 16,
    noise_sigma: float = 0.2,
    blob_resolution: int = 6,
    blob_threshold: float | None = None,
    augment: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Train ``model`` to restore clean ``images`` (N, C, H, W) from images plus coarse noise
    (:func:`coarse_noise`, ``noise_resolution`` per side, σ ``noise_sigma``; at 128² the
    defaults give blobs of about 8 px) with an L1 loss, Adam and poly decay; with ``augment``
    each batch gets the segmenter's random affine augmentation. With a ``blob_threshold``
    (0.9 covers about a tenth of the image), the images first get :func:`flat_blobs`
    (``blob_resolution``, ``blob_threshold``), so the autoencoder also learns to inpaint the
    anatomy under a flat region. Returns the loss per iteration."""
    from scaledl.medical.segmentation_train import random_affine

    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be >= 1, got {iterations}, {batch_size}")
    if blob_resolution < 1:
        raise ValueError(f"blob_resolution must be >= 1, got {blob_resolution}")
    gen = torch.Generator().manual_seed(seed)
    images = images.to(device, torch.float32)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 - it / iterations) ** 0.9)
    losses = []
    for _ in range(iterations):
        idx = torch.randint(images.shape[0], (batch_size,), generator=gen).to(device)
        x = images[idx]
        if augment:
            dummy = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.long, device=device)
            x = random_affine(x, dummy, gen)[0]
        noisy = x if blob_threshold is None else flat_blobs(x, blob_resolution, blob_threshold, gen)
        noisy = noisy + coarse_noise(x.shape, noise_resolution, noise_sigma, gen).to(device)
        loss = (model(noisy) - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
