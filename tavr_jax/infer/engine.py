"""Ahead-of-time compiled keypoint inference: raw uint8 frames in, keypoints in pixels out.

One XLA executable per (input height, width, batch) of an engine (an engine has one backbone
and one dtype): resizing to the network input, the network, the sigmoids and the mapping of
normalised coordinates back to original-frame pixels all run inside it, so the host only moves
uint8 frames in and a few floats out. Weights are put on the device once.
"""

from __future__ import annotations

import copy
import json
import pathlib
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_core.backbones import BACKBONES
from cardiac_core.fileio import atomic_write_bytes
from cardiac_core.xla import compile_lowered, cost_analysis
from tavr_jax.models import create_model, predictions, refine
from tavr_jax.models.heads import HEADS
from tavr_jax.models.keypoint_net import GRAY_MEAN, GRAY_STD
from tavr_jax.run.workdir import config_hash, load_for_inference, read_config
from tavr_jax.schema import KeypointSchema, get_schema

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

EXPORT_MAGIC = b"TAVRJAX-EXPORT-1\n"


def compute_dtype(name: str):
    """'float32' | 'bfloat16' -> the jnp dtype (a clear error otherwise)."""
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def image_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, int | np.integer):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def keypoint_forward(model, variables, frames, *, image_size, dtype=jnp.float32) -> dict:
    """Pure forward pass: (B,H,W) uint8 frames -> probabilities and original-frame pixels.

    Returns a dict of float32 arrays: visibility (B,K) and group (B,G) probabilities,
    coords (B,K,2) pixel (x, y) in the H x W input frame.
    """
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    b, h, w = frames.shape
    sh, sw = image_hw(image_size)
    x = frames.astype(jnp.float32)
    if (h, w) != (sh, sw):
        # Antialiased linear resize: downscaling 1024 -> 512 must average, not alias.
        x = jax.image.resize(x, (b, sh, sw), method="linear", antialias=True)
    out = model.apply(variables, x.astype(dtype), train=False)
    return predictions(out, width=w, height=h)


