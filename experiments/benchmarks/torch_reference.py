"""Plain-PyTorch ResNet and VGG with torchvision's state-dict key names.

A numerical reference for the weight converter's test, and for the latency benchmark the whole
keypoint network in PyTorch (`keypoint_net`): run eagerly, and exported by torch's own ONNX
exporter for the onnxruntime peer. torch is imported lazily and is not a runtime dependency of
the project. `forward_features` returns the last feature map (NCHW), the counterpart of our
backbones.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@functools.cache
def _classes() -> SimpleNamespace:
    try:
        import torch
        from torch import nn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the torch reference networks need torch (pip install torch)") from e

    def conv3x3(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    def conv1x1(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, cin, width, stride=1, downsample=None):
            super().__init__()
            self.conv1 = conv3x3(cin, width, stride)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(width, width)
            self.bn2 = nn.BatchNorm2d(width)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin, width, stride=1, downsample=None):
            super().__init__()
            self.conv1 = conv1x1(cin, width)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = conv3x3(width, width, stride)  # torchvision "v1.5": stride here
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = conv1x1(width, width * 4)
            self.bn3 = nn.BatchNorm2d(width * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu(y + identity)

    class ResNet(nn.Module):
        def __init__(self, block, layers, *, width=64, in_channels=3, num_classes=1000):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            cin = width
            for i, n in enumerate(layers):
                w = width * 2**i
                stride = 1 if i == 0 else 2
                blocks = []
                for j in range(n):
                    s = stride if j == 0 else 1
                    down = None
                    if s != 1 or cin != w * block.expansion:
                        down = nn.Sequential(
                            conv1x1(cin, w * block.expansion, s),
                            nn.BatchNorm2d(w * block.expansion),
                        )
                    blocks.append(block(cin, w, s, down))
                    cin = w * block.expansion
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.num_stages = len(layers)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward_features(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for i in range(self.num_stages):
                x = getattr(self, f"layer{i + 1}")(x)
            return x

        def forward(self, x):
            return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))

    class VGG(nn.Module):
        def __init__(
            self, cfg, *, batch_norm=False, in_channels=3, num_classes=1000, classifier=True
        ):
            super().__init__()
            layers, cin = [], in_channels
            for v in cfg:
                if v == "M":
                    layers.append(nn.MaxPool2d(2, 2))
                    continue
                layers.append(nn.Conv2d(cin, v, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(v))
                layers.append(nn.ReLU(inplace=True))
                cin = v
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            # The ImageNet classifier (~120M parameters) is optional so tests stay light.
            self.classifier = (
                nn.Sequential(
                    nn.Linear(cin * 49, 4096),
                    nn.ReLU(True),
                    nn.Dropout(),
                    nn.Linear(4096, 4096),
                    nn.ReLU(True),
                    nn.Dropout(),
                    nn.Linear(4096, num_classes),
                )
                if classifier
                else None
            )

        def forward_features(self, x):
            return self.features(x)

        def forward(self, x):
            x = torch.flatten(self.avgpool(self.features(x)), 1)
            return x if self.classifier is None else self.classifier(x)

    class KeypointNet(nn.Module):
        """uint8 frames (B, H, W) -> (visibility (B, K), group (B, G), coords (B, K, 2) in frame
        pixels): our grouped regression network, written the way a PyTorch team would."""

        def __init__(self, backbone, schema, image_size):
            super().__init__()
            self.backbone, self.image_size = backbone, image_size
            feat = backbone.fc.in_features if hasattr(backbone, "fc") else 512
            g, m = schema.num_groups, schema.max_group_size
            self.groups, self.max_size = g, m
            self.shared = nn.Sequential(nn.Linear(feat, 512), nn.LayerNorm(512), nn.ReLU())
            self.group_classifier = nn.Linear(512, g)
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 3 * m))
                for _ in range(g)
            )
            _, valid = schema.padded_index
            self.register_buffer("flat", torch.as_tensor(np.flatnonzero(valid.ravel())))

        def forward(self, frames):
            x = frames.float().unsqueeze(1)
            if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
                x = nn.functional.interpolate(
                    x, size=(self.image_size,) * 2, mode="bilinear", antialias=True
                )
            # standardised in float32, then the network's dtype (bf16 after `.to(torch.bfloat16)`)
            x = ((x / 255.0 - 0.449) / 0.226).to(self.group_classifier.weight.dtype)
            h = self.shared(self.backbone.forward_features(x).mean((2, 3)))
            out = torch.stack([head(h) for head in self.heads], 1)
            out = out.reshape(x.shape[0], self.groups * self.max_size, 3)[:, self.flat]
            size = torch.tensor(
                [frames.shape[2], frames.shape[1]], dtype=torch.float32, device=frames.device
            )
            coords = torch.sigmoid(out[..., 1:]) * size
            return torch.sigmoid(out[..., 0]), torch.sigmoid(self.group_classifier(h)), coords

    return SimpleNamespace(
        BasicBlock=BasicBlock,
        Bottleneck=Bottleneck,
        ResNet=ResNet,
        VGG=VGG,
        KeypointNet=KeypointNet,
    )


def resnet(layers, *, bottleneck: bool = False, width: int = 64, in_channels: int = 3, **kw):
    """A torchvision-layout ResNet with the given blocks per stage (random weights)."""
    c = _classes()
    return c.ResNet(
        c.Bottleneck if bottleneck else c.BasicBlock,
        layers,
        width=width,
        in_channels=in_channels,
        **kw,
    )


def resnet18(**kw):
    return resnet((2, 2, 2, 2), **kw)


def resnet34(**kw):
    return resnet((3, 4, 6, 3), **kw)


def resnet50(**kw):
    return resnet((3, 4, 6, 3), bottleneck=True, **kw)


def resnet_tiny(**kw):
    """Counterpart of our `resnet_tiny` test preset."""
    return resnet((1, 1), width=8, **kw)


def vgg16(*, batch_norm: bool = False, **kw):
    return _classes().VGG(VGG16_CFG, batch_norm=batch_norm, **kw)


TORCH_MODELS = {
    "resnet_tiny": resnet_tiny,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "vgg16_bn": lambda **kw: vgg16(batch_norm=True, **kw),
}


def keypoint_net(backbone: str, schema, image_size: int):
    """The whole keypoint network (grouped regression head) in eval mode, random weights."""
    kw = {"classifier": False} if backbone.startswith("vgg") else {}
    net = _classes().KeypointNet(TORCH_MODELS[backbone](in_channels=1, **kw), schema, image_size)
    return net.eval()


def export_onnx_bytes(net, frame_shape) -> bytes:
    """`net` (uint8 (B, H, W) in) through torch's TorchScript ONNX exporter, symbolic batch."""
    import io
    import warnings

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            torch.zeros(frame_shape, dtype=torch.uint8),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["frames"],
            output_names=["visibility", "group", "coords"],
            dynamic_axes={"frames": {0: "batch"}},
        )
    return buf.getvalue()
