"""Live guidance under load: held-out simulated cines replayed at fixed rates, in two modes.

In-process (default): the cines go through `LiveSession` in this process, one after the other,
each recorded to JSONL; the depth readouts of those records are scored against the
simulator's truth. No browser, so no paint ages (`age_paint_*_ms` null).

Browser (`browser=True`): what an operator's screen sees. The real server
(`experiments/serve.py --tavr_workdir=W --live_dir=<the cines>`) runs in a subprocess on a free
loopback port; headless Chromium opens the page, goes to the Live tab (which connects its
WebSocket) and the cines are replayed in turn through POST /api/live/start. The page measures
each painted frame's age from server arrival to paint (`window.liveAges`, cardiac_web/static/
live.js); processed and dropped frames come from the server's own stats (GET
/api/live/status); RSS is the server process's. The records scored for depth (and timed for
ready ages) are those the page received over its WebSocket: a slow page skips frames, so they
are what the operator was shown.

Per rate: processed_fps (frames processed / seconds replayed), dropped, age_ready_p50_ms and
age_ready_p99_ms (arrival -> readout ready), age_paint_p50_ms and age_paint_p99_ms (arrival
-> paint; null in-process), rss_mb (one value at the start, every 30 s, and at the end) and,
when the simulator wrote its truth, `guidance` (`guidance.score_readouts`). Top level: the
CPU model and the date.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import psutil

from cardiac_core.fileio import write_json_atomic
from tavr_jax.data import simulate
from tavr_jax.infer import guidance
from tavr_jax.infer.live import LiveSession, read_records
from tavr_jax.schema import get_schema

RSS_EVERY_S = 30.0
SERVE = pathlib.Path(__file__).resolve().parents[1] / "serve.py"
SERVER_START_S = 600.0  # importing JAX and loading a checkpoint on a loaded 2-core machine
POLL_S = 0.25  # how often the server's session status is read while a replay runs
# The page's WebSocket, wrapped before the Live tab opens it: live.js keeps its socket in a
# closure, and the frames' records (for depth and ready ages) only reach the page through it.
_HOOK = """
if (!window.benchRecords) {
  window.benchRecords = [];
  window.benchOpen = false;
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("open", () => { window.benchOpen = true; });
      this.addEventListener("close", () => { window.benchOpen = false; });
      this.addEventListener("message", (ev) => {
        if (typeof ev.data !== "string") return;
        const m = JSON.parse(ev.data);
        if (m.type === "frame") window.benchRecords.push([m.session, m.record]);
      });
    }
  };
}
"""
_DRAIN = "return [window.liveAges.splice(0), window.benchRecords.splice(0)];"


def cpu_model() -> str | None:
    """The CPU's model name: /proc/cpuinfo, else lscpu."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
    return m.group(1).strip() if m else None


def held_out_cines(folder: pathlib.Path, cases: int, frames: int, size: int, seed: int):
    """Simulated cases as DICOM cines in `folder`/cines: ([(path, [truth frame name per
    frame])], truth or None)."""
    folder = pathlib.Path(folder)
    schema = get_schema("paper11")
    root = simulate.simulate_project(folder / "sim", schema, cases=cases, frames=frames,
                                     size=size, seed=seed, progress=False)  # fmt: skip
    # a folder of the cines alone: the browser mode serves it as the server's --live_dir
    cines = simulate.write_cines(root, schema, folder / "cines")
    truth_file = root / guidance.GUIDANCE_TRUTH_FILE
    truth = guidance.read_truth(truth_file) if truth_file.is_file() else None
    return cines, truth


@contextlib.contextmanager
def rss_sampler(pid: int):
    """Yields a list that gets the RSS (MB) of process `pid`: at once, every RSS_EVERY_S, and
    once more on exit."""
    process = psutil.Process(pid)
    rss, done = [], threading.Event()

    def read():
        with contextlib.suppress(psutil.Error):  # the server may be gone at the very end
            rss.append(round(process.memory_info().rss / 2**20, 1))

    def sample():
        while True:
            read()
            if done.wait(RSS_EVERY_S):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield rss
    finally:
        done.set()
        sampler.join()
        read()


def _percentile(values, q: float):
    values = np.asarray(values, np.float64)
    return round(float(np.percentile(values, q)), 2) if values.size else None


