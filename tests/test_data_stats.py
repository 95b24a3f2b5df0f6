import json

import cv2
import numpy as np
import pytest

from tavr_jax.data import stats, supervisely
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")


def _frame(case, name, visible_names, size=(48, 64)):
    k = SCHEMA.num_points
    vis = np.zeros(k, bool)
    coords = np.zeros((k, 2), np.float32)
    for n in visible_names:
        i = SCHEMA.index(n)
        vis[i] = True
        coords[i] = (5 + 3 * i, 7 + 2 * i)
    image = np.full(size, 100, np.uint8)
    return supervisely.AnnotatedFrame(case, name, image, vis, coords, stage="aortogram")


def test_stats_count_a_known_project(tmp_path):
    anat = ["AA1", "AA2", "STJ1", "STJ2"]
    frames = [
        _frame("p1", "0000.png", anat + ["PT"]),
        _frame("p1", "0001.png", anat + ["PT"]),
        _frame("p1", "0002.png", ["CT", "CD", "PT"], size=(40, 40)),
        _frame("p2", "0000.png", []),
        _frame("p2", "0001.png", ["CP", "FE1"]),
    ]
    root = supervisely.write_project(tmp_path / "proj", SCHEMA, frames)
    # One point outside its image (dropped) and one unknown class (ignored), added by hand.
    ann_path = root / "p2" / "ann" / "0000.png.json"
    ann = json.loads(ann_path.read_text())
    point = lambda t, x, y: {  # noqa: E731
        "classTitle": t,
        "geometryType": "point",
        "points": {"exterior": [[x, y]], "interior": []},
    }
    ann["objects"] += [point("CT", 500.0, 3.0), point("EC1", 3.0, 3.0)]
    ann_path.write_text(json.dumps(ann))

    json_path, png_path = stats.write_stats(root, tmp_path / "out" / "stats.json", schema=SCHEMA)
    got = json.loads(json_path.read_text())
    assert got["n_cases"] == 2 and got["n_frames"] == 5 and got["cases"] == ["p1", "p2"]
    assert got["image_sizes"] == {"40x40": 1, "48x64": 4}
    expected_names = dict.fromkeys(SCHEMA.point_names, 0)
    for n in anat:
        expected_names[n] = 2
    expected_names.update(PT=3, CT=1, CD=1, CP=1, FE1=1)
    assert got["points_per_name"] == expected_names
    assert got["points_per_group"] == {"anatomical": 8, "instrumental": 3, "contour": 4}
    assert got["frames_per_pattern"] == {
        "anatomical+contour": 2,
        "instrumental+contour": 2,
        "none": 1,
    }
    assert got["dropped_points"] == 1 and got["ignored_points"] == 1
    assert got["frames_per_stage"] == {"aortogram": 5}
    sheet = cv2.imread(str(png_path))
    assert png_path == tmp_path / "out" / "stats.png"
    assert sheet is not None and sheet.shape[2] == 3 and sheet.shape[0] >= 48


def test_augmentation_erases_edge_points_but_not_entry_points(tmp_path):
    """AA1 on the bottom edge leaves the image whenever a zoom-in pushes it out; CP at the
    same place follows CM (in the centre, which never leaves) to the new edge instead."""
    k, h, w = SCHEMA.num_points, 48, 64
    vis = np.zeros(k, bool)
    coords = np.zeros((k, 2), np.float32)
    for name, xy in (("AA1", (33.0, 47.9)), ("CP", (31.0, 47.9)), ("CM", (32.0, 24.0))):
        vis[SCHEMA.index(name)] = True
        coords[SCHEMA.index(name)] = xy
    frame = supervisely.AnnotatedFrame("p1", "0000.png", np.zeros((h, w), np.uint8), vis, coords)
    project = supervisely.read_project(supervisely.write_project(tmp_path, SCHEMA, [frame]), SCHEMA)
    got = stats.augmentation_erasures(project, draws=64)
    assert got["on_image_edge_per_name"] == {
        **dict.fromkeys(SCHEMA.point_names, 0),
        "AA1": 1,
        "CP": 1,
    }
    erased = got["augmentation_erased_per_name"]
    assert 0.2 < erased["AA1"] < 0.8  # about the share of zoom-ins (and rotations that push it out)
    assert erased["CP"] == 0.0 and erased["CM"] == 0.0
    assert erased["AA2"] is None  # never visible


def test_sample_frames_cover_every_pattern(tmp_path):
    frames = [_frame("a", f"{i:04d}.png", ["PT"]) for i in range(6)]
    frames += [_frame("b", "0000.png", ["CT"]), _frame("c", "0000.png", [])]
    root = supervisely.write_project(tmp_path / "p", SCHEMA, frames)
    project = supervisely.read_project(root, SCHEMA)
    picked = stats.sample_frames(project, 3, seed=0)
    patterns = {stats.presence_pattern(project.frames[i].visible, SCHEMA) for i in picked}
    assert patterns == {"contour", "instrumental", "none"}
    assert len(stats.sample_frames(project, 100)) == len(frames)


