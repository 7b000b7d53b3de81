"""real2gen's wiring, on a stand-in pipeline whose results are known by hand: which frame gets which condition
and the own-label round trip."""

from __future__ import annotations

import numpy as np
import torch

from diffusion.real2gen import render


class ShiftPipeline:
    """Latents are the pixels; inverting adds 10 x strength + 20 x label, going back takes the same off."""

    def encode(self, images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float()

    def decode(self, latents):
        return latents.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def invert(self, latents, labels, guidance, steps, fixed_point_iters=3, strength=1.0):
        return latents + 10 * strength + 20 * labels[:, None, None, None]

    def from_inverted(self, noise, labels, guidance, steps, strength=1.0):
        return noise - 10 * strength - 20 * labels[:, None, None, None]


def images_of(*values):
    return np.stack([np.full((4, 4, 3), v, np.uint8) for v in values])


def test_each_frame_is_rendered_at_its_own_condition():
    images, own, conditions = images_of(100, 150), np.array([0.0, 1.0], np.float32), [0.0, 0.5, 1.0]
    out = render(ShiftPipeline(), images, own, conditions, "invert", guidance=2.0, steps=4, strength=0.5)
    # frame (i, j) = input i + 20 x (own label i - condition j)
    assert np.array_equal(out["frames"], np.stack([images_of(100, 90, 80), images_of(170, 160, 150)]))


def test_the_own_label_frame_of_a_partial_inversion_reproduces_the_input():
    images, own = images_of(100, 150), np.array([0.0, 1.0], np.float32)
    out = render(ShiftPipeline(), images, own, [0.0, 1.0], "invert", guidance=2.0, steps=4, strength=0.5)
    assert np.array_equal(out["own_recon"], images)  # back at the same strength and label: the input itself
    assert np.array_equal(out["vae_recon"], images)
    assert np.allclose(out["psnr_inversion"], 10 * np.log10(255.0 ** 2 / 1e-10))  # the PSNR of identical images
