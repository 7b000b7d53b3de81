"""Diffusion training through its real entry point: SIGKILL then --resume latest, two processes, auto cache, bad
splits; and what one run hands its parts (the rows drawn, the sampler's weights, clipping, the loss target)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import REPO, accelerate_cmd, launch_output
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
    run = root / "killed"
    cache = run / "latents"
    # no data.cache: the first run builds the cache at RUN/latents from data.vae + data.datasets
    source = ["--set", "data.cache=null", "--set", f"data.vae={small['vae']}",
              "--set", f"data.datasets=[{small['synth']},{small['real']}]"]
    args = [*tiny_train_args(run, "null", steps=400), *source, "--set", "train.checkpoint_every=3",
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
    assert json.loads((cache / "cache.json").read_text())["splits"] == ["train"]  # only what training reads
    assert (ckpt / "custom_checkpoint_0.pkl").exists()  # the EMA's state, which resume must restore
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
                                           "--set", "preview.every=0", "--set", "train.log_every=1", processes=2),
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, launch_output(result.stderr)
    info = json.loads((run / "run.json").read_text())
    assert info["num_processes"] == 2 and info["process_ranks"] == [0, 1]
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((run / "model" / "pipeline.json").read_text())["trained_steps"] == 3
    # accelerate steps a prepared scheduler once per process: the schedule's length is scaled to match, so the
    # learning rate follows the single-process schedule (warm-up 1 step, cosine to 0 at step 3)
    import torch
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=3)
    expected = []
    for _ in range(3):
        optimizer.step()
        schedule.step()
        expected.append(schedule.get_last_lr()[0])
    logged = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3] and [r["lr"] for r in logged] == pytest.approx(expected)


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


def test_training_draws_every_timestep_from_the_first_to_the_last(small, monkeypatch):
    # on a 4-step schedule, 48 draws: the clean end (t = 0) and the pure-noise end (t = T - 1) both come up, and
    # nothing outside [0, T)
    import torch
    from diffusers import DDPMScheduler

    from diffusion.cache import build_cache
    from diffusion.train import main as train_main

    drawn, add_noise = [], DDPMScheduler.add_noise

    def noising(self, latents, noise, t):
        drawn.append(t.clone())
        return add_noise(self, latents, noise, t)

    monkeypatch.setattr(DDPMScheduler, "add_noise", noising)
    root = small["root"]
    cache = build_cache(small["vae"], [small["synth"]], root / "latents-timesteps", progress=False)
    train_main([*tiny_train_args(root / "timesteps", cache, steps=6), "--set", "preview.every=0",
                "--set", "diffusion.num_train_timesteps=4"])
    assert sorted(set(torch.cat(drawn).tolist())) == [0, 1, 2, 3]


def test_min_snr_weights_take_the_form_of_the_prediction_type():
    import torch

    from diffusion.train import DiffusionConfig, loss_weights, make_noise_scheduler

    t = torch.tensor([0, 100, 500, 999])
    for prediction_type in ("v_prediction", "epsilon"):
        scheduler = make_noise_scheduler(DiffusionConfig(prediction_type=prediction_type))
        alpha = scheduler.alphas_cumprod[t]
        snr = alpha / (1 - alpha)  # high at t = 0, near 0 at t = 999
        expected = snr.clamp(max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
        assert torch.allclose(loss_weights(scheduler, t, 5.0), expected)
        assert torch.equal(loss_weights(scheduler, t, 0.0), torch.ones(4))  # 0 disables the weighting


def test_a_dihedral_cache_row_is_drawn_in_each_of_its_eight_variants():
    import torch

    from diffusion.train import LatentRows

    latents = np.arange(8, dtype=np.float16).reshape(1, 8, 1, 1, 1) * np.ones((1, 8, 2, 2, 2), np.float16)
    rows = LatentRows(latents, np.array([0.5], np.float32))
    torch.manual_seed(0)
    drawn = {float(rows[0][0][0, 0, 0]) for _ in range(200)}
    assert drawn == set(range(8))
    assert float(rows[0][1]) == 0.5


def test_training_on_a_split_without_rows_is_one_line(small, tmp_path):
    from conftest import run_module

    from diffusion.cache import build_cache
    from patches.dataset import SplitConfig, build_dataset
    from test_diffusion import nucleus_shard

    no_val = build_dataset(tmp_path / "data", [("s", nucleus_shard, {"n": 8, "size": 64, "seed": 0})], patch_size=64,
                           margin=0, meta={"source": "test"}, split=SplitConfig(mode="random", val=0.0, test=0.0),
                           progress=False)
    cache = build_cache(small["vae"], [no_val], tmp_path / "latents", progress=False)  # every split: no val rows
    result = run_module("diffusion.train", *tiny_train_args(tmp_path / "run", cache), "--set", "data.splits=[val]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: {cache}: no rows in splits ['val'] (field 'data.splits')"]


def test_a_split_the_cache_did_not_encode_is_one_line(small, tmp_path):
    # was: a cache of the train split alone (what a first run builds), reused with data.splits [train, val], trained
    # on the train rows without a word
    from conftest import run_module

    from diffusion.cache import build_cache

    cache = build_cache(small["vae"], [small["synth"]], tmp_path / "latents", splits=["train"], progress=False)
    result = run_module("diffusion.train", *tiny_train_args(tmp_path / "run", cache),
                        "--set", "data.splits=[train,val]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: {cache}: latent cache encodes split(s) train, not val (field 'data.splits'); rebuild it with "
        f"mitosis-ldm cache --overwrite --split train --split val"]
    assert not (tmp_path / "run" / "model").exists()


def test_the_learning_rate_warms_up_then_follows_its_cosine_schedule(small, tmp_path):
    import json

    from diffusion.cache import build_cache
    from diffusion.train import main as train_main

    cache = build_cache(small["vae"], [small["synth"]], tmp_path / "latents", progress=False)
    train_main([*tiny_train_args(tmp_path / "run", cache, steps=4), "--set", "preview.every=0",
                "--set", "train.lr=1e-3", "--set", "train.lr_schedule=cosine", "--set", "train.lr_warmup_steps=2",
                "--set", "train.log_every=1"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # linear warm-up over 2 steps, then half a cosine from 1e-3 down to 0 over the other 2
    assert [lr[s] for s in (1, 2, 3, 4)] == pytest.approx([5e-4, 1e-3, 5e-4, 0.0], abs=1e-9)


def test_a_folder_in_the_way_of_an_auto_built_cache_is_refused_and_kept(small, tmp_path):
    from conftest import run_module

    mine = tmp_path / "notes"  # data.cache misspelt as a folder of the user's, with data.vae + data.datasets set
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    result = run_module("diffusion.train", *tiny_train_args(tmp_path / "run", mine),
                        "--set", f"data.vae={small['vae']}", "--set", f"data.datasets=[{small['synth']}]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--overwrite" in result.stderr and str(mine) in result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["todo.txt"] and (mine / "todo.txt").read_text() == "mine"
    assert not (tmp_path / "run" / "model").exists()


def test_a_cache_smaller_than_one_batch_trains_on_short_batches(small, tmp_path):
    # with drop_last the loader would hold no batch and the loop would wait for one forever
    from conftest import run_module

    from diffusion.cache import build_cache

    cache = build_cache(small["vae"], [small["real"]], tmp_path / "latents", splits=["train"], progress=False)
    assert len(np.load(cache / "labels.npy")) < 32
    result = run_module("diffusion.train", *tiny_train_args(tmp_path / "run", cache, steps=2), "--set",
                        "train.batch_size=32", "--set", "preview.every=0", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "model" / "pipeline.json").read_text())["trained_steps"] == 2


@pytest.fixture(scope="module")
def recorded(small):
    """What one 2-step run (2 batches a step, a cache of every split of both datasets, over an old run folder with
    --overwrite) hands its parts: the rows drawn, the sampler's weights, the clipping calls and each micro-batch's
    noised latents and loss target."""
    import accelerate
    import torch
    from diffusers import DDPMScheduler

    from diffusion import train as diffusion_train
    from diffusion.cache import build_cache

    seen = {"rows": [], "weights": [], "clip": [], "noised": [], "targets": []}
    get_item, add_noise = diffusion_train.LatentRows.__getitem__, DDPMScheduler.add_noise
    clip, mse_loss = accelerate.Accelerator.clip_grad_norm_, torch.nn.functional.mse_loss

    class Sampler(torch.utils.data.WeightedRandomSampler):
        def __init__(self, weights, *args, **kwargs):
            seen["weights"].append(torch.as_tensor(weights).clone())
            super().__init__(weights, *args, **kwargs)

    def row(self, i):
        seen["rows"].append(get_item(self, i))
        return seen["rows"][-1]

    def clipping(self, parameters, max_norm, *args, **kwargs):
        seen["clip"].append(max_norm)
        return clip(self, parameters, max_norm, *args, **kwargs)

    def noising(self, latents, noise, t):
        seen["noised"].append((latents.clone(), noise.clone(), t.clone()))
        return add_noise(self, latents, noise, t)

    def loss(pred, target, **kwargs):
        seen["targets"].append(target.detach().clone())
        return mse_loss(pred, target, **kwargs)

    root = small["root"]
    cache = build_cache(small["vae"], [small["synth"], small["real"]], root / "latents-recorded", progress=False)
    run = root / "recorded"
    run.mkdir()
    (run / "old.txt").write_text("an earlier run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusion_train.LatentRows, "__getitem__", row)
        patch.setattr(diffusion_train, "WeightedRandomSampler", Sampler)
        patch.setattr(accelerate.Accelerator, "clip_grad_norm_", clipping)
        patch.setattr(DDPMScheduler, "add_noise", noising)
        patch.setattr(torch.nn.functional, "mse_loss", loss)
        diffusion_train.main([*tiny_train_args(run, cache, steps=2), "--set", "preview.every=0",
                              "--set", "train.grad_accum=2", "--set", "train.max_grad_norm=0.5",
                              "--set", "diffusion.cond_dropout=0.0", "--overwrite"])
    return {**seen, "cache": cache, "run": run}


def test_overwrite_starts_the_run_folder_again(recorded):
    assert not (recorded["run"] / "old.txt").exists() and (recorded["run"] / "model" / "pipeline.json").exists()


def test_the_exported_weights_are_the_moving_average_that_the_checkpoint_keeps(recorded):
    import torch
    from safetensors.torch import load_file

    [checkpoint] = sorted((recorded["run"] / "checkpoints").glob("checkpoint-*"))
    # the EMA registered with the run: what --resume restores (accelerate's file of the first registered object)
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)
    assert ema["optimization_step"] == 2  # it followed both optimizer steps
    model = recorded["run"] / "model"
    exported = [load_file(model / part / "diffusion_pytorch_model.safetensors") for part in ("unet", "label_embedder")]
    total = sum(float(t.double().sum()) for weights in exported for t in weights.values())
    assert sum(float(t.double().sum()) for t in ema["shadow_params"]) == pytest.approx(total, rel=1e-6)


def test_training_draws_train_split_rows_with_their_own_labels(recorded):
    from diffusion.cache import LatentCache

    cache = LatentCache(recorded["cache"])
    train = cache.splits == 0
    assert 0 < train.sum() < len(train)  # the cache holds the other splits too
    label_of = {cache.latents[r, 0].astype(np.float32).tobytes(): cache.labels[r] for r in np.flatnonzero(train)}
    assert len(recorded["rows"]) >= 32
    for latent, label in recorded["rows"]:
        key = latent.numpy().tobytes()
        assert key in label_of, "a row from outside the train split"
        assert np.array_equal(label.numpy(), label_of[key], equal_nan=True), "a latent paired with another's label"


def test_the_sampler_weighs_label_bins_and_unlabelled_rows_equally(recorded):
    from diffusion.cache import LatentCache
    from diffusion.train import balance_weights

    cache = LatentCache(recorded["cache"])
    [weights] = recorded["weights"]
    assert np.allclose(weights.numpy(), balance_weights(cache.labels[cache.splits == 0], 5, 1.0))
    assert len(set(weights.tolist())) > 1  # not uniform: the labelled bins and the unlabelled rows differ in size


def test_each_optimizer_step_accumulates_two_batches_and_clips_once(recorded):
    assert len(recorded["targets"]) == 4  # 2 steps x grad_accum 2
    assert recorded["clip"] == [0.5, 0.5]


def test_the_v_prediction_target_is_the_velocity_of_the_noised_latents(recorded):
    from diffusion.train import DiffusionConfig, make_noise_scheduler

    scheduler = make_noise_scheduler(DiffusionConfig())
    assert len(recorded["noised"]) == len(recorded["targets"]) == 4
    for (latents, noise, t), target in zip(recorded["noised"], recorded["targets"]):
        assert torch_allclose(target, scheduler.get_velocity(latents, noise, t))
        assert not torch_allclose(target, noise)


def torch_allclose(a, b) -> bool:
    import torch

    return bool(torch.allclose(a.float(), b.float(), atol=1e-6))
