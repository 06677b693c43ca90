"""Random sketches (weak SIGReg) and unit directions (strong SIGReg).

Both are drawn from an explicit ``torch.Generator`` so that every rank of a distributed
job, and every resumed run, sees exactly the same matrices.
"""

from __future__ import annotations

import math

import torch


def _check_dims(in_features: int, sketch_dim: int) -> None:
    if in_features < 1 or sketch_dim < 1:
        raise ValueError(
            f"in_features and sketch_dim must be positive, got {in_features} and {sketch_dim}"
        )


def _gaussian(rows: int, cols: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal (rows, cols), drawn on the generator's device for reproducibility."""
    _check_dims(rows, cols)
    gen_device = generator.device if generator is not None else device
    return torch.randn(rows, cols, generator=generator, device=gen_device)


def draw_sketch(
    in_features: int,
    sketch_dim: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian sketch S of shape (C, K) with entries N(0, 1/C).

    The 1/sqrt(C) scale keeps Cov(Z S) = S^T Cov(Z) S near I_K when Cov(Z) = I_C, as in
    the paper's code. Drawn on ``generator``'s device, then moved to ``device``.
    """
    s = _gaussian(in_features, sketch_dim, generator, device)
    return s.div_(math.sqrt(in_features)).to(device)


def draw_directions(
    in_features: int,
    num_directions: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random unit directions A of shape (C, K): Gaussian columns normalised to length 1."""
    a = _gaussian(in_features, num_directions, generator, device)
    return (a / a.norm(dim=0, keepdim=True)).to(device)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (same stream on every rank)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
