"""Real-to-generated: render a real patch at target labels.

    mitosis-ldm real2gen --pipeline runs/demo/diffusion/model --input runs/demo/data/cmu --split test --limit 8 \
        --conditions 0:1:6 --mode invert|sdedit [--strength S] [--guidance G] [--steps 20] --out DIR [--overwrite]

`--input` takes image files, folders, patch datasets or `DATASET:ID`.
- `sdedit`: noise the patch's latent to `--strength` of the schedule, then
  denoise under each target condition (the farther the noise, the freer the
  model, the less of the input survives).
- `invert`: DDIM-invert the latent under the patch's own label (the null label
  when unlabelled), then run DDIM forward under each target label. Forward
  under the own label reproduces the input (recorded as `psnr_inversion_db`,
  beside the VAE's own reconstruction `psnr_vae_db`). `--strength` below 1
  inverts only that fraction of the schedule: deterministic like full
  inversion, but the label redraws less, so the nucleus keeps its identity.

`--strength` defaults to 0.5 for `sdedit` and, for `invert`, to the pipeline's
`default_real2gen_strength` (1, full inversion, when the pipeline has none);
`--guidance` defaults to the pipeline's `default_real2gen_guidance`.

Output: a transitions folder with `kind: real2gen` and `has_input_frame: true`
(column 0 is the real input; its condition is the input's own label or null),
plus `reconstructions.npy` uint8 (N, 2, H, W, 3): the VAE reconstruction and,
for `invert`, the own-label reconstruction.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from mitosis_ldm.artifacts import write_transitions
from mitosis_ldm.errors import UserError, check_at_least, user_errors
from mitosis_ldm.io import check_new_output, save_npy
from mitosis_ldm.launch import process_state

from .pipeline import MitosisPipeline
from .schedulers import SAMPLERS
from .sampling_args import MAX_INVERSION_ITERS, check_sampling_args, parse_conditions


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB between uint8 stacks (N, H, W, 3)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def render(pipe: MitosisPipeline, images: np.ndarray, own_labels: np.ndarray, conditions: list[float], mode: str,
           guidance: float, steps: int, strength: float = 0.5, sampler: str = "ddim",
           reconstruct: bool = True, inversion_iters: int = 3) -> dict:
    """images uint8 (N, H, W, 3) -> frames (N, K, H, W, 3), reconstructions and PSNRs.

    `strength`: the noise level reached (sdedit) or the fraction of the schedule inverted (invert).
    `inversion_iters`: fixed-point iterations per inverted DDIM step (invert mode; 0 is plain DDIM inversion).
    `reconstruct=False` skips the fidelity checks the manifest records (`vae_recon`, `psnr_vae`, and invert
    mode's own-label round trip `own_recon`, `psnr_inversion`): one more denoising pass a viewer does not show.
    """
    n, k = len(images), len(conditions)
    z0 = pipe.encode(images)  # (N, C, h, w)
    targets = torch.tensor(conditions, dtype=torch.float32).repeat(n)  # (N*K,) item-major
    own = torch.tensor(own_labels, dtype=torch.float32)
    out = {}
    if reconstruct:
        vae_recon = pipe.decode(z0)
        out.update(vae_recon=vae_recon, psnr_vae=psnr(images, vae_recon))
    if mode == "invert":
        noise = pipe.invert(z0, own, guidance, steps, fixed_point_iters=inversion_iters,
                            strength=strength)  # (N, C, h, w)
        latents = pipe.from_inverted(noise.repeat_interleave(k, 0), targets, guidance, steps, strength=strength)
        if reconstruct:
            own_recon = pipe.decode(pipe.from_inverted(noise, own, guidance, steps, strength=strength))
            out.update(own_recon=own_recon, psnr_inversion=psnr(images, own_recon))
    else:
        latents = torch.cat([pipe.sdedit(z0[i: i + 1].expand(k, *z0.shape[1:]), targets[i * k: (i + 1) * k], guidance,
                                         steps, strength, sampler, seed=i) for i in range(n)])
    frames = pipe.decode(latents).reshape(n, k, *images.shape[1:])
    out["frames"] = frames
    out["psnr_frames"] = psnr(np.repeat(images, k, 0), frames.reshape(n * k, *images.shape[1:])).reshape(n, k)
    return out


@user_errors
def main(argv=None):
    from patches.inputs import gather_images

    parser = argparse.ArgumentParser(prog="mitosis-ldm real2gen", description="Render real patches at target labels.")
    parser.add_argument("--pipeline", required=True, help="diffusion pipeline folder (or its run folder)")
    parser.add_argument("--input", action="append", required=True,
                        help="image file, folder, patch dataset or DATASET:ID (repeatable)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="split of a patch dataset input")
    parser.add_argument("--limit", type=int, help="at most this many patches per dataset input")
    parser.add_argument("--conditions", default="0:1:6", help="target labels, START:STOP:COUNT or a list")
    parser.add_argument("--mode", choices=["invert", "sdedit"], default="invert")
    parser.add_argument("--strength", type=float,
                        help="in (0, 1]: SDEdit noise level (default 0.5), or the fraction of the schedule "
                             "inverted (default: the pipeline's real2gen strength, else 1)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's real2gen guidance)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim", help="SDEdit sampler (default ddim)")
    parser.add_argument("--inversion-iters", type=int, default=3,
                        help="fixed-point iterations per inverted DDIM step, 0-10 (default 3; 0: plain DDIM inversion)")
    parser.add_argument("--out", required=True, help="transitions folder to write")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    conditions = parse_conditions(args.conditions)
    check_sampling_args(0.0 if args.guidance is None else args.guidance, args.steps)
    if args.strength is not None and not (0 < args.strength <= 1):
        raise UserError(f"--strength: must be in (0, 1], got {args.strength:g}")
    if not 0 <= args.inversion_iters <= MAX_INVERSION_ITERS:
        raise UserError(f"--inversion-iters: must be in 0..{MAX_INVERSION_ITERS}, got {args.inversion_iters}")
    check_at_least(args.limit, "--limit")
    check_new_output(args.out, args.overwrite)
    pipe = MitosisPipeline.from_pretrained(args.pipeline).to(process_state().device)
    items = gather_images(args.input, split=args.split, limit=args.limit)
    size = pipe.image_shape
    for item in items:
        if item.image.shape != size:
            raise UserError(f"{item.name}: image is {item.image.shape[1]}x{item.image.shape[0]} but the pipeline "
                            f"renders {size[1]}x{size[0]} patches")
    images = np.stack([item.image for item in items])
    own_labels = np.array([item.label for item in items], np.float32)  # NaN = unlabelled -> null label
    guidance = float(pipe.info.get("default_real2gen_guidance", pipe.default_guidance)) if args.guidance is None \
        else args.guidance
    if args.strength is None:
        args.strength = float(pipe.info.get("default_real2gen_strength", 1.0)) if args.mode == "invert" else 0.5
    result = render(pipe, images, own_labels, conditions, args.mode, guidance, args.steps, args.strength, args.sampler,
                    inversion_iters=args.inversion_iters)
    frames = np.concatenate([images[:, None], result["frames"]], axis=1)  # (N, 1 + K, H, W, 3)
    seeds = list(range(len(items)))
    manifest = {
        "kind": "real2gen", "has_input_frame": True, "mode": args.mode, "seeds": seeds,
        "inputs": [item.name for item in items],
        "conditions": [None] + conditions,
        "input_labels": [None if math.isnan(v) else float(v) for v in own_labels],
        "guidance": guidance, "sampler": "ddim" if args.mode == "invert" else args.sampler, "steps": args.steps,
        "strength": args.strength, "inversion_iters": args.inversion_iters if args.mode == "invert" else None,
        "model_hash": pipe.model_hash, "pipeline": str(pipe.path),
        "psnr_vae_db": result["psnr_vae"].round(3).tolist(),
        "psnr_frames_db": result["psnr_frames"].round(3).tolist(),
    }
    recon = [result["vae_recon"]]
    if args.mode == "invert":
        manifest["psnr_inversion_db"] = result["psnr_inversion"].round(3).tolist()
        recon.append(result["own_recon"])
    else:
        recon.append(result["vae_recon"])
    write_transitions(args.out, frames, manifest, overwrite=args.overwrite)
    save_npy(Path(args.out) / "reconstructions.npy", np.stack(recon, axis=1))
    line = f"wrote {args.out}: {len(items)} inputs x {len(conditions)} conditions ({args.mode}); " \
           f"VAE reconstruction {result['psnr_vae'].mean():.2f} dB"
    if args.mode == "invert":
        line += f", inversion at own label {result['psnr_inversion'].mean():.2f} dB"
    line += f", frames vs input {result['psnr_frames'].mean():.2f} dB at strength {args.strength:g}"
    print(line)


if __name__ == "__main__":
    main()
