"""The reader-study page in a real browser: a scripted reader answers, reloads, resumes, exports; the analysis agrees.

Needs Debian's `chromium` + `chromium-driver` (`make browser-deps` installs them) and selenium (test extra).
"""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
from scipy import stats

from study.cli import main as study_main
from study.make import make_study

from browser_helpers import chromium
from study_helpers import make_inputs

N_REAL = N_GENERATED = 8


@pytest.fixture
def browser(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium(tmp_path / "profile", "1200,820", downloads)
    driver.downloads = downloads
    yield driver
    driver.quit()


def strategy(item: str, entry: dict) -> tuple[str, int, int]:
    """The scripted reader: right unless the item id is divisible by 3; rating = round(4 x label), but reversed
    (4 - that) when the id is divisible by 4, so the Spearman is not trivially 1; confidence 1-3."""
    number = int(item, 16)
    truth = entry["kind"]
    called = truth if number % 3 else ("real" if truth == "generated" else "generated")
    label = entry["condition"] if truth == "generated" else entry["soft_label"]
    rating = int(round(4 * label))
    return called, (4 - rating) if number % 4 == 0 else rating, 1 + number % 3


def _imul(a: int, b: int) -> int:
    return (a * b) & 0xFFFFFFFF


def page_order(items: list[str], reader: str, seed: int) -> list[str]:
    """The page's order, ported from its JS (string hash + mulberry32 + Fisher-Yates) to check it independently."""
    h = 0x811C9DC5
    for ch in f"{reader}|{seed}":
        h = _imul(h ^ ord(ch), 0x01000193)
    h = _imul(h ^ (h >> 16), 0x85EBCA6B)
    h = _imul(h ^ (h >> 13), 0xC2B2AE35)
    state = (h ^ (h >> 16)) & 0xFFFFFFFF

    def rand() -> float:
        nonlocal state
        state = (state + 0x6D2B79F5) & 0xFFFFFFFF
        t = _imul(state ^ (state >> 15), 1 | state)
        t = ((t + _imul(t ^ (t >> 7), 61 | t)) & 0xFFFFFFFF) ^ t
        return ((t ^ (t >> 14)) & 0xFFFFFFFF) / 4294967296

    order = list(items)
    for i in range(len(order) - 1, 0, -1):
        j = int(rand() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def keys(driver, text: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(text).perform()


def text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def current_item(driver) -> str:
    return text(driver, "item-label").split()[-1]


def start(driver, reader: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "reader")
    box.clear()
    box.send_keys(reader + Keys.ENTER)


def trial_markup(driver) -> str:
    """The trial area as HTML without the image payload: it must not depend on the item."""
    return driver.execute_script("const t = document.getElementById('trial').cloneNode(true);"
                                 "t.querySelector('#patch').removeAttribute('src'); return t.outerHTML;")


def answer(driver, key: dict, seen: list[str], markups: set) -> None:
    from selenium.webdriver.common.keys import Keys

    item = current_item(driver)
    seen.append(item)
    markups.add(trial_markup(driver))
    called, rating, confidence = strategy(item, key[item])
    keys(driver, ("r" if called == "real" else "g") + str(rating) + str(confidence) + Keys.ENTER)


@pytest.mark.slow
def test_scripted_reader_resumes_exports_and_the_analysis_agrees(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    root = make_inputs(tmp_path / "inputs")
    make_study([root / "tr"], [root / "r2g"], root / "ds", N_REAL, N_GENERATED, seed=3, out=tmp_path / "study")
    key = json.loads((tmp_path / "study" / "key.json").read_text())["items"]
    page = (tmp_path / "study" / "study.html").as_uri()
    n = N_REAL + N_GENERATED

    browser.get(page)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] if hasattr(browser, "get_log") else []
    assert not errors, errors
    start(browser, "smith, j")  # a comma would split the reader's column in the exported CSV
    assert "reader id" in text(browser, "msg") and not browser.find_element(By.ID, "study").is_displayed()
    start(browser, "alice")
    seen, markups = [], set()
    for _ in range(n // 2):
        answer(browser, key, seen, markups)
    assert text(browser, "answered") == f"{n // 2} of {n} answered"
    assert browser.find_element(By.ID, "bar").get_attribute("style").replace(" ", "") == "width:50%;"
    # back: the previous patch comes back with its answer shown
    keys(browser, Keys.ARROW_LEFT)
    assert current_item(browser) == seen[-1]
    called, rating, _ = strategy(seen[-1], key[seen[-1]])
    assert "on" in browser.find_element(By.ID, f"kind-{called}").get_attribute("class")
    assert text(browser, "rating-text") == str(rating)
    keys(browser, Keys.ENTER)  # re-save unchanged and go on
    next_item = current_item(browser)
    browser.save_screenshot(str(tmp_path / "mid-study.png"))

    # reload mid-way: the same reader id resumes at the same patch with the answers kept (the time stored for the
    # re-saved patch is raised to 1000 s first, to see below that a revisit adds to it)
    browser.execute_script("const k = Object.keys(localStorage).find(function(k){ return k.endsWith(':alice'); });"
                           "const s = JSON.parse(localStorage.getItem(k)); s.answers[arguments[0]].seconds = 1000;"
                           "localStorage.setItem(k, JSON.stringify(s));", seen[-1])
    browser.refresh()
    start(browser, "alice")
    assert current_item(browser) == next_item
    assert text(browser, "answered") == f"{n // 2} of {n} answered"
    assert text(browser, "position") == f"patch {n // 2 + 1} of {n}"
    keys(browser, Keys.ARROW_LEFT)
    assert current_item(browser) == seen[-1]
    keys(browser, Keys.ENTER)
    assert current_item(browser) == next_item
    for _ in range(n - n // 2):
        answer(browser, key, seen, markups)
    assert browser.find_element(By.ID, "done").is_displayed()
    assert len(set(seen)) == n and set(seen) == set(key)
    assert seen == page_order(sorted(key), "alice", 3)  # the documented order, computed outside the browser
    assert len(markups) == 1  # the trial markup is the same for every item: nothing in it tells real from generated

    keys(browser, "e")
    exported = browser.downloads / "answers-alice.csv"
    deadline = time.time() + 20
    while not exported.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert exported.exists(), list(browser.downloads.iterdir())
    with open(exported, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["study_id", "reader", "item", "real_or_generated", "mitotic_rating", "confidence",
                             "seconds", "answered_at"]
    assert [r["item"] for r in rows] == seen and all(float(r["seconds"]) > 0 for r in rows)
    assert float(rows[n // 2 - 1]["seconds"]) > 1000  # a revisit adds its time to the earlier visits'

    # the analysis gives back exactly what the strategy implies
    study_main(["analyse", "--study", str(tmp_path / "study"), "--answers", str(exported), "--bootstrap", "200",
                "--out", str(tmp_path / "results")])
    results = json.loads((tmp_path / "results" / "results.json").read_text())["readers"]["alice"]
    answers = {item: strategy(item, key[item]) for item in key}
    right = sum(answers[i][0] == key[i]["kind"] for i in key)
    assert results["detection"]["correct"] == right and results["detection"]["accuracy"] == right / n
    assert 0 < right < n  # the strategy makes mistakes, so this is not trivially 0 or 1
    generated = [i for i in key if key[i]["kind"] == "generated"]
    expected = stats.spearmanr([answers[i][1] for i in generated], [key[i]["condition"] for i in generated])
    assert results["rating"]["generated_vs_condition"]["value"] == pytest.approx(expected.statistic, abs=1e-12)
    real = [i for i in key if key[i]["kind"] == "real"]
    expected_real = stats.spearmanr([answers[i][1] for i in real], [key[i]["soft_label"] for i in real])
    assert results["rating"]["real_vs_soft_label"]["value"] == pytest.approx(expected_real.statistic, abs=1e-12)
    print(f"\nstrategy implies accuracy {right}/{n} = {right / n:.4f}, Spearman generated {expected.statistic:.4f}, "
          f"real {expected_real.statistic:.4f}; analyse gave accuracy {results['detection']['accuracy']:.4f}, "
          f"Spearman generated {results['rating']['generated_vs_condition']['value']:.4f}, "
          f"real {results['rating']['real_vs_soft_label']['value']:.4f}")

    # the order is a function of (reader id, study seed), not of what was stored
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    start(browser, "alice")
    alice_again = []
    for _ in range(4):
        answer(browser, key, alice_again, markups)
    assert alice_again == seen[:4]
    browser.refresh()
    start(browser, "bob")
    bob = []
    for _ in range(4):
        answer(browser, key, bob, markups)
    assert bob != seen[:4] and bob == page_order(sorted(key), "bob", 3)[:4]
    print(f"alice's first items {seen[:4]} (again after clearing storage: {alice_again}); bob's {bob}")
    # another study in the same browser starts afresh for the same reader id
    make_study([root / "tr"], [root / "r2g"], root / "ds", N_REAL, N_GENERATED, seed=4, out=tmp_path / "study2")
    browser.get((tmp_path / "study2" / "study.html").as_uri())
    start(browser, "alice")
    assert text(browser, "answered") == f"0 of {n} answered" and text(browser, "position") == f"patch 1 of {n}"
    assert np.isfinite([float(r["seconds"]) for r in rows]).all()
