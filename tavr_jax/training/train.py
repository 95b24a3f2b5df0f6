"""Training of the grouped keypoint network: one jitted, data-parallel step over a device mesh.

The train state is a plain dict pytree, replicated on every device:
`{"step", "params", "batch_stats", "opt_state", "rng", ["ema_params"]}`. Batches are global
arrays sharded on the mesh axis "data" (each process feeds its own slice), so the same code
runs on one CPU, on simulated CPU devices, on GPUs and across processes. Randomness is a pure
function of (seed, step), and the data iterator state is checkpointed with the train state,
so a run killed and resumed reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import pathlib
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2
from tqdm import tqdm

from cardiac_core.xla import compiler_options
from tavr_jax.config import Config
from tavr_jax.data.augment import augment_batch
from tavr_jax.data.pipeline import make_loader, open_frames
from tavr_jax.metrics import keypoint_metrics, visibility_f1
from tavr_jax.models import predictions
from tavr_jax.models.convert import load_backbone_weights
from tavr_jax.run.checkpoint import CheckpointStore
from tavr_jax.run.lock import writing
from tavr_jax.run.workdir import build_model, write_config
from tavr_jax.schema import KeypointSchema, get_schema
from tavr_jax.training.losses import total_loss

State = dict[str, Any]
# Keys of a host batch that the device step needs (orig_size/pixel_spacing stay on the host).
TRAIN_KEYS = ("image", "visible", "coords")


class NaNLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class Training(NamedTuple):
    """Everything a training run (or a benchmark of it) needs, built for a mesh of devices."""

    state: State
    state_sharding: Any
    train_fn: Callable  # (state, global batch) -> (state, metrics); donates the state
    eval_fn: Callable  # (state, global batch) -> predictions (visibility, group, coords px)
    batch_sharding: NamedSharding


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over all (or the given) devices, axis name "data".

    The axis is `Auto` (the compiler propagates shardings), so library code such as the
    augmentation's vmaps needs no sharding annotations of its own.
    """
    auto = (jax.sharding.AxisType.Auto,)
    if devices is None:
        return jax.make_mesh((jax.device_count(),), ("data",), axis_types=auto)
    return jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=auto)


def make_optimizer(config: Config) -> tuple[optax.GradientTransformation, Callable]:
    """(optax transformation, learning_rate(opt_state, step) -> scalar) for the config."""
    o = config.optimizer
    clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity()
    if o.name == "adamw":
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=o.learning_rate,
            warmup_steps=o.warmup_steps,
            decay_steps=max(config.num_steps, o.warmup_steps + 1),
            end_value=o.learning_rate * 1e-2,
        )
        tx = optax.chain(clip, optax.adamw(schedule, weight_decay=o.weight_decay))
        return tx, lambda opt_state, step: schedule(step)
    if o.name == "adam_plateau":
        p = o.plateau
        tx = optax.chain(
            clip,
            optax.adamw(o.learning_rate, weight_decay=o.weight_decay),
            optax.contrib.reduce_on_plateau(
                factor=p.factor,
                patience=p.patience,
                cooldown=p.cooldown,
                accumulation_size=p.accumulation_size,
                min_scale=p.min_scale,
            ),
        )
        return tx, lambda opt_state, step: o.learning_rate * opt_state[-1].scale
    raise ValueError(f"unknown optimizer {o.name!r}; known: adamw, adam_plateau")


def create_train_state(
    config: Config,
    model,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    init_variables: dict | None = None,
) -> tuple[State, Any]:
    """The initial train state, created directly in its (replicated) sharding.

    Returns (state, state_sharding). `init_variables` replaces the random initialisation
    (e.g. imported ImageNet weights) where given.
    """
    size = config.image_size

    def init():
        rng = jax.random.PRNGKey(config.seed)
        init_rng, train_rng = jax.random.split(rng)
        variables = model.init(init_rng, jnp.zeros((1, size, size), jnp.uint8), train=False)
        if init_variables is not None:
            variables = {**variables, **init_variables}
        params = variables["params"]
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(params),
            "rng": train_rng,
        }
        if config.ema_decay > 0:
            state["ema_params"] = params
        return state

    abstract = jax.eval_shape(init)
    replicated = NamedSharding(mesh, P())
    sharding = jax.tree.map(lambda _: replicated, abstract)
    state = jax.jit(init, out_shardings=sharding)()
    return state, sharding


