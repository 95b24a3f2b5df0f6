"""Checkpoints of training runs (the only module that imports orbax).

A workdir keeps two orbax `CheckpointManager`s under `W/checkpoints/`:
`latest/` (the last `keep` saves, for exact resume) and `best/` (the one with the highest
validation F1). Each checkpoint holds the whole train state (params, optimiser state, batch
stats, EMA, step, RNG) as one pytree plus the data iterator state as JSON, so a restart
continues bit for bit. Orbax writes every step into a temporary directory and renames it
when complete, so a checkpoint half-written at a crash is never listed as a step.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (truncated, corrupted, or of another network)."""


def _one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line: orbax and tensorstore errors can span pages."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


_STATE = "state"
_DATA = "data"
BEST_METRIC = "val_f1"


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


class CheckpointStore:
    """Latest and best checkpoints of one training workdir.

    Args:
      workdir: the training workdir; checkpoints live in `workdir/checkpoints/{latest,best}`.
      keep: how many latest checkpoints to keep.
      async_save: write in a background thread (the device-to-host copy is synchronous, so
        the caller may donate the state's buffers right after `save` returns).
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
        kw = dict(async_save=async_save, read_only=read_only)
        try:
            self._latest = _manager(root / "latest", keep=keep, best=False, **kw)
            self._best = _manager(root / "best", keep=1, best=True, **kw)
            best_step = self._best.best_step()
            self.best_f1 = (
                float(self._best.metrics(best_step)[BEST_METRIC]) if best_step is not None else -1.0
            )
        except Exception as e:  # orbax raises many types for a damaged checkpoint folder
            raise CheckpointError(f"{root}: cannot open the checkpoints ({_one_line(e)})") from None

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return self._best.best_step()

    def save(self, step: int, state: Any, data_state: Any = None, *, force: bool = False) -> bool:
        """Saves `state` (a pytree of arrays) and the data iterator state as step `step`."""
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _DATA: ocp.args.JsonSave(_encode_data_state(data_state)),
            }
        )
        return self._latest.save(int(step), args=args, force=force)

    def save_best(self, step: int, state: Any, val_f1: float, data_state: Any = None) -> bool:
        """Saves `state` as the best checkpoint when `val_f1` beats the best so far."""
        if not np.isfinite(val_f1) or val_f1 <= self.best_f1:
            return False
        if self._best.latest_step() == int(step):
            return False
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _DATA: ocp.args.JsonSave(_encode_data_state(data_state)),
            }
        )
        saved = self._best.save(int(step), args=args, metrics={BEST_METRIC: float(val_f1)})
        if saved:
            self.best_f1 = float(val_f1)
        return saved

    def restore(
        self, abstract_state: Any = None, *, which: str = "latest", step: int | None = None
    ) -> tuple[Any, Any, int] | None:
        """Restores (state, data_state, step), or None when there is no checkpoint.

        `abstract_state` (a pytree of `jax.ShapeDtypeStruct` with shardings) restores the
        arrays straight into those shardings and that tree structure; without it the saved
        tree comes back as nested dicts/lists of arrays on this process's first device.
        """
        manager = self._manager_for(which)
        if step is None:
            step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            return None
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
            raise CheckpointError(
                f"{self.root / which}/{step}: cannot restore the checkpoint ({_one_line(e)})"
            ) from None
        return restored[_STATE], _decode_data_state(restored[_DATA]), int(step)

    def _manager_for(self, which: str):
        if which not in ("latest", "best"):
            raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
        return self._latest if which == "latest" else self._best

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
