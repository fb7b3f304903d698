"""Shape priors by pairwise comparison (Xie et al., arXiv 2204.11090): ShapePriorNet.

A Siamese pair of U-Net encoders (MONAI ``BasicUNet`` blocks): the image encoder reads the
target image; the template encoder reads a template image concatenated with its foreground
masks. At every skip scale a cosine-similarity attention compares the two per foreground class
and the resulting maps are fused into the image features before the U-Net decoder.

Attention variants (``attention=``), for class k with template mask M_k at that scale:

- ``"prototype"`` (SG-One): p_k = masked average of template features; A_k(x) = cos(F(x), p_k).
- ``"dense"`` (pairwise comparison): A_k(x) = Σ_y softmax_y(τ cos(F(x), T(y))) M_k(y), i.e. the
  template mask transferred by feature matching, with a learnable temperature τ.
- ``"max"``: A_k(x) = max over y in M_k of cos(F(x), T(y)).

Dense and max attention cost O((HW)²) memory, so they are used at the ``dense_scales``
coarsest scales only; finer scales use prototype attention.

Label prior (``label_prior=True``, prior-conditioned decoding): trained on clean images only, a
decoder that reads attention maps through its skips learns to ignore them, because the image
alone explains clean data (feeding a blank template leaves its Dice unchanged). The label
prior makes the template matter at the output: a small Siamese encoder embeds the image and the
template at a coarse scale (area-downsampled by ``prior_pool``, where white noise averages out,
plus coordinate channels, as anatomy sits at similar places), the dense cosine attention
transfers the template's labels (background included) to every image position, and the
resulting prior P (B, K + 1, H, W) is combined with the decoder's logits z as a product of
experts: ``c·tanh(z / c) + β·log max(P, ε)``. Bounding the image evidence by ``c``
(``logit_bound``) lets a confident prior decide inside structures, while near boundaries, where
transferred labels are soft, the image decides.

Optional global alignment (``prior="affine"`` or ``"both"``): instead of (or averaged with) the
per-pixel transfer, one affine map per image is fitted to the dense matches by iteratively
reweighted least squares (:func:`estimate_affine`; positions whose match contradicts the global
transform, e.g. under an occluder, drop out), and the full-resolution template masks are warped
with it and blurred (:func:`warp_masks`, ``align_blur``).

Match gate (``match_gate=True``): where the image's embedding matches no anatomy seen in clean
training images (its best cosine to the template and to a memory bank of clean training
embeddings, :func:`memory_evidence`, falls below a low quantile of its clean distribution),
e.g. under an occluder, the decoder's logits are gated off and the prior decides, the template
being warped there by the match displacement interpolated from the trusted surroundings
(:func:`match_displacement`, :func:`fill_low_evidence`, :func:`warp_by_displacement`). The gate
is calibrated after training on clean training images only
(:meth:`ShapePriorNet.calibrate_match_gate`); training itself is unchanged. With
``match_flat=True`` the gate also closes exactly on featureless regions of the image
(:func:`featureless_regions`, e.g. a pasted occluder), which then replace the coarse evidence's
closed blob around them (:func:`reopen_explained`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from scipy import ndimage
from torch import nn

from scaledl.medical.anomaly import DenoisingAutoencoder, train_denoising_autoencoder
from scaledl.medical.restoration import flat_region_mask

ATTENTIONS = ("prototype", "dense", "max")
FUSIONS = ("concat", "gate", "both")
PRIORS = ("attention", "affine", "both")


def prototype_attention(
    feat: torch.Tensor, tfeat: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Cosine similarity of each image feature to each class prototype of the template.

    feat, tfeat: (B, C, h, w); masks: (B, K, h, w) soft template masks. Returns (B, K, h, w).
    """
    proto = torch.einsum("bchw,bkhw->bkc", tfeat, masks) / (masks.sum((2, 3))[..., None] + eps)
    dot = torch.einsum("bchw,bkc->bkhw", feat, proto)
    norm = feat.norm(dim=1, keepdim=True) * proto.norm(dim=2)[..., None, None]
    return dot / (norm + eps)


def _pairwise_cosine(feat: torch.Tensor, tfeat: torch.Tensor) -> torch.Tensor:
    """S(x, y) = cos(F(x), T(y)) as (B, h*w, h'*w')."""
    f = F.normalize(feat.flatten(2), dim=1)
    t = F.normalize(tfeat.flatten(2), dim=1)
    return f.transpose(1, 2) @ t


