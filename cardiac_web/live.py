"""The Live tab: one live session at a time on a frame source, watched over a WebSocket.

A session (`tavr_jax.infer.live.LiveSession`) reads, infers and draws in its own threads;
these routes only start, stop and watch it, so the rest of the server keeps answering.

  GET  /api/live/status  whether a session can run (engine, sources), the replay files, the
                         current (or last) session: source, stats, watchers, why it ended
  POST /api/live/start   JSON {source, replay_fps, mm_per_px, target_depth_mm: "LO,HI",
                         stage_prior}; 409 "source busy" while a session runs
  POST /api/live/stop    ends the current session (idempotent)
  WS   /api/live/ws      server -> client: {"type": "hello", "server_ms"} at connect; per newly
                         processed frame one text message {"type": "frame", "session", "seq",
                         "source", "record", "stats", "arrival_ms", "server_ms"} followed at
                         once by one binary message, the overlay JPEG; {"type": "stats", ...}
                         once a second while no frame comes (no signal, ended); {"type":
                         "idle"} every 2 s without a session. Client -> server: {"type":
                         "ping", "t": ms} is answered by {"type": "pong", "t", "server_ms"},
                         so the page can measure its clock's offset from the server's.

A watcher always gets the newest frame: a slow client skips frames, it never queues them.
Times (`arrival_ms`, `server_ms`) are the server's wall clock in ms since the epoch.

Sources: a path relative to (and resolved inside) the replay folder (`--live_dir`): a video,
a DICOM cine or a folder of images, replayed at its own rate; or an entry of the allowlist
(`--live_sources`: `device:0`, `rtsp://host/x`, a trailing `*` allows a prefix). Nothing else
is opened, and no server path is sent back.

A session ends on POST /api/live/stop, at the end of a replay, after `max_seconds`, when the
server shuts down, or once no WebSocket client has watched it for `idle_stop_s` (30 s): a
closed tab never leaves a camera running. One client disconnecting ends nothing for others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import pathlib
import re
import threading
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field

from cardiac_web.guards import BadInput, one_line
from tavr_jax.infer.guidance import STAGES

REPLAY_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v",
                   ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".webp", ".dcm")
MAX_REPLAY_FILES = 200  # names listed for the page's datalist
START_WAIT_S = 2.0  # how long a start waits for the first frame (or an error) before answering
WAIT_STEP_S = 0.5  # one wait for a newer frame, in a worker thread
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # device:0, rtsp://, http://, file:...


@dataclasses.dataclass
class LiveOptions:
    """What the Live tab may open; each is a flag of experiments/serve.py."""

    replay_dir: str | pathlib.Path | None = None  # --live_dir: files replayed from here only
    sources: tuple[str, ...] = ()  # --live_sources: devices and URLs (trailing * = prefix)
    idle_stop_s: float = 30.0  # a session nobody has watched this long is stopped
    max_seconds: float | None = None  # a session's longest run (None: no limit)
    max_watchers: int = 8  # WebSocket clients at once

    def __post_init__(self):
        self.sources = tuple(s.strip() for s in self.sources if s and s.strip())
        if not self.idle_stop_s > 0 or self.max_watchers < 1:
            raise ValueError("idle_stop_s must be > 0 and max_watchers >= 1")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.replay_dir is not None:
            self.replay_dir = pathlib.Path(self.replay_dir).resolve()
            if not self.replay_dir.is_dir():
                raise ValueError(f"live replay folder {self.replay_dir} is not a folder")

    def allows(self, source: str) -> bool:
        return any(source == s or (s.endswith("*") and source.startswith(s[:-1]))
                   for s in self.sources)  # fmt: skip

    def resolve(self, source: str) -> str:
        """What the session opens for the page's `source`; BadInput when it is not allowed."""
        if not source or any(ord(c) < 32 for c in source):
            raise BadInput("source: empty or holds control characters", 400)
        if _SCHEME.match(source):  # a device or a URL: only what the allowlist names
            if self.allows(source):
                return source
            allowed = ", ".join(self.sources) or "none"
            raise BadInput(f"source not allowed: {source!r} (allowed: {allowed}; "
                           "start the server with --live_sources)", 403)  # fmt: skip
        if self.replay_dir is None:
            raise BadInput(f"source not allowed: {source!r} (file replay is off; start the "
                           "server with --live_dir=FOLDER)", 403)  # fmt: skip
        path = (self.replay_dir / source).resolve()  # symlinks and .. resolved first
        if not path.is_relative_to(self.replay_dir):
            raise BadInput(f"source not allowed: {source!r} is outside the replay folder "
                           "(--live_dir)", 403)  # fmt: skip
        if not path.exists():
            raise BadInput(f"no such replay source: {source!r}", 404)
        return str(path)

    def replay_files(self) -> list[str]:
        """Names (relative to the replay folder) of its files and image folders."""
        if self.replay_dir is None:
            return []
        names = []
        for p in sorted(self.replay_dir.iterdir()):
            if len(names) >= MAX_REPLAY_FILES:
                break
            if p.is_file() and p.suffix.lower() in REPLAY_SUFFIXES:
                names.append(p.name)
            elif p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()):
                names.append(p.name + "/")
        return names


