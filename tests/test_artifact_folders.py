"""Recognising artifact folders and loading their models strictly (mitosis_ldm/artifacts.py): markers of another
format, run folders, weights that do not match their config, pickled weights, and config sizes no model has."""

from __future__ import annotations

import json
import shutil

import pytest

import tiny_artifacts
from mitosis_ldm import artifacts
from mitosis_ldm.errors import UserError


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    return tiny_artifacts.autoencoder(tmp_path_factory.mktemp("artifacts") / "autoencoder")


@pytest.mark.parametrize("kind", [artifacts.PATCHES, artifacts.PIPELINE, artifacts.LATENTS, artifacts.TRANSITIONS])
def test_a_marker_file_of_another_format_is_not_that_artifact(tmp_path, kind):
    marker = tmp_path / artifacts.MARKER_FILE[kind]
    marker.write_text(json.dumps({"format": "another-tool/thing"}))  # a manifest.json any tool might write
    assert artifacts.artifact_kind(tmp_path) is None
    with pytest.raises(UserError, match=f"is not {artifacts.DESCRIPTION[kind]} \\(--in\\); its marker file "
                                        f"{artifacts.MARKER_FILE[kind]} is missing or unreadable"):
        artifacts.expect_artifact(tmp_path, kind, "--in")


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_run_folders_model_is_verified_like_the_model_folder(tmp_path):
    model = tiny_artifacts.classifier(tmp_path / "run" / "model")
    assert artifacts.expect_artifact(tmp_path / "run", artifacts.CLASSIFIER, "--classifier") == model
    weights = model / "member-0.safetensors"
    flip_last_byte(weights)  # same size: the hash recorded at export tells
    for given in (model, tmp_path / "run"):
        with pytest.raises(UserError, match=f"{weights}: content differs from the sha256 recorded at export"):
            artifacts.expect_artifact(given, artifacts.CLASSIFIER, "--classifier")


def edit_tensors(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def renamed(tensors):
    tensors["decoder.conv_out.weightX"] = tensors.pop("decoder.conv_out.weight")  # a flipped byte in a name


def extra(tensors):
    tensors["extra.weight"] = tensors["decoder.conv_out.weight"].clone()


@pytest.mark.parametrize("edit, words", [(renamed, "missing keys: ['decoder.conv_out.weight']"),
                                         (extra, "unexpected keys: ['extra.weight']")])
def test_weights_that_do_not_match_the_config_are_refused(autoencoder, tmp_path, edit, words):
    from diffusers import AutoencoderKL

    folder = shutil.copytree(autoencoder, tmp_path / "vae")
    edit_tensors(folder, edit)
    with pytest.raises(UserError) as err:  # diffusers itself would load at random, or skip, with a warning
        artifacts.load_part(folder, "the autoencoder", artifacts.strict_loader(AutoencoderKL))
    assert str(err.value) == f"{folder}: weights do not match config.json ({words})"


def test_pickled_weights_are_never_loaded(tmp_path):
    from diffusers import AutoencoderKL

    folder = tmp_path / "vae"
    tiny_artifacts._vae().save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(UserError, match="the autoencoder cannot be loaded .*diffusion_pytorch_model.safetensors"):
        artifacts.load_part(folder, "the autoencoder", artifacts.strict_loader(AutoencoderKL))


@pytest.mark.parametrize("field, value, words", [
    ("layers_per_block", artifacts.MAX_LAYERS + 1, f"at most {artifacts.MAX_LAYERS}"),
    ("transformer_layers_per_block", 1000, f"at most {artifacts.MAX_LAYERS}"),
    ("block_out_channels", [8, -(10 ** 12)], f"at most {artifacts.MAX_CONFIG_INT}"),
    ("block_out_channels", [8] * (artifacts.MAX_LIST + 1), f"lists {artifacts.MAX_LIST + 1} entries"),
])
def test_config_sizes_no_model_has_are_refused_before_building(tmp_path, field, value, words):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", field: value}))
    with pytest.raises(UserError, match=f"config.json: field '{field}' .*{words}"):
        artifacts.check_config_sizes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"layers_per_block": artifacts.MAX_LAYERS,
                                                      "block_out_channels": [8] * artifacts.MAX_LIST}))
    artifacts.check_config_sizes(tmp_path)  # the limits themselves are allowed


@pytest.mark.parametrize("config, bad", [({"scaling_factor": None}, "scaling_factor"),
                                         ({"scaling_factor": float("inf")}, "scaling_factor"),
                                         ({"scaling_factor": 1.0, "shift_factor": float("nan")}, "shift_factor"),
                                         ({"scaling_factor": 1.0, "shift_factor": True}, "shift_factor")])
def test_latent_scale_and_shift_must_be_finite_numbers(tmp_path, config, bad):
    with pytest.raises(UserError, match=f"field '{bad}' must be a finite number"):
        artifacts.check_latent_scale(tmp_path, config)
    artifacts.check_latent_scale(tmp_path, {"scaling_factor": 0.18, "shift_factor": None})
    artifacts.check_latent_scale(tmp_path, {"scaling_factor": 2, "shift_factor": -0.5})
