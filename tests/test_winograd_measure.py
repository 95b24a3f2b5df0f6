"""The export's Winograd rule measured on this machine: per layer shape, on the runtime the file
is meant for, recorded in the file; the graph keeps the JAX engine's outputs."""

import datetime

import numpy as np
import pytest
from _workdirs import random_weights_workdir

from cardiac_core.timing import cpu_model
from tavr_jax.data.simulate import simulate_case
from tavr_jax.infer import backends, onnx_export, onnx_runtime, winograd_measure
from tavr_jax.infer.engine import KeypointEngine
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")
# resnet_tiny at 32 px: stage 1 (8 channels, 8x8) has two 3x3 stride-1 convolutions on whole
# 4x4 tiles, stage 2 (16 channels, 4x4) one; stages below 4x4 have no whole tile.
SHAPES = [(8, 8, [8, 8]), (16, 16, [4, 4])]
CONVS_PER_SHAPE = [2, 1]


def _engine(batch_size=2):
    return KeypointEngine.random_init(SCHEMA, "resnet_tiny", 32, seed=1, batch_size=batch_size)


def _frames(n, size, seed=0):
    case = simulate_case(np.random.default_rng(seed), SCHEMA, frames=n, size=size)
    return np.stack([image for image, *_ in case])


def _info(model) -> dict:
    return onnx_export.parse_metadata({p.key: p.value for p in model.metadata_props}, "m")


def _winograd_layers(model) -> int:
    return sum(n.op_type == "DepthToSpace" for n in model.graph.node)


class FakeTimer:
    """Winograd takes `ratios[i]` of the direct time on the i-th shape measured; counts calls."""

    def __init__(self, *ratios):
        self.ratios, self.calls = ratios, 0

    def __call__(self, fns):
        assert len(fns) == 2  # direct, Winograd
        ratio = self.ratios[min(self.calls, len(self.ratios) - 1)]
        self.calls += 1
        return [np.full(5, 0.01), np.full(5, 0.01 * ratio)]


@pytest.mark.parametrize(("ratios", "want"), [((0.5,), [True, True]), ((1.5,), [False, False]),
                                              ((0.5, 1.0), [True, False])])  # fmt: skip
def test_the_graph_follows_the_measurement(ratios, want):
    timer = FakeTimer(*ratios)
    rule = winograd_measure.MeasuredRule("onnxruntime", timer=timer)
    eng = _engine()
    model = onnx_export.engine_model(eng, frame_size=(32, 32), winograd=rule)
    assert timer.calls == len(SHAPES)  # one measurement per distinct layer shape
    n = sum(c for c, on in zip(CONVS_PER_SHAPE, want, strict=True) if on)
    info = _info(model)
    assert _winograd_layers(model) == info["winograd_convolutions"] == n
    today = datetime.date.today().isoformat()
    assert info["winograd_rule"] == (
        f"measured on {cpu_model()}, onnxruntime {onnx_runtime.version()}, {today}"
    )
    layers = info["winograd_layers"]
    assert [(r["c_in"], r["c_out"], r["hw"]) for r in layers] == SHAPES
    assert [r["winograd"] for r in layers] == want
    assert all(r["batch"] == 1 and r["layers"] == 2 and r["direct_ms"] == 5.0 for r in layers)
    # A second graph of the same network (another frame size) asks the record, not the clock.
    onnx_export.engine_model(eng, frame_size=(48, 40), winograd=rule)
    assert timer.calls == len(SHAPES)
    # The measured graph computes what the JAX engine does.
    frames = _frames(2, 32)
    outputs = onnx_runtime.make_session(model).run(None, {onnx_export.INPUT_NAME: frames})
    got = dict(zip(onnx_export.OUTPUT_NAMES, outputs, strict=True))
    want_out = eng(frames)
    for k in ("visibility", "group"):
        np.testing.assert_allclose(got[k], want_out[k], atol=1e-4, rtol=0, err_msg=k)
    np.testing.assert_allclose(got["coords"] / 32, want_out["coords"] / 32, atol=1e-4, rtol=0)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_measurement_times_both_graphs_on_the_runtime(runtime):
    if runtime == "openvino":
        pytest.importorskip(
            "openvino", reason="openvino is not installed (pip install -e '.[openvino]')"
        )
    quick = lambda fns: winograd_measure.interleaved(fns, min_time_s=0.01)  # noqa: E731
    rule = winograd_measure.MeasuredRule(runtime, batch=2, timer=quick)
    assert rule(8, 8, (8, 8)) == rule.layers[(8, 8, 8, 8)]["winograd"]
    assert rule(8, 16, (8, 8)) in (True, False)
    square, wide = rule.layers.values()
    assert (square["layers"], wide["layers"]) == (2, 1)  # a chain only where c_in == c_out
    for r in (square, wide):
        assert r["direct_ms"] > 0 and r["winograd_ms"] > 0
        assert r["winograd"] == (r["winograd_over_direct"] <= winograd_measure.MARGIN)
    assert f", {runtime} " in rule.metadata()["winograd_rule"]
    assert {r["batch"] for r in rule.metadata()["winograd_layers"]} == {2}
    with pytest.raises(ValueError, match="whole 4x4 tiles, not 6x6"):
        rule.measure(8, 8, 6, 6)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return random_weights_workdir(tmp_path_factory.mktemp("workdir"))


def test_the_export_records_its_rule(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(winograd_measure, "interleaved", FakeTimer(0.5))
    path = tmp_path / "m.onnx"
    record = backends.export_workdir(workdir, path, frame_size=(32, 32), winograd="measure")
    info = onnx_export.read_metadata(path)
    assert info["winograd_rule"].startswith(f"measured on {cpu_model()}, onnxruntime ")
    assert record["winograd_rule"] == info["winograd_rule"]
    assert record["winograd_convolutions"] == info["winograd_convolutions"] > 0
    assert record["backend"] == "onnxruntime" and len(info["winograd_layers"]) >= 1
    for name, want in (("fixed", "fixed"), ("off", "off")):
        backends.export_workdir(workdir, path, frame_size=(32, 32), winograd=name)
        assert onnx_export.read_metadata(path)["winograd_rule"] == want
    assert onnx_export.read_metadata(path)["winograd_convolutions"] == 0
    with pytest.raises(ValueError, match="unknown Winograd rule 'always'"):
        backends.export_workdir(workdir, path, winograd="always")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt' for an ONNX file"):
        backends.export_workdir(workdir, path, backend="tensorrt")
