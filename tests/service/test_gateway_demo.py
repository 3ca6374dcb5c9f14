"""The demo page in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright): an upload
shows the prediction and the purified image; the screenshot is kept as a test artefact."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gateway_testing import ARTEFACTS, ROOT

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make system` installs Debian's chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def not_blank(png: bytes) -> None:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32)
    assert a.std() > 10 and len(np.unique(a.reshape(-1, 3), axis=0)) > 50, "screenshot looks blank"


def open_demo(browser, url: str):
    """(a sample image, the demo page opened at url, the list its JavaScript errors are collected in)"""
    sample = sorted((ROOT / "service" / "app" / "static" / "samples").glob("*.png"))[0]
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    return sample, page, errors


def test_demo_page_upload_shows_prediction_and_purified_image(browser, gateway, tmp_path):
    sample, page, errors = open_demo(browser, gateway.url)
    assert page.get_attribute("body", "data-client-seed") == "true"
    page.wait_for_selector("#samples img")  # the page offers its test images
    assert page.locator("#samples img").count() >= 3
    page.set_input_files("#file", str(sample))
    page.fill("#votes", "3")
    page.fill("#seed", "11")
    page.click("#run")
    page.wait_for_selector("body[data-state]", timeout=60_000)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    prediction = page.inner_text("#prediction")
    assert prediction.startswith("prediction: ") and len(prediction) > len("prediction: ")
    assert "of 3 votes" in page.inner_text("#agreement")
    assert page.locator("#probs tr").count() == 5
    for img in ("#original", "#purified"):
        assert page.eval_on_selector(img, "e => e.complete && e.naturalWidth") > 0, img
    assert page.eval_on_selector("#purified", "e => e.naturalWidth") == 32
    assert "purifier v1, classifier v1" in page.inner_text("#meta")
    shot = page.screenshot(full_page=True)
    not_blank(shot)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "gateway-demo.png").write_bytes(shot)
    (tmp_path / "gateway-demo.png").write_bytes(shot)

    # a test image picked from the page works as well, and a bad upload shows the gateway's message
    page.click("#samples img >> nth=1")
    page.wait_for_function("document.getElementById('run').disabled === false")
    page.evaluate("document.body.removeAttribute('data-state')")
    page.click("#run")
    page.wait_for_selector("body[data-state]", timeout=60_000)
    assert page.get_attribute("body", "data-state") == "done"
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.evaluate("document.body.removeAttribute('data-state')")
    page.click("#run")
    page.wait_for_selector("body[data-state]", timeout=60_000)
    assert page.get_attribute("body", "data-state") == "error"
    assert "415" in page.inner_text("#error") and "not a recognised image" in page.inner_text("#error")
    assert not errors, errors
    page.close()


def test_demo_page_works_where_client_seeds_are_refused(browser, seedless_gateway):
    """The page sends no seed to a gateway that refuses them (it would get 422) and says the two calls are
    separate draws."""
    sample, page, errors = open_demo(browser, seedless_gateway.url)
    assert page.get_attribute("body", "data-client-seed") == "false"
    assert not page.is_visible("#seed")
    page.set_input_files("#file", str(sample))
    page.fill("#votes", "2")
    page.click("#run")
    page.wait_for_selector("body[data-state]", timeout=60_000)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    assert page.inner_text("#prediction").startswith("prediction: ")
    assert page.eval_on_selector("#purified", "e => e.naturalWidth") == 32
    assert "fresh noise per call" in page.inner_text("#meta")
    assert not errors, errors
    page.close()
