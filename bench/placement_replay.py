"""Replay a ``placement_gpu.py`` run offline: the simulator's terms against its measurements.

Each model is traced on ``meta`` (no weights, no GPU), given the run's profiled node times
(``node_seconds``), capped and placed exactly as the run did (``build_candidates``), and every
configuration is replayed with the executor replay as each model term is added: one-GPU host
costs, autograd's backward threads taking turns, the optimizer's host time, the second
device's host cost, copy/compute contention, the host re-timed right before the configuration
(each round's, then the median, for runs with interleaved rounds), and (a diagnostic) the
configuration's own measured host costs. The calibrations come from the run's JSON;
``--multi-forward`` and friends override them to see what a term would need to be;
``--two-device-costs now --multi-device factor`` replays what runs recorded before 2026-11-27
used for their ``sim+host``; ``--host-drift ratio`` the host speed scaling of runs made before
the bounded drift (commit bd56be8 and earlier). Runs on CPU in seconds::

    PYTHONPATH=src python bench/placement_replay.py bench/results/placement_gpu.json
    PYTHONPATH=src python bench/placement_replay.py RUN.json --multi-forward 1.5

Needs torch, numpy, scipy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
import placement_gpu as bench
from common import print_table

from scaledl.placement import GIB, Cluster, CommCost, HostTiming, fit_host_model, trace

TERMS = bench.REPLAY_TERMS
#: The configuration whose per-launch host clock is a one-device measurement.
ONE_DEVICE = "single (uncapped)"


def model_timing(info: dict[str, Any]) -> HostTiming:
    """The model's one-device host timing (older runs kept per-launch costs only)."""
    if "host_timing_one_device" in info:
        return HostTiming(**info["host_timing_one_device"])
    h = info["host_model"]
    return HostTiming(h["forward_s"], 1, h["backward_s"], 1)


def per_launch_timing(us: list[float]) -> HostTiming:
    """A host timing of one launch and one task from per-launch microseconds."""
    return HostTiming(us[0] * 1e-6, 1, us[1] * 1e-6, 1)


def chain_pair(run: dict[str, Any], model: str) -> tuple[HostTiming, HostTiming] | None:
    """The run's calibration-chain timings (one device, alternating) for ``model``."""
    chains = run.get("host_calibration", {})
    kind = bench.MODEL_CHAIN[model]
    if kind not in chains:
        return None
    t = chains[kind]["timings"]
    return HostTiming(**t[bench.CHAIN_PAIR[0]]), HostTiming(**t[bench.CHAIN_PAIR[1]])


def one_device_weights(
    runs: list[dict[str, Any]], model: str
) -> tuple[dict[str, float] | None, dict[str, float] | None, str]:
    """Per-op host costs of ``model`` measured on one device: (forward launch ms, backward
    task ms or None, where they come from). Runs that recorded ``host_costs_one_device``
    give both; older runs only the forward, from the one-device configuration's host clock
    (``--diagnose``). The first of ``runs`` (the replayed run first) that has them wins."""
    for i, run in enumerate(runs):
        source = "this run" if i == 0 else f"run {i}"
        for info in run["models"]:
            if info["model"] != model:
                continue
            costs = info.get("host_costs_one_device")
            if costs and "forward_ms" in costs:
                return costs["forward_ms"], costs.get("backward_ms"), source
            for rec in info["records"]:
                if rec["placement"] == ONE_DEVICE and rec.get("host_launches_ms"):
                    clock = {name: ms for name, _, ms in rec["host_launches_ms"]}
                    return clock, None, f"{source}, one-device configuration"
    return None, None, "none"


def median_makespan(graph, gp, cluster, hosts: list, order) -> float:
    """The replay's step time under each host model (one per round), the median (the upper
    one of an even count, as ``placement_gpu`` takes it)."""
    return bench._median(
        [bench.simulate(graph, gp, cluster, host=h, order=order).makespan for h in hosts]
    )


