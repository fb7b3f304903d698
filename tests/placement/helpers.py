"""Small models and graphs shared by the placement tests (also a ``module:function`` target)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from scaledl.placement import OpGraph


def random_dag(n: int, seed: int, *, p_edge: float = 0.3, bytes_range=(1_000, 200_000)) -> OpGraph:
    """A random DAG on n nodes (edges only forward in index order)."""
    rng = np.random.default_rng(seed)
    g = OpGraph()
    for i in range(n):
        g.add_node(
            f"v{i}",
            float(rng.uniform(1e-4, 1e-3)),
            permanent=int(rng.integers(1_000, 100_000)),
            temporary=int(rng.integers(0, 50_000)),
        )
    out = rng.integers(*bytes_range, size=n)  # one output tensor per node
    for v in range(1, n):
        for u in range(v):
            if rng.random() < p_edge:
                g.add_edge(u, v, [(u, int(out[u]))])
    return g


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def tiny_model():
    """``tests.placement.helpers:tiny_model`` for the CLI's ``package.module:function``."""
    torch.manual_seed(0)
    return TinyMLP(), (torch.randn(4, 8),)
