"""Random mutations of valid inputs for the fuzz targets (tests/fuzz_targets.py): wild values, JSON/YAML tree
edits, CSV cell edits, SQLite row edits, byte flips and truncations, and edits anywhere in a folder.

Each takes a `random.Random`, so hypothesis (tests/test_fuzz.py) or a seed (bench/fuzz_outcomes.py) drives it.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sqlite3
from pathlib import Path

WILD = [None, True, False, 0, -1, 1, 2, 7, 10 ** 12, -3.5, 0.5, 1e308, math.nan, math.inf, "", "x", "1", "-5",
        "nan", "1;1", "ok.png", [], [1, 2], {}, {"a": 1}]


def wild(rng: random.Random):
    return rng.choice(WILD)


def wild_text(rng: random.Random) -> str:
    value = wild(rng)
    return value if isinstance(value, str) else json.dumps(value) if rng.random() < 0.3 else str(value)


# -- mutations ------------------------------------------------------------------------------------------

def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def mutate_tree(obj, rng: random.Random, extra_key: bool = True):
    """Replace, delete or add one value somewhere in a JSON/YAML tree (a copy)."""
    obj = json.loads(json.dumps(obj, allow_nan=True))
    path = rng.choice(list(_paths(obj)))
    if not path:
        return wild(rng)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    op = rng.random()
    if op < 0.65:
        parent[path[-1]] = wild(rng)
    elif op < 0.85 or not extra_key:
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[f"unknown_{rng.randrange(9)}"] = wild(rng)
    else:
        parent.append(wild(rng))
    return obj


def mutate_bytes(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    op = rng.random()
    if op < 0.4 or not data:
        data = data[: rng.randrange(len(data) + 1)]  # truncate
    elif op < 0.8:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)  # flip bits
    else:
        data[rng.randrange(len(data)):rng.randrange(len(data))] = rng.choice([b"\xff\xfe", b"\x00", b"{", b",,\n"])
    path.write_bytes(bytes(data))


def mutate_json_file(path: Path, rng: random.Random) -> None:
    if rng.random() < 0.2:
        return mutate_bytes(path, rng)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):  # already damaged by an earlier mutation
        return mutate_bytes(path, rng)
    for _ in range(rng.randint(1, 3)):
        data = mutate_tree(data, rng)
    path.write_text(json.dumps(data, allow_nan=True))


def mutate_csv(path: Path, rng: random.Random) -> None:
    if rng.random() < 0.15:
        return mutate_bytes(path, rng)
    try:
        rows = [line.split(",") for line in path.read_text().splitlines()] or [[""]]
    except UnicodeDecodeError:
        return mutate_bytes(path, rng)
    for _ in range(rng.randint(1, 3)):
        r = rng.randrange(len(rows))
        op = rng.random()
        if op < 0.7 and rows[r]:
            rows[r][rng.randrange(len(rows[r]))] = wild_text(rng).replace("\n", " ")
        elif op < 0.8 and rows[r]:
            del rows[r][rng.randrange(len(rows[r]))]
        elif op < 0.9:
            rows.insert(r, list(rows[r]))
        elif len(rows) > 1:
            del rows[r]
    path.write_text("\n".join(",".join(map(str, row)) for row in rows) + "\n")


def mutate_sqlite(path: Path, rng: random.Random) -> None:
    if rng.random() < 0.1:
        return mutate_bytes(path, rng)
    con = sqlite3.connect(path)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for _ in range(rng.randint(1, 3)):
        table = rng.choice(tables)
        columns = [r[1] for r in con.execute(f"PRAGMA table_info('{table}')")]
        uids = [r[0] for r in con.execute(f"SELECT rowid FROM '{table}'")]
        op = rng.random()
        if op < 0.75 and uids:
            value = rng.choice([None, "text", -5, 2.5, 10 ** 9, b"\x00blob", 0, 1, 2, 3, 7, 99])
            with contextlib.suppress(sqlite3.IntegrityError):  # an INTEGER PRIMARY KEY takes integers only
                con.execute(f"UPDATE '{table}' SET '{rng.choice(columns)}' = ? WHERE rowid = ?",
                            (value, rng.choice(uids)))
        elif op < 0.9 and uids:
            con.execute(f"DELETE FROM '{table}' WHERE rowid = ?", (rng.choice(uids),))
        elif op < 0.95:
            with contextlib.suppress(sqlite3.IntegrityError):
                con.execute(f"INSERT INTO '{table}' DEFAULT VALUES")
        else:
            con.execute(f"DROP TABLE '{table}'")
            tables.remove(table)
            if not tables:
                break
    con.commit()
    con.close()


def mutate_folder(folder: Path, rng: random.Random) -> None:
    """Damage an artifact folder: half the time without its integrity record, to reach the parsers."""
    record = folder / "integrity.json"
    if record.exists() and rng.random() < 0.5:
        record.unlink()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for _ in range(rng.randint(1, 2)):
        target = rng.choice(files)
        if not target.exists():
            continue
        op = rng.random()
        if op < 0.15:
            target.unlink()
        elif target.suffix == ".json" and op < 0.7:
            mutate_json_file(target, rng)
        elif target.suffix == ".csv" and op < 0.7:
            mutate_csv(target, rng)
        else:
            mutate_bytes(target, rng)
