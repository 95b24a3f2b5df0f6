"""Flax models on polar maps: a ResNet classifier and a small U-Net for the defect mask.

(a) `MapClassifier`: a ResNet backbone (`cardiac_core.backbones`, plus ResNet152 here) on
    the stress and rest RGB maps stacked as 6 channels, global average pooling, one dense
    layer. Binary tasks use one sigmoid logit (BCE), three_class a softmax (cross-entropy);
    Adam as published. `make_fit_predict_proba` plugs it into `classifiers.cross_validate`.
(b) `UNet`: stress and rest uptake (plus x, y, radius channels, because normal uptake depends
    on position: apical thinning, inferior attenuation) -> per-pixel defect logits for stress
    and rest, trained on the simulator's true masks with BCE + soft Dice inside the LV.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from cardiac_core.backbones import Bottleneck, ResNet, get_backbone
from cardiac_core.fileio import atomic_write_bytes
from perfusion import geometry

ResNet152 = partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)


class SmallConvNet(nn.Module):
    """Three conv-BN-ReLU blocks, each halving the map: a polar-map network trained from
    scratch in minutes on a CPU (the ResNets above want a GPU)."""

    widths: Sequence[int] = (16, 32, 64)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                        name=f"conv{i}")(x)  # fmt: skip
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                             name=f"bn{i}")(x)  # fmt: skip
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return x


def make_backbone(name: str, *, dtype: Any = jnp.float32) -> nn.Module:
    """`get_backbone(name)`, plus "resnet152" (not in the TAVR backbone table) and "small"."""
    if name == "resnet152":
        return ResNet152(dtype=dtype)
    if name == "small":
        return SmallConvNet(dtype=dtype)
    return get_backbone(name, dtype=dtype)


def dice(pred: np.ndarray, true: np.ndarray, *, axis=(-2, -1)) -> np.ndarray:
    """Dice 2|A and B| / (|A| + |B|) over `axis`; 1 where both masks are empty."""
    p, t = np.asarray(pred, bool), np.asarray(true, bool)
    inter = (p & t).sum(axis=axis)
    total = p.sum(axis=axis) + t.sum(axis=axis)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def resize_maps(maps: np.ndarray, size: int, *, interpolation=cv2.INTER_AREA) -> np.ndarray:
    """(N, S, S[, C]) -> (N, size, size[, C]), same dtype; a no-op when already that size."""
    maps = np.asarray(maps)
    if maps.shape[1] == size and maps.shape[2] == size:
        return maps
    out = [cv2.resize(m, (size, size), interpolation=interpolation) for m in maps]
    return np.stack(out).reshape(len(maps), size, size, *maps.shape[3:])


def _init_key(seed: int) -> jax.Array:
    """Parameter-init key. Jitted init with the "rbg" generator compiles ~5x faster on CPU than
    threefry (which unrolls per parameter), and eager init compiles op by op, slower still."""
    return jax.random.key(seed, impl="rbg")


# ---------------------------------------------------------------------------- classifier


class MapClassifier(nn.Module):
    """Backbone -> global average pool -> dense logits (float32)."""

    backbone: str = "resnet50"
    num_classes: int = 1  # 1: one sigmoid logit (BCE); > 1: softmax logits
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        # uint8 0..255 in, normalised here so callers pass raw maps.
        x = jnp.asarray(x, jnp.float32) / 127.5 - 1.0
        features = make_backbone(self.backbone, dtype=self.dtype)(x.astype(self.dtype), train)
        pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(pooled)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Published: Adam 0.003, BCE; 150 epochs (ResNet50) / 50 (ResNet152)."""

    backbone: str = "resnet50"
    image_size: int = 128
    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 3e-3
    seed: int = 0


TINY_CLASSIFIER = ClassifierConfig(backbone="resnet_tiny", image_size=32, epochs=2, batch_size=8)
# The from-scratch network of the methods comparison: uptake maps at 64 px, 40 epochs.
SMALL_UPTAKE_CNN = ClassifierConfig(
    backbone="small", image_size=64, epochs=40, batch_size=32, learning_rate=1e-3
)


