"""NLA RL (GRPO on the AV, the AR trained alongside): the objective's pieces against hand-computed
values, rewards of misses, the gradient against plain HF + torch, resume, and 2-rank DDP."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import LAYER, NEEDS_TL3, as_exported_with_a_stray_bos, record_postfixes, stray_byte_verbalization
from launch import torchrun_cli
from safetensors.torch import load_file
from transformer_lens.hook_points import HookPoint
from transformers import AutoTokenizer

import hf_reference as ref
import nla_lens as nl
from nla_lens import backends, loading, metrics, testing
from nla_lens.cli import main
from nla_lens.sidecar import SIDECAR_NAME, ar_prompt_ids, dump_meta
from nla_lens.training import grpo, rl
from nla_lens.training.config import RLConfig, RLRunConfig
from nla_lens.training.export import TOKENIZER_FILES, _hf_target
from nla_lens.training.pipeline import run_train_rl

RL = RLConfig(steps=4, prompts_per_step=4, group_size=4, max_new_tokens=24, lr=3e-4, ar_lr=3e-4, micro_batch=6,
              eval_vectors=8, save_every=2, keep_checkpoints=4)


# --- the objective on fixed tensors ---------------------------------------------------------------

def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([[0.0, -1.0, -2.0, -1.0], [-0.5, -0.5, -0.5, -0.5]])
    std = math.sqrt(2 / 3)  # Bessel-corrected std of (0, -1, -2, -1)
    expected = torch.tensor([[1 / (std + 1e-6), 0.0, -1 / (std + 1e-6), 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(grpo.group_advantages(rewards), expected, atol=1e-12)


def test_the_best_sample_bonus_goes_to_each_groups_best_scored_sample():
    """weight x group_size on the highest-reward scored sample, the first of a tie; an unscored sample is never the
    best (the third group's -0.1 is a miss the test marks unscored); a group with no scored sample gets none."""
    rewards = torch.tensor([[-0.1, -0.05, -0.3, -2.0], [-2.0, -2.0, -2.0, -2.0], [-0.1, -0.4, -0.2, -0.2],
                            [-0.3, -0.2, -0.2, -0.9]], dtype=torch.float64)
    scored = torch.tensor([[True, True, True, False], [False] * 4, [False, True, True, True], [True] * 4])
    bonus = grpo.best_sample_bonus(rewards, scored, 0.5)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[0, 1] = expected[2, 2] = expected[3, 1] = 2.0
    assert torch.equal(bonus, expected)


def test_k3_kl_is_exp_d_minus_d_minus_one():
    logp, ref_logp = torch.tensor([-1.0, -2.0, -0.3]), torch.tensor([-1.5, -1.0, -0.3])
    expected = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1, 0.0])
    assert torch.allclose(grpo.k3_kl(logp, ref_logp), expected, atol=1e-6)


def test_clipped_surrogate_takes_the_pessimistic_side():
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.5, 1.5])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, -2.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -0.7, -3.0])
    # ratio 1.5, A=1 -> clip 1.2; 0.5, A=1 -> 0.5 (unclipped is lower); 1.1, A=-1 -> -1.1;
    # 0.5, A=-1 -> clip 0.8 * -1 = -0.8; 1.5, A=-2 -> -3.0 (unclipped is lower).
    expected = torch.tensor([1.2, 0.5, -1.1, -0.8, -3.0])
    got = grpo.clipped_surrogate(old + ratios.log(), old, advantages, clip_eps=0.2)
    assert torch.allclose(got, expected, atol=1e-6)


def test_grpo_loss_is_a_per_token_mean_within_each_sample_then_a_sum():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    old = torch.tensor([-1.0, -2.0 - math.log(1.5), -0.5])  # ratios 1, 1.5, 1
    ref_logp = torch.tensor([-1.0, -2.0, -1.5])
    advantages, sample = torch.tensor([2.0, -1.0]), torch.tensor([0, 0, 1])
    loss, diagnostics = grpo.grpo_loss_sum(logp, old, ref_logp, advantages, sample, clip_eps=0.2, kl_coef=0.1)
    kl = math.exp(-1.0) + 1.0 - 1  # token 3: d = -1
    sample_0 = -(2.0 + 1.2 * 2.0) / 2  # tokens 1-2: ratio 1 and 1.5 (clipped to 1.2) times A = 2
    sample_1 = -(-1.0 - 0.1 * kl)
    assert float(loss) == pytest.approx(sample_0 + sample_1, abs=1e-6)
    assert diagnostics["kl"].tolist() == pytest.approx([0.0, kl], abs=1e-6)
    assert diagnostics["clipped"].tolist() == pytest.approx([0.5, 0.0])


def test_the_advantage_eps_damps_a_group_whose_rewards_barely_differ():
    """(r - mean) / (std + 1e-6): rewards 0 and 2e-6 have a Bessel std of sqrt(2) 1e-6, so their advantages are
    -+1 / (sqrt(2) + 1) = -+(sqrt(2) - 1), not the -+1 / sqrt(2) that a smaller eps gives."""
    advantages = grpo.group_advantages(torch.tensor([[0.0, 2e-6]], dtype=torch.float64))
    assert advantages[0].tolist() == pytest.approx([1 - math.sqrt(2), math.sqrt(2) - 1], rel=1e-9)


def test_the_clip_fraction_counts_ratios_below_and_above_the_clip_range():
    """Ratios 0.5, 0.9, 1.0, 1.5 at eps 0.2: 0.5 and 1.5 lie outside [0.8, 1.2], so half the tokens are clipped."""
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.5], dtype=torch.float64)
    logp = torch.zeros(4, dtype=torch.float64)
    _, diagnostics = grpo.grpo_loss_sum(logp, logp - ratios.log(), None, torch.tensor([1.0], dtype=torch.float64),
                                        torch.zeros(4, dtype=torch.long), clip_eps=0.2, kl_coef=0.0)
    assert diagnostics["clipped"].tolist() == [0.5]


def test_misses_score_as_orthogonal_guesses():
    mse = torch.tensor([0.3, 0.4, 0.5, float("nan"), 0.6], dtype=torch.float64)
    parsed = torch.tensor([True, False, True, True, True])
    truncated = torch.tensor([False, False, True, False, False])
    got = grpo.rewards(mse, parsed, truncated, miss_reward=-2.0)
    assert got.tolist() == pytest.approx([-0.3, -2.0, -2.0, -2.0, -0.6])


def test_truncated_and_unparsed_samples_get_the_miss_reward_from_the_ar(ar_nanonla):
    vectors = torch.randn(3, ar_nanonla.meta.d_model, generator=torch.Generator().manual_seed(0))
    texts = ["<explanation>\na cat\n</explanation>", "no tags at all", "<explanation>\na cat\n</explanation>"]
    explanations, mse, rewards = rl.score(ar_nanonla, vectors, texts, torch.tensor([False, False, True]))
    assert explanations == ["a cat", None, "a cat"]
    assert math.isfinite(float(mse[0])) and math.isnan(float(mse[1])) and math.isnan(float(mse[2]))
    assert float(rewards[0]) == pytest.approx(-float(mse[0]))
    assert rewards[1:].tolist() == [-2.0, -2.0]  # mse_scale = sqrt(d): an orthogonal guess scores -2


def test_an_explanation_that_retokenizes_past_the_ars_context_gets_the_miss_reward(av_karvonen, ar_nanonla,
                                                                                 monkeypatch):
    """`check_samples_fit` bounds the sampled tokens, not their text tokenized again: such a sample made
    `reconstruct` refuse the whole rollout's scoring mid-run. It scores the miss, as a failed parse does."""
    tokenizer, scale = ar_nanonla.tokenizer, ar_nanonla.meta.mse_scale
    stray = stray_byte_verbalization(tokenizer)
    ids, garbled = stray.tokens, stray.text
    prompt = len(ar_prompt_ids(ar_nanonla.meta, tokenizer, ""))
    assert len(ar_prompt_ids(ar_nanonla.meta, tokenizer, stray.explanation)) > prompt + len(ids)
    monkeypatch.setattr(ar_nanonla.model.cfg, "n_ctx", prompt + len(ids))
    rl.check_samples_fit(av_karvonen, ar_nanonla, len(ids))  # the up-front check lets a sample this long through
    vectors = torch.randn(3, ar_nanonla.meta.d_model, generator=torch.Generator().manual_seed(0))
    cat = "<explanation>\na cat\n</explanation>"
    explanations, mse, rewards = rl.score(ar_nanonla, vectors, [cat, garbled, cat], torch.zeros(3, dtype=torch.bool))
    assert explanations[0] == explanations[2] == "a cat" and explanations[1] is not None
    assert math.isnan(float(mse[1])) and float(rewards[1]) == -2.0  # mse_scale = sqrt(d): an orthogonal guess
    expected = metrics.mse_per_item(ar_nanonla.reconstruct(["a cat"] * 2), vectors[[0, 2]], scale).double()
    assert torch.allclose(mse[[0, 2]], expected, atol=1e-6) and torch.equal(rewards[[0, 2]], -mse[[0, 2]])


