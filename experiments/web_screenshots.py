"""Screenshots of the views of the web page, for the README.

  python experiments/web_screenshots.py --perfusion_model=MODEL_DIR --study=IMAGE \
      --tavr_workdir=W --frame=IMAGE_OR_CINE --out=docs [--live_replay=CINE_VIDEO_OR_FOLDER]

With --live_replay the Live tab is shot too (OUT/images/live_tab.png), replaying it.
"""

import pathlib

from absl import app, flags

from cardiac_core.logs import quiet_third_party

FLAGS = flags.FLAGS
flags.DEFINE_string("perfusion_model", None, "Folder written by perfusion_fit.py.", required=True)
flags.DEFINE_string("study", None, "A study image to upload.", required=True)
flags.DEFINE_string("tavr_workdir", None, "TAVR training workdir.", required=True)
flags.DEFINE_string("frame", None, "A frame, video or DICOM to upload.", required=True)
flags.DEFINE_string("out", "docs", "Folder for web_perfusion.png and web_tavr.png.")
flags.DEFINE_string("live_replay", None, "A cine, video or image folder the Live tab replays.")
flags.DEFINE_string("live_target", "3-6", "The Live tab's target depth range, mm.")
flags.DEFINE_integer("live_frames", 5, "The Live tab is shot once this many frames were painted.")


def live_screenshot(d, url: str, replay_name: str, path, *, target="3-6", fps=None, frames=5):
    """The Live tab replaying `replay_name` (of the app's replay folder), shot once `frames`
    frames were painted; the session is stopped after."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d.get(url)
    d.find_element(By.ID, "tab-live").click()
    source = d.find_element(By.ID, "live-source")
    WebDriverWait(d, 30).until(lambda d: source.get_attribute("value"))
    source.clear()
    source.send_keys(replay_name)
    d.find_element(By.ID, "live-target").send_keys(target)
    if fps:
        d.find_element(By.ID, "live-fps").send_keys(str(fps))
    d.find_element(By.ID, "live-start").click()
    painted = "return window.liveAges.length"
    WebDriverWait(d, 300).until(lambda d: d.execute_script(painted) >= frames)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(path))
    d.find_element(By.ID, "live-stop").click()


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    del argv
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from cardiac_web import browser
    from cardiac_web.app import create_app
    from cardiac_web.live import LiveOptions

    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)  # selenium writes nothing into a missing folder
    replay = pathlib.Path(FLAGS.live_replay).resolve() if FLAGS.live_replay else None
    live = LiveOptions(replay_dir=replay.parent) if replay else None
    web = create_app(perfusion_dir=FLAGS.perfusion_model, tavr_workdir=FLAGS.tavr_workdir,
                     live=live)  # fmt: skip
    with browser.serve_in_thread(web) as url, browser.chromium() as d:
        d.get(url)
        d.find_element(By.ID, "perf-file").send_keys(str(pathlib.Path(FLAGS.study).resolve()))
        d.find_element(By.ID, "perf-submit").click()
        WebDriverWait(d, 300).until(lambda d: d.find_element(By.ID, "perf-label").text)
        d.save_screenshot(str(out / "web_perfusion.png"))
        d.find_element(By.ID, "tab-tavr").click()
        d.find_element(By.ID, "tavr-file").send_keys(str(pathlib.Path(FLAGS.frame).resolve()))
        d.find_element(By.ID, "tavr-submit").click()
        WebDriverWait(d, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tavr-points td"))
        d.save_screenshot(str(out / "web_tavr.png"))
        if replay:
            name = replay.name + ("/" if replay.is_dir() else "")
            live_screenshot(d, url, name, out / "images" / "live_tab.png", target=FLAGS.live_target,
                            frames=FLAGS.live_frames)  # fmt: skip
    print(f"wrote {out / 'web_perfusion.png'} and {out / 'web_tavr.png'}"
          + (f" and {out / 'images' / 'live_tab.png'}" if replay else ""))  # fmt: skip


if __name__ == "__main__":
    app.run(main)