def with_pretrained_backbone(state: State, path: str, state_sharding) -> State:
    """The state with the backbone weights (and EMA) taken from a torchvision-style file."""
    host = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    loaded = load_backbone_weights(host, path)
    new = {**state, "params": loaded["params"], "batch_stats": loaded["batch_stats"]}
    if "ema_params" in state:
        new["ema_params"] = loaded["params"]
    # Adam's moments start at zero whatever the weights, so opt_state needs no change.
    return jax.device_put(new, state_sharding)


def abstract_state(state_sharding, state_or_shapes) -> Any:
    """Shape/dtype/sharding structs of a state, the target of a checkpoint restore."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state_or_shapes,
        state_sharding,
    )


def train_step(
    state: State,
    batch: dict,
    *,
    model,
    tx: optax.GradientTransformation,
    learning_rate_fn: Callable,
    schema: KeypointSchema,
    config: Config,
) -> tuple[State, dict]:
    """One optimisation step on a global batch: augment, forward, loss, update, EMA."""
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    augment_rng, dropout_rng = jax.random.split(rng)
    if config.augment is not None:
        batch = augment_batch(augment_rng, batch, schema, config.augment)

    def loss_fn(params):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": state["batch_stats"]},
            batch["image"],
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
        )
        # bf16 compute, fp32 loss: the optimiser always sees fp32 gradients of fp32 params.
        outputs = jax.tree.map(lambda x: x.astype(jnp.float32), outputs)
        loss, parts = total_loss(
            outputs,
            batch,
            schema,
            image_size=config.image_size,
            grouped=config.grouped,
            config=config.loss,
        )
        return loss, (parts, updates.get("batch_stats", {}))

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], value=loss)
    params = optax.apply_updates(state["params"], updates)
    new_state = {
        **state,
        "step": step + 1,
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": opt_state,
    }
    if "ema_params" in state:
        d = config.ema_decay
        new_state["ema_params"] = jax.tree.map(
            lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params
        )
    metrics = {
        "loss": loss,
        **{f"loss_{k}": v for k, v in parts.items() if k != "total"},
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
        "learning_rate": learning_rate_fn(opt_state, step),
    }
    return new_state, metrics


def eval_step(state: State, batch: dict, *, model, image_size: int) -> dict:
    """Predictions on a batch: visibility and group probabilities, coords in input pixels."""
    params = state.get("ema_params", state["params"])
    outputs = model.apply(
        {"params": params, "batch_stats": state["batch_stats"]}, batch["image"], train=False
    )
    return predictions(outputs, width=image_size, height=image_size)


def make_step_fns(model, tx, learning_rate_fn, schema, config, mesh, state_sharding):
    """(jitted train step, jitted eval step, batch sharding) for this mesh."""
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    # The inference engine's compile options: on a CPU they make the step 1.2-1.7x faster.
    options = compiler_options(mesh.devices.flat[0].platform)
    train_fn = jax.jit(
        functools.partial(
            train_step,
            model=model,
            tx=tx,
            learning_rate_fn=learning_rate_fn,
            schema=schema,
            config=config,
        ),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
        compiler_options=options,
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, model=model, image_size=config.image_size),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=batch_sharding,
        compiler_options=options,
    )
    return train_fn, eval_fn, batch_sharding


def build_training(config: Config) -> Training:
    """Model, optimizer and sharded state on a mesh of all devices, with the jitted steps."""
    mesh = make_mesh()
    model, schema = build_model(config)
    tx, learning_rate_fn = make_optimizer(config)
    state, state_sharding = create_train_state(config, model, tx, mesh)
    steps = make_step_fns(model, tx, learning_rate_fn, schema, config, mesh, state_sharding)
    return Training(state, state_sharding, *steps)


def to_global(batch: dict, sharding: NamedSharding, keys=TRAIN_KEYS) -> dict:
    """This process's slice of a batch (numpy) -> global arrays sharded on "data"."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in keys}


