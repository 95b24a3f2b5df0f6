"""ImageNet-style CNN backbones (paper Table 1) as Flax Linen modules, classifier removed.

Every backbone maps `(B, H, W, C) float -> (B, h, w, C_out)` feature map; the caller pools.
With `return_stages=True` it returns instead the feature maps at strides 4, 8, 16 and 32 (as
many as it has, fine to coarse; the last is the default output), for heads that decode at a
finer stride than the last map. The input channel count comes from the input, so the same
module serves grayscale aortography (1 channel) and colour polar maps (3 channels).

Layer names mirror torchvision's state-dict keys with "." between a module and its index
replaced by "_" (`layer1.0.downsample.0` -> `layer1_0/downsample_0`, `features.28` ->
`features_28`), which keeps the weight converter (`convert.py`) a renaming plus transposes.
Padding is explicit and symmetric like torch's, not "SAME" (which pads stride-2 convolutions
asymmetrically), so imported weights give the same feature maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

# torchvision initialises convolutions with kaiming_normal(fan_out, relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    p = (kernel - 1) // 2
    return ((p, p), (p, p))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions (ResNet18/34)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), (self.strides,) * 2, padding=_pad(3), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=_pad(3), name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters, (1, 1), (self.strides,) * 2, padding=0, name="downsample_0"
            )(residual)
            residual = self.norm(name="downsample_1")(residual)
        return nn.relu(residual + y)


class Bottleneck(nn.Module):
    """ResNet bottleneck block, stride on the 3x3 convolution as in torchvision (ResNet50)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (1, 1), padding=0, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), (self.strides,) * 2, padding=_pad(3), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), padding=0, name="conv3")(y)
        y = self.norm(name="bn3")(y)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters * 4, (1, 1), (self.strides,) * 2, padding=0, name="downsample_0"
            )(residual)
            residual = self.norm(name="downsample_1")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """torchvision-layout ResNet without avgpool/fc; output stride 2 ** (1 + len(stage_sizes))."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_filters: int = 64
    dtype: Any = jnp.float32
    return_stages: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,  # torch momentum 0.1
            epsilon=1e-5,
            dtype=self.dtype,
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=_pad(7), name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        stages = []
        for i, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                x = self.block_cls(
                    filters=self.num_filters * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=conv,
                    norm=norm,
                    name=f"layer{i + 1}_{j}",
                )(x)
            stages.append(x)  # strides 4, 8, 16, 32
        return tuple(stages) if self.return_stages else x


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
# ResNet18 at half width (32-256 channels): a quarter of the FLOPs, 2.4x the CPU training
# steps per second. The quick preset's backbone (docs/accuracy.md); it has no torchvision weights.
ResNet18Half = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, num_filters=32)
# Test preset: two stages of one block, widths 8 and 16, output stride 8.
ResNetTiny = partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=8)

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """torchvision-layout VGG `features` (no avgpool/classifier); output stride 32.

    `batch_norm=False` is torchvision's `vgg16` (the paper's VGG16); `True` is `vgg16_bn`.
    Layer names carry torchvision's index in `features`, which counts ReLU and pooling layers.
    """

    cfg: Sequence[int | str] = VGG16_CFG
    batch_norm: bool = False
    dtype: Any = jnp.float32
    return_stages: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        idx = 0
        stages = []  # after each pooling: strides 2, 4, ..., 32
        for v in self.cfg:
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                stages.append(x)
                idx += 1
                continue
            x = nn.Conv(
                v,
                (3, 3),
                padding=_pad(3),
                dtype=self.dtype,
                kernel_init=_conv_init,
                name=f"features_{idx}",
            )(x)
            idx += 1
            if self.batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,
                    epsilon=1e-5,
                    dtype=self.dtype,
                    name=f"features_{idx}",
                )(x)
                idx += 1
            x = nn.relu(x)
            idx += 1
        return tuple(stages[1:]) if self.return_stages else x


VGG16 = partial(VGG, cfg=VGG16_CFG, batch_norm=False)
VGG16BN = partial(VGG, cfg=VGG16_CFG, batch_norm=True)


# EfficientNet-B0 stages: (expand ratio, kernel, stride, output channels, repeats).
_EFFNET_B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet channel rounding: scale, round to a multiple of 8, never lose over 10%."""
    c = channels * width
    rounded = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(rounded + divisor) if rounded < 0.9 * c else int(rounded)


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (EfficientNet)."""

    out_channels: int
    expand_ratio: int
    kernel: int
    strides: int
    norm: ModuleDef
    se_ratio: float = 0.25
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        in_ch = x.shape[-1]
        hidden = in_ch * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = nn.swish(self.norm(name="expand_bn")(conv(hidden, (1, 1), name="expand_conv")(y)))
        y = conv(
            hidden,
            (self.kernel, self.kernel),
            (self.strides,) * 2,
            padding=_pad(self.kernel),
            feature_group_count=hidden,
            name="dw_conv",
        )(y)
        y = nn.swish(self.norm(name="dw_bn")(y))
        # Squeeze-and-excitation, squeezed relative to the block's input width.
        s = jnp.mean(y, axis=(1, 2), keepdims=True)
        s = nn.swish(
            nn.Conv(max(1, int(in_ch * self.se_ratio)), (1, 1), dtype=self.dtype, name="se_reduce")(
                s
            )
        )
        s = nn.sigmoid(nn.Conv(hidden, (1, 1), dtype=self.dtype, name="se_expand")(s))
        y = y * s
        y = self.norm(name="project_bn")(conv(self.out_channels, (1, 1), name="project_conv")(y))
        if self.strides == 1 and in_ch == self.out_channels:
            y = y + x
        return y


class EfficientNet(nn.Module):
    """EfficientNet feature extractor (no classifier); output stride 32. No pretrained weights."""

    width: float = 1.0
    depth: float = 1.0
    dtype: Any = jnp.float32
    return_stages: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.99,  # torchvision EfficientNet: torch momentum 0.01, eps 1e-3
            epsilon=1e-3,
            dtype=self.dtype,
        )
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        x = conv(_round_filters(32, self.width), (3, 3), (2, 2), padding=_pad(3), name="stem_conv")(
            x
        )
        x = nn.swish(norm(name="stem_bn")(x))
        b = 0
        by_stride = {}  # the last feature map at each stride (4, 8, 16; 32 is the head's)
        for expand, kernel, stride, channels, repeats in _EFFNET_B0_STAGES:
            if stride == 2:
                by_stride[x.shape[1]] = x
            for j in range(int(math.ceil(repeats * self.depth))):
                x = MBConv(
                    out_channels=_round_filters(channels, self.width),
                    expand_ratio=expand,
                    kernel=kernel,
                    strides=stride if j == 0 else 1,
                    norm=norm,
                    dtype=self.dtype,
                    name=f"blocks_{b}",
                )(x)
                b += 1
        x = conv(_round_filters(1280, self.width), (1, 1), name="head_conv")(x)
        x = nn.swish(norm(name="head_bn")(x))
        if not self.return_stages:
            return x
        finer = [f for h, f in sorted(by_stride.items(), reverse=True)][1:]  # drop stride 2
        return (*finer, x)


EfficientNetB0 = partial(EfficientNet, width=1.0, depth=1.0)
EfficientNetB7 = partial(EfficientNet, width=2.0, depth=3.1)

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet_tiny": ResNetTiny,
    "resnet18": ResNet18,
    "resnet18_half": ResNet18Half,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "vgg16": VGG16,
    "vgg16_bn": VGG16BN,
    "efficientnet_b0": EfficientNetB0,
    "efficientnet_b7": EfficientNetB7,
}


def get_backbone(name: str, *, dtype: Any = jnp.float32, return_stages: bool = False) -> nn.Module:
    """A backbone by name (see `BACKBONES`), computing in `dtype` with float32 parameters."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None
    return factory(dtype=dtype, return_stages=return_stages)
