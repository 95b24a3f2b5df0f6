"""A Supervisely project as an array_record TFDS dataset of training frames (no TensorFlow).

`build_tfds` converts any Supervisely project into TFDS array_record files with the frames
already resized to the training resolution S (uint8 `Tensor` features, decoded with NumPy
only); `TfdsFrames` reads one split back by index. Every example is in the training layout:

    image (S, S) uint8, visible (K,) float32 (0/1), coords (K, 2) float32 (pixels of the S x S
    input, 0 where invisible), orig_size (2,) int32 (H, W), pixel_spacing () float32

Coordinates scale with the image: x_S = x * S / W, y_S = y * S / H (continuous pixel
coordinates, so x / W is the same number at every resolution); `to_original_pixels` undoes it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core.utils import tqdm_utils
from tensorflow_datasets.proto import tf_example_pb2
from tqdm import tqdm

from cardiac_core.tempfiles import make_temp_dir, remove_stale
from tavr_jax.data import supervisely
from tavr_jax.schema import KeypointSchema, get_schema

TRAINING_DTYPES = {
    "image": np.uint8,
    "visible": np.float32,
    "coords": np.float32,
    "orig_size": np.int32,
    "pixel_spacing": np.float32,
}
# Datasets built before 1.1.0 stored the annotation flag as "visibility", the name the
# engine now keeps for its probability; they are read under the new name.
_STORED_NAMES = {"visible": ("visible", "visibility")}
META_FILE = "tavr_meta.json"  # schema, image size and reader counts, beside dataset_info.json
_TFDS_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def to_input_pixels(coords: np.ndarray, orig_size: np.ndarray, image_size: int) -> np.ndarray:
    """(..., K, 2) original-image pixels -> pixels of the S x S network input."""
    h, w = np.moveaxis(np.asarray(orig_size, np.float64), -1, 0)
    scale = np.stack([image_size / w, image_size / h], -1)[..., None, :]
    return (np.asarray(coords, np.float64) * scale).astype(np.float32)


def to_original_pixels(coords: np.ndarray, orig_size: np.ndarray, image_size: int) -> np.ndarray:
    """(..., K, 2) pixels of the S x S network input -> pixels of the original image."""
    h, w = np.moveaxis(np.asarray(orig_size, np.float64), -1, 0)
    scale = np.stack([w / image_size, h / image_size], -1)[..., None, :]
    return (np.asarray(coords, np.float64) * scale).astype(np.float32)


def frame_example(image: np.ndarray, record: supervisely.FrameRecord, image_size: int) -> dict:
    """One frame at the training resolution, in the training-batch layout (plus ids)."""
    h, w = image.shape
    if (h, w) != (image_size, image_size):
        # INTER_AREA averages the source pixels each output pixel covers (no aliasing).
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    visible = np.asarray(record.visible, np.float32)
    coords = to_input_pixels(record.coords, (h, w), image_size)
    coords = np.where(visible[:, None] > 0, coords, 0).astype(np.float32)
    return {
        "image": np.ascontiguousarray(image, np.uint8),
        "visible": visible,
        "coords": coords,
        "orig_size": np.array([h, w], np.int32),
        "pixel_spacing": np.float32(record.pixel_spacing_mm or 0.0),
        "case_id": record.case_id,
        "frame_name": record.frame_name,
        "stage": record.stage or "",
    }


def _features(schema: KeypointSchema, image_size: int) -> tfds.features.FeaturesDict:
    k, s = schema.num_points, image_size
    tensor = tfds.features.Tensor
    return tfds.features.FeaturesDict(
        {
            # Raw bytes: the default encoding widens every pixel to an int64 varint, which
            # is 1.5x larger on disk and parses 3x slower.
            "image": tensor(shape=(s, s), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
            "visible": tensor(shape=(k,), dtype=np.float32),
            "coords": tensor(shape=(k, 2), dtype=np.float32),
            "orig_size": tensor(shape=(2,), dtype=np.int32),
            "pixel_spacing": tensor(shape=(), dtype=np.float32),
            "case_id": tfds.features.Text(),
            "frame_name": tfds.features.Text(),
            "stage": tfds.features.Text(),
        }
    )


class TavrFrames(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over a Supervisely project; built with NumPy/protobuf only (no TF)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Frames resized to the training resolution, uint8 Tensor.",
        "1.1.0": 'The annotation flag is "visible" (was "visibility"; both are read).',
    }

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No checksums or metadata files beside the code; TFDS's own lookup of this path
        # imports the optional `importlib_resources` package.
        return None

    def __init__(
        self,
        *,
        projects: dict[str, supervisely.Project],
        image_size: int,
        progress: bool = False,
        **kwargs,
    ):
        self._projects = projects  # TFDS split name -> Project
        self._image_size = image_size
        self._progress = progress
        self._schema = next(iter(projects.values())).schema
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` looks for a package folder of
        # metadata files that a builder defined in a module does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"TAVR keypoint frames ({self._schema.name}) at {self._image_size} px.",
            features=_features(self._schema, self._image_size),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data is local
        return {
            name: self._generate_examples(project, name) for name, project in self._projects.items()
        }

    def _generate_examples(self, project: supervisely.Project, name: str = "") -> Iterator:
        # Our own bar, one per split: TFDS's bars and messages are off (see `_quiet_tfds`).
        bar = tqdm(project.frames, desc=f"build {name}", unit="frame", disable=not self._progress)
        for i, record in enumerate(bar):
            example = frame_example(project.load_image(i), record, self._image_size)
            yield f"{record.case_id}/{record.frame_name}", example


def build_tfds(
    data_dir: os.PathLike,
    out_dir: os.PathLike,
    *,
    image_size: int,
    schema: KeypointSchema | str = "paper11",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    compress: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> pathlib.Path:
    """Converts a Supervisely project into an array_record TFDS dataset in `out_dir`.

    Splits train / validation / test are by case, from `supervisely.split_cases`; empty
    splits are left out. `out_dir` is replaced as a whole once the new dataset is complete,
    and is readable with `tfds.builder_from_directory(out_dir).as_data_source(split)`.
    compress=False stores records uncompressed: 1.4x the disk of TFDS's zstd, 3-4x faster
    reads (decompression is most of the host's cost per frame).

    `out_dir` may not be, contain or lie inside the project, and an existing non-empty
    `out_dir` is replaced only when it is a dataset written here or `overwrite` is set: the
    replaced folder is deleted, so a wrong `--out` must never reach anyone's data.

    The new dataset is built in a hidden folder beside `out_dir` (`.<name>.<pid>.<random>`),
    removed whatever happens; those of killed builds are removed by the next build. A failure
    (a full disk, a read-only folder) leaves `out_dir` as it was and raises an OSError naming
    `out_dir`. progress: a bar per split.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    schema = get_schema(schema) if isinstance(schema, str) else schema
    out_dir = pathlib.Path(out_dir).absolute()
    check_output_dir(out_dir, data_dir, overwrite=overwrite)
    split_kw = dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    projects = {
        name: supervisely.read_project(data_dir, schema, split=split, **split_kw)
        for split, name in (("train", "train"), ("val", "validation"), ("test", "test"))
    }
    projects = {name: p for name, p in projects.items() if p.frames}
    if "train" not in projects:
        raise ValueError(f"{data_dir}: no frames in the training split")
    everything = supervisely.read_project(data_dir, schema, split="all")
    split_of_case = {case: name for name, p in projects.items() for case in p.cases}
    leaks = supervisely.warn_about_copies(everything, split_of_case)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # The temporaries of killed builds into this folder (their PID is dead).
    remove_stale(out_dir.parent, [out_dir.name], what="temporary folders")
    try:
        tmp = make_temp_dir(out_dir.parent, out_dir.name)
    except OSError as e:  # its message would name a hidden folder that does not exist
        raise type(e)(e.errno, e.strerror or str(e), str(out_dir.parent)) from None
    try:
        builder = TavrFrames(projects=projects, image_size=image_size, progress=progress,
                             data_dir=str(tmp), file_format="array_record")  # fmt: skip
        with _quiet_tfds():
            builder.download_and_prepare()
        built = pathlib.Path(builder.data_path)
        if not compress:
            for shard in built.glob("*.array_record-*"):
                _rewrite_array_record(shard, "group_size:1,uncompressed")
        meta = {
            "schema": schema.to_json(),
            "image_size": image_size,
            "source": str(pathlib.Path(data_dir).absolute()),
            "split": {**split_kw, "cases": {n: p.cases for n, p in projects.items()}},
            "reader_counts": everything.counts,
            "frames_in_several_splits": leaks,
        }
        (built / META_FILE).write_text(json.dumps(meta, indent=1))
        _swap_in(built, out_dir, tmp)
    except OSError as e:
        # Errors inside the temporary folder name a path that is gone once it is removed.
        if e.errno is not None and (e.filename is None or str(tmp) in str(e.filename)):
            raise type(e)(e.errno, e.strerror or str(e), str(out_dir)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _swap_in(built: pathlib.Path, out_dir: pathlib.Path, tmp: pathlib.Path) -> None:
    """Replaces `out_dir` by `built` (two renames); the earlier dataset stays if this fails."""
    old = None
    if out_dir.exists():
        old = tmp / "previous"
        os.replace(out_dir, old)
    try:
        os.replace(built, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS prints its progress bars and two messages to stdout: shown only when its logging
    is (the launchers' `--verbosity`), since `build_tfds` has a bar of its own."""
    if logging.getLogger("absl").isEnabledFor(logging.INFO):
        yield
        return
    was = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(was)


def check_output_dir(out_dir: os.PathLike, data_dir: os.PathLike, *, overwrite: bool) -> None:
    """Raises a one-line ValueError unless `out_dir` may be (re)written by `build_tfds`."""
    out = pathlib.Path(out_dir).resolve()
    data = pathlib.Path(data_dir).resolve()
    if out == data or out in data.parents:
        raise ValueError(
            f"--out {out_dir} is or contains the source project {data_dir}; "
            "writing the dataset there would delete the project. Choose another folder."
        )
    if data in out.parents:
        raise ValueError(
            f"--out {out_dir} lies inside the source project {data_dir}, where it would be "
            "read as a case. Choose a folder outside the project."
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not is_tfds_dir(out):
        raise ValueError(
            f"--out {out_dir} is a non-empty folder that is not a dataset written by "
            "build_tfds; it would be replaced as a whole. Pass --overwrite to replace it, or "
            "choose an empty or new folder."
        )


def _rewrite_array_record(path: pathlib.Path, options: str, chunk: int = 256) -> None:
    """Rewrites one array_record shard with other writer options (same records, same order)."""
    reader = array_record_module.ArrayRecordReader(str(path))
    tmp = path.with_name(path.name + ".rewrite")
    writer = array_record_module.ArrayRecordWriter(str(tmp), options)
    n = reader.num_records()
    for start in range(0, n, chunk):
        for record in reader.read(list(range(start, min(n, start + chunk)))):
            writer.write(record)
    writer.close()
    reader.close()
    os.replace(tmp, path)


def is_tfds_dir(path: os.PathLike) -> bool:
    """True for a folder written by `build_tfds` (TFDS's info and our side file)."""
    path = pathlib.Path(path)
    return (path / "dataset_info.json").is_file() and (path / META_FILE).is_file()


def read_tfds_meta(tfds_dir: os.PathLike) -> dict:
    """The side file `build_tfds` writes: schema JSON, image_size, split cases, reader counts."""
    path = pathlib.Path(tfds_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the dataset's side file ({e})") from None


class TfdsFrames(Sequence):
    """A grain random-access source over one split of a `build_tfds` dataset.

    Reads raw records and decodes the few fields itself: TFDS's generic NumPy decoder costs
    about 1 ms per frame in Python bookkeeping, several times the read itself. The file
    handles open lazily, so the source pickles cheaply into grain worker processes.
    """

    def __init__(self, tfds_dir: os.PathLike, split: str, *, with_ids: bool = False):
        self.tfds_dir = str(tfds_dir)
        self.split = split
        self.with_ids = with_ids
        builder = tfds.builder_from_directory(self.tfds_dir)
        names = list(builder.info.splits)
        self._tfds_split = "+".join(names) if split == "all" else _TFDS_SPLITS.get(split, split)
        features = builder.info.features
        self._stored = {}  # training key -> the name this dataset stores it under
        for key in TRAINING_DTYPES:
            found = [n for n in _STORED_NAMES.get(key, (key,)) if n in features]
            if not found:
                raise ValueError(f"{tfds_dir}: no feature {key!r}; rebuild it with build_tfds")
            self._stored[key] = found[0]
        self._specs = {
            k: (features[n].shape, np.dtype(features[n].np_dtype)) for k, n in self._stored.items()
        }
        self._records = None
        try:
            self._length = len(self._open())
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"{tfds_dir}: no split {split!r} (has {', '.join(names)}): {e}"
            ) from None

    def _open(self):
        if self._records is None:
            builder = tfds.builder_from_directory(self.tfds_dir)
            self._records = builder.as_data_source(
                self._tfds_split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
            )
        return self._records

    def __getstate__(self):
        return {**self.__dict__, "_records": None}

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        return self.decode(self._open()[index])

    def decode(self, record: bytes) -> dict:
        """One serialized example -> dict of numpy arrays (and id strings if with_ids)."""
        feature = tf_example_pb2.Example.FromString(record).features.feature
        out = {}
        for key, dtype in TRAINING_DTYPES.items():
            shape, stored = self._specs[key]
            f = feature[self._stored[key]]
            if f.HasField("bytes_list"):  # Encoding.BYTES: raw little-endian array
                value = np.frombuffer(f.bytes_list.value[0], stored)
            elif f.HasField("float_list"):
                value = np.array(f.float_list.value, dtype)
            else:
                value = np.array(f.int64_list.value, dtype)
            out[key] = value.astype(dtype, copy=False).reshape(shape)
        if self.with_ids:
            for key in ("case_id", "frame_name", "stage"):
                out[key] = feature[key].bytes_list.value[0].decode()
        return out


def check_tfds_meta(path, image_size, schema, seed, val_fraction, test_fraction) -> None:
    if not (path / META_FILE).is_file():
        return  # a TFDS folder from elsewhere: nothing to check against
    meta = read_tfds_meta(path)
    if image_size is not None and image_size != meta["image_size"]:
        raise ValueError(
            f"{path}: frames are stored at {meta['image_size']} px but image_size={image_size} "
            f"was asked for; rebuild it with build_tfds --image_size={image_size}"
        )
    if schema is not None:
        built = KeypointSchema.from_json(meta["schema"])
        if built.point_names != schema.point_names:
            raise ValueError(
                f"{path}: built for schema {built.name!r} {list(built.point_names)}, not "
                f"{schema.name!r} {list(schema.point_names)}"
            )
    asked = dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    stored = {k: meta["split"][k] for k in asked}
    if asked != stored:
        logging.warning("%s: split fixed at build time (%s), not %s", path, stored, asked)
