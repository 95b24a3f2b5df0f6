"""Saved artifacts record role, format version and sha256; a swapped, renamed or edited file
is refused with one line naming it, and an old artifact loads with one warning."""

import json
import logging
import shutil

import numpy as np
import pytest

from cardiac_core import integrity
from cardiac_core.integrity import IntegrityError
from perfusion import analyze, simulate, studies


def _refused(load, match):
    with pytest.raises(IntegrityError, match=match) as info:
        load()
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------- perfusion model


@pytest.fixture(scope="module")
def perfusion(tmp_path_factory):
    """A small simulated folder and a model fitted on it at 32 px, and its intact answers."""
    root = tmp_path_factory.mktemp("perfusion")
    simulate.simulate_dataset(root / "data", 15, seed=3, size=32, disk_px=64)
    analyze.fit(root / "data", root / "model", size=32)
    found = studies.read_study_folder(root / "data", size=32)
    return root / "model", found, _answers(root / "model", found)


def _answers(model_dir, found):
    reports, _ = analyze.analyze_arrays(analyze.load_model(model_dir), found)
    return [(r["label"], r["probabilities"], r["territories"]) for r in reports]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_intact_model_folder_is_verified_and_answers_as_before(perfusion, tmp_path, caplog):
    model_dir, found, answers = perfusion
    record = json.loads((model_dir / integrity.MANIFEST).read_text())
    assert record["kind"] == "perfusion_model"
    assert record["files"]["abnormal.npz"]["role"] == "abnormal model"
    assert set(record["files"]) == {p.name for p in model_dir.iterdir()} - {"manifest.json"}
    with caplog.at_level(logging.WARNING):
        assert _answers(_copy(model_dir, tmp_path / "m"), found) == answers
    assert "unverified" not in caplog.text


def test_swapped_renamed_or_edited_model_files_are_refused(perfusion, tmp_path):
    model_dir, _, _ = perfusion
    d = _copy(model_dir, tmp_path / "swap")
    a, b = d / "abnormal.npz", d / "ischemia_vs_infarction.npz"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)  # both still readable models: without the manifest, wrong answers
    _refused(
        lambda: analyze.load_model(d),
        r"swap/abnormal.npz: holds the ischemia_vs_infarction model \(swapped or renamed\?\)$",
    )
    d = _copy(model_dir, tmp_path / "rename")
    (d / "abnormal.npz").rename(d / "abnormal_old.npz")
    _refused(
        lambda: analyze.load_model(d),
        r"rename/abnormal.npz: missing, though manifest.json lists it; its contents are in "
        r"abnormal_old.npz \(renamed\?\)",
    )
    d = _copy(model_dir, tmp_path / "edit")
    meta = (d / "model.json").read_text()  # one byte of a calibration value, still valid
    i = meta.index('"calibration"') + meta[meta.index('"calibration"') :].index(".") + 1
    digit = "1" if meta[i] != "1" else "2"
    (d / "model.json").write_text(meta[:i] + digit + meta[i + 1 :])
    _refused(
        lambda: analyze.load_model(d),
        r"edit/model.json: checksum mismatch \(edited after it was written\?\)",
    )
    d = _copy(model_dir, tmp_path / "extra")
    (d / "manifest.json").write_text(json.dumps({"kind": "tavr_refiner", "files": {}}))
    _refused(lambda: analyze.load_model(d), r"manifest of a 'tavr_refiner', not a 'perfusion")


def test_old_or_unsealed_model_folder_loads_with_one_warning(perfusion, tmp_path, caplog):
    model_dir, found, answers = perfusion
    d = _copy(model_dir, tmp_path / "old")
    (d / "manifest.json").unlink()  # what a folder written before manifests looks like
    with caplog.at_level(logging.WARNING):
        assert _answers(d, found) == answers
        analyze.load_model(d)  # warned once per folder, not per load
    lines = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "old: no manifest.json" in lines[0] and "perfusion_fit.py" in lines[0]
    from perfusion.fitting import seal_model

    seal_model(d)  # re-saved as it is: verified from now on
    assert integrity.verify_folder(d, kind="perfusion_model")


