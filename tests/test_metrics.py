"""Metrics against hand computations on fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from nla_lens import InputError, metrics


def test_mse_is_two_one_minus_cos_at_sqrt_d_scale():
    target = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    pred = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, -5.0, 0.0, 0.0]])
    mse = metrics.mse_per_item(pred, target, mse_scale=2.0)  # sqrt(d) for d = 4
    cos = torch.tensor([1 / math.sqrt(2), -1.0])
    assert torch.allclose(mse, 2 * (1 - cos), atol=1e-6)
    # By hand, row 0: rescaled to norm 2 -> (2, 0, 0, 0) vs (sqrt2, sqrt2, 0, 0).
    by_hand = ((2 - math.sqrt(2)) ** 2 + 2) / 4
    assert abs(float(mse[0]) - by_hand) < 1e-6


def test_other_mse_scale_scales_quadratically():
    target, pred = torch.randn(5, 8), torch.randn(5, 8)
    base = metrics.mse_per_item(pred, target, math.sqrt(8))
    assert torch.allclose(metrics.mse_per_item(pred, target, 3 * math.sqrt(8)), 9 * base, atol=1e-5)


def test_paper_baseline_and_fve_by_hand():
    target = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, -3.0]])
    # Rescaled to sqrt(2): (1.414, 0), (0, 1.414), (0, -1.414); mean (0.4714, 0).
    scaled = target / target.norm(dim=1, keepdim=True) * math.sqrt(2)
    mean = scaled.mean(dim=0)
    by_hand = sum(float(((row - mean) ** 2).sum()) for row in scaled) / (3 * 2)
    assert abs(metrics.paper_baseline(target, math.sqrt(2)) - by_hand) < 1e-6
    assert abs(by_hand - (1 - float(mean.pow(2).sum()) / 2)) < 1e-6
    assert abs(metrics.fve(torch.tensor([0.1, 0.2, 0.3]), 0.8) - (1 - 0.2 / 0.8)) < 1e-7
    assert metrics.fve(torch.zeros(3), 0.5) == 1.0


@pytest.mark.parametrize("baseline", [0.0, -0.5, float("nan"), float("inf")])
def test_fve_refuses_a_baseline_it_cannot_divide_by(baseline):
    """Direct callers got ZeroDivisionError at 0 and a silent NaN / -0.0 FVE otherwise."""
    with pytest.raises(InputError, match="baseline must be a finite number > 0"):
        metrics.fve(torch.tensor([0.1, 0.2]), baseline)


def test_fve_keeps_the_digits_of_a_float64_mse():
    """The mean was taken in float32, which rounds 1 + 1e-9 to 1: a float64 MSE lost its last digits."""
    mse = torch.tensor([1 + 1e-9, 1 + 3e-9], dtype=torch.float64)
    assert metrics.fve(mse, 1.0) == pytest.approx(1 - (mse.tolist()[0] + mse.tolist()[1]) / 2, rel=1e-6, abs=0)


@pytest.mark.parametrize("power", [70, -70, -140], ids=["norm_overflows", "norm_underflows", "subnormal"])
def test_scores_depend_on_direction_only_at_any_norm(power):
    """A row scaled by 2**power scores as the row itself (the AV explains it the same): squaring entries
    past fp32's range made the norm inf or 0, so the MSE was 1.0 or inf and the baseline 0 or NaN."""
    g = torch.Generator().manual_seed(0)
    target, pred = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    scale = math.sqrt(16)
    tiny_ok = power > -126  # subnormal entries keep fewer bits: compare with those very values, scaled back
    scaled = target * 2.0**power
    same = target if tiny_ok else scaled.double().mul(2.0**-power).float()
    assert torch.equal(metrics.mse_per_item(pred, scaled, scale), metrics.mse_per_item(pred, same, scale))
    assert torch.equal(metrics.mse_per_item(scaled, pred, scale), metrics.mse_per_item(same, pred, scale))
    assert metrics.paper_baseline(scaled, scale) == metrics.paper_baseline(same, scale)


def test_a_miss_scores_as_an_orthogonal_guess():
    assert metrics.miss_mse(4096, 64.0) == 2.0
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert abs(float(metrics.mse_per_item(a, b, 3.0)[0]) - metrics.miss_mse(2, 3.0)) < 1e-6


