"""OpenVINO behind the engine's call API (the one module importing openvino and nncf, lazily).

`OpenVinoKeypointEngine` runs the graphs of `onnx_export` on OpenVINO's CPU plugin: built from
a trained network (one graph per frame size) or loaded from an exported ONNX file, which goes
through the same checks as on onnxruntime (`onnx_runtime.checked_file_meta`: schema, training
run, integrity record). The exported .onnx stays the contract; the OpenVINO IR (.xml/.bin)
written beside it is only a cache of its conversion, named by the .onnx's sha256, so a changed
file is converted again and never runs a stale IR. `quantize_nncf` makes the int8 file for
OpenVINO (NNCF's post-training quantisation, still an .onnx file).
"""

from __future__ import annotations

import functools
import glob
import importlib
import io
import os
import pathlib
import re
import tempfile

import numpy as np

from cardiac_core import integrity
from cardiac_core.fileio import atomic_write_bytes
from tavr_jax.infer.onnx_export import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, check_supported
from tavr_jax.infer.onnx_runtime import OnnxKeypointEngine, checked_file_meta

# Each error about a missing or too old package says which backend does without it.
INSTEAD, INSTEAD_INT8 = "or use --backend=onnxruntime", "or quantise for --backend=onnxruntime"
MISSING = f"--backend=openvino needs the openvino package: pip install -e '.[openvino]' ({INSTEAD})"
NNCF_MISSING = (
    f"int8 for --backend=openvino needs the nncf package: pip install -e '.[openvino]' "
    f"({INSTEAD_INT8})"
)
# The oldest releases the openvino extra allows (setup.cfg), each one line when older.
MIN_OPENVINO, MIN_NNCF = (2026, 4), (3, 4)
# What `quantize_nncf` does, recorded in the file's metadata: NNCF's post-training quantisation
# for OpenVINO's CPU plugin, written as ONNX QuantizeLinear / DequantizeLinear pairs that
# OpenVINO reads as int8. Only the convolutions, as `onnx_runtime.INT8_SCHEME`: left to its
# defaults NNCF also quantised the decoding's arithmetic on the heatmap peak's index (Div, Sub,
# Mul), which moved the quick network's points by 2.8-5.1 px more on average (docs/deploy.md).
NNCF_SCHEME = {
    "quantizer": "NNCF post-training quantization",
    "runtime": "openvino",
    "preset": "performance",
    "target_device": "CPU",
    "weights": "int8, symmetric, per output channel",
    "activations": "uint8 after ReLU, else int8, per tensor",
    "format": "QDQ",
    "op_types": ["Conv"],
    "fast_bias_correction": True,
}
IR_KEY = "tavr_source_sha256"  # the IR's rt_info entry naming the .onnx it was converted from
CONVERSION = 1  # bumped when `_core`'s conversion changes: IRs of an older one are not reused
_IR_NAME = re.compile(r"\.[0-9a-f]{16}\.openvino\.(xml|bin)")  # after the .onnx's stem


def _import_checked(name: str, minimum: tuple[int, int], needed_for: str, missing: str,
                    instead: str):  # fmt: skip
    """The module `name`; a one-line ValueError when it is missing or older than `minimum`."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ValueError(missing) from None
    if _release(module.__version__) < minimum:
        raise ValueError(
            f"{needed_for} needs {name} >= {'.'.join(map(str, minimum))}, found "
            f"{module.__version__.split('-')[0]}: pip install -e '.[openvino]' ({instead})"
        )
    return module


def _import_ov():
    return _import_checked("openvino", MIN_OPENVINO, "--backend=openvino", MISSING, INSTEAD)


def check_nncf():
    """The nncf module; a one-line ValueError when it is missing or older than MIN_NNCF."""
    return _import_checked(
        "nncf", MIN_NNCF, "int8 for --backend=openvino", NNCF_MISSING, INSTEAD_INT8
    )


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '2026.4.1-22982-e213a14' or '3.4.0'."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return tuple(map(int, found.groups())) if found else (0, 0)


def version() -> str:
    """The installed openvino's release, e.g. '2026.4.1'."""
    return _import_ov().__version__.split("-")[0]


