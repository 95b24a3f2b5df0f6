"""Faults end in one line and a sound state: quiet launchers, full disks, read-only folders,
leftovers of killed runs, folders where files belong.

The tests run as root, so a read-only folder or a full disk is simulated in-process by making
the writer raise the OSError the kernel would (EROFS, ENOSPC); the launchers' exit codes and
printed lines are checked in subprocesses (one of them with the fault injected the same way).
"""

import errno
import logging
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
from _workdirs import TINY_CONFIG, write_tiny_checkpoint, write_tiny_project

from cardiac_core import logs, tempfiles
from tavr_jax.data import records
from tavr_jax.infer import outputs
from tavr_jax.infer.engine import KeypointEngine

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
ENV.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the launcher must quieten the C++ side itself


def _dead_pid() -> int:
    """A PID no process can have (above the kernel's maximum)."""
    try:
        return int(pathlib.Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2**22 + 1


def _frames(folder, n=3):
    folder.mkdir()
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i}.png"), np.full((40, 40), 60 * i, np.uint8))
    return folder


def _hidden(folder):
    return sorted(p.name for p in pathlib.Path(folder).rglob(".*"))


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def engine():
    return KeypointEngine.random_init("paper11", "resnet_tiny", 32, batch_size=2, seed=3)


@pytest.fixture
def restore_logging():
    """quiet_third_party changes process-wide logging: put it back after the test."""
    names = ["", *logs.THIRD_PARTY_LOGGERS]
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = {h: list(h.filters) for h in logging.getLogger().handlers}
    had_env = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    for h, filters in handlers.items():
        h.filters[:] = filters
    if had_env is None:
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
    else:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = had_env


# ----------------------------------------------------------------------------------------------
# Quiet by default


class _Flag:
    def __init__(self, value, present):
        self.value, self.present = value, present


def test_third_party_level_follows_verbosity_only_when_asked():
    assert logs.third_party_level(None) == logging.ERROR
    assert logs.third_party_level(_Flag(0, present=False)) == logging.ERROR  # absl's default
    assert logs.third_party_level(_Flag(0, present=True)) == logging.INFO
    assert logs.third_party_level(-1) == logging.WARNING
    assert logs.third_party_level(2) == logging.DEBUG


def test_quiet_drops_library_info_and_keeps_the_projects_lines(restore_logging):
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.name)

    handler = Keep()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logs.quiet_third_party(None)
        assert logging.getLogger("absl").getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() == logging.ERROR
        logger = logging.getLogger("some_unknown_library.module")
        logger.setLevel(logging.INFO)
        logger.warning("a library's warning")  # not a known logger: the handler filter drops it
        logger.error("a library's error")
        logging.getLogger("tavr_jax.infer.outputs").warning("the project's warning")
        logs.quiet_third_party(0)  # --verbosity=0: library INFO comes back
        logging.getLogger("absl").info("orbax says hello")
    finally:
        root.removeHandler(handler)
    assert seen == ["some_unknown_library.module", "tavr_jax.infer.outputs", "absl"]


def test_os_error_lines_name_the_path_and_the_cause():
    full = logs.os_error_line(OSError(errno.ENOSPC, "No space left on device"), "out/x.jsonl")
    assert full == "out/x.jsonl: disk full (No space left on device)"
    ro = logs.os_error_line(OSError(errno.EROFS, "Read-only file system", "/mnt/o"))
    assert ro == "/mnt/o: read-only file system"
    assert logs.os_error_line(FileNotFoundError("no such DICOM file: a.dcm"), "o") == (
        "no such DICOM file: a.dcm"
    )


def _run_launcher(script: str) -> subprocess.CompletedProcess:
    """`script` (a launcher run with some writes made to fail) as its own process."""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)  # fmt: skip


def _other_lines(run) -> list[str]:
    """Printed lines that are neither tqdm progress nor the result."""
    text = (run.stdout + run.stderr).replace("\r", "\n")
    return [
        line
        for line in text.splitlines()
        if line.strip() and not line.startswith("infer:") and " frames (folder) -> " not in line
    ]


