"""Random sketches (weak SIGReg) and unit directions (strong SIGReg): the projection
(C, K) of features of width C to K = ``sketch_dim`` dimensions.

Both are drawn from an explicit ``torch.Generator`` so that every rank of a distributed
job, and every resumed run, sees exactly the same matrices. A leading ``batch`` shape draws
one matrix per layer of a stack in a single call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import check_int
from ._renamed import renamed_keywords


def _batch_shape(batch: int | Sequence[int]) -> tuple[int, ...]:
    shape = (batch,) if isinstance(batch, int) else tuple(batch)
    for size in shape:
        check_int(size, "batch size")
    return shape


def _gaussian(
    batch: int | Sequence[int], rows: int, cols: int, generator: torch.Generator | None, device
) -> torch.Tensor:
    """Standard normal (*batch, rows, cols), drawn on the generator's device (reproducible)."""
    check_int(rows, "in_features")
    check_int(cols, "sketch_dim")
    gen_device = generator.device if generator is not None else device
    return torch.randn(*_batch_shape(batch), rows, cols, generator=generator, device=gen_device)


def draw_sketch(
    in_features: int,
    sketch_dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    batch: int | Sequence[int] = (),
) -> torch.Tensor:
    """Gaussian sketch S of shape (*batch, C, K) with entries N(0, 1/C).

    The 1/sqrt(C) scale keeps Cov(Z S) = S^T Cov(Z) S near I_K when Cov(Z) = I_C, as in
    the paper's code. Drawn on ``generator``'s device, then moved to ``device``. ``batch``
    (e.g. the number of layers) draws that many independent sketches in one call.

    Examples:
        >>> import sigreg
        >>> sketch = sigreg.draw_sketch(256, 64, sigreg.seeded_generator(0))
        >>> sketch.shape
        torch.Size([256, 64])
        >>> print(f"{sketch.var() * 256:.2f}")   # entries N(0, 1/C)
        1.01
        >>> sigreg.draw_sketch(256, 64, sigreg.seeded_generator(0), batch=3).shape
        torch.Size([3, 256, 64])
    """
    s = _gaussian(batch, in_features, sketch_dim, generator, device)
    return s.div_(math.sqrt(in_features)).to(device)


@renamed_keywords(num_directions="sketch_dim")
def draw_directions(
    in_features: int,
    sketch_dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    batch: int | Sequence[int] = (),
) -> torch.Tensor:
    """Random unit directions A of shape (*batch, C, K): Gaussian columns of length 1,
    K = ``sketch_dim`` (``num_directions=`` is its deprecated old name).

    At width C = 1 every direction is +1 or -1, which give the same Epps-Pulley statistic:
    all are +1 (normalising a draw would give 0/0 = NaN for the exact zero that float32
    draws hold about once in 1e7; at C >= 2 an all-zero column is below 1e-13).

    Examples:
        >>> import torch, sigreg
        >>> directions = sigreg.draw_directions(32, 16, sigreg.seeded_generator(0))
        >>> directions.shape
        torch.Size([32, 16])
        >>> torch.allclose(directions.norm(dim=0), torch.ones(16))   # unit columns
        True
    """
    if in_features == 1:
        check_int(sketch_dim, "sketch_dim")
        return torch.ones(*_batch_shape(batch), 1, sketch_dim, device=device)
    a = _gaussian(batch, in_features, sketch_dim, generator, device)
    return (a / a.norm(dim=-2, keepdim=True)).to(device)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (same stream on every rank).

    Examples:
        >>> import torch, sigreg
        >>> a = torch.randn(3, generator=sigreg.seeded_generator(7))
        >>> torch.equal(a, torch.randn(3, generator=sigreg.seeded_generator(7)))
        True
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def mix_seed(seed: int, step: int) -> int:
    """Deterministic 63-bit seed for draw number ``step`` of stream ``seed`` (splitmix64
    finaliser): nearby seeds and steps give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1
