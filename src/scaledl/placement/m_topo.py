"""m-TOPO: memory-balanced topological fill (Baechi spec §2.3).

Walk the BFS topological order and fill device 0, then 1, ...: an op (or, at its first op, its
whole colocation group with its reservation: summed permanent bytes, the largest temporary and
its external inputs) stays on the current
device while ``used + mem <= cap`` with ``cap = floor(sum(mem) / m) + max(mem)``, and also within
the device's real limit (checked including the bytes it must receive from other devices, which
the reference skipped). Ops left over after the last device are an error. m-TOPO has no time
model; its schedule comes from the simulator.
"""

from __future__ import annotations

import time

import numpy as np

from scaledl.placement.bounds import group_units, infeasible
from scaledl.placement.cost_model import Cluster
from scaledl.placement.graph import OpGraph
from scaledl.placement.list_scheduler import ListScheduler
from scaledl.placement.simulator import PlacementResult, finish


def m_topo(graph: OpGraph, cluster: Cluster, *, contention: str | None = None) -> PlacementResult:
    """Place ``graph`` with m-TOPO and simulate it; raises ``InfeasiblePlacementError``."""
    t0 = time.perf_counter()
    order, _ = graph.topo()
    m = len(cluster)
    units = group_units(graph)
    unit_mem = {members[0]: peak for members, _, peak in units}
    first = {}
    for members, _, _ in units:
        for i in members:
            first[i] = members[0]
    mems = [peak for _, _, peak in units]
    cap = sum(mems) // m + max(mems, default=0)
    dev = np.full(len(graph), -1, dtype=np.int64)
    used = [0] * m  # unit memory, compared with cap
    real = [0] * m  # unit memory plus received tensors, compared with the device limit
    cached: set[tuple[int, int]] = set()
    d = 0
    for o in order:
        head = first[o]
        if dev[o] >= 0:  # placed with its group, whose reservation covers its inputs
            continue
        mem = unit_mem[head]
        grouped = graph.group[o] is not None
        while d < m:
            inbound = 0 if grouped else _inbound(graph, dev, o, d, cached, commit=False)
            if used[d] + mem <= cap and real[d] + inbound + mem <= cluster.memory[d]:
                break
            d += 1
        if d == m:
            raise infeasible(graph, cluster, "m-topo", o)
        used[d] += mem
        real[d] += mem + (0 if grouped else _inbound(graph, dev, o, d, cached, commit=True))
        key = graph.group[o]
        for i in graph.groups()[key] if key is not None else [o]:
            dev[i] = d
    sched = ListScheduler(
        graph, cluster, pinned=dev, enforce_memory=False, contention=contention
    ).run()
    return finish("m-topo", graph, cluster, sched, t0)


def _inbound(graph: OpGraph, dev, o: int, d: int, cached: set, *, commit: bool) -> int:
    """Bytes of o's inputs that live on other devices and have not been copied to d yet."""
    total = 0
    for u in graph.pred[o]:
        if dev[u] < 0 or dev[u] == d:
            continue
        for tid, b in graph.edge_tensors[(u, o)]:
            if (tid, d) not in cached:
                total += b
                if commit:
                    cached.add((tid, d))
    return total
