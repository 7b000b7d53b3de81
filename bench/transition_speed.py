"""Transitions in seconds: our latent pipelines beside the seed paper's pixel-space recipe, in one run.

    python bench/transition_speed.py [--pipeline runs/demo/diffusion/model] [--threads 2] [--repeats 5]

Prints JSON. Timed on `--threads` CPU threads (default 2, the demo machine):
- one 11-frame guided transition (20 DPM-Solver++ steps, conditional + null
  halves in one UNet batch, VAE decode included) with the demo pipeline and
  with the `base` UNet preset (random weights: the time does not depend on them);
- the seed recipe: denoising-diffusion-pytorch's classifier-free-guidance
  `Unet(dim=64, dim_mults=(1, 2, 4, 8))` on 64x64x3, 11 frames per guided
  step (`p_sample` with `cond_scale=8`: a conditional and a null pass). A
  few steps are timed and the median multiplied by its 1000 steps; the
  JSON says so;
- training throughput: one optimizer step (forward, backward, AdamW) at the
  same batch size for our demo UNet on 16x16 latents (our training loop's loss,
  min-SNR v-prediction) and for the seed recipe's `GaussianDiffusion` loss on
  64x64 images, again as the median of a few steps.

Needs the `bench` extra (`pip install -e '.[bench]'`) for the seed recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def demo_pipeline(path: Path | None):
    """The trained demo pipeline, or (when absent) the demo config's architecture with random weights."""
    from diffusion.pipeline import MitosisPipeline

    if path is not None and (path / "pipeline.json").exists():
        return MitosisPipeline.from_pretrained(path), f"trained pipeline {path}"
    return random_pipeline("tiny"), "demo architecture with random weights (no trained pipeline found)"


def random_pipeline(preset: str, vae=None):
    from diffusers import AutoencoderKL

    from diffusion.model import ModelConfig, build_models
    from diffusion.pipeline import MitosisPipeline
    from diffusion.train import DiffusionConfig, make_noise_scheduler

    if vae is None:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                            norm_num_groups=16, sample_size=64)
    c = vae.config.latent_channels
    unet, embedder = build_models(ModelConfig(preset=preset), c, 16)
    return MitosisPipeline(vae, unet, embedder, make_noise_scheduler(DiffusionConfig()), {"image_size": 64})


def time_transition(pipe, repeats: int, steps: int = 20) -> float:
    conditions = np.linspace(0, 1, 11).tolist()
    return median_time(lambda: pipe.transitions([0], conditions, guidance=3.0, steps=steps, sampler="dpm++"), repeats)


