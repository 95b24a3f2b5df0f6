"""The openvino backend: the exported ONNX file on OpenVINO against the JAX engine and
onnxruntime, the IR cache beside the file, refusals."""

import contextlib
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from _workdirs import random_weights_workdir

from cardiac_core.fileio import write_json_atomic
from tavr_jax.data.simulate import simulate_case
from tavr_jax.infer import backends, onnx_runtime
from tavr_jax.infer.engine import KeypointEngine
from tavr_jax.infer.openvino_runtime import OpenVinoKeypointEngine
from tavr_jax.run.checkpoint import CheckpointStore
from tavr_jax.schema import get_schema

ov = pytest.importorskip(
    "openvino", reason="openvino is not installed (pip install -e '.[openvino]')"
)
openvino_runtime = pytest.importorskip("tavr_jax.infer.openvino_runtime")

SCHEMA = get_schema("paper11")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir: config.json, a checkpoint of random weights, tuned thresholds."""
    return random_weights_workdir(tmp_path_factory.mktemp("workdir"))


def _frames(n, size, seed=0):
    case = simulate_case(np.random.default_rng(seed), SCHEMA, frames=n, size=size)
    return np.stack([image for image, *_ in case])


def _assert_close(got, want, frame_hw):
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    for k in ("visibility", "group"):
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)
    # Coordinates are frame pixels: 1e-3 of the frame size at most, as for onnxruntime.
    scale = np.array(frame_hw[::-1], np.float32)
    np.testing.assert_allclose(got["coords"] / scale, want["coords"] / scale, atol=1e-3, rtol=0)


@pytest.mark.parametrize("batch", [None, 2])
def test_openvino_file_matches_jax_and_onnxruntime(workdir, tmp_path, batch):
    path = tmp_path / "m.onnx"
    backends.export_workdir(workdir, path, format="onnx", batch=batch, frame_size=(40, 36))
    engine = backends.open_engine(workdir, model_file=path, backend="openvino", batch_size=2)
    assert isinstance(engine, openvino_runtime.OpenVinoKeypointEngine)
    assert engine.backend == "openvino" and engine.batch_size == 2
    assert engine.schema.point_names == SCHEMA.point_names
    frames = _frames(5, 40)[:, :, :36]  # 5 frames in batches of 2: the last one short
    got = engine(frames)
    want = KeypointEngine.from_workdir(workdir, batch_size=2)(frames)
    _assert_close(got, want, (40, 36))
    ort = onnx_runtime.load_onnx(path, workdir=workdir, batch_size=2)(frames)
    _assert_close(got, ort, (40, 36))
    assert np.ptp(want["coords"][:, :, 0], axis=0).max() > 0.01  # outputs follow the frames
    np.testing.assert_array_equal(engine.meta["thresholds"], ort_meta(path, workdir))
    tags = list(engine.run_batches([(["a", "b"], frames[:2]), (["c"], frames[2:3])]))
    assert [t for t, _ in tags] == [["a", "b"], ["c"]]
    _assert_close(tags[1][1], {k: v[2:3] for k, v in want.items()}, (40, 36))
    with pytest.raises(ValueError, match="takes 36x40 frames, got 40x40"):
        engine(_frames(1, 40))


def ort_meta(path, workdir):
    return onnx_runtime.load_onnx(path, workdir=workdir).meta["thresholds"]


def test_openvino_from_workdir_matches_jax(workdir):
    ovx = backends.open_engine(workdir, backend="openvino", batch_size=3)
    xla = backends.open_engine(workdir, batch_size=3)
    frames = _frames(4, 48)
    _assert_close(ovx(frames), xla(frames), (48, 48))
    np.testing.assert_array_equal(ovx.meta["thresholds"], xla.meta["thresholds"])


def test_ir_cache_written_once_reused_and_rebuilt(workdir, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    backends.export_workdir(workdir, path, format="onnx")
    conversions = []
    real_read = openvino_runtime.read_onnx
    monkeypatch.setattr(openvino_runtime, "read_onnx",
                        lambda *a, **k: conversions.append(1) or real_read(*a, **k))  # fmt: skip
    frames = _frames(2, 32)
    first = openvino_runtime.load_openvino(path, workdir=workdir)(frames)
    irs = sorted(p.name for p in tmp_path.glob("m.*.openvino.*"))
    assert len(irs) == 2 and len(conversions) == 1, irs
    stamps = [(tmp_path / n).stat().st_mtime_ns for n in irs]
    second = openvino_runtime.load_openvino(path, workdir=workdir)(frames)
    assert len(conversions) == 1  # read from the IR, not converted again
    assert [(tmp_path / n).stat().st_mtime_ns for n in irs] == stamps  # not rewritten
    _assert_close(second, first, (32, 32))
    # Another export in its place (other weights): converted again, the stale IR removed.
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((workdir / "config.json").read_text())
    write_json_atomic(other / "config.json", config)
    base = KeypointEngine.random_init(SCHEMA, config["backbone"], config["image_size"],
                                      head=config["head"], seed=7)  # fmt: skip
    with CheckpointStore(other) as store:
        store.save(5, {"step": jnp.int32(5), **base.variables})
        store.wait()
    backends.export_workdir(other, path, format="onnx")
    third = openvino_runtime.load_openvino(path)(frames)
    assert len(conversions) == 2
    new_irs = sorted(p.name for p in tmp_path.glob("m.*.openvino.*"))
    assert len(new_irs) == 2 and not set(new_irs) & set(irs)
    _assert_close(third, KeypointEngine.from_workdir(other)(frames), (32, 32))
    # An IR whose key is not this file's (a copy from elsewhere) is not trusted.
    xml = tmp_path / new_irs[1]
    xml.write_text(xml.read_text().replace(openvino_runtime.IR_KEY, "something_else"))
    openvino_runtime.load_openvino(path)
    assert len(conversions) == 3
    # cache_ir=False: converted from the .onnx every time.
    openvino_runtime.load_openvino(path, cache_ir=False)
    assert len(conversions) == 4


def test_bad_files_are_one_line_errors(workdir, tmp_path):
    with pytest.raises(ValueError, match="config.json is not an ONNX model OpenVINO can load") as e:
        backends.open_engine(model_file=workdir / "config.json", backend="openvino")
    assert "\n" not in str(e.value) and str(e.value).endswith("; try --backend=onnxruntime")
    path = tmp_path / "m.onnx"
    backends.export_workdir(workdir, path, format="onnx")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte among the weights
    edited = tmp_path / "edited.onnx"
    edited.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch") as e:
        backends.open_engine(model_file=edited, backend="openvino")
    assert "\n" not in str(e.value) and str(edited) in str(e.value)
    with pytest.raises(ValueError, match="schema 'paper11' .* not 'reference10'"):
        backends.open_engine(model_file=path, backend="openvino", schema="reference10")
    jax_file = tmp_path / "m.bin"
    backends.export_workdir(workdir, jax_file, format="jax", batch=1)
    with pytest.raises(ValueError, match="jax.export file; --backend=openvino runs .onnx"):
        backends.open_engine(model_file=jax_file, backend="openvino")
    assert not list(tmp_path.glob("edited.*.openvino.*"))  # nothing cached of a refused file


def test_missing_openvino_is_one_line(tmp_path):
    """Without the package: the launcher's error names the extra to install."""
    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "from tavr_jax.infer import backends\n"
        "try:\n"
        "    backends.open_engine(model_file=sys.argv[1], backend='openvino')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, env=env, check=True).stdout  # fmt: skip
    assert out.strip() == openvino_runtime.MISSING
    assert out.strip() == (
        "--backend=openvino needs the openvino package: pip install -e '.[openvino]' "
        "(or use --backend=onnxruntime)"
    )


