"""ONNX Runtime behind the engine's call API (the one module that imports onnxruntime, lazily).

`OnnxKeypointEngine` runs the graphs of `onnx_export` on onnxruntime: built from a trained
network (one graph per frame size) or loaded from an exported file, which is refused with one
line when it was made for another schema or training run, or edited since it was written
(its integrity record: cardiac_core.integrity). `quantize_int8` turns a graph's
convolutions into int8 (onnxruntime's static quantisation, calibrated on frames).
"""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from cardiac_core import integrity
from tavr_jax.infer.engine import check_artifact, check_frames, image_hw
from tavr_jax.infer.onnx_export import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    check_supported,
    engine_graph,
    parse_metadata,
    read_model,
    set_metadata,
)
from tavr_jax.schema import KeypointSchema

# onnxruntime execution providers, most capable first; "auto" takes the first available.
# TensorRT is left out of "auto": it builds an engine per input shape, which takes minutes.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_AUTO_ORDER = ("cuda", "cpu")

# What `quantize_int8` does, recorded in the file's metadata. Only the convolutions: they are
# nearly all of the time, while the resize MatMuls see raw pixel values, whose coordinates an
# 8-bit grid would coarsen, and the heads are a few small dense layers.
INT8_SCHEME = {
    "weights": "int8, symmetric, per output channel",
    "activations": "uint8, per tensor",
    "format": "QDQ",
    "op_types": ["Conv"],
    "calibration": "MinMax",
}


class ProviderUnavailable(ValueError):
    """The requested onnxruntime execution provider is not in this onnxruntime build."""


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise ValueError(
            "the onnxruntime backend needs onnxruntime: pip install 'cardiac-jax[onnx]'"
        ) from None
    return onnxruntime


def version() -> str:
    """The installed onnxruntime's version."""
    return _import_ort().__version__


def select_providers(which: str = "auto") -> list[str]:
    """onnxruntime providers for 'auto' | 'cpu' | 'cuda' | 'tensorrt' (CPU as the fallback)."""
    ort = _import_ort()
    available = ort.get_available_providers()
    if which == "auto":
        which = next(p for p in _AUTO_ORDER if PROVIDERS[p] in available)
    if which not in PROVIDERS:
        raise ValueError(
            f"unknown onnxruntime provider {which!r}; known: auto, {', '.join(PROVIDERS)}"
        )
    if PROVIDERS[which] not in available:
        raise ProviderUnavailable(
            f"onnxruntime {ort.__version__} has no {PROVIDERS[which]} "
            f"(available: {', '.join(available)})"
        )
    # Nodes a provider cannot run fall back along the list: TensorRT -> CUDA -> CPU.
    fallbacks = [PROVIDERS[p] for p in ("cuda", "cpu") if PROVIDERS[p] in available]
    chain = [PROVIDERS[which]] + (fallbacks if which == "tensorrt" else [PROVIDERS["cpu"]])
    return list(dict.fromkeys(chain))


def make_session(model, *, provider: str = "auto", threads: int | None = None,
                 profile_prefix: str | None = None, spin: bool = True):  # fmt: skip
    """An onnxruntime InferenceSession of a ModelProto, serialized bytes or a path.

    profile_prefix: record every node's time to `<prefix>_<date>.json` (onnxruntime's
    profiler; `session.end_profiling()` writes the file and returns its path); spin: idle
    worker threads spin, waiting for the next node (onnxruntime's default). Turn it off when
    sessions take turns on the same cores: a spinning pool slows the next session.
    """
    ort = _import_ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # All logical cores, like XLA's CPU client (onnxruntime's default counts physical ones).
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, str | os.PathLike):
        model = str(model)
    return ort.InferenceSession(model, options, providers=select_providers(provider))


