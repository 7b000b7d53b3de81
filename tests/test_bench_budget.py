"""bench/demo_budget.py: the demo recipe's training cost, read from the demo configs and counted per step."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, load_bench


@pytest.fixture(scope="module")
def budget():
    return load_bench("demo_budget")


def test_a_training_step_counts_forward_and_backward(budget):
    from torch.utils.flop_counter import FlopCounterMode

    step, steps, batch, _, repeats = budget.diffusion_stage()
    model_flops = budget.step_flops(step)
    # a fresh model of the same recipe, forward alone: backward costs about twice the forward
    channels, size = budget.demo_latent_shape()
    latents = torch.randn(batch, channels, size, size)
    from diffusion.model import Denoiser, build_models
    from diffusion.train import DiffusionTrainConfig
    from mitosis_ldm.config import load_config

    cfg = load_config(DiffusionTrainConfig, REPO / "configs/demo/diffusion.yaml")
    model = Denoiser(*build_models(cfg.model, channels, size))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(latents, torch.zeros(batch, dtype=torch.long), torch.rand(batch))
    assert 2.5 < model_flops / counter.get_total_flops() < 3.5
    assert (steps, batch, repeats) == (cfg.train.max_steps, cfg.train.batch_size, 1)


def test_projection_reads_the_recipe_and_adds_up(budget, tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "matmul_rate", lambda seconds=2.0: 1e11)
    timings = tmp_path / "demo_timings.json"
    timings.write_text(json.dumps({"stage_seconds": {"data": 40.0, "autoencoder": 900.0, "report": 50.0}}))
    out = budget.main(["--steps", "1", "--threads", "1", "--timings", str(timings), "--budget", "600",
                       "--out", str(tmp_path / "budget.json")])
    assert json.loads((tmp_path / "budget.json").read_text()) == out
    from autoencoder.train import AutoencoderConfig
    from classifier.train import ClassifierConfig
    from mitosis_ldm.config import load_config

    stages = out["stages"]
    classifier = load_config(ClassifierConfig, REPO / "configs/demo/classifier.yaml")
    assert stages["classifier"]["steps"] == classifier.train.max_steps * classifier.ensemble.members > 0
    assert stages["autoencoder"]["steps"] == load_config(AutoencoderConfig, REPO / "configs/demo/autoencoder.yaml"
                                                         ).train.max_steps
    for stage in stages.values():
        assert stage["projected_s"] == pytest.approx(stage["steps"] * stage["s_per_step"], rel=1e-3, abs=0.1)
        assert stage["floor_s"] == pytest.approx(stage["steps"] * stage["gflop_per_step"] * 1e9 / 1e11, rel=1e-2)
    assert stages["autoencoder"]["measured_demo_s"] == 900.0 and "measured_demo_s" not in stages["classifier"]
    assert out["other_stages_measured_s"] == {"data": 40.0, "report": 50.0}
    assert out["training_over_budget"] == pytest.approx(out["training_projected_s"] / 600, abs=0.01)
