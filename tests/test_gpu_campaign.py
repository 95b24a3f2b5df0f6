"""The GPU campaign script: its summary pieces, and its CPU smoke run end to end."""

import datetime
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.benchmarks import campaign

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP_LEVEL = {"device", "jax", "date", "latency", "peer_rows", "profile", "engine_variants",
             "pipelined_frames_per_s", "train_throughput", "loader", "training",
             "per_point_recall", "features", "live"}  # fmt: skip
LIVE = {"rate_fps", "processed_fps", "dropped", "age_ready_p50_ms", "age_ready_p99_ms",
        "frame_size", "depth_mae_mm", "range_agreement", "depth_mae_mm_carried"}  # fmt: skip
LATENCY = {"backbone", "image_size", "batch", "dtype", "end_to_end_p50_ms", "end_to_end_p99_ms",
           "frames_per_s", "best_torch_peer", "ratio_vs_best_torch_peer"}  # fmt: skip
THROUGHPUT = {"backbone", "image_size", "batch", "dtype", "images_per_s", "mfu", "state_dtype",
              "augment", "layout", "images_per_s_pipeline", "compile_s", "error"}  # fmt: skip
PEER = {"backbone", "batch", "dtype", "peer", "p50_ms", "our_ratio", "our_p50_ms", "compile_s",
        "best", "error"}  # fmt: skip
VARIANT = {"variant", "p50_ms", "p99_ms", "ratio_vs_aot", "compile_s", "xla_flags", "error"}
PIPELINED = {"batch", "one_call_frames_per_s", "pipelined_frames_per_s",
             "pipelined_pinned_frames_per_s", "error"}  # fmt: skip
TRAINING = {"backbone", "head", "image_size", "steps", "wall_s", "precision", "recall", "f1",
            "mean_error_px_at_1024", "loc_accuracy_20px", "mean_error_px_at_1024_refined",
            "loc_accuracy_20px_refined"}  # fmt: skip


def test_latency_and_throughput_rows_keep_the_contract_fields():
    e2e = {"p50_ms": 1.5, "p90_ms": 1.8, "p99_ms": 2.5, "frames_per_s": 666.7, "runs": 9}
    row = {"backbone": "resnet34", "dtype": "bfloat16", "batch": 1, "image_size": 512,
           "frame_size": 512, "model": {"p50_ms": 1.0}, "end_to_end": e2e}  # fmt: skip
    bench = {"rows": [row]}
    (row,) = campaign.latency_rows([bench])
    assert set(row) == LATENCY
    assert (row["end_to_end_p50_ms"], row["end_to_end_p99_ms"], row["frames_per_s"]) == (
        1.5,
        2.5,
        666.7,
    )
    train = {"results": [{"backbone": "resnet34", "dtype": "float32", "image_size": 512,
                          "batch_size": 64, "images_per_s": 2000.0, "mfu": 0.4,
                          "images_per_s_pipeline": 1900.0}]}  # fmt: skip
    (row,) = campaign.throughput_rows(train)
    assert set(row) == THROUGHPUT and row["batch"] == 64 and row["images_per_s"] == 2000.0
    assert row["images_per_s_pipeline"] == 1900.0 and row["state_dtype"] is None  # older JSON
    assert campaign.throughput_rows(None) == [] and campaign.latency_rows([]) == []


def test_training_summary_rescales_the_error_to_1024_pixel_frames():
    test = {"backbone": "resnet34", "head": "regression", "image_size": 512, "precision": 0.9,
            "recall": 0.8, "f1": 0.85, "mean_error_px": 6.0, "frame_width_px": 512.0,
            "loc_accuracy_20px": 0.95}  # fmt: skip
    s = campaign.training_summary({"step": 1200, "train_seconds": 99.5}, test, None)
    assert set(s) == TRAINING
    assert s["mean_error_px_at_1024"] == 12.0  # 6 px on 512-wide frames = 12 px at 1024
    assert (s["steps"], s["wall_s"], s["f1"]) == (1200, 99.5, 0.85)
    empty = campaign.training_summary(None, None, {"backbone": "resnet18", "head": "integral"})
    assert empty["backbone"] == "resnet18" and empty["head"] == "integral"
    assert empty["f1"] is None and empty["mean_error_px_at_1024"] is None


