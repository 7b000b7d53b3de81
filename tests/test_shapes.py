"""A JSON document that another command wrote is checked against the shape its reader uses: one line naming the
file and the first field that differs."""

from __future__ import annotations

import json

import pytest

from mitosis_ldm.errors import UserError
from mitosis_ldm.shapes import List, Map, check_shape

SHAPE = {"name": str, "count": int, "ci": List((float, None), length=2), "rows": Map({"score": float}),
         "any": object}
GOOD = {"name": "a", "count": 3, "ci": [0.1, None], "rows": {"x": {"score": 0.5, "extra": "kept"}}, "any": [1],
        "more": True}


def test_a_document_of_the_shape_passes_with_fields_the_reader_does_not_use():
    check_shape(GOOD, SHAPE, "f.json")


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("count"), "f.json: field 'count' is missing"),
    (lambda d: d.update(count=-1), "f.json: field 'count' is -1, expected a whole number >= 0"),
    (lambda d: d.update(count=2.5), "f.json: field 'count' is 2.5, expected a whole number >= 0"),
    (lambda d: d.update(count=True), "f.json: field 'count' is True, expected a whole number >= 0"),
    (lambda d: d.update(name=None), "f.json: field 'name' is None, expected text"),
    (lambda d: d.update(ci=[0.1]), "f.json: field 'ci' is [0.1], expected a list of 2"),
    (lambda d: d.update(ci=["0.1", None]), "f.json: field 'ci[0]' is '0.1', expected a number or null"),
    (lambda d: d.update(ci=[float("nan"), None]), "f.json: field 'ci[0]' is nan, expected a number or null"),
    (lambda d: d["rows"]["x"].update(score=False), "f.json: field 'rows.x.score' is False, expected a number"),
    (lambda d: d["rows"].update(y=[]), "f.json: field 'rows.y' is [], expected an object"),
    (lambda d: d.update(rows={"y": {}}), "f.json: field 'rows.y.score' is missing"),
    (lambda d: d.update(count="x" * 100), "f.json: field 'count' is 'xxxxxxxx"),
    (lambda d: d.pop("any"), "f.json: field 'any' is missing"),
])
def test_the_first_field_that_differs_is_named(change, message):
    doc = json.loads(json.dumps(GOOD))
    change(doc)
    with pytest.raises(UserError) as info:
        check_shape(doc, SHAPE, "f.json")
    assert str(info.value).startswith(message) and len(str(info.value)) < 140


def test_a_document_that_is_not_an_object_is_named_as_the_top():
    with pytest.raises(UserError, match=r"f.json: field '\(top\)' is \[1, 2\], expected an object"):
        check_shape([1, 2], SHAPE, "f.json")
