"""The explorer's HTTP contract beside the rendering: the body limit, each error's status and words, the headers
and the numbers the page reads (health, info, the grid), through FastAPI's test client with fake rendering."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve_helpers import make_explorer, shared_world

SLIDE = "slide.png"
MAX_BODY = 16_384  # make_explorer's default, as `serve --max-body`'s


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def client(world, tmp_path_factory):
    from fastapi.testclient import TestClient

    app = make_explorer(world, tmp_path_factory.mktemp("exports"), fake=True, max_body=MAX_BODY)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def padded(size: int) -> bytes:
    """A valid /nucleus body of exactly `size` bytes (JSON allows the trailing spaces)."""
    body = json.dumps({"slide": SLIDE, "x": 300, "y": 140}).encode()
    return body + b" " * (size - len(body))


def post(client, route: str, content) -> object:
    return client.post(route, content=content, headers={"content-type": "application/json"})


# -- the body limit ------------------------------------------------------------------------------------

def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413(client):
    assert post(client, "/nucleus", padded(MAX_BODY)).status_code == 200
    res = post(client, "/nucleus", padded(MAX_BODY + 1))  # valid JSON: only its size is wrong
    assert res.status_code == 413, res.text
    assert res.json() == {"error": f"request body larger than {MAX_BODY} bytes"}


def test_a_chunked_body_without_a_length_is_cut_off_at_the_limit(client):
    def chunks():  # a streamed body declares no Content-Length: the limit counts what arrives
        body = padded(3 * MAX_BODY)
        for start in range(0, len(body), 4096):
            yield body[start:start + 4096]

    res = post(client, "/nucleus", chunks())
    assert res.status_code == 413 and "larger than" in res.json()["error"]


def run_limited(headers: list, body: bytes, max_body: int = 100) -> tuple[int, bytes, bool]:
    """BodyLimit in front of an app that answers 200: (status, body, whether the app was reached)."""
    from serve.app import BodyLimit

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/nucleus", "headers": headers}
    asyncio.run(BodyLimit(app, max_body)(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), bool(reached)


def test_a_malformed_content_length_is_400_and_never_reaches_the_app():
    status, body, reached = run_limited([(b"content-length", b"ten")], b"{}")
    assert (status, json.loads(body), reached) == (400, {"error": "malformed Content-Length header"}, False)
    status, body, reached = run_limited([(b"content-length", b"2")], b"{}")
    assert (status, body, reached) == (200, b"ok", True)


# -- error statuses and words --------------------------------------------------------------------------

def test_malformed_json_is_400_and_says_so(client):
    res = post(client, "/nucleus", b"{not json")
    assert res.status_code == 400 and res.json() == {"error": "body: not valid JSON"}


def test_a_wrong_field_is_422_and_named_as_the_client_sent_it(client):
    res = post(client, "/nucleus", json.dumps({"slide": SLIDE, "x": "left", "y": 1}))
    assert res.status_code == 422 and res.json()["error"].startswith("field 'x': "), res.text


def test_a_wrong_method_is_405_not_a_missing_page(client):
    res = client.get("/nucleus")
    assert res.status_code == 405 and res.json() == {"error": "Method Not Allowed"}
    assert client.get("/no/such/page").json() == {"error": "not found"}


def test_an_internal_error_names_its_type_only(client, monkeypatch):
    def broken(*args):
        raise RuntimeError("/home/someone/secret/path.npy\nTraceback (most recent call last)")

    monkeypatch.setattr(client.app.state.explorer, "dataset_grid", broken)
    res = client.get("/datasets/patches/grid")
    assert res.status_code == 500 and res.json() == {"error": "internal error (RuntimeError)"}


def test_an_error_message_over_several_lines_is_answered_on_one(client, monkeypatch):
    from mitosis_ldm.errors import UserError

    def refuses(*args):
        raise UserError("first line\n    second line")

    monkeypatch.setattr(client.app.state.explorer, "dataset_grid", refuses)
    assert client.get("/datasets/patches/grid").json() == {"error": "first line second line"}


# -- headers and the numbers the page reads -----------------------------------------------------------

def test_tiles_may_be_cached_by_the_browser(client):
    res = client.get(f"/slides/{SLIDE}_files/10/0_0.jpeg")
    assert res.status_code == 200 and res.headers["cache-control"] == "max-age=3600"


def test_exports_are_served_with_their_own_content_types(client):
    export = client.post("/export", json={"slide": SLIDE, "x": 300, "y": 140, "steps": 2,
                                          "conditions": "0:1:3"}).json()
    png, meta = client.get(export["png"]), client.get(export["json"])
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert meta.headers["content-type"] == "application/json" and meta.json()["settings"]["steps"] == 2


def test_the_grid_shows_24_per_bin_unless_asked_and_takes_1_to_200(client):
    grid = client.get("/datasets/patches/grid").json()
    assert [len(b["items"]) for b in grid["bins"]] == [min(b["count"], 24) for b in grid["bins"]]
    assert max(b["count"] for b in grid["bins"]) > 3  # 24 patches: some bin holds more than a few
    assert client.get("/datasets/patches/grid?per_bin=200").status_code == 200
    res = client.get("/datasets/patches/grid?per_bin=201")
    assert res.status_code == 400 and res.json()["error"] == "field 'per_bin': must be in [1, 200], got 201"


def test_info_gives_the_sdedit_strength_apart_from_the_inversion_default(client, monkeypatch):
    pipeline = client.app.state.explorer.pipeline
    monkeypatch.setitem(pipeline.info, "default_real2gen_strength", 0.8)
    info = client.get("/api/info").json()
    assert info["defaults"]["strength"] != 0.5 and info["sdedit_strength"] == 0.5


def test_health_counts_slides_datasets_and_the_queue_limit(world, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from diffusion.pipeline import MitosisPipeline
    from serve.app import create_app
    from serve.explorer import Explorer
    from serve.tiles import SlideRegistry
    from serve.worker import ModelWorker
    from serve_helpers import DarknessEnsemble, fake_render

    second = shutil.copy(world["slide"], tmp_path / "second.png")
    explorer = Explorer(SlideRegistry([str(world["slide"]), str(second)]), {},
                        MitosisPipeline.from_pretrained(world["pipeline"]), DarknessEnsemble(), tmp_path / "exports",
                        render_fn=fake_render)
    with TestClient(create_app(explorer, ModelWorker(3))) as test_client:
        health = test_client.get("/healthz").json()
        assert (health["slides"], health["datasets"], health["queue_limit"]) == (2, 0, 3)
        info = test_client.get("/api/info").json()
        assert [s["name"] for s in info["slides"]] == [SLIDE, "second.png"] and info["datasets"] == []
