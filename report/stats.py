"""Small statistics shared by the report: bootstrap intervals and a Spearman that copes with flat data."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def spearman(x, y) -> float:
    """Spearman's rho; 0.0 when either side is constant (no monotone association), NaN-safe."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return float("nan")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


def bootstrap_ci(values, statistic=np.median, n_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict:
    """The statistic over `values` (NaNs dropped) with a percentile bootstrap interval (scipy.stats.bootstrap)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"value": None, "ci": [None, None], "n": 0}
    value = float(statistic(values))
    if len(values) < 2 or np.ptp(values) == 0:
        # every resample is identical: the interval collapses to the value
        return {"value": value, "ci": [value, value], "n": int(len(values))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning on near-constant resamples
        result = stats.bootstrap((values,), statistic, n_resamples=n_resamples, confidence_level=level,
                                 method="percentile", random_state=np.random.default_rng(seed), vectorized=False)
    lo, hi = result.confidence_interval
    return {"value": value, "ci": [float(lo), float(hi)], "n": int(len(values))}


def curve_ci(matrix: np.ndarray, n_resamples: int = 500, level: float = 0.95, seed: int = 0):
    """Mean over rows (seeds) per column (condition) with a bootstrap interval: three arrays (C,)."""
    matrix = np.asarray(matrix, float)  # (S, C)
    mean = np.nanmean(matrix, axis=0) if matrix.size else np.zeros(matrix.shape[1])
    lo, hi = mean.copy(), mean.copy()
    for j in range(matrix.shape[1]):
        result = bootstrap_ci(matrix[:, j], np.mean, n_resamples, level, seed)
        if result["value"] is not None:
            lo[j], hi[j] = result["ci"]
    return mean, lo, hi
