"""The GPU campaign script: its summary pieces, and its CPU smoke run end to end."""

import datetime
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from experiments.benchmarks import campaign

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP_LEVEL = {"device", "jax", "date", "latency", "train_throughput", "training", "features",
             "live"}  # fmt: skip
LIVE = {"rate_fps", "processed_fps", "dropped", "age_ready_p50_ms", "age_ready_p99_ms",
        "frame_size", "depth_mae_mm", "range_agreement", "depth_mae_mm_carried"}  # fmt: skip
LATENCY = {"backbone", "image_size", "batch", "dtype", "end_to_end_p50_ms", "end_to_end_p99_ms",
           "frames_per_s"}  # fmt: skip
THROUGHPUT = {"backbone", "image_size", "batch", "dtype", "images_per_s", "mfu"}
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
    proc = subprocess.run(
        ["bash", "experiments/gpu_campaign.sh", "--smoke", "--fail_stage=train_throughput"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = (out / "campaign.log").read_text()
    assert proc.returncode == 1, log[-3000:]  # a stage failed: the campaign says so
    stages = _load(out, "stages.json")["stages"]
    assert list(stages) == list(campaign.STAGES)
    assert stages["train_throughput"]["status"] == "failed (exit 1)"
    others = {name: s["status"] for name, s in stages.items() if name != "train_throughput"}
    assert set(others.values()) == {"ok"}, others
    assert "injected failure" in log
    # Every stage's results exist, none of the failed one's, and at most 8 files come back.
    files = {p.name for p in out.iterdir()}
    assert {"campaign.json", "campaign.log", "stages.json", "latency.json", "latency.png",
            "training.json", "perfusion.json"} == files  # fmt: skip
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
    assert c["train_throughput"] == []  # the failed stage
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
    # their own limits: 540 - (60 + 60 + 60 + 45 + 30) = 285 s for preflight to throughput.
    assert run.protected_s() == 255 and plan.budget_s - run.protected_s() == 285
    assert plan.limits["preflight"] + plan.limits["simulate"] < 285
    run.work.mkdir()
    assert run._train_dtype() == "bfloat16"  # the paper-scale recipe
    assert run._steps_in(100.0, "bfloat16") is None  # nothing measured: the config's num_steps
    rows = [{"backbone": "resnet34", "dtype": "bfloat16", "images_per_s": 9000.0,
             "images_per_s_pipeline": 4000.0, "compile_s": 40.0},
            {"backbone": "resnet34", "dtype": "float32", "images_per_s": 3000.0}]  # fmt: skip
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
    assert limit == pytest.approx(run.left() - 30, abs=1)  # all but the perfusion stage's
    commands, _, _ = _training_stage(campaign.smoke_plan(), tmp_path / "smoke")
    assert len(commands) == 5  # the smoke run still covers the refiner and its evaluation
