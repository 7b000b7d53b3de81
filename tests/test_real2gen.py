"""real2gen's wiring, on stand-in pipelines whose results are known by hand: which frame gets which condition,
the own-label round trip, and where SDEdit starts in the schedule; then the command's bounds on a tiny pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion.inversion import RealToGenerated
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


class DenoiseRecorder(RealToGenerated):
    """SDEdit's own noising on a 1000-step schedule; `denoise` records what it is given and returns it unchanged."""

    def __init__(self):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.calls = []

    def denoise(self, latents, labels, guidance, scheduler, timesteps, generators=None):
        self.calls.append((latents, [int(t) for t in timesteps]))
        return latents


def test_sdedit_at_strength_0_3_noises_to_the_level_of_its_first_step_of_the_last_three():
    pipe = DenoiseRecorder()
    pipe.sdedit(torch.zeros(2, 4, 8, 8), torch.tensor([0.0, 1.0]), 2.0, steps=10, strength=0.3, seed=5)
    (noisy, timesteps), = pipe.calls
    assert timesteps == [299, 199, 99]  # DDIM over 10 trailing steps is 999, 899, ..., 99: the last 3
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    level = (1 - pipe.scheduler.alphas_cumprod[299]).sqrt()  # clean latents are zero: only the noise is left
    assert torch.allclose(noisy, (level * noise).expand(2, 4, 8, 8), atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++", "euler"])
def test_sdedit_noises_latents_on_their_own_device(sampler):
    # the noise is drawn on the CPU (the same on every device): on a GPU it once met the CUDA latents unmoved.
    # The meta device stands in for the GPU.
    pipe = DenoiseRecorder()
    out = pipe.sdedit(torch.zeros(2, 4, 8, 8, device="meta"), torch.tensor([0.0, 1.0]), 2.0, steps=10, strength=0.3,
                      sampler=sampler)
    assert out.device.type == "meta" and out.shape == (2, 4, 8, 8)


class SdeditRecorder(DenoiseRecorder, ShiftPipeline):
    """ShiftPipeline's encode and decode around RealToGenerated's own SDEdit noising, recorded."""


def test_sdedit_noises_each_input_with_its_own_seed():
    pipe = SdeditRecorder()
    render(pipe, images_of(0, 0), np.array([0.0, 0.0], np.float32), [0.5], "sdedit", guidance=2.0, steps=10,
           strength=0.3)
    (first, _), (second, _) = pipe.calls
    assert not torch.allclose(first, second)  # two equal inputs, two noise draws


def test_a_partial_trajectory_takes_at_least_one_step_and_at_most_all():
    from diffusion.schedulers import run_steps

    assert [run_steps(20, s) for s in (0.01, 0.3, 0.5, 1.0)] == [1, 6, 10, 20]


def test_real2gen_bounds_strength_and_inversion_iters(tmp_path, capsys):
    """`--inversion-iters` takes 0..10 (10 runs), `--strength` (0, 1]; the refusals are one line before any work."""
    import tiny_artifacts
    from diffusion.real2gen import main as r2g_main

    pipe, data = tiny_artifacts.pipeline(tmp_path / "pipe"), tiny_artifacts.dataset(tmp_path / "data")
    common = ["--pipeline", str(pipe), "--input", str(data), "--limit", "1", "--conditions", "0,1", "--steps", "1"]
    r2g_main([*common, "--inversion-iters", "10", "--out", str(tmp_path / "ten")])
    assert json.loads((tmp_path / "ten" / "manifest.json").read_text())["inversion_iters"] == 10
    for flags, needle in ((["--inversion-iters", "11"], "--inversion-iters"), (["--strength", "0"], "--strength")):
        with pytest.raises(SystemExit) as exit_info:
            r2g_main([*common, *flags, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "bad").exists()


def test_real_patches_encode_to_their_latent_mean(tmp_path):
    """The encoder's mean, not a draw: real2gen renders the same input the same way every time."""
    import tiny_artifacts
    from diffusion.cache import encode_images
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(tiny_artifacts.pipeline(tmp_path / "pipe"))
    images = np.random.default_rng(0).integers(0, 256, (2, tiny_artifacts.SIZE, tiny_artifacts.SIZE, 3), np.uint8)
    assert torch.equal(pipe.encode(images), encode_images(pipe.vae, images, "mean"))
    assert torch.equal(pipe.encode(images), pipe.encode(images))