@functools.cache
def _core():
    """One ov.Core, its ONNX reader with our conversion of ReduceLogSumExp (`_log_sum_exp`)."""
    ov = _import_ov()
    from openvino.frontend import ConversionExtension

    core = ov.Core()
    core.add_extension(ConversionExtension("ReduceLogSumExp", _log_sum_exp))
    return core


def _log_sum_exp(node):
    """ONNX ReduceLogSumExp, as max + log(sum(exp(x - max))).

    OpenVINO's ONNX reader (2026.4) takes the `axes` attribute of opsets < 18 as "every
    axis": our opset-17 graph's (B, K) heatmap evidence became one number, and the dense
    visibility of every point with it. Opset 18 moved `axes` to an input, read here as well.
    """
    import openvino.opset13 as ops

    x = node.get_input(0)
    if node.has_attribute("axes"):
        axes = ops.constant(np.array(node.get_attribute("axes"), np.int64)).output(0)
    elif node.get_input_size() > 1:
        axes = node.get_input(1)
    else:  # no axes: every axis, as the operator says
        axes = ops.range(0, ops.squeeze(ops.shape_of(ops.shape_of(x)), [0]), 1).output(0)
    keep = bool(node.get_attribute("keepdims", 1))
    peak = ops.reduce_max(x, axes, keep_dims=True)
    total = ops.reduce_sum(ops.exp(ops.subtract(x, peak)), axes, keep_dims=keep)
    return [ops.add(ops.log(total), peak if keep else ops.squeeze(peak, axes)).output(0)]


def cpu_name() -> str:
    """The CPU's model name as OpenVINO's CPU plugin reports it."""
    return str(_core().get_property("CPU", "FULL_DEVICE_NAME"))


def compile_config(threads: int | None = None) -> dict:
    """The CPU plugin's settings: one request at a time, as fast as it can go."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        # All logical cores, like XLA's CPU client and our onnxruntime sessions.
        "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1),
        # The plugin's default on CPUs with bf16 units (AVX512-BF16, AMX; this AMD EPYC too) is
        # bf16: a tiny network's coordinates moved by 1e-3 of the frame, 1e4 x float32's
        # difference. The contract is float32.
        "INFERENCE_PRECISION_HINT": "f32",
    }


def read_onnx(data: bytes, path="model"):
    """An ov.Model converted from serialized ONNX bytes (one-line ValueError if it cannot be)."""
    core = _core()
    try:
        return core.read_model(io.BytesIO(data))
    except Exception as e:  # OpenVINO raises RuntimeError with a multi-line trace of its own
        lines = [ln for ln in str(e).splitlines() if ln and not ln.startswith("Exception from")]
        why = (lines or [type(e).__name__])[0][:100]
        raise ValueError(
            f"{path} is not an ONNX model OpenVINO can load ({why}); try --backend=onnxruntime"
        ) from None


def compile_model(model, *, threads: int | None = None):
    """A CompiledModel on the CPU of an ov.Model, a ModelProto or serialized ONNX bytes."""
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    if isinstance(model, bytes):
        model = read_onnx(model)
    return _core().compile_model(model, "CPU", compile_config(threads))


def quantize_nncf(model, calibration_frames):
    """`model` (an `onnx_export` graph) quantised to int8 for OpenVINO by NNCF, as a new
    ModelProto (`NNCF_SCHEME`): ranges from running the float graph on `calibration_frames`,
    uint8 (N, H, W) at the graph's frame size, in batches of a fixed-batch graph's size. The
    metadata says so (`dtype` "int8", `quantization`)."""
    import contextlib
    import logging
    import sys

    from tavr_jax.infer.onnx_export import set_metadata
    from tavr_jax.infer.onnx_runtime import calibration_batches

    nncf = check_nncf()
    info, chunks = calibration_batches(model, calibration_frames)
    nncf.set_log_level(logging.WARNING)  # not a line per operation it leaves in float
    dataset = nncf.Dataset(chunks, lambda chunk: {INPUT_NAME: chunk})
    others = sorted({n.op_type for n in model.graph.node} - set(NNCF_SCHEME["op_types"]))
    # Its progress bars on stderr: stdout is the launcher's record of what it wrote.
    with contextlib.redirect_stdout(sys.stderr):
        quantized = nncf.quantize(
            model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
            target_device=nncf.TargetDevice.CPU, subset_size=len(chunks),
            ignored_scope=nncf.IgnoredScope(types=others, validate=False),
        )  # fmt: skip
    count = len(calibration_frames)
    info.update(dtype="int8", quantization={**NNCF_SCHEME, "nncf": nncf.__version__,
                                            "calibration_frames": count})  # fmt: skip
    return set_metadata(quantized, info)


def ir_paths(path, sha256: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(.xml, .bin) of the IR cached beside the ONNX file `path` whose bytes hash to sha256."""
    path = pathlib.Path(path)
    stem = f"{path.stem}.{sha256[:16]}.openvino"
    return path.parent / f"{stem}.xml", path.parent / f"{stem}.bin"


