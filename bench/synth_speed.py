"""Synthetic benchmark generation speed at 64x64, printed as JSON.

    python bench/synth_speed.py [--n 5000] [--workers 2]

Measured side by side in one run:
- `vectorised`: the renderer over batches of 32 patches, as `data synth` runs it (one process; CPU and wall time);
- `per_patch` (the peer): the same renderer called one patch at a time, i.e. without
  vectorisation (measured on a subset, the rate is what matters);
- `end_to_end`: `mitosis-ldm data synth` itself (worker processes, votes, writing the dataset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np


def rate(fn, n: int) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"patches": n, "wall_s": round(wall, 3), "patches_per_s": round(n / wall, 1),
            "patches_per_cpu_s": round(n / cpu, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--per-patch-n", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    from patches.cli import main as data_main
    from patches.synth import draw_degree, render

    size, margin = 64, 8
    stored = size + 2 * margin
    rng = np.random.default_rng(0)
    degree, imposter = draw_degree(args.n, rng)
    render(degree[:8], imposter[:8], stored, size, rng)  # warm-up (imports, FFT plans)

    def vectorised():
        for lo in range(0, args.n, 32):
            render(degree[lo: lo + 32], imposter[lo: lo + 32], stored, size, rng)

    def per_patch():
        for i in range(args.per_patch_n):
            render(degree[i: i + 1], imposter[i: i + 1], stored, size, rng)

    results = {"size": size, "stored_size": stored, "cpu_count": os.cpu_count()}
    results["vectorised"] = rate(vectorised, args.n)
    results["per_patch"] = rate(per_patch, args.per_patch_n)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "synth")

        def end_to_end():
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
                data_main(["synth", "--out", out, "--n", str(args.n), "--size", str(size), "--seed", "0",
                           "--workers", str(args.workers)])

        results["end_to_end"] = {**rate(end_to_end, args.n), "workers": args.workers}
        results["end_to_end"].pop("patches_per_cpu_s")  # the work runs in worker processes
    results["speedup_vectorised_vs_per_patch"] = round(
        results["vectorised"]["patches_per_s"] / results["per_patch"]["patches_per_s"], 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
