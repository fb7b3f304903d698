"""``scaledl place``: JSON fields, Gantt output, user models and error messages."""

from __future__ import annotations

import json

import pytest

from scaledl.cli import main


def _json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("algorithm", ["m-topo", "m-etf", "m-sct"])
def test_json_carries_timing_bounds_and_memory(capsys, algorithm: str) -> None:
    out = _json(
        capsys,
        [
            "place",
            "branches",
            "--devices",
            "2",
            "--memory",
            "1",
            "--algorithm",
            algorithm,
            "--json",
        ],
    )
    assert out["algorithm"] == algorithm
    assert out["placement_seconds"] > 0
    assert out["simulated_step_time_s"] >= out["lower_bound_s"] * (1 - 1e-9) > 0
    assert len(out["peak_memory_gib"]) == 2
    assert all(p <= 1.0 for p in out["peak_memory_gib"])
    assert out["fits"] is True
    assert set(out["placement"].values()) <= {0, 1}
    assert out["min_devices_by_memory"] == 2  # 1 GiB devices cannot hold it alone


def test_gantt_and_user_model(capsys, tmp_path) -> None:
    png = tmp_path / "g.png"
    out = _json(
        capsys,
        [
            "place",
            "tests.placement.helpers:tiny_model",
            "--devices",
            "3",
            "--memory",
            "0.5",
            "--gantt",
            str(png),
            "--json",
        ],
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(out["placement"]) == {"x", "a", "relu", "b", "relu_1", "c"}


def test_cli_lists_every_built_in_model() -> None:
    from scaledl.placement.cli import MODEL_NAMES
    from scaledl.placement.models import BUILTIN_MODELS

    assert tuple(BUILTIN_MODELS) == MODEL_NAMES


def test_errors_are_one_line_and_name_the_problem(capsys) -> None:
    assert main(["place", "gpt2-xl", "--devices", "2", "--memory", "16"]) == 2
    err = capsys.readouterr().err
    assert "needs at least" in err and "devices of 16 GiB" in err
    assert main(["place", "nosuchmodel"]) == 2
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err
    assert main(["place", "branches", "--devices", "0"]) == 2
    assert "--devices must be >= 1" in capsys.readouterr().err
