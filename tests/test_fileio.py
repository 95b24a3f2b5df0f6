"""Atomic writes: an interrupted write keeps the old content and leaves no temporary file."""

import json
import pathlib
import stat

import pytest

from cardiac_core import tempfiles
from cardiac_core.fileio import atomic_write_bytes, atomic_write_with, write_json_atomic


def test_write_replace_and_interrupted_write(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": 2, "trunc')
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(path, crash)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]
    atomic_write_bytes(path, b"{}")
    assert path.read_bytes() == b"{}"


def test_a_killed_writers_temporary_is_removed_by_the_next_run(tmp_path):
    """Every atomic write's temporary carries the writer's PID; a dead PID's is removed."""
    path = tmp_path / "thresholds.json"
    seen = []
    atomic_write_with(path, lambda tmp: (seen.append(tmp), open(tmp, "w").write("{}")))
    assert pathlib.Path(seen[0]).name.startswith(tempfiles.pid_prefix("thresholds"))
    dead = tmp_path / ".thresholds.999999999.abcdefgh.json"  # a PID no process has
    dead.write_text("{")
    assert tempfiles.remove_stale(tmp_path, ("thresholds",)) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thresholds.json"]
