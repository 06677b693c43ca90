"""Representation diagnostics for a batch of features.

Every function takes ``z`` of shape ``(N, C)``: N samples of one layer's pooled
activations, C channels. Inputs of any real dtype and device are accepted; they are
detached and upcast to float64 first, because eigenvalues and the cancellations below
(``||sum u||^2 - N``, ``tr(S)^2 / ||S||_F^2``) are not trustworthy in half precision.
These are measurements, not losses: no gradient flows through them.

Metrics, with ``S = Cov(Z)`` (unbiased, ``N - 1``) and ``l`` its eigenvalues:

* effective dimension (participation ratio) ``(sum l)^2 / sum l^2 = tr(S)^2 / ||S||_F^2``,
  in ``[1, C]`` for non-zero ``S``; C for isotropic features, 1 for rank-1 collapse;
* spectral entropy ``H = -sum p log p`` with ``p = l / sum l``; at most ``log C``;
* mean pairwise cosine similarity over the ``N (N - 1)`` ordered pairs ``i != j``;
* unbiased variance of the per-sample L2 norms;
* weak-SIGReg distance ``||S - I||_F``.

``StreamingDiagnostics`` gives the same numbers over many batches without keeping them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "StreamingDiagnostics",
    "covariance",
    "diagnose",
    "effective_dimension",
    "eigenspectrum",
    "mean_pairwise_cosine",
    "norm_variance",
    "participation_ratio",
    "spectral_entropy",
]


def _as_float64(z: Tensor, min_samples: int = 2) -> Tensor:
    """Validate ``z`` as ``(N, C)`` with ``N >= min_samples`` and return it detached in float64."""
    if not isinstance(z, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"expected features of shape (N, C), got shape {tuple(z.shape)}")
    if z.is_complex():
        raise ValueError(f"expected real-valued features, got dtype {z.dtype}")
    if z.shape[1] < 1:
        raise ValueError(f"expected at least one channel, got shape {tuple(z.shape)}")
    if z.shape[0] < min_samples:
        raise ValueError(
            f"need at least {min_samples} samples (rows) for an unbiased covariance, "
            f"got N={z.shape[0]}"
        )
    z = z.detach()
    if z.device.type == "mps":  # MPS has no float64
        z = z.cpu()
    return z.to(torch.float64)


# --- metrics from a covariance matrix / spectrum --------------------------------------


def participation_ratio(eigenvalues: Tensor) -> float:
    """Participation ratio ``(sum l)^2 / sum l^2`` of a spectrum ``l`` of shape ``(C,)``.

    The eigendecomposition path of ``effective_dimension``; 0.0 for an all-zero spectrum.
    """
    spectrum = eigenvalues.to(torch.float64)
    denom = float((spectrum * spectrum).sum())
    return float(spectrum.sum()) ** 2 / denom if denom > 0 else 0.0


def _effective_dim(cov: Tensor) -> float:
    # tr(S)^2 / ||S||_F^2 equals the participation ratio because tr(S) = sum l and
    # ||S||_F^2 = tr(S^2) = sum l^2 for symmetric S: O(C^2), no eigendecomposition.
    frob2 = float((cov * cov).sum())
    return float(torch.trace(cov)) ** 2 / frob2 if frob2 > 0 else 0.0


def _spectrum(cov: Tensor) -> Tensor:
    # eigvalsh returns ascending order; a PSD matrix can still give tiny negative
    # eigenvalues from round-off, which are clamped to 0.
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0)


def _entropy(eigenvalues: Tensor) -> float:
    total = eigenvalues.sum()
    if total <= 0:  # all variance gone: nothing to distribute, define H = 0
        return 0.0
    p = eigenvalues / total
    return float(-torch.xlogy(p, p).sum())  # xlogy gives 0 * log 0 = 0


# --- one-shot public API ---------------------------------------------------------------


def covariance(z: Tensor) -> Tensor:
    """Unbiased covariance ``S = (Z - mean)^T (Z - mean) / (N - 1)``, shape ``(C, C)``, float64."""
    z = _as_float64(z)
    zc = z - z.mean(dim=0)
    return zc.T @ zc / (z.shape[0] - 1)


def eigenspectrum(z: Tensor) -> Tensor:
    """Eigenvalues of ``covariance(z)``, shape ``(C,)``, float64, descending, clamped at 0."""
    return _spectrum(covariance(z))


def effective_dimension(z: Tensor) -> float:
    """Participation ratio ``tr(S)^2 / ||S||_F^2 = (sum l)^2 / sum l^2`` of ``S = Cov(z)``.

    Computed without an eigendecomposition (cheap enough for a live monitor); see
    ``participation_ratio(eigenspectrum(z))`` for the eigenvalue path. In ``[1, C]``,
    0.0 when every feature is constant.
    """
    return _effective_dim(covariance(z))


def spectral_entropy(z: Tensor) -> float:
    """Spectral entropy ``H = -sum p log p``, ``p = l / sum l`` (natural log), in ``[0, log C]``."""
    return _entropy(eigenspectrum(z))


def mean_pairwise_cosine(z: Tensor) -> float:
    """Mean of ``cos(z_i, z_j)`` over ordered pairs ``i != j``, in O(N C) memory and time.

    With unit vectors ``u_i = z_i / ||z_i||`` the sum of all entries of the cosine matrix
    is ``||sum u||^2``, and its diagonal sums to N, so the off-diagonal mean is
    ``(||sum u||^2 - N) / (N (N - 1))``. An all-zero row counts as cosine 0 with every
    other row (its ``u`` is 0, and it is left out of the diagonal term).
    """
    z = _as_float64(z)
    unit_sum, nonzero, _ = _unit_sum(z)
    n = z.shape[0]
    return (float(unit_sum @ unit_sum) - nonzero) / (n * (n - 1))


def norm_variance(z: Tensor) -> float:
    """Unbiased variance of the per-sample L2 norms ``||z_i||``."""
    return float(torch.linalg.vector_norm(_as_float64(z), dim=1).var(correction=1))


def diagnose(z: Tensor) -> dict[str, float]:
    """All scalar metrics of ``z`` ``(N, C)`` at once.

    Keys: ``effective_dim``, ``effective_dim_ratio`` (``/ C``), ``spectral_entropy``,
    ``max_entropy`` (``log C``), ``entropy_ratio`` (``H / log C``), ``mean_cosine``,
    ``norm_variance``, ``weak_sigreg_distance`` (``||S - I||_F``), ``num_samples``,
    ``width``.
    """
    return _metrics(_moments(_as_float64(z)))


# --- sufficient statistics shared by one-shot and streaming paths ----------------------


@dataclass
class _Moments:
    """Mergeable sufficient statistics of a set of feature rows (all float64).

    Centred sums (``m2``, ``norm_m2``) rather than raw power sums, so a large mean does
    not cancel catastrophically; ``_merge`` combines two sets exactly (Chan et al.).
    """

    n: int
    mean: Tensor  # (C,) mean row
    m2: Tensor  # (C, C) sum of (z - mean)(z - mean)^T
    unit_sum: Tensor  # (C,) sum of z_i / ||z_i||
    nonzero: int  # rows with ||z_i|| > 0, i.e. the diagonal of the cosine matrix
    norm_mean: Tensor  # () mean of ||z_i||
    norm_m2: Tensor  # () sum of (||z_i|| - norm_mean)^2


def _moments(z: Tensor) -> _Moments:
    """Statistics of a float64 batch ``(N, C)`` with ``N >= 1``."""
    mean = z.mean(dim=0)
    zc = z - mean
    unit_sum, nonzero, norms = _unit_sum(z)
    norm_mean = norms.mean()
    return _Moments(
        n=z.shape[0],
        mean=mean,
        m2=zc.T @ zc,
        unit_sum=unit_sum,
        nonzero=nonzero,
        norm_mean=norm_mean,
        norm_m2=((norms - norm_mean) ** 2).sum(),
    )


def _unit_sum(z: Tensor) -> tuple[Tensor, int, Tensor]:
    """Sum of the rows scaled to unit length (C,), the number of nonzero rows, the norms (N,)."""
    norms = torch.linalg.vector_norm(z, dim=1)
    # Zero rows become 0 / tiny = 0 instead of NaN.
    units = z / norms.clamp_min(torch.finfo(z.dtype).tiny).unsqueeze(1)
    return units.sum(dim=0), int((norms > 0).sum()), norms


def _merge(a: _Moments, b: _Moments) -> _Moments:
    """Statistics of the union of two row sets (pairwise update of Chan, Golub & LeVeque).

    With ``d = mean_b - mean_a`` and ``n = n_a + n_b``:
    ``mean = mean_a + d n_b / n`` and ``M2 = M2_a + M2_b + d d^T n_a n_b / n``.
    """
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    d = b.mean - a.mean
    dn = b.norm_mean - a.norm_mean
    w = a.n * b.n / n
    return _Moments(
        n=n,
        mean=a.mean + d * (b.n / n),
        m2=a.m2 + b.m2 + torch.outer(d, d) * w,
        unit_sum=a.unit_sum + b.unit_sum,
        nonzero=a.nonzero + b.nonzero,
        norm_mean=a.norm_mean + dn * (b.n / n),
        norm_m2=a.norm_m2 + b.norm_m2 + dn * dn * w,
    )


def _cosine(m: _Moments) -> float:
    return (float(m.unit_sum @ m.unit_sum) - m.nonzero) / (m.n * (m.n - 1))


def _metrics(m: _Moments) -> dict[str, float]:
    if m.n < 2:
        raise ValueError(f"need at least 2 samples to compute diagnostics, got {m.n}")
    width = m.mean.shape[0]
    cov = m.m2 / (m.n - 1)
    eff = _effective_dim(cov)
    entropy = _entropy(_spectrum(cov))
    max_entropy = math.log(width)
    # With C = 1 both H and log C are 0; call the single channel fully used if it varies.
    entropy_ratio = entropy / max_entropy if width > 1 else float(eff > 0)
    eye = torch.eye(width, dtype=cov.dtype, device=cov.device)
    # Same quantity as the core library's weak SIGReg on the full (unsketched)
    # covariance; computed here to keep this module independent of it for now.
    weak = float(torch.linalg.matrix_norm(cov - eye))
    return {
        "effective_dim": eff,
        "effective_dim_ratio": eff / width,
        "spectral_entropy": entropy,
        "max_entropy": max_entropy,
        "entropy_ratio": entropy_ratio,
        "mean_cosine": _cosine(m),
        "norm_variance": float(m.norm_m2) / (m.n - 1),
        "weak_sigreg_distance": weak,
        "num_samples": float(m.n),
        "width": float(width),
    }


# --- streaming -------------------------------------------------------------------------


class StreamingDiagnostics:
    """Accumulate ``diagnose`` over many batches without keeping the features.

    Keeps, in float64 on the device of the first batch: the count n, the mean (C,), the
    centred scatter ``M2 = sum (z - mean)(z - mean)^T`` (C, C), the sum of unit vectors
    (C,), the count of non-zero rows, and the mean and centred sum of squares of the
    norms. Batches are folded in with the exact pairwise (Chan) update, which stays
    accurate under a large mean offset where ``sum z z^T - n mu mu^T`` would cancel, and
    which also makes ``merge`` exact (e.g. to combine ranks after gathering state dicts).
    Memory is ``8 C^2`` bytes (32 MiB at C = 2048), independent of the number of samples.

    ``compute()`` returns the same keys and values as ``diagnose`` on the concatenation
    of every batch seen (up to float64 round-off).
    """

    def __init__(self, width: int | None = None) -> None:
        if width is not None and width < 1:
            raise ValueError(f"width must be a positive int, got {width}")
        self.width = width
        self._m: _Moments | None = None

    @property
    def num_samples(self) -> int:
        return 0 if self._m is None else self._m.n

    def reset(self) -> None:
        """Forget every batch (the width stays fixed if it was given or seen)."""
        self._m = None

    def _check_width(self, width: int) -> None:
        if self.width is None:
            self.width = width
        elif width != self.width:
            raise ValueError(f"width mismatch: accumulator has C={self.width}, got C={width}")

    def _fold(self, m: _Moments) -> None:
        if self._m is None:
            self._m = m
            return
        device = self._m.mean.device
        m = _Moments(**{f.name: _to(getattr(m, f.name), device) for f in fields(_Moments)})
        self._m = _merge(self._m, m)

    def update(self, z: Tensor) -> None:
        """Fold in a batch ``z`` of shape ``(N, C)``, any real dtype/device; N may be 1."""
        z = _as_float64(z, min_samples=0)
        self._check_width(z.shape[1])
        if z.shape[0] > 0:
            self._fold(_moments(z))

    def merge(self, other: StreamingDiagnostics) -> None:
        """Fold another accumulator's batches into this one (``other`` is unchanged)."""
        if other.width is not None:
            self._check_width(other.width)
        if other._m is not None:
            self._fold(other._m)

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen so far; same keys as ``diagnose``."""
        if self._m is None:
            raise ValueError("need at least 2 samples to compute diagnostics, got 0")
        return _metrics(self._m)

    def covariance(self) -> Tensor:
        """Unbiased covariance of everything seen so far, ``(C, C)`` float64."""
        if self._m is None or self._m.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.num_samples}")
        return self._m.m2 / (self._m.n - 1)

    def spectrum(self) -> Tensor:
        """Covariance eigenvalues of everything seen so far, ``(C,)`` float64 descending."""
        return _spectrum(self.covariance())

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of ints and tensors (cloned), e.g. for checkpoints or all-gather."""
        state: dict[str, Any] = {"width": self.width}
        if self._m is not None:
            for f in fields(_Moments):
                value = getattr(self._m, f.name)
                state[f.name] = value.clone() if isinstance(value, Tensor) else value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``, replacing the current contents."""
        self.width = None if state["width"] is None else int(state["width"])
        if "n" not in state:  # saved before any batch
            self._m = None
            return
        values = {f.name: state[f.name] for f in fields(_Moments)}
        self._m = _Moments(
            **{k: v.clone() if isinstance(v, Tensor) else int(v) for k, v in values.items()}
        )


def _to(value: Tensor | int, device: torch.device) -> Tensor | int:
    return value.to(device) if isinstance(value, Tensor) else value
