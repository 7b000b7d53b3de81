"""Tiny stand-ins for the report tests: drawn nuclei whose mitotic degree is known, and a patch dataset of them.

A nucleus of degree m is darker, more irregular and sits in a grainier
cytoplasm as m grows, like the synthetic benchmark; the same `rng` state gives
the same cell, so a row of degrees is a transition of one nucleus.
"""

from __future__ import annotations

import numpy as np

from patches.dataset import Shard


def draw_nucleus(m: float, rng_seed: int, size: int = 32) -> np.ndarray:
    """uint8 (size, size, 3) H&E-like patch of a nucleus with mitotic degree m in [0, 1]."""
    rng = np.random.default_rng(rng_seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    cy, cx = (size - 1) / 2 + rng.normal(0, 0.5, 2)
    theta = np.arctan2(yy - cy, xx - cx)
    phase = rng.uniform(0, 2 * np.pi)
    radius = size * (0.22 + rng.normal(0, 0.01)) * (1 + 0.35 * m * np.sin(7 * theta + phase))
    inside = np.hypot(yy - cy, xx - cx) < radius
    background = np.array([232, 186, 212], float)
    nucleus = (1 - m) * np.array([165, 120, 185], float) + m * np.array([55, 25, 95], float)
    grain = rng.normal(0, 1, (size, size, 1)) * (4 + 22 * m)
    image = np.where(inside[..., None], nucleus + rng.normal(0, 3, (size, size, 1)), background + grain)
    return image.clip(0, 255).astype(np.uint8)


def synth_shard(n: int, size: int, seed: int) -> Shard:
    """n patches with known degree, three noisy experts voting m >= 0.5 (soft label = mitotic fraction)."""
    rng = np.random.default_rng(seed)
    degrees = rng.uniform(0, 1, n)
    images = np.stack([draw_nucleus(m, seed * 100_000 + i, size) for i, m in enumerate(degrees)])
    rows = []
    for i, m in enumerate(degrees):
        votes = [int(m + rng.normal(0, 0.12) >= t) for t in (0.45, 0.5, 0.55)]
        soft = sum(votes) / 3
        rows.append({"id": f"p{i}", "source": "fake", "slide": "fake", "x": i, "y": 0, "label": soft,
                     "votes": ";".join(map(str, votes)), "hard_label": int(soft >= 0.5), "true_degree": float(m)})
    return Shard(images, rows)


class FakeEnsemble:
    """A deterministic stand-in with the ClassifierEnsemble interface: reads the central darkness.

    Three 'members' see the centre with different offsets, so the std over members is non-zero.
    """

    device = "cpu"  # where the report puts a pipeline it runs beside the ensemble

    def __init__(self, patch_size: int = 32):
        self.patch_size = patch_size

    def _darkness(self, images: np.ndarray) -> np.ndarray:
        p = self.patch_size
        centre = images[:, p // 2 - 3: p // 2 + 3, p // 2 - 3: p // 2 + 3].astype(float).mean(axis=(1, 2, 3))
        light, dark = np.mean([165, 120, 185]), np.mean([55, 25, 95])
        return (light - centre) / (light - dark)  # ~ m

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.shape[1:3] != (self.patch_size, self.patch_size):
            raise ValueError("wrong patch size")
        m = self._darkness(images)
        return np.stack([1 / (1 + np.exp(-12 * (m - 0.5 + off))) for off in (-0.03, 0.0, 0.03)], axis=1)  # (N, 3)

    def features(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, float) / 255.0
        n, p = len(images), self.patch_size
        grid = images.reshape(n, 4, p // 4, 4, p // 4, 3).mean(axis=(2, 4)).reshape(n, -1)  # (N, 48)
        return np.concatenate([grid, images.std(axis=(1, 2))], axis=1)                        # (N, 51)
