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
from scaledl.placement.list_scheduler import ListScheduler, Schedule, Transfer


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

    def launch_order(self) -> list[str]:
        """Forward node names (``fwd:`` prefix dropped: fx names for a traced model) by
        simulated start, ties by graph order: the ``order`` for
        :class:`~scaledl.placement.executor.PlacedModule`, so that each device's stream gets
        its ops in the simulated order and autograd's backward priority (creation order)
        follows it too."""
        start = self.schedule.start
        keyed = [
            (float(start[i]), i, _base_name(name))
            for i, name in enumerate(self.graph.names)
            if self.graph.kind[i] not in ("backward", "optimizer")
        ]
        return [name for _, _, name in sorted(keyed)]

    def phases(self) -> list[dict[str, float]]:
        """Per device and kind (forward, backward, optimizer): when its last node ends
        (``<kind>_end_s``), how long its nodes keep the device busy (``<kind>_busy_s``) and the
        seconds of the copies of their outputs it sends (``<kind>_sent_s``; PyTorch runs a
        GPU-to-GPU copy on the source device): what a per-device trace of the measured step
        can be set against."""
        s = self.schedule
        kinds = np.asarray(self.graph.kind)
        out = []
        for d in range(len(self.cluster)):
            row: dict[str, float] = {}
            for kind in ("forward", "backward", "optimizer"):
                mask = (s.device == d) & (kinds == kind)
                row[f"{kind}_end_s"] = float(s.end[mask].max()) if mask.any() else 0.0
                row[f"{kind}_busy_s"] = float((s.end[mask] - s.start[mask]).sum())
                row[f"{kind}_sent_s"] = float(
                    sum(
                        t.end - t.start
                        for t in s.transfers
                        if t.src == d and kinds[t.producer] == kind
                    )
                )
            out.append(row)
        return out

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


