"""Compiling lowered JAX programs and reading XLA's cost analysis (one place for both).

The inference engine and the benchmarks compile through `compile_lowered`, so the CPU options
below apply to every timed and every deployed executable alike.
"""

from __future__ import annotations

import logging

# On CPU, XLA's default greedy YNNPACK graph fusion runs whole residual stages as one slow
# fused subgraph (measured 1.9x slower for ResNet18 at 256 px), and even convolutions offloaded
# one by one to YNNPACK are 15-25% slower than XLA's own convolution path with YNNPACK off
# (ResNet18/34 at 256 px, batch 1 and 8, quiet 2-core machine). See docs/latency.md.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}
_unknown_options_logged = False


def compile_lowered(lowered, platform: str):
    """Compiles a `jax.stages.Lowered`, with the CPU options above where this XLA knows them.

    An XLA that does not know an option rejects it at compile time; its default pipeline is
    still correct, so that one case (and only that one) falls back to plain compilation.
    """
    global _unknown_options_logged
    if platform == "cpu":
        try:
            return lowered.compile(compiler_options=CPU_COMPILER_OPTIONS)
        except Exception as e:  # XLA reports an unknown option as a generic runtime error
            if not any(name in str(e) for name in CPU_COMPILER_OPTIONS):
                raise
            if not _unknown_options_logged:
                logging.warning("this XLA lacks a CPU option (%s); using its defaults", e)
                _unknown_options_logged = True
    return lowered.compile()


def cost_analysis(compiled) -> dict:
    """XLA's cost analysis of a compiled executable as one dict (flops, bytes accessed...).

    For SPMD programs the figures are per device. Older JAX returned one dict per program.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return dict(cost or {})


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled executable (per device), or None when XLA gives none."""
    flops = cost_analysis(compiled).get("flops")
    return None if flops is None else float(flops)
