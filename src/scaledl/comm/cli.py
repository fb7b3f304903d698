"""``scaledl comm``: compressed DDP training on local gloo ranks, and the compressor list."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

from scaledl.cli_utils import add_json_flag, emit, err_console, make_table


def _compressor_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.ratio is not None:
        if args.compressor not in ("topk", "randomk"):
            raise ValueError(f"--ratio applies to topk and randomk, not {args.compressor!r}")
        opts["ratio"] = args.ratio
    if args.levels is not None:
        if args.compressor != "dithering":
            raise ValueError(f"--levels applies to dithering, not {args.compressor!r}")
        opts["levels"] = args.levels
    return opts


def _bench(args: argparse.Namespace) -> int:
    from scaledl.comm.compressors import available_compressors, get_compressor
    from scaledl.comm.digits import train_digits
    from scaledl.distributed import launch

    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    name = None if args.compressor == "none" else args.compressor
    if name is not None and name not in available_compressors():
        choices = ", ".join(["none", *available_compressors()])
        raise ValueError(f"unknown compressor {name!r}; choose one of {choices}")
    opts = _compressor_options(args) if name else {}
    if args.two_way:
        mode = "two_way"
    elif name and get_compressor(name, **opts).allreduce_compatible:
        mode = "allreduce"
    else:
        mode = "one_way"
    what = (
        f"training the digits MLP on {args.world_size} gloo rank(s), {args.steps} steps, "
        f"compressor {args.compressor} ({mode if name else 'dense'})"
    )
    with err_console.status(what, spinner="dots") if not args.json else nullcontext():
        runs = launch(
            train_digits,
            args.world_size,
            name,
            compressor_kwargs=opts,
            mode=mode,
            ef=args.ef,
            steps=args.steps,
            lr=args.lr,
            optimizer=args.optimizer,
            seed=args.seed,
            timeout_s=max(120.0, 2.0 * args.steps),
        )
    first = runs[0]
    stats = first.get("stats")
    params = first["params"]
    n = args.world_size
    dense_step = 2 * (n - 1) * 4 * params // n  # what fp32 ring all-reduce sends per rank
    result = {
        "world_size": n,
        "compressor": args.compressor,
        "mode": mode if name else "dense_allreduce",
        "ef": args.ef if name else "none",
        "steps": args.steps,
        "parameters": params,
        "train_loss": first["train_loss"],
        "test_loss": first["test_loss"],
        "test_accuracy": first["accuracy"],
        "bytes_per_step": stats["bytes_per_step"] if stats else dense_step,
        "fp32_bytes_per_step": dense_step,
        "ratio_vs_fp32": stats["ratio_vs_fp32"] if stats else 1.0,
        "ratio_vs_fp16": stats["ratio_vs_fp16"] if stats else 0.5,
        "uncompressed_bytes": stats["uncompressed_bytes_sent"] if stats else None,
        "max_rank_param_diff": max(r["max_rank_param_diff"] for r in runs),
    }
    table = make_table(
        f"scaledl comm bench: {args.compressor}, {n} rank(s)",
        ["metric", "value"],
        list(result.items()),
    )
    emit(args, result, table)
    return 0


def _list(args: argparse.Namespace) -> int:
    from scaledl.comm.compressors import available_compressors, get_compressor

    rows = []
    for name in available_compressors():
        comp = get_compressor(name)
        rows.append(
            {
                "name": name,
                "default": repr(comp),
                "payload_bytes_1M": comp.payload_bytes(1 << 20),
                "ratio_vs_fp32": comp.ratio(1 << 20),
                "allreduce_compatible": comp.allreduce_compatible,
            }
        )
    table = make_table(
        "compressors (payload for 2**20 elements)",
        list(rows[0]),
        [list(r.values()) for r in rows],
    )
    emit(args, {"compressors": rows}, table)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="comm_command", metavar="ACTION")
    bench = sub.add_parser(
        "bench",
        help="train a small model on N local gloo ranks with a compressor",
        description=(
            "Train an MLP on scikit-learn's digits with DDP on N local gloo ranks and print "
            "loss, accuracy, bytes per step, compression ratios and the largest parameter "
            "difference between ranks. Without --two-way the exchange is an all-reduce for "
            "compressors that allow it, else an all-gather (one-way)."
        ),
    )
    bench.add_argument("--world-size", type=int, default=2, help="number of ranks (default 2)")
    bench.add_argument(
        "--compressor", default="onebit", help="compressor name, or 'none' for fp32 DDP"
    )
    bench.add_argument("--two-way", action="store_true", help="two-way (server) compression")
    bench.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    bench.add_argument("--ratio", type=float, help="top-k / random-k fraction or count")
    bench.add_argument("--levels", type=int, help="dithering levels")
    bench.add_argument(
        "--ef",
        default="vanilla",
        choices=["none", "vanilla", "lr_corrected", "sparse"],
        help="error feedback (default vanilla)",
    )
    bench.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    bench.add_argument("--optimizer", default="sgd", choices=["sgd", "clan"])
    bench.add_argument("--seed", type=int, default=0)
    add_json_flag(bench)
    bench.set_defaults(func=_bench)
    lst = sub.add_parser("list", help="the available compressors and their payload sizes")
    add_json_flag(lst)
    lst.set_defaults(func=_list)

    def _no_action(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_no_action)
