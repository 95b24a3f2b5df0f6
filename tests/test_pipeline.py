"""TFDS array_record builder (no TensorFlow) and grain loader, on a tiny written project."""

import json
import shutil
import sys

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from tavr_jax.data import pipeline, records, supervisely
from tavr_jax.schema import get_schema

SCHEMA = get_schema("paper11")
K = SCHEMA.num_points
S = 32
# Per case: (height, width); the first case is already at the training size, so its points
# must come through bit for bit.
SIZES = [(32, 32), (48, 40), (40, 64), (64, 64), (24, 36), (32, 32)]
FRAMES_PER_CASE = 3


def _frames():
    rng = np.random.default_rng(0)
    frames = []
    for c, (h, w) in enumerate(SIZES):
        for f in range(FRAMES_PER_CASE):
            image = rng.integers(0, 256, (h, w), np.uint8)
            visibility = rng.random(K) < 0.6
            # Fractional coordinates, as real annotation tools export them.
            coords = np.round(rng.uniform(0, 1, (K, 2)) * [w - 1, h - 1], 3) * visibility[:, None]
            spacing = 0.2 + 0.01 * c if c % 2 else None
            frames.append(
                supervisely.AnnotatedFrame(
                    f"case{c}",
                    f"{f:04d}.png",
                    image,
                    visibility,
                    coords,
                    spacing,
                    stage="aortogram",
                )
            )
    return frames


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("tavr") / "project"
    supervisely.write_project(root, SCHEMA, _frames())
    return root


