"""``nn.Module`` wrappers that own the sketch (weak) or directions (strong).

Sketch policies:
- ``"resample"`` (default): a fresh projection every call, drawn from a generator seeded
  with (seed, call count) on the features' device. A fixed K-dimensional sketch only
  constrains the K-dim subspace it spans (Cov(ZS) = S^T Cov(Z) S can equal I while Z
  collapses in the other C - K directions); resampling covers every direction over
  training, as the paper's public code does. The call count is saved in ``state_dict``
  so a resumed run draws the same sequence.
- ``"fixed"``: drawn once from ``seed`` (on the CPU, so identical on every device) and
  kept as a buffer, saved in ``state_dict``: the paper text's choice.
Both are identical on every rank of a distributed job because they depend on the seed only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .functional import strong_sigreg, vicreg_varcov, weak_sigreg
from .sketch import draw_directions, draw_sketch, seeded_generator

POLICIES = ("resample", "fixed")


def _mix_seed(seed: int, step: int) -> int:
    """Deterministic 63-bit seed for draw number ``step`` (splitmix64 finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


class _ProjectedSIGReg(nn.Module):
    """Shared projection bookkeeping; subclasses define ``_draw`` and ``_loss``."""

    def __init__(
        self, num_projections: int | None, sketch: str, seed: int, distributed: bool | None
    ) -> None:
        super().__init__()
        if num_projections is not None and num_projections < 1:
            raise ValueError(f"number of projections must be positive or None, got {num_projections}")
        if sketch not in POLICIES:
            raise ValueError(f"sketch policy must be one of {POLICIES}, got {sketch!r}")
        self.num_projections = num_projections
        self.policy = sketch
        self.seed = int(seed)
        self.distributed = distributed
        self.calls = 0
        # Empty until the first forward tells us the feature width C.
        self.register_buffer("projection", torch.empty(0))
        self._generators: dict[torch.device, torch.Generator] = {}

    def _draw(self, in_features: int, generator: torch.Generator, device) -> torch.Tensor | None:
        raise NotImplementedError

    def current_projection(self, z: torch.Tensor) -> torch.Tensor | None:
        """The projection used for a batch ``z`` (N, C); advances the resample counter."""
        c = z.shape[-1]
        if self.policy == "fixed":
            if self.projection.numel() == 0:
                drawn = self._draw(c, seeded_generator(self.seed), "cpu")
                if drawn is None:
                    return None
                self.projection = drawn.to(z.device)
            if self.projection.shape[0] != c:
                raise ValueError(
                    f"this regularizer's fixed sketch was drawn for width "
                    f"{self.projection.shape[0]}, got features of width {c}"
                )
            return self.projection
        gen = self._generators.get(z.device)
        if gen is None:
            gen = self._generators[z.device] = torch.Generator(device=z.device)
        gen.manual_seed(_mix_seed(self.seed, self.calls))
        self.calls += 1
        return self._draw(c, gen, z.device)

    def get_extra_state(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The buffer is lazily sized: adopt the saved shape before the strict copy.
        saved = state_dict.get(prefix + "projection")
        if saved is not None and saved.shape != self.projection.shape:
            self.projection = torch.empty_like(saved, device=self.projection.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_projections={self.num_projections}, sketch={self.policy!r}, seed={self.seed}"


class WeakSIGReg(_ProjectedSIGReg):
    """Weak-SIGReg loss ``|| Cov(Z S) - I_K ||_F`` on features (N, C).

    Args:
        sketch_dim: K, the sketch width (paper: 64). None, or K >= C, uses the full
            (C, C) covariance with no sketch.
        sketch: ``"resample"`` (fresh S each call, default) or ``"fixed"`` (drawn once).
        seed: seed of the sketch stream; use the same on every rank.
        distributed: statistics over the global batch (None: whenever torch.distributed
            is initialised with more than one rank).

    Shape: input (N, C), output scalar.

    Reference: Weak-SIGReg: Covariance Regularization for Stable Deep Learning,
    arXiv 2603.05924.
    """

    def __init__(
        self,
        sketch_dim: int | None = 64,
        sketch: str = "resample",
        seed: int = 0,
        distributed: bool | None = None,
    ) -> None:
        super().__init__(sketch_dim, sketch, seed, distributed)

    def _draw(self, in_features, generator, device):
        k = self.num_projections
        if k is None or k >= in_features:
            return None  # no sketch: full covariance, as in the paper when C <= K
        return draw_sketch(in_features, k, generator, device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2:
            raise ValueError(f"features must be 2-D (N, C), got shape {tuple(z.shape)}")
        return weak_sigreg(z, self.current_projection(z), distributed=self.distributed)


class StrongSIGReg(_ProjectedSIGReg):
    """Strong SIGReg (LeJEPA's Epps-Pulley statistic) on features (N, C).

    Args:
        num_directions: K random unit directions (paper's supervised runs: 64; LeJEPA
            uses 256-1024).
        t_max, num_points: integration interval [-t_max, t_max] and trapezoid nodes on
            [0, t_max].
        sketch, seed, distributed: as for :class:`WeakSIGReg`.

    Shape: input (N, C), output scalar.

    Reference: LeJEPA, arXiv 2511.08544.
    """

    def __init__(
        self,
        num_directions: int = 64,
        t_max: float = 3.0,
        num_points: int = 17,
        sketch: str = "resample",
        seed: int = 0,
        distributed: bool | None = None,
    ) -> None:
        if num_directions is None:
            raise ValueError("StrongSIGReg needs a number of directions")
        if not t_max > 0:
            raise ValueError(f"t_max must be positive, got {t_max}")
        if num_points < 2:
            raise ValueError(f"num_points must be at least 2, got {num_points}")
        super().__init__(num_directions, sketch, seed, distributed)
        self.t_max = float(t_max)
        self.num_points = int(num_points)

    def _draw(self, in_features, generator, device):
        return draw_directions(in_features, self.num_projections, generator, device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2:
            raise ValueError(f"features must be 2-D (N, C), got shape {tuple(z.shape)}")
        return strong_sigreg(
            z,
            self.current_projection(z),
            self.t_max,
            self.num_points,
            distributed=self.distributed,
        )


class VarCovReg(nn.Module):
    """VICReg's variance + covariance terms on features (N, C): a baseline, not SIGReg.

    Full (C, C) covariance, no sketch, nothing random: see :func:`sigreg.vicreg_varcov`.

    Args:
        gamma: target standard deviation of each feature (VICReg: 1).
        var_weight, cov_weight: weights of the variance hinge and of the off-diagonal
            covariance (VICReg's mu = 25 and nu = 1).
        eps: added to variances before the square root.
        distributed: statistics over the global batch (None: automatic).

    Shape: input (N, C), output scalar.

    Reference: VICReg, arXiv 2105.04906.
    """

    def __init__(
        self,
        gamma: float = 1.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        eps: float = 1e-4,
        distributed: bool | None = None,
    ) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if not (var_weight >= 0 and cov_weight >= 0) or var_weight + cov_weight == 0:
            raise ValueError(f"var_weight and cov_weight must be non-negative and not both 0, "
                             f"got {var_weight} and {cov_weight}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.gamma, self.var_weight, self.cov_weight = float(gamma), float(var_weight), float(cov_weight)
        self.eps = float(eps)
        self.distributed = distributed

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2:
            raise ValueError(f"features must be 2-D (N, C), got shape {tuple(z.shape)}")
        return vicreg_varcov(z, gamma=self.gamma, var_weight=self.var_weight,
                             cov_weight=self.cov_weight, eps=self.eps,
                             distributed=self.distributed)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, var_weight={self.var_weight}, "
                f"cov_weight={self.cov_weight}, eps={self.eps}")


VARIANTS = {"weak": WeakSIGReg, "strong": StrongSIGReg, "vicreg": VarCovReg}
# Settings of the projection stream, meaningless for a regularizer that projects nothing.
_PROJECTION_KWARGS = ("sketch", "seed")


def make_regularizer(variant: str, sketch_dim: int | None = 64, **kwargs: Any) -> nn.Module:
    """Build a regularizer by name: ``"weak"``, ``"strong"`` (sketch_dim = K for both) or
    ``"vicreg"`` (the baseline; full covariance, so ``sketch_dim``, ``sketch`` and ``seed``
    do not apply and are ignored)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown regularizer variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if variant == "vicreg":
        return VarCovReg(**{k: v for k, v in kwargs.items() if k not in _PROJECTION_KWARGS})
    return VARIANTS[variant](sketch_dim, **kwargs)
