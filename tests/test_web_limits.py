"""The server under hostile input: sizes from headers, streamed body limit, worker pool, errors.

Every bad input is generated here (no binary fixtures): a PNG that decodes to 20000 x 20000,
videos and DICOM cines larger than the limits, a DICOM without Rows, a chunked body that
never ends, malformed multipart bodies.
"""

import asyncio
import base64
import concurrent.futures
import pathlib
import socket
import sys
import tempfile
import threading
import time

import _web
import cv2
import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from starlette import formparsers

from cardiac_core import dicom
from cardiac_core.dicom import write_test_cine
from cardiac_web import browser
from cardiac_web.app import SHOWN_MAX_PIXELS, Limits, create_app, shown_size
from experiments.benchmarks import web_memory
from perfusion import studies
from tavr_jax import get_schema
from tavr_jax.infer import streams

SCHEMA = get_schema("paper11")
ROOT = pathlib.Path(__file__).resolve().parents[1]


_png = web_memory.png_bytes
_dicom = web_memory.dicom_bytes


def _noise(n, h, w, seed=0, dtype=np.uint8, high=256):
    return np.random.default_rng(seed).integers(0, high, (n, h, w), dtype=dtype)


@pytest.fixture(scope="module")
def engine():
    return _web.tiny_engine()


@pytest.fixture(scope="module")
def perfusion_data(tmp_path_factory):
    return _web.fitted_perfusion(tmp_path_factory.mktemp("perfusion"))


@pytest.fixture(scope="module")
def bomb():
    data = web_memory.png_bomb(20000, 20000)
    assert len(data) < 2 * 2**20  # small on the wire, 400 MB decoded
    return data


def _predict(client, data, **form):
    return client.post("/api/tavr/predict", files={"media": ("x.bin", data)}, data=form)


def _one_line_error(r, status, *fragments):
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    error = r.json()["error"]
    assert "\n" not in error and "/tmp" not in error and "detail" not in r.text
    for fragment in fragments:
        assert fragment in error, error
    return error


def test_image_bomb_is_refused_from_its_header(engine, bomb, perfusion_data):
    client = TestClient(create_app(tavr_engine=engine))
    _one_line_error(_predict(client, bomb), 413, "media", "20000x20000", "--max_pixels")
    # The perfusion route has the same bound, on each of its files.
    web = TestClient(create_app(perfusion_model=perfusion_data[1]))
    study = {"study": ("s.png", bomb)}
    _one_line_error(web.post("/api/perfusion/analyze", files=study), 413, "study", "20000x20000")
    pair = {"stress": ("s.png", _png(np.zeros((8, 8), np.uint8))), "rest": ("r.png", bomb)}
    _one_line_error(web.post("/api/perfusion/analyze", files=pair), 413, "rest", "20000x20000")


@pytest.mark.parametrize("kind", ["image", "video", "dicom"])
def test_sizes_come_from_headers_before_any_frame_is_decoded(engine, tmp_path, monkeypatch, kind):
    frames = _noise(3, 80, 96)
    data = {
        "image": lambda: _png(frames[0]),
        "video": lambda: web_memory.avi_bytes(frames, tmp_path),
        "dicom": lambda: _dicom(frames, tmp_path),
    }[kind]()

    def decoded(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    # Any decoding now fails loudly (and would answer 422, not 413).
    monkeypatch.setattr(cv2, "imdecode", decoded)
    monkeypatch.setattr(streams, "VideoSource", decoded)
    monkeypatch.setattr(dicom.DicomCine, "raw_frame", decoded)
    client = TestClient(create_app(tavr_engine=engine, limits=Limits(max_pixels=96 * 80 - 1)))
    _one_line_error(_predict(client, data), 413, "96x80", "limit")


def test_frames_beyond_the_frame_and_pixel_budgets_are_not_decoded(engine, tmp_path):
    data = _dicom(_noise(5, 32, 40, dtype=np.uint16, high=4096), tmp_path, frame_time_ms=50.0)
    for limits, kept in [(Limits(max_frames=3), 3), (Limits(max_total_pixels=2 * 32 * 40), 2)]:
        body = _predict(TestClient(create_app(tavr_engine=engine, limits=limits)), data).json()
        assert body["n_frames"] == len(body["frames"]) == kept
        assert body["total_frames"] == 5 and body["truncated"]
        assert f"first {kept} of 5 frames" in body["warning"]
    body = _predict(TestClient(create_app(tavr_engine=engine)), data).json()
    assert body["n_frames"] == 5 and not body["truncated"] and body["warning"] is None


def test_shown_size_bounds_the_images_sent_to_the_page():
    assert shown_size(1, 96, 128) == (96, 128)  # small: as it is
    assert shown_size(300, 512, 512) == (512, 512)  # 75 Mpx: as it is
    assert shown_size(1, 4096, 2048) == (1024, 512)  # longest side 1024
    # 256 frames of 1024 x 1024 = 256 Mpx -> 80 Mpx: scale sqrt(80 / 256) = 0.559
    assert shown_size(256, 1024, 1024) == (572, 572)
    h, w = shown_size(300, 1000, 700)
    assert 300 * h * w <= SHOWN_MAX_PIXELS and abs(h / w - 1000 / 700) < 0.01


def test_large_frames_are_shown_downscaled_with_points_in_frame_pixels(engine):
    frame = np.tile(np.arange(2048, dtype=np.uint8), (1024, 1))  # 2048 wide, 1024 high
    body = _predict(TestClient(create_app(tavr_engine=engine)), _png(frame)).json()
    assert (body["width"], body["height"]) == (2048, 1024)
    jpeg = base64.b64decode(body["frames"][0]["image"].split(",", 1)[1])
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED).shape == (512, 1024)
    ref = engine(frame[None])["coords"][0]
    np.testing.assert_allclose([[p["x"], p["y"]] for p in body["frames"][0]["points"]], ref,
                               atol=0.01)  # fmt: skip


