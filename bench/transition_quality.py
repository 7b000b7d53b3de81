"""Do transitions follow the label? Classifier scores along transitions, per guidance scale.

    python bench/transition_quality.py --pipeline runs/demo/diffusion/model \
        --classifier runs/demo/classifier/model [--seeds 0-15] [--guidance 1,2,3,5,8] [--steps 20]

Prints JSON: for each guidance scale, the median Spearman(condition, score),
the flip rate (score < 0.5 at y = 0 and > 0.5 at y = 1), the mean
|score - condition| and the mean score per condition - the numbers the report
computes (issue 6), used here to choose the pipeline's default guidance.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr


def consistency(scores: np.ndarray, conditions: np.ndarray) -> dict:
    """scores (S, C) -> the label-consistency summary."""
    rho = [spearmanr(conditions, s).statistic if np.ptp(s) > 0 else 0.0 for s in scores]
    flips = (scores[:, 0] < 0.5) & (scores[:, -1] > 0.5)
    return {
        "median_spearman": round(float(np.median(rho)), 3),
        "flip_rate": round(float(flips.mean()), 3),
        "mean_abs_error": round(float(np.abs(scores - conditions[None]).mean()), 3),
        "monotone_steps": round(float((np.diff(scores, axis=1) >= 0).mean()), 3),
        "mean_score_by_condition": scores.mean(0).round(3).tolist(),
    }


def main(argv=None):
    from classifier.model import ClassifierEnsemble
    from diffusion.pipeline import MitosisPipeline
    from diffusion.sampling_args import parse_seeds

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--seeds", default="0-15")
    parser.add_argument("--guidance", default="1,2,3,4,6,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpm++")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = MitosisPipeline.from_pretrained(args.pipeline)
    clf = ClassifierEnsemble.from_pretrained(args.classifier)
    seeds = parse_seeds(args.seeds)
    conditions = np.linspace(0, 1, 11)
    out = {"pipeline": args.pipeline, "seeds": len(seeds), "steps": args.steps, "sampler": args.sampler,
           "by_guidance": {}}
    for g in [float(v) for v in args.guidance.split(",")]:
        t0 = time.time()
        frames = pipe.transitions(seeds, conditions.tolist(), g, args.steps, args.sampler, seeds_per_batch=8)
        scores = clf.predict(frames.reshape(-1, *frames.shape[2:])).mean(1).reshape(len(seeds), len(conditions))
        out["by_guidance"][str(g)] = {**consistency(scores, conditions), "seconds": round(time.time() - t0, 1)}
        print(json.dumps({str(g): out["by_guidance"][str(g)]}), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
