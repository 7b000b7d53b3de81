"""The histology autoencoder: a diffusers `AutoencoderKL` built from named presets.

    vae = build_autoencoder("tiny", latent_channels=4)   # 64x64x3 -> 16x16x4
    vae.save_pretrained(folder)                           # config.json + safetensors
    vae = AutoencoderKL.from_pretrained(folder)           # all a user needs

Every preset has three encoder blocks, i.e. two 2x downsamplings: a 64x64
patch becomes a 16x16 latent grid. The diffusion stage builds its UNet on that
grid, reading `latent_channels` and `scaling_factor` from the saved config.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

DOWNSAMPLE = 4  # spatial reduction of every preset (three blocks, two downsamplings)

# Named sizes (DiT style) instead of many width/depth flags.
PRESETS: dict[str, dict] = {
    # ~1M parameters: trains at tens of patches/s on 2 CPU cores.
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                 mid_block_add_attention=False),
    # ~55M parameters: the GPU recipe (the LDM f4 autoencoder widths, 128-256-512).
    "base": dict(block_out_channels=(128, 256, 512), layers_per_block=2, norm_num_groups=32,
                 mid_block_add_attention=True),
}


def build_autoencoder(preset: str = "tiny", latent_channels: int = 4, sample_size: int = 64,
                      **overrides) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL for preset `tiny` or `base`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown autoencoder preset '{preset}' (known: {', '.join(PRESETS)})")
    spec = {**PRESETS[preset], **overrides}
    blocks = len(spec["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels,
        sample_size=sample_size,
        scaling_factor=1.0,  # replaced by 1/std of the training latents at the end of training
        **spec,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def downsample_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def set_tiling(vae: AutoencoderKL, tile: int = 256) -> None:
    """Let diffusers encode/decode images larger than `tile` pixels in overlapping, blended tiles."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // downsample_factor(vae)