def _base_name(name: str) -> str:
    """A training-graph node's op name (``fwd:``/``bwd:``/``opt:`` dropped): its fx name."""
    return name[4:] if name[:4] in ("fwd:", "bwd:", "opt:") else name


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
    """Host seconds to launch one op: ``forward_s`` per forward op on the one Python thread,
    ``backward_s`` per backward op on autograd's thread of its device, ``copy_s`` per
    cross-device copy (default ``forward_s``). Calibrate them from a step that is not
    synchronised (host wall time / ops launched).

    ``copies``: when the forward issues a copy: ``"producer"`` (right after its producer, as
    :class:`~scaledl.placement.executor.PlacedModule` does) or ``"first-use"`` (just before
    its first consumer, so it also waits for what its device launched in between; the
    executor's behaviour before copies moved to their producer).

    ``grad_copies``: how a gradient goes back to the producer's device: ``"deferred"`` (on copy
    streams, after everything the sending device launched before it; the producer device's
    stream waits for it when that device's backward thread reaches the producer,
    ``PlacedModule(grad_copies="deferred")``) or ``"barrier"``
    (autograd's copy: it waits for, and then holds, the producer device's stream at the
    moment the sending device's thread issues it).

    ``backward_threads``: ``"device"`` (autograd's thread per device launch in parallel) or
    ``"shared"`` (they take turns: one host timeline for every backward task, as when the
    threads contend for the GIL, which the Python copy functions and hooks hold, and for the
    CUDA driver's launch path; when several threads have a task ready, the one that waited
    longest goes first, as a contended lock alternates). On 2 H200s the measured
    ``backward()`` wall time of split placements is what one-device per-task costs give when
    serialised, not in parallel.

    ``extra_forward_s`` / ``extra_backward_s``: host seconds *added* to every forward launch
    (and forward copy) and every backward task (and gradient copy and wait) when the
    placement uses two or more devices. The per-launch host cost measured on one GPU grows
    when a step launches on two, for every op, not only at device switches; the growth is a
    fixed cost per launch (the second device's runtime path), not a share of the op's own
    host work: a calibration chain of one-kernel launches gains 31 us per launch on 2 H200s,
    a Transformer layer of ~30 kernels (557 us per launch) about as much. Calibrate them from
    a two-device measurement that is not the placement being predicted
    (:func:`fit_host_model`). ``multi_forward`` / ``multi_backward``: the earlier model,
    factors on those costs (it over-predicts models whose launches are costly).

    ``optimizer_s``: host seconds of ``optimizer.step()``; the optimizer nodes are launched
    evenly over it (in graph order) once ``backward()`` has returned. Where the step is
    host-bound the devices wait for these launches.

    ``forward_weights`` / ``backward_weights``: relative host cost of each op's forward launch
    / backward task (fx name -> weight > 0), or ``None`` for equal costs. An op's launch costs
    ``forward_s * w / mean(w)`` (its backward task ``backward_s * w / mean(w)``), the mean
    taken over the replayed graph's forward (backward) nodes, so the one-device totals that
    calibrated ``forward_s`` and ``backward_s`` are unchanged; copies, gradient copies and
    waits keep their costs. A leaf module of several kernels (Conv + BN + ReLU) takes several
    times the host time of a ``cat`` or a pooling op: measure the weights on one device
    (``PlacedModule.host_clock`` / ``backward_clock`` with every node on one device), never
    on the placement being predicted. Every op with a node of that kind in the replayed
    graph needs a weight; weights of other ops are not used."""

    forward_s: float
    backward_s: float = 0.0
    copy_s: float | None = None
    copies: str = "producer"
    grad_copies: str = "deferred"
    backward_threads: str = "device"
    multi_forward: float = 1.0
    multi_backward: float = 1.0
    optimizer_s: float = 0.0
    extra_forward_s: float = 0.0
    extra_backward_s: float = 0.0
    forward_weights: Mapping[str, float] | None = None
    backward_weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        for key in ("forward_weights", "backward_weights"):
            given = getattr(self, key)
            if given is None:
                continue
            w = np.array(list(given.values()), dtype=float)
            if len(w) == 0 or not np.all(np.isfinite(w)) or w.min() <= 0:
                raise ValueError(f"{key} must be a non-empty mapping of finite weights > 0")
        costs = (self.forward_s, self.backward_s, self.copy_s or 0.0, self.optimizer_s)
        costs += (self.extra_forward_s, self.extra_backward_s)
        if min(costs) < 0 or not all(np.isfinite(costs)):
            raise ValueError(f"host launch costs must be finite and >= 0, got {self}")
        factors = (self.multi_forward, self.multi_backward)
        if min(factors) <= 0 or not all(np.isfinite(factors)):
            raise ValueError(f"multi-device host factors must be finite and > 0, got {self}")
        if self.backward_threads not in ("device", "shared"):
            raise ValueError(
                f"backward_threads must be 'device' or 'shared', got {self.backward_threads!r}"
            )
        if self.copies not in ("producer", "first-use"):
            raise ValueError(f"copies must be 'producer' or 'first-use', got {self.copies!r}")
        if self.grad_copies not in ("deferred", "barrier"):
            raise ValueError(
                f"grad_copies must be 'deferred' or 'barrier', got {self.grad_copies!r}"
            )


@dataclass(frozen=True)
class HostTiming:
    """Host wall time of one unsynchronised training step and what it launched: the forward
    (+ loss) over ``forward_launches`` (ops and copies), ``backward()`` over ``backward_tasks``
    (each backward node, plus per cross-device copy its gradient's copy and, deferred, the
    wait for it: the replay's tasks), and ``optimizer.step()``."""

    forward_s: float
    forward_launches: int
    backward_s: float
    backward_tasks: int
    optimizer_s: float = 0.0

    def __post_init__(self) -> None:
        if min(self.forward_launches, self.backward_tasks) < 1:
            raise ValueError(f"a host timing needs >= 1 launch and task, got {self}")
        times = (self.forward_s, self.backward_s, self.optimizer_s)
        if min(times) < 0 or not all(np.isfinite(times)):
            raise ValueError(f"host times must be finite and >= 0, got {self}")

    @property
    def per_launch(self) -> tuple[float, float]:
        """Host seconds per forward launch and per backward task."""
        return self.forward_s / self.forward_launches, self.backward_s / self.backward_tasks


