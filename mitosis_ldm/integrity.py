"""Content hashes recorded when an output folder is finalised, checked when it is loaded.

safetensors has no checksum: a flipped byte in a shared model folder loads
silently. So every folder the project exports (everything written through
`io.atomic_dir`: patch datasets, autoencoder / classifier / pipeline models,
transitions, caches, reports and the judges' folders) gets `integrity.json`:

    {"format": "mitosis-ldm/integrity", "algorithm": "sha256",
     "files": {"unet/diffusion_pytorch_model.safetensors": {"size": 123, "sha256": "..."}, ...}}

- `record(folder)` writes it (atomic_dir calls it on success); a later
  single-file write by the project into a recorded folder (`io.atomic_file`,
  e.g. scores.csv added by `score`) updates that file's entry.
- `findings(folder, full)` compares: every recorded file must exist with its
  recorded size; small files (configs, CSVs, manifests; <= CHEAP_BYTES) are
  hashed on every load, large ones only when `full` (`check`, `--verify`).
- `verify(folder)` is what loaders call: the first finding becomes one
  `error:` line. Folders exported before this existed have no record; loading
  them still works, `mitosis-ldm check` says so and `check --record` adds one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError

MANIFEST = "integrity.json"
FORMAT = "mitosis-ldm/integrity"
CHEAP_BYTES = 1 << 20  # files up to 1 MiB are re-hashed on every load
_full_by_default = False


def verify_fully(on: bool = True) -> None:
    """Make every later `verify` hash every file (the commands' `--verify` flag)."""
    global _full_by_default
    _full_by_default = bool(on)


def sha256(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _recordable(folder: Path) -> list[Path]:
    # hidden files are temporaries or resume state (".x.tmp-", ".partial"), not part of the export
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def _write(folder: Path, files: dict) -> None:
    from .io import write_json  # io imports this module

    write_json(folder / MANIFEST, {"format": FORMAT, "algorithm": "sha256", "files": files})


def record(folder) -> int:
    """Record size and sha256 of every file under `folder`; returns how many."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): _entry(p) for p in _recordable(folder)}
    _write(folder, files)
    return len(files)


def note_write(path) -> None:
    """A project tool replaced `path`: if its folder has a record, update that file's entry."""
    path = Path(path)
    manifest = path.parent / MANIFEST
    if path.name == MANIFEST or path.name.startswith(".") or not manifest.exists():
        return
    try:
        data = read_manifest(path.parent)
    except UserError:
        return  # a broken record stays broken; `check` reports it
    if data is not None:
        data["files"][path.name] = _entry(path)
        _write(path.parent, data["files"])


def read_manifest(folder) -> dict | None:
    """The recorded hashes, None when the folder has none; a malformed record is a UserError."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable integrity record ({type(err).__name__})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(files, dict)
            or not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                       for v in files.values())):
        raise UserError(f"{path}: field 'files' is not a valid integrity record ({FORMAT})")
    return data


def findings(folder, full: bool | None = None) -> list[str]:
    """One line per recorded file that is missing, resized or changed. [] when none (or nothing recorded)."""
    folder = Path(folder)
    full = _full_by_default if full is None else full
    data = read_manifest(folder)
    if data is None:
        return []
    out = []
    for name, entry in sorted(data["files"].items()):
        path = folder / name
        if not path.is_file():
            out.append(f"{path}: missing (recorded at export; a part of the folder was deleted)")
        elif path.stat().st_size != entry["size"]:
            out.append(f"{path}: {path.stat().st_size} bytes, recorded {entry['size']} at export "
                       f"(truncated or replaced)")
        elif (full or entry["size"] <= CHEAP_BYTES) and sha256(path) != entry["sha256"]:
            out.append(f"{path}: content differs from the sha256 recorded at export (corrupted or edited)")
    return out


def verify(folder, full: bool | None = None) -> None:
    """Raise one UserError naming the first damaged file of `folder` (loaders call this)."""
    problems = findings(folder, full)
    if problems:
        more = f" (+{len(problems) - 1} more; run `mitosis-ldm check {folder}`)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
