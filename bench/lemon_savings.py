"""LEMON savings at small scale: expanded small model vs. the large model from scratch.

For each task (a ViT on procedural 32x32 shape images, a BERT-style byte-level masked LM on the
Python standard library's source text), in one run:

1. train a small model S (N steps, ``--small-factor`` x N); train the large model T from
   scratch for N steps -> final eval loss l*;
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
    noise = torch.randint(0, 256, (n, seq), generator=gen, device=device)
    inputs = torch.where(rnd, noise, inputs)  # no host sync, unlike boolean indexing
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


def loss_at(curve: list[tuple[int, float]], step: int) -> float:
    """The last evaluated loss at or before ``step``."""
    return [loss for s, loss in curve if s <= step][-1]


def first_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


# --------------------------------------------------------------------------- setups


def make_setup(task: str, quick: bool, steps: int | None, small_factor: float = 1.0) -> Setup:
    """Small model 4L/192 (3 heads of 64) -> 8L/384 on GPU; 2L/32 -> 4L/64 with --quick."""
    common = dict(
        hidden_size=32 if quick else 192,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=2 if quick else 3,
        intermediate_size=128 if quick else 768,
        layer_norm_eps=1e-6,
    )
    if task == "vit":
        small = TransformerConfig(
            image_size=32, patch_size=8 if quick else 4, num_classes=10, **common
        )
        lr, wd, batch = (2e-3, 0.05, 64) if quick else (1e-3, 0.05, 256)
        seq = small.num_patches + 1
    else:
        small = TransformerConfig(
            vocab_size=MASK_ID + 1,
            max_position_embeddings=64 if quick else 128,
            tie_word_embeddings=True,
            **common,
        )
        lr, wd, batch = (2e-3, 0.01, 32) if quick else (7e-4, 0.01, 128)
        seq = small.max_position_embeddings
    n = steps or (100 if quick else 3000)
    return Setup(
        small=small,
        hidden=small.hidden_size * 2,
        layers=small.num_hidden_layers * 2,
        steps=n,
        small_steps=round(n * small_factor),
        batch=batch,
        lr=lr,
        weight_decay=wd,
        budgets=(0.5,) if quick else (0.3, 0.5, 0.7),
        eval_every=max(10, n // (10 if quick else 40)),
        eval_batches=2 if quick else 8,
        seq_len=seq,
    )


def variant_budgets(variant: str, setup: Setup) -> tuple[float, ...]:
    """LEMON gets the budget sweep; the other initialisations are compared at the middle one."""
    if variant == "lemon":
        return setup.budgets
    return (setup.budgets[len(setup.budgets) // 2],)


def seconds_per_step(model: torch.nn.Module, task: Task, amp: bool, n: int = 10) -> float:
    """Time a few optimizer steps of a throw-away copy (after 3 warm-up steps)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=task.device.type == "cuda")
    for i in range(n + 3):
        if i == 3:
            if task.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y = task.batch()
        with torch.autocast(task.device.type, torch.bfloat16, enabled=amp):
            loss = Task.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if task.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def fit_steps(setup: Setup, t_small: float, t_large: float, seconds: float) -> int:
    """The largest from-scratch budget N (multiple of 100) whose runs fit in ``seconds``."""
    large_runs = 1 + sum(sum(variant_budgets(v, setup)) for v in VARIANTS)
    small_factor = setup.small_steps / setup.steps
    per_n = t_small * small_factor + t_large * large_runs * 1.1  # +10%: evaluation
    return int(min(setup.steps, max(300, seconds / per_n)) // 100 * 100)


def run_task(
    name: str,
    quick: bool,
    steps: int | None,
    device: torch.device,
    seconds: float,
    small_factor: float = 1.0,
) -> dict:
    setup = make_setup(name, quick, steps, small_factor)
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
    torch.manual_seed(1)
    scratch = PreLNTransformer(big_cfg).to(device)
    timing = {}
    if steps is None and not quick:  # fit N to the time budget of this task
        timing = {
            "small_s_per_step": seconds_per_step(small, task, amp),
            "large_s_per_step": seconds_per_step(scratch, task, amp),
        }
        n = fit_steps(setup, timing["small_s_per_step"], timing["large_s_per_step"], seconds)
        setup = replace(
            setup, steps=n, small_steps=round(n * small_factor), eval_every=max(10, n // 40)
        )
        task.setup = setup
        print(f"  [{name}] step times {timing}; from-scratch budget N = {n}", flush=True)
    flops_t = train_flops(scratch, setup.batch, seq)
    flops_s = train_flops(small, setup.batch, seq)
    small_curve = train(small, task, setup.small_steps, amp, "small model")
    scratch_curve = train(scratch, task, setup.steps, amp, "large from scratch")
    target = scratch_curve[-1][1]
    del scratch
    small_cpu = small.float().cpu().eval()
    small_flops = setup.small_steps * flops_s
    rows = [["scratch (large)", setup.steps, f"{target:.4f}", "-", setup.steps, "0%", "0%", "-"]]
    results: dict[str, dict] = {}
    for variant, (kwargs, description) in VARIANTS.items():
        grown = expand(small_cpu, hidden_size=setup.hidden, num_layers=setup.layers, **kwargs)
        budgets = {}
        for frac in variant_budgets(variant, setup):
            budget = max(1, round(frac * setup.steps))
            model = copy.deepcopy(grown).to(device).train()
            curve = train(model, task, budget, amp, f"{variant} f={frac}")
            budgets[str(frac)] = {
                "steps": budget,
                "final_loss": curve[-1][1],
                "first_reach": first_reach(curve, target),
                # the from-scratch model's loss after the same number of steps (equal compute)
                "scratch_loss_at_same_steps": loss_at(scratch_curve, budget),
                "curve": curve,
            }
        reached = [b["first_reach"] for b in budgets.values() if b["first_reach"] is not None]
        steps_needed = min(reached) if reached else None
        res: dict = {
            "description": description,
            "loss_after_expansion": next(iter(budgets.values()))["curve"][0][1],
            "steps_to_target": steps_needed,
            "below_target_at_expansion": steps_needed == 0,
            "smallest_budget_reaching_target": min(
                (b["steps"] for b in budgets.values() if b["final_loss"] <= target), default=None
            ),
            "budgets": budgets,
        }
        if steps_needed is not None:
            res["flops_to_target_excluding_small"] = steps_needed * flops_t
            res["flops_to_target_including_small"] = steps_needed * flops_t + small_flops
            res["saved_excluding_small"] = 1 - steps_needed / setup.steps
            res["saved_including_small"] = 1 - res["flops_to_target_including_small"] / (
                setup.steps * flops_t
            )
        results[variant] = res
        rows.append(
            [
                variant,
                "/".join(str(b["steps"]) for b in budgets.values()),
                "/".join(f"{b['final_loss']:.4f}" for b in budgets.values()),
                "/".join(f"{b['scratch_loss_at_same_steps']:.4f}" for b in budgets.values()),
                _steps_text(steps_needed),
                _pct(res.get("saved_excluding_small")),
                _pct(res.get("saved_including_small")),
                f"{res['loss_after_expansion']:.4f}",
            ]
        )
    print_table(
        f"{name}: steps to reach the from-scratch final eval loss {target:.4f} "
        f"({setup.small.num_hidden_layers}L/{setup.small.hidden_size} -> "
        f"{setup.layers}L/{setup.hidden}; small model: {setup.small_steps} steps, "
        f"loss {small_curve[-1][1]:.4f})",
        [
            "init",
            "budget steps",
            "final loss",
            "scratch, same steps",
            "steps to l*",
            "saved (excl S)",
            "saved (incl S, FLOPs)",
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
            "weight_decay": setup.weight_decay,
            "budgets": list(setup.budgets),
        },
        "timing": timing,
        "flops_per_step": {"small": flops_s, "large": flops_t},
        "small_final_loss": small_curve[-1][1],
        "small_curve": small_curve,
        "scratch": {"final_loss": target, "curve": scratch_curve},
        "variants": results,
    }


def _steps_text(steps: int | None) -> str:
    if steps is None:
        return "not reached"
    # 0: the expanded model (= the small model's function) already beats the scratch model.
    return "0 (at expansion)" if steps == 0 else str(steps)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["vit", "bert", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU check")
    parser.add_argument(
        "--steps", type=int, default=None, help="from-scratch budget N (default: fit the time)"
    )
    parser.add_argument(
        "--seconds-per-task",
        type=float,
        default=180.0,
        help="training time budget of one task in full mode, used to choose N",
    )
    parser.add_argument(
        "--small-factor",
        type=float,
        default=1.0,
        help="the small model trains this many times N steps (paper: a fully trained source)",
    )
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: threads cost more than they give
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    tasks = ["vit", "bert"] if args.task == "both" else [args.task]
    payload = {"quick": args.quick, "device": str(device), "tasks": {}}
    for name in tasks:
        payload["tasks"][name] = run_task(
            name, args.quick, args.steps, device, args.seconds_per_task, args.small_factor
        )
    payload["seconds"] = time.perf_counter() - t0
    path = save_results("lemon_savings" + ("_quick" if args.quick else ""), payload, args.out)
    print(f"\ntotal {payload['seconds']:.1f} s; results written to {path}")


if __name__ == "__main__":
    main()
