"""How far can a latent generator get per label bin with this autoencoder? The report's floor, for several autoencoders.

    python bench/autoencoder_floor.py [--vae runs/demo/autoencoder/model --vae other/model ...] \
        [--classifier runs/demo/classifier/model] [--dataset runs/demo/data/synth] [--repeats 20] [--other-residuals] \
        [--out floor.json]

For each autoencoder: the report's held-out real patches (same subset, same label
bins, configs/demo/report.yaml) go through an encode-decode round trip, and each
label bin gets its floor, Fréchet(reconstructions of half A, real half B) over
Fréchet(real half A, real half B) in the classifier's features, averaged over
`--repeats` redraws of the halves (the same redraws for every autoencoder). A
generator that reproduced the real latents exactly would score this; the
report's per-bin Fréchet ratio cannot be expected below it. Compare autoencoders
here before spending a diffusion run on one. Also the held-out PSNR.

`--other-residuals` adds a diagnostic: each reconstruction plus the residual
(patch minus reconstruction) of another patch, i.e. the lost texture put back
without any information about this patch, and, beside it, Gaussian noise of the
residual's std per channel. How far these fall says how much of the floor is
texture the latent does not keep.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report.against_real import round_trip  # noqa: E402  (module level, so a test can swap in a perfect round trip)


def held_out(dataset, classifier, cfg) -> dict:
    """The report's held-out subset: uint8 patches, their soft labels' bins and the classifier's features."""
    from report import morphology
    from report.build import batched, held_out_images

    ds, split, pick, images = held_out_images(dataset, cfg, np.random.default_rng(cfg.seed))
    return {"split": split, "images": images, "bins": morphology.label_bins(ds.soft_labels[pick], cfg.label_bins),
            "features": batched(classifier.features, images, cfg.batch_size)}


def floors(real: dict, rebuilt: np.ndarray, classifier, cfg, repeats: int) -> list:
    """Per label bin: the floor ratio (None where the bin has too few patches)."""
    from report.build import batched
    from report.fidelity import frechet_per_bin

    rec = batched(classifier.features, rebuilt, cfg.batch_size)
    rows = frechet_per_bin(real["features"], real["bins"], real["features"], real["bins"], len(cfg.label_bins) - 1,
                           cfg.frechet_min_count, repeats, cfg.seed, reconstructed=rec)
    return [None if r["floor_ratio"] is None else round(r["floor_ratio"], 3) for r in rows]


def measure(vae, real: dict, classifier, cfg, repeats: int, other_residuals: bool, seed: int = 1) -> dict:
    from diffusion.real2gen import psnr

    images = real["images"]
    rebuilt = round_trip(vae, images, cfg.batch_size)
    out = {"psnr_db": round(float(psnr(rebuilt, images).mean()), 2),
           "floor_by_bin": floors(real, rebuilt, classifier, cfg, repeats)}
    if other_residuals:
        rng = np.random.default_rng(seed)
        residual = images.astype(np.float32) - rebuilt.astype(np.float32)
        std = residual.std(axis=(0, 1, 2))
        swapped = np.clip(rebuilt + residual[rng.permutation(len(images))] + 0.5, 0, 255).astype(np.uint8)
        noisy = np.clip(rebuilt + rng.normal(0, std, rebuilt.shape) + 0.5, 0, 255).astype(np.uint8)
        out.update(residual_std=np.round(std.astype(float), 2).tolist(),
                   floor_by_bin_other_residuals=floors(real, swapped, classifier, cfg, repeats),
                   floor_by_bin_gaussian_noise=floors(real, noisy, classifier, cfg, repeats))
    return out


def main(argv=None):
    from classifier.model import ClassifierEnsemble
    from diffusion.cache import load_vae
    from mitosis_ldm.config import load_config
    from mitosis_ldm.io import write_json
    from report.build import ReportConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", action="append", help="autoencoder model folder (repeatable; default: the demo's)")
    parser.add_argument("--classifier", default="runs/demo/classifier/model")
    parser.add_argument("--dataset", default="runs/demo/data/synth",
                        help="the labelled patch dataset the report compares with")
    parser.add_argument("--report-config", default="configs/demo/report.yaml")
    parser.add_argument("--repeats", type=int, default=20, help="redraws of the halves (the report uses 5)")
    parser.add_argument("--other-residuals", action="store_true", help="also the texture diagnostic (see above)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.vae = args.vae or ["runs/demo/autoencoder/model"]
    torch.set_num_threads(args.threads)
    cfg = load_config(ReportConfig, args.report_config)
    classifier = ClassifierEnsemble.from_pretrained(args.classifier)
    real = held_out(args.dataset, classifier, cfg)
    n_bins = len(cfg.label_bins) - 1
    result = {"dataset": args.dataset, "split": real["split"], "classifier": args.classifier, "repeats": args.repeats,
              "bins": cfg.label_bins, "n_by_bin": [int((real["bins"] == b).sum()) for b in range(n_bins)],
              "autoencoders": {}}
    for path in args.vae:
        _, vae = load_vae(path)
        result["autoencoders"][path] = measure(vae, real, classifier, cfg, args.repeats, args.other_residuals)
        print(json.dumps({path: result["autoencoders"][path]}), flush=True)
    if args.out:
        write_json(args.out, result)  # atomic
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
