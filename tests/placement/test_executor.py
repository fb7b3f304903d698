"""PlacedModule: multi-device execution equals single-device outputs and gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import fx

from scaledl.placement import PlacedModule, place
from scaledl.placement.executor import _AwaitGrad, _DeviceCopy, _GradLink, dense_for_copy
from scaledl.placement.models import (
    GPT2,
    ConvBNReLU,
    GPT2Block,
    InceptionNet,
    MLPBlock,
    ParallelBranches,
    Seq2SeqTransformer,
)
from scaledl.placement.trace import symbolic_trace


def _cases():
    torch.manual_seed(0)
    yield "gpt2", GPT2(2, 32, 4, vocab=64, max_len=8), (torch.randint(0, 64, (2, 8)),), (GPT2Block,)
    yield "branches", ParallelBranches(3, 2, 16), (torch.randn(4, 16),), (MLPBlock,)
    yield (
        "seq2seq",
        Seq2SeqTransformer(vocab=50, d=16, heads=2, ff=32, layers=2),
        (torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 5))),
        (),
    )


def _expected_copies(gm: fx.GraphModule, mapping: dict[str, int], inputs) -> int:
    """One copy per tensor per (producer, other destination device) pair."""
    tensors: dict[str, int] = {}

    class Count(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            leaves = torch.utils._pytree.tree_leaves(value)
            tensors[n.name] = sum(isinstance(t, torch.Tensor) for t in leaves)
            return value

    Count(gm).run(*inputs)
    pairs = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        for a in n.all_input_nodes:
            if mapping[a.name] != mapping[n.name]:
                pairs.add((a.name, mapping[n.name]))
    return sum(tensors[a] for a, _ in pairs)


def _run(model, inputs):
    out = model(*inputs)
    (out.float() ** 2).mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("seed", [0, 1])
def test_random_placements_match_single_device(seed: int) -> None:
    for name, model, inputs, leaves in _cases():
        ref_out, ref_grads = _run(copy.deepcopy(model), inputs)
        gm = symbolic_trace(model, leaves)
        rng = np.random.default_rng(seed)
        mapping = {n.name: int(rng.integers(0, 3)) for n in gm.graph.nodes if n.op != "output"}
        # Tied weights must share a device: put the embedding's users together.
        for n in gm.graph.nodes:
            if n.op == "get_attr" and n.target == "wte.weight":
                mapping[n.name] = mapping["wte"]
        pm = PlacedModule(copy.deepcopy(model), mapping, ["cpu"] * 3, leaf_modules=leaves)
        out, _ = _run(pm, inputs)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6, msg=name)
        named = dict(pm.gm.named_parameters())
        assert set(named) == set(ref_grads), name
        for k, g in ref_grads.items():
            torch.testing.assert_close(named[k].grad, g, rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
        assert pm.copies == _expected_copies(gm, mapping, inputs), name
        groups = pm.param_groups_by_device()
        assert sum(len(g["params"]) for g in groups) == len(named)


def test_plan_from_place_runs_and_matches() -> None:
    torch.manual_seed(1)
    model = ParallelBranches(4, 2, 32)
    x = (torch.randn(8, 32),)
    plan = place(model, x, devices=2, memory_gib=0.0004, leaf_modules=(MLPBlock,))
    used = set(plan.fx_placement().values())
    assert used == {0, 1}  # the cap forces both devices
    ref_out, ref_grads = _run(copy.deepcopy(model), x)
    pm = PlacedModule(copy.deepcopy(model), plan, ["cpu", "cpu"])
    out, _ = _run(pm, x)
    torch.testing.assert_close(out, ref_out)
    for k, g in ref_grads.items():
        torch.testing.assert_close(dict(pm.gm.named_parameters())[k].grad, g)
    # Launch order is a topological order that follows the plan's simulated starts.
    order = [n.name for n in pm.order]
    pos = {n: i for i, n in enumerate(order)}
    for n in pm.order:
        for a in n.all_input_nodes:
            assert pos[a.name] < pos[n.name]


def test_bad_placements_are_rejected() -> None:
    model = ParallelBranches(2, 1, 8)
    gm = symbolic_trace(model)
    mapping = {n.name: 0 for n in gm.graph.nodes if n.op != "output"}
    with pytest.raises(ValueError, match="uses 3 devices"):
        PlacedModule(model, {**mapping, "inp": 2}, ["cpu", "cpu"])
    with pytest.raises(ValueError, match="no device for fx node"):
        PlacedModule(model, {k: v for k, v in mapping.items() if k != "inp"}, ["cpu"])
    with pytest.raises(ValueError, match="must be an int"):
        PlacedModule(model, {**mapping, "inp": -1}, ["cpu"])


def test_inputs_reach_their_placeholders_in_any_launch_order() -> None:
    torch.manual_seed(3)
    model = Seq2SeqTransformer(vocab=50, d=16, heads=2, ff=32, layers=1)
    inputs = (torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 5)))
    ref = model(*inputs)
    names = [n.name for n in symbolic_trace(model).graph.nodes if n.op != "output"]
    assert names[:2] == ["src", "tgt"]
    mapping = {n: i % 2 for i, n in enumerate(names)}
    order = ["tgt", *names[2:], "src"]  # the second input launches first
    pm = PlacedModule(copy.deepcopy(model), mapping, ["cpu", "cpu"], order=order)
    assert pm.order[0].name == "tgt"
    torch.testing.assert_close(pm(*inputs), ref)
    with pytest.raises(ValueError, match="missing input 'tgt'"):
        pm(inputs[0])
    with pytest.raises(ValueError, match="takes 2 inputs, got 3"):
        pm(*inputs, inputs[0])


def test_deferred_gradient_copy_is_an_exact_differentiable_copy() -> None:
    """The copy pair used between GPUs: forward copies, backward returns the gradient, and
    the copy is a tensor of its own (in-place use downstream is allowed)."""
    t = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    link = _GradLink()
    y = _DeviceCopy.apply(_AwaitGrad.apply(t, link), None, torch.device("cpu"), link, {}, 0)
    assert y.data_ptr() != t.data_ptr() and not y._is_view()
    torch.testing.assert_close(y, t)
    w = torch.randn(5, 3, dtype=torch.float64)
    (y.relu_() * w).sum().backward()
    torch.testing.assert_close(t.grad, w * (t.detach() > 0))
    assert link.event is None  # no GPU copy, nothing to wait for
    with pytest.raises(ValueError, match="grad_copies must be"):
        PlacedModule(ParallelBranches(2, 1, 8), {}, ["cpu"], grad_copies="now")


def test_cat_gradients_are_made_dense_before_crossing_devices() -> None:
    """The gradient reaching one input of a channel ``cat`` is a strided slice (PyTorch would
    copy it between GPUs with an elementwise kernel over the peer link); the copy path sends a
    dense equal copy instead, and dense tensors (also channels-last) go as they are."""
    parts = [torch.randn(4, c, 5, 5, requires_grad=True) for c in (3, 2)]
    seen = []
    for p in parts:
        p.register_hook(seen.append)
    w = torch.randn(4, 5, 5, 5)
    (torch.cat(parts, dim=1) * w).sum().backward()
    assert all(not g.is_contiguous() for g in seen)  # what the executor receives
    for g in seen:
        d = dense_for_copy(g)
        assert d.is_contiguous() and d.data_ptr() != g.data_ptr()
        torch.testing.assert_close(d, g, rtol=0, atol=0)
    dense = torch.randn(4, 3, 5, 5)
    assert dense_for_copy(dense) is dense
    cl = dense.to(memory_format=torch.channels_last)
    assert dense_for_copy(cl) is cl
    assert dense_for_copy(dense[:, :1]).is_contiguous()
    for one_block in (dense.transpose(0, 1), dense[:1], torch.randn(4, 3, 1, 1).transpose(0, 1)):
        assert dense_for_copy(one_block) is one_block
    for strided in (dense[::2], dense[:, :, :1], dense.transpose(0, 1)[:2]):
        assert dense_for_copy(strided) is not strided and dense_for_copy(strided).is_contiguous()


def test_host_clock_times_every_launch_in_order_only_when_asked() -> None:
    """``host_clock`` gives the host time of each node's launch (with its copies) in launch
    order; a slow module shows up as the slowest launch; without it nothing is recorded."""
    import time

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.02)
            return x * 2

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Slow(), torch.nn.Linear(4, 4))
    gm = symbolic_trace(model, (Slow,))
    mapping = {n.name: int(n.name == "_2") for n in gm.graph.nodes if n.op != "output"}
    pm = PlacedModule(copy.deepcopy(model), mapping, ["cpu", "cpu"], leaf_modules=(Slow,))
    pm(torch.randn(2, 4))
    assert pm.host_clock is None
    with pytest.raises(ValueError, match="host_clock"):
        pm.host_launch_seconds()
    pm.host_clock = []
    t0 = time.perf_counter()
    pm(torch.randn(2, 4))
    total = time.perf_counter() - t0
    spent = pm.host_launch_seconds()
    assert [name for name, _ in spent] == [n.name for n in pm.order]
    assert all(s >= 0 for _, s in spent) and sum(s for _, s in spent) <= total
    assert max(spent, key=lambda x: x[1])[0] == "_1" and dict(spent)["_1"] >= 0.02


def test_backward_clock_times_each_nodes_backward_on_its_thread() -> None:
    """``backward_clock`` stamps each node's backward start (after all its consumers');
    ``backward_host_seconds`` charges a node until the next start on its thread, so a slow
    backward is charged to its node and the charges add up to the backward's host time."""
    import time

    class SlowGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            time.sleep(0.02)
            return g

    class Slow(torch.nn.Module):
        def forward(self, x):
            return SlowGrad.apply(x)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Slow(), torch.nn.Linear(4, 4))
    gm = symbolic_trace(model, (Slow,))
    names = [n.name for n in gm.graph.nodes if n.op != "output"]
    pm = PlacedModule(copy.deepcopy(model), dict.fromkeys(names, 0), ["cpu"], leaf_modules=(Slow,))
    pm(torch.randn(2, 4)).sum().backward()
    assert pm.backward_clock is None
    with pytest.raises(ValueError, match="backward_clock"):
        pm.backward_host_seconds(0.0)
    pm.backward_clock = []
    loss = pm(torch.randn(2, 4)).sum()
    t0 = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    # The input needs no gradient: the three modules, last first (reverse topological order).
    assert [name for name, _, _ in pm.backward_clock] == ["_2", "_1", "_0"]
    assert len({thread for _, thread, _ in pm.backward_clock}) == 1
    spent = pm.backward_host_seconds(end)
    assert set(spent) == {"_0", "_1", "_2"} and min(spent.values()) >= 0
    assert spent["_1"] >= 0.02 > max(spent["_0"], spent["_2"])
    assert sum(spent.values()) <= end - t0


