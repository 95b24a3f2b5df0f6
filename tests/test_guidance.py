import json
import math

import numpy as np
import pytest

from tavr_jax.infer import guidance
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")
KEYS = {"depth_sd", "angle_deg", "annulus", "annulus_age_s", "stage", "stage_source", "alerts"}
KEYS |= {"units", "calibrated"}

# A horizontal annulus 40 px wide at y = 100, the aorta above it (y down): a standard view.
ROOT = {
    "AA1": (40.0, 100.0),
    "AA2": (80.0, 100.0),
    "STJ1": (42.0, 60.0),
    "STJ2": (82.0, 62.0),
    "PT": (50.0, 92.0),
}


def _frame(points: dict, probability: float | dict = 1.0):
    """(coords, probability, reported) of paper11 arrays from name -> (x, y)."""
    k = SCHEMA.num_points
    coords = np.zeros((k, 2))
    prob = np.zeros(k)
    reported = np.zeros(k, bool)
    for name, xy in points.items():
        i = SCHEMA.index(name)
        coords[i] = xy
        reported[i] = True
        prob[i] = probability.get(name, 1.0) if isinstance(probability, dict) else probability
    return coords, prob, reported


def _rotate(points: dict, degrees: float, centre=(60.0, 100.0)) -> dict:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    out = {}
    for name, (x, y) in points.items():
        dx, dy = x - centre[0], y - centre[1]
        out[name] = (centre[0] + c * dx - s * dy, centre[1] + s * dx + c * dy)
    return out


# ---------------------------------------------------------------------------------- geometry


def test_depth_is_positive_toward_the_ventricle_and_scales_with_spacing():
    points = {**ROOT, "FE1": (45.0, 104.0), "FE2": (75.0, 97.0)}
    assert guidance.implantation_depths(points) == {"FE1": 4.0, "FE2": -3.0}
    mm = guidance.implantation_depths(points, mm_per_px=0.25)
    assert mm == {"FE1": pytest.approx(1.0), "FE2": pytest.approx(-0.75)}
    # The anatomy decides the side, not the image axes: the aorta drawn below the annulus.
    upside_down = {k: (x, 200.0 - y) for k, (x, y) in points.items()}
    assert guidance.implantation_depths(upside_down) == {"FE1": 4.0, "FE2": -3.0}


def test_mirror_swaps_the_sides_and_keeps_the_depths():
    points = {**ROOT, "FE1": (45.0, 104.0), "FE2": (75.0, 97.0)}
    swap = {"AA1": "AA2", "AA2": "AA1", "STJ1": "STJ2", "STJ2": "STJ1", "FE1": "FE2", "FE2": "FE1"}
    mirrored = {swap.get(k, k): (127.0 - x, y) for k, (x, y) in points.items()}
    assert guidance.implantation_depths(mirrored) == {"FE1": -3.0, "FE2": 4.0}


@pytest.mark.parametrize("degrees", [0.0, 17.0, 90.0, 133.0, 180.0, 251.5, 300.0])
@pytest.mark.parametrize("reference", ["STJ1", "CD", "CM", "CP", "PT"])
def test_rotation_by_any_angle_keeps_the_depths_whatever_side_reference(degrees, reference):
    aortic = {"STJ1": (60.0, 70.0), "CD": (58.0, 50.0), "CM": (70.0, 20.0), "CP": (75.0, 0.0)}
    aortic["PT"] = ROOT["PT"]
    points = {"AA1": ROOT["AA1"], "AA2": ROOT["AA2"], reference: aortic[reference]}
    points |= {"FE1": (45.0, 104.0), "FE2": (75.0, 97.0), "CT": (60.0, 130.0)}
    depths = guidance.implantation_depths(_rotate(points, degrees))
    assert depths == {"FE1": pytest.approx(4.0), "FE2": pytest.approx(-3.0)}


def test_a_missing_point_hides_what_needs_it():
    points = {**ROOT, "FE1": (45.0, 104.0), "FE2": None}
    assert guidance.implantation_depths(points) == {"FE1": 4.0, "FE2": None}
    assert guidance.implantation_depths({**points, "AA2": None}) == {"FE1": None, "FE2": None}