def _result(rate, run_s, processed, dropped, records, paint_ages, rss, target, truth) -> dict:
    """One rate's figures; `records` carry truth frame names, `paint_ages` None in-process."""
    # a new frame size's first frame waited for its compilation: not a steady-state age
    ready = [1000 * (r["ready_s"] - r["arrival_s"]) for r in records if "new_size" not in r]
    result = {
        "rate_fps": rate,
        "seconds": round(run_s, 2),
        "processed": processed,
        "processed_fps": round(processed / max(run_s, 1e-9), 2),
        "dropped": dropped,
        "age_ready_p50_ms": _percentile(ready, 50),
        "age_ready_p99_ms": _percentile(ready, 99),
        "age_paint_p50_ms": None if paint_ages is None else _percentile(paint_ages, 50),
        "age_paint_p99_ms": None if paint_ages is None else _percentile(paint_ages, 99),
        "frames_painted": None if paint_ages is None else len(paint_ages),
        "frames_scored": len(records),
        "rss_mb": rss,
    }
    if truth is not None:
        result["guidance"] = guidance.score_readouts(records, truth, target_depth_mm=target)
    return result


def replay_at(engine, cines, rate: float, seconds: float, target, folder: pathlib.Path, truth):
    """In-process: replays the cines in turn at `rate` for `seconds`, each recorded to JSONL
    in `folder` and scored from that record."""
    records, processed, dropped, run_s = [], 0, 0, 0.0
    with rss_sampler(os.getpid()) as rss:
        start = time.monotonic()
        for k, (path, names) in enumerate(itertools.cycle(cines)):
            left = seconds - (time.monotonic() - start)
            if left <= 0:
                break
            record = pathlib.Path(folder) / f"rate{rate:g}_{k:04d}.jsonl"
            session = LiveSession(engine, str(path), replay_fps=rate, target_depth_mm=target,
                                  record=record, max_seconds=left)  # fmt: skip
            session.start()
            session.wait()
            session.stop()
            stats = session.stats()
            if stats["status"].startswith("error"):
                raise RuntimeError(f"{path}: {stats['status']}")
            processed, dropped = processed + stats["processed"], dropped + stats["dropped"]
            # n frames span n - 1 intervals; each owns one, or short cines would read fast
            run_s += stats["run_s"] + 1.0 / rate
            for r in read_records(record):
                r["frame"] = names[r["frame"]]  # the truth's name of the frame
                records.append(r)
    return _result(rate, run_s, processed, dropped, records, None, rss, target, truth)


