"""Replay any placement (spec §2.8) and the result type every placer returns.

:func:`simulate` runs a fixed placement through the list scheduler: one op at a time per
device, ready ops by ``(ready_ts, topo_order)``, transfers per the cluster's contention model
(``shared``, ``link`` or ``none``), allocator-style memory that frees saved activations when
their backward node has run. Memory limits are reported, not enforced: a user-given placement
that overflows a device shows ``fits=False`` and the per-device peak.

Op costs are device (GPU) times, so by default the host is assumed to launch every op before
the device needs it. With a :class:`HostModel` the replay also follows the host that launches
them, as :class:`~scaledl.placement.executor.PlacedModule` does (:func:`host_launch_times`):
one Python thread launches the forward ops in launch order (plus one launch per cross-device
copy), autograd runs one thread per device for the backward, and the optimizer step starts
when ``backward()`` returns; an op cannot start on its device before it was launched.
"""

from __future__ import annotations

import heapq
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


@dataclass(frozen=True)
class HostModel:
    """Host seconds to launch one op: ``forward_s`` per forward op (and per cross-device copy
    unless ``copy_s`` is given) on the one Python thread, ``backward_s`` per backward op on
    autograd's thread of its device. Calibrate them from a step that is not synchronised
    (host wall time / ops launched)."""

    forward_s: float
    backward_s: float = 0.0
    copy_s: float | None = None

    def __post_init__(self) -> None:
        costs = (self.forward_s, self.backward_s, self.copy_s or 0.0)
        if min(costs) < 0 or not all(np.isfinite(costs)):
            raise ValueError(f"host launch costs must be finite and >= 0, got {self}")


def _forward_launch_order(graph: OpGraph, fwd: list[int], order: Sequence[str] | None) -> list:
    """Forward nodes in the executor's launch order: a stable topological order keyed by the
    position of the node's name (with or without the ``fwd:`` prefix) in ``order``."""
    pos = {name: i for i, name in enumerate(order or [])}
    own = {v: i for i, v in enumerate(fwd)}
    key = {}
    for v in fwd:
        name = graph.names[v]
        p = pos.get(name, pos.get(name.split(":", 1)[-1]))
        key[v] = (len(pos) + own[v] if p is None else p, own[v])
    indeg = {v: sum(1 for u in set(graph.pred[v]) if u in own) for v in fwd}
    heap = [key[v] for v in fwd if indeg[v] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        v = fwd[heapq.heappop(heap)[1]]
        out.append(v)
        for w in set(graph.succ[v]):
            if w in indeg:
                indeg[w] -= 1
                if indeg[w] == 0:
                    heapq.heappush(heap, key[w])
    return out


def host_launch_times(
    graph: OpGraph,
    placement: Mapping[str, int] | Sequence[int] | np.ndarray,
    host: HostModel,
    order: Sequence[str] | None = None,
) -> np.ndarray:
    """When the executor's host has launched each node (seconds from the step's start).

    Forward (and untyped) nodes: one thread, in launch order (``order``: names by launch
    priority, as ``Plan.fx_order()``; default graph order), each taking ``forward_s`` plus
    ``copy_s`` per other device its forward consumers run on (copies follow their producer).
    Backward nodes: after the forward, one thread per device in reverse launch order (the
    autograd engine's priority), each launched ``backward_s`` after both its device's thread is
    free and its gradient inputs were launched, plus ``copy_s`` per other device it sends a
    gradient to. Optimizer nodes: when the whole backward has been launched.
    """
    devs = as_device_array(graph, placement)
    copy_s = host.forward_s if host.copy_s is None else host.copy_s
    kinds = graph.kind
    fwd = [v for v in range(len(graph)) if kinds[v] not in ("backward", "optimizer")]
    launch = np.zeros(len(graph))
    t = 0.0
    fwd_order = _forward_launch_order(graph, fwd, order)
    for v in fwd_order:
        t += host.forward_s
        launch[v] = t
        others = {int(devs[w]) for w in graph.succ[v] if kinds[w] not in ("backward", "optimizer")}
        t += copy_s * len(others - {int(devs[v])})
    thread = dict.fromkeys(range(int(devs.max()) + 1 if len(devs) else 0), t)
    bwd_of = {
        graph.names[b].split(":", 1)[-1]: b for b in range(len(graph)) if kinds[b] == "backward"
    }
    done = t
    for v in reversed(fwd_order):
        b = bwd_of.get(graph.names[v].split(":", 1)[-1])
        if b is None:
            continue
        d = int(devs[b])
        grads = [launch[u] for u in graph.pred[b] if kinds[u] == "backward"]
        launch[b] = max([thread[d], *grads]) + host.backward_s
        sends = {int(devs[w]) for w in graph.succ[b] if kinds[w] == "backward"} - {d}
        thread[d] = launch[b] + copy_s * len(sends)
        done = max(done, thread[d])
    for v in range(len(graph)):
        if kinds[v] == "optimizer":
            launch[v] = done
    return launch


def simulate(
    graph: OpGraph,
    placement: Mapping[str, int] | Sequence[int] | np.ndarray,
    cluster: Cluster,
    *,
    contention: str | None = None,
    release_memory: bool = True,
    algorithm: str = "replay",
    host: HostModel | None = None,
    order: Sequence[str] | None = None,
) -> PlacementResult:
    """Replay ``placement`` on ``cluster``: schedule, makespan and per-device peak memory.

    With ``host``, no node starts before the executor's host has launched it
    (:func:`host_launch_times`, forward launch ``order`` as given to ``PlacedModule``)."""
    t0 = time.perf_counter()
    devs = as_device_array(graph, placement)
    not_before = None if host is None else host_launch_times(graph, devs, host, order)
    sched = ListScheduler(
        graph,
        cluster,
        pinned=devs,
        enforce_memory=False,
        release_memory=release_memory,
        contention=contention,
        not_before=not_before,
    ).run()
    return finish(algorithm, graph, cluster, sched, t0, host_model=host is not None)
