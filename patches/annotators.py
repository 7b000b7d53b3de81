"""Several annotators' point files -> cells with one vote per annotator (soft labels).

    mitosis-ldm data annotators --slides DIR --annotator alice=alice.geojson --annotator bob=bob/ \
        --radius-um 4 --out DIR [--absent not-mitotic|unknown] [--label-map Mitosis=1,Imposter=0]

Each annotator FILE is a QuPath GeoJSON export (one slide), a points CSV/TSV
(`x, y` [, `slide`] [, `label` or `class`]; without a `slide` column it covers
one slide), or a folder with one such file per slide. A file belongs to the
slide whose name, or name without suffix, is the file's name without its
annotation suffix (`001.geojson` and `001.tiff.geojson` both go with
`001.tiff`); a lone file goes with the only slide in --slides.

A mark's vote is its class through the label map; a mark without a class is a
mitotic vote (1). Marks of different annotators within the radius are the
same cell. Matching (`match_cells`) runs annotator by annotator, in the order
given: the next annotator's marks are paired one-to-one with the cells found
so far by optimal assignment (scipy's `linear_sum_assignment`, cost = distance
to the cell's mean position, pairs beyond the radius forbidden, the most pairs
first, then the least total distance), solved inside each connected group of
the cell-mark radius graph; unpaired marks start new cells. So a cell holds at
most one mark per annotator, and two cells closer than the radius are not
merged by a greedy nearest-neighbour choice. The assignment is optimal for each
annotator against the cells so far; over k > 2 annotators the result can
depend on their order. A cell's position is the mean of its marks.

Where an annotator marked nothing, `--absent not-mitotic` counts a 0 vote
(every annotator reviewed the whole slide) and `--absent unknown` counts no
vote (the `votes` entry is empty). `votes` lists the annotators' values in
--annotator order; `label` is their mean, `hard_label` the majority (ties
mitotic); `classes` the class names; `marked_by` how many annotators marked the
cell; `spread_px` the largest distance of a mark from the cell's position.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mitosis_ldm.errors import UserError

from .geojson import GEOJSON_SUFFIXES, Mark, check_inside, read_geojson
from .labelmap import class_value
from .slides import OPENSLIDE_SUFFIXES, PLAIN_SUFFIXES, open_slide
from .tables import number, read_csv

TABLE_SUFFIXES = (".csv", ".tsv", ".tab")
ABSENT = ("not-mitotic", "unknown")


@dataclass
class Vote:
    """One annotator's mark on a slide: position, value (mapped class), class name and where it was read."""

    x: float
    y: float
    value: float
    class_name: str
    mark: Mark
    path: Path


# -- matching -----------------------------------------------------------------

