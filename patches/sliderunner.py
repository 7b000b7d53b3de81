"""CCMCT / MITOS_WSI_CCMCT: a SlideRunner SQLite database + Aperio slides -> patch rows per slide.

    mitosis-ldm data sliderunner --db CCMCT_ODAEL.sqlite --slides DIR --out DIR \
        [--mitotic-class 2] [--lookalike-class 7] [--include-class 3 ...]

Schema (tables and the columns read): Slides(uid, filename), Annotations(uid,
slide, type, agreedClass[, deleted]), Annotations_coordinates(annoId,
coordinateX, coordinateY), Annotations_label(person, class, annoId),
Classes(uid, name).

What each part means (the policy; everything left out is counted, and the
counts are printed on one line at the end and kept in dataset.json `left_out`):
- classes: the mitotic class (ODAEL 2) gives hard_label 1, the look-alike class
  (7) hard_label 0 (an imposter, a hard negative); `--include-class` adds more
  hard negatives (e.g. 3 tumour cell). Other classes (1 granulocyte, 3 tumour
  cell by default) are not nuclei this dataset is about: left out, per class.
- annotation types: cells are points. Spots (type 1, special spot 4) and
  circles (5) give a centre (the mean of their coordinates); rectangles (2) and
  polygons (3) outline regions, not cells: left out. No `type` column: all spots.
- an annotation whose agreedClass is NULL or not an id in `Classes` is left out
  (it has no agreed class to condition on); deleted annotations too.
- votes: each `Annotations_label` row is one person's vote, mitotic when its
  class is the mitotic class; the last vote per person counts. A vote whose
  annoId or person is NULL/not an integer, whose class is NULL/not in
  `Classes`, or whose annoId points to no annotation is left out (never read
  as "not mitotic"). label = fraction of mitotic votes; an annotation with no
  usable vote takes its agreedClass as the one vote.
- coordinates: a kept annotation whose coordinates are not non-negative
  numbers, or that has none, is an error naming the field (a patch cut at a
  wrong place under a real label is worse than no dataset).
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from pathlib import Path

from mitosis_ldm.errors import UserError

from .slides import find_slide

SCHEMA = {
    "Slides": ["uid", "filename"],
    "Annotations": ["uid", "slide", "agreedClass"],
    "Annotations_coordinates": ["annoId", "coordinateX", "coordinateY"],
    "Annotations_label": ["person", "class", "annoId"],
    "Classes": ["uid", "name"],
}
POINT_TYPES = {1: "spot", 4: "special spot", 5: "circle"}
REGION_TYPES = {2: "rectangle", 3: "polygon"}


def check_schema(db: sqlite3.Connection, path: Path) -> None:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for table, columns in SCHEMA.items():
        if table not in tables:
            raise UserError(f"{path}: table '{table}' is missing (not a SlideRunner database?)")
        have = {row[1] for row in db.execute(f"PRAGMA table_info('{table}')")}
        for column in columns:
            if column not in have:
                raise UserError(f"{path}: field '{table}.{column}' is missing (column not in table '{table}')")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _int(value) -> int | None:
    """An integer id, or None for NULL, text, blobs and fractional numbers (SQLite stores anything anywhere)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def summary_line(db_path, kept: Counter, left_out: Counter) -> str:
    """`DB: kept N annotations (...); left out: reason count, ...` - one line."""
    kept_text = ", ".join(f"{k} {v}" for k, v in kept.items())
    left = ", ".join(f"{k} {v}" for k, v in left_out.items()) or "nothing"
    return f"{db_path}: kept {sum(kept.values())} annotations ({kept_text}); left out: {left}"


def _read_tables(db, db_path):
    check_schema(db, db_path)
    left_out: Counter = Counter()
    classes = {}
    for uid, name in db.execute("SELECT uid, name FROM Classes"):
        if _int(uid) is None:
            left_out["Classes rows without an integer uid"] += 1
        else:
            classes[_int(uid)] = str(name)
    slides = {_int(uid): str(name) for uid, name in db.execute("SELECT uid, filename FROM Slides")
              if _int(uid) is not None}
    columns = {row[1] for row in db.execute("PRAGMA table_info('Annotations')")}
    type_column = "type" if "type" in columns else "1"
    deleted = "deleted" if "deleted" in columns else "0"
    annotations = db.execute(f"SELECT uid, slide, {type_column}, agreedClass, {deleted} FROM Annotations "
                             "ORDER BY uid").fetchall()
    points: dict[int, list] = {}
    for anno, x, y in db.execute("SELECT annoId, coordinateX, coordinateY FROM Annotations_coordinates"):
        if _int(anno) is None:
            left_out["coordinate rows without an integer annoId"] += 1
        else:
            points.setdefault(_int(anno), []).append((x, y))
    votes_rows = db.execute("SELECT annoId, person, class FROM Annotations_label ORDER BY uid").fetchall()
    return classes, slides, annotations, points, votes_rows, left_out


