"""Bytes per rank vs world size: two-way (all-to-all + all-gather) vs one-way (all-gather).

CPU, local gloo ranks (2, 4, 8). Each configuration trains an MLP with DDP and
:func:`scaledl.comm.compression_hook` for a few steps and reports, per rank and step, the
bytes the hook's collectives put on the wire (algorithmic, from ``CommStats``) and the bytes
measured on the loopback interface (``/proc/net/dev`` counters of ``lo``, all ranks together,
divided by the number of ranks; they include TCP/IP overhead and any other loopback traffic on
the machine). Two-way traffic stays near 2(n-1)/n of one compressed gradient; one-way grows
as (n-1).

    PYTHONPATH=src python bench/comm_world_size.py            # world sizes 2, 4, 8
    PYTHONPATH=src python bench/comm_world_size.py --quick    # world sizes 2, 4
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, save_results

from scaledl.comm.accounting import interface_bytes
from scaledl.distributed import launch

#: (label, CompressionState options or None for DDP's own fp32 all-reduce)
CONFIGS: list[tuple[str, dict[str, Any] | None]] = [
    ("fp32 all-reduce (DDP)", None),
    ("onebit two-way", {"compressor": "onebit", "mode": "two_way"}),
    ("onebit one-way", {"compressor": "onebit", "mode": "one_way"}),
    ("topk 1% two-way", {"compressor": "topk", "compressor_kwargs": {"ratio": 0.01}}),
    (
        "topk 1% one-way",
        {"compressor": "topk", "compressor_kwargs": {"ratio": 0.01}, "mode": "one_way"},
    ),
]


def lo_bytes() -> int | None:
    """Bytes transmitted on ``lo`` so far (None where /proc/net/dev is not readable)."""
    counters = interface_bytes("lo")
    return None if counters is None else counters[1]


def _rank_job(hidden: int, steps: int) -> list[dict[str, Any]]:
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from scaledl.comm import CompressionState, compression_hook

    rank, n = dist.get_rank(), dist.get_world_size()
    out = []
    for label, cfg in CONFIGS:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, 256))
        ddp = DDP(model)
        state = None
        if cfg is not None:
            state = CompressionState(**cfg, start_iter=1, min_compress_bytes=0)
            state.bind(ddp)
            ddp.register_comm_hook(state, compression_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        x = torch.randn(16, 256)

        def step(ddp=ddp, opt=opt, x=x) -> None:
            opt.zero_grad()
            ddp(x).pow(2).mean().backward()
            opt.step()

        for _ in range(2):  # DDP's bucket rebuild and the dense warm-up step
            step()
        dist.barrier()
        before = lo_bytes()
        for _ in range(steps):
            step()
        dist.barrier()
        after = lo_bytes()
        params = sum(p.numel() for p in model.parameters())
        if state is None:
            algo = 2 * (n - 1) * 4 * params // n  # ring all-reduce, per rank
        else:
            algo = sum(state.stats.history[-steps:]) / steps
        measured = None if before is None or after is None else (after - before) / steps / n
        out.append(
            {
                "world_size": n,
                "config": label,
                "params": params,
                "algorithmic_bytes_per_rank_step": algo,
                "measured_lo_bytes_per_rank_step": measured if rank == 0 else None,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="world sizes 2 and 4, a small model")
    ap.add_argument("--world-sizes", default=None, help="comma-separated (default 2,4,8)")
    ap.add_argument("--hidden", type=int, default=None, help="MLP width (default 2048)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 5)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in (args.world_sizes or ("2,4" if args.quick else "2,4,8")).split(",")]
    hidden = args.hidden or (256 if args.quick else 2048)
    steps = args.steps or (2 if args.quick else 5)

    records: list[dict[str, Any]] = []
    for n in sizes:
        per_rank = launch(_rank_job, n, hidden, steps, backend="gloo", timeout_s=600)
        records.extend(per_rank[0])
    base = {
        (r["world_size"]): r["algorithmic_bytes_per_rank_step"]
        for r in records
        if r["config"].startswith("fp32")
    }
    rows = [
        [
            r["world_size"],
            r["config"],
            r["params"],
            r["algorithmic_bytes_per_rank_step"],
            r["measured_lo_bytes_per_rank_step"],
            base[r["world_size"]] / r["algorithmic_bytes_per_rank_step"],
        ]
        for r in records
    ]
    print_table(
        "bytes per rank and step vs world size (gloo, CPU)",
        ["ranks", "config", "params", "algorithmic B", "measured lo B", "vs fp32"],
        rows,
    )
    path = save_results(
        "comm_world_size",
        {"quick": args.quick, "hidden": hidden, "steps": steps, "results": records},
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
