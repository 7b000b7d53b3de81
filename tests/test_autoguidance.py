"""Autoguidance: a weak model in the pipeline folder's guide/, attached or kept by training, used by default."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_diffusion import make_dataset, make_vae, tiny_train_args
from test_guidance_schedule import tiny_pipeline


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two random tiny pipelines on the same VAE (strong, weak), as folders."""
    root = tmp_path_factory.mktemp("auto")
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


def test_the_null_term_adds_its_push_to_either_guide(pair, tmp_path):
    from diffusion.guide import main as guide_main
    from diffusion.pipeline import MitosisPipeline

    strong, weak, _ = pair
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--out", str(tmp_path / "auto")])
    pipe = MitosisPipeline.from_pretrained(tmp_path / "auto")
    x = torch.randn(3, 4, 16, 16)
    y = torch.tensor([0.2, 0.9, float("nan")])
    with torch.no_grad():
        cond = pipe.unet(x, 300, class_labels=pipe.label_embedder(y)).sample
        uncond = pipe.unet(x, 300, class_labels=pipe.label_embedder(torch.full((3,), float("nan")))).sample
        weak_pred = pipe.guide[0](x, 300, class_labels=pipe.guide[1](y)).sample
        got = pipe.guided(x, 300, y, 2.0, guide="weak", null_guidance=0.7)
        cfg = pipe.guided(x, 300, y, 2.0, guide="null", null_guidance=0.7)
    want = weak_pred + 2.0 * (cond - weak_pred) + 0.7 * (cond - uncond)
    assert torch.allclose(got[:2], want[:2], atol=1e-4)
    assert torch.allclose(got[2], cond[2], atol=1e-5)  # a null label still asks for nothing
    assert torch.allclose(cfg[:2], uncond[:2] + 2.7 * (cond[:2] - uncond[:2]), atol=1e-4)
    assert not torch.allclose(got[:2], pipe.guided(x, 300, y, 2.0, guide="weak")[:2], atol=1e-3)


def test_the_null_term_is_a_pipeline_default_the_flag_overrides_and_the_interval_bounds(pair, tmp_path):
    from diffusion.guide import main as guide_main
    from diffusion.pipeline import MitosisPipeline
    from diffusion.sample import main as sample_main

    strong, weak, _ = pair
    folder = tmp_path / "auto"
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--out", str(folder)])
    pipe = MitosisPipeline.from_pretrained(folder)
    assert pipe.default_null_guidance == 0.0  # older folders: no null term
    plain = pipe.transitions([3], [0.0, 0.5, 1.0], steps=3, sampler="ddim")
    pipe.info["default_null_guidance"] = 1.5
    stored = tmp_path / "stored"
    pipe.save_pretrained(stored)
    common = ["--seeds", "3", "--conditions", "0,0.5,1"]
    sample_main(["--pipeline", str(stored), *common, "--out", str(tmp_path / "default")])
    sample_main(["--pipeline", str(stored), *common, "--null-guidance", "0", "--out", str(tmp_path / "off")])
    # outside the guidance interval the null term is off, as the guidance is
    sample_main(["--pipeline", str(stored), *common, "--guidance-interval", "0.995,1", "--out", str(tmp_path / "hi")])
    sample_main(["--pipeline", str(stored), *common, "--guidance-interval", "0.995,1", "--null-guidance", "0",
                 "--out", str(tmp_path / "hi-off")])
    assert json.loads((tmp_path / "default" / "manifest.json").read_text())["null_guidance"] == 1.5
    frames = {name: np.load(tmp_path / name / "frames.npy") for name in ("default", "off", "hi", "hi-off")}
    assert np.array_equal(frames["off"][0], plain[0])
    assert not np.array_equal(frames["default"], frames["off"])
    # 3 DDIM steps start at t = 999, the only one inside [0.995, 1]; there the term acts, nowhere else
    assert not np.array_equal(frames["hi"], frames["hi-off"])
    sample_main(["--pipeline", str(stored), *common, "--guidance-interval", "0.2,0.3", "--out", str(tmp_path / "lo")])
    sample_main(["--pipeline", str(stored), *common, "--guidance-interval", "0.2,0.3", "--null-guidance", "0",
                 "--out", str(tmp_path / "lo-off")])
    assert np.array_equal(np.load(tmp_path / "lo" / "frames.npy"), np.load(tmp_path / "lo-off" / "frames.npy"))


