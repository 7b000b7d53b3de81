"""Recognising artifact folders and loading their models strictly (mitosis_ldm/artifacts.py): markers of another
format, run folders, weights that do not match their config, pickled weights, and config sizes no model has."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import tiny_artifacts
from mitosis_ldm import artifacts, integrity
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


def test_a_run_folders_model_is_verified_like_the_model_folder(tmp_path):
    model = tiny_artifacts.classifier(tmp_path / "run" / "model")
    assert artifacts.expect_artifact(tmp_path / "run", artifacts.CLASSIFIER, "--classifier") == model
    weights = model / "member-0.safetensors"
    tiny_artifacts.flip_byte(weights)  # same size: the hash recorded at export tells
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
    # built, then failed at the first forward pass as a RuntimeError ("Expected num groups to be greater than 0")
    ("norm_num_groups", -1, "no model this tool builds has a negative norm_num_groups"),
    ("block_out_channels", [8, -8], "no model this tool builds has a negative block_out_channels"),
])
def test_config_sizes_no_model_has_are_refused_before_building(tmp_path, field, value, words):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", field: value}))
    with pytest.raises(UserError, match=f"config.json: field '{field}' .*{words}"):
        artifacts.check_config_sizes(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"layers_per_block": artifacts.MAX_LAYERS,
                                                      "block_out_channels": [8] * artifacts.MAX_LIST}))
    artifacts.check_config_sizes(tmp_path)  # the limits themselves are allowed


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return tiny_artifacts.pipeline(tmp_path_factory.mktemp("artifacts") / "pipeline")


@pytest.mark.parametrize("part", ["vae/config.json", "unet/config.json", "label_embedder/config.json",
                                  "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("content", ['"stabilityai/sd-vae-ft-mse"', "3", "[1, 2]"])
def test_a_config_that_is_not_a_json_object_is_refused_without_asking_the_hub(
        pipeline, tmp_path, monkeypatch, part, content):
    """diffusers reads a config that is a JSON string (or number) as a model name, and goes to the Hugging Face
    hub for it, retrying for about 20 s, before it fails."""
    import socket

    from diffusion.pipeline import MitosisPipeline

    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline, folder)
    (folder / integrity.MANIFEST).unlink()  # the damage must reach the parser, not the recorded hashes
    (folder / part).write_text(content)
    lookups = []

    def no_network(*args, **kwargs):
        lookups.append(args[0])
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(UserError) as caught:
        MitosisPipeline.from_pretrained(folder)
    kind = {'"': "string", "3": "number", "[": "array"}[content[0]]
    assert str(caught.value) == f"{folder / part}: holds a JSON {kind}, not an object of settings"
    assert lookups == []


@pytest.mark.parametrize("fields", [{"trained_betas": 1e308}, {"trained_betas": [0.01, 0.02, 0.03]},
                                    {"beta_schedule": "linear", "beta_end": 5.0}, {"beta_start": -0.5}])
def test_a_noise_schedule_that_is_not_one_is_refused_before_sampling(pipeline, tmp_path, fields):
    from diffusion.pipeline import MitosisPipeline

    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline, folder)
    (folder / integrity.MANIFEST).unlink()
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    n = json.loads(path.read_text())["num_train_timesteps"]
    with pytest.raises(UserError, match=f"^{path}: its noise schedule is not {n} levels in \\(0, 1\\]"):
        MitosisPipeline.from_pretrained(folder)


@pytest.mark.parametrize("field, value, want", [
    ("clip_sample_range", "nan", "a finite number of at most 1e+06"),  # was a TypeError at the first step
    ("clip_sample_range", 1e308, "a finite number of at most 1e+06"),  # was a RuntimeError (float overflow)
    ("clip_sample", "yes", "true or false"),
    ("steps_offset", 1.5, "a whole number of at most 1e+06"),
    ("num_train_timesteps", 10 ** 9, "a whole number of at most 1e+06"),
    ("timestep_spacing", 3, "a string"),
])
def test_a_scheduler_field_of_the_wrong_type_is_refused_at_load(pipeline, tmp_path, field, value, want):
    from diffusion.pipeline import MitosisPipeline

    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline, folder)
    (folder / integrity.MANIFEST).unlink()
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(UserError, match=f"^{path}: field '{field}' must be {re.escape(want)}, got "):
        MitosisPipeline.from_pretrained(folder)


@pytest.fixture
def library_log():
    """What reaches the diffusers logger's own handlers (a user's terminal)."""
    import logging

    seen: list[str] = []

    class Record(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, handler = logging.getLogger("diffusers"), Record()
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


@pytest.mark.parametrize("damage", ["weights file deleted", "weight renamed", "a later part fails"])
def test_a_part_that_fails_to_load_is_the_one_error_line_and_nothing_from_the_library(
        pipeline, tmp_path, library_log, damage):
    from safetensors.torch import load_file, save_file

    from diffusion.pipeline import MitosisPipeline

    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline, folder)
    (folder / integrity.MANIFEST).unlink()
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    if damage == "weights file deleted":
        weights.unlink()
    elif damage == "a later part fails":  # the VAE loads, with a warning of a field it ignores; the UNet fails
        config = json.loads((folder / "vae" / "config.json").read_text())
        (folder / "vae" / "config.json").write_text(json.dumps({**config, "unknown": 1}))
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    else:
        tensors = load_file(weights)
        name = sorted(tensors)[0]
        tensors["x" + name] = tensors.pop(name)
        save_file(tensors, weights)
    with pytest.raises(UserError, match=f"{folder / ('unet' if damage == 'a later part fails' else 'vae')}"):
        MitosisPipeline.from_pretrained(folder)
    assert library_log == []  # diffusers logged the same damage before it raised, a second line for the user


def test_what_the_library_logs_while_a_part_loads_still_shows_when_it_loads(pipeline, tmp_path, library_log):
    from diffusion.pipeline import MitosisPipeline

    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline, folder)
    (folder / integrity.MANIFEST).unlink()
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "stepr_offset": 0}))
    MitosisPipeline.from_pretrained(folder)
    assert any("stepr_offset" in line and "will be ignored" in line for line in library_log), library_log


@pytest.mark.parametrize("config, bad", [({"scaling_factor": None}, "scaling_factor"),
                                         ({"scaling_factor": float("inf")}, "scaling_factor"),
                                         ({"scaling_factor": 1.0, "shift_factor": float("nan")}, "shift_factor"),
                                         ({"scaling_factor": 1.0, "shift_factor": True}, "shift_factor")])
def test_latent_scale_and_shift_must_be_finite_numbers(tmp_path, config, bad):
    with pytest.raises(UserError, match=f"field '{bad}' must be a finite number"):
        artifacts.check_latent_scale(tmp_path, config)
    artifacts.check_latent_scale(tmp_path, {"scaling_factor": 0.18, "shift_factor": None})
    artifacts.check_latent_scale(tmp_path, {"scaling_factor": 2, "shift_factor": -0.5})


# -- transitions -----------------------------------------------------------

def frames(seeds: int = 2, columns: int = 3):
    return np.random.default_rng(0).integers(0, 256, (seeds, columns, 8, 8, 3), dtype=np.uint8)


def rewrite_manifest(folder, **fields):
    """Edit manifest.json and record the folder again, as if it had been exported so."""
    manifest = {**json.loads((folder / "manifest.json").read_text()), **fields}
    for key in [k for k, v in fields.items() if v is None]:
        del manifest[key]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    integrity.record(folder)


def test_transitions_keep_the_writers_kind_and_input_frame_and_caption_them(tmp_path, monkeypatch):
    from mitosis_ldm import images

    captions = []
    real_strip = images.strip
    monkeypatch.setattr(images, "strip", lambda f, c: captions.append(c) or real_strip(f, c))
    plain = artifacts.write_transitions(tmp_path / "t", frames(), {"seeds": [4, 9], "conditions": [0.0, 0.5, 1.0]})
    r2g = artifacts.write_transitions(tmp_path / "r", frames(1, 3), {"seeds": [3], "conditions": [0.3, 0.0, 1.0],
                                                                     "kind": "real2gen", "has_input_frame": True})
    assert captions == [["y=0.00", "y=0.50", "y=1.00"]] * 2 + [["input", "y=0.00", "y=1.00"]]
    t, r = artifacts.read_transitions(plain), artifacts.read_transitions(r2g)
    assert (t.manifest["kind"], t.has_input_frame) == ("transition", False)
    assert (r.manifest["kind"], r.has_input_frame) == ("real2gen", True)
    rewrite_manifest(plain, has_input_frame=None)  # a folder written before the field existed
    assert artifacts.read_transitions(plain).has_input_frame is False


def test_each_seed_gets_its_own_strip(tmp_path):
    from PIL import Image

    out = artifacts.write_transitions(tmp_path / "t", frames(), {"seeds": [4, 9], "conditions": [0.0, 0.5, 1.0]})
    four, nine = (np.asarray(Image.open(out / f"strip-{s}.png")) for s in (4, 9))
    assert four.shape == nine.shape and not np.array_equal(four, nine)


def test_write_transitions_replaces_a_folder_only_with_overwrite(tmp_path):
    manifest = {"seeds": [0, 1], "conditions": [0.0, 0.5, 1.0]}
    artifacts.write_transitions(tmp_path / "t", frames(), manifest)
    with pytest.raises(UserError, match="--overwrite"):
        artifacts.write_transitions(tmp_path / "t", frames()[::-1], manifest)
    artifacts.write_transitions(tmp_path / "t", frames()[::-1], manifest, overwrite=True)
    assert np.array_equal(np.asarray(artifacts.read_transitions(tmp_path / "t").frames), frames()[::-1])


@pytest.mark.parametrize("fields, words", [
    ({"conditions": [0.0, 1.5, 1.0]}, "field 'conditions' must be a list of numbers in [0, 1] (or null)"),
    ({"conditions": [0.0, 1.0]}, "field 'seeds'/'conditions' (2 x 2) does not match frames.npy (2, 3)"),
    ({"seeds": [0, 1, 2]}, "field 'seeds'/'conditions' (3 x 3) does not match frames.npy (2, 3)"),
])
def test_a_manifest_that_contradicts_its_frames_is_refused(tmp_path, fields, words):
    folder = artifacts.write_transitions(tmp_path / "t", frames(), {"seeds": [0, 1], "conditions": [0.0, 0.5, 1.0]})
    rewrite_manifest(folder, **fields)
    with pytest.raises(UserError) as err:
        artifacts.read_transitions(folder)
    assert str(err.value) == f"{folder / 'manifest.json'}: {words}"


def test_reading_transitions_checks_the_recorded_hashes(tmp_path):
    folder = artifacts.write_transitions(tmp_path / "t", frames(), {"seeds": [0, 1], "conditions": [0.0, 0.5, 1.0]})
    tiny_artifacts.flip_byte(folder / "frames.npy")  # still a valid array of the same shape
    with pytest.raises(UserError, match="frames.npy: content differs from the sha256 recorded at export"):
        artifacts.read_transitions(folder)


@pytest.mark.parametrize("kind", ["transitions", "dataset"])
@pytest.mark.parametrize("damage", ["an unclosed bracket", "a header that is not a literal", "truncated"])
def test_a_damaged_npy_header_is_one_line_naming_the_file(tmp_path, kind, damage):
    """numpy parses the header as a Python literal; an unclosed bracket there raised tokenize.TokenError, which
    no reader caught."""
    folder = getattr(tiny_artifacts, kind)(tmp_path / kind)
    (folder / integrity.MANIFEST).unlink(missing_ok=True)
    path = folder / ("frames.npy" if kind == "transitions" else "patches.npy")
    data = bytearray(path.read_bytes())
    end = data.index(b"}")
    if damage == "an unclosed bracket":
        data[end:end + 1] = b"("
    elif damage == "a header that is not a literal":
        data[end:end + 1] = b"]"
    else:
        data = data[:end]
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"^{path}: not a readable .npy array"):
        if kind == "transitions":
            artifacts.read_transitions(folder)
        else:
            from patches.dataset import PatchDataset

            PatchDataset(folder)


def test_read_npy_refuses_pickled_objects_and_names_a_missing_file(tmp_path):
    from mitosis_ldm.io import read_npy

    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="objects.npy: not a readable .npy array .*allow_pickle"):
        read_npy(tmp_path / "objects.npy")
    with pytest.raises(UserError, match="absent.npy: file not found"):
        read_npy(tmp_path / "absent.npy")
    np.save(tmp_path / "ok.npy", np.arange(3))
    assert read_npy(tmp_path / "ok.npy", mmap=True).tolist() == [0, 1, 2]