def _cast_floats(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _as_schema(schema) -> KeypointSchema:
    if isinstance(schema, KeypointSchema):
        return schema
    if isinstance(schema, dict):
        return KeypointSchema.from_json(schema)
    return get_schema(str(schema))


class KeypointEngine:
    """Compiled uint8-frames-in / keypoints-out inference for one network and dtype.

    `engine(frames)` takes (B,H,W) uint8 frames of any B and returns numpy arrays:
    visibility (B,K) and group (B,G) probabilities and coords (B,K,2) in frame pixels.
    Frames are run in chunks of `batch_size` (the last one zero-padded), so each frame size
    compiles exactly once.
    """

    def __init__(
        self,
        model,
        variables,
        meta: dict,
        *,
        batch_size: int = 1,
        dtype: str = "float32",
        device: jax.Device | None = None,
        refiner: tuple | None = None,
        fused_input: bool = False,
        packed_outputs: bool = False,
        call: str = "aot",
    ):
        """refiner: optional second stage, (PatchRefiner, params, patch size) as
        `run.refiner.load_refiner` gives; it runs in the same executable, after the network.

        The options below are variants the GPU campaign times against the default (each off
        by default; docs/gpu/README.md):
          fused_input: the uint8 frames go to the compute dtype directly (exact for 0..255 in
            bf16) and their standardisation is folded into the first convolution's kernel and
            batch-norm mean (ResNet backbones only). Exact inside the frame; the first
            convolution's zero padding then stands for black, not for the mean grey, so its
            border band of outputs differs slightly.
          packed_outputs: the executable returns one float32 array (B, 3K + G), so one
            device-to-host copy is made per call; `fetch` unpacks it.
          call: "aot" runs the ahead-of-time compiled executable (`compiled`), "jit" the
            jitted function through jax's dispatch (on a GPU the same program; on a CPU
            without the engine's CPU compile options).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if call not in ("aot", "jit"):
            raise ValueError(f"call must be 'aot' or 'jit', got {call!r}")
        self.meta = dict(meta)
        self.schema = _as_schema(meta["schema"])
        self.image_size = image_hw(meta["image_size"])
        self.batch_size = int(batch_size)
        self.dtype_name = str(dtype)
        self.dtype = compute_dtype(dtype)
        # The module computes in the engine's dtype; bf16 weights halve the memory traffic.
        if hasattr(model, "dtype") and model.dtype != self.dtype:
            model = model.clone(dtype=self.dtype)
        self.model = model
        self.device = device or jax.devices()[0]
        if self.dtype != jnp.float32:
            variables = _cast_floats(variables, self.dtype)
        self.variables = jax.device_put(variables, self.device)  # resident for the engine's life
        self.refiner = None
        if refiner is not None:
            model_r, params_r, patch = refiner
            self.refiner = (model_r, jax.device_put(params_r, self.device), int(patch))
            self.meta["refiner"] = True
        self.fused_input, self.packed_outputs = bool(fused_input), bool(packed_outputs)
        self.call = call
        self._fused = None  # (backbone, head) modules of the fused-input network
        # What the executable takes: the network's variables, or the fused network's.
        self.run_variables = self.variables
        if fused_input:
            backbone, head, self.run_variables = _fused_input_network(self.model, self.variables)
            self._fused = (backbone, head)
        self.trace_count = 0  # incremented each time the forward pass is traced
        self._compiled: dict[tuple[int, int, int], Any] = {}
        self._jitted = jax.jit(self._traced_forward)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_workdir(
        cls,
        workdir,
        *,
        which: str = "best",
        schema=None,
        backbone: str | None = None,
        refine: bool = False,
        **kwargs,
    ) -> KeypointEngine:
        """Loads a trained checkpoint; `schema`/`backbone`, when given, must match it.
        refine: add the second stage trained into W/refiner (experiments/tavr_refine.py)."""
        # Refuse a mismatched checkpoint from its config before restoring any weights.
        config = read_config(workdir)
        check_meta(config, workdir, schema=schema, backbone=backbone)
        model, variables, meta = load_for_inference(workdir, which=which)
        check_meta(meta, workdir, schema=schema, backbone=backbone)
        if refine:  # imported here: loading an engine should not need the training stack
            from tavr_jax.run.refiner import workdir_refiner

            kwargs["refiner"] = workdir_refiner(workdir, _as_schema(meta["schema"]).point_names)
        return cls(model, variables, meta, **kwargs)

    @classmethod
    def random_init(
        cls,
        schema,
        backbone: str,
        image_size: int,
        *,
        head: str = "regression",
        grouped: bool = True,
        dense_visibility: bool = False,
        seed: int = 0,
        **kwargs,
    ) -> KeypointEngine:
        """Randomly initialised weights of the real architecture (enough for timing)."""
        schema = _as_schema(schema)
        model = create_model(
            schema, backbone=backbone, head=head, grouped=grouped, dense_visibility=dense_visibility
        )
        sh, sw = image_hw(image_size)
        init = jax.jit(model.init)
        variables = init(jax.random.key(seed), jnp.zeros((1, sh, sw), jnp.uint8))
        meta = {
            "schema": schema,
            "backbone": backbone,
            "head": head,
            "grouped": grouped,
            "dense_visibility": model.dense_visibility,
            "image_size": image_size,
            "thresholds": None,
        }
        return cls(model, variables, meta, **kwargs)

    # -- compilation --------------------------------------------------------------------------

    def _traced_forward(self, variables, frames):
        self.trace_count += 1  # Python side effect: runs at trace time only
        if self._fused is not None:
            out = _fused_forward(*self._fused, variables, frames, image_size=self.image_size,
                                 dtype=self.dtype)  # fmt: skip
        else:
            out = keypoint_forward(
                self.model, variables, frames, image_size=self.image_size, dtype=self.dtype
            )
        if self.refiner is not None:
            model_r, params_r, patch = self.refiner
            if frames.ndim == 4:
                frames = frames[..., 0]
            out["coords"] = refine.refine_points(model_r, params_r, frames, out["coords"],
                                                 size=patch)  # fmt: skip
        if self.packed_outputs:  # (B, K + G + 2K) float32: one array, one copy to the host
            b = out["visibility"].shape[0]
            return jnp.concatenate(
                [out["visibility"], out["group"], out["coords"].reshape(b, -1)], axis=1
            )
        return out

    def with_batch_size(self, batch_size: int) -> KeypointEngine:
        """This engine run in chunks of `batch_size`: the same device-resident weights and
        compiled executables (cached per batch and frame size). The live loop takes one frame
        at a time from an engine built for uploads, where padding to 8 would cost 8 frames."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        other = copy.copy(self)
        other.batch_size = int(batch_size)
        return other

    def compiled(self, height: int, width: int, batch: int | None = None):
        """The AOT-compiled executable for (batch, height, width) uint8 input (cached)."""
        key = (int(batch or self.batch_size), int(height), int(width))
        exe = self._compiled.get(key)
        if exe is None:
            spec = jax.ShapeDtypeStruct(key, jnp.uint8)
            lowered = self._jitted.lower(self.run_variables, spec)
            exe = compile_lowered(lowered, self.device.platform)
            self._compiled[key] = exe
        return exe

    def cost_analysis(self, height: int, width: int, batch: int | None = None) -> dict:
        """XLA's cost analysis of the compiled executable (flops, bytes accessed...)."""
        return cost_analysis(self.compiled(height, width, batch))

    # -- running ------------------------------------------------------------------------------

    def put(self, frames: np.ndarray) -> jax.Array:
        """Starts the (asynchronous) host-to-device copy of one padded uint8 batch."""
        return jax.device_put(self._pad(frames), self.device)

    def _pad(self, frames) -> np.ndarray:
        frames = check_frames(frames)
        n = frames.shape[0]
        if n > self.batch_size:
            raise ValueError(f"batch of {n} frames exceeds the engine batch size {self.batch_size}")
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *frames.shape[1:]), np.uint8)
            frames = np.concatenate([frames, pad])
        return frames

    def dispatch(self, frames) -> dict[str, jax.Array]:
        """Launches one batch (host numpy or device array, <= batch_size frames); no sync."""
        if not isinstance(frames, jax.Array) or frames.shape[0] != self.batch_size:
            frames = self.put(np.asarray(frames))
        _, h, w = frames.shape
        if self.call == "jit":
            out = self._jitted(self.run_variables, frames)
        else:
            out = self.compiled(h, w)(self.run_variables, frames)
        if self.packed_outputs:
            return _Packed(out, self.schema.num_points, self.schema.num_groups)
        return out

    @staticmethod
    def fetch(outputs, n: int | None = None) -> dict[str, np.ndarray]:
        """Blocks for one dispatched batch and returns its first n rows as numpy."""
        if isinstance(outputs, _Packed):
            return outputs.unpack(n)
        host = jax.device_get(outputs)
        return {k: np.asarray(v)[:n] for k, v in host.items()}

    def __call__(self, frames) -> dict[str, np.ndarray]:
        frames = check_frames(frames)
        chunks = range(0, frames.shape[0], self.batch_size)
        # Dispatch every chunk before fetching any: the device never waits for the host.
        pending = [
            (self.dispatch(frames[i : i + self.batch_size]), min(self.batch_size, len(frames) - i))
            for i in chunks
        ]
        outs = [self.fetch(o, n) for o, n in pending]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def run_batches(self, batches: Iterable) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
        """Runs `(tag, frames)` batches with one batch in flight while the next is fetched.

        `frames` may already be on the device and zero-padded (see
        `streams.prefetch_to_device`); when `tag` is a list its length is the number of real
        frames. Yields `(tag, outputs)` in order.
        """
        previous = None
        for tag, frames in batches:
            n = len(tag) if isinstance(tag, list | tuple) else frames.shape[0]
            current = (tag, self.dispatch(frames), n)
            if previous is not None:
                yield previous[0], self.fetch(previous[1], previous[2])
            previous = current
        if previous is not None:
            yield previous[0], self.fetch(previous[1], previous[2])

    # -- export -------------------------------------------------------------------------------

    def export(
        self,
        path,
        height: int,
        width: int,
        *,
        batch: int | None = None,
        platforms: tuple[str, ...] | None = None,
    ) -> pathlib.Path:
        """Serialises the whole uint8-in / keypoints-out function, weights included, to one file.

        `batch=None` exports a symbolic batch dimension. The file holds a small JSON header
        (schema, thresholds, frame size) followed by the `jax.export` serialisation; see
        `load_exported`.
        """
        variables = self.variables

        def fn(frames):
            return keypoint_forward(
                self.model, variables, frames, image_size=self.image_size, dtype=self.dtype
            )

        if batch is None:
            (b,) = jax.export.symbolic_shape("b")
        else:
            b = int(batch)
        spec = jax.ShapeDtypeStruct((b, int(height), int(width)), jnp.uint8)
        exported = jax.export.export(jax.jit(fn), platforms=platforms)(spec)
        config = self.meta.get("config")
        header = json.dumps(
            {
                "schema": self.schema.to_json(),
                "backbone": self.meta.get("backbone"),
                "image_size": list(self.image_size),
                "frame_size": [int(height), int(width)],
                "batch": batch,
                "dtype": self.dtype_name,
                "thresholds": _jsonable(self.meta.get("thresholds")),
                # Additions: the group gate, and the training config the weights came from.
                "group_thresholds": _jsonable(self.meta.get("group_thresholds")),
                "config_hash": None if config is None else config_hash(config),
            }
        ).encode()
        payload = EXPORT_MAGIC + struct.pack("<Q", len(header)) + header + exported.serialize()
        path = pathlib.Path(path)
        atomic_write_bytes(path, payload)
        return path


