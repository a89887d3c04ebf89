# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # An activation-patching study, read out in words
#
# Activation patching (as in `transformer_lens.patching`) runs a clean and a corrupted prompt and
# copies one activation from the clean run into the corrupted run. Instead of a logit metric, we
# read the residual at the NLA's layer K out: `nl.patching_study` captures layer K in the clean,
# corrupted and patched runs, verbalizes all three and scores each with the round trip's FVE.
#
# This runs on a tiny random NLA built on the fly, so its "explanations" are noise; the real
# Qwen3-8B cell below is skipped unless `NLA_REAL_CHECKPOINTS=1`.

# %%
import os
import tempfile

import torch

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
CLEAN, CORRUPTED = "The cat sat on the mat.", "The dog sat on the mat."

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
    CLEAN = "When Mary and John went to the store, John gave a drink to"
    CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"

# %% [markdown]
# ## Prompts of one length that differ in one token
# Patching copies column p of the clean run into column p of the corrupted run, so the two prompts
# must tokenize to the same length.

# %%
K = nla.av.meta.layer
clean_tokens, corrupted_tokens = base.to_tokens(CLEAN), base.to_tokens(CORRUPTED)
assert clean_tokens.shape == corrupted_tokens.shape, "pick prompts of equal token length"
(differ,) = (clean_tokens[0] != corrupted_tokens[0]).nonzero().flatten().tolist()
print(f"the prompts differ at column {differ}: "
      f"{base.to_single_str_token(int(clean_tokens[0, differ]))!r} vs "
      f"{base.to_single_str_token(int(corrupted_tokens[0, differ]))!r}")

# %% [markdown]
# ## Sweep the patch over layers 0..K at the differing token, read out the last token at layer K
# `resid_pre` of layer L is the residual entering block L (TL's `get_act_patch_resid_pre`).

# %%
studies = {}
for layer in range(K + 1):
    studies[layer] = nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=layer,
                                       patch_position=differ, baseline=BASELINE,
                                       max_new_tokens=MAX_NEW_TOKENS, progress=False)
print("layer  run        cos(., clean)   FVE   readout")
for layer, study in studies.items():
    for row in study.rows:
        text = row.verbalization.explanation or f"(unparsed) {row.verbalization.text!r}"
        print(f"{layer:5d}  {row.run:9s}  {row.cosine_to_clean:13.3f}  {row.fve:5.2f}  {text[:60]}")

# %% [markdown]
# ## The rows are plain dataclasses
# `pandas.DataFrame(map(dataclasses.asdict, study.rows))` makes a table of them.

# %%
print(studies[0].rows[-1])

# %% [markdown]
# ## Check: two patches whose outcome is known exactly
# * Patching the embedding-level residual (`resid_pre` of layer 0) at the only differing token
#   turns the corrupted run into the clean run: every later value is computed from the same inputs.
# * Patching `resid_post` of layer K at the captured position copies the captured vector itself.

# %%
assert torch.equal(studies[0].patched_vectors, studies[0].clean_vectors)
at_capture = nl.patching_study(base, nla.av, clean_tokens, corrupted_tokens, patch_layer=K, patch_position=-1,
                               activation_name="resid_post", max_new_tokens=MAX_NEW_TOKENS, progress=False)
assert at_capture.hook_name == f"blocks.{K}.hook_resid_post"
assert torch.equal(at_capture.patched_vectors, at_capture.clean_vectors)
assert not torch.equal(at_capture.corrupted_vectors, at_capture.clean_vectors)
print("ok")
