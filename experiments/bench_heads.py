r"""Inference cost of each keypoint head on one backbone: compiled engine, uint8 frame in.

    python experiments/bench_heads.py --backbone=resnet34 --image_size=512 \
        --heads=regression,integral,heatmap --out=runs/bench_heads.json
Each head's whole engine executable (resize, network, decoding) is timed in alternation with
the others (medians after warm-up; ratios to the first head from paired runs), and XLA's
FLOP count is reported per frame. Random weights: the cost does not depend on them.
"""

import json
import sys

import jax
import numpy as np
from absl import app, flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import quiet_third_party
from cardiac_core.timing import time_interleaved
from experiments.benchmarks.timing import device_description
from tavr_jax.infer.engine import KeypointEngine

_BACKBONE = flags.DEFINE_string("backbone", "resnet34", "backbone")
_SIZE = flags.DEFINE_integer("image_size", 512, "network input (and frame) size")
_HEADS = flags.DEFINE_list("heads", ["regression", "integral", "heatmap"], "heads; first = base")
_BATCH = flags.DEFINE_integer("batch_size", 1, "frames per call")
_MIN_TIME = flags.DEFINE_float("min_time", 5.0, "seconds of timed runs per head")
_OUT = flags.DEFINE_string("out", "runs/bench_heads.json", "results JSON")


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    b, s = _BATCH.value, _SIZE.value
    try:
        engines = [
            KeypointEngine.random_init("paper11", _BACKBONE.value, s, head=h, batch_size=b)
            for h in _HEADS.value
        ]
    except ValueError as e:
        sys.exit(f"error: {e}")
    frames = np.random.default_rng(0).integers(0, 256, (b, s, s), dtype=np.uint8)
    calls = [lambda e=e, x=e.put(frames): jax.block_until_ready(e.dispatch(x)) for e in engines]
    times = time_interleaved(calls, min_time_s=_MIN_TIME.value)
    rows = []
    for h, e, t in zip(_HEADS.value, engines, times, strict=True):
        flops = e.cost_analysis(s, s).get("flops", 0.0)
        rows.append({
            "head": h, "p50_ms_per_frame": float(np.median(t)) * 1e3 / b,
            "ratio_to_first": float(np.median(t / times[0])), "gflop_per_frame": flops / 1e9 / b,
            "runs": len(t),
        })  # fmt: skip
        r = rows[-1]
        print(f"{h:>12}: {r['p50_ms_per_frame']:.1f} ms/frame, x{r['ratio_to_first']:.3f}, "
              f"{r['gflop_per_frame']:.2f} GFLOP")  # fmt: skip
    result = {"device": device_description(), "backbone": _BACKBONE.value, "image_size": s,
              "batch_size": b, "rows": rows}  # fmt: skip
    write_json_atomic(_OUT.value, result)
    print(json.dumps(result["device"]))


if __name__ == "__main__":
    app.run(main)
