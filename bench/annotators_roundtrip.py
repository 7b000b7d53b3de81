"""Round trip from real votes: MIDOG++ experts -> one QuPath GeoJSON per expert -> `data annotators` -> the
JSON's labels.

    python bench/annotators_roundtrip.py [--images 361,146,484] [--out runs/annotators/roundtrip] [--overwrite]

For each chosen image of ../shared/fixtures/midogpp/MIDOG++.json and each expert
k (position k of `labels`), writes `experts/expert-k/IMAGE.geojson` with the
cells expert k called mitotic (label 1), every point jittered by up to 2 px
(every third cell drawn as a 12-px polygon around the jittered point, as
QuPath users outline nuclei). The images are not here: stand-in slides of the
listed size are written as tiled TIFFs (0.25 um/px, constant tiles, a
unique-colour 7x7 dot at each JSON cell). Then runs

    mitosis-ldm data annotators --slides SLIDES --annotator expert-0=DIR ... --radius-um 4 --absent not-mitotic

and checks every cell that at least one expert marked comes back once, at its
place (the patch centre shows the cell's dot), with the JSON's soft label
(fraction of `labels` == 1). Prints the counts as JSON.

With `--absent not-mitotic` an unmarked expert votes 0, so the check is exact
only for images where every marked cell has all three experts' votes (MIDOG++
asks the third expert only on some cells; a (1, 1) cell would come back 2/3).
The default images are such images; `--images` with others reports the
mismatches instead.

`--variant all-votes` writes every cell an expert voted on (class `Mitotic figure`
or `Non-mitotic figure`) and merges with `--absent unknown`: exact for every cell
of every image, including the dense ones (e.g. `--images 290,267,285`, lymphosarcoma
with 120-443 cells, mitotic figures 36 px apart).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MIDOG_JSON = REPO.parent / "shared" / "fixtures" / "midogpp" / "MIDOG++.json"
MPP = 0.25
TILE = 512
CLASS = "Mitotic figure"
NOT_CLASS = "Non-mitotic figure"
BACKGROUND = (231, 182, 212)


def load(json_path, image_ids):
    data = json.loads(Path(json_path).read_text())
    images = {im["id"]: im for im in data["images"]}
    cells = defaultdict(list)
    for ann in data["annotations"]:
        if ann["image_id"] in image_ids:
            x1, y1, x2, y2 = ann["bbox"]
            im = images[ann["image_id"]]
            centre = (min(max((x1 + x2) / 2, 0), im["width"] - 1), min(max((y1 + y2) / 2, 0), im["height"] - 1))
            cells[ann["image_id"]].append({"id": ann["id"], "x": centre[0], "y": centre[1],
                                           "votes": [int(v == 1) for v in ann["labels"]]})
    return {i: images[i] for i in image_ids}, cells


def dot_colour(n: int) -> tuple[int, int, int]:
    return (n % 200 + 1, (n // 200) % 200 + 1, 9)


def write_slide(path: Path, width: int, height: int, dots: list[tuple[float, float, tuple]]) -> None:
    """A tiled TIFF with mpp 0.25: constant tiles (compressed once), 7x7 coloured dots where cells are."""
    import tifffile

    plain = np.empty((TILE, TILE, 3), np.uint8)
    plain[:] = BACKGROUND
    plain_bytes = zlib.compress(plain.tobytes())
    by_tile = defaultdict(list)
    for x, y, colour in dots:
        by_tile[(int(y) // TILE, int(x) // TILE)].append((int(round(x)), int(round(y)), colour))

    def tiles():
        for ty in range(math.ceil(height / TILE)):
            for tx in range(math.ceil(width / TILE)):
                if (ty, tx) not in by_tile:
                    yield plain_bytes
                    continue
                tile = plain.copy()
                for x, y, colour in by_tile[(ty, tx)]:
                    lx, ly = x - tx * TILE, y - ty * TILE
                    tile[max(0, ly - 3): ly + 4, max(0, lx - 3): lx + 4] = colour
                yield zlib.compress(tile.tobytes())

    tifffile.imwrite(path, tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="zlib", resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")


def feature(x: float, y: float, polygon: bool, name: str = CLASS) -> dict:
    if polygon:  # a nucleus outline around the point; its centroid is the point
        ring = [[x + 12 * math.cos(t), y + 12 * math.sin(t)] for t in np.linspace(0, 2 * math.pi, 17)[:-1]]
        geometry = {"type": "Polygon", "coordinates": [ring + [ring[0]]]}
    else:
        geometry = {"type": "Point", "coordinates": [x, y]}
    return {"type": "Feature", "id": f"{x:.1f}-{y:.1f}", "geometry": geometry,
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}}}


def write_experts(folder: Path, images: dict, cells: dict, experts: int, jitter: float, seed: int,
                  all_votes: bool = False) -> list[Path]:
    """experts/expert-k/IMAGE.geojson: the cells expert k called mitotic (or voted on), jittered by up to
    `jitter` px."""
    rng = np.random.default_rng(seed)
    dirs = []
    for k in range(experts):
        expert_dir = folder / f"expert-{k}"
        expert_dir.mkdir(parents=True)
        dirs.append(expert_dir)
        for image_id, image in images.items():
            features = []
            voted = [c for c in cells[image_id] if len(c["votes"]) > k and (all_votes or c["votes"][k] == 1)]
            for n, cell in enumerate(voted):
                angle, radius = rng.uniform(0, 2 * math.pi), jitter * math.sqrt(rng.uniform())
                features.append(feature(cell["x"] + radius * math.cos(angle), cell["y"] + radius * math.sin(angle),
                                        polygon=n % 3 == 2, name=CLASS if cell["votes"][k] else NOT_CLASS))
            # QuPath writes a FeatureCollection (or a bare list with "Export as FeatureCollection" unticked)
            doc = {"type": "FeatureCollection", "features": features} if k % 2 == 0 else features
            (expert_dir / f"{Path(image['file_name']).stem}.geojson").write_text(json.dumps(doc))
    return dirs


def prepare(folder: Path, images: dict, cells: dict, jitter: float = 2.0, seed: int = 0,
            all_votes: bool = False) -> list[str]:
    """Slides + expert GeoJSONs under `folder`; returns the `data annotators` arguments (without --out)."""
    experts = max(len(c["votes"]) for per in cells.values() for c in per)
    slides = folder / "slides"
    slides.mkdir(parents=True)
    for image_id, image in images.items():
        write_slide(slides / image["file_name"], image["width"], image["height"],
                    [(c["x"], c["y"], dot_colour(c["id"])) for c in cells[image_id]])
    dirs = write_experts(folder / "experts", images, cells, experts, jitter, seed, all_votes)
    args = ["annotators", "--slides", str(slides), "--radius-um", "4",
            "--absent", "unknown" if all_votes else "not-mitotic",
            "--label-map", f"{CLASS}=1" + (f",{NOT_CLASS}=0" if all_votes else ""), "--size", "32", "--margin", "4"]
    for d in dirs:
        args += ["--annotator", f"{d.name}={d}"]
    return args


def compare(out: Path, images: dict, cells: dict, all_votes: bool = False) -> dict:
    """Match the dataset's cells to the JSON's marked (or all) cells; count what came back right."""
    from scipy.spatial import cKDTree

    with open(out / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    patches = np.load(out / "patches.npy", mmap_mode="r")
    centre = patches.shape[1] // 2
    result = {"images": {}, "marked_cells": 0, "cells_out": len(rows), "matched": 0, "label_equal": 0,
              "centre_on_cell": 0, "max_offset_px": 0.0}
    by_slide = defaultdict(list)
    for i, row in enumerate(rows):
        by_slide[row["slide"]].append((i, row))
    for image_id, image in images.items():
        marked = [c for c in cells[image_id] if all_votes or 1 in c["votes"]]
        got = by_slide.get(image["file_name"], [])
        counts = {"marked_cells": len(marked), "cells_out": len(got), "matched": 0, "label_equal": 0,
                  "cells_by_mitotic_votes": dict(sorted(Counter(sum(c["votes"]) for c in marked).items()))}
        if marked and got:
            tree = cKDTree([[c["x"], c["y"]] for c in marked])
            dist, nearest = tree.query([[float(r["x"]), float(r["y"])] for _, r in got])
            once = Counter(nearest.tolist())
            for (i, row), d, j in zip(got, dist, nearest):
                if d > 3.5 or once[j] != 1:
                    continue
                counts["matched"] += 1
                cell = marked[j]
                counts["label_equal"] += abs(float(row["label"]) - sum(cell["votes"]) / len(cell["votes"])) < 1e-6
                result["centre_on_cell"] += tuple(patches[i, centre, centre]) == dot_colour(cell["id"])
                result["max_offset_px"] = max(result["max_offset_px"], round(float(d), 2))
        result["images"][image["file_name"]] = counts
        for key in ("marked_cells", "matched", "label_equal"):
            result[key] += counts[key]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=MIDOG_JSON)
    parser.add_argument("--images", default="361,146,484", help="MIDOG++ image ids, comma-separated")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "annotators" / "roundtrip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=["mitotic", "all-votes"], default="mitotic",
                        help="experts' files hold their mitotic calls (default) or every cell they voted on")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from mitosis_ldm.io import check_new_output
    from patches.cli import main as data_main

    folder = check_new_output(args.out, args.overwrite)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    ids = [int(i) for i in args.images.split(",")]
    images, cells = load(args.json, ids)
    all_votes = args.variant == "all-votes"
    command = prepare(folder / "inputs", images, cells, seed=args.seed, all_votes=all_votes)
    command += ["--out", str(folder / "dataset")]
    print("mitosis-ldm data " + shlex.join(command), file=sys.stderr)
    data_main(command)
    result = {"command": "mitosis-ldm data " + shlex.join(command),
              **compare(folder / "dataset", images, cells, all_votes)}
    result["dataset_matching"] = json.loads((folder / "dataset" / "dataset.json").read_text())["matching"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
