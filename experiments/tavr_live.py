"""Live guidance in the terminal: keypoints and readouts on the newest frame of a live source.

    python experiments/tavr_live.py --workdir=W --input=device:0 --mm_per_px=0.25 \
        --target_depth_mm=3,6 --record=live.jsonl --record_video=live.mp4
    python experiments/tavr_live.py --workdir=W --input=cine.dcm --replay_fps=30 \
        --record=live.jsonl --max_seconds=60
--input: device:N (a V4L2/UVC frame grabber or webcam), an rtsp:// or http:// stream (MJPEG),
or a video, DICOM cine or image folder replayed at its own rate (--replay_fps overrides it).
Prints the readouts on one refreshing line; ends at the end of a replay, after --max_seconds or
on Ctrl-C, with a one-line summary. --record is one JSON object per processed frame, readable
after a kill; --record_video is the overlay, in --video_segment_s segments (OUT-000.mp4, ...;
tavr_jax/infer/live.py says what survives a kill). --refine, --backend and --model_file as in
tavr_infer.py.
"""

import sys

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from tavr_jax.infer.backends import open_engine
from tavr_jax.infer.live import run_live

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (config.json, checkpoints/)")
_MODEL_FILE = flags.DEFINE_string("model_file", None, "exported .onnx or jax.export file")
_INPUT = flags.DEFINE_string("input", None, "device:N, rtsp:// or http:// URL, or file to replay")
_REPLAY_FPS = flags.DEFINE_float("replay_fps", None, "replay rate (default: the file's own)")
_MM_PER_PX = flags.DEFINE_float("mm_per_px", None, "spacing when the frames carry none")
_TARGET = flags.DEFINE_list("target_depth_mm", None, "LO,HI: alert outside this depth range")
_STAGE = flags.DEFINE_string("stage_prior", None, "positioning, deploying or deployed")
_EXPECT = flags.DEFINE_string("expect", None, "groups expected at this stage, e.g. anatomical")
_TRACK = flags.DEFINE_enum("track", "kalman", ["oneeuro", "kalman", "none"], "temporal filter")
_REFINE = flags.DEFINE_bool("refine", False, "add the second stage trained into W/refiner")
_BACKEND = flags.DEFINE_enum(
    "backend", "xla", ["xla", "onnxruntime", "openvino"], "engine backend (an .onnx file: runtime)"
)
_PROVIDER = flags.DEFINE_enum(
    "provider", "auto", ["auto", "cpu", "cuda", "tensorrt"], "onnxruntime execution provider"
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint to load")
_RECORD = flags.DEFINE_string("record", None, "JSONL record, one line per processed frame")
_VIDEO = flags.DEFINE_string("record_video", None, "overlay video (.mp4, or .avi for MJPEG)")
_SEGMENT = flags.DEFINE_float("video_segment_s", 10.0, "overlay video segment length (0: one)")
_MAX_S = flags.DEFINE_float("max_seconds", None, "stop after this many seconds")
_STALL_S = flags.DEFINE_float("stall_s", 2.0, "report 'no signal' after this many seconds")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for flag in (_INPUT, _RECORD):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    if not (_WORKDIR.value or _MODEL_FILE.value):
        raise app.UsageError("--workdir or --model_file is required")
    target = None
    if _TARGET.value is not None:
        try:
            target = tuple(float(v) for v in _TARGET.value)
        except ValueError:
            target = ()
        if len(target) != 2:
            raise app.UsageError(f"--target_depth_mm must be LO,HI in mm, got {_TARGET.value}")
    try:
        engine = open_engine(_WORKDIR.value, model_file=_MODEL_FILE.value, backend=_BACKEND.value,
                             which=_WHICH.value, dtype=_DTYPE.value, provider=_PROVIDER.value,
                             refine=_REFINE.value)  # fmt: skip
        run_live(engine, _INPUT.value, replay_fps=_REPLAY_FPS.value, mm_per_px=_MM_PER_PX.value,
                 target_depth_mm=target, stage_prior=_STAGE.value, record=_RECORD.value,
                 record_video=_VIDEO.value, max_seconds=_MAX_S.value, stall_s=_STALL_S.value,
                 track=_TRACK.value, expect=_EXPECT.value,
                 video_segment_s=_SEGMENT.value or None)  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
