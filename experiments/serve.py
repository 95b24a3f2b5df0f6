"""Local web page for polar maps and aortography frames.

  python experiments/serve.py --perfusion_model=MODEL_DIR --tavr_workdir=W [--port=8000]

Both model flags are optional: without them the page loads and says which model is missing.
Binds to 127.0.0.1 unless --host says otherwise. The limits bound what one request may cost
(bytes, pixels, frames) and how many heavy requests run at once; see README "Web page". The
Live tab replays the files of --live_dir and opens only the devices and URLs --live_sources
names.
"""

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("perfusion_model", None, "Folder written by perfusion_fit.py.")
flags.DEFINE_string("tavr_workdir", None, "Training workdir of a TAVR model.")
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (loopback by default).")
flags.DEFINE_integer("port", 8000, "Port.")
flags.DEFINE_float("max_upload_mb", 64.0, "Largest request body (all files of one form), MiB.")
flags.DEFINE_integer("max_pixels", 4096 * 4096, "Largest image or frame, pixels (from headers).")
flags.DEFINE_integer("max_frames", 300, "Frames of a video or cine decoded (the rest skipped).")
flags.DEFINE_integer(
    "max_total_pixels", 256 * 2**20, "Pixels of all decoded frames of one request together."
)
flags.DEFINE_integer("max_heavy", 2, "Requests decoding or running a model at the same time.")
flags.DEFINE_float("busy_wait_s", 5.0, "How long a request waits for a free slot before 503.")
flags.DEFINE_string(
    "live_dir",
    None,
    "Live tab: folder whose videos, cines and image folders "
    "may be replayed (nothing outside it is opened).",
)
flags.DEFINE_list(
    "live_sources",
    [],
    "Live tab: devices and stream URLs it may open, e.g. "
    "device:0,rtsp://10.0.0.5/* (a trailing * allows a prefix).",
)
flags.DEFINE_float("live_idle_stop_s", 30.0, "Live tab: stop a session nobody watched this long.")
flags.DEFINE_float("live_max_s", 0.0, "Live tab: longest session, seconds (0: no limit).")


def main(argv):
    del argv
    from cardiac_core.logs import quiet_third_party

    quiet_third_party(FLAGS["verbosity"])  # before the models load: orbax logs each read
    import uvicorn

    from cardiac_web.app import Limits, create_app
    from cardiac_web.live import LiveOptions

    try:
        limits = Limits(
            max_upload_mb=FLAGS.max_upload_mb,
            max_pixels=FLAGS.max_pixels,
            max_frames=FLAGS.max_frames,
            max_total_pixels=FLAGS.max_total_pixels,
            max_heavy=FLAGS.max_heavy,
            busy_wait_s=FLAGS.busy_wait_s,
        )
        live = LiveOptions(
            replay_dir=FLAGS.live_dir,
            sources=tuple(FLAGS.live_sources),
            idle_stop_s=FLAGS.live_idle_stop_s,
            max_seconds=FLAGS.live_max_s or None,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    web = create_app(perfusion_dir=FLAGS.perfusion_model, tavr_workdir=FLAGS.tavr_workdir,
                     limits=limits, live=live)  # fmt: skip
    print(f"serving on http://{FLAGS.host}:{FLAGS.port}/")
    uvicorn.run(web, host=FLAGS.host, port=FLAGS.port, log_level="warning")


if __name__ == "__main__":
    app.run(main)
