"""Physics-based simulator of TAVR aortography and fluoroscopy frames with exact keypoints.

What it models (docs/data.md has the details and a picture):
- X-ray transmission by Beer-Lambert, I = I0 exp(-sum mu * length), through a per-case scene:
  a thorax (soft tissue, lungs, heart and diaphragm shadows, spine with vertebral bodies and
  pedicles, ribs), a contrast-filled aortic root (annulus, three sinuses of Valsalva, closed
  leaflets, sinotubular junction, curved ascending aorta, coronary ostia and arteries), a
  pigtail catheter with its loop in a sinus, a guidewire, the delivery system (shaft, capsule
  with marker band, nose cone) and a self-expanding valve frame (diamond lattice) that opens
  from its inflow edge as the capsule retracts.
- Quantum noise: detected counts are Poisson(lambda); we draw them by the normal approximation
  N(lambda, lambda), which is accurate for the counts here (lambda >~ 40 per pixel) and 5x faster
  than numpy's exact sampler. Then detector blur (Gaussian PSF), log display window,
  collimator shutters, image-intensifier vignetting and burned-in text (cv2.putText).
- A case is one patient and view (anatomy, zoom, in- and out-of-plane tilt, left/right mirror,
  dose); its frames are runs of a 15 frames/s cine through the procedure stages `STAGES`, with
  smooth cardiac and respiratory motion, so tracking can be tested on them.

Keypoints are exact by construction (projections of the 3D landmarks through the same transform
as the pixels) and follow SPEC.md; a point is visible when its structure is shown (contrast for
the anatomy, the device present) and it lies inside the exposed field. Left/right pairs follow
"left in the image is 1" in every view, mirrored or not.

Schemas: point names are mapped by name to `SIMULATED_POINTS`. A schema naming points the
simulator cannot draw (e.g. 'reference10': FE1_o, EC1, CT1, ...) raises ValueError listing
them, unless `allow_missing=True`, in which case those points are always invisible.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib

import cv2
import numpy as np

from tavr_jax.schema import KeypointSchema

STAGES = ("aortogram", "positioning", "deployment", "post_deployment", "fluoroscopy")
SIMULATED_POINTS = ("AA1", "AA2", "STJ1", "STJ2", "CP", "CM", "CD", "CT", "PT", "FE1", "FE2")
_LEFT_RIGHT = (("AA1", "AA2"), ("STJ1", "STJ2"), ("FE1", "FE2"))
FPS = 15.0  # cine frame rate of a series
CONTRAST_VISIBLE = 0.35  # opacification from which the root's landmarks count as visible
_STAGE_WEIGHTS = (0.26, 0.24, 0.24, 0.16, 0.10)
_SHIFT = 4  # cv2 sub-pixel bits
_ONE = 1 << _SHIFT

# Attenuation (mu * length, dimensionless) per mm of path or per drawn layer at full value.
_MU_CONTRAST = 0.055  # per mm of fully opacified blood (diluted iodine at ~60 keV, above water)
_BONE = 0.55  # attenuation of a vertebral body's full chord above soft tissue


# ----------------------------------------------------------------------------- case parameters


@dataclasses.dataclass(frozen=True)
class CaseParams:
    """Everything random about one case (patient anatomy, view, devices, dose)."""

    seed: int  # seeds the background textures and per-case details
    # view
    spacing_mm: float  # mm per pixel at the isocentre
    center: tuple[float, float]  # annulus centre in the unmirrored image, pixels
    tilt_deg: float  # in-plane angle of the root axis from vertical (leans right going up)
    beta_deg: float  # out-of-plane tilt of the root axis (foreshortening of the annulus)
    mirror: bool  # horizontal flip of the whole scene (a right-left swapped view)
    # anatomy, mm
    r_annulus: float
    h_sinus: float  # annulus to sinotubular junction
    r_stj: float
    r_aorta: float
    bulge: float  # sinus bulge amplitude
    cusp_phase: float  # rotation of the cusps about the root axis, radians
    curvature: float  # lateral bend of the ascending aorta, 1/mm
    # devices, mm and radians
    pigtail_sinus: int  # 0 left, 1 front, 2 right sinus
    pigtail_radius: float
    pigtail_normal: tuple[float, float, float]
    valve_length: float
    valve_cells: int
    valve_rows: int
    implant_depth: float  # inflow edge below the annulus at the final position
    delivery_angle: float  # angle of the delivery axis to the root axis, in plane
    delivery_offset: float  # lateral offset of the delivery axis at the annulus
    capsule_diameter: float
    nose_length: float
    # physiology and acquisition
    heart_rate_bpm: float
    cardiac_amp_mm: float
    resp_period_s: float
    resp_amp_mm: float
    dose: float  # mean detected counts per pixel behind the thorax (cine)
    blur_px: float  # detector PSF sigma at 512 px
    shutters: tuple[float, float, float, float]  # collimated margins (left, top, right, bottom)
    vignetting: float
    view_label: str  # burned-in text, e.g. "LAO 18 CRA 6"


def sample_case(rng: np.random.Generator, size: int) -> CaseParams:
    """Draws the parameters of one case for square frames of `size` pixels."""
    u = rng.uniform
    fov_mm = u(150.0, 230.0)
    r_a = u(10.0, 14.0)
    shutters = tuple(float(u(0.02, 0.12)) if rng.random() < 0.35 else 0.0 for _ in range(4))
    n = rng.normal(size=3) * (0.45, 0.45, 0.0) + (0.0, 0.0, 1.0)
    lao = int(rng.integers(5, 35))
    cra = int(rng.integers(-15, 16))
    view = f"LAO {lao} {'CRA' if cra >= 0 else 'CAU'} {abs(cra)}"
    return CaseParams(
        seed=int(rng.integers(2**31)),
        spacing_mm=fov_mm / size,
        center=(float(u(0.38, 0.6) * size), float(u(0.5, 0.68) * size)),
        tilt_deg=float(u(5.0, 35.0)),
        beta_deg=float(u(-12.0, 12.0)),
        mirror=bool(rng.random() < 0.3),
        r_annulus=float(r_a),
        h_sinus=float(u(16.0, 22.0)),
        r_stj=float(r_a * u(0.95, 1.08)),
        r_aorta=float(r_a * u(1.08, 1.3)),
        bulge=float(r_a * u(0.55, 0.8)),
        cusp_phase=float(u(-0.25, 0.25)),
        curvature=float(u(0.0015, 0.005)),
        pigtail_sinus=int(rng.integers(3)),
        pigtail_radius=float(u(3.5, 5.0)),
        pigtail_normal=tuple(float(v) for v in n / np.linalg.norm(n)),
        valve_length=float(u(40.0, 52.0)),
        valve_cells=int(rng.integers(9, 13)),
        valve_rows=int(rng.integers(5, 8)),
        implant_depth=float(u(2.0, 7.0)),
        delivery_angle=float(np.deg2rad(u(-8.0, 8.0))),
        delivery_offset=float(u(-2.5, 2.5)),
        capsule_diameter=float(u(6.0, 7.5)),
        nose_length=float(u(11.0, 16.0)),
        heart_rate_bpm=float(u(55.0, 100.0)),
        cardiac_amp_mm=float(u(2.0, 5.0)),
        resp_period_s=float(u(3.0, 5.0)),
        resp_amp_mm=float(u(0.5, 5.0)),
        dose=float(u(200.0, 700.0)),
        blur_px=float(u(0.6, 1.0)),
        shutters=shutters,
        vignetting=float(u(0.15, 0.4)),
        view_label=view,
    )


@dataclasses.dataclass(frozen=True)
class FrameState:
    """What changes from frame to frame: procedure stage, contrast, devices, time."""

    stage: str
    time_s: float
    contrast: float = 0.0  # opacification of the root, 0..1
    pigtail: bool = False
    delivery: bool = False
    advance_mm: float = 0.0  # delivery system above its final position along its axis
    retract: float = 0.0  # capsule retraction, 0 (valve loaded) .. 1 (frame fully uncovered)
    released: bool = False  # frame fully expanded and left in place
    delivery_retrieved: bool = False  # after release: nose cone pulled back above the frame
    dose_scale: float = 1.0  # 1 for cine, < 1 for plain fluoroscopy (noisier)


def _injection(tau: np.ndarray, start: float, peak: float) -> np.ndarray:
    """Opacification of a contrast injection: wash-in 0.6 s, plateau, wash-out from 2.6 s."""
    t = tau - start
    rise = np.clip(t / 0.6, 0.0, 1.0)
    fall = np.clip((t - 2.6) / 1.4, 0.0, 1.0)
    s = lambda x: x * x * (3 - 2 * x)  # noqa: E731 (smoothstep)
    return peak * s(rise) * (1.0 - s(fall))


def sample_schedule(rng: np.random.Generator, frames: int) -> list[FrameState]:
    """Splits `frames` into 1-4 cine runs of procedure stages in procedure order."""
    n_runs = int(np.clip(round(frames / 20), 1, 4))
    n_runs = min(n_runs, frames)
    stages = sorted(rng.choice(len(STAGES), size=n_runs, p=_STAGE_WEIGHTS))
    cuts = np.sort(rng.choice(np.arange(1, frames), size=n_runs - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [frames]]))
    states: list[FrameState] = []
    clock = float(rng.uniform(0, 10))
    for stage_index, n in zip(stages, lengths, strict=True):
        stage = STAGES[stage_index]
        dt = 1.0 / FPS
        duration = {"positioning": 6.0, "deployment": 14.0}.get(stage, 3.6)
        tau0 = float(rng.uniform(0.0, max(duration - n * dt, 0.0)))
        tau = tau0 + dt * np.arange(n)
        peak = rng.uniform(0.75, 1.0)
        if stage in ("aortogram", "post_deployment"):
            contrast = _injection(tau, rng.uniform(-0.3, 0.3), peak)
        elif stage in ("positioning", "deployment") and rng.random() < 0.5:
            contrast = _injection(tau, rng.uniform(-1.0, 2.0), peak * rng.uniform(0.6, 1.0))
        else:
            contrast = np.zeros(n)
        fluoro_kind = int(rng.integers(3))  # plain fluoroscopy: before, during or after
        retrieved = bool(rng.random() < 0.5)
        pigtail = bool(rng.random() < 0.92)
        for i in range(n):
            kw = dict(
                stage=stage,
                time_s=clock + tau[i] - tau0,
                contrast=float(contrast[i]),
                pigtail=pigtail,
            )
            if stage == "positioning" or (stage == "fluoroscopy" and fluoro_kind == 1):
                kw.update(delivery=True, advance_mm=float(18.0 * (1.0 - tau[i] / 6.0) ** 2))
            elif stage == "deployment":
                kw.update(delivery=True, retract=float(np.clip(tau[i] / 14.0, 0.0, 1.0)))
            elif stage == "post_deployment" or (stage == "fluoroscopy" and fluoro_kind == 2):
                kw.update(released=True, delivery=retrieved, delivery_retrieved=retrieved)
            if stage == "fluoroscopy":
                kw.update(dose_scale=0.35)
            states.append(FrameState(**kw))
        clock += n * dt + float(rng.uniform(5.0, 60.0))
    return states


# ----------------------------------------------------------------------------- geometry helpers


def _mat(a: np.ndarray) -> np.ndarray:
    """A 2x3 affine as 3x3."""
    return np.vstack([a, [0.0, 0.0, 1.0]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(3,3) affine applied to (..., 2) points."""
    return pts @ m[:2, :2].T + m[:2, 2]


