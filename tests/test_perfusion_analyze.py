import json
import pathlib
import pickle
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from perfusion import analyze, evaluation, geometry, reliability, scores, simulate, studies

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPORT_KEYS = {
    "file",
    "label",
    "probabilities",
    "uncertain",
    "uncertain_reason",
    "stress_scores",
    "rest_scores",
    "SSS",
    "SRS",
    "SDS",
    "TPD_stress",
    "TPD_rest",
    "extent_stress_pct",
    "defect_segments",
    "territories",
    "decision",  # the abnormal call at the model's operating point
    "territory_probabilities",
    "masked_fraction",  # of a disk drawn over in the image and filled
}


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
    assert {p.name for p in model_dir.iterdir()} == {
        "manifest.json",  # each file's role and checksum, written last
        "model.json",
        "normal_limits.npz",
        "abnormal.npz",
        "ischemia_vs_infarction.npz",
        "segments.npz",
    }
    for p in model_dir.glob("*.npz"):  # plain arrays: loading them runs no code
        with np.load(p, allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)
    model = analyze.load_model(model_dir)
    assert model.size == 32 and model.limits.size == 32
    assert model.config == scores.ScoreConfig.from_dict(meta["score_config"])
    # Masks were present, so k was tuned on the grid.
    assert 1.5 <= model.config.k <= 6.0 and "k_dice_train" in meta["fit"]
    assert meta["fit"]["label_counts"] == {"normal": 5, "ischemia": 5, "infarction": 5}
    assert model.uncertain_band == (0.25, 0.75) and 0.0 < model.segment_threshold < 1.0
    for task in analyze.TASK_MODELS:
        a, b = model.calibration[task]
        assert a > 0  # calibration keeps the order of the probabilities
    # The reversal features go to ischemia vs infarction only.
    names = meta["task_features"]
    assert names["ischemia_vs_infarction"] == meta["features"]
    assert names["abnormal"] == [n for n in meta["features"] if not n.startswith("reversal_")]
    assert len(meta["features"]) - len(names["abnormal"]) == len(scores.REVERSAL_FEATURES)


