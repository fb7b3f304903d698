"""``scaledl demo`` for Baechi: fast placement, memory-safe plans, exact multi-device execution."""

from __future__ import annotations

import copy
import time

from scaledl.demo import DemoResult


def run_demo() -> DemoResult:
    """Place a 10k-node graph, a branchy model and a Transformer; run a placed GPT-2 on two
    logical devices and compare it with one device (about 10 s on two CPU cores)."""
    import torch

    from scaledl.placement import (
        GIB,
        Cluster,
        PlacedModule,
        layered_graph,
        m_etf,
        parallel_branches_graph,
        place,
        place_graph,
    )
    from scaledl.placement.cost_model import NVLINK_COMM, ROOFLINES
    from scaledl.placement.models import GPT2, GPT2Block, load_model
    from scaledl.placement.trace import trace

    figures: dict = {}
    ok = True
    # 1. Planning speed on a 10k-node graph.
    g = layered_graph(10_000, seed=0)
    t0 = time.perf_counter()
    res = m_etf(g, Cluster.uniform(4, int(g.permanent.sum()) // 2))
    figures["m_etf_10k_nodes_s"] = round(time.perf_counter() - t0, 3)
    ok &= res.fits
    # 2. Parallel branches: m-ETF / m-SCT spread them, m-TOPO does not schedule.
    pb = parallel_branches_graph(4, 8)
    cluster = Cluster.uniform(4, GIB, comm=NVLINK_COMM)
    spans = {a: place_graph(pb, cluster, a).replay().makespan for a in ("m-topo", "m-etf", "m-sct")}
    figures["branches_step_ms"] = {a: round(s * 1e3, 3) for a, s in spans.items()}
    ok &= max(spans["m-etf"], spans["m-sct"]) <= spans["m-topo"] + 1e-12
    # 3. The 6+6 Transformer training step on 2 x 2 GiB (H100 roofline), planned on `meta`.
    case = load_model("transformer", batch=64, device="meta")
    traced = trace(case.model, case.inputs, roofline=ROOFLINES["h100"])
    plan = place_graph(traced.op_graph(), Cluster.uniform(2, 2 * GIB, comm=NVLINK_COMM), "m-sct")
    s = plan.summary()
    figures["transformer_m_sct"] = {
        k: s[k]
        for k in ("placement_seconds", "simulated_step_time_s", "lower_bound_s", "peak_memory_gib")
    }
    ok &= s["fits"] and max(s["peak_memory_gib"]) <= 2
    # 4. Execution: a placed GPT-2 (tied embeddings) equals one device, outputs and gradients.
    torch.manual_seed(0)
    model = GPT2(4, 64, 4, vocab=256, max_len=32)
    ids = torch.randint(0, 256, (4, 32))
    gp = place(model, (ids,), devices=2, memory_gib=0.004, leaf_modules=(GPT2Block,))
    placed = PlacedModule(copy.deepcopy(model), gp, ["cpu", "cpu"])
    ref = model(ids)
    out = placed(ids)
    ref.square().mean().backward()
    out.square().mean().backward()
    grads = dict(placed.gm.named_parameters())
    diff = max(
        float((ref - out).detach().abs().max()),
        max(float((p.grad - grads[k].grad).abs().max()) for k, p in model.named_parameters()),
    )
    figures["gpt2_devices_used"] = len(set(gp.fx_placement().values()))
    figures["gpt2_copies_per_forward"] = placed.copies
    figures["gpt2_max_abs_diff"] = diff
    ok &= diff < 1e-5 and figures["gpt2_devices_used"] == 2
    headline = (
        f"m-ETF placed 10k nodes in {figures['m_etf_10k_nodes_s']:.2f} s; Transformer 6+6 on "
        f"2x2 GiB: {s['simulated_step_time_s'] * 1e3:.1f} ms simulated vs "
        f"{s['lower_bound_s'] * 1e3:.1f} ms bound; GPT-2 on 2 devices = 1 device "
        f"(max diff {diff:.1e})"
    )
    return DemoResult(headline=headline, figures=figures, ok=bool(ok))
