"""Shared test helpers: the repository root, the sample slide, and running entry points."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# A script that starts the tests in the background (`make test &`, `nohup ... &`) hands them SIGINT ignored, and
# every command a test starts would inherit that: the Ctrl-C tests need SIGINT delivered as a terminal does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "data" / "cache" / "cmu_small_region.svs"
MIDOG_JSON = REPO.parent / "shared" / "fixtures" / "midogpp" / "MIDOG++.json"


def run_module(module: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args...` from the repository root and capture its output."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def load_bench(name: str):
    """A script of bench/ (not a package) imported as a module, for tests of its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accelerate_cmd(module: str, *args: str, processes: int = 1) -> list[str]:
    """The `accelerate launch` command line for a training module (multi-process over gloo without GPUs)."""
    mode = ["--multi_gpu"] if processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *map(str, args)]


WHY_A_RANK_ENDED = ("terminate called", "what():", "Error", "error:", "Traceback", "Signal ", "exitcode")


def launch_output(stderr: str, tail: int = 1500) -> str:
    """A failed launch's stderr as a test's failure message: every line that says why a rank ended (an abort's
    "terminate called ... what(): ..." is printed far above the launcher's summary), then the last `tail` chars."""
    said = [line for line in stderr.splitlines() if any(word in line for word in WHY_A_RANK_ENDED)]
    return "\n".join(said[:40]) + "\n...\n" + stderr[-tail:]


def read_csv(path) -> list[dict]:
    """The rows of a CSV the project wrote, as dicts by header."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def sample_slide() -> Path:
    if not SAMPLE_SLIDE.exists():
        pytest.skip(f"{SAMPLE_SLIDE} missing: run `make setup`")
    return SAMPLE_SLIDE


# Hypothesis profiles for the fuzz tests (tests/test_fuzz.py): "ci" (default) is derandomised with each test's
# small fixed budget; `make fuzz` sets MITOSIS_LDM_FUZZ=N for N random cases per target from a fresh seed.
try:
    from hypothesis import HealthCheck, settings

    _FUZZ_CASES = int(os.environ.get("MITOSIS_LDM_FUZZ", "0") or 0)
    _COMMON = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                          HealthCheck.data_too_large])
    settings.register_profile("ci", derandomize=True, **_COMMON)
    settings.register_profile("fuzz", derandomize=False, max_examples=max(_FUZZ_CASES, 1), **_COMMON)
    settings.load_profile("fuzz" if _FUZZ_CASES else "ci")
except ImportError:  # hypothesis is in the `test` extra
    pass
