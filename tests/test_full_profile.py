"""bench/full_profile.py's arithmetic: seconds per step from a training run's metrics log."""

from __future__ import annotations

import json

from conftest import load_bench


def test_step_rate_is_the_slope_of_the_first_time_each_step_was_logged(tmp_path):
    profile = load_bench("full_profile")
    logs = tmp_path / "logs"
    logs.mkdir()
    rows = [{"step": 0, "time_s": 50.0}, {"step": 10, "time_s": 60.0, "loss": 1.0}, {"step": 20, "time_s": 62.0},
            {"step": 30, "time_s": 64.0}, {"step": 30, "time_s": 90.0, "psnr": 20.0}]  # the end-of-run evaluation
    (logs / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert profile.step_rate(tmp_path, first=10) == (64.0 - 60.0) / 20  # start-up and evaluation left out
    assert profile.step_rate(tmp_path, first=10, last=20) == 0.2
    assert profile.step_rate(tmp_path, first=30) is None  # one logged step gives no rate
