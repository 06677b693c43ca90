"""The two SIGReg losses as defined: a few lines of plain torch autograd each, to read first.

:func:`sigreg.weak_sigreg` and :func:`sigreg.strong_sigreg` compute the same numbers faster
(gradients written out, constants folded and cached, a stack of layers in a few batched
kernels); tests/test_functional.py checks them against the functions here in float64, values
and gradients. The pieces of the strong loss's definition are written here once and used by
every implementation: the target :func:`standard_normal_cf`, the weight function
:func:`epps_pulley_weight` and the quadrature :func:`trapezoid_weights`. Changing one of them
is one edit.

Shapes: features z (N, C), or a stack of layers (*, N, C); projections (C, K), shared by
every layer, or (*, C, K), one per layer; a loss per layer (*). Everything is computed in z's
dtype (float32 or float64: use float64 for exact references), projections cast to it.
"""

from __future__ import annotations

import torch


def weak_sigreg_reference(z: torch.Tensor, sketch: torch.Tensor | None = None,
                          scale_invariant: bool = False) -> torch.Tensor:
    """Weak-SIGReg: ``|| Cov(Z S) - I_K ||_F``, the plain Frobenius norm (not squared), with
    the unbiased covariance (divides by N - 1).

    Args:
        z: features (N, C) or (*, N, C).
        sketch: S (C, K) or (*, C, K), or None for the full (C, C) covariance (K = C).
        scale_invariant: Z S divided first by max(1, its root mean square over N and K)
            (the mean included, not differentiated): ``|| Cov(Z S / max(1, r)) - I_K ||_F``.

    Returns:
        The loss of each layer, shape (*), z's dtype.

    Source: Weak-SIGReg, arXiv 2603.05924, L = L_CE + lambda || Cov(Z S) - I ||_F.
    """
    y = z if sketch is None else z @ sketch.to(z.dtype)  # (*, N, K)
    if scale_invariant:
        y = y / y.detach().square().mean((-2, -1), keepdim=True).sqrt().clamp_min(1.0)
    centred = y - y.mean(-2, keepdim=True)
    cov = centred.mT @ centred / (y.shape[-2] - 1)  # (*, K, K)
    identity = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    return torch.linalg.matrix_norm(cov - identity)  # Frobenius


def standard_normal_cf(t: torch.Tensor) -> torch.Tensor:
    """phi(t) = exp(-t^2 / 2), the characteristic function of N(0, 1): the target of every
    direction's empirical one (real, as N(0, 1) is symmetric)."""
    return torch.exp(-0.5 * t * t)


def epps_pulley_weight(t: torch.Tensor) -> torch.Tensor:
    """w(t) = exp(-t^2 / 2), the weight of the Epps-Pulley integral (LeJEPA's choice)."""
    return torch.exp(-0.5 * t * t)


def trapezoid_weights(
    t_max: float, num_points: int, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quadrature: nodes t on [0, t_max] and weights q with
    ``sum_j q_j f(t_j) ~= int_{-t_max}^{t_max} f(t) dt`` for an even f.

    The trapezoid rule on ``num_points`` equally spaced nodes t_j = j t_max / (num_points - 1),
    both ends included, its weights doubled (the strong loss's integrand is even in t).
    :func:`sigreg.strong_sigreg` evaluates exp(i t_j p) as powers of exp(i t_1 p), so it
    needs nodes of that form (0, h, 2h, ...); the weights may be anything.
    """
    t = torch.linspace(0.0, t_max, num_points, device=device, dtype=dtype)
    q = torch.full((num_points,), t_max / (num_points - 1), device=device, dtype=dtype)
    q[0] = q[-1] = q[0] / 2
    return t, 2 * q  # doubled: the integrand is even in t


def epps_pulley_integrand(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``N |ECF(t) - phi(t)|^2 w(t)`` for each direction, with ECF(t) = mean_n exp(i t p_n).

    Args:
        p: projected features Z A (*, N, K), one column per direction.
        t: nodes (T,), any grid.

    Returns:
        Real tensor (*, K, T).
    """
    ecf = torch.exp(1j * t * p.unsqueeze(-1)).mean(-3)  # (*, K, T), complex
    return p.shape[-2] * (ecf - standard_normal_cf(t)).abs().square() * epps_pulley_weight(t)


def strong_sigreg_reference(
    z: torch.Tensor, directions: torch.Tensor, t_max: float = 3.0, num_points: int = 17
) -> torch.Tensor:
    """Strong SIGReg: the Epps-Pulley statistic of each direction's projected features p = Z a,
    ``N int_{-t_max}^{t_max} |ECF(t) - exp(-t^2/2)|^2 w(t) dt`` with w(t) = exp(-t^2/2),
    averaged over the K directions; integrated with :func:`trapezoid_weights`.

    Args:
        z: features (N, C) or (*, N, C).
        directions: unit columns A (C, K) or (*, C, K). :func:`sigreg.strong_sigreg` with
            ``directions=None`` uses ``sigreg.draw_directions(C, K, generator, batch=*)``.
        t_max, num_points: the quadrature (nodes on [0, t_max], both ends included).

    Returns:
        The loss of each layer, shape (*), z's dtype (0 for a perfect standard normal).

    Source: LeJEPA (Balestriero & LeCun), arXiv 2511.08544, the Epps-Pulley SIGReg loss;
    Epps & Pulley (1983).
    """
    p = z @ directions.to(z.dtype)  # (*, N, K)
    t, q = trapezoid_weights(t_max, num_points, device=z.device, dtype=z.dtype)
    return (epps_pulley_integrand(p, t) @ q).mean(-1)  # integral over t, mean over directions