def _bezier(p0, p1, p2, p3, n: int) -> np.ndarray:
    """(n, D) points of a cubic Bezier curve."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = (np.asarray(p, np.float64) for p in (p0, p1, p2, p3))
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _fixed(pts: np.ndarray) -> np.ndarray:
    """Pixel coordinates -> int32 fixed point for cv2 drawing with `_SHIFT`."""
    return np.round(np.asarray(pts) * _ONE).astype(np.int32)


def _polyline(img, pts, value, thickness_px):
    pts = np.asarray(pts)
    if len(pts) < 2:
        return
    t = max(1, int(round(thickness_px)))
    cv2.polylines(img, [_fixed(pts)], False, int(value), t, cv2.LINE_AA, _SHIFT)


def _tube(img, pts, value, diameter_px):
    # A round tube has a chord profile: thick faint pass plus a thinner core.
    _polyline(img, pts, value * 0.6, diameter_px)
    _polyline(img, pts, value, diameter_px * 0.55)


def _smooth_noise(rng, shape, sigma):
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def _clip_polyline(pts: np.ndarray, box: tuple[float, float, float, float]):
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


def _arclength_point(pts: np.ndarray, fraction: float) -> np.ndarray:
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    target = fraction * cum[-1]
    return np.array([np.interp(target, cum, pts[:, 0]), np.interp(target, cum, pts[:, 1])])


# ----------------------------------------------------------------------------- the renderer


class CaseRenderer:
    """Renders the frames of one case; the static scene is computed once here."""

    def __init__(self, params: CaseParams, size: int):
        self.p = params
        self.size = int(size)
        if self.size < 32:
            raise ValueError(f"frame size must be at least 32 pixels, got {size}")
        self.k = self.size / 512.0  # pixel-size-dependent constants are tuned at 512
        rng = np.random.default_rng(params.seed)
        p = params
        s = 1.0 / p.spacing_mm
        al = math.radians(p.tilt_deg)
        self.beta = math.radians(p.beta_deg)
        cx, cy = p.center
        # canonical root frame (a right, b up along the projected root axis, mm) -> image px
        # The root axis leans left going up (ascending aorta towards the patient's right), so the
        # annulus rises to the right: the lower hinge point is the left one, as in SPEC.md.
        view = np.array(
            [[s * math.cos(al), -s * math.sin(al), cx], [-s * math.sin(al), -s * math.cos(al), cy]]
        )
        self.view = _mat(view)
        self.flip = (
            np.array([[-1.0, 0, self.size - 1], [0, 1, 0], [0, 0, 1]]) if p.mirror else np.eye(3)
        )
        sh = np.asarray(p.shutters) * self.size
        self.field = (sh[0], sh[1], self.size - 1 - sh[2], self.size - 1 - sh[3])
        if p.mirror:
            self.field = (sh[2], sh[1], self.size - 1 - sh[0], self.size - 1 - sh[3])
        self._build_root_map(rng)
        self._build_background(rng)
        self._build_devices(rng)

    # ---- transforms
    def frame_transform(self, state: FrameState) -> np.ndarray:
        """3x3 affine from canonical root mm to image pixels for one frame (motion included)."""
        p = self.p
        t = state.time_s
        ph = 2 * math.pi * (t * p.heart_rate_bpm / 60.0) + p.seed % 7
        # Systolic excursion: mostly along the root axis, a little lateral; smooth in time.
        c = math.sin(ph) + 0.35 * math.sin(2 * ph + 0.8)
        da, db = 0.3 * p.cardiac_amp_mm * c, -p.cardiac_amp_mm * 0.75 * c
        rot = math.radians(1.2) * math.sin(ph + 0.4)
        scale = 1.0 + 0.012 * math.sin(ph + 1.0)
        motion = np.array(
            [
                [scale * math.cos(rot), -scale * math.sin(rot), da],
                [scale * math.sin(rot), scale * math.cos(rot), db],
                [0, 0, 1],
            ]
        )
        resp = (
            p.resp_amp_mm / p.spacing_mm * math.sin(2 * math.pi * t / p.resp_period_s + p.seed % 5)
        )
        shift = np.array([[1.0, 0, 0.15 * resp], [0, 1, resp], [0, 0, 1]])
        return self.flip @ shift @ self.view @ motion

    def project(self, pts3: np.ndarray) -> np.ndarray:
        """Root-local 3D (x, u along the root axis, w depth) mm -> canonical (a, b) mm."""
        cb, sb = math.cos(self.beta), math.sin(self.beta)
        return np.stack([pts3[..., 0], pts3[..., 1] * cb - pts3[..., 2] * sb], axis=-1)

    # ---- the contrast-filled root (canonical grid, per case)
    def _root_radius(self, u, cos_phi):
        p = self.p
        r0 = (
            p.r_annulus
            + (p.r_stj - p.r_annulus) * np.clip(u / p.h_sinus, 0.0, 1.0)
            + (p.r_aorta - p.r_stj) * np.clip((u - p.h_sinus) / 20.0, 0.0, 1.0)
        )
        lobe = np.sqrt(np.clip(0.5 * (1.0 + 4.0 * cos_phi**3 - 3.0 * cos_phi), 0, 1))  # cos 3 phi
        x = np.clip(u / p.h_sinus, 0.0, 1.0)
        bulge = p.bulge * 6.75 * x * (1.0 - x) ** 2 * (1.0 + 0.8 * x) / 1.25  # peak at ~0.4
        return r0 + bulge * lobe, lobe

    def _centerline(self, u):
        p = self.p
        return p.curvature * np.maximum(u - p.h_sinus, 0.0) ** 2

    def _build_root_map(self, rng):
        p = self.p
        g = max(p.spacing_mm, 0.3)
        self.grid_mm = g
        span = self.size * p.spacing_mm * 0.95 + 25.0  # annulus to the farthest corner, plus motion
        b_lo, b_hi = -8.0, span
        a_lo = -(p.r_aorta + p.bulge) - 30.0
        a_hi = p.r_aorta + p.bulge + p.curvature * span**2 + 30.0
        a_hi = min(a_hi, span)
        nx, ny = int((a_hi - a_lo) / g) + 1, int((b_hi - b_lo) / g) + 1
        self.grid = _mat(np.array([[g, 0.0, a_lo], [0.0, -g, b_hi]]))  # grid px -> canonical mm
        a = a_lo + g * np.arange(nx, dtype=np.float32)
        b = b_hi - g * np.arange(ny, dtype=np.float32)
        thick = np.zeros((ny, nx), np.float32)
        cb, sb = math.cos(self.beta), math.sin(self.beta)
        # Ascending aorta above the sinuses: a tilted cylinder, chord 2 sqrt(R^2 - d^2) / cos beta.
        b_split = (p.h_sinus + 24.0) * cb
        top = b > b_split
        u_top = b[top] / cb
        d = a[None, :] - self._centerline(u_top)[:, None]
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
        ax = A - self._centerline(u)
        rho = np.sqrt(ax * ax + w * w) + 1e-6
        tc = math.pi / 2 + p.cusp_phase  # the front cusp faces the viewer
        cos_phi = (ax * math.cos(tc) + w * math.sin(tc)) / rho
        r_wall, lobe = self._root_radius(u, cos_phi)
        q = np.clip(rho / r_wall, 0.0, 1.0)
        # Closed leaflets: contrast stops at a surface that meets the wall at the annulus in the
        # cusps, rises to the commissures and to the coaptation centre.
        floor = 0.8 * p.h_sinus * np.exp(-lobe / 0.06) * q**2 + 0.45 * p.h_sinus * (1 - q) ** 2
        inside = np.clip((r_wall - rho) / dz + 0.5, 0, 1) * np.clip((u - floor) / dz + 0.5, 0, 1)
        root = inside.sum(axis=2) * dz
        block = thick[rows]
        block[:, sel] = root
        thick[rows] = block
        thick *= _MU_CONTRAST
        # Coronary arteries from the left and front (right coronary) sinuses.
        cor = np.zeros((ny, nx), np.uint8)
        to_grid = np.linalg.inv(self.grid)
        for side in (-1.0, 1.0):
            start = np.array([side * (p.r_annulus + 0.45 * p.bulge), 0.55 * p.h_sinus])
            direction = np.array([side * 0.9, -0.45])
            pts = [start]
            for _ in range(40):
                direction = direction + rng.normal(0, 0.12, 2)
                direction /= np.linalg.norm(direction)
                direction[1] = min(direction[1], 0.2)
                pts.append(pts[-1] + 2.0 * direction)
            pts = _apply(to_grid, np.array(pts))
            for j in range(0, 40, 8):  # tapering
                _polyline(cor, pts[j : j + 9], 255, (3.8 - j * 0.05) / g)
            branch = (
                pts[10] + np.cumsum(rng.normal([side * 0.4, 1.0], 0.3, (25, 2)), axis=0) * 2.0 / g
            )
            _polyline(cor, np.vstack([pts[10], branch]), 255, 2.4 / g)
        thick += cor.astype(np.float32) * (3.2 * _MU_CONTRAST / 255.0)
        self.root_map = cv2.GaussianBlur(thick, (0, 0), 0.6)

    # ---- thorax
    def _build_background(self, rng):
        p = self.p
        n = self.size
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
        texture = 0.6 * _smooth_noise(rng, (m, m), 3.0 / mm_lo) + 0.4 * _smooth_noise(
            rng, (m, m), 1.2 / mm_lo
        )
        static = 4.6 + 0.45 * medi + 0.02 * texture + 0.04 * lung * texture - 0.35 * lung
        static = static + 0.25 * _smooth_noise(rng, (m, m), 25.0 / mm_lo) * 0.4
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
            0.55 * chord * (0.45 + 0.55 * vert)
            + 0.35 * rim
            + 0.25 * plates
            + 0.4 * pedicle
            + spinous
        )
        bones += 0.25 * np.exp(
            -((xs / (0.9 * body_w)) ** 2)
        )  # paraspinal muscle and posterior arch
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
                _polyline(ribs, path, 200, rng.uniform(9, 12) * sc)
                _polyline(ribs, path, 110, 6 * sc)  # marrow: the cortex shows as two edges
        bones += 0.45 * ribs.astype(np.float32) / 255.0
        bones = cv2.GaussianBlur(bones, (0, 0), 0.8 * h / fov)
        full = cv2.resize(static.astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC)
        full += cv2.resize(bones * _BONE, (n, n), interpolation=cv2.INTER_LINEAR)
        # collimator shutters (lead, soft-edged) and ECG electrodes / leads
        extra = np.zeros((n, n), np.uint8)
        for _ in range(int(rng.integers(0, 3))):
            e = rng.uniform(0.05, 0.95, 2) * n
            # electrode: a faint disc with a dense metal snap in the middle
            centre = tuple(int(v) for v in _fixed(e))
            cv2.circle(extra, centre, int(11 / p.spacing_mm * _ONE), 50, -1, cv2.LINE_AA, _SHIFT)
            cv2.circle(extra, centre, int(3 / p.spacing_mm * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
            lead = _bezier(
                e,
                e + rng.normal(0, 60, 2) / p.spacing_mm,
                e + rng.normal(0, 90, 2) / p.spacing_mm,
                e + rng.normal(0, 200, 2) / p.spacing_mm,
                40,
            )
            _polyline(extra, lead, 110, 1.2 / p.spacing_mm)
        full += extra.astype(np.float32) * (0.5 / 255.0)
        x = np.arange(n, dtype=np.float32)
        l, t, r, b = np.asarray(p.shutters) * n
        soft = 1.5 * self.k
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
        fluence = (1.0 - p.vignetting * np.clip(rr, 0, 2) / 2.0) * (
            1.0 + 0.08 * (x[None, :] / n - 0.5)
        )
        moving = moving.astype(np.float32)
        if p.mirror:
            full, fluence, moving = full[:, ::-1], fluence[:, ::-1], moving[:, ::-1]
            full = full.copy()
            moving = moving.copy()
        self.static = np.ascontiguousarray(full, np.float32)
        self.moving = np.ascontiguousarray(moving, np.float32)
        self.moving_scale = m / n
        a_med = float(np.median(self.static)) + 0.4
        self.n0 = (p.dose * math.exp(a_med) * fluence).astype(np.float32)
        # display window of log counts: from the brightest lung to dense contrast over bone
        # grey 150 at the median thorax, about 80 grey levels per unit of attenuation
        a_mid = float(np.median(self.static[::4, ::4]))
        lo_a, hi_a = a_mid - 1.3, a_mid + 1.9
        self.window = (math.log(p.dose) + a_med - hi_a, math.log(p.dose) + a_med - lo_a)

    # ---- devices (root-local 3D, mm)
    def _build_devices(self, rng):
        p = self.p
        # pigtail loop centre in a sinus, low (near the cusp floor)
        side = (-1.0, 0.0, 1.0)[p.pigtail_sinus]
        depth = (0.0, 1.0, 0.0)[p.pigtail_sinus]
        u0 = p.pigtail_radius + rng.uniform(1.5, 3.5)
        r_side = p.r_annulus + 0.25 * p.bulge - p.pigtail_radius - 1.0
        self.pig_centre = np.array([side * r_side * 0.8, u0, depth * r_side * 0.8])
        nrm = np.asarray(p.pigtail_normal)
        e1 = np.cross(nrm, [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(nrm, e1)
        phi0 = rng.uniform(0, 2 * math.pi)
        phi = phi0 + np.linspace(0, 2 * math.pi * 1.15, 60)
        rad = p.pigtail_radius * (1.0 - 0.12 * (phi - phi0) / (2 * math.pi))  # tightening curl
        loop = self.pig_centre + rad[:, None] * (
            np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2
        )
        end = loop[-1]
        tangent = loop[-1] - loop[-2]
        tangent /= np.linalg.norm(tangent)
        top_u = self.size * p.spacing_mm * 2.0
        up = np.array([-0.45 * p.r_aorta, p.h_sinus + 25.0, -0.2 * p.r_aorta])
        shaft = _bezier(end, end + 8.0 * tangent, up - [0, 12.0, 0], up, 30)
        us = np.linspace(up[1], top_u, 40)
        tail = np.stack(
            [self._centerline(us) - 0.45 * p.r_aorta, us, np.full_like(us, up[2])], axis=1
        )
        self.pigtail_path = np.vstack([loop, shaft[1:], tail[1:]])  # distal -> proximal
        # valve frame nodes: (rows+1, cells) on a unit cylinder, radius profile along the frame
        ang = (np.arange(p.valve_cells)[None, :] + 0.5 * np.arange(p.valve_rows + 1)[:, None]) * (
            2 * math.pi / p.valve_cells
        )
        self.frame_angles = ang
        self.frame_s = np.linspace(0.0, p.valve_length, p.valve_rows + 1)
        prof_s = np.array([0.0, 0.3, 0.6, 1.0]) * p.valve_length
        prof_r = np.array([1.08, 0.9, 1.05, 1.45]) * p.r_annulus
        self.frame_nominal = np.interp(self.frame_s, prof_s, prof_r)
        self.guidewire_curl = rng.uniform(10, 16), rng.uniform(0, 2 * math.pi)

    def _delivery_axis(self):
        p = self.p
        e = np.array([math.sin(p.delivery_angle), math.cos(p.delivery_angle), 0.03])
        e /= np.linalg.norm(e)
        origin = np.array([p.delivery_offset, 0.0, 0.0])
        return origin, e

    def _devices(self, st: FrameState):
        """Projected device geometry (canonical mm) and the 3D-exact landmarks for one frame."""
        p = self.p
        out: dict = {}
        if st.pigtail:
            out["pigtail"] = self.project(self.pigtail_path)
            out["PT"] = self.project(self.pig_centre)
        origin, e = self._delivery_axis()
        n1 = np.cross(e, [0.0, 0.0, 1.0])
        n1 /= np.linalg.norm(n1)
        n2 = np.cross(e, n1)
        at = lambda s: origin + np.multiply.outer(s, e)  # noqa: E731
        s_in = -p.implant_depth + st.advance_mm  # inflow edge along the delivery axis
        frame_shown = st.released or (st.delivery and not st.delivery_retrieved)
        if frame_shown:
            if st.released:
                radius = self.frame_nominal
                uncovered = p.valve_length + 10.0
            else:
                uncovered = st.retract * (p.valve_length + 4.0)
                crimp = 0.42 * p.capsule_diameter
                open_ = np.clip((uncovered - self.frame_s) / 9.0, 0.0, 1.0)
                open_ = open_ * open_ * (3 - 2 * open_)
                radius = crimp + (self.frame_nominal - crimp) * open_
            centres = at(s_in + self.frame_s)  # (rows+1, 3)
            ring = (
                np.cos(self.frame_angles)[..., None] * n1
                + np.sin(self.frame_angles)[..., None] * n2
            )
            nodes = centres[:, None, :] + radius[:, None, None] * ring
            out["frame_nodes"] = self.project(nodes)
            out["frame_deployed"] = bool(st.released or uncovered > 2.0)
            # inflow-edge corners: ends of the ring's diameter perpendicular to the view
            cb, sb = math.cos(self.beta), math.sin(self.beta)
            e_view = np.array([e[0], e[1] * cb - e[2] * sb, e[1] * sb + e[2] * cb])
            d = np.array([e_view[1], -e_view[0]])
            d /= np.linalg.norm(d)
            c0 = self.project(centres[0])
            out["FE"] = (c0 - radius[0] * d, c0 + radius[0] * d)
        if st.delivery:
            if st.delivery_retrieved:
                tip_s = s_in + p.valve_length + 6.0
                cap_lo = tip_s + p.nose_length + 1.0
            else:
                tip_s = s_in - 1.0 - p.nose_length
                cap_lo = s_in + st.retract * (p.valve_length + 4.0)
            cap_hi = cap_lo + p.valve_length + 4.0
            top = self.size * p.spacing_mm * 2.0
            hi = at(cap_hi)
            bend = np.array([0.35 * p.r_aorta, 0.0, 0.0])
            mid = hi + 25.0 * e
            far_u = np.linspace(mid[1] + 25.0, top, 40)
            far = np.stack(
                [self._centerline(far_u) + 0.4 * p.r_aorta, far_u, np.zeros_like(far_u)], axis=1
            )
            shaft = _bezier(far[0], far[0] - [0, 18.0, 0], mid + bend * 0.5, hi, 25)
            out["shaft"] = self.project(np.vstack([far[::-1], shaft[1:]]))  # proximal -> CD
            out["capsule"] = self.project(at(np.array([cap_lo, cap_hi])))
            out["nose"] = self.project(at(np.array([tip_s + p.nose_length, tip_s])))
            out["inner"] = self.project(at(np.array([tip_s + p.nose_length, cap_lo])))
            out["nose_axis"] = np.array([e[0], e[1] * math.cos(self.beta)])
            out["CD"] = self.project(at(cap_hi))
            out["CT"] = self.project(at(tip_s))
            # guidewire out of the nose cone, curled in the ventricle
            r_c, ph = self.guidewire_curl
            straight = at(np.linspace(tip_s, tip_s - 25.0, 10))
            ang = ph + np.linspace(0, 2 * math.pi * 1.2, 50)
            curl_c = at(tip_s - 25.0) + np.array([-r_c, 0.0, 0.0])
            curl = curl_c + r_c * np.stack(
                [np.cos(ang), -np.sin(ang) * 0.8, np.sin(ang) * 0.3], axis=1
            )
            curl = curl - curl[0] + straight[-1]
            out["wire"] = self.project(np.vstack([straight, curl]))
        return out

    # ---- one frame
    def render(self, st: FrameState, rng: np.random.Generator, *, layers: bool = False):
        """One frame: (image (S,S) uint8, landmarks dict name -> (x, y, visible)).

        With `layers=True` also a dict of the noiseless inputs (attenuation maps, uint8 device
        drawings "thin", "dense", "struts", float "contrast") for tests and figures.
        """
        p = self.p
        n = self.size
        m = self.frame_transform(st)
        atten = self.static.copy()
        # moving heart/diaphragm shadow follows the annulus displacement at reduced resolution
        disp = _apply(m, np.zeros(2)) - _apply(self.flip @ self.view, np.zeros(2))
        ms = self.moving_scale
        shift = np.float32([[1, 0, 0.6 * disp[0] * ms], [0, 1, 0.6 * disp[1] * ms]])
        mv = cv2.warpAffine(
            self.moving, shift, self.moving.shape[::-1], borderMode=cv2.BORDER_REPLICATE
        )
        atten += cv2.resize(mv, (n, n), interpolation=cv2.INTER_CUBIC)
        root = None
        if st.contrast > 0.01 or layers:
            warp = (m @ self.grid)[:2].astype(np.float32)
            root = cv2.warpAffine(self.root_map, warp, (n, n), flags=cv2.INTER_LINEAR)
            atten += st.contrast * root
        dev = self._devices(st)
        px = 1.0 / p.spacing_mm  # px per mm
        to_img = lambda q: _apply(m, q)  # noqa: E731
        thin = np.zeros((n, n), np.uint8)
        dense = np.zeros((n, n), np.uint8)
        struts = np.zeros((n, n), np.uint8)
        if "pigtail" in dev:
            _tube(thin, to_img(dev["pigtail"]), 200, 1.9 * px)
        if "frame_nodes" in dev:
            nodes = to_img(dev["frame_nodes"])  # (rows+1, cells, 2)
            a, b = nodes[:-1], nodes[1:]
            segs = np.concatenate(
                [np.stack([a, b], axis=2), np.stack([a, np.roll(b, 1, axis=1)], axis=2)], axis=1
            ).reshape(-1, 2, 2)
            cv2.polylines(
                struts,
                list(_fixed(segs)),
                False,
                255,
                max(1, int(round(0.45 * px))),
                cv2.LINE_AA,
                _SHIFT,
            )
        if "shaft" in dev:
            _tube(thin, to_img(dev["shaft"]), 255, 4.5 * px)
            _polyline(thin, to_img(dev["wire"]), 150, max(1.0, 0.9 * px))
            _polyline(thin, to_img(dev["inner"]), 120, 1.5 * px)
            cap = to_img(dev["capsule"])
            _tube(dense, cap, 190, p.capsule_diameter * px)
            band = np.stack(
                [cap[1], cap[1] + (cap[0] - cap[1]) * (2.5 / np.linalg.norm(cap[0] - cap[1]) / px)]
            )
            _polyline(dense, band, 255, (p.capsule_diameter + 0.6) * px)
            nose = to_img(dev["nose"])
            axis = nose[1] - nose[0]
            perp = np.array([-axis[1], axis[0]]) / (np.linalg.norm(axis) + 1e-9)
            half = 0.45 * p.capsule_diameter * px
            cone = np.array(
                [
                    nose[0] + perp * half,
                    nose[0] - perp * half,
                    nose[1] - perp * 0.6 * px,
                    nose[1] + perp * 0.6 * px,
                ]
            )
            cv2.fillPoly(dense, [_fixed(cone)], 170, cv2.LINE_AA, _SHIFT)
        extra = {}
        if layers:
            extra = dict(thin=thin.copy(), dense=dense.copy(), struts=struts.copy(), contrast=root)
        # one conversion: the layers' attenuations scaled onto a common 0..255 = 0..1 range
        np.maximum(thin, cv2.convertScaleAbs(struts, alpha=0.7 / 0.45), out=thin)
        cv2.addWeighted(thin, 0.45, dense, 1.0, 0.0, dst=dense)
        atten += dense.astype(np.float32) * (1.0 / 255.0)
        # Beer-Lambert, quantum noise (normal approx. of Poisson), detector blur, log display
        lam = self.n0 * (st.dose_scale * np.exp(-atten))
        counts = lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
        counts = cv2.GaussianBlur(counts, (0, 0), p.blur_px * self.k)
        lo, hi = self.window
        lo_s = lo + math.log(st.dose_scale)
        hi_s = hi + math.log(st.dose_scale)
        img = (np.log(np.maximum(counts, 1.0)) - lo_s) * (255.0 / (hi_s - lo_s))
        img = np.clip(img, 0, 255).astype(np.uint8)
        self._burn_text(img, st)
        if layers:
            extra["attenuation"] = atten
            return img, self._landmarks(m, dev, st), extra
        return img, self._landmarks(m, dev, st)

    def _burn_text(self, img, st):
        n = self.size
        scale = 0.38 * self.k * 1.2
        th = max(1, int(round(self.k)))
        color = 235
        y1 = int(18 * self.k) + 4
        cv2.putText(
            img,
            self.p.view_label,
            (int(6 * self.k) + 2, y1),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            color,
            th,
            cv2.LINE_AA,
        )
        frame_no = int(round(st.time_s * FPS)) % 1000
        cv2.putText(
            img,
            f"F {frame_no:03d}  {FPS:.0f} fps",
            (int(n - 120 * self.k), y1),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            color,
            th,
            cv2.LINE_AA,
        )
        mode = "FLUORO" if st.stage == "fluoroscopy" else "CINE"
        cv2.putText(
            img,
            f"{mode} 78kV",
            (int(6 * self.k) + 2, n - int(10 * self.k) - 2),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            color,
            th,
            cv2.LINE_AA,
        )

    def _landmarks(self, m, dev, st):
        p = self.p
        x0, y0, x1, y1 = self.field
        inside = lambda q: bool(x0 <= q[0] <= x1 and y0 <= q[1] <= y1)  # noqa: E731
        pts: dict[str, tuple[float, float, bool]] = {}

        def put(name, q, vis):
            q = np.asarray(q, np.float64)
            pts[name] = (float(q[0]), float(q[1]), bool(vis and inside(q)))

        anat = st.contrast >= CONTRAST_VISIBLE
        ra = p.r_annulus
        cb = math.cos(self.beta)
        for (left, right), r, b in (
            (("AA1", "AA2"), ra, 0.0),
            (("STJ1", "STJ2"), p.r_stj, p.h_sinus * cb),
        ):
            put(left, _apply(m, np.array([-r, b])), anat)
            put(right, _apply(m, np.array([r, b])), anat)
        if "PT" in dev:
            put("PT", _apply(m, dev["PT"]), True)
        else:
            put("PT", (0.0, 0.0), False)
        if "FE" in dev and dev["frame_deployed"]:
            put("FE1", _apply(m, dev["FE"][0]), True)
            put("FE2", _apply(m, dev["FE"][1]), True)
        else:
            put("FE1", (0.0, 0.0), False)
            put("FE2", (0.0, 0.0), False)
        for name in ("CP", "CM", "CD", "CT"):
            put(name, (0.0, 0.0), False)
        if "shaft" in dev:
            cd = _apply(m, dev["CD"])
            put("CT", _apply(m, dev["CT"]), True)
            put("CD", cd, True)
            line = np.vstack(
                [
                    _apply(m, dev["shaft"]),
                    _apply(m, dev["capsule"])[::-1],
                    _apply(m, dev["nose"])[1:],
                ]
            )
            hit = _clip_polyline(line, self.field)
            if hit is not None:
                entry, j = hit
                put("CP", entry, True)
                n_shaft = len(dev["shaft"])
                if j <= n_shaft - 1 and pts["CD"][2]:
                    path = np.vstack([entry, line[j:n_shaft]])
                    put("CM", _arclength_point(path, 0.5), True)
        # "left in the image" names the pair, whatever the view or mirror
        for a, b in _LEFT_RIGHT:
            if pts[a][0] > pts[b][0] and pts[a][2] == pts[b][2]:
                pts[a], pts[b] = pts[b], pts[a]
        return pts


# ----------------------------------------------------------------------------- public API


def _schema_index(schema: KeypointSchema, allow_missing: bool) -> list[str | None]:
    missing = [n for n in schema.point_names if n not in SIMULATED_POINTS]
    if missing and not allow_missing:
        raise ValueError(
            f"schema {schema.name!r} has points the simulator cannot draw: {', '.join(missing)} "
            f"(it draws {', '.join(SIMULATED_POINTS)}); pass allow_missing=True to keep them "
            "always invisible"
        )
    return [n if n in SIMULATED_POINTS else None for n in schema.point_names]


def _to_schema(pts: dict, names: list[str | None], size: int):
    k = len(names)
    vis = np.zeros(k, bool)
    coords = np.zeros((k, 2), np.float32)
    for i, name in enumerate(names):
        if name is None:
            continue
        x, y, v = pts[name]
        if v and 0.0 <= x < size and 0.0 <= y < size:
            vis[i] = True
            coords[i] = x, y
    return vis, coords


def simulate_case(
    rng: np.random.Generator,
    schema: KeypointSchema,
    *,
    frames: int,
    size: int,
    allow_missing: bool = False,
    params: CaseParams | None = None,
    schedule: list[FrameState] | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """Simulates one case: a list of (image (S,S) uint8, visibility (K,), coords (K,2), stage).

    `params` and `schedule` override the random draws (tests and figures use them).
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    names = _schema_index(schema, allow_missing)
    params = params if params is not None else sample_case(rng, size)
    schedule = schedule if schedule is not None else sample_schedule(rng, frames)
    renderer = CaseRenderer(params, size)
    out = []
    for st in schedule[:frames]:
        img, pts = renderer.render(st, rng)
        vis, coords = _to_schema(pts, names, size)
        out.append((img, vis, coords, st.stage))
    return out


