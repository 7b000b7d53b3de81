"""`python -m classifier {train,score,evaluate} ...`: the stage's three tools under one name.

Training is normally launched with `accelerate launch -m classifier.train`; this
dispatcher runs it in one process.
"""

from __future__ import annotations

import importlib
import sys

TOOLS = {"train": "classifier.train", "score": "classifier.score", "evaluate": "classifier.evaluate"}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TOOLS:
        print("usage: python -m classifier {train,score,evaluate} [ARGS...]  (--help after a tool for its options)",
              file=sys.stderr if argv else sys.stdout)
        return 2 if argv and argv[0] not in {"-h", "--help"} else 0
    return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
