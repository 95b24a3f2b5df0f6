"""Inference outputs: the Supervisely pre-annotation project reads back exactly."""

import json

import cv2
import numpy as np
import pytest

from cardiac_core.dicom import write_test_cine
from tavr_jax.data import supervisely
from tavr_jax.data.simulate import simulate_case
from tavr_jax.infer import streams
from tavr_jax.infer.engine import KeypointEngine
from tavr_jax.infer.outputs import (
    GROUP_TAG_PREFIX,
    VISIBILITY_TAG,
    SuperviselyPredictions,
    run_inference,
)
from tavr_jax.reporting import Gate
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")


@pytest.fixture(scope="module")
def engine():
    eng = KeypointEngine.random_init(SCHEMA, "resnet_tiny", 32, batch_size=2, seed=3)
    # Thresholds that report some points and not others, and a group gate, so that both
    # kinds reach the project: every point at or above 0.5 passes, the last group never does.
    eng.meta["thresholds"] = np.where(np.arange(SCHEMA.num_points) % 2 == 0, 0.0, 1.0)
    eng.meta["group_thresholds"] = np.array([0.0] * (SCHEMA.num_groups - 1) + [1.0])
    return eng


def _frames_folder(root, n=5, size=40):
    root.mkdir()
    case = simulate_case(np.random.default_rng(0), SCHEMA, frames=n, size=size)
    frames = [image for image, *_ in case]
    for i, image in enumerate(frames):
        cv2.imwrite(str(root / f"frame{i}.jpg" if i == 0 else root / f"frame{i}.png"), image)
    # The JPEG is lossy: what the engine sees is what was decoded.
    frames[0] = cv2.imread(str(root / "frame0.jpg"), cv2.IMREAD_GRAYSCALE)
    return frames


def test_supervisely_round_trip_is_exact(engine, tmp_path):
    frames = _frames_folder(tmp_path / "patient7")
    out = tmp_path / "project"
    # No tracking: the project must hold exactly the engine's coordinates.
    summary = run_inference(engine, tmp_path / "patient7", out, format="supervisely",
                            track="none", progress=False)  # fmt: skip
    assert summary["frames"] == 5 and summary["predictions"] == str(out)
    assert not (out / "predictions.jsonl").exists()

    want = engine(np.stack(frames))
    reported = Gate.from_meta(engine.meta, SCHEMA)(want["visibility"], want["group"])
    assert reported.any() and not reported.all()
    project = supervisely.read_project(out, SCHEMA)
    assert project.cases == ["patient7"]
    names = [f"frame{i}.png" for i in range(5)]  # frame0.jpg is written as frame0.png
    assert sorted(f.frame_name for f in project.frames) == names
    for i, record in enumerate(sorted(project.frames, key=lambda f: f.frame_name)):
        np.testing.assert_array_equal(record.visible, reported[i])
        np.testing.assert_array_equal(record.coords[reported[i]], want["coords"][i][reported[i]])
        np.testing.assert_array_equal(project.load_image(project.frames.index(record)), frames[i])
        ann = json.loads((out / "patient7" / "ann" / f"{record.frame_name}.json").read_text())
        for obj in ann["objects"]:
            (tag,) = obj["tags"]
            k = SCHEMA.index(obj["classTitle"])
            assert tag["name"] == VISIBILITY_TAG
            assert tag["value"] == pytest.approx(want["visibility"][i, k], abs=1e-5)
        groups = {t["name"]: t["value"] for t in ann["tags"]}
        for g, name in enumerate(SCHEMA.group_names):
            assert groups[GROUP_TAG_PREFIX + name] == pytest.approx(want["group"][i, g], abs=1e-5)
    assert sum(project.counts[k] for k in ("dropped_points", "duplicate_points")) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert {t["name"] for t in meta["tags"]} >= {VISIBILITY_TAG, GROUP_TAG_PREFIX + "contour"}


def test_supervisely_from_a_cine(engine, tmp_path):
    cine = tmp_path / "run3.dcm"
    case = simulate_case(np.random.default_rng(1), SCHEMA, frames=3, size=36)
    write_test_cine(cine, np.stack([image for image, *_ in case]), pixel_spacing=(0.3, 0.3))
    engine_all = KeypointEngine(engine.model, engine.variables,
                                {**engine.meta, "thresholds": 0.0, "group_thresholds": 0.0},
                                batch_size=2)  # fmt: skip
    run_inference(engine_all, cine, tmp_path / "p", format="supervisely", track="none",
                  progress=False)  # fmt: skip
    project = supervisely.read_project(tmp_path / "p", SCHEMA)
    assert project.cases == ["run3"] and len(project) == 3
    assert [f.frame_name for f in project.frames] == ["000000.png", "000001.png", "000002.png"]
    for record in project.frames:
        assert record.visible.all()  # none dropped by the reader
        assert record.pixel_spacing_mm == pytest.approx(0.3)


def test_points_on_or_past_the_border_are_clipped_into_the_frame(tmp_path):
    frame = streams.Frame(index=4, time_s=None, image=np.zeros((20, 30), np.uint8),
                          pixel_spacing_mm=None)  # fmt: skip
    coords = np.zeros((SCHEMA.num_points, 2), np.float32)
    coords[0], coords[1], coords[2] = (30.0, 20.0), (-2.0, 5.5), (31.5, -0.25)
    sink = SuperviselyPredictions(tmp_path, SCHEMA, "case")
    ones = np.ones(SCHEMA.num_points)
    sink.add(frame, None, ones, np.ones(SCHEMA.num_groups), coords, ones.astype(bool))
    sink.close()
    (record,) = supervisely.read_project(tmp_path, SCHEMA).frames
    assert record.frame_name == "000004.png" and record.visible.all()
    last_x, last_y = np.nextafter(np.float32(30), 0), np.nextafter(np.float32(20), 0)
    np.testing.assert_array_equal(
        record.coords[:3], np.array([[last_x, last_y], [0, 5.5], [last_x, 0]], np.float32)
    )


def test_unknown_format_is_refused(engine, tmp_path):
    with pytest.raises(ValueError, match="unknown output format 'csv'"):
        run_inference(engine, tmp_path, tmp_path / "o", format="csv")
