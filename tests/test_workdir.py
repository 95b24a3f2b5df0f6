"""The files of a run: config.json guarded on resume, the model it describes, loading for
inference, and one-line errors for damaged checkpoints and configs."""

import json

import _train_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_core.fileio import write_json_atomic
from tavr_jax.models import create_model
from tavr_jax.run import workdir
from tavr_jax.run.checkpoint import CheckpointError, CheckpointStore
from tavr_jax.schema import get_schema
from tavr_jax.training.train import train_and_evaluate


def test_load_for_inference(tmp_path):
    config = worker.tiny_config(ema_decay=0.9)
    write_json_atomic(tmp_path / "config.json", config.to_dict())
    schema = get_schema(config.schema)
    model = create_model(schema, backbone=config.backbone, head=config.head)
    images = jnp.zeros((1, config.image_size, config.image_size), jnp.uint8)
    # Random values of the right shapes: no need to run (compile) the initialisers.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(s.dtype),
        jax.eval_shape(model.init, jax.random.PRNGKey(0), images),
    )
    state = {
        "step": jnp.int32(3),
        "params": variables["params"],
        "ema_params": jax.tree.map(lambda x: x + 1, variables["params"]),
        "batch_stats": variables["batch_stats"],
    }
    with CheckpointStore(tmp_path) as store:
        store.save(3, state)
        store.wait()
    (tmp_path / "thresholds.json").write_text(
        json.dumps({"points": {p: 0.25 + 0.01 * i for i, p in enumerate(schema.point_names)}})
    )
    model2, loaded, meta = workdir.load_for_inference(tmp_path)  # no best: falls back
    assert meta["which"] == "latest" and meta["step"] == 3
    assert meta["schema"] == schema and meta["backbone"] == "resnet_tiny"
    assert meta["image_size"] == 32 and meta["dtype"] == "float32" and meta["grouped"]
    np.testing.assert_allclose(meta["thresholds"], 0.25 + 0.01 * np.arange(schema.num_points))
    for a, b in zip(
        jax.tree.leaves(state["ema_params"]), jax.tree.leaves(loaded["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # EMA weights are served
    out = jax.eval_shape(model2.apply, loaded, images)
    assert out["visibility_logits"].shape == (1, schema.num_points)
    with pytest.raises(FileNotFoundError, match="config.json"):
        workdir.load_for_inference(tmp_path / "nowhere")


def test_dense_visibility_only_where_the_config_asks_and_the_head_has_maps():
    base = {"schema": "paper11", "backbone": "resnet_tiny", "head": "heatmap"}
    assert not workdir.build_model(base)[0].dense_visibility  # configs from before the field
    assert workdir.build_model({**base, "dense_visibility": True})[0].dense_visibility
    regression = {**base, "head": "regression", "dense_visibility": True}
    assert not workdir.build_model(regression)[0].dense_visibility  # no maps to read


def test_config_differences_names_nested_fields_and_ignores_run_control():
    a = worker.tiny_config().to_dict()
    b = worker.tiny_config(**{"optimizer.learning_rate": 3e-4, "backbone": "resnet18",
                              "num_steps": 99, "data.num_workers": 2}).to_dict()  # fmt: skip
    assert workdir.config_differences(a, b) == ["backbone", "optimizer.learning_rate"]
    c = worker.tiny_config(augment=None).to_dict()
    assert "augment.flip_prob" in workdir.config_differences(a, c)
    assert workdir.config_differences(a, json.loads(json.dumps(a))) == []  # tuples vs lists


def _trained_workdir(tmp_path):
    """A workdir as a finished run leaves it: config.json and a checkpoint."""
    project = worker.write_tiny_project(tmp_path / "data", cases=4, frames=2, size=32)
    config = worker.tiny_config(num_steps=2, checkpoint_every=2)
    train_and_evaluate(config, tmp_path / "w", project)
    return tmp_path / "w", project, config


def test_training_refuses_another_config_before_writing_anything(tmp_path):
    w, project, config = _trained_workdir(tmp_path)
    stored = (w / "config.json").read_bytes()
    other = worker.tiny_config(num_steps=2, checkpoint_every=2, head="integral")
    other.optimizer.learning_rate = 0.5
    with pytest.raises(workdir.ConfigMismatch) as err:
        train_and_evaluate(other, w, project)
    message = str(err.value)
    assert "\n" not in message and "head ('heatmap' -> 'integral')" in message
    assert "optimizer.learning_rate" in message and "new --workdir" in message
    assert (w / "config.json").read_bytes() == stored  # the trained model stays loadable
    assert workdir.load_for_inference(w)[2]["head"] == "heatmap"
    # Run control may change on resume: more steps continue the same run.
    more = worker.tiny_config(num_steps=3, checkpoint_every=3)
    assert train_and_evaluate(more, w, project)["step"] == 3
    assert workdir.read_config(w)["num_steps"] == 3


def test_a_config_without_checkpoints_may_be_replaced(tmp_path):
    write_json_atomic(tmp_path / "config.json", {"backbone": "vgg16"})
    workdir.write_config(tmp_path, worker.tiny_config())
    assert workdir.read_config(tmp_path)["backbone"] == "resnet_tiny"


def test_time_budget_stops_cleanly_with_checkpoint_and_validation(tmp_path):
    project = worker.write_tiny_project(tmp_path / "data", cases=4, frames=2, size=32)
    config = worker.tiny_config(num_steps=1000, checkpoint_every=1000, time_budget_s=1e-3)
    result = train_and_evaluate(config, tmp_path / "w", project)
    assert result["stopped"] == "time_budget" and result["step"] == 1
    assert "val_f1" in result and result["train_seconds"] > 0
    with CheckpointStore(tmp_path / "w", read_only=True) as store:
        assert store.latest_step() == 1 and store.best_step() == 1
    assert not (tmp_path / "w" / "lock.json").exists()  # released at the end of the run
    # A damaged best gives way to the newest restorable latest, for inference too.
    manifest = tmp_path / "w" / "checkpoints" / "best" / "1" / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])
    meta = workdir.load_for_inference(tmp_path / "w", which="best")[2]
    assert meta["which"] == "latest" and meta["step"] == 1


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "cannot restore the checkpoint"),
        ("garbage", "cannot restore the checkpoint"),
        ("metadata", "cannot restore the checkpoint"),
    ],
)
def test_damaged_checkpoints_give_one_line_errors(tmp_path, damage, message):
    state = {"w": jnp.arange(1000.0), "b": jnp.ones(3)}
    with CheckpointStore(tmp_path, async_save=False) as store:
        store.save(1, state)
    step_dir = tmp_path / "checkpoints" / "latest" / "1"
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0)
    if damage == "metadata":
        for p in files:
            if "METADATA" in p.name.upper():
                p.unlink()
    else:
        for p in files:
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x13" * len(data))
    with pytest.raises(CheckpointError, match=message) as err:
        with CheckpointStore(tmp_path, read_only=True) as store:
            store.restore(jax.eval_shape(lambda: state))
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_bad_configs_and_mismatched_weights_give_one_line_errors(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: unreadable config"):
        workdir.load_for_inference(tmp_path)
    config = worker.tiny_config().to_dict()
    write_json_atomic(tmp_path / "config.json", dict(config, backbone="resnet999"))
    with pytest.raises(ValueError, match="unknown backbone 'resnet999'"):
        workdir.load_for_inference(tmp_path)
    # A checkpoint of one network under a config.json naming another.
    model, _ = workdir.build_model(config)
    images = jnp.zeros((1, 32, 32), jnp.uint8)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    with CheckpointStore(tmp_path, async_save=False) as store:
        store.save(1, {"step": jnp.int32(1), **variables})
    write_json_atomic(tmp_path / "config.json", dict(config, backbone="resnet18"))
    with pytest.raises(ValueError, match="weights do not fit the network of config.json") as err:
        workdir.load_for_inference(tmp_path)
    assert "\n" not in str(err.value)
