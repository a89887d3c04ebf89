"""NLA RL: GRPO on the AV with the AR's reconstruction as the reward, the AR trained alongside.

One step, as the paper (kitft `configs/rl.sh`, `nla/reward.py`) and nanoNLA run it:
1. B vectors, G samples each through the AV's KV-cached decoder (injection on the prefill), with
   the log-prob of every sampled token under the raw logits / temperature: the "old" log-probs.
   Top-p only narrows what is sampled; it never enters a ratio (nanoNLA's documented pitfall).
2. Rewards from the AR as it is now: -MSE at `mse_scale`, misses at the orthogonal score
   (`grpo.rewards`); advantages per group. Both updates below use these rewards.
3. The AV's loss (`grpo.grpo_loss_sum`) on one teacher-forced forward per micro-batch, the
   injection installed as in SFT, plus k3 KL to the frozen SFT AV run on the same tokens.
4. One AR MSE step on the same explanations, misses dropped (kitft trains the critic only on
   completed samples); then one Adam step for both, each side's non-finite gradient skipped.
With `ppo_epochs` > 1 (beyond the recipe) steps 3-4 repeat that many times on the same rollout: the AV's
loss is recomputed with its new weights against the same old and reference log-probs, so the clip
binds; the AR takes its one step in the first. With `sft_coef` > 0 (beyond the recipe) step 3 also
adds `sft_coef` x the SFT loss of a few labelled rows, so the AV keeps its supervised answers where
the reward is indifferent to them; with `self_imitation` > 0 (beyond the recipe) each group's best scored
sample gets a bonus advantage (`grpo.best_sample_bonus`), the cross-entropy of the best of its own samples.

The trajectory is a pure function of (weights, config, step): the vectors of a step and each
group's sampling seed depend on the step and the group's global index only, so resuming from a
checkpoint repeats an uninterrupted run, and under `torchrun` (each rank holds whole groups)
the world size changes float summation order only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from nla_lens import backends, metrics
from nla_lens.checks import context_overflow, counted, warn_at_caller
from nla_lens.display import format_number
from nla_lens.distributed import inference
from nla_lens.errors import ConfigError, InputError
from nla_lens.nla import (
    MIN_BASELINE_VECTORS,
    NLA,
    Baseline,
    check_pair,
    check_vocabularies,
    resolve_baseline,
    rows_the_ar_reads,
    warn_if_bases_differ,
)
from nla_lens.parsing import cjk_fraction, parse_explanation
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.sidecar import ar_prompt_ids
from nla_lens.training import grpo, loop, parallel
from nla_lens.training.ar_sft import ar_loss
from nla_lens.training.av_sft import (
    av_loss,
    check_stops_at_turn_end,
    check_trainable_hook_point,
    response_logits,
)
from nla_lens.training.config import RLConfig, check_training_dtypes
from nla_lens.training.dataset import ARRows, AVRows, LabelledActivations, av_rows, check_fits, data_fingerprint
from nla_lens.training.export import freeze_weights_hf_lacks
from nla_lens.verbalizer import ActivationVerbalizer, _sample, injected_prefill

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)
# The learning rates are constant, so a run may also be extended: `steps` may change on a resume.
RESUMABLE = frozenset({"steps"})


@dataclass
class Rollout:
    """This rank's groups of one step, sampled and scored: sample i belongs to group i // G."""

    vectors: Float[Tensor, "n d_model"]  # each sample's target vector
    responses: list[list[int]]  # generated ids, up to and including the first stop id
    old_logp: Float[Tensor, " tokens"]  # sampling-time log-probs, responses concatenated
    texts: list[str]
    explanations: list[str | None]
    truncated: Bool[Tensor, " n"]  # no stop id within max_new_tokens
    mse: Float[Tensor, " n"]  # NaN where the sample was not scored
    rewards: Float[Tensor, " n"]
    advantages: Float[Tensor, " n"]

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def offsets(self) -> list[int]:
        """Where each sample's tokens start in the concatenated log-prob tensors (and the total)."""
        return [0, *torch.tensor([len(r) for r in self.responses]).cumsum(0).tolist()]

    @property
    def hits(self) -> Bool[Tensor, " n"]:
        """Samples the AR scored: the ones its own update trains on."""
        return torch.isfinite(self.mse) & ~self.truncated

    @property
    def ar_misses(self) -> Bool[Tensor, " n"]:
        """Finished, parsed samples that `score` scored as misses all the same: an explanation whose AR prompt is
        over the AR's n_ctx, or a reconstruction with no direction (a non-finite MSE)."""
        parsed = torch.tensor([e is not None for e in self.explanations], dtype=torch.bool)
        return parsed & ~self.truncated & ~self.hits