# ----------------------------------------------------------------------------------------------
# Browser mode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(workdir, live_dir, *, timeout_s: float = SERVER_START_S):
    """experiments/serve.py on a free loopback port in a subprocess: yields (url, Popen, the
    server's /api/status). Stopped with SIGTERM (uvicorn ends the live session on shutdown)."""
    port = _free_port()
    args = [sys.executable, str(SERVE), f"--tavr_workdir={workdir}", f"--live_dir={live_dir}",
            "--host=127.0.0.1", f"--port={port}"]  # fmt: skip
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL)  # stderr: its errors, if any
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = httpx.get(url + "/api/status", timeout=5).json()
                break
            except httpx.TransportError:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited ({server.returncode}) before it "
                                       "answered") from None  # fmt: skip
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer in {timeout_s:g} s") from None
                time.sleep(0.5)
        if not status["tavr"]["loaded"]:
            raise RuntimeError(f"the server has no TAVR model: {status['tavr']['error']}")
        yield url, server, status
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def open_live_tab(driver, url: str, timeout_s: float = 60.0) -> None:
    """Opens the page, wraps its WebSocket (_HOOK), opens the Live tab and waits until the
    page's WebSocket is connected."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    driver.execute_script(_HOOK)
    driver.find_element(By.ID, "tab-live").click()
    try:
        WebDriverWait(driver, timeout_s).until(lambda d: d.execute_script("return benchOpen"))
    except Exception as e:  # selenium's TimeoutException: say what the page said
        why = driver.find_element(By.ID, "live-error").text or "no WebSocket connection"
        raise RuntimeError(f"the Live tab did not connect: {why}") from e


def _session(client: httpx.Client, url: str) -> dict | None:
    return client.get(url + "/api/live/status").raise_for_status().json()["session"]


def _start(client: httpx.Client, url: str, source: str, rate: float, target) -> int:
    body = {"source": source, "replay_fps": rate}
    if target is not None:
        body["target_depth_mm"] = f"{target[0]:g},{target[1]:g}"
    r = client.post(url + "/api/live/start", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"POST /api/live/start {source}: HTTP {r.status_code} "
                           f"{r.json().get('error')}")  # fmt: skip
    return r.json()["session"]["id"]


def _run_session(client, url, source, rate, target, deadline) -> tuple[int, dict]:
    """Starts one replay, waits for its end or the deadline (then stops it): (id, stats)."""
    sid = _start(client, url, source, rate, target)
    while True:
        session = _session(client, url)
        if not session["running"]:
            break
        if time.monotonic() >= deadline:
            client.post(url + "/api/live/stop").raise_for_status()
            session = _session(client, url)
            break
        time.sleep(POLL_S)
    if session["id"] != sid:
        raise RuntimeError(f"another live session ({session['id']}) replaced ours ({sid})")
    return sid, session["stats"]


def warm_up(driver, client, url, source: str, rate: float, timeout_s: float = 600.0) -> None:
    """One replay until the server processed a frame and the page painted one: the engine
    compiles for the frame size and the page settles before any rate is timed."""
    _start(client, url, source, rate, None)
    deadline = time.monotonic() + timeout_s
    while not driver.execute_script("return window.liveAges.length > 0"):
        session = _session(client, url)
        status = str(session["stats"]["status"])
        if status.startswith("error") or time.monotonic() > deadline:
            raise RuntimeError(f"warm-up replay of {source}: no frame painted ({status})")
        if not session["running"]:  # ended before the page painted: replay it again
            _start(client, url, source, rate, None)
        time.sleep(POLL_S)
    client.post(url + "/api/live/stop").raise_for_status()
    while _session(client, url)["running"]:
        time.sleep(POLL_S)
    time.sleep(0.5)  # the last frames in flight to the page land before the drain
    driver.execute_script(_DRAIN)


def _drain(driver, paint_ages: list, received: list) -> None:
    """Moves the page's paint ages and received (session, record) pairs into the lists."""
    ages, records = driver.execute_script(_DRAIN)
    paint_ages.extend(float(a) for a in ages)
    received.extend(records)


def browse_at(driver, client, url, pid, cines, rate, seconds, target, truth):
    """Browser mode: replays the cines in turn at `rate` for `seconds` through the server the
    page watches; the page's paint ages and records, the server's stats and RSS."""
    records, paint_ages, received, processed, dropped, run_s = [], [], [], 0, 0, 0.0
    names_of = {}  # session id -> the truth's frame names of its cine
    with rss_sampler(pid) as rss:
        deadline = time.monotonic() + seconds
        for path, names in itertools.cycle(cines):
            if time.monotonic() >= deadline:
                break
            sid, stats = _run_session(client, url, path.name, rate, target, deadline)
            names_of[sid] = names
            _drain(driver, paint_ages, received)  # bounds what the page holds on long runs
            if str(stats["status"]).startswith("error"):
                raise RuntimeError(f"{path.name}: {stats['status']}")
            processed, dropped = processed + stats["processed"], dropped + stats["dropped"]
            run_s += (stats["run_s"] or 0.0) + 1.0 / rate  # as in-process: one interval each
        time.sleep(0.5)  # the last frames in flight to the page land before the drain
        _drain(driver, paint_ages, received)
    for sid, r in received:
        if sid in names_of:  # frames of the warm-up or of a previous rate are not this rate's
            r["frame"] = names_of[sid][r["frame"]]
            records.append(r)
    return _result(rate, run_s, processed, dropped, records, paint_ages, rss, target, truth)


# ----------------------------------------------------------------------------------------------
# The benchmark


