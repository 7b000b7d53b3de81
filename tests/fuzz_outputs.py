"""Fuzz targets for what the tool writes and reads back: a CAS result, a posterior folder and a study's analysis
(`report --cas/--posterior/--study`), a latents file (`vae decode`), and `mitosis-ldm check` on any artifact.

Their valid inputs are made by the tool's own commands on the tiny shared artifacts (`build_outputs`);
tests/fuzz_targets.py holds the harness and the input readers' targets.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from pathlib import Path
from unittest import mock

import tiny_artifacts
from fuzz_mutations import mutate_bytes, mutate_csv, mutate_folder, mutate_json_file


def study_main(*argv):
    from study.cli import main

    main([str(a) for a in argv])


def build_study(root: Path) -> Path:
    """A blinded study of the tiny transitions and held-out patches, answered by two simulated readers."""
    data = tiny_artifacts.dataset(root / "dataset", n=24)
    frames = tiny_artifacts.transitions(root / "transitions", seeds=4)
    with contextlib.redirect_stdout(io.StringIO()):
        study_main("make", "--transitions", frames, "--dataset", data, "--n-real", 4, "--n-generated", 4,
                   "--out", root / "study")
        for reader, strategy in (("ann", "noisy"), ("bo", "random")):
            study_main("simulate", "--study", root / "study", "--reader", reader, "--strategy", strategy,
                       "--out", root / f"answers-{reader}.csv")
    shutil.rmtree(root / "dataset")
    shutil.rmtree(root / "transitions")
    return root


def build_cas(root: Path) -> Path:
    """A `bench/cas.py` result as its own writer makes it: the CAS pair and one few-label pair over two seeds."""
    import importlib.util

    import patches

    spec = importlib.util.spec_from_file_location(
        "bench_cas", Path(patches.__file__).resolve().parents[1] / "bench" / "cas.py")
    cas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cas)
    runs = {name: [{"auroc": 0.8 + 0.01 * k + 0.002 * seed, "spearman_true_degree": 0.6 + 0.01 * k,
                    "balanced_accuracy": 0.7 + 0.01 * seed, "train_patches": 200} for seed in (0, 1)]
            for k, name in enumerate(["real", "generated", "real@0.05", "real+generated@0.05", "real+generated"])}
    result = {"bench": "cas", "quick": True, "complete": True, "labels": "match", "guidance": None, "seeds": [0, 1],
              "fractions": [0.05], "real_train": 200, "members": 1, "test_patches": 60,
              "generation_patches_per_s": 30.5, "transition_frames_per_s": 16.2,
              "label_noise_ceiling": {"bayes_auroc": 0.93, "true_degree_auroc": 0.91, "draws": 2000}}
    # the writer records the machine's load average: fixed here, so that a case replayed by hypothesis mutates the
    # same bytes (a file one byte longer on the replay is "inconsistent data generation")
    with mock.patch.object(cas.os, "getloadavg", return_value=(1.0, 1.0, 1.0)):
        cas.write_result(root / "cas.json", result, runs, [0.05])
    return root / "cas.json"


def report_cas(path: Path, out: Path) -> None:
    """`report --cas`: the file is read and checked with the arguments, its section written into the report."""
    from mitosis_ldm.errors import user_errors
    from mitosis_ldm.io import atomic_dir
    from report.cas_section import extra

    @user_errors
    def main():
        make = extra(path)
        with atomic_dir(out) as tmp:
            (tmp / "section.html").write_text(make(None).write(tmp))

    main()


def _held_out(shared: Path):
    """The report's held-out patches: the shared dataset, scored by the shared classifier ensemble."""
    from classifier.model import ClassifierEnsemble
    from patches.dataset import PatchDataset
    from report.build import ReportConfig, ensemble_scores
    from report.extras import HeldOut

    ds, ensemble = PatchDataset(shared / "dataset"), ClassifierEnsemble.from_pretrained(shared / "classifier")
    images = ds.uint8()
    scores, stds = ensemble_scores(ensemble, images, 16)
    return HeldOut(ensemble, shared / "dataset", "all", ds.ids(), images, ds.soft_labels, ds.hard_labels,
                   ds.true_degree, scores, stds, ReportConfig(noise_top=4), lambda *_: None)


def report_extra(module: str, path: Path, shared: Path, out: Path) -> None:
    """`report --posterior/--study`: the folder is read and checked with the arguments, then its section is made
    on the report's held-out patches and written into the report."""
    import importlib

    from mitosis_ldm.errors import user_errors
    from mitosis_ldm.io import atomic_dir

    @user_errors
    def main():
        make = importlib.import_module(module).extra(path)
        section = make(_held_out(shared))
        with atomic_dir(out) as tmp:
            (tmp / "section.html").write_text(section.write(tmp))
            (tmp / "metrics.json").write_text(json.dumps(section.metrics, default=float))

    main()


