"""The event-driven list scheduler shared by m-ETF, m-SCT and the simulator.

Each step commits the (op, device) pair with the smallest ``(schedule_ts, topo_order, device)``
where ``schedule_ts(o, d) = max(ready_ts(o, d), next_available(d))`` (spec §2.4). Because op
times are positive, committed start times never decrease, so this is the same as advancing a
clock t over events and committing at t the ops whose schedule time is t.

Per device two heaps keep the candidates cheap to find: ``due`` (ops ready by the time the
device frees, ordered by topo rank: they all start at ``next_available``) and ``pending``
(ordered by ``ready_ts``). With a contention model ready times only grow as channels fill, so
stored keys are lower bounds and are re-validated lazily when they reach the top.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from scaledl.placement.bounds import group_reservation, infeasible
from scaledl.placement.cost_model import Cluster
from scaledl.placement.graph import OpGraph

_EPS = 1e-12


@dataclass
class Transfer:
    """One simulated copy of (possibly several) tensors from ``src`` to ``dst``."""

    producer: int
    consumer: int
    src: int
    dst: int
    nbytes: int
    start: float
    end: float


@dataclass
class Schedule:
    """A timed placement: device, start and end per node, transfers, memory per device."""

    device: np.ndarray
    start: np.ndarray
    end: np.ndarray
    peak_memory: list[int]
    transfers: list[Transfer] = field(default_factory=list)
    order: list[int] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        ends = [float(self.end.max()) if len(self.end) else 0.0]
        ends += [t.end for t in self.transfers]
        return max(ends)


class ListScheduler:
    """Memory-constrained list scheduling of ``graph`` on ``cluster``.

    ``pinned[i] >= 0`` fixes node i's device (the simulator pins every node). With
    ``enforce_memory`` an op is only started where it fits (spec §2.6, PyTorch rule):
    ``used + inbound + peak(o) <= limit`` and ``peak(d) + inbound + params(o) <= limit``;
    a colocation group is placed whole when its first op is: it reserves
    :func:`~scaledl.placement.bounds.group_reservation` bytes and is pinned to that device.
    ``release_memory`` frees each node's ``release`` bytes after it runs (training replay).
    """

    algorithm = "list scheduling"

    def __init__(
        self,
        graph: OpGraph,
        cluster: Cluster,
        *,
        pinned: np.ndarray | None = None,
        enforce_memory: bool = True,
        release_memory: bool = False,
        contention: str | None = None,
    ) -> None:
        self.g = graph
        self.c = cluster
        self.n = len(graph)
        self.m = len(cluster)
        self.contention = contention or cluster.contention
        self.contended = self.contention != "none"
        self.enforce_memory = enforce_memory
        self.release_memory = release_memory
        order, rank = graph.topo()
        self.order = order
        self.rank = rank.tolist()
        self.compute = graph.compute.tolist()
        self.temp = graph.temporary.tolist()
        self.perm = graph.permanent.tolist()
        self.params = graph.params.tolist()
        self.release = graph.release.tolist()
        self.limit = list(cluster.memory)
        self.lat = cluster.latency
        self.pb = cluster.per_byte
        self.pred = graph.pred
        self.succ = graph.succ
        self.et = graph.edge_tensors
        # Groups: key -> (summed permanent, max temporary, summed params).
        self.gkey: list[str | None] = list(graph.group)
        # Group key -> (reservation, summed params); see bounds.group_reservation.
        self.ginfo: dict[str, tuple[int, int]] = {}
        for key, members in graph.groups().items():
            self.ginfo[key] = (
                group_reservation(graph, members),
                sum(self.params[i] for i in members),
            )
        self.gdev: dict[str, int] = {}
        self.pinned = None if pinned is None else [int(x) for x in pinned]
        if self.pinned is not None:
            if len(self.pinned) != self.n:
                raise ValueError(f"placement has {len(self.pinned)} entries for {self.n} nodes")
            bad = [i for i, d in enumerate(self.pinned) if not 0 <= d < self.m]
            if bad:
                raise ValueError(
                    f"node {graph.names[bad[0]]!r} is placed on device {self.pinned[bad[0]]}, "
                    f"but the cluster has devices 0..{self.m - 1}"
                )
        # Mutable state.
        self.dev = [-1] * self.n
        self.start = [0.0] * self.n
        self.end = [0.0] * self.n
        self.na = [0.0] * self.m
        self.used = [0] * self.m
        self.peak = [0] * self.m
        self.cache: dict[tuple[int, int], float] = {}
        self.chan: dict = {}
        self.transfers: list[Transfer] = []
        self.commit_order: list[int] = []
        self.rem = [len(p) for p in self.pred]
        self._inputs: dict[int, list] = {}
        self.due: list[list] = [[] for _ in range(self.m)]
        self.pend: list[list] = [[] for _ in range(self.m)]
        self.rejected: dict[int, set[int]] = {}
        self._best: list = [None] * self.m
        self._dirty = [True] * self.m

    # -- placement constraints -----------------------------------------------------------------
    def allowed(self, o: int) -> range | tuple[int, ...]:
        if self.pinned is not None:
            return (self.pinned[o],)
        k = self.gkey[o]
        if k is not None and k in self.gdev:
            return (self.gdev[k],)
        return range(self.m)

    def allowed_on(self, o: int, d: int) -> bool:
        if self.pinned is not None:
            return self.pinned[o] == d
        k = self.gkey[o]
        return k is None or self.gdev.get(k, d) == d

    def _mem_need(self, o: int, inbound: int) -> tuple[int, int, int, int]:
        """(bytes to hold, peak needed, params, inbound charged) for starting o.

        A lone op holds its permanent bytes and what it receives; the first op of a group holds
        the group's reservation (which covers every later member and every input it receives).
        """
        k = self.gkey[o]
        if k is None:
            p = self.perm[o]
            return p, p + self.temp[o], self.params[o], inbound
        if k in self.gdev:
            return 0, 0, 0, 0
        reserve, gparams = self.ginfo[k]
        return reserve, reserve, gparams, 0

    def fits(self, o: int, d: int, inbound: int) -> bool:
        if not self.enforce_memory:
            return True
        _, need, params, inbound = self._mem_need(o, inbound)
        lim = self.limit[d]
        return self.used[d] + inbound + need <= lim and self.peak[d] + inbound + params <= lim

    # -- timing ---------------------------------------------------------------------------------
    def ready_info(self, o: int, d: int) -> tuple[float, int, list]:
        """``ready_ts(o, d)``, the inbound bytes and the transfers it would need."""
        t = 0.0
        inbound = 0
        plan = []
        dev, end, cache = self.dev, self.end, self.cache
        inputs = self._inputs.get(o)
        if inputs is None:
            # Only ready ops are asked about, so their producers' end times are final: sort the
            # inputs once by (end, topo) to order their transfers on the channels.
            preds = sorted(self.pred[o], key=lambda u: (end[u], self.rank[u]))
            inputs = self._inputs[o] = [(u, self.et[(u, o)]) for u in preds]
        local: dict = {}
        for u, tensors in inputs:
            du = dev[u]
            eu = end[u]
            if du == d:
                if eu > t:
                    t = eu
                continue
            nb = 0
            arr = 0.0
            for tid, b in tensors:
                a = cache.get((tid, d))
                if a is None:
                    nb += b
                elif a > arr:
                    arr = a
            if nb:
                cost = self.lat[du][d] + nb * self.pb[du][d]
                if self.contention == "none":
                    s = eu
                elif self.contention == "shared":
                    s = max(eu, local.get(du, self.chan.get(du, 0.0)))
                    s = max(s, local.get(d, self.chan.get(d, 0.0)))
                    local[du] = local[d] = s + cost
                else:
                    key = (du, d)
                    s = max(eu, local.get(key, self.chan.get(key, 0.0)))
                    local[key] = s + cost
                e = s + cost
                plan.append((u, du, nb, s, e))
                inbound += nb
                if e > arr:
                    arr = e
            if arr > t:
                t = arr
        return t, inbound, plan

    def schedule_ts(self, o: int, d: int) -> float:
        return max(self.ready_info(o, d)[0], self.na[d])

    # -- heaps ----------------------------------------------------------------------------------
    def _insert(self, v: int) -> None:
        for d in self.allowed(v):
            r = self.ready_info(v, d)[0]
            if r <= self.na[d]:
                heapq.heappush(self.due[d], (self.rank[v], v))
            else:
                heapq.heappush(self.pend[d], (r, self.rank[v], v))
            self._dirty[d] = True

    def _live(self, o: int, d: int) -> bool:
        return self.dev[o] < 0 and self.allowed_on(o, d) and d not in self.rejected.get(o, ())

    def etf_candidate(self, d: int) -> tuple[float, int, int] | None:
        """Device d's m-ETF proposal ``(schedule_ts, topo_rank, op)``, memory-feasible."""
        due, pend, na = self.due[d], self.pend[d], self.na[d]
        while True:
            while pend and pend[0][0] <= na:
                r, rk, o = heapq.heappop(pend)
                if not self._live(o, d):
                    continue
                if self.contended:
                    r2 = self.ready_info(o, d)[0]
                    if r2 > na + _EPS:
                        heapq.heappush(pend, (r2, rk, o))
                        continue
                heapq.heappush(due, (rk, o))
            cand = None
            while due:
                rk, o = due[0]
                if not self._live(o, d):
                    heapq.heappop(due)
                    continue
                if self.contended:
                    r2 = self.ready_info(o, d)[0]
                    if r2 > na + _EPS:
                        heapq.heappop(due)
                        heapq.heappush(pend, (r2, rk, o))
                        continue
                cand = (na, rk, o)
                break
            if cand is None:
                while pend:
                    r, rk, o = pend[0]
                    if not self._live(o, d):
                        heapq.heappop(pend)
                        continue
                    if self.contended:
                        r2 = self.ready_info(o, d)[0]
                        if r2 > r + _EPS:
                            heapq.heapreplace(pend, (r2, rk, o))
                            continue
                    cand = (r, rk, o)
                    break
            if cand is None:
                return None
            o = cand[2]
            if self.enforce_memory and not self.fits(o, d, self.ready_info(o, d)[1]):
                self.reject(o, d)
                continue
            return cand

    def reject(self, o: int, d: int) -> None:
        """o does not fit on d: never propose it there (used memory only grows)."""
        self.rejected.setdefault(o, set()).add(d)
        if all(x in self.rejected[o] for x in self.allowed(o)):
            raise infeasible(self.g, self.c, self.algorithm, o)

    def candidate(self, d: int) -> tuple[float, int, int] | None:
        """Device d's proposal; subclasses (m-SCT) override it."""
        return self.etf_candidate(d)

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, o: int, d: int) -> None:
        r, inbound, plan = self.ready_info(o, d)
        st = max(self.na[d], r)
        en = st + self.compute[o]
        hold, need, _, inbound = self._mem_need(o, inbound)
        k = self.gkey[o]
        if k is not None and k not in self.gdev:
            self.gdev[k] = d
            # Members already queued elsewhere become stale; those devices must re-propose.
            self._dirty = [True] * self.m
        self.dev[o] = d
        self.start[o] = st
        self.end[o] = en
        self.na[d] = en
        self.commit_order.append(o)
        self.peak[d] = max(self.peak[d], self.used[d] + inbound + need)
        self.used[d] += inbound + hold
        if self.release_memory:
            self.used[d] -= self.release[o]
        for u, du, nb, s, e in plan:
            self.transfers.append(Transfer(u, o, du, d, nb, s, e))
            for tid, _b in self.et[(u, o)]:
                if (tid, d) not in self.cache:
                    self.cache[(tid, d)] = e
            if self.contention == "shared":
                self.chan[du] = self.chan[d] = e
            elif self.contention == "link":
                self.chan[(du, d)] = e
        if plan and self.contended:
            self._dirty = [True] * self.m
        self._dirty[d] = True
        for v in self.succ[o]:
            self.rem[v] -= 1
            if self.rem[v] == 0:
                self._insert(v)
        self.after_commit(o, d)

    def after_commit(self, o: int, d: int) -> None:
        """Hook for m-SCT."""

    # -- main loop ------------------------------------------------------------------------------
    def run(self) -> Schedule:
        for v in self.order:
            if self.rem[v] == 0:
                self._insert(v)
        best_cache = self._best
        for _ in range(self.n):
            best = None
            for d in range(self.m):
                c = best_cache[d]
                if self._dirty[d] or c is None or not self._live(c[2], d):
                    c = best_cache[d] = self.candidate(d)
                    self._dirty[d] = False
                if c is not None and (best is None or (c[0], c[1], d) < best):
                    best = (c[0], c[1], d, c[2])
            if best is None:
                o = next(i for i in self.order if self.dev[i] < 0)
                raise infeasible(self.g, self.c, self.algorithm, o)
            self.commit(best[3], best[2])
        return Schedule(
            device=np.asarray(self.dev, dtype=np.int64),
            start=np.asarray(self.start),
            end=np.asarray(self.end),
            peak_memory=list(self.peak),
            transfers=self.transfers,
            order=self.commit_order,
        )
