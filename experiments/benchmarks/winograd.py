"""Direct against Winograd 3x3 convolutions on onnxruntime, one layer size at a time
(`bench_winograd.py`)."""

import numpy as np

from experiments.benchmarks.timing import time_interleaved
from tavr_jax.infer import onnx_export, onnx_runtime, winograd


def layer_chain(channels: int, size: int, layers: int, as_winograd: bool, seed: int = 0):
    """`layers` x (3x3 SAME convolution, ReLU) on (N, C, S, S) float32, as a ModelProto."""
    rng = np.random.default_rng(seed)
    g = onnx_export.Graph(winograd=False)
    x = "x"
    for _ in range(layers):
        kernel = rng.normal(0, np.sqrt(2 / (9 * channels)), (channels, channels, 3, 3))
        bias = rng.normal(0, 0.1, channels)
        if as_winograd:
            x = g.winograd_conv(x, kernel, bias, (size, size))
        else:  # Flax's HWIO kernel
            x = g.conv(x, {"kernel": kernel.transpose(2, 3, 1, 0), "bias": bias}, pad=1)
        x = g.op("Relu", x)
    tensor, f32 = g.onnx.helper.make_tensor_value_info, g.onnx.TensorProto.FLOAT
    return g.model("layers", [tensor("x", f32, ["n", channels, size, size])],
                   [tensor(x, f32, None)])  # fmt: skip


def measure(channels: int, size: int, *, batch: int, layers: int, min_time: float) -> dict:
    """Both chains of one size timed in alternation: ms per layer, paired ratio, difference."""
    x = np.random.default_rng(1).normal(size=(batch, channels, size, size)).astype(np.float32)
    # Not spinning: on 2 cores, one session's spinning pool doubled the other's layer time.
    sessions = [onnx_runtime.make_session(layer_chain(channels, size, layers, w), spin=False)
                for w in (False, True)]  # fmt: skip
    direct, fast = (s.run(None, {"x": x})[0] for s in sessions)
    times = time_interleaved([lambda s=s: s.run(None, {"x": x}) for s in sessions],
                             min_time_s=min_time, shuffle_seed=0)  # fmt: skip
    return {
        "channels": channels, "size": size, "batch": batch, "layers": layers,
        "direct_ms_per_layer": float(np.median(times[0])) * 1e3 / layers,
        "winograd_ms_per_layer": float(np.median(times[1])) * 1e3 / layers,
        "winograd_over_direct": float(np.median(times[1] / times[0])),
        "max_rel_difference": float(np.abs(fast - direct).max() / np.abs(direct).max()),
        "winograd_pays": winograd.pays(channels, channels, (size, size)),
        "runs": len(times[0]),
    }  # fmt: skip
