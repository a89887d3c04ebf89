"""Round-trip scores, as the paper defines them.

Both vectors are rescaled to L2 norm `mse_scale` (default sqrt(d_model)), so
MSE = mean over dims of the squared difference = (s^2 / d) * 2 (1 - cos); with s = sqrt(d) that is
2 (1 - cos). FVE = 1 - MSE / baseline, where the paper's baseline is the mean squared distance of
the rescaled targets from their mean (per dim, like the MSE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from nla_lens.display import format_number
from nla_lens.errors import InputError
from nla_lens.injection import prescaled


def rescale(vectors: Float[Tensor, "n d_model"], mse_scale: float) -> Float[Tensor, "n d_model"]:
    """Each row rescaled to L2 norm `mse_scale` (computed in fp32, or float64 for float64 input).

    Each row is first brought to a largest entry in [0.5, 1) by a power of two (exact, as for the
    injection): else a norm whose square leaves fp32 makes a huge row 0 and a tiny one inf or NaN,
    while the AV, which reads only the direction, explains them as usual."""
    vectors = prescaled(vectors)
    return vectors * (mse_scale / vectors.norm(dim=-1, keepdim=True))


def mse_per_item(
    predictions: Float[Tensor, "n d_model"], targets: Float[Tensor, "n d_model"], mse_scale: float
) -> Float[Tensor, " n"]:
    """Mean over dims of the squared difference of the rescaled vectors."""
    return (rescale(predictions, mse_scale) - rescale(targets, mse_scale)).pow(2).mean(dim=-1)


def miss_mse(d_model: int, mse_scale: float) -> float:
    """The MSE of an orthogonal guess: what a failed parse scores (nanoNLA's reward -2.0 at s = sqrt(d))."""
    return 2.0 * mse_scale**2 / d_model


def paper_baseline(targets: Float[Tensor, "n d_model"], mse_scale: float) -> float:
    """Mean over vectors of the per-dim squared distance of the rescaled targets from their mean."""
    scaled = rescale(targets, mse_scale)
    return float((scaled - scaled.mean(dim=0, keepdim=True)).pow(2).mean())


def fve(mse: Float[Tensor, " n"] | float, baseline: float) -> float:
    """Fraction of variance explained: 1 - mean MSE / baseline, the mean taken in float64 (a float64 MSE keeps its
    digits)."""
    if not (math.isfinite(baseline) and baseline > 0):
        raise InputError(f"the FVE baseline must be a finite number > 0, got {baseline}: use paper_baseline("
                         "vectors, mse_scale) of >= 2 distinct vectors, or the sidecar's held-out baseline")
    mean = float(torch.as_tensor(mse).double().mean())
    return 1.0 - mean / baseline


@dataclass(frozen=True)
class PairedDifference:
    """mean(b) - mean(a) over the same items, with a percentile-bootstrap interval that resamples
    items (both scores of an item together): how far a difference between two NLAs on one set of
    vectors is from the noise of which vectors were drawn."""

    difference: float
    low: float
    high: float
    level: float
    n: int

    def __str__(self) -> str:
        low, high = (format_number(bound, signed=True) for bound in (self.low, self.high))
        return f"{format_number(self.difference, signed=True)} [{low}, {high}]"


_BOOTSTRAP_BLOCK = 2**22  # resampled items drawn at once by `paired_difference` (64 MB)


def paired_difference(a: Float[Tensor, " n"], b: Float[Tensor, " n"], *, level: float = 0.95,
                      resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """`b - a` per item (e.g. per-item FVE at one baseline, or 0/1 naming), its mean and a seeded
    `level` bootstrap interval. The baseline stays fixed: the interval is over items, given the set."""
    if a is None or b is None:
        raise InputError("per-item scores are None: a round trip without a baseline has no per-item FVE "
                         "(RoundTrip.fves); pass the same baseline= to both round trips")
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise InputError(f"need two per-item score vectors of one length >= 2, got shapes {list(a.shape)} and "
                         f"{list(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise InputError("per-item scores must be finite (score a failed parse as a miss, not NaN)")
    if not 0 < level < 1 or resamples < 1:
        raise InputError(f"need 0 < level < 1 and resamples >= 1, got {level} and {resamples}")
    diff = b - a
    generator = torch.Generator().manual_seed(seed)
    # Drawn a block of resamples at a time (the same draws in the same order): all at once took
    # 16 bytes per resample and item, 16 GB for 100k items.
    block = max(1, _BOOTSTRAP_BLOCK // len(diff))
    means = torch.cat([diff[torch.randint(len(diff), (min(block, resamples - start), len(diff)),
                                          generator=generator)].mean(dim=1)
                       for start in range(0, resamples, block)])
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedDifference(float(diff.mean()), low, high, level, len(diff))


def mcnemar_exact(a: Bool[Tensor, " n"], b: Bool[Tensor, " n"]) -> tuple[int, int, float]:
    """(items only `b` gets right, items only `a` gets right, two-sided exact McNemar p-value): whether
    two classifiers of the same items differ beyond chance, from the items where they disagree."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dtype != torch.bool or b.dtype != torch.bool or a.shape != b.shape or a.ndim != 1:
        raise InputError(f"need two boolean vectors of one length, got {a.dtype} {list(a.shape)} and "
                         f"{b.dtype} {list(b.shape)}")
    gained, lost = int((b & ~a).sum()), int((a & ~b).sum())
    discordant = gained + lost
    tail = sum(math.comb(discordant, k) for k in range(min(gained, lost) + 1)) / 2**discordant
    return gained, lost, min(1.0, 2 * tail)