def step_vectors(step: int, n_rows: int, prompts_per_step: int, seed: int) -> Int[Tensor, " batch"]:
    """Indices of the vectors of step `step`: consecutive slices of a seeded permutation per epoch."""
    per_epoch = n_rows // prompts_per_step
    if per_epoch < 1:
        raise ConfigError(f"prompts_per_step={prompts_per_step} is more than the {n_rows} training vectors")
    epoch, k = divmod(step, per_epoch)
    return loop._epoch_order(n_rows, seed, epoch)[k * prompts_per_step:(k + 1) * prompts_per_step]


def check_prompts_fit(n_train: int, prompts_per_step: int) -> None:
    """A step samples `prompts_per_step` distinct training vectors. Checked by `nla-lens train-rl` before the models
    load and by `train_rl` before its first evaluation: `step_vectors` refused it only at the first step."""
    if prompts_per_step > n_train:
        raise ConfigError(f"rl.prompts_per_step={prompts_per_step} is more than the {n_train} training vectors (the "
                          f"training side of the split): set rl.prompts_per_step to {n_train} or fewer, or extract "
                          "more documents")


def group_seed(seed: int, step: int, group: int) -> int:
    """The sampling seed of one group: fixed by (seed, step, global group index), whatever rank runs it."""
    digest = hashlib.blake2b(f"{seed}/{step}/{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def token_logprobs(logits: Float[Tensor, "n vocab"], ids: Int[Tensor, " n"],
                   temperature: float) -> Float[Tensor, " n"]:
    """log softmax(logits / T) at `ids`: the sampling distribution before any top-p cut."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (logits / temperature).log_softmax(dim=-1).gather(-1, ids[:, None])[:, 0]


def sample_groups(av: ActivationVerbalizer, vectors: Float[Tensor, "groups d_model"], seeds: list[int], *,
                  group_size: int, max_new_tokens: int, temperature: float,
                  top_p: float) -> tuple[list[list[int]], Float[Tensor, " tokens"], Bool[Tensor, " n"]]:
    """G samples per vector through the AV's decoder (the one `verbalize` uses: KV-cached, fast
    path where it computes what TL does), each group drawn from its own seeded generator.

    Returns the responses (cut after the first stop id), their tokens' log-probs concatenated, and
    which responses hit `max_new_tokens` without a stop id.
    """
    rows = vectors.to(av.device).repeat_interleave(group_size, dim=0)
    n = rows.shape[0]
    with inference(av.model):
        tokens = av.prompt_tokens(n)
        decoder, logits = injected_prefill(av.model, tokens, av.injection(rows, tokens),
                                           tokens.shape[1] + max_new_tokens)
        generators = [torch.Generator(device=av.device).manual_seed(s) for s in seeds]
        stop = torch.tensor(av.eos_token_ids, device=av.device)
        finished = torch.zeros(n, dtype=torch.bool, device=av.device)
        ids = torch.empty(n, max_new_tokens, dtype=torch.long, device=av.device)
        logp = torch.empty(n, max_new_tokens, dtype=torch.float64, device=av.device)
        for t in range(max_new_tokens):
            next_ids = torch.cat([_sample(group, temperature, top_p, generator)
                                  for group, generator in zip(logits.split(group_size), generators, strict=True)])
            ids[:, t] = next_ids
            logp[:, t] = token_logprobs(logits, next_ids, temperature)
            finished |= torch.isin(next_ids, stop)
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = decoder.step(next_ids)
        is_stop = torch.isin(ids[:, :t + 1], stop)
        lengths = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1) + 1, t + 1)
        responses = [row[:length] for row, length in zip(ids.tolist(), lengths.tolist(), strict=True)]
        kept = torch.arange(t + 1, device=av.device)[None] < lengths[:, None]
        return responses, logp[:, :t + 1][kept].clone(), ~is_stop.any(dim=1).cpu()


def score(ar: ActivationReconstructor, vectors: Float[Tensor, "n d_model"], texts: list[str],
          truncated: Bool[Tensor, " n"]) -> tuple[list[str | None], Float[Tensor, " n"], Float[Tensor, " n"]]:
    """Explanations, their MSE (NaN where not scored) and rewards. The AR scores what `NLA.score` reads
    (`rows_the_ar_reads`: not an explanation whose AR prompt is over the AR's n_ctx, which `reconstruct` refused
    mid-run) less the truncated samples: the recipe's reward counts a sample cut at `max_new_tokens` a miss, its tag
    closed or not, where the paper's parse rule scores it. Both score the miss, and the AR's update drops them
    (`Rollout.hits`)."""
    explanations = [parse_explanation(text) for text in texts]
    parsed = torch.tensor([e is not None for e in explanations], dtype=torch.bool)
    finished = [None if cut else e for e, cut in zip(explanations, truncated.tolist(), strict=True)]
    wanted, _ = rows_the_ar_reads(ar, finished)
    mse = torch.full((len(texts),), float("nan"), dtype=torch.float64)
    if wanted:
        predicted = ar.reconstruct([cast(str, explanations[i]) for i in wanted])
        targets = vectors[wanted].to(predicted.device)
        mse[wanted] = metrics.mse_per_item(predicted, targets, ar.meta.mse_scale).cpu().double()
    miss = -metrics.miss_mse(ar.meta.d_model, ar.meta.mse_scale)
    return explanations, mse, grpo.rewards(mse, parsed, truncated, miss)


def rollout(av: ActivationVerbalizer, ar: ActivationReconstructor, vectors: Float[Tensor, "groups d_model"],
            seeds: list[int], config: RLConfig) -> Rollout:
    """Sample G explanations per vector and score them with the AR as it is now."""
    responses, old_logp, truncated = sample_groups(
        av, vectors, seeds, group_size=config.group_size, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p)
    targets = vectors.repeat_interleave(config.group_size, dim=0)
    texts = [cast(str, av.tokenizer.decode(r, skip_special_tokens=True)) for r in responses]
    explanations, mse, rewards = score(ar, targets, texts, truncated)
    grouped = rewards.view(-1, config.group_size)
    batch = Rollout(targets, responses, old_logp, texts, explanations, truncated, mse, rewards,
                    grpo.group_advantages(grouped).flatten())
    if config.self_imitation > 0:
        scored = batch.hits.view(-1, config.group_size)
        batch.advantages = batch.advantages + grpo.best_sample_bonus(grouped, scored, config.self_imitation).flatten()
    return batch


def policy_logprobs(av: ActivationVerbalizer, rollout: Rollout, samples: range,
                    temperature: float) -> Float[Tensor, " tokens"]:
    """Teacher-forced log-probs of the sampled tokens of `samples` (the injection installed)."""
    prompt = av.prompt_tokens(1)[0].tolist()
    logits, targets = response_logits(av, prompt, rollout.responses[samples.start:samples.stop],
                                      rollout.vectors[samples.start:samples.stop])
    return token_logprobs(logits, targets, temperature)


def reference_logprobs(reference: ActivationVerbalizer, rollout: Rollout, config: RLConfig) -> Float[Tensor, " tokens"]:
    """The frozen SFT AV's log-probs of every sampled token, micro-batch by micro-batch."""
    with inference(reference.model):
        return torch.cat([policy_logprobs(reference, rollout, chunk, config.temperature)
                          for chunk in _chunks(len(rollout), config.micro_batch)])


