"""Local AdaAlter against its loss target on character-level language modelling.

N local gloo ranks (default 8) train a one-layer character LSTM on the bytes of Python's
standard library (``scaledl.optim.charlm_task``: offline, on every machine), each rank on its
own i.i.d. windows. Side by side in one run, every method over the same small learning-rate
grid of its family and the same seeds: synchronous AdaGrad, synchronous AdaAlter, Local
AdaAlter at H = 4, 8, 16, synchronous momentum SGD and local SGD at H = 8. The compared
figure is the **held-out** cross-entropy (nats per character) of the averaged model after the
last step, with its perplexity; each method is scored at the grid point with the lowest mean
over seeds. Target (issue 5): Local AdaAlter at H = 8 within 1% of synchronous AdaGrad.

Usage::

    PYTHONPATH=src python bench/optim_lm.py              # 8 ranks, 1 seed: ~10 min on 2 cores
    PYTHONPATH=src python bench/optim_lm.py --seeds 2    # the result in docs/optim.md
    PYTHONPATH=src python bench/optim_lm.py --quick      # 4 ranks, one lr, 60 steps: < 1 min

``--no-sgd``, ``--periods``, ``--ada-warmup``, ``--initial-accumulator`` and ``--update-clip``
rerun parts of it for diagnosis (the synchronous AdaGrad/AdaAlter baselines always run with
the same settings as Local AdaAlter). ``--device`` defaults to CUDA when present (the ranks
still communicate over gloo).

Needs only torch (the corpus is the running Python's standard library; its SHA-256 and the
Python version go into the JSON, since the text differs between Python versions).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, save_results
from optim_bytes_accuracy import best_per_method, loss_target_verdicts, run_seeds

from scaledl.optim.charlm_task import CharLMTask, load_stdlib_corpus, run_local
from scaledl.optim.digits_task import RunSpec

#: the grid every AdaGrad-family method is tuned over (sync AdaGrad/AdaAlter, Local AdaAlter)
ADA_LRS = (0.2, 0.4, 0.8)
#: the grid of the SGD family (Nesterov momentum 0.9, cosine decay)
SGD_LRS = (4.0, 8.0, 16.0)
ADA_WARMUP, SGD_WARMUP = 40, 20
MAX_GRAD_NORM = 5.0
PERIODS = (4, 8, 16)


def lm_specs(
    ada_lrs: tuple[float, ...],
    sgd_lrs: tuple[float, ...],
    periods: tuple[int, ...],
    ada_warmup: int = ADA_WARMUP,
    update_clip: float | None = 1.0,
    initial_accumulator: float = 0.0,
) -> list[RunSpec]:
    """Every method at every lr of its family's grid; labels end with `` lr=<lr>``. The
    AdaGrad family shares ``ada_warmup`` (Local AdaAlter's synchronous warm-up, the sync
    methods' lr ramp) and ``initial_accumulator`` (B at the start); ``update_clip`` is
    AdaAlter's denominator floor."""
    common = dict(max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0)
    specs = []
    for lr in ada_lrs:
        w = dict(
            warmup_steps=ada_warmup,
            update_clip=update_clip,
            initial_accumulator_value=initial_accumulator,
            **common,
        )
        specs += [
            RunSpec("adagrad", lr, f"sync AdaGrad lr={lr}", **w),
            RunSpec("adaalter", lr, f"sync AdaAlter lr={lr}", **w),
        ]
        specs += [
            RunSpec("local-adaalter", lr, f"Local AdaAlter H={h} lr={lr}", period=h, **w)
            for h in periods
        ]
    for lr in sgd_lrs:
        w = dict(warmup_steps=SGD_WARMUP, **common)
        specs += [
            RunSpec("sgd", lr, f"sync SGD lr={lr}", **w),
            RunSpec("local-sgd", lr, f"local SGD H=8 lr={lr}", period=8, **w),
        ]
    return specs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 ranks, one lr, 60 steps (< 2 min)")
    ap.add_argument("--world-size", type=int, default=None, help="ranks (default 8; quick 4)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (200; quick 60)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 1)")
    ap.add_argument("--ada-lrs", type=float, nargs="+", default=None, help=f"{list(ADA_LRS)}")
    ap.add_argument("--sgd-lrs", type=float, nargs="+", default=None, help=f"{list(SGD_LRS)}")
    ap.add_argument(
        "--periods", type=int, nargs="+", default=list(PERIODS), help="Local AdaAlter H"
    )
    ap.add_argument(
        "--ada-warmup", type=int, default=ADA_WARMUP, help="AdaGrad-family warm-up steps"
    )
    ap.add_argument(
        "--update-clip",
        type=float,
        default=1.0,
        help="AdaAlter's denominator floor (0: the paper's unguarded rule)",
    )
    ap.add_argument(
        "--initial-accumulator",
        type=float,
        default=0.0,
        help="AdaGrad-family initial accumulator B0 (default 0, PyTorch's Adagrad default)",
    )
    ap.add_argument(
        "--no-sgd", action="store_true", help="AdaGrad family only (for diagnostic reruns)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="windows per rank per step")
    ap.add_argument("--seq-len", type=int, default=64, help="characters per window")
    ap.add_argument("--hidden", type=int, default=128, help="LSTM width")
    ap.add_argument("--embed", type=int, default=32, help="embedding width")
    ap.add_argument("--max-bytes", type=int, default=1_000_000, help="corpus byte budget")
    ap.add_argument("--heldout-bytes", type=int, default=32_768, help="held-out tail")
    ap.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if present"
    )
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = args.world_size or (4 if args.quick else 8)
    steps = args.steps or (60 if args.quick else 200)
    n_seeds = args.seeds or 1
    ada_lrs = tuple(args.ada_lrs or (ADA_LRS[1:2] if args.quick else ADA_LRS))
    sgd_lrs = tuple(args.sgd_lrs or (SGD_LRS[1:2] if args.quick else SGD_LRS))
    sgd_lrs = () if args.no_sgd else sgd_lrs
    periods = tuple([8] if args.quick and args.periods == list(PERIODS) else args.periods)
    if n_seeds < 1 or world < 1 or steps < 1 or any(x <= 0 for x in ada_lrs + sgd_lrs):
        raise ValueError("--world-size, --steps, --seeds and every lr must be positive")
    corpus = load_stdlib_corpus(args.max_bytes, args.heldout_bytes)
    task = CharLMTask(corpus, args.seq_len, args.embed, args.hidden, device)
    if min(args.ada_warmup, args.update_clip, args.initial_accumulator) < 0:
        raise ValueError("--ada-warmup, --update-clip and --initial-accumulator must be >= 0")
    clip = args.update_clip or None
    specs = lm_specs(ada_lrs, sgd_lrs, periods, args.ada_warmup, clip, args.initial_accumulator)
    seeds = list(range(args.seed, args.seed + n_seeds))
    params = sum(p.numel() for p in task.make_model(0).parameters())
    print(
        f"{len(specs)} runs x {steps} steps x {n_seeds} seed(s) on {world} gloo ranks ({device}); "
        f"char LSTM {params} parameters, corpus {corpus.files} files, "
        f"sha256 {corpus.sha256[:12]}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    records = run_seeds(
        lambda seed: run_local(
            specs,
            world,
            steps,
            task=task,
            seed=seed,
            batch_size=args.batch_size,
            eval_points=2,
            verbose=True,
            timeout_s=3600,
        ),
        seeds,
    )
    total = time.perf_counter() - start
    best = best_per_method(records, also=("final_perplexity",))
    ref = best["sync AdaGrad"]["mean_loss"]
    rows = [
        [
            m,
            b["lr"],
            round(b["expected_ratio"], 1),
            round(b["measured_ratio"], 1),
            round(b["bytes_sent"] / 1e6, 2),
            round(b["mean_loss"], 4),
            " ".join(f"{x:.4f}" for x in b["losses"]),
            round(b["mean_perplexity"], 3),
            f"{100 * (b['mean_loss'] / ref - 1):+.2f}%",
        ]
        for m, b in best.items()
    ]
    print_table(
        f"char LSTM ({params} params), {world} ranks x {args.batch_size} windows of "
        f"{args.seq_len}, {steps} steps, i.i.d.: averaged model's held-out loss, best lr of "
        f"each family's grid, mean over seeds {seeds}",
        [
            "method",
            "best lr",
            "ratio (exp.)",
            "ratio (meas.)",
            "MB sent/rank",
            "held-out loss",
            "per-seed loss",
            "perplexity",
            "vs AdaGrad",
        ],
        rows,
    )
    print_table(
        "every run: held-out loss (nats/char)",
        ["run", "seed", "loss", "perplexity", "wall s"],
        [
            [r["name"], r["seed"], round(r["final_loss"], 4), round(r["final_perplexity"], 3),
             round(r["wall_s"], 1)]
            for r in records
        ],
    )  # fmt: skip
    verdicts = loss_target_verdicts(best, periods)
    print("\ntargets: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in verdicts.items()))
    print(f"total wall time {total:.0f} s")
    path = save_results(
        "optim_lm" + ("_quick" if args.quick else ""),
        {
            "mode": "quick" if args.quick else "full",
            "device": device,
            "world_size": world,
            "steps": steps,
            "seeds": seeds,
            "ada_lrs": list(ada_lrs),
            "sgd_lrs": list(sgd_lrs),
            "ada_warmup": args.ada_warmup,
            "update_clip": clip,
            "initial_accumulator": args.initial_accumulator,
            "model": {
                "parameters": params,
                "embed": args.embed,
                "hidden": args.hidden,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
            },
            "corpus": {
                "source": "Python standard library, sorted top-level *.py files",
                "python": platform.python_version(),
                "sha256": corpus.sha256,
                "files": corpus.files,
                "train_bytes": len(corpus.train),
                "heldout_bytes": len(corpus.heldout),
                "vocab_size": corpus.vocab_size,
            },
            "metric": "held-out cross-entropy of the averaged model, nats per character",
            "best_per_method": best,
            "verdicts": verdicts,
            "total_wall_s": total,
            "runs": records,
        },
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
