"""Methods side by side: same folds, limits fitted inside the fold, difficulty curves."""

import dataclasses
import json

import numpy as np
import pytest

from experiments.studies import perfusion_compare, perfusion_figures
from perfusion import cnn, fitting, geometry, scores, simulate, studies

SIZE = 32


def _studies(n, seed, depth=None, difficulty="clinical"):
    d = simulate.get_difficulty(difficulty)
    if depth is not None:
        d = dataclasses.replace(d, depth=(depth, depth))
    counts = d.label_counts(n)
    labels = [lab for lab, k in counts.items() for _ in range(k)]
    labels = [labels[i] for i in np.random.default_rng(seed).permutation(n)]
    sims = [
        simulate.simulate_study(np.random.default_rng([seed, i]), SIZE, label=lab, difficulty=d)
        for i, lab in enumerate(labels)
    ]
    found = [
        studies.study_from_arrays(
            s.stress, s.rest, size=SIZE, name=f"s{i}", label=s.label, sex=s.sex
        )
        for i, s in enumerate(sims)
    ]
    return found, [s.depth for s in sims]


def _arrays(n, seed, depth=None, difficulty="clinical"):
    found, depths = _studies(n, seed, depth, difficulty)
    return perfusion_compare.StudyArrays.from_studies(found, depth=depths)


@pytest.fixture(scope="module")
def data():
    return _arrays(40, seed=1)


def test_methods_share_the_folds_and_limits_stay_inside_them(data, tmp_path):
    tiny_cnn = dataclasses.replace(cnn.SMALL_UPTAKE_CNN, image_size=16, epochs=1, batch_size=8)
    result = perfusion_compare.compare_methods(
        data,
        ("strip_rf", "tpd", "summed_scores", "polar_logistic", "cnn"),
        folds=3,
        n_boot=20,
        cnn_config=tiny_cnn,
    )
    for task in perfusion_compare.BINARY_TASKS:
        folds = {m: tuple(r["oof_fold"]) for m, r in result[task].items()}
        assert len(set(folds.values())) == 1  # every method saw the same folds
        for r in result[task].values():
            assert 0.0 <= r["metrics"]["roc_auc"]["value"] <= 1.0
            lo, hi = r["metrics"]["accuracy"]["ci95"]
            assert lo <= r["metrics"]["accuracy"]["value"] <= hi
    assert result["abnormal"]["tpd"]["n"] == 40
    assert result["ischemia_vs_infarction"]["tpd"]["n"] == 16  # the abnormal studies only
    perfusion_compare.write_comparison(
        {"cv": result},
        tmp_path / "c.json",
        markdown=tmp_path / "m.md",
        table1=tmp_path / "t1.md",
        header="HEADER",
    )
    saved = json.loads((tmp_path / "c.json").read_text())
    assert "oof_probabilities" not in saved["cv"]["abnormal"]["tpd"]
    assert saved["cv"]["abnormal"]["tpd"]["metrics"] == result["abnormal"]["tpd"]["metrics"]
    assert "| polar_logistic |" in (tmp_path / "m.md").read_text()
    table1 = (tmp_path / "t1.md").read_text()
    assert "HEADER" in table1 and "| cnn (ours) |" in table1 and "(published)" in table1


def test_fold_features_never_see_the_test_studies(data):
    features = perfusion_compare.FoldFeatures(data)
    train = np.arange(0, 30)
    before = features(train)["polar"]
    # changing a test study (a normal one) must not change anyone's features but its own
    test_normal = 30 + int(np.flatnonzero(data.labels[30:] == "normal")[0])
    changed = dataclasses.replace(data, stress=data.stress.copy())
    changed.stress[test_normal] *= 0.5
    after = perfusion_compare.FoldFeatures(changed)(train)["polar"]
    others = np.arange(len(data)) != test_normal
    np.testing.assert_array_equal(before[others], after[others])
    assert not np.array_equal(before[test_normal], after[test_normal])
    # the test studies are scored against the limits of the training normals, by sex
    normals = train[data.labels[train] == "normal"]
    limits = scores.fit_normal_limits(
        data.stress[normals], data.rest[normals], sex=[data.sexes[i] for i in normals]
    )
    mean, sd = limits.stack_for([data.sexes[i] for i in range(30, 40)])
    want = fitting.label_features(
        data.stress[30:], data.rest[30:], mean, sd, geometry.segment_map(SIZE)
    )
    np.testing.assert_allclose(before[30:], want, rtol=1e-6)


def test_difficulty_curve_scores_each_depth(data, tmp_path):
    levels = {d: _arrays(10, seed=int(100 * d), depth=d) for d in (0.1, 0.3)}
    curve = perfusion_compare.difficulty_curve(data, levels, ("tpd", "polar_logistic"))
    assert curve["depths"] == [0.1, 0.3]
    for method in ("tpd", "polar_logistic"):
        for key in ("abnormal_accuracy", "abnormal_auc", "ischemia_vs_infarction_accuracy"):
            assert len(curve[method][key]) == 2
            assert all(0.0 <= v <= 1.0 for v in curve[method][key])
    assert perfusion_compare.level_depth(levels[0.3]) == pytest.approx(0.3)

    perfusion_figures.plot_difficulty_curve(curve, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    text = perfusion_compare.difficulty_markdown(curve)
    assert "| polar_logistic |" in text and "10%" in text and "30%" in text


def test_table1_mixes_methods_and_older_model_names():
    from perfusion import classifiers

    found, _ = _studies(30, seed=3)
    results = perfusion_compare.table1_results(found, ["tpd", "rf"], folds=3, n_boot=20)
    assert results["tpd"]["n"] == results["rf"]["n"] == 30
    assert results["tpd"]["parameters"]["features"] == "one score"
    text = classifiers.table1_markdown(results, title="t")
    assert "| tpd (ours) |" in text and "| rf (ours) |" in text and "(published)" in text