def test_without_an_aortic_point_the_image_convention_holds_and_near_points_are_skipped():
    bare = {"AA1": (40.0, 100.0), "AA2": (80.0, 100.0), "FE1": (45.0, 104.0)}
    assert guidance.implantation_depths(bare)["FE1"] == 4.0  # ventricle below: +y
    # A pigtail 1 px off the line could be either side within its error: not used; the
    # capsule end 60 px below says the aorta is below (an upside-down view).
    odd = {**bare, "PT": (60.0, 99.0), "CD": (60.0, 160.0)}
    assert guidance.implantation_depths(odd)["FE1"] == -4.0


def test_vectorised_geometry_and_the_coaxiality_angle():
    aa1 = np.array([[0.0, 0.0], [0.0, 0.0]])
    aa2 = np.array([[10.0, 0.0], [10.0, 10.0]])
    normal = guidance.ventricle_normal(aa1, aa2, aortic_point=np.array([[5.0, -5.0], [0.0, 9.0]]))
    np.testing.assert_allclose(normal, [[0.0, 1.0], [math.sqrt(0.5), -math.sqrt(0.5)]])
    depth = guidance.signed_depth(aa1, aa2, np.array([[3.0, 2.0], [4.0, 0.0]]), normal)
    np.testing.assert_allclose(depth, [2.0, math.sqrt(8.0)])
    c30, s30 = math.cos(math.radians(30)), math.sin(math.radians(30))
    fe1 = np.zeros((5, 2))
    fe2 = np.array([[1, 0], [c30, s30], [-c30, s30], [0, 1], [-1, 0.0]])
    angle = guidance.coaxiality_deg(fe1, fe2, np.zeros(2), np.array([3.0, 0.0]))
    np.testing.assert_allclose(angle, [0.0, 30.0, 30.0, 90.0, 0.0], atol=1e-9)
    assert np.isnan(guidance.coaxiality_deg([0, 0], [0, 0], [0, 0], [1, 0]))
    assert np.isnan(guidance.ventricle_normal([1.0, 1.0], [1.0, 1.0])).all()
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        guidance.signed_depth([0, 0, 0], [1, 0], [0, 1], [0, 1])


def test_depth_sd_propagates_the_positional_sd_by_hand():
    # the FE corner's foot is a quarter of the way from AA1 to AA2
    sd = guidance.depth_sd([0.0, 0.0], [8.0, 0.0], [2.0, 5.0], 2.0, 4.0, 1.0)
    assert float(sd) == pytest.approx(math.sqrt(1.0 + 0.75**2 * 4.0 + 0.25**2 * 16.0))


# ---------------------------------------------------------------------------------- tracker


def test_readouts_calibrated_and_not():
    points = {**ROOT, "FE1": (45.0, 104.0), "FE2": (75.0, 97.0)}
    tracker = guidance.GuidanceTracker(SCHEMA, mm_per_px=0.5)
    out = tracker.update(0.0, *_frame(points))
    assert set(out) == KEYS | {"depth_mm"}
    assert out["depth_mm"] == {"FE1": 2.0, "FE2": -1.5}
    assert out["units"] == "mm" and out["calibrated"] is True
    assert out["annulus"] == "seen" and out["annulus_age_s"] == 0.0
    assert out["angle_deg"] == pytest.approx(math.degrees(math.atan2(7, 30)), abs=0.01)
    json.dumps(out)  # JSON-ready
    # a frame's own spacing wins over the constructor's
    assert tracker.update(0.1, *_frame(points), mm_per_px=0.1)["depth_mm"]["FE1"] == 0.4
    plain = guidance.GuidanceTracker(SCHEMA).update(0.0, *_frame(points))
    assert set(plain) == KEYS | {"depth_px"} and "depth_mm" not in plain
    assert plain["depth_px"] == {"FE1": 4.0, "FE2": -3.0}
    assert plain["units"] == "px" and plain["calibrated"] is False