def test_infer_launcher_is_quiet_and_removes_leftovers_of_killed_runs(tmp_path):
    write_tiny_checkpoint(tmp_path / "w", TINY_CONFIG)
    frames = _frames(tmp_path / "frames")
    out = tmp_path / "out"
    out.mkdir()
    dead, live = _dead_pid(), os.getpid()
    (out / f".predictions.{dead}.abcd1234.jsonl").write_text("half a run")
    (out / f".coco_keypoints.{dead}.zzzz_999.json").write_text("{")
    (out / f".predictions.{live}.abcd1234.jsonl").write_text("a live run's")
    (out / ".predictions.abcd1234.jsonl").write_text("no PID: not ours to judge")
    cmd = [sys.executable, "experiments/tavr_infer.py", f"--workdir={tmp_path / 'w'}",
           f"--input={frames}", f"--out={out}"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "3 frames (folder) -> " in run.stdout
    other = _other_lines(run)
    assert len(other) <= 3, other
    assert sum("removed 2 temporaries left by killed runs" in line for line in other) == 1
    assert _hidden(out) == sorted([f".predictions.{live}.abcd1234.jsonl",
                                   ".predictions.abcd1234.jsonl"])  # fmt: skip
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3

    # An --out below a file: one line, exit status 1, before the engine loads.
    (tmp_path / "a_file").write_text("x")
    cmd[-1] = f"--out={tmp_path / 'a_file' / 'sub'}"
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: --out {tmp_path / 'a_file' / 'sub'} lies under {tmp_path / 'a_file'}, which "
        "exists and is not a folder"
    ]


# ----------------------------------------------------------------------------------------------
# tavr_infer: a full disk, a read-only folder


def _fail_writes_to(monkeypatch, stem: str, err: int, after_bytes: int = 0):
    """Writes to the temporaries of `stem` fail with `err` once `after_bytes` went through."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > after_bytes:
                raise OSError(err, os.strerror(err))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return Full(f) if pathlib.Path(path).name.startswith(f".{stem}.") else f

    monkeypatch.setattr(outputs, "open", fake_open, raising=False)


@pytest.mark.parametrize("stem", ["predictions", "coco_keypoints", "img1"])
def test_a_full_disk_keeps_the_previous_outputs_and_no_temporaries(
    engine, tmp_path, monkeypatch, stem
):
    frames = _frames(tmp_path / "frames")
    out = tmp_path / "out"
    outputs.run_inference(engine, frames, out, overlay=True, progress=False)
    before = _snapshot(out)
    (frames / "img3.png").write_bytes((frames / "img0.png").read_bytes())  # a changed input
    _fail_writes_to(monkeypatch, stem, errno.ENOSPC, after_bytes=500)
    with pytest.raises(OSError) as info:
        outputs.run_inference(engine, frames, out, overlay=True, progress=False)
    line = logs.os_error_line(info.value)
    where = {"img1": out / "overlay" / "img1.png"}.get(stem, out / f"{stem}.json")
    if stem == "predictions":
        where = out / "predictions.jsonl"
    assert line == f"{where}: disk full (No space left on device)"
    # The predictions and COCO file are the previous run's, whole; overlays written before the
    # failure are complete files (each renamed into place), and no temporary is left.
    for name in ("predictions.jsonl", "coco_keypoints.json"):
        assert (out / name).read_bytes() == before[name]
    assert all((out / k).read_bytes() == v for k, v in before.items() if k.startswith("overlay"))
    assert _hidden(out) == []


def test_a_failed_pre_annotation_run_leaves_the_project_as_it_was(engine, tmp_path, monkeypatch):
    frames = _frames(tmp_path / "frames", n=5)
    out = tmp_path / "project"
    outputs.run_inference(engine, frames, out, format="supervisely", progress=False)
    before = _snapshot(out)
    assert "frames/img/img4.png" in before
    (frames / "img0.png").write_bytes((frames / "img2.png").read_bytes())  # a changed input
    real_add = outputs.supervisely.ProjectWriter.add

    def fail_at_the_fourth_frame(self, frame):
        if frame.frame_name == "img3.png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_add(self, frame)

    monkeypatch.setattr(outputs.supervisely.ProjectWriter, "add", fail_at_the_fourth_frame)
    with pytest.raises(OSError, match="No space left"):
        outputs.run_inference(engine, frames, out, format="supervisely", progress=False)
    assert _snapshot(out) == before and _hidden(out) == []  # no half case, no temporary
    monkeypatch.undo()
    # A run that completes replaces the case: a frame no longer in the input goes with it.
    (frames / "img4.png").unlink()
    outputs.run_inference(engine, frames, out, format="supervisely", progress=False)
    assert sorted(p.name for p in (out / "frames" / "img").iterdir()) == [
        f"img{i}.png" for i in range(4)
    ]
    assert _hidden(out) == []


def test_a_read_only_output_folder_is_one_line_and_changes_nothing(engine, tmp_path, monkeypatch):
    frames = _frames(tmp_path / "frames")
    out = tmp_path / "out"
    outputs.run_inference(engine, frames, out, progress=False)
    before = _snapshot(out)

    def read_only(folder, stem, suffix=""):
        path = pathlib.Path(folder) / f"{tempfiles.pid_prefix(stem)}x{suffix}"
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(tempfiles, "make_temp", read_only)
    with pytest.raises(OSError) as info:
        outputs.run_inference(engine, frames, out, progress=False)
    assert logs.os_error_line(info.value) == f"{out / 'predictions.jsonl'}: read-only file system"
    assert _snapshot(out) == before and _hidden(out) == []


def test_a_failed_video_run_leaves_no_overlay_video(engine, tmp_path, monkeypatch):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (48, 40), False)
    for i in range(4):
        writer.write(np.full((40, 48), 40 * i, np.uint8))
    writer.release()
    out = tmp_path / "out"
    _fail_writes_to(monkeypatch, "coco_keypoints", errno.ENOSPC)
    with pytest.raises(OSError, match="No space left"):
        outputs.run_inference(engine, video, out, overlay=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == []  # no video of a run that failed


def test_infer_launcher_on_a_full_disk_prints_one_line(tmp_path):
    write_tiny_checkpoint(tmp_path / "w", TINY_CONFIG)
    frames = _frames(tmp_path / "frames")
    out, workdir = tmp_path / "out", tmp_path / "w"
    # The launcher as its own process, with every write of predictions.jsonl failing.
    script = f"""
