"""CommStats ratios and the interface byte counters."""

import pytest

from scaledl.comm import CommStats, interface_bytes


def test_ratios_count_baseline_recorded_separately():
    stats = CommStats()
    stats.record("all_to_all", 10, 0)
    stats.record("all_gather", 10, 0)
    stats.record_baseline(400)
    stats.record("dense_small", 40, 40, uncompressed=True)
    stats.end_step()
    assert stats.history == [60]
    assert stats.ratio_fp32 == pytest.approx(440 / 60)
    assert stats.ratio_fp16 == pytest.approx(220 / 60)
    d = stats.as_dict()
    assert d["bytes_per_step"] == 60 and d["uncompressed_bytes_sent"] == 40
    assert d["by_kind"] == {"all_to_all": 10, "all_gather": 10, "dense_small": 40}


def test_interface_counters():
    counters = interface_bytes("lo")
    if counters is not None:  # /proc/net/dev exists on Linux
        rx, tx = counters
        assert rx >= 0 and tx >= 0
    assert interface_bytes("no-such-interface0") is None
