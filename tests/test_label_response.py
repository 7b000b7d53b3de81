"""The label-response curve and its error, on constructed inputs whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from report import label_response

REAL_X = np.array([0.0, 1 / 3, 2 / 3, 1.0])
REAL_MEANS = np.array([0.07, 0.24, 0.70, 0.90])
CONDITIONS = np.linspace(0, 1, 13)  # holds 1/3 and 2/3, where the real curve bends


def real_patches(n_per_label: int = 40, seed: int = 0):
    """Soft labels (the benchmark's four values) and scores whose mean per label is exactly REAL_MEANS."""
    rng = np.random.default_rng(seed)
    soft, scores = [], []
    for x, m in zip(REAL_X, REAL_MEANS):
        noise = rng.normal(0, 0.05, n_per_label)
        soft += [x] * n_per_label
        scores += list(m + noise - noise.mean())
    return np.array(soft), np.array(scores)


def generator(offset: float = 0.0, n_seeds: int = 64, seed: int = 1) -> np.ndarray:
    """(seeds, conditions) scores whose mean over seeds is the real curve (piecewise linear) plus `offset`."""
    rng = np.random.default_rng(seed)
    curve = np.interp(CONDITIONS, REAL_X, REAL_MEANS) + offset
    noise = rng.normal(0, 0.1, (n_seeds, len(CONDITIONS)))
    return curve + noise - noise.mean(0)


def test_real_curve_groups_the_distinct_soft_labels():
    soft, scores = real_patches()
    soft = soft + np.where(soft == 1 / 3, 1e-9, 0)  # 1/3 from another sum still counts as 1/3
    curve = label_response.real_curve(np.append(soft, 0.5), np.append(scores, 0.99), min_count=10, n_resamples=200)
    assert np.allclose(curve["x"], REAL_X, atol=1e-4)  # the lone 0.5 patch is below min_count
    assert np.allclose(curve["mean"], REAL_MEANS)
    assert np.all(curve["lo"] < curve["mean"]) and np.all(curve["mean"] < curve["hi"])
    assert list(curve["n"]) == [40] * 4


def test_the_generated_curve_keeps_each_column_with_its_condition():
    scores = np.array([[0.9, 0.1, 0.5], [0.7, 0.3, 0.5]])  # (seeds, conditions): columns at 1, 0 and 0.5
    curve = label_response.generated_curve([1.0, 0.0, 0.5], scores, n_resamples=50)
    assert curve["conditions"].tolist() == [0.0, 0.5, 1.0]
    assert curve["mean"] == pytest.approx([0.2, 0.5, 0.8])
    # two seeds: a resample's mean at condition 0 is 0.1, 0.2 or 0.3 (0.7, 0.8 or 0.9 at 1); 0.5 is constant
    assert curve["lo"] == pytest.approx([0.1, 0.5, 0.7]) and curve["hi"] == pytest.approx([0.3, 0.5, 0.9])


def test_a_generator_equal_to_the_real_curve_has_zero_error():
    soft, scores = real_patches()
    _, _, error = label_response.measure(CONDITIONS, generator(0.0), soft, scores, n_resamples=300)
    assert error["value"] == pytest.approx(0.0, abs=1e-12)
    assert error["n_labels"] == 4 and error["n_seeds"] == 64
    lo, hi = error["ci"]
    assert 0.0 <= lo <= hi < 0.06  # sampling noise only: 64 seeds, 40 patches per label


def test_the_interval_resamples_the_real_patches_as_well_as_the_seeds():
    """Seeds that agree exactly leave only the real patches' sampling noise, which the interval must still show."""
    soft, scores = real_patches()  # noise sd 0.05 over 40 patches: each label's mean varies by about 0.008
    every_seed = np.tile(np.interp(CONDITIONS, REAL_X, REAL_MEANS), (16, 1))
    _, _, error = label_response.measure(CONDITIONS, every_seed, soft, scores, n_resamples=300)
    assert error["value"] == pytest.approx(0.0, abs=1e-12)
    lo, hi = error["ci"]
    assert 0.0 <= lo and 0.008 < hi < 0.04


@pytest.mark.parametrize("offset", [0.07, -0.12])
def test_a_known_offset_is_the_error(offset):
    soft, scores = real_patches()
    _, _, error = label_response.measure(CONDITIONS, generator(offset), soft, scores, n_resamples=300)
    assert error["value"] == pytest.approx(abs(offset), abs=1e-9)
    assert [r["difference"] for r in error["per_label"]] == pytest.approx([offset] * 4, abs=1e-9)
    lo, hi = error["ci"]
    assert lo <= abs(offset) <= hi


def test_the_generated_curve_is_interpolated_between_conditions():
    """A switch at y = 0.5 (the issue's failure): low at 1/3, high at 2/3; the error is read between conditions."""
    tenths = np.linspace(0, 1, 11)
    switch = np.where(tenths < 0.5, 0.05, 0.95)[None, :].repeat(8, 0)
    conditions_shuffled = tenths[::-1]  # order of the columns does not matter
    error = label_response.response_error(conditions_shuffled, switch[:, ::-1], REAL_X,
                                          [np.array([m]) for m in REAL_MEANS], n_resamples=50)
    by_label = {round(r["soft_label"], 3): r for r in error["per_label"]}
    # at 1/3 the generator sits between conditions 0.3 and 0.4, both 0.05
    assert by_label[0.333]["generated"] == pytest.approx(0.05)
    assert by_label[0.667]["generated"] == pytest.approx(0.95)
    assert error["value"] == pytest.approx(max(0.95 - 0.70, 0.24 - 0.05))
    # one condition between two labels: linear interpolation
    two = label_response.response_error([0.0, 1.0], np.array([[0.0, 0.6]]), [0.5], [np.array([0.1])], n_resamples=10)
    assert two["per_label"][0]["generated"] == pytest.approx(0.3) and two["value"] == pytest.approx(0.2)


def test_a_label_held_by_exactly_min_count_patches_enters_the_curve():
    values, groups = label_response.label_groups([0.0] * 10 + [1.0] * 9, min_count=10)
    assert values.tolist() == [0.0] and [len(g) for g in groups] == [10]


def test_no_real_labels_gives_no_value():
    error = label_response.response_error(CONDITIONS, generator(), [], [], n_resamples=10)
    assert error["value"] is None and error["ci"] == [None, None]


def test_report_carries_the_new_targets_the_curve_and_the_reading_guide(tmp_path):
    from report.build import ReportConfig, build_report

    from report_helpers import FakeEnsemble
    from test_report import make_inputs

    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "report"
    metrics = build_report(ReportConfig(bootstrap=100, label_response_min_count=5), [inputs / "tr"], [inputs / "r2g"],
                           FakeEnsemble(32), "fake-classifier", inputs / "ds", out, log=lambda *_: None)
    on_disk = json.loads((out / "metrics.json").read_text())
    target = on_disk["targets"]["label_response_error"]
    assert target["target"] == "<= 0.05" and 0 <= target["value"] <= 1
    assert target["ci"][0] <= target["value"] <= target["ci"][1]
    worst = on_disk["targets"]["frechet_ratio_worst_bin"]
    ratios = [r["ratio"] for r in on_disk["fidelity"]["bins"] if r["ratio"] is not None]
    assert worst["target"] == "<= 2.0" and worst["value"] == pytest.approx(max(ratios))
    # its interval over seeds: two of the five seeds hold fewer frames than a bin's n, so none is claimed
    assert worst["ci"] == [None, None] and on_disk["fidelity"]["worst_bin_ci"] is None
    assert on_disk["fidelity"]["ci_seeds"] == 5 and on_disk["fidelity"]["ci_resamples"] == 100
    header = (out / "fidelity.csv").read_text().splitlines()[0].split(",")
    assert header[6:9] == ["ratio", "ratio_ci_low", "ratio_ci_high"]
    assert header[-2:] == ["reference_frechet", "reference_ratio"]
    reference = on_disk["fidelity"]["reference"]
    assert reference["pool"] == "training split" and len(reference["labels"]) >= 2
    assert reference["n_draws"] == sum(r["n_generated"] for r in on_disk["fidelity"]["bins"])
    ratios = [r["reference_ratio"] for r in on_disk["fidelity"]["bins"] if r["reference_ratio"] is not None]
    assert ratios and reference["worst_bin"] == pytest.approx(max(ratios))
    response = on_disk["label_response"]
    assert set(response) == {"real", "transitions"}  # real2gen starts from real inputs: not a label response
    assert response["transitions"]["error"]["value"] == metrics["targets"]["label_response_error"]["value"]
    assert len(response["real"]["soft_label"]) >= 2
    assert (out / "label_response.png").is_file() and (out / "label_response.csv").is_file()
    html = (out / "report.html").read_text()
    assert "Label response: generated vs real" in html and "What to look for" in html
    assert "Calibrated real reference" in html and "calibrated real reference" in html
    assert "label response error" in html and "frechet ratio worst bin" in html
