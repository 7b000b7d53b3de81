"""The spine: typed configs, atomic output, artifact recognition, training plumbing, the dispatcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from mitosis_ldm import artifacts
from mitosis_ldm.cli import main as cli_main
from mitosis_ldm.config import ConfigError, load_config, save_config
from mitosis_ldm.errors import UserError
from mitosis_ldm.io import atomic_dir, read_json, write_json
from mitosis_ldm.training import TrainConfig, adamw
from test_training_loop import train  # the toy loop every stage's loop is written like

from conftest import REPO


@dataclass
class DataSection:
    datasets: list[str] = field(default_factory=list)
    crop: int = 0


@dataclass
class StageConfig:
    out: str = "runs/x"
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    note: str | None = None


# -- configuration ----------------------------------------------------------

def test_yaml_then_set_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\n  max_steps: 7\ndata:\n  datasets: [a, b]\n")
    cfg = load_config(StageConfig, path, ["train.lr=3e-4", "data.crop=32"])
    assert cfg.train.lr == pytest.approx(3e-4)      # --set beats YAML
    assert cfg.train.max_steps == 7                  # YAML beats defaults
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert cfg.data.datasets == ["a", "b"] and cfg.data.crop == 32


@pytest.mark.parametrize("text, key", [
    ("train:\n  lrr: 1\n", "train.lrr"),
    ("bogus: 1\n", "bogus"),
    ("data:\n  crop: 1.5\n", "data.crop"),
    ("data:\n  datasets: a\n", "data.datasets"),
    ("train:\n  max_steps: true\n", "train.max_steps"),
])
def test_unknown_keys_and_wrong_types_name_the_key(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(StageConfig, path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)


def test_unknown_set_key_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="'train.nope'"):
        load_config(StageConfig, None, ["train.nope=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(StageConfig, bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(StageConfig, None, ["note=hello", "train.seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(StageConfig, tmp_path / "config.yaml") == cfg


# -- atomic output -------------------------------------------------------------

def test_atomic_dir_leaves_nothing_on_failure_and_refuses_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(UserError, match="--overwrite"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "integrity.json"]


def test_overwrite_removes_the_old_output_only_once_the_new_one_is_in_place(tmp_path, monkeypatch):
    import shutil

    from mitosis_ldm import io

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    removed, rmtree = [], shutil.rmtree

    def watched(path, *args, **kwargs):  # a crash here must leave an output at `out`, the new one
        removed.append((os.path.basename(path), sorted(p.name for p in out.iterdir())))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(io.shutil, "rmtree", watched)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [files for _, files in removed] == [["integrity.json", "new.txt"]], removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    from mitosis_ldm import io

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    replace = os.replace

    def failing(src, dst):  # the new output's rename into place fails (a full disk's metadata, a stale handle)
        if Path(dst) == out and Path(src).name.startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(OSError), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old"  # not left at a hidden .out.old-PID
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_json_reports_file_and_position(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text('{"a": 1,,}')
    with pytest.raises(UserError, match=r"m.json: malformed JSON at line 1"):
        read_json(bad)


def test_read_json_names_a_missing_file_or_a_folder_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^.*/gone.json: file not found$"):
        read_json(tmp_path / "gone.json")
    with pytest.raises(UserError, match=r"^.*: is a folder, expected a manifest file$"):
        read_json(tmp_path, what="manifest")


def test_write_json_makes_its_folder_and_writes_numpy_values_and_paths_as_json(tmp_path):
    out = tmp_path / "new" / "deeper" / "m.json"
    write_json(out, {"n": np.int64(3), "x": np.float32(0.5), "a": np.arange(2), "p": tmp_path})
    data = read_json(out)
    assert data == {"n": 3, "x": 0.5, "a": [0, 1], "p": str(tmp_path)} and isinstance(data["n"], int)


def test_an_output_under_a_file_or_in_an_unwritable_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    from mitosis_ldm.io import check_new_output

    (tmp_path / "slide.svs").write_text("x")
    with pytest.raises(UserError, match=r"out/x.csv: cannot be created: .*slide.svs is a file, not a folder"):
        check_new_output(tmp_path / "slide.svs" / "out" / "x.csv", overwrite=False)
    check_new_output(tmp_path / "new" / "deeper" / "x.csv", overwrite=False)  # missing folders are made later
    # as root every folder is writable: this one is readable and searchable but not writable
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)
    with pytest.raises(UserError, match=f"cannot be created: folder {tmp_path} is not writable"):
        check_new_output(tmp_path / "x.csv", overwrite=False)


def test_a_cli_output_under_a_file_is_one_line_and_writes_nothing(tmp_path):
    # was a FileExistsError traceback from mkdir, after the work was done
    (tmp_path / "a.png").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "mitosis_ldm", "data", "synth", "--n", "4", "--out",
                             str(tmp_path / "a.png" / "synth")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path}/a.png/synth: cannot be created: "
                                                  f"{tmp_path}/a.png is a file, not a folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_an_existing_file_output_may_be_replaced_with_overwrite(tmp_path):
    from mitosis_ldm.io import check_new_output

    (tmp_path / "z.safetensors").write_text("old")
    assert check_new_output(tmp_path / "z.safetensors", overwrite=True) == tmp_path / "z.safetensors"
    with pytest.raises(UserError, match="z.safetensors: already exists; pass --overwrite to replace it"):
        check_new_output(tmp_path / "z.safetensors", overwrite=False)


def test_outputs_are_written_beside_their_target_under_a_hidden_name(tmp_path):
    # beside it, so the final rename never crosses file systems
    from mitosis_ldm.io import atomic_file

    with atomic_file(tmp_path / "a.json") as handle:
        handle.write("{}")
        assert [p.name.startswith(".a.json.tmp-") for p in tmp_path.iterdir()] == [True]
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "out"]


def test_ctrl_c_while_writing_leaves_no_partial_output(tmp_path):
    from mitosis_ldm.io import atomic_file

    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "a.json") as handle:
            handle.write("{")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "partial.txt").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# -- artifacts -----------------------------------------------------------------

def test_expect_artifact_names_what_was_given(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    write_json(vae / "config.json", {"_class_name": "AutoencoderKL"})
    clf = tmp_path / "run" / "model"
    clf.mkdir(parents=True)
    write_json(clf / "config.json", {"format": artifacts.FORMAT[artifacts.CLASSIFIER]})
    with pytest.raises(UserError, match="is an autoencoder folder, but --classifier expects a classifier folder"):
        artifacts.expect_artifact(vae, artifacts.CLASSIFIER, "--classifier")
    assert artifacts.expect_artifact(tmp_path / "run", artifacts.CLASSIFIER, "--classifier") == clf
    with pytest.raises(UserError, match="not found"):
        artifacts.expect_artifact(tmp_path / "missing", artifacts.AUTOENCODER, "--model")


def test_transitions_round_trip_and_strips(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (2, 3, 16, 16, 3), dtype=np.uint8)
    out = artifacts.write_transitions(tmp_path / "t", frames, {"seeds": [4, 9], "conditions": [0.0, 0.5, 1.0]})
    t = artifacts.read_transitions(out)
    assert np.array_equal(np.asarray(t.frames), frames) and t.seeds == [4, 9]
    assert (out / "strip-4.png").exists() and (out / "strip-9.png").exists()
    (out / "scores.csv").write_text("name,seed,frame,condition,mean,std\nx,4,0,0,0.1,0\n")
    with pytest.raises(UserError, match="1 score rows but the folder holds 6 frames"):
        t.scores()
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="manifest.json: missing"):
        artifacts.read_transitions(out)


# -- training plumbing -----------------------------------------------------------

def test_checkpoints_rotate_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    start, end, run, *_ = train(run_dir, 12, checkpoint_every=5)
    assert (start, end) == (0, 12)
    assert [s for s, _ in run.checkpoints()] == [5, 10]          # keep the last 2
    assert read_json(run_dir / "run.json")["process_ranks"] == [0]
    with pytest.raises(UserError, match="--resume latest"):
        train(run_dir, 20, checkpoint_every=5)
    start, end, *_ = train(run_dir, 20, resume="latest", checkpoint_every=5)
    assert (start, end) == (10, 20)
    steps = [json.loads(line)["step"] for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:12] == list(range(1, 13)) and steps[12:] == list(range(11, 21))
    start, end, *_ = train(run_dir, 3, overwrite=True, checkpoint_every=5)
    assert (start, end) == (0, 3) and not (run_dir / "checkpoints" / "checkpoint-10").exists()


def test_resume_continues_with_the_saved_weights_optimizer_and_shuffle_state(tmp_path):
    *_, straight, straight_batches, _ = train(tmp_path / "straight", 16, checkpoint_every=8)
    train(tmp_path / "stopped", 8, checkpoint_every=8)
    start, _, _, resumed, resumed_batches, _ = train(tmp_path / "stopped", 16, resume="latest", checkpoint_every=8)
    assert start == 8 and resumed_batches == straight_batches[8:]  # the second epoch's batches, in the same order
    assert torch.equal(resumed, straight)  # bit for bit: weights, Adam moments and RNG all came back


def test_a_run_folder_that_is_a_file_or_lies_under_one_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="notes.txt: is a file; the run folder must be a folder"):
        train(tmp_path / "notes.txt", 1)
    with pytest.raises(UserError, match="notes.txt/run: cannot be created: .*notes.txt is a file, not a folder"):
        train(tmp_path / "notes.txt" / "run", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_adamw_reads_the_train_section_and_steps_like_the_single_tensor_update():
    """The trainers' AdamW takes lr, betas and weight decay from `train:` and runs the multi-tensor update; its
    weights equal PyTorch's single-tensor AdamW bit for bit, so the switch leaves every trained model as it was."""
    tcfg = TrainConfig(lr=2e-3, adam_betas=(0.8, 0.99), weight_decay=0.05)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Conv2d(8, 4, 1))
    twin = [p.detach().clone().requires_grad_() for p in net.parameters()]
    start = [p.detach().clone() for p in net.parameters()]
    opt = adamw(net.parameters(), tcfg)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["foreach"]) == (2e-3, (0.8, 0.99), 0.05, True)
    ref = torch.optim.AdamW(twin, lr=2e-3, betas=(0.8, 0.99), weight_decay=0.05, foreach=False)
    grads = torch.Generator().manual_seed(1)
    for _ in range(25):
        for p, q in zip(net.parameters(), twin):
            p.grad = torch.randn(p.shape, generator=grads)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(net.parameters(), twin))
    assert not any(torch.equal(p.detach(), s) for p, s in zip(net.parameters(), start))  # every tensor moved
    assert adamw(net.parameters(), tcfg, lr=1e-4).param_groups[0]["lr"] == 1e-4


