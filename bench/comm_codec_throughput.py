"""Encode+decode throughput of each gradient compressor vs the device's measured copy bandwidth.

Compression kernels are memory-bound: one pass that reads the fp32 gradient and writes a
smaller payload (and one that reads the payload and writes fp32) cannot beat a device-to-device
copy of the gradient. For every compressor and tensor size (1 MB .. 512 MB of fp32) this
measures encode and decode time and reports input GB/s (fp32 bytes / (encode + decode)) next
to the copy bandwidth (fp32 bytes / copy time) measured the same way on the same device.

    PYTHONPATH=src python bench/comm_codec_throughput.py            # CUDA if available
    PYTHONPATH=src python bench/comm_codec_throughput.py --quick    # CPU, small sizes
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, save_results, time_fn

from scaledl.comm import get_compressor

#: (label, registry name, options)
COMPRESSORS = [
    ("onebit", "onebit", {}),
    ("topk 0.1%", "topk", {"ratio": 0.001}),
    ("topk 1%", "topk", {"ratio": 0.01}),
    ("randomk 1%", "randomk", {"ratio": 0.01}),
    ("dithering linear s=127 (int8)", "dithering", {"levels": 127}),
    ("dithering natural s=7 (int8)", "dithering", {"levels": 7, "kind": "natural"}),
    ("fp16 cast", "fp16", {}),
    ("bf16 cast", "bf16", {}),
]


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
        gbs = numel * 4 / (enc.median_s + dec.median_s) / 1e9
        out.append(
            {
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
        )
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
    path = save_results(
        "comm_codec_throughput",
        {"device": str(device), "quick": args.quick, "repeats": repeats, "results": records},
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
