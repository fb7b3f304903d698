"""Operator graphs for placement: nodes with compute time and memory, edges with tensors.

An :class:`OpGraph` is a DAG stored in flat arrays so that placers stay fast on 100k-node
graphs. Every edge carries the *distinct tensors* it moves as ``(tensor_id, bytes)`` pairs:
consumers of one tensor on the same remote device share a single transfer (Baechi spec §2.7).

:func:`training_graph` mirrors a forward graph into backward nodes and adds one optimizer node
per parameterised op, colocating forward, backward and optimizer step of each op (spec §2.8).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Bytes charged for a control edge or an edge whose tensor size is unknown (spec §2.1).
CONTROL_EDGE_BYTES = 4


@dataclass
class OpSpec:
    """One forward operator as traced: timing, memory and the producers it reads."""

    name: str
    inputs: list[str] = field(default_factory=list)
    forward_s: float = 0.0
    backward_s: float | None = None
    optimizer_s: float = 0.0
    param_bytes: int = 0
    trainable_bytes: int = 0
    out_bytes: int = 0
    saved_bytes: int = 0
    workspace_bytes: int = 0
    needs_backward: bool = True
    group: str | None = None
    module: str | None = None
    #: Bytes of each input edge; defaults to the producer's ``out_bytes``.
    input_bytes: dict[str, int] = field(default_factory=dict)


class OpGraph:
    """A DAG of operators with per-node compute seconds and memory bytes.

    Memory per node follows the scaledl training model (spec §2.6): ``permanent`` bytes stay
    allocated until the end of the step (parameters, gradients, optimizer state and saved
    activations), ``temporary`` bytes live only while the node runs, and ``release`` bytes are
    returned when the node finishes (a backward node frees its forward's saved activations; the
    simulator uses it, placers conservatively do not).
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.kind: list[str] = []
        self.module: list[str | None] = []
        self._compute: list[float] = []
        self._permanent: list[int] = []
        self._temporary: list[int] = []
        self._params: list[int] = []
        self._release: list[int] = []
        self._group: list[str | None] = []
        self.succ: list[list[int]] = []
        self.pred: list[list[int]] = []
        #: (u, v) -> ((tensor_id, bytes), ...): the distinct tensors u sends to v.
        self.edge_tensors: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
        self._next_tensor = -1
        self._frozen: dict[str, np.ndarray] | None = None
        self._topo: tuple[list[int], np.ndarray] | None = None

    # -- construction -------------------------------------------------------------------------
    def add_node(
        self,
        name: str,
        compute: float,
        *,
        permanent: int = 0,
        temporary: int = 0,
        params: int = 0,
        release: int = 0,
        group: str | None = None,
        kind: str = "op",
        module: str | None = None,
    ) -> int:
        """Add a node; a compute time <= 0 is charged as 1 µs (spec §2.1: weight <= 0 -> 1)."""
        if name in self.index:
            raise ValueError(f"duplicate node name {name!r}")
        if min(permanent, temporary, params, release) < 0:
            raise ValueError(f"node {name!r}: memory sizes must be >= 0")
        i = len(self.names)
        self.names.append(name)
        self.index[name] = i
        self.kind.append(kind)
        self.module.append(module)
        self._compute.append(float(compute) if compute > 0 else 1e-6)
        self._permanent.append(int(permanent))
        self._temporary.append(int(temporary))
        self._params.append(int(params))
        self._release.append(int(release))
        self._group.append(group)
        self.succ.append([])
        self.pred.append([])
        self._frozen = None
        self._topo = None
        return i

    def new_tensor(self) -> int:
        """A fresh tensor id (negative; non-negative ids name a node's main output)."""
        self._next_tensor -= 1
        return self._next_tensor + 1

    def add_edge(self, u: int | str, v: int | str, tensors: Iterable[tuple[int, int]] = ()) -> None:
        """Add u -> v carrying ``tensors`` (``(id, bytes)``); merges with an existing edge.

        Without tensors the edge is a control edge of 4 bytes.
        """
        u = self.index[u] if isinstance(u, str) else u
        v = self.index[v] if isinstance(v, str) else v
        if u == v:
            raise ValueError(f"self-loop on node {self.names[u]!r}")
        new = {t: max(int(b), CONTROL_EDGE_BYTES) for t, b in tensors}
        if not new:
            new = {self.new_tensor(): CONTROL_EDGE_BYTES}
        old = self.edge_tensors.get((u, v))
        if old is None:
            self.succ[u].append(v)
            self.pred[v].append(u)
        else:
            new = {**dict(old), **new}
        self.edge_tensors[(u, v)] = tuple(sorted(new.items()))
        self._topo = None

    # -- arrays ---------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        if self._frozen is None:
            self._frozen = {
                "compute": np.asarray(self._compute, dtype=np.float64),
                "permanent": np.asarray(self._permanent, dtype=np.int64),
                "temporary": np.asarray(self._temporary, dtype=np.int64),
                "params": np.asarray(self._params, dtype=np.int64),
                "release": np.asarray(self._release, dtype=np.int64),
            }
        return self._frozen

    @property
    def compute(self) -> np.ndarray:
        return self._arrays()["compute"]

    @property
    def permanent(self) -> np.ndarray:
        return self._arrays()["permanent"]

    @property
    def temporary(self) -> np.ndarray:
        return self._arrays()["temporary"]

    @property
    def params(self) -> np.ndarray:
        return self._arrays()["params"]

    @property
    def release(self) -> np.ndarray:
        return self._arrays()["release"]

    @property
    def group(self) -> list[str | None]:
        return self._group

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_edges(self) -> int:
        return len(self.edge_tensors)

    def edge_bytes(self, u: int, v: int) -> int:
        return sum(b for _, b in self.edge_tensors[(u, v)])

    def peak(self, i: int) -> int:
        """Memory a node needs while it runs: permanent plus temporary bytes."""
        return self._permanent[i] + self._temporary[i]

    # -- order and groups -----------------------------------------------------------------------
    def topo(self) -> tuple[list[int], np.ndarray]:
        """BFS (Kahn, FIFO) topological order and each node's rank in it: the tie-breaker."""
        if self._topo is None:
            n = len(self.names)
            indeg = [len(p) for p in self.pred]
            queue = deque(i for i in range(n) if indeg[i] == 0)
            order: list[int] = []
            while queue:
                u = queue.popleft()
                order.append(u)
                for v in self.succ[u]:
                    indeg[v] -= 1
                    if indeg[v] == 0:
                        queue.append(v)
            if len(order) != n:
                stuck = next(i for i in range(n) if indeg[i] > 0)
                raise ValueError(f"graph has a cycle through node {self.names[stuck]!r}")
            rank = np.empty(n, dtype=np.int64)
            rank[np.asarray(order, dtype=np.int64)] = np.arange(n)
            self._topo = (order, rank)
        return self._topo

    def groups(self) -> dict[str, list[int]]:
        """Colocation groups: group key -> member nodes in topological order."""
        _, rank = self.topo()
        out: dict[str, list[int]] = {}
        for i, g in enumerate(self._group):
            if g is not None:
                out.setdefault(g, []).append(i)
        for members in out.values():
            members.sort(key=lambda i: rank[i])
        return out

    def to_networkx(self):
        """The graph as a ``networkx.DiGraph`` (node attributes: compute, memory, group)."""
        import networkx as nx

        g = nx.DiGraph()
        for i, name in enumerate(self.names):
            g.add_node(
                i,
                name=name,
                compute=self._compute[i],
                permanent=self._permanent[i],
                temporary=self._temporary[i],
                group=self._group[i],
            )
        for (u, v), ts in self.edge_tensors.items():
            g.add_edge(u, v, bytes=sum(b for _, b in ts))
        return g

    def summary(self) -> dict[str, float]:
        return {
            "nodes": len(self),
            "edges": self.num_edges,
            "compute_s": float(self.compute.sum()),
            "permanent_bytes": int(self.permanent.sum()),
            "param_bytes": int(self.params.sum()),
        }


