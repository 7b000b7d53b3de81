"""A folder of pre-cut patches + a labels CSV -> the patch-dataset format.

    mitosis-ldm data folder --images DIR --labels labels.csv --out DIR [--size 64] [--margin 8]

CSV columns: `file` (path under --images), `label` and/or `votes`; optional
`id` (default: the file name), `hard_label`, `slide` (groups patches for
slide-wise splits and per-slide jobs; default: the file's sub-folder, else one
group per 1000 files) and `split` (train/val/test, kept as given).

Size rules, for each image (stored size S = size + 2 * margin):
1. a non-square image is centre-cropped to a square of its shorter side;
2. a square of side S is kept as is (it already carries the context margin);
3. a square of side `size` is kept and the margin is added by reflection;
4. any other side is resized to `size` (Lanczos) and the margin added by reflection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mitosis_ldm.errors import UserError

from .dataset import SPLITS, Shard
from .tables import check_unique, label_cells, read_csv

GROUP = 1000


def fit_patch(image: np.ndarray, size: int, margin: int) -> np.ndarray:
    """Apply the size rules above to one (H, W, 3) uint8 image -> (S, S, 3)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top: top + side, left: left + side]
    stored = size + 2 * margin
    if side == stored:
        return np.ascontiguousarray(square)
    if side != size:
        from PIL import Image

        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))
    if margin == 0:
        return np.ascontiguousarray(square)
    return np.pad(square, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")


def cut_files(rows: list[dict], files: list[str], patch_size: int, margin: int) -> Shard:
    """One job: read and fit each file."""
    from mitosis_ldm.images import read_image

    stored = patch_size + 2 * margin
    images = np.empty((len(files), stored, stored, 3), np.uint8)
    for i, path in enumerate(files):
        images[i] = fit_patch(read_image(path), patch_size, margin)
    return Shard(images, rows)


def read_folder(images_dir, labels_csv, label_map: dict[str, float] | None = None):
    """Parse and check the CSV (or TSV). Returns {group key: (rows, files)}.

    With a label map, the `label` (or `class`) column holds class names (patches/labelmap.py).
    """
    images_dir, labels_csv = Path(images_dir), Path(labels_csv)
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: --images folder not found")
    raw = read_csv(labels_csv, ["file"], one_of=["label", "votes"] + (["class"] if label_map else []))
    numbered = [(i + 2, r) for i, r in enumerate(raw)]
    for line, row in numbered:
        row.setdefault("id", "")
        if not row["id"]:
            row["id"] = row["file"]
    check_unique(labels_csv, numbered)
    groups: dict[str, tuple[list[dict], list[str]]] = {}
    for n, (line, row) in enumerate(numbered):
        if not row["file"]:
            raise UserError(f"{labels_csv}: line {line} field 'file' is empty")
        path = images_dir / row["file"]
        if not path.is_file():
            raise UserError(f"{path}: image file not found (line {line} field 'file' of {labels_csv})")
        split = row.get("split", "")
        if split and split not in SPLITS:
            raise UserError(f"{labels_csv}: line {line} field 'split' is '{split}', expected train, val or test")
        parent = str(Path(row["file"]).parent)
        slide = row.get("slide") or (parent if parent != "." else f"group-{n // GROUP:04d}")
        out = {"id": row["id"], "source": "folder", "slide": slide, "x": "", "y": "",
               **label_cells(labels_csv, line, row, label_map),
               "file": row["file"]}
        if split:
            out["split"] = split
        rows, files = groups.setdefault(slide, ([], []))
        rows.append(out)
        files.append(str(path))
    return groups
