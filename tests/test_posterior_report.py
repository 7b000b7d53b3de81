"""The report's posterior section: both judges compared on the same patches, unlabelled nuclei, and a folder
that is not a posterior."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def write_posterior_folder(out: Path, ids, names, expected, std) -> Path:
    """A posterior folder as `mitosis-ldm posterior` writes it (only the columns the report reads vary)."""
    from diffusion.posterior import csv_text
    from mitosis_ldm.io import write_json, write_text

    header = ["id", "p_y=0", "p_y=1", "expected_y", "map_y", "posterior_std", "uncond_error", "name", "label"]
    rows = [[i, 1 - e, e, e, round(e), s, 0.5, n, ""] for i, n, e, s in zip(ids, names, expected, std)]
    out.mkdir(parents=True)
    write_text(out / "posterior.csv", csv_text(header, rows))
    write_json(out / "posterior.json", {"format": "mitosis-ldm/posterior", "grid": [0, 1], "draws": 4,
                                        "settings": {"error_space": "v_prediction", "guidance": 1.0},
                                        "calibration": {"temperature": 0.01, "calibrated": True,
                                                        "fit": {"patches": 9, "dataset": "d", "split": "val"}},
                                        "patches_per_s": 1.0})
    return out


@pytest.fixture(scope="module")
def report_world(tmp_path_factory):
    from patches.dataset import PatchDataset, SplitConfig, build_dataset
    from report.build import ReportConfig, ensemble_scores
    from report.extras import HeldOut
    from report_helpers import FakeEnsemble, synth_shard

    root = tmp_path_factory.mktemp("posterior-report")
    build_dataset(root / "ds", [("a", synth_shard, {"n": 200, "size": 32, "seed": 1})], patch_size=32, margin=0,
                  meta={"source": "fake", "true_threshold": 0.5}, split=SplitConfig(mode="random", seed=0),
                  progress=False)
    ds = PatchDataset(root / "ds")
    ensemble = FakeEnsemble(32)
    images = ds.uint8()
    scores, stds = ensemble_scores(ensemble, images, 64)
    held_out = HeldOut(ensemble, root / "ds", "all", ds.ids(), images, ds.soft_labels, ds.hard_labels,
                       ds.true_degree, scores, stds, ReportConfig(noise_top=20), lambda *_: None)
    return {"root": root, "ds": ds, "held_out": held_out}


def test_report_section_compares_both_judges_on_the_same_patches(report_world):
    from report.posterior_section import extra

    ds, held_out, root = report_world["ds"], report_world["held_out"], report_world["root"]
    degree = ds.true_degree.astype(float)
    # a generative judge that knows the truth for half the patches and knows nothing for the rest
    expected = np.where(np.arange(len(degree)) % 2 == 0, degree, 0.5)
    ids = ds.ids()[::-1]  # another order than the report's: matched by id
    folder = write_posterior_folder(root / "post", ids, [f"{root / 'ds'}:{i}" for i in ids], expected[::-1],
                                    np.full(len(ids), 0.1))
    section = extra(folder)(held_out)
    m = section.metrics
    assert section.key == "posterior" and m["patches"] == len(ds)
    from report.stats import spearman

    assert m["generative"]["spearman_true_degree"] == pytest.approx(spearman(expected, degree))
    assert m["discriminative"]["auroc_hard"] > 0.8
    assert set(m["label_noise"]) >= {"generative", "discriminative", "combined", "combined_at_least_best_single"}
    assert m["label_noise"]["combined"]["top"] == 20
    assert m["targets"]["spearman_true_degree"]["target"] == ">= 0.8"
    (root / "out-a").mkdir()
    html = section.write(root / "out-a")
    assert "Label-noise finder" in html and "data:image/png;base64," in html
    assert (root / "out-a" / "posterior-agreement.png").exists()


def test_report_section_on_unlabelled_nuclei_shows_the_most_mitotic(report_world, tmp_path):
    from patches.dataset import SplitConfig, build_dataset
    from report.posterior_section import extra
    from report_helpers import synth_shard

    real = build_dataset(tmp_path / "real", [("r", synth_shard, {"n": 12, "size": 32, "seed": 9})], patch_size=32,
                         margin=0, meta={"source": "fake"}, split=SplitConfig(mode="random", seed=0), progress=False)
    from patches.dataset import PatchDataset

    ids = PatchDataset(real).ids()
    expected = np.linspace(0, 1, len(ids))
    folder = write_posterior_folder(tmp_path / "post", ids, [f"{real}:{i}" for i in ids], expected,
                                    np.full(len(ids), 0.2))
    section = extra(folder)(report_world["held_out"])  # ids not among the held-out patches
    assert section.key == "posterior_unlabelled" and section.metrics["patches"] == 12
    top = section.metrics["most_mitotic_by_both"]
    assert len(top) == 12 and top[0]["expected_y"] >= 0.5
    (tmp_path / "out").mkdir()
    html = section.write(tmp_path / "out")
    assert html.count("<img") == 13 and (tmp_path / "out" / "posterior-unlabelled-hist.png").exists()


def test_report_refuses_a_folder_that_is_not_a_posterior(tmp_path):
    from mitosis_ldm.errors import UserError
    from report.posterior_section import extra

    (tmp_path / "posterior.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="posterior.json: field 'format'"):
        extra(tmp_path)


def _damage_csv(folder: Path, old: str, new: str) -> None:
    path = folder / "posterior.csv"
    path.write_bytes(path.read_bytes().replace(old.encode("latin-1"), new.encode("latin-1"), 1))


def _damage_info(folder: Path, **fields) -> None:
    path = folder / "posterior.json"
    info = json.loads(path.read_text())
    for key, value in fields.items():
        target = info
        *parents, last = key.split("__")
        for parent in parents:
            target = target[parent]
        target[last] = value
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("damage,message", [
    (lambda f: _damage_csv(f, "p1", "p\xff1"), r"posterior.csv: not UTF-8 text"),
    (lambda f: _damage_csv(f, ",0.125,", ","), r"posterior.csv: line 3 has fewer cells than the header"),
    (lambda f: _damage_csv(f, ",0.125,", ",nan,"), r"posterior.csv: line 3: field 'posterior_std' is 'nan'"),
    (lambda f: _damage_csv(f, ",0.125,", ",-0.125,"), r"posterior.csv: line 3: field 'posterior_std' is '-0.125', "
                                                      r"expected a non-negative number"),
    (lambda f: _damage_csv(f, "p2", "p" + "2" * 200_000), r"posterior.csv: not a readable CSV table"),
    (lambda f: _damage_info(f, settings="v"), r"posterior.json: field 'settings' is 'v', expected an object"),
    (lambda f: _damage_info(f, calibration__fit=3), r"posterior.json: field 'calibration.fit' is 3"),
    (lambda f: _damage_info(f, calibration__temperature="0.1"), r"posterior.json: field 'calibration.temperature'"),
    (lambda f: _damage_info(f, grid=11), r"posterior.json: field 'grid' is 11, expected the list of labels"),
])
def test_a_damaged_posterior_folder_is_one_line_naming_the_file_and_field(tmp_path, damage, message):
    from mitosis_ldm.errors import UserError
    from report.posterior_section import extra

    ids = [f"p{i}" for i in range(4)]
    folder = write_posterior_folder(tmp_path / "post", ids, [f"x:{i}" for i in ids], [0.0, 0.25, 0.5, 1.0],
                                    [0.1, 0.125, 0.3, 0.1])  # p1's posterior std: the only ',0.125,'
    extra(folder)  # whole, it reads
    damage(folder)
    with pytest.raises(UserError, match=message):
        extra(folder)
