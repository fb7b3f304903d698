"""The simulator's host-dispatch model: launch times and schedules computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from scaledl.placement import Cluster, CommCost, HostModel, OpGraph, host_launch_times, simulate

MS = 1e-3


def _tiny() -> tuple[OpGraph, dict[str, int]]:
    """a (dev 0) feeds b (dev 1) and c (dev 0); backward mirrors it; a has an optimizer step."""
    g = OpGraph()
    for name, ms, kind in [
        ("fwd:a", 1, "forward"),
        ("fwd:b", 1, "forward"),
        ("fwd:c", 1, "forward"),
        ("bwd:c", 2, "backward"),
        ("bwd:b", 2, "backward"),
        ("bwd:a", 2, "backward"),
        ("opt:a", 0.5, "optimizer"),
    ]:
        g.add_node(name, ms * MS, kind=kind)
    for u, v in [
        ("fwd:a", "fwd:b"),
        ("fwd:a", "fwd:c"),
        ("fwd:b", "bwd:b"),
        ("fwd:c", "bwd:c"),
        ("bwd:b", "bwd:a"),
        ("bwd:c", "bwd:a"),
        ("bwd:a", "opt:a"),
    ]:
        g.add_edge(u, v, [(g.new_tensor(), 4)])
    place = {"fwd:a": 0, "fwd:b": 1, "fwd:c": 0, "bwd:c": 0, "bwd:b": 1, "bwd:a": 0, "opt:a": 0}
    return g, place


def _cluster() -> Cluster:
    return Cluster([10**9, 10**9], CommCost(0.1 * MS, 0.0), contention="none")


def test_launch_times_match_hand_computation() -> None:
    g, place = _tiny()
    host = HostModel(forward_s=3 * MS, backward_s=0.3 * MS, copy_s=0.2 * MS)
    t = dict(zip(g.names, host_launch_times(g, place, host) / MS))
    # Forward thread: a at 3, its copy to device 1 until 3.2, b at 6.2, c at 9.2.
    # Backward threads (reverse launch order c, b, a) from 9.2: c and b at 9.5 (b's thread then
    # launches the copy of its gradient until 9.7), a at max(9.5, 9.5, 9.5) + 0.3 = 9.8;
    # the optimizer when the last thread is done (9.8).
    expect = {"fwd:a": 3, "fwd:b": 6.2, "fwd:c": 9.2, "bwd:c": 9.5, "bwd:b": 9.5}
    expect |= {"bwd:a": 9.8, "opt:a": 9.8}
    for k, v in expect.items():
        assert t[k] == pytest.approx(v), k
    # The launch order follows ``order`` (by fx name) where the graph allows it.
    t2 = dict(zip(g.names, host_launch_times(g, place, host, order=["a", "c", "b"]) / MS))
    assert t2["fwd:c"] == pytest.approx(6.2) and t2["fwd:b"] == pytest.approx(9.2)


def test_simulation_with_host_matches_hand_schedule() -> None:
    g, place = _tiny()
    host = HostModel(forward_s=3 * MS, backward_s=0.3 * MS, copy_s=0.2 * MS)
    s = simulate(g, place, _cluster(), host=host).schedule
    start = dict(zip(g.names, s.start / MS))
    # a 3-4; b waits for its launch (6.2) not the copy (4.1): 6.2-7.2; c 9.2-10.2;
    # bwd:c 10.2-12.2; bwd:b 9.5-11.5; bwd:a after bwd:c (12.2) and b's gradient (11.6);
    # opt 14.2-14.7.
    expect = {"fwd:a": 3, "fwd:b": 6.2, "fwd:c": 9.2, "bwd:c": 10.2, "bwd:b": 9.5, "bwd:a": 12.2}
    expect["opt:a"] = 14.2
    for k, v in expect.items():
        assert start[k] == pytest.approx(v), k
    assert s.makespan == pytest.approx(14.7 * MS)
    # Without the host model the GPU-only replay is unchanged: a 0-1, b 1.1-2.1, c 1-2,
    # bwd:c 2-4, bwd:b 2.1-4.1, bwd:a 4.2-6.2, opt 6.2-6.7.
    base = simulate(g, place, _cluster())
    assert base.makespan == pytest.approx(6.7 * MS)
    free = simulate(g, place, _cluster(), host=HostModel(0.0))
    np.testing.assert_allclose(free.schedule.start, base.schedule.start)


def test_host_model_rejects_bad_costs() -> None:
    with pytest.raises(ValueError, match="host launch costs"):
        HostModel(forward_s=-1.0)
    with pytest.raises(ValueError, match="host launch costs"):
        HostModel(forward_s=float("nan"))
