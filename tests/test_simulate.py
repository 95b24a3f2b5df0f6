import dataclasses
import filecmp
import math
import pathlib

import numpy as np
import pytest

from tavr_jax.data import simulate, supervisely
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")


def _params(size, seed=3, **overrides):
    """A case with no shutters and the root near the middle, so all landmarks are in view."""
    p = simulate.sample_case(np.random.default_rng(seed), size)
    base = dict(shutters=(0.0, 0.0, 0.0, 0.0), center=(size * 0.5, size * 0.6), mirror=False)
    base.update(overrides)
    return dataclasses.replace(p, **base)


def _state(stage, **kw):
    return simulate.FrameState(stage=stage, time_s=1.0, **{"pigtail": True, **kw})


def _xy(pts, name):
    return np.array(pts[name][:2])


def _at(img, q):
    x, y = np.round(q).astype(int)
    return img[y, x]


def test_project_is_deterministic_for_a_seed_whatever_the_worker_count(tmp_path):
    kw = dict(cases=3, frames=3, size=64, seed=5, progress=False)
    a = simulate.simulate_project(tmp_path / "a", SCHEMA, **kw)
    b = simulate.simulate_project(tmp_path / "b", SCHEMA, **kw, workers=2)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 2 + 3 * 3 * 2
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_a], shallow=False)
    assert mismatch == [] and errors == []
    c = simulate.simulate_project(tmp_path / "c", SCHEMA, **{**kw, "seed": 6})
    first_image = lambda root: sorted(root.rglob("*.png"))[0].read_bytes()  # noqa: E731
    assert first_image(a) != first_image(c)
    # The reader gets back what was written, with stage and pixel spacing tags.
    project = supervisely.read_project(a, SCHEMA)
    assert len(project.frames) == 9 and project.counts["dropped_points"] == 0
    assert all(f.stage in simulate.STAGES and f.pixel_spacing_mm > 0 for f in project.frames)


def test_annulus_and_stj_points_sit_on_the_rendered_contrast():
    size = 192
    p = _params(size)
    r = simulate.CaseRenderer(p, size)
    _, pts, layers = r.render(
        _state("aortogram", contrast=1.0), np.random.default_rng(0), layers=True
    )
    root = layers["contrast"]
    mm = 1.0 / p.spacing_mm
    aa1, aa2 = _xy(pts, "AA1"), _xy(pts, "AA2")
    stj1, stj2 = _xy(pts, "STJ1"), _xy(pts, "STJ2")
    across = (aa2 - aa1) / np.linalg.norm(aa2 - aa1)
    up = np.array([across[1], -across[0]])
    if np.dot(up, (stj1 + stj2) / 2 - (aa1 + aa2) / 2) < 0:
        up = -up
    peak = root.max()
    for a, b in ((aa1, aa2), (aa2, aa1)):
        inner = a + 0.2 * (b - a)
        assert _at(root, inner + 4 * mm * up) > 0.25 * peak  # contrast just above the hinge
        assert _at(root, inner - 6 * mm * up) < 0.02 * peak  # none in the ventricle below
    assert _at(root, (stj1 + stj2) / 2) > 0.5 * peak
    # Annulus diameter in pixels is the anatomy's (similarity transform, motion scale ~1%).
    assert np.linalg.norm(aa2 - aa1) == pytest.approx(2 * p.r_annulus * mm, rel=0.03)
    assert np.linalg.norm(stj2 - stj1) == pytest.approx(2 * p.r_stj * mm, rel=0.03)
    # In the standard view the lower hinge point, AA1, is also the left one.
    assert aa1[0] < aa2[0] and aa1[1] > aa2[1]