def forward_graph(specs: Sequence[OpSpec]) -> OpGraph:
    """An inference graph: one node per op, parameters permanent, outputs temporary."""
    g = OpGraph()
    for s in specs:
        g.add_node(
            s.name,
            s.forward_s,
            permanent=s.param_bytes,
            temporary=s.out_bytes + s.workspace_bytes,
            params=s.param_bytes,
            group=s.group,
            kind="forward",
            module=s.module,
        )
    _add_forward_edges(g, specs, lambda name: name)
    return g


def _add_forward_edges(g: OpGraph, specs: Sequence[OpSpec], key) -> None:
    out = {s.name: s.out_bytes for s in specs}
    for s in specs:
        v = g.index[key(s.name)]
        for src in s.inputs:
            u = g.index[key(src)]
            g.add_edge(u, v, [(u, s.input_bytes.get(src, out[src]))])


def training_graph(
    specs: Sequence[OpSpec],
    *,
    optimizer_state_factor: float = 2.0,
    backward_factor: float = 2.0,
) -> OpGraph:
    """Mirror forward ops into backward ops and add optimizer steps (one training step).

    Per op ``v`` with a backward: ``fwd:v`` keeps parameters, gradients, optimizer state
    (``optimizer_state_factor`` x trainable bytes; Adam = 2) and saved activations permanent;
    ``bwd:v`` (measured time, else ``backward_factor`` x forward) receives the output gradient
    from its consumers' backward nodes and the saved inputs from its producers, and frees the
    saved activations; ``opt:v`` updates the parameters. The three share a colocation group.
    """
    if optimizer_state_factor < 0 or backward_factor <= 0:
        raise ValueError("optimizer_state_factor must be >= 0 and backward_factor > 0")
    g = OpGraph()
    by_name = {s.name: s for s in specs}
    for s in specs:
        group = s.group or f"op:{s.name}"
        grads = s.trainable_bytes
        state = int(optimizer_state_factor * s.trainable_bytes)
        g.add_node(
            f"fwd:{s.name}",
            s.forward_s,
            permanent=s.param_bytes + grads + state + s.saved_bytes,
            temporary=s.out_bytes + s.workspace_bytes,
            params=s.param_bytes,
            group=group,
            kind="forward",
            module=s.module,
        )
    _add_forward_edges(g, specs, lambda name: f"fwd:{name}")
    bwd = [s for s in specs if s.needs_backward]
    for s in reversed(bwd):
        grad_in = sum(
            s.input_bytes.get(p, by_name[p].out_bytes)
            for p in s.inputs
            if by_name[p].needs_backward
        )
        g.add_node(
            f"bwd:{s.name}",
            s.backward_s if s.backward_s is not None else backward_factor * s.forward_s,
            temporary=grad_in + s.workspace_bytes,
            release=s.saved_bytes,
            group=s.group or f"op:{s.name}",
            kind="backward",
            module=s.module,
        )
    has_bwd = {s.name for s in bwd}
    for s in bwd:
        b = g.index[f"bwd:{s.name}"]
        f = g.index[f"fwd:{s.name}"]
        # An op that saved activations needs its own output (e.g. ReLU/softmax) or its inputs
        # back; those are the tensors the forward consumers receive, so a device caches them once.
        # (Which of them it saved is not recorded: both are charged, a conservative choice.)
        # A backward never starts before its forward: a control edge if nothing was saved.
        g.add_edge(f, b, [(f, s.out_bytes)] if s.saved_bytes else ())
        for p in s.inputs:
            u = g.index[f"fwd:{p}"]
            if s.saved_bytes:
                g.add_edge(u, b, [(u, s.input_bytes.get(p, by_name[p].out_bytes))])
            if p in has_bwd:
                grad = (g.new_tensor(), s.input_bytes.get(p, by_name[p].out_bytes))
                g.add_edge(b, g.index[f"bwd:{p}"], [grad])
        if s.trainable_bytes > 0:
            o = g.add_node(
                f"opt:{s.name}",
                s.optimizer_s,
                group=s.group or f"op:{s.name}",
                kind="optimizer",
                module=s.module,
            )
            g.add_edge(b, o, [(g.new_tensor(), s.trainable_bytes)])
    return g


