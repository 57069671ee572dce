"""Backbones Φ with hook points in the paper's notation, and their split into φ1 and φ2.

Hook points follow Table 1 of the ResNet paper: ``conv1`` is the stem, ``convS_B`` is block B of
stage S (stages numbered from 2). ``conv4_1`` is "through the first block of the third residual
stage", the paper's split point. The CIFAR ResNets have stages conv2..conv4 (32, 16, 8 pixels);
torchvision's ResNet-18/50/101 have conv2..conv5 and take 224-pixel images.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class BasicBlock(nn.Module):
    """The two-3x3-convolution residual block of CIFAR ResNets (He et al., 2016, Sec. 4.2)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Head(nn.Module):
    """Global average pooling and the linear classifier: the last part of every decider φ2."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate-layer features (MDP's f)."""
        return torch.flatten(self.pool(x), 1)


class Backbone(nn.Sequential):
    """Φ as an ordered sequence of named stages, so any hook point splits it into φ1 and φ2."""

    def hook_points(self) -> list[str]:
        return [name for name in self._modules if name != "head"]

    def split(self, hook: str) -> tuple[nn.Sequential, nn.Sequential]:
        """φ1 = stages up to and including ``hook``; φ2 = the rest. Modules are shared, not copied."""
        names = self.hook_points()
        if hook not in names:
            raise ValueError(f"unknown hook point {hook!r}; valid: {', '.join(names)}")
        cut = list(self._modules).index(hook) + 1
        items = list(self._modules.items())
        return nn.Sequential(OrderedDict(items[:cut])), nn.Sequential(OrderedDict(items[cut:]))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier: MDP matches these."""
        for name, module in self._modules.items():
            x = module.features(x) if name == "head" else module(x)
        return x


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3, width: int = 16) -> Backbone:
    """ResNet-20/32/56 for 32-pixel images: 3 stages of (depth-2)/6 blocks, 16/32/64 channels."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv1"] = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
    )
    planes = width
    for stage, mult in enumerate((1, 2, 4), start=2):
        out = width * mult
        for b in range(1, n + 1):
            stride = 2 if (b == 1 and stage > 2) else 1
            layers[f"conv{stage}_{b}"] = BasicBlock(planes, out, stride)
            planes = out
    layers["head"] = Head(planes, num_classes)
    return Backbone(layers)


def cifar_vgg11(num_classes: int, in_channels: int = 3, width: int = 32) -> Backbone:
    """VGG-11 with batch norm for 32-pixel images at half width (32..256 channels): a non-residual
    network of about ResNet-20's cost, for MDP's transferability table. Stages carry the VGG paper's
    names (``conv3_2`` = second convolution of block 3); blocks 2-5 start with their 2x2 max pool."""
    plan = [("conv1_1", 1), ("conv2_1", 2), ("conv3_1", 4), ("conv3_2", 4),
            ("conv4_1", 8), ("conv4_2", 8), ("conv5_1", 8), ("conv5_2", 8)]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    planes = in_channels
    for name, mult in plan:
        pool = [nn.MaxPool2d(2)] if name.endswith("_1") and name != "conv1_1" else []
        out = width * mult
        layers[name] = nn.Sequential(*pool, nn.Conv2d(planes, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out),
                                     nn.ReLU(inplace=True))
        planes = out
    layers["head"] = Head(planes, num_classes)
    return Backbone(layers)


def torchvision_resnet(name: str, num_classes: int) -> Backbone:
    """torchvision's ResNet-18/50/101 (random init, no download) renamed to the paper's hook points."""
    from torchvision import models

    net = getattr(models, name)(weights=None, num_classes=num_classes)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv1"] = nn.Sequential(net.conv1, net.bn1, net.relu)
    for stage, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=2):
        for b, block in enumerate(layer, start=1):
            # conv2_x starts with the max pool in the ResNet paper's Table 1.
            layers[f"conv{stage}_{b}"] = nn.Sequential(net.maxpool, block) if (stage, b) == (2, 1) else block
    head = Head(net.fc.in_features, num_classes)
    head.fc = net.fc
    layers["head"] = head
    return Backbone(layers)


BACKBONES = {
    "resnet20": lambda k, c: cifar_resnet(20, k, c),
    "resnet32": lambda k, c: cifar_resnet(32, k, c),
    "resnet56": lambda k, c: cifar_resnet(56, k, c),
    "vgg11-half": lambda k, c: cifar_vgg11(k, c),
    "resnet18": lambda k, c: torchvision_resnet("resnet18", k),
    "resnet50": lambda k, c: torchvision_resnet("resnet50", k),
    "resnet101": lambda k, c: torchvision_resnet("resnet101", k),
}


def build_backbone(name: str, num_classes: int, in_channels: int = 3) -> Backbone:
    """A fresh Φ by name; an unknown name lists the known ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return BACKBONES[name](num_classes, in_channels)
