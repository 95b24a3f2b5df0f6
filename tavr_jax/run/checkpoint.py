"""Checkpoints of training runs (the only module that imports orbax).

A workdir keeps two orbax `CheckpointManager`s under `W/checkpoints/`:
`latest/` (the last `keep` saves, for exact resume) and `best/` (the one with the highest
validation F1). Each checkpoint holds the whole train state (params, optimiser state, batch
stats, EMA, step, RNG) as one pytree plus the data iterator state as JSON, so a restart
continues bit for bit. Orbax writes every step into a temporary directory and renames it
when complete, so a checkpoint half-written at a crash is never listed as a step.

Damage after the fact (a truncated or edited file, a disk that filled while copying) is
caught by a record of every file's size and sha256, `<step>/_FILE_DIGESTS.json`, written once
the step is committed. A restore without an explicit step falls back from a step that cannot
be restored to the newest one that can, with one warning line naming both; a writer moves the
damaged step aside to `checkpoints/damaged/` so the run can write that step again.

A save that fails (read-only filesystem, disk full) raises one line naming the step's folder
and the cause, deletes the partial `<step>.orbax-checkpoint-tmp` folder, and leaves the steps
saved before it restorable. Orbax logs such failures from its background threads with full
tracebacks; this module takes them from the log and raises them once, as that one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import os_error_cause
from tavr_jax.run.lock import WriteError


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (truncated, corrupted, or of another network), or a
    save that failed for a reason other than the filesystem."""


def _one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line: orbax and tensorstore errors can span pages."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


_STATE = "state"
_DATA = "data"
BEST_METRIC = "val_f1"
DIGEST_FILE = "_FILE_DIGESTS.json"
DAMAGED = "damaged"  # checkpoints/damaged/: steps a writer moved aside after a fallback
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


# ---------------------------------------------------------------- orbax's background errors

_failures: list[BaseException] = []
_failures_lock = threading.Lock()


class _OrbaxFailureFilter(logging.Filter):
    """Takes the exceptions orbax logs from its save threads (each with a page of traceback)
    off the log; `CheckpointStore` raises them as one line once the save is waited for."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.exc_info and record.exc_info[1] is not None:
            with _failures_lock:
                _failures.append(record.exc_info[1])
                del _failures[:-8]
            return False
        # A damaged step's metadata, found while listing steps: `restore` reports the step
        # (and what it falls back to) in one line of its own.
        return not str(record.msg).startswith("Failed to json parse")


class _StrayTaskFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for reads of a checkpoint that failed
    (orbax gathers the reads of all arrays; after the first failure the others are orphaned)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not ("never retrieved" in text and ("tensorstore" in text or "ocdbt" in text))


logging.getLogger("absl").addFilter(_OrbaxFailureFilter())
logging.getLogger("asyncio").addFilter(_StrayTaskFilter())


def _quiet_orphaned_callbacks() -> None:
    """Silences the callbacks of reads (writes) orphaned by a failed restore (save); installed
    when a store opens, since they can fire before orbax's error reaches us.

    Orbax runs a restore's reads in an asyncio loop that it closes as soon as one read fails;
    tensorstore then completes the others on its own threads, and each completion's callback
    finds the loop closed: `RuntimeError: Event loop is closed`, reported through
    `sys.unraisablehook` as a full traceback (100-200 of them for one damaged checkpoint,
    printed until the interpreter exits). Only those are dropped; anything else goes on to
    the hook that was installed before.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_tavr_orphans", False):
        return

    def hook(unraisable) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._tavr_orphans = True
    sys.unraisablehook = hook


def _take_failures() -> list[BaseException]:
    with _failures_lock:
        out = list(_failures)
        _failures.clear()
    return out


_ERRNO_TEXTS = {c: os.strerror(c) for c in (errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EDQUOT)}


def _save_failure(directory: pathlib.Path, e: BaseException | None) -> Exception:
    """One line naming the step's folder and the cause; WriteError for filesystem causes
    (tensorstore reports them as ValueError text, so the text is searched too)."""
    code = e.errno if isinstance(e, OSError) and e.errno else None
    if code is None and e is not None:
        code = next((c for c, t in _ERRNO_TEXTS.items() if t.lower() in str(e).lower()), None)
    if code is not None:
        cause = os_error_cause(OSError(code, os.strerror(code)))
        return WriteError(code, f"{directory}: cannot save the checkpoint ({cause})")
    why = _one_line(e) if e is not None else "orbax did not commit it"
    return CheckpointError(f"{directory}: cannot save the checkpoint ({why})")


