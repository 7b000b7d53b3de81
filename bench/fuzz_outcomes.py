"""Fuzz outcome counts per reader and folder loader, as JSON: cases, accepted, clean errors, tracebacks, leftovers.

    python bench/fuzz_outcomes.py --cases 100 --seed 0 [--only midog,pipeline] > outcomes.json
    PYTHONPATH=/tmp/before python bench/fuzz_outcomes.py ...    # the same harness on an older checkout

The targets are tests/fuzz_targets.py and the mutations tests/fuzz_mutations.py (what tests/test_fuzz.py runs
under hypothesis).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzz_targets  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100, help="mutated cases per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated targets (default: all)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(fuzz_targets.TARGETS)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        shared = fuzz_targets.build_shared(Path(tmp) / "shared")
        results = {}
        for name in names:
            start = time.perf_counter()
            results[name] = fuzz_targets.count(name, args.cases, args.seed, shared, Path(tmp) / "cases")
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    import mitosis_ldm

    print(json.dumps({"code": str(Path(mitosis_ldm.__file__).resolve().parents[1]), "cases": args.cases,
                      "seed": args.seed, "targets": results}, indent=1))


if __name__ == "__main__":
    main()
