"""m-SCT: memory-constrained Small Communication Time with favorite children (spec §2.5).

1. The Hanen–Munier LP relaxation (unlimited processors) over ``[x_e | s_v | w]``: minimise
   ``w`` s.t. ``s_i + p_i + c_ij x_ij <= s_j``, at most one favorite child per node and one
   favorite parent per node, ``s_v + p_v <= w``, ``0 <= x <= 1``, solved with scipy's HiGHS.
2. Rounding: edge e is favorite iff ``x_e < theta`` (default 0.5), then a deterministic repair:
   per node keep the favorite out-edge of smallest x, then per child the favorite in-edge of
   smallest x, ties by topo order.
3. Scheduling: m-ETF plus AWAKE devices. When device d finishes u and u's favorite child f is
   ready, unplaced and d attains the minimum ``schedule_ts(f, .)``, d waits for f; meanwhile it
   only runs *urgent* ops (``max_d schedule_ts(o, d) <= now``: waiting cannot help them).
"""

from __future__ import annotations

import time

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from scaledl.placement.cost_model import Cluster
from scaledl.placement.graph import OpGraph
from scaledl.placement.list_scheduler import ListScheduler
from scaledl.placement.simulator import PlacementResult, finish


def favorite_lp(
    graph: OpGraph, cluster: Cluster
) -> tuple[np.ndarray, list[tuple[int, int]], float]:
    """Solve the favorite-child LP; returns (x per edge, edges, LP optimum w* in seconds)."""
    edges = list(graph.edge_tensors)
    n, ne = len(graph), len(edges)
    p = graph.compute
    c = np.array([cluster.max_comm_s(graph.edge_bytes(u, v)) for u, v in edges])
    # HiGHS tolerances are absolute: work in units of the largest time so values are O(1).
    scale = max(float(p.max(initial=0.0)), float(c.max(initial=0.0)), 1e-12)
    p, c = p / scale, c / scale
    nv = ne + n + 1
    w = ne + n
    rows, cols, vals, rhs = [], [], [], []
    r = 0
    if ne:
        eu = np.array([e[0] for e in edges])
        ev = np.array([e[1] for e in edges])
        idx = np.arange(ne)
        # s_u - s_v + c_e x_e <= -p_u
        rows += [idx, idx, idx]
        cols += [ne + eu, ne + ev, idx]
        vals += [np.ones(ne), -np.ones(ne), c]
        rhs.append(-p[eu])
        r = ne
        # -sum_{out} x <= -(outdeg - 1) and -sum_{in} x <= -(indeg - 1)
        for key, deg in ((eu, np.bincount(eu, minlength=n)), (ev, np.bincount(ev, minlength=n))):
            nodes = np.flatnonzero(deg > 1)
            row_of = np.full(n, -1)
            row_of[nodes] = r + np.arange(len(nodes))
            mask = row_of[key] >= 0
            rows.append(row_of[key][mask])
            cols.append(idx[mask])
            vals.append(-np.ones(int(mask.sum())))
            rhs.append(-(deg[nodes] - 1.0))
            r += len(nodes)
    # s_v - w <= -p_v
    vidx = np.arange(n)
    rows += [r + vidx, r + vidx]
    cols += [ne + vidx, np.full(n, w)]
    vals += [np.ones(n), -np.ones(n)]
    rhs.append(-p)
    r += n
    A = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, nv)
    )
    obj = np.zeros(nv)
    obj[w] = 1.0
    bounds = [(0.0, 1.0)] * ne + [(0.0, None)] * (n + 1)
    res = linprog(obj, A_ub=A, b_ub=np.concatenate(rhs), bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"favorite-child LP failed: {res.message}")
    return res.x[:ne], edges, float(res.fun) * scale


def favorite_children(
    graph: OpGraph, x: np.ndarray, edges: list[tuple[int, int]], theta: float = 0.5
) -> np.ndarray:
    """Round the LP: favorite child per node (-1 if none), at most one favorite parent each."""
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"theta must be in (0, 1], got {theta}")
    _, rank = graph.topo()
    fav = np.full(len(graph), -1, dtype=np.int64)
    best: dict[int, tuple[float, int, int]] = {}
    for (u, v), xe in zip(edges, x):
        if xe < theta:
            key = (float(xe), int(rank[v]), v)
            if u not in best or key < best[u]:
                best[u] = key
    parent: dict[int, tuple[float, int, int]] = {}
    for u, (xe, _, v) in best.items():
        key = (xe, int(rank[u]), u)
        if v not in parent or key < parent[v]:
            parent[v] = key
    for v, (_, _, u) in parent.items():
        fav[u] = v
    return fav


class SCTScheduler(ListScheduler):
    """m-ETF with AWAKE devices reserved for a favorite child."""

    algorithm = "m-sct"

    def __init__(self, graph: OpGraph, cluster: Cluster, favorite: np.ndarray, **kw) -> None:
        super().__init__(graph, cluster, **kw)
        self.fav = favorite.tolist()
        self.awake: dict[int, int] = {}

    def candidate(self, d: int):
        f = self.awake.get(d)
        if f is None or self.dev[f] >= 0 or not self.allowed_on(f, d):
            self.awake.pop(d, None)
            return self.etf_candidate(d)
        now = self.na[d]
        etf = self.etf_candidate(d)  # also moves ops that became schedulable into `due`
        if etf is not None and etf[2] != f:
            for rk, o in sorted(self.due[d]):
                if o == f or not self._live(o, d):
                    continue
                urgent = max(self.schedule_ts(o, e) for e in self.allowed(o))
                if urgent <= now and self.fits(o, d, self.ready_info(o, d)[1]):
                    return (now, rk, o)
        r, inbound, _ = self.ready_info(f, d)
        if not self.fits(f, d, inbound):
            del self.awake[d]
            return etf
        return (max(r, now), self.rank[f], f)

    def after_commit(self, o: int, d: int) -> None:
        if self.awake.get(d) == o:
            del self.awake[d]
        f = self.fav[o]
        if f < 0 or self.rem[f] or self.dev[f] >= 0 or not self.allowed_on(f, d):
            return
        mine = self.schedule_ts(f, d)
        if all(mine <= self.schedule_ts(f, e) for e in self.allowed(f)):
            self.awake[d] = f
            self._dirty[d] = True


def m_sct(
    graph: OpGraph,
    cluster: Cluster,
    *,
    theta: float = 0.5,
    contention: str | None = None,
) -> PlacementResult:
    """Place ``graph`` with m-SCT; raises ``InfeasiblePlacementError``."""
    t0 = time.perf_counter()
    x, edges, w = favorite_lp(graph, cluster)
    t_lp = time.perf_counter() - t0
    fav = favorite_children(graph, x, edges, theta)
    sched = SCTScheduler(graph, cluster, fav, contention=contention).run()
    return finish(
        "m-sct",
        graph,
        cluster,
        sched,
        t0,
        lp_optimum_s=w,
        lp_seconds=t_lp,
        favorite_edges=int((fav >= 0).sum()),
        theta=theta,
    )
