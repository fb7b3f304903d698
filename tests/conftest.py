"""Shared fixtures: run a function on N local gloo ranks."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def run_dist() -> Callable[..., list[Any]]:
    """``run_dist(fn, world_size, *args, timeout_s=..., **kwargs)`` on local gloo ranks.

    ``fn`` must be defined at module level (it is pickled into spawned processes); it runs with
    the default process group initialised and its return values come back in rank order.
    """
    from scaledl.distributed import launch

    def run(
        fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 240.0, **kwargs: Any
    ) -> list[Any]:
        return launch(fn, world_size, *args, backend="gloo", timeout_s=timeout_s, **kwargs)

    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
