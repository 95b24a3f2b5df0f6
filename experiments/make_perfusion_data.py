"""Simulated perfusion study folder (images/, masks/, labels.csv) in the SPEC.md format.

python experiments/make_perfusion_data.py --out=data/perfusion --n=300 --seed=0
"""

import sys

from absl import app, flags

from perfusion import colormaps, simulate

_OUT = flags.DEFINE_string("out", None, "output study folder", required=True)
_N = flags.DEFINE_integer("n", 300, "number of studies (balanced normal/ischemia/infarction)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed (deterministic per seed)")
_SIZE = flags.DEFINE_integer("size", 128, "canonical polar grid of the ground truth (pixels)")
_DISK = flags.DEFINE_integer("disk_px", 200, "disk diameter in the exported image (pixels)")
_CMAP = flags.DEFINE_enum("colormap", "spectrum", colormaps.COLORMAP_NAMES, "export colormap")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        sims = simulate.simulate_dataset(
            _OUT.value,
            _N.value,
            _SEED.value,
            size=_SIZE.value,
            colormap=_CMAP.value,
            disk_px=_DISK.value,
            progress=True,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    counts = {lab: sum(s.label == lab for s in sims) for lab in simulate.LABELS}
    print(f"wrote {len(sims)} studies to {_OUT.value}: {counts}")


if __name__ == "__main__":
    app.run(main)
