# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Steer with words
#
# The paper's poetry and reward case studies run the NLA backwards: read the AV's explanation of
# one token, edit the text ("rabbit" -> "mouse"), and steer the base model with the difference of
# the AR's reconstructions, `Delta = unit(AR(edited)) - unit(AR(original))`, added at layer K as
# `h + alpha * ||h|| * Delta / ||Delta||`. `nl.steer_with_words` does it in one call and hands the
# steering back as an ordinary TransformerLens hook.
#
# This runs on the bundled toy NLA (a small Shakespeare LM whose explanations read
# `The token "X", after "Y", predicting "Z".`), so it takes seconds on a CPU; the real Qwen3-8B
# cell below is skipped unless `NLA_REAL_CHECKPOINTS=1`.

# %%
import os

import torch

import nla_lens as nl

# %% [markdown]
# ## The toy NLA and its base model

# %%
toy = nl.toy.load()
nla, base = toy.nla, toy.base
PROMPT = "King: Come hither, my good lord, and tell"
NEW_WORD = " the"  # the toy edit: make the explanation predict this token instead


def edit(explanation: str) -> str:
    """Rewrite what the explanation says the model predicts next."""
    head, found, _ = explanation.rpartition("predicting ")
    return f'{head}{found}"{NEW_WORD}".' if found else explanation


MAX_NEW_TOKENS, CONTINUE_TOKENS = 48, 6
ALPHA = 1.0
REAL = False

# %% [markdown]
# ## Real checkpoints: a Qwen3-8B NLA (layer 24)
# Needs a GPU, `Qwen/Qwen3-8B` in the local HF cache and the AV and AR checkpoint folders:
# `NLA_REAL_CHECKPOINTS=1 NLA_AV=/path/to/av NLA_AR=/path/to/ar`. The nanoNLA Qwen3-8B release is an AV
# only: pair it with an AR you trained (`nla-lens train-ar`). The edit is the paper's
# "Planning in Poetry" one: at the end of the first line, swap the planned rhyme. The new rhyme is due
# at the end of the second line, not at the next token, so read it in the steered continuation (the
# next-token numbers below are about the toy's edit). Your AV may not write "rabbit": an edit that changes
# none of a site's samples leaves Delta = 0, which `steer_with_words` refuses (`nl.InputError`, quoting the
# explanation), so edit a word it does write.

# %%
if os.environ.get("NLA_REAL_CHECKPOINTS"):
    nla = nl.NLA.from_pretrained(os.environ["NLA_AV"], os.environ["NLA_AR"], device="cuda", dtype=torch.bfloat16)
    base = nl.load_base(nla, device="cuda", dtype=torch.bfloat16)
    PROMPT = "A rhyming couplet:\nHe saw a carrot and had to grab it,\n"
    NEW_WORD = " mouse"

    def edit(explanation: str) -> str:
        return explanation.replace("rabbit", "mouse")

    MAX_NEW_TOKENS, CONTINUE_TOKENS = 150, 16
    REAL = True

# %% [markdown]
# ## One call: verbalize, edit, reconstruct, steer
# `positions=-1` is the last token of the prompt. With `samples=3` the AV samples three explanations
# and Delta is their mean (the paper used 5). The result holds the explanations before and after
# the edit, Delta, next-token distributions without and with the hook, and greedy continuations.

# %%
tokens = base.to_tokens(PROMPT)  # BOS first where the tokenizer has one, as in training
result = nl.steer_with_words(nla, base, tokens, positions=-1, edit=edit, alpha=ALPHA, samples=3,
                             max_new_tokens=MAX_NEW_TOKENS, continue_tokens=CONTINUE_TOKENS)
print(result)
for before, after in zip(result.explanations[0], result.edited[0], strict=True):
    print(f"  {before!r}\n    -> {after!r}")
print(result.next_tokens(k=5)[0])
print("continuations (clean, steered):", result.continuations[0])

# %% [markdown]
# ## The steering is one more TransformerLens hook
# It composes with your own hooks in one `run_with_hooks`, and stays installed around `generate`
# (KV-cached decode steps are left alone; the prompt was steered at prefill). `fwd_hooks(alpha=...)`
# sweeps the strength without recomputing Delta.

# %%
target = base.tokenizer.encode(NEW_WORD, add_special_tokens=False)[0]
for alpha in (0.25, 0.5, 1.0, 2.0):
    logits = base.run_with_hooks(tokens, fwd_hooks=result.fwd_hooks(alpha=alpha))
    print(f"alpha {alpha:<4}: p({NEW_WORD!r}) = {logits[0, -1].softmax(-1)[target]:.3f}")
with base.hooks(fwd_hooks=result.fwd_hooks()):
    generated = base.generate(tokens, max_new_tokens=CONTINUE_TOKENS, do_sample=False, verbose=False)
print(repr(base.tokenizer.decode(generated[0, tokens.shape[1]:].tolist())))

# %% [markdown]
# ## What changed, in words: `describe_difference`
# Capture layer K with and without the steering and let the AV read the difference (Neuronpedia's
# "compare"); it works the same for a patched vs a clean run, or two steering vectors. On the toy the
# difference does not read as `" the"`: its AV was trained only on residuals of the base, and a difference
# of two residuals is not one (as with the steering vector of tutorial 02); the next-token numbers above
# are the evidence here.

# %%
K = result.layer
with nl.capture(base, K, positions=-1) as clean:
    base(tokens)
with nl.capture(base, K, positions=-1) as steered:
    base.run_with_hooks(tokens, fwd_hooks=result.fwd_hooks())
difference = nl.describe_difference(nla, steered.vectors, clean.vectors, max_new_tokens=MAX_NEW_TOKENS)
print(difference.explanations)

# %% [markdown]
# ## The measured version on held-out text
# `nla_lens.toy.steer_words_experiment` repeats this at many held-out positions, with the edit
# Z -> Z' of the predicted token and a random direction of the same norm as the control; the oracle
# column pushes along a direction read off the base model itself, what a push at one site can do
# (docs/guide/steer-words.md, "Measured on the bundled toy"; `python -m nla_lens.toy.steer_words_experiment`).
# A small run, Z' drawn uniformly as in that page's second table, at 40 sites instead of its 100 (one site is 2.5%):

# %%
if not REAL:
    from nla_lens.toy.steer_words_experiment import run_experiment

    measured = run_experiment(n_sites=40)
    print(measured.to_markdown())

# %% [markdown]
# ## Check
# The hook left the model when each run ended. On the toy, the new word also became the base model's
# most likely next token at the steered position, the edited explanations name it, and the difference the
# AV reads does not.

# %%
assert all(not hp.fwd_hooks for hp in base.hook_dict.values())
assert len(difference.verbalizations) == 1
if not REAL:
    assert int(result.steered_logprobs[0].argmax()) == target != int(result.clean_logprobs[0].argmax())
    assert all(NEW_WORD.strip() in text for text in result.edited[0])
    assert f'"{NEW_WORD}"' not in difference.explanations[0]  # the difference does not read as the new word
print("ok")
