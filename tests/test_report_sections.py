"""The extra judges' report sections read from their folders: the posterior's comparison with the ensemble and
the CAS table (the sections' end-to-end runs: test_posterior.py, test_generate.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from report.build import ReportConfig
from report.extras import HeldOut

from test_posterior_report import write_posterior_folder


def test_datasets_without_a_content_hash_are_not_the_same_dataset(tmp_path):
    from report.posterior_section import same_dataset

    for name, meta in (("a", {}), ("b", {}), ("c", {"content_hash": "h1"}), ("d", {"content_hash": "h1"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset.json").write_text(json.dumps(meta))
    assert same_dataset(str(tmp_path / "a"), tmp_path / "a")
    assert not same_dataset(str(tmp_path / "a"), tmp_path / "b")
    assert same_dataset(str(tmp_path / "c"), tmp_path / "d")
    assert not same_dataset(str(tmp_path / "a"), tmp_path / "c")


def test_a_judges_auroc_is_against_the_hard_label():
    from report.posterior_section import judge_metrics

    score = np.array([0.1, 0.4, 0.6, 0.9, 0.5])
    soft = np.array([0.0, 1 / 3, 2 / 3, 1.0, 0.5])
    hard = np.array([0.0, 0.0, 1.0, 1.0, np.nan])  # no hard label for the last patch
    metrics = judge_metrics(score, soft, hard, np.full(5, np.nan))
    assert metrics["auroc_hard"] == 1.0


def test_the_combined_finder_is_judged_against_the_better_single_judge(tmp_path):
    from report.posterior_section import extra

    (tmp_path / "ds").mkdir()  # the report reads only the dataset's true_threshold
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"format": "mitosis-ldm/patches",
                                                             "true_threshold": 0.5}))
    for name in ("patches.npy", "labels.csv"):
        (tmp_path / "ds" / name).touch()
    degree = np.delete(np.linspace(0.05, 0.95, 21), 10)  # 20 patches, none at the threshold
    soft = (degree >= 0.5).astype(float)
    wrong = [0, 5, 14, 19]
    soft[wrong] = 1 - soft[wrong]
    # the posterior knows the degree and finds every wrong label; the ensemble agrees with exactly those
    ensemble = np.where(np.isin(np.arange(20), wrong), soft, 1 - soft)
    ids = [f"p{i}" for i in range(20)]
    folder = write_posterior_folder(tmp_path / "post", ids, [f"{tmp_path / 'ds'}:{i}" for i in ids], degree,
                                    np.full(20, 0.1))
    held_out = HeldOut(None, tmp_path / "ds", "test", ids, np.zeros((20, 1, 1, 3), np.uint8), soft, soft, degree,
                       ensemble, np.zeros(20), ReportConfig(noise_top=4), lambda *_: None)
    noise = extra(folder)(held_out).metrics["label_noise"]
    assert noise["generative"]["precision_at_top"] == 1.0 and noise["discriminative"]["precision_at_top"] == 0.0
    assert noise["combined"]["precision_at_top"] < 1.0
    assert noise["combined_at_least_best_single"] is False


def cas_result() -> dict:
    def entry(mean, values):
        spread = max(values) - min(values)
        return {"auroc": {"mean": mean, "spread": spread, "values": values},
                "spearman_true_degree": {"mean": 0.5, "spread": 0.0, "values": [0.5, 0.5]},
                "balanced_accuracy": {"mean": 0.5, "spread": 0.0, "values": [0.5, 0.5]}, "train_patches": 10}

    table = {"real": entry(0.95, [0.94, 0.96]), "real+generated": entry(0.97, [0.96, 0.98]),
             "real@0.05": entry(0.85, [0.83, 0.87]), "real+generated@0.05": entry(0.9, [0.89, 0.91])}
    return {"bench": "cas", "fractions": [0.05], "seeds": [0, 1], "table": table, "targets": {}}


def test_cas_table_gives_auroc_as_mean_plus_minus_half_the_seed_range(tmp_path):
    from report.cas_section import extra

    (tmp_path / "cas.json").write_text(json.dumps(cas_result()))
    html = extra(tmp_path / "cas.json")(None).write(tmp_path)
    assert "0.950 ± 0.010" in html and "0.850 ± 0.020" in html and "0.900 ± 0.010" in html


def test_cas_plot_takes_seeds_that_agree_whose_mean_rounds_outside_them(tmp_path):
    from report.cas_section import auroc_vs_fraction

    data = cas_result()
    values = [0.7, 0.7, 0.7]
    assert np.mean(values) < min(values)  # as bench/cas.py summarises them
    data["table"]["real"]["auroc"] = {"mean": float(np.mean(values)), "spread": 0.0, "values": values}
    auroc_vs_fraction(tmp_path / "cas.png", data)
    assert (tmp_path / "cas.png").stat().st_size > 0


@pytest.mark.parametrize("change,field", [
    (lambda d: d["table"].update(best={}), "'table' has the setting 'best'"),
    (lambda d: d["table"].update({"real@lots": d["table"]["real"]}), "'table' has the setting 'real@lots'"),
    (lambda d: d["table"]["real"]["auroc"].update(values=[]), "'table.real.auroc'"),
    (lambda d: d["table"]["real"]["spearman_true_degree"].update(mean="0.5"), "'table.real.spearman_true_degree'"),
    (lambda d: d["table"]["real"].update(train_patches=True), "'table.real.train_patches'"),
    (lambda d: d.update(fractions=[0.05, 2]), "'fractions'"),
    (lambda d: d.pop("seeds"), "'seeds' is missing"),
    (lambda d: d["targets"].update(cas_ratio={"value": 0.9, "target": ">= 0.9", "met": "yes"}),
     "'targets.cas_ratio'"),
    (lambda d: d.update(generation_patches_per_s=None), "'generation_patches_per_s'"),
    (lambda d: d.update(label_noise_ceiling={"bayes_auroc": 0.9}), "'label_noise_ceiling'"),
])
def test_a_cas_result_is_checked_when_read_naming_the_field(tmp_path, change, field):
    from mitosis_ldm.errors import UserError
    from report.cas_section import extra

    data = cas_result()
    change(data)
    (tmp_path / "cas.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"cas.json: field {re.escape(field)}"):
        extra(tmp_path / "cas.json")


def test_cas_plot_ends_at_all_the_real_labels(tmp_path, monkeypatch):
    from report import cas_section

    figures = []
    monkeypatch.setattr(cas_section, "_save", lambda fig, path: figures.append(fig))
    cas_section.auroc_vs_fraction(tmp_path / "cas.png", cas_result())
    real, both = figures[0].axes[0].containers[:2]
    assert real.lines[0].get_xdata().tolist() == [0.05, 1.0]
    assert real.lines[0].get_ydata().tolist() == [0.85, 0.95]
    assert both.lines[0].get_xdata().tolist() == [0.05, 1.0]
