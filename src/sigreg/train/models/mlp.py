"""Plain deep MLP: the unnormalized, non-residual baseline."""

from __future__ import annotations

from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor, nn

from sigreg.train.models.registry import check_positive, register_model


class MLP(nn.Module):
    """Flatten -> (depth - 1) x [Linear(width) -> ReLU] -> Linear classifier.

    Input (B, C, H, W) (or anything that flattens to C*H*W per sample) -> logits (B, num_classes).
    No normalization, residuals or dropout; PyTorch's default Linear init (Kaiming-uniform-style)
    is kept on purpose, so the network is as "raw" as possible.

    SIGReg hooks: the hidden Linear layers ``layers.0`` .. ``layers.{depth-2}``. Their outputs are
    the pre-activations (ReLU is applied functionally, after the module), shape (B, width),
    pooled with "mean" = identity. The classifier ``head`` is not regularized.
    """

    def __init__(
        self, *, num_classes: int, input_dim: int, depth: int = 6, width: int = 1024
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, input_dim=input_dim, width=width)
        if not isinstance(depth, int) or depth < 2:
            raise ValueError(
                f"depth counts Linear layers incl. the classifier; need >= 2, got {depth}"
            )
        dims = [input_dim] + [width] * (depth - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in pairwise(dims))
        self.head = nn.Linear(width, num_classes)

        self.sigreg_layers: list[str] = [f"layers.{i}" for i in range(depth - 1)]
        self.sigreg_pool = "mean"

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, ...) -> logits (B, num_classes)."""
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


@register_model("mlp")
def mlp(
    *, num_classes: int, image_size: int, in_channels: int, depth: int = 6, width: int = 1024
) -> MLP:
    """6 Linear layers (5 hidden of width 1024 + classifier), ReLU."""
    check_positive(image_size=image_size, in_channels=in_channels)
    return MLP(
        num_classes=num_classes, input_dim=in_channels * image_size * image_size,
        depth=depth, width=width,
    )  # fmt: skip
