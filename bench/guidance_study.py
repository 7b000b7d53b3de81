"""Which guidance schedule keeps the uncertain middle? One trained pipeline, several settings, the report's yardsticks.

    python bench/guidance_study.py --pipeline runs/demo/diffusion/model --classifier runs/demo/classifier/model \
        --dataset runs/demo/data/synth [--seeds 0-63] [--conditions 0:1:11] \
        [--setting guidance=8 --setting guidance=3,interval=0.2:0.8,rescale=0.7 ...] \
        [--frames-out runs/cal/study] [--out runs/cal/guidance_study.json]

Each setting renders every seed at every condition, scores the frames with the
classifier ensemble and measures, with the report's own code: the
label-response error (with its CI) and the generated curve at the real soft
labels, the median Spearman and flip rate, the Fréchet ratio overall, per
label bin and per condition (each condition's frames alone against its bin's
real patches), and the share of frames outside the real data (pixel distance to
the nearest training patch beyond 99% of held-out patches'; per condition, and
the seeds it happens on). Prints one JSON line per setting, then all of them.
A setting is `guidance=G[,interval=LOW:HIGH][,rescale=PHI][,guide=null|weak][,null=N][,middle=M][,below=L]`
(`guide=weak`: autoguidance with the pipeline's guide/ model; `null=N`: add N x
(conditional - null-label prediction) inside the interval; `middle=M`: keep M x
that term at y = 0.5, easing back to N at y = 0 and 1; `below=L`: ease it only at
noise levels t/T <= L). `--device cuda`
renders on a GPU (the noise is the same: it is drawn on the CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_SETTINGS = [
    "guidance=8",
    "guidance=4", "guidance=3", "guidance=2",
    "guidance=8,rescale=0.7", "guidance=4,rescale=0.7",
    "guidance=8,interval=0:0.6", "guidance=4,interval=0:0.6", "guidance=8,interval=0.4:1",
]


def parse_setting(text: str) -> dict:
    from diffusion.sampling_args import (check_guidance_schedule, check_null_guidance, check_null_guidance_middle,
                                         check_null_guidance_middle_below)

    setting = {"guidance": None, "interval": (0.0, 1.0), "rescale": 0.0, "guide": "null", "null": 0.0,
               "middle": 1.0, "below": 1.0}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key == "guidance":
            setting["guidance"] = float(value)
        elif key == "interval":
            setting["interval"] = tuple(float(v) for v in value.split(":"))
        elif key == "rescale":
            setting["rescale"] = float(value)
        elif key == "guide":
            setting["guide"] = value
        elif key == "null":
            setting["null"] = float(value)
        elif key == "middle":
            setting["middle"] = float(value)
        elif key == "below":
            setting["below"] = float(value)
        else:
            raise SystemExit(f"--setting: unknown key '{key}' in '{text}' "
                             "(guidance, interval, rescale, guide, null, middle, below)")
    if setting["guidance"] is None:
        raise SystemExit(f"--setting: '{text}' names no guidance")
    setting["interval"], setting["rescale"] = check_guidance_schedule(setting["interval"], setting["rescale"])
    setting["null"] = check_null_guidance(setting["null"], "--setting null")
    setting["middle"] = check_null_guidance_middle(setting["middle"], "--setting middle")
    setting["below"] = check_null_guidance_middle_below(setting["below"], "--setting below")
    return setting


def held_out(dataset, classifier, cfg, rng, pipe=None):
    """The report's held-out real patches: scores, features, label bins and nearest-training-patch distances
    (report.build's own helpers), the training patches those distances are to, and (given the pipeline) the
    features of the patches' reconstructions through its autoencoder, for each bin's floor."""
    from patches.dataset import PatchDataset
    from report.against_real import reconstructed_features
    from report.build import batched, ensemble_scores, held_out_images, subset
    from report.fidelity import nearest_distances, pixel_rows

    ds, split, pick, images = held_out_images(dataset, cfg, rng)
    scores, _ = ensemble_scores(classifier, images, cfg.batch_size)
    features = batched(classifier.features, images, cfg.batch_size)
    train_ds = PatchDataset(dataset, split="train")
    train = pixel_rows(train_ds.uint8(subset(len(train_ds), cfg.max_train, rng))) if len(train_ds) else None
    distances = None if train is None else nearest_distances(pixel_rows(images), train)
    rebuilt = None if pipe is None else reconstructed_features(pipe, images, classifier, cfg.batch_size)
    return {"split": split, "pick": pick, "soft": ds.soft_labels[pick], "scores": scores, "features": features,
            "train_pixels": train, "distances": distances, "rebuilt": rebuilt}


def measure(frames, conditions, seeds, classifier, real, cfg) -> dict:
    from report import fidelity

    with fidelity.one_blas_thread():  # as the report measures: its small LAPACK problems run faster on one thread
        return _measure(frames, conditions, seeds, classifier, real, cfg)


def _measure(frames, conditions, seeds, classifier, real, cfg) -> dict:
    from report import consistency, fidelity, label_response, morphology
    from report.build import batched, ensemble_scores

    s, c = frames.shape[:2]
    flat = frames.reshape(s * c, *frames.shape[2:])
    scores = ensemble_scores(classifier, flat, cfg.batch_size)[0].reshape(s, c)
    features = batched(classifier.features, flat, cfg.batch_size)
    summary = consistency.aggregate(consistency.per_seed(conditions, scores, seeds), cfg.bootstrap, cfg.seed)
    _, curve, error = label_response.measure(conditions, scores, real["soft"], real["scores"],
                                             cfg.label_response_min_count, cfg.bootstrap, cfg.seed)
    edges = np.asarray(cfg.label_bins, float)
    frame_conditions, real_bins = np.tile(conditions, s), morphology.label_bins(real["soft"], edges)
    frame_bins = morphology.label_bins(frame_conditions, edges)
    rows = fidelity.frechet_per_bin(features, frame_bins, real["features"], real_bins, len(edges) - 1,
                                    cfg.frechet_min_count, cfg.frechet_repeats, cfg.seed,
                                    reconstructed=real.get("rebuilt"))
    by_condition = fidelity.frechet_per_condition(features, frame_conditions, frame_bins, real["features"], real_bins,
                                                  cfg.frechet_min_count, cfg.frechet_repeats, cfg.seed)
    valid = [r for r in rows if r["frechet"] is not None]
    overall = np.mean([r["frechet"] for r in valid]) / np.mean([r["yardstick"] for r in valid]) if valid else None
    outside = {}
    if real["train_pixels"] is not None:
        # the report's "frames outside the real data": farther from the training set than 99% of held-out patches
        distances = fidelity.nearest_distances(fidelity.pixel_rows(flat), real["train_pixels"])
        far = fidelity.atypical(distances, real["distances"], cfg.memorisation_quantile)
        outside = {"outside_share": round(far["share"], 4),
                   "outside_beyond_all_share": round(far["beyond_all_share"], 4),
                   "outside_by_condition": np.bincount(far["flagged"] % c, minlength=c).tolist(),
                   "outside_seeds": sorted({int(seeds[i]) for i in far["flagged"] // c})}
    return {
        "label_response_error": round(error["value"], 4), "label_response_ci": [round(v, 4) for v in error["ci"]],
        "generated_at_real_labels": {f"{r['soft_label']:.3f}": round(r["generated"], 3) for r in error["per_label"]},
        "real_at_real_labels": {f"{r['soft_label']:.3f}": round(r["real"], 3) for r in error["per_label"]},
        "median_spearman": round(summary["spearman"]["value"], 3), "flip_rate": round(summary["flip"]["value"], 3),
        "frechet_ratio": None if overall is None else round(float(overall), 3),
        "frechet_ratio_by_bin": [None if r["ratio"] is None else round(r["ratio"], 3) for r in rows],
        "frechet_ratio_worst_bin": max((r["ratio"] for r in valid), default=None),
        "frechet_ratio_by_condition": [None if r["ratio"] is None else round(r["ratio"], 3) for r in by_condition],
        "frechet_n_by_condition": [r["n"] for r in by_condition],  # the ratio grows with n: compare at equal n
        "autoencoder_floor_by_bin": [None if r["floor_ratio"] is None else round(r["floor_ratio"], 3) for r in rows],
        "mean_score_by_condition": np.round(curve["mean"], 3).tolist(),
        "ci_half_width_max": round(float(np.max(curve["hi"] - curve["lo"]) / 2), 3),
        **outside,
    }


def main(argv=None):
    from classifier.model import ClassifierEnsemble
    from diffusion.pipeline import MitosisPipeline
    from diffusion.sampling_args import parse_conditions, parse_seeds
    from mitosis_ldm.artifacts import write_transitions
    from mitosis_ldm.config import load_config
    from mitosis_ldm.io import write_json
    from report.build import ReportConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--dataset", required=True, help="the labelled patch dataset the report compares with")
    parser.add_argument("--seeds", default="0-63")
    parser.add_argument("--conditions", default="0:1:11")
    parser.add_argument("--setting", action="append",
                        help="guidance=G[,interval=LOW:HIGH][,rescale=PHI][,guide=null|weak][,null=N]"
                             "[,middle=M][,below=L] (repeatable)")
    parser.add_argument("--steps", type=int, help="default: the pipeline's")
    parser.add_argument("--sampler", help="default: the pipeline's")
    parser.add_argument("--report-config", default="configs/demo/report.yaml")
    parser.add_argument("--frames-out", type=Path, help="also write each setting's transitions folder here")
    parser.add_argument("--out", type=Path, help="write all results to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds-per-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where to render (cpu, cuda); measuring stays on the CPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # full fp32 convolutions and matmuls, as on the CPU (no TF32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    settings = [(text, parse_setting(text)) for text in (args.setting or DEFAULT_SETTINGS)]
    cfg = load_config(ReportConfig, args.report_config)
    pipe = MitosisPipeline.from_pretrained(args.pipeline).to(args.device)
    classifier = ClassifierEnsemble.from_pretrained(args.classifier)
    seeds, conditions = parse_seeds(args.seeds), parse_conditions(args.conditions)
    steps = args.steps or int(pipe.info.get("default_steps", 20))
    sampler = args.sampler or pipe.info.get("default_sampler", "dpm++")
    real = held_out(args.dataset, classifier, cfg, np.random.default_rng(cfg.seed), pipe.to("cpu"))
    pipe.to(args.device)
    out = {"pipeline": args.pipeline, "classifier": args.classifier, "seeds": len(seeds), "conditions": conditions,
           "steps": steps, "sampler": sampler, "held_out": {"split": real["split"], "n": int(len(real["soft"]))},
           "settings": {}}
    for text, setting in settings:
        # every value is explicit here, so the pipeline's defaults never fill in; the manifest records what ran
        guidance, schedule = pipe.schedule(
            setting["guidance"], steps, guidance_interval=setting["interval"], guidance_rescale=setting["rescale"],
            guide=setting["guide"], null_guidance=setting["null"], null_guidance_middle=setting["middle"],
            null_guidance_middle_below=setting["below"])
        t0 = time.time()
        frames = pipe.transitions(seeds, conditions, guidance, steps, sampler, seeds_per_batch=args.seeds_per_batch,
                                  **schedule)
        render_s = time.time() - t0
        result = {**measure(frames, np.array(conditions), seeds, classifier, real, cfg),
                  "render_seconds": round(render_s, 1), "seconds": round(time.time() - t0, 1)}
        out["settings"][text] = result
        if args.frames_out:
            name = text.replace("=", "").replace(",", "_").replace(":", "-")
            write_transitions(args.frames_out / name, frames, {
                "seeds": seeds, "conditions": conditions, "guidance": guidance, **schedule,
                "sampler": sampler, "steps": steps, "model_hash": pipe.model_hash, "pipeline": str(pipe.path)},
                overwrite=True)
        print(json.dumps({text: result}), flush=True)
    if args.out:
        write_json(args.out, out)  # atomic
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
