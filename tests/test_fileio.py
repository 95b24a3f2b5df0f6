"""Atomic writes: an interrupted write keeps the old content and leaves no temporary file."""

import json
import stat

import pytest

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
