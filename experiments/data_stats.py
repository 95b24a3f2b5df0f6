"""Counts and a contact sheet of a Supervisely keypoint project: what to check first.

python experiments/data_stats.py --data=data/sim --out=stats.json   # and stats.png beside it

Every frame is decoded as training reads it; frames build_tfds and training would refuse
(empty, truncated or not an image, over --max_pixels, another size than the annotation's) are
counted and the first few listed. --strict: exit 1 when there are any.
"""

import json
import sys

from absl import app, flags

from cardiac_core import images
from cardiac_core.logs import quiet_third_party
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
_STRICT = flags.DEFINE_bool("strict", False, "exit 1 when any frame cannot be read")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
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
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else " (no readable frame)"))
    got = json.loads(json_path.read_text())
    n, examples = got["unreadable_frames"], got["unreadable_examples"]
    if n:
        print(
            f"UNREADABLE: {n} of {got['n_frames']} frames cannot be read; build_tfds and "
            f"training refuse them (first {len(examples)} below, all counted in {json_path}):"
        )
        for e in examples:
            print(f"  {e['reason']}")
        if _STRICT.value:
            sys.exit(1)


if __name__ == "__main__":
    app.run(main)
