"""Host input pipeline: training batches from a TFDS folder or a Supervisely project (grain).

`make_loader` turns a TFDS folder written by `records.build_tfds`, or a Supervisely project
read and resized on the fly, decoded once into memory (`DecodedFrames`) or read on demand,
into a grain iterator of training batches, or of one process's rows of each global batch
(docs/architecture.md): the `records.TRAINING_DTYPES` fields with a leading batch axis.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import pathlib
from collections.abc import Sequence

import grain
import numpy as np
import psutil
from absl import flags

from tavr_jax.data import supervisely
from tavr_jax.data.records import (
    TRAINING_DTYPES,
    TfdsFrames,
    check_tfds_meta,
    frame_example,
    is_tfds_dir,
)
from tavr_jax.schema import KeypointSchema, get_schema


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


def open_split(
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
        check_tfds_meta(path, image_size, schema, seed, val_fraction, test_fraction)
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
    Other arguments as `open_split`.
    """
    data = open_split(
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