def cached_model(path, data: bytes):
    """The ov.Model of the ONNX file `path` (its bytes `data`), read from the IR beside it when
    one of these very bytes is there, else converted and cached (when the folder is writable)."""
    ov = _import_ov()
    sha = integrity.sha256_bytes(data)
    xml, weights = ir_paths(path, sha)
    # The IR's key: these bytes, converted by this OpenVINO and this module's conversion.
    key = f"{sha} openvino {ov.get_version()} conversion {CONVERSION}"
    if xml.is_file() and weights.is_file():
        try:
            model = _core().read_model(str(xml), str(weights))
            if model.has_rt_info(IR_KEY) and model.get_rt_info(IR_KEY).astype(str) == key:
                return model
        except RuntimeError:  # a truncated or foreign pair: converted again below
            pass
    model = read_onnx(data, path)
    model.set_rt_info(key, IR_KEY)
    try:
        _write_ir(model, xml, weights)
    except OSError:  # a read-only folder: the cache is optional, the .onnx runs as it is
        pass
    return model


def _write_ir(model, xml: pathlib.Path, weights: pathlib.Path) -> None:
    ov = _import_ov()
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".openvino-") as tmp:
        ov.save_model(model, os.path.join(tmp, "m.xml"), compress_to_fp16=False)
        # The .bin first: a reader finding the .xml finds its weights; the IR's key (checked
        # on reading) guards against an .xml left over from another conversion.
        atomic_write_bytes(weights, pathlib.Path(tmp, "m.bin").read_bytes())
        atomic_write_bytes(xml, pathlib.Path(tmp, "m.xml").read_bytes())
    # IRs of earlier versions of this .onnx are stale for good.
    stem = xml.name[: -len(".0123456789abcdef.openvino.xml")]
    for old in xml.parent.glob(f"{glob.escape(stem)}.*.openvino.*"):
        if _IR_NAME.fullmatch(old.name[len(stem) :]) and old not in (xml, weights):
            old.unlink(missing_ok=True)


class Session:
    """A model compiled on the CPU (`compile_model`) behind onnxruntime's
    `session.run(output_names, feeds)`, so that the engine's batching and the benchmarks drive
    either runtime the same way."""

    def __init__(self, model, *, threads: int | None = None, outputs=OUTPUT_NAMES):
        self.compiled = compiled = compile_model(model, threads=threads)
        self.request = compiled.create_infer_request()
        self._outputs = {name: compiled.output(name) for name in outputs}

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        result = self.request.infer(feeds)  # outputs copied out of the request's buffers
        return [np.asarray(result[self._outputs[n]]) for n in output_names or self._outputs]


