"""The GRPO objective of NLA RL, as pure tensor functions (the paper's RL stage; nanoNLA's loss).

Per sample i with response tokens t and one advantage A_i:
    ratio_t = exp(logp_t - old_logp_t)
    surrogate_t = min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps) A_i)           (PPO, eps = 0.2)
    kl_t = exp(d_t) - d_t - 1,  d_t = ref_logp_t - logp_t                         (k3 estimator)
    loss_i = mean_t(-(surrogate_t - beta kl_t))
and the step's loss is the mean of loss_i over samples: every sample weighs the same, whatever
its length. Rewards are -MSE (paper definition at `mse_scale`); a sample that is no explanation
(failed parse, truncated at the cap, non-finite MSE) scores as an orthogonal guess, -2.0 at
sqrt(d_model), so a miss is never advantaged over an honest attempt.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

ADVANTAGE_EPS = 1e-6


def rewards(mse: Float[Tensor, " n"], parsed: Bool[Tensor, " n"], truncated: Bool[Tensor, " n"],
            miss_reward: float) -> Float[Tensor, " n"]:
    """-MSE where the sample is a finished, parsed explanation with a finite MSE; `miss_reward` elsewhere."""
    hit = parsed & ~truncated & torch.isfinite(mse)
    return torch.where(hit, -mse, torch.full_like(mse, miss_reward))


def group_advantages(rewards: Float[Tensor, "groups group_size"]) -> Float[Tensor, "groups group_size"]:
    """(r - mean_g) / (std_g + 1e-6) within each group (std with Bessel's correction, as nanoNLA's
    `torch.std`); a group whose samples all scored the same gets zero advantage."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + ADVANTAGE_EPS)


def best_sample_bonus(rewards: Float[Tensor, "groups group_size"], scored: Bool[Tensor, "groups group_size"],
                      weight: float) -> Float[Tensor, "groups group_size"]:
    """`weight` x group_size on each group's highest-reward scored sample (the first of a tie), 0 elsewhere; a group
    with no scored sample gets none. Added to the advantages, it adds `weight` x the mean over groups of that
    sample's mean-token cross-entropy to the step's loss while the ratio is 1 (one update per rollout): the
    policy imitates the best of its own samples (self-imitation) beside the group-relative push of GRPO."""
    best = torch.where(scored, rewards, torch.full_like(rewards, -torch.inf)).argmax(dim=1)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    bonus = torch.zeros_like(rewards)
    bonus[rows, best] = scored[rows, best].to(rewards.dtype) * (weight * rewards.shape[1])
    return bonus


def k3_kl(logp: Float[Tensor, " tokens"], ref_logp: Float[Tensor, " tokens"]) -> Float[Tensor, " tokens"]:
    """The k3 estimator of KL(policy || reference) per sampled token: exp(d) - d - 1, d = ref - policy."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logp: Float[Tensor, " tokens"], old_logp: Float[Tensor, " tokens"],
                      advantages: Float[Tensor, " tokens"], clip_eps: float) -> Float[Tensor, " tokens"]:
    """PPO's pessimistic objective per token: min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)."""
    ratio = torch.exp(logp - old_logp)
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def per_sample_mean(values: Float[Tensor, " tokens"], sample: Int[Tensor, " tokens"],
                    n_samples: int) -> Float[Tensor, " n"]:
    """Mean of `values` over each sample's tokens (`sample[t]` says which sample token t belongs to)."""
    totals = torch.zeros(n_samples, dtype=values.dtype, device=values.device).index_add(0, sample, values)
    counts = torch.bincount(sample, minlength=n_samples).to(values.dtype)
    return totals / counts


def grpo_loss_sum(logp: Float[Tensor, " tokens"], old_logp: Float[Tensor, " tokens"],
                  ref_logp: Float[Tensor, " tokens"] | None, advantages: Float[Tensor, " n"],
                  sample: Int[Tensor, " tokens"], *, clip_eps: float, kl_coef: float) -> tuple[
                      Float[Tensor, ""], dict[str, Float[Tensor, " n"]]]:
    """The summed per-sample losses of n samples (divide by the step's sample count for the mean),
    and per-sample diagnostics (kl: mean k3 per token; clipped: fraction of tokens outside the clip).

    Tokens of all samples are concatenated; `sample` maps each token to its sample.
    """
    n = advantages.shape[0]
    surrogate = clipped_surrogate(logp, old_logp, advantages[sample], clip_eps)
    ratio = torch.exp(logp.detach() - old_logp)
    clipped = ((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).to(logp.dtype)
    per_token = -surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + kl_coef * kl
    diagnostics = {"kl": per_sample_mean(kl.detach(), sample, n), "clipped": per_sample_mean(clipped, sample, n)}
    return per_sample_mean(per_token, sample, n).sum(), diagnostics
