"""What the latency benchmark times against what: our backends, torch's export on each runtime
(the peers), eager torch, and a competing job to measure them under load.

Backends: `xla` (the AOT-compiled `KeypointEngine`), `onnxruntime` (`OnnxKeypointEngine`, the
network as `onnx_export` writes it), `openvino` (that graph on OpenVINO's CPU plugin), each with
the Winograd rule the export would choose (measured on this machine and that runtime, by
default), and their int8 graphs, `onnxruntime_int8` (onnxruntime's static quantisation) and
`openvino_int8` (NNCF's), calibrated on simulated frames. Peers: onnxruntime and OpenVINO
running the same architecture as exported by torch's own ONNX exporter (what a team shipping a
PyTorch model would deploy).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import cv2
import jax
import numpy as np

from tavr_jax.data.simulate import simulate_case
from tavr_jax.infer import onnx_runtime, openvino_runtime
from tavr_jax.infer.engine import KeypointEngine
from tavr_jax.infer.winograd_measure import rule_for

BACKENDS = ("xla", "onnxruntime", "onnxruntime_int8", "openvino", "openvino_int8")
PEERS = ("onnxruntime_peer", "openvino_peer")  # torch's ONNX export on each runtime
# The competing job of --background_load: one process keeping one core busy with the same
# arithmetic every time (float64 256x256 matrix products, one BLAS thread).
LOAD_WORKLOAD = "one process: 256 x 256 float64 matrix products in a loop, one thread"
_LOAD_CODE = (
    "import numpy as np\n"
    "a = np.random.default_rng(0).random((256, 256))\n"
    "while True:\n"
    "    a = a @ a\n"
    "    a /= np.abs(a).max()\n"
)


def runtime_of(backend: str) -> str:
    """The runtime a backend's graph runs on: 'openvino_int8' -> 'openvino'."""
    return backend.removesuffix("_int8")


def make_backend(backend: str, engine: KeypointEngine, provider: str = "auto", *,
                 winograd="fixed"):  # fmt: skip
    """The engine of `backend` for a KeypointEngine's network (the engine itself for xla).

    winograd: the float graphs' Winograd rule: "measure", "fixed", "off", or a rule object
    (`winograd_measure.MeasuredRule`: one per runtime measures each layer shape once per run).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "xla":
        return engine
    if isinstance(winograd, str):
        winograd = rule_for(winograd, runtime_of(backend))
    calibrate = None
    if backend.endswith("_int8"):  # calibrated on simulated frames of the timed size

        def calibrate(hw):
            case = simulate_case(np.random.default_rng(0), engine.schema, frames=8, size=hw[0])
            return np.stack([cv2.resize(image, hw[::-1]) for image, *_ in case])

    if runtime_of(backend) == "openvino":
        return openvino_runtime.OpenVinoKeypointEngine.from_engine(
            engine, winograd=winograd, calibrate=calibrate
        )
    return onnx_runtime.OnnxKeypointEngine.from_engine(
        engine, provider=provider, calibrate=calibrate, winograd=winograd
    )


def export_peers(backbone: str, schema, image_size: int, frame_size: int,
                 provider: str = "auto", runtimes=PEERS):  # fmt: skip
    """Torch's ONNX export of the same network on each runtime of `runtimes` (`PEERS`):
    ({peer: run(frames)}, why-not)."""
    try:
        from experiments.benchmarks.torch_reference import export_onnx_bytes, keypoint_net

        data = export_onnx_bytes(keypoint_net(backbone, schema, image_size),
                                 (1, frame_size, frame_size))  # fmt: skip
        sessions = {"onnxruntime_peer": lambda: onnx_runtime.make_session(data, provider=provider),
                    "openvino_peer": lambda: openvino_runtime.Session(data)}  # fmt: skip
        sessions = {peer: sessions[peer]() for peer in runtimes}
    except Exception as e:  # torch's exporter has many error types; the peer is optional
        return {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {p: lambda f, s=s: s.run(None, {"frames": f}) for p, s in sessions.items()}, None


def torch_baseline(backbone, schema, image_size, threads: int | None = None):
    """Eager PyTorch of the same network on CUDA when jax runs on a GPU and torch has CUDA,
    on the CPU when jax does; (forward(frames), why-not)."""
    try:
        import torch

        from experiments.benchmarks.torch_reference import keypoint_net
    except ImportError as e:
        return None, f"torch not installed ({e})"
    on_gpu = jax.devices()[0].platform != "cpu"
    if on_gpu and not torch.cuda.is_available():
        return (
            None,
            f"jax runs on {jax.devices()[0].platform} but torch {torch.__version__} has no CUDA",
        )
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        torch.set_num_threads(threads or os.cpu_count() or 1)
    net = keypoint_net(backbone, schema, image_size).to(device)

    def forward(frames_u8: np.ndarray):
        with torch.inference_mode():
            out = net(torch.from_numpy(frames_u8).to(device))
            return [o.cpu().numpy() for o in out]

    return forward, None


@contextlib.contextmanager
def background_load(on: bool = True):
    """While open: a separate process keeping one core busy (`LOAD_WORKLOAD`), stopped on
    leaving; nothing when `on` is False. Yields the process (or None)."""
    if not on:
        yield None
        return
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    job = subprocess.Popen([sys.executable, "-c", _LOAD_CODE], env={**os.environ, **threads},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield job
    finally:
        job.terminate()
        job.wait(timeout=10)
