"""Encode+decode throughput of each gradient compressor vs the device's measured copy bandwidth.

Compression kernels are memory-bound: one pass that reads the fp32 gradient and writes a
smaller payload (and one that reads the payload and writes fp32) cannot beat a device-to-device
copy of the gradient. For every compressor and tensor size (1 MB .. 512 MB of fp32) this
measures encode and decode time and reports input GB/s (fp32 bytes / (encode + decode)) next
to the copy bandwidth (fp32 bytes / copy time) measured the same way on the same device.

The "+EF" rows time what the DDP hook does per shard: encode = pre-scale copy, error-feedback
add, compress and the new residual; decode = decode into the (preallocated) bucket. They come
in pairs: the eager pipeline and the fused one (``scaledl.comm.fused``, compiled with
``torch.compile`` on CUDA, run eagerly on CPU), and for 1-bit on CUDA a third, the Triton
kernels (``scaledl.comm.onebit_triton``); ``first_call_s`` in the JSON is the fused
row's first call at the first size (on CUDA it includes compiling the kernels).

The "top-k selection only" rows time ``torch.topk`` of 1% over the magnitudes with fp32 keys
and with fp16 keys (half the radix digit passes), and how many indices the two sets share.

The host-overhead rows time the error-fed 1-bit steps of the two-way hook for one DDP bucket
(25 MB, DDP's default ``bucket_cap_mb``) on ``WORLD`` ranks with each backend: ``eager``
(torch operations), ``compile`` (``scaledl.comm.fused``, ``torch.compile``-d on CUDA, eager
on CPU) and ``triton`` (``scaledl.comm.onebit_triton``, hand-written kernels; CUDA only).
Phases: worker encode (scale, pack, residual of ``WORLD`` shards), server (decode and sum the
``WORLD`` received shards, error, re-encode) and decode into the bucket. ``host_us`` is the
wall time per call of back-to-back calls without synchronising (what the hook costs the CPU
when the device keeps up); ``device_ms`` is the time per call from CUDA events.

    PYTHONPATH=src python bench/comm_codec_throughput.py            # CUDA if available
    PYTHONPATH=src python bench/comm_codec_throughput.py --quick    # CPU, small sizes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, save_results, time_fn

from scaledl.comm import ErrorFeedback, get_compressor
from scaledl.comm import fused as fk
from scaledl.comm import onebit_triton as ot
from scaledl.comm.error_feedback import compress_shards

#: (label, registry name, options)
COMPRESSORS = [
    ("onebit", "onebit", {}),
    ("topk 0.1%", "topk", {"ratio": 0.001}),
    ("topk 1%", "topk", {"ratio": 0.01}),
    ("topk 1% chunk 4096 (approx.)", "topk", {"ratio": 0.01, "chunk": 4096}),
    ("randomk 1%", "randomk", {"ratio": 0.01}),
    ("dithering linear s=127 (int8)", "dithering", {"levels": 127}),
    ("dithering natural s=7 (int8)", "dithering", {"levels": 7, "kind": "natural"}),
    ("fp16 cast", "fp16", {}),
    ("bf16 cast", "bf16", {}),
]

#: (label, registry name, options) of the error-feedback pipelines timed eager and fused
EF_PIPELINES = [
    ("onebit", "onebit", {}),
    ("topk 1%", "topk", {"ratio": 0.01}),
    ("randomk 1%", "randomk", {"ratio": 0.01}),
    ("fp16 cast", "fp16", {}),
]
#: the hook pre-scales by the world size; two ranks
WORLD = 2


def ef_pipeline(name: str, opts: dict, x: torch.Tensor, fused: bool | str) -> tuple:
    """(encode, decode) closures of the hook's per-shard work with error feedback.

    ``fused``: False (eager), True (``scaledl.comm.fused``) or "triton" (1-bit only:
    ``scaledl.comm.onebit_triton``)."""
    comp = get_compressor(name, **opts)
    numel, keys = x.numel(), [1]
    ef = ErrorFeedback("vanilla")
    ef.error = torch.randn_like(x).mul_(0.01)
    bucket = torch.empty_like(x)
    state: dict = {}

    def encode() -> torch.Tensor:
        if fused == "triton":
            payload, res = ot.encode_with_feedback(comp, x, ef.error, fk.exact_prescale(WORLD), 1)
            ef.error, state["payload"] = res.view(-1), payload.view(-1)
        elif fused and name == "onebit":  # a scale pass and a pack/residual pass, as the hook
            payload, res = fk.onebit_encode_with_feedback(
                comp, x, ef.error, fk.exact_prescale(WORLD), 1
            )
            ef.error, state["payload"] = res.view(-1), payload.view(-1)
        elif fused and name == "fp16":  # one pass: error add, cast, residual
            state["payload"], ef.error = fk.cast_encode_with_feedback(
                comp, x, ef.error, fk.exact_prescale(WORLD)
            )
        elif fused:
            p = fk.prepare(x, ef.error, fk.exact_prescale(WORLD))
            state["payload"] = fk.encode_rows(comp, ef, p.view(1, -1), keys)
        else:
            g = x / WORLD
            state["payload"], _ = compress_shards(
                comp, ef, g, keys, inplace=True, return_decoded=False
            )
        return state["payload"]

    def decode() -> torch.Tensor:
        payload = state["payload"].view(1, -1)
        if not fused:
            return bucket.copy_(comp.decompress_batch(payload, numel, keys).view(-1))
        if fused == "triton":
            return ot.decode_into(bucket, payload, numel)
        if name == "onebit":
            return fk.onebit_decode_into(bucket, payload, numel)
        if name == "fp16":
            return bucket.copy_(payload.view(comp.wire_dtype).view(-1))
        return fk.scatter_decode_into(bucket, *fk.sparse_rows(comp, payload, numel, keys), numel)

    return comp, encode, decode


#: the host-overhead rows: DDP's default bucket; backends of the error-fed 1-bit steps
BUCKET_MB = 25
BACKENDS = ("eager", "compile", "triton")


def onebit_hook_steps(backend: str, x: torch.Tensor, n: int = WORLD) -> dict[str, Any]:
    """Closures of the two-way hook's error-fed 1-bit phases on bucket ``x`` for ``n`` ranks.

    The server and the decode take the worker's payloads as what they received (same shapes
    as the all-to-all's and the all-gather's rows).
    """
    comp = get_compressor("onebit")
    numel = x.numel()
    length = -(-numel // n)
    keys = list(range(n))
    worker, server = ErrorFeedback("vanilla"), ErrorFeedback("vanilla")
    worker.error = torch.randn(n * length, device=x.device).mul_(0.01)
    server.error = torch.randn(length, device=x.device).mul_(0.01)
    bucket = torch.empty_like(x)
    factor = fk.exact_prescale(n)
    mod = ot if backend == "triton" else fk
    state: dict[str, torch.Tensor] = {}

    def encode() -> torch.Tensor:
        if backend == "eager":
            g = torch.zeros(n * length, device=x.device)
            torch.div(x, n, out=g[:numel])
            payloads, _ = compress_shards(comp, worker, g, keys, inplace=True, return_decoded=False)
            state["payloads"] = payloads.view(n, -1)
        else:
            fn = mod.encode_with_feedback if backend == "triton" else fk.onebit_encode_with_feedback
            state["payloads"], res = fn(comp, x, worker.error, factor, n)
            worker.error = res.view(-1)
        return state["payloads"]

    def serve() -> torch.Tensor:
        recv = state["payloads"]
        if backend == "eager":
            s = comp.decompress_batch(recv, length, keys).sum(0)
            payload, _ = compress_shards(comp, server, s, [0], inplace=True, return_decoded=False)
            return payload
        fn = mod.server if backend == "triton" else fk.onebit_server
        payload, server.error = fn(comp, recv, length, server.error, length)
        return payload

    def decode() -> torch.Tensor:
        allc = state["payloads"]
        if backend == "eager":
            return bucket.copy_(comp.decompress_batch(allc, length, keys).view(-1)[:numel])
        fn = mod.decode_into if backend == "triton" else fk.onebit_decode_into
        return fn(bucket, allc, length)

    return {"worker encode": encode, "server": serve, "decode into bucket": decode}


def _host_us(fn: Any, device: torch.device, calls: int) -> float:
    """Host wall time per call of ``calls`` back-to-back calls (no synchronisation)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return host * 1e6