# ----------------------------------------------------------------- workdir and refiner


def test_workdir_metadata_is_recorded_and_checked(tmp_path, caplog):
    from tavr_jax.run import workdir

    w = tmp_path / "w"
    w.mkdir()
    workdir.write_config(w, {"schema": "paper11", "backbone": "resnet_tiny"})
    workdir.save_thresholds(w, {"points": {"P": 0.4}, "groups": None})
    files = json.loads((w / "manifest.json").read_text())["files"]
    assert set(files) == {"config.json", "thresholds.json"}
    assert workdir.read_config(w)["backbone"] == "resnet_tiny"
    config, thresholds = (w / "config.json").read_bytes(), (w / "thresholds.json").read_bytes()
    (w / "config.json").write_bytes(thresholds)
    (w / "thresholds.json").write_bytes(config)
    _refused(lambda: workdir.read_config(w), r"w/config.json: holds the thresholds \(swapped")
    (w / "thresholds.json").write_bytes(thresholds)
    (w / "config.json").write_bytes(config.replace(b"resnet_tiny", b"resnet_tinz"))
    _refused(lambda: workdir.read_config(w), r"w/config.json: checksum mismatch")
    # An old workdir: no manifest, one warning; writing its config records both files.
    (w / "config.json").write_bytes(config)
    (w / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        workdir.read_config(w)
    assert "w: no manifest.json, so its files are unverified" in caplog.text
    workdir.write_config(w, workdir.read_config(w))
    files = json.loads((w / "manifest.json").read_text())["files"]
    assert set(files) == {"config.json", "thresholds.json"}


def test_refiner_folder_is_recorded_and_checked(tmp_path):
    import jax
    import jax.numpy as jnp

    from tavr_jax.models import refine
    from tavr_jax.run import refiner as refiner_files

    model = refine.PatchRefiner(2, width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16)), jnp.zeros((1,), jnp.int32))
    config = refiner_files.RefinerConfig(patch=16, width=4)
    d = tmp_path / "refiner"
    refiner_files.save_refiner(d, params, config, ["A", "B"])
    assert set(json.loads((d / "manifest.json").read_text())["files"]) == set(refiner_files.ROLES)
    refiner_files.load_refiner(d, ["A", "B"])
    data = bytearray((d / "params.msgpack").read_bytes())
    data[-1] ^= 1  # one bit of the last weight: still a readable file
    (d / "params.msgpack").write_bytes(bytes(data))
    _refused(lambda: refiner_files.load_refiner(d), r"params.msgpack: checksum mismatch")


# ------------------------------------------------------------------------------ ONNX


def _tiny_onnx() -> bytes:
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"], name="same")], "g", [x], [y])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    h.set_model_props(model, {"tavr_keypoints": "{}"})
    return model.SerializeToString()


def test_onnx_record_survives_parsers_and_refuses_edits(tmp_path, caplog):
    onnx = pytest.importorskip("onnx")
    data = _tiny_onnx()
    sealed = integrity.seal_onnx(data, role="tavr_keypoints", format_version=1)
    assert integrity.seal_onnx(sealed, role="tavr_keypoints", format_version=1) == sealed
    props = {p.key: p.value for p in onnx.load_from_string(sealed).metadata_props}
    assert props["tavr_keypoints"] == "{}" and json.loads(props["integrity"])["role"]
    check = dict(role="tavr_keypoints", format_version=1)
    assert integrity.check_onnx(sealed, "m.onnx", **check)
    edited = sealed.replace(b"same", b"sane")
    _refused(lambda: integrity.check_onnx(edited, "m.onnx", **check), "m.onnx: checksum mismatch")
    other = integrity.seal_onnx(data, role="something_else", format_version=1)
    _refused(lambda: integrity.check_onnx(other, "m.onnx", **check), "holds a something_else")
    with caplog.at_level(logging.WARNING):
        assert not integrity.check_onnx(data, tmp_path / "old.onnx", **check)
    assert "old.onnx: no integrity record, so it is unverified" in caplog.text
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(sealed, providers=["CPUExecutionProvider"])
    assert "integrity" in session.get_modelmeta().custom_metadata_map
    x = np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x)
