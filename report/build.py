"""Compute everything the report shows and write the output folder (metrics.json, CSVs, PNGs, report.html).

`build_report(cfg, transitions, real2gen, classifier, dataset, out, overwrite)`
takes a loaded classifier ensemble (anything with `predict`, `features` and
`patch_size`), so `cli.py` stays a thin argument parser.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mitosis_ldm.artifacts import read_transitions
from mitosis_ldm.errors import UserError
from mitosis_ldm.io import atomic_dir

from . import against_real, benchmark, consistency, fidelity, label_response, morphology
from .extras import Extra, HeldOut
from .outputs import write_folder_metrics, write_outputs
from .stats import bootstrap_ci, curve_ci, spearman

TARGETS = {  # the acceptance targets on the synthetic benchmark: (metric, direction, bound)
    "median_spearman": (">=", 0.9),
    "flip_rate": (">=", 0.9),
    # mean |score - condition| is no target: a calibrated classifier regresses toward the mean, so real figures
    # themselves miss score = y; the label-response error below holds the frames to real patches instead. It stays
    # in the consistency summary (metrics.json `consistency`, the page's per-folder table).
    "h_mean_spearman": (">=", 0.8),
    "irregularity_spearman": (">=", 0.8),
    "frechet_ratio": ("<=", 3.0),
    "memorisation_share": ("<=", 0.05),
    # the calibrated-transitions targets: the real label-response curve reproduced, and every label bin faithful
    "label_response_error": ("<=", 0.05),
    "frechet_ratio_worst_bin": ("<=", 2.0),
}


@dataclass
class ReportConfig:
    label_bins: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    bootstrap: int = 1000            # resamples for every confidence interval
    max_real: int = 1000             # held-out real patches measured (random subset)
    max_train: int = 5000            # training patches searched for nearest neighbours (pixels)
    max_train_features: int = 1000   # of those, how many the classifier embeds (the slow part)
    memorisation_quantile: float = 0.01
    frechet_repeats: int = 5
    frechet_resamples: int = 100     # half-samples of the seeds behind each bin ratio's interval
    frechet_min_count: int = 8
    noise_top: int = 50              # label-noise finder: how many top disagreements are checked
    label_response_min_count: int = 10  # real patches a soft-label value needs to enter the label-response curve
    # each bin's ratio for training patches drawn as a gradual, calibrated transition would render them
    # (fidelity.calibrated_draws)
    calibrated_reference: bool = True
    batch_size: int = 128            # classifier batch
    seed: int = 0


@dataclass
class Folder:
    """One transitions or real2gen folder with everything measured on its frames."""

    key: str
    role: str                        # "transitions" | "real2gen"
    path: Path
    frames: np.ndarray               # (S, C, H, W, 3) uint8
    manifest: dict
    conditions: np.ndarray           # (C,) float, NaN at a real input column
    generated: np.ndarray            # column indices of generated frames
    scores: np.ndarray = None        # (S, C) ensemble mean
    stds: np.ndarray = None          # (S, C) std over members
    score_source: str = ""
    features: np.ndarray = None      # (S, C, D) classifier penultimate features
    morph: dict = None               # {feature: (S, C)}
    per_seed: list = None
    summary: dict = None


# -- scoring ---------------------------------------------------------------

def verdict(value, op: str, bound: float) -> bool | None:
    """Whether `value` meets the target `op bound` (a value on the bound meets it); None when there is no value."""
    if value is None or not np.isfinite(value):
        return None
    return bool(value >= bound if op == ">=" else value <= bound)


def batched(fn, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(np.array(images[i: i + batch])))  # a writable copy
                           for i in range(0, len(images), batch)], axis=0)


def ensemble_scores(classifier, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) over ensemble members of P(mitotic) for uint8 (N, H, W, 3)."""
    probs = batched(classifier.predict, images, batch).astype(float)
    probs = probs.reshape(len(images), -1)           # (N, K members)
    return probs.mean(1), probs.std(1)


def scores_from_csv(folder: Folder) -> tuple[np.ndarray, np.ndarray] | None:
    """scores.csv of a scored folder as (S, C) mean and std; a count mismatch is one clear line."""
    rows = read_transitions(folder.path).scores()
    if rows is None:
        return None
    s, c = folder.frames.shape[:2]
    path = folder.path / "scores.csv"
    values = {}
    for name in ("mean", "std"):
        try:
            values[name] = np.array([float(r[name]) for r in rows], float).reshape(s, c)
        except (KeyError, TypeError):
            raise UserError(f"{path}: field '{name}' is missing") from None
        except ValueError as err:
            raise UserError(f"{path}: field '{name}' has a non-numeric value ({err})") from None
    return values["mean"], values["std"]


