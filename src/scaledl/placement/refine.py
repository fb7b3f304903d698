"""Local-search refinement of a placement: move one unit of fused groups at a time.

m-ETF and m-SCT decide each op greedily as it becomes ready, in a training graph whose
backward nodes share their forward nodes' devices. So a forward decision never sees the
backward work it commits a device to, and a branchy model can end with one device idle while
the other runs its share of the backward: with the profile of a 2x H100 run of the
Inception-style benchmark at batch 128, both plans simulated 20% slower than a hand-written
split of the branches (89.6 against 74.7 ms), and 2% slower once refined (76.3 ms).

:func:`refine_placement` starts from such a plan and sweeps the move units (fused groups that
must share a device, :func:`move_units`) in graph order, moving each to the device that lowers
the simulated step time most while every device keeps within its memory under the placers'
no-free accounting (the guarantee :func:`~scaledl.placement.pipeline.place_graph` gives).
Sweeps repeat until none improves or the time budget is spent; the result is never slower
than the start, by the simulator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from scaledl.placement.cost_model import Cluster
from scaledl.placement.graph import OpGraph
from scaledl.placement.list_scheduler import ListScheduler
from scaledl.placement.shrink import UnionFind


@dataclass
class Refinement:
    """A refined group placement and how the search went."""

    placement: np.ndarray
    makespan_before: float
    makespan: float
    moves: int
    evaluations: int
    sweeps: int
    converged: bool
    seconds: float

    def summary(self) -> dict[str, float | int | bool]:
        return {
            "refine_makespan_before_s": self.makespan_before,
            "refine_makespan_s": self.makespan,
            "refine_moves": self.moves,
            "refine_evaluations": self.evaluations,
            "refine_sweeps": self.sweeps,
            "refine_converged": self.converged,
            "refine_seconds": self.seconds,
        }


def evaluate(
    graph: OpGraph, placement: np.ndarray, cluster: Cluster, contention: str | None = None
) -> tuple[float, bool]:
    """Simulated step time of a per-node ``placement`` and whether it fits every device.

    One pinned list-scheduler run gives both: with memory not enforced the timing does not
    depend on the accounting, and without frees the peak is the placers' conservative one."""
    sched = ListScheduler(
        graph,
        cluster,
        pinned=placement,
        enforce_memory=False,
        release_memory=False,
        contention=contention,
    ).run()
    fits = all(p <= m for p, m in zip(sched.peak_memory, cluster.memory))
    return sched.makespan, fits


def move_units(graph: OpGraph, node_of: np.ndarray | None = None) -> list[list[int]]:
    """The groups that must move together: those of one colocation group (``group``) and,
    since the executor runs each node's backward where its forward ran, those holding
    ``fwd:v``, ``bwd:v`` and ``opt:v`` of one ``v``. Each unit lists group indices ascending
    (so the first is its earliest in topological order: a forward group when it has one)."""
    n_groups = int(node_of.max()) + 1 if node_of is not None and len(node_of) else len(graph)
    node_of = np.arange(len(graph)) if node_of is None else node_of
    sets = UnionFind(n_groups)
    first: dict[str, int] = {}
    for i, name in enumerate(graph.names):
        g = int(node_of[i])
        base = name.split(":", 1)[1] if name.startswith(("fwd:", "bwd:", "opt:")) else None
        for key in (f"group:{graph.group[i]}" if graph.group[i] is not None else None, base):
            if key is not None:
                sets.union(first.setdefault(key, g), g)
    units: dict[int, list[int]] = {}
    for g in range(n_groups):
        units.setdefault(sets.find(g), []).append(g)
    return list(units.values())


def refine_placement(
    graph: OpGraph,
    group_placement: np.ndarray,
    cluster: Cluster,
    *,
    node_of: np.ndarray | None = None,
    contention: str | None = None,
    time_budget_s: float = 10.0,
    max_sweeps: int = 20,
    min_gain: float = 1e-4,
) -> Refinement:
    """Improve ``group_placement`` (a device per group) by moves of one unit at a time.

    ``node_of`` maps each node of ``graph`` to its group (a :class:`ShrunkGraph`'s
    ``node_of``; identity when omitted: one group per node). Units are :func:`move_units`;
    each starts on the device of its first (forward) group, as the executor would run it.
    Each candidate is simulated on ``graph`` itself, so the gain is on the graph the user
    runs. A move is kept when it lowers the step time by more than ``min_gain`` (relative)
    and every device still fits.
    ``time_budget_s`` bounds the search (checked after each evaluation); the best placement
    found so far is returned when it runs out.
    """
    if time_budget_s <= 0 or max_sweeps < 1:
        raise ValueError(
            f"time_budget_s must be > 0 and max_sweeps >= 1, got {time_budget_s}, {max_sweeps}"
        )
    t0 = time.perf_counter()
    current = np.asarray(group_placement, dtype=np.int64).copy()
    node_of = np.arange(len(graph)) if node_of is None else np.asarray(node_of, dtype=np.int64)
    if node_of.shape != (len(graph),) or (len(node_of) and node_of.max() >= len(current)):
        raise ValueError(
            f"node_of must give one of {len(current)} groups for each of {len(graph)} nodes"
        )
    units = [np.asarray(u) for u in move_units(graph, node_of)]
    for u in units:
        current[u] = current[u[0]]
    best, fits = evaluate(graph, current[node_of], cluster, contention)
    if not fits:
        raise ValueError("the starting placement does not fit the devices' memory")
    before, moves, evaluations, sweeps, converged = best, 0, 1, 0, False
    devices = range(len(cluster))
    out_of_time = False
    while sweeps < max_sweeps and not out_of_time:
        sweeps += 1
        improved = False
        for unit in units:
            here = int(current[unit[0]])
            choice, choice_time = here, best
            for d in devices:
                if d == here:
                    continue
                current[unit] = d
                span, ok = evaluate(graph, current[node_of], cluster, contention)
                evaluations += 1
                if ok and span < choice_time * (1 - min_gain):
                    choice, choice_time = d, span
                if time.perf_counter() - t0 > time_budget_s:
                    out_of_time = True
                    break
            current[unit] = choice
            if choice != here:
                best, moves, improved = choice_time, moves + 1, True
            if out_of_time:
                break
        if not improved and not out_of_time:
            converged = True
            break
    return Refinement(
        current, before, best, moves, evaluations, sweeps, converged, time.perf_counter() - t0
    )
