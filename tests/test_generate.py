"""`mitosis-ldm generate`: a generated patch dataset, its resume after SIGKILL, 2 processes, and bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, accelerate_cmd, launch_output, load_bench
from test_diffusion import make_dataset, make_vae, tiny_train_args


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A labelled and an unlabelled dataset and a pipeline trained for 2 steps (its samples need only exist)."""
    root = tmp_path_factory.mktemp("generate")
    labelled = make_dataset(root / "labelled", n=32, seed=0)
    unlabelled = make_dataset(root / "unlabelled", n=16, seed=1, labelled=False)
    vae = make_vae(root / "vae")
    from diffusion.cache import main as cache_main
    from diffusion.train import main as train_main

    cache_main(["--vae", str(vae), "--dataset", str(labelled), "--out", str(root / "latents")])
    train_main(tiny_train_args(root / "run", root / "latents", steps=2))
    return {"root": root, "labelled": labelled, "unlabelled": unlabelled, "pipeline": root / "run" / "model"}


def gen_args(world, out, *extra, n=12):
    return ["--pipeline", str(world["pipeline"]), "--n", str(n), "--steps", "2", "--shard-size", "4",
            "--batch-size", "4", "--seed", "3", "--out", str(out), *map(str, extra)]


def read_rows(folder):
    with open(folder / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_generated_dataset_passes_the_dataset_checks(world, tmp_path):
    from diffusion.generate import main as gen_main
    from patches.dataset import PatchDataset
    from patches.inspect import summarise
    from patches.splits import validate_rows

    out = tmp_path / "gen"
    gen_main(gen_args(world, out, "--labels", f"match:{world['labelled']}"))
    ds = PatchDataset(out)  # reads dataset.json, patches.npy and labels.csv, checking they agree
    meta = ds.meta
    assert meta["format"] == "mitosis-ldm/patches" and meta["source"] == "generated" and meta["generated"] is True
    assert meta["count"] == 12 and meta["patch_size"] == 64 and len(meta["pipeline_hash"]) == 64
    assert meta["generation"]["labels"] == f"match:{world['labelled']}" and meta["generation"]["steps"] == 2
    assert len(meta["content_hash"]) == 64 and (meta["split"]["val"], meta["split"]["test"]) == (0.1, 0.1)  # defaults
    images = np.load(out / "patches.npy")
    assert images.shape == (12, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 0
    rows = read_rows(out)
    validate_rows(rows, where=str(out))
    from diffusion.generate import patch_seed

    # three shards of 4: row i is patch i, named by i, with patch i's seed
    assert [r["id"] for r in rows] == [f"gen-{i:07d}" for i in range(12)]
    assert [int(r["seed"]) for r in rows] == [patch_seed(3, i) for i in range(12)]
    assert {"seed", "guidance", "condition"} <= set(rows[0])
    real = {round(v, 4) for v in PatchDataset(world["labelled"], split="train").soft_labels.tolist()}
    for row in rows:
        assert row["source"] == "generated" and row["votes"] == ""
        assert float(row["label"]) == float(row["condition"]) and round(float(row["label"]), 4) in real
        assert int(row["hard_label"]) == int(float(row["condition"]) >= 0.5)
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    assert summarise(out)["labelled"] == 12
    # the seed column is the transition seed: `transitions` renders the same nucleus at the same condition
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    again = pipe.transitions(seeds=[int(rows[5]["seed"])], conditions=[float(rows[5]["condition"])], steps=2)
    assert np.abs(again[0, 0].astype(int) - images[5]).max() <= 2
    # and the classifier, the independent judge, still refuses it unless told
    from classifier.train import ClassifierConfig, DataConfig, load_training_data
    from mitosis_ldm.errors import UserError

    with pytest.raises(UserError, match="generated"):
        load_training_data(ClassifierConfig(data=DataConfig(dataset=str(out))))


def test_labels_values_cycle_and_uniform_is_seeded(world, tmp_path):
    from diffusion.generate import draw_conditions, parse_labels, patch_seed

    assert draw_conditions("values", [0.0, 0.5, 1.0], 0, 7) == [0, 0.5, 1, 0, 0.5, 1, 0]
    # a value listed twice is a weight, as under match: (docs/generate.md), not a typo to drop
    assert parse_labels("0,0,1") == ("values", [0.0, 0.0, 1.0])
    assert draw_conditions("values", [0.0, 0.0, 1.0], 0, 6) == [0, 0, 1, 0, 0, 1]
    a, b = draw_conditions("uniform", None, 1, 50), draw_conditions("uniform", None, 1, 80)
    assert a == b[:50] and 0 <= min(b) and max(b) <= 1 and len(set(b)) == 80  # not a coarse grid
    assert draw_conditions("uniform", None, 2, 50) != a
    train = [float(r["label"]) for r in read_rows(world["labelled"]) if r["split"] == "train"]
    assert parse_labels(f"match:{world['labelled']}") == ("match", sorted(round(v, 6) for v in train))  # train only
    assert [patch_seed(4, i) for i in range(3)] != [patch_seed(5, i) for i in range(3)]


def test_match_labels_draw_every_soft_label_at_its_share():
    from diffusion.generate import draw_conditions

    values = [0.0, 0.0, 1 / 3, 2 / 3, 1.0]  # a train split's sorted soft labels: label 0 twice as common
    draws = draw_conditions("match", values, 0, 5000)
    shares = [draws.count(v) / 5000 for v in (0.0, 1 / 3, 2 / 3, 1.0)]
    assert shares == pytest.approx([0.4, 0.2, 0.2, 0.2], abs=0.025)  # binomial sd at most 0.007
    assert draws == draw_conditions("match", values, 0, 5000) != draw_conditions("match", values, 1, 5000)


def test_mixed_labels_share_one_unet_batch_per_step(world):
    """`uniform` labels are all distinct: they must still go through the UNet together, not one at a time."""
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    calls = []
    original = pipe.unet.forward
    pipe.unet.forward = lambda sample, *a, **kw: calls.append(len(sample)) or original(sample, *a, **kw)
    images = pipe.samples([3, 4, 3, 5], [0.2, 0.9, 0.2, 0.55], guidance=2.0, steps=2, sampler="ddim", batch_size=8)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert len(calls) == 2 and calls[0] == 4 + 3  # one call per step: 4 conditional rows, 3 distinct null rows
    assert np.abs(images[0].astype(int) - images[2]).max() <= 2  # the same (seed, label) pair: the same patch
    pipe.unet.forward = original
    alone = pipe.transitions(seeds=[4], conditions=[0.9], guidance=2.0, steps=2, sampler="ddim")
    assert np.abs(alone[0, 0].astype(int) - images[1]).max() <= 2  # patch i is its seed's transition frame
    assert not np.array_equal(images[1], images[3])


def test_schedule_flags_are_used_and_recorded(world, tmp_path):
    """`generate` takes the guidance schedule of `transitions`: the patches are the transition frames rendered
    with the same flags, and dataset.json records every value used (flags and the pipeline's defaults)."""
    from diffusion.generate import main as gen_main
    from diffusion.pipeline import MitosisPipeline

    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    gen_main(gen_args(world, tmp_path / "plain", "--labels", "0.2,0.8", "--guidance", "2", n=4))
    gen_main(gen_args(world, tmp_path / "null", "--labels", "0.2,0.8", "--guidance", "2", "--null-guidance", "1.5",
                      "--guidance-interval", "0.2,1", "--guidance-rescale", "0.5", "--null-guidance-middle", "0.3",
                      "--null-guidance-middle-below", "0.6", n=4))
    plain, null = (np.load(tmp_path / name / "patches.npy") for name in ("plain", "null"))
    assert np.abs(plain.astype(int) - null).max() > 10  # the term changes what is rendered
    settings = json.loads((tmp_path / "null" / "dataset.json").read_text())["generation"]
    assert settings["null_guidance"] == 1.5 and settings["guidance_interval"] == [0.2, 1.0]
    assert settings["guidance_rescale"] == 0.5 and settings["guide"] == pipe.default_guide
    assert settings["null_guidance_middle"] == 0.3 and settings["null_guidance_middle_below"] == 0.6
    defaults = json.loads((tmp_path / "plain" / "dataset.json").read_text())["generation"]
    assert defaults["null_guidance"] == pipe.default_null_guidance
    assert defaults["null_guidance_middle"] == pipe.default_null_guidance_middle
    assert defaults["null_guidance_middle_below"] == pipe.default_null_guidance_middle_below
    assert defaults["guidance_interval"] == list(pipe.default_guidance_interval)
    rows = read_rows(tmp_path / "null")
    frame = pipe.transitions(seeds=[int(rows[1]["seed"])], conditions=[0.8], guidance=2.0, steps=2,
                             guidance_interval=(0.2, 1.0), guidance_rescale=0.5, null_guidance=1.5,
                             null_guidance_middle=0.3, null_guidance_middle_below=0.6)
    assert np.abs(frame[0, 0].astype(int) - null[1]).max() <= 2


def test_rows_hold_the_conditions_guidance_and_settings_asked_for(world, tmp_path):
    """Labels cycle across shards, 0.5 is a hard positive; patches, splits and dataset.json follow the flags."""
    from diffusion.generate import main as gen_main, patch_seed
    from diffusion.pipeline import MitosisPipeline

    out = tmp_path / "gen"
    gen_main(gen_args(world, out, "--labels", "0,0.5,1", "--guidance", "2", "--sampler", "ddim", "--val", "0",
                      "--test", "0.5", n=8))
    rows = read_rows(out)
    assert [float(r["condition"]) for r in rows] == [[0, 0.5, 1][i % 3] for i in range(8)]  # shards of 4
    assert [int(r["hard_label"]) for r in rows] == [[0, 1, 1][i % 3] for i in range(8)]  # condition >= 0.5
    assert {float(r["guidance"]) for r in rows} == {2.0}
    assert {r["split"] for r in rows} == {"train", "test"}  # --val 0: no val row
    pipe = MitosisPipeline.from_pretrained(world["pipeline"])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["pipeline_hash"] == pipe.model_hash
    used = meta["generation"]
    assert [used[k] for k in "n seed sampler guidance shard_size batch_size".split()] == [8, 3, "ddim", 2, 4, 4]
    again = pipe.samples([patch_seed(3, i) for i in range(8)], [float(r["condition"]) for r in rows], guidance=2.0,
                         steps=2, sampler="ddim", batch_size=4)
    assert np.abs(again.astype(int) - np.load(out / "patches.npy")).max() <= 2


def test_resume_after_the_pipeline_changed_renders_every_shard_again(world, tmp_path, monkeypatch, capsys):
    """Shards kept by a stopped run are reused by --resume only while the pipeline folder is unchanged."""
    from diffusion import generate

    pipeline = shutil.copytree(world["pipeline"], tmp_path / "pipe")
    args = [*gen_args(world, tmp_path / "gen", "--labels", "0.2,0.8", n=4), "--pipeline", str(pipeline)]

    def stopped(*_, **__):
        raise RuntimeError("stopped before the dataset was written")

    monkeypatch.setattr(generate, "build_dataset", stopped)
    for extra in ([], ["--resume"]):
        with pytest.raises(RuntimeError, match="stopped"):
            generate.main(args + extra)
    assert "resuming: 4 of 4 patches already rendered" in capsys.readouterr().out
    monkeypatch.undo()
    (pipeline / "notes.txt").write_text("retrained in place")  # another folder hash: another model
    generate.main(args + ["--resume"])
    assert "resuming: 0 of 4 patches already rendered" in capsys.readouterr().out
    assert len(read_rows(tmp_path / "gen")) == 4


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(world, tmp_path):
    args = gen_args(world, tmp_path / "killed", "--labels", "0,0.5,1", n=48)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffusion.generate", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    partial = tmp_path / ".killed.partial"
    deadline = time.time() + 300
    try:
        while len(list(partial.glob("shard-*.json"))) < 2:
            assert proc.poll() is None, "generation ended before its second shard"
            assert time.time() < deadline, "no second shard within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "killed").exists()
    kept = len(list(partial.glob("shard-*.json")))
    assert 2 <= kept < 12
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming: {4 * kept} of 48 patches already rendered" in resumed.stdout
    assert not partial.exists()
    whole = subprocess.run([sys.executable, "-m", "diffusion.generate",
                            *gen_args(world, tmp_path / "whole", "--labels", "0,0.5,1", n=48)],
                           cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "killed" / "patches.npy"), np.load(tmp_path / "whole" / "patches.npy"))
    assert read_rows(tmp_path / "killed") == read_rows(tmp_path / "whole")
    a, b = (json.loads((tmp_path / name / "dataset.json").read_text()) for name in ("killed", "whole"))
    assert a["content_hash"] == b["content_hash"]


@pytest.mark.slow
def test_two_processes_equal_one_process(world, tmp_path):
    args = gen_args(world, tmp_path / "two", "--labels", "uniform", n=10)
    result = subprocess.run(accelerate_cmd("diffusion.generate", *args, processes=2), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, launch_output(result.stderr)
    assert "patches/s" in result.stdout
    from diffusion.generate import main as gen_main

    gen_main(gen_args(world, tmp_path / "one", "--labels", "uniform", n=10))
    two, one = np.load(tmp_path / "two" / "patches.npy"), np.load(tmp_path / "one" / "patches.npy")
    assert two.shape == one.shape == (10, 64, 64, 3)
    assert np.abs(two.astype(int) - one).max() <= 2  # thread counts may change the last bit
    strip = [{k: v for k, v in row.items()} for row in read_rows(tmp_path / "two")]
    assert strip == read_rows(tmp_path / "one")


def _one_line_error(capsys, call, *needles):
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("extra, needles", [
    (["--n", "0"], ["--n", "must be >= 1, got 0"]),
    (["--labels", "0,1.5"], ["--labels", "1.5", "outside [0, 1]"]),
    (["--labels", "0,abc"], ["--labels", "expected"]),
    (["--null-guidance", "-1"], ["--null-guidance", ">= 0"]),
    (["--guidance-interval", "0.8,0.2"], ["--guidance-interval", "LOW < HIGH"]),
    (["--guidance-rescale", "2"], ["--guidance-rescale", "[0, 1]"]),
    (["--null-guidance-middle", "1.2"], ["--null-guidance-middle", "[0, 1]"]),
    (["--null-guidance-middle-below", "-0.5"], ["--null-guidance-middle-below", "[0, 1]"]),
    (["--seed", "-1"], ["--seed", "must be >= 0, got -1"]),
    (["--shard-size", "0"], ["--shard-size", "must be >= 1, got 0"]),
    (["--batch-size", "0"], ["--batch-size", "must be >= 1, got 0"]),
    (["--val", "0.5", "--test", "0.5"], ["--val/--test", "sum below 1", "0.5 + 0.5"]),
    (["--val", "-0.1"], ["--val/--test", ">= 0"]),
    (["--steps", "0"], ["--steps", "must be >= 1, got 0"]),
    (["--guidance", "-1"], ["--guidance", ">= 0"]),
])
def test_bad_flags(world, tmp_path, capsys, extra, needles):
    from diffusion.generate import main as gen_main

    out = tmp_path / "bad"
    _one_line_error(capsys, lambda: gen_main([*gen_args(world, out), *extra]), *needles)
    assert not out.exists() and not (tmp_path / ".bad.partial").exists()


def test_an_existing_output_is_refused_before_anything_is_rendered(world, tmp_path, capsys):
    from diffusion.generate import main as gen_main

    out = tmp_path / "bad"
    out.write_text("kept")
    _one_line_error(capsys, lambda: gen_main(gen_args(world, out)), str(out), "--overwrite")
    assert out.read_text() == "kept" and not (tmp_path / ".bad.partial").exists()


def test_match_on_a_dataset_without_labels(world, tmp_path, capsys):
    from diffusion.generate import main as gen_main

    out = tmp_path / "bad"
    _one_line_error(capsys, lambda: gen_main(gen_args(world, out, "--labels", f"match:{world['unlabelled']}")),
                    str(world["unlabelled"]), "label", "match:")
    assert not out.exists() and not (tmp_path / ".bad.partial").exists()


def test_cas_report_section_reads_the_bench_result(tmp_path):
    from mitosis_ldm.errors import UserError
    from report.cas_section import extra

    def entry(mean, values):
        return {"auroc": {"mean": mean, "spread": max(values) - min(values), "values": values},
                "spearman_true_degree": {"mean": mean - 0.1, "spread": 0.01, "values": [mean - 0.1] * 2},
                "balanced_accuracy": {"mean": mean - 0.05, "spread": 0.02, "values": [mean - 0.06, mean - 0.04]},
                "train_patches": 100}

    table = {"real": entry(0.95, [0.94, 0.96]), "generated": entry(0.8, [0.79, 0.81]),
             "real+generated": entry(0.96, [0.95, 0.97]), "real@0.05": entry(0.85, [0.83, 0.87]),
             "real+generated@0.05": entry(0.9, [0.89, 0.91])}
    result = {"bench": "cas", "fractions": [0.05], "seeds": [0, 1], "table": table, "labels": "match",
              "targets": {"cas_ratio": {"value": 0.8 / 0.95, "target": ">= 0.9", "met": False},
                          "augmentation_gain@0.05": {"value": 0.05, "seed_spread": 0.04, "target": "> seed spread",
                                                     "met": True, "needed_mean": 0.89}},
              "label_noise_ceiling": {"bayes_auroc": 0.9871, "true_degree_auroc": 0.9848, "draws": 2000}}
    (tmp_path / "cas.json").write_text(json.dumps(result))
    section = extra(tmp_path / "cas.json")(None)
    assert section.key == "cas" and section.metrics["table"]["generated"]["auroc"]["mean"] == 0.8
    html = section.write(tmp_path)
    assert (tmp_path / "cas-auroc-vs-fraction.png").stat().st_size > 1000
    assert "real+generated@0.05" in html and "0.800 ± 0.010" in html and "<strong>missed</strong>" in html
    assert "balanced accuracy (hard label)" in html and "0.750 ± 0.010" in html
    assert "5% of the real train labels + 4x as many generated patches" in html
    assert "needs a mean above 0.8900" in html and "AUROC 0.9871" in html and "alone 0.9848" in html
    (tmp_path / "bad.json").write_text(json.dumps({"bench": "posterior"}))
    with pytest.raises(UserError, match="field 'bench'"):
        extra(tmp_path / "bad.json")
    result["table"] = {}
    (tmp_path / "cas.json").write_text(json.dumps(result))
    with pytest.raises(UserError, match="field 'table' is empty"):
        extra(tmp_path / "cas.json")


def test_cas_bench_judges_augmentation_by_auroc_and_balanced_accuracy(tmp_path):
    cas = load_bench("cas")

    def run(seed, auroc, bacc):
        return {"setting": "x", "seed": seed, "auroc": auroc, "spearman_true_degree": 0.5,
                "balanced_accuracy": bacc, "train_patches": 10}

    # AUROC gains 0.005 against a real-only seed range of 0.012; balanced accuracy gains 0.02 against 0.012
    runs = {"real": [run(0, 0.98, 0.94), run(1, 0.98, 0.94)], "generated": [run(0, 0.97, 0.93), run(1, 0.97, 0.93)],
            "real@0.05": [run(0, 0.979, 0.93), run(1, 0.967, 0.918)],
            "real+generated@0.05": [run(0, 0.978, 0.944), run(1, 0.978, 0.944)]}
    cas.write_result(tmp_path / "cas.json", {"bench": "cas"}, runs, [0.05])
    targets = json.loads((tmp_path / "cas.json").read_text())["targets"]
    assert targets["cas_ratio"]["met"] and targets["cas_ratio"]["value"] == pytest.approx(0.97 / 0.98)
    auroc, bacc = targets["augmentation_gain@0.05"], targets["augmentation_gain_bacc@0.05"]
    assert auroc["value"] == pytest.approx(0.978 - 0.973) and auroc["seed_spread"] == pytest.approx(0.012)
    assert not auroc["met"]
    assert bacc["value"] == pytest.approx(0.944 - 0.924) and bacc["seed_spread"] == pytest.approx(0.012)
    assert bacc["met"]
    assert auroc["needed_mean"] == pytest.approx(0.973 + 0.012)


def test_cas_bench_pool_holds_every_settings_generated_patches():
    """One pool serves every setting: it must hold the larger of the full-size setting and K x each few-label count,
    with room for the 10 % val split; --generated-per-real below 1 is refused before anything is generated."""
    cas = load_bench("cas")
    assert cas.pool_size(844, [211, 212], 4) == int(np.ceil(848 / 0.9 * 1.05)) + 16
    assert cas.pool_size(None, [211, 212], 8) == int(np.ceil(1696 / 0.9 * 1.05)) + 16
    assert cas.pool_size(5000, [211], 8) == int(np.ceil(5000 / 0.9 * 1.05)) + 16
    with pytest.raises(SystemExit, match="--generated-per-real: 0, must be at least 1"):
        cas.main(["--generated-per-real", "0", "--real", str(REPO / "tests/does-not-exist")])


def test_cas_bench_reports_the_label_noise_ceiling_of_the_synthetic_benchmark(tmp_path):
    """On the synthetic benchmark the bench reports the best AUROC any classifier can expect against the test
    split's hard labels (the expert panel's own majority probability) and the true degree's; elsewhere None."""
    from patches.cli import main as patches_main
    from patches.dataset import PatchDataset

    cas = load_bench("cas")
    root = tmp_path / "synth"
    patches_main(["synth", "--out", str(root), "--n", "400", "--size", "32", "--experts", "3", "--seed", "5"])
    test = PatchDataset(root, split="test", labelled_only=True)
    ceiling = cas.label_noise_ceiling(test, draws=300)
    assert 0.8 < ceiling["true_degree_auroc"] < 1 and 0.8 < ceiling["bayes_auroc"] <= 1
    # what a classifier that knew each patch's majority probability would score: above the degree alone,
    # since the imposters fool the experts (up to the Monte Carlo and sample noise of 40 patches)
    assert ceiling["bayes_auroc"] >= ceiling["true_degree_auroc"] - 0.01
    # the same patches without the panel in dataset.json (any other source): no ceiling
    meta = json.loads((root / "dataset.json").read_text())
    meta.pop("experts")
    (root / "dataset.json").write_text(json.dumps(meta))
    assert cas.label_noise_ceiling(PatchDataset(root, split="test", labelled_only=True)) is None
