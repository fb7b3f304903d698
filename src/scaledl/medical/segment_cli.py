"""``scaledl segment train|eval|predict``: shape-prior segmentation from the command line.

``train`` fits a small ShapePriorNet on synthetic chest X-rays (or your image/mask folders) and
saves it with its template bank; ``eval`` prints a robustness table (clean and every
corruption) and can save overlay pictures; ``predict`` segments your PNG/NIfTI images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from scaledl.cli_utils import add_json_flag, console, emit, err_console, make_table, progress

#: RGB colours of classes 1..; class 0 (background) is left unpainted.
PALETTE = np.array(
    [[230, 75, 60], [60, 140, 230], [245, 200, 40], [80, 200, 120], [180, 90, 220], [240, 130, 40]],
    dtype=np.float32,
)


def render_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 picture of a [0, 1] grayscale ``image`` with ``labels`` painted over it."""
    gray = np.clip(np.asarray(image, dtype=np.float32), 0, 1)[..., None].repeat(3, -1) * 255
    out = gray.copy()
    for c in range(1, int(labels.max()) + 1):
        m = labels == c
        out[m] = (1 - alpha) * gray[m] + alpha * PALETTE[(c - 1) % len(PALETTE)]
    return out.clip(0, 255).astype(np.uint8)


def save_overlay_png(path: str | Path, panels: list[np.ndarray], scale: int = 2) -> Path:
    """Save RGB panels side by side as one PNG (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    strip = np.concatenate(panels, axis=1)
    img = Image.fromarray(strip)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_data(args: argparse.Namespace, split: str, n: int):
    """Synthetic data (a fixed seed per split) or the user's --images/--masks folders."""
    from scaledl.medical.segmentation_data import load_segmentation_folder, synthetic_cxr_splits

    if args.images or args.masks:
        if not (args.images and args.masks):
            raise ValueError("--images and --masks must be given together")
        return load_segmentation_folder(args.images, args.masks, size=args.size)
    sizes = {"train": 0, "val": 0, "test": 0, split: n}
    return synthetic_cxr_splits(
        args.size, sizes["train"], sizes["val"], sizes["test"], seed=args.seed, lungs=args.lungs
    )[split]


def _add_data_args(p: argparse.ArgumentParser, n_default: int) -> None:
    p.add_argument("--images", help="folder of PNG/NIfTI images (default: synthetic data)")
    p.add_argument("--masks", help="folder of integer label masks named like the images")
    p.add_argument("--n", type=int, default=n_default, help="number of synthetic images")
    p.add_argument("--size", type=int, default=128, help="image size (pixels per side)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument(
        "--lungs",
        default="auto",
        choices=["auto", "torchxrayvision", "parametric"],
        help="lung shapes of the synthetic data",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_json_flag(p)


def _add_template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="segment_model", help="folder written by 'segment train'")
    p.add_argument(
        "--mode", default="ensemble", choices=["fixed", "nearest", "ensemble"], help="templates"
    )
    p.add_argument("--k", type=int, default=5, help="templates averaged in ensemble mode")
    p.add_argument(
        "--restore",
        action="store_true",
        help="put the training-free restoration front end before the model: featureless "
        "regions inpainted, strong noise denoised (reference noise: the model's templates)",
    )
    p.add_argument(
        "--flat",
        action="store_true",
        help="featureless regions (pasted occluders, burned-in labels) close the match gate "
        "exactly where they lie, and the template's shape fills them (a model trained with "
        "--match-gate)",
    )


def _load_model(args: argparse.Namespace, device: str):
    """The saved model and its templates, with the featureless-region gate on request."""
    from scaledl.medical.segmentation_train import load_segmenter

    model, bank = load_segmenter(args.model, device)
    if args.flat:
        if not getattr(model, "match_gate", False):
            raise ValueError(
                f"--flat needs a model with the match gate; {args.model} was trained without "
                "it (train with 'segment train --match-gate')"
            )
        model.match_flat = True
    return model, bank


def _restorer(args: argparse.Namespace, bank):
    """The restoration front end fitted on the model's template images, or None."""
    if not args.restore:
        return None
    from scaledl.medical.restoration import Restorer

    return Restorer().fit(bank.images.detach().cpu().numpy())


