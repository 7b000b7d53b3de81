"""Training on several patch datasets at once, and on a stratified fraction of the real labels.

    --set data.datasets=[runs/demo/data/synth,runs/gen] --set data.weights=[1,1] \
    --set data.fraction=0.05 --set data.fraction_seed=0 --set data.allow_generated=true

`Mixture` joins the train (or val) splits of several datasets into one torch
dataset with the label views training needs; `sampling_weights` gives each
dataset its share of the draws (`data.weights`, normalised) and, inside each
dataset, the mitotic share `data.balance`. `fraction_positions` keeps a
stratified, deterministic subset of a real train split: strata are the hard
label crossed with the soft-label bin, each stratum keeps round(fraction *
count) patches (at least one) in an order fixed by `fraction_seed`, so a
smaller fraction is a subset of a larger one with the same seed.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import ConcatDataset

from mitosis_ldm.errors import UserError
from patches.dataset import PatchDataset

SOFT_BINS = np.array([0.2, 0.4, 0.6, 0.8])  # soft-label bin edges for the strata (synthetic labels: 0, 1/3, 2/3, 1)


def is_generated(ds: PatchDataset) -> bool:
    meta = ds.meta
    source = str(meta.get("source", "")).lower()
    return bool(meta.get("generated")) or source in {"generated", "transitions", "real2gen"}


def check_mixture(datasets: list[str], weights: list[float], fraction: float) -> list[float]:
    """The normalised per-dataset shares; bad weights or fractions fail before any output."""
    if not (0.0 < fraction <= 1.0):  # also rejects NaN
        raise UserError(f"data.fraction: must be in (0, 1], got {fraction}")
    n = max(1, len(datasets))
    if weights and len(weights) != n:
        raise UserError(f"data.weights: has {len(weights)} entries but data.datasets has {n}; give one weight per "
                        f"dataset")
    shares = [float(w) for w in weights] if weights else [1.0] * n
    if any(not (w >= 0) for w in shares) or sum(shares) <= 0:
        raise UserError(f"data.weights: must be non-negative with a positive sum, got {weights}")
    return [w / sum(shares) for w in shares]


def fraction_positions(ds: PatchDataset, fraction: float, seed: int) -> np.ndarray:
    """Positions (into `ds`) of a stratified subset holding `fraction` of every stratum, sorted."""
    if fraction >= 1.0:
        return np.arange(len(ds))
    soft, hard = ds.soft_labels, ds.hard_labels
    hard = np.where(np.isnan(hard), soft >= 0.5, hard >= 0.5).astype(int)
    strata = hard * 10 + np.digitize(np.nan_to_num(soft, nan=-1.0), SOFT_BINS)
    keep = []
    for k, stratum in enumerate(np.unique(strata)):
        members = np.flatnonzero(strata == stratum)
        order = np.random.default_rng([seed, int(stratum)]).permutation(len(members))
        count = max(1, int(round(fraction * len(members))))
        keep.append(members[order[:count]])
    return np.sort(np.concatenate(keep))


def keep_fraction(ds: PatchDataset, fraction: float, seed: int) -> PatchDataset:
    """Restrict a PatchDataset (in place) to its stratified `fraction`."""
    ds.indices = ds.indices[fraction_positions(ds, fraction, seed)]
    return ds


class Mixture(ConcatDataset):
    """Several PatchDatasets as one, with the label views `classifier.train` reads."""

    def __init__(self, parts: list[PatchDataset], shares: list[float] | None = None):
        super().__init__(parts)
        self.parts = parts
        self.shares = shares or [1.0 / len(parts)] * len(parts)
        self.root = parts[0].root
        self.patch_size = parts[0].patch_size
        self.meta = {"content_hash": None, "parts": [p.meta.get("content_hash") for p in parts]}

    @property
    def soft_labels(self) -> np.ndarray:
        return np.concatenate([p.soft_labels for p in self.parts])

    @property
    def hard_labels(self) -> np.ndarray:
        return np.concatenate([p.hard_labels for p in self.parts])

    def labels(self) -> np.ndarray:
        return np.concatenate([p.labels() for p in self.parts])

    def ids(self) -> list[str]:
        return [i for p in self.parts for i in p.ids()]

    def uint8(self, positions=None) -> np.ndarray:
        whole = np.concatenate([p.uint8() for p in self.parts])
        return whole if positions is None else whole[np.asarray(positions)]


def sampling_weights(parts: list[PatchDataset], shares: list[float], balance: float) -> np.ndarray | None:
    """Per-patch draw weights: dataset d gets shares[d] of the draws, of which `balance` are mitotic patches.

    None when nothing needs weighting (one dataset, no balancing): plain shuffling.
    """
    if balance <= 0 and len(parts) == 1:
        return None
    if balance > 0 and not 0 < balance < 1:
        raise UserError(f"data.balance: must be in [0, 1), got {balance}")
    out = []
    for part, share in zip(parts, shares):
        if balance <= 0:
            out.append(np.full(len(part), share / len(part)))
            continue
        hard = part.hard_labels
        mitotic = np.where(np.isnan(hard), part.soft_labels >= 0.5, hard >= 0.5)
        n_pos = int(mitotic.sum())
        if n_pos == 0 or n_pos == len(mitotic):
            raise UserError(f"{part.root / 'labels.csv'}: the train split holds only one class ({n_pos} mitotic of "
                            f"{len(mitotic)}); balanced sampling needs both")
        out.append(share * np.where(mitotic, balance / n_pos, (1 - balance) / (len(mitotic) - n_pos)))
    return np.concatenate(out)
