"""Summarise a patch dataset: counts per split, label histogram, vote agreement, and a contact sheet.

    mitosis-ldm data inspect runs/demo/data/synth [--out sheet.png] [--per-group 12]
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from mitosis_ldm.images import contact_sheet, save_png
from mitosis_ldm.label_groups import group_soft_labels

from .dataset import SPLITS, PatchDataset

HIST_EDGES = np.array([0.0, 1e-9, 0.2, 0.4, 0.6, 0.8, 1.0 - 1e-9, 1.0])
HIST_NAMES = ["0", "(0,.2)", "[.2,.4)", "[.4,.6)", "[.6,.8)", "[.8,1)", "1"]


def parse_votes(text: str) -> list[float]:
    """`1;0;1` -> [1, 0, 1]; categorical votes (0.5) are kept; empty entries (no vote) are skipped."""
    return [float(v) for v in text.split(";") if v.strip() != ""] if text else []


def summarise(root) -> dict:
    """Everything `inspect` prints, as a dict (tests read it)."""
    ds = PatchDataset(root)
    rows = ds.rows
    soft = ds.all_soft
    labelled = ~np.isnan(soft)
    summary: dict = {
        "path": str(root),
        "count": len(rows),
        "stored_size": int(ds.meta.get("stored_size", ds.images.shape[1])),
        "patch_size": ds.patch_size,
        "splits": {name: sum(r.get("split") == name for r in rows) for name in SPLITS},
        "slides": len({r.get("slide", "") for r in rows}),
        "labelled": int(labelled.sum()),
    }
    if labelled.any():
        values = soft[labelled]
        counts, _ = np.histogram(values, bins=HIST_EDGES)
        summary["label_histogram"] = dict(zip(HIST_NAMES, counts.tolist()))
        summary["label_mean"] = round(float(values.mean()), 4)
        hard = ds.all_hard[labelled]
        summary["hard_positive"] = int(np.nansum(hard))
    votes = [parse_votes(r.get("votes", "")) for r in rows]
    voted = [v for v in votes if len(v) >= 2]
    if voted:
        unanimous = sum(len(set(v)) == 1 for v in voted)
        pairs = agree = 0
        for v in voted:
            n = len(v)
            pairs += n * (n - 1) // 2
            agree += sum(c * (c - 1) // 2 for c in Counter(v).values())  # pairs of equal votes
        summary["votes"] = {
            "patches_with_votes": len(voted),
            "experts_per_patch": {str(k): v for k, v in sorted(Counter(len(v) for v in voted).items())},
            "unanimous": round(unanimous / len(voted), 4),
            "disagree": round(1 - unanimous / len(voted), 4),
            "pairwise_agreement": round(agree / max(1, pairs), 4),
        }
    degree = ds.all_degree
    if (~np.isnan(degree)).any():
        from scipy.stats import spearmanr

        both = labelled & ~np.isnan(degree)
        threshold = float(ds.meta.get("true_threshold", 0.5))
        truly = degree[both] >= threshold
        summary["true_degree"] = {
            "spearman_label_vs_degree": round(float(spearmanr(soft[both], degree[both]).statistic), 4),
            "truly_mitotic": int(truly.sum()),
            "hard_label_accuracy": round(float((ds.all_hard[both] == truly).mean()), 4),
        }
    kinds = Counter(r["kind"] for r in rows if r.get("kind"))
    if kinds:
        summary["kinds"] = dict(kinds)
    return summary


def label_groups(soft: np.ndarray) -> list[np.ndarray]:
    """The contact sheet's rows: a mask per distinct soft label when there are at most 11, else per tenth of [0, 1]."""
    index, groups = group_soft_labels(soft, max_distinct=11, bins=10)
    return [index == k for k in range(len(groups))]


def sheet(root, out, per_group: int = 12, seed: int = 0) -> Path:
    """Contact sheet grouped by soft label (one row per label value or bin), captions = label (and m)."""
    ds = PatchDataset(root)
    soft, degree = ds.all_soft, ds.all_degree
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    if np.isnan(soft).all():
        chosen = sorted(rng.choice(len(ds), size=min(len(ds), per_group * 8), replace=False).tolist())
    else:
        for mask in label_groups(soft) + [np.isnan(soft)]:
            idx = np.flatnonzero(mask)
            if len(idx):
                pick = rng.choice(idx, size=min(per_group, len(idx)), replace=False)
                chosen += sorted(pick.tolist(), key=lambda i: (degree[i] if not math.isnan(degree[i]) else 0))
                chosen += [-1] * ((-len(pick)) % per_group)  # pad so every group starts a row
    images = np.full((len(chosen), ds.patch_size, ds.patch_size, 3), 255, np.uint8)
    real = np.array([i for i in chosen if i >= 0])
    crops = ds.uint8(real)
    captions = []
    j = 0
    for k, i in enumerate(chosen):
        if i < 0:
            captions.append("")
            continue
        images[k] = crops[j]
        j += 1
        text = ds.rows[i].get("split", "") if math.isnan(soft[i]) else f"{soft[i]:.2f}"
        if not math.isnan(degree[i]):
            text += f" m{degree[i]:.2f}"
        kind = ds.rows[i].get("kind")
        if kind == "imposter":
            text += " imp"
        captions.append(text)
    ncols = per_group if not np.isnan(soft).all() else 16
    out = Path(out)
    save_png(out, contact_sheet(images, captions, ncols=ncols, scale=2))
    return out


def format_summary(s: dict) -> str:
    lines = [f"{s['path']}: {s['count']} patches ({s['patch_size']}x{s['patch_size']}, stored {s['stored_size']}), "
             f"{s['slides']} slide(s), {s['labelled']} labelled"]
    lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    if "label_histogram" in s:
        lines.append("soft label histogram: " + ", ".join(f"{k}: {v}" for k, v in s["label_histogram"].items()))
        lines.append(f"mean soft label {s['label_mean']}, hard positives {s['hard_positive']}")
    if "votes" in s:
        v = s["votes"]
        panels = ", ".join(f"{n} with {k} votes" for k, n in v["experts_per_patch"].items())
        lines.append(f"votes: {v['patches_with_votes']} patches ({panels}); unanimous {v['unanimous']:.1%}, "
                     f"disagree {v['disagree']:.1%}, pairwise agreement {v['pairwise_agreement']:.1%}")
    if "true_degree" in s:
        t = s["true_degree"]
        lines.append(f"true degree: Spearman(soft label, m) {t['spearman_label_vs_degree']:.3f}, "
                     f"truly mitotic {t['truly_mitotic']}, hard-label accuracy vs truth {t['hard_label_accuracy']:.1%}")
    if "kinds" in s:
        lines.append("kinds: " + ", ".join(f"{k} {v}" for k, v in s["kinds"].items()))
    return "\n".join(lines)
