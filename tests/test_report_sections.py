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
