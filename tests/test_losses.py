"""Golden values, masking, gradients and jit for the paper's losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tavr_jax.schema import get_schema
from tavr_jax.training import losses

SCHEMA = get_schema("paper11")
RNG = np.random.RandomState(0)
LOGITS = RNG.randn(4, 5).astype(np.float32) * 3
LABELS = (RNG.rand(4, 5) > 0.5).astype(np.float32)
PRED = RNG.randn(4, 5).astype(np.float32) * 15  # pixel errors on both sides of w = 10
TARGET = RNG.randn(4, 5).astype(np.float32) * 15
MASK = RNG.rand(4, 5) > 0.4


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_group_bce_golden():
    # -log(sigmoid(2)) = log(1 + e^-2) = 0.126928;  -log(1 - sigmoid(-1)) = log(1 + e^-1) = 0.313262
    # label 0.5 at logit 0: -(0.5 log 0.5 + 0.5 log 0.5) = log 2 = 0.693147
    got = losses.group_bce(jnp.array([2.0, -1.0, 0.0]), jnp.array([1.0, 0.0, 0.5]))
    np.testing.assert_allclose(got, [0.126928, 0.313262, 0.693147], rtol=1e-5)


def test_focal_golden():
    # logit 0 (p = 0.5): positive: 0.25 * 0.5^2 * ln 2 = 0.0433217;
    #                    negative: 0.75 * 0.5^2 * ln 2 = 0.1299651
    # logit 2, label 1: p = 0.8807971; 0.25 * (1 - p)^2 * (-ln p) = 0.25 * 0.01420934 * 0.1269280
    #                   = 0.000450891
    # logit 2, label 0: 0.75 * p^2 * (-ln(1 - p)) = 0.75 * 0.7758035 * 2.1269280 = 1.237559
    got = losses.sigmoid_focal_loss(
        jnp.array([0.0, 0.0, 2.0, 2.0]), jnp.array([1.0, 0.0, 1.0, 0.0])
    )
    np.testing.assert_allclose(got, [0.0433217, 0.1299651, 0.000450891, 1.237559], rtol=1e-5)
    # alpha 0.5, gamma 0 is half the binary cross-entropy.
    half_bce = losses.sigmoid_focal_loss(LOGITS, LABELS, alpha=0.5, gamma=0.0)
    np.testing.assert_allclose(half_bce, 0.5 * losses.group_bce(LOGITS, LABELS), rtol=1e-6)


def test_optax_based_losses_equal_the_paper_formulas_on_random_logits():
    z = RNG.randn(50, 7).astype(np.float32) * 4
    y = (RNG.rand(50, 7) > 0.4).astype(np.float32)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    np.testing.assert_allclose(losses.group_bce(z, y), bce, rtol=1e-5, atol=1e-6)
    for alpha, gamma in [(0.25, 2.0), (0.5, 1.0), (0.9, 0.5)]:
        fl = -alpha * y * (1 - p) ** gamma * np.log(p) - (1 - alpha) * (1 - y) * p**gamma * np.log(
            1 - p
        )
        got = losses.sigmoid_focal_loss(z, y, alpha=alpha, gamma=gamma)
        np.testing.assert_allclose(got, fl, rtol=1e-5, atol=1e-6)


def test_focal_is_stable_for_large_logits():
    got = losses.sigmoid_focal_loss(jnp.array([100.0, -100.0]), jnp.array([0.0, 1.0]))
    # Confidently wrong: p^2 -> 1 and -log(1 - p) -> 100, so 0.75 * 100 and 0.25 * 100.
    np.testing.assert_allclose(got, [75.0, 25.0], rtol=1e-5)


def test_wing_golden():
    # C = 10 - 10 ln(1 + 10/2) = 10 - 10 ln 6 = -7.917595
    # |d| = 1: 10 ln(1.5) = 4.054651;  |d| = 4: 10 ln 3 = 10.986123
    # |d| = 15 >= w: 15 - C = 22.917595;  |d| = 10 (boundary, linear branch): 10 - C = 17.917595
    pred = jnp.array([1.0, -4.0, 20.0, 10.0])
    target = jnp.array([0.0, 0.0, 5.0, 0.0])
    np.testing.assert_allclose(
        losses.wing_loss(pred, target), [4.054651, 10.986123, 22.917595, 17.917595], rtol=1e-5
    )
    # Both branches meet at |d| = w: 10 ln 6 = 10 - C.
    below = losses.wing_loss(jnp.array([10.0 - 1e-4]), jnp.array([0.0]))
    np.testing.assert_allclose(below, 10.0 * math.log(6.0), rtol=1e-5)


@pytest.mark.parametrize(
    "fn,args",
    [
        (losses.group_bce, (LOGITS, LABELS)),
        (losses.sigmoid_focal_loss, (LOGITS, LABELS)),
        (losses.wing_loss, (PRED, TARGET)),
    ],
)
def test_masked_equals_selected_subset(fn, args):
    masked = fn(*args, where=MASK)
    subset = fn(*(a[MASK] for a in args))
    np.testing.assert_allclose(np.asarray(masked)[MASK], subset, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(masked)[~MASK], 0.0)
    np.testing.assert_allclose(jnp.sum(masked), jnp.sum(subset), rtol=1e-5)


@pytest.mark.parametrize("fn", [losses.group_bce, losses.sigmoid_focal_loss, losses.wing_loss])
def test_gradients_finite_and_zero_when_all_masked(fn):
    # Invisible points carry arbitrary targets (NaN-free but huge): no gradient may leak.
    x = jnp.asarray(LOGITS) * 100
    y = jnp.asarray(TARGET) * 1e6 if fn is losses.wing_loss else jnp.asarray(LABELS)
    where = jnp.zeros(x.shape, bool)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, y, where=where))))(x)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad, 0.0)


def test_wing_gradient_finite_at_zero_error():
    grad = jax.grad(lambda p: jnp.sum(losses.wing_loss(p, jnp.zeros(3))))(jnp.zeros(3))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "fn,x,y",
    [
        (losses.group_bce, LOGITS[:2], LABELS[:2]),
        (losses.sigmoid_focal_loss, LOGITS[:2], LABELS[:2]),
        # Away from |d| = 0 and |d| = w, where the Wing loss has kinks.
        (losses.wing_loss, np.array([1.5, -3.0, 17.0, -25.0]), np.zeros(4)),
    ],
)
def test_check_grads(fn, x, y):
    x64 = np.asarray(x, np.float64)
    with jax.enable_x64(True):
        check_grads(lambda a: fn(a, jnp.asarray(y, jnp.float64)), (x64,), order=1, modes=["rev"])


@pytest.mark.parametrize(
    "fn,args",
    [
        (losses.group_bce, (LOGITS, LABELS)),
        (losses.sigmoid_focal_loss, (LOGITS, LABELS)),
        (losses.wing_loss, (PRED, TARGET)),
    ],
)
def test_jit_matches_eager(fn, args):
    eager = fn(*args, where=MASK)
    jitted = jax.jit(lambda *a, where: fn(*a, where=where))(*args, where=MASK)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def _batch_and_outputs(visibility):
    k, s = SCHEMA.num_points, 64
    rng = np.random.RandomState(1)
    b = visibility.shape[0]
    batch = {
        "visible": visibility.astype(np.float32),
        "coords": (rng.rand(b, k, 2) * s * visibility[..., None]).astype(np.float32),
    }
    outputs = {
        "group_logits": jnp.asarray(rng.randn(b, SCHEMA.num_groups), jnp.float32),
        "visibility_logits": jnp.asarray(rng.randn(b, k), jnp.float32),
        "coords": jnp.asarray(rng.rand(b, k, 2), jnp.float32),
    }
    return batch, outputs


def test_total_loss_against_numpy():
    s = 64
    vis = np.zeros((2, SCHEMA.num_points), bool)
    vis[0, [0, 2, 5]] = True  # anatomical (AA1, STJ1) and instrumental (CM) present
    vis[1, [8, 10]] = True  # contour only
    batch, out = _batch_and_outputs(vis)
    weighted = {**losses.PAPER_LOSS, "weights": {"group": 0.5, "visibility": 2.0, "coords": 3.0}}
    total, parts = jax.jit(
        lambda o, b: losses.total_loss(o, b, SCHEMA, image_size=s, config=weighted)
    )(out, batch)

    # Independent numpy reference of the paper's definitions.
    presence = np.array([[1, 1, 0], [0, 0, 1]], np.float64)
    zg = np.asarray(out["group_logits"], np.float64)
    pg = 1 / (1 + np.exp(-zg))
    l_group = np.mean(-(presence * np.log(pg) + (1 - presence) * np.log(1 - pg)))
    zk = np.asarray(out["visibility_logits"], np.float64)
    p = 1 / (1 + np.exp(-zk))
    y = vis.astype(np.float64)
    fl = -0.25 * y * (1 - p) ** 2 * np.log(p) - 0.75 * (1 - y) * p**2 * np.log(1 - p)
    l_kp = fl.mean()  # over all B * K points
    d = np.abs(np.asarray(out["coords"], np.float64) * s - batch["coords"])[vis]  # (5, 2)
    c = 10 - 10 * np.log(6)
    wing = np.where(d < 10, 10 * np.log(1 + d / 2), d - c)
    l_reg = wing.sum() / (2 * 5)  # 5 visible points, x and y each
    np.testing.assert_allclose(parts["group"], l_group, rtol=1e-5)
    np.testing.assert_allclose(parts["keypoint"], l_kp, rtol=1e-5)
    np.testing.assert_allclose(parts["reg"], l_reg, rtol=1e-5)
    np.testing.assert_allclose(total, 0.5 * l_group + 2 * l_kp + 3 * l_reg, rtol=1e-5)
    np.testing.assert_allclose(parts["total"], total)

    # Ungrouped: no group term; non-square (height, width) scales x by width and y by height.
    total_ug, parts_ug = losses.total_loss(out, batch, SCHEMA, image_size=s, grouped=False)
    assert float(parts_ug["group"]) == 0.0
    np.testing.assert_allclose(total_ug, l_kp + l_reg, rtol=1e-5)
    _, parts_rect = losses.total_loss(out, batch, SCHEMA, image_size=(s, 2 * s))
    scaled = np.asarray(out["coords"], np.float64) * [2 * s, s]
    d = np.abs(scaled - batch["coords"])[vis]
    wing = np.where(d < 10, 10 * np.log(1 + d / 2), d - c)
    np.testing.assert_allclose(parts_rect["reg"], wing.sum() / 10, rtol=1e-5)


def test_total_loss_all_invisible_is_finite_with_zero_regression():
    batch, out = _batch_and_outputs(np.zeros((3, SCHEMA.num_points), bool))
    batch["coords"] = np.full_like(batch["coords"], 1e6)  # garbage where invisible

    def loss(o):
        return losses.total_loss(o, batch, SCHEMA, image_size=64)

    (total, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(out)
    assert np.isfinite(total)
    assert float(parts["reg"]) == 0.0
    np.testing.assert_array_equal(grads["coords"], 0.0)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_bce_visibility_loss_against_numpy():
    vis = np.zeros((2, SCHEMA.num_points), bool)
    vis[0, [0, 1]] = True
    batch, out = _batch_and_outputs(vis)
    config = {**losses.PAPER_LOSS, "visibility_loss": "bce"}
    _, parts = losses.total_loss(out, batch, SCHEMA, image_size=64, config=config)
    z = np.asarray(out["visibility_logits"], np.float64)
    p = 1 / (1 + np.exp(-z))
    y = vis.astype(np.float64)
    np.testing.assert_allclose(
        parts["keypoint"], np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))), rtol=1e-5
    )
    with pytest.raises(ValueError, match="unknown visibility_loss 'hinge'"):
        losses.total_loss(
            out, batch, SCHEMA, image_size=64, config={**config, "visibility_loss": "hinge"}
        )


def test_total_loss_adds_the_heatmap_term_when_the_head_has_heatmaps():
    vis = np.zeros((2, SCHEMA.num_points), bool)
    vis[0, [0, 2, 5]] = True
    vis[1, [8]] = True
    batch, out = _batch_and_outputs(vis)
    heatmaps = jnp.asarray(
        np.random.RandomState(4).randn(2, 16, 16, SCHEMA.num_points), jnp.float32
    )
    config = {**losses.PAPER_LOSS, "weights": {**losses.PAPER_LOSS["weights"], "heatmap": 0.5}}
    base, parts = losses.total_loss(out, batch, SCHEMA, image_size=64, config=config)
    assert "heatmap" not in parts
    total, parts_hm = losses.total_loss(
        {**out, "heatmap_logits": heatmaps}, batch, SCHEMA, image_size=64, config=config
    )
    per_point = losses.heatmap_loss(heatmaps, batch["coords"], image_size=(64, 64), sigma=4.0,
                                    where=vis)  # fmt: skip
    np.testing.assert_allclose(parts_hm["heatmap"], np.asarray(per_point)[vis].mean(), rtol=1e-5)
    np.testing.assert_allclose(total, base + 0.5 * parts_hm["heatmap"], rtol=1e-5)
    # Older configs without the new keys get the defaults.
    old = {
        k: v
        for k, v in losses.PAPER_LOSS.items()
        if k not in ("heatmap_sigma_px", "visibility_loss")
    }
    old["weights"] = {"group": 1.0, "visibility": 1.0, "coords": 1.0}
    t_old, _ = losses.total_loss(
        {**out, "heatmap_logits": heatmaps}, batch, SCHEMA, image_size=64, config=old
    )
    t_new, _ = losses.total_loss({**out, "heatmap_logits": heatmaps}, batch, SCHEMA, image_size=64)
    np.testing.assert_allclose(t_old, t_new, rtol=1e-6)
