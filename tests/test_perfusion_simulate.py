"""Simulator: ground truth consistent with labels, determinism, the study folder it writes."""

import csv
import dataclasses

import cv2
import numpy as np

from perfusion import colormaps, geometry, simulate, studies


def test_ischemia_recovers_infarction_is_fixed():
    size = 48
    mask = geometry.disk_mask(size)
    for label in ("ischemia", "infarction"):
        sim = simulate.simulate_study(
            np.random.default_rng(5), size, label=label, territories=["RCA"]
        )
        assert sim.territories == ("RCA",)
        assert sim.stress_defect.any() and not (sim.stress_defect & ~mask).any()
        assert set(sim.segments) <= set(geometry.TERRITORIES["RCA"]) and sim.segments
        drop = sim.rest[sim.stress_defect].mean() - sim.stress[sim.stress_defect].mean()
        if label == "ischemia":
            assert drop > 0.15 and sim.rest_defect.sum() < 0.5 * sim.stress_defect.sum()
        else:
            assert abs(drop) < 0.1 and sim.rest_defect.sum() > 0.6 * sim.stress_defect.sum()
    normal = simulate.simulate_study(np.random.default_rng(5), size, label="normal")
    assert not normal.stress_defect.any() and normal.segments == () and normal.territories == ()
    assert normal.stress.max() <= 1.0 and normal.stress[~mask].max() == 0.0
    assert np.percentile(normal.stress[mask], 50) > 0.7


def test_segments_follow_the_defect_mask():
    sim = simulate.simulate_study(np.random.default_rng(9), 64, label="infarction")
    seg = geometry.segment_map(64)
    frac = [(sim.stress_defect & (seg == s)).sum() / (seg == s).sum() for s in range(1, 18)]
    expected = tuple(s + 1 for s in range(17) if frac[s] >= simulate.SEGMENT_FRACTION)
    assert sim.segments == expected
    assert set(sim.territories) == set(geometry.segments_to_territories(sim.segments))


def test_dataset_is_balanced_deterministic_and_complete(tmp_path):
    a = simulate.simulate_dataset(tmp_path / "a", 6, seed=3, size=32, disk_px=60)
    b = simulate.simulate_dataset(tmp_path / "b", 6, seed=3, size=32, disk_px=60)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.stress, y.stress)
    with open(tmp_path / "a" / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows].count("normal") == 2
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (
        tmp_path / "b" / "labels.csv"
    ).read_bytes()
    for r, sim in zip(rows, a, strict=True):
        assert (tmp_path / "a" / "images" / r["filename"]).exists()
        m = np.load(tmp_path / "a" / "masks" / r["filename"].replace(".png", ".npz"))
        np.testing.assert_array_equal(m["stress"], sim.stress_defect)
        assert r["segments"] == "+".join(map(str, sim.segments))


def test_render_has_two_disks_and_a_bar():
    u = np.full((32, 32), 0.8, np.float32)
    img = simulate.render_study_image(u, u, disk_px=80)
    assert img.dtype == np.uint8 and img.shape[1] > 2 * 80
    # the disk centres carry the colour of uptake 0.8
    want = colormaps.uptake_to_rgb(np.float32(0.8))
    assert np.abs(img[50 + 40, 30 + 40].astype(int) - want).max() <= 2


def test_clinical_folder_has_the_referred_population_prior_and_depths(tmp_path):
    sims = simulate.simulate_dataset(
        tmp_path, 10, seed=1, size=32, disk_px=60, difficulty="clinical"
    )
    assert [s.label for s in sims].count("normal") == 6  # 60% normal, exactly
    with open(tmp_path / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    lo, hi = simulate.CLINICAL.depth
    for r, sim in zip(rows, sims, strict=True):
        assert float(r["depth"]) == round(sim.depth, 3)
        assert (sim.depth == 0) == (sim.label == "normal")
        assert sim.label == "normal" or lo <= sim.depth <= hi


def test_mild_defects_have_a_mask_at_half_their_depth():
    mild = dataclasses.replace(simulate.CLINICAL, depth=(0.08, 0.08), peri_infarct=0.0)
    size = 64
    sim = simulate.simulate_study(
        np.random.default_rng(2), size, label="infarction", territories=["LAD"], difficulty=mild
    )
    assert sim.depth == 0.08 and sim.segments  # an absolute 0.15 rule would find nothing
    base = simulate.simulate_study(
        np.random.default_rng(2), size, label="normal", difficulty=mild, sex=sim.sex
    )
    assert base.stress_defect.sum() == 0
    # the defect mask is where the uptake lost reaches half the depth: the uptake there is
    # clearly below the rest of the map
    inside = sim.stress[sim.stress_defect].mean()
    outside = sim.stress[geometry.disk_mask(size) & ~sim.stress_defect].mean()
    assert inside < outside - 0.03


def test_peri_infarct_ischemia_makes_the_stress_defect_wider_than_at_rest():
    size = 64
    for peri, wider in ((0.0, False), (1.0, True)):
        d = dataclasses.replace(simulate.CLINICAL, peri_infarct=peri, infarction_rest=(1.0, 1.0))
        sim = simulate.simulate_study(
            np.random.default_rng(4), size, label="infarction", territories=["RCA"], difficulty=d
        )
        assert not (sim.rest_defect & ~sim.stress_defect).any()
        extra = (sim.stress_defect & ~sim.rest_defect).sum()
        assert (extra > 0.2 * sim.stress_defect.sum()) == wider


def test_attenuation_strength_by_sex():
    size = 64
    seg = geometry.segment_map(size)
    inferior = np.isin(seg, (4, 10))
    anterior = np.isin(seg, (1, 7))
    strong_m = dataclasses.replace(
        simulate.CLINICAL, attenuation_m=(0.3, 0.3), attenuation_f=(0.0, 0.0), noise=(0.0, 0.0)
    )
    gaps = {}
    for sex in ("M", "F"):
        sims = [
            simulate.simulate_study(np.random.default_rng(i), size, label="normal", sex=sex,
                                    difficulty=strong_m)
            for i in range(6)
        ]  # fmt: skip
        gaps[sex] = np.mean([s.stress[anterior].mean() - s.stress[inferior].mean() for s in sims])
    assert gaps["M"] > 0.15 and abs(gaps["F"]) < 0.1


def test_stacked_layout_reads_back(tmp_path):
    sim = simulate.simulate_study(np.random.default_rng(8), 64, label="ischemia")
    img = simulate.render_study_image(
        sim.stress, sim.rest, colormap="hot", disk_px=120, layout="stacked"
    )
    assert img.shape[0] > 2 * 120 > img.shape[1] - 140  # disks above one another
    cv2.imwrite(str(tmp_path / "s.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    st = studies.read_study_image(tmp_path / "s.png", size=64)
    inner = geometry.polar_coords(64)[0] < 0.95
    assert np.abs(st.stress_uptake - sim.stress)[inner].mean() < 0.02
    assert np.abs(st.rest_uptake - sim.rest)[inner].mean() < 0.02
