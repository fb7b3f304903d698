"""Encode+decode throughput of each gradient compressor vs the device's measured copy bandwidth.

Compression kernels are memory-bound: one pass that reads the fp32 gradient and writes a
smaller payload (and one that reads the payload and writes fp32) cannot beat a device-to-device
copy of the gradient. For every compressor and tensor size (1 MB .. 512 MB of fp32) this
measures encode and decode time and reports input GB/s (fp32 bytes / (encode + decode)) next
to the copy bandwidth (fp32 bytes / copy time) measured the same way on the same device.

The "+EF" rows time what the DDP hook does per shard: encode = pre-scale copy, error-feedback
add, compress and the new residual; decode = decode into the (preallocated) bucket. They come
in pairs: the eager pipeline and the fused one (``scaledl.comm.fused``, compiled with
``torch.compile`` on CUDA, run eagerly on CPU); ``first_call_s`` in the JSON is the fused
row's first call at the first size (on CUDA it includes compiling the kernels).

    PYTHONPATH=src python bench/comm_codec_throughput.py            # CUDA if available
    PYTHONPATH=src python bench/comm_codec_throughput.py --quick    # CPU, small sizes
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, save_results, time_fn

from scaledl.comm import ErrorFeedback, get_compressor
from scaledl.comm import fused as fk
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


def ef_pipeline(name: str, opts: dict, x: torch.Tensor, fused: bool) -> tuple:
    """(encode, decode) closures of the hook's per-shard work with error feedback."""
    comp = get_compressor(name, **opts)
    numel, keys = x.numel(), [1]
    ef = ErrorFeedback("vanilla")
    ef.error = torch.randn_like(x).mul_(0.01)
    bucket = torch.empty_like(x)
    state: dict = {}

    def encode() -> torch.Tensor:
        if fused and name == "onebit":  # a scale pass and a pack/residual pass, as the hook
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
        if name == "onebit":
            return fk.onebit_decode_into(bucket, payload, numel)
        if name == "fp16":
            return bucket.copy_(payload.view(comp.wire_dtype).view(-1))
        return fk.scatter_decode_into(bucket, *fk.sparse_rows(comp, payload, numel, keys), numel)

    return comp, encode, decode


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
        for fused in (False, True):
            comp, encode, decode = ef_pipeline(name, opts, x, fused)
            t0 = time.perf_counter()
            encode(), decode()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            tag = f"{label} +EF {'fused' if fused else 'eager'}"
            enc = time_fn(
                encode, name=f"{tag} encode", warmup=warmup, repeats=repeats, device=device
            )
            dec = time_fn(
                decode, name=f"{tag} decode", warmup=warmup, repeats=repeats, device=device
            )
            rec = _record(tag, mb, comp, numel, enc, dec, copy_gbs)
            rec["first_call_s"] = first
            rec["fused"] = fused
            rec["compiled"] = fused and fk.compile_available(device)
            out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, 1 and 4 MB, few repeats")
    ap.add_argument("--sizes-mb", default=None, help="comma-separated fp32 sizes in MB")
    ap.add_argument("--repeats", type=int, default=None)
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

    rows, records = [], []
    for mb in sizes:
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
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print_table(
        f"compressor encode+decode throughput on {device} ({where})",
        ["MB", "compressor", "ratio", "enc ms", "dec ms", "codec GB/s", "copy GB/s", "of copy"],
        rows,
    )
    fallbacks = {k.name: k.failed for k in fk.KERNELS if k.failed}
    if fallbacks:
        print(f"fused kernels that fell back to eager: {fallbacks}", file=sys.stderr)
    path = save_results(
        "comm_codec_throughput",
        {
            "device": str(device),
            "quick": args.quick,
            "repeats": repeats,
            "world_size_prescale": WORLD,
            "fused_compiled": fk.compile_available(device) and not fallbacks,
            "fused_fallbacks": fallbacks,
            "results": records,
        },
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
