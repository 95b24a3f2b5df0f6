"""End to end in headless Chromium: upload a simulated frame and study, read the page."""

import _web
import cv2
import numpy as np
import pytest

from cardiac_web import browser
from cardiac_web.app import create_app
from perfusion import analyze, simulate, studies
from tavr_jax import get_schema
from tavr_jax.data.simulate import simulate_case
from tavr_jax.infer.engine import KeypointEngine

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
            from selenium.common.exceptions import StaleElementReferenceException

            try:  # the table is re-rendered after each re-gating request
                return {
                    r.get_attribute("data-point"): r.find_elements(By.TAG_NAME, "td")[5].text
                    for r in d.find_elements(By.CSS_SELECTOR, "#tavr-points tbody tr")
                }
            except StaleElementReferenceException:
                return None

        # Untick "contour": its points go off, the others stay; untick all: nothing is reported.
        from selenium.webdriver.support.ui import WebDriverWait

        d.find_element(By.CSS_SELECTOR, "input[name=expect][value=contour]").click()
        contour = {n for n in SCHEMA.point_names if SCHEMA.group_of(n) == "contour"}
        want = {n: "no" if n in contour else "yes" for n in SCHEMA.point_names}
        WebDriverWait(d, 30).until(lambda d: reported(d) == want)
        for box in d.find_elements(By.CSS_SELECTOR, "input[name=expect]:checked"):
            box.click()
        WebDriverWait(d, 30).until(lambda d: set((reported(d) or {1: 0}).values()) == {"no"})
        assert d.execute_script("return document.getElementById('tavr-canvas').width") == 96


def test_polar_map_view_shows_class_scores_overlay_and_uncertainty(tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    simulate.simulate_dataset(tmp_path / "data", 15, seed=7, size=32, disk_px=64)
    analyze.fit(tmp_path / "data", tmp_path / "model", size=32)
    model = analyze.load_model(tmp_path / "model")
    row = next(r for r in studies.read_labels(tmp_path / "data" / "labels.csv")
               if r["label"] != "normal")  # fmt: skip
    path = tmp_path / "data" / "images" / row["filename"]
    report = analyze.analyze_study(model, studies.read_study_image(path, size=model.size))
    with browser.serve_in_thread(create_app(perfusion_model=model)) as url, browser.chromium() as d:
        d.get(url)
        assert "no TAVR model" in d.find_element(By.ID, "status").text
        d.find_element(By.ID, "perf-file").send_keys(str(path))
        d.find_element(By.ID, "perf-submit").click()
        assert _wait_text(d, "perf-label") == report["label"]
        # the call and the operating point it was made at
        decision = d.find_element(By.ID, "perf-decision").text
        assert decision.startswith("Abnormal" if report["decision"]["abnormal"] else "Normal")
        assert decision.endswith("(operating point sensitivity:0.95)")
        assert d.find_element(By.ID, "perf-sss").text == str(report["SSS"])
        assert d.find_element(By.ID, "perf-sds").text == str(report["SDS"])
        shown = d.find_element(By.ID, "perf-territories").text
        assert shown == (", ".join(report["territories"]) or "none")
        rows = d.find_elements(By.CSS_SELECTOR, "#perf-segment-table tbody tr")
        assert [int(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows] == report[
            "stress_scores"
        ]
        loaded = "return document.getElementById('perf-overlay').naturalWidth"
        assert d.execute_script(loaded) > 0
        assert not d.find_element(By.ID, "perf-uncertain").is_displayed()

        # A report flagged uncertain shows the badge with its reason.
        from selenium.webdriver.support.ui import WebDriverWait

        _web.report_uncertain(monkeypatch, "disk colours match no known colormap")
        d.find_element(By.ID, "perf-submit").click()
        badge = d.find_element(By.ID, "perf-uncertain")
        WebDriverWait(d, 60).until(lambda d: badge.is_displayed())
        assert badge.text == "Uncertain — review: disk colours match no known colormap"
