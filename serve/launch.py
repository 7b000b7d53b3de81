"""Run the explorer on localhost for benches and tests: in a thread (same process) or as a child process.

    with server_thread(app) as url: ...                  # uvicorn in a background thread
    proc, url = server_process([...serve args...])       # `python -m serve.cli` on a free port, healthy
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as res:
                return json.loads(res.read())
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def server_thread(app, port: int | None = None):
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; yields the base URL; stops on exit."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def server_process(args: list[str], port: int | None = None, timeout: float = 180.0, env: dict | None = None):
    """`python -m serve.cli ARGS --port P` as a child process; returns (Popen, base URL) once healthy."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", *map(str, args), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=timeout, proc=proc)
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    return proc, url
