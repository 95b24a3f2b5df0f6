"""Local web page for polar maps and aortography frames.

  python experiments/serve.py --perfusion_model=MODEL_DIR --tavr_workdir=W [--port=8000]

Both model flags are optional: without them the page loads and says which model is missing.
Binds to 127.0.0.1 unless --host says otherwise.
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("perfusion_model", None, "Folder written by perfusion_fit.py.")
flags.DEFINE_string("tavr_workdir", None, "Training workdir of a TAVR model.")
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (loopback by default).")
flags.DEFINE_integer("port", 8000, "Port.")
flags.DEFINE_float("max_upload_mb", 64.0, "Largest upload accepted, MiB.")


def main(argv):
    del argv
    import uvicorn

    from cardiac_web.app import Limits, create_app

    web = create_app(
        perfusion_dir=FLAGS.perfusion_model,
        tavr_workdir=FLAGS.tavr_workdir,
        limits=Limits(max_upload_mb=FLAGS.max_upload_mb),
    )
    print(f"serving on http://{FLAGS.host}:{FLAGS.port}/")
    uvicorn.run(web, host=FLAGS.host, port=FLAGS.port, log_level="warning")


if __name__ == "__main__":
    app.run(main)