def layered_graph(
    n: int,
    *,
    width: int = 16,
    fan_in: int = 2,
    seed: int = 0,
    compute_s: tuple[float, float] = (1e-4, 1e-3),
    tensor_bytes: tuple[int, int] = (2**16, 2**22),
    memory_bytes: tuple[int, int] = (2**20, 2**24),
) -> OpGraph:
    """A random layered DAG of ``n`` nodes (``width`` per layer, up to ``fan_in`` inputs from the
    previous layer): the synthetic graphs of the placement-time benchmark."""
    if n < 1 or width < 1 or fan_in < 1:
        raise ValueError("n, width and fan_in must be >= 1")
    rng = np.random.default_rng(seed)
    comp = rng.uniform(*compute_s, size=n)
    mem = rng.integers(*memory_bytes, size=n)
    out = rng.integers(*tensor_bytes, size=n)
    g = OpGraph()
    for i in range(n):
        g.add_node(f"n{i}", float(comp[i]), permanent=int(mem[i]), temporary=int(out[i]))
    for i in range(width, n):
        layer_start = (i // width - 1) * width
        k = int(rng.integers(1, fan_in + 1))
        for u in rng.choice(width, size=min(k, width), replace=False):
            src = layer_start + int(u)
            g.add_edge(src, i, [(src, int(out[src]))])
    return g


def parallel_branches_graph(
    branches: int,
    depth: int,
    *,
    compute_s: float = 1e-3,
    tensor_bytes: int = 2**16,
    node_bytes: int = 2**20,
) -> OpGraph:
    """source -> ``branches`` independent chains of ``depth`` ops -> sink: the textbook case
    where spreading over devices pays off (cheap communication, long branches)."""
    if branches < 1 or depth < 1:
        raise ValueError("branches and depth must be >= 1")
    g = OpGraph()
    src = g.add_node("source", compute_s, permanent=node_bytes, temporary=tensor_bytes)
    sink_inputs = []
    for b in range(branches):
        prev = src
        for k in range(depth):
            v = g.add_node(f"b{b}_{k}", compute_s, permanent=node_bytes, temporary=tensor_bytes)
            g.add_edge(prev, v, [(prev, tensor_bytes)])
            prev = v
        sink_inputs.append(prev)
    sink = g.add_node("sink", compute_s, permanent=node_bytes, temporary=tensor_bytes)
    for u in sink_inputs:
        g.add_edge(u, sink, [(u, tensor_bytes)])
    return g
