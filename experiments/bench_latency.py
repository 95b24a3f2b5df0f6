"""Latency / throughput of the keypoint engine per backend, beside its peers (docs/latency.md).

    python experiments/bench_latency.py --backbones=resnet18,resnet34 --image_size=512 \
        --batch_sizes=1,8 --dtypes=float32 --out=bench.json --plot=docs/latency.png
    python experiments/bench_latency.py --backbones=resnet34 --batch_sizes=1,8 --dtypes=float32 \
        --backend=xla,onnxruntime --onnxruntime_peer --out=peers.json
    python experiments/bench_latency.py --backbones=resnet34 --batch_sizes=1,8 --dtypes=float32 \
        --backend=xla,onnxruntime,openvino --onnxruntime_peer --openvino_peer --torch_eager=false \
        --profile=false --out=cpu_peers.json
    python experiments/bench_latency.py --backbones=resnet34 --image_size=512 --batch_sizes=1,8 \
        --dtypes=float32 --backend=xla,onnxruntime,onnxruntime_int8,openvino,openvino_int8 \
        --onnxruntime_peer --openvino_peer --torch_eager=false --profile=false \
        [--background_load] --out=cpu_table.json
    python experiments/bench_latency.py --backbones=resnet34 --stream=cine.dcm --out=stream.json
    python experiments/bench_latency.py --backbones=resnet34 --dtypes=bfloat16 --notorch_eager \
        --torch_modes=eager,max-autotune-no-cudagraphs,reduce-overhead --out=gpu_peers.json
"""

import json
import sys

from absl import app, flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import quiet_third_party
from experiments.benchmarks import latency as bench
from experiments.benchmarks.contenders import make_backend
from experiments.benchmarks.peer_table import peer_table
from tavr_jax.infer.engine import KeypointEngine

_BACKBONES = flags.DEFINE_list("backbones", ["resnet18", "resnet34", "resnet50"], "backbones")
_SIZE = flags.DEFINE_integer("image_size", 512, "network input size")
_FRAME = flags.DEFINE_integer("frame_size", None, "decoded frame size (default: image_size)")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "32", "128"], "batch sizes")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes")
_WORKDIR = flags.DEFINE_string("workdir", None, "trained workdir (default: random weights)")
_OUT = flags.DEFINE_string("out", "bench.json", "results JSON")
_PLOT = flags.DEFINE_string("plot", None, "also plot latency vs batch to this PNG")
_PLOT_WITH = flags.DEFINE_list("plot_with", [], "earlier results JSON files to add to the plot")
_STREAM = flags.DEFINE_string("stream", None, "measure sustained frames/s on this video/DICOM")
_TORCH = flags.DEFINE_bool("torch_eager", True, "also time eager PyTorch (when installed)")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch threads (default: all)")
_PROFILE = flags.DEFINE_bool("profile", True, "time resize / backbone / head separately")
_MIN_TIME = flags.DEFINE_float("min_time", 2.0, "seconds of timed runs per measurement")
_BACKEND = flags.DEFINE_list(
    "backend", ["xla"],
    "engine backends: xla, onnxruntime, onnxruntime_int8, openvino, openvino_int8",
)  # fmt: skip
_WINOGRAD = flags.DEFINE_enum(
    "winograd", "measure", ["measure", "fixed", "off"],
    "the float graphs' Winograd rule, as tavr_export's (measure: each layer shape timed first)",
)  # fmt: skip
_LOAD = flags.DEFINE_bool(
    "background_load", False, "time every row under a competing job keeping one core busy"
)
_ORT_PEER = flags.DEFINE_bool(
    "onnxruntime_peer", False, "also time onnxruntime on torch's ONNX export of the network"
)
_OV_PEER = flags.DEFINE_bool(
    "openvino_peer", False, "also time OpenVINO on torch's ONNX export of the network"
)
_TORCH_MODES = flags.DEFINE_list(
    "torch_modes", [],
    "torch peers beside every row, on jax's device: eager, max-autotune-no-cudagraphs, "
    "reduce-overhead (torch.compile modes; compile time reported apart)",
)  # fmt: skip
_TORCH_BACKEND = flags.DEFINE_string(
    "torch_backend", None, "torch.compile backend of the compiled modes (default: inductor)"
)
_TORCH_BUDGET = flags.DEFINE_float(
    "torch_compile_budget_s", None, "compile seconds per torch mode, after which it is skipped"
)
_PROVIDER = flags.DEFINE_enum(
    "provider", "auto", ["auto", "cpu", "cuda", "tensorrt"], "onnxruntime execution provider"
)


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    timing = {"min_time_s": _MIN_TIME.value, "min_runs": 5}
    try:
        if _STREAM.value:
            b = int(_BATCHES.value[0])
            engine = KeypointEngine.random_init("paper11", _BACKBONES.value[0], _SIZE.value,
                                                batch_size=b, dtype=_DTYPES.value[0])  # fmt: skip
            engine = make_backend(_BACKEND.value[0], engine, _PROVIDER.value,
                                  winograd=_WINOGRAD.value)  # fmt: skip
            result = bench.bench_stream(engine, _STREAM.value)
        else:
            result = bench.run_benchmark(
                backbones=_BACKBONES.value, image_size=_SIZE.value, frame_size=_FRAME.value,
                batch_sizes=[int(b) for b in _BATCHES.value], dtypes=_DTYPES.value,
                workdir=_WORKDIR.value, torch_eager=_TORCH.value, timing=timing,
                torch_threads=_TORCH_THREADS.value, profile=_PROFILE.value,
                backends=_BACKEND.value, onnxruntime_peer=_ORT_PEER.value,
                openvino_peer=_OV_PEER.value, provider=_PROVIDER.value,
                winograd=_WINOGRAD.value, load=_LOAD.value, out=_OUT.value,
                torch_modes=_TORCH_MODES.value, torch_backend=_TORCH_BACKEND.value,
                torch_compile_budget_s=_TORCH_BUDGET.value,
            )  # fmt: skip
            if _PLOT.value:
                earlier = [json.loads(open(p).read()) for p in _PLOT_WITH.value]
                bench.plot_latency([*earlier, result], _PLOT.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    write_json_atomic(_OUT.value, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "profile")}, indent=1))
    if "rows" in result:
        print(peer_table(result))


if __name__ == "__main__":
    app.run(main)