def _fetch(x) -> np.ndarray:
    """A global array, or this process's numpy slice, -> the full numpy array everywhere."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((n, *x.shape[1:]), x.dtype)]) if n else x


def evaluate_batches(eval_fn, state, batches: Iterator[dict], sharding, local_batch_size: int):
    """Runs the eval step over batches (the last one padded) -> host arrays of the split.

    Returns `visibility`, `group`, `coords` (input pixels) predicted, and `true_visible`,
    `true_coords` (input pixels), `orig_size` of the frames, in order.
    """
    truth = {"true_visible": "visible", "true_coords": "coords", "orig_size": "orig_size"}
    out = {k: [] for k in ("visibility", "group", "coords", *truth)}
    for batch in batches:
        pad = local_batch_size - len(batch["image"])
        padded = {k: _pad(np.asarray(batch[k]), pad) for k in (*TRAIN_KEYS, "orig_size")}
        padded["valid"] = _pad(
            np.asarray(batch.get("valid", np.ones(len(batch["image"]), bool))), pad
        )
        pred = eval_fn(state, to_global(padded, sharding))
        valid = _fetch(padded["valid"])
        for k in ("visibility", "group", "coords"):
            out[k].append(_fetch(pred[k])[valid])
        for k, key in truth.items():
            out[k].append(_fetch(padded[key])[valid])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def validation_metrics(arrays: dict, schema: KeypointSchema, image_size: int) -> dict:
    """Validation F1 (visibility at 0.5, pooled) and the paper's metrics in original pixels."""
    if len(arrays["visibility"]) == 0:
        return {}
    truth = arrays["true_visible"] > 0.5
    metrics = {"val_f1": float(visibility_f1(arrays["visibility"] > 0.5, truth))}
    # Input pixels -> original pixels: frames are resized to S x S, x by W/S and y by H/S.
    scale = arrays["orig_size"][:, None, ::-1].astype(np.float32) / image_size  # (N, 1, 2)
    full = keypoint_metrics(
        arrays["visibility"],
        arrays["coords"] * scale,
        truth,
        arrays["true_coords"] * scale,
        schema,
    )
    for k in ("precision", "recall", "f1", "mean_error_px", "loc_accuracy_20px"):
        if full.get(k) is not None:
            metrics[f"val_{k}"] = float(full[k])
    return metrics


def _event_records(path: pathlib.Path):
    """The payloads of a TFRecord file (length, length crc, payload, payload crc), stopping at
    a torn tail (a run killed mid-write)."""
    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        if pos + 12 + length + 4 > len(data):
            return
        yield data[pos + 12 : pos + 12 + length]
        pos += 12 + length + 4


def read_scalars(workdir) -> dict[str, list[tuple[int, float, float]]]:
    """The TensorBoard scalars a run wrote: tag -> [(step, seconds since the run began, value)].

    Seconds count from the first event of the run's first events file (the writer opens
    before compilation), so they include compilation and validation passes.
    """
    files = sorted(pathlib.Path(workdir, "events").glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{workdir}/events: no TensorBoard events")
    out: dict[str, list[tuple[int, float, float]]] = {}
    start = None
    for path in files:
        for record in _event_records(path):
            event = event_pb2.Event.FromString(record)
            start = event.wall_time if start is None else start
            for value in event.summary.value:
                out.setdefault(value.tag, []).append(
                    (event.step, event.wall_time - start, value.simple_value)
                )
    return out


class _Writer:
    """TensorBoard scalars (process 0 only)."""

    def __init__(self, logdir: pathlib.Path):
        self._writer = SummaryWriter(str(logdir)) if jax.process_index() == 0 else None

    def scalars(self, step: int, values: dict) -> None:
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, float(v), step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _check_finite(metrics: dict, step: int) -> None:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        parts = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items() if k.startswith("loss"))
        raise NaNLossError(
            f"training loss is {loss} at step {step} ({parts}); stopping. Lower the learning "
            "rate, check the data, or resume from the last checkpoint."
        )


