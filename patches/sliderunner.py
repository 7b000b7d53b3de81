"""CCMCT / MITOS_WSI_CCMCT: a SlideRunner SQLite database + Aperio slides -> patch rows per slide.

    mitosis-ldm data sliderunner --db CCMCT_ODAEL.sqlite --slides DIR --out DIR \
        [--mitotic-class 2] [--lookalike-class 7] [--include-class 3 ...]

Schema (tables and the columns read): Slides(uid, filename), Annotations(uid,
slide, agreedClass), Annotations_coordinates(annoId, coordinateX,
coordinateY), Annotations_label(person, class, annoId), Classes(uid, name).
Each `Annotations_label` row is one person's vote: mitotic when its class is
the mitotic class. label = fraction of mitotic votes (the last vote per person
counts); hard_label = (agreedClass == mitotic class). Annotations of the
mitotic and look-alike classes are kept (plus any `--include-class`, as hard
negatives); other classes are skipped. The centre is the mean of an
annotation's coordinates (a spot annotation has one).
"""

from __future__ import annotations

import math
import sqlite3
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


def check_schema(db: sqlite3.Connection, path: Path) -> None:
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for table, columns in SCHEMA.items():
        if table not in tables:
            raise UserError(f"{path}: table '{table}' is missing (not a SlideRunner database?)")
        have = {row[1] for row in db.execute(f"PRAGMA table_info('{table}')")}
        for column in columns:
            if column not in have:
                raise UserError(f"{path}: field '{table}.{column}' is missing (column not in table '{table}')")


def read_sliderunner(db_path, slides_dir, mitotic_class: int = 2, lookalike_class: int = 7,
                     include_classes: tuple[int, ...] = (), skip_missing: bool = False):
    """Parse the database. Returns ({slide key: (path, rows)}, class names {uid: name})."""
    db_path = Path(db_path)
    if not db_path.exists():
        raise UserError(f"{db_path}: database file not found")
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as err:
        raise UserError(f"{db_path}: not a readable SQLite database ({err})") from None
    try:
        check_schema(db, db_path)
        classes = {int(uid): str(name) for uid, name in db.execute("SELECT uid, name FROM Classes")}
        for flag, uid in (("--mitotic-class", mitotic_class), ("--lookalike-class", lookalike_class),
                          *(("--include-class", c) for c in include_classes)):
            if uid not in classes:
                raise UserError(f"{flag}: class {uid} is not in {db_path} table 'Classes' "
                                f"({', '.join(f'{k} {v}' for k, v in sorted(classes.items()))})")
        slides = {int(uid): str(name) for uid, name in db.execute("SELECT uid, filename FROM Slides")}
        keep = {mitotic_class, lookalike_class, *include_classes}
        annotation_columns = {row[1] for row in db.execute("PRAGMA table_info('Annotations')")}
        deleted = " AND (deleted IS NULL OR deleted = 0)" if "deleted" in annotation_columns else ""
        annotations = db.execute(f"SELECT uid, slide, agreedClass FROM Annotations WHERE 1=1{deleted} "
                                 "ORDER BY uid").fetchall()
        centres = {int(a): (x, y) for a, x, y in db.execute(
            "SELECT annoId, AVG(coordinateX), AVG(coordinateY) FROM Annotations_coordinates GROUP BY annoId")}
        votes: dict[int, dict[int, int]] = {}
        for anno, person, cls in db.execute("SELECT annoId, person, class FROM Annotations_label ORDER BY uid"):
            votes.setdefault(int(anno), {})[person] = cls  # a later label of the same person replaces the earlier
    except sqlite3.DatabaseError as err:
        raise UserError(f"{db_path}: cannot read the database ({err})") from None
    finally:
        db.close()

    by_slide: dict[str, tuple[Path, list[dict]]] = {}
    skipped = set()
    for uid, slide, agreed in annotations:
        if agreed not in keep:
            continue
        if slide not in slides:
            raise UserError(f"{db_path}: field 'Annotations.slide' of annotation {uid} is {slide}, not in 'Slides'")
        if uid not in centres:
            raise UserError(f"{db_path}: annotation {uid} has no rows in 'Annotations_coordinates'")
        x, y = centres[uid]
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
            raise UserError(f"{db_path}: field 'Annotations_coordinates.coordinateX/Y' of annotation {uid} "
                            f"is ({x}, {y}), expected non-negative pixel coordinates")
        name = slides[slide]
        if name in skipped:
            continue
        if name not in by_slide:
            if skip_missing and not (Path(slides_dir) / name).exists():
                skipped.add(name)
                continue
            by_slide[name] = (find_slide(slides_dir, name), [])
        person_votes = votes.get(uid, {})
        mitotic = [int(c == mitotic_class) for _, c in sorted(person_votes.items())]
        row = {
            "id": f"sliderunner-{uid}",
            "source": "sliderunner",
            "slide": name,
            "x": int(round(x)),
            "y": int(round(y)),
            "label": sum(mitotic) / len(mitotic) if mitotic else float(agreed == mitotic_class),
            "votes": ";".join(map(str, mitotic)),
            "hard_label": int(agreed == mitotic_class),
            "class": classes.get(agreed, str(agreed)),
            "annotation_id": uid,
        }
        by_slide[name][1].append(row)
    if not by_slide:
        raise UserError(f"{db_path}: field 'Annotations' holds no annotations of classes "
                        f"{sorted(keep)} on available slides (empty source)")
    return by_slide, classes