def read_sliderunner(db_path, slides_dir, mitotic_class: int = 2, lookalike_class: int = 7,
                     include_classes: tuple[int, ...] = (), skip_missing: bool = False):
    """Parse the database. Returns ({slide key: (path, rows)}, class names {uid: name}, summary line, left_out)."""
    db_path = Path(db_path)
    if not db_path.exists():
        raise UserError(f"{db_path}: database file not found")
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        # text that is not UTF-8 (a damaged name, an old database's Latin-1 file name) is read with U+FFFD for
        # the bytes it cannot decode, instead of failing as a UnicodeDecodeError; such a slide name is then not
        # found, and said so
        db.text_factory = _text
        db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as err:
        raise UserError(f"{db_path}: not a readable SQLite database ({err})") from None
    except UnicodeDecodeError:  # SQLite's own message about a damaged schema quotes bytes that are not UTF-8
        raise UserError(f"{db_path}: not a readable SQLite database (a damaged schema)") from None
    try:
        classes, slides, annotations, points, votes_rows, left_out = _read_tables(db, db_path)
    except sqlite3.DatabaseError as err:
        raise UserError(f"{db_path}: cannot read the database ({err})") from None
    finally:
        db.close()
    for flag, uid in (("--mitotic-class", mitotic_class), ("--lookalike-class", lookalike_class),
                      *(("--include-class", c) for c in include_classes)):
        if uid not in classes:
            raise UserError(f"{flag}: class {uid} is not in {db_path} table 'Classes' "
                            f"({', '.join(f'{k} {v}' for k, v in sorted(classes.items()))})")
    keep = {mitotic_class, lookalike_class, *include_classes}

    known_annotations = {_int(a[0]) for a in annotations if _int(a[0]) is not None}
    votes: dict[int, dict[int, int]] = {}
    for anno, person, cls in votes_rows:
        anno, person, cls = _int(anno), _int(person), _int(cls)
        if anno is None:
            left_out["votes without an integer annoId"] += 1
        elif anno not in known_annotations:
            left_out["votes pointing to no annotation"] += 1
        elif person is None:
            left_out["votes without an integer person"] += 1
        elif cls is None or cls not in classes:
            left_out["votes whose class is not in Classes"] += 1
        else:
            votes.setdefault(anno, {})[person] = cls  # a later label of the same person replaces the earlier

    by_slide: dict[str, tuple[Path, list[dict]]] = {}
    kept: Counter = Counter()
    skipped_slides = set()
    for uid, slide, kind, agreed, is_deleted in annotations:
        uid, kind, agreed = _int(uid), _int(kind), _int(agreed)
        if uid is None:
            left_out["annotations without an integer uid"] += 1
            continue
        if is_deleted not in (None, 0):
            left_out["deleted annotations"] += 1
            continue
        if agreed is None or agreed not in classes:
            left_out["annotations whose agreedClass is NULL or not in Classes"] += 1
            continue
        if agreed not in keep:
            left_out[f"class {agreed} '{classes[agreed]}'"] += 1
            continue
        if kind not in POINT_TYPES:
            left_out[f"{REGION_TYPES.get(kind, f'type {kind!r}')} annotations (not cells)"] += 1
            continue
        if _int(slide) not in slides:
            raise UserError(f"{db_path}: field 'Annotations.slide' of annotation {uid} is {slide!r}, not in 'Slides'")
        coords = points.get(uid)
        if not coords:
            raise UserError(f"{db_path}: annotation {uid} has no rows in 'Annotations_coordinates'")
        numbers = [(_number(x), _number(y)) for x, y in coords]
        if any(x is None or y is None or x < 0 or y < 0 for x, y in numbers):
            bad = next(c for c, n in zip(coords, numbers) if None in n or min(n) < 0)
            raise UserError(f"{db_path}: field 'Annotations_coordinates.coordinateX/Y' of annotation {uid} "
                            f"is {bad!r}, expected non-negative pixel coordinates")
        x = sum(n[0] for n in numbers) / len(numbers)
        y = sum(n[1] for n in numbers) / len(numbers)
        name = slides[_int(slide)]
        if name in skipped_slides:
            left_out["annotations on missing slides (--skip-missing)"] += 1
            continue
        if name not in by_slide:
            if skip_missing and not (Path(slides_dir) / name).exists():
                skipped_slides.add(name)
                left_out["annotations on missing slides (--skip-missing)"] += 1
                continue
            by_slide[name] = (find_slide(slides_dir, name), [])
        person_votes = votes.get(uid, {})
        mitotic = [int(c == mitotic_class) for _, c in sorted(person_votes.items())]
        by_slide[name][1].append({
            "id": f"sliderunner-{uid}",
            "source": "sliderunner",
            "slide": name,
            "x": int(round(x)),
            "y": int(round(y)),
            "label": sum(mitotic) / len(mitotic) if mitotic else float(agreed == mitotic_class),
            "votes": ";".join(map(str, mitotic)),
            "hard_label": int(agreed == mitotic_class),
            "class": classes[agreed],
            "annotation_id": uid,
        })
        kept[f"class {agreed} '{classes[agreed]}'"] += 1
    if not by_slide:
        raise UserError(f"{db_path}: field 'Annotations' holds no annotations of classes "
                        f"{sorted(keep)} on available slides (empty source; {summary_line(db_path, kept, left_out)})")
    return by_slide, classes, summary_line(db_path, kept, left_out), dict(left_out)