def test_delivery_points_sit_on_the_rendered_catheter():
    size = 256
    p = _params(size, seed=4)
    r = simulate.CaseRenderer(p, size)
    st = _state("positioning", delivery=True, advance_mm=5.0)
    _, pts, layers = r.render(st, np.random.default_rng(0), layers=True)
    dense, thin = layers["dense"], layers["thin"]
    ct, cd, cm, cp = (_xy(pts, n) for n in ("CT", "CD", "CM", "CP"))
    assert all(pts[n][2] for n in ("CT", "CD", "CM", "CP"))
    axis = (ct - cd) / np.linalg.norm(ct - cd)
    assert _at(dense, ct - 1.0 * axis) > 0  # the nose cone ends at CT ...
    assert _at(dense, ct + 3.0 * axis) == 0  # ... and not beyond it
    assert _at(dense, cd) > 200  # the marker band at the capsule's proximal end
    assert _at(thin, cm) > 0  # CM lies on the shaft
    # CP is on the border of the exposed field (no shutters here: the image border).
    assert min(cp[0], cp[1], size - 1 - cp[0], size - 1 - cp[1]) < 1e-6
    # CM halves the shaft by arclength, so it is at most as far from either end as the arc.
    d1, d2 = np.linalg.norm(cm - cp), np.linalg.norm(cd - cm)
    assert d1 > 0.3 * (d1 + d2) and d2 > 0.3 * (d1 + d2)


def test_a_strut_attenuates_the_same_at_every_pixel_size():
    # The valve frame's 0.45-mm struts are thinner than a pixel of a 256-px frame. Rounded to
    # whole pixels, they looked denser there than in a 1024-px frame (and fainter at 512),
    # and a network trained on small frames missed the frames of large ones. Summed over the
    # frame (value x pixel area, in mm^2), the struts must agree across sizes.
    st = _state("post_deployment", released=True, pigtail=False)
    fov = _params(1024, seed=11).spacing_mm * 1024
    area, centre = {}, {}
    for size in (192, 256, 384, 512, 1024):  # struts 0.5-2.9 px wide
        p = _params(size, seed=11, spacing_mm=fov / size)
        _, pts, layers = simulate.CaseRenderer(p, size).render(
            st, np.random.default_rng(0), layers=True
        )
        struts = layers["struts"] / 255.0
        area[size] = struts.sum() * p.spacing_mm**2
        y, x = np.indices(struts.shape)
        centroid = np.array([(x * struts).sum(), (y * struts).sum()]) / struts.sum()
        centre[size] = (centroid - _xy(pts, "FE1")) / size  # from the frame's own landmark
    assert area[256] > 0
    for size in (192, 256, 384, 512):
        assert area[size] == pytest.approx(area[1024], rel=0.15), area
        # drawn on a finer grid and averaged down, the struts stay where the landmarks say
        np.testing.assert_allclose(centre[size], centre[1024], atol=0.25 / size)


def test_pigtail_centre_is_inside_its_loop():
    size = 256
    p = _params(size, seed=7, pigtail_normal=(0.0, 0.0, 1.0), pigtail_radius=5.0)
    r = simulate.CaseRenderer(p, size)
    _, pts, layers = r.render(_state("fluoroscopy"), np.random.default_rng(0), layers=True)
    thin = layers["thin"]
    pt = _xy(pts, "PT")
    radius_px = p.pigtail_radius / p.spacing_mm
    assert _at(thin, pt) < 128  # the centre of the loop is open
    for ang in np.linspace(0, 2 * math.pi, 12, endpoint=False):
        ray = pt + np.outer(np.linspace(0, 1.4 * radius_px, 40), [math.cos(ang), math.sin(ang)])
        hits = [_at(thin, q) for q in ray]
        assert max(hits) > 100, f"no catheter around PT at angle {ang:.2f}"


def test_visibility_follows_the_stage():
    size = 128
    r = simulate.CaseRenderer(_params(size, seed=11), size)
    rng = np.random.default_rng(0)
    groups = {g: set(pts) for g, pts in SCHEMA.groups}

    def visible(st):
        _, pts = r.render(st, rng)
        return {name for name, (_, _, v) in pts.items() if v}

    aortogram = visible(_state("aortogram", contrast=1.0))
    assert aortogram == groups["anatomical"] | {"PT"}
    assert visible(_state("aortogram", contrast=0.1)) == {"PT"}
    positioning = visible(_state("positioning", delivery=True, advance_mm=10.0))
    assert {"CT", "CD", "CP"} <= positioning and not positioning & {"FE1", "FE2", "AA1"}
    deploying = visible(_state("deployment", delivery=True, retract=0.5, contrast=0.8))
    assert {"FE1", "FE2", "CT", "AA1", "STJ2"} <= deploying
    post = visible(_state("post_deployment", released=True, contrast=0.9, pigtail=False))
    assert post == groups["anatomical"] | {"FE1", "FE2"}
    # Shutters hide what they cover: a field closed down to the top-left corner.
    covered = simulate.CaseRenderer(_params(size, seed=11, shutters=(0, 0, 0.7, 0.7)), size)
    _, pts = covered.render(_state("aortogram", contrast=1.0), rng)
    assert not any(v for _, _, v in pts.values())