def optimal_pairs(centres: np.ndarray, points: np.ndarray, radius: float) -> list[tuple[int, int]]:
    """One-to-one (centre, point) pairs within `radius`: the most pairs, then the least total distance.

    Solved by `linear_sum_assignment` inside each connected group of the bipartite radius graph
    (cKDTree neighbours, `connected_components`), so large slides stay cheap.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    if len(centres) == 0 or len(points) == 0:
        return []
    near = cKDTree(centres).query_ball_tree(cKDTree(points), r=radius)
    rows = np.array([c for c, js in enumerate(near) for _ in js], dtype=np.int64)
    cols = np.array([j for js in near for j in js], dtype=np.int64)
    if len(rows) == 0:
        return []
    n_c = len(centres)
    graph = coo_matrix((np.ones(len(rows)), (rows, n_c + cols)), shape=(n_c + len(points),) * 2)
    _, group = connected_components(graph, directed=False)
    distance = np.linalg.norm(centres[rows] - points[cols], axis=1)
    pairs = []
    order = np.argsort(group[rows], kind="stable")  # edges grouped by component, one slice each
    rows, cols, distance = rows[order], cols[order], distance[order]
    _, starts = np.unique(group[rows], return_index=True)
    for sel in map(slice, starts, [*starts[1:], len(rows)]):
        if sel.stop - sel.start == 1:  # an isolated pair, the common case
            pairs.append((int(rows[sel.start]), int(cols[sel.start])))
            continue
        cs, c_index = np.unique(rows[sel], return_inverse=True)
        ps, p_index = np.unique(cols[sel], return_inverse=True)
        # a forbidden pair costs more than any set of allowed pairs, so the solver first maximises the count
        forbidden = radius * (min(len(cs), len(ps)) + 1) + 1.0
        cost = np.full((len(cs), len(ps)), forbidden)
        cost[c_index, p_index] = distance[sel]
        r, c = linear_sum_assignment(cost)
        pairs += [(int(cs[i]), int(ps[j])) for i, j in zip(r, c) if cost[i, j] < forbidden]
    return pairs


def match_cells(points: list[np.ndarray], radius: float) -> list[list[int | None]]:
    """Points per annotator (each (n_a, 2)) -> cells, each a list of one point index (or None) per annotator."""
    cells: list[list[int | None]] = []
    sums = np.zeros((0, 2))
    counts = np.zeros(0)
    for a, pts in enumerate(points):
        pts = np.asarray(pts, dtype=float).reshape(-1, 2)
        pairs = optimal_pairs(sums / np.maximum(counts, 1)[:, None], pts, radius) if len(cells) else []
        taken = set()
        for c, p in pairs:
            cells[c][a] = p
            sums[c] += pts[p]
            counts[c] += 1
            taken.add(p)
        new = [p for p in range(len(pts)) if p not in taken]
        for p in new:
            cell: list[int | None] = [None] * len(points)
            cell[a] = p
            cells.append(cell)
        sums = np.vstack([sums, pts[new]]) if new else sums
        counts = np.concatenate([counts, np.ones(len(new))])
    return cells


# -- reading -------------------------------------------------------------------

def parse_annotators(items: list[str]) -> list[tuple[str, Path]]:
    annotators: list[tuple[str, Path]] = []
    for item in items:
        name, sep, file = item.partition("=")
        name = name.strip()
        if not sep or not name or not file:
            raise UserError(f"--annotator: '{item}' is not NAME=FILE")
        if any(name == n for n, _ in annotators):
            raise UserError(f"--annotator: annotator name '{name}' is given twice")
        if not Path(file).exists():
            raise UserError(f"{file}: file not found (--annotator {name})")
        annotators.append((name, Path(file)))
    return annotators


def list_slides(slides) -> dict[str, Path]:
    """--slides: a folder of slides (or one slide file) -> {file name: path}."""
    slides = Path(slides)
    if slides.is_file():
        return {slides.name: slides}
    if not slides.is_dir():
        raise UserError(f"{slides}: --slides folder not found")
    found = {p.name: p for p in sorted(slides.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in OPENSLIDE_SUFFIXES | PLAIN_SUFFIXES}
    if not found:
        raise UserError(f"{slides}: --slides folder holds no slides or images")
    return found


def slide_for(key: str, slides: dict[str, Path], where: str) -> str:
    """The slide a file name (without annotation suffix) or a `slide` cell names: full name or name without suffix."""
    if key in slides:
        return key
    stems = [name for name in slides if Path(name).stem == key]
    if len(stems) == 1:
        return stems[0]
    what = "several slides" if stems else "no slide"
    raise UserError(f"{where} names {what} '{key}' in --slides ({', '.join(list(slides)[:5])}"
                    f"{', ...' if len(slides) > 5 else ''})")


def _file_slide(path: Path, slides: dict[str, Path], lone: bool) -> str:
    key = path.name[: -len(path.suffix)] if path.suffix else path.name
    if lone and len(slides) == 1 and key not in slides and all(Path(n).stem != key for n in slides):
        return next(iter(slides))
    return slide_for(key, slides, f"{path}: file name")


def _vote(label_map: dict[str, float], class_name: str | None, where: str) -> tuple[float, str]:
    if not class_name:
        return 1.0, ""  # a plain mark means the annotator saw a mitotic figure there
    return class_value(label_map, class_name, where), class_name


def _read_table(path: Path, slides: dict[str, Path], label_map, lone: bool) -> dict[str, list[Vote]]:
    raw = read_csv(path, ["x", "y"])
    by_slide: dict[str, list[Vote]] = {}
    default = None if "slide" in raw[0] else _file_slide(path, slides, lone)
    for i, row in enumerate(raw):
        line = i + 2
        slide = default or slide_for(row["slide"], slides, f"{path}: line {line} field 'slide'")
        x, y = number(path, line, "x", row["x"]), number(path, line, "y", row["y"])
        column = "label" if "label" in row else "class"
        value, name = _vote(label_map, row.get(column, ""), f"{path}: line {line} field '{column}'")
        mark = Mark(x, y, name, f"line {line} field 'x'/'y'")
        by_slide.setdefault(slide, []).append(Vote(x, y, value, name, mark, path))
    return by_slide


def _read_geojson(path: Path, slides: dict[str, Path], label_map, lone: bool) -> dict[str, list[Vote]]:
    slide = _file_slide(path, slides, lone)
    votes = []
    for mark in read_geojson(path):
        where = f"{path}: field '{mark.field.split('.geometry')[0]}.properties.classification.name'"
        value, name = _vote(label_map, mark.class_name, where)
        votes.append(Vote(mark.x, mark.y, value, name, mark, path))
    return {slide: votes}


def read_annotator(path: Path, slides: dict[str, Path], label_map: dict[str, float]) -> dict[str, list[Vote]]:
    """One annotator's FILE (GeoJSON, points table, or a folder of them) -> {slide name: votes}."""
    files = [path]
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")
                 and p.suffix.lower() in GEOJSON_SUFFIXES + TABLE_SUFFIXES]
        if not files:
            raise UserError(f"{path}: folder holds no annotation files "
                            f"({', '.join(GEOJSON_SUFFIXES + TABLE_SUFFIXES)})")
    by_slide: dict[str, list[Vote]] = {}
    for file in files:
        suffix = file.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            part = _read_table(file, slides, label_map, lone=not path.is_dir())
        elif suffix in GEOJSON_SUFFIXES:
            part = _read_geojson(file, slides, label_map, lone=not path.is_dir())
        else:
            raise UserError(f"{file}: unsupported annotation file '{suffix}' (GeoJSON {', '.join(GEOJSON_SUFFIXES)} "
                            f"or points table {', '.join(TABLE_SUFFIXES)})")
        for slide, votes in part.items():
            by_slide.setdefault(slide, []).extend(votes)
    return by_slide


