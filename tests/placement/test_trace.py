"""Tracing: shapes, bytes, parameters, FLOP-based costs, tied weights, error messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scaledl.placement import CommCost, Roofline, fit_comm_cost, trace, transfer_sweep
from scaledl.placement.cost_model import _sweep_tensor
from scaledl.placement.models import GPT2, GPT2Block, load_model

from .helpers import TinyMLP


def test_specs_record_bytes_params_and_roofline_costs() -> None:
    model = TinyMLP()
    x = torch.randn(4, 8)
    roof = Roofline(peak_flops=1e9, bandwidth=1e9, launch_overhead_s=1e-6)
    tm = trace(model, (x,), roofline=roof)
    spec = {s.name: s for s in tm.specs}
    assert list(spec) == ["x", "a", "relu", "b", "relu_1", "c"]
    a = spec["a"]
    assert a.inputs == ["x"]
    assert a.out_bytes == 4 * 16 * 4
    assert a.param_bytes == a.trainable_bytes == (8 * 16 + 16) * 4
    # Linear forward: 2 * batch * in * out FLOPs; the roofline takes the larger of both terms.
    flops = 2 * 4 * 8 * 16
    moved = x.numel() * 4 + a.out_bytes + a.param_bytes
    assert a.forward_s == pytest.approx(max(flops / 1e9, moved / 1e9) + 1e-6)
    # The first layer's input needs no gradient, so it saves nothing beyond its parameters;
    # ReLU saves its output for backward.
    assert a.saved_bytes == x.numel() * 4
    assert spec["relu"].saved_bytes == 4 * 16 * 4
    assert not spec["x"].needs_backward and spec["c"].needs_backward
    g = tm.op_graph()
    assert {"fwd:a", "bwd:a", "opt:a"} <= set(g.names)
    assert "bwd:x" not in g.index


def test_tied_weights_share_a_colocation_group_and_count_once() -> None:
    model = GPT2(layers=2, d=32, heads=4, vocab=100, max_len=16)
    tm = trace(model, (torch.randint(0, 100, (2, 16)),), leaf_modules=(GPT2Block,))
    spec = {s.name: s for s in tm.specs}
    assert spec["wte"].group is not None
    assert spec["wte_weight"].group == spec["wte"].group  # F.linear(x, wte.weight)
    assert spec["wte_weight"].param_bytes == 0  # counted once, by the embedding
    total = sum(s.param_bytes for s in tm.specs)
    assert total == sum(p.numel() * 4 for p in model.parameters())
    assert len([s for s in tm.specs if s.module and "blocks" in s.module]) == 2


def test_meta_device_tracing_of_a_large_model_allocates_nothing() -> None:
    case = load_model("gpt2-medium", batch=1, device="meta")
    tm = trace(case.model, case.inputs, leaf_modules=case.leaf_modules)
    params = sum(s.param_bytes for s in tm.specs)
    assert params == sum(p.numel() * 4 for p in case.model.parameters())
    assert 350e6 * 4 < params < 360e6 * 4  # GPT-2 medium, 355M parameters


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), _Branchy())

    def forward(self, x):
        return self.inner(x)


def test_untraceable_construct_names_the_module() -> None:
    with pytest.raises(ValueError, match=r"'inner\.1' \(_Branchy\)"):
        trace(_Outer(), (torch.randn(2, 4),))
    # Keeping it whole as a leaf makes it traceable.
    tm = trace(_Outer(), (torch.randn(2, 4),), leaf_modules=(_Branchy,))
    assert any(s.module == "inner.1" for s in tm.specs)
    with pytest.raises(ValueError, match="takes 1 inputs, got 2"):
        trace(_Outer(), (torch.randn(2, 4), torch.randn(2, 4)), leaf_modules=(_Branchy,))


def test_comm_fit_recovers_latency_and_bandwidth() -> None:
    truth = CommCost(latency_s=2e-5, seconds_per_byte=1 / 20e9)
    samples = [(4 * 2**k, truth(4 * 2**k)) for k in range(0, 25)]
    fit = fit_comm_cost(samples)
    assert fit.latency_s == pytest.approx(2e-5, rel=1e-3)
    assert fit.bandwidth == pytest.approx(20e9, rel=1e-3)
    measured = transfer_sweep("cpu", "cpu", max_log2_elements=10, repeats=2)
    assert len(measured) == 11 and all(t > 0 for _, t in measured)
    strided = transfer_sweep("cpu", "cpu", max_log2_elements=10, repeats=2, strided=True)
    assert [b for b, _ in strided] == [b for b, _ in measured] and all(t > 0 for _, t in strided)
    for k in (0, 3, 10):  # 2^k elements in a [:, 0] slice, as a channel-cat gradient is
        x = _sweep_tensor(k, "cpu", strided=True)
        assert x.numel() == 2**k and (k == 0 or not x.is_contiguous())
    with pytest.raises(ValueError, match="two"):
        fit_comm_cost(samples[:1])


def test_tracing_leaves_the_model_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, (torch.randn(2, 3, 8, 8),), profile=True, repeats=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_profiled_times_are_positive() -> None:
    tm = trace(TinyMLP(), (torch.randn(4, 8),), profile=True, repeats=2)
    assert all(s.forward_s > 0 for s in tm.specs if s.name != "x")
    assert all(s.backward_s > 0 for s in tm.specs if s.needs_backward)
