"""The Live tab's API: replay sessions started, watched over the WebSocket and stopped."""

import json
import time

import _web
import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from cardiac_core.dicom import write_test_cine
from cardiac_web.app import create_app
from cardiac_web.guards import BadInput
from cardiac_web.live import LiveOptions, parse_target


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    replays = root / "replays"
    (replays / "frames").mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_test_cine(replays / "cine.dcm", rng.integers(0, 4096, (24, 48, 48), dtype=np.uint16),
                    frame_time_ms=100.0, pixel_spacing=(0.3, 0.3))  # fmt: skip
    for i in range(4):
        frame = rng.integers(0, 256, (48, 48), dtype=np.uint8)
        cv2.imwrite(str(replays / "frames" / f"{i:03d}.png"), frame)
    (replays / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (root / "outside.dcm").write_bytes((replays / "cine.dcm").read_bytes())
    (replays / "escape.dcm").symlink_to(root / "outside.dcm")
    return replays


@pytest.fixture(scope="module")
def engine():
    engine = _web.tiny_engine()
    engine.meta.update(thresholds=0.0, group_thresholds=0.0)  # every point reported
    engine(np.zeros((1, 48, 48), np.uint8))  # compiled once, before any session's clock runs
    return engine


@pytest.fixture
def client(engine, replay_dir):
    app = create_app(tavr_engine=engine, live=LiveOptions(replay_dir=replay_dir, idle_stop_s=5))
    with TestClient(app) as client:  # the lifespan stops a session a failed test left running
        yield client


def _start(client, source, **fields):
    return client.post("/api/live/start", json={"source": source, **fields})


def _frames(ws, n):
    """The next n (frame message, JPEG) pairs, skipping hello, pong and stats messages."""
    got = []
    deadline = time.monotonic() + 60
    while len(got) < n:
        assert time.monotonic() < deadline, "no frames over the WebSocket"
        message = ws.receive_json()
        if message["type"] == "frame":
            got.append((message, ws.receive_bytes()))
    return got


def _next_json(ws):
    while "text" not in (message := ws.receive()):  # a frame's JPEG
        pass
    return json.loads(message["text"])


def test_replay_streams_records_and_jpegs_to_two_watchers(client, engine):
    r = _start(client, "cine.dcm", replay_fps=8, target_depth_mm="2,4")
    assert r.status_code == 200, r.text
    assert r.json()["session"]["running"] and r.json()["session"]["source"] == "cine.dcm"
    # One session at a time: a second start is refused, naming the running source.
    busy = _start(client, "frames/")
    assert busy.status_code == 409 and "source busy" in busy.json()["error"]
    assert "cine.dcm" in busy.json()["error"]
    with (
        client.websocket_connect("/api/live/ws") as ws,
        client.websocket_connect("/api/live/ws") as other,
    ):
        assert ws.receive_json()["type"] == "hello"
        ws.send_json({"type": "ping", "t": 123.5})  # the page measures its clock offset so
        while (pong := _next_json(ws))["type"] != "pong":
            pass
        assert pong["t"] == 123.5 and pong["server_ms"] > 0
        frames = _frames(ws, 2)
        assert len(_frames(other, 1)) == 1  # a second client watches the same session
        # The rest of the server answers while the session runs.
        status = client.get("/api/live/status").json()
        assert status["session"]["running"] and status["session"]["watchers"] == 2
        assert client.get("/api/status").status_code == 200
        png = cv2.imencode(".png", np.zeros((32, 32), np.uint8))[1].tobytes()
        predict = client.post("/api/tavr/predict", files={"media": ("f.png", png)})
        assert predict.status_code == 200, predict.text
    seqs = [m["seq"] for m, _ in frames]
    assert seqs[1] > seqs[0]
    for message, jpeg in frames:
        assert jpeg[:2] == b"\xff\xd8" and cv2.imdecode(np.frombuffer(jpeg, np.uint8), 0).shape
        record, stats = message["record"], message["stats"]
        assert set(record["points"]) == set(engine.schema.point_names)
        assert record["units"] == "mm" and record["calibrated"]  # the cine's pixel spacing
        assert set(record["depth_mm"]) == {"FE1", "FE2"}
        assert {"depth_sd", "angle_deg", "annulus", "stage", "alerts"} <= set(record)
        assert stats["processed"] >= 1 and "dropped_fps" in stats
        assert message["arrival_ms"] <= message["server_ms"] <= time.time() * 1000 + 1
        assert message["source"] == "cine.dcm"
    stop = client.post("/api/live/stop")
    assert stop.status_code == 200 and stop.json()["stopped"]
    session = client.get("/api/live/status").json()["session"]
    assert not session["running"] and session["ended_by"] == "stopped"
    assert client.post("/api/live/stop").json()["stopped"] is False  # idempotent


def test_replay_ends_by_itself_and_frees_the_source(client):
    r = _start(client, "frames/", replay_fps=20, stage_prior="deploying", mm_per_px=0.25)
    assert r.status_code == 200, r.text
    with client.websocket_connect("/api/live/ws") as ws:
        message, _ = _frames(ws, 1)[0]
        assert message["record"]["stage"] == "deploying"
        assert message["record"]["stage_source"] == "prior"
        deadline = time.monotonic() + 30
        while client.get("/api/live/status").json()["session"]["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while (m := _next_json(ws))["type"] != "stats":  # after the frames still in flight
            pass
        assert not m["running"] and m["stats"]["status"] == "ended"
    assert client.get("/api/live/status").json()["session"]["ended_by"] == "end of replay"
    again = _start(client, "frames/", replay_fps=20)  # the source is free again
    assert again.status_code == 200, again.text
    client.post("/api/live/stop")


def test_an_unwatched_session_stops(engine, replay_dir):
    app = create_app(tavr_engine=engine, live=LiveOptions(replay_dir=replay_dir, idle_stop_s=0.5))
    with TestClient(app) as client:
        assert _start(client, "cine.dcm", replay_fps=2).status_code == 200
        deadline = time.monotonic() + 20
        while (session := client.get("/api/live/status").json()["session"])["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert session["ended_by"].startswith("nobody watched")


@pytest.mark.parametrize(
    "source, fields, status, message",
    [
        ("broken.dcm", {}, 422, "cannot open source 'broken.dcm'"),
        ("missing.mp4", {}, 404, "no such replay source: 'missing.mp4'"),
        ("../outside.dcm", {}, 403, "outside the replay folder"),
        ("/etc/passwd", {}, 403, "outside the replay folder"),
        ("escape.dcm", {}, 403, "outside the replay folder"),  # a symlink out of it
        ("device:0", {}, 403, "source not allowed: 'device:0'"),
        ("file:///etc/passwd", {}, 403, "source not allowed"),
        ("", {}, 400, "source: empty"),
        ("cine.dcm", {"target_depth_mm": "6,x"}, 422, "target_depth_mm"),
        ("cine.dcm", {"stage_prior": "landing"}, 422, "stage_prior: expected one of"),
        ("cine.dcm", {"replay_fps": -1}, 422, "replay_fps"),
    ],
)
def test_bad_sources_get_one_line_errors(client, replay_dir, source, fields, status, message):
    r = _start(client, source, **fields)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error and "\n" not in error
    assert str(replay_dir) not in error  # no server path goes back to the page
    assert client.get("/api/live/status").json()["session"] is None  # nothing was started


def test_status_lists_replays_and_says_when_live_is_unavailable(client, replay_dir):
    status = client.get("/api/live/status").json()
    assert status["available"] and status["replay_files"] == ["broken.dcm", "cine.dcm",
                                                             "escape.dcm", "frames/"]  # fmt: skip
    assert "deploying" in status["stages"]
    bare = TestClient(create_app(live=LiveOptions(replay_dir=replay_dir)))
    status = bare.get("/api/live/status").json()
    assert not status["available"] and "no TAVR model" in status["error"]
    r = bare.post("/api/live/start", json={"source": "cine.dcm"})
    assert r.status_code == 503 and "no TAVR model" in r.json()["error"]
    page = bare.get("/")
    assert 'id="tab-live"' in page.text and "/static/live.js" in page.text
    assert bare.get("/static/live.js").status_code == 200


def test_source_allowlist_and_target_parsing(tmp_path):
    options = LiveOptions(sources=("device:*", "rtsp://10.0.0.5/cam1"))
    assert options.resolve("device:1") == "device:1"
    assert options.resolve("rtsp://10.0.0.5/cam1") == "rtsp://10.0.0.5/cam1"
    for refused in ("rtsp://10.0.0.5/cam2", "http://10.0.0.5/", "cine.dcm"):
        with pytest.raises(BadInput) as e:
            options.resolve(refused)
        assert e.value.status == 403
    assert parse_target("3,6") == (3.0, 6.0) and parse_target("3.5-6") == (3.5, 6.0)
    assert parse_target("") is None and parse_target(None) is None
    with pytest.raises(BadInput):
        parse_target("6,3")
    with pytest.raises(ValueError, match="not a folder"):
        LiveOptions(replay_dir=tmp_path / "absent")
