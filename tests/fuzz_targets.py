"""Fuzz targets: one valid input per reader and folder loader, random mutations of it, and the outcome.

Each target builds a tiny valid input, mutates a copy with a `random.Random`
(hypothesis draws it in tests/test_fuzz.py; bench/fuzz_outcomes.py seeds it)
and runs the real entry point on it. `run_case` classifies what happened:

- accepted: the command finished;
- clean: exit 2 with exactly one `error:` line and no traceback;
- noisy: the same, but other lines came before it on stderr (a warning, a retry message);
- network: a host name was looked up (every lookup fails here; the tool never needs the network);
- traceback: anything else (another exception, another exit code);
- leftover: the case's output exists after a failure, or a hidden temporary
  (`.NAME.tmp-*`, `.NAME.partial`, `.NAME.old-*`) is left anywhere.

Only APIs that predate the hardening are used, so the same harness measures
the code before and after it (`PYTHONPATH=/tmp/before`).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sqlite3
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from PIL import Image

import tiny_artifacts
from fuzz_mutations import mutate_bytes, mutate_csv, mutate_folder, mutate_json_file, mutate_sqlite, mutate_tree
from fuzz_outputs import (build_cas, build_check, build_outputs, build_study, mutate_check, mutate_latents,
                          mutate_posterior, mutate_study_results, report_cas, report_extra, run_check, study_main,
                          vae_decode, vae_encode)

# -- valid inputs -----------------------------------------------------------------------------------------


def _image(path: Path, h: int = 100, w: int = 120) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def sliderunner_db(path: Path) -> None:
    """The CCMCT SlideRunner schema (all columns of the real tables), three spot annotations."""
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE Slides (uid INTEGER PRIMARY KEY, filename TEXT, width INTEGER, height INTEGER, directory TEXT);
        CREATE TABLE Annotations (uid INTEGER PRIMARY KEY, guid TEXT, deleted INTEGER DEFAULT 0, slide INTEGER,
                                  type INTEGER, agreedClass INTEGER);
        CREATE TABLE Annotations_coordinates (uid INTEGER PRIMARY KEY, coordinateX INTEGER, coordinateY INTEGER,
                                              coordinateZ INTEGER DEFAULT 0, slide INTEGER, annoId INTEGER,
                                              orderIdx INTEGER);
        CREATE TABLE Annotations_label (uid INTEGER PRIMARY KEY, person INTEGER, class INTEGER, annoId INTEGER);
        CREATE TABLE Classes (uid INTEGER PRIMARY KEY, name TEXT);
        CREATE TABLE Persons (uid INTEGER PRIMARY KEY, name TEXT);
        INSERT INTO Classes VALUES (1, 'Granulocyte'), (2, 'Mitotic figure'), (3, 'Tumor cell'),
                                   (7, 'Mitotic figure lookalike');
        INSERT INTO Persons VALUES (1, 'A'), (2, 'B');
        INSERT INTO Slides VALUES (1, 'ok.png', 120, 100, '');
        INSERT INTO Annotations (uid, slide, type, agreedClass) VALUES (1, 1, 1, 2), (2, 1, 1, 7), (3, 1, 1, 3);
        INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx)
            VALUES (30, 30, 1, 1, 1), (60, 50, 1, 2, 1), (90, 70, 1, 3, 1);
        INSERT INTO Annotations_label (person, class, annoId) VALUES (1, 2, 1), (2, 7, 1), (1, 7, 2), (2, 7, 2),
                                                                    (1, 3, 3);
    """)
    con.commit()
    con.close()


DATA_FLAGS = ["--size", "16", "--margin", "0", "--workers", "1"]


@dataclass
class Target:
    name: str
    build: Callable[[Path], Path]          # write the valid input under a folder, return what is mutated
    mutate: Callable[[Path, random.Random], None]
    run: Callable[[Path, Path, Path], None]  # (mutated input, shared valid artifacts, output path)


def _data_main(*argv):
    from patches.cli import main

    main([str(a) for a in argv])