def test_presence_pattern_names_groups_in_schema_order():
    vis = np.zeros(SCHEMA.num_points, bool)
    assert stats.presence_pattern(vis, SCHEMA) == "none"
    vis[SCHEMA.index("FE2")] = vis[SCHEMA.index("AA1")] = True
    assert stats.presence_pattern(vis, SCHEMA) == "anatomical+contour"


def test_empty_split_is_a_clear_error(tmp_path):
    root = supervisely.write_project(tmp_path / "p", SCHEMA, [_frame("a", "0000.png", ["PT"])])
    with pytest.raises(ValueError, match="no frames"):
        stats.write_stats(root, tmp_path / "s.json", schema=SCHEMA, split="val", seed=0)


def test_a_sheet_of_every_frame_stays_small_and_copies_are_listed(tmp_path):
    none, zeros = np.zeros(SCHEMA.num_points, bool), np.zeros((SCHEMA.num_points, 2), np.float32)
    frames = [
        supervisely.AnnotatedFrame(
            f"p{c}", f"{i:04d}.png", np.full((1024, 1024), 3 * i + c, np.uint8), none, zeros
        )
        for c in range(3) for i in range(23)
    ]  # fmt: skip
    frames.append(supervisely.AnnotatedFrame("p9", "0000.png", frames[0].image, none, zeros))
    root = supervisely.write_project(tmp_path / "proj", SCHEMA, frames)
    json_path, png_path = stats.write_stats(root, tmp_path / "s.json", schema=SCHEMA,
                                            sheet_frames=100_000)  # fmt: skip
    sheet = cv2.imread(str(png_path))
    side = stats.TILE_SIDE + 2
    assert sheet.shape[0] <= 8 * side and sheet.shape[1] <= 8 * side  # 64 tiles, 8 x 8
    got = json.loads(json_path.read_text())
    assert got["duplicate_frames"] == [["p0/0000.png", "p9/0000.png"]]
    with pytest.raises(ValueError, match="is a folder"):
        stats.write_stats(root, tmp_path, schema=SCHEMA)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with no pixel data: what a decompression
    bomb looks like to a reader, without allocating one here."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _bad_frames_project(tmp_path):
    """A project of 8 frames: 2 good, and one of each kind training refuses."""
    frames = [_frame("p1", f"{i:04d}.png", ["PT"]) for i in range(4)]
    frames += [_frame("p2", f"{i:04d}.png", ["PT"]) for i in range(4)]
    root = supervisely.write_project(tmp_path / "proj", SCHEMA, frames)
    img = lambda case, i: root / case / "img" / f"{i:04d}.png"  # noqa: E731
    good = img("p1", 0).read_bytes()
    img("p1", 1).write_bytes(b"")  # zero bytes
    img("p1", 2).write_bytes(good[: len(good) // 2])  # truncated
    img("p1", 3).write_text("not an image, a text file\n")
    img("p2", 0).write_bytes(_png_header_only(20000, 20000))
    ok, other = cv2.imencode(".png", np.zeros((30, 20), np.uint8))
    img("p2", 1).write_bytes(other.tobytes())  # 20x30, its annotation says 64x48
    img("p2", 2).unlink()
    img("p2", 2).mkdir()  # a folder where the image should be
    return root


def test_every_unreadable_frame_is_counted_with_its_reason(tmp_path):
    root = _bad_frames_project(tmp_path)
    json_path, png_path = stats.write_stats(
        root, tmp_path / "s.json", schema=SCHEMA, augment_draws=0
    )
    got = json.loads(json_path.read_text())
    assert got["n_frames"] == 8 and got["unreadable_frames"] == 6
    reasons = {e["frame"]: e["reason"] for e in got["unreadable_examples"]}
    assert len(reasons) == stats.SHOWN_UNREADABLE
    assert "empty file" in reasons["p1/0001.png"]
    assert "not a readable image" in reasons["p1/0002.png"]
    assert "not a readable image" in reasons["p1/0003.png"]
    assert "20000x20000" in reasons["p2/0000.png"] and "--max_pixels" in reasons["p2/0000.png"]
    assert "image is 20x30 but its annotation says 64x48" in reasons["p2/0001.png"]
    assert all("\n" not in r for r in reasons.values())
    everything = stats.unreadable_frames(supervisely.read_project(root, SCHEMA), shown=10)
    assert "is a folder" in everything["unreadable_examples"][-1]["reason"]
    assert everything["unreadable_indices"] == [1, 2, 3, 4, 5, 6]
    # the folder is skipped there, not an error; the two good frames are copies
    assert got["duplicate_frames"] == [["p1/0000.png", "p2/0003.png"]]
    assert png_path is not None and cv2.imread(str(png_path)) is not None  # good frames only


def test_data_stats_launcher_reports_bad_frames_and_fails_with_strict(tmp_path):
    import pathlib
    import subprocess
    import sys

    root = _bad_frames_project(tmp_path)
    launcher = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "data_stats.py"
    args = [sys.executable, str(launcher), f"--data={root}", f"--out={tmp_path / 's.json'}",
            "--augment_draws=0"]  # fmt: skip
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "UNREADABLE: 6 of 8 frames" in run.stdout and "0001.png: empty file" in run.stdout
    strict = subprocess.run([*args, "--strict"], capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1 and "UNREADABLE: 6 of 8" in strict.stdout
