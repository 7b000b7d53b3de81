"""Tiny valid artifacts of every kind, built in-process in about a second (for the fuzz and `check` tests).

Each writer goes through the project's own export path (atomic_dir), so each folder carries integrity.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SIZE = 32  # patch side: the VAE maps 32x32x3 -> 8x8x4


def dataset(out: Path, n: int = 12, seed: int = 0) -> Path:
    from patches.dataset import Shard, SplitConfig, build_dataset

    def shard(n, seed):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        rows = [{"id": f"p{i}", "source": "test", "slide": "s0", "x": i, "y": i, "label": i % 3 / 2,
                 "votes": "", "hard_label": int(i % 3 == 2)} for i in range(n)]
        return Shard(images, rows)

    return build_dataset(out, [("s0", shard, {"n": n, "seed": seed})], patch_size=SIZE, margin=0,
                         meta={"source": "test"}, split=SplitConfig(mode="random", seed=seed), progress=False)


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=SIZE, scaling_factor=1.5)


def autoencoder(out: Path) -> Path:
    from mitosis_ldm.io import atomic_dir

    with atomic_dir(out) as tmp:
        _vae().save_pretrained(tmp)
    return out


def classifier(out: Path, members: int = 2) -> Path:
    from classifier.model import ClassifierEnsemble, MitosisClassifier, ModelConfig

    cfg = ModelConfig(name="resnet10t", model_kwargs={"channels": [8, 8, 8, 8], "stem_width": 8},
                      input_size=SIZE, upsample=1)
    nets = []
    for seed in range(members):
        torch.manual_seed(seed)
        nets.append(MitosisClassifier(cfg))
    return ClassifierEnsemble(cfg, nets, list(range(members))).save_pretrained(out)


def pipeline(out: Path) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusion.model import LabelEmbedder, time_embed_dim
    from diffusion.pipeline import MitosisPipeline
    from mitosis_ldm.io import atomic_dir

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, class_embed_type="identity")
    embedder = LabelEmbedder(time_embed_dim(unet), 4, 8)
    scheduler = DDPMScheduler(num_train_timesteps=20, prediction_type="v_prediction")
    info = {"image_size": SIZE, "latent_shape": [4, 8, 8], "latent_scale": 1.5, "prediction_type": "v_prediction",
            "default_guidance": 2.0, "default_steps": 2, "default_sampler": "ddim"}
    with atomic_dir(out) as tmp:
        MitosisPipeline(_vae(), unet, embedder, scheduler, info).save_pretrained(tmp)
    return out


def transitions(out: Path, seeds: int = 2, conditions: int = 3) -> Path:
    from mitosis_ldm.artifacts import write_transitions

    frames = np.random.default_rng(0).integers(0, 256, (seeds, conditions, SIZE, SIZE, 3), dtype=np.uint8)
    return write_transitions(out, frames, {"seeds": list(range(seeds)),
                                           "conditions": np.linspace(0, 1, conditions).tolist(),
                                           "guidance": 2.0, "sampler": "ddim", "steps": 2, "model_hash": "test"})


def flip_byte(path: Path, index: int = -1) -> None:
    """Flip the low bit of one byte of a file: the same size, other content (only a recorded hash can tell)."""
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
