"""The paper's losses (section 3.2): group BCE, focal visibility loss, masked Wing loss; and
the heatmap loss of the dense head.

Per-element functions in the optax style: pure, hyperparameters keyword-only, an optional
boolean `where=` mask (masked elements give 0 and zero gradient); the caller reduces. The
cross-entropy and the focal loss are optax's, masked; optax has no Wing loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from tavr_jax.config import get_config
from tavr_jax.schema import KeypointSchema

# The paper's loss: weights of (group BCE, visibility focal, coordinate Wing), focal and Wing
# hyperparameters. `total_loss(config=...)` takes a mapping of the same shape (config.loss);
# the heatmap term (`weights.heatmap`, `heatmap_sigma_px`) applies to heads that output
# `heatmap_logits`, and `visibility_loss` picks "focal" (the paper) or "bce". The numbers live
# in one place, the training config: its `loss` with the `paper` preset applied.
PAPER_LOSS = get_config("paper").loss.to_dict()
VISIBILITY_LOSSES = ("focal", "bce")


def _masked(loss: jax.Array, where: ArrayLike | None) -> jax.Array:
    return loss if where is None else jnp.where(where, loss, 0.0)


def group_bce(logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Binary cross-entropy on logits, per element; labels in [0, 1]."""
    logits = jnp.asarray(logits)
    loss = optax.sigmoid_binary_cross_entropy(logits, jnp.asarray(labels, logits.dtype))
    return _masked(loss, where)


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Focal loss per element: -a y (1-p)^g log p - (1-a)(1-y) p^g log(1-p), p = sigmoid(x)."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels, logits.dtype)
    return _masked(optax.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma), where)


