"""Atomic file writes: a reader sees the old file or the complete new one, never half of it.

Every writer of the project goes through here, so a kill mid-write loses nothing written before.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any


def atomic_write_with(path: os.PathLike, write: Callable[[str], Any]) -> pathlib.Path:
    """Calls `write(tmp_path)` (e.g. cv2.imwrite, np.savez) and renames the result to `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: os.PathLike, data: bytes) -> pathlib.Path:
    return atomic_write_with(path, lambda tmp: pathlib.Path(tmp).write_bytes(data))


def write_json_atomic(path: os.PathLike, obj: Any, *, indent: int = 1, **kwargs) -> pathlib.Path:
    """Writes `obj` as JSON (json.dumps keyword arguments pass through)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=indent, **kwargs) + "\n").encode())