def policy_loss_sum(av: ActivationVerbalizer, rollout: Rollout, ref_logp: Float[Tensor, " tokens"] | None,
                    samples: range, config: RLConfig) -> tuple[Float[Tensor, ""], dict[str, Float[Tensor, " n"]]]:
    """Summed GRPO losses of `samples` (contiguous) and their per-sample diagnostics."""
    offsets = rollout.offsets
    tokens = slice(offsets[samples.start], offsets[samples.stop])
    logp = policy_logprobs(av, rollout, samples, config.temperature)
    lengths = torch.tensor([len(r) for r in rollout.responses[samples.start:samples.stop]], device=logp.device)
    sample = torch.repeat_interleave(torch.arange(len(samples), device=logp.device), lengths)
    old = rollout.old_logp[tokens].to(logp)
    ref = None if ref_logp is None else ref_logp[tokens].to(logp)
    advantages = rollout.advantages[samples.start:samples.stop].to(logp)
    return grpo.grpo_loss_sum(logp, old, ref, advantages, sample, clip_eps=config.clip_eps,
                              kl_coef=config.kl_coef)


def _chunks(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _padded_chunks(n: int, most: int, size: int) -> list[range | None]:
    """This rank's micro-batches of its `n` rows, padded with None to the count of the rank with the
    `most` rows: every rank then runs as many backwards, so DDP's all-reduces pair up."""
    chunks: list[range | None] = list(_chunks(n, size))
    return chunks + [None] * (math.ceil(most / size) - len(chunks))


def trainable_parameters(av: ActivationVerbalizer, ar: ActivationReconstructor,
                         train_ar: bool) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """The AV's and the AR's parameters to train, named for checkpoints; a frozen AR gets none."""
    policy = {f"av.{name}": p for name, p in av.model.named_parameters() if p.requires_grad}
    reconstructor: dict[str, nn.Parameter] = {}
    for prefix, module in (("ar.model", ar.model), ("ar.readout", ar.readout)):
        for name, p in module.named_parameters():
            if not train_ar:
                p.requires_grad_(False)
            elif p.requires_grad:
                reconstructor[f"{prefix}.{name}"] = p
    return policy, reconstructor


class _Trainer:
    """One RL run's state: the models, their DDP wrappers, the optimizer and the current rollout."""

    def __init__(self, av: ActivationVerbalizer, ar: ActivationReconstructor,
                 reference: ActivationVerbalizer | None, train_vectors: Float[Tensor, "n d_model"],
                 config: RLConfig, sft_rows: AVRows | None) -> None:
        if reference is None and config.kl_coef > 0:
            raise ConfigError(f"kl_coef={config.kl_coef} needs the frozen SFT AV as reference; pass it, "
                              "or set kl_coef: 0")
        check_prompts_fit(len(train_vectors), config.prompts_per_step)
        if sft_rows is not None and len(sft_rows) < config.sft_batch:
            raise ConfigError(f"sft_batch={config.sft_batch} is more than the {len(sft_rows)} labelled rows")
        self.av, self.ar, self.reference, self.config = av, ar, reference, config
        self.world = parallel.current_world()
        if config.prompts_per_step % self.world.world_size:
            raise ConfigError(f"prompts_per_step={config.prompts_per_step} must be a multiple of the "
                              f"{self.world.world_size} ranks: each rank samples whole groups")
        self.train_vectors = train_vectors.float()
        self.baseline = metrics.paper_baseline(self.train_vectors, ar.meta.mse_scale)
        if not self.baseline > 0:  # the step's FVE divides by it
            raise InputError(f"the {len(train_vectors)} training vectors all point one way (their paper baseline is "
                             f"{self.baseline}): RL's FVE needs a spread; pass vectors from different positions")
        self.policy_params, self.ar_params = trainable_parameters(av, ar, config.train_ar)
        self.params = {**self.policy_params, **self.ar_params}
        check_training_dtypes((p.dtype for p in self.params.values()), "the weights to train")  # float16 from Python
        groups = [{"params": list(self.policy_params.values()), "lr": config.lr}]
        if self.ar_params:
            groups.append({"params": list(self.ar_params.values()), "lr": config.ar_lr})
        self.optimizer = torch.optim.Adam(groups, betas=config.betas)
        self.device = av.device
        self.current: Rollout | None = None
        self.ref_logp: Tensor | None = None
        self.ar_rows: ARRows | None = None
        self.sft_rows = sft_rows
        self.sft_share: Int[Tensor, " rows"] | None = None
        self.diagnostics: list[dict[str, Tensor]] = []
        # One DDP module for both AV losses (DDP wants one module per parameter set): the phase picks.
        self.policy_phase = self._grpo_loss
        self.policy = parallel.wrap(parallel.LossModule({"model": av.model}, lambda index: self.policy_phase(index)),
                                    "ddp", self.device)
        self.reconstructor = (parallel.wrap(parallel.LossModule({"model": ar.model, "readout": ar.readout},
                                                                self._ar_loss), "ddp", self.device)
                              if config.train_ar else None)

    def _grpo_loss(self, index: Tensor) -> Tensor:
        assert self.current is not None  # `step` samples the rollout before any backward
        samples = range(int(index[0]), int(index[-1]) + 1)
        loss, diagnostics = policy_loss_sum(self.av, self.current, self.ref_logp, samples, self.config)
        self.diagnostics.append(diagnostics)
        return loss

    def _sft_loss(self, index: Tensor) -> Tensor:
        assert self.sft_rows is not None and self.sft_share is not None  # set by `_sft_backward`, its only caller
        return self.config.sft_coef * av_loss(self.av, self.sft_rows, self.sft_share[index], reduction="sum")

    def _ar_loss(self, index: Tensor) -> Tensor:
        assert self.ar_rows is not None  # set by `_ar_update`, its only caller
        return ar_loss(self.ar, self.ar_rows, index, reduction="sum")

    def step(self, step: int) -> dict[str, float]:
        config, world = self.config, self.world
        started = time.perf_counter()
        indices = step_vectors(step, len(self.train_vectors), config.prompts_per_step, config.seed)
        per_rank = config.prompts_per_step // world.world_size
        mine = indices[world.rank * per_rank:(world.rank + 1) * per_rank]
        seeds = [group_seed(config.seed, step, world.rank * per_rank + j) for j in range(per_rank)]
        current = rollout(self.av, self.ar, self.train_vectors[mine], seeds, config)
        self.current, self.diagnostics = current, []
        self.ref_logp = (reference_logprobs(self.reference, current, config)
                         if self.reference is not None and config.kl_coef > 0 else None)
        sampled = time.perf_counter()

        n_global = config.prompts_per_step * config.group_size
        loss_total, sft_total, av_grad_norms, av_skipped = 0.0, 0.0, [], 0.0
        ar_total, ar_grad_norm, ar_skipped = 0.0, float("nan"), 0.0
        for epoch in range(config.ppo_epochs):
            self.policy_phase = self._grpo_loss
            loss_total += self._backward(self.policy, _chunks(len(current), config.micro_batch), n_global)
            sft_total += self._sft_backward(step) if self.sft_rows is not None else float("nan")
            norm, skipped = self._clip_or_skip(self.policy_params)
            av_grad_norms.append(norm)
            av_skipped += skipped
            if epoch == 0 and self.reconstructor is not None:  # one AR step per rollout; Adam skips it after
                ar_total, ar_grad_norm, ar_skipped = self._ar_update(current)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        epochs = config.ppo_epochs  # the AV's loss, KL and clip fraction below are means over its updates
        loss_total, sft_total = loss_total / epochs, sft_total / epochs

        kl_total = torch.cat([d["kl"] for d in self.diagnostics]).sum() / epochs
        clipped_total = torch.cat([d["clipped"] for d in self.diagnostics]).sum() / epochs
        lengths = [len(r) for r in current.responses]
        sums = parallel.all_reduce_sums([
            len(current), float(current.rewards.sum()), float(kl_total), float(clipped_total), float(sum(lengths)),
            sum(e is None for e in current.explanations), float(current.truncated.sum()),
            sum(cjk_fraction(t) for t in current.texts), float(current.hits.sum()), float(current.ar_misses.sum()),
            loss_total / world.world_size, ar_total / world.world_size, sft_total / world.world_size,
        ], self.device)
        n, reward, kl, clipped, length, failed, truncated, cjk, hits, ar_misses, loss, ar_mse, sft_total = sums
        if self.reconstructor is None or hits == 0:
            ar_mse = float("nan")
        return {"step": step + 1, "loss": loss, "reward": reward / n, "fve": 1 + (reward / n) / self.baseline,
                "kl": kl / n, "clip_frac": clipped / n, "length": length / n, "parse_failure_rate": failed / n,
                "truncation_rate": truncated / n, "ar_miss_rate": ar_misses / n, "cjk_rate": cjk / n,
                "scored": hits / n,
                "av_grad_norm": sum(av_grad_norms) / epochs, "av_skipped": av_skipped, "ar_mse": ar_mse,
                "ar_grad_norm": ar_grad_norm, "ar_skipped": ar_skipped, "sft_loss": sft_total / (config.sft_coef or 1),
                "sample_seconds": sampled - started, "seconds": time.perf_counter() - started}

    def _backward(self, module: nn.Module, chunks: Sequence[range | None], n_global: float) -> float:
        """Backward of each chunk's summed loss / (the step's global count / world size): DDP averages
        the ranks' gradients. A None chunk joins the all-reduce with a zero loss. Returns this rank's
        total, which summed over ranks and divided by the world size is the global mean loss."""
        divisor = n_global / self.world.world_size
        total = 0.0
        for k, chunk in enumerate(chunks):
            index = torch.arange(chunk.start, chunk.stop) if chunk is not None else torch.zeros(1, dtype=torch.long)
            last = k == len(chunks) - 1
            no_sync = (cast(DistributedDataParallel, module).no_sync() if hasattr(module, "no_sync") and not last
                       else contextlib.nullcontext())
            with no_sync:
                loss = module(index, divisor)
                if chunk is None:
                    loss = loss * 0.0
                loss.backward()
            total += float(loss.detach())
        return total

    def _sft_backward(self, step: int) -> float:
        """`sft_coef` x the mean token cross-entropy of this step's `sft_batch` labelled rows, into the
        AV's gradients after the GRPO loss's; each rank takes a share of the rows (`_padded_chunks`).
        Returns this rank's loss total, as `_backward`."""
        rows, config = self.sft_rows, self.config
        assert rows is not None  # `step` calls this only with labelled rows
        index = step_vectors(step, len(rows), config.sft_batch, config.seed)
        n_tokens = sum(len(rows.responses[i]) for i in index.tolist())
        share, has_rows = parallel.rank_share(index, self.world)
        self.sft_share, self.policy_phase = share, self._sft_loss
        # rank_share's tensor_split gives the first ranks the larger shares: ceil(rows / ranks) at most.
        most = math.ceil(len(index) / self.world.world_size)
        chunks = _padded_chunks(len(share) if has_rows else 0, most, config.micro_batch)
        return self._backward(self.policy, chunks, n_tokens)

    def _clip_or_skip(self, params: dict[str, nn.Parameter]) -> tuple[float, float]:
        """Clip to `grad_clip`; a non-finite norm drops these gradients, so Adam skips them this step."""
        norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), self.config.grad_clip))
        if math.isfinite(norm):
            return norm, 0.0
        for p in params.values():
            p.grad = None
        logger.warning("non-finite gradient norm; skipping this update of %d parameters", len(params))
        return norm, 1.0

    def _ar_update(self, current: Rollout) -> tuple[float, float, float]:
        """One MSE step on the scored explanations; ranks with fewer of them join with zero losses.
        Returns this rank's loss total (as `_backward`), the gradient norm and whether it was skipped."""
        hits = current.hits.nonzero().flatten().tolist()
        counts = parallel.all_reduce_sums([float(len(hits) if r == self.world.rank else 0)
                                           for r in range(self.world.world_size)], self.device)
        n_global = sum(counts)
        if n_global == 0:
            return 0.0, float("nan"), 0.0
        texts = [current.explanations[i] for i in hits] or [""]  # a placeholder row for a zero loss
        vectors = current.vectors[hits] if hits else current.vectors[:1]
        prompts = [ar_prompt_ids(self.ar.meta, self.ar.tokenizer, t) for t in texts]  # as `reconstruct` serves them
        self.ar_rows = ARRows(prompts, vectors.float(), texts, [""] * len(texts), [-1] * len(texts))  # no documents
        chunks = _padded_chunks(len(hits), int(max(counts)), self.config.micro_batch)
        assert self.reconstructor is not None  # `step` calls this only when the AR trains
        total = self._backward(self.reconstructor, chunks, n_global)
        norm, skipped = self._clip_or_skip(self.ar_params)
        return total, norm, skipped


