"""Points CSV over any OpenSlide-readable slide or plain image -> patch rows per slide.

    mitosis-ldm data points --csv cells.csv --slides DIR --out DIR

Columns: `slide` (file name under --slides, or an absolute path), `x`, `y`
(level-0 pixels, the patch centre), and `label` (soft, in [0, 1]) and/or
`votes` (`1;0;1`); optional `id` (unique; default `SLIDE:LINE`) and
`hard_label` (default: majority of the votes, ties mitotic). Empty label and
votes cells give an unlabelled patch.
"""

from __future__ import annotations

from pathlib import Path

from mitosis_ldm.errors import UserError

from .slides import find_slide
from .tables import check_unique, label_cells, number, read_csv


def read_points(csv_path, slides_dir, skip_missing: bool = False, label_map: dict[str, float] | None = None):
    """Parse and check the CSV (or TSV). Returns {slide key: (path, rows)}.

    With a label map, the `label` (or `class`) column holds class names (patches/labelmap.py).
    """
    csv_path = Path(csv_path)
    raw = read_csv(csv_path, ["slide", "x", "y"], one_of=["label", "votes"] + (["class"] if label_map else []))
    numbered = [(i + 2, r) for i, r in enumerate(raw)]  # line 1 is the header
    if any("id" in r for _, r in numbered):
        check_unique(csv_path, numbered)
    by_slide: dict[str, tuple[Path, list[dict]]] = {}
    for line, row in numbered:
        name = row["slide"]
        if not name:
            raise UserError(f"{csv_path}: line {line} field 'slide' is empty")
        x = number(csv_path, line, "x", row["x"])
        y = number(csv_path, line, "y", row["y"])
        if x < 0 or y < 0:
            raise UserError(f"{csv_path}: line {line} field 'x'/'y' is ({row['x']}, {row['y']}), outside the image")
        if name not in by_slide:
            if skip_missing and not (Path(slides_dir) / name).exists():
                continue
            by_slide[name] = (find_slide(slides_dir, name), [])
        labels = label_cells(csv_path, line, row, label_map)
        by_slide[name][1].append({
            "id": row.get("id") or f"{name}:{line}",
            "source": "points",
            "slide": name,
            "x": int(round(x)),
            "y": int(round(y)),
            **labels,
        })
    if not by_slide:
        raise UserError(f"{csv_path}: no points on available slides (empty source)")
    return by_slide