def check_patch_size(classifier, classifier_path, frames_path: Path, frames: np.ndarray) -> None:
    h, w = frames.shape[-3:-1]
    size = int(classifier.patch_size)
    if (h, w) != (size, size):
        raise UserError(f"{classifier_path}: field 'patch_size' is {size}, but {frames_path} holds {h}x{w} frames; "
                        f"the classifier does not fit this patch size (train one at {h}x{w})")


# -- reading ---------------------------------------------------------------

def load_folders(transitions: list, real2gen: list) -> list[Folder]:
    folders, used = [], set()
    for role, paths in (("transitions", transitions), ("real2gen", real2gen)):
        for path in paths:
            t = read_transitions(path)
            key, n = role, 2
            while key in used:
                key, n = f"{role}-{n}", n + 1
            used.add(key)
            conditions = np.array([np.nan if c is None else float(c) for c in t.conditions])
            start = 1 if t.has_input_frame else 0
            if t.has_input_frame:
                conditions[0] = np.nan
            folders.append(Folder(key, role, t.path, t.frames, t.manifest, conditions,
                                  np.arange(start, len(conditions))))
    return folders


def held_out_split(dataset_root) -> tuple[object, str]:
    from patches.dataset import PatchDataset

    for split in ("test", "val"):
        ds = PatchDataset(dataset_root, split=split)
        if len(ds):
            return ds, split
    return PatchDataset(dataset_root, split=None), "all"


def subset(n: int, limit: int, rng) -> np.ndarray:
    return np.sort(rng.permutation(n)[:limit]) if n > limit else np.arange(n)


def held_out_images(dataset_root, cfg, rng):
    """The report's held-out real patches: (dataset, split name, picked indices, uint8 images). The pick is the
    first draw from `rng`, so a bench that seeds its rng as the report does measures the same patches."""
    ds, split = held_out_split(dataset_root)
    pick = subset(len(ds), cfg.max_real, rng)
    return ds, split, pick, ds.uint8(pick)


# -- the report ------------------------------------------------------------

