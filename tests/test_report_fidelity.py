"""The report's fidelity numbers on constructed inputs: label bins, Fréchet distance, memorisation, frames
outside the real data, the label-noise finder and the degree calibration."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from mitosis_ldm.artifacts import read_transitions, write_transitions
from report import benchmark, fidelity, morphology
from report.build import ReportConfig, build_report

from report_helpers import FakeEnsemble
from test_report import CONDITIONS, SIZE, make_inputs


def test_label_bins_close_the_last_bin_and_skip_unlabelled():
    bins = morphology.label_bins(np.array([0.0, 0.24, 0.25, 0.74, 1.0, np.nan]), [0, 0.25, 0.5, 0.75, 1])
    assert bins.tolist() == [0, 0, 1, 2, 3, -1]


def test_frechet_is_zero_for_equal_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    assert fidelity.frechet(x, x) == pytest.approx(0.0, abs=1e-6)
    assert fidelity.frechet(x, x + 2.0) == pytest.approx(5 * 4.0, rel=1e-6)  # ||mu shift||² = 5 dims x 2²
    assert fidelity.frechet(x, x * 3) > fidelity.frechet(x, x * 1.5) > 0.5


@pytest.mark.parametrize("n", [12, 20, 40, 80])  # fewer samples than D = 16, up to 1.5 D, and above: both routes
def test_frechet_equals_the_matrix_square_root_formula(n):
    from scipy import linalg

    rng = np.random.default_rng(n)
    a = np.maximum(rng.normal(size=(n, 16)) @ rng.normal(size=(16, 16)), 0)  # ReLU-like, correlated features
    b = np.maximum(rng.normal(size=(n + 3, 16)) @ rng.normal(size=(16, 16)) + 0.5, 0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b)).real)
    assert fidelity.frechet(a, b) == pytest.approx(expected, rel=1e-7)
    assert fidelity.frechet(b, a) == pytest.approx(expected, rel=1e-7)


def test_one_blas_thread_limits_numpy_and_scipy_blas_and_restores_them():
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and set(before.values()) == {2}
        torch_threads = torch.get_num_threads()
        with fidelity.one_blas_thread():
            assert set(blas_threads().values()) == {1}
            assert torch.get_num_threads() == torch_threads  # torch's own pool is not BLAS's
        assert blas_threads() == before


def test_frechet_per_bin_compares_equal_sample_sizes():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 4))
    real_bins = np.repeat([0, 1], 100)
    good = rng.normal(size=(60, 4))
    bad = rng.normal(size=(60, 4)) + 3.0
    gen, gen_bins = np.concatenate([good, bad]), np.repeat([0, 1], 60)
    rows = fidelity.frechet_per_bin(gen, gen_bins, real, real_bins, n_bins=3, min_count=8)
    assert [r["n"] for r in rows] == [50, 50, 0]
    assert rows[0]["ratio"] < 3 and rows[1]["ratio"] > 10
    assert rows[2]["frechet"] is None  # an empty bin is reported, not invented
    assert [r["common_n"] for r in rows] == [50, 50, None]


def test_a_bin_with_exactly_min_count_frames_to_compare_is_measured():
    rng = np.random.default_rng(8)
    real, gen = rng.normal(size=(16, 3)), rng.normal(size=(8, 3))
    rows = fidelity.frechet_per_bin(gen, np.zeros(8, int), real, np.zeros(16, int), n_bins=1, min_count=8)
    assert rows[0]["n"] == 8 and rows[0]["ratio"] is not None and rows[0]["common_n"] == 8
    fewer = fidelity.frechet_per_bin(gen[:7], np.zeros(7, int), real, np.zeros(16, int), n_bins=1, min_count=8)
    assert fewer[0]["n"] == 7 and fewer[0]["ratio"] is None


def test_frechet_ratio_at_common_n_compares_bins_of_different_sizes():
    # the same generator fault (a 0.5 shift in every dimension) in a bin with 600 real patches and in one with 60:
    # at each bin's own n the big bin's ratio is far larger; at one common n the two agree
    rng = np.random.default_rng(3)
    real = rng.normal(size=(660, 8))
    real_bins = np.repeat([0, 1], [600, 60])
    gen = rng.normal(size=(600, 8)) + 0.5
    gen_bins = np.repeat([0, 1], [300, 300])
    rows = fidelity.frechet_per_bin(gen, gen_bins, real, real_bins, n_bins=2, min_count=8, repeats=20)
    assert [r["n"] for r in rows] == [300, 30] and [r["common_n"] for r in rows] == [30, 30]
    assert rows[0]["ratio"] > 2 * rows[1]["ratio"]
    assert rows[0]["ratio_common_n"] == pytest.approx(rows[1]["ratio_common_n"], rel=0.35)
    # the own-n numbers do not depend on whether the common-n pass ran (it draws from its own generator)
    again = fidelity.frechet_per_bin(gen, gen_bins, real, real_bins, n_bins=2, min_count=8, repeats=20)
    assert again[0]["ratio"] == rows[0]["ratio"]


def test_the_autoencoder_floor_is_the_ratio_of_the_real_patches_own_reconstructions():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 6))
    real_bins = np.repeat([0, 1], [200, 100])
    gen = rng.normal(size=(200, 6)) + 0.3
    gen_bins = np.repeat([0, 1], 100)
    plain = fidelity.frechet_per_bin(gen, gen_bins, real, real_bins, n_bins=2, repeats=5)
    # a perfect autoencoder: its floor is the yardstick itself (ratio 1); the other numbers do not move
    perfect = fidelity.frechet_per_bin(gen, gen_bins, real, real_bins, n_bins=2, repeats=5, reconstructed=real)
    for p, q in zip(plain, perfect):
        assert q["floor_ratio"] == pytest.approx(1.0) and q["floor"] == pytest.approx(q["yardstick"])
        assert (q["frechet"], q["ratio"], q["ratio_common_n"]) == (p["frechet"], p["ratio"], p["ratio_common_n"])
        assert p["floor"] is None and p["floor_ratio"] is None
    # an autoencoder that blurs (shrinks every feature toward the mean) in bin 0 only: that bin's floor rises
    blurred = real.copy()
    blurred[:200] = 0.4 * blurred[:200] + 0.6 * blurred[:200].mean(0)
    rows = fidelity.frechet_per_bin(gen, gen_bins, real, real_bins, n_bins=2, repeats=5, reconstructed=blurred)
    assert rows[0]["floor_ratio"] > 3 and rows[1]["floor_ratio"] == pytest.approx(1.0)


def test_frechet_per_condition_finds_the_unfaithful_condition_a_bin_pools():
    # bin 0 holds conditions 0, 0.1 and 0.2; only the frames at 0 are pushed off the real patches (shift 0.8).
    # Pooled, the bin's ratio hides that; per condition, 0 stands out and 0.1, 0.2 sit at the yardstick
    rng = np.random.default_rng(5)
    real = rng.normal(size=(400, 6))
    real_bins = np.zeros(400, int)
    conditions = np.repeat([0.0, 0.1, 0.2, 0.6], 150)
    gen = rng.normal(size=(600, 6))
    gen[conditions == 0.0] += 0.8
    gen_bins = morphology.label_bins(conditions, [0, 0.25, 0.5, 0.75, 1])
    rows = fidelity.frechet_per_condition(gen, conditions, gen_bins, real, real_bins, repeats=10)
    assert [r["condition"] for r in rows] == [0.0, 0.1, 0.2, 0.6]
    assert [r["bin"] for r in rows] == [0, 0, 0, 2] and [r["n"] for r in rows] == [150, 150, 150, 0]
    shifted, even, also_even, empty = rows
    assert shifted["ratio"] > 4 * even["ratio"] and even["ratio"] < 2 and also_even["ratio"] < 2
    assert empty["ratio"] is None and empty["frechet"] is None  # no real patches in that bin: not invented
    pooled = fidelity.frechet_per_bin(gen[:450], gen_bins[:450], real, real_bins, n_bins=4, repeats=10)[0]
    assert even["ratio"] < pooled["ratio"] < shifted["ratio"]
    # deterministic: the same rows again from the same inputs
    again = fidelity.frechet_per_condition(gen, conditions, gen_bins, real, real_bins, repeats=10)
    assert [r["ratio"] for r in again] == [r["ratio"] for r in rows]


def _seeded_frames(rng, n_seeds, per_bin, offset_sd, shared=True, shift=0.3, dims=6):
    """Frames of n_seeds transitions, per_bin[b] frames of each seed in bin b, each frame offset (sd offset_sd):
    `shared`, every frame of a seed shares its seed's offset, as the frames of one transition share its noise;
    otherwise each frame has its own (the same frames' distribution, with no seed to tie them)."""
    feats, bins, groups = [], [], []
    for s in range(n_seeds):
        offset = rng.normal(0, offset_sd, dims)
        for b, k in enumerate(per_bin):
            own = offset if shared else rng.normal(0, offset_sd, (k, dims))
            feats.append(rng.normal(size=(k, dims)) + shift + own)
            bins += [b] * k
            groups += [s] * k
    return np.concatenate(feats), np.array(bins), np.array(groups)


def test_ratio_intervals_are_over_seeds_and_widen_when_seeds_disagree():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(1140, 6))
    real_bins = np.repeat([0, 1], [760, 380])
    widths = []
    for shared in (False, True):
        # 16 seeds of 48 + 24 frames: n = 380 and 190, and half the seeds hold 384 and 192 frames
        gen, gen_bins, groups = _seeded_frames(rng, 16, (48, 24), 0.7, shared)
        rows = fidelity.frechet_per_bin(gen, gen_bins, real, real_bins, n_bins=2, repeats=5)
        before = [dict(r) for r in rows]
        result = fidelity.ratio_intervals(gen, gen_bins, groups, real, real_bins, rows, n_resamples=60)
        assert rows == before  # the rows are read, not changed
        assert result["n_groups"] == 16 and result["n_resamples"] == 60
        for row, (lo, hi) in zip(rows, result["bins"]):
            assert lo < row["ratio"] < hi, (row["ratio"], lo, hi)
        worst = max(r["ratio"] for r in rows)
        assert result["worst"][0] < worst < result["worst"][1]
        widths.append((result["worst"][1] - result["worst"][0]) / worst)
        # the same inputs give the same interval
        assert fidelity.ratio_intervals(gen, gen_bins, groups, real, real_bins, rows, n_resamples=60) == result
    # the same frames' distribution, but tied into seeds: fewer independent draws, so the ratio depends more on
    # which seeds were drawn (resampling frames instead of seeds would miss this)
    assert widths[1] > 1.8 * widths[0], widths


