"""Counts and a contact sheet of a Supervisely keypoint project: what to check first.

python experiments/data_stats.py --data=data/sim --out=stats.json   # and stats.png beside it
"""

import sys

from absl import app, flags

from cardiac_core import images
from tavr_jax.data import stats
from tavr_jax.schema import get_schema

_DATA = flags.DEFINE_string("data", None, "Supervisely project folder", required=True)
_OUT = flags.DEFINE_string("out", "stats.json", "output JSON; the contact sheet goes beside it")
_SPLIT = flags.DEFINE_string("split", "all", "all, train, val or test (split by case)")
_SCHEMA = flags.DEFINE_string("schema", "paper11", "keypoint schema name or JSON path")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the case split and of the sampled frames")
_SHEET = flags.DEFINE_integer("sheet_frames", 8, "frames on the contact sheet (at most 64)")
_DRAWS = flags.DEFINE_integer(
    "augment_draws", 20, "augmentation draws per frame for the erased-point fractions (0: skip)"
)
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", images.DEFAULT_MAX_PIXELS, "pixels per image")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        images.set_max_pixels(_MAX_PIXELS.value)
        json_path, png_path = stats.write_stats(
            _DATA.value,
            _OUT.value,
            schema=get_schema(_SCHEMA.value),
            split=_SPLIT.value,
            seed=_SEED.value,
            sheet_frames=_SHEET.value,
            augment_draws=_DRAWS.value,
        )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    app.run(main)
