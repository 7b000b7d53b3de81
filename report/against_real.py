"""The generated transition frames against real patches: fidelity, its references, memorisation.

- `compare`: everything the report measures of the transitions (not real2gen, which starts from real
  inputs) against the held-out and training patches: the Fréchet ratio per label bin and per condition, with
  its interval over seeds, the autoencoder floor (`reconstruction_features`) and the calibrated real
  reference (`calibrated_reference`) beside it; the memorisation share in pixel and feature space and the
  frames outside the real data (`atypical_frames`).
- `round_trip`, `reconstructed_features`: patches through a pipeline's autoencoder, for the floor (the benches
  use them too).

The arithmetic lives in `fidelity`; this module picks the rows and patches it works on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import fidelity, label_response, morphology


def compare(cfg, folders: list, classifier, real_images: np.ndarray, real_features: np.ndarray,
            real_bins: np.ndarray, train_images, train_soft, edges: np.ndarray, bin_names: list[str], rng, log) -> dict:
    """-> {"fidelity": metrics.json's section (its per-bin rows in "bins"), "memo": memorisation results with
    their distances, "memorisation": those without the distances, "atypical": per space, the flagged frames}.
    `rng` is the report's own generator, drawn from only for the feature-space neighbours' subset, so the
    report's draws stay in their order."""
    from .build import batched, subset

    n_bins = len(edges) - 1
    gen_folders = [f for f in folders if f.role == "transitions"]
    gen_feat = np.concatenate([f.features[:, f.generated].reshape(-1, f.features.shape[-1]) for f in gen_folders])
    gen_cond = np.concatenate([np.broadcast_to(f.conditions[f.generated], f.scores[:, f.generated].shape).ravel()
                               for f in gen_folders])
    gen_images = np.concatenate([np.asarray(f.frames)[:, f.generated].reshape(-1, *f.frames.shape[2:])
                                 for f in gen_folders])
    # where each of those rows came from: (folder, seed row, frame column), in the same order
    gen_origin = [(f, s, c) for f in gen_folders for s in range(f.frames.shape[0]) for c in f.generated]
    gen_bins = morphology.label_bins(gen_cond, edges)
    rebuilt_features, floor_pipeline = reconstruction_features(folders, real_images, classifier, cfg.batch_size, log)
    fd_rows = fidelity.frechet_per_bin(gen_feat, gen_bins, real_features, real_bins,
                                       n_bins, cfg.frechet_min_count, cfg.frechet_repeats, cfg.seed,
                                       reconstructed=rebuilt_features)
    for row in fd_rows:
        row["label_bin"] = bin_names[row["bin"]]
    by_condition = fidelity.frechet_per_condition(gen_feat, gen_cond, gen_bins, real_features, real_bins,
                                                  cfg.frechet_min_count, cfg.frechet_repeats, cfg.seed)
    for row in by_condition:
        row["label_bin"] = bin_names[row["bin"]] if row["bin"] >= 0 else None
    seed_index: dict = {}  # (folder, seed row) -> one number per transition, for every generated row
    gen_groups = np.array([seed_index.setdefault((f.key, s), len(seed_index)) for f, s, _ in gen_origin])
    intervals_fd = fidelity.ratio_intervals(gen_feat, gen_bins, gen_groups, real_features, real_bins, fd_rows,
                                            cfg.frechet_resamples, cfg.frechet_repeats, seed=cfg.seed)
    for row, interval in zip(fd_rows, intervals_fd["bins"]):
        row["ratio_ci_low"], row["ratio_ci_high"] = interval if interval else (None, None)
    reference = None
    if cfg.calibrated_reference and train_images is not None:
        reference = calibrated_reference(train_images, train_soft, gen_cond, gen_bins, real_features, real_bins,
                                         n_bins, classifier, cfg, log)
    for i, row in enumerate(fd_rows):
        ref = reference["rows"][i] if reference else {}
        row["reference_frechet"], row["reference_ratio"] = ref.get("frechet"), ref.get("ratio")
    valid = [r for r in fd_rows if r["frechet"] is not None]
    fid = {
        "space": "classifier penultimate features",
        "bins": fd_rows,
        "frechet_mean": float(np.mean([r["frechet"] for r in valid])) if valid else None,
        "yardstick_mean": float(np.mean([r["yardstick"] for r in valid])) if valid else None,
        "floor_pipeline": floor_pipeline,
        "by_condition": by_condition,
        "worst_bin_ci": intervals_fd["worst"],
        "ci_resamples": intervals_fd["n_resamples"],
        "ci_seeds": intervals_fd["n_groups"],
        "reference": None if reference is None else {k: v for k, v in reference.items() if k != "rows"},
    }
    fid["ratio"] = fid["frechet_mean"] / fid["yardstick_mean"] if valid and fid["yardstick_mean"] > 0 else None

    memo = {}
    if train_images is not None:
        pixels = fidelity.pixel_rows
        memo["pixels"] = fidelity.memorisation(pixels(gen_images), pixels(real_images), pixels(train_images),
                                               cfg.memorisation_quantile)
        # fewer neighbours raise held-out and generated distances alike, so the share stays fair
        few = subset(len(train_images), cfg.max_train_features, rng)
        train_features = batched(classifier.features, train_images[few], cfg.batch_size)
        memo["features"] = fidelity.memorisation(gen_feat, real_features, train_features, cfg.memorisation_quantile)
    memorisation = {space: {k: v for k, v in r.items() if not k.startswith("distances")} for space, r in memo.items()}
    atypical = {space: atypical_frames(r, gen_origin, cfg.memorisation_quantile) for space, r in memo.items()}
    return {"fidelity": fid, "memo": memo, "memorisation": memorisation, "atypical": atypical}


