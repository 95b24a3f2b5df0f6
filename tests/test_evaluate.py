"""Evaluation of a workdir on a project: the engine's predictions against a direct forward."""

import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _workdirs import SCHEMA, tiny_workdir_and_project

from tavr_jax import metrics
from tavr_jax.data.supervisely import read_project, split_cases
from tavr_jax.infer import evaluate


def _direct_prediction(model, variables, images, size):
    """Resize + network by hand, coordinates scaled to each frame: the engine's contract."""
    x = jnp.stack(
        [jax.image.resize(jnp.asarray(im, jnp.float32), (size, size), "linear") for im in images]
    )
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    wh = np.array([[im.shape[1], im.shape[0]] for im in images], np.float64)
    return np.asarray(jax.nn.sigmoid(out["visibility_logits"])), np.asarray(out["coords"]) * wh[
        :, None
    ]


def test_evaluate_project_matches_direct_forward(tmp_path):
    workdir, data, model, variables, config = tiny_workdir_and_project(tmp_path)
    val_cases = split_cases([f"case{c}" for c in range(5)], seed=0, val_fraction=0.4,
                            test_fraction=0.0)["val"]  # fmt: skip
    overlays = tmp_path / "overlays"
    m = evaluate.evaluate_project(
        workdir, data, split="val", batch_size=3, overlays_dir=overlays, threshold=0.5
    )
    project = read_project(data, SCHEMA, split="val", seed=0, val_fraction=0.4)
    assert sorted(project.cases) == sorted(val_cases) and m["n_cases"] == len(val_cases)
    assert m["n_images"] == 2 * len(val_cases) and m["split"] == "val"
    images = [project.load_image(i) for i in range(len(project))]
    prob, xy = _direct_prediction(model, variables, images, 32)
    vis = np.stack([f.visible for f in project.frames])
    txy = np.stack([f.coords for f in project.frames])
    spacing = np.array([f.pixel_spacing_mm or 0 for f in project.frames])
    want = metrics.keypoint_metrics(prob, xy, vis, txy, SCHEMA, pixel_spacing_mm=spacing)
    for key in (*metrics.METRIC_KEYS, "mean_error_mm"):
        _assert_close_tol(m[key], want[key])
        _assert_close_tol(m["per_image_mean"][key], want["per_image_mean"][key])
    assert m["counts"] == want["counts"]
    assert m["counts"]["tp"] > 0 and m["mean_error_mm"] is not None  # the distances were compared
    pngs = sorted(overlays.glob("*.png"))
    assert len(pngs) == m["n_images"]
    first = project.frames[0]
    assert cv2.imread(str(pngs[0])).shape == (first.height, first.width, 3)

    # Tuned thresholds are written to the workdir and then used by default.
    tuned = evaluate.tune_project(workdir, data, batch_size=4)
    assert json.loads((workdir / "thresholds.json").read_text())["points"] == tuned["points"]
    m2 = evaluate.evaluate_project(workdir, data, split="val", batch_size=4)
    want = tuned["points"] if len(set(tuned["points"].values())) > 1 else tuned["points"]["AA1"]
    assert m2["threshold"] == want
    assert m["threshold"] == 0.5


def _assert_close_tol(got, want):
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_evaluate_project_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate.evaluate_project(tmp_path, tmp_path, split="val")


# ----------------------------------------------------------------------------------------------
# Table 1


def test_exported_files_are_scored_in_place_of_the_checkpoint(tmp_path):
    """tavr_eval --model_file: the ONNX file scores as its checkpoint; the int8 file is
    calibrated on the training cases only and scores nearly as its float network."""
    from _workdirs import TINY_CONFIG, write_tiny_checkpoint, write_tiny_project

    from tavr_jax.infer import backends, onnx_export

    data = write_tiny_project(tmp_path / "data", sizes=((48, 48),), cases=5)
    workdir = tmp_path / "w"
    write_tiny_checkpoint(workdir, TINY_CONFIG)
    kw = dict(split="all", threshold=0.5, batch_size=4)
    want = evaluate.evaluate_project(workdir, data, **kw)
    float_file, int8_file = tmp_path / "m.onnx", tmp_path / "m8.onnx"
    backends.export_workdir(workdir, float_file, frame_size=(48, 48))
    got = evaluate.evaluate_project(workdir, data, model_file=float_file, **kw)
    assert got["model_file"] == str(float_file) and want["model_file"] is None
    assert got["counts"] == want["counts"]
    _assert_close_tol(got["mean_error_px"], want["mean_error_px"])

    record = backends.export_workdir(workdir, int8_file, frame_size=(48, 48),
                                     int8_calibration=data, calibration_count=3)  # fmt: skip
    assert record["dtype"] == "int8"
    assert onnx_export.read_metadata(int8_file)["quantization"]["calibration_frames"] == 3
    train = read_project(data, SCHEMA, split="train", seed=0, val_fraction=0.4)
    frames = backends.calibration_frames(workdir, data, (48, 48), count=3)
    train_images = [train.load_image(i) for i in range(len(train))]
    assert all(any(np.array_equal(f, t) for t in train_images) for f in frames)
    got8 = evaluate.evaluate_project(workdir, data, model_file=int8_file, **kw)
    assert got8["n_images"] == want["n_images"]
    assert abs(got8["mean_error_px"] - want["mean_error_px"]) < 1.0
    with pytest.raises(ValueError, match="int8 quantisation is for the ONNX format only"):
        backends.export_workdir(workdir, tmp_path / "m.bin", format="jax", int8_calibration=data)
    with pytest.raises(ValueError, match="takes 48x48 frames, got 64x64"):
        evaluate.evaluate_project(
            workdir, write_tiny_project(tmp_path / "d64", sizes=((64, 64),)),
            model_file=float_file, **kw,
        )  # fmt: skip


def test_tuning_is_refused_at_once_while_another_run_holds_the_workdir(tmp_path):
    import subprocess
    import sys
    import textwrap

    from tavr_jax.run.lock import WorkdirLocked

    workdir, data, *_ = tiny_workdir_and_project(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from tavr_jax.run.lock import WorkdirLock
            with WorkdirLock({str(workdir)!r}):
                print("held", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLocked, match=f"PID {holder.pid}"):
            evaluate.tune_project(workdir, data, batch_size=3)
        assert not (workdir / "thresholds.json").exists()
    finally:
        holder.kill()
        holder.wait()
    evaluate.tune_project(workdir, data, batch_size=3)  # the killed holder's lock is taken over
    assert (workdir / "thresholds.json").is_file()
