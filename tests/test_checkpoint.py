"""Checkpoints: exact round trip of a sharded train state, latest/best, half-written steps."""

import errno
import json
import logging
import os
import shutil

import _train_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tavr_jax.run.checkpoint import DAMAGED, DIGEST_FILE, CheckpointError, CheckpointStore
from tavr_jax.run.lock import WriteError


def _state(seed=0):
    """A train-state-like pytree: params, optimiser state with namedtuples, RNG, step."""
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)},
        "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-3), optax.contrib.reduce_on_plateau()
    )
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: x * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params, value=jnp.float32(2.0))
    return {
        "step": jnp.int32(7),
        "params": params,
        "batch_stats": {"bn": {"mean": jnp.arange(3, dtype=jnp.float32)}},
        "opt_state": opt_state,
        "ema_params": jax.tree.map(lambda x: x + 1, params),
        "rng": jax.random.PRNGKey(seed),
    }


def _replicated_abstract(state, mesh):
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_round_trip_is_exact_and_keeps_sharding(tmp_path):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = _state()
    data_state = {"next_index": 12, "epoch": 1}
    with CheckpointStore(tmp_path, keep=2) as store:
        assert store.restore() is None
        store.save(7, state, data_state)
        store.wait()
    with CheckpointStore(tmp_path) as store:
        restored, restored_data, step = store.restore(_replicated_abstract(state, mesh))
    assert step == 7 and restored_data == data_state
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # namedtuples back
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.is_fully_replicated and len(b.sharding.device_set) == 4


def test_bytes_iterator_state_round_trips(tmp_path):
    blob = json.dumps({"last_seen_indices": {"0": 5}}).encode()
    with CheckpointStore(tmp_path) as store:
        store.save(1, {"x": jnp.ones(2)}, blob)
        store.wait()
        assert store.restore()[1] == blob


def test_keeps_latest_n_and_best_by_f1(tmp_path):
    state = {"x": jnp.zeros(3)}
    with CheckpointStore(tmp_path, keep=2) as store:
        for step, f1 in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.65)]:
            store.save(step, {"x": jnp.full(3, step, jnp.float32)})
            store.save_best(step, {"x": jnp.full(3, step, jnp.float32)}, f1)
        store.wait()
        assert store.latest_step() == 4
        assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints/latest")) == [3, 4]
        assert store.best_step() == 2
        assert not store.save_best(5, state, float("nan"))
    with CheckpointStore(tmp_path) as store:  # the best F1 survives a restart
        assert store.best_f1 == pytest.approx(0.7)
        assert not store.save_best(6, state, 0.69)
        best, _, step = store.restore(which="best")
    assert step == 2
    np.testing.assert_array_equal(best["x"], np.full(3, 2.0))


def test_half_written_checkpoint_never_becomes_latest(tmp_path):
    latest = tmp_path / "checkpoints" / "latest"
    with CheckpointStore(tmp_path) as store:
        store.save(1, {"x": jnp.ones(4)})
        store.wait()
        # A real asynchronous save in flight: readers only ever see committed steps.
        store.save(2, {"x": jnp.ones((2000, 2000))})
        if (latest / "2.orbax-checkpoint-tmp").exists():
            assert CheckpointStore(tmp_path, read_only=True).latest_step() == 1
        store.wait()
        assert store.latest_step() == 2
    # A save killed midway leaves its temporary directory: partial files, never renamed.
    shutil.copytree(latest / "2", latest / "9.orbax-checkpoint-tmp")
    (latest / "9.orbax-checkpoint-tmp" / "_CHECKPOINT_METADATA").unlink()
    reader = CheckpointStore(tmp_path, read_only=True)
    assert reader.latest_step() == 2
    assert (latest / "9.orbax-checkpoint-tmp").exists()  # a reader leaves it alone
    with CheckpointStore(tmp_path) as store:  # the restarted writer resumes from step 2 ...
        assert store.latest_step() == 2
        assert store.restore()[2] == 2
        store.save(9, {"x": jnp.zeros(4)})  # ... and can write that step again
        store.wait()
        assert store.latest_step() == 9
    np.testing.assert_array_equal(CheckpointStore(tmp_path).restore()[0]["x"], np.zeros(4))


def _two_steps(root):
    """Steps 1 and 2 of different states in latest/, step 2 also as best; their states."""
    states = {s: {"w": jnp.arange(300.0) * s, "b": jnp.full(3, s, jnp.int32)} for s in (1, 2)}
    with CheckpointStore(root) as store:  # asynchronous saves, as training makes them
        for step, state in states.items():
            store.save(step, state, {"next": step})
        store.save_best(2, states[2], 0.5)
    return states