def test_mirrored_view_flips_points_and_keeps_left_right_names():
    size = 128
    p = _params(size, seed=2)
    st = _state("deployment", delivery=True, retract=0.6, contrast=1.0)
    out = []
    for mirror in (False, True):
        r = simulate.CaseRenderer(dataclasses.replace(p, mirror=mirror), size)
        _, pts = r.render(st, np.random.default_rng(0))
        vis, coords = simulate._to_schema(pts, list(SCHEMA.point_names), size)
        out.append((vis, coords))
    (v0, c0), (v1, c1) = out
    perm = SCHEMA.flip_permutation
    assert v0.sum() >= 9
    np.testing.assert_array_equal(v1[perm], v0)
    expected = np.stack([size - 1 - c0[:, 0], c0[:, 1]], axis=1)
    np.testing.assert_allclose(c1[perm][v0], expected[v0], atol=1e-3)
    for a, b in (("AA1", "AA2"), ("STJ1", "STJ2"), ("FE1", "FE2")):
        i, j = SCHEMA.index(a), SCHEMA.index(b)
        assert c0[i, 0] < c0[j, 0] and c1[i, 0] < c1[j, 0]


def test_pixels_look_like_a_thorax_with_dark_contrast():
    size = 128
    p = _params(size, seed=5)
    r = simulate.CaseRenderer(p, size)
    plain, pts = r.render(_state("fluoroscopy", pigtail=False), np.random.default_rng(0))
    filled, _ = r.render(_state("aortogram", contrast=1.0, pigtail=False), np.random.default_rng(0))
    assert plain.dtype == np.uint8 and plain.shape == (size, size)
    assert 60 < np.median(plain) < 200 and plain.std() > 15
    # Structured background, not flat noise: column means vary (spine, heart) well above what
    # pixel noise alone would give (std of a column mean of 128 noisy pixels is < 1 grey level).
    assert np.diff(plain[20:-20].mean(axis=0)).std() > 0.3 and plain[20:-20].mean(axis=0).std() > 5
    centre = (_xy(pts, "AA1") + _xy(pts, "AA2") + _xy(pts, "STJ1") + _xy(pts, "STJ2")) / 4
    x, y = np.round(centre).astype(int)
    drop = float(plain[y - 2 : y + 3, x - 2 : x + 3].mean()) - float(
        filled[y - 2 : y + 3, x - 2 : x + 3].mean()
    )
    assert drop > 40  # contrast-filled root is dark
    # Beer-Lambert: with the same noise, the log-display difference equals the added attenuation.
    _, _, lay0 = r.render(
        _state("fluoroscopy", pigtail=False), np.random.default_rng(1), layers=True
    )
    _, _, lay1 = r.render(
        _state("aortogram", contrast=1.0, pigtail=False), np.random.default_rng(1), layers=True
    )
    np.testing.assert_allclose(
        lay1["attenuation"] - lay0["attenuation"], lay1["contrast"], atol=1e-5
    )


def test_schema_mapping_by_name():
    ref = get_schema("reference10")
    with pytest.raises(ValueError, match="FE2_o"):
        simulate.simulate_case(np.random.default_rng(0), ref, frames=1, size=64)
    frames = simulate.simulate_case(
        np.random.default_rng(0), ref, frames=4, size=64, allow_missing=True
    )
    vis = np.array([f[1] for f in frames])
    assert vis.shape == (4, 10)
    for name in ("FE2_o", "FE1_o", "EC1", "EC2", "CT1", "CT2"):
        assert not vis[:, ref.index(name)].any()


