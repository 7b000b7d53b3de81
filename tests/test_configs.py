"""Every shipped recipe (configs/demo, configs/full) loads into its stage's config and passes that stage's checks.

A renamed key or an out-of-range value in a recipe would otherwise surface only minutes into `make demo` or a
GPU run.
"""

from __future__ import annotations

import pytest

from conftest import REPO
from mitosis_ldm.config import ConfigError, load_config

PROFILES = ["demo", "full"]


def config_class(name: str):
    from autoencoder.train import AutoencoderConfig
    from classifier.train import ClassifierConfig
    from diffusion.train import DiffusionTrainConfig
    from patches.extract import ExtractConfig
    from report.build import ReportConfig

    return {"autoencoder": AutoencoderConfig, "classifier": ClassifierConfig, "diffusion": DiffusionTrainConfig,
            "data": ExtractConfig, "report": ReportConfig}[name]


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_ships_every_stage(profile):
    assert sorted(p.stem for p in (REPO / "configs" / profile).glob("*.yaml")) == \
        ["autoencoder", "classifier", "data", "diffusion", "report"]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("stage", ["autoencoder", "classifier", "data", "diffusion", "report"])
def test_shipped_recipe_loads(profile, stage):
    cfg = load_config(config_class(stage), REPO / "configs" / profile / f"{stage}.yaml")
    if stage == "diffusion":
        from diffusion.train import check_config

        check_config(cfg)
        # the demo's transitions default to autoguidance: its guide is the training run's own snapshot
        if profile == "demo":
            assert cfg.sample.guide == "weak" and 0 < cfg.sample.guide_snapshot_step < cfg.train.max_steps


def test_a_misspelt_key_in_a_recipe_is_named(tmp_path):
    text = (REPO / "configs" / "demo" / "diffusion.yaml").read_text().replace("guide_snapshot_step:", "guide_snapshot:")
    path = tmp_path / "diffusion.yaml"
    path.write_text(text)
    from diffusion.train import DiffusionTrainConfig

    with pytest.raises(ConfigError, match=r"diffusion\.yaml: unknown key 'sample\.guide_snapshot'"):
        load_config(DiffusionTrainConfig, path)
