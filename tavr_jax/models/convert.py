"""Import torchvision-style ImageNet weights (ResNet18/34/50, VGG16) from a local file.

The state dict comes from a `.npz` (no torch needed) or a `.pth`/`.pt` file (torch.load, only
if torch is importable). Nothing is downloaded. Keys map to our layer names by joining a
module and its index with "_" (`layer1.0.downsample.1.running_mean` ->
`layer1_0/downsample_1`, batch_stats `mean`); classifier layers (`fc`, `classifier`) are dropped.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

_DROPPED = ("fc.", "classifier.")
_BN_PARAMS = {"weight": "scale", "bias": "bias"}
_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Read a torch state dict from `.npz` or `.pth`/`.pt` into numpy arrays."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as f:
            sd = {k: np.asarray(f[k]) for k in f.files}
    elif path.suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError:
            raise ValueError(
                f"{path}: reading .pth needs torch; save the state dict as .npz instead"
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
        sd = {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
    else:
        raise ValueError(f"{path}: unsupported weights format {path.suffix!r} (use .npz or .pth)")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _module_path(torch_module: str) -> tuple[str, ...]:
    # "layer1.0.downsample.0" -> ("layer1_0", "downsample_0"); "features.28" -> ("features_28",)
    return tuple(re.sub(r"\.(\d+)", r"_\1", torch_module).split("."))


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], target: Mapping[str, Any]
) -> dict[str, Any]:
    """Torch backbone state dict -> {"params", "batch_stats"} shaped like `target`.

    `target` holds a backbone's initialised variables; every one of its leaves must be
    filled from the state dict (a clear error names the first missing or mismatched key).
    A 3-channel first convolution is summed over its input channels when the target stem
    takes 1 channel (grayscale input sees the sum of the RGB filters, as R = G = B).
    """
    target = flax.core.unfreeze(target)
    flat_target = flax.traverse_util.flatten_dict(target)
    out: dict[tuple[str, ...], np.ndarray] = {}
    modules = {k.rsplit(".", 1)[0] for k in state_dict}
    is_bn = {m for m in modules if f"{m}.running_mean" in state_dict}

    for key, value in state_dict.items():
        if key.startswith(_DROPPED) or key.endswith("num_batches_tracked"):
            continue
        module, leaf = key.rsplit(".", 1)
        path = _module_path(module)
        value = np.asarray(value, np.float32)
        if module in is_bn:
            if leaf in _BN_PARAMS:
                out[("params", *path, _BN_PARAMS[leaf])] = value
            elif leaf in _BN_STATS:
                out[("batch_stats", *path, _BN_STATS[leaf])] = value
            else:
                raise ValueError(f"unexpected batch-norm entry {key!r} in state dict")
        elif leaf == "weight" and value.ndim == 4:
            kernel = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            want = flat_target.get(("params", *path, "kernel"))
            if want is not None and want.shape[2] == 1 and kernel.shape[2] == 3:
                kernel = kernel.sum(axis=2, keepdims=True)
            out[("params", *path, "kernel")] = kernel
        elif leaf == "bias" and value.ndim == 1:
            out[("params", *path, "bias")] = value
        else:
            raise ValueError(f"unexpected entry {key!r} with shape {value.shape} in state dict")

    for path, want in flat_target.items():
        got = out.get(path)
        name = "/".join(path)
        if got is None:
            raise ValueError(f"state dict has no weights for {name} (wrong backbone?)")
        if got.shape != want.shape:
            raise ValueError(f"{name}: state dict shape {got.shape}, model expects {want.shape}")
    extra = sorted("/".join(p) for p in out.keys() - flat_target.keys())
    if extra:
        raise ValueError(f"state dict entries with no place in the model: {', '.join(extra[:5])}")
    return flax.traverse_util.unflatten_dict(
        {p: jnp.asarray(v, flat_target[p].dtype) for p, v in out.items()}
    )


def load_backbone_weights(
    variables: Mapping[str, Any], path: str | pathlib.Path, *, prefix: str = "backbone"
) -> dict[str, Any]:
    """Model variables with the `prefix` sub-tree replaced by the weights in `path`.

    For `create_model(...)` variables the backbone lives under "backbone" and the head
    parameters are kept from init; for a bare `get_backbone(...)` pass `prefix=""`.
    """
    variables = flax.core.unfreeze(variables)
    if prefix:
        target = {c: variables[c][prefix] for c in ("params", "batch_stats") if c in variables}
    else:
        target = {c: variables[c] for c in ("params", "batch_stats") if c in variables}
    state_dict = load_state_dict(path)
    try:
        converted = convert_state_dict(state_dict, target)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    new = dict(variables)
    for c, tree in converted.items():
        new[c] = {**variables[c], prefix: tree} if prefix else tree
    return new
