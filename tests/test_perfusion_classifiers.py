"""Cross-validation, metrics, in-fold feature selection and export of the classical models."""

import io
import pickle

import numpy as np
import pytest

from perfusion import classifiers


def test_task_targets():
    labels = ["normal", "ischemia", "infarction", "normal", "infarction"]
    idx, y, names = classifiers.task_targets(labels, "abnormal")
    assert y.tolist() == [0, 1, 1, 0, 1] and names == ("normal", "abnormal")
    idx, y, _ = classifiers.task_targets(labels, "ischemia_vs_infarction")
    assert idx.tolist() == [1, 2, 4] and y.tolist() == [0, 1, 1]
    _, y, _ = classifiers.task_targets(labels, "three_class")
    assert y.tolist() == [0, 1, 2, 0, 2]
    with pytest.raises(ValueError, match="unknown task"):
        classifiers.task_targets(labels, "nope")


def test_metrics_match_hand_computation():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2, 0.7, 0.3])
    m = classifiers.classification_metrics(y, np.stack([1 - p1, p1], 1))
    pred = p1 > 0.5
    tp, fp, fn = np.sum(pred & (y == 1)), np.sum(pred & (y == 0)), np.sum(~pred & (y == 1))
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # AUC = fraction of (positive, negative) pairs ranked correctly
    pairs = [(a > b) for a in p1[y == 1] for b in p1[y == 0]]
    assert m["roc_auc"] == pytest.approx(np.mean(pairs))


def test_cross_validate_with_callable_and_three_classes():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    seen = []

    def oracle(train_idx, test_idx):  # perfect except study 0, always called "2"
        seen.append((set(train_idx), set(test_idx)))
        p = np.eye(3)[y[test_idx]] * 0.8 + 0.2 * rng.random((len(test_idx), 3))
        p[test_idx == 0] = [0.0, 0.1, 0.9]
        return p

    r = classifiers.cross_validate(None, y, "oracle", fit_predict_proba=oracle, n_boot=50)
    assert len(seen) == 5 and all(not (a & b) for a, b in seen)  # folds never overlap
    assert set().union(*(b for _, b in seen)) == set(range(30))
    assert r["metrics"]["accuracy"]["value"] == pytest.approx(29 / 30)
    cm = np.array(r["confusion_matrix"])
    assert cm[0, 2] == 1 and np.trace(cm) == 29
    # macro recall: class 0 has 9/10, others 10/10
    assert r["metrics"]["recall"]["value"] == pytest.approx((0.9 + 1 + 1) / 3)
    lo, hi = r["metrics"]["accuracy"]["ci95"]
    assert lo <= r["metrics"]["accuracy"]["value"] <= hi <= 1.0
    assert len(r["per_fold"]) == 5


def test_selection_is_fitted_inside_each_fold():
    # Pure-noise features and random labels: choosing the 10 "best" of 2,000 on all data first
    # would leak and score far above chance; selected inside each fold it stays near 0.5.
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 2000))
    y = rng.permutation(np.repeat([0, 1], 30))
    r = classifiers.cross_validate(X, y, "rf", n_boot=10)
    assert r["metrics"]["accuracy"]["value"] < 0.7
    # while a real signal among the noise is found
    X[:, 7] += 4.0 * y  # 4 SD apart: separable
    r = classifiers.cross_validate(X, y, "rf", n_boot=10)
    assert r["metrics"]["accuracy"]["value"] > 0.85


def test_xgb_runs_and_class_count_is_checked():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 15)
    X = rng.normal(size=(30, 20)) + y[:, None] * np.linspace(0, 2, 20)
    r = classifiers.cross_validate(X, y, "xgb_tuned", n_boot=10)
    assert r["metrics"]["roc_auc"]["value"] > 0.9
    assert r["parameters"]["max_depth"] == 3
    assert classifiers.MODEL_PARAMETERS["xgb"] == dict(
        n_estimators=700, max_depth=2, learning_rate=0.003
    )
    with pytest.raises(ValueError, match="at least 5 studies"):
        classifiers.cross_validate(X[:8], np.array([0] * 5 + [1] * 3), "rf")


def test_run_study_cv_end_to_end(tmp_path):
    from perfusion import simulate, studies

    simulate.simulate_dataset(tmp_path, 15, seed=4, size=32, disk_px=64)
    data = studies.read_study_folder(tmp_path, size=32)
    r = classifiers.run_study_cv(data, "ischemia_vs_infarction", "rf", n_boot=10)
    assert r["n"] == 10 and r["class_names"] == ["ischemia", "infarction"]
    assert len(r["files"]) == 10 and sum(map(sum, r["confusion_matrix"])) == 10
    assert set(r["metrics"]) == set(classifiers.METRICS)
    with pytest.raises(ValueError, match="unknown model"):
        classifiers.run_study_cv(data, "abnormal", "svm")


@pytest.mark.parametrize("name", ["rf", "xgb", "logistic"])
def test_exported_model_predicts_as_the_pipeline_and_saves_without_pickle(tmp_path, name):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 12))
    y = (X[:, 0] + 0.5 * X[:, 3] + rng.normal(0, 0.7, 80) > 0).astype(int)
    pipeline = classifiers.make_model(name, k=5).fit(X, y)
    X_new = rng.normal(size=(50, 12))
    want = pipeline.predict_proba(X_new)  # scikit-learn / xgboost themselves: the reference
    model = classifiers.export_model(pipeline)
    np.testing.assert_allclose(model.predict_proba(X_new), want, atol=1e-6)
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:  # plain arrays only
        assert all(z[k].dtype != object for k in z.files)
    loaded = classifiers.PortableModel.load(tmp_path / "m.npz")
    np.testing.assert_allclose(loaded.predict_proba(X_new), want, atol=1e-6)


def test_broken_model_files_give_one_line_errors(tmp_path):
    X = np.random.default_rng(1).normal(size=(40, 6))
    y = (X[:, 0] > 0).astype(int)
    good = classifiers.export_model(classifiers.make_model("xgb", k=3).fit(X, y)).to_bytes()
    bad = {
        "garbage.npz": b"not a model at all",
        "truncated.npz": good[: len(good) // 2],
        "foreign.npz": _npz(values=np.arange(3)),
        "pickled.npz": pickle.dumps({"a": 1}),
        "broken_booster.npz": _npz(kind=np.array("xgboost"), selected=np.arange(3),
                                   booster_json=np.frombuffer(b"{nope", np.uint8)),
    }  # fmt: skip
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: not a readable model file") as info:
            classifiers.PortableModel.load(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        classifiers.PortableModel.load(tmp_path / "missing.npz")


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_platt_scaling_recovers_a_known_miscalibration():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)
    raw = 1 / (1 + np.exp(-(z - 0.5) / 2))  # over-confident the wrong way: logit = (z - 0.5)/2
    a, b = classifiers.fit_platt(raw, y)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(0.5, abs=0.1)
    fixed = classifiers.apply_platt(raw, a, b)
    np.testing.assert_allclose(fixed, 1 / (1 + np.exp(-z)), atol=0.03)
