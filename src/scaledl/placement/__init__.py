"""Baechi: fast algorithmic device placement of training graphs on memory-limited devices.

Pipeline: :func:`trace` (torch.fx graph with shapes, bytes, parameters, costs) ->
:func:`training_graph` -> :func:`shrink` (colocation, single-consumer rule, fusion) ->
:func:`m_topo` / :func:`m_etf` / :func:`m_sct` (or the exact :func:`milp_place` for small
graphs) -> :func:`simulate` -> :class:`PlacedModule` to run it. :func:`place` does it all.
"""

from scaledl.placement.bounds import InfeasiblePlacementError, lower_bounds, min_devices
from scaledl.placement.cost_model import (
    GIB,
    NVLINK_COMM,
    PCIE_COMM,
    Cluster,
    CommCost,
    Roofline,
    copy_contention,
    fit_comm_cost,
    fit_copy_slowdown,
    transfer_sweep,
)
from scaledl.placement.executor import PlacedModule
from scaledl.placement.graph import (
    OpGraph,
    OpSpec,
    forward_graph,
    layered_graph,
    parallel_branches_graph,
    training_graph,
)
from scaledl.placement.m_etf import m_etf
from scaledl.placement.m_sct import m_sct
from scaledl.placement.m_topo import m_topo
from scaledl.placement.milp import milp_place
from scaledl.placement.pipeline import ALGORITHMS, Plan, place, place_graph
from scaledl.placement.shrink import ShrunkGraph, shrink
from scaledl.placement.simulator import (
    HostModel,
    HostTiming,
    PlacementResult,
    fit_host_model,
    host_launch_times,
    simulate,
)
from scaledl.placement.trace import TracedModel, trace

__all__ = [
    "ALGORITHMS",
    "GIB",
    "NVLINK_COMM",
    "PCIE_COMM",
    "Cluster",
    "CommCost",
    "HostModel",
    "HostTiming",
    "InfeasiblePlacementError",
    "OpGraph",
    "OpSpec",
    "PlacedModule",
    "PlacementResult",
    "Plan",
    "Roofline",
    "ShrunkGraph",
    "TracedModel",
    "copy_contention",
    "fit_comm_cost",
    "fit_copy_slowdown",
    "fit_host_model",
    "forward_graph",
    "host_launch_times",
    "layered_graph",
    "lower_bounds",
    "m_etf",
    "m_sct",
    "m_topo",
    "milp_place",
    "min_devices",
    "parallel_branches_graph",
    "place",
    "place_graph",
    "shrink",
    "simulate",
    "trace",
    "training_graph",
    "transfer_sweep",
]