@NEEDS_TL3
def test_a_step_drops_an_explanation_the_ar_cannot_read_from_the_ars_update_and_logs_it(tiny_paths, monkeypatch):
    """The AR's update trains on the samples it scored, so one whose explanation retokenizes past its n_ctx is left
    out, as a failed parse is; the step logs its share as `ar_miss_rate`. The step raised PromptTooLongError."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], backend="hooked")
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"], backend="hooked")  # this step trains it
    tokenizer = av.tokenizer
    garbled = stray_byte_verbalization(tokenizer).tokens
    cat = [*tokenizer.encode("<explanation>\nthe cat\n</explanation>", add_special_tokens=False),
           tokenizer.eos_token_id]
    responses = [cat, garbled, cat, cat]
    monkeypatch.setattr(ar.model.cfg, "n_ctx", len(ar_prompt_ids(ar.meta, ar.tokenizer, "")) + len(garbled))
    monkeypatch.setattr(rl, "sample_groups", lambda *a, **k: (responses, torch.zeros(sum(map(len, responses))),
                                                              torch.zeros(len(responses), dtype=torch.bool)))
    vectors = torch.randn(4, ar.meta.d_model, generator=torch.Generator().manual_seed(0))
    trainer = rl._Trainer(av, ar, None, vectors, RLConfig(prompts_per_step=2, group_size=2, kl_coef=0.0), None)
    record = trainer.step(0)
    assert trainer.ar_rows.explanations == ["the cat"] * 3
    assert float(trainer.current.rewards[1]) == -2.0 and trainer.current.hits.tolist() == [True, False, True, True]
    assert record["ar_miss_rate"] == 0.25 and record["scored"] == 0.75 and record["parse_failure_rate"] == 0
    assert record["truncation_rate"] == 0 and math.isfinite(record["ar_mse"])


@NEEDS_TL3
def test_a_response_echoing_the_marker_is_scored_with_the_prompts_injection_site(av_karvonen, tiny_paths):
    """A sample may echo the marker between its neighbours: it is text, not a second site. The loss
    equals one HF forward per sample with the plain layer-1 hook at the prompt's site only."""
    meta, eos = av_karvonen.meta, av_karvonen.tokenizer.eos_token_id
    echo = [meta.injection_left_neighbor_id, meta.injection_token_id, meta.injection_right_neighbor_id, eos]
    responses = [echo, [eos]]
    vectors = torch.randn(2, meta.d_model, generator=torch.Generator().manual_seed(0))
    old_logp, advantages = -torch.rand(5, generator=torch.Generator().manual_seed(1)), torch.tensor([1.0, -1.0])
    batch = rl.Rollout(vectors, responses, old_logp, ["", ""], [None, None], torch.zeros(2, dtype=torch.bool),
                       torch.full((2,), math.nan, dtype=torch.float64), torch.zeros(2), advantages)
    config = RLConfig(kl_coef=0.0)
    with torch.no_grad():
        loss, _ = rl.policy_loss_sum(av_karvonen, batch, None, range(2), config)

    hf, _ = ref.load_hf(tiny_paths["av_karvonen"])
    sidecar = ref.sidecar(tiny_paths["av_karvonen"])
    prompt = ref.av_prompt(av_karvonen.tokenizer, sidecar)
    sites = ref.marker_sites(torch.tensor([prompt]), sidecar["tokens"])
    logp = []
    for i, response in enumerate(responses):
        ids = torch.tensor([prompt + response])
        with torch.no_grad(), ref.karvonen_hook(hf, sites, vectors[i:i + 1]):
            logits = hf(ids).logits[0, len(prompt) - 1:-1]
        logp.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0])
    expected, _ = grpo.grpo_loss_sum(torch.cat(logp), old_logp, None, advantages, torch.tensor([0, 0, 0, 0, 1]),
                                     clip_eps=config.clip_eps, kl_coef=0.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)


