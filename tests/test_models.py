"""Shapes, dtypes and independent numpy references for the keypoint networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tavr_jax.models import BACKBONES, create_model, get_backbone, heads
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")  # K = 11 points in G = 3 groups of 4, 4, 3 (M = 4)
B, S = 2, 64

# (output stride, output channels) of each backbone.
EXPECTED = {
    "resnet_tiny": (8, 16),
    "resnet18": (32, 512),
    "resnet18_half": (32, 256),
    "resnet34": (32, 512),
    "resnet50": (32, 2048),
    "vgg16": (32, 512),
    "vgg16_bn": (32, 512),
    "efficientnet_b0": (32, 1280),
    "efficientnet_b7": (32, 2560),
}


def _images(seed=0, shape=(B, S, S)):
    return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("channels", [1, 3])
def test_backbone_shapes(name, channels):
    # eval_shape traces without computing, so even EfficientNet-B7 stays fast.
    net = get_backbone(name)
    x = jnp.zeros((B, S, S, channels))
    out, variables = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x))
    stride, width = EXPECTED[name]
    assert out.shape == (B, S // stride, S // stride, width)
    assert out.dtype == jnp.float32
    # The stem's input channels come from the data (grayscale here, RGB for perfusion maps).
    stem = variables["params"]
    stem = stem.get("conv1") or stem.get("features_0") or stem.get("stem_conv")
    assert stem["kernel"].shape[2] == channels


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_stages(name):
    # Strides 4, 8, 16, 32 (fine to coarse; the tiny test net stops at 8); the last stage is
    # the default output, so the heads that pool it see the same features either way.
    x = jnp.zeros((1, S, S, 1))
    net = get_backbone(name)
    staged = get_backbone(name, return_stages=True)
    last, variables = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x))
    stages, staged_vars = jax.eval_shape(lambda: staged.init_with_output(jax.random.key(0), x))
    strides = [S // s.shape[1] for s in stages]
    assert strides == ([4, 8] if name == "resnet_tiny" else [4, 8, 16, 32])
    assert stages[-1].shape == last.shape
    # The same parameters: a checkpoint of one loads into the other.
    assert jax.tree.map(lambda a: a.shape, staged_vars) == jax.tree.map(
        lambda a: a.shape, variables
    )


def test_backbone_stages_end_with_the_default_output():
    net = get_backbone("resnet_tiny")
    x = jnp.asarray(_images()[..., None], jnp.float32)
    variables = net.init(jax.random.key(0), x)
    stages = get_backbone("resnet_tiny", return_stages=True).apply(variables, x)
    np.testing.assert_array_equal(stages[-1], net.apply(variables, x))


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown backbone 'resnet99'"):
        get_backbone("resnet99")
    with pytest.raises(ValueError, match="unknown head"):
        create_model(SCHEMA, backbone="resnet_tiny", head="heatmapz")


@pytest.mark.parametrize(
    "backbone,head",
    [
        ("resnet_tiny", "regression"),
        ("resnet_tiny", "integral"),
        ("resnet_tiny", "heatmap"),
        ("resnet18", "regression"),
    ],
)
def test_forward_outputs(backbone, head):
    model = create_model(SCHEMA, backbone=backbone, head=head)
    images = _images()
    variables = model.init(jax.random.key(0), images)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"backbone", "head"}
    # Eager apply: compiling every variant would dominate the test time on a small CPU.
    out = model.apply(variables, images)
    extra = {"heatmap_logits"} if head == "heatmap" else set()
    assert set(out) == {"group_logits", "visibility_logits", "coords"} | extra
    assert out["group_logits"].shape == (B, SCHEMA.num_groups)
    assert out["visibility_logits"].shape == (B, SCHEMA.num_points)
    assert out["coords"].shape == (B, SCHEMA.num_points, 2)
    for v in out.values():
        assert v.dtype == jnp.float32
        assert np.all(np.isfinite(v))
    assert np.all((out["coords"] >= 0) & (out["coords"] <= 1))
    # uint8 (B, H, W) and float (B, H, W, 1) inputs are the same frames.
    out_f = model.apply(variables, images[..., None].astype(np.float32))
    np.testing.assert_allclose(out_f["coords"], out["coords"], rtol=1e-5, atol=1e-6)


def test_train_mode_updates_batch_stats_and_uses_dropout():
    model = create_model(SCHEMA, backbone="resnet_tiny")
    images = _images()
    variables = model.init(jax.random.key(0), images)

    def run(key):
        return model.apply(
            variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )

    (out1, upd), (out2, _) = run(jax.random.key(1)), run(jax.random.key(2))
    before = variables["batch_stats"]["backbone"]["bn1"]["mean"]
    assert not np.allclose(upd["batch_stats"]["backbone"]["bn1"]["mean"], before)
    assert not np.allclose(out1["visibility_logits"], out2["visibility_logits"])


def _layer_norm(x, scale, bias, eps=1e-5):
    scale, bias = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _dense(x, p):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def test_grouped_head_equals_per_group_loop():
    """The vmapped head equals a plain loop over groups with the same stacked parameters."""
    head = heads.RegressionHead(SCHEMA)
    features = np.random.RandomState(0).randn(B, 3, 3, 32).astype(np.float32)
    params = head.init(jax.random.key(0), features)["params"]
    out = head.apply({"params": params}, features)

    # Independent float64 numpy reference, one group at a time.
    h = features.astype(np.float64).mean(axis=(1, 2))
    h = _dense(h, params["shared"]["dense"])
    h = np.maximum(
        _layer_norm(h, params["shared"]["norm"]["scale"], params["shared"]["norm"]["bias"]), 0
    )
    stacked = params["points"]["group_heads"]
    per_point = []
    for g, n in enumerate(SCHEMA.group_sizes):
        p_g = jax.tree_util.tree_map(lambda a, g=g: a[g], stacked)
        z = _dense(np.maximum(_dense(h, p_g["hidden"]), 0), p_g["out"])  # (B, 3 M)
        per_point.append(z.reshape(B, SCHEMA.max_group_size, 3)[:, :n])  # drop padded slots
    z = np.concatenate(per_point, axis=1)  # (B, K, 3) in schema point order
    np.testing.assert_allclose(out["visibility_logits"], z[..., 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["coords"], 1 / (1 + np.exp(-z[..., 1:])), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        out["group_logits"], _dense(h, params["group_classifier"]), rtol=1e-4, atol=1e-5
    )
    # Parameters are stacked on a leading group axis, not one module per group.
    assert stacked["hidden"]["kernel"].shape == (SCHEMA.num_groups, 512, 256)
    assert stacked["out"]["kernel"].shape == (SCHEMA.num_groups, 256, 3 * SCHEMA.max_group_size)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_head_parameter_count():
    head = heads.RegressionHead(SCHEMA)
    c = 512  # ResNet18/34 feature width
    params = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 2, 2, c)))["params"]
    g, m = SCHEMA.num_groups, SCHEMA.max_group_size
    shared = (c * 512 + 512) + 2 * 512  # Linear(C, 512) + LayerNorm scale and bias
    classifier = 512 * g + g  # Linear(512, G)
    # Each group: Linear(512, 256) + Linear(256, 3 M). Groups are padded to M = 4 points, so
    # the 3-point contour group carries 3 * 257 parameters for its unused slot; the paper's
    # unpadded heads would have 3 * 257 fewer.
    group_heads = g * ((512 * 256 + 256) + (256 * 3 * m + 3 * m))
    assert shared + classifier + group_heads == 668_455
    assert _count(params) == shared + classifier + group_heads


def test_ungrouped_head():
    model = create_model(SCHEMA, backbone="resnet_tiny", grouped=False)
    images = _images(1)
    variables = model.init(jax.random.key(0), images)
    assert "group_classifier" not in variables["params"]["head"]
    assert variables["params"]["head"]["points"]["point_head"]["out"]["kernel"].shape == (
        256,
        3 * SCHEMA.num_points,
    )
    out = model.apply(variables, images)
    assert out["group_logits"].shape == (B, SCHEMA.num_groups)
    assert out["coords"].shape == (B, SCHEMA.num_points, 2)
    vis = np.asarray(out["visibility_logits"])
    expected = np.stack(
        [vis[:, SCHEMA.point_group == g].max(axis=1) for g in range(SCHEMA.num_groups)], axis=1
    )
    np.testing.assert_array_equal(out["group_logits"], expected)


def test_soft_argmax_single_peak():
    h, w, k = 8, 10, 3
    peaks = [(3, 5), (0, 0), (7, 9)]  # (row, col) per point
    maps = np.full((1, h, w, k), -1e4, np.float32)
    for i, (r, c) in enumerate(peaks):
        maps[0, r, c, i] = 1e4
    xy = np.asarray(jax.jit(heads.soft_argmax)(maps))[0]
    # Pixel-centre convention: cell (r, c) is at ((c + 0.5) / w, (r + 0.5) / h).
    expected = np.array([[(c + 0.5) / w, (r + 0.5) / h] for r, c in peaks])
    np.testing.assert_allclose(xy, expected, atol=1e-6)
    # A flat heatmap averages to the centre of the image.
    np.testing.assert_allclose(heads.soft_argmax(np.zeros((1, h, w, 1))), [[[0.5, 0.5]]], atol=1e-6)


def test_integral_head_layout():
    model = create_model(SCHEMA, backbone="resnet_tiny", head="integral")
    params = jax.eval_shape(model.init, jax.random.key(0), _images())["params"]["head"]
    assert params["heatmap_out"]["kernel"].shape[-1] == SCHEMA.num_points
    # Visibility only from the pooled branch: one number per (padded) point per group.
    assert params["points"]["group_heads"]["out"]["kernel"].shape == (3, 256, 4)
    assert params["group_classifier"]["kernel"].shape == (512, SCHEMA.num_groups)


def test_bf16_compute_float32_params_and_outputs():
    model = create_model(SCHEMA, backbone="resnet_tiny", dtype=jnp.bfloat16)
    images = _images(2)
    variables = model.init(jax.random.key(0), images)
    assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(model.apply)(variables, images)
    assert {v.dtype for v in out.values()} == {jnp.dtype(jnp.float32)}
    ref = create_model(SCHEMA, backbone="resnet_tiny").apply(variables, images)
    # Same parameters, lower-precision arithmetic: close, not equal.
    np.testing.assert_allclose(out["coords"], ref["coords"], atol=0.05)
    assert not np.array_equal(out["coords"], ref["coords"])
