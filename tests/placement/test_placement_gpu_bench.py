"""The GPU benchmark's configuration runner (``bench/placement_gpu.py``), checked on CPU: each
configuration's model copy, optimizer state and activations are gone before the next starts,
and a failure keeps its full error text."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import pathlib
import sys
import warnings

import pytest
import torch

from scaledl.placement import CommCost
from scaledl.placement.trace import symbolic_trace

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "placement_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("placement_gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() pokes deprecated module attributes
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _configuration(bench):
    torch.manual_seed(0)
    model, inputs, leaves, expert_rule = bench.MODELS["branches"](True)
    gm = symbolic_trace(model, leaves)
    return model, inputs, leaves, bench.follow_inputs(gm, expert_rule)


def _spy_releases(bench, monkeypatch) -> list[int]:
    """Live tensors each time the runner releases device memory (before and after a run)."""
    seen: list[int] = []
    real = bench.release_device_memory

    def spy(devices):
        out = real(devices)
        seen.append(_live_tensors())
        return out

    monkeypatch.setattr(bench, "release_device_memory", spy)
    return seen


def test_configuration_leaves_nothing_alive_when_memory_is_released(bench, monkeypatch) -> None:
    model, inputs, leaves, placement = _configuration(bench)
    devices = [torch.device("cpu")] * 2
    seen = _spy_releases(bench, monkeypatch)
    for _ in range(2):
        meas = bench.measure_step(model, placement, devices, inputs, 2, 1, leaves)
        assert meas["error"] is None and meas["step_s"] > 0
    # The release after each configuration sees exactly the tensors alive before it: the placed
    # copy, its gradients, Adam state and activations were freed before the cache is emptied.
    assert seen == [seen[0]] * 4
    assert meas["leaked_gib"] == [] and meas["runtime_limit_gib"] == []


def test_failed_configuration_keeps_full_error_and_frees_its_frames(bench, monkeypatch) -> None:
    model, inputs, leaves, placement = _configuration(bench)
    message = "CUDA out of memory. Tried to allocate 128.00 MiB. GPU 0 has a total capacity of " + (
        "139.80 GiB of which 1.2 GiB is free; 7.9 GiB reserved by PyTorch but unallocated."
    )

    def fail(module, args, out):  # after the branches ran, so activations exist
        raise torch.cuda.OutOfMemoryError(message)

    model.out.register_forward_hook(fail)
    devices = [torch.device("cpu")] * 2
    seen = _spy_releases(bench, monkeypatch)
    meas = bench.measure_step(model, placement, devices, inputs, 2, 1, leaves)
    assert meas["step_s"] is None and meas["error_kind"] == "OOM"
    assert meas["error"] == f"OutOfMemoryError: {message}"  # not cut at 80 characters
    assert seen[1] == seen[0]


def test_runtime_caps_add_headroom_and_foreach_adam_workspace(bench) -> None:
    model, inputs, leaves, placement = _configuration(bench)
    traced = bench.trace(model, inputs, leaf_modules=leaves)
    caps = bench.runtime_caps(traced.specs, placement, cap=1000, headroom=10, n=2)
    # Foreach Adam's workspace: every trainable parameter byte of the modules on the device.
    trainable = [0, 0]
    for node in traced.module.graph.nodes:
        if node.op == "call_module":
            sub = traced.module.get_submodule(node.target)
            trainable[placement[node.name]] += sum(p.numel() * 4 for p in sub.parameters())
    assert min(trainable) > 0 and caps == [1010 + t for t in trainable]
    # The loss's workspace (square and its backward) on the device of the model's output.
    out = bench.model_output(traced.module)
    assert out == "out" and placement[out] == 1
    with_loss = bench.runtime_caps(traced.specs, placement, 1000, 10, 2, out)
    out_bytes = next(s.out_bytes for s in traced.specs if s.name == out)
    assert out_bytes == inputs[0].numel() * 4
    assert with_loss == [caps[0], caps[1] + bench.LOSS_WORKSPACE_OUTPUTS * out_bytes]


def test_host_calibration_divides_unsynchronised_host_time_by_launches(bench) -> None:
    model, inputs, leaves, placement = _configuration(bench)
    traced = bench.trace(model, inputs, leaf_modules=leaves)
    graph = traced.op_graph()
    names = [n.name for n in traced.module.graph.nodes if n.op != "output"]
    meas = bench.measure_step(model, placement, [torch.device("cpu")] * 2, inputs, 2, 1, leaves)
    assert meas["launches_per_forward"] == len(names) + meas["copies_per_forward"]
    assert 0 < meas["host_forward_s"] + meas["host_backward_s"] <= 1.01 * meas["step_s"] * 2
    host = bench.calibrate_host(model, names, [torch.device("cpu")] * 2, inputs, leaves, graph)
    assert host.forward_s > 0 and host.backward_s > 0
    # One device: the launches are the fx nodes, the tasks the backward nodes (no copies).
    assert host.forward_launches == len(names)
    assert host.backward_tasks == sum(1 for k in graph.kind if k == "backward")
    # Each copy adds the gradient's copy and the wait for it to the backward's tasks.
    timing = bench.host_timing(meas, 10)
    assert timing.backward_tasks == 10 + 2 * meas["copies_per_forward"]
    assert bench.host_timing(meas, 10, "autograd").backward_tasks == 10 + meas["copies_per_forward"]


def test_one_device_host_costs_cover_every_launch_and_backward(bench) -> None:
    """Per-op host milliseconds on one device: one forward launch per fx node, one backward
    task per node whose output needs a gradient; what the replay's weights need."""
    model, inputs, leaves, _ = _configuration(bench)
    graph = bench.trace(model, inputs, leaf_modules=leaves).op_graph()
    names = [n.name for n in symbolic_trace(model, leaves).graph.nodes if n.op != "output"]
    costs = bench.host_costs_one_device(model, names, [torch.device("cpu")] * 2, inputs, leaves, 2)
    assert set(costs["forward_ms"]) == set(names)
    backward = {n[4:] for n, k in zip(graph.names, graph.kind) if k == "backward"}
    assert set(costs["backward_ms"]) == backward
    assert min(costs["forward_ms"].values()) >= 0 and min(costs["backward_ms"].values()) >= 0
    # They weight a replay on one device without changing its calibrated host totals.
    host = bench.HostModel(
        1e-4, 2e-4, forward_weights=costs["forward_ms"], backward_weights=costs["backward_ms"]
    )
    cluster = bench.Cluster([1 << 40] * 2, CommCost(1e-5, 1e-9))
    extra = bench.simulate(graph, [0] * len(graph), cluster, host=host).extra
    assert extra["host_forward_s"] == pytest.approx(1e-4 * len(names))
    assert extra["host_backward_s"] == pytest.approx(2e-4 * len(backward))


