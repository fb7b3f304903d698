"""Checks run on every rank of a gloo job; each returns max abs differences (or flags) so
that one launch covers many equivalences. Float64 tiny models keep round-off far below the
tolerances the tests use."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scaledl.comm import IdentityCompressor, ZeroCompressor, get_compressor
from scaledl.optim import (
    CSER,
    EFSGD,
    AdaAlter,
    LocalAdaAlter,
    LocalSGD,
    QSparseLocalSGD,
    RandomBlock,
    averaged_model,
)
from scaledl.optim._common import allreduce_wire_bytes
from scaledl.optim.random_block import BlockExchange

LR, MOM, WD = 0.05, 0.9, 1e-3
ACC0 = 0.5  # initial accumulator: keeps the first AdaAlter steps bounded


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # identical on every rank: no broadcast needed
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batch(step: int, rank: int, same_data: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + (0 if same_data else rank) + 17)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(8, 3, generator=g, dtype=torch.float64)


def grads(model: nn.Module, step: int, same_data: bool = False) -> None:
    model.zero_grad(set_to_none=True)
    x, y = batch(step, dist.get_rank(), same_data)
    nn.functional.mse_loss(model(x), y).backward()


def sgd(model: nn.Module, nesterov: bool = True) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOM, nesterov=nesterov, weight_decay=WD
    )


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    *,
    allreduce_grads: bool = False,
    same_data: bool = False,
    after: Callable[[int], None] | None = None,
) -> nn.Module:
    for t in steps:
        grads(model, t, same_data)
        if allreduce_grads:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        opt.step()
        if after is not None:
            after(t)
    return model


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def diff(a: nn.Module | torch.Tensor, b: nn.Module | torch.Tensor) -> float:
    a = flat(a) if isinstance(a, nn.Module) else a
    b = flat(b) if isinstance(b, nn.Module) else b
    return float((a - b).abs().max())


def spread(t: torch.Tensor) -> float:
    """Max abs difference of ``t`` across ranks."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return max(float((o - out[0]).abs().max()) for o in out)


def sync_reference(steps: int, nesterov: bool = True) -> nn.Module:
    m = make_model()
    return train(m, sgd(m, nesterov), range(steps), allreduce_grads=True)


def check_cser_sgd(steps: int = 7) -> dict[str, float]:
    out: dict[str, float] = {}
    for nesterov in (True, False):
        ref = sync_reference(steps, nesterov)
        m = make_model()
        opt = CSER(sgd(m, nesterov), IdentityCompressor(), IdentityCompressor(), 3)
        train(m, opt, range(steps))
        out[f"cser_identity_vs_sync_nesterov={nesterov}"] = diff(m, ref)
        out[f"cser_identity_residual_nesterov={nesterov}"] = max(
            float(e.abs().max()) for e in opt.residuals
        )
    ref = sync_reference(steps)
    m = make_model()
    train(m, CSER(sgd(m), RandomBlock(), RandomBlock(), 2, form="block"), range(steps))
    out["cser_block_full_vs_sync"] = diff(m, ref)
    m = make_model()
    train(m, EFSGD(sgd(m), IdentityCompressor()), range(steps))
    out["efsgd_identity_vs_sync"] = diff(m, ref)
    return out


