"""Atomic output: every file and folder is written to a temporary path, then renamed.

`atomic_dir(path, overwrite)` guards whole output folders (a failure leaves
nothing behind) and records their files' hashes (mitosis_ldm/integrity.py);
`write_json` / `write_text` / `save_npy` guard single files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import tokenize
from pathlib import Path

import numpy as np

from . import integrity
from .errors import UserError, raise_if_stopped


def check_new_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to touch an existing output unless the user asked for it, and one that cannot be created (a file
    where a folder on its path should be, or a folder that is not writable) before any work is done."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{path}: cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be created: folder {ancestor} is not writable")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; rename it into place on success.

    On any exception the temporary folder is removed, so a failed run leaves no
    partial output. An existing `path` is replaced only with `overwrite`.
    """
    path = check_new_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        raise_if_stopped()  # a stop swallowed on the way: the output is not put in place
        integrity.record(tmp)  # every exported folder carries its files' sha256 (integrity.json)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, swapping out an existing `dst` with two renames; if the second fails, the
    old `dst` is put back."""
    trash = None
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, trash)
    try:
        os.replace(src, dst)
    except BaseException:
        if trash is not None:
            os.replace(trash, dst)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """Open a temporary file beside `path` and rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        raise_if_stopped()
        os.replace(tmp, path)
        integrity.note_write(path)  # a recorded folder keeps its record current
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def write_json(path, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def read_text(path, encoding: str = "utf-8") -> str:
    """A whole text file, decoded at once: a UnicodeDecodeError's `start` is then the bad byte's offset in the file.

    A text stream decodes chunk by chunk, and its error counts from the start of the chunk.
    """
    return Path(path).read_bytes().decode(encoding)


def not_utf8(path, err: UnicodeDecodeError, what: str | None = None) -> str:
    """The one line for a text file that is not UTF-8: its first bad byte's offset (decoded by `read_text`)."""
    return f"{path}: {f'malformed {what}: ' if what else ''}not UTF-8 text (byte {err.start})"


def read_json(path, what: str = "JSON"):
    """Read a JSON file; malformed or missing files become one-line UserErrors."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed {what} at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise UserError(not_utf8(path, err, what)) from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a {what} file") from None


def read_npy(path, mmap: bool = False) -> np.ndarray:
    """A .npy array (pickled objects never load); a missing, truncated or damaged file is one UserError line.

    numpy parses the header as a Python literal: a damaged one fails as ValueError, SyntaxError or (an unclosed
    bracket) tokenize.TokenError, none of which the others derive from.
    """
    path = Path(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError) as err:
        raise UserError(f"{path}: not a readable .npy array ({' '.join(str(err).split())[:120]})") from None


def save_npy(path, array: np.ndarray) -> None:
    with atomic_file(path, "wb") as handle:
        np.save(handle, array)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