def bench_host_overhead(
    device: torch.device, mb: int, warmup: int, repeats: int, calls: int
) -> list[dict]:
    """Host us and device ms per call of each backend's 1-bit +EF phases for one bucket."""
    x = torch.randn(mb * (1 << 20) // 4, device=device)
    out = []
    for backend in BACKENDS:
        if backend == "triton" and not ot.available(device):
            print(f"triton 1-bit kernels unavailable on {device}: no triton rows", file=sys.stderr)
            continue
        steps = onebit_hook_steps(backend, x)
        t0 = time.perf_counter()
        for fn in steps.values():  # first calls: Dynamo/inductor or Triton's JIT compile
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        for phase, fn in steps.items():
            for _ in range(warmup):
                fn()
            host = _host_us(fn, device, calls)
            dev = time_fn(fn, name=f"{backend} {phase}", warmup=0, repeats=repeats, device=device)
            out.append(
                {
                    "size_mb": mb,
                    "backend": backend,
                    "phase": phase,
                    "host_us_per_call": host,
                    "device_ms_per_call": dev.median_s * 1e3,
                    "device_spread_ms": dev.spread_s * 1e3,
                    "first_calls_s": first,
                    "compiled": backend == "triton"
                    or (backend == "compile" and fk.compile_available(device)),
                }
            )
    return out


def _record(label: str, mb: int, comp, numel: int, enc, dec, copy_gbs: float) -> dict:
    gbs = numel * 4 / (enc.median_s + dec.median_s) / 1e9
    return {
        "size_mb": mb,
        "compressor": label,
        "payload_bytes": comp.payload_bytes(numel),
        "ratio_vs_fp32": comp.ratio(numel),
        "encode_ms": enc.median_s * 1e3,
        "decode_ms": dec.median_s * 1e3,
        "encode_spread_ms": enc.spread_s * 1e3,
        "decode_spread_ms": dec.spread_s * 1e3,
        "codec_gb_s": gbs,
        "copy_gb_s": copy_gbs,
        "fraction_of_copy": gbs / copy_gbs,
    }


def bench_size(mb: int, device: torch.device, warmup: int, repeats: int) -> list[dict]:
    """Copy bandwidth and every compressor's encode/decode time for one fp32 size."""
    numel = mb * (1 << 20) // 4
    x = torch.randn(numel, device=device)
    dst = torch.empty_like(x)
    copy = time_fn(lambda: dst.copy_(x), name="copy", warmup=warmup, repeats=repeats, device=device)
    copy_gbs = numel * 4 / copy.median_s / 1e9
    out = []
    for label, name, opts in COMPRESSORS:
        comp = get_compressor(name, **opts)
        payload = comp.compress(x, key=1)
        enc = time_fn(
            lambda comp=comp: comp.compress(x, key=1),
            name=f"{label} encode",
            warmup=warmup,
            repeats=repeats,
            device=device,
        )
        dec = time_fn(
            lambda comp=comp, payload=payload: comp.decompress(payload, numel, key=1),
            name=f"{label} decode",
            warmup=warmup,
            repeats=repeats,
            device=device,
        )
        out.append(_record(label, mb, comp, numel, enc, dec, copy_gbs))
    for label, name, opts in EF_PIPELINES:
        variants: tuple[bool | str, ...] = (False, True)
        if name == "onebit" and ot.available(device):
            variants += ("triton",)
        for fused in variants:
            comp, encode, decode = ef_pipeline(name, opts, x, fused)
            t0 = time.perf_counter()
            encode(), decode()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            kind = {False: "eager", True: "fused", "triton": "triton"}[fused]
            tag = f"{label} +EF {kind}"
            enc = time_fn(
                encode, name=f"{tag} encode", warmup=warmup, repeats=repeats, device=device
            )
            dec = time_fn(
                decode, name=f"{tag} decode", warmup=warmup, repeats=repeats, device=device
            )
            rec = _record(tag, mb, comp, numel, enc, dec, copy_gbs)
            rec["first_call_s"] = first
            rec["fused"] = fused
            rec["compiled"] = fused == "triton" or (fused and fk.compile_available(device))
            out.append(rec)
    return out


def bench_topk_keys(mb: int, device: torch.device, warmup: int, repeats: int) -> dict:
    """The top-k 1% selection alone (``abs``, optional cast, ``torch.topk``) with fp32 keys
    and with fp16 keys, which halve the radix select's digit passes and select the exact
    top-k up to magnitudes within fp16 rounding of the k-th; the index sets' agreement."""
    numel = mb * (1 << 20) // 4
    x = torch.randn(numel, device=device) * torch.rand(numel, device=device)
    k = max(1, numel // 100)
    out: dict[str, Any] = {"size_mb": mb, "k": k}
    for key, cast in (("fp32", None), ("fp16", torch.float16)):

        def select(cast=cast):
            a = x.abs()
            return torch.topk(a if cast is None else a.to(cast), k, sorted=False).indices

        t = time_fn(select, name=f"topk {key} keys", warmup=warmup, repeats=repeats, device=device)
        out[f"{key}_us"] = t.median_s * 1e6
    exact = torch.zeros(numel, dtype=torch.bool, device=device)
    exact[torch.topk(x.abs(), k, sorted=False).indices] = True
    half = torch.topk(x.abs().half(), k, sorted=False).indices
    out["fp16_agreement"] = exact[half].float().mean().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, 1 and 4 MB, few repeats")
    ap.add_argument("--sizes-mb", default=None, help="comma-separated fp32 sizes in MB")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--host-only", action="store_true", help="only the host-overhead rows (1-bit backends)"
    )
    ap.add_argument("--calls", type=int, default=None, help="calls per host-time measurement")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args()

    device = torch.device(
        args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    )
    default_sizes = "1,4" if args.quick else "1,4,16,64,256,512"
    sizes = [int(s) for s in (args.sizes_mb or default_sizes).split(",")]
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = 1 if args.quick else 3

    bucket_mb = 1 if args.quick else BUCKET_MB
    calls = args.calls or (5 if args.quick else 50)
    host = bench_host_overhead(device, bucket_mb, warmup, repeats, calls)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print_table(
        f"1-bit +EF host overhead per call, {bucket_mb} MB bucket, {WORLD} ranks ({where})",
        ["backend", "phase", "host us", "device ms", "first calls s"],
        [
            [
                r["backend"],
                r["phase"],
                r["host_us_per_call"],
                r["device_ms_per_call"],
                r["first_calls_s"],
            ]
            for r in host
        ],
    )
    rows, records = [], []
    for mb in [] if args.host_only else sizes:
        for rec in bench_size(mb, device, warmup, repeats):
            records.append(rec)
            rows.append(
                [
                    mb,
                    rec["compressor"],
                    round(rec["ratio_vs_fp32"], 1),
                    rec["encode_ms"],
                    rec["decode_ms"],
                    rec["codec_gb_s"],
                    rec["copy_gb_s"],
                    rec["fraction_of_copy"],
                ]
            )
    print_table(
        f"compressor encode+decode throughput on {device} ({where})",
        ["MB", "compressor", "ratio", "enc ms", "dec ms", "codec GB/s", "copy GB/s", "of copy"],
        rows,
    )
    keys = [] if args.host_only else [bench_topk_keys(mb, device, warmup, repeats) for mb in sizes]
    print_table(
        f"top-k 1% selection only: fp32 vs fp16 keys ({where})",
        ["MB", "k", "fp32 us", "fp16 us", "fp16 set agreement"],
        [[r["size_mb"], r["k"], r["fp32_us"], r["fp16_us"], r["fp16_agreement"]] for r in keys],
    )
    fallbacks = {k.name: k.failed for k in fk.KERNELS if k.failed}
    if fallbacks:
        print(f"fused kernels that fell back to eager: {fallbacks}", file=sys.stderr)
    if ot.failed:
        print(f"Triton 1-bit kernels failed: {ot.failed}", file=sys.stderr)
    path = save_results(
        "comm_codec_throughput",
        {
            "device": str(device),
            "quick": args.quick,
            "repeats": repeats,
            "world_size_prescale": WORLD,
            "fused_compiled": fk.compile_available(device) and not fallbacks,
            "fused_fallbacks": fallbacks,
            "triton_failed": ot.failed,
            "host_overhead_bucket_mb": bucket_mb,
            "host_overhead_calls": calls,
            "host_overhead": host,
            "results": records,
            "topk_keys": keys,
        },
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
