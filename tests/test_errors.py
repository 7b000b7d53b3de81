"""User errors: one line per error (once per launch, not once per rank), and the shared range checks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mitosis_ldm.errors import UserError, user_errors

from conftest import REPO, accelerate_cmd


def test_user_errors_print_one_line_and_exit_2(capsys):
    @user_errors
    def main():
        raise UserError("x.csv: field 'label'\nis bad")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.csv: field 'label' is bad" in err


def test_user_errors_turn_an_os_error_on_a_path_into_one_line_and_leave_others_alone(capsys):
    @user_errors
    def path_refused():
        open("/proc/version/x.csv", "w")  # NotADirectoryError, naming the path

    with pytest.raises(SystemExit) as exit_info:
        path_refused()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: /proc/version/x.csv: Not a directory\n"

    @user_errors
    def no_path():
        raise OSError(24, "Too many open files")  # not about a path the user gave: stays a traceback

    with pytest.raises(OSError, match="Too many open files"):
        no_path()


def test_ranks_of_one_launch_print_a_shared_error_once_and_different_ones_each(tmp_path, monkeypatch, capsys):
    @user_errors
    def main(message):
        raise UserError(message)

    def as_rank(rank, message, attempt="attempt_0"):
        # torchrun's layout: one error file per rank under one folder per launch attempt
        (tmp_path / attempt / str(rank)).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / attempt / str(rank) / "error.json"))
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit) as exit_info:
            main(message)
        assert exit_info.value.code == 2  # every rank still fails
        return capsys.readouterr().err

    assert as_rank(0, "x.yaml: key 'a' is bad") == "error: x.yaml: key 'a' is bad\n"
    assert as_rank(1, "x.yaml: key 'a' is bad") == ""
    assert as_rank(1, "shard-1.npy: truncated") == "error: shard-1.npy: truncated\n"  # a rank's own error
    assert as_rank(0, "x.yaml: key 'a' is bad", attempt="attempt_1") == "error: x.yaml: key 'a' is bad\n"


def test_a_bad_recipe_under_a_two_process_launch_prints_its_line_once(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(accelerate_cmd("diffusion.train", "--config", "configs/demo/diffusion.yaml", "--set",
                                         "train.batch_size=0", "--set", f"out={out}", processes=2),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --set: key 'train.batch_size' must be an integer >= 1, got 0") == 1, proc.stderr
    assert not out.exists()


def test_check_at_least_names_the_flag_its_floor_and_the_value_and_lets_an_absent_value_pass():
    from mitosis_ldm.errors import check_at_least

    check_at_least(1, "--n")
    check_at_least(None, "--limit")  # an optional flag left out
    with pytest.raises(UserError, match=r"^--n: must be >= 1, got 0$"):
        check_at_least(0, "--n")
    with pytest.raises(UserError, match=r"^--size: must be >= 8, got 7$"):
        check_at_least(7, "--size", 8)


def run_beside(folder, *args) -> subprocess.CompletedProcess:
    """`python ARGS` run in `folder` (the scripts a test wrote there), with the project importable."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


# a stop that lands while a string of code runs under exec() (dataclasses build their methods so, at import):
# CPython 3.11 then remembers an unhandled KeyboardInterrupt, and `python -m` ended by SIGINT whatever code the
# command exited with (a `kill` of a command read as a Ctrl-C, 1 run in 10 that landed at a dataclass)
STOPPED_IN_EXEC = """
from mitosis_ldm.errors import user_errors

@user_errors
def main():
    exec("import os, signal, time; os.kill(os.getpid(), signal.{sig}); time.sleep(10)")

main()
"""


