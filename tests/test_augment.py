"""On-device augmentation: geometry against rendered dots, numpy/OpenCV/SciPy references."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from tavr_jax.data import augment
from tavr_jax.data.augment import AugmentConfig
from tavr_jax.schema import get_schema

S = 64
SCHEMA = get_schema("paper11")
K = SCHEMA.num_points
B = 8
GEOMETRY_ONLY = AugmentConfig(
    brightness=(1.0, 1.0), contrast=(1.0, 1.0), blur_prob=0.0, noise_prob=0.0, rotation_prob=1.0
)


def _key(seed):
    # RngBitGenerator keys compile in a fraction of the time of the default threefry ones;
    # the augmentation does not depend on the key type.
    return jax.random.key(seed, impl="rbg")


def _batch(image, visibility, coords):
    b = len(image)
    return {
        "image": np.asarray(image),
        "visible": np.asarray(visibility, np.float32),
        "coords": np.asarray(coords, np.float32),
        "orig_size": np.full((b, 2), 128, np.int32),
        "pixel_spacing": np.full((b,), 0.25, np.float32),
    }


def _dot(xy, sigma=1.5):
    """A Gaussian dot centred at continuous (x, y); pixel (i, j) has its centre at (j+.5, i+.5)."""
    ys, xs = np.mgrid[0:S, 0:S] + 0.5
    return 200.0 * np.exp(-((xs - xy[0]) ** 2 + (ys - xy[1]) ** 2) / (2 * sigma**2))


def _centroid(image):
    w = np.where(image > 5.0, image, 0.0)
    ys, xs = np.mgrid[0:S, 0:S] + 0.5
    return np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()


def _dot_batch(rng, n, point):
    k = SCHEMA.index(point)
    coords = np.zeros((n, K, 2), np.float32)
    coords[:, k] = rng.uniform(S / 2 - 10, S / 2 + 10, (n, 2))  # stays inside at zoom 1.3
    visibility = np.zeros((n, K), np.float32)
    visibility[:, k] = 1
    image = np.stack([_dot(c[k]) for c in coords]).astype(np.float32)
    return _batch(image, visibility, coords)


def test_keypoints_follow_a_rendered_dot_and_the_numpy_affine():
    rng = np.random.default_rng(0)
    batch = _dot_batch(rng, B, "AA1")
    params = augment.sample_params(_key(3), B, (S, S), GEOMETRY_ONLY)
    out = augment.apply_augmentation(
        batch, params, flip_perm=tuple(SCHEMA.flip_permutation.tolist()), radius=1
    )
    flips = np.asarray(params["flip"])
    assert flips.any() and not flips.all()  # both branches exercised
    aa1, aa2 = SCHEMA.index("AA1"), SCHEMA.index("AA2")
    for i in range(B):
        # numpy reference of p' = c + s R(a) F (p - c)
        s, a = float(params["scale"][i]), float(params["angle"][i])
        f = np.diag([-1.0 if flips[i] else 1.0, 1.0])
        r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        expected = S / 2 + s * r @ f @ (batch["coords"][i, aa1] - S / 2)
        k = aa2 if flips[i] else aa1  # a flipped AA1 is the new AA2
        vis = np.asarray(out["visible"][i])
        assert vis[k] == 1 and vis.sum() == 1
        np.testing.assert_allclose(out["coords"][i, k], expected, atol=1e-3)
        np.testing.assert_allclose(_centroid(np.asarray(out["image"][i])), expected, atol=0.3)


def test_augment_batch_end_to_end_dot():
    rng = np.random.default_rng(1)
    batch = _dot_batch(rng, B, "CP")  # CP has no flip partner
    out = augment.augment_batch(_key(7), batch, SCHEMA, GEOMETRY_ONLY)
    k = SCHEMA.index("CP")
    assert np.all(np.asarray(out["visible"])[:, k] == 1)
    for i in range(B):
        centroid = _centroid(np.asarray(out["image"][i]))
        np.testing.assert_allclose(centroid, out["coords"][i, k], atol=0.3)
    # the draw did move the points (not an identity)
    assert np.abs(np.asarray(out["coords"])[:, k] - batch["coords"][:, k]).max() > 2


def test_identity_config_returns_input():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (B, S, S), np.uint8)
    visibility = (rng.random((B, K)) < 0.5).astype(np.float32)
    coords = rng.uniform(0, S, (B, K, 2)).astype(np.float32) * visibility[..., None]
    batch = _batch(image, visibility, coords)
    out = augment.augment_batch(_key(0), batch, SCHEMA, AugmentConfig.identity())
    np.testing.assert_allclose(out["image"], image.astype(np.float32), atol=1e-3)
    np.testing.assert_array_equal(out["visible"], visibility)
    np.testing.assert_allclose(out["coords"], coords, atol=1e-4)


@pytest.mark.parametrize("schema_name", ["paper11", "reference10"])
def test_flip_mirrors_image_and_swaps_pair_names(schema_name):
    schema = get_schema(schema_name)
    k = schema.num_points
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (1, S, S), np.uint8)
    coords = rng.uniform(1, S - 1, (1, k, 2)).astype(np.float32)
    batch = _batch(image, np.ones((1, k)), coords)
    params = augment.sample_params(_key(0), 1, (S, S), AugmentConfig.identity())
    params["flip"] = jnp.ones(1, bool)
    out = augment.apply_augmentation(
        batch, params, flip_perm=tuple(schema.flip_permutation.tolist()), radius=1
    )
    np.testing.assert_allclose(out["image"][0], image[0, :, ::-1], atol=1e-3)
    expected = coords[0].copy()
    expected[:, 0] = S - expected[:, 0]
    for a, b in schema.flip_pairs:  # hand-written swap of every named pair
        ia, ib = schema.index(a), schema.index(b)
        expected[[ia, ib]] = expected[[ib, ia]]
    np.testing.assert_allclose(out["coords"][0], expected, atol=1e-4)
    assert schema.flip_pairs  # the swap above was exercised


def test_points_leaving_the_image_become_invisible():
    coords = np.zeros((1, K, 2), np.float32)
    coords[0, 0] = (2.0, 2.0)  # corner: leaves the image at zoom 1.3
    coords[0, 1] = (40.0, 30.0)  # near the centre: stays
    batch = _batch(np.zeros((1, S, S), np.uint8), np.eye(1, K, 0) + np.eye(1, K, 1), coords)
    params = augment.sample_params(_key(0), 1, (S, S), AugmentConfig.identity())
    params["scale"] = jnp.full(1, 1.3)
    out = augment.apply_augmentation(batch, params, flip_perm=tuple(range(K)), radius=1)
    assert out["visible"][0, 0] == 0
    np.testing.assert_array_equal(out["coords"][0, 0], [0.0, 0.0])
    assert out["visible"][0, 1] == 1
    np.testing.assert_allclose(out["coords"][0, 1], [32 + 1.3 * 8, 32 - 1.3 * 2], atol=1e-4)
    # random draws: every visible point is inside, every invisible one is zero
    rng = np.random.default_rng(4)
    coords = rng.uniform(0, S, (B, K, 2)).astype(np.float32)
    batch = _batch(np.zeros((B, S, S), np.uint8), np.ones((B, K)), coords)
    out = augment.augment_batch(_key(1), batch, SCHEMA, AugmentConfig(scale=0.5))
    vis, xy = np.asarray(out["visible"]), np.asarray(out["coords"])
    assert 0 < vis.mean() < 1
    assert np.all((xy[vis > 0] >= 0) & (xy[vis > 0] < S))
    assert np.all(xy[vis == 0] == 0)


def _first_inside_along(p, q, size):
    """numpy reference: walk from p towards q in 1e5 steps, the first point inside the image."""
    for t in np.linspace(0.0, 1.0, 100_001):
        x = p + t * (q - p)
        if np.all((x >= 0) & (x < size)):
            return x
    return None


def test_entry_point_pushed_out_moves_along_its_curve_to_the_image_edge():
    """CP (where the catheter enters the field) leaves the image at zoom 1.3, but the catheter
    still enters: CP moves towards CM to the new edge, unless CM itself is gone."""
    cp, cm = SCHEMA.index("CP"), SCHEMA.index("CM")
    assert SCHEMA.entry_partner[cp] == cm and (np.delete(SCHEMA.entry_partner, cp) == -1).all()
    cases = [  # (CP, CM, CM visible, expected visibility of CP)
        ((32.0, 62.0), (32.0, 40.0), 1, 1),  # straight up from the bottom edge
        ((60.0, 60.0), (40.0, 44.0), 1, 1),  # diagonal: crosses the bottom edge first
        ((2.0, 30.0), (20.0, 33.0), 1, 1),  # from the left
        ((32.0, 62.0), (32.0, 40.0), 0, 0),  # CM not visible: nothing to follow
        ((60.0, 62.0), (62.0, 60.0), 1, 0),  # CM pushed out as well
    ]
    n = len(cases)
    coords = np.zeros((n, K, 2), np.float32)
    visibility = np.zeros((n, K), np.float32)
    for i, (p, q, q_visible, _) in enumerate(cases):
        coords[i, cp], coords[i, cm] = p, q
        visibility[i, cp], visibility[i, cm] = 1, q_visible
    coords[:, cm] *= visibility[:, cm, None]
    batch = _batch(np.zeros((n, S, S), np.uint8), visibility, coords)
    params = augment.sample_params(_key(0), n, (S, S), AugmentConfig.identity())
    params["scale"] = jnp.full(n, 1.3)
    out = augment.apply_augmentation(
        batch, params, flip_perm=tuple(range(K)), radius=1,
        entry_partner=tuple(SCHEMA.entry_partner.tolist()),
    )  # fmt: skip
    vis, xy = np.asarray(out["visible"]), np.asarray(out["coords"])
    for i, (p, q, _, expected) in enumerate(cases):
        assert vis[i, cp] == expected, cases[i]
        if expected:
            zoomed = [S / 2 + 1.3 * (np.array(v) - S / 2) for v in (p, q)]
            assert not np.all((zoomed[0] >= 0) & (zoomed[0] < S))  # it did leave
            np.testing.assert_allclose(xy[i, cp], _first_inside_along(*zoomed, S), atol=2e-3)
            np.testing.assert_allclose(xy[i, cm], zoomed[1], atol=1e-4)  # CM only zoomed
        else:
            np.testing.assert_array_equal(xy[i, cp], [0.0, 0.0])
    # without the schema's entry points the same CP simply leaves (the rule of every point)
    plain = augment.apply_augmentation(batch, params, flip_perm=tuple(range(K)), radius=1)
    assert not np.asarray(plain["visible"])[:, cp].any()


def test_warp_matches_opencv_warp_affine():
    ys, xs = np.mgrid[0:S, 0:S]
    image = (120 + 60 * np.sin(xs / 6.0) * np.cos(ys / 9.0)).astype(np.float32)
    s, a = 1.2, 0.4
    matrix = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    ours = np.asarray(augment.warp_image(jnp.asarray(image), jnp.asarray(matrix)))
    # OpenCV puts pixel centres at integers, so its centre is S/2 - 0.5.
    c = np.full(2, S / 2 - 0.5)
    cv_matrix = np.hstack([matrix, (c - matrix @ c)[:, None]])
    theirs = cv2.warpAffine(image, cv_matrix, (S, S), flags=cv2.INTER_LINEAR, borderValue=0)
    inner = slice(8, S - 8)  # borders differ only in how they blend with the fill
    np.testing.assert_allclose(ours[inner, inner], theirs[inner, inner], atol=0.5)


def test_blur_matches_scipy():
    rng = np.random.default_rng(5)
    image = rng.uniform(0, 255, (S, S)).astype(np.float32)
    for sigma in (0.7, 1.9):
        ours = augment.gaussian_blur(jnp.asarray(image), jnp.float32(sigma), 6)
        ref = scipy.ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=6 / sigma)
        np.testing.assert_allclose(ours, ref, atol=1e-3)
    same = augment.gaussian_blur(jnp.asarray(image), jnp.float32(0.0), 6)
    np.testing.assert_allclose(same, image, atol=1e-4)


def test_brightness_contrast_and_noise():
    rng = np.random.default_rng(6)
    image = rng.uniform(60, 180, (S, S)).astype(np.float32)
    ours = augment.brightness_contrast(jnp.asarray(image), 1.1, 0.9)
    np.testing.assert_allclose(ours, ((image - image.mean()) * 0.9 + image.mean()) * 1.1, rtol=1e-5)
    config = AugmentConfig(
        brightness=(1.0, 1.0), contrast=(1.0, 1.0), blur_prob=0.0, noise_prob=1.0,
        noise_std=(4.0, 4.0), scale=0.0, rotation_prob=0.0, flip_prob=0.0,
    )  # fmt: skip
    batch = _batch(np.full((B, S, S), 128, np.uint8), np.zeros((B, K)), np.zeros((B, K, 2)))
    out = np.asarray(augment.augment_batch(_key(2), batch, SCHEMA, config)["image"])
    assert abs(out.std() - 4.0) < 0.2 and abs(out.mean() - 128) < 0.2


def test_jit_vmap_shapes_dtypes_and_single_compile():
    rng = np.random.default_rng(7)
    batch = _batch(
        rng.integers(0, 256, (B, S, S), np.uint8), np.ones((B, K)), rng.uniform(0, S, (B, K, 2))
    )
    config = {"scale": 0.2, "flip_prob": 0.5}  # dicts (and ConfigDicts) are accepted
    before = augment._augment_batch._cache_size()
    for step in range(3):
        out = augment.augment_batch(jax.random.fold_in(_key(0), step), batch, SCHEMA, config)
    assert augment._augment_batch._cache_size() == before + 1  # one trace for all steps
    assert out["image"].shape == (B, S, S) and out["image"].dtype == jnp.float32
    assert out["visible"].shape == (B, K) and out["visible"].dtype == jnp.float32
    assert out["coords"].shape == (B, K, 2) and out["coords"].dtype == jnp.float32
    assert float(out["image"].min()) >= 0 and float(out["image"].max()) <= 255
    np.testing.assert_array_equal(out["orig_size"], batch["orig_size"])
    np.testing.assert_array_equal(out["pixel_spacing"], batch["pixel_spacing"])
    with pytest.raises(ValueError, match="unknown augmentation config keys"):
        augment.augment_batch(_key(0), batch, SCHEMA, {"sclae": 0.2})