# -- merging -------------------------------------------------------------------

def slide_radius(slide_path: Path, radius_um: float | None, radius_px: float | None):
    """(radius in level-0 pixels, the slide's mpp, its size) from --radius-um (needs the mpp) or --radius-px."""
    with open_slide(slide_path) as slide:
        mpp, size = slide.mpp, slide.size
    if radius_px is not None:
        return float(radius_px), mpp, size
    if not mpp:
        raise UserError(f"{slide_path}: field 'mpp' (openslide.mpp-x) is missing, so --radius-um cannot be "
                        f"converted to pixels; give --radius-px instead")
    return radius_um / mpp, mpp, size


def merge_slide(slide: str, size: tuple[int, int], votes: list[list[Vote]], radius: float,
                absent: str) -> list[dict]:
    """Rows (one per cell) for one slide from each annotator's votes (annotator order kept)."""
    for annotator_votes in votes:
        for vote in annotator_votes:
            check_inside(vote.path, vote.mark, slide, size)
    points = [np.array([[v.x, v.y] for v in vs], float).reshape(-1, 2) for vs in votes]
    cells = match_cells(points, radius)
    rows = []
    for members in cells:
        marked = [(a, votes[a][i]) for a, i in enumerate(members) if i is not None]
        centre = np.mean([[v.x, v.y] for _, v in marked], axis=0)
        values: list[float | None] = [None if i is None else votes[a][i].value for a, i in enumerate(members)]
        if absent == "not-mitotic":
            values = [0.0 if v is None else v for v in values]
        given = [v for v in values if v is not None]
        label = sum(given) / len(given)
        spread = max(float(np.hypot(v.x - centre[0], v.y - centre[1])) for _, v in marked)
        rows.append({
            "source": "annotators", "slide": slide,
            "x": min(int(round(centre[0])), size[0] - 1), "y": min(int(round(centre[1])), size[1] - 1),
            "label": label, "votes": ";".join("" if v is None else f"{v:g}" for v in values),
            "hard_label": int(label >= 0.5),  # majority; ties count as mitotic
            "classes": ";".join("" if i is None else votes[a][i].class_name for a, i in enumerate(members)),
            "marked_by": len(marked), "spread_px": round(spread, 2),
        })
    rows.sort(key=lambda r: (r["y"], r["x"]))
    for n, row in enumerate(rows):
        row["id"] = f"{slide}:{n}"
    return rows


