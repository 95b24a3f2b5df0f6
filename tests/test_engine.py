"""The compiled inference engine: coordinate mapping, batching, no retracing, export."""

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tavr_jax.infer import engine as engine_lib
from tavr_jax.infer import streams
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")
K, G = SCHEMA.num_points, SCHEMA.num_groups


class SpotNet(nn.Module):
    """A stand-in network obeying the model contract: every point = the brightest spot."""

    num_points: int
    num_groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype) / 255.0  # (B, S, S)
        b, sh, sw = x.shape
        # Intensity centroid above the (flat) background: linear resampling preserves it.
        x32 = x.astype(jnp.float32)
        w = x32 - jnp.min(x32, axis=(1, 2), keepdims=True)
        w = w / jnp.maximum(jnp.sum(w, axis=(1, 2), keepdims=True), 1e-6)
        xs = (jnp.arange(sw) + 0.5) / sw
        ys = (jnp.arange(sh) + 0.5) / sh
        cx = jnp.sum(w * xs[None, None, :], axis=(1, 2))
        cy = jnp.sum(w * ys[None, :, None], axis=(1, 2))
        coords = jnp.broadcast_to(jnp.stack([cx, cy], -1)[:, None, :], (b, self.num_points, 2))
        feat = jnp.stack([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], -1)
        return {
            "visibility_logits": nn.Dense(self.num_points, dtype=self.dtype)(feat),
            "group_logits": nn.Dense(self.num_groups, dtype=self.dtype)(feat),
            "coords": coords,
        }


def _engine(batch_size=2, dtype="float32", image_size=32):
    model = SpotNet(K, G)
    variables = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size)))
    meta = {"schema": SCHEMA, "backbone": "spot", "image_size": image_size}
    return engine_lib.KeypointEngine(model, variables, meta, batch_size=batch_size, dtype=dtype)


def _spot_frames(rng, n, h, w):
    """Dark frames with one bright 5x5 spot each; returns frames and spot centres (x, y)."""
    frames = np.full((n, h, w), 10, np.uint8)
    centres = np.zeros((n, 2))
    for i in range(n):
        x0, y0 = rng.integers(8, w - 13), rng.integers(8, h - 13)
        frames[i, y0 : y0 + 5, x0 : x0 + 5] = 250
        centres[i] = (x0 + 2.5, y0 + 2.5)  # pixel centres are at +0.5
    return frames, centres


def test_coords_are_original_frame_pixels():
    # A 48x80 frame is resized to 32x32 inside the executable; the spot centre must come
    # back in the original frame's pixels, so the mapping is checked against hand geometry.
    rng = np.random.default_rng(0)
    frames, centres = _spot_frames(rng, 3, 48, 80)
    out = _engine()(frames)
    assert out["coords"].shape == (3, K, 2)
    assert out["visibility"].shape == (3, K) and out["group"].shape == (3, G)
    np.testing.assert_allclose(out["coords"][:, 0], centres, atol=0.05)
    assert np.all((out["visibility"] > 0) & (out["visibility"] < 1))


def test_matches_uncompiled_reference_and_pads_last_batch():
    rng = np.random.default_rng(1)
    frames, _ = _spot_frames(rng, 5, 40, 40)
    eng = _engine(batch_size=2)
    out = eng(frames)  # chunks of 2, 2, 1 (zero-padded)
    x = jax.image.resize(jnp.asarray(frames, jnp.float32), (5, 32, 32), "linear", antialias=True)
    ref = eng.model.apply(eng.variables, x)
    np.testing.assert_allclose(
        out["visibility"], 1 / (1 + np.exp(-np.asarray(ref["visibility_logits"]))), rtol=1e-5
    )
    np.testing.assert_allclose(out["coords"], np.asarray(ref["coords"]) * 40.0, rtol=1e-5)


def test_traces_once_per_frame_size():
    eng = _engine(batch_size=2)
    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 2, 1, 4):
        eng(_spot_frames(rng, n, 40, 40)[0])
    assert eng.trace_count == 1
    eng(_spot_frames(rng, 1, 48, 64)[0])
    assert eng.trace_count == 2
    assert len(eng._compiled) == 2