def uptake_inputs(stress: np.ndarray, rest: np.ndarray, sexes, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 network input from uptake maps: stress, rest (0-1 as 0-255) and
    the sex as a constant plane (men 255, women 0, unknown 128; attenuation depends on it)."""
    maps = np.stack([np.asarray(stress), np.asarray(rest)], axis=-1).astype(np.float32)
    maps = resize_maps(maps, size, interpolation=cv2.INTER_AREA)
    code = np.array([{"M": 255, "F": 0}.get(s, 128) for s in sexes], np.float32)
    plane = np.broadcast_to(code[:, None, None, None], (*maps.shape[:3], 1))
    return np.clip(np.rint(np.concatenate([maps * 255.0, plane], -1)), 0, 255).astype(np.uint8)


def classifier_inputs(stress_rgb: np.ndarray, rest_rgb: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 stress and rest -> (N, size, size, 6) uint8 channel stack."""
    return np.concatenate([resize_maps(stress_rgb, size), resize_maps(rest_rgb, size)], axis=-1)


def _class_loss(logits, labels, num_classes):
    if num_classes == 1:
        return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _probabilities(logits, num_classes):
    if num_classes == 1:
        p = jax.nn.sigmoid(logits[:, 0])
        return jnp.stack([1.0 - p, p], axis=1)
    return jax.nn.softmax(logits, axis=-1)


@functools.lru_cache(maxsize=8)
def _classifier_fns(model: MapClassifier, learning_rate: float):
    tx = optax.adam(learning_rate)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return _class_loss(logits, y, model.num_classes).mean(), updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return tx, train_step


@functools.lru_cache(maxsize=8)
def _classifier_predict(model: MapClassifier):
    return jax.jit(
        lambda variables, x: _probabilities(
            model.apply(variables, x, train=False), model.num_classes
        )
    )


def train_classifier(
    images: np.ndarray, labels: np.ndarray, *, num_classes: int, config: ClassifierConfig
) -> tuple[MapClassifier, dict, list[float]]:
    """Train on (N, H, W, 6) uint8 maps and int labels; returns (model, variables, losses)."""
    images = resize_maps(images, config.image_size)
    labels = np.asarray(labels, np.int32)
    model = MapClassifier(config.backbone, num_classes=1 if num_classes == 2 else num_classes)
    tx, train_step = _classifier_fns(model, config.learning_rate)
    rng = np.random.default_rng(config.seed)
    variables = jax.jit(partial(model.init, train=False))(
        _init_key(config.seed), jnp.asarray(images[:1])
    )
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    bs = min(config.batch_size, len(images))
    losses = []
    for _ in range(config.epochs):
        order = rng.permutation(len(images))
        # Drop the ragged tail so every step has one shape (one compilation).
        for start in range(0, len(order) - bs + 1, bs):
            idx = order[start : start + bs]
            params, batch_stats, opt_state, loss = train_step(
                params, batch_stats, opt_state, images[idx], labels[idx]
            )
            losses.append(float(loss))
    return model, {"params": params, "batch_stats": batch_stats}, losses


def predict_classifier(
    model: MapClassifier, variables: dict, images: np.ndarray, *, image_size: int, batch_size=32
) -> np.ndarray:
    """(N, C) class probabilities (C = 2 for binary models)."""
    predict = _classifier_predict(model)
    images = resize_maps(images, image_size)
    out = [
        predict(variables, images[i : i + batch_size]) for i in range(0, len(images), batch_size)
    ]
    return np.concatenate([np.asarray(o) for o in out], axis=0)


def make_fit_predict_proba(
    images: np.ndarray, labels: np.ndarray, *, num_classes: int, config: ClassifierConfig
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """`fit_predict_proba(train_idx, test_idx) -> (n_test, C)` for cross-validation."""
    images = resize_maps(images, config.image_size)
    labels = np.asarray(labels)

    def fit_predict_proba(train_idx, test_idx):
        model, variables, _ = train_classifier(
            images[train_idx], labels[train_idx], num_classes=num_classes, config=config
        )
        return predict_classifier(model, variables, images[test_idx], image_size=config.image_size)

    return fit_predict_proba


# ---------------------------------------------------------------------------------- U-Net


def _coordinate_channels(size: int) -> np.ndarray:
    """(S, S, 3) float32: x, y in [-1, 1] and radius (apex 0, base 1) of the polar grid."""
    radius, angle = geometry.polar_coords(size)
    a = np.radians(angle)
    return np.stack([radius * np.cos(a), radius * np.sin(a), radius], axis=-1).astype(np.float32)


class ConvBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", name=f"conv{i}")(x)
            x = nn.relu(nn.GroupNorm(num_groups=min(8, self.features), name=f"norm{i}")(x))
        return x


class UNet(nn.Module):
    """Small U-Net: (B, S, S, C) -> (B, S, S, out_channels) logits; S divisible by 2**depth."""

    features: Sequence[int] = (16, 32, 64)
    out_channels: int = 2

    @nn.compact
    def __call__(self, x):
        b, s = x.shape[0], x.shape[1]
        coords = jnp.broadcast_to(jnp.asarray(_coordinate_channels(s)), (b, s, s, 3))
        x = jnp.concatenate([x.astype(jnp.float32), coords], axis=-1)
        skips = []
        for i, f in enumerate(self.features[:-1]):
            x = ConvBlock(f, name=f"down{i}")(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = ConvBlock(self.features[-1], name="bottom")(x)
        for i in reversed(range(len(self.features) - 1)):
            f = self.features[i]
            x = nn.ConvTranspose(f, (2, 2), strides=(2, 2), name=f"upconv{i}")(x)
            x = ConvBlock(f, name=f"up{i}")(jnp.concatenate([x, skips[i]], axis=-1))
        return nn.Conv(self.out_channels, (1, 1), name="logits")(x)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    # 32 px and narrow layers: the simulated defects are smooth and a few pixels of the
    # canonical 128 grid wide at the border, and this trains in minutes on 2 CPU cores.
    size: int = 32
    features: tuple[int, ...] = (8, 16, 32)
    steps: int = 500
    batch_size: int = 16
    learning_rate: float = 3e-3
    dice_weight: float = 1.0
    seed: int = 0


def segmentation_loss(logits, target, lv, *, dice_weight: float = 1.0):
    """BCE + soft Dice inside the LV, per example: logits/target (B,S,S,C), lv (S,S) -> (B,)."""
    w = jnp.broadcast_to(lv[None, :, :, None], logits.shape).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, target)
    bce = (bce * w).sum(axis=(1, 2, 3)) / w.sum(axis=(1, 2, 3))
    p = jax.nn.sigmoid(logits) * w
    inter = (p * target).sum(axis=(1, 2))
    soft_dice = (2 * inter + 1.0) / (p.sum(axis=(1, 2)) + (target * w).sum(axis=(1, 2)) + 1.0)
    return bce + dice_weight * (1.0 - soft_dice.mean(axis=-1))


@dataclasses.dataclass
class UNetModel:
    config: UNetConfig
    params: Any

    def save(self, directory) -> None:
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "unet.msgpack", serialization.to_bytes(self.params))
        atomic_write_bytes(
            d / "unet.json", json.dumps(dataclasses.asdict(self.config), indent=1).encode()
        )

    @classmethod
    def load(cls, directory) -> UNetModel:
        d = pathlib.Path(directory)
        if not (d / "unet.json").is_file() or not (d / "unet.msgpack").is_file():
            raise FileNotFoundError(f"no U-Net (unet.json, unet.msgpack) in {d}")
        cfg = json.loads((d / "unet.json").read_text())
        cfg["features"] = tuple(cfg["features"])
        config = UNetConfig(**cfg)
        net = UNet(config.features)
        template = jax.eval_shape(
            net.init, jax.random.key(0), jnp.zeros((1, config.size, config.size, 2), jnp.float32)
        )["params"]
        params = serialization.from_bytes(template, (d / "unet.msgpack").read_bytes())
        return cls(config=config, params=params)


def _unet_inputs(stress, rest, size):
    x = np.stack([np.asarray(stress, np.float32), np.asarray(rest, np.float32)], axis=-1)
    return resize_maps(x, size, interpolation=cv2.INTER_LINEAR)


@functools.lru_cache(maxsize=8)
def _unet_fns(features: tuple[int, ...], size: int, learning_rate: float, dice_weight: float):
    net = UNet(features)
    tx = optax.adam(learning_rate)
    lv = jnp.asarray(geometry.disk_mask(size))

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            return segmentation_loss(net.apply({"params": p}, x), y, lv, dice_weight=dice_weight)

        loss, grads = jax.value_and_grad(lambda p: loss_fn(p).mean())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def logits_fn(params, x):
        return net.apply({"params": params}, x)

    return net, tx, train_step, logits_fn


def train_unet(
    stress: np.ndarray,
    rest: np.ndarray,
    mask_stress: np.ndarray,
    mask_rest: np.ndarray,
    config: UNetConfig = UNetConfig(),
    *,
    progress: bool = False,
) -> tuple[UNetModel, list[float]]:
    """Train the U-Net on (N, S, S) uptake maps and true defect masks; returns (model, losses)."""
    x = _unet_inputs(stress, rest, config.size)
    y = np.stack([np.asarray(mask_stress, np.float32), np.asarray(mask_rest, np.float32)], -1)
    y = (resize_maps(y, config.size, interpolation=cv2.INTER_LINEAR) > 0.5).astype(np.float32)
    net, tx, train_step, _ = _unet_fns(
        tuple(config.features), config.size, config.learning_rate, config.dice_weight
    )
    params = jax.jit(net.init)(_init_key(config.seed), jnp.asarray(x[:1]))["params"]
    opt_state = tx.init(params)
    rng = np.random.default_rng(config.seed)
    bs = min(config.batch_size, len(x))
    losses = []
    steps = range(config.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="U-Net", unit="step")
    for _ in steps:
        idx = rng.choice(len(x), bs, replace=False)
        params, opt_state, loss = train_step(params, opt_state, x[idx], y[idx])
        losses.append(float(loss))
    return UNetModel(config=config, params=params), losses


def predict_mask(
    model: UNetModel, stress: np.ndarray, rest: np.ndarray, *, threshold: float = 0.5
) -> np.ndarray:
    """(N, 2, S, S) bool defect masks (stress, rest) at the input size S, zero outside the LV."""
    stress = np.asarray(stress, np.float32)
    size_in = stress.shape[-1]
    cfg = model.config
    *_, logits_fn = _unet_fns(tuple(cfg.features), cfg.size, cfg.learning_rate, cfg.dice_weight)
    x = _unet_inputs(stress, rest, cfg.size)
    prob = np.concatenate(
        [
            np.asarray(jax.nn.sigmoid(logits_fn(model.params, x[i : i + 64])))
            for i in range(0, len(x), 64)
        ]
    )
    prob = resize_maps(prob, size_in, interpolation=cv2.INTER_LINEAR)  # (N, S, S, 2)
    mask = (prob > threshold) & geometry.disk_mask(size_in)[None, :, :, None]
    return np.moveaxis(mask, -1, 1)
