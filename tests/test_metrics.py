"""The paper's metrics against a plain Python loop and hand-computed cases; threshold tuning."""

import json
import math

import numpy as np
import pytest

from tavr_jax import metrics
from tavr_jax.run import workdir
from tavr_jax.schema import KeypointSchema, get_schema

SCHEMA = get_schema("paper11")
TINY = KeypointSchema(name="tiny", groups=(("a", ("P", "Q")), ("b", ("R",))))


def _loop_reference(prob, pxy, vis, txy, schema, thr, gprob, gthr, dist_px, spacing):
    """Independent reference: one Python loop over (image, point) pairs."""
    n, k = prob.shape
    groups = [g for g, pts in schema.groups for _ in pts]
    gidx = {g: i for i, g in enumerate(schema.group_names)}

    def new():
        return dict(tp=0, fp=0, fn=0, d=[], mm=[])

    pooled, per_point, per_group, per_image = new(), [new() for _ in range(k)], {}, []
    for g in schema.group_names:
        per_group[g] = new()
    for i in range(n):
        img = new()
        for j in range(k):
            p = prob[i, j] > thr[j]
            if gprob is not None:
                p = p and gprob[i, gidx[groups[j]]] > gthr[gidx[groups[j]]]
            t = bool(vis[i, j])
            for acc in (pooled, per_point[j], per_group[groups[j]], img):
                if p and t:
                    acc["tp"] += 1
                    d = math.hypot(pxy[i, j, 0] - txy[i, j, 0], pxy[i, j, 1] - txy[i, j, 1])
                    acc["d"].append(d)
                    if spacing is not None and spacing[i] > 0:
                        acc["mm"].append(d * spacing[i])
                elif p:
                    acc["fp"] += 1
                elif t:
                    acc["fn"] += 1
        per_image.append(img)

    def summary(a):
        tp, fp, fn = a["tp"], a["fp"], a["fn"]
        return {
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "mean_error_px": sum(a["d"]) / len(a["d"]) if a["d"] else None,
            "loc_accuracy_20px": sum(d <= dist_px for d in a["d"]) / len(a["d"])
            if a["d"]
            else None,
            "mean_error_mm": sum(a["mm"]) / len(a["mm"]) if a["mm"] else None,
        }

    imgs = [summary(a) for a in per_image]
    per_image_mean = {}
    for m in imgs[0]:
        vals = [s[m] for s in imgs if s[m] is not None]
        per_image_mean[m] = sum(vals) / len(vals) if vals else None
    return {
        **summary(pooled),
        "per_image_mean": per_image_mean,
        "per_point": {schema.point_names[j]: summary(per_point[j]) for j in range(k)},
        "per_group": {g: summary(a) for g, a in per_group.items()},
    }


def _assert_close(got, want):
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def _random_case(seed, n=23, schema=SCHEMA):
    rng = np.random.default_rng(seed)
    k, g = schema.num_points, schema.num_groups
    prob = rng.uniform(size=(n, k))
    vis = rng.uniform(size=(n, k)) < 0.6
    txy = rng.uniform(0, 512, size=(n, k, 2))
    pxy = txy + rng.normal(0, 20, size=(n, k, 2))
    gprob = rng.uniform(size=(n, g))
    spacing = np.where(rng.uniform(size=n) < 0.7, rng.uniform(0.1, 0.4, size=n), 0.0)
    return prob, pxy, vis, txy, gprob, spacing


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_python_loop_on_random_inputs(seed, gated):
    prob, pxy, vis, txy, gprob, spacing = _random_case(seed)
    rng = np.random.default_rng(100 + seed)
    thr = rng.uniform(0.3, 0.7, size=SCHEMA.num_points)
    gthr = rng.uniform(0.2, 0.6, size=SCHEMA.num_groups)
    got = metrics.keypoint_metrics(
        prob,
        pxy,
        vis,
        txy,
        SCHEMA,
        threshold=thr,
        group=gprob if gated else None,
        group_threshold=gthr,
        pixel_spacing_mm=spacing,
    )
    want = _loop_reference(
        prob, pxy, vis, txy, SCHEMA, thr, gprob if gated else None, gthr, 20.0, spacing
    )
    keys = (*metrics.METRIC_KEYS, "mean_error_mm")
    for m in keys:
        _assert_close(got[m], want[m])
        _assert_close(got["per_image_mean"][m], want["per_image_mean"][m])
    for name in SCHEMA.point_names:
        for m in keys:
            _assert_close(got["per_point"][name][m], want["per_point"][name][m])
    for name in SCHEMA.group_names:
        for m in keys:
            _assert_close(got["per_group"][name][m], want["per_group"][name][m])
    assert got["n_images"] == len(prob)
    json.dumps(got, allow_nan=False)  # every value is a plain float/int/None


