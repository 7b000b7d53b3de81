"""Recorded hashes, `mitosis-ldm check`, the damaged model folders of issue 14, and renamed config keys."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import tiny_artifacts
from mitosis_ldm import integrity
from mitosis_ldm.check import main as check_main
from mitosis_ldm.config import ConfigError, load_config
from mitosis_ldm.errors import UserError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    for kind in ("dataset", "autoencoder", "classifier", "pipeline", "transitions"):
        getattr(tiny_artifacts, kind)(root / kind)
    from diffusion.cache import main as cache_main

    cache_main(["--vae", str(root / "autoencoder"), "--dataset", str(root / "dataset"), "--out", str(root / "latents")])
    return root


def check(capsys, *args):
    try:
        code = check_main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


def copy(world, tmp_path, kind):
    return shutil.copytree(world / kind, tmp_path / kind)


@pytest.mark.slow  # loads and runs every tiny model once
def test_every_export_is_recorded_and_checks_clean(world, capsys):
    folders = [world / k for k in ("dataset", "autoencoder", "classifier", "pipeline", "transitions")]
    for folder in folders:
        record = json.loads((folder / "integrity.json").read_text())
        assert record["format"] == "mitosis-ldm/integrity" and record["files"]
    code, lines, _ = check(capsys, *folders)
    assert code == 0 and len(lines) == 5 and all(line.endswith(")") and ": clean (" in line for line in lines)


def test_flipped_byte_in_safetensors_is_one_line_naming_the_file(world, tmp_path, capsys):
    folder = copy(world, tmp_path, "pipeline")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) - 100] ^= 0x01  # inside a tensor: safetensors itself cannot notice
    weights.write_bytes(bytes(data))
    code, lines, _ = check(capsys, folder)
    assert code == 2 and lines == [f"{weights}: content differs from the sha256 recorded at export (corrupted or "
                                   f"edited)"]


def test_deleted_part_is_one_line_naming_the_part(world, tmp_path, capsys):
    folder = copy(world, tmp_path, "pipeline")
    (folder / "scheduler" / "scheduler_config.json").unlink()
    code, lines, _ = check(capsys, folder)
    assert code == 2 and len(lines) == 1 and "scheduler/scheduler_config.json: missing" in lines[0]


def test_folder_without_hashes_is_a_finding_until_recorded(world, tmp_path, capsys):
    folder = copy(world, tmp_path, "classifier")
    (folder / "integrity.json").unlink()
    code, lines, _ = check(capsys, folder)
    assert code == 2 and len(lines) == 1 and "no recorded hashes" in lines[0]
    code, lines, _ = check(capsys, "--record", folder)
    assert code == 0 and "recorded sha256 of 3 files" in lines[0]
    code, lines, _ = check(capsys, folder)
    assert code == 0 and lines == [f"{folder}: clean (classifier)"]


def transitions_main(pipeline, out):
    from diffusion.sample import main

    main(["--pipeline", str(pipeline), "--seeds", "0", "--conditions", "0,1", "--steps", "1", "--out", str(out)])


def score_main(classifier, inputs, out):
    from classifier.score import main

    main(["--classifier", str(classifier), str(inputs), "--out", str(out), "--quiet"])


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def set_field(path, key, value):
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


ISSUE_CASES = {  # issue 14 part 2; each without the integrity record so that the parsers themselves answer
    "member": ("classifier", lambda f: truncate(f / "member-1.safetensors"), "member-1.safetensors"),
    "unet": ("pipeline", lambda f: truncate(f / "unet" / "diffusion_pytorch_model.safetensors"), "part 'unet/'"),
    "vae": ("pipeline", lambda f: truncate(f / "vae" / "diffusion_pytorch_model.safetensors"), "part 'vae/'"),
    "scheduler": ("pipeline", lambda f: (f / "scheduler" / "scheduler_config.json").write_text("{not json"),
                  "part 'scheduler/'"),
    "types": ("classifier", lambda f: set_field(f / "config.json", "upsample", "four"), "field 'upsample'"),
    "contradiction": ("pipeline", lambda f: set_field(f / "pipeline.json", "latent_shape", [8, 4, 4]),
                      "field 'latent_shape'"),
    # found by make fuzz: a text scaling factor loaded, and the latents file was written before it failed
    "scale": ("pipeline", lambda f: set_field(f / "vae" / "config.json", "scaling_factor", "ok.png"),
              "field 'scaling_factor'"),
    "huge layers": ("pipeline", lambda f: set_field(f / "vae" / "config.json", "layers_per_block", 10 ** 12),
                    "field 'layers_per_block'"),  # found by make fuzz: diffusers built modules until memory ran out
    "zero scale": ("pipeline", lambda f: set_field(f / "vae" / "config.json", "scaling_factor", 0),
                   "field 'scaling_factor'"),
}


@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_damaged_model_folders_are_one_line_for_transitions_and_score(world, tmp_path, capsys, case):
    kind, damage, needle = ISSUE_CASES[case]
    folder = copy(world, tmp_path, kind)
    (folder / "integrity.json").unlink()
    damage(folder)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        if kind == "pipeline":
            transitions_main(folder, out)
        else:
            score_main(folder, world / "dataset", out)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and needle in err[0] and str(folder) in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("override, new", [("schedule.warmup_steps=2", "train.lr_warmup_steps"),
                                           ("lr_warmup=3", "train.lr_warmup_steps"),
                                           ("lr_schedule=linear", "train.lr_schedule")])
def test_old_schedule_keys_name_the_new_key(override, new):
    from diffusion.train import DiffusionTrainConfig

    with pytest.raises(ConfigError, match=f"was renamed: use .*{new}"):
        load_config(DiffusionTrainConfig, None, [override])
    cfg = load_config(DiffusionTrainConfig, None, ["train.lr_warmup_steps=7", "train.lr_schedule=linear"])
    assert (cfg.train.lr_warmup_steps, cfg.train.lr_schedule) == (7, "linear")


def test_autoencoder_encode_with_a_text_scaling_factor_leaves_nothing(world, tmp_path, capsys):
    from autoencoder.cli import main

    folder = copy(world, tmp_path, "autoencoder")
    (folder / "integrity.json").unlink()
    set_field(folder / "config.json", "scaling_factor", "ok.png")
    out = tmp_path / "z.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["encode", str(world / "dataset"), "--model", str(folder), "--out", str(out), "--limit", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "field 'scaling_factor'" in err[0], err
    assert not out.exists() and not out.with_suffix(".json").exists()


POSTERIOR_CSV = "id,expected_y,map_y,posterior_std,name\np0,{},0,0.1,ds:p0\n"  # the columns the report reads


def posterior_folder(folder, extra_bytes: int = 0, exist_ok: bool = False):
    """A recorded folder `check` recognises (posterior.csv + posterior.json), with a large file when asked."""
    folder.mkdir(exist_ok=exist_ok)
    (folder / "posterior.csv").write_text(POSTERIOR_CSV.format(0.25))
    (folder / "posterior.json").write_text('{"format": "mitosis-ldm/posterior"}')
    if extra_bytes:
        (folder / "weights.bin").write_bytes(bytes(extra_bytes))
    integrity.record(folder)
    return folder


def test_check_hashes_files_too_large_to_hash_on_every_load(tmp_path, capsys):
    folder = posterior_folder(tmp_path / "post", extra_bytes=integrity.CHEAP_BYTES + 1000)
    weights = folder / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    weights.write_bytes(bytes(data))
    code, lines, _ = check(capsys, folder)
    assert code == 2 and lines == [f"{weights}: content differs from the sha256 recorded at export (corrupted or "
                                   f"edited)"]


@pytest.mark.parametrize("change", [-1, +1])  # truncated, or grown by an appended byte
def test_loading_names_a_large_recorded_file_whose_size_changed(tmp_path, change):
    folder = posterior_folder(tmp_path / "post", extra_bytes=integrity.CHEAP_BYTES + 1000)
    weights = folder / "weights.bin"
    weights.write_bytes(bytes(integrity.CHEAP_BYTES + 1000 + change))  # too large to hash on load
    assert integrity.findings(folder, full=False) == [
        f"{weights}: {integrity.CHEAP_BYTES + 1000 + change} bytes, recorded {integrity.CHEAP_BYTES + 1000} at "
        f"export (truncated or replaced)"]


def test_loading_hashes_every_file_up_to_the_cheap_size(tmp_path):
    folder = posterior_folder(tmp_path / "post", extra_bytes=1 << 20)  # exactly the documented 1 MiB
    weights = folder / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    weights.write_bytes(bytes(data))
    assert integrity.findings(folder, full=False) == [
        f"{weights}: content differs from the sha256 recorded at export (corrupted or edited)"]


def test_a_loader_names_the_first_damaged_file_and_counts_the_others(tmp_path):
    folder = posterior_folder(tmp_path / "post")
    tiny_artifacts.flip_byte(folder / "posterior.json", 0)
    with pytest.raises(UserError) as one:
        integrity.verify(folder)
    assert str(one.value) == f"{folder / 'posterior.json'}: content differs from the sha256 recorded at export " \
                             f"(corrupted or edited)"
    tiny_artifacts.flip_byte(folder / "posterior.csv", 0)  # sorts before posterior.json
    with pytest.raises(UserError) as two:
        integrity.verify(folder)
    assert str(two.value) == f"{folder / 'posterior.csv'}: content differs from the sha256 recorded at export " \
                             f"(corrupted or edited) (+1 more; run `mitosis-ldm check {folder}`)"


def test_hidden_temporaries_are_neither_recorded_nor_findings(tmp_path, capsys):
    folder = tmp_path / "post"
    folder.mkdir()
    (folder / ".partial").write_text("resume state")
    (folder / "sub").mkdir()
    (folder / "sub" / ".posterior.csv.tmp-1").write_text("half written")
    posterior_folder(folder, exist_ok=True)
    assert sorted(integrity.read_manifest(folder)["files"]) == ["posterior.csv", "posterior.json"]
    (folder / ".partial").unlink()  # resume state removed once the run is done: not a missing part
    (folder / ".later.tmp-2").write_text("x")  # a write in progress: not an unrecorded part
    from mitosis_ldm.io import write_json

    write_json(folder / ".resume.json", {"step": 3})  # hidden state a tool writes into a recorded folder
    assert ".resume.json" not in integrity.read_manifest(folder)["files"]
    (folder / ".resume.json").unlink()
    code, lines, _ = check(capsys, folder)
    assert code == 0 and lines == [f"{folder}: clean (posterior)"]


def test_an_integrity_record_of_another_format_is_refused(tmp_path, capsys):
    folder = posterior_folder(tmp_path / "post")
    record = json.loads((folder / "integrity.json").read_text())
    (folder / "integrity.json").write_text(json.dumps({**record, "format": "other-tool/hashes"}))
    with pytest.raises(UserError, match="integrity.json: field 'files' is not a valid integrity record"):
        integrity.verify(folder)
    code, lines, _ = check(capsys, folder)
    assert code == 2 and len(lines) == 1 and "not a valid integrity record (mitosis-ldm/integrity)" in lines[0]


def test_a_file_the_project_writes_into_a_recorded_folder_updates_the_record(tmp_path, capsys):
    from mitosis_ldm.io import write_text

    folder = posterior_folder(tmp_path / "post")
    write_text(folder / "posterior.csv", POSTERIOR_CSV.format(0.75))  # replaced (e.g. --overwrite)
    write_text(folder / "scores.csv", "name,mean\np0,0.5\n")  # added, as `score` adds scores.csv
    files = integrity.read_manifest(folder)["files"]
    assert files["posterior.csv"]["size"] == len(POSTERIOR_CSV.format(0.75)) and files["scores.csv"]["size"] == 17
    code, lines, _ = check(capsys, folder)
    assert code == 0 and lines == [f"{folder}: clean (posterior)"]


def replace_text(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


CONTENT_CASES = {  # damage the hashes cannot see (the record is rewritten after it): check's own look inside
    "label": ("dataset", lambda f: replace_text(f / "labels.csv", "p2,test,s0,2,2,1,", "p2,test,s0,2,2,1.5,"),
              "labels.csv: field 'label' of id 'p2' is outside [0, 1]"),
    "count": ("dataset", lambda f: set_field(f / "dataset.json", "count", 13),
              "dataset.json: field 'count' is 13, patches.npy holds 12"),
    "content hash": ("dataset", lambda f: tiny_artifacts.flip_byte(f / "patches.npy"),
                     "dataset.json: field 'content_hash' does not match patches.npy + labels.csv"),
    "strip": ("transitions", lambda f: (f / "strip-1.png").unlink(), "strip-1.png: missing (one strip per seed)"),
    "scores": ("transitions", lambda f: (f / "scores.csv").write_text("name,seed,frame,condition,mean,std\n"
                                                                      "x,0,0,0,0.1,0\n"),
               "scores.csv: has 1 score rows but the folder holds 6 frames"),
    "posterior rows": ("posterior", lambda f: (f / "posterior.csv").write_text("id,expected_y\n"),
                       "posterior.csv: has no rows"),
    "posterior bytes": ("posterior", lambda f: (f / "posterior.csv").write_bytes(b"id\n\xff\xfe\n"),
                        "posterior.csv: not UTF-8 text (byte 3)"),  # once check's catch-all's UnicodeDecodeError
    "posterior values": ("posterior", lambda f: replace_text(f / "posterior.csv", ",0.25,", ",-,"),
                         "posterior.csv: line 2: field 'expected_y' is '-', expected a number"),
    "nan weights": ("autoencoder", lambda f: nan_weights(f / "diffusion_pytorch_model.safetensors"),
                    "the autoencoder maps a 32px patch to (1, 3, 32, 32) (or non-finite values)"),
    "cache labels": ("latents", lambda f: np.save(f / "labels.npy", np.load(f / "labels.npy")[:-1]),
                     "labels.npy: 11 entries, latents.npy has 12"),
    "cache vae": ("latents", lambda f: set_field(f / "vae" / "config.json", "scaling_factor", float("nan")),
                  "vae/config.json: field 'scaling_factor' must be a finite number > 0, got 'nan'"),
}


def nan_weights(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = sorted(k for k in tensors if k.startswith("decoder.conv_out.weight"))[0]
    tensors[name][0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case", sorted(CONTENT_CASES))
def test_check_looks_inside_a_folder_whose_hashes_hold(world, tmp_path, capsys, case):
    kind, damage, needle = CONTENT_CASES[case]
    folder = posterior_folder(tmp_path / kind) if kind == "posterior" else copy(world, tmp_path, kind)
    damage(folder)
    integrity.record(folder)  # as if exported so: only the contents can tell
    code, lines, _ = check(capsys, folder)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(str(folder)) and needle in lines[0], lines


@pytest.mark.parametrize("kind, part, field", [
    ("autoencoder", "", "scaling_factr"),
    ("pipeline", "unet/", "atention_head_dim"),
])
def test_a_config_field_the_model_does_not_have_is_a_finding_not_a_stray_log_line(
        world, tmp_path, capsys, kind, part, field):
    # diffusers ignores it (a misspelt name: the default is used instead) and logs so before check's error line
    folder = copy(world, tmp_path, kind)
    set_field(folder / part / "config.json", field, 8)
    integrity.record(folder)
    code, lines, err = check(capsys, folder)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{folder}: The config attributes {{'{field}': 8}}")
    assert err == "error: 1 of 1 folder(s) have findings\n"


def test_record_reaches_a_run_folders_model_and_never_blesses_damage(world, tmp_path, capsys):
    model = shutil.copytree(world / "classifier", tmp_path / "run" / "model")
    (model / "integrity.json").unlink()
    code, lines, _ = check(capsys, "--record", tmp_path / "run")
    assert code == 0 and lines == [f"{model}: recorded sha256 of 3 files in integrity.json",
                                   f"{tmp_path / 'run'}: clean (classifier)"]
    assert (model / "integrity.json").exists()
    damaged = copy(world, tmp_path, "classifier")
    (damaged / "integrity.json").unlink()
    set_field(damaged / "config.json", "upsample", "four")
    code, lines, err = check(capsys, "--record", damaged, tmp_path / "missing")
    assert code == 2 and not (damaged / "integrity.json").exists()
    assert "field 'upsample'" in lines[0] and "2 of 2 folder(s) have findings" in err


def test_a_folder_without_a_marker_or_a_file_is_one_line_each(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    (tmp_path / "file.json").write_text("{}")
    code, lines, err = check(capsys, tmp_path / "notes", tmp_path / "file.json")
    assert code == 2 and len(lines) == 2 and "2 of 2 folder(s)" in err
    assert lines[0].startswith(f"{tmp_path / 'notes'}: not a mitosis-ldm artifact (no marker file")
    assert lines[1] == f"{tmp_path / 'file.json'}: not found (or not a folder)"