def _build_midog(root: Path) -> Path:
    _image(root / "ok.png")
    annotations = [{"id": i, "image_id": 1, "bbox": [10 + 20 * i, 10, 60 + 20 * i, 60], "category_id": 1 + i % 2,
                    "labels": [1, 1 + i % 2, 1]} for i in range(3)]
    images = [{"id": 1, "file_name": "ok.png", "width": 120, "height": 100, "tumor_type": "t"}]
    (root / "midog.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return root / "midog.json"


def _build_sliderunner(root: Path) -> Path:
    _image(root / "ok.png")
    sliderunner_db(root / "ccmct.sqlite")
    return root / "ccmct.sqlite"


def _build_points(root: Path) -> Path:
    _image(root / "ok.png")
    (root / "cells.csv").write_text("slide,x,y,votes\nok.png,20,20,1;1;0\nok.png,60,50,0;0\nok.png,90,70,1\n")
    return root / "cells.csv"


def _geojson(marks: list[tuple]) -> dict:
    """A QuPath export: a Point, a MultiPoint (the points tool) and a Polygon outline, with and without a class."""
    features = []
    for kind, coordinates, name in marks:
        properties = {"objectType": "annotation"}
        if name:
            properties["classification"] = {"name": name, "color": [255, 0, 0]}
        features.append({"type": "Feature", "geometry": {"type": kind, "coordinates": coordinates},
                         "properties": properties})
    return {"type": "FeatureCollection", "features": features}


GEOJSON_MARKS = [("Point", [20, 20], "Mitosis"), ("MultiPoint", [[60, 50], [90, 70]], "Imposter"),
                 ("Polygon", [[[30, 60], [40, 60], [40, 70], [30, 70], [30, 60]]], None)]


def _build_geojson(root: Path) -> Path:
    _image(root / "ok.png")
    (root / "ok.geojson").write_text(json.dumps(_geojson(GEOJSON_MARKS)))
    return root / "ok.geojson"


def _build_annotators(root: Path) -> Path:
    (root / "slides").mkdir()
    _image(root / "slides" / "ok.png")
    (root / "alice.geojson").write_text(json.dumps(_geojson(GEOJSON_MARKS)))
    (root / "bob.csv").write_text("x,y,class\n21,19,Mitosis\n61,52,Mitosis\n50,30,Imposter\n")
    return root


def _mutate_annotators(root: Path, rng: random.Random) -> None:
    if rng.random() < 0.5:
        mutate_json_file(root / "alice.geojson", rng)
    else:
        mutate_csv(root / "bob.csv", rng)


def _mutate_study(root: Path, rng: random.Random) -> None:
    if rng.random() < 0.8:
        mutate_csv(root / f"answers-{rng.choice(['ann', 'bo'])}.csv", rng)
    else:
        mutate_json_file(root / "study" / rng.choice(["study.json", "key.json"]), rng)


def _build_folder(root: Path) -> Path:
    (root / "images").mkdir()
    for i in range(4):
        _image(root / "images" / f"p{i}.png", 16, 16)
    (root / "labels.csv").write_text("file,label\np0.png,0\np1.png,0.5\np2.png,1\np3.png,0.25\n")
    return root


def _mutate_folder_source(root: Path, rng: random.Random) -> None:
    if rng.random() < 0.7:
        mutate_csv(root / "labels.csv", rng)
    else:
        mutate_bytes(root / "images" / f"p{rng.randrange(4)}.png", rng)


CONFIGS = {"data": ("patches.extract", "ExtractConfig"), "autoencoder": ("autoencoder.train", "AutoencoderConfig"),
           "classifier": ("classifier.train", "ClassifierConfig"),
           "diffusion": ("diffusion.train", "DiffusionTrainConfig"), "report": ("report.build", "ReportConfig")}


def _build_configs(root: Path) -> Path:
    import patches

    demo = Path(patches.__file__).resolve().parents[1] / "configs" / "demo"
    for name in CONFIGS:
        shutil.copy(demo / f"{name}.yaml", root / f"{name}.yaml")
    return root


def _mutate_config(root: Path, rng: random.Random) -> None:
    path = root / f"{rng.choice(sorted(CONFIGS))}.yaml"
    (root / "which").write_text(path.stem)
    if rng.random() < 0.15:
        return mutate_bytes(path, rng)
    try:
        data = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError):
        return mutate_bytes(path, rng)
    for _ in range(rng.randint(1, 2)):
        data = mutate_tree(data, rng)
    path.write_text(yaml.safe_dump(data))


def _run_config(root: Path, shared: Path, out: Path) -> None:
    import importlib

    from mitosis_ldm.config import load_config
    from mitosis_ldm.errors import user_errors

    chosen = [(root / "which").read_text()] if (root / "which").exists() else sorted(CONFIGS)  # unmutated: all
    for which in chosen:
        module, cls = CONFIGS[which]
        user_errors(load_config)(getattr(importlib.import_module(module), cls), root / f"{which}.yaml")