def test_multi_device_calibration_times_each_layout_of_the_chain(bench) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as --quick does: OpenMP barriers cost more than these ops
    try:
        cal = bench.calibrate_multi_device([torch.device("cpu")] * 2, 2, True, "conv")
    finally:
        torch.set_num_threads(threads)
    assert list(cal["timings"]) == list(bench.CHAIN_LAYOUTS)
    one, alt = cal["timings"]["one device"], cal["timings"]["alternating"]
    # The input and 12 ConvBNReLU leaves; alternating blocks of 8 nodes put nodes 8-12 on
    # device 1: one copy, one more forward launch and two more backward tasks.
    assert one.forward_launches == 13 and alt.forward_launches == 14
    assert alt.backward_tasks == one.backward_tasks + 2
    assert all(x > 0 for v in cal["per_launch_us"].values() for x in v)
    with pytest.raises(ValueError, match="unknown calibration chain"):
        bench.calibration_chain("rnn", True)


def test_profiled_step_has_ordered_host_phase_windows(bench) -> None:
    model, inputs, leaves, placement = _configuration(bench)
    pm = bench.PlacedModule(model, placement, [torch.device("cpu")] * 2, leaf_modules=leaves)
    opt = torch.optim.Adam(pm.parameters())
    prof = bench.profile_phases(lambda: bench.step_phases(pm, opt, inputs), [torch.device("cpu")])
    assert "error" not in prof, prof.get("error")
    w = prof["host_window_ms"]
    assert list(w) == ["forward", "backward", "optimizer"]
    assert w["forward"][0] == 0 and w["forward"][1] <= w["backward"][0] <= w["backward"][1]
    assert w["backward"][1] <= w["optimizer"][0]
    assert prof["device_ms"] == {}  # no GPU: no kernels or copies to attribute


def test_launch_stats_and_phase_ends(bench) -> None:
    spent = [("a", 1e-3), ("b", 3e-3), ("c", 2e-3), ("d", 5e-3)]
    stats = bench.launch_stats(spent, {"a": 0, "b": 0, "c": 0, "d": 1})
    assert stats["0"] == {"launches": 3, "median_ms": pytest.approx(2), "mean_ms": pytest.approx(2)}
    assert stats["1"]["median_ms"] == pytest.approx(5)
    assert bench.slowest_launches(spent, 2) == [["d", 5.0], ["b", 3.0]]
    assert bench.phase_ends_ms([]) == {} and bench.phase_ends_ms([[[], [], [], []]]) == {}


