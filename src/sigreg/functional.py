"""The SIGReg losses as plain functions of features Z, one layer (N, C) or a stack of
layers (*, N, C).

A leading batch of layers (as LeJEPA's and lightly's losses take stacked views) gives one
value per layer, shape (*): every layer of a stack is computed in the same few batched
kernels, which is what :func:`sigreg.attach` does with all the layers of a model.
Projections are passed in (a pure function of tensors: it can run under
``torch.compile`` / CUDA graphs), shared (C, K) or one per layer (*, C, K).

All compute in float32 with autocast switched off, whatever Z's dtype (float64 inputs stay
float64), because the statistics (covariances, characteristic functions) are too imprecise
in bf16/fp16. Under ``torch.distributed`` they are computed over the global batch by
default, with one all-reduce per statistic for the whole stack.

The definitions, a few readable lines each, are in :mod:`sigreg.reference`; the functions
here compute the same numbers (tested in float64, values and gradients) with hand-written
gradients and cached constants, because the regularizer's cost is its number of kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import reference  # the definition's pieces: read from there, written once
from ._checks import check_flag, check_has_values, check_int, check_number, check_positive
from ._renamed import renamed_keywords
from .distributed import (
    all_reduce_sum,
    all_reduce_with_count,
    broadcast_from_rank0,
    use_distributed,
)
from .reference import trapezoid_weights  # noqa: F401 (public here too)
from .sketch import draw_directions


def _check_features(z: torch.Tensor, min_rows: int) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(z).__name__}")
    check_has_values(z, "features")
    if z.dim() < 2:
        raise ValueError(f"features must be 2-D (N, C) or a stack (*, N, C), got shape {tuple(z.shape)}")
    if z.shape[-2] < min_rows:
        raise ValueError(
            f"need at least {min_rows} samples to estimate statistics, got N={z.shape[-2]}"
        )


def _check_projection(p: torch.Tensor, z: torch.Tensor, name: str) -> None:
    """p is (C, K), shared by every layer, or (*, C, K) with z's leading shape (*)."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    if p.dim() < 2 or p.shape[-2] != z.shape[-1] or p.shape[:-2] not in ((), z.shape[:-2]):
        raise ValueError(
            f"{name} must have shape (C, K) or (*, C, K) with C={z.shape[-1]} (the feature "
            f"width) and * = {tuple(z.shape[:-2])} (the features' leading shape), "
            f"got {tuple(p.shape)}"
        )


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (exact references, gradcheck)."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _project(z: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """z (*, N, C) in the compute dtype, times projection (C, K) / (*, C, K) if given."""
    y = z.to(_compute_dtype(z))
    if projection is None:
        return y
    p = projection.to(device=y.device, dtype=y.dtype)
    # bmm for a stack of layers: matmul would add views and copies around it.
    return torch.bmm(y, p) if y.dim() == p.dim() == 3 else y @ p


def weak_sigreg(
    z: torch.Tensor, sketch: torch.Tensor | None = None, *, distributed: bool | None = None,
    scale_invariant: bool = False,
) -> torch.Tensor:
    """Weak-SIGReg: ``|| Cov(Z S) - I_K ||_F`` (Frobenius norm, not squared), per layer.

    Args:
        z: features, shape (N, C), or a stack of layers (*, N, C). Any float dtype;
            computed in float32 (float64 kept).
        sketch: projection S, shape (C, K) (every layer) or (*, C, K) (one per layer), or
            None for the full (C, C) covariance.
        distributed: statistics over the global batch of all ranks. None: whenever a
            process group with more than one rank is initialised.
        scale_invariant: ``|| Cov(Z S / max(1, r)) - I_K ||_F`` with r the root mean
            square of Z S over the samples and the K columns (the mean included; a scale,
            not differentiated). Below unit power this is the paper's loss; above it, the
            target is isotropy at the features' own power, so the loss never pulls large
            features back to unit variance, and its value does not change when they are
            scaled. Not in the paper (see the note below).

    Returns:
        Tensor of shape (*), float32 (float64 for float64 input): a scalar for (N, C) input.
        Covariance is unbiased (divides by N - 1).

    Raises:
        ValueError: z not (N, C) or (*, N, C), fewer than 2 samples (on one process), or a
            sketch whose shape does not fit z.
        TypeError: scale_invariant not a bool.

    Reference: Weak-SIGReg, arXiv 2603.05924, eq. L = L_CE + lambda ||Cov(ZS) - I||_F.
    The definition, in a few lines: :func:`sigreg.reference.weak_sigreg_reference`.
    ``scale_invariant`` is ours: the unit target pulls a residual stream whose scale grows
    (a pre-norm transformer at a high learning rate) back to unit spread while its common
    mean keeps growing, until every sample points one way (docs/studies.md, section 14).
    Dividing by r at every scale instead of max(1, r) also revives vanished signals, but
    costs healthy nets 3.6-4.8 points (the same section).

    Examples:
        >>> import torch, sigreg
        >>> gen = sigreg.seeded_generator(0)
        >>> z = torch.randn(1000, 32, generator=gen)   # about an isotropic Gaussian
        >>> sketch = sigreg.draw_sketch(32, 8, gen)    # S, (C, K) = (32, 8)
        >>> print(f"{sigreg.weak_sigreg(z, sketch):.2f}")
        1.43
        >>> print(f"{sigreg.weak_sigreg(0.1 * z, sketch):.2f}")   # shrunk: far from I
        2.80
        >>> print(f"{sigreg.weak_sigreg(z):.2f}")                 # no sketch: (C, C)
        1.03
        >>> layers = torch.randn(3, 256, 32, generator=gen)       # a stack of 3 layers
        >>> sigreg.weak_sigreg(layers, sketch).shape               # one value per layer
        torch.Size([3])
        >>> invariant = [sigreg.weak_sigreg(c * z, sketch, scale_invariant=True)
        ...              for c in (0.1, 10.0, 1000.0)]  # the paper's below unit power,
        >>> print(" ".join(f"{v:.2f}" for v in invariant))   # the same at any scale above
        2.80 1.43 1.43
    """
    distributed = use_distributed(distributed)
    _check_features(z, min_rows=0 if distributed else 2)
    if sketch is not None:
        _check_projection(sketch, z, "sketch")
    check_flag(scale_invariant, "scale_invariant")
    with torch.autocast(device_type=z.device.type, enabled=False):
        y = _project(z, sketch)
        if scale_invariant:
            y = y / _scale_above_unit(y, distributed)
        if distributed:
            return torch.linalg.matrix_norm(_covariance(y, distributed, minus_identity=True))
        flat = y.reshape(y.shape[:-2].numel(), *y.shape[-2:])
        return _CovarianceGapNorm.apply(flat).view(y.shape[:-2])


class _CovarianceGapNorm(torch.autograd.Function):
    """``|| Cov(Y) - I_K ||_F`` for each layer of y (L, N, K), on the local batch, with its
    gradient written out: ``2 Yc G / ((N - 1) ||G||)`` for the centred Yc and the gap
    G = Cov - I (symmetric). One batched matmul, where autograd runs ~20 kernels (both
    factors of the Gram product, the centring, the norm). The centring's own backward is
    the identity here: Yc's columns sum to zero, so Yc G's do too.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        scale = 1 / (y.shape[-2] - 1)
        centred = y - y.mean(-2, keepdim=True)
        eye = _constant(_identity, y.shape[-1], y.device, y.dtype)
        # Product, scale and shift in one kernel: on a GPU this loss is bound by launches.
        gap = torch.baddbmm(eye, centred.mT, centred, beta=-1, alpha=scale)
        norm = torch.linalg.matrix_norm(gap)  # (L,)
        # A zero gap has a zero gradient (G = 0), whatever this factor is.
        factor = (2 * scale) / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        ctx.save_for_backward(centred, gap, factor)
        return norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        centred, gap, factor = ctx.saved_tensors
        with torch.autocast(device_type=centred.device.type, enabled=False):
            return torch.bmm(centred, gap * (grad * factor).view(-1, 1, 1))


