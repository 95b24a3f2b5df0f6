"""The devices of a simulated case: pigtail catheter, delivery system (shaft, capsule with its
marker band, nose cone, inner shaft, guidewire) and the self-expanding valve frame.

Geometry is root-local 3D in mm, built once per case; `at_frame` places it for one frame's
state (advance, retraction, release) and projects it, `draw` rasterises it into layers.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from tavr_jax.data.simulate.anatomy import (
    SHIFT,
    apply_affine,
    bezier,
    centerline,
    fixed_point,
    polyline,
    project,
    tube,
)
from tavr_jax.data.simulate.params import CaseParams, FrameState


class Devices:
    """The devices of one case (root-local 3D, mm)."""

    def __init__(self, params: CaseParams, size: int, beta: float, rng: np.random.Generator):
        self.p = p = params
        self.size = size
        self.beta = beta
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
        shaft = bezier(end, end + 8.0 * tangent, up - [0, 12.0, 0], up, 30)
        us = np.linspace(up[1], top_u, 40)
        tail = np.stack([centerline(p, us) - 0.45 * p.r_aorta, us, np.full_like(us, up[2])], axis=1)
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

    def _project(self, pts3: np.ndarray) -> np.ndarray:
        return project(self.beta, pts3)

    def _delivery_axis(self):
        p = self.p
        e = np.array([math.sin(p.delivery_angle), math.cos(p.delivery_angle), 0.03])
        e /= np.linalg.norm(e)
        origin = np.array([p.delivery_offset, 0.0, 0.0])
        return origin, e

    def at_frame(self, st: FrameState) -> dict:
        """Projected device geometry (canonical mm) and the 3D-exact landmarks for one frame."""
        p = self.p
        out: dict = {}
        if st.pigtail:
            out["pigtail"] = self._project(self.pigtail_path)
            out["PT"] = self._project(self.pig_centre)
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
            out["frame_nodes"] = self._project(nodes)
            out["frame_deployed"] = bool(st.released or uncovered > 2.0)
            # inflow-edge corners: ends of the ring's diameter perpendicular to the view
            cb, sb = math.cos(self.beta), math.sin(self.beta)
            e_view = np.array([e[0], e[1] * cb - e[2] * sb, e[1] * sb + e[2] * cb])
            d = np.array([e_view[1], -e_view[0]])
            d /= np.linalg.norm(d)
            c0 = self._project(centres[0])
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
                [centerline(p, far_u) + 0.4 * p.r_aorta, far_u, np.zeros_like(far_u)], axis=1
            )
            shaft = bezier(far[0], far[0] - [0, 18.0, 0], mid + bend * 0.5, hi, 25)
            out["shaft"] = self._project(np.vstack([far[::-1], shaft[1:]]))  # proximal -> CD
            out["capsule"] = self._project(at(np.array([cap_lo, cap_hi])))
            out["nose"] = self._project(at(np.array([tip_s + p.nose_length, tip_s])))
            out["inner"] = self._project(at(np.array([tip_s + p.nose_length, cap_lo])))
            out["nose_axis"] = np.array([e[0], e[1] * math.cos(self.beta)])
            out["CD"] = self._project(at(cap_hi))
            out["CT"] = self._project(at(tip_s))
            # guidewire out of the nose cone, curled in the ventricle
            r_c, ph = self.guidewire_curl
            straight = at(np.linspace(tip_s, tip_s - 25.0, 10))
            ang = ph + np.linspace(0, 2 * math.pi * 1.2, 50)
            curl_c = at(tip_s - 25.0) + np.array([-r_c, 0.0, 0.0])
            curl = curl_c + r_c * np.stack(
                [np.cos(ang), -np.sin(ang) * 0.8, np.sin(ang) * 0.3], axis=1
            )
            curl = curl - curl[0] + straight[-1]
            out["wire"] = self._project(np.vstack([straight, curl]))
        return out

    # ---- one frame

    def draw(self, dev: dict, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rasterises one frame's devices (from `at_frame`) through the affine `m`.

        Returns uint8 (S, S) layers: "thin" (catheters, wire), "dense" (capsule, marker band,
        nose cone) and "struts" (the valve frame).
        """
        p = self.p
        n = self.size
        px = 1.0 / p.spacing_mm  # px per mm
        to_img = lambda q: apply_affine(m, q)  # noqa: E731
        thin = np.zeros((n, n), np.uint8)
        dense = np.zeros((n, n), np.uint8)
        struts = np.zeros((n, n), np.uint8)
        if "pigtail" in dev:
            tube(thin, to_img(dev["pigtail"]), 200, 1.9 * px)
        if "frame_nodes" in dev:
            nodes = to_img(dev["frame_nodes"])  # (rows+1, cells, 2)
            a, b = nodes[:-1], nodes[1:]
            segs = np.concatenate(
                [np.stack([a, b], axis=2), np.stack([a, np.roll(b, 1, axis=1)], axis=2)], axis=1
            ).reshape(-1, 2, 2)
            draw_struts(struts, segs, 0.45 * px)
        if "shaft" in dev:
            tube(thin, to_img(dev["shaft"]), 255, 4.5 * px)
            polyline(thin, to_img(dev["wire"]), 150, max(1.0, 0.9 * px))
            polyline(thin, to_img(dev["inner"]), 120, 1.5 * px)
            cap = to_img(dev["capsule"])
            tube(dense, cap, 190, p.capsule_diameter * px)
            band = np.stack(
                [cap[1], cap[1] + (cap[0] - cap[1]) * (2.5 / np.linalg.norm(cap[0] - cap[1]) / px)]
            )
            polyline(dense, band, 255, (p.capsule_diameter + 0.6) * px)
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
            cv2.fillPoly(dense, [fixed_point(cone)], 170, cv2.LINE_AA, SHIFT)
        return thin, dense, struts


def draw_struts(img: np.ndarray, segments: np.ndarray, width_px: float) -> None:
    """Draws (S, 2, 2) strut segments `width_px` wide into uint8 `img` at full value.

    A strut thinner than a pixel covers only part of each pixel it crosses and attenuates by
    that part (partial volume). Rounded to whole pixels at full value, a 0.45-mm strut
    attenuated 1.1-1.8 times as much in a 256-px frame as in a 1024-px one, and a network
    trained on small frames looked for a bolder frame than large frames show. So struts
    narrower than 2 pixels are drawn about 3 pixels wide on a grid k times finer and averaged
    down: their value summed across a strut is then the same at every frame size.
    """
    k = max(1, round(3.0 / width_px))
    n = img.shape[0]
    fine = np.zeros((n * k, n * k), np.uint8) if k > 1 else img
    # fine pixel j covers the coarse interval [j / k, (j + 1) / k): centres map as (x + 0.5) k - 0.5
    pts = (segments + 0.5) * k - 0.5
    thickness = max(1, round(width_px * k))
    cv2.polylines(fine, list(fixed_point(pts)), False, 255, thickness, cv2.LINE_AA, SHIFT)
    if k > 1:
        np.maximum(img, cv2.resize(fine, (n, n), interpolation=cv2.INTER_AREA), out=img)