def test_missing_nncf_is_one_line(tmp_path):
    """Without nncf: an OpenVINO int8 export says what to install, or which backend to use,
    before it reads the workdir; the float export does not need it."""
    code = (
        "import sys; sys.modules['nncf'] = None\n"
        "from tavr_jax.infer import backends\n"
        "try:\n"
        "    backends.export_workdir(sys.argv[1], sys.argv[1] + '/m.onnx', backend='openvino',\n"
        "                            int8_calibration=sys.argv[1])\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none")], capture_output=True,
                         text=True, env=env, check=True).stdout  # fmt: skip
    assert out.strip() == openvino_runtime.NNCF_MISSING
    assert out.strip() == (
        "int8 for --backend=openvino needs the nncf package: pip install -e '.[openvino]' "
        "(or quantise for --backend=onnxruntime)"
    )


def test_too_old_packages_are_one_line(monkeypatch, workdir, tmp_path):
    path = tmp_path / "m.onnx"
    backends.export_workdir(workdir, path)
    monkeypatch.setattr(ov, "__version__", "2025.3.0-19807-44526285f24-releases/2025/3")
    with pytest.raises(ValueError) as e:
        backends.open_engine(model_file=path, backend="openvino")
    assert str(e.value) == (
        "--backend=openvino needs openvino >= 2026.4, found 2025.3.0: "
        "pip install -e '.[openvino]' (or use --backend=onnxruntime)"
    )
    monkeypatch.undo()
    nncf = pytest.importorskip(
        "nncf", reason="nncf is not installed (pip install -e '.[openvino]')"
    )
    monkeypatch.setattr(nncf, "__version__", "2.19.0")
    with pytest.raises(ValueError, match=r"needs nncf >= 3\.4, found 2\.19\.0: .*onnxruntime\)$"):
        backends.export_workdir(workdir, path, backend="openvino", int8_calibration=tmp_path)


