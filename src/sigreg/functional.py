"""The two SIGReg losses as plain functions of a batch of features Z (N, C).

Both compute in float32 with autocast switched off, whatever Z's dtype (float64 inputs stay
float64), because the statistics (covariances, characteristic functions) are too imprecise
in bf16/fp16.
Under ``torch.distributed`` they are computed over the global batch by default.
"""

from __future__ import annotations

import functools

import torch

from .distributed import all_reduce_sum, broadcast_from_rank0, use_distributed
from .sketch import draw_directions


def _check_features(z: torch.Tensor, min_rows: int) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"features must be 2-D (N, C), got shape {tuple(z.shape)}")
    if z.shape[0] < min_rows:
        raise ValueError(
            f"need at least {min_rows} samples to estimate statistics, got N={z.shape[0]}"
        )


def _check_projection(p: torch.Tensor, in_features: int, name: str) -> None:
    if p.dim() != 2 or p.shape[0] != in_features:
        raise ValueError(
            f"{name} must have shape (C, K) with C={in_features} (the feature width), "
            f"got {tuple(p.shape)}"
        )


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (exact references, gradcheck)."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _batch_count(z: torch.Tensor, distributed: bool) -> torch.Tensor | int:
    if not distributed:
        return z.shape[0]
    return all_reduce_sum(torch.tensor(float(z.shape[0]), device=z.device))


def weak_sigreg(
    z: torch.Tensor, sketch: torch.Tensor | None = None, *, distributed: bool | None = None
) -> torch.Tensor:
    """Weak-SIGReg: ``|| Cov(Z S) - I_K ||_F`` (Frobenius norm, not squared).

    Args:
        z: features, shape (N, C). Any float dtype; computed in float32 (float64 kept).
        sketch: projection S, shape (C, K), or None for the full (C, C) covariance.
        distributed: pool statistics over all ranks. None: whenever a process group with
            more than one rank is initialised.

    Returns:
        Scalar float32 tensor. Covariance is unbiased (divides by N - 1).

    Reference: Weak-SIGReg, arXiv 2603.05924, eq. L = L_CE + lambda ||Cov(ZS) - I||_F.
    """
    distributed = use_distributed(distributed)
    _check_features(z, min_rows=1 if distributed else 2)
    if sketch is not None:
        _check_projection(sketch, z.shape[1], "sketch")
    with torch.autocast(device_type=z.device.type, enabled=False):
        y = z.to(_compute_dtype(z))
        if sketch is not None:
            y = y @ sketch.to(device=y.device, dtype=y.dtype)
        return torch.linalg.matrix_norm(_covariance(y, distributed, minus_identity=True))


def _covariance(y: torch.Tensor, distributed: bool, minus_identity: bool = False) -> torch.Tensor:
    """Unbiased (C, C) covariance of y (N, C), minus I_C if asked, over the global batch
    when distributed. Centred with the mean first: exact, unlike sum(yy^T) - n mu mu^T."""
    eye = torch.eye(y.shape[1], device=y.device, dtype=y.dtype) if minus_identity else None
    if distributed:
        n = _batch_count(y, distributed)
        centred = y - all_reduce_sum(y.sum(0)) / n
        cov = all_reduce_sum(centred.T @ centred) / (n - 1)
        return cov - eye if minus_identity else cov
    # One fused kernel for the product, scale and shift: on a GPU these hooks are bound
    # by kernel launches, not arithmetic.
    centred = y - y.mean(0)
    scale = 1 / (y.shape[0] - 1)
    if minus_identity:
        return torch.addmm(eye, centred.T, centred, beta=-1, alpha=scale)
    return torch.mm(centred.T, centred).mul_(scale)


def vicreg_varcov(
    z: torch.Tensor,
    *,
    gamma: float = 1.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
    distributed: bool | None = None,
) -> torch.Tensor:
    """VICReg's variance and covariance terms on features (N, C): a baseline for SIGReg.

    ``var_weight * mean_j relu(gamma - sqrt(Var(z_j) + eps))
    + cov_weight * sum_{i != j} Cov(Z)_ij^2 / C``, with the unbiased covariance of the
    whole (C, C) matrix: no sketch, no invariance term. Unlike weak SIGReg it only pushes
    each standard deviation up to ``gamma`` (a hinge) and decorrelates; it does not pull
    large variances down.

    Args:
        z: features, shape (N, C). Computed in float32 (float64 kept).
        gamma: target standard deviation of every feature.
        var_weight, cov_weight: VICReg's mu and nu (defaults 25 and 1, as in VICReg).
        eps: added to the variance before the square root (keeps its gradient finite).
        distributed: statistics over the global batch (None: automatic).

    Returns:
        Scalar float32 tensor.

    Reference: Bardes, Ponce, LeCun, VICReg, arXiv 2105.04906, eqs. 1-4.
    """
    distributed = use_distributed(distributed)
    _check_features(z, min_rows=1 if distributed else 2)
    with torch.autocast(device_type=z.device.type, enabled=False):
        cov = _covariance(z.to(_compute_dtype(z)), distributed)
        var = cov.diagonal()
        variance = torch.relu(gamma - torch.sqrt(var + eps)).mean()
        covariance = (cov - torch.diag_embed(var)).square().sum() / cov.shape[0]
        return var_weight * variance + cov_weight * covariance


