"""Direct against Winograd 3x3 convolutions, one layer size at a time, on each runtime
(`bench_winograd.py`): the measurement the export's `winograd_measure.MeasuredRule` makes per
layer shape, longer and with chained layers."""

import numpy as np

from cardiac_core.timing import time_interleaved
from tavr_jax.infer import winograd
from tavr_jax.infer.winograd_measure import MARGIN, layer_graph, layer_runner


def measure(channels: int, size: int, *, batch: int, layers: int, min_time: float,
            runtime: str = "onnxruntime") -> dict:  # fmt: skip
    """Both chains of one size on `runtime`, timed in alternation: ms per layer, paired ratio,
    difference, and which rule picks Winograd (the fixed one; the measured one's margin)."""
    x = np.random.default_rng(1).normal(size=(batch, channels, size, size)).astype(np.float32)
    runs = [layer_runner(layer_graph(channels, channels, (size, size), as_winograd=on,
                                     layers=layers), runtime) for on in (False, True)]  # fmt: skip
    direct, fast = (run(x) for run in runs)
    times = time_interleaved([lambda run=run: run(x) for run in runs], min_time_s=min_time,
                             shuffle_seed=0)  # fmt: skip
    ratio = float(np.median(times[1] / times[0]))
    return {
        "runtime": runtime, "channels": channels, "size": size, "batch": batch, "layers": layers,
        "direct_ms_per_layer": float(np.median(times[0])) * 1e3 / layers,
        "winograd_ms_per_layer": float(np.median(times[1])) * 1e3 / layers,
        "winograd_over_direct": ratio,
        "max_rel_difference": float(np.abs(fast - direct).max() / np.abs(direct).max()),
        "winograd_pays": winograd.pays(channels, channels, (size, size)),
        "measured_rule_picks": ratio <= MARGIN,
        "runs": len(times[0]),
    }  # fmt: skip
