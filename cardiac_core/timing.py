"""Timing on a shared machine: contenders run in alternation, and the CPU they ran on.

The latency benchmarks and the export's Winograd measurement (`tavr_jax.infer.winograd_measure`)
time through `time_interleaved`, so that "paired runs" mean the same thing in each; every
figure they record names the CPU (`cpu_model`).
"""

from __future__ import annotations

import platform
import time

import numpy as np


def time_interleaved(fns, *, warmup: int = 2, min_runs: int = 5, min_time_s: float = 2.0,
                     max_runs=200, shuffle_seed=None) -> list[np.ndarray]:  # fmt: skip
    """Seconds per call of each of `fns`, run in alternation so that load from other processes
    on a shared machine falls on all of them alike; ratios of paired runs are robust.

    shuffle_seed: run each round's contenders in a new random order. Thread pools linger after
    a call (onnxruntime's and OpenMP's threads spin for a while), so in a fixed order each
    contender would always start in the wake of the same neighbour.
    """
    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_runs and (
        len(times[0]) < min_runs or time.perf_counter() - start < min_time_s * len(fns)
    ):
        for i in range(len(fns)) if rng is None else rng.permutation(len(fns)):
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [np.asarray(t) for t in times]


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), whatever device jax runs on."""
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return model
