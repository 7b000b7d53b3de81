"""`train.mixed_precision: bf16` on a machine without a GPU (CPU autocast): each stage the GPU recipes train in bf16
(diffusion, autoencoder, classifier) trains, says so in run.json, and still exports float32 weights that load and
sample, reconstruct or score."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from classifier_data import make_toy_dataset
from conftest import run_module
from test_autoencoder import TINY_TRAIN
from test_classifier_train import tiny_args
from test_diffusion import make_dataset, make_vae, tiny_train_args


@pytest.mark.slow
def test_a_bf16_diffusion_run_on_the_cpu_exports_float32_weights_that_sample(tmp_path):
    import torch

    from diffusion.cache import main as cache_main
    from diffusion.pipeline import MitosisPipeline

    synth = make_dataset(tmp_path / "synth", n=24, seed=0)
    cache_main(["--vae", str(make_vae(tmp_path / "vae")), "--dataset", str(synth), "--out", str(tmp_path / "latents")])
    run = tmp_path / "run"
    # its own process: accelerate keeps one mixed-precision setting a process
    done = run_module("diffusion.train", *tiny_train_args(run, tmp_path / "latents", steps=2),
                      "--set", "train.mixed_precision=bf16", "--set", "preview.every=0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["mixed_precision"] == "bf16"
    weights = load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in weights.values())
    frames = MitosisPipeline.from_pretrained(run / "model").transitions([0], [0.0, 1.0], steps=2)
    assert frames.dtype == np.uint8 and frames.shape[:2] == (1, 2) and frames.std() > 0


def float_tensors(path):
    """The floating-point tensors of a safetensors file (batch norms also hold an int64 step count)."""
    return {name: t for name, t in load_file(str(path)).items() if t.is_floating_point()}


@pytest.mark.slow
def test_a_bf16_autoencoder_run_with_its_discriminator_exports_float32_weights_that_round_trip(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from patches.dataset import PatchDataset

    data = tmp_path / "synth"
    made = run_module("mitosis_ldm", "data", "synth", "--out", data, "--n", "48", "--size", "32", "--experts", "3",
                      "--seed", "0")
    assert made.returncode == 0, made.stderr[-2000:]
    run = tmp_path / "run"
    # the patch-GAN from step 0 and EMA on, as the GPU recipe trains them in bf16
    done = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", run,
                      "--set", f"data.datasets=[{data}]", "--set", "train.max_steps=3", *TINY_TRAIN,
                      "--set", "train.mixed_precision=bf16", "--set", "train.ema_decay=0.9",
                      "--set", "loss.gan=0.5", "--set", "loss.gan_start=0", "--set", "loss.disc_channels=8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["mixed_precision"] == "bf16"
    logged = [json.loads(line) for line in open(run / "logs" / "metrics.jsonl")]
    d_losses = [rec["d_loss"] for rec in logged if "d_loss" in rec]
    assert len(d_losses) == 3 and np.isfinite(d_losses).all()  # the discriminator stepped every step
    weights = float_tensors(run / "model" / "diffusion_pytorch_model.safetensors")
    assert len(weights) > 0
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in weights.values())
    vae = AutoencoderKL.from_pretrained(run / "model").eval()
    assert vae.dtype == torch.float32 and np.isfinite(vae.config.scaling_factor)
    patch = torch.from_numpy(PatchDataset(data, split="val").uint8([0])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(patch).latent_dist.mode()).sample
    assert recon.shape == (1, 3, 32, 32) and recon.dtype == torch.float32 and torch.isfinite(recon).all()


@pytest.mark.slow
def test_a_bf16_classifier_run_exports_float32_members_with_finite_calibration(tmp_path):
    import torch

    from classifier.model import ClassifierEnsemble
    from patches.dataset import PatchDataset

    toy = make_toy_dataset(tmp_path / "toy", n=120, size=32)
    run = tmp_path / "run"
    # EMA on, as the GPU recipe; every member judged on the validation split at steps 2 and 4
    done = run_module("classifier.train", *tiny_args(toy, run, 4, 2, 2), "--set", "train.mixed_precision=bf16",
                      "--set", "train.ema_decay=0.9")
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["members"] == 2
    for k in range(2):
        member = run / "members" / f"member-{k}"
        assert json.loads((member / "run.json").read_text())["mixed_precision"] == "bf16"
        record = json.loads((member / "member.json").read_text())
        assert np.isfinite([record["best_val_loss"], record["calibrated_val_loss"]]).all()
        for path in (member / "member.safetensors", run / "model" / f"member-{k}.safetensors"):
            weights = float_tensors(path)
            assert len(weights) > 0, path
            assert {t.dtype for t in weights.values()} == {torch.float32}, path
            assert all(torch.isfinite(t).all() for t in weights.values()), path
        assert np.isfinite([meta["calibration"][k]["scale"], meta["calibration"][k]["bias"]]).all()
    probs = ClassifierEnsemble.from_pretrained(run).predict(PatchDataset(toy, split="test").uint8())
    assert probs.shape[1] == 2 and probs.dtype == np.float32
    assert np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()
