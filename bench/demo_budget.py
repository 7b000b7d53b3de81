"""What the demo's training recipe costs on this host, against the `make demo` budget.

    python bench/demo_budget.py [--timings runs/demo/demo_timings.json] [--steps 8] [--budget 540]
        [--out runs/demo_budget.json]

For each training stage of `make demo` (configs/demo/*.yaml: autoencoder, classifier, diffusion) it builds the
stage's model at the recipe's sizes, counts one training step's floating-point work with
`torch.utils.flop_counter.FlopCounterMode` (forward and backward), and times `--steps` real steps (forward, loss,
backward, the trainers' AdamW) on random inputs of the recipe's shape, on every core. The stage's projected time
is steps x measured seconds per step: data loading, evaluation and export come on top. The peer, measured in the
same run, is a 2048 x 2048 fp32 matmul, the host's best sustained rate: it gives each stage's floor, the time the same
work would take at that rate. With `--timings` (a demo's `demo_timings.json`), the measured stage times and the
other stages' seconds go beside the projection.

Prints JSON: per stage {steps, batch, gflop_per_step, s_per_step, projected_s, floor_s}, the training total, the
budget and how many times over it the training alone is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def seconds_per_step(step, steps: int) -> float:
    step()  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(seconds: float = 2.0) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * 2048 ** 3 * count / (time.perf_counter() - start)


def demo_latent_shape(patch_size: int = 64) -> tuple[int, int]:
    """(channels, side) of the latents the demo autoencoder makes of its 64-pixel patches."""
    from autoencoder.model import build_autoencoder, downsample_factor
    from autoencoder.train import AutoencoderConfig
    from mitosis_ldm.config import load_config

    cfg = load_config(AutoencoderConfig, ROOT / "configs/demo/autoencoder.yaml")
    vae = build_autoencoder(cfg.model.preset, cfg.model.latent_channels)
    return cfg.model.latent_channels, patch_size // downsample_factor(vae)


def autoencoder_stage():
    from autoencoder.losses import ssim
    from autoencoder.train import AutoencoderConfig
    from autoencoder.model import build_autoencoder
    from mitosis_ldm.config import load_config
    from mitosis_ldm.training import adamw

    cfg = load_config(AutoencoderConfig, ROOT / "configs/demo/autoencoder.yaml")
    vae = build_autoencoder(cfg.model.preset, cfg.model.latent_channels).train()
    opt = adamw(vae.parameters(), cfg.train)
    images = torch.rand(cfg.train.batch_size, 3, cfg.data.crop, cfg.data.crop) * 2 - 1

    def step():
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - images).abs().mean() + (1 - ssim(recon, images)) + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, cfg.train.max_steps, cfg.train.batch_size, f"{cfg.data.crop}x{cfg.data.crop} crops", 1


def classifier_stage():
    from classifier.model import build_network
    from classifier.train import ClassifierConfig
    from mitosis_ldm.config import load_config
    from mitosis_ldm.training import adamw

    cfg = load_config(ClassifierConfig, ROOT / "configs/demo/classifier.yaml")
    net = build_network(cfg.model, pretrained=False).train()
    opt = adamw(net.parameters(), cfg.train)
    size = cfg.model.input_size * cfg.model.upsample
    images = torch.randn(cfg.train.batch_size, 3, size, size)
    targets = torch.rand(cfg.train.batch_size)

    def step():
        loss = F.binary_cross_entropy_with_logits(net(images).squeeze(1), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, cfg.train.max_steps, cfg.train.batch_size, f"{size}x{size}", cfg.ensemble.members


def diffusion_stage():
    from diffusion.model import Denoiser, build_models
    from diffusion.train import DiffusionTrainConfig
    from mitosis_ldm.config import load_config
    from mitosis_ldm.training import adamw

    cfg = load_config(DiffusionTrainConfig, ROOT / "configs/demo/diffusion.yaml")
    channels, size = demo_latent_shape()
    unet, embedder = build_models(cfg.model, channels, size)
    model = Denoiser(unet, embedder).train()
    opt = adamw(model.parameters(), cfg.train)
    batch = cfg.train.batch_size
    latents, target = torch.randn(batch, channels, size, size), torch.randn(batch, channels, size, size)
    timesteps = torch.randint(0, 1000, (batch,))
    labels = torch.rand(batch)

    def step():
        loss = F.mse_loss(model(latents, timesteps, labels), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, cfg.train.max_steps, batch, f"{channels}x{size}x{size} latents", 1


STAGES = {"autoencoder": autoencoder_stage, "classifier": classifier_stage, "diffusion": diffusion_stage}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timings", type=Path, help="a demo's demo_timings.json, to set beside the projection")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per stage (median taken)")
    parser.add_argument("--budget", type=float, default=540.0, help="the demo's budget after set-up, seconds")
    parser.add_argument("--threads", type=int, help="torch threads (default: every core)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from mitosis_ldm.launch import cpu_threads

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or cpu_threads())
    peak = matmul_rate()
    measured = json.loads(args.timings.read_text())["stage_seconds"] if args.timings else {}
    stages = {}
    for name, build in STAGES.items():
        step, steps, batch, shape, repeats = build()
        flops = step_flops(step)
        per_step = seconds_per_step(step, args.steps)
        total_steps = steps * repeats
        stages[name] = {
            "steps": total_steps, "batch": batch, "input": shape,
            "gflop_per_step": round(flops / 1e9, 2), "s_per_step": round(per_step, 4),
            "achieved_gflop_s": round(flops / per_step / 1e9, 1),
            "projected_s": round(total_steps * per_step, 1),
            "floor_s": round(total_steps * flops / peak, 1),
            **({"measured_demo_s": measured[name]} if name in measured else {}),
        }
    training = sum(s["projected_s"] for s in stages.values())
    result = {
        "what": "training steps of the demo recipe on this host, projected from timed steps",
        "threads": torch.get_num_threads(),
        "peer_matmul_gflop_s": round(peak / 1e9, 1),
        "stages": stages,
        "training_projected_s": round(training, 1),
        "training_floor_s": round(sum(s["floor_s"] for s in stages.values()), 1),
        "budget_s": args.budget,
        "training_over_budget": round(training / args.budget, 2),
    }
    if measured:
        result["other_stages_measured_s"] = {k: v for k, v in measured.items() if k not in STAGES}
        result["demo_measured_s"] = round(sum(measured.values()), 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from mitosis_ldm.io import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
