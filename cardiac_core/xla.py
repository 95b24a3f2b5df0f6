"""Compiling lowered JAX programs, and counting what they cost (XLA's analysis, model FLOPs,
the kernels one call launches).

The inference engine, the benchmarks and training compile with `compiler_options` (through
`compile_lowered` or `jax.jit`), so the CPU options below apply to every timed, trained and
deployed executable alike.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import re

import jax
import numpy as np
from jax.extend import core as jax_core

# On CPU, XLA's default greedy YNNPACK graph fusion runs whole residual stages as one slow
# fused subgraph (measured 1.9x slower for ResNet18 at 256 px), and even convolutions offloaded
# one by one to YNNPACK are 15-25% slower than XLA's own convolution path with YNNPACK off
# (ResNet18/34 at 256 px, batch 1 and 8, quiet 2-core machine). See docs/latency.md.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


@functools.cache
def compiler_options(platform: str) -> dict | None:
    """`CPU_COMPILER_OPTIONS` on a CPU whose XLA knows them, else None (its defaults).

    For `jax.jit(..., compiler_options=...)` and `compile_lowered` alike, so that training,
    inference and the benchmarks compile the same way. An XLA that does not know an option
    rejects it at compile time; a tiny program finds that out once per process.
    """
    if platform != "cpu":
        return None
    cpu = jax.devices("cpu")[0]
    probe = jax.jit(lambda x: x + 1).lower(jax.device_put(np.zeros(2, np.float32), cpu))
    try:
        probe.compile(compiler_options=CPU_COMPILER_OPTIONS)
    except Exception as e:  # XLA reports an unknown option as a generic runtime error
        if not any(name in str(e) for name in CPU_COMPILER_OPTIONS):
            raise
        logging.warning("this XLA lacks a CPU option (%s); using its defaults", e)
        return None
    return dict(CPU_COMPILER_OPTIONS)


def compile_lowered(lowered, platform: str):
    """Compiles a `jax.stages.Lowered` with `compiler_options(platform)`."""
    return lowered.compile(compiler_options=compiler_options(platform))


def cost_analysis(compiled) -> dict:
    """XLA's cost analysis of a compiled executable as one dict (flops, bytes accessed...).

    For SPMD programs the figures are per device. Older JAX returned one dict per program.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return dict(cost or {})


# Entry-computation instructions that launch no work of their own.
_BOOKKEEPING = frozenset(
    {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"}
)
_OPCODE = re.compile(r"\s([a-z][\w.\-]*)\(")  # after "name = shape": the first "opcode("


def kernel_census(compiled) -> dict[str, int]:
    """{opcode: count} of the top-level operations one call of a compiled executable runs.

    They are the entry computation's instructions after XLA's optimisations (fusions,
    convolutions and GEMMs as custom calls, copies), less bookkeeping (parameters, tuples,
    bitcasts). On a GPU each is about one kernel launch, so at batch 1 the time per
    operation says whether a network is bound by launches rather than by arithmetic.
    """
    census: collections.Counter = collections.Counter()
    entry = False
    for line in compiled.as_text().splitlines():
        if line.startswith("ENTRY "):
            entry = True
        elif entry and line.startswith("}"):
            break
        elif entry and " = " in line:
            m = _OPCODE.search(line.split(" = ", 1)[1])
            if m and m.group(1) not in _BOOKKEEPING:
                census[m.group(1)] += 1
    return dict(census)


def model_flops(fn, *args) -> float:
    """FLOPs of the convolutions and matrix products of one call of `fn(*args)`, 2 per
    multiply-add, counted from its jaxpr (args may be arrays or `jax.ShapeDtypeStruct`s).

    XLA's own analysis depends on the backend: on a GPU the compiled cost analysis leaves out
    the convolutions that run in cuDNN (on an H200: 1.15 of the 118 GFLOP per training image
    of ResNet34 at 512 px), and the CUDA plugin does not analyse a lowered program at all.
    This count is the same everywhere and is what model FLOP utilisation (MFU) is defined on:
    elementwise work, which XLA also counts, is left out, and every tap of a padded
    convolution is counted (XLA skips the taps on the padding: 3% fewer at 512 px).
    """
    # A jitted function is traced at the top level: one carrying compiler options (training's
    # steps) cannot be nested inside make_jaxpr's trace.
    traced = fn.trace(*args).jaxpr if hasattr(fn, "trace") else jax.make_jaxpr(fn)(*args)
    return _jaxpr_flops(traced.jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in contracting)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            dims = eqn.params["dimension_numbers"]
            rhs = eqn.invars[1].aval.shape  # kernel: (out, in / groups, *window) in rhs_spec order
            in_per_group = rhs[dims.rhs_spec[1]]
            window = math.prod(rhs[d] for d in dims.rhs_spec[2:])
            # An input dilation (the input gradient of a strided convolution) multiplies only
            # one tap in prod(dilation) by a non-zero: the real work is that fraction.
            holes = math.prod(eqn.params["lhs_dilation"])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * in_per_group * window / holes
        subs = [_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)]
        if name == "cond":
            total += max(subs, default=0.0)  # one branch runs
        elif name == "scan":
            total += eqn.params["length"] * sum(subs)
        else:  # jit, custom_jvp/vjp, remat...; a while loop's body is counted once
            total += sum(subs)
    return total


def primitive_equations(fn, names, *args) -> list:
    """The equations of `fn(*args)`'s jaxpr (nested ones included, in order) whose primitive
    is one of `names`, e.g. every `conv_general_dilated` of a network, to time them alone."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in names:
                found.append(eqn)
            for sub in _sub_jaxprs(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, jax_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax_core.Jaxpr):
                yield v