def test_schedule_runs_are_in_procedure_order_and_smooth():
    states = simulate.sample_schedule(np.random.default_rng(4), 60)
    order = [simulate.STAGES.index(s.stage) for s in states]
    assert order == sorted(order) and len(states) == 60
    dt = np.diff([s.time_s for s in states])
    assert (dt > 0).all()
    same_run = np.isclose(dt, 1 / simulate.FPS)
    assert same_run.sum() >= 60 - 4
    contrast = np.array([s.contrast for s in states])
    assert np.abs(np.diff(contrast))[same_run].max() < 0.2  # smooth within a cine run


def test_cli_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="cases"):
        simulate.simulate_project(tmp_path, SCHEMA, cases=0, frames=2, size=64, seed=0)
    with pytest.raises(ValueError, match="workers"):
        simulate.simulate_project(tmp_path, SCHEMA, cases=1, frames=2, size=64, seed=0, workers=0)
    with pytest.raises(ValueError, match="size"):
        simulate.simulate_case(np.random.default_rng(0), SCHEMA, frames=1, size=8)
    assert not any(pathlib.Path(tmp_path).iterdir())


# (seed, case, size, frames) of the recorded reference: every stage, a mirrored view (7, 4),
# a size that is not a power of two and the paper's 512 px.
_REFERENCE_CASES = [(7, c, 96, 41) for c in range(6)] + [(1, 0, 512, 3), (1, 1, 200, 25)]
_REFERENCE = pathlib.Path(__file__).parent / "data" / "simulate_reference.npz"


