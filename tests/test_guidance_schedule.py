"""The transitions' guidance schedule: noise-level interval and CFG rescale, stored in and read from the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_diffusion import make_vae

SCHEDULE = {"default_guidance_interval": [0.3, 0.8], "default_guidance_rescale": 0.7}


def tiny_pipeline(root, info_extra: dict):
    """A random tiny pipeline (no training needed: the schedule is about how predictions combine)."""
    from diffusers import DDPMScheduler

    from diffusion.model import ModelConfig, build_models
    from diffusion.pipeline import MitosisPipeline

    vae = make_vae(root / "vae")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    unet, embedder = build_models(ModelConfig(preset="tiny"), 4, 16)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
    info = {"image_size": 64, "latent_shape": [4, 16, 16], "prediction_type": "v_prediction",
            "default_guidance": 4.0, "default_steps": 3, "default_sampler": "ddim", **info_extra}
    pipe = MitosisPipeline(AutoencoderKL.from_pretrained(vae), unet, embedder, scheduler, info)
    pipe.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("schedule"), SCHEDULE)


def test_schedule_round_trips_through_the_pipeline_folder(pipeline):
    from diffusion.pipeline import MitosisPipeline

    info = json.loads((pipeline / "pipeline.json").read_text())
    assert info["default_guidance_interval"] == [0.3, 0.8] and info["default_guidance_rescale"] == 0.7
    pipe = MitosisPipeline.from_pretrained(pipeline)
    assert pipe.default_guidance_interval == (0.3, 0.8) and pipe.default_guidance_rescale == 0.7
    by_default = pipe.transitions([1], [0.0, 1.0], steps=3, sampler="ddim")
    explicit = pipe.transitions([1], [0.0, 1.0], steps=3, sampler="ddim", guidance_interval=(0.3, 0.8),
                                guidance_rescale=0.7)
    plain = pipe.transitions([1], [0.0, 1.0], steps=3, sampler="ddim", guidance_interval=(0.0, 1.0),
                             guidance_rescale=0.0)
    assert np.array_equal(by_default, explicit)  # the defaults are the stored schedule
    assert not np.array_equal(by_default, plain)  # and the schedule changes the frames


def test_a_pipeline_without_a_schedule_guides_every_step(tmp_path):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(tiny_pipeline(tmp_path, {}))
    assert pipe.default_guidance_interval == (0.0, 1.0) and pipe.default_guidance_rescale == 0.0


def test_interval_guides_only_inside_and_rescale_matches_the_conditional_std(pipeline):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    # t / (T - 1) is the noise level; outside the interval the conditional prediction (guidance 1) is used
    assert not pipe.in_interval(999, (0.3, 0.8))
    assert pipe.in_interval(500, (0.3, 0.8))
    assert not pipe.in_interval(100, (0.3, 0.8))
    x = torch.randn(2, 4, 16, 16)
    y = torch.tensor([0.1, 0.9])
    with torch.no_grad():
        cond = pipe.unet(x, 500, class_labels=pipe.label_embedder(y)).sample
        assert torch.allclose(pipe.guided(x, 500, y, 1.0), cond, atol=1e-5)  # guidance 1 = conditional
        full = pipe.guided(x, 500, y, 6.0, guidance_rescale=1.0)
        plain = pipe.guided(x, 500, y, 6.0)
        half = pipe.guided(x, 500, y, 6.0, guidance_rescale=0.5)
    dims = (1, 2, 3)
    assert torch.allclose(full.std(dim=dims), cond.std(dim=dims), rtol=1e-4)  # phi = 1: the conditional std
    assert torch.allclose(half, 0.5 * full + 0.5 * plain, atol=1e-5)          # phi mixes the two


def test_transitions_cli_takes_the_pipeline_schedule_and_flags_override_it(pipeline, tmp_path):
    from diffusion.sample import main as sample_main

    common = ["--pipeline", str(pipeline), "--seeds", "0", "--conditions", "0,1"]
    sample_main([*common, "--out", str(tmp_path / "default")])
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["guidance_interval"] == [0.3, 0.8] and manifest["guidance_rescale"] == 0.7
    assert manifest["steps"] == 3 and manifest["sampler"] == "ddim" and manifest["guidance"] == 4.0
    sample_main([*common, "--guidance-interval", "0,1", "--guidance-rescale", "0", "--out", str(tmp_path / "plain")])
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert manifest["guidance_interval"] == [0.0, 1.0] and manifest["guidance_rescale"] == 0.0
    assert not np.array_equal(np.load(tmp_path / "default" / "frames.npy"), np.load(tmp_path / "plain" / "frames.npy"))


@pytest.mark.parametrize("flags, needles", [
    (["--guidance-interval", "0.2,1.5"], ["--guidance-interval", "0 <= LOW < HIGH <= 1", "0.2,1.5"]),
    (["--guidance-interval=-0.1,0.5"], ["--guidance-interval", "0 <= LOW < HIGH <= 1"]),
    (["--guidance-interval", "0.8,0.2"], ["--guidance-interval", "0 <= LOW < HIGH <= 1", "0.8,0.2"]),
    (["--guidance-interval", "0.5"], ["--guidance-interval", "LOW,HIGH"]),
    (["--guidance-rescale", "1.5"], ["--guidance-rescale", "[0, 1]", "1.5"]),
    (["--guidance-rescale=-0.2"], ["--guidance-rescale", "[0, 1]"]),
])
def test_bad_schedule_flags_are_one_line(pipeline, tmp_path, capsys, flags, needles):
    from diffusion.sample import main as sample_main

    out = tmp_path / "t"
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--pipeline", str(pipeline), "--seeds", "0", *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    for needle in needles:
        assert needle in err[0], err[0]
    assert not out.exists()


@pytest.mark.parametrize("key, value, needle", [
    ("sample.guidance_interval", "[0.5,2]", "sample.guidance_interval"),
    ("sample.guidance_interval", "[0.6,0.4]", "sample.guidance_interval"),
    ("sample.guidance_rescale", "1.2", "sample.guidance_rescale"),
])
def test_bad_schedule_in_the_training_config_is_refused(key, value, needle):
    from mitosis_ldm.config import load_config
    from mitosis_ldm.errors import UserError

    from diffusion.train import DiffusionTrainConfig, check_config

    cfg = load_config(DiffusionTrainConfig, None, [f"{key}={value}"])
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        check_config(cfg)


def test_pipeline_method_refuses_a_bad_schedule(pipeline):
    from mitosis_ldm.errors import UserError

    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    with pytest.raises(UserError, match="guidance-rescale"):
        pipe.transitions([0], [0.5], steps=2, guidance_rescale=2.0)
    with pytest.raises(UserError, match="guidance-interval"):
        pipe.transitions([0], [0.5], steps=2, guidance_interval=(0.9, 0.1))


def test_the_interval_holds_both_its_ends(pipeline):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    # [0, 1] guides every step, the first at t = T - 1 (noise level 1) and the last at t = 0 (level 0)
    assert pipe.in_interval(999, (0.0, 1.0)) and pipe.in_interval(0, (0.0, 1.0))
    # a step that lands exactly on an end of the interval is inside it
    assert pipe.in_interval(333, (333 / 999, 0.5)) and pipe.in_interval(666, (0.5, 666 / 999))
    assert not pipe.in_interval(332, (333 / 999, 0.5)) and not pipe.in_interval(667, (0.5, 666 / 999))


@pytest.mark.parametrize("interval", [(0.5, 0.5), (0.8, 0.3), (-0.1, 0.5), (0.2, 1.1)])
def test_an_interval_must_have_low_below_high_inside_zero_one(interval):
    from diffusion.sampling_args import check_guidance_schedule
    from mitosis_ldm.errors import UserError

    # an empty interval (LOW = HIGH) would guide almost no step without a word
    with pytest.raises(UserError, match="0 <= LOW < HIGH <= 1"):
        check_guidance_schedule(interval, 0.0)
    assert check_guidance_schedule((0.0, 1.0), 1.0) == ((0.0, 1.0), 1.0)


def test_steps_outside_the_interval_take_the_conditional_prediction(pipeline):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(pipeline)
    seen = []
    guided = pipe.guided

    def recording(latents, t, labels, guidance, *args):
        seen.append((pipe.noise_level(t), guidance))
        return guided(latents, t, labels, guidance, *args)

    pipe.guided = recording
    pipe.transitions([0], [0.5], 4.0, 3, "ddim", 1, guidance_interval=(0.3, 0.8))
    # guidance 1 is the conditional prediction alone; 0 would be the unconditional one
    assert {g for level, g in seen if 0.3 <= level <= 0.8} == {4.0}
    assert {g for level, g in seen if not 0.3 <= level <= 0.8} == {1.0}


@pytest.mark.parametrize("field, value", [("default_guidance_interval", [0.5, 0.5]),
                                          ("default_guidance_interval", [0.6, 0.2]),
                                          ("default_guidance_rescale", 1.5)])
def test_a_pipeline_json_schedule_that_the_flags_refuse_is_refused(tmp_path, field, value):
    from diffusion.pipeline import MitosisPipeline
    from mitosis_ldm.errors import UserError

    with pytest.raises(UserError, match=f"field '{field}'"):
        MitosisPipeline.from_pretrained(tiny_pipeline(tmp_path, {field: value}))


def test_a_pipeline_json_may_store_guidance_zero_and_the_full_interval(tmp_path):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(tiny_pipeline(tmp_path, {"default_guidance": 0.0,
                                                                    "default_guidance_interval": [0.0, 1.0],
                                                                    "default_guidance_rescale": 1.0}))
    assert pipe.schedule(None, 2)[0] == 0.0 and pipe.default_guidance_interval == (0.0, 1.0)