class _Validator:
    """Validation passes over the val cases, and the best checkpoint they select."""

    def __init__(self, config, schema, loader, eval_fn, batch_sharding, store, writer):
        self.config, self.schema, self.loader = config, schema, loader
        self.eval_fn, self.batch_sharding = eval_fn, batch_sharding
        self.store, self.writer = store, writer

    def __call__(self, step: int, state: State, data_state) -> dict:
        """Validates `state`; saves it as best when its F1 beats the best so far."""
        c = self.config
        batches = self.loader("val", shuffle=False)
        arrays = evaluate_batches(
            self.eval_fn, state, batches, self.batch_sharding, c.batch_size // jax.process_count()
        )
        val = validation_metrics(arrays, self.schema, c.image_size)
        if val:
            self.writer.scalars(step, val)
            tqdm.write(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in val.items()))
            if self.store.save_best(step, state, val["val_f1"], data_state):
                tqdm.write(f"step {step}: new best val_f1={val['val_f1']:.4f}")
        return val


def _loader_factory(config, schema, data_dir):
    """loader(split, shuffle=...) -> this process's rows of each global batch of a split.

    Each split is opened once (decoded into memory when it fits, `pipeline.open_frames`), so
    the validation passes do not read the data again.
    """
    opened: dict[str, Any] = {}

    def loader(split, *, shuffle):
        if split not in opened:
            opened[split] = open_frames(
                data_dir,
                split,
                in_memory=None if config.data.num_workers == 0 else False,
                image_size=config.image_size,
                schema=schema,
                split_seed=config.data.seed,
                val_fraction=config.data.val_fraction,
                test_fraction=config.data.test_fraction,
            )
        return make_loader(
            opened[split],
            split,
            batch_size=config.batch_size,
            seed=config.seed,
            shuffle=shuffle,
            num_epochs=None if shuffle else 1,
            drop_remainder=shuffle,
            num_workers=config.data.num_workers,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    return loader


def train_and_evaluate(
    config: Config, workdir: str | pathlib.Path, data_dir: str | pathlib.Path
) -> dict:
    """Trains (resuming from W/checkpoints when present) and returns the final metrics.

    Stops after `config.num_steps`, or earlier at the first step boundary past
    `config.time_budget_s` seconds of training (when > 0); either way the last state is
    checkpointed and validated. The returned dict has `step`, `stopped` ("num_steps" or
    "time_budget"), `train_seconds`, the last logged training scalars and the val_* metrics.
    A second run on the workdir: `lock.WorkdirLocked`; read-only or full: `lock.WriteError`.
    """
    workdir = pathlib.Path(workdir)
    schema = get_schema(config.schema)
    if config.batch_size % jax.device_count():
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {jax.device_count()} devices"
        )
    with writing(workdir, lock=jax.process_index() == 0):
        return _train(config, workdir, data_dir, schema)


def _train(config: Config, workdir: pathlib.Path, data_dir, schema: KeypointSchema) -> dict:
    loader = _loader_factory(config, schema, data_dir)
    train_iter = loader("train", shuffle=True)  # first: bad data fails before compiling
    has_val = _has_validation(loader)
    if jax.process_index() == 0:
        write_config(workdir, config)  # refuses a workdir trained with another config
    t = build_training(config)
    # Closed however the run ends: orbax's threads left running each print a traceback at exit.
    with CheckpointStore(workdir, keep=config.keep) as store:
        return _run(config, schema, workdir, loader, train_iter, has_val, t, store)