def _block_means(images: np.ndarray, grid: int = 8) -> np.ndarray:
    """(T, grid, grid) mean grey level of each block of (T, S, S) frames."""
    t, size = len(images), images.shape[1] // grid * grid
    cut = images[:, :size, :size].astype(np.float64)
    return cut.reshape(t, grid, size // grid, grid, size // grid).mean(axis=(2, 4))


def test_same_seed_gives_identical_frames_within_a_run():
    for seed, case, size, frames in (_REFERENCE_CASES[4], _REFERENCE_CASES[-1]):
        runs = [
            simulate.simulate_case(
                np.random.default_rng([seed, case]), SCHEMA, frames=frames, size=size
            )  # fmt: skip
            for _ in range(2)
        ]
        for a, b in zip(*runs, strict=True):
            for x, y in zip(a[:3], b[:3], strict=True):
                np.testing.assert_array_equal(x, y)
            assert a[3] == b[3]


def test_frames_match_the_recorded_reference_within_rendering_tolerance():
    """Recorded once (tests/data/simulate_reference.npz). Labels must agree to float
    precision; images to a fraction of a grey level per 1/8-frame block, which holds across
    CPUs and the OpenCV/numpy builds the constraints allow, and fails on any change to what is
    drawn (a moved device or a different contrast level shifts blocks by whole grey levels)."""
    ref = np.load(_REFERENCE)
    for seed, case, size, frames in _REFERENCE_CASES:
        key = f"{seed}_{case}_{size}_{frames}"
        got = simulate.simulate_case(np.random.default_rng([seed, case]), SCHEMA, frames=frames,
                                     size=size)  # fmt: skip
        assert [f[3] for f in got] == list(ref[key + "_stages"]), key
        np.testing.assert_array_equal(np.stack([f[1] for f in got]), ref[key + "_visibility"])
        np.testing.assert_allclose(np.stack([f[2] for f in got]), ref[key + "_coords"],
                                   atol=1e-3, err_msg=key)  # fmt: skip
        blocks = _block_means(np.stack([f[0] for f in got]))
        np.testing.assert_allclose(blocks, ref[key + "_blocks"], atol=0.5, err_msg=key)


def test_guidance_truth_agrees_with_the_annotated_keypoints():
    from tavr_jax.infer import guidance

    size = 128
    retrieved = dict(released=True, delivery=True, delivery_retrieved=True)
    states = [
        _state("positioning", delivery=True, advance_mm=8.0, contrast=1.0),
        _state("deployment", delivery=True, retract=0.6, contrast=1.0),
        _state("post_deployment", released=True, contrast=0.9),
        _state("post_deployment", contrast=0.9, **retrieved),  # nose cone above the frame
        _state("fluoroscopy", released=True),
    ]
    checked = 0
    for mirror, implant_depth in ((False, 5.5), (True, 3.0), (False, -2.5)):
        p = _params(size, seed=2, mirror=mirror, implant_depth=implant_depth)
        r = simulate.CaseRenderer(p, size)
        for st in states:
            _, pts = r.render(st, np.random.default_rng(0))
            truth = simulate.frame_truth(r, st)
            assert truth["mm_per_px"] == pytest.approx(p.spacing_mm)
            assert truth["contrast"] == (st.contrast >= simulate.CONTRAST_VISIBLE)
            if not st.released and not st.retract:
                assert truth["guidance_stage"] == "positioning" and truth["angle_deg"] is None
                assert truth["depth_mm"] == {"FE1": None, "FE2": None}
                continue
            assert truth["guidance_stage"] == ("deployed" if st.released else "deploying")
            # the readouts measured on the exact keypoints, in mm through the spacing
            seen = {n: _xy(pts, n) if pts[n][2] else None for n in pts}
            depth = guidance.implantation_depths(seen, mm_per_px=p.spacing_mm)
            if truth["contrast"]:
                for side in ("FE1", "FE2"):
                    # within a pixel, and the 1.2 % the heartbeat scales the image by
                    tol = 0.5 * p.spacing_mm + 0.015 * abs(truth["depth_mm"][side])
                    assert depth[side] == pytest.approx(truth["depth_mm"][side], abs=tol)
                    assert np.sign(depth[side]) == np.sign(implant_depth)
                angle = guidance.coaxiality_deg(*(seen[n] for n in ("FE1", "FE2", "AA1", "AA2")))
                assert float(angle) == pytest.approx(truth["angle_deg"], abs=0.05)
                checked += 1
            else:
                assert depth == {"FE1": None, "FE2": None}  # no annulus in view
                assert truth["depth_mm"]["FE1"] is not None  # the truth still knows it
    assert checked == 9


def test_truth_draws_nothing_and_the_project_writes_it_per_frame(tmp_path):
    from tavr_jax.infer import guidance

    truth: list[dict] = []
    with_truth = simulate.simulate_case(
        np.random.default_rng([7, 1]), SCHEMA, frames=6, size=64, truth=truth
    )
    plain = simulate.simulate_case(np.random.default_rng([7, 1]), SCHEMA, frames=6, size=64)
    assert len(truth) == 6
    for got, want in zip(with_truth, plain, strict=True):
        for x, y in zip(got, want, strict=True):
            np.testing.assert_array_equal(x, y)
    root = simulate.simulate_project(
        tmp_path / "p", SCHEMA, cases=2, frames=3, size=64, seed=1, progress=False
    )
    rows = guidance.read_truth(root)
    images = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    assert list(rows) == images  # case and frame order, named as the images
    project = supervisely.read_project(root, SCHEMA)
    assert len(project.frames) == 6  # the sidecar does not disturb the reader
    for f in project.frames:
        row = rows[f"{f.case_id}/img/{f.frame_name}"]
        assert row["stage"] == f.stage and row["mm_per_px"] == f.pixel_spacing_mm
    assert all(set(r["depth_mm"]) == {"FE1", "FE2"} for r in rows.values())


def test_cases_written_as_dicom_cines_carry_spacing_rate_and_the_truth_names(tmp_path):
    from cardiac_core.dicom import DicomCine
    from tavr_jax.data import supervisely
    from tavr_jax.infer.guidance import read_truth

    root = simulate.simulate_project(tmp_path / "p", SCHEMA, cases=2, frames=3, size=64, seed=1,
                                     progress=False)  # fmt: skip
    cines = simulate.write_cines(root, SCHEMA, tmp_path / "cines")
    project = supervisely.read_project(root, SCHEMA)
    truth = read_truth(root)
    assert len(cines) == 2
    for path, names in cines:
        cine = DicomCine(path)
        assert len(cine) == 3 and set(names) <= set(truth)
        rows = [i for i, f in enumerate(project.frames) if f.case_id == path.stem]
        for k, i in enumerate(rows):
            np.testing.assert_array_equal(cine.frame(k), project.load_image(i))
        spacing = project.frames[rows[0]].pixel_spacing_mm
        assert cine.pixel_spacing_rc == pytest.approx((spacing, spacing), rel=1e-5)  # DS digits
        np.testing.assert_allclose(np.diff(cine.times_s), 1 / simulate.FPS, rtol=1e-6)
