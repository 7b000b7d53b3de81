"""The generative posterior's arithmetic (diffusion/posterior_fit.py): summaries of posteriors known by hand, and
the calibration fit (the measurement and the command: test_posterior.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

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


def test_fitted_temperature_recovers_the_one_that_made_the_votes():
    from diffusion.posterior_fit import fit_calibration, log_posterior, Calibration

    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 11)
    n, draws, true_temperature = 600, 4, 0.02
    centre = rng.random(n)
    mean_error = 0.5 + (grid[None] - centre[:, None]) ** 2 * 0.1  # (N, K): best near `centre`
    errors = np.concatenate([np.repeat(mean_error[:, None], draws, 1), np.full((n, draws, 1), 0.6)], axis=2)
    timesteps = np.array([10, 35, 60, 85])
    prob = np.exp(log_posterior(errors, timesteps, 100, Calibration(temperature=true_temperature)))
    y = np.array([rng.choice(grid, p=p) for p in prob])
    experts = np.full(n, 3.0)
    mitotic = rng.binomial(3, y).astype(float)
    cal = fit_calibration(errors, timesteps, 100, grid, mitotic, experts, t_bands=1)
    assert cal.calibrated and cal.temperature == pytest.approx(true_temperature, rel=0.35)
    assert cal.fit["nll_votes_fitted"] <= cal.fit["nll_votes_heuristic"]
    two = fit_calibration(errors, timesteps, 100, grid, mitotic, experts, t_bands=2)
    assert len(two.t_weights) == 2 and np.mean(two.t_weights) == pytest.approx(1.0)


def test_the_lowest_finite_start_is_kept():
    from diffusion.posterior_fit import lowest_finite

    def run(fun):
        return SimpleNamespace(fun=fun)

    starts = [run(float("nan")), run(2.0), run(float("inf")), run(1.5), run(1.5)]
    assert lowest_finite(starts) is starts[3]  # a run-away first start is not kept; ties keep the first
    assert lowest_finite([run(3.0), run(float("nan"))]).fun == 3.0
    assert lowest_finite([run(float("nan")), run(float("inf"))]) is None


def test_a_fit_with_no_finite_start_is_one_clear_line(monkeypatch):
    import diffusion.posterior_fit as fit
    from mitosis_ldm.errors import UserError

    monkeypatch.setattr(fit, "minimize", lambda f, x0, method: SimpleNamespace(fun=float("nan"), x=x0, success=False))
    rng = np.random.default_rng(0)
    errors = rng.random((6, 2, 6)) + 1.0  # (patches, draws, grid points + the unconditional one)
    with pytest.raises(UserError, match="--calibrate: the temperature fit found no finite"):
        fit.fit_calibration(errors, [100, 700], 1000, np.linspace(0, 1, 5), np.full(6, 0.5), np.full(6, 3.0))


def test_votes_parse_and_fall_back_to_the_soft_label():
    from diffusion.posterior_fit import parse_votes
    from mitosis_ldm.errors import UserError

    assert parse_votes("1;1;0", 0.67, "x") == (2.0, 3.0)
    assert parse_votes("", 0.5, "x") == (0.5, 1.0)
    with pytest.raises(UserError, match="field 'votes'"):
        parse_votes("1;maybe", 0.5, "labels.csv")
