"""Web API: good and bad inputs through FastAPI's test client; the server survives them all."""

import _web
import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from cardiac_core.dicom import write_test_cine
from cardiac_web.app import Limits, create_app
from perfusion import analyze, studies
from tavr_jax import get_schema

SCHEMA = get_schema("paper11")


@pytest.fixture(scope="module")
def engine():
    return _web.tiny_engine()


@pytest.fixture(scope="module")
def perfusion_data(tmp_path_factory):
    return _web.fitted_perfusion(tmp_path_factory.mktemp("perfusion"))


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(tavr_engine=engine, limits=Limits(max_upload_mb=0.5)))


def test_perfusion_study_report_matches_library(perfusion_data):
    data, model = perfusion_data
    web = TestClient(create_app(perfusion_model=model))
    assert web.get("/api/status").json()["perfusion"]["loaded"]
    name = studies.read_labels(data / "labels.csv")[0]["filename"]
    png = (data / "images" / name).read_bytes()
    r = web.post("/api/perfusion/analyze", files={"study": ("anything.bin", png)})
    assert r.status_code == 200, r.text
    body = r.json()
    study = studies.read_study_image(data / "images" / name, size=model.size)
    expected = analyze.analyze_study(model, study)
    assert body["report"] == {**expected, "file": "upload"}
    for key in ("stress", "rest", "overlay"):
        assert body["images"][key].startswith("data:image/png;base64,")
    # Two separate files (stress, rest) are accepted too.
    image = cv2.imread(str(data / "images" / name))
    half = image.shape[1] // 2
    pair = {"stress": ("s.png", _png(image[:, :half])), "rest": ("r.png", _png(image[:, half:]))}
    r2 = web.post("/api/perfusion/analyze", files=pair)
    assert r2.status_code == 200, r2.text
    assert r2.json()["report"]["label"] in studies.LABELS
    # No disks, one disk, not an image: 4xx with the reason, and the server stays up.
    for files, status, message in [
        ({"study": ("a.png", _png(np.zeros((64, 128, 3), np.uint8)))}, 422, "no disk found"),
        ({"study": ("a.png", _png(image[:, :half]))}, 422, "one disk where 2"),
        ({"study": ("a.png", b"GIF89a not really")}, 415, "not a readable image"),
        ({"stress": ("a.png", png)}, 400, "missing form file 'rest'"),
    ]:
        bad = web.post("/api/perfusion/analyze", files=files)
        assert bad.status_code == status and message in bad.json()["error"], bad.text
        assert "/tmp" not in bad.json()["error"]
    assert web.get("/api/status").status_code == 200


def _png(image):
    return cv2.imencode(".png", image)[1].tobytes()


def test_page_and_status_say_which_model_is_missing(client):
    page = client.get("/")
    assert page.status_code == 200 and "cardiac-jax" in page.text
    assert "cdn" not in page.text.lower() and "http" not in page.text.split("<body")[1][:4000]
    status = client.get("/api/status").json()
    assert status["tavr"]["loaded"] and status["tavr"]["schema"]["name"] == "paper11"
    assert status["tavr"]["refiner"] is False  # an engine without the second stage
    assert not status["perfusion"]["loaded"]
    assert "--perfusion_model" in status["perfusion"]["error"]
    r = client.post("/api/perfusion/analyze", files={"study": ("s.png", _png(np.zeros((8, 8))))})
    assert r.status_code == 503 and "no perfusion model" in r.json()["error"]


def test_predict_frame_matches_engine_and_gating(client, engine):
    frame = np.random.default_rng(0).integers(0, 256, (48, 40), dtype=np.uint8)
    r = client.post("/api/tavr/predict", files={"media": ("x.bin", _png(frame))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "image" and body["n_frames"] == 1
    points = body["frames"][0]["points"]
    assert [p["name"] for p in points] == list(SCHEMA.point_names)
    ref = engine(frame[None])
    np.testing.assert_allclose([p["visibility"] for p in points], ref["visibility"][0], atol=1e-4)
    np.testing.assert_allclose([[p["x"], p["y"]] for p in points], ref["coords"][0], atol=0.01)
    assert body["frames"][0]["image"].startswith("data:image/jpeg;base64,")
    # Stage prior: nothing outside the expected group is ever reported.
    gated = client.get(f"/api/tavr/result/{body['result_id']}", params={"expect": "contour"})
    assert gated.status_code == 200
    for p in gated.json()["frames"][0]["points"]:
        assert not p["reported"] or p["group"] == "contour"
    assert "image" not in gated.json()["frames"][0]


def test_predict_dicom_cine_with_spacing(client, tmp_path):
    frames = np.random.default_rng(1).integers(0, 4096, (3, 32, 32), dtype=np.uint16)
    path = write_test_cine(tmp_path / "c.dcm", frames, pixel_spacing=(0.3, 0.3), frame_time_ms=66.7)
    r = client.post("/api/tavr/predict", files={"media": ("c.dcm", path.read_bytes())},
                    data={"expect": "anatomical,contour"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "dicom" and body["n_frames"] == 3
    assert body["frames"][1]["time_s"] == pytest.approx(0.0667, abs=1e-3)
    p = body["frames"][0]["points"][0]
    assert p["x_mm"] == pytest.approx(p["x"] * body["pixel_spacing_mm"], abs=1e-2)


@pytest.mark.parametrize(
    "files, data, status, message",
    [
        (
            {"media": ("a.png", b"this is not an image")},
            {},
            415,
            "not an image, a video or a DICOM",
        ),
        ({"media": ("a.png", b"")}, {}, 400, "empty upload"),
        ({"media": ("big.png", b"\0" * (600 * 1024))}, {}, 413, "larger than"),
        ({}, {}, 400, "missing form file"),
        ({"media": ("a.png", None)}, {"expect": "valve"}, 422, "unknown group"),
        ({"media": ("x.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64)}, {}, 422, "DICOM"),
    ],
)
def test_bad_requests_get_json_4xx_and_server_stays_up(client, files, data, status, message):
    if "media" in files and files["media"][1] is None:
        files = {"media": ("a.png", _png(np.zeros((32, 32), np.uint8)))}
    r = client.post("/api/tavr/predict", files=files, data=data)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert "/tmp" not in r.json()["error"]  # no server path leaks to the client
    assert client.get("/api/status").status_code == 200
    assert client.get("/api/tavr/result/../../etc/passwd").status_code == 404