import errno, runpy, sys
from tavr_jax.infer import outputs
real_open = open
def full(path, *a, **k):
    if ".predictions." in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real_open(path, *a, **k)
outputs.open = full
sys.argv = ["tavr_infer.py", "--workdir={workdir}", "--input={frames}", "--out={out}"]
runpy.run_path("experiments/tavr_infer.py", run_name="__main__")
"""
    run = _run_launcher(script)
    assert run.returncode == 1
    lines = _other_lines(run)
    assert lines[-1] == f"error: {out / 'predictions.jsonl'}: disk full (No space left on device)"
    assert len(lines) <= 3 and not any("Traceback" in line for line in lines), lines
    assert _hidden(out) == [] and not (out / "predictions.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# build_tfds: a full disk, a read-only folder, leftovers of killed builds


@pytest.fixture
def project(tmp_path):
    return write_tiny_project(tmp_path / "data", cases=4)


def test_build_on_a_full_disk_keeps_the_previous_dataset(project, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    records.build_tfds(project, out, image_size=16, val_fraction=0.0)
    before = _snapshot(out)

    def full(path, options, chunk=256):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records, "_rewrite_array_record", full)
    with pytest.raises(OSError) as info:
        records.build_tfds(project, out, image_size=16, val_fraction=0.0)
    assert logs.os_error_line(info.value) == f"{out}: disk full (No space left on device)"
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ds"]  # no temporaries


def test_build_into_a_read_only_folder_is_one_line(project, tmp_path, monkeypatch):
    def read_only(folder, stem):
        raise OSError(errno.EROFS, "Read-only file system", f"{folder}/.{stem}.1.abcdefgh")

    monkeypatch.setattr(records, "make_temp_dir", read_only)
    with pytest.raises(OSError) as info:
        records.build_tfds(project, tmp_path / "ds", image_size=16, val_fraction=0.0)
    assert logs.os_error_line(info.value) == f"{tmp_path}: read-only file system"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_build_removes_the_temporary_folders_of_killed_builds(project, tmp_path, caplog):
    dead = tmp_path / f".ds.{_dead_pid()}.k1ll3d_x"
    (dead / "tavr_frames").mkdir(parents=True)
    (dead / "tavr_frames" / "shard").write_bytes(b"x" * 100)
    live = tmp_path / f".ds.{os.getpid()}.st1ll_on"
    live.mkdir()
    other = tmp_path / f".notes.{_dead_pid()}.abcdefgh"  # another name: not ours
    other.mkdir()
    with caplog.at_level(logging.INFO):
        records.build_tfds(project, tmp_path / "ds", image_size=16, val_fraction=0.0)
    assert not dead.exists() and live.exists() and other.exists()
    removed = [r.getMessage() for r in caplog.records if "left by killed runs" in r.getMessage()]
    assert len(removed) == 1 and dead.name in removed[0]


def test_build_launcher_on_a_full_disk_prints_one_line(project, tmp_path):
    out = tmp_path / "ds"
    script = f"""
import errno, runpy, sys
from tavr_jax.data import records
def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
records._rewrite_array_record = full
sys.argv = ["build_tfds.py", "--data={project}", "--out={out}", "--image_size=16"]
runpy.run_path("experiments/build_tfds.py", run_name="__main__")
"""
    run = _run_launcher(script)
    assert run.returncode == 1
    text = (run.stdout + run.stderr).replace("\r", "\n")
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith("build ")]
    assert lines == [f"error: {out}: disk full (No space left on device)"], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_image_path_that_is_a_folder_is_one_line(project, tmp_path):
    image = project / "case1" / "img" / "0000.png"
    image.unlink()
    image.mkdir()
    with pytest.raises(ValueError, match=f"{image}.*folder"):
        records.build_tfds(project, tmp_path / "ds", image_size=16, val_fraction=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