def simulate_project(
    out: os.PathLike,
    schema: KeypointSchema,
    *,
    cases: int,
    frames: int,
    size: int,
    seed: int,
    allow_missing: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Writes `cases` simulated cases of `frames` frames as a Supervisely project at `out`."""
    from tqdm import tqdm

    from tavr_jax.data import supervisely

    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    _schema_index(schema, allow_missing)
    writer = supervisely.ProjectWriter(out, schema)
    bar = tqdm(total=cases * frames, desc="simulating frames", unit="frame", disable=not progress)
    for c in range(cases):
        rng = np.random.default_rng([seed, c])  # a case does not depend on how many came before
        case_id = f"sim{seed:04d}_{c:05d}"
        params = sample_case(rng, size)
        for f, (img, vis, coords, stage) in enumerate(
            simulate_case(
                rng, schema, frames=frames, size=size, allow_missing=allow_missing, params=params
            )
        ):
            writer.add(
                supervisely.AnnotatedFrame(
                    case_id=case_id,
                    frame_name=f"{f:04d}.png",
                    image=img,
                    visibility=vis,
                    coords=coords,
                    pixel_spacing_mm=round(params.spacing_mm, 6),
                    stage=stage,
                )
            )
            bar.update(1)
    bar.close()
    return writer.root


def benchmark(
    schema: KeypointSchema, *, size: int = 512, frames: int = 20, repeats: int = 5, seed: int = 0
) -> dict:
    """Frames/s of `simulate_case` on one CPU thread, case set-up included (median of runs).

    `frames_per_s` is wall-clock; `frames_per_cpu_s` counts this process's CPU seconds, which is
    what one dedicated core would deliver when the machine is shared (both are reported).
    """
    import time

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        simulate_case(np.random.default_rng([seed, 99]), schema, frames=2, size=size)  # warm-up
        rates, cpu_rates, setups = [], [], []
        for r in range(repeats):
            rng = np.random.default_rng([seed, r])
            params = sample_case(rng, size)
            t0 = time.perf_counter()
            CaseRenderer(params, size)
            setups.append(time.perf_counter() - t0)
            t0, c0 = time.perf_counter(), time.process_time()
            simulate_case(rng, schema, frames=frames, size=size, params=params)
            rates.append(frames / (time.perf_counter() - t0))
            cpu_rates.append(frames / (time.process_time() - c0))
    finally:
        cv2.setNumThreads(threads)
    return {
        "frames_per_s": float(np.median(rates)),
        "frames_per_cpu_s": float(np.median(cpu_rates)),
        "setup_ms": float(np.median(setups) * 1e3),
        "frames": frames,
        "repeats": repeats,
    }
