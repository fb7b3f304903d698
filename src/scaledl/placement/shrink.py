"""Graph shrinking (spec §2.2): colocation groups, the single-consumer rule, cycle-free fusion.

1. Union the graph's colocation groups (forward/backward/optimizer of one op, tied weights).
2. Co-placement: an op with exactly one out-edge joins its consumer's group, unless the merged
   group would exceed ``max_group_bytes`` (a memory-constrained placer must still be able to
   split a long chain; the reference has no such guard) or, by default, the consumer is a join
   (several inputs): every branch ending in a join would otherwise land in the join's group
   and parallel branches would be serialised. ``merge_joins=True`` restores the plain rule.
3. Fusion inside a group: contract u -> v unless ``outdeg(u) > 1 and indeg(v) > 1`` (a cycle
   is possible); with ``exact=True`` such an edge is still contracted when no other path
   u ~> v exists. Fused node: summed compute, permanent, params and release, the largest
   temporary, edges merged over distinct tensors.
4. Renumber consecutively; :class:`ShrunkGraph` maps placements both ways exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaledl.placement.graph import OpGraph


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving; ``union`` keeps ``a``'s root."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra


@dataclass
class ShrunkGraph:
    """A fused graph and the exact mapping between its nodes and the original ones."""

    graph: OpGraph
    original: OpGraph
    members: list[list[int]]
    node_of: np.ndarray

    def expand(self, placement) -> np.ndarray:
        """Device per original node from a device per fused node."""
        placement = np.asarray(placement, dtype=np.int64)
        if placement.shape != (len(self.graph),):
            raise ValueError(f"expected {len(self.graph)} devices, got {placement.size}")
        return placement[self.node_of]

    def contract(self, placement) -> np.ndarray:
        """Device per fused node from a device per original node (members must agree)."""
        placement = np.asarray(placement, dtype=np.int64)
        if placement.shape != (len(self.original),):
            raise ValueError(f"expected {len(self.original)} devices, got {placement.size}")
        out = placement[[m[0] for m in self.members]]
        bad = np.flatnonzero(out[self.node_of] != placement)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"node {self.original.names[i]!r} is not on the device of the rest of its "
                f"fused node {self.graph.names[int(self.node_of[i])]!r}"
            )
        return out


def group_bytes(graph: OpGraph, members: list[int]) -> int:
    """Memory of a set of nodes placed together: summed permanent plus largest temporary."""
    return int(graph.permanent[members].sum() + graph.temporary[members].max())


def shrink(
    graph: OpGraph,
    *,
    single_consumer: bool = True,
    merge_joins: bool = False,
    fuse: bool = True,
    exact: bool = True,
    max_group_bytes: int | None = None,
) -> ShrunkGraph:
    """Group and fuse ``graph``; see the module docstring for the rules."""
    n = len(graph)
    order, rank = graph.topo()
    uf = UnionFind(n)
    first_of: dict[str, int] = {}
    for i, key in enumerate(graph.group):
        if key is not None:
            uf.union(first_of.setdefault(key, i), i)
    perm = graph.permanent.astype(np.int64)
    temp = graph.temporary.astype(np.int64)
    gperm = dict.fromkeys(range(n), 0)
    gtemp = dict.fromkeys(range(n), 0)
    for i in range(n):
        r = uf.find(i)
        gperm[r] += int(perm[i])
        gtemp[r] = max(gtemp[r], int(temp[i]))
    grouped = {uf.find(i) for i in range(n) if graph.group[i] is not None}
    if single_consumer:
        for u in order:
            if len(graph.succ[u]) != 1:
                continue
            v = graph.succ[u][0]
            if len(graph.pred[v]) > 1 and not merge_joins:
                continue
            ru, rv = uf.find(u), uf.find(v)
            if ru == rv:
                continue
            size = gperm[ru] + gperm[rv] + max(gtemp[ru], gtemp[rv])
            if max_group_bytes is not None and size > max_group_bytes:
                continue
            r = uf.union(rv, ru)
            gperm[r], gtemp[r] = gperm[ru] + gperm[rv], max(gtemp[ru], gtemp[rv])
            grouped.add(r)
    group_root = [uf.find(i) for i in range(n)]

    # Fusion on a mutable copy of the adjacency, node ids = original representative.
    fz = UnionFind(n)
    succ = [set(s) for s in graph.succ]
    pred = [set(p) for p in graph.pred]
    tensors = {e: dict(ts) for e, ts in graph.edge_tensors.items()}
    if fuse:
        for u in order:
            for v in list(graph.succ[u]):
                a, b = fz.find(u), fz.find(v)
                if a == b or group_root[u] != group_root[v] or b not in succ[a]:
                    continue
                if len(succ[a]) > 1 and len(pred[b]) > 1 and (not exact or _other_path(succ, a, b)):
                    continue
                _contract(fz, succ, pred, tensors, a, b)
    reps = sorted({fz.find(i) for i in range(n)}, key=lambda r: rank[r])
    members: dict[int, list[int]] = {r: [] for r in reps}
    for i in order:
        members[fz.find(i)].append(i)
    new_index = {r: k for k, r in enumerate(reps)}
    node_of = np.array([new_index[fz.find(i)] for i in range(n)], dtype=np.int64)
    group_size: dict[int, int] = {}
    for r in reps:
        group_size[group_root[r]] = group_size.get(group_root[r], 0) + 1
    g = OpGraph()
    comp, rel, params = graph.compute, graph.release, graph.params
    for r in reps:
        ms = members[r]
        name = graph.names[ms[0]] if len(ms) == 1 else f"{graph.names[ms[0]]}+{len(ms) - 1}"
        root = group_root[r]
        g.add_node(
            name,
            float(comp[ms].sum()),
            permanent=int(perm[ms].sum()),
            temporary=int(temp[ms].max()),
            params=int(params[ms].sum()),
            release=int(rel[ms].sum()),
            group=f"g{root}" if group_size[root] > 1 else None,
            kind=graph.kind[ms[0]],
            module=graph.module[ms[0]],
        )
    for a in reps:
        for b in sorted(succ[a], key=lambda x: rank[x]):
            g.add_edge(new_index[a], new_index[b], tensors[(a, b)].items())
    return ShrunkGraph(g, graph, [members[r] for r in reps], node_of)


def _other_path(succ: list[set[int]], a: int, b: int, budget: int = 20000) -> bool:
    """Is there a path a ~> b other than the edge a -> b? A search that visits more than
    ``budget`` nodes answers yes: refusing a contraction is always safe."""
    stack = [s for s in succ[a] if s != b]
    seen = set(stack)
    while stack:
        x = stack.pop()
        if b in succ[x] or len(seen) > budget:
            return True
        for y in succ[x]:
            if y not in seen:
                seen.add(y)
                stack.append(y)
    return False


def _contract(fz: UnionFind, succ, pred, tensors, a: int, b: int) -> None:
    """Merge b into a (a -> b is an edge); tensors of parallel edges are merged."""
    fz.parent[b] = a
    succ[a].discard(b)
    pred[b].discard(a)
    tensors.pop((a, b), None)
    for s in succ[b]:
        pred[s].discard(b)
        pred[s].add(a)
        ts = tensors.pop((b, s))
        tensors.setdefault((a, s), {}).update(ts)
        succ[a].add(s)
    for p in pred[b]:
        succ[p].discard(b)
        succ[p].add(a)
        ts = tensors.pop((p, b))
        tensors.setdefault((p, a), {}).update(ts)
        pred[a].add(p)
    succ[b] = set()
    pred[b] = set()
