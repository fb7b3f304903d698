"""Baechi on 2 GPUs under memory caps: m-TOPO/m-ETF/m-SCT vs single, expert, sequential, pipeline.

For each model (synthetic parallel branches, the 6+6 Transformer, an Inception-style CNN):

1. profile every node's forward and backward on GPU 0 (CUDA events, median) and fit the
   GPU0 -> GPU1 copy cost (latency + bytes / bandwidth) from a transfer sweep;
2. set a per-device memory cap that forces a split (``--cap-fraction`` of the estimated
   single-device training memory; the runtime cap, set per configuration with
   ``torch.cuda.set_per_process_memory_fraction`` and lifted after it, sits on top of the bytes
   already allocated and adds ``--headroom-gib`` for the CUDA allocator plus foreach Adam's
   workspace and, on the output's device, the loss's workspace);
3. place the training graph with m-TOPO, m-ETF and m-SCT, and build the baselines: single
   device (uncapped reference), a hand-written expert split, a sequential memory fill like
   Accelerate's ``device_map="auto"`` and an equal-size two-stage pipeline split;
4. run each placement with ``PlacedModule`` (launch order: the plan's, else the simulated
   order of that placement) in its own scope (Adam, MSE loss; memory released before and
   after), in ``--rounds`` interleaved rounds (every configuration once per round, each
   round starting one later; ``--steps`` timed steps after ``--warmup`` per round; the
   medians over the rounds reported) and compare with the simulator:
   |simulated - measured| / measured for each contention model, and for the replay with the
   executor's host launches (``HostModel``: the model's unsynchronised one-device step's
   host time per launch, autograd's backward threads taking turns, the optimizer's host
   time, the second device's host cost per launch from a calibration chain, compute slowed
   by copies as ``copy_contention`` measured, the host's speed re-timed before each round;
   the median of the rounds' replays), with a table of the replay as each term is added;
5. place the same profiled graphs on simulated 4- and 8-device clusters.

``--diagnose MODEL`` also profiles one step per placement and prints measured vs simulated
per phase and device (phase ends, kernel and copy time, host time).

``--quick`` runs tiny models on CPU with two logical devices and roofline costs (< 2 min;
validates the whole pipeline; its timings are not GPU figures and its fidelity column compares
a roofline with a CPU that runs both logical devices on the same cores).
Needs torch, numpy, scipy; ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, save_results

from scaledl.placement import (
    GIB,
    Cluster,
    HostModel,
    HostTiming,
    InfeasiblePlacementError,
    PlacedModule,
    copy_contention,
    fit_comm_cost,
    fit_copy_slowdown,
    fit_host_model,
    place_graph,
    simulate,
    trace,
    transfer_sweep,
)
from scaledl.placement.bounds import group_units
from scaledl.placement.models import (
    ConvBNReLU,
    GPT2Block,
    InceptionNet,
    MLPBlock,
    ParallelBranches,
    Seq2SeqTransformer,
)
from scaledl.placement.trace import symbolic_trace

ALGOS = ["m-topo", "m-etf", "m-sct"]
#: Placers also run with ``refine=True`` (local search after the placer), reported separately.
REFINED = ["m-etf", "m-sct"]


# -- models and their expert splits ------------------------------------------------------------
def _branches(quick: bool, batch: int | None = None):
    width, depth, default = (64, 2, 16) if quick else (4096, 4, 1024)
    batch = batch or default
    model = ParallelBranches(branches=4, depth=depth, width=width)
    inputs = (torch.randn(batch, width),)
    # Expert: half of the branches on each GPU, the input layer on 0 and the output on 1.
    return (
        model,
        inputs,
        (MLPBlock,),
        lambda path: 1 if path.startswith(("branches.2", "branches.3", "out")) else 0,
    )


def _transformer(quick: bool, batch: int | None = None):
    if quick:
        model = Seq2SeqTransformer(vocab=500, d=32, heads=4, ff=64, layers=2)
        batch, vocab = batch or 4, 500
    else:
        model = Seq2SeqTransformer()
        batch, vocab = batch or 128, 30000
    inputs = (torch.randint(0, vocab, (batch, 50)), torch.randint(0, vocab, (batch, 50)))
    # Expert (spec §2.10): encoder on GPU 0, decoder and projection on GPU 1.
    return (
        model,
        inputs,
        (),
        lambda path: 1 if path.startswith(("decoder", "tgt_emb", "proj")) else 0,
    )


def _inception(quick: bool, batch: int | None = None):
    # GPU batch 128 (64 until 2026-11-28): at 64 the split placements' steps were bound by the
    # Python host's launches, whose speed drifted by up to 2x between rounds.
    if quick:
        model, x = InceptionNet(blocks=2, width=4, classes=10), torch.randn(batch or 2, 3, 32, 32)
    else:
        model = InceptionNet(blocks=6, width=64, classes=1000)
        x = torch.randn(batch or INCEPTION_BATCH, 3, 224, 224)
    # Expert: the two deeper branches of every block on GPU 1, the rest on GPU 0.
    return (
        model,
        (x,),
        (ConvBNReLU,),
        lambda path: 1 if (".b3" in path or ".b4" in path or path.startswith("head")) else 0,
    )


#: The Inception model's batch on GPU. Runs before this default existed used 64 (their JSON
#: has no ``batch``; :data:`LEGACY_BATCH` replays them).
INCEPTION_BATCH = 128
LEGACY_BATCH = {"branches": 1024, "transformer": 128, "inception": 64}

MODELS: dict[str, Callable[..., tuple]] = {
    "branches": _branches,
    "transformer": _transformer,
    "inception": _inception,
}
_ = GPT2Block  # GPT-2 sizes are planned by the CLI; this benchmark executes smaller models.


# -- placements as fx-node -> device maps --------------------------------------------------------
def follow_inputs(gm: torch.fx.GraphModule, module_device: Callable[[str], int]) -> dict[str, int]:
    """Modules by rule; functions follow their first input; inputs follow their first user."""
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if n.op in ("call_module", "get_attr"):
            out[n.name] = module_device(str(n.target))
        elif n.op != "placeholder":
            srcs = [a for a in n.all_input_nodes if a.op != "placeholder"]
            out[n.name] = out[srcs[0].name] if srcs else 0
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            users = [u for u in n.users if u.name in out]
            out[n.name] = out[users[0].name] if users else 0
    return out


def contiguous_split(
    names: list[str], weights: list[int], cap: int | None, devices: int
) -> list[int]:
    """Sequential fill (cap given): fill device 0 to the cap, then 1, ...; else equal weight."""
    out, d, used = [], 0, 0
    total = sum(weights)
    for w in weights:
        if cap is not None:
            if used + w > cap and used > 0 and d < devices - 1:
                d, used = d + 1, 0
        elif used >= total * (d + 1) / devices and d < devices - 1:
            d += 1
        used += w
        out.append(d)
    return out


def graph_placement(graph, fx_map: dict[str, int]) -> list[int]:
    """Device per training-graph node: forward, backward and optimizer follow the fx node."""
    return [fx_map[name.split(":", 1)[1]] for name in graph.names]


# -- measurement --------------------------------------------------------------------------------
def release_device_memory(devices) -> list[int]:
    """Free everything dead and return the cached blocks to the driver; allocated bytes per
    physical CUDA device (empty on CPU). Call it only once a configuration's objects are out
    of scope: emptying the cache while they live leaves their segments reserved (and split by
    the next configuration's tensors), which the per-process cap counts."""
    gc.collect()
    cuda = cuda_devices(devices)
    _sync(cuda)
    if cuda:
        torch.cuda.empty_cache()
    out = []
    for d in cuda:
        torch.cuda.reset_peak_memory_stats(d)
        out.append(torch.cuda.memory_allocated(d))
    return out


def error_text(exc: BaseException) -> str:
    """The full message of a failed configuration (the allocator's OOM text names the
    reserved-but-unallocated bytes, which tell fragmentation from a real overflow)."""
    return f"{type(exc).__name__}: {exc}"


def run_configuration(
    model,
    placement,
    devices,
    inputs,
    steps: int,
    warmup: int,
    leaves=(),
    order=None,
    grad_copies: str = "deferred",
    diagnose: bool = False,
    clocks: bool = True,
) -> dict[str, Any]:
    """Median training-step seconds of a placed model (Adam, MSE to zero) and peak memory,
    the host time of each phase, and on GPUs when each device finishes each phase (CUDA
    events on its stream); ``clocks``: also one step with the executor's host clock (each
    launch's host time) and one with its backward clock (when each backward started, on
    which autograd thread); ``diagnose``: also one profiled step (:func:`profile_phases`)
    and every launch's host time.

    Every object that holds device memory (the placed copy, its optimizer state, activations,
    and on failure the traceback's frames) lives only in this frame, so it is all freed when
    the function returns."""
    try:
        pm = PlacedModule(
            copy.deepcopy(model),
            placement,
            devices,
            leaf_modules=leaves,
            order=order,
            grad_copies=grad_copies,
        )
        opt = torch.optim.Adam(pm.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            out = pm(*inputs)
            out.float().square().mean().backward()
            opt.step()

        for _ in range(warmup):
            step()
        times, host_f, host_b, host_o, marks = [], [], [], [], []
        cuda = cuda_devices(devices)
        stats0 = allocator_counters(devices)
        for _ in range(steps):
            _sync(devices)
            ev = [_mark(cuda)]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = pm(*inputs).float().square().mean()
            t1 = time.perf_counter()  # host time only: nothing waits for the GPU here
            ev.append(_mark(cuda))
            loss.backward()
            t2 = time.perf_counter()
            ev.append(_mark(cuda))
            opt.step()
            t3 = time.perf_counter()
            ev.append(_mark(cuda))
            _sync(devices)
            times.append(time.perf_counter() - t0)
            host_f.append(t1 - t0)
            host_b.append(t2 - t1)
            host_o.append(t3 - t2)
            marks.append(ev)
        times.sort()
        churn = allocator_churn(stats0, allocator_counters(devices), steps)
        peak = [torch.cuda.max_memory_allocated(d) / GIB for d in cuda]
        extra: dict[str, Any] = {}
        if clocks or diagnose:
            spent = host_clock_step(pm, step, devices)
            extra["host_launch_by_device"] = launch_stats(spent, pm.device_of)
            extra["slowest_launches_ms"] = slowest_launches(spent)
            try:  # a diagnostic: its failure must not cost the measurement
                # Which autograd thread ran which backward first: the replay's task order.
                extra["backward_starts_ms"] = backward_starts(pm, step, devices)
            except Exception as exc:
                traceback.clear_frames(exc.__traceback__)
                extra["backward_starts_error"] = error_text(exc)
        if diagnose:
            extra["host_launches_ms"] = [
                [name, pm.device_of[name], round(sec * 1e3, 4)] for name, sec in spent
            ]
            extra["profile"] = profile_phases(lambda: step_phases(pm, opt, inputs), devices)
        return {
            "step_s": times[len(times) // 2],
            "spread_s": (times[(3 * len(times)) // 4] - times[len(times) // 4]) / 2,
            "peak_gib": peak,
            # Host wall time to launch the forward (+ loss), to run backward() and to launch
            # optimizer.step(): where the step is host-bound these approach the step time.
            "host_forward_s": _median(host_f),
            "host_backward_s": _median(host_b),
            "host_optimizer_s": _median(host_o),
            # When each device's stream finished the forward, backward and optimizer work
            # (from the step's start, after a synchronisation): set against the simulated
            # per-device phase ends (``simulated_phases``).
            "device_phase_end_ms": phase_ends_ms(marks),
            "launches_per_forward": len(pm.launch_sequence()),
            "copies_per_forward": pm.copies,
            "copy_mib_per_forward": pm.copy_bytes / 2**20,
            "peak_reserved_gib": [
                torch.cuda.max_memory_reserved(d) / GIB for d in cuda_devices(devices)
            ],
            **churn,
            **extra,
            "error": None,
        }
    except Exception as exc:  # one failing placement must not end the whole comparison
        text = error_text(exc)
        kind = "OOM" if isinstance(exc, torch.cuda.OutOfMemoryError) else type(exc).__name__
        # Drop the frames (and the activations they hold) before anything else is allocated.
        traceback.clear_frames(exc.__traceback__)
        return {"step_s": None, "error": text, "error_kind": kind}


def measure_step(
    model,
    placement,
    devices,
    inputs,
    steps: int,
    warmup: int,
    leaves=(),
    order=None,
    *,
    cap_bytes: list[int] | None = None,
    grad_copies: str = "deferred",
    diagnose: bool = False,
    clocks: bool = True,
) -> dict[str, Any]:
    """:func:`run_configuration` in a clean scope: memory released before and after, the cap
    (``cap_bytes[i]`` for physical CUDA device i, on top of what is already allocated there)
    applied only for this configuration, and the bytes it left behind reported."""
    before = release_device_memory(devices)
    limits = set_caps(devices, cap_bytes, before)
    try:
        meas = run_configuration(
            model,
            placement,
            devices,
            inputs,
            steps,
            warmup,
            leaves,
            order,
            grad_copies,
            diagnose,
            clocks,
        )
    finally:
        set_caps(devices, None)
    after = release_device_memory(devices)
    meas["allocated_before_gib"] = [b / GIB for b in before]
    meas["runtime_limit_gib"] = [x / GIB for x in limits]
    meas["leaked_gib"] = [(a - b) / GIB for a, b in zip(after, before)]
    return meas


def host_clock_step(pm, step: Callable[[], None], devices) -> list[tuple[str, float]]:
    """One more step with the executor's host clock on: host seconds of each forward launch
    (a node with its copies), in launch order."""
    _sync(devices)
    pm.host_clock = []
    try:
        step()
        spent = pm.host_launch_seconds()
    finally:
        pm.host_clock = None
    _sync(devices)
    return spent


def backward_starts(pm, step: Callable[[], None], devices) -> list[list]:
    """One more step with the executor's backward clock: ``[name, thread, ms]`` per node whose
    backward ran, in start order; ``thread`` numbers autograd's threads by first start, ``ms``
    is host time since the first start. Shows the order autograd's device threads really ran
    the backward in (which thread issued a gradient copy first), which the replay models."""
    _sync(devices)
    pm.backward_clock = []
    try:
        step()
        stamps = sorted(pm.backward_clock, key=lambda x: x[2])
    finally:
        pm.backward_clock = None
    _sync(devices)
    threads: dict[int, int] = {}
    t0 = stamps[0][2] if stamps else 0.0
    return [
        [name, threads.setdefault(th, len(threads)), round((t - t0) * 1e3, 4)]
        for name, th, t in stamps
    ]


def slowest_launches(spent: list[tuple[str, float]], k: int = 5) -> list[list]:
    """The ``k`` nodes whose launch (with their copies) held the host longest, as
    ``[name, ms]``. On a GPU a launch costs tens of microseconds; milliseconds mean the host
    waited for a device."""
    ranked = sorted(spent, key=lambda x: -x[1])
    return [[name, round(s * 1e3, 3)] for name, s in ranked[:k]]


def launch_stats(spent: list[tuple[str, float]], device_of: dict[str, int]) -> dict[str, Any]:
    """Host milliseconds per forward launch on each logical device (median and mean): tells
    a slower launch path to one GPU from a slowdown of every launch once two are used."""
    out: dict[str, Any] = {}
    for d in sorted(set(device_of.values())):
        ms = [s * 1e3 for name, s in spent if device_of[name] == d]
        if ms:
            out[str(d)] = {
                "launches": len(ms),
                "median_ms": _median(ms),
                "mean_ms": sum(ms) / len(ms),
            }
    return out


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _mark(cuda: list[torch.device]) -> list[Any]:
    """A timing event recorded now on each CUDA device's current stream."""
    out = []
    for d in cuda:
        e = torch.cuda.Event(enable_timing=True)
        e.record(torch.cuda.current_stream(d))
        out.append(e)
    return out


def phase_ends_ms(marks: list[list[list[Any]]]) -> dict[str, list[float]]:
    """Median milliseconds from each step's first mark to its forward, backward and optimizer
    marks, per device (empty on CPU)."""
    out: dict[str, list[float]] = {}
    if not marks or not marks[0][0]:
        return out
    for p, phase in enumerate(("forward", "backward", "optimizer"), start=1):
        out[phase] = [
            _median([m[0][d].elapsed_time(m[p][d]) for m in marks]) for d in range(len(marks[0][0]))
        ]
    return out


def step_phases(pm, opt, inputs) -> None:
    """One training step with each phase inside a profiler range ``phase:<name>``."""
    from torch.profiler import record_function

    with record_function("phase:forward"):
        opt.zero_grad(set_to_none=True)
        loss = pm(*inputs).float().square().mean()
    with record_function("phase:backward"):
        loss.backward()
    with record_function("phase:optimizer"):
        opt.step()


def profile_phases(step: Callable[[], None], devices) -> dict[str, Any]:
    """One profiled step: per phase (by when the host launched the work: the forward, the
    ``backward()`` call, the optimizer step) and device, the milliseconds of kernels and of
    copies (``Memcpy``) the GPU ran, and each phase's host window. A kernel is attributed by
    its launch call (correlation id), else by its own start (``unmatched``)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = cuda_devices(devices)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        _sync(devices)
        with profile(activities=acts) as prof:
            step()
            _sync(devices)
        return attribute_events(prof.profiler.kineto_results.events())
    except Exception as exc:  # a diagnostic must not end the benchmark
        traceback.clear_frames(exc.__traceback__)
        return {"error": error_text(exc)}


def attribute_events(events) -> dict[str, Any]:
    """Device milliseconds per ``phase/device`` (kernels and copies) from kineto events."""
    cpu = torch.autograd.DeviceType.CPU
    windows, launched = {}, {}
    for e in events:
        if e.device_type() != cpu:
            continue
        if e.name().startswith("phase:"):
            windows[e.name()[6:]] = (e.start_ns(), e.start_ns() + e.duration_ns())
        elif e.name().startswith("cu"):  # a runtime/driver call: a kernel launch or a copy
            launched[e.correlation_id()] = e.start_ns()
    t0 = min((w[0] for w in windows.values()), default=0)
    out: dict[str, Any] = {
        "host_window_ms": {k: [(a - t0) / 1e6, (b - t0) / 1e6] for k, (a, b) in windows.items()},
        "device_ms": {},
        "unmatched": 0,
    }
    for e in events:
        if e.device_type() == cpu or e.name().startswith("phase:"):
            continue
        # The GPU record carries its launch call's correlation id (older kineto: the linked
        # one). Unmatched: the last phase whose host window opened before the kernel started
        # (a kernel runs after its launch; it may run after every window has closed).
        t = launched.get(e.correlation_id(), launched.get(e.linked_correlation_id()))
        if t is None:
            out["unmatched"] += 1
            start = e.start_ns()
            opened = [(a, k) for k, (a, _) in windows.items() if a <= start]
            phase = max(opened)[1] if opened else "other"
        else:
            phase = next((k for k, (a, b) in windows.items() if a <= t <= b), "other")
        kind = "copy" if e.name().startswith("Memcpy") else "kernel"
        key = f"{phase}/{e.device_index()}"
        row = out["device_ms"].setdefault(key, {"kernel": 0.0, "copy": 0.0})
        row[kind] += e.duration_ns() / 1e6
    return out


ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_sync_all_streams")


def allocator_counters(devices) -> list[dict[str, int]]:
    """The caching allocator's event counters per CUDA device (empty on CPU)."""
    out = []
    for d in cuda_devices(devices):
        stats = torch.cuda.memory_stats(d)
        out.append({k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTERS})
    return out


def allocator_churn(before, after, steps: int) -> dict[str, list[float]]:
    """Allocator events per measured step and device. A retry (the allocator hit the runtime
    cap, freed its cache and synchronised the device) or a ``cudaMalloc`` in steady state
    stalls the host and serialises the two GPUs: a cost the simulator does not model."""
    return {
        f"{k}_per_step": [(a[k] - b[k]) / max(steps, 1) for b, a in zip(before, after)]
        for k in ALLOCATOR_COUNTERS
    }


def _sync(devices) -> None:
    for d in cuda_devices(devices):
        torch.cuda.synchronize(d)


def cuda_devices(devices) -> list[torch.device]:
    """The distinct CUDA devices of ``devices``, in a fixed order."""
    return sorted({d for d in devices if d.type == "cuda"}, key=str)


def set_caps(devices, cap_bytes: list[int] | None, base: list[int] | None = None) -> list[int]:
    """Cap each CUDA device's allocator at ``base + cap`` bytes (``None``: no cap) and return
    the limits. ``torch.cuda.set_per_process_memory_fraction`` bounds *reserved* memory, so the
    cap is stated on top of the bytes already *allocated* (``base``), never of a reserve."""
    limits = []
    for i, d in enumerate(cuda_devices(devices)):
        total = torch.cuda.get_device_properties(d).total_memory
        limit = total if cap_bytes is None else min(total, (base[i] if base else 0) + cap_bytes[i])
        torch.cuda.set_per_process_memory_fraction(limit / total, d)
        limits.append(int(limit))
    return limits


#: The loss ``out.float().square().mean()`` lives outside the traced model: its square (one
#: output-sized tensor) and its backward (``2 * out * grad`` and the gradient it hands to the
#: model, two more) sit on the output's device, next to the activations the model keeps.
LOSS_WORKSPACE_OUTPUTS = 3


def runtime_caps(
    specs, fx_map: dict[str, int], cap: int, headroom: int, n: int, output: str | None = None
) -> list[int]:
    """Per device: the placers' cap, the allocator ``headroom``, the workspace of foreach
    Adam (one temporary as large as the device's trainable parameters: ``_foreach_sqrt`` of
    the second moments) and, on the device of the model's ``output`` node, the loss's
    workspace; neither is in the per-op memory model, which covers the model only. (The
    transformer's 128x50x30000 logits are 732 MiB: without the loss term the expert and
    pipeline splits, whose decoder device is fullest, ran out of memory on an H200.)"""
    extra = [0] * n
    for s in specs:
        extra[fx_map[s.name]] += s.trainable_bytes
        if s.name == output:
            extra[fx_map[s.name]] += LOSS_WORKSPACE_OUTPUTS * s.out_bytes
    return [cap + headroom + t for t in extra]


def model_output(gm: torch.fx.GraphModule) -> str | None:
    """The fx node whose value the model returns (None for a nested output)."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return out.name if isinstance(out, torch.fx.Node) else None


def check_grad_copies(model, fx_map, devices, inputs, leaves) -> dict[str, Any]:
    """On GPUs: one step's parameter gradients with deferred gradient copies against
    autograd's copies (largest difference relative to the largest gradient)."""
    if not cuda_devices(devices) or len(set(fx_map.values())) < 2:
        return {"checked": False}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for mode in ("deferred", "autograd"):
            release_device_memory(devices)
            pm = PlacedModule(
                copy.deepcopy(model), fx_map, devices, leaf_modules=leaves, grad_copies=mode
            )
            pm(*inputs).float().square().mean().backward()
            grads[mode] = {
                k: p.grad.detach().cpu() for k, p in pm.gm.named_parameters() if p.grad is not None
            }
            del pm
    except Exception as exc:  # the fallback must still run the benchmark
        traceback.clear_frames(exc.__traceback__)
        release_device_memory(devices)
        return {"checked": True, "ok": False, "error": error_text(exc)}
    release_device_memory(devices)
    a, b = grads["deferred"], grads["autograd"]
    scale = max((g.abs().max().item() for g in b.values()), default=0.0) or 1.0
    diff = max((float((a[k] - g).abs().max()) for k, g in b.items() if k in a), default=0.0)
    same = set(a) == set(b)
    return {"checked": True, "ok": same and diff <= 1e-3 * scale, "max_rel_diff": diff / scale}


def host_timing(meas: dict[str, Any], backward_nodes: int, grad_copies: str = "deferred"):
    """A measured configuration's :class:`HostTiming`: forward launches are the ops and their
    copies; backward tasks the backward nodes plus, per copy, the gradient's copy and (with
    deferred gradient copies) the wait for it, as the replay counts them."""
    per_copy = 2 if grad_copies == "deferred" else 1
    return HostTiming(
        forward_s=meas["host_forward_s"],
        forward_launches=meas["launches_per_forward"],
        backward_s=meas["host_backward_s"],
        backward_tasks=max(backward_nodes + per_copy * meas["copies_per_forward"], 1),
        optimizer_s=meas.get("host_optimizer_s", 0.0),
    )


def backward_nodes(graph) -> int:
    return sum(1 for k in graph.kind if k == "backward")


def calibrate_host(model, fx_names, devices, inputs, leaves, graph, steps=10) -> HostTiming:
    """Host launch cost of :class:`PlacedModule` for this model (the simulator's host term):
    the median host wall time of an unsynchronised forward (+ loss) and backward() with every
    node on one device, over the forward launches and the backward nodes. On CPU the ops run
    synchronously, so this is the compute itself (quick mode only checks the path)."""
    meas = measure_step(
        model, dict.fromkeys(fx_names, 0), devices, inputs, steps, 3, leaves, clocks=False
    )
    if meas["step_s"] is None:
        raise RuntimeError(f"host calibration failed: {meas['error']}")
    return host_timing(meas, backward_nodes(graph))


def host_costs_one_device(model, fx_names, devices, inputs, leaves, steps=5) -> dict:
    """Per-op host costs of :class:`PlacedModule` with every node on one device (medians over
    ``steps`` unsynchronised steps after 2 warm-up steps): ``forward_ms`` (each node's launch,
    ``host_clock``) and ``backward_ms`` (each node's backward task on autograd's one thread,
    ``backward_clock``). The replay's per-op weights (``HostModel.forward_weights``,
    ``backward_weights``): measured on one device, never on a predicted placement."""
    pm = PlacedModule(
        copy.deepcopy(model), dict.fromkeys(fx_names, 0), devices, leaf_modules=leaves
    )
    fwd: dict[str, list[float]] = {}
    bwd: dict[str, list[float]] = {}
    try:
        for i in range(steps + 2):
            _sync(devices)
            pm.zero_grad(set_to_none=True)
            pm.host_clock, pm.backward_clock = ([], []) if i >= 2 else (None, None)
            loss = pm(*inputs).float().square().mean()
            loss.backward()
            end = time.perf_counter()
            if i >= 2:
                for name, sec in pm.host_launch_seconds():
                    fwd.setdefault(name, []).append(sec * 1e3)
                for name, sec in pm.backward_host_seconds(end).items():
                    bwd.setdefault(name, []).append(sec * 1e3)
    finally:
        pm.host_clock = pm.backward_clock = None
        del pm
        release_device_memory(devices)
    return {
        "forward_ms": {k: _median(v) for k, v in fwd.items()},
        "backward_ms": {k: _median(v) for k, v in bwd.items()},
    }


def calibration_chain(kind: str, quick: bool):
    """A multi-device host calibration model: a chain of small layers of the benchmark
    model's kind (``linear``: Linear + ReLU; ``conv``: Inception's ConvBNReLU unit) whose
    kernels take microseconds, so the step's host time is launch cost only. Returns the
    model, its inputs and its leaf modules."""
    blocks = 12 if quick else 24
    if kind == "linear":
        width, batch = (32, 8) if quick else (512, 64)
        layers: list[torch.nn.Module] = []
        for _ in range(blocks):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers), (torch.randn(batch, width),), ()
    if kind == "conv":
        ch, side, batch = (4, 8, 2) if quick else (16, 16, 8)
        layers = [ConvBNReLU(ch, ch, 3) for _ in range(blocks)]
        return torch.nn.Sequential(*layers), (torch.randn(batch, ch, side, side),), (ConvBNReLU,)
    raise ValueError(f"unknown calibration chain {kind!r}; choose linear or conv")


#: The calibration chain of each benchmark model: its own kind of layer (a launch's host cost
#: depends on the op: cuBLAS vs cuDNN convolution and batch norm).
MODEL_CHAIN = {"branches": "linear", "transformer": "linear", "inception": "conv"}


#: Layouts of the calibration chain: position i of its n fx nodes -> device.
CHAIN_LAYOUTS: dict[str, Callable[[int, int], int]] = {
    "one device": lambda i, n: 0,
    "other device": lambda i, n: 1,
    "alternating": lambda i, n: (i // 8) % 2,  # blocks of 8 nodes: switches and copies
    "halves": lambda i, n: int(i >= n // 2),
}


def calibrate_multi_device(
    devices, steps: int, quick: bool, kind: str = "linear", layouts=tuple(CHAIN_LAYOUTS)
) -> dict:
    """Host time of a calibration chain in each :data:`CHAIN_LAYOUTS` layout (a model none of
    the benchmark's placements use). The multi-device host factors are the per-launch ratios
    of ``alternating`` over ``one device``; the others tell a slower launch path to GPU 1
    (``other device``) from a cost of using two GPUs at all (``halves``)."""
    torch.manual_seed(0)
    model, inputs, leaves = calibration_chain(kind, quick)
    graph = trace(model, inputs, leaf_modules=leaves).op_graph()
    names = [n.name for n in symbolic_trace(model, leaves).graph.nodes if n.op != "output"]
    model = model.to(devices[0])
    inputs = tuple(x.to(devices[0]) for x in inputs)
    out: dict[str, Any] = {"chain": kind, "timings": {}, "per_launch_us": {}}
    for label in layouts:
        rule = CHAIN_LAYOUTS[label]
        fx = {name: rule(i, len(names)) for i, name in enumerate(names)}
        meas = measure_step(model, fx, devices, inputs, steps, 3, leaves, clocks=False)
        if meas["step_s"] is None:
            raise RuntimeError(f"multi-device host calibration ({label}) failed: {meas['error']}")
        timing = host_timing(meas, backward_nodes(graph))
        out["timings"][label] = timing
        out["per_launch_us"][label] = [x * 1e6 for x in timing.per_launch]
    return out


def chain_now(
    devices, quick: bool, kind: str, steps: int | None = None
) -> tuple[HostTiming] | None:
    """The calibration chain's host timing now on one device (``steps`` steps, default 2
    quick / 20), as a 1-tuple: the host's speed now; None if it failed (the replay then
    keeps the model's calibration)."""
    try:
        steps = steps or (2 if quick else 20)
        cal = calibrate_multi_device(devices, steps, quick, kind, CHAIN_PAIR[:1])
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)
        print(f"calibration chain failed: {error_text(exc)}")
        return None
    return (cal["timings"][CHAIN_PAIR[0]],)


#: The chain layouts whose per-launch costs give the second device's host cost.
CHAIN_PAIR = ("one device", "alternating")


def drifted(cost: float, ref: float, now: float, drift: str = "bounded") -> float:
    """A host cost per launch (s) at the host's speed now, from the calibration chain's cost
    per launch when the model was calibrated (``ref``) and now (``now``).

    ``drift="bounded"``: the launch changes by what a chain launch changed, ``now - ref``, but
    by no more than the chain's relative change applied to the launch itself, ``cost * (now /
    ref - 1)``: ``cost + (now - ref) * min(1, cost / ref)``. A launch cheaper than a chain
    launch scales with the chain; a costlier one (a Transformer layer's ~1 ms against a chain
    launch's ~25 us) is not given the chain's relative change, which would amplify the noise of
    one short chain timing by their ratio: on the recorded 2x H200 run (bd56be8) the chain's
    forward launch re-timed 1.5x slower while its backward task re-timed 0.85x, and the
    Transformer's measured host time did not follow. ``drift="ratio"``: the earlier model,
    ``cost * now / ref``."""
    if drift not in ("bounded", "ratio"):
        raise ValueError(f"drift must be 'bounded' or 'ratio', got {drift!r}")
    if ref <= 0:
        return cost
    if drift == "ratio":
        return cost * now / ref
    return cost + (now - ref) * min(1.0, cost / ref)


def host_at(
    timing: HostTiming,
    ref: tuple[HostTiming, ...],
    now: tuple[HostTiming, ...],
    barrier: str,
    multi: str = "extra",
    calibration: tuple[HostTiming, HostTiming] | None = None,
    drift: str = "bounded",
) -> HostModel:
    """The host model with the host's speed now: the model's one-device costs per forward
    launch and backward task moved by the calibration chain's one-device cost per launch now
    (``now[0]``) against when the model was calibrated (``ref[0]``) as :func:`drifted` says
    (``drift``); the optimizer step's host time moves as one forward launch. The host's speed
    drifts during a run (2 H200s: the same placement measured 15.2 and 22.7 ms of forward
    host time).

    The second device's host cost (``multi``: see :func:`fit_host_model`) is the run's
    ``calibration`` of the chain (one device, alternating: timed once, 20 steps each) as a
    ratio, applied to the chain's launch now: it adds ``(alternating / one - 1)`` of a chain
    launch per launch, and a copy costs a chain launch, at the host's speed now. Without a
    calibration, the chain's own ``now`` pair if it has one (runs recorded before 2026-11-27
    re-timed both layouts), else none. A difference of two re-timed layouts is noisier than
    the host's speed: on the recorded 2x H100 run it put the Inception expert 3.2 points
    further off."""
    (f0, b0), (f1, b1) = ref[0].per_launch, now[0].per_launch
    forward, backward = timing.per_launch
    scaled = dataclasses.replace(
        timing,
        forward_s=drifted(forward, f0, f1, drift) * timing.forward_launches,
        backward_s=drifted(backward, b0, b1, drift) * timing.backward_tasks,
        optimizer_s=drifted(timing.optimizer_s, f0, f1, drift),
    )
    pair: tuple[HostTiming, HostTiming] | None = None
    if calibration is not None:
        (c1, d1), (c2, d2) = calibration[0].per_launch, calibration[1].per_launch
        if min(c1, d1) <= 0:
            raise ValueError("the one-device calibration timing must have host time > 0")
        pair = (now[0], HostTiming(f1 * c2 / c1, 1, b1 * d2 / d1, 1))
    elif len(now) > 1:
        pair = (now[0], now[1])
    return fit_host_model(scaled, pair, multi, backward_threads="shared", grad_copies=barrier)


#: A configuration's figures that vary with the host: per round, and their medians.
ROUND_FIELDS = ("step_s", "spread_s", "host_forward_s", "host_backward_s", "host_optimizer_s")


def merge_rounds(rounds: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One configuration measured in several interleaved rounds: the last successful round's
    record (the last round also holds the host and backward clocks) with :data:`ROUND_FIELDS`
    and the device phase ends replaced by their medians over the successful rounds, and
    ``spread_rounds_s`` (half the range of the rounds' step times); plus each round's
    :data:`ROUND_FIELDS` (and error). A configuration whose every round failed keeps the
    last failure."""
    ok = [m for m in rounds if m.get("step_s") is not None]
    per = [{k: m.get(k) for k in ROUND_FIELDS} | {"error": m.get("error")} for m in rounds]
    if not ok:
        return (dict(rounds[-1]) if rounds else {"step_s": None, "error": "not measured"}), per
    out = dict(ok[-1])
    for k in ROUND_FIELDS:
        out[k] = _median([m[k] for m in ok])
    steps = [m["step_s"] for m in ok]
    out["spread_rounds_s"] = (max(steps) - min(steps)) / 2
    ends = ok[-1].get("device_phase_end_ms") or {}
    out["device_phase_end_ms"] = {
        phase: [_median([m["device_phase_end_ms"][phase][d] for m in ok]) for d in range(len(v))]
        for phase, v in ends.items()
    }
    return out, per


def chain_record(
    ref: tuple[HostTiming, HostTiming] | None, nows: list[tuple[HostTiming, HostTiming] | None]
) -> dict[str, Any]:
    """``host_chain_us``: the chain's host us per forward launch and backward task (per
    layout timed: one device, and in runs before 2026-11-27 also alternating) when the model
    was calibrated (``reference``), before each round (``rounds``) and their median
    (``now``)."""

    def us(t):
        return [[x * 1e6 for x in h.per_launch] for h in t] if t else None

    got = [us(n) for n in nows if n]
    n = min((len(g) for g in got), default=0)
    med = [[_median([g[i][j] for g in got]) for j in range(2)] for i in range(n)] if got else None
    return {"reference": us(ref), "now": med, "rounds": [us(n) for n in nows]}


def per_op_makespan(graph, gp, cluster, host: HostModel, order, costs: dict) -> float | None:
    """The replay with ``host``'s costs shared out per op by the one-device host costs
    (:func:`host_costs_one_device`); None (and a printed reason) where they do not cover the
    graph or were not measured."""
    if "forward_ms" not in costs:
        return None
    weighted = dataclasses.replace(
        host, forward_weights=costs["forward_ms"], backward_weights=costs["backward_ms"]
    )
    try:
        return simulate(graph, gp, cluster, host=weighted, order=order).makespan
    except ValueError as exc:
        print(f"per-op host costs not used: {exc}")
        return None


def replace_host(host: HostModel, grad_copies: str) -> HostModel:
    return dataclasses.replace(host, grad_copies=grad_copies)


def replay_terms(
    graph, gp, clusters, hosts: dict[str, HostModel], order, meas, barrier: str
) -> dict[str, float]:
    """The executor replay's makespan as each term is added (the ``sim+host`` column is the
    last), and with this configuration's own measured host costs (a diagnostic, not a
    prediction: it uses the measurement it is compared with)."""
    plain, loaded = clusters
    full = dataclasses.replace(hosts["full"], grad_copies=barrier)
    # The a152ba8 model: one-GPU launch costs, one backward thread per device, no optimizer.
    base = dataclasses.replace(hosts["one-gpu"], grad_copies=barrier, optimizer_s=0.0)
    shared = dataclasses.replace(base, backward_threads="shared")
    steps = {
        "one-GPU host": (base, plain),
        "+ shared backward threads": (shared, plain),
        "+ optimizer host": (dataclasses.replace(shared, optimizer_s=full.optimizer_s), plain),
        "+ multi-device host": (full, plain),
        "+ copy contention": (full, loaded),
    }
    out = {k: simulate(graph, gp, c, host=h, order=order).makespan for k, (h, c) in steps.items()}
    if meas.get("step_s") is not None:
        tasks = "deferred" if barrier == "deferred" else "autograd"
        own = fit_host_model(
            host_timing(meas, backward_nodes(graph), tasks),
            backward_threads="shared",
            grad_copies=barrier,
        )
        out["own host rates"] = simulate(graph, gp, loaded, host=own, order=order).makespan
    return out


def build_candidates(
    traced, graph, cluster: Cluster, expert_fx: dict[str, int], contention: str
) -> dict[str, dict[str, Any]]:
    """Every configuration of a model: the three placers under the cap, the expert split (and
    the placers at the expert's memory when it exceeds the cap), the sequential fill, the
    equal pipeline and one device (``graph``: the traced model's training graph).
    Deterministic: an offline replay (``placement_replay.py``) rebuilds the same ones."""
    gm = traced.module
    cap = max(cluster.memory)
    comm = cluster.comm[0][1] if len(cluster) > 1 else cluster.comm[0][0]
    fx_names = [n.name for n in gm.graph.nodes if n.op != "output"]
    spec = {s.name: s for s in traced.specs}
    candidates: dict[str, dict[str, Any]] = {}
    for algo, refine in [(a, False) for a in ALGOS] + [(a, True) for a in REFINED]:
        label = f"{algo}+refine" if refine else algo
        try:
            plan = place_graph(graph, cluster, algo, refine=refine)
            candidates[label] = {
                "fx": plan.fx_placement(),
                "order": plan.fx_order(),
                "placement_s": plan.seconds,
            }
        except InfeasiblePlacementError as exc:
            candidates[label] = {"error": str(exc)}
    candidates["expert"] = {"fx": expert_fx}
    # The expert split is written by hand and may need more memory than the cap the placers
    # obey: then also place with the expert's own (estimated) peak as the cap, so Baechi is
    # compared with the expert on equal memory too.
    expert_peak = int(max(simulate(graph, graph_placement(graph, expert_fx), cluster).peak_memory))
    if expert_peak > cap:
        roomy = Cluster([expert_peak] * 2, comm, contention=contention)
        for algo in ("m-etf", "m-sct"):
            try:
                plan = place_graph(graph, roomy, algo)
            except InfeasiblePlacementError:
                continue
            candidates[f"{algo} @expert mem"] = {
                "fx": plan.fx_placement(),
                "order": plan.fx_order(),
                "placement_s": plan.seconds,
                "cap": expert_peak,
            }
    fwd_perm = [int(graph.permanent[graph.index[f"fwd:{n}"]]) for n in fx_names]
    seq = contiguous_split(fx_names, fwd_perm, cap, 2)
    candidates["sequential-fill"] = {"fx": dict(zip(fx_names, seq))}
    param_w = [1 if spec[n].param_bytes else 0 for n in fx_names]
    pipe = contiguous_split(fx_names, param_w, None, 2)
    candidates["equal-pipeline"] = {"fx": dict(zip(fx_names, pipe))}
    candidates["single (uncapped)"] = {"fx": dict.fromkeys(fx_names, 0), "uncapped": True}
    return candidates


def run_model(
    name: str, args, devices, comm, calib: dict[str, Any]
) -> tuple[list[list], dict[str, Any]]:
    torch.manual_seed(0)
    model, inputs, leaves, expert_rule = MODELS[name](args.quick, args.batch.get(name))
    dev0 = devices[0]
    model = model.to(dev0)
    inputs = tuple(x.to(dev0) for x in inputs)
    t0 = time.perf_counter()
    # GPU: CUDA-event profile of every node. Quick CPU mode: the analytic roofline (fast, and
    # immune to a busy host); its timings only validate the pipeline.
    traced = trace(
        model, inputs, leaf_modules=leaves, profile=not args.quick, repeats=args.profile_repeats
    )
    profile_s = time.perf_counter() - t0
    graph = traced.op_graph()
    model = model.cpu()  # each configuration places its own copy
    release_device_memory(devices)
    single_est = single_device_memory(graph, comm)
    cap = forcing_cap(graph, single_est, 2, args.cap_fraction)
    cluster = Cluster([cap, cap], comm, contention=args.contention)
    gm = traced.module
    fx_names = [n.name for n in gm.graph.nodes if n.op != "output"]
    timing = calibrate_host(model, fx_names, devices, inputs, leaves, graph)
    try:
        host_costs = host_costs_one_device(model, fx_names, devices, inputs, leaves)
    except Exception as exc:  # a diagnostic: the benchmark goes on without it
        traceback.clear_frames(exc.__traceback__)
        release_device_memory(devices)
        host_costs = {"error": error_text(exc)}
    chain_kind = MODEL_CHAIN[name]
    chain_ref = chain_now(devices, args.quick, chain_kind)
    # Deferred gradient copies (the default) must give autograd's gradients; else fall back.
    expert_fx = follow_inputs(gm, expert_rule)
    grad_check = check_grad_copies(model, expert_fx, devices, inputs, leaves)
    grad_copies = args.grad_copies if grad_check.get("ok", True) else "autograd"
    barrier = "deferred" if grad_copies == "deferred" else "barrier"
    # The host model: this model's one-device launch costs, autograd's threads taking turns,
    # and the two-device factors of the calibration chain (none of these placements).
    pair = chain_timings(calib, name)
    hosts = {
        "one-gpu": fit_host_model(timing, grad_copies=barrier),
        "full": fit_host_model(timing, pair, backward_threads="shared", grad_copies=barrier),
    }
    host = hosts["full"]
    # Copies slow compute on both of their devices (measured once per run).
    loaded = dataclasses.replace(cluster, copy_slowdown=calib["copy_slowdown"])
    output = model_output(gm)
    candidates = build_candidates(traced, graph, cluster, expert_fx, args.contention)
    if args.placements:
        candidates = {k: v for k, v in candidates.items() if k in args.placements}
    diagnose = name in (args.diagnose or [])
    rows, records = [], []
    # Every configuration's fixed part: its simulations, launch order and runtime caps.
    prepared: list[dict[str, Any]] = []
    for label, cand in candidates.items():
        rec: dict[str, Any] = {"model": name, "placement": label}
        if "error" in cand:
            rec["error"] = cand["error"]
            records.append(rec)
            continue
        gp = graph_placement(graph, cand["fx"])
        sims = {c: simulate(graph, gp, cluster, contention=c) for c in ("shared", "link", "none")}
        # Launch order: the plan's, else the simulated one of this placement (fx order would
        # queue ops on a device's stream, and rank them for autograd's backward, unlike the
        # simulation).
        order = cand.get("order") or sims[args.contention].launch_order()
        headroom = int(args.headroom_gib * GIB)
        caps = (
            None
            if cand.get("uncapped")
            else runtime_caps(traced.specs, cand["fx"], cand.get("cap", cap), headroom, 2, output)
        )
        prepared.append(
            {"rec": rec, "cand": cand, "gp": gp, "sims": sims, "order": order, "caps": caps}
        )
        records.append(rec)
    # Interleaved rounds: every configuration is measured once per round (each round starting
    # one configuration later), so a drift of the host's speed over the run reaches all of
    # them alike; the chain is re-timed right before each measurement.
    for r in range(args.rounds):
        k = r % max(len(prepared), 1)
        for p in prepared[k:] + prepared[:k]:
            if p.get("failed"):
                continue
            cand = p["cand"]
            # The host's speed right before this measurement (the chain, not this placement).
            now = chain_now(devices, args.quick, chain_kind, args.chain_steps)
            last = r == args.rounds - 1
            used = p.get("grad_copies", grad_copies)
            for mode in dict.fromkeys([used, "autograd"]):
                used = mode
                meas = measure_step(
                    model,
                    cand["fx"],
                    devices,
                    inputs,
                    args.steps,
                    args.warmup,
                    leaves,
                    p["order"],
                    cap_bytes=p["caps"],
                    grad_copies=mode,
                    diagnose=diagnose and last,
                    clocks=last,
                )
                # An error other than running out of memory under deferred gradient copies:
                # retry with autograd's copies (and replay those) rather than lose it.
                if meas["step_s"] is not None or meas.get("error_kind") == "OOM":
                    break
            p["grad_copies"] = used
            p.setdefault("rounds", []).append((meas, now))
            if meas["step_s"] is None and len(p["rounds"]) == 1:
                p["failed"] = True  # the first round failed: no point in repeating it
    for p in prepared:
        rec, cand, gp, sims, order = (p[k] for k in ("rec", "cand", "gp", "sims", "order"))
        label = rec["placement"]
        used = p.get("grad_copies", grad_copies)
        used_barrier = "deferred" if used == "deferred" else "barrier"
        meas, rounds = merge_rounds([m for m, _ in p.get("rounds", [])])
        # What the earlier executor (copies at first use, fx order) would take: a reference
        # for measurements made with it.
        earlier = HostModel(
            host.forward_s, host.backward_s, copies="first-use", grad_copies="barrier"
        )
        sim_earlier = simulate(graph, gp, cluster, host=earlier, order=cand.get("order"))
        est_peak = max(sims[args.contention].peak_memory)
        # The executor replay (its host launches, streams, autograd's backward order) with
        # the gradient copies used (a configuration retried with autograd's is replayed so),
        # the host calibrated once per model or re-timed right before each round: then the
        # median over the rounds, as the measurement is.
        once = replace_host(host, used_barrier)
        drifts = [
            once
            if chain_ref is None or now is None
            else host_at(timing, chain_ref, now, used_barrier, calibration=pair)
            for _, now in p.get("rounds", [])
        ] or [once]
        now_s = [simulate(graph, gp, loaded, host=h, order=order).makespan for h in drifts]
        replay = _median(now_s) if args.host_model == "now" else None
        sim_host = simulate(
            graph,
            gp,
            loaded,
            contention=args.contention,
            host=drifts[now_s.index(replay)] if replay is not None else once,
            order=order,
        )
        terms = replay_terms(graph, gp, (cluster, loaded), hosts, order, meas, used_barrier)
        terms["+ host speed now"] = _median(now_s)
        per_op = [per_op_makespan(graph, gp, loaded, h, order, host_costs) for h in drifts]
        if per_op and all(x is not None for x in per_op):
            terms["+ per-op host costs"] = _median(per_op)
        fid = {c: _rel_err(s.makespan, meas["step_s"]) for c, s in sims.items()}
        fid_host = _rel_err(sim_host.makespan, meas["step_s"])
        chains = [now for _, now in p.get("rounds", [])]
        rec.update(
            devices_used=sorted(set(cand["fx"].values())),
            launch_order="plan" if cand.get("order") else "simulated",
            grad_copies=used,
            placement_s=cand.get("placement_s"),
            estimated_peak_gib=est_peak / GIB,
            fits_cap=est_peak <= cap,
            simulated_s={c: s.makespan for c, s in sims.items()},
            fidelity=fid,
            simulated_host_s=sim_host.makespan,
            simulated_earlier_executor_s=sim_earlier.makespan,
            fidelity_host=fid_host,
            replay_terms_s=terms,
            host_chain_us=chain_record(chain_ref, chains),
            replay_terms_fidelity={k: _rel_err(v, meas["step_s"]) for k, v in terms.items()},
            simulated_host_phases_s={
                "forward": sim_host.extra["host_forward_s"],
                "backward": sim_host.extra["host_backward_s"],
                "optimizer": sim_host.extra["host_optimizer_s"],
            },
            simulated_phases_ms=[
                {k.removesuffix("_s") + "_ms": v * 1e3 for k, v in row.items()}
                for row in sim_host.phases()
            ],
            rounds=[{**x, "simulated_host_now_s": t} for x, t in zip(rounds, now_s, strict=False)],
            **meas,
        )
    for rec in records:
        label = rec["placement"]
        if "error" in rec and "step_s" not in rec:
            rows.append([name, label, "-", "-", "-", "-", "-", "-", "-", rec["error"][:40]])
            continue
        sim = rec["simulated_s"][args.contention]
        rows.append(
            [
                name,
                label,
                len(rec["devices_used"]),
                "yes" if rec["fits_cap"] else "no",
                f"{rec['step_s'] * 1e3:.2f}" if rec["step_s"] else rec["error_kind"],
                f"{sim * 1e3:.2f}",
                _pct(rec["fidelity"][args.contention], sign=False),
                f"{rec['simulated_host_s'] * 1e3:.2f}",
                _pct(rec["fidelity_host"], sign=False),
                f"{rec['placement_s']:.3f}" if rec.get("placement_s") is not None else "-",
            ]
        )
    info = {
        "model": name,
        "batch": int(inputs[0].shape[0]),
        "summary": compare(records),
        "profile_s": profile_s,
        "graph_nodes": len(graph),
        # The profile itself, so any placement can be replayed offline: trace the same model
        # on ``meta`` and give its graph these node times.
        "node_seconds": dict(zip(graph.names, map(float, graph.compute))),
        "cap_gib": cap / GIB,
        "host_model": dataclasses.asdict(host),
        "host_timing_one_device": dataclasses.asdict(timing),
        # Per-op host ms on one device (forward launches, backward tasks): the replay's
        # per-op weights (``placement_replay.py``, ``+ per-op host costs``).
        "host_costs_one_device": host_costs,
        "grad_copies": grad_copies,
        "grad_copies_check": grad_check,
        "single_device_estimate_gib": single_est / GIB,
        "records": records,
        "simulated_clusters": simulated_clusters(graph, comm, single_est, args.contention),
    }
    return rows, info


def compare(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets: best of m-ETF/m-SCT vs the expert split (within 5%?) and vs the
    sequential fill (ahead?), and the worst simulator error under the default contention."""
    step = {r["placement"]: r.get("step_s") for r in records}
    ours = [step[a] for a in ("m-etf", "m-sct") if step.get(a)]
    best = min(ours) if ours else None
    out: dict[str, Any] = {"best_baechi_s": best}
    for ref in ("expert", "sequential-fill", "equal-pipeline", "single (uncapped)"):
        if best and step.get(ref):
            out[f"vs_{ref}"] = best / step[ref] - 1
    errs = [
        r["fidelity"][k]
        for r in records
        for k in ("shared",)
        if r.get("fidelity") and r["fidelity"].get(k) is not None
    ]
    same = [step[f"{a} @expert mem"] for a in ("m-etf", "m-sct") if step.get(f"{a} @expert mem")]
    if same and step.get("expert"):
        out["vs_expert_same_memory"] = min(same) / step["expert"] - 1
    refined = [step[f"{a}+refine"] for a in REFINED if step.get(f"{a}+refine")]
    if refined:
        out["best_refined_s"] = min(refined)
        for ref in ("expert", "sequential-fill"):
            if step.get(ref):
                out[f"refined_vs_{ref}"] = min(refined) / step[ref] - 1
    out["max_fidelity_error"] = max(errs) if errs else None
    errs = [r["fidelity_host"] for r in records if r.get("fidelity_host") is not None]
    out["max_fidelity_error_host"] = max(errs) if errs else None
    return out


def _rel_err(simulated: float, measured: float | None) -> float | None:
    return abs(simulated - measured) / measured if measured else None


def single_device_memory(graph, comm) -> int:
    """The placers' (no-free) memory estimate of the whole training step on one device."""
    return simulate(
        graph, [0] * len(graph), Cluster([10**15], comm), release_memory=False
    ).peak_memory[0]


def forcing_cap(graph, single_est: int, n: int, fraction: float) -> int:
    """A per-device cap of ``fraction * 2 / n`` of the one-device need (2 devices: fraction),
    raised to 1.3x the largest colocation unit so that every op still fits somewhere."""
    largest = max(peak for _, _, peak in group_units(graph))
    return int(max(fraction * 2 / n * single_est, 1.3 * largest))


def simulated_clusters(graph, comm, single_est: int, contention: str) -> list[dict[str, Any]]:
    """The same profiled graph on 4 and 8 simulated devices with caps that force a spread."""
    out = []
    for n in (4, 8):
        cap = forcing_cap(graph, single_est, n, 0.75)
        cluster = Cluster([cap] * n, comm, contention=contention)
        # m-SCT with theta = 0.1 (the TF reference's default) next to the default 0.5.
        variants = [(a, {}) for a in ALGOS] + [("m-sct", {"theta": 0.1})]
        variants += [(a, {"refine": True}) for a in REFINED]
        for algo, options in variants:
            label = algo + "".join(
                " theta=0.1" if k == "theta" else "+refine" for k in sorted(options)
            )
            rec: dict[str, Any] = {"devices": n, "cap_gib": cap / GIB, "algorithm": label}
            try:
                plan = place_graph(graph, cluster, algo, **options)
                s = plan.summary()
                rec.update(
                    step_s=s["simulated_step_time_s"],
                    lower_bound_s=s["lower_bound_s"],
                    ratio=s["makespan_over_lower_bound"],
                    placement_s=plan.seconds,
                    devices_used=sum(1 for c in s["nodes_per_device"] if c),
                    lp_optimum_s=s.get("lp_optimum_s"),
                )
            except InfeasiblePlacementError as exc:
                rec["error"] = str(exc)
            out.append(rec)
    return out


def calibrate(devices, quick: bool, models: list[str]) -> dict[str, Any]:
    """The run's placement-independent calibrations: each needed calibration chain's host
    time on one and on two devices, and compute slowed by a concurrent copy."""
    chains: dict[str, Any] = {}
    for kind in dict.fromkeys(MODEL_CHAIN[m] for m in models):
        try:
            chains[kind] = chain = calibrate_multi_device(devices, 3 if quick else 20, quick, kind)
        except Exception as exc:  # without it the factors stay 1: report, do not stop
            traceback.clear_frames(exc.__traceback__)
            chains[kind] = {"error": error_text(exc)}
            print(f"{kind} calibration chain failed (factors 1): {chains[kind]['error']}")
            continue
        one, two = (chain["per_launch_us"][k] for k in CHAIN_PAIR)
        print(
            f"host per launch, {kind} calibration chain (forward / backward task): one device "
            f"{one[0]:.1f} / {one[1]:.1f} us, two devices {two[0]:.1f} / {two[1]:.1f} us"
        )
    src, dst = str(devices[0]), str(devices[1])
    small = {"elements": 2**14, "matmul_side": 64, "copy_elements": 2**16, "repeats": 3}
    try:
        samples = copy_contention(src, dst, **(small if quick else {}))
        slowdown = fit_copy_slowdown(samples)
    except Exception as exc:  # no contention term rather than no benchmark
        traceback.clear_frames(exc.__traceback__)
        print(f"copy contention measurement failed (copy_slowdown 0): {error_text(exc)}")
        samples, slowdown = [{"error": error_text(exc)}], 0.0
    else:
        print(
            "compute during a copy: "
            + ", ".join(
                f"{x['op']} on {x['side']} x{x['with_copy_s'] / x['alone_s']:.2f}" for x in samples
            )
            + f" -> copy_slowdown {slowdown:.3f}"
        )
    release_device_memory(devices)
    return {"chains": chains, "contention": samples, "copy_slowdown": slowdown}


def chain_timings(calib: dict[str, Any], model: str) -> tuple[HostTiming, HostTiming] | None:
    """The calibration chain's (one device, alternating) timings for ``model``, if measured."""
    chain = calib["chains"].get(MODEL_CHAIN[model], {})
    if "timings" not in chain:
        return None
    return chain["timings"][CHAIN_PAIR[0]], chain["timings"][CHAIN_PAIR[1]]


#: The executor replay's terms, in the order they are added (also read by placement_replay.py).
REPLAY_TERMS = [
    "one-GPU host",
    "+ shared backward threads",
    "+ optimizer host",
    "+ multi-device host",
    "+ copy contention",
    "+ host speed now",
    "+ per-op host costs",
    "own host rates",
]


def print_terms(infos: list[dict[str, Any]]) -> None:
    """The replay's step time as each model term is added, next to the measurement."""
    terms = REPLAY_TERMS
    rows = []
    for info in infos:
        for r in info["records"]:
            if not r.get("replay_terms_s") or not r.get("step_s"):
                continue
            m = r["step_s"]
            rows.append(
                [info["model"], r["placement"], f"{m * 1e3:.2f}"]
                + [
                    f"{r['replay_terms_s'][k] * 1e3:.2f} ({_pct(r['replay_terms_s'][k] / m - 1)})"
                    if k in r["replay_terms_s"]
                    else "-"
                    for k in terms
                ]
            )
    print_table(
        "Executor replay as each term is added, ms (error vs measured); the last column uses "
        "the configuration's own host times (diagnostic)",
        ["model", "placement", "measured", *terms],
        rows,
    )


def print_diagnosis(info: dict[str, Any]) -> None:
    """Per placement and device: measured vs simulated phase ends, busy times and copies;
    host phases; and the profiled kernel and copy milliseconds per phase."""
    rows = []
    for r in info["records"]:
        if not r.get("step_s"):
            continue
        ends = r.get("device_phase_end_ms") or {}
        prof = (r.get("profile") or {}).get("device_ms", {})
        for d, sim in enumerate(r["simulated_phases_ms"]):
            for phase in ("forward", "backward", "optimizer"):
                got = prof.get(f"{phase}/{d}", {})
                meas_end = ends.get(phase, [])
                rows.append(
                    [
                        r["placement"],
                        d,
                        phase,
                        _ms(meas_end[d] if d < len(meas_end) else None),
                        _ms(sim[f"{phase}_end_ms"]),
                        _ms(got.get("kernel")),
                        _ms(sim[f"{phase}_busy_ms"]),
                        _ms(got.get("copy")),
                        _ms(sim[f"{phase}_sent_ms"]),
                    ]
                )
        hs = r["simulated_host_phases_s"]
        rows.append(
            [
                r["placement"],
                "host",
                "fwd / bwd / opt",
                f"{r['host_forward_s'] * 1e3:.2f} / {r['host_backward_s'] * 1e3:.2f} / "
                f"{r['host_optimizer_s'] * 1e3:.2f}",
                f"{hs['forward'] * 1e3:.2f} / {hs['backward'] * 1e3:.2f} / "
                f"{hs['optimizer'] * 1e3:.2f}",
                "-",
                "-",
                "-",
                "-",
            ]
        )
    print_table(
        f"Diagnosis, {info['model']}: per device, when each phase ends and what it costs (ms)",
        [
            "placement",
            "device",
            "phase",
            "meas end",
            "sim end",
            "meas kernels",
            "sim busy",
            "meas copies sent",
            "sim copies sent",
        ],
        rows,
    )


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pct(x: float | None, sign: bool = True) -> str:
    return "-" if x is None else (f"{x:+.1%}" if sign else f"{x:.1%}")


def parse_batches(items: list[str]) -> dict[str, int]:
    """``["inception=64"]`` -> ``{"inception": 64}``, with a clear error on a bad item."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in MODELS or not value.isdigit() or int(value) < 1:
            raise SystemExit(
                f"--batch: expected MODEL=N with MODEL in {', '.join(MODELS)} and N >= 1, "
                f"got {item!r}"
            )
        out[name] = int(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models on CPU, 2 logical devices")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds: each configuration measured once per round, the median "
        "reported (default 3, quick 2)",
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps per round (default 7, quick 2)"
    )
    ap.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps per round (default 3, quick 1)"
    )
    ap.add_argument(
        "--chain-steps",
        type=int,
        default=None,
        help="steps per layout when the calibration chain is re-timed before a measurement "
        "(default 10, quick 2)",
    )
    ap.add_argument("--cap-fraction", type=float, default=0.65, help="cap / single-device need")
    ap.add_argument("--headroom-gib", type=float, default=2.0, help="runtime cap slack (GPU)")
    ap.add_argument("--contention", choices=["shared", "link", "none"], default="shared")
    ap.add_argument("--profile-repeats", type=int, default=5)
    ap.add_argument(
        "--grad-copies",
        choices=["deferred", "autograd"],
        default="deferred",
        help="how PlacedModule sends gradients between GPUs",
    )
    ap.add_argument(
        "--diagnose",
        nargs="+",
        default=None,
        choices=list(MODELS),
        metavar="MODEL",
        help="also profile one step of each placement of MODEL (per phase and device kernel "
        "and copy time, every launch's host time) and print measured vs simulated per phase; "
        "runs only MODEL unless --models is given",
    )
    ap.add_argument(
        "--placements", nargs="+", default=None, help="run only these placements (labels)"
    )
    ap.add_argument(
        "--host-model",
        choices=["run", "now"],
        default="now",
        help="sim+host's host costs: re-timed on the calibration chain right before each "
        "configuration (now, default: the host's speed drifts during a run) or calibrated "
        "once per model (run)",
    )
    ap.add_argument(
        "--batch",
        nargs="+",
        default=[],
        metavar="MODEL=N",
        help=f"a model's batch (default: branches 1024, transformer 128, inception "
        f"{INCEPTION_BATCH}; --quick: smaller)",
    )
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/)")
    args = ap.parse_args()
    args.batch = parse_batches(args.batch)
    if args.diagnose and "--models" not in sys.argv:
        args.models = list(args.diagnose)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.quick and gpus < 2:
        print("fewer than 2 GPUs: running --quick on CPU logical devices instead")
        args.quick = True
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.steps = args.steps or (2 if args.quick else 7)
    args.warmup = args.warmup or (1 if args.quick else 3)
    args.chain_steps = args.chain_steps or (2 if args.quick else 10)
    if min(args.rounds, args.steps, args.warmup, args.chain_steps) < 1:
        raise ValueError("--rounds, --steps, --warmup and --chain-steps must be >= 1")
    if args.quick:
        # One thread: both logical devices share the host cores anyway, and OpenMP barriers
        # on a busy host cost more than the tiny ops themselves.
        torch.set_num_threads(1)
        devices = [torch.device("cpu"), torch.device("cpu")]
        sweep = transfer_sweep("cpu", "cpu", max_log2_elements=18, repeats=5)
    else:
        devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
        sweep = transfer_sweep("cuda:0", "cuda:1", max_log2_elements=26, repeats=10)
    comm = fit_comm_cost(sweep)
    print(f"copy cost fit: {comm.latency_s * 1e6:.1f} us + bytes / {comm.bandwidth / 1e9:.2f} GB/s")
    # What a strided tensor (a channel-cat gradient slice) costs when sent as it is: PlacedModule
    # makes such tensors dense first, so the simulator uses the contiguous fit above.
    strided = fit_comm_cost(
        transfer_sweep(
            str(devices[0]),
            str(devices[1]),
            max_log2_elements=12 if args.quick else 26,
            repeats=3 if args.quick else 10,
            strided=True,
        )
    )
    print(
        f"strided copy cost fit (not used; tensors are sent dense): "
        f"{strided.latency_s * 1e6:.1f} us + bytes / {strided.bandwidth / 1e9:.2f} GB/s"
    )
    calib = calibrate(devices, args.quick, args.models)
    t0 = time.perf_counter()
    all_rows, infos = [], []
    for name in args.models:
        rows, info = run_model(name, args, devices, comm, calib)
        all_rows += rows
        infos.append(info)
        print(
            f"{name}: done in {time.perf_counter() - t0:.0f} s "
            f"(profiling {info['profile_s']:.1f} s); host launch per op: forward "
            f"{info['host_model']['forward_s'] * 1e6:.1f} us, "
            f"backward {info['host_model']['backward_s'] * 1e6:.1f} us "
            f"(+ {info['host_model']['extra_forward_s'] * 1e6:.1f} / "
            f"{info['host_model']['extra_backward_s'] * 1e6:.1f} us on two devices)"
        )
    print_table(
        "Training step on 2 devices under a memory cap (measured vs simulated)",
        [
            "model",
            "placement",
            "devs",
            "fits cap",
            "measured ms",
            "simulated ms",
            "|sim-meas|/meas",
            "sim+host ms",
            "|sim+host-meas|/meas",
            "place s",
        ],
        all_rows,
    )
    print_table(
        "Copies and allocator events per step (GPU; a retry or cudaMalloc stalls the host)",
        ["model", "placement", "copies", "copy MiB", "peak reserved GiB", "retries", "mallocs"],
        [
            [
                info["model"],
                r["placement"],
                r.get("copies_per_forward", "-"),
                f"{r['copy_mib_per_forward']:.1f}" if "copy_mib_per_forward" in r else "-",
                "/".join(f"{x:.1f}" for x in r.get("peak_reserved_gib", [])) or "-",
                "/".join(f"{x:g}" for x in r.get("num_alloc_retries_per_step", [])) or "-",
                "/".join(f"{x:g}" for x in r.get("num_device_alloc_per_step", [])) or "-",
            ]
            for info in infos
            for r in info["records"]
        ],
    )
    print_terms(infos)
    for info in infos:
        if info["model"] in (args.diagnose or []):
            print_diagnosis(info)
    for info in infos:  # the full text of each failure (the table shows its kind only)
        for r in info["records"]:
            if r.get("error"):
                print(f"{info['model']} / {r['placement']}: {r['error']}")
    cluster_rows = [
        [
            info["model"],
            r["devices"],
            r["algorithm"],
            f"{r['step_s'] * 1e3:.2f}" if "step_s" in r else r["error"][:50],
            f"{r['ratio']:.2f}" if "ratio" in r else "-",
            r.get("devices_used", "-"),
            f"{r['placement_s']:.3f}" if "placement_s" in r else "-",
        ]
        for info in infos
        for r in info["simulated_clusters"]
    ]
    print_table(
        "Simulated 4- and 8-device clusters (same profiled graphs)",
        ["model", "devices", "algorithm", "sim step ms", "step / LB", "devs used", "place s"],
        cluster_rows,
    )
    summary_rows = [
        [
            info["model"],
            _pct(info["summary"].get("vs_expert")),
            _pct(info["summary"].get("vs_expert_same_memory")),
            _pct(info["summary"].get("refined_vs_expert")),
            _pct(info["summary"].get("vs_sequential-fill")),
            _pct(info["summary"].get("refined_vs_sequential-fill")),
            _pct(info["summary"].get("vs_equal-pipeline")),
            _pct(info["summary"].get("vs_single (uncapped)")),
            _pct(info["summary"].get("max_fidelity_error"), sign=False),
            _pct(info["summary"].get("max_fidelity_error_host"), sign=False),
        ]
        for info in infos
    ]
    print_table(
        "Best of m-ETF/m-SCT (and of their +refine plans) vs baselines (negative = faster); "
        "worst simulator error",
        [
            "model",
            "vs expert",
            "vs expert, its memory",
            "+refine vs expert",
            "vs seq. fill",
            "+refine vs seq. fill",
            "vs pipeline",
            "vs single",
            "max |sim-meas|",
            "max, with host",
        ],
        summary_rows,
    )
    path = save_results(
        "placement_gpu",
        {
            "mode": "quick-cpu" if args.quick else "gpu",
            "comm_fit": {"latency_s": comm.latency_s, "bandwidth_Bps": comm.bandwidth},
            "comm_fit_strided": {
                "latency_s": strided.latency_s,
                "bandwidth_Bps": strided.bandwidth,
            },
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "host_calibration": {
                kind: {
                    "per_launch_us": c["per_launch_us"],
                    "timings": {k: dataclasses.asdict(t) for k, t in c["timings"].items()},
                }
                if "timings" in c
                else c
                for kind, c in calib["chains"].items()
            },
            "copy_contention": calib["contention"],
            "copy_slowdown": calib["copy_slowdown"],
            "models": infos,
            "total_s": time.perf_counter() - t0,
        },
        args.out,
    )
    print(f"\nwrote {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
