"""Latency and throughput of the keypoint engine per backend, beside the peers it must match.

The contenders (`contenders.py`): our backends `xla`, `onnxruntime`, `openvino` and the int8
graphs `onnxruntime_int8`, `openvino_int8`; torch's own ONNX export on onnxruntime and on
OpenVINO (the peers) and eager PyTorch. Every contender of one (backbone, dtype, batch) runs in
alternation with the others, so the ratios are of paired runs under the same machine load;
with `background_load` a competing job keeps one core busy while they are timed.

Every timing is a warm-up followed by timed runs whose results are on the host, so
asynchronous dispatch never hides work. Percentiles are over runs.
"""

from __future__ import annotations

import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_core.fileio import write_json_atomic
from cardiac_core.timing import cpu_model, time_interleaved
from cardiac_core.xla import compile_lowered, kernel_census, model_flops
from experiments.benchmarks.contenders import (
    BACKENDS,
    LOAD_WORKLOAD,
    PEERS,
    background_load,
    export_peers,
    make_backend,
    runtime_of,
    torch_baseline,
)
from experiments.benchmarks.timing import (
    device_description,
    peak_matmul,
    percentiles_ms,
    time_runs,
)
from tavr_jax.infer import onnx_export, onnx_runtime, openvino_runtime, winograd_measure
from tavr_jax.infer.engine import KeypointEngine, keypoint_forward
from tavr_jax.reporting import Gate
from tavr_jax.schema import get_schema

PAPER_MS_PER_FRAME = 18.0  # the paper's GPU figure (section 5)


def flops_per_batch(engine: KeypointEngine, frame_size: int) -> float | None:
    """FLOPs of one batch of the network (its convolutions and products, on any backend)."""
    spec = jax.ShapeDtypeStruct((engine.batch_size, frame_size, frame_size), jnp.uint8)
    fn = lambda v, f: keypoint_forward(engine.model, v, f, image_size=engine.image_size,  # noqa: E731
                                       dtype=engine.dtype)  # fmt: skip
    return model_flops(fn, engine.variables, spec)


def onnxruntime_peak_kernels(n: int = 2048, *, provider: str = "auto") -> dict:
    """{name: (fn, flops)}: onnxruntime's own float32 kernels at full tilt, for measuring the
    peak FLOP/s of this machine as onnxruntime reaches it: an n x n x n MatMul (2 n^3 flops)
    and a 3x3 convolution of n // 8 channels on a 64 x 64 map (the network's bread and butter)."""
    import onnx

    c = max(n // 8, 8)
    shapes = {
        "onnxruntime_matmul": ("MatMul", [n, n], np.full((n, n), 0.5), {}, 2.0 * n**3),
        "onnxruntime_conv3x3": (
            "Conv", [1, c, 64, 64], np.full((c, c, 3, 3), 0.01), {"pads": [1, 1, 1, 1]},
            2.0 * c * c * 9 * 64 * 64,
        ),
    }  # fmt: skip
    kernels = {}
    for name, (op, shape, weight, attrs, flops) in shapes.items():
        g = onnx_export.Graph()
        out = g.op(op, "x", g.const(weight), **attrs)
        tensor = onnx.helper.make_tensor_value_info
        graph = onnx.helper.make_graph(
            g.nodes, name, [tensor("x", onnx.TensorProto.FLOAT, shape)],
            [tensor(out, onnx.TensorProto.FLOAT, None)], g.initializers,
        )  # fmt: skip
        model = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", onnx_export.OPSET)]
        )
        model.ir_version = 8
        session = onnx_runtime.make_session(model, provider=provider)
        x = np.ones(shape, np.float32)
        kernels[name] = (lambda s=session, x=x: s.run(None, {"x": x})), flops
    return kernels


def peak_kernels(provider: str = "auto", n: int = 2048, **timing) -> dict:
    """The fp32 peak as each library reaches it: an n^3 matmul in XLA, onnxruntime (MLAS) and
    torch (its BLAS), and onnxruntime's 3x3 convolution, timed in alternation.
    Returns {name: (fn, flops, GFLOP/s)}."""
    fns = {"xla_matmul": peak_matmul(n)}
    try:
        fns.update(onnxruntime_peak_kernels(n, provider=provider))
    except ValueError as e:  # no onnxruntime, or not this provider
        print(f"peak: onnxruntime kernels skipped ({e})")
    try:
        import torch

        a, b = torch.ones(n, n), torch.full((n, n), 0.5)
        fns["torch_matmul"] = (lambda: torch.mm(a, b)), 2.0 * n**3
    except ImportError:
        pass
    times = time_interleaved([f for f, _ in fns.values()], **timing)
    return {
        name: (fn, flops, flops / float(np.median(t)) / 1e9)
        for (name, (fn, flops)), t in zip(fns.items(), times, strict=True)
    }


