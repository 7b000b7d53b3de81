"""QuPath GeoJSON annotations -> cell marks (level-0 pixel centres with a class name).

    mitosis-ldm data points --geojson slide1.geojson --slide slide1.svs --slides DIR --out DIR \
        --label-map "Mitosis=1,Imposter=0"

Reads what QuPath's "Export objects as GeoJSON" writes: a FeatureCollection or
a plain list of features (a single Feature is accepted too). `Point` is one
cell; each point of a `MultiPoint` (QuPath's points tool) is one cell;
`Polygon` / `MultiPolygon` outlines are reduced to their centroid (shapely).
The class is `properties.classification.name` (derived classes without a name
join `classification.names` with ': '); unclassified features have no class.
Coordinates are level-0 pixels, x to the right, y down, as QuPath exports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mitosis_ldm.errors import UserError
from mitosis_ldm.io import read_json

GEOJSON_SUFFIXES = (".geojson", ".json")


@dataclass
class Mark:
    """One annotated cell: centre (level-0 pixels), class name (None when unclassified), and where it came from."""

    x: float
    y: float
    class_name: str | None
    field: str  # e.g. "features[3].geometry.coordinates[1]", for error messages and ids


def read_geojson(path) -> list[Mark]:
    """All marks of a QuPath GeoJSON export, in file order."""
    path = Path(path)
    data = read_json(path, "GeoJSON")
    if isinstance(data, list):
        features, prefix = data, ""
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features, prefix = data.get("features"), "features"
        if not isinstance(features, list):
            raise UserError(f"{path}: field 'features' is missing or not a list (FeatureCollection)")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features, prefix = [data], "feature"
    else:
        found = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path}: field 'type' is {found!r}; expected a GeoJSON FeatureCollection or a list of "
                        f"features (QuPath: Export objects as GeoJSON)")
    marks: list[Mark] = []
    for i, feature in enumerate(features):
        field = f"{prefix}[{i}]" if prefix != "feature" else "feature"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            found = feature.get("type") if isinstance(feature, dict) else type(feature).__name__
            raise UserError(f"{path}: field '{field}.type' is {found!r}, expected 'Feature'")
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict):
            raise UserError(f"{path}: field '{field}.geometry' is missing (a feature without geometry)")
        class_name = _class_name(path, field, feature.get("properties"))
        for x, y, where in _centres(path, f"{field}.geometry", geometry):
            marks.append(Mark(x, y, class_name, where))
    return marks


def _class_name(path: Path, field: str, properties) -> str | None:
    if properties is None:
        return None
    if not isinstance(properties, dict):
        raise UserError(f"{path}: field '{field}.properties' must be an object")
    classification = properties.get("classification")
    if classification is None:
        return None
    if isinstance(classification, str):
        return classification or None
    if isinstance(classification, dict):
        name = classification.get("name")
        if name is None and isinstance(classification.get("names"), list):
            name = ": ".join(str(n) for n in classification["names"])
        if name is None or isinstance(name, str):
            return name or None
    raise UserError(f"{path}: field '{field}.properties.classification.name' must be a class name, "
                    f"got {classification!r}")


def _point(path: Path, field: str, value) -> tuple[float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) < 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[:2])
            or not all(math.isfinite(v) for v in value[:2])):
        raise UserError(f"{path}: field '{field}' must be a position [x, y] of finite numbers, got {value!r}")
    return float(value[0]), float(value[1])


def _centres(path: Path, field: str, geometry: dict):
    """(x, y, field) for each cell a geometry stands for."""
    kind = geometry.get("type")
    coordinates = geometry.get("coordinates")
    if kind == "Point":
        yield (*_point(path, f"{field}.coordinates", coordinates), f"{field}.coordinates")
    elif kind == "MultiPoint":
        if not isinstance(coordinates, list):
            raise UserError(f"{path}: field '{field}.coordinates' must be a list of [x, y] positions")
        for j, value in enumerate(coordinates):
            yield (*_point(path, f"{field}.coordinates[{j}]", value), f"{field}.coordinates[{j}]")
    elif kind in ("Polygon", "MultiPolygon"):
        yield (*_centroid(path, field, geometry), f"{field}.coordinates")
    else:
        raise UserError(f"{path}: field '{field}.type' is {kind!r}, expected Point, MultiPoint, Polygon or "
                        f"MultiPolygon")


def _numbers(value):
    """Every number in nested coordinate lists (anything else is left to shapely to refuse)."""
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, float):
        yield value


def _centroid(path: Path, field: str, geometry: dict) -> tuple[float, float]:
    """An outline's area centroid (shapely), so a nucleus drawn as a polygon becomes its centre."""
    import warnings

    import shapely.geometry

    if not all(math.isfinite(v) for v in _numbers(geometry.get("coordinates"))):
        raise UserError(f"{path}: field '{field}.coordinates' must hold finite numbers (a {geometry.get('type')} "
                        f"with NaN or infinity)")
    try:
        with warnings.catch_warnings():  # numpy's warnings inside shapely: the error below says it
            warnings.simplefilter("ignore", RuntimeWarning)
            shape = shapely.geometry.shape(geometry)
            centre = shape.centroid
    except Exception as err:  # shapely raises several types for malformed rings
        raise UserError(f"{path}: field '{field}.coordinates' is not a valid {geometry.get('type')} "
                        f"({type(err).__name__}: {' '.join(str(err).split())[:100]})") from None
    if centre.is_empty or not (math.isfinite(centre.x) and math.isfinite(centre.y)):
        raise UserError(f"{path}: field '{field}.coordinates' is an empty {geometry.get('type')}")
    return float(centre.x), float(centre.y)


def check_inside(path, mark: Mark, slide_name: str, size: tuple[int, int]) -> None:
    """A mark must lie on its slide (level-0 pixels); say which file, feature and slide when it does not."""
    width, height = size
    if not (0 <= mark.x < width and 0 <= mark.y < height):
        where = mark.field if mark.field.startswith("line ") else f"field '{mark.field}'"
        raise UserError(f"{path}: {where} ({mark.x:g}, {mark.y:g}) lies outside slide {slide_name} "
                        f"({width}x{height})")


def geojson_points(geojson_path, slides_dir, slide_name: str, label_map: dict[str, float]):
    """`data points --geojson FILE --slide NAME`: {slide key: (path, rows)} like `read_points`.

    Each mark becomes a patch; its class is mapped through the label map (an unclassified mark is unlabelled);
    the class name is kept in a `class` column.
    """
    from .labelmap import class_value
    from .slides import find_slide, open_slide

    geojson_path = Path(geojson_path)
    marks = read_geojson(geojson_path)
    if not marks:
        raise UserError(f"{geojson_path}: field 'features' holds no points (empty source)")
    slide_path = find_slide(slides_dir, slide_name)
    with open_slide(slide_path) as slide:
        size = slide.size
    rows = []
    for i, mark in enumerate(marks):
        check_inside(geojson_path, mark, slide_name, size)
        label = None
        if mark.class_name is not None:
            feature = mark.field.split('.geometry')[0]
            label = class_value(label_map, mark.class_name,
                                f"{geojson_path}: field '{feature}.properties.classification.name'")
        rows.append({"id": f"{slide_name}:{i}", "source": "points", "slide": slide_name,
                     "x": min(int(round(mark.x)), size[0] - 1), "y": min(int(round(mark.y)), size[1] - 1),
                     "label": label, "votes": "",
                     "hard_label": None if label is None else int(label >= 0.5), "class": mark.class_name or ""})
    return {slide_name: (slide_path, rows)}
