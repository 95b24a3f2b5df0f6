import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from perfusion import evaluation, geometry, operating_point, reliability, scores

# Eight studies by hand: abnormal (1) at 0.3, 0.6, 0.8, 0.9; normal (0) at 0.1, 0.2, 0.4, 0.7.
P = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
Y = np.array([0, 0, 1, 0, 1, 0, 1, 1])


@pytest.mark.parametrize(
    "rule, threshold, sensitivity, specificity",
    [
        # 3 of 4 abnormal called: the highest cut keeping 0.6, midway between 0.4 and 0.6
        ("sensitivity:0.75", 0.5, 0.75, 0.75),
        # all 4 abnormal: the cut must pass under 0.3; 0.1 and 0.2 stay normal
        ("sensitivity:1", 0.25, 1.0, 0.5),
        # 3 of 4 normal called normal: the lowest cut above 0.4
        ("specificity:0.75", 0.5, 0.75, 0.75),
        # all 4 normal: above 0.7, so only 0.8 and 0.9 are called
        ("specificity:1.0", 0.75, 0.5, 1.0),
        # Youden's J is 0.5 at the cuts 0.25, 0.5 and 0.75: the lowest is taken
        ("balanced", 0.25, 1.0, 0.5),
    ],
)
def test_threshold_choice_by_hand(rule, threshold, sensitivity, specificity):
    point = operating_point.choose_operating_point(P, Y, rule)
    assert point == operating_point.OperatingPoint(rule, threshold, sensitivity, specificity)
    called = P >= point.threshold
    assert called[Y == 1].mean() == sensitivity and (~called[Y == 0]).mean() == specificity
    assert operating_point.OperatingPoint.from_dict(point.to_dict()) == point


def test_sensitivity_target_counts_exact_fractions():
    # 19 of 20 is 0.95 although 19 / 20 < 0.95 in floating point
    p = np.linspace(0.01, 0.99, 40)
    y = np.r_[np.zeros(20), np.ones(20)].astype(int)
    y[[0, 25]] = y[[25, 0]]  # one abnormal study at the bottom, one normal among the top
    point = operating_point.choose_operating_point(p, y, "sensitivity:0.95")
    # the lowest abnormal study (p[0]) is given up, the next one (p[20]) is kept
    assert point.threshold == pytest.approx((p[19] + p[20]) / 2)
    assert point.sensitivity == pytest.approx(0.95) and point.specificity == pytest.approx(0.95)


def test_a_separated_folder_keeps_every_abnormal_study():
    # 75% sensitivity is a floor, not a target to come down to: nothing is gained in
    # specificity by giving up the abnormal study at 0.6, so the cut stays below it
    p, y = [0.1, 0.2, 0.6, 0.7, 0.8, 0.9], [0, 0, 1, 1, 1, 1]
    for rule, threshold in (("sensitivity:0.75", 0.4), ("balanced", 0.4), ("specificity:0.5", 0.5)):
        point = operating_point.choose_operating_point(p, y, rule)
        assert (point.threshold, point.sensitivity, point.specificity) == (threshold, 1.0, 1.0)


def test_rules_move_the_threshold_only_their_own_way_from_the_even_call():
    # normal at 0.1, 0.3, 0.55; abnormal at 0.2, 0.6, 0.8, 0.9
    p, y = [0.1, 0.2, 0.3, 0.55, 0.6, 0.8, 0.9], [0, 1, 0, 0, 1, 1, 1]
    # The most specific cut at 75% sensitivity is 0.575, above the normal study at 0.55. But
    # the model finds that study more likely abnormal than not, and a rule-out call does not
    # call it normal: the threshold stays at 0.5.
    point = operating_point.choose_operating_point(p, y, "sensitivity:0.75")
    assert (point.threshold, point.sensitivity, point.specificity) == (0.5, 0.75, 2 / 3)
    # The most sensitive cut at 1/3 specificity is 0.15, below the abnormal study at 0.2,
    # which is more likely normal than not: a specificity rule keeps 0.5 as well.
    point = operating_point.choose_operating_point(p, y, "specificity:0.3")
    assert (point.threshold, point.sensitivity, point.specificity) == (0.5, 0.75, 2 / 3)


