"""The second-stage patch refiner: patch sampling against a numpy loop, learning, files."""

import types

import numpy as np
import pytest

from tavr_jax.models import refine
from tavr_jax.run import refiner as refiner_files
from tavr_jax.training import refiner as refiner_training


def _bilinear(frame, y, x):
    """Bilinear value at array position (y, x), 0 outside the frame: a plain loop."""
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    value = 0.0
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= yy < frame.shape[0] and 0 <= xx < frame.shape[1]:
                value += (1 - abs(y - yy)) * (1 - abs(x - xx)) * frame[yy, xx]
    return value


def test_patches_match_a_bilinear_loop_with_spacing_and_frame_edges():
    rng = np.random.default_rng(0)
    frames = rng.uniform(0, 255, (2, 40, 50)).astype(np.float32)
    centres = np.array([[[10.3, 20.7], [0.2, 39.9]], [[25.0, 5.5], [49.0, 12.0]]], np.float32)
    spacing = np.array([1.0, 1.5], np.float32)
    got = np.asarray(refine.extract_patches(frames, centres, spacing, size=6))
    assert got.shape == (2, 2, 6, 6)
    offsets = np.arange(6) - 2.5
    for b in range(2):
        for k in range(2):
            cx, cy = centres[b, k]
            for i in range(6):
                for j in range(6):
                    # pixel centres at half-integers: frame pixel x sits at array index x - 0.5
                    want = _bilinear(
                        frames[b], cy - 0.5 + offsets[i] * spacing[b],
                        cx - 0.5 + offsets[j] * spacing[b],
                    )  # fmt: skip
                    assert got[b, k, i, j] == pytest.approx(want, abs=1e-3)
    # a point at the frame corner reads zeros beyond the frame
    assert got[0, 1, -1, :].max() == 0.0
    assert refine.patch_spacing(1024) == 2.0


def _blob_frames(rng, n, size=refine.REFERENCE_WIDTH):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    xy = rng.uniform(40, size - 40, (n, 1, 2)).astype(np.float32)
    frames = np.stack(
        [40 + 200 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0) for (x, y) in xy[:, 0]]
    )
    return frames.astype(np.uint8), np.ones((n, 1), bool), xy


def test_refiner_learns_to_move_points_onto_the_structure(tmp_path):
    rng = np.random.default_rng(1)
    frames, vis, xy = _blob_frames(rng, 24)
    config = refiner_files.RefinerConfig(
        patch=16, width=8, steps=250, batch=32, jitter=3.0, learning_rate=3e-3
    )
    model, params, losses = refiner_training.train_refiner(frames, vis, xy, config, progress=False)
    assert losses[-20:].mean() < 0.5 * losses[:20].mean()
    # new frames, first-stage points a few pixels off (one patch sample per pixel here)
    test_frames, _, truth = _blob_frames(np.random.default_rng(2), 8)
    coarse = truth + np.random.default_rng(3).uniform(-3, 3, truth.shape).astype(np.float32)
    out = np.asarray(refine.refine_points(model, params, test_frames, coarse, size=16))
    assert out.shape == coarse.shape
    before = np.linalg.norm(coarse - truth, axis=-1).mean()
    after = np.linalg.norm(out - truth, axis=-1).mean()
    assert after < 0.6 * before
    # saved and loaded, it gives the same points; another schema's points are refused
    refiner_files.save_refiner(tmp_path / "refiner", params, config, ["P"])
    model2, params2, config2 = refiner_files.load_refiner(tmp_path / "refiner", ["P"])
    assert config2 == config
    again = np.asarray(refine.refine_points(model2, params2, test_frames, coarse, size=16))
    np.testing.assert_allclose(again, out, rtol=1e-6)
    with pytest.raises(ValueError, match="refiner trained for points"):
        refiner_files.load_refiner(tmp_path / "refiner", ["Q"])
    with pytest.raises(FileNotFoundError, match="no refiner.json"):
        refiner_files.load_refiner(tmp_path)
    (tmp_path / "refiner" / "params.msgpack").write_bytes(b"\x00broken")
    with pytest.raises(ValueError, match="params.msgpack: unreadable"):
        refiner_files.load_refiner(tmp_path / "refiner")


def test_training_frames_must_share_one_size():
    frame = types.SimpleNamespace
    project = types.SimpleNamespace(
        frames=[frame(height=64, width=64, image_path="a.png"),
                frame(height=32, width=64, image_path="b.png")]
    )  # fmt: skip
    with pytest.raises(ValueError, match="b.png: 64x32"):
        refiner_training.project_arrays(project)


def test_engine_runs_the_refiner_inside_its_executable():
    import jax
    import jax.numpy as jnp

    from tavr_jax.infer import onnx_export
    from tavr_jax.infer.engine import KeypointEngine

    plain = KeypointEngine.random_init("paper11", "resnet_tiny", 32, head="heatmap")
    k = plain.schema.num_points
    model = refine.PatchRefiner(k, width=4)
    params = model.init(jax.random.key(1), jnp.zeros((1, 16, 16)), jnp.zeros((1,), jnp.int32))
    engine = KeypointEngine(plain.model, plain.variables, plain.meta, refiner=(model, params, 16))
    frames = np.random.default_rng(0).integers(0, 255, (2, 96, 80)).astype(np.uint8)
    first, second = plain(frames), engine(frames)
    want = refine.refine_points(model, params, frames, first["coords"], size=16)
    np.testing.assert_allclose(second["coords"], want, rtol=1e-5, atol=1e-3)
    assert not np.allclose(second["coords"], first["coords"])
    np.testing.assert_array_equal(second["visibility"], first["visibility"])
    with pytest.raises(ValueError, match="no second stage"):
        onnx_export.check_supported(engine.meta)


def test_workdir_refiner_warns_when_it_made_validation_worse(tmp_path, caplog):
    import jax
    import jax.numpy as jnp

    names = ["A", "B"]
    model = refine.PatchRefiner(len(names), width=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16)), jnp.zeros((1,), jnp.int32))
    config = refiner_files.RefinerConfig(patch=16, width=4)
    for before, after, warned in ((9.0, 4.5, False), (4.8, 6.0, True), (None, None, False)):
        validation = None if before is None else {"mean_error_before": before,
                                                  "mean_error_after": after}  # fmt: skip
        refiner_files.save_refiner(tmp_path / "refiner", params, config, names,
                                   validation=validation)  # fmt: skip
        caplog.clear()
        _, _, patch = refiner_files.workdir_refiner(tmp_path, names)
        assert patch == 16
        assert ("raised the mean error (4.8 -> 6.0 px" in caplog.text) == warned, caplog.text
    meta = tmp_path / "refiner" / "refiner.json"
    meta.write_text(meta.read_text().replace('"points"', '"validation": "bad", "points"'))
    with pytest.raises(ValueError, match="refiner.json: unreadable"):
        refiner_files.workdir_refiner(tmp_path, names)
