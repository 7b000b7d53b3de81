"""A short, bounded version of bench/serve_load.py: concurrent clients, then malformed requests, on 127.0.0.1."""

from __future__ import annotations

import os

from serve_helpers import NUCLEI, make_explorer, shared_world


def test_concurrent_clients_then_malformed_requests(tmp_path, tmp_path_factory):
    from serve.drills import malformed, mixed_load
    from serve.launch import server_thread

    world = shared_world(tmp_path_factory)
    app = make_explorer(world, tmp_path / "exports", fake=True, queue=16)
    with server_thread(app) as url:
        # fake rendering keeps it cheap; the routes, worker queue, caches and tiler are the real ones
        load = mixed_load(url, "slide.png", NUCLEI, clients=8, seconds=4, pid=os.getpid(),
                          settings={"steps": 2}, guidances=(1.0, 2.0, 3.0), transition_share=0.4)
        faults = malformed(url, "slide.png", count=60)
        assert app.state.worker.pending == 0
    assert load["requests"] > 20 and load["transitions"] > 0 and load["tiles"] > 0
    assert load["errors"] == 0, load["status"]
    assert faults["all_4xx"], faults["not_4xx"]
    assert not faults["not_one_line"], faults["not_one_line"]
    assert faults["healthy_after"]
