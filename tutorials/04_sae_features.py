# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # SAE features through the NLA
#
# An SAE trained on the NLA's layer-K residual (`blocks.K.hook_resid_post`) writes each feature
# along a decoder row `sae.W_dec[f]`. `nl.verbalize_sae_features` hands those rows to the AV, and
# `nl.feature_card` puts the explanation next to the contexts where the feature actually fires,
# which is how you check it. Needs the `sae` extra (sae-lens 6.x, TransformerLens 3.x).
#
# This runs on the bundled toy NLA (a small Shakespeare LM whose explanations name the token at
# the position, `The token "T", ...`) with an SAE trained here by sae-lens's own runner in a few
# seconds; the real cell below is skipped unless `NLA_REAL_CHECKPOINTS=1`.

# %%
import os

import torch

import nla_lens as nl
from nla_lens.sae import skipped, text_residuals
from nla_lens.toy.sae_experiment import SAEExperimentConfig, token_rows, train_toy_sae

toy = nl.toy.load()
base, nla = toy.base, toy.nla
K = nla.av.meta.layer
texts = [" ".join(line.split()) for line in [
    "Macbeth: So foul and fair a day I have not seen. Is this a dagger which I see before me?",
    "Miranda: O brave new world, that has such people in't! How beauteous mankind is!",
    "Prospero: We are such stuff as dreams are made on, and our little life is rounded with a sleep.",
    "Lady Macbeth: Out, damned spot! out, I say! What, will these hands ne'er be clean?",
]]
SKIP_FIRST = 8  # the toy AV was trained on positions past 8 tokens of context
MAX_NEW_TOKENS = 48
# A short sae-lens run (offline, in-memory dataset of the bundled held-out speeches, seeded, no wandb): 29 steps
# of 1,024 tokens. sae-lens's "Training SAE" bar moves once per 100 steps, so it stays at 0% here; the run is done.
sae = train_toy_sae(toy, token_rows(toy, nl.toy.TOY_DIR, 128), SAEExperimentConfig(training_tokens=30_000))

# %% [markdown]
# ## Real checkpoints
# Your own SAE of the layer the NLA reads, e.g. layer 24 of Qwen3-8B for the released nanoNLA AV, paired
# with an AR you trained (the release is an AV only):
# `NLA_REAL_CHECKPOINTS=1 NLA_AV=/path/to/av NLA_AR=/path/to/ar NLA_SAE=/path/to/sae_folder`.

# %%
if os.environ.get("NLA_REAL_CHECKPOINTS"):
    from sae_lens import SAE

    nla = nl.NLA.from_pretrained(os.environ["NLA_AV"], os.environ["NLA_AR"], device="cuda", dtype=torch.bfloat16)
    base = nl.load_base(nla, device="cuda", dtype=torch.bfloat16)
    K = nla.av.meta.layer
    sae = SAE.load_from_disk(os.environ["NLA_SAE"], device="cuda")
    # None: leave out the BOS where the tokenizer puts one first (Gemma, Llama), nothing on Qwen, as explain does
    SKIP_FIRST, MAX_NEW_TOKENS = None, 150

# %% [markdown]
# ## Which features fire in these texts?
# `sae.encode` of the layer-K residual at every position past `skipped(...)`, the rule the scans of
# `nl.feature_card` and `nl.residual_stats` use: the first `SKIP_FIRST` positions, or with `None` the BOS
# where the tokenizer puts one first. Strongest features first, one per token they peak on, so that the
# six below are about different tokens.

# %%
kept = []  # (token ids, residuals) of each text past its skipped positions
for ids, resid in text_residuals(base, texts, K):
    skip = skipped(base.tokenizer, ids, SKIP_FIRST)
    kept.append((ids[skip:], resid[skip:]))
residuals = torch.cat([resid for _, resid in kept])
token_ids = [t for ids, _ in kept for t in ids]
with torch.inference_mode():
    acts = sae.encode(residuals.to(sae.W_dec.device, sae.W_dec.dtype)).cpu()
