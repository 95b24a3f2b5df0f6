"""Where the XLA engine's time goes on the CPU (`bench_xla_profile.py`, docs/latency.md).

XLA's CPU runtime runs a convolution on its thread pool, so a profiler trace shows only the
launches; here each operation that matters is compiled and timed alone instead, on its
inputs' shapes: every convolution of the network (and the same convolution on onnxruntime's
direct kernels, to compare the kernels), the max pool, the uint8 frames' conversion and
normalisation before the first convolution. The rest of the engine's time (batch norms,
ReLUs and residual adds, fused elementwise passes; the head) follows by difference. The
compiled program's top-level operations are counted too, layout changes (copies, transposes)
among them.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_core.timing import time_interleaved
from cardiac_core.xla import compile_lowered, kernel_census, primitive_equations
from tavr_jax.infer import onnx_export, onnx_runtime
from tavr_jax.infer.engine import KeypointEngine, keypoint_forward
from tavr_jax.models.keypoint_net import normalize_images


def _timed(fns, timing) -> list[float]:
    """Median ms of each of `fns`, timed in alternation (the same load on each)."""
    return [float(np.median(t)) * 1e3 for t in time_interleaved(fns, shuffle_seed=0, **timing)]


def _alone(eqn, platform: str):
    """(run(), inputs) of one jaxpr equation compiled alone on random inputs of its shapes."""
    rng = np.random.default_rng(0)
    args = [jax.device_put(rng.normal(size=v.aval.shape).astype(v.aval.dtype)) for v in eqn.invars]
    fn = jax.jit(lambda *a: eqn.primitive.bind(*a, **eqn.params))
    exe = compile_lowered(fn.lower(*args), platform)
    return lambda: jax.block_until_ready(exe(*args)), args


def _onnxruntime_conv(eqn, args):
    """The same convolution as one direct ONNX Conv (NCHW) on onnxruntime: run()."""
    (p0, _), (p1, _) = eqn.params["padding"]
    assert p0 == p1, "symmetric padding only"
    x, kernel = (np.asarray(a) for a in args)  # NHWC, HWIO
    g = onnx_export.Graph(winograd=False)
    stride = eqn.params["window_strides"][0]
    out = g.conv("x", {"kernel": kernel}, stride=stride, pad=p0)
    tensor, f32 = g.onnx.helper.make_tensor_value_info, g.onnx.TensorProto.FLOAT
    nchw = x.transpose(0, 3, 1, 2).copy()
    session = onnx_runtime.make_session(
        g.model("conv", [tensor("x", f32, nchw.shape)], [tensor(out, f32, None)]), spin=False
    )
    return lambda: session.run(None, {"x": nchw})


def layout_changes(compiled) -> dict[str, int]:
    """{kind: count} of the top-level copies and transposes one call runs (by name: XLA names
    a fusion after what it fuses, e.g. `copy_bitcast_fusion`)."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    names = re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", entry, re.M)
    counts = collections.Counter()
    for name in names:
        for kind in ("transpose", "copy"):
            if kind in name:
                counts[kind] += 1
                break
    return dict(counts)


def profile_engine(backbone: str, image_size: int, *, batch: int = 1, **timing) -> dict:
    """Where one batch's time goes in the XLA engine (random weights): whole, convolutions
    (XLA and onnxruntime per shape), max pool, frames to the first layer, the rest."""
    engine = KeypointEngine.random_init("paper11", backbone, image_size, batch_size=batch)
    platform = engine.device.platform
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size), jnp.uint8)
    forward = lambda v, f: keypoint_forward(engine.model, v, f, image_size=engine.image_size)  # noqa: E731
    frames = engine.put(np.random.default_rng(0).integers(0, 256, spec.shape, np.uint8))
    exe = engine.compiled(image_size, image_size)
    whole = lambda: jax.block_until_ready(exe(engine.variables, frames))  # noqa: E731

    groups: dict[tuple, list] = {}  # identical convolutions are timed once
    for eqn in primitive_equations(forward, ("conv_general_dilated",), engine.variables, spec):
        key = (tuple(v.aval.shape for v in eqn.invars), str(eqn.params))
        groups.setdefault(key, []).append(eqn)
    rows = []
    for eqns in groups.values():
        eqn = eqns[0]
        run, args = _alone(eqn, platform)
        xla_ms, ort_ms = _timed([run, _onnxruntime_conv(eqn, args)], timing)
        x_shape, k_shape = (v.aval.shape for v in eqn.invars)
        rows.append({"input_nhwc": list(x_shape), "kernel_hwio": list(k_shape),
                     "stride": eqn.params["window_strides"][0], "count": len(eqns),
                     "xla_ms": xla_ms, "onnxruntime_ms": ort_ms})  # fmt: skip
    (pool,) = primitive_equations(forward, ("reduce_window_max",), engine.variables, spec)
    pool_run, _ = _alone(pool, platform)

    def to_first_layer(f):  # uint8 frames -> normalised float32 NHWC, as the network starts
        return normalize_images(f.astype(jnp.float32), jnp.float32)

    prep = compile_lowered(jax.jit(to_first_layer).lower(frames), platform)
    prep_run = lambda: jax.block_until_ready(prep(frames))  # noqa: E731
    whole_ms, pool_ms, prep_ms = _timed([whole, pool_run, prep_run], timing)
    conv_ms = sum(r["xla_ms"] * r["count"] for r in rows)
    return {
        "backbone": backbone, "image_size": image_size, "batch": batch,
        "whole_ms": whole_ms,
        "convolutions_ms": conv_ms,
        "convolutions_onnxruntime_ms": sum(r["onnxruntime_ms"] * r["count"] for r in rows),
        "first_convolution_ms": rows[0]["xla_ms"],
        "max_pool_ms": pool_ms,
        "frames_to_first_layer_ms": prep_ms,
        "rest_ms": whole_ms - conv_ms - pool_ms - prep_ms,
        "top_level_operations": kernel_census(exe),
        "layout_changes": layout_changes(exe),
        "convolutions": rows,
    }  # fmt: skip
