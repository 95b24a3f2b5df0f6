"""One 3x3 convolution layer per size, direct against Winograd F(4x4, 3x3), on each runtime.

python experiments/bench_winograd.py --sizes=64x128,128x64,128x32,256x32,256x16,512x16,512x8 \
    --runtimes=onnxruntime,openvino

Each size is CxS: C channels in and out, an S x S map (ResNet34 at 512 px has 64x128, 128x64,
256x32 and 512x16). Both graphs chain --layers convolutions with a ReLU after each, as in a
residual stage (`winograd_measure.layer_graph`). They run in alternation, in a new random order
every round; prints, per runtime and size, the median ms per layer, the median paired ratio
Winograd / direct (below 1: Winograd is faster), the largest difference relative to the
output's range, and whether the fixed rule (`winograd.pays`) and the export's measured rule
(ratio <= `winograd_measure.MARGIN`, measured there on one layer) pick it.
"""

import json
import pathlib

from absl import app, flags

from cardiac_core.logs import quiet_third_party
from cardiac_core.timing import cpu_model
from experiments.benchmarks.winograd import measure

_SIZES = flags.DEFINE_list("sizes", ["64x128", "128x64", "128x32", "256x32", "256x16",
                                     "512x16", "512x8"], "CxS: channels x map size")  # fmt: skip
_RUNTIMES = flags.DEFINE_list("runtimes", ["onnxruntime"], "onnxruntime and/or openvino")
_BATCH = flags.DEFINE_integer("batch", 1, "frames per run")
_LAYERS = flags.DEFINE_integer("layers", 4, "convolutions in a chain")
_MIN_TIME = flags.DEFINE_float("min_time", 2.0, "seconds of timed runs per graph")
_OUT = flags.DEFINE_string("out", None, "also write the rows to this JSON (after every row)")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    del argv
    rows = []
    print(f"CPU: {cpu_model()}\n\n| runtime | C | map | direct ms/layer | Winograd ms/layer | "
          "Winograd / direct | max rel. diff | fixed rule | measured rule |\n"
          "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for runtime in _RUNTIMES.value:
        for spec in _SIZES.value:
            channels, size = (int(v) for v in spec.lower().split("x"))
            r = measure(channels, size, batch=_BATCH.value, layers=_LAYERS.value,
                        min_time=_MIN_TIME.value, runtime=runtime)  # fmt: skip
            rows.append({**r, "cpu": cpu_model()})
            yes = {True: "Winograd", False: "direct"}
            print(f"| {runtime} | {channels} | {size}x{size} | {r['direct_ms_per_layer']:.2f} | "
                  f"{r['winograd_ms_per_layer']:.2f} | {r['winograd_over_direct']:.2f} | "
                  f"{r['max_rel_difference']:.0e} | {yes[r['winograd_pays']]} | "
                  f"{yes[r['measured_rule_picks']]} |", flush=True)  # fmt: skip
            if _OUT.value:
                pathlib.Path(_OUT.value).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    app.run(main)
