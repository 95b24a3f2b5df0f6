"""The torch peers of the latency benchmark on the device jax runs on: the same keypoint
network (`torch_reference.keypoint_net`) eager and through `torch.compile`, uint8 frames from
the host in, outputs back on the host, as our engine's end-to-end time counts them.

Modes: `eager`; `max-autotune-no-cudagraphs` (Inductor, autotuned kernels); `reduce-overhead`
(Inductor with CUDA graphs). A compiled mode's first calls (compilation, autotuning, the graph's
recording) are timed apart as `compile_s` and never enter the latency.
"""

from __future__ import annotations

import time

import jax
import numpy as np

MODES = ("eager", "max-autotune-no-cudagraphs", "reduce-overhead")
WARMUP_CALLS = 3  # reduce-overhead records its CUDA graph on the third call


def peer_name(mode: str) -> str:
    """The key of a torch peer in the latency rows: 'torch:reduce-overhead'."""
    return f"torch:{mode}"


def torch_device() -> str:
    """'cuda' where jax runs on a GPU (torch must have CUDA then), else 'cpu'."""
    import torch

    if jax.devices()[0].platform == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"jax runs on a GPU but torch {torch.__version__} has no CUDA")
    return "cuda"


def new_cell() -> None:
    """Forgets earlier compilations: each (batch, dtype) cell compiles its own graphs, and
    dynamo's limit on recompilations of one function must not turn a mode silently eager."""
    import torch

    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the last cell's graphs and buffers
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))


def make_peer(backbone: str, schema, image_size: int, *, batch: int, frame_size: int,
              dtype: str, mode: str, backend: str | None = None,
              device: str | None = None):  # fmt: skip
    """(run(frames) -> host numpy outputs, info) for one mode; info: mode, backend, device,
    dtype, compile_s (the first calls, compilation included). `backend` other than Inductor
    (e.g. "eager") tests the compiled path cheaply; the mode is then not passed on."""
    import torch

    from experiments.benchmarks.torch_reference import keypoint_net

    if mode not in MODES:
        raise ValueError(f"unknown torch mode {mode!r}; known: {', '.join(MODES)}")
    device = device or torch_device()
    net = keypoint_net(backbone, schema, image_size).to(device)
    if dtype == "bfloat16":
        net = net.to(torch.bfloat16)
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if mode == "eager":
        model = net
    elif backend in (None, "inductor"):
        model = torch.compile(net, mode=mode, dynamic=False)
    else:
        model = torch.compile(net, backend=backend, dynamic=False)

    def run(frames_u8: np.ndarray):
        with torch.inference_mode():
            out = model(torch.from_numpy(frames_u8).to(device))
            return [o.float().cpu().numpy() for o in out]

    frames = np.zeros((batch, frame_size, frame_size), np.uint8)
    t0 = time.perf_counter()
    for _ in range(WARMUP_CALLS):
        run(frames)
    info = {"mode": mode, "backend": None if mode == "eager" else backend or "inductor",
            "device": device, "dtype": dtype, "compile_s": time.perf_counter() - t0}  # fmt: skip
    return run, info
