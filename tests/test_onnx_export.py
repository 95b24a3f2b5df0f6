"""ONNX export: the graph on onnxruntime against the JAX engine, metadata, refusals, backends."""

import hashlib
import json

import jax
import numpy as np
import onnx
import pytest
from _workdirs import random_weights_workdir

from cardiac_core.fileio import write_json_atomic
from tavr_jax.data.simulate import simulate_case
from tavr_jax.infer import backends, onnx_export, onnx_runtime, winograd
from tavr_jax.infer.engine import KeypointEngine
from tavr_jax.models import create_model
from tavr_jax.run.workdir import config_hash
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")
SIZE = 32  # network input


def _perturbed(variables, seed=0):
    """Batch statistics and norm parameters far from their initial values, so that folding
    each batch norm into its convolution is really exercised (init: mean 0, var 1, scale 1)."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        a = np.asarray(a)
        leaf = path[-1].key
        if leaf == "mean":
            return a + rng.normal(0, 0.3, a.shape).astype(a.dtype)
        if leaf in ("var", "scale"):
            return a * rng.uniform(0.5, 2.0, a.shape).astype(a.dtype)
        if leaf == "bias":
            return a + rng.normal(0, 0.2, a.shape).astype(a.dtype)
        return a

    return jax.tree_util.tree_map_with_path(draw, jax.device_get(variables))


def _engine(backbone="resnet_tiny", head="regression", grouped=True, batch_size=3,
            dense_visibility=False, **meta):  # fmt: skip
    base = KeypointEngine.random_init(SCHEMA, backbone, SIZE, head=head, grouped=grouped, seed=1,
                                      dense_visibility=dense_visibility)  # fmt: skip
    return KeypointEngine(base.model, _perturbed(base.variables), {**base.meta, **meta},
                          batch_size=batch_size)  # fmt: skip


def _simulated_frames(n, size, seed=0):
    case = simulate_case(np.random.default_rng(seed), SCHEMA, frames=n, size=size)
    return np.stack([image for image, *_ in case])


def _assert_close(got, want, frame_hw):
    for k in ("visibility", "group"):
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0, err_msg=k)
    # Coordinates are frame pixels: 1e-4 of the frame size.
    h, w = frame_hw
    scale = np.array([w, h], np.float32)
    np.testing.assert_allclose(got["coords"] / scale, want["coords"] / scale, atol=1e-4, rtol=0)


@pytest.mark.parametrize("head", ["regression", "integral", "heatmap"])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("frame_hw", [(SIZE, SIZE), (56, 48)])
def test_onnxruntime_matches_jax_engine(head, grouped, frame_hw):
    eng = _engine(head=head, grouped=grouped)
    frames = _simulated_frames(4, max(frame_hw))[:, : frame_hw[0], : frame_hw[1]]
    want = eng(frames)
    got = onnx_runtime.OnnxKeypointEngine.from_engine(eng)(frames)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    _assert_close(got, want, frame_hw)
    # The outputs vary with the frame: a constant graph could not pass.
    assert np.ptp(want["coords"][:, :, 0], axis=0).max() > 0.01


@pytest.mark.parametrize("head", ["integral", "heatmap"])
def test_onnxruntime_matches_jax_engine_with_dense_visibility(head, tmp_path):
    eng = _engine(head=head, grouped=False, dense_visibility=True)
    frames = _simulated_frames(4, SIZE)
    want = eng(frames)
    plain = KeypointEngine(
        create_model(SCHEMA, backbone="resnet_tiny", head=head, grouped=False),
        eng.variables, {**eng.meta, "dense_visibility": False}, batch_size=3,
    )  # fmt: skip
    # The evidence changes the visibility (the test would pass on a graph without it otherwise).
    assert np.abs(plain(frames)["visibility"] - want["visibility"]).max() > 1e-3
    model = onnx_export.engine_model(eng, frame_size=(SIZE, SIZE), batch=3)
    path = onnx_export.save_model(model, tmp_path / "m.onnx")
    assert onnx_export.read_metadata(path)["dense_visibility"] is True
    _assert_close(onnx_runtime.OnnxKeypointEngine.from_engine(eng)(frames), want, (SIZE, SIZE))


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16_bn"])
def test_other_backbone_families(backbone):
    """Bottleneck blocks (stride on the 3x3) and VGG (conv bias, then batch norm)."""
    eng = _engine(backbone=backbone, batch_size=2)
    frames = _simulated_frames(2, 40)
    _assert_close(onnx_runtime.OnnxKeypointEngine.from_engine(eng)(frames), eng(frames), (40, 40))


def _direct_conv(x, kernel, bias):
    """Reference: a 3x3 SAME cross-correlation of (N, C, H, W) by an OIHW kernel, in float64."""
    h, w = x.shape[2:]
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = sum(np.einsum("nchw,kc->nkhw", padded[:, :, dy : dy + h, dx : dx + w],
                        kernel[:, :, dy, dx]) for dy in range(3) for dx in range(3))  # fmt: skip
    return out + bias[None, :, None, None]


def test_winograd_transforms_compute_one_tile():
    """A^T [(G g G^T) * (B^T d B)] A is the 3x3 correlation of a 6x6 tile: its 4x4 outputs."""
    rng = np.random.default_rng(0)
    d, g = rng.normal(size=(6, 6)), rng.normal(size=(3, 3))
    want = np.array([[np.sum(d[y : y + 3, x : x + 3] * g) for x in range(4)] for y in range(4)])
    u = winograd.G @ g @ winograd.G.T
    v = winograd.BT @ d @ winograd.BT.T
    np.testing.assert_allclose(winograd.AT @ (u * v) @ winograd.AT.T, want, atol=1e-12)
    # The constants the graph uses: the input transform as 36 filters, the output as a matrix.
    v_filters = winograd.input_filters()[:, 0]
    np.testing.assert_allclose(np.einsum("tyx,yx->t", v_filters, d), v.ravel(), atol=1e-12)
    np.testing.assert_allclose(winograd.output_matrix() @ (u * v).ravel(), want.ravel(),
                               atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("batch", [1, 3])
def test_winograd_convolution_is_the_direct_convolution(batch):
    rng = np.random.default_rng(batch)
    c_in, c_out, hw = 5, 7, (8, 12)  # 2 x 3 tiles, more outputs than inputs
    kernel, bias = rng.normal(size=(c_out, c_in, 3, 3)), rng.normal(size=c_out)
    x = rng.normal(size=(batch, c_in, *hw)).astype(np.float32)
    g = onnx_export.Graph()
    y = g.winograd_conv("x", kernel, bias, hw)
    tensor = onnx.helper.make_tensor_value_info
    model = g.model("winograd", [tensor("x", onnx.TensorProto.FLOAT, ["n", c_in, *hw])],
                    [tensor(y, onnx.TensorProto.FLOAT, None)])  # fmt: skip
    got = onnx_runtime.make_session(model).run(None, {"x": x})[0]
    want = _direct_conv(x, kernel, bias)
    assert got.shape == want.shape == (batch, c_out, *hw)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # No 3x3 convolution left: a 6x6 input transform, a 1x1 product, the output transform.
    kernels = [a.ints for n in g.nodes if n.op_type == "Conv" for a in n.attribute
               if a.name == "kernel_shape"]  # fmt: skip
    assert sorted(map(list, kernels)) == [[1, 1], [6, 6]]
    assert g.winograd_convolutions == 1


def test_winograd_only_where_it_pays():
    """ResNet34 at 512 px: stages 2-4 (128-512 channels, 64-16 px); never the 64-channel stage,
    small maps, or sizes that are not whole 4x4 tiles."""
    pays = winograd.pays
    assert pays(128, 128, (64, 64)) and pays(256, 256, (32, 32)) and pays(512, 512, (16, 16))
    assert not pays(64, 64, (128, 128))  # 1.5x slower: the transforms outweigh the product
    assert not pays(512, 512, (8, 8)) and not pays(256, 256, (16, 16))
    assert not pays(256, 256, (36, 30))


@pytest.mark.parametrize("backbone", ["resnet_tiny", "vgg16_bn"])
def test_engine_with_winograd_convolutions_matches_jax(backbone, monkeypatch):
    """Every 3x3 stride-1 convolution on whole tiles as Winograd (the thresholds lowered so
    that the tiny networks have some): the same outputs as the JAX engine; int8 refuses it."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_MACS", 0)
    eng = _engine(backbone=backbone, batch_size=2)
    frames = _simulated_frames(2, 40)
    model = onnx_export.engine_model(eng, frame_size=(40, 40))
    direct = onnx_export.engine_model(eng, frame_size=(40, 40), winograd=False)

    def counted(m):
        info = onnx_export.parse_metadata({p.key: p.value for p in m.metadata_props}, "m")
        depth_to_space = sum(n.op_type == "DepthToSpace" for n in m.graph.node)
        assert info["winograd_convolutions"] == depth_to_space
        return depth_to_space

    assert counted(model) >= 3 and counted(direct) == 0
    # The file keeps the 3x3 kernels (onnxruntime transforms them when it loads the graph).
    assert model.ByteSize() < 1.1 * direct.ByteSize()
    outputs = onnx_runtime.make_session(model).run(None, {onnx_export.INPUT_NAME: frames})
    got = dict(zip(onnx_export.OUTPUT_NAMES, outputs, strict=True))
    _assert_close(got, eng(frames), (40, 40))
    with pytest.raises(ValueError, match="Winograd convolutions cannot be quantised"):
        onnx_runtime.quantize_int8(model, frames)


