"""`data annotators`: optimal one-to-one matching of annotators' marks, votes, the MIDOG++ round trip, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import MIDOG_JSON, load_bench
from patches.annotators import match_cells
from patches.cli import main
from patches.inspect import summarise
from test_patches_bad_input import fails


def rows_of(out) -> list[dict]:
    with open(out / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def mpp_tiff(path, width=400, height=300, mpp=0.25):
    """A tiled TIFF that OpenSlide reads with openslide.mpp-x = mpp."""
    tifffile.imwrite(path, np.full((height, width, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     compression="zlib", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def geojson(path, points, as_list=False):
    """QuPath-style export: one Point feature per (x, y[, class])."""
    features = []
    for p in points:
        props = {"objectType": "annotation"}
        if len(p) > 2:
            props["classification"] = {"name": p[2], "color": [255, 0, 0]}
        features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": list(p[:2])},
                         "properties": props})
    path.write_text(json.dumps(features if as_list else {"type": "FeatureCollection", "features": features}))
    return path


def greedy_pairs(a: np.ndarray, b: np.ndarray, radius: float) -> list[tuple[int, int]]:
    """The baseline the issue warns about: take the closest remaining pair first, while within the radius."""
    d = np.linalg.norm(a[:, None] - b[None], axis=2)
    pairs, used_a, used_b = [], set(), set()
    for i, j in sorted(np.ndindex(*d.shape), key=lambda ij: d[ij]):
        if d[i, j] <= radius and i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return pairs


# -- matching ------------------------------------------------------------------

def test_optimal_assignment_pairs_close_cells_where_greedy_fails():
    # two true cells 6 px apart, radius 6: A marks them at x=3 and x=10, B at x=0 and x=5
    a = np.array([[3.0, 0.0], [10.0, 0.0]])
    b = np.array([[0.0, 0.0], [5.0, 0.0]])
    radius = 6.0
    greedy = greedy_pairs(a, b, radius)
    assert greedy == [(0, 1)]  # a0-b1 (2 px) first, then a1 and b0 (10 px apart) are left as two lone cells
    cells = match_cells([a, b], radius)
    assert sorted(cells) == [[0, 0], [1, 1]]  # both cells marked by both annotators


def test_close_pairs_optimal_beats_greedy_in_bulk():
    """500 pairs of cells 5 px apart, each marked by two annotators with up to 2.5 px error, radius 6 px."""
    rng = np.random.default_rng(0)
    right = {"optimal": 0, "greedy": 0}
    for _ in range(500):
        angle = rng.uniform(0, 2 * np.pi)
        cells = np.array([[0.0, 0.0], [5 * np.cos(angle), 5 * np.sin(angle)]])

        def marks():
            r, t = 2.5 * np.sqrt(rng.uniform(size=2)), rng.uniform(0, 2 * np.pi, 2)
            return cells + np.stack([r * np.cos(t), r * np.sin(t)], 1)

        a, b = marks(), marks()
        right["optimal"] += sorted(match_cells([a, b], 6.0)) == [[0, 0], [1, 1]]
        right["greedy"] += sorted(greedy_pairs(a, b, 6.0)) == [(0, 0), (1, 1)]
    print(right)  # measured: optimal 499, greedy 481
    assert right["optimal"] >= 495 and right["greedy"] < right["optimal"] - 10


def test_three_annotators_recover_cells_one_mark_each():
    rng = np.random.default_rng(3)
    grid = np.array([[x, y] for x in range(0, 200, 9) for y in range(0, 60, 9)], float)  # cells 9 px apart
    truth = grid + rng.uniform(-1, 1, grid.shape)
    radius = 4.0
    marks, owners = [], []
    for k in range(3):
        keep = rng.permutation(len(truth))[: int(0.8 * len(truth))]  # each annotator misses a fifth
        marks.append(truth[keep] + rng.uniform(-1.4, 1.4, (len(keep), 2)))
        owners.append(keep)
    cells = match_cells(marks, radius)
    expected = {tuple(sorted((k, int(np.flatnonzero(owners[k] == t)[0])) for k in range(3) if t in owners[k]))
                for t in range(len(truth)) if any(t in o for o in owners)}
    got = {tuple((k, i) for k, i in enumerate(c) if i is not None) for c in cells}
    assert got == expected
    assert all(sum(i is not None for i in c) >= 1 for c in cells)


def test_annotators_end_to_end_votes_and_stats(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    mpp_tiff(slides / "s1.tif")
    alice = geojson(tmp_path / "alice.geojson", [(50, 50, "MITE"), (100, 100, "INDET"), (200, 150, "MITE")])
    bob = geojson(tmp_path / "bob.geojson", [(52, 49, "MITE"), (203, 152, "NOT")], as_list=True)
    carol = tmp_path / "carol.tsv"
    carol.write_text("x\ty\tclass\n101\t99\tMITE\n300\t200\t\n")  # a mark without a class votes 1
    out = tmp_path / "ds"
    argv = ["annotators", "--slides", slides, "--annotator", f"alice={alice}", "--annotator", f"bob={bob}",
            "--annotator", f"carol={carol}", "--radius-um", "4", "--label-map", "NOT=0,INDET=0.5,MITE=1",
            "--size", "16", "--margin", "2", "--workers", "1"]
    main([str(a) for a in argv + ["--out", out]])
    rows = rows_of(out)
    got = {(int(r["x"]), int(r["y"])): (r["votes"], float(r["label"]), r["marked_by"]) for r in rows}
    assert got == {(51, 50): ("1;1;0", pytest.approx(2 / 3), "2"), (100, 100): ("0.5;0;1", 0.5, "2"),
                   (202, 151): ("1;0;0", pytest.approx(1 / 3), "2"), (300, 200): ("0;0;1", pytest.approx(1 / 3), "1")}
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["annotators"] == ["alice", "bob", "carol"]
    assert meta["radius_um"] == 4 and meta["radius_px"] == {"s1.tif": 16.0}
    assert meta["matching"]["cells_marked_by"] == {"1": 1, "2": 3, "3": 0}
    summary = summarise(out)  # categorical votes (0.5) are summarised, not rejected
    assert summary["votes"]["patches_with_votes"] == 4

    unknown = tmp_path / "unknown"
    main([str(a) for a in argv + ["--out", unknown, "--absent", "unknown"]])
    got = {(int(r["x"]), int(r["y"])): (r["votes"], float(r["label"])) for r in rows_of(unknown)}
    assert got[(51, 50)] == ("1;1;", 1.0) and got[(300, 200)] == (";;1", 1.0) and got[(202, 151)] == ("1;0;", 0.5)


def test_folders_tables_and_per_slide_radius(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    mpp_tiff(slides / "s1.tif")
    mpp_tiff(slides / "s2.tif", mpp=0.5)  # 4 um = 8 px here, 16 px on s1
    alice = tmp_path / "alice"
    alice.mkdir()
    geojson(alice / "s1.geojson", [(100, 100), (200, 100)])
    geojson(alice / "s2.tif.geojson", [(100, 100)])  # QuPath names exports after the image file
    bob = tmp_path / "bob.csv"
    bob.write_text("slide,x,y,label\ns1,110,100,1\ns1,200,100,0\ns2.tif,110,100,1\n")
    out = tmp_path / "ds"
    main(["annotators", "--slides", str(slides), "--annotator", f"alice={alice}", "--annotator", f"bob={bob}",
          "--radius-um", "4", "--out", str(out), "--size", "16", "--margin", "0", "--workers", "1"])
    got = sorted((r["slide"], r["x"], r["votes"]) for r in rows_of(out))
    # s1: 10 px apart is one cell (radius 16 px); s2: 10 px apart is two cells (radius 8 px)
    assert got == [("s1.tif", "105", "1;1"), ("s1.tif", "200", "1;0"), ("s2.tif", "100", "1;0"),
                   ("s2.tif", "110", "0;1")]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["radius_px"] == {"s1.tif": 16.0, "s2.tif": 8.0} and meta["mpp"] is None
    assert meta["matching"]["cells_marked_by"] == {"1": 2, "2": 2}


# -- round trip from real votes ------------------------------------------------------

def test_midog_round_trip_one_image(tmp_path):
    if not MIDOG_JSON.exists():
        pytest.skip(f"{MIDOG_JSON} not available")
    roundtrip = load_bench("annotators_roundtrip")
    images, cells = roundtrip.load(MIDOG_JSON, [146])  # human breast cancer; all three experts mark cells
    argv = roundtrip.prepare(tmp_path / "inputs", images, cells, seed=1)
    main(argv + ["--out", str(tmp_path / "ds"), "--workers", "1"])
    result = roundtrip.compare(tmp_path / "ds", images, cells)
    marked = sum(1 in c["votes"] for c in cells[146])
    assert marked == 6
    assert result["cells_out"] == result["matched"] == result["label_equal"] == result["centre_on_cell"] == marked


# -- bad input -----------------------------------------------------------------

@pytest.fixture
def setup(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    mpp_tiff(slides / "s1.tif")
    good = geojson(tmp_path / "good.geojson", [(50, 50)])  # unclassified: a mitotic vote
    return tmp_path, slides, good


def run_bad(tmp_path, capsys, argv, *needles):
    out = tmp_path / "ds"
    return fails(["annotators", *argv, "--out", out], out, capsys, *needles)


def test_bad_geojson_not_a_feature_collection(setup, capsys):
    tmp_path, slides, good = setup
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    run_bad(tmp_path, capsys, ["--slides", slides, "--annotator", f"a={good}", "--annotator", f"b={bad}",
                               "--radius-px", "8"], "bad.geojson", "field 'type'", "FeatureCollection")


def test_bad_feature_without_geometry(setup, capsys):
    tmp_path, slides, good = setup
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
        {"type": "Feature", "properties": {"classification": {"name": "MITE"}}}]}))
    run_bad(tmp_path, capsys, ["--slides", slides, "--annotator", f"a={good}", "--annotator", f"b={bad}",
                               "--radius-px", "8"], "bad.geojson", "features[1].geometry", "without geometry")


def test_bad_class_missing_from_label_map(setup, capsys):
    tmp_path, slides, good = setup
    other = geojson(tmp_path / "other.geojson", [(50, 50, "MITE"), (80, 80, "Mitosis?")])
    run_bad(tmp_path, capsys, ["--slides", slides, "--annotator", f"a={good}", "--annotator", f"b={other}",
                               "--radius-px", "8", "--label-map", "NOT=0,MITE=1"],
            "other.geojson", "features[1].properties.classification.name", "Mitosis?", "label map")


def test_bad_slide_without_mpp_with_radius_um(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    Image.fromarray(np.full((100, 120, 3), 200, np.uint8)).save(slides / "plain.png")
    good = geojson(tmp_path / "plain.geojson", [(50, 50)])
    run_bad(tmp_path, capsys, ["--slides", slides, "--annotator", f"a={good}", "--radius-um", "4"],
            "plain.png", "field 'mpp'", "--radius-px")
    main(["annotators", "--slides", str(slides), "--annotator", f"a={good}", "--radius-px", "16",
          "--out", str(tmp_path / "ok"), "--size", "16", "--margin", "0"])  # the suggested flag works
    assert [r["votes"] for r in rows_of(tmp_path / "ok")] == ["1"]


def test_bad_annotator_named_twice(setup, capsys):
    tmp_path, slides, good = setup
    run_bad(tmp_path, capsys, ["--slides", slides, "--annotator", f"a={good}", "--annotator", f"a={good}",
                               "--radius-px", "8"], "--annotator", "'a'", "twice")


def test_bad_point_outside_the_slide(setup, capsys):
    tmp_path, slides, good = setup
    outside = geojson(tmp_path / "outside.geojson", [(50, 50, "MITE"), (399.5, 310, "MITE")])
    run_bad(tmp_path, capsys, ["--slides", slides, "--annotator", f"a={good}", "--annotator", f"b={outside}",
                               "--radius-px", "8", "--label-map", "MITE=1"],
            "outside.geojson", "features[1].geometry.coordinates", "outside slide s1.tif", "400x300")


def test_an_even_split_of_votes_is_a_hard_label_of_1(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    mpp_tiff(slides / "s1.tif")
    alice = geojson(tmp_path / "alice.geojson", [(50, 50, "MITE"), (150, 100, "MITE"), (250, 200, "NOT")])
    bob = geojson(tmp_path / "bob.geojson", [(52, 50, "NOT"), (152, 100, "MITE"), (252, 200, "NOT")])
    main(["annotators", "--slides", str(slides), "--annotator", f"alice={alice}", "--annotator", f"bob={bob}",
          "--radius-px", "8", "--label-map", "NOT=0,MITE=1", "--out", str(tmp_path / "ds"), "--size", "16",
          "--margin", "0", "--workers", "1"])
    got = {(r["x"], r["y"]): (r["votes"], r["label"], r["hard_label"]) for r in rows_of(tmp_path / "ds")}
    assert got == {("51", "50"): ("1;0", "0.5", "1"), ("151", "100"): ("1;1", "1", "1"),
                   ("251", "200"): ("0;0", "0", "0")}  # ties count as mitotic


@pytest.mark.parametrize("corner", [float("nan"), float("inf")])
def test_bad_outline_with_a_coordinate_that_is_not_finite(setup, capsys, corner):
    """shapely built the ring and numpy warned on stderr before the error line."""
    import warnings

    tmp_path, slides, good = setup
    bad = tmp_path / "bad.geojson"
    ring = [[10, 10], [20, 10], [20, corner], [10, 20], [10, 10]]
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_bad(tmp_path, capsys, ["--slides", slides, "--annotator", f"a={good}", "--annotator", f"b={bad}",
                                   "--radius-px", "8"], "bad.geojson", "field 'features[0].geometry.coordinates'",
                "must hold finite numbers")