def test_a_batch_one_view_shares_weights_and_runs_one_frame_unpadded():
    eng = _engine(batch_size=8)
    frames, _ = _spot_frames(np.random.default_rng(3), 1, 40, 40)
    one = eng.with_batch_size(1)
    assert one.batch_size == 1 and eng.batch_size == 8 and one.variables is eng.variables
    got, want = one(frames), eng(frames)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert {k[0] for k in eng._compiled} == {1, 8}  # one executable per batch, shared
    with pytest.raises(ValueError, match="batch_size"):
        eng.with_batch_size(0)


def test_bfloat16_close_to_float32():
    rng = np.random.default_rng(3)
    frames, centres = _spot_frames(rng, 4, 64, 64)
    a = _engine(dtype="float32")(frames)
    b = _engine(dtype="bfloat16")(frames)
    np.testing.assert_allclose(b["visibility"], a["visibility"], atol=0.02)
    np.testing.assert_allclose(b["coords"], a["coords"], atol=1.0)


@pytest.mark.parametrize("batch", [2, None])
def test_export_round_trip(tmp_path, batch):
    rng = np.random.default_rng(4)
    frames, _ = _spot_frames(rng, 2, 40, 56)
    eng = _engine(batch_size=2)
    path = eng.export(tmp_path / "engine.bin", 40, 56, batch=batch)
    loaded = engine_lib.load_exported(path)
    assert loaded.schema.point_names == SCHEMA.point_names
    got, want = loaded(frames), eng(frames)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    if batch is None:  # symbolic batch: any number of frames
        assert loaded(frames[:1])["coords"].shape == (1, K, 2)


def test_load_exported_rejects_other_files(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"not an engine")
    with pytest.raises(ValueError, match="x.bin"):
        engine_lib.load_exported(bad)


def test_check_meta_names_the_mismatch():
    meta = {"schema": SCHEMA, "backbone": "resnet34"}
    engine_lib.check_meta(meta, "W", schema="paper11", backbone="resnet34")
    with pytest.raises(ValueError, match="reference10"):
        engine_lib.check_meta(meta, "W", schema="reference10")
    with pytest.raises(ValueError, match="resnet50"):
        engine_lib.check_meta(meta, "W", backbone="resnet50")


def test_bad_frames_rejected():
    with pytest.raises(ValueError, match="uint8"):
        _engine()(np.zeros((1, 8, 8), np.float32))


def test_decoding_overlaps_inference():
    # Proof of overlap without timing: batch t's inference blocks until the decoder thread
    # has produced frame t+1. A sequential pipeline would deadlock (and time out here).
    decoded = [threading.Event() for _ in range(6)]
    rng = np.random.default_rng(5)
    frames, _ = _spot_frames(rng, 6, 32, 32)

    def source():
        for i in range(6):
            yield streams.Frame(i, i / 10, frames[i], None)
            decoded[i].set()

    eng = _engine(batch_size=1)
    order = []

    def gated(batches):
        for tag, dev in batches:
            t = tag[0].index
            if t + 1 < 6:
                assert decoded[t + 1].wait(timeout=20), "decoding did not run ahead of inference"
            order.append(t)
            yield tag, dev

    batches = streams.prefetch_to_device(source(), batch_size=1, device=eng.device, depth=2)
    results = list(eng.run_batches(gated(batches)))
    assert order == list(range(6))
    got = np.concatenate([r["coords"] for _, r in results])
    np.testing.assert_allclose(got, eng(frames)["coords"], rtol=1e-6)


def test_real_network_bfloat16_variant():
    # The project's own network (test-size ResNet): the bf16 engine recasts module and weights.
    frames = np.random.default_rng(6).integers(0, 256, (2, 64, 80), np.uint8)
    a = engine_lib.KeypointEngine.random_init("paper11", "resnet_tiny", 32, batch_size=2)
    b = engine_lib.KeypointEngine.random_init(
        "paper11", "resnet_tiny", 32, batch_size=2, dtype="bfloat16"
    )
    assert b.model.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree_util.tree_leaves(b.variables["params"]))
    ra, rb = a(frames), b(frames)
    assert ra["coords"].shape == (2, K, 2) and rb["coords"].dtype == np.float32
    np.testing.assert_allclose(rb["visibility"], ra["visibility"], atol=0.01)
    np.testing.assert_allclose(rb["coords"], ra["coords"], atol=0.5)  # pixels of an 80x64 frame
