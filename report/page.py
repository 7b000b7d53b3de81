"""The report page's sections: the summary table, one section per folder with sliders, morphology, fidelity,
memorisation, the synthetic benchmark, and whatever extra judges (posterior, reader study, CAS) were given."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import morphology
from .html import Markup, esc, file_data_uri, img, png_data_uri, table

if TYPE_CHECKING:
    from .build import Folder


FEATURE_DIGITS = {"area": 0, "perimeter": 1}


def frame_caption(f: Folder, s: int, c: int) -> str:
    if c in f.generated:
        return f"condition y = {f.conditions[c]:.2f}"
    own = f.manifest.get("input_labels")
    label = own[s] if isinstance(own, list) and len(own) == f.frames.shape[0] else f.manifest["conditions"][c]
    return "real input" + (f" (label {float(label):.2f})" if label is not None else " (unlabelled)")


def seed_title(f: Folder, s: int, seed) -> str:
    names = f.manifest.get("inputs") or f.manifest.get("names")
    if isinstance(names, list) and len(names) == f.frames.shape[0]:
        title = f"{'real input' if f.role == 'real2gen' else 'seed'} {names[s]}"
    else:
        title = f"{'input' if f.role == 'real2gen' else 'seed'} {seed}"
    psnr = f.manifest.get("psnr_inversion_db")
    if isinstance(psnr, list) and len(psnr) == f.frames.shape[0] and psnr[s] is not None:
        title += f" (inversion reconstructs it at {float(psnr[s]):.1f} dB)"
    return title


def folder_data(f: Folder) -> dict:
    names = list(morphology.FEATURES)
    seeds = []
    for s, seed in enumerate(f.manifest["seeds"]):
        seeds.append({
            "title": seed_title(f, s, seed),
            "frames": [png_data_uri(f.frames[s, c]) for c in range(f.frames.shape[1])],
            "captions": [frame_caption(f, s, c) for c in range(f.frames.shape[1])],
            "is_input": [bool(c not in f.generated) for c in range(f.frames.shape[1])],
            "scores": [float(v) for v in f.scores[s]],
            "stds": [float(v) for v in f.stds[s]],
            "features": [[None if not np.isfinite(f.morph[n][s, c]) else float(f.morph[n][s, c]) for n in names]
                         for c in range(f.frames.shape[1])],
        })
    return {"seeds": seeds, "feature_names": [{"label": morphology.FEATURES[n], "digits": FEATURE_DIGITS.get(n, 3)}
                                              for n in names]}


def sampling_note(manifest: dict) -> str:
    """How a folder's frames were sampled, from its manifest ('' when it does not say)."""
    if manifest.get("guidance") is None:
        return ""
    against = {"weak": "the pipeline's weak model (autoguidance)", "null": "the null label (classifier-free)"}
    parts = [f"guidance {manifest['guidance']:g} against {against.get(manifest.get('guide', 'null'), '?')}"]
    interval = manifest.get("guidance_interval")
    if isinstance(interval, list) and len(interval) == 2 and list(interval) != [0.0, 1.0]:
        parts.append(f"on noise levels [{interval[0]:g}, {interval[1]:g}]")
    if manifest.get("guidance_rescale"):
        parts.append(f"rescale {manifest['guidance_rescale']:g}")
    if manifest.get("null_guidance"):
        middle = manifest.get("null_guidance_middle", 1.0)
        below = manifest.get("null_guidance_middle_below", 1.0)
        share = "" if middle == 1.0 else \
            f" ({middle:g} of it at y = 0.5" + (f", at noise levels t/T <= {below:g})" if below < 1.0 else ")")
        parts.append(f"plus {manifest['null_guidance']:g} x the push away from the null label{share}")
    if manifest.get("sampler"):
        parts.append(f"{manifest['sampler']}, {manifest.get('steps')} steps")
    return "Sampled with " + ", ".join(parts) + ". "


def ci_cell(entry: dict) -> str:
    lo, hi = entry["ci"]
    return "–" if lo is None else f"[{lo:.3f}, {hi:.3f}]"


