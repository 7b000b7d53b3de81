"""Shared extraction plumbing: the per-slide job that cuts patches at given centres, and the extraction config.

Sources (midog, sliderunner, points, detect) turn their annotations into
`PointRow`s grouped by slide, then call `point_jobs` and `build_dataset`:
one job per slide, run in worker processes, resumable per slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dataset import Shard, SplitConfig
from .detect import DetectConfig
from .slides import open_slide


@dataclass
class ExtractConfig:
    """How patches are cut and split; shared by every slide source (`--config` YAML, `--set key=value`)."""

    patch_size: int = 64      # pixels at the reading level
    margin: int = 8           # context pixels stored on each side (rotation leaves no black corners)
    level: int = 0            # pyramid level to read (0 = full resolution)
    workers: int = 2          # slides extracted in parallel
    # mode auto: each source's natural split (slide for annotated slides, y for detect, random for synth)
    split: SplitConfig = field(default_factory=lambda: SplitConfig(mode="auto"))
    detect: DetectConfig = field(default_factory=DetectConfig)  # used by `data detect` only
    # class name -> label in [0, 1] (points, folder, annotators; `--label-map NOT=0,INDET=0.5,MITE=1`)
    label_map: dict[str, float] = field(default_factory=dict)


def cut_points(slide_path: str, rows: list[dict], patch_size: int, margin: int, level: int = 0,
               expect_size: list[int] | None = None) -> Shard:
    """One job: read the patches around each row's (x, y) (level-0 pixels) from one slide."""
    from mitosis_ldm.errors import UserError

    with open_slide(slide_path) as slide:
        if expect_size is not None and tuple(expect_size) != tuple(slide.size):
            raise UserError(f"{slide_path}: image is {slide.size[0]}x{slide.size[1]} but the annotations give "
                            f"field 'width'/'height' {expect_size[0]}x{expect_size[1]}")
        images = slide.read_patches([(r["x"], r["y"]) for r in rows], patch_size, margin, level)
    return Shard(images, rows)


def point_jobs(by_slide: dict[str, tuple[str, list[dict]]], cfg: ExtractConfig,
               sizes: dict[str, list[int]] | None = None) -> list:
    """build_dataset jobs, one per slide: {key: (slide_path, rows)} -> [(key, cut_points, kwargs)]."""
    jobs = []
    for key in sorted(by_slide):
        path, rows = by_slide[key]
        kwargs = {"slide_path": str(path), "rows": rows, "patch_size": cfg.patch_size, "margin": cfg.margin,
                  "level": cfg.level}
        if sizes and key in sizes:
            kwargs["expect_size"] = list(sizes[key])
        jobs.append((safe_key(key), cut_points, kwargs))
    return jobs


def safe_key(name: str) -> str:
    """A file-name-safe job key for a slide name (the partial folder holds KEY.npy / KEY.json)."""
    import hashlib
    import re

    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]
    return f"{clean}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