def _sft_rows(av: ActivationVerbalizer, data: LabelledActivations | None, config: RLConfig) -> AVRows | None:
    if config.sft_coef == 0:
        return None
    if data is None:
        raise ConfigError(f"sft_coef={config.sft_coef} adds the SFT loss of labelled rows: pass sft_data "
                          "(the SFT training split), or set sft_coef: 0")
    check_stops_at_turn_end(av)
    rows = av_rows(data, av.meta, av.tokenizer)
    check_fits(av.model.cfg.n_ctx, rows)
    return rows


def check_samples_fit(av: ActivationVerbalizer, ar: ActivationReconstructor, max_new_tokens: int) -> None:
    """A full-length sample fits both models: the AV's teacher-forced forward runs prompt + sample,
    and the AR reads the sample's explanation in its template (else an error mid-run)."""
    for name, prompt, n_ctx in (("AV", av.prompt_tokens(1).shape[1], av.model.cfg.n_ctx),
                                ("AR", len(ar_prompt_ids(ar.meta, ar.tokenizer, "")), ar.model.cfg.n_ctx)):
        problem = context_overflow(max_new_tokens, prompt, n_ctx, name)  # the AR's rule is `round_trip`'s too
        if problem:
            raise ConfigError(f"rl.{problem}")


def heldout_baseline(ar: ActivationReconstructor, vectors: Float[Tensor, "n d_model"]) -> Baseline:
    """The held-out FVE's baseline, by the rule of README "Scores": the paper baseline of these vectors when
    there are at least `MIN_BASELINE_VECTORS` (as the SFT stages report it), else the one the AR's sidecar
    recorded at export (SFT's held-out split), else none. Measured: 8 vectors' own baseline gave FVE -2.55
    where the sidecar's (32 vectors) gave -1.53."""
    recorded = None if len(vectors) >= MIN_BASELINE_VECTORS else ar.meta
    return resolve_baseline(vectors, ar.meta.mse_scale, recorded=recorded)


