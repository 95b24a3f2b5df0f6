"""The GPU campaign: train, evaluate and benchmark everything in one device call (docs/gpu/).

Stages, in order of value, each a few launcher runs under its own time limit:
  a. preflight: install the carried wheels, record versions and the device, import every entry
     module (a failure here stops the campaign: nothing after it could run);
  b. simulate a TAVR project on every core;
  c. inference latency and throughput of the compiled engine, with the torch peers of every
     row on the same device (eager, and `torch.compile`'s max-autotune-no-cudagraphs and
     reduce-overhead modes);
  d. the engine: a profile of the batch-1 engine (kernels, the 15 slowest, idle time), its
     variants (jit against AOT, packed outputs, bf16 from the input onward, XLA flags each in
     a process of its own) and the pipelined rate at the larger batches;
  e. the input loader's own rate, then training throughput per variant (batch size, dtype,
     bf16 state, augmentation off), each rate net of the step's compilation;
  f. the paper-scale training run for the remaining budget, threshold tuning on validation
     patients and evaluation of held-out test patients; then, where the plan has one, the
     second-stage refiner trained on the run's training cases and the test patients evaluated
     again with it (the CPU smoke run; not the GPU run, where it did not pay); recall per
     point (CP first); the live replay of held-out cines;
  g. perfusion features (maps/s), then the perfusion CNN cross-validation if time is left;
  h. `campaign.json`, the machine-readable summary.
A failed or timed-out stage does not stop the next. After every stage the results so far are
collected from the work folder (partial JSON included) into the output folder, and
`campaign.json` is rewritten, so a campaign cut short still leaves its summary.

This module imports only the standard library and `cardiac_core.fileio`, so it runs before the
carried wheels are installed.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from cardiac_core.fileio import write_json_atomic

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
STAGES = (
    "preflight", "simulate", "latency", "engine", "train_throughput", "training", "perfusion",
)  # fmt: skip
SITE = "/tmp/campaign_site"  # where the carried wheels are installed
_CAMPAIGN = (
    "from experiments.benchmarks import campaign"  # child processes call this module's helpers
)

# What preflight imports: the library modules every stage runs on, and the outside packages
# they need (the GPU image lacks some; they travel as wheels, see `make gpu-wheels`).
ENTRY_MODULES = (
    "tavr_jax.training.train", "tavr_jax.infer.evaluate",
    "tavr_jax.data.pipeline", "tavr_jax.data.simulate",
    "tavr_jax.infer.engine", "perfusion.features", "perfusion.classifiers", "perfusion.cnn",
    "experiments.benchmarks.latency", "experiments.benchmarks.training",
    "experiments.benchmarks.input", "experiments.benchmarks.engine_study",
    "experiments.benchmarks.torch_peers",
)  # fmt: skip
PACKAGES = (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "opencv-python-headless",
    "scikit-learn", "xgboost", "xgboost-cpu", "grain", "tensorflow-datasets", "array-record",
    "ml-collections", "pydicom", "tensorboardX", "absl-py", "matplotlib", "tqdm", "torch",
    "onnxruntime", "protobuf",
)  # fmt: skip
LAUNCHERS = (
    "make_tavr_data", "bench_latency", "bench_train", "bench_input", "tavr_train", "tavr_eval",
    "tavr_refine", "bench_features", "make_perfusion_data", "perfusion_cv",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and time limits of one campaign (the GPU run, or the CPU smoke run)."""

    smoke: bool
    budget_s: float  # wall-clock for all stages
    limits: dict  # stage -> seconds (training: what is left, see `Campaign._training`)
    sim: dict  # make_tavr_data flags
    latency_runs: tuple  # (backbone, dtype, torch modes) of each bench_latency run, in order
    latency: dict  # bench_latency flags shared by the runs
    torch: dict  # bench_latency flags of the torch peers (torch_backend, compile budget)
    onnxruntime: bool  # also an ONNX Runtime run (on the CPU cores) when bench_latency has one
    engine: dict  # engine_study.engine_study arguments
    engine_flags: tuple  # (name, XLA_FLAGS) variants, one process each (engine_study.flag_variant)
    throughput: dict  # bench_train flags
    input: dict  # bench_input flags
    train_config: str  # --config of tavr_train
    train: dict  # --config.* overrides of the training run
    eval_batch: int
    features: tuple  # (size, batch) per bench_features run: 256 then 512
    cv: dict  # make_perfusion_data and perfusion_cv flags
    refine: dict | None  # tavr_refine flags: the second stage after the training run, or None
    live: dict | None  # bench_live flags: the trained run on a paced replay, or None
    reserve_s: dict  # seconds kept for what follows the training run
    train_min_s: float  # training time the stages before it may not eat into
    latency_env: dict = dataclasses.field(default_factory=dict)  # more environment, latency