def test_a_cine_broken_midway_keeps_the_frames_before_the_break(engine, tmp_path):
    frames = _noise(4, 32, 32, dtype=np.uint16, high=4096)
    data = _dicom(frames, tmp_path)
    client = TestClient(create_app(tavr_engine=engine))
    body = _predict(client, data[:-3000]).json()  # frames 2 and 3 cut off
    assert body["n_frames"] == 2 and body["total_frames"] == 4 and body["truncated"]
    assert body["warning"].startswith("the file holds 2 decodable frames, its header says 4")
    assert "frame 2" in body["warning"] and str(tmp_path) not in body["warning"]
    ref = engine(np.stack([dicom.DicomCine(tmp_path / "cine.dcm").frame(i) for i in range(2)]))
    got = [[p["visibility"] for p in f["points"]] for f in body["frames"]]
    np.testing.assert_allclose(got, ref["visibility"], atol=1e-4)


def test_a_truncated_video_says_how_many_frames_it_held(engine, tmp_path):
    data = web_memory.avi_bytes(_noise(6, 32, 32), tmp_path)
    body = _predict(TestClient(create_app(tavr_engine=engine)), data[: len(data) * 6 // 10])
    body = body.json()
    assert body["kind"] == "video" and body["total_frames"] == 6
    assert 1 <= body["n_frames"] < 6 and body["truncated"]
    assert "its header says 6" in body["warning"] and "/tmp" not in body["warning"]


def _without(tmp_path, keyword) -> bytes:
    path = write_test_cine(tmp_path / "w.dcm", _noise(2, 16, 16))
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    ds.save_as(path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "make, status, fragment",
    [
        (lambda tmp: _without(tmp, "Rows"), 422, "media: DICOM header has no Rows"),
        (lambda tmp: _without(tmp, "Columns"), 422, "media: DICOM header has no Columns"),
        (lambda tmp: _dicom(_noise(2, 8, 8), tmp, with_pixel_data=False), 422, "no pixel data"),
        (lambda tmp: _dicom(_noise(1, 8, 8, dtype=np.uint32), tmp), 422, "bit depth"),
        (lambda tmp: b"\0" * 128 + b"DICM" + b"\xff" * 64, 422, "media: DICOM"),
        (lambda tmp: _png(np.zeros((8, 8), np.uint8))[:60], 415, "not a readable image"),
        (lambda tmp: b"RIFF\0\0\0\0AVI LIST" + b"\0" * 64, 415, "not an image, a video or a DICOM"),
        (lambda tmp: web_memory.avi_bytes(_noise(2, 16, 16), tmp)[:300], 415, "media"),
    ],
)
def test_every_undecodable_upload_is_a_one_line_4xx(engine, tmp_path, make, status, fragment):
    client = TestClient(create_app(tavr_engine=engine), raise_server_exceptions=False)
    _one_line_error(_predict(client, make(tmp_path)), status, fragment)
    assert client.get("/api/status").status_code == 200


def test_fastapi_own_errors_are_one_line_json(engine):
    app = create_app(tavr_engine=engine)

    @app.get("/api/probe")  # a typed parameter, to reach FastAPI's validation error
    def probe(n: int):
        return {"n": n}

    client = TestClient(app, raise_server_exceptions=False)
    _one_line_error(client.get("/api/nothing"), 404, "not found: /api/nothing")
    _one_line_error(client.get("/static/nothing.js"), 404, "not found")
    r = client.post("/api/status")
    _one_line_error(r, 405, "method POST not allowed for /api/status")
    assert r.headers["allow"] == "GET"
    _one_line_error(client.get("/api/probe?n=abc"), 422, "query.n", "integer")
    multipart = {"content-type": "multipart/form-data"}  # no boundary
    r = client.post("/api/tavr/predict", content=b"--x\r\n", headers=multipart)
    _one_line_error(r, 400, "malformed form upload", "boundary")
    many = {f"f{i}": (f"{i}.png", b"x") for i in range(6)}
    _one_line_error(client.post("/api/tavr/predict", files=many), 400, "Too many files")


def test_a_bug_answers_a_one_line_500(engine, monkeypatch):
    def broken(batches):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(engine, "run_batches", broken)
    client = TestClient(create_app(tavr_engine=engine), raise_server_exceptions=False)
    r = _predict(client, _png(np.zeros((16, 16), np.uint8)))
    _one_line_error(r, 500, "internal server error (RuntimeError)")
    assert "second line" not in r.text


def test_docs_ui_is_off_and_openapi_is_served_locally(engine):
    client = TestClient(create_app(tavr_engine=engine))
    for url in ("/api/docs", "/docs", "/redoc", "/api/redoc"):
        assert client.get(url).status_code == 404
    spec = client.get("/api/openapi.json")
    assert spec.status_code == 200
    assert {"/api/status", "/api/tavr/predict", "/api/perfusion/analyze"} <= set(
        spec.json()["paths"]
    )


def test_chunked_body_is_cut_off_at_the_limit(engine, monkeypatch):
    """ASGI level, as uvicorn delivers a chunked upload: no Content-Length, body in pieces."""
    spooled = []

    class RecordingSpool(tempfile.SpooledTemporaryFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.written = 0
            spooled.append(self)

        def write(self, data):
            self.written += len(data)
            return super().write(data)

    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", RecordingSpool)
    limits = Limits(max_upload_mb=1)
    app = create_app(tavr_engine=engine, limits=limits)
    head = (b"--XyZ\r\nContent-Disposition: form-data; name=\"media\"; filename=\"a.bin\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
    piece = b"\1" * 65536
    pieces = [head] + [piece] * (limits.max_body_bytes // len(piece) + 4)  # just over
    sent = {"bytes": 0, "pieces": 0}
    messages = []

    async def receive():
        if sent["pieces"] == len(pieces):
            await asyncio.sleep(3600)  # a client that never finishes: must not be waited for
        body = pieces[sent["pieces"]]
        sent["pieces"] += 1
        sent["bytes"] += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(message):
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/api/tavr/predict", "raw_path": b"/api/tavr/predict",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "headers": [(b"content-type", b"multipart/form-data; boundary=XyZ"),
                    (b"transfer-encoding", b"chunked")],
    }  # fmt: skip
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    assert messages[0]["status"] == 413
    assert b'"upload larger than 1 MiB' in messages[1]["body"]
    assert sent["bytes"] <= limits.max_body_bytes + len(piece)  # stopped reading at the limit
    assert sent["pieces"] < len(pieces)
    assert spooled and max(f.written for f in spooled) <= limits.max_body_bytes


def _read_http_reply(sock):
    """One HTTP reply, read to its Content-Length: headers and body may come in two segments."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(65536)
        if not chunk:
            return reply
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_chunked_upload_over_a_real_socket_gets_413(engine):
    """The same through uvicorn: an HTTP/1.1 chunked upload with no Content-Length."""
    limits = Limits(max_upload_mb=1)
    app = create_app(tavr_engine=engine, limits=limits)
    with browser.serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /api/tavr/predict HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n"
                      b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n")  # fmt: skip
            head = b'--XyZ\r\nContent-Disposition: form-data; name="media"; filename="a"\r\n\r\n'
            s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
            piece = b"\1" * 65536
            for _ in range(limits.max_body_bytes // len(piece) + 2):  # just over, then wait
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            reply = _read_http_reply(s)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'{"error":"upload larger than 1 MiB (--max_upload_mb)"}' in reply


def test_status_answers_while_heavy_work_runs_and_excess_work_gets_503(engine, monkeypatch):
    started, release = threading.Event(), threading.Event()
    run_batches = engine.run_batches

    def held(batches):  # a heavy request that takes as long as the test wants
        started.set()
        assert release.wait(60)
        return run_batches(batches)

    monkeypatch.setattr(engine, "run_batches", held)
    app = create_app(tavr_engine=engine, limits=Limits(max_heavy=1, busy_wait_s=0.3))
    files = {"media": ("f.png", _png(_noise(1, 32, 32)[0]))}
    with browser.serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, url + "/api/tavr/predict", files=files, timeout=60)
        assert started.wait(30)
        t0 = time.monotonic()
        status = httpx.get(url + "/api/status", timeout=5)
        took = time.monotonic() - t0
        assert status.status_code == 200 and took < 1.0, took
        t0 = time.monotonic()
        busy = httpx.post(url + "/api/tavr/predict", files=files, timeout=10)
        assert 0.3 <= time.monotonic() - t0 < 5.0
        _one_line_error(busy, 503, "server busy", "--max_heavy")
        release.set()
        assert first.result(timeout=60).status_code == 200
        # The slot is free again once the first job is done.
        assert httpx.post(url + "/api/tavr/predict", files=files, timeout=60).status_code == 200


def test_perfusion_report_uncertainty_fields_pass_through(perfusion_data, monkeypatch):
    data, model = perfusion_data
    _web.report_uncertain(monkeypatch, "disk colours far from every known colormap")
    name = studies.read_labels(data / "labels.csv")[0]["filename"]
    png = (data / "images" / name).read_bytes()
    web = TestClient(create_app(perfusion_model=model))
    report = web.post("/api/perfusion/analyze", files={"study": ("s.png", png)}).json()["report"]
    assert report["uncertain"] is True
    assert report["uncertain_reason"] == "disk colours far from every known colormap"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_server_peak_rss_stays_under_2gb_for_any_single_request(tmp_path):
    """A separate server process with the shipped limits; each request's own peak RSS."""
    inputs = web_memory.large_inputs(tmp_path)
    # The test session's compilation cache (conftest.py): the engine compiles once.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(ROOT / ".pytest_cache" / "jax"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}  # fmt: skip
    with web_memory.server_process("resnet_tiny", 32, 8, env=cache) as (url, pid):
        rows = web_memory.measure(url, pid, inputs)
    print("\n" + web_memory.format_rows(rows))
    for row in rows:
        assert row["status"] == inputs[row["name"]][1], row
        assert row["peak"] < 2048, row
        # The event loop stays free. 1 s is the target (docs/web.md measures it on a quiet
        # machine); here the other test worker competes for the 2 cores, and a blocked loop
        # (the bug this guards against) held /api/status for the whole request, 26 s.
        assert row["status_max_s"] < 5.0, row
        if row["status"] == 413:  # refused from a header: the upload's copies, nothing decoded
            assert row["peak"] - row["before"] < 3 * row["upload_mb"] + 100, row


def test_the_api_and_the_command_line_share_their_input_rules(engine, perfusion_data):
    # A frame under the command line's 16 px minimum side is refused here too, in its words.
    client = TestClient(create_app(tavr_engine=engine))
    tiny = _png(np.full((1, 1), 128, np.uint8))
    _one_line_error(_predict(client, tiny), 422, "media", "1x1", "16 px minimum")
    assert _predict(client, _png(_noise(1, 16, 16)[0])).status_code == 200
    # One study given two ways is ambiguous: 422 naming the conflicting fields, no guess.
    web = TestClient(create_app(perfusion_model=perfusion_data[1]))
    png = _png(np.zeros((8, 8), np.uint8))
    both = {"study": ("s.png", png), "stress": ("a.png", png), "rest": ("b.png", png)}
    _one_line_error(web.post("/api/perfusion/analyze", files=both), 422, "study", "stress", "rest")
    one = {"study": ("s.png", png), "rest": ("b.png", png)}
    _one_line_error(web.post("/api/perfusion/analyze", files=one), 422, "study, rest")
