"""What is learned: a latent UNet conditioned on a continuous mitosis label.

The label y in [0, 1] (the fraction of experts who called the nucleus
mitotic) enters through `LabelEmbedder`: Fourier features of y -> MLP, added to
the UNet's timestep embedding (diffusers `UNet2DModel` with
`class_embed_type="identity"`). A learned null embedding stands for "no
label", which serves classifier-free guidance and unlabelled patches: NaN in,
null embedding out.

Sizes are named presets (DiT style): `tiny` for the 2-core CPU demo, `base`
for the GPU recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# preset -> UNet2DModel keyword arguments (sample_size and channels come from the latents)
PRESETS: dict[str, dict] = {
    # ~1.1M parameters; 16x16 -> 8x8 -> 4x4, attention only at 4x4 where it is cheap
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                 attention_head_dim=32, norm_num_groups=16),
    # ~2.5M parameters, ~1.7x the step time of tiny
    "small": dict(block_out_channels=(48, 96, 96), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                  attention_head_dim=32, norm_num_groups=16),
    # ~36M parameters for the GPU profile
    "base": dict(block_out_channels=(128, 256, 384), layers_per_block=2,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=64, norm_num_groups=32),
}


@dataclass
class ModelConfig:
    """The `model:` section: preset plus the label embedder's shape."""

    preset: str = "tiny"
    fourier_features: int = 8  # frequencies 2^0..2^(n-1) * pi; low ones keep y -> embedding smooth
    embedder_hidden: int = 128


class LabelEmbedder(ModelMixin, ConfigMixin):
    """Continuous label y -> a vector added to the timestep embedding; NaN -> learned null embedding."""

    @register_to_config
    def __init__(self, embed_dim: int = 192, fourier_features: int = 8, hidden: int = 128):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(fourier_features, dtype=torch.float32),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * fourier_features + 1, hidden), nn.SiLU(), nn.Linear(hidden, embed_dim))
        self.null = nn.Parameter(torch.zeros(embed_dim))
        nn.init.normal_(self.null, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.float().reshape(-1)  # (B,), NaN = null
        is_null = torch.isnan(labels)
        y = torch.nan_to_num(labels, nan=0.0)
        phase = y[:, None] * self.freqs[None]  # (B, F)
        features = torch.cat([y[:, None] * 2 - 1, phase.sin(), phase.cos()], dim=1)  # (B, 2F + 1)
        emb = self.mlp(features)  # (B, D)
        return torch.where(is_null[:, None], self.null[None].to(emb.dtype), emb)


def build_unet(preset: str, latent_channels: int, latent_size: int) -> UNet2DModel:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return UNet2DModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                       class_embed_type="identity", **PRESETS[preset])


def time_embed_dim(unet: UNet2DModel) -> int:
    return unet.config.block_out_channels[0] * 4


def build_models(cfg: ModelConfig, latent_channels: int, latent_size: int) -> tuple[UNet2DModel, LabelEmbedder]:
    unet = build_unet(cfg.preset, latent_channels, latent_size)
    embedder = LabelEmbedder(time_embed_dim(unet), cfg.fourier_features, cfg.embedder_hidden)
    return unet, embedder


class Denoiser(nn.Module):
    """UNet + label embedder as one module, so accelerate/DDP/EMA see one set of parameters."""

    def __init__(self, unet: UNet2DModel, embedder: LabelEmbedder):
        super().__init__()
        self.unet = unet
        self.embedder = embedder

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # latents (B, C, h, w); timesteps (B,); labels (B,) with NaN = null -> prediction (B, C, h, w)
        return self.unet(latents, timesteps, class_labels=self.embedder(labels)).sample


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
