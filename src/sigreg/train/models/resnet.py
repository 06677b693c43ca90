"""ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from sigreg.train.models.registry import check_positive, register_model


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the following BatchNorm has its own shift.
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(BN(conv(relu(BN(conv(x))))) + shortcut(x)); shortcut = 1x1 conv + BN when the shape
    changes. (B, c_in, H, W) -> (B, c_out, ceil(H / stride), ceil(W / stride))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet of BasicBlocks.

    Input (B, in_channels, S, S) -> logits (B, num_classes). Stage i has ``width * 2**i`` channels
    and ``blocks[i]`` blocks; every stage after the first halves the resolution (28 -> 28, 14, 7,
    4; 32 -> 32, 16, 8, 4). Global average pool, then Linear.

    SIGReg hooks: every BasicBlock (``layer1.0`` ... ``layer4.1``), output (B, C, H, W), pooled
    with "mean" = mean over H, W.
    """

    def __init__(
        self, *, num_classes: int, in_channels: int, width: int = 64,
        blocks: Sequence[int] = (2, 2, 2, 2),
    ) -> None:  # fmt: skip
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        if not blocks:
            raise ValueError("blocks must list at least one stage")
        check_positive(**{f"blocks[{i}]": n for i, n in enumerate(blocks)})
        self.stem = nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU())
        self.sigreg_layers: list[str] = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            stage = [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if i and not j else 1)
                     for j in range(n)]  # fmt: skip
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.sigreg_layers += [f"layer{i + 1}.{j}" for j in range(n)]
            c_in = c_out
        self.head = nn.Linear(c_in, num_classes)
        self.sigreg_pool = "mean"
        self.num_stages = len(blocks)

        # He init for convs (as in the ResNet paper); BN starts as the identity map.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, S, S) -> logits (B, num_classes)."""
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.head(x.mean(dim=(2, 3)))  # global average pool


@register_model("resnet18")
def resnet18(
    *, num_classes: int, image_size: int, in_channels: int, width: int = 64,
    blocks: Sequence[int] = (2, 2, 2, 2),
) -> ResNet:  # fmt: skip
    """ResNet-18 (CIFAR stem), widths 64-128-256-512. ``image_size`` is only validated: the
    network is fully convolutional up to the global pool."""
    check_positive(image_size=image_size)
    return ResNet(num_classes=num_classes, in_channels=in_channels, width=width, blocks=blocks)