def test_caps_are_stated_on_allocated_bytes_and_lifted(bench, monkeypatch) -> None:
    """The per-process fraction bounds reserved memory: the cap goes on top of what is already
    allocated on each GPU, is clamped to the card, and ``None`` lifts it (fraction 1)."""
    total = 100 * 2**30
    calls: list[tuple[float, str]] = []

    class Props:
        total_memory = total

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props)
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, str(d)))
    )
    devices = [torch.device("cuda", 1), torch.device("cuda", 0)]
    limits = bench.set_caps(devices, [30 * 2**30, 120 * 2**30], [2**30, 0])
    assert limits == [31 * 2**30, total]
    assert calls == [(0.31, "cuda:0"), (1.0, "cuda:1")]
    calls.clear()
    assert bench.set_caps(devices, None) == [total, total]
    assert calls == [(1.0, "cuda:0"), (1.0, "cuda:1")]


def test_configuration_reports_its_slowest_launches(bench) -> None:
    model, inputs, leaves, placement = _configuration(bench)
    meas = bench.measure_step(model, placement, [torch.device("cpu")] * 2, inputs, 2, 1, leaves)
    slow = meas["slowest_launches_ms"]
    names = {n for n in placement}
    assert len(slow) == 5 and all(name in names and ms >= 0 for name, ms in slow)
    assert [ms for _, ms in slow] == sorted((ms for _, ms in slow), reverse=True)


def test_backward_starts_follow_the_graph_backwards(bench) -> None:
    """Diagnosis: each node's backward start with its autograd thread, in start order; a node
    starts only after every consumer of its output."""
    model, inputs, leaves, placement = _configuration(bench)
    devices = [torch.device("cpu")] * 2
    pm = bench.PlacedModule(model, placement, devices, leaf_modules=leaves)
    starts = bench.backward_starts(pm, lambda: pm(*inputs).square().mean().backward(), devices)
    assert pm.backward_clock is None and starts[0][2] == 0.0
    assert [ms for *_, ms in starts] == sorted(ms for *_, ms in starts)
    assert {th for _, th, _ in starts} == set(range(max(th for _, th, _ in starts) + 1))
    rank = {name: i for i, (name, _, _) in enumerate(starts)}
    gm = symbolic_trace(model, leaves)
    pairs = [(n.name, u.name) for n in gm.graph.nodes for u in n.users if n.name in rank]
    assert pairs and all(rank[u] < rank[n] for n, u in pairs if u in rank)
    assert set(rank) == {n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")}


def test_allocator_churn_is_per_step_and_device_and_absent_on_cpu(bench, monkeypatch) -> None:
    """Allocator retries and cudaMallocs during the timed steps are reported per step and GPU
    (they stall the host, which the simulator does not model); CPU runs report none."""
    assert bench.allocator_counters([torch.device("cpu")] * 2) == []
    stats = {
        "cuda:0": {"num_alloc_retries": 4, "num_device_alloc": 10},
        "cuda:1": {"num_alloc_retries": 0, "num_device_alloc": 3, "num_sync_all_streams": 2},
    }
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d: stats[str(d)])
    devices = [torch.device("cuda", 1), torch.device("cuda", 0)]
    before = bench.allocator_counters(devices)
    assert before[0] == {"num_alloc_retries": 4, "num_device_alloc": 10, "num_sync_all_streams": 0}
    stats["cuda:0"] = {"num_alloc_retries": 8, "num_device_alloc": 30}
    churn = bench.allocator_churn(before, bench.allocator_counters(devices), steps=4)
    assert churn == {
        "num_alloc_retries_per_step": [1.0, 0.0],
        "num_device_alloc_per_step": [5.0, 0.0],
        "num_sync_all_streams_per_step": [0.0, 0.0],
    }


def test_summary_compares_baechi_with_the_expert_on_its_own_memory_too(bench) -> None:
    """Best of m-ETF/m-SCT against each baseline; where the placers also ran with the expert's
    memory, that comparison is reported separately (the plain one keeps the placers' cap)."""

    def rec(name: str, step: float | None, fid: float = 0.01) -> dict:
        return {"placement": name, "step_s": step, "fidelity": {"shared": fid}}

    records = [
        rec("m-etf", 0.050, fid=0.2),
        rec("m-sct", 0.055),
        rec("expert", 0.040),
        rec("sequential-fill", 0.060),
        rec("m-etf @expert mem", 0.041),
        rec("m-sct @expert mem", None),
    ]
    out = bench.compare(records)
    assert out["best_baechi_s"] == 0.050
    assert out["vs_expert"] == pytest.approx(0.25)
    assert out["vs_sequential-fill"] == pytest.approx(0.05 / 0.06 - 1)
    assert out["vs_expert_same_memory"] == pytest.approx(0.025)
    assert out["max_fidelity_error"] == 0.2 and "vs_equal-pipeline" not in out
    assert "vs_expert_same_memory" not in bench.compare(records[:4])


