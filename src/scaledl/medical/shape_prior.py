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
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

ATTENTIONS = ("prototype", "dense", "max")
FUSIONS = ("concat", "gate", "both")


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


def dense_attention(
    feat: torch.Tensor, tfeat: torch.Tensor, masks: torch.Tensor, tau: torch.Tensor | float
) -> torch.Tensor:
    """Template masks transferred by soft feature matching: Σ_y softmax_y(τ S(x, y)) M_k(y)."""
    b, _, h, w = feat.shape
    weights = torch.softmax(tau * _pairwise_cosine(feat, tfeat), dim=-1)
    out = weights @ masks.flatten(2).transpose(1, 2)  # (B, hw, K)
    return out.transpose(1, 2).reshape(b, masks.shape[1], h, w)


def max_attention(feat: torch.Tensor, tfeat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """max_{y in M_k} cos(F(x), T(y)); 0 for a class absent from the template at this scale."""
    b, _, h, w = feat.shape
    sim = _pairwise_cosine(feat, tfeat)[:, None]  # (B, 1, hw, h'w')
    inside = (masks.flatten(2) > 0)[:, :, None, :]  # (B, K, 1, h'w')
    best = sim.masked_fill(~inside, -math.inf).amax(dim=-1)  # (B, K, hw)
    best = torch.where(inside.any(-1), best, torch.zeros_like(best))
    return best.reshape(b, masks.shape[1], h, w)


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

    def decode(
        self,
        feats: list[torch.Tensor],
        tfeats: list[torch.Tensor],
        template_masks: torch.Tensor,
    ) -> torch.Tensor:
        """Fuse attention into the image skips and run the U-Net decoder; returns logits."""
        maps = self.attention_maps(feats, tfeats, template_masks)
        fused = [fuse(fe, a) for fuse, fe, a in zip(self.fusions, feats, maps)]
        x = fused[4]
        for up, skip in zip(self.decoder, (fused[3], fused[2], fused[1], fused[0])):
            x = up(x, skip)
        return self.head(x)

    def forward(
        self, image: torch.Tensor, template: torch.Tensor, template_masks: torch.Tensor
    ) -> torch.Tensor:
        if image.shape[0] != template.shape[0] or template.shape[0] != template_masks.shape[0]:
            raise ValueError("image, template and template_masks must have the same batch size")
        return self.decode(
            self.image_encoder(image),
            self.encode_template(template, template_masks),
            template_masks,
        )

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
        probs = 0.0
        n = templates.shape[1]
        for j in range(n):
            tfeats = self.encode_template(templates[:, j], template_masks[:, j])
            probs = probs + torch.softmax(self.decode(feats, tfeats, template_masks[:, j]), 1)
        return probs / n