def _damage(path, mode):
    os.truncate(path, 0 if mode == "zero" else path.stat().st_size // 2)


@pytest.mark.parametrize("mode", ["half", "zero"])
def test_each_damaged_file_of_the_newest_step_falls_back_bit_exact(tmp_path, mode, caplog):
    states = _two_steps(tmp_path / "saved")
    newest = tmp_path / "saved" / "checkpoints" / "latest" / "2"
    files = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file())
    assert len(files) > 8 and DIGEST_FILE in {str(p) for p in files}
    for i, name in enumerate(files):
        work = tmp_path / f"w{i}"
        shutil.copytree(tmp_path / "saved", work)
        _damage(work / "checkpoints" / "latest" / "2" / name, mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING), CheckpointStore(work, read_only=True) as store:
            state, data, step = store.restore()
        warnings = [r.getMessage() for r in caplog.records if r.name == "root"]
        assert step == 1 and data == {"next": 1}, name
        assert len(warnings) == 1 and "latest/2" in warnings[0] and "latest/1" in warnings[0]
        assert "\n" not in warnings[0]
        for a, b in zip(jax.tree.leaves(states[1]), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        shutil.rmtree(work)


def test_a_writer_moves_the_damaged_step_aside_and_can_save_it_again(tmp_path):
    states = _two_steps(tmp_path)
    ckpt = tmp_path / "checkpoints"
    _damage(ckpt / "latest" / "2" / "state" / "manifest.ocdbt", "half")
    _damage(ckpt / "best" / "2" / "state" / "manifest.ocdbt", "half")
    with CheckpointStore(tmp_path, read_only=True) as reader:  # best -> newest good latest
        assert reader.restore(which="best")[2] == 1
        assert reader.restored_from == ("latest", 1)
        with pytest.raises(CheckpointError, match="latest/2: cannot restore the checkpoint"):
            reader.restore(step=2)  # an explicit step never falls back
    with CheckpointStore(tmp_path) as store:
        assert store.restore()[2] == 1 and store.latest_step() == 1
        assert (ckpt / DAMAGED / "latest-2").is_dir()
        store.save(2, states[2])
    with CheckpointStore(tmp_path, read_only=True) as store:
        np.testing.assert_array_equal(store.restore()[0]["w"], np.arange(300.0) * 2)


def test_a_step_saved_before_digests_falls_back_without_exit_noise(tmp_path):
    # No digest: orbax's own read fails, orphaning the other reads (see the launcher test).
    _two_steps(tmp_path)
    newest = tmp_path / "checkpoints" / "latest" / "2"
    (newest / DIGEST_FILE).unlink()
    (newest / "state" / "manifest.ocdbt").unlink()
    with CheckpointStore(tmp_path, read_only=True) as store:
        assert store.restore()[2] == 1


@pytest.mark.parametrize(
    "code, cause", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system")]
)
def test_a_failed_save_is_one_line_and_leaves_no_partial_folder(tmp_path, code, cause, capfd):
    monkey = pytest.MonkeyPatch()
    monkey.setattr(ocp.JsonCheckpointHandler, "_save_fn", worker.failing_save(code, step=2))
    try:
        store = CheckpointStore(tmp_path)
        store.save(1, {"x": jnp.ones(4)})
        store.save(2, {"x": jnp.zeros(4)})  # fails in orbax's background thread
        with pytest.raises(WriteError) as err:
            store.wait()
        store.close()
    finally:
        monkey.undo()
    folder = tmp_path / "checkpoints" / "latest" / "2"
    assert str(err.value) == f"{folder}: cannot save the checkpoint ({cause})"
    assert err.value.errno == code
    assert not list(tmp_path.glob("checkpoints/*/*.orbax-checkpoint-tmp"))
    assert "Traceback" not in capfd.readouterr().err  # orbax's logged tracebacks are taken
    with CheckpointStore(tmp_path, read_only=True) as store:  # what was saved stays
        assert store.latest_step() == 1
        np.testing.assert_array_equal(store.restore()[0]["x"], np.ones(4))


def test_leftover_partial_folders_are_removed_at_the_next_start_with_one_line(tmp_path, caplog):
    _two_steps(tmp_path)
    partial = tmp_path / "checkpoints" / "latest" / "7.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoints/latest/2", partial)  # a save killed midway
    with caplog.at_level(logging.INFO, logger="root"), CheckpointStore(tmp_path) as store:
        assert store.latest_step() == 2
    assert not partial.exists()
    lines = [r.getMessage() for r in caplog.records if "partial checkpoint" in r.getMessage()]
    assert len(lines) == 1 and "latest/7.orbax-checkpoint-tmp" in lines[0]
