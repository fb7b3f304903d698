"""Time to a target loss over a limited link: sync SGD vs CSER vs local SGD vs Local AdaAlter.

Full mode: 2 GPU ranks, NCCL forced onto TCP sockets over ``lo``
(``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=lo``), a
~67M-parameter residual MLP regressing a fixed random teacher. With ``--tc PATH --rate
10gbit`` the loopback link is shaped with ``tc qdisc replace dev lo root tbf rate R burst 4mb
latency 100ms mtu 100000`` (removed at the end); without ``--tc`` it is unshaped.

Every method trains from the same initial model on the same data stream for at most
``--budget-s`` seconds of training (evaluation excluded from the clock). The target loss is
sync SGD's final held-out loss times ``1 + --slack`` (or ``--target-loss``); each method's
time to target is the training time when its **averaged** model's held-out loss first reaches
it (checked every ``--eval-every-s`` seconds of training).

    PYTHONPATH=src python bench/optim_gpu_link.py --tc /usr/sbin/tc --rate 10gbit   # 2 GPUs
    PYTHONPATH=src python bench/optim_gpu_link.py --quick                          # CPU, gloo

Needs only torch (and ``tc`` with CAP_NET_ADMIN for shaping).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import torch
import torch.distributed as dist
from common import print_table, save_results
from link import NCCL_SOCKET_ENV, LinkShaper
from torch import nn

from scaledl.comm.accounting import CommStats
from scaledl.distributed import launch
from scaledl.optim import CSER, LocalAdaAlter, LocalSGD, RandomBlock, averaged_model
from scaledl.optim._common import allreduce_mean_packed_, dense_model_bytes

#: (label, kind, options); lr for the SGD family and for Local AdaAlter
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("sync SGD", "sgd", {}),
    ("CSER block 33x", "cser", {"r1": 64, "r2": 4, "period": 16}),
    ("CSER block 260x", "cser", {"r1": 512, "r2": 16, "period": 32}),
    ("local SGD H=16", "local-sgd", {"period": 16}),
    ("Local AdaAlter H=8", "local-adaalter", {"period": 8}),
]


def _methods(cfg: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """METHODS, with one Local AdaAlter run per learning rate of ``--ada-lr`` (a grid)."""
    lrs = cfg["ada_lr"]
    out = []
    for label, kind, opts in METHODS:
        if kind == "local-adaalter" and len(lrs) > 1:
            out += [(f"{label} lr {lr:g}", kind, {**opts, "lr": lr}) for lr in lrs]
        else:
            out.append((label, kind, opts))
    return out


class ResidualMLP(nn.Module):
    """``depth`` pre-LN residual blocks of width ``width``: 16 x 2048 gives ~67M parameters."""

    def __init__(self, d_in: int, width: int, depth: int, d_out: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def _teacher_batch(
    teacher: tuple[torch.Tensor, torch.Tensor], n: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    w1, w2 = teacher
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, w1.shape[0], generator=g).to(device)
    return x, torch.tanh(x @ w1) @ w2


def _build(kind: str, opts: dict[str, Any], model: nn.Module, cfg: dict[str, Any]):
    params = list(model.parameters())
    if kind == "local-adaalter":
        opt = LocalAdaAlter(
            params,
            lr=opts.get("lr", cfg["ada_lr"][0]),
            period=opts["period"],
            warmup_steps=cfg["ada_warmup"],
            initial_accumulator_value=cfg["ada_init"],
            update_clip=cfg["ada_update_clip"],
        )
        return opt, False
    sgd = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, nesterov=True)
    if kind == "sgd":
        return sgd, True
    if kind == "local-sgd":
        return LocalSGD(sgd, opts["period"]), False
    c1, c2 = RandomBlock.for_ratio(opts["r1"]), RandomBlock.for_ratio(opts["r2"])
    return CSER(sgd, c1, c2, opts["period"], form="block", seed=1), False


def _rank_main(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    rank = dist.get_rank()
    world = dist.get_world_size()
    device = torch.device("cuda", rank) if cfg["cuda"] else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator().manual_seed(123)
    d_in, d_out = cfg["d_in"], cfg["d_out"]
    teacher = (
        (torch.randn(d_in, 4 * d_out, generator=g) / d_in**0.5).to(device),
        (torch.randn(4 * d_out, d_out, generator=g) / (4 * d_out) ** 0.5).to(device),
    )
    x_val, y_val = _teacher_batch(teacher, 2048, 10**9, device)
    # Warm up kernels and the communicator, so the first method does not pay for them.
    warm = ResidualMLP(d_in, cfg["width"], cfg["depth"], d_out).to(device)
    for i in range(3):
        x, y = _teacher_batch(teacher, cfg["batch"], -1 - i, device)
        nn.functional.mse_loss(warm(x), y).backward()
        allreduce_mean_packed_([p.grad for p in warm.parameters()])
    del warm
    out = []
    target = cfg["target_loss"]
    for label, kind, opts in _methods(cfg):
        torch.manual_seed(0)
        model = ResidualMLP(d_in, cfg["width"], cfg["depth"], d_out).to(device)
        opt, sync_grads = _build(kind, opts, model, cfg)
        stats: CommStats = CommStats() if sync_grads else opt.stats
        dense = dense_model_bytes(model.parameters(), world)
        clock, step, curve, reached, next_eval = 0.0, 0, [], None, cfg["eval_every_s"]
        step_times: list[float] = []
        while clock < cfg["budget_s"] and step < cfg["max_steps"]:
            x, y = _teacher_batch(teacher, cfg["batch"], step * 1000 + rank, device)
            if cfg["cuda"]:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            if sync_grads:
                stats.record(
                    "grad", allreduce_mean_packed_([p.grad for p in model.parameters()]), dense
                )
                stats.end_step()
            opt.step()
            if cfg["cuda"]:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            # Every rank must agree on when to stop: take the slowest rank's clock.
            t = torch.tensor([dt], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            clock += float(t)
            step_times.append(float(t))
            step += 1
            done = clock >= cfg["budget_s"] or step >= cfg["max_steps"]
            if clock >= next_eval or done:
                next_eval = clock + cfg["eval_every_s"]
                with averaged_model(model), torch.no_grad():
                    val = float(nn.functional.mse_loss(model(x_val), y_val))
                curve.append({"step": step, "train_s": clock, "val_loss": val})
                if target is not None and reached is None and val <= target:
                    reached = {"time_s": clock, "step": step}
                if not math.isfinite(val):  # diverged: nothing more to learn from this run
                    break
        if target is None:  # the first method (sync SGD) defines it
            target = curve[-1]["val_loss"] * (1 + cfg["slack"])
            for c in curve:
                if c["val_loss"] <= target:
                    reached = {"time_s": c["train_s"], "step": c["step"]}
                    break
        step_times.sort()
        out.append(
            {
                "method": label,
                "steps": step,
                "train_s": clock,
                "median_step_s": step_times[len(step_times) // 2],
                "final_val_loss": curve[-1]["val_loss"] if curve else None,
                "target_loss": target,
                "time_to_target_s": reached["time_s"] if reached else None,
                "steps_to_target": reached["step"] if reached else None,
                "bytes_per_step": stats.total_sent / max(1, stats.steps),
                "ratio_vs_fp32": stats.ratio_fp32,
                "curve": curve,
            }
        )
        del model, opt
        if cfg["cuda"]:
            torch.cuda.empty_cache()
    return out


def _lr_list(text: str) -> list[float]:
    try:
        lrs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--ada-lr: not a comma-separated list of numbers: {text!r}") from None
    if not lrs or any(lr <= 0 for lr in lrs):
        raise SystemExit(f"--ada-lr needs positive learning rates, got {text!r}")
    return lrs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU, gloo, small model (< 2 min)")
    ap.add_argument("--tc", default=None, help="path of the tc binary: shape lo with --rate")
    ap.add_argument("--rate", default="10gbit", help="tbf rate when --tc is given")
    ap.add_argument("--budget-s", type=float, default=None, help="training seconds per method")
    ap.add_argument(
        "--eval-every-s", type=float, default=None, help="training seconds between evaluations"
    )
    ap.add_argument("--target-loss", type=float, default=None, help="default: sync SGD's final")
    ap.add_argument("--slack", type=float, default=0.02, help="target = sync SGD final x (1+s)")
    ap.add_argument("--lr", type=float, default=0.02, help="SGD-family learning rate")
    ap.add_argument(
        "--ada-lr",
        default="0.01",
        help="Local AdaAlter learning rate; a comma-separated list runs one per value",
    )
    ap.add_argument("--ada-init", type=float, default=0.0, help="AdaAlter initial accumulator")
    ap.add_argument("--ada-warmup", type=int, default=20, help="Local AdaAlter warm-up steps")
    ap.add_argument(
        "--ada-update-clip",
        type=float,
        default=1.0,
        help="AdaAlter per-coordinate clip of g/sqrt(B+eps) (<= 0: off, the unguarded rule "
        "that diverged with a zero initial accumulator)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cuda = not args.quick and torch.cuda.is_available()
    if not args.quick and torch.cuda.device_count() < 2:
        raise SystemExit("full mode needs 2 CUDA GPUs; use --quick on CPU")
    cfg = {
        "cuda": cuda,
        "d_in": 256 if cuda else 32,
        "d_out": 256 if cuda else 16,
        "width": 2048 if cuda else 128,
        "depth": 16 if cuda else 3,
        "batch": 256 if cuda else 32,
        "lr": args.lr,
        "ada_lr": _lr_list(args.ada_lr),
        "ada_init": args.ada_init,
        "ada_warmup": args.ada_warmup,
        "ada_update_clip": args.ada_update_clip if args.ada_update_clip > 0 else None,
        "budget_s": args.budget_s or (25.0 if cuda else 6.0),
        "max_steps": 5000 if cuda else 400,
        "eval_every_s": args.eval_every_s or (1.5 if cuda else 0.5),
        "target_loss": args.target_loss,
        "slack": args.slack,
    }
    n_params = sum(
        p.numel()
        for p in ResidualMLP(cfg["d_in"], cfg["width"], cfg["depth"], cfg["d_out"]).parameters()
    )
    link = "unshaped loopback"
    env = dict(NCCL_SOCKET_ENV) if cuda else {}
    shaper = LinkShaper(args.tc) if args.tc else None
    if shaper is not None:
        if shaper.apply(args.rate):
            link = f"lo shaped to {args.rate} (tc tbf)"
        else:
            link = f"unshaped loopback ({shaper.reason})"
    print(
        f"{n_params / 1e6:.1f}M parameters, 2 ranks, {'NCCL over sockets' if cuda else 'gloo'}, "
        f"{link}",
        file=sys.stderr,
    )
    try:
        start = time.perf_counter()
        results = launch(
            _rank_main, 2, cfg, backend="nccl" if cuda else "gloo", env=env, timeout_s=600
        )[0]
        total = time.perf_counter() - start
    finally:
        if shaper is not None:
            shaper.clear()
    sync = results[0]
    rows = []
    for r in results:
        speedup = (
            sync["time_to_target_s"] / r["time_to_target_s"]
            if r["time_to_target_s"] and sync["time_to_target_s"]
            else None
        )
        rows.append(
            [
                r["method"],
                r["steps"],
                round(r["median_step_s"] * 1e3, 1),
                round(r["bytes_per_step"] / 1e6, 2),
                round(r["ratio_vs_fp32"], 1),
                round(r["final_val_loss"], 4) if r["final_val_loss"] is not None else "-",
                round(r["time_to_target_s"], 1)
                if r["time_to_target_s"] is not None
                else "not reached",
                round(speedup, 2) if speedup else "-",
            ]
        )
    print_table(
        f"time to val loss {sync['target_loss']:.4f} ({link}; {n_params / 1e6:.0f}M params)",
        [
            "method",
            "steps",
            "step ms",
            "MB/step/rank",
            "ratio",
            "final val loss",
            "time to target s",
            "speed-up vs sync",
        ],
        rows,
    )
    print(f"total wall time {total:.0f} s")
    path = save_results(
        "optim_gpu_link_quick" if args.quick else "optim_gpu_link",
        {"link": link, "params": n_params, "config": cfg, "total_wall_s": total, "runs": results},
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
