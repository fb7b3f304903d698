"""Fused codec kernels (scaledl.comm.fused): equal to the eager compressors' algebra, on CPU
(run eagerly) and compiled on CUDA; the fused hook equals the eager hook."""

import shutil
import warnings

import pytest
import torch
import torch.distributed as dist

from scaledl.comm import CompressionState, get_compressor
from scaledl.comm import fused as fk
from scaledl.comm.compressors import _view_as
from scaledl.comm.hooks import _prescaled
from tests.comm import test_hooks_dist as hd


def _grad_like(shape: tuple[int, ...], seed: int = 0, device: str = "cpu") -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    x.view(-1)[::7] = 0.0  # zeros (decode as +scale) and negative zeros
    x.view(-1)[3::11] = -0.0
    return x


# ------------------------------------------------------------------- the functions
def _check_prepare(device: str) -> None:
    for n in (1, 2, 4):
        for dtype in (torch.float32, torch.bfloat16):
            numel = 1003
            padded = -(-numel // n) * n + (8 if n == 4 else 0)
            src = _grad_like((numel,), n, device).to(dtype)
            err = _grad_like((padded,), 10 + n, device)
            got = fk.prepare(src, err, fk.exact_prescale(n))
            want = _prescaled(src, n, padded).add_(err)
            assert torch.equal(got, want), (n, dtype)
    assert fk.exact_prescale(3) is None and fk.exact_prescale(8) == 0.125


def _check_onebit(device: str) -> None:
    rows, length = 3, 37
    for scale in ("mean_abs", "l2_sqrt_d", "none"):
        comp = get_compressor("onebit", scale=scale)
        p = _grad_like((rows, length), 1, device)
        payload, res = fk.onebit_encode(comp, p)
        assert torch.equal(payload, comp.compress_batch(p, [0] * rows)), scale
        assert payload.shape[1] == comp.payload_bytes(length)
        decoded = comp.decompress_batch(payload, length, [0] * rows)
        assert torch.equal(res, p - decoded), scale
        payload2, none = fk.onebit_encode(comp, p, residual=False)
        assert none is None and torch.equal(payload2, payload)
        # decode straight into a (cut, lower-precision) bucket
        for dtype, numel in ((torch.float32, rows * length), (torch.bfloat16, rows * length - 5)):
            out = torch.full((numel,), 7.0, dtype=dtype, device=device)
            fk.onebit_decode_into(out, payload, length)
            assert torch.equal(out, decoded.reshape(-1)[:numel].to(dtype)), (scale, dtype)
    # the server: decode the ranks' payloads, sum, add the error
    comp = get_compressor("onebit")
    for n in (2, 3):
        payloads = comp.compress_batch(_grad_like((n, length), 2, device), [0] * n)
        err = _grad_like((length,), 3, device)
        got = fk.onebit_server_sum(payloads, length, err)
        want = comp.decompress_batch(payloads, length, [0] * n).sum(0) + err
        if n == 2:  # one addition per element: the eager sum exactly
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not hold"):
        fk.onebit_server_sum(payloads, length + 9, err)


def _scales(payloads: torch.Tensor) -> torch.Tensor:
    return _view_as(payloads[:, :4], torch.float32)


def _check_onebit_feedback(device: str) -> None:
    """The two-pass error-fed steps: same signs and format, scales within rounding."""
    for length in (37, 40):  # partial and whole bytes (separate kernels)
        _check_onebit_feedback_length(device, length)


def _check_onebit_feedback_length(device: str, length: int) -> None:
    rows, numel = 2, 2 * length - 3  # the last row is cut: 3 padding elements
    for scale in ("mean_abs", "l2_sqrt_d", "none"):
        comp = get_compressor("onebit", scale=scale)
        src, err = _grad_like((numel,), 6, device), _grad_like((rows * length,), 7, device)
        payload, res = fk.onebit_encode_with_feedback(comp, src, err, 0.5, rows)
        p = (_prescaled(src, 2, rows * length) + err).view(rows, length)
        want = comp.compress_batch(p, [0] * rows)
        assert payload.shape == want.shape and torch.equal(payload[:, 4:], want[:, 4:]), scale
        torch.testing.assert_close(_scales(payload), _scales(want), rtol=1e-6, atol=0)
        assert torch.equal(res, p - comp.decompress_batch(payload, length, [0] * rows)), scale
        # the server: decode the ranks' payloads, sum, zero the padding, add the error
        valid = 30
        s = comp.decompress_batch(want, length, [0] * rows).sum(0)
        s[valid:] = 0.0
        p_s = (s + err[:length]).view(1, -1)
        got, res_s = fk.onebit_server(comp, want, length, err[:length], valid)
        want_s = comp.compress_batch(p_s, [0])
        assert torch.equal(got[:, 4:], want_s[:, 4:]), scale
        torch.testing.assert_close(_scales(got), _scales(want_s), rtol=1e-6, atol=0)
        assert torch.equal(res_s, (p_s - comp.decompress_batch(got, length, [0])).view(-1))
    with pytest.raises(ValueError, match="padded rows"):
        fk.onebit_encode_with_feedback(comp, src, err[:-1], 0.5, rows)


def _check_cast(device: str) -> None:
    for name in ("fp16", "bf16"):
        comp = get_compressor(name)
        src, err = _grad_like((101,), 8, device), _grad_like((104,), 9, device)
        payload, res = fk.cast_encode_with_feedback(comp, src, err, 0.25)
        p = _prescaled(src, 4, 104) + err
        assert torch.equal(payload, comp.compress(p)), name
        assert torch.equal(res, p - comp.decompress(payload, 104)), name


def _check_scatter(device: str) -> None:
    rows, length = 3, 50
    x = _grad_like((rows, length), 4, device)
    for comp in (
        get_compressor("topk", ratio=0.1),
        get_compressor("randomk", ratio=0.5),
        get_compressor("randomk", ratio=0.5, rescale=True),
    ):
        keys = [11, 12, 13]
        payloads = comp.compress_batch(x, keys)
        want = comp.decompress_batch(payloads, length, keys).reshape(-1)
        if comp.name == "topk":
            k = comp.k(length)
            idx = payloads[:, : 4 * k].contiguous().view(torch.int32).long()
            vals = payloads[:, 4 * k :].contiguous().view(torch.float32)
        else:
            idx = comp.indices_batch(length, keys, device)
            vals = payloads.view(torch.float32)
        add = getattr(comp, "rescale", False)
        for numel in (rows * length, rows * length - 17):
            out = torch.full((numel,), 3.0, device=device)
            fk.scatter_decode_into(out, idx, vals, length, add=add)
            torch.testing.assert_close(out, want[:numel], rtol=0, atol=1e-6 if add else 0)
    with pytest.raises(ValueError, match="rows of"):
        fk.scatter_decode_into(torch.zeros(10, device=device), idx, vals, length)


def test_fused_functions_equal_eager_algebra_cpu():
    _check_prepare("cpu")
    _check_onebit("cpu")
    _check_onebit_feedback("cpu")
    _check_cast("cpu")
    _check_scatter("cpu")


def test_kernel_falls_back_once_with_a_warning(monkeypatch):
    def boom(fn, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(fk, "compile_available", lambda device: True)
    monkeypatch.setattr(torch, "compile", boom)
    kernel = fk.Kernel(fk._onebit_pack)
    p = _grad_like((2, 19))
    with pytest.warns(RuntimeWarning, match="'onebit_pack' could not be compiled.*no compiler"):
        first = kernel(p, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = kernel(p, device=torch.device("cpu"))
    assert kernel.failed.startswith("RuntimeError: no compiler here")
    assert torch.equal(first, fk._onebit_pack(p)) and torch.equal(second, first)


def test_fused_option_selects_the_exchange(monkeypatch):
    cpu = torch.device("cpu")
    for bad in ("yes", 1, "Triton"):
        with pytest.raises(ValueError, match="fused must be"):
            CompressionState("onebit", fused=bad)
    for name in ("triton", "compile"):  # forced, as True: also on CPU
        assert CompressionState("onebit", fused=name)._fused_fn(cpu) is not None
    assert CompressionState("onebit", fused="triton")._triton()
    assert not CompressionState("onebit", fused="compile")._triton()
    assert CompressionState("onebit")._fused_fn(cpu) is None  # auto: CUDA only
    with monkeypatch.context() as m:  # auto where kernels can be built: Triton for 1-bit
        m.setattr(fk, "compile_available", lambda device: True)
        auto = CompressionState("onebit")
        assert auto._fused_fn(cpu) is not None and auto._triton()
    assert CompressionState("onebit", fused=False)._fused_fn(cpu) is None
    for cfg in (
        dict(compressor="onebit"),
        dict(compressor="topk", mode="two_way"),
        dict(compressor="randomk", mode="allreduce"),
        dict(compressor="fp16", mode="auto"),
    ):
        assert CompressionState(**cfg, fused=True)._fused_fn(cpu) is not None, cfg
    for cfg in (
        dict(compressor="dithering"),
        dict(compressor="onebit", mode="one_way"),
        dict(compressor="randomk", mode="two_way"),
        dict(compressor="onebit", server_compressor="topk"),
    ):
        assert CompressionState(**cfg, fused=True)._fused_fn(cpu) is None, cfg


# ------------------------------------------------------------------------- the hook
CONFIGS = {
    "onebit": dict(compressor="onebit"),
    "onebit_lr_nesterov": dict(compressor="onebit", ef="lr_corrected", momentum=0.9),
    "onebit_no_server_ef": dict(compressor="onebit", server_ef="none"),
    "topk": dict(compressor="topk", compressor_kwargs={"ratio": 0.1}),
    "topk_chunked": dict(compressor="topk", compressor_kwargs={"ratio": 0.1, "chunk": 16}),
    "randomk_sparse": dict(
        compressor="randomk", compressor_kwargs={"ratio": 0.2}, mode="allreduce", ef="sparse"
    ),
    "fp16": dict(compressor="fp16", mode="allreduce"),
    "bf16_no_ef": dict(compressor="bf16", mode="allreduce", ef="none"),
    "randomk_rescaled": dict(
        compressor="randomk",
        compressor_kwargs={"ratio": 0.2, "rescale": True},
        mode="allreduce",
        ef="none",
    ),
}


def _run(cfg: dict, fused: bool | str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    state = CompressionState(**cfg, start_iter=1, min_compress_bytes=0, fused=fused)
    model = hd._ddp(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    state.attach_optimizer(opt)
    same = hd._train(model, opt, range(4))
    errors = [
        e.reshape(-1)
        for b in state.buckets.values()
        for e in (b.worker.error, b.server.error)
        if e is not None
    ]
    flat_err = torch.cat(errors) if errors else torch.zeros(0)
    return hd._flat(model), flat_err, same


def _fused_vs_eager_checks(fused: bool | str = True) -> dict:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    out = {}
    for name, cfg in CONFIGS.items():
        (p_f, e_f, same_f), (p_e, e_e, same_e) = _run(cfg, fused), _run(cfg, False)
        out[name] = {
            "param_diff": float((p_f - p_e).abs().max()),
            "param_equal": torch.equal(p_f, p_e),
            "error_equal": torch.equal(e_f, e_e),
            "replicas_same": same_f and same_e,
        }
    return out


#: configurations whose 1-bit scales come from the fused (reordered) reduction
FUSED_SCALE = ("onebit", "onebit_no_server_ef")


def _check_fused_vs_eager(results: list[dict], world_size: int) -> None:
    for r in results:
        for name, c in r.items():
            assert c["replicas_same"], name
            exact = name.startswith(("randomk", "fp16", "bf16")) or (
                world_size <= 2 and name not in FUSED_SCALE
            )
            if exact:
                assert c["param_equal"] and c["error_equal"], (name, c)
            else:  # reordered float sums (scales; the server's sum of more than two rows)
                assert 0 < c["param_diff"] < 1e-5 or c["param_equal"], (name, c)


@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_fused_hook_equals_eager_hook_on_gloo(run_dist, world_size):
    _check_fused_vs_eager(run_dist(_fused_vs_eager_checks, world_size), world_size)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_compiled_kernels_equal_eager_cuda():
    if not fk.compile_available(torch.device("cuda")):
        pytest.skip("torch.compile cannot build CUDA kernels here (no Triton)")
    _check_prepare("cuda")
    _check_onebit("cuda")
    _check_onebit_feedback("cuda")
    _check_cast("cuda")
    _check_scatter("cuda")
    # bucket-sized tensors, odd lengths: still one compiled kernel per function
    comp = get_compressor("onebit")
    for length in (1_000_003, 4_194_304):
        p = _grad_like((2, length), 5, "cuda")
        payload, res = fk.onebit_encode(comp, p)
        assert torch.equal(payload, comp.compress_batch(p, [0, 0]))
        decoded = comp.decompress_batch(payload, length, [0, 0])
        assert torch.equal(res, p - decoded)
        out = torch.empty(2 * length - 3, device="cuda")
        assert torch.equal(fk.onebit_decode_into(out, payload, length), decoded.view(-1)[:-3])
        # the two-pass error-fed step at bucket size: same signs, scales within rounding
        src, err = _grad_like((2 * length - 3,), 6, "cuda"), _grad_like((2 * length,), 7, "cuda")
        payload, res = fk.onebit_encode_with_feedback(comp, src, err, 0.5, 2)
        p = (_prescaled(src, 2, 2 * length) + err).view(2, length)
        want = comp.compress_batch(p, [0, 0])
        assert torch.equal(payload[:, 4:], want[:, 4:])
        torch.testing.assert_close(_scales(payload), _scales(want), rtol=1e-5, atol=0)
        assert torch.equal(res, p - comp.decompress_batch(payload, length, [0, 0]))
    failed = {k.name: k.failed for k in fk.KERNELS if k.failed}
    assert not failed, failed  # nothing fell back to eager


def _nccl_fused_checks() -> dict:
    hd.DEVICE["device"] = torch.device("cuda", dist.get_rank())
    # the compiled functions for every compressor (1-bit's Triton kernels: test_onebit_triton)
    out = _fused_vs_eager_checks("compile")
    out["fallbacks"] = {k.name: k.failed for k in fk.KERNELS if k.failed}
    return out


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fused_hook_equals_eager_hook_on_nccl():
    from scaledl.distributed import launch

    results = launch(_nccl_fused_checks, 2, backend="nccl", timeout_s=300)
    for r in results:
        assert not r.pop("fallbacks")
    _check_fused_vs_eager(results, 2)


_NEEDS_CC = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="inductor needs a C compiler"
)


@_NEEDS_CC
def test_compiled_cast_rounds_as_eager_cpu(monkeypatch):
    """The Kernel's compile options keep the cast's rounding inside the fused kernel.

    Without them inductor computes the residual ``p - float(p.to(fp16))`` from the uncast
    value (the residual is then not the error the payload made); on CUDA Triton may also
    contract multiply-adds. Inductor's CPU backend shows the first effect, so this runs there.
    """
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(fk, "compile_available", lambda device: True)
    kernel = fk.Kernel(fk._cast_encode)
    cpu = torch.device("cpu")
    for wire in (torch.float16, torch.bfloat16):
        src, err = _grad_like((1001,), 8), _grad_like((1004,), 9) * 1e-3
        got = kernel(src, err, 0.25, wire, device=cpu)
        want = fk._cast_encode(src, err, 0.25, wire)
        assert kernel.failed is None and kernel._compiled is not None
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), wire
        assert got[1].abs().max() > 0  # the cast did round: a residual to keep


@pytest.mark.slow
@_NEEDS_CC
def test_functions_compile_whole_with_dynamic_shapes_cpu():
    """Each function is one graph (no graph breaks) for any length, rows and cut; equal to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    comp = get_compressor("onebit")

    def compiled(kernel: fk.Kernel):
        return torch.compile(kernel.fn, dynamic=True, fullgraph=True, options=fk.compile_options())

    prepare, pack_res = compiled(fk._PREPARE), compiled(fk._PACK_RESIDUAL)
    server, decode = compiled(fk._SERVER_SUM), compiled(fk._DECODE_INTO)
    w_sums, w_pack = compiled(fk._WORKER_SUMS), compiled(fk._WORKER_PACK)
    s_sums, s_pack = compiled(fk._SERVER_SUMS), compiled(fk._SERVER_PACK)
    for rows, length in ((2, 37), (2, 10001), (1, 64), (1, 8195)):
        src, err = _grad_like((rows * length - 1,), rows), _grad_like((rows * length,), length)
        assert torch.equal(prepare(src, err, 0.5), fk._prepare(src, err, 0.5))
        p = _grad_like((rows, length), length)
        scale = comp._scale(p).view(rows, 1)
        got, want = pack_res(p, scale), fk._onebit_pack_residual(p, scale)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        bits, scale_rows = fk._split_onebit(comp.compress_batch(p, [0] * rows), length)
        e = _grad_like((length,), 9)
        assert torch.equal(server(bits, scale_rows, e), fk._onebit_server_sum(bits, scale_rows, e))
        out, ref = torch.empty(rows * length - 3), torch.empty(rows * length - 3)
        decode(out, bits, scale_rows)
        fk._onebit_decode_into(ref, bits, scale_rows)
        assert torch.equal(out, ref)
        # the two-pass error-fed steps (sums may round differently: compare closely)
        torch.testing.assert_close(
            w_sums(src, err, 0.5, rows, 1),
            fk._onebit_worker_sums(src, err, 0.5, rows, 1),
            rtol=1e-5,
            atol=0,
        )
        got, want = w_pack(src, err, 0.5, scale), fk._onebit_worker_pack(src, err, 0.5, scale)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        torch.testing.assert_close(
            s_sums(bits, scale_rows, e, length - 2, 2),
            fk._onebit_server_sums(bits, scale_rows, e, length - 2, 2),
            rtol=1e-5,
            atol=0,
        )
        s1 = scale[:1]
        got = s_pack(bits, scale_rows, e, length - 2, s1)
        want = fk._onebit_server_pack(bits, scale_rows, e, length - 2, s1)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
