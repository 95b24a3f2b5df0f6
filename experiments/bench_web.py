"""Peak memory of the web server per request, large and hostile uploads (see docs/web.md).

python experiments/bench_web.py --backbone=resnet34 --image_size=512 --batch_size=8
"""

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from experiments.benchmarks import web_memory

_BACKBONE = flags.DEFINE_string("backbone", "resnet34", "backbone of the random-weight engine")
_SIZE = flags.DEFINE_integer("image_size", 512, "network input size")
_BATCH = flags.DEFINE_integer("batch_size", 8, "engine batch size (serve.py uses 8)")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rows = web_memory.run(_BACKBONE.value, _SIZE.value, _BATCH.value)
    print(web_memory.format_rows(rows))


if __name__ == "__main__":
    app.run(main)
