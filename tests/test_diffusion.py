"""Stage 3: latent cache, label embedder, pipeline folder, transitions, real2gen and their bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import launch_output, run_module

# -- tiny fixtures (shared with test_diffusion_train.py) ----------------------------------------------------


def nucleus_shard(n: int, size: int, seed: int, labelled: bool = True):
    """Pink patches with a purple disc that darkens and shrinks with the label (a stand-in for the benchmark)."""
    from patches.dataset import Shard

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    images, rows = [], []
    for i in range(n):
        label = float(rng.choice([0, 1 / 3, 2 / 3, 1])) if labelled else None
        m = label if labelled else rng.random()
        radius = size * (0.25 - 0.08 * m)
        disc = (xx ** 2 + yy ** 2) < radius ** 2
        img = np.empty((size, size, 3), np.float32)
        img[:] = (235, 180, 215)
        img[disc] = np.array((150, 90, 170)) * (1 - 0.6 * m)
        img += rng.normal(0, 6, img.shape)
        images.append(img.clip(0, 255).astype(np.uint8))
        rows.append({"id": f"p{seed}-{i}", "source": "test", "slide": f"s{seed}", "x": 0, "y": i,
                     "label": label, "votes": "", "hard_label": None if label is None else int(label >= 0.5)})
    return Shard(np.stack(images), rows)


def make_dataset(out: Path, n: int = 48, size: int = 64, seed: int = 0, labelled: bool = True) -> Path:
    from patches.dataset import SplitConfig, build_dataset

    return build_dataset(out, [("s", nucleus_shard, {"n": n, "size": size, "seed": seed, "labelled": labelled})],
                         patch_size=size, margin=0, meta={"source": "test"},
                         split=SplitConfig(mode="random", val=0.1, test=0.2, seed=seed), progress=False)


def make_vae(out: Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """A random tiny AutoencoderKL with the contract's x4 downsampling (64x64x3 -> 16x16xC)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=64, scaling_factor=1.7)
    vae.save_pretrained(out)
    return out


