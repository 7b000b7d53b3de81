"""Tiny reader-study inputs: a patch dataset of drawn nuclei, a transitions and a real2gen folder, and a study."""

from __future__ import annotations

import numpy as np

from mitosis_ldm.artifacts import write_transitions
from patches.dataset import SplitConfig, build_dataset

from report_helpers import draw_nucleus, synth_shard

SIZE = 32
CONDITIONS = [0.0, 0.25, 0.5, 0.75, 1.0]


def make_inputs(root, n_patches: int = 120, n_seeds: int = 4):
    """ds/ (soft labels in thirds, test split 30%), tr/ (seeds x 5 conditions), r2g/ (input column + 3)."""
    build_dataset(root / "ds", [("a", synth_shard, {"n": n_patches, "size": SIZE, "seed": 5})], patch_size=SIZE,
                  margin=0, meta={"source": "fake"}, split=SplitConfig(mode="random", val=0.1, test=0.3),
                  progress=False)
    write_nuclei(root / "tr", 300, n_seeds)
    r2g = np.stack([np.stack([draw_nucleus(0.3, 900 + s, SIZE)] + [draw_nucleus(c, 950 + s, SIZE)
                                                                   for c in (0.0, 0.5, 1.0)]) for s in range(2)])
    write_transitions(root / "r2g", r2g, {"seeds": [0, 1], "conditions": [None, 0.0, 0.5, 1.0],
                                          "has_input_frame": True, "kind": "real2gen"})
    return root


def write_nuclei(path, first_seed: int, n_seeds: int = 4, size: int = SIZE):
    """A transitions folder of drawn nuclei: seeds 0..n_seeds-1 x CONDITIONS, pixels drawn from first_seed on."""
    frames = np.stack([np.stack([draw_nucleus(c, first_seed + s, size) for c in CONDITIONS]) for s in range(n_seeds)])
    write_transitions(path, frames, {"seeds": list(range(n_seeds)), "conditions": CONDITIONS})
    return path
