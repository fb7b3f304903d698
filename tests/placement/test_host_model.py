"""The simulator's executor replay with host launches: schedules computed by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scaledl.placement import (
    Cluster,
    CommCost,
    HostModel,
    HostTiming,
    OpGraph,
    copy_contention,
    fit_copy_slowdown,
    fit_host_model,
    host_launch_times,
    simulate,
)
from scaledl.placement.simulator import overlap_seconds

MS = 1e-3


def _graph(nodes, edges) -> OpGraph:
    g = OpGraph()
    for name, ms in nodes:
        kind = {"fwd": "forward", "bwd": "backward", "opt": "optimizer"}[name[:3]]
        g.add_node(name, ms * MS, kind=kind)
    for u, v in edges:
        g.add_edge(u, v, [(g.new_tensor(), 4)])
    return g


def _tiny() -> tuple[OpGraph, dict[str, int]]:
    """a (dev 0) feeds b (dev 1) and c (dev 0); backward mirrors it; a has an optimizer step."""
    g = _graph(
        [
            ("fwd:a", 1),
            ("fwd:b", 1),
            ("fwd:c", 1),
            ("bwd:c", 2),
            ("bwd:b", 2),
            ("bwd:a", 2),
            ("opt:a", 0.5),
        ],
        [
            ("fwd:a", "fwd:b"),
            ("fwd:a", "fwd:c"),
            ("fwd:b", "bwd:b"),
            ("fwd:c", "bwd:c"),
            ("bwd:b", "bwd:a"),
            ("bwd:c", "bwd:a"),
            ("bwd:a", "opt:a"),
        ],
    )
    place = {"fwd:a": 0, "fwd:b": 1, "fwd:c": 0, "bwd:c": 0, "bwd:b": 1, "bwd:a": 0, "opt:a": 0}
    return g, place


def _cluster() -> Cluster:
    return Cluster([10**9, 10**9], CommCost(0.1 * MS, 0.0), contention="none")


HOST = HostModel(forward_s=3 * MS, backward_s=0.3 * MS, copy_s=0.2 * MS)
BARRIER = HostModel(3 * MS, 0.3 * MS, 0.2 * MS, grad_copies="barrier")


def test_launch_times_match_hand_computation() -> None:
    g, place = _tiny()
    t = dict(zip(g.names, host_launch_times(g, place, BARRIER) / MS))
    # Forward thread: a at 3, its copy to device 1 until 3.2, b at 6.2, c at 9.2.
    # Backward threads from 9.2: c (device 0) and b (device 1) at 9.5; device 1's thread then
    # sends b's gradient (9.7); a at 9.7 + 0.3 = 10; the optimizer when backward returns (10).
    expect = {"fwd:a": 3, "fwd:b": 6.2, "fwd:c": 9.2, "bwd:c": 9.5, "bwd:b": 9.5}
    expect |= {"bwd:a": 10, "opt:a": 10}
    for k, v in expect.items():
        assert t[k] == pytest.approx(v), k
    # Deferred gradient copies: device 0's thread also runs the wait for b's gradient
    # (9.7 + 0.2 = 9.9) before a (10.2); the optimizer at 10.2.
    t = dict(zip(g.names, host_launch_times(g, place, HOST) / MS))
    assert t["bwd:a"] == pytest.approx(10.2) and t["opt:a"] == pytest.approx(10.2)
    # The launch order follows ``order`` (by fx name) where the graph allows it.
    t2 = dict(zip(g.names, host_launch_times(g, place, BARRIER, order=["a", "c", "b"]) / MS))
    assert t2["fwd:c"] == pytest.approx(6.2) and t2["fwd:b"] == pytest.approx(9.2)


def test_replay_with_host_matches_hand_schedule() -> None:
    g, place = _tiny()
    s = simulate(g, place, _cluster(), host=BARRIER).schedule
    start = dict(zip(g.names, s.start / MS))
    # a 3-4, its copy 4-4.1; b waits for its launch (6.2): 6.2-7.2; c 9.2-10.2; bwd:c 10.2-12.2;
    # bwd:b 9.5-11.5; b's gradient copy waits for device 0's stream too (12.2): 12.2-12.3;
    # bwd:a 12.3-14.3; the optimizer 14.3-14.8.
    expect = {"fwd:a": 3, "fwd:b": 6.2, "fwd:c": 9.2, "bwd:c": 10.2, "bwd:b": 9.5, "bwd:a": 12.3}
    expect["opt:a"] = 14.3
    for k, v in expect.items():
        assert start[k] == pytest.approx(v), k
    assert s.makespan == pytest.approx(14.8 * MS)
    assert [(t.src, t.dst) for t in s.transfers] == [(0, 1), (1, 0)]
    assert s.transfers[1].start == pytest.approx(12.2 * MS)
    # Deferred: the gradient copy needs only bwd:b (11.5-11.6); device 0's stream waits for it
    # behind bwd:c, so bwd:a runs 12.2-14.2 and the optimizer 14.2-14.7.
    d = simulate(g, place, _cluster(), host=HOST).schedule
    assert d.transfers[1].start == pytest.approx(11.5 * MS)
    assert d.start[g.index["bwd:a"]] == pytest.approx(12.2 * MS)
    assert d.makespan == pytest.approx(14.7 * MS)
    # Without the host model the list scheduler's replay is unchanged: a 0-1, b 1.1-2.1,
    # c 1-2, bwd:c 2-4, bwd:b 2.1-4.1, bwd:a 4.2-6.2, opt 6.2-6.7; with free launches the
    # executor replay agrees on this graph.
    assert simulate(g, place, _cluster()).makespan == pytest.approx(6.7 * MS)
    assert simulate(g, place, _cluster(), host=HostModel(0.0)).makespan == pytest.approx(6.7 * MS)


def test_autograd_priority_can_serialise_the_backward() -> None:
    """Device 1's backward thread runs the ready task created last in the forward first: the
    long ``z`` before the cheap ``s`` whose gradient device 0 waits for; and a gradient copy
    waits for everything its device launched before it."""
    g = _graph(
        [
            ("fwd:x", 0.1),
            ("fwd:p", 1),
            ("fwd:s", 0.1),
            ("fwd:z", 1),
            ("fwd:o", 0.1),
            ("bwd:o", 0.1),
            ("bwd:z", 5),
            ("bwd:s", 0.1),
            ("bwd:p", 5),
        ],
        [
            ("fwd:x", "fwd:z"),
            ("fwd:p", "fwd:s"),
            ("fwd:s", "fwd:o"),
            ("fwd:z", "fwd:o"),
            ("fwd:o", "bwd:o"),
            ("fwd:z", "bwd:z"),
            ("fwd:s", "bwd:s"),
            ("fwd:p", "bwd:p"),
            ("bwd:o", "bwd:s"),
            ("bwd:o", "bwd:z"),
            ("bwd:s", "bwd:p"),
        ],
    )
    place = {n: 0 if n.endswith(":p") else 1 for n in g.names}
    s = simulate(g, place, _cluster(), host=HostModel(0.0)).schedule
    start = dict(zip(g.names, s.start / MS))
    # Forward: x 0-0.1, p 0-1, copy 1-1.1, s 1.1-1.2, z 1.2-2.2, o 2.2-2.3. Backward on
    # device 1: o 2.3-2.4, z 2.4-7.4, s 7.4-7.5; the gradient copy 7.5-7.6; p 7.6-12.6.
    expect = {"fwd:s": 1.1, "fwd:z": 1.2, "bwd:o": 2.3, "bwd:z": 2.4, "bwd:s": 7.4, "bwd:p": 7.6}
    for k, v in expect.items():
        assert start[k] == pytest.approx(v), k
    assert s.makespan == pytest.approx(12.6 * MS)
    # Created after z, s goes first: z 0.1-1.1, s 1.1-1.2, o 1.2-1.3; backward o 1.3-1.4,
    # s 1.4-1.5. The gradient's copy was created right after p, before z, so device 1's
    # thread still launches z (1.5-6.5) before it, and the copy's stream waits for all that
    # device 1 launched before it (the executor's ``wait_stream``), z included: the copy
    # runs 6.5-6.6 and p 6.6-11.6. Were it to wait for s only, p would end at 6.6.
    order = ["x", "p", "z", "s", "o"]
    s2 = simulate(g, place, _cluster(), host=HostModel(0.0), order=order)
    assert s2.schedule.transfers[-1].start == pytest.approx(6.5 * MS)
    assert s2.makespan == pytest.approx(11.6 * MS)


def test_host_model_rejects_bad_costs() -> None:
    with pytest.raises(ValueError, match="host launch costs"):
        HostModel(forward_s=-1.0)
    with pytest.raises(ValueError, match="host launch costs"):
        HostModel(forward_s=float("nan"))


def test_copies_at_first_use_wait_for_what_their_device_launched_since() -> None:
    """p (device 0) feeds s (device 1); q, launched between them on device 0, is unrelated."""
    g = _graph([("fwd:p", 1), ("fwd:q", 3), ("fwd:s", 1)], [("fwd:p", "fwd:s")])
    place = {"fwd:p": 0, "fwd:q": 0, "fwd:s": 1}
    producer = simulate(g, place, _cluster(), host=HostModel(0.0)).schedule
    first_use = simulate(g, place, _cluster(), host=HostModel(0.0, copies="first-use")).schedule
    # Right after p: the copy runs 1-1.1 and s 1.1-2.1 beside q (1-4).
    assert producer.transfers[0].start == pytest.approx(1 * MS)
    assert producer.start[g.index["fwd:s"]] == pytest.approx(1.1 * MS)
    assert producer.makespan == pytest.approx(4 * MS)
    # At s's launch: the copy also waits for q (4-4.1), s runs 4.1-5.1.
    assert first_use.transfers[0].start == pytest.approx(4 * MS)
    assert first_use.makespan == pytest.approx(5.1 * MS)
    with pytest.raises(ValueError, match="copies must be"):
        HostModel(0.0, copies="lazy")
    with pytest.raises(ValueError, match="grad_copies must be"):
        HostModel(0.0, grad_copies="eager")


def test_launch_order_is_the_simulated_start_order() -> None:
    g, place = _tiny()
    # a 0-1, c 1-2, b 1.1-2.1 (after the copy): c is launched before b.
    assert simulate(g, place, _cluster()).launch_order() == ["a", "c", "b"]


def test_shared_backward_threads_take_turns() -> None:
    """``backward_threads="shared"``: every backward task on one host timeline, the earliest
    ready first (device 0 on ties), the latest created among those ready."""
    g, place = _tiny()
    shared = HostModel(3 * MS, 0.3 * MS, 0.2 * MS, backward_threads="shared")
    t = dict(zip(g.names, host_launch_times(g, place, shared) / MS))
    # The forward as before (c at 9.2); then bwd:c 9.2-9.5 (device 0 wins the tie), bwd:b
    # 9.5-9.8, b's gradient copy 9.8-10.0, device 0's wait 10.0-10.2, bwd:a 10.2-10.5.
    expect = {"fwd:c": 9.2, "bwd:c": 9.5, "bwd:b": 9.8, "bwd:a": 10.5, "opt:a": 10.5}
    for k, v in expect.items():
        assert t[k] == pytest.approx(v), k
    r = simulate(g, place, _cluster(), host=shared)
    assert r.extra["host_forward_s"] == pytest.approx(9.2 * MS)
    assert r.extra["host_backward_s"] == pytest.approx(1.3 * MS)  # 3 x 0.3 + 2 x 0.2, serial
    # One thread per device overlaps them: backward() returns at 10.2 (1.0 after the forward).
    assert simulate(g, place, _cluster(), host=HOST).extra["host_backward_s"] == pytest.approx(
        1.0 * MS
    )
    with pytest.raises(ValueError, match="backward_threads"):
        HostModel(0.0, backward_threads="one")


def test_multi_device_factors_scale_host_costs_of_split_placements_only() -> None:
    g, place = _tiny()
    host = HostModel(3 * MS, 0.3 * MS, 0.2 * MS, multi_forward=2.0, multi_backward=3.0)
    t = dict(zip(g.names, host_launch_times(g, place, host) / MS))
    # Forward x2: a at 6, its copy 6-6.4, b at 12.4, c at 18.4. Backward x3 on each device's
    # thread: c and b at 19.3; b's gradient copy 19.3-19.9 (device 1), device 0's wait
    # 19.9-20.5, bwd:a 20.5-21.4.
    expect = {"fwd:a": 6, "fwd:b": 12.4, "fwd:c": 18.4, "bwd:c": 19.3, "bwd:b": 19.3}
    expect |= {"bwd:a": 21.4, "opt:a": 21.4}
    for k, v in expect.items():
        assert t[k] == pytest.approx(v), k
    # On one device the one-device costs stay: a at 3, b at 6, c at 9 (no copies).
    one = dict(zip(g.names, host_launch_times(g, dict.fromkeys(g.names, 0), host) / MS))
    assert [one[k] for k in ("fwd:a", "fwd:b", "fwd:c")] == pytest.approx([3, 6, 9])
    with pytest.raises(ValueError, match="multi-device host factors"):
        HostModel(0.0, multi_forward=0.0)


def test_multi_device_extra_cost_is_added_per_launch_after_the_op_weights() -> None:
    """The second device's fixed cost per launch: added to every launch, copy, backward task,
    gradient copy and wait of a split placement, not scaled by the op's weight."""
    g, place = _tiny()
    w = {"a": 2.0, "b": 1.0, "c": 3.0}  # mean 2: a x1, b x0.5, c x1.5
    host = HostModel(
        3 * MS,
        0.3 * MS,
        0.2 * MS,
        extra_forward_s=1 * MS,
        extra_backward_s=0.5 * MS,
        forward_weights=w,
        backward_weights=w,
    )
    t = dict(zip(g.names, host_launch_times(g, place, host) / MS))
    # Forward: a 3 + 1 = 4; its copy 0.2 + 1 -> 5.2; b 1.5 + 1 -> 7.7; c 4.5 + 1 -> 13.2.
    # Backward, one thread per device: c (0.45 + 0.5) at 14.15 on device 0, b (0.15 + 0.5)
    # at 13.85 on device 1, then b's gradient copy (0.2 + 0.5) 13.85-14.55 on device 1,
    # device 0's wait 14.55-15.25, bwd:a (0.3 + 0.5) 15.25-16.05.
    expect = {"fwd:a": 4, "fwd:b": 7.7, "fwd:c": 13.2, "bwd:c": 14.15, "bwd:b": 13.85}
    expect |= {"bwd:a": 16.05}
    for k, v in expect.items():
        assert t[k] == pytest.approx(v), k
    # On one device nothing is added (weights only): a 3, b 4.5, c 9.
    one = dict(zip(g.names, host_launch_times(g, dict.fromkeys(g.names, 0), host) / MS))
    assert [one[k] for k in ("fwd:a", "fwd:b", "fwd:c")] == pytest.approx([3, 4.5, 9])
    with pytest.raises(ValueError, match="finite and >= 0"):
        HostModel(0.0, extra_backward_s=-1.0)


