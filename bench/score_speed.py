"""Throughput of `mitosis-ldm score` on 1,000 PNG patches (CPU), with the bare forward pass beside it.

    python bench/score_speed.py [--classifier runs/demo/classifier] [--n 1000] [--repeat 3]

Prints one JSON object. `score` is the real command end to end in this process
(load the ensemble, read PNGs, crop, normalise, K members, CSV); the peer `timm_forward` is the same K timm
networks called on tensors already in memory (no I/O, no preprocessing), i.e.
the ceiling the command could reach. Without a trained classifier the demo
profile's architecture is used untrained: speed does not depend on weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classifier import score  # noqa: E402
from classifier.model import ClassifierEnsemble, MitosisClassifier, to_network_input  # noqa: E402
from classifier.train import ClassifierConfig  # noqa: E402
from mitosis_ldm.config import load_config  # noqa: E402
from mitosis_ldm.images import save_png  # noqa: E402


def demo_ensemble(root: Path) -> Path:
    cfg = load_config(ClassifierConfig, root / "configs" / "demo" / "classifier.yaml")
    members = []
    for k in range(cfg.ensemble.members):
        torch.manual_seed(k)
        members.append(MitosisClassifier(cfg.model))
    folder = Path(tempfile.mkdtemp(prefix="bench-cls-")) / "classifier"
    ClassifierEnsemble(cfg.model, members, list(range(cfg.ensemble.members))).save_pretrained(folder)
    return folder


def patches(n: int, size: int, root: Path) -> np.ndarray:
    synth = root / "runs" / "demo" / "data" / "synth"
    if (synth / "dataset.json").exists():
        from patches.dataset import PatchDataset

        ds = PatchDataset(synth)
        return ds.uint8(np.arange(min(n, len(ds))))
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", type=Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many interleaved runs")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    folder = args.classifier or (root / "runs/demo/classifier/model"
                                 if (root / "runs/demo/classifier/model/config.json").exists() else None)
    trained = folder is not None
    folder = folder or demo_ensemble(root)
    ens = ClassifierEnsemble.from_pretrained(folder)
    images = patches(args.n, ens.patch_size, root)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, image in enumerate(images):
            save_png(tmp / "png" / f"patch-{i:05d}.png", image)
        x = to_network_input(images)
        score_times, forward_times = [], []
        for _ in range(args.repeat):  # interleaved, best of N: the cores may be shared
            t0 = time.perf_counter()
            score.main(["--classifier", str(folder), str(tmp / "png"), "--out", str(tmp / "scores.csv"),
                        "--batch-size", str(args.batch_size), "--quiet", "--overwrite"])
            score_times.append(time.perf_counter() - t0)
            with torch.no_grad():  # the peer: bare networks on tensors already in memory
                t0 = time.perf_counter()
                for start in range(0, len(x), args.batch_size):
                    for member in ens.member_models:
                        member.net(x[start: start + args.batch_size] / 255.0)
                forward_times.append(time.perf_counter() - t0)
    score_s, forward_s = min(score_times), min(forward_times)
    print(json.dumps({
        "benchmark": "classifier score",
        "patches": len(images),
        "patch_size": ens.patch_size,
        "members": ens.members,
        "model": ens.cfg.name,
        "trained_weights": trained,
        "score_patches_per_s": round(len(images) / score_s, 1),
        "score_seconds": round(score_s, 2),
        "score_seconds_all_runs": [round(t, 2) for t in score_times],
        "peer_timm_forward_patches_per_s": round(len(images) / forward_s, 1),
        "score_vs_bare_forward": round(forward_s / score_s, 3),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
