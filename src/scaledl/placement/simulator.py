"""Replay any placement (spec §2.8) and the result type every placer returns.

:func:`simulate` runs a fixed placement through the list scheduler: one op at a time per
device, ready ops by ``(ready_ts, topo_order)``, transfers per the cluster's contention model
(``shared``, ``link`` or ``none``), allocator-style memory that frees saved activations when
their backward node has run. Memory limits are reported, not enforced: a user-given placement
that overflows a device shows ``fits=False`` and the per-device peak.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scaledl.placement.bounds import lower_bounds
from scaledl.placement.cost_model import GIB, Cluster
from scaledl.placement.graph import OpGraph
from scaledl.placement.list_scheduler import ListScheduler, Schedule


@dataclass
class PlacementResult:
    """A placement with its simulated schedule, makespan, memory and lower bounds."""

    algorithm: str
    graph: OpGraph
    cluster: Cluster
    schedule: Schedule
    placement_seconds: float = 0.0
    bounds: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def placement(self) -> np.ndarray:
        """Device index per graph node."""
        return self.schedule.device

    @property
    def makespan(self) -> float:
        return self.schedule.makespan

    @property
    def peak_memory(self) -> list[int]:
        return self.schedule.peak_memory

    @property
    def fits(self) -> bool:
        return all(p <= m for p, m in zip(self.peak_memory, self.cluster.memory))

    def by_name(self) -> dict[str, int]:
        """Node name -> device index."""
        return dict(zip(self.graph.names, self.placement.tolist()))

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly facts: timing, bounds, memory per device, nodes per device."""
        lb = self.bounds.get("lower_bound_s", 0.0)
        counts = np.bincount(self.placement, minlength=len(self.cluster)).tolist()
        return {
            "algorithm": self.algorithm,
            "devices": len(self.cluster),
            "nodes": len(self.graph),
            "edges": self.graph.num_edges,
            "placement_seconds": self.placement_seconds,
            "simulated_step_time_s": self.makespan,
            "lower_bound_s": lb,
            "makespan_over_lower_bound": self.makespan / lb if lb > 0 else None,
            "critical_path_s": self.bounds.get("critical_path_s"),
            "work_per_device_s": self.bounds.get("work_per_device_s"),
            "min_devices_by_memory": self.bounds.get("min_devices"),
            "peak_memory_bytes": list(self.peak_memory),
            "peak_memory_gib": [round(p / GIB, 4) for p in self.peak_memory],
            "memory_limit_gib": [round(m / GIB, 4) for m in self.cluster.memory],
            "fits": self.fits,
            "nodes_per_device": counts,
            "transfers": len(self.schedule.transfers),
            "transfer_bytes": int(sum(t.nbytes for t in self.schedule.transfers)),
            **{k: v for k, v in self.extra.items() if isinstance(v, (int, float, str, bool))},
        }


def finish(
    algorithm: str, graph: OpGraph, cluster: Cluster, schedule: Schedule, t0: float, **extra: Any
) -> PlacementResult:
    """Wrap a schedule with its wall time since ``t0`` and the lower bounds."""
    seconds = time.perf_counter() - t0
    return PlacementResult(
        algorithm, graph, cluster, schedule, seconds, lower_bounds(graph, cluster), dict(extra)
    )


def as_device_array(graph: OpGraph, placement: Mapping[str, int] | Sequence[int]) -> np.ndarray:
    """A device index per node from a name -> device mapping or a sequence."""
    if isinstance(placement, Mapping):
        missing = [n for n in graph.names if n not in placement]
        if missing:
            raise ValueError(f"placement lacks {len(missing)} nodes, e.g. {missing[0]!r}")
        unknown = [k for k in placement if k not in graph.index]
        if unknown:
            raise ValueError(f"placement names unknown node {unknown[0]!r}")
        return np.asarray([int(placement[n]) for n in graph.names], dtype=np.int64)
    arr = np.asarray(placement, dtype=np.int64)
    if arr.shape != (len(graph),):
        raise ValueError(f"placement has {arr.size} entries for a graph of {len(graph)} nodes")
    return arr


def simulate(
    graph: OpGraph,
    placement: Mapping[str, int] | Sequence[int] | np.ndarray,
    cluster: Cluster,
    *,
    contention: str | None = None,
    release_memory: bool = True,
    algorithm: str = "replay",
) -> PlacementResult:
    """Replay ``placement`` on ``cluster``: schedule, makespan and per-device peak memory."""
    t0 = time.perf_counter()
    devs = as_device_array(graph, placement)
    sched = ListScheduler(
        graph,
        cluster,
        pinned=devs,
        enforce_memory=False,
        release_memory=release_memory,
        contention=contention,
    ).run()
    return finish(algorithm, graph, cluster, sched, t0)
