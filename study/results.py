"""The analysis written out: results.json, the rating-vs-label plot and a self-contained results.html."""

from __future__ import annotations

from pathlib import Path

from mitosis_ldm.io import atomic_file, write_json, write_text
from mitosis_ldm.shapes import List, Map
from report.html import STYLE, esc, file_data_uri, fmt, img, table

PLOT = "rating_vs_label.png"

# what the results page and the report's --study section read of results.json (analyse.py writes it)
CI = List((float, None), length=2)
CORRELATION = {"value": (float, None), "ci": CI}
SUMMARY = {"n_answers": int,
           "detection": {"accuracy": (float, None), "ci": CI, "p_value": (float, None),
                         "generated_called_real": (float, None), "auc": (float, None)},
           "rating": {"generated_vs_condition": CORRELATION, "real_vs_soft_label": CORRELATION},
           "seconds": {"median": float}}
RESULTS_SHAPE = {"study_id": str, "n_items": int, "n_answers": int, "readers": Map(SUMMARY), "pooled": SUMMARY,
                 "agreement": {"n_readers": int, "krippendorff_alpha_ordinal_rating": (float, None),
                               "fleiss_kappa_real_vs_generated": (float, None),
                               "items_answered_by_every_reader": int},
                 "items": Map({"kind": str, "source": str, "mean_rating": float})}


def plot_curves(path: Path, curves: dict) -> None:
    """Mean rating against condition (generated) and against soft label (real), on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    styles = {"generated": ("o-", "#b03a8c", "generated: by condition y"),
              "real": ("s--", "#444444", "real: by experts' soft label")}
    for kind, points in curves.items():
        fmt_, colour, label = styles[kind]
        x = [p["x"] for p in points]
        mean = [p["mean"] for p in points]
        yerr = [[p["mean"] - p["ci"][0] for p in points], [p["ci"][1] - p["mean"] for p in points]]
        ax.errorbar(x, mean, yerr=yerr, fmt=fmt_, color=colour, capsize=3, ms=5, label=label)
    ax.plot([0, 1], [0, 4], ls=":", color="grey", lw=1, label="rating = 4 × label")
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.2, 4.2), xlabel="label (condition or soft label)",
           ylabel="mean mitotic rating (0 not … 4 certainly)",
           title="Readers' rating against the label (95% bootstrap CI)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def _ci(entry: dict, digits: int = 2) -> str:
    if entry.get("value", entry.get("accuracy")) is None:
        return "–"
    value = entry.get("value", entry.get("accuracy"))
    lo, hi = entry["ci"]
    return f"{fmt(value, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def _p(value) -> str:
    return "–" if value is None else "< 0.001" if value < 0.001 else f"{value:.3f}"


def summary_rows(results: dict) -> list[list]:
    rows = []
    for name, s in [("pooled", results["pooled"])] + sorted(results["readers"].items()):
        d, r = s["detection"], s["rating"]
        rows.append([name, s["n_answers"], _ci(d), _p(d["p_value"]), fmt(d["generated_called_real"], 2),
                     fmt(d["auc"], 2), _ci(r["generated_vs_condition"]), _ci(r["real_vs_soft_label"]),
                     fmt(s["seconds"]["median"], 1)])
    return rows


SUMMARY_HEADER = ["reader", "answers", "accuracy [95% CI]", "p (vs 50%)", "generated called real", "AUC",
                  "Spearman rating~condition (generated)", "Spearman rating~soft label (real)", "median s"]


def section_html(results: dict, plot_uri: str) -> str:
    """The body shared by results.html and the report's study section."""
    a = results["agreement"]
    agreement = table(["readers", "Krippendorff α (ordinal, ratings)", "Fleiss κ (real vs generated)",
                       "items answered by every reader"],
                      [[a["n_readers"], a["krippendorff_alpha_ordinal_rating"], a["fleiss_kappa_real_vs_generated"],
                        a["items_answered_by_every_reader"]]])
    pooled = results["pooled"]["detection"]
    verdict = ("readers told generated from real better than chance" if pooled["ci"][0] is not None
               and pooled["ci"][0] > 0.5 else "readers did not tell generated from real better than chance")
    return (f'<p class="note">Study <code>{esc(results["study_id"])}</code>: {results["n_items"]} items, '
            f'{len(results["readers"])} reader(s), {results["n_answers"]} answers. Pooled accuracy '
            f'{_ci(pooled)}: {esc(verdict)}. Accuracy CIs are exact binomial; the pooled ones treat answers as '
            f'independent. AUC uses the confidence-weighted answer; 0.5 is chance.</p>'
            + table(SUMMARY_HEADER, summary_rows(results))
            + "<h3>Agreement between readers</h3>" + agreement
            + "<h3>Rating against the label</h3>"
            + img(plot_uri, "mean rating against condition (generated) and soft label (real)", "plot"))


def write_results(tmp: Path, results: dict, title: str) -> None:
    write_json(tmp / "results.json", results)
    plot_curves(tmp / PLOT, results["curves"])
    body = section_html(results, file_data_uri(tmp / PLOT))
    write_text(tmp / "results.html", f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{esc(title)}: results</title><style>{STYLE}</style></head>
<body><h1>{esc(title)}: results</h1>
<p class="sub">real against generated, and the mitotic rating against the label, from the readers' answers</p>
<section><h2>Summary</h2>{body}</section></body></html>
""")
