"""Train the second-stage patch refiner and measure what it buys on held-out projects.

    python experiments/tavr_refine.py --workdir=W --data=FULLRES_PROJECT \
        --test=test1024=data/test1024,test512=data/test512 [--steps=2000] [--out=refine.json] \
        [--split=train] [--max_frames=1500]

Trains on the frames of --data (one frame size, at full resolution; 512 px frames put one
patch sample on one pixel; --split=train keeps to the first stage's training cases of the
same project, --max_frames reads a random subset), saves W/refiner/ (with --split=train
also the mean error before and after on at most 300 of the first stage's validation frames,
which loading it warns on when the refiner made it worse), then for each test
project runs the workdir's first stage and the refiner on its output and prints the
localisation error of the visible points at 1024 px before and after (all visible points,
and those reported at 0.5), with the refiner's time per frame beside the first stage's
(medians after warm-up, batch 1).
--cost=resnet18:128,resnet34:512 also times engines of those first stages (random weights)
with and without the refiner, in alternation on a 1024 x 1024 frame, with XLA's GFLOP.
"""

import dataclasses
import sys
import time

import jax
import numpy as np
from absl import app, flags

from cardiac_core.fileio import write_json_atomic
from cardiac_core.logs import quiet_third_party
from tavr_jax.data.supervisely import read_project
from tavr_jax.infer.engine import KeypointEngine
from tavr_jax.infer.evaluate import predict_project
from tavr_jax.models import refine
from tavr_jax.run import refiner as refiner_files
from tavr_jax.run.lock import WorkdirLocked, writing
from tavr_jax.run.workdir import data_split, read_config
from tavr_jax.training import refiner as refiner_training

_WORKDIR = flags.DEFINE_string("workdir", None, "first-stage training workdir", required=True)
_DATA = flags.DEFINE_string("data", None, "full-resolution Supervisely project to train on")
_TEST = flags.DEFINE_list("test", [], "NAME=PROJECT held-out projects to measure on")
_STEPS = flags.DEFINE_integer("steps", refiner_files.RefinerConfig.steps, "training steps")
_BATCH = flags.DEFINE_integer("batch", refiner_files.RefinerConfig.batch, "patches per step")
_JITTER = flags.DEFINE_float("jitter", refiner_files.RefinerConfig.jitter, "error SD, samples")
_SPLIT = flags.DEFINE_enum("split", "all", ["all", "train"], "cases of --data to train on")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 0, "train on at most this many frames (0: all)")
_COST = flags.DEFINE_list("cost", [], "BACKBONE:SIZE first stages to time with the refiner")
_OUT = flags.DEFINE_string("out", None, "results JSON")


def _errors_at_1024(pred, truth, width) -> np.ndarray:
    return np.linalg.norm(pred - truth, axis=-1) * (1024.0 / width)


def _summary(err: np.ndarray) -> dict:
    if err.size == 0:
        return {"n": 0}
    return {
        "n": int(err.size),
        "mean": float(err.mean()),
        "median": float(np.median(err)),
        "p90": float(np.percentile(err, 90)),
        "within_20": float((err <= 20).mean()),
    }


def _jit_refiner(model, params, config):
    return jax.jit(lambda f, c: refine.refine_points(model, params, f, c, size=config.patch))