def test_printed_results_are_parsed():
    line = "512x512 uint8 on gpu (1 device(s)): jnp 12,345 maps/s, numpy loop 30 maps/s, ..."
    assert campaign.maps_per_s(line) == 12345.0 and campaign.maps_per_s(None) is None
    log = 'step 10: saved checkpoint\n{"a": 1}\nmore\n{\n  "step": 4,\n  "x": [1, 2]\n}\n'
    assert campaign.parse_final_json(log) == {"step": 4, "x": [1, 2]}
    assert campaign.parse_final_json("no json here") is None


def _load(out, name):
    return json.loads((out / name).read_text())


def test_smoke_run_goes_past_a_failed_stage_and_writes_the_contract(tmp_path):
    # One test, not two sharing a fixture: pytest-xdist could run the campaign on each worker.
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), CAMPAIGN_WORK=str(tmp_path / "work"),
               PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")  # fmt: skip
    if jax.config.jax_compilation_cache_dir:  # share the test session's compilations
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    # The last stage fails: the cheapest to lose, and every stage before it runs (campaign 2's
    # training variants among them).
    proc = subprocess.run(
        ["bash", "experiments/gpu_campaign.sh", "--smoke", "--fail_stage=perfusion"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = (out / "campaign.log").read_text()
    assert proc.returncode == 1, log[-3000:]  # a stage failed: the campaign says so
    stages = _load(out, "stages.json")["stages"]
    assert list(stages) == list(campaign.STAGES)
    assert stages["perfusion"]["status"] == "failed (exit 1)"
    others = {name: s["status"] for name, s in stages.items() if name != "perfusion"}
    assert set(others.values()) == {"ok"}, others
    assert "injected failure" in log
    # Every stage's results exist (the failed stage's commands ran after its injected failure)
    # and at most 8 files come back.
    assert stages["perfusion"]["commands"][0] == "failed (exit 1)"
    assert set(stages["perfusion"]["commands"][1:]) == {"ok"}
    files = {p.name for p in out.iterdir()}
    assert {"campaign.json", "campaign.log", "stages.json", "latency.json", "latency.png",
            "train_throughput.json", "training.json", "perfusion.json"} == files  # fmt: skip
    training = _load(out, "training.json")
    assert training["test"]["n_images"] > 0
    # the second stage was trained and the test patients evaluated again with it
    assert training["test_refined"]["refined"] is True and not training["test"]["refined"]

    c = _load(out, "campaign.json")
    assert set(c) == TOP_LEVEL
    assert isinstance(c["device"], str) and c["device"].endswith("cpu")
    assert c["jax"] == jax.__version__
    assert datetime.date.fromisoformat(c["date"])
    assert len(c["latency"]) == 2  # resnet_tiny, float32, batches 1 and 2
    for row in c["latency"]:
        assert set(row) == LATENCY
        assert row["backbone"] == "resnet_tiny" and row["dtype"] == "float32"
        assert row["batch"] in (1, 2) and row["image_size"] == 32
        assert 0 < row["end_to_end_p50_ms"] <= row["end_to_end_p99_ms"]
        assert row["frames_per_s"] > 0
        assert row["ratio_vs_best_torch_peer"] > 0
    # three torch peers beside each latency row (the compiled modes on dynamo's eager backend)
    assert len(c["peer_rows"]) == 6
    for row in c["peer_rows"]:
        assert set(row) == PEER and row["error"] is None, row
        assert row["p50_ms"] > 0 and row["our_ratio"] > 0 and row["compile_s"] > 0
    for b in (1, 2):
        best = [r for r in c["peer_rows"] if r["batch"] == b and r["best"]]
        (latency,) = [r for r in c["latency"] if r["batch"] == b]
        assert len(best) == 1 and best[0]["peer"] == f"torch {latency['best_torch_peer']}"
    assert {r["peer"] for r in c["peer_rows"]} == {
        "torch eager", "torch max-autotune-no-cudagraphs", "torch reduce-overhead"}  # fmt: skip
    # the engine stage: a profile of the batch-1 engine, its variants, the pipelined rates
    p = c["profile"]
    assert p["calls"] == 5 and p["kernels"] > 10 and p["clocks_aligned"]
    assert 0 < p["top15_share"] <= 1 and len(p["top"]) == 15
    assert 0 <= p["idle_us"] <= p["span_us"] <= p["call_us"]
    assert p["top15_share"] == pytest.approx(sum(t["share"] for t in p["top"]))
    variants = {r["variant"]: r for r in c["engine_variants"]}
    assert set(variants) == {"aot", "jit", "packed_outputs", "fused_input", "fused_input_packed",
                             "autotune_level_0"}  # fmt: skip
    for row in variants.values():
        assert set(row) == VARIANT and row["error"] is None and row["p50_ms"] > 0, row
    assert variants["aot"]["ratio_vs_aot"] == 1.0
    assert "--xla_gpu_autotune_level=0" in variants["autotune_level_0"]["xla_flags"]
    assert [r["batch"] for r in c["pipelined_frames_per_s"]] == [2, 4]
    for row in c["pipelined_frames_per_s"]:
        assert set(row) == PIPELINED and row["error"] is None
        assert min(row[k] for k in PIPELINED - {"batch", "error"}) > 0  # pinned memory here too
    # the training variants: fp32 state, then bf16 state (the smoke config has no augmentation)
    assert [(r["state_dtype"], r["augment"]) for r in c["train_throughput"]] == [
        ("float32", False), ("bfloat16", False)]  # fmt: skip
    for row in c["train_throughput"]:
        assert set(row) == THROUGHPUT and row["error"] is None and row["layout"] == "NHWC"
        assert row["images_per_s"] > 0 and row["compile_s"] > 0 and row["batch"] == 8
    assert c["train_throughput"][0]["images_per_s_pipeline"] > 0  # --pipeline_rows=1
    assert c["train_throughput"][1]["images_per_s_pipeline"] is None
    assert c["loader"] and all(r["frames_per_s"] > 0 for r in c["loader"])
    t = c["training"]
    assert set(t) == TRAINING
    assert (t["backbone"], t["head"], t["image_size"], t["steps"]) == (
        "resnet_tiny",
        "heatmap",  # the default config's head
        32,
        3,
    )
    assert t["wall_s"] > 0
    assert isinstance(t["mean_error_px_at_1024_refined"], float)
    for k in ("precision", "recall", "f1", "mean_error_px_at_1024", "loc_accuracy_20px"):
        assert t[k] is None or isinstance(t[k], float), k  # None: nothing reported or found
    recall = c["per_point_recall"]
    assert list(recall)[0] == "CP" and len(recall) == 11  # paper11, CP first
    assert all(v is None or 0 <= v <= 1 for v in recall.values())
    assert recall == {k: v["recall"] for k, v in training["test"]["per_point"].items()}
    assert set(c["features"]) == {"maps_per_s_256", "maps_per_s_512"}
    assert all(isinstance(v, float) and v > 0 for v in c["features"].values())
    # the trained run on a paced replay of held-out cines (the refiner on, as it was trained)
    (row,) = c["live"]
    assert set(row) == LIVE and row["rate_fps"] == 15.0 and row["frame_size"] == 64
    assert row["processed_fps"] > 0 and 0 < row["age_ready_p50_ms"] <= row["age_ready_p99_ms"]
    assert training["live"]["refine"] is True


def test_gpu_plan_fits_its_budget_and_sizes_the_run_from_the_measured_rate(tmp_path):
    plan = campaign.gpu_plan()
    assert plan.budget_s <= 540 and plan.sim["cases"] * plan.sim["frames"] == 6000
    run = campaign.Campaign(plan, tmp_path / "out", tmp_path / "work")
    # The stages before training may take at most what leaves it its minimum, whatever
    # their own limits: 540 - (60 + 50 + 45 + 40 + 20) = 325 s for preflight to throughput.
    assert run.protected_s() == 215 and plan.budget_s - run.protected_s() == 325
    assert plan.limits["preflight"] + plan.limits["simulate"] + plan.limits["latency"] < 325
    # campaign 2 on the GPU: the real torch.compile modes (Inductor), all three beside the
    # bf16 rows (the targets'), eager beside the fp32 ones
    assert [run[:2] for run in plan.latency_runs] == [("resnet34", "bfloat16"),
                                                      ("resnet34", "float32")]  # fmt: skip
    assert set(plan.latency_runs[0][2].split(",")) == {
        "eager", "max-autotune-no-cudagraphs", "reduce-overhead"}  # fmt: skip
    assert plan.latency_runs[1][2] == "eager"
    assert "torch_backend" not in plan.torch and plan.torch["torch_compile_budget_s"] > 0
    assert plan.engine["pipelined_batches"] == (32, 128, 256) and plan.engine["batch"] == 1
    assert [name for name, _ in plan.engine_flags] == ["command_buffer", "command_buffer_off",
                                                       "autotune_level_0"]  # fmt: skip
    variants = plan.throughput["variants"].split(",")
    assert {v.split(":")[1] for v in variants} == {"64", "128", "256"}
    assert {"float32:64", "bfloat16:64:bf16_state", "bfloat16:64:noaug"} <= set(variants)
    run.work.mkdir()
    assert run._train_dtype() == "bfloat16"  # the paper-scale recipe
    assert run._steps_in(100.0, "bfloat16") is None  # nothing measured: the config's num_steps
    rows = [{"backbone": "resnet34", "dtype": "bfloat16", "images_per_s": 9000.0,
             "images_per_s_pipeline": 4000.0, "compile_s": 40.0},
            {"backbone": "resnet34", "dtype": "float32", "images_per_s": 3000.0},
            # variants that are not the training run's recipe are never its rate
            {"backbone": "resnet34", "dtype": "bfloat16", "images_per_s": 1.0, "augment": False},
            {"backbone": "resnet34", "dtype": "float32", "images_per_s": 1.0,
             "state_dtype": "bfloat16"}]  # fmt: skip
    rows = [rows[2], rows[3], *rows[:2]]  # first in the file, still not taken
    (run.work / "bench_train.json").write_text(json.dumps({"results": rows}))
    # 0.8 x (100 s - 40 s compiling) x 4,000 images/s (bf16, the real pipeline) / batch 32
    assert run._steps_in(100.0, "bfloat16") == 6000
    assert run._steps_in(100.0, "float32") == 7500  # no pipeline rate or compile time known
    assert run._steps_in(48.0, "bfloat16") == 1200  # a quarter of the budget at least: 12 s
    assert run._steps_in(1.0, "bfloat16") == 500
    assert run._steps_in(10_000.0, "bfloat16") == 20_000  # clamped
    fp32 = campaign.Campaign(plan, tmp_path / "o", tmp_path / "w",
                             overrides=["--config.dtype=float32"])  # fmt: skip
    assert fp32._train_dtype() == "float32"  # a --config_overrides flag wins


def _training_stage(plan, work):
    """(commands, limit) that `Campaign._training` hands to its stage, without running them."""
    run = campaign.Campaign(plan, work / "out", work / "work")
    run.work.mkdir(parents=True)
    staged = {}
    run._stage = lambda name, commands, limit: staged.update({name: (commands, limit)})
    run._training()
    return (*staged["training"], run)


def test_gpu_plan_trains_and_evaluates_without_the_second_stage(tmp_path):
    # The refiner did not pay at paper scale: the GPU run gives its minute to training.
    commands, limit, run = _training_stage(campaign.gpu_plan(), tmp_path / "gpu")
    launched = [c for c in commands if not callable(c)]
    # the training run, its evaluation, then the live replay
    assert len(commands) == 3 and len(launched) == 2
    assert not any("tavr_refine" in part or part == "--refine" for c in launched for part in c)
    live = launched[1]
    assert live[1].endswith("bench_live.py") and "--rates=30" in live and "--size=1024" in live
    assert limit == pytest.approx(run.left() - 20, abs=1)  # all but the perfusion stage's
    commands, _, _ = _training_stage(campaign.smoke_plan(), tmp_path / "smoke")
    assert len(commands) == 5  # the smoke run still covers the refiner and its evaluation


# ----------------------------------------------------------------------------- campaign 2


def test_peer_rows_give_our_time_over_each_torch_peer():
    e2e = {"p50_ms": 2.4, "p99_ms": 2.7, "frames_per_s": 416.7}
    peers = {"eager": {"mode": "eager", "compile_s": 0.2, "p50_ms": 4.8, "ratio": 0.5},
             "reduce-overhead": {"mode": "reduce-overhead", "compile_s": 30.0, "p50_ms": 1.2,
                                 "ratio": 2.0},
             "max-autotune-no-cudagraphs": {"mode": "max-autotune-no-cudagraphs",
                                            "error": "compile budget of 20 s spent"}}  # fmt: skip
    row = {"backbone": "resnet34", "dtype": "bfloat16", "batch": 1, "image_size": 512,
           "end_to_end": e2e, "torch_peers": peers, "best_torch_peer": "reduce-overhead",
           "ratio_vs_best_torch_peer": 2.0}  # fmt: skip
    rows = campaign.peer_rows([{"rows": [row]}])
    assert [set(r) for r in rows] == [PEER] * 3
    by_peer = {r["peer"]: r for r in rows}
    assert by_peer["torch reduce-overhead"]["best"] and not by_peer["torch eager"]["best"]
    assert (by_peer["torch eager"]["p50_ms"], by_peer["torch eager"]["our_ratio"]) == (4.8, 0.5)
    assert by_peer["torch eager"]["our_p50_ms"] == 2.4
    failed = by_peer["torch max-autotune-no-cudagraphs"]
    assert failed["p50_ms"] is None and failed["error"].startswith("compile budget")
    (latency,) = campaign.latency_rows([{"rows": [row]}])
    assert (latency["best_torch_peer"], latency["ratio_vs_best_torch_peer"]) == ("reduce-overhead",
                                                                                 2.0)  # fmt: skip
    assert campaign.peer_rows([{"rows": [{**row, "torch_peers": None}]}]) == []
    failure = {"backbone": "resnet34", "dtype": "bfloat16", "modes": "eager,reduce-overhead",
               "error": "the run with torch peers: failed (exit -11)"}  # fmt: skip
    (failed,) = campaign.peer_rows([], [failure])
    assert set(failed) == PEER and failed["error"].endswith("(exit -11)")
    assert failed["peer"] == "torch eager,reduce-overhead" and failed["p50_ms"] is None


def test_torch_peer_fields_are_medians_of_paired_ratios():
    from experiments.benchmarks.latency import torch_peer_fields

    ours = np.array([2.0, 4.0, 6.0])
    timed = {"torch:eager": np.array([1.0, 2.0, 3.0]),  # ours / it: 2, 2, 2
             "torch:reduce-overhead": np.array([4.0, 4.0, 4.0]),  # 0.5, 1, 1.5
             "onnxruntime_peer": np.array([9.0, 9.0, 9.0])}  # fmt: skip
    info = {"torch:eager": {"mode": "eager", "compile_s": 0.1},
            "torch:max-autotune-no-cudagraphs": {"mode": "max-autotune-no-cudagraphs",
                                                 "error": "boom"}}  # fmt: skip
    fields = torch_peer_fields(ours, timed, info)
    peers = fields["torch_peers"]
    assert set(peers) == {"eager", "reduce-overhead", "max-autotune-no-cudagraphs"}
    assert peers["eager"]["ratio"] == 2.0 and peers["eager"]["compile_s"] == 0.1
    assert peers["eager"]["p50_ms"] == pytest.approx(2000.0)  # 2 s, in ms
    assert peers["reduce-overhead"]["ratio"] == 1.0
    assert peers["max-autotune-no-cudagraphs"] == {"mode": "max-autotune-no-cudagraphs",
                                                   "error": "boom"}  # fmt: skip
    # the best peer has the lowest median time (eager, 2 s), whatever the paired ratios say
    assert fields["best_torch_peer"] == "eager" and fields["ratio_vs_best_torch_peer"] == 2.0
    assert "best_torch_peer" not in torch_peer_fields(ours, {}, info)


def _synthetic_trace(window_shift_us=0.0):
    """Two annotated calls on the host; kernels on a GPU stream, one copy, and a line the
    profiler derives (XLA Ops) that must not count."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0 H100"}},
        {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "python"}},
        {"ph": "M", "pid": 2, "tid": 20, "name": "thread_name",
         "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 21, "name": "thread_name", "args": {"name": "XLA Ops"}},
    ]  # fmt: skip

    def x(pid, tid, name, ts, dur):
        return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}

    calls = [x(1, 10, "engine_call", 0 + window_shift_us, 100),
             x(1, 10, "engine_call", 200 + window_shift_us, 100)]  # fmt: skip
    # call 1: A 10-30, B 35-65, C 60-70 (overlaps B), D 80-85; a copy 5-8
    # call 2: A 210-220, B 225-265, C 270-280, D 290-295
    kernels = [x(2, 20, n, ts, d) for n, ts, d in (
        ("A", 10, 20), ("B", 35, 30), ("C", 60, 10), ("D", 80, 5),
        ("A", 210, 10), ("B", 225, 40), ("C", 270, 10), ("D", 290, 5))]  # fmt: skip
    derived = [x(2, 21, "fusion.1", 10, 75), x(2, 21, "fusion.2", 210, 85)]
    return meta + calls + kernels + derived + [x(2, 20, "MemcpyH2D", 5, 3)]


def test_trace_summary_counts_kernels_top_share_and_idle_time_by_hand():
    from experiments.benchmarks import xla_profile

    s = xla_profile.trace_summary(_synthetic_trace(), "gpu", top=2)
    assert s["calls"] == 2 and s["clocks_aligned"]
    assert s["kernels"] == 4  # the derived XLA Ops line and the copy are not kernels
    assert s["copies_per_call"] == 0.5
    # busy: the union of the kernels, 20 + 35 + 5 = 60 us and 10 + 40 + 10 + 5 = 65 us;
    # span: 10-85 = 75 us and 210-295 = 85 us; idle = span - busy: 15 and 20 us
    assert s["busy_us"] == 62.5 and s["span_us"] == 80.0 and s["idle_us"] == 17.5
    assert s["kernel_us"] == 65.0  # 20 + 30 + 10 + 5 = 10 + 40 + 10 + 5
    assert s["before_us"] == 10.0 and s["after_us"] == 10.0  # 15 and 5 after the last kernel
    assert s["call_us"] == 100.0
    # per launch, the median over the calls: A 15, B 35, C 10, D 5 us of 65
    assert [k["name"] for k in s["top"]] == ["B", "A"]
    assert s["top"][0]["us"] == 35.0 and s["top"][0]["share"] == pytest.approx(35 / 65)
    assert s["top2_share"] == pytest.approx(50 / 65)
    assert xla_profile.trace_summary(_synthetic_trace(), "gpu")["top15_share"] == pytest.approx(1)
    assert "lines" not in s


def test_trace_summary_without_aligned_clocks_cuts_the_calls_at_the_largest_gaps():
    from experiments.benchmarks import xla_profile

    s = xla_profile.trace_summary(_synthetic_trace(window_shift_us=1e6), "gpu")
    assert not s["clocks_aligned"] and s["calls"] == 2 and s["kernels"] == 4
    assert s["idle_us"] == 17.5 and s["before_us"] == 0.0 and s["after_us"] == 0.0
    kernels = [("k", 0, 1), ("k", 2, 1), ("k", 10, 1), ("k", 12, 1), ("k", 30, 1)]
    groups = xla_profile.split_at_gaps(kernels, 3)  # the gaps of 7 and 17 us
    assert [len(g) for g in groups] == [2, 2, 1]


def test_trace_summary_on_a_cpu_trace_and_with_nothing_found():
    from experiments.benchmarks import xla_profile

    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 1, "tid": 5, "name": "thread_name",
             "args": {"name": "tf_XLAEigen/123"}}]  # fmt: skip
    events = meta + [
        {"ph": "X", "pid": 1, "tid": 9, "name": "engine_call", "ts": 0, "dur": 50},
        {"ph": "X", "pid": 1, "tid": 5, "name": "conv.1", "ts": 5, "dur": 10},
        {"ph": "X", "pid": 1, "tid": 5, "name": "end: conv.1", "ts": 15, "dur": 0},
        {"ph": "X", "pid": 1, "tid": 5, "name": "ThreadpoolListener::Record", "ts": 16, "dur": 1},
        {"ph": "X", "pid": 1, "tid": 5, "name": "fusion", "ts": 20, "dur": 10},
    ]  # fmt: skip
    s = xla_profile.trace_summary(events, "cpu")
    assert (s["kernels"], s["idle_us"], s["span_us"]) == (2.0, 5.0, 25.0)
    # a GPU trace without a device: the lines that were there, to fix the parser from
    nothing = xla_profile.trace_summary(events, "gpu")
    assert nothing["kernels"] == 0.0 and nothing["top"] == []
    assert nothing["lines"]["/host:CPU / tf_XLAEigen/123"] == 4


def test_engine_stage_summaries():
    engine = {
        "backbone": "resnet34", "image_size": 512, "dtype": "bfloat16", "batch": 1,
        "profile": {"kernels": 120.0, "top15_share": 0.6, "idle_us": 300.0, "call_us": 2400.0,
                    "top": [{"name": "conv", "us": 100.0, "share": 0.1, "launches": 1}]},
        "variants": [
            {"variant": "aot", "end_to_end": {"p50_ms": 2.0, "p99_ms": 2.5}, "compile_s": 3.0,
             "ratio_vs_aot": 1.0},
            {"variant": "fused_input", "error": "ValueError: no"},
        ],
        "pipelined": [{"batch": 32, "one_call_frames_per_s": 5000.0,
                       "pipelined_frames_per_s": 7000.0,
                       "pipelined_pinned_frames_per_s": None}],
    }  # fmt: skip
    flagged = [
        {"variant": "command_buffer", "xla_flags": "--x", "end_to_end": {"p50_ms": 3.0}},
        {"variant": "autotune_level_0", "xla_flags": "--y", "error": "failed (exit 1)"},
    ]
    p = campaign.profile_summary(engine)
    assert (p["kernels"], p["top15_share"], p["idle_us"]) == (120.0, 0.6, 300.0)
    assert p["backbone"] == "resnet34"
    assert p["top"] == [{"name": "conv", "us": 100.0, "share": 0.1}]
    assert campaign.profile_summary({"profile": {"error": "x"}}) == {"error": "x"}
    assert campaign.profile_summary(None) is None
    rows = campaign.engine_variant_rows(engine, flagged)
    assert [set(r) for r in rows] == [VARIANT] * 4
    assert [r["variant"] for r in rows] == ["aot", "fused_input", "command_buffer",
                                            "autotune_level_0"]  # fmt: skip
    assert rows[1]["error"] == "ValueError: no" and rows[1]["p50_ms"] is None
    assert rows[2]["ratio_vs_aot"] == 1.5 and rows[2]["xla_flags"] == "--x"  # 3.0 / 2.0 ms
    assert rows[3]["ratio_vs_aot"] is None and rows[3]["error"] == "failed (exit 1)"
    (row,) = campaign.pipelined_rows(engine)
    assert set(row) == PIPELINED and row["pipelined_frames_per_s"] == 7000.0
    assert campaign.pipelined_rows(None) == [] and campaign.engine_variant_rows(None, []) == []


def test_per_point_recall_puts_cp_first_and_loader_rows():
    test = {"per_point": {"FE1": {"recall": 1.0}, "CM": {"recall": 0.99},
                          "CP": {"recall": 0.29}, "PT": {"recall": None}}}  # fmt: skip
    recall = campaign.per_point_recall(test)
    assert list(recall) == ["CP", "FE1", "CM", "PT"]  # CP, then the schema's order
    assert recall["CP"] == 0.29 and recall["PT"] is None
    assert campaign.per_point_recall(None) is None and campaign.per_point_recall({}) is None
    rows = campaign.loader_rows({"rows": [{"source": "tfds", "variant": "memory",
                                           "frames_per_s": 9000.0, "cpu_s": 1}]})  # fmt: skip
    assert rows == [{"source": "tfds", "variant": "memory", "frames_per_s": 9000.0}]


def test_training_variants_are_parsed():
    from experiments.benchmarks.training import parse_variant

    assert parse_variant("bfloat16:128") == {"dtype": "bfloat16", "batch_size": 128,
                                             "augment": True, "state_dtype": "float32"}  # fmt: skip
    v = parse_variant("float32:64:noaug:bf16_state")
    assert (v["augment"], v["state_dtype"], v["batch_size"]) == (False, "bfloat16", 64)
    for bad in ("float16:64", "bfloat16:x", "bfloat16:64:nhwc", "bfloat16"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def _fake_exec(calls, status_of):
    def run(cmd, limit_s, *, capture=None, env=None):
        calls.append((cmd, env))
        return status_of(cmd)

    return run


def test_a_latency_run_failing_with_its_torch_peers_runs_again_without_them(tmp_path):
    run = campaign.Campaign(campaign.gpu_plan(), tmp_path / "out", tmp_path / "work")
    run.work.mkdir(parents=True)
    calls, staged = [], {}

    def modes(cmd):
        return next(a for a in cmd if a.startswith("--torch_modes="))

    run._exec = _fake_exec(calls, lambda cmd: "ok" if modes(cmd) == "--torch_modes=" else
                           "failed (exit -11)")  # fmt: skip
    run._stage = lambda name, commands, limit: staged.update({name: commands})
    run._latency()
    assert len(staged["latency"]) == 3  # two runs, the plot; no ONNX Runtime run on the GPU
    assert staged["latency"][0](100.0) == "ok"
    assert [modes(cmd) for cmd, _ in calls] == [
        "--torch_modes=eager,reduce-overhead,max-autotune-no-cudagraphs",
        "--torch_modes=",
    ]
    assert all(env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"} for _, env in calls)
    assert "--torch_compile_budget_s=25" in calls[0][0] and "--dtypes=bfloat16" in calls[0][0]
    failure = json.loads((run.work / "peer_failure_resnet34_bfloat16.json").read_text())
    assert failure["error"] == "the run with torch peers: failed (exit -11)"
    calls.clear()
    run._exec = _fake_exec(calls, lambda cmd: "timeout")
    assert staged["latency"][1](100.0) == "timeout" and len(calls) == 1  # no rerun on timeout


def test_an_xla_flag_variant_that_fails_is_a_row_not_a_failed_stage(tmp_path):
    run = campaign.Campaign(campaign.gpu_plan(), tmp_path / "out", tmp_path / "work")
    run.work.mkdir(parents=True)
    calls = []
    run._exec = _fake_exec(calls, lambda cmd: "failed (exit 134)")
    name, flags = run.plan.engine_flags[0]
    assert run._flag_variant(name, flags)(60.0) == "ok"
    ((cmd, env),) = calls
    assert env["XLA_FLAGS"].endswith(flags) and "flag_variant(" in cmd[-1]
    row = json.loads((run.work / f"engine_flags_{name}.json").read_text())
    assert row == {"variant": name, "xla_flags": env["XLA_FLAGS"], "error": "failed (exit 134)"}
    (summary,) = campaign.engine_variant_rows(None, [row])
    assert summary["error"] == "failed (exit 134)" and summary["p50_ms"] is None
    run._exec = _fake_exec(calls, lambda cmd: "timeout")
    assert run._flag_variant("other", "--x")(60.0) == "timeout"  # the stage's limit: said so