def test_the_worst_bin_interval_is_the_interval_of_the_bin_that_is_worst_in_every_resample():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(600, 6))
    real_bins = np.repeat([0, 1], 300)
    gen, gen_bins, groups = _seeded_frames(rng, 16, (24, 24), 0.3, shift=0.0)
    gen[gen_bins == 1] += 2.0  # bin 1 far off the real patches in any half of the seeds, bin 0 on them
    rows = fidelity.frechet_per_bin(gen, gen_bins, real, real_bins, n_bins=2)
    result = fidelity.ratio_intervals(gen, gen_bins, groups, real, real_bins, rows, n_resamples=40)
    assert rows[1]["ratio"] > 10 * rows[0]["ratio"]
    assert result["worst"] == result["bins"][1] and result["worst"] != result["bins"][0]


def test_ratio_intervals_refuse_what_half_the_seeds_cannot_measure():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(600, 6))
    real_bins = np.repeat([0, 1], [400, 200])
    # bin 1: 2 frames a seed, 128 in all, so n = 100; half the seeds hold 64 frames, fewer than n
    gen, gen_bins, groups = _seeded_frames(rng, 64, (8, 2), 0.0)
    rows = fidelity.frechet_per_bin(gen, gen_bins, real, real_bins, n_bins=2)
    result = fidelity.ratio_intervals(gen, gen_bins, groups, real, real_bins, rows, n_resamples=10)
    assert result["bins"][0] is not None and result["bins"][1] is None and result["worst"] is None
    # three seeds are too few to halve
    few = groups < 3
    rows = fidelity.frechet_per_bin(gen[few], gen_bins[few], real, real_bins, n_bins=2)
    result = fidelity.ratio_intervals(gen[few], gen_bins[few], groups[few], real, real_bins, rows, n_resamples=10)
    assert result == {"bins": [None, None], "worst": None, "n_resamples": 0, "n_groups": 3}