def pipelined_frames_per_s(engine, frames: np.ndarray, *, batches: int = 8, runs: int = 3) -> float:
    """Sustained frames/s of host batches through `run_batches`, where the next batch's copy
    and launch overlap the current one's compute: what a folder or a cine gets, where one
    synchronous call (`end_to_end`) pays the host-to-device copy and the compute in turn.
    The median of `runs` runs of `batches` batches (the engine is compiled and warm by then)."""

    def run():
        for _ in engine.run_batches((None, frames) for _ in range(batches)):
            pass

    times = time_runs(run, warmup=0, min_runs=runs, min_time_s=0.0, max_runs=runs)
    return batches * len(frames) / float(np.median(times))


def bench_cell(engines: dict, frame_size: int, *, peak=None, peers=None, flops=None,
               load: bool = False, peer_info=None, **timing) -> list[dict]:  # fmt: skip
    """One row per backend for engines of one network and batch size.

    engines: {backend: engine}; peak: (fn, flops) of the peak-FLOP/s kernel, timed in
    alternation with each backend's model-only run; peers: {name: fn(frames)} timed in
    alternation with every backend's end-to-end run; load: a competing job keeps one core
    busy while they are timed (`contenders.background_load`), not while sessions are made;
    peer_info: {"torch:MODE": info} of the torch peers (`torch_peers.make_peer`'s info, or
    an error), kept in each row's `torch_peers`.
    """
    peers = peers or {}
    b = next(iter(engines.values())).batch_size
    frames = np.random.default_rng(0).integers(0, 256, (b, frame_size, frame_size), np.uint8)
    model_only, end_to_end, ops = {}, {}, None
    for backend, engine in engines.items():
        gate = Gate.from_meta(engine.meta, engine.schema)
        if backend == "xla":
            exe = engine.compiled(frame_size, frame_size)
            ops = sum(kernel_census(exe).values())
            x_dev = engine.put(frames)
            model_only[backend] = lambda exe=exe, e=engine, x=x_dev: jax.device_get(
                exe(e.run_variables, x)
            )
        else:
            session = engine.session(frame_size, frame_size)
            model_only[backend] = lambda s=session: s.run(None, {"frames": frames})

        def e2e(engine=engine, gate=gate):  # host uint8 frames -> host keypoints, gated
            out = engine.fetch(engine.dispatch(frames), b)
            return gate(out["visibility"], out["group"])

        end_to_end[backend] = e2e
    with background_load(load):  # the sessions are made: only the timed runs see the load
        times = time_interleaved(
            [*end_to_end.values(), *(lambda f=f: f(frames) for f in peers.values())],
            shuffle_seed=0,
            **timing,
        )
        with_peak = peak is not None and flops
        t_models = {b: time_interleaved([model_only[b], peak[0]], **timing) if with_peak
                    else (time_runs(model_only[b], **timing), None) for b in engines}  # fmt: skip
    t_e2e = dict(zip(end_to_end, times, strict=False))
    t_peer = dict(zip(peers, times[len(end_to_end) :], strict=True))
    rows = []
    for backend, engine in engines.items():
        row = {"backend": backend, "background_load": load}
        t_model, t_peak = t_models[backend]
        row["model"] = percentiles_ms(t_model)
        if with_peak:
            # Achieved / peak FLOP/s of paired runs (each pair saw about the same machine load).
            row["fraction_of_peak"] = float(np.median((flops / t_model) / (peak[1] / t_peak)))
            row["gflops_per_s"] = float(flops / np.median(t_model) / 1e9)
            row["peak_gflops_per_s"] = float(peak[1] / np.median(t_peak) / 1e9)
        row["end_to_end"] = percentiles_ms(t_e2e[backend])
        if "onnxruntime_peer" in t_peer:
            row["onnxruntime_peer"] = percentiles_ms(t_peer["onnxruntime_peer"])
            row["ratio_vs_onnxruntime"] = float(
                np.median(t_e2e[backend] / t_peer["onnxruntime_peer"])
            )
        if "openvino_peer" in t_peer:
            row["openvino_peer"] = percentiles_ms(t_peer["openvino_peer"])
            row["ratio_vs_openvino"] = float(np.median(t_e2e[backend] / t_peer["openvino_peer"]))
        if any(p in t_peer for p in PEERS):  # the faster of torch's export's runtimes
            row["best_peer"] = min((p for p in PEERS if p in t_peer),
                                   key=lambda p: np.median(t_peer[p]))  # fmt: skip
            row["ratio_vs_best_peer"] = float(np.median(t_e2e[backend] / t_peer[row["best_peer"]]))
        if "torch_eager" in t_peer:
            row["torch_eager"] = percentiles_ms(t_peer["torch_eager"])
            row["speedup_vs_torch"] = float(np.median(t_peer["torch_eager"] / t_e2e[backend]))
        if peer_info or any(p.startswith("torch:") for p in t_peer):
            row.update(torch_peer_fields(t_e2e[backend], t_peer, peer_info or {}))
        for k in ("model", "end_to_end"):
            row[k]["frames_per_s"] = b * 1e3 / row[k]["p50_ms"]
            row[k]["ms_per_frame"] = row[k]["p50_ms"] / b
        if backend == "xla":  # about one kernel launch each on a GPU (xla.kernel_census)
            row["model"]["ops"] = ops
            row["model"]["us_per_op"] = row["model"]["p50_ms"] * 1e3 / ops
        # Only where the device is not the host: on a CPU there is no copy to overlap, and
        # eight big batches per run would multiply the benchmark's time for the same figure.
        if backend == "xla" and engine.device.platform != "cpu":
            row["end_to_end"]["frames_per_s_pipelined"] = pipelined_frames_per_s(engine, frames)
        row["speedup_vs_paper_18ms"] = PAPER_MS_PER_FRAME / row["end_to_end"]["ms_per_frame"]
        row["flops_per_batch"] = flops
        if backend == "xla":
            assert engine.trace_count == 1, "the benchmark must not retrace"
        rows.append(row)
    return rows


