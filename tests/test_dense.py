"""The dense heatmap head: target encoding, sub-pixel decoding, flips, its loss, one train step."""

import _train_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tavr_jax.models import create_model, dense, heads
from tavr_jax.run import workdir
from tavr_jax.schema import get_schema
from tavr_jax.training import losses, train

SCHEMA = get_schema("paper11")


def _gaussian_numpy(x, y, h, w, height, width, sigma):
    """A plain double loop over the cells: the target distribution of one point."""
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            cx, cy = (j + 0.5) * width / w, (i + 0.5) * height / h
            out[i, j] = np.exp(-((cx - x) ** 2 + (cy - y) ** 2) / (2 * sigma**2))
    return out / out.sum()


def _local_soft_argmax_numpy(maps, radius):
    """(h, w) logits of one point -> normalised (x, y), by loops over the window."""
    h, w = maps.shape
    r0, c0 = np.unravel_index(np.argmax(maps), maps.shape)
    num_x = num_y = den = 0.0
    for i in range(max(0, r0 - radius), min(h, r0 + radius + 1)):
        for j in range(max(0, c0 - radius), min(w, c0 + radius + 1)):
            e = np.exp(maps[i, j] - maps[r0, c0])
            num_x += e * (j + 0.5) / w
            num_y += e * (i + 0.5) / h
            den += e
    return num_x / den, num_y / den


