"""Live guidance under load: held-out simulated cines replayed at 15 and 30 frames/s.

    python experiments/bench_live.py --workdir=W [--refine] [--backend=xla|onnxruntime]
        [--model_file=F] --out=live.json [--minutes=N] [--rates=15,30] [--browser]

Simulates `--cases` held-out cases (seed `--seed`, one training never uses: the simulator draws
case c of a project from (seed, c)), writes each as a DICOM cine with its pixel spacing and
replays them in turn for `--minutes` per rate: in this process through `LiveSession`, or with
`--browser` through the real server (experiments/serve.py) watched by headless Chromium's Live
tab, which measures arrival -> paint ages. Writes per rate processed_fps, dropped,
age_ready_p50_ms / p99, age_paint_p50_ms / p99 (null without --browser), rss_mb (every 30 s; the
server's with --browser) and the depth readouts scored against the simulator's truth, with the
CPU model and the date. See experiments/benchmarks/live.py.
"""

import sys

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from experiments.benchmarks import live

# tests/test_live.py reaches these through the launcher, where they used to live
held_out_cines, replay_at = live.held_out_cines, live.replay_at

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir")
_REFINE = flags.DEFINE_bool("refine", False, "add the refiner trained into W/refiner")
_MODEL_FILE = flags.DEFINE_string("model_file", None, "exported .onnx or jax.export file")
_BACKEND = flags.DEFINE_enum("backend", "xla", ["xla", "onnxruntime"], "engine backend")
_OUT = flags.DEFINE_string("out", "live.json", "results JSON")
_MINUTES = flags.DEFINE_float("minutes", 1.0, "minutes of replay per rate")
_RATES = flags.DEFINE_list("rates", ["15", "30"], "replay rates, frames/s")
_BROWSER = flags.DEFINE_bool("browser", False, "through the server and headless Chromium")
_CASES = flags.DEFINE_integer("cases", 4, "held-out simulated cases")
_FRAMES = flags.DEFINE_integer("frames", 60, "frames per case")
_SIZE = flags.DEFINE_integer("size", 512, "frame size, pixels")
_SEED = flags.DEFINE_integer("seed", 9001, "simulator seed (not one training used)")
_TARGET = flags.DEFINE_list("target_depth_mm", ["3", "6"], "LO,HI for range agreement")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if not (_WORKDIR.value or _MODEL_FILE.value):
        raise app.UsageError("--workdir or --model_file is required")
    try:
        live.run(_WORKDIR.value, out=_OUT.value, model_file=_MODEL_FILE.value,
                 backend=_BACKEND.value, refine=_REFINE.value,
                 rates=[float(r) for r in _RATES.value], minutes=_MINUTES.value,
                 browser=_BROWSER.value, cases=_CASES.value, frames=_FRAMES.value,
                 size=_SIZE.value, seed=_SEED.value,
                 target_depth_mm=[float(v) for v in _TARGET.value])  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
