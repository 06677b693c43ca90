"""``nn.Module`` wrappers that own the sketch S (weak) or directions A (strong): the
projection (C, K) of features of width C to K = ``sketch_dim`` dimensions.

Each takes features (N, C) or a stack of layers (*, N, C) and returns one value per layer,
shape (*). The loss itself is :meth:`~Regularizer.compute`, a pure function of the features
and the projection (what :func:`sigreg.attach` calls, possibly compiled). The projections
come from the module's stream, ``regularizer.projections``
(:class:`sigreg._projections.LayerProjections`), which an :func:`sigreg.attach` handle
draws from too: a call on a stack (L, N, C) draws what a handle's step draws for one group
of L layers (layer i of the stack is the handle's layer i), so a module on a layer's
features gives the value a one-layer handle with the same seed gives, call after call.

The ``sketch_policy``:

- ``"resample"`` (default): a fresh projection every call, one per layer of the stack in
  one draw, from a generator seeded with (seed, call count) on the features' device.
  A fixed K-dimensional sketch only constrains the K-dim subspace it spans
  (Cov(ZS) = S^T Cov(Z) S can equal I while Z collapses in the other C - K directions);
  resampling covers every direction over training, as the paper's public code does.
- ``"fixed"``: layer i's drawn once from ``seed + i`` (on the CPU, so identical on every
  device) and kept: the paper text's choice.

``state_dict`` holds the stream's state (the call count and the fixed projections), so a
resumed run draws the same sequence. Both policies are identical on every rank of a
distributed job because they depend on the seed only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._checks import (
    check_choice,
    check_flag,
    check_has_values,
    check_int,
    check_optional_bool,
    check_positive,
)
from ._projections import LayerProjections
from ._renamed import renamed_keywords, renamed_message
from .functional import check_quadrature, strong_sigreg, vicreg_varcov, weak_sigreg
from .sketch import draw_directions, draw_sketch

SKETCH_POLICIES = ("resample", "fixed")


def _check_stack(z: torch.Tensor) -> None:
    check_has_values(z, "features")
    if not isinstance(z, torch.Tensor) or z.dim() < 2 or 0 in z.shape[:-2]:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"features must be 2-D (N, C) or a stack (*, N, C) of at least one "
                         f"layer, got {shape}")


class Regularizer(nn.Module):
    """A regularizer of features (*, N, C): ``compute(z, projection)`` is the loss, a pure
    function; ``draw`` makes the projection it needs (None: it needs none); ``projections``
    is the stream of draws that ``forward`` and :func:`sigreg.attach` share."""

    def __init__(self) -> None:
        super().__init__()
        self.projections = LayerProjections(self)

    def draw(self, in_features: int, generator: torch.Generator, device,
             batch: Sequence[int] = ()) -> torch.Tensor | None:
        """The projection for features of width ``in_features``, one per ``batch`` entry."""
        return None

    def compute(self, z: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
        """The loss of z (*, N, C) with ``projection`` ((C, K), (*, C, K) or None), shape (*)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The loss of z (N, C) or (*, N, C), shape (*), with the stream's next projections:
        the stack, flattened to (L, N, C), is one group of L layers of one step.

        Raises:
            ValueError if z is not a tensor of 2 dimensions or more, is an empty stack, or
            if its width is not the one a fixed projection was drawn for.
        """
        _check_stack(z)
        batch = z.shape[:-2]
        stack = z.reshape(math.prod(batch), *z.shape[-2:])
        projection = self.projections.for_group(0, tuple(range(len(stack))), stack)
        self.projections.advance()
        return self.compute(stack, projection).view(batch)


class _ProjectedSIGReg(Regularizer):
    """Checked projection settings, and the stream's state in ``state_dict``; subclasses
    define ``draw`` and ``compute``."""

    def __init__(
        self, sketch_dim: int | None, sketch_policy: str, seed: int, distributed: bool | None
    ) -> None:
        super().__init__()
        if sketch_dim is not None:
            check_int(sketch_dim, "sketch_dim (K, the projection's width)")
        check_choice(sketch_policy, "sketch_policy", SKETCH_POLICIES)
        check_int(seed, "seed", minimum=-(2**63))
        check_optional_bool(distributed, "distributed")
        self.sketch_dim = sketch_dim
        self.sketch_policy = sketch_policy
        self.seed = int(seed)
        self.distributed = distributed

    @property
    def num_projections(self) -> int | None:
        """Deprecated: ``sketch_dim``."""
        return self._renamed_attribute("num_projections", "sketch_dim")

    @property
    def policy(self) -> str:
        """Deprecated: ``sketch_policy``."""
        return self._renamed_attribute("policy", "sketch_policy")

    def _renamed_attribute(self, old: str, new: str) -> Any:
        warnings.warn(renamed_message(old, new, f"sigreg.{type(self).__name__}", "attribute"),
                      FutureWarning, stacklevel=3)
        return getattr(self, new)

    def get_extra_state(self) -> dict[str, Any]:
        return self.projections.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.projections.load_state_dict(state)

    def extra_repr(self) -> str:
        return (f"sketch_dim={self.sketch_dim}, sketch_policy={self.sketch_policy!r}, "
                f"seed={self.seed}")


class WeakSIGReg(_ProjectedSIGReg):
    """Weak-SIGReg loss ``|| Cov(Z S) - I_K ||_F`` on features (N, C) or (*, N, C).

    Args:
        sketch_dim: K, the sketch width (paper: 64). None, or K >= C, uses the full
            (C, C) covariance with no sketch.
        sketch_policy: ``"resample"`` (fresh S each call, default) or ``"fixed"`` (drawn
            once). ``sketch=``, its old name, is deprecated.
        seed: seed of the sketch stream; use the same on every rank.
        distributed: statistics over the global batch (None: whenever torch.distributed
            is initialised with more than one rank).
        scale_invariant: above unit power, isotropy at the features' own power, not unit
            variance (see :func:`sigreg.weak_sigreg`); not in the paper.

    Shape: input (N, C) or a stack of layers (*, N, C) (one sketch per layer, drawn in one
    call), output (*) (a scalar for (N, C)).

    Reference: Weak-SIGReg: Covariance Regularization for Stable Deep Learning,
    arXiv 2603.05924.

    Examples:
        >>> import torch, sigreg
        >>> z = torch.randn(256, 32, generator=sigreg.seeded_generator(0))
        >>> reg = sigreg.WeakSIGReg(sketch_dim=8, seed=0)   # a fresh sketch at every call
        >>> first, second = reg(z), reg(z)
        >>> print(f"{first:.2f} {second:.2f}")
        1.67 1.56
        >>> again = sigreg.WeakSIGReg(sketch_dim=8, seed=0)  # the same seed, the same draws
        >>> bool(again(z) == first)
        True
        >>> reg(torch.randn(4, 256, 32)).shape               # a stack of 4 layers
        torch.Size([4])
    """

    @renamed_keywords(sketch="sketch_policy")
    def __init__(
        self,
        sketch_dim: int | None = 64,
        sketch_policy: str = "resample",
        seed: int = 0,
        distributed: bool | None = None,
        scale_invariant: bool = False,
    ) -> None:
        super().__init__(sketch_dim, sketch_policy, seed, distributed)
        check_flag(scale_invariant, "scale_invariant")
        self.scale_invariant = scale_invariant

    def extra_repr(self) -> str:
        return super().extra_repr() + (", scale_invariant=True" if self.scale_invariant else "")

    def draw(self, in_features, generator, device, batch=()):
        k = self.sketch_dim
        if k is None or k >= in_features:
            return None  # no sketch: full covariance, as in the paper when C <= K
        return draw_sketch(in_features, k, generator, device, batch)

    def compute(self, z, projection):
        return weak_sigreg(z, projection, distributed=self.distributed,
                           scale_invariant=self.scale_invariant)


class StrongSIGReg(_ProjectedSIGReg):
    """Strong SIGReg (LeJEPA's Epps-Pulley statistic) on features (N, C) or (*, N, C).

    Args:
        sketch_dim: K, the number of random unit directions (paper's supervised runs: 64;
            LeJEPA uses 256-1024). ``num_directions=``, its old name, is deprecated.
        t_max: half-width of the integration interval [-t_max, t_max] (LeJEPA 3, the
            paper's code 5).
        num_points: trapezoid nodes on [0, t_max] only (the integrand is even; the sum is
            doubled): the paper's code's "17 points on [-5, 5]" is ``t_max=5,
            num_points=9``.
        sketch_policy: as for :class:`WeakSIGReg`.
        seed: as for :class:`WeakSIGReg`.
        distributed: as for :class:`WeakSIGReg`.

    Shape: input (N, C) or a stack of layers (*, N, C), output (*).

    Reference: LeJEPA, arXiv 2511.08544.

    Examples:
        >>> import torch, sigreg
        >>> z = torch.randn(256, 32, generator=sigreg.seeded_generator(0))
        >>> reg = sigreg.StrongSIGReg(16, seed=0)            # K = 16 unit directions
        >>> print(f"{reg(z):.2f} {reg(0.1 * z):.0f}")       # Gaussian, then shrunk
        0.95 99
        >>> reg(torch.randn(4, 256, 32)).shape               # a stack of 4 layers
        torch.Size([4])
    """

    @renamed_keywords(num_directions="sketch_dim", sketch="sketch_policy")
    def __init__(
        self,
        sketch_dim: int = 64,
        t_max: float = 3.0,
        num_points: int = 17,
        sketch_policy: str = "resample",
        seed: int = 0,
        distributed: bool | None = None,
    ) -> None:
        if sketch_dim is None:
            raise ValueError("StrongSIGReg needs sketch_dim, its number of directions (an "
                             "integer >= 1), got None")
        self.t_max, self.num_points = check_quadrature(t_max, num_points)
        super().__init__(sketch_dim, sketch_policy, seed, distributed)

    def draw(self, in_features, generator, device, batch=()):
        return draw_directions(in_features, self.sketch_dim, generator, device, batch)

    def compute(self, z, projection):
        return strong_sigreg(z, projection, self.t_max, self.num_points,
                             distributed=self.distributed)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, t_max={self.t_max}, num_points={self.num_points}"


class VarCovReg(Regularizer):
    """VICReg's variance + covariance terms on features (N, C) or (*, N, C): a baseline,
    not SIGReg.

    Full (C, C) covariance, no sketch, nothing random: see :func:`sigreg.vicreg_varcov`.

    Args:
        gamma: target standard deviation of each feature (VICReg: 1).
        var_weight: weight of the variance hinge (VICReg's mu = 25).
        cov_weight: weight of the off-diagonal covariance (VICReg's nu = 1).
        eps: added to variances before the square root.
        distributed: statistics over the global batch (None: automatic).

    Shape: input (N, C) or (*, N, C), output (*).

    Reference: VICReg, arXiv 2105.04906.

    Examples:
        >>> import torch, sigreg
        >>> z = torch.randn(256, 32, generator=sigreg.seeded_generator(0))
        >>> bool(sigreg.VarCovReg()(z) == sigreg.vicreg_varcov(z))
        True
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
        self.gamma = check_positive(gamma, "gamma")
        self.var_weight = check_positive(var_weight, "var_weight", allow_zero=True)
        self.cov_weight = check_positive(cov_weight, "cov_weight", allow_zero=True)
        if self.var_weight + self.cov_weight == 0:
            raise ValueError("var_weight and cov_weight must not both be 0")
        self.eps = check_positive(eps, "eps")
        check_optional_bool(distributed, "distributed")
        self.distributed = distributed

    def compute(self, z, projection=None):
        return vicreg_varcov(z, gamma=self.gamma, var_weight=self.var_weight,
                             cov_weight=self.cov_weight, eps=self.eps,
                             distributed=self.distributed)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, var_weight={self.var_weight}, "
                f"cov_weight={self.cov_weight}, eps={self.eps}")


VARIANTS = {"weak": WeakSIGReg, "strong": StrongSIGReg, "vicreg": VarCovReg}
# Settings of the projection stream, meaningless for a regularizer that projects nothing.
_PROJECTION_KWARGS = ("sketch_policy", "seed")
# The options each variant takes besides sketch_dim (for clear errors on unknown ones).
VARIANT_OPTIONS = {
    "weak": ("sketch_policy", "seed", "distributed", "scale_invariant"),
    "strong": ("t_max", "num_points", "sketch_policy", "seed", "distributed"),
    "vicreg": ("gamma", "var_weight", "cov_weight", "eps", "distributed", *_PROJECTION_KWARGS),
}


@renamed_keywords(sketch="sketch_policy")
def make_regularizer(variant: str, sketch_dim: int | None = 64, **kwargs: Any) -> Regularizer:
    """Build a regularizer by name: ``"weak"``, ``"strong"`` (sketch_dim = K for both) or
    ``"vicreg"`` (the baseline; full covariance, so ``sketch_dim``, ``sketch_policy``
    and ``seed`` do not apply and are ignored).

    Examples:
        >>> import sigreg
        >>> type(sigreg.make_regularizer("weak", 16)).__name__
        'WeakSIGReg'
        >>> strong = sigreg.make_regularizer("strong", 16, t_max=5, num_points=9)
        >>> type(strong).__name__, strong.t_max, strong.num_points
        ('StrongSIGReg', 5.0, 9)
        >>> sigreg.make_regularizer("vicreg", var_weight=10.0).var_weight
        10.0
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown regularizer variant {variant!r}; choose one of {sorted(VARIANTS)}")
    unknown = sorted(set(kwargs) - set(VARIANT_OPTIONS[variant]))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for variant {variant!r}; it takes "
                        f"{list(VARIANT_OPTIONS[variant])}")
    if variant == "vicreg":
        return VarCovReg(**{key: value for key, value in kwargs.items()
                            if key not in _PROJECTION_KWARGS})
    return VARIANTS[variant](sketch_dim, **kwargs)