def torch_peer_fields(ours, t_peer: dict, peer_info: dict) -> dict:
    """`torch_peers` ({mode: p50/p90/p99 ms, runs, `ratio` = ours over the peer's, the
    median of paired runs, and its info: compile_s, backend... or an error}), `best_torch_peer`
    and `ratio_vs_best_torch_peer` of one row; `ours`: its end-to-end times."""
    peers = {}
    for name, info in peer_info.items():
        peers[name.split(":", 1)[1]] = dict(info)
    timed = {name: t for name, t in t_peer.items() if name.startswith("torch:")}
    for name, t in timed.items():
        entry = peers.setdefault(name.split(":", 1)[1], {})
        entry.update(percentiles_ms(t))
        entry["ratio"] = float(np.median(ours / t))
    fields = {"torch_peers": peers}
    if timed:
        best = min(timed, key=lambda name: float(np.median(timed[name])))
        fields["best_torch_peer"] = best.split(":", 1)[1]
        fields["ratio_vs_best_torch_peer"] = float(np.median(ours / timed[best]))
    return fields


def torch_cell_peers(modes, backbone: str, schema, image_size: int, *, batch: int,
                     frame_size: int, dtype: str, backend=None, budget_s=None,
                     spent: dict | None = None, progress=print) -> tuple[dict, dict]:  # fmt: skip
    """({"torch:MODE": run(frames)}, {"torch:MODE": info or error}) of one cell.

    A compiled mode whose compilations in this run (`spent`, seconds per mode, updated here)
    reach `budget_s` is not compiled again: its later cells say so. A peer that fails to
    build is an error in its info, never an exception.
    """
    from experiments.benchmarks import torch_peers

    spent = {} if spent is None else spent
    fns, info = {}, {}
    try:
        torch_peers.new_cell()
    except Exception as e:  # no torch at all
        why = f"{type(e).__name__}: {e}"
        return {}, {torch_peers.peer_name(m): {"mode": m, "error": why} for m in modes}
    for mode in modes:
        name = torch_peers.peer_name(mode)
        if mode != "eager" and budget_s is not None and spent.get(mode, 0.0) >= budget_s:
            info[name] = {"mode": mode, "error": f"compile budget of {budget_s:.0f} s spent"}
            continue
        t0 = time.perf_counter()
        try:
            fns[name], info[name] = torch_peers.make_peer(
                backbone, schema, image_size, batch=batch, frame_size=frame_size, dtype=dtype,
                mode=mode, backend=backend,
            )  # fmt: skip
        except Exception as e:  # compilers fail in many ways; the peer is a row, not a crash
            first = str(e).splitlines()[0] if str(e) else ""
            info[name] = {"mode": mode, "error": f"{type(e).__name__}: {first}"[:300]}
            progress(f"torch {mode} b={batch} {dtype}: {info[name]['error']}")
        spent[mode] = spent.get(mode, 0.0) + time.perf_counter() - t0
    return fns, info


