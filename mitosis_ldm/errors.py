"""User-facing errors: one clear line, a non-zero exit, no traceback.

Raise `UserError("FILE: FIELD ...")` for anything the user can fix (bad input
files, bad flags, missing artifacts). Entry points wrap `main` with
`@user_errors`, which prints the message on one line and exits with status 2.
An OSError that names a path (not a folder, permission denied, disk full) gets
the same treatment as a last resort: `error: PATH: REASON`. Ctrl-C prints
`interrupted` and exits 130.
"""

from __future__ import annotations

import functools
import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT


class UserError(Exception):
    """A problem with the user's input; the message names the file and the field."""


def fail(where, message: str) -> "UserError":
    """Build a UserError that names a file (or flag) first: `fail(path, "field 'x' ...")`."""
    return UserError(f"{where}: {message}")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """numpy's generators refuse negative seeds with a traceback, torch's take them: every command refuses them."""
    if seed < 0:
        raise UserError(f"{flag}: must be >= 0, got {seed}")


def user_errors(main_fn):
    """Turn UserError into one line on stderr and exit 2 (the documented contract)."""

    @functools.wraps(main_fn)
    def wrapper(*args, **kwargs):
        try:
            return main_fn(*args, **kwargs)
        except UserError as err:
            text = " ".join(str(err).split())  # always exactly one line
            print(f"error: {text}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            # Ctrl-C: output folders under way were already removed on the way out (resumable runs keep theirs)
            print("interrupted", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except OSError as err:
            if err.filename is None:  # not about a path the user gave: a bug's traceback stays visible
                raise
            # a path the user gave that the system refused (not a folder, permission denied, disk full, ...)
            where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
            print(f"error: {where}: {err.strerror or err}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper
