"""What do the report's targets give a generator that *is* the real data? Real patches stand in for frames.

    python bench/oracle_bins.py --classifier runs/demo/classifier/model --dataset runs/demo/data/synth \
        [--seeds 0-255] [--conditions 0:1:11] [--oracle mixture --oracle bin --oracle nearest] [--pool train|unseen]
        [--out FILE.json]

Each oracle fills every frame (seed, condition y) with a real patch, picked by its soft label, from `--pool`:
`train`, the dataset's training split (the classifier has seen these), or `unseen`, the validation split and the
held-out patches the report does not pick (too few for 256 seeds, so patches repeat). Never the report's held-out
patches, which the frames are compared with. The oracles:
- `mixture`: a calibrated, gradual generator, as the report's calibrated real reference draws it
  (`report.fidelity.mixture_weights`). Between two adjacent real labels a < y < b it draws label b with
  probability (y - a) / (b - a), else label a, so its mean classifier score at every y is the real curve read
  by linear interpolation: the report's label-response error is zero up to sampling (and up to the classifier
  scoring its own training patches more confidently, with `--pool train`).
- `bin`: the real label that shares y's label bin (the report's `label_bins`): a generator that switches at
  the bin edges.
- `nearest`: the real label nearest to y.

The frames are measured by `bench/guidance_study.py`'s `measure`, the report's own code, so the Fréchet ratios
per label bin and per condition are read as the demo's are, at the same n. Patches are drawn without
replacement within each label until that label's pool runs out (`repeats` counts the draws past
that). A seed's frames are unrelated patches, so the Spearman and flip numbers mean nothing here and are left
out. Prints one JSON line per oracle, then all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ORACLES = ("mixture", "bin", "nearest")


def label_weights(y: float, labels: np.ndarray, edges: np.ndarray, oracle: str) -> np.ndarray:
    """Probability of each real label (sorted `labels`) for a frame at condition `y`."""
    weights = np.zeros(len(labels))
    if oracle == "nearest":
        weights[int(np.argmin(np.abs(labels - y)))] = 1.0
    elif oracle == "bin":
        from report.morphology import label_bins  # the report's own bins

        bins = label_bins(np.append(labels, y), edges)
        same = np.flatnonzero(bins[:-1] == bins[-1])
        if not len(same):
            raise SystemExit(f"--oracle bin: no real label shares the bin of condition {y}")
        weights[same] = 1.0 / len(same)
    elif oracle == "mixture":
        from report.fidelity import mixture_weights

        weights = mixture_weights(y, labels)
    else:
        raise SystemExit(f"--oracle: unknown '{oracle}' ({', '.join(ORACLES)})")
    return weights


def oracle_frames(pool: dict, labels: np.ndarray, edges: np.ndarray, conditions, n_seeds: int, oracle: str,
                  rng: np.random.Generator):
    """(frames uint8 (seeds, conditions, H, W, 3), repeats): each frame a training patch drawn by `oracle`."""
    queues = {k: list(rng.permutation(len(v))) for k, v in pool.items()}
    used = {k: 0 for k in pool}
    repeats = 0
    first = next(iter(pool.values()))
    frames = np.empty((n_seeds, len(conditions), *first.shape[1:]), dtype=np.uint8)
    for j, y in enumerate(conditions):
        weights = label_weights(float(y), labels, edges, oracle)
        for s, k in enumerate(rng.choice(len(labels), size=n_seeds, p=weights)):
            key = float(labels[k])
            if used[key] >= len(pool[key]):
                repeats += 1
            frames[s, j] = pool[key][queues[key][used[key] % len(pool[key])]]
            used[key] += 1
    return frames, repeats


def pool_patches(dataset, pool: str, real: dict) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, soft labels rounded to 3 places) of `pool`: the training split, or every validation and
    held-out patch except the report's own pick (`real`, from guidance_study.held_out)."""
    from patches.dataset import PatchDataset

    parts = [(PatchDataset(dataset, split="train"), np.array([], dtype=int))] if pool == "train" else []
    if pool == "unseen":
        parts.append((PatchDataset(dataset, split=real["split"]), real["pick"]))
        if real["split"] == "test":
            parts.append((PatchDataset(dataset, split="val"), np.array([], dtype=int)))
    images, soft = [], []
    for ds, skip in parts:
        keep_rows = np.setdiff1d(np.arange(len(ds)), skip)
        images.append(ds.uint8(keep_rows))
        soft.append(np.asarray(ds.soft_labels, dtype=float)[keep_rows])
    return np.concatenate(images), np.round(np.concatenate(soft), 3)


