"""bench/oracle_bins.py: real patches stand in for the frames, each drawn by its rule from the right labels."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_bench

LABELS = np.array([0.0, 1 / 3, 2 / 3, 1.0])
EDGES = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
CONDITIONS = np.linspace(0, 1, 11)


@pytest.fixture(scope="module")
def oracle():
    return load_bench("oracle_bins")


def pool(per_label: int = 50) -> dict:
    """Patches whose every pixel holds their label's index x 10 and their own number: both readable back."""
    return {float(v): np.stack([np.full((2, 2, 3), [10 * k, i % 256, i // 256], np.uint8) for i in range(per_label)])
            for k, v in enumerate(LABELS)}


def drawn_labels(frames: np.ndarray) -> np.ndarray:
    return LABELS[frames[..., 0, 0, 0] // 10]


@pytest.mark.parametrize("rule, expected", [
    ("bin", {0.2: [0.0], 0.3: [1 / 3], 0.5: [2 / 3], 0.8: [1.0]}),        # the label of the condition's bin
    ("nearest", {0.2: [1 / 3], 0.1: [0.0], 0.8: [2 / 3], 0.9: [1.0]}),    # the nearest label
    ("mixture", {0.2: [0.0, 1 / 3], 0.5: [1 / 3, 2 / 3], 0.9: [2 / 3, 1.0], 1.0: [1.0]}),  # the two around it
])
def test_each_rule_draws_from_its_labels(oracle, rule, expected):
    frames, _ = oracle.oracle_frames(pool(), LABELS, EDGES, CONDITIONS, 200, rule, np.random.default_rng(0))
    labels = drawn_labels(frames)
    for y, allowed in expected.items():
        j = int(np.argmin(np.abs(CONDITIONS - y)))
        assert set(np.round(labels[:, j], 6)) == set(np.round(allowed, 6)), (rule, y)


def test_the_mixture_follows_the_linear_split_and_uses_each_patch_before_repeating(oracle):
    frames, repeats = oracle.oracle_frames(pool(400), LABELS, EDGES, [0.2], 2000, "mixture",
                                           np.random.default_rng(1))
    share = (drawn_labels(frames)[:, 0] == LABELS[1]).mean()
    assert share == pytest.approx(0.6, abs=0.04)  # (0.2 - 0) / (1/3 - 0)
    numbers = frames[:, 0, 0, 0, 1].astype(int) + 256 * frames[:, 0, 0, 0, 2].astype(int)
    label0 = numbers[drawn_labels(frames)[:, 0] == 0.0]
    assert len(set(label0[:400].tolist())) == 400  # all 400 label-0 patches before the first repeat
    assert repeats == sum(max(0, int((drawn_labels(frames)[:, 0] == v).sum()) - 400) for v in LABELS)


def test_a_bin_without_a_real_label_is_refused(oracle):
    with pytest.raises(SystemExit, match="no real label shares the bin"):
        oracle.label_weights(0.6, np.array([0.0, 1.0]), EDGES, "bin")


def test_the_unseen_pool_holds_every_val_and_test_patch_but_the_reports_pick(oracle, tmp_path):
    from patches.dataset import PatchDataset, SplitConfig, build_dataset
    from report.build import ReportConfig

    from report_helpers import FakeEnsemble, synth_shard

    dataset = build_dataset(tmp_path / "ds", [("a", synth_shard, {"n": 200, "size": 32, "seed": 3})],
                            patch_size=32, margin=0, meta={"source": "fake"},
                            split=SplitConfig(mode="random", val=0.1, test=0.3), progress=False)
    real = load_bench("guidance_study").held_out(dataset, FakeEnsemble(32), ReportConfig(max_real=25),
                                                 np.random.default_rng(0))
    test, val = PatchDataset(dataset, split="test"), PatchDataset(dataset, split="val")
    assert real["split"] == "test" and len(real["pick"]) == 25 < len(test)

    def keys(images):
        return {image.tobytes() for image in images}

    images, soft = oracle.pool_patches(dataset, "unseen", real)
    picked = keys(test.uint8(real["pick"]))
    assert len(images) == len(soft) == len(test) - 25 + len(val)
    assert not keys(images) & picked                                        # none of the report's own patches
    assert keys(images) == (keys(test.uint8(np.arange(len(test)))) - picked) | keys(val.uint8(np.arange(len(val))))
    train = PatchDataset(dataset, split="train")
    images, soft = oracle.pool_patches(dataset, "train", real)
    assert keys(images) == keys(train.uint8(np.arange(len(train))))
    assert np.array_equal(soft, np.round(np.asarray(train.soft_labels, dtype=float), 3))
