# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Verbalize a prompt, token by token
#
# An NLA reads the base model's residual stream at one layer K (`blocks.K.hook_resid_post`).
# `nl.capture` records it at the positions you choose while you run the base model, and the NLA
# turns each vector into an explanation (AV) and back into a vector (AR), scored by FVE.
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
# `backends.load_model` gives the installed TransformerLens's model (`HookedTransformer` on 3.x,
# `TransformerBridge` on 4.x) with no weight processing: activations equal HF's.

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

# %% [markdown]
# ## Real checkpoints: the released Qwen3-8B NLA (layer 24)
# Needs a GPU, `Qwen/Qwen3-8B` in the local HF cache (`huggingface-cli download Qwen/Qwen3-8B`) and
# the AV and AR checkpoint folders: `NLA_REAL_CHECKPOINTS=1 NLA_AV=/path/to/av NLA_AR=/path/to/ar`.
# TransformerLens's `HookedTransformer.from_pretrained_no_processing("Qwen/Qwen3-8B")` (3.x) or
# `TransformerBridge.boot_transformers("Qwen/Qwen3-8B")` (4.x) is a fine base model too; plain
# `from_pretrained` and the bridge's `enable_compatibility_mode()` are not: their weight processing
# (centering, folded norms) changes the residual stream the NLA was trained on.

# %%
if os.environ.get("NLA_REAL_CHECKPOINTS"):
    av = nl.ActivationVerbalizer.from_pretrained(os.environ["NLA_AV"], device="cuda", dtype=torch.bfloat16)
    ar = nl.ActivationReconstructor.from_pretrained(os.environ["NLA_AR"], device="cuda", dtype=torch.bfloat16)
    nla = nl.NLA(av, ar)
    base_folder = loading.resolve_checkpoint("Qwen/Qwen3-8B")
    base = backends.load_model(base_folder, loading.load_tokenizer(base_folder), dtype=torch.bfloat16, device="cuda")
    MAX_NEW_TOKENS = 150
    BASELINE = 0.56  # held-out paper baseline of the released L24 pair

# %% [markdown]
# ## Capture every token of one prompt
# `stop_at_layer=K + 1` skips the blocks after K: nothing there reaches the captured residual.

# %%
K = nla.av.meta.layer
prompt = "The cat sat on the mat."
tokens = base.to_tokens(prompt)
with nl.capture(base, K, positions=list(range(tokens.shape[1])), tokens=tokens) as cap:
    base(tokens, stop_at_layer=K + 1)
print(cap.vectors.shape, cap.rows[:2])

# %% [markdown]
# ## Verbalize and round-trip them
# A failed parse (no `<explanation>` tags, as from the random tiny AV) scores as a miss.

# %%
rt = nla.round_trip(cap.vectors, baseline=BASELINE, max_new_tokens=MAX_NEW_TOKENS, progress=False)
for row, said, mse in zip(cap.rows, rt.verbalizations, rt.mse.tolist(), strict=True):
    text = said.explanation if said.explanation is not None else f"(unparsed) {said.text!r}"
    print(f"{row.position:3d} {row.token!r:10} mse={mse:.3f}  {text}")
print(f"FVE {rt.fve:.3f} (baseline {rt.baseline:.3f}: {rt.baseline_source}), {rt.n_failed_parses} failed parses")

# %% [markdown]
# ## The last real token of each prompt in a padded batch
# `to_tokens` left-pads a list of prompts; `positions=-1` is each row's last real token, found from
# the pad tokens (or from `attention_mask=` when you pass one, e.g. for right padding). Run the model
# with the mask: `TransformerBridge` attends to pads in a token tensor run without one.

# %%
prompts = ["The cat sat on the mat.", "A dog ran in the park", "the sea"]
batch = base.to_tokens(prompts)
mask = get_attention_mask(base.tokenizer, batch, prepend_bos=False)
with nl.capture(base, K, positions=-1, tokens=batch, attention_mask=mask) as last:
    base(batch, attention_mask=mask, stop_at_layer=K + 1)
for row, said in zip(last.rows, nla.av.verbalize(last.vectors, max_new_tokens=MAX_NEW_TOKENS, progress=False),
                     strict=True):
    print(row.batch, row.position, repr(row.token), repr(said.text))

# %% [markdown]
# ## Check: the capture holds exactly what `run_with_cache` stores at those positions

# %%
_, cache = base.run_with_cache(tokens, names_filter=cap.hook_name)
assert torch.equal(cap.vectors, cache[cap.hook_name][0].float())
assert [row.token for row in cap.rows] == base.to_str_tokens(tokens[0])
_, batch_cache = base.run_with_cache(batch, attention_mask=mask, names_filter=last.hook_name)
assert torch.equal(last.vectors, batch_cache[last.hook_name][:, -1].float())
assert len(rt.verbalizations) == tokens.shape[1]
print("ok")
