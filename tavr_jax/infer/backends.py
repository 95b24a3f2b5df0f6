"""Which engine runs a launcher's request: XLA or onnxruntime, a workdir or an exported file.

`open_engine` gives every launcher the same call API whatever runs underneath;
`export_workdir` writes a workdir's network as one deployable file and says what it wrote.
"""

from __future__ import annotations

import hashlib
import pathlib

from tavr_jax.infer import onnx_export
from tavr_jax.infer.engine import EXPORT_MAGIC, KeypointEngine, image_hw, load_exported
from tavr_jax.infer.onnx_runtime import OnnxKeypointEngine, load_onnx
from tavr_jax.workdir import config_hash


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
    "onnxruntime": the same network as an ONNX graph on onnxruntime). With `model_file`: an
    exported artifact (a `jax.export` file runs on XLA, an .onnx file on onnxruntime), refused
    when it was made for another schema or, given `workdir`, another training run.
    refine: add the second stage trained into W/refiner (XLA only; an exported file has it
    when its engine had it).
    """
    if backend not in ("xla", "onnxruntime"):
        raise ValueError(f"unknown backend {backend!r}; expected xla or onnxruntime")
    if model_file is not None:
        path = pathlib.Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if refine:
            raise ValueError("--refine applies to a workdir's checkpoint, not to an exported file")
        if is_jax_export(path):
            exported = load_exported(path, workdir=workdir, schema=schema)
            if exported.meta.get("batch") is None:  # a symbolic batch takes any chunk size
                exported.batch_size = int(batch_size)
            return exported
        return load_onnx(path, workdir=workdir, schema=schema, batch_size=batch_size,
                         provider=provider)  # fmt: skip
    if workdir is None:
        raise ValueError("give a training workdir or an exported model file")
    engine = KeypointEngine.from_workdir(workdir, which=which, schema=schema, backbone=backbone,
                                         batch_size=batch_size, dtype=dtype,
                                         refine=refine)  # fmt: skip
    if backend == "onnxruntime":
        return OnnxKeypointEngine.from_engine(engine, provider=provider)
    return engine


def export_workdir(workdir, out, *, format: str = "onnx", which: str = "best",
                   batch: int | None = None, frame_size=None) -> dict:  # fmt: skip
    """Exports a workdir's checkpoint as one file: "onnx" or "jax" (`jax.export`).

    frame_size: (H, W) of the frames the artifact takes (default: the network input);
    batch: a fixed batch size, or None for a symbolic one. Returns what to record beside it:
    the file's sha256 and size, the config hash and the library versions.
    """
    if format not in ("onnx", "jax"):
        raise ValueError(f"unknown export format {format!r}; expected onnx or jax")
    engine = KeypointEngine.from_workdir(workdir, which=which)
    h, w = image_hw(frame_size if frame_size is not None else engine.image_size)
    if format == "onnx":
        path = onnx_export.export_onnx(engine, out, frame_size=(h, w), batch=batch)
    else:
        path = engine.export(out, h, w, batch=batch)
    data = path.read_bytes()
    return {
        "file": str(path),
        "format": format,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "frame_size": [h, w],
        "batch": batch,
        "schema": engine.schema.name,
        "config_hash": config_hash(engine.meta["config"]),
        "step": engine.meta.get("step"),
        "versions": onnx_export.library_versions(),
    }
