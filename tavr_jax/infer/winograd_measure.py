"""The Winograd rule measured on the machine at hand, per layer shape, on the target runtime.

A rule chosen on one CPU loses on another: with the fixed rule (`winograd.pays`, timed on an
AMD EPYC) our graph on onnxruntime took 0.78-0.87 of the time of torch's export there, and
1.06-1.19x on an Intel Xeon. So the export times each distinct 3x3 stride-1 layer shape of the
network (channels in and out, map size) as a direct and as a Winograd convolution, on the
runtime the file is meant for, and writes Winograd where it measured faster. The shapes are
measured when the graph is written (`onnx_export.Graph` asks the rule), each once per rule:
ResNet34 at 512 px has four, measured in 5-7 s on a 2-core AMD EPYC. The file records the
rule (`metadata`): the CPU, the runtime, the date and every shape's timings with the load
average they were taken at, since other work on the cores changes the answer.
"""

from __future__ import annotations

import datetime
import os

import numpy as np

from cardiac_core.timing import cpu_model, time_interleaved
from tavr_jax.infer import onnx_export, winograd

RUNTIMES = ("onnxruntime", "openvino")
# Winograd must take at most this fraction of the direct convolution's time: its transformed
# kernels hold 4x the memory once the session is made, and a closer call is within the noise
# of a short measurement on a shared machine.
MARGIN = 0.97


def layer_graph(c_in: int, c_out: int, hw, *, as_winograd: bool, layers: int = 1, seed: int = 0):
    """`layers` x (3x3 SAME convolution, ReLU) on (N, c_in, H, W) float32 as a ModelProto: the
    first c_in -> c_out, the others c_out -> c_out; direct or Winograd (`winograd.write_conv`)."""
    rng = np.random.default_rng(seed)
    g = onnx_export.Graph(winograd=False)
    x = "x"
    for i in range(layers):
        n_in = c_in if i == 0 else c_out
        kernel = rng.normal(0, np.sqrt(2 / (9 * n_in)), (c_out, n_in, 3, 3))
        bias = rng.normal(0, 0.1, c_out)
        if as_winograd:
            x = g.winograd_conv(x, kernel, bias, hw)
        else:  # Flax's HWIO kernel
            x = g.conv(x, {"kernel": kernel.transpose(2, 3, 1, 0), "bias": bias}, pad=1)
        x = g.op("Relu", x, name="y" if i == layers - 1 else None)
    tensor, f32 = g.onnx.helper.make_tensor_value_info, g.onnx.TensorProto.FLOAT
    return g.model("layers", [tensor("x", f32, ["n", c_in, *hw])], [tensor("y", f32, None)])


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected {' or '.join(RUNTIMES)}")
    return runtime


def runtime_version(runtime: str) -> str:
    """'onnxruntime 1.32.0', 'openvino 2026.4.1' (what a measurement was made with)."""
    if runtime == "openvino":
        from tavr_jax.infer import openvino_runtime

        return f"openvino {openvino_runtime.version()}"
    from tavr_jax.infer import onnx_runtime

    return f"onnxruntime {onnx_runtime.version()}"


def layer_runner(model, runtime: str, *, threads: int | None = None):
    """x (N, C, H, W) float32 -> the output of `model` (a `layer_graph`) on `runtime`'s CPU
    kernels, with the settings the engines use."""
    if check_runtime(runtime) == "openvino":
        from tavr_jax.infer import openvino_runtime

        session = openvino_runtime.Session(model, threads=threads, outputs=("y",))
    else:
        from tavr_jax.infer import onnx_runtime

        # Not spinning: the two graphs take turns on the same cores, and one session's
        # spinning pool doubled the other's layer time on 2 cores (bench_winograd.py).
        session = onnx_runtime.make_session(model, provider="cpu", threads=threads, spin=False)
    return lambda x: session.run(["y"], {"x": x})[0]