def test_mixture_weights_split_a_condition_between_the_real_labels_around_it():
    labels = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    assert fidelity.mixture_weights(0.0, labels).tolist() == [1, 0, 0, 0]
    assert fidelity.mixture_weights(1 / 3, labels).tolist() == [0, 1, 0, 0]
    assert fidelity.mixture_weights(0.2, labels) == pytest.approx([0.4, 0.6, 0, 0])
    assert fidelity.mixture_weights(0.9, labels) == pytest.approx([0, 0, 0.3, 0.7])
    assert fidelity.mixture_weights(1.2, np.array([0.0, 0.5])).tolist() == [0, 1]  # beyond the range: the end
    assert fidelity.mixture_weights(-0.1, np.array([0.1, 0.5])).tolist() == [1, 0]


def test_calibrated_draws_follow_the_real_curve_and_use_each_patch_before_repeating():
    labels = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    pool = np.repeat(labels, [400, 30, 400, 400])
    score = np.repeat([0.07, 0.24, 0.70, 0.90], [400, 30, 400, 400])  # the real curve, one value per label
    conditions = np.repeat(np.linspace(0, 1, 11), 1000)
    picks, repeats = fidelity.calibrated_draws(conditions, pool, labels, np.random.default_rng(0))
    means = score[picks].reshape(11, 1000).mean(1)  # binomial sd at y = 0.5: 0.46 x 0.016 = 0.007
    assert means == pytest.approx(np.interp(np.linspace(0, 1, 11), labels, [0.07, 0.24, 0.70, 0.90]), abs=0.03)
    # label 1/3 has 30 patches: every one is drawn before any twice, and the rest are counted as repeats
    third = picks[pool[picks] == labels[1]]
    assert len(set(third[:30].tolist())) == 30 and len(third) > 30
    drawn = np.array([(pool[picks] == v).sum() for v in labels])
    assert repeats == np.maximum(drawn - np.array([400, 30, 400, 400]), 0).sum()
    with pytest.raises(ValueError):
        fidelity.calibrated_draws(conditions, pool[pool > 0], labels, np.random.default_rng(0))


