"""Autoencoder stage: model presets, losses, round trips, training end to end, the CLI and its bad inputs."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from autoencoder.cli import encode as cli_encode
from autoencoder.losses import (PatchDiscriminator, adaptive_gan_weight, build_lpips, discriminator_step,
                                generator_gan_loss, hinge_d_loss, ssim)
from autoencoder.model import PRESETS, build_autoencoder, count_parameters
from mitosis_ldm.errors import UserError
from patches.dataset import PatchDataset

from conftest import REPO, accelerate_cmd, run_module

TINY_TRAIN = ["--set", "train.batch_size=8", "--set", "data.crop=16", "--set", "train.log_every=1",
              "--set", "data.scale_patches=32", "--set", "data.eval_limit=8", "--set", "train.lr_warmup_steps=2"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Two small synthetic patch datasets (32x32) made by the real `data synth` command."""
    root = tmp_path_factory.mktemp("ae-data")
    paths = []
    for seed in (0, 1):
        out = root / f"synth{seed}"
        result = run_module("mitosis_ldm", "data", "synth", "--out", out, "--n", "64", "--size", "32",
                            "--experts", "3", "--seed", str(seed))
        assert result.returncode == 0, result.stderr
        paths.append(out)
    return paths


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory):
    """One short real training run through `accelerate launch` on both datasets, EMA on."""
    run_dir = tmp_path_factory.mktemp("ae-run") / "run"
    cmd = accelerate_cmd("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", run_dir,
                         "--set", f"data.datasets=[{tiny_data[0]},{tiny_data[1]}]", "--set", "train.max_steps=12",
                         "--set", "train.ema_decay=0.9", "--set", "data.eval_every=6", "--set",
                         "train.checkpoint_every=6", *TINY_TRAIN)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_presets_downsample_by_four_with_configurable_latents():
    for preset in PRESETS:
        vae = build_autoencoder(preset, latent_channels=6)
        with torch.no_grad():
            z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
        assert z.shape == (1, 6, 16, 16)
    assert count_parameters(build_autoencoder("tiny")) < 1.5e6
    with pytest.raises(ValueError):
        build_autoencoder("huge")


def test_save_pretrained_round_trip_reproduces_encodings(tmp_path):
    torch.manual_seed(0)
    vae = build_autoencoder("tiny").eval()
    vae.register_to_config(scaling_factor=0.123)
    vae.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    loaded = AutoencoderKL.from_pretrained(tmp_path / "m").eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(x).latent_dist.mode(), loaded.encode(x).latent_dist.mode())
        z = torch.randn(2, 4, 16, 16)
        assert torch.equal(vae.decode(z).sample, loaded.decode(z).sample)
    assert loaded.config.scaling_factor == pytest.approx(0.123)