def profile_split(engine: KeypointEngine, frame_size: int, **timing) -> dict:
    """Where the time goes: resize+normalise, backbone, head, each compiled alone and timed."""
    from cardiac_core.backbones import BACKBONES
    from tavr_jax.models.heads import HEADS
    from tavr_jax.models.keypoint_net import normalize_images

    b, (sh, sw) = engine.batch_size, engine.image_size
    meta, dtype, v = engine.meta, engine.dtype, engine.variables
    backbone = BACKBONES[meta["backbone"]](dtype=dtype)
    options = {"dense_visibility": True} if meta.get("dense_visibility") else {}
    head = HEADS[meta.get("head", "regression")](
        engine.schema, grouped=meta.get("grouped", True), dtype=dtype, **options
    )
    bvars = {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}
    hvars = {"params": v["params"]["head"]}

    def prep(frames):
        x = frames.astype(jnp.float32)
        if (frame_size, frame_size) != (sh, sw):
            x = jax.image.resize(x, (b, sh, sw), "linear", antialias=True)
        return normalize_images(x, dtype)

    frames = jax.device_put(np.zeros((b, frame_size, frame_size), np.uint8))
    parts = {
        "resize_normalise": (jax.jit(prep), (frames,)),
    }
    x = parts["resize_normalise"][0](frames)
    parts["backbone"] = (jax.jit(lambda x: backbone.apply(bvars, x, train=False)), (x,))
    feats = parts["backbone"][0](x)
    parts["head"] = (jax.jit(lambda f: head.apply(hvars, f, train=False)), (feats,))
    out = {}
    for name, (fn, args) in parts.items():
        exe = compile_lowered(fn.lower(*args), engine.device.platform)
        t = time_runs(lambda exe=exe, args=args: jax.block_until_ready(exe(*args)), **timing)
        out[name] = {
            "p50_ms": float(np.median(t) * 1e3),
            "gflops": model_flops(fn, *args) / 1e9,
            "ops": sum(kernel_census(exe).values()),
        }
    whole = jax.jit(
        lambda f: keypoint_forward(engine.model, v, f, image_size=engine.image_size, dtype=dtype)
    )
    exe = compile_lowered(whole.lower(frames), engine.device.platform)
    t = time_runs(lambda: jax.block_until_ready(exe(frames)), **timing)
    out["whole"] = {"p50_ms": float(np.median(t) * 1e3), "ops": sum(kernel_census(exe).values())}
    return out


