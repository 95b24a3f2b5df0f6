"""Post-processing (gating, stage priors) and temporal tracking on synthetic trajectories."""

import math

import numpy as np
import pytest

from tavr_jax import reporting
from tavr_jax.infer import tracking
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")
K, G = SCHEMA.num_points, SCHEMA.num_groups


# ----------------------------------------------------------------------------------------------
# Gating


def test_reported_points_matches_loop():
    rng = np.random.default_rng(0)
    vis, grp = rng.uniform(size=(20, K)), rng.uniform(size=(20, G))
    pt, gt = rng.uniform(0.3, 0.7, K), rng.uniform(0.3, 0.7, G)
    expect = ["anatomical", "contour"]
    got = reporting.reported_points(
        vis, grp, SCHEMA, point_thresholds=pt, group_thresholds=gt, expected=expect
    )
    want = np.zeros((20, K), bool)
    for n in range(20):
        for k, name in enumerate(SCHEMA.point_names):
            g = SCHEMA.group_names.index(SCHEMA.group_of(name))
            want[n, k] = vis[n, k] > pt[k] and grp[n, g] > gt[g] and SCHEMA.group_names[g] in expect
    np.testing.assert_array_equal(got, want)
    assert not got[:, SCHEMA.point_group == SCHEMA.group_names.index("instrumental")].any()


def test_expect_parses_and_rejects_unknown_groups():
    np.testing.assert_array_equal(
        reporting.expected_groups("anatomical, contour", SCHEMA), [True, False, True]
    )
    assert reporting.expected_groups(None, SCHEMA).all()
    with pytest.raises(ValueError, match="valve"):
        reporting.expected_groups("anatomical,valve", SCHEMA)


def test_gate_from_meta_uses_checkpoint_thresholds():
    meta = {"thresholds": np.full(K, 0.9), "group_thresholds": None}
    gate = reporting.Gate.from_meta(meta, SCHEMA)
    assert not gate(np.full((1, K), 0.8), np.ones((1, G))).any()
    assert gate(np.full((1, K), 0.95), np.ones((1, G))).all()


# ----------------------------------------------------------------------------------------------
# Filters against plain references


def _one_euro_reference(xs, ts, min_cutoff, beta, d_cutoff):
    """Casiez et al.'s One-Euro filter for one scalar, written out from the paper."""

    def alpha(cutoff, dt):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    out, x_prev, dx_prev, t_prev = [], None, 0.0, None
    for x, t in zip(xs, ts, strict=True):
        if x_prev is None:
            x_hat, dx_hat = x, 0.0
        else:
            dt = t - t_prev
            dx = (x - x_prev) / dt
            a_d = alpha(d_cutoff, dt)
            dx_hat = a_d * dx + (1 - a_d) * dx_prev
            a = alpha(min_cutoff + beta * abs(dx_hat), dt)
            x_hat = a * x + (1 - a) * x_prev
        out.append(x_hat)
        x_prev, dx_prev, t_prev = x_hat, dx_hat, t
    return np.array(out)


def test_one_euro_matches_reference_formula():
    rng = np.random.default_rng(1)
    ts = np.cumsum(rng.uniform(0.03, 0.08, 25))  # irregular frame times
    xs = rng.normal(0, 5, (25, 3, 2)).cumsum(0)
    f = tracking.OneEuroFilter(min_cutoff=1.3, beta=0.04, d_cutoff=0.9)
    got = [xs[0]]
    f.update(xs[0], 1.0)
    for i in range(1, 25):
        got.append(f.update(xs[i], ts[i] - ts[i - 1]))
    got = np.stack(got)
    for k in range(3):
        for d in range(2):
            want = _one_euro_reference(xs[:, k, d], ts, 1.3, 0.04, 0.9)
            np.testing.assert_allclose(got[:, k, d], want, rtol=1e-10)


