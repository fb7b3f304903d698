"""``scaledl optim``: train a small real task (digits MLP or character LM) on local gloo ranks
with one of the communication-efficient optimizers and report quality against bytes on the
wire."""

from __future__ import annotations

import argparse
import contextlib

from scaledl.cli_utils import add_json_flag, emit, err_console, make_table
from scaledl.optim.names import OPTIMIZERS

#: per-optimizer defaults (period H)
_DEFAULT_PERIOD = {"cser": 16, "cser-block": 16, "qsparse": 8, "local-sgd": 8, "local-adaalter": 8}
TASKS = ("digits", "charlm")
#: default learning rates per task: the digits grid's 0.2; on the character LM the best points
#: of ``bench/optim_lm.py``'s grids (AdaGrad family / SGD family)
_ADA_FAMILY = ("adagrad", "adaalter", "local-adaalter")
_CHARLM_LR = {"ada": 0.4, "sgd": 8.0}


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="optim_command", metavar="SUBCOMMAND")
    b = sub.add_parser(
        "bench",
        help="train a small real task on N local gloo ranks",
        description=(
            "Train an MLP on scikit-learn's digits (--task digits) or a character LSTM on "
            "Python's standard library (--task charlm) on N local gloo ranks with one "
            "optimizer; report the averaged model's loss (digits: training loss and test "
            "accuracy; charlm: held-out loss and perplexity) and the bytes each rank sent."
        ),
    )
    b.add_argument("--task", choices=TASKS, default="digits", help="default: digits")
    b.add_argument("--world-size", type=int, default=4, help="local gloo ranks (default 4)")
    b.add_argument("--optimizer", choices=OPTIMIZERS, default="cser", help="default: cser")
    b.add_argument("--period", type=int, default=None, help="H: reset / averaging period")
    b.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    b.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (digits 0.2; charlm 0.4 AdaGrad family, 8.0 SGD family)",
    )
    b.add_argument("--r1", type=float, default=64.0, help="CSER per-step block ratio")
    b.add_argument("--r2", type=float, default=4.0, help="CSER error-reset block ratio")
    b.add_argument(
        "--ratio", type=float, default=32.0, help="EF-SGD / QSparse block compression ratio"
    )
    b.add_argument("--warmup-steps", type=int, default=20, help="LR warm-up steps")
    b.add_argument(
        "--batch-size", type=int, default=None, help="per-rank batch (digits 16, charlm 8)"
    )
    b.add_argument("--seed", type=int, default=0)
    add_json_flag(b)
    b.set_defaults(func=_bench)
    parser.set_defaults(func=lambda args: parser.print_help())


def _bench(args: argparse.Namespace) -> int:
    from scaledl.optim.digits_task import RunSpec

    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    charlm = args.task == "charlm"
    batch_size = args.batch_size if args.batch_size is not None else (8 if charlm else 16)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    period = args.period if args.period is not None else _DEFAULT_PERIOD.get(args.optimizer, 1)
    if period < 1:
        raise ValueError(f"--period must be >= 1, got {period}")
    lr = args.lr
    if lr is None:
        family = "ada" if args.optimizer in _ADA_FAMILY else "sgd"
        lr = _CHARLM_LR[family] if charlm else 0.2
    spec = RunSpec(
        args.optimizer,
        lr,
        period=period,
        r1=args.r1,
        r2=args.r2,
        ratio=args.ratio,
        warmup_steps=args.warmup_steps,
        # The LM settings of bench/optim_lm.py: clipping, no weight decay, B0 = 0.
        max_grad_norm=5.0 if charlm else None,
        weight_decay=0.0 if charlm else 5e-4,
        initial_accumulator_value=0.0 if charlm else 0.1,
    )
    if charlm:
        from scaledl.optim.charlm_task import run_local
    else:
        from scaledl.optim.digits_task import run_local
    label = (
        f"training {args.task} with {args.optimizer} on {args.world_size} gloo ranks "
        f"({args.steps} steps)"
    )
    # The ranks are separate processes: a spinner on stderr shows the job is alive.
    waiting = contextlib.nullcontext() if args.json else err_console.status(label)
    with waiting:
        (rec,) = run_local(
            [spec], args.world_size, args.steps, batch_size=batch_size, seed=args.seed
        )
    result = {
        "task": args.task,
        "optimizer": args.optimizer,
        "world_size": args.world_size,
        "period": period,
        "lr": lr,
        "steps": args.steps,
        **{k: v for k, v in rec.items() if k.startswith("final_")},
        "bytes_sent_per_rank": rec["bytes_sent"],
        "measured_ratio_vs_fp32": rec["measured_ratio"],
        "expected_ratio_vs_fp32": rec["expected_ratio"],
        "wall_s": rec["wall_s"],
        "curve": rec["curve"],
    }
    rows = [(k, v) for k, v in result.items() if k != "curve"]
    title = f"scaledl optim bench: {args.task}, {args.optimizer}"
    emit(args, result, make_table(title, ["key", "value"], rows))
    return 0
