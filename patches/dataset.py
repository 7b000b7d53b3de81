"""The patch dataset: one folder format for every source, written atomically, read by memory-map.

Folder layout (DESIGN.md, "Artifacts"):
- `patches.npy`  uint8 (N, S, S, 3); S = patch_size + 2 * margin (the margin is
  context so that rotation augmentations leave no black corners);
- `labels.csv`   one row per patch: id, source, slide, x, y, label (soft, in
  [0, 1], empty when unlabelled), votes (e.g. `1;1;0`), hard_label (0/1, empty
  when unlabelled), split (train/val/test), true_degree (synthetic only), and
  any extra columns a source adds;
- `dataset.json` {"format": "mitosis-ldm/patches", patch_size, margin,
  stored_size, mpp, label_definition, provenance, count, content_hash}.

Writing: `build_dataset(out, jobs, ...)` runs one job per source slide (in
worker processes), keeps each finished slide in a hidden `.OUT.partial/`
folder so a killed run resumes per slide, then assembles, assigns splits and
renames the finished folder into place. The split assignment and the checks every
source's rows share live in patches/splits.py.

Reading: `PatchDataset(root, split="train", augment=AugmentConfig())` is a
torch Dataset over the memory-map; items are dicts with `image` (float32
(3, P, P) in [-1, 1]), `label`, `hard_label`, `true_degree` (NaN when absent)
and `index`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from mitosis_ldm.artifacts import FORMAT, PATCHES
from mitosis_ldm.errors import UserError, WorkerDied, map_in_workers
from mitosis_ldm.io import atomic_dir, atomic_file, check_new_output, read_json, read_npy, save_npy, write_json

from .augment import AugmentConfig, augment_patch
from .splits import SplitConfig, assign_splits, validate_rows

BASE_COLUMNS = ["id", "source", "slide", "x", "y", "label", "votes", "hard_label", "split", "true_degree"]
SPLITS = ("train", "val", "test")


@dataclass
class Shard:
    """One source slide's patches: images (n, S, S, 3) uint8 and their label rows."""

    images: np.ndarray
    rows: list[dict] = field(default_factory=list)


# -- writing -----------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.6g}"
    return str(value)


