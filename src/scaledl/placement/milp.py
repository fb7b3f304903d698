"""Exact placement and scheduling of small graphs as a MILP (reference for the placers).

Spec §6, solved with ``scipy.optimize.milp`` (HiGHS): binaries ``y[v, d]`` (v on d) with
``sum_d y[v, d] = 1``; ``z[u, v] >= y[u, d] - y[v, d]`` marks a cut edge, which costs its
communication time; ``s_v >= s_u + p_u + c_uv z_uv`` per edge; big-M disjunctions order every
pair of ops that share a device and are not already ordered by a path; memory
``sum_v permanent_v y[v, d] + T_d <= cap_d`` with ``T_d >= temporary_v y[v, d]``; colocation
groups share y. Minimise ``w >= s_v + p_v``. Contention-free and without receiver caching:
equal to the list scheduler's ``contention="none"`` model when no two consumers on one device
read the same remote tensor.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from scaledl.placement.cost_model import Cluster
from scaledl.placement.graph import OpGraph
from scaledl.placement.simulator import PlacementResult, finish, simulate

#: Above this the MILP is refused: the pair disjunctions grow quadratically.
MAX_MILP_NODES = 20


def milp_place(graph: OpGraph, cluster: Cluster, *, time_limit_s: float = 60.0) -> PlacementResult:
    """Optimal placement of a graph of at most ``MAX_MILP_NODES`` nodes.

    ``extra["milp_optimum_s"]`` holds the optimal makespan; the schedule is the replay of the
    optimal placement with contention-free transfers.
    """
    n, m = len(graph), len(cluster)
    if n > MAX_MILP_NODES:
        raise ValueError(f"the MILP placer handles at most {MAX_MILP_NODES} nodes, got {n}")
    t0 = time.perf_counter()
    p = graph.compute
    edges = list(graph.edge_tensors)
    c = np.array([cluster.max_comm_s(graph.edge_bytes(u, v)) for u, v in edges])
    scale = max(float(p.max(initial=0.0)), float(c.max(initial=0.0)), 1e-12)
    p, c = p / scale, c / scale
    big = float(p.sum() + c.sum()) + 1.0
    reach = _reachability(graph)
    pairs = [
        (u, v) for u in range(n) for v in range(u + 1, n) if not reach[u, v] and not reach[v, u]
    ]
    # Variable layout: y (n*m) | z (|E|) | s (n) | o (pairs) | T (m) | w
    Y, Z = 0, n * m
    S = Z + len(edges)
    O = S + n
    T = O + len(pairs)
    W = T + m
    nv = W + 1
    rows: list[dict[int, float]] = []
    lo: list[float] = []
    hi: list[float] = []

    def add(coefs: dict[int, float], lb: float, ub: float) -> None:
        rows.append(coefs)
        lo.append(lb)
        hi.append(ub)

    def y(v: int, d: int) -> int:
        return Y + v * m + d

    for v in range(n):
        add({y(v, d): 1.0 for d in range(m)}, 1.0, 1.0)
        add({S + v: 1.0, W: -1.0}, -np.inf, -p[v])
    for e, (u, v) in enumerate(edges):
        for d in range(m):
            add({Z + e: 1.0, y(u, d): -1.0, y(v, d): 1.0}, 0.0, np.inf)
        add({S + v: 1.0, S + u: -1.0, Z + e: -c[e]}, p[u], np.inf)
    for k, (u, v) in enumerate(pairs):
        for d in range(m):
            # o=1: u before v. Active only when both sit on d (y_ud + y_vd = 2).
            add(
                {S + v: 1.0, S + u: -1.0, O + k: -big, y(u, d): -big, y(v, d): -big},
                p[u] - 3 * big,
                np.inf,
            )
            add(
                {S + u: 1.0, S + v: -1.0, O + k: big, y(u, d): -big, y(v, d): -big},
                p[v] - 2 * big,
                np.inf,
            )
    perm, temp = graph.permanent, graph.temporary
    mscale = float(max(cluster.memory))
    for d in range(m):
        add(
            {**{y(v, d): perm[v] / mscale for v in range(n)}, T + d: 1.0},
            -np.inf,
            cluster.memory[d] / mscale,
        )
        for v in range(n):
            if temp[v]:
                add({T + d: 1.0, y(v, d): -temp[v] / mscale}, 0.0, np.inf)
    for members in graph.groups().values():
        for a, b in itertools.pairwise(members):
            for d in range(m):
                add({y(a, d): 1.0, y(b, d): -1.0}, 0.0, 0.0)
    A = sparse.lil_matrix((len(rows), nv))
    for i, coefs in enumerate(rows):
        for j, val in coefs.items():
            A[i, j] = val
    integrality = np.zeros(nv)
    integrality[Y:Z] = 1
    integrality[O:T] = 1
    lb = np.zeros(nv)
    ub = np.full(nv, np.inf)
    ub[Y:S] = 1.0
    ub[O:T] = 1.0
    obj = np.zeros(nv)
    obj[W] = 1.0
    res = milp(
        obj,
        constraints=LinearConstraint(A.tocsr(), lo, hi),
        integrality=integrality,
        bounds=Bounds(lb, ub),
        options={"time_limit": time_limit_s},
    )
    if res.x is None:
        raise ValueError(f"MILP found no feasible placement: {res.message}")
    devs = np.argmax(res.x[Y:Z].reshape(n, m), axis=1)
    replay = simulate(graph, devs, cluster, contention="none", release_memory=False)
    return finish(
        "milp",
        graph,
        cluster,
        replay.schedule,
        t0,
        milp_optimum_s=float(res.fun) * scale,
        milp_optimal=bool(res.status == 0),
    )


def _reachability(graph: OpGraph) -> np.ndarray:
    order, _ = graph.topo()
    n = len(graph)
    reach = np.zeros((n, n), dtype=bool)
    for v in reversed(order):
        for s in graph.succ[v]:
            reach[v, s] = True
            reach[v] |= reach[s]
    return reach
