"""The explorer in a real browser: headless Chromium drives a uvicorn server on 127.0.0.1.

It opens the slide, zooms, clicks a nucleus, drags the y slider and exports. Two variants:
- tiny: the drawn slide, `fake_render` (the nucleus darkens with y) and a darkness classifier, so
  "the score rises from y = 0 to y = 1" holds by construction and tests the page and server, not a model;
- demo (slow; runs when runs/demo holds the trained models): the CMU slide with the demo pipeline and
  classifier, a nucleus the detector found; the rising score is then the models' own.
Set SERVE_SCREENSHOTS=DIR to keep the demo variant's screenshots at y = 0 and y = 1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from browser_helpers import chromium
from conftest import REPO, SAMPLE_SLIDE
from serve_helpers import NUCLEI, make_explorer, shared_world

DEMO = REPO / "runs" / "demo"


@pytest.fixture
def browser(tmp_path):
    driver = chromium(tmp_path / "profile", "1400,900")
    yield driver
    driver.quit()


def wait(browser, script: str, timeout: float = 120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = browser.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}; status: {browser.execute_script(STATUS)}")


STATUS = "return document.getElementById('status').textContent"


def explore(browser, url: str, slide: str, nucleus: tuple[int, int], shots: Path | None = None) -> dict:
    """Open, zoom, click `nucleus` (level-0 px), drag the slider to the end, export. Returns what the page showed."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    assert browser.title == "mitosis-ldm explorer"
    wait(browser, f"return document.body.dataset.slideOpen === {slide!r}")
    wait(browser, "return viewer.world.getItemCount() > 0 && viewer.world.getItemAt(0).getFullyLoaded()")
    zoom0 = browser.execute_script("return viewer.viewport.getZoom()")
    browser.find_element(By.CSS_SELECTOR, 'div[title="Zoom in"]').click()  # the viewer's own zoom button
    browser.execute_script(
        "viewer.viewport.panTo(viewer.viewport.imageToViewportCoordinates(arguments[0], arguments[1]))", *nucleus)
    wait(browser, f"return viewer.viewport.getZoom() > {zoom0} * 1.5 && !viewer.isAnimating?.() "
                  "&& viewer.world.getItemAt(0).getFullyLoaded()")
    time.sleep(0.6)  # let the zoom animation settle before reading screen coordinates
    element = browser.find_element(By.ID, "viewer")
    px, py = browser.execute_script(
        "const p = viewer.viewport.imageToViewerElementCoordinates("
        "new OpenSeadragon.Point(arguments[0], arguments[1])); return [p.x, p.y]", *nucleus)
    size = element.size
    ActionChains(browser).move_to_element_with_offset(element, int(px - size["width"] / 2),
                                                      int(py - size["height"] / 2)).click().perform()
    wait(browser, "return document.body.dataset.transition")
    marker = browser.find_elements(By.ID, "marker")
    frame, score, cond = (browser.find_element(By.ID, i) for i in ("frame", "score", "cond"))
    start = {"src": frame.get_attribute("src"), "score": score.text, "cond": cond.text,
             "where": browser.find_element(By.ID, "where").text,
             "features": [c.text for c in browser.find_elements(By.CSS_SELECTOR, "td.feature")]}
    if shots:
        browser.save_screenshot(str(shots / "explorer-y0.png"))
    slider = browser.find_element(By.ID, "slider")
    width = slider.size["width"]
    ActionChains(browser).move_to_element_with_offset(slider, -width // 2 + 2, 0).click_and_hold() \
        .move_by_offset(width // 2, 0).move_by_offset(width // 2, 0).release().perform()  # drag to y = 1
    end = {"src": frame.get_attribute("src"), "score": score.text, "cond": cond.text,
           "value": slider.get_attribute("value"), "max": slider.get_attribute("max"),
           "features": [c.text for c in browser.find_elements(By.CSS_SELECTOR, "td.feature")]}
    if shots:
        browser.save_screenshot(str(shots / "explorer-y1.png"))
    browser.find_element(By.ID, "export").click()
    exported = wait(browser, "return document.getElementById('export-status').dataset.json")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] if hasattr(browser, "get_log") else []
    return {"start": start, "end": end, "marker": len(marker), "exported": exported, "errors": errors}


def score_of(text: str) -> float:
    return float(text.split()[2])  # "classifier score 0.123 ± 0.010"


def check(seen: dict) -> None:
    start, end = seen["start"], seen["end"]
    assert seen["marker"] == 1
    assert start["cond"] == "condition y = 0.00" and start["src"].startswith("data:image/png;base64,")
    assert end["value"] == end["max"] == "10" and end["cond"] == "condition y = 1.00"
    assert end["src"] != start["src"]
    assert score_of(end["score"]) > score_of(start["score"]), (start["score"], end["score"])
    assert end["features"] != start["features"] and len(start["features"]) == 9
    assert not seen["errors"], seen["errors"]


@pytest.mark.slow
def test_click_drag_export_tiny(browser, tmp_path, tmp_path_factory):
    from serve.launch import server_thread

    world = shared_world(tmp_path_factory)
    exports = tmp_path / "exports"
    with server_thread(make_explorer(world, exports, fake=True)) as url:
        seen = explore(browser, url, "slide.png", NUCLEI[1])
    check(seen)
    assert "nucleus (300,140)" in seen["start"]["where"]  # re-centred on the drawn nucleus
    name = seen["exported"].rsplit("/", 1)[1]
    assert (exports / name).exists() and (exports / name.replace(".json", ".png")).stat().st_size > 1000


@pytest.mark.slow
def test_click_drag_export_demo_models(browser, tmp_path):
    pipeline, classifier, cmu = DEMO / "diffusion" / "model", DEMO / "classifier" / "model", DEMO / "data" / "cmu"
    if not ((pipeline / "pipeline.json").exists() and (classifier / "config.json").exists() and SAMPLE_SLIDE.exists()):
        pytest.skip("runs/demo has no trained models yet: run `make demo`")
    from serve.cli import build, parser
    from serve.launch import server_thread

    import csv

    with open(cmu / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test"]
    nucleus = (int(rows[0]["x"]), int(rows[0]["y"]))  # a nucleus `data detect` found, in the held-out region
    args = parser().parse_args(["--pipeline", str(pipeline), "--classifier", str(classifier),
                                "--slides", str(SAMPLE_SLIDE), "--exports", str(tmp_path / "exports")])
    shots = Path(os.environ["SERVE_SCREENSHOTS"]) if os.environ.get("SERVE_SCREENSHOTS") else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    with server_thread(build(args)) as url:
        seen = explore(browser, url, SAMPLE_SLIDE.name, nucleus, shots)
    check(seen)
    assert list((tmp_path / "exports").glob("*.json"))
