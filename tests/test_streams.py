"""Frame sources (DICOM cines, video, images), windowing, outputs and the inference launcher."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cardiac_core import dicom, images
from tavr_jax.infer import outputs, streams
from tavr_jax.infer.engine import KeypointEngine
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cine16(n=4, h=24, w=32, seed=0):
    """12-bit stored values in 16-bit words, like a fluoroscopy export."""
    rng = np.random.default_rng(seed)
    return rng.integers(200, 3800, (n, h, w)).astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# Windowing


def test_window_matches_dicom_formula_by_hand():
    raw = np.array([[0, 1000, 1499, 1500, 1501, 2000, 4095]], np.uint16)
    c, w = 1500.0, 1001.0
    want = []
    for x in raw.ravel():  # PS3.3 C.11.2.1.2.1, linear VOI to 0..255
        if x <= c - 0.5 - (w - 1) / 2:
            want.append(0)
        elif x > c - 0.5 + (w - 1) / 2:
            want.append(255)
        else:
            want.append(round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255))
    np.testing.assert_array_equal(images.window_to_uint8(raw, center=c, width=w).ravel(), want)
    inv = images.window_to_uint8(raw, center=c, width=w, monochrome1=True)
    np.testing.assert_array_equal(inv.ravel(), 255 - np.array(want))


def test_percentile_window_is_not_truncation():
    frame = _cine16(1)[0]
    out = images.window_to_uint8(frame)
    lo, hi = np.percentile(frame.astype(np.float32), [1, 99])
    want = np.clip(np.rint((frame - lo) * 255 / (hi - lo)), 0, 255)
    np.testing.assert_array_equal(out, want)
    assert out.min() == 0 and out.max() == 255  # the full 8-bit range is used
    # Truncation (keeping the low byte) would scramble the order of values; windowing keeps it.
    order = np.argsort(frame.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)


# ----------------------------------------------------------------------------------------------
# DICOM cines


def test_multiframe_16bit_cine(tmp_path):
    raw = _cine16()
    path = dicom.write_test_cine(
        tmp_path / "cine.dcm", raw, bits_stored=12, frame_time_ms=66.7,
        imager_pixel_spacing=(0.3, 0.3), magnification=1.5, pixel_spacing=(0.9, 0.9),
    )  # fmt: skip
    src = streams.open_source(path)
    assert src.kind == "dicom" and len(src) == 4
    assert src.pixel_spacing_rc == pytest.approx((0.2, 0.2))  # imager spacing / magnification
    assert src.fps == pytest.approx(1000 / 66.7)
    frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    np.testing.assert_allclose([f.time_s for f in frames], np.arange(4) * 0.0667)
    for f, r in zip(frames, raw, strict=True):
        assert f.image.dtype == np.uint8 and f.image.shape == (24, 32)
        np.testing.assert_array_equal(f.image, images.window_to_uint8(r))
        assert f.pixel_spacing_mm == pytest.approx(0.2)


def test_window_tags_and_monochrome1(tmp_path):
    raw = _cine16(n=2)
    path = dicom.write_test_cine(
        tmp_path / "w.dcm", raw, bits_stored=12, window=(2000, 1000), photometric="MONOCHROME1"
    )
    got = list(streams.open_source(path))[1].image
    np.testing.assert_array_equal(
        got, images.window_to_uint8(raw[1], center=2000, width=1000, monochrome1=True)
    )


def test_dicom_errors_name_the_file(tmp_path):
    no_pixels = dicom.write_test_cine(tmp_path / "nopix.dcm", _cine16(1), with_pixel_data=False)
    with pytest.raises(ValueError, match=r"nopix\.dcm.*no pixel data"):
        streams.open_source(no_pixels)
    deep = dicom.write_test_cine(tmp_path / "deep.dcm", np.zeros((1, 4, 4), np.uint32))
    with pytest.raises(ValueError, match=r"deep\.dcm.*bit depth"):
        streams.open_source(deep)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match=r"junk\.dcm"):
        streams.open_source(junk)


# ----------------------------------------------------------------------------------------------
# Video and images


def _write_video(path, frames, fps=10.0):
    h, w = frames.shape[1:]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    writer.release()


def test_video_source(tmp_path):
    yy, xx = np.mgrid[:48, :64]
    frames = np.stack([((xx + 4 * i) * 3 % 256).astype(np.uint8) for i in range(5)])
    path = tmp_path / "clip.avi"
    _write_video(path, frames)
    src = streams.open_source(path)
    assert src.kind == "video" and src.fps == pytest.approx(10.0)
    got = list(src)
    assert len(got) == 5
    np.testing.assert_allclose([f.time_s for f in got], np.arange(5) / 10)
    for f, want in zip(got, frames, strict=True):
        assert f.image.shape == (48, 64) and f.image.dtype == np.uint8
        assert np.abs(f.image.astype(int) - want).mean() < 6  # MJPG is lossy


def test_unreadable_video_names_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_text("this is not a video")
    with pytest.raises(ValueError, match=r"broken\.mp4"):
        streams.open_source(bad)
    with pytest.raises(FileNotFoundError, match="missing"):
        streams.open_source(tmp_path / "missing.avi")


def test_folder_natural_order_and_16bit_png(tmp_path):
    for i in (10, 2, 1):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((32, 32), i, np.uint8))
    deep = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "f11.png"), deep)
    src = streams.open_source(tmp_path)
    assert [p.name for p in src.files] == ["f1.png", "f2.png", "f10.png", "f11.png"]
    frames = list(src)
    assert [int(f.image[0, 0]) for f in frames[:3]] == [1, 2, 10]
    np.testing.assert_array_equal(frames[3].image, images.window_to_uint8(deep))


def test_prefetch_reraises_decoder_errors():
    def bad():
        yield streams.Frame(0, None, np.zeros((4, 4), np.uint8), None)
        raise ValueError("frame 1 of bad.avi is corrupt")

    it = streams.prefetch_to_device(bad(), batch_size=1)
    frames, dev = next(it)
    assert dev.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="bad.avi"):
        next(it)


def test_batches_cut_at_size_changes():
    fr = [streams.Frame(i, None, np.zeros((4, 4 + (i >= 3)), np.uint8), None) for i in range(5)]
    sizes = [[f.index for f in b] for b in streams.batch_frames(fr, 2)]
    assert sizes == [[0, 1], [2], [3, 4]]


# ----------------------------------------------------------------------------------------------
# Outputs and the end-to-end run


def test_coco_export_visibility_flags():
    frame = streams.Frame(0, 0.0, np.zeros((10, 20), np.uint8), None)
    k = SCHEMA.num_points
    coords = np.arange(2 * k, dtype=float).reshape(k, 2)
    reported = np.arange(k) % 2 == 0
    rec = outputs.frame_record(
        frame, np.full(k, 0.7), np.full(3, 0.9), coords, reported, SCHEMA, spacing_rc=(0.5, 0.25)
    )
    assert rec["points"][1]["x_mm"] == pytest.approx(coords[1, 0] * 0.25)
    assert rec["points"][1]["y_mm"] == pytest.approx(coords[1, 1] * 0.5)
    coco = outputs.coco_keypoints([rec], SCHEMA)
    kp = np.array(coco["annotations"][0]["keypoints"]).reshape(k, 3)
    np.testing.assert_array_equal(kp[:, 2], np.where(reported, 2, 0))
    np.testing.assert_allclose(kp[reported, :2], coords[reported])
    assert (kp[~reported, :2] == 0).all()
    assert coco["annotations"][0]["num_keypoints"] == reported.sum()
    assert coco["categories"][0]["keypoints"] == list(SCHEMA.point_names)


def _tiny_workdir(tmp_path):
    """A real (random-weight) training workdir, as the training code writes it."""
    from tavr_jax.models import create_model
    from tavr_jax.run.checkpoint import CheckpointStore

    workdir = tmp_path / "W"
    workdir.mkdir()
    config = {"schema": "paper11", "backbone": "resnet_tiny", "image_size": 32}
    (workdir / "config.json").write_text(json.dumps(config))
    model = create_model(SCHEMA, backbone="resnet_tiny")
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32), jnp.uint8))
    store = CheckpointStore(workdir, async_save=False)
    store.save(1, {"params": variables["params"], "batch_stats": variables["batch_stats"]},
               force=True)  # fmt: skip
    store.close()
    return workdir


def test_infer_launcher_on_dicom_cine(tmp_path):
    workdir = _tiny_workdir(tmp_path)
    raw = _cine16(n=5, h=40, w=48)
    cine = dicom.write_test_cine(
        tmp_path / "cine.dcm",
        raw,
        bits_stored=12,
        frame_time_ms=50,
        imager_pixel_spacing=(0.3, 0.3),
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "experiments/tavr_infer.py", f"--workdir={workdir}", f"--input={cine}",
           f"--out={out}", "--overlay", "--track=oneeuro", "--expect=anatomical,contour",
           "--batch_size=2"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(5))
    assert lines[2]["time_s"] == pytest.approx(0.1)
    p = lines[0]["points"][0]
    assert {"name", "group", "visibility", "x", "y", "x_mm", "y_mm", "reported"} <= set(p)
    assert p["x_mm"] == pytest.approx(p["x"] * 0.3, abs=0.01)
    instrumental = [q for r in lines for q in r["points"] if q["group"] == "instrumental"]
    assert not any(q["reported"] for q in instrumental)  # gated out by --expect
    coco = json.loads((out / "coco_keypoints.json").read_text())
    assert len(coco["images"]) == 5
    cap = cv2.VideoCapture(str(out / "overlay.avi"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    cap.release()
    # A checkpoint of another backbone or schema is refused with an error naming both.
    with pytest.raises(ValueError, match=r"W.*resnet_tiny.*resnet34"):
        KeypointEngine.from_workdir(workdir, backbone="resnet34")
    with pytest.raises(ValueError, match=r"paper11.*reference10"):
        KeypointEngine.from_workdir(workdir, schema="reference10")


def test_run_inference_on_folder_and_video(tmp_path):
    engine = KeypointEngine.random_init("paper11", "resnet_tiny", 32, batch_size=2)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.png"), np.full((40, 40), 60 * i, np.uint8))
    res = outputs.run_inference(engine, folder, tmp_path / "o1", overlay=True, progress=False)
    assert res["frames"] == 3 and res["source"] == "folder"
    lines = [
        json.loads(x) for x in (tmp_path / "o1" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["file"] for r in lines] == ["img0.png", "img1.png", "img2.png"]
    assert "x_mm" not in lines[0]["points"][0]  # no spacing known for PNGs
    assert sorted(p.name for p in (tmp_path / "o1" / "overlay").iterdir()) == [
        "img0.png", "img1.png", "img2.png"
    ]  # fmt: skip
    video = tmp_path / "clip.avi"
    _write_video(video, np.zeros((4, 48, 64), np.uint8), fps=12.0)
    summary = outputs.run_inference(
        engine, video, tmp_path / "o2", overlay=True, track="kalman", progress=False
    )
    assert summary["frames"] == 4 and summary["source"] == "video"
    cap = cv2.VideoCapture(str(tmp_path / "o2" / "overlay.avi"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 64
    cap.release()
    assert not list((tmp_path / "o2").glob(".*tmp*"))  # atomic writes left no temporaries


def test_a_folder_keeps_its_good_frames_and_reports_the_bad_ones(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((40, 40), 10, np.uint8))
    (folder / "b.png").write_bytes(cv2.imencode(".png", np.zeros((40, 40), np.uint8))[1][:30])
    cv2.imwrite(str(folder / "c.png"), np.full((1, 1), 7, np.uint8))  # a 1x1 "frame"
    raw = np.random.default_rng(0).integers(0, 255, (3, 36, 36)).astype(np.uint8)
    dicom.write_test_cine(folder / "d.dcm", raw)  # multi-frame: all three frames count
    src = streams.open_source(folder)
    frames = list(src)
    assert [f.name for f in frames] == ["a.png", "d.dcm#0", "d.dcm#1", "d.dcm#2"]
    assert [f.index for f in frames] == [0, 1, 2, 3]
    np.testing.assert_array_equal(frames[2].image, raw[1])
    reasons = dict(src.skipped)
    assert set(reasons) == {"b.png", "c.png"}
    assert "not a readable image" in reasons["b.png"]
    assert "1x1, smaller than the 16 px minimum" in reasons["c.png"]
    with pytest.raises(ValueError, match="smaller than the 16 px minimum"):
        streams.open_source(folder / "c.png")  # a single tiny image is refused outright


def test_truncated_video_and_cine_keep_the_decodable_frames(tmp_path):
    frames = np.stack([np.full((48, 64), 15 * i, np.uint8) for i in range(16)])
    video = tmp_path / "clip.avi"
    _write_video(video, frames)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) * 4 // 5])  # the header survives, the tail is lost
    src = streams.open_source(video)
    got = list(src)
    assert 0 < len(got) < 16
    ((name, reason),) = src.skipped
    assert f"video ended after {len(got)} of the 16 frames" in reason and "clip.avi" in reason
    cine = dicom.write_test_cine(tmp_path / "cine.dcm", np.stack([frames[0]] * 6))
    data = cine.read_bytes()
    cine.write_bytes(data[: len(data) - 2 * 48 * 64 - 100])  # the last frames lose their pixels
    src = streams.open_source(cine)
    got = list(src)
    assert 0 < len(got) < 6 and len(got) + len(src.skipped) == 6
    assert all("cine.dcm" in reason for _, reason in src.skipped)


def test_run_inference_writes_the_good_frames_and_distinct_overlays(tmp_path):
    engine = KeypointEngine.random_init("paper11", "resnet_tiny", 32, batch_size=2)
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "c.jpg"), np.full((40, 40), 50, np.uint8))
    cv2.imwrite(str(folder / "c.png"), np.full((40, 40), 90, np.uint8))
    (folder / "z.png").write_bytes(b"broken")
    out = tmp_path / "out"
    res = outputs.run_inference(engine, folder, out, overlay=True, progress=False)
    assert res["frames"] == 2 and [n for n, _ in res["skipped"]] == ["z.png"]
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["file"] for r in lines] == ["c.jpg", "c.png"]
    assert sorted(p.name for p in (out / "overlay").iterdir()) == ["c.png", "c_png.png"]
    a, b = (cv2.imread(str(out / "overlay" / n)) for n in ("c.png", "c_png.png"))
    assert a.mean() != b.mean()  # both overlays survived
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        outputs.run_inference(engine, folder, tmp_path / "a_file", progress=False)
    # The launcher writes the good frames, lists what it skipped and exits non-zero.
    cmd = [sys.executable, "experiments/tavr_infer.py", f"--workdir={_tiny_workdir(tmp_path)}",
           f"--input={folder}", f"--out={tmp_path / 'cli'}"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 1 and "skipped z.png" in run.stderr
    assert "1 item(s) skipped, the others were written" in run.stderr
    assert len((tmp_path / "cli" / "predictions.jsonl").read_text().splitlines()) == 2


def test_a_lossy_12_bit_jpeg_cine_is_skipped_in_one_line_without_a_logged_traceback(
    tmp_path, caplog
):
    """pydicom logs each failed decoding plugin's traceback before raising; we say it once."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGExtended12Bit

    path = dicom.write_test_cine(tmp_path / "j12.dcm", _cine16(n=2, h=16, w=16), bits_stored=12)
    ds = pydicom.dcmread(path)
    jpeg = cv2.imencode(".jpg", np.full((16, 16), 100, np.uint8))[1].tobytes()
    ds.PixelData = encapsulate([jpeg, jpeg])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    ds.save_as(path, enforce_file_format=True)
    with caplog.at_level(logging.DEBUG):
        src = streams.open_source(path)
        frames = list(src)
    assert frames == [] and src.skipped
    for _, reason in src.skipped:
        assert "\n" not in reason and str(path) in reason and "cannot decode frame" in reason
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
