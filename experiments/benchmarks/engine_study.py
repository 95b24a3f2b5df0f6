"""Where the compiled engine's batch-1 time goes, and what changes it (the GPU campaign's
`engine` stage, docs/gpu/README.md).

One process: a profiler trace of the batch-1 engine (`xla_profile.profile_trace`: kernels per
call, the 15 slowest with their share, idle time between kernels); the engine's variants
(`KeypointEngine` options: the jitted function instead of the ahead-of-time executable, the
outputs packed into one array, bf16 from the input onward with the normalisation folded into
the first convolution), timed end to end in alternation with the default; and the pipelined
rate against one call at a time at the larger batches, from pageable and from pinned host
memory. XLA flags (command buffers, the autotuning level) act on the whole process, so each
flag variant is its own process (`flag_variant`), timed against the default measured here.
Every part is guarded: a variant that fails is a row with its error.
"""

from __future__ import annotations

import datetime
import tempfile
import time

import jax
import numpy as np

from cardiac_core.fileio import write_json_atomic
from cardiac_core.timing import time_interleaved
from experiments.benchmarks.latency import pipelined_frames_per_s
from experiments.benchmarks.timing import device_description, percentiles_ms, time_runs
from experiments.benchmarks.xla_profile import profile_trace
from tavr_jax.infer.engine import KeypointEngine

# name -> KeypointEngine options; "aot" is the default engine every other is compared with.
VARIANTS = {
    "aot": {},
    "jit": {"call": "jit"},
    "packed_outputs": {"packed_outputs": True},
    "fused_input": {"fused_input": True},
    "fused_input_packed": {"fused_input": True, "packed_outputs": True},
}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _frames(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch, size, size), np.uint8)


def _end_to_end(engine: KeypointEngine, frames: np.ndarray):
    return lambda: engine.fetch(engine.dispatch(frames), len(frames))


def _compile_s(engine: KeypointEngine, frames: np.ndarray) -> float:
    t0 = time.perf_counter()
    engine.fetch(engine.dispatch(frames))  # compiles (AOT or jit) and runs once
    return time.perf_counter() - t0


def time_variants(base: KeypointEngine, frames: np.ndarray, variants=VARIANTS,
                  **timing) -> list[dict]:  # fmt: skip
    """One row per variant: end-to-end p50/p99 of host uint8 frames to host keypoints, timed
    in alternation with the others, and `ratio_vs_aot` (the median of paired runs' ratios to
    the default engine), its compile time and its largest output difference to the default."""
    rows, engines = [], {}
    for name, options in variants.items():
        row = {"variant": name, "options": options}
        try:
            engine = KeypointEngine(base.model, base.variables, base.meta, **options,
                                    batch_size=len(frames), dtype=base.dtype_name)  # fmt: skip
            row["compile_s"] = _compile_s(engine, frames)
            engines[name] = engine
        except Exception as e:  # a variant this jaxlib or backbone cannot build
            row["error"] = _error(e)
        rows.append(row)
    names = list(engines)
    times = dict(zip(names, time_interleaved([_end_to_end(engines[n], frames) for n in names],
                                             shuffle_seed=0, **timing), strict=True))  # fmt: skip
    reference = engines["aot"].fetch(engines["aot"].dispatch(frames)) if "aot" in engines else None
    for row in rows:
        t = times.get(row["variant"])
        if t is None:
            continue
        row["end_to_end"] = percentiles_ms(t)
        if "aot" in times:
            row["ratio_vs_aot"] = float(np.median(t / times["aot"]))
        if reference is not None:
            out = engines[row["variant"]].fetch(engines[row["variant"]].dispatch(frames))
            row["max_abs_difference"] = {k: float(np.abs(out[k] - reference[k]).max())
                                         for k in reference}  # fmt: skip
    return rows


def pinned_put(engine: KeypointEngine, frames: np.ndarray):
    """frames in pinned host memory (a `jax.Array`), or None where this backend has none."""
    kinds = {m.kind for m in engine.device.addressable_memories()}
    if "pinned_host" not in kinds:
        return None
    sharding = jax.sharding.SingleDeviceSharding(engine.device, memory_kind="pinned_host")
    return jax.block_until_ready(jax.device_put(engine._pad(frames), sharding))


