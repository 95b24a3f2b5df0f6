"""Keypoints for every frame of an image, folder of images, video or DICOM cine.

    python experiments/tavr_infer.py --workdir=W --input=cine.dcm --out=OUT --overlay \
        --track=kalman --expect=anatomical,contour
    python experiments/tavr_infer.py --model_file=model.onnx --workdir=W --input=frames/ \
        --out=preannotation/ --format=supervisely
Writes OUT/predictions.jsonl (one line per frame), OUT/coco_keypoints.json and, with
--overlay, OUT/overlay.avi (video/DICOM) or OUT/overlay/*.png (images). --format=supervisely
writes OUT as a Supervisely project of the reported points instead (pre-annotation).
--backend=onnxruntime|openvino runs the workdir's network on that runtime; --model_file runs an
exported file (tavr_export.py; an .onnx on onnxruntime, or OpenVINO with --backend=openvino),
checked against --workdir and --schema when they are given.
--refine adds the second stage trained into W/refiner (experiments/tavr_refine.py).
The outside libraries' INFO and WARNING logs are off unless --verbosity asks (0: INFO).
"""

import sys

from absl import app, flags

from cardiac_core.logs import os_error_line, quiet_third_party
from tavr_jax.infer.backends import open_engine
from tavr_jax.infer.outputs import FORMATS, check_out_dir, run_inference

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (config.json, checkpoints/)")
_INPUT = flags.DEFINE_string("input", None, "image, folder of images, video or DICOM file")
_OUT = flags.DEFINE_string("out", None, "output folder")
_OVERLAY = flags.DEFINE_bool("overlay", False, "also write annotated frames")
_TRACK = flags.DEFINE_enum("track", "kalman", ["oneeuro", "kalman", "none"], "temporal filter")
_EXPECT = flags.DEFINE_string("expect", None, "groups expected at this stage, e.g. anatomical")
_BATCH = flags.DEFINE_integer("batch_size", 1, "frames per compiled call")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint to load")
_SCHEMA = flags.DEFINE_string("schema", None, "refuse a checkpoint of another schema")
_BACKBONE = flags.DEFINE_string("backbone", None, "refuse a checkpoint of another backbone")
_BACKEND = flags.DEFINE_enum(
    "backend", "xla", ["xla", "onnxruntime", "openvino"], "engine backend (an .onnx file: runtime)"
)
_REFINE = flags.DEFINE_bool("refine", False, "add the second stage trained into W/refiner")
_MODEL_FILE = flags.DEFINE_string("model_file", None, "exported .onnx or jax.export file")
_PROVIDER = flags.DEFINE_enum(
    "provider", "auto", ["auto", "cpu", "cuda", "tensorrt"], "onnxruntime execution provider"
)
_FORMAT = flags.DEFINE_enum("format", "jsonl", list(FORMATS), "jsonl (+COCO) or supervisely")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for flag in (_INPUT, _OUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    if not (_WORKDIR.value or _MODEL_FILE.value):
        raise app.UsageError("--workdir or --model_file is required")
    try:
        check_out_dir(_OUT.value)  # before the engine loads and compiles
        engine = open_engine(
            _WORKDIR.value,
            model_file=_MODEL_FILE.value,
            backend=_BACKEND.value,
            which=_WHICH.value,
            schema=_SCHEMA.value,
            backbone=_BACKBONE.value,
            batch_size=_BATCH.value,
            dtype=_DTYPE.value,
            provider=_PROVIDER.value,
            refine=_REFINE.value,
        )
        summary = run_inference(
            engine,
            _INPUT.value,
            _OUT.value,
            overlay=_OVERLAY.value,
            track=_TRACK.value,
            expect=_EXPECT.value,
            format=_FORMAT.value,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a read-only folder, a missing file: one line
        sys.exit(f"error: {os_error_line(e, _OUT.value)}")
    print(f"{summary['frames']} frames ({summary['source']}) -> {summary['predictions']}")
    if summary["skipped"]:
        for name, reason in summary["skipped"]:
            print(f"skipped {name}: {reason}", file=sys.stderr)
        sys.exit(f"error: {len(summary['skipped'])} item(s) skipped, the others were written")


if __name__ == "__main__":
    app.run(main)
