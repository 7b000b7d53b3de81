"""Property-based fuzzing of the explorer's HTTP inputs: mutated valid requests get an answer or one line of JSON
error (4xx, or 503 when the queue is full), never a 500, whatever the body, the path or the query.

The bodies start from valid /nucleus, /transition and /export requests and take the file fuzzers' tree edits
(tests/fuzz_mutations.py); the paths and queries take their wild values. Rendering is faked (serve_helpers), so a
case costs milliseconds. CI: derandomised, a fixed budget; `make fuzz` raises it like the file fuzzers'.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_mutations import mutate_tree, wild, wild_text
from serve_helpers import make_explorer, shared_world

pytestmark = pytest.mark.slow

SLIDE = "slide.png"
BODIES = [
    ("/nucleus", {"slide": SLIDE, "x": 300, "y": 140}),
    ("/transition", {"slide": SLIDE, "x": 300, "y": 140, "conditions": [0, 0.5, 1], "mode": "invert",
                     "guidance": 1.5, "steps": 4, "inversion_iters": 1}),
    ("/transition", {"dataset": "patches", "index": 3, "conditions": "0:1:3", "mode": "sdedit", "strength": 0.5}),
    ("/export", {"dataset": "patches", "index": 5, "conditions": [0.2, 0.8]}),
]
PATHS = ["/slides/{slide}.dzi", "/slides/{slide}_files/{level}/{col}_{row}.jpeg", "/datasets/{dataset}/grid",
         "/datasets/{dataset}/grid?per_bin={n}", "/datasets/{dataset}/patch/{index}.png", "/exports/{name}"]
VALID_PARTS = {"slide": SLIDE, "level": 9, "col": 0, "row": 0, "dataset": "patches", "n": 4, "index": 2,
               "name": "x.png"}
CI_BUDGET = 60


def budget() -> int:
    return CI_BUDGET if settings.get_current_profile_name() == "ci" else settings.default.max_examples


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    app = make_explorer(shared_world(tmp_path_factory), tmp_path_factory.mktemp("exports"), fake=True)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def check(res) -> None:
    assert res.status_code != 500 and res.status_code < 600, (res.status_code, res.text[:300])
    if res.status_code >= 400:
        body = res.json()
        assert list(body) == ["error"] and "\n" not in body["error"] and body["error"], body


def mutated_body(rng: random.Random) -> tuple[str, bytes]:
    route, body = rng.choice(BODIES)
    for _ in range(rng.randint(1, 3)):
        body = mutate_tree(body, rng)
    text = json.dumps(body, allow_nan=True)  # NaN and Infinity too: Python's JSON reader takes them
    if rng.random() < 0.1:  # a damaged body
        cut = rng.randrange(len(text) + 1)
        text = text[:cut] + rng.choice(["", "\x00", "}", "\ufffd", "\\", '"']) + text[cut + 1:]
    return route, text.encode("utf-8", "surrogatepass")


def mutated_path(rng: random.Random) -> str:
    parts = dict(VALID_PARTS)
    for _ in range(rng.randint(1, 2)):
        key = rng.choice(sorted(parts))
        parts[key] = rng.choice([wild_text(rng), str(wild(rng)), -1, 10 ** 9, "..", "%2e%2e%2f", "a/b", " "])
    return rng.choice(PATHS).format(**parts)


@settings(max_examples=budget(), deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_fuzz_request_bodies(client, rng):
    route, body = mutated_body(rng)
    check(client.post(route, content=body, headers={"content-type": "application/json"}))


@settings(max_examples=budget(), deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_fuzz_paths_and_queries(client, rng):
    check(client.get(mutated_path(rng)))