def _train(args: argparse.Namespace) -> None:
    from scaledl.medical.segmentation_train import TrainConfig, save_segmenter, train_segmenter
    from scaledl.medical.shape_prior import ShapePriorNet

    data = _load_data(args, "train", args.n)
    model = ShapePriorNet(
        data.num_classes,
        features=args.features,
        attention=args.attention,
        fusion=args.fusion,
        share_weights=args.share_weights,
        label_prior=not args.no_label_prior,
        prior=args.prior,
        match_gate=args.match_gate,
        match_restore_iterations=args.restore_iters,
    )
    cfg = TrainConfig(
        iterations=args.iters,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        anomaly_iterations=args.anomaly_iters,
    )
    losses = train_segmenter(
        model,
        data,
        cfg,
        device=_device(args),
        iterate=lambda it: progress(it, description="training", disable=args.json),
    )
    save_segmenter(args.out, model.cpu(), data)
    result = {
        "model": str(args.out),
        "train_images": len(data),
        "classes": list(data.class_names),
        "iterations": args.iters,
        "loss_first_10": float(np.mean(losses[:10])),
        "loss_last_10": float(np.mean(losses[-10:])),
    }
    emit(args, result)


def _eval(args: argparse.Namespace) -> None:
    from scaledl.medical.corruptions import CORRUPTIONS, corrupt_batch
    from scaledl.medical.segmentation_train import (
        predict_proba,
        segmentation_metrics,
        summarize,
    )

    device = _device(args)
    model, bank = _load_model(args, device)
    data = _load_data(args, "test", args.n)
    if data.num_classes != model.num_classes:
        raise ValueError(
            f"data has {data.num_classes} classes but the model was trained on {model.num_classes}"
        )
    conditions = [("clean", 0)] + [(c, s) for c in args.corruptions for s in args.severities]
    for c in args.corruptions:
        if c not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {c!r}; choose from {', '.join(CORRUPTIONS)}")
    rows: dict[str, dict[str, float]] = {}
    restorer = _restorer(args, bank)
    for kind, sev in progress(conditions, description="evaluating", disable=args.json):
        name = "clean" if kind == "clean" else f"{kind}-{sev}"
        images = (
            data.images
            if kind == "clean"
            else corrupt_batch(data.images, kind, sev, 7, data.labels)
        )
        restored = restorer.restore(images) if restorer is not None else None
        if restored is not None:
            images = restored.images
        pred = predict_proba(model, images, bank, args.mode, args.k, device=device).argmax(1)
        rows[name] = summarize(
            segmentation_metrics(pred, data.labels, data.num_classes), data.class_names
        )
        if restored is not None:
            rows[name].update({f"restore_{k}": v for k, v in restored.summary().items()})
        if args.overlays:
            for i in range(min(args.n_overlays, len(data))):
                save_overlay_png(
                    Path(args.overlays) / f"{name}_{i:03d}.png",
                    [
                        render_overlay(images[i, 0], np.zeros_like(data.labels[i])),
                        render_overlay(images[i, 0], pred[i].numpy()),
                        render_overlay(images[i, 0], data.labels[i]),
                    ],
                )
    clean = rows["clean"]["dice_mean"]
    names = list(data.class_names)
    table = make_table(
        f"Robustness ({args.mode} templates{', restored' if args.restore else ''}): Dice % per "
        "class, mean HD95 (px), gap = clean - corrupted Dice",
        ["condition", *names, "mean Dice", "mean HD95", "gap"],
        [
            [
                cond,
                *(round(r[f"dice_{n}"], 2) for n in names),
                round(r["dice_mean"], 2),
                round(r["hd95_mean"], 2),
                round(clean - r["dice_mean"], 2),
            ]
            for cond, r in rows.items()
        ],
    )
    result = {
        "model": str(args.model),
        "mode": args.mode,
        "restore": bool(args.restore),
        "flat": bool(args.flat),
        "images": len(data),
        "conditions": rows,
    }
    emit(args, result, table)
    if args.overlays and not args.json:
        console.print(f"overlays (input | prediction | truth) in {args.overlays}")


