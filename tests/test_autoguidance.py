"""Autoguidance: a weak model in the pipeline folder's guide/, attached or kept by training, used by default."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_diffusion import make_dataset, make_vae, tiny_train_args
from test_guidance_schedule import tiny_pipeline


def build_pair(root):
    """Two random tiny pipelines on the same VAE (strong, weak), as folders under `root`."""
    hashes = {"hashes": {"vae": "v" * 64}}
    strong = tiny_pipeline(root / "strong", hashes)
    torch.manual_seed(1)
    weak_root = root / "weak"
    weak = tiny_pipeline(weak_root, hashes)
    # tiny_pipeline seeds its own models: perturb the weak one so the two really differ
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(weak)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    import shutil

    shutil.rmtree(weak)
    pipe.save_pretrained(weak)
    return strong, weak, root


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("auto"))


def test_weak_guidance_is_weak_plus_scale_times_the_difference(pair, tmp_path):
    from diffusion.guide import main as guide_main
    from diffusion.pipeline import MitosisPipeline

    strong, weak, _ = pair
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--guidance", "2.5", "--out", str(tmp_path / "auto")])
    pipe = MitosisPipeline.from_pretrained(tmp_path / "auto")
    info = json.loads((tmp_path / "auto" / "pipeline.json").read_text())
    assert info["default_guide"] == "weak" and info["default_guidance"] == 2.5
    assert info["guide"]["pipeline"] == str(weak) and len(info["guide"]["model_hash"]) == 64
    assert (tmp_path / "auto" / "guide" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    x = torch.randn(3, 4, 16, 16)
    y = torch.tensor([0.1, 0.6, float("nan")])
    with torch.no_grad():
        cond = pipe.unet(x, 400, class_labels=pipe.label_embedder(y)).sample
        weak_pred = pipe.guide[0](x, 400, class_labels=pipe.guide[1](y)).sample
        got = pipe.guided(x, 400, y, 2.5, guide="weak")
        cfg = pipe.guided(x, 400, y, 2.5, guide="null")
    assert not torch.allclose(cond, weak_pred, atol=1e-3)  # the guide is another model
    assert torch.allclose(got[:2], weak_pred[:2] + 2.5 * (cond[:2] - weak_pred[:2]), atol=1e-4)
    assert torch.allclose(got[2], cond[2], atol=1e-5)  # a null label: the strong model's unconditional prediction
    assert not torch.allclose(got[:2], cfg[:2], atol=1e-3)


def test_transitions_use_the_stored_guide_and_the_flag_overrides_it(pair, tmp_path):
    from diffusion.guide import main as guide_main
    from diffusion.sample import main as sample_main

    strong, weak, _ = pair
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--out", str(tmp_path / "auto")])
    common = ["--pipeline", str(tmp_path / "auto"), "--seeds", "0", "--conditions", "0,1"]
    sample_main([*common, "--out", str(tmp_path / "default")])
    sample_main([*common, "--guide", "null", "--out", str(tmp_path / "null")])
    sample_main(["--pipeline", str(strong), "--seeds", "0", "--conditions", "0,1", "--out", str(tmp_path / "plain")])
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["guide"] == "weak"
    assert json.loads((tmp_path / "null" / "manifest.json").read_text())["guide"] == "null"
    frames = {name: np.load(tmp_path / name / "frames.npy") for name in ("default", "null", "plain")}
    assert np.array_equal(frames["null"], frames["plain"])  # --guide null is the unguided pipeline exactly
    assert not np.array_equal(frames["default"], frames["null"])


def test_bad_guides_are_one_line(pair, tmp_path, capsys):
    from diffusion.guide import main as guide_main
    from diffusion.pipeline import MitosisPipeline
    from diffusion.sample import main as sample_main

    strong, weak, root = pair

    def refused(run, out, *needles):
        with pytest.raises(SystemExit) as exit_info:
            run()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        for needle in needles:
            assert needle in err[0], err[0]
        assert not out.exists()

    # --guide weak on a pipeline without guide/
    out = tmp_path / "t"
    refused(lambda: sample_main(["--pipeline", str(strong), "--seeds", "0", "--guide", "weak", "--out", str(out)]),
            out, "--guide", "guide/")
    # a weak model of another VAE's latents
    other = tiny_pipeline(root / "other", {"hashes": {"vae": "w" * 64}})
    out = tmp_path / "g"
    refused(lambda: guide_main(["--pipeline", str(strong), "--weak", str(other), "--out", str(out)]),
            out, "--weak", "another VAE")
    refused(lambda: guide_main(["--pipeline", str(strong), "--weak", str(weak), "--guidance", "-1", "--out", str(out)]),
            out, "--guidance")
    # pipeline.json asking for a weak guide the folder does not hold
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--out", str(tmp_path / "auto")])
    import shutil

    shutil.rmtree(tmp_path / "auto" / "guide")
    from mitosis_ldm.errors import UserError

    with pytest.raises(UserError, match="guide/label_embedder/config.json: missing"):  # the integrity record
        MitosisPipeline.from_pretrained(tmp_path / "auto")
    (tmp_path / "auto" / "integrity.json").unlink()  # a folder exported before records existed
    with pytest.raises(UserError, match="field 'default_guide' is 'weak'"):
        MitosisPipeline.from_pretrained(tmp_path / "auto")


@pytest.mark.slow
def test_training_keeps_a_snapshot_as_the_guide(tmp_path):
    from diffusion.cache import main as cache_main
    from diffusion.pipeline import MitosisPipeline
    from diffusion.train import main as train_main

    synth = make_dataset(tmp_path / "synth", n=24, seed=0)
    vae = make_vae(tmp_path / "vae")
    cache_main(["--vae", str(vae), "--dataset", str(synth), "--out", str(tmp_path / "latents")])
    train_main(tiny_train_args(tmp_path / "run", tmp_path / "latents", steps=4,
                               extra=("--set", "sample.guide_snapshot_step=2", "--set", "sample.guide=weak",
                                      "--set", "sample.null_guidance=1", "--set", "sample.null_guidance_middle=0.5")))
    pipe = MitosisPipeline.from_pretrained(tmp_path / "run" / "model")
    assert pipe.guide is not None and pipe.default_guide == "weak"
    assert pipe.info["default_null_guidance"] == 1 and pipe.info["default_null_guidance_middle"] == 0.5
    assert pipe.info["guide"]["snapshot_step"] == 2 and pipe.info["trained_steps"] == 4
    strong = torch.cat([p.flatten() for p in pipe.unet.parameters()])
    weak = torch.cat([p.flatten() for p in pipe.guide[0].parameters()])
    assert strong.shape == weak.shape and not torch.allclose(strong, weak)  # step 2's weights, not step 4's
    frames = pipe.transitions([0], [0.0, 1.0], steps=2, sampler="ddim")
    assert frames.shape == (1, 2, 64, 64, 3)
    # the last preview is sampled as the exported pipeline samples by default: the weak guide, the null term
    from diffusion.export import preview_conditions, preview_sheet
    from diffusion.train import DiffusionTrainConfig, PreviewConfig
    from PIL import Image

    conditions = preview_conditions(DiffusionTrainConfig(preview=PreviewConfig(conditions=3)))
    expected = preview_sheet(pipe.transitions([0], conditions, steps=3), conditions)
    preview = np.asarray(Image.open(tmp_path / "run" / "previews" / "step-000004.png").convert("RGB"))
    assert preview.shape == expected.shape and np.abs(preview.astype(int) - expected).max() <= 2
    classifier_free = preview_sheet(pipe.transitions([0], conditions, steps=3, guide="null"), conditions)
    assert np.abs(preview.astype(int) - classifier_free).max() > 10
    flat = preview_sheet(pipe.transitions([0], conditions, steps=3, null_guidance_middle=1.0), conditions)
    assert np.abs(preview.astype(int) - flat).max() > 2  # the y = 0.5 strip keeps half the null term


@pytest.mark.parametrize("sets, needle", [
    (["sample.guide=weak"], "sample.guide"),
    (["sample.guide=other"], "sample.guide"),
    (["sample.guide_snapshot_step=5000"], "sample.guide_snapshot_step"),
    (["sample.guide_snapshot_step=-1"], "sample.guide_snapshot_step"),
])
def test_bad_guide_settings_in_the_training_config_are_refused(sets, needle):
    from mitosis_ldm.config import load_config
    from mitosis_ldm.errors import UserError

    from diffusion.train import DiffusionTrainConfig, check_config

    cfg = load_config(DiffusionTrainConfig, None, sets)
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        check_config(cfg)


@pytest.mark.parametrize("field, value", [("prediction_type", "epsilon"), ("beta_schedule", "linear"),
                                          ("num_train_timesteps", 500)])
def test_a_weak_model_of_another_noise_schedule_is_refused(pair, field, value):
    from diffusers import DDPMScheduler

    from diffusion.guide import attach
    from diffusion.pipeline import MitosisPipeline
    from mitosis_ldm.errors import UserError

    strong, weak, root = pair
    strong_pipe, weak_pipe = MitosisPipeline.from_pretrained(strong), MitosisPipeline.from_pretrained(weak)
    weak_pipe.scheduler = DDPMScheduler.from_config({**weak_pipe.scheduler.config, field: value})
    with pytest.raises(UserError, match=f"field '{field}'"):
        attach(strong_pipe, weak_pipe)
    attach(strong_pipe, MitosisPipeline.from_pretrained(weak))  # the same schedule is accepted


def test_guide_default_null_keeps_classifier_free_guidance_by_default(pair, tmp_path):
    from diffusion.guide import main as guide_main
    from diffusion.pipeline import MitosisPipeline

    strong, weak, _ = pair
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--default", "null", "--out", str(tmp_path / "auto")])
    assert json.loads((tmp_path / "auto" / "pipeline.json").read_text())["default_guide"] == "null"
    pipe = MitosisPipeline.from_pretrained(tmp_path / "auto")
    assert pipe.guide is not None and pipe.schedule(None, 2)[1]["guide"] == "null"


def test_a_weak_model_of_another_latent_shape_is_refused(pair):
    from diffusion.guide import attach
    from diffusion.model import ModelConfig, build_models
    from diffusion.pipeline import MitosisPipeline
    from mitosis_ldm.errors import UserError

    strong, weak, _ = pair
    weak_pipe = MitosisPipeline.from_pretrained(weak)
    weak_pipe.unet, weak_pipe.label_embedder = build_models(ModelConfig(preset="tiny"), 4, 8)  # 4x8x8 latents
    with pytest.raises(UserError, match=r"--weak: .* denoises \(4, 8, 8\) latents"):
        attach(MitosisPipeline.from_pretrained(strong), weak_pipe)


def test_exported_snapshot_keeps_the_configured_default_guide(tmp_path):
    """`sample.guide=null` with a kept snapshot: the folder holds guide/ but transitions stay classifier-free."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from diffusion.export import export, save_guide_snapshot
    from diffusion.model import Denoiser, ModelConfig, build_models
    from diffusion.pipeline import MitosisPipeline
    from diffusion.train import DiffusionTrainConfig
    from mitosis_ldm.config import load_config

    cfg = load_config(DiffusionTrainConfig, None, ["sample.guide_snapshot_step=2"])  # guide: null
    run = SimpleNamespace(run_dir=tmp_path / "run", model_dir=tmp_path / "run" / "model",
                          accelerator=SimpleNamespace(print=lambda *_: None))
    model = Denoiser(*build_models(ModelConfig(preset="tiny"), 4, 16))
    save_guide_snapshot(run, model, None, 2)
    info = {"image_size": 64, "latent_shape": [4, 16, 16], "prediction_type": "v_prediction"}
    export(run, model, None, DDPMScheduler(prediction_type="v_prediction"), make_vae(tmp_path / "vae"), info, cfg, 4)
    pipe = MitosisPipeline.from_pretrained(run.model_dir)
    assert pipe.guide is not None and pipe.default_guide == "null" and pipe.info["guide"]["snapshot_step"] == 2


def test_a_guide_folder_of_another_latent_shape_is_refused_at_load(pair, tmp_path):
    """A pipeline folder put together by hand (no integrity record) whose guide/unet denoises other latents."""
    import shutil

    from diffusion.guide import main as guide_main
    from diffusion.model import ModelConfig, build_models
    from diffusion.pipeline import MitosisPipeline
    from mitosis_ldm.errors import UserError

    strong, weak, _ = pair
    folder = tmp_path / "auto"
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--out", str(folder)])
    shutil.rmtree(folder / "guide" / "unet")
    build_models(ModelConfig(preset="tiny"), 4, 8)[0].save_pretrained(folder / "guide" / "unet")
    (folder / "integrity.json").unlink()
    with pytest.raises(UserError, match=r"guide/unet: the guide denoises 4x8x8 latents but unet/ denoises 4x16x16"):
        MitosisPipeline.from_pretrained(folder)
