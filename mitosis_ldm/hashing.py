"""Content hashes that key caches and manifests (a changed input invalidates them)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def hash_files(paths, chunk: int = 1 << 20) -> str:
    """SHA-256 over the bytes of `paths` in the given order (names excluded)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def hash_folder(folder, pattern: str = "*") -> str:
    """SHA-256 over every file under `folder` matching `pattern`, names included, sorted."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob(pattern) if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(hash_files([path]).encode())
    return digest.hexdigest()
