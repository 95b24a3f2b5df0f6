"""Live guidance: newest-frame policy, paced replays, sources that fail or stall, frame size
changes, recording that survives a kill, and the launcher end to end."""

import http.server
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
from _workdirs import TINY_CONFIG, write_tiny_checkpoint

from cardiac_core import dicom
from tavr_jax.infer import live_sources
from tavr_jax.infer.live import LiveSession, read_records, video_segments
from tavr_jax.infer.live_sources import LiveSource, LiveSourceError, open_live_source
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")
ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTRACT = {"frame", "arrival_s", "ready_s", "points", "angle_deg", "annulus", "stage", "alerts",
            "depth_sd", "annulus_age_s", "units", "dropped_total"}  # fmt: skip


class FakeEngine:
    """The engine's call API in numpy: sleeps `delay_s` per call, reads the frame's stamp."""

    def __init__(self, delay_s=0.0, source=None):
        self.schema, self.meta = SCHEMA, {}
        self.delay_s, self.source = delay_s, source
        self.calls = []  # (stamp of the frame run, frames the source had published by then)

    def __call__(self, frames):
        published = None if self.source is None else self.source.count
        self.calls.append((int(frames[0, 0, 0]) * 256 + int(frames[0, 0, 1]), published))
        time.sleep(self.delay_s)
        k, g = SCHEMA.num_points, SCHEMA.num_groups
        h, w = frames.shape[1:]
        coords = np.tile([[w / 2, h / 2]], (1, k, 1)).astype(np.float32)
        return {"visibility": np.full((1, k), 0.9, np.float32),
                "group": np.full((1, g), 0.9, np.float32), "coords": coords}  # fmt: skip


class ScriptedSource(LiveSource):
    """Frames stamped with their index, published on a script: (count, interval_s) bursts,
    a negative count pausing for interval_s; frame sizes from `shapes` (cycled per burst)."""

    kind = "scripted"

    def __init__(self, script, shapes=((40, 48),), end=True):
        super().__init__("scripted")
        self.script, self.shapes, self.end = script, shapes, end
        self.fps, self.first_shape = 50.0, shapes[0]  # the engine warms up on the first size

    def _run(self):
        index = 0
        for burst, (count, interval) in enumerate(self.script):
            if count < 0:
                if self._stop.wait(interval):
                    return
                continue
            shape = self.shapes[burst % len(self.shapes)]
            for _ in range(count):
                image = np.full(shape, 30, np.uint8)
                image[0, 0], image[0, 1] = divmod(index, 256)
                self.publish(index, index, image)
                index += 1
                if self._stop.wait(interval):
                    return
        while not self.end and not self._stop.wait(0.05):
            pass


def _run_to_end(session, timeout=60):
    session.start()
    assert session.wait(timeout), "the session did not end"
    session.stop()
    return session.stats()


def _folder(path, names, shape=(40, 48)):
    path.mkdir()
    for i, name in enumerate(names):
        cv2.imwrite(str(path / name), np.full(shape, 10 * i % 256, np.uint8))
    return path


# ----------------------------------------------------------------------------------------------
# The newest-frame policy and paced replays


def test_a_slow_engine_takes_the_newest_frame_and_counts_the_drops(tmp_path):
    source = ScriptedSource([(150, 0.005)])  # ~200 frames/s against ~25 processed per second
    engine = FakeEngine(delay_s=0.04, source=source)
    session = LiveSession(engine, source, record=tmp_path / "r.jsonl")
    stats = _run_to_end(session)
    records = read_records(tmp_path / "r.jsonl")
    assert stats["status"] == "ended" and stats["end_reason"] == "end of replay"
    assert stats["processed"] == len(records) and stats["dropped"] > stats["processed"]
    assert stats["processed"] + stats["dropped"] == source.count == 150  # every frame counted
    runs = engine.calls[1:]  # the first call is the warm-up... of a source without a shape
    stamps = [s for s, _ in runs]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    # Each frame run was the newest published when the engine took it (the source may have
    # published one more in between).
    assert all(stamp >= published - 2 for stamp, published in runs)
    assert [r["frame"] for r in records] == stamps
    ages = np.array([r["ready_s"] - r["arrival_s"] for r in records])
    assert ages.max() < 0.2  # one engine call, never a queue
    half = len(ages) // 2
    assert np.median(ages[half:]) < np.median(ages[:half]) + 0.02  # no growing lag
    assert records[-1]["dropped_total"] <= stats["dropped"]


