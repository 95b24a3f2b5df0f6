"""Plain-PyTorch ResNet and VGG with torchvision's state-dict key names.

A numerical reference for the weight converter's test and an eager PyTorch baseline for the
latency benchmark. torch is imported lazily and is not a runtime dependency of the project.
`forward_features` returns the last feature map (NCHW), the counterpart of our backbones.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@functools.cache
def _classes() -> SimpleNamespace:
    try:
        import torch
        from torch import nn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("benchmarks.torch_reference needs torch (pip install torch)") from e

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

    return SimpleNamespace(BasicBlock=BasicBlock, Bottleneck=Bottleneck, ResNet=ResNet, VGG=VGG)


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
