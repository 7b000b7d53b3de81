"""Slide explorer latency over HTTP: first /transition, cached /transition (a slider move), tiles.

    python bench/serve_latency.py [--root runs/demo] [--slide data/cache/cmu_small_region.svs] [--threads 2]
        [--nuclei 10] [--repeats 30] [--tiles 150] [--peer eager|cpu|none] [--out runs/serve/latency.json]

Starts `mitosis-ldm serve` on 127.0.0.1 (a child process with the demo pipeline and classifier), then times,
as a client would see them:
- first /transition: a click on a nucleus not asked for before (detector re-centring, real2gen render of
  11 frames at the pipeline's defaults, ensemble scores, morphology), one per nucleus the demo's
  `data detect` found in the held-out region;
- cached /transition: the same request again (what an export or re-render costs; the page's slider itself
  holds all frames and needs no request);
- tile: distinct Deep Zoom tiles of the three finest levels, first fetch (not in the server's tile cache).
The peer, a second server started with `--eager` (the UNet and decoder as plain modules instead of frozen
traced graphs), or with `--peer cpu` the same server kept off the GPU (`CUDA_VISIBLE_DEVICES=`), renders the
same clicks interleaved with the first, so the speed-up holds even when the machine's speed drifts during the
run (on the 2-core host it drifts by up to about 30 % within an hour).
Prints JSON with p50/p95 in ms and the load average beside them (other jobs on the machine inflate times).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.drills import post_json, request, tile_paths  # noqa: E402
from serve.launch import server_process  # noqa: E402


def demo_nuclei(dataset: Path, count: int) -> list[tuple[int, int]]:
    """Centres of nuclei `data detect` found, held-out split first, spread over the list."""
    with open(dataset / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = [r for r in rows if r.get("split") == "test"] + [r for r in rows if r.get("split") != "test"]
    pick = np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int)
    return [(int(float(rows[i]["x"])), int(float(rows[i]["y"]))) for i in pick]


def percentiles(times: list[float]) -> dict:
    ms = np.array(times) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1)}


def timed(fn) -> tuple[float, tuple]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


PEERS = {"eager": "`serve --eager` (plain modules)", "cpu": "the same server on the CPU", "none": ""}


def demo_models(root: Path, slide: Path):
    """(pipeline, classifier, cmu dataset) of a demo run, or None after printing a JSON 'skipped' line."""
    pipeline, classifier, cmu = root / "diffusion/model", root / "classifier/model", root / "data/cmu"
    if not ((pipeline / "pipeline.json").exists() and (classifier / "config.json").exists() and slide.exists()):
        print(json.dumps({"skipped": f"no trained demo models under {root} or no {slide}: run make demo"}))
        return None
    return pipeline, classifier, cmu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/demo"))
    parser.add_argument("--slide", type=Path, default=Path("data/cache/cmu_small_region.svs"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nuclei", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tiles", type=int, default=150)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--peer", choices=sorted(PEERS), default="eager",
                        help="the side-by-side server: eager (`serve --eager`, the default), cpu (on a GPU host: "
                             "the same server on the CPU) or none")
    args = parser.parse_args(argv)
    found = demo_models(args.root, args.slide)
    if found is None:
        return
    pipeline, classifier, cmu = found
    nuclei = demo_nuclei(cmu, args.nuclei + 1)
    load_before = os.getloadavg()
    serve_args = ["--pipeline", pipeline, "--classifier", classifier, "--slides", args.slide,
                  "--threads", str(args.threads), "--exports", "/tmp/serve-bench-exports"]
    proc, url = server_process(serve_args)
    peer = None
    if args.peer == "eager":
        peer = server_process([*serve_args, "--eager"])
    elif args.peer == "cpu":
        peer = server_process(serve_args, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    slide = args.slide.name
    try:
        warm, _ = timed(lambda: post_json(url, "/transition", {"slide": slide, "x": nuclei[0][0], "y": nuclei[0][1]}))
        if peer:
            timed(lambda: post_json(peer[1], "/transition", {"slide": slide, "x": nuclei[0][0], "y": nuclei[0][1]}))
        first, first_peer, cached, statuses = [], [], [], []
        for i, (x, y) in enumerate(nuclei[1:]):
            body = {"slide": slide, "x": x, "y": y}
            # the peer (plain eager modules) renders the same click right before or after, alternately, so a
            # slower spell of the machine hits both
            order = [(url, first), (peer[1], first_peer)] if peer else [(url, first)]
            for target, times in (order if i % 2 == 0 else order[::-1]):
                seconds, (code, text) = timed(lambda: post_json(target, "/transition", body))
                statuses.append(code)
                times.append(seconds)
                if target == url:
                    frames = len(json.loads(text)["frames"]) if code == 200 else 0
        if peer:
            peer[0].terminate()
            peer[0].wait(timeout=30)
            peer = None
        body = {"slide": slide, "x": nuclei[1][0], "y": nuclei[1][1]}
        for _ in range(args.repeats):
            seconds, (code, text) = timed(lambda: post_json(url, "/transition", body))
            statuses.append(code)
            assert code != 200 or json.loads(text)["cached"]
            cached.append(seconds)
        tiles, refetch = [], []
        paths = tile_paths(url, slide, limit=args.tiles)
        for path in paths:
            seconds, (code, _) = timed(lambda: request(url, "GET", path))
            statuses.append(code)
            tiles.append(seconds)
        for path in paths[: args.repeats]:
            refetch.append(timed(lambda: request(url, "GET", path))[0])
        _, health = request(url, "GET", "/healthz")
        info = json.loads(request(url, "GET", "/api/info")[1])
    finally:
        for child in (proc, peer[0] if peer else None):
            if child is not None:
                child.terminate()
                child.wait(timeout=30)
    result = {
        "server": {"pipeline": str(pipeline), "classifier": str(classifier), "slide": str(args.slide),
                   "threads": args.threads, "frames_per_transition": frames},
        "first_transition": {**percentiles(first), "target_ms": 1000, "warmup_first_call_ms": round(warm * 1000, 1)},
        **({f"first_transition_peer_{args.peer}": {
            **percentiles(first_peer), "what": f"the same clicks on {PEERS[args.peer]}, interleaved",
            "speedup_p50": round(float(np.percentile(first_peer, 50) / np.percentile(first, 50)), 3)}}
           if first_peer else {}),
        "cached_transition": {**percentiles(cached), "target_ms": 50},
        "tile_first_fetch": {**percentiles(tiles), "target_ms": 30},
        "tile_cached": percentiles(refetch),
        "non_200": sum(1 for s in statuses if s != 200),
        "health": json.loads(health),
        **{key: info[key] for key in ("device", "traced", "eager_reason")},
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