def test_losses():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(x, -x).item() < 0.5
    disc = PatchDiscriminator(16, 2)
    logits = disc(x)
    assert logits.ndim == 4 and logits.shape[1] == 1
    # hinge: confident correct logits give zero loss, wrong ones a positive loss
    assert hinge_d_loss(torch.full((2, 1), 2.0), torch.full((2, 1), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.full((2, 1), -1.0), torch.full((2, 1), 1.0)).item() == pytest.approx(2.0)
    # the autoencoder's adversarial term falls as the discriminator calls its reconstructions real
    assert generator_gan_loss(disc, x).item() == pytest.approx(-logits.mean().item())
    layer = torch.nn.Parameter(torch.randn(4, 4))
    rec = (layer ** 2).sum()
    gan = (10 * layer).sum()
    weight = adaptive_gan_weight(rec, gan, layer)
    expected = (2 * layer).norm() / ((10 * torch.ones(4, 4)).norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_discriminator_learns_from_its_own_loss_only():
    """The autoencoder's adversarial term leaves the discriminator no gradient, and the discriminator's step follows
    its hinge loss alone, whatever gradient was left on it."""
    torch.manual_seed(0)
    disc = PatchDiscriminator(16, 2)
    source = torch.nn.Parameter(torch.randn(2, 3, 32, 32))  # stands in for the decoder
    images, recon = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tanh(source)
    generator_gan_loss(disc, recon).backward()
    assert source.grad is not None and source.grad.abs().sum() > 0  # the term reaches the autoencoder
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.parameters())

    before = [p.detach().clone() for p in disc.parameters()]
    d_loss = hinge_d_loss(disc(images), disc(recon.detach()))
    expected = torch.autograd.grad(d_loss, list(disc.parameters()))
    for p in disc.parameters():
        p.grad = torch.full_like(p, 5.0)  # a stale gradient, e.g. from a generator pass
    loss = discriminator_step(disc, torch.optim.SGD(disc.parameters(), lr=1.0), images, recon)
    assert loss == pytest.approx(d_loss.item())  # the loss before the step
    for p, b, g in zip(disc.parameters(), before, expected):
        torch.testing.assert_close(p.detach(), b - g, rtol=1e-5, atol=1e-6)
        assert p.grad is None


def test_lpips_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the weights are absent
    with pytest.raises(UserError, match="never downloaded"):
        build_lpips("alex")


def test_training_exports_model_with_measured_latent_scale(trained, tiny_data):
    model = trained / "model"
    assert (model / "config.json").exists() and (model / "diffusion_pytorch_model.safetensors").exists()
    assert not list(model.glob("*.bin")) and not list(model.glob("*.pkl"))
    vae = AutoencoderKL.from_pretrained(model).eval()
    # the stored scale is 1/std of the training latents, measured on the exported weights
    images = np.concatenate([PatchDataset(p, split="train").uint8() for p in tiny_data])[:32]
    subset = np.concatenate([PatchDataset(p, split="train").uint8(
        np.sort(np.random.default_rng(0).choice(len(PatchDataset(p, split="train")), 16, replace=False)))
        for p in tiny_data])
    z = cli_encode(vae, subset)
    assert vae.config.scaling_factor == pytest.approx(1.0 / z.std().item(), rel=1e-4)
    assert cli_encode(vae, images).shape[1:] == (4, 8, 8)
    records = [json.loads(line) for line in (trained / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("psnr/synth0" in r for r in records) and all(np.isfinite(r.get("loss", 0)) for r in records)
    assert [int(p.name.split("-")[1]) for p in (trained / "checkpoints").iterdir()] == [12]  # keep 1, last at 12
    run = json.loads((trained / "run.json").read_text())
    assert run["process_ranks"] == [0]
    info = json.loads((model / "training.json").read_text())
    assert info["steps"] == 12 and info["latent_scale"] == pytest.approx(vae.config.scaling_factor)
    assert info["preset"] == "tiny" and info["init_from"] is None and info["decoder_only"] is False


def test_ema_weights_are_exported(tmp_path, tiny_data):
    """With ema_decay 0.5 after 3 steps the exported weights differ from the raw ones in the last checkpoint."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", out,
                        "--set", f"data.datasets=[{tiny_data[0]}]", "--set", "train.max_steps=3",
                        "--set", "train.ema_decay=0.5", "--set", "train.checkpoint_every=3", *TINY_TRAIN)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = load_file(out / "model" / "diffusion_pytorch_model.safetensors")
    raw = load_file(out / "checkpoints" / "checkpoint-3" / "model.safetensors")
    key = "decoder.conv_out.weight"
    raw_key = next(k for k in raw if k.endswith(key))
    assert not torch.equal(exported[key], raw[raw_key])


def test_gan_loss_joins_after_start_step(tmp_path, tiny_data):
    out = tmp_path / "run"
    result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", out,
                        "--set", f"data.datasets=[{tiny_data[0]}]", "--set", "train.max_steps=4",
                        "--set", "loss.gan=0.5", "--set", "loss.gan_start=2", "--set", "train.checkpoint_every=0",
                        *TINY_TRAIN)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line]
    by_step = {r["step"]: r for r in records}
    assert "d_loss" not in by_step[1] and "d_loss" not in by_step[2]
    assert "d_loss" in by_step[3] and by_step[4]["gan_weight"] > 0


def test_refuses_existing_run_and_bad_config(tmp_path, tiny_data, trained):
    result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", trained,
                        "--set", f"data.datasets=[{tiny_data[0]}]")
    assert result.returncode == 2 and "already exists" in result.stderr
    result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", tmp_path / "x",
                        "--set", f"data.datasets=[{tiny_data[0]}]", "--set", "data.crop=30")
    assert result.returncode == 2 and "data.crop" in result.stderr and not (tmp_path / "x").exists()
    result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", tmp_path / "y",
                        "--set", f"data.datasets=[{tmp_path / 'missing'}]")
    assert result.returncode == 2 and "missing" in result.stderr and not (tmp_path / "y").exists()
    result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", tmp_path / "z",
                        "--set", f"data.datasets=[{tiny_data[0]}]", "--set", "loss.lpips=0.1",
                        env={"TORCH_HOME": str(tmp_path / "empty-hub")})
    assert result.returncode == 2 and "loss.lpips" in result.stderr and not (tmp_path / "z").exists()
    # 3 discriminator layers shrink a 16-pixel crop to nothing: was a conv RuntimeError at gan_start, after training
    result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", tmp_path / "d",
                        "--set", f"data.datasets=[{tiny_data[0]}]", "--set", "loss.gan=0.5", "--set",
                        "loss.disc_layers=3", *TINY_TRAIN)
    assert result.returncode == 2 and not (tmp_path / "d").exists()
    assert result.stderr.strip() == ("error: loss.disc_layers: 3 layers leave no logits for the 16-pixel training "
                                     "images; use fewer layers or a larger data.crop"), result.stderr


def test_the_discriminators_logit_map_size_matches_its_forward_pass():
    for layers in range(5):
        disc = PatchDiscriminator(8, layers)
        for side in (16, 17, 32, 64):
            expected = disc.output_size(side)
            if expected < 1:
                with pytest.raises(RuntimeError):
                    disc(torch.zeros(1, 3, side, side))
            else:
                assert disc(torch.zeros(1, 3, side, side)).shape[-2:] == (expected, expected)


@pytest.mark.parametrize("name", ["demo", "full", "long"])
def test_shipped_configs_load(name):
    from autoencoder.train import AutoencoderConfig
    from mitosis_ldm.config import load_config

    cfg = load_config(AutoencoderConfig, REPO / "configs" / name / "autoencoder.yaml")
    assert cfg.data.crop % 4 == 0 and cfg.model.preset in PRESETS


def test_decoder_only_training_keeps_the_encoder_and_its_latents(tmp_path, tiny_data, trained):
    """Finishing a trained autoencoder's decoder on whole patches of only one of its two datasets: the encoder (so
    every latent) is bit-identical, the latent scale is the starting model's rather than one re-measured on the
    finishing data, the decoder has learned, and the export says where it started."""
    from safetensors.torch import load_file

    out = tmp_path / "finish"
    result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", out,
                        "--set", f"data.datasets=[{tiny_data[0]}]", "--set", "train.max_steps=3",
                        "--set", f"model.init_from={trained}", "--set", "model.decoder_only=true",
                        *TINY_TRAIN, "--set", "data.crop=0", "--set", "train.checkpoint_every=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained)" in result.stdout and "from " in result.stdout
    before = load_file(trained / "model" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "model" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder and len(encoder) + len(decoder) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert not all(torch.equal(before[k], after[k]) for k in decoder)
    old, new = (AutoencoderKL.from_pretrained(p / "model").eval() for p in (trained, out))
    images = PatchDataset(tiny_data[0], split="train").uint8()[:8]
    assert torch.equal(cli_encode(old, images), cli_encode(new, images))  # the same latents, the same scale
    assert new.config.scaling_factor == old.config.scaling_factor
    # what a re-measurement on the finishing dataset alone would have stored instead
    remeasured = 1.0 / cli_encode(new, PatchDataset(tiny_data[0], split="train").uint8()).std().item()
    assert remeasured != pytest.approx(old.config.scaling_factor, rel=1e-4)
    info = json.loads((out / "model" / "training.json").read_text())
    assert info["init_from"] == str(trained) and info["decoder_only"] is True and info["preset"] is None
    assert info["latent_scale"] == old.config.scaling_factor and "kept from model.init_from" in result.stdout


def test_decoder_only_needs_a_starting_autoencoder(tmp_path, tiny_data):
    for extra, field in ((["--set", "model.decoder_only=true"], "model.decoder_only"),
                         (["--set", f"model.init_from={tmp_path / 'nowhere'}"], "model.init_from")):
        out = tmp_path / "run"
        result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", out,
                            "--set", f"data.datasets=[{tiny_data[0]}]", *extra, *TINY_TRAIN)
        assert result.returncode == 2 and field in result.stderr and not out.exists(), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_balance_draws_each_dataset_equally_often():
    from torch.utils.data import ConcatDataset, RandomSampler, TensorDataset

    from autoencoder.train import DataConfig, sampler

    data = ConcatDataset([TensorDataset(torch.zeros(10)), TensorDataset(torch.ones(30))])
    balanced = sampler(data, DataConfig(balance=True))
    assert balanced.weights[:10].sum().item() == pytest.approx(balanced.weights[10:].sum().item())
    assert len(balanced) == 40  # an epoch is still one draw per patch
    assert isinstance(sampler(data, DataConfig(balance=False)), RandomSampler)


def test_held_out_patches_are_scored_in_model_range(tiny_data, monkeypatch):
    """The held-out images are the split's first patches in [-1, 1], and a perfect reconstruction scores SSIM 1 and
    a PSNR that only 8-bit rounding limits."""
    from autoencoder import train
    from autoencoder.cli import to_tensor

    held_out = train.held_out_images(train.DataConfig(datasets=[str(tiny_data[0])]), "val", 4)
    expected = to_tensor(PatchDataset(tiny_data[0], split="val").uint8(np.arange(4)))
    assert list(held_out) == ["synth0"] and torch.equal(held_out["synth0"], expected)
    monkeypatch.setattr(train, "reconstruct", lambda vae, images: images)
    psnr, ssim_value = train.psnr_ssim(None, expected)
    assert psnr > 60 and ssim_value == pytest.approx(1.0, abs=1e-5)


def test_fine_tuning_a_whole_autoencoder_on_one_full_batch(tmp_path, tiny_data, trained):
    """model.init_from without decoder_only, one step on a batch of the whole train split (a batch as large as the
    split is allowed): the logged KL is the starting model's posterior KL summed over latent elements, averaged over
    the images and divided by one image's pixels, and the latent scale of the changed encoder is measured anew."""
    from autoencoder.cli import to_tensor

    train_set = PatchDataset(tiny_data[0], split="train")
    out = tmp_path / "tuned"
    result = run_module("autoencoder.train", "--config", "configs/demo/autoencoder.yaml", "--out", out,
                        "--set", f"data.datasets=[{tiny_data[0]}]", "--set", "train.max_steps=1",
                        "--set", f"model.init_from={trained}", *TINY_TRAIN,
                        "--set", f"train.batch_size={len(train_set)}",
                        "--set", "data.crop=0", "--set", "data.dihedral=false", "--set", "train.lr_warmup_steps=0",
                        "--set", "train.checkpoint_every=0")
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
                 if '"kl"' in line]
    old = AutoencoderKL.from_pretrained(trained / "model")
    with torch.no_grad():
        kl = old.encode(to_tensor(train_set.uint8())).latent_dist.kl()  # (N,)
    assert record["kl"] == pytest.approx(kl.mean().item() / (3 * 32 * 32), rel=1e-4)
    assert "(measured)" in result.stdout
    assert AutoencoderKL.from_pretrained(out / "model").config.scaling_factor != old.config.scaling_factor
