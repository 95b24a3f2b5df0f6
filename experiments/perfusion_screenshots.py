"""Workstation screenshots against clean exports of the same simulated studies: how many read,
the uptake error against the truth, and how much of the disks is masked.

python experiments/perfusion_screenshots.py --n=40 --seed=0 --out=runs/screenshots.json
"""

import json
import sys

from absl import app, flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import quiet_third_party
from experiments.studies import perfusion_screenshots
from perfusion import simulate

_N = flags.DEFINE_integer("n", 40, "studies")
_SEED = flags.DEFINE_integer("seed", 0, "random seed of the studies and their screenshots")
_SIZE = flags.DEFINE_integer("size", 128, "canonical grid the maps are read onto")
_DIFFICULTY = flags.DEFINE_enum(
    "difficulty", "clinical", tuple(simulate.DIFFICULTIES), "perfusion.simulate preset"
)
_OUT = flags.DEFINE_string("out", None, "also write the result JSON here")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        result = perfusion_screenshots.measure(
            _N.value, _SEED.value, size=_SIZE.value, difficulty=_DIFFICULTY.value
        )
        if _OUT.value:
            write_json_atomic(_OUT.value, result)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