def collect(annotators: list[tuple[str, Path]], slides_arg, radius_um: float | None, radius_px: float | None,
            absent: str, label_map: dict[str, float]):
    """Read, check and match everything. Returns ({slide: (path, rows)}, metadata for dataset.json)."""
    if absent not in ABSENT:
        raise UserError(f"--absent: must be {' or '.join(ABSENT)}, got '{absent}'")
    for flag, value in (("--radius-um", radius_um), ("--radius-px", radius_px)):
        if value is not None and not value > 0:
            raise UserError(f"{flag}: must be > 0, got {value}")
    slides = list_slides(slides_arg)
    per_annotator = [read_annotator(path, slides, label_map) for _, path in annotators]
    by_slide: dict[str, tuple[Path, list[dict]]] = {}
    radius_by_slide, mpp_by_slide = {}, {}
    marks = {name: 0 for name, _ in annotators}
    marked_by: Counter = Counter()
    for slide in sorted({s for part in per_annotator for s in part}):
        path = slides[slide]
        radius, mpp, size = slide_radius(path, radius_um, radius_px)
        votes = [part.get(slide, []) for part in per_annotator]
        for (name, _), vs in zip(annotators, votes):
            marks[name] += len(vs)
        rows = merge_slide(slide, size, votes, radius, absent)
        marked_by.update(r["marked_by"] for r in rows)
        by_slide[slide] = (path, rows)
        radius_by_slide[slide], mpp_by_slide[slide] = round(radius, 3), mpp
    if not by_slide:
        raise UserError("--annotator: the annotators' files hold no marks (empty source)")
    mpps = set(mpp_by_slide.values())
    meta = {
        "annotators": [name for name, _ in annotators],
        "annotator_files": {name: str(path) for name, path in annotators},
        "absent": absent,
        "label_map": label_map,
        "radius_um": radius_um if radius_um is not None else _um(radius_px, mpps),
        "radius_px": radius_by_slide,
        "slide_mpp": mpp_by_slide,
        "mpp": mpps.pop() if len(mpps) == 1 else None,
        "matching": {
            "method": "sequential optimal assignment (linear_sum_assignment per connected group, max pairs "
                      "then min distance to the cell mean), one mark per annotator per cell",
            "cells": sum(marked_by.values()),
            "marks_per_annotator": marks,
            "cells_marked_by": {str(k): marked_by.get(k, 0) for k in range(1, len(annotators) + 1)},
        },
    }
    return by_slide, meta


def _um(radius_px: float | None, mpps: set) -> float | None:
    if radius_px is None or len(mpps) != 1 or None in mpps:
        return None
    return round(radius_px * next(iter(mpps)), 4)
