"""`mitosis-ldm data ...`: make and inspect patch datasets.

    mitosis-ldm data synth   --out DIR --n 6000 --size 64 --experts 3 --seed 0
    mitosis-ldm data inspect DIR [--out sheet.png]

Every source writes the same folder format (patches/dataset.py) through
`build_dataset`: atomically, resumable per slide, nothing left behind on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mitosis_ldm.errors import UserError, user_errors


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got '{text}'") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def _nonnegative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _provenance(argv) -> dict:
    from mitosis_ldm import __version__

    return {"command": "mitosis-ldm data " + " ".join(argv), "version": __version__}


# -- subcommands ---------------------------------------------------------------

def cmd_synth(args, argv) -> None:
    from .dataset import SplitConfig, build_dataset
    from .synth import TRUE_THRESHOLD, Experts, synth_jobs

    if args.size < 16:
        raise UserError(f"--size: must be at least 16 pixels, got {args.size}")
    if not 0 <= args.imposters < 1:
        raise UserError(f"--imposters: must be in [0, 1), got {args.imposters}")
    experts = Experts.draw(args.experts, args.seed)
    jobs = synth_jobs(args.n, args.seed, args.size, args.margin, experts, imposter_rate=args.imposters)
    meta = {
        "source": "synth",
        "source_file": "synth",
        "mpp": None,
        "label_definition": "label = fraction of simulated experts voting mitotic; hard_label = majority "
                            "(ties count as mitotic); true_degree = the generator's mitotic degree m",
        "true_threshold": TRUE_THRESHOLD,
        "experts": {"k": args.experts, **vars(experts)},
        "imposter_rate": args.imposters,
        "seed": args.seed,
        "provenance": _provenance(argv),
    }
    out = build_dataset(args.out, jobs, patch_size=args.size, margin=args.margin, meta=meta,
                        split=SplitConfig(mode="random", seed=args.seed), overwrite=args.overwrite,
                        workers=args.workers)
    print(f"wrote {args.n} synthetic patches to {out}")


def cmd_inspect(args, argv) -> None:
    from .inspect import format_summary, sheet, summarise

    summary = summarise(args.dataset)
    print(format_summary(summary))
    out = args.out or Path(args.dataset) / "contact_sheet.png"
    sheet(args.dataset, out, per_group=args.per_group)
    print(f"contact sheet: {out}")
    if args.json:
        print(json.dumps(summary))


# -- parser --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mitosis-ldm data", description="Make and inspect patch datasets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="synthetic H&E nuclei with known mitotic degree and simulated expert votes")
    p.add_argument("--out", required=True, type=Path, help="output dataset folder")
    p.add_argument("--n", type=_positive("--n"), default=6000, help="number of patches (default 6000)")
    p.add_argument("--size", type=_positive("--size"), default=64, help="patch size in pixels (default 64)")
    p.add_argument("--experts", type=_positive("--experts"), default=3, help="simulated experts voting (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margin", type=_nonnegative, default=8, help="context pixels stored around each patch (default 8)")
    p.add_argument("--imposters", type=float, default=0.15, help="fraction of dark round look-alikes (default 0.15)")
    p.add_argument("--workers", type=_positive("--workers"), default=_default_workers())
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="counts, label histogram, vote agreement and a contact sheet")
    p.add_argument("dataset", type=Path, help="patch dataset folder")
    p.add_argument("--out", type=Path, help="contact sheet PNG (default DIR/contact_sheet.png)")
    p.add_argument("--per-group", type=_positive("--per-group"), default=12, help="patches per label group")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    p.set_defaults(func=cmd_inspect)
    return parser


@user_errors
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.func(args, argv)


if __name__ == "__main__":
    main()
