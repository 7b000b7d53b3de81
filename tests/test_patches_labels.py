"""Categorical labels (label maps, TSV) and the QuPath GeoJSON reader, through `data points` and `data folder`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from mitosis_ldm.errors import UserError
from patches.cli import main
from patches.geojson import read_geojson
from patches.labelmap import check_label_map, parse_label_map
from test_patches_bad_input import fails

SEED_MAP = "NOT=0,INDET=0.5,MITE=1"


def rows_of(out) -> list[dict]:
    with open(out / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def slide(tmp_path):
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(tmp_path / "s.png")
    return tmp_path / "s.png"


def seed_tsv(tmp_path, column="label"):
    path = tmp_path / "meningioma.tsv"
    path.write_text(f"slide\tx\ty\t{column}\ns.png\t10\t10\tNOT\ns.png\t20\t20\tINDET\ns.png\t30\t30\tMITE\n")
    return path


def points(tmp_path, table, *extra, out="ds"):
    main([str(a) for a in ["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / out, "--size", "16",
                           "--margin", "0", "--workers", "1", *extra]])
    return rows_of(tmp_path / out)


def test_seed_categorical_tsv_gives_0_half_1(tmp_path, slide):
    rows = points(tmp_path, seed_tsv(tmp_path), "--label-map", SEED_MAP)
    assert [(r["class"], float(r["label"]), r["hard_label"]) for r in rows] == [
        ("NOT", 0.0, "0"), ("INDET", 0.5, "1"), ("MITE", 1.0, "1")]  # hard label: ties count as mitotic
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["config"]["label_map"] == {"NOT": 0.0, "INDET": 0.5, "MITE": 1.0}


def test_label_map_from_config_and_class_column(tmp_path, slide):
    config = tmp_path / "data.yaml"
    config.write_text("label_map: {NOT: 0, INDET: 0.5, MITE: 1}\n")
    rows = points(tmp_path, seed_tsv(tmp_path, column="class"), "--config", config)
    assert [float(r["label"]) for r in rows] == [0.0, 0.5, 1.0]
    # the flag replaces the config's map
    rows = points(tmp_path, seed_tsv(tmp_path, column="class"), "--config", config, "--label-map",
                  "NOT=0,INDET=0,MITE=1", out="ds2")
    assert [float(r["label"]) for r in rows] == [0.0, 0.0, 1.0]


def test_folder_with_class_names(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(images / f"{name}.png")
    table = tmp_path / "labels.tsv"
    table.write_text("file\tclass\na.png\tMITE\nb.png\tINDET\n")
    main(["folder", "--images", str(images), "--labels", str(table), "--out", str(tmp_path / "ds"), "--size", "16",
          "--margin", "0", "--label-map", SEED_MAP])
    assert {r["id"]: float(r["label"]) for r in rows_of(tmp_path / "ds")} == {"a.png": 1.0, "b.png": 0.5}


def test_unmapped_class_names_file_line_and_value(tmp_path, capsys, slide):
    table = seed_tsv(tmp_path)
    line = fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds", "--label-map",
                  "NOT=0,MITE=1"], tmp_path / "ds", capsys, "meningioma.tsv", "line 3", "field 'label'", "'INDET'")
    assert "NOT, MITE" in line
    # without a map, a class name is an error that says how to map it
    fails(["points", "--csv", table, "--slides", tmp_path, "--out", tmp_path / "ds"], tmp_path / "ds", capsys,
          "line 2", "'NOT'", "--label-map")


@pytest.mark.parametrize("text, needle", [("NOT", "NAME=VALUE"), ("NOT=0,MITE=2", "[0, 1]"),
                                          ("NOT=0,NOT=1", "twice"), ("NOT=x", "not a number")])
def test_label_map_syntax(text, needle):
    with pytest.raises(UserError, match="--label-map") as err:
        parse_label_map(text)
    assert needle in str(err.value)


def test_label_map_names_and_values_are_read_without_surrounding_spaces():
    assert parse_label_map("NOT = 0, INDET=0.5 , MITE =1") == {"NOT": 0.0, "INDET": 0.5, "MITE": 1.0}


def test_config_label_map_value_checked():
    with pytest.raises(UserError, match="label_map.MITE"):
        check_label_map({"NOT": 0, "MITE": 1.5}, "data.yaml")
    with pytest.raises(UserError, match="label_map.MITE"):
        check_label_map({"NOT": 0, "MITE": True}, "data.yaml")


# -- QuPath GeoJSON --------------------------------------------------------------

def feature(geometry, name=None):
    props = {"objectType": "annotation"}
    if name:
        props["classification"] = {"name": name, "color": [0, 0, 255]}
    return {"type": "Feature", "id": "x", "geometry": geometry, "properties": props}


def test_geojson_geometries_and_classes(tmp_path):
    square = [[[10, 20], [30, 20], [30, 40], [10, 40], [10, 20]]]
    features = [
        feature({"type": "Point", "coordinates": [1.5, 2.5]}, "MITE"),
        feature({"type": "MultiPoint", "coordinates": [[3, 4], [5, 6]]}, "NOT"),  # QuPath's points tool
        feature({"type": "Polygon", "coordinates": square}, "INDET"),
        feature({"type": "MultiPolygon", "coordinates": [square, [[[50, 20], [70, 20], [70, 40], [50, 40]]]]}),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [7, 8]},
         "properties": {"classification": {"names": ["Tumor", "Positive"]}}},
    ]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    marks = read_geojson(path)
    assert [(m.x, m.y, m.class_name) for m in marks] == [
        (1.5, 2.5, "MITE"), (3, 4, "NOT"), (5, 6, "NOT"), (20, 30, "INDET"), (40, 30, None), (7, 8, "Tumor: Positive")]
    assert marks[2].field == "features[1].geometry.coordinates[1]"
    path.write_text(json.dumps(features[:2]))  # a bare list of features, as QuPath also exports
    assert len(read_geojson(path)) == 3


def test_an_empty_geojson_classification_is_unclassified(tmp_path, slide):
    """QuPath may write `"classification": ""` or a class named ""; neither is a class the label map must name."""
    point = {"type": "Point", "coordinates": [10, 12]}
    features = [{"type": "Feature", "geometry": point, "properties": {"classification": ""}},
                {"type": "Feature", "geometry": point, "properties": {"classification": {"name": ""}}},
                feature(point, "MITE")]
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(features))
    assert [m.class_name for m in read_geojson(path)] == [None, None, "MITE"]
    main(["points", "--geojson", str(path), "--slide", "s.png", "--slides", str(tmp_path), "--out",
          str(tmp_path / "ds"), "--label-map", SEED_MAP, "--size", "16", "--margin", "0"])
    assert [(r["label"], r["class"]) for r in rows_of(tmp_path / "ds")] == [("", ""), ("", ""), ("1", "MITE")]


@pytest.mark.parametrize("geometry, needle", [
    ({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, "expected Point, MultiPoint, Polygon"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}, "not a valid Polygon"),
    ({"type": "Point", "coordinates": [1, "a"]}, "finite numbers"),
])
def test_geojson_bad_geometry(tmp_path, geometry, needle):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps([feature(geometry)]))
    with pytest.raises(UserError, match="a.geojson: field '\\[0\\].geometry") as err:
        read_geojson(path)
    assert needle in str(err.value)


def test_points_from_geojson(tmp_path, capsys, slide):
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature({"type": "Point", "coordinates": [10, 12]}, "MITE"),
        feature({"type": "Polygon", "coordinates": [[[30, 30], [40, 30], [40, 40], [30, 40], [30, 30]]]}, "INDET"),
        feature({"type": "Point", "coordinates": [79.8, 5]})]}))  # unclassified: unlabelled
    main(["points", "--geojson", str(path), "--slide", "s.png", "--slides", str(tmp_path), "--out",
          str(tmp_path / "ds"), "--label-map", SEED_MAP, "--size", "16", "--margin", "0"])
    rows = rows_of(tmp_path / "ds")
    assert [(r["x"], r["y"], r["label"], r["class"]) for r in rows] == [
        ("10", "12", "1", "MITE"), ("35", "35", "0.5", "INDET"), ("79", "5", "", "")]
    fails(["points", "--geojson", path, "--slides", tmp_path, "--out", tmp_path / "ds2"], tmp_path / "ds2", capsys,
          "--geojson", "--slide")


def test_binned_label_mode_rounds_soft_labels_to_the_nearest_of_0_half_and_1(tmp_path, slide):
    from patches.dataset import PatchDataset

    soft = ["0", "0.2", "0.333333", "0.5", "0.666667", "0.8", "1"]
    table = tmp_path / "cells.csv"
    table.write_text("slide,x,y,label\n" + "".join(f"s.png,{10 + 8 * i},30,{v}\n" for i, v in enumerate(soft)))
    points(tmp_path, table)
    data = PatchDataset(tmp_path / "ds", label_mode="binned")
    assert data.labels().tolist() == [0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    assert [float(data[i]["label"]) for i in range(7)] == [0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0]


def test_a_geojson_class_mapped_to_one_half_has_hard_label_1(tmp_path, slide):
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps([feature({"type": "Point", "coordinates": [10, 12]}, name)
                                for name in ("NOT", "INDET", "MITE")]))
    main(["points", "--geojson", str(path), "--slide", "s.png", "--slides", str(tmp_path), "--out",
          str(tmp_path / "ds"), "--label-map", SEED_MAP, "--size", "16", "--margin", "0"])
    assert [(r["label"], r["hard_label"]) for r in rows_of(tmp_path / "ds")] == [("0", "0"), ("0.5", "1"), ("1", "1")]


def test_a_tab_separated_csv_with_comma_separated_votes(tmp_path, slide):
    """A .csv whose header has tabs and no commas is read as tab-separated; its votes may be written 1,1,0."""
    table = tmp_path / "cells.csv"
    table.write_text("slide\tx\ty\tvotes\ns.png\t10\t10\t1,1,0\ns.png\t20\t20\t0,1\n")
    rows = points(tmp_path, table)
    assert [(r["votes"], r["label"], r["hard_label"]) for r in rows] == [
        ("1;1;0", "0.666667", "1"), ("0;1", "0.5", "1")]


def test_a_geojson_mark_on_the_slides_far_edge_is_outside():
    from patches.geojson import Mark, check_inside

    check_inside("cells.geojson", Mark(99.5, 0.0, None, "features[0].geometry"), "s", (100, 80))  # the last column
    for x, y in ((100.0, 10.0), (10.0, 80.0), (-0.5, 10.0)):
        with pytest.raises(UserError, match=r"cells.geojson: field 'features\[1\].geometry' .* lies outside slide s"):
            check_inside("cells.geojson", Mark(x, y, None, "features[1].geometry"), "s", (100, 80))
