"""Checkpoints: exact round trip of a sharded train state, latest/best, half-written steps."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tavr_jax.run.checkpoint import CheckpointStore


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
