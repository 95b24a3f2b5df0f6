"""Simulator: ground truth consistent with labels, determinism, the study folder it writes."""

import csv

import numpy as np

from perfusion import geometry, simulate


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
    from perfusion import colormaps

    want = colormaps.uptake_to_rgb(np.float32(0.8))
    assert np.abs(img[50 + 40, 30 + 40].astype(int) - want).max() <= 2