def torch_local_sgd(steps: int, period: int) -> nn.Module:
    """PyTorch's own post-local SGD: averages after steps 0, H, 2H, ..."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    m = make_model()
    opt = PostLocalSGDOptimizer(sgd(m), PeriodicModelAverager(period=period, warmup_steps=0))
    return train(m, opt, range(steps))


def check_local_sgd(steps: int = 8, period: int = 3) -> dict[str, float]:
    out: dict[str, float] = {}
    ref = torch_local_sgd(steps, period)
    cases: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "local_sgd_vs_torch": lambda m: LocalSGD(sgd(m), period, sync_phase="start"),
        "cser_zero_identity_vs_torch": lambda m: CSER(
            sgd(m), ZeroCompressor(), IdentityCompressor(), period, sync_phase="start"
        ),
        "cser_block_layer0_vs_torch": lambda m: CSER(
            sgd(m), RandomBlock(layer=0.0), RandomBlock(), period, form="block"
        ),
        "qsparse_identity_vs_torch": lambda m: QSparseLocalSGD(
            sgd(m), IdentityCompressor(), period, sync_phase="start"
        ),
    }
    for name, factory in cases.items():
        m = make_model()
        train(m, factory(m), range(steps))
        out[name] = diff(m, ref)
    # The local models really diverge between syncs (else the check above is vacuous).
    m = make_model()
    train(m, LocalSGD(sgd(m), period, sync_phase="start"), range(2))
    out["local_models_spread_between_syncs"] = spread(flat(m))
    return out


def check_cser_invariants(steps: int = 6) -> dict[str, float]:
    out: dict[str, float] = {}
    configs = {
        "topk_block": (get_compressor("topk", ratio=0.3), RandomBlock(dim0=0.5)),
        "randomk_onebit": (get_compressor("randomk", ratio=0.3), get_compressor("onebit")),
        "block_identity": (RandomBlock(dim0=0.5, layer=0.7), IdentityCompressor()),
    }
    for name, (c1, c2) in configs.items():
        m = make_model()
        opt = CSER(sgd(m), c1, c2, 3, seed=5)
        worst_hat = worst_x = 0.0

        def after(t: int, m=m, opt=opt) -> None:
            nonlocal worst_hat, worst_x
            hat = flat(m) - torch.cat([e.reshape(-1) for e in opt.residuals])
            worst_hat = max(worst_hat, spread(hat))
            worst_x = max(worst_x, spread(flat(m)))

        train(m, opt, range(steps), after=after)
        out[f"x_minus_e_spread_{name}"] = worst_hat
        out[f"x_spread_{name}"] = worst_x  # must be > 0: residuals really are local
    # C2 = identity: every model equal right after each reset.
    m = make_model()
    opt = CSER(sgd(m), get_compressor("topk", ratio=0.3), IdentityCompressor(), 3)
    after_reset = []
    train(
        m, opt, range(6), after=lambda t: after_reset.append(spread(flat(m))) if t % 3 == 2 else 0
    )
    out["x_spread_after_identity_reset"] = max(after_reset)
    return out


def check_blocks(steps: int = 5) -> dict[str, Any]:
    """Random-block choices agree on all ranks, synced blocks are identical, bytes match."""
    m = make_model()
    c1, c2 = RandomBlock(dim0=0.4, dim1=0.5, layer=0.8), RandomBlock(dim0=0.5)
    opt = CSER(sgd(m), c1, c2, 2, form="block", seed=11)
    params = list(m.parameters())
    hashes, block_spread, bytes_ok = [], 0.0, True
    world = dist.get_world_size()

    def after(t: int) -> None:
        nonlocal block_spread, bytes_ok
        ex = BlockExchange(c2 if opt.is_reset_step(t) else c1)
        from scaledl.optim._common import derive_key

        key = derive_key(opt.seed, t, 1)
        sels = ex.selections(params, key)
        hashes.append(hashlib.sha256(repr(sels).encode()).hexdigest())
        for p, s in zip(params, sels):
            if s is not None:
                block_spread = max(block_spread, spread(p.detach()[s].clone()))
        n = ex.payload_numel([p.shape for p in params], key)
        bytes_ok &= opt.stats.history[-1] == allreduce_wire_bytes(8 * n, world)

    train(m, opt, range(steps), after=after)
    digest = hashlib.sha256("".join(hashes).encode()).digest()
    d = torch.tensor(list(digest), dtype=torch.float64)
    return {
        "block_hash_spread": spread(d),
        "synced_block_spread": block_spread,
        "block_bytes_match": bytes_ok,
        "model_spread": spread(flat(m)),
    }


def _manual_adaalter(
    model: nn.Module, lr: float, eps: float, acc: list[torch.Tensor], g_step: list, g_acc: list
) -> None:
    with torch.no_grad():
        for p, b, gs, ga in zip(model.parameters(), acc, g_step, g_acc):
            p.sub_(lr * gs / torch.sqrt(b + eps))
            b.add_(ga)


def check_adaalter(warmup: int = 3, steps: int = 8) -> dict[str, Any]:
    out: dict[str, Any] = {}
    world = dist.get_world_size()
    lr, eps = 0.1, 1e-7
    # (a) warm-up == AdaAlter on all-reduced gradients with the linear ramp.
    m = make_model()
    train(
        m,
        LocalAdaAlter(
            m.parameters(), lr=lr, period=4, warmup_steps=warmup, initial_accumulator_value=ACC0
        ),
        range(warmup),
    )
    r = make_model()
    ref = AdaAlter(r.parameters(), lr=lr, initial_accumulator_value=ACC0)
    for t in range(warmup):
        ref.param_groups[0]["lr"] = lr * (t + 1) / warmup
        train(r, ref, range(t, t + 1), allreduce_grads=True)
    out["warmup_vs_adaalter_allreduced"] = diff(m, r)
    # (b) H = 1 == mean(g) in the step, mean(g²) in the accumulator.
    m = make_model()
    train(
        m,
        LocalAdaAlter(m.parameters(), lr=lr, period=1, initial_accumulator_value=ACC0),
        range(steps),
    )
    r = make_model()
    acc = [torch.full_like(p, ACC0) for p in r.parameters()]
    for t in range(steps):
        grads(r, t)
        gs, ga = [], []
        for p in r.parameters():
            g, g2 = p.grad.clone(), p.grad * p.grad
            dist.all_reduce(g)
            dist.all_reduce(g2)
            gs.append(g / world)
            ga.append(g2 / world)
        _manual_adaalter(r, lr, eps, acc, gs, ga)
    out["h1_vs_mean_g_mean_g2"] = diff(m, r)
    # (c) identical data on every rank, H = 1 == synchronous AdaAlter (with H > 1 the frozen
    # denominator differs from AdaAlter's per-step one, by design).
    m = make_model()
    opt = LocalAdaAlter(
        m.parameters(), lr=lr, period=1, warmup_steps=2, initial_accumulator_value=ACC0
    )
    train(m, opt, range(steps), same_data=True)
    r = make_model()
    ref = AdaAlter(r.parameters(), lr=lr, initial_accumulator_value=ACC0)
    for t in range(steps):
        ref.param_groups[0]["lr"] = lr * min(1.0, (t + 1) / 2)
        train(r, ref, range(t, t + 1), same_data=True)
    out["same_data_vs_sync_adaalter"] = diff(m, r)
    # (d) invariants: B frozen between syncs, B_i - B = Σ g_i² since the sync, x and B equal
    # on all ranks after each sync; bytes = 2x model per sync.
    period = 3
    m = make_model()
    opt = LocalAdaAlter(
        m.parameters(), lr=lr, period=period, warmup_steps=1, initial_accumulator_value=ACC0
    )
    params = list(m.parameters())
    frozen_err = sumsq_err = sync_spread = 0.0
    sq = [torch.zeros_like(p) for p in params]
    bytes_ok = True
    for t in range(steps):
        grads(m, t)
        before = [opt.state[p]["sum"].clone() if "sum" in opt.state[p] else None for p in params]
        for s, p in zip(sq, params):
            s.add_(p.grad * p.grad)
        opt.step()
        local_step = t + 1 - 1
        if local_step >= 1 and local_step % period != 0:
            for p, b, s in zip(params, before, sq):
                frozen_err = max(frozen_err, float((opt.state[p]["sum"] - b).abs().max()))
                d = opt.state[p]["local_sum"] - opt.state[p]["sum"] - s
                sumsq_err = max(sumsq_err, float(d.abs().max()))
        if local_step == 0 or local_step % period == 0:
            for s in sq:
                s.zero_()
        if local_step >= 1 and local_step % period == 0:
            state = torch.cat([opt.state[p]["sum"].reshape(-1) for p in params])
            sync_spread = max(sync_spread, spread(flat(m)), spread(state))
            numel = sum(p.numel() for p in params)
            bytes_ok &= opt.stats.history[-1] == allreduce_wire_bytes(2 * 8 * numel, world)
        elif local_step >= 1:
            bytes_ok &= opt.stats.history[-1] == 0
    out.update(
        accumulator_frozen_err=frozen_err,
        local_sum_err=sumsq_err,
        after_sync_spread=sync_spread,
        adaalter_bytes_ok=bytes_ok,
        local_spread=spread(flat(m)) if steps % period else None,
    )
    return out


RESUMABLE: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "cser_update": lambda m: CSER(
        sgd(m), get_compressor("randomk", ratio=0.3), RandomBlock(dim0=0.5, layer=0.6), 3, seed=3
    ),
    "cser_block": lambda m: CSER(
        sgd(m), RandomBlock(dim0=0.4, layer=0.7), RandomBlock(dim0=0.5), 3, form="block", seed=3
    ),
    "efsgd": lambda m: EFSGD(sgd(m), get_compressor("topk", ratio=0.3)),
    "qsparse": lambda m: QSparseLocalSGD(sgd(m), get_compressor("topk", ratio=0.3), 2),
    "local_sgd": lambda m: LocalSGD(sgd(m), 3),
    "local_adaalter": lambda m: LocalAdaAlter(m.parameters(), lr=0.1, period=2, warmup_steps=2),
}


def check_resume(total: int = 8, cut: int = 4) -> dict[str, bool]:
    out = {}
    for name, factory in RESUMABLE.items():
        m = make_model()
        train(m, factory(m), range(total))
        m1 = make_model()
        o1 = factory(m1)
        train(m1, o1, range(cut))
        ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict()})
        m2 = make_model(seed=99)  # a different start: everything must come from the checkpoint
        o2 = factory(m2)
        m2.load_state_dict(ckpt["model"])
        o2.load_state_dict(ckpt["opt"])
        train(m2, o2, range(cut, total))
        out[name] = torch.equal(flat(m), flat(m2))
    return out


def check_averaged_model() -> dict[str, float]:
    m = make_model()
    train(m, LocalSGD(sgd(m), 100), range(2))
    local = flat(m).clone()
    mean = local.clone()
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    with averaged_model(m):
        inside = diff(m, mean)
        inside_spread = spread(flat(m))
    return {
        "avg_inside_err": inside,
        "avg_inside_spread": inside_spread,
        "avg_restored": diff(m, local),
    }


def check_ddp(steps: int = 6) -> dict[str, float]:
    """With DDP and the optimizers' hooks, training equals training without DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name, factory in {
        "cser": lambda m: CSER(sgd(m), get_compressor("topk", ratio=0.3), RandomBlock(), 2),
        "local_adaalter": lambda m: LocalAdaAlter(m.parameters(), lr=0.1, period=2, warmup_steps=3),
    }.items():
        ref = make_model()
        train(ref, factory(ref), range(steps))
        m = make_model()
        ddp = DDP(m)
        opt = factory(m)
        opt.attach_ddp(ddp)
        for t in range(steps):
            opt.zero_grad()
            x, y = batch(t, dist.get_rank())
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        out[f"ddp_{name}"] = diff(m, ref)
    return out


def run_all(ddp: bool = False, light: bool = False) -> dict[str, Any]:
    """Every check; ``light`` leaves out the world-size-independent ones (checkpoint resume,
    averaged-model restore), which the smaller worlds cover."""
    checks = [check_cser_sgd, check_local_sgd, check_cser_invariants, check_blocks, check_adaalter]
    if not light:
        checks += [check_resume, check_averaged_model]
    out: dict[str, Any] = {}
    for check in checks:
        out.update(check())
    if ddp:
        out.update(check_ddp())
    return out