def wing_loss(
    pred: ArrayLike,
    target: ArrayLike,
    *,
    w: float = 10.0,
    eps: float = 2.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Wing loss per element: w ln(1 + |d|/eps) if |d| < w else |d| - C, C = w - w ln(1 + w/eps).

    Meant for errors in pixels (w = 10 px). Masked elements (e.g. invisible points, whose
    targets are arbitrary) are zeroed on the input difference, so their gradient is exactly 0.
    """
    diff = jnp.asarray(pred) - jnp.asarray(target)
    if where is not None:
        diff = jnp.where(where, diff, 0.0)
    a = jnp.abs(diff)
    c = w - w * jnp.log1p(w / eps)
    loss = jnp.where(a < w, w * jnp.log1p(a / eps), a - c)
    return _masked(loss, where)


def gaussian_heatmap(
    coords: ArrayLike, *, shape: Sequence[int], image_size: Sequence[int], sigma: float
) -> jax.Array:
    """(..., 2) pixel (x, y) -> (..., h, w): a Gaussian of `sigma` pixels over the map's cells.

    Cell (i, j) of an h x w map over an H x W input sits at ((j + 0.5) W / w, (i + 0.5) H / h)
    pixels; the result is normalised over the cells (a distribution, even near the border).
    """
    h, w = shape
    height, width = image_size
    xy = jnp.asarray(coords, jnp.float32)
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) * (width / w)
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) * (height / h)
    lead = (1,) * (xy.ndim - 1)
    log_x = -jnp.square(xs.reshape(*lead, w) - xy[..., 0:1]) / (2.0 * sigma**2)  # (..., w)
    log_y = -jnp.square(ys.reshape(*lead, h) - xy[..., 1:2]) / (2.0 * sigma**2)  # (..., h)
    logits = log_y[..., :, None] + log_x[..., None, :]
    flat = jax.nn.softmax(logits.reshape(*logits.shape[:-2], h * w), axis=-1)
    return flat.reshape(logits.shape)


def heatmap_loss(
    heatmaps: ArrayLike,
    coords: ArrayLike,
    *,
    image_size: Sequence[int],
    sigma: float = 4.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """KL(Gaussian target || spatial softmax of the heatmap), per point.

    Args:
      heatmaps: (B, h, w, K) logits.
      coords: (B, K, 2) target pixel (x, y) in the (height, width) = `image_size` input.
      sigma: target width in input pixels.
      where: (B, K) bool; masked points (invisible, arbitrary coords) give 0 and no gradient.
    Returns:
      (B, K) losses in nats, 0 when the softmax equals the target.
    """
    logits = jnp.moveaxis(jnp.asarray(heatmaps, jnp.float32), -1, 1)  # (B, K, h, w)
    b, k, h, w = logits.shape
    xy = jnp.asarray(coords, jnp.float32)
    if where is not None:
        xy = jnp.where(jnp.asarray(where)[..., None], xy, 0.0)
    target = gaussian_heatmap(xy, shape=(h, w), image_size=image_size, sigma=sigma)
    target = target.reshape(b, k, h * w)
    log_q = jax.nn.log_softmax(logits.reshape(b, k, h * w), axis=-1)
    kl = jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_q, axis=-1)
    return _masked(kl, where)


def total_loss(
    outputs: dict[str, jax.Array],
    batch: dict[str, ArrayLike],
    schema: KeypointSchema,
    *,
    image_size: int | Sequence[int],
    grouped: bool = True,
    config: Mapping | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = l1 L_group + l2 L_keypoint + l3 L_reg (+ l4 L_heatmap) for one batch.

    Args:
      outputs: the model's dict: group_logits (B, G), visibility_logits (B, K), coords (B, K, 2)
        normalised to [0, 1]; with heatmap_logits (B, h, w, K), the heatmap term is added.
      batch: visible (B, K) in {0, 1} and coords (B, K, 2) in pixels of the network input.
      image_size: the network input size S (or (height, width)); coords are scaled by it.
      grouped: False drops L_group (the ablation has no group classifier).
      config: `weights` {group, visibility, coords, heatmap}, `visibility_loss`,
        `focal_alpha`, `focal_gamma`, `wing_w`, `wing_eps`, `heatmap_sigma_px` (config.loss);
        None is the paper's (`PAPER_LOSS`); missing keys take `PAPER_LOSS`'s values.
    Returns:
      (total, {"group", "keypoint", "reg", ["heatmap"], "total"}) scalars; L_group is 0 when not
      grouped; "heatmap" only for heads that output heatmaps.
    """
    c = PAPER_LOSS if config is None else config
    get = lambda key: c.get(key, PAPER_LOSS[key])  # noqa: E731
    w = {**PAPER_LOSS["weights"], **dict(c["weights"])}
    visible = jnp.asarray(batch["visible"], jnp.float32)  # (B, K) 0/1 labels
    target = jnp.asarray(batch["coords"], jnp.float32)  # (B, K, 2)
    size = jnp.broadcast_to(jnp.asarray(image_size, jnp.float32), (2,))  # (height, width)
    pred_px = outputs["coords"].astype(jnp.float32) * size[None, None, ::-1]  # x by w, y by h

    if grouped:
        presence = (visible @ jnp.asarray(schema.group_matrix).T > 0).astype(jnp.float32)
        loss_group = jnp.mean(group_bce(outputs["group_logits"], presence))
    else:
        loss_group = jnp.zeros((), jnp.float32)
    kind = get("visibility_loss")
    if kind == "focal":
        per_point = sigmoid_focal_loss(
            outputs["visibility_logits"],
            visible,
            alpha=get("focal_alpha"),
            gamma=get("focal_gamma"),
        )
    elif kind == "bce":
        per_point = group_bce(outputs["visibility_logits"], visible)
    else:
        raise ValueError(f"unknown visibility_loss {kind!r}; known: {', '.join(VISIBILITY_LOSSES)}")
    loss_keypoint = jnp.mean(per_point)

    on_frame = jnp.broadcast_to((visible > 0)[..., None], target.shape)  # (B, K, 2)
    wing = wing_loss(pred_px, target, w=get("wing_w"), eps=get("wing_eps"), where=on_frame)
    n_visible = jnp.maximum(jnp.sum(visible > 0), 1)
    loss_reg = jnp.sum(wing) / (2 * n_visible)

    total = w["group"] * loss_group + w["visibility"] * loss_keypoint + w["coords"] * loss_reg
    parts = {"group": loss_group, "keypoint": loss_keypoint, "reg": loss_reg}
    if "heatmap_logits" in outputs:
        per_heatmap = heatmap_loss(
            outputs["heatmap_logits"],
            target,
            image_size=np.broadcast_to(np.asarray(image_size, np.float64), (2,)).tolist(),
            sigma=get("heatmap_sigma_px"),
            where=visible > 0,
        )
        parts["heatmap"] = jnp.sum(per_heatmap) / n_visible
        total = total + w["heatmap"] * parts["heatmap"]
    return total, {**parts, "total": total}