def test_a_calibrated_reference_is_far_from_one_only_in_a_bin_with_in_between_conditions():
    # real features: one cluster per soft label along one axis; bin 0 holds label 0 and conditions 0, 0.1, 0.2
    rng = np.random.default_rng(3)
    labels = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    centre = {0.0: 0.0, 1 / 3: 2.0, 2 / 3: 4.0, 1.0: 6.0}

    def patches(label, n):
        x = rng.normal(size=(n, 3))
        x[:, 0] += centre[label]
        return x
    real_soft = np.repeat(labels, 200)
    real = np.concatenate([patches(v, 200) for v in labels])
    pool_soft = np.repeat(labels, 600)
    pool = np.concatenate([patches(v, 600) for v in labels])
    conditions = np.repeat([0.0, 0.1, 0.2, 1.0], 90)
    edges = [0, 0.25, 0.5, 0.75, 1]
    picks, _ = fidelity.calibrated_draws(conditions, pool_soft, labels, np.random.default_rng(4))
    rows = fidelity.frechet_per_bin(pool[picks], morphology.label_bins(conditions, edges), real,
                                    morphology.label_bins(real_soft, edges), n_bins=4)
    assert rows[3]["ratio"] < 2  # condition 1 alone: label-1 patches against label-1 patches
    assert rows[0]["ratio"] > 5  # 0.1 and 0.2 draw label-1/3 patches, 2 units away from the label-0 ones


