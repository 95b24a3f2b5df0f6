"""The jnp strip/ring features against a straightforward float64 numpy loop."""

import numpy as np
import pytest

from perfusion import features


def _maps(rng, b, size):
    maps = rng.integers(0, 256, (b, size, size, 3)).astype(np.uint8)
    maps[:, : size // 3, : size // 4] = 0  # a black corner, as the painted background
    maps[0, :, : size // 5] = 0  # first vertical strip entirely black: mean 0, std 0
    return maps


def test_matches_numpy_loop_uint8():
    rng = np.random.default_rng(0)
    maps = _maps(rng, 5, 40)
    got = np.asarray(features.strip_ring_features(maps), np.float64)
    ref = features.strip_ring_features_loop(maps)
    assert got.shape == (5, 84)
    # 1e-5 relative to the 0-255 scale of the values
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=255 * 1e-5)
    assert got[0, 0] == 0 and got[0, 1] == 0  # empty part


def test_matches_numpy_loop_float_to_1e5():
    rng = np.random.default_rng(1)
    maps = _maps(rng, 3, 33).astype(np.float32) / 255.0  # odd size: uneven strips
    got = np.asarray(features.strip_ring_features(maps), np.float64)
    np.testing.assert_allclose(got, features.strip_ring_features_loop(maps), atol=1e-5)


def test_variance_is_stable_for_constant_bright_regions():
    # a constant 250 map: E[x^2] - mean^2 in float32 would not give exactly 0
    maps = np.full((1, 32, 32, 3), 250, np.uint8)
    got = np.asarray(features.strip_ring_features(maps))[0]
    np.testing.assert_allclose(got[0::2], 250.0)
    np.testing.assert_allclose(got[1::2], 0.0, atol=1e-4)  # one ulp of 250 in the mean


def test_integer_path_with_bright_corner_and_masks():
    # Pixel 0 is where the ring padding points: bright here, so the correction must remove it.
    rng = np.random.default_rng(4)
    maps = rng.integers(0, 256, (3, 37, 37, 3)).astype(np.uint8)
    maps[:, 0, 0] = (200, 100, 50)
    maps[1, 5:9, 5:30] = 0  # some black pixels inside the disk
    mask = rng.random((37, 37)) < 0.7
    for m in (None, mask, ~mask):
        got = np.asarray(features.strip_ring_features(maps, m), np.float64)
        np.testing.assert_allclose(
            got, features.strip_ring_features_loop(maps, m), rtol=1e-5, atol=255e-5
        )


def test_integer_path_worst_case_variance_at_256():
    # 1/255 stripes: the largest variance 8-bit data can have, on the largest parts at 256 px,
    # where the int32 sums of x^2 exceed 2^24 and the shifted products wrap
    maps = np.where(np.arange(256) % 2 == 0, 1, 255).astype(np.uint8)[None, :, None, None]
    maps = np.broadcast_to(maps, (1, 256, 256, 3)).copy()
    maps[0, :, :, 1] = maps[0, :, :, 1].T
    assert features._integer_path_fits(256) and not features._integer_path_fits(2048)
    got = np.asarray(features.strip_ring_features(maps), np.float64)
    ref = features.strip_ring_features_loop(maps)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=255e-5)
    assert ref[0, 1::2].max() > 120  # std near 127: the worst case was exercised


def test_uint8_and_float_paths_agree():
    rng = np.random.default_rng(5)
    maps = _maps(rng, 2, 48)
    as_uint8 = np.asarray(features.strip_ring_features(maps))
    as_float = np.asarray(features.strip_ring_features(maps.astype(np.float32)))
    np.testing.assert_allclose(as_uint8, as_float, rtol=1e-5, atol=255e-5)


def test_ring_blocks_cover_each_ring_once():
    pixel, block_ring, padding = features.ring_blocks(40)
    ring = features.ring_index(40).reshape(-1)
    for k in range(features.NUM_RINGS):
        entries = pixel[block_ring == k].reshape(-1)
        real = entries[: len(entries) - padding[k]]
        assert sorted(real) == list(np.flatnonzero(ring == k))
        assert (entries[len(real) :] == 0).all()


def test_explicit_mask_and_order():
    rng = np.random.default_rng(2)
    maps = _maps(rng, 2, 20)
    mask = np.zeros((20, 20), bool)
    mask[:, 16:] = True  # only the last vertical strip
    got = np.asarray(features.strip_ring_features(maps, mask))
    ref = features.strip_ring_features_loop(maps, mask)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
    # vertical strip 4 of channel G (index 1*28 + 4*2) is the mean of columns 16.. of G
    np.testing.assert_allclose(got[1, 28 + 8], maps[1, :, 16:, 1].mean(), rtol=1e-6)
    assert features.FEATURE_NAMES[28 + 8] == "G_vstrip4_mean"
    assert len(features.FEATURE_NAMES) == 84


def test_study_features_concatenates_difference():
    rng = np.random.default_rng(3)
    s, r = _maps(rng, 2, 16), _maps(rng, 2, 16)
    f = np.asarray(features.study_features(s, r))
    assert f.shape == (2, 252)
    np.testing.assert_allclose(f[:, 168:], f[:, :84] - f[:, 84:168], atol=1e-4)
    with pytest.raises(ValueError, match="expected maps"):
        features.strip_ring_features(np.zeros((2, 16, 15, 3)))


def test_uptake_features_over_the_disk_against_the_loop():
    rng = np.random.default_rng(4)
    size = 32
    stress = rng.uniform(0.0, 1.0, (3, size, size)).astype(np.float32)
    rest = rng.uniform(0.0, 1.0, (3, size, size)).astype(np.float32)
    stress[0, 10:20, 10:20] = 0.0  # a full-depth defect is still LV, not background
    outside = features.ring_index(size) < 0
    got = features.uptake_features(stress, rest)
    assert got.shape == (3, 84) and len(features.UPTAKE_FEATURE_NAMES) == 84
    maps = np.stack([stress, rest, stress - rest], -1).astype(np.float64)
    np.testing.assert_allclose(
        got, features.strip_ring_features_loop(maps, ~outside), rtol=1e-5, atol=1e-6
    )
    # by hand: the mean stress uptake of the inner ring (radius under a quarter)
    c = (np.arange(size) + 0.5 - size / 2) / (size / 2)
    inner = np.hypot(c[None, :], c[:, None]) < 0.25
    i = features.UPTAKE_FEATURE_NAMES.index("uptake_stress_ring0_mean")
    np.testing.assert_allclose(got[0, i], stress[0][inner].mean(), rtol=1e-5)
    # what lies outside the disk never counts
    stress[:, outside] = 7.0
    np.testing.assert_allclose(features.uptake_features(stress, rest), got, rtol=1e-5, atol=1e-6)
