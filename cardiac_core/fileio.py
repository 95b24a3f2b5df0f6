"""Atomic file writes: a reader sees the old file or the complete new one, never half of it.

Every writer of the project goes through here, so a kill mid-write loses nothing written before.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

from cardiac_core import tempfiles


class AtomicFile:
    """A file written in pieces (a stream of records, a video) that appears at `path` whole.

    Write to `tmp` (beside `path`, same suffix, so writers that pick a format by suffix
    work), then `commit()` renames it into place; `abort()` deletes it. The temporary is
    named with the writer's PID, so a later run can remove what a killed one left
    (`tempfiles.remove_stale`).
    """

    def __init__(self, path: os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tempfiles.make_temp(self.path.parent, self.path.stem, self.path.suffix)

    def commit(self) -> pathlib.Path:
        os.chmod(self.tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


def atomic_write_with(path: os.PathLike, write: Callable[[str], Any]) -> pathlib.Path:
    """Calls `write(tmp_path)` (e.g. cv2.imwrite, np.savez) and renames the result to `path`."""
    f = AtomicFile(path)
    try:
        write(str(f.tmp))
        return f.commit()
    except BaseException:
        f.abort()
        raise


def atomic_write_bytes(path: os.PathLike, data: bytes) -> pathlib.Path:
    return atomic_write_with(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def write_json_atomic(path: os.PathLike, obj: Any, *, indent: int = 1, **kwargs) -> pathlib.Path:
    """Writes `obj` as JSON (json.dumps keyword arguments pass through)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=indent, **kwargs) + "\n").encode())