@pytest.mark.parametrize("rule", ["sensitivity", "sensitivity:0", "specificity:1.5", "youden"])
def test_bad_rules_are_one_line_errors(rule):
    with pytest.raises(ValueError, match="expected sensitivity:X") as info:
        operating_point.parse_rule(rule)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="normal and abnormal"):
        operating_point.choose_operating_point([0.2, 0.3], [1, 1], "balanced")


def test_abstention_band_moves_to_the_threshold():
    assert reliability.band_around(0.5, (0.25, 0.75)) == pytest.approx((0.25, 0.75))
    # odds 1/3 and 3 times the threshold's 1:19 -> 1:57 and 3:19
    assert reliability.band_around(0.05, (0.25, 0.75)) == pytest.approx((1 / 58, 3 / 22))
    assert reliability.band_around(0.05, (0.0, 1.0)) == (0.0, 1.0)
    reason = reliability.uncertain_reason(0.1, None, (0.25, 0.75), abnormal_band=(1 / 58, 3 / 22))
    assert reason == "abnormal probability 0.10 is within the abstention band 0.02-0.14"
    assert reliability.uncertain_reason(0.3, None, (0.25, 0.75), abnormal_band=(0.02, 0.14)) is None


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for n in (5, 40, 300):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.random(n), 1)  # many ties
        assert evaluation.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(evaluation.roc_auc([0.1, 0.2], [1, 1]))


def test_per_vessel_scores_and_aucs_match_a_plain_reference():
    rng = np.random.default_rng(1)
    p_seg = rng.random((60, 17))
    stress = rng.integers(0, 5, (60, 17))
    want_max = np.zeros((60, 3))
    want_sum = np.zeros((60, 3))
    for j, name in enumerate(scores.TERRITORY_NAMES):  # a loop over the AHA lists
        cols = [s - 1 for s in geometry.TERRITORIES[name]]
        want_max[:, j] = p_seg[:, cols].max(axis=1)
        want_sum[:, j] = stress[:, cols].sum(axis=1)
    np.testing.assert_allclose(evaluation.per_territory(p_seg, "max"), want_max)
    np.testing.assert_allclose(evaluation.per_territory(stress, "sum"), want_sum)
    positive = rng.random((60, 3)) < 0.3
    resamples = evaluation.bootstrap_indices(60, 200, seed=0)
    got = evaluation.vessel_aucs(want_sum, positive, resamples)
    for j, name in enumerate(scores.TERRITORY_NAMES):
        assert got[name]["value"] == pytest.approx(roc_auc_score(positive[:, j], want_sum[:, j]))
    pooled = roc_auc_score(positive.ravel(), want_sum.ravel())
    assert got["pooled"]["value"] == pytest.approx(pooled)
    for entry in got.values():  # each interval holds its point value
        lo, hi = entry["ci95"]
        assert lo <= entry["value"] <= hi and hi - lo < 0.6


def test_bootstrap_draws_are_those_of_the_other_cv_rows():
    from perfusion import classifiers

    # classifiers.bootstrap_intervals draws n integers per resample from the same generator
    rng = np.random.default_rng(3)
    want = np.stack([rng.integers(0, 37, 37) for _ in range(5)])
    np.testing.assert_array_equal(evaluation.bootstrap_indices(37, 5, seed=3), want)
    y = np.r_[np.zeros(20), np.ones(17)].astype(int)
    s = np.random.default_rng(4).random(37) + 0.3 * y
    mine = evaluation.auc_with_interval(s, y, evaluation.bootstrap_indices(37, 100, seed=3))
    theirs = classifiers.bootstrap_intervals(y, np.stack([1 - s, s], 1), n_boot=100, seed=3)
    assert mine["ci95"] == pytest.approx(theirs["roc_auc"])
    assert mine["ci95"][0] <= mine["value"] <= mine["ci95"][1]