def _score(classifier: Path, inputs: Path, out: Path) -> None:
    from classifier.score import main

    main(["--classifier", str(classifier), str(inputs), "--out", str(out), "--quiet"])


TARGETS = {
    "midog": Target("midog", _build_midog, mutate_json_file,
                    lambda p, s, out: _data_main("midog", "--json", p, "--images", p.parent, "--out", out,
                                                 *DATA_FLAGS)),
    "sliderunner": Target("sliderunner", _build_sliderunner, mutate_sqlite,
                          lambda p, s, out: _data_main("sliderunner", "--db", p, "--slides", p.parent, "--out", out,
                                                       "--include-class", "3", *DATA_FLAGS)),
    "points": Target("points", _build_points, mutate_csv,
                     lambda p, s, out: _data_main("points", "--csv", p, "--slides", p.parent, "--out", out,
                                                  *DATA_FLAGS)),
    "folder": Target("folder", _build_folder, _mutate_folder_source,
                     lambda p, s, out: _data_main("folder", "--images", p / "images", "--labels", p / "labels.csv",
                                                  "--out", out)),
    "geojson": Target("geojson", _build_geojson, mutate_json_file,
                      lambda p, s, out: _data_main("points", "--geojson", p, "--slide", "ok.png", "--slides",
                                                   p.parent, "--out", out, "--label-map", "Mitosis=1,Imposter=0",
                                                   *DATA_FLAGS)),
    "annotators": Target("annotators", _build_annotators, _mutate_annotators,
                         lambda p, s, out: _data_main("annotators", "--slides", p / "slides", "--annotator",
                                                      f"alice={p / 'alice.geojson'}", "--annotator",
                                                      f"bob={p / 'bob.csv'}", "--radius-px", "8", "--label-map",
                                                      "Mitosis=1,Imposter=0", "--out", out, *DATA_FLAGS)),
    "study": Target("study", build_study, _mutate_study,
                    lambda p, s, out: study_main("analyse", "--study", p / "study", "--answers", p / "answers-ann.csv",
                                                 p / "answers-bo.csv", "--bootstrap", 100, "--out", out)),
    "configs": Target("configs", _build_configs, _mutate_config, _run_config),
    "cas": Target("cas", build_cas, mutate_json_file, lambda p, s, out: report_cas(p, out)),
    "study-results": Target("study-results", None, mutate_study_results,
                            lambda p, s, out: report_extra("report.study_section", p, s, out)),
    "posterior": Target("posterior", None, mutate_posterior,
                        lambda p, s, out: report_extra("report.posterior_section", p, s, out)),
    "vae": Target("vae", None, mutate_folder,
                  lambda p, s, out: vae_encode(p, s / "dataset", out)),
    "latents": Target("latents", None, mutate_latents, vae_decode),
    "check": Target("check", None, mutate_check, lambda p, s, out: run_check(p, out)),
    "classifier": Target("classifier", None, mutate_folder, lambda p, s, out: _score(p, s / "dataset", out)),
    "pipeline": Target("pipeline", None, mutate_folder,
                       lambda p, s, out: _transitions(p, out)),
    "transitions": Target("transitions", None, mutate_folder, lambda p, s, out: _score(s / "classifier", p, out)),
    "dataset": Target("dataset", None, mutate_folder, lambda p, s, out: _score(s / "classifier", p, out)),
}
SHARED = {"vae": "autoencoder", "classifier": "classifier", "pipeline": "pipeline", "transitions": "transitions",
          "dataset": "dataset", "posterior": "posterior", "study-results": "study-results",
          "latents": "latents"}


def _transitions(pipeline: Path, out: Path) -> None:
    from diffusion.sample import main

    main(["--pipeline", str(pipeline), "--seeds", "0", "--conditions", "0,1", "--steps", "1", "--out", str(out)])


def build_shared(root: Path) -> Path:
    """The valid artifacts the folder targets mutate copies of (and use unmutated)."""
    root.mkdir(parents=True, exist_ok=True)
    for kind in ("dataset", "autoencoder", "classifier", "pipeline", "transitions"):
        if not (root / kind).exists():
            getattr(tiny_artifacts, kind)(root / kind)
    build_outputs(root)
    return root


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob(".*")
            if any(tag in p.name for tag in (".tmp-", ".partial", ".old-"))]


