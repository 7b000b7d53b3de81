"""`data detect` on painted slides: tiles, pyramid levels (and `data points --level`), areas in microns, --max."""

from __future__ import annotations

import numpy as np
import tifffile
from PIL import Image

from patches.cli import main
from test_patches_sources import rows_of

STROMA, NUCLEUS = (235, 170, 205), (75, 55, 140)


def painted(h: int, w: int, discs, seed: int = 0) -> np.ndarray:
    """Pink stroma with dark purple discs [(x, y, radius), ...], (h, w, 3) uint8."""
    pixels = np.empty((h, w, 3), np.float32)
    pixels[:] = STROMA
    pixels += np.random.default_rng(seed).normal(0, 4, pixels.shape)
    yy, xx = np.mgrid[:h, :w]
    for x, y, r in discs:
        pixels[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = NUCLEUS
    return pixels.clip(0, 255).astype(np.uint8)


def found(out) -> np.ndarray:
    return np.array([[int(r["x"]), int(r["y"])] for r in rows_of(out)]).reshape(-1, 2)


def assert_each_found_once(points: np.ndarray, centres, tolerance: int = 2) -> None:
    assert len(points) == len(centres), (len(points), len(centres))
    for x, y in centres:
        assert np.abs(points - [x, y]).sum(1).min() <= tolerance, (x, y)


def test_nuclei_on_and_between_tile_borders_are_each_found_once(tmp_path):
    """128-pixel tiles: discs straddle the borders at x, y = 128 and 256 and lie in the overlaps around them."""
    xs, ys = (30, 70, 110, 128, 146, 190, 230, 256, 274, 330), (30, 100, 128, 146, 200, 256, 274)
    centres = [(x, y) for y in ys for x in xs]
    Image.fromarray(painted(300, 380, [(x, y, 6) for x, y in centres])).save(tmp_path / "tissue.png")
    main(["detect", "--slide", str(tmp_path / "tissue.png"), "--out", str(tmp_path / "ds"), "--size", "16",
          "--set", "detect.tile=128"])
    assert_each_found_once(found(tmp_path / "ds"), centres)


def write_pyramid(path, level0: np.ndarray, mpp: float) -> None:
    """A tiled TIFF with a half-size second level, which OpenSlide reads as a two-level pyramid with its mpp."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(128, 128), photometric="rgb", compression="zlib",
                  resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        tif.write(np.ascontiguousarray(level0[::2, ::2]), tile=(128, 128), photometric="rgb", compression="zlib",
                  subfiletype=1)


def test_level_1_detects_with_its_own_microns_per_pixel_and_reports_level_0_centres(tmp_path):
    """0.25 um/px at level 0, so 0.5 at level 1: a disc of radius 6 px there (28 um^2) is a nucleus, and its row
    gives the level-0 centre."""
    centres = [(x, y) for y in range(60, 560, 100) for x in range(60, 760, 100)]  # level 0, even
    write_pyramid(tmp_path / "slide.tiff", painted(600, 800, [(x, y, 12) for x, y in centres]), mpp=0.25)
    out = tmp_path / "ds"
    main(["detect", "--slide", str(tmp_path / "slide.tiff"), "--out", str(out), "--level", "1", "--size", "16",
          "--margin", "0"])
    assert_each_found_once(found(out), centres, tolerance=3)
    patches = np.load(out / "patches.npy")
    assert (patches[:, 6:10, 6:10].mean(axis=(1, 2, 3)) < 120).all()  # a nucleus at every centre


def test_points_at_level_1_are_cut_from_the_half_size_level_around_the_halved_centre(tmp_path):
    level0 = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    write_pyramid(tmp_path / "slide.tiff", level0, mpp=0.25)
    (tmp_path / "cells.csv").write_text("slide,x,y,label\nslide.tiff,120,80,1\n")
    out = tmp_path / "ds"
    main(["points", "--csv", str(tmp_path / "cells.csv"), "--slides", str(tmp_path), "--out", str(out),
          "--level", "1", "--size", "16", "--margin", "2"])
    level1 = level0[::2, ::2]
    assert np.array_equal(np.load(out / "patches.npy")[0], level1[40 - 10: 40 + 10, 60 - 10: 60 + 10])


def test_area_limits_are_square_microns(tmp_path):
    """0.5 um/px: a disc of 11 px radius (95 um^2) is a nucleus, one of 15 px (177 um^2) is over max_area_um2."""
    small = [(x, 60) for x in range(60, 400, 80)]
    large = [(x, 200) for x in range(60, 400, 80)]
    discs = [(x, y, 11) for x, y in small] + [(x, y, 15) for x, y in large]
    Image.fromarray(painted(280, 440, discs)).save(tmp_path / "tissue.png")
    main(["detect", "--slide", str(tmp_path / "tissue.png"), "--out", str(tmp_path / "ds"), "--size", "16"])
    assert_each_found_once(found(tmp_path / "ds"), small)


def test_max_keeps_a_seeded_sample_from_the_whole_slide(tmp_path):
    centres = [(x, y) for y in range(40, 400, 70) for x in range(40, 480, 80)]  # 6 rows of 6
    Image.fromarray(painted(420, 500, [(x, y, 7) for x, y in centres])).save(tmp_path / "tissue.png")
    picks = {}
    for seed in (0, 1):
        out = tmp_path / f"ds{seed}"
        main(["detect", "--slide", str(tmp_path / "tissue.png"), "--out", str(out), "--size", "16", "--max", "8",
              "--seed", str(seed)])
        picks[seed] = {(int(r["x"]), int(r["y"])) for r in rows_of(out)}
        assert len(picks[seed]) == 8
        near = [min(abs(x - cx) + abs(y - cy) for cx, cy in centres) for x, y in picks[seed]]
        assert max(near) <= 2
        assert max(y for _, y in picks[seed]) > 110  # not only the first rows in reading order
    assert picks[0] != picks[1]
