"""Label consistency: does the classifier's score follow the condition along each transition?

Per transition (one seed, its generated frames in condition order):
- `spearman`: Spearman(condition, score);
- `monotone`: the fraction of steps where the score moves the way the condition does (ties count);
- `flip`: score at the lowest condition (c = 0) below 0.5 and at the highest (c = 1) above 0.5;
- `abs_error`: mean |score - condition|.
`aggregate` summarises them over seeds with bootstrap intervals.
"""

from __future__ import annotations

import numpy as np

from .stats import bootstrap_ci, spearman

METRICS = ("spearman", "monotone", "flip", "abs_error")


def transition_metrics(conditions, scores) -> dict:
    """The four label-consistency numbers for one transition; conditions and scores are (C,)."""
    conditions = np.asarray(conditions, float)
    scores = np.asarray(scores, float)
    order = np.argsort(conditions, kind="stable")
    c, s = conditions[order], scores[order]
    steps = np.diff(c) > 0
    moves = np.diff(s)[steps]
    return {
        "spearman": spearman(c, s),
        "monotone": float(np.mean(moves >= 0)) if len(moves) else float("nan"),
        "flip": float(s[0] < 0.5 and s[-1] > 0.5),
        "abs_error": float(np.mean(np.abs(s - c))),
    }


def per_seed(conditions, scores: np.ndarray, seeds) -> list[dict]:
    """One row of metrics per seed; scores (S, C) over the generated columns."""
    return [{"seed": int(seed), **transition_metrics(conditions, row)} for seed, row in zip(seeds, scores)]


def aggregate(rows: list[dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Over seeds: the median Spearman, the rates and means of the rest, each with a bootstrap CI."""
    out = {"n_seeds": len(rows)}
    statistic = {"spearman": np.median, "monotone": np.mean, "flip": np.mean, "abs_error": np.mean}
    for name in METRICS:
        out[name] = bootstrap_ci([r[name] for r in rows], statistic[name], n_resamples, seed=seed)
        out[name]["statistic"] = statistic[name].__name__
    return out