def run_benchmark(
    *,
    backbones,
    image_size: int,
    batch_sizes,
    dtypes,
    frame_size: int | None = None,
    workdir=None,
    torch_eager: bool = True,
    profile: bool = True,
    timing: dict | None = None,
    torch_threads: int | None = None,
    backends=("xla",),
    onnxruntime_peer: bool = False,
    openvino_peer: bool = False,
    provider: str = "auto",
    winograd: str = "fixed",
    load: bool = False,
    out=None,
    peak_size: int = 2048,
    progress=print,
    torch_modes=(),
    torch_backend: str | None = None,
    torch_compile_budget_s: float | None = None,
) -> dict:
    """The full table: one row per (backbone, dtype, batch, backend); see docs/latency.md.

    winograd: the float graphs' Winograd rule, as the export's --winograd: "measure" (each
    layer shape timed once per runtime and run, `winograd_measure.MeasuredRule`; recorded in
    `winograd`; bench_latency's default), "fixed" or "off"; load: time every cell under a
    competing job (`contenders.background_load`); torch_modes: torch peers of every cell
    (`torch_peers.MODES`, on the device jax runs on, every dtype and batch; each row's
    `torch_peers`), `torch_backend` for their compiled modes (default Inductor; "eager" tests
    the path cheaply), `torch_compile_budget_s` the compile seconds per mode and run after
    which that mode is no longer compiled. With `out`, the results JSON is rewritten
    after every row, so a run stopped by a time limit keeps what it measured. A backend or peer
    that cannot run here (no onnxruntime, no openvino or nncf, no GPU provider, no torch) is
    skipped with its reason printed and kept in `skipped`.
    """
    timing = timing or {}
    frame_size = frame_size or image_size
    schema = get_schema("paper11")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    on_cpu = jax.devices()[0].platform == "cpu"
    result = {
        "device": device_description(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "torch": _version("torch") if torch_eager else None,
        "onnxruntime": _version("onnxruntime"),
        "openvino": _version("openvino"),
        "cpu": cpu_model(),
        "background_load": LOAD_WORKLOAD if load else None,
        "winograd": {},
        "threads": {
            "cpu_count": os.cpu_count(),
            "torch": torch_threads or os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },  # fmt: skip
        "rows": [],
        "profile": {},
        "skipped": [],
        "torch_modes": list(torch_modes),
        "torch_backend": torch_backend,
    }
    if torch_modes and result["torch"] is None:
        result["torch"] = _version("torch")

    def skip(what, why):
        progress(f"skipping {what}: {why}")
        result["skipped"].append({"what": what, "why": why})

    backends = list(backends)
    on_ort = [b for b in backends if b.startswith("onnxruntime")]
    if on_ort or onnxruntime_peer:
        why = _onnxruntime_problem(provider, on_cpu)
        if why:
            for backend in on_ort:
                backends.remove(backend)
                skip(f"backend {backend}", why)
            if onnxruntime_peer:
                onnxruntime_peer = False
                skip("onnxruntime peer", why)
    on_ov = [b for b in backends if runtime_of(b) == "openvino"]
    why = _openvino_problem() if on_ov or openvino_peer else None
    if why:
        backends = [b for b in backends if b not in on_ov]
        openvino_peer = skip("openvino backends and peer", why) or False
    if "openvino_int8" in backends and _version("nncf") is None:
        backends.remove("openvino_int8")
        skip("backend openvino_int8", openvino_runtime.NNCF_MISSING)
    # One rule per runtime for the run: each layer shape is measured once, on batch 1, as for
    # an export with a free batch size.
    rules = {rt: winograd_measure.rule_for(winograd, rt) for rt in winograd_measure.RUNTIMES}
    peak = None
    if on_cpu:
        kernels = peak_kernels(provider, peak_size, **timing)
        name = max(kernels, key=lambda k: kernels[k][2])
        peak = kernels[name][:2]
        result["peak"] = {k: {"gflops_per_s": v[2]} for k, v in kernels.items()}
        result["peak_method"] = (
            f"{name} (the fastest of the float32 kernels in `peak`) timed in alternation "
            "with each backend's model-only run; fraction = median over paired runs of "
            "achieved/peak FLOP/s"
        )
    for backbone in backbones:
        # Weights once per backbone: every batch size and dtype runs the same network.
        if workdir:
            base = KeypointEngine.from_workdir(workdir, backbone=backbone)
        else:
            base = KeypointEngine.random_init(schema, backbone, image_size)
        runtimes = [p for p, on in zip(PEERS, (onnxruntime_peer, openvino_peer), strict=True) if on]
        peers, why = (export_peers(backbone, schema, image_size, frame_size, provider, runtimes)
                      if runtimes else ({}, None))  # fmt: skip
        if why:
            skip(f"torch export peers for {backbone}", why)
        torch_spent: dict[str, float] = {}  # compile seconds per torch mode in this run
        torch_fn = None
        if torch_eager:
            torch_fn, why = torch_baseline(backbone, schema, image_size, torch_threads)
            if why:
                skip(f"eager torch for {backbone}", why)
        for dtype in dtypes:
            for b in batch_sizes:
                xla = KeypointEngine(
                    base.model, base.variables, base.meta, batch_size=b, dtype=dtype
                )
                engines = {}
                for backend in backends:
                    if backend != "xla" and dtype != "float32":
                        continue  # the ONNX graph is float32
                    rule = rules.get(runtime_of(backend), False)  # xla: no ONNX graph
                    engines[backend] = make_backend(backend, xla, provider, winograd=rule)
                if not engines:
                    continue
                cell_peers = dict(peers) if dtype == "float32" else {}
                if torch_fn is not None and dtype == "float32" and b <= 8:
                    cell_peers["torch_eager"] = torch_fn
                peer_info = None
                if torch_modes:
                    fns, peer_info = torch_cell_peers(
                        torch_modes, backbone, schema, image_size, batch=b,
                        frame_size=frame_size, dtype=dtype, backend=torch_backend,
                        budget_s=torch_compile_budget_s, spent=torch_spent, progress=progress,
                    )  # fmt: skip
                    cell_peers.update(fns)
                flops = flops_per_batch(xla, frame_size)
                rows = bench_cell(
                    engines, frame_size, peak=peak if dtype == "float32" else None,
                    peers=cell_peers, flops=flops, load=load, peer_info=peer_info, **timing,
                )  # fmt: skip
                result["winograd"] = {rt: rule.metadata() for rt, rule in rules.items()
                                      if hasattr(rule, "metadata") and rule.layers}  # fmt: skip
                for row in rows:
                    row = {"backbone": backbone, "dtype": dtype, "batch": b, "cpu": result["cpu"],
                           "image_size": image_size, "frame_size": frame_size, **row}  # fmt: skip
                    result["rows"].append(row)
                    progress(format_row(row))
                    if out:
                        write_json_atomic(out, result)
                if profile and "xla" in engines and dtype == "float32" and b == max(batch_sizes):
                    result["profile"][f"{backbone}/b{b}"] = profile_split(xla, frame_size, **timing)
    if out:
        write_json_atomic(out, result)
    return result


def _onnxruntime_problem(provider: str, on_cpu: bool) -> str | None:
    """Why onnxruntime cannot be compared here (None when it can)."""
    try:
        chosen = onnx_runtime.select_providers(provider)[0]
    except ValueError as e:
        return str(e)
    if not on_cpu and chosen == "CPUExecutionProvider":
        return "jax runs on a GPU but this onnxruntime has only the CPU provider (onnxruntime-gpu)"
    return None


def _openvino_problem() -> str | None:
    """Why OpenVINO cannot be compared here (missing, too old; None when it can)."""
    try:
        openvino_runtime.version()
    except ValueError as e:
        return str(e)
    return None


def _version(module: str):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def format_row(r: dict) -> str:
    m, e = r["model"], r["end_to_end"]
    ops = f" ({m['ops']} ops, {m['us_per_op']:.1f} us/op)" if "ops" in m else ""
    s = (
        f"{r['backbone']:>9} {r['dtype']:>8} {r.get('backend', 'xla'):>11} b={r['batch']:<3} "
        f"model p50 {m['p50_ms']:8.2f} ms{ops} e2e p50/p90/p99 "
        f"{e['p50_ms']:.2f}/{e['p90_ms']:.2f}/{e['p99_ms']:.2f} ms "
        f"{e['frames_per_s']:7.1f} frames/s"
    )
    if "frames_per_s_pipelined" in e:  # absent in results written before it was measured
        s += f" ({e['frames_per_s_pipelined']:.1f} pipelined)"
    if "fraction_of_peak" in r:
        s += f" {100 * r['fraction_of_peak']:.0f}% of peak"
    if r.get("onnxruntime_peer"):
        peer, ratio = r["onnxruntime_peer"]["p50_ms"], r["ratio_vs_onnxruntime"]
        s += f" ORT {peer:.1f} ms (ours/ORT {ratio:.3f})"
    if r.get("torch_eager"):
        s += f" torch {r['torch_eager']['p50_ms']:.1f} ms (x{r['speedup_vs_torch']:.2f})"
    if r.get("best_torch_peer"):
        s += f" ours/best torch ({r['best_torch_peer']}) {r['ratio_vs_best_torch_peer']:.3f}"
    return s


def bench_stream(engine: KeypointEngine, path, *, max_frames: int = 300, track="kalman") -> dict:
    """Sustained frames/s of decode -> infer -> gate -> track on a file, with and without
    the prefetch thread (double buffering)."""
    from tavr_jax.infer import streams
    from tavr_jax.infer.tracking import PointTracker

    source = streams.open_source(path)
    gate = Gate.from_meta(engine.meta, engine.schema)

    def frames():
        for f in source:
            if f.index >= max_frames:
                return
            yield f

    def consume(batches):
        tracker = PointTracker(engine.schema, gate, method=track, fps=source.fps)
        n = 0
        for fr, out in engine.run_batches(batches):
            for j, f in enumerate(fr):
                tracker.update(out["visibility"][j], out["group"][j], out["coords"][j], f.time_s)
            n += len(fr)
        return n

    def sequential():
        for batch in streams.batch_frames(frames(), engine.batch_size):
            yield batch, np.stack([f.image for f in batch])

    consume(sequential())  # warm-up: compiles for this frame size
    result = {"file": str(path), "kind": source.kind, "batch": engine.batch_size}
    for name, make in (
        ("sequential", sequential),
        ("prefetch", lambda: streams.prefetch_to_device(
            frames(), batch_size=engine.batch_size, device=engine.device)),
    ):  # fmt: skip
        t0 = time.perf_counter()
        n = consume(make())
        result[f"{name}_frames_per_s"] = n / (time.perf_counter() - t0)
        result["frames"] = n
    return result


def plot_latency(results, path) -> None:
    """Latency per frame and frames/s vs batch, one line per (backbone, dtype, size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cardiac_core.fileio import atomic_write_bytes

    results = results if isinstance(results, list | tuple) else [results]
    lines: dict[tuple, list] = {}
    for res in results:
        for r in res["rows"]:
            key = (r["backbone"], r.get("backend", "xla"), r["dtype"], r["image_size"])
            lines.setdefault(key, []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (bb, backend, dt, size), rows in sorted(lines.items()):
        rows = sorted(rows, key=lambda r: r["batch"])
        b = [r["batch"] for r in rows]
        label = f"{bb} {backend} {dt} {size}px"
        line = ax1.plot(b, [r["end_to_end"]["ms_per_frame"] for r in rows], "o-", label=label)[0]
        ax2.plot(b, [r["end_to_end"]["frames_per_s"] for r in rows], "o-", color=line.get_color())
        t = [(r["batch"], r["torch_eager"]["p50_ms"] / r["batch"]) for r in rows
             if r.get("torch_eager")]  # fmt: skip
        if t:
            ax1.plot(*zip(*t, strict=True), "x--", color=line.get_color(), label=f"{label} torch")
    ax1.axhline(PAPER_MS_PER_FRAME, color="k", ls=":", label="paper, 18 ms/frame (GPU)")
    for ax, ylabel in ((ax1, "end-to-end ms per frame (p50)"), (ax2, "frames/s (end to end)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(results[0]["device"], fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def markdown_table(result: dict) -> str:
    """The rows of one benchmark result as a Markdown table (the one in docs/latency.md)."""
    lines = [
        "| backbone | backend | dtype | input | batch | model p50 ms "
        "| end-to-end p50 / p90 / p99 ms | frames/s | % of fp32 peak "
        "| ORT (torch export) p50 ms | ours / ORT | eager torch p50 ms | ours / torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m, e = r["model"], r["end_to_end"]
        frac = f"{100 * r['fraction_of_peak']:.0f}%" if "fraction_of_peak" in r else "-"
        peer = r.get("onnxruntime_peer")
        torch = r.get("torch_eager")
        lines.append(
            f"| {r['backbone']} | {r.get('backend', 'xla')} | {r['dtype']} | {r['image_size']} "
            f"| {r['batch']} | {m['p50_ms']:.1f} "
            f"| {e['p50_ms']:.1f} / {e['p90_ms']:.1f} / {e['p99_ms']:.1f} "
            f"| {e['frames_per_s']:.1f} | {frac} "
            + (f"| {peer['p50_ms']:.1f} | {r['ratio_vs_onnxruntime']:.3f} " if peer else "| - | - ")
            + (
                f"| {torch['p50_ms']:.1f} | {1 / r['speedup_vs_torch']:.3f} |"
                if torch
                else "| - | - |"
            )
        )
    return "\n".join(lines)
