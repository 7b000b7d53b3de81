"""The report page in a real browser: headless Chromium opens report.html, a slider moves the nucleus.

Needs Debian's `chromium` + `chromium-driver` (`make browser-deps` installs them) and selenium (test extra).
"""

from __future__ import annotations


import pytest

from report.build import ReportConfig, build_report

from browser_helpers import chromium
from report_helpers import FakeEnsemble
from test_report import SIZE, make_inputs


@pytest.fixture
def browser(tmp_path):
    driver = chromium(tmp_path / "profile", "1280,1000")
    yield driver
    driver.quit()


def test_slider_moves_the_nucleus_and_its_score(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    root = make_inputs(tmp_path / "inputs", n_seeds=3)
    out = tmp_path / "report"
    build_report(ReportConfig(bootstrap=100), [root / "tr"], [root / "r2g"], FakeEnsemble(SIZE), "fake",
                 root / "ds", out, log=lambda *_: None)
    browser.get((out / "report.html").as_uri())
    assert browser.title == "mitosis-ldm report"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] if hasattr(browser, "get_log") else []
    assert not errors, errors

    row = browser.find_elements(By.CSS_SELECTOR, ".seed-row")[0]
    slider = row.find_element(By.CSS_SELECTOR, "input.slider")
    frame = row.find_element(By.CSS_SELECTOR, "img.frame")
    score = row.find_element(By.CSS_SELECTOR, ".score")
    cond = row.find_element(By.CSS_SELECTOR, ".cond")
    features = row.find_elements(By.CSS_SELECTOR, "td.feature")
    browser.execute_script("arguments[0].scrollIntoView()", row)
    assert score.text.startswith("classifier score") and cond.text == "condition y = 0.00"
    assert len(row.find_elements(By.CSS_SELECTOR, ".thumbs img")) == 6  # the script built the thumbnails
    before = (frame.get_attribute("src"), score.text, [f.text for f in features])
    browser.save_screenshot(str(tmp_path / "report-start.png"))

    slider.click()
    slider.send_keys(Keys.END)  # a keyboard user walks to y = 1
    after = (frame.get_attribute("src"), score.text, [f.text for f in features])
    browser.save_screenshot(str(tmp_path / "report-end.png"))
    assert slider.get_attribute("value") == "5"
    assert cond.text == "condition y = 1.00"
    assert after[0] != before[0] and after[0].startswith("data:image/png;base64,")
    assert after[1] != before[1]
    assert float(after[1].split()[-1]) > float(before[1].split()[-1])  # the mitotic end scores higher
    assert after[2] != before[2]
    on = row.find_elements(By.CSS_SELECTOR, ".thumbs img.on")
    assert len(on) == 1 and on[0].get_attribute("src") == after[0]

    # real2gen rows open on the real input
    r2g = browser.find_elements(By.CSS_SELECTOR, '.seed-row[data-folder="real2gen"]')[0]
    assert r2g.find_element(By.CSS_SELECTOR, ".cond").text.startswith("real input")
    assert (tmp_path / "report-start.png").stat().st_size > 10_000
