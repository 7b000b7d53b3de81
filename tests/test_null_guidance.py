"""The null-label term of autoguidance: its push, its easing toward y = 1/2, its noise levels, and its
pipeline defaults (the pair of pipelines comes from test_autoguidance)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_autoguidance import build_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("null"))


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
