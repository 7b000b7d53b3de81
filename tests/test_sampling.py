"""Sampling's wiring on a random tiny pipeline: which noise each sampler starts from, which row gets which
condition, and which of pipeline.json's defaults the command line overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_guidance_schedule import tiny_pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sampling"), {})


def gaussian_oracle(pipe, spread: float, mean: float = 0.0):
    """`guided` of a model that knows its data exactly: every latent element N(mean, spread²), v-prediction."""
    alphas = pipe.scheduler.alphas_cumprod

    def guided(x, t, *_):
        a = alphas[int(t)]
        x0 = mean + a.sqrt() * spread ** 2 * (x - a.sqrt() * mean) / (a * spread ** 2 + 1 - a)  # E[x0 | x_t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return guided


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "unipc", "euler"])
def test_every_sampler_turns_its_initial_noise_into_samples_of_the_data(pipeline, sampler):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    pipe.guided = gaussian_oracle(pipe, 0.5)
    latents = pipe.transitions(list(range(8)), [0.5], steps=50, sampler=sampler, latents_only=True)
    # noise at the sampler's own starting scale (Euler's sigma is far above 1) ends as the data's spread (DDPM
    # and DDIM fall 3 % short of it in 50 steps)
    assert latents.shape == (8, 4, 16, 16) and abs(float(latents.std()) - 0.5) < 0.05


def test_each_frame_of_a_batch_of_seeds_is_its_seed_at_its_condition(pipeline):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    conditions = [0.0, 1.0]
    batched = pipe.transitions([0, 1], conditions, steps=3, seeds_per_batch=2, latents_only=True)
    alone = torch.cat([pipe.transitions([s], conditions, steps=3, latents_only=True) for s in (0, 1)])
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the two conditions give two frames
    assert torch.allclose(batched, alone, atol=1e-4)


def test_a_stochastic_sampler_draws_each_seeds_step_noise_from_that_seed_alone(pipeline):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    torch.manual_seed(123)  # the global stream must not matter: DDPM's step noise comes from the seed's generator
    batched = pipe.transitions([0, 1], [0.5, 0.5], steps=4, sampler="ddpm", seeds_per_batch=2, latents_only=True)
    torch.manual_seed(456)
    alone = torch.cat([pipe.transitions([s], [0.5], steps=4, sampler="ddpm", latents_only=True) for s in (0, 1)])
    # rows: seed 0 twice, then seed 1 twice
    assert torch.allclose(batched[0], batched[1], atol=1e-4)  # one seed's rows share their step noise
    assert torch.allclose(batched[::2], alone, atol=1e-4)  # and get the same noise in any batch
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)


def test_the_sampling_flags_override_the_pipelines_defaults(pipeline, tmp_path):
    from diffusion.pipeline import MitosisPipeline
    from diffusion.sample import main as sample_main

    pipe = MitosisPipeline.from_pretrained(pipeline)
    assert (pipe.default_guidance, pipe.info["default_steps"], pipe.info["default_sampler"]) == (4.0, 3, "ddim")
    sample_main(["--pipeline", str(pipeline), "--seeds", "0", "--conditions", "0,1", "--guidance", "1.5",
                 "--steps", "2", "--sampler", "euler", "--out", str(tmp_path / "t")])
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert (manifest["guidance"], manifest["steps"], manifest["sampler"]) == (1.5, 2, "euler")
    want = pipe.transitions([0], [0.0, 1.0], guidance=1.5, steps=2, sampler="euler")
    assert np.array_equal(np.load(tmp_path / "t" / "frames.npy"), want)


def test_an_existing_output_is_refused_before_the_pipeline_loads(pipeline, tmp_path, capsys, monkeypatch):
    from diffusion import sample

    def no_load(*_args, **_kw):
        raise AssertionError("the pipeline was loaded before the output was checked")

    monkeypatch.setattr(sample.MitosisPipeline, "from_pretrained", no_load)
    (tmp_path / "t").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--pipeline", str(pipeline), "--seeds", "0", "--out", str(tmp_path / "t")])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err


def test_a_seed_range_may_hold_one_seed():
    from diffusion.sampling_args import parse_seeds

    assert parse_seeds("3-3") == [3] and parse_seeds("0-2,5") == [0, 1, 2, 5]


def test_plain_ddim_inversion_still_inverts(pipeline):
    """`fixed_point_iters=0` is one model call per step (plain DDIM inversion), not none."""
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    labels = torch.tensor([0.0, 1.0])
    plain = pipe.invert(z0, labels, 2.0, 5, fixed_point_iters=0)
    solved = pipe.invert(z0, labels, 2.0, 5, fixed_point_iters=2)
    assert (plain - z0).abs().mean() > 0.1 and not torch.allclose(plain, solved, atol=1e-4)


def test_inverting_data_gives_the_forward_processs_noise_and_comes_back(pipeline):
    """Under a model that knows its (non-centred) data, DDIM inversion climbs the noise levels in order: a data
    sample lands on the forward process's distribution at the top level, and DDIM brings it back."""
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    pipe.guided = gaussian_oracle(pipe, 0.5, mean=1.0)
    z0 = 1.0 + 0.5 * torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.full((4,), 0.5)
    noise = pipe.invert(z0, labels, 2.0, 20)
    a = pipe.scheduler.alphas_cumprod[950]  # twenty "leading" steps top out at t = 950
    assert abs(float(noise.mean()) - float(a.sqrt())) < 0.02  # 0.073 against 0.076; descending order: -0.34
    assert abs(float(noise.std()) - float((0.25 * a + 1 - a).sqrt())) < 0.1  # DDIM's own 7 % at 20 steps
    assert torch.allclose(pipe.from_inverted(noise, labels, 2.0, 20), z0, atol=0.02)


def test_verify_hashes_every_file_before_rendering(tmp_path, capsys, monkeypatch):
    """A weight edited in place keeps its size: loads (which check sizes) pass it, `--verify` refuses it."""
    import tiny_artifacts
    from diffusion.sample import main as sample_main
    from mitosis_ldm import integrity

    monkeypatch.setattr(integrity, "CHEAP_BYTES", 0)  # as if every file were too large to re-hash on each load
    monkeypatch.setattr(integrity, "_full_by_default", False)  # --verify's setting is undone after the test
    folder = tiny_artifacts.pipeline(tmp_path / "model")  # exported with its integrity record
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    assert integrity.findings(folder) == []
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--pipeline", str(folder), "--seeds", "0", "--verify", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unet/diffusion_pytorch_model.safetensors" in err and "differs" in err
    assert not (tmp_path / "t").exists()
