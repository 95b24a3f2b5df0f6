"""The openvino backend: the exported ONNX file on OpenVINO against the JAX engine and
onnxruntime, the IR cache beside the file, refusals."""

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
    assert "\n" not in str(e.value)
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
        "--backend=openvino needs the openvino package: pip install -e '.[openvino]'"
    )


def test_latency_benchmark_has_openvino_rows_and_peer():
    from experiments.benchmarks import latency
    from experiments.benchmarks.peer_table import peer_table

    pytest.importorskip("torch", reason="the peers are torch's export")
    result = latency.run_benchmark(
        backbones=["resnet_tiny"], image_size=32, batch_sizes=[2], dtypes=["float32"],
        backends=["xla", "onnxruntime", "openvino"], onnxruntime_peer=True, openvino_peer=True,
        torch_eager=False, profile=False, peak_size=256, progress=lambda s: None,
        timing={"warmup": 1, "min_runs": 2, "min_time_s": 0.0},
    )  # fmt: skip
    assert [r["backend"] for r in result["rows"]] == ["xla", "onnxruntime", "openvino"]
    assert not result["skipped"], result["skipped"]
    for row in result["rows"]:
        assert row["cpu"] == result["cpu"] and row["cpu"]
        assert row["ratio_vs_openvino"] > 0 and row["ratio_vs_onnxruntime"] > 0
        assert row["best_peer"] in ("onnxruntime_peer", "openvino_peer")
        of_best = {"onnxruntime_peer": "ratio_vs_onnxruntime", "openvino_peer": "ratio_vs_openvino"}
        assert row["ratio_vs_best_peer"] == row[of_best[row["best_peer"]]]
    table = peer_table(result)
    assert f"| {result['cpu']} | resnet_tiny | 32 | 2 | openvino |" in table


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
