"""bench/autoencoder_floor.py: the report's per-bin floor for any autoencoder, on the report's held-out subset."""

from __future__ import annotations

import json

import pytest

from patches.dataset import SplitConfig, build_dataset

from conftest import REPO, load_bench
from report_helpers import FakeEnsemble, synth_shard
from test_diffusion import make_vae

SIZE = 32


@pytest.fixture(scope="module")
def bench():
    return load_bench("autoencoder_floor")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("floor")
    return build_dataset(root / "ds", [("a", synth_shard, {"n": 400, "size": SIZE, "seed": 3})], patch_size=SIZE,
                         margin=0, meta={"source": "fake"}, split=SplitConfig(mode="random", val=0.1, test=0.4),
                         progress=False)


def test_a_perfect_round_trip_sits_at_the_yardstick_and_a_random_one_far_above(bench, dataset, monkeypatch):
    from report.build import ReportConfig

    cfg = ReportConfig(frechet_min_count=8)
    classifier = FakeEnsemble(SIZE)
    real = bench.held_out(dataset, classifier, cfg)
    assert real["images"].shape[1:] == (SIZE, SIZE, 3) and len(real["bins"]) == len(real["images"])
    monkeypatch.setattr(bench, "round_trip", lambda vae, images, batch: images.copy())
    perfect = bench.measure(None, real, classifier, cfg, repeats=3, other_residuals=True)
    valid = [f for f in perfect["floor_by_bin"] if f is not None]
    assert len(valid) >= 2 and all(f == pytest.approx(1.0) for f in valid)
    assert perfect["residual_std"] == [0.0, 0.0, 0.0]
    assert perfect["floor_by_bin_other_residuals"] == perfect["floor_by_bin"]  # nothing lost, nothing to put back


def test_the_bench_measures_each_autoencoder_the_reports_way(bench, dataset, tmp_path, monkeypatch, capsys):
    from classifier.model import ClassifierEnsemble
    from diffusion.cache import load_vae
    from mitosis_ldm.config import load_config
    from report.build import ReportConfig
    from report.fidelity import frechet_per_bin

    monkeypatch.setattr(ClassifierEnsemble, "from_pretrained", classmethod(lambda cls, path: FakeEnsemble(SIZE)))
    vae_dir = make_vae(tmp_path / "vae")  # random weights: reconstructions far from the patches
    config = REPO / "configs" / "demo" / "report.yaml"
    bench.main(["--vae", str(vae_dir), "--classifier", "unused", "--dataset", str(dataset), "--repeats", "3",
                "--threads", "1", "--other-residuals", "--report-config", str(config),
                "--out", str(tmp_path / "floor.json")])
    result = json.loads((tmp_path / "floor.json").read_text())
    row = result["autoencoders"][str(vae_dir)]
    cfg = load_config(ReportConfig, config)
    assert sum(result["n_by_bin"]) == len(bench.held_out(dataset, FakeEnsemble(SIZE), cfg)["images"])
    valid = [f for f in row["floor_by_bin"] if f is not None]
    assert valid and all(f > 1.5 for f in valid) and row["psnr_db"] < 20
    # the same numbers by hand: the report's frechet_per_bin over the round trip's features
    real = bench.held_out(dataset, FakeEnsemble(SIZE), cfg)
    rebuilt = bench.round_trip(load_vae(vae_dir)[1], real["images"], cfg.batch_size)
    rows = frechet_per_bin(real["features"], real["bins"], real["features"], real["bins"], 4, cfg.frechet_min_count,
                           3, cfg.seed, reconstructed=FakeEnsemble(SIZE).features(rebuilt))
    assert row["floor_by_bin"] == [None if r["floor_ratio"] is None else round(r["floor_ratio"], 3) for r in rows]
    assert len(row["floor_by_bin_other_residuals"]) == 4 and len(row["residual_std"]) == 3
