"""What the report's page and files show of its metrics: the summary, the tables, the CSVs, the sliders, and the
escaping of the page's text (the numbers themselves: test_report.py)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from mitosis_ldm.artifacts import read_transitions, write_transitions
from patches.dataset import PatchDataset
from report.build import ReportConfig, build_report, verdict
from report.html import esc, fmt, png_data_uri, render, table
from report.stats import spearman

from conftest import read_csv
from report_helpers import FakeEnsemble
from test_report import CONDITIONS, SIZE, make_inputs

SEEDS = [7, 8, 9, 10, 11]


def scores_csv(path, scores: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "seed", "frame", "condition", "mean", "std", "member_0"])
        for s, row in enumerate(scores):
            for f, (c, v) in enumerate(zip(CONDITIONS, row)):
                writer.writerow([f"tr:{s}:{f}", s, f, c, v, 0.0, v])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report over transitions whose seeds are not their row numbers, with one frame off the real data and
    scores that flip in three seeds of five and rise in four."""
    root = make_inputs(tmp_path_factory.mktemp("page-inputs"))
    source = read_transitions(root / "tr")
    frames = np.array(source.frames)
    frames[2, 3] = np.array([110, 60, 120], np.uint8)  # no nucleus: flagged as outside the real data
    write_transitions(root / "seeds", frames, {**source.manifest, "seeds": SEEDS})
    scores = np.tile(CONDITIONS, (5, 1))
    scores[0], scores[1] = 1 - CONDITIONS, 0.4 * CONDITIONS
    scores_csv(root / "seeds" / "scores.csv", scores)
    out = tmp_path_factory.mktemp("page-out") / "report"
    metrics = build_report(ReportConfig(bootstrap=100, max_train_features=16), [root / "seeds"], [root / "r2g"],
                           FakeEnsemble(SIZE), "fake-classifier", root / "ds", out, log=lambda *_: None)
    return {"root": root, "out": out, "metrics": metrics, "html": (out / "report.html").read_text()}


def html_table(html: str, first_header: str) -> list[list[str]]:
    """The body rows of the page's table whose first header cell is `first_header`, cells as raw HTML."""
    for match in re.finditer(r"<table[^>]*><thead><tr><th>(.*?)</th>.*?<tbody>(.*?)</tbody></table>", html, re.S):
        if match[1] == first_header:
            return [re.findall(r"<td>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", match[2], re.S)]
    raise AssertionError(f"no table starting with {first_header!r}")


def test_summary_shows_the_flip_rate_with_its_own_interval(report):
    metrics = report["metrics"]
    flip = metrics["consistency"]["transitions"]["flip"]
    assert flip["value"] == pytest.approx(3 / 5)
    assert metrics["targets"]["flip_rate"]["ci"] == flip["ci"]
    assert metrics["targets"]["median_spearman"]["ci"] == metrics["consistency"]["transitions"]["spearman"]["ci"]


def test_summary_verdicts_say_met_missed_or_nothing(report):
    rows = {cells[0]: cells for cells in html_table(report["html"], "metric")}
    for name, target in report["metrics"]["targets"].items():
        verdict = "–" if target["met"] is None else "met" if target["met"] else "missed"
        assert re.sub(r"<[^>]+>", "", rows[name.replace("_", " ")][4]) == verdict, name
    assert report["metrics"]["targets"]["flip_rate"]["met"] is False  # flips in 3 of 5 seeds


def test_summary_interval_reads_low_then_high(report):
    rows = {cells[0]: cells for cells in html_table(report["html"], "metric")}
    low, high = report["metrics"]["targets"]["flip_rate"]["ci"]
    assert low < high
    assert rows["flip rate"][2] == f"[{low:.3f}, {high:.3f}]"


def test_morphology_median_over_seeds_is_the_median_of_each_seeds_spearman(report):
    rows = [r for r in read_csv(report["out"] / "frames.csv") if r["folder"] == "transitions"]
    conditions = np.array([float(r["condition"]) for r in rows if r["seed"] == str(SEEDS[0])])
    for name, entry in report["metrics"]["morphology"]["transitions"].items():
        per_seed = [spearman(conditions, np.array([float(r[name]) if r[name] else np.nan
                                                   for r in rows if r["seed"] == str(seed)]))
                    for seed in SEEDS]
        assert entry["median_seed_spearman"] == pytest.approx(np.nanmedian(per_seed)), name


def test_morphology_table_puts_the_mean_curve_then_the_median_per_seed(report):
    from report.morphology import FEATURES

    rows = {cells[0]: cells for cells in html_table(report["html"], "feature")}
    differ = 0
    for name, entry in report["metrics"]["morphology"]["transitions"].items():
        curve, median = fmt(entry["spearman_mean_curve"]), fmt(entry["median_seed_spearman"])
        assert rows[esc(FEATURES[name])][1:3] == [curve, median], name
        differ += curve != median
    assert differ  # some feature tells the two columns apart


def test_real_morphology_bins_sit_at_their_patches_mean_soft_label(report):
    soft = np.array([float(r["soft_label"]) for r in read_csv(report["out"] / "real_patches.csv")])
    edges = ReportConfig().label_bins
    inside = [(soft >= lo) & ((soft < hi) | (hi == edges[-1])) for lo, hi in zip(edges[:-1], edges[1:])]
    expected = [soft[m].mean() for m in inside if m.any()]
    assert report["metrics"]["morphology"]["real"]["h_mean"]["bin_mean_label"] == pytest.approx(expected)


