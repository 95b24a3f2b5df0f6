"""Frames/s of the aortography simulator on one CPU thread (docs/data.md)."""

from __future__ import annotations

import itertools
import time

import cv2
import numpy as np

from experiments.benchmarks.timing import time_runs_cpu
from tavr_jax.data import simulate
from tavr_jax.schema import KeypointSchema


def simulator_rate(
    schema: KeypointSchema, *, size: int = 512, frames: int = 20, repeats: int = 5, seed: int = 0
) -> dict:
    """Frames/s of `simulate_case`, case set-up included: medians over `repeats` cases.

    Each run simulates a new case of `frames` frames. `frames_per_s` is wall-clock;
    `frames_per_cpu_s` counts this process's CPU seconds, what one dedicated core would
    deliver when the machine is shared. `setup_ms` is the per-case scene (root, thorax,
    devices) alone.
    """
    cases = itertools.count()
    setups = []

    def one_case():
        rng = np.random.default_rng([seed, next(cases)])
        params = simulate.sample_case(rng, size)
        t0 = time.perf_counter()
        simulate.CaseRenderer(params, size)
        setups.append(time.perf_counter() - t0)
        simulate.simulate_case(rng, schema, frames=frames, size=size, params=params)

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        wall, cpu = time_runs_cpu(one_case, warmup=1, runs=repeats)
    finally:
        cv2.setNumThreads(threads)
    return {
        "frames_per_s": float(np.median(frames / wall)),
        "frames_per_cpu_s": float(np.median(frames / cpu)),
        "setup_ms": float(np.median(setups[1:]) * 1e3),
        "frames": frames,
        "repeats": repeats,
    }