def replay_model(
    run: dict[str, Any],
    info: dict[str, Any],
    args,
    weights: tuple[dict[str, float] | None, dict[str, float] | None] = (None, None),
) -> list[dict[str, Any]]:
    """Every configuration of one model of the run, replayed with each term."""
    name = info["model"]
    quick = run.get("mode") == "quick-cpu"
    with torch.device("meta"):
        # Runs before the batch was recorded used the legacy GPU batches.
        batch = info.get("batch") or (None if quick else bench.LEGACY_BATCH[name])
        model, inputs, leaves, expert_rule = bench.MODELS[name](quick, batch)
    traced = trace(model, inputs, leaf_modules=leaves)
    graph = traced.op_graph()
    seconds = info["node_seconds"]
    if set(seconds) != set(graph.names):
        raise ValueError(f"{name}: the run's node_seconds do not match the traced graph")
    graph._compute = [float(seconds[n]) for n in graph.names]
    graph._frozen = None
    fit = run["comm_fit"]
    comm = CommCost(fit["latency_s"], 1.0 / fit["bandwidth_Bps"])
    cap = int(info["cap_gib"] * GIB)
    contention = run.get("args", {}).get("contention", "shared")
    cluster = Cluster([cap, cap], comm, contention=contention)
    expert_fx = bench.follow_inputs(traced.module, expert_rule)
    candidates = bench.build_candidates(traced, graph, cluster, expert_fx, contention)
    timing = model_timing(info)
    pair = chain_pair(run, name)
    options: dict[str, Any] = {"backward_threads": "shared"}
    # The second device's host cost: added per launch (the benchmark's model) or, as before
    # 'extra' was measured to fit better, a factor; an explicit factor implies 'factor'.
    multi = getattr(args, "multi_device", "extra")
    for key in ("multi_forward", "multi_backward"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
            multi = "factor"
    slowdown = run.get("copy_slowdown", 0.0) if args.copy_slowdown is None else args.copy_slowdown
    hosts = {
        "one-gpu": fit_host_model(timing),
        "full": fit_host_model(timing, pair, multi, **options),
    }
    loaded = dataclasses.replace(cluster, copy_slowdown=slowdown)
    out = []
    for rec in info["records"]:
        cand = candidates.get(rec["placement"])
        if cand is None or "fx" not in cand or not rec.get("step_s"):
            continue
        gp = bench.graph_placement(graph, cand["fx"])
        order = cand.get("order") or bench.simulate(graph, gp, cluster).launch_order()
        barrier = "deferred" if rec.get("grad_copies", "deferred") == "deferred" else "barrier"
        terms = bench.replay_terms(graph, gp, (cluster, loaded), hosts, order, rec, barrier)
        chain = rec.get("host_chain_us") or {}
        # The host re-timed before each round (runs with interleaved rounds), else before
        # the configuration ran: the replay per chain timing, then the median, as the
        # benchmark does.
        nows = [x for x in chain.get("rounds") or [chain.get("now")] if x]
        if chain.get("reference") and nows:
            ref = tuple(per_launch_timing(x) for x in chain["reference"])
            # The second device's cost: the run's calibration of the chain at the host's speed
            # now (the benchmark's model), or the chain's alternating layout re-timed with it
            # (recorded by runs before 2026-11-27 only; their sim+host used it).
            cal = pair if getattr(args, "two_device_costs", "run") == "run" else None
            drift = getattr(args, "host_drift", "bounded")
            drifts = [
                dataclasses.replace(
                    bench.host_at(
                        timing, ref, tuple(map(per_launch_timing, n)), barrier, multi, cal, drift
                    ),
                    **options,
                )
                for n in nows
            ]
            terms["+ host speed now"] = median_makespan(graph, gp, loaded, drifts, order)
            forward_w, backward_w = weights
            if getattr(args, "backward_like_forward", False) and backward_w is None:
                backward_w = forward_w  # an assumption, not a measurement
            if forward_w is not None:
                weighted = [
                    dataclasses.replace(h, forward_weights=forward_w, backward_weights=backward_w)
                    for h in drifts
                ]
                terms["+ per-op host costs"] = median_makespan(graph, gp, loaded, weighted, order)
        out.append({"model": name, "placement": rec["placement"], "step_s": rec["step_s"], **terms})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="JSON written by bench/placement_gpu.py")
    ap.add_argument("--multi-forward", type=float, default=None, help="override the factor")
    ap.add_argument("--multi-backward", type=float, default=None, help="override the factor")
    ap.add_argument("--copy-slowdown", type=float, default=None, help="override copy_slowdown")
    ap.add_argument(
        "--two-device-costs",
        choices=("run", "now"),
        default="run",
        help="'+ host speed now': the second device's cost from the run's calibration chain at "
        "the host's speed now (default) or from the alternating chain re-timed before each "
        "configuration (recorded by earlier runs only; what their sim+host used)",
    )
    ap.add_argument(
        "--multi-device",
        choices=("extra", "factor"),
        default="extra",
        help="the second device's host cost: added per launch (default) or the earlier factor",
    )
    ap.add_argument(
        "--host-drift",
        choices=("bounded", "ratio"),
        default="bounded",
        help="'+ host speed now': a launch moves by the chain's change per launch, at most its "
        "relative change (default), or by the chain's ratio (the benchmark before 2026-11-27)",
    )
    ap.add_argument(
        "--host-weights",
        nargs="*",
        default=[],
        help="other runs' JSON whose one-device host clock gives per-op host weights "
        "where the replayed run recorded none",
    )
    ap.add_argument(
        "--backward-like-forward",
        action="store_true",
        help="where no backward costs were recorded, weight backward tasks as the forward "
        "launches (an assumption)",
    )
    ap.add_argument("--threshold", type=float, default=0.10, help="fidelity target")
    args = ap.parse_args()
    with open(args.run) as f:
        run = json.load(f)
    sources = [run]
    for path in args.host_weights:
        with open(path) as f:
            sources.append(json.load(f))
    rows, final = [], []
    for info in run["models"]:
        forward_w, backward_w, source = one_device_weights(sources, info["model"])
        print(
            f"{info['model']}: per-op host costs from {source}"
            f" (forward: {'yes' if forward_w else 'no'}, backward: {'yes' if backward_w else 'no'})"
        )
        for r in replay_model(run, info, args, (forward_w, backward_w)):
            m = r["step_s"]
            rows.append(
                [r["model"], r["placement"], f"{m * 1e3:.2f}"]
                + [f"{r[k] * 1e3:.2f} ({r[k] / m - 1:+.1%})" if k in r else "-" for k in TERMS]
            )
            # The benchmark's sim+host: the host re-timed before the configuration if the
            # run recorded it, else calibrated once.
            before = r.get("+ host speed now", r["+ copy contention"])
            final.append((abs(before / m - 1), abs(r.get("+ per-op host costs", before) / m - 1)))
    print_table(
        "Executor replay as each term is added, ms (error vs measured)",
        ["model", "placement", "measured", *TERMS],
        rows,
    )
    for i, label in enumerate(("sim+host", "sim+host + per-op host costs")):
        errors = [e[i] for e in final]
        within = sum(e <= args.threshold for e in errors)
        print(
            f"{label}: {within} of {len(errors)} within {args.threshold:.0%}; "
            f"worst {max(errors, default=0):.1%}"
        )


if __name__ == "__main__":
    main()
