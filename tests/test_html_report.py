"""The HTML leaderboard: a self-contained page, checked as text and in a real headless browser (Chromium)."""

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mergebench_core.results.leaderboard import render
from mergebench_core.results.store import CellResult

TIES = {"scaling_factor": 0.3, "k": 0.2, "combine": "sum", "scope": "global"}


def cell(method, params=None, seed=0, a=0.5, b=0.5, kind="method", **kw):
    return CellResult(kind=kind, method=method, params=dict(params or {}), modelpool="digits-mlp_TA8",
                      taskpool="digits_TA8", seed=seed,
                      metrics={"a": {"accuracy": a, "loss": 1 - a}, "b": {"accuracy": b, "loss": 1 - b}},
                      mean=(a + b) / 2, normalized_mean=(a + b) / 1.8, merge_seconds=kw.pop("merge_seconds", 0.1),
                      peak_memory_mb=120.0, versions={"mergebench": "0.1.0", "torch": "2.5.0"}, **kw)


RESULTS = [
    cell("pretrained", kind="reference", a=0.60, b=0.50), cell("individual", kind="reference", a=0.95, b=0.93),
    cell("ties", dict(TIES, k=0.1), seed=0, a=0.80, b=0.70, extras={"kept": [0.1, 0.2]}),
    cell("ties", dict(TIES, k=0.1), seed=1, a=0.82, b=0.74, extras={"kept": [0.1, 0.3]}),
    cell("ties", TIES, a=0.70, b=0.66, merge_seconds=0.02),
    cell("tall_masks", {"tall_mask_lambda": 0.6}, a=0.90, b=0.60, task_specific=True, merge_seconds=0.5),
    cell("x<script>alert(1)</script>", {"w": "<b>"}, a=0.55, b=0.85),
    cell("boom", {"x": 1}, status="failed", error="RuntimeError: boom"),
]


def defaults(name):
    return {"ties": TIES, "tall_masks": {"tall_mask_lambda": 0.6}}.get(name)


def page():
    return render(RESULTS, "html", defaults=defaults)


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def test_page_is_a_whole_self_contained_document():
    text = page()
    assert text.startswith("<!DOCTYPE html>") and "<head>" in text and '<meta charset="utf-8">' in text
    assert "<style>" in text and "<script>" in text and text.rstrip().endswith("</html>")
    parsed = Collector()
    parsed.feed(text)
    assert all(u.startswith(("data:", "#")) for u in parsed.urls), parsed.urls  # nothing fetched
    assert not re.search(r"https?://", text)
    assert "prefers-color-scheme: dark" in text and 'data-theme="dark"' in text  # light and dark


def test_rows_cells_and_marks():
    text = page()
    parsed = Collector()
    parsed.feed(text)
    entries = [a for t, a in parsed.tags if t == "tbody"]
    assert [("ref" in a["class"]) for a in entries] == [True, True, False, False, False, False]
    assert "refs-end" in entries[1]["class"]  # the rule that sets the references apart
    assert '<span class="set">(k=0.1)</span>' in text  # the non-default parameter in the label
    # best per column (among methods: the experts would win every task) bold, second underlined
    assert re.search(r'<td class="num best" data-v="0\.9"[^>]*>90\.0</td>', text)  # tall_masks on a
    assert re.search(r'<td class="num second" data-v="0\.81"[^>]*>81\.0<span class="sd"> ± 1\.4</span>', text)
    assert 'class="mark"' in text and "one model per task" in text
    assert "Mean ± sample standard deviation over n seeds." in text
    assert "<script>alert(1)</script>" not in text and "x&lt;script&gt;" in text  # escaped
    assert "1 failed cell(s)" in text and "RuntimeError: boom" in text
    # the detail view: full parameters (non-default highlighted, with the default), versions, extras per seed
    detail = text[text.index('id="t0-d2"'):]
    detail = detail[:detail.index("</tbody>")]
    assert '<tr class=changed><th>k</th><td><code>0.1</code> <span class="default">default 0.2</span>' in detail
    assert "<th>combine</th><td><code>sum</code>" in detail and "torch" in detail
    assert "&quot;kept&quot;" in detail and "&quot;1&quot;" in detail  # extras of each seed


