import argparse
import json

import numpy as np
import torch

from scaledl.cli_utils import emit, fmt, progress, to_json


def test_to_json_handles_tensors_numpy_and_infinities():
    doc = json.loads(
        to_json(
            {
                "t": torch.tensor([1.0, 2.0]),
                "s": torch.tensor(3),
                "n": np.float64(0.5),
                "inf": float("inf"),
                "nan": float("nan"),
                "nested": [(1, 2)],
            }
        )
    )
    assert doc == {"t": [1.0, 2.0], "s": 3, "n": 0.5, "inf": "inf", "nan": None, "nested": [[1, 2]]}


def test_emit_json_prints_only_json(capsys):
    emit(argparse.Namespace(json=True), {"a": 1})
    assert json.loads(capsys.readouterr().out) == {"a": 1}


def test_fmt_and_progress_passthrough():
    assert fmt(1234567) == "1,234,567"
    assert fmt(True) == "yes"
    assert fmt(1.5e-7) == "1.500e-07"
    assert list(progress(range(5), description="x")) == [0, 1, 2, 3, 4]
