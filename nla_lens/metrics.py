"""Round-trip scores, as the paper defines them.

Both vectors are rescaled to L2 norm `mse_scale` (default sqrt(d_model)), so
MSE = mean over dims of the squared difference = (s^2 / d) * 2 (1 - cos); with s = sqrt(d) that is
2 (1 - cos). FVE = 1 - MSE / baseline, where the paper's baseline is the mean squared distance of
the rescaled targets from their mean (per dim, like the MSE).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def rescale(vectors: Float[Tensor, "n d_model"], mse_scale: float) -> Float[Tensor, "n d_model"]:
    """Each row rescaled to L2 norm `mse_scale` (computed in fp32, or float64 for float64 input)."""
    vectors = vectors.to(torch.promote_types(vectors.dtype, torch.float32))
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
    """Fraction of variance explained: 1 - mean MSE / baseline."""
    mean = float(torch.as_tensor(mse).float().mean())
    return 1.0 - mean / baseline