# -- dispatcher --------------------------------------------------------------------

def test_help_lists_every_command(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("data", "vae", "score", "transitions", "real2gen", "report"):
        assert name in out


def test_no_command_or_help_prints_the_usage(capsys):
    for argv in ([], ["help"], ["-h"]):  # a bare `mitosis-ldm` was an IndexError traceback under one mutation
        assert cli_main(argv) == 0
        assert capsys.readouterr().out.startswith("usage: mitosis-ldm COMMAND [ARGS...]")


def test_unknown_command_fails(capsys):
    assert cli_main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_help_imports_no_stage():
    code = ("import sys; from mitosis_ldm.cli import main; main(['--help']); "
            "print(sorted(m for m in ('autoencoder','classifier','diffusion','report','patches','torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_demo_rejects_unknown_stage(capsys):
    from mitosis_ldm.demo import main as demo_main

    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--only", "nope"])
    assert exit_info.value.code == 2 and "unknown stage 'nope'" in capsys.readouterr().err


def test_demo_training_uses_every_core(tmp_path):
    # `accelerate launch` without --cpu gives each process one thread; the demo asks for all cores.
    from mitosis_ldm.demo import accelerate
    from mitosis_ldm.launch import cpu_threads

    cmd = accelerate("autoencoder.train", "configs/demo/autoencoder.yaml")
    probe = tmp_path / "threads.py"
    probe.write_text("import torch; print('threads', torch.get_num_threads())\n")
    launcher = cmd[:cmd.index("-m", 3)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([*launcher, str(probe)], cwd=REPO, capture_output=True, text=True, env=env, check=True).stdout
    assert f"threads {cpu_threads()}" in out


def test_a_bad_recipe_under_the_demos_launcher_prints_its_one_line_and_no_launcher_traceback(tmp_path):
    # without --quiet, accelerate's launcher raises CalledProcessError on the stage's exit 2 and prints its traceback
    from mitosis_ldm.demo import accelerate

    out = tmp_path / "diffusion"
    cmd = accelerate("diffusion.train", "configs/demo/diffusion.yaml", "--set", f"out={out}",
                     "--set", "train.max_steps=300")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert lines == ["error: sample.guide_snapshot_step: must be an integer in [0, train.max_steps), got 750"], lines
    assert not out.exists()


def test_demo_takes_its_recipes_and_seed_count_from_the_command_line(tmp_path):
    from mitosis_ldm.demo import stages

    plan = dict(stages(tmp_path / "run", configs=tmp_path / "recipes", seeds=64))
    launch = plan["diffusion"][0]
    assert launch[launch.index("--config") + 1] == f"{tmp_path / 'recipes'}/diffusion.yaml"
    render = plan["transitions"][0]
    assert render[render.index("--seeds") + 1] == "0-63"
    default = dict(stages(tmp_path / "run"))
    assert default["autoencoder"][0][default["autoencoder"][0].index("--config") + 1] == "configs/demo/autoencoder.yaml"
    assert "0-255" in default["transitions"][0]


@pytest.mark.parametrize("args, message", [
    (["--seeds", "1"], "--seeds: 1; the report's intervals need at least 2 transitions"),
    (["--configs", "nowhere"], "nowhere/autoencoder.yaml: recipe missing"),
])
def test_demo_refuses_bad_options_in_one_line(tmp_path, capsys, args, message):
    from mitosis_ldm.demo import main as demo_main

    with pytest.raises(SystemExit) as exit_info:
        demo_main([*args, "--root", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
