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


# ----------------------------------------------------------------------------- profiler traces

# Lines of a device in a trace that XLA's profiler derives from the kernels (not kernels).
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "TensorFlow",
                  "Launch Stats", "XLA TraceMe", "Host Threads")  # fmt: skip
_NOT_KERNELS = ("end: ", "ThreadpoolListener", "ThunkExecutor")  # CPU thunk-executor markers
COPY_PREFIXES = ("Memcpy", "Memset", "memcpy", "memset")


def load_trace(trace_dir) -> list[dict]:
    """The events of the newest `jax.profiler` trace under `trace_dir` (its Perfetto JSON,
    written with `create_perfetto_trace=True`, else the `*.trace.json.gz`)."""
    import gzip
    import json
    import pathlib

    files = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
    files = files or sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no profiler trace under {trace_dir}")
    with gzip.open(max(files, key=lambda p: p.stat().st_mtime)) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _names(events: list[dict]) -> tuple[dict, dict]:
    """({pid: process name}, {(pid, tid): thread name}) from a trace's metadata events."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    return processes, threads


def device_activity(events: list[dict], platform: str) -> tuple[list, list]:
    """(kernels, copies): (name, start_us, duration_us) of the device's work in a trace.

    GPU: the complete events of the device's stream lines (`/device:GPU:N`, "Stream #..."),
    copies and memsets apart; without stream lines, every line of the device but those the
    profiler derives (XLA Ops, XLA Modules...). CPU: the operations XLA's runtime threads
    (`tf_XLA...`) execute, its thunk executor's own markers left out.
    """
    processes, threads = _names(events)
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if platform == "cpu":

        def keep(e):
            return (threads.get((e.get("pid"), e.get("tid")), "").startswith("tf_XLA")
                    and not str(e.get("name", "")).startswith(_NOT_KERNELS))  # fmt: skip

        picked = [e for e in complete if keep(e)]
    else:
        device = {pid for pid, name in processes.items() if name.startswith("/device:GPU")}
        on_device = [e for e in complete if e.get("pid") in device]
        line = lambda e: threads.get((e.get("pid"), e.get("tid")), "")  # noqa: E731
        streams = [e for e in on_device if line(e).startswith("Stream")]
        picked = streams or [e for e in on_device if not line(e).startswith(_DERIVED_LINES)]
    kernels, copies = [], []
    for e in picked:
        item = (str(e.get("name", "")), float(e["ts"]), float(e["dur"]))
        (copies if item[0].startswith(COPY_PREFIXES) else kernels).append(item)
    return sorted(kernels, key=lambda k: k[1]), sorted(copies, key=lambda k: k[1])


def _union_us(intervals) -> float:
    """Length of the union of (start, duration) intervals."""
    total, end = 0.0, -float("inf")
    for start, dur in sorted(intervals):
        stop = start + dur
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def call_breakdown(kernels: list, call: tuple[float, float]) -> dict:
    """Where one call's wall time went, from its kernels (name, start_us, duration_us) and its
    host window (start_us, duration_us): kernels, kernel time, busy time (the union of the
    kernels), idle time between the first kernel's start and the last one's end, and the time
    before the first kernel (launch, upload) and after the last (download, return)."""
    c0, c_dur = call
    mine = [k for k in kernels if c0 <= k[1] <= c0 + c_dur]
    if not mine:
        return {"kernels": 0, "call_us": c_dur, "kernel_us": 0.0, "busy_us": 0.0,
                "idle_us": 0.0, "span_us": 0.0, "before_us": c_dur, "after_us": 0.0}  # fmt: skip
    first = min(k[1] for k in mine)
    last = max(k[1] + k[2] for k in mine)
    busy = _union_us([(k[1], k[2]) for k in mine])
    return {
        "kernels": len(mine),
        "call_us": c_dur,
        "kernel_us": sum(k[2] for k in mine),
        "busy_us": busy,
        "span_us": last - first,
        "idle_us": (last - first) - busy,
        "before_us": first - c0,
        "after_us": max(c0 + c_dur - last, 0.0),
    }


def split_at_gaps(kernels: list, n: int) -> list[list]:
    """Sorted kernels (name, start_us, duration_us) cut into `n` runs at the n - 1 largest gaps
    between one kernel's end and the next one's start."""
    if n <= 1 or len(kernels) <= 1:
        return [list(kernels)]
    gaps = [kernels[i + 1][1] - (kernels[i][1] + kernels[i][2]) for i in range(len(kernels) - 1)]
    cuts = sorted(np.argsort(gaps, kind="stable")[::-1][: n - 1] + 1)
    return [list(kernels[a:b]) for a, b in zip([0, *cuts], [*cuts, len(kernels)], strict=True)]


def top_kernels(kernels_per_call: list[list], top: int = 15) -> list[dict]:
    """The `top` slowest kernels of a call, with their share of the call's kernel time.

    When every call ran the same kernels in the same order, a kernel is one launch (its
    median duration over the calls); otherwise launches of one name are pooled per call.
    """
    calls = [c for c in kernels_per_call if c]
    if not calls:
        return []
    names = [tuple(k[0] for k in c) for c in calls]
    if all(n == names[0] for n in names):
        per_launch = np.median(np.array([[k[2] for k in c] for c in calls]), axis=0)
        items = [(name, float(us), 1) for name, us in zip(names[0], per_launch, strict=True)]
    else:
        pooled: dict[str, list] = {}
        for c in calls:
            for name, _, dur in c:
                pooled.setdefault(name, [0.0, 0])
                pooled[name][0] += dur
                pooled[name][1] += 1
        items = [(n, t / len(calls), cnt / len(calls)) for n, (t, cnt) in pooled.items()]
    total = sum(us for _, us, _ in items)
    items.sort(key=lambda item: -item[1])
    return [{"name": name, "us": us, "launches": launches, "share": us / total if total else 0.0}
            for name, us, launches in items[:top]]  # fmt: skip


def trace_summary(events: list[dict], platform: str, *, window: str = "engine_call",
                  top: int = 15) -> dict:  # fmt: skip
    """The profile of the calls a trace annotated with `window` (host TraceAnnotations): per
    call, the median of `call_breakdown`'s figures; the `top` slowest kernels with their
    share (`top_kernels`) and the share of those together; copies apart. With no kernels
    found, the trace's lines are listed (`lines`) so the parser can be fixed."""
    kernels, copies = device_activity(events, platform)
    calls = sorted((float(e["ts"]), float(e["dur"])) for e in events
                   if e.get("ph") == "X" and e.get("name") == window and "dur" in e)  # fmt: skip
    aligned = any(c[0] <= k[1] <= c[0] + c[1] for c in calls for k in kernels)
    if kernels and calls and not aligned:
        # The device's clock not mapped onto the host's: the calls are the kernels between
        # the largest gaps, each call's window its own kernels' span.
        groups = split_at_gaps(kernels, len(calls))
        calls = [(g[0][1], max(k[1] + k[2] for k in g) - g[0][1]) for g in groups]
    rows = [call_breakdown(kernels, c) for c in calls]
    per_call = [[k for k in kernels if c[0] <= k[1] <= c[0] + c[1]] for c in calls]
    ranked = top_kernels(per_call, top)
    summary = {"platform": platform, "calls": len(calls), "clocks_aligned": aligned}
    for key in ("kernels", "call_us", "kernel_us", "busy_us", "span_us", "idle_us", "before_us",
                "after_us"):  # fmt: skip
        summary[key] = float(np.median([r[key] for r in rows])) if rows else None
    summary["copies_per_call"] = len(copies) / len(calls) if calls else None
    summary[f"top{top}_share"] = sum(k["share"] for k in ranked) if ranked else None
    summary["top"] = ranked
    if not kernels:
        processes, threads = _names(events)
        counts: dict[str, int] = {}
        for e in events:
            if e.get("ph") == "X":
                line = (f"{processes.get(e.get('pid'), e.get('pid'))} / "
                        f"{threads.get((e.get('pid'), e.get('tid')), e.get('tid'))}")  # fmt: skip
                counts[line] = counts.get(line, 0) + 1
        summary["lines"] = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:20])
    return summary


def profile_trace(engine: KeypointEngine, frames: np.ndarray, trace_dir, *, calls: int = 20,
                  top: int = 15) -> dict:  # fmt: skip
    """`trace_summary` of `calls` end-to-end calls of a compiled, warm engine (host uint8 in,
    host keypoints out), each in its own host annotation, under `jax.profiler`."""
    for _ in range(3):
        engine.fetch(engine.dispatch(frames))
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    try:
        for _ in range(calls):
            with jax.profiler.TraceAnnotation("engine_call"):
                engine.fetch(engine.dispatch(frames))
    finally:
        jax.profiler.stop_trace()
    summary = trace_summary(load_trace(trace_dir), engine.device.platform, top=top)
    summary["kernel_census"] = kernel_census(engine.compiled(*frames.shape[1:]))
    return summary