def test_depth_sd_grows_with_spread_and_low_probability():
    points = {**ROOT, "FE1": (50.0, 104.0)}
    spread = np.full(SCHEMA.num_points, 1.0)
    coords, prob, reported = _frame(points, {"FE1": 0.5})
    out = guidance.GuidanceTracker(SCHEMA, mm_per_px=0.5).update(
        0.0, coords, prob, reported, spread_px=spread
    )
    # FE1 sd 1 / 0.5 = 2 px; its foot at t = 0.25 on AA1 -> AA2 (sd 1 px each)
    want = math.sqrt(2.0**2 + 0.75**2 + 0.25**2) * 0.5
    assert out["depth_sd"] == {"FE1": pytest.approx(want, abs=1e-3), "FE2": None}


def test_annulus_is_carried_with_the_pigtail_then_expires():
    tracker = guidance.GuidanceTracker(SCHEMA, carry_max_s=8.0)
    fe = {"FE1": (45.0, 110.0), "FE2": (75.0, 110.0)}
    seen = tracker.update(10.0, *_frame({**ROOT, **fe}))
    assert seen["depth_px"] == {"FE1": 10.0, "FE2": 10.0} and seen["annulus"] == "seen"
    # contrast washes out: no AA/STJ; the root moved down 5 px and right 3 px with PT
    moved = {"PT": (53.0, 97.0), "FE1": (48.0, 110.0), "FE2": (78.0, 110.0)}
    carried = tracker.update(11.5, *_frame(moved))
    assert carried["annulus"] == "carried" and carried["annulus_age_s"] == 1.5
    assert carried["depth_px"] == {"FE1": 5.0, "FE2": 5.0}
    assert carried["depth_sd"]["FE1"] > seen["depth_sd"]["FE1"]
    assert carried["alerts"] == []
    late = tracker.update(18.1, *_frame(moved))  # 8.1 s after it was seen
    assert late["annulus"] is None and late["annulus_age_s"] is None
    assert late["depth_px"] == {"FE1": None, "FE2": None} and late["angle_deg"] is None
    assert late["alerts"] == ["annulus lost"]
    assert tracker.update(18.2, *_frame(moved))["annulus"] is None  # gone for good


def test_the_carried_annulus_is_the_injections_weighted_mean_relative_to_the_pigtail():
    fe = {"FE1": (45.0, 110.0), "FE2": (75.0, 110.0)}

    def root(dy, probability=1.0):
        aa = {"AA1": (40.0, 100.0 + dy), "AA2": (80.0, 100.0 + dy)}
        return _frame({**ROOT, **aa, **fe}, {"AA1": probability, "AA2": probability})

    tracker = guidance.GuidanceTracker(SCHEMA)
    tracker.update(0.0, *root(+1.0))  # the hinge points 1 px low, then 1 px high: the
    tracker.update(0.1, *root(-1.0))  # carried line is their mean, the true one
    carried = tracker.update(0.5, *_frame({"PT": ROOT["PT"], **fe}))
    assert carried["annulus"] == "carried" and carried["depth_px"] == {"FE1": 10.0, "FE2": 10.0}
    # weights 1 / sd^2: a frame seen at probability 0.5 counts a quarter as much
    tracker = guidance.GuidanceTracker(SCHEMA)
    tracker.update(0.0, *root(+2.0))
    tracker.update(0.1, *root(-2.0, probability=0.5))
    carried = tracker.update(0.5, *_frame({"PT": ROOT["PT"], **fe}))
    # offsets' variance: AA sd (2 px / p)^2 plus PT's (2 px)^2 -> weights 1/8 and 1/20
    mean_dy = (2.0 / 8 - 2.0 / 20) / (1 / 8 + 1 / 20)
    assert carried["depth_px"]["FE1"] == pytest.approx(10.0 - mean_dy, abs=1e-3)
    # a new injection starts a new mean
    tracker.update(1.0, *root(+3.0))
    again = tracker.update(1.5, *_frame({"PT": ROOT["PT"], **fe}))
    assert again["depth_px"]["FE1"] == pytest.approx(7.0, abs=1e-3)