def test_real_patches_csv_gives_each_patch_its_soft_and_hard_label(report):
    ds = PatchDataset(report["root"] / "ds", split=None)
    where = {pid: i for i, pid in enumerate(ds.ids())}
    rows = read_csv(report["out"] / "real_patches.csv")
    assert {r["soft_label"] for r in rows} >= {"0.333333", "0.666667"}
    for r in rows:
        i = where[r["id"]]
        assert float(r["soft_label"]) == pytest.approx(ds.soft_labels[i], abs=1e-6)
        assert float(r["hard_label"]) == ds.hard_labels[i]


def test_frames_csv_names_each_transition_by_its_seed(report):
    rows = [r for r in read_csv(report["out"] / "frames.csv") if r["folder"] == "transitions"]
    assert [r["seed"] for r in rows] == [str(s) for s in SEEDS for _ in CONDITIONS]


def test_a_frame_outside_the_real_data_is_named_by_its_seed(report):
    flagged = report["metrics"]["atypical"]["pixels"]["seeds_flagged"]["transitions"]
    assert SEEDS[2] in flagged and set(flagged) <= set(SEEDS)
    rows = read_csv(report["out"] / "atypical-pixels.csv")
    assert (str(SEEDS[2]), "3") in {(r["seed"], r["frame"]) for r in rows if r["folder"] == "transitions"}
    assert {r["seed"] for r in rows} <= {str(s) for s in SEEDS}


def test_feature_memorisation_searches_max_train_features_patches(report):
    memorisation = report["metrics"]["memorisation"]
    assert memorisation["features"]["n_train"] == 16
    assert memorisation["pixels"]["n_train"] == report["metrics"]["inputs"]["n_train_searched"] > 16


def test_fidelity_ratio_is_the_mean_distance_over_the_mean_yardstick(report):
    fid = report["metrics"]["fidelity"]
    assert fid["ratio"] == pytest.approx(fid["frechet_mean"] / fid["yardstick_mean"])
    assert report["metrics"]["targets"]["frechet_ratio"]["value"] == fid["ratio"]


def test_label_noise_thumbnails_show_the_ranked_patches(report):
    ds = PatchDataset(report["root"] / "ds", split=None)
    where = {pid: i for i, pid in enumerate(ds.ids())}
    rows = html_table(report["html"], "rank")
    assert len(rows) == 20
    for cells in rows:
        src = re.search(r'src="([^"]+)"', cells[1])[1]
        assert src == png_data_uri(ds.uint8(np.array([where[cells[2]]]))[0]), cells[2]


def test_each_slider_ends_at_the_last_frame(report):
    sliders = re.findall(r'data-folder="([^"]+)".*?type="range" min="0" max="(\d+)"', report["html"])
    assert sliders == [("transitions", "5")] * 5 + [("real2gen", "3")] * 3


def test_memorisation_target_is_the_pixel_share(report):
    memorisation = report["metrics"]["memorisation"]
    assert memorisation["pixels"]["share"] != memorisation["features"]["share"]
    assert report["metrics"]["targets"]["memorisation_share"]["value"] == memorisation["pixels"]["share"]


# -- the page's pieces ----------------------------------------------------------------

def test_a_closing_script_tag_in_the_frame_data_stays_inside_the_data_block():
    hostile = "</script><script>alert(1)</script>"
    folder = {"seeds": [{"title": "t", "frames": ["data:,"], "captions": [hostile], "is_input": [False],
                         "scores": [0.5], "stds": [0.0], "features": [[]]}], "feature_names": []}
    text = render({"title": "t", "subtitle": "s", "sections": [], "folders": {"f": folder}})
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)[1]
    assert json.loads(block)["f"]["seeds"][0]["captions"] == [hostile]
    assert "alert" not in text.replace(block, "")


def test_table_cells_are_escaped_unless_already_html():
    from report.html import Markup

    html = table(["id"], [["<b>a & b</b>"], [Markup("<i>x</i>")]])
    assert "<td>&lt;b&gt;a &amp; b&lt;/b&gt;</td>" in html and "<td><i>x</i></td>" in html


def test_booleans_read_yes_and_no():
    assert (fmt(True), fmt(False), fmt(3), fmt(0.5), fmt(None)) == ("yes", "no", "3", "0.500", "–")


def test_missing_values_are_empty_csv_cells():
    from report.outputs import csv_text

    assert csv_text(["a", "b"], [[float("nan"), None], [np.float64("inf"), 0.25]]) == "a,b\n,\n,0.25\n"


def test_a_float32_nan_is_an_empty_csv_cell_too():
    from report.outputs import csv_text

    # the dataset's labels and true degree are float32: an unlabelled patch's were written as "nan"
    assert csv_text(["soft_label", "true_degree"], [[np.float32("nan"), np.float32(0.5)]]) == \
        "soft_label,true_degree\n,0.5\n"


def test_a_folders_own_metrics_json_is_kept_without_overwrite(tmp_path):
    from types import SimpleNamespace

    from report.outputs import write_folder_metrics

    (tmp_path / "metrics.json").write_text("mine")
    folder = SimpleNamespace(path=tmp_path, summary={"n_seeds": 1}, per_seed=[], score_source="x")
    write_folder_metrics(folder, tmp_path / "report", overwrite=False)
    assert (tmp_path / "metrics.json").read_text() == "mine"
    write_folder_metrics(folder, tmp_path / "report", overwrite=True)
    assert json.loads((tmp_path / "metrics.json").read_text())["consistency"] == {"n_seeds": 1}


def test_a_value_on_its_bound_meets_the_target_and_a_missing_one_has_no_verdict():
    assert verdict(0.05, "<=", 0.05) is True and verdict(0.9, ">=", 0.9) is True  # e.g. 1 frame of 20 memorised
    assert verdict(0.0501, "<=", 0.05) is False and verdict(0.8999, ">=", 0.9) is False
    assert verdict(None, "<=", 2.0) is None and verdict(float("nan"), ">=", 0.9) is None
