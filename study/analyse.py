"""Reader-study statistics: detection of generated patches, rating against the label, agreement between readers.

    mitosis-ldm study analyse --study runs/study/demo --answers answers-A.csv answers-B.csv --out runs/study/results

Per reader and pooled over all answers:
- detection: accuracy with an exact (Clopper-Pearson) 95% CI and a two-sided
  binomial test against 50%, the share of generated patches called real, and
  the AUC of the confidence-weighted answer (+confidence for "generated",
  -confidence for "real") from the Mann-Whitney U statistic;
- rating against the label: Spearman of the 0-4 rating with the condition
  (generated) and with the experts' soft label (real), percentile bootstrap CIs
  over answers (paired);
- agreement: Krippendorff's alpha (ordinal) on the ratings and Fleiss' kappa on
  real-vs-generated over the items every reader answered.
The pooled CIs treat answers as independent, which readers are not quite.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from report.stats import bootstrap_ci, spearman

from .answers import Answer, Study
from .make import label_bins


def detection(called_generated: np.ndarray, is_generated: np.ndarray, confidence: np.ndarray) -> dict:
    """Accuracy (exact CI, binomial test vs 0.5), generated called real, AUC of the confidence-weighted answer."""
    correct = called_generated == is_generated
    n, k = int(len(correct)), int(correct.sum())
    if n == 0:
        return {"n": 0, "correct": 0, "accuracy": None, "ci": [None, None], "p_value": None,
                "generated_called_real": None, "auc": None}
    test = stats.binomtest(k, n, 0.5, alternative="two-sided")
    ci = test.proportion_ci(confidence_level=0.95, method="exact")
    n_generated = int(is_generated.sum())
    weighted = np.where(called_generated, 1.0, -1.0) * confidence
    auc = None
    if 0 < n_generated < n:
        u = stats.mannwhitneyu(weighted[is_generated], weighted[~is_generated], alternative="two-sided").statistic
        auc = float(u / (n_generated * (n - n_generated)))  # P(score_gen > score_real) + ties / 2
    return {"n": n, "correct": k, "accuracy": k / n, "ci": [float(ci.low), float(ci.high)],
            "p_value": float(test.pvalue),
            "generated_called_real": float((~called_generated[is_generated]).mean()) if n_generated else None,
            "auc": auc}


def _spearman_batched(x, y, axis=-1):
    """Spearman's rho along `axis` for a batch of resamples at once; 0.0 where a side is constant."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    norm = np.sqrt((rx ** 2).sum(axis=axis) * (ry ** 2).sum(axis=axis))
    return np.where(norm > 0, (rx * ry).sum(axis=axis) / np.where(norm > 0, norm, 1.0), 0.0)


