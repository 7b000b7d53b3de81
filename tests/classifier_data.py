"""Tiny labelled patch datasets for the classifier tests (a dark nucleus whose darkness is the degree)."""

from __future__ import annotations

import numpy as np

from patches.dataset import Shard, SplitConfig, build_dataset


def toy_shard(n: int, size: int, seed: int, unlabelled_every: int = 0) -> Shard:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    images, rows = [], []
    for i in range(n):
        degree = float(rng.random())
        radius = rng.uniform(0.18, 0.28) * size
        disc = (xx ** 2 + yy ** 2) < radius ** 2
        image = np.empty((size, size, 3), np.float32)
        image[:] = (230, 180, 200)  # eosin-pink background
        image[disc] = np.array([170, 110, 170]) * (1 - 0.75 * degree)  # darker nucleus as degree rises
        image += rng.normal(0, 6, image.shape)
        images.append(image.clip(0, 255).astype(np.uint8))
        votes = (degree + rng.normal(0, 0.12, 3) > 0.5).astype(int)
        row = {"id": f"toy-{seed}-{i}", "source": "toy", "slide": "toy", "x": i, "y": 0,
               "label": float(votes.mean()), "votes": ";".join(map(str, votes)),
               "hard_label": int(votes.mean() >= 0.5), "true_degree": degree}
        if unlabelled_every and i % unlabelled_every == 0:
            row.update(label=None, votes="", hard_label=None)
        rows.append(row)
    return Shard(np.stack(images), rows)


def make_toy_dataset(out, n: int = 160, size: int = 32, seed: int = 0, unlabelled_every: int = 0):
    return build_dataset(out, [("toy", toy_shard, {"n": n, "size": size, "seed": seed,
                                                   "unlabelled_every": unlabelled_every})],
                         patch_size=size, margin=0, meta={"source": "toy", "mpp": 0.25},
                         split=SplitConfig(mode="random", val=0.2, test=0.2, seed=seed), progress=False)
