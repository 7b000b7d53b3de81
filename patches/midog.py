"""MIDOG++ / MIDOG 2021: COCO-like JSON + TIFF images -> patch rows per image.

    mitosis-ldm data midog --json MIDOG++.json --images DIR --out DIR [--tumor-type "human breast cancer"]

`bbox` is [x1, y1, x2, y2] (not COCO's [x, y, w, h]); the patch centre is the
bbox centre (clamped onto the image for the few cells whose box
straddles the edge; a box wholly outside is an error). `labels` are the experts' votes (1 mitotic figure, 2 not):
label = fraction of votes == 1; hard_label = (category_id == 1), the majority.
"""

from __future__ import annotations

import math
from pathlib import Path

from mitosis_ldm.errors import UserError
from mitosis_ldm.io import read_json

from .slides import find_slide

MITOTIC, NOT_MITOTIC = 1, 2


def _number(value, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: field '{field}' must be a finite number, got {value!r}")
    return float(value)


def _identifier(value, json_path, field: str) -> None:
    """COCO ids are integers (some exports use strings); anything else is not an id."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{json_path}: field '{field}' is {value!r}, expected an integer id")


def read_midog(json_path, images_dir, tumor_type: str | None = None, skip_missing: bool = False):
    """Parse and check the annotations. Returns ({slide key: (path, rows)}, {slide key: [w, h]}).

    With `skip_missing`, images whose files are not in `images_dir` are left out
    (for partial downloads); otherwise a missing file is an error.
    """
    json_path = Path(json_path)
    data = read_json(json_path, "JSON")
    if not isinstance(data, dict):
        raise UserError(f"{json_path}: top level must be an object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{json_path}: field '{key}' is missing or not a list")
    images = {}
    for i, image in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        if not isinstance(image, dict):
            raise UserError(f"{where} is not an object")
        for key in ("id", "file_name", "width", "height"):
            if key not in image:
                raise UserError(f"{json_path}: field 'images[{i}].{key}' is missing")
        _identifier(image["id"], json_path, f"images[{i}].id")
        if image["id"] in images:
            raise UserError(f"{json_path}: field 'images[{i}].id' has duplicate value {image['id']!r}")
        for key in ("width", "height"):
            if _number(image[key], json_path, f"images[{i}].{key}") < 1:
                raise UserError(f"{json_path}: field 'images[{i}].{key}' must be >= 1, got {image[key]}")
        images[image["id"]] = image
    tumor_types = sorted({str(im.get("tumor_type")) for im in images.values()})
    if tumor_type is not None and tumor_type not in tumor_types:
        raise UserError(f"--tumor-type: '{tumor_type}' does not occur in {json_path} "
                        f"(tumour types: {', '.join(tumor_types)})")
    by_slide: dict[str, tuple[Path, list[dict]]] = {}
    sizes: dict[str, list[int]] = {}
    seen, skipped = set(), set()
    for i, ann in enumerate(data["annotations"]):
        field = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise UserError(f"{json_path}: field '{field}' is not an object")
        for key in ("id", "image_id", "bbox", "category_id", "labels"):
            if key not in ann:
                raise UserError(f"{json_path}: field '{field}.{key}' is missing")
        _identifier(ann["id"], json_path, f"{field}.id")
        _identifier(ann["image_id"], json_path, f"{field}.image_id")
        if ann["id"] in seen:
            raise UserError(f"{json_path}: field '{field}.id' has duplicate value {ann['id']!r}")
        seen.add(ann["id"])
        image = images.get(ann["image_id"])
        if image is None:
            raise UserError(f"{json_path}: field '{field}.image_id' is {ann['image_id']!r}, which no image has")
        if tumor_type is not None and image.get("tumor_type") != tumor_type:
            continue
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise UserError(f"{json_path}: field '{field}.bbox' must be [x1, y1, x2, y2], got {bbox!r}")
        x1, y1, x2, y2 = (_number(v, json_path, f"{field}.bbox") for v in bbox)
        if not (x2 > x1 and y2 > y1):
            raise UserError(f"{json_path}: field '{field}.bbox' {bbox} needs x2 > x1 and y2 > y1 ([x1, y1, x2, y2])")
        width, height = image["width"], image["height"]
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise UserError(f"{json_path}: field '{field}.bbox' {bbox} lies outside image "
                            f"{image['file_name']} ({width}x{height})")
        # a few real cells sit on the image edge (bbox centre a pixel or two outside): clamp onto the image
        cx = min(max((x1 + x2) / 2, 0), width - 1)
        cy = min(max((y1 + y2) / 2, 0), height - 1)
        votes = ann["labels"]
        if not isinstance(votes, list) or not votes or any(v not in (MITOTIC, NOT_MITOTIC) for v in votes):
            raise UserError(f"{json_path}: field '{field}.labels' must be a non-empty list of 1 (mitotic) / "
                            f"2 (not), got {votes!r}")
        if ann["category_id"] not in (MITOTIC, NOT_MITOTIC):
            raise UserError(f"{json_path}: field '{field}.category_id' must be 1 or 2, got {ann['category_id']!r}")
        mitotic = [int(v == MITOTIC) for v in votes]
        key = str(image["file_name"])
        if key in skipped:
            continue
        if key not in by_slide:
            if skip_missing and not (Path(images_dir) / key).exists():
                skipped.add(key)
                continue
            by_slide[key] = (find_slide(images_dir, key, "--images"), [])
            sizes[key] = [int(width), int(height)]
        by_slide[key][1].append({
            "id": f"midog-{ann['id']}",
            "source": "midog",
            "slide": key,
            "x": int(round(cx)),
            "y": int(round(cy)),
            "label": sum(mitotic) / len(mitotic),
            "votes": ";".join(map(str, mitotic)),
            "hard_label": int(ann["category_id"] == MITOTIC),
            "tumor_type": image.get("tumor_type", ""),
            "annotation_id": ann["id"],
        })
    if not by_slide:
        what = f" for tumour type '{tumor_type}'" if tumor_type else ""
        raise UserError(f"{json_path}: field 'annotations' holds no cells{what} (empty source)")
    return by_slide, sizes
