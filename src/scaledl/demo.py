"""``scaledl demo``: a short tour of every implemented system on embedded defaults.

Each capability contributes ``run_demo() -> DemoResult`` in its ``demo`` module; systems whose
module does not exist yet are listed as not yet available. The whole tour is meant to take a
few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scaledl.cli_utils import add_json_flag, console, emit, err_console, make_table


@dataclass
class DemoResult:
    """What one system's demo shows: a one-line headline and the figures behind it."""

    headline: str
    figures: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


#: (system, paper, module with ``run_demo``). NAS steering and SMAP are planned, not built yet.
SYSTEMS: list[tuple[str, str, str]] = [
    ("foundation", "torch.distributed launcher", "scaledl.demo"),
    ("LEMON", "arXiv 2310.07999", "scaledl.expansion.demo"),
    ("Baechi", "arXiv 2301.08695", "scaledl.placement.demo"),
    ("BytePS-Compress", "arXiv 2105.07829", "scaledl.comm.demo"),
    ("CSER / Local AdaAlter", "arXiv 2007.13221, 1911.09030", "scaledl.optim.demo"),
    ("Shape priors", "arXiv 2204.11090", "scaledl.medical.segment_demo"),
    ("RECIST-Net", "arXiv 2107.08715", "scaledl.medical.detect_demo"),
    ("NAS steering", "arXiv 2009.13008", "scaledl.nas.demo"),
    ("SMAP", "arXiv 2007.15591", "scaledl.smap.demo"),
]


def _allreduce_rank() -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return float(t.item())


def run_demo() -> DemoResult:
    """The foundation's own demo: an all-reduce over two local gloo ranks."""
    from scaledl.distributed import launch

    sums = launch(_allreduce_rank, 2, backend="gloo", timeout_s=120)
    return DemoResult(
        headline=f"all-reduce on 2 gloo ranks: sum(1, 2) = {sums[0]:g} on every rank",
        figures={"sums": sums},
        ok=all(s == 3.0 for s in sums),
    )


def _load(module: str) -> Callable[[], DemoResult] | None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None
        raise
    return mod.run_demo


def run_all(only: list[str] | None = None, debug: bool = False) -> list[dict[str, Any]]:
    """Run every available demo (or those named in ``only``) and collect one row each."""
    rows: list[dict[str, Any]] = []
    names = {s[0].lower() for s in SYSTEMS}
    for name in only or []:
        if name.lower() not in names:
            raise ValueError(
                f"unknown system {name!r}; choose from {', '.join(s[0] for s in SYSTEMS)}"
            )
    for system, paper, module in SYSTEMS:
        if only and system.lower() not in {o.lower() for o in only}:
            continue
        fn = _load(module)
        row: dict[str, Any] = {"system": system, "paper": paper}
        if fn is None:
            row.update(status="not yet available", headline="", seconds=0.0, figures={})
            rows.append(row)
            continue
        err_console.print(f"[bold]demo[/bold] {system} ...")
        t0 = time.perf_counter()
        try:
            res = fn()
            row.update(
                status="ok" if res.ok else "check failed",
                headline=res.headline,
                figures=res.figures,
            )
        except Exception as exc:
            if debug:
                traceback.print_exc()
            row.update(status="error", headline=f"{type(exc).__name__}: {exc}", figures={})
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def _cmd(args: argparse.Namespace) -> int:
    rows = run_all(args.only, debug=args.debug_demo)
    table = make_table(
        "scaledl demo",
        ["system", "paper", "status", "result", "seconds"],
        [(r["system"], r["paper"], r["status"], r["headline"], r["seconds"]) for r in rows],
    )
    emit(args, {"systems": rows}, table)
    if not args.json:
        ready = sum(r["status"] == "ok" for r in rows)
        console.print(f"{ready} of {len(rows)} systems ran; see README.md for each quick start.")
    return 1 if any(r["status"] in ("error", "check failed") for r in rows) else 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only", nargs="+", metavar="SYSTEM", help="run only these systems (names as listed)"
    )
    parser.add_argument(
        "--debug-demo", action="store_true", help="print tracebacks of failing demos"
    )
    add_json_flag(parser)
    parser.set_defaults(func=_cmd)