def label_response_section(tmp: Path, metrics: dict) -> str:
    """The real label-response curve against each transitions folder's, with the one-story reading guide."""
    response = metrics["label_response"]
    rows = []
    for key, entry in response.items():
        if key == "real":
            continue
        for r in entry["error"]["per_label"]:
            rows.append([key, f"{r['soft_label']:.3f}", r["n_real"], r["real"], r["generated"], r["difference"]])
        err = entry["error"]
        if err["value"] is not None:
            largest = Markup(f"<b>{err['value']:.3f}</b> {esc(ci_cell(err))}")
            rows.append([key, "largest |difference|", "", "", "", largest])
    return ("<p class='note'>The yardstick is not score = y: a calibrated classifier regresses toward the mean. "
            "It is the <b>real label-response curve</b>, the mean score of held-out real patches at each soft label "
            "(grey squares, 95% CI). The generated curve (mean over seeds at each condition, 95% CI band) is read at "
            "those labels by linear interpolation (crosses); the label-response error is the largest gap, with a "
            "bootstrap CI over seeds and real patches.</p>"
            + img(file_data_uri(tmp / "label_response.png"), "label response: generated vs real", "plot")
            + table(["folder", "soft label", "real patches", "real mean score", "generated (interpolated)",
                     "generated − real"], rows)
            + "<p class='note'><b>What to look for:</b> the three views should tell one story. A generator that "
              "renders the uncertain middle faithfully follows the grey curve here (no jump between neighbouring "
              "conditions that real patches do not show), keeps the Fréchet ratio near 1 in <i>every</i> label bin "
              "(a high ratio in one bin says which labels it renders unlike real patches; in a bin that also holds "
              "conditions between the real labels, read it against the bin's calibrated real reference, which "
              "is what real patches drawn as a gradual transition score there), and moves each "
              "morphology feature across the conditions the way real patches move across soft labels. A curve that "
              "switches abruptly, a bin far above its yardstick, or a feature that jumps where real patches change "
              "gradually all point to the same fault: the condition is being sharpened toward one mode. A dip "
              "at conditions that real labels never take (for example 0.4–0.5 on a three-expert panel) can also "
              "come from frames that left the real data altogether: the section <i>Frames outside the real "
              "data</i> counts them per condition and shows them.</p>")


