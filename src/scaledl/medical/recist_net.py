"""RECIST-Net (arXiv 2107.08715): lesions as the four RECIST endpoints plus the centre.

A one-stage, anchor-free keypoint detector on ExtremeNet/CenterNet machinery (a reference
design: the paper's backbone and hyper-parameters are not public):

- a backbone at ``stride`` 4 (default: a light U-Net that trains on CPU; ``"hourglass"``
  for the stacked-hourglass layout; or any ``nn.Module`` with ``out_channels`` and
  ``stride`` attributes);
- heads (3×3 conv + ReLU + 1×1 conv): five heatmaps (long_a, long_b, short_a, short_b,
  centre) and sub-pixel offsets for the four endpoints (optionally the centre);
- targets: one Gaussian radius per lesion from CornerNet's ``gaussian_radius`` on the box of
  the endpoints, σ = diameter / 6, the same radius on all five maps, overlaps combined by
  element-wise max; offsets are the remainders at the integer peaks;
- loss: CornerNet focal loss (α=2, β=4) per map plus L1 offsets at the peaks.

Decoding (grouping the keypoints into lesions) lives in :mod:`scaledl.medical.recist_decode`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scaledl.medical.recist_geometry import canonicalize_recist, recist_center

KEYPOINTS = ("long_a", "long_b", "short_a", "short_b")
N_MAPS = len(KEYPOINTS) + 1  # + centre
CONFIG_NAME = "config.json"
#: A point's heatmap cell is floor(x / stride + CELL_EPS): the tolerance keeps round-off
#: (a centre recomputed from decoded endpoints) from moving it across a cell border.
CELL_EPS = 1e-6
WEIGHTS_NAME = "model.pt"


# --------------------------------------------------------------------------- targets


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CornerNet's Gaussian radius for a ``height`` × ``width`` box (heatmap pixels).

    The smallest of three radii for which a pair of corners displaced by it still gives a box
    with IoU ``min_overlap`` (the three cases: both corners inside, both outside, one of
    each). Ported as CornerNet/CenterNet compute it, including their use of ``/ 2`` as the
    root's denominator, so that the targets match those models.
    """
    if height < 0 or width < 0:
        raise ValueError(f"box size must be non-negative, got {(height, width)}")
    if not 0 < min_overlap < 1:
        raise ValueError(f"min_overlap must be in (0, 1), got {min_overlap}")
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def draw_gaussian(heatmap: np.ndarray, cx: int, cy: int, radius: int) -> None:
    """Element-wise max of ``heatmap`` with a Gaussian (σ = (2r+1)/6) peaking at 1 on (cx, cy)."""
    d = 2 * radius + 1
    sigma = d / 6
    ys, xs = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    g = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma))
    g[g < np.finfo(g.dtype).eps * g.max()] = 0
    h, w = heatmap.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    if right <= 0 or bottom <= 0 or left < 0 or top < 0:
        return
    region = heatmap[cy - top : cy + bottom, cx - left : cx + right]
    patch = g[radius - top : radius + bottom, radius - left : radius + right]
    np.maximum(region, patch, out=region)


