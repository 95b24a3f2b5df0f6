"""A tiny Supervisely project and a tiny workdir (config.json + a random best checkpoint), as
evaluation and Table 1 tests need them."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tavr_jax.data.supervisely import AnnotatedFrame, write_project
from tavr_jax.models import create_model
from tavr_jax.run.checkpoint import CheckpointStore
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")


def write_tiny_project(root, sizes=((64, 64), (48, 64)), cases=5):
    rng = np.random.default_rng(0)
    frames = []
    for c in range(cases):
        h, w = sizes[c % len(sizes)]  # two frame sizes: coords must scale per frame
        for f in range(2):
            vis = rng.uniform(size=SCHEMA.num_points) < 0.6
            xy = np.where(vis[:, None], rng.uniform(2, [w - 2, h - 2], (SCHEMA.num_points, 2)), 0)
            frames.append(
                AnnotatedFrame(
                    case_id=f"case{c}",
                    frame_name=f"{f:04d}.png",
                    image=rng.integers(0, 256, (h, w), dtype=np.uint8),
                    visible=vis,
                    coords=xy.astype(np.float32),
                    pixel_spacing_mm=0.3 if c < 3 else None,
                )
            )
    return write_project(root, SCHEMA, frames)


def write_tiny_checkpoint(workdir, config: dict):
    """config.json + a best checkpoint of random weights, as a training run leaves them."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config))
    model = create_model(SCHEMA, backbone=config["backbone"], head=config["head"],
                         grouped=config["grouped"])  # fmt: skip
    # Random variables of the real shapes, filled on the host: eval_shape only traces (the
    # jitted model.init takes tens of seconds on a loaded 2-core CPU).
    size = config["image_size"]
    shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, size, size), jnp.uint8))
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("var", "scale"):
            return np.ones(leaf.shape, np.float32)
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) == 4 else leaf.shape[-2]
            return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    with CheckpointStore(workdir, async_save=False) as store:
        store.save_best(1, dict(variables), 0.5)
    return model, variables


TINY_CONFIG = dict(
    schema="paper11", backbone="resnet_tiny", head="regression", grouped=True,
    image_size=32, dtype="float32", data=dict(seed=0, val_fraction=0.4, test_fraction=0.0),
)  # fmt: skip


def tiny_workdir_and_project(tmp_path):
    data = write_tiny_project(tmp_path / "data")
    model, variables = write_tiny_checkpoint(tmp_path / "w", TINY_CONFIG)
    return tmp_path / "w", data, model, variables, TINY_CONFIG


def random_weights_workdir(root, *, transform=None):
    """A workdir of the tiny training config for the export tests: config.json, one checkpoint
    of random weights (passed through `transform` when given) and per-point thresholds."""
    import _train_worker as worker

    from cardiac_core.fileio import write_json_atomic
    from tavr_jax.infer.engine import KeypointEngine

    root = pathlib.Path(root)
    config = worker.tiny_config()
    write_json_atomic(root / "config.json", config.to_dict())
    base = KeypointEngine.random_init(
        SCHEMA, config.backbone, config.image_size, head=config.head, seed=2
    )
    variables = base.variables if transform is None else transform(base.variables)
    with CheckpointStore(root) as store:
        store.save(5, {"step": jnp.int32(5), **variables})
        store.wait()
    thresholds = {"points": {p: 0.3 + 0.02 * i for i, p in enumerate(SCHEMA.point_names)},
                  "groups": {g: 0.4 for g in SCHEMA.group_names}}  # fmt: skip
    (root / "thresholds.json").write_text(json.dumps(thresholds))
    return root
