"""``scaledl detect``: train, evaluate and run RECIST-Net.

- ``scaledl detect train --out DIR``: train on synthetic CT lesions, save the model;
- ``scaledl detect eval --model DIR``: DeepLesion FROC table on a synthetic test split;
- ``scaledl detect predict --model DIR slice.dcm ... [--png out.png]``: detections with their
  diameters (DICOM slices, or ``.npy`` HU arrays with ``--spacing``), optionally drawn.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scaledl.cli_utils import add_json_flag, emit, err_console, make_table


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="detect_command", metavar="{train,eval,predict}")
    sub.required = True

    def data_args(p: argparse.ArgumentParser, n: int, split: str) -> None:
        p.add_argument("--n-images", type=int, default=n, help=f"synthetic slices (default {n})")
        p.add_argument("--size", type=int, default=128, help="slice side in pixels")
        p.add_argument("--split", choices=["easy", "hard", "mixed"], default=split)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
        add_json_flag(p)

    t = sub.add_parser("train", help="train RECIST-Net on synthetic CT lesions")
    data_args(t, 200, "mixed")
    t.add_argument("--out", required=True, help="directory for config.json and model.pt")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--width", type=int, default=16, help="U-Net base width")
    t.add_argument("--stride", type=int, default=2, choices=[1, 2, 4, 8])
    t.add_argument("--missing-labels", type=float, default=0.0, help="drop rate of labels")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="DeepLesion FROC of a saved model on a synthetic split")
    data_args(e, 100, "easy")
    e.add_argument("--model", required=True, help="directory written by 'detect train'")
    e.add_argument("--k", type=int, default=16, help="peaks per keypoint map")
    e.add_argument("--iou", type=float, default=0.5, help="IoU threshold")
    e.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="detect lesions on DICOM slices or .npy HU arrays")
    p.add_argument("inputs", nargs="+", help="DICOM files, or .npy HU arrays with --spacing")
    p.add_argument("--model", required=True)
    p.add_argument("--spacing", type=float, nargs="+", default=None, help="mm/px for .npy input")
    p.add_argument("--min-score", type=float, default=0.3, help="report detections above this")
    p.add_argument("--png", default=None, help="draw the first input's detections into a PNG")
    p.add_argument("--k", type=int, default=16, help="peaks per keypoint map")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    add_json_flag(p)
    p.set_defaults(func=_predict)


def _data(args: argparse.Namespace, missing: float = 0.0):
    from scaledl.medical.lesion_data import make_lesion_dataset

    if args.n_images < 1:
        raise ValueError(f"--n-images must be positive, got {args.n_images}")
    return make_lesion_dataset(
        args.n_images,
        split=args.split,
        seed=args.seed,
        size=args.size,
        missing_label_rate=missing,
        progress=not args.json,
    )


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from scaledl.medical.recist_net import RECISTNet
    from scaledl.medical.recist_train import train_recist

    ds = _data(args, args.missing_labels)
    model = RECISTNet(width=args.width, stride=args.stride)
    losses = train_recist(
        model, ds, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, progress=not args.json,
    )  # fmt: skip
    model.cpu().save_pretrained(args.out)
    n = max(1, min(10, len(losses) // 4))
    result = {
        "out": str(Path(args.out)),
        "images": len(ds),
        "lesions": ds.n_lesions(),
        "steps": len(losses),
        "loss_first": float(np.mean(losses[:n])),
        "loss_last": float(np.mean(losses[-n:])),
        "params": sum(p.numel() for p in model.parameters()),
    }
    emit(args, result)
    return 0


def froc_table(title: str, evals: dict[str, dict[str, Any]]):
    """A rich table: sensitivity at each FP rate, the average and the diameter errors."""
    first = next(iter(evals.values()))["froc"]
    cols = ["subset", "lesions", *[f"sens@{r:g}" for r in first.fp_rates], "average"]
    cols += ["long err mm", "short err mm"]
    rows = []
    for name, ev in evals.items():
        for row in ev["froc"].table_rows(name):
            errs = (
                (ev["median_long_err_mm"], ev["median_short_err_mm"])
                if row[0] == name
                else ("", "")
            )
            rows.append([*row, *errs])
    return make_table(title, cols, rows)


def _eval(args: argparse.Namespace) -> int:
    from scaledl.medical.recist_net import RECISTNet
    from scaledl.medical.recist_train import evaluate_recist, predict_recist

    model = RECISTNet.from_pretrained(args.model)
    ds = _data(args)
    dets = predict_recist(model, ds, device=args.device, k=args.k, progress=not args.json)
    ev = evaluate_recist(dets, ds, iou_th=args.iou)
    result = {
        "split": args.split,
        "images": len(ds),
        **{k: v for k, v in ev.items() if k != "froc"},
        "froc": ev["froc"].to_dict(),
    }
    emit(
        args,
        result,
        froc_table(f"FROC on {len(ds)} synthetic {args.split} slices", {args.split: ev}),
    )
    return 0


def _load_input(path: str, spacing: list[float] | None):
    import numpy as np

    from scaledl.medical.lesion_data import read_dicom_slice
    from scaledl.medical.recist_geometry import as_spacing

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"input not found: {path}")
    if p.suffix == ".npy":
        hu = np.load(p)
        if hu.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D HU array, got shape {hu.shape}")
        return hu.astype(np.float32), as_spacing(spacing)
    return read_dicom_slice(p)


def draw_detections(hu, dets, spacing, path: str | Path, title: str = "") -> Path:
    """Save a PNG of the slice (soft-tissue window) with each detection's RECIST diameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scaledl.medical.lesion_data import window_hu

    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.imshow(window_hu(hu), cmap="gray", interpolation="nearest")
    for d in dets:
        p = d.points
        ax.plot(p[:2, 0], p[:2, 1], "-", color="#ff3b30", lw=1.5)
        ax.plot(p[2:, 0], p[2:, 1], "-", color="#ffcc00", lw=1.5)
        x1, y1 = d.box[0], d.box[1]
        label = f"{d.long_mm:.1f} x {d.short_mm:.1f} mm ({d.score:.2f})"
        box = {"facecolor": "black", "alpha": 0.5, "pad": 1}
        ax.text(x1, y1 - 2, label, color="white", fontsize=7, bbox=box)
    ax.set_title(title or f"{len(dets)} detections", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def _predict(args: argparse.Namespace) -> int:
    import torch

    from scaledl.medical.lesion_data import window_hu
    from scaledl.medical.recist_net import RECISTNet

    model = RECISTNet.from_pretrained(args.model)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    out: dict[str, Any] = {"detections": {}}
    rows = []
    for i, path in enumerate(args.inputs):
        hu, spacing = _load_input(path, args.spacing)
        x = torch.from_numpy(window_hu(hu))[None, None].to(dev)
        dets = [d for d in model.detect(x, spacing, k=args.k)[0] if d.score >= args.min_score]
        out["detections"][path] = [d.to_dict() for d in dets]
        rows += [[path, f"{d.score:.3f}", d.long_mm, d.short_mm, [round(v, 1) for v in d.box]]
                 for d in dets]  # fmt: skip
        if args.png and i == 0:
            out["png"] = str(draw_detections(hu, dets, spacing, args.png, Path(path).name))
            err_console.print(f"wrote {out['png']}")
    table = make_table(
        "RECIST-Net detections", ["input", "score", "long mm", "short mm", "box"], rows
    )
    emit(args, out, table)
    return 0
