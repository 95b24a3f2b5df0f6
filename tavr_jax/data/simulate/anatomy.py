"""Geometry and anatomy of a simulated case: drawing helpers, the contrast-filled aortic root
and the thorax, each computed once per case."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from tavr_jax.data.simulate.params import CaseParams

SHIFT = 4  # cv2 sub-pixel bits
ONE = 1 << SHIFT

# Attenuation (mu * length, dimensionless) per mm of path or per drawn layer at full value.
MU_CONTRAST = 0.055  # per mm of fully opacified blood (diluted iodine at ~60 keV, above water)
_BONE = 0.55  # attenuation of a vertebral body's full chord above soft tissue


# ----------------------------------------------------------------------------- geometry helpers


def affine3(a: np.ndarray) -> np.ndarray:
    """A 2x3 affine as 3x3."""
    return np.vstack([a, [0.0, 0.0, 1.0]])


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(3,3) affine applied to (..., 2) points."""
    return pts @ m[:2, :2].T + m[:2, 2]


def bezier(p0, p1, p2, p3, n: int) -> np.ndarray:
    """(n, D) points of a cubic Bezier curve."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = (np.asarray(p, np.float64) for p in (p0, p1, p2, p3))
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def fixed_point(pts: np.ndarray) -> np.ndarray:
    """Pixel coordinates -> int32 fixed point for cv2 drawing with `SHIFT`."""
    return np.round(np.asarray(pts) * ONE).astype(np.int32)


def polyline(img, pts, value, thickness_px):
    pts = np.asarray(pts)
    if len(pts) < 2:
        return
    t = max(1, int(round(thickness_px)))
    cv2.polylines(img, [fixed_point(pts)], False, int(value), t, cv2.LINE_AA, SHIFT)


def tube(img, pts, value, diameter_px):
    # A round tube has a chord profile: thick faint pass plus a thinner core.
    polyline(img, pts, value * 0.6, diameter_px)
    polyline(img, pts, value, diameter_px * 0.55)


def smooth_noise(rng, shape, sigma):
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def clip_polyline(pts: np.ndarray, box: tuple[float, float, float, float]):
    """First point where a polyline (ordered proximal -> distal) enters `box`, and the rest.

    Returns (entry point (2,), index of the first vertex after it) or None if it never enters.
    """
    x0, y0, x1, y1 = box
    inside = (pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)
    if not inside.any():
        return None
    j = int(np.argmax(inside))
    if j == 0:
        return pts[0], 1
    p, q = pts[j - 1], pts[j]
    # Largest step fraction at which p + t (q - p) is still outside: bisect (robust, exact enough).
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        r = p + mid * (q - p)
        if x0 <= r[0] <= x1 and y0 <= r[1] <= y1:
            hi = mid
        else:
            lo = mid
    return p + hi * (q - p), j


def arclength_point(pts: np.ndarray, fraction: float) -> np.ndarray:
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    target = fraction * cum[-1]
    return np.array([np.interp(target, cum, pts[:, 0]), np.interp(target, cum, pts[:, 1])])


def project(beta: float, pts3: np.ndarray) -> np.ndarray:
    """Root-local 3D (x, u along the root axis, w depth) mm -> canonical (a, b) mm."""
    cb, sb = math.cos(beta), math.sin(beta)
    return np.stack([pts3[..., 0], pts3[..., 1] * cb - pts3[..., 2] * sb], axis=-1)


# ----------------------------------------------------------------------------- the aortic root


def root_radius(p: CaseParams, u, cos_phi):
    """Wall radius of the root (mm) at height u and azimuth cos(phi), and the cusp lobe."""
    r0 = (
        p.r_annulus
        + (p.r_stj - p.r_annulus) * np.clip(u / p.h_sinus, 0.0, 1.0)
        + (p.r_aorta - p.r_stj) * np.clip((u - p.h_sinus) / 20.0, 0.0, 1.0)
    )
    lobe = np.sqrt(np.clip(0.5 * (1.0 + 4.0 * cos_phi**3 - 3.0 * cos_phi), 0, 1))  # cos 3 phi
    x = np.clip(u / p.h_sinus, 0.0, 1.0)
    bulge = p.bulge * 6.75 * x * (1.0 - x) ** 2 * (1.0 + 0.8 * x) / 1.25  # peak at ~0.4
    return r0 + bulge * lobe, lobe


def centerline(p: CaseParams, u):
    """Lateral offset (mm) of the curved ascending aorta's axis at height u."""
    return p.curvature * np.maximum(u - p.h_sinus, 0.0) ** 2


