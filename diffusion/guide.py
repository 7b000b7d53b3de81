"""Attach a weaker model of the same latents to a pipeline, for autoguidance.

    mitosis-ldm guide --pipeline runs/demo/diffusion/model --weak runs/old/diffusion/model \
        --out runs/demo/diffusion/model-auto [--guidance 3] [--default weak|null] [--overwrite]

Writes a new pipeline folder: the strong pipeline's parts, plus the weak
pipeline's `unet/` and `label_embedder/` under `guide/`, and in pipeline.json
`guide` (where the weak model came from: its folder, hash and training steps),
`default_guide` and, with `--guidance`, `default_guidance`. `transitions` and
`generate` then guide with the weak model by default (`--guide null` goes back
to classifier-free guidance). Karras et al. 2024 guide with a smaller or
shorter-trained model of the same data and conditioning; training can keep one
itself (`train.guide_snapshot_step`, an early EMA snapshot of the same run).

Both pipelines must denoise the same latents: the same VAE (recorded hash),
latent shape, prediction type and noise schedule.
"""

from __future__ import annotations

import argparse

from mitosis_ldm.errors import UserError, user_errors
from mitosis_ldm.io import atomic_dir, check_new_output

from .pipeline import MitosisPipeline
from .sampling_args import GUIDES, check_sampling_args

SCHEDULE_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")


def check_same_latents(strong: MitosisPipeline, weak: MitosisPipeline) -> None:
    """One line naming the first thing that differs between the two pipelines' latent spaces."""
    vae_strong = strong.info.get("hashes", {}).get("vae")
    vae_weak = weak.info.get("hashes", {}).get("vae")
    if vae_strong != vae_weak:
        raise UserError(f"--weak: {weak.path} was trained on latents of another VAE (hash {str(vae_weak)[:12]} "
                        f"against {str(vae_strong)[:12]})")
    if weak.latent_shape != strong.latent_shape:
        raise UserError(f"--weak: {weak.path} denoises {weak.latent_shape} latents, the pipeline {strong.latent_shape}")
    for name in SCHEDULE_FIELDS:
        a, b = strong.scheduler.config.get(name), weak.scheduler.config.get(name)
        if a != b:
            raise UserError(f"--weak: {weak.path / 'scheduler'}: field '{name}' is {b!r} but the pipeline's is {a!r}")


def attach(strong: MitosisPipeline, weak: MitosisPipeline, guidance: float | None = None,
           default: str = "weak") -> MitosisPipeline:
    """A pipeline holding `weak`'s UNet and label embedder as its guide (nothing is written)."""
    check_same_latents(strong, weak)
    info = {key: value for key, value in strong.info.items() if key != "format"}
    info["guide"] = {"pipeline": str(weak.path), "model_hash": weak.model_hash,
                     "trained_steps": weak.info.get("trained_steps"), "cond_dropout": weak.info.get("cond_dropout")}
    info["default_guide"] = default
    if guidance is not None:
        info["default_guidance"] = float(guidance)
    return MitosisPipeline(strong.vae, strong.unet, strong.label_embedder, strong.scheduler, info,
                           guide=(weak.unet, weak.label_embedder))


@user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="mitosis-ldm guide", description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="the pipeline to guide (its parts are copied)")
    parser.add_argument("--weak", required=True, help="a weaker pipeline folder of the same latents: the guide")
    parser.add_argument("--out", required=True, help="the new pipeline folder")
    parser.add_argument("--guidance", type=float, help="store this as the default guidance scale")
    parser.add_argument("--default", choices=GUIDES, default="weak",
                        help="what transitions and generate guide against by default (default: weak)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.guidance is not None:
        check_sampling_args(args.guidance, 1)
    check_new_output(args.out, args.overwrite)
    strong = MitosisPipeline.from_pretrained(args.pipeline)
    weak = MitosisPipeline.from_pretrained(args.weak, flag="--weak")
    pipe = attach(strong, weak, args.guidance, args.default)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        pipe.save_pretrained(tmp)
    print(f"wrote {args.out}: guide {weak.path} (hash {weak.model_hash[:12]}), default_guide {args.default}, "
          f"default guidance {pipe.default_guidance:g}")


if __name__ == "__main__":
    main()
