"""`mitosis-ldm data ...`: make and inspect patch datasets.

    mitosis-ldm data synth       --out DIR --n 6000 --size 64 --experts 3 --seed 0
    mitosis-ldm data midog       --json MIDOG++.json --images DIR --out DIR [--tumor-type T]
    mitosis-ldm data sliderunner --db CCMCT.sqlite --slides DIR --out DIR [--mitotic-class 2 --lookalike-class 7]
    mitosis-ldm data points      --csv cells.csv --slides DIR --out DIR [--label-map NOT=0,INDET=0.5,MITE=1]
    mitosis-ldm data points      --geojson qupath.geojson --slide NAME --slides DIR --out DIR [--label-map ...]
    mitosis-ldm data folder      --images DIR --labels labels.csv --out DIR [--label-map ...]
    mitosis-ldm data annotators  --slides DIR --annotator NAME=FILE ... --radius-um 4 --out DIR [--absent unknown]
    mitosis-ldm data detect      --slide slide.svs --out DIR [--level 0] [--max N]
    mitosis-ldm data inspect     DIR [--out sheet.png]

Slide sources share an `ExtractConfig` (patch size, margin, level, workers,
split, detection thresholds): defaults in code < `--config YAML` < `--set
key=value` < explicit flags. The resolved config is stored in dataset.json.

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


ABSENT_CHOICES = ("not-mitotic", "unknown")  # patches/annotators.py ABSENT, kept here so --help imports nothing


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


def extract_config(args, split_mode: str):
    """Resolve the ExtractConfig: defaults < --config < --set < explicit flags."""
    from mitosis_ldm.config import load_config

    from .extract import ExtractConfig

    overrides = list(args.set or [])
    given = {}  # config key -> the flag that set it, so an error names what the user typed
    for flag, key in (("size", "patch_size"), ("margin", "margin"), ("level", "level"), ("workers", "workers"),
                      ("split", "split.mode"), ("seed", "split.seed")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
            given[key] = f"--{flag}"
    cfg = load_config(ExtractConfig, args.config, overrides)
    if cfg.split.mode == "auto":
        cfg.split.mode = split_mode
    if cfg.split.mode not in ("slide", "y", "random"):
        raise UserError(f"{args.config or '--set'}: key 'split.mode' must be auto, slide, y or random, "
                        f"got '{cfg.split.mode}'")
    where = args.config or "--set"
    from .labelmap import check_label_map, parse_label_map

    label_map = getattr(args, "label_map", None)
    cfg.label_map = parse_label_map(label_map) if label_map else check_label_map(cfg.label_map, where)
    for key, value, low in (("patch_size", cfg.patch_size, 8), ("margin", cfg.margin, 0), ("level", cfg.level, 0),
                            ("workers", cfg.workers, 1), ("split.seed", cfg.split.seed, 0)):
        if value < low:
            if key in given:
                raise UserError(f"{given[key]}: must be >= {low}, got {value}")
            raise UserError(f"{where}: key '{key}' must be >= {low}, got {value}")
    return cfg


def _build(args, argv, jobs, cfg, meta) -> None:
    from mitosis_ldm.config import to_dict

    from .dataset import build_dataset

    meta = {**meta, "config": to_dict(cfg), "provenance": _provenance(argv)}
    out = build_dataset(args.out, jobs, patch_size=cfg.patch_size, margin=cfg.margin, meta=meta, split=cfg.split,
                        overwrite=args.overwrite, workers=cfg.workers)
    from .dataset import read_meta

    print(f"wrote {read_meta(out)['count']} patches from {len(jobs)} slide(s) to {out}")


def cmd_midog(args, argv) -> None:
    from .extract import point_jobs
    from .midog import read_midog

    cfg = extract_config(args, "slide")
    _refuse_existing(args)
    by_slide, sizes = read_midog(args.json, args.images, args.tumor_type, skip_missing=args.skip_missing)
    jobs = point_jobs(by_slide, cfg, sizes)
    _build(args, argv, jobs, cfg, {
        "source": "midog", "source_file": str(args.json), "mpp": None, "tumor_type": args.tumor_type,
        "label_definition": "label = fraction of expert votes 'mitotic figure' (labels == 1); "
                            "hard_label = category_id == 1 (the majority)"})


def cmd_sliderunner(args, argv) -> None:
    from .extract import point_jobs
    from .sliderunner import read_sliderunner

    cfg = extract_config(args, "slide")
    _refuse_existing(args)
    by_slide, classes, summary, left_out = read_sliderunner(
        args.db, args.slides, args.mitotic_class, args.lookalike_class, tuple(args.include_class or ()),
        skip_missing=args.skip_missing)
    jobs = point_jobs(by_slide, cfg)
    _build(args, argv, jobs, cfg, {
        "source": "sliderunner", "source_file": str(args.db), "mpp": None,
        "classes": {str(k): v for k, v in classes.items()},
        "mitotic_class": args.mitotic_class, "lookalike_class": args.lookalike_class, "left_out": left_out,
        "label_definition": "label = fraction of Annotations_label votes of the mitotic class (last vote per person); "
                            "hard_label = agreedClass == mitotic class"})
    print(("warning: " if left_out else "") + summary, file=sys.stderr)  # what was left out, counted, on one line


def cmd_points(args, argv) -> None:
    from .extract import point_jobs
    from .points import read_points

    cfg = extract_config(args, "slide")
    if args.geojson is not None and args.slide is None:
        raise UserError("--geojson: give it together with --slide NAME (the slide the GeoJSON annotates)")
    if args.slide is not None and args.geojson is None:
        raise UserError("--slide: names the slide of a --geojson file; a --csv names slides in its 'slide' column")
    _refuse_existing(args)
    if args.geojson is not None:
        from .geojson import geojson_points

        by_slide = geojson_points(args.geojson, args.slides, args.slide, cfg.label_map)
    else:
        by_slide = read_points(args.csv, args.slides, skip_missing=args.skip_missing, label_map=cfg.label_map)
    jobs = point_jobs(by_slide, cfg)
    _build(args, argv, jobs, cfg, {
        "source": "points", "source_file": str(args.geojson or args.csv), "mpp": None,
        "label_definition": "label = the CSV's label (or class through label_map), or the mean of its 0/1 votes; "
                            "hard_label = given or majority"})


def cmd_folder(args, argv) -> None:
    from .extract import safe_key
    from .folder import cut_files, read_folder

    cfg = extract_config(args, "slide")
    if cfg.split.mode == "y":
        raise UserError("--split: pre-cut patches have no slide coordinates; use slide or random")
    _refuse_existing(args)
    groups = read_folder(args.images, args.labels, label_map=cfg.label_map)
    jobs = [(safe_key(key), cut_files, {"rows": rows, "files": files, "patch_size": cfg.patch_size,
                                        "margin": cfg.margin}) for key, (rows, files) in sorted(groups.items())]
    _build(args, argv, jobs, cfg, {
        "source": "folder", "source_file": str(args.labels), "mpp": None,
        "label_definition": "label = the CSV's label, or the mean of its 0/1 votes; hard_label = given or majority"})


def cmd_annotators(args, argv) -> None:
    from .annotators import collect, parse_annotators
    from .extract import point_jobs

    cfg = extract_config(args, "slide")
    annotators = parse_annotators(args.annotator)
    _refuse_existing(args)
    by_slide, meta = collect(annotators, args.slides, args.radius_um, args.radius_px, args.absent, cfg.label_map)
    _build(args, argv, point_jobs(by_slide, cfg), cfg, {
        "source": "annotators", "source_file": ",".join(str(p) for _, p in annotators), **meta,
        "label_definition": "label = mean of the annotators' votes (class through label_map, a plain mark = 1, "
                            f"absent = {'0' if args.absent == 'not-mitotic' else 'no vote'}); hard_label = majority "
                            "(ties mitotic); cells matched across annotators within the radius"})
    print(f"cells marked by 1..{len(annotators)} annotators: {meta['matching']['cells_marked_by']}")


def cmd_detect(args, argv) -> None:
    from dataclasses import asdict

    from .detect import detect_slide
    from .extract import safe_key
    from .slides import open_slide

    cfg = extract_config(args, "y")
    _refuse_existing(args)
    jobs, mpps = [], {}
    names = [str(p) for p in args.slide]
    if len(set(names)) != len(names):
        raise UserError("--slide: the same slide is given twice")
    for path in args.slide:
        with open_slide(path) as slide:  # fail early on missing or corrupt slides
            slide.level_size(cfg.level)
            mpps[str(path)] = slide.mpp
        jobs.append((safe_key(str(path)), detect_slide, {
            "slide_path": str(path), "patch_size": cfg.patch_size, "margin": cfg.margin, "level": cfg.level,
            "max_patches": args.max, "seed": cfg.split.seed, "cfg": asdict(cfg.detect),
            "source_name": Path(path).stem}))
    _build(args, argv, jobs, cfg, {
        "source": "detect", "source_file": ",".join(names), "mpp": next(iter(mpps.values())),
        "label_definition": "unlabelled: nuclei found by haematoxylin thresholding and region properties"})


def _refuse_existing(args) -> None:
    from mitosis_ldm.io import check_new_output

    check_new_output(args.out, args.overwrite)  # before any slow parsing


# -- parser --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mitosis-ldm data", description="Make and inspect patch datasets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="synthetic H&E nuclei with known mitotic degree and simulated expert votes")
    p.add_argument("--out", required=True, type=Path, help="output dataset folder")
    p.add_argument("--n", type=_positive("--n"), default=6000, help="number of patches (default 6000)")
    p.add_argument("--size", type=_positive("--size"), default=64, help="patch size in pixels (default 64)")
    p.add_argument("--experts", type=_positive("--experts"), default=3, help="simulated experts voting (default 3)")
    p.add_argument("--seed", type=_nonnegative, default=0)
    p.add_argument("--margin", type=_nonnegative, default=8, help="context pixels stored around each patch (default 8)")
    p.add_argument("--imposters", type=float, default=0.15, help="fraction of dark round look-alikes (default 0.15)")
    p.add_argument("--workers", type=_positive("--workers"), default=_default_workers())
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_synth)

    def slide_source(name, help_):
        q = sub.add_parser(name, help=help_)
        q.add_argument("--out", required=True, type=Path, help="output dataset folder")
        q.add_argument("--config", type=Path, help="YAML with ExtractConfig keys (patch_size, margin, level, workers, "
                                                   "split.*, detect.*, label_map)")
        q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        q.add_argument("--size", type=_positive("--size"), help="patch size in pixels at the read level (default 64)")
        q.add_argument("--margin", type=_nonnegative, help="context pixels stored around each patch (default 8)")
        q.add_argument("--level", type=_nonnegative, help="pyramid level to read (default 0)")
        q.add_argument("--workers", type=_positive("--workers"), help="slides extracted in parallel (default 2)")
        q.add_argument("--split", choices=["slide", "y", "random"], help="split mode (default per source)")
        q.add_argument("--seed", type=_nonnegative, help="split (and sampling) seed")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        return q

    p = slide_source("midog", "MIDOG++ / MIDOG 2021 COCO-like JSON + TIFF images")
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path, help="folder holding the images' file_name")
    p.add_argument("--tumor-type", help="keep only this images[].tumor_type")
    p.add_argument("--skip-missing", action="store_true", help="leave out images whose files are absent")
    p.set_defaults(func=cmd_midog)

    p = slide_source("sliderunner", "CCMCT SlideRunner SQLite + slides")
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--slides", required=True, type=Path, help="folder holding Slides.filename")
    p.add_argument("--mitotic-class", type=int, default=2, help="class id of mitotic figures (default 2)")
    p.add_argument("--lookalike-class", type=int, default=7, help="class id of look-alikes (default 7)")
    p.add_argument("--include-class", type=int, action="append", help="also keep this class, as a hard negative")
    p.add_argument("--skip-missing", action="store_true", help="leave out slides whose files are absent")
    p.set_defaults(func=cmd_sliderunner)

    p = slide_source("points", "CSV/TSV of slide, x, y plus label or votes, or a QuPath GeoJSON of one slide")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--csv", type=Path, help="points table (comma- or tab-separated)")
    which.add_argument("--geojson", type=Path, help="QuPath GeoJSON export (with --slide)")
    p.add_argument("--slide", help="with --geojson: the slide's file name under --slides")
    p.add_argument("--slides", required=True, type=Path, help="folder the slide column is relative to")
    p.add_argument("--skip-missing", action="store_true", help="leave out slides whose files are absent")
    p.add_argument("--label-map", help="class names -> labels, e.g. NOT=0,INDET=0.5,MITE=1 (label or class column)")
    p.set_defaults(func=cmd_points)

    p = slide_source("folder", "a folder of pre-cut patches + a labels CSV")
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--labels", required=True, type=Path, help="CSV: file, label and/or votes [, id, slide, split]")
    p.add_argument("--label-map", help="class names -> labels, e.g. NOT=0,INDET=0.5,MITE=1 (label or class column)")
    p.set_defaults(func=cmd_folder)

    p = slide_source("annotators", "merge annotators' point files (QuPath GeoJSON, CSV, folders) into per-cell votes")
    p.add_argument("--slides", required=True, type=Path, help="folder of slides (or one slide)")
    p.add_argument("--annotator", required=True, action="append", metavar="NAME=FILE",
                   help="an annotator and their GeoJSON, points CSV/TSV, or folder of per-slide files (repeatable)")
    radius = p.add_mutually_exclusive_group(required=True)
    radius.add_argument("--radius-um", type=float, help="marks closer than this (microns) are one cell; needs mpp")
    radius.add_argument("--radius-px", type=float, help="the same radius in level-0 pixels")
    p.add_argument("--absent", choices=ABSENT_CHOICES, default="not-mitotic",
                   help="an annotator who marked nothing at a cell: a 0 vote (not-mitotic, default) or no vote")
    p.add_argument("--label-map", help="class names -> votes, e.g. Mitosis=1,Imposter=0 (a plain mark votes 1)")
    p.set_defaults(func=cmd_annotators)

    p = slide_source("detect", "nuclei detection on unlabelled slides (label left empty)")
    p.add_argument("--slide", required=True, type=Path, action="append", help="slide or image (repeatable)")
    p.add_argument("--max", type=_positive("--max"), help="keep at most this many nuclei per slide (random)")
    p.set_defaults(func=cmd_detect)

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
