"""Where the XLA engine's time goes on this CPU, one batch (docs/latency.md).

    python experiments/bench_xla_profile.py --backbone=resnet34 --image_size=512 --batch=1 \
        --min_time=1 --out=xla_profile.json

Prints the engine's whole time beside its convolutions (each timed alone, on XLA and on
onnxruntime's direct kernels), the max pool, the uint8 frames' way to the first layer and the
rest by difference, and the compiled program's top-level operations and layout changes.
With --trace_calls=N it profiles N end-to-end calls under `jax.profiler` instead, on whatever
device jax runs (the GPU campaign's `profile`): kernels per call, the 15 slowest with their
share, idle time between kernels.

    python experiments/bench_xla_profile.py --backbone=resnet34 --image_size=512 \
        --dtype=bfloat16 --trace_calls=20 --out=trace_profile.json
"""

import json
import tempfile

import numpy as np
from absl import app, flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import quiet_third_party
from cardiac_core.timing import cpu_model
from experiments.benchmarks.xla_profile import profile_engine, profile_trace
from tavr_jax.infer.engine import KeypointEngine

_BACKBONE = flags.DEFINE_string("backbone", "resnet34", "backbone")
_SIZE = flags.DEFINE_integer("image_size", 512, "network input (and frame) size")
_BATCH = flags.DEFINE_integer("batch", 1, "frames per call")
_MIN_TIME = flags.DEFINE_float("min_time", 1.0, "seconds of timed runs per contender")
_OUT = flags.DEFINE_string("out", None, "also write the profile to this JSON")
_TRACE = flags.DEFINE_integer("trace_calls", 0, "profile this many calls with jax.profiler")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "with --trace_calls")


def trace(argv):
    """--trace_calls: the profiler's view of the engine, on jax's device."""
    del argv
    engine = KeypointEngine.random_init("paper11", _BACKBONE.value, _SIZE.value,
                                        batch_size=_BATCH.value, dtype=_DTYPE.value)  # fmt: skip
    frames = np.random.default_rng(0).integers(0, 256, (_BATCH.value, _SIZE.value, _SIZE.value),
                                               np.uint8)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        p = profile_trace(engine, frames, tmp, calls=_TRACE.value)
    if _OUT.value:
        write_json_atomic(_OUT.value, p)
    print(
        f"{p['kernels']} kernels per call; call {p['call_us']} us: before the first kernel "
        f"{p['before_us']} us, kernels busy {p['busy_us']} us, idle between them "
        f"{p['idle_us']} us, after the last {p['after_us']} us; top 15 share {p['top15_share']}"
    )
    for k in p["top"]:
        print(f"{k['us']:9.1f} us {100 * k['share']:5.1f}%  {k['name']}")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])
    if _TRACE.value:
        return trace(argv)
    del argv
    p = profile_engine(_BACKBONE.value, _SIZE.value, batch=_BATCH.value,
                       min_time_s=_MIN_TIME.value, warmup=2, min_runs=5)  # fmt: skip
    p["cpu"] = cpu_model()
    if _OUT.value:
        write_json_atomic(_OUT.value, p)
    print(f"{p['cpu']}: {p['backbone']} {p['image_size']} px, batch {p['batch']}: "
          f"whole {p['whole_ms']:.1f} ms = convolutions {p['convolutions_ms']:.1f} "
          f"(onnxruntime's direct kernels: {p['convolutions_onnxruntime_ms']:.1f}; the first, on "
          f"1 channel: {p['first_convolution_ms']:.1f}) + max pool {p['max_pool_ms']:.1f} "
          f"+ frames to the first layer {p['frames_to_first_layer_ms']:.1f} + the rest "
          f"{p['rest_ms']:.1f}")  # fmt: skip
    print("| input NHWC | kernel HWIO | stride | count | XLA ms | onnxruntime ms |")
    print("|---|---|---|---|---|---|")
    for r in p["convolutions"]:
        print(f"| {r['input_nhwc']} | {r['kernel_hwio']} | {r['stride']} | {r['count']} "
              f"| {r['xla_ms']:.2f} | {r['onnxruntime_ms']:.2f} |")  # fmt: skip
    print(json.dumps({k: p[k] for k in ("top_level_operations", "layout_changes")}))


if __name__ == "__main__":
    app.run(main)
