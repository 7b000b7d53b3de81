"""The report's generative-posterior section: the diffusion model beside the classifier ensemble.

    mitosis-ldm report ... --posterior runs/posterior/synth-test [--posterior runs/posterior/cmu]

Reads a `mitosis-ldm posterior` folder (posterior.csv + posterior.json). When
its ids are the report's held-out labelled patches, the two judges are
compared on the same patches: Spearman with the true degree, AUROC against
the hard label, ECE against the soft label, their agreement (Spearman and a
scatter plot), and the label-noise finder (top-50 precision: generative,
discriminative and their mean rank, against the base rate;
report/benchmark.py decides what is truly mislabelled). On unlabelled patches
(real CMU nuclei) it shows the histogram of E[y] and the nuclei both judges
call most mitotic. The posterior itself is never recomputed here.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from mitosis_ldm.errors import UserError
from mitosis_ldm.io import not_utf8, read_json, read_text

from . import benchmark
from .extras import Extra, HeldOut
from .html import Markup, esc, file_data_uri, img, png_data_uri, table
from .plots import GENERATED, REAL, _pyplot, _save
from .stats import spearman

REQUIRED = ("id", "expected_y", "map_y", "posterior_std", "name")
TARGETS = {"spearman_true_degree": (">=", 0.8), "auroc_hard": (">=", 0.9), "ece_soft": ("<=", 0.08)}
MIN_MATCHED = 10


def read_posterior(path) -> dict:
    """A `mitosis-ldm posterior` folder, every field the section uses checked now (before the report's work)."""
    path = Path(path)
    info = read_json(path / "posterior.json", "posterior.json")
    if not isinstance(info, dict) or info.get("format") != "mitosis-ldm/posterior":
        raise UserError(f"{path / 'posterior.json'}: field 'format' is not 'mitosis-ldm/posterior' "
                        f"(--posterior expects a `mitosis-ldm posterior` folder)")
    check_info(path / "posterior.json", info)
    csv_path = path / "posterior.csv"
    if not csv_path.exists():
        raise UserError(f"{csv_path}: missing (--posterior expects a `mitosis-ldm posterior` folder)")
    try:
        rows = list(csv.DictReader(io.StringIO(read_text(csv_path), newline="")))
    except UnicodeDecodeError as err:
        raise UserError(not_utf8(csv_path, err)) from None
    except csv.Error as err:
        raise UserError(f"{csv_path}: not a readable CSV table ({err})") from None
    missing = [c for c in REQUIRED if rows and c not in rows[0]]
    if not rows or missing:
        raise UserError(f"{csv_path}: " + (f"field '{missing[0]}' is missing" if missing else "has no rows"))
    numbers = {c: np.empty(len(rows)) for c in ("expected_y", "map_y", "posterior_std")}
    for line, row in enumerate(rows, start=2):
        if None in row.values() or None in row:
            raise UserError(f"{csv_path}: line {line} has {'fewer' if None in row.values() else 'more'} cells than "
                            f"the header")
        for column, values in numbers.items():
            try:
                values[line - 2] = float(row[column])
            except ValueError:
                values[line - 2] = np.nan
            if not np.isfinite(values[line - 2]) or (column == "posterior_std" and values[line - 2] < 0):
                raise UserError(f"{csv_path}: line {line}: field '{column}' is {row[column]!r}, expected a "
                                f"{'non-negative ' if column == 'posterior_std' else ''}number")
    return {"path": path, "info": info, "ids": [r["id"] for r in rows], "names": [r["name"] for r in rows],
            **numbers}


def check_info(where: Path, info: dict) -> None:
    """The fields of posterior.json the section reads: objects where it looks inside, a number where it formats one."""
    for key in ("settings", "calibration"):
        if not isinstance(info.get(key, {}), dict):
            raise UserError(f"{where}: field '{key}' is {info[key]!r}, expected an object")
    calibration = info.get("calibration", {})
    if not isinstance(calibration.get("fit", {}), dict):
        raise UserError(f"{where}: field 'calibration.fit' is {calibration['fit']!r}, expected an object")
    temperature = calibration.get("temperature", float("nan"))
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise UserError(f"{where}: field 'calibration.temperature' is {temperature!r}, expected a number")
    if not isinstance(info.get("grid", []), list):
        raise UserError(f"{where}: field 'grid' is {info['grid']!r}, expected the list of labels")


def extra(path):
    """`--posterior DIR`: read (and check) the folder now; the section is made when the report is built."""
    post = read_posterior(path)

    def make(held_out: HeldOut) -> Extra:
        # ids are only unique within a dataset: match the rows that came from the report's own dataset
        roots = {root: same_dataset(root, held_out.dataset_root)
                 for root in {name.rpartition(":")[0] for name in post["names"]}}
        where = {pid: i for i, (pid, name) in enumerate(zip(post["ids"], post["names"]))
                 if roots[name.rpartition(":")[0]]}
        matched = [(h, where[pid]) for h, pid in enumerate(held_out.ids) if pid in where]
        labelled = [m for m in matched if np.isfinite(held_out.soft_labels[m[0]])]
        if len(labelled) >= MIN_MATCHED:
            return compare(post, held_out, labelled)
        return unlabelled(post, held_out)

    return make


def same_dataset(root: str, dataset_root: Path) -> bool:
    """The same folder, or a copy of it (equal content hash in dataset.json)."""
    if not root or not Path(root, "dataset.json").exists():
        return False
    if Path(root).resolve() == Path(dataset_root).resolve():
        return True
    hashes = [read_json(Path(r, "dataset.json"), "dataset.json").get("content_hash") for r in (root, dataset_root)]
    return hashes[0] is not None and hashes[0] == hashes[1]


def settings_line(post: dict) -> str:
    info, cal = post["info"], post["info"].get("calibration", {})
    s = info.get("settings", {})
    fit = cal.get("fit", {})
    how = (f"temperature {cal.get('temperature', float('nan')):.3g} fitted on the votes of {fit.get('patches')} "
           f"patches ({fit.get('dataset')} [{fit.get('split')}])") if cal.get("calibrated") else \
        f"temperature {cal.get('temperature', float('nan')):.3g}, <strong>not calibrated</strong>"
    return (f"{esc(post['path'])}: grid of {len(info.get('grid', []))} labels, {info.get('draws')} draws "
            f"(t evenly spaced, shared noise), {esc(s.get('error_space'))} error, guidance {s.get('guidance')}, "
            f"{how}; {info.get('patches_per_s')} patches/s.")


# -- labelled: both judges on the same held-out patches -------------------------------------------------------

def judge_metrics(score: np.ndarray, soft, hard, degree) -> dict:
    from classifier.evaluate import soft_ece, weighted_auroc

    known = np.isfinite(hard)
    return {"spearman_true_degree": spearman(score, degree), "spearman_soft_label": spearman(score, soft),
            "auroc_hard": weighted_auroc(score[known], hard[known].astype(float)),
            "ece_soft": soft_ece(np.clip(score, 0, 1), soft, 10)[0]}


def compare(post: dict, held_out: HeldOut, matched: list) -> Extra:
    from patches.dataset import read_meta

    h = np.array([m[0] for m in matched])
    p = np.array([m[1] for m in matched])
    gen, disc = post["expected_y"][p], held_out.scores[h]
    soft, hard, degree = held_out.soft_labels[h], held_out.hard_labels[h], held_out.true_degree[h]
    ids = [held_out.ids[i] for i in h]
    metrics = {"patches": len(h), "held_out_split": held_out.split, "path": str(post["path"]),
               "settings": post["info"].get("settings"), "calibration": post["info"].get("calibration"),
               "generative": judge_metrics(gen, soft, hard, degree),
               "discriminative": judge_metrics(disc, soft, hard, degree),
               "agreement_spearman": spearman(gen, disc),
               "posterior_std_vs_ensemble_std_spearman": spearman(post["posterior_std"][p], held_out.score_stds[h]),
               "posterior_std_vs_expert_disagreement_spearman": spearman(post["posterior_std"][p], soft * (1 - soft))}
    noise = None
    if np.isfinite(degree).sum() >= MIN_MATCHED:
        threshold = float(read_meta(held_out.dataset_root).get("true_threshold", 0.5))
        top = held_out.config.noise_top
        gen_off, disc_off = np.abs(soft - gen), np.abs(soft - disc)
        combined = (rankdata(gen_off) + rankdata(disc_off)) / 2  # both judges must find the label off
        noise = {name: benchmark.label_noise(ids, soft, hard, score, degree, threshold, top, disagreement=d)
                 for name, score, d in (("generative", gen, None), ("discriminative", disc, None),
                                        ("combined", (gen + disc) / 2, combined))}
        metrics["label_noise"] = {name: {k: v for k, v in r.items() if k not in ("ranked",)}
                                  for name, r in noise.items()}
        best_single = max(noise["generative"]["precision_at_top"], noise["discriminative"]["precision_at_top"])
        metrics["label_noise"]["combined_at_least_best_single"] = bool(
            noise["combined"]["precision_at_top"] >= best_single)
    metrics["targets"] = {}
    for name, (op, bound) in TARGETS.items():
        v = metrics["generative"][name]
        met = None if v is None or not np.isfinite(v) else bool(v >= bound if op == ">=" else v <= bound)
        metrics["targets"][name] = {"value": v, "target": f"{op} {bound}", "met": met}
    if noise is not None:
        metrics["targets"]["combined_finder_precision"] = {
            "value": noise["combined"]["precision_at_top"], "target": ">= best single judge",
            "met": metrics["label_noise"]["combined_at_least_best_single"]}

    def write(tmp: Path) -> str:
        scatter(tmp / "posterior-agreement.png", gen, disc, degree, metrics["agreement_spearman"])
        names = {"spearman_true_degree": "Spearman with the true degree", "auroc_hard": "AUROC (hard label)",
                 "ece_soft": "ECE (soft label)", "spearman_soft_label": "Spearman with the soft label"}
        rows = [[names[k], metrics["generative"][k], metrics["discriminative"][k]] for k in names]
        rows.append(["agreement of the two judges (Spearman)", metrics["agreement_spearman"], ""])
        html = (f"<p>{settings_line(post)} Both judges on the same {len(h)} held-out patches "
                f"({esc(held_out.split)} split); generative score = E[y] under the posterior, discriminative = "
                f"the ensemble's mean P(mitotic).</p>"
                + table(["", "generative (posterior E[y])", "discriminative (ensemble)"], rows))
        if noise is not None:
            base = noise["generative"]["base_rate"]
            nrows = [[name, r["top"], r["truly_mislabelled_in_top"], r["precision_at_top"], base]
                     for name, r in noise.items()]
            html += ("<p>Label-noise finder: patches ranked by how far the experts' soft label is from the judge "
                     "(combined: mean of the two judges' ranks); a label is truly wrong when the majority vote "
                     "disagrees with the true degree.</p>"
                     + table(["ranked by", "top", "truly mislabelled", "precision", "base rate"], nrows))
        trows = [[k, t["value"], t["target"], Markup('<span class="met">met</span>') if t["met"] else
                  Markup('<span class="miss">missed</span>') if t["met"] is False else "n/a"]
                 for k, t in metrics["targets"].items()]
        html += table(["target (generative)", "value", "wanted", "verdict"], trows)
        html += ("<p class=\"note\">Posterior std against the ensemble's member spread: Spearman "
                 f"{metrics['posterior_std_vs_ensemble_std_spearman']:.3f}; against the experts' disagreement "
                 f"y(1-y): {metrics['posterior_std_vs_expert_disagreement_spearman']:.3f}.</p>")
        return html + img(file_data_uri(tmp / "posterior-agreement.png"), "posterior E[y] against ensemble score",
                          "plot")

    return Extra(key="posterior", title="Generative label posterior against the classifier ensemble",
                 metrics=metrics, write=write)


def scatter(path: Path, gen, disc, degree, rho: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.3))
    colour = np.where(np.isfinite(degree), degree, 0.5)
    points = ax.scatter(disc, gen, c=colour, cmap="viridis", vmin=0, vmax=1, s=9, alpha=0.8, lw=0)
    fig.colorbar(points, ax=ax, label="true mitotic degree" if np.isfinite(degree).any() else "")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="discriminative: ensemble P(mitotic)", ylabel="generative: posterior E[y]",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=f"agreement: Spearman {rho:.3f}, {len(gen)} patches")
    _save(fig, path)


