"""Hand checks of the bull's-eye grid, AHA segments and territories."""

import numpy as np
import pytest

from perfusion import geometry


def test_polar_coords_orientation():
    s = 64
    radius, angle = geometry.polar_coords(s)
    assert radius.shape == angle.shape == (s, s)
    # right edge middle row: lateral, angle ~0; top middle column: anterior, ~90
    assert angle[s // 2, s - 1] == pytest.approx(360 - np.degrees(np.arctan2(0.5, 31.5)), abs=1e-9)
    assert angle[0, s // 2] == pytest.approx(90 - np.degrees(np.arctan2(0.5, 31.5)), abs=1e-9)
    assert angle[s // 2, 0] == pytest.approx(180 + np.degrees(np.arctan2(0.5, 31.5)), abs=1e-9)
    assert angle[s - 1, s // 2] == pytest.approx(270 + np.degrees(np.arctan2(0.5, 31.5)), abs=1e-9)
    # pixel (row 0, col 32): centre (32.5, 0.5) -> x = 0.5/32, y = 31.5/32
    assert radius[0, s // 2] == pytest.approx(np.hypot(0.5, 31.5) / 32)


def test_segment_hand_checks():
    s = 128
    seg = geometry.segment_map(s)
    c = s // 2
    assert seg[c, c] == 17  # apex at the centre
    assert seg[1, c] == 1  # top centre at the rim: basal anterior
    assert seg[s - 2, c] == 4  # bottom: basal inferior
    assert seg[c - 20, c] == 13  # apical anterior (radius ~0.31)
    assert seg[c, c + 20] == 16  # apical lateral
    assert seg[c, 5] in (2, 3)  # basal, exactly left = septal boundary (180 deg)
    assert seg[c - 3, 5] == 2  # just above the horizontal: anteroseptal
    assert seg[c + 3, 5] == 3  # just below: inferoseptal
    assert seg[c - 3, c - 40] == 8  # mid anteroseptal (radius ~0.63)
    assert seg[c + 3, c - 40] == 9  # mid inferoseptal
    assert seg[c, c - 20] == 14  # apical septal
    assert seg[0, 0] == 0 and seg[s - 1, s - 1] == 0  # corners outside the disk
    # lateral side: anterolateral above, inferolateral below
    assert seg[c - 3, s - 6] == 6 and seg[c + 3, s - 6] == 5


def test_segment_of_matches_map_and_sector_angles():
    r = np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.7, 0.4, 0.4, 0.4, 0.4, 0.1, 1.1])
    a = np.array([90, 150, 210, 270, 330, 30, 90, 90, 180, 270, 0, 45, 90])
    np.testing.assert_array_equal(
        geometry.segment_of(r, a), [1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 16, 17, 0]
    )


def test_segment_areas_follow_ring_fractions():
    s = 256
    seg = geometry.segment_map(s)
    counts = np.bincount(seg.ravel(), minlength=18)[1:]
    total = counts.sum()
    assert total == pytest.approx(np.pi * (s / 2) ** 2, rel=0.01)
    # ring fractions 35/35/25/5 %, split evenly into 6/6/4/1 sectors
    expected = np.array([0.35 / 6] * 6 + [0.35 / 6] * 6 + [0.25 / 4] * 4 + [0.05]) * total
    np.testing.assert_allclose(counts, expected, rtol=0.03)


def test_territories_cover_all_segments_once():
    segs = sorted(s for v in geometry.TERRITORIES.values() for s in v)
    assert segs == list(range(1, 18))
    tmap = geometry.territory_map(64)
    seg = geometry.segment_map(64)
    assert (tmap > 0).sum() == (seg > 0).sum()
    lad = 1 + geometry.TERRITORY_NAMES.index("LAD")
    assert np.all(tmap[seg == 17] == lad) and np.all(tmap[seg == 2] == lad)
    assert geometry.segments_to_territories([4, 16]) == ["LCX", "RCA"]
    assert geometry.territory_segments(["RCA"]) == [3, 4, 9, 10, 15]
    with pytest.raises(ValueError, match="XYZ"):
        geometry.territory_segments(["XYZ"])


def test_segment_centroids_positions():
    s = 128
    cent = geometry.segment_centroids(s)
    assert cent.shape == (17, 2)
    np.testing.assert_allclose(cent[16], [63.5, 63.5], atol=0.5)  # apex at the centre
    assert cent[0, 1] < 30 and abs(cent[0, 0] - 63.5) < 1  # basal anterior: top centre
    assert cent[13, 0] < 50  # apical septal: left
    assert cent[15, 0] > 77  # apical lateral: right