def test_analyze_path_report_overlays_and_consistency(fitted, tmp_path):
    data, model_dir, meta = fitted
    threshold = meta["operating_point"]["threshold"]
    abnormal_band = reliability.band_around(threshold, (0.25, 0.75))
    out = tmp_path / "report.json"
    report = analyze.analyze_path(
        model_dir, data, out, overlay_dir=tmp_path / "ov", metrics_out=tmp_path / "m.json"
    )
    assert json.loads(out.read_text()) == report
    assert report["skipped"] == []
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
        else:  # territories are those of the defect segments
            assert r["territories"] == geometry.segments_to_territories(r["defect_segments"])
        p_abn = 1 - r["probabilities"]["normal"]
        p_inf = r["probabilities"]["infarction"] / p_abn
        # the call is the operating point's, the kind of abnormality the likelier one
        assert r["decision"] == {
            "abnormal": p_abn >= threshold - 1e-6,
            "abnormal_probability": pytest.approx(p_abn, abs=1e-5),
            "threshold": pytest.approx(threshold, abs=1e-6),
            "operating_point": "sensitivity:0.95",
        }
        want = "normal" if p_abn < threshold else ("infarction" if p_inf > 0.5 else "ischemia")
        assert r["label"] == want
        # the abstention band lies around the threshold; the ischemia one around 0.5
        in_abnormal_band = abnormal_band[0] <= p_abn <= abnormal_band[1]
        in_band = in_abnormal_band or (r["label"] != "normal" and 0.25 <= p_inf <= 0.75)
        assert r["uncertain"] == in_band == (r["uncertain_reason"] is not None)
        if in_abnormal_band:
            low, high = abnormal_band
            assert f"within the abstention band {low:.2f}-{high:.2f}" in r["uncertain_reason"]
        # a territory is reported when its most probable segment reaches the threshold
        terr_p = r["territory_probabilities"]
        if r["label"] != "normal":
            called = [t for t, v in terr_p.items() if v >= meta["segment_threshold"]]
            assert called == r["territories"]
        png = cv2.imread(str(tmp_path / "ov" / r["file"]))
        assert png is not None and png.shape[1] > 2 * 64
    # The library entry point gives the same entry as the folder run.
    model = analyze.load_model(model_dir)
    study = studies.read_study_folder(data, size=32)[0]
    assert analyze.analyze_study(model, study) == rows[0]
    metrics = json.loads((tmp_path / "m.json").read_text())
    expected = json.loads(json.dumps(evaluation.evaluate_report(report, data / "labels.csv")))
    assert {k: v for k, v in metrics.items() if k != "dice"} == expected
    assert metrics["skipped"] == 0 and metrics["calibration"]["abnormal"]["n"] == 15
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

    def row(f, label, terr, segs, p_abnormal, p_infarction, tpd, terr_p, uncertain=False):
        probabilities = {
            "normal": 1 - p_abnormal,
            "ischemia": p_abnormal * (1 - p_infarction),
            "infarction": p_abnormal * p_infarction,
        }
        return {
            "file": f,
            "label": label,
            "territories": terr,
            "defect_segments": segs,
            "probabilities": probabilities,
            "uncertain": uncertain,
            "TPD_stress": tpd,
            "stress_scores": [0] * 17,
            "territory_probabilities": dict(zip(("LAD", "LCX", "RCA"), terr_p, strict=True)),
        }

    report = {
        "studies": [
            row("a.png", "normal", [], [], 0.1, 0.5, 1.0, (0.2, 0.1, 0.3)),
            # 2 TP, 1 FP, 1 FN
            row("b.png", "infarction", ["LAD"], [1, 2, 13], 0.8, 0.7, 5.0, (0.9, 0.3, 0.1), True),
            # 2 TP; LCX missed
            row("c.png", "infarction", ["RCA"], [4, 5], 0.6, 0.9, 0.5, (0.2, 0.3, 0.8)),
        ],
        "skipped": [{"file": "d.png", "reason": "unreadable"}],
    }
    m = evaluation.evaluate_report(report, tmp_path / "labels.csv")
    assert m["label_accuracy"] == pytest.approx(2 / 3)
    assert m["abnormal_accuracy"] == m["sensitivity"] == m["specificity"] == 1.0
    roc = m["roc_auc"]
    assert roc["patient"]["value"] == 1.0  # 0.8 and 0.6 above the normal study's 0.1
    assert roc["patient_tpd"]["value"] == 0.5  # TPD 5.0 above 1.0, 0.5 below
    vessel = {k: v["value"] for k, v in roc["vessel"].items()}
    # LCX: c's 0.3 above a's 0.1, tied with b's 0.3 (counts half); pooled: 0.9 and 0.8 above
    # all six negatives, 0.3 above four and tied with two
    assert vessel == {"LAD": 1.0, "LCX": 0.75, "RCA": 1.0, "pooled": pytest.approx(17 / 18)}
    assert roc["vessel"]["pooled"]["n_positive"] == 3 and roc["vessel"]["pooled"]["n"] == 9
    assert roc["vessel_sss"]["LAD"]["value"] == 0.5  # all stress scores 0: all tied
    assert m["ischemia_vs_infarction_accuracy"] == pytest.approx(0.5)
    assert m["territory_exact_accuracy"] == pytest.approx(2 / 3)
    assert m["territory_accuracy"] == {"LAD": 1.0, "LCX": pytest.approx(2 / 3), "RCA": 1.0}
    assert (m["segment"]["tp"], m["segment"]["fp"], m["segment"]["fn"]) == (4, 1, 1)
    assert m["segment"]["f1"] == pytest.approx(8 / 10)
    assert m["ci95"]["abnormal_accuracy"] == [1.0, 1.0]  # right on every study
    for key, value in (("label_accuracy", 2 / 3), ("segment_f1", 0.8)):
        lo, hi = m["ci95"][key]
        assert 0.0 <= lo <= value <= hi <= 1.0
    assert m["skipped"] == 1 and m["uncertain_rate"] == pytest.approx(1 / 3)
    assert m["certain"] == {"label_accuracy": 1.0, "abnormal_accuracy": 1.0}
    cal = m["calibration"]
    assert cal["abnormal"]["brier"] == pytest.approx((0.1**2 + 0.2**2 + 0.4**2) / 3)
    assert cal["ischemia_vs_infarction"]["n"] == 2  # the truly abnormal studies b and c
    assert cal["ischemia_vs_infarction"]["brier"] == pytest.approx((0.7**2 + 0.1**2) / 2)

    from experiments.studies import perfusion_figures

    perfusion_figures.plot_calibration({"a": m, "b": m}, tmp_path / "cal.png", title="t")
    assert (tmp_path / "cal.png").stat().st_size > 1000


