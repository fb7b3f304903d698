"""``scaledl expand`` end to end: tiny checkpoints (fast) and the bundled MiniLM (slow)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaledl.cli import main  # noqa: E402
from scaledl.expansion import max_logit_diff  # noqa: E402

KEYS = {
    "max_abs_diff_fp64",
    "max_abs_diff_fp32",
    "source_parameters",
    "target_parameters",
    "seconds",
}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_expands_a_local_checkpoint_and_saves_it(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=24,
        architectures=["BertForMaskedLM"],
    )
    src = transformers.BertForMaskedLM(cfg)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    src.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    code, out, _ = _run(
        capsys,
        "expand",
        str(tmp_path / "src"),
        "--hidden-size",
        "64",
        "--num-layers",
        "4",
        "--out",
        str(tmp_path / "dst"),
        "--json",
    )
    assert code == 0
    res = json.loads(out)
    assert set(res) >= KEYS
    assert res["model_class"] == "BertForMaskedLM"
    assert res["max_abs_diff_fp64"] <= 1e-9 and res["max_abs_diff_fp32"] <= 1e-4
    assert res["target_parameters"] > res["source_parameters"]
    assert (tmp_path / "dst" / "vocab.txt").read_text() == "[PAD]\n[UNK]\nhello\n"
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "dst")
    assert back.config.hidden_size == 64 and back.config.num_hidden_layers == 4
    # the saved float32 weights reproduce the source
    assert max_logit_diff(src, back, dtype=torch.float32) <= 1e-4
    # a second run into the now non-empty directory is refused
    code, _, err = _run(
        capsys, "expand", str(tmp_path / "src"), "--num-layers", "3", "--out", str(tmp_path / "dst")
    )
    assert code == 2 and "not empty" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--hidden-size", "320"], "smaller than the source's 384"),
        (["--hidden-size", "576"], "not a multiple of 384"),
        (["--num-layers", "13"], "more than 2x"),
        (["--hidden-size", "784"], "head dimension 32"),
    ],
)
def test_cli_bad_targets_on_minilm_exit_2_with_a_clear_message(tmp_path, capsys, argv, message):
    code, _, err = _run(capsys, "expand", *argv, "--out", str(tmp_path / "dst"))
    assert code == 2
    assert message in err


def test_cli_requires_a_target_and_an_existing_source(tmp_path, capsys):
    code, _, err = _run(capsys, "expand", "--out", str(tmp_path / "o"))
    assert code == 2 and "--hidden-size" in err
    code, _, err = _run(capsys, "expand", str(tmp_path / "none"), "--num-layers", "2", "--out", "x")
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
def test_cli_minilm_to_bert_base_size(tmp_path, capsys):
    """The real pre-trained MiniLM (6 x 384) to BERT-base shape (12 x 768), on real sentences."""
    code, out, _ = _run(
        capsys,
        "expand",
        "--hidden-size",
        "768",
        "--num-layers",
        "12",
        "--out",
        str(tmp_path / "big"),
        "--json",
    )
    assert code == 0
    res = json.loads(out)
    assert res["max_abs_diff_fp64"] <= 1e-9
    assert res["max_abs_diff_fp32"] <= 1e-4
    assert res["source_parameters"] == 22_713_216
    assert res["target_parameters"] > 100_000_000
    # CPU time of all threads bounds the wall time on an unloaded machine.
    assert res["expand_cpu_seconds"] < 10.0
    assert (tmp_path / "big" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "big" / "config.json").read_text())["hidden_size"] == 768


@pytest.mark.slow
def test_demo_reports_exact_minilm_expansion():
    from scaledl.expansion.demo import run_demo

    res = run_demo()
    assert res.ok, res.headline
    assert res.figures["max_abs_diff_fp64"] <= 1e-9
    assert res.figures["max_abs_diff_fp32"] <= 1e-4
