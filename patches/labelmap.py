"""Categorical labels: class names read as soft labels through a label map.

    mitosis-ldm data points --csv cells.tsv --slides DIR --out DIR --label-map NOT=0,INDET=0.5,MITE=1

The seed paper's meningioma annotations name classes (`NOT`, `INDET`, `MITE`);
QuPath names them too (`properties.classification.name`). A label map turns a
name into a number in [0, 1]. It is given as `--label-map NAME=VALUE,...` or in
the data config (`label_map: {NOT: 0, INDET: 0.5, MITE: 1}`; quote YAML names
such as "NO" or "ON" that YAML would read as booleans). A flag replaces the
config's map.
"""

from __future__ import annotations

import math

from mitosis_ldm.errors import UserError


def parse_label_map(text: str, where: str = "--label-map") -> dict[str, float]:
    """`NOT=0,INDET=0.5,MITE=1` -> {"NOT": 0.0, "INDET": 0.5, "MITE": 1.0}."""
    mapping: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"{where}: '{item.strip()}' is not NAME=VALUE (expected e.g. NOT=0,INDET=0.5,MITE=1)")
        if name in mapping:
            raise UserError(f"{where}: class name '{name}' is given twice")
        mapping[name] = _value(value.strip(), where, name)
    return mapping


def check_label_map(mapping: dict, where: str) -> dict[str, float]:
    """Validate a map from a config file: string names, values in [0, 1]."""
    checked: dict[str, float] = {}
    for name, value in mapping.items():
        if isinstance(value, bool):
            raise UserError(f"{where}: key 'label_map.{name}' must be a number in [0, 1], got {value!r}")
        checked[str(name)] = _value(value, where, f"label_map.{name}")
    return checked


def _value(value, where: str, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: value of '{name}' is {value!r}, not a number") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise UserError(f"{where}: value of '{name}' is {value!r}, expected a number in [0, 1]")
    return number


def map_class(label_map: dict[str, float], name: str, where: str) -> float:
    """The value of one class name; `where` names the file, line/feature and field for the error."""
    try:
        return label_map[name]
    except KeyError:
        known = ", ".join(label_map) or "empty map"
        raise UserError(f"{where} is '{name}', which the label map does not name ({known})") from None


def class_value(label_map: dict[str, float], name: str, where: str) -> float:
    """A class name's value: through the map when one is given, else the name must be a number in [0, 1]."""
    if label_map:
        return map_class(label_map, name, where)
    try:
        value = float(name)
    except ValueError:
        raise UserError(f"{where} is '{name}', a class name: give --label-map NAME=VALUE,... "
                        f"(or label_map in the config)") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise UserError(f"{where} is '{name}', expected a number in [0, 1] or a class name with --label-map")
    return value


def format_label_map(label_map: dict[str, float]) -> str:
    return ",".join(f"{name}={value:g}" for name, value in label_map.items())