def parse_target(text: str | None) -> tuple[float, float] | None:
    """'LO,HI' (or 'LO-HI') in mm -> (lo, hi); None or '' -> None."""
    if text is None or not text.strip():
        return None
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d*)?)\s*(?:,|-|–|\.\.)\s*(-?\d+(?:\.\d*)?)\s*", text)
    if m is None or not float(m.group(1)) <= float(m.group(2)):
        raise BadInput(f"target_depth_mm: expected 'LO,HI' in mm with LO <= HI, got {text!r}", 422)
    return float(m.group(1)), float(m.group(2))


class LiveStart(BaseModel):
    source: str = Field(max_length=1000)
    replay_fps: float | None = Field(None, gt=0, le=240)
    mm_per_px: float | None = Field(None, gt=0, le=10)
    target_depth_mm: str | None = Field(None, max_length=40)
    stage_prior: str | None = Field(None, max_length=200)


def clean(x):
    """JSON-safe copy: numpy scalars and arrays as Python numbers, NaN and inf as null."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return clean(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def dumps(message: dict) -> str:
    return json.dumps(clean(message), separators=(",", ":"), allow_nan=False)


def now_ms() -> float:
    return time.time() * 1000.0


def arrival_ms(record: dict, stats: dict) -> float | None:
    """A record's arrival on the server's wall clock (ms). The session times frames in seconds
    since its start (`arrival_s`), and `stats()["elapsed_s"]` is that clock now."""
    arrival, elapsed = record.get("arrival_s"), stats.get("elapsed_s")
    if arrival is None or elapsed is None:
        return None
    return now_ms() - (float(elapsed) - float(arrival)) * 1000.0


class LiveHub:
    """The one live session (current or last) and the WebSocket clients watching it."""

    def __init__(self, engine, options: LiveOptions):
        self.engine = engine
        self.options = options
        self._lock = threading.Lock()
        self.session = None
        self.session_id = 0
        self.source = None  # as the page named it (never a server path)
        self.ended_by = None
        self._starting = False
        self.watchers = 0
        self._unwatched_since = time.monotonic()
        # waits for frames, starts and stops: never on the event loop, never unbounded
        self.pool = concurrent.futures.ThreadPoolExecutor(
            options.max_watchers + 2, thread_name_prefix="cardiac-web-live"
        )

    def current(self):
        with self._lock:
            return self.session_id, self.session

    def claim(self, source: str) -> None:
        with self._lock:
            if self._starting or (self.session is not None and self.session.running):
                raise BadInput(f"source busy: a live session on {self.source!r} is running; "
                               "stop it first", 409)  # fmt: skip
            self._starting = True

    def open(self, resolved: str, source: str, params: dict):
        """Worker thread: start a session, wait for its first frame or its error."""
        from tavr_jax.infer.live import LiveSession

        try:
            session = LiveSession(self.engine, resolved, max_seconds=self.options.max_seconds,
                                  **params)  # fmt: skip
            session.start()
        except (OSError, ValueError, RuntimeError) as e:
            message = self._named(f"cannot open source {source!r}: {e}", resolved, source)
            raise BadInput(message) from None
        deadline = time.monotonic() + START_WAIT_S
        while session.latest() is None and session.running and time.monotonic() < deadline:
            time.sleep(0.02)
        status = str(session.stats().get("status", ""))
        if status.startswith("error") or (not session.running and session.latest() is None):
            session.stop()
            why = status.removeprefix("error:").strip() or "no frame could be read"
            raise BadInput(self._named(f"cannot open source {source!r}: {why}", resolved, source))
        with self._lock:
            self.session, self.source, self.ended_by = session, source, None
            self.session_id += 1
            self._unwatched_since = time.monotonic()
        threading.Thread(target=self._reap, args=(session,), daemon=True,
                         name="cardiac-web-live-reaper").start()  # fmt: skip
        return session

    def _named(self, message: str, resolved: str, source: str) -> str:
        # the library names the file it failed on: show the page's name, not the server path
        message = message.replace(resolved, source)
        if self.options.replay_dir is not None:
            message = message.replace(str(self.options.replay_dir), "<replay folder>")
        return one_line(message)

    def release(self) -> None:
        with self._lock:
            self._starting = False

    def _reap(self, session) -> None:
        """Stops `session` once nobody has watched it for idle_stop_s."""
        while session.running:
            time.sleep(0.25)
            with self._lock:
                unwatched_s = time.monotonic() - self._unwatched_since
                idle = self.watchers == 0 and unwatched_s > self.options.idle_stop_s
                if idle and session is self.session:
                    self.ended_by = f"nobody watched for {self.options.idle_stop_s:g} s"
            if idle:
                session.stop()
                return

    def stop(self, why: str = "stopped") -> bool:
        with self._lock:
            session = self.session
            if session is None or not session.running:
                return False
            self.ended_by = why
        session.stop()
        return True

    def watch(self, delta: int) -> bool:
        with self._lock:
            if delta > 0 and self.watchers >= self.options.max_watchers:
                return False
            self.watchers += delta
            if self.watchers == 0:
                self._unwatched_since = time.monotonic()
            return True

    def describe(self) -> dict | None:
        with self._lock:
            session, sid, source, ended_by = (self.session, self.session_id, self.source,
                                              self.ended_by)  # fmt: skip
            watchers = self.watchers
        if session is None:
            return None
        stats = session.stats()
        running = session.running
        if not running and ended_by is None:
            ended_by = stats.get("end_reason") or stats.get("status")
        return {"id": sid, "source": source, "running": running, "stats": stats,
                "watchers": watchers, "ended_by": None if running else ended_by}  # fmt: skip


def live_router(engine, options: LiveOptions | None = None, *, engine_error: str | None = None):
    """The Live tab's routes over `engine` (None: the tab says why, from `engine_error`)."""
    options = options or LiveOptions()
    hub = LiveHub(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        hub.stop("server shut down")

    router = APIRouter(lifespan=lifespan)
    router.hub = hub  # tests and scripts reach the session through it

    def unavailable() -> str | None:
        if engine is None:
            return engine_error or "no TAVR model: start the server with --tavr_workdir=W"
        if options.replay_dir is None and not options.sources:
            return "no live source configured: start the server with --live_dir or --live_sources"
        return None

    @router.get("/api/live/status")
    def live_status():
        return clean({
            "available": unavailable() is None,
            "error": unavailable(),
            "replay_files": options.replay_files(),
            "sources": list(options.sources),
            "idle_stop_s": options.idle_stop_s,
            "stages": list(STAGES),
            "session": hub.describe(),
        })  # fmt: skip

    @router.post("/api/live/start")
    async def live_start(body: LiveStart):
        why = unavailable()
        if why is not None:
            raise BadInput(why, 503)
        source = body.source.strip()
        resolved = options.resolve(source)
        stage = (body.stage_prior or "").strip() or None
        if stage is not None and stage not in STAGES:
            raise BadInput(f"stage_prior: expected one of {', '.join(STAGES)} (or none), "
                           f"got {stage!r}", 422)  # fmt: skip
        params = {"replay_fps": body.replay_fps, "mm_per_px": body.mm_per_px,
                  "target_depth_mm": parse_target(body.target_depth_mm),
                  "stage_prior": stage}  # fmt: skip
        hub.claim(source)
        try:
            await asyncio.get_running_loop().run_in_executor(
                hub.pool, hub.open, resolved, source, params
            )
        finally:
            hub.release()
        return {"started": True, "session": clean(hub.describe())}

    @router.post("/api/live/stop")
    async def live_stop():
        stopped = await asyncio.get_running_loop().run_in_executor(hub.pool, hub.stop)
        return {"stopped": stopped, "session": clean(hub.describe())}

    @router.websocket("/api/live/ws")
    async def live_ws(ws: WebSocket):
        await ws.accept()
        if not hub.watch(+1):
            error = f"too many live watchers ({options.max_watchers}); close another tab"
            await ws.send_text(dumps({"type": "error", "error": error}))
            await ws.close(code=1013)
            return
        try:
            await _serve_watcher(ws, hub)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away mid-send: nothing to clean up but the count
        finally:
            hub.watch(-1)

    return router


async def _serve_watcher(ws: WebSocket, hub: LiveHub) -> None:
    loop = asyncio.get_running_loop()
    send_lock = asyncio.Lock()  # a frame's JSON and its JPEG go out back to back

    async def send(message: dict, jpeg: bytes | None = None):
        async with send_lock:
            await ws.send_text(dumps({**message, "server_ms": now_ms()}))
            if jpeg is not None:
                await ws.send_bytes(jpeg)

    async def receive():
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                request = json.loads(message.get("text") or "{}")
            except ValueError:
                continue
            if isinstance(request, dict) and request.get("type") == "ping":
                await send({"type": "pong", "t": request.get("t")})

    receiver = asyncio.create_task(receive())
    try:
        await send({"type": "hello"})
        shown_id, seq, last_sent = None, -1, 0.0
        while not receiver.done():
            sid, session = hub.current()
            if session is None:
                if time.monotonic() - last_sent >= 2.0:
                    await send({"type": "idle"})
                    last_sent = time.monotonic()
                await asyncio.wait({receiver}, timeout=WAIT_STEP_S)
                continue
            if sid != shown_id:
                shown_id, seq = sid, -1
            waiting = loop.run_in_executor(hub.pool, session.wait_newer, seq, WAIT_STEP_S)
            done, _ = await asyncio.wait({receiver, waiting}, return_when="FIRST_COMPLETED")
            if receiver in done:
                break
            item = waiting.result()
            if item is not None:
                seq, record, jpeg = item
                stats = session.stats()
                await send({"type": "frame", "session": sid, "seq": seq, "source": hub.source,
                            "record": record, "stats": stats,
                            "arrival_ms": arrival_ms(record, stats)}, jpeg)  # fmt: skip
                last_sent = time.monotonic()
                continue
            if time.monotonic() - last_sent >= 1.0:
                await send({"type": "stats", "session": sid, "source": hub.source,
                            "running": session.running, "stats": session.stats(),
                            "ended_by": (hub.describe() or {}).get("ended_by")})  # fmt: skip
                last_sent = time.monotonic()
            if not session.running:  # an ended session answers at once: don't spin
                await asyncio.wait({receiver}, timeout=WAIT_STEP_S)
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
            await receiver
