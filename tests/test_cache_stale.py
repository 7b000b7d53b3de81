"""A latent cache is refused when the VAE or a dataset it was made from has changed since (`check_cache`)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import tiny_artifacts
from diffusion.cache import build_cache, check_cache
from mitosis_ldm.errors import UserError
from patches.dataset import Shard, SplitConfig, build_dataset, read_meta


def shard(first_label: float) -> Shard:
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    rows = [{"id": f"p{i}", "source": "test", "slide": "s", "x": i, "y": i, "label": first_label if i == 0 else 0.0,
             "votes": "", "hard_label": int((first_label if i == 0 else 0.0) >= 0.5)} for i in range(4)]
    return Shard(images, rows)


def dataset(out, first_label: float = 0.0, overwrite: bool = False):
    return build_dataset(out, [("s", shard, {"first_label": first_label})], patch_size=8, margin=0,
                         meta={"source": "test"}, split=SplitConfig(mode="random"), overwrite=overwrite,
                         progress=False)


def cache_of(folder, datasets):
    """A latent cache of the datasets, made by `build_cache` with a tiny VAE."""
    return build_cache(tiny_artifacts.autoencoder(folder.with_name(folder.name + "-vae")), datasets, folder,
                       progress=False)


def test_a_cache_is_refused_for_a_dataset_that_changed_or_that_it_does_not_hold(tmp_path):
    a, b = dataset(tmp_path / "a"), dataset(tmp_path / "b", first_label=1.0)
    cache = cache_of(tmp_path / "latents", [a])
    check_cache(cache, datasets=[a])  # the same dataset: accepted
    with pytest.raises(UserError, match="does not hold dataset"):
        check_cache(cache, datasets=[a, b])
    meta = read_meta(a)
    meta["content_hash"] = "0" * 64  # what another extraction into the same folder records
    (a / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="changed since the latent cache was made"):
        check_cache(cache, datasets=[a])


def test_relabelling_a_dataset_changes_its_content_hash_so_its_cache_is_refused(tmp_path):
    a = dataset(tmp_path / "a")
    cache = cache_of(tmp_path / "latents", [a])
    patches = (a / "patches.npy").read_bytes()
    dataset(a, first_label=1.0, overwrite=True)  # the same patches, one label changed
    assert (a / "patches.npy").read_bytes() == patches
    with pytest.raises(UserError, match="changed since the latent cache was made"):
        check_cache(cache, datasets=[a])


def test_the_vae_hash_sees_a_byte_changed_past_the_first_mebibyte(tmp_path):
    from diffusion.cache import vae_hash
    from mitosis_ldm.hashing import hash_files

    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    weights = bytearray(3 << 20)  # three read chunks
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    before = vae_hash(vae)
    weights[-1] = 1  # the last byte of the last chunk
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    assert vae_hash(vae) != before
    assert hash_files([vae / "diffusion_pytorch_model.safetensors"], chunk=4) == hashlib.sha256(weights).hexdigest()
