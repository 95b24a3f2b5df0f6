"""Simulates a TAVR aortography project (Supervisely format) with exact keypoints.

    python experiments/make_tavr_data.py --out=data/sim --cases=40 --frames=30 --size=512 --seed=0
    python experiments/make_tavr_data.py --out=/tmp/f --cases=4 --frames=20 \
        --figure=docs/simulated_frames.png   # also the picture in docs/data.md
    python experiments/make_tavr_data.py --out=data/sim --cases=150 --frames=40 --workers=16
    python experiments/make_tavr_data.py --bench --size=512   # frames/s on this machine
"""

import os
import sys

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from tavr_jax.data import simulate, stats, supervisely
from tavr_jax.schema import get_schema

_OUT = flags.DEFINE_string("out", None, "output Supervisely project folder")
_CASES = flags.DEFINE_integer("cases", 20, "number of cases (patients)")
_FRAMES = flags.DEFINE_integer("frames", 20, "frames per case")
_SIZE = flags.DEFINE_integer("size", 512, "frame size in pixels (square)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed (same seed, same bytes)")
_SCHEMA = flags.DEFINE_string("schema", "paper11", "keypoint schema name or JSON path")
_FIGURE = flags.DEFINE_string("figure", None, "also write a contact sheet of frames here")
_WORKERS = flags.DEFINE_integer("workers", 1, "processes simulating cases (0: one per core)")
_CINES = flags.DEFINE_string(
    "cines", None, "also write each case as a DICOM cine (spacing, frame rate) in this folder"
)
_BENCH = flags.DEFINE_bool("bench", False, "measure frames/s on one core instead of writing")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        schema = get_schema(_SCHEMA.value)
        if _BENCH.value:
            # Imported here: --workers re-imports this module in every worker process, and
            # the timing helpers import JAX, which the simulator does not need.
            from experiments.benchmarks.simulation import simulator_rate

            r = simulator_rate(schema, size=_SIZE.value, frames=_FRAMES.value)
            print(
                f"{r['frames_per_s']:.1f} frames/s wall-clock, {r['frames_per_cpu_s']:.1f} per "
                f"CPU-second, at {_SIZE.value}x{_SIZE.value} "
                f"(median of {r['repeats']} runs of {r['frames']} frames; "
                f"case set-up {r['setup_ms']:.0f} ms)"
            )
            return
        if not _OUT.value:
            raise app.UsageError("--out is required")
        root = simulate.simulate_project(
            _OUT.value,
            schema,
            cases=_CASES.value,
            frames=_FRAMES.value,
            size=_SIZE.value,
            seed=_SEED.value,
            workers=_WORKERS.value or os.cpu_count(),
        )
        print(f"wrote {_CASES.value * _FRAMES.value} frames to {root}")
        if _CINES.value:
            cines = simulate.write_cines(root, schema, _CINES.value)
            print(f"wrote {len(cines)} DICOM cines to {_CINES.value}")
        if _FIGURE.value:
            project = supervisely.read_project(root, schema)
            print(f"wrote {stats.write_contact_sheet(project, _FIGURE.value)}")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
