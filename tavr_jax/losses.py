"""The paper's losses (section 3.2): group BCE, focal visibility loss, masked Wing loss.

Per-element functions in the optax style: pure, hyperparameters keyword-only, an optional
boolean `where=` mask (masked elements give 0 and zero gradient); the caller reduces.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from tavr_jax.schema import KeypointSchema


def _masked(loss: jax.Array, where: ArrayLike | None) -> jax.Array:
    return loss if where is None else jnp.where(where, loss, 0.0)


def group_bce(logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Binary cross-entropy on logits, per element; labels in [0, 1]."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels, logits.dtype)
    # log_sigmoid(-x) = log(1 - sigmoid(x)), stable for large |x|.
    loss = -(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
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
    p = jax.nn.sigmoid(logits)
    q = jax.nn.sigmoid(-logits)  # 1 - p without cancellation for large logits
    pos = -alpha * labels * q**gamma * jax.nn.log_sigmoid(logits)
    neg = -(1.0 - alpha) * (1.0 - labels) * p**gamma * jax.nn.log_sigmoid(-logits)
    return _masked(pos + neg, where)


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


def total_loss(
    outputs: dict[str, jax.Array],
    batch: dict[str, ArrayLike],
    schema: KeypointSchema,
    *,
    image_size: int | Sequence[int],
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    grouped: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = l1 L_group + l2 L_keypoint + l3 L_reg for one batch.

    Args:
      outputs: the model's dict: group_logits (B, G), visibility_logits (B, K), coords (B, K, 2)
        normalised to [0, 1].
      batch: visibility (B, K) in {0, 1} and coords (B, K, 2) in pixels of the network input.
      image_size: the network input size S (or (height, width)); coords are scaled by it.
      weights: (l1, l2, l3).
      grouped: False drops L_group (the ablation has no group classifier).
    Returns:
      (total, {"group", "keypoint", "reg", "total"}) scalars; L_group is 0 when not grouped.
    """
    l1, l2, l3 = weights
    visibility = jnp.asarray(batch["visibility"], jnp.float32)  # (B, K)
    target = jnp.asarray(batch["coords"], jnp.float32)  # (B, K, 2)
    size = jnp.broadcast_to(jnp.asarray(image_size, jnp.float32), (2,))  # (height, width)
    pred_px = outputs["coords"].astype(jnp.float32) * size[None, None, ::-1]  # x by w, y by h

    if grouped:
        presence = (visibility @ jnp.asarray(schema.group_matrix).T > 0).astype(jnp.float32)
        loss_group = jnp.mean(group_bce(outputs["group_logits"], presence))
    else:
        loss_group = jnp.zeros((), jnp.float32)
    loss_keypoint = jnp.mean(sigmoid_focal_loss(outputs["visibility_logits"], visibility))

    visible = jnp.broadcast_to((visibility > 0)[..., None], target.shape)  # (B, K, 2)
    wing = wing_loss(pred_px, target, where=visible)
    loss_reg = jnp.sum(wing) / jnp.maximum(jnp.sum(visible), 1)

    total = l1 * loss_group + l2 * loss_keypoint + l3 * loss_reg
    return total, {"group": loss_group, "keypoint": loss_keypoint, "reg": loss_reg, "total": total}
