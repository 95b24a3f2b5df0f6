"""Exports a trained workdir as one deployable file: ONNX, or jax.export (see docs/deploy.md).

    python experiments/tavr_export.py --workdir=W --format=onnx --out=model.onnx \
        --batch=dynamic --frame_size=1024x1024
    python experiments/tavr_export.py --workdir=W --format=jax --out=engine.bin --batch=8
    python experiments/tavr_export.py --workdir=W --format=onnx --out=model_int8.onnx \
        --frame_size=1024x1024 --int8_calibration=DATA [--backend=openvino]
Writes OUT and OUT.json (its sha256, size, config hash, Winograd rule and library versions).
A float ONNX file's Winograd convolutions are chosen by timing each layer shape on this
machine and --backend's runtime (--winograd=measure; fixed or off without timing). With
--int8_calibration the convolutions are int8 (onnxruntime's quantiser, or NNCF's for
--backend=openvino), calibrated on frames of the training cases of that Supervisely project
(score the file with tavr_eval.py --model_file before shipping it).
"""

import json
import sys

from absl import app, flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import os_error_line, quiet_third_party
from tavr_jax.infer.backends import export_workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (config.json, checkpoints/)")
_FORMAT = flags.DEFINE_enum("format", "onnx", ["onnx", "jax"], "artifact format")
_OUT = flags.DEFINE_string("out", None, "output file")
_BATCH = flags.DEFINE_string("batch", "dynamic", "fixed batch size, or 'dynamic'")
_FRAME = flags.DEFINE_string("frame_size", None, "HxW of the input frames (default: network input)")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint to export")
_BACKEND = flags.DEFINE_enum(
    "backend", "onnxruntime", ["onnxruntime", "openvino"],
    "ONNX: the runtime the file is meant for (Winograd measured on it; its int8 quantiser)",
)  # fmt: skip
_WINOGRAD = flags.DEFINE_enum(
    "winograd", "measure", ["measure", "fixed", "off"],
    "ONNX: which 3x3 convolutions are Winograd F(4x4,3x3): measure each layer shape on this "
    "machine and --backend (seconds), the fixed rule, or none (GPU runtimes)",
)  # fmt: skip
_INT8 = flags.DEFINE_string(
    "int8_calibration", None, "Supervisely project: int8 convolutions calibrated on its frames"
)
_CALIBRATION_FRAMES = flags.DEFINE_integer("calibration_frames", 64, "frames to calibrate on")


def _parse(batch: str, frame_size: str | None):
    b = None if batch == "dynamic" else int(batch) if batch.isdigit() else 0
    if b is not None and b < 1:
        raise ValueError(f"--batch={batch}: expected a positive integer or 'dynamic'")
    if frame_size is None:
        return b, None
    hw = frame_size.lower().split("x")
    if len(hw) != 2 or not all(v.isdigit() and int(v) > 0 for v in hw):
        raise ValueError(f"--frame_size={frame_size}: expected HxW, e.g. 1024x1024")
    return b, (int(hw[0]), int(hw[1]))


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for flag in (_WORKDIR, _OUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    try:
        batch, frame_size = _parse(_BATCH.value, _FRAME.value)
        record = export_workdir(_WORKDIR.value, _OUT.value, format=_FORMAT.value,
                                which=_WHICH.value, batch=batch, frame_size=frame_size,
                                int8_calibration=_INT8.value,
                                calibration_count=_CALIBRATION_FRAMES.value,
                                winograd=_WINOGRAD.value, backend=_BACKEND.value)  # fmt: skip
        write_json_atomic(f"{_OUT.value}.json", record)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a read-only folder, a missing workdir: one line
        sys.exit(f"error: {os_error_line(e, _OUT.value)}")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    app.run(main)
