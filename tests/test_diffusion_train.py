"""Diffusion training through its real entry point: SIGKILL then --resume latest, two processes, auto cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import REPO, accelerate_cmd
from test_diffusion import make_dataset, make_vae, tiny_train_args


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtrain")
    synth = make_dataset(root / "synth", n=40, seed=0)
    real = make_dataset(root / "real", n=12, seed=1, labelled=False)
    vae = make_vae(root / "vae")
    return {"root": root, "synth": synth, "real": real, "vae": vae}


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_then_resume_latest_continues(small):
    root = small["root"]
    run, cache = root / "killed", root / "latents-kill"
    # no cache yet: the first run builds it from data.vae + data.datasets
    source = ["--set", f"data.vae={small['vae']}", "--set", f"data.datasets=[{small['synth']},{small['real']}]"]
    args = [*tiny_train_args(run, cache, steps=400), *source, "--set", "train.checkpoint_every=3",
            "--set", "preview.every=0"]
    proc = subprocess.Popen(accelerate_cmd("diffusion.train", *args), cwd=REPO, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "checkpoint-6"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists()
    assert (cache / "cache.json").exists()
    done = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    last = done[-1]
    assert last >= 6
    # the same config with a nearer end, so the test does not wait for 400 steps
    again = subprocess.run(accelerate_cmd("diffusion.train", *args, "--set", f"train.max_steps={last + 2}",
                                          "--resume", "latest"),
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"(step {last})" in again.stdout and f"training from step {last} " in again.stdout
    steps = [json.loads(line)["step"] for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == last + 2
    assert (run / "model" / "pipeline.json").exists()
    assert json.loads((run / "model" / "pipeline.json").read_text())["trained_steps"] == last + 2


@pytest.mark.slow
def test_two_process_training(small):
    from diffusion.cache import build_cache

    root = small["root"]
    cache = build_cache(small["vae"], [small["synth"], small["real"]], root / "latents-ddp", progress=False)
    run = root / "ddp"
    result = subprocess.run(accelerate_cmd("diffusion.train", *tiny_train_args(run, cache, steps=3),
                                           "--set", "preview.every=0", processes=2),
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["num_processes"] == 2 and info["process_ranks"] == [0, 1]
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((run / "model" / "pipeline.json").read_text())["trained_steps"] == 3


def test_existing_run_folder_needs_overwrite_or_resume(small, tmp_path):
    from conftest import run_module

    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    result = run_module("diffusion.train", *tiny_train_args(run, tmp_path / "nocache"))
    assert result.returncode == 2 and "already exists" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_balance_weights_give_every_label_bin_and_the_unlabelled_rows_equal_draws():
    import numpy as np

    from diffusion.train import balance_weights

    nan = float("nan")
    # 5 bins: 0 and 0.1 share bin 0, 0.5 is alone in bin 2, 1.0 falls in the last bin with 0.9
    labels = np.array([0.0, 0.1, 0.5, 0.9, 1.0, nan, nan, nan, nan])
    weights = balance_weights(labels, 5, 1.0)
    assert weights.tolist() == [0.5, 0.5, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]
    # unlabelled_weight 2: the unlabelled group draws twice as often as one label bin
    assert balance_weights(labels, 5, 2.0)[5:].tolist() == [0.5] * 4


def labels_seen_in_training(small, monkeypatch, name, *overrides):
    """The labels the label embedder sees in training mode over a 2-step run on the labelled dataset's cache."""
    import torch

    from diffusion.cache import build_cache
    from diffusion.model import LabelEmbedder
    from diffusion.train import main as train_main

    seen = []
    forward = LabelEmbedder.forward

    def recording(self, labels):
        if self.training:
            seen.append(labels.detach().cpu().clone())
        return forward(self, labels)

    monkeypatch.setattr(LabelEmbedder, "forward", recording)
    root = small["root"]
    cache = build_cache(small["vae"], [small["synth"]], root / f"latents-{name}", progress=False)  # all labelled
    train_main([*tiny_train_args(root / name, cache, steps=2), "--set", "preview.every=0",
                *[a for o in overrides for a in ("--set", o)]])
    return torch.cat(seen)


def test_cond_dropout_one_replaces_every_training_label_by_the_null_label(small, monkeypatch):
    import torch

    labels = labels_seen_in_training(small, monkeypatch, "dropout-all", "diffusion.cond_dropout=1.0")
    assert len(labels) == 2 * 8 and bool(torch.isnan(labels).all()), labels


def test_label_jitter_moves_training_labels_and_keeps_them_in_the_unit_interval(small, monkeypatch):
    from patches.dataset import PatchDataset

    labels = labels_seen_in_training(small, monkeypatch, "jitter", "diffusion.cond_dropout=0.0",
                                     "data.label_jitter=0.5").numpy()
    data_labels = set(np.round(PatchDataset(small["synth"]).soft_labels, 5).tolist())
    assert len(labels) == 2 * 8 and np.isfinite(labels).all()  # cond_dropout 0: no null label
    assert labels.min() >= 0 and labels.max() <= 1, labels
    assert not set(np.round(labels, 5).tolist()) <= data_labels  # jittered off the dataset's labels
