"""The generative posterior's arithmetic (diffusion/posterior_fit.py) on posteriors whose summaries are known by hand
(the measurement, the calibration fit and the command: test_posterior.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion.posterior_fit import summaries


def test_summaries_of_known_posteriors():
    prob = np.array([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.25, 0.5, 0.25]])  # over y = 0, 0.5, 1
    summary = summaries(prob, [0.0, 0.5, 1.0])
    assert summary["expected_y"] == pytest.approx([0.5, 0.5, 0.5])
    # E[y²] - E[y]²: 0.5 - 0.25, 0.25 - 0.25, 0.375 - 0.25
    assert summary["posterior_std"] == pytest.approx([0.5, 0.0, math.sqrt(0.125)])
    assert summary["map_y"].tolist() == [0.0, 0.5, 0.5]  # a tie goes to the first grid value