def mutate_study_results(root: Path, rng: random.Random) -> None:
    if rng.random() < 0.9:
        mutate_json_file(root / "results.json", rng)
    else:
        (root / "rating_vs_label.png").unlink()


def mutate_posterior(root: Path, rng: random.Random) -> None:
    if rng.random() < 0.7:
        mutate_csv(root / "posterior.csv", rng)
    else:
        mutate_json_file(root / "posterior.json", rng)


def vae_encode(model: Path, dataset: Path, out: Path, limit: int = 2) -> None:
    from autoencoder.cli import main

    main(["encode", str(dataset), "--model", str(model), "--out", str(out), "--limit", str(limit)])


def mutate_latents(folder: Path, rng: random.Random) -> None:
    """The sidecar's JSON, the file's bytes, or its tensors: another dtype, shape, key or value."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "latents.safetensors"
    op = rng.random()
    if op < 0.35:
        return mutate_json_file(folder / "latents.json", rng)
    if op < 0.5:
        return mutate_bytes(path, rng)
    tensors = load_file(str(path))
    z = tensors.pop("latents")
    kind = rng.randrange(6)
    if kind == 0:
        z = z.to(rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]))
    elif kind == 1:
        z = z.reshape(rng.choice([(-1,), (1, -1), (z.shape[0], z.shape[1], -1), (*z.shape, 1)]))
    elif kind == 2:
        z = z[:, :, : rng.choice([0, 1, 3]), : rng.choice([0, 1, 5])].contiguous()
    elif kind == 3:
        z = z.clone()
        z.view(-1)[rng.randrange(z.numel())] = rng.choice([float("nan"), float("inf"), 1e30, -1e30])
    elif kind == 4:
        tensors.update({f"latents.{k}": z[i: i + 1].contiguous() for i, k in enumerate(
            rng.choice([["0", "1", "x"], ["0", "-1"], ["1", "2"], ["00", "0"]])[: len(z)])})
        z = None
    else:
        tensors[rng.choice(["latent", "latents.0", "other"])] = z
        z = None
    if z is not None:
        tensors["latents"] = z
    save_file(tensors, str(path))


def vae_decode(folder: Path, shared: Path, out: Path) -> None:
    from autoencoder.cli import main

    main(["decode", str(folder / "latents.safetensors"), "--model", str(shared / "autoencoder"), "--out", str(out)])


CHECKED = ["dataset", "autoencoder", "classifier", "pipeline", "transitions", "posterior"]


def build_check(root: Path, shared: Path) -> Path:
    for kind in CHECKED:
        shutil.copytree(shared / kind, root / kind)
    return root


def mutate_check(root: Path, rng: random.Random) -> None:
    kind = rng.choice(CHECKED)
    (root / "which").write_text(kind)
    mutate_folder(root / kind, rng)


def run_check(root: Path, out: Path) -> None:
    """`mitosis-ldm check` on the mutated folder (every folder when none was mutated)."""
    from mitosis_ldm.check import main
    from mitosis_ldm.errors import user_errors

    from mitosis_ldm.check import check_folder

    kinds = [(root / "which").read_text()] if (root / "which").exists() else CHECKED
    for kind in kinds:  # a finding from check's catch-all is an exception no reader turned into words: a bug
        crashed = [f for f in check_folder(root / kind)[1] if " does not load (" in f]
        if crashed:
            raise RuntimeError(crashed[0])
    user_errors(main)([str(root / kind) for kind in kinds])


def build_outputs(root: Path) -> None:
    """Beside the shared artifacts in `root`: what the tool's commands write from them, for the targets here."""
    if not (root / "latents").exists():  # four patches of the dataset, as `vae encode` writes them
        (root / "latents").mkdir()
        with contextlib.redirect_stdout(io.StringIO()):
            vae_encode(root / "autoencoder", root / "dataset", root / "latents" / "latents.safetensors", limit=4)
    if not (root / "study-results").exists():  # a study of two simulated readers, as `study analyse` writes it
        (root / "study-work").mkdir()
        study = build_study(root / "study-work")
        with contextlib.redirect_stdout(io.StringIO()):
            study_main("analyse", "--study", study / "study", "--answers", study / "answers-ann.csv",
                       study / "answers-bo.csv", "--out", root / "study-results")
        shutil.rmtree(root / "study-work")
    if not (root / "posterior").exists():  # the generative posterior of every shared patch, as the command writes it
        from diffusion.posterior import main as posterior

        with contextlib.redirect_stderr(io.StringIO()):
            posterior(["--pipeline", str(root / "pipeline"), str(root / "dataset"), "--grid", "0:1:3", "--draws", "2",
                       "--temperature", "0.05", "--out", str(root / "posterior"), "--quiet"])
