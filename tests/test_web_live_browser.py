"""End to end in headless Chromium: the Live tab replays a simulated cine over the WebSocket."""

import math
import re

import _web
import numpy as np
import pytest

from cardiac_core.dicom import write_test_cine
from cardiac_web import browser
from cardiac_web.app import create_app
from cardiac_web.live import LiveOptions
from tavr_jax.data.simulate import simulate_case

pytestmark = pytest.mark.skipif(
    browser.missing_browser() is not None, reason=f"browser test: {browser.missing_browser()}"
)


def test_live_tab_replays_a_cine_with_readouts_and_frame_ages(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    frames = np.stack([f[0] for f in simulate_case(np.random.default_rng(0), _web.SCHEMA,
                                                    frames=12, size=96)])  # fmt: skip
    (tmp_path / "replays").mkdir()
    write_test_cine(tmp_path / "replays" / "case.dcm", frames, frame_time_ms=100.0,
                    pixel_spacing=(0.25, 0.25))  # fmt: skip
    engine = _web.tiny_engine()
    engine.meta.update(thresholds=0.0, group_thresholds=0.0)  # every point reported: depths
    engine(frames[:1])  # compiled before the page starts the replay's clock
    app = create_app(tavr_engine=engine, live=LiveOptions(replay_dir=tmp_path / "replays"))
    with browser.serve_in_thread(app) as url, browser.chromium() as d:
        d.get(url)
        d.find_element(By.ID, "tab-live").click()
        source = d.find_element(By.ID, "live-source")
        WebDriverWait(d, 30).until(lambda d: source.get_attribute("value") == "case.dcm")
        d.find_element(By.ID, "live-fps").send_keys("5")  # 12 frames: 2.4 s of replay
        d.find_element(By.ID, "live-target").send_keys("2-4")
        d.find_element(By.ID, "live-start").click()

        def error():
            return d.find_element(By.ID, "live-error").text

        shown = []  # (frame label, FE1 depth) as the page painted them

        def painted_new(d):
            assert not error(), f"page shows an error: {error()}"
            now = (d.find_element(By.ID, "live-frame-index").text,
                   d.find_element(By.ID, "live-depth-FE1").text)  # fmt: skip
            if now[0] not in ("", "–") and (not shown or now[0] != shown[-1][0]):
                shown.append(now)
            return len(shown) >= 2

        WebDriverWait(d, 60, poll_frequency=0.05).until(painted_new)
        size = "return document.getElementById('live-image').naturalWidth"
        assert d.execute_script(size) == 96  # the overlay JPEG at the frame's size
        for _, depth in shown:  # calibrated by the cine's pixel spacing
            assert re.fullmatch(r"-?\d+\.\d ± \d+\.\d mm|–", depth), depth
        assert d.find_element(By.ID, "live-units").text == "(mm)"
        assert "fps" in d.find_element(By.ID, "live-processed").text
        assert d.find_element(By.ID, "live-source-shown").text == "case.dcm"
        ages = d.execute_script("return window.liveAges")
        assert len(ages) >= 2 and all(math.isfinite(a) and -50 < a < 30_000 for a in ages), ages

        d.find_element(By.ID, "live-stop").click()
        state = d.find_element(By.ID, "live-state")
        WebDriverWait(d, 30).until(lambda d: state.text.startswith("ended"))
        assert not d.find_element(By.ID, "live-start").get_attribute("disabled")