def main(argv=None):
    import torch

    from classifier.model import ClassifierEnsemble
    from diffusion.sampling_args import parse_conditions, parse_seeds
    from guidance_study import held_out, measure
    from mitosis_ldm.config import load_config
    from mitosis_ldm.io import write_json
    from report.build import ReportConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--dataset", required=True, help="the labelled patch dataset the report compares with")
    parser.add_argument("--seeds", default="0-255")
    parser.add_argument("--conditions", default="0:1:11")
    parser.add_argument("--oracle", action="append", choices=ORACLES, help="repeatable; default: all three")
    parser.add_argument("--draws", type=int, default=3, help="independent draws of each oracle's frames")
    parser.add_argument("--report-config", default="configs/demo/report.yaml")
    parser.add_argument("--pool", choices=("train", "unseen"), default="train")
    parser.add_argument("--min-count", type=int, default=10, help="training patches a soft label needs to count")
    parser.add_argument("--out", type=Path, help="write all results to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(ReportConfig, args.report_config)
    classifier = ClassifierEnsemble.from_pretrained(args.classifier)
    seeds, conditions = parse_seeds(args.seeds), np.array(parse_conditions(args.conditions))
    real = held_out(args.dataset, classifier, cfg, np.random.default_rng(cfg.seed))
    if real["split"] not in ("test", "val"):
        raise SystemExit(f"{args.dataset}: no test or val split, so no patch is apart from the report's comparison")
    images, soft = pool_patches(args.dataset, args.pool, real)
    values, counts = np.unique(soft[np.isfinite(soft)], return_counts=True)
    labels = values[counts >= args.min_count]
    if len(labels) < 2:
        raise SystemExit(f"{args.dataset}: fewer than two soft labels with {args.min_count} {args.pool} patches")
    pool = {float(v): images[soft == v] for v in labels}
    edges = np.asarray(cfg.label_bins, dtype=float)
    out = {"dataset": args.dataset, "classifier": args.classifier, "seeds": len(seeds), "pool": args.pool,
           "conditions": conditions.tolist(), "labels": labels.tolist(),
           "pool_patches": {f"{k:.3f}": len(v) for k, v in pool.items()},
           "held_out": {"split": real["split"], "n": int(len(real["soft"]))}, "oracles": {}}
    keep = ("label_response_error", "label_response_ci", "generated_at_real_labels", "real_at_real_labels",
            "frechet_ratio", "frechet_ratio_by_bin", "frechet_ratio_worst_bin", "frechet_ratio_by_condition",
            "frechet_n_by_condition", "mean_score_by_condition")
    for oracle in args.oracle or list(ORACLES):
        draws = []
        for draw in range(args.draws):
            frames, repeats = oracle_frames(pool, labels, edges, conditions, len(seeds), oracle,
                                            np.random.default_rng([cfg.seed, draw]))
            result = measure(frames, conditions, seeds, classifier, real, cfg)
            draws.append({**{k: result[k] for k in keep}, "repeats": repeats})
        worst = [d["frechet_ratio_worst_bin"] for d in draws]
        summary = {"by_condition_mean": np.round(np.mean([d["frechet_ratio_by_condition"] for d in draws], axis=0),
                                                 3).tolist(),
                   "worst_bin_mean": round(float(np.mean(worst)), 3),
                   "by_bin_mean": np.round(np.mean([d["frechet_ratio_by_bin"] for d in draws], axis=0), 3).tolist(),
                   "label_response_error_mean": round(float(np.mean([d["label_response_error"] for d in draws])), 4),
                   "draws": draws}
        out["oracles"][oracle] = summary
        print(json.dumps({oracle: {k: v for k, v in summary.items() if k != "draws"}}), flush=True)
    if args.out:
        write_json(args.out, out)  # atomic
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
