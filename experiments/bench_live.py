"""Live guidance under load: held-out simulated cines replayed at 15 and 30 frames/s.

    python experiments/bench_live.py --workdir=W --out=live.json --minutes=2 --rates=15,30
Simulates `--cases` held-out cases (seed `--seed`, one training never uses: the simulator draws
case c of a project from (seed, c)), writes each as a DICOM cine with its pixel spacing, and
replays them one after the other through `LiveSession` for `--minutes` per rate. Writes per
rate: processed_fps (frames processed / seconds replayed), dropped, age_ready_p50_ms and
age_ready_p99_ms (frame arrival -> readout ready), age_paint_p50_ms (null: no browser here;
`paint_ages_ms` is the hook a browser run fills), rss_mb (one value every 30 s) and, when the
simulator wrote its truth (`guidance_truth.jsonl`), the depth readouts scored against it.
"""

import itertools
import json
import pathlib
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
from absl import app, flags

from cardiac_core import dicom
from tavr_jax.data import simulate, supervisely
from tavr_jax.infer import guidance
from tavr_jax.infer.backends import open_engine
from tavr_jax.infer.live import LiveSession, read_records
from tavr_jax.schema import get_schema

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir")
_MODEL_FILE = flags.DEFINE_string("model_file", None, "exported .onnx or jax.export file")
_BACKEND = flags.DEFINE_enum("backend", "xla", ["xla", "onnxruntime"], "engine backend")
_OUT = flags.DEFINE_string("out", "live.json", "results JSON")
_MINUTES = flags.DEFINE_float("minutes", 1.0, "minutes of replay per rate")
_RATES = flags.DEFINE_list("rates", ["15", "30"], "replay rates, frames/s")
_CASES = flags.DEFINE_integer("cases", 4, "held-out simulated cases")
_FRAMES = flags.DEFINE_integer("frames", 60, "frames per case")
_SIZE = flags.DEFINE_integer("size", 512, "frame size, pixels")
_SEED = flags.DEFINE_integer("seed", 9001, "simulator seed (not one training used)")
_TARGET = flags.DEFINE_list("target_depth_mm", ["3", "6"], "LO,HI for range agreement")
_RSS_EVERY_S = 30.0


def held_out_cines(folder: pathlib.Path, cases: int, frames: int, size: int, seed: int):
    """Simulated cases as DICOM cines: [(path, [truth frame name per frame])], truth or None."""
    schema = get_schema("paper11")
    root = simulate.simulate_project(folder / "sim", schema, cases=cases, frames=frames,
                                     size=size, seed=seed, progress=False)  # fmt: skip
    project = supervisely.read_project(root, schema)
    by_case: dict[str, list] = {}
    for i, frame in enumerate(project.frames):
        by_case.setdefault(frame.case_id, []).append(i)
    cines = []
    for case, rows in sorted(by_case.items()):
        images = np.stack([project.load_image(i) for i in rows])
        spacing = project.frames[rows[0]].pixel_spacing_mm
        path = dicom.write_test_cine(folder / f"{case}.dcm", images,
                                     frame_time_ms=1000.0 / simulate.FPS,
                                     pixel_spacing=(spacing, spacing))  # fmt: skip
        names = [f"{case}/img/{project.frames[i].frame_name}" for i in rows]
        cines.append((path, names))
    truth_file = root / guidance.GUIDANCE_TRUTH_FILE
    truth = guidance.read_truth(truth_file) if truth_file.is_file() else None
    return cines, truth


def replay_at(engine, cines, rate: float, seconds: float, target, folder: pathlib.Path, truth):
    """Replays the cines in turn at `rate` for `seconds`; the figures of the README above."""
    process = psutil.Process()
    rss, done = [], threading.Event()

    def sample():  # one value at the start, then every 30 s
        while True:
            rss.append(round(process.memory_info().rss / 2**20, 1))
            if done.wait(_RSS_EVERY_S):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    records, processed, dropped, run_s = [], 0, 0, 0.0
    start = time.monotonic()
    for k, (path, names) in enumerate(itertools.cycle(cines)):
        left = seconds - (time.monotonic() - start)
        if left <= 0:
            break
        record = folder / f"rate{rate:g}_{k:04d}.jsonl"
        session = LiveSession(engine, str(path), replay_fps=rate, target_depth_mm=target,
                              record=record, max_seconds=left)  # fmt: skip
        session.start()
        session.wait()
        session.stop()
        stats = session.stats()
        if stats["status"].startswith("error"):
            raise RuntimeError(f"{path}: {stats['status']}")
        processed, dropped = processed + stats["processed"], dropped + stats["dropped"]
        # n frames span n - 1 intervals; each owns one, or short cines would read fast
        run_s += stats["run_s"] + 1.0 / rate
        for r in read_records(record):
            r["frame"] = names[r["frame"]]  # the truth's name of the frame
            records.append(r)
    done.set()
    sampler.join()
    rss.append(round(process.memory_info().rss / 2**20, 1))  # and at the end
    ages = np.array(
        [1000 * (r["ready_s"] - r["arrival_s"]) for r in records if "new_size" not in r]
    )
    result = {
        "rate_fps": rate,
        "seconds": round(run_s, 2),
        "processed": processed,
        "processed_fps": round(processed / max(run_s, 1e-9), 2),
        "dropped": dropped,
        "age_ready_p50_ms": round(float(np.percentile(ages, 50)), 2) if ages.size else None,
        "age_ready_p99_ms": round(float(np.percentile(ages, 99)), 2) if ages.size else None,
        "age_paint_p50_ms": None,  # hook: a browser run puts its paint ages in paint_ages_ms
        "paint_ages_ms": None,
        "rss_mb": rss,
    }
    if truth is not None:
        result["guidance"] = guidance.score_readouts(records, truth, target_depth_mm=target)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not (_WORKDIR.value or _MODEL_FILE.value):
        raise app.UsageError("--workdir or --model_file is required")
    try:
        target = tuple(float(v) for v in _TARGET.value)
        rates = [float(r) for r in _RATES.value]
        engine = open_engine(_WORKDIR.value, model_file=_MODEL_FILE.value, backend=_BACKEND.value)
        with tempfile.TemporaryDirectory(prefix="bench_live_") as tmp:
            folder = pathlib.Path(tmp)
            cines, truth = held_out_cines(folder, _CASES.value, _FRAMES.value, _SIZE.value,
                                          _SEED.value)  # fmt: skip
            results = {
                "workdir": _WORKDIR.value,
                "backend": _BACKEND.value,
                "cases": _CASES.value,
                "frames": _FRAMES.value,
                "size": _SIZE.value,
                "seed": _SEED.value,
                "rates": {},
            }
            for rate in rates:
                r = replay_at(engine, cines, rate, 60 * _MINUTES.value, target, folder, truth)
                results["rates"][f"{rate:g}"] = r
                print(
                    f"{rate:g} fps: {r['processed_fps']} processed/s, {r['dropped']} dropped, "
                    f"ready age p50 {r['age_ready_p50_ms']} ms p99 {r['age_ready_p99_ms']} ms"
                )
        pathlib.Path(_OUT.value).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {_OUT.value}")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