def keypoints_with_center(points: np.ndarray, center_mode: str = "intersection") -> np.ndarray:
    """``(n, 4, 2)`` RECIST endpoints -> ``(n, 5, 2)`` with the centre appended."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 4, 2)
    return np.concatenate([p, recist_center(p, center_mode)[:, None, :]], axis=1)


def encode_targets(
    points: Sequence[np.ndarray],
    image_size: tuple[int, int],
    stride: int = 4,
    *,
    center_mode: str = "intersection",
    min_overlap: float = 0.7,
    min_radius: int = 0,
    offset_radius: int = 0,
) -> dict[str, np.ndarray]:
    """Training targets for a batch: per image, ``(n_i, 4, 2)`` endpoints in input pixels.

    Returns ``heatmap (B, 5, h, w)`` with ``h, w = ceil(image_size / stride)``, and the
    offsets sparsely (a dense map would be mostly zeros to copy to the device every step):

    - ``peaks (N, 4)`` int64 rows ``(image, keypoint, iy, ix)`` (keypoint 4 is the centre)
      and ``offsets (N, 2)`` the sub-pixel remainders ``(x - ix, y - iy)`` there;
    - ``offset_cells (M, 4)`` and ``offset_targets (M, 2)``: where the offset head is trained,
      the peaks and every cell within ``offset_radius`` (Chebyshev) of them, each with the
      vector ``(x - jx, y - jy)`` from that cell to the exact point, so that a peak found
      one cell off still decodes to the exact point. ``offset_radius=0`` (the default) is
      CenterNet's peak-only offsets: in a controlled CPU comparison the wider regression
      trained more slowly and decoded worse. A cell near two points of one map points to
      the nearer one.
    """
    if offset_radius < 0:
        raise ValueError(f"offset_radius must be non-negative, got {offset_radius}")
    H, W = image_size
    h, w = math.ceil(H / stride), math.ceil(W / stride)
    B = len(points)
    hm = np.zeros((B, N_MAPS, h, w), np.float32)
    peaks: list[tuple[int, int, int, int]] = []
    offs: list[tuple[float, float]] = []
    # (image, keypoint, jy, jx) -> (squared distance to the point, dx, dy)
    cells: dict[tuple[int, int, int, int], tuple[float, float, float]] = {}
    r_off = range(-offset_radius, offset_radius + 1)
    for b, pts in enumerate(points):
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 4, 2)
        if not np.all(np.isfinite(p)):
            raise ValueError(f"image {b}: RECIST points contain NaN or inf")
        kp = keypoints_with_center(canonicalize_recist(p), center_mode) / stride  # (n, 5, 2)
        for lesion in kp:
            lo, hi = lesion[:4].min(0), lesion[:4].max(0)
            r = max(min_radius, int(gaussian_radius(hi[1] - lo[1], hi[0] - lo[0], min_overlap)))
            for k, (x, y) in enumerate(lesion):
                ix, iy = math.floor(x + CELL_EPS), math.floor(y + CELL_EPS)
                if not (0 <= ix < w and 0 <= iy < h):
                    continue
                draw_gaussian(hm[b, k], ix, iy, r)
                peaks.append((b, k, iy, ix))
                offs.append((x - ix, y - iy))
                for jy in (iy + d for d in r_off if 0 <= iy + d < h):
                    for jx in (ix + d for d in r_off if 0 <= ix + d < w):
                        dx, dy = x - jx, y - jy
                        d2 = (dx - 0.5) ** 2 + (dy - 0.5) ** 2  # from the cell's centre
                        key = (b, k, jy, jx)
                        if key not in cells or d2 < cells[key][0]:
                            cells[key] = (d2, dx, dy)
    return {
        "heatmap": hm,
        "peaks": np.array(peaks, dtype=np.int64).reshape(-1, 4),
        "offsets": np.array(offs, dtype=np.float32).reshape(-1, 2),
        "offset_cells": np.array(list(cells), dtype=np.int64).reshape(-1, 4),
        "offset_targets": np.array([v[1:] for v in cells.values()], np.float32).reshape(-1, 2),
    }


def dense_offsets(targets: dict[str, np.ndarray], n_keypoints: int = 4) -> np.ndarray:
    """The sparse offset targets (``offset_cells``) as a ``(B, 2 * n_keypoints, h, w)`` map
    (zeros elsewhere), the layout of the offset head's output."""
    B, _, h, w = targets["heatmap"].shape
    out = np.zeros((B, 2 * n_keypoints, h, w), np.float32)
    for (b, k, iy, ix), (dx, dy) in zip(targets["offset_cells"], targets["offset_targets"]):
        if k < n_keypoints:
            out[b, 2 * k : 2 * k + 2, iy, ix] = (dx, dy)
    return out


# --------------------------------------------------------------------------- losses


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0):
    """CornerNet focal loss summed over maps: each map normalised by its own positives.

    ``logits`` and ``target`` are ``(B, M, h, w)``; a map with no positive uses the negative
    term alone. Probabilities are clamped to [1e-4, 1 - 1e-4] as in CenterNet.
    """
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    t = target.float()
    pos = t.eq(1).float()
    neg = 1.0 - pos
    pos_term = (torch.log(p) * (1 - p) ** alpha * pos).sum(dim=(0, 2, 3))
    neg_term = (torch.log(1 - p) * p**alpha * (1 - t) ** beta * neg).sum(dim=(0, 2, 3))
    n_pos = pos.sum(dim=(0, 2, 3))
    per_map = torch.where(n_pos > 0, -(pos_term + neg_term) / n_pos.clamp(min=1), -neg_term)
    return per_map.sum()


