"""Autoencoder training under stress: SIGKILL then `--resume latest`, and a 2-process (gloo) run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from diffusers import AutoencoderKL

from conftest import REPO, accelerate_cmd, launch_output, run_module

TINY = ["--set", "train.batch_size=8", "--set", "data.crop=16", "--set", "train.log_every=1",
        "--set", "data.scale_patches=16", "--set", "data.eval_limit=8", "--set", "train.lr_warmup_steps=2"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae-dist") / "synth"
    result = run_module("mitosis_ldm", "data", "synth", "--out", out, "--n", "64", "--size", "32",
                        "--experts", "3", "--seed", "3")
    assert result.returncode == 0, result.stderr
    return out


def test_sigkill_then_resume_continues_from_last_checkpoint(tmp_path, synth):
    out = tmp_path / "run"
    args = ["--config", "configs/demo/autoencoder.yaml", "--out", str(out), "--set", f"data.datasets=[{synth}]",
            "--set", "train.max_steps=400", "--set", "train.checkpoint_every=4", "--set", "train.keep_checkpoints=2",
            *TINY]
    proc = subprocess.Popen(accelerate_cmd("autoencoder.train", *args), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while not (out / "checkpoints" / "checkpoint-8").exists():
            assert proc.poll() is None, "training ended before its second checkpoint"
            assert time.time() < deadline, "no checkpoint-8 within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its training child, mid-run
        proc.wait()
    assert not (out / "model").exists()
    done = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert done and done[-1] >= 8
    last = done[-1]
    resumed = subprocess.run(accelerate_cmd("autoencoder.train", *args, "--resume", "latest",
                                            "--set", f"train.max_steps={last + 4}"),
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{last}'} (step {last})" in log
    assert f"start at step {last} of {last + 4}" in log
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    # the rerun logged only the steps after the checkpoint, never step 1 again
    assert steps.count(1) == 1 and steps[-1] == last + 4
    assert AutoencoderKL.from_pretrained(out / "model").config.scaling_factor > 0


def test_two_processes_train_and_export_the_same_layout(tmp_path, synth):
    out = tmp_path / "run2"
    # the patch-GAN joins at step 2: its discriminator trains across the processes too
    cmd = accelerate_cmd("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", out,
                         "--set", f"data.datasets=[{synth}]", "--set", "train.max_steps=4",
                         "--set", "train.checkpoint_every=4", "--set", "loss.gan=0.5", "--set", "loss.gan_start=2",
                         *TINY, processes=2)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, launch_output(result.stderr)
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("d_loss" in r for r in logged) and not any("d_loss" in r for r in logged if r["step"] < 2)
    run = json.loads((out / "run.json").read_text())
    assert run["num_processes"] == 2 and run["process_ranks"] == [0, 1]
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                                 "integrity.json", "training.json"]
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    vae = AutoencoderKL.from_pretrained(out / "model")
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor > 0
