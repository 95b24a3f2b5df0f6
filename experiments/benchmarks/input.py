"""Input throughput: the host loader (frames/s, frames per CPU-second) and the on-device
augmentation (docs/input_pipeline.md)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from experiments.benchmarks.timing import cpu_seconds, time_runs, time_runs_cpu
from tavr_jax.data import augment, pipeline
from tavr_jax.schema import KeypointSchema


def decode_rate(source, split: str = "train", *, image_size=None, threads=None):
    """Frames/s of decoding a split into memory once (`pipeline.open_frames`, in_memory).

    Returns (result, the decoded frames).
    """
    t0, c0 = time.perf_counter(), cpu_seconds()
    frames = pipeline.open_frames(
        source, split, in_memory=True, decode_threads=threads, image_size=image_size
    )
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    result = {
        "frames": len(frames),
        "frames_per_s": len(frames) / wall,
        "frames_per_cpu_s": len(frames) / max(cpu, 1e-9),
        "threads": threads or os.cpu_count(),
        "gib": frames.nbytes / 2**30,
    }
    return result, frames


def loader_rate(
    source,
    split: str = "train",
    *,
    batch_size: int = 32,
    batches: int = 40,
    repeats: int = 5,
    num_workers: int = 0,
    num_threads: int = 2,
    in_memory: bool | None = False,
    image_size: int | None = None,
) -> dict:
    """Host frames/s of `make_loader`: medians over repeats of `batches` batches after warm-up.

    `source` may be a path or frames already opened (e.g. decoded) by `pipeline.open_frames`.
    Also frames per CPU-second (this process and its workers): on a shared machine the
    wall-clock rate says more about the neighbours than about the pipeline.
    """
    it = pipeline.make_loader(
        source,
        split,
        batch_size=batch_size,
        seed=0,
        num_workers=num_workers,
        num_threads=num_threads,
        in_memory=in_memory,
        image_size=image_size,
    )

    def run():
        for _ in range(batches):
            next(it)

    try:
        for _ in range(max(2, num_workers * 2)):  # worker start-up and first reads
            next(it)
        wall, cpu = time_runs_cpu(run, warmup=0, runs=repeats)
    finally:
        if num_workers > 0:
            it.close()
    frames = batches * batch_size
    return {
        "frames_per_s": float(np.median(frames / wall)),
        "frames_per_cpu_s": float(np.median(frames / np.maximum(cpu, 1e-9))),
        "runs": (frames / wall).tolist(),
    }


def augment_rate(
    schema: KeypointSchema,
    *,
    image_size: int = 512,
    batch_size: int = 32,
    repeats: int = 10,
    config: augment.AugmentConfig | None = None,
) -> dict:
    """Frames/s of `augment_batch` on the default device: median of repeats after warm-up."""
    rng = np.random.default_rng(0)
    k = schema.num_points
    batch = {
        "image": rng.integers(0, 256, (batch_size, image_size, image_size), np.uint8),
        "visible": np.ones((batch_size, k), np.float32),
        "coords": rng.uniform(0, image_size, (batch_size, k, 2)).astype(np.float32),
    }
    batch = jax.device_put(batch)  # time the augmentation, not the host-to-device copy
    key = jax.random.key(0)
    step = iter(range(1 << 30))

    def call():
        rng_i = jax.random.fold_in(key, next(step))
        jax.block_until_ready(augment.augment_batch(rng_i, batch, schema, config))

    times = time_runs(call, warmup=1, min_runs=repeats, min_time_s=0.0, max_runs=repeats)
    return {
        "frames_per_s": float(np.median(batch_size / times)),
        "runs": (batch_size / times).tolist(),
        "device": str(batch["image"].device),
    }