def _contention_graph() -> tuple[OpGraph, dict[str, int], Cluster]:
    """w (device 1, 3 ms) runs alone; x (device 0, 1 ms) feeds z (device 1) and c (device 0);
    each copy moves its 4 bytes in 1 ms."""
    g = _graph(
        [("fwd:w", 3), ("fwd:x", 1), ("fwd:c", 2), ("fwd:z", 1)],
        [("fwd:x", "fwd:z"), ("fwd:x", "fwd:c")],
    )
    place = {"fwd:w": 1, "fwd:x": 0, "fwd:c": 0, "fwd:z": 1}
    cluster = Cluster([10**9] * 2, CommCost(0.0, 0.25 * MS), contention="none")
    return g, place, cluster


def test_copies_slow_compute_on_both_of_their_devices() -> None:
    g, place, cluster = _contention_graph()
    order = ["w", "x", "c", "z"]
    free = HostModel(0.0)
    plain = simulate(g, place, cluster, host=free, order=order)
    # Without contention: x 0-1, its copy 1-2, c 1-3, w 0-3, z 3-4.
    assert plain.makespan == pytest.approx(4 * MS)
    slowed = replace(cluster, copy_slowdown=0.5)
    r = simulate(g, place, slowed, host=free, order=order)
    start = dict(zip(g.names, r.schedule.start / MS))
    end = dict(zip(g.names, r.schedule.end / MS))
    # The copy (1-2) overlaps w, already queued on device 1, for 1 ms: device 1's stream is
    # pushed back 0.5 ms (to 3.5); c, launched after it on device 0, overlaps it for 1 ms and
    # ends at 3.5; z runs 3.5-4.5.
    assert end["fwd:c"] == pytest.approx(3.5)
    assert start["fwd:z"] == pytest.approx(3.5) and end["fwd:z"] == pytest.approx(4.5)
    assert r.makespan == pytest.approx(4.5 * MS)
    # Per device: phase ends, busy time (c stretched to 2.5 ms) and the copy device 0 sends.
    ph = r.phases()
    assert ph[0]["forward_end_s"] == pytest.approx(3.5 * MS)
    assert ph[0]["forward_busy_s"] == pytest.approx(3.5 * MS)
    assert ph[1]["forward_busy_s"] == pytest.approx(4 * MS)
    assert ph[0]["forward_sent_s"] == pytest.approx(1 * MS) and ph[1]["forward_sent_s"] == 0
    assert ph[0]["backward_busy_s"] == 0 and ph[0]["optimizer_end_s"] == 0
    with pytest.raises(ValueError, match="copy_slowdown"):
        replace(cluster, copy_slowdown=-0.1)


