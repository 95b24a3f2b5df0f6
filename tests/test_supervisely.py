"""Supervisely reader and writer: exact round trips, splits by case, clear errors."""

import json

import cv2
import numpy as np
import pytest

from tavr_jax import get_schema
from tavr_jax.data import supervisely as sv
from tavr_jax.schema import KeypointSchema

SCHEMA = get_schema("paper11")


def _frames(rng, case_id, n, height=40, width=56):
    frames = []
    for i in range(n):
        vis = rng.random(SCHEMA.num_points) < 0.6
        xy = np.stack(
            [
                rng.uniform(0, width - 1, SCHEMA.num_points),
                rng.uniform(0, height - 1, SCHEMA.num_points),
            ],
            -1,
        )
        xy = np.where(vis[:, None], xy, 0).astype(np.float32)
        image = rng.integers(0, 256, (height, width), dtype=np.uint8)
        frames.append(sv.AnnotatedFrame(case_id, f"{i:04d}.png", image, vis, xy, stage="aortogram"))
    return frames


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    written = _frames(rng, "case_a", 3) + _frames(rng, "case_b", 2, height=64, width=48)
    sv.write_project(tmp_path, SCHEMA, written)
    project = sv.read_project(tmp_path, SCHEMA)
    assert project.cases == ["case_a", "case_b"]
    assert len(project) == 5
    for i, (rec, ref) in enumerate(zip(project.frames, written, strict=True)):
        assert (rec.case_id, rec.frame_name, rec.stage) == (
            ref.case_id,
            ref.frame_name,
            "aortogram",
        )
        assert (rec.height, rec.width) == ref.image.shape
        np.testing.assert_array_equal(rec.visible, ref.visible)
        np.testing.assert_array_equal(rec.coords, ref.coords)  # float32 survives JSON exactly
        np.testing.assert_array_equal(project.load_image(i), ref.image)
    assert project.counts["dropped_points"] == project.counts["ignored_points"] == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [c["title"] for c in meta["classes"]] == list(SCHEMA.point_names)


def _write_raw(root, case, name, ann, image=None):
    (root / case / "img").mkdir(parents=True, exist_ok=True)
    (root / case / "ann").mkdir(parents=True, exist_ok=True)
    if image is not None:
        cv2.imwrite(str(root / case / "img" / name), image)
    (root / case / "ann" / f"{name}.json").write_text(json.dumps(ann))


def _point(title, x, y):
    return {
        "classTitle": title,
        "geometryType": "point",
        "points": {"exterior": [[x, y]], "interior": []},
    }


def test_reader_counts_dropped_ignored_and_reads_size_and_colour(tmp_path):
    colour = np.zeros((30, 50, 3), np.uint8)
    colour[..., 2] = 200  # pure red in BGR -> gray 0.299 * 200
    ann = {
        "objects": [
            _point("AA1", 10.5, 20.25),
            _point("CT", 60, 5),
            _point("CM", -1, 3),
            _point("EC1", 3, 3),
            _point("AA1", 1, 1),
        ]
    }  # no "size": read from image
    _write_raw(tmp_path, "p1", "f.png", ann, colour)
    project = sv.read_project(tmp_path, SCHEMA)
    rec = project.frames[0]
    assert (rec.height, rec.width) == (30, 50)
    assert rec.visible.sum() == 1 and rec.visible[SCHEMA.index("AA1")]
    np.testing.assert_allclose(rec.coords[SCHEMA.index("AA1")], [10.5, 20.25])
    assert project.dropped_points == {"CT": 1, "CM": 1}  # x=60 >= width 50; x=-1 < 0
    assert project.ignored_points == {"EC1": 1}
    assert project.duplicate_points == {"AA1": 1}
    assert project.load_image(0)[0, 0] == round(0.299 * 200)


def test_reference_schema_ignores_cm(tmp_path):
    ref = get_schema("reference10")
    ann = {
        "size": {"height": 8, "width": 8},
        "objects": [_point("CM", 1, 1), _point("FE1_o", 2, 3)],
    }
    _write_raw(tmp_path, "p", "a.png", ann, np.zeros((8, 8), np.uint8))
    project = sv.read_project(tmp_path, ref)
    assert project.ignored_points == {"CM": 1}
    assert project.frames[0].visible[ref.index("FE1_o")]


@pytest.mark.parametrize(
    "ann, image, message",
    [
        ({"size": {"height": 8, "width": 8}}, True, 'no "objects"'),
        ({"objects": [{"classTitle": "AA1", "points": {"exterior": []}}]}, True, "malformed point"),
        ({"objects": []}, False, "is missing"),
        ({"objects": [7]}, True, r'"objects"\[0\] is int 7, not an object'),
        ({"objects": [], "size": {"height": 0, "width": 8}}, True, "size 8x0 is not positive"),
    ],
)
def test_bad_annotations_name_the_file(tmp_path, ann, image, message):
    _write_raw(tmp_path, "p", "a.png", ann, np.zeros((8, 8), np.uint8) if image else None)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        sv.read_project(tmp_path, SCHEMA)
    assert "a.png.json" in str(err.value)


def test_truncated_image_and_empty_project(tmp_path):
    with pytest.raises(ValueError, match="empty project"):
        sv.read_project(tmp_path, SCHEMA)
    _write_raw(
        tmp_path,
        "p",
        "a.png",
        {"size": {"height": 64, "width": 64}, "objects": []},
        np.full((64, 64), 7, np.uint8),
    )
    path = tmp_path / "p" / "img" / "a.png"
    path.write_bytes(path.read_bytes()[:40])
    project = sv.read_project(tmp_path, SCHEMA)
    with pytest.raises(ValueError, match=r"a\.png: not a readable image"):
        project.load_image(0)


