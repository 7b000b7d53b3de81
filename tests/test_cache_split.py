"""The latent cache can encode only the splits diffusion trains on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_diffusion import make_dataset, make_vae


def test_cache_of_the_train_split_only(tmp_path):
    from diffusion.cache import SPLIT_CODES, LatentCache, main as cache_main
    from patches.dataset import PatchDataset

    synth = make_dataset(tmp_path / "synth", n=24, seed=0)
    vae = make_vae(tmp_path / "vae")
    cache_main(["--vae", str(vae), "--dataset", str(synth), "--split", "train", "--out", str(tmp_path / "train")])
    cache = LatentCache(tmp_path / "train")
    train = PatchDataset(synth, split="train")
    assert 0 < len(cache.latents) == len(train) < len(PatchDataset(synth))
    assert set(cache.splits.tolist()) == {SPLIT_CODES["train"]}
    assert np.array_equal(np.load(tmp_path / "train" / "rows.npy"), train.indices)
    assert np.allclose(cache.labels, train.soft_labels, equal_nan=True)
    assert np.array_equal(cache.hard_labels, train.hard_labels) and set(train.hard_labels.tolist()) == {0.0, 1.0}
    info = json.loads((tmp_path / "train" / "cache.json").read_text())
    assert info["splits"] == ["train"] and info["count"] == len(train)


def test_cache_with_an_unknown_split_is_refused(tmp_path, capsys):
    from diffusion.cache import main as cache_main

    synth = make_dataset(tmp_path / "synth", n=8, seed=0)
    with pytest.raises(SystemExit) as exit_info:
        cache_main(["--vae", str(tmp_path / "nope"), "--dataset", str(synth), "--split", "holdout",
                    "--out", str(tmp_path / "c")])
    assert exit_info.value.code == 2 and "--split" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cache_with_a_negative_seed_is_refused(tmp_path, capsys):
    # was accepted, unlike every other command's --seed
    from diffusion.cache import main as cache_main

    synth = make_dataset(tmp_path / "synth", n=8, seed=0)
    vae = make_vae(tmp_path / "vae")
    with pytest.raises(SystemExit) as exit_info:
        cache_main(["--vae", str(vae), "--dataset", str(synth), "--mode", "sample", "--seed", "-1",
                    "--out", str(tmp_path / "c")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --seed: must be >= 0, got -1"
    assert not (tmp_path / "c").exists()
