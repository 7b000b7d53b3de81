"""Gather images for tools that take "any images": files, folders, patch datasets, `DATASET:ID`.

    items = gather_images(["a.png", "folder/", "runs/demo/data/cmu", "runs/demo/data/cmu:cmu-17"])
    for item in items: item.name, item.image  # uint8 (H, W, 3)

Transition folders are not handled here: their consumers read them with
`mitosis_ldm.artifacts.read_transitions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mitosis_ldm.artifacts import PATCHES, artifact_kind
from mitosis_ldm.errors import UserError, check_at_least
from mitosis_ldm.images import IMAGE_SUFFIXES, read_image

from .dataset import PatchDataset


@dataclass
class ImageItem:
    name: str          # file path, or DATASET:ID
    image: np.ndarray  # uint8 (H, W, 3)
    label: float = float("nan")


def _dataset_items(root: Path, split: str | None, ids: list[str] | None, limit: int | None) -> list[ImageItem]:
    ds = PatchDataset(root, split=split)
    all_ids = ds.ids()
    if ids is not None:
        lookup = {pid: pos for pos, pid in enumerate(all_ids)}
        missing = [pid for pid in ids if pid not in lookup]
        if missing:
            raise UserError(f"{root}: field 'id' has no patch '{missing[0]}'")
        positions = [lookup[pid] for pid in ids]
    else:
        positions = list(range(len(ds)))
    if limit is not None:
        positions = positions[:limit]
    if not positions:
        raise UserError(f"{root}: no patches selected (split {split or 'all'})")
    images = ds.uint8(np.array(positions))
    labels = ds.soft_labels[np.array(positions)]
    return [ImageItem(f"{root}:{all_ids[p]}", img, float(lab)) for p, img, lab in zip(positions, images, labels)]


def list_image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def gather_images(inputs: list[str], split: str | None = None, limit: int | None = None) -> list[ImageItem]:
    """Expand inputs to images, in order. Errors name the offending input."""
    check_at_least(limit, "--limit")  # a slice [:-1] would silently drop the last patch
    items: list[ImageItem] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists() and ":" in raw:
            root, pid = raw.rsplit(":", 1)
            if artifact_kind(root) == PATCHES:
                items += _dataset_items(Path(root), None, [pid], None)
                continue
        if not path.exists():
            raise UserError(f"{path}: not found")
        if path.is_dir():
            if artifact_kind(path) == PATCHES:
                items += _dataset_items(path, split, None, limit)
                continue
            files = list_image_files(path)
            if not files:
                raise UserError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            items += [ImageItem(str(f), read_image(f)) for f in files]
        else:
            items.append(ImageItem(str(path), read_image(path)))
    if not items:
        raise UserError("no input images given")
    return items
