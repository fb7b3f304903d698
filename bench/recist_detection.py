"""RECIST-Net vs MONAI's RetinaNetDetector on synthetic CT lesions, side by side in one run.

Both detectors train on the same synthetic training split (easy and hard slices mixed; the
same flips and 90° rotations, steps, batch, optimiser and schedule) and are evaluated on the
same easy and hard test splits with the DeepLesion FROC (sensitivity at 0.5-8 FPs/image,
IoU 0.5) and the median diameter error in mm of the lesions they hit. RetinaNet predicts
boxes only, so its RECIST estimate is the box's longer/shorter side minus the DeepLesion
padding.

Data: lesions are generated with numpy/scipy at run time (in parallel processes) on the CT
backgrounds stored in ``bench/data/recist_backgrounds_256.npz`` (pydicom's CT slice, a
phantom with pydicom's liver segmentation, Shepp-Logan and sparse-view variants, pre-rendered
with scikit-image), so the GPU machine needs torch, numpy, scipy and monai only.

The RetinaNet feature extractor is MONAI's ResNet with MONAI's FeaturePyramidNetwork on
layers 1-3 (what ``resnet_fpn_feature_extractor`` builds, assembled here without
torchvision's ``IntermediateLayerGetter``); anchors are matched with MONAI's ATSS matcher and
sampled with its hard-negative sampler, so the baseline also runs where torchvision is absent.

    PYTHONPATH=src python bench/recist_detection.py            # full: CUDA, about 5.5 min
    PYTHONPATH=src python bench/recist_detection.py --quick    # CPU smoke run, < 2 min
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, save_results

from scaledl.medical.froc_eval import DEFAULT_FP_RATES, froc_curve
from scaledl.medical.lesion_data import (
    LesionDataset,
    load_backgrounds,
    make_lesion_dataset,
    resize_backgrounds,
)
from scaledl.medical.recist_geometry import DEEPLESION_PAD
from scaledl.medical.recist_net import RECISTNet
from scaledl.medical.recist_train import (
    TrainingClock,
    evaluate_boxes,
    evaluate_recist,
    images_tensor,
    predict_recist,
    sample_batch,
    train_recist,
)

BACKGROUNDS = Path(__file__).resolve().parent / "data" / "recist_backgrounds_256.npz"

FULL = dict(size=256, n_train=2000, n_test=300, steps=3000, batch=32, width=32, stride=2, k=40,
            rn_width=32, time_limit=150.0, lr=1e-3)  # fmt: skip
QUICK = dict(size=96, n_train=48, n_test=16, steps=8, batch=4, width=8, stride=2, k=12,
             rn_width=8, time_limit=20.0, lr=2e-3)  # fmt: skip


# ----------------------------------------------------------------------------- data


def _chunk(args: tuple) -> LesionDataset:
    n, split, seed, bgs, missing = args
    return make_lesion_dataset(
        n, split=split, seed=seed, backgrounds=bgs, missing_label_rate=missing
    )


def make_split(n, split, seed, bgs, missing=0.0, workers=1) -> LesionDataset:
    """Deterministic for a given (n, seed) on any machine: chunks of at most 16 slices, chunk
    c seeded with seed * 1000 + c, whatever the number of worker processes."""
    n_chunks = max(1, math.ceil(n / 16))
    sizes = [n // n_chunks + (c < n % n_chunks) for c in range(n_chunks)]
    jobs = [(m, split, seed * 1000 + c, bgs, missing) for c, m in enumerate(sizes)]
    if workers <= 1:
        return LesionDataset.concat([_chunk(j) for j in jobs])
    with ProcessPoolExecutor(workers) as pool:
        return LesionDataset.concat(list(pool.map(_chunk, jobs)))


# ----------------------------------------------------------------------------- RetinaNet


def build_retinanet(width: int, device: torch.device):
    """MONAI RetinaNetDetector: ResNet-18-style backbone + FPN (strides 4, 8, 16), ATSS."""
    import monai.apps.detection.networks.retinanet_detector as rd
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
    from monai.networks.nets import resnet

    try:
        import torchvision  # noqa: F401
    except Exception:
        # The detector type-checks its matcher against torchvision's Matcher before MONAI's
        # ATSSMatcher; without torchvision that name is an import stub, so give it a class
        # that matches nothing and the ATSS branch is taken.
        rd.Matcher = type("TorchvisionMatcherUnavailable", (), {})

    chans = [width, 2 * width, 4 * width, 8 * width]
    backbone = resnet.ResNet(
        spatial_dims=2,
        block=resnet.ResNetBlock,
        layers=[2, 2, 2, 2],
        block_inplanes=chans,
        n_input_channels=1,
        conv1_t_stride=2,
        conv1_t_size=7,
    )

    class ResNetFPN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = backbone
            self.fpn = FeaturePyramidNetwork(2, chans[:3], 2 * width)
            self.out_channels = 2 * width

        def forward(self, x):
            b = self.body
            x = b.maxpool(b.act(b.bn1(b.conv1(x))))
            f1 = b.layer1(x)
            f2 = b.layer2(f1)
            f3 = b.layer3(f2)
            return self.fpn(OrderedDict([("0", f1), ("1", f2), ("2", f3)]))

    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=(1, 2, 4), base_anchor_shapes=((16, 16), (12, 20), (20, 12))
    )
    net = RetinaNet(
        spatial_dims=2, num_classes=1, num_anchors=3, feature_extractor=ResNetFPN(),
        size_divisible=16,
    )  # fmt: skip
    det = rd.RetinaNetDetector(net, anchors).to(device)
    det.set_atss_matcher(num_candidates=4, center_in_gt=False)
    det.set_hard_negative_sampler(
        batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16
    )
    det.set_target_keys(box_key="boxes", label_key="labels")
    det.set_box_selector_parameters(
        score_thresh=1e-3, topk_candidates_per_level=1000, nms_thresh=0.5, detections_per_img=100
    )
    return det


def _to_monai(boxes_xyxy: np.ndarray) -> np.ndarray:
    """[x1, y1, x2, y2] -> MONAI's axis order [row1, col1, row2, col2]."""
    return np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]]