def test_paired_difference_mean_and_a_collapsed_interval():
    a = torch.tensor([0.5, 0.25, 1.0, 0.0])
    result = metrics.paired_difference(a, a + 0.125)
    assert (result.difference, result.low, result.high, result.n) == (0.125, 0.125, 0.125, 4)
    assert str(result) == "+0.125 [+0.125, +0.125]"


def test_paired_difference_interval_matches_the_normal_approximation():
    """400 differences ~ N(0.1, 1): the 95% bootstrap interval is mean +- 1.96 s / sqrt(n) to a few %."""
    a = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    diff = torch.randn(400, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    result = metrics.paired_difference(a, a + diff)
    half = 1.96 * float(diff.std()) / math.sqrt(400)
    assert math.isclose(result.difference, float(diff.mean()), abs_tol=1e-12)
    assert math.isclose(result.high - result.difference, half, rel_tol=0.08)
    assert math.isclose(result.difference - result.low, half, rel_tol=0.08)
    assert metrics.paired_difference(a, a + diff) == result  # seeded
    assert metrics.paired_difference(a, a + diff, seed=1) != result


def test_paired_difference_draws_in_bounded_blocks_with_the_same_numbers(monkeypatch):
    """Memory stays bounded at any n (all resamples at once took 16 GB for 100k items), and the blocks
    are the one-shot draws in order: the interval is the one resampling everything at once gives."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(5000, generator=g, dtype=torch.float64), torch.rand(5000, generator=g, dtype=torch.float64)
    rows = torch.randint(5000, (10_000, 5000), generator=torch.Generator().manual_seed(0))
    one_shot = torch.quantile((b - a)[rows].mean(dim=1), torch.tensor([0.025, 0.975], dtype=torch.float64))
    del rows
    drawn = []
    randint = torch.randint

    def recording(high, size, **kwargs):
        drawn.append(math.prod(size))
        return randint(high, size, **kwargs)

    monkeypatch.setattr(torch, "randint", recording)
    result = metrics.paired_difference(a, b)
    assert max(drawn) <= 2**22 and sum(drawn) == 10_000 * 5000
    assert (result.low, result.high) == tuple(one_shot.tolist())


def test_paired_difference_refuses_what_it_cannot_pair():
    with pytest.raises(InputError, match="one length"):
        metrics.paired_difference(torch.zeros(3), torch.zeros(4))
    with pytest.raises(InputError, match="one length >= 2"):  # one item has no spread: its interval collapsed on it
        metrics.paired_difference(torch.tensor([0.5]), torch.tensor([0.75]))
    with pytest.raises(InputError, match="finite"):
        metrics.paired_difference(torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(InputError, match="pass the same baseline= to both"):
        metrics.paired_difference(None, torch.ones(3))  # RoundTrip.fves without a baseline
    with pytest.raises(InputError, match="level"):
        metrics.paired_difference(torch.zeros(3), torch.ones(3), level=95)


def test_mcnemar_exact_by_hand():
    """Two-sided exact p = 2 P(Binomial(gained + lost, 1/2) <= min(gained, lost)), capped at 1."""
    def pair(gained: int, lost: int, agree: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.tensor([False] * gained + [True] * lost + [True] * agree)
        return a, torch.tensor([True] * gained + [False] * lost + [True] * agree)

    assert metrics.mcnemar_exact(*pair(2, 8)) == (2, 8, 2 * (1 + 10 + 45) / 1024)
    assert metrics.mcnemar_exact(*pair(0, 5)) == (0, 5, 2 / 32)
    assert metrics.mcnemar_exact(*pair(5, 0)) == (5, 0, 2 / 32)
    assert metrics.mcnemar_exact(*pair(1, 0)) == (1, 0, 1.0)
    assert metrics.mcnemar_exact(*pair(0, 0)) == (0, 0, 1.0)


def test_a_paired_difference_prints_huge_and_tiny_numbers_in_e_notation():
    """str() wrote each number to 3 signed decimals: a gain of 2e-6 as +0.000 and a bound of -3e20 with every digit,
    where a table cell writes 2.00e-06 and -3.00e+20. Ordinary values print as before (the README's example)."""
    assert str(metrics.PairedDifference(2e-6, -3e20, 1e57, 0.95, 10)) == "+2.00e-06 [-3.00e+20, +1.00e+57]"
    assert str(metrics.PairedDifference(0.016, 0.001, 0.030, 0.95, 256)) == "+0.016 [+0.001, +0.030]"
    assert str(metrics.PairedDifference(0.0, -0.005, 0.0049, 0.95, 10)) == "+0.000 [-0.005, +0.005]"
