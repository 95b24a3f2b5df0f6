"""Which engine runs a launcher's request: XLA, onnxruntime or OpenVINO, a workdir or a file.

`open_engine` gives every launcher the same call API whatever runs underneath;
`export_workdir` writes a workdir's network as one deployable file and says what it wrote;
`calibration_frames` picks the training frames an int8 export is calibrated on.
"""

from __future__ import annotations

import hashlib
import pathlib

import cv2
import numpy as np

from tavr_jax.data.supervisely import read_project
from tavr_jax.infer import onnx_export
from tavr_jax.infer.engine import EXPORT_MAGIC, KeypointEngine, image_hw, load_exported
from tavr_jax.infer.onnx_runtime import OnnxKeypointEngine, load_onnx, quantize_int8
from tavr_jax.infer.openvino_runtime import (
    OpenVinoKeypointEngine,
    check_nncf,
    load_openvino,
    quantize_nncf,
)
from tavr_jax.infer.winograd_measure import rule_for
from tavr_jax.run.workdir import config_hash, data_split, read_config
from tavr_jax.schema import get_schema

BACKENDS = ("xla", "onnxruntime", "openvino")


def is_jax_export(path) -> bool:
    """Whether `path` starts like a file written by `KeypointEngine.export`."""
    with open(path, "rb") as f:
        return f.read(len(EXPORT_MAGIC)) == EXPORT_MAGIC


