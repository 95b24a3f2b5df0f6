"""Input throughput: host pipeline (TFDS array_record -> grain batches) and device augmentation.

    python experiments/make_tavr_data.py --out=/tmp/bench_sim --cases=16 --frames=40 --size=512
    python experiments/bench_input.py --data=/tmp/bench_sim --image_size=512

--data is a Supervisely project (converted to TFDS first, into --tfds or a temporary folder)
or a folder written by build_tfds. Figures are medians of --repeats runs after warm-up.
"""

import sys
import tempfile

from absl import app, flags

from tavr_jax.data import augment, pipeline
from tavr_jax.schema import get_schema

_DATA = flags.DEFINE_string("data", None, "Supervisely project or TFDS folder", required=True)
_TFDS = flags.DEFINE_string("tfds", None, "where to build the TFDS copy (default: temporary)")
_SIZE = flags.DEFINE_integer("image_size", 512, "training resolution S")
_BATCH = flags.DEFINE_integer("batch_size", 32, "frames per batch")
_BATCHES = flags.DEFINE_integer("batches", 20, "batches per timed run")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs (the median is reported)")
_VARIANTS = flags.DEFINE_list("variants", ["0:0", "0:1", "0:2", "1:1", "2:1"], "workers:threads")
_SCHEMA = flags.DEFINE_string("schema", "paper11", "keypoint schema name or JSON path")


def _report(name, r):
    print(f"{name}: {r['frames_per_s']:6.0f} frames/s, {r['frames_per_cpu_s']:6.0f} per CPU-second")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    schema = get_schema(_SCHEMA.value)
    timing = dict(batch_size=_BATCH.value, batches=_BATCHES.value, repeats=_REPEATS.value)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            data = _DATA.value
            if not pipeline.is_tfds_dir(data):
                out = _TFDS.value or f"{tmp}/tfds"
                data = pipeline.build_tfds(_DATA.value, out, image_size=_SIZE.value, schema=schema)
                r = pipeline.benchmark_loader(_DATA.value, image_size=_SIZE.value, **timing)
                _report("Supervisely PNGs on the fly, 0 workers, 2 threads", r)
            for variant in _VARIANTS.value:
                workers, threads = (int(v) for v in variant.split(":"))
                r = pipeline.benchmark_loader(
                    data, num_workers=workers, num_threads=threads, **timing
                )
                _report(f"TFDS -> grain, {workers} workers, {threads} threads", r)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    r = augment.benchmark_augment(
        schema, image_size=_SIZE.value, batch_size=_BATCH.value, repeats=2 * _REPEATS.value
    )
    print(f"augment_batch on {r['device']}, batch {_BATCH.value}: {r['frames_per_s']:.0f} frames/s")


if __name__ == "__main__":
    app.run(main)