class _Packed:
    """One dispatched batch of an engine with `packed_outputs`: (B, K + G + 2K) on the device."""

    def __init__(self, array: jax.Array, points: int, groups: int):
        self.array, self.points, self.groups = array, points, groups

    def unpack(self, n: int | None = None) -> dict[str, np.ndarray]:
        host = np.asarray(jax.device_get(self.array))[:n]
        k, g = self.points, self.groups
        return {
            "visibility": host[:, :k],
            "group": host[:, k : k + g],
            "coords": host[:, k + g :].reshape(len(host), k, 2),
        }


def _fused_input_network(model, variables) -> tuple:
    """(backbone, head, {"backbone": variables, "head": variables}) of a KeypointNet whose first
    convolution takes the raw 0..255 frames: conv(W, (x / 255 - m) / s) equals
    conv(W / (255 s), x) - (m / s) sum(W) inside the frame, and bn1 subtracts its running
    mean right after, so the constant joins that mean."""
    params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
    if "conv1" not in params or "bn1" not in stats:
        raise ValueError(f"fused_input needs a ResNet backbone, not {model.backbone!r}")
    head_cls = HEADS[model.head]
    backbone = BACKBONES[model.backbone](dtype=model.dtype, return_stages=head_cls.multiscale)
    options = {"dense_visibility": True} if model.dense_visibility else {}
    head = head_cls(model.schema, grouped=model.grouped, dtype=model.dtype, **options)
    kernel = params["conv1"]["kernel"]  # (7, 7, 1, C) HWIO
    k32 = kernel.astype(jnp.float32)
    shift = (GRAY_MEAN / GRAY_STD) * k32.sum(axis=(0, 1, 2))  # (C,)
    bn1 = dict(stats["bn1"])
    bn1["mean"] = (bn1["mean"].astype(jnp.float32) + shift).astype(bn1["mean"].dtype)
    backbone_vars = {
        "params": {**params, "conv1": {"kernel": (k32 / (255.0 * GRAY_STD)).astype(kernel.dtype)}},
        "batch_stats": {**stats, "bn1": bn1},
    }
    head_vars = {"params": variables["params"]["head"]}
    return backbone, head, {"backbone": backbone_vars, "head": head_vars}


