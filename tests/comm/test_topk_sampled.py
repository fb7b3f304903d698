"""Sampled-threshold top-k (scaledl.comm.topk_sampled): the plan's numbers, the selection
against torch.topk in Triton's interpreter (CPU) and on CUDA, failures counted and harmless."""

import math
import subprocess
import sys

import pytest
import torch

from scaledl.comm import topk_sampled as ts
from scaledl.comm.compressors import TopKCompressor
from tests.comm.test_onebit_triton import ROOT, _interpreter_env, needs_triton


def test_plan_numbers_by_hand():
    d, k = 6_553_600, 65_536  # a 25 MB bucket at 1%
    s, r, cap = ts.plan(d, k)
    assert s == 1024 * 100  # SAMPLE_HITS * d / k
    mu = 1024.0
    assert r == math.ceil(mu + 6 * math.sqrt(mu)) == 1216
    assert cap == math.ceil(d * (1216 + 6 * math.sqrt(1216)) / s) + ts.BLOCK
    assert k < d * r / s < cap < 2 * k  # the expected candidates lie inside the slots
    assert ts.plan(600_000, 600) is None  # the sample would be most of the row
    assert ts.plan(10, 0) is None


def test_selection_option_errors():
    with pytest.raises(ValueError, match="selection must be"):
        TopKCompressor(0.01, selection="fast")
    if ts.triton is not None:
        with pytest.raises(ValueError, match="exclusive"):
            TopKCompressor(0.01, chunk=64, selection="sampled")
        assert TopKCompressor(0.01).selection == "sampled"  # auto with triton
    assert TopKCompressor(0.01, chunk=64).selection == "exact"
    assert "selection='exact'" in repr(TopKCompressor(0.01, selection="exact"))


def test_sampled_selection_without_kernels_is_torch_topk():
    # CPU tensors outside the interpreter: the exact selection, same payload as "exact"
    if ts.INTERPRETED or ts.triton is None:
        pytest.skip("needs triton defined for the device, not the interpreter")
    x = torch.randn(2, 500_000, generator=torch.Generator().manual_seed(1))
    a = TopKCompressor(0.01).compress_batch(x, [0, 1])
    b = TopKCompressor(0.01, selection="exact").compress_batch(x, [0, 1])
    assert torch.equal(a, b)


_SCRIPT = r"""
import torch
from scaledl.comm import topk_sampled as ts
from scaledl.comm.compressors import TopKCompressor
assert ts.INTERPRETED and ts.available(torch.device("cpu"))

def check(x, k, comp_exact, comp):
    keys = list(range(x.shape[0]))
    p = comp.compress_batch(x, keys)
    dec = comp.decompress_batch(p, x.shape[1], keys)
    want = comp_exact.decompress_batch(comp_exact.compress_batch(x, keys), x.shape[1], keys)
    assert torch.equal(dec, want), "decoded sampled top-k differs from torch.topk's"
    res = comp.residual_batch_(x.clone(), p, keys)
    assert torch.equal(res, x - dec), "residual is not input - decoded"
    return p

g = torch.Generator().manual_seed(0)
d = 600_000
x = torch.randn(3, d, generator=g)
x[1] *= torch.linspace(0, 50, d)  # a trend: large values at the end
x[2, 5000:] = 0  # fewer nonzeros (5000) than k (6000): all of them, padded with (0, 0.0)
comp, exact = TopKCompressor(0.01), TopKCompressor(0.01, selection="exact")
assert comp.selection == "sampled" and comp.decode_adds
k = comp.k(d)
idx, vals = ts.select(x, k, torch.Generator().manual_seed(3), torch.zeros((), dtype=torch.int64))
ref = torch.topk(x.abs(), k, dim=1).indices
for row in range(2):  # the same set as torch.topk, ascending
    assert torch.equal(idx[row], torch.sort(ref[row]).values)
    assert torch.equal(vals[row], x[row, idx[row]])
assert int((idx[2] == 0).sum()) == 1001  # 1000 padding entries and element 0 itself
assert torch.equal(torch.unique(idx[2]), torch.arange(5000))
assert int((vals[2] == 0).sum()) == 1000
p = check(x, k, exact, comp)
assert p.shape == (3, comp.payload_bytes(d))
assert comp.inexact_selections == 0

# a failed sample (threshold above the k-th largest): counted, still a valid message
ts.SAMPLE_HITS, ts.Z = 1024, -20.0
bad = TopKCompressor(0.01)
y = torch.randn(1, d, generator=g)
p = bad.compress_batch(y, [0])
assert bad.inexact_selections == 1
dec = bad.decompress_batch(p, d, [0])
sent = dec != 0
assert 0 < int(sent.sum()) < k
assert torch.equal(dec[sent], y[sent])  # what was sent is exact ...
assert y[sent].abs().min() > y[~sent].abs().max()  # ... and the largest of the row
assert torch.equal(bad.residual_batch_(y.clone(), p, [0]), y - dec)
print("sampled ok")
"""


@needs_triton
def test_sampled_selection_in_triton_interpreter():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=_interpreter_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0 and "sampled ok" in proc.stdout, proc.stderr[-3000:]


@needs_triton
def test_compaction_kernel_compiles_for_h100_without_a_gpu():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # internal API of this Triton version
        pytest.skip(f"Triton's ahead-of-time API is not importable: {exc}")
    if ts.INTERPRETED:
        pytest.skip("kernel defined for Triton's interpreter")
    signature = {"x": "*fp32", "thr": "*fp32", "count": "*i32", "out": "*i32"}
    signature.update({"d": "i32", "cap": "i32", "BLOCK": "constexpr"})
    src = ASTSource(fn=ts._compact_kernel, signature=signature, constexprs={"BLOCK": ts.BLOCK})
    compiled = ts.triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
    assert "atom.global" in compiled.asm["ptx"]  # one slot reservation per block


@pytest.mark.gpu
def test_sampled_equals_torch_topk_on_cuda():
    if not ts.available(torch.device("cuda")):
        pytest.skip("triton kernels unavailable on CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    for d, ratio in ((6_553_600, 0.01), (3_276_800, 0.01), (6_553_600, 0.001)):
        x = torch.randn(2, d, device="cuda", generator=g) * torch.rand(1, d, device="cuda")
        comp, exact = TopKCompressor(ratio), TopKCompressor(ratio, selection="exact")
        k = comp.k(d)
        assert ts.plan(d, k) is not None
        p = comp.compress_batch(x, [0, 1])
        want = exact.decompress_batch(exact.compress_batch(x, [0, 1]), d, [0, 1])
        assert torch.equal(comp.decompress_batch(p, d, [0, 1]), want)
        assert comp.inexact_selections == 0
