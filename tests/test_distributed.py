import time

import pytest
import torch
import torch.distributed as dist

from scaledl.distributed import (
    default_backend,
    find_free_port,
    get_rank,
    get_world_size,
    init_from_env,
    launch,
)
from scaledl.errors import RankError

pytestmark = pytest.mark.dist


def _allreduce() -> list[float]:
    t = torch.arange(3, dtype=torch.float32) + dist.get_rank()
    dist.all_reduce(t)
    return [dist.get_rank(), dist.get_world_size(), *t.tolist()]


def _fail_on_rank_2() -> int:
    if dist.get_rank() == 2:
        raise RuntimeError("boom on purpose")
    # The healthy ranks block in a collective that rank 2 never joins.
    t = torch.ones(1)
    dist.all_reduce(t)
    return 0


def _sleep_forever() -> None:
    time.sleep(3600)


def _add(a: int, b: int = 0) -> int:
    return a + b + dist.get_rank()


def test_allreduce_on_4_gloo_ranks(run_dist):
    out = run_dist(_allreduce, 4)
    for rank, row in enumerate(out):
        assert row[:2] == [rank, 4]
        # sum over ranks r of (i + r) = 4 i + 6
        assert row[2:] == [6.0, 10.0, 14.0]


def test_failure_in_rank_2_surfaces_with_rank_and_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(_fail_on_rank_2, 4, timeout_s=60)
    assert time.monotonic() - t0 < 60
    err = info.value
    assert err.rank == 2
    assert "boom on purpose" in str(err)
    assert "_fail_on_rank_2" in err.traceback_text


def test_timeout_is_bounded():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="did not finish within 3 s"):
        launch(_sleep_forever, 2, timeout_s=3)
    assert time.monotonic() - t0 < 20


def test_args_and_kwargs_reach_every_rank(run_dist):
    assert run_dist(_add, 3, 10, b=5) == [15, 16, 17]


def test_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        launch(_add, 0, 1)
    with pytest.raises(ValueError, match="unknown backend"):
        launch(_add, 1, 1, backend="mpi-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            launch(_add, 1, 1, backend="nccl")


def test_single_process_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_from_env("gloo")
    assert (info.rank, info.world_size, info.backend) == (0, 1, "gloo")
    assert get_rank() == 0 and get_world_size() == 1
    assert not dist.is_initialized()


def test_init_from_env_needs_master(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_from_env("gloo")


def test_backend_choice_and_port():
    assert default_backend("cpu") == "gloo"
    assert 0 < find_free_port() < 65536
