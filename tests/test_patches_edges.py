"""Where patches are centred: MIDOG++ cells whose box straddles the image edge, sub-pixel point coordinates."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from conftest import MIDOG_JSON
from patches.cli import main
from patches.midog import read_midog


def test_midog_cells_whose_box_straddles_the_edge_are_centred_on_the_edge_pixel(tmp_path):
    """MIDOG++ has two such cells: 15363 on image 305 (bbox x from -27) and 15728 on image 309 (bbox y from -30)."""
    if not MIDOG_JSON.exists():
        pytest.skip(f"{MIDOG_JSON} not available")
    for name in ("305.tiff", "309.tiff"):
        (tmp_path / name).write_bytes(b"")  # parsing needs the files to exist, not their pixels
    by_slide, sizes = read_midog(MIDOG_JSON, tmp_path, skip_missing=True)
    assert sorted(by_slide) == ["305.tiff", "309.tiff"] and sizes["305.tiff"] == [6447, 4835]
    rows = {r["id"]: r for _, slide_rows in by_slide.values() for r in slide_rows}
    assert len(rows) == 57 + 236
    # bbox [-27, 2391, 23, 2441]: centre (-2, 2416), clamped onto column 0
    assert (rows["midog-15363"]["x"], rows["midog-15363"]["y"]) == (0, 2416)
    # bbox [4186, -30, 4236, 20]: centre (4211, -5), clamped onto row 0
    assert (rows["midog-15728"]["x"], rows["midog-15728"]["y"]) == (4211, 0)
    assert all(0 <= r["x"] < 6447 and 0 <= r["y"] < 4835 for r in rows.values())


def test_points_with_sub_pixel_coordinates_are_centred_on_the_nearest_pixel(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    (tmp_path / "cells.csv").write_text("slide,x,y,label\nimg.png,30.6,20.4,1\nimg.png,40.2,35.7,0\n")
    main(["points", "--csv", str(tmp_path / "cells.csv"), "--slides", str(tmp_path), "--out", str(tmp_path / "ds"),
          "--size", "8", "--margin", "0", "--workers", "1"])
    with open(tmp_path / "ds" / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["x"], r["y"]) for r in rows] == [("31", "20"), ("40", "36")]
    patches = np.load(tmp_path / "ds" / "patches.npy")
    assert np.array_equal(patches[0], pixels[20 - 4: 20 + 4, 31 - 4: 31 + 4])
    assert np.array_equal(patches[1], pixels[36 - 4: 36 + 4, 40 - 4: 40 + 4])
