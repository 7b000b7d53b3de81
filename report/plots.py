"""Matplotlib figures of the report, written as PNGs (Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mitosis_ldm.io import atomic_file

from .morphology import FEATURES

GENERATED = ["#b03a8c", "#3a6fb0", "#2e8b57", "#c8702a"]  # one colour per transitions folder
REAL = "#444444"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def consistency(path: Path, name: str, conditions, scores: np.ndarray, curve, summary: dict) -> None:
    """Score vs condition: each seed a thin line, the mean over seeds with its CI band, the ideal diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for row in scores:
        ax.plot(conditions, row, color=GENERATED[0], alpha=0.25, lw=0.8)
    mean, lo, hi = curve
    ax.fill_between(conditions, lo, hi, color=GENERATED[0], alpha=0.25, lw=0)
    ax.plot(conditions, mean, color=GENERATED[0], lw=2, label="mean over seeds (95% CI)")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="score = condition")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set(xlabel="condition y (target fraction of experts calling it mitotic)", ylabel="classifier score",
           ylim=(-0.02, 1.02), title=f"{name}: median Spearman {summary['spearman']['value']:.2f}, "
                                     f"flip rate {summary['flip']['value']:.2f}")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def label_response(path: Path, generated: dict, real: dict) -> None:
    """Generated mean score vs condition (± 95% CI over seeds) beside the real label-response curve.

    generated: {folder: {"conditions", "mean", "lo", "hi", "error"}}; real: {"x", "mean", "lo", "hi", "n"}.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for k, (folder, data) in enumerate(generated.items()):
        colour = GENERATED[k % len(GENERATED)]
        ax.fill_between(data["conditions"], data["lo"], data["hi"], color=colour, alpha=0.25, lw=0)
        error = data["error"]
        label = f"generated ({folder}), mean over {error['n_seeds']} seeds"
        if error["value"] is not None:
            label += f"; error {error['value']:.3f}"
            ax.plot([r["soft_label"] for r in error["per_label"]], [r["generated"] for r in error["per_label"]],
                    "x", color=colour, ms=7, label="generated, read at the real soft labels" if k == 0 else None)
        ax.plot(data["conditions"], data["mean"], "o-", color=colour, ms=3, label=label)
    if len(real["x"]):
        ax.errorbar(real["x"], real["mean"], yerr=[real["mean"] - real["lo"], real["hi"] - real["mean"]], fmt="s--",
                    color=REAL, ms=5, capsize=3, label="real held-out patches, mean per soft label")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8, label="score = label")
    ax.set(xlabel="condition y / soft label (fraction of experts)", ylabel="classifier score (mean, 95% CI)",
           ylim=(-0.02, 1.02), title="Label response: generated vs real")
    ax.legend(loc="upper left", fontsize=7)
    _save(fig, path)


def morphology(path: Path, generated: dict, real: dict | None) -> None:
    """One panel per feature: generated mean ± CI vs condition, real patches per soft-label bin on the same axes.

    generated: {folder: {"conditions": (C,), feature: {"mean","lo","hi","spearman"}}};
    real: {"x": (B,), feature: {"mean","lo","hi","spearman"}} or None.
    """
    plt = _pyplot()
    names = list(FEATURES)
    ncols = 3
    nrows = int(np.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, feature in zip(axes.flat, names):
        titles = []
        for k, (folder, data) in enumerate(generated.items()):
            stats = data[feature]
            colour = GENERATED[k % len(GENERATED)]
            ax.fill_between(data["conditions"], stats["lo"], stats["hi"], color=colour, alpha=0.2, lw=0)
            ax.plot(data["conditions"], stats["mean"], "o-", color=colour, ms=3, label=f"generated: {folder}")
            titles.append(f"{folder} ρ={stats['spearman']:.2f}")
        if real is not None:
            stats = real[feature]
            ax.errorbar(real["x"], stats["mean"], yerr=[stats["mean"] - stats["lo"], stats["hi"] - stats["mean"]],
                        fmt="s--", color=REAL, ms=4, capsize=3, label="real (by soft label)")
            titles.append(f"real ρ={stats['spearman']:.2f}")
        ax.set_title(f"{FEATURES[feature]}\n" + ", ".join(titles), fontsize=9)
        ax.set_xlabel("condition / soft label", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def fidelity(path: Path, rows: list[dict], bin_names: list[str]) -> None:
    """Fréchet distance per label bin: generated vs real beside real vs real, and the autoencoder floor and the
    calibrated real reference if known."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = np.arange(len(rows))
    fd = [r["frechet"] if r["frechet"] is not None else np.nan for r in rows]
    yard = [r["yardstick"] if r["yardstick"] is not None else np.nan for r in rows]
    floor = [r.get("floor") if r.get("floor") is not None else np.nan for r in rows]
    # the ratio's interval over seeds, as a distance: the yardstick is the same in every resample
    low = [r["ratio_ci_low"] * r["yardstick"] if r.get("ratio_ci_low") is not None else np.nan for r in rows]
    high = [r["ratio_ci_high"] * r["yardstick"] if r.get("ratio_ci_high") is not None else np.nan for r in rows]
    errors = np.abs(np.array([np.subtract(fd, low), np.subtract(high, fd)]))  # NaN: no bar drawn
    shown = np.isfinite(errors).any()
    bars = [(fd, GENERATED[0], "generated vs held-out real" + (" (95% over seeds)" if shown else ""),
             errors if shown else None)]
    if np.isfinite(floor).any():
        bars.append((floor, "0.55", "real reconstructed by the autoencoder (floor)", None))
    reference = [r.get("reference_frechet") if r.get("reference_frechet") is not None else np.nan for r in rows]
    if np.isfinite(reference).any():
        bars.append((reference, "0.8", "real patches drawn as a calibrated transition (reference)", None))
    bars.append((yard, REAL, "real half vs real half (yardstick)", None))
    width = 0.8 / len(bars)
    for i, (values, colour, label, err) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, color=colour, label=label, yerr=err,
               error_kw={"elinewidth": 1, "capsize": 3, "ecolor": "k"})
    ax.set_xticks(x, bin_names, fontsize=8)
    ax.set(xlabel="label bin", ylabel="Fréchet distance (classifier features)")
    # above the axes: inside, it would cover whichever bin's bars are tallest
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.01), frameon=False)
    _save(fig, path)