def _median_ms(fn, *args, runs: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def measure(engine, refined, project) -> dict:
    """Errors at 1024 of the project's visible points before and after the refiner (all, and
    those the first stage reports at 0.5)."""
    pred = predict_project(engine, project)
    before, after, shown = [], [], []
    for i, rec in enumerate(project.frames):
        frame = project.load_image(i)[None]
        new = np.asarray(refined(frame, pred["coords"][i : i + 1]))[0]
        v = np.asarray(rec.visible, bool)
        before.append(_errors_at_1024(pred["coords"][i][v], rec.coords[v], rec.width))
        after.append(_errors_at_1024(new[v], rec.coords[v], rec.width))
        shown.append(pred["visibility"][i][v] >= 0.5)
    before, after, shown = map(np.concatenate, (before, after, shown))
    return {
        "before": _summary(before),
        "after": _summary(after),
        "before_reported": _summary(before[shown]),
        "after_reported": _summary(after[shown]),
    }


def _subset(project, n: int):
    """At most n frames of the project (a fixed random choice), in their order."""
    if n and len(project.frames) > n:
        keep = np.random.default_rng(0).choice(len(project.frames), n, replace=False)
        project.frames = [project.frames[i] for i in sorted(keep)]
    return project


def cost_rows(refiner, specs, *, runs: int = 9) -> list[dict]:
    """Engines of `specs` ("resnet34:512") with and without the refiner, timed in turns."""
    frame = np.random.default_rng(0).integers(0, 255, (1, 1024, 1024)).astype(np.uint8)
    rows = []
    for spec in specs:
        backbone, size = spec.split(":")
        plain = KeypointEngine.random_init("paper11", backbone, int(size), head="heatmap")
        both = KeypointEngine(plain.model, plain.variables, plain.meta, refiner=refiner)
        flops = [e.cost_analysis(1024, 1024).get("flops", 0.0) / 1e9 for e in (plain, both)]
        plain(frame), both(frame)  # compile and warm up
        times = np.zeros((runs, 2))
        for i in range(runs):
            for j, engine in enumerate((plain, both)):
                t = time.perf_counter()
                engine(frame)
                times[i, j] = time.perf_counter() - t
        row = {"first_stage": spec, "gflop": flops, "ms_p50": list(1000 * np.median(times, 0)),
               "paired_ratio": float(np.median(times[:, 1] / times[:, 0]))}  # fmt: skip
        print(
            f"{spec}: GFLOP {flops[0]:.2f} -> {flops[1]:.2f}, ms {row['ms_p50'][0]:.1f} -> "
            f"{row['ms_p50'][1]:.1f}, paired ratio {row['paired_ratio']:.3f}"
        )
        rows.append(row)
    return rows


def main(argv):
    quiet_third_party(flags.FLAGS["verbosity"])  # outside libraries: errors only
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    engine = KeypointEngine.from_workdir(_WORKDIR.value, batch_size=1)
    schema = engine.schema
    directory = f"{_WORKDIR.value}/refiner"
    result = {"workdir": _WORKDIR.value, "tests": {}}
    try:
        if _DATA.value:
            split = {} if _SPLIT.value == "all" else data_split(read_config(_WORKDIR.value))
            project = read_project(_DATA.value, schema, split=_SPLIT.value, **split)
            frames, vis, xy = refiner_training.project_arrays(_subset(project, _MAX_FRAMES.value))
            config = refiner_files.RefinerConfig(
                steps=_STEPS.value, batch=_BATCH.value, jitter=_JITTER.value
            )
            t = time.perf_counter()
            model, params, losses = refiner_training.train_refiner(frames, vis, xy, config)
            result["train"] = {
                "data": _DATA.value,
                "frames": len(frames),
                "wall_s": time.perf_counter() - t,
                "final_loss": float(np.mean(losses[-50:])),
                "config": dataclasses.asdict(config),
            }
            validation = None
            val = (
                read_project(_DATA.value, schema, split="validation", **split)
                if _SPLIT.value == "train"
                else None
            )
            if val is not None and val.frames:  # does it help this first stage?
                check = measure(engine, _jit_refiner(model, params, config), _subset(val, 300))
                result["validation"] = check
                validation = {"mean_error_before": check["before"]["mean"],
                              "mean_error_after": check["after"]["mean"]}  # fmt: skip
                verdict = (
                    "it helps"
                    if validation["mean_error_after"] < validation["mean_error_before"]
                    else "it does NOT help this first stage: leave --refine off"
                )
                print(
                    f"refiner on {check['before']['n']} visible points of validation cases: "
                    f"mean error at 1024 {validation['mean_error_before']:.1f} -> "
                    f"{validation['mean_error_after']:.1f} px; {verdict}"
                )
            with writing(_WORKDIR.value, what="refiner training"):  # one writer per workdir
                refiner_files.save_refiner(
                    directory, params, config, schema.point_names, validation=validation
                )
            wall = result["train"]["wall_s"]
            print(f"refiner: {len(frames)} frames, {wall:.0f} s -> {directory}")
        model, params, config = refiner_files.load_refiner(directory, schema.point_names)
        refined = _jit_refiner(model, params, config)
        for item in _TEST.value:
            name, _, path = item.partition("=")
            project = read_project(path, schema)
            row = measure(engine, refined, project)
            frame = project.load_image(0)[None]
            centre = np.full((1, schema.num_points, 2), frame.shape[1] / 2, np.float32)
            row.update(
                frame=f"{frame.shape[2]}x{frame.shape[1]}",
                first_stage_ms=_median_ms(engine, frame),
                refiner_ms=_median_ms(refined, frame, centre),  # the time is the same anywhere
            )
            result["tests"][name] = row
            b, a = row["before"], row["after"]
            print(
                f"{name} ({row['frame']}, {b['n']} visible points): error at 1024 mean "
                f"{b['mean']:.1f} -> {a['mean']:.1f} px, median {b['median']:.1f} -> "
                f"{a['median']:.1f}, p90 {b['p90']:.1f} -> {a['p90']:.1f}, within 20 px "
                f"{b['within_20']:.3f} -> {a['within_20']:.3f}; reported at 0.5: mean "
                f"{row['before_reported']['mean']:.1f} -> {row['after_reported']['mean']:.1f}; "
                f"time per frame: first stage {row['first_stage_ms']:.1f} ms, refiner "
                f"{row['refiner_ms']:.1f} ms"
            )
        if _COST.value:
            result["cost"] = cost_rows((model, params, config.patch), _COST.value)
    except (ValueError, OSError, WorkdirLocked) as e:  # a held workdir, disk full: one line
        sys.exit(f"error: {e}")
    if _OUT.value:
        write_json_atomic(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
