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
    if stage in ("autoencoder", "classifier", "diffusion"):
        from mitosis_ldm.training import check_train_config

        check_train_config(cfg.train)
    if stage in ("autoencoder", "classifier"):
        import importlib

        importlib.import_module(f"{stage}.train").check_config(cfg)
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


def test_the_long_recipes_train_sections_pass_the_check():
    from mitosis_ldm.training import check_train_config

    recipes = sorted((REPO / "configs" / "long").glob("*.yaml"))
    assert recipes
    for path in recipes:
        check_train_config(load_config(config_class(path.stem), path).train)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "--set: key 'train.batch_size' must be an integer >= 1, got 0"),
    ("train.max_steps=0", "--set: key 'train.max_steps' must be an integer >= 1, got 0"),  # trained nothing, exported
    ("train.lr=0", "--set: key 'train.lr' must be a finite number > 0, got 0.0"),  # trained nothing, silently
    ("train.max_steps=2.5", None),  # the loader's own type check
    ("train.lr=-1", "--set: key 'train.lr' must be a finite number > 0, got -1.0"),
    ("train.lr=.nan", "--set: key 'train.lr' must be a finite number > 0, got nan"),
    ("train.ema_decay=1.5", "--set: key 'train.ema_decay' must be in [0, 1) (0: no EMA), got 1.5"),
    ("train.ema_decay=1", "--set: key 'train.ema_decay' must be in [0, 1) (0: no EMA), got 1.0"),
    ("train.lr_warmup_steps=-5", "--set: key 'train.lr_warmup_steps' must be an integer >= 0, got -5"),
    ("train.lr_schedule=bogus", "--set: key 'train.lr_schedule' must be one of linear, cosine"),
    ("train.mixed_precision=fp8", "--set: key 'train.mixed_precision' must be one of no, fp16, bf16, got 'fp8'"),
    ("train.adam_betas=[1.5,0.9]", "--set: key 'train.adam_betas' must be two numbers in [0, 1), got (1.5, 0.9)"),
    ("train.weight_decay=-1", "--set: key 'train.weight_decay' must be >= 0, got -1.0"),
    ("train.seed=-1", "--set: key 'train.seed' must be an integer >= 0, got -1"),
])
def test_a_train_value_no_stage_can_run_with_is_one_line_before_anything_is_built(tmp_path, capsys, override,
                                                                                  message):
    # these were tracebacks from torch's DataLoader or AdamW, from diffusers' scheduler lookup, or (ema_decay 1.5,
    # a negative warm-up) a run that trained on silently
    from classifier.train import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(REPO / "configs/demo/classifier.yaml"), "--set", override, "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert lines[0].startswith(f"error: {message}" if message else "error: --set: key 'train.max_steps'"), lines
    assert not out.exists()


def test_the_train_check_names_the_recipe_file_for_a_value_it_holds(tmp_path):
    from mitosis_ldm.errors import UserError
    from mitosis_ldm.training import load_stage_config, train_arg_parser

    from classifier.train import ClassifierConfig

    path = tmp_path / "classifier.yaml"
    path.write_text((REPO / "configs/demo/classifier.yaml").read_text().replace("batch_size: 64", "batch_size: 0"))
    args = train_arg_parser("x").parse_args(["--config", str(path)])
    with pytest.raises(UserError, match=rf"^{path}: key 'train.batch_size' must be an integer >= 1, got 0$"):
        load_stage_config(ClassifierConfig, args)


def test_the_out_flag_beats_the_recipe_and_a_set_out(tmp_path):
    from mitosis_ldm.training import load_stage_config, train_arg_parser

    from classifier.train import ClassifierConfig

    args = train_arg_parser("x").parse_args(["--config", str(REPO / "configs/demo/classifier.yaml"),
                                             "--set", f"out={tmp_path / 'set'}", "--out", str(tmp_path / "flag")])
    assert load_stage_config(ClassifierConfig, args).out == str(tmp_path / "flag")


def stage_check(stage: str):
    import importlib

    return importlib.import_module(f"{stage}.train").check_config


