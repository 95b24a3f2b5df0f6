"""What keeps the server up under any single request: limits, one-line errors, a bounded pool.

- `Limits`: every bound the server enforces (upload bytes, pixels, frames, heavy requests).
- `BodyLimit`: ASGI middleware counting request-body bytes as they stream in, so a chunked
  upload is cut off at the limit instead of being spooled to disk in full first.
- `HeavyWork`: decoding, inference and analysis run in worker threads, never on the event
  loop, at most `max_heavy` at once, so `/api/status` and the page stay responsive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import re
import threading
import time

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

MiB = 1 << 20
# Room for the multipart framing (boundaries, part headers) around the uploaded files.
FORM_OVERHEAD_BYTES = 64 * 1024


try:  # glibc: hands freed heap pages back to the OS
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # another C library: nothing to trim
    _malloc_trim = None


class BadInput(Exception):
    """A client error: answered as {"error": message} with `status`."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(one_line(message))
        self.status = status


def one_line(text: str, *, max_chars: int = 300) -> str:
    """Collapses whitespace and cuts long messages (decoder errors can span many lines)."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


@dataclasses.dataclass
class Limits:
    """Server-side bounds; each is a flag of experiments/serve.py."""

    max_upload_mb: float = 64.0  # the whole request body (all files of one form together)
    max_pixels: int = 4096 * 4096  # one image or frame, read from its header before decoding
    max_frames: int = 300  # frames of a video/cine decoded and returned to the page
    max_total_pixels: int = 256 * MiB  # all decoded frames of one request (bytes as uint8)
    max_heavy: int = 2  # requests decoding or running a model at the same time
    busy_wait_s: float = 5.0  # a request beyond max_heavy waits this long, then gets 503
    cached_results: int = 8  # TAVR results kept for re-gating (outputs only, no frames)

    def __post_init__(self):
        for name in ("max_upload_mb", "max_pixels", "max_frames", "max_total_pixels", "max_heavy"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.busy_wait_s < 0 or self.cached_results < 1:
            raise ValueError("busy_wait_s must be >= 0 and cached_results >= 1")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_upload_mb * MiB) + FORM_OVERHEAD_BYTES

    def too_large_message(self) -> str:
        return f"upload larger than {self.max_upload_mb:g} MiB (--max_upload_mb)"


class BodyLimit:
    """ASGI middleware: answers 413 once a request body passes `limits.max_body_bytes`.

    A declared Content-Length over the limit is refused before any byte is read. Otherwise
    the bytes are counted as the app pulls them, and the pull that crosses the limit raises
    BadInput(413) instead of handing the app more: nothing past the limit is read, spooled
    to a temporary file or parsed, whether or not the client declared a length.
    """

    def __init__(self, app, limits: Limits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.limits.max_body_bytes
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            response = JSONResponse({"error": self.limits.too_large_message()}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BadInput(self.limits.too_large_message(), 413)
            return message

        await self.app(scope, counted_receive, send)


class HeavyWork:
    """Runs CPU-heavy request work in worker threads, at most `slots` jobs at once.

    A request that finds every slot taken polls for `wait_s`, then gets 503. The worker thread
    frees its slot when the job ends, not when the request does, so clients that hang up
    cannot push the number of running jobs past the bound.
    """

    def __init__(self, slots: int, wait_s: float):
        self.slots = int(slots)
        self.wait_s = float(wait_s)
        self._free = threading.BoundedSemaphore(self.slots)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.slots, thread_name_prefix="cardiac-web-heavy"
        )

    async def run(self, fn, *args):
        """fn(*args) in a worker thread; raises BadInput(503) when no slot frees up in time."""
        deadline = time.monotonic() + self.wait_s
        # A threading semaphore polled from the loop: it works across event loops (tests run
        # the app in several), and the release happens in the worker thread.
        while not self._free.acquire(blocking=False):
            if time.monotonic() >= deadline:
                raise BadInput(
                    f"server busy: {self.slots} heavy request(s) already running "
                    "(--max_heavy); try again shortly",
                    503,
                )
            await asyncio.sleep(0.02)

        def job():
            try:
                return fn(*args)
            finally:
                # glibc keeps a heavy job's freed frames in its thread's arena; without the
                # trim the server's resident size ratchets up to the largest request so far.
                if _malloc_trim is not None:
                    _malloc_trim(0)
                self._free.release()

        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, job)
        except BaseException:
            self._free.release()
            raise
        return await future