def test_latency_benchmark_has_every_backend_beside_both_peers(monkeypatch):
    """One run: our float and int8 graphs on both runtimes beside torch's export on each, the
    Winograd rule measured per runtime, under a competing job started and stopped around the
    timed runs."""
    from experiments.benchmarks import latency
    from experiments.benchmarks.contenders import LOAD_WORKLOAD
    from experiments.benchmarks.peer_table import peer_table
    from tavr_jax.infer import winograd_measure

    pytest.importorskip("torch", reason="the peers are torch's export")
    pytest.importorskip("nncf", reason="openvino_int8 is NNCF's (pip install -e '.[openvino]')")
    monkeypatch.setattr(winograd_measure, "interleaved",
                        lambda fns: [np.full(5, 0.01), np.full(5, 0.005)])  # fmt: skip
    jobs = []
    real_load = latency.background_load

    def watched_load(on):
        with real_load(on) as job:
            jobs.append(job)
            assert job.poll() is None  # running while the contenders are timed
            yield job

    monkeypatch.setattr(latency, "background_load", contextlib.contextmanager(watched_load))
    backends_ = ["xla", "onnxruntime", "onnxruntime_int8", "openvino", "openvino_int8"]
    result = latency.run_benchmark(
        backbones=["resnet_tiny"], image_size=32, batch_sizes=[2], dtypes=["float32"],
        backends=backends_, onnxruntime_peer=True, openvino_peer=True, winograd="measure",
        load=True, torch_eager=False, profile=False, peak_size=256, progress=lambda s: None,
        timing={"warmup": 1, "min_runs": 2, "min_time_s": 0.0},
    )  # fmt: skip
    assert [r["backend"] for r in result["rows"]] == backends_
    assert not result["skipped"], result["skipped"]
    assert len(jobs) == 1 and jobs[0].poll() is not None  # stopped after the timed runs
    assert result["background_load"] == LOAD_WORKLOAD
    assert set(result["winograd"]) == {"onnxruntime", "openvino"}
    for rule in result["winograd"].values():
        assert rule["winograd_rule"].startswith(f"measured on {result['cpu']}, ")
    for row in result["rows"]:
        assert row["cpu"] == result["cpu"] and row["cpu"] and row["background_load"] is True
        assert row["ratio_vs_openvino"] > 0 and row["ratio_vs_onnxruntime"] > 0
        assert row["best_peer"] in ("onnxruntime_peer", "openvino_peer")
        of_best = {"onnxruntime_peer": "ratio_vs_onnxruntime", "openvino_peer": "ratio_vs_openvino"}
        assert row["ratio_vs_best_peer"] == row[of_best[row["best_peer"]]]
    table = peer_table(result)
    assert f"| {result['cpu']} | on | resnet_tiny | 32 | 2 | openvino_int8 |" in table


def test_eval_scores_the_onnx_file_on_openvino(tmp_path):
    """tavr_eval --model_file --backend=openvino scores as onnxruntime does on the same file."""
    from _workdirs import TINY_CONFIG, write_tiny_checkpoint, write_tiny_project

    from tavr_jax.infer import evaluate

    data = write_tiny_project(tmp_path / "data", sizes=((48, 48),), cases=3)
    workdir = tmp_path / "w"
    write_tiny_checkpoint(workdir, TINY_CONFIG)
    path = tmp_path / "m.onnx"
    backends.export_workdir(workdir, path, frame_size=(48, 48))
    kw = dict(split="all", threshold=0.5, batch_size=4, model_file=path)
    ort = evaluate.evaluate_project(workdir, data, **kw)
    got = evaluate.evaluate_project(workdir, data, backend="openvino", **kw)
    assert (got["backend"], ort["backend"]) == ("openvino", "onnxruntime")
    assert got["counts"] == ort["counts"]
    np.testing.assert_allclose(got["mean_error_px"], ort["mean_error_px"], rtol=1e-4)
    with pytest.raises(ValueError, match="--backend=openvino runs an exported --model_file"):
        evaluate.evaluate_project(workdir, data, backend="openvino", split="all")


