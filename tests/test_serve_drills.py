"""The explorer's drills judge a server rightly: run against a scripted stand-in server on 127.0.0.1, they report
the 5xx answers, multi-line errors, sick health and failed tile loads that a broken explorer would give."""

from __future__ import annotations

import json

import pytest

from serve.drills import malformed, malformed_requests, mixed_load
from serve.launch import server_thread

SLIDE = "slide.png"


class Stub:
    """An ASGI app whose answers the test sets: `answer` for every request, `health` for GET /healthz."""

    def __init__(self):
        self.answer = (400, b'{"error": "bad request"}')
        self.health = {"status": "ok"}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        while (await receive()).get("more_body"):  # read the whole body, huge ones included
            pass
        request = (scope["method"], scope["path"])
        if request == ("GET", "/healthz"):
            status, body = 200, json.dumps(self.health).encode()
        elif request == ("GET", f"/slides/{SLIDE}.dzi"):
            status, body = 200, b'<Image TileSize="254"><Size Width="600" Height="500"/></Image>'
        else:
            status, body = self.answer
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def stub():
    app = Stub()
    with server_thread(app) as url:
        yield app, url


def test_a_well_behaved_server_passes(stub):
    app, url = stub
    app.answer, app.health = (400, b'{"error": "bad request"}'), {"status": "ok"}
    faults = malformed(url, SLIDE, count=30)
    assert faults["all_4xx"] and not faults["not_one_line"] and faults["healthy_after"], faults


@pytest.mark.parametrize("answer, health, verdict", [
    ((500, b'{"error": "internal"}'), {"status": "ok"}, "all_4xx"),
    ((200, b'{"ok": true}'), {"status": "ok"}, "all_4xx"),
    ((400, b'{"error": "bad",\n"trace": "Traceback"}'), {"status": "ok"}, "not_one_line"),
    ((404, b"<html>not found</html>"), {"status": "ok"}, "not_one_line"),
    ((400, b'{"error": "bad request"}'), {"status": "degraded"}, "healthy_after"),
])
def test_malformed_drill_reports_what_a_broken_server_does(stub, answer, health, verdict):
    app, url = stub
    app.answer, app.health = answer, health
    faults = malformed(url, SLIDE, count=30)
    assert (not faults[verdict]) if verdict != "not_one_line" else faults[verdict], faults
    if verdict == "all_4xx":
        assert faults["not_4xx"] and f"-> {answer[0]}" in faults["not_4xx"][0]


def test_mixed_load_counts_every_answer_but_200_as_an_error(stub):
    app, url = stub
    app.answer = (404, b'{"error": "no such tile"}')
    load = mixed_load(url, SLIDE, [(10, 10)], clients=2, seconds=0.5, transition_share=0.0)
    assert load["requests"] > 0 and load["errors"] == load["requests"] == load["tiles"], load
    assert load["transitions"] == 0 and load["status"] == {"404": load["requests"]}


def test_malformed_requests_cycle_through_every_kind():
    requests = malformed_requests(SLIDE, count=200)
    kinds = {(method, path, body) for method, path, body, _ in requests}
    assert len(kinds) >= 20 and {method for method, *_ in kinds} >= {"GET", "POST", "DELETE"}
    n = len(kinds)
    assert len({(m, p, b) for m, p, b, _ in requests[:n]}) == n and requests[n] == requests[0]


def test_mixed_load_reports_the_memory_peak_not_only_where_it_ended(stub, monkeypatch):
    import serve.drills

    app, url = stub
    app.answer = (404, b'{"error": "no such tile"}')
    readings = iter([100.0, 100.0, 150.0, 120.0])  # before the load, during it (a peak), then after it

    def rss(pid):
        return next(readings, 110.0)  # the last reading, after the load, once the samples run out

    monkeypatch.setattr(serve.drills, "rss_mb", rss)
    load = mixed_load(url, SLIDE, [(10, 10)], clients=1, seconds=1.2, pid=1, transition_share=0.0)
    memory = load["rss_mb"]
    assert memory["before"] == 100.0 and memory["max"] == 150.0, memory
    assert memory["growth"] == 0.5  # the peak over the start, though the process gave memory back by the end
