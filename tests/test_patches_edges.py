"""Where patches are centred: MIDOG++ cells whose box straddles the image edge, sub-pixel point coordinates."""

from __future__ import annotations

import pytest

from conftest import MIDOG_JSON
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
