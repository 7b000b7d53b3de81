"""User-facing errors: one clear line, a non-zero exit, no traceback.

Raise `UserError("FILE: FIELD ...")` for anything the user can fix (bad input
files, bad flags, missing artifacts). Entry points wrap `main` with
`@user_errors`, which prints the message on one line and exits with status 2.
An OSError that names a path (not a folder, permission denied, disk full) gets
the same treatment as a last resort: `error: PATH: REASON`. Ctrl-C prints
`interrupted` and exits 130; SIGTERM (`kill`, a job scheduler, the launcher
of `accelerate launch` passing on a Ctrl-C) stops a command the same way,
clean-up included, and prints `terminated` (exit 143) unless a Ctrl-C came
first.

Under a multi-process launch (`accelerate launch --multi_gpu`), every rank
meets the same bad recipe: a line that one rank has printed is not printed
again by the others, so the user still reads it once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT


class UserError(Exception):
    """A problem with the user's input; the message names the file and the field."""


class WorkerDied(UserError):
    """A worker process of `map_in_workers` died outside Python (the system's out-of-memory killer, a signal sent to
    it alone, a crash in a C library): one line instead of the pool's traceback. What the workers finished stays."""


def fail(where, message: str) -> "UserError":
    """Build a UserError that names a file (or flag) first: `fail(path, "field 'x' ...")`."""
    return UserError(f"{where}: {message}")


def check_at_least(value, flag: str, floor: int = 1) -> None:
    """A count, size or period below its floor: `FLAG: must be >= FLOOR, got VALUE` (None: not given, allowed)."""
    if value is not None and value < floor:
        raise UserError(f"{flag}: must be >= {floor}, got {value}")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """numpy's generators refuse negative seeds with a traceback, torch's take them: every command refuses them."""
    if seed < 0:
        raise UserError(f"{flag}: must be >= 0, got {seed}")