@fidelity.one_blas_thread()
def build_report(cfg: ReportConfig, transitions: list, real2gen: list, classifier, classifier_path,
                 dataset_root, out, overwrite: bool = False, log=print, extras: tuple = ()) -> dict:
    """`extras`: callables `make(held_out: HeldOut) -> Extra`, one per extra judge's folder (see extras.py)."""
    from patches.dataset import PatchDataset, read_meta

    start = time.time()
    _log = log

    def log(message):  # every progress line says how long the report has run
        _log(f"[{time.time() - start:5.1f} s] {message}")

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    folders = load_folders(transitions, real2gen)
    meta = read_meta(dataset_root)
    for f in folders:
        check_patch_size(classifier, classifier_path, f.path / "frames.npy", f.frames)
        if int(meta["patch_size"]) != f.frames.shape[2]:
            raise UserError(f"{Path(dataset_root) / 'dataset.json'}: field 'patch_size' is {meta['patch_size']}, "
                            f"but {f.path / 'frames.npy'} holds {f.frames.shape[2]}x{f.frames.shape[3]} frames")
    rng = np.random.default_rng(cfg.seed)

    # generated frames: scores, features, morphology, consistency
    for f in folders:
        s, c = f.frames.shape[:2]
        flat = np.asarray(f.frames).reshape(s * c, *f.frames.shape[2:])
        from_csv = scores_from_csv(f)
        if from_csv is None:
            mean, std = ensemble_scores(classifier, flat, cfg.batch_size)
            f.scores, f.stds, f.score_source = mean.reshape(s, c), std.reshape(s, c), "classifier (no scores.csv)"
        else:
            f.scores, f.stds = from_csv
            f.score_source = str(f.path / "scores.csv")
        f.features = batched(classifier.features, flat, cfg.batch_size).reshape(s, c, -1)
        f.morph = {k: v.reshape(s, c) for k, v in morphology.measure_batch(flat).items()}
        f.per_seed = consistency.per_seed(f.conditions[f.generated], f.scores[:, f.generated], f.manifest["seeds"])
        f.summary = consistency.aggregate(f.per_seed, cfg.bootstrap, cfg.seed)
        log(f"{f.key}: {s} seeds x {len(f.generated)} conditions; median Spearman "
            f"{f.summary['spearman']['value']:.3f}, flip rate {f.summary['flip']['value']:.2f}")

    # real patches: held-out for comparison, training for nearest neighbours
    real_ds, real_split, pick, real_images = held_out_images(dataset_root, cfg, rng)
    real_soft = real_ds.soft_labels[pick]
    real_hard = real_ds.hard_labels[pick]
    real_degree = real_ds.true_degree[pick]
    real_ids = [real_ds.ids()[i] for i in pick]
    real_scores, real_stds = ensemble_scores(classifier, real_images, cfg.batch_size)
    real_features = batched(classifier.features, real_images, cfg.batch_size)
    real_morph = morphology.measure_batch(real_images)
    train_ds = PatchDataset(dataset_root, split="train")
    train_pick = subset(len(train_ds), cfg.max_train, rng) if len(train_ds) else None
    train_images = None if train_pick is None else train_ds.uint8(train_pick)
    train_soft = None if train_pick is None else np.asarray(train_ds.soft_labels, dtype=float)[train_pick]
    log(f"real patches: {len(real_images)} held-out ({real_split} split), "
        f"{0 if train_images is None else len(train_images)} training")

    edges = np.asarray(cfg.label_bins, float)
    n_bins = len(edges) - 1
    bin_names = [f"[{edges[i]:.2f}, {edges[i + 1]:.2f}{']' if i == n_bins - 1 else ')'}" for i in range(n_bins)]
    real_bins = morphology.label_bins(real_soft, edges)

    metrics = {
        "inputs": {"transitions": [str(p) for p in transitions], "real2gen": [str(p) for p in real2gen],
                   "classifier": str(classifier_path), "dataset": str(dataset_root),
                   "held_out_split": real_split, "n_held_out": int(len(real_images)),
                   "n_train_searched": 0 if train_images is None else int(len(train_images))},
        "config": vars(cfg),
        "consistency": {f.key: {**f.summary, "score_source": f.score_source, "path": str(f.path)} for f in folders},
    }

    # morphology: generated curves (mean ± CI over seeds) and real per soft-label bin
    morph_generated, morph_metrics = {}, {}
    for f in folders:
        cond = f.conditions[f.generated]
        entry = {"conditions": cond}
        morph_metrics[f.key] = {}
        for name in morphology.FEATURES:
            matrix = f.morph[name][:, f.generated]
            mean, lo, hi = curve_ci(matrix, min(cfg.bootstrap, 500), seed=cfg.seed)
            seed_rho = [spearman(cond, row) for row in matrix]
            entry[name] = {"mean": mean, "lo": lo, "hi": hi, "spearman": spearman(cond, mean)}
            morph_metrics[f.key][name] = {
                "spearman_mean_curve": entry[name]["spearman"],
                "median_seed_spearman": float(np.nanmedian(seed_rho)) if np.isfinite(seed_rho).any() else None,
                "mean_by_condition": mean, "ci_low": lo, "ci_high": hi, "conditions": cond,
                "segmented_fraction": float(np.isfinite(matrix).mean()),
            }
        morph_generated[f.key] = entry
    morph_real = None
    present = [b for b in range(n_bins) if (real_bins == b).any()]
    if present:
        morph_real = {"x": np.array([real_soft[real_bins == b].mean() for b in present])}
        morph_metrics["real"] = {}
        for name in morphology.FEATURES:
            cells = [bootstrap_ci(real_morph[name][real_bins == b], np.mean, min(cfg.bootstrap, 500), seed=cfg.seed)
                     for b in present]
            mean = np.array([c["value"] if c["value"] is not None else np.nan for c in cells])
            lo = np.array([c["ci"][0] if c["value"] is not None else np.nan for c in cells])
            hi = np.array([c["ci"][1] if c["value"] is not None else np.nan for c in cells])
            rho = spearman(real_soft, real_morph[name])
            morph_real[name] = {"mean": mean, "lo": lo, "hi": hi, "spearman": rho}
            morph_metrics["real"][name] = {"spearman_soft_label": rho, "bins": [bin_names[b] for b in present],
                                           "bin_mean_label": morph_real["x"], "mean": mean, "ci_low": lo,
                                           "ci_high": hi}
    metrics["morphology"] = morph_metrics

    # fidelity and memorisation use the transitions (not real2gen, which starts from real inputs)
    compared = against_real.compare(cfg, folders, classifier, real_images, real_features, real_bins, train_images,
                                    train_soft, edges, bin_names, rng, log)
    memo, atypical = compared["memo"], compared["atypical"]
    metrics.update(fidelity=compared["fidelity"], memorisation=compared["memorisation"],
                   atypical={space: {k: v for k, v in r.items() if k != "frames"} for space, r in atypical.items()})
    fid = metrics["fidelity"]
    fd_rows = fid["bins"]

    # synthetic benchmark
    bench = None
    if np.isfinite(real_degree).sum() >= 10:
        threshold = float(meta.get("true_threshold", 0.5))
        calibration = benchmark.DegreeCalibration(real_scores, real_degree)
        bench_generated = {}
        metrics["benchmark"] = {"true_threshold": threshold, "generated": {}}
        for f in folders:
            cond = f.conditions[f.generated]
            est = calibration(f.scores[:, f.generated])
            mean, lo, hi = curve_ci(est, min(cfg.bootstrap, 500), seed=cfg.seed)
            bench_generated[f.key] = {"conditions": cond, "mean": mean, "lo": lo, "hi": hi}
            metrics["benchmark"]["generated"][f.key] = {
                "conditions": cond, "estimated_degree": mean, "ci_low": lo, "ci_high": hi,
                "spearman": spearman(cond, mean)}
        true_cells = [bootstrap_ci(real_degree[real_bins == b], np.mean, min(cfg.bootstrap, 500), seed=cfg.seed)
                      for b in present]
        est_real = calibration(real_scores)
        bench_real = {
            "x": morph_real["x"], "threshold": threshold,
            "true": {"mean": np.array([c["value"] for c in true_cells]),
                     "lo": np.array([c["ci"][0] for c in true_cells]),
                     "hi": np.array([c["ci"][1] for c in true_cells])},
            "estimated": {"mean": np.array([est_real[real_bins == b].mean() for b in present])},
        }
        metrics["benchmark"]["real_by_soft_label"] = {
            "bins": [bin_names[b] for b in present], "bin_mean_label": morph_real["x"],
            "true_degree": bench_real["true"]["mean"], "estimated_degree": bench_real["estimated"]["mean"]}
        noise = benchmark.label_noise(real_ids, real_soft, real_hard, real_scores, real_degree, threshold,
                                      cfg.noise_top)
        metrics["benchmark"]["label_noise"] = {k: v for k, v in noise.items() if k != "ranked"}
        metrics["benchmark"]["label_noise"]["top_ranked"] = noise["ranked"][: noise["top"]]
        bench = (bench_generated, bench_real, noise)

    metrics["label_response"], response_curves = label_response.report_metrics(
        folders, real_soft, real_scores, cfg.label_response_min_count, cfg.bootstrap, cfg.seed)

    main = next(f for f in folders if f.role == "transitions")
    response = metrics["label_response"][main.key]["error"]
    bin_ratios = [r["ratio"] for r in fd_rows if r["ratio"] is not None]
    values = {
        "median_spearman": main.summary["spearman"]["value"],
        "flip_rate": main.summary["flip"]["value"],
        "h_mean_spearman": morph_metrics[main.key]["h_mean"]["spearman_mean_curve"],
        "irregularity_spearman": morph_metrics[main.key]["irregularity"]["spearman_mean_curve"],
        "frechet_ratio": fid["ratio"],
        "memorisation_share": memo["pixels"]["share"] if memo else None,
        "label_response_error": response["value"],
        "frechet_ratio_worst_bin": max(bin_ratios) if bin_ratios else None,
    }
    intervals = {"median_spearman": main.summary["spearman"]["ci"], "flip_rate": main.summary["flip"]["ci"],
                 "label_response_error": response["ci"],
                 "frechet_ratio_worst_bin": fid["worst_bin_ci"] or [None, None]}
    metrics["targets"] = {}
    for name, (op, bound) in TARGETS.items():
        v = values[name]
        metrics["targets"][name] = {"value": v, "ci": intervals.get(name), "target": f"{op} {bound}",
                                    "met": verdict(v, op, bound),
                                    "folder": main.key}

    held_out = HeldOut(classifier, Path(dataset_root), real_split, real_ids, real_images, real_soft, real_hard,
                       real_degree, real_scores, real_stds, cfg, log)
    extra_sections: list[Extra] = [make(held_out) for make in extras]
    for extra in extra_sections:
        metrics[extra.key] = extra.metrics

    log("metrics done; writing plots, CSVs and report.html")
    with atomic_dir(out, overwrite) as tmp:
        write_outputs(tmp, cfg, folders, metrics, morph_generated, morph_real, fd_rows, bin_names, memo, bench,
                      atypical,
                      real_images, real_ids, real_soft, real_hard, real_degree, real_scores, real_morph,
                      extra_sections, response_curves)
    for f in folders:
        write_folder_metrics(f, out, overwrite)
    return metrics