def test_replay_is_paced_at_the_rate_asked_and_at_the_cine_rate(tmp_path):
    folder = _folder(tmp_path / "f", [f"f{i}.png" for i in range(8)])
    session = LiveSession(FakeEngine(), str(folder), replay_fps=20, record=tmp_path / "a.jsonl")
    _run_to_end(session)
    arrival = np.array([r["arrival_s"] for r in read_records(tmp_path / "a.jsonl")])
    assert len(arrival) == 8
    assert np.median(np.diff(arrival)) == pytest.approx(0.05, abs=0.015)
    assert arrival[-1] - arrival[0] == pytest.approx(7 * 0.05, abs=0.08)
    frames = np.random.default_rng(0).integers(0, 255, (6, 40, 48)).astype(np.uint8)
    cine = dicom.write_test_cine(tmp_path / "c.dcm", frames, frame_time_ms=100,
                                 pixel_spacing=(0.25, 0.25))  # fmt: skip
    session = LiveSession(FakeEngine(), str(cine), record=tmp_path / "b.jsonl")
    _run_to_end(session)
    records = read_records(tmp_path / "b.jsonl")
    assert [r["frame"] for r in records] == list(range(6))  # a cine's frames by index
    arrival = np.array([r["arrival_s"] for r in records])
    assert arrival[-1] - arrival[0] == pytest.approx(0.5, abs=0.1)  # FrameTime 100 ms
    assert all(r["mm_per_px"] == 0.25 and r["units"] == "mm" and "depth_mm" in r for r in records)
    assert all(r["ready_s"] >= r["arrival_s"] for r in records)


def test_a_folder_replays_in_file_name_order(tmp_path):
    names = ["f10.png", "f2.png", "a.png", "f1.png"]
    folder = _folder(tmp_path / "f", names)
    src = open_live_source(folder, replay_fps=30)
    assert src.kind == "replay" and src.fps == 30
    session = LiveSession(FakeEngine(), src, record=tmp_path / "r.jsonl")
    stats = _run_to_end(session)
    records = read_records(tmp_path / "r.jsonl")
    assert [r["frame"] for r in records] == ["a.png", "f1.png", "f2.png", "f10.png"]
    assert stats["dropped"] == 0 and records[0]["units"] == "px" and "depth_px" in records[0]
    assert records[0]["mm_per_px"] is None
    assert open_live_source(folder).fps == live_sources.DEFAULT_REPLAY_FPS  # no timing: 15


# ----------------------------------------------------------------------------------------------
# Sources that fail, stall or change size


def test_a_source_that_cannot_be_opened_is_one_line_naming_it(tmp_path):
    cases = {
        "device:57": "cannot open live source device:57",
        "device:cam": "expected device:N",
        "ftp://host/x": "unknown live source ftp://host/x",
        str(tmp_path / "missing.mp4"): "missing.mp4",
        str(tmp_path / "empty"): "holds no images",
    }
    (tmp_path / "empty").mkdir()
    for spec, message in cases.items():
        with pytest.raises(LiveSourceError, match=message) as info:
            open_live_source(spec)
        assert "\n" not in str(info.value)
    with pytest.raises(LiveSourceError, match="replay_fps must be positive"):
        open_live_source(tmp_path, replay_fps=0)
    session = LiveSession(FakeEngine(), "device:57")
    with pytest.raises(LiveSourceError, match="device:57"):
        session.start()
    session.stop()  # idempotent, even unstarted
    with pytest.raises(ValueError, match="stage_prior"):
        LiveSession(FakeEngine(), "device:57", stage_prior="landing")


def _counts(session):
    stats = session.stats()
    return stats["processed"], stats["dropped"]


