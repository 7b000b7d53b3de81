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


def test_curve_intervals_hold_each_column_low_then_high():
    matrix = np.array([[0.1, 0.5], [0.3, 0.5], [0.2, 0.5], [0.4, 0.5]])  # (seeds, conditions)
    mean, lo, hi = stats.curve_ci(matrix, 200)
    assert mean == pytest.approx([0.25, 0.5])
    assert [lo[0], hi[0]] == stats.bootstrap_ci(matrix[:, 0], np.mean, 200)["ci"] and lo[0] < 0.25 < hi[0]
    assert lo[1] == hi[1] == 0.5  # a constant column: the interval collapses to its value
