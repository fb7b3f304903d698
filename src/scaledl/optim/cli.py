"""``scaledl optim``: train a small real task on local gloo ranks with one of the
communication-efficient optimizers and report accuracy against bytes on the wire."""

from __future__ import annotations

import argparse
import contextlib

from scaledl.cli_utils import add_json_flag, emit, err_console, make_table
from scaledl.optim.names import OPTIMIZERS

#: per-optimizer defaults (learning rate tuned on the digits task; period H)
_DEFAULT_PERIOD = {"cser": 16, "cser-block": 16, "qsparse": 8, "local-sgd": 8, "local-adaalter": 8}


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="optim_command", metavar="SUBCOMMAND")
    b = sub.add_parser(
        "bench",
        help="train an MLP on scikit-learn's digits on N local gloo ranks",
        description=(
            "Train an MLP on scikit-learn's digits on N local gloo ranks with one optimizer; "
            "report the averaged model's loss/accuracy and the bytes each rank sent."
        ),
    )
    b.add_argument("--world-size", type=int, default=4, help="local gloo ranks (default 4)")
    b.add_argument("--optimizer", choices=OPTIMIZERS, default="cser", help="default: cser")
    b.add_argument("--period", type=int, default=None, help="H: reset / averaging period")
    b.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    b.add_argument("--lr", type=float, default=0.2, help="learning rate (default 0.2)")
    b.add_argument("--r1", type=float, default=64.0, help="CSER per-step block ratio")
    b.add_argument("--r2", type=float, default=4.0, help="CSER error-reset block ratio")
    b.add_argument(
        "--ratio", type=float, default=32.0, help="EF-SGD / QSparse block compression ratio"
    )
    b.add_argument("--warmup-steps", type=int, default=20, help="LR warm-up steps")
    b.add_argument("--batch-size", type=int, default=16, help="per-rank batch (default 16)")
    b.add_argument("--seed", type=int, default=0)
    add_json_flag(b)
    b.set_defaults(func=_bench)
    parser.set_defaults(func=lambda args: parser.print_help())


def _bench(args: argparse.Namespace) -> int:
    from scaledl.optim.digits_task import RunSpec, run_local

    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    period = args.period if args.period is not None else _DEFAULT_PERIOD.get(args.optimizer, 1)
    if period < 1:
        raise ValueError(f"--period must be >= 1, got {period}")
    spec = RunSpec(
        args.optimizer,
        args.lr,
        period=period,
        r1=args.r1,
        r2=args.r2,
        ratio=args.ratio,
        warmup_steps=args.warmup_steps,
    )
    label = f"training with {args.optimizer} on {args.world_size} gloo ranks ({args.steps} steps)"
    # The ranks are separate processes: a spinner on stderr shows the job is alive.
    waiting = contextlib.nullcontext() if args.json else err_console.status(label)
    with waiting:
        (rec,) = run_local(
            [spec], args.world_size, args.steps, batch_size=args.batch_size, seed=args.seed
        )
    result = {
        "optimizer": args.optimizer,
        "world_size": args.world_size,
        "period": period,
        "steps": args.steps,
        "final_loss": rec["final_loss"],
        "final_accuracy": rec["final_accuracy"],
        "bytes_sent_per_rank": rec["bytes_sent"],
        "measured_ratio_vs_fp32": rec["measured_ratio"],
        "expected_ratio_vs_fp32": rec["expected_ratio"],
        "wall_s": rec["wall_s"],
        "curve": rec["curve"],
    }
    rows = [(k, v) for k, v in result.items() if k != "curve"]
    emit(args, result, make_table(f"scaledl optim bench: {args.optimizer}", ["key", "value"], rows))
    return 0