def fit_host_model(
    one_device: HostTiming,
    calibration: tuple[HostTiming, HostTiming] | None = None,
    multi: str = "extra",
    **options: Any,
) -> HostModel:
    """A :class:`HostModel` from measurements that do not run the placement it predicts.

    ``one_device``: the model itself on one device: ``forward_s`` and ``backward_s`` are its
    per-launch host costs, ``optimizer_s`` its optimizer step's host time. ``calibration``:
    one calibration model timed on one device and split across two. ``multi="extra"``: the
    differences of their per-launch costs (floored at 0) are the host seconds a second
    device adds per forward launch and backward task, and a copy's launch costs what a
    launch of the calibration model costs on one device (a copy is one small launch, however
    costly the model's own ops are); ``multi="factor"``: the ratios are factors on the
    model's costs (the earlier model). ``options`` go to :class:`HostModel`
    (``backward_threads=``...)."""
    forward_s, backward_s = one_device.per_launch
    if multi not in ("extra", "factor"):
        raise ValueError(f"multi must be 'extra' or 'factor', got {multi!r}")
    if calibration is not None:
        (f1, b1), (f2, b2) = calibration[0].per_launch, calibration[1].per_launch
        if min(f1, b1) <= 0:
            raise ValueError("the one-device calibration timing must have host time > 0")
        if multi == "factor":
            options = {"multi_forward": f2 / f1, "multi_backward": b2 / b1, **options}
        else:
            extra = {"extra_forward_s": max(f2 - f1, 0.0), "extra_backward_s": max(b2 - b1, 0.0)}
            options = {**extra, "copy_s": f1, **options}
    options = {"optimizer_s": one_device.optimizer_s, **options}
    return HostModel(forward_s, backward_s, **options)


def _forward_launch_order(graph: OpGraph, fwd: list[int], order: Sequence[str] | None) -> list:
    """Forward nodes in the executor's launch order: a stable topological order keyed by the
    position of the node's name (with or without the ``fwd:`` prefix) in ``order``."""
    pos = {name: i for i, name in enumerate(order or [])}
    own = {v: i for i, v in enumerate(fwd)}
    key = {}
    for v in fwd:
        name = graph.names[v]
        p = pos.get(name, pos.get(_base_name(name)))
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


def _relative_weights(
    graph: OpGraph, of: list[bool], weights: Mapping[str, float] | None, what: str
) -> np.ndarray:
    """Per node where ``of`` holds, its op's weight over the mean weight of those nodes'
    ops; 1 elsewhere and everywhere if ``weights`` is None."""
    out = np.ones(len(graph))
    if weights is None:
        return out
    nodes = [v for v in range(len(graph)) if of[v]]
    given = {_base_name(k): float(x) for k, x in weights.items()}
    missing = sorted({_base_name(graph.names[v]) for v in nodes} - set(given))
    if missing:
        raise ValueError(f"{what}_weights has no weight for {len(missing)} ops, e.g. {missing[:3]}")
    w = np.array([given[_base_name(graph.names[v])] for v in nodes])
    out[nodes] = w / w.mean()
    return out


