"""Evaluate the classifier ensemble on a labelled patch dataset split.

    mitosis-ldm evaluate --classifier runs/demo/classifier --dataset runs/demo/data/synth \
        [--split test] --out runs/demo/classifier/eval [--overwrite]

Writes `metrics.json` and `reliability.png` into --out. Metrics for the
ensemble mean, every member, and the mean over members:
- against hard labels: AUROC, average precision, balanced accuracy (threshold
  0.5), Brier score, expected calibration error (torchmetrics);
- against soft labels (y = fraction of experts voting mitotic): each patch
  counts as y of a positive and 1 - y of a negative in AUROC, AP and balanced
  accuracy; Brier and ECE compare the probability with y itself;
- Spearman correlation with the soft label and, on the synthetic benchmark,
  with the true mitotic degree (scipy).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from mitosis_ldm.errors import UserError, check_at_least, user_errors
from mitosis_ldm.io import atomic_dir, write_json

from .model import ClassifierEnsemble


# -- metrics -------------------------------------------------------------------------

def hard_metrics(prob: np.ndarray, hard: np.ndarray, n_bins: int) -> dict:
    import warnings
    from torchmetrics.functional.classification import (binary_auroc, binary_average_precision,
                                                        binary_calibration_error, binary_recall,
                                                        binary_specificity)

    p = torch.as_tensor(prob, dtype=torch.float32)
    t = torch.as_tensor(hard, dtype=torch.long)
    both = bool((t == 1).any() and (t == 0).any())
    warnings.filterwarnings("ignore", message=".*non-contiguous.*")  # torchmetrics' own bucketize call
    return {
        "auroc": float(binary_auroc(p, t)) if both else math.nan,
        "average_precision": float(binary_average_precision(p, t)) if both else math.nan,
        "balanced_accuracy": float((binary_recall(p, t) + binary_specificity(p, t)) / 2),
        "brier": float(((p - t.float()) ** 2).mean()),
        "ece": float(binary_calibration_error(p, t, n_bins=n_bins, norm="l1")),
    }


def weighted_auroc(score: np.ndarray, y: np.ndarray) -> float:
    """P(score of a positive > score of a negative), each patch y positive and 1 - y negative (ties count 1/2).

    Hand-written: torchmetrics' AUROC takes no sample weights.
    """
    order = np.argsort(score, kind="mergesort")
    s, pos, neg = score[order], y[order], 1 - y[order]
    uniq, start = np.unique(s, return_index=True)
    pos_t = np.add.reduceat(pos, start)  # weight per tied group
    neg_t = np.add.reduceat(neg, start)
    neg_below = np.concatenate([[0.0], np.cumsum(neg_t)[:-1]])
    total = pos.sum() * neg.sum()
    return float((pos_t * (neg_below + 0.5 * neg_t)).sum() / total) if total > 0 else math.nan


def weighted_average_precision(score: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(-score, kind="mergesort")
    pos = y[order]
    precision = np.cumsum(pos) / np.arange(1, len(pos) + 1)
    return float((pos * precision).sum() / pos.sum()) if pos.sum() > 0 else math.nan


def soft_ece(prob: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[float, list[dict]]:
    """|mean probability - mean soft label| per equal-width bin, weighted by bin size; and the bins."""
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        mask = which == b
        if not mask.any():
            continue
        conf, obs = float(prob[mask].mean()), float(y[mask].mean())
        ece += mask.mean() * abs(conf - obs)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(mask.sum()),
                     "mean_prob": conf, "observed": obs})
    return float(ece), bins


def soft_metrics(prob: np.ndarray, soft: np.ndarray, n_bins: int) -> dict:
    predicted = prob >= 0.5
    return {
        "auroc": weighted_auroc(prob, soft),
        "average_precision": weighted_average_precision(prob, soft),
        "balanced_accuracy": float(((soft * predicted).sum() / max(soft.sum(), 1e-12)
                                    + ((1 - soft) * ~predicted).sum() / max((1 - soft).sum(), 1e-12)) / 2),
        "brier": float(((prob - soft) ** 2).mean()),
        "ece": soft_ece(prob, soft, n_bins)[0],
    }


def all_metrics(prob: np.ndarray, soft: np.ndarray, hard: np.ndarray, degree: np.ndarray, n_bins: int) -> dict:
    from scipy.stats import spearmanr

    out = {"hard": hard_metrics(prob, hard, n_bins), "soft": soft_metrics(prob, soft, n_bins),
           "spearman_soft_label": float(spearmanr(prob, soft).statistic)}
    if np.isfinite(degree).all():
        out["spearman_true_degree"] = float(spearmanr(prob, degree).statistic)
    return out


def mean_of(dicts: list[dict]) -> dict:
    """Average nested metric dicts key by key."""
    out = {}
    for key, value in dicts[0].items():
        if isinstance(value, dict):
            out[key] = mean_of([d[key] for d in dicts])
        else:
            out[key] = float(np.mean([d[key] for d in dicts]))
    return out


# -- the reliability diagram -------------------------------------------------------------

def reliability_png(path: Path, prob: np.ndarray, soft: np.ndarray, hard: np.ndarray, n_bins: int,
                    metrics: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for col, (target, name) in enumerate(((hard, "hard labels"), (soft, "soft labels"))):
        _, bins = soft_ece(prob, target, n_bins)
        ax, hist = axes[0, col], axes[1, col]
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.bar(centres, [b["observed"] for b in bins], width=1 / n_bins * 0.9, color="#4c72b0", alpha=0.8,
               label="observed (fraction mitotic)" if col == 0 else "observed (mean soft label)")
        ax.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], "o-", c="#dd8452", ms=4,
                label="observed at the bin's mean probability")
        for c, b in zip(centres, bins):
            ax.annotate(str(b["count"]), (c, min(b["observed"], 0.93) + 0.02), ha="center", fontsize=7)
        key = "hard" if col == 0 else "soft"
        ax.set_title(f"vs {name}: ECE {metrics[key]['ece']:.3f}, Brier {metrics[key]['brier']:.3f}")
        ax.set_ylabel("observed")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
        hist.bar(centres, [b["count"] for b in bins], width=1 / n_bins * 0.9, color="grey")
        hist.set_yscale("log")
        hist.set_xlabel("predicted P(mitotic), ensemble mean")
        hist.set_ylabel("patches")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry point -----------------------------------------------------------------------

@user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="mitosis-ldm evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", required=True, help="classifier folder (or its training run folder)")
    parser.add_argument("--dataset", required=True, help="labelled patch dataset")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument("--out", required=True, help="output folder (metrics.json, reliability.png)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--bins", type=int, default=10, help="calibration bins (default 10)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    for flag, value in (("--bins", args.bins), ("--batch-size", args.batch_size)):
        check_at_least(value, flag)

    from mitosis_ldm.io import check_new_output
    from patches.dataset import PatchDataset

    check_new_output(args.out, args.overwrite)
    ensemble = ClassifierEnsemble.from_pretrained(args.classifier)
    ds = PatchDataset(args.dataset, split=None if args.split == "all" else args.split, labelled_only=True)
    if len(ds) == 0:
        raise UserError(f"{Path(args.dataset) / 'labels.csv'}: no labelled rows in split '{args.split}'")
    soft, hard, degree = ds.soft_labels, ds.hard_labels, ds.true_degree
    if np.isnan(hard).any():
        raise UserError(f"{Path(args.dataset) / 'labels.csv'}: field 'hard_label' is empty for "
                        f"{int(np.isnan(hard).sum())} labelled rows")
    from .score import score_images

    probs = score_images(ensemble, ds.uint8(np.arange(len(ds))), args.batch_size)  # (N, K)
    ensemble_prob = probs.mean(1)
    members = [all_metrics(probs[:, k], soft, hard, degree, args.bins) for k in range(ensemble.members)]
    metrics = {
        "classifier": str(args.classifier), "dataset": str(args.dataset), "split": args.split,
        "patches": len(ds), "mitotic_hard": int(hard.sum()), "members": ensemble.members, "bins": args.bins,
        "ensemble": all_metrics(ensemble_prob, soft, hard, degree, args.bins),
        "mean_member": mean_of(members),
        "member": members,
        "ensemble_std": {"mean": float(probs.std(1).mean()), "max": float(probs.std(1).max())},
    }
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_json(tmp / "metrics.json", metrics)
        reliability_png(tmp / "reliability.png", ensemble_prob, soft, hard, args.bins, metrics["ensemble"],
                        f"{Path(args.dataset).name} [{args.split}], {len(ds)} patches, "
                        f"{ensemble.members}-member ensemble")
    e = metrics["ensemble"]
    summary = {"auroc_hard": e["hard"]["auroc"], "ece_hard": e["hard"]["ece"], "ece_soft": e["soft"]["ece"],
               "brier_soft": e["soft"]["brier"], "spearman_true_degree": e.get("spearman_true_degree"),
               "mean_member_auroc_hard": metrics["mean_member"]["hard"]["auroc"],
               "mean_std": metrics["ensemble_std"]["mean"]}
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