def test_a_stalled_source_reads_no_signal_then_recovers(tmp_path):
    source = ScriptedSource([(5, 0.02), (-1, 1.0), (5, 0.02)], end=False)
    session = LiveSession(FakeEngine(), source, stall_s=0.3, record=tmp_path / "r.jsonl")
    session.start()
    seen, deadline = [], time.monotonic() + 20
    while time.monotonic() < deadline and sum(_counts(session)) < 10:
        status = session.stats()["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.01)
    time.sleep(0.5)  # silent again, for good: no signal, yet still running
    assert session.stats()["status"] == "no signal" and session.running
    session.stop()
    assert "no signal" in seen and seen.index("no signal") > seen.index("running")
    assert seen[-1] == "running" or seen[-2:] == ["no signal", "running"]
    assert session.stats()["status"] == "ended" and not session.running
    assert len(read_records(tmp_path / "r.jsonl")) == session.stats()["processed"]
    assert sum(_counts(session)) == 10


class _MjpegStream(http.server.BaseHTTPRequestHandler):
    """An MJPEG camera over HTTP that sends `frames` frames per connection, then hangs up."""

    frames = 15

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        for i in range(self.frames):
            jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 8 * i, np.uint8))[1].tobytes()
            head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
            try:
                self.wfile.write(head % len(jpeg) + jpeg + b"\r\n")
            except OSError:
                return
            time.sleep(1 / 30)


def test_a_network_stream_that_hangs_up_reads_no_signal_and_is_reopened():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MjpegStream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg"
    try:
        source = open_live_source(url)
        assert source.kind == "url"
        session = LiveSession(FakeEngine(), source, stall_s=0.4)
        session.start()
        seen, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline and seen[-3:] != ["running", "no signal", "running"]:
            status = session.stats()["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.01)
        session.stop()
    finally:
        server.shutdown()
    assert seen[-3:] == ["running", "no signal", "running"], seen
    assert session.stats()["processed"] > _MjpegStream.frames // 2


def test_the_frame_size_changes_mid_stream(tmp_path):
    workdir = tmp_path / "w"
    write_tiny_checkpoint(workdir, TINY_CONFIG)
    from tavr_jax.infer.engine import KeypointEngine

    engine = KeypointEngine.from_workdir(workdir, batch_size=8)  # as the web server loads it
    # Each burst waits long enough for the previous frame to be processed, compilation included.
    source = ScriptedSource([(2, 0.05), (2, 0.05)], shapes=((40, 48), (64, 36)))
    session = LiveSession(engine, source, record=tmp_path / "r.jsonl",
                          record_video=tmp_path / "v.mp4")  # fmt: skip
    stats = _run_to_end(session, timeout=120)
    assert stats["status"] == "ended", stats
    # One frame at a time, never padded to the upload engine's batch of 8.
    assert session.engine.batch_size == 1 and {k[0] for k in engine._compiled} == {1}
    records = read_records(tmp_path / "r.jsonl")
    sizes = [(r["width"], r["height"]) for r in records]
    assert (48, 40) in sizes and (36, 64) in sizes and sizes[-1] == (36, 64)
    first_new = sizes.index((36, 64))
    assert records[first_new]["new_size"] and "new_size" not in records[0]  # warmed up on it
    seq, record, jpeg = session.latest()
    overlay = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape[:2] == (64, 36) and record["width"] == 36 and seq == len(records)
    (segment,) = video_segments(tmp_path / "v.mp4")
    cap = cv2.VideoCapture(str(segment))
    assert cap.read()[0] and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 48  # the first size
    cap.release()


# ----------------------------------------------------------------------------------------------
# Recording and the launcher


def test_read_records_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"frame": 0}\n{"frame": 1}\n{"frame": 2, "poi')
    assert [r["frame"] for r in read_records(path)] == [0, 1]
    path.write_text('{"frame": 0}\n{"fra\n{"frame": 2}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2: not a JSON record"):
        read_records(path)


def _launcher(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".pytest_cache" / "jax"))  # fmt: skip
    return [sys.executable, "experiments/tavr_live.py", *args], env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("live") / "w"
    write_tiny_checkpoint(path, TINY_CONFIG)
    return path


def test_the_launcher_end_to_end(tmp_path, workdir):
    raw = np.random.default_rng(1).integers(0, 255, (6, 48, 40)).astype(np.uint8)
    cine = dicom.write_test_cine(tmp_path / "c.dcm", raw, frame_time_ms=100,
                                 pixel_spacing=(0.3, 0.3))  # fmt: skip
    out = tmp_path / "live.jsonl"
    cmd, env = _launcher(f"--workdir={workdir}", f"--input={cine}", f"--record={out}",
                         f"--record_video={tmp_path / 'v.mp4'}", "--target_depth_mm=2,6",
                         "--replay_fps=10")  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:].decode()
    stdout = run.stdout.decode()
    assert "\rframe 5  depth -" in stdout  # one refreshing line of readouts
    summary = stdout.strip().splitlines()[-1]
    assert "frames processed" in summary and "dropped" in summary and "p99" in summary
    assert "end of replay" in summary
    records = read_records(out)
    assert 1 <= len(records) <= 6 and records[-1]["frame"] == 5
    for r in records:
        assert CONTRACT <= set(r) and set(r["depth_mm"]) == {"FE1", "FE2"}
        assert set(r["points"]) == set(SCHEMA.point_names)
        assert all(p is None or len(p) == 3 for p in r["points"].values())
        assert r["ready_s"] >= r["arrival_s"] >= 0 and r["calibrated"] and r["units"] == "mm"
    assert json.loads(json.dumps(records)) == records
    assert video_segments(tmp_path / "v.mp4")
    bad, env = _launcher(f"--workdir={workdir}", "--input=device:57", f"--record={out}")
    run = subprocess.run(bad, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "error: cannot open live source device:57: no such V4L2/UVC device, or busy"
    )


