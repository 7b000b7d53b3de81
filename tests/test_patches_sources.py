"""Slide sources against ground truth: MIDOG++ (real JSON, stand-in TIFFs), SlideRunner SQLite, points, folder, detect;
the train/val/test splits they share."""

from __future__ import annotations

import csv
import json
import sqlite3
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import MIDOG_JSON
from patches.cli import main
from patches.folder import fit_patch

BACKGROUND = (231, 182, 212)


def rows_of(path: Path) -> list[dict]:
    with open(path / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def marker(i: int) -> tuple[int, int, int]:
    """A colour unique to annotation number i (never the background)."""
    return (i % 200 + 1, (i // 200) % 200 + 1, 9)


def paint(image: np.ndarray, x: int, y: int, colour) -> None:
    image[max(0, y - 1): y + 2, max(0, x - 1): x + 2] = colour


def write_tiled_tiff(path: Path, image: np.ndarray) -> None:
    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib", photometric="rgb")


# -- MIDOG++ ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def midog(tmp_path_factory):
    if not MIDOG_JSON.exists():
        pytest.skip(f"{MIDOG_JSON} not available")
    data = json.loads(MIDOG_JSON.read_text())
    per_image = defaultdict(list)
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(ann)
    images = {im["id"]: im for im in data["images"]}
    # three images with few cells, of two tumour types, written at their listed sizes as tiled TIFFs
    chosen = []
    for image_id in sorted(per_image, key=lambda i: len(per_image[i])):
        if len(chosen) < 2 or images[image_id]["tumor_type"] != images[chosen[0]]["tumor_type"]:
            chosen.append(image_id)
        if len(chosen) == 3:
            break
    folder = tmp_path_factory.mktemp("midog_images")
    for image_id in chosen:
        im = images[image_id]
        pixels = np.empty((im["height"], im["width"], 3), np.uint8)
        pixels[:] = BACKGROUND
        for ann in per_image[image_id]:
            x1, y1, x2, y2 = ann["bbox"]
            paint(pixels, min(max((x1 + x2) // 2, 0), im["width"] - 1), min(max((y1 + y2) // 2, 0), im["height"] - 1),
                  marker(ann["id"]))
        write_tiled_tiff(folder / im["file_name"], pixels)
    out = tmp_path_factory.mktemp("midog_out") / "ds"
    main(["midog", "--json", str(MIDOG_JSON), "--images", str(folder), "--out", str(out), "--skip-missing",
          "--workers", "2"])
    return {"out": out, "folder": folder, "chosen": chosen, "images": images, "per_image": per_image}


def test_midog_matches_json(midog):
    rows = rows_of(midog["out"])
    patches = np.load(midog["out"] / "patches.npy")
    by_slide = defaultdict(list)
    for i, r in enumerate(rows):
        by_slide[r["slide"]].append((i, r))
    assert set(by_slide) == {midog["images"][i]["file_name"] for i in midog["chosen"]}
    for image_id in midog["chosen"]:
        anns = {f"midog-{a['id']}": a for a in midog["per_image"][image_id]}
        got = by_slide[midog["images"][image_id]["file_name"]]
        assert len(got) == len(anns)  # per-image counts
        for index, r in got:
            ann = anns[r["id"]]
            x1, y1, x2, y2 = ann["bbox"]
            im = midog["images"][image_id]
            centre = (min(max((x1 + x2) // 2, 0), im["width"] - 1), min(max((y1 + y2) // 2, 0), im["height"] - 1))
            assert (int(r["x"]), int(r["y"])) == centre  # bbox centre, not COCO's x, y, w, h
            votes = [int(v == 1) for v in ann["labels"]]
            assert float(r["label"]) == pytest.approx(np.mean(votes), abs=1e-5)
            assert r["votes"] == ";".join(map(str, votes))
            assert int(r["hard_label"]) == int(ann["category_id"] == 1)
            assert r["tumor_type"] == midog["images"][image_id]["tumor_type"]
            # the marker painted at the bbox centre is at the centre of the stored patch
            assert tuple(patches[index, 40, 40]) == marker(ann["id"])
    # one slide lands in one split
    for slide_rows in by_slide.values():
        assert len({r["split"] for _, r in slide_rows}) == 1


def test_midog_tumor_type_filter(midog, tmp_path):
    first = midog["images"][midog["chosen"][0]]
    out = tmp_path / "one"
    main(["midog", "--json", str(MIDOG_JSON), "--images", str(midog["folder"]), "--out", str(out),
          "--skip-missing", "--tumor-type", first["tumor_type"]])
    rows = rows_of(out)
    same = [i for i in midog["chosen"] if midog["images"][i]["tumor_type"] == first["tumor_type"]]
    assert len(rows) == sum(len(midog["per_image"][i]) for i in same)
    assert {r["tumor_type"] for r in rows} == {first["tumor_type"]}


# -- SlideRunner -----------------------------------------------------------------

def make_sliderunner_db(path: Path, slides: dict[int, str], annotations: list[dict], mitotic: int = 2,
                        lookalike: int = 7) -> None:
    """A SQLite with the CCMCT SlideRunner schema (all columns of the real tables)."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE Slides (uid INTEGER PRIMARY KEY, filename TEXT, width INTEGER, height INTEGER,
                             directory TEXT, uuid TEXT, exactImageID TEXT);
        CREATE TABLE Annotations (uid INTEGER PRIMARY KEY, guid TEXT, deleted INTEGER DEFAULT 0,
                                  slide INTEGER, type INTEGER, agreedClass INTEGER, lastModified REAL);
        CREATE TABLE Annotations_coordinates (uid INTEGER PRIMARY KEY, coordinateX INTEGER, coordinateY INTEGER,
                                              coordinateZ INTEGER DEFAULT 0, slide INTEGER, annoId INTEGER,
                                              orderIdx INTEGER);
        CREATE TABLE Annotations_label (uid INTEGER PRIMARY KEY, person INTEGER, class INTEGER, annoId INTEGER);
        CREATE TABLE Classes (uid INTEGER PRIMARY KEY, name TEXT, color TEXT);
        CREATE TABLE Persons (uid INTEGER PRIMARY KEY, name TEXT, isExactUser INTEGER);
    """)
    names = {1: "Granulocyte", mitotic: "Mitotic figure", 3: "Tumor cell", lookalike: "Mitotic figure lookalike"}
    db.executemany("INSERT INTO Classes (uid, name) VALUES (?, ?)", names.items())
    db.executemany("INSERT INTO Persons (uid, name) VALUES (?, ?)", [(1, "A"), (2, "B"), (3, "C")])
    db.executemany("INSERT INTO Slides (uid, filename, width, height, directory) VALUES (?, ?, 0, 0, '')",
                   slides.items())
    for a in annotations:
        db.execute("INSERT INTO Annotations (uid, slide, type, agreedClass, deleted) VALUES (?, ?, 1, ?, ?)",
                   (a["uid"], a["slide"], a["agreed"], a.get("deleted", 0)))
        db.execute("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                   "VALUES (?, ?, ?, ?, 1)", (a["x"], a["y"], a["slide"], a["uid"]))
        for person, cls in a["labels"]:
            db.execute("INSERT INTO Annotations_label (person, class, annoId) VALUES (?, ?, ?)",
                       (person, cls, a["uid"]))
    db.commit()
    db.close()


def sliderunner_case(tmp_path: Path, mitotic=2, lookalike=7):
    slides_dir = tmp_path / "slides"
    slides_dir.mkdir()
    annotations = [
        {"uid": 1, "slide": 1, "x": 50, "y": 60, "agreed": mitotic, "labels": [(1, mitotic), (2, mitotic)]},
        {"uid": 2, "slide": 1, "x": 150, "y": 90, "agreed": mitotic,
         "labels": [(1, mitotic), (2, lookalike), (3, mitotic)]},
        {"uid": 3, "slide": 1, "x": 220, "y": 30, "agreed": lookalike, "labels": [(1, lookalike), (2, lookalike)]},
        {"uid": 4, "slide": 2, "x": 10, "y": 10, "agreed": lookalike,
         "labels": [(1, mitotic), (2, lookalike), (1, lookalike)]},  # person 1 changed their mind
        {"uid": 5, "slide": 2, "x": 100, "y": 100, "agreed": 3, "labels": [(1, 3)]},  # tumour cell: skipped
        {"uid": 6, "slide": 2, "x": 120, "y": 40, "agreed": mitotic, "labels": [(1, mitotic)], "deleted": 1},
    ]
    for uid, name in ((1, "a.tiff"), (2, "b.png")):
        pixels = np.empty((140, 260, 3), np.uint8)
        pixels[:] = BACKGROUND
        for a in annotations:
            if a["slide"] == uid:
                paint(pixels, a["x"], a["y"], marker(a["uid"]))
        if name.endswith(".tiff"):
            write_tiled_tiff(slides_dir / name, pixels)
        else:
            Image.fromarray(pixels).save(slides_dir / name)
    db = tmp_path / "ccmct.sqlite"
    make_sliderunner_db(db, {1: "a.tiff", 2: "b.png"}, annotations, mitotic, lookalike)
    return db, slides_dir


def test_sliderunner_votes_classes_and_agreed(tmp_path):
    db, slides = sliderunner_case(tmp_path)
    out = tmp_path / "ds"
    main(["sliderunner", "--db", str(db), "--slides", str(slides), "--out", str(out), "--size", "32"])
    rows = {r["id"]: r for r in rows_of(out)}
    assert set(rows) == {"sliderunner-1", "sliderunner-2", "sliderunner-3", "sliderunner-4"}
    expect = {1: (1.0, "1;1", 1, "Mitotic figure"), 2: (2 / 3, "1;0;1", 1, "Mitotic figure"),
              3: (0.0, "0;0", 0, "Mitotic figure lookalike"), 4: (0.0, "0;0", 0, "Mitotic figure lookalike")}
    for uid, (label, votes, hard, cls) in expect.items():
        r = rows[f"sliderunner-{uid}"]
        assert float(r["label"]) == pytest.approx(label, abs=1e-5)
        assert (r["votes"], int(r["hard_label"]), r["class"]) == (votes, hard, cls)
    patches = np.load(out / "patches.npy")
    for i, r in enumerate(rows_of(out)):
        assert tuple(patches[i, 24, 24]) == marker(int(r["annotation_id"]))  # centre of a 32+16 patch
    # a tumour cell joins as a hard negative when asked for
    out2 = tmp_path / "ds2"
    main(["sliderunner", "--db", str(db), "--slides", str(slides), "--out", str(out2), "--include-class", "3"])
    extra = {r["id"]: r for r in rows_of(out2)}["sliderunner-5"]
    assert (extra["label"], extra["hard_label"], extra["class"]) == ("0", "0", "Tumor cell")


def test_sliderunner_configurable_class_ids(tmp_path):
    db, slides = sliderunner_case(tmp_path, mitotic=5, lookalike=9)
    out = tmp_path / "ds"
    main(["sliderunner", "--db", str(db), "--slides", str(slides), "--out", str(out),
          "--mitotic-class", "5", "--lookalike-class", "9"])
    rows = {r["id"]: r for r in rows_of(out)}
    assert rows["sliderunner-2"]["votes"] == "1;0;1" and rows["sliderunner-2"]["hard_label"] == "1"
    assert len(rows) == 4


# -- points, folder --------------------------------------------------------------

def test_points_over_images_with_border_reflection(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    write_tiled_tiff(tmp_path / "img.tiff", pixels)
    table = tmp_path / "cells.csv"
    table.write_text("slide,x,y,votes,label\nimg.png,60,45,1;1;0,\nimg.png,0,0,,0.25\nimg.tiff,119,89,0;0,\n"
                     "img.tiff,30,40,,\n")
    out = tmp_path / "ds"
    main(["points", "--csv", str(table), "--slides", str(tmp_path), "--out", str(out), "--size", "16",
          "--margin", "4", "--split", "random"])
    rows = rows_of(out)
    patches = np.load(out / "patches.npy")
    assert [r["label"] for r in rows] == ["0.666667", "0.25", "0", ""]
    assert [r["hard_label"] for r in rows] == ["1", "0", "0", ""]
    # interior: an exact crop, centre at index S // 2
    assert np.array_equal(patches[0], pixels[45 - 12: 45 + 12, 60 - 12: 60 + 12])
    # corner: reflection, never black
    padded = np.pad(pixels, ((12, 12), (12, 12), (0, 0)), mode="reflect")
    assert np.array_equal(patches[1], padded[0:24, 0:24])
    assert np.array_equal(patches[2], padded[89:113, 119:143])  # the OpenSlide (tiled TIFF) path too


def test_folder_size_rules(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "imgs"
    (images / "caseA").mkdir(parents=True)
    stored = rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)
    exact = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    wide = rng.integers(0, 255, (100, 130, 3), dtype=np.uint8)
    Image.fromarray(stored).save(images / "caseA" / "stored.png")
    Image.fromarray(exact).save(images / "caseA" / "exact.png")
    Image.fromarray(wide).save(images / "wide.png")
    (tmp_path / "labels.csv").write_text("file,label,votes\ncaseA/stored.png,1,\ncaseA/exact.png,,0;1\nwide.png,0,\n")
    out = tmp_path / "ds"
    main(["folder", "--images", str(images), "--labels", str(tmp_path / "labels.csv"), "--out", str(out),
          "--split", "random"])
    patches = np.load(out / "patches.npy")
    rows = rows_of(out)
    assert patches.shape == (3, 80, 80, 3)
    by_file = {r["file"]: i for i, r in enumerate(rows)}
    assert np.array_equal(patches[by_file["caseA/stored.png"]], stored)
    assert np.array_equal(patches[by_file["caseA/exact.png"]][8:72, 8:72], exact)
    assert np.array_equal(patches[by_file["caseA/exact.png"]], np.pad(exact, ((8, 8), (8, 8), (0, 0)), "reflect"))
    assert np.array_equal(patches[by_file["wide.png"]], fit_patch(wide, 64, 8))
    assert rows[by_file["caseA/exact.png"]]["label"] == "0.5" and rows[by_file["caseA/exact.png"]]["hard_label"] == "1"
    assert rows[by_file["caseA/stored.png"]]["slide"] == "caseA"
    # the wide image was centre-cropped to 100x100 before resizing
    resized = np.asarray(Image.fromarray(wide[:, 15:115]).resize((64, 64), Image.Resampling.LANCZOS))
    assert np.array_equal(patches[by_file["wide.png"]][8:72, 8:72], resized)


# -- detect ----------------------------------------------------------------------

def test_detect_finds_painted_nuclei(tmp_path):
    """Dark purple discs on pink stroma: each disc is found once, at its centre."""
    rng = np.random.default_rng(0)
    h, w = 400, 500
    pixels = np.empty((h, w, 3), np.float32)
    pixels[:] = (235, 170, 205)
    pixels += rng.normal(0, 4, pixels.shape)
    yy, xx = np.mgrid[:h, :w]
    centres = [(x, y) for y in range(40, h - 20, 60) for x in range(40, w - 20, 70)]
    for x, y in centres:
        r = rng.uniform(6, 9)
        pixels[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = (75, 55, 140)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(tmp_path / "tissue.png")
    out = tmp_path / "ds"
    main(["detect", "--slide", str(tmp_path / "tissue.png"), "--out", str(out), "--size", "32"])
    rows = rows_of(out)
    found = np.array([[int(r["x"]), int(r["y"])] for r in rows])
    assert len(found) == len(centres)
    for x, y in centres:
        assert np.abs(found - [x, y]).sum(1).min() <= 2
    assert all(r["label"] == "" and r["hard_label"] == "" for r in rows)
    # split by y: every test patch lies below every train patch
    ys = {s: [int(r["y"]) for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    assert max(ys["train"]) <= min(ys["test"])


def test_detect_on_the_sample_slide(sample_slide, tmp_path):
    out = tmp_path / "cmu"
    main(["detect", "--slide", str(sample_slide), "--out", str(out)])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["count"] >= 1000 and meta["mpp"] == pytest.approx(0.499)
    patches = np.load(out / "patches.npy", mmap_mode="r")
    centre = patches[:, 34:46, 34:46].astype(np.float32).mean(axis=(1, 2, 3))
    border = patches[:, 8:72, 8:72].astype(np.float32).mean(axis=(1, 2, 3))
    assert (centre < border).mean() > 0.85  # a (dark) nucleus sits at the centre
    rows = rows_of(out)
    ys = {s: [int(r["y"]) for r in rows if r["split"] == s] for s in ("train", "test")}
    assert max(ys["train"]) <= min(ys["test"])
    assert min(ys["test"]) >= np.percentile([int(r["y"]) for r in rows], 79)  # the bottom 20% by y


def test_find_nuclei_near_a_point_keeps_exactly_the_full_call_s_nuclei_there(sample_slide):
    """The explorer's `near=` shortcut skips far regions' shape tests but must not change what is found."""
    from patches.detect import DetectConfig, find_nuclei
    from patches.slides import open_slide

    cfg = DetectConfig()
    slide = open_slide(str(sample_slide))
    rng = np.random.default_rng(0)
    width, height = slide.size
    checked = 0
    for x, y in zip(rng.integers(64, width - 64, 24), rng.integers(64, height - 64, 24)):
        window = slide.read_region(int(x) - 64, int(y) - 64, 128, 128)
        full = find_nuclei(window, cfg, slide.mpp or cfg.default_mpp)
        for radius in (20.0, 32.0):
            near = find_nuclei(window, cfg, slide.mpp or cfg.default_mpp, near=(64, 64, radius))
            assert near == [c for c in full if np.hypot(c[0] - 64, c[1] - 64) <= radius]
            checked += len(near)
    assert checked >= 12  # the windows hold nuclei near their centres, so the comparison is not vacuous


# -- configuration ---------------------------------------------------------------

def test_config_precedence_and_saved_config(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    (tmp_path / "cells.csv").write_text("slide,x,y,label\nimg.png,60,45,1\nimg.png,30,30,0\n")
    config = tmp_path / "extract.yaml"
    config.write_text("patch_size: 16\nmargin: 2\nsplit:\n  mode: random\n  seed: 3\n")
    out = tmp_path / "ds"
    main(["points", "--csv", str(tmp_path / "cells.csv"), "--slides", str(tmp_path), "--out", str(out),
          "--config", str(config), "--set", "margin=3", "--set", "patch_size=20", "--size", "24"])
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["patch_size"], meta["margin"]) == (24, 3)  # flag > --set > YAML
    assert meta["config"]["split"] == {"mode": "random", "val": 0.1, "test": 0.2, "seed": 3}  # YAML kept
    assert np.load(out / "patches.npy").shape == (2, 30, 30, 3)


@pytest.mark.parametrize("profile", ["demo", "full"])
def test_shipped_configs_load(profile):
    from conftest import REPO
    from mitosis_ldm.config import load_config
    from patches.extract import ExtractConfig

    cfg = load_config(ExtractConfig, REPO / "configs" / profile / "data.yaml")
    assert cfg.patch_size == 64


def test_slide_split_sends_whole_slides_in_the_configured_numbers():
    from patches.splits import SplitConfig, assign_splits

    rows = [{"id": f"{s}-{k}", "slide": f"s{s}"} for s in range(10) for k in range(3)]
    assign_splits(rows, SplitConfig(mode="slide", val=0.1, test=0.2, seed=0))
    per_slide = defaultdict(set)
    for row in rows:
        per_slide[row["slide"]].add(row["split"])
    assert all(len(splits) == 1 for splits in per_slide.values())  # no slide in two splits
    counts = defaultdict(int)
    for (split,) in per_slide.values():
        counts[split] += 1
    assert dict(counts) == {"train": 7, "val": 1, "test": 2}  # round(0.1 x 10) and round(0.2 x 10) slides


def test_y_split_sends_each_slides_top_rows_to_train_and_its_bottom_rows_to_test():
    from patches.splits import SplitConfig, assign_splits

    ys = [5, 1, 9, 3, 7, 0, 8, 2, 6, 4]  # rows in no particular order
    rows = [{"id": f"{slide}{k}", "slide": slide, "y": y + offset} for slide, offset in (("a", 0), ("b", 500))
            for k, y in enumerate(ys)]
    assign_splits(rows, SplitConfig(mode="y", val=0.1, test=0.2))
    expected = ["train"] * 7 + ["val"] + ["test"] * 2  # by y within each slide: 0-6, 7, 8-9
    for slide in ("a", "b"):
        assert [r["split"] for r in sorted((r for r in rows if r["slide"] == slide), key=lambda r: r["y"])] == expected