@pytest.mark.parametrize("stage, override, message", [
    ("autoencoder", "data.crop=30", "data.crop: must be 0 (whole patches) or a positive multiple of 4"),
    ("autoencoder", "data.crop=-4", "data.crop: must be 0 (whole patches) or a positive multiple of 4"),
    ("autoencoder", "data.scale_patches=0", "data.scale_patches: must be >= 1, got 0"),
    ("autoencoder", "data.stain_jitter=-1", "data.stain_jitter: must be a finite number >= 0 (0: off), got -1.0"),
    ("autoencoder", "model.preset=huge", "model.preset: unknown autoencoder preset 'huge' (known: tiny, base)"),
    ("autoencoder", "model.latent_channels=0", "model.latent_channels: must be >= 1, got 0"),
    ("autoencoder", "loss.l1=-1", "loss.l1: must be a finite weight >= 0, got -1.0"),
    ("autoencoder", "loss.kl=.nan", "loss.kl: must be a finite weight >= 0, got nan"),
    ("autoencoder", "loss.gan=-1", "loss.gan: must be a finite weight >= 0, got -1.0"),
    ("autoencoder", "loss.gan_start=-1", "loss.gan_start: must be >= 0 (the step the discriminator joins), got -1"),
    ("autoencoder", "loss.disc_layers=-1", "loss.disc_layers: must be >= 0, got -1"),
    ("autoencoder", "loss.disc_channels=6", "loss.disc_channels: must be a positive multiple of 4"),
    ("autoencoder", "loss.disc_channels=0", "loss.disc_channels: must be a positive multiple of 4"),
    ("classifier", "ensemble.eval_every=0", "ensemble.eval_every: must be >= 1, got 0"),
    ("classifier", "ensemble.patience=0", "ensemble.patience: must be >= 1, got 0"),
    ("classifier", "model.upsample=0", "model.upsample: must be an integer in [1, 16], got 0"),
    ("classifier", "data.augment.blur=-1", "data.augment.blur: must be a finite number >= 0 (0: off), got -1.0"),
    ("classifier", "data.augment.crop=-3", "data.augment.crop: must be >= 0 (0: the whole patch), got -3"),
    ("diffusion", "data.cache_mode=median", "data.cache_mode: must be mean or sample, got 'median'"),
    ("diffusion", "data.balance_bins=0", "data.balance_bins: must be >= 1, got 0"),
    ("diffusion", "data.label_jitter=-0.1", "data.label_jitter: must be a finite number >= 0, got -0.1"),
    ("diffusion", "diffusion.min_snr_gamma=-1", "diffusion.min_snr_gamma: must be a finite number >= 0 (0 disables)"),
    ("diffusion", "diffusion.beta_schedule=bogus", "diffusion.beta_schedule: diffusers' DDPMScheduler has no schedule"),
    ("diffusion", "diffusion.num_train_timesteps=0", "diffusion.num_train_timesteps: must be >= 2, got 0"),
    ("diffusion", "diffusion.num_train_timesteps=1", "diffusion.num_train_timesteps: must be >= 2, got 1"),
    ("diffusion", "diffusion.cond_dropout=1.5", "diffusion.cond_dropout: must be in [0, 1], got 1.5"),
    ("diffusion", "data.label_mode=fuzzy", "data.label_mode: must be soft, binned or hard, got 'fuzzy'"),
    ("diffusion", "data.splits=[train,holdout]", "data.splits: unknown split 'holdout' (train, val, test)"),
    ("diffusion", "data.label_jitter=.inf", "data.label_jitter: must be a finite number >= 0, got inf"),
    ("diffusion", "data.unlabelled_weight=-1", "data.unlabelled_weight: must be a finite number >= 0, got -1.0"),
    ("diffusion", "sample.real2gen_strength=0", "sample.real2gen_strength: must be in (0, 1], got 0"),
    ("diffusion", "preview.every=-1", "preview.every: must be >= 0 (0: no previews), got -1"),
    ("diffusion", "preview.conditions=0", "preview: needs conditions >= 1 and one or more seeds >= 0"),
    ("diffusion", "preview.seeds=[]", "preview: needs conditions >= 1 and one or more seeds >= 0"),
])
def test_a_stage_value_it_cannot_train_with_is_named(stage, override, message):
    # each of these was a traceback, a run that trained on nonsense (negative loss weights, NaN), a run that failed
    # minutes in (a preview with no conditions) or a classifier folder its own loader refuses (upsample 0)
    from mitosis_ldm.errors import UserError

    cfg = load_config(config_class(stage), REPO / "configs" / "demo" / f"{stage}.yaml", [override])
    with pytest.raises(UserError) as error:
        stage_check(stage)(cfg)
    assert str(error.value).startswith(message), str(error.value)


def test_the_autoencoder_entry_point_checks_before_writing(tmp_path, capsys):
    from autoencoder.train import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(REPO / "configs/demo/autoencoder.yaml"), "--set", "loss.ssim=-1", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines == ["error: loss.ssim: must be a finite weight >= 0, got -1.0"], lines
    assert not out.exists()