@pytest.mark.parametrize("sig,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_stop_inside_exec_under_python_m_exits_with_the_commands_code(tmp_path, sig, code, word):
    (tmp_path / "stopped_in_exec.py").write_text(STOPPED_IN_EXEC.format(sig=sig))
    result = run_beside(tmp_path, "-m", "stopped_in_exec")
    assert (result.returncode, result.stderr) == (code, word + "\n")


# a stop that lands while Python runs a __del__ (or a weakref or C library callback) cannot propagate there: Python
# printed it as "Exception ignored ... KeyboardInterrupt: " and the command ran on and wrote its output (the demo's
# data stage once did, stopped during `data detect`)
SWALLOWED = """
import os, signal, sys, time
from mitosis_ldm.errors import user_errors
from mitosis_ldm.io import atomic_dir

class Closes:
    def __del__(self):
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.2)

@user_errors
def main(out, when):
    if when == "after":
        with atomic_dir(out) as tmp:
            (tmp / "done").write_text("yes")
    with atomic_dir(out + "-second") if when == "before" else open(os.devnull) as tmp:
        Closes()
    print("ran on", flush=True)

main(*sys.argv[1:])
"""


@pytest.mark.parametrize("sig,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
@pytest.mark.parametrize("when", ["before", "after"])  # the output folder written
def test_a_stop_python_swallows_in_a_finalizer_still_stops_the_command(tmp_path, sig, code, word, when):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", SWALLOWED.format(sig=sig), str(out), when], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    # not put in place when the stop came before; after the last output, the command ends as stopped
    ran_on = "ran on\n" if when == "after" else ""
    assert (result.returncode, result.stdout, result.stderr) == (code, ran_on, word + "\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if when == "after" else [])


# a stop that lands while a module is imported: torch runs Python from C++ while it is imported, and a
# KeyboardInterrupt raised there aborted the command ("terminate called after throwing an instance of
# 'pybind11::error_already_set'", SIGABRT; seen in `data detect` stopped during its lazy import of torch). The
# stop waits for the import to end, then stops the command, wherever it then is (here: a long sleep).
IMPORTED_WHILE_STOPPED = """
import os, signal, sys
from pathlib import Path
os.kill(os.getpid(), signal.{sig})
for _ in range(100000):
    pass
Path(sys.argv[1]).write_text("imported to its end")
"""
STOPPED_IN_IMPORT = """
import sys, time
from mitosis_ldm.errors import user_errors

@user_errors
def main():
    import stopped_module
    print("after the import", flush=True)
    for _ in range({sleeps}):
        time.sleep(1)
    print("ran on", flush=True)

main()
"""


@pytest.mark.parametrize("sig,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
@pytest.mark.parametrize("nested", [False, True])  # the module imported from another module's import
def test_a_stop_during_an_import_waits_for_the_import_then_stops_the_command(tmp_path, sig, code, word, nested):
    (tmp_path / "stopped_module.py").write_text(
        "import inner_module\n" if nested else IMPORTED_WHILE_STOPPED.format(sig=sig))
    if nested:
        (tmp_path / "inner_module.py").write_text(IMPORTED_WHILE_STOPPED.format(sig=sig))
    (tmp_path / "command.py").write_text(STOPPED_IN_IMPORT.format(sleeps=60))
    mark = tmp_path / "mark"
    result = run_beside(tmp_path, "command.py", mark)
    assert mark.read_text() == "imported to its end"  # the import was not broken off
    assert (result.returncode, result.stdout, result.stderr) == (code, "after the import\n", word + "\n")


@pytest.mark.parametrize("sig,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_stop_that_waited_for_an_import_stops_a_command_ending_right_after_it_once(tmp_path, sig, code, word):
    # the command's own check of the stop ends it; the signal sent again after the import must not stop its
    # clean-up a second time, nor kill the process once the old handlers are back
    (tmp_path / "stopped_module.py").write_text(IMPORTED_WHILE_STOPPED.format(sig=sig))
    (tmp_path / "command.py").write_text(STOPPED_IN_IMPORT.format(sleeps=0))
    result = run_beside(tmp_path, "command.py", tmp_path / "mark")
    assert (result.returncode, result.stdout, result.stderr) == (code, "after the import\nran on\n", word + "\n")


COMMAND_STOPPED_IN_IMPORT = """
import sys
from mitosis_ldm import cli

cli.COMMANDS["stopped"] = ("stopped_module", "a command whose module is stopped while it is imported")
sys.exit(cli.main(["stopped"]))
"""


@pytest.mark.parametrize("sig,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_stop_while_mitosis_ldm_imports_a_commands_module_waits_for_the_import(tmp_path, sig, code, word):
    # `mitosis-ldm COMMAND` imports the command's module (torch with it) before the command's own main runs: a
    # SIGTERM there killed the process outright, a Ctrl-C broke the import off
    (tmp_path / "stopped_module.py").write_text(IMPORTED_WHILE_STOPPED.format(sig=sig) + "\ndef main(argv):\n"
                                                "    raise SystemExit('the command ran')\n")
    (tmp_path / "command.py").write_text(COMMAND_STOPPED_IN_IMPORT)
    mark = tmp_path / "mark"
    result = run_beside(tmp_path, "command.py", mark)
    assert mark.read_text() == "imported to its end"
    assert (result.returncode, result.stdout, result.stderr) == (code, "", word + "\n")


# a stop that lands while ctypes converts a C call's arguments in Python (OpenSlide's handle does) comes back as
# ctypes.ArgumentError; the slide reader reported it as "error: SLIDE: cannot read region at (0, 0) (ArgumentError:
# argument 1: KeyboardInterrupt:)", exit 2 (seen in `data detect` stopped right after its import of torch)
STOPPED_IN_CTYPES = """
import ctypes, os, signal
from mitosis_ldm.errors import UserError, user_errors

class Handle:
    @classmethod
    def from_param(cls, obj):
        os.kill(os.getpid(), signal.{sig})
        for _ in range(100000):
            pass
        return ctypes.c_int(obj)

@user_errors
def main():
    absolute = ctypes.CDLL(None).abs
    absolute.argtypes = [Handle]
    try:
        absolute(-3)
    except Exception as err:
        raise UserError(f"slide.svs: cannot read region at (0, 0) ({{err}})") from None

main()
"""


@pytest.mark.parametrize("sig,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_stop_that_a_command_reports_as_a_bad_input_is_still_a_stop(tmp_path, sig, code, word):
    result = subprocess.run([sys.executable, "-c", STOPPED_IN_CTYPES.format(sig=sig)], cwd=REPO, capture_output=True,
                            text=True, timeout=50)
    assert (result.returncode, result.stderr) == (code, word + "\n")


def test_a_signal_is_named_and_one_without_a_name_is_numbered():
    from mitosis_ldm.errors import signal_name

    assert (signal_name(9), signal_name(15), signal_name(40)) == ("SIGKILL", "SIGTERM", "signal 40")


def test_a_failed_stage_of_the_demo_says_what_its_exit_code_can_tell():
    from mitosis_ldm.demo import accelerate, cli, stage_failure

    assert stage_failure(2, cli("data", "synth")) == "failed (exit 2)"
    assert stage_failure(-9, cli("data", "synth")).startswith("was killed by SIGKILL (the system's out-of-memory")
    # a training stage's launcher exits 1 whatever ended its process, an out-of-memory kill included
    said = stage_failure(1, accelerate("autoencoder.train", "configs/demo/autoencoder.yaml"))
    assert said.startswith("failed (exit 1 from `accelerate launch`") and "out-of-memory killer" in said
    assert stage_failure(1, cli("report")) == "failed (exit 1)"


def test_the_worker_named_as_lost_is_the_one_that_died_not_one_the_pool_stopped():
    from types import SimpleNamespace as Worker

    from mitosis_ldm.errors import _how_a_worker_died

    # the pool's SIGTERM to the others; another worker that finished its job and left with the pool (exit 0)
    assert _how_a_worker_died([Worker(pid=1, exitcode=-15), Worker(pid=2, exitcode=-9)]) == "worker 2 died of SIGKILL"
    assert _how_a_worker_died([Worker(pid=1, exitcode=0), Worker(pid=2, exitcode=-15)]) == "worker 2 died of SIGTERM"
    assert _how_a_worker_died([Worker(pid=1, exitcode=-15), Worker(pid=2, exitcode=-15)]) == "a worker died of SIGTERM"
    assert _how_a_worker_died([Worker(pid=1, exitcode=None), Worker(pid=2, exitcode=3)]) == \
        "worker 2 exited with code 3"
    assert _how_a_worker_died([Worker(pid=1, exitcode=0)]) == "a worker died"
