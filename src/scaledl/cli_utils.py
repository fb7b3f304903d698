"""Helpers shared by the per-capability CLI commands: JSON output, tables, progress bars.

Every command follows the same conventions:

- ``--json`` prints one JSON object on stdout and nothing else there (progress goes to stderr);
- human output is a rich table;
- bad input raises ``ValueError`` (or :class:`scaledl.errors.ScaledlError`), which
  :func:`scaledl.cli.main` prints as one line and turns into a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

T = TypeVar("T")

#: Human output; progress and diagnostics go to stderr so ``--json`` stdout stays clean.
#: Piped output (logs, CI) gets a wide console instead of rich's 80-column default, so
#: result tables stay readable; ``COLUMNS`` overrides it.
console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160")))
err_console = Console(stderr=True)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Add the standard ``--json`` flag."""
    parser.add_argument(
        "--json", action="store_true", help="print one machine-readable JSON object on stdout"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def to_json(obj: Any) -> str:
    """Serialise results (tensors, numpy scalars, nested dicts) to JSON text."""
    return json.dumps(_jsonable(obj), indent=2, sort_keys=False)


def make_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table with the given columns; numbers are formatted compactly."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    return table


def fmt(value: Any) -> str:
    """Compact human formatting of a number or text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def emit(args: argparse.Namespace, result: Mapping[str, Any], table: Table | None = None) -> None:
    """Print ``result`` as JSON when ``--json`` was given, else ``table`` (or a key/value table)."""
    if getattr(args, "json", False):
        print(to_json(result))
        return
    if table is None:
        table = make_table("", ["key", "value"], [(k, v) for k, v in result.items()])
    console.print(table)


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    description: str = "",
    disable: bool = False,
) -> Iterator[T]:
    """A progress bar on stderr around ``iterable`` (silent when ``disable`` or not a TTY)."""
    if disable or not sys.stderr.isatty():
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)
