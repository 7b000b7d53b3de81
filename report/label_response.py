"""The label-response curve: does the generator reproduce how real patches score at each soft label?

A calibrated classifier regresses toward the mean, so the yardstick for generated
frames is not score = y but the *real* label-response curve: the mean classifier
score of held-out real patches at each distinct soft-label value (the synthetic
benchmark's 3 experts give 0, 1/3, 2/3, 1).

- `real_curve`: per distinct soft label, the mean score with a bootstrap CI;
- `generated_curve`: per condition, the mean score over seeds with a bootstrap CI;
- `response_error`: the largest |generated − real| over the real soft-label
  values, the generated curve read there by linear interpolation between
  conditions; its CI resamples seeds and real patches (within each label) together.
"""

from __future__ import annotations

import numpy as np

from .stats import bootstrap_ci, curve_ci


def label_groups(soft_labels, min_count: int = 10, decimals: int = 4) -> tuple[np.ndarray, list[np.ndarray]]:
    """Distinct soft-label values (rounded, so 1/3 from different sums agrees) held by >= min_count patches.

    Returns the values (K,) ascending and, for each, the indices of its patches.
    """
    soft = np.asarray(soft_labels, float)
    keep = np.isfinite(soft)
    rounded = np.round(soft, decimals)
    values, groups = [], []
    for value in np.unique(rounded[keep]):
        members = np.flatnonzero(keep & (rounded == value))
        if len(members) >= min_count:
            values.append(float(soft[members].mean()))  # the label itself (1/3), not its rounded key
            groups.append(members)
    return np.array(values, float), groups


def real_curve(soft_labels, scores, min_count: int = 10, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean score of real patches per distinct soft label: {x, mean, lo, hi, n} (arrays over labels)."""
    scores = np.asarray(scores, float)
    x, groups = label_groups(soft_labels, min_count)
    cells = [bootstrap_ci(scores[g], np.mean, n_resamples, seed=seed) for g in groups]
    return {"x": x, "mean": np.array([c["value"] for c in cells], float),
            "lo": np.array([c["ci"][0] for c in cells], float), "hi": np.array([c["ci"][1] for c in cells], float),
            "n": np.array([len(g) for g in groups], int), "groups": groups}


def generated_curve(conditions, scores: np.ndarray, n_resamples: int = 500, seed: int = 0) -> dict:
    """Mean score over seeds per condition (conditions ascending): {conditions, mean, lo, hi}."""
    conditions = np.asarray(conditions, float)
    order = np.argsort(conditions, kind="stable")
    mean, lo, hi = curve_ci(np.asarray(scores, float)[:, order], n_resamples, seed=seed)
    return {"conditions": conditions[order], "mean": mean, "lo": lo, "hi": hi}


def _max_gap(conditions, generated_mean, real_x, real_mean) -> tuple[float, np.ndarray]:
    # np.interp holds the end values outside the conditions' range (a generator never asked for y there)
    at_real = np.interp(real_x, conditions, generated_mean)
    gaps = at_real - real_mean
    return float(np.max(np.abs(gaps))), at_real


def response_error(conditions, generated_scores: np.ndarray, real_x, real_scores_by_label: list,
                   n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """max over real labels |generated(label) − real(label)|, with a percentile bootstrap CI.

    conditions (C,); generated_scores (S seeds, C); real_x (K,) the real soft-label values;
    real_scores_by_label: K arrays of real patches' scores. Each resample draws seeds (rows) and,
    within each label, real patches with replacement.
    """
    conditions = np.asarray(conditions, float)
    order = np.argsort(conditions, kind="stable")
    conditions = conditions[order]
    gen = np.asarray(generated_scores, float)[:, order]                    # (S, C)
    real_x = np.asarray(real_x, float)
    groups = [np.asarray(g, float) for g in real_scores_by_label]
    if len(real_x) == 0 or gen.size == 0:
        return {"value": None, "ci": [None, None], "per_label": [], "n_seeds": int(len(gen)), "n_labels": 0}
    real_mean = np.array([g.mean() for g in groups])
    value, at_real = _max_gap(conditions, gen.mean(0), real_x, real_mean)
    rng = np.random.default_rng(seed)
    draws = np.empty(n_resamples)
    for b in range(n_resamples):
        gen_mean = gen[rng.integers(0, len(gen), len(gen))].mean(0)         # (C,)
        real_b = np.array([g[rng.integers(0, len(g), len(g))].mean() for g in groups])
        draws[b] = _max_gap(conditions, gen_mean, real_x, real_b)[0]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    per_label = [{"soft_label": float(x), "real": float(r), "generated": float(g), "difference": float(g - r),
                  "n_real": int(len(grp))} for x, r, g, grp in zip(real_x, real_mean, at_real, groups)]
    return {"value": value, "ci": [float(lo), float(hi)], "per_label": per_label, "n_seeds": int(len(gen)),
            "n_labels": int(len(real_x))}


def measure(conditions, generated_scores: np.ndarray, real_soft, real_scores, min_count: int = 10,
            n_resamples: int = 1000, seed: int = 0) -> tuple[dict, dict, dict]:
    """(real curve, generated curve, error) for one transitions folder against the held-out real patches."""
    real = real_curve(real_soft, real_scores, min_count, n_resamples, seed)
    generated = generated_curve(conditions, generated_scores, min(n_resamples, 500), seed)
    scores = np.asarray(real_scores, float)
    error = response_error(conditions, generated_scores, real["x"], [scores[g] for g in real["groups"]],
                           n_resamples, seed=seed)
    return real, generated, error


def report_metrics(folders, real_soft, real_scores, min_count: int, n_resamples: int, seed: int) -> tuple[dict, dict]:
    """metrics.json["label_response"] and the curves to plot, for every transitions folder of the report."""
    metrics, curves = {}, {"generated": {}}
    for f in folders:
        if f.role != "transitions":
            continue
        real, generated, error = measure(f.conditions[f.generated], f.scores[:, f.generated], real_soft, real_scores,
                                         min_count, n_resamples, seed)
        curves["real"] = real
        curves["generated"][f.key] = {**generated, "error": error}
        metrics[f.key] = {"error": error, "conditions": generated["conditions"], "mean": generated["mean"],
                          "ci_low": generated["lo"], "ci_high": generated["hi"]}
    if "real" in curves:
        real = curves["real"]
        metrics["real"] = {"soft_label": real["x"], "mean": real["mean"], "ci_low": real["lo"], "ci_high": real["hi"],
                           "n": real["n"], "min_count": min_count}
    return metrics, curves
