"""Model FLOPs counted from the jaxpr, against hand counts and XLA's CPU cost analysis; the
CPU compile options shared by training, inference and the benchmarks; the kernel census."""

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_core import xla
from cardiac_core.xla import cost_analysis, model_flops
from tavr_jax.models import create_model
from tavr_jax.schema import get_schema

DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=1, padding="VALID", groups=1):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=DN, feature_group_count=groups
    )


def _xla_cpu_flops(fn, *args) -> float:
    return cost_analysis(jax.jit(fn).lower(*args).compile())["flops"]


def test_hand_counts():
    a, b = jnp.ones((3, 8, 16)), jnp.ones((3, 16, 4))
    assert model_flops(jnp.matmul, a, b) == 2 * 3 * 8 * 16 * 4  # batched product
    x, w = jnp.ones((2, 10, 12, 6)), jnp.ones((3, 3, 6, 5))
    assert model_flops(_conv, x, w) == 2 * (2 * 8 * 10 * 5) * 6 * 9  # VALID: 8x10 outputs
    assert model_flops(lambda x, w: _conv(x, w, 2, "SAME"), x, w) == 2 * (2 * 5 * 6 * 5) * 6 * 9
    wg = jnp.ones((3, 3, 2, 6))  # 3 groups of 2 input channels
    assert model_flops(lambda x, w: _conv(x, w, groups=3), x, wg) == 2 * (2 * 8 * 10 * 6) * 2 * 9


def test_control_flow_and_nesting():
    a = jnp.ones((4, 4))
    one = 2 * 4**3

    def scanned(a):
        return jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=5)[0]

    assert model_flops(scanned, a) == 5 * one
    assert model_flops(jax.jit(lambda a: jax.jit(jnp.matmul)(a, a) @ a), a) == 2 * one
    branches = (lambda a: a @ a @ a, lambda a: a)
    assert model_flops(lambda i, a: jax.lax.switch(i, branches, a), 0, a) == 2 * one  # the max


def test_gradient_of_a_strided_convolution_costs_three_forward_passes():
    """Backward = input gradient (a convolution over a dilated input, whose holes are not
    work) + weight gradient, each as costly as the forward one."""
    x, w = jnp.ones((2, 16, 16, 4)), jnp.ones((3, 3, 4, 8))

    def loss(x, w):
        return _conv(x, w, 2, "SAME").sum()

    forward = model_flops(loss, x, w)
    assert model_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * forward


def test_matches_xla_cpu_analysis():
    """VALID convolutions and products: exactly XLA's count of multiply-adds. A network with
    SAME padding: a little above XLA's, which leaves out the taps on the padding."""
    x, w = jnp.ones((2, 10, 12, 6)), jnp.ones((3, 3, 6, 5))
    m = jnp.ones((5, 7))
    fn = lambda x, w, m: _conv(x, w).reshape(-1, 5) @ m  # noqa: E731
    np.testing.assert_allclose(model_flops(fn, x, w, m), _xla_cpu_flops(fn, x, w, m), rtol=0.02)

    model = create_model(get_schema("paper11"), backbone="resnet_tiny", head="heatmap")
    images = jnp.ones((2, 64, 64, 1))
    variables = model.init(jax.random.key(0), images, train=False)
    net = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    ours, xla = model_flops(net, variables, images), _xla_cpu_flops(net, variables, images)
    assert xla <= ours <= 1.25 * xla, (ours, xla)


def test_compiler_options_on_this_xla_and_the_fallback(monkeypatch, caplog):
    assert xla.compiler_options("cpu") == xla.CPU_COMPILER_OPTIONS
    assert xla.compiler_options("gpu") is None
    # A step jitted with the options is counted like the plain function (it cannot be nested
    # in another trace, so model_flops traces it at the top level).
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    step = jax.jit(_conv, compiler_options=xla.compiler_options("cpu"))
    assert model_flops(step, x, w) == model_flops(_conv, x, w) == 2 * 2 * 6 * 6 * 4 * 27
    # An XLA that does not know an option: its defaults, with one warning naming it.
    xla.compiler_options.cache_clear()
    monkeypatch.setattr(xla, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    try:
        assert xla.compiler_options("cpu") is None
        assert "xla_cpu_no_such_option" in caplog.text
        lowered = jax.jit(lambda x: 2 * x).lower(jnp.ones(3))
        np.testing.assert_array_equal(xla.compile_lowered(lowered, "cpu")(jnp.ones(3)), 2.0)
    finally:
        xla.compiler_options.cache_clear()


class _Compiled:
    def __init__(self, text):
        self.text = text

    def as_text(self):
        return self.text


def test_kernel_census_counts_the_entry_computation_only():
    text = """HloModule m
%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(%p)
}

ENTRY %main (a: f32[4], w: f32[3,3,8,8]) -> (f32[4], f32[4]) {
  %a = f32[4]{0} parameter(0)
  %w = f32[3,3,8,8]{3,2,1,0} parameter(1)
  %c = f32[] constant(1)
  %conv = (f32[1,8,8,8]{3,2,1,0}, u8[0]{0}) custom-call(%w), custom_call_target="__cudnn$conv"
  %g = f32[1,8,8,8]{3,2,1,0} get-tuple-element(%conv), index=0
  %f1 = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused
  %f2 = f32[4]{0} fusion(%f1), kind=kLoop, calls=%fused
  %b = f32[2,2]{1,0} bitcast(%f2)
  ROOT %t = (f32[4]{0}, f32[4]{0}) tuple(%f1, %f2)
}
"""
    assert xla.kernel_census(_Compiled(text)) == {"custom-call": 1, "fusion": 2}
    # A real executable: two sorts cannot fuse; the inputs and the output tuple do not count.
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    exe = xla.compile_lowered(
        jax.jit(lambda a, b: (jnp.sort(a, 0), jnp.sort(b, 1))).lower(x, x), "cpu"
    )
    census = xla.kernel_census(exe)
    assert census["sort"] == 2 and not {"parameter", "tuple"} & set(census)


def test_primitive_equations_find_nested_convolutions_and_the_profile_times_them():
    """The XLA profile's equations: every convolution of the network, nested jits included;
    the profile times each shape once and counts the rest."""
    from experiments.benchmarks.xla_profile import profile_engine

    x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 2))
    nested = lambda x, w: jax.jit(lambda y: _conv(_conv(y, w, padding="SAME"), w))(x)  # noqa: E731
    found = xla.primitive_equations(nested, ("conv_general_dilated",), x, w)
    assert [e.invars[0].aval.shape for e in found] == [(1, 8, 8, 2), (1, 8, 8, 2)]
    p = profile_engine("resnet_tiny", 32, min_time_s=0.0, warmup=1, min_runs=2)
    # resnet_tiny: the stem, then two stages of one block (two 3x3 convolutions each, and a
    # strided 1x1 shortcut where the width changes): 6 convolutions in 5 shapes.
    assert (
        sum(r["count"] for r in p["convolutions"]) == 6 == p["top_level_operations"]["convolution"]
    )
    assert all(r["xla_ms"] > 0 and r["onnxruntime_ms"] > 0 for r in p["convolutions"])
    assert (
        p["whole_ms"] > 0 and p["max_pool_ms"] > 0 and p["layout_changes"].get("transpose", 0) == 0
    )
