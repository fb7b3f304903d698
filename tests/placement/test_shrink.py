"""Grouping and fusion: acyclic results, conserved totals, exact placement round trips."""

from __future__ import annotations

import numpy as np
import pytest

from scaledl.placement import OpGraph, shrink
from scaledl.placement.graph import OpSpec, training_graph

from .helpers import random_dag


def _chain(n: int) -> OpGraph:
    g = OpGraph()
    for i in range(n):
        g.add_node(f"c{i}", 1e-3, permanent=10, temporary=5 + i)
        if i:
            g.add_edge(i - 1, i, [(i - 1, 100)])
    return g


def test_single_consumer_rule_collapses_a_chain() -> None:
    s = shrink(_chain(6))
    assert len(s.graph) == 1
    assert s.graph.compute[0] == pytest.approx(6e-3)
    assert s.graph.permanent[0] == 60
    assert s.graph.temporary[0] == 10  # largest temporary of the members
    assert s.members == [[0, 1, 2, 3, 4, 5]]
    assert s.expand([2]).tolist() == [2] * 6
    with pytest.raises(ValueError, match="not on the device"):
        s.contract([0, 0, 1, 0, 0, 0])


def test_group_size_cap_keeps_a_chain_splittable() -> None:
    s = shrink(_chain(6), max_group_bytes=35)
    assert 2 <= len(s.graph) <= 6
    for members in s.members:
        assert 10 * len(members) + max(5 + i for i in members) <= 35


def test_fusion_never_creates_a_cycle() -> None:
    # a -> b, a -> c -> b, all in one group: contracting a -> b would make a cycle with c.
    g = OpGraph()
    for name in "abcd":
        g.add_node(name, 1e-3, group="g" if name != "d" else None)
    g.add_edge("a", "b")
    g.add_edge("a", "c")
    g.add_edge("c", "b")
    g.add_edge("a", "d")
    g.add_edge("b", "d")
    s = shrink(g, single_consumer=False)
    s.graph.topo()  # raises on a cycle
    fused = {frozenset(m) for m in s.members}
    assert frozenset({0, 1}) not in fused


@pytest.mark.parametrize("seed", range(5))
def test_shrink_round_trips_and_conserves_totals(seed: int) -> None:
    g = random_dag(40, seed, p_edge=0.15)
    for i in range(0, 40, 5):
        g.group[i] = g.group[i + 1] = f"g{i}"
    s = shrink(g)
    s.graph.topo()
    assert sorted(i for m in s.members for i in m) == list(range(40))
    assert s.graph.compute.sum() == pytest.approx(g.compute.sum())
    assert s.graph.permanent.sum() == g.permanent.sum()
    rng = np.random.default_rng(seed)
    fused = rng.integers(0, 3, size=len(s.graph))
    original = s.expand(fused)
    assert np.array_equal(s.contract(original), fused)
    assert np.array_equal(s.expand(s.contract(original)), original)
    for i in range(0, 40, 5):  # a colocation group is one fused node or one fused group
        a, b = int(s.node_of[i]), int(s.node_of[i + 1])
        assert a == b or (s.graph.group[a] is not None and s.graph.group[a] == s.graph.group[b])
    # Every original edge between different fused nodes survives with its tensors.
    for (u, v), ts in g.edge_tensors.items():
        a, b = int(s.node_of[u]), int(s.node_of[v])
        if a != b:
            assert set(ts) <= set(s.graph.edge_tensors[(a, b)])


def test_training_graph_mirrors_forward_into_backward() -> None:
    specs = [
        OpSpec("x", out_bytes=400, needs_backward=False),
        OpSpec(
            "lin",
            ["x"],
            forward_s=1e-3,
            param_bytes=800,
            trainable_bytes=800,
            out_bytes=200,
            saved_bytes=400,
        ),
        OpSpec("act", ["lin"], forward_s=2e-4, out_bytes=200, saved_bytes=200),
    ]
    g = training_graph(specs, optimizer_state_factor=2.0, backward_factor=2.0)
    assert set(g.names) == {"fwd:x", "fwd:lin", "fwd:act", "bwd:lin", "bwd:act", "opt:lin"}
    i = g.index
    assert i["bwd:lin"] in g.succ[i["bwd:act"]]  # gradient flows backwards
    assert i["bwd:act"] in g.succ[i["fwd:lin"]]  # saved input of act
    assert i["opt:lin"] in g.succ[i["bwd:lin"]]
    # params + grads + Adam state (2x) + saved activations.
    assert g.permanent[i["fwd:lin"]] == 800 + 800 + 1600 + 400
    assert g.release[i["bwd:lin"]] == 400
    assert g.compute[i["bwd:lin"]] == pytest.approx(2e-3)
    assert g.group[i["fwd:lin"]] == g.group[i["bwd:lin"]] == g.group[i["opt:lin"]]
    # Without the single-consumer rule only same-group edges fuse; the result stays acyclic.
    s = shrink(g, single_consumer=False)
    s.graph.topo()
    assert s.graph.compute.sum() == pytest.approx(g.compute.sum())
    assert len(s.graph) < len(g)