def offset_l1_loss(pred: torch.Tensor, peaks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """L1 on offsets at the ground-truth peaks, summed and divided by the number of entries.

    ``pred`` is ``(B, 2K, h, w)``; ``peaks`` ``(N, 4)`` rows ``(image, keypoint, iy, ix)``
    (rows with ``keypoint >= K`` are ignored) and ``offsets`` ``(N, 2)``.
    """
    keep = peaks[:, 1] < pred.shape[1] // 2
    b, k, iy, ix = peaks[keep].unbind(1)
    sel = torch.stack([pred[b, 2 * k, iy, ix], pred[b, 2 * k + 1, iy, ix]], dim=1).float()
    return torch.abs(sel - offsets[keep]).sum() / (2 * keep.sum() + 1e-4)


# --------------------------------------------------------------------------- backbones


def _conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetBackbone(nn.Module):
    """A light U-Net: ``levels`` stride-2 stages down from the input, decoded back to ``stride``.

    With ``width=32`` it has about 1-2 M parameters and trains on CPU.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, levels: int = 5, stride: int = 4):
        super().__init__()
        if stride not in (1, 2, 4, 8) or 2 ** (levels - 1) < stride:
            raise ValueError(f"stride must be 1, 2, 4 or 8 and at most 2**(levels-1), got {stride}")
        chans = [min(width * 2**i, width * 8) for i in range(levels)]
        self.stem = _conv_block(in_channels, chans[0])
        self.down = nn.ModuleList(_conv_block(chans[i - 1], chans[i], 2) for i in range(1, levels))
        n_up = levels - 1 - int(math.log2(stride))
        self.up = nn.ModuleList(
            _conv_block(chans[levels - 1 - i] + chans[levels - 2 - i], chans[levels - 2 - i])
            for i in range(n_up)
        )
        self.out_channels = chans[levels - 1 - n_up]
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for d in self.down:
            feats.append(d(feats[-1]))
        y = feats[-1]
        for i, u in enumerate(self.up):
            skip = feats[-2 - i]
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = u(torch.cat([y, skip], dim=1))
        return y


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class _Hourglass(nn.Module):
    def __init__(self, dims: Sequence[int], modules: Sequence[int]):
        super().__init__()
        c, c2 = dims[0], dims[1]
        self.up1 = nn.Sequential(*[_Residual(c, c) for _ in range(modules[0])])
        self.low1 = nn.Sequential(
            _Residual(c, c2, 2), *[_Residual(c2, c2) for _ in range(modules[0] - 1)]
        )
        self.low2 = (
            _Hourglass(dims[1:], modules[1:])
            if len(dims) > 2
            else nn.Sequential(*[_Residual(c2, c2) for _ in range(modules[1])])
        )
        self.low3 = nn.Sequential(
            *[_Residual(c2, c2) for _ in range(modules[0] - 1)], _Residual(c2, c)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low3(self.low2(self.low1(x)))
        return self.up1(x) + F.interpolate(low, size=x.shape[-2:], mode="nearest")


class HourglassBackbone(nn.Module):
    """Stacked hourglass at stride 4 (CornerNet/ExtremeNet layout; one or more stacks).

    Hourglass-104 is ``dims=(256, 256, 384, 384, 384, 512)``, ``modules=(2, 2, 2, 2, 2, 4)``,
    ``stacks=2``, ``cnv_dim=256``. Only the last stack feeds the heads here (no intermediate
    supervision) to keep the interface one feature map.
    """

    def __init__(
        self,
        in_channels: int = 1,
        dims: Sequence[int] = (64, 64, 96, 96, 128),
        modules: Sequence[int] = (1, 1, 1, 1, 2),
        stacks: int = 1,
        cnv_dim: int = 64,
    ):
        super().__init__()
        if len(dims) != len(modules) or len(dims) < 2:
            raise ValueError("dims and modules must have the same length (>= 2)")
        self.pre = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            _Residual(64, dims[0], 2),
        )
        self.hgs = nn.ModuleList(_Hourglass(dims, modules) for _ in range(stacks))
        self.cnvs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[0], cnv_dim, 3, 1, 1), nn.ReLU(inplace=True))
            for _ in range(stacks)
        )
        self.inters = nn.ModuleList(_Residual(cnv_dim, dims[0]) for _ in range(stacks - 1))
        self.out_channels = cnv_dim
        self.stride = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        y = x
        for i, (hg, cnv) in enumerate(zip(self.hgs, self.cnvs)):
            y = cnv(hg(x))
            if i < len(self.inters):
                x = self.inters[i](y) + x
        return y


# --------------------------------------------------------------------------- model


@dataclass
class RECISTNetConfig:
    """Everything needed to rebuild a :class:`RECISTNet` (saved as ``config.json``)."""

    in_channels: int = 1
    backbone: str = "unet"  # "unet" | "hourglass"
    width: int = 32
    levels: int = 5
    stride: int = 4
    head_channels: int = 64
    center_offset: bool = False
    center_mode: str = "intersection"
    keypoint_mode: str = "recist4"
    min_overlap: float = 0.7
    min_radius: int = 0
    offset_radius: int = 0
    offset_weight: float = 1.0
    hourglass: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keypoint_mode != "recist4":
            raise ValueError(
                f"keypoint_mode {self.keypoint_mode!r} is not supported; only 'recist4' "
                "(long_a, long_b, short_a, short_b) is implemented"
            )
        if self.center_mode not in ("intersection", "bbox", "mean"):
            raise ValueError(
                f"center_mode must be intersection, bbox or mean, got {self.center_mode!r}"
            )
        if self.backbone not in ("unet", "hourglass"):
            raise ValueError(f"backbone must be 'unet' or 'hourglass', got {self.backbone!r}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {self.in_channels}")


def _head(cin: int, mid: int, cout: int, bias: float = 0.0) -> nn.Sequential:
    head = nn.Sequential(
        nn.Conv2d(cin, mid, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(mid, cout, 1)
    )
    nn.init.constant_(head[-1].bias, bias)
    return head


class RECISTNet(nn.Module):
    """Keypoint detector: ``forward(x)`` returns ``{"heatmap": logits (B, 5, h, w),
    "offset": (B, 8 or 10, h, w)}`` at ``stride``; :meth:`loss` trains it and :meth:`detect`
    groups keypoints into lesions.

    Args:
        config: a :class:`RECISTNetConfig` (or keyword overrides of its fields).
        backbone_module: optionally a custom ``nn.Module`` with ``out_channels`` and ``stride``
            (replaces the configured backbone).
    """

    def __init__(
        self,
        config: RECISTNetConfig | None = None,
        backbone_module: nn.Module | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        self.config = config if config is not None else RECISTNetConfig(**kwargs)
        c = self.config
        backbone = backbone_module
        if backbone is None:
            if c.backbone == "unet":
                backbone = UNetBackbone(c.in_channels, c.width, c.levels, c.stride)
            else:
                backbone = HourglassBackbone(c.in_channels, **c.hourglass)
        for attr in ("out_channels", "stride"):
            if not hasattr(backbone, attr):
                raise ValueError(f"a custom backbone needs an integer attribute {attr!r}")
        self.backbone = backbone
        self.stride = int(backbone.stride)
        n_off = 2 * (N_MAPS if c.center_offset else len(KEYPOINTS))
        # CenterNet's prior: start every heatmap near p = 0.1 so the focal loss is stable
        self.heatmap_head = _head(backbone.out_channels, c.head_channels, N_MAPS, bias=-2.19)
        self.offset_head = _head(backbone.out_channels, c.head_channels, n_off)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        f = self.backbone(x)
        return {"heatmap": self.heatmap_head(f), "offset": self.offset_head(f)}

    def encode(self, points: Sequence[np.ndarray], image_size: tuple[int, int]):
        """Targets for this model's stride and centre mode (see :func:`encode_targets`)."""
        c = self.config
        return encode_targets(
            points,
            image_size,
            self.stride,
            center_mode=c.center_mode,
            min_overlap=c.min_overlap,
            min_radius=c.min_radius,
            offset_radius=c.offset_radius,
        )

    def loss(
        self, outputs: dict[str, torch.Tensor], targets: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "focal", "offset"}``: Σ of 5 focal terms + ``offset_weight`` × L1 offsets."""
        dev = outputs["heatmap"].device
        t = {k: torch.as_tensor(v, device=dev) for k, v in targets.items()}
        if t["heatmap"].shape != outputs["heatmap"].shape:
            raise ValueError(
                f"target heatmap {tuple(t['heatmap'].shape)} does not match the output "
                f"{tuple(outputs['heatmap'].shape)}; build targets with model.encode"
            )
        focal = focal_loss(outputs["heatmap"], t["heatmap"])
        off = offset_l1_loss(outputs["offset"], t["offset_cells"], t["offset_targets"])
        total = focal + self.config.offset_weight * off
        return {"loss": total, "focal": focal.detach(), "offset": off.detach()}

    @torch.no_grad()
    def detect(
        self,
        images: torch.Tensor,
        spacing: Sequence[Any] | np.ndarray | float | None,
        **decode_kwargs: Any,
    ) -> list[list[Any]]:
        """Detect lesions in windowed images ``(B, C, H, W)``; returns per image a list of
        :class:`~scaledl.medical.recist_decode.RECISTDetection` (diameters in px and mm).
        """
        from scaledl.medical.recist_decode import decode_batch

        was_training = self.training
        self.eval()
        try:
            out = self(images)
        finally:
            self.train(was_training)
        decode_kwargs.setdefault("center_mode", self.config.center_mode)
        decode_kwargs.setdefault("vote", self.config.offset_radius)
        return decode_batch(
            torch.sigmoid(out["heatmap"]), out["offset"], stride=self.stride, spacing=spacing,
            **decode_kwargs,
        )  # fmt: skip

    # ---- persistence, the from_pretrained / save_pretrained convention
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.pt`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        torch.save(self.state_dict(), d / WEIGHTS_NAME)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | None = "cpu") -> RECISTNet:
        """Rebuild a model written by :meth:`save_pretrained` (no download)."""
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{d} is not a saved RECISTNet (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        model = cls(RECISTNetConfig(**json.loads((d / CONFIG_NAME).read_text())))
        state = torch.load(d / WEIGHTS_NAME, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        return model
