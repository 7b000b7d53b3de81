"""Real-to-generated fidelity on held-out real nuclei: DDIM inversion against the VAE, and SDEdit drift.

    python bench/real2gen_fidelity.py --pipeline runs/demo/diffusion/model --dataset runs/demo/data/cmu \
        [--split test] [--limit 32] [--steps 20]

Prints JSON: the VAE's own reconstruction PSNR, the inversion's PSNR at the
patch's own label (the null label for unlabelled CMU nuclei; target: within
1 dB of the VAE), and the SDEdit curve - PSNR of SDEdit frames to the input
at strengths 0.1 ... 1.0, under the own label and averaged over targets
y = 0, 0.5, 1 - which should fall as the strength grows.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main(argv=None):
    from diffusion.pipeline import MitosisPipeline
    from diffusion.real2gen import render
    from patches.inputs import gather_images

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = MitosisPipeline.from_pretrained(args.pipeline)
    items = gather_images([args.dataset], split=args.split, limit=args.limit)
    images = np.stack([i.image for i in items])
    own = np.array([i.label for i in items], np.float32)
    g = pipe.default_guidance if args.guidance is None else args.guidance
    inv = render(pipe, images, own, [0.0, 0.5, 1.0], "invert", g, args.steps)
    result = {
        "inputs": len(items), "dataset": args.dataset, "split": args.split, "guidance": g, "steps": args.steps,
        "psnr_vae_db": round(float(inv["psnr_vae"].mean()), 2),
        "psnr_inversion_own_label_db": round(float(inv["psnr_inversion"].mean()), 2),
        "inversion_minus_vae_db": round(float(inv["psnr_inversion"].mean() - inv["psnr_vae"].mean()), 2),
        "psnr_inverted_targets_db": {str(c): round(float(v), 2) for c, v in
                                     zip([0.0, 0.5, 1.0], inv["psnr_frames"].mean(0))},
        "sdedit_curve": [],
    }
    for strength in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]:
        targets = render(pipe, images, own, [0.0, 0.5, 1.0], "sdedit", g, args.steps, strength)
        at_own = _sdedit_own_label(pipe, images, own, g, args.steps, strength)
        result["sdedit_curve"].append({"strength": strength, "psnr_own_label_db": round(at_own, 2),
                                       "psnr_targets_db": round(float(targets["psnr_frames"].mean()), 2)})
        print(json.dumps(result["sdedit_curve"][-1]), flush=True)
    print(json.dumps(result, indent=2))


def _sdedit_own_label(pipe, images, own, guidance, steps, strength) -> float:
    """SDEdit under each patch's own label (null when unlabelled): PSNR to the input."""
    from diffusion.real2gen import psnr

    z0 = pipe.encode(images)
    labels = torch.from_numpy(own)
    out = torch.cat([pipe.sdedit(z0[i: i + 1], labels[i: i + 1], guidance, steps, strength, seed=i)
                     for i in range(len(images))])
    return float(psnr(images, pipe.decode(out)).mean())


if __name__ == "__main__":
    main()