def _fused_forward(backbone, head, variables, frames, *, image_size, dtype):
    """`keypoint_forward` of a `_fused_input_network`: uint8 frames straight to `dtype`."""
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    b, h, w = frames.shape
    sh, sw = image_hw(image_size)
    if (h, w) != (sh, sw):
        x = jax.image.resize(frames.astype(jnp.float32), (b, sh, sw), "linear", antialias=True)
        x = x.astype(dtype)
    else:
        x = frames.astype(dtype)  # 0..255 are exact in bf16
    features = backbone.apply(variables["backbone"], x[..., None], train=False)  # NHWC
    return predictions(head.apply(variables["head"], features, train=False), width=w, height=h)


class ExportedEngine:
    """A deployment-side runner of an exported engine file: needs jax, not the model code."""

    def __init__(self, meta: dict, exported):
        self.meta = meta
        self.schema = KeypointSchema.from_json(meta["schema"])
        self.exported = exported
        self._call = jax.jit(exported.call)
        # What frame sources and `outputs.run_inference` need of an engine.
        self.batch_size = int(meta.get("batch") or 1)
        self.device = jax.devices()[0]

    def __call__(self, frames) -> dict[str, np.ndarray]:
        frames = jnp.asarray(check_frames(frames))
        return {k: np.asarray(v) for k, v in self._call(frames).items()}

    def run_batches(self, batches: Iterable) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
        """Runs `(tag, frames)` batches (padded to `batch_size`) in order, as KeypointEngine."""
        for tag, frames in batches:
            n = len(tag) if isinstance(tag, list | tuple) else frames.shape[0]
            yield tag, {k: v[:n] for k, v in self(frames).items()}