def test_kalman_matches_matrix_reference():
    rng = np.random.default_rng(2)
    dt, q, r = 0.05, 400.0**2, 3.0**2
    zs = rng.normal(0, 3, (30, 1, 2)) + np.arange(30)[:, None, None] * 2.0
    f = tracking.KalmanFilter(accel_std=400.0, measurement_std=3.0)
    got = np.stack([f.update(z, dt) for z in zs])
    F = np.array([[1, dt], [0, 1]])
    Q = q * np.array([[dt**4 / 4, dt**3 / 2], [dt**3 / 2, dt**2]])
    H = np.array([[1.0, 0.0]])
    for d in range(2):
        x = np.array([zs[0, 0, d], 0.0])
        P = np.array([[r, 0], [0, (r + 1e4) / dt**2]])
        want = [x[0]]
        for z in zs[1:, 0, d]:
            x, P = F @ x, F @ P @ F.T + Q
            S = H @ P @ H.T + r
            Kg = P @ H.T / S
            x = x + (Kg * (z - H @ x)).ravel()
            P = (np.eye(2) - Kg @ H) @ P
            want.append(x[0])
        np.testing.assert_allclose(got[:, 0, d], want, rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# Jitter and lag on a simulated cardiac trajectory


def _trajectory(fps=15.0, seconds=20, amp=15.0, noise=2.0, seed=0):
    t = np.arange(int(fps * seconds)) / fps
    truth = np.stack(
        [256 + amp * np.sin(2 * np.pi * t), 200 + 0.6 * amp * np.sin(2 * np.pi * t + 1) + 5 * t], -1
    )
    truth = np.repeat(truth[:, None, :], 4, axis=1)  # (T, 4 points, 2)
    noisy = truth + np.random.default_rng(seed).normal(0, noise, truth.shape)
    return t, truth, noisy


def test_lag_frames_measures_a_known_delay():
    t, truth, _ = _trajectory()
    delayed = np.concatenate([np.repeat(truth[:1], 3, 0), truth[:-3]])
    assert tracking.lag_frames(delayed[:, 0], truth[:, 0]) == pytest.approx(3.0, abs=0.05)
    assert tracking.lag_frames(truth[:, 0], truth[:, 0]) == pytest.approx(0.0, abs=0.05)


@pytest.mark.parametrize("method,factor", [("kalman", 2.0), ("oneeuro", 1.8)])
def test_smoothing_cuts_jitter_without_lag(method, factor):
    t, truth, noisy = _trajectory()
    tracker = tracking.PointTracker(SCHEMA, method=method, hysteresis="none")
    k = 4
    vis, grp = np.ones(K), np.ones(G)
    coords = np.zeros((len(t), K, 2))
    out = np.zeros_like(coords)
    coords[:, :k] = noisy
    for i, ti in enumerate(t):
        out[i], reported = tracker.update(vis, grp, coords[i], ti)
        assert reported.all()
    smooth = out[:, :k]
    assert tracking.jitter(noisy, truth) / tracking.jitter(smooth, truth) >= factor
    for d in range(2):
        assert tracking.lag_frames(smooth[:, 0, d], truth[:, 0, d]) <= 1.0
    # Error against the truth does not grow much either (it is the same order as the noise).
    assert np.abs(smooth - truth)[30:].mean() < 1.5 * np.abs(noisy - truth).mean()


def test_filter_restarts_when_a_point_returns():
    f = tracking.KalmanFilter()
    for i in range(10):
        f.update(np.array([[100.0 + i, 50.0]]), 0.05)
    f.update(np.array([[0.0, 0.0]]), 0.05, active=np.array([False]))
    out = f.update(np.array([[300.0, 400.0]]), 0.05)
    np.testing.assert_allclose(out, [[300.0, 400.0]])


# ----------------------------------------------------------------------------------------------
# Hysteresis


def _toggles(on):
    return int(np.sum(np.abs(np.diff(np.asarray(on, int), axis=0))))


def test_band_hysteresis_removes_flicker():
    rng = np.random.default_rng(3)
    # The point appears at frame 20 and hovers around the threshold, then leaves at frame 80.
    p = np.where((np.arange(100) >= 20) & (np.arange(100) < 80), 0.55, 0.1)
    p = np.clip(p + rng.normal(0, 0.06, 100), 0, 1)
    raw = p > 0.5
    h = tracking.Hysteresis(0.5, 0.35)
    smooth = np.array([h.update(np.array([x]))[0] for x in p])
    assert _toggles(raw) > 10
    assert _toggles(smooth) == 2
    assert smooth[30:80].all() and not smooth[85:].any()


def test_k_of_n():
    decisions = np.array([0, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0], bool)
    kofn = tracking.KOfN(2, 3)
    got = np.array([kofn.update(np.array([d]))[0] for d in decisions])
    want = [decisions[max(0, i - 2) : i + 1].sum() >= 2 for i in range(len(decisions))]
    np.testing.assert_array_equal(got, want)


def test_tracker_hysteresis_on_groups_and_expect():
    gate = reporting.Gate(SCHEMA, expect="anatomical")
    tracker = tracking.PointTracker(SCHEMA, gate, method="none", margin=0.2)
    coords = np.zeros((K, 2))
    _, rep = tracker.update(np.full(K, 0.9), np.full(G, 0.9), coords)
    anat = SCHEMA.point_group == 0
    np.testing.assert_array_equal(rep, anat)
    _, rep = tracker.update(np.full(K, 0.4), np.full(G, 0.4), coords)  # inside the band: stays on
    np.testing.assert_array_equal(rep, anat)
    _, rep = tracker.update(np.full(K, 0.9), np.full(G, 0.25), coords)  # group drops out
    assert not rep.any()