def test_pooled_dice_by_hand():
    a = np.zeros((2, 3, 3), bool)
    b = np.zeros((2, 3, 3), bool)
    a[0, 0, :2] = True
    b[0, 0, 1:] = True
    b[1, 2, 2] = True
    assert evaluation.pooled_dice(a, b) == pytest.approx(2 * 1 / 5)
    assert evaluation.pooled_dice(a[:0], b[:0]) == 1.0


def test_overlay_draws_segment_grid():
    size = 64
    seg_rgb = np.full((size, size, 3), 100, np.uint8)
    study = studies.Study(
        "x",
        seg_rgb,
        seg_rgb,
        np.zeros((size, size)),
        np.zeros((size, size)),
        geometry.disk_mask(size),
    )
    blackout = np.zeros((2, size, size), bool)
    blackout[0, 2:6, 24:28] = True  # basal anterior, away from grid lines and numbers
    report = {
        "label": "ischemia",
        "SSS": 3,
        "SRS": 0,
        "SDS": 3,
        "TPD_stress": 2.0,
        "TPD_rest": 0.0,
        "territories": ["LAD"],
    }
    img = analyze.draw_overlay(study, report, blackout, scale=2)
    assert img.shape == (30 + 2 * size + 40, 2 * 2 * size + 10, 3)
    stress = img[30 : 30 + 2 * size, : 2 * size]
    # The apical ring circle (radius APICAL_RADIUS) crosses the vertical centre line here.
    row = int(round(size - geometry.APICAL_RADIUS * size))
    assert stress[row - 1 : row + 2, size - 1 : size + 1].max() > 200
    assert stress[8, 52].max() < 100  # inside the blackout: darkened from 100
    assert img[30 + 8, 2 * size + 10 + 52].max() == 100  # rest map: untouched there