def interleaved(fns, *, min_time_s: float = 0.4) -> list[np.ndarray]:
    """The default timer: seconds per run of each of `fns`, in alternation, a new order every
    round (`time_interleaved`), at least 7 rounds and `min_time_s` seconds each."""
    return time_interleaved(fns, warmup=1, min_runs=7, min_time_s=min_time_s, shuffle_seed=0)


class MeasuredRule:
    """Winograd for the layer shapes where it measured faster on this machine and `runtime`.

    A rule for `onnx_export.Graph`: called with (c_in, c_out, (h, w)) of a 3x3 stride-1
    convolution, it times that shape once (a layer of random weights on `batch` frames, direct
    against Winograd, `timer`) and answers from then on from its record.

    timer: fns -> [seconds per run of each] (default `interleaved`); tests pass their own.
    """

    def __init__(self, runtime: str = "onnxruntime", *, batch: int = 1, timer=None,
                 threads: int | None = None):  # fmt: skip
        self.runtime, self.batch, self.threads = check_runtime(runtime), int(batch), threads
        self.timer = timer or interleaved
        self.date = datetime.date.today().isoformat()
        self.layers: dict[tuple[int, int, int, int], dict] = {}  # (c_in, c_out, h, w) -> record

    def __call__(self, c_in: int, c_out: int, hw) -> bool:
        key = (int(c_in), int(c_out), int(hw[0]), int(hw[1]))
        if key not in self.layers:
            self.layers[key] = self.measure(*key)
        return self.layers[key]["winograd"]

    def measure(self, c_in: int, c_out: int, h: int, w: int) -> dict:
        """One shape timed as a direct and as a Winograd convolution: its record."""
        if not winograd.whole_tiles((h, w)):
            raise ValueError(f"Winograd F(4x4, 3x3) needs whole 4x4 tiles, not {h}x{w}")
        x = np.random.default_rng(1).normal(size=(self.batch, c_in, h, w)).astype(np.float32)
        # Two layers where the shape can follow itself, as in a residual stage: the runtime's
        # layout changes between the layers then count as they do in the network.
        layers = 2 if c_in == c_out else 1
        graphs = [layer_graph(c_in, c_out, (h, w), as_winograd=on, layers=layers)
                  for on in (False, True)]  # fmt: skip
        runs = [layer_runner(g, self.runtime, threads=self.threads) for g in graphs]
        direct, fast = self.timer([lambda run=run: run(x) for run in runs])
        ratio = float(np.median(np.asarray(fast) / np.asarray(direct)))
        return {
            "c_in": c_in, "c_out": c_out, "hw": [h, w], "layers": layers,
            "direct_ms": round(float(np.median(direct)) * 1e3 / layers, 3),
            "winograd_ms": round(float(np.median(fast)) * 1e3 / layers, 3),
            "winograd_over_direct": round(ratio, 3),
            "winograd": ratio <= MARGIN,
            # Other processes on the cores change the answer: the record says how busy.
            "load_average": round(os.getloadavg()[0], 2),
        }  # fmt: skip

    def describe(self) -> str:
        return f"measured on {cpu_model()}, {runtime_version(self.runtime)}, {self.date}"

    def metadata(self) -> dict:
        """What the file records: the rule, and each measured shape (batch, times, choice)."""
        return {
            "winograd_rule": self.describe(),
            "winograd_layers": [{**r, "batch": self.batch} for r in self.layers.values()],
        }


def rule_for(name: str, runtime: str = "onnxruntime", *, batch: int | None = None):
    """The rule for `onnx_export.Graph` that a launcher's --winograd names: "measure" (a
    `MeasuredRule` on `runtime`, at the file's fixed batch or 1), "fixed" or "off"."""
    rules = {"fixed": True, "off": False}
    if name == "measure":
        return MeasuredRule(runtime, batch=batch or 1)
    if name not in rules:
        raise ValueError(f"unknown Winograd rule {name!r}; expected measure, fixed or off")
    return rules[name]
