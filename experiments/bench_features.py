"""Throughput of the jnp strip/ring features vs the straightforward numpy loop (same output).

python experiments/bench_features.py --size=256 --batch=256
"""

import time

import jax
import numpy as np
from absl import app, flags

from cardiac_core.logs import quiet_third_party
from perfusion import features, geometry

_SIZE = flags.DEFINE_integer("size", 256, "polar map size (pixels)")
_BATCH = flags.DEFINE_integer("batch", 256, "maps per jnp call")
_DTYPE = flags.DEFINE_enum(
    "dtype", "uint8", ["uint8", "float32"], "map dtype: uint8 takes the exact one-pass path"
)
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed jnp calls after the warm-up (median)")
_LOOP_MAPS = flags.DEFINE_integer("loop_maps", 16, "maps per timed numpy-loop call")
_LOOP_REPEATS = flags.DEFINE_integer("loop_repeats", 3, "timed numpy-loop calls (median)")


def _maps(rng, n, size):
    maps = rng.integers(1, 256, (n, size, size, 3)).astype(np.uint8)
    maps[:, ~geometry.disk_mask(size)] = 0  # black outside the disk, as read from a study
    return maps


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rng = np.random.default_rng(0)
    maps = jax.device_put(_maps(rng, _BATCH.value, _SIZE.value).astype(_DTYPE.value))
    sub = np.asarray(maps[: _LOOP_MAPS.value])
    ref = features.strip_ring_features_loop(sub)

    def jnp_call():
        jax.block_until_ready(features.strip_ring_features(maps))

    def loop_call():
        features.strip_ring_features_loop(sub)

    jnp_call()  # compile
    # Interleaved, so both see the same machine load; medians of the timed calls.
    jnp_times, loop_times = [], []
    for i in range(max(_REPEATS.value, _LOOP_REPEATS.value)):
        if i < _REPEATS.value:
            jnp_times.append(_seconds(jnp_call))
        if i < _LOOP_REPEATS.value:
            loop_times.append(_seconds(loop_call))
    jnp_rate = _BATCH.value / np.median(jnp_times)
    loop_rate = len(sub) / np.median(loop_times)
    err = np.abs(np.asarray(features.strip_ring_features(sub)) - ref).max()
    print(
        f"{_SIZE.value}x{_SIZE.value} {_DTYPE.value} on {jax.devices()[0].platform} "
        f"({jax.local_device_count()} device(s)): jnp {jnp_rate:,.0f} maps/s, "
        f"numpy loop {loop_rate:,.0f} maps/s, speed-up {jnp_rate / loop_rate:.1f}x, "
        f"max |diff| {err:.2e}"
    )


if __name__ == "__main__":
    app.run(main)
