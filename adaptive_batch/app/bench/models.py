"""The benchmark models: a CIFAR ResNet (He et al., 2016, section 4.2) and an MLP."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["cifar_resnet", "mlp", "small_convnet"]


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def cifar_resnet(
    depth: int = 8, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)
) -> nn.Module:
    """The CIFAR ResNet of depth ``6n + 2``: three stages of ``n`` basic blocks (16, 32, 64
    channels), global average pooling, one linear head. ResNet-8 (n = 1) has 78k parameters.

    Example:
        >>> sum(p.numel() for p in cifar_resnet(8).parameters())
        78042
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1; got {depth}")
    blocks = (depth - 2) // 6
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    inputs = widths[0]
    for stage, outputs in enumerate(widths):
        for block in range(blocks):
            layers.append(BasicBlock(inputs, outputs, 2 if stage > 0 and block == 0 else 1))
            inputs = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, num_classes)]
    return nn.Sequential(*layers)


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Module:
    """One hidden layer with ReLU (the DBA paper's network)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs)
    )


def small_convnet(num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64)) -> nn.Module:
    """Three stages of a stride-2 3x3 conv, BatchNorm and ReLU (16, 32, 64 channels), global
    average pooling and one linear head: the pruning benchmarks' network (32 epochs on 10,000
    CIFAR-10 images in about a minute and a half of one CPU core).

    Example:
        >>> sum(p.numel() for p in small_convnet().parameters())
        24346
    """
    layers: list[nn.Module] = []
    inputs = 3
    for width in widths:
        layers += [
            nn.Conv2d(inputs, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        inputs = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, num_classes)]
    return nn.Sequential(*layers)
