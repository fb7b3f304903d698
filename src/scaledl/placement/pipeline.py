"""The placement pipeline (spec §2.1): trace -> graph -> group/fuse -> place -> simulate.

:func:`place_graph` places an :class:`OpGraph` (shrinking it first) and maps the placement back
to every original node; :func:`place` does the same for an ``nn.Module`` and example inputs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import nn

from scaledl.placement.bounds import InfeasiblePlacementError, lower_bounds
from scaledl.placement.cost_model import GIB, Cluster, Roofline
from scaledl.placement.graph import OpGraph
from scaledl.placement.m_etf import m_etf
from scaledl.placement.m_sct import m_sct
from scaledl.placement.m_topo import m_topo
from scaledl.placement.refine import refine_placement
from scaledl.placement.shrink import ShrunkGraph, shrink
from scaledl.placement.simulator import PlacementResult, simulate
from scaledl.placement.trace import TracedModel, trace

ALGORITHMS = {"m-topo": m_topo, "m-etf": m_etf, "m-sct": m_sct}


@dataclass
class Plan:
    """A placement of a graph: the placer's result on the shrunk graph, mapped back."""

    graph: OpGraph
    shrunk: ShrunkGraph | None
    result: PlacementResult
    placement: np.ndarray
    seconds: float
    traced: TracedModel | None = None

    @property
    def algorithm(self) -> str:
        return self.result.algorithm

    def by_name(self) -> dict[str, int]:
        """Device per original graph node name."""
        return dict(zip(self.graph.names, self.placement.tolist()))

    def fx_placement(self) -> dict[str, int]:
        """Device per fx node (the forward node's device), for :class:`PlacedModule`."""
        return {
            TracedModel.fx_name(name): d
            for name, d in self.by_name().items()
            if not name.startswith(("bwd:", "opt:"))
        }

    def fx_order(self) -> list[str]:
        """fx node names by simulated start of their forward node (ties by graph order)."""
        start = self.result.schedule.start
        idx = self.shrunk.node_of if self.shrunk is not None else np.arange(len(self.graph))
        keyed = [
            (float(start[idx[i]]), i, TracedModel.fx_name(name))
            for i, name in enumerate(self.graph.names)
            if not name.startswith(("bwd:", "opt:"))
        ]
        return [name for _, _, name in sorted(keyed)]

    def replay(self, cluster: Cluster | None = None, contention: str | None = None):
        """Simulate the placement on the original (unshrunk) graph."""
        return simulate(
            self.graph, self.placement, cluster or self.result.cluster, contention=contention
        )

    def summary(self) -> dict[str, Any]:
        """JSON facts: the placer's schedule, bounds on the original graph, memory per device."""
        out = self.result.summary()
        lb = lower_bounds(self.graph, self.result.cluster)
        replay = self.replay()
        out.update(
            placement_seconds=self.seconds,
            nodes=len(self.graph),
            edges=self.graph.num_edges,
            shrunk_nodes=len(self.result.graph),
            shrunk_edges=self.result.graph.num_edges,
            placer_makespan_s=self.result.makespan,
            simulated_step_time_s=replay.makespan,
            lower_bound_s=lb["lower_bound_s"],
            critical_path_s=lb["critical_path_s"],
            work_per_device_s=lb["work_per_device_s"],
            min_devices_by_memory=lb["min_devices"],
            makespan_over_lower_bound=replay.makespan / lb["lower_bound_s"]
            if lb["lower_bound_s"] > 0
            else None,
            simulated_peak_memory_gib=[round(p / GIB, 4) for p in replay.peak_memory],
            nodes_per_device=np.bincount(self.placement, minlength=len(self.result.cluster))
            .astype(int)
            .tolist(),
        )
        return out


#: Re-plans with tightened limits when the fused graph's plan overflows the original graph.
MEMORY_REPLANS = 4