def first_to_say(line: str) -> bool:
    """False when another process of this launch has already printed `line` (a launch of one process: True).

    torchrun gives each rank its own error file under one folder per launch attempt; the first rank to create
    the line's marker there prints it. Ranks that fail differently still print each of their lines.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return True
    marker = Path(error_file).parent.parent / f"said-{hashlib.sha256(line.encode()).hexdigest()[:16]}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # the launch folder is gone or unwritable: better twice than never
        return True
    return True


def end_progress_bars() -> None:
    """Close the progress bars still open, so that a message after them starts a line of its own."""
    bars = set()
    for module in ("tqdm.std", "tqdm.auto"):  # tqdm.auto's class keeps its own set of live bars
        if module in sys.modules:
            bars.update(getattr(sys.modules[module].tqdm, "_instances", ()))
    for bar in bars:
        bar.close()


def say(line: str) -> None:
    """Print one line on stderr, once per launch, after any progress bar still drawn."""
    end_progress_bars()
    if first_to_say(line):
        print(line, file=sys.stderr, flush=True)


class _Stop:
    """The signal that began stopping this process (None: none yet); whether it waits for an import to end."""

    signum: int | None = None
    after_import = False
    deferrals = 0  # how many times the stop was put off
    resent = False  # the signal was sent again after the import
    watcher: threading.Thread | None = None


def stopping_signal() -> int | None:
    """The signal (SIGINT or SIGTERM) that is stopping this process, or None."""
    return _Stop.signum


def _stop_handler(owner: int):
    def on_signal(signum, frame):
        if os.getpid() != owner:  # a forked worker inherited this handler: behave as if none were set
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _Stop.resent:  # sent again after an import
            _Stop.resent = False
            if not _Stop.after_import:
                return  # the command took up the stop on its own meanwhile (raise_if_stopped)
        elif _Stop.signum is not None and signum == signal.SIGTERM and not _Stop.after_import:
            return  # already stopping (the launcher's SIGTERM after the terminal's Ctrl-C): let the clean-up finish
        _Stop.signum = _Stop.signum or signum
        if _importing(frame):
            _stop_after_import(signum)
            return
        _Stop.after_import = False
        raise KeyboardInterrupt

    return on_signal


def _importing(frame) -> bool:
    """Whether `frame` runs inside an import (a module's top level, or the import machinery itself)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _stop_after_import(signum: int) -> None:
    """Put the stop off until the main thread's import is done, then send `signum` to it again.

    torch runs Python from C++ while it is imported; a KeyboardInterrupt raised there cannot unwind the C++ and
    kills the process with SIGABRT ("terminate called after throwing an instance of 'pybind11::error_already_set'").
    A stop that lands in an import therefore waits for the import (seconds at most); a thread watches the main
    thread's stack and signals it again once no import is under way.
    """
    _Stop.deferrals += 1
    if _Stop.after_import:  # a watcher is already running: it sees the new deferral
        return
    _Stop.after_import = True
    main = threading.main_thread().ident

    def watch():
        sent = None  # the deferral count when the signal was last sent
        while _Stop.after_import:
            frame = sys._current_frames().get(main)
            if frame is None:
                return
            if sent != _Stop.deferrals and not _importing(frame):
                sent = _Stop.deferrals  # the handler either stops the command or puts the stop off once more
                _Stop.resent = True
                signal.pthread_kill(main, signum)
            time.sleep(0.02)

    _Stop.watcher = threading.Thread(target=watch, name="stop-after-import", daemon=True)
    _Stop.watcher.start()


def _end_watching() -> None:
    _Stop.after_import = False
    if _Stop.watcher is not None and _Stop.watcher is not threading.current_thread():
        _Stop.watcher.join(timeout=1)
    _Stop.watcher = None


def raise_if_stopped() -> None:
    """Stop now if a stop came and Python swallowed it on the way.

    A stop that lands while a `__del__`, a weakref callback or a C library's callback runs cannot propagate out of
    it; the command would run on to its end. Checked before an output is put in place, at each training step and
    when a command returns.
    """
    if _Stop.signum is not None:
        _Stop.after_import = False  # taken up here: a watcher's signal still to come is ignored
        raise KeyboardInterrupt


def stop_on_signals():
    """Make SIGTERM stop like Ctrl-C (KeyboardInterrupt, so clean-up runs); returns a function restoring the old.

    Only in the main thread, and only where the signal has its default action: an ignored SIGINT (a background job)
    stays ignored, and a handler someone else set stays.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    handler, previous = _stop_handler(os.getpid()), {}
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, handler)

    if previous:
        unraisable = sys.unraisablehook

        def quiet_swallowed_stop(info):
            if _Stop.signum is None or not isinstance(info.exc_value, KeyboardInterrupt):
                unraisable(info)
            # else: the stop is taken up again at the next raise_if_stopped(), without Python's "Exception ignored"

        sys.unraisablehook = quiet_swallowed_stop

    def restore():
        if previous:
            _end_watching()  # before the old handlers are back: no signal sent after an import reaches those
        for signum, old in previous.items():
            signal.signal(signum, old)
        if previous:  # the outermost command is done: a later one in this process starts unstopped
            _Stop.signum = None
            sys.unraisablehook = unraisable

    return restore


class _Job:
    """Whether this worker process is running a job, and whether a Ctrl-C has reached it."""

    busy = False
    stopped = False


class _InJob:
    """`fn`, marked as the job under way while it runs (picklable where `fn` is)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, item):
        _Job.busy = True
        try:
            if _Job.stopped:  # a job queued before the Ctrl-C: it would run to its end, unasked
                raise KeyboardInterrupt
            return self.fn(item)
        finally:
            _Job.busy = False


def _worker_on_sigint(signum, frame):
    _Job.stopped = True
    if _Job.busy:
        raise KeyboardInterrupt  # the job stops; the pool hands the parent its exception, which nobody reads
    # waiting for work: the parent got the same Ctrl-C from the terminal and stops the pool