@pytest.mark.gpu
def test_inception_split_across_gpus_matches_single_device() -> None:
    """Branches of every block on both GPUs, so cat gradients cross devices as slices."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torch.manual_seed(0)
    model = InceptionNet(blocks=2, width=4, classes=10)
    x = (torch.randn(2, 3, 32, 32),)
    gm = symbolic_trace(model, (ConvBNReLU,))
    mapping = {
        n.name: int(".b3" in str(n.target) or ".b4" in str(n.target) or "cat" in n.name)
        for n in gm.graph.nodes
        if n.op != "output"
    }
    _check_on_two_gpus(model, mapping, x, (ConvBNReLU,), grad_rtol=1e-3, grad_atol=1e-4)


@pytest.mark.gpu
def test_two_gpus_match_single_device() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torch.manual_seed(0)
    model = ParallelBranches(4, 2, 64)
    x = (torch.randn(16, 64),)
    plan = place(model, x, devices=2, memory_gib=0.002, leaf_modules=(MLPBlock,))
    _check_on_two_gpus(model, plan, x, ())


def _check_on_two_gpus(model, placement, x, leaves, grad_rtol=1e-4, grad_atol=1e-5) -> None:
    """Both ``grad_copies`` modes on cuda:0/1 give the single-device outputs and gradients."""
    # The reference runs on the CPU in fp32: cuDNN's default TF32 convolutions would differ
    # from it by ~1e-3 relative whatever the placement, so compare in full fp32.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _compare_on_two_gpus(model, placement, x, leaves, grad_rtol, grad_atol)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _compare_on_two_gpus(model, placement, x, leaves, grad_rtol, grad_atol) -> None:
    ref_out, ref_grads = _run(copy.deepcopy(model), x)
    for mode in ("deferred", "autograd"):
        pm = PlacedModule(
            copy.deepcopy(model),
            placement,
            ["cuda:0", "cuda:1"],
            leaf_modules=leaves,
            grad_copies=mode,
        )
        assert pm.grad_copies == mode
        for _ in range(2):  # the second step reuses the copy streams and cached blocks
            pm.zero_grad(set_to_none=True)
            out, _ = _run(pm, tuple(t.cuda() for t in x))
        assert pm.copies > 0
        torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-4, atol=1e-5)
        params = dict(pm.gm.named_parameters())
        for k, g in ref_grads.items():
            torch.testing.assert_close(params[k].grad.cpu(), g, rtol=grad_rtol, atol=grad_atol)


def test_copies_are_issued_right_after_their_producer() -> None:
    """Each cross-device copy follows its producer's launch directly (not the consumer's), so
    on CUDA it waits only for work launched up to the producer; numerics stay exact."""
    torch.manual_seed(2)
    model = ParallelBranches(4, 2, 8)
    gm = symbolic_trace(model, (MLPBlock,))
    names = [n.name for n in gm.graph.nodes if n.op != "output"]
    # Expert-like split: branches 2 and 3 and the output layer on device 1.
    mapping = {n: int(n.startswith(("branches_2", "branches_3", "out"))) for n in names}
    pm = PlacedModule(copy.deepcopy(model), mapping, ["cpu", "cpu"], leaf_modules=(MLPBlock,))
    seq = pm.launch_sequence()
    runs = [s for s in seq if s[0] == "run"]
    assert [r[1] for r in runs] == [n.name for n in pm.order]
    for i, (kind, name, dst) in enumerate(seq):
        if kind == "copy":
            j = i - 1
            while seq[j][0] == "copy":  # several destinations follow one producer
                j -= 1
            assert seq[j][:2] == ("run", name) and mapping[name] != dst
    # ``inp`` feeds branches on both devices: its copy comes before branch 0 runs.
    assert seq.index(("copy", "inp", 1)) < seq.index(("run", "branches_0_0", 0))
    x = (torch.randn(4, 8),)
    ref_out, ref_grads = _run(copy.deepcopy(model), x)
    out, _ = _run(pm, x)
    torch.testing.assert_close(out, ref_out)
    assert pm.copies == _expected_copies(gm, mapping, x) == sum(s[0] == "copy" for s in seq)
    for k, g in ref_grads.items():
        torch.testing.assert_close(dict(pm.gm.named_parameters())[k].grad, g)