class _ExecutorReplay:
    """The training step as :class:`~scaledl.placement.executor.PlacedModule`, autograd and
    the optimizer issue it: first the host (when each op and copy is launched), then the
    devices (each runs its launches in order, one stream per device)."""

    def __init__(self, graph: OpGraph, devs: np.ndarray, cluster: Cluster, host: HostModel):
        self.g, self.devs, self.c, self.h = graph, devs, cluster, host
        copy_s = host.forward_s if host.copy_s is None else host.copy_s
        multi = len(set(devs.tolist())) > 1
        f, b = (host.multi_forward, host.multi_backward) if multi else (1.0, 1.0)
        ef, eb = (host.extra_forward_s, host.extra_backward_s) if multi else (0.0, 0.0)
        #: Host seconds per forward launch (before its weight), forward copy, backward task
        #: (before its weight) and gradient task; the second device's fixed cost per launch
        #: (``extra_*``) is added after weighting.
        self.forward_s, self.copy_s = host.forward_s * f, copy_s * f + ef
        self.backward_s, self.grad_s = host.backward_s * b, copy_s * b + eb
        self.extra_f, self.extra_b = ef, eb
        kinds = graph.kind
        self.bwd = [k == "backward" for k in kinds]
        self.opt = [k == "optimizer" for k in kinds]
        self.fwd = [not (b or o) for b, o in zip(self.bwd, self.opt)]
        #: Relative host cost of each node's launch and backward task (1 without weights).
        self.fwd_weight = _relative_weights(graph, self.fwd, host.forward_weights, "forward")
        self.bwd_weight = _relative_weights(graph, self.bwd, host.backward_weights, "backward")
        #: (host time, kind, payload) per launch; kinds: run, fcopy, bcopy, bwait.
        self.launches: list[tuple[float, str, Any]] = []
        self.launch_time = np.zeros(len(graph))

    def _launch(self, t: float, kind: str, payload: Any) -> None:
        self.launches.append((t, kind, payload))
        if kind == "run":
            self.launch_time[payload] = t

    def host(self, order: Sequence[str] | None) -> None:
        g, devs = self.g, self.devs
        fwd_order = _forward_launch_order(g, [v for v in range(len(g)) if self.fwd[v]], order)
        # Forward: one thread; each producer's copies follow it (one per other device, over
        # the distinct tensors its consumers there read).
        t = 0.0
        sends: dict[int, dict[int, dict[int, int]]] = {}  # producer -> device -> tensors
        for v in fwd_order:
            for w in g.succ[v]:
                if self.fwd[w] and devs[w] != devs[v]:
                    sends.setdefault(v, {}).setdefault(int(devs[w]), {}).update(
                        g.edge_tensors[(v, w)]
                    )
        # The autograd node of a copy is created when the copy is issued: its rank among the
        # backward tasks (a producer's position in the launch order, plus a half).
        self.copy_rank: dict[tuple[int, int], float] = {}
        first_use = self.h.copies == "first-use"
        for i, v in enumerate(fwd_order):
            if first_use:
                d = int(devs[v])
                for u in dict.fromkeys(g.pred[v]):
                    if d in sends.get(u, {}) and (u, d) not in self.copy_rank:
                        t += self.copy_s
                        self._launch(t, "fcopy", (u, d, sum(sends[u][d].values())))
                        self.copy_rank[(u, d)] = i - 0.5
            t += self.forward_s * self.fwd_weight[v] + self.extra_f
            self._launch(t, "run", v)
            if not first_use:
                for dst in sorted(sends.get(v, {})):
                    t += self.copy_s
                    self._launch(t, "fcopy", (v, dst, sum(sends[v][dst].values())))
                    self.copy_rank[(v, dst)] = i + 0.5
        self._backward(fwd_order, t)

    def _backward(self, fwd_order: list[int], t_forward: float) -> None:
        """Autograd's threads, one per device, each running its ready task with the highest
        sequence number (the latest created in the forward) first. A gradient for another
        device is sent by the backward of the forward copy, a task of the receiving-side
        thread created right after the producer (so it ranks just above it)."""
        g, devs = self.g, self.devs
        seq_of = {_base_name(g.names[v]): i for i, v in enumerate(fwd_order)}
        fwd_of = {_base_name(g.names[v]): v for v in fwd_order}
        tasks: list[tuple[str, Any, int, float, float]] = []  # kind, payload, device, seq, cost
        index: dict[Any, int] = {}
        deps: list[list[int]] = []
        for b in range(len(g)):
            if self.bwd[b]:
                seq = seq_of.get(_base_name(g.names[b]), -1)
                index[b] = len(tasks)
                cost = self.backward_s * self.bwd_weight[b] + self.extra_b
                tasks.append(("run", b, int(devs[b]), seq, cost))
                deps.append([])
        for b in range(len(g)):
            if not self.bwd[b]:
                continue
            remote: dict[int, list[int]] = {}
            for c in g.pred[b]:
                if not self.bwd[c]:
                    continue
                if devs[c] == devs[b]:
                    deps[index[b]].append(index[c])
                else:
                    remote.setdefault(int(devs[c]), []).append(c)
            for d, grads in sorted(remote.items()):
                nbytes = max(b_ for c in grads for _, b_ in g.edge_tensors[(c, b)])
                k = len(tasks)
                u = fwd_of.get(_base_name(g.names[b]))
                seq = self.copy_rank.get((u, d), tasks[index[b]][3] + 0.5)
                tasks.append(("bcopy", (b, d, nbytes, grads), d, seq, self.grad_s))
                deps.append([index[c] for c in grads])
                if self.h.grad_copies == "deferred":  # the wait: a task of b's device thread
                    tasks.append(("bwait", (b, d), int(devs[b]), seq - 0.25, self.grad_s))
                    deps.append([k])
                    k += 1
                deps[index[b]].append(k)
        users: list[list[int]] = [[] for _ in tasks]
        left = [len(x) for x in deps]
        for k, ds in enumerate(deps):
            for j in ds:
                users[j].append(k)
        ready_at = [t_forward] * len(tasks)
        m = len(self.c)
        free = [t_forward] * m
        shared = self.h.backward_threads == "shared"
        pending: list[list[int]] = [[] for _ in range(m)]
        for k, task in enumerate(tasks):
            if not left[k]:
                pending[task[2]].append(k)
        turn = [0] * m  # when each thread last ran (shared: ties go to the longest waiting)
        for step in range(1, len(tasks) + 1):
            best = None
            for d in range(m):
                if not pending[d]:
                    continue
                t = max(free[d], min(ready_at[k] for k in pending[d]))
                k = max((k for k in pending[d] if ready_at[k] <= t), key=lambda k: tasks[k][3])
                if best is None or (t, turn[d]) < best[0]:
                    best = ((t, turn[d]), d, k)
            if best is None:
                raise ValueError("the backward graph has a cycle")
            (t, _), d, k = best
            if shared:
                turn[d] = step
            pending[d].remove(k)
            kind, payload, _, _, cost = tasks[k]
            free[d] = t + cost
            if shared:  # the threads take turns: none launches while another one does
                free = [free[d]] * m
            self._launch(free[d], kind, payload)
            for u in users[k]:
                ready_at[u] = max(ready_at[u], free[d])
                left[u] -= 1
                if not left[u]:
                    pending[tasks[u][2]].append(u)
        # ``optimizer.step()`` once ``backward()`` has returned, its launches spread over its
        # host time (``optimizer_s``) in graph order.
        done = max(free, default=t_forward)
        steps = [v for v in range(len(g)) if self.opt[v]]
        for k, v in enumerate(steps):
            self._launch(done + self.h.optimizer_s * (k + 1) / len(steps), "run", v)

    def host_phases(self) -> dict[str, float]:
        """Host seconds to launch the forward (ops and copies), to run ``backward()`` and to
        run ``optimizer.step()``."""
        fwd, bwd = [0.0], []
        for t, kind, x in self.launches:
            if kind == "fcopy" or (kind == "run" and self.fwd[x]):
                fwd.append(t)
            elif kind != "run" or self.bwd[x]:  # gradient copies and waits, backward nodes
                bwd.append(t)
        t_fwd = max(fwd)
        return {
            "host_forward_s": t_fwd,
            "host_backward_s": max(bwd, default=t_fwd) - t_fwd,
            "host_optimizer_s": self.h.optimizer_s,
        }

    def devices(self) -> tuple[np.ndarray, np.ndarray, list[Transfer]]:
        """Start and end per node and the copies, replaying the launches in host-time order:
        a launch starts when it was launched, its stream is free and its inputs are there."""
        g, devs, c = self.g, self.devs, self.c
        n = len(g)
        start, end = np.zeros(n), np.zeros(n)
        stream = [0.0] * len(c)  # each device's compute stream
        chan: dict[tuple[int, int], float] = {}  # the copy streams of a device pair
        arrival: dict[tuple[int, int], float] = {}  # forward copies (producer, device)
        garrival: dict[tuple[int, int], float] = {}  # gradient copies (backward node, device)
        first_user: dict[tuple[int, int], int] = {}
        transfers: list[Transfer] = []
        # Copy/compute contention: the byte-moving part of each copy per device it touches,
        # and each device's compute, so whichever of an overlapping pair comes second in
        # launch order pays ``copy_slowdown`` x the overlap on that device's stream.
        slow = c.copy_slowdown
        copying: list[list[tuple[float, float]]] = [[] for _ in range(len(c))]
        computing: list[list[tuple[float, float]]] = [[] for _ in range(len(c))]
        launches = sorted(enumerate(self.launches), key=lambda x: (x[1][0], x[0]))
        for _, (t, kind, x) in launches:
            if kind == "run":
                v, d = x, int(devs[x])
                r = max(t, stream[d])
                for u in g.pred[v]:
                    if devs[u] == d:
                        r = max(r, end[u])
                    elif self.fwd[u]:  # its forward copy (a saved input for a backward)
                        r = max(r, arrival.get((u, d), end[u]))
                        first_user.setdefault((u, d), v)
                    # a remote gradient: its copy already holds this stream (below)
                e = r + g.compute[v]
                if slow:
                    e += slow * overlap_seconds(copying[d], r, e)
                    computing[d].append((r, e))
                start[v], end[v] = r, e
                stream[d] = e
                continue
            if kind == "bwait":  # the producer device's stream waits for its gradient copy
                b, src = x
                d = int(devs[b])
                stream[d] = max(stream[d], garrival[(b, src)])
                continue
            deferred = self.h.grad_copies == "deferred"
            if kind == "fcopy":  # waits for its producer's stream, then its copy stream
                v, dst, nbytes = x
                src, grads = int(devs[v]), ()
                wait = stream[src]
            else:  # a gradient: after everything its device launched before it (the copy
                # stream waits for the sending device's stream), and the barrier's other side
                b, src, nbytes, grads = x
                v, dst = b, int(devs[b])
                wait = max([end[u] for u in grads] + [stream[src]])
                if not deferred:
                    wait = max(wait, stream[dst])
            # Copy streams per (source, destination) pair; autograd's copy of a gradient runs
            # on the stream of the forward copy it reverses.
            key = (dst, src) if kind == "bcopy" and not deferred else (src, dst)
            s = max(t, wait, chan.get(key, 0.0))
            e = s + c.latency[src][dst] + nbytes * c.per_byte[src][dst]
            chan[key] = e
            if slow:
                moving = (e - nbytes * c.per_byte[src][dst], e)
                for dd in (src, dst):
                    stream[dd] += slow * overlap_seconds(computing[dd], *moving)
                    copying[dd].append(moving)
            if kind == "fcopy":
                arrival[(v, dst)] = e
                transfers.append(Transfer(v, v, src, dst, nbytes, s, e))
            else:
                garrival[(b, src)] = e
                if not deferred:  # the receiving device's stream waits for the copy now
                    stream[dst] = max(stream[dst], e)
                transfers.append(Transfer(grads[0], b, src, dst, nbytes, s, e))
        for tr in transfers:  # name the first consumer of each forward copy
            if tr.producer == tr.consumer and (tr.producer, tr.dst) in first_user:
                tr.consumer = first_user[(tr.producer, tr.dst)]
        return start, end, transfers


