import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perfusion import cnn, geometry


@pytest.fixture
def fast_compile():
    # Compilation dominates these few-step trainings on CPU (flax examples do the same).
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def test_dice_matches_hand_computation():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2, :2] = True  # 4 pixels
    b[0, :2, :3] = True  # 6 pixels, 4 shared -> 2 * 4 / 10
    # Second pair: both empty -> 1 by convention.
    np.testing.assert_allclose(cnn.dice(a, b), [0.8, 1.0])
    b[1, 0, 0] = True  # one empty, one not -> 0
    np.testing.assert_allclose(cnn.dice(a, b)[1], 0.0)


def test_unet_shapes_and_param_tree():
    net = cnn.UNet(features=(4, 8))
    x = jnp.zeros((3, 16, 16, 2))
    # Abstract evaluation: shapes without compiling or running anything.
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    assert jax.eval_shape(net.apply, variables, x).shape == (3, 16, 16, 2)
    # One down block, bottom, one up-convolution, one up block, the 1x1 logits.
    assert set(variables["params"]) == {"down0", "bottom", "upconv0", "up0", "logits"}
    # Input channels 2 + 3 coordinate channels feed the first convolution.
    assert variables["params"]["down0"]["conv0"]["kernel"].shape == (3, 3, 5, 4)


def test_segmentation_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 8, 8, 2)).astype(np.float32)
    target = (rng.random((2, 8, 8, 2)) > 0.6).astype(np.float32)
    lv = geometry.disk_mask(8)
    got = np.asarray(
        cnn.segmentation_loss(jnp.asarray(logits), jnp.asarray(target), jnp.asarray(lv))
    )
    for b in range(2):
        p = 1 / (1 + np.exp(-logits[b][lv]))  # (P, 2)
        t = target[b][lv]
        bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
        soft = [
            (2 * (p[:, c] * t[:, c]).sum() + 1) / (p[:, c].sum() + t[:, c].sum() + 1)
            for c in range(2)
        ]
        np.testing.assert_allclose(got[b], bce + 1 - np.mean(soft), rtol=1e-4)


def _toy_masks(n, size, rng):
    """Uptake 0.8 with a dark square defect whose mask is the target (stress); rest is normal."""
    stress = np.full((n, size, size), 0.8, np.float32) + rng.normal(0, 0.03, (n, size, size))
    rest = np.full((n, size, size), 0.8, np.float32)
    mask = np.zeros((n, size, size), bool)
    for i in range(n):
        r, c = rng.integers(2, size - 8, 2)
        mask[i, r : r + 6, c : c + 6] = True
    stress = np.where(mask, 0.3, stress).astype(np.float32)
    return stress, rest, mask & geometry.disk_mask(size), np.zeros_like(mask)


def test_train_unet_reduces_loss_and_predicts_masks(tmp_path, fast_compile):
    rng = np.random.default_rng(0)
    stress, rest, ms, mr = _toy_masks(8, 16, rng)
    cfg = cnn.UNetConfig(size=16, features=(8, 16), steps=40, batch_size=8, learning_rate=1e-2)
    model, losses = cnn.train_unet(stress, rest, ms, mr, cfg)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    pred = cnn.predict_mask(model, stress, rest)
    assert pred.shape == (8, 2, 16, 16) and pred.dtype == bool
    assert not pred[:, :, ~geometry.disk_mask(16)].any()
    model.save(tmp_path)
    back = cnn.UNetModel.load(tmp_path)
    np.testing.assert_array_equal(cnn.predict_mask(back, stress, rest), pred)
    with pytest.raises(FileNotFoundError, match="no U-Net"):
        cnn.UNetModel.load(tmp_path / "nothing")


def test_classifier_fit_predict_proba_learns_a_trivial_split(fast_compile):
    rng = np.random.default_rng(0)
    n = 16
    labels = np.arange(n) % 2
    # Class 1 maps are bright, class 0 dark: any classifier must separate them.
    images = rng.integers(0, 60, (n, 32, 32, 6)).astype(np.uint8)
    images[labels == 1] += 150
    cfg = dataclasses.replace(cnn.TINY_CLASSIFIER, epochs=6, learning_rate=1e-2)
    fit_predict = cnn.make_fit_predict_proba(images, labels, num_classes=2, config=cfg)
    train_idx, test_idx = np.arange(12), np.arange(12, 16)
    proba = fit_predict(train_idx, test_idx)
    assert proba.shape == (4, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (proba.argmax(axis=1) == labels[test_idx]).all()


def test_classifier_three_class_softmax_and_resnet152_preset():
    model = cnn.MapClassifier("resnet_tiny", num_classes=3)
    x = jnp.zeros((2, 32, 32, 6), jnp.uint8)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert variables["params"]["head"]["kernel"].shape == (16, 3)
    # ResNet152 layout: 3 + 8 + 36 + 3 bottleneck blocks (checked abstractly, no compute).
    shapes = jax.eval_shape(cnn.ResNet152().init, jax.random.key(0), jnp.zeros((1, 32, 32, 6)))
    blocks = [k for k in shapes["params"] if k.startswith("layer")]
    assert len(blocks) == 50


def test_uptake_inputs_and_the_small_network():
    stress = np.full((2, 8, 8), 0.5, np.float32)
    rest = np.zeros((2, 8, 8), np.float32)
    x = cnn.uptake_inputs(stress, rest, ["M", None], 8)
    assert x.shape == (2, 8, 8, 3) and x.dtype == np.uint8
    assert (x[..., 0] == 128).all() and (x[..., 1] == 0).all()  # 0.5 -> 127.5 -> 128
    assert (x[0, ..., 2] == 255).all() and (x[1, ..., 2] == 128).all()  # men 255, unknown 128
    net = cnn.MapClassifier("small")
    variables = net.init(jax.random.key(0), jnp.asarray(x), train=False)
    assert net.apply(variables, jnp.asarray(x), train=False).shape == (2, 1)
