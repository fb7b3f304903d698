"""``scaledl place``: place a model's training graph on memory-limited devices.

    scaledl place MODEL --devices N --memory GIB --algorithm {m-topo,m-etf,m-sct}
                  [--batch B] [--contention {shared,link,none}] [--json] [--gantt FILE.png]

MODEL is a built-in model (see ``--help``) or ``package.module:function`` returning
``(model, example_inputs[, leaf_modules])``. Built-in models are built on the ``meta`` device,
so planning needs no memory for their weights; costs come from the analytic roofline.
"""

from __future__ import annotations

import argparse

from scaledl.cli_utils import add_json_flag, console, emit, make_table, progress

#: The built-in models (``scaledl.placement.models.BUILTIN_MODELS``), listed here so that
#: building the parser does not import torch.
MODEL_NAMES = (
    "transformer",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "inception",
    "branches",
)


def register(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(MODEL_NAMES)
    parser.add_argument("model", help=f"built-in model ({names}) or package.module:function")
    parser.add_argument("--devices", type=int, default=2, help="number of devices (default 2)")
    parser.add_argument(
        "--memory", type=float, default=16.0, metavar="GIB", help="memory per device in GiB"
    )
    parser.add_argument(
        "--algorithm", choices=["m-topo", "m-etf", "m-sct"], default="m-etf", help="placer"
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size of built-in models")
    parser.add_argument(
        "--contention",
        choices=["shared", "link", "none"],
        default="shared",
        help="communication contention model (default: one shared channel per device)",
    )
    parser.add_argument(
        "--device-kind",
        choices=["h100", "a100", "cpu"],
        default="h100",
        help="roofline used to estimate op times (default h100)",
    )
    parser.add_argument(
        "--inference", action="store_true", help="place the forward graph only (no training)"
    )
    parser.add_argument(
        "--refine",
        nargs="?",
        type=float,
        const=10.0,
        default=None,
        metavar="SECONDS",
        help="improve the placer's plan by local search (single-group moves kept when the "
        "simulated step drops and memory fits), for at most SECONDS (default 10)",
    )
    parser.add_argument("--gantt", metavar="FILE.png", help="draw the schedule per device")
    add_json_flag(parser)
    parser.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from scaledl.placement.cost_model import GIB, ROOFLINES, Cluster
    from scaledl.placement.models import BUILTIN_MODELS, load_model
    from scaledl.placement.pipeline import place_graph
    from scaledl.placement.trace import trace

    if args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    if args.memory <= 0:
        raise ValueError(f"--memory must be > 0 GiB, got {args.memory}")
    if args.refine is not None and args.refine <= 0:
        raise ValueError(f"--refine must be > 0 seconds, got {args.refine}")
    steps = iter(["trace", "place", "report"])
    plan = None
    for step in progress(steps, total=3, description="placing", disable=args.json):
        if step == "trace":
            device = "meta" if args.model in BUILTIN_MODELS else "cpu"
            case = load_model(args.model, batch=args.batch, device=device)
            traced = trace(
                case.model,
                case.inputs,
                leaf_modules=case.leaf_modules,
                training=not args.inference,
                roofline=ROOFLINES[args.device_kind],
            )
        elif step == "place":
            cluster = Cluster.uniform(args.devices, args.memory * GIB, contention=args.contention)
            refine = {"refine": True, "refine_seconds": args.refine} if args.refine else {}
            plan = place_graph(traced.op_graph(), cluster, args.algorithm, **refine)
            plan.traced = traced
    assert plan is not None
    summary = plan.summary()
    summary["model"] = args.model
    summary["placement"] = plan.fx_placement()
    if args.gantt:
        from scaledl.placement.gantt import draw_gantt

        replay = plan.replay()
        draw_gantt(
            plan.graph,
            replay.schedule,
            args.gantt,
            n_devices=args.devices,
            title=f"{args.model}: {plan.algorithm} on {args.devices} x {args.memory:g} GiB, "
            f"simulated step {replay.makespan * 1e3:.3g} ms",
        )
        summary["gantt"] = args.gantt
    rows = [
        (f"device {d}", summary["nodes_per_device"][d], summary["peak_memory_gib"][d], args.memory)
        for d in range(args.devices)
    ]
    table = make_table(
        f"{args.model}: {plan.algorithm} placement",
        ["device", "nodes", "peak GiB", "limit GiB"],
        rows,
    )
    emit(args, summary, table)
    if not args.json:
        console.print(
            f"placed {summary['nodes']} nodes ({summary['shrunk_nodes']} after grouping) in "
            f"{summary['placement_seconds']:.3g} s; simulated step "
            f"{summary['simulated_step_time_s'] * 1e3:.4g} ms vs lower bound "
            f"{summary['lower_bound_s'] * 1e3:.4g} ms "
            f"(x{summary['makespan_over_lower_bound']:.3g})"
        )
    return 0