peak, where = acts.max(dim=0)
features, seen = [], set()
for f in peak.argsort(descending=True).tolist():
    if token_ids[where[f]] not in seen and len(features) < 6:
        features.append(f)
        seen.add(token_ids[where[f]])
print({f: base.tokenizer.decode([token_ids[where[f]]]) for f in features})

# %% [markdown]
# ## Verbalize their decoder rows
# With an NLA the AR rebuilds each explanation into a vector: `cosines` compares it with the decoder
# row. `offset=nl.residual_stats(...)` verbalizes `mean + spread * row / ||row||` instead (decoder rows
# lack the mean that real residuals carry); on the toy the bare rows read better (docs/guide/sae.md,
# "Measured on the bundled toy").

# %%
bare = nl.verbalize_sae_features(nla, sae, features, max_new_tokens=MAX_NEW_TOKENS, progress=False)
stats = nl.residual_stats(base, texts, K, skip_first=SKIP_FIRST)
shifted = nl.verbalize_sae_features(nla, sae, features, offset=stats, max_new_tokens=MAX_NEW_TOKENS, progress=False)
print(bare)
for f, e, e_offset, cos in zip(features, bare.explanations, shifted.explanations, bare.cosines.tolist(), strict=True):
    print(f"{f:>4}  cos {cos:+.2f}  {e}\n      offset: {e_offset}")
bare  # noqa: B018 - the notebook shows it as a table

# %% [markdown]
# ## A feature card: the evidence next to the explanation
# In a notebook the card shows as HTML (the strongest token of each context outlined);
# `card.save("card.html")` writes a self-contained page. `explain_contexts=True` also asks the AV
# about the real residual at each context's peak: over the toy's single-token features, the explanation
# at a feature's strongest context names its token 96% of the time, the decoder row's 59% (docs/guide/sae.md,
# "Measured on the bundled toy"). `top_tokens()` counts the contexts' tokens: a feature may fire on more
# tokens than its explanation names.

# %%
card = nl.feature_card(sae, base, texts, features[0], nla, k=8, skip_first=SKIP_FIRST, explain_contexts=True,
                       max_new_tokens=MAX_NEW_TOKENS, progress=False)
print(card)
print("top tokens:", card.top_tokens())
for context in card.contexts[:3]:
    print(f"{context.activation:6.2f} {context.token!r:<10} the AV there: {context.explanation}")
card  # noqa: B018 - the notebook shows it as HTML

# %% [markdown]
# ## `nl.capture` on a `HookedSAETransformer`
# `nl.hooked_sae_transformer(base)` is the same model (shared weights) as sae-lens's class, so SAEs can be
# attached. The capture records what block K passes on: with the SAE attached at layer K, its
# reconstruction; with `use_error_term=True`, the original residual.

# %%
sae_model = nl.hooked_sae_transformer(base)
tokens = sae_model.to_tokens(texts[0])
sae_model.add_sae(sae)
try:
    with nl.capture(sae_model, K, positions=-1) as cap:
        sae_model(tokens, stop_at_layer=K + 1)
finally:
    sae_model.reset_saes()
with torch.inference_mode():
    original = text_residuals(base, texts[:1], K)[0][1][-1]
    expected = sae(original[None].to(sae.W_dec.dtype))[0].float()

# %% [markdown]
# ## Check
# The card's contexts are the feature's strongest activations, in order; the captured vector is the
# SAE's reconstruction of the residual; and on the toy, explanations name tokens.

# %%
strengths = [c.activation for c in card.contexts]
assert strengths == sorted(strengths, reverse=True)
assert abs(strengths[0] - acts[:, features[0]].max().item()) < 1e-4
tolerance = (1e-5 if base.cfg.dtype == torch.float32 else 1e-2) * float(expected.norm())  # bf16: its rounding
assert float((cap.vectors[0] - expected.to(cap.vectors.device)).abs().max()) <= tolerance
assert len(bare) == len(features) and bare.cosines.shape == (len(features),)
if not os.environ.get("NLA_REAL_CHECKPOINTS"):
    assert all(e is not None and e.startswith("The token ") for e in bare.explanations)
print("ok")
