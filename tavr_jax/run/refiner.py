"""The refiner's files in a run: W/refiner/ holds params.msgpack (flax serialization) and
refiner.json (config, schema point names, validation errors); refiner.json is written after
the weights, so a folder without it is incomplete, and manifest.json last (each file's role,
format version and sha256: cardiac_core.integrity), so a swapped or edited file is refused.
The training is in `tavr_jax.training.refiner`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
from flax import serialization

from cardiac_core import integrity
from cardiac_core.fileio import atomic_write_bytes
from tavr_jax.models import refine

FORMAT_VERSION = 1
MANIFEST_KIND = "tavr_refiner"
ROLES = {"params.msgpack": "refiner weights", "refiner.json": "refiner description"}
RESAVE = "retrain it with experiments/tavr_refine.py, or seal it as is with refiner.seal_refiner"


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    patch: int = refine.PATCH
    width: int = 16
    steps: int = 2000
    batch: int = 64
    learning_rate: float = 2e-3
    jitter: float = 8.0  # SD of the simulated first-stage error, in patch samples
    seed: int = 0


def save_refiner(directory, params, config: RefinerConfig, point_names, *, validation=None):
    """Writes the refiner folder; `validation`: {"mean_error_before", "mean_error_after"} of
    the first stage's validation cases (px at 1024), which `workdir_refiner` warns on."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "refiner.json").unlink(missing_ok=True)
    atomic_write_bytes(d / "params.msgpack", serialization.to_bytes(params))
    meta = {"config": dataclasses.asdict(config), "points": list(point_names)}
    if validation is not None:
        meta["validation"] = validation
    atomic_write_bytes(d / "refiner.json", json.dumps(meta, indent=1).encode())
    seal_refiner(d)


def seal_refiner(directory):
    """Writes the folder's manifest.json from its files as they are now (`save_refiner` does
    it last; for a folder saved before manifests, it records that folder as it is)."""
    d = pathlib.Path(directory)
    files = {n: (role, FORMAT_VERSION) for n, role in ROLES.items()}
    return integrity.write_manifest(d, files, kind=MANIFEST_KIND)


def load_refiner(directory, point_names=None):
    """(PatchRefiner, params, RefinerConfig) from `save_refiner`'s folder; `point_names`, when
    given, must be the schema's the refiner was trained on."""
    return _load(directory, point_names)[:3]


def _load(directory, point_names):
    """`load_refiner`'s three, and refiner.json's `validation` ({} when absent)."""
    d = pathlib.Path(directory)
    if not (d / "refiner.json").is_file():
        raise FileNotFoundError(f"{d}: no refiner.json (not a refiner folder, or incomplete)")
    integrity.verify_present(d, kind=MANIFEST_KIND)
    try:
        meta = json.loads((d / "refiner.json").read_text())
        config = RefinerConfig(**meta["config"])
        validation = meta.get("validation") or {}
        before, after = validation.get("mean_error_before"), validation.get("mean_error_after")
        if not all(v is None or isinstance(v, int | float) for v in (before, after)):
            raise TypeError(f"validation errors {before!r}, {after!r} are not numbers")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{d / 'refiner.json'}: unreadable ({e}); retrain the refiner") from None
    if point_names is not None and list(point_names) != meta["points"]:
        raise ValueError(f"{d}: refiner trained for points {meta['points']}, not {point_names}")
    model = refine.PatchRefiner(len(meta["points"]), width=config.width)
    dummy = jnp.zeros((1, config.patch, config.patch), jnp.float32)
    template = model.init(jax.random.PRNGKey(0), dummy, jnp.zeros((1,), jnp.int32))
    try:
        params = serialization.from_bytes(template, (d / "params.msgpack").read_bytes())
    except OSError:
        raise
    except Exception as e:  # msgpack and flax raise their own types for a broken file
        raise ValueError(f"{d / 'params.msgpack'}: unreadable ({e}); retrain the refiner") from None
    # after parsing, so a broken file keeps its own message
    versions = dict.fromkeys(ROLES, FORMAT_VERSION)
    integrity.verify_folder(
        d, kind=MANIFEST_KIND, names=list(ROLES), format_versions=versions, resave=RESAVE
    )
    return model, params, config, validation


def workdir_refiner(workdir, point_names) -> tuple:
    """(PatchRefiner, params, patch size) of W/refiner, as `KeypointEngine(refiner=...)` takes.

    Warns when the refiner made the error of this workdir's first stage worse on its
    validation cases: a first stage that is already finer than the refiner's own floor.
    """
    d = pathlib.Path(workdir) / "refiner"
    model, params, config, check = _load(d, point_names)
    before, after = check.get("mean_error_before"), check.get("mean_error_after")
    if before is not None and after is not None and after >= before:
        logging.warning(
            "%s: on the first stage's validation cases the refiner raised the mean error "
            "(%.1f -> %.1f px at 1024); this first stage does better without --refine",
            d, before, after,
        )  # fmt: skip
    return model, params, config.patch
