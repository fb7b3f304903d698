"""Triton radix-select top-k (scaledl.comm.topk_triton) against torch.topk: in Triton's
interpreter on CPU (in CI), compiled for an H100 without a GPU, and on CUDA."""

import subprocess
import sys

import pytest
import torch

from scaledl.comm import topk_triton as tt
from scaledl.comm.compressors import TopKCompressor
from tests.comm.test_onebit_triton import ROOT, _interpreter_env, needs_triton


def test_blocks_cover_the_row_with_at_most_max_programs():
    assert tt.blocks(65_536) == (4096, 16)
    per, n = tt.blocks(6_553_600)  # a 25 MB bucket
    assert (per, n) == (32_768, 200) and per * n >= 6_553_600
    per, n = tt.blocks(2**28)
    assert n == tt.MAX_BLOCKS and per == 2**20


def test_selection_option():
    with pytest.raises(ValueError, match="selection must be"):
        TopKCompressor(0.01, selection="fast")
    assert TopKCompressor(0.01, chunk=64).selection == "exact"
    assert "selection='exact'" in repr(TopKCompressor(0.01, selection="exact"))
    if tt.triton is not None:
        with pytest.raises(ValueError, match="exclusive"):
            TopKCompressor(0.01, chunk=64, selection="triton")
        assert TopKCompressor(0.01).selection == "triton"  # auto where triton is installed


def test_without_kernels_the_payload_is_torch_topk():
    # CPU tensors outside the interpreter, or rows below MIN_ELEMENTS: torch.topk
    x = torch.randn(2, 70_000, generator=torch.Generator().manual_seed(1))
    small = torch.randn(2, 1000, generator=torch.Generator().manual_seed(2))
    for t in ([x] if not tt.INTERPRETED else []) + [small]:
        a = TopKCompressor(0.01).compress_batch(t, [0, 1])
        b = TopKCompressor(0.01, selection="exact").compress_batch(t, [0, 1])
        assert torch.equal(a, b)


_SCRIPT = r"""
import torch
from scaledl.comm import topk_triton as tt
from scaledl.comm.compressors import TopKCompressor
assert tt.INTERPRETED and tt.available(torch.device("cpu"))
g = torch.Generator().manual_seed(0)
d, k = 70_000, 700
x = torch.randn(3, d, generator=g)
x[1] *= torch.linspace(0, 50, d)  # a trend: the largest values at the end
x[2] = torch.randint(-400, 401, (d,), generator=g).float()  # many ties at the k-th magnitude
p = tt.topk_payload(x, k)
assert p.shape == (3, 8 * k) and p.dtype == torch.uint8
idx = p.view(torch.int32)[:, :k].long()
vals = p.view(torch.int32)[:, k:].view(torch.float32)
for row in range(3):
    a = x[row].abs()
    t = torch.topk(a, k).values[-1]  # the k-th largest magnitude
    above = torch.nonzero(a > t).flatten()
    ties = torch.nonzero(a == t).flatten()[: k - above.numel()]  # the lowest indices
    want = torch.sort(torch.cat([above, ties])).values
    assert torch.equal(idx[row], want), row
    assert torch.equal(vals[row], x[row, idx[row]]), row  # bit for bit
assert torch.unique(x[2].abs()[idx[2]]).numel() > 1 and ties.numel() > 0

# the compressor: same decode and residual as torch.topk where there are no ties
comp, exact = TopKCompressor(0.01), TopKCompressor(0.01, selection="exact")
y = x[:2].contiguous()
pa, pb = comp.compress_batch(y, [0, 1]), exact.compress_batch(y, [0, 1])
assert torch.equal(comp.decompress_batch(pa, d, [0, 1]), exact.decompress_batch(pb, d, [0, 1]))
res = comp.residual_batch_(y.clone(), pa, [0, 1])
assert torch.equal(res, y - comp.decompress_batch(pa, d, [0, 1]))
# NaN sorts above infinity, as in torch.topk; an all-zero row keeps its first k
z = torch.zeros(1, d)
z[0, 5], z[0, 9] = float("nan"), float("-inf")
iz = tt.topk_payload(z, k).view(torch.int32)[0, :k]
assert iz[:3].tolist() == [0, 1, 2] and {5, 9} <= set(iz.tolist()) and iz.max() == k - 1
print("triton topk ok")
"""


@needs_triton
def test_radix_select_in_triton_interpreter():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=_interpreter_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "triton topk ok" in proc.stdout, proc.stderr[-3000:]


@needs_triton
def test_kernels_compile_for_h100_without_a_gpu():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # internal API of this Triton version
        pytest.skip(f"Triton's ahead-of-time API is not importable: {exc}")
    if tt.INTERPRETED:
        pytest.skip("kernels defined for Triton's interpreter")
    i32, f32, c = "*i32", "*fp32", "constexpr"
    runtime = {"d": "i32", "k": "i32", "nblk": "i32"}
    kernels = [
        (tt._hist_kernel, {"x": f32, "hist": i32, "part": i32, **runtime, "LEVEL": c,
                           "BLOCK": c, "CHUNK": c},
         {"LEVEL": lv, "BLOCK": 32768, "CHUNK": tt.CHUNK})
        for lv in (1, 2, 3, 4, 5)
    ]  # fmt: skip
    kernels.append(
        (tt._count_kernel, {"hist": i32, "part": i32, "counts": i32, "k": "i32", "nblk": "i32"}, {})
    )
    kernels.append(
        (
            tt._write_kernel,
            {"x": f32, "hist": i32, "counts": i32, "out": i32, **runtime, "NBLK": c,
             "BLOCK": c, "CHUNK": c},
            {"NBLK": 256, "BLOCK": 32768, "CHUNK": tt.CHUNK},
        )
    )  # fmt: skip
    for kernel, signature, constexprs in kernels:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = tt.triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.fn.__name__


@pytest.mark.gpu
def test_triton_topk_equals_torch_topk_on_cuda():
    if not tt.available(torch.device("cuda")):
        pytest.skip("triton kernels unavailable on CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, d, ratio in ((1, 6_553_600, 0.01), (2, 3_276_800, 0.01), (1, 6_553_600, 0.001)):
        x = torch.randn(rows, d, device="cuda", generator=g) * torch.rand(1, d, device="cuda")
        comp, exact = TopKCompressor(ratio), TopKCompressor(ratio, selection="exact")
        keys = list(range(rows))
        p = comp.compress_batch(x, keys)
        assert torch.equal(p, comp.compress_batch(x, keys))  # deterministic bytes
        want = exact.decompress_batch(exact.compress_batch(x, keys), d, keys)
        assert torch.equal(comp.decompress_batch(p, d, keys), want)
