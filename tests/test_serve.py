"""The slide explorer's routes through FastAPI's test client: tiles, nucleus, transition, cache, export, safety."""

from __future__ import annotations

import base64
import io
import json
import shlex
import threading

import numpy as np
import pytest

from serve_helpers import NUCLEI, SLIDE_SIZE, make_explorer, shared_world

SLIDE = "slide.png"
FAST = {"steps": 2, "conditions": "0:1:3"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def client(world, tmp_path_factory):
    from fastapi.testclient import TestClient

    app = make_explorer(world, tmp_path_factory.mktemp("exports"))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def decode(uri: str) -> np.ndarray:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def one_line_error(res, status: int | None = None) -> str:
    assert 400 <= res.status_code < 500, (res.status_code, res.text)
    if status is not None:
        assert res.status_code == status, (res.status_code, res.text)
    assert "\n" not in res.text and "Traceback" not in res.text
    body = res.json()
    assert set(body) == {"error"} and body["error"]
    return body["error"]


def test_slide_list_dzi_and_tiles(client):
    slides = client.get("/slides").json()
    assert slides == [{"name": SLIDE, "width": SLIDE_SIZE[0], "height": SLIDE_SIZE[1], "mpp": None,
                       "dzi": f"/slides/{SLIDE}.dzi"}]
    dzi = client.get(f"/slides/{SLIDE}.dzi")
    assert dzi.status_code == 200 and 'Width="560" Height="420"' in dzi.text and 'Format="jpeg"' in dzi.text
    top = 10  # ceil(log2(560)) : the full-resolution level
    tile = client.get(f"/slides/{SLIDE}_files/{top}/1_1.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    assert tile.content[:2] == b"\xff\xd8"
    assert client.get(f"/slides/{SLIDE}_files/{top}/1_1.jpeg").content == tile.content  # cached, identical
    one_line_error(client.get(f"/slides/{SLIDE}_files/{top}/9_0.jpeg"), 404)    # no such column
    one_line_error(client.get(f"/slides/{SLIDE}_files/{top + 1}/0_0.jpeg"), 404)  # no such level
    one_line_error(client.get("/slides/other.svs.dzi"), 404)


@pytest.mark.parametrize("url", [
    "/slides/..%2F..%2Fetc%2Fpasswd.dzi", "/slides/../../etc/passwd.dzi", "/static/../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/serve/app.py", "/exports/..%2Fpipeline%2Fpipeline.json", "/exports/.hidden.json",
    "/datasets/..%2Fpatches/grid", "/datasets/patches/patch/99999.png", "/nope",
])
def test_paths_outside_the_given_folders_are_404(client, url):
    res = client.get(url)
    assert res.status_code == 404, (url, res.status_code, res.text[:100])
    assert "root:" not in res.text


def test_click_is_recentred_on_the_nearest_nucleus(client):
    for x, y in NUCLEI[:3]:
        res = client.post("/nucleus", json={"slide": SLIDE, "x": x + 6, "y": y - 5}).json()
        assert res["detected"] and abs(res["centre"][0] - x) <= 1 and abs(res["centre"][1] - y) <= 1
        patch = decode(res["patch"])
        assert patch.shape == (64, 64, 3) and patch[32, 32].mean() < 170  # the nucleus sits in the middle
        assert 0 <= res["score"] <= 1 and res["score_std"] >= 0
    empty = client.post("/nucleus", json={"slide": SLIDE, "x": 300, "y": 400}).json()  # tissue, no nucleus near
    assert not empty["detected"] and empty["centre"] == [300, 400]


@pytest.mark.slow
def test_transition_is_cached_and_export_reproduces_with_real2gen(client, world, tmp_path):
    body = {"slide": SLIDE, "x": 303, "y": 137, "mode": "invert", "strength": 0.5, "guidance": 2.0, **FAST}
    import torch

    threads = torch.get_num_threads()
    first = client.post("/transition", json=body).json()
    assert torch.get_num_threads() == threads  # scoring on one thread beside the measuring one, then restored
    assert first["cached"] is False and first["settings"]["conditions"] == [0.0, 0.5, 1.0]
    assert first["source"]["centre"] == [300, 140]
    assert len(first["frames"]) == 3 and len(first["scores"]) == 3 and len(first["scores_std"]) == 3
    assert all(0 <= s <= 1 for s in first["scores"])
    assert {"h_mean", "irregularity", "area"} <= set(first["features"])
    again = client.post("/transition", json=body).json()
    assert again["cached"] is True and again["frames"] == first["frames"]
    other = client.post("/transition", json={**body, "guidance": 3.0}).json()
    assert other["cached"] is False and other["key"] != first["key"]

    export = client.post("/export", json=body).json()
    assert client.get(export["png"]).content[:4] == b"\x89PNG"
    saved = client.get(export["json"]).json()
    assert saved["settings"]["steps"] == 2 and saved["source"]["centre"] == [300, 140]
    # the written command renders the same frames offline
    args = shlex.split(saved["command"])
    assert args[:2] == ["mitosis-ldm", "real2gen"]
    out = tmp_path / "again"
    args[args.index("--out") + 1] = str(out)
    from diffusion.real2gen import main as real2gen_main

    real2gen_main(args[2:])
    frames = np.load(out / "frames.npy")  # (1, 1 + K, H, W, 3): column 0 is the input
    np.testing.assert_array_equal(frames[0, 0], decode(first["input"]))
    for k, uri in enumerate(first["frames"]):
        np.testing.assert_array_equal(frames[0, 1 + k], decode(uri))


def test_dataset_grid_and_its_transition(client, world):
    grid = client.get("/datasets/patches/grid?per_bin=3").json()
    assert grid["patches"] == 24 and grid["bins"]
    titles = [b["title"] for b in grid["bins"]]
    assert titles == sorted(titles) and all(len(b["items"]) <= 3 for b in grid["bins"])
    item = grid["bins"][-1]["items"][0]
    assert client.get(item["thumb"]).content[:4] == b"\x89PNG"
    res = client.post("/transition", json={"dataset": "patches", "index": item["index"], **FAST}).json()
    assert res["source"]["id"] == item["id"] and len(res["frames"]) == 3
    export = client.post("/export", json={"dataset": "patches", "index": item["index"], **FAST}).json()
    assert f"--input {world['dataset']}:{item['id']}" in export["command"]


BAD_BODIES = [
    ("/nucleus", b"{not json"),
    ("/nucleus", b'{"slide": "slide.png", "x": NaN, "y": 3}'),
    ("/nucleus", b'{"slide": "slide.png", "x": Infinity, "y": 3}'),
    ("/nucleus", b'{"slide": "slide.png", "x": -1, "y": 3}'),
    ("/nucleus", b'{"slide": "slide.png", "x": 10, "y": 420}'),
    ("/nucleus", b'{"slide": "../../etc/passwd", "x": 1, "y": 1}'),
    ("/nucleus", b'{"slide": "slide.png", "x": "left", "y": 1}'),
    ("/nucleus", b'{"slide": "slide.png", "x": 1}'),
    ("/nucleus", b'{"slide": "slide.png", "x": 1, "y": 1, "extra": 1}'),
    ("/nucleus", b"[1, 2, 3]"),
    ("/nucleus", b""),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "mode": "magic"}'),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "strength": 0}'),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "guidance": -1}'),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "steps": 100000}'),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "steps": 0}'),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "inversion_iters": 11}'),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "conditions": [0, 2]}'),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "conditions": "0:1:x"}'),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "conditions": [' + b"0.5," * 40 + b"1]}"),
    ("/transition", b'{"slide": "slide.png", "x": 5, "y": 5, "conditions": "0:1:22"}'),  # one over the limit
    ("/transition", b'{"dataset": "patches", "index": 10000}'),
    ("/transition", b'{"dataset": "patches", "index": 24}'),  # one past the last of 24 patches
    ("/transition", b'{"dataset": "patches"}'),
    ("/transition", b'{"dataset": "../patches", "index": 0}'),
    ("/transition", b'{"x": 5, "y": 5}'),
    ("/export", b'{"slide": "slide.png", "x": 1e308, "y": 5}'),
    ("/nucleus", b'{"slide": "' + b"a" * 40_000 + b'", "x": 1, "y": 1}'),  # over the body limit
]