def tiny_train_args(out: Path, cache: Path, steps: int = 4, extra: tuple = ()) -> list[str]:
    return ["--set", f"out={out}", "--set", f"data.cache={cache}", "--set", f"train.max_steps={steps}",
            "--set", "train.batch_size=8", "--set", "train.checkpoint_every=2", "--set", "preview.every=2",
            "--set", "preview.seeds=[0]", "--set", "preview.conditions=3", "--set", "sample.steps=3",
            "--set", "model.preset=tiny", "--set", "train.lr_warmup_steps=1", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """datasets (labelled + unlabelled), a VAE, a cache and a trained-for-4-steps pipeline."""
    root = tmp_path_factory.mktemp("diffusion")
    synth = make_dataset(root / "synth", n=48, seed=0)
    real = make_dataset(root / "real", n=16, seed=1, labelled=False)
    vae = make_vae(root / "vae")
    from diffusion.cache import main as cache_main
    from diffusion.train import main as train_main

    cache_main(["--vae", str(vae), "--dataset", str(synth), "--dataset", str(real), "--out", str(root / "latents")])
    train_main(tiny_train_args(root / "run", root / "latents"))
    return {"root": root, "synth": synth, "real": real, "vae": vae, "cache": root / "latents",
            "pipeline": root / "run" / "model"}


# -- model ------------------------------------------------------------------------------------------------


def test_label_embedder_null_is_nan_and_round_trips(tmp_path):
    from diffusion.model import LabelEmbedder

    emb = LabelEmbedder(embed_dim=32, fourier_features=4, hidden=16)
    out = emb(torch.tensor([0.0, 0.5, float("nan"), 1.0]))
    assert out.shape == (4, 32) and torch.isfinite(out).all()
    assert torch.equal(out[2], emb.null.detach())
    assert not torch.allclose(out[0], out[3])
    emb.save_pretrained(tmp_path / "e")
    again = LabelEmbedder.from_pretrained(tmp_path / "e")
    assert torch.equal(again(torch.tensor([0.3, float("nan")])), emb(torch.tensor([0.3, float("nan")])))
    assert (tmp_path / "e" / "diffusion_pytorch_model.safetensors").exists()


# -- cache ------------------------------------------------------------------------------------------------


def test_cache_contents(world):
    cache = world["cache"]
    info = json.loads((cache / "cache.json").read_text())
    assert info["format"] == "mitosis-ldm/latents" and info["latent_shape"] == [4, 16, 16]
    assert info["latent_scale"] == pytest.approx(1.7) and len(info["vae_hash"]) == 64
    assert [d["count"] for d in info["datasets"]] == [48, 16] and all(d["content_hash"] for d in info["datasets"])
    latents = np.load(cache / "latents.npy")
    labels = np.load(cache / "labels.npy")
    assert latents.dtype == np.float16 and latents.shape == (64, 1, 4, 16, 16)
    assert np.isnan(labels[48:]).all() and not np.isnan(labels[:48]).any()
    assert (np.load(cache / "dataset_ids.npy") == np.repeat([0, 1], [48, 16])).all()
    # the cached latents are the VAE's scaled posterior means
    from diffusion.cache import encode_images, load_vae
    from patches.dataset import PatchDataset

    _, vae = load_vae(world["vae"])
    ref = encode_images(vae, PatchDataset(world["synth"]).uint8()[:4])
    assert torch.allclose(torch.from_numpy(latents[:4, 0].astype(np.float32)), ref, atol=2e-2)


def test_dihedral_cache_has_eight_variants(world, tmp_path):
    from diffusion.cache import build_cache

    out = build_cache(world["vae"], [world["real"]], tmp_path / "c8", use_dihedral=True, progress=False)
    latents = np.load(out / "latents.npy")
    assert latents.shape == (16, 8, 4, 16, 16)
    assert not np.allclose(latents[:, 0], latents[:, 1])  # rotated patches encode differently


def test_cache_made_with_another_vae_is_refused(world, tmp_path):
    other = make_vae(tmp_path / "other_vae", seed=1)
    result = run_module("diffusion.train", *tiny_train_args(tmp_path / "run", world["cache"]),
                        "--set", f"data.vae={other}")
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "another VAE" in err[0] and str(world["cache"]) in err[0]
    assert not (tmp_path / "run" / "model").exists()


# -- pipeline ------------------------------------------------------------------------------------------


def test_pipeline_folder_and_one_call_load(world):
    from diffusion.pipeline import MitosisPipeline

    path = world["pipeline"]
    info = json.loads((path / "pipeline.json").read_text())
    assert info["format"] == "mitosis-ldm/pipeline" and info["default_guidance"] >= 0
    stats = info["label_stats"]
    assert stats["labelled"] > 0 and stats["unlabelled"] > 0 and 0 <= stats["mean"] <= 1
    for part in ("vae", "unet", "label_embedder", "scheduler"):
        assert (path / part).is_dir()
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # safetensors + JSON only
    pipe = MitosisPipeline.from_pretrained(path.parent)  # a run folder works too
    assert pipe.latent_shape == (4, 16, 16) and pipe.image_shape == (64, 64, 3)
    previews = sorted((path.parent / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["step-000002.png", "step-000004.png"]


def test_transitions_are_deterministic_and_share_noise(world, tmp_path):
    from diffusion.sample import main as sample_main

    args = ["--pipeline", str(world["pipeline"]), "--seeds", "0-1", "--conditions", "0:1:3", "--steps", "3"]
    sample_main([*args, "--out", str(tmp_path / "a")])
    sample_main([*args, "--out", str(tmp_path / "b")])
    a = np.load(tmp_path / "a" / "frames.npy")
    b = np.load(tmp_path / "b" / "frames.npy")
    assert a.shape == (2, 3, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)  # bit-identical
    assert not np.array_equal(a[0], a[1])  # seeds differ
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["seeds"] == [0, 1] and manifest["conditions"] == [0.0, 0.5, 1.0] and manifest["steps"] == 3
    assert manifest["sampler"] == "dpm++" and len(manifest["model_hash"]) == 64
    assert manifest["guidance"] == json.loads((world["pipeline"] / "pipeline.json").read_text())["default_guidance"]
    assert (tmp_path / "a" / "strip-1.png").exists()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "unipc", "euler"])
def test_every_sampler_runs_and_shares_noise_across_conditions(world, sampler):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    frames = pipe.transitions([3], [0.5, 0.5], guidance=2.0, steps=3, sampler=sampler)
    assert frames.shape == (1, 2, 64, 64, 3)
    # same seed + same condition -> the same frame, up to the last bit of batched arithmetic (oneDNN's result
    # for a row may depend on where it sits in the batch; different noise would differ everywhere)
    assert np.abs(frames[0, 0].astype(int) - frames[0, 1]).max() <= 2


def test_guided_prediction_batches_cond_and_null(world):
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    x = torch.randn(2, 4, 16, 16)
    y = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        cond = pipe.unet(x, 500, class_labels=pipe.label_embedder(y)).sample
        null = pipe.unet(x, 500, class_labels=pipe.label_embedder(torch.full((2,), float("nan")))).sample
        guided = pipe.guided(x, 500, y, 3.0)
        assert torch.allclose(guided, null + 3.0 * (cond - null), atol=1e-4)
        assert torch.allclose(pipe.guided(x, 500, torch.full((2,), float("nan")), 3.0), null, atol=1e-5)


def test_guided_prediction_shares_the_null_half_between_equal_latents(world):
    """A transition's first step: K conditions on one latent need one unconditional row, not K."""
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    a, b = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    x = torch.cat([a, b, a, a, b])  # two distinct latents, five rows
    y = torch.tensor([0.0, 0.3, 0.5, 1.0, float("nan")])
    batches = []
    original = pipe.unet.forward
    pipe.unet.forward = lambda sample, *args, **kw: batches.append(len(sample)) or original(sample, *args, **kw)
    with torch.no_grad():
        guided = pipe.guided(x, 500, y, 3.0)
        cond = original(x, 500, class_labels=pipe.label_embedder(y)).sample
        null = original(x, 500, class_labels=pipe.label_embedder(torch.full((5,), float("nan")))).sample
    assert batches == [5 + 2]  # five conditional rows, one null row per distinct latent
    expected = torch.where(torch.isnan(y)[:, None, None, None], null, null + 3.0 * (cond - null))
    assert torch.allclose(guided, expected, atol=1e-4)


def test_ddim_inversion_round_trip(world):
    """Inverting and sampling forward under the same label returns the latent (fixed-point DDIM inversion)."""
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    z0 = torch.randn(3, 4, 16, 16) * 0.8
    labels = torch.tensor([0.0, float("nan"), 1.0])
    noise = pipe.invert(z0, labels, 2.0, 10)
    back = pipe.from_inverted(noise, labels, 2.0, 10)
    assert (back - z0).abs().mean() < 0.02 * z0.abs().mean()
    assert (noise - z0).abs().mean() > 0.3  # it did move to a noise level


def test_partial_inversion_round_trip_and_keeps_more_of_the_input(world):
    """Inverting half the schedule: exact round trip, a lower noise level, and other labels redraw less."""
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    z0 = torch.randn(3, 4, 16, 16) * 0.8
    own = torch.full((3,), float("nan"))
    half = pipe.invert(z0, own, 2.0, 10, strength=0.5)
    full = pipe.invert(z0, own, 2.0, 10)
    assert (pipe.from_inverted(half, own, 2.0, 10, strength=0.5) - z0).abs().mean() < 0.02 * z0.abs().mean()
    assert 0.05 < (half - z0).abs().mean() < (full - z0).abs().mean()
    other = torch.tensor([0.0, 1.0, 1.0])
    drift_half = (pipe.from_inverted(half, other, 2.0, 10, strength=0.5) - z0).abs().mean()
    drift_full = (pipe.from_inverted(full, other, 2.0, 10) - z0).abs().mean()
    assert drift_half < drift_full


def test_real2gen_invert_and_sdedit(world, tmp_path):
    from diffusion.real2gen import main as r2g_main

    common = ["--pipeline", str(world["pipeline"]), "--input", str(world["real"]), "--limit", "3",
              "--conditions", "0:1:3", "--steps", "4"]
    r2g_main([*common, "--mode", "invert", "--out", str(tmp_path / "inv")])
    frames = np.load(tmp_path / "inv" / "frames.npy")
    manifest = json.loads((tmp_path / "inv" / "manifest.json").read_text())
    assert frames.shape == (3, 4, 64, 64, 3)
    assert manifest["kind"] == "real2gen" and manifest["has_input_frame"] is True
    assert manifest["conditions"] == [None, 0.0, 0.5, 1.0] and manifest["input_labels"] == [None] * 3
    info = json.loads((world["pipeline"] / "pipeline.json").read_text())
    assert manifest["guidance"] == info["default_real2gen_guidance"]
    from patches.dataset import PatchDataset

    assert np.array_equal(frames[:, 0], PatchDataset(world["real"]).uint8()[:3])  # column 0 = the real input
    recon = np.load(tmp_path / "inv" / "reconstructions.npy")
    assert recon.shape == (3, 2, 64, 64, 3)
    # the inversion reproduces the VAE's reconstruction closely (random VAE: compare in latent-free terms)
    assert np.mean(manifest["psnr_inversion_db"]) > np.mean(manifest["psnr_vae_db"]) - 1.0
    assert manifest["strength"] == info["default_real2gen_strength"] == 1.0  # the pipeline's default: all of it
    r2g_main([*common, "--mode", "invert", "--strength", "0.5", "--out", str(tmp_path / "inv-half")])
    half = json.loads((tmp_path / "inv-half" / "manifest.json").read_text())
    assert half["strength"] == 0.5 and np.mean(half["psnr_inversion_db"]) > np.mean(half["psnr_vae_db"]) - 1.0
    r2g_main([*common, "--mode", "sdedit", "--strength", "0.3", "--out", str(tmp_path / "sd")])
    assert json.loads((tmp_path / "sd" / "manifest.json").read_text())["strength"] == 0.3


# -- bad input: one clear line, no partial output --------------------------------------------------------


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, needles", [
    (["--conditions", "0,1.5"], ["--conditions", "1.5", "outside [0, 1]"]),
    (["--conditions", "0.5:1.2:3"], ["--conditions", "1.2", "outside [0, 1]"]),
    (["--guidance", "-1"], ["--guidance", ">= 0"]),
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--seeds-per-batch", "0"], ["--seeds-per-batch", ">= 1, got 0"]),
    # a repeat rendered the same transition twice, wrote one strip for both and counted it twice in the report
    (["--seeds", "0-2,1"], ["--seeds", "1 appears more than once in '0-2,1'"]),
    (["--conditions", "0,0.5,0.5,1"], ["--conditions", "0.5 appears more than once"]),
    (["--conditions", "0:0:3"], ["--conditions", "0 appears more than once"]),
])
def test_bad_sampling_flags(world, tmp_path, flags, needles):
    out = tmp_path / "t"
    result = run_module("diffusion.sample", "--pipeline", world["pipeline"], "--seeds", "0", *flags, "--out", out)
    _one_line_error(result, *needles)
    assert not out.exists()


