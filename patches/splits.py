"""Splits and the checks every source's label rows share, before a patch dataset is written.

- `SplitConfig`: how patches are assigned to train/val/test (`build_dataset`'s `split`);
- `assign_splits(rows, split)`: fills each row's `split` column in place;
- `validate_rows(rows, where)`: unique ids and labels in [0, 1], one clear line otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mitosis_ldm.errors import UserError


@dataclass
class SplitConfig:
    """How patches are assigned to train/val/test.

    `slide`: whole slides go to one split (no slide leaks across splits);
    `y`: within each slide by y-coordinate percentile, as in the seed paper
    (top rows train, then val, bottom rows test: a region training never saw);
    `random`: per patch (synthetic data, where there are no slides).
    """

    mode: str = "slide"  # slide | y | random
    val: float = 0.1
    test: float = 0.2
    seed: int = 0


def validate_rows(rows: list[dict], where: str) -> None:
    """Backstop checks every source shares: unique ids, labels in [0, 1]."""
    seen = set()
    for row in rows:
        pid = str(row.get("id", ""))
        if pid == "":
            raise UserError(f"{where}: field 'id' is empty")
        if pid in seen:
            raise UserError(f"{where}: field 'id' has duplicate value '{pid}'")
        seen.add(pid)
        label = row.get("label")
        if label not in (None, ""):
            value = float(label)
            if not (0.0 <= value <= 1.0):  # also rejects NaN
                raise UserError(f"{where}: field 'label' of id '{pid}' is {label}, expected a number in [0, 1]")


def assign_splits(rows: list[dict], split: SplitConfig) -> None:
    """Fill the `split` column in place (rows that already have one keep it)."""
    if not 0 <= split.val + split.test < 1:
        raise UserError(f"split: val + test must be in [0, 1), got {split.val} + {split.test}")
    rng = np.random.default_rng(split.seed)
    if split.mode == "random":
        draws = rng.random(len(rows))
        for row, u in zip(rows, draws):
            row.setdefault("split", _bucket(u, split))
    elif split.mode == "slide":
        slides = sorted({str(r.get("slide", "")) for r in rows})
        order = rng.permutation(len(slides))
        n = len(slides)
        n_test = int(round(split.test * n)) if n >= 3 else 0
        n_val = int(round(split.val * n)) if n >= 3 else 0
        if n >= 3:
            n_test, n_val = max(1, n_test), max(1, n_val) if split.val > 0 else 0
        chosen = {}
        for rank, idx in enumerate(order):
            chosen[slides[idx]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        for row in rows:
            row.setdefault("split", chosen[str(row.get("slide", ""))])
    elif split.mode == "y":
        by_slide: dict[str, list[dict]] = {}
        for row in rows:
            by_slide.setdefault(str(row.get("slide", "")), []).append(row)
        for slide_rows in by_slide.values():
            ys = np.array([float(r["y"]) for r in slide_rows])
            ranks = ys.argsort().argsort() / max(1, len(ys))
            for row, q in zip(slide_rows, ranks):
                row.setdefault("split", "train" if q < 1 - split.val - split.test
                               else "val" if q < 1 - split.test else "test")
    else:
        raise UserError(f"split: field 'mode' must be slide, y or random, got '{split.mode}'")


def _bucket(u: float, split: SplitConfig) -> str:
    return "test" if u < split.test else "val" if u < split.test + split.val else "train"