def test_hand_computed_pooled_and_per_image():
    # Schema TINY: points P, Q (group a), R (group b). Two images, threshold 0.5.
    prob = np.array(
        [
            [0.9, 0.2, 0.6],  # predicted: P, R
            [0.1, 0.8, 0.7],
        ]
    )  # predicted: Q, R
    vis = np.array(
        [
            [1, 1, 0],  # true: P, Q
            [0, 1, 0],
        ],
        bool,
    )  # true: Q
    txy = np.zeros((2, 3, 2))
    pxy = np.zeros((2, 3, 2))
    pxy[0, 0] = (3.0, 4.0)  # image 0, P: TP at distance 5
    pxy[1, 1] = (30.0, 40.0)  # image 1, Q: TP at distance 50
    m = metrics.keypoint_metrics(prob, pxy, vis, txy, TINY, pixel_spacing_mm=np.array([0.5, 0]))
    # Image 0: TP=1 (P), FN=1 (Q), FP=1 (R). Image 1: TP=1 (Q), FP=1 (R).
    # Pooled: TP=2, FP=2, FN=1 -> P = 2/4, R = 2/3, F1 = 4/(4+2+1) = 4/7.
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["mean_error_px"] == pytest.approx((5 + 50) / 2)
    assert m["loc_accuracy_20px"] == pytest.approx(0.5)
    assert m["mean_error_mm"] == pytest.approx(5 * 0.5)  # image 1 has no spacing
    # Per image: P = (1/2 + 1/2)/2, R = (1/2 + 1/1)/2, F1 = (2/4 + 2/3)/2,
    # error = (5 + 50)/2, accuracy = (1 + 0)/2.
    pim = m["per_image_mean"]
    assert pim["precision"] == pytest.approx(0.5)
    assert pim["recall"] == pytest.approx(0.75)
    assert pim["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert pim["mean_error_px"] == pytest.approx(27.5)
    assert pim["loc_accuracy_20px"] == pytest.approx(0.5)
    # Per point: P: TP 1 -> P=R=F1=1; Q: TP 1, FN 1 -> R 1/2; R: FP 2 -> precision 0, no recall.
    assert m["per_point"]["P"]["f1"] == 1.0
    assert m["per_point"]["Q"]["recall"] == pytest.approx(0.5)
    assert m["per_point"]["Q"]["precision"] == 1.0
    assert m["per_point"]["R"]["precision"] == 0.0
    assert m["per_point"]["R"]["recall"] is None
    assert m["per_point"]["R"]["mean_error_px"] is None
    # Group a = P + Q: TP 2, FN 1 -> F1 = 4/5.
    assert m["per_group"]["a"]["f1"] == pytest.approx(0.8)
    assert m["counts"] == {"tp": 2, "fp": 2, "fn": 1, "n_within": 1}


def test_per_image_mean_leaves_out_undefined_images():
    # Image 0 predicts nothing and shows nothing: no precision, recall or F1 -> left out.
    # Image 1 predicts nothing but shows P: recall 0, F1 0, precision undefined.
    # Image 2 predicts P and Q, shows P: precision 1/2, recall 1, F1 2/3.
    prob = np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.9, 0.9, 0.1]])
    vis = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0]], bool)
    xy = np.zeros((3, 3, 2))
    m = metrics.keypoint_metrics(prob, xy, vis, xy, TINY)
    pim, n = m["per_image_mean"], m["per_image_defined"]
    assert pim["precision"] == pytest.approx(0.5) and n["precision"] == 1
    assert pim["recall"] == pytest.approx(0.5) and n["recall"] == 2
    assert pim["f1"] == pytest.approx(1 / 3) and n["f1"] == 2
    assert pim["mean_error_px"] == 0.0 and n["mean_error_px"] == 1
    assert m["mean_error_mm"] is None and pim["mean_error_mm"] is None


