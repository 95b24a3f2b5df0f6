"""The engine's variant options (off by default): packed outputs, the jitted call, and the
uint8 standardisation folded into the first convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tavr_jax.infer.engine import KeypointEngine, _fused_input_network
from tavr_jax.models.keypoint_net import normalize_images


@pytest.fixture(scope="module")
def base():
    return KeypointEngine.random_init("paper11", "resnet_tiny", 32, batch_size=2)


def _frames(n=2, size=32):
    return np.random.default_rng(1).integers(0, 256, (n, size, size), np.uint8)


def test_defaults_are_unchanged(base):
    assert (base.fused_input, base.packed_outputs, base.call) == (False, False, "aot")
    assert base.run_variables is base.variables
    assert isinstance(base.dispatch(_frames()), dict)


def test_packed_outputs_and_the_jitted_call_give_the_default_outputs(base):
    frames = _frames(3)  # one full chunk and one padded
    want = base(frames)
    packed = KeypointEngine(base.model, base.variables, base.meta, batch_size=2,
                            packed_outputs=True)  # fmt: skip
    got = packed(frames)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], want[k])
    jitted = KeypointEngine(base.model, base.variables, base.meta, batch_size=2, call="jit")
    for k, v in jitted(frames).items():
        np.testing.assert_allclose(v, want[k], rtol=1e-5, atol=1e-4)
    assert jitted.trace_count == 1 and packed.trace_count == 1
    with pytest.raises(ValueError, match="call must be"):
        KeypointEngine(base.model, base.variables, base.meta, call="eager")


def test_the_folded_first_convolution_equals_the_standardised_one_inside_the_frame(base):
    # conv(W', x) - mean' == conv(W, (x / 255 - m) / s) - mean away from the zero padding
    _, _, fused = _fused_input_network(base.model, base.variables)
    params = base.variables["params"]["backbone"]["conv1"]["kernel"]
    mean = base.variables["batch_stats"]["backbone"]["bn1"]["mean"]
    x = jnp.asarray(_frames(1), jnp.float32)[..., None]  # (1, 32, 32, 1) raw 0..255

    def conv(image, kernel):
        return jax.lax.conv_general_dilated(image, kernel, (2, 2), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip

    want = conv(normalize_images(x[..., 0]), params) - mean[None, None, None]
    got = conv(x, fused["backbone"]["params"]["conv1"]["kernel"])
    got = got - fused["backbone"]["batch_stats"]["bn1"]["mean"][None, None, None]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert np.abs(np.asarray(want)).max() > 1.0  # not vacuous


def test_fused_input_engine_runs_end_to_end_close_to_the_default(base):
    frames = _frames()
    want = base(frames)
    for dtype in ("float32", "bfloat16"):
        fused = KeypointEngine(base.model, base.variables, base.meta, batch_size=2,
                               dtype=dtype, fused_input=True)  # fmt: skip
        got = fused(frames)
        # only the first convolution's border band differs (its padding stands for black)
        assert np.abs(got["visibility"] - want["visibility"]).max() < 0.05
        assert np.abs(got["coords"] - want["coords"]).max() < 2.0  # pixels of a 32-px frame
        assert fused.trace_count == 1


def test_fused_input_needs_a_resnet():
    from tavr_jax.models import create_model
    from tavr_jax.schema import get_schema

    vgg = create_model(get_schema("paper11"), backbone="vgg16")
    variables = {
        "params": {"backbone": {"features_0": {}}, "head": {}},
        "batch_stats": {"backbone": {}},
    }  # a VGG's names: no conv1, no bn1
    with pytest.raises(ValueError, match="ResNet"):
        _fused_input_network(vgg, variables)