def test_drifted_moves_a_launch_by_the_chains_change_bounded_by_its_ratio(bench) -> None:
    us = 1e-6
    # A Transformer-like launch (1 ms) against a chain launch re-timed from 24 to 36 us: it
    # moves by the chain's 12 us, not by the chain's 1.5x (which would add 500 us).
    assert bench.drifted(1000 * us, 24 * us, 36 * us) == pytest.approx(1012 * us)
    assert bench.drifted(1000 * us, 24 * us, 36 * us, "ratio") == pytest.approx(1500 * us)
    # A launch cheaper than a chain launch moves with the chain's ratio (here 0.5x and 1.5x).
    assert bench.drifted(10 * us, 100 * us, 50 * us) == pytest.approx(5 * us)
    assert bench.drifted(10 * us, 100 * us, 150 * us) == pytest.approx(15 * us)
    # A faster host: the chain's change (-50 us), at most half of the launch's own 60 us.
    assert bench.drifted(60 * us, 100 * us, 50 * us) == pytest.approx(30 * us)
    assert bench.drifted(300 * us, 100 * us, 50 * us) == pytest.approx(250 * us)
    # Always positive; no reference leaves the cost as it was.
    assert bench.drifted(5 * us, 100 * us, 1 * us) == pytest.approx(0.05 * us)
    assert bench.drifted(7 * us, 0.0, 50 * us) == 7 * us
    with pytest.raises(ValueError, match="drift must be 'bounded' or 'ratio'"):
        bench.drifted(1.0, 1.0, 1.0, "linear")


def test_host_speed_now_moves_the_model_costs_with_the_chain(bench) -> None:
    ms = 1e-3
    timing = bench.HostTiming(10 * ms, 50, 6 * ms, 40, 1 * ms)  # 200 / 150 us per launch
    ref = (bench.HostTiming(1 * ms, 10, 2 * ms, 20), bench.HostTiming(3 * ms, 20, 5 * ms, 25))
    now = (bench.HostTiming(2 * ms, 10, 3 * ms, 20), bench.HostTiming(3 * ms, 10, 3 * ms, 10))
    h = bench.host_at(timing, ref, now, "deferred")
    # The chain's one-device launch went from 100 to 200 us (forward) and 100 to 150 us
    # (backward): the model's 200 us launch and 150 us task, both costlier than a chain launch,
    # gain those 100 and 50 us; the optimizer step (1 ms) gains a forward launch's 100 us. The
    # second device adds what it adds to the chain now (300 - 200 us per launch, 300 - 150 us
    # per task); a copy costs a chain launch now.
    assert h.forward_s == pytest.approx(0.3 * ms) and h.backward_s == pytest.approx(0.2 * ms)
    assert h.optimizer_s == pytest.approx(1.1 * ms)
    assert h.extra_forward_s == pytest.approx(0.1 * ms)
    assert h.extra_backward_s == pytest.approx(0.15 * ms)
    assert h.copy_s == pytest.approx(0.2 * ms)
    assert (h.multi_forward, h.multi_backward) == (1.0, 1.0)
    assert h.backward_threads == "shared" and h.grad_copies == "deferred"
    # The earlier scaling: the chain's ratios (2 and 1.5) on the model's costs.
    r = bench.host_at(timing, ref, now, "deferred", drift="ratio")
    assert r.forward_s == pytest.approx(0.4 * ms) and r.backward_s == pytest.approx(0.225 * ms)
    assert r.optimizer_s == pytest.approx(2 * ms)
    # Launches cheaper than the chain's (50 us, 50 us, optimizer 50 us) follow its ratios.
    cheap = bench.host_at(
        bench.HostTiming(0.5 * ms, 10, 0.5 * ms, 10, 0.05 * ms), ref, now, "deferred"
    )
    assert cheap.forward_s == pytest.approx(0.1 * ms)
    assert cheap.backward_s == pytest.approx(0.075 * ms)
    assert cheap.optimizer_s == pytest.approx(0.1 * ms)
    # The earlier model: the chain's ratios now (1.5, 2) as factors.
    f = bench.host_at(timing, ref, now, "deferred", "factor")
    assert (f.multi_forward, f.multi_backward) == (pytest.approx(1.5), pytest.approx(2.0))
    assert f.forward_s == pytest.approx(0.3 * ms) and f.extra_forward_s == 0.0
    # The benchmark's model: only the one-device chain is re-timed; the run's calibration
    # (alternating / one device: 300 / 200 = 1.5 per launch, 200 / 100 = 2 per task) at the
    # chain's launch now (200 / 150 us) gives the same 100 / 150 us for the second device.
    cal = (bench.HostTiming(2 * ms, 10, 1 * ms, 10), bench.HostTiming(3 * ms, 10, 2 * ms, 10))
    c = bench.host_at(timing, ref[:1], now[:1], "deferred", calibration=cal)
    assert c.forward_s == pytest.approx(0.3 * ms) and c.backward_s == pytest.approx(0.2 * ms)
    assert c.extra_forward_s == pytest.approx(0.1 * ms)
    assert c.extra_backward_s == pytest.approx(0.15 * ms)
    assert c.copy_s == pytest.approx(0.2 * ms)
    # The host twice as slow now doubles the second device's cost with it.
    slow = (bench.HostTiming(4 * ms, 10, 3 * ms, 10),)
    c2 = bench.host_at(timing, ref[:1], slow, "deferred", calibration=cal)
    assert c2.extra_forward_s == pytest.approx(0.2 * ms)
    assert c2.extra_backward_s == pytest.approx(0.3 * ms)
    # Without a calibration or a re-timed second layout there is no second-device term.
    plain = bench.host_at(timing, ref[:1], now[:1], "deferred")
    assert (plain.extra_forward_s, plain.extra_backward_s, plain.copy_s) == (0.0, 0.0, None)


