"""Latency and throughput of the compiled engine, a CPU profile, and an eager PyTorch baseline.

Every timing is a warm-up followed by timed runs whose results are fetched to the host
(`jax.device_get`), so asynchronous dispatch never hides work. Percentiles are over runs.
"""

from __future__ import annotations

import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import (
    device_description,
    peak_matmul,
    percentiles_ms,
    time_interleaved,
    time_runs,
)
from tavr_jax.infer.engine import KeypointEngine, keypoint_forward
from tavr_jax.infer.postprocess import Gate
from tavr_jax.schema import get_schema
from tavr_jax.xla import compile_lowered, cost_analysis

PAPER_MS_PER_FRAME = 18.0  # the paper's GPU figure (section 5)


def _flops(engine, h, w, b) -> float | None:
    flops = engine.cost_analysis(h, w, b).get("flops")
    return float(flops) if flops else None


def bench_engine(engine: KeypointEngine, frame_size: int, *, peak_fn=None, baseline=None,
                 **timing) -> dict:  # fmt: skip
    """Model-only and end-to-end latency of one engine at its batch size.

    peak_fn: optional (fn, flops) of a peak-FLOP/s kernel timed in alternation with the model.
    baseline: optional callable(frames) (eager PyTorch) timed in alternation with end-to-end.
    """
    b = engine.batch_size
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (b, frame_size, frame_size), dtype=np.uint8)
    exe = engine.compiled(frame_size, frame_size)
    x_dev = engine.put(frames)
    gate = Gate.from_meta(engine.meta, engine.schema)

    def model_only():  # frames already on the device, outputs fetched
        return jax.device_get(exe(engine.variables, x_dev))

    def end_to_end():  # host uint8 frames -> host keypoints, gated
        out = engine.fetch(engine.dispatch(frames), b)
        return gate(out["visibility"], out["group"])

    flops = _flops(engine, frame_size, frame_size, b)
    if peak_fn is not None and flops:
        t_model, t_mm = time_interleaved([model_only, peak_fn[0]], **timing)
        row = {"model": percentiles_ms(t_model)}
        # Achieved / peak FLOP/s of paired runs (each pair saw about the same machine load).
        frac = (flops / t_model) / (peak_fn[1] / t_mm)
        row["fraction_of_peak"] = float(np.median(frac))
        row["gflops_per_s"] = float(flops / np.median(t_model) / 1e9)
        row["peak_gflops_per_s"] = float(peak_fn[1] / np.median(t_mm) / 1e9)
    else:
        row = {"model": percentiles_ms(time_runs(model_only, **timing))}
    if baseline is not None:
        t_e2e, t_base = time_interleaved([end_to_end, lambda: baseline(frames)], **timing)
        row["end_to_end"] = percentiles_ms(t_e2e)
        row["torch_eager"] = percentiles_ms(t_base)
        row["speedup_vs_torch"] = float(np.median(t_base / t_e2e))  # paired runs
    else:
        row["end_to_end"] = percentiles_ms(time_runs(end_to_end, **timing))
    for k in ("model", "end_to_end"):
        row[k]["frames_per_s"] = b * 1e3 / row[k]["p50_ms"]
        row[k]["ms_per_frame"] = row[k]["p50_ms"] / b
    row["speedup_vs_paper_18ms"] = PAPER_MS_PER_FRAME / row["end_to_end"]["ms_per_frame"]
    row["flops_per_batch"] = flops
    assert engine.trace_count == 1, "the benchmark must not retrace"
    return row


def _torch_model(backbone: str, schema, image_size: int):
    """Plain eager PyTorch network of the same architecture (random weights) and its forward."""
    import torch
    from torch import nn

    from benchmarks.torch_reference import TORCH_MODELS

    net = TORCH_MODELS[backbone](in_channels=1)
    feat = net.fc.in_features
    g, m = schema.num_groups, schema.max_group_size
    shared = nn.Sequential(nn.Linear(feat, 512), nn.LayerNorm(512), nn.ReLU())
    group_cls = nn.Linear(512, g)
    heads = nn.ModuleList(
        nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 3 * m)) for _ in range(g)
    )
    for mod in (net, shared, group_cls, heads):
        mod.eval()
    index, valid = schema.padded_index
    flat = torch.as_tensor(np.flatnonzero(valid.ravel()))

    def forward(frames_u8: np.ndarray):
        with torch.inference_mode():
            x = torch.from_numpy(frames_u8).float().unsqueeze(1)
            x = (x / 255.0 - 0.449) / 0.226
            if x.shape[-1] != image_size or x.shape[-2] != image_size:
                x = nn.functional.interpolate(
                    x, size=(image_size, image_size), mode="bilinear", antialias=True
                )
            h = shared(torch.flatten(net.avgpool(net.forward_features(x)), 1))
            out = torch.stack([hd(h) for hd in heads], 1).reshape(x.shape[0], g * m, 3)[:, flat]
            vis = torch.sigmoid(out[..., 0])
            xy = torch.sigmoid(out[..., 1:]) * torch.tensor(
                [frames_u8.shape[2], frames_u8.shape[1]]
            )
            return vis.numpy(), torch.sigmoid(group_cls(h)).numpy(), xy.numpy()

    return forward


