"""Extraction resumes per slide: after a failure or a SIGKILL, finished slides are not redone, and the result
equals a clean run."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from patches.dataset import SplitConfig, build_dataset, pending_jobs
from patches.extract import cut_points


def flaky_cut(log: str, fail_flag: str, key: str, **kwargs):
    """cut_points, but it logs each call and dies on slide 'c' while `fail_flag` exists (a crash mid-run)."""
    with open(log, "a") as handle:
        handle.write(key + "\n")
    if key == "c" and Path(fail_flag).exists():
        raise RuntimeError("simulated crash")
    return cut_points(**kwargs)


def make_slides(folder: Path, names, size=(120, 160)) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{name}.png")


def jobs_for(folder: Path, log: Path, flag: Path):
    jobs = []
    for key in "abcd":
        rows = [{"id": f"{key}-{i}", "source": "points", "slide": key, "x": 20 + 30 * i, "y": 40, "label": i / 3,
                 "votes": "", "hard_label": int(i >= 2)} for i in range(4)]
        jobs.append((key, flaky_cut, {"log": str(log), "fail_flag": str(flag), "key": key,
                                      "slide_path": str(folder / f"{key}.png"), "rows": rows, "patch_size": 16,
                                      "margin": 4}))
    return jobs


def content_hash(path: Path) -> str:
    return json.loads((path / "dataset.json").read_text())["content_hash"]


def crash_after_two_slides(tmp_path):
    """Four slides built with a crash at the third: (build, out, log, flag), the flag still set."""
    make_slides(tmp_path, "abcd")
    log, flag = tmp_path / "calls.log", tmp_path / "fail.flag"
    flag.touch()
    out = tmp_path / "ds"
    build = functools.partial(build_dataset, patch_size=16, margin=4, meta={"source": "points"},
                              split=SplitConfig(mode="slide"), progress=False)
    with pytest.raises(RuntimeError):
        build(out, jobs_for(tmp_path, log, flag))
    return build, out, log, flag


def test_resume_after_a_crash(tmp_path):
    build, out, log, flag = crash_after_two_slides(tmp_path)
    assert not out.exists()
    partial = tmp_path / ".ds.partial"
    assert sorted(p.stem for p in partial.glob("*.npy")) == ["a", "b"]  # finished slides kept
    assert log.read_text().split() == ["a", "b", "c"]
    flag.unlink()
    log.write_text("")
    build(out, jobs_for(tmp_path, log, flag))
    assert log.read_text().split() == ["c", "d"]  # a and b were not redone
    assert not partial.exists()
    clean = tmp_path / "clean"
    build(clean, jobs_for(tmp_path, tmp_path / "clean.log", flag))
    assert content_hash(out) == content_hash(clean)
    assert np.array_equal(np.load(out / "patches.npy"), np.load(clean / "patches.npy"))


def test_resume_after_sigkill(tmp_path, monkeypatch):
    """Kill `data detect` over five slides after two are done; the rerun detects only the rest."""
    rng = np.random.default_rng(1)
    slides = []
    for k in range(5):
        pixels = np.empty((700, 700, 3), np.float32)
        pixels[:] = (235, 170, 205)
        pixels += rng.normal(0, 4, pixels.shape)
        yy, xx = np.mgrid[:700, :700]
        for y in range(40, 680, 50):
            for x in range(40 + 5 * k, 680, 55):
                pixels[(xx - x) ** 2 + (yy - y) ** 2 <= 49] = (75, 55, 140)
        path = tmp_path / f"slide{k}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        slides.append(path)
    out = tmp_path / "ds"
    args = ["detect", *[a for s in slides for a in ("--slide", str(s))], "--out", str(out), "--workers", "1",
            "--size", "32"]
    proc = subprocess.Popen([sys.executable, "-m", "mitosis_ldm", "data", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / ".ds.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.stem for p in partial.glob("*.json")}
    assert 2 <= len(done) < 5, "the run finished before it could be killed; make the slides bigger"
    assert not out.exists()

    import patches.detect
    from patches.cli import main

    calls = []
    original = patches.detect.detect_slide

    @functools.wraps(original)  # same module and qualname: the job fingerprint is unchanged
    def logged(**kwargs):
        calls.append(Path(kwargs["slide_path"]).name)
        return original(**kwargs)

    monkeypatch.setattr(patches.detect, "detect_slide", logged)
    main(args)
    from patches.extract import safe_key

    finished = {s.name for s in slides if safe_key(str(s)) in done}
    assert len(finished) == len(done)
    assert sorted(calls) == sorted(s.name for s in slides if s.name not in finished)  # only the unfinished ones
    monkeypatch.setattr(patches.detect, "detect_slide", original)
    clean = tmp_path / "clean"
    main([a if a != str(out) else str(clean) for a in args])
    assert content_hash(out) == content_hash(clean)


def test_a_slide_whose_npy_was_written_but_not_its_json_is_redone(tmp_path):
    for key in "abc":
        np.save(tmp_path / f"{key}.npy", np.zeros((1, 8, 8, 3), np.uint8))
        (tmp_path / f"{key}.json").write_text('[{"id": "x"}]')
    (tmp_path / "b.json").unlink()  # b killed between its two writes
    (tmp_path / "c.npy").unlink()  # c half gone
    jobs = [(key, cut_points, {}) for key in "abcd"]
    assert [job[0] for job in pending_jobs(tmp_path, jobs)] == ["b", "c", "d"]


@pytest.mark.parametrize("damage", ["truncated npy", "empty json", "rows of another length", "pickled npy"])
def test_a_damaged_finished_slide_is_redone_on_the_rerun(tmp_path, damage):
    build, out, log, flag = crash_after_two_slides(tmp_path)
    flag.unlink()
    log.write_text("")
    partial = tmp_path / ".ds.partial"
    if damage == "truncated npy":
        (partial / "a.npy").write_bytes((partial / "a.npy").read_bytes()[:100])
    elif damage == "empty json":
        (partial / "a.json").write_text("")
    elif damage == "rows of another length":
        (partial / "a.json").write_text(json.dumps(json.loads((partial / "a.json").read_text())[:-1]))
    else:
        np.save(partial / "a.npy", np.array([{"not": "pixels"}], dtype=object), allow_pickle=True)
    build(out, jobs_for(tmp_path, log, flag))
    assert log.read_text().split() == ["a", "c", "d"]
    clean = tmp_path / "clean"
    build(clean, jobs_for(tmp_path, tmp_path / "clean.log", flag))
    assert content_hash(out) == content_hash(clean)


def test_a_rerun_with_changed_annotations_redoes_the_finished_slides(tmp_path):
    build, out, log, flag = crash_after_two_slides(tmp_path)
    flag.unlink()
    log.write_text("")
    jobs = jobs_for(tmp_path, log, flag)
    jobs[0][2]["rows"][0].update(label=1.0, hard_label=1)  # slide a, finished before the crash, is relabelled
    build(out, jobs)
    assert log.read_text().split() == ["a", "b", "c", "d"]  # the kept shards were made from other rows
    with open(out / "labels.csv", newline="") as handle:
        rows = {r["id"]: r for r in csv.DictReader(handle)}
    assert (rows["a-0"]["label"], rows["a-0"]["hard_label"]) == ("1", "1")