def test_gaussian_heatmap_matches_loops():
    coords = np.array([[[10.3, 20.7], [0.0, 63.9], [40.0, 2.5]]], np.float32)  # (1, 3, 2)
    got = np.asarray(losses.gaussian_heatmap(coords, shape=(8, 16), image_size=(32, 64), sigma=3.0))
    assert got.shape == (1, 3, 8, 16)
    for k, (x, y) in enumerate(coords[0]):
        ref = _gaussian_numpy(x, y, 8, 16, 32, 64, 3.0)
        np.testing.assert_allclose(got[0, k], ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_local_soft_argmax_matches_loops(radius):
    maps = np.random.RandomState(radius).randn(2, 9, 12, 3).astype(np.float32) * 3
    maps[0, 0, 0, 1] = 20.0  # a peak in a corner: the window is clipped by the border
    got = np.asarray(jax.jit(lambda m: dense.local_soft_argmax(m, radius=radius))(maps))
    for b in range(2):
        for k in range(3):
            np.testing.assert_allclose(
                got[b, k], _local_soft_argmax_numpy(maps[b, :, :, k], radius), rtol=1e-5
            )


def test_decoding_a_target_recovers_the_point_finer_than_a_cell():
    # Log of the training target as logits: the decoder must return the point it encodes,
    # well inside one cell (4 px here), the precision the stride alone would allow.
    size, h = 64, 16
    xy = np.array([[[17.3, 41.9], [30.0, 30.0], [5.6, 50.1]]], np.float32)
    target = losses.gaussian_heatmap(xy, shape=(h, h), image_size=(size, size), sigma=4.0)
    logits = jnp.moveaxis(jnp.log(target), 1, -1)  # (1, h, w, K)
    got = np.asarray(dense.local_soft_argmax(logits, radius=3)) * size
    np.testing.assert_allclose(got[0, :2], xy[0, :2], atol=0.02)
    # Near the border the window is cut on one side: a bias, but still within a quarter cell.
    np.testing.assert_allclose(got[0, 2], xy[0, 2], atol=1.0)
    assert abs(got[0, 2, 0] - xy[0, 2, 0]) > 0.1


def test_flip_swaps_heatmap_targets_and_decoded_points():
    """A horizontally flipped frame's targets are the flipped maps with pairs swapped, and
    decoding commutes with the flip: what `augment` does to points, the head does to maps."""
    rng = np.random.RandomState(0)
    size, h = 64, 16
    xy = rng.uniform(0, size, (1, SCHEMA.num_points, 2)).astype(np.float32)
    perm = SCHEMA.flip_permutation
    flipped_xy = np.stack([size - xy[..., 0], xy[..., 1]], -1)[:, perm]
    target = losses.gaussian_heatmap(xy, shape=(h, h), image_size=(size, size), sigma=4.0)
    flipped_target = losses.gaussian_heatmap(
        flipped_xy, shape=(h, h), image_size=(size, size), sigma=4.0
    )
    np.testing.assert_allclose(flipped_target, np.asarray(target)[:, perm, :, ::-1], atol=1e-6)

    maps = rng.randn(1, h, h, SCHEMA.num_points).astype(np.float32) * 4
    decoded = np.asarray(dense.local_soft_argmax(maps))
    decoded_flipped = np.asarray(dense.local_soft_argmax(maps[:, :, ::-1][..., perm]))
    expected = np.stack([1 - decoded[..., 0], decoded[..., 1]], -1)[:, perm]
    np.testing.assert_allclose(decoded_flipped, expected, atol=1e-6)


def test_heatmap_loss_matches_numpy_and_is_zero_at_the_target():
    rng = np.random.RandomState(1)
    b, h, w, k, size = 2, 6, 8, 3, (24, 32)
    logits = rng.randn(b, h, w, k).astype(np.float32)
    xy = rng.uniform(0, 24, (b, k, 2)).astype(np.float32)
    got = np.asarray(losses.heatmap_loss(logits, xy, image_size=size, sigma=2.5))
    for i in range(b):
        for j in range(k):
            p = _gaussian_numpy(*xy[i, j], h, w, *size, 2.5)
            z = logits[i, :, :, j].astype(np.float64)
            log_q = z - z.max() - np.log(np.exp(z - z.max()).sum())
            np.testing.assert_allclose(got[i, j], np.sum(p * (np.log(p) - log_q)), rtol=1e-4)
    exact = jnp.moveaxis(
        jnp.log(losses.gaussian_heatmap(xy, shape=(h, w), image_size=size, sigma=2.5)), 1, -1
    )
    np.testing.assert_allclose(
        losses.heatmap_loss(exact, xy, image_size=size, sigma=2.5), 0, atol=1e-5
    )


def test_heatmap_loss_masked_subset_and_finite_gradients():
    rng = np.random.RandomState(2)
    logits = jnp.asarray(rng.randn(2, 5, 5, 3) * 10, jnp.float32)
    xy = rng.uniform(0, 20, (2, 3, 2)).astype(np.float32)
    where = np.array([[True, False, True], [False, False, True]])
    xy_garbage = np.where(where[..., None], xy, 1e6)  # invisible points carry anything
    masked = losses.heatmap_loss(logits, xy_garbage, image_size=(20, 20), where=where)
    full = losses.heatmap_loss(logits, xy, image_size=(20, 20))
    np.testing.assert_allclose(np.asarray(masked)[where], np.asarray(full)[where], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(masked)[~where], 0.0)

    def loss(z, mask):
        return jnp.sum(losses.heatmap_loss(z, xy_garbage, image_size=(20, 20), where=mask))

    grad = jax.jit(jax.grad(loss))(logits, where)
    assert np.all(np.isfinite(grad))
    masked_cells = np.broadcast_to(~where[:, None, None, :], grad.shape)  # (B, h, w, K)
    np.testing.assert_array_equal(np.asarray(grad)[masked_cells], 0.0)
    assert np.any(np.asarray(grad)[~masked_cells] != 0)
    none = jax.grad(loss)(logits, np.zeros_like(where))
    np.testing.assert_array_equal(none, 0.0)


@pytest.mark.parametrize("grouped", [True, False])
def test_heatmap_head_outputs(grouped):
    model = create_model(SCHEMA, backbone="resnet_tiny", head="heatmap", grouped=grouped)
    images = np.random.RandomState(3).randint(0, 256, (2, 64, 64)).astype(np.uint8)
    variables = model.init(jax.random.key(0), images)
    out = model.apply(variables, images)
    # resnet_tiny has stages at strides 4 and 8: the neck fuses both, maps at stride 4.
    assert out["heatmap_logits"].shape == (2, 16, 16, SCHEMA.num_points)
    assert out["coords"].shape == (2, SCHEMA.num_points, 2)
    assert out["group_logits"].shape == (2, SCHEMA.num_groups)
    np.testing.assert_allclose(
        out["coords"], dense.local_soft_argmax(out["heatmap_logits"], radius=2), atol=1e-6
    )
    head = variables["params"]["head"]
    assert set(head["neck"]) == {"lateral_0", "lateral_1", "smooth_0"}
    assert ("group_classifier" in head) == grouped


def test_heatmap_evidence_is_the_log_mean_exp_of_each_map():
    maps = np.random.default_rng(4).normal(0, 3, (2, 5, 7, 3)).astype(np.float32)
    want = np.empty((2, 3))
    for b in range(2):
        for k in range(3):
            want[b, k] = np.log(np.mean(np.exp(maps[b, :, :, k].astype(np.float64))))
    np.testing.assert_allclose(heads.heatmap_evidence(maps), want, rtol=1e-5, atol=1e-5)
    # A flat map of zeros says nothing; a map that fires in one cell raises it.
    zeros = np.zeros((1, 4, 4, 1), np.float32)
    assert float(heads.heatmap_evidence(zeros)[0, 0]) == 0.0
    peak = zeros.copy()
    peak[0, 2, 1, 0] = 10.0
    np.testing.assert_allclose(heads.heatmap_evidence(peak)[0, 0], np.log((15 + np.e**10) / 16))


@pytest.mark.parametrize("head", ["heatmap", "integral"])
@pytest.mark.parametrize("grouped", [True, False])
def test_dense_visibility_adds_the_evidence_and_trains_the_maps(head, grouped):
    plain = create_model(SCHEMA, backbone="resnet_tiny", head=head, grouped=grouped)
    dense_vis = create_model(
        SCHEMA, backbone="resnet_tiny", head=head, grouped=grouped, dense_visibility=True
    )
    images = np.random.RandomState(5).randint(0, 256, (2, 64, 64)).astype(np.uint8)
    variables = plain.init(jax.random.key(0), images)  # no new parameters
    assert jax.tree.structure(dense_vis.init(jax.random.key(0), images)) == jax.tree.structure(
        variables
    )
    a, state = plain.apply(
        variables, images, mutable=["intermediates"],
        capture_intermediates=lambda module, _: module.name == "heatmap_out",
    )  # fmt: skip
    maps = state["intermediates"]["head"]["heatmap_out"]["__call__"][0]
    b = dense_vis.apply(variables, images)
    want = a["visibility_logits"] + heads.heatmap_evidence(maps)
    np.testing.assert_allclose(b["visibility_logits"], want, atol=1e-5)
    np.testing.assert_allclose(b["coords"], a["coords"], atol=1e-6)
    if not grouped:  # a group is as present as its likeliest point, evidence included
        np.testing.assert_allclose(b["group_logits"], heads.group_max(want, SCHEMA), atol=1e-5)

    # The visibility loss now reaches the maps' last convolution (it does not without).
    def visibility_loss(params, model):
        out = model.apply({**variables, "params": params}, images)
        labels = jnp.zeros_like(out["visibility_logits"]).at[:, 0].set(1.0)
        return jnp.mean(losses.group_bce(out["visibility_logits"], labels))

    for model, reaches in ((plain, False), (dense_vis, True)):
        grads = jax.grad(visibility_loss)(variables["params"], model)
        g = np.asarray(grads["head"]["heatmap_out"]["kernel"])
        assert np.all(np.isfinite(g)) and (np.abs(g).max() > 0) == reaches


def test_heatmap_head_refuses_a_single_feature_map():
    from tavr_jax.models.heads import HeatmapHead

    with pytest.raises(ValueError, match="backbone's stages"):
        HeatmapHead(SCHEMA).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))


def test_train_steps_with_the_heatmap_head(tmp_path):
    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates
    try:
        config = worker.tiny_config(head="heatmap", num_steps=2)
        batch = worker.synthetic_batch(config.batch_size, config.image_size, SCHEMA.num_points)
        t = train.build_training(config)
        before = jax.device_get(t.state["params"]["head"]["neck"])
        state = t.state
        for _ in range(2):  # the warm-up schedule starts at a learning rate of 0
            state, metrics = t.train_fn(state, train.to_global(batch, t.batch_sharding))
        metrics = jax.device_get(metrics)
        assert int(state["step"]) == 2
        assert np.isfinite(metrics["loss"]) and metrics["loss_heatmap"] > 0
        after = jax.device_get(state["params"]["head"]["neck"])
        assert any(
            not np.allclose(a, b)
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        )
        pred = t.eval_fn(state, train.to_global(batch, t.batch_sharding))
        assert pred["coords"].shape == (config.batch_size, SCHEMA.num_points, 2)
        model, _ = workdir.build_model(config)
        assert model.head == "heatmap"
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