@pytest.mark.parametrize("route,body", BAD_BODIES)
def test_bad_requests_get_a_one_line_4xx(client, route, body):
    res = client.post(route, content=body, headers={"content-type": "application/json"})
    one_line_error(res)
    assert client.get("/healthz").json()["status"] == "ok"


def test_full_model_queue_answers_503(world, tmp_path):
    from fastapi.testclient import TestClient

    app = make_explorer(world, tmp_path / "exports", fake=True, queue=1)
    release = threading.Event()
    blocker = app.state.worker.submit(release.wait, 30)  # the one slot is taken
    try:
        with TestClient(app, raise_server_exceptions=False) as test_client:
            res = test_client.post("/nucleus", json={"slide": SLIDE, "x": 10, "y": 10})
            assert res.status_code == 503 and "queue full" in res.json()["error"]
            assert res.headers["retry-after"] == "1"
            release.set()
            blocker.result(timeout=30)
            assert test_client.post("/nucleus", json={"slide": SLIDE, "x": 10, "y": 10}).status_code == 200
    finally:
        release.set()


@pytest.mark.parametrize("extra,needle", [
    (["--slides", "missing.svs"], "--slides: missing.svs not found"),
    (["--dataset", "{pipeline}"], "not a patch dataset"),
    (["--slides", "{slide}", "--port", "0"], "--port"),
    ([], "--slides: give at least one"),
    # each of these started a server that refused every request, or failed at the first export
    (["--slides", "{slide}", "--max-body", "0"], "--max-body: must be >= 1024 bytes"),
    (["--slides", "{slide}", "--threads", "0"], "--threads: must be >= 1, got 0"),
    (["--slides", "{slide}", "--exports", "{slide}"], "exists and is not a folder"),
])
def test_cli_bad_input_is_one_line(world, capsys, monkeypatch, extra, needle):
    import uvicorn

    from serve.cli import main

    def started(*args, **kwargs):  # a check that let the input through would otherwise serve until killed
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", started)

    extra = [e.format(pipeline=world["pipeline"], slide=world["slide"]) for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["--pipeline", str(world["pipeline"]), "--classifier", str(world["classifier"]), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_cli_a_busy_port_is_one_line_before_the_banner(world, capsys):
    # was uvicorn's `ERROR: [Errno 98] ...` after the banner had announced the address, exit 3
    import socket

    from serve.cli import main

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["--pipeline", str(world["pipeline"]), "--classifier", str(world["classifier"]),
                  "--slides", str(world["slide"]), "--port", str(port)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == "", captured.out
    assert captured.err.strip() == f"error: --port: cannot listen on 127.0.0.1:{port} (Address already in use)"


def test_cli_an_unknown_host_is_one_line(world, capsys):
    from serve.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--pipeline", str(world["pipeline"]), "--classifier", str(world["classifier"]),
              "--slides", str(world["slide"]), "--host", "no-such-host.invalid"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: --host: cannot resolve 'no-such-host.invalid'"), err
    assert "\n" not in err


def test_cli_refuses_a_classifier_folder_as_pipeline(world, capsys):
    from serve.cli import main

    with pytest.raises(SystemExit):
        main(["--pipeline", str(world["classifier"]), "--classifier", str(world["classifier"]),
              "--slides", str(world["slide"])])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_healthz_and_info(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["slides"] == 1 and health["queue"] == 0
    info = client.get("/api/info").json()
    assert info["patch_size"] == 64 and info["defaults"]["mode"] == "invert"
    assert info["defaults"]["strength"] == 0.5 and info["defaults"]["guidance"] == 2.0  # from pipeline.json
    assert len(info["defaults"]["conditions"]) == 11
    assert info["traced"] is True and info["eager_reason"] is None  # the explorer renders through frozen graphs
    page = client.get("/")
    assert page.status_code == 200 and "/static/openseadragon/openseadragon.min.js" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing loads from the network
    assert client.get("/static/openseadragon/openseadragon.min.js").status_code == 200
    json.dumps(info)


def test_explorer_default_strength_starts_at_real2gen_noise_level():
    """Fewer explorer steps start from the same timestep as real2gen's 20 steps, not from less noise."""
    from diffusion.schedulers import run_steps
    from serve.explorer import same_start

    for strength in (0.3, 0.5, 0.8, 1.0):
        ours = same_start(strength, 20, 8)
        top20 = (run_steps(20, strength) - 1) * 1000 // 20  # highest timestep of the 20-step leading grid
        top8 = (run_steps(8, ours) - 1) * 1000 // 8
        assert top8 <= top20 < top8 + 1000 // 8
    assert same_start(0.8, 20, 8) == 0.875 and same_start(0.8, 20, 20) == 0.8


@pytest.mark.parametrize("col, row", [(2, 0), (0, 1)])
def test_a_full_resolution_tile_shows_its_column_and_row_of_the_slide(client, world, col, row):
    from PIL import Image

    # 254 px tiles with 1 px overlap: tile (col, row) covers x from 254 col - 1 to 254 (col + 1) + 1, clipped
    x0, y0 = max(0, 254 * col - 1), max(0, 254 * row - 1)
    x1, y1 = min(SLIDE_SIZE[0], 254 * (col + 1) + 1), min(SLIDE_SIZE[1], 254 * (row + 1) + 1)
    res = client.get(f"/slides/{SLIDE}_files/10/{col}_{row}.jpeg")
    assert res.status_code == 200
    tile = np.asarray(Image.open(io.BytesIO(res.content)).convert("RGB")).astype(float)
    expected = np.asarray(Image.open(world["slide"]).convert("RGB"))[y0:y1, x0:x1].astype(float)
    assert tile.shape == expected.shape
    assert np.abs(tile - expected).mean() < 8  # JPEG at quality 85


def test_a_tile_one_past_the_last_column_or_row_is_404(client):
    # the full-resolution level of 560 x 420 px holds 3 x 2 tiles of 254 px
    assert client.get(f"/slides/{SLIDE}_files/10/2_1.jpeg").status_code == 200
    one_line_error(client.get(f"/slides/{SLIDE}_files/10/3_0.jpeg"), 404)
    one_line_error(client.get(f"/slides/{SLIDE}_files/10/0_2.jpeg"), 404)


def test_the_same_tile_position_on_another_level_is_another_tile(client):
    from PIL import Image

    sizes = []
    for level in (10, 9, 8):  # 560 x 420, 280 x 210, 140 x 105 px: tile 0_0 is cut to the level's size
        res = client.get(f"/slides/{SLIDE}_files/{level}/0_0.jpeg")
        sizes.append(Image.open(io.BytesIO(res.content)).size)
    assert sizes == [(255, 255), (255, 210), (140, 105)]


def test_a_strength_above_one_is_refused(client):
    res = client.post("/transition", json={"slide": SLIDE, "x": 5, "y": 5, "strength": 1.5})
    assert "field 'strength': must be in (0, 1]" in one_line_error(res, 400)


def test_zero_inversion_iterations_are_a_setting_like_any_other(client):
    settings = client.app.state.explorer.settings(strength=1.0, inversion_iters=0)
    assert (settings.strength, settings.inversion_iters) == (1.0, 0)


@pytest.fixture(scope="module")
def fake_client(world, tmp_path_factory):
    from fastapi.testclient import TestClient

    app = make_explorer(world, tmp_path_factory.mktemp("fake-exports"), fake=True)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_each_frames_score_is_its_own(fake_client):
    res = fake_client.post("/transition", json={"slide": SLIDE, "x": 300, "y": 140, **FAST}).json()
    frames = np.stack([decode(uri) for uri in res["frames"]])
    mean, std = fake_client.app.state.explorer.score(frames)
    assert res["scores"] == pytest.approx(mean.tolist(), abs=1e-5)
    assert res["scores_std"] == pytest.approx(std.tolist(), abs=1e-5)
    assert res["scores"][0] < res["scores"][1] < res["scores"][2]  # the fake render darkens with the condition


def test_a_click_between_two_nuclei_goes_to_the_nearer(world, tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    yy, xx = np.mgrid[:200, :240]
    image = np.empty((200, 240, 3), np.uint8)
    image[:] = (232, 186, 212)
    for x in (100, 128):
        image[(xx - x) ** 2 + (yy - 100) ** 2 < 64] = (150, 100, 170)
    Image.fromarray(image).save(tmp_path / "twins.png")
    app = make_explorer({**world, "slide": tmp_path / "twins.png"}, tmp_path / "exports", fake=True)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        for click, centre in ((108, 100), (121, 128)):
            res = test_client.post("/nucleus", json={"slide": "twins.png", "x": click, "y": 100}).json()
            assert res["detected"] and abs(res["centre"][0] - centre) <= 1, (click, res["centre"])


def test_a_label_on_a_bin_edge_is_in_one_grid_bin_the_upper_one():
    from types import SimpleNamespace

    from serve.explorer import Explorer

    class Patches:
        soft_labels = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, np.nan])  # 10 labels: five bins
        patch_size = 64

        def ids(self):
            return [f"p{i}" for i in range(11)]

        def __len__(self):
            return 11

    grid = Explorer.dataset_grid(SimpleNamespace(datasets={"d": ("d", Patches())}), "d")
    counts = {b["title"]: b["count"] for b in grid["bins"]}
    # 0.6 opens the 0.6-0.8 bin (np.linspace's 0.6000000000000001 edge would put it in 0.4-0.6)
    assert counts == {"label 0.0-0.2": 2, "label 0.2-0.4": 2, "label 0.4-0.6": 2, "label 0.6-0.8": 2,
                      "label 0.8-1.0": 2, "unlabelled": 1}
