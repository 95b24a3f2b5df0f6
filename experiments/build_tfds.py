"""Converts a Supervisely project into an array_record TFDS dataset (no TensorFlow needed).

    python experiments/build_tfds.py --data=data/sim --out=data/sim_tfds --image_size=512

Read it back with `tfds.builder_from_directory(OUT).as_data_source("train")`, or train from it
with `tavr_jax.data.pipeline.make_loader(OUT, "train", ...)`.
"""

import sys

from absl import app, flags

from cardiac_core import images
from cardiac_core.logs import os_error_line, quiet_third_party
from tavr_jax.data import pipeline, records
from tavr_jax.schema import get_schema

_DATA = flags.DEFINE_string("data", None, "Supervisely project folder", required=True)
_OUT = flags.DEFINE_string(
    "out", None, "output dataset folder (replaced when it holds an earlier dataset)", required=True
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a non-empty --out of other files")
_SIZE = flags.DEFINE_integer("image_size", 512, "training resolution S (frames become S x S)")
_SCHEMA = flags.DEFINE_string("schema", "paper11", "keypoint schema name or JSON path")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the split by case")
_VAL = flags.DEFINE_float("val_fraction", 0.2, "fraction of cases for validation")
_TEST = flags.DEFINE_float("test_fraction", 0.0, "fraction of cases for test")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", images.DEFAULT_MAX_PIXELS, "pixels per image")
_COMPRESS = flags.DEFINE_bool("compress", False, "zstd records: smaller, 3-4x slower to read")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        images.set_max_pixels(_MAX_PIXELS.value)
        out = records.build_tfds(
            _DATA.value,
            _OUT.value,
            image_size=_SIZE.value,
            schema=get_schema(_SCHEMA.value),
            seed=_SEED.value,
            val_fraction=_VAL.value,
            test_fraction=_TEST.value,
            compress=_COMPRESS.value,
            overwrite=_OVERWRITE.value,
            progress=True,
        )
        meta = records.read_tfds_meta(out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a read-only folder, a missing project: one line
        sys.exit(f"error: {os_error_line(e, _OUT.value)}")
    sizes = {name: len(pipeline.open_split(out, name)) for name in meta["split"]["cases"]}
    print(f"wrote {out}: " + ", ".join(f"{n} {k} frames" for k, n in sizes.items()))
    print(f"reader counts: {meta['reader_counts']}")


if __name__ == "__main__":
    app.run(main)
