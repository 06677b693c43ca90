"""Plain deep MLP: the unnormalized, non-residual baseline, and its normalised / residual kin."""

from __future__ import annotations

from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor, nn

from sigreg.train.models.registry import check_positive, register_model

# norm -> layer applied to each hidden Linear's output, before the ReLU.
NORMS: dict[str, type[nn.Module]] = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
# init -> how every Linear's weight is drawn (biases are zeroed, except for "default").
# "default" is PyTorch's own nn.Linear init (uniform, bound 1/sqrt(fan_in)): it shrinks the
# signal's variance about 3x per ReLU layer, the setting the paper's code and our demo keep.
# "he" (He et al., 2015, kaiming_normal_, fan_in, ReLU gain) keeps it constant; "orthogonal"
# (Saxe et al., 2014) with the ReLU gain sqrt(2) does too. These are the controls a reviewer
# asks for before crediting a regularizer with rescuing a deep net.
INITS = ("default", "he", "orthogonal")


def _norm_name(norm: str | None) -> str:
    """``norm`` checked; ``None`` (what ``--set model.norm=none`` parses to) means "none"."""
    name = "none" if norm is None else norm
    if name != "none" and name not in NORMS:
        raise ValueError(f"norm must be one of none, {', '.join(NORMS)}; got {norm!r}")
    return name


class MLP(nn.Module):
    """Flatten -> (depth - 1) x [Linear(width) -> (norm) -> ReLU (+ skip)] -> Linear classifier.

    Input (B, C, H, W) (or anything that flattens to C*H*W per sample) -> logits (B, num_classes).
    By default no normalization, residuals or dropout; PyTorch's default Linear init
    (Kaiming-uniform-style) is kept on purpose, so the network is as "raw" as possible.
    ``init="he"`` or ``"orthogonal"`` draw every Linear's weight so the signal keeps its
    variance through the ReLUs (biases zero): the initialisation control of docs/studies.md.
    ``norm="batch"`` / ``"layer"`` put a BatchNorm1d / LayerNorm between each hidden Linear and
    its ReLU; ``residual=True`` adds the block's input to its output, ``x + relu(...)``, in every
    hidden block whose input has the width (all but the first). These are the architectural
    priors SIGReg is compared with in docs/studies.md.

    SIGReg hooks: the pre-activations (what enters each ReLU), shape (B, width), pooled with
    "mean" = identity: the hidden Linear layers ``layers.0`` .. ``layers.{depth-2}``, or with a
    norm the norm layers ``norms.0`` ... The classifier ``head`` is not regularized.
    """

    def __init__(
        self, *, num_classes: int, input_dim: int, depth: int = 6, width: int = 1024,
        norm: str | None = "none", residual: bool = False, init: str = "default",
    ) -> None:  # fmt: skip
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
        check_positive(num_classes=num_classes, input_dim=input_dim, width=width)
        if not isinstance(depth, int) or depth < 2:
            raise ValueError(
                f"depth counts Linear layers incl. the classifier; need >= 2, got {depth}"
            )
        if not isinstance(residual, bool):
            # ValueError like every other bad setting: the CLI prints it as one line.
            raise ValueError(f"residual must be true or false, got {residual!r}")  # noqa: TRY004
        norm = _norm_name(norm)
        dims = [input_dim] + [width] * (depth - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in pairwise(dims))
        self.head = nn.Linear(width, num_classes)
        self.residual = residual
        if init != "default":
            for linear in (*self.layers, self.head):
                _init_linear(linear, init)
        hooked = "layers"
        if norm != "none":  # only then, so the default's state_dict keys stay as they were
            self.norms = nn.ModuleList(NORMS[norm](width) for _ in range(depth - 1))
            hooked = "norms"

        self.sigreg_layers: list[str] = [f"{hooked}.{i}" for i in range(depth - 1)]
        self.sigreg_pool = "mean"

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, ...) -> logits (B, num_classes)."""
        x = x.flatten(1)
        norms = getattr(self, "norms", None)
        for i, layer in enumerate(self.layers):
            h = layer(x) if norms is None else norms[i](layer(x))
            x = x + F.relu(h) if self.residual and i > 0 else F.relu(h)
        return self.head(x)


def _init_linear(linear: nn.Linear, init: str) -> None:
    """He-normal (fan_in, ReLU gain) or orthogonal (gain sqrt(2)) weight, zero bias."""
    if init == "he":
        nn.init.kaiming_normal_(linear.weight, mode="fan_in", nonlinearity="relu")
    else:
        nn.init.orthogonal_(linear.weight, gain=nn.init.calculate_gain("relu"))
    nn.init.zeros_(linear.bias)


@register_model("mlp")
def mlp(
    *, num_classes: int, image_size: int, in_channels: int, depth: int = 6, width: int = 1024,
    norm: str | None = "none", residual: bool = False, init: str = "default",
) -> MLP:  # fmt: skip
    """6 Linear layers (5 hidden of width 1024 + classifier), ReLU; optional norm / residual;
    ``init`` one of default (PyTorch's), he, orthogonal."""
    check_positive(image_size=image_size, in_channels=in_channels)
    return MLP(
        num_classes=num_classes, input_dim=in_channels * image_size * image_size,
        depth=depth, width=width, norm=norm, residual=residual, init=init,
    )  # fmt: skip