def test_memorisation_flags_copies_not_fresh_samples():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(300, 16))
    held_out = rng.normal(size=(200, 16))
    fresh = rng.normal(size=(100, 16))
    copies = train[:100] + rng.normal(scale=1e-3, size=(100, 16))
    assert fidelity.memorisation(copies, held_out, train)["share"] == 1.0
    assert fidelity.memorisation(fresh, held_out, train)["share"] <= 0.05
    d = fidelity.nearest_distances(train[:5], train)
    assert np.allclose(d, 0, atol=1e-3)


def test_atypical_counts_the_far_tail_of_the_held_out_distances():
    held_out = np.arange(1, 101, dtype=float)                 # 1 ... 100
    generated = np.array([5.0, 50.0, 99.5, 150.0, 120.0, 100.5])
    result = fidelity.atypical(generated, held_out, quantile=0.01)
    assert result["threshold"] == pytest.approx(np.quantile(held_out, 0.99))  # 99.01
    assert result["flagged"].tolist() == [3, 4, 5, 2]          # farthest first
    assert result["share"] == pytest.approx(4 / 6)
    assert result["beyond_all_share"] == pytest.approx(3 / 6)  # 150, 120 and 100.5 pass the farthest held-out (100)
    same = fidelity.atypical(held_out, held_out, quantile=0.05)
    assert same["share"] == pytest.approx(0.05) and same["beyond_all_share"] == 0.0


def test_report_flags_a_frame_from_another_domain(tmp_path):
    root = make_inputs(tmp_path)
    source = read_transitions(root / "tr")
    frames, manifest = np.array(source.frames), source.manifest
    frames[2, 3] = np.array([110, 60, 120], np.uint8)           # dark purple, no nucleus: not the benchmark's look
    write_transitions(root / "tr2", frames, manifest)
    out = tmp_path / "report"
    metrics = build_report(ReportConfig(bootstrap=50), [root / "tr2"], [], FakeEnsemble(SIZE), "fake-classifier",
                           root / "ds", out, log=lambda *_: None)
    pixels = metrics["atypical"]["pixels"]
    (key,) = pixels["per_condition"]                          # the one transitions folder
    assert pixels["per_condition"][key]["flagged"][3] >= 1 and 2 in pixels["seeds_flagged"][key]
    assert pixels["share"] >= 1 / 30 and pixels["beyond_all_share"] >= 1 / 30
    with open(out / "atypical-pixels.csv") as handle:
        first = next(csv.DictReader(handle))
    assert (first["seed"], first["frame"], float(first["condition"])) == ("2", "3", pytest.approx(CONDITIONS[3]))
    assert (out / "atypical-pixels.png").is_file()
    assert "Frames outside the real data" in (out / "report.html").read_text()


def test_label_noise_finder_ranks_true_mislabels_first():
    rng = np.random.default_rng(3)
    degree = rng.uniform(0, 1, 200)
    soft = (degree >= 0.5).astype(float)
    wrong = rng.choice(200, 20, replace=False)
    soft[wrong] = 1 - soft[wrong]             # 20 flipped labels
    scores = np.clip(degree + rng.normal(0, 0.05, 200), 0, 1)  # a classifier that sees the truth
    result = benchmark.label_noise([f"p{i}" for i in range(200)], soft, soft, scores, degree, 0.5, top=20)
    assert result["n_mislabelled"] == 20 and result["base_rate"] == pytest.approx(0.1)
    assert result["truly_mislabelled_in_top"] >= 16
    assert result["ranked"][0]["disagreement"] >= result["ranked"][-1]["disagreement"]