def root_map(p: CaseParams, beta: float, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """The contrast-filled root's attenuation on a canonical mm grid, once per case.

    Returns (grid, map): `grid` the 3x3 affine from grid pixels to canonical mm.
    """
    g = max(p.spacing_mm, 0.3)
    span = size * p.spacing_mm * 0.95 + 25.0  # annulus to the farthest corner, plus motion
    b_lo, b_hi = -8.0, span
    a_lo = -(p.r_aorta + p.bulge) - 30.0
    a_hi = p.r_aorta + p.bulge + p.curvature * span**2 + 30.0
    a_hi = min(a_hi, span)
    nx, ny = int((a_hi - a_lo) / g) + 1, int((b_hi - b_lo) / g) + 1
    grid = affine3(np.array([[g, 0.0, a_lo], [0.0, -g, b_hi]]))  # grid px -> canonical mm
    a = a_lo + g * np.arange(nx, dtype=np.float32)
    b = b_hi - g * np.arange(ny, dtype=np.float32)
    thick = np.zeros((ny, nx), np.float32)
    cb, sb = math.cos(beta), math.sin(beta)
    # Ascending aorta above the sinuses: a tilted cylinder, chord 2 sqrt(R^2 - d^2) / cos beta.
    b_split = (p.h_sinus + 24.0) * cb
    top = b > b_split
    u_top = b[top] / cb
    d = a[None, :] - centerline(p, u_top)[:, None]
    thick[top] = 2.0 * np.sqrt(np.maximum(p.r_aorta**2 - d**2, 0.0)) / cb
    # Root (sinuses, leaflets): numeric line integral along the view direction.
    rows = ~top
    r_max = p.r_aorta + p.bulge
    sel = np.abs(a) < r_max + 4.0
    nz = 28
    z = np.linspace(-r_max - 6.0, r_max + 6.0, nz, dtype=np.float32)
    dz = float(z[1] - z[0])
    B, A, Z = b[rows][:, None, None], a[sel][None, :, None], z[None, None, :]
    u = B * cb + Z * sb
    w = -B * sb + Z * cb
    ax = A - centerline(p, u)
    rho = np.sqrt(ax * ax + w * w) + 1e-6
    tc = math.pi / 2 + p.cusp_phase  # the front cusp faces the viewer
    cos_phi = (ax * math.cos(tc) + w * math.sin(tc)) / rho
    r_wall, lobe = root_radius(p, u, cos_phi)
    q = np.clip(rho / r_wall, 0.0, 1.0)
    # Closed leaflets: contrast stops at a surface that meets the wall at the annulus in the
    # cusps, rises to the commissures and to the coaptation centre.
    floor = 0.8 * p.h_sinus * np.exp(-lobe / 0.06) * q**2 + 0.45 * p.h_sinus * (1 - q) ** 2
    inside = np.clip((r_wall - rho) / dz + 0.5, 0, 1) * np.clip((u - floor) / dz + 0.5, 0, 1)
    root = inside.sum(axis=2) * dz
    block = thick[rows]
    block[:, sel] = root
    thick[rows] = block
    thick *= MU_CONTRAST
    # Coronary arteries from the left and front (right coronary) sinuses.
    cor = np.zeros((ny, nx), np.uint8)
    to_grid = np.linalg.inv(grid)
    for side in (-1.0, 1.0):
        start = np.array([side * (p.r_annulus + 0.45 * p.bulge), 0.55 * p.h_sinus])
        direction = np.array([side * 0.9, -0.45])
        pts = [start]
        for _ in range(40):
            direction = direction + rng.normal(0, 0.12, 2)
            direction /= np.linalg.norm(direction)
            direction[1] = min(direction[1], 0.2)
            pts.append(pts[-1] + 2.0 * direction)
        pts = apply_affine(to_grid, np.array(pts))
        for j in range(0, 40, 8):  # tapering
            polyline(cor, pts[j : j + 9], 255, (3.8 - j * 0.05) / g)
        branch = pts[10] + np.cumsum(rng.normal([side * 0.4, 1.0], 0.3, (25, 2)), axis=0) * 2.0 / g
        polyline(cor, np.vstack([pts[10], branch]), 255, 2.4 / g)
    thick += cor.astype(np.float32) * (3.2 * MU_CONTRAST / 255.0)
    return grid, cv2.GaussianBlur(thick, (0, 0), 0.6)


# ---- thorax

# ----------------------------------------------------------------------------- the thorax


@dataclasses.dataclass(frozen=True)
class Thorax:
    """The static scene of one case, at full resolution unless stated."""

    static: np.ndarray  # (S, S) float32 attenuation that does not move
    moving: np.ndarray  # heart and diaphragm attenuation at reduced resolution
    moving_scale: float  # size of `moving` over S
    n0: np.ndarray  # (S, S) float32 incident counts (dose, vignetting, anode heel)
    window: tuple[float, float]  # log-count display window (lo, hi) at full dose


def thorax(p: CaseParams, size: int, rng) -> Thorax:
    """The thorax, shutters and fluence of one case (mirrored with the view when it is)."""
    n = size
    m = max(32, n // 4)  # smooth anatomy at quarter resolution
    h = max(64, n // 2)  # bones at half resolution
    mm_lo = p.spacing_mm * n / m
    cx, cy = p.center[0] / n, p.center[1] / n
    ys, xs = np.mgrid[0:m, 0:m].astype(np.float32)
    X, Y = (xs + 0.5) / m, (ys + 0.5) / m
    fov = n * p.spacing_mm
    # heart: an ellipsoid shadow below-left of the root; diaphragm/liver dome at the bottom
    hx, hy = cx + 40.0 / fov, cy + 60.0 / fov
    ang = math.radians(rng.uniform(-45, -20))
    dx, dy = X - hx, Y - hy
    ex = (dx * math.cos(ang) + dy * math.sin(ang)) / (rng.uniform(70, 85) / fov)
    ey = (-dx * math.sin(ang) + dy * math.cos(ang)) / (rng.uniform(50, 62) / fov)
    heart = np.sqrt(np.clip(1.0 - ex**2 - ey**2, 0, 1))
    dome = cy + rng.uniform(70, 110) / fov + 0.6 * (X - cx + 0.1) ** 2
    diaphragm = np.clip((Y - dome) / (20.0 / fov), 0, 1)
    moving = 0.75 * heart + 0.9 * diaphragm
    # mediastinum (denser band around the aorta and spine) and lungs with vessel texture
    spine_x = cx + rng.uniform(55, 95) / fov
    medi = np.exp(-(((X - (cx + spine_x) / 2) / (55.0 / fov)) ** 2))
    lung = np.clip(1.0 - medi - heart - diaphragm, 0, 1)
    texture = 0.6 * smooth_noise(rng, (m, m), 3.0 / mm_lo) + 0.4 * smooth_noise(
        rng, (m, m), 1.2 / mm_lo
    )
    static = 4.6 + 0.45 * medi + 0.02 * texture + 0.04 * lung * texture - 0.35 * lung
    static = static + 0.25 * smooth_noise(rng, (m, m), 25.0 / mm_lo) * 0.4
    # Spine at half resolution, vectorised: vertebral bodies seen as elliptic cylinders
    # (chord profile), denser cortical rims and endplates, pedicle rings, disc spaces.
    yh, xh = np.mgrid[0:h, 0:h].astype(np.float32)
    x_mm, y_mm = (xh + 0.5) * (fov / h), (yh + 0.5) * (fov / h)
    lean = rng.uniform(-0.1, 0.1)
    xs = x_mm - spine_x * fov - lean * (y_mm - 0.5 * fov)
    body_w, body_h, disc = rng.uniform(34, 44), rng.uniform(21, 26), rng.uniform(6, 8)
    pitch = body_h + disc
    ly = np.mod(y_mm - rng.uniform(0, pitch), pitch)
    sig = lambda d, w: 1.0 / (1.0 + np.exp(-d / w))  # noqa: E731
    vert = sig(ly, 0.7) * sig(body_h - ly, 0.7)
    half_w = 0.5 * body_w * (1.0 - 0.07 * np.sin(np.pi * np.clip(ly / body_h, 0, 1)))
    chord = np.sqrt(np.clip(1.0 - (xs / half_w) ** 2, 0.0, 1.0))
    rim = np.exp(-(((np.abs(xs) - half_w) / 1.3) ** 2)) * vert
    plates = (np.exp(-((ly / 1.3) ** 2)) + np.exp(-(((body_h - ly) / 1.3) ** 2))) * chord
    ped_r = np.sqrt(((np.abs(xs) - 0.3 * body_w) / 4.5) ** 2 + ((ly - 0.3 * body_h) / 6.5) ** 2)
    pedicle = np.exp(-(((ped_r - 1.0) / 0.25) ** 2)) * 0.6 + np.exp(-(ped_r**2)) * 0.2
    spinous = np.exp(-((xs / 3.0) ** 2) - (((ly - 0.55 * pitch) / 7.0) ** 2)) * 0.5
    bones = (
        0.55 * chord * (0.45 + 0.55 * vert) + 0.35 * rim + 0.25 * plates + 0.4 * pedicle + spinous
    )
    bones += 0.25 * np.exp(-((xs / (0.9 * body_w)) ** 2))  # paraspinal muscle and posterior arch
    # Ribs: hollow bony bands arcing laterally and down from the spine, faint.
    ribs = np.zeros((h, h), np.uint8)
    sc = h / fov  # half-res px per mm
    for k in range(-2, int(fov / pitch) + 3):
        yr = (k * pitch + rng.uniform(-3, 3)) * sc
        xc = (spine_x * fov + lean * (k * pitch - 0.5 * fov)) * sc
        for side in (-1, 1):
            length = rng.uniform(150, 230) * sc
            tt = np.linspace(0, 1, 30)[:, None]
            drop = rng.uniform(0.1, 0.3) * tt + rng.uniform(0.25, 0.45) * tt**2
            path = np.hstack([xc + side * tt * length, yr + drop * length])
            polyline(ribs, path, 200, rng.uniform(9, 12) * sc)
            polyline(ribs, path, 110, 6 * sc)  # marrow: the cortex shows as two edges
    bones += 0.45 * ribs.astype(np.float32) / 255.0
    bones = cv2.GaussianBlur(bones, (0, 0), 0.8 * h / fov)
    full = cv2.resize(static.astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC)
    full += cv2.resize(bones * _BONE, (n, n), interpolation=cv2.INTER_LINEAR)
    # collimator shutters (lead, soft-edged) and ECG electrodes / leads
    extra = np.zeros((n, n), np.uint8)
    for _ in range(int(rng.integers(0, 3))):
        e = rng.uniform(0.05, 0.95, 2) * n
        # electrode: a faint disc with a dense metal snap in the middle
        centre = tuple(int(v) for v in fixed_point(e))
        cv2.circle(extra, centre, int(11 / p.spacing_mm * ONE), 50, -1, cv2.LINE_AA, SHIFT)
        cv2.circle(extra, centre, int(3 / p.spacing_mm * ONE), 255, -1, cv2.LINE_AA, SHIFT)
        lead = bezier(
            e,
            e + rng.normal(0, 60, 2) / p.spacing_mm,
            e + rng.normal(0, 90, 2) / p.spacing_mm,
            e + rng.normal(0, 200, 2) / p.spacing_mm,
            40,
        )
        polyline(extra, lead, 110, 1.2 / p.spacing_mm)
    full += extra.astype(np.float32) * (0.5 / 255.0)
    x = np.arange(n, dtype=np.float32)
    l, t, r, b = np.asarray(p.shutters) * n
    soft = 1.5 * (n / 512.0)  # shutter edge width; pixel sizes are tuned at 512
    edge = lambda d: 1.0 / (1.0 + np.exp(d / soft))  # noqa: E731
    col = np.zeros(n, np.float32)
    row = np.zeros(n, np.float32)
    if l > 0:
        col = np.maximum(col, edge(x - l))
    if r > 0:
        col = np.maximum(col, edge((n - 1 - r) - x))
    if t > 0:
        row = np.maximum(row, edge(x - t))
    if b > 0:
        row = np.maximum(row, edge((n - 1 - b) - x))
    shutter = np.maximum(row[:, None], col[None, :])
    full += 2.2 * shutter
    del shutter
    # image-intensifier vignetting and anode heel: multiplicative on the incident fluence
    rr = ((x[None, :] - n / 2) ** 2 + (x[:, None] - n / 2) ** 2) / (0.5 * n) ** 2
    fluence = (1.0 - p.vignetting * np.clip(rr, 0, 2) / 2.0) * (1.0 + 0.08 * (x[None, :] / n - 0.5))
    moving = moving.astype(np.float32)
    if p.mirror:
        full, fluence, moving = full[:, ::-1], fluence[:, ::-1], moving[:, ::-1]
        full = full.copy()
        moving = moving.copy()
    static = np.ascontiguousarray(full, np.float32)
    a_med = float(np.median(static)) + 0.4
    n0 = (p.dose * math.exp(a_med) * fluence).astype(np.float32)
    # display window of log counts: from the brightest lung to dense contrast over bone
    # grey 150 at the median thorax, about 80 grey levels per unit of attenuation
    a_mid = float(np.median(static[::4, ::4]))
    lo_a, hi_a = a_mid - 1.3, a_mid + 1.9
    window = (math.log(p.dose) + a_med - hi_a, math.log(p.dose) + a_med - lo_a)
    return Thorax(
        static=static,
        moving=np.ascontiguousarray(moving, np.float32),
        moving_scale=m / n,
        n0=n0,
        window=window,
    )
