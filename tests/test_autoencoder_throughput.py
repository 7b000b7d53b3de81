"""bench/autoencoder_throughput.py: without flags it times the demo's trained autoencoder, not random weights."""

from __future__ import annotations

import pytest

from patches.dataset import SplitConfig, build_dataset

from conftest import load_bench
from report_helpers import synth_shard
from test_diffusion import make_vae


@pytest.fixture
def bench(monkeypatch, tmp_path):
    module = load_bench("autoencoder_throughput")
    monkeypatch.setattr(module, "ROOT", tmp_path)  # a repository root with or without a demo run
    monkeypatch.setattr(module, "sd_sized", lambda: module.build_autoencoder("tiny"))  # a cheap peer
    return module


ARGS = ["--n", "4", "--batch", "4", "--seconds", "0"]


def test_without_a_demo_run_it_times_a_fresh_preset_on_random_pixels_and_says_so(bench):
    result = bench.main(ARGS)
    assert result["ours"]["source"] == "tiny preset (random weights)" and result["images"] == "random pixels"
    assert result["ours"]["patches"] >= 4 and result["ours"]["latent_shape"] == [4, 16, 16]


def test_after_make_demo_it_times_the_demo_s_trained_autoencoder(bench, tmp_path):
    folder = make_vae(tmp_path / "runs/demo/autoencoder/model")  # 8-16-16 channels, unlike the tiny preset
    cmu = build_dataset(tmp_path / "runs/demo/data/cmu", [("a", synth_shard, {"n": 6, "size": 64, "seed": 1})],
                        patch_size=64, margin=0, meta={"source": "fake"},
                        split=SplitConfig(mode="random", val=0.0, test=0.5), progress=False)
    result = bench.main(ARGS)
    assert result["ours"]["source"] == str(folder) and result["images"] == str(cmu)
    assert result["ours"]["parameters"] < bench.count_parameters(bench.build_autoencoder("tiny"))
    # an explicit --model still wins over the demo's
    assert bench.main(ARGS + ["--model", str(folder)])["ours"]["source"] == str(folder)
