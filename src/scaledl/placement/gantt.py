"""Gantt chart of a simulated schedule: one row per device, ops coloured by kind."""

from __future__ import annotations

from pathlib import Path

from scaledl.placement.graph import OpGraph
from scaledl.placement.list_scheduler import Schedule

_COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "optimizer": "#55A868", "op": "#8172B3"}


def draw_gantt(
    graph: OpGraph, schedule: Schedule, path: str | Path, *, title: str = "", n_devices: int = 0
) -> Path:
    """Write a PNG: ops as bars per device row, transfers as thin bars under their receiver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    m = max(n_devices, int(schedule.device.max()) + 1 if len(graph) else 1)
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.8 * m))
    scale = 1e3  # milliseconds
    for i in range(len(graph)):
        d = int(schedule.device[i])
        ax.broken_barh(
            [(schedule.start[i] * scale, (schedule.end[i] - schedule.start[i]) * scale)],
            (d - 0.35, 0.55),
            facecolors=_COLORS.get(graph.kind[i], "#8172B3"),
            edgecolor="white",
            linewidth=0.3,
        )
    for t in schedule.transfers:
        ax.broken_barh(
            [(t.start * scale, (t.end - t.start) * scale)],
            (t.dst + 0.25, 0.12),
            facecolors="#C44E52",
        )
    ax.set_yticks(range(m), [f"device {d}" for d in range(m)])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title or f"schedule: {schedule.makespan * scale:.3g} ms")
    kinds = sorted({k for k in graph.kind})
    handles = [Patch(color=_COLORS.get(k, "#8172B3"), label=k) for k in kinds]
    handles.append(Patch(color="#C44E52", label="transfer (to device)"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(handles))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
