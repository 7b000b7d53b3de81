"""The extra judges' report sections read from their folders: the posterior's comparison with the ensemble and
the CAS table (the sections' end-to-end runs: test_posterior.py, test_generate.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from report.build import ReportConfig
from report.extras import HeldOut

from test_posterior import write_posterior_folder


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
