"""The workdir lock: a second writer stops at once naming the first; stale locks (a killed
holder, a reused PID) are taken over with one warning; released however the holder ends."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tavr_jax.run import lock
from tavr_jax.run.lock import WorkdirLock, WorkdirLocked

HOLD = (
    "import sys, time\n"
    "from tavr_jax.run.lock import WorkdirLock\n"
    "WorkdirLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def holder(tmp_path):
    """A process holding tmp_path/w's lock; killed (SIGKILL) at the end if still alive."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "w")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_second_writer_fails_at_once_naming_the_holder(tmp_path, holder):
    start = time.monotonic()
    with pytest.raises(WorkdirLocked) as err:
        WorkdirLock(tmp_path / "w").acquire()
    message = str(err.value)
    assert time.monotonic() - start < 5
    assert f"PID {holder.pid}" in message and f"host {socket.gethostname()}" in message
    assert "started 20" in message and "\n" not in message


def test_a_killed_holders_lock_is_taken_over_with_one_warning(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / "w" / lock.LOCK_FILE).exists()  # SIGKILL leaves the file behind
    with caplog.at_level(logging.WARNING):
        with WorkdirLock(tmp_path / "w") as held:
            assert held.held
            info = json.loads((tmp_path / "w" / lock.LOCK_FILE).read_text())
            assert info["pid"] == os.getpid()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"PID {holder.pid}" in warnings[0].getMessage()
    assert "stale" in warnings[0].getMessage()
    assert not (tmp_path / "w" / lock.LOCK_FILE).exists()


def test_released_after_a_normal_exit_and_after_an_exception(tmp_path):
    with WorkdirLock(tmp_path):
        assert (tmp_path / lock.LOCK_FILE).exists()
    assert not (tmp_path / lock.LOCK_FILE).exists()
    with pytest.raises(ZeroDivisionError):
        with WorkdirLock(tmp_path):
            1 / 0  # noqa: B018
    assert not (tmp_path / lock.LOCK_FILE).exists()
    WorkdirLock(tmp_path).acquire().release()  # free again


def _record(path, **info):
    path.mkdir(parents=True, exist_ok=True)
    base = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}
    (path / lock.LOCK_FILE).write_text(json.dumps({**base, **info}))


def test_without_flock_the_recorded_holder_decides(tmp_path, holder, monkeypatch, caplog):
    # Filesystems without flock (some network mounts): PID, process start time and host.
    monkeypatch.setattr(lock, "fcntl", None)
    w = tmp_path / "nofl"
    _record(w, pid=holder.pid, process_start=lock._process_start(holder.pid))
    with pytest.raises(WorkdirLocked, match=f"PID {holder.pid} on host"):
        WorkdirLock(w).acquire()
    # The same PID, started at another time: the PID was reused, the holder is gone.
    _record(w, pid=holder.pid, process_start=lock._process_start(holder.pid) - 1000)
    with caplog.at_level(logging.WARNING), WorkdirLock(w):
        pass
    assert "its PID now belongs to another process" in caplog.text
    # A dead PID on this host is stale; a holder on another host is refused.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout  # fmt: skip
    _record(w, pid=int(dead))
    with WorkdirLock(w):
        pass
    _record(w, pid=holder.pid, host="elsewhere")
    with pytest.raises(WorkdirLocked, match="host elsewhere.*if that run is gone, delete"):
        WorkdirLock(w).acquire()


def test_an_unwritable_workdir_is_one_line(tmp_path, monkeypatch):
    import errno

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(lock.os, "open", refuse)
    with pytest.raises(lock.WriteError) as err:
        WorkdirLock(tmp_path).acquire()
    assert str(err.value) == f"{tmp_path / lock.LOCK_FILE}: cannot create the lock file " + (
        "(read-only file system)"
    )
    assert err.value.errno == errno.EROFS