@contextlib.contextmanager
def logs_to(stream):
    """The libraries' own log handlers write to `stream`: they hold the stderr of the time they were made, which
    `redirect_stderr` does not reach, and a user sees their lines beside the error. (Records that reach the root
    logger go to `logging.lastResort`, which writes to the redirected stderr, or, under pytest, to its capture.)"""
    import logging

    handlers = {h: h.stream for name in ("diffusers", "huggingface_hub", "timm", "accelerate")
                for h in logging.getLogger(name).handlers if type(h) is logging.StreamHandler}
    for handler in handlers:
        handler.setStream(stream)
    try:
        yield
    finally:
        for handler, old in handlers.items():
            handler.setStream(old)


@contextlib.contextmanager
def no_network(lookups: list):
    """Host name lookups fail and are recorded: a reader or loader must never go to the network (a config that
    diffusers takes for a hub model name did)."""
    import socket

    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        lookups.append(str(host))
        raise OSError(f"no network while fuzzing ({host})")

    socket.getaddrinfo = lookup
    try:
        yield
    finally:
        socket.getaddrinfo = real


def build_subject(name: str, shared: Path, scratch: Path) -> Path:
    """The target's valid input, made in `scratch/input`."""
    if name == "check":
        return build_check(scratch / "input", shared)
    if name in SHARED:
        shutil.copytree(shared / SHARED[name], scratch / "input")
        return scratch / "input"
    (scratch / "input").mkdir()
    return TARGETS[name].build(scratch / "input")


def run_case(name: str, rng: random.Random | None, shared: Path, scratch: Path) -> tuple[str, bool, str]:
    """(outcome, leftover, detail) of one mutated case (`rng` None: the valid input as built); `scratch` is an
    empty folder for this case."""
    target = TARGETS[name]
    subject = build_subject(name, shared, scratch)
    if rng is not None:
        target.mutate(subject, rng)
    out = scratch / {"classifier": "out.csv", "transitions": "out.csv", "dataset": "out.csv",
                     "vae": "out.safetensors"}.get(name, "out")
    err = io.StringIO()
    outcome, detail = "accepted", ""
    lookups: list[str] = []
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), no_network(lookups), \
                logs_to(err):
            target.run(subject, shared, out)
    except SystemExit as exc:
        text = err.getvalue()
        lines = [line for line in text.splitlines() if line.startswith("error:")]
        others = [line for line in text.splitlines() if line.strip() and not line.startswith("error:")]
        if exc.code in (0, None):
            outcome = "accepted"
        elif exc.code == 2 and len(lines) == 1 and "Traceback" not in text:
            outcome, detail = "clean", lines[0]
            if others:  # a warning or a retry message before the error: not one clear line
                outcome, detail = "noisy", f"{lines[0]} after: {' | '.join(others)[:300]}"
        else:
            outcome, detail = "traceback", f"exit {exc.code}: {text[-300:]}"
    except Exception as exc:  # noqa: BLE001 - what the fuzzing counts
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" not in f.filename] \
            or traceback.extract_tb(exc.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        outcome, detail = "traceback", f"{type(exc).__name__} at {where}: {' '.join(str(exc).split())[:160]}"
    if lookups:
        outcome, detail = "network", f"looked up {sorted(set(lookups))} ({outcome}: {detail[:200]})"
    left = leftovers(scratch) + leftovers(shared)
    if outcome != "accepted" and out.exists():
        left.append(str(out.relative_to(scratch)))
    if outcome != "accepted" and name == "transitions" and (subject / "scores.csv").exists() \
            and not (shared / "transitions" / "scores.csv").exists():
        left.append("input/scores.csv")
    return outcome, bool(left), detail + (f" leftovers: {left}" if left else "")


def count(name: str, cases: int, seed: int, shared: Path, scratch_root: Path) -> dict:
    """Counts per outcome over `cases` seeded cases (the before/after table's row)."""
    counts = {"cases": cases, "accepted": 0, "clean": 0, "noisy": 0, "network": 0, "traceback": 0, "leftover": 0,
              "examples": []}
    for i in range(cases):
        scratch = scratch_root / f"{name}-{i}"
        scratch.mkdir(parents=True)
        outcome, left, detail = run_case(name, random.Random(seed * 100003 + i), shared, scratch)
        counts[outcome] += 1
        counts["leftover"] += left
        if (outcome not in ("accepted", "clean") or left) and len(counts["examples"]) < 3:
            counts["examples"].append(detail[:300])
        shutil.rmtree(scratch, ignore_errors=True)
    return counts


if __name__ == "__main__":  # pragma: no cover - use bench/fuzz_outcomes.py
    sys.exit("run bench/fuzz_outcomes.py")
