"""Screenshots of both views of the web page, for the README.

  python experiments/web_screenshots.py --perfusion_model=MODEL_DIR --study=IMAGE \
      --tavr_workdir=W --frame=IMAGE_OR_CINE --out=docs
"""

import pathlib

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("perfusion_model", None, "Folder written by perfusion_fit.py.", required=True)
flags.DEFINE_string("study", None, "A study image to upload.", required=True)
flags.DEFINE_string("tavr_workdir", None, "TAVR training workdir.", required=True)
flags.DEFINE_string("frame", None, "A frame, video or DICOM to upload.", required=True)
flags.DEFINE_string("out", "docs", "Folder for web_perfusion.png and web_tavr.png.")


def main(argv):
    del argv
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from cardiac_web import browser
    from cardiac_web.app import create_app

    out = pathlib.Path(FLAGS.out)
    web = create_app(perfusion_dir=FLAGS.perfusion_model, tavr_workdir=FLAGS.tavr_workdir)
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
    print(f"wrote {out / 'web_perfusion.png'} and {out / 'web_tavr.png'}")


if __name__ == "__main__":
    app.run(main)
