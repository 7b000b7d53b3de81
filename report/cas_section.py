"""The report's CAS section: do generated patches teach a classifier? (reads bench/cas.py's cas.json)

    mitosis-ldm report ... --cas runs/cas/cas.json

Shows the CAS table (AUROC against the hard label and Spearman with the true
degree on the held-out real test split, mean and seed spread per training
set), the targets, and a plot of AUROC against the fraction of real training
labels, real only against real + generated. The numbers are the bench's; the
report does not retrain anything.
"""

from __future__ import annotations

import math
from pathlib import Path

from mitosis_ldm.errors import UserError
from mitosis_ldm.io import read_json

from .extras import Extra, HeldOut
from .html import Markup, esc, file_data_uri, img, table
from .plots import GENERATED, REAL, _pyplot, _save

EXPLAIN = {
    "real": "the real train split",
    "generated": "generated patches only (as many as the real train split)",
    "real+generated": "real train split + as many generated patches",
}


def read_cas(path) -> dict:
    """A bench/cas.py result, every field the section uses checked now (before the report's own work)."""
    path = Path(path)
    if path.is_dir():
        path = path / "cas.json"
    data = read_json(path, "CAS results")
    if not isinstance(data, dict) or data.get("bench") != "cas":
        raise UserError(f"{path}: field 'bench' is {data.get('bench') if isinstance(data, dict) else None!r}, "
                        f"expected 'cas' (a bench/cas.py result)")
    for key in ("table", "targets", "fractions", "seeds"):
        if key not in data:
            raise UserError(f"{path}: field '{key}' is missing (a bench/cas.py result)")
    if not isinstance(data["table"], dict) or not data["table"]:
        raise UserError(f"{path}: field 'table' is empty (no classifier finished)")
    if not isinstance(data["seeds"], list) or not data["seeds"]:
        raise UserError(f"{path}: field 'seeds' is {data['seeds']!r}, expected a list of seeds")
    fractions = data["fractions"]
    if not isinstance(fractions, list) or not all(_number(f) and 0 < f < 1 for f in fractions):
        raise UserError(f"{path}: field 'fractions' is {fractions!r}, expected a list of fractions in (0, 1)")
    for name, entry in data["table"].items():
        _check_setting(path, name, entry)
    if not isinstance(data["targets"], dict):
        raise UserError(f"{path}: field 'targets' is {data['targets']!r}, expected an object")
    for name, target in data["targets"].items():
        where = f"targets.{name}"
        if not isinstance(target, dict) or not isinstance(target.get("target"), str) \
                or not isinstance(target.get("met"), bool) or not _number(target.get("value")):
            raise UserError(f"{path}: field '{where}' is {target!r}, expected 'value' (a number), 'target' (text) "
                            f"and 'met' (true or false)")
        for key, allow_null in (("seed_spread", False), ("needed_mean", True)):
            if key in target and not (_number(target[key]) or (allow_null and target[key] is None)):
                raise UserError(f"{path}: field '{where}.{key}' is {target[key]!r}, expected a number")
    for key in ("generation_patches_per_s", "transition_frames_per_s"):
        if key in data and not _number(data[key]):
            raise UserError(f"{path}: field '{key}' is {data[key]!r}, expected a number")
    ceiling = data.get("label_noise_ceiling")
    if ceiling and not (isinstance(ceiling, dict)
                        and all(_number(ceiling.get(k)) for k in ("bayes_auroc", "true_degree_auroc"))):
        raise UserError(f"{path}: field 'label_noise_ceiling' is {ceiling!r}, expected 'bayes_auroc' and "
                        f"'true_degree_auroc' (numbers)")
    return data


