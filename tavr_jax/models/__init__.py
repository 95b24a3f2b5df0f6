"""Flax Linen networks for grouped keypoints, and import of torchvision-style weights."""

from cardiac_core.backbones import BACKBONES, get_backbone
from tavr_jax.models.keypoint_net import (
    KeypointNet,
    create_model,
    normalize_images,
    predictions,
)

__all__ = [
    "BACKBONES",
    "KeypointNet",
    "create_model",
    "get_backbone",
    "normalize_images",
    "predictions",
]