def torch_baseline(backbone, schema, image_size, threads: int | None = None):
    """Eager PyTorch forward of the same architecture, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return _torch_model(backbone, schema, image_size)


def profile_split(engine: KeypointEngine, frame_size: int, **timing) -> dict:
    """Where the time goes: resize+normalise, backbone, head, each compiled alone and timed."""
    from tavr_jax.models.backbones import BACKBONES
    from tavr_jax.models.heads import HEADS
    from tavr_jax.models.keypoint_net import normalize_images

    b, (sh, sw) = engine.batch_size, engine.image_size
    meta, dtype, v = engine.meta, engine.dtype, engine.variables
    backbone = BACKBONES[meta["backbone"]](dtype=dtype)
    head = HEADS[meta.get("head", "regression")](
        engine.schema, grouped=meta.get("grouped", True), dtype=dtype
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
        cost = cost_analysis(exe)
        t = time_runs(lambda exe=exe, args=args: jax.block_until_ready(exe(*args)), **timing)
        out[name] = {"p50_ms": float(np.median(t) * 1e3), "gflops": cost.get("flops", 0) / 1e9}
    whole = jax.jit(
        lambda f: keypoint_forward(engine.model, v, f, image_size=engine.image_size, dtype=dtype)
    )
    exe = compile_lowered(whole.lower(frames), engine.device.platform)
    t = time_runs(lambda: jax.block_until_ready(exe(frames)), **timing)
    out["whole"] = {"p50_ms": float(np.median(t) * 1e3)}
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
    progress=print,
) -> dict:
    """The full table: one row per (backbone, dtype, batch); see docs/latency.md."""
    timing = timing or {}
    frame_size = frame_size or image_size
    schema = get_schema("paper11")
    peak_fn = peak_matmul() if jax.devices()[0].platform == "cpu" else None
    rows, profiles = [], {}
    for backbone in backbones:
        torch_fn = (
            torch_baseline(backbone, schema, image_size, torch_threads) if torch_eager else None
        )
        for dtype in dtypes:
            for b in batch_sizes:
                if workdir:
                    engine = KeypointEngine.from_workdir(
                        workdir, backbone=backbone, batch_size=b, dtype=dtype
                    )
                else:
                    engine = KeypointEngine.random_init(
                        schema, backbone, image_size, batch_size=b, dtype=dtype
                    )
                row = {"backbone": backbone, "dtype": dtype, "batch": b,
                       "image_size": image_size, "frame_size": frame_size}  # fmt: skip
                use_torch = torch_fn is not None and dtype == "float32" and b <= 8
                row.update(
                    bench_engine(
                        engine, frame_size, peak_fn=peak_fn if dtype == "float32" else None,
                        baseline=torch_fn if use_torch else None, **timing,
                    )
                )  # fmt: skip
                if profile and dtype == "float32" and b == max(batch_sizes):
                    profiles[f"{backbone}/b{b}"] = profile_split(engine, frame_size, **timing)
                rows.append(row)
                progress(format_row(row))
    return {
        "device": device_description(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "peak_method": "jitted 2048x2048x2048 float32 matmul (2n^3 flops) timed in alternation "
        "with the model; fraction = median over paired runs of achieved/peak FLOP/s",
        "torch": _torch_version() if torch_eager else None,
        "threads": {
            "cpu_count": os.cpu_count(),
            "torch": torch_threads or os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },  # fmt: skip
        "rows": rows,
        "profile": profiles,
    }


def _torch_version():
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def format_row(r: dict) -> str:
    m, e = r["model"], r["end_to_end"]
    s = (
        f"{r['backbone']:>9} {r['dtype']:>8} b={r['batch']:<3} model p50 {m['p50_ms']:8.2f} ms "
        f"e2e p50/p90/p99 {e['p50_ms']:.2f}/{e['p90_ms']:.2f}/{e['p99_ms']:.2f} ms "
        f"{e['frames_per_s']:7.1f} frames/s"
    )
    if "fraction_of_peak" in r:
        s += f" {100 * r['fraction_of_peak']:.0f}% of peak"
    if r.get("torch_eager"):
        s += f" torch {r['torch_eager']['p50_ms']:.1f} ms (x{r['speedup_vs_torch']:.2f})"
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

    from tavr_jax.fileio import atomic_write_bytes

    results = results if isinstance(results, list | tuple) else [results]
    lines: dict[tuple, list] = {}
    for res in results:
        for r in res["rows"]:
            lines.setdefault((r["backbone"], r["dtype"], r["image_size"]), []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (bb, dt, size), rows in sorted(lines.items()):
        rows = sorted(rows, key=lambda r: r["batch"])
        b = [r["batch"] for r in rows]
        label = f"{bb} {dt} {size}px"
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
    head = (
        "| backbone | dtype | input | batch | model p50 ms | end-to-end p50 / p90 / p99 ms "
        "| frames/s | ms/frame | vs paper 18 ms | % of peak FLOP/s | eager torch p50 ms "
        "| torch / ours |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in result["rows"]:
        m, e, t = r["model"], r["end_to_end"], r.get("torch_eager")
        frac = f"{100 * r['fraction_of_peak']:.0f}%" if "fraction_of_peak" in r else "-"
        lines.append(
            f"| {r['backbone']} | {r['dtype']} | {r['image_size']} | {r['batch']} "
            f"| {m['p50_ms']:.1f} | {e['p50_ms']:.1f} / {e['p90_ms']:.1f} / {e['p99_ms']:.1f} "
            f"| {e['frames_per_s']:.1f} | {e['ms_per_frame']:.1f} "
            f"| x{r['speedup_vs_paper_18ms']:.3f} | {frac} "
            f"| {t['p50_ms']:.1f} | x{r['speedup_vs_torch']:.2f} |"
            if t
            else f"| {r['backbone']} | {r['dtype']} | {r['image_size']} | {r['batch']} "
            f"| {m['p50_ms']:.1f} | {e['p50_ms']:.1f} / {e['p90_ms']:.1f} / {e['p99_ms']:.1f} "
            f"| {e['frames_per_s']:.1f} | {e['ms_per_frame']:.1f} "
            f"| x{r['speedup_vs_paper_18ms']:.3f} | {frac} | - | - |"
        )
    return "\n".join(lines)
