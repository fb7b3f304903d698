"""End to end: digits converges under compression (the demo), and the ``scaledl comm`` CLI."""

import json

import pytest

from scaledl.cli import main

pytestmark = pytest.mark.dist


def test_digits_converges_with_onebit_and_topk_within_one_percent():
    from scaledl.comm.demo import run_demo

    res = run_demo()
    figs = res.figures
    base = figs["fp32 DDP"]["accuracy"]
    assert base > 0.9
    for label in ("1-bit two-way", "top-k 1% two-way"):
        assert figs[label]["accuracy"] >= base - 0.01, (label, figs)
        assert figs[label]["max_rank_param_diff"] == 0.0
    # over the whole run, warm-up steps included
    assert figs["1-bit two-way"]["ratio_vs_fp32"] > 20
    assert figs["top-k 1% two-way"]["ratio_vs_fp32"] > 25
    assert res.ok and "bit-identical" in res.headline


def test_cli_bench_json(capsys):
    argv = ["--world-size", "2", "--compressor", "randomk", "--ratio", "0.25", "--steps", "12"]
    code = main(["comm", "bench", *argv, "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "allreduce" and out["world_size"] == 2
    assert out["max_rank_param_diff"] == 0.0
    # 2 dense warm-up steps, then 10 steps at 1/4 of the fp32 values
    params = out["parameters"]
    dense = 2 * 4 * params // 2
    assert out["fp32_bytes_per_step"] == dense
    assert out["bytes_per_step"] < 0.5 * dense
    assert out["uncompressed_bytes"] == 2 * dense


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compressor", "nope"], "unknown compressor 'nope'"),
        (["--compressor", "onebit", "--ratio", "0.1"], "--ratio applies to topk"),
        (["--world-size", "0"], "--world-size must be >= 1"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert main(["comm", "bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_list(capsys):
    assert main(["comm", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["compressors"]}
    assert rows["onebit"]["payload_bytes_1M"] == 4 + (1 << 20) // 8
    assert rows["topk"]["ratio_vs_fp32"] == pytest.approx(50.0, rel=1e-3)
