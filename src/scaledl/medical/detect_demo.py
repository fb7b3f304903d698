"""``scaledl demo`` entry for RECIST-Net: RECIST ground truth, exact keypoint round trip,
DeepLesion FROC and a short training run, on synthetic lesions over pydicom's CT slice."""

from __future__ import annotations

import time

import numpy as np


def run_demo(time_budget_s: float = 12.0) -> object:
    import torch

    from scaledl.demo import DemoResult
    from scaledl.medical.froc_eval import froc
    from scaledl.medical.lesion_data import _ct_small, _phantom, make_lesion_dataset
    from scaledl.medical.recist_decode import decode_batch, detections_to_arrays
    from scaledl.medical.recist_net import RECISTNet, dense_offsets, encode_targets
    from scaledl.medical.recist_train import train_recist

    t0 = time.perf_counter()
    bgs = {"ct_small": _ct_small(96), "phantom": _phantom(96)}
    ds = make_lesion_dataset(24, split="mixed", seed=7, backgrounds=bgs)
    t_data = time.perf_counter() - t0
    # 1) ground truth heatmaps decode back to exactly the RECIST endpoints
    tg = encode_targets(ds.points, ds.images.shape[1:], stride=2)
    dets = decode_batch(
        torch.from_numpy(tg["heatmap"]), torch.from_numpy(dense_offsets(tg)), stride=2,
        spacing=ds.spacing, k=12,
    )  # fmt: skip
    errs = [
        min(np.abs(d.points - p).max() for d in dl) if dl else np.inf
        for dl, pts in zip(dets, ds.points)
        for p in pts
    ]
    arrays = [detections_to_arrays(d) for d in dets]
    res = froc([a[0] for a in arrays], [a[1] for a in arrays], ds.boxes(), gt_sizes_mm=ds.long_mm)
    # 2) a short training run of the light model
    torch.manual_seed(0)
    model = RECISTNet(width=8, levels=4, stride=2, head_channels=16)
    t1 = time.perf_counter()
    losses = train_recist(
        model, ds, steps=200, batch_size=4, lr=3e-3, device="cpu", time_limit_s=time_budget_s
    )
    t_train = time.perf_counter() - t1
    n = max(1, min(5, len(losses) // 4))
    first, last = float(np.mean(losses[:n])), float(np.mean(losses[-n:]))
    figures = {
        "slices": len(ds),
        "lesions": ds.n_lesions(),
        "lesion-free slices": int(sum(len(p) == 0 for p in ds.points)),
        "long diameter range mm": [
            round(float(np.min(np.concatenate(ds.long_mm))), 1),
            round(float(np.max(np.concatenate(ds.long_mm))), 1),
        ],
        "round-trip max endpoint error px": float(np.max(errs)),
        "round-trip sens@0.5 FP/img": res.at(0.5),
        "train steps": len(losses),
        "loss first -> last": [round(first, 3), round(last, 3)],
        "data s": round(t_data, 2),
        "train s": round(t_train, 2),
    }
    ok = bool(np.max(errs) < 1e-3 and res.at(0.5) == 1.0 and last < first)
    return DemoResult(
        headline=(
            f"{ds.n_lesions()} synthetic lesions: keypoints decode back exactly "
            f"(max error {np.max(errs):.1e} px, FROC sens@0.5 = {res.at(0.5):.2f}); "
            f"{len(losses)} training steps cut the loss {first:.2f} -> {last:.2f}"
        ),
        figures=figures,
        ok=ok,
    )