def test_nothing_predicted_gives_none_not_nan():
    prob = np.zeros((2, 3))
    vis = np.ones((2, 3), bool)
    xy = np.zeros((2, 3, 2))
    m = metrics.keypoint_metrics(prob, xy, vis, xy, TINY)
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["mean_error_px"] is None and m["loc_accuracy_20px"] is None
    json.dumps(m, allow_nan=False)


def test_per_point_threshold_and_strict_comparison():
    prob = np.array([[0.5, 0.6, 0.3]])
    vis = np.array([[1, 1, 1]], bool)
    xy = np.zeros((1, 3, 2))
    # p > t strictly: P at exactly 0.5 is not reported under 0.5.
    assert metrics.keypoint_metrics(prob, xy, vis, xy, TINY)["recall"] == pytest.approx(1 / 3)
    m = metrics.keypoint_metrics(prob, xy, vis, xy, TINY, threshold=[0.4, 0.7, 0.2])
    assert [m["per_point"][p]["recall"] for p in "PQR"] == [1.0, 0.0, 1.0]
    assert m["threshold"] == {"P": 0.4, "Q": 0.7, "R": 0.2}
    with pytest.raises(ValueError, match="shape"):
        metrics.keypoint_metrics(prob, xy, vis, xy, TINY, threshold=[0.5, 0.5])


def test_group_gating_suppresses_points_of_absent_groups():
    prob = np.array([[0.9, 0.9, 0.9]])
    vis = np.array([[1, 0, 1]], bool)
    xy = np.zeros((1, 3, 2))
    # Group a below its threshold: P (TP) and Q (FP) are suppressed; R stays.
    m = metrics.keypoint_metrics(prob, xy, vis, xy, TINY, group=np.array([[0.3, 0.8]]))
    assert m["counts"] == {"tp": 1, "fp": 0, "fn": 1, "n_within": 1}
    assert m["per_point"]["P"]["recall"] == 0.0 and m["per_point"]["R"]["recall"] == 1.0
    m = metrics.keypoint_metrics(
        prob, xy, vis, xy, TINY, group=np.array([[0.3, 0.8]]), group_threshold=[0.2, 0.9]
    )
    assert m["counts"] == {"tp": 1, "fp": 1, "fn": 1, "n_within": 1}
    assert m["group_threshold"] == {"a": 0.2, "b": 0.9}


def test_localisation_radius_counts_the_boundary():
    prob = np.ones((1, 3))
    vis = np.ones((1, 3), bool)
    txy = np.zeros((1, 3, 2))
    pxy = np.array([[[20.0, 0.0], [12.0, 16.0], [20.0, 0.1]]])  # 20, 20, just over 20
    m = metrics.keypoint_metrics(prob, pxy, vis, txy, TINY)
    assert m["loc_accuracy_20px"] == pytest.approx(2 / 3)
    assert (
        metrics.keypoint_metrics(prob, pxy, vis, txy, TINY, dist_px=25)["loc_accuracy_20px"] == 1.0
    )


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="visibility must have shape"):
        metrics.keypoint_metrics(
            np.zeros((2, 4)), np.zeros((2, 4, 2)), np.zeros((2, 4)), np.zeros((2, 4, 2)), TINY
        )
    with pytest.raises(ValueError, match="true_coords"):
        metrics.keypoint_metrics(
            np.zeros((2, 3)), np.zeros((2, 3, 2)), np.zeros((2, 3)), np.zeros((2, 3, 3)), TINY
        )


def _loop_best(prob_col, vis_col, cands):
    best_t, best_f1 = None, -1.0
    for t in cands:
        tp = sum(p > t and v for p, v in zip(prob_col, vis_col, strict=True))
        fp = sum(p > t and not v for p, v in zip(prob_col, vis_col, strict=True))
        fn = sum(p <= t and v for p, v in zip(prob_col, vis_col, strict=True))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        if f1 > best_f1 + 1e-12 or (
            abs(f1 - best_f1) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)
        ):
            best_t, best_f1 = t, f1
    return best_t, best_f1