def page(tmp: Path, folders, metrics, fd_rows, memo, bench, real_images, atypical=None) -> dict:
    """Sections of report.html, each an (escaped) HTML string."""
    from .html import seed_rows

    data = {f.key: folder_data(f) for f in folders}  # PNG-encode every frame once
    sections = []
    # summary: the targets
    rows = []
    for name, t in metrics["targets"].items():
        verdict = "–" if t["met"] is None else ("met" if t["met"] else "missed")
        rows.append([name.replace("_", " "), t["value"], ci_cell(t) if t.get("ci") else "–", t["target"],
                     Markup(f'<span class="{"met" if t["met"] else "miss"}">{esc(verdict)}</span>')])
    inputs = metrics["inputs"]
    listing = "".join(f"<li><b>{esc(k)}</b>: {esc(', '.join(map(str, v)) if isinstance(v, list) else v)}</li>"
                      for k, v in inputs.items())
    sections.append(("Summary", table(["metric", "value", "95% bootstrap CI", "target", "verdict"], rows)
                     + f"<ul class='note'>{listing}</ul>"
                     + "<p class='note'>Scores are the mean P(mitotic) of an independent classifier ensemble; "
                       "the condition y is the fraction of experts the generator was asked to imitate. "
                       "Morphology is measured on the nucleus segmented on the haematoxylin channel.</p>"))
    if (tmp / "label_response.png").exists():
        sections.append(("Label response: generated vs real", label_response_section(tmp, metrics)))
    # one section per folder: the consistency table, its plot, and the sliders
    for f in folders:
        s = f.summary
        rows = [["Spearman(condition, score)", "median", s["spearman"]["value"], ci_cell(s["spearman"])],
                ["monotone steps", "mean fraction", s["monotone"]["value"], ci_cell(s["monotone"])],
                ["flip (score < 0.5 at y=0, > 0.5 at y=1)", "rate", s["flip"]["value"], ci_cell(s["flip"])],
                ["|score − condition|", "mean", s["abs_error"]["value"], ci_cell(s["abs_error"])]]
        note = ("Each row is one real nucleus: the first frame is the real input, the others are the model's "
                "rendering of it at each target label. " if f.role == "real2gen" else
                "Each row is one seed: the same noise rendered at each condition. ")
        body = (f"<p class='note'>{esc(str(f.path))} — {s['n_seeds']} rows; scores from {esc(f.score_source)}. "
                f"{esc(sampling_note(f.manifest) if f.role != 'real2gen' else '')}{esc(note)}"
                "Move a slider (or click a thumbnail) to walk the nucleus through the conditions.</p>"
                + table(["metric", "statistic", "value", "95% bootstrap CI"], rows)
                + img(file_data_uri(tmp / f"consistency-{f.key}.png"), f"score vs condition for {f.key}", "plot")
                + seed_rows(f.key, data[f.key]))
        sections.append((f"{'Real to generated' if f.role == 'real2gen' else 'Transitions'}: {f.key}", body))
    # morphology
    rows = []
    for name, label in morphology.FEATURES.items():
        row = [label]
        for f in folders:
            m = metrics["morphology"][f.key][name]
            row += [m["spearman_mean_curve"], m["median_seed_spearman"]]
        row.append(metrics["morphology"].get("real", {}).get(name, {}).get("spearman_soft_label"))
        rows.append(row)
    header = ["feature"] + [h for f in folders for h in (f"{f.key}: ρ mean curve", f"{f.key}: median ρ per seed")]
    sections.append(("Morphology along the transitions",
                     "<p class='note'>Spearman ρ of each feature against the condition (generated) and against the "
                     "soft label (held-out real patches). The plot shows generated means ± 95% CI over seeds and "
                     "real patches binned by soft label on the same axes.</p>"
                     + table(header + ["real: ρ vs soft label"], rows)
                     + img(file_data_uri(tmp / "morphology.png"), "morphology features vs condition", "plot")))
    # fidelity and memorisation
    fid = metrics["fidelity"]
    floor = fid.get("floor_pipeline") is not None
    reference = fid.get("reference")
    rows = [[r["label_bin"], r["n_generated"], r["n_real"], r["n"], r["frechet"], r["yardstick"], r["ratio"],
             ci_cell({"ci": [r.get("ratio_ci_low"), r.get("ratio_ci_high")]}),
             *([r["floor_ratio"]] if floor else []), *([r.get("reference_ratio")] if reference else []),
             r["ratio_common_n"]] for r in fd_rows]
    rows.append(["mean over bins", "", "", "", fid["frechet_mean"], fid["yardstick_mean"], fid["ratio"],
                 "worst bin " + ci_cell({"ci": fid.get("worst_bin_ci") or [None, None]}),
                 *([""] if floor else []),
                 *([f"worst bin {reference['worst_bin']:.3g}" if reference["worst_bin"] is not None else ""]
                   if reference else []), ""])
    common = next((r["common_n"] for r in fd_rows if r["common_n"]), None)  # one n shared by every bin
    by_condition = [r for r in fid.get("by_condition", []) if r["ratio"] is not None]
    body = ("<p class='note'>Fréchet distance in the classifier's feature space between generated frames and "
            "held-out real patches of the same label bin, beside the same distance between two disjoint halves of "
            "the real patches (equal sample sizes, averaged over repeats). Both shrink as n grows, the yardstick "
            "toward 0, so the same gap gives a larger ratio in a bin with more real patches; the last column "
            "compares every bin at one n (the smallest bin's), which is the column to read across bins. The "
            f"interval is over seeds ({fid.get('ci_resamples', 0)} halves of the {fid.get('ci_seeds', 0)} seeds, "
            "each measured again): how far the ratio would move with another set of seeds. A bin whose interval "
            "straddles a target is not settled by this run.</p>"
            + ("<p class='note'><b>Autoencoder floor:</b> the same ratio for the held-out patches' own "
               "reconstructions through the pipeline's autoencoder (half A rebuilt, against half B). A latent "
               "generator that reproduced the real patches' latents exactly would score this. A bin whose ratio "
               "sits at its floor may be limited by the autoencoder"
               + ("; the table of conditions below says whether one of its conditions is far above that floor "
                  "all the same." if by_condition else ".") + "</p>"
               if floor else "")
            + (f"<p class='note'><b>Calibrated real reference:</b> the same ratio for {reference['n_draws']} "
               f"training patches standing in for the frames, one per frame, each drawn as a gradual, calibrated "
               f"transition would render its condition: at a condition between two real soft labels a and b, a "
               f"patch of label b with probability (y − a) / (b − a), else of label a (labels "
               f"{', '.join(f'{v:.3g}' for v in reference['labels'])}). Its mean score follows the real "
               "label-response curve, so it is what the real data itself scores as a gradual transition. A bin "
               "holding conditions between the real labels compares them with patches of the bin's own labels, "
               "so its reference sits above 1; a generator well under its reference there is rendering those "
               "conditions as the bin's labels (a step at the bin edge), not as in-between figures. The "
               "classifier was trained on these patches and separates their labels more than it does held-out "
               "ones, so in a bin of in-between conditions read the reference as an upper estimate "
               "(<code>bench/oracle_bins.py --pool unseen</code> draws patches it never saw).</p>"
               if reference else "")
            + table(["label bin", "generated", "real", "n used", "Fréchet", "yardstick", "ratio",
                     "ratio, 95% over seeds", *(["autoencoder floor"] if floor else []),
                     *(["calibrated real reference"] if reference else []),
                     f"ratio at n = {common}" if common else "ratio at common n"], rows)
            + img(file_data_uri(tmp / "fidelity.png"), "Fréchet distance per label bin", "plot"))
    if by_condition:
        body += ("<h3>Each condition against its bin</h3><p class='note'>A bin's ratio pools the frames of every "
                 "condition in it. Here each condition's frames alone are compared with the same bin's real "
                 "patches, n each. A condition far above the others of its bin is where that bin's ratio comes "
                 "from. The real patches carry only the soft labels the data has, so only a condition equal to one "
                 "of those is compared like with like; one between them is compared with patches of a nearby "
                 "label, and a higher ratio there is expected.</p>"
                 + table(["condition", "label bin", "n used", "Fréchet", "yardstick", "ratio"],
                         [[r["condition"], r["label_bin"], r["n"], r["frechet"], r["yardstick"], r["ratio"]]
                          for r in by_condition]))
    if memo:
        rows = [[space, r["share"], r["quantile"], r["threshold"], r["generated_median"], r["held_out_median"],
                 r["n_generated"], r["n_train"]] for space, r in metrics["memorisation"].items()]
        body += ("<h3>Memorisation</h3><p class='note'>Share of generated patches nearer to a training patch than "
                 "the given quantile of held-out real patches are (about that quantile if nothing is copied).</p>"
                 + table(["space", "share", "quantile", "threshold", "median NN (gen)", "median NN (held-out)",
                          "generated", "training searched"], rows)
                 + "".join(img(file_data_uri(tmp / f"memorisation-{space}.png"), f"nearest neighbours ({space})",
                               "plot") for space in memo))
    if atypical:
        body += atypical_section(tmp, atypical)
    sections.append(("Fidelity and memorisation", body))
    # synthetic benchmark
    if bench is not None:
        noise = bench[2]
        lm = metrics["benchmark"]["label_noise"]
        rows = []
        for r in noise["ranked"][:20]:
            rows.append([r["rank"], img(png_data_uri(real_images[r["index"]]), r["id"]), r["id"], r["soft_label"],
                         r["score"], r["true_degree"], r["truly_mislabelled"]])
        body = (img(file_data_uri(tmp / "degree.png"), "estimated vs true degree", "plot")
                + "<p class='note'>Above: the classifier's score mapped to a degree (isotonic fit on held-out real "
                  "patches) for generated frames, against the true degree of real patches with that soft label.</p>"
                + f"<h3>Label-noise finder</h3><p class='note'>Held-out real patches ranked by |soft label − score|. "
                  f"Of the top {lm['top']}, {lm['truly_mislabelled_in_top']} are truly mislabelled (majority vote "
                  f"disagrees with the known degree); base rate {lm['base_rate']:.1%} "
                  f"({lm['n_mislabelled']} of {lm['n_labelled']}).</p>"
                + table(["rank", "patch", "id", "soft label", "score", "true degree", "truly mislabelled"], rows,
                        "noise"))
        sections.append(("Synthetic benchmark (known degree)", body))
    return {
        "title": "mitosis-ldm report",
        "subtitle": "What changes as a nucleus turns mitotic: label consistency, morphology, fidelity.",
        "sections": sections,
        "folders": data,
    }