def load_exported(path, *, workdir=None, schema=None) -> ExportedEngine:
    """Loads a file written by `KeypointEngine.export`.

    With `workdir` and/or `schema`, refuses (one line) a file exported for another schema or
    from another training run (its config hash differs from `workdir`/config.json's).
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read exported engine {path}: {e.strerror}") from None
    if not data.startswith(EXPORT_MAGIC):
        raise ValueError(f"{path} is not an exported keypoint engine (bad header)")
    (n,) = struct.unpack("<Q", data[len(EXPORT_MAGIC) : len(EXPORT_MAGIC) + 8])
    start = len(EXPORT_MAGIC) + 8
    meta = json.loads(data[start : start + n])
    if workdir is not None or schema is not None:
        check_artifact(meta, path, workdir=workdir, schema=schema)
    exported = jax.export.deserialize(bytearray(data[start + n :]))
    return ExportedEngine(meta, exported)


def check_artifact(info: dict, source, *, workdir=None, schema=None) -> None:
    """One-line ValueError when an artifact was made for another schema or training config.

    info: the artifact's metadata (ONNX `tavr_keypoints` or the jax.export header); workdir:
    the training workdir it is used with (its config.json hash must match); schema: the
    schema the caller expects.
    """
    have = KeypointSchema.from_json(info["schema"])
    if schema is not None:
        want = _as_schema(schema)
        if (want.point_names, want.group_names) != (have.point_names, have.group_names):
            raise ValueError(
                f"{source} was exported for schema {have.name!r} ({have.num_points} points), "
                f"not {want.name!r} ({want.num_points} points)"
            )
    if workdir is not None:
        want_hash = config_hash(read_config(workdir))
        have_hash = info.get("config_hash")
        if have_hash != want_hash:
            have_text = f"config hash {have_hash[:12]}" if have_hash else "no config hash"
            raise ValueError(
                f"{source} has {have_text}, but {workdir}/config.json hashes to "
                f"{want_hash[:12]}: it was exported from another training run"
            )


def check_meta(meta: dict, workdir, *, schema=None, backbone: str | None = None) -> None:
    """Raises a one-line ValueError when a checkpoint's schema or backbone is not the requested."""
    if schema is not None:
        want = _as_schema(schema)
        have = _as_schema(meta["schema"])
        if want.point_names != have.point_names or want.group_names != have.group_names:
            raise ValueError(
                f"checkpoint {workdir} was trained for schema {have.name!r} "
                f"({have.num_points} points), not {want.name!r} ({want.num_points} points)"
            )
    if backbone is not None and meta.get("backbone") != backbone:
        raise ValueError(
            f"checkpoint {workdir} has backbone {meta.get('backbone')!r}, not {backbone!r}"
        )


def check_frames(frames) -> np.ndarray:
    if isinstance(frames, jax.Array):
        frames = np.asarray(frames)
    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 frames of shape (B,H,W), got {frames.dtype} {frames.shape}"
        )
    return frames


def _jsonable(x):
    if x is None or isinstance(x, str | int | float | bool):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "to_json"):
        return x.to_json()
    if hasattr(x, "__dict__"):
        return _jsonable(vars(x))
    return str(x)