def test_degree_calibration_is_monotone():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    degrees = np.array([0.2, 0.1, 0.4, 0.7, 0.9])
    cal = benchmark.DegreeCalibration(scores, degrees)
    mapped = cal(np.linspace(0, 1, 21))
    assert np.all(np.diff(mapped) >= 0) and cal(0.9) == pytest.approx(0.9)


def test_report_measures_the_autoencoder_floor_through_the_transitions_pipeline(tmp_path):
    from test_guidance_schedule import tiny_pipeline

    root = make_inputs(tmp_path)
    source = read_transitions(root / "tr")
    pipeline = tiny_pipeline(tmp_path / "pipe", {})  # a random autoencoder: reconstructions far from the patches
    write_transitions(root / "tr2", np.array(source.frames), {**source.manifest, "pipeline": str(pipeline)})
    out = tmp_path / "report"
    metrics = build_report(ReportConfig(bootstrap=50), [root / "tr2"], [], FakeEnsemble(SIZE), "fake-classifier",
                           root / "ds", out, log=lambda *_: None)
    assert metrics["fidelity"]["floor_pipeline"] == str(pipeline)
    valid = [r for r in metrics["fidelity"]["bins"] if r["frechet"] is not None]
    assert valid and all(r["floor_ratio"] > 1.5 for r in valid)
    with open(out / "fidelity.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["floor_ratio"]) == pytest.approx(valid[0]["floor_ratio"], rel=1e-4)
    assert "autoencoder floor" in (out / "report.html").read_text()
    # one row per generated condition, each against its own bin's real patches
    with open(out / "fidelity-conditions.csv") as handle:
        by_condition = list(csv.DictReader(handle))
    conditions = sorted({float(c) for c in source.conditions})
    assert [float(r["condition"]) for r in by_condition] == pytest.approx(conditions, abs=1e-5)
    assert [r["condition"] for r in metrics["fidelity"]["by_condition"]] == pytest.approx(conditions, abs=1e-5)
    # five seeds: each condition alone has fewer frames than a comparison needs, so none is invented
    assert all(r["n"] == 5 and r["ratio"] is None for r in metrics["fidelity"]["by_condition"])
    # the same frames without a pipeline that is here: no floor, and the page does not claim one
    plain = build_report(ReportConfig(bootstrap=50), [root / "tr"], [], FakeEnsemble(SIZE), "fake-classifier",
                         root / "ds", tmp_path / "plain", log=lambda *_: None)
    assert plain["fidelity"]["floor_pipeline"] is None
    assert all(r["floor"] is None for r in plain["fidelity"]["bins"])
    assert "autoencoder floor" not in (tmp_path / "plain" / "report.html").read_text()
    assert [r["ratio"] for r in plain["fidelity"]["bins"]] == [r["ratio"] for r in metrics["fidelity"]["bins"]]


def test_label_noise_finder_with_fewer_patches_than_its_top_checks_them_all():
    degree = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7])
    soft = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0])  # patches 1 and 3 are mislabelled
    result = benchmark.label_noise([f"p{i}" for i in range(6)], soft, soft, degree, degree, 0.5, top=50)
    assert result["top"] == 6 and result["truly_mislabelled_in_top"] == 2
    assert result["precision_at_top"] == pytest.approx(2 / 6)


def test_label_noise_base_rate_is_over_the_labelled_scored_patches():
    degree = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7, 0.9, 0.95])
    soft = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, np.nan, 1.0])  # an unlabelled patch, then an unscored one
    scores = np.append(degree[:7], np.nan)
    result = benchmark.label_noise([f"p{i}" for i in range(8)], soft, np.full(8, np.nan), scores, degree, 0.5)
    assert result["n_labelled"] == 6 and result["n_mislabelled"] == 2
    assert result["base_rate"] == pytest.approx(2 / 6)