def overlap_seconds(intervals: Sequence[tuple[float, float]], a: float, b: float) -> float:
    """Total overlap of ``[a, b]`` with ``intervals`` (each ``(start, end)``)."""
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in intervals)


def host_launch_times(
    graph: OpGraph,
    placement: Mapping[str, int] | Sequence[int] | np.ndarray,
    host: HostModel,
    order: Sequence[str] | None = None,
    *,
    cluster: Cluster | None = None,
) -> np.ndarray:
    """When the executor's host has launched each node (seconds from the step's start).

    Forward (and untyped) nodes: one thread, in launch order (``order``: names by launch
    priority, as ``Plan.fx_order()``; default graph order), each taking ``forward_s`` and each
    followed by its copies (``copy_s`` per other device its forward consumers run on).
    Backward nodes: after the forward, one thread per device, each picking among the ready
    tasks the one created last in the forward (autograd's priority) and taking ``backward_s``;
    a gradient for another device is one more task (``copy_s``) on the sending device's
    thread. Optimizer nodes: when the last backward thread is done.
    """
    devs = as_device_array(graph, placement)
    m = int(devs.max()) + 1 if len(devs) else 1
    replay = _ExecutorReplay(graph, devs, cluster or Cluster([1] * m), host)
    replay.host(order)
    return replay.launch_time


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

    With ``host`` the timing follows the executor instead of the list scheduler: launches at
    the host times of :func:`host_launch_times` (forward launch ``order`` as given to
    ``PlacedModule``), each device running its launches in that order (one stream), forward
    copies on a stream per device pair right after their producer, a gradient copy a barrier
    of both devices' streams (PyTorch's cross-device copy). ``contention`` does not apply
    there (copies of a device pair queue on their stream). Memory is the list scheduler's."""
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
    extra: dict[str, Any] = {"host_model": host is not None}
    if host is not None:
        replay = _ExecutorReplay(graph, devs, cluster, host)
        replay.host(order)
        start, end, transfers = replay.devices()
        launched = sorted(range(len(graph)), key=lambda v: (replay.launch_time[v], v))
        sched = Schedule(devs, start, end, sched.peak_memory, transfers, launched)
        extra.update(replay.host_phases())
    return finish(algorithm, graph, cluster, sched, t0, **extra)
