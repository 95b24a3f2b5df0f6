"""Helpers for the training tests: a tiny Supervisely project, a tiny config, and a worker
process (`python tests/_train_worker.py MODE ...`) for the kill/resume and multi-host tests."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np


def tiny_config(**overrides):
    """The runlocal preset shrunk to a 32 px tiny ResNet that trains in seconds on a CPU."""
    from tavr_jax.config import get_config

    config = get_config("runlocal")
    config.backbone = "resnet_tiny"
    config.image_size = 32
    config.batch_size = 8
    config.num_steps = 6
    config.optimizer.warmup_steps = 2
    config.eval_every = 1000
    config.checkpoint_every = 3
    config.log_every = 1
    config.data.val_fraction = 0.25
    for k, v in overrides.items():
        *parents, leaf = k.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = v
    return config


def write_tiny_project(root, *, cases=4, frames=6, size=48, seed=0):
    """Random frames with a bright dot at each visible keypoint of the paper11 schema."""
    from tavr_jax.data.supervisely import AnnotatedFrame, write_project
    from tavr_jax.schema import get_schema

    schema = get_schema("paper11")
    rng = np.random.default_rng(seed)
    out = []
    for c in range(cases):
        for f in range(frames):
            image = rng.integers(0, 60, (size, size), dtype=np.uint8)
            present = rng.random(schema.num_groups) < 0.7
            visibility = present[schema.point_group]
            coords = rng.uniform(4, size - 4, (schema.num_points, 2)).astype(np.float32)
            coords[~visibility] = 0
            for x, y in coords[visibility].astype(int):
                image[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = 255
            out.append(
                AnnotatedFrame(f"case{c:02d}", f"{f:04d}.png", image, visibility, coords, 0.3)
            )
    return write_project(root, schema, out)


def flat_params(params) -> dict[str, np.ndarray]:
    import jax

    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
    }


def _train(args) -> None:
    import jax

    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates
    from tavr_jax.training.train import train_and_evaluate

    config = tiny_config(num_steps=args.steps, checkpoint_every=args.checkpoint_every)
    metrics = train_and_evaluate(config, args.workdir, args.data)
    print(f"finished at step {metrics['step']}", flush=True)


def failing_save(code: int, *, step: int | None = None):
    """A stand-in for orbax's JSON item writer that fails with `code` (errno.ENOSPC: disk
    full, errno.EROFS: read-only) when writing `step` (every step when None), as the
    filesystem would: in orbax's background commit, after the arrays were written."""
    import errno
    import os

    import orbax.checkpoint as ocp

    original = ocp.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        if step is None or str(directory).rstrip("/").split("/")[-2].startswith(f"{step}."):
            raise OSError(code, os.strerror(code), str(directory / "metadata"))
        return await original(self, x, directory)

    assert code in (errno.ENOSPC, errno.EROFS)
    return save_fn


def _launch(args) -> None:
    """The real launcher (experiments/tavr_train.py) with the tiny config's flags."""
    import errno
    import pathlib
    import sys

    import jax
    import orbax.checkpoint as ocp
    from absl import app

    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates
    from experiments import tavr_train

    if args.fail_save:
        code, step = args.fail_save.split("@")
        ocp.JsonCheckpointHandler._save_fn = failing_save(getattr(errno, code), step=int(step))
    config = pathlib.Path(tavr_train.__file__).parent / "configs" / "tavr.py"
    overrides = dict(
        backbone="resnet_tiny",
        image_size=32,
        batch_size=8,
        num_steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        eval_every=1000,
        log_every=1,
        **{"optimizer.warmup_steps": 2, "data.val_fraction": 0.25},
    )  # fmt: skip  (tiny_config's values, as flags)
    sys.argv = [
        "tavr_train",
        f"--config={config}:runlocal",
        f"--workdir={args.workdir}",
        f"--data={args.data}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]
    app.run(tavr_train.main)


class RecordingFrames(Sequence):
    """A random-access source that records which frames were read, in order."""

    def __init__(self, frames):
        self.frames = frames
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict:
        self.read.append(int(index))
        return self.frames[index]


def recording_loader(project, config, *, process_index=0, process_count=1):
    """(source, loader) over the training split, reading synchronously (no read-ahead), so
    `source.read` holds exactly the frames of the batches taken so far."""
    from tavr_jax.data import pipeline

    frames = pipeline.open_frames(
        project,
        "train",
        in_memory=False,
        image_size=config.image_size,
        val_fraction=config.data.val_fraction,
    )
    source = RecordingFrames(frames)
    loader = pipeline.make_loader(
        source,
        "train",
        batch_size=config.batch_size,
        seed=config.seed,
        num_threads=0,
        process_index=process_index,
        process_count=process_count,
    )
    return source, loader


def _multihost(args) -> None:
    import jax

    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    from tavr_jax.training import train

    config = tiny_config(augment=None)
    state, _, train_fn, _, batch_sharding = train.build_training(config)
    source, loader = recording_loader(
        args.data,
        config,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for _ in range(args.steps):
        batch = next(loader)  # only this process's rows of the global batch
        state, _ = train_fn(state, train.to_global(batch, batch_sharding))
    params = jax.device_get(state["params"])
    np.savez(
        args.out,
        device_count=jax.device_count(),
        process_count=jax.process_count(),
        read=np.asarray(source.read),
        **flat_params(params),
    )


def synthetic_batch(batch_size, size, k, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    visibility = (rng.random((batch_size, k)) < 0.6).astype(np.float32)
    coords = rng.uniform(0, size, (batch_size, k, 2)).astype(np.float32) * visibility[..., None]
    return {
        "image": rng.integers(0, 256, (batch_size, size, size), dtype=np.uint8),
        "visible": visibility,
        "coords": coords,
        "orig_size": np.full((batch_size, 2), size, np.int32),
        "pixel_spacing": np.zeros((batch_size,), np.float32),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "multihost", "launch"])
    parser.add_argument("--workdir")
    parser.add_argument("--data")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint_every", type=int, default=3)
    parser.add_argument("--coordinator")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--out")
    parser.add_argument("--fail_save", help="launch: ERRNO@STEP, e.g. ENOSPC@9")
    args = parser.parse_args()
    {"train": _train, "multihost": _multihost, "launch": _launch}[args.mode](args)