@pytest.mark.parametrize("seed", [0, 1])
def test_tune_thresholds_matches_loop_and_beats_default(seed):
    prob, _, vis, _, _, _ = _random_case(seed, n=60)
    prob = np.clip(prob * 0.5 + 0.45 * vis, 0, 1)  # informative but shifted probabilities
    cands = np.round(np.arange(0.05, 0.951, 0.05), 4)
    tuned = metrics.tune_thresholds(prob, vis, SCHEMA, cands)
    assert tuned["groups"] is None
    for j, name in enumerate(SCHEMA.point_names):
        t, f1 = _loop_best(prob[:, j], vis[:, j], cands)
        assert tuned["points"][name] == pytest.approx(t)
        assert tuned["val_f1"]["points"][name] == pytest.approx(f1)
    thr = [tuned["points"][p] for p in SCHEMA.point_names]
    xy = np.zeros(prob.shape + (2,))
    tuned_f1 = metrics.keypoint_metrics(prob, xy, vis, xy, SCHEMA, threshold=thr)["f1"]
    default_f1 = metrics.keypoint_metrics(prob, xy, vis, xy, SCHEMA)["f1"]
    assert tuned_f1 >= default_f1


def test_tune_thresholds_unseen_point_and_useless_gating(tmp_path):
    prob = np.array([[0.9, 0.2, 0.3], [0.35, 0.8, 0.6], [0.1, 0.1, 0.2]])
    vis = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)
    gprob = np.array([[0.8, 0.1], [0.9, 0.7], [0.2, 0.9]])
    cands = [0.1, 0.3, 0.5, 0.7]
    tuned = metrics.tune_thresholds(prob, vis, TINY, cands, group=gprob)
    # Ungated: P (0.9, 0.35 | 0.1) is perfect at 0.1 and 0.3 -> 0.3 (closer to 0.5);
    # Q (0.8 | 0.2, 0.1) perfect at 0.3, 0.5 -> 0.5; R is never visible: only 0.7 predicts
    # nothing (F1 taken as 1), lower candidates give a FP (F1 0) -> 0.7.
    # Ungated pooled F1 is already 1, so gating cannot beat it and is dropped.
    assert tuned["points"] == {"P": 0.3, "Q": 0.5, "R": 0.7}
    assert tuned["groups"] is None
    path = workdir.save_thresholds(tmp_path, tuned)
    assert json.loads(path.read_text()) == tuned
    points, groups = workdir.load_thresholds(tmp_path, TINY)
    np.testing.assert_allclose(points, [0.3, 0.5, 0.7])
    assert groups is None
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]  # no temp file left


def test_tune_thresholds_keeps_gating_when_it_helps(tmp_path):
    # Point probabilities cannot tell the images apart; the group probabilities can.
    prob = np.array([[0.6, 0.2, 0.9], [0.6, 0.2, 0.9], [0.6, 0.2, 0.4], [0.6, 0.2, 0.35]])
    vis = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]], bool)
    gprob = np.array([[0.9, 0.1], [0.9, 0.2], [0.1, 0.9], [0.2, 0.8]])
    tuned = metrics.tune_thresholds(prob, vis, TINY, [0.1, 0.3, 0.5, 0.7], group=gprob)
    # Groups: a present in images 0, 1 (gp 0.9, 0.9 vs 0.1, 0.2): perfect at 0.3, 0.5 -> 0.5;
    # b present in 2, 3 (0.9, 0.8 vs 0.1, 0.2): perfect at 0.3, 0.5, 0.7 -> 0.5.
    assert tuned["groups"] == {"a": 0.5, "b": 0.5}
    assert tuned["val_f1"]["groups"] == {"a": 1.0, "b": 1.0}
    # Gated, R only in images 2, 3 (0.4, 0.35, both visible): perfect at 0.1, 0.3 -> 0.3.
    assert tuned["points"] == {"P": 0.5, "Q": 0.5, "R": 0.3}
    workdir.save_thresholds(tmp_path, tuned)
    points, groups = workdir.load_thresholds(tmp_path, TINY)
    m = metrics.keypoint_metrics(
        prob,
        np.zeros((4, 3, 2)),
        vis,
        np.zeros((4, 3, 2)),
        TINY,
        threshold=points,
        group=gprob,
        group_threshold=groups,
    )
    assert m["f1"] == 1.0


def test_load_thresholds_defaults_and_errors(tmp_path):
    points, groups = workdir.load_thresholds(tmp_path, TINY)
    np.testing.assert_array_equal(points, [0.5, 0.5, 0.5])
    assert groups is None
    (tmp_path / "thresholds.json").write_text('{"points": {"P": 0.5}}')
    with pytest.raises(ValueError, match="thresholds.json"):
        workdir.load_thresholds(tmp_path, TINY)


