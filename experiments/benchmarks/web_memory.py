"""Peak memory of the web server, request by request, under hostile and large uploads.

The server runs in its own process with the shipped limits (`cardiac_web.guards.Limits`).
Before each request the kernel's high-water mark of that process is reset to its current
RSS (`/proc/PID/clear_refs` = 5), so the VmHWM read afterwards is that request's own peak,
however short-lived. Linux only. The inputs are generated here, none is a stored file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import cv2
import httpx
import numpy as np

from cardiac_core.dicom import write_test_cine

logging.getLogger("httpx").setLevel(logging.WARNING)  # one log line per request otherwise

_SERVER = """
import sys, uvicorn
from cardiac_web.app import create_app
from tavr_jax import get_schema
from tavr_jax.infer.engine import KeypointEngine
backbone, image_size, batch_size, port = sys.argv[1], *map(int, sys.argv[2:])
engine = KeypointEngine.random_init(get_schema("paper11"), backbone, image_size,
                                    batch_size=batch_size)
uvicorn.run(create_app(tavr_engine=engine), host="127.0.0.1", port=port, log_level="warning")
"""


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit gray PNG of zeros: under 2 MB that decode to width x height bytes."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    deflate = zlib.compressobj(1)
    rows = b"\0" * ((width + 1) * 1000)  # each row: filter byte 0, then the pixels
    idat = b"".join(deflate.compress(rows) for _ in range(height // 1000)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ramps(n: int, size: int) -> list[np.ndarray]:
    """n distinct smooth uint8 frames (they compress well, unlike noise): a moving ramp."""
    ramp = np.arange(size, dtype=np.int64)
    return [np.tile(((ramp + 4 * i) % 256).astype(np.uint8), (size, 1)) for i in range(n)]


def png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def avi_bytes(frames, folder, *, fourcc: str = "MJPG", suffix: str = ".avi") -> bytes:
    """A video of uint8 (H, W) frames: MJPEG AVI, or e.g. fourcc "mp4v" with suffix ".mp4"."""
    path = pathlib.Path(folder) / f"clip{suffix}"
    h, w = frames[0].shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (w, h), False)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write a {w}x{h} {fourcc} video")
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path.read_bytes()


def dicom_bytes(frames, folder, **kwargs) -> bytes:
    return write_test_cine(pathlib.Path(folder) / "cine.dcm", frames, **kwargs).read_bytes()


def large_inputs(folder) -> dict[str, tuple[bytes, int]]:
    """name -> (upload, expected HTTP status) for the shipped limits."""
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
    return {
        "PNG bomb 20000x20000": (png_bomb(20000, 20000), 413),
        "video 8192x8192": (avi_bytes(np.zeros((1, 8192, 8192), np.uint8), folder), 413),
        "DICOM 4800x4000": (dicom_bytes(np.zeros((1, 4000, 4800), np.uint8), folder), 413),
        "PNG 4096x4096 (at the limit)": (png_bytes(ramps(1, 4096)[0]), 200),
        "video 256 x 1024x1024": (avi_bytes(ramps(256, 1024), folder), 200),
        # One noise frame repeated: small as MPEG-4 (inter frames), the largest as JPEGs.
        "video 256 x 1024x1024 noise (mp4v)": (
            avi_bytes([noise] * 256, folder, fourcc="mp4v", suffix=".mp4"),
            200,
        ),
        "DICOM 60 x 1024x1024": (
            dicom_bytes(rng.integers(0, 256, (60, 1024, 1024), dtype=np.uint8), folder),
            200,
        ),
    }


def rss_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of a process, MB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) / 1024  # kB
    raise KeyError(field)


@contextlib.contextmanager
def server_process(backbone: str, image_size: int, batch_size: int, *, env=None, timeout_s=600.0):
    """A web server with a randomly initialised TAVR engine in a child process: (url, pid).

    `env` adds to the environment (e.g. a JAX compilation cache).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **(env or {})}
    args = [sys.executable, "-c", _SERVER, backbone, str(image_size), str(batch_size), str(port)]
    server = subprocess.Popen(args, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                httpx.get(url + "/api/status", timeout=1)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the web server did not start") from None
                time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(30)


def _poll_status(url: str, stop: threading.Event, seconds: list[float]) -> None:
    """Times GET /api/status every 0.1 s until `stop` (the event loop's responsiveness).

    Asks at least once, so a request that is refused before the first poll still has a figure.
    """
    with httpx.Client(timeout=30) as client:
        while True:
            t0 = time.perf_counter()
            client.get(url + "/api/status").raise_for_status()
            seconds.append(time.perf_counter() - t0)
            if stop.wait(0.1):
                return


def measure(url: str, pid: int, inputs: dict[str, tuple[bytes, int]]) -> list[dict]:
    """Posts each input to /api/tavr/predict, polling /api/status meanwhile.

    Returns per request: HTTP status, seconds, RSS before / peak during / after (MB), and the
    slowest /api/status answer during the request (s).
    """
    # Warm-up: a small frame, so the first row does not pay for loading and one compile.
    warm = {"media": ("f.png", png_bytes(ramps(1, 64)[0]))}
    httpx.post(url + "/api/tavr/predict", files=warm, timeout=600).raise_for_status()
    rows = []
    for name, (data, _) in inputs.items():
        before = rss_mb(pid, "VmRSS")
        pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        stop, status_s = threading.Event(), []
        poller = threading.Thread(target=_poll_status, args=(url, stop, status_s))
        poller.start()
        t0 = time.perf_counter()
        try:
            r = httpx.post(url + "/api/tavr/predict", files={"media": ("x", data)}, timeout=600)
        finally:
            seconds = time.perf_counter() - t0
            stop.set()
            poller.join()
        rows.append({
            "name": name, "upload_mb": len(data) / 2**20, "status": r.status_code,
            "seconds": seconds, "before": before,
            "peak": rss_mb(pid, "VmHWM"), "after": rss_mb(pid, "VmRSS"),
            "status_max_s": max(status_s),
            "error": r.json().get("error") if r.status_code != 200 else None,
        })  # fmt: skip
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| request | upload MB | HTTP | s | RSS before MB | peak MB | after MB | "
        "slowest /api/status s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['upload_mb']:.1f} | {r['status']} | {r['seconds']:.1f} | "
            f"{r['before']:.0f} | {r['peak']:.0f} | {r['after']:.0f} | {r['status_max_s']:.3f} |"
        )
    return "\n".join(lines)


def run(backbone: str, image_size: int, batch_size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = large_inputs(tmp)
        with server_process(backbone, image_size, batch_size) as (url, pid):
            return measure(url, pid, inputs)
