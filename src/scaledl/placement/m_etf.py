"""m-ETF: memory-constrained Earliest Task First (Baechi spec §2.4).

An event-driven list scheduler that places and schedules together: among ready ops and
devices it repeatedly starts the pair with the earliest ``schedule_ts`` (ties by BFS topo order,
then device index), only where the op fits in memory; a colocation group is placed whole on the
device of its first op. Classical bound (Hwang et al. 1989, contention-free, ample memory):
makespan <= (2 - 1/m) * OPT_without_comm + C_max.
"""

from __future__ import annotations

import time

from scaledl.placement.cost_model import Cluster
from scaledl.placement.graph import OpGraph
from scaledl.placement.list_scheduler import ListScheduler
from scaledl.placement.simulator import PlacementResult, finish


class ETFScheduler(ListScheduler):
    algorithm = "m-etf"


def m_etf(graph: OpGraph, cluster: Cluster, *, contention: str | None = None) -> PlacementResult:
    """Place ``graph`` on ``cluster`` with m-ETF; raises ``InfeasiblePlacementError``."""
    t0 = time.perf_counter()
    sched = ETFScheduler(graph, cluster, contention=contention).run()
    return finish("m-etf", graph, cluster, sched, t0)
