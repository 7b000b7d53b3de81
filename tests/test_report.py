"""The report: label-consistency numbers, morphology, the whole report, the HTML page and bad input
(fidelity and memorisation numbers: test_report_fidelity.py)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from mitosis_ldm.artifacts import write_transitions
from patches.dataset import SplitConfig, build_dataset
from report import consistency, morphology
from report.build import ReportConfig, build_report
from report.cli import main as report_main

from report_helpers import FakeEnsemble, draw_nucleus, synth_shard

SIZE = 32
CONDITIONS = np.linspace(0, 1, 6)


def make_inputs(root, size: int = SIZE, n_seeds: int = 5, seeds_names=None):
    """A patch dataset, a transitions folder and a real2gen folder of drawn nuclei."""
    build_dataset(root / "ds", [("a", synth_shard, {"n": 400, "size": size, "seed": 1})], patch_size=size, margin=0,
                  meta={"source": "fake", "true_threshold": 0.5},
                  split=SplitConfig(mode="random", val=0.1, test=0.3), progress=False)
    frames = np.stack([np.stack([draw_nucleus(c, 7000 + s, size) for c in CONDITIONS]) for s in range(n_seeds)])
    write_transitions(root / "tr", frames, {"seeds": list(range(n_seeds)), "conditions": CONDITIONS.tolist()})
    real = np.stack([np.stack([draw_nucleus(0.2, 9000 + s, size)]
                              + [draw_nucleus(c, 9100 + s, size) for c in (0, 0.5, 1)]) for s in range(3)])
    manifest = {"seeds": [0, 1, 2], "conditions": [None, 0, 0.5, 1], "has_input_frame": True, "kind": "real2gen",
                "input_labels": [0.33, None, 1.0], "psnr_inversion_db": [24.5, 22.25, 30.0]}
    if seeds_names:
        manifest["inputs"] = seeds_names
    write_transitions(root / "r2g", real, manifest)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("report-inputs"),
                       seeds_names=["<script>alert('x')</script>", "cmu:7", "cmu:9 & co"])


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-out") / "report"
    metrics = build_report(ReportConfig(bootstrap=200), [inputs / "tr"], [inputs / "r2g"], FakeEnsemble(SIZE),
                           "fake-classifier", inputs / "ds", out, log=lambda *_: None)
    return out, metrics


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """A one-member classifier trained for a few steps through classifier.train's real entry point."""
    from classifier.train import main as train_main

    root = tmp_path_factory.mktemp("report-classifier")
    build_dataset(root / "ds", [("a", synth_shard, {"n": 160, "size": SIZE, "seed": 3})], patch_size=SIZE, margin=0,
                  meta={"source": "fake"}, split=SplitConfig(mode="random", val=0.2, test=0.2), progress=False)
    train_main(["--out", str(root / "run"), "--set", f"data.dataset={root / 'ds'}", "--set", "model.name=resnet10t",
                "--set", "model.model_kwargs={channels: [8, 16, 32, 64]}", "--set", f"model.input_size={SIZE}",
                "--set", "model.upsample=1", "--set", "model.normalisation=meanstd", "--set", "ensemble.members=1",
                "--set", "ensemble.eval_every=4", "--set", "train.max_steps=8", "--set", "train.batch_size=32",
                "--set", "train.checkpoint_every=1000"])
    return root / "run" / "model"


# -- the numbers -------------------------------------------------------------

def test_transition_metrics_on_known_sequences():
    c = np.linspace(0, 1, 11)
    ideal = consistency.transition_metrics(c, c)
    assert ideal == {"spearman": pytest.approx(1.0), "monotone": 1.0, "flip": 1.0, "abs_error": pytest.approx(0.0)}
    backwards = consistency.transition_metrics(c, 1 - c)
    assert backwards["spearman"] == pytest.approx(-1.0) and backwards["monotone"] == 0.0 and backwards["flip"] == 0.0
    # one dip: 9 of 10 steps rise; a sigmoid-like curve flips but is off the diagonal
    dip = c.copy()
    dip[5] = 0.3
    assert consistency.transition_metrics(c, dip)["monotone"] == pytest.approx(0.9)
    # a score that saturates from 0.6 on: its flat steps still follow the condition (ties count)
    assert consistency.transition_metrics(c, np.minimum(c, 0.6))["monotone"] == 1.0
    step = np.where(c > 0.5, 0.9, 0.1)
    m = consistency.transition_metrics(c, step)
    assert m["flip"] == 1.0 and m["abs_error"] == pytest.approx(np.mean(np.abs(step - c)))
    # never crosses 0.5 at the top: no flip; a flat score has no monotone association
    assert consistency.transition_metrics(c, c * 0.4)["flip"] == 0.0
    assert consistency.transition_metrics(c, np.full(11, 0.5))["spearman"] == 0.0
    # order of the columns does not matter
    perm = np.random.default_rng(0).permutation(11)
    assert consistency.transition_metrics(c[perm], dip[perm]) == consistency.transition_metrics(c, dip)


