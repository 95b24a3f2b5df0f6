"""Where onnxruntime spends its time: our ONNX graph beside torch's export of the same network.

python experiments/bench_ort_ops.py --backbone=resnet34 --image_size=512 --runs=25

Both sessions run the same uint8 frame in alternation (in a new random order every round), with
onnxruntime's profiler on; prints each one's median latency and its kernel time per op type.
"""

import collections
import json
import pathlib
import tempfile

import numpy as np
from absl import app, flags

from cardiac_core.logs import quiet_third_party
from cardiac_core.timing import time_interleaved
from experiments.benchmarks.torch_reference import export_onnx_bytes, keypoint_net
from tavr_jax.infer import onnx_export, onnx_runtime
from tavr_jax.infer.engine import KeypointEngine
from tavr_jax.schema import get_schema

_BACKBONE = flags.DEFINE_string("backbone", "resnet34", "backbone")
_HEAD = flags.DEFINE_string("head", "regression", "head of our graph (the peer has the paper's)")
_SIZE = flags.DEFINE_integer("image_size", 512, "network input and frame size")
_RUNS = flags.DEFINE_integer("runs", 25, "timed runs of each graph (after 2 to warm up)")
WARMUP = 2
_TOP = flags.DEFINE_integer("top", 8, "op types listed per graph")


def op_times(profile_path: str, runs: int) -> collections.Counter:
    """ms per run of each op type from an onnxruntime profile."""
    per_op = collections.Counter()
    for event in json.loads(pathlib.Path(profile_path).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    return per_op


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    del argv
    schema, size, runs = get_schema("paper11"), _SIZE.value, _RUNS.value
    engine = KeypointEngine.random_init(schema, _BACKBONE.value, size, head=_HEAD.value)
    graphs = {
        "ours": onnx_export.engine_graph(engine.meta, engine.variables, frame_size=(size, size)),
        "torch export": export_onnx_bytes(
            keypoint_net(_BACKBONE.value, schema, size), (1, size, size)
        ),  # fmt: skip
    }
    frames = np.random.default_rng(0).integers(0, 256, (1, size, size), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {name: onnx_runtime.make_session(g, profile_prefix=f"{tmp}/{i}")
                    for i, (name, g) in enumerate(graphs.items())}  # fmt: skip
        timed = time_interleaved(
            [lambda s=s: s.run(None, {"frames": frames}) for s in sessions.values()],
            warmup=WARMUP, min_runs=runs, max_runs=runs, min_time_s=0.0, shuffle_seed=0,
        )  # fmt: skip
        times = dict(zip(sessions, timed, strict=True))
        for name, session in sessions.items():
            per_op = op_times(session.end_profiling(), WARMUP + runs)
            print(f"{name}: median {1e3 * np.median(times[name]):.1f} ms, "
                  f"kernels {sum(per_op.values()):.1f} ms per run")  # fmt: skip
            for op, ms in per_op.most_common(_TOP.value):
                print(f"  {op:24s} {ms:8.2f} ms")
    ratio = np.median(times["ours"] / times["torch export"])
    print(f"ours / torch export: {ratio:.3f} (median of paired runs)")


if __name__ == "__main__":
    app.run(main)
