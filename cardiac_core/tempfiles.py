"""Hidden temporaries named with the writer's PID, and the removal of those a killed run left.

A run writes its outputs under temporary names beside them and renames them at the end
(`cardiac_core.fileio`). A SIGKILL skips every clean-up, so the temporary stays; naming it
`.<stem>.<pid>.<random><suffix>` lets a later run tell a leftover (its PID is dead) from the
temporary of a run still writing (its PID is alive: left alone). A PID reused by an unrelated
process only delays the removal.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import tempfile

_RANDOM = r"[a-z0-9_]{6,}"  # tempfile's random part (8 characters today)


def pid_prefix(stem: str) -> str:
    return f".{stem}.{os.getpid()}."


def make_temp(folder: os.PathLike, stem: str, suffix: str = "") -> pathlib.Path:
    """An empty file `.<stem>.<pid>.<random><suffix>` in `folder`."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=pid_prefix(stem), suffix=suffix)
    os.close(fd)
    return pathlib.Path(tmp)


def make_temp_dir(folder: os.PathLike, stem: str) -> pathlib.Path:
    """An empty folder `.<stem>.<pid>.<random>` in `folder`."""
    return pathlib.Path(tempfile.mkdtemp(dir=folder, prefix=pid_prefix(stem)))


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(
    folder: os.PathLike, stems=None, suffix: str | None = None, *, what: str = "temporaries"
) -> list[pathlib.Path]:
    """Removes `.<stem>.<pid>.<random><suffix>` files and folders of dead PIDs in `folder`.

    `stems`: the stems to match (None: any); `suffix`: the suffix (None: any or none).
    Logs one info line when it removed something; a leftover it cannot remove (a read-only
    folder) is left, as it harms nothing. Returns what it removed.
    """
    folder = pathlib.Path(folder)
    stem_re = ".+?" if stems is None else "|".join(re.escape(s) for s in stems)
    suffix_re = r"(\.[^.]+)?" if suffix is None else re.escape(suffix)
    pattern = re.compile(rf"\.(?:{stem_re})\.(\d+)\.{_RANDOM}{suffix_re}")
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for path in entries:
        m = pattern.fullmatch(path.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    if removed:
        logging.info(
            "%s: removed %d %s left by killed runs (%s)",
            folder, len(removed), what, ", ".join(p.name for p in removed[:3])
            + (", ..." if len(removed) > 3 else ""),
        )  # fmt: skip
    return removed