def open_engine(
    workdir=None,
    *,
    model_file=None,
    backend: str = "xla",
    which: str = "best",
    schema=None,
    backbone: str | None = None,
    batch_size: int = 1,
    dtype: str = "float32",
    provider: str = "auto",
    refine: bool = False,
):
    """The engine a launcher asks for, all with the same call API.

    Without `model_file`: the workdir's checkpoint on `backend` ("xla": `KeypointEngine`;
    "onnxruntime" / "openvino": the same network as an ONNX graph on that runtime). With
    `model_file`: an exported artifact (a `jax.export` file runs on XLA, an .onnx file on
    onnxruntime, or OpenVINO when `backend` says so), refused when it was made for another
    schema or, given `workdir`, another training run.
    refine: add the second stage trained into W/refiner (XLA only; an exported file has it
    when its engine had it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected {', '.join(BACKENDS)}")
    if model_file is not None:
        path = pathlib.Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if refine:
            raise ValueError("--refine applies to a workdir's checkpoint, not to an exported file")
        if is_jax_export(path):
            if backend == "openvino":
                raise ValueError(f"{path} is a jax.export file; --backend=openvino runs .onnx")
            exported = load_exported(path, workdir=workdir, schema=schema)
            if exported.meta.get("batch") is None:  # a symbolic batch takes any chunk size
                exported.batch_size = int(batch_size)
            return exported
        if backend == "openvino":
            return load_openvino(path, workdir=workdir, schema=schema, batch_size=batch_size)
        return load_onnx(path, workdir=workdir, schema=schema, batch_size=batch_size,
                         provider=provider)  # fmt: skip
    if workdir is None:
        raise ValueError("give a training workdir or an exported model file")
    engine = KeypointEngine.from_workdir(workdir, which=which, schema=schema, backbone=backbone,
                                         batch_size=batch_size, dtype=dtype,
                                         refine=refine)  # fmt: skip
    if backend == "onnxruntime":
        return OnnxKeypointEngine.from_engine(engine, provider=provider)
    if backend == "openvino":
        return OpenVinoKeypointEngine.from_engine(engine)
    return engine


def export_workdir(workdir, out, *, format: str = "onnx", which: str = "best",
                   batch: int | None = None, frame_size=None, int8_calibration=None,
                   calibration_count: int = 64, winograd: str = "fixed",
                   backend: str = "onnxruntime") -> dict:  # fmt: skip
    """Exports a workdir's checkpoint as one file: "onnx" or "jax" (`jax.export`).

    frame_size: (H, W) of the frames the artifact takes (default: the network input);
    batch: a fixed batch size, or None for a symbolic one; backend: the runtime an ONNX file
    is meant for, "onnxruntime" or "openvino": a measured Winograd rule is timed on it, and
    int8 is its quantiser's; int8_calibration: a Supervisely project: the ONNX file's
    convolutions are then int8 (onnxruntime's static quantisation, `onnx_runtime.quantize_int8`,
    or NNCF's for OpenVINO, `openvino_runtime.quantize_nncf`), calibrated on
    `calibration_count` frames of its training cases (`calibration_frames`);
    winograd: which 3x3 convolutions of a float ONNX file are Winograd F(4x4, 3x3): "measure"
    (each layer shape timed on this machine and `backend`, `winograd_measure.MeasuredRule`:
    the launcher's default), "fixed" (`winograd.pays`: no timing, the default here so that
    tests export in a blink) or "off" (a GPU runtime).
    Returns what to record beside it: the file's sha256 and size, the config hash, the
    Winograd rule and the library versions.
    """
    if format not in ("onnx", "jax"):
        raise ValueError(f"unknown export format {format!r}; expected onnx or jax")
    if backend not in ("onnxruntime", "openvino"):
        raise ValueError(f"unknown backend {backend!r} for an ONNX file; expected onnxruntime "
                         "or openvino")  # fmt: skip
    if int8_calibration is not None and format != "onnx":
        raise ValueError("int8 quantisation is for the ONNX format only")
    quantize = {"onnxruntime": quantize_int8, "openvino": quantize_nncf}[backend]
    if int8_calibration is not None and backend == "openvino":
        check_nncf()  # a missing quantiser before the network is built
    # int8 quantises the direct convolutions (`onnx_runtime.calibration_batches` says why).
    rule = rule_for("off" if int8_calibration is not None else winograd, backend, batch=batch)
    engine = KeypointEngine.from_workdir(workdir, which=which)
    h, w = image_hw(frame_size if frame_size is not None else engine.image_size)
    if format == "onnx":
        model = onnx_export.engine_model(engine, frame_size=(h, w), batch=batch, winograd=rule)
        if int8_calibration is not None:
            frames = calibration_frames(workdir, int8_calibration, (h, w),
                                        count=calibration_count)  # fmt: skip
            model = quantize(model, frames)
        path = onnx_export.save_model(model, out)
        info = onnx_export.parse_metadata({p.key: p.value for p in model.metadata_props}, path)
    else:
        path = engine.export(out, h, w, batch=batch)
    data = path.read_bytes()
    record = {
        "file": str(path),
        "format": format,
        "dtype": "int8" if int8_calibration is not None else "float32",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "frame_size": [h, w],
        "batch": batch,
        "schema": engine.schema.name,
        "config_hash": config_hash(engine.meta["config"]),
        "step": engine.meta.get("step"),
        "versions": onnx_export.library_versions(),
    }
    if format == "onnx":
        record.update({"backend": backend, "winograd_rule": info["winograd_rule"],
                       "winograd_convolutions": info["winograd_convolutions"]})  # fmt: skip
    return record


def calibration_frames(workdir, data_dir, frame_size, *, count: int = 64) -> np.ndarray:
    """`count` frames of the workdir's training cases, evenly spaced, as uint8 (N, H, W).

    Training cases only, so that a later evaluation on validation or test cases stays
    untouched by the quantisation. Frames of another size are resized to `frame_size`.
    """
    if count < 1:
        raise ValueError(f"the calibration needs at least one frame, got {count}")
    config = read_config(workdir)
    schema = get_schema(config["schema"])
    project = read_project(data_dir, schema, split="train", **data_split(config))
    if not project.frames:
        raise ValueError(f"{data_dir}: the training split has no frames to calibrate on")
    h, w = image_hw(frame_size)
    picks = np.unique(np.linspace(0, len(project.frames) - 1, count).round().astype(int))
    frames = []
    for i in picks:
        image = project.load_image(int(i))
        if image.shape != (h, w):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        frames.append(image)
    return np.stack(frames)