def _predict(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from scaledl.medical.segmentation_data import _read_2d_slices, _resize
    from scaledl.medical.segmentation_train import predict_proba

    missing = [f for f in args.inputs if not Path(f).is_file()]
    if missing:  # before loading the model: a typo should not wait for it
        raise ValueError(f"input {missing[0]} does not exist ({len(missing)} missing)")
    device = _device(args)
    model, bank = _load_model(args, device)
    size = bank.images.shape[-1]
    restorer = _restorer(args, bank)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in progress(args.inputs, description="predicting", disable=args.json):
        path = Path(f)
        for j, img in enumerate(_read_2d_slices(path)):
            lo, hi = np.percentile(img, [1, 99])
            img = np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1)
            small = _resize(img, size, 1).astype(np.float32)
            if restorer is not None:
                small = restorer(small[None, None])[0, 0]
            probs = predict_proba(
                model, torch.from_numpy(small)[None, None], bank, args.mode, args.k
            )
            lab = probs.argmax(1)[0].numpy().astype(np.uint8)
            stem = path.name.split(".")[0] + (f"_{j:03d}" if j else "")
            Image.fromarray(lab).save(out / f"{stem}_mask.png")
            save_overlay_png(out / f"{stem}_overlay.png", [render_overlay(small, lab)])
            written.append(str(out / f"{stem}_mask.png"))
    result = {"model": str(args.model), "masks": written}
    emit(args, result)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="segment_command", metavar="{train,eval,predict}")
    sub.required = True

    t = sub.add_parser("train", help="train a ShapePriorNet (default: synthetic CXR, CPU minutes)")
    _add_data_args(t, n_default=100)
    t.add_argument("--out", default="segment_model", help="output folder")
    t.add_argument("--iters", type=int, default=300, help="training iterations")
    t.add_argument("--batch", type=int, default=8, help="batch size")
    t.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    t.add_argument("--features", type=int, nargs=5, default=[8, 16, 32, 64, 128])
    t.add_argument("--attention", default="prototype", choices=["prototype", "dense", "max"])
    t.add_argument("--fusion", default="gate", choices=["concat", "gate", "both"])
    t.add_argument("--share-weights", action="store_true", help="share encoder stages 2-5")
    t.add_argument(
        "--no-label-prior",
        action="store_true",
        help="skip attention only, no template-label prior at the output (less robust)",
    )
    t.add_argument(
        "--prior",
        default="attention",
        choices=["attention", "affine", "both"],
        help="label prior: per-pixel label transfer, a global robust affine alignment of the "
        "template, or the mean of both",
    )
    t.add_argument(
        "--match-gate",
        action="store_true",
        help="let the template prior decide where the image matches no anatomy seen in clean "
        "training images (e.g. an occluder); calibrated on the training data after training",
    )
    t.add_argument(
        "--anomaly-iters",
        type=int,
        default=600,
        help="with --match-gate: iterations of the denoising autoencoder whose residual also "
        "closes the gate (0 = off); with --restore-iters a copy is fine-tuned 5/6 as long to "
        "inpaint the region",
    )
    t.add_argument(
        "--restore-iters",
        type=int,
        default=0,
        help="with --match-gate: passes of that copy restoring the image where the gate is "
        "closed, segmented again there (0 = off)",
    )
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="robustness table: clean vs each corruption")
    _add_data_args(e, n_default=50)
    _add_template_args(e)
    e.add_argument("--corruptions", nargs="+", default=None, help="default: all")
    e.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    e.add_argument("--overlays", help="folder for overlay PNGs (input | prediction | truth)")
    e.add_argument("--n-overlays", type=int, default=2, help="overlays per condition")
    e.set_defaults(func=_eval_entry)

    pr = sub.add_parser("predict", help="segment PNG/NIfTI images; writes masks and overlays")
    pr.add_argument("inputs", nargs="+", help="image files (PNG or NIfTI)")
    _add_template_args(pr)
    pr.add_argument("--out", default="segment_predictions", help="output folder")
    pr.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_json_flag(pr)
    pr.set_defaults(func=_predict)


def _eval_entry(args: argparse.Namespace) -> None:
    from scaledl.medical.corruptions import CORRUPTIONS

    if args.corruptions is None:
        args.corruptions = list(CORRUPTIONS)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    from scaledl.medical.segmentation_train import require_model_folder

    require_model_folder(args.model)  # before the "evaluating" line
    if not args.json:
        err_console.print(f"evaluating {args.model} on {args.n} images ...")
    _eval(args)
