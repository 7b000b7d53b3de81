"""Load and fault drills against a running explorer on localhost (bench/serve_load.py and the tests use them).

    load = mixed_load(url, slide, points, clients=8, seconds=60, pid=server_pid)   # no errors, RSS flat
    faults = malformed(url, slide, count=200)                                      # every answer a 4xx

Both are bounded in time and count and only ever talk to the given URL.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from urllib.parse import urlsplit


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 300.0) -> tuple[int, bytes]:
    """One HTTP request on a fresh connection; (status, body). A connection error is status 0."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        return res.status, res.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def post_json(url: str, path: str, obj) -> tuple[int, bytes]:
    return request(url, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})


def tile_paths(url: str, slide: str, limit: int = 200) -> list[str]:
    """Tile URLs of the slide's three finest Deep Zoom levels (what a pan/zoom asks for)."""
    import math
    import re

    _, text = request(url, "GET", f"/slides/{slide}.dzi")
    width, height = (int(v) for v in re.search(rb'Width="(\d+)" Height="(\d+)"', text).groups())
    top = math.ceil(math.log2(max(width, height)))
    paths = []
    for level in (top, top - 1, top - 2):
        scale = 2 ** (top - level)
        cols, rows = math.ceil(width / scale / 254), math.ceil(height / scale / 254)
        paths += [f"/slides/{slide}_files/{level}/{c}_{r}.jpeg" for r in range(rows) for c in range(cols)]
    return paths[:limit]


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2 ** 20


def mixed_load(url: str, slide: str, points: list[tuple[int, int]], clients: int = 8, seconds: float = 60.0,
               pid: int | None = None, transition_share: float = 0.3, settings: dict | None = None,
               guidances=(None,), seed: int = 0) -> dict:
    """`clients` threads for `seconds`, each looping tile GETs and /transition POSTs (new and repeated)."""
    tiles = tile_paths(url, slide)
    settings = dict(settings or {})
    status = Counter()
    times = {"tile": [], "transition": []}
    lock = threading.Lock()
    stop = time.time() + seconds
    memory = []

    def client(k: int):
        rng = random.Random(seed * 1000 + k)
        while time.time() < stop:
            t0 = time.perf_counter()
            if rng.random() < transition_share:
                x, y = rng.choice(points)
                guidance = rng.choice(guidances)
                body = {"slide": slide, "x": x, "y": y, **settings}
                if guidance is not None:
                    body["guidance"] = guidance
                code, _ = post_json(url, "/transition", body)
                kind = "transition"
            else:
                code, _ = request(url, "GET", rng.choice(tiles))
                kind = "tile"
            with lock:
                status[code] += 1
                times[kind].append(time.perf_counter() - t0)

    def sample_memory():
        while time.time() < stop:
            memory.append(rss_mb(pid))
            time.sleep(0.5)

    before = rss_mb(pid) if pid else None
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    if pid:
        threads.append(threading.Thread(target=sample_memory))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = rss_mb(pid) if pid else None
    out = {"clients": clients, "seconds": seconds, "requests": sum(status.values()),
           "status": {str(k): v for k, v in sorted(status.items())},
           "errors": sum(v for k, v in status.items() if k != 200),
           "tiles": len(times["tile"]), "transitions": len(times["transition"])}
    if pid:
        out["rss_mb"] = {"before": round(before, 1), "after": round(after, 1), "max": round(max(memory + [after]), 1),
                         "growth": round(max(memory + [after]) / before - 1, 4)}
    return out


def malformed_requests(slide: str, count: int = 200) -> list[tuple[str, str, bytes | None, dict]]:
    """`count` bad requests cycling through the kinds a client can get wrong (method, path, body, headers)."""
    js = {"Content-Type": "application/json"}
    kinds = [
        ("POST", "/nucleus", b"{not json", js),
        ("POST", "/nucleus", b'{"slide": "%s", "x": NaN, "y": 1}' % slide.encode(), js),
        ("POST", "/transition", b'{"slide": "%s", "x": 1, "y": -Infinity}' % slide.encode(), js),
        ("POST", "/nucleus", b'{"slide": "%s", "x": 99999999, "y": 1}' % slide.encode(), js),
        ("POST", "/nucleus", b'{"slide": "%s", "x": -5, "y": 1}' % slide.encode(), js),
        ("POST", "/nucleus", b'{"slide": "../../etc/passwd", "x": 1, "y": 1}', js),
        ("POST", "/transition", b'{"slide": "%s", "x": 1, "y": 1, "strength": 7}' % slide.encode(), js),
        ("POST", "/transition", b'{"slide": "%s", "x": 1, "y": 1, "conditions": "a:b:c"}' % slide.encode(), js),
        ("POST", "/transition", b'{"dataset": "../../etc", "index": 0}', js),
        ("POST", "/nucleus", b'{"slide": "x", "x": 1, "y": 1}' + b" " * 1_000_000, js),  # huge body
        ("POST", "/transition", b"[" + b"1," * 200_000 + b"1]", js),                    # huge body
        ("POST", "/nucleus", b"\xff\xfe\x00garbage", js),
        ("POST", "/nucleus", b'{"slide": 5, "x": [], "y": {}}', js),
        ("POST", "/export", b"null", js),
        ("GET", "/slides/../../etc/passwd.dzi", None, {}),
        ("GET", "/slides/..%2F..%2Fetc%2Fpasswd.dzi", None, {}),
        ("GET", "/static/../../../../etc/passwd", None, {}),
        ("GET", "/exports/..%2F..%2Fetc%2Fpasswd", None, {}),
        ("GET", f"/slides/{slide}_files/99/0_0.jpeg", None, {}),
        ("GET", f"/slides/{slide}_files/0/-1_0.jpeg", None, {}),
        ("GET", "/datasets/..%2F..%2Fetc/grid", None, {}),
        ("GET", "/nucleus", None, {}),
        ("DELETE", "/healthz", None, {}),
    ]
    return [kinds[i % len(kinds)] for i in range(count)]


def malformed(url: str, slide: str, count: int = 200) -> dict:
    """Send `count` bad requests one by one; every answer should be a 4xx with a one-line JSON error."""
    status = Counter()
    not_4xx, not_one_line = [], []
    for method, path, body, headers in malformed_requests(slide, count):
        code, text = request(url, method, path, body, headers)
        status[code] += 1
        if not 400 <= code < 500:
            not_4xx.append(f"{method} {path[:60]} -> {code}")
        elif b"\n" in text or not text.startswith(b'{"error":'):
            not_one_line.append(f"{method} {path[:60]}: {text[:80]!r}")
    health_code, health = request(url, "GET", "/healthz")
    return {"requests": count, "status": {str(k): v for k, v in sorted(status.items())},
            "all_4xx": not not_4xx, "not_4xx": not_4xx[:10], "not_one_line": not_one_line[:10],
            "healthy_after": health_code == 200 and json.loads(health).get("status") == "ok"}
