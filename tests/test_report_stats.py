"""The report's small statistics (report/stats.py): bootstrap intervals and the curve intervals over seeds."""

from __future__ import annotations

import numpy as np
import pytest

from report import stats


def test_bootstrap_intervals_are_reproducible_from_their_seed():
    values = np.random.default_rng(0).normal(size=30)
    first, again = (stats.bootstrap_ci(values, np.mean, 200, seed=4) for _ in range(2))
    assert first == again and first["ci"][0] < first["value"] < first["ci"][1]
    assert stats.bootstrap_ci(values, np.mean, 200, seed=5)["ci"] != first["ci"]
