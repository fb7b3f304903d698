"""LEMON primitives: fan-in splits, canceling columns, norm rules, depth plans, schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from scaledl.expansion import depth_plan, lemon_schedule
from scaledl.expansion.lemon import (
    cancel_cols,
    copy_counts,
    gather_rows,
    head_map,
    neuron_map,
    norm_expand,
    split_cols,
    stream_map,
)

widths = st.tuples(st.integers(1, 12), st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1]))


def _expand_input(x: torch.Tensor, index_map: torch.Tensor, residue: float = 0.0) -> torch.Tensor:
    out = x[..., index_map.clamp(min=0)].clone()
    out[..., index_map < 0] = residue
    return out


@settings(max_examples=40, deadline=None)
@given(widths, st.integers(1, 5), st.integers(0, 2**16))
def test_split_cols_reproduces_the_product_and_differs(sizes, rows, seed):
    src, tgt = sizes
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, src, generator=g, dtype=torch.float64)
    x = torch.randn(4, src, generator=g, dtype=torch.float64)
    for index_map in (stream_map(src, tgt), neuron_map(src, tgt)):
        rand = torch.randn(rows, tgt, generator=g, dtype=torch.float64)
        w2 = split_cols(w, index_map, rand)
        x2 = _expand_input(x, index_map)  # residue inputs are zero (norm outputs)
        torch.testing.assert_close(x2 @ w2.T, x @ w.T, rtol=0, atol=1e-12)
        # copies of one source column are unequal (symmetry broken) ...
        counts = copy_counts(index_map, src)
        if int(counts.max()) > 1:
            s = int(torch.argmax(counts))
            cols = w2[:, index_map == s]
            assert (cols[:, 0] - cols[:, 1]).abs().max() > 1e-6
        # ... while the symmetric (Net2Net) split makes them equal
        sym = split_cols(w, index_map, None)
        torch.testing.assert_close(x2 @ sym.T, x @ w.T, rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**16))
def test_cancel_cols_outputs_zero_for_copied_inputs(heads, mult, seed):
    g = torch.Generator().manual_seed(seed)
    hd = 3
    index_map = head_map(heads, heads * mult + (1 if mult > 1 else 0), hd)
    rand = torch.randn(5, index_map.numel(), generator=g, dtype=torch.float64)
    w = cancel_cols(index_map, rand)
    x = torch.randn(7, heads * hd, generator=g, dtype=torch.float64)
    assert (_expand_input(x, index_map) @ w.T).abs().max() < 1e-12
    if mult == 1:  # every unit has one copy: canceling reduces to zero outputs
        assert w.abs().max() == 0
    else:
        assert w.abs().max() > 1e-3


@settings(max_examples=40, deadline=None)
@given(widths, st.sampled_from(["ln", "rms"]), st.integers(0, 2**16))
def test_norm_rule_gives_zero_residue_norm_output(sizes, kind, seed):
    src, tgt = sizes
    if src < 2:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, src, generator=g, dtype=torch.float64) * 3 + 1
    gamma = torch.randn(src, generator=g, dtype=torch.float64)
    beta = torch.randn(src, generator=g, dtype=torch.float64)
    index_map = stream_map(src, tgt)
    c = (tgt // src) * src / tgt
    eps = 1e-5
    gw, gb = norm_expand(gamma, beta if kind == "ln" else None, index_map, g)
    if kind == "ln":
        ref = F.layer_norm(x, (src,), gamma, beta, eps)
        x2 = _expand_input(x, index_map, 0.0)
        x2[:, index_map < 0] = x.mean(-1, keepdim=True)  # LayerNorm stream: avg residues
        out = F.layer_norm(x2, (tgt,), gw, gb, eps * c)
    else:
        ref = gamma * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x2 = _expand_input(x, index_map, 0.0)  # RMSNorm stream: zero residues
        out = gw * x2 / torch.sqrt(x2.pow(2).mean(-1, keepdim=True) + eps * c)
    torch.testing.assert_close(out, _expand_input(ref, index_map), rtol=0, atol=1e-12)


def test_gather_rows_residues():
    w = torch.arange(6.0).reshape(3, 2)
    m = stream_map(3, 7)
    avg = gather_rows(w, m, 0, "avg")
    assert torch.equal(avg[:6], torch.cat([w, w]))
    assert torch.equal(avg[6], w.mean(0))
    assert gather_rows(w, m, 0, "zero")[6].abs().sum() == 0
    with pytest.raises(ValueError, match="residue"):
        gather_rows(w, m, 0, "mean")


def test_maps_and_depth_plan():
    assert stream_map(4, 10).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, -1, -1]
    assert head_map(2, 3, 2).tolist() == [0, 1, 2, 3, 0, 1]
    assert depth_plan(3, 6) == [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]
    plan = depth_plan(8, 12)
    assert [s for s, _ in plan[:4]] == [0, 1, 2, 3] and not any(n for _, n in plan[:4])
    assert plan[4:] == [(i, n) for i in range(4, 8) for n in (False, True)]
    with pytest.raises(ValueError, match="more than 2x"):
        depth_plan(3, 7)
    with pytest.raises(ValueError, match="smaller"):
        depth_plan(3, 2)


def test_lemon_schedule_warmup_peak_and_compressed_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = lemon_schedule(opt, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # same peak LR
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    decay = lrs[9:]
    assert all(a >= b for a, b in itertools.pairwise(decay))  # monotone after warm-up
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)
    with pytest.raises(ValueError, match="warmup_steps"):
        lemon_schedule(opt, 10, 10, 0.1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lemon_schedule(opt, 10, 1, 1.5)
