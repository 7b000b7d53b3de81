"""The typed config loader itself: what a recipe or a `--set` may hold, and the one-line error for what it may not.

Every refusal here was once a plausible slip in mitosis_ldm/config.py that the recipe tests let through: a value of
the wrong type taken silently (a bool as a learning rate, 0/1 as a switch, a number as a folder), a traceback
instead of a line naming the key, or an override that lost part of its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from mitosis_ldm.config import ConfigError, load_config, save_config


@dataclass
class Augment:
    blur: float = 0.0


@dataclass
class Section:
    datasets: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    betas: tuple[float, float] = (0.9, 0.999)
    lr: float = 1e-4
    steps: int = 10
    flip: bool = True
    kwargs: dict = field(default_factory=dict)
    label_map: dict[str, float] = field(default_factory=dict)
    augment: Augment = field(default_factory=Augment)


@dataclass
class Recipe:
    out: str = "runs/x"
    cache: str | None = None
    mode: Literal["mean", "sample"] = "mean"
    data: Section = field(default_factory=Section)


@pytest.mark.parametrize("override, message", [
    ("data.lr=true", "key 'data.lr' must be a number, got True"),
    ("data.lr=no", "key 'data.lr' must be a number, got False"),
    ("data.steps=yes", "key 'data.steps' must be an integer, got True"),
    ("data.steps=3.0", "key 'data.steps' must be an integer, got 3.0"),
    ("data.steps='3'", "key 'data.steps' must be an integer, got '3'"),
    ("data.flip=1", "key 'data.flip' must be true or false, got 1"),
    ("data.flip=0", "key 'data.flip' must be true or false, got 0"),
    ("data.flip='false'", "key 'data.flip' must be true or false, got 'false'"),  # quoted: text, never True
    ("out=3", "key 'out' must be a string, got 3"),
    ("out=", "key 'out' must be a string, got None"),
    ("data.datasets=[a, 3]", "key 'data.datasets[1]' must be a string, got 3"),
    ("data.seeds=[0, x]", "key 'data.seeds[1]' must be an integer, got 'x'"),
    ("data.kwargs=[1, 2]", "key 'data.kwargs' must be a mapping, got [1, 2]"),  # was "must be dict"
    ("data.datasets=x", "key 'data.datasets' must be a list of strings, got 'x'"),  # was "a list of str"
    ("data.seeds=3", "key 'data.seeds' must be a list of integers, got 3"),
    ("data.betas=x", "key 'data.betas' must be a list of numbers, got 'x'"),
    ("data.label_map=[a, b]", "key 'data.label_map' must be a mapping, got ['a', 'b']"),
    ("data=5", "key 'data' must be a mapping"),
    ("mode=median", "key 'mode' must be one of 'mean', 'sample', got 'median'"),
    ("cache=3", "key 'cache' must be a string or null, got 3"),  # was "str or NoneType"
    ("cache=[a]", "key 'cache' must be a string or null, got ['a']"),
    ("data.steps.x=1", "key 'data.steps' must be an integer, got {'x': 1}"),
    ("data.augment.blur=x", "key 'data.augment.blur' must be a number, got 'x'"),
    ("data.augment.blurr=1", "unknown key 'data.augment.blurr' (known here: blur)"),
])
def test_a_set_value_of_the_wrong_type_is_one_error_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, None, [override])
    assert str(err.value) == f"--set: {message}", str(err.value)


def test_a_recipe_value_of_the_wrong_type_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  flip: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'data.flip' must be true or false, got 1$"):
        load_config(Recipe, path)
    path.write_text("data: 5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'data' must be a mapping$"):
        load_config(Recipe, path)


def test_a_set_value_keeps_every_character_after_the_first_equals_sign():
    cfg = load_config(Recipe, None, ["out=runs/a=b", "cache=@scratch/[c", "data.datasets=[x=1, y]"])
    assert cfg.out == "runs/a=b"            # only the first '=' splits key from value
    assert cfg.cache == "@scratch/[c"       # text YAML cannot read is taken as it stands
    assert cfg.data.datasets == ["x=1", "y"]


def test_types_are_kept_ints_as_floats_and_lists_as_tuples_where_declared():
    cfg = load_config(Recipe, None, ["data.lr=3", "data.betas=[0, 1]", "data.seeds=[4, 5]", "data.flip=false"])
    assert cfg.data.lr == 3.0 and type(cfg.data.lr) is float
    assert cfg.data.betas == (0.0, 1.0) and type(cfg.data.betas) is tuple
    assert cfg.data.seeds == [4, 5] and cfg.data.flip is False


def test_set_is_applied_after_the_recipe_and_the_last_set_wins(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("out: from-yaml\ndata:\n  steps: 5\n  lr: 0.5\n")
    cfg = load_config(Recipe, path, ["data.steps=7", "data.steps=8"])
    assert (cfg.out, cfg.data.steps, cfg.data.lr) == ("from-yaml", 8, 0.5)


@pytest.mark.parametrize("text", ["", "# every line commented out\n", "---\n"])
def test_an_empty_recipe_gives_the_defaults(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert load_config(Recipe, path) == Recipe()


def test_a_section_whose_keys_are_all_commented_out_keeps_its_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("out: kept\ndata:\n  # lr: 0.5\n  augment:\n    # blur: 1.0\n")
    assert load_config(Recipe, path) == Recipe(out="kept")  # `data:` with nothing under it reads as null
    assert load_config(Recipe, path, ["data.lr=0.5"]).data.lr == 0.5


def test_null_clears_an_optional_key_and_the_saved_config_loads_back(tmp_path):
    cfg = load_config(Recipe, None, ["cache=runs/c", "cache=null", "data.datasets=[a]"])
    assert cfg.cache is None
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Recipe, tmp_path / "config.yaml") == cfg
    from diffusion.train import DiffusionTrainConfig

    default = load_config(DiffusionTrainConfig)
    save_config(default, tmp_path / "diffusion.yaml")  # its data.cache and data.vae are null
    assert load_config(DiffusionTrainConfig, tmp_path / "diffusion.yaml") == default


def test_a_missing_file_a_folder_and_a_list_at_the_top_are_one_line_each(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/nope.yaml: config file not found$"):
        load_config(Recipe, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: is a folder, expected a YAML file$"):
        load_config(Recipe, tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text("- out: x\n")
    with pytest.raises(ConfigError, match=rf"^{path}: top level must be a mapping of keys, got list$"):
        load_config(Recipe, path)


def test_a_renamed_key_names_its_new_name_only_where_it_was_renamed():
    from classifier.train import ClassifierConfig

    renamed = r"^--set: key 'ensemble.warmup_steps' was renamed: use train.lr_warmup_steps$"
    with pytest.raises(ConfigError, match=renamed):
        load_config(ClassifierConfig, None, ["ensemble.warmup_steps=5"])
    # the same leaf name elsewhere is simply unknown, not "renamed"
    with pytest.raises(ConfigError, match=r"^--set: unknown key 'data.schedule' \(known here: "):
        load_config(ClassifierConfig, None, ["data.schedule=1"])


def test_a_set_without_equals_and_spaces_around_the_key():
    with pytest.raises(ConfigError, match=r"^--set data\.steps: expected key=value$"):
        load_config(Recipe, None, ["data.steps"])
    assert load_config(Recipe, None, [" data.steps = 4"]).data.steps == 4


def test_malformed_or_non_utf8_yaml_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  datasets: [a,\n  steps: 3\nout: x: y\n")
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, path)
    assert str(err.value).startswith(f"{path}: malformed YAML: ") and "\n" not in str(err.value), str(err.value)
    assert "line 4, column 4" in str(err.value), str(err.value)  # where the parser gave up
    path.write_bytes(b"out: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{path}: malformed YAML: not UTF-8 text \(byte 8\)$"):
        load_config(Recipe, path)


def test_a_recipe_cannot_construct_python_objects(tmp_path):
    # the recipe is read with yaml's safe loader: a python tag is malformed YAML, never a call
    path = tmp_path / "r.yaml"
    marker = tmp_path / "ran"
    path.write_text(f"out: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(ConfigError, match=rf"^{path}: malformed YAML: .*python/object/apply:os.mkdir"):
        load_config(Recipe, path)
    tagged = f"!!python/object/apply:os.mkdir ['{marker}']"
    assert load_config(Recipe, None, [f"out={tagged}"]).out == tagged  # --set too: taken as text
    assert not marker.exists()