# --- a real browser ------------------------------------------------------------------------------------------------
def _browser_paths():
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    return browser, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def driver():
    browser, chromedriver = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser = None
    if not (browser and chromedriver):
        if os.environ.get("CI"):
            pytest.fail("the browser test needs chromium, chromium-driver and selenium (.ci/run installs them)")
        pytest.skip("chromium, chromedriver or selenium missing: apt-get install chromium chromium-driver; "
                    "pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    yield d
    d.quit()


def _labels(d):
    from selenium.webdriver.common.by import By

    return [e.text.lstrip("▸ ").strip() for e in
            d.find_elements(By.CSS_SELECTOR, "table.lb tbody.entry tr.main th.label")]


def test_in_a_browser_loads_clean_sorts_expands_and_screenshots(driver, tmp_path):
    from selenium.webdriver.common.by import By

    path = tmp_path / "board.html"
    path.write_text(page(), encoding="utf-8")
    driver.get(path.as_uri())
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors  # the page loads without console errors
    driver.execute_script("console.error('probe')")  # and the log would have shown one
    assert any("probe" in e["message"] for e in driver.get_log("browser"))

    refs = ["Pretrained", "Individual (experts)"]
    start = _labels(driver)
    assert start[:2] == refs and start[2] == "ties (k=0.1)"  # by average, best first

    def header(name):
        return driver.find_element(By.XPATH, f"//table[@class='lb']//thead//button[normalize-space()='{name}']")

    header("b").click()  # a score column sorts best first ...
    by_b = _labels(driver)
    assert by_b[:2] == refs  # ... and the references stay on top
    assert by_b[2].startswith("x<script>") and by_b[-1] == "tall_masks†"
    assert header("b").find_element(By.XPATH, "..").get_attribute("aria-sort") == "descending"
    header("b").click()  # again: reversed
    assert _labels(driver)[2:] == by_b[2:][::-1]
    header("Merge (s)").click()  # a cost column sorts smallest first
    assert _labels(driver)[2] == "ties"
    header("Method").click()
    assert _labels(driver)[2:] == sorted(by_b[2:], key=str.lower)

    # a row opens to its parameters, versions and extras
    row = next(e for e in driver.find_elements(By.CSS_SELECTOR, "tbody.entry")
               if e.find_element(By.CSS_SELECTOR, "th.label").text.lstrip("▸ ").startswith("ties (k=0.1)"))
    detail = row.find_element(By.CSS_SELECTOR, "tr.detail")
    assert not detail.is_displayed()
    row.find_element(By.CSS_SELECTOR, "button.expand").click()
    assert detail.is_displayed() and "default 0.2" in detail.text and "torch" in detail.text
    assert "kept" in detail.text

    light = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
    driver.find_element(By.ID, "theme").click()
    dark = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert light != dark and driver.execute_script("return document.documentElement.dataset.theme") == "dark"

    shots = [tmp_path / "leaderboard-dark.png"]
    driver.save_screenshot(str(shots[0]))
    driver.find_element(By.ID, "theme").click()
    shots.append(tmp_path / "leaderboard-light.png")
    driver.save_screenshot(str(shots[1]))
    for shot in shots:
        assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
    keep = os.environ.get("MERGEBENCH_SCREENSHOTS")  # a folder to keep the screenshots in, for a person to look at
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(keep) / shot.name)
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def board():
    """Realistic rows: the README's eight-task grid on the embedded pool (references, 13 configurations, one over
    three seeds, long labels), and a two-task pool run at preferences."""
    data = json.loads((Path(__file__).parent / "data" / "results_board.json").read_text())
    return [CellResult(**d) for d in data]


def test_an_eight_task_table_fits_a_laptop_screen(driver, tmp_path):
    """At 1400 px, Norm., Merge (s) and Peak mem were hidden behind a horizontal scroll bar."""
    from selenium.webdriver.common.by import By

    path = tmp_path / "board.html"
    path.write_text(render(board(), "html"), encoding="utf-8")
    driver.set_window_size(1400, 900)
    try:
        driver.get(path.as_uri())
        boxes = driver.execute_script(
            "return Array.from(document.querySelectorAll('.scroll')).map(e => [e.scrollWidth, e.clientWidth])")
        assert len(boxes) == 2 and all(scroll <= client for scroll, client in boxes), boxes
        view = driver.execute_script("return document.documentElement.clientWidth")
        heads = driver.find_elements(By.CSS_SELECTOR, "#table-0 thead th")
        assert [" ".join(h.text.split()) for h in heads[-3:]] == ["Norm.", "Merge (s)", "Peak mem (MB)"]
        assert all(h.rect["x"] + h.rect["width"] <= view for h in heads)  # every column on screen
        seeded = next(e for e in driver.find_elements(By.CSS_SELECTOR, "#table-0 tbody.entry")
                      if e.find_element(By.CSS_SELECTOR, "th.label").text.lstrip("▸ ").startswith("dare_ta"))
        mean, std = seeded.find_elements(By.CSS_SELECTOR, "td.num")[1].text.splitlines()  # digits: ± below the mean
        assert re.fullmatch(r"\d+\.\d", mean) and re.fullmatch(r"± \d\.\d", std)
        keep = os.environ.get("MERGEBENCH_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(Path(keep) / "leaderboard-1400.png"))
    finally:
        driver.set_window_size(1400, 1000)


def test_extras_json_stays_json_and_short_values_stay_on_one_line():
    from mergebench_core.results.html_report import _json_text

    value = {"kept": [0.1, 0.2], "coefficients": [[0.123456789] * 12] * 2, "none": {}, "name": "x"}
    text = _json_text(value)
    assert json.loads(text) == value
    assert '"kept": [0.1, 0.2]' in text and max(len(line) for line in text.splitlines()) <= 88
