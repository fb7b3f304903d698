"""LEMON savings at small scale: expanded small model vs. the large model from scratch.

For each task (a ViT on procedural 32x32 shape images, a BERT-style byte-level masked LM on the
Python standard library's source text), in one run:

1. train a small model S; train the large model T from scratch for N steps -> final loss l*;
2. expand S to T's size with LEMON (canceling new layers), LEMON with zero-output new layers,
   and symmetric Net2Net-style duplication; train each with the LEMON schedule (same peak LR,
   fresh AdamW, cosine compressed into a budget of f * N steps, for several f);
3. report the steps and FLOPs each needs to reach l*, excluding and including S's training.

Only torch and the standard library are needed (plus scaledl via ``PYTHONPATH=src``). Full mode
(auto-detects CUDA, bf16 autocast) is sized for about 8 minutes on one H100 for both tasks;
``--quick`` runs tiny sizes on CPU in under 2 minutes.

    PYTHONPATH=src python bench/lemon_savings.py --task both
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, save_results

from scaledl.expansion import (
    PreLNTransformer,
    TransformerConfig,
    expand,
    lemon_schedule,
)

MASK_ID = 256  # byte-level MLM: 256 byte values + one [MASK] symbol
VARIANTS = {
    # name: (expand() keyword arguments, description)
    "lemon": ({"depth_init": "cancel"}, "LEMON, canceling new layers"),
    "lemon-zero": ({"depth_init": "zero"}, "LEMON width, zero-output new layers"),
    "net2net": ({"split": "net2net", "depth_init": "zero"}, "symmetric duplication"),
}


@dataclass
class Setup:
    """Sizes and budgets of one task."""

    small: TransformerConfig
    hidden: int
    layers: int
    steps: int  # from-scratch budget N of the large model
    small_steps: int
    batch: int
    lr: float
    weight_decay: float
    budgets: tuple[float, ...]
    eval_every: int
    eval_batches: int
    seq_len: int = 0


# --------------------------------------------------------------------------- data


def shapes_batch(n: int, size: int, gen: torch.Generator, device: torch.device):
    """Procedural images of 10 shape classes at random position, scale, rotation and colour,
    with pixel noise; returns (images (n, 3, size, size), labels (n,))."""

    def r(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    labels = torch.randint(0, 10, (n,), generator=gen, device=device)
    ax = torch.linspace(-1, 1, size, device=device) * size / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    cx, cy = (r(n, 1, 1) - 0.5) * size * 0.4, (r(n, 1, 1) - 0.5) * size * 0.4
    s = size * (0.12 + 0.16 * r(n, 1, 1))
    th = r(n, 1, 1) * math.pi
    u = (xx - cx) * torch.cos(th) + (yy - cy) * torch.sin(th)
    v = -(xx - cx) * torch.sin(th) + (yy - cy) * torch.cos(th)
    rad = torch.sqrt(u**2 + v**2)
    au, av = u.abs(), v.abs()
    masks = torch.stack(
        [
            rad < s,  # disk
            torch.maximum(au, av) < s,  # square
            (rad - s).abs() < 1.5,  # ring
            ((au < s / 3) & (av < s)) | ((av < s / 3) & (au < s)),  # cross
            (v > -s / 2) & (v < s - 2 * au),  # triangle
            (torch.sin(u * 2.5) > 0) & (rad < s),  # striped disk
            (torch.sin(u * 1.6) * torch.sin(v * 1.6) > 0) & (torch.maximum(au, av) < s),
            au + av < s,  # diamond
            (u / s) ** 2 + (v / (0.45 * s)) ** 2 < 1,  # ellipse
            (au < 1.5) & (av < s),  # bar
        ],
        dim=1,
    ).float()
    mask = masks[torch.arange(n, device=device), labels]
    bg = r(n, 3, 1, 1)
    sign = torch.where(r(n, 3, 1, 1) < 0.5, -1.0, 1.0)
    delta = sign * (0.4 + 0.4 * r(n, 1, 1, 1))  # random colour shift of the shape
    img = bg + delta * mask[:, None]
    img = img + 0.3 * torch.randn(img.shape, generator=gen, device=device)
    return (img - 0.5) / 0.5, labels


def stdlib_text(max_bytes: int) -> torch.Tensor:
    """Bytes of the Python standard library's own source files (sorted, deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 100_000:
        raise RuntimeError(f"found only {total} bytes of standard-library text under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def mlm_batch(text: torch.Tensor, n: int, seq: int, gen: torch.Generator):
    """BERT masking of random windows: 15% targets, 80% [MASK], 10% random byte, 10% kept."""
    device = text.device
    start = torch.randint(0, text.numel() - seq, (n, 1), generator=gen, device=device)
    ids = text[start + torch.arange(seq, device=device)]
    pick = torch.rand(n, seq, generator=gen, device=device) < 0.15
    action = torch.rand(n, seq, generator=gen, device=device)
    inputs = ids.clone()
    inputs[pick & (action < 0.8)] = MASK_ID
    rnd = pick & (action >= 0.8) & (action < 0.9)
    inputs[rnd] = torch.randint(0, 256, (int(rnd.sum()),), generator=gen, device=device)
    targets = torch.where(pick, ids, torch.full_like(ids, -100))
    return inputs, targets


class Task:
    """Batches and loss of one task; the evaluation set is fixed."""

    def __init__(self, name: str, setup: Setup, device: torch.device, quick: bool) -> None:
        self.name, self.setup, self.device = name, setup, device
        self.gen = torch.Generator(device=device).manual_seed(1234)
        eval_gen = torch.Generator(device=device).manual_seed(99)
        if name == "bert":
            text = stdlib_text(1_500_000 if quick else 12_000_000).to(device)
            cut = int(text.numel() * 0.95)
            self.train_text, eval_text = text[:cut], text[cut:]
            self.eval = [
                mlm_batch(eval_text, setup.batch, setup.seq_len, eval_gen)
                for _ in range(setup.eval_batches)
            ]
        else:
            size = setup.small.image_size
            self.eval = [
                shapes_batch(setup.batch, size, eval_gen, device) for _ in range(setup.eval_batches)
            ]

    def batch(self):
        s = self.setup
        if self.name == "bert":
            return mlm_batch(self.train_text, s.batch, s.seq_len, self.gen)
        return shapes_batch(s.batch, s.small.image_size, self.gen, self.device)

    @staticmethod
    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), ignore_index=-100)