@pytest.fixture(scope="module")
def tfds_dir(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds") / "frames"
    return records.build_tfds(project, out, image_size=S, schema=SCHEMA, seed=0, val_fraction=0.3)


def _annotations(project):
    """Independent reference: the annotation JSON and PNG files, read directly."""
    ref = {}
    for ann in project.glob("*/ann/*.json"):
        data = json.loads(ann.read_text())
        h, w = data["size"]["height"], data["size"]["width"]
        vis = np.zeros(K, np.float32)
        xy = np.zeros((K, 2), np.float64)
        for obj in data["objects"]:
            k = SCHEMA.index(obj["classTitle"])
            vis[k] = 1
            xy[k] = obj["points"]["exterior"][0]
        spacing = {t["name"]: t["value"] for t in data["tags"]}.get("pixel_spacing_mm", 0.0)
        image = cv2.imread(str(ann.parent.parent / "img" / ann.name[:-5]), cv2.IMREAD_GRAYSCALE)
        ref[(ann.parent.parent.name, ann.name[:-5])] = dict(
            vis=vis, xy=xy, h=h, w=w, spacing=spacing, image=image
        )
    return ref


def test_build_without_tensorflow_and_examples_match_annotations(project, tfds_dir):
    assert "tensorflow" not in sys.modules  # tfds ran on its NumPy paths only
    builder = tfds.builder_from_directory(str(tfds_dir))
    assert set(builder.info.splits) == {"train", "validation"}
    ref = _annotations(project)
    cases = supervisely.split_cases([f"case{c}" for c in range(len(SIZES))], val_fraction=0.3)
    seen = set()
    for split, names in (("train", cases["train"]), ("validation", cases["val"])):
        source = builder.as_data_source(split)  # TFDS's own decoder
        for i in range(len(source)):
            ex = source[i]
            key = (ex["case_id"].decode(), ex["frame_name"].decode())
            assert key[0] in names and key not in seen
            seen.add(key)
            r = ref[key]
            resized = cv2.resize(r["image"], (S, S), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(ex["image"], resized)
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (S, S)
            np.testing.assert_array_equal(ex["visible"], r["vis"])
            expected = (r["xy"] * [S / r["w"], S / r["h"]]).astype(np.float32)
            np.testing.assert_allclose(ex["coords"], expected, rtol=1e-6)
            if (r["h"], r["w"]) == (S, S):  # native size: exactly the annotated numbers
                np.testing.assert_array_equal(ex["coords"], r["xy"].astype(np.float32))
            np.testing.assert_array_equal(ex["orig_size"], [r["h"], r["w"]])
            assert ex["pixel_spacing"] == pytest.approx(r["spacing"])
            back = records.to_original_pixels(ex["coords"], ex["orig_size"], S)
            np.testing.assert_allclose(back, r["xy"], atol=1e-3)
    assert seen == set(ref)
    meta = records.read_tfds_meta(tfds_dir)
    assert meta["image_size"] == S and meta["schema"]["name"] == "paper11"
    assert meta["split"]["cases"]["validation"] == cases["val"]


def test_fast_decoder_matches_tfds_decoder(tfds_dir):
    reference = tfds.builder_from_directory(str(tfds_dir)).as_data_source("train")
    ours = pipeline.open_split(tfds_dir, "train")
    assert len(ours) == len(reference)
    for i in range(len(ours)):
        a, b = ours[i], reference[i]
        for key, dtype in records.TRAINING_DTYPES.items():
            assert a[key].dtype == dtype
            np.testing.assert_array_equal(a[key], np.asarray(b[key], dtype))
        assert a["case_id"] == b["case_id"].decode() and a["stage"] == "aortogram"


def test_a_dataset_built_before_the_rename_reads_its_flag_as_visible(
    project, tfds_dir, tmp_path, monkeypatch
):
    """Datasets built before 1.1.0 stored the annotation flag as "visibility"."""
    features, example = records._features, records.frame_example
    monkeypatch.setattr(
        records,
        "_features",
        lambda *a: tfds.features.FeaturesDict(
            {("visibility" if k == "visible" else k): v for k, v in features(*a).items()}
        ),
    )
    monkeypatch.setattr(
        records,
        "frame_example",
        lambda *a: {("visibility" if k == "visible" else k): v for k, v in example(*a).items()},
    )
    old = records.build_tfds(
        project, tmp_path / "old", image_size=S, schema=SCHEMA, seed=0, val_fraction=0.3
    )
    assert "visibility" in tfds.builder_from_directory(str(old)).info.features
    monkeypatch.undo()
    then, now = pipeline.open_split(old, "train"), pipeline.open_split(tfds_dir, "train")
    assert len(then) == len(now)
    for i in range(len(now)):
        for key in records.TRAINING_DTYPES:
            np.testing.assert_array_equal(then[i][key], now[i][key])
    assert then[0]["visible"].sum() > 0


def _collect(loader):
    return [b for b in loader]


def _by_image(batches):
    """Examples keyed by their image bytes, to compare sources that order frames differently."""
    out = {}
    for b in batches:
        for i in range(len(b["image"])):
            out[b["image"][i].tobytes()] = {k: v[i] for k, v in b.items()}
    return out


def test_tfds_and_project_loaders_agree_and_cover_each_frame_once(project, tfds_dir):
    kw = dict(batch_size=4, seed=1, num_epochs=1, drop_remainder=False)
    from_tfds = _collect(pipeline.make_loader(tfds_dir, "all", **kw))
    from_project = _collect(pipeline.make_loader(project, "all", image_size=S, **kw))
    n = len(SIZES) * FRAMES_PER_CASE
    assert sum(len(b["image"]) for b in from_tfds) == n
    assert [len(b["image"]) for b in from_tfds] == [4] * (n // 4) + [n % 4]
    for b in from_tfds:
        assert set(b) == set(records.TRAINING_DTYPES)
        for key, dtype in records.TRAINING_DTYPES.items():
            assert b[key].dtype == dtype
        assert b["coords"].shape[1:] == (K, 2) and b["image"].shape[1:] == (S, S)
    a, b = _by_image(from_tfds), _by_image(from_project)
    assert len(a) == n and a.keys() == b.keys()
    for key in a:
        for field in records.TRAINING_DTYPES:
            np.testing.assert_array_equal(a[key][field], b[key][field])


def test_shuffle_is_seeded_and_epochs_differ(tfds_dir):
    def two_epochs(seed):  # 12 training frames: 6 batches of 2 per epoch
        it = pipeline.make_loader(tfds_dir, "train", batch_size=2, seed=seed)
        images = np.concatenate([next(it)["image"] for _ in range(12)])
        return images[:12], images[12:]

    (a1, a2), (b1, _), (c1, _) = two_epochs(3), two_epochs(3), two_epochs(4)
    np.testing.assert_array_equal(a1, b1)
    assert not np.array_equal(a1, c1)
    assert not np.array_equal(a1, a2)  # each epoch reshuffled ...
    key = lambda images: sorted(im.tobytes() for im in images)
    assert key(a1) == key(a2) == key(c1)  # ... over the same frames


@pytest.mark.parametrize("num_workers", [0, 1])
def test_restored_iterator_state_resumes_with_the_exact_next_batch(tfds_dir, num_workers):
    it = pipeline.make_loader(tfds_dir, "train", batch_size=3, seed=0, num_workers=num_workers)
    for _ in range(5):  # past the end of the first epoch (12 frames)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = pipeline.make_loader(tfds_dir, "train", batch_size=3, seed=0, num_workers=num_workers)
    fresh.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    if num_workers:
        it.close()
        fresh.close()


def test_bad_inputs_give_clear_errors(project, tfds_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        pipeline.make_loader(tmp_path / "missing", "train", batch_size=2, seed=0)
    with pytest.raises(ValueError, match="needs image_size"):
        pipeline.make_loader(project, "train", batch_size=2, seed=0)
    with pytest.raises(ValueError, match="no split 'test'"):
        pipeline.make_loader(tfds_dir, "test", batch_size=2, seed=0)
    with pytest.raises(ValueError, match="stored at 32 px but image_size=64"):
        pipeline.make_loader(tfds_dir, "train", batch_size=2, seed=0, image_size=64)
    with pytest.raises(ValueError, match="built for schema 'paper11'"):
        pipeline.make_loader(tfds_dir, "train", batch_size=2, seed=0, schema="reference10")
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.make_loader(tfds_dir, "train", batch_size=0, seed=0)


def _writer_options(tfds_dir):
    (shard,) = tfds_dir.glob("*-train.array_record-*")
    return array_record_module.ArrayRecordReader(str(shard)).writer_options_string()


def test_rebuild_replaces_the_output_folder(project, tmp_path):
    out = tmp_path / "ds"
    records.build_tfds(project, out, image_size=16, val_fraction=0.0, compress=True)
    assert "zstd" in _writer_options(out)
    records.build_tfds(project, out, image_size=S, val_fraction=0.3)
    assert "uncompressed" in _writer_options(out)
    builder = tfds.builder_from_directory(str(out))
    assert builder.info.features["image"].shape == (S, S)
    assert set(builder.info.splits) == {"train", "validation"}
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folders left


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_build_refuses_an_output_that_overlaps_the_project(project, where):
    before = _files(project)
    out = {"same": project, "parent": project.parent, "inside": project / "tfds"}[where]
    with pytest.raises(ValueError, match="--out .*(is or contains|inside) the source project"):
        records.build_tfds(project, out, image_size=16, val_fraction=0.0)
    assert _files(project) == before  # nothing of the project was touched


def test_build_refuses_a_foreign_non_empty_output_unless_overwrite(project, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's own file")
    with pytest.raises(ValueError, match="not a dataset written by build_tfds.*--overwrite"):
        records.build_tfds(project, out, image_size=16, val_fraction=0.0)
    assert (out / "notes.txt").read_text() == "a user's own file"
    records.build_tfds(project, out, image_size=16, val_fraction=0.0, overwrite=True)
    assert records.is_tfds_dir(out) and not (out / "notes.txt").exists()
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        records.build_tfds(project, file_out, image_size=16, val_fraction=0.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert records.is_tfds_dir(records.build_tfds(project, empty, image_size=16, val_fraction=0))


def test_build_warns_about_frames_copied_across_splits(project, tmp_path, caplog):
    copy = tmp_path / "with_copy"
    shutil.copytree(project, copy)
    shutil.copytree(copy / "case0", copy / "case0_copy")
    cases = sorted(p.name for p in copy.iterdir() if p.is_dir())

    def apart(seed):
        split = supervisely.split_cases(cases, seed=seed, val_fraction=0.5)
        return ("case0" in split["train"]) != ("case0_copy" in split["train"])

    seed = next(s for s in range(50) if apart(s))
    out = records.build_tfds(copy, tmp_path / "ds", image_size=16, val_fraction=0.5, seed=seed)
    leaks = records.read_tfds_meta(out)["frames_in_several_splits"]
    assert leaks == [[f"case0/{i:04d}.png", f"case0_copy/{i:04d}.png"] for i in range(3)]
    assert any("appear in more than one split" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["tfds", "project"])
def test_in_memory_loader_serves_the_same_batches_as_reading_on_demand(project, tfds_dir, kind):
    # The project split as the TFDS folder was built: 12 training frames.
    kw = {} if kind == "tfds" else {"image_size": S, "val_fraction": 0.3}
    source = tfds_dir if kind == "tfds" else project
    decoded = pipeline.open_frames(source, "train", in_memory=True, decode_threads=3, **kw)
    assert isinstance(decoded, pipeline.DecodedFrames)
    on_demand = pipeline.open_frames(source, "train", in_memory=False, **kw)
    assert len(decoded) == len(on_demand) == 12
    for i in range(len(decoded)):  # the decoded arrays hold exactly each example
        for key, dtype in records.TRAINING_DTYPES.items():
            assert decoded[i][key].dtype == dtype
            np.testing.assert_array_equal(decoded[i][key], on_demand[i][key])
    assert decoded.nbytes == pipeline.decoded_size(on_demand)
    loaders = [
        pipeline.make_loader(source, "train", batch_size=5, seed=2, in_memory=m, **kw)
        for m in (True, False)
    ]
    for _ in range(6):  # past two epoch boundaries
        a, b = (next(it) for it in loaders)
        assert set(a) == set(b) == set(records.TRAINING_DTYPES)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("in_memory", [True, False])
def test_each_process_reads_its_rows_of_the_global_batch(tfds_dir, in_memory):
    # 18 frames in batches of 4: the last global batch has 2 frames, so process 1 of 2 gets
    # only padding there, and process 0 of 4 a single padded row.
    kw = dict(batch_size=4, seed=5, num_epochs=1, drop_remainder=False, in_memory=in_memory)
    whole = _collect(pipeline.make_loader(tfds_dir, "all", **kw))
    for count in (2, 4):
        parts = [
            _collect(
                pipeline.make_loader(tfds_dir, "all", process_index=i, process_count=count, **kw)
            )
            for i in range(count)
        ]
        assert all(len(p) == len(whole) for p in parts)
        for step, want in enumerate(whole):
            rows = [p[step] for p in parts]
            assert all(len(r["image"]) == 4 // count for r in rows)
            valid = np.concatenate([r["valid"] for r in rows])
            assert valid.sum() == len(want["image"]) and valid[: len(want["image"])].all()
            for key in records.TRAINING_DTYPES:
                got = np.concatenate([r[key] for r in rows])
                np.testing.assert_array_equal(got[valid], want[key])
                assert not got[~valid].any()  # padding is zeros


def test_process_options_are_checked(tfds_dir):
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.make_loader(tfds_dir, "train", batch_size=4, seed=0, process_count=3)
    with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
        pipeline.make_loader(
            tfds_dir, "train", batch_size=4, seed=0, process_index=2, process_count=2
        )


def test_batches_run_through_epochs_in_their_seeded_orders(tfds_dir):
    # 12 training frames, batches of 5 over 2 epochs: 24 positions, the last batch short.
    it = pipeline.make_loader(
        tfds_dir, "train", batch_size=5, seed=7, num_epochs=2, drop_remainder=False
    )
    frames = pipeline.open_split(tfds_dir, "train", with_ids=False)
    images = np.concatenate([b["image"] for b in it])
    order = np.concatenate([np.random.default_rng([7, e]).permutation(12) for e in range(2)])
    np.testing.assert_array_equal(images, np.stack([frames[i]["image"] for i in order]))
