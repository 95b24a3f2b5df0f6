"""One writer per workdir: `W/lock.json`, held for the whole of a training run.

Two runs writing the same workdir corrupt each other's checkpoints (orbax renames one run's
step over the other's) and can hang; the second run must stop at once instead, naming the
first. The lock is an advisory `fcntl.flock` on `W/lock.json`, whose contents say who holds it:

    {"pid": 4242, "host": "node7", "started": "2026-12-06T07:41:12", "process_start": 1.7e9}

- The kernel drops a flock when its process dies, however it dies (SIGKILL included), so a
  lock file left by a killed run is taken over at the next start with one warning line.
- On a filesystem without flock (some network mounts) the contents decide: a holder on this
  host whose PID is gone, or reused by a later process (its start time differs), is stale;
  a holder on another host is refused (only a person can tell whether it still runs).
- A holder on another host of a shared filesystem whose flock did not reach us is refused
  the same way, with the path to delete when that run is known to be gone.

Release (normal exit or an exception, `with WorkdirLock(w):`) deletes the file. A run that
ends by SIGKILL leaves it behind, which is harmless: see above.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import pathlib
import socket

try:
    import fcntl
except ImportError:  # not POSIX: the contents alone decide
    fcntl = None

try:
    import psutil
except ImportError:  # a dependency, but the lock must not fail without it
    psutil = None

from cardiac_core.logs import os_error_cause
from cardiac_core.tempfiles import pid_alive

LOCK_FILE = "lock.json"
# errno values meaning "this filesystem does not do flock": fall back to the contents.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirLocked(RuntimeError):
    """Another live process holds the workdir's lock (one line naming it)."""


class WriteError(OSError):
    """A write the user must make possible (read-only filesystem, disk full): one line naming
    the path and the cause, the errno kept for callers that test it."""

    def __str__(self) -> str:
        return str(self.strerror)


def _process_start(pid: int) -> float | None:
    """The process's start time (seconds since the epoch), None when unknown or gone."""
    if psutil is None:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def _describe(info: dict) -> str:
    return (
        f"PID {info.get('pid', '?')} on host {info.get('host', '?')} "
        f"(started {info.get('started', '?')})"
    )


def _read(fd: int) -> dict:
    """The holder record in the open lock file; {} when empty or unreadable (torn write)."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        info = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _stale_reason(info: dict) -> str | None:
    """Why a holder on this host is gone, or None when it may still run."""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "no valid PID recorded"
    if not pid_alive(pid):
        return "no longer running"
    recorded, now = info.get("process_start"), _process_start(pid)
    if isinstance(recorded, (int, float)) and now is not None and abs(now - recorded) > 1.0:
        return "its PID now belongs to another process"
    return None


class WorkdirLock:
    """The exclusive writer's lock of one workdir.

    Args:
      workdir: the workdir (created when missing).
      what: what the holder does, shown to a second writer (e.g. "training").

    `acquire()` raises WorkdirLocked (one line: the holder's PID, host and start time) when
    another live process holds it, and OSError (one line naming the path and the cause, e.g.
    read-only or disk full) when the workdir cannot be written at all.
    """

    def __init__(self, workdir: str | os.PathLike, *, what: str = "training"):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WorkdirLock:
        if self._fd is not None:
            return self
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.workdir, e, "cannot create the workdir") from None
        for _ in range(10):  # retried only when a releasing holder unlinks the file under us
            fd = self._open()
            try:
                locked = self._flock(fd)
                if locked and not self._same_file(fd):
                    os.close(fd)
                    continue
                self._claim(fd, flocked=locked)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise WorkdirLocked(f"{self.path}: the lock file keeps changing; is another run starting?")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.path, e, "cannot create the lock file") from None

    def _flock(self, fd: int) -> bool:
        """True when flock holds it now; False when this filesystem has no flock."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            info = _read(fd)
            raise WorkdirLocked(
                f"{self.workdir}: in use by another {info.get('what', 'run')}: {_describe(info)}; "
                f"wait for it to end or use another --workdir"
            ) from None
        except OSError as e:
            if e.errno in _NO_FLOCK:
                return False
            raise write_error(self.path, e, "cannot lock") from None

    def _same_file(self, fd: int) -> bool:
        # A holder releasing between our open and our flock unlinks the file we locked.
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _claim(self, fd: int, *, flocked: bool) -> None:
        info = _read(fd)
        here = info.get("host") == socket.gethostname()
        if info and not (here and info.get("pid") == os.getpid()):
            reason = "its flock was released" if flocked else _stale_reason(info)
            if not here or reason is None:
                # Another host's holder (its flock may not reach us), or a live one here on a
                # filesystem without flock: only a person can tell it is gone.
                raise WorkdirLocked(
                    f"{self.workdir}: in use by another {info.get('what', 'run')}: "
                    f"{_describe(info)}; if that run is gone, delete {self.path}"
                )
            if not flocked and not self._take_over_atomically(fd):
                raise WorkdirLocked(f"{self.path}: another process took this stale lock first")
            logging.warning(
                "%s: taking over the stale lock of %s (%s; killed?)",
                self.path,
                _describe(info),
                "no longer running" if flocked else reason,
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "process_start": _process_start(os.getpid()),
            "what": self.what,
        }
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        except OSError as e:
            raise write_error(self.path, e, "cannot write the lock file") from None

    def _take_over_atomically(self, fd: int) -> bool:
        # Without flock two starters may both find the stale holder; only one may win. Each
        # renames the file it read (same inode) to a unique name: the rename of the loser
        # finds nothing, or a file other than the one it read.
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        ok = os.path.samestat(os.fstat(fd), os.stat(aside))
        if ok:
            aside.unlink(missing_ok=True)
        else:
            os.rename(aside, self.path)  # put back what we did not read
        return ok

    def release(self) -> None:
        """Deletes the lock file and drops the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Unlink while still holding the flock: a starter that opened the old file sees
            # it was unlinked (`_same_file`) and retries on a fresh one.
            with contextlib.suppress(OSError):
                if self._same_file(fd):
                    self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# The errnos of a write the user must make possible (not a bug, not missing input).
WRITE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def writing(workdir: str | os.PathLike, *, lock: bool = True, what: str = "training"):
    """Holds the workdir's lock (when `lock`: one process of a multi-host run speaks for it)
    and turns a failed write inside (read-only, disk full) into one line naming the path."""
    with WorkdirLock(workdir, what=what) if lock else contextlib.nullcontext():
        try:
            yield
        except OSError as e:
            if isinstance(e, WriteError) or e.errno not in WRITE_ERRNOS:
                raise
            raise write_error(e.filename or workdir, e) from None


def write_error(path, e: OSError, doing: str = "cannot write") -> WriteError:
    """`e` as one line naming the path and the cause (its errno kept)."""
    if isinstance(e, WriteError):
        return e
    return WriteError(e.errno, f"{path}: {doing} ({os_error_cause(e)})")