def pipelined_pinned_frames_per_s(engine, pinned, *, batches: int = 8, runs: int = 3) -> float:
    """`latency.pipelined_frames_per_s` with the frames already in pinned host memory (as a
    loader that decodes into pinned buffers leaves them): each batch's upload is a DMA from
    pinned memory, started before the previous batch is read back."""
    n = pinned.shape[0]
    on_device = jax.sharding.SingleDeviceSharding(engine.device, memory_kind="device")

    def run():
        uploads = ((None, jax.device_put(pinned, on_device)) for _ in range(batches))
        for _ in engine.run_batches(uploads):
            pass

    times = time_runs(run, warmup=1, min_runs=runs, min_time_s=0.0, max_runs=runs)
    return batches * n / float(np.median(times))


def pipelined_rows(base: KeypointEngine, frame_size: int, batch_sizes, *, batches: int = 8,
                   runs: int = 3, **timing) -> list[dict]:  # fmt: skip
    """Per batch size: frames/s of one call at a time (end to end, p50) beside the pipelined
    rate (`run_batches`: batch k + 1's upload and launch overlap batch k) from pageable host
    memory and from pinned host memory (None where JAX has no pinned memory here)."""
    rows = []
    for b in batch_sizes:
        row = {"batch": b}
        try:
            engine = base.with_batch_size(b)
            frames = _frames(b, frame_size)
            row["compile_s"] = _compile_s(engine, frames)
            t = time_runs(_end_to_end(engine, frames), **timing)
            row["one_call_frames_per_s"] = b / float(np.median(t))
            row["pipelined_frames_per_s"] = pipelined_frames_per_s(
                engine, frames, batches=batches, runs=runs
            )
            pinned = pinned_put(engine, frames)
            row["pipelined_pinned_frames_per_s"] = (
                None if pinned is None
                else pipelined_pinned_frames_per_s(engine, pinned, batches=batches, runs=runs)
            )  # fmt: skip
        except Exception as e:  # e.g. out of memory at the largest batch
            row["error"] = _error(e)
        rows.append(row)
    return rows


def engine_study(out, *, backbone: str, image_size: int, dtype: str, batch: int = 1,
                 pipelined_batches=(32, 128, 256), profile_calls: int = 20,
                 min_time: float = 0.3, progress=print) -> dict:  # fmt: skip
    """The engine stage: profile, variants, pipelined rates; `out` is rewritten after each."""
    timing = {"min_time_s": min_time, "min_runs": 5, "warmup": 2}
    base = KeypointEngine.random_init("paper11", backbone, image_size, batch_size=batch,
                                      dtype=dtype)  # fmt: skip
    result = {"device": device_description(), "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "backbone": backbone,
              "image_size": image_size, "dtype": dtype, "batch": batch, "profile": None,
              "variants": [], "pipelined": []}  # fmt: skip
    frames = _frames(batch, image_size)
    try:
        with tempfile.TemporaryDirectory() as trace_dir:
            result["profile"] = profile_trace(base, frames, trace_dir, calls=profile_calls)
    except Exception as e:  # no profiler plugin, an unreadable trace
        result["profile"] = {"error": _error(e)}
    progress(f"engine profile: {_brief(result['profile'])}")
    write_json_atomic(out, result)
    result["variants"] = time_variants(base, frames, **timing)
    for row in result["variants"]:
        progress(f"engine variant {row['variant']}: "
                 f"{row.get('end_to_end', {}).get('p50_ms', row.get('error'))}")  # fmt: skip
    write_json_atomic(out, result)
    result["pipelined"] = pipelined_rows(base, image_size, pipelined_batches, **timing)
    for row in result["pipelined"]:
        progress(f"engine pipelined: {row}")
    write_json_atomic(out, result)
    return result


def flag_variant(out, *, name: str, backbone: str, image_size: int, dtype: str,
                 batch: int = 1, min_time: float = 0.3) -> dict:  # fmt: skip
    """The default engine's end-to-end time in a process started with XLA flags (XLA reads
    them once, when the backend starts): its row of the engine stage, written to `out`."""
    import os

    timing = {"min_time_s": min_time, "min_runs": 5, "warmup": 2}
    row = {"variant": name, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        engine = KeypointEngine.random_init("paper11", backbone, image_size, batch_size=batch,
                                            dtype=dtype)  # fmt: skip
        frames = _frames(batch, image_size)
        row["compile_s"] = _compile_s(engine, frames)
        row["end_to_end"] = percentiles_ms(time_runs(_end_to_end(engine, frames), **timing))
    except Exception as e:
        row["error"] = _error(e)
    write_json_atomic(out, row)
    print(row, flush=True)
    return row


def _brief(profile: dict | None) -> str:
    if not profile or "error" in profile:
        return str((profile or {}).get("error"))
    return (f"{profile.get('kernels')} kernels per call, top 15 {profile.get('top15_share')}, "
            f"idle {profile.get('idle_us')} us of {profile.get('call_us')} us")  # fmt: skip