def atypical_section(tmp: Path, atypical: dict) -> str:
    """The other tail of the nearest-neighbour distances: generated frames farther from the data than real ones."""
    rows = [[space, r["share"], r["expected_share"], r["threshold"], r["beyond_all_share"], r["n_generated"]]
            for space, r in atypical.items()]
    per_condition = []
    for space, r in atypical.items():
        for key, entry in r["per_condition"].items():
            per_condition.append([space, key] + [f"{n}" for n in entry["flagged"]])
    first = next(iter(atypical.values()))
    conditions = next(iter(first["per_condition"].values()))["conditions"] if first["per_condition"] else []
    pixels = atypical.get("pixels")
    seeds = ""
    if pixels:
        listed = ", ".join(f"{key}: {', '.join(map(str, s)) or 'none'}" for key, s in pixels["seeds_flagged"].items())
        seeds = f"<p class='note'>Seeds with a flagged frame (pixels): {esc(listed)}.</p>"
    sheet = (img(file_data_uri(tmp / "atypical-pixels.png"), "the generated frames farthest from the real data")
             if pixels and pixels["share"] > 0 else "")
    return ("<h3>Frames outside the real data</h3><p class='note'>The other tail of the same distances: the share of "
            "generated frames farther from every training patch than the given quantile of held-out real patches "
            "are. A generator that stays on the real data puts about the expected share there. Frames far beyond "
            "it are not unusual nuclei but another kind of picture: another tissue's colours, or no nucleus at the "
            "centre. The sheet shows the farthest (s = seed, y = condition); <code>atypical-pixels.csv</code> lists "
            "every flagged frame with its distance and score.</p>"
            + table(["space", "share above", "expected", "threshold", "beyond every held-out patch", "generated"],
                    rows)
            + table(["space", "folder"] + [f"y = {c:.2g}" for c in conditions], per_condition)
            + seeds + sheet)
