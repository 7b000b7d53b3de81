"""Classifier training on dataset mixtures and on a stratified fraction of the real labels, and their bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from classifier_data import make_toy_dataset, toy_shard

from classifier import train
from classifier.mixture import Mixture, fraction_positions, sampling_weights
from patches.dataset import PatchDataset, SplitConfig, build_dataset
from test_classifier_train import tiny_args


def generated_shard(n: int, size: int, seed: int):
    """Toy patches labelled the way `generate` labels them: label = condition, no votes."""
    shard = toy_shard(n, size, seed)
    for row in shard.rows:
        condition = round(row.pop("true_degree"), 3)
        row.update(id=f"gen-{row['id']}", source="generated", label=condition, votes="",
                   hard_label=int(condition >= 0.5), condition=condition)
    return shard


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    real = make_toy_dataset(root / "real", n=400, size=32, seed=0)
    gen = build_dataset(root / "gen", [("g", generated_shard, {"n": 120, "size": 32, "seed": 5})], patch_size=32,
                        margin=0, meta={"source": "generated", "generated": True}, progress=False,
                        split=SplitConfig(mode="random", val=0.2, test=0.1, seed=1))
    return {"real": real, "gen": gen}


def config(*overrides):
    from mitosis_ldm.config import load_config

    return load_config(train.ClassifierConfig, None, ["model.input_size=32", *overrides])


def test_mixture_reads_both_datasets_with_their_shares(data):
    cfg = config(f"data.datasets=[{data['real']},{data['gen']}]", "data.weights=[1,3]", "data.allow_generated=true")
    train_ds, val_ds = train.load_training_data(cfg)
    real, gen = PatchDataset(data["real"], split="train"), PatchDataset(data["gen"], split="train")
    assert isinstance(train_ds, Mixture) and len(train_ds) == len(real) + len(gen)
    assert len(val_ds) == len(PatchDataset(data["real"], split="val")) + len(PatchDataset(data["gen"], split="val"))
    assert train_ds[len(real)]["image"].shape == (3, 32, 32)
    sampler = train.balanced_sampler(train_ds, 0.5, seed=0)
    drawn = np.array(list(sampler))
    from_gen = (drawn >= len(real)).mean()
    assert 0.68 < from_gen < 0.82  # weights [1, 3]: a quarter of the draws from the real set
    mitotic = np.where(np.isnan(train_ds.hard_labels), train_ds.soft_labels >= 0.5, train_ds.hard_labels >= 0.5)
    assert 0.42 < mitotic[drawn].mean() < 0.58  # balanced inside each dataset
    # without the opt-in the judge refuses generated data, naming the flag
    from mitosis_ldm.errors import UserError

    with pytest.raises(UserError, match="allow_generated"):
        train.load_training_data(config(f"data.datasets=[{data['real']},{data['gen']}]"))


def test_mixture_training_end_to_end(data, tmp_path):
    out = tmp_path / "cls"
    train.main(tiny_args(data["real"], out, 12, 1, 6, "--set", f"data.datasets=[{data['real']},{data['gen']}]",
                         "--set", "data.allow_generated=true", "--set", "data.fraction=0.5"))
    meta = json.loads((out / "model" / "config.json").read_text())
    trained_on = meta["trained_on"]
    assert trained_on["datasets"] == [str(data["real"]), str(data["gen"])] and trained_on["fraction"] == 0.5
    half = len(fraction_positions(PatchDataset(data["real"], split="train"), 0.5, 0))
    assert trained_on["patches"] == half + len(PatchDataset(data["gen"], split="train"))
    assert len(trained_on["content_hashes"]) == 2 and all(trained_on["content_hashes"])


def test_fraction_is_stratified_deterministic_and_nested(data):
    ds = PatchDataset(data["real"], split="train")
    a, b = fraction_positions(ds, 0.2, 7), fraction_positions(ds, 0.2, 7)
    assert np.array_equal(a, b) and len(set(a.tolist())) == len(a)
    assert not np.array_equal(a, fraction_positions(ds, 0.2, 8))
    assert set(fraction_positions(ds, 0.05, 7)) <= set(a) <= set(fraction_positions(ds, 0.5, 7))
    soft, hard = ds.soft_labels, ds.hard_labels
    for value in np.unique(soft):  # every soft label value (one stratum each here) keeps ~20 %
        whole = np.flatnonzero(soft == value)
        kept = np.isin(whole, a).sum()
        assert kept == max(1, round(0.2 * len(whole))), (value, kept, len(whole))
    assert abs(hard[a].mean() - hard.mean()) < 0.03
    cfg = config(f"data.dataset={data['real']}", "data.fraction=0.2", "data.fraction_seed=7")
    train_ds, val_ds = train.load_training_data(cfg)
    assert np.array_equal(train_ds.ids(), np.array(ds.ids())[a])
    assert len(val_ds) == len(PatchDataset(data["real"], split="val"))
    # the generated part of a mixture is never subsampled: the fraction is of the real labels
    cfg = config(f"data.datasets=[{data['real']},{data['gen']}]", "data.fraction=0.2", "data.allow_generated=true")
    mix, _ = train.load_training_data(cfg)
    assert len(mix.parts[1]) == len(PatchDataset(data["gen"], split="train")) and len(mix.parts[0]) == len(a)


def test_fraction_strata_split_a_soft_label_by_its_hard_label():
    # one soft-label bin in which one hard label of 100 disagrees with the rest: a stratum of its own, kept whole
    ds = SimpleNamespace(soft_labels=np.full(100, 1 / 3), hard_labels=np.r_[1.0, np.zeros(99)])
    kept = fraction_positions(ds, 0.05, 0)
    assert 0 in kept and len(kept) == 1 + 5  # max(1, round(0.05 x 1)) + round(0.05 x 99)


def test_unbalanced_sampling_still_gives_each_dataset_its_weight():
    weights = sampling_weights([range(4), range(12)], [0.25, 0.75], balance=0.0)  # data.balance=0: as stored
    assert weights[:4] == pytest.approx([0.25 / 4] * 4) and weights[4:] == pytest.approx([0.75 / 12] * 12)


def test_balance_sets_the_mitotic_share_of_each_datasets_draws():
    # 2 of 8 patches mitotic (one by its hard label, one without a hard label by its soft label), balance 0.25
    part = SimpleNamespace(hard_labels=np.r_[1.0, np.nan, np.zeros(6)], soft_labels=np.r_[0.0, 2 / 3, np.zeros(6)])
    weights = sampling_weights([part, part], [0.5, 0.5], balance=0.25)
    assert weights[:2].sum() == pytest.approx(0.5 * 0.25) and weights[2:8].sum() == pytest.approx(0.5 * 0.75)
    assert weights[:8] == pytest.approx(weights[8:])


@pytest.mark.parametrize("overrides, needles", [
    (["data.weights=[1,1,1]"], ["data.weights", "3 entries", "2"]),
    (["data.fraction=0"], ["data.fraction", "(0, 1]"]),
    (["data.fraction=1.5"], ["data.fraction", "(0, 1]"]),
])
def test_bad_mixture_settings_one_line_no_output(data, tmp_path, capsys, overrides, needles):
    out = tmp_path / "cls"
    sets = [x for o in overrides for x in ("--set", o)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(data["real"], out, 4, 1, 2, "--set", f"data.datasets=[{data['real']},{data['gen']}]",
                             "--set", "data.allow_generated=true", *sets))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
