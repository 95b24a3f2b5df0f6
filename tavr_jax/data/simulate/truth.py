"""The true guidance readouts of a simulated frame, from the simulator's own geometry.

The readouts (`tavr_jax.infer.guidance`) are measured on the image: the annular line AA1-AA2,
the valve frame's inflow edge FE1-FE2. The simulator knows them exactly in its canonical root
frame (mm at the isocentre, `a` across the root, `b` up its projected axis), where the annulus
hinge points are (-r, 0) and (r, 0): the annular line is b = 0 and the depth of an inflow-edge
corner is simply -b (positive toward the ventricle, i.e. below the annulus). The frame's motion
(breathing, heartbeat) moves everything by one similarity transform, so angles are the same in
the image and pixel distances differ from these by its scale (within 1.2 %).

Nothing here draws a random number: the truth of a frame comes from values already drawn, so
frames stay bit-identical whether or not it is computed.

One record per frame (JSON), written as `GUIDANCE_TRUTH_FILE` at a project's root:
  frame        path of the frame's image relative to the project root ("<case>/img/0000.png")
  case         case id
  time_s       time of the frame in its series
  stage        the simulator's procedure stage (`STAGES`)
  guidance_stage  "positioning" (no valve frame out) | "deploying" (frame uncovering, still on
               the delivery system) | "deployed" (released)
  contrast     true when the root is opacified enough for its landmarks to be annotated
  opacification  the root's opacification, 0..1
  mm_per_px    spacing of the written frame at the isocentre
  depth_mm     {"FE1": mm | null, "FE2": mm | null}: inflow-edge depth below the annular line
               per side (FE1 the corner left in the image), null without a valve frame out
  angle_deg    angle between FE1-FE2 and AA1-AA2, 0..90, null without a valve frame out
"""

from __future__ import annotations

import math

import numpy as np

from tavr_jax.data.simulate.anatomy import apply_affine
from tavr_jax.data.simulate.params import CONTRAST_VISIBLE, FrameState
from tavr_jax.data.simulate.render import CaseRenderer

GUIDANCE_TRUTH_FILE = "guidance_truth.jsonl"


def guidance_stage(st: FrameState, frame_out: bool) -> str:
    """The deployment stage the guidance readouts name, from a frame's device state."""
    if not frame_out:
        return "positioning"
    return "deployed" if st.released else "deploying"


def frame_truth(renderer: CaseRenderer, st: FrameState) -> dict:
    """The true readouts of one frame (see the module docstring), without the file fields."""
    dev = renderer.devices.at_frame(st)  # deterministic: no random draws
    frame_out = "FE" in dev and bool(dev["frame_deployed"])  # as FE1/FE2 are annotated
    depth: dict[str, float | None] = {"FE1": None, "FE2": None}
    angle = None
    if frame_out:
        corners = np.asarray(dev["FE"], np.float64)  # (2, 2) canonical (a, b) mm
        # Named as the keypoints are (`CaseRenderer._landmarks`): "left in the image is 1"
        # (mirror and motion included) when both corners are in the exposed field or both not.
        img = apply_affine(renderer.frame_transform(st), corners)
        x0, y0, x1, y1 = renderer.field
        inside = (img[:, 0] >= x0) & (img[:, 0] <= x1) & (img[:, 1] >= y0) & (img[:, 1] <= y1)
        swap = img[0, 0] > img[1, 0] and inside[0] == inside[1]
        left, right = (1, 0) if swap else (0, 1)
        depth = {"FE1": float(-corners[left, 1]), "FE2": float(-corners[right, 1])}
        da, db = np.abs(corners[1] - corners[0])
        angle = float(math.degrees(math.atan2(db, da)))
    return {
        "time_s": round(float(st.time_s), 6),
        "stage": st.stage,
        "guidance_stage": guidance_stage(st, frame_out),
        "contrast": bool(st.contrast >= CONTRAST_VISIBLE),
        "opacification": round(float(st.contrast), 4),
        "mm_per_px": round(float(renderer.p.spacing_mm), 6),
        "depth_mm": {k: None if v is None else round(v, 4) for k, v in depth.items()},
        "angle_deg": None if angle is None else round(angle, 4),
    }