class OpenVinoKeypointEngine(OnnxKeypointEngine):
    """`KeypointEngine`'s call API on OpenVINO's CPU plugin: (B, H, W) uint8 frames -> numpy.

    Built from a network (`from_engine`: one graph per frame size, symbolic batch, compiled on
    first use) or from an exported file (`load_openvino`: that file's frame size only). Frames
    run in chunks of `batch_size`; a fixed-batch file gets its last chunk zero-padded.
    """

    backend = "openvino"

    def __init__(self, meta: dict, *, batch_size: int = 1, threads: int | None = None,
                 model_for=None, fixed=None):  # fmt: skip
        _import_ov()
        self._setup(meta, batch_size=batch_size, threads=threads, model_for=model_for,
                    fixed=fixed)  # fmt: skip
        self.provider, self.providers = "cpu", ["openvino CPU"]

    @classmethod
    def from_engine(cls, engine, *, threads: int | None = None, batch_size: int | None = None,
                    winograd=True, calibrate=None) -> OpenVinoKeypointEngine:  # fmt: skip
        """The same network and thresholds as a float32 `KeypointEngine`, on OpenVINO.

        winograd: the graph's Winograd rule (`onnx_export.Graph`: True is the fixed rule, or
        a `winograd_measure.MeasuredRule`; False: the direct convolutions); calibrate:
        (H, W) -> uint8 frames (N, H, W): each frame size's graph is then int8 by NNCF,
        calibrated on the frames it returns (`quantize_nncf`; direct convolutions).
        """
        import jax

        from tavr_jax.infer.onnx_export import engine_graph

        _import_ov()
        if engine.dtype_name != "float32":
            raise ValueError(f"the openvino backend is float32 only, not {engine.dtype_name}")
        variables = jax.device_get(engine.variables)
        meta = {**engine.meta, "schema": engine.schema, "image_size": engine.image_size}
        check_supported(meta)  # refuse an unsupported network before any frame

        if calibrate is not None:
            check_nncf()  # a missing quantiser is its own error, before any frame
            winograd = False  # int8 quantises the direct convolutions

        def model_for(hw):
            model = engine_graph(meta, variables, frame_size=hw, batch=None, winograd=winograd)
            return model if calibrate is None else quantize_nncf(model, calibrate(hw))

        return cls(meta, batch_size=batch_size or engine.batch_size, threads=threads,
                   model_for=model_for)  # fmt: skip

    def session(self, height: int, width: int):
        if self._fixed is not None:
            return super().session(height, width)  # the file's size only, or a clear error
        key = (int(height), int(width))
        if key not in self._sessions:
            self._sessions[key] = Session(self._model_for(key), threads=self.threads)
        return self._sessions[key]


def load_openvino(
    path,
    *,
    workdir=None,
    schema=None,
    batch_size: int | None = None,
    threads: int | None = None,
    cache_ir: bool = True,
) -> OpenVinoKeypointEngine:
    """An engine from an ONNX file written by `onnx_export.save_model`, refused (one line) as
    `onnx_runtime.load_onnx` refuses it. cache_ir: keep the converted IR beside the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    _import_ov()  # a missing package is its own error, before the file's
    data = path.read_bytes()  # read once: what is checked below is what is compiled
    try:
        props = integrity.onnx_properties(data)
    except ValueError:
        props = {}
    if METADATA_KEY not in props:
        read_onnx(data, path)  # not an ONNX model at all says so, before "not an engine"
    meta = checked_file_meta(path, data, props, workdir=workdir, schema=schema,
                             batch_size=batch_size)  # fmt: skip
    model = cached_model(path, data) if cache_ir else read_onnx(data, path)
    fixed_batch = meta.get("batch")
    session = Session(model, threads=threads)
    return OpenVinoKeypointEngine(
        meta, batch_size=batch_size or fixed_batch or 1, threads=threads,
        fixed=(session, tuple(meta["frame_size"]), fixed_batch),
    )  # fmt: skip
