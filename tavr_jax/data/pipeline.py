"""Host input pipeline: Supervisely -> TFDS array_record (no TensorFlow) -> grain batches.

`build_tfds` converts any Supervisely project into an array_record TFDS dataset with the
frames already resized to the training resolution S (uint8 `Tensor` features, decoded with
NumPy only). `make_loader` turns a TFDS directory or a Supervisely project, decoded once into
memory (`DecodedFrames`) or read on demand, into a grain iterator of training batches, or of
one process's rows of each global batch (docs/architecture.md):

    image (B, S, S) uint8, visibility (B, K) float32, coords (B, K, 2) float32 (pixels of the
    S x S input, 0 where invisible), orig_size (B, 2) int32 (H, W), pixel_spacing (B,) float32

Coordinates scale with the image: x_S = x * S / W, y_S = y * S / H (continuous pixel
coordinates, so x / W is the same number at every resolution); `to_original_pixels` undoes it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator, Sequence

import cv2
import grain
import numpy as np
import psutil
import tensorflow_datasets as tfds
from absl import flags, logging
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

from tavr_jax.data import supervisely
from tavr_jax.schema import KeypointSchema, get_schema

TRAINING_DTYPES = {
    "image": np.uint8,
    "visibility": np.float32,
    "coords": np.float32,
    "orig_size": np.int32,
    "pixel_spacing": np.float32,
}
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
    visibility = np.asarray(record.visibility, np.float32)
    coords = to_input_pixels(record.coords, (h, w), image_size)
    coords = np.where(visibility[:, None] > 0, coords, 0).astype(np.float32)
    return {
        "image": np.ascontiguousarray(image, np.uint8),
        "visibility": visibility,
        "coords": coords,
        "orig_size": np.array([h, w], np.int32),
        "pixel_spacing": np.float32(record.pixel_spacing_mm or 0.0),
        "case_id": record.case_id,
        "frame_name": record.frame_name,
        "stage": record.stage or "",
    }


class SuperviselySource(Sequence):
    """A grain random-access source over one split of a Supervisely project, resized on read."""

    def __init__(self, project: supervisely.Project, image_size: int):
        if not project.frames:
            raise ValueError(f"{project.root}: split {project.split!r} has no frames")
        self.project = project
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.project.frames)

    def __getitem__(self, index: int) -> dict:
        image = self.project.load_image(index)
        return frame_example(image, self.project.frames[index], self.image_size)


def _features(schema: KeypointSchema, image_size: int) -> tfds.features.FeaturesDict:
    k, s = schema.num_points, image_size
    tensor = tfds.features.Tensor
    return tfds.features.FeaturesDict(
        {
            # Raw bytes: the default encoding widens every pixel to an int64 varint, which
            # is 1.5x larger on disk and parses 3x slower.
            "image": tensor(shape=(s, s), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
            "visibility": tensor(shape=(k,), dtype=np.float32),
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

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Frames resized to the training resolution, uint8 Tensor."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No checksums or metadata files beside the code; TFDS's own lookup of this path
        # imports the optional `importlib_resources` package.
        return None

    def __init__(self, *, projects: dict[str, supervisely.Project], image_size: int, **kwargs):
        self._projects = projects  # TFDS split name -> Project
        self._image_size = image_size
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
        return {name: self._generate_examples(project) for name, project in self._projects.items()}

    def _generate_examples(self, project: supervisely.Project) -> Iterator:
        for i, record in enumerate(project.frames):
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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        builder = TavrFrames(
            projects=projects, image_size=image_size, data_dir=tmp, file_format="array_record"
        )
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
        }
        (built / META_FILE).write_text(json.dumps(meta, indent=1))
        old = None
        if out_dir.exists():
            old = pathlib.Path(tmp) / "previous"
            os.replace(out_dir, old)
        os.replace(built, out_dir)
    return out_dir


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
        self._specs = {k: (features[k].shape, np.dtype(features[k].np_dtype)) for k in features}
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
            f = feature[key]
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


def _check_tfds_meta(path, image_size, schema, seed, val_fraction, test_fraction) -> None:
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


def open_source(
    source: os.PathLike,
    split: str,
    *,
    image_size: int | None = None,
    schema: KeypointSchema | str | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    with_ids: bool = True,
) -> Sequence:
    """A random-access source of examples: TFDS dir (built above) or Supervisely project.

    split: train, val (or validation), test, all; for TFDS also any TFDS split expression.
    Examples are dicts in the training layout, plus case_id / frame_name / stage strings when
    with_ids (always for a Supervisely project). For a TFDS folder, image_size and schema (when
    given) must match what it was built with; its split is the one fixed at build time.
    """
    path = pathlib.Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: dataset folder not found")
    schema = get_schema(schema) if isinstance(schema, str) else schema
    if is_tfds_dir(path):
        _check_tfds_meta(path, image_size, schema, seed, val_fraction, test_fraction)
        return TfdsFrames(path, split, with_ids=with_ids)
    if image_size is None:
        raise ValueError(f"{path}: reading a Supervisely project on the fly needs image_size")
    schema = schema or get_schema()
    project = supervisely.read_project(
        path, schema, split=split, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )
    return SuperviselySource(project, image_size)


class DecodedFrames(Sequence):
    """Every frame of one split decoded once into host memory; batches are gathered by index.

    Decoding (PNG decode and resize, or record parsing) is done once, by a thread pool, so
    serving a batch afterwards is one memory gather per field: the loader then costs a copy
    of the batch, whatever the source format.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays  # TRAINING_DTYPES keys -> (N, ...) arrays

    @classmethod
    def decode(cls, source: Sequence, *, threads: int | None = None) -> DecodedFrames:
        """Reads every example of `source` (a random-access source above) into arrays."""
        n = len(source)
        first = source[0]
        arrays = {
            key: np.empty((n, *np.shape(first[key])), dtype)
            for key, dtype in TRAINING_DTYPES.items()
        }

        def fill(start: int) -> None:
            for i in range(start, min(start + _DECODE_CHUNK, n)):
                example = source[i]
                for key, array in arrays.items():
                    array[i] = example[key]

        # PNG decoding and resizing release the GIL, so threads decode in parallel.
        with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count()) as pool:
            list(pool.map(fill, range(0, n, _DECODE_CHUNK)))
        return cls(arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def __getitem__(self, index: int) -> dict:
        return {key: array[index] for key, array in self.arrays.items()}

    def batch(self, indices: np.ndarray) -> dict:
        """Rows `indices` of every field (a gather; the result owns its memory)."""
        return {key: np.take(array, indices, axis=0) for key, array in self.arrays.items()}


_DECODE_CHUNK = 64  # frames per decoding task: amortises the pool's per-task overhead


def decoded_size(source: Sequence) -> int:
    """Bytes that `DecodedFrames.decode(source)` would hold."""
    first = source[0]
    per_frame = sum(np.asarray(first[k], d).nbytes for k, d in TRAINING_DTYPES.items())
    return per_frame * len(source)


def _fits_in_memory(source: Sequence) -> bool:
    # A quarter of what is free: room for the model, its compilation and other processes.
    return decoded_size(source) <= psutil.virtual_memory().available // 4


class BatchIndices(grain.transforms.Map):
    """Batch number -> the frame indices of that global batch (B,).

    Frames are taken epoch after epoch, each epoch in its own order (a permutation drawn from
    `np.random.default_rng([seed, epoch])`, or 0..n-1 without shuffling); batches run across
    epoch boundaries, so batch b holds positions b*B .. (b+1)*B - 1 of that sequence, cut at
    `total` positions (None: endless).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool, total: int | None):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.total = total

    def num_batches(self, *, drop_remainder: bool) -> int:
        if self.total is None:
            return _ENDLESS
        b = self.batch_size
        return self.total // b if drop_remainder else -(-self.total // b)

    def map(self, batch: int) -> np.ndarray:
        start = int(batch) * self.batch_size
        stop = start + self.batch_size
        positions = np.arange(start, stop if self.total is None else min(stop, self.total))
        epochs, within = np.divmod(positions, self.n)
        out = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = _epoch_order(self.n, self.seed, int(epoch), self.shuffle)[within[here]]
        return out


_ENDLESS = 2**62  # "repeat forever": more batches than any run takes


@functools.lru_cache(maxsize=8)  # a batch spans at most two epochs; thread-safe
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


class BatchReader(grain.transforms.Map):
    """Frame indices of a global batch (B,) -> this process's rows of it, read from a source.

    With `rows` (a slice of the global batch), only those rows are read, after a short
    global batch is padded to `global_batch` with index -1; padded rows are zeros and
    `valid` (rows,) bool marks the real ones.
    """

    def __init__(self, source: Sequence, rows: slice | None = None, global_batch: int = 0):
        self.source = source
        self.rows = rows
        self.global_batch = global_batch

    def map(self, indices: np.ndarray) -> dict:
        indices = np.asarray(indices)
        if self.rows is not None:
            pad = self.global_batch - len(indices)
            indices = np.concatenate([indices, np.full(pad, -1, indices.dtype)])[self.rows]
        valid = indices >= 0
        readable = np.where(valid, indices, 0)  # padded rows read frame 0, then become zeros
        if isinstance(self.source, DecodedFrames):
            batch = self.source.batch(readable)
        else:
            examples = [self.source[int(i)] for i in readable]
            batch = {
                key: np.stack([np.asarray(e[key], dtype) for e in examples])
                for key, dtype in TRAINING_DTYPES.items()
            }
        if self.rows is None:
            return batch
        if not valid.all():
            batch = {key: v * valid.reshape(-1, *[1] * (v.ndim - 1)).astype(v.dtype)
                     for key, v in batch.items()}  # fmt: skip
        return {**batch, "valid": valid}


def open_frames(
    source: os.PathLike,
    split: str,
    *,
    in_memory: bool | None = None,
    decode_threads: int | None = None,
    image_size: int | None = None,
    schema: KeypointSchema | str | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
) -> Sequence:
    """The training examples of one split, decoded into memory or read on demand.

    in_memory: True decodes every frame once (`DecodedFrames`, a thread pool of
      `decode_threads`, default one per core); False reads and decodes each frame when it is
      asked for; None decodes when the split takes under a quarter of the free memory.
    Other arguments as `open_source`.
    """
    data = open_source(
        source,
        split,
        image_size=image_size,
        schema=schema,
        seed=split_seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        with_ids=False,
    )
    if len(data) == 0:
        raise ValueError(f"{source}: split {split!r} is empty")
    if in_memory is None:
        in_memory = _fits_in_memory(data)
    return DecodedFrames.decode(data, threads=decode_threads) if in_memory else data


def make_loader(
    source: os.PathLike | Sequence,
    split: str,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    num_workers: int = 0,
    drop_remainder: bool = True,
    num_threads: int = 2,
    in_memory: bool | None = None,
    process_index: int = 0,
    process_count: int = 1,
    image_size: int | None = None,
    schema: KeypointSchema | str | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
) -> grain.DatasetIterator:
    """A grain iterator of training batches (dicts of numpy arrays, uint8 images).

    Args:
      source: a TFDS folder written by `build_tfds`, a Supervisely project (frames are then
        read and resized: pass image_size, and the split options), or frames already opened
        by `open_frames` (then `split` and the reading options are not used).
      split: train, val, test or all.
      batch_size, drop_remainder: batching; a short last batch is kept if drop_remainder=False.
      seed: shuffle seed; each epoch is shuffled differently but deterministically.
      num_epochs: None repeats forever.
      num_workers: grain worker processes (0: in this process, with num_threads readers).
      in_memory: decode the split into memory first (see `open_frames`); None decides by
        size, and never with worker processes (each would receive a copy).
      process_index, process_count: with several processes, each reads only its own rows of
        every global batch (`batch_size` is global, divisible by process_count); a short
        global batch is then padded with zero rows, and `valid` (rows,) bool marks the real
        ones. The batches of all processes, concatenated in process order, are the global
        batches of a single process.

    Returns:
      An iterator with `get_state()` / `set_state(state)`: a restored state resumes with the
      exact next batch. Call `close()` when done if num_workers > 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {process_count} processes"
        )
    if isinstance(source, Sequence) and not isinstance(source, str):
        data = source
    else:
        data = open_frames(
            source,
            split,
            in_memory=in_memory if num_workers == 0 else bool(in_memory),
            image_size=image_size,
            schema=schema,
            split_seed=split_seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
        )
    rows = None
    if process_count > 1:
        local = batch_size // process_count
        rows = slice(process_index * local, (process_index + 1) * local)
    # grain sees one element per batch (its index), so its per-element bookkeeping and a
    # per-element shuffle (about 1 ms each) never run per frame.
    total = None if num_epochs is None else num_epochs * len(data)
    indices = BatchIndices(len(data), batch_size, seed=seed, shuffle=shuffle, total=total)
    ds = grain.MapDataset.range(indices.num_batches(drop_remainder=drop_remainder))
    ds = ds.map(indices).map(BatchReader(data, rows, batch_size))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)
    it = ds.to_iter_dataset(read)
    if num_workers > 0:
        # grain's worker start-up reads absl flags; outside `app.run` their defaults apply.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)
