"""Timing helpers shared by every benchmark: warm-up, medians and percentiles (side-by-side runs:
`cardiac_core.timing.time_interleaved`).

Every benchmark of the project times through these, so "p50" and "interleaved" mean the same
thing in every table of docs/.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from cardiac_core.timing import cpu_model
from cardiac_core.xla import compile_lowered


def time_runs(fn, *, warmup: int = 2, min_runs: int = 5, min_time_s: float = 2.0, max_runs=200):
    """Seconds per call of `fn()` after `warmup` calls: at least min_runs and min_time_s."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (
        len(times) < min_runs or time.perf_counter() - start < min_time_s
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and its live children (e.g. grain workers)."""
    total = time.process_time()  # finer than psutil's 10 ms ticks
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def time_runs_cpu(fn, *, warmup: int = 1, runs: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(wall seconds, CPU seconds) of each of `runs` calls of `fn()` after `warmup` calls.

    On a shared machine the wall clock measures the neighbours too; CPU seconds (this process
    and its children) say what a dedicated core would do.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    return np.asarray(wall), np.asarray(cpu)


def percentiles_ms(times) -> dict:
    p50, p90, p99 = np.percentile(np.asarray(times) * 1e3, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "runs": len(times)}


def device_description() -> str:
    d = jax.devices()[0]
    if d.platform != "cpu":
        return f"{d.platform}: {d.device_kind}"
    return f"cpu: {cpu_model()}, {os.cpu_count()} logical cores visible"


def peak_matmul(n: int = 2048, dtype=jnp.float32):
    """(fn, flops): a jitted n x n x n matmul (2 n^3 flops), the machine's practical peak."""
    a = jax.device_put(jnp.ones((n, n), dtype))
    b = jax.device_put(jnp.ones((n, n), dtype) * 0.5)
    mm = compile_lowered(jax.jit(jnp.matmul).lower(a, b), jax.devices()[0].platform)
    return (lambda: mm(a, b).block_until_ready()), 2.0 * n**3
