import json

import cv2
import numpy as np
import pytest

from perfusion import analyze, geometry, scores, simulate, studies

REPORT_KEYS = {
    "file", "label", "probabilities", "stress_scores", "rest_scores", "SSS", "SRS", "SDS",
    "TPD_stress", "TPD_rest", "extent_stress_pct", "defect_segments", "territories",
}  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small simulated folder (5 studies per label) and a model fitted on it at 32 px."""
    root = tmp_path_factory.mktemp("perfusion")
    data = root / "data"
    simulate.simulate_dataset(data, 15, seed=3, size=32, disk_px=64)
    model_dir = root / "model"
    meta = analyze.fit(data, model_dir, size=32)
    return data, model_dir, meta


def test_fit_writes_a_loadable_model(fitted):
    data, model_dir, meta = fitted
    assert {p.name for p in model_dir.iterdir()} >= {
        "model.json", "normal_limits.npz", "abnormal.joblib", "ischemia_vs_infarction.joblib"
    }  # fmt: skip
    model = analyze.load_model(model_dir)
    assert model.size == 32 and model.limits.size == 32
    assert model.config == scores.ScoreConfig.from_dict(meta["score_config"])
    # Masks were present, so k was tuned on the grid.
    assert 1.5 <= model.config.k <= 6.0 and "k_dice_train" in meta["fit"]
    assert meta["fit"]["label_counts"] == {"normal": 5, "ischemia": 5, "infarction": 5}


def test_analyze_path_report_overlays_and_consistency(fitted, tmp_path):
    data, model_dir, _ = fitted
    out = tmp_path / "report.json"
    report = analyze.analyze_path(
        model_dir, data, out, overlay_dir=tmp_path / "ov", metrics_out=tmp_path / "m.json"
    )
    assert json.loads(out.read_text()) == report
    rows = report["studies"]
    names = [r["filename"] for r in studies.read_labels(data / "labels.csv")]
    assert [r["file"] for r in rows] == names
    for r in rows:
        assert set(r) == REPORT_KEYS
        assert r["label"] in studies.LABELS
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        s, rest = np.array(r["stress_scores"]), np.array(r["rest_scores"])
        assert s.shape == rest.shape == (17,) and s.min() >= 0 and s.max() <= 4
        assert r["SSS"] == s.sum() and r["SRS"] == rest.sum()
        assert r["SDS"] == np.maximum(s - rest, 0).sum()
        assert 0 <= r["TPD_stress"] <= r["extent_stress_pct"] <= 100
        if r["label"] == "normal":
            assert r["defect_segments"] == [] and r["territories"] == []
        else:
            assert r["defect_segments"] == [int(q) + 1 for q in np.flatnonzero(s >= 1)]
            assert set(r["territories"]) <= set(geometry.TERRITORY_NAMES)
        png = cv2.imread(str(tmp_path / "ov" / r["file"]))
        assert png is not None and png.shape[1] > 2 * 64
    # The library entry point gives the same entry as the folder run.
    model = analyze.load_model(model_dir)
    study = studies.read_study_folder(data, size=32)[0]
    assert analyze.analyze_study(model, study) == rows[0]
    metrics = json.loads((tmp_path / "m.json").read_text())
    expected = json.loads(json.dumps(analyze.evaluate_report(report, data / "labels.csv")))
    assert {k: v for k, v in metrics.items() if k != "dice"} == expected
    assert 0.0 <= metrics["territory_exact_accuracy"] <= 1.0
    assert 0.0 < metrics["dice"]["normal_limits"]["pooled_stress"] <= 1.0
    # In-sample on 15 studies the classifier separates normal from abnormal.
    assert metrics["abnormal_accuracy"] >= 0.8


def test_clear_errors(fitted, tmp_path):
    _, model_dir, _ = fitted
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        analyze.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model.json"):
        analyze.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="input not found"):
        analyze.analyze_path(model_dir, tmp_path / "missing.png", tmp_path / "r.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        analyze.analyze_path(model_dir, tmp_path / "empty", tmp_path / "r.json")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        analyze.analyze_path(model_dir, bad, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_evaluate_report_by_hand(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "filename,label,territories,segments\n"
        "a.png,normal,,\n"
        "b.png,ischemia,LAD,1+2+7\n"
        "c.png,infarction,RCA+LCX,4+5\n"
    )

    def row(f, label, terr, segs):
        return {"file": f, "label": label, "territories": terr, "defect_segments": segs}

    report = {
        "studies": [
            row("a.png", "normal", [], []),
            row("b.png", "infarction", ["LAD"], [1, 2, 13]),  # 2 TP, 1 FP, 1 FN
            row("c.png", "infarction", ["RCA"], [4, 5]),  # 2 TP; LCX missed
        ]
    }
    m = analyze.evaluate_report(report, tmp_path / "labels.csv")
    assert m["label_accuracy"] == pytest.approx(2 / 3)
    assert m["abnormal_accuracy"] == 1.0
    assert m["ischemia_vs_infarction_accuracy"] == pytest.approx(0.5)
    assert m["territory_exact_accuracy"] == pytest.approx(2 / 3)
    assert m["territory_accuracy"] == {"LAD": 1.0, "LCX": pytest.approx(2 / 3), "RCA": 1.0}
    assert (m["segment"]["tp"], m["segment"]["fp"], m["segment"]["fn"]) == (4, 1, 1)
    assert m["segment"]["f1"] == pytest.approx(8 / 10)


def test_pooled_dice_and_score_features_by_hand():
    a = np.zeros((2, 3, 3), bool)
    b = np.zeros((2, 3, 3), bool)
    a[0, 0, :2] = True
    b[0, 0, 1:] = True
    b[1, 2, 2] = True
    assert analyze.pooled_dice(a, b) == pytest.approx(2 * 1 / 5)
    assert analyze.pooled_dice(a[:0], b[:0]) == 1.0
    out = {
        "sss": np.array([3]), "srs": np.array([1]), "sds": np.array([2]),
        "tpd": np.array([[4.0, 1.0]]), "extent_pct": np.array([[6.0, 2.0]]),
        "segment_z": np.array([[[3.0, -1.0] + [0.0] * 15, [1.0, 0.5] + [0.0] * 15]]),
        "territory_score": np.array([[3, 0, 1]]),
    }  # fmt: skip
    f = dict(zip(analyze.SCORE_FEATURES, analyze.score_feature_matrix(out)[0], strict=True))
    assert f["tpd_difference"] == 3.0 and f["z_sum_stress"] == 3.0 and f["z_sum_rest"] == 1.5
    assert f["z_rest_over_stress"] == pytest.approx(1.5 / 4.0)
    assert f["max_territory_score"] == 3


def test_overlay_draws_segment_grid():
    size = 64
    seg_rgb = np.full((size, size, 3), 100, np.uint8)
    study = studies.Study(
        "x", seg_rgb, seg_rgb, np.zeros((size, size)), np.zeros((size, size)),
        geometry.disk_mask(size),
    )  # fmt: skip
    blackout = np.zeros((2, size, size), bool)
    blackout[0, 2:6, 24:28] = True  # basal anterior, away from grid lines and numbers
    report = {
        "label": "ischemia", "SSS": 3, "SRS": 0, "SDS": 3, "TPD_stress": 2.0, "TPD_rest": 0.0,
        "territories": ["LAD"],
    }  # fmt: skip
    img = analyze.draw_overlay(study, report, blackout, scale=2)
    assert img.shape == (30 + 2 * size + 40, 2 * 2 * size + 10, 3)
    stress = img[30 : 30 + 2 * size, : 2 * size]
    # The apical ring circle (radius APICAL_RADIUS) crosses the vertical centre line here.
    row = int(round(size - geometry.APICAL_RADIUS * size))
    assert stress[row - 1 : row + 2, size - 1 : size + 1].max() > 200
    assert stress[8, 52].max() < 100  # inside the blackout: darkened from 100
    assert img[30 + 8, 2 * size + 10 + 52].max() == 100  # rest map: untouched there
