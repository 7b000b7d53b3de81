"""Accuracy of the generative posterior against `draws` (4, 8, 16, 32, 64): choose speed or accuracy.

    python bench/posterior_draws.py [--pipeline runs/demo/diffusion/model] [--dataset runs/demo/data/synth] \
        [--val 120] [--test 240] [--draws 4,8,16,32,64] [--threads 2]
    python bench/posterior_draws.py --from runs/posterior/synth-test --draws 4,8,16,32   (reuses that run's errors)

Prints one JSON object. The errors are measured once at the largest draw
count on `--val` calibration and `--test` held-out patches (evenly spread
over their splits); a smaller count D uses D of those draws, one per stratum
of the schedule (nested stratified t), so every point sees the same patches.
Each D gets its own temperature fitted on the val votes. Because the three
error spaces differ only by a weight per timestep (eps-error = alpha_t *
v-error, x0-error = (1 - alpha_t) * v-error, exactly), the same run also
gives the epsilon- and x0-error posteriors, and a fit with one weight per
three timestep bands. Seconds per patch scale with D (the UNet is the cost).
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
from diffusion.posterior import calibration_set, denoising_errors, draw_timesteps  # noqa: E402
from diffusion.posterior_fit import fit_calibration, log_posterior, summaries  # noqa: E402
from report.posterior_section import judge_metrics  # noqa: E402

SPACE_WEIGHT = {"v_prediction": lambda a: np.ones_like(a), "epsilon": lambda a: a, "sample": lambda a: 1 - a}


def nested(draws_max: int, draws: int) -> np.ndarray:
    """Indices of `draws` of the `draws_max` stratified draws: one per stratum of the coarser grid."""
    return np.floor((np.arange(draws) + 0.5) * draws_max / draws).astype(int)


def reweigh(errors: np.ndarray, alphas: np.ndarray, have: str, want: str) -> np.ndarray:
    ratio = SPACE_WEIGHT[want](alphas) / SPACE_WEIGHT[have](alphas)  # (D,)
    return errors * ratio[None, :, None]


def from_folder(folder: Path) -> dict:
    """The errors a `mitosis-ldm posterior --calibrate` run saved: no UNet work here."""
    import csv

    from diffusion.posterior_fit import parse_votes
    from patches.dataset import PatchDataset

    info = json.loads((folder / "posterior.json").read_text())
    fit = info["calibration"]["fit"]
    val = PatchDataset(fit["dataset"], split=fit["split"], labelled_only=True)
    val_errors = np.load(folder / "calibration_errors.npy")
    positions = np.arange(len(val))
    if len(val_errors) < len(val):  # the run's --calibrate-limit: the same even spread
        positions = np.unique(np.linspace(0, len(val) - 1, len(val_errors)).round().astype(int))
    rows = [val.rows[i] for i in val.indices[positions]]
    votes = np.array([parse_votes(r.get("votes", ""), float(s), "labels.csv")
                      for r, s in zip(rows, val.soft_labels[positions])])
    with open(folder / "posterior.csv", newline="") as handle:
        test_ids = [r["id"] for r in csv.DictReader(handle)]
    seconds = float(info["seconds"])
    n_all = len(val_errors) + len(test_ids)
    return {"space": info["settings"]["error_space"], "draws": info["draws"], "grid": info["grid"],
            "seconds": {"val": seconds * len(val_errors) / n_all, "test": seconds * len(test_ids) / n_all},
            "val": {"ids": [r["id"] for r in rows], "errors": val_errors, "mitotic": votes[:, 0],
                    "experts": votes[:, 1]},
            "test": {"ids": test_ids, "errors": np.load(folder / "errors.npy")}}


def measure(args, grid, pipe) -> dict:
    """Errors at the largest draw count on the val and test patches."""
    size = pipe.image_shape
    draws = max(args.draws)
    space = pipe.scheduler.config.prediction_type
    out = {"space": space, "seconds": {}}
    for split, limit in (("val", args.val), ("test", args.test)):
        ids, images, mitotic, experts = calibration_set(args.dataset, split, limit, size)
        t0 = time.perf_counter()
        latents = pipe.encode(images)
        errors = denoising_errors(pipe, latents, ids, grid, draws, args.seed, space)
        out["seconds"][split] = time.perf_counter() - t0
        out[split] = {"ids": ids, "errors": errors, "mitotic": mitotic, "experts": experts}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="runs/demo/diffusion/model")
    parser.add_argument("--dataset", default="runs/demo/data/synth")
    parser.add_argument("--val", type=int, default=120, help="calibration patches (val split)")
    parser.add_argument("--test", type=int, default=240, help="held-out patches (test split)")
    parser.add_argument("--draws", default="4,8,16,32,64")
    parser.add_argument("--grid", default="0:1:11")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--from", dest="from_dir", type=Path,
                        help="a `posterior --calibrate` folder: reuse its errors (draws up to its --draws)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusion.sampling_args import parse_conditions
    from patches.dataset import PatchDataset

    grid = parse_conditions(args.grid, "--grid")
    args.draws = sorted(int(d) for d in args.draws.split(","))
    draws_max = args.draws[-1]
    if any(draws_max % d for d in args.draws):
        raise SystemExit("--draws: every count must divide the largest")
    pipe = MitosisPipeline.from_pretrained(args.pipeline)
    if args.from_dir:
        data = from_folder(args.from_dir)
        grid = data["grid"]
        args.draws = [d for d in args.draws if d <= data["draws"]]
        draws_max, args.val, args.test = args.draws[-1], len(data["val"]["ids"]), len(data["test"]["ids"])
        if draws_max != data["draws"]:
            raise SystemExit(f"--draws: the largest count must be the folder's {data['draws']}")
    else:
        data = measure(args, grid, pipe)
    pipe_scheduler = pipe.scheduler
    num_t = int(pipe_scheduler.config.num_train_timesteps)
    t_all = draw_timesteps(draws_max, num_t)
    alphas = pipe_scheduler.alphas_cumprod.numpy()[t_all].astype(np.float64)
    test_ds = PatchDataset(args.dataset, split="test", labelled_only=True)
    lookup = {pid: k for k, pid in enumerate(test_ds.ids())}
    rows = np.array([lookup[i] for i in data["test"]["ids"]])
    soft, hard, degree = test_ds.soft_labels[rows], test_ds.hard_labels[rows], test_ds.true_degree[rows]
    unet_seconds = data["seconds"]["val"] + data["seconds"]["test"]
    per_patch_max = unet_seconds / (args.val + args.test)
    curve = []
    for d in args.draws:
        pick = nested(draws_max, d)
        t = t_all[pick]
        entry = {"draws": d, "seconds_per_patch": round(per_patch_max * d / draws_max, 3)}
        for space in ("v_prediction", "epsilon", "sample"):
            for bands in (1, 3):
                if bands > d:
                    continue
                val = reweigh(data["val"]["errors"][:, pick], alphas[pick], data["space"], space)
                test = reweigh(data["test"]["errors"][:, pick], alphas[pick], data["space"], space)
                cal = fit_calibration(val, t, num_t, grid, data["val"]["mitotic"], data["val"]["experts"], bands)
                prob = np.exp(log_posterior(test, t, num_t, cal))
                expected = summaries(prob, grid)["expected_y"]
                m = judge_metrics(expected, soft, hard, degree)
                key = space if bands == 1 else f"{space}+{bands}_t_bands"
                entry[key] = {k: round(float(v), 4) if np.isfinite(v) else None for k, v in m.items()} | {
                    "temperature": round(cal.temperature, 6), "val_vote_nll": round(cal.fit["nll_votes_fitted"], 4)}
        curve.append(entry)
    print(json.dumps({
        "benchmark": "posterior draws curve",
        "pipeline": args.pipeline, "dataset": args.dataset, "val_patches": args.val, "test_patches": args.test,
        "grid": grid, "model_space": data["space"], "seed": args.seed,
        "draws_measured": draws_max, "unet_seconds": round(unet_seconds, 1),
        "note": "smaller draw counts are nested subsets of the largest run (one draw per stratum)",
        "curve": curve, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