def _initializers(model) -> dict:
    import onnx

    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_nncf_int8_graph_runs_on_openvino_near_the_float_graph():
    """NNCF's int8: every convolution's weights int8 per output channel, its input quantised
    too, the MatMuls left in float32; on OpenVINO it computes nearly what the float graph does."""
    nncf = pytest.importorskip(
        "nncf", reason="nncf is not installed (pip install -e '.[openvino]')"
    )
    from tavr_jax.infer import onnx_export

    eng = KeypointEngine.random_init(SCHEMA, "resnet_tiny", 32, seed=1, batch_size=2)
    float_model = onnx_export.engine_model(eng, frame_size=(40, 40), winograd=False)
    calibration = _frames(6, 40)
    model = openvino_runtime.quantize_nncf(float_model, calibration)
    info = onnx_export.parse_metadata({p.key: p.value for p in model.metadata_props}, "m")
    assert info["dtype"] == "int8"
    assert info["quantization"] == {**openvino_runtime.NNCF_SCHEME, "nncf": nncf.__version__,
                                    "calibration_frames": 6}  # fmt: skip
    weights = _initializers(model)
    made_by = {out: node for node in model.graph.node for out in node.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(n.op_type == "Conv" for n in float_model.graph.node) > 5
    for conv in convs:
        dq = made_by[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        q, scale = weights[dq.input[0]], weights[dq.input[1]]
        assert q.dtype == np.int8 and scale.shape == (q.shape[0],)
        source = made_by[conv.input[0]]
        while source.op_type in ("Unsqueeze", "MaxPool"):  # NNCF quantises before these
            source = made_by[source.input[0]]
        assert source.op_type == "DequantizeLinear"
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and not any(made_by[i].op_type == "DequantizeLinear" for n in matmuls
                               for i in n.input if i in made_by)  # fmt: skip

    frames = _frames(3, 40, seed=1)
    want = OpenVinoKeypointEngine.from_engine(eng, winograd=False)(frames)
    int8 = OpenVinoKeypointEngine.from_engine(eng, calibrate=lambda hw: calibration)
    got = int8(frames)
    for k in ("visibility", "group"):
        assert 0 < np.abs(got[k] - want[k]).max() < 0.05, k
    assert np.abs(got["coords"] - want["coords"]).max() < 0.05 * 40
    winograd_model = onnx_export.engine_model(eng, frame_size=(40, 40), winograd=_always)
    with pytest.raises(ValueError, match="Winograd convolutions cannot be quantised"):
        openvino_runtime.quantize_nncf(winograd_model, calibration)


def _always(c_in, c_out, hw):  # a Winograd rule taking every eligible convolution
    return True


_always.metadata = lambda: {"winograd_rule": "always"}


def test_openvino_int8_export_is_scored_on_held_out_cases(tmp_path):
    """tavr_export --int8_calibration --backend=openvino: NNCF's int8 file, calibrated on the
    training cases, loads on OpenVINO and scores nearly as the float file."""
    pytest.importorskip("nncf", reason="nncf is not installed (pip install -e '.[openvino]')")
    from _workdirs import TINY_CONFIG, write_tiny_checkpoint, write_tiny_project

    from tavr_jax.infer import evaluate, onnx_export

    data = write_tiny_project(tmp_path / "data", sizes=((48, 48),), cases=5)
    workdir = tmp_path / "w"
    write_tiny_checkpoint(workdir, TINY_CONFIG)
    float_file, int8_file = tmp_path / "m.onnx", tmp_path / "m8.onnx"
    backends.export_workdir(workdir, float_file, frame_size=(48, 48))
    record = backends.export_workdir(workdir, int8_file, frame_size=(48, 48), backend="openvino",
                                     int8_calibration=data, calibration_count=3)  # fmt: skip
    assert (record["dtype"], record["backend"], record["winograd_rule"]) == (
        "int8",
        "openvino",
        "off",
    )
    info = onnx_export.read_metadata(int8_file)
    assert info["quantization"]["runtime"] == "openvino"
    assert info["quantization"]["calibration_frames"] == 3
    kw = dict(split="all", threshold=0.5, batch_size=4, backend="openvino")
    want = evaluate.evaluate_project(workdir, data, model_file=float_file, **kw)
    got = evaluate.evaluate_project(workdir, data, model_file=int8_file, **kw)
    assert got["n_images"] == want["n_images"]
    assert abs(got["mean_error_px"] - want["mean_error_px"]) < 1.0