def quantize_int8(model, calibration_frames):
    """`model` (an `onnx_export` graph) with its convolutions in int8, as a new ModelProto.

    Static quantisation by onnxruntime (`INT8_SCHEME`): weight scales per output channel,
    activation ranges from running the float graph on `calibration_frames`, uint8 (N, H, W)
    at the graph's frame size; a fixed-batch graph gets them in batches of its size. The
    metadata says so (`dtype` "int8", `quantization`).
    """
    _import_ort()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    info, chunks = calibration_batches(model, calibration_frames)

    class Frames(CalibrationDataReader):
        def __init__(self):
            self._chunks = iter(chunks)

        def get_next(self):
            chunk = next(self._chunks, None)
            return None if chunk is None else {INPUT_NAME: chunk}

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (os.path.join(tmp, f"{n}.onnx") for n in ("float", "pre", "int8"))
        with open(src, "wb") as f:
            f.write(model.SerializeToString())
        quant_pre_process(src, pre, skip_symbolic_shape=True)  # shapes for the quantiser
        quantize_static(pre, out, Frames(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, op_types_to_quantize=INT8_SCHEME["op_types"])  # fmt: skip
        quantized = read_model(out)
    count = len(calibration_frames)
    info.update(dtype="int8", quantization={**INT8_SCHEME, "calibration_frames": count})
    return set_metadata(quantized, info)


def calibration_batches(model, calibration_frames) -> tuple[dict, list[np.ndarray]]:
    """(the metadata of `model`, its calibration frames in batches) for an int8 quantiser
    (`quantize_int8`, `openvino_runtime.quantize_nncf`), after the checks both make: a float32
    graph without Winograd convolutions, uint8 (N, H, W) frames at its frame size. A
    fixed-batch graph gets batches of its size, the last one wrapping around."""
    info = parse_metadata({p.key: p.value for p in model.metadata_props}, "model")
    if info.get("dtype") != "float32":
        raise ValueError(f"only a float32 graph can be quantised, not {info.get('dtype')}")
    if info.get("winograd_convolutions"):
        # The transformed kernels G g G^T span a wider range than g, and the product with the
        # input transform amplifies the rounding: int8 wants the direct convolutions.
        raise ValueError("a graph with Winograd convolutions cannot be quantised; "
                         "build it with winograd=False")  # fmt: skip
    frames = np.asarray(calibration_frames)
    hw = tuple(info["frame_size"])
    if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[1:] != hw or not len(frames):
        raise ValueError(
            f"calibration frames must be uint8 (N, {hw[0]}, {hw[1]}) with N >= 1, got "
            f"{frames.dtype} {frames.shape}"
        )
    batch = info.get("batch") or 1
    chunks = [frames[i : i + batch] for i in range(0, len(frames), batch)]
    return info, [np.resize(c, (batch, *hw)) for c in chunks]


class OnnxKeypointEngine:
    """`KeypointEngine`'s call API on onnxruntime: (B, H, W) uint8 frames -> numpy outputs.

    Built from a network (`from_engine`: one graph per frame size, symbolic batch, made on
    first use) or from an exported file (`load_onnx`: that file's frame size only). Frames run
    in chunks of `batch_size`; a fixed-batch file gets its last chunk zero-padded.
    """

    backend = "onnxruntime"

    def __init__(self, meta: dict, *, batch_size: int = 1, provider: str = "auto",
                 threads: int | None = None, model_for=None, fixed=None):  # fmt: skip
        self._setup(meta, batch_size=batch_size, threads=threads, model_for=model_for,
                    fixed=fixed)  # fmt: skip
        self.provider = provider
        self.providers = select_providers(provider)

    def _setup(self, meta: dict, *, batch_size: int, threads, model_for, fixed) -> None:
        # What every runtime behind this call API keeps (openvino_runtime's engine too).
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.meta = dict(meta)
        schema = meta["schema"]
        self.schema = (
            schema if isinstance(schema, KeypointSchema) else KeypointSchema.from_json(schema)
        )
        self.image_size = image_hw(meta["image_size"])
        self.batch_size = int(batch_size)
        self.threads = threads
        self._model_for = model_for  # (H, W) -> ModelProto, or None for a fixed file
        self._fixed = fixed  # (session, frame (H, W), batch or None) of a file
        self._sessions: dict[tuple[int, int], Any] = {}
        self.device = _host_device()

    @classmethod
    def from_engine(cls, engine, *, provider: str = "auto", threads: int | None = None,
                    batch_size: int | None = None, calibrate=None,
                    winograd=True) -> OnnxKeypointEngine:  # fmt: skip
        """The same network and thresholds as a float32 `KeypointEngine`, on onnxruntime.

        calibrate: (H, W) -> uint8 frames (N, H, W): each frame size's graph is then int8,
        calibrated on the frames it returns (`quantize_int8`); winograd: the graph's Winograd
        rule on the CPU provider (`onnx_export.Graph`: True is the fixed rule, or a
        `winograd_measure.MeasuredRule`).
        """
        import jax

        if engine.dtype_name != "float32":
            raise ValueError(f"the onnxruntime backend is float32 only, not {engine.dtype_name}")
        variables = jax.device_get(engine.variables)
        meta = {**engine.meta, "schema": engine.schema, "image_size": engine.image_size}
        check_supported(meta)  # refuse an unsupported network before any frame
        # Winograd is for onnxruntime's CPU kernels; GPU providers pick their own algorithms,
        # and int8 quantises the direct convolutions.
        on_cpu = select_providers(provider)[0] == PROVIDERS["cpu"]
        winograd = winograd if calibrate is None and on_cpu else False

        def model_for(hw):
            model = engine_graph(meta, variables, frame_size=hw, batch=None, winograd=winograd)
            return model if calibrate is None else quantize_int8(model, calibrate(hw))

        return cls(meta, batch_size=batch_size or engine.batch_size, provider=provider,
                   threads=threads, model_for=model_for)  # fmt: skip

    def session(self, height: int, width: int):
        """The onnxruntime session for (height, width) frames (built once per size)."""
        if self._fixed is not None:
            session, hw, _ = self._fixed
            if (height, width) != hw:
                raise ValueError(
                    f"this ONNX file takes {hw[1]}x{hw[0]} frames, got {width}x{height}; "
                    f"export one with --frame_size={height}x{width}"
                )
            return session
        key = (int(height), int(width))
        if key not in self._sessions:
            self._sessions[key] = make_session(
                self._model_for(key), provider=self.provider, threads=self.threads
            )
        return self._sessions[key]

    def dispatch(self, frames) -> dict[str, np.ndarray]:
        """Runs one batch (<= batch_size frames, or a padded one); returns numpy outputs."""
        frames = check_frames(frames)
        n, h, w = frames.shape
        if n > self.batch_size:
            raise ValueError(f"batch of {n} frames exceeds the engine batch size {self.batch_size}")
        fixed_batch = self._fixed[2] if self._fixed is not None else None
        if fixed_batch is not None and n < fixed_batch:
            frames = np.concatenate([frames, np.zeros((fixed_batch - n, h, w), np.uint8)])
        outs = self.session(h, w).run(list(OUTPUT_NAMES), {INPUT_NAME: frames})
        return dict(zip(OUTPUT_NAMES, outs, strict=True))

    @staticmethod
    def fetch(outputs: dict[str, np.ndarray], n: int | None = None) -> dict[str, np.ndarray]:
        return {k: np.asarray(v)[:n] for k, v in outputs.items()}

    def __call__(self, frames) -> dict[str, np.ndarray]:
        frames = check_frames(frames)
        chunks = [frames[i : i + self.batch_size] for i in range(0, len(frames), self.batch_size)]
        outs = [self.fetch(self.dispatch(chunk), len(chunk)) for chunk in chunks]
        return {k: np.concatenate([o[k] for o in outs]) for k in OUTPUT_NAMES}

    def run_batches(self, batches: Iterable) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
        """Runs `(tag, frames)` batches in order, as `KeypointEngine.run_batches`."""
        for tag, frames in batches:
            n = len(tag) if isinstance(tag, list | tuple) else frames.shape[0]
            yield tag, self.fetch(self.dispatch(np.asarray(frames)[:n]), n)


def load_onnx(
    path,
    *,
    workdir=None,
    schema=None,
    batch_size: int | None = None,
    provider: str = "auto",
    threads: int | None = None,
) -> OnnxKeypointEngine:
    """An engine from an ONNX file written by `onnx_export.save_model`, refused (one line) when
    it was made for another schema or another training run than `workdir`'s."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    select_providers(provider)  # a missing provider is its own error, before the file's
    data = path.read_bytes()  # read once: what is checked below is what the session runs
    try:  # onnxruntime alone reads the file and its metadata: no onnx package needed here
        session = make_session(data, provider=provider, threads=threads)
    except Exception as e:  # onnxruntime's own error types for unreadable models
        why = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise ValueError(f"{path} is not an ONNX model onnxruntime can load ({why})") from None
    props = session.get_modelmeta().custom_metadata_map
    meta = checked_file_meta(path, data, props, workdir=workdir, schema=schema,
                             batch_size=batch_size)  # fmt: skip
    fixed_batch = meta.get("batch")
    return OnnxKeypointEngine(
        meta, batch_size=batch_size or fixed_batch or 1, provider=provider, threads=threads,
        fixed=(session, tuple(meta["frame_size"]), fixed_batch),
    )  # fmt: skip


def checked_file_meta(path, data: bytes, props: dict, *, workdir=None, schema=None,
                      batch_size: int | None = None) -> dict:  # fmt: skip
    """The engine metadata of an exported ONNX file (its bytes and metadata properties), after
    the checks every runtime makes before running it, each a one-line error: a keypoint engine,
    unedited (integrity record), of `schema` and `workdir`'s run, `batch_size` within its batch.
    """
    info = parse_metadata(props, path)
    resave = "re-export it with experiments/tavr_export.py"
    integrity.check_onnx(data, path, role=METADATA_KEY, format_version=1, resave=resave)
    check_artifact(info, path, workdir=workdir, schema=schema)
    fixed_batch = info.get("batch")
    if batch_size is not None and fixed_batch is not None and batch_size > fixed_batch:
        raise ValueError(
            f"{path} has a fixed batch of {fixed_batch}; --batch_size={batch_size} is larger"
        )
    meta = dict(info)
    meta["schema"] = KeypointSchema.from_json(info["schema"])
    return meta


@functools.cache
def _host_device():
    # Frame sources (streams.prefetch_to_device) stage batches on a device; onnxruntime reads
    # host memory, and a jax CPU array converts to numpy without a copy.
    import jax

    return jax.devices("cpu")[0]