def test_folder_with_bad_files_writes_the_good_ones(fitted, tmp_path, monkeypatch):
    data, model_dir, _ = fitted
    names = [r["filename"] for r in studies.read_labels(data / "labels.csv")]
    folder = tmp_path / "in"
    folder.mkdir()
    good = (data / "images" / names[0]).read_bytes()
    (folder / "a.png").write_bytes(good)
    image = cv2.imread(str(data / "images" / names[1]))
    cv2.imwrite(str(folder / "c.png"), image)
    cv2.imwrite(str(folder / "c.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    (folder / "broken.png").write_bytes(good[: len(good) // 3])
    cv2.imwrite(str(folder / "grey.png"), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    (folder / "lone_stress.png").write_bytes(good)
    (folder / "sub.png").mkdir()  # a folder named like an image is no study
    monkeypatch.setattr(analyze, "CHUNK", 2)  # several chunks
    report = analyze.analyze_path(
        model_dir, folder, tmp_path / "r.json", overlay_dir=tmp_path / "ov"
    )
    assert [r["file"] for r in report["studies"]] == ["a.png", "c.jpg", "c.png"]
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"broken.png", "grey.png", "lone.png"}
    assert "not a readable image" in reasons["broken.png"]
    assert "disks are grey" in reasons["grey.png"]
    assert "without its rest partner" in reasons["lone.png"]
    assert json.loads((tmp_path / "r.json").read_text()) == report
    # the c.jpg and c.png overlays do not overwrite each other
    assert {p.name for p in (tmp_path / "ov").iterdir()} == {"a.png", "c.jpg.png", "c.png"}
    # the same studies analysed in one chunk give the same entries
    monkeypatch.setattr(analyze, "CHUNK", 64)
    again = analyze.analyze_path(model_dir, folder, tmp_path / "r2.json")
    assert again == report
    # the launcher writes the good results and exits non-zero, naming what it skipped
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "perfusion_analyze.py"),
            f"--model_dir={model_dir}",
            f"--input={folder}",
            f"--out={tmp_path / 'r3.json'}",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stderr
    assert "skipped broken.png: " in run.stderr and "skipped 3 of 6 studies" in run.stderr
    assert len(json.loads((tmp_path / "r3.json").read_text())["studies"]) == 3


def test_labelled_folder_with_a_missing_image_keeps_the_rest(fitted, tmp_path):
    data, model_dir, _ = fitted
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    names = [r["filename"] for r in studies.read_labels(copy / "labels.csv")]
    (copy / "images" / names[2]).unlink()
    report = analyze.analyze_path(
        model_dir, copy, tmp_path / "r.json", metrics_out=tmp_path / "m.json"
    )
    assert [s["file"] for s in report["skipped"]] == [names[2]]
    assert "has no image" in report["skipped"][0]["reason"]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 14 and metrics["skipped"] == 1 and "normal_limits" in metrics["dice"]


def test_broken_or_old_model_folders_give_one_line_errors(fitted, tmp_path):
    _, model_dir, _ = fitted

    def broken(name, change, message):
        d = tmp_path / name
        shutil.copytree(model_dir, d)
        change(d)
        with pytest.raises(ValueError, match=message) as info:
            analyze.load_model(d)
        assert "\n" not in str(info.value)

    def edit_json(fn):
        def change(d):
            meta = json.loads((d / "model.json").read_text())
            fn(meta)
            (d / "model.json").write_text(json.dumps(meta))

        return change

    broken("nosize", edit_json(lambda m: m.pop("size")), r"model.json: missing 'size'")
    broken("badband", edit_json(lambda m: m.update(uncertain_band="wide")), "uncertain_band")
    broken("garbage_json", lambda d: (d / "model.json").write_text("{nope"), "not valid JSON")

    def truncate(name):
        return lambda d: (d / name).write_bytes((d / name).read_bytes()[:100])

    broken("trunc_abn", truncate("abnormal.npz"), r"abnormal.npz: not a readable model file")
    broken("trunc_lim", truncate("normal_limits.npz"), r"normal_limits.npz: not a readable")
    broken("garbage_seg", lambda d: (d / "segments.npz").write_text("x"), r"segments.npz: not a")

    def old(d):  # what version 1 wrote: pickled pipelines
        edit_json(lambda m: m.update(version=1))(d)
        (d / "abnormal.joblib").write_bytes(pickle.dumps({"not": "loaded"}))

    broken("v1", old, r"version 1 \(pickled classifiers, which can run code when loaded\); re-fit")


def test_dicom_exports_in_a_folder_frame_by_frame(fitted, tmp_path):
    from cardiac_core import dicom

    data, model_dir, _ = fitted
    names = [r["filename"] for r in studies.read_labels(data / "labels.csv")]
    rgb = cv2.cvtColor(cv2.imread(str(data / "images" / names[0])), cv2.COLOR_BGR2RGB)
    grey = np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=-1)
    folder = tmp_path / "in"
    dicom.write_test_cine(folder / "multi.dcm", np.stack([rgb, grey]))
    dicom.write_test_cine(folder / "EXPORT0001", rgb)  # DICOM files often have no suffix
    report = analyze.analyze_path(model_dir, folder, tmp_path / "r.json")
    assert [r["file"] for r in report["studies"]] == ["EXPORT0001", "multi.dcm#1"]
    assert [s["file"] for s in report["skipped"]] == ["multi.dcm#2"]
    assert "disks are grey" in report["skipped"][0]["reason"]
    model = analyze.load_model(model_dir)
    want = analyze.analyze_study(
        model, studies.read_study_image(data / "images" / names[0], size=model.size)
    )
    got = report["studies"][0]
    assert {k: v for k, v in got.items() if k != "file"} == {
        k: v for k, v in want.items() if k != "file"
    }