def _transfer(sim: torch.Tensor, masks: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Σ_y softmax_y(τ S(x, y)) M_k(y) from S (B, hw, h'w') and masks (B, K, h', w'), as
    (B, K, hw)."""
    weights = torch.softmax(tau * sim, dim=-1)
    return (weights @ masks.flatten(2).transpose(1, 2)).transpose(1, 2)


def dense_attention(
    feat: torch.Tensor, tfeat: torch.Tensor, masks: torch.Tensor, tau: torch.Tensor | float
) -> torch.Tensor:
    """Template masks transferred by soft feature matching: Σ_y softmax_y(τ S(x, y)) M_k(y)."""
    b, _, h, w = feat.shape
    out = _transfer(_pairwise_cosine(feat, tfeat), masks, tau)
    return out.reshape(b, masks.shape[1], h, w)


def match_evidence(feat: torch.Tensor, tfeat: torch.Tensor) -> torch.Tensor:
    """Best-match cosine e(x) = max_y cos(F(x), T(y)), (B, h, w): how well the image's local
    features at x match *any* template position. Low where the image shows something the
    template (and, after calibration, the clean training data) never shows."""
    b, _, h, w = feat.shape
    return _pairwise_cosine(feat, tfeat).amax(-1).reshape(b, h, w)


def memory_evidence(feat: torch.Tensor, bank: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Best cosine of every position of ``feat`` (B, C, h, w) to a memory bank of feature
    vectors (M, C) (nearest-neighbour novelty, as in PatchCore), (B, h, w); the bank is
    scanned in chunks of ``chunk`` vectors so memory stays O(B·h·w·chunk)."""
    if bank.ndim != 2 or bank.shape[1] != feat.shape[1]:
        raise ValueError(f"bank must be (M, {feat.shape[1]}), got {tuple(bank.shape)}")
    b, _, h, w = feat.shape
    f = F.normalize(feat.flatten(2), dim=1).transpose(1, 2)  # (B, hw, C)
    bank = F.normalize(bank.to(f.dtype), dim=1)
    best = torch.full((b, h * w), -1.0, device=feat.device, dtype=f.dtype)
    for i in range(0, bank.shape[0], chunk):
        best = torch.maximum(best, (f @ bank[i : i + chunk].T).amax(-1))
    return best.reshape(b, h, w)


def local_memory_evidence(feat: torch.Tensor, bank: torch.Tensor, radius: int) -> torch.Tensor:
    """Best cosine of every position x of ``feat`` (B, C, h, w) to the positions within
    ``radius`` (a (2r + 1)² window around x) of any of the bank's maps (N, C, h, w), (B, h, w).

    Positional novelty: anatomy sits at similar places in every image, so a patch is familiar
    only if some training image shows something like it *near the same place* (an occluder
    that looks like body tissue inside a lung is not); positions outside a map count as
    cosine 0. One bank map at a time, so memory stays O(B·C·(2r + 1)²·h·w)."""
    if bank.ndim != 4 or bank.shape[1:] != feat.shape[1:]:
        raise ValueError(
            f"bank must be (N, {', '.join(map(str, feat.shape[1:]))}), got {tuple(bank.shape)}"
        )
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    b, c, h, w = feat.shape
    k = 2 * radius + 1
    f = F.normalize(feat, dim=1).flatten(2)  # (B, C, hw)
    best = torch.full((b, h * w), -1.0, device=feat.device, dtype=f.dtype)
    for m in F.normalize(bank.to(f.dtype), dim=1):
        win = F.unfold(m[None], k, padding=radius).reshape(c, k * k, h * w)
        best = torch.maximum(best, torch.einsum("bcx,ckx->bkx", f, win).amax(1))
    return best.reshape(b, h, w)


def evidence_gate(evidence: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Piecewise-linear gate: 0 at or below ``low``, 1 at or above ``high``, linear between."""
    if not high > low:
        raise ValueError(f"evidence gate needs high > low, got low={low}, high={high}")
    return ((evidence - low) / (high - low)).clamp(0.0, 1.0)


def fill_low_evidence(maps: torch.Tensor, gate: torch.Tensor, sigma: float) -> torch.Tensor:
    """Replace maps where the matching is untrusted by their trusted surroundings.

    maps: (B, C, h, w), e.g. a displacement field or label probabilities; gate: (B, 1, h, w) in
    [0, 1]. Returns g·M + (1 - g)·(G_σ * (g·M)) / (G_σ * g), a normalised convolution (Gaussian
    σ in pixels): under an occluder, where the matches are wrong, the values are interpolated
    from the well-matched anatomy around it (convex combinations, so distributions stay
    distributions); where nothing nearby is trusted, M is kept.
    """
    if sigma <= 0:
        return maps
    num = gaussian_blur(gate * maps, sigma)
    den = gaussian_blur(gate, sigma)
    filled = torch.where(den > 1e-6, num / den.clamp_min(1e-6), maps)
    return gate * maps + (1 - gate) * filled


def grow_closed_regions(
    gate: torch.Tensor, evidence: torch.Tensor, threshold: float | torch.Tensor
) -> torch.Tensor:
    """Hysteresis of a gate: the positions (B, 1, h, w) bool that are closed (gate < 0.5) or
    connected to a closed one (8-neighbourhood) through positions whose evidence is below
    ``threshold``. A moderately low evidence alone is common on clean anatomy; next to a
    region that is clearly unfamiliar (an occluder's core) it most likely continues it."""
    if gate.shape != evidence.shape or gate.ndim != 4:
        raise ValueError(
            f"gate {tuple(gate.shape)} and evidence {tuple(evidence.shape)} must be the same "
            "(B, 1, h, w) shape"
        )
    seeds = gate < 0.5
    allowed = evidence < threshold
    grown = seeds
    for _ in range(gate.shape[-2] * gate.shape[-1]):
        nxt = ((F.max_pool2d(grown.float(), 3, 1, 1) > 0) & allowed) | seeds
        if torch.equal(nxt, grown):
            break
        grown = nxt
    return grown


def featureless_regions(image: torch.Tensor) -> torch.Tensor:
    """Featureless regions (B, 1, H, W) float of ``image`` (B, C, H, W), channel mean, by
    :func:`scaledl.medical.restoration.flat_region_mask`: connected areas whose local
    variation stays far below the image's own noise level (pasted occluders, burned-in
    labels, clipped detector areas). Computed on the CPU (scipy's connected components)."""
    arr = image.detach().float().mean(1).cpu().numpy().astype(np.float64)
    flat = np.stack([flat_region_mask(x) for x in arr])
    return torch.as_tensor(flat, dtype=image.dtype, device=image.device)[:, None]


class ImageCues(NamedTuple):
    """What the match gate reads from the image itself, the same for every template:
    featureless regions (B, 1, H, W) and the anomaly evidence on the coarse grid
    (B, 1, h, w); None where that cue is off."""

    flat: torch.Tensor | None
    anomaly: torch.Tensor | None


def reopen_explained(gate: torch.Tensor, explained: torch.Tensor) -> torch.Tensor:
    """Open every region of a coarse gate (B, 1, h, w) that is not fully open (gate < 1,
    8-connected) and touches an ``explained`` position (bool, same shape): the anomaly there is
    accounted for by a known cause, which then decides alone where the gate closes, instead of
    the coarse evidence's blob that spreads past it."""
    if gate.shape != explained.shape or gate.ndim != 4:
        raise ValueError(
            f"gate {tuple(gate.shape)} and explained {tuple(explained.shape)} must be the same "
            "(B, 1, h, w) shape"
        )
    partial = (gate < 1).cpu().numpy()
    hit = explained.cpu().numpy()
    reopen = np.zeros_like(partial)
    for b in range(partial.shape[0]):
        regions, n = ndimage.label(partial[b, 0], structure=np.ones((3, 3)))
        if n:
            touched = np.unique(regions[hit[b, 0] & (regions > 0)])
            reopen[b, 0] = np.isin(regions, touched[touched > 0])
    return torch.where(torch.as_tensor(reopen, device=gate.device), torch.ones_like(gate), gate)


def joint_bilateral_filter(
    maps: torch.Tensor,
    guide: torch.Tensor,
    sigma_space: float,
    sigma_range: float,
    radius: int | None = None,
) -> torch.Tensor:
    """Edge-aware smoothing of (B, C, H, W) ``maps`` guided by an image (B, G, H, W): the
    weighted mean over the (2r + 1)² window around x with weights
    exp(-|x - y|² / 2σ_s²) · exp(-|I(x) - I(y)|² / 2σ_r²) (σ_s in pixels, σ_r in intensity
    units, squared distance summed over the guide's channels; positions outside the image are
    left out; r defaults to ceil(2σ_s)). A coarse map upsampled to full size follows the image's
    edges afterwards: each pixel takes the value of the neighbours that look like it."""
    if maps.ndim != 4 or guide.ndim != 4 or maps.shape[::2] != guide.shape[::2]:
        raise ValueError(
            f"maps {tuple(maps.shape)} and guide {tuple(guide.shape)} must be (B, C, H, W) "
            "with the same B, H and W"
        )
    if maps.shape[-1] != guide.shape[-1]:
        raise ValueError(f"maps and guide differ in width: {maps.shape[-1]} vs {guide.shape[-1]}")
    if sigma_space <= 0 or sigma_range <= 0:
        raise ValueError(
            f"sigma_space and sigma_range must be positive, got {sigma_space}, {sigma_range}"
        )
    r = math.ceil(2 * sigma_space) if radius is None else radius
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {r}")
    h, w = maps.shape[-2:]
    guide = guide.to(maps.dtype)
    pad = (r, r, r, r)
    mp, gp = F.pad(maps, pad), F.pad(guide, pad)
    inside = F.pad(torch.ones_like(maps[:, :1]), pad)
    num = torch.zeros_like(maps)
    den = torch.zeros_like(maps[:, :1])
    # one offset at a time: memory stays O(B·C·H·W) whatever the window
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            win = (slice(None), slice(None), slice(r + dy, r + dy + h), slice(r + dx, r + dx + w))
            diff = ((gp[win] - guide) ** 2).sum(1, keepdim=True)
            wgt = torch.exp(
                -(dy * dy + dx * dx) / (2 * sigma_space**2) - diff / (2 * sigma_range**2)
            )
            wgt = wgt * inside[win]
            num = num + wgt * mp[win]
            den = den + wgt
    return num / den


def match_displacement(
    sim: torch.Tensor, image_hw: Sequence[int], template_hw: Sequence[int], tau: float
) -> torch.Tensor:
    """Displacement (B, 2, h, w) from each image position to its soft-argmax match in the
    template, q(x) - x with q(x) = Σ_y softmax_y(τ S(x, y)) y, in ``grid_sample``'s
    normalised (x, y) frame; S is (B, h*w, h'*w'). A large τ keeps q near the best match
    (a small one pulls it towards the template's centre)."""
    b = sim.shape[0]
    h, w = image_hw
    q = torch.softmax(tau * sim, -1) @ pixel_centres(*template_hw, sim)
    return (q - pixel_centres(h, w, sim)).transpose(1, 2).reshape(b, 2, h, w)


def warp_by_displacement(masks: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Resample (B, K, H, W) masks at x + d(x) for a (B, 2, H, W) displacement field
    (normalised (x, y) frame; bilinear, outside counts as empty)."""
    h, w = disp.shape[-2:]
    grid = pixel_centres(h, w, disp).reshape(1, h, w, 2) + disp.permute(0, 2, 3, 1)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def max_attention(feat: torch.Tensor, tfeat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """max_{y in M_k} cos(F(x), T(y)); 0 for a class absent from the template at this scale."""
    b, _, h, w = feat.shape
    sim = _pairwise_cosine(feat, tfeat)[:, None]  # (B, 1, hw, h'w')
    inside = (masks.flatten(2) > 0)[:, :, None, :]  # (B, K, 1, h'w')
    best = sim.masked_fill(~inside, -math.inf).amax(dim=-1)  # (B, K, hw)
    best = torch.where(inside.any(-1), best, torch.zeros_like(best))
    return best.reshape(b, masks.shape[1], h, w)


def pixel_centres(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(h*w, 2) pixel-centre positions (x, y) in the normalised frame of ``affine_grid`` /
    ``grid_sample`` with ``align_corners=False``, row-major (the order of ``flatten(2)``)."""
    ys = (2 * torch.arange(h, device=like.device, dtype=like.dtype) + 1) / h - 1
    xs = (2 * torch.arange(w, device=like.device, dtype=like.dtype) + 1) / w - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1)


def estimate_affine(
    feat: torch.Tensor,
    tfeat: torch.Tensor,
    tau: torch.Tensor | float = 50.0,
    iterations: int = 5,
    scale: float = 0.1,
    ridge: float = 1e-3,
    return_weights: bool = False,
    return_inliers: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Global affine alignment of a template to an image from dense cosine correspondences.

    Every image position x is matched to the template by a soft-argmax over the cosine
    similarity, q(x) = Σ_y softmax_y(τ S(x, y)) y, with confidence c(x) = max_y softmax_y(...)
    (a peaked match). The affine map x -> A x + t is fitted to the pairs (x, q(x)) by iteratively
    reweighted least squares: weights c(x) / (1 + |r(x)|² / scale²) (Cauchy), so positions whose
    match disagrees with the global transform (an occluder, a corrupted region) drop out and the
    visible anatomy fixes the transform. A small ridge pulls towards the identity, so the system
    stays solvable when every weight vanishes. Differentiable throughout.

    feat: (B, C, h, w) image features; tfeat: (B, C, h', w') template features. Returns theta
    (B, 2, 3) in ``affine_grid``'s convention (``align_corners=False``): template position
    (x', y') = theta @ (x, y, 1) for image position (x, y), both in [-1, 1]; with
    ``return_weights`` also the final IRLS weights (B, h, w), normalised to sum 1, and with
    ``return_inliers`` the inlier factor 1 / (1 + |r|² / scale²) of the final fit (B, h, w):
    near 0 where a position's match contradicts the global transform.
    """
    if feat.ndim != 4 or tfeat.ndim != 4 or feat.shape[:2] != tfeat.shape[:2]:
        raise ValueError(
            f"feat and tfeat must be (B, C, h, w) with equal B and C, got "
            f"{tuple(feat.shape)} and {tuple(tfeat.shape)}"
        )
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if ridge <= 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    b, _, h, w = feat.shape
    match = torch.softmax(tau * _pairwise_cosine(feat, tfeat), dim=-1)  # (B, hw, h'w')
    q = match @ pixel_centres(*tfeat.shape[-2:], tfeat)  # (B, hw, 2) soft-argmax positions
    conf = match.amax(-1)  # (B, hw)
    pos = pixel_centres(h, w, feat)
    x = torch.cat([pos, torch.ones_like(pos[:, :1])], -1).expand(b, -1, -1)  # (B, hw, 3)
    eye = torch.eye(3, 2, device=feat.device, dtype=feat.dtype)  # identity map, (3, 2)
    reg = ridge * torch.eye(3, device=feat.device, dtype=feat.dtype)
    weights = conf
    for it in range(iterations + 1):
        wn = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        xw = x * wn[..., None]
        coef = torch.linalg.solve(
            xw.transpose(1, 2) @ x + reg, xw.transpose(1, 2) @ q + ridge * eye
        )
        if it == iterations:
            break
        r2 = ((x @ coef - q) ** 2).sum(-1)
        weights = conf / (1 + r2 / scale**2)
    theta = coef.transpose(1, 2)  # (B, 2, 3)
    extra = []
    if return_weights:
        extra.append(wn.reshape(b, h, w))
    if return_inliers:
        r2 = ((x @ coef - q) ** 2).sum(-1)
        extra.append((1 / (1 + r2 / scale**2)).reshape(b, h, w))
    return (theta, *extra) if extra else theta


def warp_masks(masks: torch.Tensor, theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample (B, K, H, W) template masks at theta @ (x, y, 1) for every output position of
    ``size`` (bilinear; outside the template counts as empty). Differentiable in theta."""
    grid = F.affine_grid(theta, [masks.shape[0], masks.shape[1], *size], align_corners=False)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) maps, sigma in pixels, zero padding (outside the
    image counts as empty); sigma 0 returns x."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


class _Encoder(nn.Module):
    """Five-stage U-Net encoder: TwoConv then four (max-pool + TwoConv) stages."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def coordinate_channels(batch: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(batch, 2, h, w) y and x coordinates in [-1, 1]."""
    ys = torch.linspace(-1.0, 1.0, h, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=like.device, dtype=like.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy, xx])[None].expand(batch, -1, -1, -1)


def with_background(masks: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) soft foreground masks -> (B, K + 1, h, w) with background 1 - Σ_k M_k first."""
    return torch.cat([(1 - masks.sum(1, keepdim=True)).clamp_min(0), masks], 1)


class PriorMatcher(nn.Module):
    """Siamese embedding for the label prior: a 3-stage U-Net (MONAI blocks) on the image
    area-downsampled by ``pool`` plus two coordinate channels; returns (B, dim, H/pool, W/pool).

    The template masks never enter it (they are used only to transfer labels), so the image and
    the template are embedded by the same weights and compared like for like.
    """

    def __init__(
        self, in_channels: int, pool: int, features: Sequence[int], dim: int, blk: dict
    ) -> None:
        super().__init__()
        if len(features) != 3:
            raise ValueError(f"prior_features must give 3 stage widths, got {tuple(features)}")
        c = list(features)
        self.pool = pool
        self.stem = TwoConv(in_chns=in_channels + 2, out_chns=c[0], **blk)
        self.down1 = Down(in_chns=c[0], out_chns=c[1], **blk)
        self.down2 = Down(in_chns=c[1], out_chns=c[2], **blk)
        self.up2 = UpCat(in_chns=c[2], cat_chns=c[1], out_chns=c[1], **blk)
        self.up1 = UpCat(in_chns=c[1], cat_chns=c[0], out_chns=dim, **blk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = F.avg_pool2d(x, self.pool) if self.pool > 1 else x
        h0 = self.stem(torch.cat([xs, coordinate_channels(xs.shape[0], *xs.shape[-2:], xs)], 1))
        h1 = self.down1(h0)
        return self.up1(self.up2(self.down2(h1), h1), h0)


class _Fusion(nn.Module):
    """Fuse K attention maps into C image channels: concat (1x1 conv), gate, or both."""

    def __init__(self, channels: int, num_classes: int, mode: str, gate_init: float = 1.0) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("gate", "both"):
            self.gate_weight = nn.Parameter(torch.full((num_classes,), float(gate_init)))
        if mode in ("concat", "both"):
            self.proj = nn.Conv2d(channels + num_classes, channels, kernel_size=1)
            # start near the identity on the image features, so the network begins close to a
            # plain U-Net and learns how much to rely on the (small, non-zero) attention input
            with torch.no_grad():
                self.proj.weight[:, :channels].zero_()
                self.proj.weight[:, :channels, 0, 0] += torch.eye(channels)
                self.proj.weight[:, channels:] *= 0.1
                self.proj.bias.zero_()

    def forward(self, feat: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        if self.mode in ("gate", "both"):
            gate = torch.sigmoid(self.gate_weight[None, :, None, None] * attn).sum(1, keepdim=True)
            feat = feat * (1 + gate)
        if self.mode in ("concat", "both"):
            feat = self.proj(torch.cat([feat, attn], dim=1))
        return feat


class ShapePriorNet(nn.Module):
    """Template-conditioned U-Net with cosine-similarity attention per foreground class.

    Args:
        num_classes: number of foreground classes K; the network outputs K + 1 logits.
        in_channels: image channels.
        features: channels of the five encoder stages (the decoder mirrors them).
        attention: ``"prototype"``, ``"dense"`` or ``"max"`` (see the module docstring).
        dense_scales: how many of the coarsest scales use dense/max attention.
        fusion: ``"concat"``, ``"gate"`` or ``"both"``.
        share_weights: share the template encoder's weights with the image encoder from stage 2
            on (stage 1 differs in input channels unless ``mask_as_separate_stream``).
        mask_as_separate_stream: encode the template image alone (masks used only in the
            attention, the SG-One way); with ``share_weights`` the encoders are fully shared.
        tau: initial temperature of dense attention (learned in log space).
        gate_init: initial gate weights w_k (learned); larger values make the attention
            modulate the image features more strongly from the start.
        label_prior: add the label prior at the output (see the module docstring).
        prior_pool: area-downsampling factor of the label prior's inputs (the prior lives at
            1/prior_pool resolution; H / prior_pool must be divisible by 4).
        prior_features, prior_dim: widths of the prior encoder's 3 stages and embedding size.
        prior_weight: initial weight β of log P (learned).
        logit_bound: bound c on the decoder's logits, c·tanh(z / c); 0 leaves them unbounded.
        prior_eps: floor ε of P inside the log.
        prior: how the template's labels reach the image. ``"attention"`` (default): per-pixel
            dense label transfer. ``"affine"``: one global affine transform per image, fitted
            to the dense matches by robust (IRLS) least squares (:func:`estimate_affine`),
            warps the full-resolution template masks. ``"both"``: the mean of the two.
        align_tau, align_iterations, align_scale: soft-argmax temperature (fixed), IRLS
            iterations and Cauchy residual scale (normalised coordinates) of the alignment.
        align_blur: Gaussian σ, as a fraction of the image height, applied to the warped
            masks: an affine map cannot match every shape, so the aligned template is
            confident inside structures and soft near their boundaries (0: hard masks).
        evidence_gate: with ``prior="affine"`` or ``"both"``, multiply the decoder's bounded
            logits by the alignment's inlier factor (upsampled): where the image's matches
            contradict the global alignment (an occluder), the image evidence fades and the
            prior decides.
        match_gate: gate the decoder's bounded logits by the label prior's match evidence
            (needs the label prior with ``prior="attention"`` or ``"both"``): where the image's
            embedding matches no position of the template nor of a memory bank of clean
            training embeddings as well as clean images do, the decoder is silenced and the
            prior decides, with the template warped by the match displacement filled in from
            the trusted surroundings. Open everywhere until :meth:`calibrate_match_gate` (run
            by ``train_segmenter``) sets its thresholds on clean training images.
        match_quantiles: (low, high) quantiles of the clean evidence at which the gate is
            closed / fully open.
        match_smooth: Gaussian σ, in coarse (1 / ``prior_pool``) pixels, smoothing the evidence.
        match_relative: measure the evidence relative to its median over the image.
        match_fill: σ, as a fraction of the coarse height, of the normalised convolution that
            fills the match displacement under a closed gate.
        match_tau: soft-argmax temperature of the match displacement (fixed).
        match_blur: Gaussian σ, as a fraction of the image height, of the warped masks.
        match_grow_quantiles: (low, high) quantiles of the clean evidence for the gate's
            hysteresis: closed regions grow into connected positions whose evidence is below
            the high one, where the gate ramps from the low one to the high one
            (:func:`grow_closed_regions`); None turns it off.
        match_radius: with r > 0 the evidence is the best cosine to the clean training
            embeddings within r coarse pixels of the same position
            (:func:`local_memory_evidence`), instead of anywhere in the template and the bank.
        match_templates: under a closed gate, average the warped masks of this many atlas
            templates (the clean training images stored by :meth:`calibrate_match_gate`, those
            whose embeddings best match the image where the gate is open), each warped by its
            own match displacement, instead of the given template alone (1).
        match_edge_sigma, match_edge_range: the coarse gate, upsampled to the image, is
            snapped to the image's edges by a joint bilateral filter
            (:func:`joint_bilateral_filter`) of spatial σ ``match_edge_sigma`` × the image
            height and intensity σ ``match_edge_range``, so a closed region ends where the
            occluder does, not a coarse pixel beyond; ``match_edge_sigma=0`` turns it off.
        match_anomaly: with the match gate, a denoising autoencoder trained on the clean
            training images (:meth:`fit_anomaly`, run by ``train_segmenter``) also closes the
            gate where its smoothed residual stands out (:mod:`scaledl.medical.anomaly`):
            occluders that the embedding finds familiar but normal anatomy does not explain.
        match_anomaly_quantile: the residual evidence's threshold is this quantile of its
            clean distribution on held-out training images (:meth:`calibrate_match_gate`).
        match_anomaly_sigma: Gaussian σ, as a fraction of the image height, smoothing the
            signed residual (white noise averages out, an occluder does not).
        anomaly_features: the six widths of the autoencoder's ``BasicUNet``.
        match_restore_iterations: with the anomaly evidence active, the image is restored
            where the gate is closed by a copy of the autoencoder fine-tuned to inpaint flat
            regions (``restorer``, trained by :meth:`fit_anomaly`; restored by
            :meth:`~scaledl.medical.anomaly.DenoisingAutoencoder.restore`, this many passes)
            and segmented again; under the closed gate that second prediction joins the warped
            prior instead of the first one. 0 (the default) turns it off: the restorer's
            pretext, flat regions of one random intensity, resembles the benchmark's
            occluders, and it gained only about +0.2 Dice under occlusion (CPU).
        match_restore_weight: weight of the second prediction's bounded logits under the
            closed gate (at 1 it costs more under noise, where the gate closes too).
        match_flat: with the match gate and an image, featureless regions
            (:func:`featureless_regions`) close the gate exactly where they lie: an occluder
            pasted over anatomy carries no image information, and the decoder's output there
            is replaced by the prior. A closed region of the coarse evidence that touches a
            featureless region is reopened (:func:`reopen_explained`): the featureless region
            explains that anomaly, and the coarse blob would silence the decoder on visible
            anatomy around it. Inference only; training is unchanged.
        match_flat_fraction: a coarse position counts as featureless (its match displacement
            is interpolated from the surroundings) when at least this fraction of its pixels
            are.
        norm, act, dropout: passed to the MONAI blocks.

    ``forward(image, template, template_masks)`` takes (B, C, H, W), (B, C, H, W) and one-hot
    foreground masks (B, K, H, W) and returns logits (B, K + 1, H, W).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        attention: str = "prototype",
        dense_scales: int = 2,
        fusion: str = "gate",
        share_weights: bool = False,
        mask_as_separate_stream: bool = False,
        tau: float = 10.0,
        gate_init: float = 1.0,
        label_prior: bool = True,
        prior_pool: int = 4,
        prior_features: Sequence[int] = (16, 32, 64),
        prior_dim: int = 32,
        prior_weight: float = 1.0,
        logit_bound: float = 3.0,
        prior_eps: float = 1e-3,
        prior: str = "attention",
        align_tau: float = 50.0,
        align_iterations: int = 5,
        align_scale: float = 0.1,
        align_blur: float = 0.06,
        evidence_gate: bool = False,
        match_gate: bool = False,
        match_quantiles: Sequence[float] = (0.001, 0.005),
        match_smooth: float = 1.0,
        match_relative: bool = True,
        match_fill: float = 0.2,
        match_tau: float = 200.0,
        match_blur: float = 0.03,
        match_grow_quantiles: Sequence[float] | None = (0.001, 0.01),
        match_templates: int = 5,
        match_radius: int = 4,
        match_edge_sigma: float = 0.023,
        match_edge_range: float = 0.05,
        match_anomaly: bool = True,
        match_anomaly_quantile: float = 0.999,
        match_anomaly_sigma: float = 0.016,
        anomaly_features: Sequence[int] = (8, 16, 32, 64, 128, 8),
        match_restore_iterations: int = 0,
        match_restore_weight: float = 0.5,
        match_flat: bool = False,
        match_flat_fraction: float = 0.25,
        norm: str | tuple = ("instance", {"affine": True}),
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(features) != 5:
            raise ValueError(f"features must give 5 stage widths, got {tuple(features)}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if not 0 <= dense_scales <= 5:
            raise ValueError(f"dense_scales must be in 0..5, got {dense_scales}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if prior_pool < 1:
            raise ValueError(f"prior_pool must be >= 1, got {prior_pool}")
        if logit_bound < 0:
            raise ValueError(f"logit_bound must be >= 0, got {logit_bound}")
        if not 0 < prior_eps < 1:
            raise ValueError(f"prior_eps must be in (0, 1), got {prior_eps}")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if align_tau <= 0:
            raise ValueError(f"align_tau must be positive, got {align_tau}")
        if align_iterations < 0:
            raise ValueError(f"align_iterations must be >= 0, got {align_iterations}")
        if align_scale <= 0:
            raise ValueError(f"align_scale must be positive, got {align_scale}")
        if not 0 <= align_blur < 1:
            raise ValueError(f"align_blur must be in [0, 1), got {align_blur}")
        if evidence_gate and prior == "attention":
            raise ValueError("evidence_gate needs prior='affine' or 'both' (an alignment)")
        if match_flat and not match_gate:
            raise ValueError("match_flat needs match_gate=True")
        if match_gate and (not label_prior or prior == "affine"):
            raise ValueError(
                "match_gate needs the label prior with prior='attention' or 'both' (dense matches)"
            )
        if len(match_quantiles) != 2 or not 0 <= match_quantiles[0] < match_quantiles[1] <= 1:
            raise ValueError(
                f"match_quantiles must be (low, high) with 0 <= low < high <= 1, "
                f"got {tuple(match_quantiles)}"
            )
        if match_grow_quantiles is not None and (
            len(match_grow_quantiles) != 2
            or not 0 <= match_grow_quantiles[0] < match_grow_quantiles[1] <= 1
        ):
            raise ValueError(
                f"match_grow_quantiles must be None or (low, high) with 0 <= low < high <= 1, "
                f"got {tuple(match_grow_quantiles)}"
            )
        for name, value, ok, rule in (
            ("match_templates", match_templates, match_templates >= 1, ">= 1"),
            ("match_radius", match_radius, match_radius >= 0, ">= 0"),
            ("match_fill", match_fill, match_fill >= 0, ">= 0"),
            ("match_smooth", match_smooth, match_smooth >= 0, ">= 0"),
            ("match_tau", match_tau, match_tau > 0, "positive"),
            ("match_blur", match_blur, 0 <= match_blur < 1, "in [0, 1)"),
            ("match_edge_sigma", match_edge_sigma, 0 <= match_edge_sigma < 1, "in [0, 1)"),
            ("match_edge_range", match_edge_range, match_edge_range > 0, "positive"),
            (
                "match_anomaly_quantile",
                match_anomaly_quantile,
                0 < match_anomaly_quantile < 1,
                "in (0, 1)",
            ),
            ("match_anomaly_sigma", match_anomaly_sigma, 0 <= match_anomaly_sigma < 1, "in [0, 1)"),
            (
                "match_restore_iterations",
                match_restore_iterations,
                match_restore_iterations >= 0,
                ">= 0",
            ),
            ("match_restore_weight", match_restore_weight, match_restore_weight >= 0, ">= 0"),
            (
                "match_flat_fraction",
                match_flat_fraction,
                0 < match_flat_fraction <= 1,
                "in (0, 1]",
            ),
        ):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {value}")
        # constructor arguments, saved by save_pretrained so from_pretrained can rebuild the net
        self.config = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "features": list(features),
            "attention": attention,
            "dense_scales": dense_scales,
            "fusion": fusion,
            "share_weights": share_weights,
            "mask_as_separate_stream": mask_as_separate_stream,
            "tau": tau,
            "gate_init": gate_init,
            "label_prior": label_prior,
            "prior_pool": prior_pool,
            "prior_features": list(prior_features),
            "prior_dim": prior_dim,
            "prior_weight": prior_weight,
            "logit_bound": logit_bound,
            "prior_eps": prior_eps,
            "prior": prior,
            "align_tau": align_tau,
            "align_iterations": align_iterations,
            "align_scale": align_scale,
            "align_blur": align_blur,
            "evidence_gate": evidence_gate,
            "match_gate": match_gate,
            "match_quantiles": list(match_quantiles),
            "match_smooth": match_smooth,
            "match_relative": match_relative,
            "match_fill": match_fill,
            "match_tau": match_tau,
            "match_blur": match_blur,
            "match_grow_quantiles": (
                None if match_grow_quantiles is None else list(match_grow_quantiles)
            ),
            "match_templates": match_templates,
            "match_radius": match_radius,
            "match_edge_sigma": match_edge_sigma,
            "match_edge_range": match_edge_range,
            "match_anomaly": match_anomaly,
            "match_anomaly_quantile": match_anomaly_quantile,
            "match_anomaly_sigma": match_anomaly_sigma,
            "anomaly_features": list(anomaly_features),
            "match_restore_iterations": match_restore_iterations,
            "match_restore_weight": match_restore_weight,
            "match_flat": match_flat,
            "match_flat_fraction": match_flat_fraction,
            "norm": norm,
            "act": act,
            "dropout": dropout,
        }
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.attention = attention
        self.dense_scales = dense_scales
        self.mask_as_separate_stream = mask_as_separate_stream
        f = list(features)
        blk = {"spatial_dims": 2, "act": act, "norm": norm, "bias": True, "dropout": dropout}

        def stages(in_ch: int) -> list[nn.Module]:
            return [TwoConv(in_chns=in_ch, out_chns=f[0], **blk)] + [
                Down(in_chns=f[i - 1], out_chns=f[i], **blk) for i in range(1, 5)
            ]

        self.image_encoder = _Encoder(stages(in_channels))
        tpl_in = in_channels if mask_as_separate_stream else in_channels + num_classes
        if share_weights:
            img = list(self.image_encoder.stages)
            first = img[0] if mask_as_separate_stream else stages(tpl_in)[0]
            self.template_encoder = _Encoder([first, *img[1:]])
        else:
            self.template_encoder = _Encoder(stages(tpl_in))
        # τ exists only where dense attention uses it, so every parameter receives a gradient
        if attention == "dense" and dense_scales > 0:
            self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        else:
            self.register_parameter("log_tau", None)
        self.fusions = nn.ModuleList(_Fusion(c, num_classes, fusion, gate_init) for c in f)
        self.decoder = nn.ModuleList(
            UpCat(in_chns=f[i], cat_chns=f[i - 1], out_chns=f[i - 1], **blk) for i in (4, 3, 2, 1)
        )
        self.head = nn.Conv2d(f[0], num_classes + 1, kernel_size=1)
        self.logit_bound = logit_bound
        self.prior_eps = prior_eps
        self.prior = prior
        self.align_tau = align_tau
        self.align_iterations = align_iterations
        self.align_scale = align_scale
        self.align_blur = align_blur
        self.evidence_gate = evidence_gate
        self.match_gate = match_gate
        self.match_quantiles = tuple(float(q) for q in match_quantiles)
        self.match_smooth = match_smooth
        self.match_relative = match_relative
        self.match_fill = match_fill
        self.match_tau = match_tau
        self.match_blur = match_blur
        self.match_grow_quantiles = (
            None if match_grow_quantiles is None else tuple(float(q) for q in match_grow_quantiles)
        )
        self.match_templates = int(match_templates)
        self.match_radius = int(match_radius)
        self.match_edge_sigma = float(match_edge_sigma)
        self.match_edge_range = float(match_edge_range)
        self.match_anomaly_quantile = float(match_anomaly_quantile)
        self.match_anomaly_sigma = float(match_anomaly_sigma)
        self.match_restore_iterations = int(match_restore_iterations)
        self.match_restore_weight = float(match_restore_weight)
        self.match_flat = bool(match_flat)
        self.match_flat_fraction = float(match_flat_fraction)
        self.anomaly: DenoisingAutoencoder | None = None
        self.restorer: DenoisingAutoencoder | None = None
        if match_gate:
            # thresholds of the match gate, set by calibrate_match_gate on clean training
            # pairs; until then the gate is open everywhere (cosines are >= -1 > -2)
            self.register_buffer("match_low", torch.tensor(-3.0))
            self.register_buffer("match_high", torch.tensor(-2.0))
            # embeddings of clean training images (M, prior_dim); empty until calibrated
            self.register_buffer("match_bank", torch.zeros(0, prior_dim))
            # the same images' embedding maps (N, prior_dim, h, w), for match_radius > 0
            self.register_buffer("match_bank_maps", torch.zeros(0, prior_dim, 1, 1))
            # hysteresis thresholds (below any cosine until calibrated: nothing grows)
            self.register_buffer("match_grow_low", torch.tensor(-3.0))
            self.register_buffer("match_grow_high", torch.tensor(-2.0))
            # atlas for the closed-gate prior: embeddings (N, prior_dim, h, w) and label maps
            # (N, H, W) of clean training images; empty until calibrated
            self.register_buffer("match_atlas_embeddings", torch.zeros(0, prior_dim, 1, 1))
            self.register_buffer("match_atlas_labels", torch.zeros(0, 1, 1, dtype=torch.uint8))
            if match_anomaly:
                # pixel-level anomaly evidence (anomaly.py), fitted on clean training images
                # by fit_anomaly; off (threshold +inf) until trained and calibrated
                self.anomaly = DenoisingAutoencoder(in_channels, anomaly_features)
                self.register_buffer("match_anomaly_trained", torch.tensor(False))
                self.register_buffer("match_anomaly_threshold", torch.tensor(math.inf))
                if match_restore_iterations > 0:
                    # a copy of the autoencoder fine-tuned to inpaint flat regions
                    # (fit_anomaly); the evidence keeps the plain denoiser, whose residual
                    # stays quiet under noise
                    self.restorer = DenoisingAutoencoder(in_channels, anomaly_features)
                    self.register_buffer("match_restore_trained", torch.tensor(False))
        if label_prior:
            self.prior_matcher = PriorMatcher(
                in_channels, prior_pool, prior_features, prior_dim, blk
            )
            # τ of the label transfer exists only where the transfer is used (every parameter
            # receives a gradient)
            if prior == "affine":
                self.register_parameter("log_prior_tau", None)
            else:
                self.log_prior_tau = nn.Parameter(torch.tensor(math.log(tau)))
            self.prior_weight = nn.Parameter(torch.tensor(float(prior_weight)))
        else:
            self.prior_matcher = None

    @property
    def tau(self) -> torch.Tensor:
        """Dense-attention temperature τ."""
        if self.log_tau is None:
            raise ValueError("tau is defined only for attention='dense' with dense_scales > 0")
        return self.log_tau.exp()

    def scale_attention(self, scale: int) -> str:
        """The attention used at encoder stage ``scale`` (0 = full resolution)."""
        if self.attention != "prototype" and scale >= 5 - self.dense_scales:
            return self.attention
        return "prototype"

    def encode_template(
        self, template: torch.Tensor, template_masks: torch.Tensor
    ) -> list[torch.Tensor]:
        """Template-encoder features at the five scales."""
        if template_masks.shape[1] != self.num_classes:
            raise ValueError(
                f"template_masks must have {self.num_classes} channels, "
                f"got {template_masks.shape[1]}"
            )
        x = template if self.mask_as_separate_stream else torch.cat([template, template_masks], 1)
        return self.template_encoder(x)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled bottleneck features of the image encoder, (B, C)."""
        return self.image_encoder(image)[-1].mean(dim=(2, 3))

    def attention_maps(
        self,
        feats: list[torch.Tensor],
        tfeats: list[torch.Tensor],
        template_masks: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Per-scale attention maps (B, K, h, w) from image and template features."""
        maps = []
        for s, (fe, te) in enumerate(zip(feats, tfeats)):
            # area downsampling keeps partial coverage of thin structures at coarse scales
            m = F.adaptive_avg_pool2d(template_masks.to(te.dtype), te.shape[-2:])
            kind = self.scale_attention(s)
            if kind == "dense":
                maps.append(dense_attention(fe, te, m, self.tau))
            elif kind == "max":
                maps.append(max_attention(fe, te, m))
            else:
                maps.append(prototype_attention(fe, te, m))
        return maps

    @property
    def has_label_prior(self) -> bool:
        """Whether the label prior is combined with the decoder's logits."""
        return self.prior_matcher is not None

    def label_prior_map(
        self,
        image_embedding: torch.Tensor,
        template: torch.Tensor,
        template_masks: torch.Tensor,
        size: Sequence[int],
        return_gate: bool = False,
        image: torch.Tensor | None = None,
        cues: ImageCues | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The template's labels transferred to the image, P (B, K + 1, *size), rows sum to 1.

        ``image_embedding`` is ``prior_matcher(image)``; background is channel 0. With
        ``return_gate`` also the evidence gate (B, 1, *size) (None without ``evidence_gate``
        or ``match_gate``). The match gate is snapped to the edges of ``image`` when given;
        with the anomaly evidence and ``match_flat`` it also reads ``image`` itself, through
        ``cues`` if given (:meth:`image_cues`, computed once for several templates).
        """
        temb = self.prior_matcher(template)
        masks = template_masks.to(temb.dtype)
        priors, gate = [], None
        if self.prior in ("attention", "both"):
            m = with_background(F.adaptive_avg_pool2d(masks, temb.shape[-2:]))
            b, _, h, w = image_embedding.shape
            sim = _pairwise_cosine(image_embedding, temb)
            p = _transfer(sim, m, self.log_prior_tau.exp()).reshape(b, -1, h, w)
            # contiguous: the attention output is a transposed view, which interpolate's
            # backward does not accept
            p = F.interpolate(
                p.contiguous(), size=tuple(size), mode="bilinear", align_corners=False
            )
            if self.match_gate:
                ev = self._evidence(image_embedding, sim)
                g, warped = self._match_gate_prior(
                    ev, sim, temb.shape[-2:], masks, size, image_embedding, image, cues
                )
                p = g * p + (1 - g) * warped
                gate = g
            priors.append(p)
        if self.prior in ("affine", "both"):
            theta, inliers = estimate_affine(
                image_embedding,
                temb,
                self.align_tau,
                self.align_iterations,
                self.align_scale,
                return_inliers=True,
            )
            if self.evidence_gate:
                g = F.interpolate(
                    inliers[:, None], size=tuple(size), mode="bilinear", align_corners=False
                )
                gate = g if gate is None else gate * g
            warped = warp_masks(masks, theta, tuple(size))
            warped = gaussian_blur(warped, self.align_blur * size[0])
            priors.append(with_background(warped))
        prior = priors[0] if len(priors) == 1 else sum(priors) / len(priors)
        return (prior, gate) if return_gate else prior

    def _evidence(self, image_embedding: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """Best-match cosine (B, 1, h, w) of every image position to the template's positions
        (``sim``) and to the memory bank of clean training embeddings; smoothed over
        ``match_smooth`` coarse pixels (an occluder is a blob, isolated low matches on clean
        anatomy are not) and, with ``match_relative``, minus its median over the image (a
        corruption that lowers every match, such as noise, does not close the gate; only
        regions less familiar than the rest of the image do)."""
        b, _, h, w = image_embedding.shape
        if self.match_radius > 0 and self.match_bank_maps.shape[0] > 0:
            maps = self.match_bank_maps
            if maps.shape[-2:] != (h, w):
                raise ValueError(
                    f"the match gate's bank was calibrated on {tuple(maps.shape[-2:])} coarse "
                    f"maps, got {(h, w)}: calibrate the match gate at this size"
                )
            ev = local_memory_evidence(image_embedding, maps, self.match_radius)
        else:
            ev = sim.amax(-1).reshape(b, h, w)
            if self.match_bank.shape[0] > 0:
                ev = torch.maximum(ev, memory_evidence(image_embedding, self.match_bank))
        ev = ev[:, None]
        if self.match_smooth > 0:
            # normalised: zero padding would lower the evidence at the border
            ones = torch.ones_like(ev[:1])
            ev = gaussian_blur(ev, self.match_smooth) / gaussian_blur(ones, self.match_smooth)
        if self.match_relative:
            ev = ev - ev.flatten(1).median(1).values[:, None, None, None]
        return ev

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the memory bank's and the atlas's sizes are set by calibration: take the stored ones
        if self.match_gate:
            for name in (
                "match_bank",
                "match_bank_maps",
                "match_atlas_embeddings",
                "match_atlas_labels",
            ):
                key = prefix + name
                if key in state_dict:
                    old = getattr(self, name)
                    setattr(self, name, torch.empty_like(state_dict[key], device=old.device))
                elif name != "match_bank":
                    # saved before the atlas and the hysteresis existed: keep them empty / off
                    state_dict[key] = getattr(self, name)
            for name in ("match_grow_low", "match_grow_high"):
                state_dict.setdefault(prefix + name, getattr(self, name).clone())
        if self.anomaly is not None and prefix + "match_anomaly_trained" not in state_dict:
            # saved before the anomaly evidence existed: load with it off (untrained, +inf)
            for key, value in self.anomaly.state_dict().items():
                state_dict.setdefault(f"{prefix}anomaly.{key}", value.clone())
            state_dict[prefix + "match_anomaly_trained"] = torch.tensor(False)
            state_dict[prefix + "match_anomaly_threshold"] = torch.tensor(math.inf)
        if self.restorer is not None and prefix + "match_restore_trained" not in state_dict:
            # saved before the restoration existed: load with it off (untrained)
            for key, value in self.restorer.state_dict().items():
                state_dict.setdefault(f"{prefix}restorer.{key}", value.clone())
            state_dict[prefix + "match_restore_trained"] = torch.tensor(False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _match_gate_prior(
        self,
        evidence: torch.Tensor,
        sim: torch.Tensor,
        template_hw: Sequence[int],
        masks: torch.Tensor,
        size: Sequence[int],
        image_embedding: torch.Tensor,
        image: torch.Tensor | None = None,
        cues: ImageCues | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The match gate g (B, 1, *size) and the prior used where it is closed: the template's
        full-resolution masks warped by the match displacement, with the displacement under
        low-evidence positions interpolated from the trusted ones around them (an occluder's
        own matches are wrong, but the anatomy around it still says where the template's
        structures lie); with an atlas, the mean of ``match_templates`` such warps. With
        ``image`` (B, C, *size), the upsampled gate follows its edges and closes on the
        image's own cues (``cues``, :meth:`image_cues` unless given)."""
        image_hw = evidence.shape[-2:]
        g = evidence_gate(evidence, self.match_low, self.match_high)
        if image is not None and cues is None:
            cues = self.image_cues(image, image_hw)
        flat = anomaly = None
        if cues is not None:
            flat, anomaly = cues
        if anomaly is not None:
            # the denoising autoencoder's residual flags what normal anatomy does not explain
            # (occluders the embedding finds familiar); such positions close the gate and seed
            # the hysteresis
            g = torch.where(anomaly > self.match_anomaly_threshold, torch.zeros_like(g), g)
        if self.match_grow_quantiles is not None:
            grown = grow_closed_regions(g, evidence, self.match_grow_high)
            ramp = evidence_gate(evidence, self.match_grow_low, self.match_grow_high)
            g = torch.where(grown & (g >= 0.5), torch.minimum(g, ramp), g)
        up = dict(size=tuple(size), mode="bilinear", align_corners=False)
        if image is not None and image.shape[-2:] != tuple(size):
            raise ValueError(f"image {tuple(image.shape)} does not match size {tuple(size)}")
        fill_gate = g
        if flat is not None:
            coarse = F.adaptive_avg_pool2d(flat, tuple(image_hw))
            g = reopen_explained(g, coarse > 0)
            # the displacement under a featureless region comes from the anatomy around it
            fill_gate = torch.where(coarse >= self.match_flat_fraction, torch.zeros_like(g), g)

        def warp(s: torch.Tensor, m: torch.Tensor, thw: Sequence[int]) -> torch.Tensor:
            disp = match_displacement(s, image_hw, thw, self.match_tau)
            disp = fill_low_evidence(disp, fill_gate, self.match_fill * image_hw[0])
            return warp_by_displacement(m, F.interpolate(disp, **up))

        if self.match_templates > 1 and self.match_atlas_labels.shape[0] > 0:
            warped = self._atlas_warp(image_embedding, fill_gate, size, warp)
        else:
            warped = warp(sim, masks, template_hw)
        warped = with_background(gaussian_blur(warped, self.match_blur * size[0]))
        g = F.interpolate(g, **up)
        # an open gate stays open (and training, before calibration, pays nothing)
        if image is not None and self.match_edge_sigma > 0 and bool(g.min() < 1):
            g = joint_bilateral_filter(
                g, image, self.match_edge_sigma * size[0], self.match_edge_range
            )
        if flat is not None:
            g = torch.minimum(g, 1 - flat)
        return g, warped

    def _atlas_warp(self, image_embedding, gate, size, warp) -> torch.Tensor:
        """Mean of the atlas masks warped by their own match displacements, over the
        ``match_templates`` atlas entries whose best-match cosine, averaged over the positions
        where the gate is open, is highest for each image: several subjects' shapes average
        out where the single template's shape is wrong."""
        atlas = self.match_atlas_embeddings
        labels = self.match_atlas_labels
        if atlas.shape[-2:] != image_embedding.shape[-2:] or labels.shape[-2:] != tuple(size):
            raise ValueError(
                f"the match atlas was calibrated on {tuple(labels.shape[-2:])} images, got "
                f"{tuple(size)}: calibrate the match gate at this size"
            )
        b = image_embedding.shape[0]
        # a small floor: where the gate is closed everywhere, every position votes alike
        w = gate.flatten(1) + 1e-3
        w = w / w.sum(1, keepdim=True)
        # one atlas entry at a time: all at once would need B * N * (hw)^2 similarities
        scores = torch.stack(
            [
                (_pairwise_cosine(image_embedding, a[None].expand(b, -1, -1, -1)).amax(-1) * w).sum(
                    1
                )
                for a in atlas
            ],
            1,
        )
        top = scores.topk(min(self.match_templates, atlas.shape[0]), dim=1).indices
        total = 0.0
        for r in range(top.shape[1]):
            idx = top[:, r]
            temb = atlas[idx].to(image_embedding.dtype)
            masks = F.one_hot(labels[idx].long(), self.num_classes + 1)[..., 1:]
            masks = masks.permute(0, 3, 1, 2).to(image_embedding.dtype)
            total = total + warp(_pairwise_cosine(image_embedding, temb), masks, temb.shape[-2:])
        return total / top.shape[1]

    @property
    def anomaly_active(self) -> bool:
        """Whether the anomaly evidence closes the match gate (trained and calibrated)."""
        return self.anomaly is not None and bool(torch.isfinite(self.match_anomaly_threshold))

    @property
    def restore_active(self) -> bool:
        """Whether a closed gate's region is restored and segmented again (anomaly evidence
        active and ``match_restore_iterations`` > 0)."""
        return (
            self.restorer is not None
            and self.match_restore_iterations > 0
            and bool(self.match_restore_trained)
            and self.anomaly_active
        )

    def image_cues(self, image: torch.Tensor, coarse_hw: Sequence[int]) -> ImageCues:
        """The cues the match gate reads from ``image`` alone: its featureless regions (with
        ``match_flat``) and the anomaly evidence on the ``coarse_hw`` grid (when active)."""
        return ImageCues(
            featureless_regions(image) if self.match_flat else None,
            self.anomaly_evidence(image, coarse_hw) if self.anomaly_active else None,
        )

    def anomaly_evidence(self, image: torch.Tensor, coarse_hw: Sequence[int]) -> torch.Tensor:
        """The denoising autoencoder's standardised residual evidence (B, 1, *coarse_hw) of
        ``image`` (B, C, H, W), area-pooled to the match gate's grid
        (:meth:`~scaledl.medical.anomaly.DenoisingAutoencoder.residual_evidence`)."""
        if self.anomaly is None:
            raise ValueError("anomaly_evidence needs match_gate=True and match_anomaly=True")
        h, w = image.shape[-2:]
        if h % coarse_hw[0] or w % coarse_hw[1] or h // coarse_hw[0] != w // coarse_hw[1]:
            raise ValueError(f"coarse grid {tuple(coarse_hw)} must tile the image {(h, w)}")
        return self.anomaly.residual_evidence(
            image, self.match_anomaly_sigma * h, pool=h // coarse_hw[0]
        )

    def fit_anomaly(
        self,
        images: torch.Tensor,
        iterations: int = 600,
        seed: int = 0,
        device: str | torch.device = "cpu",
        inpaint_iterations: int | None = None,
        **kwargs,
    ) -> list[float]:
        """Train the anomaly evidence's denoising autoencoder on *clean* training ``images``
        (N, C, H, W) (:func:`~scaledl.medical.anomaly.train_denoising_autoencoder`, further
        options in ``kwargs``): ``iterations`` restoring coarse noise, then
        ``inpaint_iterations`` (default 5/6 of ``iterations``) at half the learning rate
        restoring flat blobs as well, fine-tune a copy of it as the ``restorer`` that inpaints
        the anatomy under a flat region (for
        :meth:`~scaledl.medical.anomaly.DenoisingAutoencoder.restore`; skipped without
        ``match_restore_iterations``). :meth:`calibrate_match_gate` then sets the evidence's
        threshold on clean images the autoencoder has not seen. Returns the loss per
        iteration of both stages."""
        if self.anomaly is None:
            raise ValueError("fit_anomaly needs match_gate=True and match_anomaly=True")
        if inpaint_iterations is None:
            inpaint_iterations = round(iterations * 5 / 6)
        if inpaint_iterations < 0:
            raise ValueError(f"inpaint_iterations must be >= 0, got {inpaint_iterations}")
        losses = train_denoising_autoencoder(
            self.anomaly, images, iterations, seed=seed, device=device, **kwargs
        )
        if self.restorer is not None and inpaint_iterations > 0:
            self.restorer.load_state_dict(self.anomaly.state_dict())
            kwargs["lr"] = kwargs.get("lr", 2e-3) / 2
            kwargs.setdefault("blob_threshold", 0.9)
            losses += train_denoising_autoencoder(
                self.restorer, images, inpaint_iterations, seed=seed, device=device, **kwargs
            )
            self.match_restore_trained.fill_(True)
        self.match_anomaly_trained.fill_(True)
        self.match_anomaly_threshold.fill_(math.inf)  # stale until recalibrated
        return losses

    @torch.no_grad()
    def match_evidence(self, image: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        """The match gate's evidence per coarse position (B, h, w): the best cosine of the
        matcher's embedding of ``image`` to any position of ``template`` and, once calibrated,
        of the memory bank of clean training embeddings."""
        if not self.match_gate:
            raise ValueError("match_evidence needs match_gate=True")
        emb = self.prior_matcher(image)
        sim = _pairwise_cosine(emb, self.prior_matcher(template))
        return self._evidence(emb, sim)[:, 0]

    @torch.no_grad()
    def calibrate_match_gate(
        self,
        images: torch.Tensor,
        templates: torch.Tensor,
        bank_images: torch.Tensor | None = None,
        bank_size: int = 16384,
        generator: torch.Generator | None = None,
        atlas_images: torch.Tensor | None = None,
        atlas_masks: torch.Tensor | None = None,
    ) -> tuple[float, float]:
        """Calibrate the match gate on *clean* data (no corrupted image is needed).

        ``bank_images`` (clean training images) fill the memory bank with their embeddings,
        at most ``bank_size`` positions drawn at random (with ``match_radius`` > 0 also their
        whole embedding maps, for the positional evidence); then ``low`` and ``high`` are set to
        the ``match_quantiles`` of the evidence over all positions of the (image, template)
        pairs, so the gate is open on all but the lowest clean tail (the hysteresis thresholds
        likewise at ``match_grow_quantiles``). The calibration images should not be in the
        bank (their own embeddings would match perfectly). ``atlas_images`` (N, C, H, W) and
        their one-hot foreground ``atlas_masks`` (N, K, H, W), clean training images, become the
        atlas of the closed-gate prior (``match_templates`` > 1).

        images, templates: (N, C, H, W) paired row by row. Returns (low, high).
        """
        if not self.match_gate:
            raise ValueError("calibrate_match_gate needs match_gate=True")
        if images.shape != templates.shape:
            raise ValueError(
                f"images {tuple(images.shape)} and templates {tuple(templates.shape)} must pair"
            )
        if bank_size < 1:
            raise ValueError(f"bank_size must be >= 1, got {bank_size}")
        was_training = self.training
        self.eval()
        if bank_images is not None:
            maps = torch.cat(
                [
                    self.prior_matcher(bank_images[i : i + 32])
                    for i in range(0, bank_images.shape[0], 32)
                ]
            )
            if self.match_radius > 0:
                # positional evidence keeps every bank image's whole map
                self.match_bank_maps = F.normalize(maps.float(), dim=1)
            emb = maps.flatten(2).transpose(1, 2).reshape(-1, self.match_bank.shape[1])
            if emb.shape[0] > bank_size:
                keep = torch.randperm(emb.shape[0], generator=generator)[:bank_size]
                emb = emb[keep.to(emb.device)]
            self.match_bank = F.normalize(emb.float(), dim=1)
        if atlas_images is not None:
            self._set_atlas(atlas_images, atlas_masks)
        ev = torch.cat(
            [
                self.match_evidence(images[i : i + 32], templates[i : i + 32]).flatten()
                for i in range(0, images.shape[0], 32)
            ]
        ).float()
        if self.anomaly is not None and bool(self.match_anomaly_trained):
            # calibration images should be held out from the autoencoder's training images
            hw = self.prior_matcher(images[:1]).shape[-2:]
            a = torch.cat(  # in chunks, like the match evidence: a large set fits in memory
                [
                    self.anomaly_evidence(images[i : i + 32], hw).flatten()
                    for i in range(0, images.shape[0], 32)
                ]
            )
            self.match_anomaly_threshold.fill_(
                float(torch.quantile(a.flatten().cpu(), self.match_anomaly_quantile))
            )
        self.train(was_training)
        qs = list(self.match_quantiles) + list(self.match_grow_quantiles or ())
        values = torch.quantile(ev.cpu(), torch.tensor(qs)).tolist()
        lo, hi = values[:2]
        lo = min(lo, hi - 1e-4)  # a degenerate (constant) distribution still gives a ramp
        self.match_low.fill_(lo)
        self.match_high.fill_(hi)
        if self.match_grow_quantiles is not None:
            self.match_grow_low.fill_(min(values[2], values[3] - 1e-4))
            self.match_grow_high.fill_(values[3])
        return lo, hi

    def _set_atlas(self, images: torch.Tensor, masks: torch.Tensor | None) -> None:
        """Store the embeddings and label maps of clean training images (the atlas)."""
        if masks is None or masks.shape[0] != images.shape[0] or masks.ndim != 4:
            raise ValueError("atlas_images need atlas_masks (N, K, H, W), one per image")
        if masks.shape[1] != self.num_classes or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"atlas_masks must be (N, {self.num_classes}, *image size), "
                f"got {tuple(masks.shape)}"
            )
        self.match_atlas_embeddings = torch.cat(
            [self.prior_matcher(images[i : i + 32]) for i in range(0, images.shape[0], 32)]
        ).float()
        # label maps (0 = background) take a 16th of the one-hot masks' space
        fg = masks.float()
        labels = (fg.argmax(1) + 1) * (fg.sum(1) > 0.5)
        self.match_atlas_labels = labels.to(torch.uint8)

    def align(
        self, image_embedding: torch.Tensor, template_embedding: torch.Tensor
    ) -> torch.Tensor:
        """The global affine template -> image alignment (B, 2, 3) of :func:`estimate_affine`."""
        return estimate_affine(
            image_embedding,
            template_embedding,
            self.align_tau,
            self.align_iterations,
            self.align_scale,
        )

    def combine(
        self,
        logits: torch.Tensor,
        prior: torch.Tensor | None,
        gate: torch.Tensor | None = None,
        closed_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Product of experts: g·c·tanh(z / c) + β·log max(P, ε) (just z without a prior); the
        evidence gate g (B, 1, H, W) is 1 unless given. With ``closed_logits`` z' (the
        prediction on the restored image) and a gate, (1 − g)·w·c·tanh(z' / c) is added (w:
        ``match_restore_weight``)."""
        if prior is None:
            return logits

        def bound(z: torch.Tensor) -> torch.Tensor:
            return self.logit_bound * torch.tanh(z / self.logit_bound) if self.logit_bound else z

        logits = bound(logits)
        if gate is not None:
            logits = gate * logits
            if closed_logits is not None:
                logits = logits + (1 - gate) * self.match_restore_weight * bound(closed_logits)
        return logits + self.prior_weight * torch.log(prior.clamp_min(self.prior_eps))

    def decode(
        self,
        feats: list[torch.Tensor],
        tfeats: list[torch.Tensor],
        template_masks: torch.Tensor,
        prior: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fuse attention into the image skips, run the U-Net decoder and combine the result
        with the label ``prior`` (and evidence ``gate``) when given; returns logits. With the
        ``image`` the features came from and a closed gate somewhere, the image restored there
        is segmented again (``match_restore_iterations``) for the closed region."""
        maps = self.attention_maps(feats, tfeats, template_masks)
        fused = [fuse(fe, a) for fuse, fe, a in zip(self.fusions, feats, maps)]
        x = fused[4]
        for up, skip in zip(self.decoder, (fused[3], fused[2], fused[1], fused[0])):
            x = up(x, skip)
        closed = None
        if image is not None and gate is not None and self.restore_active and gate.min() < 1:
            # the segmenter is reliable on clean anatomy: under the closed gate it reads the
            # anatomy the autoencoder infers there rather than the occluder
            restored = self.restorer.restore(image, gate, self.match_restore_iterations)
            closed = self.decode(self.image_encoder(restored), tfeats, template_masks)
        return self.combine(self.head(x), prior, gate, closed)

    def forward_with_prior(
        self, image: torch.Tensor, template: torch.Tensor, template_masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and the label prior P (None without ``label_prior``), e.g. for a prior loss."""
        if image.shape[0] != template.shape[0] or template.shape[0] != template_masks.shape[0]:
            raise ValueError("image, template and template_masks must have the same batch size")
        tfeats = self.encode_template(template, template_masks)
        prior = gate = None
        if self.has_label_prior:
            emb = self.prior_matcher(image)
            prior, gate = self.label_prior_map(
                emb, template, template_masks, image.shape[-2:], return_gate=True, image=image
            )
        feats = self.image_encoder(image)
        return self.decode(feats, tfeats, template_masks, prior, gate, image), prior

    def forward(
        self, image: torch.Tensor, template: torch.Tensor, template_masks: torch.Tensor
    ) -> torch.Tensor:
        return self.forward_with_prior(image, template, template_masks)[0]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.pt`` (the state dict) into folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config, indent=2))
        torch.save(self.state_dict(), path / "model.pt")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ShapePriorNet:
        """Rebuild a network written by :meth:`save_pretrained`."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a saved ShapePriorNet (no config.json)")
        cfg = json.loads((path / "config.json").read_text())
        # JSON turns the (name, kwargs) block options into lists; MONAI wants tuples
        for key in ("norm", "act"):
            if isinstance(cfg.get(key), list):
                cfg[key] = tuple(cfg[key])
        # folders saved before the label prior existed hold networks without it
        cfg.setdefault("label_prior", False)
        net = cls(**cfg)
        net.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
        return net

    @torch.no_grad()
    def predict_proba(
        self, image: torch.Tensor, templates: torch.Tensor, template_masks: torch.Tensor
    ) -> torch.Tensor:
        """Softmax averaged over n templates per image (the image is encoded once).

        image: (B, C, H, W); templates: (B, n, C, H, W); template_masks: (B, n, K, H, W).
        """
        if templates.ndim != 5 or template_masks.ndim != 5:
            raise ValueError("templates and template_masks must be (B, n, C, H, W)")
        feats = self.image_encoder(image)
        emb = self.prior_matcher(image) if self.has_label_prior else None
        # what the gate reads from the image is the same for every template
        cues = (
            self.image_cues(image, emb.shape[-2:]) if emb is not None and self.match_gate else None
        )
        probs = 0.0
        n = templates.shape[1]
        for j in range(n):
            t, m = templates[:, j], template_masks[:, j]
            prior = gate = None
            if emb is not None:
                prior, gate = self.label_prior_map(
                    emb, t, m, image.shape[-2:], return_gate=True, image=image, cues=cues
                )
            logits = self.decode(feats, self.encode_template(t, m), m, prior, gate, image)
            probs = probs + torch.softmax(logits, 1)
        return probs / n
