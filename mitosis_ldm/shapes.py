"""The shape a reader expects of a JSON document another command wrote, checked when the file is read.

A document handed back to the tool (a study's results.json for `report --study`) may come from another version or
have been damaged on the way; the reader states what it uses and `check_shape` refuses anything else with one line
that names the file and the field, before the command's own work:

    SHAPE = {"pooled": {"ci": List((float, None), length=2)}, "readers": Map({"n": int})}
    check_shape(data, SHAPE, path)  # UserError: PATH: field 'pooled.ci[0]' is 'x', expected a number or null

Specs: `float` (a finite number, not true or false), `int` (a whole number >= 0), `str`, `None` (null),
`object` (present, any value), a tuple of those (any one of them), a dict (an object with at least these keys),
`List(spec, length)` and `Map(spec)` (an object of any keys, every value `spec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class List:
    spec: object
    length: int | None = None


@dataclass(frozen=True)
class Map:
    spec: object


def _describe(spec) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, List):
        return "a list" if spec.length is None else f"a list of {spec.length}"
    if isinstance(spec, (dict, Map)):
        return "an object"
    return {float: "a number", int: "a whole number >= 0", str: "text", None: "null", object: "a value"}[spec]


def _scalar(value, spec) -> bool:
    if spec is object:
        return True
    if spec is None:
        return value is None
    if spec is str:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if spec is int:
        return isinstance(value, int) and value >= 0
    return math.isfinite(value)


def check_shape(value, spec, where: Path | str, field: str = "") -> None:
    """Raise a UserError naming `where` and the first field of `value` that does not have the shape `spec`."""
    def wrong():
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return UserError(f"{where}: field '{field or '(top)'}' is {shown}, expected {_describe(spec)}")

    if isinstance(spec, tuple):
        if not any(_scalar(value, s) for s in spec):
            raise wrong()
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise wrong()
        for key, inner in spec.items():
            name = f"{field}.{key}" if field else key
            if key not in value:
                raise UserError(f"{where}: field '{name}' is missing")
            check_shape(value[key], inner, where, name)
    elif isinstance(spec, List):
        if not isinstance(value, list) or (spec.length is not None and len(value) != spec.length):
            raise wrong()
        for index, item in enumerate(value):
            check_shape(item, spec.spec, where, f"{field}[{index}]")
    elif isinstance(spec, Map):
        if not isinstance(value, dict):
            raise wrong()
        for key, item in value.items():
            check_shape(item, spec.spec, where, f"{field}.{key}" if field else key)
    elif not _scalar(value, spec):
        raise wrong()
