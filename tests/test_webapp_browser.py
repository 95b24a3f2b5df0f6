"""End to end in headless Chromium: upload a simulated frame and study, read the page."""

import cv2
import numpy as np
import pytest

from tavr_jax import get_schema
from tavr_jax.data.simulate import simulate_case
from tavr_jax.infer.engine import KeypointEngine
from webapp import browser
from webapp.app import create_app

pytestmark = pytest.mark.skipif(
    browser.missing_browser() is not None, reason=f"browser test: {browser.missing_browser()}"
)
SCHEMA = get_schema("paper11")


def _wait_text(driver, element_id, timeout=120):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        error = d.find_element(By.ID, element_id.split("-")[0] + "-error").text
        if error:
            raise AssertionError(f"page shows an error: {error}")
        return d.find_element(By.ID, element_id).text.strip() or False

    return WebDriverWait(driver, timeout).until(ready)


def test_aortography_view_shows_points_and_reacts_to_stage_prior(tmp_path):
    from selenium.webdriver.common.by import By

    image, *_ = simulate_case(np.random.default_rng(0), SCHEMA, frames=1, size=96)[0]
    frame_path = tmp_path / "frame.png"
    cv2.imwrite(str(frame_path), image)
    engine = KeypointEngine.random_init(SCHEMA, "resnet_tiny", 32, batch_size=4)
    # Random weights: thresholds of 0 report every point, so the stage prior alone decides.
    engine.meta.update(thresholds=0.0, group_thresholds=0.0)
    expected = engine(image[None])["visibility"][0]
    with browser.serve_in_thread(create_app(tavr_engine=engine)) as url, browser.chromium() as d:
        d.get(url)
        assert "no perfusion model" in d.find_element(By.ID, "status").text
        d.find_element(By.ID, "tab-tavr").click()
        d.find_element(By.ID, "tavr-file").send_keys(str(frame_path))
        d.find_element(By.ID, "tavr-submit").click()
        _wait_text(d, "tavr-points")
        rows = d.find_elements(By.CSS_SELECTOR, "#tavr-points tbody tr")
        assert [r.get_attribute("data-point") for r in rows] == list(SCHEMA.point_names)
        shown = [float(r.find_elements(By.TAG_NAME, "td")[2].text) for r in rows]
        np.testing.assert_allclose(shown, expected, atol=6e-4)  # 3 decimals on the page
        assert {r.find_elements(By.TAG_NAME, "td")[5].text for r in rows} == {"yes"}

        def reported(d):
            cells = d.find_elements(By.CSS_SELECTOR, "#tavr-points tbody tr")
            return {c.get_attribute("data-point"): c.find_elements(By.TAG_NAME, "td")[5].text
                    for c in cells}  # fmt: skip

        # Untick "contour": its points go off, the others stay; untick all: nothing is reported.
        from selenium.webdriver.support.ui import WebDriverWait

        d.find_element(By.CSS_SELECTOR, "input[name=expect][value=contour]").click()
        contour = {n for n in SCHEMA.point_names if SCHEMA.group_of(n) == "contour"}
        want = {n: "no" if n in contour else "yes" for n in SCHEMA.point_names}
        WebDriverWait(d, 30).until(lambda d: reported(d) == want)
        for box in d.find_elements(By.CSS_SELECTOR, "input[name=expect]:checked"):
            box.click()
        WebDriverWait(d, 30).until(lambda d: set(reported(d).values()) == {"no"})
        assert d.execute_script("return document.getElementById('tavr-canvas').width") == 96
