"""Weight import checked against a forward pass of the same architecture in plain torch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tavr_jax.models import convert, create_model, get_backbone
from tavr_jax.schema import get_schema

S = 64


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip(
        "torch", reason="torch is not installed: the converter's numerical reference needs it"
    )


def _torch_model(name, seed, **kw):
    import torch

    from experiments.benchmarks import torch_reference

    torch.manual_seed(seed)
    model = torch_reference.TORCH_MODELS[name](**kw).eval()
    # Non-trivial batch-norm statistics, so a swapped scale/var or mean/bias cannot pass.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _variables(module, x):
    """Random variables of the right structure via eval_shape (no costly random init)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.RandomState(0)
    return jax.tree_util.tree_map(lambda s: rng.rand(*s.shape).astype(s.dtype), shapes)


def _backbone_variables(name, channels):
    return _variables(get_backbone(name), jnp.zeros((1, S, S, channels)))


def _save(state_dict, path, fmt):
    import torch

    if fmt == "npz":
        np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})
    else:
        torch.save(state_dict, path)
    return path


@pytest.mark.parametrize(
    "name,channels,fmt,kw",
    [
        ("resnet18", 1, "npz", {}),
        ("resnet18", 3, "pth", {}),
        ("resnet50", 1, "npz", {}),
        ("vgg16", 1, "pth", {"classifier": False}),
        ("vgg16", 3, "npz", {"classifier": False}),
    ],
)
def test_feature_map_matches_torch(torch, tmp_path, name, channels, fmt, kw):
    tmodel = _torch_model(name, seed=channels, **kw)
    path = _save(tmodel.state_dict(), tmp_path / f"w.{fmt}", fmt)
    variables = convert.load_backbone_weights(_backbone_variables(name, channels), path, prefix="")

    x = np.random.RandomState(0).randn(2, S, S, channels).astype(np.float32)
    ours = np.asarray(get_backbone(name).apply(variables, x))
    # A grayscale frame is an RGB frame with R = G = B, so the 3-channel torch network on the
    # repeated image is the reference for our 1-channel stem with summed filters.
    x_rgb = np.repeat(x, 3, axis=-1) if channels == 1 else x
    with torch.no_grad():
        ref = tmodel.forward_features(torch.from_numpy(x_rgb).permute(0, 3, 1, 2))
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours / scale, ref / scale, atol=1e-4)
    assert np.abs(ref).max() > 1e-3  # not trivially zero


def test_keypoint_model_gets_backbone_and_keeps_head(torch, tmp_path):
    schema = get_schema("paper11")
    model = create_model(schema, backbone="resnet_tiny")
    images = np.zeros((1, S, S), np.uint8)
    variables = _variables(model, images)
    tmodel = _torch_model("resnet_tiny", seed=0)
    path = _save(tmodel.state_dict(), tmp_path / "tiny.npz", "npz")
    new = convert.load_backbone_weights(variables, path)

    jax.tree_util.tree_map(
        np.testing.assert_array_equal, new["params"]["head"], variables["params"]["head"]
    )
    np.testing.assert_allclose(
        new["params"]["backbone"]["conv1"]["kernel"],
        tmodel.conv1.weight.detach().numpy().transpose(2, 3, 1, 0).sum(2, keepdims=True),
    )
    np.testing.assert_allclose(
        new["batch_stats"]["backbone"]["layer2_0"]["downsample_1"]["var"],
        tmodel.layer2[0].downsample[1].running_var.numpy(),
    )
    out = model.apply(new, images)
    assert out["coords"].shape == (1, schema.num_points, 2)


def _to_torchvision_npz(variables, path):
    """Our variables written back as a torchvision-style state dict (the inverse mapping)."""
    sd = {}
    for c in ("params", "batch_stats"):
        for keys, v in traverse_util.flatten_dict(variables[c]).items():
            module = ".".join(re.sub(r"_(\d+)$", r".\1", k) for k in keys[:-1])
            leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean"}.get(keys[-1])
            leaf = leaf or {"var": "running_var"}.get(keys[-1], keys[-1])
            sd[f"{module}.{leaf}"] = np.transpose(v, (3, 2, 0, 1)) if v.ndim == 4 else v
    sd["fc.weight"] = np.zeros((1000, 16), np.float32)  # classifiers are dropped
    np.savez(path, **sd)
    return path


def test_npz_round_trip_without_torch(tmp_path):
    variables = _backbone_variables("resnet_tiny", 3)
    path = _to_torchvision_npz(variables, tmp_path / "tiny.npz")
    assert "layer2.0.downsample.1.running_var" in np.load(path).files
    zeros = jax.tree_util.tree_map(np.zeros_like, variables)
    back = convert.load_backbone_weights(zeros, path, prefix="")
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)


def test_bad_files_give_clear_errors(tmp_path):
    target = _backbone_variables("resnet_tiny", 1)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        convert.load_backbone_weights(target, tmp_path / "missing.npz", prefix="")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported weights format '.h5'"):
        convert.load_backbone_weights(target, tmp_path / "w.h5", prefix="")
    # A 3-channel model cannot take weights of a different architecture.
    path = _to_torchvision_npz(_backbone_variables("resnet_tiny", 3), tmp_path / "t.npz")
    with pytest.raises(
        ValueError, match=r"t\.npz: state dict has no weights for params/features_0"
    ):
        convert.load_backbone_weights(_backbone_variables("vgg16", 3), path, prefix="")


def test_wrong_resnet_gives_clear_error(torch, tmp_path):
    target = _backbone_variables("resnet_tiny", 1)
    # ResNet18 weights do not fit the tiny preset: the error names the file and the shapes.
    path = _save(_torch_model("resnet18", seed=0).state_dict(), tmp_path / "r18.npz", "npz")
    with pytest.raises(ValueError, match=r"r18\.npz: .*model expects"):
        convert.load_backbone_weights(target, path, prefix="")