def trapezoid_weights(
    t_max: float, num_points: int, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes t on [0, t_max] and weights w with sum_t w f(t) ~= int_{-t_max}^{t_max} f for even f."""
    t = torch.linspace(0.0, t_max, num_points, device=device, dtype=dtype)
    w = torch.full((num_points,), t_max / (num_points - 1), device=device, dtype=dtype)
    w[0] = w[-1] = w[0] / 2
    return t, 2 * w  # doubled: the integrand is even in t


@functools.lru_cache(maxsize=32)
def _quadrature(
    t_max: float, num_points: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nodes t, the target (Re, Im) = (exp(-t^2/2), 0) of the empirical characteristic
    function, and the weights w * exp(-t^2/2) of the strong loss.

    Cached per device: building them costs a handful of tiny kernel launches, as much as
    the loss itself on a GPU. The cached tensors are never modified in place, and are built
    outside inference mode so that a first call under ``torch.inference_mode()`` does not
    leave tensors that autograd refuses to save.
    """
    with torch.inference_mode(False):
        t, w = trapezoid_weights(t_max, num_points, device=device, dtype=dtype)
        gauss = torch.exp(-0.5 * t * t)
        target = torch.stack((gauss, torch.zeros_like(gauss))).unsqueeze(1)  # (2, 1, T)
        return t, target, w * gauss


def strong_sigreg(
    z: torch.Tensor,
    directions: torch.Tensor | None = None,
    t_max: float = 3.0,
    num_points: int = 17,
    *,
    num_directions: int = 64,
    generator: torch.Generator | None = None,
    distributed: bool | None = None,
) -> torch.Tensor:
    """Strong SIGReg (LeJEPA): Epps-Pulley statistic of random 1-D projections.

    For each unit direction a, with projections p = Z a and ECF(t) = mean_n exp(i t p_n):
    ``N * int_{-t_max}^{t_max} |ECF(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt``, averaged over
    directions. Integrated with the trapezoid rule on [0, t_max] (doubled; the integrand
    is even).

    Args:
        z: features, shape (N, C). Computed in float32.
        directions: (C, K) with unit-norm columns, or None to draw ``num_directions`` from
            ``generator`` (under torch.distributed, rank 0's draw is broadcast).
        t_max: half-width of the integration interval (LeJEPA: 3, the paper's code: 5).
        num_points: quadrature nodes on [0, t_max].

    Returns:
        Scalar float32 tensor (0 for a perfect standard normal in every direction).

    Reference: LeJEPA, arXiv 2511.08544; Epps & Pulley (1983).
    """
    distributed = use_distributed(distributed)
    _check_features(z, min_rows=1 if distributed else 2)
    if not t_max > 0:
        raise ValueError(f"t_max must be positive, got {t_max}")
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2, got {num_points}")
    if directions is None:
        directions = draw_directions(z.shape[1], num_directions, generator, device=z.device)
        if distributed:
            directions = broadcast_from_rank0(directions)
    else:
        _check_projection(directions, z.shape[1], "directions")
    with torch.autocast(device_type=z.device.type, enabled=False):
        dtype = _compute_dtype(z)
        p = z.to(dtype) @ directions.to(device=z.device, dtype=dtype)  # (N, K)
        t, target, weights = _quadrature(float(t_max), int(num_points), z.device, dtype)
        tp = p.unsqueeze(-1) * t  # (N, K, T)
        # Sum over the batch first; stack only the small (K, T) sums (stacking the (N, K, T)
        # tensors costs more than the trigonometry), so one all-reduce serves both parts.
        sums = torch.stack((tp.cos().sum(0), tp.sin().sum(0)))
        if distributed:
            sums = all_reduce_sum(sums)
        n = _batch_count(z, distributed)
        err = (sums / n - target).square().sum(0)  # |ECF - target|^2, (K, T)
        return n * (err @ weights).mean()


def regularized_loss(
    task_loss: torch.Tensor,
    reg_loss: torch.Tensor,
    *,
    alpha: float | None = None,
    lam: float | None = None,
) -> torch.Tensor:
    """Combine task and regularizer with exactly one of the two conventions of the sources.

    ``alpha``: ``(1 - alpha) * task + alpha * reg`` (the paper's code; alpha = 0.1).
    ``lam``: ``task + lam * reg`` (the paper's formula).
    """
    _check_weights(alpha, lam)
    if alpha is not None:
        return (1 - alpha) * task_loss + alpha * reg_loss
    return task_loss + lam * reg_loss


def _check_weights(alpha: float | None, lam: float | None) -> None:
    if (alpha is None) == (lam is None):
        raise ValueError("give exactly one of alpha= ((1-a)*task + a*reg) or lam= (task + l*reg)")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if lam is not None and not lam >= 0.0:
        raise ValueError(f"lam must be non-negative, got {lam}")
