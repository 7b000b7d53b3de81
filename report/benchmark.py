"""The synthetic benchmark's ground truth: estimated degree of generated frames, and a label-noise finder.

The synthetic patch dataset knows each patch's mitotic degree m in [0, 1]
(`true_degree`; m >= `true_threshold` is truly mitotic). So we can
- map the classifier's score to a degree (isotonic regression of m on the score,
  fitted on held-out real patches) and read generated frames' degree off it,
  beside the real patches' true degree per soft-label bin;
- rank real patches by |soft label - score| and count how many of the top ones
  truly are mislabelled (their majority label disagrees with m).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import isotonic_regression


class DegreeCalibration:
    """score -> expected true degree, monotone (scipy's isotonic regression), interpolated between points."""

    def __init__(self, scores: np.ndarray, degrees: np.ndarray):
        keep = np.isfinite(scores) & np.isfinite(degrees)
        order = np.argsort(scores[keep], kind="stable")
        self.x = np.asarray(scores[keep][order], float)
        self.y = isotonic_regression(np.asarray(degrees[keep][order], float), increasing=True).x

    def __call__(self, scores) -> np.ndarray:
        return np.interp(np.asarray(scores, float), self.x, self.y)


def label_noise(ids: list[str], soft: np.ndarray, hard: np.ndarray, scores: np.ndarray, degree: np.ndarray,
                threshold: float, top: int = 50, disagreement: np.ndarray | None = None) -> dict:
    """Rank labelled patches by |soft - score|; count true mislabels in the top `top` vs the base rate.

    `disagreement` (N,), when given, ranks instead of |soft - score| (e.g. two judges' mean rank).
    """
    if disagreement is None:
        disagreement = np.abs(soft - scores)
    keep = np.flatnonzero(np.isfinite(soft) & np.isfinite(scores) & np.isfinite(disagreement))
    order = keep[np.argsort(-disagreement[keep], kind="stable")]
    has_truth = np.isfinite(degree)
    truly_mitotic = degree >= threshold
    # a label is wrong when the experts' majority call disagrees with the truth
    majority = np.where(np.isfinite(hard), hard >= 0.5, soft >= 0.5)
    wrong = has_truth & (majority != truly_mitotic)
    k = min(top, len(order))
    ranked = [{
        "rank": r + 1, "id": ids[i], "soft_label": float(soft[i]), "score": float(scores[i]),
        "disagreement": float(disagreement[i]), "true_degree": float(degree[i]),
        "truly_mislabelled": bool(wrong[i]), "index": int(i),
    } for r, i in enumerate(order)]
    base_rate = float(wrong[keep].mean()) if len(keep) else float("nan")
    found = int(sum(row["truly_mislabelled"] for row in ranked[:k]))
    return {
        "top": k,
        "truly_mislabelled_in_top": found,
        "precision_at_top": found / k if k else None,
        "base_rate": base_rate,
        "n_mislabelled": int(wrong[keep].sum()),
        "n_labelled": int(len(keep)),
        "ranked": ranked,
    }