def _run(config, schema, workdir, loader, train_iter, has_val, t: Training, store) -> dict:
    state, start = _initial_state(config, t, store, train_iter)
    writer = _Writer(workdir / "events")
    validate = _Validator(config, schema, loader, t.eval_fn, t.batch_sharding, store, writer)
    final: dict = {"stopped": "num_steps"}
    pending: tuple[int, dict] | None = None  # metrics of the previous step, fetched one late
    bar = tqdm(total=config.num_steps, initial=start, disable=jax.process_index() != 0, unit="step")
    log = _StepLog(writer, bar, config.log_every, config.batch_size)
    t0 = time.perf_counter()

    def flush(last_step: bool = False):
        nonlocal pending
        if pending is not None:
            log.record(*pending, last_step=last_step)
            pending = None

    try:
        for step in range(start, config.num_steps):
            batch = next(train_iter)  # this process's rows of the global batch
            state, metrics = t.train_fn(state, to_global(batch, t.batch_sharding))
            # Fetching the previous step's scalars keeps one step in flight on the device
            # while still naming the exact step where the loss went NaN.
            flush()
            pending = (step, metrics)
            done = step + 1
            out_of_time = _out_of_time(config, t0)
            last = done == config.num_steps or out_of_time
            if last:
                final["stopped"] = "time_budget" if done < config.num_steps else "num_steps"
            if done % config.checkpoint_every == 0 or last:
                flush(last_step=last)  # never checkpoint a state whose loss is NaN
                store.save(done, state, train_iter.get_state())
                tqdm.write(f"step {done}: saved checkpoint")
            if has_val and (done % config.eval_every == 0 or last):
                flush(last_step=last)
                final.update(validate(done, state, train_iter.get_state()))
            bar.update(1)
            if last:
                break
        flush(last_step=True)
    finally:
        bar.close()
        writer.close()
    if final["stopped"] == "time_budget":
        tqdm.write(f"stopped at the time budget of {config.time_budget_s:.0f} s")
    final.update(log.last)
    final["step"] = int(jax.device_get(state["step"]))
    final["train_seconds"] = time.perf_counter() - t0
    return final


def _has_validation(loader) -> bool:
    try:
        return loader("val", shuffle=False) is not None
    except ValueError as e:  # no validation cases (e.g. val_fraction=0): no "best" checkpoint
        logging.warning("validation disabled: %s", e)
        return False


def _initial_state(config, t: Training, store: CheckpointStore, train_iter) -> tuple[State, int]:
    """(state, first step): the latest checkpoint with its data position, or a fresh state
    (with pretrained backbone weights when the config names a file)."""
    restored = store.restore(abstract_state(t.state_sharding, t.state))
    if restored is None:
        if config.get("pretrained"):
            return with_pretrained_backbone(t.state, config.pretrained, t.state_sharding), 0
        return t.state, 0
    state, data_state, start = restored
    if data_state is not None:
        train_iter.set_state(data_state)
    tqdm.write(f"resumed from step {start}")
    return state, start


def _out_of_time(config, t0: float) -> bool:
    """Whether the time budget is spent; every process agrees (process 0's clock decides)."""
    if config.time_budget_s <= 0:
        return False
    spent = time.perf_counter() - t0 >= config.time_budget_s
    if jax.process_count() > 1:
        spent = bool(multihost_utils.broadcast_one_to_all(np.asarray(spent)))
    return spent


class _StepLog:
    """Per-step scalars: NaN check, window means to TensorBoard and the progress bar."""

    def __init__(self, writer: _Writer, bar, log_every: int, batch_size: int):
        self.writer, self.bar, self.log_every, self.batch_size = writer, bar, log_every, batch_size
        self.window: collections.deque = collections.deque(maxlen=log_every)
        self.last: dict = {}
        self._t0 = time.perf_counter()

    def record(self, step: int, metrics: dict, *, last_step: bool = False) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(metrics, step)
        self.window.append(metrics)
        self.last = metrics
        if (step + 1) % self.log_every == 0 or last_step:
            # Means over the logging window are less noisy than the last step alone.
            means = {k: float(np.mean([m[k] for m in self.window])) for k in metrics}
            now = time.perf_counter()
            means["images_per_s"] = len(self.window) * self.batch_size / max(now - self._t0, 1e-9)
            self._t0 = now
            self.window.clear()
            self.writer.scalars(step + 1, means)
            self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['learning_rate']:.2e}")