def heldout_for_eval(vectors: Float[Tensor, "m d_model"], wanted: int, *, warn: bool) -> Float[Tensor, "k d_model"]:
    """The first `wanted` held-out vectors (`rl.eval_vectors`). A split of fewer is scored whole, with a warning
    naming both counts (`warn`: on one rank), before the first step: it was cut to the split's count in silence.
    Not refused: the default 64 exceeds small splits, which the held-out round trip may still score."""
    if warn and wanted >= 2 and len(vectors) < wanted:  # eval_vectors 0 or 1 asks for no evaluation
        scored = (f"the held-out round trips score those {len(vectors)}" if len(vectors) >= 2
                  else "the run has no held-out evaluation (FVE needs >= 2 vectors)")
        warn_at_caller(f"rl.eval_vectors is {wanted}, but the held-out split holds "
                       f"{counted(len(vectors), 'vector')}: {scored}. Raise eval_fraction "
                       f"for more held-out vectors, or set rl.eval_vectors to {len(vectors)} or fewer")
    return vectors[:wanted]


def evaluate_rl(av: ActivationVerbalizer, ar: ActivationReconstructor, vectors: Float[Tensor, "n d_model"],
                max_new_tokens: int, baseline: Baseline) -> dict[str, Any]:
    """Greedy round trip of held-out vectors (failed parses count as misses), as the NLA is served; FVE
    against `baseline` (`heldout_baseline`), None without one."""
    if len(vectors) < 2:
        raise InputError(f"the held-out round trip needs >= 2 vectors (FVE needs a spread), got {len(vectors)}; "
                         "evaluate on more held-out vectors")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no FVE")  # train_rl logged it once
        warnings.filterwarnings("ignore", message="the AV's sidecar names base model")  # train_rl warned of it
        result = NLA(av, ar).round_trip(vectors, baseline=baseline.value, max_new_tokens=max_new_tokens,
                                        progress=False)
    lengths = [len(v.tokens) for v in result.verbalizations]
    return {"eval_fve": None if baseline.value is None else result.fve, "eval_baseline": baseline.value,
            "eval_parse_failures": result.n_failed_parses, "eval_length": sum(lengths) / len(lengths)}


