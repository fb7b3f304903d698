"""Lower bounds on step time and device count (spec §2.10), and the infeasibility error."""

from __future__ import annotations

import math

import numpy as np

from scaledl.placement.cost_model import GIB, Cluster
from scaledl.placement.graph import OpGraph


class InfeasiblePlacementError(ValueError):
    """The graph cannot be placed on the given devices; names the minimum device count."""

    def __init__(self, message: str, min_devices: int | None) -> None:
        super().__init__(message)
        self.min_devices = min_devices


def group_inbound(graph: OpGraph, members: list[int]) -> int:
    """Bytes of the distinct tensors that enter a group from outside it (an upper bound of what
    the group may have to receive)."""
    inside = set(members)
    tensors: dict[int, int] = {}
    for v in members:
        for u in graph.pred[v]:
            if u not in inside:
                tensors.update(graph.edge_tensors[(u, v)])
    return sum(tensors.values())


def group_reservation(graph: OpGraph, members: list[int]) -> int:
    """Memory a colocation group reserves when placed (the spec's ``reserve_memory`` variant,
    plus its inputs): summed permanent, largest temporary and every tensor it may receive. Its
    later members then always fit, so a placed group never strands an op."""
    perm, temp = graph.permanent, graph.temporary
    return int(perm[members].sum() + temp[members].max()) + group_inbound(graph, members)


def group_units(graph: OpGraph) -> list[tuple[list[int], int, int]]:
    """Placement units: each colocation group or lone node as ``(members, permanent, peak)``;
    a group's peak is its :func:`group_reservation`."""
    units = []
    perm, temp = graph.permanent, graph.temporary
    for members in graph.groups().values():
        units.append((members, int(perm[members].sum()), group_reservation(graph, members)))
    for i, g in enumerate(graph.group):
        if g is None:
            units.append(([i], int(perm[i]), int(perm[i] + temp[i])))
    return units


def min_devices(graph: OpGraph, memory: list[int]) -> int | None:
    """Fewest devices (largest first) whose memory holds all permanent bytes; None if a unit
    fits on no device at all. Coarse: ignores temporaries and fragmentation (spec §2.10)."""
    units = group_units(graph)
    biggest = max((u[2] for u in units), default=0)
    if biggest > max(memory):
        return None
    total = int(graph.permanent.sum())
    acc = 0
    for k, cap in enumerate(sorted(memory, reverse=True), start=1):
        acc += cap
        if acc >= total:
            return k
    # More devices of the largest kind would be needed.
    return len(memory) + math.ceil((total - acc) / max(memory))


def critical_path(graph: OpGraph, edge_cost=None) -> float:
    """Longest path of node compute (plus ``edge_cost(u, v)`` per edge when given)."""
    order, _ = graph.topo()
    comp = graph.compute
    dist = np.zeros(len(graph))
    for v in order:
        best = 0.0
        for u in graph.pred[v]:
            c = dist[u] + (edge_cost(u, v) if edge_cost else 0.0)
            best = max(best, c)
        dist[v] = best + comp[v]
    return float(dist.max()) if len(graph) else 0.0


def comm_chain_max(graph: OpGraph, cluster: Cluster) -> float:
    """C_max: the largest total communication along any chain (ETF's additive term)."""
    order, _ = graph.topo()
    dist = np.zeros(len(graph))
    for v in order:
        for u in graph.pred[v]:
            c = dist[u] + cluster.max_comm_s(graph.edge_bytes(u, v))
            if c > dist[v]:
                dist[v] = c
    return float(dist.max()) if len(graph) else 0.0


def lower_bounds(graph: OpGraph, cluster: Cluster) -> dict[str, float | int | None]:
    """CP0 (compute-only critical path), W/m, LB = max of both, and the memory device bound."""
    cp = critical_path(graph)
    work = float(graph.compute.sum()) / len(cluster)
    return {
        "critical_path_s": cp,
        "work_per_device_s": work,
        "lower_bound_s": max(cp, work),
        "min_devices": min_devices(graph, cluster.memory),
    }


def infeasible(
    graph: OpGraph, cluster: Cluster, algorithm: str, node: int
) -> InfeasiblePlacementError:
    """The error for a node that fits nowhere, naming the minimum number of devices."""
    need = min_devices(graph, cluster.memory)
    cap = max(cluster.memory) / GIB
    name = graph.names[node]
    req = graph.peak(node) / GIB
    if need is None:
        members, _, peak = max(group_units(graph), key=lambda u: u[2])
        first = members[0]
        module = graph.module[first]
        unit = repr(graph.names[first]) + (f" ({module})" if module else "")
        if len(members) > 1:
            unit += f" and its colocation group ({len(members)} nodes)"
        msg = (
            f"{algorithm}: node {unit} needs {peak / GIB:.3g} GiB, more than one device of "
            f"{cap:.3g} GiB holds; no number of such devices suffices"
        )
    elif need > len(cluster):
        msg = (
            f"{algorithm}: the model needs at least {need} devices of {cap:.3g} GiB "
            f"(got {len(cluster)}); node {name!r} ({req:.3g} GiB) could not be placed"
        )
    else:
        msg = (
            f"{algorithm}: node {name!r} ({req:.3g} GiB) fits on no device; the memory lower "
            f"bound is {need} devices of {cap:.3g} GiB, but this placer could not fit the "
            f"model on {len(cluster)}: add devices or memory, or try another algorithm"
        )
    return InfeasiblePlacementError(msg, need)
