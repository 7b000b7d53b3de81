"""Encode+decode throughput of our autoencoder vs a Stable-Diffusion-sized AutoencoderKL, on the same patches.

    python bench/autoencoder_throughput.py [--model runs/demo/autoencoder/model] [--dataset runs/demo/data/cmu]

Without flags it times the demo's trained autoencoder on the demo's real CMU
patches where `make demo` has made them, else a fresh `tiny` preset on random
pixels (`ours.source` and `images` in the JSON say which). The peer is
diffusers' SD v1 VAE configuration (block_out_channels 128-256-512-512,
2 layers per block, 4 latent channels) with random weights: a cost comparison,
not a quality one. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from autoencoder.model import build_autoencoder, count_parameters


def sd_sized() -> AutoencoderKL:
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         norm_num_groups=32, sample_size=64)


@torch.no_grad()
def patches_per_second(vae: AutoencoderKL, images: torch.Tensor, batch: int, min_seconds: float) -> dict:
    vae.eval()
    vae.decode(vae.encode(images[:batch]).latent_dist.mode())  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        for chunk in images.split(batch):
            z = vae.encode(chunk).latent_dist.mode()  # (B, C, h, w)
            vae.decode(z)
            done += len(chunk)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
    return {"parameters": count_parameters(vae), "latent_shape": list(z.shape[1:]),
            "patches": done, "seconds": round(elapsed, 3), "patches_per_s": round(done / elapsed, 2)}


ROOT = Path(__file__).resolve().parents[1]


def demo_default(relative: str, marker: str) -> str | None:
    """`runs/demo/<relative>` when `make demo` has written it (its `marker` file exists), else None."""
    path = ROOT / "runs/demo" / relative
    return str(path) if (path / marker).exists() else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="our trained autoencoder folder (default: the demo's, else a fresh `tiny` "
                                        "preset)")
    parser.add_argument("--dataset", help="patch dataset to take 64x64 patches from (default: the demo's CMU "
                                          "nuclei, else random pixels)")
    parser.add_argument("--n", type=int, default=128, help="patches per pass")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per model")
    args = parser.parse_args(argv)
    args.model = args.model or demo_default("autoencoder/model", "config.json")
    args.dataset = args.dataset or demo_default("data/cmu", "dataset.json")
    if args.dataset:
        from patches.dataset import PatchDataset

        ds = PatchDataset(args.dataset)
        pixels = ds.uint8(np.arange(min(args.n, len(ds))))
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (args.n, 64, 64, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 64, 64)
    ours = AutoencoderKL.from_pretrained(args.model) if args.model else build_autoencoder("tiny")
    result = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "patch_shape": list(images.shape[1:]),
        "batch": args.batch,
        "images": args.dataset or "random pixels",
        "ours": {"source": args.model or "tiny preset (random weights)", **patches_per_second(
            ours, images, args.batch, args.seconds)},
        "sd_sized_autoencoderkl": {"source": "diffusers AutoencoderKL, SD v1 config, random weights",
                                   **patches_per_second(sd_sized(), images, args.batch, args.seconds)},
    }
    result["speedup"] = round(result["ours"]["patches_per_s"] / result["sd_sized_autoencoderkl"]["patches_per_s"], 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