def test_aggregate_has_bootstrap_intervals_around_the_statistic():
    rng = np.random.default_rng(0)
    rows = [{"seed": i, "spearman": r, "monotone": 0.8, "flip": float(i % 4 != 0), "abs_error": 0.1 + 0.01 * i}
            for i, r in enumerate(rng.uniform(0.6, 1.0, 16))]
    agg = consistency.aggregate(rows, n_resamples=300)
    assert agg["n_seeds"] == 16
    assert agg["spearman"]["value"] == pytest.approx(np.median([r["spearman"] for r in rows]))
    lo, hi = agg["spearman"]["ci"]
    assert lo < agg["spearman"]["value"] < hi
    assert agg["flip"]["value"] == pytest.approx(0.75) and agg["flip"]["ci"][0] < 0.75 < agg["flip"]["ci"][1]
    assert agg["monotone"]["ci"] == [0.8, 0.8]  # constant: the interval collapses


def test_morphology_follows_darkness_and_irregularity():
    calm, mitotic = draw_nucleus(0.0, 5), draw_nucleus(1.0, 5)
    a, b = morphology.measure(calm), morphology.measure(mitotic)
    assert b["h_mean"] > a["h_mean"] + 0.02
    assert b["irregularity"] > a["irregularity"] + 0.1
    assert b["solidity"] < a["solidity"]
    assert b["contrast"] > a["contrast"] and b["granularity"] > a["granularity"]
    mask, density = morphology.segment_nucleus(calm)
    assert mask[SIZE // 2, SIZE // 2] and 0.05 < mask.mean() < 0.4  # the central nucleus, not the background
    # darkness is the mean haematoxylin density over that nucleus, below its darkest pixel
    assert a["h_mean"] == pytest.approx(density[mask].mean()) and a["h_mean"] < a["h_max"]
    blank = np.full((SIZE, SIZE, 3), 230, np.uint8)
    assert all(np.isnan(v) for v in morphology.measure(blank).values())


def _reference_segment(image):
    """The segmentation spelled out with skimage's label/regionprops and a disk dilation (the slow, plain way)."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.morphology import disk

    density = gaussian(rgb2hed(np.maximum(image, 4))[..., 0], sigma=1.0)
    h, w = density.shape
    regions = label(ndi.binary_opening(density > threshold_otsu(density), structure=disk(1)))
    yy, xx = np.mgrid[:h, :w]
    centre = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    keys = []
    for region in regionprops(regions):
        near = centre[region.coords[:, 0], region.coords[:, 1]].min()
        keys.append(((near > h / 8, near if near > h / 8 else -region.area), region.label))
    mask = ndi.binary_fill_holes(regions == min(keys)[1]) if keys else np.zeros((h, w), bool)
    ring = ndi.binary_dilation(mask, structure=disk(max(2, h // 10))) & ~mask
    return mask, ring


def test_segmentation_picks_the_region_the_plain_definition_picks(sample_slide):
    # windows of the real slide (in 4 of these 120, 4- and 8-connected regions pick different nuclei), and drawn
    # scenes of several dark blobs: off-centre ones, equal twins, hollow nuclei
    from patches.slides import open_slide

    slide = open_slide(str(sample_slide))
    rng = np.random.default_rng(0)
    width, height = slide.size
    scenes = [slide.read_region(int(x) - SIZE // 2, int(y) - SIZE // 2, SIZE, SIZE)
              for x, y in zip(rng.integers(40, width - 40, 120), rng.integers(40, height - 40, 120))]
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    scenes += [draw_nucleus(d, s) for d, s in [(0.0, 1), (0.5, 2), (1.0, 3)]]
    for _ in range(40):
        image = np.empty((SIZE, SIZE, 3), np.uint8)
        image[:] = (232, 186, 212)
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(4, SIZE - 4, 2)
            ry, rx = rng.uniform(2, 9, 2)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            if rng.random() < 0.25:  # a hollow nucleus: fill_holes must close it
                inside &= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 > 0.3
            image[inside] = rng.integers(20, 160, 3)
        scenes.append(image)
    twins = np.empty((SIZE, SIZE, 3), np.uint8)
    twins[:] = (232, 186, 212)
    twins[(np.hypot(yy - 10, xx - 10) < 4) | (np.hypot(yy - 10, xx - SIZE + 11) < 4)] = (60, 20, 90)
    scenes.append(twins)
    picked = set()
    for image in scenes:
        mask, _ = morphology.segment_nucleus(image)
        want, ring = _reference_segment(image)
        np.testing.assert_array_equal(mask, want)
        picked.add(int(mask.sum()))
        if want.sum() >= 4:  # the contrast is read on the ring around the nucleus
            from skimage.color import rgb2gray

            grey = rgb2gray(image)
            features = morphology.measure(image)
            assert features["area"] == want.sum()
            assert features["contrast"] == pytest.approx(grey[ring].mean() - grey[want].mean(), abs=1e-12)
    assert len(picked) > 20  # the scenes really differ


# -- the whole report ------------------------------------------------------------

def test_report_on_clean_transitions_meets_the_targets(built):
    out, metrics = built
    for name in ("metrics.json", "report.html", "frames.csv", "real_patches.csv", "fidelity.csv", "label_noise.csv",
                 "consistency-transitions.csv", "consistency-real2gen.csv", "consistency-transitions.png",
                 "morphology.png", "fidelity.png", "memorisation-pixels.png", "degree.png", "config.yaml"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["targets"].keys() == metrics["targets"].keys()
    # drawn transitions are clean and the fake classifier reads darkness: consistency and morphology hold
    for name in ("median_spearman", "flip_rate", "h_mean_spearman", "irregularity_spearman"):
        assert on_disk["targets"][name]["met"] is True, (name, on_disk["targets"][name])
    # mean |score - condition| is measured, not judged: the label-response error replaced it as the target
    assert "mean_abs_error" not in on_disk["targets"]
    assert 0 <= on_disk["consistency"]["transitions"]["abs_error"]["value"] < 0.15
    assert on_disk["consistency"]["transitions"]["n_seeds"] == 5
    assert on_disk["consistency"]["real2gen"]["n_seeds"] == 3  # the real input column is not a condition
    assert on_disk["memorisation"]["pixels"]["n_generated"] == 5 * 6  # transitions only, not real2gen
    noise = on_disk["benchmark"]["label_noise"]
    assert noise["n_labelled"] > 0 and noise["top"] == len(noise["top_ranked"]) <= 50
    assert 0 <= noise["truly_mislabelled_in_top"] <= noise["top"]
    with open(out / "frames.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 * 6 + 3 * 4
    assert sum(r["is_input"] == "1" for r in rows) == 3


def test_report_html_is_self_contained_and_escaped(built):
    out, _ = built
    text = (out / "report.html").read_text()
    assert "<script>alert(" not in text                          # a hostile input name stays text
    assert "&lt;script&gt;alert(" in text or "\\u003cscript>alert(" in text
    assert "cmu:9 &amp; co" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)  # nothing fetched from the network
    assert text.count('class="seed-row"') == 5 + 3
    assert text.count('type="range"') == 5 + 3
    assert text.count("data:image/png;base64,") >= 5 + 3 + 5   # first frames, plots, label-noise thumbnails
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)[1])
    r2g = data["real2gen"]["seeds"][0]
    assert r2g["is_input"][0] is True and r2g["captions"][0] == "real input (label 0.33)"
    assert data["real2gen"]["seeds"][1]["captions"][0] == "real input (unlabelled)"
    assert "(inversion reconstructs it at 24.5 dB)" in text
    assert len(data["transitions"]["seeds"][0]["frames"]) == 6


def test_folder_metrics_written_beside_the_frames(built, inputs):
    saved = json.loads((inputs / "tr" / "metrics.json").read_text())
    assert saved["consistency"]["spearman"]["value"] == pytest.approx(1.0)
    assert len(saved["per_seed"]) == 5


def test_existing_scores_csv_is_used(tmp_path):
    root = make_inputs(tmp_path, n_seeds=3)
    # scores that fall with the condition: the report must read them, not rescore
    with open(root / "tr" / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "seed", "frame", "condition", "mean", "std", "member_0"])
        for s in range(3):
            for f, c in enumerate(CONDITIONS):
                writer.writerow([f"tr:{s}:{f}", s, f, c, 1 - c, 0.0, 1 - c])
    metrics = build_report(ReportConfig(bootstrap=50), [root / "tr"], [], FakeEnsemble(SIZE), "fake", root / "ds",
                           tmp_path / "out", log=lambda *_: None)
    assert metrics["consistency"]["transitions"]["spearman"]["value"] == pytest.approx(-1.0)
    assert metrics["consistency"]["transitions"]["score_source"].endswith("scores.csv")
    assert metrics["targets"]["flip_rate"]["met"] is False


# -- the command and its bad input ---------------------------------------------------

def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def test_cli_end_to_end_with_a_trained_classifier(inputs, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "report"
    assert report_main(["--transitions", str(inputs / "tr"), "--real2gen", str(inputs / "r2g"), "--classifier",
                        str(tiny_classifier), "--dataset", str(inputs / "ds"), "--out", str(out), "--overwrite",
                        "--set", "bootstrap=100"]) == 0
    printed = capsys.readouterr().out
    assert "median_spearman" in printed and f"report: {(out / 'report.html').resolve()}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inputs"]["classifier"] == str(tiny_classifier)
    assert metrics["config"]["bootstrap"] == 100
    assert metrics["consistency"]["transitions"]["score_source"].startswith("classifier")  # no scores.csv: scored here
    assert all(0.0 <= v["value"] <= 1.0 for k, v in metrics["consistency"]["transitions"].items()
               if k in ("flip", "monotone"))


def test_missing_manifest_is_one_line(inputs, tiny_classifier, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "frames.npy", np.zeros((1, 2, SIZE, SIZE, 3), np.uint8))
    code, err = run_cli(capsys, "--transitions", bad, "--classifier", tiny_classifier, "--dataset", inputs / "ds",
                        "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 0
    assert "manifest.json" in err and "not a transitions folder" in err
    assert not (tmp_path / "out").exists()


def test_score_count_mismatch_is_one_line(tiny_classifier, tmp_path, capsys):
    root = make_inputs(tmp_path, n_seeds=2)
    (root / "tr" / "scores.csv").write_text("name,seed,frame,condition,mean,std,member_0\nx,0,0,0,0.1,0,0.1\n")
    code, err = run_cli(capsys, "--transitions", root / "tr", "--classifier", tiny_classifier, "--dataset",
                        root / "ds", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 0
    assert "scores.csv" in err and "1 score rows" in err and "12 frames" in err
    assert not (tmp_path / "out").exists()


def test_classifier_that_does_not_fit_the_patch_size_is_one_line(tiny_classifier, tmp_path, capsys):
    root = make_inputs(tmp_path, size=48, n_seeds=2)
    code, err = run_cli(capsys, "--transitions", root / "tr", "--classifier", tiny_classifier, "--dataset",
                        root / "ds", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 0
    assert "patch_size" in err and "32" in err and "48x48" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_without_overwrite_is_one_line(inputs, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "--transitions", inputs / "tr", "--classifier", tiny_classifier, "--dataset",
                        inputs / "ds", "--out", out)
    assert code == 2 and err.count("\n") == 0 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_wrong_artifact_for_classifier_is_one_line(inputs, tmp_path, capsys):
    code, err = run_cli(capsys, "--transitions", inputs / "tr", "--classifier", inputs / "ds", "--dataset",
                        inputs / "ds", "--out", tmp_path / "out")
    assert code == 2 and "is a patch dataset folder, but --classifier expects a classifier folder" in err


def test_demo_config_spells_out_the_defaults_and_full_config_loads():
    from mitosis_ldm.config import load_config

    from conftest import REPO

    assert load_config(ReportConfig, REPO / "configs" / "demo" / "report.yaml") == ReportConfig()
    full = load_config(ReportConfig, REPO / "configs" / "full" / "report.yaml")
    assert full.max_real > ReportConfig().max_real and full.bootstrap >= ReportConfig().bootstrap


def test_saturated_chromatin_is_still_nucleus():
    # near-black chromatin with the green channel at 0 (as generated mitotic figures often are): colour
    # deconvolution without a transmission floor calls it eosin, so darker nuclei would read as paler
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    disc = np.hypot(yy, xx) < 7
    densities = []
    for colour in [(150, 100, 170), (80, 40, 110), (60, 0, 90), (20, 0, 40)]:  # ever darker purple
        image = np.empty((SIZE, SIZE, 3), np.uint8)
        image[:] = (232, 186, 212)
        image[disc] = colour
        mask, _ = morphology.segment_nucleus(image)
        assert abs(int(mask.sum()) - int(disc.sum())) <= 0.15 * disc.sum()
        features = morphology.measure(image)
        densities.append(features["h_mean"])
        assert abs(features["irregularity"]) < 0.03  # a round outline: perimeter / the circle's - 1 is about 0
    assert np.all(np.diff(densities) > 0), densities


def test_transitions_section_says_how_the_frames_were_sampled():
    from report.page import sampling_note

    auto = sampling_note({"guidance": 3.0, "guide": "weak", "guidance_interval": [0.2, 0.8], "guidance_rescale": 0.5,
                          "sampler": "dpm++", "steps": 20})
    assert auto == ("Sampled with guidance 3 against the pipeline's weak model (autoguidance), on noise levels "
                    "[0.2, 0.8], rescale 0.5, dpm++, 20 steps. ")
    plain = sampling_note({"guidance": 2.0, "guidance_interval": [0.0, 1.0], "guidance_rescale": 0.0,
                           "sampler": "ddim", "steps": 8})
    assert plain == "Sampled with guidance 2 against the null label (classifier-free), ddim, 8 steps. "
    assert sampling_note({"seeds": [0]}) == ""  # a folder written without sampling settings says nothing