def test_bad_null_terms_are_one_line(pair, tmp_path, capsys):
    from diffusion.pipeline import MitosisPipeline
    from diffusion.sample import main as sample_main
    from mitosis_ldm.config import load_config
    from mitosis_ldm.errors import UserError

    from diffusion.train import DiffusionTrainConfig, check_config

    strong, _, _ = pair
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--pipeline", str(strong), "--seeds", "0", "--null-guidance", "-0.5", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--null-guidance" in err[0] and not out.exists()
    with pytest.raises(UserError, match=r"sample\.null_guidance"):
        check_config(load_config(DiffusionTrainConfig, None, ["sample.null_guidance=-1"]))
    pipe = MitosisPipeline.from_pretrained(strong)
    pipe.info["default_null_guidance"] = "lots"
    pipe.save_pretrained(tmp_path / "bad")
    with pytest.raises(UserError, match="default_null_guidance"):
        MitosisPipeline.from_pretrained(tmp_path / "bad")


def test_outside_the_interval_one_unet_call_gives_the_conditional_prediction(pair, tmp_path):
    from diffusion.guide import main as guide_main
    from diffusion.pipeline import MitosisPipeline

    strong, weak, _ = pair
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--out", str(tmp_path / "auto")])
    pipe = MitosisPipeline.from_pretrained(tmp_path / "auto")
    calls = []
    for name, module in (("strong", pipe.unet), ("weak", pipe.guide[0])):
        module.register_forward_hook(lambda _m, args, _out, name=name: calls.append((name, len(args[0]))))
    x = torch.randn(2, 4, 16, 16)
    y = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        cond = pipe.unet(x, 200, class_labels=pipe.label_embedder(y)).sample
        calls.clear()
        for guide in ("weak", "null"):  # guidance 1, no null term: rescaling toward its own std changes nothing
            assert torch.equal(pipe.guided(x, 200, y, 1.0, guidance_rescale=0.5, guide=guide), cond)
        assert calls == [("strong", 2), ("strong", 2)]
        calls.clear()
        pipe.guided(x, 200, y, 2.0, guidance_rescale=0.5, guide="weak", null_guidance=0.5)
    assert sorted(calls) == [("strong", 2 + 2), ("weak", 2)]  # the null rows ride in the strong model's batch


def test_the_null_term_eases_to_its_middle_share_at_y_one_half(pair, tmp_path):
    from diffusion.guide import main as guide_main
    from diffusion.pipeline import MitosisPipeline, null_term_scale

    y = torch.tensor([0.0, 0.25, 0.5, 1 / 3, 1.0, float("nan")])
    scale = null_term_scale(y, 2.0, 0.25).flatten()
    assert torch.allclose(scale[:5], torch.tensor([2.0, 2.0 * (1 - 0.75 * 0.5), 0.5, 2.0 * (1 - 0.75 * 0.75), 2.0]),
                          atol=1e-6)
    assert null_term_scale(y, 2.0, 1.0) == 2.0  # flat: the plain scalar, no per-row work
    strong, weak, _ = pair
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--out", str(tmp_path / "auto")])
    pipe = MitosisPipeline.from_pretrained(tmp_path / "auto")
    x = torch.randn(4, 4, 16, 16)
    labels = torch.tensor([0.0, 0.5, 0.8, float("nan")])
    with torch.no_grad():
        cond = pipe.unet(x, 300, class_labels=pipe.label_embedder(labels)).sample
        uncond = pipe.unet(x, 300, class_labels=pipe.label_embedder(torch.full((4,), float("nan")))).sample
        weak_pred = pipe.guide[0](x, 300, class_labels=pipe.guide[1](labels)).sample
        got = pipe.guided(x, 300, labels, 2.0, guide="weak", null_guidance=1.2, null_guidance_middle=0.25)
        cfg = pipe.guided(x, 300, labels, 2.0, guide="null", null_guidance=1.2, null_guidance_middle=0.25)
    n = 1.2 * (1 - 0.75 * np.sin(np.pi * np.array([0.0, 0.5, 0.8])) ** 2)  # 1.2, 0.3, 0.81...
    for row in range(3):
        want = weak_pred[row] + 2.0 * (cond[row] - weak_pred[row]) + n[row] * (cond[row] - uncond[row])
        assert torch.allclose(got[row], want, atol=1e-4)
        assert torch.allclose(cfg[row], uncond[row] + (2.0 + n[row]) * (cond[row] - uncond[row]), atol=1e-4)
    assert torch.allclose(got[3], cond[3], atol=1e-5)