def reconstruction_features(folders: list, images: np.ndarray, classifier, batch: int, log):
    """Classifier features of the held-out patches' autoencoder reconstructions, through the autoencoder of the
    pipeline the first transitions folder names (manifest `pipeline`): (features, pipeline path), or
    (None, None) when that folder is not there."""
    from diffusion.pipeline import MitosisPipeline

    path = next((f.manifest.get("pipeline") for f in folders if f.role == "transitions"), None)
    if not path or not (Path(path) / "pipeline.json").is_file():
        log(f"autoencoder floor: skipped (the transitions' pipeline {path!r} is not here)")
        return None, None
    pipe = MitosisPipeline.from_pretrained(path).to(classifier.device)  # beside the ensemble: a GPU where it is on one
    return reconstructed_features(pipe, images, classifier, batch), str(path)


def round_trip(vae, images: np.ndarray, batch: int) -> np.ndarray:
    """uint8 `images` encoded (latent mean) and decoded by `vae`, in batches -> uint8 reconstructions."""
    import torch

    from diffusion.cache import decode_latents, encode_images

    with torch.no_grad():
        return np.concatenate([decode_latents(vae, encode_images(vae, images[i: i + batch], "mean"))
                               for i in range(0, len(images), batch)])


def reconstructed_features(pipe, images: np.ndarray, classifier, batch: int) -> np.ndarray:
    """Classifier features of `images` after a round trip through the pipeline's autoencoder, in batches."""
    from .build import batched

    return batched(classifier.features, round_trip(pipe.vae, images, batch), batch)


def calibrated_reference(images, soft, gen_cond, gen_bins, real_features, real_bins, n_bins, classifier, cfg,
                         log) -> dict | None:
    """Each label bin's Fréchet ratio for training patches standing in for the generated frames, one per frame,
    drawn as a gradual, calibrated generator would render its condition (`fidelity.calibrated_draws`), against the
    same held-out halves as the frames. The soft labels with at least `label_response_min_count` training patches
    (`label_response.label_groups`, as the real label-response curve picks them) are the ones drawn from. None
    (and a log line) when fewer than two labels qualify."""
    labels, _ = label_response.label_groups(soft, cfg.label_response_min_count)  # the real curve's own labels
    if len(labels) < 2:
        log(f"calibrated reference: skipped (fewer than two soft labels with {cfg.label_response_min_count} "
            "training patches)")
        return None
    from .build import batched

    picks, repeats = fidelity.calibrated_draws(gen_cond, soft, labels, np.random.default_rng([cfg.seed, 1]))
    unique, inverse = np.unique(picks, return_inverse=True)
    features = batched(classifier.features, images[unique], cfg.batch_size)[inverse]
    rows = fidelity.frechet_per_bin(features, gen_bins, real_features, real_bins, n_bins, cfg.frechet_min_count,
                                    cfg.frechet_repeats, cfg.seed)
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    log(f"calibrated reference: {len(picks)} training patches ({len(unique)} distinct, labels "
        f"{', '.join(f'{v:.3g}' for v in labels)}); ratio per bin "
        + ", ".join("n/a" if r["ratio"] is None else f"{r['ratio']:.2f}" for r in rows))
    return {"pool": "training split", "labels": labels.tolist(), "n_draws": int(len(picks)),
            "n_patches": int(len(unique)), "repeats": repeats, "worst_bin": max(ratios) if ratios else None,
            "rows": rows}


def atypical_frames(memo: dict, origin: list, quantile: float) -> dict:
    """`fidelity.atypical` on one space's distances, each flagged row named by folder, seed and condition."""
    result = fidelity.atypical(memo["distances_generated"], memo["distances_held_out"], quantile)
    frames = []
    for index in result.pop("flagged"):
        f, s, c = origin[index]
        frames.append({"folder": f.key, "seed": f.manifest["seeds"][s], "row": s, "frame": int(c),
                       "condition": float(f.conditions[c]), "distance": float(memo["distances_generated"][index]),
                       "score": float(f.scores[s, c])})
    per_condition = {}
    for f in {f.key: f for f, _, _ in origin}.values():
        conditions = [float(f.conditions[c]) for c in f.generated]
        counts = [sum(1 for r in frames if r["folder"] == f.key and r["condition"] == x) for x in conditions]
        per_condition[f.key] = {"conditions": conditions, "flagged": counts, "n_seeds": int(f.frames.shape[0])}
    result.update(per_condition=per_condition,
                  seeds_flagged={key: sorted({r["seed"] for r in frames if r["folder"] == key})
                                 for key in per_condition},
                  frames=frames)
    return result