def test_real2gen_bad_condition(world, tmp_path):
    out = tmp_path / "r"
    result = run_module("diffusion.real2gen", "--pipeline", world["pipeline"], "--input", world["real"],
                        "--conditions", "0,2", "--out", out)
    _one_line_error(result, "--conditions", "outside [0, 1]")
    assert not out.exists()


def test_pipeline_missing_a_part(world, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(world["pipeline"], broken)
    shutil.rmtree(broken / "label_embedder")
    out = tmp_path / "t"
    result = run_module("diffusion.sample", "--pipeline", broken, "--seeds", "0", "--out", out)
    _one_line_error(result, str(broken), "label_embedder/", "missing")
    assert not out.exists()


def test_vae_latent_shape_not_matching_unet(world, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(world["pipeline"], broken)
    shutil.rmtree(broken / "vae")
    make_vae(broken / "vae", latent_channels=8)
    (broken / "integrity.json").unlink()  # a pipeline put together by hand has no recorded hashes
    out = tmp_path / "t"
    result = run_module("diffusion.sample", "--pipeline", broken, "--seeds", "0", "--out", out)
    _one_line_error(result, "8x16x16", "4x16x16")
    assert not out.exists()


def test_existing_output_needs_overwrite(world, tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    result = run_module("diffusion.sample", "--pipeline", world["pipeline"], "--seeds", "0", "--out", out)
    _one_line_error(result, "already exists", "--overwrite")


def test_cache_refuses_non_vae(world, tmp_path):
    result = run_module("diffusion.cache", "--vae", world["synth"], "--dataset", world["synth"],
                        "--out", tmp_path / "c")
    _one_line_error(result, "patch dataset folder", "--vae")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_seeds_split_across_two_processes(world, tmp_path):
    import subprocess

    from conftest import REPO, accelerate_cmd

    args = ["--pipeline", world["pipeline"], "--seeds", "0-2", "--conditions", "0:1:3", "--steps", "3",
            "--seeds-per-batch", "1"]
    cmd = accelerate_cmd("diffusion.sample", *args, "--out", tmp_path / "two", processes=2)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, launch_output(result.stderr)
    from diffusion.sample import main as sample_main

    sample_main([*map(str, args), "--out", str(tmp_path / "one")])
    two = np.load(tmp_path / "two" / "frames.npy")
    one = np.load(tmp_path / "one" / "frames.npy")
    assert two.shape == one.shape == (3, 3, 64, 64, 3)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["seeds"] == [0, 1, 2]  # gathered in order
    assert np.abs(two.astype(int) - one).max() <= 2  # same frames (thread counts may change the last bit)