def test_auto_label_model_is_the_lowest_out_of_fold_log_loss():
    from perfusion import classifiers, fitting, reliability

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    y = (np.abs(X[:, 0]) > 0.8).astype(np.int64)  # not monotone in any feature: trees win
    pipeline, oof, chosen = fitting.choose_label_model(X, y, "auto", seed=0)
    losses = chosen["oof_log_loss"]
    assert set(losses) == set(fitting.AUTO_CANDIDATES)
    assert chosen["model"] == min(losses, key=losses.get) == "xgb_tuned"
    assert losses["logistic"] > 0.5 > losses["xgb_tuned"]
    # the returned out-of-fold predictions are the winner's (recomputed through the F-test
    # pipeline, which keeps all 4 features)
    again = classifiers.cross_validate(X, y, "xgb_tuned", folds=5, seed=0, n_boot=0)[
        "oof_probabilities"
    ]
    np.testing.assert_allclose(oof, np.asarray(again)[:, 1], atol=1e-6)
    assert reliability.log_loss(oof, y) == pytest.approx(losses["xgb_tuned"])
    assert ((pipeline.predict_proba(X)[:, 1] > 0.5) == y).mean() > 0.95
    # a named model is used as is
    _, _, named = fitting.choose_label_model(X, y, "logistic", seed=0)
    assert named["model"] == "logistic" and set(named["oof_log_loss"]) == {"logistic"}


def test_operating_point_is_stored_applied_and_old_folders_load_at_one_half(fitted, tmp_path):
    from perfusion import fitting, operating_point

    data, model_dir, meta = fitted
    point = meta["operating_point"]
    assert point["rule"] == "sensitivity:0.95" and 0.0 <= point["threshold"] <= 1.0
    assert point["oof_sensitivity"] >= 0.95 and 0.0 <= point["oof_specificity"] <= 1.0
    assert analyze.load_model(model_dir).operating_point.to_dict() == point
    found = studies.read_study_folder(data, size=32)

    def calls(change):
        d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(model_dir, d)
        meta = json.loads((d / "model.json").read_text())
        change(meta)
        (d / "model.json").write_text(json.dumps(meta))
        fitting.seal_model(d)  # as the folder would have been written
        model = analyze.load_model(d)
        return model, analyze.analyze_arrays(model, found)[0]

    # a threshold above every probability calls every study normal, with no territories
    model, reports = calls(lambda m: m["operating_point"].update(threshold=1.0))
    assert {r["label"] for r in reports} == {"normal"}
    assert all(r["territories"] == [] and not r["decision"]["abnormal"] for r in reports)
    # a folder fitted before operating points: the call at 0.5, and the report says why
    model, reports = calls(lambda m: m.pop("operating_point"))
    assert model.operating_point == operating_point.LEGACY
    for r in reports:
        assert r["decision"]["abnormal"] == (r["decision"]["abnormal_probability"] >= 0.5)
        assert r["decision"]["operating_point"].startswith("0.5 (model folder fitted before")
        if r["uncertain_reason"] and r["uncertain_reason"].startswith("abnormal"):
            assert "band 0.25-0.75" in r["uncertain_reason"]
    with pytest.raises(ValueError, match="unusable 'operating_point'"):
        calls(lambda m: m["operating_point"].update(threshold="high"))