def test_splits_are_by_case_deterministic_and_disjoint(tmp_path):
    cases = [f"patient{i:02d}" for i in range(20)]
    s1 = sv.split_cases(cases, seed=3, val_fraction=0.2, test_fraction=0.1)
    assert s1 == sv.split_cases(list(reversed(cases)), seed=3, val_fraction=0.2, test_fraction=0.1)
    assert (len(s1["train"]), len(s1["val"]), len(s1["test"])) == (14, 4, 2)
    assert sorted(s1["train"] + s1["val"] + s1["test"]) == cases
    assert s1 != sv.split_cases(cases, seed=4, val_fraction=0.2, test_fraction=0.1)
    assert sv.split_cases(cases[:2], seed=0, val_fraction=0.2)["val"] != []

    rng = np.random.default_rng(1)
    sv.write_project(tmp_path, SCHEMA, [f for c in cases[:5] for f in _frames(rng, c, 2, 8, 8)])
    train = sv.read_project(tmp_path, SCHEMA, split="train", seed=0)
    val = sv.read_project(tmp_path, SCHEMA, split="validation", seed=0)
    assert set(train.cases).isdisjoint(val.cases) and len(train) + len(val) == 10
    with pytest.raises(ValueError, match="unknown split"):
        sv.read_project(tmp_path, SCHEMA, split="dev")


def test_schema_properties():
    assert SCHEMA.num_points == 11 and SCHEMA.num_groups == 3
    perm = SCHEMA.flip_permutation
    assert perm[SCHEMA.index("AA1")] == SCHEMA.index("AA2")
    assert perm[SCHEMA.index("CT")] == SCHEMA.index("CT")
    np.testing.assert_array_equal(perm[perm], np.arange(11))
    vis = np.zeros(11, bool)
    vis[SCHEMA.index("PT")] = True
    np.testing.assert_array_equal(SCHEMA.group_presence(vis), [False, False, True])
    index, valid = SCHEMA.padded_index
    assert index.shape == (3, 4) and valid.sum() == 11
    ref = get_schema("reference10")
    assert ref.num_points == 10 and ref.ignore == ("CM",)
    assert ref.flip_permutation[ref.index("FE1_o")] == ref.index("FE2_o")
    with pytest.raises(ValueError, match="unknown keypoint schema"):
        get_schema("nope")
    # entry points: CP follows CM when a zoom pushes it out; a JSON round trip keeps them
    partner = SCHEMA.entry_partner
    assert partner[SCHEMA.index("CP")] == SCHEMA.index("CM") and (partner >= 0).sum() == 1
    assert KeypointSchema.from_json(SCHEMA.to_json()) == SCHEMA
    assert "entry_points" not in ref.to_json() and (ref.entry_partner == -1).all()
    bad = {**SCHEMA.to_json(), "entry_points": [["CP", "XX"]]}
    with pytest.raises(ValueError, match="entry point"):
        KeypointSchema.from_json(bad)
    with pytest.raises(ValueError, match=r"\['CP'\] is not a pair"):
        KeypointSchema.from_json({**SCHEMA.to_json(), "entry_points": [["CP"]]})


def test_16bit_frames_are_windowed_like_inference_inputs(tmp_path):
    from cardiac_core.images import window_to_uint8

    frame = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)  # 12-bit range
    _write_raw(tmp_path, "p", "a.png", {"objects": []}, frame)
    got = sv.read_project(tmp_path, SCHEMA).load_image(0)
    np.testing.assert_array_equal(got, window_to_uint8(frame))
    assert got.max() == 255 and got.min() == 0  # stretched, not the high byte (max 15)


def test_unusable_pixel_spacing_tags_cost_a_warning_not_the_file(tmp_path, caplog):
    image = np.zeros((8, 8), np.uint8)
    for name, value in [("a.png", "0.3 mm"), ("b.png", "abc"), ("c.png", [0.2, 0.25]),
                        ("d.png", "0.4"), ("e.png", -1)]:  # fmt: skip
        ann = {"objects": [], "tags": [{"name": "pixel_spacing_mm", "value": value}]}
        _write_raw(tmp_path, "p", name, ann, image)
    project = sv.read_project(tmp_path, SCHEMA)
    spacing = {f.frame_name: f.pixel_spacing_mm for f in project.frames}
    assert spacing == {"a.png": None, "b.png": None, "c.png": 0.25, "d.png": 0.4, "e.png": None}
    warned = [r.getMessage() for r in caplog.records if "pixel_spacing_mm" in r.getMessage()]
    assert len(warned) == 3 and any("a.png.json" in w and "0.3 mm" in w for w in warned)


def test_unannotated_cases_are_reported_and_copied_cases_found(tmp_path, caplog):
    rng = np.random.default_rng(2)
    frames = _frames(rng, "case_a", 2, 8, 8) + _frames(rng, "case_b", 1, 8, 8)
    sv.write_project(tmp_path, SCHEMA, frames)
    copy = [sv.AnnotatedFrame("case_a_copy", f.frame_name, f.image, f.visible, f.coords)
            for f in frames[:2]]  # fmt: skip
    sv.write_project(tmp_path, SCHEMA, copy)
    (tmp_path / "no_ann" / "img").mkdir(parents=True)
    project = sv.read_project(tmp_path, SCHEMA)
    assert project.unannotated_cases == ["no_ann"] and project.counts["unannotated_cases"] == 1
    assert any("no_ann" in r.getMessage() for r in caplog.records)
    assert sv.duplicate_frames(project) == [
        ["case_a/0000.png", "case_a_copy/0000.png"],
        ["case_a/0001.png", "case_a_copy/0001.png"],
    ]