def memorisation(path: Path, result: dict, space: str, atypical: dict | None = None) -> None:
    """Nearest-training-neighbour distances of generated and held-out real patches, with both tails' thresholds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    d_gen, d_real = result["distances_generated"], result["distances_held_out"]
    bins = np.linspace(0, max(d_gen.max(), d_real.max()) * 1.02 + 1e-9, 40)
    ax.hist(d_real, bins, color=REAL, alpha=0.5, density=True, label="held-out real")
    ax.hist(d_gen, bins, color=GENERATED[0], alpha=0.5, density=True, label="generated")
    ax.axvline(result["threshold"], color="k", ls="--", lw=1,
               label=f"{result['quantile']:.0%} quantile of held-out (share below: {result['share']:.1%})")
    if atypical is not None:
        ax.axvline(atypical["threshold"], color="k", ls=":", lw=1,
                   label=f"{1 - atypical['expected_share']:.0%} quantile of held-out (share above: "
                         f"{atypical['share']:.1%})")
    ax.set(xlabel=f"distance to nearest training patch ({space})", ylabel="density")
    ax.legend(fontsize=7)
    _save(fig, path)


def degree(path: Path, generated: dict, real: dict) -> None:
    """Synthetic benchmark: classifier-estimated degree of generated frames vs condition, beside the truth."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k, (folder, data) in enumerate(generated.items()):
        colour = GENERATED[k % len(GENERATED)]
        ax.fill_between(data["conditions"], data["lo"], data["hi"], color=colour, alpha=0.2, lw=0)
        ax.plot(data["conditions"], data["mean"], "o-", color=colour, ms=3,
                label=f"generated ({folder}): estimated degree")
    truth = real["true"]
    ax.errorbar(real["x"], truth["mean"], yerr=[truth["mean"] - truth["lo"], truth["hi"] - truth["mean"]],
                fmt="s-", color="k", capsize=3, label="real: true degree per soft-label bin")
    ax.plot(real["x"], real["estimated"]["mean"], "^:", color=REAL, label="real: estimated degree per bin")
    ax.axhline(real["threshold"], color="grey", lw=0.6, ls="--")
    ax.set(xlabel="condition / soft label", ylabel="mitotic degree m", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)
