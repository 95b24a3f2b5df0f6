"""experiments/bench_live.py's contract on a tiny workdir: in-process, and through the real server
watched by headless Chromium (skipped without it)."""

import json
import math

import pytest
from _workdirs import TINY_CONFIG, write_tiny_checkpoint

from cardiac_web import browser
from experiments.benchmarks import live

RATE_KEYS = {"processed_fps": float, "dropped": int, "age_ready_p50_ms": float,
             "age_ready_p99_ms": float, "rss_mb": list, "guidance": dict}  # fmt: skip
# a tiny run: 3 s per rate of one 6-frame case, small frames
TINY = dict(rates=(15.0, 30.0), minutes=0.05, cases=1, frames=6, size=96)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = tmp_path_factory.mktemp("bench_live") / "w"
    write_tiny_checkpoint(w, TINY_CONFIG)
    return w


def check_contract(results: dict, out, *, painted: bool) -> None:
    assert json.loads(out.read_text()) == results
    assert isinstance(results["cpu"], str) and results["cpu"]
    assert isinstance(results["date"], str) and results["date"][:2] == "20"
    assert set(results["rates"]) == {"15", "30"}
    for r in results["rates"].values():
        for key, kind in RATE_KEYS.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["processed"] > 0 and r["processed_fps"] > 0
        assert r["age_ready_p50_ms"] <= r["age_ready_p99_ms"]
        assert len(r["rss_mb"]) >= 2 and all(v > 50 for v in r["rss_mb"])  # start and end, MB
        assert r["guidance"]["unmatched_frames"] == 0 and "n_frames" in r["guidance"]
        if painted:
            assert isinstance(r["age_paint_p50_ms"], float) and r["frames_painted"] > 0
            assert math.isfinite(r["age_paint_p99_ms"]) and -50 < r["age_paint_p50_ms"] < 30_000
        else:
            assert r["age_paint_p50_ms"] is None and r["age_paint_p99_ms"] is None


def test_in_process_mode_writes_the_contract(workdir, tmp_path):
    out = tmp_path / "live.json"
    results = live.run(workdir, out=out, **TINY, log=lambda line: None)
    assert results["mode"] == "in-process" and results["backend"] == "xla"
    check_contract(results, out, painted=False)


def test_browser_mode_refuses_in_one_line_what_it_cannot_run(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(browser, "missing_browser", lambda: None)
    with pytest.raises(ValueError, match="serves W's checkpoint on XLA"):
        live.run(workdir, out=tmp_path / "x.json", backend="onnxruntime", browser=True, **TINY)
    monkeypatch.setattr(browser, "missing_browser", lambda: "/usr/bin/chromium not installed")
    with pytest.raises(RuntimeError, match="^--browser needs Chromium: /usr/bin/chromium"):
        live.run(workdir, out=tmp_path / "x.json", browser=True, **TINY)
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(
    browser.missing_browser() is not None, reason=f"browser test: {browser.missing_browser()}"
)
def test_browser_mode_measures_paint_ages_and_the_server(workdir, tmp_path):
    out = tmp_path / "live.json"
    results = live.run(workdir, out=out, browser=True, **TINY, log=lambda line: None)
    assert results["mode"] == "browser" and results["refine"] is False
    check_contract(results, out, painted=True)
