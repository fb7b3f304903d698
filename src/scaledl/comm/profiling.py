"""Time of the work issued inside named profiler ranges (the hook's codec ranges).

:func:`range_time` reads the events of a :mod:`torch.profiler` run and adds up the work whose
host-side issue falls inside a range (``torch.profiler.record_function``) of a given name:
with ``device=True`` the device kernels and copies, with ``device=False`` the host time.

A range's own ``device_time_total`` counts only kernels that the profiler linked to a host
operator inside it; kernels launched straight through the driver, as Triton kernels are, may
carry no such link and were missed. Here each device event is placed on the host timeline by
(in that order) the runtime or driver call that launched it (same correlation id, e.g.
``cuLaunchKernel``), the host operator it is linked to (where that operator lies inside a range
or apart from all of them), or else the device-side copy of the range on the same device and
stream (the profiler's span from the range's first to its last kernel; work on one stream runs
in launch order, so whatever lies in that span was launched inside the range). A device event
placed by none of them is counted as outside.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["range_time"]

# CUDA runtime and driver calls (cudaLaunchKernel, cuLaunchKernelEx, cudaMemcpyAsync, ...):
# their ids are the device events' correlation ids, another numbering than the operators'.
_API = re.compile(r"^cu(da)?[A-Z]\w*$")
_CPU = torch.autograd.DeviceType.CPU


def _is_host(e: Any) -> bool:
    return getattr(e, "device_type", _CPU) == _CPU and not getattr(e, "is_async", False)


class _Spans:
    """Closed time intervals, merged where they overlap, for fast membership tests."""

    def __init__(self, spans: Iterable[tuple[float, float]]) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        for a, b in sorted(spans):
            if self.ends and a <= self.ends[-1]:
                self.ends[-1] = max(self.ends[-1], b)
            else:
                self.starts.append(a)
                self.ends.append(b)

    def covers(self, a: float, b: float) -> bool:
        """Whether one interval holds all of [a, b]."""
        i = bisect.bisect_right(self.starts, a) - 1
        return i >= 0 and b <= self.ends[i]

    def meets(self, a: float, b: float) -> bool:
        """Whether an interval intersects [a, b]."""
        i = bisect.bisect_right(self.starts, b) - 1
        return i >= 0 and self.ends[i] >= a

    def __contains__(self, t: float) -> bool:
        return self.covers(t, t)


def range_time(
    events: Iterable[Any], name: str, device: bool = True, counts: dict[str, int] | None = None
) -> float:
    """Seconds of work issued inside the ranges called ``name`` (each event counted once).

    ``events`` is ``prof.events()`` of a :class:`torch.profiler.profile`. ``device=True``:
    the durations of the device kernels, copies and sets launched inside the ranges (their
    stream time; the ranges' own device-side copies are not counted). ``device=False``: the
    self host time of every operator, the ranges included, that starts inside a range on the
    range's thread (so a range's Python time between its operators counts too).

    ``counts`` (device only), if given, receives how many device events were counted, by how
    they were placed (``"launch"``, ``"operator"``, ``"device_span"``), and how many were not
    (``"outside"``).
    """
    events = list(events)
    ranges = [e for e in events if e.name == name and _is_host(e)]
    if not device:
        by_thread: dict[Any, list[tuple[float, float]]] = {}
        for r in ranges:
            by_thread.setdefault(r.thread, []).append((r.time_range.start, r.time_range.end))
        spans = {t: _Spans(s) for t, s in by_thread.items()}
        empty = _Spans(())
        us = sum(
            e.self_cpu_time_total
            for e in events
            if _is_host(e) and e.time_range.start in spans.get(e.thread, empty)
        )
        return us * 1e-6
    host = _Spans((r.time_range.start, r.time_range.end) for r in ranges)
    api: dict[int, Any] = {}
    ops: dict[int, Any] = {}
    on_device: dict[tuple[Any, Any], list[tuple[float, float]]] = {}
    kernels = []
    for e in events:
        if _is_host(e):
            (api if _API.match(e.name) else ops)[e.id] = e
        elif getattr(e, "is_user_annotation", False):
            if e.name == name:
                span = (e.time_range.start, e.time_range.end)
                on_device.setdefault(_stream(e), []).append(span)
        else:
            kernels.append(e)
    device_spans = {key: _Spans(s) for key, s in on_device.items()}
    us = 0.0
    tally = dict.fromkeys(("launch", "operator", "device_span", "outside"), 0)
    for k in kernels:
        launch = api.get(k.id)
        op = ops.get(getattr(k, "linked_correlation_id", 0) or -1)
        if launch is not None:
            how, counted = "launch", launch.time_range.start in host
        elif op is not None and (
            op.time_range.start in host or not host.meets(op.time_range.start, op.time_range.end)
        ):  # the operator runs inside a range, or apart from all of them
            how, counted = "operator", op.time_range.start in host
        else:
            # No launch call, or linked to an operator that encloses a range (a range pushes
            # no operator link, so a driver launch inside it links to the enclosing operator,
            # e.g. the autograd node running the hook): inside the range's device-side span?
            how, spans_k = "device_span", device_spans.get(_stream(k))
            counted = spans_k is not None and spans_k.covers(k.time_range.start, k.time_range.end)
        tally[how if counted else "outside"] += 1
        if counted:
            us += k.time_range.elapsed_us()
    if counts is not None:
        counts.update(tally)
    return us * 1e-6


def _stream(e: Any) -> tuple[Any, Any]:
    return e.device_index, getattr(e, "device_resource_id", None)