def test_overlap_seconds() -> None:
    assert overlap_seconds([(0, 1), (2, 4)], 0.5, 3) == pytest.approx(1.5)
    assert overlap_seconds([], 0, 1) == 0 and overlap_seconds([(0, 1)], 1, 2) == 0


def test_fit_host_model_from_one_device_and_calibration_timings() -> None:
    model = HostTiming(forward_s=10 * MS, forward_launches=50, backward_s=6 * MS, backward_tasks=40)
    one = HostTiming(1 * MS, 10, 2 * MS, 20)  # 100 / 100 us
    two = HostTiming(3 * MS, 20, 5 * MS, 25)  # 150 / 200 us
    h = fit_host_model(model, (one, two), backward_threads="shared")
    assert h.forward_s == pytest.approx(0.2 * MS) and h.backward_s == pytest.approx(0.15 * MS)
    # The second device adds 50 us per launch and 100 us per backward task; a copy launches
    # like one calibration launch (100 us); no factors.
    assert h.extra_forward_s == pytest.approx(0.05 * MS)
    assert h.extra_backward_s == pytest.approx(0.1 * MS)
    assert h.copy_s == pytest.approx(0.1 * MS)
    assert (h.multi_forward, h.multi_backward) == (1.0, 1.0)
    assert h.backward_threads == "shared"
    # The earlier model: the ratios as factors.
    f = fit_host_model(model, (one, two), multi="factor")
    assert f.multi_forward == pytest.approx(1.5) and f.multi_backward == pytest.approx(2.0)
    assert (f.extra_forward_s, f.extra_backward_s, f.copy_s) == (0.0, 0.0, None)
    # A calibration that ran faster on two devices adds nothing (floored at 0).
    fast = fit_host_model(model, (two, one))
    assert (fast.extra_forward_s, fast.extra_backward_s) == (0.0, 0.0)
    with pytest.raises(ValueError, match="multi must be"):
        fit_host_model(model, (one, two), multi="both")
    plain = fit_host_model(model)
    assert (plain.multi_forward, plain.multi_backward) == (1.0, 1.0)
    assert (plain.extra_forward_s, plain.extra_backward_s) == (0.0, 0.0)
    assert plain.optimizer_s == 0.0
    assert fit_host_model(replace(model, optimizer_s=2 * MS)).optimizer_s == 2 * MS
    with pytest.raises(ValueError, match=">= 1 launch"):
        HostTiming(1.0, 0, 1.0, 1)
    with pytest.raises(ValueError, match="finite"):
        HostTiming(-1.0, 1, 1.0, 1)
    with pytest.raises(ValueError, match="host time > 0"):
        fit_host_model(model, (HostTiming(0.0, 1, 0.0, 1), two))


