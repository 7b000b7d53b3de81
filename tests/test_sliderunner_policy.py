"""SlideRunner reader policies: what each annotation type and class means, and the counted one-line summary."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from PIL import Image

from patches.cli import main
from test_patches_sources import make_sliderunner_db


def real_world_db(tmp_path):
    """The real schema; spots and polygons; classes 1, 2, 3, 7; malformed rows of every kind the issue lists."""
    Image.fromarray(np.full((200, 300, 3), 200, np.uint8)).save(tmp_path / "a.png")
    annotations = [
        {"uid": 1, "slide": 1, "x": 50, "y": 60, "agreed": 2, "labels": [(1, 2), (2, 2), (3, 7)]},
        {"uid": 2, "slide": 1, "x": 120, "y": 60, "agreed": 7, "labels": [(1, 7), (2, 2)]},
        {"uid": 3, "slide": 1, "x": 150, "y": 100, "agreed": 1, "labels": [(1, 1)]},   # granulocyte
        {"uid": 4, "slide": 1, "x": 200, "y": 100, "agreed": 3, "labels": [(1, 3)]},   # tumour cell
        {"uid": 5, "slide": 1, "x": 80, "y": 150, "agreed": 2, "labels": [(1, 2)]},    # becomes a polygon
        {"uid": 6, "slide": 1, "x": 250, "y": 150, "agreed": 2, "labels": []},         # agreedClass NULL below
        {"uid": 7, "slide": 1, "x": 30, "y": 30, "agreed": 2, "labels": [(1, 2)]},     # gets odd votes below
    ]
    db = tmp_path / "ccmct.sqlite"
    make_sliderunner_db(db, {1: "a.png"}, annotations)
    con = sqlite3.connect(db)
    con.execute("UPDATE Annotations SET type = 3 WHERE uid = 5")  # a polygon around a region
    con.executemany("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                    "VALUES (?, ?, 1, 5, ?)", [(120, 150, 2), (100, 190, 3)])
    con.execute("UPDATE Annotations SET agreedClass = NULL WHERE uid = 6")
    con.executemany("INSERT INTO Annotations_label (person, class, annoId) VALUES (?, ?, ?)", [
        (2, 2, 99),            # dangling: annotation 99 does not exist
        (2, None, 7),          # class NULL
        (3, "mitosis", 7),     # class as text
        (3, 42, 7),            # class id not in Classes
        (None, 2, 7),          # person NULL
        ("bob", 7, 7),         # person as text
        (1, 2, None),          # annoId NULL
        (1, 2, "seven"),       # annoId as text
    ])
    con.execute("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                "VALUES (1, 1, 1, 'x', 1)")  # coordinate row with a text annoId
    con.commit()
    con.close()
    return db


def rows_of(out):
    import csv

    with open(out / "labels.csv", newline="") as handle:
        return {r["id"]: r for r in csv.DictReader(handle)}


def test_real_world_database_kept_rows_and_one_line_summary(tmp_path, capsys):
    db = real_world_db(tmp_path)
    out = tmp_path / "ds"
    main(["sliderunner", "--db", str(db), "--slides", str(tmp_path), "--out", str(out), "--size", "32"])
    rows = rows_of(out)
    assert set(rows) == {"sliderunner-1", "sliderunner-2", "sliderunner-7"}
    assert (rows["sliderunner-1"]["votes"], rows["sliderunner-1"]["hard_label"]) == ("1;1;0", "1")
    assert (rows["sliderunner-2"]["votes"], rows["sliderunner-2"]["hard_label"]) == ("0;1", "0")
    assert rows["sliderunner-7"]["votes"] == "1"  # only person 1's valid vote: bad votes are not "not mitotic"
    err = capsys.readouterr().err.strip().splitlines()
    summary = err[-1]
    assert summary.startswith("warning: ") and str(db) in summary
    for part in ("kept 3 annotations", "class 2 'Mitotic figure' 2", "class 7 'Mitotic figure lookalike' 1",
                 "class 1 'Granulocyte' 1", "class 3 'Tumor cell' 1", "polygon annotations (not cells) 1",
                 "annotations whose agreedClass is NULL or not in Classes 1", "votes pointing to no annotation 1",
                 "votes whose class is not in Classes 3", "votes without an integer person 2",
                 "votes without an integer annoId 2", "coordinate rows without an integer annoId 1"):
        assert part in summary, part
    import json

    left_out = json.loads((out / "dataset.json").read_text())["left_out"]
    assert left_out["votes pointing to no annotation"] == 1 and left_out["class 1 'Granulocyte'"] == 1


def test_text_coordinates_are_an_error_not_zero(tmp_path, capsys):
    db = real_world_db(tmp_path)
    con = sqlite3.connect(db)
    con.execute("UPDATE Annotations_coordinates SET coordinateX = 'left' WHERE annoId = 2")
    con.commit()
    con.close()
    out = tmp_path / "ds"
    with pytest.raises(SystemExit) as exit_info:
        main(["sliderunner", "--db", str(db), "--slides", str(tmp_path), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "coordinateX/Y" in err[0] and "annotation 2" in err[0] and "'left'" in err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]


def test_a_circle_is_centred_at_the_mean_of_its_coordinates(tmp_path):
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(tmp_path / "a.png")
    db = tmp_path / "ccmct.sqlite"
    make_sliderunner_db(db, {1: "a.png"}, [
        {"uid": 1, "slide": 1, "x": 40, "y": 50, "agreed": 2, "labels": [(1, 2)]},
        {"uid": 2, "slide": 1, "x": 100, "y": 30, "agreed": 7, "labels": [(1, 7)]}])
    con = sqlite3.connect(db)
    con.execute("UPDATE Annotations SET type = 5 WHERE uid = 1")  # a circle: two corners of its box
    con.execute("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                "VALUES (60, 70, 1, 1, 2)")
    con.commit()
    con.close()
    main(["sliderunner", "--db", str(db), "--slides", str(tmp_path), "--out", str(tmp_path / "ds"), "--size", "16"])
    rows = rows_of(tmp_path / "ds")
    assert (rows["sliderunner-1"]["x"], rows["sliderunner-1"]["y"]) == ("50", "60")  # (40 + 60) / 2, (50 + 70) / 2
    assert (rows["sliderunner-2"]["x"], rows["sliderunner-2"]["y"]) == ("100", "30")  # a spot: its one point


def test_an_annotation_without_usable_votes_takes_its_agreed_class_as_the_one_vote(tmp_path):
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(tmp_path / "a.png")
    db = tmp_path / "ccmct.sqlite"
    make_sliderunner_db(db, {1: "a.png"}, [
        {"uid": 1, "slide": 1, "x": 40, "y": 50, "agreed": 2, "labels": []},
        {"uid": 2, "slide": 1, "x": 100, "y": 30, "agreed": 7, "labels": []},
        {"uid": 3, "slide": 1, "x": 120, "y": 90, "agreed": 2, "labels": [(1, 2), (2, 7)]}])
    main(["sliderunner", "--db", str(db), "--slides", str(tmp_path), "--out", str(tmp_path / "ds"), "--size", "16"])
    rows = rows_of(tmp_path / "ds")
    assert {uid: (r["label"], r["votes"], r["hard_label"]) for uid, r in rows.items()} == {
        "sliderunner-1": ("1", "", "1"), "sliderunner-2": ("0", "", "0"), "sliderunner-3": ("0.5", "1;0", "1")}


def test_text_that_is_not_utf8_is_read_with_a_replacement_character(tmp_path, capsys):
    """A class name with a damaged byte is read with U+FFFD in its place; a slide file name in Latin-1 (as an older
    database may hold) the same way, and so it is a slide not found. Before, sqlite3 refused the whole database
    over the one display name ("Could not decode to UTF-8 column 'name'")."""
    db = real_world_db(tmp_path)
    con = sqlite3.connect(db)
    con.execute("UPDATE Classes SET name = CAST(? AS TEXT) WHERE uid = 1", (b"Granulo\xc2cyte",))
    con.commit()
    con.close()
    out = tmp_path / "ds"
    main(["sliderunner", "--db", str(db), "--slides", str(tmp_path), "--out", str(out)])
    assert set(rows_of(out)) == {"sliderunner-1", "sliderunner-2", "sliderunner-7"}  # as from the undamaged one
    assert "class 1 'Granulo\ufffdcyte' 1" in capsys.readouterr().err.strip().splitlines()[-1]
    con = sqlite3.connect(db)
    con.execute("UPDATE Slides SET filename = CAST(? AS TEXT) WHERE uid = 1", (b"caf\xe9.png",))
    con.commit()
    con.close()
    with pytest.raises(SystemExit) as exit_info:
        main(["sliderunner", "--db", str(db), "--slides", str(tmp_path), "--out", str(tmp_path / "ds2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caf\ufffd.png" in err[0], err
    assert not (tmp_path / "ds2").exists()


def test_a_schema_damaged_into_bytes_that_are_not_utf8_is_one_line(tmp_path, capsys):
    """SQLite's message about a malformed schema quotes the damaged SQL; Python failed to decode it, a traceback."""
    db = real_world_db(tmp_path)
    data = bytearray(db.read_bytes())
    at = data.index(b"CREATE TABLE Annotations_label (") + 31
    data[at:at + 2] = b"\xc2("
    db.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["sliderunner", "--db", str(db), "--slides", str(tmp_path), "--out", str(tmp_path / "ds")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == \
        [f"error: {db}: not a readable SQLite database (a damaged schema)"]
    assert not (tmp_path / "ds").exists()
