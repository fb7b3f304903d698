"""``scaledl detect train|eval|predict`` end to end on tiny settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scaledl.cli import main


def test_detect_train_eval_predict(tmp_path, capsys):
    model_dir = tmp_path / "model"
    common = ["--size", "64", "--n-images", "6", "--json", "--device", "cpu"]
    assert main(["detect", "train", "--out", str(model_dir), "--steps", "3", "--width", "4",
                 "--batch-size", "2", *common]) == 0  # fmt: skip
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 3 and (model_dir / "model.pt").is_file()
    assert main(["detect", "eval", "--model", str(model_dir), "--k", "6", *common]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["froc"]["fp_rates"] == [0.5, 1.0, 2.0, 4.0, 8.0] and ev["images"] == 6
    assert set(ev["froc"]["strata"]) == {"<10mm", "10-30mm", ">30mm"}
    # human output: the FROC table
    assert main(["detect", "eval", "--model", str(model_dir), "--k", "6", "--size", "64",
                 "--n-images", "4", "--device", "cpu"]) == 0  # fmt: skip
    assert "FROC on 4 synthetic easy slices" in capsys.readouterr().out
    hu = np.full((64, 64), 40.0, np.float32)
    hu[20:30, 20:34] = -10
    np.save(tmp_path / "slice.npy", hu)
    png = tmp_path / "out.png"
    argv = ["detect", "predict", str(tmp_path / "slice.npy"), "--model", str(model_dir),
            "--spacing", "0.7", "--min-score", "0", "--png", str(png), "--json",
            "--k", "4"]  # fmt: skip
    assert main(argv) == 0
    pred = json.loads(capsys.readouterr().out)
    assert png.stat().st_size > 1000
    for d in pred["detections"][str(tmp_path / "slice.npy")]:
        assert d["long_mm"] == pytest.approx(0.7 * d["long_px"], rel=1e-6)
    # bad input: one-line error, exit status 2
    assert main(["detect", "predict", str(tmp_path / "slice.npy"), "--model", str(model_dir)]) == 2
    assert "spacing is required" in capsys.readouterr().err
