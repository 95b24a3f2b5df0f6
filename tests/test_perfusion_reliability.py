"""Calibration and abstention measures, by hand."""

import numpy as np
import pytest

from perfusion import reliability


def test_reliability_bins_and_ece_by_hand():
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.91, 0.55])
    y = np.array([0, 1, 0, 1, 1, 0])
    r = reliability.reliability_bins(p, y, bins=10)
    assert r["count"] == [1, 2, 0, 0, 0, 1, 0, 0, 0, 2]
    assert r["mean_predicted"][1] == pytest.approx(0.135) and r["observed"][1] == 0.5
    assert r["mean_predicted"][2] is None and r["observed"][9] == 1.0
    # |0.05-0| * 1/6 + |0.135-0.5| * 2/6 + |0.55-0| * 1/6 + |0.93-1| * 2/6
    want = (0.05 + 2 * 0.365 + 0.55 + 2 * 0.07) / 6
    assert reliability.expected_calibration_error(p, y) == pytest.approx(want)
    assert reliability.brier_score(p, y) == pytest.approx(np.mean((p - y) ** 2))
    assert reliability.reliability_bins([1.0], [1])["count"][-1] == 1  # 1.0 in the last bin


def test_abstention_curve_and_reasons():
    p = np.array([0.1, 0.4, 0.45, 0.6, 0.9, 0.7])
    y = np.array([0, 1, 0, 1, 1, 0])
    curve = reliability.abstention_curve(p, y, half_widths=[0.0, 0.15, 0.45])
    assert curve[0] == {
        "band": [0.5, 0.5],
        "abstention_rate": 0.0,
        "accuracy": pytest.approx(4 / 6),
    }
    # band 0.35-0.65 drops 0.4, 0.45, 0.6: left 0.1 (right), 0.9 (right), 0.7 (wrong)
    assert curve[1]["abstention_rate"] == pytest.approx(0.5)
    assert curve[1]["accuracy"] == pytest.approx(2 / 3)
    assert curve[2]["abstention_rate"] == pytest.approx(1.0) and curve[2]["accuracy"] is None
    band = (0.25, 0.75)
    assert reliability.uncertain_reason(0.9, None, band) is None
    assert reliability.uncertain_reason(0.55, 0.9, band) == (
        "abnormal probability 0.55 is within the abstention band 0.25-0.75"
    )
    assert "infarction (vs ischemia) probability 0.40" in reliability.uncertain_reason(
        0.95, 0.4, band
    )
    assert reliability.uncertain_reason(0.95, 0.9, band) is None


def test_log_loss_by_hand():
    # -(log 0.8 + log(1 - 0.3) + log 0.5) / 3; 0 and 1 are clipped, not infinite
    want = -(np.log(0.8) + np.log(0.7) + np.log(0.5)) / 3
    assert reliability.log_loss([0.8, 0.3, 0.5], [1, 0, 1]) == pytest.approx(want)
    assert reliability.log_loss([0.0], [1], eps=1e-6) == pytest.approx(-np.log(1e-6))
