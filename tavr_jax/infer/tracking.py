"""Temporal tracking of keypoints in streams: One-Euro / Kalman smoothing, visibility hysteresis.

Every filter is vectorised over points: state arrays are (K, 2) (or (K*2, ...) for the
Kalman filter), one `update` per frame. A point that stops being reported has its filter
reset, so when it comes back it starts from its new measurement instead of gliding from
where it was lost.
"""

from __future__ import annotations

import numpy as np

from tavr_jax.reporting import Gate
from tavr_jax.schema import KeypointSchema

DEFAULT_FPS = 15.0  # typical cine rate of aortography, used when a source has no timing


# ----------------------------------------------------------------------------------------------
# Smoothing filters


def _alpha(cutoff, dt):
    """Exponential smoothing factor of a first-order low-pass with this cutoff (Hz)."""
    tau = 1.0 / (2.0 * np.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """The One-Euro filter (Casiez, Roussel & Vogel, CHI 2012), per coordinate.

    A low-pass whose cutoff rises with speed: `cutoff = min_cutoff + beta * |dx/dt|`; slow
    motion is smoothed hard (jitter), fast motion passes with little lag.
    """

    def __init__(self, *, min_cutoff: float = 3.0, beta: float = 0.01, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.x = self.dx = None  # (K, 2) filtered position and derivative
        self.live = None  # (K,) bool: filter state valid

    def update(self, x: np.ndarray, dt: float, active: np.ndarray | None = None) -> np.ndarray:
        """x (K, 2) measurement, dt seconds since the last update -> (K, 2) filtered."""
        x = np.asarray(x, np.float64)
        active = np.ones(x.shape[0], bool) if active is None else np.asarray(active, bool)
        if self.x is None:
            self.x, self.dx = x.copy(), np.zeros_like(x)
            self.live = np.zeros(x.shape[0], bool)
        fresh = (~self.live)[:, None]
        dx = np.where(fresh, 0.0, (x - self.x) / dt)
        dx_hat = np.where(fresh, 0.0, self.dx + _alpha(self.d_cutoff, dt) * (dx - self.dx))
        cutoff = self.min_cutoff + self.beta * np.abs(dx_hat)
        x_hat = np.where(fresh, x, self.x + _alpha(cutoff, dt) * (x - self.x))
        keep = active[:, None]
        self.x = np.where(keep, x_hat, x)
        self.dx = np.where(keep, dx_hat, 0.0)
        self.live = active.copy()
        return np.where(keep, x_hat, x)


class KalmanFilter:
    """Constant-velocity Kalman filter per coordinate (white-noise acceleration model).

    `accel_std` (pixels/s^2) is the expected random acceleration; `measurement_std` (pixels)
    the detector's noise. State per scalar coordinate: [position, velocity].
    """

    def __init__(self, *, accel_std: float = 400.0, measurement_std: float = 3.0):
        self.q, self.r = accel_std**2, measurement_std**2
        self.s = self.p = None  # (N, 2) state, (N, 2, 2) covariance; N = K * 2
        self.live = None

    def update(self, x: np.ndarray, dt: float, active: np.ndarray | None = None) -> np.ndarray:
        shape = np.shape(x)
        z = np.asarray(x, np.float64).reshape(-1)  # (N,)
        k = shape[0]
        active = np.ones(k, bool) if active is None else np.asarray(active, bool)
        act = np.repeat(active, int(np.prod(shape[1:])))  # (N,)
        n = z.shape[0]
        if self.s is None:
            self.s = np.zeros((n, 2))
            self.p = np.zeros((n, 2, 2))
            self.live = np.zeros(n, bool)
        f = np.array([[1.0, dt], [0.0, 1.0]])
        q = self.q * np.array([[dt**4 / 4, dt**3 / 2], [dt**3 / 2, dt**2]])
        s = self.s @ f.T  # predict: (N, 2)
        p = f @ self.p @ f.T + q  # (N, 2, 2)
        innov = z - s[:, 0]
        var = p[:, 0, 0] + self.r
        gain = p[:, :, 0] / var[:, None]  # (N, 2)
        s = s + gain * innov[:, None]
        p = p - gain[:, :, None] * p[:, None, 0, :]
        # A fresh (or returning) coordinate starts at its measurement with unknown velocity.
        init_p = np.array([[self.r, 0.0], [0.0, (self.r + 1e4) / dt**2]])
        fresh = ~self.live
        s = np.where(fresh[:, None], np.stack([z, np.zeros_like(z)], -1), s)
        p = np.where(fresh[:, None, None], init_p, p)
        self.s = np.where(act[:, None], s, 0.0)
        self.p = np.where(act[:, None, None], p, init_p)
        self.live = act.copy()
        return np.where(act, s[:, 0], z).reshape(shape)


class IdentityFilter:
    """No smoothing (`--track=none`)."""

    def update(self, x, dt, active=None):
        return np.asarray(x, np.float64)


def make_filter(method: str, **kwargs):
    """'oneeuro' | 'kalman' | 'none' -> a filter object with `update(x, dt, active)`."""
    filters = {"oneeuro": OneEuroFilter, "kalman": KalmanFilter, "none": IdentityFilter}
    try:
        return filters[method](**kwargs)
    except KeyError:
        raise ValueError(f"--track must be one of {', '.join(filters)}, got {method!r}") from None


# ----------------------------------------------------------------------------------------------
# Visibility hysteresis


class Hysteresis:
    """Per-element on/off state: turns on above `t_on`, off only below `t_off` (< t_on)."""

    def __init__(self, t_on, t_off):
        self.t_on = np.asarray(t_on, np.float64)
        self.t_off = np.asarray(t_off, np.float64)
        if np.any(self.t_off > self.t_on):
            raise ValueError("hysteresis needs t_off <= t_on")
        self.on = None

    def update(self, probability: np.ndarray) -> np.ndarray:
        probability = np.asarray(probability, np.float64)
        if self.on is None:
            self.on = np.zeros(probability.shape, bool)
        self.on = np.where(self.on, probability >= self.t_off, probability > self.t_on)
        return self.on.copy()


class KOfN:
    """Per-element state: on when at least k of the last n raw decisions were on."""

    def __init__(self, k: int, n: int):
        if not 1 <= k <= n:
            raise ValueError(f"k-of-n needs 1 <= k <= n, got k={k}, n={n}")
        self.k, self.n = k, n
        self.history = None  # (n, ...) ring buffer
        self.t = 0

    def update(self, decision: np.ndarray) -> np.ndarray:
        decision = np.asarray(decision, bool)
        if self.history is None:
            self.history = np.zeros((self.n, *decision.shape), bool)
        self.history[self.t % self.n] = decision
        self.t += 1
        return self.history.sum(axis=0) >= self.k


# ----------------------------------------------------------------------------------------------
# The per-stream tracker


class PointTracker:
    """Gating with hysteresis, then smoothing of the reported points, frame by frame.

    `hysteresis="band"` keeps a point (group) on until its probability drops `margin` below
    its threshold; `"kofn"` reports a point when it passed the gate in k of the last n frames.
    """

    def __init__(
        self,
        schema: KeypointSchema,
        gate: Gate | None = None,
        *,
        method: str = "kalman",
        hysteresis: str = "band",
        margin: float = 0.15,
        k_of_n: tuple[int, int] = (2, 3),
        fps: float | None = None,
        **filter_kwargs,
    ):
        self.schema = schema
        self.gate = gate or Gate(schema)
        self.filter = make_filter(method, **filter_kwargs)
        self.hysteresis = hysteresis
        self.default_dt = 1.0 / (fps or DEFAULT_FPS)
        g = self.gate
        if hysteresis == "band":
            self._points = Hysteresis(
                g.point_thresholds, np.maximum(g.point_thresholds - margin, 0)
            )
            self._groups = Hysteresis(
                g.group_thresholds, np.maximum(g.group_thresholds - margin, 0)
            )
        elif hysteresis == "kofn":
            self._kofn = KOfN(*k_of_n)
        elif hysteresis != "none":
            raise ValueError(f"hysteresis must be band, kofn or none, got {hysteresis!r}")
        self._last_t = None

    def _dt(self, time_s: float | None) -> float:
        if time_s is None or self._last_t is None or time_s <= self._last_t:
            dt = self.default_dt
        else:
            dt = time_s - self._last_t
        self._last_t = (self._last_t or 0.0) + dt if time_s is None else time_s
        return dt

    def update(self, visibility, group, coords, time_s: float | None = None):
        """One frame: probabilities (K,), (G,) and pixels (K, 2) -> (coords, reported (K,))."""
        if self.hysteresis == "band":
            point_on = self._points.update(visibility)
            group_on = self._groups.update(group) & self.gate.expected
            reported = point_on & group_on[self.schema.point_group]
        elif self.hysteresis == "kofn":
            reported = self._kofn.update(self.gate(visibility, group))
        else:
            reported = self.gate(visibility, group)
        smoothed = self.filter.update(coords, self._dt(time_s), reported)
        return smoothed, reported


# ----------------------------------------------------------------------------------------------
# Measurements used by the tests and the docs


def jitter(track: np.ndarray, truth: np.ndarray | None = None) -> float:
    """Mean |second difference| of a (T, ...) trajectory, or of its deviation from `truth`.

    Against a moving truth the deviation isolates the noise from the true curvature.
    """
    x = np.asarray(track, np.float64)
    if truth is not None:
        x = x - np.asarray(truth, np.float64)
    return float(np.mean(np.abs(np.diff(x, n=2, axis=0))))


def lag_frames(estimate: np.ndarray, truth: np.ndarray, max_lag: int = 10) -> float:
    """Delay of `estimate` behind `truth` (frames, sub-frame), by cross-correlating velocities.

    Both are (T,) or (T, D); the peak of the cross-correlation of their first differences is
    refined by a parabola through its neighbours.
    """
    e = np.diff(np.asarray(estimate, np.float64), axis=0)
    e = e.reshape(len(e), -1)
    t = np.diff(np.asarray(truth, np.float64), axis=0).reshape(e.shape)
    e, t = e - e.mean(0), t - t.mean(0)
    lags = np.arange(-max_lag, max_lag + 1)
    n = len(e)
    corr = np.array(
        [np.sum(e[max(0, d) : n + min(0, d)] * t[max(0, -d) : n - max(0, d)]) for d in lags]
    )
    i = int(np.argmax(corr))
    if 0 < i < len(lags) - 1:
        a, b, c = corr[i - 1], corr[i], corr[i + 1]
        denom = a - 2 * b + c
        return float(lags[i] + (0.5 * (a - c) / denom if denom != 0 else 0.0))
    return float(lags[i])
