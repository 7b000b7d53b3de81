"""`mitosis-ldm serve`'s flags reach what they name: the queue, the body limit, the threads, the host and its
warning, repeated --slides and --dataset; the socket is bound the way a restart needs."""

from __future__ import annotations

import shutil
import socket

import pytest

from serve_helpers import shared_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def base_args(world, tmp_path) -> list[str]:
    # --eager: tracing is not what these tests look at, and takes seconds
    return ["--pipeline", str(world["pipeline"]), "--classifier", str(world["classifier"]), "--eager",
            "--exports", str(tmp_path / "exports")]


def build(argv: list[str]):
    from serve.cli import build, parser

    return build(parser().parse_args(argv))


def test_queue_and_max_body_reach_the_worker_and_the_body_limit(world, tmp_path):
    from fastapi.testclient import TestClient

    app = build([*base_args(world, tmp_path), "--slides", str(world["slide"]), "--queue", "3",
                 "--max-body", "2000"])
    assert app.state.worker.max_pending == 3
    body = b'{"slide": "slide.png", "x": 300, "y": 140}'
    with TestClient(app, raise_server_exceptions=False) as client:
        headers = {"content-type": "application/json"}
        assert client.post("/nucleus", content=body + b" " * (2000 - len(body)), headers=headers).status_code == 200
        res = client.post("/nucleus", content=body + b" " * (2001 - len(body)), headers=headers)
        assert res.status_code == 413 and res.json() == {"error": "request body larger than 2000 bytes"}


def test_the_pipeline_and_the_ensemble_go_to_the_process_device(world, tmp_path, monkeypatch):
    # a GPU when there is one; the meta device stands in for it here
    from types import SimpleNamespace

    import torch
    from fastapi.testclient import TestClient

    import mitosis_ldm.launch

    monkeypatch.setattr(mitosis_ldm.launch, "process_state", lambda: SimpleNamespace(device=torch.device("meta")))
    app = build([*base_args(world, tmp_path), "--slides", str(world["slide"])])
    explorer = app.state.explorer
    assert explorer.pipeline.device.type == "meta" and explorer.classifier.device.type == "meta"
    modules = (explorer.pipeline.vae, explorer.pipeline.label_embedder, *explorer.classifier.member_models)
    assert {p.device.type for m in modules for p in m.parameters()} == {"meta"}
    with TestClient(app) as client:
        assert client.get("/api/info").json()["device"] == "meta"


def test_threads_sets_torchs_thread_count(world, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        build([*base_args(world, tmp_path), "--slides", str(world["slide"]), "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_repeated_slides_and_datasets_are_all_served(world, tmp_path):
    second = shutil.copy(world["slide"], tmp_path / "second.png")
    other = shutil.copytree(world["dataset"], tmp_path / "other")
    app = build([*base_args(world, tmp_path), "--slides", str(world["slide"]), "--slides", str(second),
                 "--dataset", str(world["dataset"]), "--dataset", str(other)])
    explorer = app.state.explorer
    assert explorer.slides.names() == ["slide.png", "second.png"]
    assert sorted(explorer.datasets) == ["other", "patches"]


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`serve` up to the banner, with neither a real socket nor a running server: (exit code, stderr)."""
    import uvicorn

    import serve.cli

    monkeypatch.setattr(serve.cli, "listen", lambda host, port: None)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    try:
        serve.cli.main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("extra,needle", [
    (["--queue", "0"], "error: --queue: must be >= 1, got 0"),
    (["--dataset", "{dataset}", "--dataset", "{dataset}"],
     "error: --dataset: two datasets are named patches; datasets are addressed by folder name"),
])
def test_a_bad_flag_is_one_line_before_the_server_starts(world, tmp_path, monkeypatch, capsys, extra, needle):
    extra = [e.format(dataset=world["dataset"]) for e in extra]
    code, err = run_main([*base_args(world, tmp_path), "--slides", str(world["slide"]), *extra], monkeypatch, capsys)
    assert code == 2 and err == needle, err


def test_the_default_host_is_this_machine_only_and_another_is_warned_about(world, tmp_path, monkeypatch, capsys):
    from serve.cli import parser

    assert parser().parse_args(["--pipeline", "p", "--classifier", "c"]).host == "127.0.0.1"
    argv = [*base_args(world, tmp_path), "--slides", str(world["slide"])]
    assert run_main(argv, monkeypatch, capsys) == (0, "")  # --eager asked for: no warning either
    code, err = run_main([*argv, "--host", "0.0.0.0"], monkeypatch, capsys)
    assert code == 0 and err.startswith("warning: binding 0.0.0.0: anyone who can reach this machine"), err


def test_localhost_is_bound_on_ipv4_and_may_be_rebound_at_once_after_a_restart(monkeypatch):
    from serve.cli import listen

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    resolve = socket.getaddrinfo

    def dual_stack(host, *args, family=0, **kwargs):  # a hosts file that lists ::1 before 127.0.0.1
        if host != "localhost":
            return resolve(host, *args, family=family, **kwargs)
        both = resolve("::1", *args, family=socket.AF_INET6, **kwargs) + \
            resolve("127.0.0.1", *args, family=socket.AF_INET, **kwargs)
        return [entry for entry in both if family in (0, entry[0])]

    monkeypatch.setattr(socket, "getaddrinfo", dual_stack)
    sock = listen("localhost", port)
    try:
        # as uvicorn binds: `localhost` is 127.0.0.1, the address the banner and the browser use
        assert sock.family == socket.AF_INET and sock.getsockname() == ("127.0.0.1", port)
        # SO_REUSEADDR: a server restarted right after Ctrl-C binds through the old connections' TIME_WAIT
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
    finally:
        sock.close()