def _remove_settled(path: pathlib.Path, *, patience_s: float = 5.0) -> None:
    """Deletes a failed save's folder. The writes of its other items may still be landing
    (orbax stops waiting at the first failure), so it is deleted again until it stays gone;
    one left after that is removed, with an info line, when a writer next opens the store."""
    deadline = time.monotonic() + patience_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.2)
        if not path.exists() or time.monotonic() > deadline:
            return


# ------------------------------------------------------------------------------- digests


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _seal(step_dir: pathlib.Path) -> None:
    """Records the size and sha256 of every file of a committed step."""
    files = {
        p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != DIGEST_FILE
    }
    write_json_atomic(step_dir / DIGEST_FILE, {"version": 1, "files": files})


def _verify(step_dir: pathlib.Path) -> None:
    """Raises CheckpointError (one line) when a file differs from its record; a step saved
    before these records (or killed before its record) is left to orbax's own checks."""
    path = step_dir / DIGEST_FILE
    if not path.exists():
        return

    def damaged(detail: str) -> CheckpointError:
        return CheckpointError(f"{step_dir}: cannot restore the checkpoint ({detail})")

    try:
        files = json.loads(path.read_text())["files"]
        items = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise damaged(f"{DIGEST_FILE} unreadable: {_one_line(e, 80)}") from None
    for name, size, sha in items:
        p = step_dir / name
        if not p.is_file():
            raise damaged(f"{name} is missing")
        if p.stat().st_size != size:
            raise damaged(f"{name} truncated: {p.stat().st_size} of {size} bytes")
        if _sha256(p) != sha:
            raise damaged(f"{name} changed since it was saved: checksum differs")


# ------------------------------------------------------------------------------ the store


def _encode_data_state(data_state: Any) -> dict:
    # Grain iterators return either a JSON-able dict or JSON bytes depending on the API.
    if data_state is None:
        return {"kind": "none"}
    if isinstance(data_state, bytes):
        return {"kind": "bytes", "value": data_state.decode("utf-8")}
    return {"kind": "json", "value": data_state}


def _decode_data_state(blob: dict | None) -> Any:
    if not blob or blob.get("kind") == "none":
        return None
    if blob["kind"] == "bytes":
        return blob["value"].encode("utf-8")
    return blob["value"]


