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
# layer K. `nl.steer_then_verbalize` runs the prompt twice (plain TL hooks, no steering vs steering),
# captures layer K in both runs and verbalizes both in one batch; `nl.verbalize_direction` asks the
# AV about the steering vector itself.
#
# This runs on a tiny random NLA built on the fly, so its "explanations" are noise; the real
# Qwen3-8B cell below is skipped unless `NLA_REAL_CHECKPOINTS=1`.

# %%
import os
import tempfile

import torch
from transformer_lens.utilities import get_attention_mask

import nla_lens as nl
from nla_lens import backends, loading
from nla_lens.testing import make_tiny_nla

# %% [markdown]
# ## Tiny checkpoints
# The tiny AV is a full copy of the tiny base model, so its folder doubles as the base model.

# %%
workdir = tempfile.TemporaryDirectory(prefix="nla_lens_tutorial_")
paths = make_tiny_nla(workdir.name)
av = nl.ActivationVerbalizer.from_pretrained(paths["av_karvonen"])
ar = nl.ActivationReconstructor.from_pretrained(paths["ar_nanonla"])
nla = nl.NLA(av, ar)
base = backends.load_model(paths["av_karvonen"], loading.load_tokenizer(paths["av_karvonen"]),
                           dtype=torch.float32, device="cpu")
MAX_NEW_TOKENS = 12
BASELINE = None  # the paper baseline of the vectors scored; fine for a demo
STEER_LAYER = 1
SCALE = 4.0

# %% [markdown]
# ## Real checkpoints: the released Qwen3-8B NLA (layer 24)
# Needs a GPU, `Qwen/Qwen3-8B` in the local HF cache and the AV and AR checkpoint folders:
# `NLA_REAL_CHECKPOINTS=1 NLA_AV=/path/to/av NLA_AR=/path/to/ar`. Use a base model without weight
# processing (`backends.load_model`, TL 3.x's `from_pretrained_no_processing`, or a 4.x
# `TransformerBridge` without `enable_compatibility_mode()`).

# %%
if os.environ.get("NLA_REAL_CHECKPOINTS"):
    av = nl.ActivationVerbalizer.from_pretrained(os.environ["NLA_AV"], device="cuda", dtype=torch.bfloat16)
    ar = nl.ActivationReconstructor.from_pretrained(os.environ["NLA_AR"], device="cuda", dtype=torch.bfloat16)
    nla = nl.NLA(av, ar)
    base_folder = loading.resolve_checkpoint("Qwen/Qwen3-8B")
    base = backends.load_model(base_folder, loading.load_tokenizer(base_folder), dtype=torch.bfloat16, device="cuda")
    MAX_NEW_TOKENS = 150
    BASELINE = 0.56  # held-out paper baseline of the released L24 pair
    STEER_LAYER = 12

# %% [markdown]
# ## A contrastive steering vector
# The difference of the last-token residuals of two prompts at the steering layer, captured with
# `nl.capture`. Any `[d_model]` vector works: an SAE decoder row, a probe weight, a random direction.

# %%
K = nla.av.meta.layer
pair = base.to_tokens(["The cat sat on the mat.", "The dog sat on the mat."])
pair_mask = get_attention_mask(base.tokenizer, pair, prepend_bos=False)
with nl.capture(base, STEER_LAYER, positions=-1, tokens=pair, attention_mask=pair_mask) as contrast:
    base(pair, attention_mask=pair_mask, stop_at_layer=STEER_LAYER + 1)
steering_vector = contrast.vectors[0] - contrast.vectors[1]
print(f"steering vector norm {steering_vector.norm():.2f}")

# %% [markdown]
# ## What does the AV say about the direction itself?
# Only the direction reaches the AV (both injection methods normalise it), so the norm does not
# matter; `scale_like` just rescales the returned vector to the norm of real layer-K activations.

# %%
prompts = ["A dog ran in the park", "Words about the weather and the sea.", "the sea"]
tokens = base.to_tokens(prompts)  # left-padded; run with the mask (the bridge attends to pads without it)
mask = get_attention_mask(base.tokenizer, tokens, prepend_bos=False)
with nl.capture(base, K, positions=-1, tokens=tokens, attention_mask=mask) as reference:
    base(tokens, attention_mask=mask, stop_at_layer=K + 1)
direction = nl.verbalize_direction(nla.av, steering_vector, scale_like=reference.vectors,
                                   max_new_tokens=MAX_NEW_TOKENS, progress=False)
print(f"rescaled norm {direction.vectors.norm():.2f}: {direction.verbalizations[0].text!r}")

# %% [markdown]
# ## Steer at layer S, read out at layer K
# `positions=-1` captures the last real token of each (left-padded) prompt; the steering hook adds
# `SCALE * steering_vector` at every position of `blocks.S.hook_resid_post`.

# %%
result = nl.steer_then_verbalize(base, nla, tokens, steering_vector=steering_vector, scale=SCALE,
                                 steer_layer=STEER_LAYER, attention_mask=mask, baseline=BASELINE,
                                 max_new_tokens=MAX_NEW_TOKENS, progress=False)
for row in result.rows:
    print(f"row {row.batch} {row.token!r}: cos(clean, steered)={row.cosine:.3f} "
          f"FVE {row.fve_clean:.2f} -> {row.fve_steered:.2f}")
    print(f"   clean:   {row.clean.text!r}\n   steered: {row.steered.text!r}")
    print(f"   +{row.added}\n   -{row.removed}")

# %% [markdown]
# ## Check: steering at layer K itself moves the captured vector by exactly `scale * vector`
# The capture sees the residual after every hook at `blocks.K.hook_resid_post`, the user's
# included. The tolerance is the rounding of one addition in the model's dtype.

# %%
at_k = nl.steer_then_verbalize(base, nla, tokens, steering_vector=steering_vector, scale=SCALE, steer_layer=K,
                               attention_mask=mask, baseline=BASELINE, max_new_tokens=MAX_NEW_TOKENS, progress=False)
moved = at_k.steered_vectors - at_k.clean_vectors
expected = SCALE * steering_vector.float()
tolerance = 2 * torch.finfo(base.cfg.dtype).eps * float(at_k.steered_vectors.abs().max())
assert float((moved - expected).abs().max()) <= tolerance
assert not torch.equal(result.steered_vectors, result.clean_vectors)  # steering at S < K reached layer K
assert torch.allclose(direction.vectors.norm(), reference.vectors.norm(dim=-1).mean(), rtol=1e-5)
print("ok")