def test_carried_annulus_is_dropped_when_the_pigtail_is_lost():
    fe = {"FE1": (45.0, 110.0), "FE2": (75.0, 110.0)}
    tracker = guidance.GuidanceTracker(SCHEMA)
    tracker.update(0.0, *_frame({**ROOT, **fe}))
    assert tracker.update(1.0, *_frame({"PT": ROOT["PT"], **fe}))["annulus"] == "carried"
    assert tracker.update(1.1, *_frame(fe))["annulus"] is None  # PT lost
    assert tracker.update(1.2, *_frame({"PT": ROOT["PT"], **fe}))["annulus"] is None
    # no PT when the annulus was last seen: nothing to carry it with
    without_pt = {k: v for k, v in ROOT.items() if k != "PT"}
    fresh = guidance.GuidanceTracker(SCHEMA)
    fresh.update(0.0, *_frame({**without_pt, **fe}))
    out = fresh.update(0.5, *_frame({"PT": ROOT["PT"], **fe}))
    assert out["annulus"] is None and out["alerts"] == ["annulus lost"]
    assert guidance.GuidanceTracker(SCHEMA).update(0.0, *_frame(fe))["alerts"] == [
        "annulus not seen"
    ]


def test_stage_is_inferred_from_the_devices_or_taken_from_the_prior():
    fe = {"FE1": (45.0, 104.0), "FE2": (75.0, 104.0)}
    below, above, far_above = (60.0, 125.0), (60.0, 60.0), (60.0, 20.0)

    def stage(points, **kw):
        out = guidance.GuidanceTracker(SCHEMA, **kw).update(0.0, *_frame(points))
        return out["stage"], out["stage_source"]

    assert stage({**ROOT, "CT": below, "CD": above}) == ("positioning", "inferred")
    assert stage({**ROOT, **fe, "CT": below, "CD": above})[0] == "deploying"
    assert stage({**fe, "CT": below, "CD": above})[0] == "deploying"  # no annulus needed
    assert stage({**ROOT, **fe, "CT": above, "CD": far_above})[0] == "deployed"  # withdrawn
    assert stage({**ROOT, **fe, "CT": below})[0] == "deploying"  # side from the annulus
    assert stage({**ROOT, **fe, "CT": above})[0] == "deployed"
    assert stage({**ROOT, **fe})[0] == "deployed"  # catheter gone
    assert stage({**ROOT, **fe}, stage_prior="deploying") == ("deploying", "prior")
    with pytest.raises(ValueError, match="stage_prior must be one of"):
        guidance.GuidanceTracker(SCHEMA, stage_prior="deployment")


def test_alerts_for_a_side_out_of_the_target_range():
    points = {**ROOT, "FE1": (45.0, 112.4), "FE2": (75.0, 108.0)}  # 6.2 mm and 4.0 mm
    tracker = guidance.GuidanceTracker(SCHEMA, mm_per_px=0.5, target_depth_mm=(3, 5))
    assert tracker.update(0.0, *_frame(points))["alerts"] == [
        "FE1 depth 6.2 mm deeper than target 3-5 mm"
    ]
    shallow = {**points, "FE2": (75.0, 101.0)}
    assert tracker.update(0.1, *_frame(shallow))["alerts"][1] == (
        "FE2 depth 0.5 mm shallower than target 3-5 mm"
    )
    plain = guidance.GuidanceTracker(SCHEMA, target_depth_mm=(3, 5)).update(0, *_frame(points))
    assert plain["alerts"] == ["no pixel spacing: depth target not checked"]


def test_bad_arguments_raise_one_line_value_errors():
    with pytest.raises(ValueError, match="mm_per_px"):
        guidance.GuidanceTracker(SCHEMA, mm_per_px=0.0)
    with pytest.raises(ValueError, match="target_depth_mm"):
        guidance.GuidanceTracker(SCHEMA, target_depth_mm=(5, 3))
    with pytest.raises(ValueError, match="carry_max_s"):
        guidance.GuidanceTracker(SCHEMA, carry_max_s=-1)
    with pytest.raises(ValueError, match="needs points AA1, AA2, not in schema 'reference10'"):
        guidance.GuidanceTracker(get_schema("reference10"))
    tracker = guidance.GuidanceTracker(SCHEMA)
    coords, prob, reported = _frame(ROOT)
    with pytest.raises(ValueError, match=r"coords \(11, 2\)"):
        tracker.update(0.0, coords[:5], prob, reported)
    with pytest.raises(ValueError, match="time_s"):
        tracker.update(float("nan"), coords, prob, reported)
    with pytest.raises(ValueError, match="mm_per_px"):
        tracker.update(0.0, coords, prob, reported, mm_per_px=-1.0)