def test_offline_replay_rebuilds_the_runs_configurations(bench) -> None:
    """``placement_replay.py`` re-places a run's model from its JSON (meta trace, node times,
    cap) and replays each configuration with the same terms the run used."""
    spec = importlib.util.spec_from_file_location(
        "placement_replay", BENCH.parent / "placement_replay.py"
    )
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    torch.manual_seed(0)
    model, inputs, leaves, rule = bench.MODELS["branches"](True)
    traced = bench.trace(model, inputs, leaf_modules=leaves)
    graph = traced.op_graph()
    comm = CommCost(1e-5, 1e-9)
    cap = bench.forcing_cap(graph, bench.single_device_memory(graph, comm), 2, 0.65)
    cluster = bench.Cluster([cap, cap], comm)
    cands = bench.build_candidates(
        traced, graph, cluster, bench.follow_inputs(traced.module, rule), "shared"
    )
    timing = bench.HostTiming(2e-3, 20, 3e-3, 20, 1e-3)
    meas = {"host_forward_s": 4e-3, "host_backward_s": 6e-3, "launches_per_forward": 25}
    meas |= {"copies_per_forward": 2, "host_optimizer_s": 1e-3, "step_s": 0.01}
    # The chain re-timed before the configuration ran as fast as at calibration, with a
    # two-device factor of 1.5 (forward) and 1 (backward).
    chain = [[100.0, 100.0], [150.0, 100.0]]
    meas["host_chain_us"] = {"reference": chain, "now": chain}
    # Per-op host costs measured on one device (here made up, unequal) weight each op.
    fx_names = [n.name for n in traced.module.graph.nodes if n.op != "output"]
    costs = {
        "forward_ms": {k: 1.0 + i % 3 for i, k in enumerate(fx_names)},
        "backward_ms": {k: 2.0 + i % 2 for i, k in enumerate(fx_names)},
    }
    run = {
        "mode": "quick-cpu",
        "comm_fit": {"latency_s": 1e-5, "bandwidth_Bps": 1e9},
        "copy_slowdown": 0.25,
        "models": [
            {
                "model": "branches",
                "cap_gib": cap / bench.GIB,
                "node_seconds": dict(zip(graph.names, graph.compute.tolist())),
                "host_timing_one_device": dataclasses.asdict(timing),
                "host_costs_one_device": costs,
                "records": [{"placement": k, **meas} for k in cands],
            }
        ],
    }
    args = argparse.Namespace(multi_forward=1.5, multi_backward=None, copy_slowdown=None)
    forward_w, backward_w, source = replay.one_device_weights([run], "branches")
    assert (forward_w, backward_w, source) == (
        costs["forward_ms"],
        costs["backward_ms"],
        "this run",
    )
    rows = replay.replay_model(run, run["models"][0], args, (forward_w, backward_w))
    assert [r["placement"] for r in rows] == list(cands)
    full = bench.fit_host_model(timing, backward_threads="shared", multi_forward=1.5)
    loaded = dataclasses.replace(cluster, copy_slowdown=0.25)
    for r in rows:
        gp = bench.graph_placement(graph, cands[r["placement"]]["fx"])
        order = (
            cands[r["placement"]].get("order") or bench.simulate(graph, gp, cluster).launch_order()
        )
        want = bench.simulate(graph, gp, loaded, host=full, order=order).makespan
        assert r["+ copy contention"] == pytest.approx(want), r["placement"]
        assert r["+ host speed now"] == pytest.approx(want), r["placement"]
        weighted = dataclasses.replace(
            full, forward_weights=costs["forward_ms"], backward_weights=costs["backward_ms"]
        )
        want = bench.simulate(graph, gp, loaded, host=weighted, order=order).makespan
        assert r["+ per-op host costs"] == pytest.approx(want), r["placement"]
        # The benchmark's own term is the same replay; unmeasured or partial costs skip it.
        assert bench.per_op_makespan(graph, gp, loaded, full, order, costs) == pytest.approx(want)
        assert bench.per_op_makespan(graph, gp, loaded, full, order, {"error": "x"}) is None
        partial = {"forward_ms": {"x": 1.0}, "backward_ms": costs["backward_ms"]}
        assert bench.per_op_makespan(graph, gp, loaded, full, order, partial) is None
        assert set(replay.TERMS) <= set(r)
    # A run with interleaved rounds: the chain re-timed before each round; the replay is the
    # median over the rounds' replays (the second round's host ran at half speed, the
    # third's at twice the speed with no second-device cost).
    rounds = [chain, [[200.0, 200.0], [300.0, 200.0]], [[50.0, 50.0], [50.0, 50.0]]]
    for rec in run["models"][0]["records"]:
        rec["host_chain_us"] = {"reference": chain, "now": chain, "rounds": rounds}
    args = argparse.Namespace(multi_forward=None, multi_backward=None, copy_slowdown=None)
    ref = tuple(replay.per_launch_timing(x) for x in chain)

    def check_median_of_rounds(*host_args):
        # "+ host speed now" is the median of the rounds' replays, each at its chain timing
        hosts = [
            bench.host_at(timing, ref, tuple(map(replay.per_launch_timing, x)), *host_args)
            for x in rounds
        ]
        for r in replay.replay_model(run, run["models"][0], args):
            gp = bench.graph_placement(graph, cands[r["placement"]]["fx"])
            fallback = bench.simulate(graph, gp, cluster).launch_order()
            order = cands[r["placement"]].get("order") or fallback
            each = [bench.simulate(graph, gp, loaded, host=h, order=order).makespan for h in hosts]
            assert r["+ host speed now"] == pytest.approx(sorted(each)[1]), r["placement"]
        return hosts

    check_median_of_rounds("deferred")
    # With the run's calibration chain recorded, the second device's cost comes from it (at
    # the host's speed now), not from the re-timed alternating layout.
    cal = (bench.HostTiming(1e-3, 10, 1e-3, 10), bench.HostTiming(3e-3, 10, 1e-3, 10))
    run["host_calibration"] = {
        "linear": {"timings": dict(zip(bench.CHAIN_PAIR, map(dataclasses.asdict, cal)))}
    }
    hosts = check_median_of_rounds("deferred", "extra", cal)
    # alternating / one device = 3: the second device adds two chain launches per launch
    assert hosts[0].extra_forward_s == pytest.approx(2e-4)
    # An older run without them: the forward weights come from the one-device configuration's
    # host clock (``--diagnose``), there are no backward ones.
    older = {"models": [{"model": "branches", "records": [{"placement": "m-etf"}]}]}
    clock = [[k, 0, 0.1] for k in fx_names]
    older["models"][0]["records"].append(
        {"placement": replay.ONE_DEVICE, "host_launches_ms": clock}
    )
    got = replay.one_device_weights([{"models": []}, older], "branches")
    assert got == (dict.fromkeys(fx_names, 0.1), None, "run 1, one-device configuration")
    assert replay.one_device_weights([run], "inception") == (None, None, "none")
    failed = {"models": [{"model": "branches", "host_costs_one_device": {"error": "x"}}]}
    failed["models"][0]["records"] = []
    assert replay.one_device_weights([failed], "branches") == (None, None, "none")


