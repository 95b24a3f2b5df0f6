"""Simulated perfusion study folder (images/, masks/, labels.csv), easy or clinically hard.

python experiments/make_perfusion_data.py --out=data/perfusion --n=300 --seed=0
python experiments/make_perfusion_data.py --out=data/hard --n=600 --seed=0 --difficulty=clinical
python experiments/make_perfusion_data.py --out=data/shots --n=40 --export_style=screenshot
"""

import dataclasses
import sys

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from perfusion import colormaps, exports, simulate

_OUT = flags.DEFINE_string("out", None, "output study folder", required=True)
_N = flags.DEFINE_integer("n", 300, "number of studies")
_SEED = flags.DEFINE_integer("seed", 0, "random seed (deterministic per seed)")
_SIZE = flags.DEFINE_integer("size", 128, "canonical polar grid of the ground truth (pixels)")
_DISK = flags.DEFINE_integer("disk_px", 200, "disk diameter in the exported image (pixels)")
_CMAP = flags.DEFINE_enum("colormap", "spectrum", colormaps.COLORMAP_NAMES, "export colormap")
_LAYOUT = flags.DEFINE_enum("layout", "side", simulate.LAYOUTS, "export layout")
_STYLE = flags.DEFINE_enum(
    "export_style",
    "plain",
    exports.EXPORT_STYLES,
    "plain exports (--colormap, --disk_px, --layout) or workstation screenshots drawn at random "
    "(window chrome, segment grid and scores, cursor, several tables, PNG or JPEG)",
)
_DIFFICULTY = flags.DEFINE_enum(
    "difficulty", "easy", tuple(simulate.DIFFICULTIES), "preset (perfusion.simulate.Difficulty)"
)
_DEPTH = flags.DEFINE_list("depth", None, "defect depth range LOW,HIGH overriding the preset's")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        difficulty = simulate.get_difficulty(_DIFFICULTY.value)
        if _DEPTH.value:
            low, high = (float(v) for v in _DEPTH.value)
            difficulty = dataclasses.replace(difficulty, depth=(low, high))
        sims = simulate.simulate_dataset(
            _OUT.value,
            _N.value,
            _SEED.value,
            size=_SIZE.value,
            colormap=_CMAP.value,
            disk_px=_DISK.value,
            difficulty=difficulty,
            layout=_LAYOUT.value,
            export_style=_STYLE.value,
            progress=True,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    counts = {lab: sum(s.label == lab for s in sims) for lab in simulate.LABELS}
    print(f"wrote {len(sims)} studies to {_OUT.value}: {counts}")


if __name__ == "__main__":
    app.run(main)
