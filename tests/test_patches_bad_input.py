"""Bad input, one test each: one line naming file and field, exit 2, no dataset folder, no hidden partial state."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from PIL import Image

from patches.cli import main
from test_patches_sources import make_sliderunner_db


def fails(argv, out, capsys, *needles):
    """Run `data ...`; check the exit code, the single error line, and that nothing was left behind."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == [], leftovers
    return lines[0]


@pytest.fixture
def image(tmp_path):
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(tmp_path / "ok.png")
    return tmp_path / "ok.png"


def points_csv(tmp_path, text):
    path = tmp_path / "cells.csv"
    path.write_text(text)
    return path


def midog_json(tmp_path, annotations, images=None):
    images = images or [{"id": 1, "file_name": "ok.png", "width": 80, "height": 60, "tumor_type": "t"}]
    path = tmp_path / "midog.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


def ann(i, bbox=(10, 10, 60, 50), labels=(1, 1), category=1):
    return {"id": i, "image_id": 1, "bbox": list(bbox), "category_id": category, "labels": list(labels)}


def test_missing_slide_file(tmp_path, capsys, image):
    table = points_csv(tmp_path, "slide,x,y,label\nok.png,5,5,1\nabsent.svs,5,5,0\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "absent.svs", "not found")


def test_corrupt_image(tmp_path, capsys, image):
    (tmp_path / "broken.tiff").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    table = points_csv(tmp_path, "slide,x,y,label\nok.png,5,5,1\nbroken.tiff,5,5,0\n")
    # the corrupt slide fails inside a worker job, after the good slide's shard was written
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds", "--workers", "2"],
          tmp_path / "ds", capsys, "broken.tiff", "cannot read")


def test_bbox_outside_image(tmp_path, capsys, image):
    js = midog_json(tmp_path, [ann(1), ann(2, bbox=(100, 10, 150, 60))])
    fails(["midog", "--json", js, "--images", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "midog.json", "annotations[1].bbox", "outside")


def test_point_outside_the_actual_image(tmp_path, capsys, image):
    table = points_csv(tmp_path, "slide,x,y,label\nok.png,5,5,1\nok.png,500,5,0\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "ok.png", "outside the image")


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_label_outside_unit_interval_or_nan(tmp_path, capsys, image, value):
    table = points_csv(tmp_path, f"slide,x,y,label\nok.png,5,5,1\nok.png,6,6,{value}\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "cells.csv", "line 3", "field 'label'")


def test_a_patch_size_too_small_names_the_flag_or_the_key_that_set_it(tmp_path, capsys, image):
    # was "--set: key 'patch_size'" for `--size 7`, a key the user never typed
    table = points_csv(tmp_path, "slide,x,y,label\nok.png,5,5,1\n")
    base = ["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"]
    fails([*base, "--size", "7"], tmp_path / "ds", capsys, "error: --size: must be >= 8, got 7")
    fails([*base, "--set", "patch_size=7"], tmp_path / "ds", capsys, "--set: key 'patch_size' must be >= 8, got 7")


def test_a_negative_seed(tmp_path, capsys, image):
    # numpy's generators refuse negative seeds with a traceback; the flag and the config key say so in one line
    table = points_csv(tmp_path, "slide,x,y,label\nok.png,5,5,1\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds", "--set", "split.seed=-3"],
          tmp_path / "ds", capsys, "--set: key 'split.seed' must be >= 0, got -3")
    for argv in (["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds", "--seed", "-1"],
                 ["synth", "--out", tmp_path / "ds", "--n", "3", "--seed=-1"]):
        with pytest.raises(SystemExit) as exc:  # argparse's refusal: its usage, then the error
            main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "error: argument --seed: must be >= 0, got -1" in err, err
        assert "Traceback" not in err and not (tmp_path / "ds").exists()


def test_duplicate_ids(tmp_path, capsys, image):
    js = midog_json(tmp_path, [ann(7), ann(7, bbox=(20, 5, 70, 55))])
    fails(["midog", "--json", js, "--images", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "midog.json", "annotations[1].id", "duplicate")
    table = points_csv(tmp_path, "id,slide,x,y,label\na,ok.png,5,5,1\na,ok.png,6,6,0\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "cells.csv", "field 'id'", "duplicate")


def test_malformed_json(tmp_path, capsys, image):
    js = tmp_path / "midog.json"
    js.write_text('{"images": [], "annotations": [')
    fails(["midog", "--json", js, "--images", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "midog.json", "malformed")
    js.write_text(json.dumps({"images": [], "annotation": []}))
    fails(["midog", "--json", js, "--images", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "midog.json", "field 'annotations'")


def test_malformed_csv(tmp_path, capsys, image):
    table = points_csv(tmp_path, "slide,x,y,label\nok.png,5,5,1,extra\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "cells.csv", "malformed CSV")
    table = points_csv(tmp_path, "slide,x,label\nok.png,5,1\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "cells.csv", "field 'y'")
    table = points_csv(tmp_path, "slide,x,y,votes\nok.png,5,5,1;2\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "cells.csv", "field 'votes'")


def test_sqlite_missing_table_or_column(tmp_path, capsys, image):
    db = tmp_path / "ccmct.sqlite"
    make_sliderunner_db(db, {1: "ok.png"}, [{"uid": 1, "slide": 1, "x": 5, "y": 5, "agreed": 2, "labels": [(1, 2)]}])
    con = sqlite3.connect(db)
    con.execute("DROP TABLE Annotations_label")
    con.commit()
    con.close()
    fails(["sliderunner", "--db", db, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "ccmct.sqlite", "table 'Annotations_label'")
    db.unlink()
    make_sliderunner_db(db, {1: "ok.png"}, [{"uid": 1, "slide": 1, "x": 5, "y": 5, "agreed": 2, "labels": [(1, 2)]}])
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE Annotations DROP COLUMN agreedClass")
    con.commit()
    con.close()
    fails(["sliderunner", "--db", db, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "ccmct.sqlite", "Annotations.agreedClass")
    (tmp_path / "notdb.sqlite").write_text("hello, not a database" * 100)
    fails(["sliderunner", "--db", tmp_path / "notdb.sqlite", "--slides", tmp_path, "--out", tmp_path / "ds"],
          tmp_path / "ds", capsys, "notdb.sqlite", "SQLite")


def test_empty_source(tmp_path, capsys, image):
    table = points_csv(tmp_path, "slide,x,y,label\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "cells.csv", "empty source")
    js = midog_json(tmp_path, [])
    fails(["midog", "--json", js, "--images", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "midog.json", "field 'annotations'", "empty source")
    # a blank slide: detection runs in the job, finds nothing, and the partial state is removed
    fails(["detect", "--slide", image, "--out", tmp_path / "ds"], tmp_path / "ds", capsys, "ok.png", "empty source")


def test_unknown_config_key(tmp_path, capsys, image):
    table = points_csv(tmp_path, "slide,x,y,label\nok.png,5,5,1\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds", "--set", "split.bogus=1"],
          tmp_path / "ds", capsys, "--set", "split.bogus")
    config = tmp_path / "extract.yaml"
    config.write_text("patch_size: 32\ndetect:\n  min_aera_um2: 5\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds", "--config", config],
          tmp_path / "ds", capsys, "extract.yaml", "detect.min_aera_um2")
    config.write_text("patch_size: big\n")
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds", "--config", config],
          tmp_path / "ds", capsys, "extract.yaml", "patch_size")