def _config_file(spec: pathlib.Path):
    """The ConfigDict of `--config=PATH[:ARG]`, as ml_collections' config_flags loads it."""
    path, _, arg = str(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("_campaign_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def gpu_plan() -> Plan:
    """One H100/H200 with 16 CPU cores, at most 9 minutes."""
    return Plan(
        smoke=False,
        budget_s=540.0,
        # Measured on an H200 (2026-11-28): preflight 22 s, simulate 9 s, a latency run 25 s
        # (4 batches, compile included), one bench_train row ~60 s (47 s of it compiling),
        # the training stage 192 s (84 s training, 40 s of it compiling), features 12 s.
        # Campaign 2 (not yet run): the bf16 latency run with its compiled torch peers
        # (~25 s, plus each mode's first compilation, unknown: tens of seconds), the fp32 run
        # with eager torch (~30 s); the engine stage ~35 s in one process plus ~10-15 s per
        # XLA-flag process; the training variants in order of value, so a limit cuts the least
        # valuable (at 47 s of compilation a row, one or two fit; the rest are
        # `gpu_followup.sh`'s with FOLLOWUP=train_variants). The stages before training are
        # clamped to leave it its minimum (`protected_s`).
        limits=dict(
            preflight=60, simulate=40, latency=150, engine=75, train_throughput=130, perfusion=30
        ),
        sim=dict(cases=150, frames=40, size=512, seed=0, workers=0),  # 6,000 frames
        # ResNet18 ran in the first campaign (docs/gpu/README.md); its time goes to the peers.
        # The compiled torch peers beside the bf16 rows (the targets'), eager beside the fp32
        # ones: Inductor compiles each (batch, dtype) anew, tens of seconds each.
        latency_runs=(
            ("resnet34", "bfloat16", "eager,reduce-overhead,max-autotune-no-cudagraphs"),
            ("resnet34", "float32", "eager"),
        ),
        latency=dict(image_size=512, batch_sizes="1,8,32,128", min_time=0.3),
        # a compiled mode compiles until 25 s are spent in a run (batch 1 first); the cells
        # after that say so in their row
        torch=dict(torch_compile_budget_s=25),
        onnxruntime=False,  # the image's onnxruntime is the CPU build: no GPU row to be had
        engine=dict(
            backbone="resnet34",
            image_size=512,
            dtype="bfloat16",
            batch=1,
            pipelined_batches=(32, 128, 256),
            profile_calls=20,
            min_time=0.3,
        ),
        engine_flags=(
            (
                "command_buffer",
                "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,"
                "CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
            ),
            ("command_buffer_off", "--xla_gpu_enable_command_buffer="),
            ("autotune_level_0", "--xla_gpu_autotune_level=0"),
        ),
        throughput=dict(
            backbones="resnet34",
            # in order of value: the first run's row, the fp32 row it did not reach, the
            # larger batches, bf16 state, augmentation off, the largest batch
            variants="bfloat16:64,float32:64,bfloat16:128,bfloat16:64:bf16_state,"
            "bfloat16:64:noaug,bfloat16:256",
            pipeline_rows=1,  # the real input pipeline feeds the first row only
            image_size=512,
            steps=10,
            repeats=3,
        ),
        input=dict(image_size=512, batch_size=64, variants="memory,0:2", batches=20, repeats=3),
        # the paper-scale recipe (ResNet34 at 512 px) in bf16, with a test split
        train_config="experiments/configs/tavr_gpu_campaign.py",
        train={},
        eval_batch=32,  # the latency stage compiled this batch: the cache serves evaluation
        features=((256, 256), (512, 64)),
        cv=dict(n=300, model="resnet50", task="abnormal", folds=5, min_s=120),
        # No second stage: on the H200's first paper-scale run it raised the error (2.38 ->
        # 3.00 px at 512), so its minute (the refiner and a second evaluation) goes to training.
        refine=None,
        # the live loop on held-out cines at 30 frames/s: frame age at the readout, drops, depth
        live=dict(minutes=0.4, rates="30", cases=2, frames=40, size=1024),
        reserve_s=dict(startup=50, evaluation=45, refine=0, live=40, perfusion=20),
        train_min_s=60,
        # torch shares the GPU with jax in the latency runs: jax takes half, not 75%
        latency_env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"},
    )


def smoke_plan() -> Plan:
    """The same stages at tiny sizes on the CPU, for `make test` (about a minute)."""
    return Plan(
        smoke=True,
        budget_s=420.0,
        limits=dict(
            preflight=60, simulate=60, latency=90, engine=90, train_throughput=120, perfusion=60
        ),
        sim=dict(cases=4, frames=6, size=64, seed=0, workers=2),
        # the compiled modes' path with dynamo's eager backend: Inductor would compile C++ here
        latency_runs=(
            ("resnet_tiny", "float32", "eager,max-autotune-no-cudagraphs,reduce-overhead"),
        ),
        latency=dict(image_size=32, batch_sizes="1,2", min_time=0.05),
        torch=dict(torch_backend="eager", torch_compile_budget_s=60),
        onnxruntime=True,
        engine=dict(
            backbone="resnet_tiny",
            image_size=32,
            dtype="float32",
            batch=1,
            pipelined_batches=(2, 4),
            profile_calls=5,
            min_time=0.05,
        ),
        engine_flags=(("autotune_level_0", "--xla_gpu_autotune_level=0"),),
        throughput=dict(
            backbones="resnet_tiny",
            variants="float32:8,float32:8:noaug:bf16_state",
            pipeline_rows=1,
            image_size=32,
            steps=2,
            repeats=1,
        ),
        input=dict(image_size=32, batch_size=8, variants="memory", batches=2, repeats=1),
        train_config="experiments/configs/tavr.py:runlocal,noaug",
        train={
            "backbone": "resnet_tiny",
            "image_size": 32,
            "batch_size": 8,
            "num_steps": 3,
            "eval_every": 3,
            "checkpoint_every": 3,
            "log_every": 1,
            "data.val_fraction": 0.25,
            "data.test_fraction": 0.25,
        },  # fmt: skip
        eval_batch=8,
        features=((256, 2), (512, 1)),
        cv=dict(n=12, model="rf", task="abnormal", folds=2, min_s=0),
        refine=dict(steps=3, max_frames=8, batch=8),
        live=dict(minutes=0.05, rates="15", cases=1, frames=4, size=64),
        reserve_s=dict(startup=0, evaluation=60, refine=60, live=60, perfusion=0),
        train_min_s=0,
    )


# ----------------------------------------------------------------------------- the summary


def latency_rows(results: list[dict]) -> list[dict]:
    """campaign.json `latency` rows from bench_latency JSON files (end-to-end timings), with
    our time over the best torch peer's (None without peers)."""
    return [
        {**{k: r[k] for k in ("backbone", "image_size", "batch", "dtype")},
         "end_to_end_p50_ms": r["end_to_end"]["p50_ms"],
         "end_to_end_p99_ms": r["end_to_end"]["p99_ms"],
         "frames_per_s": r["end_to_end"]["frames_per_s"],
         "best_torch_peer": r.get("best_torch_peer"),
         "ratio_vs_best_torch_peer": r.get("ratio_vs_best_torch_peer")}
        for result in results
        for r in result.get("rows", [])
    ]  # fmt: skip


def peer_rows(results: list[dict], failures=()) -> list[dict]:
    """campaign.json `peer_rows`: one per latency row and torch peer, with the peer's p50 and
    `our_ratio`, our end-to-end time over the peer's (the median of paired runs; < 1: we are
    faster), its compile time (reported, never counted) or its error; and one error row per
    latency run that failed with its peers (`failures`: it ran again without them)."""
    rows = [{"backbone": f["backbone"], "batch": None, "dtype": f["dtype"],
             "peer": f"torch {f.get('modes')}", "p50_ms": None, "our_ratio": None,
             "our_p50_ms": None, "compile_s": None, "best": False, "error": f["error"]}
            for f in failures]  # fmt: skip
    for result in results:
        for r in result.get("rows", []):
            for mode, peer in (r.get("torch_peers") or {}).items():
                rows.append({
                    **{k: r[k] for k in ("backbone", "batch", "dtype")},
                    "peer": f"torch {mode}",
                    "p50_ms": peer.get("p50_ms"),
                    "our_ratio": peer.get("ratio"),
                    "our_p50_ms": r["end_to_end"]["p50_ms"],
                    "compile_s": peer.get("compile_s"),
                    "best": mode == r.get("best_torch_peer"),
                    "error": peer.get("error"),
                })  # fmt: skip
    return rows


def throughput_rows(result: dict | None) -> list[dict]:
    """campaign.json `train_throughput` rows from a bench_train JSON: one per training variant
    (batch, dtype, state dtype, augmentation), the device-resident rate and MFU, the real
    input pipeline's rate where measured, the compile time taken out of both, or its error."""
    keys = ("backbone", "image_size", "dtype", "images_per_s", "mfu")
    more = ("state_dtype", "augment", "layout", "images_per_s_pipeline", "compile_s", "error")
    return [
        {**{k: r[k] for k in keys}, "batch": r["batch_size"], **{k: r.get(k) for k in more}}
        for r in (result or {}).get("results", [])
    ]


def loader_rows(result: dict | None) -> list[dict]:
    """campaign.json `loader` rows from a bench_input JSON: the input loader's own rate."""
    return [{k: r.get(k) for k in ("source", "variant", "frames_per_s")}
            for r in (result or {}).get("rows", [])]  # fmt: skip


def profile_summary(engine: dict | None, top: int = 15) -> dict | None:
    """campaign.json `profile`: the batch-1 engine's kernels per call, the share of its `top`
    slowest kernels, idle time between kernels and the rest of the call (medians per call,
    microseconds), and the slowest kernels themselves; or the profiler's error."""
    profile = (engine or {}).get("profile")
    if not profile or "error" in profile:
        return profile
    keys = ("kernels", f"top{top}_share", "idle_us", "call_us", "kernel_us", "busy_us",
            "span_us", "before_us", "after_us", "copies_per_call", "calls",
            "clocks_aligned")  # fmt: skip
    out = {k: profile.get(k) for k in keys}
    out.update({k: engine.get(k) for k in ("backbone", "image_size", "dtype", "batch")})
    out["top"] = [{k: t[k] for k in ("name", "us", "share")} for t in profile.get("top", [])]
    return out


def engine_variant_rows(engine: dict | None, flagged: list[dict]) -> list[dict]:
    """campaign.json `engine_variants`: the engine's variants (same process, timed in
    alternation: `ratio_vs_aot` of paired runs) and its XLA-flag variants (a process each:
    the ratio of p50s to the default's), end to end at batch 1, or their errors."""
    rows = []
    aot = None
    for v in (engine or {}).get("variants", []):
        e2e = v.get("end_to_end") or {}
        if v["variant"] == "aot":
            aot = e2e.get("p50_ms")
        rows.append({"variant": v["variant"], "p50_ms": e2e.get("p50_ms"),
                     "p99_ms": e2e.get("p99_ms"), "ratio_vs_aot": v.get("ratio_vs_aot"),
                     "compile_s": v.get("compile_s"), "xla_flags": None,
                     "error": v.get("error")})  # fmt: skip
    for v in flagged:
        e2e = v.get("end_to_end") or {}
        p50 = e2e.get("p50_ms")
        rows.append({"variant": v["variant"], "p50_ms": p50, "p99_ms": e2e.get("p99_ms"),
                     "ratio_vs_aot": p50 / aot if p50 and aot else None,
                     "compile_s": v.get("compile_s"), "xla_flags": v.get("xla_flags"),
                     "error": v.get("error")})  # fmt: skip
    return rows


def pipelined_rows(engine: dict | None) -> list[dict]:
    """campaign.json `pipelined_frames_per_s`: per batch, one call at a time against the
    pipelined rate from pageable and from pinned host memory (frames/s, end to end)."""
    keys = ("batch", "one_call_frames_per_s", "pipelined_frames_per_s",
            "pipelined_pinned_frames_per_s", "error")  # fmt: skip
    return [{k: r.get(k) for k in keys} for r in (engine or {}).get("pipelined", [])]


def per_point_recall(test: dict | None, first: str = "CP") -> dict | None:
    """campaign.json `per_point_recall`: {point: recall} of the test metrics, `first` (CP, the
    point the first paper-scale run missed) first, then the schema's order."""
    per_point = (test or {}).get("per_point")
    if not per_point:
        return None
    names = sorted(per_point, key=lambda name: name != first)  # stable: the schema's order
    return {name: per_point[name].get("recall") for name in names}


def _at_1024(metrics: dict) -> float | None:
    err, width = metrics.get("mean_error_px"), metrics.get("frame_width_px")
    return err * 1024.0 / width if err is not None and width else None


def training_summary(train: dict | None, test: dict | None, config: dict | None,
                     refined: dict | None = None) -> dict:  # fmt: skip
    """campaign.json `training` from the run's final metrics, its test metrics (without and
    with the second-stage refiner) and config."""
    train, test, config, refined = train or {}, test or {}, config or {}, refined or {}
    return {
        "backbone": test.get("backbone", config.get("backbone")),
        "head": test.get("head", config.get("head")),
        "image_size": test.get("image_size", config.get("image_size")),
        "steps": train.get("step"),
        "wall_s": train.get("train_seconds"),
        "precision": test.get("precision"),
        "recall": test.get("recall"),
        "f1": test.get("f1"),
        # the paper's Table 1 reports errors on 1024-pixel-wide frames
        "mean_error_px_at_1024": _at_1024(test),
        "loc_accuracy_20px": test.get("loc_accuracy_20px"),
        "mean_error_px_at_1024_refined": _at_1024(refined),
        "loc_accuracy_20px_refined": refined.get("loc_accuracy_20px"),
    }


def maps_per_s(text: str | None) -> float | None:
    """The jnp rate printed by bench_features ("... jnp 12,345 maps/s, ...")."""
    match = re.search(r"jnp ([\d,.]+) maps/s", text or "")
    return float(match.group(1).replace(",", "")) if match else None


def live_rows(result: dict | None) -> list[dict]:
    """campaign.json `live` rows from a bench_live JSON: one per replay rate."""
    rows = []
    for rate in (result or {}).get("rates", {}).values():
        guidance = rate.get("guidance") or {}
        rows.append({
            **{k: rate.get(k) for k in ("rate_fps", "processed_fps", "dropped",
                                        "age_ready_p50_ms", "age_ready_p99_ms")},
            "frame_size": (result or {}).get("size"),
            # on frames with the annulus in view; a carried annulus is scored apart
            "depth_mae_mm": (guidance.get("seen") or {}).get("depth_mae_mm"),
            "range_agreement": (guidance.get("seen") or {}).get("range_agreement"),
            "depth_mae_mm_carried": (guidance.get("carried") or {}).get("depth_mae_mm"),
        })  # fmt: skip
    return rows


def summary(preflight, latency, throughput, training, features, live=(), *, peers=(),
            profile=None, engine_variants=(), pipelined=(), loader=(),
            recall_per_point=None) -> dict:  # fmt: skip
    """campaign.json: exactly the fields of the campaign's contract (docs/gpu/README.md)."""
    preflight = preflight or {}
    return {
        "device": preflight.get("device"),
        "jax": preflight.get("versions", {}).get("jax"),
        "date": datetime.date.today().isoformat(),
        "latency": latency,
        "peer_rows": list(peers),
        "profile": profile,
        "engine_variants": list(engine_variants),
        "pipelined_frames_per_s": list(pipelined),
        "train_throughput": throughput,
        "loader": list(loader),
        "training": training,
        "per_point_recall": recall_per_point,
        "features": features,
        "live": list(live),
    }


def parse_final_json(text: str) -> dict | None:
    """The last top-level JSON object a launcher printed (tavr_train prints its metrics)."""
    starts = [m.start() for m in re.finditer(r"^\{", text, flags=re.M)]
    for start in reversed(starts):
        try:
            return json.loads(text[start : text.index("\n}", start) + 2])
        except ValueError:
            continue
    return None


def _read_json(path) -> dict | None:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_text(path) -> str | None:
    try:
        return pathlib.Path(path).read_text()
    except OSError:
        return None


def _flags(values: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in values.items()]


# ----------------------------------------------------------------------------- the run


class Campaign:
    """Runs the stages of a plan; results go to `out` (at most 8 files), scratch to `work`."""

    def __init__(
        self,
        plan: Plan,
        out,
        work,
        *,
        wheels=None,
        head=None,
        overrides=(),
        fail_stage=None,
        python=sys.executable,
    ):
        self.plan, self.python = plan, python
        self.out, self.work = pathlib.Path(out), pathlib.Path(work)
        self.wheels = pathlib.Path(wheels) if wheels else None
        self.head, self.overrides, self.fail_stage = head, list(overrides), fail_stage
        self.stages: dict[str, dict] = {}
        self.start = time.monotonic()
        self.env = dict(os.environ)
        path = [str(ROOT)]  # the GPU image runs the tree without installing it
        self.env.update(
            PYTHONPATH=os.pathsep.join(path + [p for p in [self.env.get("PYTHONPATH")] if p]),
            PYTHONUNBUFFERED="1",
            TF_CPP_MIN_LOG_LEVEL="2",
            # One cache for every stage: evaluation reuses what the benchmarks compiled.
            JAX_COMPILATION_CACHE_DIR=self.env.get(
                "JAX_COMPILATION_CACHE_DIR", str(self.work / "jax_cache")
            ),
        )
        if plan.smoke:
            self.env.setdefault("JAX_PLATFORMS", "cpu")
            self.env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # compile time dominates there

    # ---- helpers
    def left(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.start)

    def protected_s(self) -> float:
        """Seconds the stages before training leave: its minimum and what follows it."""
        return self.plan.train_min_s + sum(self.plan.reserve_s.values())

    def _exec(self, cmd: list[str], limit_s: float, *, capture: str | None = None,
              env: dict | None = None) -> str:  # fmt: skip
        """Runs one command in its own process group: "ok", "failed (exit N)" or "timeout".

        Output goes to this process's stdout (the campaign log), and also to `work/capture`;
        `env` adds to the campaign's environment for this command.
        """
        limit_s = min(limit_s, self.left())
        if limit_s <= 1:
            return "skipped (no time left)"
        print(f"$ {' '.join(cmd)}   [limit {limit_s:.0f} s]", flush=True)
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sink = open(self.work / capture, "wb") if capture else None  # noqa: SIM115

        def pump():
            for line in proc.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                if sink:
                    sink.write(line)
                    sink.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=limit_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status = "timeout"
        reader.join(timeout=10)
        if sink:
            sink.close()
        return status

    def _launcher(self, name: str, *args: str, **flags) -> list[str]:
        """argv of experiments/NAME.py: `args` as given, then `--key=value` per flag."""
        return [self.python, str(EXPERIMENTS / f"{name}.py"), *args, *_flags(flags)]

    def _stage(self, name: str, commands, limit_s: float, *, stop_on_failure=False) -> None:
        """Runs a stage's commands (callables returning a status, or argv lists) in order."""
        if STAGES.index(name) < STAGES.index("training"):
            limit_s = max(min(limit_s, self.left() - self.protected_s()), 0.0)
        t0 = time.monotonic()
        deadline = t0 + limit_s
        statuses = []
        if self.fail_stage == name:  # tests: a stage that fails must not stop the next; its
            # own commands still run after the failed one, so the smoke run covers them all
            injected = [self.python, "-c", "raise SystemExit('injected failure')"]
            statuses.append(self._exec(injected, limit_s))
        for command in commands:
            remaining = deadline - time.monotonic()
            if callable(command):
                statuses.append(command(remaining))
            else:
                statuses.append(self._exec(command, remaining))
            if stop_on_failure and statuses[-1] != "ok":
                break
        bad = [s for s in statuses if s != "ok"]
        self.stages[name] = {
            "status": bad[0] if bad else "ok",
            "seconds": round(time.monotonic() - t0, 1),
            "limit_s": round(limit_s, 1),
            "commands": statuses,
        }
        print(
            f"== stage {name}: {self.stages[name]['status']} "
            f"({self.stages[name]['seconds']} s, {self.left():.0f} s left)",
            flush=True,
        )
        self.collect()

    # ---- stages
    def _preflight(self) -> None:
        def install(limit_s):
            if self.plan.smoke:  # wheels are for the GPU image's Python, not this one
                print("preflight: smoke run, carried wheels not installed", flush=True)
                return "ok"
            wheels = sorted(glob.glob(str(self.wheels / "*.whl"))) if self.wheels else []
            if not wheels:
                print("preflight: no carried wheels to install", flush=True)
                return "ok"
            pip = [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
            cmd = [*pip, "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE, *wheels]
            status = self._exec(cmd, limit_s)
            if status == "ok":
                self.env["PYTHONPATH"] = os.pathsep.join([SITE, self.env["PYTHONPATH"]])
            return status

        def imports(limit_s):
            path = str(self.work / "preflight.json")
            code = f"campaign.write_preflight({path!r}, require_gpu={not self.plan.smoke})"
            return self._exec([self.python, "-c", f"{_CAMPAIGN}; {code}"], limit_s)

        def launchers(limit_s):
            if self.plan.smoke:  # on 2 cores this costs more than it saves: later stages run them
                return "ok"
            procs = {n: subprocess.Popen(self._launcher(n, "--help"), cwd=ROOT, env=self.env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for n in LAUNCHERS}  # fmt: skip
            deadline = time.monotonic() + limit_s
            failed = []
            for name, p in procs.items():
                try:
                    out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate()
                # absl prints the flags and exits 1 after --help; an import error prints a
                # traceback instead.
                if b"Traceback" in err or b"flags:" not in out:
                    failed.append(name)
                    print(f"preflight: {name}.py --help failed:\n{err.decode()[-2000:]}")
            return f"failed ({', '.join(failed)})" if failed else "ok"

        commands = [install, imports, launchers]
        self._stage("preflight", commands, self.plan.limits["preflight"], stop_on_failure=True)

    def _simulate(self) -> None:
        cmd = self._launcher("make_tavr_data", out=self.work / "sim", **self.plan.sim)
        self._stage("simulate", [cmd], self.plan.limits["simulate"])

    def _latency(self) -> None:
        def run(backbone, dtype, modes):
            out = self.work / f"latency_{backbone}_{dtype}.json"

            def command(peers: str) -> list[str]:
                return self._launcher("bench_latency", "--noprofile", "--notorch_eager",
                                      backbones=backbone, dtypes=dtype, out=out,
                                      torch_modes=peers, **self.plan.latency,
                                      **self.plan.torch)  # fmt: skip

            def go(limit_s):
                t0 = time.monotonic()
                status = self._exec(command(modes), limit_s, env=self.plan.latency_env)
                if status.startswith("failed") and modes:
                    # torch in the same process must not cost our own rows: again without it
                    # (the compilation cache serves the engine's executables)
                    print(f"latency: {backbone} {dtype} with torch peers {status}; again "
                          "without them", flush=True)  # fmt: skip
                    failure = {"backbone": backbone, "dtype": dtype, "modes": modes,
                               "error": f"the run with torch peers: {status}"}  # fmt: skip
                    write_json_atomic(self.work / f"peer_failure_{backbone}_{dtype}.json", failure)
                    left = limit_s - (time.monotonic() - t0)
                    return self._exec(command(""), left, env=self.plan.latency_env)
                return status

            return go

        commands = [run(*spec) for spec in self.plan.latency_runs]
        if self.plan.onnxruntime:
            commands.append(self._onnxruntime_row)
        plot = f"campaign.plot_latency({str(self.work)!r}, {str(self.out)!r})"
        commands.append([self.python, "-c", f"{_CAMPAIGN}; {plot}"])
        self._stage("latency", commands, self.plan.limits["latency"])

    def _engine(self) -> None:
        out = self.work / "engine.json"
        code = ("from experiments.benchmarks import engine_study; "
                f"engine_study.engine_study({str(out)!r}, **{self.plan.engine!r})")  # fmt: skip
        commands = [[self.python, "-c", code]]
        commands += [self._flag_variant(name, flags) for name, flags in self.plan.engine_flags]
        self._stage("engine", commands, self.plan.limits["engine"])

    def _flag_variant(self, name: str, flags: str):
        """The default engine in a process of its own under XLA flags. A process that fails
        (XLA rejecting a flag, say) is that variant's row with its error, not a failed stage."""
        out = self.work / f"engine_flags_{name}.json"
        args = {k: self.plan.engine[k] for k in ("backbone", "image_size", "dtype", "batch",
                                                  "min_time")}  # fmt: skip
        code = ("from experiments.benchmarks import engine_study; "
                f"engine_study.flag_variant({str(out)!r}, name={name!r}, **{args!r})")  # fmt: skip
        xla_flags = " ".join(f for f in (self.env.get("XLA_FLAGS", ""), flags) if f)

        def run(limit_s):
            status = self._exec([self.python, "-c", code], limit_s, env={"XLA_FLAGS": xla_flags})
            if status.startswith("failed"):
                if _read_json(out) is None:
                    row = {"variant": name, "xla_flags": xla_flags, "error": status}
                    write_json_atomic(out, row)
                print(f"engine: variant {name} failed ({status}); kept as its row's error")
                return "ok"
            return status

        return run

    def _onnxruntime_row(self, limit_s) -> str:
        """ONNX Runtime, when the latency launcher offers a backend flag (another engineer's)."""
        launcher = self._launcher("bench_latency", "--help")
        text = subprocess.run(launcher, cwd=ROOT, env=self.env, capture_output=True, text=True)
        if "--backend" not in text.stdout:
            print("latency: bench_latency.py has no --backend flag; no ONNX Runtime row")
            return "ok"
        flags = {**self.plan.latency, "batch_sizes": 1, "dtypes": "float32"}
        cmd = self._launcher("bench_latency", "--backend=onnxruntime", "--noprofile",
                             "--notorch_eager", backbones=self.plan.latency_runs[0][0],
                             out=self.work / "onnxruntime_latency.json", **flags)  # fmt: skip
        return self._exec(cmd, limit_s)

    def _train_throughput(self) -> None:
        data, config, w = self.work / "sim", ROOT / self.plan.train_config, self.work
        train = self._launcher("bench_train", config=config, data=data,
                               out=w / "bench_train.json", **self.plan.throughput)  # fmt: skip
        loader = self._launcher("bench_input", "--nobuild_tfds", data=data,
                                out=w / "bench_input.json", **self.plan.input)  # fmt: skip
        # the loader first: a few seconds, where bench_train compiles for ~50 s per dtype
        self._stage("train_throughput", [loader, train], self.plan.limits["train_throughput"])

    def _training(self) -> None:
        reserve = self.plan.reserve_s
        limit = self.left() - reserve["perfusion"]
        # kept for what follows training
        after = reserve["evaluation"] + reserve["refine"] + reserve["live"]
        budget = max(limit - after - reserve["startup"], 10.0)
        overrides = dict(self.plan.train)
        if not self.plan.smoke:
            overrides["time_budget_s"] = round(budget)
            steps = self._steps_in(budget, self._train_dtype())
            if steps:
                overrides["num_steps"] = steps  # the schedule decays within the budget
        if self.head:
            overrides["head"] = self.head
        workdir, data = self.work / "run", self.work / "sim"
        train = self._launcher(
            "tavr_train", f"--config={ROOT / self.plan.train_config}",  # before its overrides
            *[f"--config.{k}={v}" for k, v in overrides.items()], *self.overrides,
            workdir=workdir, data=data,
        )  # fmt: skip
        evaluate = self._launcher("tavr_eval", "--tune_thresholds", workdir=workdir, data=data,
                                  split="test", batch_size=self.plan.eval_batch,
                                  out=self.work / "test_metrics.json")  # fmt: skip

        def run_train(limit_s):
            return self._exec(train, limit_s - after, capture="train_stdout.txt")

        commands = [run_train, evaluate]
        if self.plan.refine is not None:
            # the second stage learns on the run's own training cases, at the frames' resolution
            refine = self._launcher("tavr_refine", workdir=workdir, data=data, split="train",
                                    **self.plan.refine)  # fmt: skip
            evaluate_refined = self._launcher(
                "tavr_eval", "--refine", workdir=workdir, data=data, split="test",
                batch_size=self.plan.eval_batch, out=self.work / "test_metrics_refined.json",
            )  # fmt: skip
            commands += [refine, evaluate_refined]
        if self.plan.live is not None:
            refined = ["--refine"] if self.plan.refine is not None else []
            live = self._launcher("bench_live", *refined, workdir=workdir,
                                  out=self.work / "live.json", **self.plan.live)  # fmt: skip
            commands.append(live)
        self._stage("training", commands, limit)

    def _train_dtype(self) -> str:
        """The training run's dtype: the last `--config.dtype=` override, else the plan's
        override, else its config file's."""
        dtype = self.plan.train.get("dtype") or _config_file(ROOT / self.plan.train_config).dtype
        for flag in self.overrides:
            if flag.startswith("--config.dtype="):
                dtype = flag.split("=", 1)[1]
        return dtype

    def _steps_in(self, budget_s: float, dtype: str) -> int | None:
        """Steps that fit the budget at the measured rate of the config's backbone and dtype."""
        measured = _read_json(self.work / "bench_train.json") or {}
        rows = [  # the training run's own recipe: fp32 state, augmentation on
            r
            for r in measured.get("results", [])
            if r["backbone"] == "resnet34" and r["dtype"] == dtype and r.get("images_per_s")
            and r.get("state_dtype", "float32") == "float32" and r.get("augment", True)
        ]  # fmt: skip
        if not rows:
            return None
        rate = rows[0].get("images_per_s_pipeline") or rows[0]["images_per_s"]
        # The budget includes compiling the step (bench_train's compile_s, 40-57 s for the
        # H200's first run); 0.8: validation passes and the smaller batch eat into the rate.
        stepping_s = max(budget_s - rows[0].get("compile_s", 0.0), 0.25 * budget_s)
        return int(min(max(0.8 * stepping_s * rate / 32, 500), 20_000))

    def _perfusion(self) -> None:
        commands = [self._features(size, batch) for size, batch in self.plan.features]
        cv, data = self.plan.cv, self.work / "perf"

        def cross_validate(limit_s):
            if limit_s < cv["min_s"]:
                print(f"perfusion: {limit_s:.0f} s left, under the {cv['min_s']} s the CV needs")
                return "ok"
            status = self._exec(self._launcher("make_perfusion_data", out=data, n=cv["n"]), limit_s)
            if status != "ok":
                return status
            out = self.work / "perfusion_cv.json"
            cmd = self._launcher("perfusion_cv", data=data, task=cv["task"], model=cv["model"],
                                 folds=cv["folds"], out=out)  # fmt: skip
            return self._exec(cmd, limit_s)

        commands.append(cross_validate)
        self._stage("perfusion", commands, max(self.plan.limits["perfusion"], self.left()))

    def _features(self, size: int, batch: int):
        def run(limit_s):
            cmd = self._launcher("bench_features", size=size, batch=batch, repeats=3,
                                 loop_maps=1, loop_repeats=1)  # fmt: skip
            return self._exec(cmd, limit_s, capture=f"features_{size}.txt")

        return run

    # ---- results
    def collect(self) -> dict:
        """Rewrites the output folder from what the work folder holds now."""
        w, o = self.work, self.out
        preflight = _read_json(w / "preflight.json")
        latency_files = sorted(w.glob("latency_*.json"))
        latency_results = [r for r in map(_read_json, latency_files) if r]
        bench_train = _read_json(w / "bench_train.json")
        train_metrics = parse_final_json(_read_text(w / "train_stdout.txt") or "")
        test = _read_json(w / "test_metrics.json")
        refined = _read_json(w / "test_metrics_refined.json")
        config = _read_json(w / "run" / "config.json")
        live = _read_json(w / "live.json")
        engine = _read_json(w / "engine.json")
        flagged = [r for r in map(_read_json, sorted(w.glob("engine_flags_*.json"))) if r]
        peer_failures = [r for r in map(_read_json, sorted(w.glob("peer_failure_*.json"))) if r]
        bench_input = _read_json(w / "bench_input.json")
        features = {
            "maps_per_s_256": maps_per_s(_read_text(w / "features_256.txt")),
            "maps_per_s_512": maps_per_s(_read_text(w / "features_512.txt")),
        }
        write_json_atomic(
            o / "stages.json",
            {
                "mode": "smoke" if self.plan.smoke else "gpu",
                "budget_s": self.plan.budget_s,
                "elapsed_s": round(time.monotonic() - self.start, 1),
                "stages": self.stages,
                "preflight": preflight,
            },
        )
        onnxruntime = _read_json(w / "onnxruntime_latency.json")
        if latency_results or onnxruntime or engine or flagged:
            # the engine stage's results travel in latency.json: at most 8 files come back
            write_json_atomic(
                o / "latency.json",
                {"runs": latency_results, "onnxruntime": onnxruntime,
                 "engine": engine, "engine_flags": flagged},
            )  # fmt: skip
        if bench_train or bench_input:
            write_json_atomic(
                o / "train_throughput.json", {"train": bench_train, "input": bench_input}
            )
        if train_metrics or test:
            write_json_atomic(
                o / "training.json",
                {"train": train_metrics, "test": test, "test_refined": refined, "config": config,
                 "live": live},
            )  # fmt: skip
        cv = _read_json(w / "perfusion_cv.json")
        if any(v is not None for v in features.values()) or cv:
            write_json_atomic(o / "perfusion.json", {"features": features, "cv": cv})
        result = summary(
            preflight,
            latency_rows(latency_results),
            throughput_rows(bench_train),
            training_summary(train_metrics, test, config, refined),
            features,
            live_rows(live),
            peers=peer_rows(latency_results, peer_failures),
            profile=profile_summary(engine),
            engine_variants=engine_variant_rows(engine, flagged),
            pipelined=pipelined_rows(engine),
            loader=loader_rows(bench_input),
            recall_per_point=per_point_recall(test),
        )
        write_json_atomic(o / "campaign.json", result)
        return result

    def run(self) -> int:
        """All stages, then the summary; exit code 0 when every stage ran to completion."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        for old in self.work.iterdir():  # a rerun starts afresh, but keeps the compilations
            if old.is_dir() and old.name != "jax_cache":
                shutil.rmtree(old)
            elif not old.is_dir():
                old.unlink()
        print(
            f"campaign ({'smoke' if self.plan.smoke else 'gpu'}): {self.plan.budget_s:.0f} s "
            f"budget, results in {self.out}",
            flush=True,
        )
        for name in STAGES:
            if name != "preflight" and self.stages["preflight"]["status"] != "ok":
                self.stages[name] = {"status": "skipped (preflight failed)", "seconds": 0}
                continue
            getattr(self, f"_{name}")()
        result = self.collect()
        print(json.dumps(result, indent=1), flush=True)
        return 0 if all(s["status"] == "ok" for s in self.stages.values()) else 1


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL if it has not ended in 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------- child processes


def write_preflight(path: str, *, require_gpu: bool) -> None:
    """Imports every entry module and writes versions and the device; raises on failure."""
    import importlib
    import importlib.metadata

    import jax

    for name in ENTRY_MODULES:
        importlib.import_module(name)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        gpus = smi.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        gpus = []
    report = {
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "platform": devices[0].platform,
        "gpus": gpus,
        "versions": {**versions, "jax": jax.__version__, "python": sys.version.split()[0]},
        "cpu_count": os.cpu_count(),
    }
    write_json_atomic(path, report)
    print(json.dumps(report, indent=1))
    if require_gpu and devices[0].platform != "gpu":
        raise SystemExit(f"preflight: JAX sees {devices[0].platform}, not a GPU; stopping")


def plot_latency(work: str, out: str) -> None:
    """latency.png from every bench_latency result in the work folder."""
    from experiments.benchmarks import latency

    results = [r for r in map(_read_json, sorted(pathlib.Path(work).glob("latency_*.json"))) if r]
    if results:
        latency.plot_latency(results, str(pathlib.Path(out) / "latency.png"))