def test_failed_calibrations_leave_the_terms_off_not_the_run(bench, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("no peer access")

    monkeypatch.setattr(bench, "calibrate_multi_device", fail)
    monkeypatch.setattr(bench, "copy_contention", fail)
    calib = bench.calibrate([torch.device("cpu")] * 2, True, ["inception"])
    assert calib["chains"]["conv"] == {"error": "RuntimeError: no peer access"}
    assert calib["copy_slowdown"] == 0.0 and "no peer access" in calib["contention"][0]["error"]
    assert bench.chain_timings(calib, "inception") is None
    assert bench.chain_now([torch.device("cpu")] * 2, True, "conv") is None


class _Event:
    """A stand-in for a kineto event (the methods ``attribute_events`` reads)."""

    def __init__(self, name, cpu, start, dur, corr=0, linked=0, dev=0):
        self._v = (name, cpu, start, dur, corr, linked, dev)

    def name(self):
        return self._v[0]

    def device_type(self):
        cpu = torch.autograd.DeviceType
        return cpu.CPU if self._v[1] else cpu.CUDA

    def start_ns(self):
        return self._v[2]

    def duration_ns(self):
        return self._v[3]

    def correlation_id(self):
        return self._v[4]

    def linked_correlation_id(self):
        return self._v[5]

    def device_index(self):
        return self._v[6]


def test_kernels_are_attributed_to_the_phase_that_launched_them(bench) -> None:
    ms = 10**6
    events = [
        _Event("phase:forward", True, 0, 10 * ms),
        _Event("phase:backward", True, 10 * ms, 10 * ms),
        _Event("cudaLaunchKernel", True, 5 * ms, 1000, corr=7),
        _Event("cudaLaunchKernel", True, 15 * ms, 1000, corr=8),
        # Launched in the forward, runs during the backward window: still the forward's.
        _Event("conv_kernel", False, 12 * ms, 2 * ms, corr=7, dev=1),
        _Event("Memcpy PtoP (Device -> Device)", False, 16 * ms, 1 * ms, linked=8, dev=0),
        # No launch record: the last window opened before it started (the backward).
        _Event("bn_kernel", False, 30 * ms, 3 * ms, corr=99),
    ]
    out = bench.attribute_events(events)
    assert out["host_window_ms"] == {"forward": [0.0, 10.0], "backward": [10.0, 20.0]}
    assert out["device_ms"] == {
        "forward/1": {"kernel": 2.0, "copy": 0.0},
        "backward/0": {"kernel": 3.0, "copy": 1.0},
    }
    assert out["unmatched"] == 1


def test_rounds_merge_to_medians_and_keep_each_round(bench) -> None:
    """A configuration measured in interleaved rounds reports the median of each host-varying
    figure and of each device phase end; the last successful round's other fields (the host
    and backward clocks are measured in the last round only); every round's figures."""

    def meas(step, fwd, ends, **extra):
        return {
            "step_s": step,
            "spread_s": step / 10,
            "host_forward_s": fwd,
            "host_backward_s": 2 * fwd,
            "host_optimizer_s": 0.5,
            "device_phase_end_ms": {"forward": ends, "backward": [e + 10 for e in ends]},
            "error": None,
            **extra,
        }

    rounds = [
        meas(0.050, 0.010, [5.0, 7.0]),
        meas(0.040, 0.030, [6.0, 4.0]),
        meas(0.060, 0.020, [9.0, 5.0], backward_starts_ms=[["a", 0, 0.0]]),
    ]
    out, per = bench.merge_rounds(rounds)
    assert out["step_s"] == 0.050 and out["spread_s"] == pytest.approx(0.005)
    assert (out["host_forward_s"], out["host_backward_s"]) == (0.020, 0.040)
    assert out["spread_rounds_s"] == pytest.approx(0.010)  # (60 - 40) / 2 ms
    assert out["device_phase_end_ms"] == {"forward": [6.0, 5.0], "backward": [16.0, 15.0]}
    assert out["backward_starts_ms"] == [["a", 0, 0.0]]
    assert [r["step_s"] for r in per] == [0.050, 0.040, 0.060]
    # A failed round is listed but not counted; every round failing keeps the last failure.
    failed = {"step_s": None, "error": "OutOfMemoryError: x", "error_kind": "OOM"}
    out, per = bench.merge_rounds([rounds[0], failed, rounds[1]])
    assert out["step_s"] == 0.050 and out["host_forward_s"] == 0.030  # upper median of 2
    assert per[1] == {**dict.fromkeys(bench.ROUND_FIELDS), "error": "OutOfMemoryError: x"}
    out, _ = bench.merge_rounds([failed])
    assert out["step_s"] is None and out["error_kind"] == "OOM"


def test_chain_record_keeps_each_round_and_their_median(bench) -> None:
    ms = 1e-3
    ref = (bench.HostTiming(1 * ms, 10, 2 * ms, 10), bench.HostTiming(3 * ms, 10, 4 * ms, 10))
    nows = [
        (bench.HostTiming(2 * ms, 10, 1 * ms, 10), bench.HostTiming(3 * ms, 10, 3 * ms, 10)),
        None,  # the chain failed before that round
        (bench.HostTiming(1 * ms, 10, 3 * ms, 10), bench.HostTiming(5 * ms, 10, 1 * ms, 10)),
        (bench.HostTiming(4 * ms, 10, 2 * ms, 10), bench.HostTiming(4 * ms, 10, 2 * ms, 10)),
    ]
    rec = bench.chain_record(ref, nows)
    assert rec["reference"] == [[pytest.approx(100), pytest.approx(200)], [300, 400]]
    assert rec["rounds"][1] is None and rec["rounds"][0] == [[200, 100], [300, 300]]
    # Per entry, the median over the rounds the chain ran in: [200, 200], [400, 200] (us).
    assert rec["now"] == [[pytest.approx(200), pytest.approx(200)], [400, 200]]
    assert bench.chain_record(None, [None]) == {"reference": None, "now": None, "rounds": [None]}


def test_clocks_run_only_when_asked(bench) -> None:
    """The host and backward clocks cost two more steps: the benchmark takes them in the last
    round only (the backward starts show which autograd thread ran first)."""
    model, inputs, leaves, placement = _configuration(bench)
    devices = [torch.device("cpu")] * 2
    plain = bench.measure_step(model, placement, devices, inputs, 1, 1, leaves, clocks=False)
    assert plain["step_s"] > 0
    assert not {"backward_starts_ms", "slowest_launches_ms", "host_launch_by_device"} & set(plain)
    full = bench.measure_step(model, placement, devices, inputs, 1, 1, leaves)
    names = {n for n, _, _ in full["backward_starts_ms"]}
    assert names and names <= set(placement) and len(full["slowest_launches_ms"]) == 5


def test_run_model_interleaves_rounds_and_stops_repeating_a_failure(bench, monkeypatch) -> None:
    """Every configuration is measured once per round, each round starting one configuration
    later; one failing in its first round is not measured again and keeps its error; the
    others report medians over their rounds and ``sim+host`` as the median of the rounds'
    replays."""
    args = argparse.Namespace(
        quick=True, rounds=2, steps=1, warmup=1, chain_steps=1, cap_fraction=0.65,
        headroom_gib=2.0, contention="shared", profile_repeats=1, grad_copies="deferred",
        diagnose=None, placements=["m-etf", "expert", "single (uncapped)"], host_model="now",
        batch={"branches": 8},
    )  # fmt: skip
    devices = [torch.device("cpu")] * 2
    real, calls = bench.measure_step, []

    def spy(model, placement, *a, clocks=True, **kw):
        label = next((k for k, v in labels.items() if v == placement), None)
        calls.append((label, clocks))  # None: a calibration (the model or the chain)
        if label == "expert":
            return {"step_s": None, "error": "RuntimeError: boom", "error_kind": "RuntimeError"}
        return real(model, placement, *a, clocks=clocks, **kw)

    labels: dict[str, dict[str, int]] = {}
    real_build = bench.build_candidates

    def build(*a, **kw):
        out = real_build(*a, **kw)
        labels.update({k: v["fx"] for k, v in out.items() if "fx" in v})
        return out

    monkeypatch.setattr(bench, "build_candidates", build)
    monkeypatch.setattr(bench, "measure_step", spy)
    comm = CommCost(1e-5, 1e-9)
    calib = {"chains": {}, "copy_slowdown": 0.0}
    _, info = bench.run_model("branches", args, devices, comm, calib)
    assert info["batch"] == 8  # --batch reaches the model and the JSON (the replay needs it)
    order = [c for c in calls if c[0] in args.placements]
    # The expert fails in round 1 under deferred copies, then under autograd's: not again.
    assert order == [
        ("m-etf", False), ("expert", False), ("expert", False), ("single (uncapped)", False),
        ("single (uncapped)", True), ("m-etf", True),
    ]  # fmt: skip
    recs = {r["placement"]: r for r in info["records"]}
    assert recs["expert"]["step_s"] is None and recs["expert"]["error"] == "RuntimeError: boom"
    assert recs["expert"]["grad_copies"] == "autograd"
    for label in ("m-etf", "single (uncapped)"):
        rec = recs[label]
        steps = [r["step_s"] for r in rec["rounds"]]
        assert len(steps) == 2 and rec["step_s"] == max(steps)  # upper median of two
        assert "backward_starts_ms" in rec  # the last round's clocks
        now = [r["simulated_host_now_s"] for r in rec["rounds"]]
        assert rec["simulated_host_s"] == max(now) == rec["replay_terms_s"]["+ host speed now"]
        assert len(rec["host_chain_us"]["rounds"]) == 2


def test_parse_batches_names_a_bad_item(bench) -> None:
    assert bench.parse_batches(["inception=64", "branches=8"]) == {"inception": 64, "branches": 8}
    for bad in ("inception", "resnet=4", "inception=0", "inception=x"):
        with pytest.raises(SystemExit, match=f"got {bad!r}"):
            bench.parse_batches([bad])
