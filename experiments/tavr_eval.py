"""The paper's metrics of a trained TAVR workdir on one split of a Supervisely project.

    python experiments/tavr_eval.py --workdir=W --data=DIR --split=test --out=metrics.json \
        [--threshold=0.5] [--tune_thresholds] [--overlays=DIR] [--refine] [--model_file=F]
--tune_thresholds first tunes per-point (and per-group) thresholds on the validation cases
and writes W/thresholds.json; without --threshold the evaluation uses that file.
--model_file scores a file exported from W (tavr_export.py; an ONNX file takes the frame
size it was exported for) in place of W's checkpoint, on the same cases; --backend=openvino
runs an .onnx file on OpenVINO instead of onnxruntime.
"""

import sys

from absl import app, flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import os_error_line, quiet_third_party
from tavr_jax.infer import evaluate
from tavr_jax.run.lock import WorkdirLocked

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (config.json, checkpoints/)")
_DATA = flags.DEFINE_string("data", None, "Supervisely project folder")
_SPLIT = flags.DEFINE_enum("split", "val", ["all", "train", "val", "test"], "case split")
_OUT = flags.DEFINE_string("out", None, "metrics JSON to write")
_THRESHOLD = flags.DEFINE_float("threshold", None, "one threshold for all points (no gating)")
_TUNE = flags.DEFINE_bool("tune_thresholds", False, "tune thresholds on val first")
_OVERLAYS = flags.DEFINE_string("overlays", None, "folder for truth/prediction PNGs")
_BATCH = flags.DEFINE_integer("batch_size", 16, "frames per compiled call")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint to load")
_REFINE = flags.DEFINE_bool("refine", False, "add the second stage trained into W/refiner")
_MODEL_FILE = flags.DEFINE_string(
    "model_file", None, "score this exported file (ONNX, int8 ONNX, jax.export) of W instead"
)
_BACKEND = flags.DEFINE_enum(
    "backend", "xla", ["xla", "onnxruntime", "openvino"],
    "runtime of an .onnx --model_file (xla: onnxruntime, as the file's default)",
)  # fmt: skip


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # orbax logs every checkpoint read at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for flag in (_WORKDIR, _DATA):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    try:
        if _TUNE.value:
            tuned = evaluate.tune_project(
                _WORKDIR.value, _DATA.value, batch_size=_BATCH.value, which=_WHICH.value
            )
            print(f"thresholds tuned on {tuned['n_images']} val frames -> W/thresholds.json")
        metrics = evaluate.evaluate_project(
            _WORKDIR.value,
            _DATA.value,
            split=_SPLIT.value,
            threshold=_THRESHOLD.value,
            batch_size=_BATCH.value,
            overlays_dir=_OVERLAYS.value,
            which=_WHICH.value,
            refine=_REFINE.value,
            model_file=_MODEL_FILE.value,
            backend=_BACKEND.value,
        )
        if _OUT.value:
            write_json_atomic(_OUT.value, metrics)
    except (ValueError, WorkdirLocked) as e:  # another run holds the workdir: one line
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a read-only folder, a missing file: one line
        sys.exit(f"error: {os_error_line(e, _OUT.value)}")
    print(evaluate.summary_table(metrics))


if __name__ == "__main__":
    app.run(main)
