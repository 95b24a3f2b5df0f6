"""Training throughput: images/s of the whole jitted train step and XLA's FLOP count of it
(docs/training.md)."""

from __future__ import annotations

import pathlib
import time

import jax
import ml_collections
import numpy as np

from cardiac_core.xla import model_flops
from experiments.benchmarks.timing import time_runs
from tavr_jax.data.pipeline import make_loader
from tavr_jax.run.workdir import build_model
from tavr_jax.training import train


def training_rate(
    config: ml_collections.ConfigDict,
    *,
    steps: int = 10,
    repeats: int = 3,
    data_dir: str | pathlib.Path | None = None,
    state: train.State | None = None,
) -> tuple[dict, train.State]:
    """Training images/s of `config` on this machine's devices (median of `repeats`).

    Times the jitted train step (augmentation included) on a device-resident batch and, when
    `data_dir` is given, fed by the real input pipeline (`make_loader`, host to device).
    `state` (from an earlier call with the same backbone) skips the weight initialisation:
    the parameters are fp32 whatever the compute dtype, and their values do not change the
    speed.

    Returns:
      (result, state to pass on). result has `images_per_s` (device-resident),
      `images_per_s_pipeline` (or None), `flops_per_step` (the global batch's convolutions and
      products,
      `cardiac_core.xla.model_flops`), `tflops_per_s`, `compile_s`, `devices`, `device_kind`.
    """
    mesh = train.make_mesh()
    model, schema = build_model(config)
    tx, learning_rate_fn = train.make_optimizer(config)
    if state is None:
        state, state_sharding = train.create_train_state(config, model, tx, mesh)
    else:
        state_sharding = jax.tree.map(lambda x: x.sharding, state)
    train_fn, _, batch_sharding = train.make_step_fns(
        model, tx, learning_rate_fn, schema, config, mesh, state_sharding
    )
    rng = np.random.default_rng(0)
    b, s, k = config.batch_size, config.image_size, schema.num_points
    host_batch = {
        "image": rng.integers(0, 256, (b, s, s), dtype=np.uint8),
        "visible": (rng.random((b, k)) < 0.7).astype(np.float32),
        "coords": rng.uniform(0, s, (b, k, 2)).astype(np.float32),
    }
    batch = train.to_global(host_batch, batch_sharding)
    t0 = time.perf_counter()
    compiled = train_fn.lower(state, batch).compile()  # with training's own compile options
    compile_s = time.perf_counter() - t0
    flops = model_flops(train_fn, state, batch)  # the global batch's, on any backend

    def images_per_s(next_batch) -> float:
        def run():
            nonlocal state
            for _ in range(steps):
                state, metrics = compiled(state, next_batch())
            jax.block_until_ready((state, metrics))

        times = time_runs(run, warmup=1, min_runs=repeats, min_time_s=0.0, max_runs=repeats)
        return float(np.median(steps * b / times))

    device_rate = images_per_s(lambda: batch)
    pipeline_rate = None
    if data_dir is not None:
        it = make_loader(
            data_dir,
            "train",
            schema=schema,
            image_size=s,
            batch_size=b,
            seed=0,
            shuffle=True,
            num_workers=config.data.num_workers,
            val_fraction=0.0,
        )
        pipeline_rate = images_per_s(lambda: train.to_global(next(it), batch_sharding))
    result = {
        "images_per_s": device_rate,
        "images_per_s_pipeline": pipeline_rate,
        "flops_per_step": flops,
        "tflops_per_s": flops * device_rate / b / 1e12,
        "compile_s": compile_s,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
    }
    return result, state
