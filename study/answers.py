"""Reading a study folder and the readers' answer files, with one clear line for every bad input.

An answers file is what the page exports (`answers-READER.csv`): columns
study_id, reader, item, real_or_generated, mitotic_rating, confidence,
seconds, answered_at; one row per answered item.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from mitosis_ldm.errors import UserError
from mitosis_ldm.io import not_utf8, read_json, read_text

from . import ANSWER_COLUMNS, CONFIDENCES, KINDS, RATINGS, STUDY_FORMAT


@dataclass
class Study:
    path: Path
    study: dict   # study.json
    key: dict     # key.json "items": item -> {kind, condition, soft_label, source, ...}

    @property
    def study_id(self) -> str:
        return self.study["study_id"]


@dataclass
class Answer:
    reader: str
    item: str
    called: str        # "real" | "generated"
    rating: int
    confidence: int
    seconds: float
    answered_at: str
    source_file: str
    row: int


def read_study(path) -> Study:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: study folder not found (--study)")
    study = read_json(path / "study.json", "study.json")
    if not isinstance(study, dict) or study.get("format") != STUDY_FORMAT:
        raise UserError(f"{path / 'study.json'}: field 'format' is not '{STUDY_FORMAT}'; "
                        f"{path} is not a study folder from `mitosis-ldm study make`")
    key = read_json(path / "key.json", "key.json")
    if not isinstance(key, dict) or not isinstance(key.get("items"), dict):
        raise UserError(f"{path / 'key.json'}: field 'items' is missing")
    if key.get("study_id") != study.get("study_id"):
        raise UserError(f"{path / 'key.json'}: field 'study_id' is {key.get('study_id')!r} but study.json says "
                        f"{study.get('study_id')!r}")
    for item, entry in key["items"].items():
        check_key_entry(path / "key.json", item, entry)
    return Study(path=path, study=study, key=key["items"])


def check_key_entry(path: Path, item: str, entry) -> None:
    """An item of key.json: its kind, its label (a generated frame's condition, a real patch's soft label) in
    [0, 1], and its source, each of which the analysis reads."""
    if not isinstance(entry, dict):
        raise UserError(f"{path}: item '{item}' must be an object with kind, label and source, got {entry!r:.40}")
    if entry.get("kind") not in KINDS:
        raise UserError(f"{path}: field 'kind' of item '{item}' is {entry.get('kind')!r}")
    field = "condition" if entry["kind"] == "generated" else "soft_label"
    value = entry.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{path}: field '{field}' of {entry['kind']} item '{item}' must be a number in [0, 1], "
                        f"got {value!r:.40}")
    if not isinstance(entry.get("source"), str):
        raise UserError(f"{path}: field 'source' of item '{item}' is missing")


def _integer(text: str, lo: int, hi: int, where: str, field: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise UserError(f"{where}: field '{field}' is {text!r}, expected an integer {lo}-{hi}")
    return value


def read_answers(path, study: Study) -> list[Answer]:
    """One answers CSV, every row checked against the study and its key."""
    path = Path(path)
    try:
        # a spreadsheet's "CSV UTF-8" starts the file with a byte-order mark, which is not part of the header (not
        # decoded as utf-8-sig, whose error offsets skip the mark)
        text = read_text(path).removeprefix("\ufeff")
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (--answers)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected an answers CSV file (--answers)") from None
    except UnicodeDecodeError as err:
        raise UserError(not_utf8(path, err, "CSV")) from None
    except csv.Error as err:
        raise UserError(f"{path}: malformed CSV ({' '.join(str(err).split())})") from None
    rows = [r for r in rows if r]  # blank lines carry nothing
    if not rows:
        raise UserError(f"{path}: malformed CSV: the file is empty (expected a header {','.join(ANSWER_COLUMNS)})")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ANSWER_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: malformed CSV: header lacks column(s) {', '.join(repr(c) for c in missing)} "
                        f"(expected {','.join(ANSWER_COLUMNS)})")
    index = {name: header.index(name) for name in ANSWER_COLUMNS}
    answers = []
    for line, row in enumerate(rows[1:], start=2):
        where = f"{path} row {line}"
        if len(row) != len(header):
            raise UserError(f"{path}: malformed CSV: row {line} has {len(row)} fields, the header has {len(header)}")
        value = {name: row[i].strip() for name, i in index.items()}
        if value["study_id"] != study.study_id:
            raise UserError(f"{where}: field 'study_id' is {value['study_id']!r} but the study in {study.path} is "
                            f"{study.study_id!r} (answers from another study?)")
        if value["item"] not in study.key:
            raise UserError(f"{where}: field 'item' is {value['item']!r}, which is not in {study.path / 'key.json'}")
        if not value["reader"]:
            raise UserError(f"{where}: field 'reader' is empty")
        if value["real_or_generated"] not in KINDS:
            raise UserError(f"{where}: field 'real_or_generated' is {value['real_or_generated']!r}, "
                            f"expected real or generated")
        rating = _integer(value["mitotic_rating"], *RATINGS, where, "mitotic_rating")
        confidence = _integer(value["confidence"], *CONFIDENCES, where, "confidence")
        try:
            seconds = float(value["seconds"])
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            raise UserError(f"{where}: field 'seconds' is {value['seconds']!r}, expected a number >= 0")
        answers.append(Answer(value["reader"], value["item"], value["real_or_generated"], rating, confidence,
                              seconds, value["answered_at"], str(path), line))
    return answers


def read_all_answers(paths: list, study: Study) -> list[Answer]:
    """Every file's answers; one (reader, item) answered twice anywhere is an error naming both rows."""
    seen: dict[tuple[str, str], Answer] = {}
    answers = []
    for path in paths:
        for a in read_answers(path, study):
            first = seen.get((a.reader, a.item))
            if first is not None:
                raise UserError(f"{a.source_file} row {a.row}: field 'item' {a.item!r} is answered twice by reader "
                                f"{a.reader!r} (first in {first.source_file} row {first.row})")
            seen[(a.reader, a.item)] = a
            answers.append(a)
    if not answers:
        raise UserError(f"{paths[0] if paths else '--answers'}: holds no answers")
    return answers