def spearman_ci(x, y, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman's rho with a paired percentile bootstrap interval (scipy.stats.bootstrap)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = int(len(x))
    value = spearman(x, y) if n else float("nan")
    if not np.isfinite(value):
        return {"value": None, "ci": [None, None], "n": n}
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"value": value, "ci": [value, value], "n": n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples
        result = stats.bootstrap((x, y), _spearman_batched, paired=True, vectorized=True, n_resamples=n_resamples,
                                 method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = result.confidence_interval
    return {"value": value, "ci": [float(lo), float(hi)], "n": n}


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa from an (items, categories) count table with the same number of raters per item.

    By hand: a few lines, and statsmodels (its only kept implementation) is a heavy dependency for them.
    """
    counts = np.asarray(counts, float)
    if counts.shape[0] == 0:
        return None
    raters = counts.sum(axis=1)
    if raters.min() < 2 or np.ptp(raters) != 0:
        return None
    m = raters[0]
    agreement = ((counts ** 2).sum(axis=1) - m) / (m * (m - 1))   # (items,)
    shares = counts.sum(axis=0) / counts.sum()                    # (categories,)
    expected = float((shares ** 2).sum())
    if expected >= 1.0:
        return None  # every answer in one category: kappa is undefined
    return float((agreement.mean() - expected) / (1 - expected))


def krippendorff_ordinal(matrix: np.ndarray) -> float | None:
    """Krippendorff's alpha (ordinal) of a (readers, items) rating matrix with NaN for missing answers."""
    import krippendorff

    if matrix.shape[0] < 2 or (np.isfinite(matrix).sum(axis=0) >= 2).sum() == 0:
        return None
    try:
        value = krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal")
    except ValueError:  # a single rating value overall: alpha is undefined
        return None
    return float(value) if np.isfinite(value) else None


def summarise(answers: list[Answer], study: Study, n_resamples: int, seed: int) -> dict:
    """Detection, rating-vs-label and timing for one reader's (or the pooled) answers."""
    key = study.key
    is_generated = np.array([key[a.item]["kind"] == "generated" for a in answers])
    called = np.array([a.called == "generated" for a in answers])
    confidence = np.array([a.confidence for a in answers], float)
    rating = np.array([a.rating for a in answers], float)
    label = np.array([key[a.item]["condition"] if key[a.item]["kind"] == "generated" else key[a.item]["soft_label"]
                      for a in answers], float)
    seconds = np.array([a.seconds for a in answers], float)
    out = {
        "n_answers": len(answers),
        "detection": detection(called, is_generated, confidence),
        "rating": {
            "generated_vs_condition": spearman_ci(rating[is_generated], label[is_generated], n_resamples, seed),
            "real_vs_soft_label": spearman_ci(rating[~is_generated], label[~is_generated], n_resamples, seed),
        },
        "mean_rating": {"generated": float(rating[is_generated].mean()) if is_generated.any() else None,
                        "real": float(rating[~is_generated].mean()) if (~is_generated).any() else None},
        "seconds": {"median": float(np.median(seconds)), "mean": float(seconds.mean()),
                    "total": float(seconds.sum())},
    }
    degree = np.array([key[a.item].get("true_degree", np.nan) for a in answers], float)
    real_degree = degree[~is_generated]
    if len(real_degree) and np.isfinite(real_degree).all():
        out["rating"]["real_vs_true_degree"] = spearman_ci(rating[~is_generated], real_degree, n_resamples, seed)
    return out


def agreement(answers: list[Answer], study: Study) -> dict:
    readers = sorted({a.reader for a in answers})
    items = sorted(study.key)
    col = {item: j for j, item in enumerate(items)}
    ratings = np.full((len(readers), len(items)), np.nan)
    calls = np.full((len(readers), len(items)), np.nan)
    for a in answers:
        i, j = readers.index(a.reader), col[a.item]
        ratings[i, j] = a.rating
        calls[i, j] = 1.0 if a.called == "generated" else 0.0
    complete = np.isfinite(calls).all(axis=0)
    counts = np.stack([(calls[:, complete] == 0).sum(axis=0), (calls[:, complete] == 1).sum(axis=0)], axis=1)
    return {"n_readers": len(readers),
            "krippendorff_alpha_ordinal_rating": krippendorff_ordinal(ratings),
            "fleiss_kappa_real_vs_generated": fleiss_kappa(counts) if len(readers) >= 2 else None,
            "items_answered_by_every_reader": int(complete.sum())}


def rating_curves(answers: list[Answer], study: Study, n_resamples: int, seed: int) -> dict:
    """Mean rating (95% bootstrap CI) per condition for generated items, per soft-label bin for real ones."""
    curves = {}
    for kind, field in (("generated", "condition"), ("real", "soft_label")):
        chosen = [a for a in answers if study.key[a.item]["kind"] == kind]
        if not chosen:
            continue
        x = np.array([study.key[a.item][field] for a in chosen], float)
        rating = np.array([a.rating for a in chosen], float)
        bins = label_bins(x)
        points = []
        for b in np.unique(bins):
            sel = bins == b
            ci = bootstrap_ci(rating[sel], np.mean, n_resamples=min(n_resamples, 1000), seed=seed)
            points.append({"x": float(x[sel].mean()), "mean": ci["value"], "ci": ci["ci"], "n": int(sel.sum())})
        curves[kind] = points
    return curves


def per_item(answers: list[Answer], study: Study) -> dict:
    """Each answered item with its key entry and the readers' mean rating and share of "generated" calls."""
    out = {}
    for item, entry in sorted(study.key.items()):
        mine = [a for a in answers if a.item == item]
        if not mine:
            continue
        out[item] = {"kind": entry["kind"], "source": entry["source"],
                     "label": entry["condition"] if entry["kind"] == "generated" else entry["soft_label"],
                     "n": len(mine), "mean_rating": float(np.mean([a.rating for a in mine])),
                     "called_generated": float(np.mean([a.called == "generated" for a in mine]))}
    return out


def analyse(study: Study, answers: list[Answer], n_resamples: int = 2000, seed: int = 0) -> dict:
    readers = sorted({a.reader for a in answers})
    return {
        "study_id": study.study_id,
        "title": study.study.get("title", "Reader study"),
        "n_items": len(study.key),
        "n_answers": len(answers),
        "readers": {r: summarise([a for a in answers if a.reader == r], study, n_resamples, seed) for r in readers},
        "pooled": summarise(answers, study, n_resamples, seed),
        "agreement": agreement(answers, study),
        "curves": rating_curves(answers, study, n_resamples, seed),
        "items": per_item(answers, study),
        "bootstrap_resamples": n_resamples,
    }
