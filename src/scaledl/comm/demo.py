"""``scaledl demo`` for compressed communication: two-way 1-bit and top-k on 2 gloo ranks."""

from __future__ import annotations

from scaledl.demo import DemoResult

#: (label, train_digits options); the first is the uncompressed reference
CONFIGS = [
    ("fp32 DDP", {"compressor": None}),
    ("1-bit two-way", {"compressor": "onebit"}),
    ("top-k 1% two-way", {"compressor": "topk", "compressor_kwargs": {"ratio": 0.01}}),
]


def run_demo(steps: int = 200) -> DemoResult:
    """Train the digits MLP three ways and compare accuracy, bytes and replica agreement."""
    from scaledl.comm.digits import train_digits_many
    from scaledl.distributed import launch

    per_rank = launch(train_digits_many, 2, [cfg for _, cfg in CONFIGS], steps=steps, timeout_s=120)
    runs = per_rank[0]
    base_acc = runs[0]["accuracy"]
    figures: dict = {}
    ok = True
    parts = []
    for (label, _), run in zip(CONFIGS, runs):
        ratio = run["stats"]["ratio_vs_fp32"] if "stats" in run else 1.0
        figures[label] = {
            "accuracy": round(run["accuracy"], 4),
            "bytes_per_step": run["stats"]["bytes_per_step"] if "stats" in run else None,
            "ratio_vs_fp32": round(ratio, 1),
            "max_rank_param_diff": run["max_rank_param_diff"],
        }
        ok &= run["max_rank_param_diff"] == 0.0 and run["accuracy"] >= base_acc - 0.01
        if "stats" in run:
            parts.append(f"{label} {ratio:.0f}x fewer bytes, acc {run['accuracy']:.1%}")
    headline = (
        f"digits on 2 gloo ranks: fp32 acc {base_acc:.1%}; "
        + "; ".join(parts)
        + "; replicas bit-identical" * ok
    )
    return DemoResult(headline=headline, figures=figures, ok=bool(ok))