def _number(value) -> bool:
    """A finite JSON number (not true or false)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_setting(path: Path, name: str, entry) -> None:
    """One row of the CAS table: a known setting's name, and each metric's mean, spread and per-seed values."""
    base, at, fraction = name.partition("@")
    try:
        known = name in EXPLAIN if not at else base in ("real", "real+generated") and 0 < float(fraction) < 1
    except ValueError:
        known = False
    if not known:
        raise UserError(f"{path}: field 'table' has the setting {name!r}; expected one of {sorted(EXPLAIN)} or "
                        f"real@F / real+generated@F with F a fraction")
    if not isinstance(entry, dict):
        raise UserError(f"{path}: field 'table.{name}' is {entry!r}, expected an object")
    for metric in ("auroc", "spearman_true_degree", "balanced_accuracy"):
        stats = entry.get(metric)
        if stats is None and metric == "balanced_accuracy":  # results from before it was measured
            continue
        if not (isinstance(stats, dict) and _number(stats.get("mean")) and _number(stats.get("spread"))
                and stats["spread"] >= 0 and isinstance(stats.get("values"), list) and stats["values"]
                and all(_number(v) for v in stats["values"])):
            raise UserError(f"{path}: field 'table.{name}.{metric}' is {stats!r}, expected 'mean', 'spread' "
                            f"(numbers) and 'values' (one number per seed)")
    patches = entry.get("train_patches")
    if patches is not None and not (isinstance(patches, int) and not isinstance(patches, bool) and patches >= 0):
        raise UserError(f"{path}: field 'table.{name}.train_patches' is {patches!r}, expected a count")


def describe(name: str) -> str:
    if name in EXPLAIN:
        return EXPLAIN[name]
    base, fraction = name.split("@")
    share = f"{float(fraction):.0%} of the real train labels"
    return share if base == "real" else f"{share} + 4x as many generated patches"


def auroc_vs_fraction(path: Path, data: dict) -> None:
    """AUROC (mean, seed range as error bars) against the fraction of real labels: real only vs real + generated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    table = data["table"]
    xs = sorted(data["fractions"]) + [1.0]
    for base, colour, label in (("real", REAL, "real only"), ("real+generated", GENERATED[0], "real + generated")):
        names = [f"{base}@{f:g}" for f in xs[:-1]] + [base]
        rows = [table[n]["auroc"] for n in names if n in table]
        fx = [x for x, n in zip(xs, names) if n in table]
        means = [r["mean"] for r in rows]
        # seeds that agree: their mean, as np.mean rounds it, can lie an ulp outside them (matplotlib refuses a
        # negative bar)
        lows = [max(r["mean"] - min(r["values"]), 0.0) for r in rows]
        highs = [max(max(r["values"]) - r["mean"], 0.0) for r in rows]
        ax.errorbar(fx, means, yerr=[lows, highs], color=colour, marker="o", capsize=3, lw=1.5, label=label)
    if "generated" in table:
        ax.axhline(table["generated"]["auroc"]["mean"], color=GENERATED[1], ls="--", lw=1,
                   label=f"generated only (CAS, {table['generated'].get('train_patches')} patches)")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:.0%}" for x in xs])
    ax.set(xlabel="fraction of the real training labels", ylabel="AUROC on real test patches (hard label)",
           title=f"{len(data['seeds'])} seeds each (bars: seed range)")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def extra(path):
    """`--cas FILE`: read (and check) the bench result now; the section is made when the report is built."""
    data = read_cas(path)

    def make(held_out: HeldOut) -> Extra:
        return Extra(key="cas", title="Generated patches as training data (CAS)", metrics=data,
                     write=lambda tmp: section(tmp, data))

    return make


def section(tmp: Path, data: dict) -> str:
    auroc_vs_fraction(tmp / "cas-auroc-vs-fraction.png", data)
    rows = []
    for name, entry in data["table"].items():
        a, s, b = entry["auroc"], entry["spearman_true_degree"], entry.get("balanced_accuracy")
        rows.append([name, describe(name), entry.get("train_patches"), f"{a['mean']:.3f} ± {a['spread'] / 2:.3f}",
                     f"{b['mean']:.3f} ± {b['spread'] / 2:.3f}" if b else "",
                     f"{s['mean']:.3f} ± {s['spread'] / 2:.3f}"])
    target_rows = []
    for name, t in data["targets"].items():
        wanted = t["target"]
        if "seed_spread" in t:
            wanted += f" (spread {t['seed_spread']:.3f}" + (
                f"; needs a mean above {t['needed_mean']:.4f}" if t.get("needed_mean") is not None else "") + ")"
        target_rows.append([name, t["value"], wanted,
                            Markup("met") if t["met"] else Markup("<strong>missed</strong>")])
    settings = (f"labels {data.get('labels')}, guidance {data.get('guidance') or 'the pipeline default'}, "
                f"{data.get('members')} member(s) per classifier, seeds {data.get('seeds')}, "
                f"{data.get('test_patches')} real test patches; generation "
                f"{data.get('generation_patches_per_s', float('nan')):.2f} patches/s beside "
                f"{data.get('transition_frames_per_s', float('nan')):.2f} transition frames/s")
    quick = "<p><strong>Quick (CI-sized) run: not a measurement.</strong></p>" if data.get("quick") else ""
    ceiling = data.get("label_noise_ceiling")
    if ceiling:
        quick += (f"<p>Label-noise ceiling: on these test patches, P(hard label | true degree, imposter) under the "
                  f"benchmark's own expert panel reaches AUROC {ceiling['bayes_auroc']:.4f}, and the true degree "
                  f"alone {ceiling['true_degree_auroc']:.4f}. No classifier can expect more; an augmentation "
                  f"target whose needed mean comes near it cannot be met by a better generator.</p>")
    if data.get("complete") is False:
        quick += "<p><strong>Incomplete: the bench stopped before every setting and seed finished.</strong></p>"
    return (f"<p>The classifier recipe trained on each set, tested on the same held-out <em>real</em> test "
            f"patches (mean ± half the range over seeds). CAS: generated only against real only; augmentation: "
            f"few real labels with and without generated patches. {esc(settings)}.</p>{quick}"
            + table(["trained on", "what", "train patches", "AUROC (hard label)", "balanced accuracy (hard label)",
                     "Spearman (true degree)"], rows)
            + table(["target", "value", "wanted", "verdict"], target_rows)
            + img(file_data_uri(tmp / "cas-auroc-vs-fraction.png"), "AUROC against the fraction of real labels"))
