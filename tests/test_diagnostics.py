"""Tests for sigreg.diagnostics: closed forms, path agreement, streaming exactness, errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from sigreg.diagnostics import (
    StreamingDiagnostics,
    covariance,
    diagnose,
    effective_dimension,
    eigenspectrum,
    mean_pairwise_cosine,
    norm_variance,
    participation_ratio,
    spectral_entropy,
)

KEYS = {
    "effective_dim",
    "effective_dim_ratio",
    "spectral_entropy",
    "max_entropy",
    "entropy_ratio",
    "mean_cosine",
    "norm_variance",
    "weak_sigreg_distance",
    "num_samples",
    "width",
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_exact_covariance(eigenvalues: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """(n, C) float64 data whose sample covariance is exactly diag(eigenvalues).

    QR of a column-centred Gaussian matrix gives orthonormal columns that are still
    centred (they span the same centred columns), so Q^T Q = I and the column means are 0.
    """
    a = torch.randn(n, eigenvalues.numel(), generator=_gen(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(dim=0))
    return q * torch.sqrt(eigenvalues * (n - 1))


def _correlated(n: int, c: int, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    g = _gen(seed)
    mix = torch.randn(c, c, generator=g, dtype=torch.float64)
    return torch.randn(n, c, generator=g, dtype=torch.float64) @ mix + offset


def _assert_dicts_close(a: dict[str, float], b: dict[str, float], rel: float) -> None:
    assert a.keys() == b.keys() == KEYS
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-12), key


# --- closed forms ----------------------------------------------------------------------


def test_isotropic_gaussian() -> None:
    n, c = 20000, 16
    z = torch.randn(n, c, generator=_gen(1))
    d = diagnose(z)
    assert d["effective_dim"] == pytest.approx(c, rel=0.03)
    assert d["effective_dim_ratio"] == pytest.approx(1.0, rel=0.03)
    assert d["max_entropy"] == pytest.approx(math.log(c))
    assert d["spectral_entropy"] == pytest.approx(math.log(c), rel=0.01)
    assert d["entropy_ratio"] == pytest.approx(1.0, rel=0.01)
    assert abs(d["mean_cosine"]) < 1e-3
    # ||S - I||_F for Gaussian noise ~ sqrt(C (C + 1) / N) ~ C / sqrt(N).
    assert 0.3 * c / math.sqrt(n) < d["weak_sigreg_distance"] < 3 * c / math.sqrt(n)
    # ||z|| is chi-distributed with C degrees of freedom: Var = C - mean^2.
    chi_mean = math.sqrt(2) * math.exp(math.lgamma((c + 1) / 2) - math.lgamma(c / 2))
    assert d["norm_variance"] == pytest.approx(c - chi_mean**2, rel=0.05)
    assert d["num_samples"] == n and d["width"] == c


def test_rank_one_collapse() -> None:
    g = _gen(2)
    v = torch.randn(8, generator=g, dtype=torch.float64)
    a = torch.rand(500, 1, generator=g, dtype=torch.float64) + 0.1  # a > 0
    d = diagnose(a * v)
    assert d["effective_dim"] == pytest.approx(1.0, abs=1e-6)
    assert d["spectral_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert d["mean_cosine"] == pytest.approx(1.0, abs=1e-9)
    spectrum = eigenspectrum(a * v)
    assert spectrum[0] == pytest.approx(float(a.var() * (v @ v)), rel=1e-9)
    assert torch.all(spectrum[1:] < 1e-12 * spectrum[0])


def test_known_diagonal_spectrum() -> None:
    lam = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.0], dtype=torch.float64)
    z = _with_exact_covariance(lam, n=300) + 7.0  # the mean must not matter
    torch.testing.assert_close(covariance(z), torch.diag(lam), atol=1e-12, rtol=0)
    torch.testing.assert_close(eigenspectrum(z), lam, atol=1e-12, rtol=0)
    by_hand = float(lam.sum() ** 2 / (lam**2).sum())
    assert effective_dimension(z) == pytest.approx(by_hand, rel=1e-12)
    p = lam[lam > 0] / lam.sum()
    assert spectral_entropy(z) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-10)
    d = diagnose(z)
    assert d["weak_sigreg_distance"] == pytest.approx(float((lam - 1).norm()), rel=1e-10)
    assert d["effective_dim_ratio"] == pytest.approx(by_hand / 8, rel=1e-12)


def test_exact_identity_covariance_has_zero_weak_distance() -> None:
    z = _with_exact_covariance(torch.ones(6, dtype=torch.float64), n=50)
    d = diagnose(z)
    assert d["weak_sigreg_distance"] < 1e-12
    assert d["effective_dim"] == pytest.approx(6.0, rel=1e-12)
    assert d["entropy_ratio"] == pytest.approx(1.0, rel=1e-12)


def test_constant_features_are_degenerate_not_nan() -> None:
    d = diagnose(torch.ones(10, 4))
    assert d["effective_dim"] == 0.0 and d["spectral_entropy"] == 0.0
    assert d["mean_cosine"] == pytest.approx(1.0)
    assert d["weak_sigreg_distance"] == pytest.approx(2.0)  # ||0 - I_4||_F


def test_single_channel() -> None:
    d = diagnose(torch.randn(100, 1, generator=_gen(3)))
    assert d["effective_dim"] == pytest.approx(1.0)
    assert d["spectral_entropy"] == 0.0 and d["max_entropy"] == 0.0
    assert d["entropy_ratio"] == 1.0


# --- agreement between paths -----------------------------------------------------------


def test_trace_path_matches_eigen_path() -> None:
    for seed in range(3):
        z = _correlated(200, 24, seed=seed)
        assert effective_dimension(z) == pytest.approx(
            participation_ratio(eigenspectrum(z)), rel=1e-10
        )


def test_covariance_matches_torch_cov() -> None:
    z = _correlated(64, 10, offset=3.0)
    torch.testing.assert_close(covariance(z), torch.cov(z.T), rtol=1e-12, atol=1e-12)


def test_mean_cosine_matches_brute_force() -> None:
    z = torch.randn(40, 5, generator=_gen(4), dtype=torch.float64) + 0.5
    z[7] = 0.0  # a zero row counts as cosine 0 with everything
    cos = F.cosine_similarity(z[:, None, :], z[None, :, :], dim=-1)
    off_diagonal = cos[~torch.eye(40, dtype=torch.bool)]
    assert mean_pairwise_cosine(z) == pytest.approx(float(off_diagonal.mean()), rel=1e-12)


def test_diagnose_matches_single_metrics() -> None:
    z = _correlated(150, 12, offset=1.0)
    d = diagnose(z)
    assert d.keys() == KEYS
    assert d["effective_dim"] == pytest.approx(effective_dimension(z), rel=1e-12)
    assert d["spectral_entropy"] == pytest.approx(spectral_entropy(z), rel=1e-12)
    assert d["mean_cosine"] == pytest.approx(mean_pairwise_cosine(z), rel=1e-12)
    assert d["norm_variance"] == pytest.approx(norm_variance(z), rel=1e-12)
    assert d["norm_variance"] == pytest.approx(float(z.norm(dim=1).var()), rel=1e-12)
    expected_weak = float(torch.linalg.matrix_norm(torch.cov(z.T) - torch.eye(12)))
    assert d["weak_sigreg_distance"] == pytest.approx(expected_weak, rel=1e-12)


# --- streaming -------------------------------------------------------------------------

SIZES = [1, 17, 3, 250, 64, 2, 113]  # 7 uneven batches, including a single row


# At offset 1e6 the raw-sum formula (sum z z^T - n mu mu^T) / (n - 1) is off by ~6e-5
# (relative) on this data; the pairwise Chan update the accumulator uses stays at ~1e-12.
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e6])
def test_streaming_equals_one_shot(offset: float) -> None:
    z = _correlated(sum(SIZES), 20, seed=5, offset=offset)
    acc = StreamingDiagnostics()
    for batch in z.split(SIZES):
        acc.update(batch)
    assert acc.num_samples == z.shape[0] and acc.width == 20
    _assert_dicts_close(acc.compute(), diagnose(z), rel=1e-9)
    torch.testing.assert_close(acc.spectrum(), eigenspectrum(z), rtol=1e-9, atol=1e-9)


def test_merge_equals_single_accumulator() -> None:
    z = _correlated(sum(SIZES), 9, seed=6, offset=1e3)
    batches = z.split(SIZES)
    one, left, right = StreamingDiagnostics(), StreamingDiagnostics(9), StreamingDiagnostics()
    for i, batch in enumerate(batches):
        one.update(batch)
        (left if i % 2 else right).update(batch)
    right_before = right.compute()
    left.merge(right)
    _assert_dicts_close(left.compute(), one.compute(), rel=1e-9)
    assert right.compute() == right_before  # the merged-in accumulator is untouched

    empty = StreamingDiagnostics()
    empty.merge(one)
    _assert_dicts_close(empty.compute(), one.compute(), rel=0)
    one.merge(StreamingDiagnostics())  # merging nothing is a no-op
    _assert_dicts_close(empty.compute(), one.compute(), rel=0)


def test_state_dict_round_trip() -> None:
    z = _correlated(300, 7, seed=7)
    acc = StreamingDiagnostics()
    acc.update(z[:100])
    restored = StreamingDiagnostics()
    restored.load_state_dict(acc.state_dict())
    restored.update(z[100:])
    _assert_dicts_close(restored.compute(), diagnose(z), rel=1e-9)

    blank = StreamingDiagnostics(7)
    fresh = StreamingDiagnostics()
    fresh.load_state_dict(blank.state_dict())
    assert fresh.width == 7 and fresh.num_samples == 0


def test_reset() -> None:
    acc = StreamingDiagnostics()
    acc.update(torch.randn(10, 3))
    acc.reset()
    assert acc.num_samples == 0
    with pytest.raises(ValueError, match="width mismatch"):
        acc.update(torch.randn(10, 4))


# --- dtypes and autograd ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_input_is_upcast(dtype: torch.dtype) -> None:
    z = torch.randn(500, 8, generator=_gen(8)).to(dtype)
    d = diagnose(z)
    # Upcasting happens before any arithmetic, so the result is the float64 one exactly.
    _assert_dicts_close(d, diagnose(z.double()), rel=1e-12)
    assert covariance(z).dtype == eigenspectrum(z).dtype == torch.float64
    acc = StreamingDiagnostics()
    for batch in z.split(128):
        acc.update(batch)
    _assert_dicts_close(acc.compute(), d, rel=1e-9)


def test_integer_and_grad_inputs() -> None:
    z = torch.randn(30, 4, generator=_gen(9), requires_grad=True)
    assert diagnose(z * 2)["num_samples"] == 30  # detached, no autograd error
    ints = torch.randint(-5, 5, (30, 4), generator=_gen(9))
    _assert_dicts_close(diagnose(ints), diagnose(ints.double()), rel=0)


# --- errors ----------------------------------------------------------------------------

ONE_SHOT = [
    covariance,
    effective_dimension,
    spectral_entropy,
    mean_pairwise_cosine,
    norm_variance,
    eigenspectrum,
    diagnose,
]


@pytest.mark.parametrize("fn", ONE_SHOT)
def test_one_shot_errors(fn: Callable[[torch.Tensor], object]) -> None:
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        fn(torch.randn(10))
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        fn(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fn(torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least one channel"):
        fn(torch.randn(5, 0))


def test_streaming_errors() -> None:
    acc = StreamingDiagnostics()
    with pytest.raises(ValueError, match="got 0"):
        acc.compute()
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        acc.update(torch.randn(4))
    acc.update(torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        acc.compute()
    with pytest.raises(ValueError, match="width mismatch"):
        acc.update(torch.randn(5, 4))
    with pytest.raises(ValueError, match="width mismatch"):
        acc.merge(StreamingDiagnostics(width=5))
    with pytest.raises(ValueError, match="width mismatch"):
        StreamingDiagnostics(width=2).update(torch.randn(5, 3))
    with pytest.raises(ValueError, match="positive"):
        StreamingDiagnostics(width=0)
