# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Steer, then verbalize
#
# Add a steering vector to the base model's residual stream, then ask the NLA what changed at
# layer K. `nl.steer_then_verbalize` runs the prompts twice (plain TL hooks: without and with the
# steering), captures layer K in both runs and round-trips both in one batch; `nl.verbalize_direction`
# asks the AV about the steering vector itself.
#
# This runs on the toy NLA bundled with nla_lens (a small Shakespeare LM read at layer 3, whose AV
# names the token it sees, the one before it and the predicted next one). The real-checkpoint cell is
# skipped unless `NLA_REAL_CHECKPOINTS=1`.

# %%
import os

import torch

import nla_lens as nl

# %% [markdown]
# ## The bundled toy NLA

# %%
toy = nl.toy.load()
base, nla = toy.base, toy.nla
MAX_NEW_TOKENS = 48
STEER_LAYER = 1
SCALE = 1.0
TOWARDS, AWAY = "Romeo: I do love", "Romeo: I do hate"
PROMPTS = ["Juliet: I do hate", "Romeo: I hate", "Nurse: I hate"]
REAL = False

# %% [markdown]
# ## Real checkpoints: a released NLA pair
# Needs a GPU, the base model the sidecar names in the local HF cache (e.g. `hf download
# Qwen/Qwen2.5-7B-Instruct` for `kitft/nla-qwen2.5-7b-L20-av` / `-ar`) and the AV and AR folders:
# `NLA_REAL_CHECKPOINTS=1 NLA_AV=/path/to/av NLA_AR=/path/to/ar`. The nanoNLA Qwen3-8B release is an AV
# only: pair it with an AR you trained (`nla-lens train-ar`).

# %%
if os.environ.get("NLA_REAL_CHECKPOINTS"):
    nla = nl.NLA.from_pretrained(os.environ["NLA_AV"], os.environ["NLA_AR"], device="cuda", dtype=torch.bfloat16)
    base = nl.load_base(nla, device="cuda", dtype=torch.bfloat16)
    MAX_NEW_TOKENS, STEER_LAYER, SCALE = 150, 12, 4.0
    TOWARDS, AWAY = "I love this so much", "I hate this so much"
    PROMPTS = ["I hate this so much", "What a terrible day", "The food was awful"]
    REAL = True

# %% [markdown]
# ## A contrastive steering vector
# The difference of the last-token residuals of two prompts at the steering layer, captured with
# `nl.capture` (which reads the tokens and mask from the run). As in tutorial 01, a left-padded batch runs
# with the mask `implicit_attention_mask` derives: TransformerLens 4's bridge does not mask left pads itself.
# Any `[d_model]` vector works: an SAE decoder row, a probe weight, a random direction.

# %%
K = nla.layer
pair = base.to_tokens([TOWARDS, AWAY])
with nl.capture(base, STEER_LAYER, positions=-1) as contrast:
    base(pair, attention_mask=nl.backends.implicit_attention_mask(base, pair), stop_at_layer=STEER_LAYER + 1)
steering_vector = contrast.vectors[0] - contrast.vectors[1]
print(f"steering vector at layer {STEER_LAYER}: norm {steering_vector.norm():.2f}")

# %% [markdown]
# ## What does the AV say about the direction itself?
# Only the direction reaches the AV (both injection methods normalise it: README, "How the vector gets
# in"), so its norm does not matter; `scale_like` rescales the returned vector to the norm of real layer-K
# activations. On the toy the direction reads as an unrelated token (`" st"`): its AV was trained only on
# residuals of the base, and a difference of two residuals need not look like one, so read the steered runs below too.

# %%
tokens = base.to_tokens(PROMPTS)  # left-padded
with nl.capture(base, K, positions=-1) as reference:
    base(tokens, attention_mask=nl.backends.implicit_attention_mask(base, tokens), stop_at_layer=K + 1)
direction = nl.verbalize_direction(nla.av, steering_vector, scale_like=reference.vectors,
                                   max_new_tokens=MAX_NEW_TOKENS)
print(direction)

# %% [markdown]
# ## Steer at layer S, read out at layer K
# The steering hook adds `SCALE * steering_vector` to `blocks.S.hook_resid_post` at the last real
# token (`steer_positions=-1`); `positions=-1` (the default) captures the same token at layer K. Each row
# shows the readout without and with steering, the words gained and lost, and both round-trip FVEs. In a
# notebook the result shows as a table; `to_pandas()` gives the same rows. On the toy the AV misreads
# `" hate"` itself (as `" heard"` or `" then"`), and steering changes all three readouts: the first
# prompt's now reads `" love"`, the other two name other words.

# %%
result = nl.steer_then_verbalize(base, nla, tokens, steering_vector=steering_vector, scale=SCALE,
                                 steer_layer=STEER_LAYER, steer_positions=-1, max_new_tokens=MAX_NEW_TOKENS)
print(result)
print(result.to_pandas()[["token", "clean", "steered", "fve_clean", "fve_steered"]].to_string(index=False))
result  # noqa: B018 - the notebook shows it as a table

# %% [markdown]
# ## Check: steering at layer K itself moves the captured vector by exactly `scale * vector`
# The capture sees the residual after every hook at `blocks.K.hook_resid_post`, the user's
# included. The tolerance is the rounding of one addition in the model's dtype. On the toy, the readouts
# are the ones the prose above names.

# %%
at_k = nl.steer_then_verbalize(base, nla, tokens, steering_vector=steering_vector, scale=SCALE, steer_layer=K,
                               max_new_tokens=MAX_NEW_TOKENS)
moved = at_k.steered_vectors - at_k.clean_vectors
expected = SCALE * steering_vector.float()
tolerance = 2 * torch.finfo(base.cfg.dtype).eps * float(at_k.steered_vectors.abs().max())
assert float((moved - expected).abs().max()) <= tolerance
assert not torch.equal(result.steered_vectors, result.clean_vectors)  # steering at S < K reached layer K
assert torch.allclose(direction.vectors.norm(), reference.vectors.norm(dim=-1).mean(), rtol=1e-5)
for i, prompt in enumerate(PROMPTS):  # the padded batch gave each prompt's own residual, as run alone
    _, alone = base.run_with_cache(base.to_tokens(prompt), names_filter=reference.hook_name)
    own = alone[reference.hook_name][0, -1].float()
    assert (reference.vectors[i] - own).norm() <= (5e-2 if REAL else 1e-3) * own.norm()
assert len(result.to_pandas()) == len(PROMPTS)
if not REAL:  # the toy's AR sidecar records a held-out baseline; the released sidecars do not (pass baseline=)
    assert all(r.fve_clean is not None for r in result.rows)
    # the toy's readouts, as the prose above reads them
    assert direction.explanations[0].startswith('The token " st"')
    assert all(r.token == " hate" and r.clean.explanation.startswith(('The token " heard"', 'The token " then"'))
               and r.steered.explanation != r.clean.explanation for r in result.rows)
    assert result.rows[0].steered.explanation.startswith('The token " love"')
print("ok")
