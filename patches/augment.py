"""Training augmentations of stored patches: dihedral flips, rotation into the margin, random crops,
HED stain jitter and blur. `PatchDataset` applies them per item when given an `AugmentConfig`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AugmentConfig:
    """Training augmentations; all off means the stored centre crop as is."""

    dihedral: bool = True          # the 8 flips/rotations by 90 degrees
    rotate: bool = False           # arbitrary rotation, uses the stored margin
    stain_jitter: float = 0.0      # std of per-channel HED scale/shift (0.05 is mild)
    blur: float = 0.0              # max Gaussian sigma in pixels, applied with prob 0.3
    crop: int = 0                  # random crop of this size (0 = full patch)


def check_augment(cfg: AugmentConfig, prefix: str) -> None:
    """One line naming the key (`prefix` + name) for a negative strength or crop."""
    from mitosis_ldm.errors import UserError

    for key in ("stain_jitter", "blur"):
        value = getattr(cfg, key)
        if not 0 <= value < float("inf"):
            raise UserError(f"{prefix}{key}: must be a finite number >= 0 (0: off), got {value}")
    if cfg.crop < 0:
        raise UserError(f"{prefix}crop: must be >= 0 (0: the whole patch), got {cfg.crop}")


def augment_patch(patch: np.ndarray, size: int, margin: int, cfg: AugmentConfig) -> np.ndarray:
    """Augment one stored (S, S, 3) patch and return a (size or crop) centre region, uint8."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    if cfg.rotate and margin > 0:
        from scipy.ndimage import rotate as nd_rotate

        angle = rng.uniform(0, 360)
        patch = nd_rotate(patch, angle, axes=(0, 1), reshape=False, order=1, mode="reflect")
    patch = patch[margin: margin + size, margin: margin + size]
    if cfg.dihedral:
        patch = np.rot90(patch, k=int(rng.integers(4)))
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
    if cfg.crop and cfg.crop < size:
        y0, x0 = rng.integers(0, size - cfg.crop + 1, size=2)
        patch = patch[y0: y0 + cfg.crop, x0: x0 + cfg.crop]
    if cfg.stain_jitter > 0:
        patch = hed_jitter(patch, cfg.stain_jitter, rng)
    if cfg.blur > 0 and rng.random() < 0.3:
        from scipy.ndimage import gaussian_filter

        sigma = rng.uniform(0.1, cfg.blur)
        patch = gaussian_filter(patch.astype(np.float32), sigma=(sigma, sigma, 0)).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(patch)


def hed_jitter(patch: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Stain jitter in HED space (scikit-image colour deconvolution): scale and shift each stain."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(patch)
    alpha = rng.normal(1.0, strength, size=3)
    beta = rng.normal(0.0, strength * 0.1, size=3)
    rgb = hed2rgb(hed * alpha + beta)
    return (rgb.clip(0, 1) * 255 + 0.5).astype(np.uint8)
