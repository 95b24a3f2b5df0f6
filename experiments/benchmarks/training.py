"""Training throughput: images/s of the whole jitted train step and XLA's FLOP count of it
(docs/training.md)."""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cardiac_core.xla import compiler_options, model_flops
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
    state_dtype: str = "float32",
) -> tuple[dict, train.State]:
    """Training images/s of `config` on this machine's devices (median of `repeats`).

    Times the jitted train step (augmentation included) on a device-resident batch and, when
    `data_dir` is given, fed by the real input pipeline (`make_loader`, host to device).
    `state` (from an earlier call with the same backbone) skips the weight initialisation:
    the parameters are fp32 whatever the compute dtype, and their values do not change the
    speed. state_dtype "bfloat16" keeps the parameters, batch statistics and optimizer moments
    in bf16 (`bf16_state`; the training itself keeps them in fp32), to measure what fp32 state
    costs; augmentation is the config's (`config.augment = None`: none).

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
    if state_dtype == "bfloat16":
        state = bf16_state(state)
    elif state_dtype != "float32":
        raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype!r}")
    train_fn, _, batch_sharding = train.make_step_fns(
        model, tx, learning_rate_fn, schema, config, mesh, state_sharding
    )
    if state_dtype == "bfloat16":
        step = functools.partial(train.train_step, model=model, tx=tx, schema=schema,
                                 learning_rate_fn=learning_rate_fn, config=config)  # fmt: skip
        train_fn = _keeping_dtypes(step, mesh.devices.flat[0].platform)
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
        "state_dtype": state_dtype,
        "augment": config.augment is not None,
        "layout": "NHWC",  # Flax's convolutions: (batch, height, width, channels)
    }
    return result, state


def _keeping_dtypes(train_step, platform: str):
    """The jitted step with its new state cast back to the dtypes of the state it was given
    (the optimizer's bias correction promotes bf16 moments' updates to fp32), so one compiled
    step runs every step; the state is donated, as in training."""

    def step(state, batch):
        new, metrics = train_step(state, batch)
        return jax.tree.map(lambda n, o: n.astype(o.dtype), new, state), metrics

    return jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options(platform))


def bf16_state(state: train.State) -> train.State:
    """The state with its float leaves (parameters, batch statistics, optimizer moments) in
    bf16; the step count, the RNG and the optimizer's counters keep their types."""
    return jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )


def parse_variant(spec: str) -> dict:
    """'bfloat16:128', 'bfloat16:64:noaug', 'bfloat16:64:bf16_state' -> {dtype, batch_size,
    augment, state_dtype}: one row of bench_train's `--variants`."""
    dtype, batch, *options = spec.split(":")
    unknown = [o for o in options if o not in ("noaug", "bf16_state")]
    if dtype not in ("float32", "bfloat16") or not batch.isdigit() or unknown:
        raise ValueError(
            f"bad training variant {spec!r}: DTYPE:BATCH[:noaug][:bf16_state], "
            "DTYPE float32 or bfloat16"
        )
    return {"dtype": dtype, "batch_size": int(batch), "augment": "noaug" not in options,
            "state_dtype": "bfloat16" if "bf16_state" in options else "float32"}  # fmt: skip