def partial_folder(out) -> Path:
    """The hidden folder beside `out` that keeps finished jobs until the dataset is assembled."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def prepare_partial(out, jobs, patch_size: int, margin: int) -> Path:
    """Create `partial_folder(out)`, emptied first when it holds the results of other jobs (a changed source)."""
    partial = partial_folder(out)
    fingerprint = hashlib.sha256(json.dumps(
        [[k, f"{fn.__module__}.{fn.__qualname__}", kw] for k, fn, kw in jobs] + [patch_size, margin],
        default=str, sort_keys=True).encode()).hexdigest()
    stamp = partial / "jobs.sha256"
    if partial.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    return partial


def _shard_done(partial: Path, key: str) -> bool:
    """Whether `partial` holds both files of the slide `key`, readable and of one length. A damaged one (a disk
    error, a hand edit) is redone rather than refused: the folder is a cache this module alone writes."""
    try:
        images = np.load(partial / f"{key}.npy", mmap_mode="r", allow_pickle=False)
        rows = json.loads((partial / f"{key}.json").read_text())
    except (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError):
        return False
    return images.ndim == 4 and isinstance(rows, list) and len(rows) == len(images)


def pending_jobs(partial: Path, jobs) -> list[tuple]:
    """The jobs whose shard is not in `partial` yet, as `run_job` arguments."""
    return [(k, fn, kw, partial) for k, fn, kw in jobs if not _shard_done(partial, k)]


def run_job(job):
    """Run one `(key, function, kwargs, partial)` job and keep its shard in `partial` (resumable unit)."""
    key, fn, kwargs, shard_dir = job
    shard = fn(**kwargs)
    images = np.ascontiguousarray(shard.images, dtype=np.uint8)
    if len(images) != len(shard.rows):
        raise RuntimeError(f"source job {key}: {len(images)} images but {len(shard.rows)} rows")
    save_npy(shard_dir / f"{key}.npy", images)
    with atomic_file(shard_dir / f"{key}.json", "w") as handle:
        json.dump(shard.rows, handle, default=_fmt)
    return key, len(images)


def build_dataset(out, jobs: list[tuple[str, Callable[..., Shard], dict]], *, patch_size: int, margin: int,
                  meta: dict, split: SplitConfig | None = None, overwrite: bool = False, workers: int = 1,
                  progress: bool = True) -> Path:
    """Run one job per source slide (resumable), assemble and write the dataset atomically.

    `jobs` are `(key, function, kwargs)`; the function returns a `Shard` and must
    be importable (it may run in a worker process). A `UserError` from any job
    removes the partial state: bad input leaves nothing behind.
    """
    out = check_new_output(out, overwrite)
    split = split or SplitConfig()
    partial = prepare_partial(out, jobs, patch_size, margin)
    todo = pending_jobs(partial, jobs)
    try:
        if todo:
            from tqdm.auto import tqdm

            # `with`: the bar ends its line even when a job fails, so an error message starts a line of its own
            with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"slides -> {out.name}",
                      disable=not progress or len(jobs) < 2) as bar:
                if workers > 1 and len(todo) > 1:
                    for _ in map_in_workers(run_job, todo, min(workers, len(todo))):
                        bar.update(1)
                else:
                    for job in todo:
                        run_job(job)
                        bar.update(1)
        images, rows = [], []
        for key, _, _ in jobs:
            images.append(read_npy(partial / f"{key}.npy", mmap=True))
            rows.extend(json.loads((partial / f"{key}.json").read_text()))
        total = sum(len(a) for a in images)
        if total == 0:
            raise UserError(f"{meta.get('source_file', out)}: the source yielded no patches (empty source)")
        stored = patch_size + 2 * margin
        for key_images, (key, _, _) in zip(images, jobs):
            if len(key_images) and key_images.shape[1:] != (stored, stored, 3):
                raise RuntimeError(f"source job {key}: patches of shape {key_images.shape[1:]}, "
                                   f"expected {(stored, stored, 3)}")
        validate_rows(rows, where=str(meta.get("source_file", out)))
        assign_splits(rows, split)
        with atomic_dir(out, overwrite) as tmp:
            array = np.lib.format.open_memmap(tmp / "patches.npy", mode="w+", dtype=np.uint8,
                                              shape=(total, stored, stored, 3))
            start = 0
            for block in images:
                array[start: start + len(block)] = block
                start += len(block)
            array.flush()
            del array
            write_labels(tmp / "labels.csv", rows)
            content_hash = _hash_dataset(tmp)
            info = {
                "format": FORMAT[PATCHES],
                "patch_size": patch_size,
                "margin": margin,
                "stored_size": stored,
                "count": total,
                "content_hash": content_hash,
                "split": vars(split),
                **meta,
            }
            write_json(tmp / "dataset.json", info)
    except WorkerDied as err:  # not the input's fault: the finished slides stay for the rerun
        raise WorkerDied(f"{err} while reading slides (when the system runs out of memory, fewer --workers use "
                         f"less); the finished slides are kept, and the same command goes on from them") from None
    except UserError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(partial, ignore_errors=True)
    return out


def write_labels(path, rows: list[dict]) -> None:
    extra = []
    for row in rows:
        for key in row:
            if key not in BASE_COLUMNS and key not in extra:
                extra.append(key)
    columns = BASE_COLUMNS + extra
    with atomic_file(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_fmt(row.get(c)) for c in columns])


def _hash_dataset(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("patches.npy", "labels.csv"):
        with open(folder / name, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# -- reading -----------------------------------------------------------------

def _float_or_nan(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def _whole_field(meta: dict, key: str, root: Path, low: int, default: int | None = None) -> int:
    """A whole number >= low from dataset.json (a float with a fraction, a bool, infinity or a string is refused)."""
    value = meta.get(key, default)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        shown = "missing" if value is None else f"{str(value)[:40]!r}"
        raise UserError(f"{root / 'dataset.json'}: field '{key}' must be a whole number >= {low}, got {shown}")
    return value


class PatchDataset(Dataset):
    """A patch dataset folder as a torch Dataset (uint8 memory-map underneath)."""

    def __init__(self, root, split: str | list[str] | None = None, augment: AugmentConfig | None = None,
                 label_mode: str = "soft", labelled_only: bool = False):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        self.images = read_npy(self.root / "patches.npy", mmap=True)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise UserError(f"{self.root / 'patches.npy'}: expected uint8 (N, S, S, 3), got "
                            f"{self.images.dtype} {self.images.shape}")
        self.rows = read_labels(self.root / "labels.csv")
        if len(self.rows) != len(self.images):
            raise UserError(f"{self.root / 'labels.csv'}: has {len(self.rows)} rows but patches.npy holds "
                            f"{len(self.images)} patches")
        missing_id = next((i for i, r in enumerate(self.rows) if not r.get("id")), None)
        if missing_id is not None:
            raise UserError(f"{self.root / 'labels.csv'}: field 'id' is missing or empty (data row {missing_id + 1})")
        self.patch_size = _whole_field(self.meta, "patch_size", self.root, low=1)
        self.margin = _whole_field(self.meta, "margin", self.root, low=0, default=0)
        stored = self.patch_size + 2 * self.margin
        if self.images.shape[1:3] != (stored, stored):
            raise UserError(f"{self.root / 'dataset.json'}: fields 'patch_size' {self.patch_size} + 2 x 'margin' "
                            f"{self.margin} give {stored}px, but patches.npy holds "
                            f"{self.images.shape[1]}x{self.images.shape[2]} patches")
        self.augment = augment
        if label_mode not in ("soft", "hard", "binned"):
            raise UserError(f"label_mode: must be soft, hard or binned, got '{label_mode}'")
        self.label_mode = label_mode
        splits = [split] if isinstance(split, str) else split
        if splits is not None:
            for name in splits:
                if name not in SPLITS:
                    raise UserError(f"split: must be one of {', '.join(SPLITS)}, got '{name}'")
        try:
            soft, hard, degree = (np.array([_float_or_nan(r.get(key, "")) for r in self.rows], np.float64)
                                  for key in ("label", "hard_label", "true_degree"))
        except (TypeError, ValueError) as err:
            raise UserError(f"{self.root / 'labels.csv'}: field 'label'/'hard_label'/'true_degree' holds a value "
                            f"that is not a number ({err})") from None
        for key, values, bad in (("label", soft, ~((soft >= 0) & (soft <= 1))),
                                 ("hard_label", hard, ~((hard == 0) | (hard == 1))),
                                 ("true_degree", degree, np.abs(degree) > np.finfo(np.float32).max)):
            bad &= ~np.isnan(values)
            if bad.any():
                at = int(np.argmax(bad))
                want = {"label": "is outside [0, 1]", "hard_label": "is neither 0 nor 1",
                        "true_degree": "is not a finite number"}[key]
                raise UserError(f"{self.root / 'labels.csv'}: field '{key}' of id '{self.rows[at]['id']}' {want} "
                                f"(got {self.rows[at][key]!r})")
        self.all_soft, self.all_hard, self.all_degree = (a.astype(np.float32) for a in (soft, hard, degree))
        keep = np.ones(len(self.rows), bool)
        if splits is not None:
            keep &= np.array([r.get("split") in splits for r in self.rows])
        if labelled_only:
            keep &= ~np.isnan(self.all_soft)
        self.indices = np.flatnonzero(keep)

    def __len__(self) -> int:
        return len(self.indices)

    # label views over the selected rows
    @property
    def soft_labels(self) -> np.ndarray:
        return self.all_soft[self.indices]

    @property
    def hard_labels(self) -> np.ndarray:
        return self.all_hard[self.indices]

    @property
    def true_degree(self) -> np.ndarray:
        return self.all_degree[self.indices]

    def labels(self) -> np.ndarray:
        """Training targets for the selected rows under `label_mode`."""
        return condition_labels(self.soft_labels, self.hard_labels, self.label_mode)

    def ids(self) -> list[str]:
        return [self.rows[i]["id"] for i in self.indices]

    def uint8(self, positions=None) -> np.ndarray:
        """Centre crops (n, P, P, 3) uint8 of selected rows (all when positions is None)."""
        idx = self.indices if positions is None else self.indices[np.asarray(positions)]
        m, p = self.margin, self.patch_size
        return np.ascontiguousarray(self.images[idx][:, m: m + p, m: m + p])

    def __getitem__(self, pos: int) -> dict:
        index = int(self.indices[pos])
        patch = np.asarray(self.images[index])  # (S, S, 3) uint8
        patch = augment_patch(patch, self.patch_size, self.margin, self.augment) if self.augment else \
            patch[self.margin: self.margin + self.patch_size, self.margin: self.margin + self.patch_size]
        image = torch.from_numpy(np.array(patch)).permute(2, 0, 1).float().div(127.5).sub(1.0)
        label = condition_labels(self.all_soft[index: index + 1], self.all_hard[index: index + 1], self.label_mode)[0]
        return {
            "image": image,  # (3, P, P) in [-1, 1]
            "label": torch.tensor(label, dtype=torch.float32),
            "hard_label": torch.tensor(self.all_hard[index], dtype=torch.float32),
            "true_degree": torch.tensor(self.all_degree[index], dtype=torch.float32),
            "index": index,
        }


def condition_labels(soft: np.ndarray, hard: np.ndarray, mode: str) -> np.ndarray:
    """soft: the vote fraction; hard: agreed class; binned: soft rounded to {0, 0.5, 1} as in the paper."""
    if mode == "soft":
        return soft.astype(np.float32)
    if mode == "hard":
        return hard.astype(np.float32)
    if mode == "binned":
        return (np.round(soft * 2) / 2).astype(np.float32)
    raise ValueError(mode)


def read_meta(root) -> dict:
    root = Path(root)
    meta_path = root / "dataset.json"
    if not root.is_dir():
        raise UserError(f"{root}: patch dataset folder not found")
    if not meta_path.exists():
        raise UserError(f"{meta_path}: missing; {root} is not a patch dataset")
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: top level must be a JSON object")
    if meta.get("format") != FORMAT[PATCHES]:
        raise UserError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected '{FORMAT[PATCHES]}'")
    for name in ("patches.npy", "labels.csv"):
        if not (root / name).exists():
            raise UserError(f"{root / name}: missing from the patch dataset")
    return meta


def read_labels(path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: malformed CSV ({type(err).__name__})") from None