def test_the_middle_share_is_a_pipeline_default_that_only_the_middle_labels_feel(pair, tmp_path, capsys):
    from diffusion.guide import main as guide_main
    from diffusion.pipeline import MitosisPipeline
    from diffusion.sample import main as sample_main
    from mitosis_ldm.config import load_config
    from mitosis_ldm.errors import UserError

    from diffusion.train import DiffusionTrainConfig, check_config

    strong, weak, _ = pair
    guide_main(["--pipeline", str(strong), "--weak", str(weak), "--out", str(tmp_path / "auto")])
    pipe = MitosisPipeline.from_pretrained(tmp_path / "auto")
    assert pipe.default_null_guidance_middle == 1.0  # older folders: the same term at every label
    pipe.info["default_null_guidance"] = 1.5
    pipe.info["default_null_guidance_middle"] = 0.2
    stored = tmp_path / "stored"
    pipe.save_pretrained(stored)
    common = ["--pipeline", str(stored), "--seeds", "3", "--conditions", "0,0.5,1"]
    sample_main([*common, "--out", str(tmp_path / "default")])
    sample_main([*common, "--null-guidance-middle", "1", "--out", str(tmp_path / "flat")])
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["null_guidance_middle"] == 0.2 and manifest["null_guidance"] == 1.5
    default, flat = (np.load(tmp_path / name / "frames.npy") for name in ("default", "flat"))
    # y = 0 and y = 1 take the whole term either way; y = 0.5 keeps a fifth of it
    assert np.array_equal(default[0, [0, 2]], flat[0, [0, 2]])
    assert not np.array_equal(default[0, 1], flat[0, 1])
    out = tmp_path / "bad"
    for value in ("1.5", "-0.1", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            sample_main([*common, "--null-guidance-middle", value, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and "--null-guidance-middle" in err[0] and not out.exists()
    with pytest.raises(UserError, match=r"sample\.null_guidance_middle"):
        check_config(load_config(DiffusionTrainConfig, None, ["sample.null_guidance_middle=2"]))
    pipe.info["default_null_guidance_middle"] = 3
    pipe.save_pretrained(tmp_path / "bad-folder")
    with pytest.raises(UserError, match="default_null_guidance_middle"):
        MitosisPipeline.from_pretrained(tmp_path / "bad-folder")


def test_the_middle_share_applies_only_at_noise_levels_up_to_below(pair, tmp_path):
    """`null_guidance_middle_below` L: each denoising step at noise level t/T <= L gets the middle share, each
    step above it the whole term (middle 1); L = 1 (the default) eases every step."""
    from diffusion.pipeline import MitosisPipeline

    strong, _, _ = pair
    pipe = MitosisPipeline.from_pretrained(strong)
    seen = []
    real_guided = pipe.guided

    def recording(latents, t, labels, guidance, guidance_rescale=0.0, guide="null", null_guidance=0.0,
                  null_guidance_middle=1.0):
        seen.append((pipe.noise_level(t), null_guidance_middle))
        return real_guided(latents, t, labels, guidance, guidance_rescale, guide, null_guidance, null_guidance_middle)

    pipe.guided = recording
    levels = {}
    for below in (1.0, 0.5, 0.0):
        seen.clear()
        pipe.transitions([0], [0.5], guidance=2.0, steps=6, guidance_interval=(0.0, 1.0), null_guidance=1.0,
                         null_guidance_middle=0.25, null_guidance_middle_below=below)
        levels[below] = list(seen)
    steps = [level for level, _ in levels[1.0]]
    assert len(steps) == 6 and min(steps) < 0.5 < max(steps)  # steps on both sides of 0.5
    assert all(middle == 0.25 for _, middle in levels[1.0])
    assert all(middle == (0.25 if level <= 0.5 else 1.0) for level, middle in levels[0.5])
    assert all(middle == (0.25 if level == 0.0 else 1.0) for level, middle in levels[0.0])
    assert pipe.noise_level(pipe.scheduler.config.num_train_timesteps - 1) == 1.0


def test_the_middle_shares_noise_levels_are_a_pipeline_default(pair, tmp_path, capsys):
    from diffusion.pipeline import MitosisPipeline
    from diffusion.sample import main as sample_main
    from mitosis_ldm.config import load_config
    from mitosis_ldm.errors import UserError

    from diffusion.train import DiffusionTrainConfig, check_config

    strong, _, _ = pair
    pipe = MitosisPipeline.from_pretrained(strong)
    assert pipe.default_null_guidance_middle_below == 1.0  # older folders: eased at every noise level
    pipe.info.update(default_null_guidance=1.5, default_null_guidance_middle=0.2,
                     default_null_guidance_middle_below=0.5)
    stored = tmp_path / "stored"
    pipe.save_pretrained(stored)
    common = ["--pipeline", str(stored), "--seeds", "3", "--conditions", "0,0.5,1", "--steps", "6"]
    sample_main([*common, "--out", str(tmp_path / "default")])
    sample_main([*common, "--null-guidance-middle-below", "1", "--out", str(tmp_path / "every")])
    sample_main([*common, "--null-guidance-middle", "1", "--out", str(tmp_path / "flat")])
    printed = capsys.readouterr().out
    assert "(0.2 of it at y = 0.5, at t/T <= 0.5)" in printed
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["null_guidance_middle_below"] == 0.5 and manifest["null_guidance_middle"] == 0.2
    assert json.loads((tmp_path / "every" / "manifest.json").read_text())["null_guidance_middle_below"] == 1.0
    default, every, flat = (np.load(tmp_path / name / "frames.npy") for name in ("default", "every", "flat"))
    # y = 0 and 1 take the whole term whatever the noise level; at y = 0.5 the three schedules differ
    assert np.array_equal(default[0, [0, 2]], every[0, [0, 2]]) and np.array_equal(default[0, [0, 2]], flat[0, [0, 2]])
    assert not np.array_equal(default[0, 1], every[0, 1]) and not np.array_equal(default[0, 1], flat[0, 1])
    out = tmp_path / "bad"
    for value in ("1.5", "-0.1", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            sample_main([*common, "--null-guidance-middle-below", value, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and "--null-guidance-middle-below" in err[0]
        assert not out.exists()
    with pytest.raises(UserError, match=r"sample\.null_guidance_middle_below"):
        check_config(load_config(DiffusionTrainConfig, None, ["sample.null_guidance_middle_below=2"]))
    pipe.info["default_null_guidance_middle_below"] = -1
    pipe.save_pretrained(tmp_path / "bad-folder")
    with pytest.raises(UserError, match="default_null_guidance_middle_below"):
        MitosisPipeline.from_pretrained(tmp_path / "bad-folder")
