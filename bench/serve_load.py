"""Slide explorer under load, then under abuse: 8 clients for 60 s, then 200 malformed requests (localhost only).

    python bench/serve_load.py [--root runs/demo] [--slide data/cache/cmu_small_region.svs] [--clients 8]
        [--seconds 60] [--malformed 200] [--threads 2] [--out runs/serve/load.json]

Starts `mitosis-ldm serve` on 127.0.0.1 with the demo models (a child process, so its resident memory is
the server's alone), warms it (six nuclei rendered at the default guidance, the tiles once), then:
- `--clients` threads for `--seconds`, each looping Deep Zoom tile GETs (70%) and /transition POSTs (30%)
  on those nuclei, half at the default guidance (cache hits), half at one of 40 other guidances (new
  renders, each at most once, more than a minute holds): any non-200 answer
  counts as an error; the server's RSS is sampled every 0.5 s and its growth over the post-warm-up
  value reported (target: within 10%);
- `--malformed` bad requests (bad JSON, NaN/Infinity, huge bodies, ../ traversal, coordinates outside the
  slide, wrong types and methods): every answer should be a 4xx with a one-line JSON error, and
  /healthz should still answer afterwards.
Prints JSON with the load average beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_latency import demo_models, demo_nuclei  # noqa: E402
from serve.drills import malformed, mixed_load, post_json, request, rss_mb, tile_paths  # noqa: E402
from serve.launch import server_process  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/demo"))
    parser.add_argument("--slide", type=Path, default=Path("data/cache/cmu_small_region.svs"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--malformed", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    found = demo_models(args.root, args.slide)
    if found is None:
        return
    pipeline, classifier, cmu = found
    nuclei = demo_nuclei(cmu, 6)
    slide = args.slide.name
    load_before = os.getloadavg()
    proc, url = server_process(["--pipeline", pipeline, "--classifier", classifier, "--slides", args.slide,
                                "--threads", str(args.threads), "--exports", "/tmp/serve-bench-exports"])
    try:
        rss_start = rss_mb(proc.pid)
        for x, y in nuclei:  # the default renders are cached before the clock starts
            post_json(url, "/transition", {"slide": slide, "x": x, "y": y})
        for path in tile_paths(url, slide):
            request(url, "GET", path)
        # half the transitions repeat a cached default render; the other half ask for one of 40 guidances that
        # differ from the default, so new renders (6 nuclei x 40) keep the model busy for the whole run
        default = json.loads(request(url, "GET", "/api/info")[1])["defaults"]["guidance"]
        fresh = tuple(round(default + 0.05 * k, 2) for k in range(1, 41))
        load = mixed_load(url, slide, nuclei, clients=args.clients, seconds=args.seconds, pid=proc.pid,
                          guidances=(None,) * len(fresh) + fresh)
        rendered = json.loads(request(url, "GET", "/healthz")[1])["cached_transitions"] - len(nuclei)
        faults = malformed(url, slide, args.malformed)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {
        "load": {**load, "new_renders": rendered, "rss_mb_at_start_before_warmup": round(rss_start, 1),
                 "memory_flat_within_10pct": load["rss_mb"]["growth"] <= 0.10, "no_errors": load["errors"] == 0},
        "malformed": faults,
        "server_alive_after": alive,
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
