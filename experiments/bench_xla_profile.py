"""Where the XLA engine's time goes on this CPU, one batch (docs/latency.md).

    python experiments/bench_xla_profile.py --backbone=resnet34 --image_size=512 --batch=1 \
        --min_time=1 --out=xla_profile.json

Prints the engine's whole time beside its convolutions (each timed alone, on XLA and on
onnxruntime's direct kernels), the max pool, the uint8 frames' way to the first layer and the
rest by difference, and the compiled program's top-level operations and layout changes.
"""

import json

from absl import app, flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import quiet_third_party
from cardiac_core.timing import cpu_model
from experiments.benchmarks.xla_profile import profile_engine

_BACKBONE = flags.DEFINE_string("backbone", "resnet34", "backbone")
_SIZE = flags.DEFINE_integer("image_size", 512, "network input (and frame) size")
_BATCH = flags.DEFINE_integer("batch", 1, "frames per call")
_MIN_TIME = flags.DEFINE_float("min_time", 1.0, "seconds of timed runs per contender")
_OUT = flags.DEFINE_string("out", None, "also write the profile to this JSON")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])
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
