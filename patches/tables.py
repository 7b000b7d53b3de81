"""CSV inputs (points and pre-cut patch labels): reading and checking cells with errors that name file, row and field.

Comma- and tab-separated files are both read: `.tsv`/`.tab` files, or a header
line with tabs and no commas, are tab-separated.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from mitosis_ldm.errors import UserError


def read_csv(path, required: list[str], one_of: list[str] | None = None) -> list[dict]:
    """Rows of a CSV with a header. `required` columns must exist; at least one of `one_of` too."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, strict=True, delimiter=_delimiter(path, handle))
            header = reader.fieldnames
            if not header:
                raise UserError(f"{path}: empty CSV (no header row)")
            header = [h.strip() for h in header]
            reader.fieldnames = header
            rows = []
            for row in reader:
                if None in row:  # more cells than header columns
                    raise UserError(f"{path}: line {reader.line_num} has {len(header) + len(row[None])} cells "
                                    f"but the header has {len(header)} columns (malformed CSV)")
                if any(v is None for v in row.values()):
                    raise UserError(f"{path}: line {reader.line_num} has fewer cells than the header's "
                                    f"{len(header)} columns (malformed CSV)")
                rows.append({k: v.strip() for k, v in row.items()})
    except csv.Error as err:
        raise UserError(f"{path}: malformed CSV ({err})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text CSV") from None
    for column in required:
        if column not in header:
            raise UserError(f"{path}: field '{column}' is missing from the header ({', '.join(header)})")
    if one_of and not any(c in header for c in one_of):
        raise UserError(f"{path}: needs a column {' or '.join(repr(c) for c in one_of)} (header: {', '.join(header)})")
    if not rows:
        raise UserError(f"{path}: no rows (empty source)")
    return rows


def _delimiter(path: Path, handle) -> str:
    """Tab for .tsv/.tab files or a tab-separated header; else comma. Leaves `handle` at the start."""
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    header = handle.readline()
    handle.seek(0)
    return "\t" if "\t" in header and "," not in header else ","


def number(path, line: int, field: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{path}: line {line} field '{field}' is '{text}', not a number") from None
    if not math.isfinite(value):
        raise UserError(f"{path}: line {line} field '{field}' is {text}, expected a finite number")
    return value


def label_cells(path, line: int, row: dict, label_map: dict[str, float] | None = None) -> dict:
    """label / votes / hard_label of one CSV row: votes `1;0;1` give the label; empty cells mean unlabelled.

    With a label map, the `label` (or else `class`) column holds class names, each mapped to its value;
    the name is kept in a `class` column.
    """
    out = {"label": None, "votes": "", "hard_label": None}
    if label_map:
        row = _mapped(path, line, row, label_map, out)
    votes_text = row.get("votes", "")
    if votes_text:
        try:
            votes = [int(v) for v in votes_text.replace(",", ";").split(";")]
        except ValueError:
            raise UserError(f"{path}: line {line} field 'votes' is '{votes_text}', "
                            "expected 0/1 votes like 1;0;1") from None
        if any(v not in (0, 1) for v in votes):
            raise UserError(f"{path}: line {line} field 'votes' is '{votes_text}', votes must be 0 or 1")
        out["votes"] = ";".join(map(str, votes))
        out["label"] = sum(votes) / len(votes)
    label_text = row.get("label", "")
    if label_text:
        try:
            label = float(label_text)
        except ValueError:
            raise UserError(f"{path}: line {line} field 'label' is '{label_text}', not a number "
                            f"(class names need --label-map NAME=VALUE,...)") from None
        if not 0.0 <= label <= 1.0:  # also rejects NaN
            raise UserError(f"{path}: line {line} field 'label' is {label_text}, expected a number in [0, 1]")
        if out["label"] is not None and abs(out["label"] - label) > 1e-6:
            raise UserError(f"{path}: line {line} field 'label' {label_text} disagrees with its votes "
                            f"'{votes_text}' (mean {out['label']:.4g})")
        out["label"] = label
    hard_text = row.get("hard_label", "")
    if hard_text:
        if hard_text not in ("0", "1"):
            raise UserError(f"{path}: line {line} field 'hard_label' is '{hard_text}', expected 0 or 1")
        out["hard_label"] = int(hard_text)
    elif out["label"] is not None:
        out["hard_label"] = int(out["label"] >= 0.5)  # majority; ties round half up
    return out


def _mapped(path, line: int, row: dict, label_map: dict[str, float], out: dict) -> dict:
    """The row with its class-name column replaced by the mapped number (as text) in `label`."""
    from .labelmap import map_class

    column = "label" if "label" in row else "class"
    name = row.get(column, "")
    if not name:
        return {**row, "label": ""}
    value = map_class(label_map, name, f"{path}: line {line} field '{column}'")
    out["class"] = name
    return {**row, "label": repr(value)}


def check_unique(path, rows: list[dict], column: str = "id") -> None:
    seen = {}
    for line, row in rows:
        value = row.get(column, "")
        if value in seen:
            raise UserError(f"{path}: line {line} field '{column}' has duplicate value '{value}' "
                            f"(first on line {seen[value]})")
        seen[value] = line