def _manager(directory: pathlib.Path, *, keep: int, best: bool, async_save: bool, read_only: bool):
    options = ocp.CheckpointManagerOptions(
        read_only=read_only,
        create=not read_only,
        max_to_keep=keep,
        best_fn=(lambda m: float(m[BEST_METRIC])) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not best,
        # A run killed mid-save leaves `<step>.orbax-checkpoint-tmp`: a restarted writer drops
        # it; a reader must not, since it may belong to a save still in progress.
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
    )
    handlers = {_STATE: ocp.StandardCheckpointHandler(), _DATA: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _save_args(state: Any, data_state: Any):
    return ocp.args.Composite(
        **{
            _STATE: ocp.args.StandardSave(state),
            _DATA: ocp.args.JsonSave(_encode_data_state(data_state)),
        }
    )


class CheckpointStore:
    """Latest and best checkpoints of one training workdir.

    Args:
      workdir: the training workdir; checkpoints live in `workdir/checkpoints/{latest,best}`.
      keep: how many latest checkpoints to keep.
      async_save: write in a background thread (the device-to-host copy is synchronous, so
        the caller may donate the state's buffers right after `save` returns). A background
        failure is raised (one line) by the next `save`, `wait` or `close`.
      read_only: open for reading only (e.g. inference while training is still running).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 2,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        root = pathlib.Path(workdir).absolute() / "checkpoints"
        if read_only and not root.is_dir():
            raise FileNotFoundError(f"{root}: no checkpoints directory")
        self.root = root
        self.read_only = read_only
        self._async = async_save
        self._closed = False
        self.restored_from: tuple[str, int] | None = None  # (which, step) of the last restore
        self._pending: dict[str, list[int]] = {"latest": [], "best": []}
        self._managers: dict[str, Any] = {}
        # Before any read or write: an orphaned callback can fire as soon as orbax gives up.
        _quiet_orphaned_callbacks()
        if not read_only:
            self._note_leftovers()
        kw = dict(async_save=async_save, read_only=read_only)
        try:
            self._managers["latest"] = _manager(root / "latest", keep=keep, best=False, **kw)
            self._managers["best"] = _manager(root / "best", keep=1, best=True, **kw)
            best_step = self._best.best_step()
            self.best_f1 = (
                float(self._best.metrics(best_step)[BEST_METRIC]) if best_step is not None else -1.0
            )
        except OSError as e:
            self._close_managers()
            raise WriteError(e.errno, f"{root}: cannot open ({os_error_cause(e)})") from None
        except Exception as e:  # orbax raises many types for a damaged checkpoint folder
            self._close_managers()
            raise CheckpointError(f"{root}: cannot open the checkpoints ({_one_line(e)})") from None

    @property
    def _latest(self):
        return self._managers["latest"]

    @property
    def _best(self):
        return self._managers["best"]

    def _note_leftovers(self) -> None:
        # A writer holds the workdir's lock, so no save is in progress: what a killed save
        # left is removed here, with one line (orbax's own clean-up only knows the names its
        # current version writes, `<step>.orbax-checkpoint-tmp-<time>`).
        leftovers = sorted(self.root.glob(f"*/*{_TMP_SUFFIX}*"))
        if leftovers:
            logging.info(
                "%s: removing %d partial checkpoint(s) of an interrupted save: %s",
                self.root,
                len(leftovers),
                ", ".join(p.relative_to(self.root).as_posix() for p in leftovers),
            )
            for path in leftovers:
                shutil.rmtree(path, ignore_errors=True)

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return self._best.best_step()

    # --------------------------------------------------------------------------- saving

    def save(self, step: int, state: Any, data_state: Any = None, *, force: bool = False) -> bool:
        """Saves `state` (a pytree of arrays) and the data iterator state as step `step`."""
        return self._save("latest", int(step), _save_args(state, data_state), force=force)

    def save_best(self, step: int, state: Any, val_f1: float, data_state: Any = None) -> bool:
        """Saves `state` as the best checkpoint when `val_f1` beats the best so far."""
        if not np.isfinite(val_f1) or val_f1 <= self.best_f1:
            return False
        if self._best.latest_step() == int(step):
            return False
        args = _save_args(state, data_state)
        saved = self._save("best", int(step), args, metrics={BEST_METRIC: float(val_f1)})
        if saved:
            self.best_f1 = float(val_f1)
        return saved

    def _save(self, which: str, step: int, args, **kw) -> bool:
        self._settle(which)  # raises an earlier background failure before writing more
        manager = self._managers[which]
        _take_failures()
        try:
            saved = manager.save(step, args=args, **kw)
        except Exception as e:  # a failure in this thread: creating the folder, the copy
            failures = _take_failures()
            self._discard(which, step)
            cause = failures[-1] if failures else e
            raise _save_failure(self.root / which / str(step), cause) from None
        if saved:
            self._pending[which].append(step)
            if not self._async:
                self._settle(which)
        return saved

    def _settle(self, which: str) -> None:
        """Waits for `which`'s saves; seals those committed, raises for one that was not."""
        manager = self._managers[which]
        try:
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (the finalize thread's failure; orbax logged it)
            with _failures_lock:
                _failures.append(e)
        pending, self._pending[which] = self._pending[which], []
        for step in pending:
            final = self.root / which / str(step)
            if final.is_dir() and (final / "_CHECKPOINT_METADATA").exists():
                if jax.process_index() == 0:
                    _seal(final)
                continue
            failures = _take_failures()
            self._discard(which, step)
            raise _save_failure(final, failures[-1] if failures else None)

    def _discard(self, which: str, step: int) -> None:
        """Deletes a failed save's partial folder and forgets the step."""
        if jax.process_index() == 0:
            for name in (f"{step}{_TMP_SUFFIX}", str(step)):
                _remove_settled(self.root / which / name)
        try:
            self._managers[which].reload()
        except Exception:  # noqa: BLE001 (the folder may be unreadable too; the error is raised)
            pass

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed; raises a failed one."""
        self._settle("latest")
        self._settle("best")

    def close(self, *, quiet: bool = False) -> None:
        """Waits for pending saves and closes orbax's threads. Raises a failed save (one line)
        unless `quiet` (when another error is already on its way)."""
        if self._closed:
            return
        error = None
        for which in ("latest", "best"):
            try:
                self._settle(which)
            except Exception as e:  # noqa: BLE001 (raised below, after everything is closed)
                error = error or e
        self._close_managers()
        if error is not None and not quiet:
            raise error

    def _close_managers(self) -> None:
        for manager in self._managers.values():
            try:
                manager.close()
            except Exception:  # noqa: BLE001 (closing must not hide the error being raised)
                _take_failures()
        self._closed = True

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(quiet=exc_type is not None)

    # ------------------------------------------------------------------------ restoring

    def restore(
        self, abstract_state: Any = None, *, which: str = "latest", step: int | None = None
    ) -> tuple[Any, Any, int] | None:
        """Restores (state, data_state, step), or None when there is no checkpoint.

        `abstract_state` (a pytree of `jax.ShapeDtypeStruct` with shardings) restores the
        arrays straight into those shardings and that tree structure; without it the saved
        tree comes back as nested dicts/lists of arrays on this process's first device.

        Without `step`, a checkpoint that cannot be restored gives way to the newest one that
        can (for "best": the latest ones, newest first), with one warning line naming both;
        `restored_from` says which was used. A writer moves the damaged steps of "latest" to
        `checkpoints/damaged/`, so the run can save those steps again. With `step`, or when
        none can be restored, raises CheckpointError naming the first failure.
        """
        self._manager_for(which)  # checks `which`
        candidates = [(which, int(step))] if step is not None else self._candidates(which)
        if not candidates:
            return None
        failed: list[tuple[str, int, str]] = []
        for name, s in candidates:
            try:
                restored = self._restore_one(name, s, abstract_state)
            except CheckpointError as e:
                failed.append((name, s, str(e)))
                continue
            if failed:
                self._after_fallback(failed, name, s)
            self.restored_from = (name, s)
            return restored
        name, s, first = failed[0]
        more = f" (and {len(failed) - 1} older, none restorable)" if len(failed) > 1 else ""
        raise CheckpointError(f"{first}{more}")

    def _candidates(self, which: str) -> list[tuple[str, int]]:
        latest = [("latest", s) for s in sorted(self._latest.all_steps(), reverse=True)]
        if which == "latest":
            return latest
        best = self._best.best_step()
        if best is None:
            return []  # no best at all: the caller decides (load_for_inference uses latest)
        return [("best", best), *latest]

    def _restore_one(self, which: str, step: int, abstract_state: Any):
        manager = self._managers[which]
        step_dir = self.root / which / str(step)
        _verify(step_dir)  # before orbax: its failed reads leave orphaned threads and tasks
        try:
            if abstract_state is None:
                # Onto this process's first device: the checkpoint's own shardings may name
                # devices this process does not have (saved on another topology).
                device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                abstract_state = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                    manager.item_metadata(int(step))[_STATE],
                )
            restored = manager.restore(
                int(step),
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardRestore(abstract_state),
                        _DATA: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception as e:  # truncated files, missing metadata, another tree structure
            _take_failures()
            raise CheckpointError(
                f"{step_dir}: cannot restore the checkpoint ({_one_line(e)})"
            ) from None
        return restored[_STATE], _decode_data_state(restored[_DATA]), int(step)

    def _after_fallback(self, failed: list[tuple[str, int, str]], which: str, step: int) -> None:
        """One warning line; a writer moves the damaged latest steps out of orbax's way."""
        moved = ""
        damaged = [s for name, s, _ in failed if name == "latest" and s > step]
        if not self.read_only and damaged:
            aside, targets = self.root / DAMAGED, []
            for s in damaged:
                target, n = aside / f"latest-{s}", 1
                while target.exists():  # kept: each is evidence of what went wrong
                    target, n = aside / f"latest-{s}.{n}", n + 1
                targets.append(target)
                if jax.process_index() == 0:
                    aside.mkdir(exist_ok=True)
                    os.replace(self.root / "latest" / str(s), target)
            if jax.process_count() > 1:  # every process must see the same steps
                multihost_utils.sync_global_devices("tavr_checkpoint_fallback")
            self._latest.reload()
            moved = "; moved aside to " + ", ".join(str(t) for t in targets)
        name, s, error = failed[0]
        others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        logging.warning(
            "%s%s; using %s/%d instead%s", error, others, self.root / which, step, moved
        )

    def _manager_for(self, which: str):
        if which not in ("latest", "best"):
            raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
        return self._managers[which]