def run(workdir=None, *, out, model_file=None, backend: str = "xla", refine: bool = False,
        rates=(15.0, 30.0), minutes: float = 1.0, browser: bool = False, cases: int = 4,
        frames: int = 60, size: int = 512, seed: int = 9001, target_depth_mm=(3.0, 6.0),
        log=print) -> dict:  # fmt: skip
    """The benchmark of the module docstring; writes `out` (JSON) and returns what it wrote.

    ValueError / RuntimeError (one line) on what cannot run: --browser without Chromium, or
    with an exported model or another backend (the server serves W's checkpoint on XLA).
    """
    if browser:
        from cardiac_web import browser as chromium

        why = chromium.missing_browser()
        if why is not None:
            raise RuntimeError(f"--browser needs Chromium: {why}")
        if model_file is not None or backend != "xla":
            raise ValueError("--browser serves W's checkpoint on XLA (experiments/serve.py has "
                             "no --model_file or --backend)")  # fmt: skip
        if workdir is None:
            raise ValueError("--browser needs --workdir (the server's --tavr_workdir)")
        if refine and not (pathlib.Path(workdir) / "refiner" / "refiner.json").is_file():
            raise ValueError(f"--refine: {workdir} has no refiner (refiner/refiner.json)")
    target = None if target_depth_mm is None else tuple(float(v) for v in target_depth_mm)
    results = {
        "mode": "browser" if browser else "in-process",
        "workdir": None if workdir is None else str(workdir),
        "model_file": None if model_file is None else str(model_file),
        "backend": backend,
        "refine": refine,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "minutes": minutes,
        "cases": cases,
        "frames": frames,
        "size": size,
        "seed": seed,
        "target_depth_mm": None if target is None else list(target),
        "rates": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_live_") as tmp:
        folder = pathlib.Path(tmp)
        cines, truth = held_out_cines(folder, cases, frames, size, seed)
        if browser:
            _browse(workdir, folder, cines, truth, rates, minutes, target, results, log)
        else:
            from tavr_jax.infer.backends import open_engine

            engine = open_engine(workdir, model_file=model_file, backend=backend, refine=refine)
            for rate in rates:
                r = replay_at(engine, cines, float(rate), 60 * minutes, target, folder, truth)
                results["rates"][f"{float(rate):g}"] = r
                log(_line(r))
    write_json_atomic(out, results)
    log(f"wrote {out}")
    return results


def _browse(workdir, folder, cines, truth, rates, minutes, target, results, log) -> None:
    from cardiac_web import browser as chromium

    try:
        _browse_server(chromium, workdir, folder, cines, truth, rates, minutes, target, results,
                       log)  # fmt: skip
    except httpx.HTTPError as e:  # one line, as the launcher prints its errors
        raise RuntimeError(f"the server: {type(e).__name__}: {e}") from e


def _browse_server(chromium, workdir, folder, cines, truth, rates, minutes, target, results, log):
    with (
        server_process(workdir, folder / "cines") as (url, server, status),
        chromium.chromium() as driver,
        httpx.Client(timeout=60) as client,
    ):
        served_refine = bool(status["tavr"]["refiner"])
        if served_refine != results["refine"]:  # serve.py uses W's refiner whenever it has one
            log(f"note: the server runs {'with' if served_refine else 'without'} the refiner "
                "(serve.py decides from the workdir); recorded as refine")  # fmt: skip
            results["refine"] = served_refine
        open_live_tab(driver, url)
        warm_up(driver, client, url, cines[0][0].name, float(rates[0]))
        try:
            for rate in rates:
                r = browse_at(driver, client, url, server.pid, cines, float(rate), 60 * minutes,
                              target, truth)  # fmt: skip
                results["rates"][f"{float(rate):g}"] = r
                log(_line(r))
        finally:  # stop the replay before the page and the server go
            with contextlib.suppress(httpx.HTTPError):
                client.post(url + "/api/live/stop")


def _line(r: dict) -> str:
    paint = "" if r["age_paint_p50_ms"] is None else (
        f", paint age p50 {r['age_paint_p50_ms']} ms p99 {r['age_paint_p99_ms']} ms")  # fmt: skip
    return (f"{r['rate_fps']:g} fps: {r['processed_fps']} processed/s, {r['dropped']} dropped, "
            f"ready age p50 {r['age_ready_p50_ms']} ms p99 {r['age_ready_p99_ms']} ms{paint}, "
            f"RSS {r['rss_mb'][-1] if r['rss_mb'] else '-'} MB")  # fmt: skip
