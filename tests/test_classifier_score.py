"""`mitosis-ldm score` and `evaluate`: every input kind, the transitions contract, and each documented bad input."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from classifier_data import make_toy_dataset
from conftest import REPO, accelerate_cmd, launch_output, read_csv
from test_classifier import tiny_ensemble

from classifier import evaluate, score
from classifier.model import ClassifierEnsemble
from mitosis_ldm.artifacts import read_transitions, write_transitions
from mitosis_ldm.images import read_image, save_png
from patches.dataset import PatchDataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    tiny_ensemble().save_pretrained(root / "classifier")
    data = make_toy_dataset(root / "toy", n=60, size=32)
    images = PatchDataset(data).uint8()
    (root / "pngs").mkdir()
    for i in range(4):
        save_png(root / "pngs" / f"p{i}.png", images[i])
    frames = images[:6].reshape(2, 3, 32, 32, 3)
    write_transitions(root / "transitions", frames, {"seeds": [7, 8], "conditions": [0.0, 0.5, 1.0],
                                                     "guidance": 3.0, "sampler": "ddim", "steps": 5})
    return root


def run_score(capsys, *args):
    """Run score.main; return (exit code, stderr lines)."""
    try:
        score.main([str(a) for a in args] + ["--quiet"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_scores_files_folders_datasets_and_transitions(world, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    code, _ = run_score(capsys, "--classifier", world / "classifier", world / "pngs" / "p0.png", world / "pngs",
                        f"{world / 'toy'}:toy-0-3", world / "toy", "--split", "test", world / "transitions",
                        "--out", out)
    assert code == 0
    rows = read_csv(out)
    n_test = len(PatchDataset(world / "toy", split="test"))
    assert len(rows) == 1 + 4 + 1 + n_test + 6
    assert list(rows[0]) == ["name", "member_0", "member_1", "mean", "std"]
    ens = ClassifierEnsemble.from_pretrained(world / "classifier")
    png = read_image(world / "pngs" / "p0.png")
    expected = ens.predict(png[None])[0]
    got = [float(rows[0]["member_0"]), float(rows[0]["member_1"])]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    for row in rows:
        members = np.array([float(row["member_0"]), float(row["member_1"])])
        assert float(row["mean"]) == pytest.approx(members.mean(), abs=2e-6)
        assert float(row["std"]) == pytest.approx(members.std(), abs=2e-6)
    # the transitions folder got its own scores.csv with the artifacts.py columns, seed-major
    t = read_transitions(world / "transitions")
    scored = t.scores()
    assert list(scored[0]) == ["name", "seed", "frame", "condition", "mean", "std", "member_0", "member_1"]
    assert [(r["seed"], r["frame"], r["condition"]) for r in scored] == [
        (s, f, c) for s in ("7", "8") for f, c in (("0", "0"), ("1", "0.5"), ("2", "1"))]
    frame_scores = ens.predict(np.asarray(t.frames).reshape(6, 32, 32, 3))
    np.testing.assert_allclose([float(r["mean"]) for r in scored], frame_scores.mean(1), rtol=1e-4)
    np.testing.assert_allclose([[float(r["member_0"]), float(r["member_1"])] for r in scored], frame_scores, rtol=1e-4)
    assert (np.abs(frame_scores[:, 0] - frame_scores[:, 1]) > 1e-3).all()  # the members disagree: order shows
    # scoring again needs --overwrite, for the CSV and for the transitions' scores.csv
    code, err = run_score(capsys, "--classifier", world / "classifier", world / "transitions", "--out",
                          tmp_path / "other.csv")
    assert code == 2 and len(err) == 1 and "scores.csv: already exists; pass --overwrite" in err[0]
    assert not (tmp_path / "other.csv").exists()
    code, _ = run_score(capsys, "--classifier", world / "classifier", world / "transitions", "--out",
                        tmp_path / "other.csv", "--overwrite")
    assert code == 0


def test_scoring_to_an_existing_csv_needs_overwrite_and_keeps_the_first(world, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert run_score(capsys, "--classifier", world / "classifier", world / "pngs", "--out", out)[0] == 0
    first = out.read_text()
    code, err = run_score(capsys, "--classifier", world / "classifier", world / "pngs" / "p0.png", "--out", out)
    assert code == 2 and len(err) == 1 and f"{out}: already exists; pass --overwrite" in err[0]
    assert out.read_text() == first
    code, _ = run_score(capsys, "--classifier", world / "classifier", world / "pngs" / "p0.png", "--out", out,
                        "--overwrite")
    assert code == 0 and len(read_csv(out)) == 1


def test_larger_images_are_centre_cropped(world, tmp_path, capsys):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    save_png(tmp_path / "big.png", big)
    save_png(tmp_path / "crop.png", big[8:40, 4:36])
    frames = rng.integers(0, 256, (2, 1, 40, 40, 3), dtype=np.uint8)  # transitions frames count in the note too
    write_transitions(tmp_path / "big-frames", frames, {"seeds": [0, 1], "conditions": [0.5], "guidance": 3.0,
                                                        "sampler": "ddim", "steps": 5})
    code, err = run_score(capsys, "--classifier", world / "classifier", tmp_path / "big.png", tmp_path / "crop.png",
                          tmp_path / "big-frames", "--out", tmp_path / "s.csv")
    assert code == 0 and "3 larger images centre-cropped to 32x32" in err[-1]
    rows = read_csv(tmp_path / "s.csv")
    assert rows[0]["mean"] == rows[1]["mean"]


def bad(capsys, world, tmp_path, *inputs, classifier=None):
    out = tmp_path / "bad.csv"
    code, err = run_score(capsys, "--classifier", classifier or world / "classifier", *inputs, "--out", out)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists()
    return err[0]


def test_bad_unreadable_image(world, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    line = bad(capsys, world, tmp_path, world / "pngs", tmp_path / "broken.png")
    assert "broken.png: cannot read image" in line


def test_bad_wrong_size_image(world, tmp_path, capsys):
    save_png(tmp_path / "small.png", np.zeros((20, 32, 3), np.uint8))
    line = bad(capsys, world, tmp_path, world / "pngs", tmp_path / "small.png")
    assert "small.png: image is 20x32 pixels, smaller than the classifier's input 32x32" in line


def test_bad_empty_folder(world, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "empty: folder holds no images" in bad(capsys, world, tmp_path, tmp_path / "empty")


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_bad_limit(world, tmp_path, capsys, limit):
    # a limit of -1 once sliced the dataset to all patches but its last, silently
    assert f"--limit: must be >= 1, got {limit}" in bad(capsys, world, tmp_path, world / "toy", "--limit", limit)


@pytest.mark.parametrize("flag", ["--bins", "--batch-size"])
def test_evaluate_bad_counts(world, tmp_path, capsys, flag):
    out = tmp_path / "ev"
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--classifier", str(world / "classifier"), "--dataset", str(world / "toy"), "--out", str(out),
                       flag, "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [f"error: {flag}: must be >= 1, got 0"]
    assert not out.exists()


def test_bad_autoencoder_folder_as_classifier(world, tmp_path, capsys):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    line = bad(capsys, world, tmp_path, world / "pngs", classifier=vae)
    assert "is an autoencoder folder, but --classifier expects a classifier folder" in line
    # the evaluate command says the same
    with pytest.raises(SystemExit):
        evaluate.main(["--classifier", str(vae), "--dataset", str(world / "toy"), "--out", str(tmp_path / "ev")])
    assert "is an autoencoder folder" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_evaluate_writes_metrics_and_reliability_diagram(world, tmp_path, capsys):
    out = tmp_path / "eval"
    evaluate.main(["--classifier", str(world / "classifier"), "--dataset", str(world / "toy"), "--split", "all",
                   "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["patches"] == 60 and metrics["members"] == 2 and len(metrics["member"]) == 2
    for block in ("ensemble", "mean_member"):
        for kind in ("hard", "soft"):
            assert set(metrics[block][kind]) == {"auroc", "average_precision", "balanced_accuracy", "brier", "ece"}
        assert -1 <= metrics[block]["spearman_true_degree"] <= 1
    assert metrics["ensemble_std"]["mean"] > 0
    # the ensemble block scores the member mean, and member k's block member k's column
    ds = PatchDataset(world / "toy", labelled_only=True)
    probs = ClassifierEnsemble.from_pretrained(world / "classifier").predict(ds.uint8())
    labels = (ds.soft_labels, ds.hard_labels, ds.true_degree, 10)
    for got, prob in [(metrics["ensemble"], probs.mean(1))] + [(metrics["member"][k], probs[:, k]) for k in (0, 1)]:
        expected = evaluate.all_metrics(prob, *labels)
        for kind in ("hard", "soft"):
            assert got[kind] == pytest.approx(expected[kind], rel=1e-4, abs=1e-6)
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["auroc_hard"] == pytest.approx(metrics["ensemble"]["hard"]["auroc"], abs=1e-4)
    with pytest.raises(SystemExit):
        evaluate.main(["--classifier", str(world / "classifier"), "--dataset", str(world / "toy"),
                       "--out", str(out)])
    assert "already exists" in capsys.readouterr().err


def test_two_processes_score_exactly_like_one(world, tmp_path):
    # batches smaller than each share of 32 (and aligned with it, so that both runs batch the same rows)
    args = ["--classifier", world / "classifier", world / "toy", world / "pngs", "--quiet", "--batch-size", "8"]
    one = subprocess.run(accelerate_cmd("classifier.score", *args, "--out", tmp_path / "one.csv"), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    two = subprocess.run(accelerate_cmd("classifier.score", *args, "--out", tmp_path / "two.csv", processes=2),
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, launch_output(two.stderr)
    # the two processes split the images and one writes: without GPUs they once each scored all and both wrote
    assert two.stderr.count("scored 64 images") == 1, two.stderr[-2000:]
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
    assert len(read_csv(tmp_path / "two.csv")) == 64
