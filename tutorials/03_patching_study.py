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
# The question here: which block's output carries the identity of a token to layer K? On the toy
# NLA bundled with nla_lens (a small Shakespeare LM read at layer 3, whose AV names the token it
# sees), patch one component at the token that differs and ask the AV which token it now reads.
# The real-checkpoint cell is skipped unless `NLA_REAL_CHECKPOINTS=1`.

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
CLEAN, CORRUPTED = "Macbeth: My lord, the king is dead, and I", "Macbeth: My lord, the queen is dead, and I"
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
    MAX_NEW_TOKENS = 150
    CLEAN = "When Mary and John went to the store, John gave a drink to"
    CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
    REAL = True

# %% [markdown]
# ## Prompts of one length that differ in one token
# Patching copies column p of the clean run into column p of the corrupted run, so the two prompts
# must tokenize to the same length.

# %%
K = nla.layer
clean_tokens, corrupted_tokens = base.to_tokens(CLEAN), base.to_tokens(CORRUPTED)
assert clean_tokens.shape == corrupted_tokens.shape, "pick prompts of equal token length"
(differ,) = (clean_tokens[0] != corrupted_tokens[0]).nonzero().flatten().tolist()
print(f"the prompts differ at column {differ}: "
      f"{base.to_single_str_token(int(clean_tokens[0, differ]))!r} vs "
      f"{base.to_single_str_token(int(corrupted_tokens[0, differ]))!r}")

# %% [markdown]
# ## Patch each block's attention and MLP output at the differing token, read it out at layer K
# `attn_out` / `mlp_out` of layer L is what block L writes into the residual stream
# (`get_act_name`). The captured site is the differing token itself; `cosine_to_clean` says how far
# the patched residual moved towards the clean one, and the explanation says which token the AV reads.
# On the toy, block 0 answers the question: patching either its attention or its MLP output brings the
# residual back to the clean one (cosine 0.999) and the AV reads " king"; from block 1 on it still reads
# " queen".

# %%
studies = {}
for name in ("attn_out", "mlp_out"):
    for layer in range(K + 1):
        studies[name, layer] = nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=layer,
                                                 patch_position=differ, activation_name=name,
                                                 capture_position=[differ], max_new_tokens=MAX_NEW_TOKENS)
first = studies["attn_out", 0]
print(f"clean:     {first.rows[0].verbalization.explanation}")
print(f"corrupted: {first.rows[1].verbalization.explanation}")
print(f"{'patched':9s} {'layer':>5s}  cos(., clean)  FVE    readout")
for (name, layer), study in studies.items():
    row = study.rows[2]
    fve = "" if row.fve is None else f"{row.fve:.2f}"
    print(f"{name:9s} {layer:5d}  {row.cosine_to_clean:13.3f}  {fve:5s}  {row.verbalization.explanation}")

# %% [markdown]
# ## Every study is a table
# In a notebook a study shows as a table; `to_pandas()` and `save()` give its rows.

# %%
first  # noqa: B018 - the notebook shows it as a table

# %% [markdown]
# ## Check: two patches whose outcome is known exactly
# * Patching the embedding-level residual (`resid_pre` of layer 0) at the only differing token
#   turns the corrupted run into the clean run: every later value is computed from the same inputs.
# * Patching `resid_post` of layer K at the captured position copies the captured vector itself.
# * On the toy, only block 0's patches make the AV read the clean token, as said above.

# %%
embedding = nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=differ,
                              activation_name="resid_pre", max_new_tokens=MAX_NEW_TOKENS)
assert torch.equal(embedding.patched_vectors, embedding.clean_vectors)
at_capture = nl.patching_study(base, nla.av, clean_tokens, corrupted_tokens, patch_layer=K, patch_position=-1,
                               activation_name="resid_post", max_new_tokens=MAX_NEW_TOKENS)
assert at_capture.hook_name == f"blocks.{K}.hook_resid_post"
assert torch.equal(at_capture.patched_vectors, at_capture.clean_vectors)
assert not torch.equal(at_capture.corrupted_vectors, at_capture.clean_vectors)
assert [r.run for r in first.rows] == ["clean", "corrupted", "patched"]
if not REAL:  # the toy's answer, as the prose above reads it
    reads_clean = [s.rows[2].verbalization.explanation == first.rows[0].verbalization.explanation
                   for s in studies.values()]
    assert reads_clean == [True, False, False, False] * 2
    assert all(studies[name, 0].rows[2].cosine_to_clean > 0.998 for name in ("attn_out", "mlp_out"))  # "0.999"
print("ok")
