"""The DDP comm hooks on 1-4 gloo ranks (and 2 NCCL GPUs): exactness, replica agreement,
bytes, checkpoints."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from scaledl.comm import CompressionState, compression_hook, get_compressor, register_compression

pytestmark = pytest.mark.dist

# ~300-byte buckets: DDP starts the 13-17-5 MLP (328 parameters) in one bucket and re-forms
# it into two of odd sizes (90 and 238) after the first iteration
BUCKET_MB = 0.0003
#: where the rank computes (the NCCL test switches it to the rank's GPU)
DEVICE = {"device": torch.device("cpu")}


def _make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 5)).to(DEVICE["device"])


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
    x, y = torch.randn(8, 13, generator=g), torch.randn(8, 5, generator=g)
    return x.to(DEVICE["device"]), y.to(DEVICE["device"])


def _flat(module: nn.Module, grads: bool = False) -> torch.Tensor:
    return torch.cat([(p.grad if grads else p).detach().reshape(-1) for p in module.parameters()])


def _identical_on_all_ranks(t: torch.Tensor) -> bool:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return all(torch.equal(o, out[0]) for o in out)


def _ddp(state: CompressionState | None) -> DDP:
    model = DDP(_make(), bucket_cap_mb=BUCKET_MB)
    if state is not None:
        state.bind(model)
        model.register_comm_hook(state, compression_hook)
    return model


def _train(model: DDP, opt: torch.optim.Optimizer, steps: range) -> bool:
    """SGD steps; True when parameters were bit-identical on all ranks after every step."""
    same = True
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        same &= _identical_on_all_ranks(_flat(model))
    return same


def _exact_mean_checks() -> dict:
    """Identity two-way / one-way / all-reduce == all_reduce mean; shortcut == two-way."""
    n = dist.get_world_size()
    x, y = _batch(0)
    ref = _make()
    nn.functional.mse_loss(ref(x), y).backward()
    mean = _flat(ref, grads=True)
    dist.all_reduce(mean)
    mean /= n
    out = {}
    for mode in ("two_way", "one_way", "allreduce"):
        state = CompressionState(
            "identity", mode=mode, ef="none", start_iter=0, min_compress_bytes=0
        )
        model = _ddp(state)
        nn.functional.mse_loss(model(x), y).backward()
        out[f"identity_{mode}_err"] = float((_flat(model, grads=True) - mean).abs().max())
    # shared-seed random-k: one all-reduce equals the two-way exchange with the same indices
    grads = {}
    for mode in ("two_way", "allreduce"):
        state = CompressionState(
            "randomk",
            compressor_kwargs={"ratio": 0.3},
            mode=mode,
            ef="none",
            start_iter=0,
            min_compress_bytes=0,
        )
        model = _ddp(state)
        nn.functional.mse_loss(model(x), y).backward()
        grads[mode] = _flat(model, grads=True)
    out["randomk_shortcut_err"] = float((grads["two_way"] - grads["allreduce"]).abs().max())
    out["randomk_nonzero_frac"] = float((grads["allreduce"] != 0).float().mean())
    return out


def _training_checks() -> dict:
    """Replicas stay bit-identical for every compressor/mode; bytes match payload sizes."""
    n = dist.get_world_size()
    configs = {
        "onebit_two_way": dict(compressor="onebit", mode="two_way"),
        "topk_two_way": dict(compressor="topk", compressor_kwargs={"ratio": 0.1}, mode="two_way"),
        "topk_one_way": dict(compressor="topk", compressor_kwargs={"ratio": 0.1}, mode="one_way"),
        "dithering_two_way": dict(compressor="dithering", mode="two_way"),
        "randomk_sparse": dict(
            compressor="randomk", compressor_kwargs={"ratio": 0.2}, mode="allreduce", ef="sparse"
        ),
        "fp16_auto": dict(compressor="fp16", mode="auto"),
        "onebit_nesterov_lr": dict(compressor="onebit", momentum=0.9, ef="lr_corrected"),
    }
    out = {}
    for name, cfg in configs.items():
        state = CompressionState(**cfg, start_iter=1, min_compress_bytes=0)
        model = _ddp(state)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        state.attach_optimizer(opt)
        out[f"{name}_same"] = _train(model, opt, range(4))
        comp = state.compressor
        # expected bytes this rank sent in the last (compressed) step
        expected = 0
        for b in state.buckets.values():
            if state.mode == "two_way":
                length = -(-b.numel // n)
                expected += 2 * (n - 1) * comp.payload_bytes(length)
            elif state.mode == "one_way":
                expected += (n - 1) * comp.payload_bytes(b.numel)
            else:
                length = -(-b.numel // n)
                expected += 2 * (n - 1) * n * comp.payload_bytes(length) // n
        out[f"{name}_bytes"] = (state.stats.history[-1], expected, len(state.buckets))
        out[f"{name}_mode"] = state.mode
    # the all-gather fallback of all-to-all gives the very same parameters
    runs = []
    for force_fallback in (False, True):
        state = CompressionState("onebit", start_iter=1, min_compress_bytes=0)
        if force_fallback:
            state._a2a_ok = False
        model = _ddp(state)
        _train(model, torch.optim.SGD(model.parameters(), lr=0.05), range(3))
        runs.append(_flat(model))
    out["fallback_equal"] = torch.equal(runs[0], runs[1])
    return out


def _checkpoint_checks() -> dict:
    """Resuming from state_dicts (model, optimizer, hook) continues the run.

    A resumed DDP runs its first iteration in its provisional bucket layout (parameter order
    and bucket sizes differ), so the error buffers are re-assembled per parameter. An
    element-wise compressor (fp16 with worker and server error feedback) does not depend on
    the layout, so the resumed run must be bit-identical: this checks the re-assembly.
    """
    out = {}
    for bucket_mb in (None, BUCKET_MB):

        def fresh(bucket_mb=bucket_mb):
            state = CompressionState("fp16", mode="two_way", start_iter=1, min_compress_bytes=0)
            model = DDP(_make(), bucket_cap_mb=bucket_mb)
            state.bind(model)
            model.register_comm_hook(state, compression_hook)
            return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), state

        model, opt, state = fresh()
        _train(model, opt, range(4))
        ckpt = copy.deepcopy(
            {"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}
        )
        _train(model, opt, range(4, 7))
        model2, opt2, state2 = fresh()
        model2.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["opt"])
        state2.load_state_dict(ckpt["hook"])
        _train(model2, opt2, range(4, 7))
        errors = [p["error"] for p in ckpt["hook"]["params"].values()]
        tag = "one_bucket" if bucket_mb is None else "small_buckets"
        out[f"{tag}_had_error_state"] = any(
            e is not None and bool(e.abs().sum() > 0) for e in errors
        )
        out[f"{tag}_resume_diff"] = float((_flat(model) - _flat(model2)).abs().max())
        out[f"{tag}_resets"] = state2.bucket_resets
        out[f"{tag}_pending_left"] = len(state2._pending)
    return out


def _all_checks() -> dict:
    if not dist.is_initialized():  # the launcher makes no group for one rank; DDP needs one
        dist.init_process_group("gloo")
    return {
        **_exact_mean_checks(),
        **_training_checks(),
        **_checkpoint_checks(),
        "register": _register_checks(),
        **_randomk_index_checks(),
    }


def _randomk_index_checks() -> dict:
    # every rank draws the same shared-seed indices on its own device (nothing is sent)
    idx = get_compressor("randomk", ratio=0.01, seed=5).indices_batch(
        100_003, [3, 4, 3], DEVICE["device"]
    )
    return {
        "randomk_indices_same": _identical_on_all_ranks(idx),
        "randomk_rows_by_key_same": torch.equal(idx[0], idx[2]) and not torch.equal(idx[0], idx[1]),
        "randomk_indices_in_range_same": bool(((idx >= 0) & (idx < 100_003)).all()),
    }


# 3 and 4 ranks on two cores take ~40-60 s each: slow, but part of the full suite
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "world_size", [1, 2, pytest.param(3, marks=SLOW), pytest.param(4, marks=SLOW)]
)
def test_hooks_on_gloo(run_dist, world_size):
    _check_results(run_dist(_all_checks, world_size), world_size)


def _nccl_checks() -> dict:
    DEVICE["device"] = torch.device("cuda", dist.get_rank())
    return _all_checks()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_hooks_on_nccl():
    from scaledl.distributed import launch

    _check_results(launch(_nccl_checks, 2, backend="nccl", timeout_s=300), 2)


def _check_results(results: list[dict], world_size: int) -> None:
    for r in results:
        for mode in ("two_way", "one_way", "allreduce"):
            assert r[f"identity_{mode}_err"] < 1e-6, (mode, r)
        assert r["randomk_shortcut_err"] < 1e-6
        assert 0.2 < r["randomk_nonzero_frac"] < 0.5  # 30% draws (with replacement) per shard
        for key, value in r.items():
            if key.endswith("_same"):
                assert value is True, key
            if key.endswith("_bytes"):
                sent, expected, buckets = value
                assert sent == expected, key
                assert buckets >= (2 if world_size > 1 else 1)  # buckets of odd sizes
        assert r["fp16_auto_mode"] == "allreduce"
        assert r["onebit_nesterov_lr_mode"] == "two_way"
        assert r["fallback_equal"]
        for tag in ("one_bucket", "small_buckets"):
            assert r[f"{tag}_resume_diff"] == 0.0
            assert r[f"{tag}_resets"] >= 1  # the resumed run met DDP's provisional layout
            assert r[f"{tag}_had_error_state"] and r[f"{tag}_pending_left"] == 0
        reg = r["register"]
        assert reg["lr"] == 0.1 and "once" in reg["second_register"]
        s = reg["summary"]
        assert s["steps"] == 3 and s["mode"] == "two_way"
        # 328 fp32 elements in one bucket: each phase moves n-1 one-bit shards of ceil(328/n)
        shard = -(-328 // world_size)
        shard_payload = 4 + -(-shard // 8)
        assert s["bytes_per_step"] == 2 * (world_size - 1) * shard_payload
        if world_size > 1:
            assert s["ratio_vs_fp32"] == pytest.approx(
                (2 * (world_size - 1) * 328 * 4 // world_size) / s["bytes_per_step"]
            )
            assert s["ratio_vs_fp16"] == pytest.approx(s["ratio_vs_fp32"] / 2)
    assert len({r["register"]["summary"]["total_bytes_sent"] for r in results}) == 1


def _register_checks() -> dict:
    model = DDP(_make())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = register_compression(model, "onebit", optimizer=opt, start_iter=0, min_compress_bytes=0)
    out = {"lr": state.current_lr()}
    try:
        model.register_comm_hook(state, compression_hook)
    except RuntimeError as exc:
        out["second_register"] = str(exc)
    _train(model, opt, range(3))
    out["summary"] = state.summary()
    return out


def test_state_validation_errors():
    with pytest.raises(ValueError, match="cannot be summed compressed"):
        CompressionState("onebit", mode="allreduce")
    with pytest.raises(ValueError, match="unknown mode"):
        CompressionState("onebit", mode="ring")
    with pytest.raises(ValueError, match="unknown ef"):
        CompressionState("onebit", ef="yes")
    with pytest.raises(ValueError, match="start_iter"):
        CompressionState("onebit", start_iter=-1)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        register_compression(nn.Linear(2, 2), "onebit")
    assert CompressionState(get_compressor("randomk"), mode="auto").mode == "allreduce"