def test_fit_copy_slowdown_is_the_median_ratio_floored_at_zero() -> None:
    pairs = [(1.0, 1.1), (1.0, 1.3), (2.0, 2.4), (1.0, 0.9)]  # +0.1, +0.3, +0.2, -0.1
    samples = [{"alone_s": a, "with_copy_s": b} for a, b in pairs]
    assert fit_copy_slowdown(samples) == pytest.approx(0.15)
    assert fit_copy_slowdown([{"alone_s": 1.0, "with_copy_s": 0.8}]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        fit_copy_slowdown([])
    with pytest.raises(ValueError, match="alone > 0"):
        fit_copy_slowdown([{"alone_s": 0.0, "with_copy_s": 1.0}])


def test_copy_contention_samples_each_side_and_op_on_cpu() -> None:
    samples = copy_contention(
        "cpu", "cpu", elements=2**10, matmul_side=16, copy_elements=2**12, repeats=2
    )
    assert [(s["side"], s["op"]) for s in samples] == [
        ("source", "elementwise"),
        ("source", "matmul"),
        ("destination", "elementwise"),
        ("destination", "matmul"),
    ]
    assert all(s["alone_s"] > 0 and s["with_copy_s"] > 0 for s in samples)
    assert fit_copy_slowdown(samples) >= 0


def test_optimizer_launches_spread_over_its_host_time() -> None:
    g, place = _tiny()
    host = replace(HOST, optimizer_s=1 * MS)
    # backward() returns at 10.2 (deferred copies); opt:a, the only optimizer node, at 11.2.
    t = dict(zip(g.names, host_launch_times(g, place, host) / MS))
    assert t["opt:a"] == pytest.approx(11.2)
    r = simulate(g, place, _cluster(), host=host)
    # Its device was idle by 14.2 (bwd:a 12.2-14.2), so the optimizer still runs 14.2-14.7.
    assert r.makespan == pytest.approx(14.7 * MS)
    assert r.extra["host_optimizer_s"] == pytest.approx(1 * MS)
    late = simulate(g, place, _cluster(), host=replace(HOST, optimizer_s=5 * MS))
    assert late.makespan == pytest.approx((10.2 + 5 + 0.5) * MS)  # launched at 15.2
    with pytest.raises(ValueError, match="host launch costs"):
        HostModel(0.0, optimizer_s=-1.0)


def test_shared_backward_threads_alternate_when_both_have_work() -> None:
    """Two devices, two independent nodes each: taking turns, the threads alternate (device
    0 first on the first tie) instead of one draining its queue before the other starts."""
    names = ["a", "c", "b", "d"]
    g = _graph(
        [(f"{k}:{n}", 1) for k in ("fwd", "bwd") for n in names],
        [(f"fwd:{n}", f"bwd:{n}") for n in names],
    )
    place = {n: 0 if n[-1] in "ac" else 1 for n in g.names}
    host = HostModel(1 * MS, 1 * MS, backward_threads="shared")
    t = dict(zip(g.names, host_launch_times(g, place, host) / MS))
    # Forward a, c, b, d at 1-4; backward, latest created first on each device: c (5), d (6),
    # a (7), b (8).
    assert [t[k] for k in ("bwd:c", "bwd:d", "bwd:a", "bwd:b")] == pytest.approx([5, 6, 7, 8])


def test_per_op_host_weights_share_out_the_calibrated_costs() -> None:
    """Weights make an op's launch (backward task) cost ``w / mean(w)`` times the calibrated
    one; the mean is over the graph's forward (backward) nodes, so one-device totals stay."""
    g, place = _tiny()
    host = replace(
        HOST,
        forward_weights={"a": 1.0, "b": 1.0, "c": 4.0},  # x 0.5, 0.5, 2 of 3 ms
        backward_weights={"a": 2.0, "b": 1.0, "c": 3.0},  # x 1, 0.5, 1.5 of 0.3 ms
    )
    t = dict(zip(g.names, host_launch_times(g, place, host) / MS))
    # Forward: a at 1.5, its copy until 1.7, b at 3.2, c at 9.2 (the same total as before).
    # Backward from 9.2, one thread per device: c 9.2-9.65 on device 0; b 9.2-9.35 on device
    # 1, then b's gradient copy (0.2, unweighted) until 9.55; device 0's wait after c
    # 9.65-9.85; a 9.85-10.15; the optimizer when backward returns.
    expect = {"fwd:a": 1.5, "fwd:b": 3.2, "fwd:c": 9.2, "bwd:c": 9.65, "bwd:b": 9.35}
    expect |= {"bwd:a": 10.15, "opt:a": 10.15}
    for k, v in expect.items():
        assert t[k] == pytest.approx(v), k
    # On one device the forward still takes 3 x 3 ms and the backward 3 x 0.3 ms.
    one = simulate(g, dict.fromkeys(g.names, 0), _cluster(), host=host).extra
    assert one["host_forward_s"] == pytest.approx(9 * MS)
    assert one["host_backward_s"] == pytest.approx(0.9 * MS)
    # ``fwd:``-prefixed names are the same ops; extra ops are not used.
    same = replace(host, forward_weights={"fwd:a": 1.0, "fwd:b": 1.0, "fwd:c": 4.0, "d": 9.0})
    assert host_launch_times(g, place, same).tolist() == host_launch_times(g, place, host).tolist()
    with pytest.raises(ValueError, match="backward_weights has no weight for 1 ops"):
        host_launch_times(g, place, replace(HOST, backward_weights={"a": 1.0, "b": 1.0}))
    for bad in ({"a": 0.0}, {"a": float("nan")}, {}):
        with pytest.raises(ValueError, match="forward_weights must be"):
            replace(HOST, forward_weights=bad)