# --------------------------------------------------------------------------- training


def train_flops(model: PreLNTransformer, batch: int, seq: int) -> float:
    """Training FLOPs of one step: 6 * tokens * (weights of every matmul) + attention scores."""
    matmul = sum(m.in_features * m.out_features for m in model.modules() if _is_linear(m))
    cfg = model.config
    attn = 12 * cfg.num_hidden_layers * batch * seq * seq * cfg.hidden_size
    return 6.0 * batch * seq * matmul + attn


def _is_linear(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.Linear)


def evaluate(model: torch.nn.Module, task: Task, amp: bool) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast(task.device.type, torch.bfloat16, enabled=amp):
        for x, y in task.eval:
            total += float(Task.loss(model, x, y))
    model.train()
    return total / len(task.eval)


def train(
    model: torch.nn.Module, task: Task, steps: int, amp: bool, label: str
) -> list[tuple[int, float]]:
    """AdamW with the LEMON schedule (5% warm-up, cosine to 0.1x); returns the eval curve."""
    s = task.setup
    fused = task.device.type == "cuda"
    opt = torch.optim.AdamW(
        model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.98), fused=fused
    )
    sched = lemon_schedule(opt, steps, max(1, steps // 20), min_lr_ratio=0.1)
    curve = [(0, evaluate(model, task, amp))]
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = task.batch()
        with torch.autocast(task.device.type, torch.bfloat16, enabled=amp):
            loss = Task.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % s.eval_every == 0 or step == steps:
            curve.append((step, evaluate(model, task, amp)))
    print(
        f"  [{task.name}] {label}: {steps} steps, loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f}"
        f" ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    return curve


def first_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


# --------------------------------------------------------------------------- setups


def make_setup(task: str, quick: bool, steps: int | None) -> Setup:
    if task == "vit":
        small = TransformerConfig(
            hidden_size=32 if quick else 192,
            num_hidden_layers=2 if quick else 4,
            num_attention_heads=2 if quick else 3,
            intermediate_size=128 if quick else 768,
            image_size=32,
            patch_size=8 if quick else 4,
            num_classes=10,
            layer_norm_eps=1e-6,
        )
        lr, wd, batch = (2e-3, 0.05, 64) if quick else (1e-3, 0.05, 256)
        seq = small.num_patches + 1
    else:
        small = TransformerConfig(
            hidden_size=32 if quick else 192,
            num_hidden_layers=2 if quick else 4,
            num_attention_heads=2 if quick else 3,
            intermediate_size=128 if quick else 768,
            vocab_size=MASK_ID + 1,
            max_position_embeddings=64 if quick else 128,
            tie_word_embeddings=True,
            layer_norm_eps=1e-6,
        )
        lr, wd, batch = (2e-3, 0.01, 32) if quick else (7e-4, 0.01, 128)
        seq = small.max_position_embeddings
    n = steps or (160 if quick else 2400)
    return Setup(
        small=small,
        hidden=small.hidden_size * 2,
        layers=small.num_hidden_layers * 2,
        steps=n,
        small_steps=n,
        batch=batch,
        lr=lr,
        weight_decay=wd,
        budgets=(0.4, 0.7) if quick else (0.3, 0.5, 0.7),
        eval_every=max(10, n // (16 if quick else 40)),
        eval_batches=2 if quick else 8,
        seq_len=seq,
    )


def run_task(name: str, quick: bool, steps: int | None, device: torch.device) -> dict:
    setup = make_setup(name, quick, steps)
    amp = device.type == "cuda"
    task = Task(name, setup, device, quick)
    big_cfg = replace(
        setup.small,
        hidden_size=setup.hidden,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.hidden // setup.small.head_dim,
        intermediate_size=setup.small.intermediate_size * setup.hidden // setup.small.hidden_size,
    )
    seq = setup.seq_len
    torch.manual_seed(0)
    small = PreLNTransformer(setup.small).to(device)
    small_curve = train(small, task, setup.small_steps, amp, "small model")
    torch.manual_seed(1)
    scratch = PreLNTransformer(big_cfg).to(device)
    flops_t = train_flops(scratch, setup.batch, seq)
    flops_s = train_flops(small, setup.batch, seq)
    scratch_curve = train(scratch, task, setup.steps, amp, "large from scratch")
    target = scratch_curve[-1][1]
    del scratch
    small_cpu = small.float().cpu().eval()
    runs: dict[str, dict] = {}
    for variant, (kwargs, _) in VARIANTS.items():
        grown = expand(small_cpu, hidden_size=setup.hidden, num_layers=setup.layers, **kwargs)
        runs[variant] = {"budgets": {}}
        for frac in setup.budgets:
            model = copy.deepcopy(grown)
            budget = max(1, round(frac * setup.steps))
            curve = train(model.to(device).train(), task, budget, amp, f"{variant} f={frac}")
            runs[variant]["budgets"][str(frac)] = {
                "steps": budget,
                "curve": curve,
                "final_loss": curve[-1][1],
                "first_reach": first_reach(curve, target),
            }
    small_flops = setup.small_steps * flops_s
    rows, results = [], {}
    rows.append(["scratch (large)", setup.steps, f"{target:.4f}", setup.steps, "0%", "0%", "-"])
    for variant, info in runs.items():
        reached = [b["first_reach"] for b in info["budgets"].values() if b["first_reach"]]
        best_budget = min(
            (b["steps"] for b in info["budgets"].values() if b["final_loss"] <= target),
            default=None,
        )
        steps_needed = min(reached) if reached else None
        res = {
            "initial_loss": next(iter(info["budgets"].values()))["curve"][0][1],
            "steps_to_target": steps_needed,
            "smallest_budget_reaching_target": best_budget,
            "budgets": info["budgets"],
        }
        if steps_needed is not None:
            res["saved_excluding_small"] = 1 - steps_needed / setup.steps
            res["saved_including_small"] = 1 - (steps_needed * flops_t + small_flops) / (
                setup.steps * flops_t
            )
        results[variant] = res
        rows.append(
            [
                variant,
                "/".join(str(b["steps"]) for b in info["budgets"].values()),
                "/".join(f"{b['final_loss']:.4f}" for b in info["budgets"].values()),
                steps_needed if steps_needed is not None else "not reached",
                _pct(res.get("saved_excluding_small")),
                _pct(res.get("saved_including_small")),
                f"{res['initial_loss']:.4f}",
            ]
        )
    print_table(
        f"{name}: steps to reach the from-scratch final loss {target:.4f} "
        f"(small {setup.small.num_hidden_layers}L/{setup.small.hidden_size} -> "
        f"{setup.layers}L/{setup.hidden}, small model trained {setup.small_steps} steps)",
        [
            "init",
            "budget steps",
            "final loss",
            "steps to l*",
            "saved (excl S)",
            "saved (incl S)",
            "loss after expand",
        ],
        rows,
    )
    return {
        "setup": {
            "small": setup.small.to_dict(),
            "large": big_cfg.to_dict(),
            "steps": setup.steps,
            "small_steps": setup.small_steps,
            "batch": setup.batch,
            "seq_len": seq,
            "lr": setup.lr,
            "budgets": list(setup.budgets),
        },
        "flops_per_step": {"small": flops_s, "large": flops_t},
        "small_final_loss": small_curve[-1][1],
        "scratch": {"final_loss": target, "curve": scratch_curve},
        "variants": results,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["vit", "bert", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU check")
    parser.add_argument("--steps", type=int, default=None, help="from-scratch budget N")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: threads cost more than they give
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    tasks = ["vit", "bert"] if args.task == "both" else [args.task]
    payload = {"quick": args.quick, "device": str(device), "tasks": {}}
    for name in tasks:
        payload["tasks"][name] = run_task(name, args.quick, args.steps, device)
    payload["seconds"] = time.perf_counter() - t0
    path = save_results("lemon_savings" + ("_quick" if args.quick else ""), payload, args.out)
    print(f"\ntotal {payload['seconds']:.1f} s; results written to {path}")


if __name__ == "__main__":
    main()
