"""Shared benchmark runner: warm-up, repeats, median and spread, CUDA-event timing, JSON.

Every benchmark under ``bench/`` runs our system and its peers side by side in one run,
prints a table and writes ``bench/results/<name>.json`` (or ``--out``). Use it as::

    from common import Timer, BenchResult, environment, save_results

It imports only torch and the standard library, so it runs on the GPU machine with
``PYTHONPATH=src`` and no install.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class BenchResult:
    """Timing of one configuration: per-repeat seconds and their summary."""

    name: str
    times_s: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def spread_s(self) -> float:
        """Half the inter-quartile range (robust spread); 0 for fewer than 2 repeats."""
        if len(self.times_s) < 2:
            return 0.0
        q = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return (q[2] - q[0]) / 2

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median_s=self.median_s, spread_s=self.spread_s)
        return d


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], Any],
    *,
    name: str = "",
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = None,
    extra: dict[str, Any] | None = None,
) -> BenchResult:
    """Time ``fn`` after ``warmup`` calls; CUDA events on GPU, perf_counter on CPU."""
    dev = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
    for _ in range(warmup):
        fn()
    sync(dev)
    times: list[float] = []
    for _ in range(repeats):
        if use_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return BenchResult(name=name, times_s=times, extra=dict(extra or {}))


def environment() -> dict[str, Any]:
    """Facts about the machine the benchmark ran on, recorded with every result."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host_cpus": os.cpu_count(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["cuda"] = torch.version.cuda
    else:
        env["gpus"] = []
    return env


def save_results(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write ``payload`` plus :func:`environment` as JSON; returns the path."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(doc, indent=2, default=_default))
    return path


def _default(obj: Any) -> Any:
    if isinstance(obj, BenchResult):
        return obj.as_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A plain-text table (no dependency beyond the standard library)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
