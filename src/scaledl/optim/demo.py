"""``scaledl demo`` entry for CSER / Local AdaAlter: 2 gloo ranks train an MLP on digits with
synchronous SGD, CSER (~33x fewer bytes) and Local AdaAlter (H = 8), side by side."""

from __future__ import annotations

from scaledl.demo import DemoResult

WORLD, STEPS = 2, 150


def run_demo() -> DemoResult:
    from scaledl.optim.digits_task import RunSpec, run_local

    specs = [
        RunSpec("sgd", 0.1, "sync SGD", warmup_steps=20),
        RunSpec("cser-block", 0.1, "CSER", period=16, r1=64, r2=4, warmup_steps=20),
        RunSpec("local-adaalter", 0.2, "Local AdaAlter", period=8, warmup_steps=20),
    ]
    sgd, cser, ada = run_local(specs, WORLD, STEPS, timeout_s=120)
    gap = 100 * (sgd["final_accuracy"] - cser["final_accuracy"])
    figures = {
        r["name"]: {
            "test_accuracy": round(r["final_accuracy"], 4),
            "train_loss": round(r["final_loss"], 4),
            "MB_sent_per_rank": round(r["bytes_sent"] / 1e6, 3),
            "ratio_vs_fp32_allreduce": round(r["measured_ratio"], 1),
        }
        for r in (sgd, cser, ada)
    }
    headline = (
        f"{WORLD} ranks, digits MLP, {STEPS} steps: CSER sent {cser['measured_ratio']:.0f}x fewer "
        f"bytes than sync SGD at {100 * cser['final_accuracy']:.1f}% vs "
        f"{100 * sgd['final_accuracy']:.1f}% test accuracy; Local AdaAlter H=8 sent "
        f"{ada['measured_ratio']:.1f}x fewer ({100 * ada['final_accuracy']:.1f}%)"
    )
    # Own check: the compression is real and costs at most a few points on this tiny task.
    ok = cser["measured_ratio"] >= 30 and gap <= 3.0 and ada["measured_ratio"] > 1.5
    return DemoResult(headline=headline, figures=figures, ok=ok)
