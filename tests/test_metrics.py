"""Metrics against hand computations on fixed tensors."""

from __future__ import annotations

import math

import torch

from nla_lens import metrics


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


def test_a_miss_scores_as_an_orthogonal_guess():
    assert metrics.miss_mse(4096, 64.0) == 2.0
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert abs(float(metrics.mse_per_item(a, b, 3.0)[0]) - metrics.miss_mse(2, 3.0)) < 1e-6