def train_retinanet(det, ds, x_all, *, steps, batch, lr, seed, device, time_limit):
    det.train()
    H, W = x_all.shape[-2:]
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=1e-4)
    clock = TrainingClock(steps, time_limit)  # the same schedule rule as RECIST-Net's
    losses = []
    for step in range(steps):
        if not clock.set_lr(opt, lr, step):
            break
        x, batch_points = sample_batch(ds, x_all, rng, batch, device)
        targets = []
        for pts in batch_points:
            boxes = np.zeros((0, 4), np.float32)
            if len(pts):
                boxes = np.concatenate(
                    [pts.min(1) - DEEPLESION_PAD, pts.max(1) + DEEPLESION_PAD], 1
                )
                boxes = np.clip(boxes, 0, [W - 1, H - 1, W - 1, H - 1])
            targets.append(
                {
                    "boxes": torch.as_tensor(_to_monai(boxes), device=device),
                    "labels": torch.zeros(len(boxes), dtype=torch.long, device=device),
                }
            )
        out = det(x, targets)
        loss = out["classification"] + out["box_regression"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(det.parameters(), 10.0)
        opt.step()
        losses.append(loss.detach())  # no per-step sync, as in train_recist
    return torch.stack(losses).tolist() if losses else []


@torch.no_grad()
def predict_retinanet(det, ds, x_all, device, batch=32):
    det.eval()
    boxes, scores, longs, shorts = [], [], [], []
    for s in range(0, len(ds), batch):
        outs = det(x_all[s : s + batch].to(device))
        for j, o in enumerate(outs):
            b = o["boxes"].float().cpu().numpy()[:, [1, 0, 3, 2]].astype(np.float64)
            sp = ds.spacing[s + j]
            w = np.clip(b[:, 2] - b[:, 0] - 2 * DEEPLESION_PAD, 0, None) * sp[1]
            h = np.clip(b[:, 3] - b[:, 1] - 2 * DEEPLESION_PAD, 0, None) * sp[0]
            boxes.append(b)
            scores.append(o["labels_scores"].float().cpu().numpy().astype(np.float64))
            longs.append(np.maximum(w, h))
            shorts.append(np.minimum(w, h))
    return boxes, scores, longs, shorts


# ----------------------------------------------------------------------------- examples


def score_at_fp_rate(boxes, scores, gts, rate: float = 1.0) -> float:
    """The lowest score kept at the FROC operating point of ``rate`` FPs/image."""
    fps, _, _ = froc_curve(boxes, scores, gts)
    ordered = np.sort(np.concatenate([np.asarray(s, float) for s in scores]))[::-1]
    ok = np.nonzero(fps[1:] <= rate)[0]
    return float(ordered[ok[-1]]) if len(ok) else math.inf


def example_record(ds, rn_dets, rt_boxes, rt_scores, n: int = 4) -> dict:
    """Detections on the first ``n`` slices with lesions, at each detector's 1 FP/image
    operating point, for :func:`render`."""
    from scaledl.medical.recist_decode import detections_to_arrays

    arrays = [detections_to_arrays(d) for d in rn_dets]
    gts = ds.boxes()
    thr_rn = score_at_fp_rate([a[0] for a in arrays], [a[1] for a in arrays], gts)
    thr_rt = score_at_fp_rate(rt_boxes, rt_scores, gts)
    idx = [i for i in range(len(ds)) if len(ds.points[i])][:n]
    return {
        "indices": idx,
        "threshold_recist_net": thr_rn,
        "threshold_retinanet": thr_rt,
        "recist_net": [[d.to_dict() for d in rn_dets[i] if d.score >= thr_rn] for i in idx],
        "retinanet": [
            [[*b.tolist(), float(s)] for b, s in zip(rt_boxes[i], rt_scores[i]) if s >= thr_rt]
            for i in idx
        ],
    }


def render(json_path: str, figure: str) -> None:
    """Draw the examples stored by a benchmark run: the test slices are regenerated from
    the recorded seed (generation is deterministic), so only the detections are stored."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scaledl.medical.lesion_data import window_hu

    doc = json.loads(Path(json_path).read_text())
    cfg, seed, ex = doc["config"], doc["seed"], doc["examples"]
    bgs = load_backgrounds(BACKGROUNDS)
    if cfg["size"] != 256:
        bgs = resize_backgrounds(bgs, cfg["size"])
    splits = {"easy": seed + 2, "hard": seed + 3}
    ncol = max(len(ex[s]["indices"]) for s in splits)
    fig, axs = plt.subplots(2, ncol, figsize=(3.2 * ncol, 6.8), dpi=110, squeeze=False)
    label = {
        "color": "white",
        "fontsize": 6,
        "bbox": {"facecolor": "black", "alpha": 0.5, "pad": 1},
    }
    for row, (split, s) in enumerate(splits.items()):
        ds = make_split(cfg["n_test"], split, s, bgs, 0.0, workers=1)
        for col, i in enumerate(ex[split]["indices"]):
            ax = axs[row, col]
            ax.imshow(window_hu(ds.images[i]), cmap="gray")
            for p in ds.points[i]:
                for a, b in ((0, 1), (2, 3)):
                    ax.plot(p[[a, b], 0], p[[a, b], 1], "-", color="#34c759", lw=2.5, alpha=0.6)
            for x1, y1, x2, y2, _ in ex[split]["retinanet"][col]:
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                           ec="#32ade6", lw=1, ls="--"))  # fmt: skip
            for d in ex[split]["recist_net"][col]:
                p = np.asarray(d["points"])
                ax.plot(p[:2, 0], p[:2, 1], "-", color="#ff3b30", lw=1)
                ax.plot(p[2:, 0], p[2:, 1], "-", color="#ffcc00", lw=1)
                ax.text(
                    d["box"][0], d["box"][1] - 1, f"{d['long_mm']:.1f}x{d['short_mm']:.1f}", **label
                )
            ax.set_title(f"{split} #{i}", fontsize=8)
        for ax in axs[row]:
            ax.axis("off")
    fig.suptitle(
        "green: RECIST ground truth; red/yellow: RECIST-Net long/short diameters (mm); "
        "blue dashed: RetinaNet boxes; both at 1 FP/image",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(figure)
    print(f"wrote {figure}")


# ----------------------------------------------------------------------------- main


def loss_curve(losses: list[float], points: int = 20) -> list[float]:
    """Mean loss over ``points`` equal blocks of steps: is training still improving?"""
    blocks = np.array_split(np.asarray(losses, float), min(points, max(1, len(losses))))
    return [float(b.mean()) for b in blocks if len(b)]


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small CPU smoke run (< 2 min)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per detector")
    ap.add_argument("--time-limit", type=float, default=None, help="training seconds cap each")
    ap.add_argument("--missing-labels", type=float, default=0.0, help="drop rate of train labels")
    ap.add_argument(
        "--center-mode",
        default="intersection",
        choices=["intersection", "bbox", "mean"],
        help="RECIST-Net centre definition (ablation)",
    )
    ap.add_argument(
        "--offset-radius",
        type=int,
        default=0,
        help="RECIST-Net offsets trained within this many cells of each peak and decoded by "
        "a vote over them (default 0: peak-only offsets, as CenterNet)",
    )
    ap.add_argument(
        "--min-overlap",
        type=float,
        default=0.7,
        help="RECIST-Net Gaussian radius parameter (CornerNet's 0.7; larger = sharper targets)",
    )
    ap.add_argument("--workers", type=int, default=None, help="data generation processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    ap.add_argument("--render", default=None, help="draw the examples of this result JSON")
    ap.add_argument("--figure", default="docs/img/recist_benchmark.png", help="with --render")
    args = ap.parse_args()
    if args.render:
        render(args.render, args.figure)
        return
    cfg = dict(QUICK if args.quick else FULL)
    if args.steps:
        cfg["steps"] = args.steps
    if args.time_limit:
        cfg["time_limit"] = args.time_limit
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = args.workers or max(1, min(16, (os.cpu_count() or 1)))
    t_start = time.perf_counter()

    bgs = load_backgrounds(BACKGROUNDS)
    if cfg["size"] != 256:
        bgs = resize_backgrounds(bgs, cfg["size"])
    # data first and timed without CUDA calls: the worker processes must not inherit a context
    t0 = time.perf_counter()
    train = make_split(cfg["n_train"], "mixed", args.seed + 1, bgs, args.missing_labels, workers)
    test_easy = make_split(cfg["n_test"], "easy", args.seed + 2, bgs, 0.0, workers)
    test_hard = make_split(cfg["n_test"], "hard", args.seed + 3, bgs, 0.0, workers)
    t_data = time.perf_counter() - t0
    print(
        f"data: {len(train)} train / {len(test_easy)} easy / {len(test_hard)} hard slices "
        f"({cfg['size']}^2), {train.n_lesions()} / {test_easy.n_lesions()} / "
        f"{test_hard.n_lesions()} lesions, {t_data:.1f} s on {workers} processes"
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for both detectors
    torch.manual_seed(args.seed)
    x_train = images_tensor(train, device=device)
    x_tests = {"easy": images_tensor(test_easy), "hard": images_tensor(test_hard)}
    tests = {"easy": test_easy, "hard": test_hard}

    results: dict[str, dict] = {"config": cfg, "device": str(device)}
    # --- RECIST-Net
    model = RECISTNet(
        width=cfg["width"], stride=cfg["stride"], center_mode=args.center_mode,
        offset_radius=args.offset_radius, min_overlap=args.min_overlap,
    )  # fmt: skip
    cfg.update(
        center_mode=args.center_mode, offset_radius=args.offset_radius,
        min_overlap=args.min_overlap,
    )  # fmt: skip
    rn_losses, t_rn = _timed(
        lambda: train_recist(
            model, train, steps=cfg["steps"], batch_size=cfg["batch"], lr=cfg["lr"],
            seed=args.seed, device=device, images=x_train, time_limit_s=cfg["time_limit"],
            amp=False,  # fp32/TF32 like the baseline
        )
    )  # fmt: skip
    rn_steps = len(rn_losses)
    rn_eval, rn_dets = {}, {}
    for name, ds in tests.items():
        rn_dets[name], t_inf = _timed(
            lambda ds=ds, name=name: predict_recist(
                model, ds, device=device, images=x_tests[name], k=cfg["k"]
            )
        )
        rn_eval[name] = evaluate_recist(rn_dets[name], ds)
        rn_eval[name]["infer_s_per_image"] = t_inf / len(ds)
    # --- RetinaNet (MONAI)
    torch.manual_seed(args.seed)
    det = build_retinanet(cfg["rn_width"], device)
    rt_losses, t_rt = _timed(
        lambda: train_retinanet(
            det, train, x_train, steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
            seed=args.seed, device=device, time_limit=cfg["time_limit"],
        )
    )  # fmt: skip
    rt_eval, examples = {}, {}
    for name, ds in tests.items():
        (b, s, lo, sh), t_inf = _timed(
            lambda ds=ds, name=name: predict_retinanet(det, ds, x_tests[name], device)
        )
        rt_eval[name], _ = evaluate_boxes(ds, b, s, lo, sh)
        examples[name] = example_record(ds, rn_dets[name], b, s)
        rt_eval[name]["infer_s_per_image"] = t_inf / len(ds)

    # --- report
    rates = list(DEFAULT_FP_RATES)
    cols = ["detector", "split", *[f"sens@{r:g}" for r in rates], "avg", "long err mm",
            "short err mm", "matched"]  # fmt: skip
    rows, strata_rows = [], []
    params = {
        "RECIST-Net": sum(p.numel() for p in model.parameters()),
        "RetinaNet (MONAI)": sum(p.numel() for p in det.parameters()),
    }
    for label, ev in (("RECIST-Net", rn_eval), ("RetinaNet (MONAI)", rt_eval)):
        for split, r in ev.items():
            f = r["froc"]
            rows.append([label, split, *f.sensitivities, f.average, r["median_long_err_mm"],
                         r["median_short_err_mm"], r["n_matched"]])  # fmt: skip
            for k, v in f.strata.items():
                strata_rows.append([label, split, k, v.n_lesions, v.at(4.0), v.average])
    print_table("DeepLesion-style FROC (IoU 0.5) and median diameter errors", cols, rows)
    print_table(
        "Size strata (literal rule: hits on other strata count as FPs)",
        ["detector", "split", "stratum", "lesions", "sens@4", "avg"],
        strata_rows,
    )
    extra_rows = [
        ["RECIST-Net", params["RECIST-Net"], rn_steps, t_rn, np.mean(rn_losses[-20:]),
         rn_eval["hard"]["median_endpoint_err_mm"],
         rn_eval["hard"]["median_angle_err_deg"], rn_eval["easy"]["infer_s_per_image"]],
        ["RetinaNet (MONAI)", params["RetinaNet (MONAI)"], len(rt_losses), t_rt,
         np.mean(rt_losses[-20:]), math.nan, math.nan, rt_eval["easy"]["infer_s_per_image"]],
    ]  # fmt: skip
    print_table(
        "Training and geometry",
        ["detector", "params", "steps", "train s", "final loss", "endpoint err mm (hard)",
         "angle err deg (hard)", "infer s/img"],
        extra_rows,
    )  # fmt: skip
    hard_rn = rn_eval["hard"]["froc"].at(4.0)
    hard_rt = rt_eval["hard"]["froc"].at(4.0)
    checks = {
        "hard_sens4_recist": hard_rn,
        "hard_sens4_retinanet": hard_rt,
        "hard_sens4_at_least_baseline": bool(hard_rn >= hard_rt),
        "median_long_err_mm_easy": rn_eval["easy"]["median_long_err_mm"],
        "median_long_err_mm_hard": rn_eval["hard"]["median_long_err_mm"],
        "median_long_err_below_1mm": bool(
            max(rn_eval[s]["median_long_err_mm"] for s in tests) < 1.0
        ),
    }
    print(
        f"\ntargets: hard split sens@4 FPs RECIST-Net {hard_rn:.3f} vs RetinaNet {hard_rt:.3f} "
        f"({'met' if checks['hard_sens4_at_least_baseline'] else 'NOT met'}); median long-"
        f"diameter error easy {checks['median_long_err_mm_easy']:.2f} mm, hard "
        f"{checks['median_long_err_mm_hard']:.2f} mm "
        f"({'met' if checks['median_long_err_below_1mm'] else 'NOT met'}, target < 1 mm)"
    )
    total = time.perf_counter() - t_start
    print(f"total {total:.1f} s on {device}")

    def pack(ev):
        return {
            s: {**{k: v for k, v in r.items() if k != "froc"}, "froc": r["froc"].to_dict()}
            for s, r in ev.items()
        }

    results.update(
        mode="quick" if args.quick else "full",
        data={"n_train": len(train), "n_test": cfg["n_test"], "size": cfg["size"],
              "lesions": [train.n_lesions(), test_easy.n_lesions(), test_hard.n_lesions()],
              "missing_label_rate": args.missing_labels, "generation_s": t_data},
        recist_net={"params": params["RECIST-Net"], "steps": rn_steps, "train_s": t_rn,
                    "losses_first_last": [rn_losses[:5], rn_losses[-5:]],
                    "loss_curve": loss_curve(rn_losses),
                    "eval": pack(rn_eval)},
        retinanet={"params": params["RetinaNet (MONAI)"], "steps": len(rt_losses),
                   "train_s": t_rt, "losses_first_last": [rt_losses[:5], rt_losses[-5:]],
                   "loss_curve": loss_curve(rt_losses),
                   "eval": pack(rt_eval)},
        checks=checks,
        examples=examples,
        seed=args.seed,
        total_s=total,
    )  # fmt: skip
    path = save_results("recist_detection" + ("_quick" if args.quick else ""), results, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
