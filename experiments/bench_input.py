r"""Input throughput: the host loader (decoded in memory, or read on demand) and the device
augmentation.

    python experiments/make_tavr_data.py --out=/tmp/bench_sim --cases=16 --frames=40 --size=512
    python experiments/bench_input.py --data=/tmp/bench_sim --image_size=512 --out=input.json

--data is a Supervisely project (also converted to TFDS, into --tfds or a temporary folder,
unless --nobuild_tfds) or a folder written by build_tfds. Variants: `memory` (decode the
split once with --decode_threads, then serve batches by index) or `W:T` (read on demand with
W grain workers and T reader threads). Rates are medians of --repeats runs after warm-up; the
JSON is rewritten after every row.
"""

import datetime
import os
import sys
import tempfile

from absl import app, flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import quiet_third_party
from experiments.benchmarks import input as bench
from experiments.benchmarks.timing import device_description
from tavr_jax.data import records
from tavr_jax.schema import get_schema

_DATA = flags.DEFINE_string("data", None, "Supervisely project or TFDS folder", required=True)
_TFDS = flags.DEFINE_string("tfds", None, "where to build the TFDS copy (default: temporary)")
_BUILD = flags.DEFINE_bool("build_tfds", True, "also measure a TFDS copy of a project")
_SIZE = flags.DEFINE_integer("image_size", 512, "training resolution S")
_BATCH = flags.DEFINE_integer("batch_size", 32, "frames per batch")
_BATCHES = flags.DEFINE_integer("batches", 20, "batches per timed run")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs (the median is reported)")
_VARIANTS = flags.DEFINE_list("variants", ["memory", "0:2", "1:1"], "memory or workers:threads")
_THREADS = flags.DEFINE_integer("decode_threads", None, "threads decoding into memory (cores)")
_SCHEMA = flags.DEFINE_string("schema", "paper11", "keypoint schema name or JSON path")
_OUT = flags.DEFINE_string("out", "bench_input.json", "results JSON")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = {"date": datetime.date.today().isoformat(), "device": device_description(),
              "cpu_count": os.cpu_count(), "batch_size": _BATCH.value, "rows": []}  # fmt: skip

    def report(row):
        result["rows"].append(row)
        write_json_atomic(_OUT.value, result)
        print(f"{row['source']}, {row['variant']}: {row['frames_per_s']:8.0f} frames/s, "
              f"{row['frames_per_cpu_s']:8.0f} per CPU-second", flush=True)  # fmt: skip

    timing = dict(batch_size=_BATCH.value, batches=_BATCHES.value, repeats=_REPEATS.value)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sources = {"tfds": _DATA.value}
            if not records.is_tfds_dir(_DATA.value):
                sources = {"supervisely": _DATA.value}
                if _BUILD.value:
                    sources["tfds"] = records.build_tfds(
                        _DATA.value, _TFDS.value or f"{tmp}/tfds", image_size=_SIZE.value,
                        schema=get_schema(_SCHEMA.value), val_fraction=0.2,
                    )  # fmt: skip
            for name, path in sources.items():
                size = _SIZE.value if name == "supervisely" else None
                for variant in _VARIANTS.value:
                    if variant == "memory":
                        d, frames = bench.decode_rate(path, image_size=size,
                                                      threads=_THREADS.value)  # fmt: skip
                        report({"source": name, "variant": "decode into memory", **d})
                        r = bench.loader_rate(frames, **timing)
                        report({"source": name, "variant": "in memory, served by index", **r})
                        continue
                    workers, threads = (int(v) for v in variant.split(":"))
                    r = bench.loader_rate(path, image_size=size, num_workers=workers,
                                          num_threads=threads, **timing)  # fmt: skip
                    variant = f"on demand, {workers} workers, {threads} threads"
                    report({"source": name, "variant": variant, **r})
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    r = bench.augment_rate(get_schema(_SCHEMA.value), image_size=_SIZE.value,
                           batch_size=_BATCH.value, repeats=2 * _REPEATS.value)  # fmt: skip
    result["augment"] = r
    write_json_atomic(_OUT.value, result)
    print(f"augment_batch on {r['device']}, batch {_BATCH.value}: {r['frames_per_s']:.0f} frames/s")


if __name__ == "__main__":
    app.run(main)
