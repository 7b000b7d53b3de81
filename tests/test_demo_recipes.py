"""bench/demo_recipes.py: the demo's recipes at a fraction of their training steps, and what a finished run reports."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, load_bench
from test_configs import config_class
from mitosis_ldm.config import load_config


@pytest.fixture(scope="module")
def recipes():
    return load_bench("demo_recipes")


def shipped(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "demo" / f"{name}.yaml").read_text())


def test_every_step_count_scales_and_nothing_else(recipes):
    demo = shipped("diffusion")
    short = recipes.scale_recipe(demo, "diffusion", 0.4)
    assert short["train"]["max_steps"] == round(demo["train"]["max_steps"] * 0.4)
    assert short["train"]["lr_warmup_steps"] == round(demo["train"]["lr_warmup_steps"] * 0.4)
    assert short["sample"]["guide_snapshot_step"] == round(demo["sample"]["guide_snapshot_step"] * 0.4)
    assert short["preview"]["every"] == round(demo["preview"]["every"] * 0.4)
    # the EMA averages over 1 / (1 - decay) steps: that horizon shrinks with the run
    horizon = 1 / (1 - demo["train"]["ema_decay"])
    assert 1 / (1 - short["train"]["ema_decay"]) == pytest.approx(horizon * 0.4, rel=1e-3)
    # learning rate, model, data and sampling settings stay the recipe's
    for section in ("model", "data", "diffusion"):
        assert short[section] == demo[section]
    assert short["train"]["lr"] == demo["train"]["lr"] and short["train"]["batch_size"] == demo["train"]["batch_size"]
    assert {k: v for k, v in short["sample"].items() if k != "guide_snapshot_step"} == \
        {k: v for k, v in demo["sample"].items() if k != "guide_snapshot_step"}
    assert demo == shipped("diffusion")  # the recipe read is not changed in place


def test_scale_one_is_the_demo_recipe(recipes):
    for name in recipes.RECIPES:
        assert recipes.scale_recipe(shipped(name), name, 1.0) == shipped(name)


def test_no_count_falls_to_zero_and_the_classifier_still_evaluates(recipes):
    short = recipes.scale_recipe(shipped("classifier"), "classifier", 0.001)
    assert short["train"]["max_steps"] == 1 and short["ensemble"]["eval_every"] == 1
    assert short["ensemble"]["members"] == shipped("classifier")["ensemble"]["members"]
    with pytest.raises(ValueError, match="scale must be > 0"):
        recipes.scale_recipe(shipped("classifier"), "classifier", 0)


@pytest.mark.parametrize("scale", [0.15, 0.4])
def test_written_recipes_pass_each_stages_checks(recipes, tmp_path, scale):
    steps = recipes.write_recipes(scale, tmp_path)
    for name in recipes.RECIPES:
        cfg = load_config(config_class(name), tmp_path / f"{name}.yaml")
        assert cfg.train.max_steps == steps[name] == round(shipped(name)["train"]["max_steps"] * scale)
    from diffusion.train import check_config

    cfg = load_config(config_class("diffusion"), tmp_path / "diffusion.yaml")
    check_config(cfg)
    assert 0 < cfg.sample.guide_snapshot_step < cfg.train.max_steps


def test_bf16_recipes_train_in_bf16_and_change_nothing_else(recipes, tmp_path):
    recipes.write_recipes(1.0, tmp_path / "fp32")
    recipes.write_recipes(1.0, tmp_path / "bf16", mixed_precision="bf16")
    for name in recipes.RECIPES:
        fp32 = load_config(config_class(name), tmp_path / "fp32" / f"{name}.yaml")
        bf16 = load_config(config_class(name), tmp_path / "bf16" / f"{name}.yaml")
        assert (fp32.train.mixed_precision, bf16.train.mixed_precision) == ("no", "bf16")
        bf16.train.mixed_precision = "no"
        assert bf16 == fp32


def test_half_batch_recipes_halve_every_batch_and_change_nothing_else(recipes, tmp_path):
    recipes.write_recipes(1.0, tmp_path / "whole")
    recipes.write_recipes(1.0, tmp_path / "half", batch_scale=0.5)
    for name in recipes.RECIPES:
        whole = load_config(config_class(name), tmp_path / "whole" / f"{name}.yaml")
        half = load_config(config_class(name), tmp_path / "half" / f"{name}.yaml")
        assert half.train.batch_size == shipped(name)["train"]["batch_size"] // 2 > 0
        assert half.train.max_steps == whole.train.max_steps
        half.train.batch_size = whole.train.batch_size
        assert half == whole
    with pytest.raises(ValueError, match="batch scale must be in"):
        recipes.write_recipes(1.0, tmp_path / "none", batch_scale=0)


def test_a_finished_run_is_read_back_target_by_target(recipes, tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "demo_timings.json").write_text(json.dumps(
        {"stage_seconds": {"data": 14.5, "diffusion": 80.3}, "total_seconds": 94.8, "peak_child_rss_mb": 900}))
    (tmp_path / "report" / "metrics.json").write_text(json.dumps({"targets": {
        "flip_rate": {"value": 0.09375, "target": ">= 0.9", "met": False, "ci": [0.03, 0.17]},
        "memorisation_share": {"value": 0.004, "target": "<= 0.05", "met": True, "ci": None},
        "frechet_ratio_worst_bin": {"value": None, "target": "<= 2.0", "met": None, "ci": None}}}))
    run = recipes.read_run(tmp_path)
    assert run["stage_seconds"] == {"data": 14.5, "diffusion": 80.3} and run["total_seconds"] == 94.8
    assert run["targets"]["flip_rate"] == {"value": 0.0938, "target": ">= 0.9", "met": False}
    assert run["targets"]["frechet_ratio_worst_bin"]["value"] is None
    assert (run["targets_met"], run["targets_total"]) == (1, 3)