def test_the_record_is_readable_after_a_kill(tmp_path, workdir):
    folder = _folder(tmp_path / "f", [f"{i:03d}.png" for i in range(400)])
    out = tmp_path / "live.jsonl"
    cmd, env = _launcher(f"--workdir={workdir}", f"--input={folder}", f"--record={out}",
                         f"--record_video={tmp_path / 'v.mp4'}", "--video_segment_s=0.5",
                         "--replay_fps=20")  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=ROOT)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 30:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the launcher ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.read_text().split("\n")
    complete = [json.loads(x) for x in lines[:-1]]  # every line but a torn last one parses
    records = read_records(out)
    assert len(records) >= 30 and records[: len(complete)] == complete
    assert records[-1]["frame"] != "399.png"  # killed mid-replay
    segments = video_segments(tmp_path / "v.mp4")
    assert segments and all(".part" not in s.name for s in segments)
    for segment in segments:  # each closed segment is a complete, readable file
        cap = cv2.VideoCapture(str(segment))
        assert cap.read()[0], segment
        cap.release()


def test_wait_newer_wakes_a_pusher_per_frame_and_at_the_end():
    source = ScriptedSource([(6, 0.05)])
    session = LiveSession(FakeEngine(), source)
    got, seq = [], 0
    pusher_done = threading.Event()

    def pusher():
        nonlocal seq
        while True:
            item = session.wait_newer(seq, timeout=5)
            if item is None:
                break
            seq = item[0]
            got.append((item[0], item[1]["frame"], item[2][:2]))
        pusher_done.set()

    session.start()  # before the pusher: an unstarted session has nothing newer to wait for
    threading.Thread(target=pusher, daemon=True).start()
    assert session.wait(60)
    assert pusher_done.wait(5)
    session.stop()
    assert [s for s, _, _ in got] == sorted({s for s, _, _ in got}) and got[-1][0] == 6
    assert all(jpeg == b"\xff\xd8" for _, _, jpeg in got)  # JPEG bytes
    stats = session.stats()
    assert {"processed", "dropped", "processed_fps", "dropped_fps", "age_ready_p50_ms",
            "age_ready_p99_ms", "status", "source"} <= set(stats)  # fmt: skip


def test_bench_live_replays_held_out_cines_and_scores_against_the_truth(tmp_path):
    from experiments import bench_live

    cines, truth = bench_live.held_out_cines(tmp_path, cases=1, frames=6, size=96, seed=9001)
    ((path, names),) = cines
    assert names[0] == "sim9001_00000/img/0000.png" and set(names) <= set(truth)
    r = bench_live.replay_at(FakeEngine(), cines, 30.0, 0.5, (3.0, 6.0), tmp_path, truth)
    assert r["processed"] + r["dropped"] >= 6 and r["processed_fps"] > 0
    assert r["age_ready_p50_ms"] is not None and r["age_paint_p50_ms"] is None
    assert len(r["rss_mb"]) >= 2 and r["guidance"]["unmatched_frames"] == 0
