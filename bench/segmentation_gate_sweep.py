"""What limits ShapePriorNet under occlusion: the closed-gate prior's settings, with and without
perfect occluder detection, on one trained model per variant.

Trains each ShapePriorNet once on clean synthetic chest X-rays (as
``segmentation_robustness.py`` does, same data and defaults), then changes only settings that
act after training: the blur of the warped template masks (``match_blur``), the atlas size
(``match_templates``), the gap filling of the match displacement (``match_fill``) and its
soft-argmax temperature (``match_tau``). Each setting is evaluated on the clean, noise-3 and
occlusion-3 test sets (fixed template, mean Dice over classes, per-class Dice and the Dice of
the occluded structure), with the calibrated gate and with the oracle that also closes it on
every occluder (``segmentation_robustness.oracle_occluders``; a diagnostic: it knows the clean
image). The oracle rows bound what a better occluder detector could add at each setting.

    PYTHONPATH=src python bench/segmentation_gate_sweep.py            # one GPU, ~6 min
    PYTHONPATH=src python bench/segmentation_gate_sweep.py --quick    # CPU check, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import segmentation_robustness as robustness
from common import print_table, save_results

from scaledl.medical.segmentation_data import lung_source, synthetic_cxr_splits
from scaledl.medical.segmentation_train import (
    TemplateBank,
    TrainConfig,
    predict_proba,
    segmentation_metrics,
    train_segmenter,
)

#: (label, attributes set on the trained model); the first is the default
SETTINGS: list[tuple[str, dict[str, float]]] = [
    ("default", {}),
    ("blur 0.015", {"match_blur": 0.015}),
    ("blur 0", {"match_blur": 0.0}),
    ("atlas 1", {"match_templates": 1}),
    ("atlas 10", {"match_templates": 10}),
    ("fill 0.1", {"match_fill": 0.1}),
    ("fill 0.4", {"match_fill": 0.4}),
    ("tau 50", {"match_tau": 50.0}),
    ("tau 1000", {"match_tau": 1000.0}),
]
CONDITIONS = ("clean", "noise-3", "occlusion-3")


@contextlib.contextmanager
def settings(model: torch.nn.Module, attrs: dict[str, float]):
    """The model with these attributes, restored afterwards."""
    saved = {a: getattr(model, a) for a in attrs}
    for a, v in attrs.items():
        setattr(model, a, v)
    try:
        yield
    finally:
        for a, v in saved.items():
            setattr(model, a, v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU run that checks the script")
    p.add_argument("--models", nargs="+", default=["SPN-prototype+prior", "SPN-dense+prior"])
    p.add_argument("--iters", type=int, help="training iterations (default 700; quick 20)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", help="JSON path (default bench/results/segmentation_gate_sweep.json)")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    size, n_train, n_test, batch = (64, 24, 12, 4) if args.quick else (128, 200, 200, 16)
    iters = args.iters or (20 if args.quick else 700)
    features = [4, 8, 16, 32, 64] if args.quick else [32, 64, 128, 256, 512]
    torch.backends.cudnn.benchmark = True
    source = lung_source("auto")
    splits = synthetic_cxr_splits(size, n_train, 0, n_test, seed=0, lungs=source)
    train, test = splits["train"], splits["test"]
    k = train.num_classes
    sets, targets = robustness.test_sets(test, (3,))
    sets = {c: sets[c] for c in CONDITIONS}
    records, rows = [], []
    for name in args.models:
        torch.manual_seed(0)
        model = robustness.build_models(features, k, "gate", ["BasicUNet", name])[name]
        if not getattr(model, "match_gate", False):
            raise ValueError(f"{name} has no match gate to sweep")
        bank = TemplateBank(train, device=device)
        cfg = TrainConfig(
            iterations=iters, batch_size=batch, seed=0, anomaly_iterations=20 if args.quick else 600
        )
        t0 = time.perf_counter()
        train_segmenter(model, train, cfg, device=device)
        print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        for label, attrs in SETTINGS:
            for oracle in (False, True):
                rec = {"model": name, "setting": label, "oracle": oracle, "attrs": attrs}
                with settings(model, attrs):
                    for cond, imgs in sets.items():
                        if oracle and not cond.startswith("occlusion"):
                            rec[cond] = records[-1][cond]  # the oracle changes occlusion only
                            continue
                        ctx = (
                            robustness.oracle_occluders(model, imgs, test.images)
                            if oracle
                            else contextlib.nullcontext()
                        )
                        with ctx:
                            probs = predict_proba(model, imgs, bank, "fixed", 5, 32, device)
                        d = segmentation_metrics(probs.argmax(1), test.labels, k, hd95=False)[
                            "dice"
                        ]
                        rec[cond] = {
                            "mean": 100 * float(d.mean()),
                            "per_class": [100 * float(x) for x in d.mean(0)],
                        }
                        if cond in targets:
                            rec[cond]["struct"] = 100 * robustness.target_dice(d, targets[cond])
                records.append(rec)
                occ = rec["occlusion-3"]
                rows.append(
                    [
                        name,
                        label,
                        "yes" if oracle else "",
                        round(rec["clean"]["mean"], 2),
                        round(rec["noise-3"]["mean"], 2),
                        round(occ["mean"], 2),
                        round(occ["struct"], 2),
                        " ".join(f"{x:.1f}" for x in occ["per_class"]),
                    ]
                )
    print_table(
        f"Closed-gate prior settings, mean Dice (%); per class: {', '.join(train.class_names)}",
        [
            "model",
            "setting",
            "oracle",
            "clean",
            "noise-3",
            "occl-3",
            "occl-3 struct",
            "occl-3 per class",
        ],
        rows,
    )
    path = save_results(
        "segmentation_gate_sweep",
        {
            "config": vars(args) | {"size": size, "n_train": n_train, "n_test": n_test},
            "lungs": source,
            "classes": list(train.class_names),
            "records": records,
        },
        args.out,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