def place_graph(
    graph: OpGraph,
    cluster: Cluster,
    algorithm: str = "m-etf",
    *,
    shrink_graph: bool = True,
    max_group_fraction: float = 0.25,
    refine: bool = False,
    refine_seconds: float = 10.0,
    **options: Any,
) -> Plan:
    """Shrink ``graph`` (groups capped at ``max_group_fraction`` of the smallest device), place
    it with ``algorithm`` and map the placement back to every node.

    With ``refine`` the placer's plan is then improved by :func:`refine_placement` (moves of
    one fused group at a time, kept when the simulated step time drops and memory still fits;
    at most ``refine_seconds``); the result's algorithm reads e.g. ``m-sct+refine`` and its
    ``extra`` holds the search's figures.

    The placer budgets memory on the fused graph, whose accounting can differ slightly from the
    original graph's (a fused node's inputs and temporaries are charged at different times). So
    the mapped-back placement is replayed on the original graph with the placers' no-free
    accounting; if a device overflows, the placer runs again with that device's limit lowered by
    the overflow (up to :data:`MEMORY_REPLANS` times). The returned plan never exceeds
    ``cluster.memory`` in that replay, nor in :func:`simulate`'s (which frees memory).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    t0 = time.perf_counter()
    sg = None
    target = graph
    if shrink_graph:
        sg = shrink(graph, max_group_bytes=int(min(cluster.memory) * max_group_fraction))
        target = sg.graph
    limits = list(cluster.memory)
    over = [0]
    for _ in range(MEMORY_REPLANS + 1):
        result = ALGORITHMS[algorithm](target, replace(cluster, memory=limits), **options)
        placement = sg.expand(result.placement) if sg is not None else result.placement
        if sg is None:  # the placer's own accounting was on this very graph
            break
        peak = simulate(graph, placement, cluster, release_memory=False).peak_memory
        over = [p - m for p, m in zip(peak, cluster.memory)]
        tighter = [lim - max(o, 0) for lim, o in zip(limits, over)]
        if max(over) <= 0 or min(tighter) <= 0:
            break
        limits = tighter
    if max(over) > 0:
        d = int(np.argmax(over))
        raise InfeasiblePlacementError(
            f"{algorithm}: its placement overflows device {d} by {over[d] / GIB:.3g} GiB on the "
            f"original graph even after re-planning with tighter limits: add memory or "
            "devices, or pass shrink_graph=False",
            lower_bounds(graph, cluster)["min_devices"],
        )
    if refine:
        ref = refine_placement(
            graph,
            np.asarray(result.placement),
            cluster,
            node_of=sg.node_of if sg is not None else None,
            contention=options.get("contention"),
            time_budget_s=refine_seconds,
        )
        # The shrunk graph's schedule of the refined plan gives the launch order (fx_order).
        result = simulate(
            target,
            ref.placement,
            cluster,
            contention=options.get("contention"),
            release_memory=False,
            algorithm=f"{algorithm}+refine",
        )
        result.extra.update(ref.summary())
        placement = sg.expand(ref.placement) if sg is not None else ref.placement
    # Report against the caller's limits; the (possibly tightened) ones used are kept as extra.
    result.extra["planned_memory_limits"] = [int(x) for x in limits]
    result.cluster = cluster
    return Plan(graph, sg, result, placement, time.perf_counter() - t0)


def place(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    devices: int | Cluster = 2,
    memory_gib: float | Sequence[float] = 16.0,
    algorithm: str = "m-etf",
    leaf_modules: Sequence[type] = (),
    training: bool = True,
    roofline: Roofline | None = None,
    profile: bool = False,
    **options: Any,
) -> Plan:
    """Trace ``model`` and place its training (or inference) graph on memory-limited devices."""
    if isinstance(devices, Cluster):
        cluster = devices
    else:
        mem = [memory_gib] * devices if isinstance(memory_gib, (int, float)) else memory_gib
        if len(mem) != devices:
            raise ValueError(f"got {len(mem)} memory sizes for {devices} devices")
        if devices < 1 or any(m <= 0 for m in mem):
            raise ValueError("devices must be >= 1 and every memory size > 0 GiB")
        cluster = Cluster([int(m * GIB) for m in mem])
    traced = trace(
        model,
        example_inputs,
        leaf_modules=leaf_modules,
        training=training,
        roofline=roofline,
        profile=profile,
    )
    plan = place_graph(traced.op_graph(), cluster, algorithm, **options)
    plan.traced = traced
    return plan
