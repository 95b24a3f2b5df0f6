"""The files of a training run (a workdir) and the model they describe.

    W/config.json       the full training config, written before the first step
    W/checkpoints/      latest and best checkpoints (tavr_jax.run.checkpoint)
    W/thresholds.json   visibility thresholds tuned on validation (tavr_jax.metrics)
    W/events/           TensorBoard scalars

This module is the one place that reads and writes config.json and thresholds.json and builds
the network a config describes, so training, evaluation, inference and export agree on what a
workdir holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cardiac_core import integrity
from cardiac_core.fileio import write_json_atomic
from tavr_jax.models import create_model
from tavr_jax.run.checkpoint import CheckpointStore
from tavr_jax.schema import KeypointSchema, get_schema

CONFIG_FILE = "config.json"
THRESHOLDS_FILE = "thresholds.json"
# W/manifest.json records both files' role, format version and sha256 (cardiac_core.integrity)
METADATA_ROLES = {CONFIG_FILE: ("training config", 1), THRESHOLDS_FILE: ("thresholds", 1)}
MANIFEST_KIND = "tavr_workdir"
RESAVE = "re-run tavr_train.py on it (nothing retrains) or tavr_eval.py --tune_thresholds"

# Fields a resumed run may change: when and how it logs, saves and stops, not what it trains.
RESUMABLE_FIELDS = frozenset(
    {
        "num_steps",
        "time_budget_s",
        "eval_every",
        "checkpoint_every",
        "keep",
        "log_every",
        "data.num_workers",
    }
)


class ConfigMismatch(ValueError):
    """A workdir's stored config differs from the requested one in fields that matter."""


