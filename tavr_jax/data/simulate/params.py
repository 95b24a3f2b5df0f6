"""What is random about a simulated case and its frames: the case parameters (anatomy, view,
devices, dose) and the schedule of procedure stages through which its cine runs pass."""

from __future__ import annotations

import dataclasses

import numpy as np

STAGES = ("aortogram", "positioning", "deployment", "post_deployment", "fluoroscopy")
SIMULATED_POINTS = ("AA1", "AA2", "STJ1", "STJ2", "CP", "CM", "CD", "CT", "PT", "FE1", "FE2")
FPS = 15.0  # cine frame rate of a series
CONTRAST_VISIBLE = 0.35  # opacification from which the root's landmarks count as visible
_STAGE_WEIGHTS = (0.26, 0.24, 0.24, 0.16, 0.10)


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
