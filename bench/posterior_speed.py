"""Speed of the generative posterior on CPU, beside the ensemble's `score` rate and a naive variant.

    python bench/posterior_speed.py [--pipeline runs/demo/diffusion/model] [--classifier runs/demo/classifier/model] \
        [--dataset runs/demo/data/synth] [--n 32] [--draws 32] [--grid 0:1:11] [--temperature-from DIR] [--threads 2]

Prints one JSON object. On the same `--n` held-out patches (test split):
- `posterior`: the command's path (VAE encode, then per (t, eps) one UNet call
  holding every grid label and the null label of 16 patches, eps shared
  across the labels);
- `naive`: fresh eps per label and one UNet call per label, as a first
  implementation would do; its cost and its accuracy (Spearman of E[y] with
  the true degree, AUROC against the hard label) sit beside the posterior's;
- `score`: the classifier ensemble on the same images (classifier.score's
  score_images, what `mitosis-ldm score` runs after reading the files).
Accuracy on a few dozen patches is a rough guide; bench/posterior_draws.py
measures it properly. Without `--temperature-from` (a calibrated posterior
folder) the uncalibrated scale heuristic sets the temperature for both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.pipeline import MitosisPipeline  # noqa: E402
from diffusion.sampling_args import parse_conditions  # noqa: E402
from diffusion.posterior import calibration_from, denoising_errors, draw_timesteps  # noqa: E402
from diffusion.posterior_fit import Calibration, log_posterior, scale_heuristic, summaries  # noqa: E402
from report.posterior_section import judge_metrics  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="runs/demo/diffusion/model")
    parser.add_argument("--classifier", default="runs/demo/classifier/model")
    parser.add_argument("--dataset", default="runs/demo/data/synth")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--grid", default="0:1:11")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature-from", help="a calibrated posterior folder (same pipeline, grid, settings)")
    parser.add_argument("--error", default="epsilon", help="error space (default epsilon, as the command)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from classifier.model import ClassifierEnsemble
    from classifier.score import score_images
    from patches.dataset import PatchDataset

    grid = parse_conditions(args.grid, "--grid")
    pipe = MitosisPipeline.from_pretrained(args.pipeline)
    space = args.error
    num_t = int(pipe.scheduler.config.num_train_timesteps)
    ds = PatchDataset(args.dataset, split="test", labelled_only=True)
    pick = np.unique(np.linspace(0, len(ds) - 1, args.n).round().astype(int))
    images, ids = ds.uint8(pick), [ds.ids()[i] for i in pick]
    soft, hard, degree = ds.soft_labels[pick], ds.hard_labels[pick], ds.true_degree[pick]
    timesteps = draw_timesteps(args.draws, num_t)
    settings = {"grid": grid, "error_space": space, "guidance": 1.0}
    cal = calibration_from(args.temperature_from, settings, pipe.model_hash) if args.temperature_from else None

    result = {}
    for name, shared in (("posterior", True), ("naive", False)):
        errors, seconds = timed(lambda: denoising_errors(pipe, pipe.encode(images), ids, grid, args.draws, args.seed,
                                                         space, shared_noise=shared))
        use = cal or Calibration(temperature=scale_heuristic(errors))
        expected = summaries(np.exp(log_posterior(errors, timesteps, num_t, use)), grid)["expected_y"]
        m = judge_metrics(expected, soft, hard, degree)
        result[name] = {"patches_per_s": round(len(images) / seconds, 3), "seconds": round(seconds, 2),
                        "unet_calls": (-(-len(images) // 16)) * args.draws * (1 if shared else len(grid) + 1),
                        "spearman_true_degree": round(m["spearman_true_degree"], 4),
                        "auroc_hard": round(m["auroc_hard"], 4), "temperature": use.temperature}
    ensemble = ClassifierEnsemble.from_pretrained(args.classifier)
    _, seconds = timed(lambda: score_images(ensemble, images, progress=False))
    result["score"] = {"patches_per_s": round(len(images) / seconds, 1), "seconds": round(seconds, 3),
                       "members": ensemble.members}
    print(json.dumps({
        "benchmark": "posterior speed", "pipeline": args.pipeline, "patches": len(images), "draws": args.draws,
        "grid": len(grid), "error_space": space,
        "calibration": args.temperature_from or "uncalibrated scale heuristic",
        **result,
        "posterior_vs_score": round(result["posterior"]["patches_per_s"] / result["score"]["patches_per_s"], 5),
        "naive_vs_posterior_time": round(result["naive"]["seconds"] / result["posterior"]["seconds"], 3),
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