# -- unlabelled: real nuclei with no label --------------------------------------------------------------------

def load_images(names: list[str]) -> np.ndarray:
    """uint8 images of DATASET:ID or file names, one dataset opened once."""
    from mitosis_ldm.images import read_image
    from patches.dataset import PatchDataset

    datasets, out = {}, []
    for name in names:
        root, _, pid = name.rpartition(":")
        if root and Path(root, "dataset.json").exists():
            if root not in datasets:
                ds = PatchDataset(root)
                datasets[root] = (ds, {i: k for k, i in enumerate(ds.ids())})
            ds, lookup = datasets[root]
            if pid not in lookup:
                raise UserError(f"{root}: field 'id' has no patch '{pid}' (named in posterior.csv)")
            out.append(ds.uint8(np.array([lookup[pid]]))[0])
        elif Path(name).exists():
            out.append(read_image(name))
        else:
            raise UserError(f"{name}: not found (named in posterior.csv)")
    return np.stack(out)


def unlabelled(post: dict, held_out: HeldOut) -> Extra:
    from .build import ensemble_scores

    images = load_images(post["names"])
    disc, _ = ensemble_scores(held_out.classifier, images, held_out.config.batch_size)
    gen = post["expected_y"]
    both = (rankdata(-gen) + rankdata(-disc)) / 2  # small = both call it mitotic
    order = np.argsort(both, kind="stable")[:16]
    metrics = {"patches": len(gen), "path": str(post["path"]), "mean_expected_y": float(gen.mean()),
               "share_expected_y_above_half": float((gen >= 0.5).mean()),
               "mean_ensemble_score": float(disc.mean()), "agreement_spearman": spearman(gen, disc),
               "most_mitotic_by_both": [{"id": post["ids"][i], "expected_y": float(gen[i]),
                                         "ensemble_score": float(disc[i])} for i in order]}

    def write(tmp: Path) -> str:
        histogram(tmp / "posterior-unlabelled-hist.png", gen, disc)
        thumbs = [[img(png_data_uri(images[i]), post["ids"][i]), post["ids"][i], gen[i], post["posterior_std"][i],
                   disc[i]] for i in order]
        return (f"<p>{settings_line(post)} {len(gen)} unlabelled nuclei: mean E[y] {gen.mean():.3f}, "
                f"{(gen >= 0.5).mean():.1%} at E[y] >= 0.5; agreement with the ensemble (Spearman) "
                f"{metrics['agreement_spearman']:.3f}.</p>"
                + img(file_data_uri(tmp / "posterior-unlabelled-hist.png"), "histogram of E[y]", "plot")
                + "<p>The nuclei both judges call most mitotic (mean of the two ranks):</p>"
                + table(["patch", "id", "E[y]", "posterior std", "ensemble score"], thumbs, "noise"))

    return Extra(key="posterior_unlabelled", title=f"Generative label posterior on unlabelled nuclei "
                                                   f"({Path(post['path']).name})", metrics=metrics, write=write)


def histogram(path: Path, gen, disc) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bins = np.linspace(0, 1, 26)
    ax.hist(gen, bins, color=GENERATED[0], alpha=0.6, label="generative: posterior E[y]")
    ax.hist(disc, bins, color=REAL, alpha=0.4, label="discriminative: ensemble P(mitotic)")
    ax.set(xlabel="how mitotic (0 = not, 1 = every expert would say mitotic)", ylabel="nuclei",
           title=f"{len(gen)} unlabelled real nuclei")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    _save(fig, path)