def _as_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def read_config(workdir: os.PathLike | str) -> dict:
    """The config stored in W/config.json, as a dict."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json; is {workdir} a training workdir?")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    _verify(workdir, CONFIG_FILE)
    return config


def _verify(workdir, name: str) -> None:
    """One line when a workdir metadata file was swapped or edited since it was written."""
    versions = {n: v for n, (_, v) in METADATA_ROLES.items()}
    integrity.verify_folder(
        workdir, kind=MANIFEST_KIND, names=[name], format_versions=versions, resave=RESAVE
    )


def _record(workdir, name: str) -> None:
    """Records a metadata file just written in W/manifest.json (only in a real workdir: a
    folder with config.json), the other one too when the workdir had no manifest yet."""
    if (pathlib.Path(workdir) / CONFIG_FILE).is_file():
        integrity.update_manifest(
            workdir, {name: METADATA_ROLES[name]}, kind=MANIFEST_KIND, others=METADATA_ROLES
        )


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    # JSON turns tuples into lists; compare the values as JSON would store them.
    return {prefix[:-1]: json.loads(json.dumps(tree))}


def config_differences(stored: Mapping, requested: Mapping, *, ignore=RESUMABLE_FIELDS) -> list:
    """Dotted names of the fields that differ (added, removed or changed), `ignore` aside."""
    a, b = _flatten(stored), _flatten(requested)
    return sorted(k for k in a.keys() | b.keys() if k not in ignore and a.get(k) != b.get(k))


def write_config(workdir: os.PathLike | str, config) -> None:
    """Writes W/config.json, refusing a workdir whose checkpoints were trained otherwise.

    A workdir with checkpoints resumes only with the config it was trained with (fields in
    `RESUMABLE_FIELDS` aside); anything else would overwrite the description of the trained
    model and make it unloadable. Raises ConfigMismatch naming the differing fields.
    """
    workdir = pathlib.Path(workdir)
    requested = _as_dict(config)
    if (workdir / CONFIG_FILE).exists() and has_checkpoints(workdir):
        stored = read_config(workdir)
        diff = config_differences(stored, requested)
        if diff:
            shown = ", ".join(
                f"{k} ({_flatten(stored).get(k)!r} -> {_flatten(requested).get(k)!r})"
                for k in diff[:6]
            )
            more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise ConfigMismatch(
                f"{workdir} holds a run trained with another config: {shown}{more}. "
                "Use a new --workdir to start fresh, or the stored config to resume."
            )
    write_json_atomic(workdir / CONFIG_FILE, requested)
    _record(workdir, CONFIG_FILE)


def has_checkpoints(workdir: os.PathLike | str) -> bool:
    root = pathlib.Path(workdir) / "checkpoints"
    return any(p.is_dir() and p.name.isdigit() for p in root.glob("*/*"))


def config_hash(config) -> str:
    """sha256 of the config's canonical JSON: names the exact model an artifact came from."""
    text = json.dumps(_as_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def data_split(config) -> dict:
    """`seed`, `val_fraction`, `test_fraction` of a config's case split (old flat configs too)."""
    config = _as_dict(config)
    data = config.get("data") or {}
    return {
        "seed": int(data.get("seed", config.get("data_seed", 0))),
        "val_fraction": float(data.get("val_fraction", config.get("val_fraction", 0.2))),
        "test_fraction": float(data.get("test_fraction", config.get("test_fraction", 0.0))),
    }


def build_model(config) -> tuple:
    """(network, schema) described by a config (a ConfigDict or the dict of config.json)."""
    config = _as_dict(config)
    dtype = config.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config dtype must be float32 or bfloat16, got {dtype!r}")
    for key in ("schema", "backbone"):
        if not isinstance(config.get(key), str):
            raise ValueError(f"config has no valid {key!r} (got {config.get(key)!r})")
    schema = get_schema(config["schema"])
    model = create_model(
        schema,
        backbone=config["backbone"],
        head=config.get("head", "regression"),
        grouped=bool(config.get("grouped", True)),
        # Absent from configs written before it existed, whose models were trained without.
        dense_visibility=bool(config.get("dense_visibility", False)),
        dtype=jnp.dtype(dtype),
    )
    return model, schema


def save_thresholds(workdir: os.PathLike | str, thresholds: dict) -> pathlib.Path:
    """Writes tuned thresholds (`metrics.tune_thresholds`' output) to W/thresholds.json."""
    path = pathlib.Path(workdir) / THRESHOLDS_FILE
    write_json_atomic(path, thresholds)
    _record(workdir, THRESHOLDS_FILE)
    return path


def load_thresholds(workdir, schema: KeypointSchema) -> tuple[np.ndarray, np.ndarray | None]:
    """W/thresholds.json -> (point thresholds (K,), group thresholds (G,) or None).

    Missing file: 0.5 for every point and no group gating.
    """
    path = pathlib.Path(workdir) / THRESHOLDS_FILE
    if not path.exists():
        return np.full((schema.num_points,), 0.5), None
    try:
        d = json.loads(path.read_text())
        points = np.array([float(d["points"][p]) for p in schema.point_names])
        groups = d.get("groups")
        if groups is not None:
            groups = np.array([float(groups[g]) for g in schema.group_names])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read thresholds from {path}: {e!r}") from None
    _verify(workdir, THRESHOLDS_FILE)
    return points, groups


def load_for_inference(workdir: os.PathLike | str, which: str = "best"):
    """Loads a trained model from a workdir for inference.

    Args:
      workdir: a training workdir (W/config.json and W/checkpoints/).
      which: "best" (highest validation F1; falls back to "latest" when no best exists) or
        "latest".

    Returns:
      (model, variables, meta): the Flax module, `{"params", "batch_stats"}` (the EMA
      weights when the run kept them) as host arrays, and a dict with `schema`
      (KeypointSchema), `backbone`, `head`, `grouped`, `image_size`, `dtype`, `thresholds`
      ((K,) float32 from W/thresholds.json, else 0.5), `group_thresholds` ((G,) or None),
      `step`, `which`, `config`, `config_hash`.
    """
    workdir = pathlib.Path(workdir)
    config = read_config(workdir)
    model, schema = build_model(config)  # a bad config fails before any weights are read
    try:
        image_size = int(config["image_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{workdir / CONFIG_FILE}: no valid image_size") from None
    store = CheckpointStore(workdir, async_save=False, read_only=True)
    try:
        restored = store.restore(which=which)
        if restored is None and which == "best":
            logging.warning("%s: no best checkpoint, using the latest", workdir)
            which = "latest"
            restored = store.restore(which=which)
        if restored is not None:  # a damaged best gives way to the newest restorable latest
            which = store.restored_from[0]
    finally:
        store.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no {which} checkpoint found")
    state, _, step = restored
    params = state.get("ema_params") or state["params"]
    variables = jax.device_get({"params": params, "batch_stats": state.get("batch_stats", {})})
    _check_weights_fit(model, variables, image_size, workdir)
    thresholds, group_thresholds = load_thresholds(workdir, schema)
    meta = {
        "schema": schema,
        "backbone": config["backbone"],
        "head": config.get("head", "regression"),
        "grouped": bool(config.get("grouped", True)),
        "dense_visibility": model.dense_visibility,
        "image_size": image_size,
        "dtype": config.get("dtype", "float32"),
        "thresholds": np.asarray(thresholds, np.float32),
        "group_thresholds": group_thresholds,
        "step": step,
        "which": which,
        "config": config,
        "config_hash": config_hash(config),
    }
    return model, variables, meta


def _check_weights_fit(model, variables, image_size: int, workdir) -> None:
    """One line when the checkpoint's weights are not those of the config's network."""
    size = min(image_size, 64)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size), jnp.uint8))
    )
    got = {k: variables.get(k, {}) for k in expected}

    def shapes(tree):
        return {
            jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }

    want, have = shapes(expected), shapes(got)
    if want != have:
        missing = sorted(want.keys() - have.keys())
        extra = sorted(have.keys() - want.keys())
        wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
        first = (missing or extra or wrong)[0]
        raise ValueError(
            f"{workdir}: the checkpoint's weights do not fit the network of config.json "
            f"(backbone {model.backbone!r}, head {model.head!r}): {len(missing)} missing, "
            f"{len(extra)} unexpected, {len(wrong)} of another shape, e.g. {first}"
        )