def test_calibration_hand_computed():
    # Bins of width 0.25. [0, .25): 0.1 (no), 0.2 (yes) -> confidence 0.15, accuracy 0.5;
    # [.5, .75): 0.6 (yes) -> 0.6 vs 1; [.75, 1]: 0.9 (yes), 1.0 (yes), 0.8 (no) -> 0.9 vs 2/3.
    # ECE = (2 * 0.35 + 1 * 0.4 + 3 * (0.9 - 2/3)) / 6.
    prob = np.array([[0.1, 0.2, 0.6], [0.9, 1.0, 0.8]])
    truth = np.array([[0, 1, 1], [1, 1, 0]], bool)
    cal = metrics.calibration(prob, truth, bins=4)
    assert cal["n"] == 6
    assert cal["ece"] == pytest.approx((2 * 0.35 + 0.4 + 3 * (0.9 - 2 / 3)) / 6)
    counts = [b["count"] for b in cal["bins"]]
    assert counts == [2, 0, 1, 3]
    assert cal["bins"][1]["confidence"] is None and cal["bins"][1]["accuracy"] is None
    assert cal["bins"][0]["confidence"] == pytest.approx(0.15)
    assert cal["bins"][3]["accuracy"] == pytest.approx(2 / 3)
    assert cal["bins"][3]["hi"] == 1.0
    json.dumps(cal)  # serialisable as it is


def test_calibration_of_calibrated_and_overconfident_probabilities():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    truth = rng.uniform(size=p.shape) < p  # events happen with their stated probability
    assert metrics.calibration(p, truth)["ece"] < 0.01
    # Saying 0 or 1 where the truth is a coin flip is off by 0.5 everywhere.
    coin = rng.uniform(size=p.shape) < 0.5
    assert metrics.calibration(p > 0.5, coin)["ece"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="same size"):
        metrics.calibration(p[:3], truth[:4])


def test_keypoint_metrics_report_visibility_calibration():
    prob, pxy, vis, txy, _, _ = _random_case(5)
    m = metrics.keypoint_metrics(prob, pxy, vis, txy, SCHEMA)
    assert m["visibility_calibration"] == metrics.calibration(prob, vis)


def _loop_bootstrap(a, b, n_boot, seed):
    """Plain loop over replicates with the same draws: pooled F1 of each arm per replicate."""
    cases = sorted(a)
    draws = np.random.default_rng(seed).integers(0, len(cases), (n_boot, len(cases)))
    diffs = []
    for row in draws:
        f1 = []
        for counts in (a, b):
            tp = sum(counts[cases[i]][0] for i in row)
            fp = sum(counts[cases[i]][1] for i in row)
            fn = sum(counts[cases[i]][2] for i in row)
            f1.append(2 * tp / (2 * tp + fp + fn))
        diffs.append(f1[0] - f1[1])
    return np.percentile(diffs, [2.5, 97.5])


def test_paired_bootstrap_f1_matches_a_loop_and_hand_values():
    a = {"p1": [8, 1, 1], "p2": [5, 0, 5], "p3": [9, 3, 0]}
    b = {"p1": [6, 2, 3], "p2": [5, 1, 5], "p3": [7, 5, 2]}
    boot = metrics.paired_bootstrap_f1(a, b, n_boot=300, seed=3)
    # Pooled: a = 2*22 / (44 + 4 + 6) = 44/54; b = 36 / (36 + 8 + 10) = 36/54.
    assert boot["f1_a"] == pytest.approx(44 / 54) and boot["f1_b"] == pytest.approx(36 / 54)
    assert boot["diff"] == pytest.approx(8 / 54) and boot["relative"] == pytest.approx(8 / 36)
    np.testing.assert_allclose(boot["ci"], _loop_bootstrap(a, b, 300, 3), rtol=1e-12)
    assert boot["ci"][0] <= boot["diff"] <= boot["ci"][1]
    # One patient: every replicate is that patient, the interval has no width.
    one = metrics.paired_bootstrap_f1({"p": [4, 1, 0]}, {"p": [2, 1, 2]}, n_boot=50)
    assert one["ci"][0] == pytest.approx(one["ci"][1]) == pytest.approx(one["diff"])
    with pytest.raises(ValueError, match="same, non-empty set of cases"):
        metrics.paired_bootstrap_f1(a, {"p1": [1, 0, 0]})
