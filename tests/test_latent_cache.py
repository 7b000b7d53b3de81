"""The latent cache's encoding and its refusals (diffusion/cache.py), on tiny in-process artifacts: what the latents
are, the dihedral variants, --mode sample and --seed, --overwrite, and the inputs refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_artifacts
from diffusion.cache import build_cache, check_cache, decode_latents, dihedral, encode_images, main as cache_main
from mitosis_ldm.errors import UserError


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    vae, data = tiny_artifacts.autoencoder(root / "vae"), tiny_artifacts.dataset(root / "data")
    return {"root": root, "vae": vae, "data": data}


def latents_of(folder) -> np.ndarray:
    return np.load(Path(folder) / "latents.npy")


def test_the_eight_dihedral_variants_are_eight_different_images():
    images = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)  # (B, 3, H, W), no symmetry
    variants = [dihedral(images, k) for k in range(8)]
    assert torch.equal(variants[0], images) and all(v.shape == images.shape for v in variants)
    assert len({tuple(v.flatten().tolist()) for v in variants}) == 8


def test_latents_are_the_shifted_scaled_posterior_means_and_decoding_undoes_it():
    # a VAE with a shift factor (as SD3's has): latent = (mean - shift) * scale, decode takes latent / scale + shift
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=1.5,
                        shift_factor=0.25).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (3, 3, 16, 16) in [-1, 1]
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        decoded = vae.decode(mean).sample
    latents = encode_images(vae, images, batch_size=2)  # two batches
    assert latents.shape == (3, 4, 8, 8) and torch.allclose(latents, (mean - 0.25) * 1.5, atol=1e-5)
    expected = ((decoded.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(decode_latents(vae, latents).astype(int) - expected).max() <= 1


def test_encoding_sends_the_images_to_the_vaes_device():
    # on a GPU, the CPU images once met the VAE's CUDA weights (the cache, real2gen and the posterior all encode
    # here). The meta device stands in for the GPU.
    from types import SimpleNamespace

    class OnAnotherDevice(torch.nn.Module):
        config = SimpleNamespace(scaling_factor=2.0, shift_factor=None)

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
            self.seen = []

        def encode(self, x):
            self.seen.append(x.device.type)
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.ones(len(x), 4, 2, 2)))

    vae = OnAnotherDevice()
    got = encode_images(vae, np.zeros((5, 8, 8, 3), np.uint8), batch_size=2)
    assert vae.seen == ["meta"] * 3 and got.shape == (5, 4, 2, 2) and float(got[0, 0, 0, 0]) == 2.0


def test_mode_sample_draws_from_the_posterior_and_the_seed_picks_the_draw(parts):
    root = parts["root"]

    def cache(name, **keys):
        return latents_of(build_cache(parts["vae"], [parts["data"]], root / name, progress=False, **keys))

    mean = cache("mean")
    first, again, other = (cache(name, mode="sample", seed=seed) for name, seed in (("s0", 0), ("s0b", 0), ("s1", 1)))
    assert np.array_equal(first, again)
    assert not np.allclose(first, other) and not np.allclose(first, mean)
    assert json.loads((root / "s1" / "cache.json").read_text())["mode"] == "sample"


def test_overwrite_replaces_a_cache_and_without_it_the_cache_is_kept(parts, tmp_path, capsys):
    out = tmp_path / "latents"
    args = ["--vae", str(parts["vae"]), "--dataset", str(parts["data"]), "--out", str(out)]
    cache_main(args)
    before = latents_of(out)
    with pytest.raises(SystemExit) as exit_info:
        cache_main([*args, "--dihedral"])
    assert exit_info.value.code == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert np.array_equal(latents_of(out), before)
    cache_main([*args, "--dihedral", "--overwrite"])
    assert latents_of(out).shape[1] == 8 and json.loads((out / "cache.json").read_text())["dihedral"] is True


def test_an_existing_cache_is_refused_before_the_vae_is_read(parts, tmp_path):
    (tmp_path / "latents").mkdir()
    with pytest.raises(UserError, match="latents: already exists; pass --overwrite"):
        build_cache(tmp_path / "no-such-vae", [parts["data"]], tmp_path / "latents", progress=False)


def test_latents_that_overflow_float16_are_refused(parts, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(parts["vae"])
    vae.register_to_config(scaling_factor=1e6)  # latents of order 1e6: inf in float16
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(UserError, match="the VAE produced non-finite latents"):
        build_cache(tmp_path / "vae", [parts["data"]], tmp_path / "latents", progress=False)
    assert not (tmp_path / "latents").exists()


def test_datasets_of_different_patch_sizes_are_refused(parts, tmp_path):
    from test_cache_stale import dataset as eight_pixel_dataset

    small = eight_pixel_dataset(tmp_path / "small")
    with pytest.raises(UserError, match=r"--dataset: patch sizes differ \(\[8, 32\]\)"):
        build_cache(parts["vae"], [parts["data"], small], tmp_path / "latents", progress=False)
    assert not (tmp_path / "latents").exists()


def test_a_split_no_dataset_holds_is_refused(parts, tmp_path):
    from patches.dataset import Shard, SplitConfig, build_dataset

    def shard():
        images = np.random.default_rng(0).integers(0, 256, (4, tiny_artifacts.SIZE, tiny_artifacts.SIZE, 3), np.uint8)
        return Shard(images, [{"id": f"p{i}", "source": "test", "slide": "s0", "x": i, "y": i, "label": 0.0,
                               "votes": "", "hard_label": 0} for i in range(4)])

    train_only = build_dataset(tmp_path / "train-only", [("s0", shard, {})], patch_size=tiny_artifacts.SIZE, margin=0,
                               meta={"source": "test"}, split=SplitConfig(mode="random", val=0.0, test=0.0),
                               progress=False)
    with pytest.raises(UserError, match=r"--split: the datasets hold no rows in split\(s\) val"):
        build_cache(parts["vae"], [train_only], tmp_path / "latents", splits=["val"], progress=False)
    assert not (tmp_path / "latents").exists()


def test_a_cache_made_from_relative_paths_is_accepted_for_them_and_for_absolute_ones(parts, monkeypatch):
    monkeypatch.chdir(parts["root"])
    cache = build_cache(Path("vae"), [Path("data")], Path("relative"), progress=False)
    check_cache(cache, "vae", ["data"])
    check_cache(parts["root"] / "relative", parts["vae"], [parts["data"]])


def _damage_cache(folder: Path, damage: str) -> str:
    """Apply one damage to a cache folder; returns the file the error line must name."""
    def npy(name, change):
        np.save(folder / f"{name}.npy", change(np.load(folder / f"{name}.npy")))
        return f"{name}.npy"

    def info(change):
        data = json.loads((folder / "cache.json").read_text())
        change(data)
        (folder / "cache.json").write_text(json.dumps(data))
        return "cache.json"

    return {
        "a label short": lambda: npy("labels", lambda a: a[:-1]),
        "latents of 4 axes": lambda: npy("latents", lambda a: a[:, 0]),
        "a label of 1.5": lambda: npy("labels", lambda a: np.where(np.arange(len(a)) == 0, 1.5, a).astype(a.dtype)),
        "split code 7": lambda: npy("splits", lambda a: np.full_like(a, 7)),
        "a dataset id beyond the list": lambda: npy("dataset_ids", lambda a: a + 5),
        "latent_scale as text": lambda: info(lambda d: d.update(latent_scale="x")),
        "no datasets": lambda: info(lambda d: d.update(datasets=[])),
        "a dataset without patch_size": lambda: info(lambda d: d["datasets"][0].pop("patch_size")),
    }[damage]()


@pytest.mark.parametrize("damage", ["a label short", "latents of 4 axes", "a label of 1.5", "split code 7",
                                    "a dataset id beyond the list", "latent_scale as text", "no datasets",
                                    "a dataset without patch_size"])
def test_a_cache_whose_parts_do_not_hold_together_is_refused_when_read(parts, tmp_path, damage):
    """Diffusion training reads the cache: a short labels.npy was an IndexError and a cache.json without its
    datasets a KeyError, after the run folder was made. Only `mitosis-ldm check` looked at the lengths."""
    import shutil

    from diffusion.cache import LatentCache
    from mitosis_ldm import integrity

    folder = tmp_path / "latents"
    build_cache(parts["vae"], [parts["data"]], folder, progress=False)
    LatentCache(folder)
    (folder / integrity.MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder / "vae" / integrity.MANIFEST, ignore_errors=True)
    name = _damage_cache(folder, damage)
    with pytest.raises(UserError, match=f"^{folder / name}: "):
        LatentCache(folder)
