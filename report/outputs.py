"""The report folder's files: metrics.json, CSVs, PNG plots and report.html, plus each input folder's metrics.json."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mitosis_ldm.images import contact_sheet, save_png
from mitosis_ldm.io import write_json, write_text

from . import consistency, morphology, plots
from .html import render
from .page import page
from .stats import curve_ci

if TYPE_CHECKING:
    from .build import Folder


def write_folder_metrics(f: Folder, out: Path, overwrite: bool) -> None:
    """The folder's own label-consistency summary beside its scores (DESIGN: after scoring, metrics.json)."""
    path = f.path / "metrics.json"
    if path.exists() and not overwrite:
        return  # never replace what the user has without --overwrite; the report folder holds it anyway
    write_json(path, {"consistency": f.summary, "per_seed": f.per_seed, "score_source": f.score_source,
                      "report": str(out)})


def csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)) else
                         (f"{v:.6g}" if isinstance(v, (float, np.floating)) else v) for v in row])
    return buffer.getvalue()


ATYPICAL_SHEET = 48  # the farthest frames shown in atypical-pixels.png


def write_outputs(tmp: Path, cfg, folders, metrics, morph_generated, morph_real, fd_rows, bin_names, memo, bench,
                  atypical, real_images, real_ids, real_soft, real_hard, real_degree, real_scores, real_morph,
                  extras=(), response_curves=None) -> None:
    from mitosis_ldm.config import save_config

    names = list(morphology.FEATURES)
    write_json(tmp / "metrics.json", metrics)
    save_config(cfg, tmp / "config.yaml")

    # CSVs
    frame_rows = []
    for f in folders:
        for s, seed in enumerate(f.manifest["seeds"]):
            for c in range(f.frames.shape[1]):
                frame_rows.append([f.key, seed, c, f.conditions[c], int(c not in f.generated), f.scores[s, c],
                                   f.stds[s, c]] + [f.morph[n][s, c] for n in names])
        write_text(tmp / f"consistency-{f.key}.csv", csv_text(
            ["seed", *consistency.METRICS], [[r["seed"], *(r[m] for m in consistency.METRICS)] for r in f.per_seed]))
    write_text(tmp / "frames.csv", csv_text(["folder", "seed", "frame", "condition", "is_input", "score", "score_std",
                                             *names], frame_rows))
    write_text(tmp / "real_patches.csv", csv_text(
        ["id", "soft_label", "hard_label", "true_degree", "score", *names],
        [[real_ids[i], real_soft[i], real_hard[i], real_degree[i], real_scores[i], *(real_morph[n][i] for n in names)]
         for i in range(len(real_ids))]))
    fd_columns = ["label_bin", "n_generated", "n_real", "n", "frechet", "yardstick", "ratio", "ratio_ci_low",
                  "ratio_ci_high", "floor", "floor_ratio", "common_n",
                  "frechet_common_n", "yardstick_common_n", "ratio_common_n", "reference_frechet", "reference_ratio"]
    write_text(tmp / "fidelity.csv", csv_text(fd_columns, [[r[c] for c in fd_columns] for r in fd_rows]))
    by_condition = metrics["fidelity"].get("by_condition", [])
    cond_columns = ["condition", "label_bin", "n_generated", "n_real", "n", "frechet", "yardstick", "ratio"]
    write_text(tmp / "fidelity-conditions.csv",
               csv_text(cond_columns, [[r[c] for c in cond_columns] for r in by_condition]))
    if response_curves and "real" in response_curves:
        real = response_curves["real"]
        rows = [["real", x, m, lo, hi, n]
                for x, m, lo, hi, n in zip(real["x"], real["mean"], real["lo"], real["hi"], real["n"])]
        for key, g in response_curves["generated"].items():
            rows += [[key, c, m, lo, hi, g["error"]["n_seeds"]]
                     for c, m, lo, hi in zip(g["conditions"], g["mean"], g["lo"], g["hi"])]
        write_text(tmp / "label_response.csv",
                   csv_text(["curve", "label", "mean_score", "ci_low", "ci_high", "n"], rows))
    by_key = {f.key: f for f in folders}
    for space, result in atypical.items():
        write_text(tmp / f"atypical-{space}.csv", csv_text(
            ["folder", "seed", "frame", "condition", "distance", "score"],
            [[r["folder"], r["seed"], r["frame"], r["condition"], r["distance"], r["score"]]
             for r in result["frames"]]))
        if space == "pixels":
            shown = result["frames"][:ATYPICAL_SHEET]
            images = [np.asarray(by_key[r["folder"]].frames[r["row"], r["frame"]]) for r in shown]
            save_png(tmp / "atypical-pixels.png", contact_sheet(
                np.stack(images) if images else np.zeros((0, 8, 8, 3), np.uint8),
                [f"s{r['seed']} y{r['condition']:.1f}" for r in shown], ncols=12, scale=2))
    if bench is not None:
        noise = bench[2]
        write_text(tmp / "label_noise.csv", csv_text(
            ["rank", "id", "soft_label", "score", "disagreement", "true_degree", "truly_mislabelled"],
            [[r["rank"], r["id"], r["soft_label"], r["score"], r["disagreement"], r["true_degree"],
              int(r["truly_mislabelled"])] for r in noise["ranked"]]))

    # plots
    for f in folders:
        cond = f.conditions[f.generated]
        curve = curve_ci(f.scores[:, f.generated], min(cfg.bootstrap, 500), seed=cfg.seed)
        plots.consistency(tmp / f"consistency-{f.key}.png", f.key, cond, f.scores[:, f.generated], curve, f.summary)
    if response_curves and "real" in response_curves:
        plots.label_response(tmp / "label_response.png", response_curves["generated"], response_curves["real"])
    plots.morphology(tmp / "morphology.png", morph_generated, morph_real)
    plots.fidelity(tmp / "fidelity.png", fd_rows, bin_names)
    for space, result in memo.items():
        plots.memorisation(tmp / f"memorisation-{space}.png", result,
                           "pixels, [0, 1] RGB" if space == "pixels" else "classifier features", atypical.get(space))
    if bench is not None:
        plots.degree(tmp / "degree.png", bench[0], bench[1])

    sections = page(tmp, folders, metrics, fd_rows, memo, bench, real_images, atypical)
    for extra in extras:  # each extra judge writes its own files and returns its section's HTML
        sections["sections"].append((extra.title, extra.write(tmp)))
    write_text(tmp / "report.html", render(sections))
