"""Test session set-up: several simulated CPU devices, so sharding code runs for real."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

# Silent broadcasting of masks against the wrong axis is the classic bug in masked losses.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Many tests compile the same small networks: a persistent cache shares those compilations
# between test files, xdist workers and later runs.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