def test_resize_matrix_is_jax_resize():
    image = np.random.default_rng(0).uniform(0, 255, (2, 57, 45)).astype(np.float32)
    want = jax.image.resize(image, (2, 32, 32), "linear", antialias=True)
    rows, cols = onnx_export.resize_matrix(57, 32), onnx_export.resize_matrix(45, 32)
    got = rows @ image @ cols.T
    np.testing.assert_allclose(got, want, atol=1e-3)
    np.testing.assert_allclose(rows.sum(1), 1.0, atol=1e-6)  # a weighted average per pixel


def test_config_hash_is_canonical_json():
    config = {"backbone": "resnet34", "image_size": 512, "schema": "paper11"}
    text = '{"backbone":"resnet34","image_size":512,"schema":"paper11"}'
    assert config_hash(config) == hashlib.sha256(text.encode()).hexdigest()
    assert config_hash(dict(reversed(config.items()))) == config_hash(config)
    assert config_hash({**config, "image_size": 256}) != config_hash(config)


def test_unsupported_networks_are_named():
    with pytest.raises(ValueError, match="head 'simcc' has no ONNX export"):
        onnx_export.check_supported({"head": "simcc", "backbone": "resnet34"})
    with pytest.raises(ValueError, match="backbone 'efficientnet_b0' has no ONNX export"):
        onnx_export.check_supported({"head": "regression", "backbone": "efficientnet_b0"})
    eng = _engine(batch_size=1)
    eng.meta["head"] = "simcc"
    with pytest.raises(ValueError, match="'simcc'"):
        onnx_runtime.OnnxKeypointEngine.from_engine(eng)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir: config.json, a checkpoint of random weights, tuned thresholds."""
    return random_weights_workdir(
        tmp_path_factory.mktemp("workdir"), transform=lambda v: _perturbed(v, seed=2)
    )


def test_onnx_file_metadata_and_fixed_batch(workdir, tmp_path):
    record = backends.export_workdir(
        workdir, tmp_path / "m.onnx", format="onnx", batch=2, frame_size=(40, 36)
    )
    path = tmp_path / "m.onnx"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", onnx_export.OPSET)]
    assert [i.name for i in model.graph.input] == ["frames"]
    assert [o.name for o in model.graph.output] == ["visibility", "group", "coords"]
    info = onnx_export.read_metadata(path)
    config = json.loads((workdir / "config.json").read_text())
    assert info["config_hash"] == config_hash(config) == record["config_hash"]
    assert info["schema"] == SCHEMA.to_json() and info["opset"] == onnx_export.OPSET
    assert info["frame_size"] == [40, 36] and info["batch"] == 2
    assert info["inputs"]["frames"] == {"dtype": "uint8", "shape": [2, 40, 36]}
    assert info["outputs"]["coords"]["shape"] == [2, SCHEMA.num_points, 2]
    np.testing.assert_array_equal(
        np.float32(info["thresholds"]), np.float32(0.3 + 0.02 * np.arange(SCHEMA.num_points))
    )
    assert info["group_thresholds"] == [0.4] * SCHEMA.num_groups

    engine = onnx_runtime.load_onnx(path, workdir=workdir, schema="paper11")
    assert engine.batch_size == 2
    frames = _simulated_frames(3, 40)[:, :, :36]  # 3 frames: the last batch is padded
    want = KeypointEngine.from_workdir(workdir, batch_size=2)(frames)
    _assert_close(engine(frames), want, (40, 36))
    with pytest.raises(ValueError, match="takes 36x40 frames, got 40x40"):
        engine(_simulated_frames(1, 40))


def test_artifacts_refused_for_another_run_or_schema(workdir, tmp_path):
    onnx_path, jax_path = tmp_path / "m.onnx", tmp_path / "m.bin"
    backends.export_workdir(workdir, onnx_path, format="onnx")
    backends.export_workdir(workdir, jax_path, format="jax", batch=1)
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((workdir / "config.json").read_text())
    write_json_atomic(other / "config.json", {**config, "learning_rate": 1.0})
    for path in (onnx_path, jax_path):
        backends.open_engine(workdir, model_file=path)  # its own workdir: accepted
        with pytest.raises(ValueError, match="another training run") as e:
            backends.open_engine(other, model_file=path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        with pytest.raises(ValueError, match="schema 'paper11' .* not 'reference10'"):
            backends.open_engine(model_file=path, schema="reference10")
    # The jax.export file runs and agrees with the ONNX file.
    frames = _simulated_frames(1, 32)
    a = backends.open_engine(model_file=jax_path)(frames)
    b = backends.open_engine(model_file=onnx_path)(frames)
    _assert_close(b, a, (32, 32))
    with pytest.raises(ValueError, match="not an ONNX model"):
        onnx_export.read_metadata(workdir / "config.json")
    with pytest.raises(ValueError, match="config.json is not an ONNX model") as e:
        backends.open_engine(model_file=workdir / "config.json")
    assert "\n" not in str(e.value)


def test_onnxruntime_backend_from_workdir_keeps_thresholds(workdir):
    xla = backends.open_engine(workdir, batch_size=2)
    ort = backends.open_engine(workdir, backend="onnxruntime", batch_size=2)
    np.testing.assert_array_equal(ort.meta["thresholds"], xla.meta["thresholds"])
    frames = _simulated_frames(5, 48)
    _assert_close(ort(frames), xla(frames), (48, 48))
    batches = [(["a", "b"], frames[:2]), (["c"], np.concatenate([frames[2:3], frames[:1] * 0]))]
    got = list(ort.run_batches(batches))
    assert [tag for tag, _ in got] == [["a", "b"], ["c"]]
    assert got[1][1]["coords"].shape == (1, SCHEMA.num_points, 2)


def test_missing_provider_is_a_clear_error():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(onnx_runtime.ProviderUnavailable, match="no CUDAExecutionProvider"):
        onnx_runtime.select_providers("cuda")
    assert onnx_runtime.select_providers("auto")[0] == "CPUExecutionProvider"


def test_latency_benchmark_rows_per_backend(tmp_path, monkeypatch):
    from experiments.benchmarks import latency

    written = []
    real_write = latency.write_json_atomic
    monkeypatch.setattr(
        latency,
        "write_json_atomic",
        lambda p, r: written.append(len(r["rows"])) or real_write(p, r),
    )
    out = tmp_path / "bench.json"
    result = latency.run_benchmark(
        backbones=["resnet_tiny"], image_size=32, batch_sizes=[1, 2], dtypes=["float32"],
        backends=["xla", "onnxruntime", "onnxruntime_int8"], onnxruntime_peer=True,
        torch_eager=False, profile=False, out=out, peak_size=256, progress=lambda s: None,
        timing={"warmup": 1, "min_runs": 2, "min_time_s": 0.0},
    )  # fmt: skip
    assert [(r["backend"], r["batch"]) for r in result["rows"]] == [
        (backend, b) for b in (1, 2) for backend in ("xla", "onnxruntime", "onnxruntime_int8")
    ]  # fmt: skip
    assert written[:6] == [1, 2, 3, 4, 5, 6]  # the JSON is rewritten after every row
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    for row in result["rows"]:
        assert row["ratio_vs_onnxruntime"] > 0 and 0 < row["fraction_of_peak"]
        assert row["flops_per_batch"] > 0
        assert "frames_per_s_pipelined" not in row["end_to_end"]  # measured off-CPU only
        if row["backend"] == "xla":  # the compiled engine's top-level operations
            m = row["model"]
            assert m["ops"] > 1 and m["us_per_op"] == m["p50_ms"] * 1e3 / m["ops"]
        else:
            assert "ops" not in row["model"]
    assert set(result["peak"]) >= {"xla_matmul", "onnxruntime_matmul"}
    assert "| resnet_tiny | onnxruntime | float32 | 32 | 2 |" in latency.markdown_table(result)


def test_pipelined_rate_runs_every_batch_through_the_double_buffer():
    from experiments.benchmarks import latency

    engine = KeypointEngine.random_init("paper11", "resnet_tiny", 32, batch_size=2)
    frames = np.random.default_rng(0).integers(0, 255, (2, 40, 40)).astype(np.uint8)
    launched = []
    dispatch = engine.dispatch
    engine.dispatch = lambda f: launched.append(f.shape) or dispatch(f)
    rate = latency.pipelined_frames_per_s(engine, frames, batches=4, runs=3)
    assert launched == [(2, 40, 40)] * 12 and rate > 0
    assert engine.trace_count == 1  # one executable for every batch


def test_deploy_doc_client_runs_without_jax(workdir, tmp_path):
    """The numpy + onnxruntime client of docs/deploy.md, run as written with jax unimportable,
    reports the points the engine's gate reports."""
    import pathlib
    import re
    import subprocess
    import sys

    from tavr_jax.reporting import Gate

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "deploy.md").read_text()
    (client,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    backends.export_workdir(workdir, tmp_path / "model.onnx", format="onnx")
    frames = _simulated_frames(1, 32)
    np.save(tmp_path / "frames.npy", frames)
    client = client.replace('np.zeros((1, *info["frame_size"]), np.uint8)', 'np.load("frames.npy")')
    assert 'np.load("frames.npy")' in client
    script = 'import sys\nsys.modules["jax"] = None  # any import of jax now fails\n' + client
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    engine = onnx_runtime.load_onnx(tmp_path / "model.onnx")
    out = engine(frames)
    reported = Gate.from_meta(engine.meta, SCHEMA)(out["visibility"], out["group"])[0]
    assert reported.any() and not reported.all()
    assert [line.split(":")[0] for line in lines] == list(SCHEMA.point_names)
    assert [": reported" in line for line in lines] == reported.tolist()


def _initializers(model) -> dict:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_int8_graph_has_per_channel_int8_convolutions():
    eng = _engine(batch_size=2)
    hw = (40, 40)
    float_model = onnx_export.engine_model(eng, frame_size=hw)
    calibration = _simulated_frames(6, 40)
    model = onnx_runtime.quantize_int8(float_model, calibration)
    info = onnx_export.parse_metadata({p.key: p.value for p in model.metadata_props}, "m")
    assert info["dtype"] == "int8"
    assert info["quantization"] == {**onnx_runtime.INT8_SCHEME, "calibration_frames": 6}

    # Every convolution's weights are int8 with one scale per output channel, and
    # dequantise to the float graph's (batch-norm-folded) weights within half a step.
    want = _initializers(float_model)
    got = _initializers(model)
    made_by = {out: node for node in model.graph.node for out in node.output}
    float_convs = {n.output[0]: n for n in float_model.graph.node if n.op_type == "Conv"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == len(float_convs) > 5
    for conv in convs:
        dq = made_by[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        q, scale, zero = (got[name] for name in dq.input)
        w = want[float_convs[conv.output[0]].input[1]]
        assert q.dtype == np.int8 and scale.shape == (w.shape[0],) and not zero.any()
        step = scale[:, None, None, None]
        assert np.all(np.abs(q * step - w) <= step / 2 + 1e-7)
        # The activations entering it are quantised too (uint8, from the calibration).
        assert made_by[conv.input[0]].op_type == "DequantizeLinear"

    # The int8 graph computes nearly what the float graph does, but not exactly.
    frames = _simulated_frames(3, 40, seed=1)
    want_out = onnx_runtime.OnnxKeypointEngine.from_engine(eng)(frames)
    int8 = onnx_runtime.OnnxKeypointEngine.from_engine(eng, calibrate=lambda hw: calibration)
    got_out = int8(frames)
    for k in ("visibility", "group"):
        diff = np.abs(got_out[k] - want_out[k])
        assert 0 < diff.max() < 0.05, k
    assert np.abs(got_out["coords"] - want_out["coords"]).max() < 0.05 * 40
    # A fixed-batch graph takes its calibration in batches of its size (the last one wraps).
    fixed = onnx_export.engine_model(eng, frame_size=hw, batch=2)
    fixed8 = onnx_runtime.quantize_int8(fixed, calibration[:3])
    assert sum(n.op_type == "QuantizeLinear" for n in fixed8.graph.node) > len(convs)
    fixed_out = onnx_runtime.make_session(fixed8).run(None, {"frames": frames[:2]})
    assert fixed_out[0].shape == (2, SCHEMA.num_points)
    with pytest.raises(ValueError, match=r"uint8 \(N, 40, 40\)"):
        onnx_runtime.quantize_int8(float_model, calibration[:, :32])
    with pytest.raises(ValueError, match="only a float32 graph"):
        onnx_runtime.quantize_int8(model, calibration)


def test_winograd_benchmark_times_both_graphs_on_the_same_layers():
    from experiments.benchmarks.winograd import measure

    row = measure(8, 8, batch=2, layers=2, min_time=0.0)
    assert row["max_rel_difference"] < 1e-5 and row["runs"] >= 5
    assert row["direct_ms_per_layer"] > 0 and row["winograd_over_direct"] > 0
    assert row["winograd_pays"] is False  # 8 channels


def test_sessions_spin_unless_told_not_to():
    model = onnx_export.engine_model(_engine(), frame_size=(SIZE, SIZE))
    key = "session.intra_op.allow_spinning"
    quiet = onnx_runtime.make_session(model, spin=False).get_session_options()
    assert quiet.get_session_config_entry(key) == "0"
    default = onnx_runtime.make_session(model).get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        default.get_session_config_entry(key)  # unset: onnxruntime's default, spinning