@NEEDS_TL3
@pytest.mark.parametrize("forward", ["sampling", "teacher-forced"])
def test_an_injection_that_never_runs_in_an_rl_forward_is_an_injection_error(tiny_paths, monkeypatch, forward):
    """RL's sampling prefill installed the injection by its hook point's name and never checked that it ran: a name
    leading to a HookPoint the forward does not pass through (renamed, replaced) had every rollout explain the bare
    prompt, in silence. Its teacher-forced log-probs (the policy's and the reference's) go through SFT's forward,
    which checks it too."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], backend="hooked")
    point = av.injection_spec.hook_point
    vectors = torch.randn(2, av.meta.d_model, generator=torch.Generator().manual_seed(0))
    monkeypatch.setitem(av.model.mod_dict, point, HookPoint())  # hooks added by name go there
    where = "prefill" if forward == "sampling" else "teacher-forced forward"
    with pytest.raises(nl.InjectionError, match=rf"^the injection at {point} never ran in the {where}, so the AV "):
        if forward == "sampling":
            rl.sample_groups(av, vectors, [1, 2], group_size=2, max_new_tokens=4, temperature=1.0, top_p=1.0)
        else:
            batch = rl.Rollout(vectors.repeat_interleave(2, 0), [[10, 11]] * 4, torch.zeros(8), [], [],
                               torch.zeros(4, dtype=torch.bool), *[None] * 3)
            rl.policy_logprobs(av, batch, range(4), temperature=1.0)


# --- a small SFT pair to run RL from ----------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_pair(tmp_path_factory, base_folder, extract_config) -> Path:
    """Extraction + explanations + an SFT AV that mostly writes parseable labels + an SFT AR."""
    from nla_lens.training import (
        TrainConfig,
        export_ar,
        export_av,
        extract_activations,
        init_ar,
        init_av,
        label_activations,
        load_activations,
        save_explanations,
        split_by_document,
        train_ar,
        train_av,
    )

    root = tmp_path_factory.mktemp("rl")
    tokenizer = loading.load_tokenizer(base_folder)
    base = loading.load_hooked_transformer(base_folder, tokenizer, dtype=torch.float32, device="cpu")
    acts = extract_activations(base, tokenizer, testing.tiny_corpus(24, words_per_doc=10), root / "acts",
                               extract_config, base_model="tiny", progress=False)
    activations = load_activations(acts)
    data = label_activations(activations, lambda r: f"the token {r.token.strip()}")
    save_explanations(data, root / "explanations.jsonl")
    train, held_out = split_by_document(data, 0.25, 0)
    av = init_av(base_folder, activations.meta)
    train_av(av, train, held_out, TrainConfig(steps=60, batch_size=16, lr=2e-3, warmup_steps=5), n_samples=0,
             progress=False)
    export_av(av, root / "av", base_folder)
    ar = init_ar(base_folder, activations.meta)
    train_ar(ar, train, held_out, TrainConfig(steps=30, batch_size=16, lr=2e-3, warmup_steps=3), progress=False)
    export_ar(ar, root / "ar", base_folder)
    return root


def _load(root: Path, dtype: torch.dtype = torch.float32):
    av = nl.ActivationVerbalizer.from_pretrained(root / "av", dtype=dtype, backend="hooked")
    ar = nl.ActivationReconstructor.from_pretrained(root / "ar", dtype=dtype, backend="hooked")
    return av, ar, nl.ActivationVerbalizer.from_pretrained(root / "av", dtype=dtype, backend="hooked")


def _train_split(root: Path):
    from nla_lens.training import label_activations, load_activations, split_by_document

    data = label_activations(load_activations(root / "acts"), root / "explanations.jsonl")
    return split_by_document(data, 0.25, 0)[0]


def _train_vectors(root: Path) -> torch.Tensor:
    return _train_split(root).vectors


@NEEDS_TL3
def test_sampling_log_probs_are_the_policys_raw_log_probs_even_under_top_p(sft_pair):
    av, _, _ = _load(sft_pair)
    vectors = _train_vectors(sft_pair)[:3]
    responses, old_logp, truncated = rl.sample_groups(av, vectors, [1, 2, 3], group_size=4, max_new_tokens=12,
                                                      temperature=1.0, top_p=0.5)
    assert len(responses) == 12 and truncated.shape == (12,)
    stop = set(av.eos_token_ids)
    for response, cut in zip(responses, truncated.tolist(), strict=True):
        assert cut == (response[-1] not in stop) and (cut or len(response) <= 12)
        assert not any(t in stop for t in response[:-1])
    batch = rl.Rollout(vectors.repeat_interleave(4, 0), responses, old_logp, [], [], truncated, *[None] * 3)
    with torch.no_grad():
        teacher_forced = rl.policy_logprobs(av, batch, range(12), temperature=1.0)
    # The decoder's log-probs are log softmax of the raw logits: no renormalisation over the top-p set.
    assert torch.allclose(old_logp.float(), teacher_forced, atol=1e-4)


@NEEDS_TL3
def test_rl_step_gradient_equals_plain_hf_and_torch(sft_pair):
    """Our loss (batched, padded, micro-batched) vs one HF forward per sample with a plain layer-1
    hook and the GRPO formula written out: the same gradient, in float64."""
    av, ar, _ = _load(sft_pair, torch.float64)
    config = dataclasses.replace(RL, kl_coef=0.05)
    vectors = _train_vectors(sft_pair)[:2].double()
    batch = rl.rollout(av, ar, vectors, [5, 6], config)
    generator = torch.Generator().manual_seed(0)
    n_tokens = batch.old_logp.numel()
    # Make every term matter: old log-probs off by up to +-0.4 (some ratios clip), a reference that
    # differs from the policy, advantages of both signs.
    batch.old_logp = batch.old_logp + 0.8 * (torch.rand(n_tokens, generator=generator, dtype=torch.float64) - 0.5)
    ref_logp = batch.old_logp + (torch.rand(n_tokens, generator=generator, dtype=torch.float64) - 0.5)
    batch.advantages = torch.randn(len(batch), generator=generator, dtype=torch.float64)

    av.model.zero_grad()
    total = 0.0
    for chunk in [range(0, 3), range(3, 8)]:
        loss, _ = rl.policy_loss_sum(av, batch, ref_logp, chunk, config)
        (loss / len(batch)).backward()
        total += float(loss.detach()) / len(batch)

    hf, _ = ref.load_hf(sft_pair / "av")
    hf = hf.double()
    meta = ref.sidecar(sft_pair / "av")
    prompt = ref.av_prompt(av.tokenizer, meta)
    offsets = batch.offsets
    losses = []
    for i, response in enumerate(batch.responses):
        ids = torch.tensor([prompt + response])
        with _karvonen_hook_with_grad(hf, ref.marker_sites(ids, meta["tokens"]), batch.vectors[i:i + 1]):
            logits = hf(ids).logits[0, len(prompt) - 1:-1]
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        old, reference = batch.old_logp[offsets[i]:offsets[i + 1]], ref_logp[offsets[i]:offsets[i + 1]]
        ratio = torch.exp(logp - old)
        advantage = batch.advantages[i]
        surrogate = torch.minimum(ratio * advantage, torch.clamp(ratio, 0.8, 1.2) * advantage)
        d = reference - logp
        losses.append((-(surrogate - 0.05 * (torch.exp(d) - d - 1))).mean())
    expected = torch.stack(losses).mean()
    expected.backward()
    # float64 both sides; HF builds its rotary tables in float32, which leaves ~1e-9 relative.
    assert total == pytest.approx(float(expected.detach()), rel=1e-7)

    _assert_same_gradients(av, hf)


def _assert_same_gradients(av, hf) -> None:
    """Every HF parameter's gradient equals the TL one mapped to its name (float64 both sides)."""
    hf_params = dict(hf.named_parameters())
    compared = 0
    for name, param in av.model.named_parameters():
        if param.grad is None:
            continue
        target = _hf_target(name, param.grad, qkv_bias=False)
        if target is None:
            continue
        hf_name, grad = target
        assert torch.allclose(grad, hf_params[hf_name].grad, atol=1e-8, rtol=1e-5), name
        compared += 1
    assert compared == len([p for p in hf.parameters() if p.requires_grad])


@NEEDS_TL3
def test_sft_term_adds_the_plain_cross_entropy_gradient(sft_pair):
    """`sft_coef` x mean token cross-entropy of the step's labelled rows vs one HF forward per row
    (plain layer-1 hook, the target text tokenized here): the same gradient, in float64."""
    av, ar, _ = _load(sft_pair, torch.float64)
    data = _train_split(sft_pair)
    config = dataclasses.replace(RL, kl_coef=0.0, sft_coef=0.7, sft_batch=5, micro_batch=2)
    trainer = rl._Trainer(av, ar, None, data.vectors, config, rl._sft_rows(av, data, config))
    av.model.zero_grad()
    total = trainer._sft_backward(step=3)

    rows = rl.step_vectors(3, len(data), 5, config.seed).tolist()
    hf, _ = ref.load_hf(sft_pair / "av")
    hf = hf.double()
    meta = ref.sidecar(sft_pair / "av")
    prompt = ref.av_prompt(av.tokenizer, meta)
    summed, n_tokens = torch.zeros((), dtype=torch.float64), 0
    for i in rows:
        target = av.tokenizer.encode(f"<explanation>\n{data.explanations[i]}\n</explanation>",
                                     add_special_tokens=False) + [av.tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        with _karvonen_hook_with_grad(hf, ref.marker_sites(ids, meta["tokens"]), data.vectors[i:i + 1].double()):
            logits = hf(ids).logits[0, len(prompt) - 1:-1]
        summed = summed + torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum")
        n_tokens += len(target)
    expected = 0.7 * summed / n_tokens
    expected.backward()
    assert total == pytest.approx(float(expected.detach()), rel=1e-7)
    _assert_same_gradients(av, hf)


@NEEDS_TL3
def test_sft_term_needs_labelled_rows_and_a_valid_config(sft_pair):
    av, ar, reference = _load(sft_pair)
    with pytest.raises(nl.ConfigError, match="sft_data"):
        rl.train_rl(av, ar, reference, _train_vectors(sft_pair), torch.empty(0, 64),
                    dataclasses.replace(RL, sft_coef=0.5), progress=False)
    with pytest.raises(nl.ConfigError, match="sft_coef >= 0"):
        dataclasses.replace(RL, sft_coef=-1.0)


def test_sft_term_refuses_an_av_that_does_not_stop_on_the_turn_end_its_rows_end_with(av_karvonen, monkeypatch):
    """The SFT rows end with the chat template's turn end (`<|im_end|>` here): an AV whose generation_config names
    other stop ids would learn a stop its rollouts never take."""
    monkeypatch.setattr(av_karvonen, "eos_token_ids", [av_karvonen.model.cfg.d_vocab + 1])
    data = testing.label_determined_vectors(2, d_model=av_karvonen.meta.d_model)
    with pytest.raises(nl.ConfigError, match=r"^every AV training row ends the turn with '<\|im_end\|>'"):
        rl._sft_rows(av_karvonen, data, dataclasses.replace(RL, sft_coef=0.5))


@contextlib.contextmanager
def _karvonen_hook_with_grad(model, sites, vectors):
    """hf_reference.karvonen_hook without its in-place edit (which autograd refuses): h + ||h|| v/||v||
    at the marker on the output of decoder layer 1, prefill only."""
    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] < 2:
            return output
        added = torch.zeros_like(h)
        for i, (b, p) in enumerate(sites):
            added[b, p] = h[b, p].norm() * vectors[i].to(h.dtype) / vectors[i].norm()
        return (h + added, *output[1:]) if isinstance(output, tuple) else h + added

    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _params(av, ar) -> dict[str, torch.Tensor]:
    return {**{f"av.{k}": v.detach().clone() for k, v in av.model.named_parameters()},
            **{f"ar.{k}": v.detach().clone() for k, v in ar.model.named_parameters()},
            "readout": ar.readout.weight.detach().clone()}


