"""experiments/_tables.py: the seed-paired difference, its Student t interval and the cells and
tables the study scripts print with it (hand-computed examples), and the t quantiles it uses."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from _tables import T975, Z975, by_seed, paired, paired_cell, paired_table, paired_text, t975


def t_cdf(q: float, df: int, points: int = 200_001) -> float:
    """P(T <= q) for q > 0: 1/2 + the t density integrated over [0, q] (Simpson's rule)."""
    x = np.linspace(0.0, q, points)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    y = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    h = q / (points - 1)
    return 0.5 + h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())


@pytest.mark.parametrize("df", [*range(1, 31), 31, 40, 100, 1000])
def test_t975_is_the_quantile_of_the_t_distribution(df):
    # Table for df <= 30, the expansion beyond: the probability below it is 0.975 to 1e-8
    # (the table's 9 decimals; the density there is under 0.06, so 1e-9 in q is < 1e-10).
    assert t_cdf(t975(df), df) == pytest.approx(0.975, abs=1e-8)


def test_t975_edges():
    assert len(T975) == 30
    assert t975(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-9)  # Cauchy: exact
    assert t975(30) > t975(31) > t975(10_000) > Z975
    assert t975(10**9) == pytest.approx(Z975, abs=1e-8)
    with pytest.raises(ValueError, match="at least 1"):
        t975(0)


def test_three_seeds_by_hand():
    # Differences 1, 2, 3 (seeds in any order): mean 2, sample std 1, standard error
    # 1 / sqrt(3); t(0.975, 2) = 4.302653 -> half-width 2.484138.
    p = paired({2: 13.0, 0: 11.0, 1: 12.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert (p.mean, p.n, p.positive) == (2.0, 3, 3)
    assert p.low == pytest.approx(2 - 2.484138, abs=1e-6)
    assert p.high == pytest.approx(2 + 2.484138, abs=1e-6)
    assert paired_cell(p) == "+2.0 [-0.5, +4.5] (3/3)"
    assert paired_cell(p, digits=2) == "+2.00 [-0.48, +4.48] (3/3)"


def test_two_seeds_by_hand():
    # Differences 1 and 3: mean 2, sample std sqrt(2), standard error 1; t(0.975, 1) = 12.706.
    p = paired({0: 10.0, 1: 14.0}, {0: 9.0, 1: 11.0})
    assert (p.low, p.high) == pytest.approx((2 - 12.706204736, 2 + 12.706204736))
    assert paired_cell(p) == "+2.0 [-10.7, +14.7] (2/2)"


def test_positive_counts_only_seeds_above_zero():
    # Differences -1, 0, +4: one positive; a tie is not a win.
    p = paired({0: 1.0, 1: 5.0, 2: 9.0}, {0: 2.0, 1: 5.0, 2: 5.0})
    assert (p.mean, p.positive, p.n) == (1.0, 1, 3)
    assert paired_cell(p).endswith("(1/3)")


def test_one_seed_gives_no_interval_and_says_so():
    p = paired({7: 3.5}, {7: 2.0})
    assert (p.mean, p.low, p.high, p.n, p.positive) == (1.5, None, None, 1, 1)
    assert paired_cell(p) == "+1.5 [no interval: 1 seed] (1/1)"


def test_identical_arms_give_a_zero_width_interval():
    p = paired({0: 10.0, 1: 10.0}, {0: 10.0, 1: 10.0})
    assert (p.mean, p.low, p.high, p.positive) == (0.0, 0.0, 0.0, 0)


@pytest.mark.parametrize("arm, baseline", [({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0}),
                                           ({0: 1.0}, {0: 1.0, 1: 2.0})])
def test_unpaired_seeds_raise(arm, baseline):
    with pytest.raises(ValueError, match="unpaired seeds"):
        paired(arm, baseline)


def test_no_seeds_raise():
    with pytest.raises(ValueError, match="no seeds"):
        paired({}, {})


def test_paired_text_uses_the_common_seeds():
    # A study cut short: the arm lacks seed 2, so the cell compares seeds 0-1 and says n=2.
    assert paired_text({0: 11.0, 1: 13.0}, {0: 10.0, 1: 10.0, 2: 50.0}) == \
        "+2.0 [-10.7, +14.7] (2/2)"
    assert paired_text({}, {0: 1.0}) == "-"


def test_paired_table_and_by_seed():
    rows = [{"depth": 10, "arm": a, "seed": s, "acc": acc}
            for a, accs in (("none", (50.0, 52.0)), ("weak", (60.0, 64.0)),
                            ("bn", (None, 80.0)))  # bn seed 0 diverged: no value
            for s, acc in enumerate(accs)]
    assert by_seed(rows, lambda r: r["acc"], arm="weak") == {0: 60.0, 1: 64.0}
    assert by_seed(rows, lambda r: r["acc"], arm="bn") == {1: 80.0}
    table = paired_table("depth", [10], ["none", "weak", "bn"], "none",
                         lambda depth, arm: by_seed(rows, lambda r: r["acc"], depth=depth,
                                                    arm=arm))
    assert table.splitlines() == [
        "| depth | weak - none | bn - none |", "|---|---|---|",
        "| 10 | +11.0 [-1.7, +23.7] (2/2) | +28.0 [no interval: 1 seed] (1/1) |"]
