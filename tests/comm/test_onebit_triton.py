"""Triton 1-bit codec kernels (scaledl.comm.onebit_triton) against the plain-torch reference
(scaledl.comm.fused run eagerly): on CPU under Triton's interpreter, and compiled on CUDA."""

import os
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

from scaledl.comm import fused as fk
from scaledl.comm import get_compressor
from scaledl.comm import onebit_triton as ot
from scaledl.comm.compressors import _view_as
from scaledl.comm.hooks import _prescaled
from tests.comm import test_fused as tf

needs_triton = pytest.mark.skipif(ot.triton is None, reason="triton is not installed")
triton = ot.triton  # None without triton (the tests that need it skip)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _scales(payloads: torch.Tensor) -> torch.Tensor:
    return _view_as(payloads[:, :4], torch.float32)


def _same_up_to_scale(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Equal payload bytes except the fp32 scales, which agree within ``rtol``."""
    assert got.shape == want.shape and torch.equal(got[:, 4:], want[:, 4:])
    torch.testing.assert_close(_scales(got), _scales(want), rtol=rtol, atol=0)


def _worker_residual(p: torch.Tensor, payloads: torch.Tensor, comp, numel: int) -> torch.Tensor:
    """``p - D(C(p))`` with the padding (from ``numel`` on) zero, as the hook keeps it."""
    rows, length = p.shape
    res = p - comp.decompress_batch(payloads, length, [0] * rows)
    res.view(-1)[numel:] = 0.0
    return res


def _check_kernels(device: str, rtol: float = 1e-5) -> None:
    """Every kernel against the reference: odd lengths, padding, 1-4 rows, every scale."""
    cases = ((1, 37), (2, 40), (3, 4099), (4, 13), (2, 8193))
    for scale in ("mean_abs", "l2_sqrt_d", "none"):
        comp = get_compressor("onebit", scale=scale)
        for rows, length in cases:
            _check_case(comp, rows, length, device, rtol)
    # bad input is refused before any kernel runs
    src, err = torch.zeros(10, device=device), torch.zeros(11, device=device)
    with pytest.raises(ValueError, match="padded rows"):
        ot.encode_with_feedback(comp, src, err, 0.5, 2)
    with pytest.raises(ValueError, match="do not hold"):
        ot.server(comp, torch.zeros(2, 9, dtype=torch.uint8, device=device), 41, err, 3)
    assert ot.failed is None, ot.failed


def _check_case(comp, rows: int, length: int, device: str, rtol: float) -> None:
    numel = rows * length - (3 if rows > 1 else 0)  # the last row cut: padding
    factor = {1: 1.0, 2: 0.5, 3: 0.25, 4: 0.25}[rows]
    tag = (comp.scale, rows, length)
    for dtype in (torch.float32, torch.bfloat16):  # the bucket's dtype
        src = tf._grad_like((numel,), rows, device).to(dtype)
        err = tf._grad_like((rows * length,), length, device)
        got = ot.encode_with_feedback(comp, src, err, factor, rows)
        assert got is not None, ot.failed
        # the reference: the plain torch functions and the compressor, run eagerly
        p = fk._worker_p(src, err, factor, rows)
        payloads = comp.compress_batch(p, [0] * rows)
        _same_up_to_scale(got[0], payloads, rtol)
        assert torch.equal(got[1], _worker_residual(p, got[0], comp, numel)), tag
    # the server: n received rows (left-to-right sum), padding from ``valid`` on, error
    e = tf._grad_like((length,), 3, device)
    bits, scale_rows = fk._split_onebit(payloads, length)
    for valid in (0, length - 2, length):
        got = ot.server(comp, payloads, length, e, valid)
        assert got is not None, ot.failed
        p = fk._server_p(bits, scale_rows, e, valid)
        _same_up_to_scale(got[0], comp.compress_batch(p, [0]), rtol)
        assert torch.equal(got[1], (p - comp.decompress_batch(got[0], length, [0])).view(-1))
    # decode straight into the (cut) bucket; bf16 only on CUDA (the interpreter truncates
    # fp32 -> bf16 where CUDA rounds to nearest even, as torch does)
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if device == "cuda" else ())
    for dtype in dtypes:
        out = torch.full((numel,), 7.0, dtype=dtype, device=device)
        assert ot.decode_into(out, payloads, length) is out
        want_out = comp.decompress_batch(payloads, length, [0] * rows).reshape(-1)[:numel]
        assert torch.equal(out, want_out.to(dtype)), (tag, dtype)


_INTERPRET_SCRIPT = (
    "from scaledl.comm import onebit_triton as ot\n"
    "assert ot.INTERPRETED and ot.available(__import__('torch').device('cpu'))\n"
    "from tests.comm.test_onebit_triton import _check_kernels\n"
    "_check_kernels('cpu')\n"
    "print('kernels ok')\n"
)


def _interpreter_env() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "src"), *sys.path])
    return env


@needs_triton
def test_kernels_equal_reference_in_triton_interpreter():
    # the interpreter is chosen when the kernels are defined: a fresh process
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRET_SCRIPT],
        cwd=ROOT,
        env=_interpreter_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0 and "kernels ok" in proc.stdout, proc.stderr[-3000:]


def _cuda_signatures() -> list[tuple[Any, dict[str, str], dict[str, int]]]:
    """(kernel, argument types, constexprs) of every kernel as the functions launch them."""
    f32, u8 = "*fp32", "*u8"
    worker = {"src": f32, "err": f32}
    server = {"recv": u8, "N_ROWS": "constexpr", "row_bytes": "i32", "err": f32}
    out = []
    for norm in (0, 1, 2):
        out += [
            (
                ot._worker_pack_kernel,
                {**worker, "scale": f32, "out": u8, "res": f32, "numel": "i32", "d": "i32",
                 "nb": "i32", "factor": "fp32", "NORM": "constexpr", "BYTES": "constexpr"},
                {"NORM": norm, "BYTES": ot.PACK_BYTES},
            ),
            (
                ot._server_pack_kernel,
                {**server, "scale": f32, "out": u8, "res": f32, "d": "i32", "nb": "i32",
                 "valid": "i32", "NORM": "constexpr", "BYTES": "constexpr"},
                {"N_ROWS": 2, "NORM": norm, "BYTES": ot.PACK_BYTES},
            ),
        ]  # fmt: skip
    for norm in (1, 2):
        out += [
            (
                ot._worker_sums_kernel,
                {**worker, "src": "*bf16", "partial": f32, "numel": "i32", "d": "i32",
                 "factor": "fp32", "NORM": "constexpr", "BLOCK": "constexpr"},
                {"NORM": norm, "BLOCK": ot.SUM_BLOCK},
            ),
            (
                ot._server_sums_kernel,
                {**server, "partial": f32, "d": "i32", "valid": "i32", "NORM": "constexpr",
                 "BLOCK": "constexpr"},
                {"N_ROWS": 3, "NORM": norm, "BLOCK": ot.SUM_BLOCK},
            ),
            (
                ot._finish_kernel,
                {"partial": f32, "scale": f32, "n_partial": "i32", "d_f": "fp32",
                 "sqrt_d": "fp32", "NORM": "constexpr", "BLOCK": "constexpr"},
                {"NORM": norm, "BLOCK": ot.MAX_PARTIALS},
            ),
        ]  # fmt: skip
    out.append(
        (
            ot._decode_kernel,
            {"recv": u8, "row_bytes": "i32", "out": "*bf16", "numel": "i32", "d": "i32",
             "BLOCK": "constexpr"},
            {"BLOCK": ot.DECODE_BLOCK},
        )
    )  # fmt: skip
    return out


@needs_triton
def test_kernels_compile_for_h100_without_a_gpu():
    """Triton compiles every kernel to an sm_90 binary here (the interpreter checks values,
    not what the compiler accepts); the IEEE sqrt/division and no-FMA options hold."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # internal API of this Triton version
        pytest.skip(f"Triton's ahead-of-time API is not importable: {exc}")
    if ot.INTERPRETED:
        pytest.skip("kernels defined for Triton's interpreter")
    target = GPUTarget("cuda", 90, 32)
    for kernel, signature, constexprs in _cuda_signatures():
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        options = ot._NO_FMA if kernel.__name__.startswith("_worker") else {}
        compiled = triton.compile(src, target=target, options=options)
        assert compiled.asm["cubin"], kernel.__name__
        ptx = compiled.asm["ptx"]
        if kernel is ot._finish_kernel:
            assert "div.rn.f32" in ptx, "the scale's division must round to nearest"
            assert constexprs["NORM"] == 1 or "sqrt.rn.f32" in ptx
        if kernel is ot._worker_pack_kernel:
            assert "fma.rn.f32" not in ptx  # x * factor + e in two roundings


def test_unavailable_kernels_return_none_and_failures_warn_once(monkeypatch):
    comp = get_compressor("onebit")
    src, err = torch.zeros(10), torch.zeros(10)
    if not ot.INTERPRETED:  # CPU tensors without the interpreter: the caller falls back
        assert not ot.available(torch.device("cpu"))
        assert ot.encode_with_feedback(comp, src, err, 0.5, 2) is None
        assert ot.decode_into(src, torch.zeros(2, 5, dtype=torch.uint8), 5) is None
    monkeypatch.setattr(ot, "failed", None)

    def boom(x: torch.Tensor) -> None:
        raise RuntimeError("no GPU backend\nsecond line")

    with pytest.warns(RuntimeWarning, match="Triton 1-bit codec kernels failed.*no GPU backend"):
        assert ot._launch(boom, src) is None
    assert ot.failed == "RuntimeError: no GPU backend"
    assert not ot.available(torch.device("cuda"))  # disabled from now on: no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ot.server(comp, torch.zeros(2, 6, dtype=torch.uint8), 10, err, 10) is None


# ------------------------------------------------------------------------- the hook
ONEBIT = {k: v for k, v in tf.CONFIGS.items() if k.startswith("onebit")}


def _triton_vs_eager_checks() -> dict:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    out = {}
    for name, cfg in ONEBIT.items():
        (p_t, e_t, same_t), (p_e, e_e, same_e) = tf._run(cfg, "triton"), tf._run(cfg, False)
        out[name] = {
            "param_diff": float((p_t - p_e).abs().max()),
            "param_equal": torch.equal(p_t, p_e),
            "error_equal": torch.equal(e_t, e_e),
            "replicas_same": same_t and same_e,
        }
    out["failed"] = ot.failed
    out["used"] = ot.available(tf.hd.DEVICE["device"])
    return out


def _check_triton_vs_eager(results: list[dict], world_size: int = 2) -> None:
    for r in results:
        assert r.pop("failed") is None and r.pop("used")
        for name, c in r.items():
            assert c["replicas_same"], name
            if name in tf.FUSED_SCALE or world_size > 2:
                # scales from the kernels' reordered sums; the server's left-to-right sum
                # of more than two rows
                assert 0 < c["param_diff"] < 1e-5 or c["param_equal"], (name, c)
            else:  # momentum / lr-corrected EF: the torch path and the exact decode
                assert c["param_equal"] and c["error_equal"], (name, c)


@needs_triton
@pytest.mark.dist
@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_triton_hook_equals_eager_hook_on_gloo_interpreted(run_dist, monkeypatch, world_size):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks import it interpreted
    _check_triton_vs_eager(run_dist(_triton_vs_eager_checks, world_size), world_size)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_triton_kernels_equal_reference_cuda():
    if not ot.available(torch.device("cuda")):
        pytest.skip(f"Triton kernels unavailable on CUDA (triton missing or failed: {ot.failed})")
    _check_kernels("cuda")
    # bucket-sized rows (DDP's 25 MB bucket on 2 ranks), odd lengths
    comp = get_compressor("onebit")
    for length in (3_276_803, 4_194_304):
        src = tf._grad_like((2 * length - 3,), 6, "cuda")
        err = tf._grad_like((2 * length,), 7, "cuda")
        payload, res = ot.encode_with_feedback(comp, src, err, 0.5, 2)
        p = (_prescaled(src, 2, 2 * length) + err).view(2, length)
        _same_up_to_scale(payload, comp.compress_batch(p, [0, 0]), 1e-5)
        assert torch.equal(res, _worker_residual(p, payload, comp, 2 * length - 3))
        out = torch.empty(2 * length - 3, device="cuda", dtype=torch.bfloat16)
        want = comp.decompress_batch(payload, length, [0, 0]).view(-1)[:-3]
        assert torch.equal(ot.decode_into(out, payload, length), want.bfloat16())
        again = ot.encode_with_feedback(comp, src, err, 0.5, 2)
        assert torch.equal(again[0], payload)  # the two-stage sums are deterministic
        if torch.cuda.device_count() > 1:  # tensors off the current device: launched there
            other = ot.encode_with_feedback(comp, src.to("cuda:1"), err.to("cuda:1"), 0.5, 2)
            assert torch.equal(other[0].cpu(), payload.cpu()) and torch.equal(
                other[1].cpu(), res.cpu()
            )
    assert ot.failed is None, ot.failed


def _nccl_triton_checks() -> dict:
    tf.hd.DEVICE["device"] = torch.device("cuda", dist.get_rank())
    return _triton_vs_eager_checks()


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_triton_hook_equals_eager_hook_on_nccl():
    from scaledl.distributed import launch

    _check_triton_vs_eager(launch(_nccl_triton_checks, 2, backend="nccl", timeout_s=300))
