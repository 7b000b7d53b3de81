"""Classification Accuracy Score (CAS) and augmentation: do generated patches teach a classifier?

    python bench/cas.py [--real runs/demo/data/synth] [--pipeline runs/demo/diffusion/model] \
        [--config configs/demo/classifier.yaml] [--out runs/cas] [--labels match] [--guidance G] [--quick]

Prints JSON (and writes OUT/cas.json, which `mitosis-ldm report --cas FILE` reads).
The demo classifier recipe is trained, for every seed, on
- `real`: the real train split;
- `generated`: generated patches only, as many training patches as `real`
  (`mitosis-ldm generate --labels match:REAL`, conditions drawn from the real
  train split's soft labels);
- `real+generated`: both (`data.datasets=[real, generated]`, `data.weights=[1, 1]`);
- `real@F` and `real+generated@F` for each fraction F of the real training labels
  (`data.fraction`, stratified, `data.fraction_seed` = the seed), the latter with
  4x that many generated training patches (`--generated-per-real`).
Every classifier is tested on the same held-out REAL test split: AUROC against
the hard label and Spearman with the true degree (classifier/evaluate.py's
metrics). One generated pool serves every setting: patch i depends only on
(--gen-seed, i), so a prefix of the pool is exactly what a smaller `generate`
run would make. Trained classifiers are kept in OUT/train/ and reused, so a
killed bench continues where it stopped. `--quick`: CI sizes (few steps, small pool).
`--few-labels-only`: just the real@F and real+generated@F pairs (the augmentation comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def generate(pipeline: Path, real: Path, n: int, out: Path, labels: str, guidance, seed: int, threads: int) -> float:
    """Run `mitosis-ldm generate` (resumable) and return its patches/s from dataset.json."""
    if not (out / "dataset.json").exists():
        cmd = [sys.executable, "-m", "diffusion.generate", "--pipeline", str(pipeline), "--n", str(n),
               "--labels", f"match:{real}" if labels == "match" else labels, "--seed", str(seed), "--val", "0.1",
               "--test", "0", "--out", str(out), "--resume"]
        if guidance is not None:
            cmd += ["--guidance", str(guidance)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, cwd=REPO, check=True, env=env)
    meta = json.loads((out / "dataset.json").read_text())
    return meta["count"] / meta["seconds"] if meta.get("seconds") else math.nan


def prefix_shard(root: str, train_count: int):
    """The shortest prefix of a generated dataset holding `train_count` train patches (their splits kept)."""
    from patches.dataset import PatchDataset, Shard

    ds = PatchDataset(root)
    is_train = np.array([r["split"] == "train" for r in ds.rows])
    stop = int(np.searchsorted(np.cumsum(is_train), train_count)) + 1
    if is_train.sum() < train_count:
        raise SystemExit(f"{root}: holds {is_train.sum()} train patches, {train_count} needed; enlarge the pool")
    return Shard(np.asarray(ds.images[:stop]), [dict(r) for r in ds.rows[:stop]])


def generated_subset(pool: Path, train_count: int, out: Path) -> Path:
    from patches.dataset import build_dataset

    if not (out / "dataset.json").exists():
        whole = json.loads((pool / "dataset.json").read_text())
        meta = {k: v for k, v in whole.items()
                if k not in ("count", "content_hash", "patch_size", "margin", "stored_size", "split")}
        build_dataset(out, [("prefix", prefix_shard, {"root": str(pool), "train_count": train_count})],
                      patch_size=whole["patch_size"], margin=whole["margin"], meta={**meta, "prefix_of": str(pool)},
                      progress=False)
    return out


def train_and_test(name: str, seed: int, sets: list[str], args, test) -> dict:
    """Train the recipe (reusing a finished run) and score the real test split."""
    from classifier import train
    from classifier.evaluate import all_metrics
    from classifier.model import ClassifierEnsemble
    from classifier.score import score_images

    run = args.out / "train" / f"{name}-seed{seed}"
    result_path = run / "cas_result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    t0 = time.time()
    if not (run / "model" / "config.json").exists():
        overrides = [f"train.seed={seed}", f"data.fraction_seed={seed}", f"ensemble.members={args.members}", *sets]
        if args.quick:
            overrides += ["train.max_steps=40", "ensemble.eval_every=20", "train.checkpoint_every=40"]
        argv = ["--config", str(args.config), "--out", str(run), "--overwrite"]
        for item in overrides:
            argv += ["--set", item]
        train.main(argv)
    seconds = time.time() - t0
    ensemble = ClassifierEnsemble.from_pretrained(run / "model")
    prob = score_images(ensemble, test.uint8(), 256, progress=False).mean(1)
    metrics = all_metrics(prob, test.soft_labels, test.hard_labels, test.true_degree, 10)
    trained_on = json.loads((run / "model" / "config.json").read_text())["trained_on"]
    result = {"setting": name, "seed": seed, "auroc": metrics["hard"]["auroc"],
              "spearman_true_degree": metrics.get("spearman_true_degree"),
              "balanced_accuracy": metrics["hard"]["balanced_accuracy"], "train_patches": trained_on.get("patches"),
              "train_seconds": round(seconds, 1)}
    result_path.write_text(json.dumps(result, indent=2))
    log(f"{name} seed {seed}: AUROC {result['auroc']:.4f}, Spearman {result['spearman_true_degree']:.4f} "
        f"({seconds:.0f} s)")
    return result


def label_noise_ceiling(test, draws: int = 2000) -> dict | None:
    """For the synthetic benchmark (its dataset.json keeps the expert panel, labels.csv each patch's `kind`): the
    test split's AUROC against the hard label of P(hard label = 1 | true degree, imposter) under that panel, the
    best any classifier can expect, and of the true degree alone. None for other datasets."""
    from classifier.evaluate import hard_metrics
    from patches.synth import Experts

    panel = test.meta.get("experts")  # dataset.json, as PatchDataset read and checked it
    rows = [test.rows[i] for i in test.indices]
    if not isinstance(panel, dict) or not rows or any("kind" not in r for r in rows) \
            or np.isnan(test.true_degree).any():
        return None
    experts = Experts(**{k: panel[k] for k in ("thresholds", "noise", "lapse", "imposter_bias") if k in panel})
    imposter = np.array([r["kind"] == "imposter" for r in rows])
    p = experts.hard_label_probability(test.true_degree, imposter, draws)
    return {"bayes_auroc": hard_metrics(p, test.hard_labels, 10)["auroc"],
            "true_degree_auroc": hard_metrics(test.true_degree, test.hard_labels, 10)["auroc"], "draws": draws}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("auroc", "spearman_true_degree", "balanced_accuracy"):
        values = [r[key] for r in runs]
        out[key] = {"mean": float(np.mean(values)), "spread": float(np.ptp(values)), "values": values}
    out["train_patches"] = runs[0]["train_patches"]
    return out


def pool_size(n_train: int | None, few_label_counts: list[int], per_real: int) -> int:
    """Patches to generate so that every setting's generated train subset is a prefix of one pool.

    `n_train`: the generated-only and real+generated settings' train patches (None with --few-labels-only);
    `few_label_counts`: the real labels kept at each (fraction, seed), each to get `per_real` times as many.
    """
    need = max(([] if n_train is None else [n_train]) + [per_real * c for c in few_label_counts])
    return int(math.ceil(need / 0.9 * 1.05)) + 16  # the val split takes 10 %; margin for its randomness


def transition_rate(pipeline: Path, repeats: int = 3) -> float:
    """Frames/s of one 11-frame transition at the pipeline's defaults (what `transitions` renders)."""
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    steps, sampler = int(pipe.info.get("default_steps", 20)), pipe.info.get("default_sampler", "dpm++")
    pipe.transitions(seeds=[0], conditions=[0.5], steps=steps, sampler=sampler)  # warm-up
    t0 = time.perf_counter()
    for seed in range(repeats):
        pipe.transitions(seeds=[seed], conditions=np.linspace(0, 1, 11).tolist(), steps=steps, sampler=sampler)
    return 11 * repeats / (time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=REPO / "runs/demo/data/synth")
    parser.add_argument("--pipeline", type=Path, default=REPO / "runs/demo/diffusion/model")
    parser.add_argument("--config", type=Path, default=REPO / "configs/demo/classifier.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "runs/cas")
    parser.add_argument("--labels", default="match", help="match (the real train labels) | uniform | a list")
    parser.add_argument("--guidance", type=float, help="default: the pipeline's")
    parser.add_argument("--gen-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1", help="classifier training seeds")
    parser.add_argument("--fractions", default="0.05,0.2", help="fractions of the real training labels")
    parser.add_argument("--members", type=int, default=1, help="ensemble members per classifier (the recipe has 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real-train", type=int, help="cap (a)-(c) at this many real (and generated) training "
                        "patches: a stratified subset (default: the whole train split)")
    parser.add_argument("--quick", action="store_true", help="CI sizes: 40 training steps, a small pool")
    parser.add_argument("--generated-per-real", type=int, default=4,
                        help="generated training patches per real label in the real+generated@F settings "
                             "(the issue's 4)")
    parser.add_argument("--few-labels-only", action="store_true",
                        help="train only the real@F and real+generated@F pairs, not (a)-(c)")
    args = parser.parse_args(argv)
    if args.generated_per_real < 1:
        raise SystemExit(f"--generated-per-real: {args.generated_per_real}, must be at least 1")
    torch.set_num_threads(args.threads)
    from classifier.mixture import fraction_positions
    from patches.dataset import PatchDataset

    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else []
    real_train = PatchDataset(args.real, split="train", labelled_only=True)
    test = PatchDataset(args.real, split="test", labelled_only=True)
    cap = 200 if args.quick else args.real_train
    n_train = len(real_train) if cap is None else min(len(real_train), cap)
    if args.quick:
        fractions = [0.02]
    counts = {(f, s): len(fraction_positions(real_train, f, s)) for f in fractions for s in seeds}
    pool_n = pool_size(None if args.few_labels_only else n_train, list(counts.values()), args.generated_per_real)
    guidance = args.guidance if args.guidance is not None else 'default'
    tag = f"{args.labels.replace(':', '_').replace('/', '_')}-g{guidance}"
    pool = args.out / f"gen-{tag}-n{pool_n}"
    log(f"generating {pool_n} patches into {pool}")
    t0 = time.time()
    speed = generate(args.pipeline, args.real, pool_n, pool, args.labels, args.guidance, args.gen_seed, args.threads)
    log(f"pool ready ({time.time() - t0:.0f} s this run); measuring the transition rate")
    result = {
        "bench": "cas", "quick": args.quick, "complete": False, "real": str(args.real), "pipeline": str(args.pipeline),
        "labels": args.labels, "guidance": args.guidance, "generated_pool": str(pool), "seeds": seeds,
        "fractions": fractions, "real_train": n_train, "members": args.members, "test_patches": len(test),
        "generation_patches_per_s": speed, "transition_frames_per_s": transition_rate(args.pipeline),
        "threads": args.threads, "few_labels_only": args.few_labels_only, "generated_per_real": args.generated_per_real,
        "label_noise_ceiling": label_noise_ceiling(test),
    }
    full = not args.few_labels_only
    gen_full = generated_subset(pool, n_train, args.out / f"{pool.name}-train{n_train}") if full else None
    real_sets = [f"data.dataset={args.real}"]
    if n_train < len(real_train):
        real_sets.append(f"data.fraction={n_train / len(real_train):.6f}")
    runs: dict[str, list[dict]] = {}

    def setting(name, sets, seed):
        runs.setdefault(name, []).append(train_and_test(name, seed, sets, args, test))
        write_result(args.out / "cas.json", result, runs, fractions)  # after every training: a killed bench keeps it

    for seed in seeds:  # the CAS pair first, then the few-label pairs: a stopped bench still has whole comparisons
        if full:
            setting("real", real_sets, seed)
            setting("generated", [f"data.datasets=[{gen_full}]", "data.allow_generated=true"], seed)
        for f in fractions:
            k = args.generated_per_real * counts[(f, seed)]  # 4x (by default) as many generated patches as real labels
            gen_f = generated_subset(pool, k, args.out / f"{pool.name}-train{k}")
            setting(f"real@{f:g}", [f"data.dataset={args.real}", f"data.fraction={f}"], seed)
            setting(f"real+generated@{f:g}", [f"data.datasets=[{args.real},{gen_f}]", "data.weights=[1,1]",
                                              f"data.fraction={f}", "data.allow_generated=true"], seed)
        if full:
            setting("real+generated", [f"data.datasets=[{args.real},{gen_full}]", "data.weights=[1,1]",
                                       "data.allow_generated=true", *real_sets[1:]], seed)
    result["complete"] = True
    write_result(args.out / "cas.json", result, runs, fractions)
    print(json.dumps(result, indent=2))


def write_result(path: Path, result: dict, runs: dict, fractions: list[float]) -> None:
    from mitosis_ldm.io import write_json

    table = {name: summarise(r) for name, r in runs.items()}
    targets = {}
    if "real" in table and "generated" in table:
        ratio = table["generated"]["auroc"]["mean"] / table["real"]["auroc"]["mean"]
        targets["cas_ratio"] = {"value": ratio, "target": ">= 0.9", "met": ratio >= 0.9}
    for f in fractions:  # AUROC, and DiffInfinite's balanced accuracy at the hard label beside it
        if f"real@{f:g}" in table and f"real+generated@{f:g}" in table:
            for metric, name in (("auroc", "augmentation_gain"), ("balanced_accuracy", "augmentation_gain_bacc")):
                a, c = table[f"real@{f:g}"][metric], table[f"real+generated@{f:g}"][metric]
                gain, spread = c["mean"] - a["mean"], max(a["spread"], c["spread"])
                # the mean that real + generated would need to reach, beside the label noise's ceiling
                targets[f"{name}@{f:g}"] = {"value": gain, "seed_spread": spread, "target": "> seed spread",
                                            "met": gain > spread, "needed_mean": a["mean"] + spread}
    result.update(table=table, targets=targets, load_average=os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)


if __name__ == "__main__":
    main()