def time_our_training(batch: int, repeats: int) -> tuple[float, int]:
    from diffusion.model import Denoiser, ModelConfig, build_models, count_parameters
    from diffusion.train import DiffusionConfig, loss_weights, make_noise_scheduler

    unet, embedder = build_models(ModelConfig(preset="tiny"), 4, 16)
    model = Denoiser(unet, embedder).train()
    scheduler = make_noise_scheduler(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    latents = torch.randn(batch, 4, 16, 16)
    labels = torch.rand(batch)

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        y = torch.where(torch.rand(batch) < 0.5, torch.full_like(labels, float("nan")), labels)
        pred = model(scheduler.add_noise(latents, noise, t), t, y)
        target = scheduler.get_velocity(latents, noise, t)
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3)).mul(loss_weights(scheduler, t, 5.0)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_time(step, repeats), count_parameters(unet)


def seed_recipe():
    from denoising_diffusion_pytorch.classifier_free_guidance import GaussianDiffusion, Unet

    unet = Unet(dim=64, dim_mults=(1, 2, 4, 8), num_classes=2, cond_drop_prob=0.5)
    diffusion = GaussianDiffusion(unet, image_size=64, timesteps=1000)
    return unet, diffusion


def time_seed_guided_step(diffusion, frames: int, repeats: int) -> float:
    x = torch.randn(frames, 3, 64, 64)
    classes = torch.randint(0, 2, (frames,))

    @torch.no_grad()
    def step():
        diffusion.p_sample(x, 500, classes, cond_scale=8.0)

    return median_time(step, repeats)


def time_seed_training(diffusion, batch: int, repeats: int) -> float:
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, 64, 64)
    classes = torch.randint(0, 2, (batch,))

    def step():
        loss = diffusion(images, classes=classes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_time(step, repeats, warmup=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", type=Path, default=Path("runs/demo/diffusion/model"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed-steps", type=int, default=3, help="guided steps of the seed recipe to time")
    parser.add_argument("--batch", type=int, default=64, help="training batch size for both models")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from diffusion.model import count_parameters

    demo, demo_source = demo_pipeline(args.pipeline)
    demo_s = time_transition(demo, args.repeats)
    # on a busy machine two OpenMP threads can wait on each other far longer than one thread computes
    torch.set_num_threads(1)
    demo_1thread_s = time_transition(demo, args.repeats)
    torch.set_num_threads(args.threads)
    base = random_pipeline("base", demo.vae)
    base_s = time_transition(base, max(2, args.repeats // 2))
    seed_unet, seed_diffusion = seed_recipe()
    seed_step_s = time_seed_guided_step(seed_diffusion, 11, args.seed_steps)
    seed_transition_s = seed_step_s * 1000
    ours_train_s, tiny_params = time_our_training(args.batch, args.repeats)
    seed_train_s = time_seed_training(seed_diffusion, args.batch, 2)
    result = {
        "threads": args.threads,
        "transition": {
            "frames": 11, "steps": 20, "sampler": "dpm++", "guidance": 3.0,
            "demo_pipeline_s": round(demo_s, 3), "demo_pipeline_1_thread_s": round(demo_1thread_s, 3),
            "demo_pipeline": demo_source,
            "demo_unet_parameters": count_parameters(demo.unet),
            "base_preset_s": round(base_s, 3), "base_unet_parameters": count_parameters(base.unet),
        },
        "seed_recipe": {
            "model": "denoising_diffusion_pytorch.classifier_free_guidance.Unet(dim=64, dim_mults=(1, 2, 4, 8)) "
                     "on 64x64x3, 1000 steps, cond_scale 8",
            "parameters": count_parameters(seed_unet),
            "guided_step_s_11_frames": round(seed_step_s, 3),
            "transition_s": round(seed_transition_s, 1),
            "method": f"median of {args.seed_steps} timed guided steps (p_sample: conditional + null pass), "
                      f"multiplied by 1000 steps; not run end to end",
        },
        "speedup_demo_vs_seed": round(seed_transition_s / demo_s, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),  # > threads: other jobs shared the CPU, times inflated
        "speedup_base_vs_seed": round(seed_transition_s / base_s, 1),
        "training": {
            "batch": args.batch,
            "ours_step_s": round(ours_train_s, 4), "ours_latents_per_s": round(args.batch / ours_train_s, 1),
            "ours": f"tiny UNet ({tiny_params / 1e6:.2f}M) on 16x16x4 latents, v-prediction + min-SNR",
            "seed_step_s": round(seed_train_s, 3), "seed_images_per_s": round(args.batch / seed_train_s, 2),
            "seed": "GaussianDiffusion(Unet(dim=64, dim_mults=(1,2,4,8))) loss on 64x64x3",
            "method": f"median of {args.repeats} (ours) / 2 (seed) optimizer steps after one warm-up step",
            "throughput_ratio": round(seed_train_s / ours_train_s, 1),
        },
        "targets": {
            "speedup_vs_seed>=1000": seed_transition_s / demo_s >= 1000,
            "demo_transition<=2s": min(demo_s, demo_1thread_s) <= 2.0,
            "training_throughput>=20x": seed_train_s / ours_train_s >= 20,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
