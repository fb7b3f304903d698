"""Baechi placement wall time on 1k, 10k and 100k-node synthetic graphs: m-TOPO, m-ETF, m-SCT.

Random layered DAGs (width 16, up to 2 inputs per node, 0.1-1 ms ops, 64 KiB-4 MiB tensors) are
placed on 4 devices whose memory (1.5x an even share) makes the placement memory-constrained,
with the shared-channel contention model. The time is the placer alone (graph given; no
shrinking, since these graphs have no colocation groups); for m-SCT it includes the favorite-
child LP (HiGHS), also reported on its own. Wall and process CPU time are both reported (the CPU
time does not grow when other jobs share the host); a size is skipped when the previous size's
CPU time predicts more than ``--budget-s`` seconds. m-TOPO's time includes simulating its
placement (it has no time model of its own). For scale: learning-based placers need hours (RL
placer, ICML'17) or a 3600 s Grappler budget (hierarchical placer, ICLR'18) per model.

Runs on CPU only; ``--quick`` stops at 10k nodes (m-SCT at 1k).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, save_results

from scaledl.placement import ALGORITHMS, Cluster, layered_graph

#: Growth of the CPU time per 10x nodes used to predict the next size. The LP is superlinear:
#: 1k -> 10k nodes grew m-SCT's time 26x here, and a 100k-node run exceeded 2 CPU minutes.
GROWTH = {"m-topo": 12.0, "m-etf": 12.0, "m-sct": 40.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k and 10k nodes only (m-SCT: 1k)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=120.0, help="skip a run predicted longer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = args.sizes or ([1000, 10000] if args.quick else [1000, 10000, 100000])
    rows, records = [], []
    for algo, fn in ALGORITHMS.items():
        prev = None
        for n in sizes:
            rec = {"algorithm": algo, "nodes": n}
            if args.quick and algo == "m-sct" and n > 1000:
                rec["skipped"] = "quick mode"
            elif prev is not None and prev * GROWTH[algo] > args.budget_s:
                rec["skipped"] = f"predicted {prev * GROWTH[algo]:.0f} s > {args.budget_s:.0f} s"
            if "skipped" in rec:
                records.append(rec)
                rows.append([algo, n, "-", "-", "-", "-", "-", "-", rec["skipped"]])
                prev = None if prev is None else prev * GROWTH[algo]
                continue
            t0 = time.perf_counter()
            graph = layered_graph(n, seed=n)
            graph.topo()
            build_s = time.perf_counter() - t0
            per_dev = int(1.5 * int(graph.permanent.sum()) / args.devices)
            cluster = Cluster.uniform(args.devices, per_dev, contention="shared")
            repeats = 3 if n <= 10000 and algo != "m-sct" else 1
            times, cpu, result = [], [], None
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                result = fn(graph, cluster)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            wall = statistics.median(times)
            prev = statistics.median(cpu)
            lb = result.bounds["lower_bound_s"]
            rec.update(
                edges=graph.num_edges,
                graph_build_s=build_s,
                placement_s=wall,
                placement_times_s=times,
                cpu_s=statistics.median(cpu),
                load_average=os.getloadavg()[0],
                lp_s=result.extra.get("lp_seconds"),
                makespan_s=result.makespan,
                lower_bound_s=lb,
                ratio=result.makespan / lb,
                fits=result.fits,
            )
            records.append(rec)
            rows.append(
                [
                    algo,
                    n,
                    graph.num_edges,
                    f"{wall:.3f}",
                    f"{rec['cpu_s']:.3f}",
                    f"{rec['lp_s']:.3f}" if rec["lp_s"] is not None else "-",
                    f"{result.makespan:.3f}",
                    f"{rec['ratio']:.3f}",
                    "yes" if result.fits else "NO",
                ]
            )
            print(f"{algo} {n}: {wall:.3f} s wall, {prev:.3f} s CPU", flush=True)
    print_table(
        f"Placement wall time on {args.devices} memory-constrained devices (CPU)",
        ["algorithm", "nodes", "edges", "wall s", "CPU s", "LP s", "sim step s", "step/LB", "fits"],
        rows,
    )
    path = save_results("placement_speed", {"devices": args.devices, "runs": records}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