PR_SET_PDEATHSIG = 1  # Linux prctl(2)


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies, even by SIGKILL (the out-of-memory killer's), which
    leaves the parent no time to stop it: an orphaned worker finished its slide, then waited for work forever."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's own stop still reaches the workers
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _start_worker(parent: int):
    _die_with(parent)
    signal.signal(signal.SIGINT, _worker_on_sigint)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def signal_name(signum: int) -> str:
    """SIGKILL, SIGTERM, ...; "signal N" for a number without a name (a real-time signal)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _how_a_worker_died(workers) -> str:
    """"worker PID died of SIGNAME" for the worker that ended first, as far as the exit codes tell it.

    Once one is lost the pool sends SIGTERM to the others, so a worker that died of something else is the one; one
    that exited cleanly (stopped with the pool after its job) is not; among several alike no pid is named.
    """
    ended = [(w.pid, w.exitcode) for w in workers if w.exitcode]
    if len({code for _, code in ended}) > 1:
        ended = [(pid, code) for pid, code in ended if code != -signal.SIGTERM]
    if not ended:
        return "a worker died"
    code = ended[0][1]
    how = f"died of {signal_name(-code)}" if code < 0 else f"exited with code {code}"
    return f"worker {ended[0][0]} {how}" if len(ended) == 1 else f"a worker {how}"


def map_in_workers(fn, items, workers: int):
    """Yield `fn(item)` for each item, in order, computed by `workers` forked processes.

    The terminal's Ctrl-C reaches the whole process group: a worker stops the job under way, and one waiting for
    work (outside any job, where the pool would print its KeyboardInterrupt's traceback) lets the parent stop it,
    and starts none of the jobs still queued for it.
    The workers are forked with SIGINT blocked until their own handler is set, so none dies in between.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    before = set(multiprocessing.active_children())
    try:  # with fork, the pool starts every worker at the first submit
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_start_worker, initargs=(os.getpid(),))
        try:
            results = pool.map(_InJob(fn), items)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    mine = set(multiprocessing.active_children()) - before
    with pool:
        try:
            yield from results
        except BaseException as err:
            # stopped alone (a `kill` of this process, not of its group) or by a failed job: the workers would
            # finish the slides under way before the pool lets go; they get the Ctrl-C the terminal would send
            for worker in mine:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGINT)
            if isinstance(err, BrokenProcessPool):
                # the pool's own thread reaps the workers; once it has, every exit code is known (read while it
                # reaps, the lost worker's could still read None)
                pool.shutdown(wait=True)
                raise WorkerDied(_how_a_worker_died(mine)) from None
            raise


def forget_handled_interrupt() -> None:
    """Clear CPython 3.11's mark of an unhandled Ctrl-C, once the stop is handled and the command exits its own way.

    A KeyboardInterrupt that passes out of a string of code run by exec() (dataclasses build their methods so while
    a module imports) sets `_Py_UnhandledKeyboardInterrupt` even when a caller catches it, and `python -m` then ends
    the process by SIGINT instead of the exit code it was given. On a Python that does not export the symbol this
    does nothing.
    """
    with contextlib.suppress(AttributeError, ValueError, OSError):
        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0


def exit_stopped():
    """Print the stopping signal's one word and exit with its code."""
    forget_handled_interrupt()
    if _Stop.signum == signal.SIGTERM:
        say("terminated")
        raise SystemExit(128 + signal.SIGTERM) from None
    say("interrupted")
    raise SystemExit(EXIT_INTERRUPTED) from None


def user_errors(main_fn):
    """Turn UserError into one line on stderr and exit 2 (the documented contract)."""

    @functools.wraps(main_fn)
    def wrapper(*args, **kwargs):
        restore = stop_on_signals()
        try:
            result = main_fn(*args, **kwargs)
            raise_if_stopped()
            return result
        except UserError as err:
            if _Stop.signum is not None:
                # the stop broke a call off and the command reported the break as a bad input (OpenSlide's
                # "cannot read region ... (ArgumentError: argument 1: KeyboardInterrupt)"): it was the stop
                exit_stopped()
            text = " ".join(str(err).split())  # always exactly one line
            say(f"error: {text}")
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: output folders under way were already removed on the way out (resumable runs keep
            # theirs)
            exit_stopped()
        except ctypes.ArgumentError as err:
            # the stop landed while ctypes converted a C call's arguments in Python (OpenSlide does): ctypes
            # rewraps the KeyboardInterrupt as "argument N: KeyboardInterrupt: " and drops the original
            if _Stop.signum is None or "KeyboardInterrupt" not in str(err):
                raise
            exit_stopped()
        except OSError as err:
            if err.filename is None:  # not about a path the user gave: a bug's traceback stays visible
                raise
            # a path the user gave that the system refused (not a folder, permission denied, disk full, ...)
            where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
            say(f"error: {where}: {err.strerror or err}")
            raise SystemExit(EXIT_USER_ERROR) from None
        finally:
            restore()

    return wrapper
