import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common


def test_time_fn_and_save(tmp_path):
    calls = []
    res = common.time_fn(lambda: calls.append(1), name="noop", warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7
    assert len(res.times_s) == 5 and res.median_s >= 0 and res.spread_s >= 0
    path = common.save_results("unit", {"results": [res]}, out=tmp_path / "r.json")
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "unit"
    assert doc["results"][0]["name"] == "noop"
    assert "date" in doc["environment"] and "torch" in doc["environment"]