def _constant(build: Callable, *args: object):
    """``build(*args)``, cached when eager; built in the graph (and folded) when compiled,
    where a cache of tensors is of no use to torch.compile."""
    return build.__wrapped__(*args) if torch.compiler.is_compiling() else build(*args)


@functools.lru_cache(maxsize=32)
def _identity(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """I_size, cached: one kernel launch less per call (built outside inference mode, like
    :func:`_quadrature`, and never modified in place)."""
    with torch.inference_mode(False):
        return torch.eye(size, device=device, dtype=dtype)


def _scale_above_unit(y: torch.Tensor, distributed: bool) -> torch.Tensor:
    """(*, 1, 1) max(1, root mean square) of each layer of y (*, N, K) over N and K, the mean
    not removed, over the global batch when distributed; detached (a scale, not a
    statistic)."""
    with torch.no_grad():
        power = y.square().sum((-2, -1))
        n = y.shape[-2]
        if distributed:
            power, n = all_reduce_with_count(power, n)
        rms = (power / (n * y.shape[-1])).sqrt()
        return rms.clamp_min(1.0).unsqueeze(-1).unsqueeze(-1)


def _covariance(y: torch.Tensor, distributed: bool, minus_identity: bool = False) -> torch.Tensor:
    """Unbiased (*, K, K) covariance of y (*, N, K), minus I_K if asked, over the global
    batch when distributed. Centred with the mean first: exact, unlike sum(yy^T) - n mu mu^T."""
    if distributed:
        sums, n = all_reduce_with_count(y.sum(-2), y.shape[-2])
        centred = y - (sums / n).unsqueeze(-2)
        cov = all_reduce_sum(centred.mT @ centred) / (n - 1)
    else:
        centred = y - y.mean(-2, keepdim=True)
        cov = (centred.mT @ centred) / (y.shape[-2] - 1)
    return cov - _constant(_identity, y.shape[-1], y.device, y.dtype) if minus_identity else cov


def vicreg_varcov(
    z: torch.Tensor,
    *,
    gamma: float = 1.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
    distributed: bool | None = None,
) -> torch.Tensor:
    """VICReg's variance and covariance terms on features (N, C) or (*, N, C), per layer.

    ``var_weight * mean_j relu(gamma - sqrt(Var(z_j) + eps))
    + cov_weight * sum_{i != j} Cov(Z)_ij^2 / C``, with the unbiased covariance of the
    whole (C, C) matrix: no sketch, no invariance term. Unlike weak SIGReg it only pushes
    each standard deviation up to ``gamma`` (a hinge) and decorrelates; it does not pull
    large variances down.

    Args:
        z: features, shape (N, C) or a stack of layers (*, N, C). Computed in float32
            (float64 kept).
        gamma: target standard deviation of every feature.
        var_weight: VICReg's mu, the variance hinge's weight (default 25, as in VICReg).
        cov_weight: VICReg's nu, the covariance term's weight (default 1, as in VICReg).
        eps: added to the variance before the square root (keeps its gradient finite).
        distributed: statistics over the global batch (None: automatic).

    Returns:
        Float32 tensor of shape (*): a scalar for (N, C) input.

    Reference: Bardes, Ponce, LeCun, VICReg, arXiv 2105.04906, eqs. 1-4.

    Examples:
        >>> import torch, sigreg
        >>> z = torch.randn(1000, 32, generator=sigreg.seeded_generator(0))
        >>> print(f"{sigreg.vicreg_varcov(z):.2f}")        # unit variances: covariance only
        0.21
        >>> print(f"{sigreg.vicreg_varcov(0.1 * z):.1f}")  # stds 0.1: the hinge, 25 * 0.9
        22.5
    """
    _check_varcov_weights(gamma, var_weight, cov_weight, eps)
    distributed = use_distributed(distributed)
    _check_features(z, min_rows=0 if distributed else 2)
    with torch.autocast(device_type=z.device.type, enabled=False):
        cov = _covariance(_project(z, None), distributed)
        var = cov.diagonal(dim1=-2, dim2=-1)
        variance = torch.relu(gamma - torch.sqrt(var + eps)).mean(-1)
        off_diagonal = cov - torch.diag_embed(var)
        covariance = off_diagonal.square().sum((-2, -1)) / cov.shape[-1]
        return var_weight * variance + cov_weight * covariance


def _check_varcov_weights(gamma: object, var_weight: object, cov_weight: object,
                          eps: object) -> None:
    """vicreg_varcov's numbers, refused as :class:`sigreg.VarCovReg` refuses them."""
    check_positive(gamma, "gamma")
    weights = (check_positive(var_weight, "var_weight", allow_zero=True)
               + check_positive(cov_weight, "cov_weight", allow_zero=True))
    if weights == 0:
        raise ValueError("var_weight and cov_weight must not both be 0")
    check_positive(eps, "eps")


def check_quadrature(t_max: object, num_points: object) -> tuple[float, int]:
    """Validated ``(t_max, num_points)`` of the strong loss: a finite t_max > 0 and an
    integer num_points >= 2; TypeError / ValueError naming the argument otherwise."""
    return check_positive(t_max, "t_max"), check_int(num_points, "num_points", minimum=2)


@renamed_keywords(num_directions="sketch_dim")
def strong_sigreg(
    z: torch.Tensor,
    directions: torch.Tensor | None = None,
    t_max: float = 3.0,
    num_points: int = 17,
    *,
    sketch_dim: int = 64,
    generator: torch.Generator | None = None,
    distributed: bool | None = None,
) -> torch.Tensor:
    """Strong SIGReg (LeJEPA): Epps-Pulley statistic of random 1-D projections, per layer.

    For each unit direction a, with projected features p = Z a and ECF(t) = mean_n exp(i t p_n):
    ``N * int_{-t_max}^{t_max} |ECF(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt``, averaged over
    directions. Integrated with the trapezoid rule on the ``num_points`` equally spaced
    nodes of [0, t_max], weights doubled (the integrand is even in t). The definition, in
    a few lines: :func:`sigreg.reference.strong_sigreg_reference`.

    ``num_points`` counts nodes on [0, t_max] only, not on [-t_max, t_max]: the paper's
    code's "17 points on [-5, 5]" (trapezoid, nodes 0.625 apart) is ``t_max=5,
    num_points=9`` here, the same sum exactly. LeJEPA's library ("17 points on [0, 3]",
    doubled) is the default ``t_max=3, num_points=17``.

    Args:
        z: features, shape (N, C), or a stack of layers (*, N, C). Computed in float32.
        directions: (C, K) or (*, C, K) with unit-norm columns, or None to draw
            ``sketch_dim`` of them from ``generator`` (one set per layer for a stack; under
            torch.distributed, rank 0's draw is broadcast).
        t_max: half-width of the integration interval (LeJEPA: 3, the paper's code: 5).
        num_points: quadrature nodes on [0, t_max], including both ends (>= 2).
        sketch_dim: K, the number of directions drawn when ``directions`` is None
            (``num_directions=``, its old name, is deprecated).
        generator: the generator of that draw (None: torch's default one).
        distributed: statistics over the global batch (None: automatic).

    Returns:
        Float32 tensor of shape (*), a scalar for (N, C) input (0 for a perfect standard
        normal in every direction).

    Reference: LeJEPA, arXiv 2511.08544; Epps & Pulley (1983).

    Examples:
        >>> import torch, sigreg
        >>> gen = sigreg.seeded_generator(0)
        >>> z = torch.randn(1000, 32, generator=gen)
        >>> directions = sigreg.draw_directions(32, 16, gen)   # A, (C, K) = (32, 16)
        >>> print(f"{sigreg.strong_sigreg(z, directions):.2f}")         # Gaussian: small
        0.87
        >>> print(f"{sigreg.strong_sigreg(0.1 * z, directions):.0f}")   # shrunk: far
        387
        >>> paper = sigreg.strong_sigreg(z, directions, t_max=5, num_points=9)  # the paper's
        >>> paper.shape                                                 # 17 points on [-5, 5]
        torch.Size([])
    """
    distributed = use_distributed(distributed)
    _check_features(z, min_rows=0 if distributed else 2)
    t_max, num_points = check_quadrature(t_max, num_points)
    if directions is None:
        directions = draw_directions(z.shape[-1], sketch_dim, generator, device=z.device,
                                     batch=z.shape[:-2])
        if distributed:
            directions = broadcast_from_rank0(directions)
    else:
        _check_projection(directions, z, "directions")
    with torch.autocast(device_type=z.device.type, enabled=False):
        p = _project(z, directions)  # (*, N, K)
        flat = p.reshape(p.shape[:-2].numel(), *p.shape[-2:])  # no -1: N may be 0 here
        spacing = t_max / (num_points - 1)  # trapezoid_weights's node spacing
        n, k = p.shape[-2:]
        if not distributed:
            constants = _constant(_local_constants, t_max, num_points, n, k, z.device, p.dtype)
            return _EppsPulley.apply(flat, spacing, *constants).view(p.shape[:-2])
        target, weights, nodes = _constant(_quadrature, t_max, num_points, z.device, p.dtype)
        sums, n = all_reduce_with_count(_CharacteristicSums.apply(flat, spacing, nodes), n)
        loss, _ = _loss_of_sums(sums, *_fold(target, weights, n, k))
        return loss.view(p.shape[:-2])


# ---- strong SIGReg, fast: the steps of reference.strong_sigreg_reference ------------------
# Per layer, with projected features p (N, K), the quadrature's nodes t_j and weights q_j and the
# weight function w (sigreg.reference), W_j = q_j w(t_j) (see _quadrature):
#   1. sums:     S_kj = sum_n exp(i t_j p_nk) = N ECF_k(t_j) at the nodes t_j = j h > 0
#                (t = 0 adds nothing: S = N there, and N phi(0) = N)        _characteristic_sums
#   2. loss:     L = sum_kj W_j |S_kj - N phi(t_j)|^2 / (N K)               _loss_of_sums
#   3. gradient: dL/dS_kj = 2 W_j (S_kj - N phi(t_j)) / (N K) (Re and Im parts), and through
#                step 1 dL/dp_nk = sum_j t_j Re((dL/dIm S_kj + i dL/dRe S_kj) exp(i t_j p_nk))
#                                                                            _sums_backward
# On the local batch the three run in one autograd Function (_EppsPulley), with the
# constants of steps 2 and 3 (N phi, W / (N K), 2 t W / (N K)) folded once and cached.
# Distributed, step 1 is its own Function (_CharacteristicSums), its sums are all-reduced
# over the ranks, step 2 runs on the global sums and autograd differentiates it.


@functools.lru_cache(maxsize=32)
def _quadrature(t_max: float, num_points: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """The definition's pieces at the nodes t > 0 of :func:`trapezoid_weights`: the target
    phi(t) as (Re, Im) (T - 1, 2), the weights W = q w(t) (T - 1,) and the nodes as a column
    (T - 1, 1).

    Cached per device: building them costs a handful of tiny kernel launches, as much as
    the loss itself on a GPU. The cached tensors are never modified in place, and are built
    outside inference mode so that a first call under ``torch.inference_mode()`` does not
    leave tensors that autograd refuses to save.
    """
    with torch.inference_mode(False):
        t, q = reference.trapezoid_weights(t_max, num_points, device=device, dtype=dtype)
        t, q = t[1:], q[1:]
        target = reference.standard_normal_cf(t)
        return (torch.stack((target, torch.zeros_like(target)), dim=-1),
                q * reference.epps_pulley_weight(t), t.unsqueeze(-1))


def _fold(target: torch.Tensor, weights: torch.Tensor, n, k: int) -> tuple:
    """Step 2's constants for K directions on a batch of n: n phi (T - 1, 2) and
    W / (n K) repeated for every (direction, node, Re / Im) (K * (T - 1) * 2,)."""
    scaled = weights / (n * k)
    return n * target, scaled.view(1, -1, 1).expand(k, -1, 2).reshape(-1)


@functools.lru_cache(maxsize=32)
def _local_constants(t_max: float, num_points: int, n: int, k: int, device: torch.device,
                     dtype: torch.dtype) -> tuple:
    """:func:`_fold`'s constants and step 3's factor t dL/dS / (S - n phi) = 2 t W / (n K)
    (T - 1, 1), for the local batch of n: cached like :func:`_quadrature`."""
    target, weights, nodes = _constant(_quadrature, t_max, num_points, device, dtype)
    with torch.inference_mode(False):
        return *_fold(target, weights, n, k), 2 * nodes * (weights / (n * k)).unsqueeze(-1)


def _characteristic_powers(p: torch.Tensor, spacing: float, count: int) -> torch.Tensor:
    """exp(i j spacing p) for j = 1..count: complex (L, K, count, N) from projected features p
    (L, N, K), the batch innermost so that sums over it and the backward's product read
    contiguous rows.

    Computed as powers of exp(i spacing p): one sine and cosine per projected value, then
    products that double j (1, 2, 4, ...), one kernel each, written in place; evaluating
    cos and sin at every node instead was the dominant cost on a CPU (3x the time). In
    float32 the powers differ from direct evaluation by about j * eps, less than direct
    evaluation's own rounding of j spacing p once |j spacing p| > j, i.e. |p| > 1 / spacing.
    """
    angle = p.mT * spacing
    cdtype = torch.complex128 if p.dtype == torch.float64 else torch.complex64
    powers = angle.new_empty((*angle.shape[:2], count, angle.shape[2]), dtype=cdtype)
    torch.polar(angle.new_ones(angle.shape), angle, out=powers[:, :, 0])
    done = 1
    while done < count:
        new = min(done, count - done)
        torch.mul(powers[:, :, :new], powers[:, :, done - 1:done],
                  out=powers[:, :, done:done + new])
        done += new
    return powers


def _characteristic_sums(p: torch.Tensor, spacing: float, count: int) -> tuple:
    """Step 1: the powers exp(i t_j p_n) (L, K, T - 1, N) and their sums over the batch as
    (Re, Im), (L, K, T - 1, 2), for projected features p (L, N, K) and the nodes t_j = j spacing."""
    powers = _characteristic_powers(p, spacing, count)
    return powers, torch.view_as_real(powers.sum(-1))


def _loss_of_sums(sums: torch.Tensor, scaled_target: torch.Tensor,
                  flat_weights: torch.Tensor) -> tuple:
    """Step 2, with :func:`_fold`'s constants: the loss of each layer (L,) and the gap
    S - n phi (L, K, T - 1, 2)."""
    gap = sums - scaled_target
    return gap.square().view(gap.shape[0], -1) @ flat_weights, gap


def _sums_backward(powers: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """Step 3's chain rule through step 1: the gradient wrt p (L, N, K) from
    coeff = t dL/dS (L, K, T - 1, 2), the gradient wrt the sums (Re, Im) times the node t.
    With d/dp cos(t p) = -t sin(t p) and d/dp sin(t p) = t cos(t p), for coeff = (a, b):
    ``dL/dp_n = sum_t Re(exp(i t p_n) (b + i a))``. One batched complex matmul."""
    l, k, count, n = powers.shape
    c = torch.view_as_complex(coeff.flip(-1)).view(l * k, 1, count)
    grad_p = torch.bmm(c, powers.view(l * k, count, n)).real
    # Contiguous: the real part's stride 2 would make the projection's backward matmul
    # copy it anyway, more slowly.
    return grad_p.view(l, k, n).contiguous().mT


class _EppsPulley(torch.autograd.Function):
    """Steps 1-3 on the local batch: the loss of each layer of p (L, N, K), (L,), its
    gradient from the saved powers, where autograd would evaluate them again and run ~20
    more kernels for step 2."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, spacing: float, scaled_target: torch.Tensor,
                flat_weights: torch.Tensor, grad_factor: torch.Tensor) -> torch.Tensor:
        powers, sums = _characteristic_sums(p, spacing, scaled_target.shape[0])
        loss, gap = _loss_of_sums(sums, scaled_target, flat_weights)
        ctx.save_for_backward(powers, gap, grad_factor)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple:
        powers, gap, grad_factor = ctx.saved_tensors
        with torch.autocast(device_type=powers.device.type, enabled=False):
            # t dL/dS = (S - n phi) 2 t W / (n K), times the incoming gradient of each layer.
            coeff = gap * (grad.view(-1, 1, 1, 1) * grad_factor)
            return _sums_backward(powers, coeff), None, None, None, None


class _CharacteristicSums(torch.autograd.Function):
    """Step 1 alone, for the distributed path (its sums are all-reduced before step 2):
    sums (L, K, T - 1, 2) of projected features p (L, N, K)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, spacing: float, nodes: torch.Tensor) -> torch.Tensor:
        powers, sums = _characteristic_sums(p, spacing, nodes.shape[0])
        ctx.save_for_backward(powers, nodes)
        return sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        powers, nodes = ctx.saved_tensors
        with torch.autocast(device_type=powers.device.type, enabled=False):
            return _sums_backward(powers, grad * nodes), None, None


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

    Examples:
        >>> import torch, sigreg
        >>> task, reg = torch.tensor(2.0), torch.tensor(1.0)
        >>> sigreg.regularized_loss(task, reg, alpha=0.1)   # 0.9 * 2 + 0.1 * 1
        tensor(1.9000)
        >>> sigreg.regularized_loss(task, reg, lam=0.5)     # 2 + 0.5 * 1
        tensor(2.5000)
    """
    _check_weights(alpha, lam)
    if alpha is not None:
        return torch.add((1 - alpha) * task_loss, reg_loss, alpha=alpha)
    return torch.add(task_loss, reg_loss, alpha=lam)


def _check_weights(alpha: float | None, lam: float | None) -> None:
    if (alpha is None) == (lam is None):
        raise ValueError("give exactly one of alpha= ((1-a)*task + a*reg) or lam= (task + l*reg)")
    if alpha is not None and not 0.0 <= check_number(alpha, "alpha") <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if lam is not None:
        check_positive(lam, "lam", allow_zero=True)