# ---------------------------------------------------------------------------------- scoring


def _record(frame, fe1, fe2, annulus="seen", units="mm", angle=None):
    return {
        "frame": frame,
        f"depth_{units}": {"FE1": fe1, "FE2": fe2},
        "angle_deg": angle,
        "annulus": annulus,
    }


def _truth(fe1, fe2, contrast, angle=None):
    return {"depth_mm": {"FE1": fe1, "FE2": fe2}, "contrast": contrast, "angle_deg": angle}


def test_score_readouts_on_hand_made_records(tmp_path):
    truth = {
        "c0/img/0000.png": _truth(4.0, 4.0, True, angle=2.0),
        "c0/img/0001.png": _truth(4.0, 6.0, False, angle=3.0),
        "c0/img/0002.png": _truth(2.0, 2.0, False),
        "c0/img/0003.png": _truth(None, None, False),
    }
    records = [
        _record("c0/img/0000.png", 5.0, 3.5, angle=3.0),  # errors 1.0, 0.5; 5.0 still in 3-5
        _record("/data/sim/c0/img/0001.png", 4.2, 5.8, annulus="carried", angle=2.0),
        _record("c0/img/0002.png", 8.0, 8.0, units="px", annulus="carried"),  # uncalibrated
        _record("c0/img/0003.png", None, None, annulus=None),
        _record("other/0000.png", 1.0, 1.0),
    ]
    score = guidance.score_readouts(records, truth, target_depth_mm=(3, 5))
    assert score["n_frames"] == 2 and score["unmatched_frames"] == 1
    assert score["depth_mae_mm"] == pytest.approx((1.0 + 0.5 + 0.2 + 0.2) / 4)
    # sides in/out of 3-5: (in, in) vs (in, in); (in, out) vs (in, out) -> 4 of 4 agree
    assert score["range_agreement"] == 1.0 and score["angle_mae_deg"] == 1.0
    seen = score["seen"]  # the annulus on the frame: 0000 only
    assert seen["n_frames"] == 1 and seen["depth_mae_mm"] == pytest.approx(0.75)
    assert seen["angle_mae_deg"] == 1.0
    carried = score["carried"]
    assert carried["n_frames"] == 1 and carried["depth_mae_mm"] == pytest.approx(0.2)
    assert carried["coverage"] == 0.5  # of frames 0001 and 0002 (no contrast, a valve frame)
    records[0]["depth_mm"]["FE2"] = 2.5  # now out of range where the truth is in
    assert guidance.score_readouts(records, truth, target_depth_mm=(3, 5))[
        "range_agreement"
    ] == pytest.approx(0.75)
    assert guidance.score_readouts(records, truth)["range_agreement"] is None
    empty = guidance.score_readouts([], truth)
    assert empty["n_frames"] == 0 and empty["depth_mae_mm"] is None
    assert empty["carried"]["coverage"] is None


def test_read_truth_reads_a_project_file_and_refuses_bad_lines(tmp_path):
    rows = [{"frame": "c0/img/0000.png", "depth_mm": {"FE1": 1.0, "FE2": 2.0}}]
    rows.append({"frame": "c0/img/0001.png", "depth_mm": {"FE1": None, "FE2": None}})
    path = tmp_path / guidance.GUIDANCE_TRUTH_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    truth = guidance.read_truth(tmp_path)
    assert list(truth) == ["c0/img/0000.png", "c0/img/0001.png"]
    assert guidance.read_truth(path)["c0/img/0000.png"]["depth_mm"]["FE2"] == 2.0
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=":2: frame 'c0/img/0000.png' appears twice"):
        guidance.read_truth(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=":1: not a truth record"):
        guidance.read_truth(path)
