"""A training stage stopped inside an epoch and resumed ends on the weights of a run that was never stopped
(mitosis_ldm/loop_state.py): the rest of the epoch's batches, the same augmentations and the same noise."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from mitosis_ldm.loop_state import LoopState
from test_diffusion import make_dataset, make_vae, tiny_train_args


def unet(run):
    return load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_diffusion_training_resumed_inside_an_epoch_equals_an_uninterrupted_run(tmp_path):
    from diffusion.cache import main as cache_main
    from diffusion.train import main as train_main

    synth = make_dataset(tmp_path / "synth", n=40, seed=0)
    cache_main(["--vae", str(make_vae(tmp_path / "vae")), "--dataset", str(synth), "--out", str(tmp_path / "latents")])
    # a constant rate, so that a run told to stop at step 2 trains its first 2 steps as the 9-step run does
    keys = ["--set", "train.lr_schedule=constant", "--set", "train.checkpoint_every=2"]  # previews every 2 steps too
    train_main(tiny_train_args(tmp_path / "straight", tmp_path / "latents", steps=9, extra=keys))
    train_main(tiny_train_args(tmp_path / "stopped", tmp_path / "latents", steps=2, extra=keys))
    state = LoopState.load(tmp_path / "stopped" / "checkpoints" / "checkpoint-2" / "loop-state-0.safetensors")
    assert (state.epoch, state.taken) == (0, 2)  # two of the first epoch's three batches
    resume = ["--resume", "latest"]
    train_main([*tiny_train_args(tmp_path / "stopped", tmp_path / "latents", steps=9, extra=keys), *resume])
    straight, resumed = unet(tmp_path / "straight"), unet(tmp_path / "stopped")
    assert straight.keys() == resumed.keys()
    assert all((straight[k] == resumed[k]).all() for k in straight)


@pytest.mark.slow
def test_two_process_diffusion_training_resumed_inside_an_epoch_equals_an_uninterrupted_run(tmp_path):
    # each process keeps its own loop state (its shard of the batches, its own random streams)
    import os
    import subprocess

    from conftest import REPO, accelerate_cmd, launch_output
    from diffusion.cache import main as cache_main

    synth = make_dataset(tmp_path / "synth", n=64, seed=0)
    cache_main(["--vae", str(make_vae(tmp_path / "vae")), "--dataset", str(synth), "--out", str(tmp_path / "latents")])
    keys = ["--set", "train.lr_schedule=constant", "--set", "train.checkpoint_every=2", "--set", "preview.every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(run, steps, *extra):
        args = [*tiny_train_args(run, tmp_path / "latents", steps=steps, extra=keys), *extra]
        done = subprocess.run(accelerate_cmd("diffusion.train", *args, processes=2), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, launch_output(done.stderr)

    launch(tmp_path / "straight", 6)
    launch(tmp_path / "stopped", 2)
    states = [LoopState.load(tmp_path / "stopped" / "checkpoints" / "checkpoint-2" / f"loop-state-{rank}.safetensors")
              for rank in (0, 1)]
    assert [(s.epoch, s.taken) for s in states] == [(0, 2), (0, 2)]
    # set_seed(device_specific=True): each process's own torch stream, so one file could not serve both
    assert not (states[0].before["torch"] == states[1].before["torch"]).all()
    launch(tmp_path / "stopped", 6, "--resume", "latest")
    straight, resumed = unet(tmp_path / "straight"), unet(tmp_path / "stopped")
    assert all((straight[k] == resumed[k]).all() for k in straight)


@pytest.mark.slow
def test_autoencoder_training_resumed_inside_an_epoch_equals_an_uninterrupted_run(tmp_path):
    # the autoencoder's own state besides its weights: the EMA it exports, the patch-GAN discriminator and its
    # optimizer (on from step 1, so on both sides of the stop), and the crops, flips and stain jitter of each batch
    from autoencoder.train import main as train_main
    from conftest import run_module
    from test_autoencoder import TINY_TRAIN

    data = []
    for seed in (0, 1):  # two sets, drawn balanced: accelerate's weighted sampler and its generator
        data.append(tmp_path / f"synth{seed}")
        done = run_module("mitosis_ldm", "data", "synth", "--out", data[-1], "--n", "24", "--size", "32",
                          "--experts", "3", "--seed", str(seed))
        assert done.returncode == 0, done.stderr
    keys = [*TINY_TRAIN, "--set", f"data.datasets=[{data[0]},{data[1]}]", "--set", "data.stain_jitter=0.05",
            "--set", "train.lr_schedule=constant", "--set", "train.checkpoint_every=2", "--set", "train.ema_decay=0.9",
            "--set", "loss.gan=0.5", "--set", "loss.gan_start=1", "--set", "loss.disc_channels=8"]

    def train(run, steps, *extra):
        train_main(["--config", "configs/demo/autoencoder.yaml", "--out", str(run), *keys,
                    "--set", f"train.max_steps={steps}", *extra])

    train(tmp_path / "straight", 9)
    train(tmp_path / "stopped", 2)
    state = LoopState.load(tmp_path / "stopped" / "checkpoints" / "checkpoint-2" / "loop-state-0.safetensors")
    assert (state.epoch, state.taken) == (0, 2)  # two of the first epoch's four batches
    train(tmp_path / "stopped", 9, "--resume", "latest")
    for part in ("model/diffusion_pytorch_model.safetensors",  # the exported EMA weights
                 "checkpoints/checkpoint-8/model.safetensors",  # the trained weights at the last checkpoint
                 "checkpoints/checkpoint-8/model_1.safetensors"):  # the discriminator's
        straight, resumed = load_file(str(tmp_path / "straight" / part)), load_file(str(tmp_path / "stopped" / part))
        assert straight.keys() == resumed.keys()
        assert all((straight[k] == resumed[k]).all() for k in straight), part


def classifier_export(run):
    """The exported folder's members' weights and its config.json (with each member's Platt scale and bias)."""
    meta = json.loads((run / "model" / "config.json").read_text())
    return [load_file(str(run / "model" / f"member-{k}.safetensors")) for k in range(meta["members"])], meta


@pytest.mark.slow
def test_classifier_training_resumed_inside_an_epoch_equals_an_uninterrupted_run(tmp_path):
    # the members train one after another, each in its own run folder (members/member-k/) with its own checkpoints
    # and loop state: max_steps=2 stops every member inside its first epoch, and the resume continues each of them
    from classifier_data import make_toy_dataset
    from test_classifier_train import tiny_args

    from classifier import train

    toy = make_toy_dataset(tmp_path / "toy", n=120, size=32)  # 79 train patches: 4 whole batches of 16 an epoch
    # a warm-up then a constant rate, neither depending on max_steps; judged every 2 steps by both runs, so the
    # stopped run's forced judgement at its last step is one the 9-step run makes too. At this rate the members'
    # best weights come after the stop (steps 8 and 9), so the export holds weights trained after the resume
    keys = ["--set", "train.lr_schedule=constant_with_warmup", "--set", "train.lr=1e-2",
            "--set", "ensemble.patience=1000"]
    train.main(tiny_args(toy, tmp_path / "straight", 9, 2, 2, *keys))
    train.main(tiny_args(toy, tmp_path / "stopped", 2, 2, 2, *keys))
    for k in range(2):
        ckpt = tmp_path / "stopped" / "members" / f"member-{k}" / "checkpoints" / "checkpoint-2"
        state = LoopState.load(ckpt / "loop-state-0.safetensors")
        assert (state.epoch, state.taken) == (0, 2)  # two of the first epoch's four batches
    train.main(tiny_args(toy, tmp_path / "stopped", 9, 2, 2, *keys, "--resume", "latest"))
    for k in range(2):  # a member written at max_steps=2 is not finished for max_steps=9: it went on
        record = json.loads((tmp_path / "stopped" / "members" / f"member-{k}" / "member.json").read_text())
        assert record["steps"] == 9
    straight, straight_meta = classifier_export(tmp_path / "straight")
    resumed, resumed_meta = classifier_export(tmp_path / "stopped")
    assert len(straight) == len(resumed) == 2
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        assert all((a[name] == b[name]).all() for name in a)
    assert straight_meta["calibration"] == resumed_meta["calibration"]  # Platt scale and bias, exactly
    assert straight_meta["best_step"] == resumed_meta["best_step"] and min(resumed_meta["best_step"]) > 2
