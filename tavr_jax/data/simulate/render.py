"""Rendering one frame of a simulated case: motion, Beer-Lambert transmission of the static
scene, the opacified root and the devices, quantum noise, detector blur, display window and
burned-in text; and the keypoints through the same transform as the pixels."""

from __future__ import annotations

import math

import cv2
import numpy as np

from tavr_jax.data.simulate import anatomy
from tavr_jax.data.simulate.anatomy import affine3, apply_affine
from tavr_jax.data.simulate.devices import Devices
from tavr_jax.data.simulate.params import CONTRAST_VISIBLE, FPS, CaseParams, FrameState

_LEFT_RIGHT = (("AA1", "AA2"), ("STJ1", "STJ2"), ("FE1", "FE2"))


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
        # annulus rises to the right: the lower hinge point is the left one (AA1).
        view = np.array(
            [[s * math.cos(al), -s * math.sin(al), cx], [-s * math.sin(al), -s * math.cos(al), cy]]
        )
        self.view = affine3(view)
        self.flip = (
            np.array([[-1.0, 0, self.size - 1], [0, 1, 0], [0, 0, 1]]) if p.mirror else np.eye(3)
        )
        sh = np.asarray(p.shutters) * self.size
        self.field = (sh[0], sh[1], self.size - 1 - sh[2], self.size - 1 - sh[3])
        if p.mirror:
            self.field = (sh[2], sh[1], self.size - 1 - sh[0], self.size - 1 - sh[3])
        # One generator, drawn in this order: the root's coronaries, the thorax, the devices.
        self.grid, self.root_map = anatomy.root_map(p, self.beta, self.size, rng)
        self.thorax = anatomy.thorax(p, self.size, rng)
        self.devices = Devices(p, self.size, self.beta, rng)

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

    def render(self, st: FrameState, rng: np.random.Generator, *, layers: bool = False):
        """One frame: (image (S,S) uint8, landmarks dict name -> (x, y, visible)).

        With `layers=True` also a dict of the noiseless inputs (attenuation maps, uint8 device
        drawings "thin", "dense", "struts", float "contrast") for tests and figures.
        """
        p = self.p
        n = self.size
        m = self.frame_transform(st)
        thorax = self.thorax
        atten = thorax.static.copy()
        # moving heart/diaphragm shadow follows the annulus displacement at reduced resolution
        disp = apply_affine(m, np.zeros(2)) - apply_affine(self.flip @ self.view, np.zeros(2))
        ms = thorax.moving_scale
        shift = np.float32([[1, 0, 0.6 * disp[0] * ms], [0, 1, 0.6 * disp[1] * ms]])
        mv = cv2.warpAffine(
            thorax.moving, shift, thorax.moving.shape[::-1], borderMode=cv2.BORDER_REPLICATE
        )
        atten += cv2.resize(mv, (n, n), interpolation=cv2.INTER_CUBIC)
        root = None
        if st.contrast > 0.01 or layers:
            warp = (m @ self.grid)[:2].astype(np.float32)
            root = cv2.warpAffine(self.root_map, warp, (n, n), flags=cv2.INTER_LINEAR)
            atten += st.contrast * root
        dev = self.devices.at_frame(st)
        thin, dense, struts = self.devices.draw(dev, m)
        extra = {}
        if layers:
            extra = dict(thin=thin.copy(), dense=dense.copy(), struts=struts.copy(), contrast=root)
        # one conversion: the layers' attenuations scaled onto a common 0..255 = 0..1 range.
        # A strut drawn at full value attenuates as much as a catheter's core; a strut thinner
        # than a pixel is drawn fainter (`devices.draw_struts`) and must not saturate here.
        np.maximum(thin, struts, out=thin)
        cv2.addWeighted(thin, 0.45, dense, 1.0, 0.0, dst=dense)
        atten += dense.astype(np.float32) * (1.0 / 255.0)
        # Beer-Lambert, quantum noise (normal approx. of Poisson), detector blur, log display
        lam = thorax.n0 * (st.dose_scale * np.exp(-atten))
        counts = lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
        counts = cv2.GaussianBlur(counts, (0, 0), p.blur_px * self.k)
        lo, hi = thorax.window
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
            put(left, apply_affine(m, np.array([-r, b])), anat)
            put(right, apply_affine(m, np.array([r, b])), anat)
        if "PT" in dev:
            put("PT", apply_affine(m, dev["PT"]), True)
        else:
            put("PT", (0.0, 0.0), False)
        if "FE" in dev and dev["frame_deployed"]:
            put("FE1", apply_affine(m, dev["FE"][0]), True)
            put("FE2", apply_affine(m, dev["FE"][1]), True)
        else:
            put("FE1", (0.0, 0.0), False)
            put("FE2", (0.0, 0.0), False)
        for name in ("CP", "CM", "CD", "CT"):
            put(name, (0.0, 0.0), False)
        if "shaft" in dev:
            cd = apply_affine(m, dev["CD"])
            put("CT", apply_affine(m, dev["CT"]), True)
            put("CD", cd, True)
            line = np.vstack(
                [
                    apply_affine(m, dev["shaft"]),
                    apply_affine(m, dev["capsule"])[::-1],
                    apply_affine(m, dev["nose"])[1:],
                ]
            )
            hit = anatomy.clip_polyline(line, self.field)
            if hit is not None:
                entry, j = hit
                put("CP", entry, True)
                n_shaft = len(dev["shaft"])
                if j <= n_shaft - 1 and pts["CD"][2]:
                    path = np.vstack([entry, line[j:n_shaft]])
                    put("CM", anatomy.arclength_point(path, 0.5), True)
        # "left in the image" names the pair, whatever the view or mirror
        for a, b in _LEFT_RIGHT:
            if pts[a][0] > pts[b][0] and pts[a][2] == pts[b][2]:
                pts[a], pts[b] = pts[b], pts[a]
        return pts