def _log_heldout_baseline(baseline: Baseline, n_vectors: int) -> None:
    if baseline.value is not None:
        logger.info("rl held-out FVE against the baseline %.4g (%s, n=%s)", baseline.value, baseline.source,
                    baseline.n)
    else:
        logger.warning("rl held-out round trips record no FVE: %d held-out vectors give no trustworthy baseline "
                       "of their own (README \"Scores\": >= %d distinct vectors) and the AR's sidecar records "
                       "none; set rl.eval_vectors and eval_fraction for >= %d held-out vectors",
                       n_vectors, MIN_BASELINE_VECTORS, MIN_BASELINE_VECTORS)


def train_rl(
    av: ActivationVerbalizer,
    ar: ActivationReconstructor,
    reference: ActivationVerbalizer | None,
    train_vectors: Float[Tensor, "n d_model"],
    eval_vectors: Float[Tensor, "m d_model"],
    config: RLConfig,
    *,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    sft_data: LabelledActivations | None = None,
    progress: bool = True,
) -> loop.TrainResult:
    """Run `config.steps` RL steps, updating `av` (and `ar` unless `train_ar` is false) in place.

    `reference` is the frozen SFT AV of the KL term (None with `kl_coef: 0`); `sft_data`, the
    labelled rows of the `sft_coef` term (SFT's training split; unused when it is 0). `history` holds the
    per-step log (reward, fve, kl, length, parse-failure / truncation / AR-miss / CJK rates, ...), `evals`
    the greedy held-out round trips. Checkpoints and `resume` work as in SFT (`loop`).
    """
    backends.require_hooked("RL training", av.model)
    backends.require_hooked("RL training", ar.model)
    check_trainable_hook_point(av.injection_spec.hook_point)  # before any step, not at the first one's forward
    check_pair(av.meta, ar.meta)
    check_vocabularies(av.tokenizer, ar.tokenizer)
    warn_if_bases_differ(av.meta, ar.meta)  # before any step: the evaluation's NLA warned only if one ran
    loop.check_resume(out_dir, resume, RESUMABLE)
    check_samples_fit(av, ar, config.max_new_tokens)
    for model in (av.model, ar.model):  # HookedTransformers: require_hooked checked both
        # TL-only biases stay zero, so the export can drop them
        freeze_weights_hf_lacks(cast("HookedTransformer", model))
    if reference is not None:
        for p in reference.model.parameters():
            p.requires_grad_(False)
    started = time.perf_counter()
    trainer = _Trainer(av, ar, reference, train_vectors, config, _sft_rows(av, sft_data, config))
    eval_vectors = heldout_for_eval(eval_vectors, config.eval_vectors, warn=trainer.world.is_main)
    data = data_fingerprint(av.model, ar.model, ar.readout, *([] if reference is None else [reference.model]),
                            train_vectors, eval_vectors,
                            *([sft_data] if sft_data is not None and trainer.sft_rows is not None else []))
    result = loop.TrainResult(steps=config.steps)
    folder = loop.resume_folder(resume, out_dir)
    if folder is not None:
        result = loop.load_checkpoint(folder, trainer.params, trainer.optimizer, config, resumable=RESUMABLE,
                                      data=data)
        result.steps = config.steps
        loop.log_resumed(folder, out_dir, len(result.history))
    baseline = heldout_baseline(ar, eval_vectors)
    if len(eval_vectors) >= 2 and trainer.world.is_main:
        _log_heldout_baseline(baseline, len(eval_vectors))

    def run_eval(step: int) -> None:
        if len(eval_vectors) >= 2:
            result.evals.append({"step": step, **evaluate_rl(av, ar, eval_vectors, config.max_new_tokens,
                                                             baseline)})
            if trainer.world.is_main:
                logger.info("rl step %d: %s", step, result.evals[-1])

    start = len(result.history)
    with loop.deterministic_algorithms():
        if start == 0:
            run_eval(0)
        bar = tqdm(range(start, config.steps), desc="rl", unit="step", initial=start, total=config.steps,
                   disable=not progress or not trainer.world.is_main)
        for step in bar:
            record = trainer.step(step)
            result.history.append(record)
            bar.set_postfix(reward=format_number(record["reward"]), kl=format_number(record["kl"]))
            done = step + 1
            if loop.is_due(done, config.steps, config.eval_every):
                run_eval(done)
            if out_dir is not None and loop.is_due(done, config.steps, config.save_every):
                result.checkpoint = loop.save_checkpoint(Path(out_dir), done, trainer.params, trainer.optimizer,
                                                         config, result, data=data,
                                                         seconds=result.seconds + time.perf_counter() - started)
    result.seconds += time.perf_counter() - started
    return result
