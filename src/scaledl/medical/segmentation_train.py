"""Training, template selection and evaluation for shape-prior segmentation.

- Training draws, for every target image, a template uniformly from the *other* training
  images and augments both independently (about N² pairs); the loss is MONAI's ``DiceCELoss``
  (Dice without background + cross-entropy, 1:1).
- Templates at inference come from the training set only: ``fixed`` (the training medoid,
  highest mean mask Dice to all others), ``nearest`` (best cosine match of the image encoder's
  pooled embedding) or ``ensemble`` (softmax averaged over the k nearest).
- Metrics per class: Dice and HD95 with MONAI. A structure that is missed (empty prediction,
  non-empty truth) or hallucinated scores the worst case: Dice 0 and HD95 = the image
  diagonal, instead of MONAI's NaN that would silently drop it from the mean.

Plain template-free networks (e.g. MONAI ``BasicUNet``) train and evaluate with the same
functions, so baselines are compared like for like.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scaledl.medical.segmentation_data import SegmentationData
from scaledl.medical.shape_prior import ShapePriorNet

TEMPLATE_MODES = ("fixed", "nearest", "ensemble")
MISSED_POLICIES = ("worst", "nan")


@dataclass
class TrainConfig:
    """Optimisation settings. ``optimizer="sgd"`` is nnU-Net's (Nesterov 0.99, lr 1e-2, poly);
    ``"adam"`` converges faster in the short runs used on CPU. ``amp`` trains in bfloat16
    autocast on CUDA (ignored on CPU). ``prior_loss_weight`` weights the same Dice + CE loss on
    a ShapePriorNet's label prior alone (auxiliary; 0 turns it off). ``anomaly_iterations``:
    training iterations of a match gate's anomaly autoencoder (0 leaves the evidence off)."""

    iterations: int = 300
    batch_size: int = 8
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 3e-5
    augment: bool = True
    amp: bool = True
    seed: int = 0
    prior_loss_weight: float = 1.0
    anomaly_iterations: int = 600

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("iterations and batch_size must be >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.anomaly_iterations < 0:
            raise ValueError(f"anomaly_iterations must be >= 0, got {self.anomaly_iterations}")


def one_hot_foreground(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) integer labels -> (B, K, H, W) float masks of the foreground classes 1..K."""
    oh = F.one_hot(labels.long().clamp(0, num_classes), num_classes + 1)
    return oh[..., 1:].permute(0, 3, 1, 2).float()


def random_affine(
    images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent random rotation (±10°), scale (0.9-1.1) and shift (±5%) per sample.

    No mirroring: it would swap the left and right lungs."""
    b = images.shape[0]
    dev = images.device
    r = torch.rand(b, 4, generator=gen).to(dev)
    ang = (r[:, 0] * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * r[:, 1]
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = torch.cos(ang) / scale
    theta[:, 0, 1] = -torch.sin(ang) / scale
    theta[:, 1, 0] = torch.sin(ang) / scale
    theta[:, 1, 1] = torch.cos(ang) / scale
    theta[:, :, 2] = (r[:, 2:4] * 2 - 1) * 0.1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    img = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest", align_corners=False)
    return img, lab[:, 0].long()


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay)


def uses_template(model: nn.Module) -> bool:
    """Whether ``model`` takes a template (ShapePriorNet) or only the image (a plain U-Net)."""
    return isinstance(model, ShapePriorNet)


def train_segmenter(
    model: nn.Module,
    data: SegmentationData,
    config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    iterate: Callable | None = None,
) -> list[float]:
    """Train ``model`` on ``data`` with random template pairs; returns the loss per iteration.

    ``iterate`` wraps the iteration range (e.g. a progress bar).
    """
    from monai.losses import DiceCELoss

    cfg = config or TrainConfig()
    n = len(data)
    if uses_template(model) and n < 2:
        raise ValueError("template training needs at least 2 training images")
    k = data.num_classes
    images = torch.as_tensor(data.images, device=device)
    labels = torch.as_tensor(data.labels, device=device)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = DiceCELoss(
        include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5
    )
    opt = _make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: (1 - it / cfg.iterations) ** 0.9
    )  # poly decay (nnU-Net)
    model.to(device).train()
    amp = cfg.amp and torch.device(device).type == "cuda"
    losses: list[float] = []
    steps = range(cfg.iterations)
    for _ in iterate(steps) if iterate else steps:
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        x, y = images[idx.to(device)], labels[idx.to(device)]
        if cfg.augment:
            x, y = random_affine(x, y, gen)
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            if uses_template(model):
                # uniform over the other images: shift by 1..n-1 modulo n
                tidx = (idx + torch.randint(1, n, (cfg.batch_size,), generator=gen)) % n
                t, tl = images[tidx.to(device)], labels[tidx.to(device)]
                if cfg.augment:
                    t, tl = random_affine(t, tl, gen)
                logits, prior = model.forward_with_prior(x, t, one_hot_foreground(tl, k))
            else:
                logits, prior = model(x), None
        loss = loss_fn(logits.float(), y[:, None])
        if prior is not None and cfg.prior_loss_weight > 0:
            # the label prior also learns to segment on its own (softmax of log P is P), so the
            # transferred labels are right wherever the matching is, not only where they help
            log_p = torch.log(prior.float().clamp_min(1e-6))
            loss = loss + cfg.prior_loss_weight * loss_fn(log_p, y[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    if uses_template(model) and model.match_gate:
        if model.anomaly is not None and cfg.anomaly_iterations > 0:
            # the autoencoder learns from the bank's images only, so the calibration images
            # that set its threshold are unseen, like the test images
            bank, _ = calibration_split(n, seed=cfg.seed)
            model.fit_anomaly(images[bank.to(device)], cfg.anomaly_iterations, cfg.seed, device)
        calibrate_match_gate(model, data, seed=cfg.seed, device=device)
    return losses


def calibration_split(
    n: int, bank_fraction: float = 2 / 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training images that fill the match gate's memory bank (and train its
    anomaly autoencoder) and of the held-out ones that calibrate its thresholds; a seeded
    permutation, so :func:`calibrate_match_gate` and :func:`train_segmenter` agree."""
    if n < 2:
        raise ValueError("calibrating the match gate needs at least 2 training images")
    if not 0 < bank_fraction < 1:
        raise ValueError(f"bank_fraction must be in (0, 1), got {bank_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_bank = min(n - 1, max(1, round(bank_fraction * n)))
    return perm[:n_bank], perm[n_bank:]


@torch.no_grad()
def calibrate_match_gate(
    model: ShapePriorNet,
    data: SegmentationData,
    bank_fraction: float = 2 / 3,
    bank_size: int = 16384,
    seed: int = 0,
    device: str | torch.device = "cpu",
    atlas_size: int = 64,
) -> tuple[float, float]:
    """Calibrate the match gate of a trained ``model`` on clean training data: a random
    ``bank_fraction`` of the images fills the memory bank, the others (each paired with a
    random other training image as template, as in training, without augmentation) set the
    thresholds; with ``model.match_templates`` > 1, up to ``atlas_size`` of the images (with
    their masks) become the atlas of the closed-gate prior. Called by :func:`train_segmenter`;
    returns the (low, high) thresholds."""
    n = len(data)
    bank, calib = calibration_split(n, bank_fraction, seed)
    # the generator continues after the split's permutation (same draws as before the split
    # was factored out)
    gen = torch.Generator().manual_seed(seed + 1)
    torch.randperm(n, generator=gen)
    tidx = (calib + torch.randint(1, n, (len(calib),), generator=gen)) % n
    images = torch.as_tensor(data.images)
    model.to(device)
    atlas = {}
    if atlas_size < 1:
        raise ValueError(f"atlas_size must be >= 1, got {atlas_size}")
    if model.match_templates > 1:
        # the atlas of the closed-gate prior: at most atlas_size training images
        # (its own generator, so the bank and the thresholds do not depend on the atlas)
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))[:atlas_size]
        masks = F.one_hot(torch.as_tensor(data.labels)[keep].long(), data.num_classes + 1)
        atlas = {
            "atlas_images": images[keep].to(device),
            "atlas_masks": masks[..., 1:].permute(0, 3, 1, 2).float().to(device),
        }
    return model.calibrate_match_gate(
        images[calib].to(device),
        images[tidx].to(device),
        images[bank].to(device),
        bank_size,
        gen,
        **atlas,
    )


# --------------------------------------------------------------------------- templates


def mask_dice_matrix(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, N) mean foreground-class Dice between every pair of label maps."""
    lab = torch.as_tensor(labels).flatten(1)
    total = torch.zeros(lab.shape[0], lab.shape[0], dtype=torch.float64)
    for c in range(1, num_classes + 1):
        m = (lab == c).double()
        inter = m @ m.T
        area = m.sum(1)
        total += 2 * inter / (area[:, None] + area[None, :]).clamp_min(1e-8)
    return (total / num_classes).numpy()


def medoid_index(labels: np.ndarray, num_classes: int) -> int:
    """The training image whose masks have the highest mean Dice to all the others."""
    d = mask_dice_matrix(labels, num_classes)
    n = d.shape[0]
    if n == 1:
        return 0
    np.fill_diagonal(d, 0.0)
    return int(np.argmax(d.sum(1) / (n - 1)))


class TemplateBank:
    """Training images and masks used as templates at inference, with their embeddings."""

    def __init__(self, data: SegmentationData, device: str | torch.device = "cpu") -> None:
        self.data = data
        self.device = torch.device(device)
        self.images = torch.as_tensor(data.images, device=self.device)
        self.masks = one_hot_foreground(
            torch.as_tensor(data.labels, device=self.device), data.num_classes
        )
        self.medoid = medoid_index(data.labels, data.num_classes)

    @torch.no_grad()
    def embeddings(self, model: ShapePriorNet, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image-encoder embeddings of the templates under ``model``.

        Not cached on the bank: one bank serves several models (and models change in
        training); :func:`predict_proba` computes them once per call."""
        model.eval()
        embs = [
            model.embed(self.images[i : i + batch_size])
            for i in range(0, len(self.data), batch_size)
        ]
        return F.normalize(torch.cat(embs), dim=1)

    @torch.no_grad()
    def select(
        self,
        model: ShapePriorNet,
        images: torch.Tensor,
        mode: str = "ensemble",
        k: int = 5,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Template indices (B, n) for ``images``: n = 1 for fixed/nearest, k for ensemble.

        ``embeddings`` (from :meth:`embeddings`) avoids re-encoding the templates."""
        if mode not in TEMPLATE_MODES:
            raise ValueError(f"template mode must be one of {TEMPLATE_MODES}, got {mode!r}")
        b = images.shape[0]
        if mode == "fixed":
            return torch.full((b, 1), self.medoid, dtype=torch.long, device=images.device)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = 1 if mode == "nearest" else min(k, len(self.data))
        emb = self.embeddings(model) if embeddings is None else embeddings
        q = F.normalize(model.embed(images), dim=1)
        return (q @ emb.T).topk(n, dim=1).indices


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    bank: TemplateBank | None = None,
    mode: str = "ensemble",
    k: int = 5,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Class probabilities (N, K + 1, H, W) on CPU; ShapePriorNet needs a template ``bank``."""
    model.to(device).eval()
    x_all = torch.as_tensor(images)
    emb = None
    if uses_template(model) and bank is not None and mode != "fixed":
        emb = bank.embeddings(model, batch_size)
    out = []
    for i in range(0, x_all.shape[0], batch_size):
        x = x_all[i : i + batch_size].to(device)
        if uses_template(model):
            if bank is None:
                raise ValueError("a ShapePriorNet needs a TemplateBank to predict")
            idx = bank.select(model, x, mode, k, emb)
            p = model.predict_proba(x, bank.images[idx], bank.masks[idx])
        else:
            p = torch.softmax(model(x), 1)
        out.append(p.float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- persistence


def save_segmenter(path: str | Path, model: ShapePriorNet, templates: SegmentationData) -> Path:
    """Save a ShapePriorNet (``save_pretrained``) plus its template bank (``templates.npz``)."""
    path = Path(path)
    model.save_pretrained(path)
    np.savez_compressed(
        path / "templates.npz",
        images=templates.images.astype(np.float16),
        labels=templates.labels.astype(np.uint8),
        class_names=np.array(templates.class_names),
    )
    return path


def require_model_folder(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it is a folder, else an error that says how to make one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {path} does not exist: train one with 'scaledl segment train --out "
            f"{path}' (or save_segmenter)"
        )
    return path


def load_segmenter(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[ShapePriorNet, TemplateBank]:
    """Load what :func:`save_segmenter` wrote: the model and a template bank on ``device``."""
    path = require_model_folder(path)
    if not (path / "templates.npz").is_file():
        raise ValueError(f"{path} has no templates.npz; save it with save_segmenter")
    model = ShapePriorNet.from_pretrained(path).to(device).eval()
    with np.load(path / "templates.npz") as z:
        data = SegmentationData(
            z["images"].astype(np.float32),
            z["labels"].astype(np.int64),
            tuple(str(c) for c in z["class_names"]),
        )
    return model, TemplateBank(data, device)


# --------------------------------------------------------------------------- metrics


def segmentation_metrics(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    missed: str = "worst",
    spacing: float = 1.0,
    hd95: bool = True,
) -> dict[str, np.ndarray]:
    """Per-image, per-class Dice and HD95 (N, K) from integer label maps (N, H, W).

    ``missed="worst"``: a structure that is missed or hallucinated gets Dice 0 and HD95 equal to
    the image diagonal (times ``spacing``); absent from both: Dice 1, HD95 0. ``missed="nan"``
    keeps MONAI's NaN for those cases. ``hd95=False`` returns the Dice alone (HD95 costs far
    more).
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if missed not in MISSED_POLICIES:
        raise ValueError(f"missed must be one of {MISSED_POLICIES}, got {missed!r}")
    p = torch.as_tensor(pred).long()
    t = torch.as_tensor(target).long()
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} must be equal (N,H,W)")
    po = F.one_hot(p.clamp(0, num_classes), num_classes + 1).permute(0, 3, 1, 2).float()
    to = F.one_hot(t.clamp(0, num_classes), num_classes + 1).permute(0, 3, 1, 2).float()
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(po, to)
    has_p = po[:, 1:].flatten(2).any(-1).numpy()
    has_t = to[:, 1:].flatten(2).any(-1).numpy()
    one_sided = has_p != has_t
    if not hd95:
        dice = dice.double().numpy()
        return {"dice": np.where(one_sided, 0.0, dice) if missed == "worst" else dice}
    import warnings

    with warnings.catch_warnings():
        # MONAI warns for every empty mask; the policy below handles those cases explicitly
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            po, to, spacing=spacing
        )
    dice, hd = dice.double().numpy(), hd.double().numpy()
    if missed == "worst":
        worst = math.hypot(*p.shape[1:]) * spacing
        hd = np.where(one_sided, worst, hd)
        hd = np.where(~has_p & ~has_t, 0.0, hd)
        dice = np.where(one_sided, 0.0, dice)
    return {"dice": dice, "hd95": hd}


def summarize(metrics: dict[str, np.ndarray], class_names: Sequence[str]) -> dict[str, float]:
    """Mean Dice (in %) and HD95 per class and over classes, NaNs ignored."""
    out: dict[str, float] = {}
    for key, scale in (("dice", 100.0), ("hd95", 1.0)):
        vals = metrics[key]
        for c, name in enumerate(class_names):
            out[f"{key}_{name}"] = float(np.nanmean(vals[:, c]) * scale)
        out[f"{key}_mean"] = float(np.nanmean(vals) * scale)
    return out


def evaluate(
    model: nn.Module,
    data: SegmentationData,
    bank: TemplateBank | None = None,
    mode: str = "ensemble",
    k: int = 5,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    missed: str = "worst",
) -> dict[str, float]:
    """Predict ``data`` and return :func:`summarize` of its per-class Dice and HD95."""
    probs = predict_proba(model, data.images, bank, mode, k, batch_size, device)
    m = segmentation_metrics(probs.argmax(1), data.labels, data.num_classes, missed)
    return summarize(m, data.class_names)