@NEEDS_TL3
def test_resume_and_extension_give_the_uninterrupted_run(sft_pair, tmp_path):
    """With the `sft_coef` term on: its rows, like the vectors, are a function of the step."""
    data = _train_split(sft_pair)
    train, config = data.vectors, dataclasses.replace(RL, sft_coef=0.5, sft_batch=5)
    av, ar, reference = _load(sft_pair)
    before = _params(av, ar)
    whole = rl.train_rl(av, ar, reference, train, train[:0], config, out_dir=tmp_path / "whole", sft_data=data,
                        progress=False)
    after = _params(av, ar)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("av."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("ar."))
    # A 2-step run, resumed and extended to 4 steps (the learning rates are constant, so `steps` may
    # grow on resume), repeats the 4-step run.
    av2, ar2, reference2 = _load(sft_pair)
    rl.train_rl(av2, ar2, reference2, train, train[:0], dataclasses.replace(config, steps=2),
                out_dir=tmp_path / "short", sft_data=data, progress=False)
    av2, ar2, reference2 = _load(sft_pair)
    resumed = rl.train_rl(av2, ar2, reference2, train, train[:0], config, out_dir=tmp_path / "resumed",
                          resume=tmp_path / "short" / "checkpoints" / "step-000002", sft_data=data, progress=False)
    final = _params(av2, ar2)
    assert all(torch.equal(after[k], final[k]) for k in after)
    # The checkpoint records the time up to it (it recorded 0.0), so the resumed run's total counts both stretches.
    short = json.loads((tmp_path / "short" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert 0 < short["seconds"] < resumed.seconds
    # Resuming on other training vectors under the same config is refused, not continued.
    with pytest.raises(nl.ConfigError, match="other data than the run started with"):
        rl.train_rl(*_load(sft_pair), train[1:], train[:0], config, out_dir=tmp_path / "short", resume="latest",
                    sft_data=data, progress=False)
    # So is resuming with another KL reference (the `av:` folder the run started from).
    av3, ar3, reference3 = _load(sft_pair)
    with torch.no_grad():
        reference3.model.blocks[0].mlp.W_out.mul_(1.01)
    with pytest.raises(nl.ConfigError, match="other starting weights"):
        rl.train_rl(av3, ar3, reference3, train, train[:0], config, out_dir=tmp_path / "short", resume="latest",
                    sft_data=data, progress=False)
    untimed = [[{k: v for k, v in row.items() if "seconds" not in k} for row in run.history]
               for run in (whole, resumed)]
    assert untimed[0] == untimed[1]
    row = whole.history[-1]
    assert {"reward", "fve", "kl", "length", "parse_failure_rate", "truncation_rate", "cjk_rate"} <= set(row)
    assert 0 <= row["parse_failure_rate"] <= 1 and row["kl"] >= 0 and row["sft_loss"] > 0


@NEEDS_TL3
def test_resume_latest_starts_a_first_launch_at_step_0_and_a_rerun_without_it_is_refused(sft_pair, tmp_path):
    """One config launches and relaunches a preemptible job: `resume: latest` with no checkpoint yet was a
    CheckpointError. A rerun without `resume` started at step 0 over the checkpoints it found; over a finished run,
    the refusal says so, and that RL's resume extends it with more steps (SFT's cannot)."""
    train, config = _train_vectors(sft_pair), dataclasses.replace(RL, steps=1, kl_coef=0.0, eval_vectors=0)
    result = rl.train_rl(*_load(sft_pair)[:2], None, train, train[:0], config, out_dir=tmp_path, resume="latest",
                         progress=False)
    assert len(result.history) == 1 and result.checkpoint == tmp_path / "checkpoints" / "step-000001"
    with pytest.raises(nl.ConfigError, match=r"holds a finished run: its checkpoints reach its last step, 1 "
                                             r"\(step-000001\)\. A run without resume .* runs no further step: .*, "
                                             "unless you raise steps: then it extends the run$"):
        rl.train_rl(*_load(sft_pair)[:2], None, train, train[:0], config, out_dir=tmp_path, progress=False)


@NEEDS_TL3
@pytest.mark.parametrize("eval_vectors", [0, 8])
def test_an_ar_whose_sidecar_names_another_base_than_the_avs_is_warned_of_once_before_any_step(sft_pair, tmp_path,
                                                                                             eval_vectors):
    """RL warned of it only through the held-out evaluation's NLA: never with eval_vectors < 2, so an AV of one base
    trained against the reward of an AR of another, and exported as a pair, without a word."""
    ar_folder = Path(shutil.copytree(sft_pair / "ar", tmp_path / "ar"))
    sidecar = yaml.safe_load((ar_folder / "nla_meta.yaml").read_text())
    sidecar["extraction"]["base_model"] = "other-org/other-base"
    (ar_folder / "nla_meta.yaml").write_text(yaml.safe_dump(sidecar, allow_unicode=True))
    av = nl.ActivationVerbalizer.from_pretrained(sft_pair / "av", backend="hooked")
    ar = nl.ActivationReconstructor.from_pretrained(ar_folder, backend="hooked")
    train = _train_vectors(sft_pair)
    config = dataclasses.replace(RL, steps=1, kl_coef=0.0, eval_vectors=eval_vectors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rl.train_rl(av, ar, None, train, train[:8], config, progress=False)
    bases = [str(w.message) for w in caught if "names base model" in str(w.message)]
    assert len(bases) == 1, bases
    assert "and the AR's 'other-org/other-base', which are not one folder here" in bases[0]


@NEEDS_TL3
def test_train_ar_false_leaves_the_reward_model_untouched(sft_pair):
    av, ar, reference = _load(sft_pair)
    before = _params(av, ar)
    config = dataclasses.replace(RL, steps=2, train_ar=False, kl_coef=0.0, eval_vectors=0)
    result = rl.train_rl(av, ar, None, _train_vectors(sft_pair), torch.empty(0, 64), config, progress=False)
    after = _params(av, ar)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("av."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("av."))
    assert math.isnan(result.history[-1]["ar_mse"]) and result.history[-1]["kl"] == 0.0


@NEEDS_TL3
def test_ppo_epochs_repeat_the_av_update_on_one_rollout_and_the_ar_steps_once(sft_pair):
    """ppo_epochs 2 vs the loop written out with plain torch.optim.Adam: two AV updates on one rollout,
    each loss against the rollout's sampling and reference log-probs (which the first update moved
    away from, so the clip binds), gradients clipped to 1; the AR takes one step, as with ppo_epochs 1."""
    config = dataclasses.replace(RL, ppo_epochs=2, lr=1e-2, kl_coef=0.05, micro_batch=5)
    vectors = _train_vectors(sft_pair).double()
    av, ar, reference = _load(sft_pair, torch.float64)
    record = rl._Trainer(av, ar, reference, vectors, config, None).step(0)

    av2, ar2, reference2 = _load(sft_pair, torch.float64)
    index = rl.step_vectors(0, len(vectors), config.prompts_per_step, config.seed)
    seeds = [rl.group_seed(config.seed, 0, j) for j in range(config.prompts_per_step)]
    batch = rl.rollout(av2, ar2, vectors.float()[index], seeds, config)  # the trainer keeps float32 vectors
    ref_logp = rl.reference_logprobs(reference2, batch, config)
    params = [p for p in av2.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    for _ in range(2):
        loss, _ = rl.policy_loss_sum(av2, batch, ref_logp, range(len(batch)), config)
        (loss / len(batch)).backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    for (name, mine), theirs in zip(av.model.named_parameters(), av2.model.parameters(), strict=True):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-12), name
    assert record["clip_frac"] > 0  # the second update's ratios moved past 1 +- 0.2

    av3, ar3, reference3 = _load(sft_pair, torch.float64)
    rl._Trainer(av3, ar3, reference3, vectors, dataclasses.replace(config, ppo_epochs=1), None).step(0)
    assert torch.equal(ar.readout.weight, ar3.readout.weight)
    assert all(torch.equal(a, b) for a, b in zip(ar.model.parameters(), ar3.model.parameters(), strict=True))
    assert not torch.equal(ar.readout.weight, ar2.readout.weight)  # ... which moved it
    with pytest.raises(nl.ConfigError, match=r"ppo_epochs >= 1 \(got 0\)"):
        dataclasses.replace(RL, ppo_epochs=0)


@NEEDS_TL3
def test_self_imitation_adds_the_cross_entropy_of_each_groups_best_sample(sft_pair):
    """self_imitation w vs the loss written out with plain torch: the GRPO loss (advantages as the recipe's) plus w x
    the mean over groups of the best scored sample's mean token -log p (at the sampling temperature, as the ratio),
    one Adam step with gradients clipped to 1. The AV's weights agree to 1e-12 in float64."""
    config = dataclasses.replace(RL, self_imitation=0.5, lr=1e-2, kl_coef=0.05, micro_batch=5)
    vectors = _train_vectors(sft_pair).double()
    av, ar, reference = _load(sft_pair, torch.float64)
    rl._Trainer(av, ar, reference, vectors, config, None).step(0)

    av2, ar2, reference2 = _load(sft_pair, torch.float64)
    plain = dataclasses.replace(config, self_imitation=0.0)
    index = rl.step_vectors(0, len(vectors), config.prompts_per_step, config.seed)
    seeds = [rl.group_seed(config.seed, 0, j) for j in range(config.prompts_per_step)]
    batch = rl.rollout(av2, ar2, vectors.float()[index], seeds, plain)  # the trainer keeps float32 vectors
    ref_logp = rl.reference_logprobs(reference2, batch, config)
    params = [p for p in av2.model.parameters() if p.requires_grad]
    grpo_loss, _ = rl.policy_loss_sum(av2, batch, ref_logp, range(len(batch)), config)
    logp, offsets = rl.policy_logprobs(av2, batch, range(len(batch)), config.temperature), batch.offsets
    best = []
    for group in range(config.prompts_per_step):
        members = range(group * config.group_size, (group + 1) * config.group_size)
        scored = [i for i in members if bool(batch.hits[i])]
        if scored:
            best.append(max(scored, key=lambda i: (float(batch.rewards[i]), -i)))
    assert best  # the SFT pair parses most samples
    imitation = torch.stack([-logp[offsets[i]:offsets[i + 1]].mean() for i in best]).sum() / config.prompts_per_step
    (grpo_loss / len(batch) + config.self_imitation * imitation).backward()
    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    torch.optim.Adam(params, lr=config.lr).step()
    for (name, mine), theirs in zip(av.model.named_parameters(), av2.model.parameters(), strict=True):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-12), name
    with pytest.raises(nl.ConfigError, match=r"self_imitation >= 0 \(got -1.0\)"):
        dataclasses.replace(RL, self_imitation=-1.0)


@NEEDS_TL3
def test_a_checkpoint_older_than_a_setting_resumes_at_that_settings_default(sft_pair, tmp_path):
    """A checkpoint written before `ppo_epochs` existed ran one update per rollout: it resumes with the
    default, and a run asking for more is refused by name."""
    data = _train_split(sft_pair)
    config = dataclasses.replace(RL, steps=2, eval_vectors=0)
    rl.train_rl(*_load(sft_pair), data.vectors, data.vectors[:0], config, out_dir=tmp_path / "run", progress=False)
    state_path = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["ppo_epochs"]
    state_path.write_text(json.dumps(state))
    resumed = rl.train_rl(*_load(sft_pair), data.vectors, data.vectors[:0], dataclasses.replace(config, steps=3),
                          out_dir=tmp_path / "run", resume="latest", progress=False)
    assert len(resumed.history) == 3
    with pytest.raises(nl.ConfigError, match="ppo_epochs: 1 in the checkpoint, 2 now"):
        rl.train_rl(*_load(sft_pair), data.vectors, data.vectors[:0], dataclasses.replace(config, steps=4,
                    ppo_epochs=2), out_dir=tmp_path / "run", resume="latest", progress=False)


@NEEDS_TL3
def test_kl_needs_a_reference(sft_pair):
    av, ar, _ = _load(sft_pair)
    with pytest.raises(nl.ConfigError, match="kl_coef"):
        rl.train_rl(av, ar, None, _train_vectors(sft_pair), torch.empty(0, 64), RL, progress=False)


@NEEDS_TL3
def test_a_pair_loaded_in_float16_is_refused_before_sampling(sft_pair):
    """Adam's eps rounds to 0 in float16, so the first update turned the AV NaN and the next rollout stopped on
    torch's multinomial error ("probability tensor contains either inf, nan or element < 0")."""
    with pytest.raises(nl.ConfigError, match="the weights to train: float16 weights cannot train here"):
        rl.train_rl(*_load(sft_pair, torch.float16), _train_vectors(sft_pair), torch.empty(0, 64),
                    dataclasses.replace(RL, steps=2), progress=False)


@NEEDS_TL3
def test_ar_update_trains_on_the_bos_first_prompts_reconstruct_serves(bos_paths):
    """The rewards come from `reconstruct`, which puts BOS first on Llama: the AR update must too."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"], backend="hooked")
    ar = nl.ActivationReconstructor.from_pretrained(bos_paths["llama_ar"], backend="hooked")
    d_model = ar.meta.d_model
    config = RLConfig(prompts_per_step=2, group_size=2, kl_coef=0.0)
    trainer = rl._Trainer(av, ar, None, torch.randn(4, d_model), config, None)
    explanations = ["a cat sat", "the dog"]
    scored = rl.Rollout(torch.randn(2, d_model), [[1], [1]], torch.zeros(2), explanations, explanations,
                        torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.float64), torch.zeros(2),
                        torch.zeros(2))
    trainer._ar_update(scored)
    served = [ar_prompt_ids(ar.meta, ar.tokenizer, e) for e in explanations]
    assert trainer.ar_rows.prompts == served
    assert all(prompt[0] == ar.tokenizer.bos_token_id for prompt in trainer.ar_rows.prompts)


@NEEDS_TL3
def test_samples_longer_than_either_models_context_are_refused_before_training(sft_pair, monkeypatch):
    av, ar, _ = _load(sft_pair)
    prompt, n_ctx = av.prompt_tokens(1).shape[1], av.model.cfg.n_ctx
    config = dataclasses.replace(RL, kl_coef=0.0, max_new_tokens=n_ctx - prompt + 1)
    with pytest.raises(nl.ConfigError, match=f"over the AV's n_ctx={n_ctx}; set max_new_tokens <= {n_ctx - prompt}"):
        rl.train_rl(av, ar, None, _train_vectors(sft_pair), torch.empty(0, 64), config, progress=False)
    ar_prompt = ar.prompt_tokens([""])[0].shape[1]
    monkeypatch.setattr(ar.model.cfg, "n_ctx", ar_prompt + 10)  # an AR that reads shorter texts than the AV writes
    config = dataclasses.replace(RL, kl_coef=0.0, max_new_tokens=11)
    with pytest.raises(nl.ConfigError, match=f"over the AR's n_ctx={ar_prompt + 10}; set max_new_tokens <= 10"):
        rl.train_rl(av, ar, None, _train_vectors(sft_pair), torch.empty(0, 64), config, progress=False)


@NEEDS_TL3
def test_training_vectors_without_a_spread_are_an_input_error(sft_pair):
    """Copies of one vector have a paper baseline of 0: the first step's FVE divided by it (ZeroDivisionError)."""
    av, ar, _ = _load(sft_pair)
    same = _train_vectors(sft_pair)[:1].repeat(4, 1)
    config = dataclasses.replace(RL, steps=1, kl_coef=0.0, eval_vectors=0)
    with pytest.raises(nl.InputError, match="all point one way"):
        rl.train_rl(av, ar, None, same, same, config, progress=False)


@NEEDS_TL3
def test_more_prompts_per_step_than_training_vectors_is_refused_before_the_weights_load(sft_pair, tmp_path,
                                                                                        monkeypatch):
    """It was refused at the first step, after the AV, the AR and the reference had loaded and the first held-out
    round trip had run, in words that did not say what to set."""
    n_train = len(_train_vectors(sft_pair))
    config = RLRunConfig(av=str(sft_pair / "av"), ar=str(sft_pair / "ar"), activations=str(sft_pair / "acts"),
                         explanations=str(sft_pair / "explanations.jsonl"), out_dir=str(tmp_path / "rl"),
                         eval_fraction=0.25, rl=RLConfig(prompts_per_step=n_train + 1, group_size=2))
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    message = (rf"rl.prompts_per_step={n_train + 1} is more than the {n_train} training vectors \(the training side "
               rf"of the split\): set rl.prompts_per_step to {n_train} or fewer, or extract more documents")
    with pytest.raises(nl.ConfigError, match=message):
        run_train_rl(config, progress=False)
    monkeypatch.undo()
    av, ar, _ = _load(sft_pair)
    train = _train_vectors(sft_pair)
    with pytest.raises(nl.ConfigError, match=message):  # from Python: before the first evaluation
        rl.train_rl(av, ar, None, train, train[:8], dataclasses.replace(config.rl, kl_coef=0.0), progress=False)


@NEEDS_TL3
@pytest.mark.parametrize(("eval_vectors", "held_out"), [(1, 8), (8, 1)])
def test_fewer_than_two_held_out_vectors_record_no_evaluation(sft_pair, eval_vectors, held_out):
    """FVE needs a spread: `eval_vectors: 1` (documented "no evaluation"), or a one-vector split, runs none."""
    av, ar, _ = _load(sft_pair)
    train = _train_vectors(sft_pair)
    config = dataclasses.replace(RL, steps=1, kl_coef=0.0, eval_vectors=eval_vectors)
    result = rl.train_rl(av, ar, None, train, train[:held_out], config, progress=False)
    assert result.evals == [] and len(result.history) == 1


@NEEDS_TL3
@pytest.mark.parametrize(("held_out", "said"), [(5, "the held-out round trips score those 5"),
                                                 (1, "the run has no held-out evaluation (FVE needs >= 2 vectors)")])
def test_eval_vectors_beyond_the_held_out_split_warns_once_naming_both_counts_before_the_first_step(
        sft_pair, monkeypatch, held_out, said):
    """`rl.eval_vectors: 8` on a held-out split of 5 scored 5 in silence; the config's comment reads as 8."""
    av, ar, _ = _load(sft_pair)
    train = _train_vectors(sft_pair)
    config = dataclasses.replace(RL, steps=1, kl_coef=0.0, eval_vectors=8)
    scored: list[int] = []  # the vectors of each held-out round trip
    warned_at_first_step: list[int] = []
    evaluate, step = rl.evaluate_rl, rl._Trainer.step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr(rl, "evaluate_rl",
                            lambda av, ar, vectors, *a: scored.append(len(vectors)) or evaluate(av, ar, vectors, *a))
        monkeypatch.setattr(rl._Trainer, "step", lambda self, i: (warned_at_first_step.append(len(caught))
                                                                  or step(self, i)))
        result = rl.train_rl(av, ar, None, train, train[:held_out], config, progress=False)
    mine = [i for i, w in enumerate(caught) if "rl.eval_vectors" in str(w.message)]
    assert [str(caught[i].message) for i in mine] == [
        f"rl.eval_vectors is 8, but the held-out split holds {held_out} vector{'s' * (held_out != 1)}: {said}. "
        f"Raise eval_fraction for more held-out vectors, or set rl.eval_vectors to {held_out} or fewer"]
    assert caught[mine[0]].filename == __file__  # it points at the train_rl call
    assert warned_at_first_step[0] > mine[0]  # warned before the first step
    assert scored == ([5, 5] if held_out == 5 else [])  # the split's 5, at the start and the end
    assert len(result.evals) == len(scored)


@NEEDS_TL3
@pytest.mark.parametrize(("eval_vectors", "held_out"), [(1, 0), (5, 5)], ids=["asks-for-none", "as-many-as-held-out"])
def test_eval_vectors_asking_for_none_or_as_many_as_held_out_do_not_warn(sft_pair, eval_vectors, held_out):
    av, ar, _ = _load(sft_pair)
    train = _train_vectors(sft_pair)
    config = dataclasses.replace(RL, steps=1, kl_coef=0.0, eval_vectors=eval_vectors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rl.train_rl(av, ar, None, train, train[:held_out], config, progress=False)
    assert not [w for w in caught if "rl.eval_vectors" in str(w.message)]


@pytest.fixture(scope="module")
def layer1_extraction(tmp_path_factory, base_folder, extract_config) -> Path:
    """An extraction (and labels) of layer 1, where the tiny NLA pairs read layer 2."""
    from nla_lens.training import extract_activations, label_activations, load_activations, save_explanations

    root = tmp_path_factory.mktemp("layer1")
    tokenizer = loading.load_tokenizer(base_folder)
    base = loading.load_hooked_transformer(base_folder, tokenizer, dtype=torch.float32, device="cpu")
    acts = extract_activations(base, tokenizer, testing.tiny_corpus(8, words_per_doc=10), root / "acts",
                               dataclasses.replace(extract_config, layer=1), base_model="tiny", progress=False)
    save_explanations(label_activations(load_activations(acts), lambda r: "a token"), root / "explanations.jsonl")
    return root


def _layer1_run(root: Path, av: Path, ar: Path) -> RLRunConfig:
    return RLRunConfig(av=str(av), ar=str(ar), activations=str(root / "acts"),
                       explanations=str(root / "explanations.jsonl"), out_dir=str(root / "rl"),
                       eval_fraction=0.25,
                       rl=RLConfig(steps=1, prompts_per_step=2, group_size=2, kl_coef=0.0, eval_vectors=0))


@NEEDS_TL3
def test_train_rl_refuses_activations_of_another_layer_than_the_pair(layer1_extraction, tiny_paths):
    config = _layer1_run(layer1_extraction, tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"])
    with pytest.raises(nl.ConfigError, match="hold layer 1, but the AV .* trained on layer 2"):
        run_train_rl(config, progress=False)
    assert not (layer1_extraction / "rl").exists()  # refused before any training


@NEEDS_TL3
def test_train_rl_refuses_an_av_and_ar_of_different_layers(layer1_extraction, tiny_paths, tmp_path):
    layer1_av = testing.make_tiny_nla(tmp_path, layer=1)["av_karvonen"]
    config = _layer1_run(layer1_extraction, layer1_av, tiny_paths["ar_nanonla"])
    with pytest.raises(nl.PairMismatchError, match="layer"):
        run_train_rl(config, progress=False)


@NEEDS_TL3
def test_train_rl_refuses_an_ar_of_another_family_before_any_weight(layer1_extraction, tiny_paths, bos_paths,
                                                                     monkeypatch):
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    config = _layer1_run(layer1_extraction, tiny_paths["av_karvonen"], bos_paths["gemma_ar"])
    with pytest.raises(nl.PairMismatchError, match="the AV's and the AR's tokenizers have different vocabularies"):
        run_train_rl(config, progress=False)


@NEEDS_TL3
@pytest.mark.parametrize(("av", "ar", "message"), [
    ("av_karvonen", "av_karvonen", "ar: .* is an AV checkpoint, not an AR; point ar at the SFT AR"),  # no role
    ("av_karvonen", "av_embedding", "ar: .* is an AV checkpoint, not an AR; point ar at the SFT AR"),
    ("ar_nanonla", "ar_nanonla", "av: .* is an AR checkpoint, not an AV; point av at the SFT AV"),
])
def test_train_rl_refuses_a_checkpoint_of_the_other_role_before_any_weight(layer1_extraction, tiny_paths,
                                                                          monkeypatch, av, ar, message):
    """An AV given as `ar` was refused by the AR's loader only once the AV's weights (and the reference's) had
    loaded, in words for `from_pretrained` users ("load it with ActivationVerbalizer.from_pretrained")."""
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    config = _layer1_run(layer1_extraction, tiny_paths[av], tiny_paths[ar])
    with pytest.raises(nl.ConfigError, match=message):
        run_train_rl(config, progress=False)


@NEEDS_TL3
def test_train_rl_refuses_an_av_injecting_after_the_blocks_before_any_weight(layer1_extraction, tiny_paths, tmp_path,
                                                                             monkeypatch):
    """An AV whose sidecar injects at the final norm (a point `verbalize` serves) was refused only at the first step's
    teacher-forced forward, once the AV, its reference and the AR had loaded and the first rollout had run."""
    av = tmp_path / "av"
    shutil.copytree(tiny_paths["av_karvonen"], av)
    meta = yaml.safe_load((av / SIDECAR_NAME).read_text())
    meta["injection"] = {"method": "karvonen", "hook_point": "ln_final.hook_normalized"}
    (av / SIDECAR_NAME).write_text(yaml.safe_dump(meta))
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    config = _layer1_run(layer1_extraction, av, tiny_paths["ar_nanonla"])
    with pytest.raises(nl.InjectionError, match="hook point 'ln_final.hook_normalized' is outside the embedding and "
                                                "the blocks"):
        run_train_rl(config, progress=False)


@NEEDS_TL3
def test_train_rl_refuses_an_av_served_after_the_blocks_before_its_first_step(tiny_paths, monkeypatch):
    """The Python API: an AV loaded with a hook point past the blocks trained on its bare prompt until the first
    step's forward refused it; now before any rollout or evaluation."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], hook_point="ln_final.hook_normalized",
                                                 backend="hooked")
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"], backend="hooked")
    monkeypatch.setattr(rl, "rollout", lambda *a, **k: pytest.fail("a rollout ran"))
    monkeypatch.setattr(rl, "evaluate_rl", lambda *a, **k: pytest.fail("an evaluation ran"))
    vectors = torch.randn(8, av.meta.d_model, generator=torch.Generator().manual_seed(0))
    with pytest.raises(nl.InjectionError, match="is outside the embedding and the blocks"):
        rl.train_rl(av, ar, None, vectors, vectors, RLConfig(steps=1, prompts_per_step=2, group_size=2, kl_coef=0.0),
                    progress=False)


@NEEDS_TL3
def test_train_rl_warns_when_its_held_out_split_is_not_the_one_the_ar_was_exported_with(sft_pair, base_folder,
                                                                                       tmp_path, monkeypatch):
    """An RL YAML without the SFT runs' eval_fraction (its default is 0.1) silently trained on SFT's held-out
    vectors and reported a held-out FVE on vectors SFT had trained on."""
    from nla_lens.training import export_ar, label_activations, load_activations, pipeline, split_by_document

    data = label_activations(load_activations(sft_pair / "acts"), sft_pair / "explanations.jsonl")
    ar = nl.ActivationReconstructor.from_pretrained(sft_pair / "ar", backend="hooked")
    export_ar(ar, tmp_path / "ar", base_folder, heldout=split_by_document(data, 0.5, 0)[1].vectors)  # >= 32

    class Trained(Exception):
        pass

    def refuse_training(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(pipeline, "_train_and_export_rl", refuse_training)
    for fraction, warns in ((0.5, False), (0.25, True)):
        config = RLRunConfig(av=str(sft_pair / "av"), ar=str(tmp_path / "ar"), activations=str(sft_pair / "acts"),
                             explanations=str(sft_pair / "explanations.jsonl"), out_dir=str(tmp_path / "rl"),
                             eval_fraction=fraction)
        with contextlib.ExitStack() as stack:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            stack.enter_context(pytest.raises(Trained))
            run_train_rl(config, progress=False)
        said = [str(w.message) for w in caught if "is not the one the AR" in str(w.message)]
        assert bool(said) == warns, fraction
    assert "RL would train on vectors SFT held out" in said[0] and "eval_fraction and split_seed" in said[0]


@NEEDS_TL3
@pytest.mark.parametrize(("n_eval", "recorded", "logged"), [
    (8, True, "against the baseline 0.7 (sidecar (held-out), n=500)"),
    (8, False, "record no FVE: 8 held-out vectors give no trustworthy baseline"),
    (32, True, "(paper (these vectors), n=32)"),
])
def test_held_out_fve_of_fewer_than_32_vectors_takes_the_ar_sidecars_baseline(sft_pair, caplog, n_eval, recorded,
                                                                              logged):
    """README "Scores": a baseline of fewer than 32 vectors is noise. The held-out FVE divided by 8 vectors'
    own (the examples' eval_vectors: FVE -2.55 where the sidecar's baseline gave -1.53)."""
    av, ar, _ = _load(sft_pair)
    if recorded:
        ar.meta = dataclasses.replace(ar.meta, fve_baseline=0.7, fve_baseline_n=500)
    held_out = _train_vectors(sft_pair)[:n_eval]
    config = dataclasses.replace(RL, steps=1, kl_coef=0.0, eval_vectors=n_eval)
    with caplog.at_level("INFO", logger="nla_lens.training.rl"):
        result = rl.train_rl(av, ar, None, _train_vectors(sft_pair), held_out, config, progress=False)
    assert logged in caplog.text
    expected = {(8, True): 0.7, (8, False): None, (32, True): metrics.paper_baseline(held_out, ar.meta.mse_scale)}
    assert [e["eval_baseline"] for e in result.evals] == [expected[n_eval, recorded]] * 2
    assert all((e["eval_fve"] is None) == (not recorded) for e in result.evals)


# --- the CLI, one process and torchrun ---------------------------------------------------------------

def _rl_yaml(root: Path, name: str, **rl_overrides) -> str:
    config = {"av": str(root / "av"), "ar": str(root / "ar"), "activations": str(root / "acts"),
              "explanations": str(root / "explanations.jsonl"), "eval_fraction": 0.25, "dtype": "float64",
              "out_dir": str(root / name), "rl": {**dataclasses.asdict(RL), "betas": list(RL.betas),
                                                   **rl_overrides}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


@NEEDS_TL3
def test_cli_summary_says_when_a_run_had_no_held_out_evaluation(sft_pair, capsys):
    assert main(["train-rl", _rl_yaml(sft_pair, "rl_eval1", steps=1, save_every=0, eval_vectors=1)]) == 0
    assert "no held-out evaluation" in capsys.readouterr().out


@NEEDS_TL3
def test_two_rank_ddp_rl_gives_the_one_process_weights(sft_pair, capsys):
    """The `sft_coef` term on, its 7 rows split 4 / 3 over the ranks; two AV updates per rollout."""
    assert main(["train-rl", _rl_yaml(sft_pair, "rl_1", sft_coef=0.5, sft_batch=7, ppo_epochs=2)]) == 0
    assert "held-out FVE" in capsys.readouterr().out
    torchrun_cli("train-rl", _rl_yaml(sft_pair, "rl_2", sft_coef=0.5, sft_batch=7, ppo_epochs=2))
    one, two = (load_file(sft_pair / name / "checkpoints" / "step-000004" / "params.safetensors")
                for name in ("rl_1", "rl_2"))
    assert one.keys() == two.keys() and next(iter(one.values())).dtype == torch.float64
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-9
    histories = [json.loads((sft_pair / name / "train_result.json").read_text())["history"]
                 for name in ("rl_1", "rl_2")]
    for key in ("reward", "kl", "length", "ar_mse", "loss", "sft_loss"):
        assert [h[key] for h in histories[0]] == pytest.approx([h[key] for h in histories[1]], abs=1e-9), key
    assert json.loads((sft_pair / "rl_2" / "train_result.json").read_text())["world_size"] == 2
    # The exported pair loads with no flags and says it is the RL stage.
    av = nl.ActivationVerbalizer.from_pretrained(sft_pair / "rl_2" / "av")
    ar = nl.ActivationReconstructor.from_pretrained(sft_pair / "rl_2" / "ar")
    assert av.meta.raw["stage"] == ar.meta.raw["stage"] == "rl" and ar.meta.layer == LAYER


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@NEEDS_TL3
def test_an_rl_export_cut_short_at_the_ar_leaves_the_earlier_pair_whole(tiny_paths, label_split, tmp_path,
                                                                       monkeypatch):
    """train-rl exported its AV, then its AR, each in place: a run cut short between them (a finished run extended
    by raising rl.steps) left the new AV beside the old AR, a pair that loads and was never trained together."""
    from nla_lens.training import TrainResult, export, pipeline

    runs = []

    def grpo_moves_the_weights(av, ar, *args, **kwargs):  # each run from the SFT pair to other weights
        runs.append(len(runs) + 1)
        with torch.no_grad():
            for model in (av.model, ar.model):
                next(model.parameters()).add_(float(runs[-1]))
        return TrainResult(steps=runs[-1])

    monkeypatch.setattr(pipeline, "train_rl", grpo_moves_the_weights)
    config = RLRunConfig(av=str(tiny_paths["av_karvonen"]), ar=str(tiny_paths["ar_nanonla"]), activations="acts",
                         explanations="explanations.jsonl", out_dir=str(tmp_path), rl=RLConfig(steps=1, kl_coef=0.0))
    train, evaluation = label_split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the AR's sidecar records no baseline from 12 held-out vectors
        pipeline._train_and_export_rl(config, train, evaluation, torch.device("cpu"), progress=False)
        before = {role: _files(tmp_path / role) for role in ("av", "ar")}
        save = export.save_tensors

        def disk_full_at_the_value_head(tensors, path, *args, **kwargs):
            if path.name == loading.VALUE_HEAD_FILE:
                raise OSError(28, "No space left on device")
            save(tensors, path, *args, **kwargs)

        monkeypatch.setattr(export, "save_tensors", disk_full_at_the_value_head)
        with pytest.raises(OSError, match="No space left on device"):
            pipeline._train_and_export_rl(config, train, evaluation, torch.device("cpu"), progress=False)
    assert {role: _files(tmp_path / role) for role in ("av", "ar")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar", "av"]  # no temporary folder left behind


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}


def _naming_base(folder: Path, base_model: str) -> Path:
    """`folder`, its sidecar naming `base_model` as its base."""
    sidecar = nl.load_meta(folder).raw
    dump_meta({**sidecar, "extraction": {**sidecar["extraction"], "base_model": base_model}}, folder)
    return folder


@NEEDS_TL3
def test_an_rl_export_of_a_pair_exported_with_a_stray_bos_carries_its_bases_tokenizer_files(
        base_folder, dataset_meta, label_split, tmp_path, monkeypatch):
    """train-rl copied its SFT pair's tokenizer files: a pair exported before the export copied its base's files passed
    on the EOS it recorded as its BOS, which TransformerLens, reading the RL folder, put first in every text. The files
    now come from the base the pair's sidecars name, byte for byte."""
    from nla_lens.training import TrainResult, export_pair, init_ar, init_av, pipeline

    sft = export_pair(init_av(base_folder, dataset_meta), init_ar(base_folder, dataset_meta),
                      (tmp_path / "sft_av", tmp_path / "sft_ar"), (base_folder, base_folder))
    for folder in sft:
        as_exported_with_a_stray_bos(_naming_base(folder, str(base_folder)))
    monkeypatch.setattr(pipeline, "train_rl", lambda av, ar, *args, **kwargs: TrainResult(steps=1))
    config = RLRunConfig(av=str(sft[0]), ar=str(sft[1]), activations="acts", explanations="explanations.jsonl",
                         out_dir=str(tmp_path / "rl"), rl=RLConfig(steps=1, kl_coef=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the AR's sidecar records no baseline from 12 held-out vectors
        pipeline._train_and_export_rl(config, *label_split, torch.device("cpu"), progress=False)
    text = "the cat sat"
    as_transformer_lens_reads = AutoTokenizer.from_pretrained(base_folder, add_bos_token=True).encode(text)
    for role in ("av", "ar"):
        folder = tmp_path / "rl" / role
        assert _tokenizer_files(folder) == _tokenizer_files(base_folder) != {}
        assert AutoTokenizer.from_pretrained(folder, add_bos_token=True).encode(text) == as_transformer_lens_reads


@NEEDS_TL3
@pytest.mark.parametrize("base", ["not-here", "of-another-tokenizer"])
def test_train_rl_refuses_a_pair_with_a_stray_bos_and_no_base_to_copy_from_before_any_weight(layer1_extraction,
                                                                                             tmp_path, monkeypatch,
                                                                                             base):
    """An SFT pair exported before the export copied its base's files records its EOS as a BOS. With no base on this
    machine to copy from, or one whose tokenizer is not the pair's, the RL export can only pass the pair's files on,
    stray BOS and all: refused before any weight loads, naming both tokenizers and what to do."""
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    pair = testing.make_tiny_nla(tmp_path, layer=1)
    av, ar = pair["av_karvonen"], pair["ar_nanonla"]
    named = tmp_path / "gone"
    if base == "of-another-tokenizer":
        named = Path(shutil.copytree(av, tmp_path / "base"))
        (named / "nla_meta.yaml").unlink()  # a base model's folder
        template = named / "chat_template.jinja"
        template.write_text(template.read_text(encoding="utf-8").replace("<|im_start|>{% endif %}",
                                                                         "<|im_start|>\n{% endif %}"), encoding="utf-8")
    for folder in (av, ar):
        as_exported_with_a_stray_bos(_naming_base(folder, str(named)))
    config = dataclasses.replace(_layer1_run(layer1_extraction, av, ar), out_dir=str(tmp_path / "rl"))
    expected = (f"the tokenizer files of {av}, read as TransformerLens reads a folder (add_bos_token=True), tokenize "
                f"the AV template's text otherwise than the tokenizer training used ({av}): from token 0, "
                "['<|im_end|>', ")
    fix = (f"{av} is an NLA checkpoint, and the base model its sidecar names ({named}) is not on this machine, or "
           "tokenizes otherwise too, so there are no base's files to copy")
    with pytest.raises(nl.TokenizerDriftError, match=rf"^{re.escape(expected)}.* where training had \['.*"
                                                     + re.escape(fix)):
        run_train_rl(config, progress=False)
    assert not (tmp_path / "rl").exists()


@NEEDS_TL3
def test_train_rl_warns_when_the_activations_are_of_another_base_model_than_the_avs(layer1_extraction, tmp_path,
                                                                                    monkeypatch):
    """SFT warns of activations extracted from another base than it trains; RL compared layers and widths only, so a
    pair trained on one model took another's activations of the same shape without a word."""
    from nla_lens.training import pipeline

    class Trained(Exception):
        pass

    def refuse_training(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(pipeline, "_train_and_export_rl", refuse_training)
    pair = testing.make_tiny_nla(tmp_path, layer=1)  # its sidecars name base tiny-qwen3; the extraction, tiny
    config = dataclasses.replace(_layer1_run(layer1_extraction, pair["av_karvonen"], pair["ar_nanonla"]),
                                 out_dir=str(tmp_path / "rl"))
    said = []
    for recorded in ("tiny-qwen3", "tiny"):
        sidecar = yaml.safe_load((pair["av_karvonen"] / "nla_meta.yaml").read_text())
        sidecar["extraction"]["base_model"] = recorded
        (pair["av_karvonen"] / "nla_meta.yaml").write_text(yaml.safe_dump(sidecar))
        with contextlib.ExitStack() as stack:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            stack.enter_context(pytest.raises(Trained))
            run_train_rl(config, progress=False)
        said.append([str(w.message) for w in caught if "extracted from base model" in str(w.message)])
    assert said[1] == []
    assert said[0] == [f"the activations {layer1_extraction / 'acts'} were extracted from base model tiny, but the AV "
                       f"{pair['av_karvonen']} was trained on tiny-qwen3's: RL would train the pair on another model's "
                       "activations. Point activations at the extraction the SFT pair was trained on, or ignore this "
                       "if the two names are one model"]


@NEEDS_TL3
def test_an_rl_export_removes_the_earlier_runs_record_just_before_its_swap(tiny_paths, label_split, tmp_path,
                                                                           monkeypatch):
    """train_result.json is written after the export: a crash after the new pair was swapped in and before the record
    was rewritten (a finished run extended by raising rl.steps) left the earlier run's record beside the new pair, read
    back as its record. The record goes just before the swap; an export cut short before it leaves both whole."""
    from nla_lens.distributed import World
    from nla_lens.training import TrainResult, export, pipeline

    monkeypatch.setattr(pipeline, "train_rl", lambda av, ar, *args, **kwargs: TrainResult(steps=1))
    config = RLRunConfig(av=str(tiny_paths["av_karvonen"]), ar=str(tiny_paths["ar_nanonla"]), activations="acts",
                         explanations="explanations.jsonl", out_dir=str(tmp_path), rl=RLConfig(steps=1, kl_coef=0.0))
    train, evaluation = label_split
    record = tmp_path / pipeline.RESULT_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the AR's sidecar records no baseline from 12 held-out vectors
        result, _, _ = pipeline._train_and_export_rl(config, train, evaluation, torch.device("cpu"), progress=False)
        pipeline._save_result(config, tmp_path / "av", result, World())
        earlier = record.read_bytes()
        with monkeypatch.context() as patched:
            save = export.save_tensors

            def disk_full_at_the_value_head(tensors, path, *args, **kwargs):
                if path.name == loading.VALUE_HEAD_FILE:
                    raise OSError(28, "No space left on device")
                save(tensors, path, *args, **kwargs)

            patched.setattr(export, "save_tensors", disk_full_at_the_value_head)
            with pytest.raises(OSError, match="No space left on device"):
                pipeline._train_and_export_rl(config, train, evaluation, torch.device("cpu"), progress=False)
        assert record.read_bytes() == earlier
        # The new pair swapped in, and the process stopping here, before _save_result: no record beside it.
        pipeline._train_and_export_rl(config, train, evaluation, torch.device("cpu"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar", "av"]


@NEEDS_TL3
def test_the_rl_progress_bar_writes_a_huge_reward_and_a_tiny_kl_in_e_notation(tiny_paths, monkeypatch):
    """The bar's postfix wrote reward and KL to 3 decimals: a reward of -1e30 with all its digits, a KL of 2e-6 as
    0.000."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], backend="hooked")
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"], backend="hooked")
    postfixes = record_postfixes(monkeypatch, rl)
    records = iter([{"reward": -1e30, "kl": 2e-6}, {"reward": -0.25, "kl": 0.0123}])
    monkeypatch.setattr(rl._Trainer, "step", lambda self, step: next(records))
    vectors = torch.randn(4, ar.meta.d_model, generator=torch.Generator().manual_seed(0))
    rl.train_rl(av, ar, None, vectors, vectors[:0], dataclasses.replace(RL, steps=2, kl_coef=0.0, eval_vectors=0))
    assert postfixes == [{"reward": "-1.00e+30", "kl": "2.00e-06"}, {"reward": "-0.250", "kl": "0.012"}]
