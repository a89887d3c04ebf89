# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Explain a text, token by token
#
# An NLA reads the base model's residual stream at one layer K (`blocks.K.hook_resid_post`). The
# activation verbalizer (AV) turns each vector into an explanation; the activation reconstructor
# (AR) turns the explanation back into a vector, and the round-trip FVE (fraction of variance explained,
# 1 - MSE / baseline) says how much of the vector the words kept: 1 is a perfect rebuild, 0 no better than
# the mean vector, below 0 worse (README, "Scores").
#
# This runs on the toy NLA bundled with nla_lens: a small Shakespeare LM (6 layers, d_model 128) read
# at layer 3, whose AV was trained to say which token it sees, the token before it, and what the
# base model predicts next. It loads in seconds on a CPU. The real-checkpoint cell below is skipped
# unless `NLA_REAL_CHECKPOINTS=1`.

# %%
import os
import tempfile
from pathlib import Path

import torch

import nla_lens as nl

# %% [markdown]
# ## The bundled toy NLA
# `nl.toy.load()` gives the base model (a TransformerLens model, loaded without weight processing, so
# its activations equal HF's), the AV, the AR and `nla`, the pair.

# %%
toy = nl.toy.load()
base, nla = toy.base, toy.nla
TEXT = "Macbeth: My lord, the king is dead, and I must go to the castle."
MAX_NEW_TOKENS = 48
REAL = False

# %% [markdown]
# ## Real checkpoints: a released NLA pair
# Needs a GPU, the base model the sidecar names in the local HF cache (e.g. `hf download
# Qwen/Qwen2.5-7B-Instruct` for `kitft/nla-qwen2.5-7b-L20-av` / `-ar`) and the AV and AR folders:
# `NLA_REAL_CHECKPOINTS=1 NLA_AV=/path/to/av NLA_AR=/path/to/ar`. The nanoNLA Qwen3-8B release is an AV
# only: pair it with an AR you trained (`nla-lens train-ar`). `nl.load_base(nla)` loads
# the base model the sidecar names, without TransformerLens's weight processing (centering, folded
# norms), which would change the residual stream the NLA was trained on.

# %%
if os.environ.get("NLA_REAL_CHECKPOINTS"):
    nla = nl.NLA.from_pretrained(os.environ["NLA_AV"], os.environ["NLA_AR"], device="cuda", dtype=torch.bfloat16)
    base = nl.load_base(nla, device="cuda", dtype=torch.bfloat16)
    TEXT = "The Eiffel Tower is in Paris, the capital of France."
    MAX_NEW_TOKENS, REAL = 150, True

# %% [markdown]
# ## One call: every token, its explanation and its round-trip score
# `nla.explain` tokenizes the text, captures layer K at every token, verbalizes and reconstructs all
# of them in one batch. In a notebook the result shows as the tokens coloured by FVE with the
# explanations in rows under them; `print` gives a short summary. The FVE baseline is named on the
# first line: here the held-out one that the toy's AR sidecar records. The released pairs' sidecars record
# none: with fewer than 32 explained tokens the line says "no FVE" and how to get one, the FVE column is
# empty and the view colours by MSE. Pass `baseline=` (about 0.56 for Qwen3-8B layer-24 vectors; README, "Scores").

# %%
explained = nla.explain(base, TEXT, max_new_tokens=MAX_NEW_TOKENS)
print(explained)
explained  # noqa: B018 - the notebook shows it as HTML

# %% [markdown]
# ## A table to work with
# `to_pandas()` has one row per token: the text (`text_index`, and `input_text`, the text itself), position,
# token, explanation, parsed flag, the AV's raw `text` and whether `max_new_tokens` cut it (`truncated`), MSE,
# FVE, `miss` (scored as a miss, e.g. a failed parse), the baseline used and the layer. `save()` writes the
# rows (`.parquet`, `.jsonl`) or the view (`.html`, one self-contained page). `nl.read_result` reads a saved
# table back; a `.parquet` file also keeps the summary line (FVE, which baseline, failed parses) in `attrs`,
# so the rows can be trusted later.
#
# The toy AV was trained only on positions with at least 8 tokens before them, so the first tokens of a
# text read worse: on the toy, position 1 (`"ac"`) is read as `"os"`, with an FVE below 0.

# %%
table = explained.to_pandas()
print(table[["position", "token", "fve", "explanation"]].to_string(index=False, max_colwidth=60))
outdir = tempfile.TemporaryDirectory(prefix="nla_lens_tutorial_")
page = explained.save(Path(outdir.name) / "explained.html")
rows = explained.save(Path(outdir.name) / "explained.parquet")
print(f"wrote {page.name} ({page.stat().st_size} bytes) and {rows.name}")
saved = nl.read_result(rows)
print(saved.attrs["summary"])

# %% [markdown]
# ## The pieces underneath: capture, then round-trip
# `nl.capture` records layer K at the positions you choose while you run the base model however you
# like (with your own hooks, `run_with_cache`, `generate`). It reads the tokens and the attention
# mask from the run itself, so `positions=-1` is each prompt's last real token even in a left-padded
# batch. `stop_at_layer=K + 1` skips the blocks after K: nothing there reaches the captured residual.
# HookedTransformer masks left pads by itself; TransformerLens 4's bridge does not, so the run gets
# the mask `implicit_attention_mask` derives there (None on HookedTransformer: nothing to add).

# %%
K = nla.layer
prompts = ["Romeo: I do love thee, and I will", "Juliet: O Romeo", "Prospero: Come hither, my good lord"]
batch = base.to_tokens(prompts)  # left-padded; BOS first where the tokenizer has one (Gemma, Llama), as in training
mask = nl.backends.implicit_attention_mask(base, batch)
with nl.capture(base, K, positions=-1) as last:
    base(batch, attention_mask=mask, stop_at_layer=K + 1)
rt = nla.round_trip(last.vectors, max_new_tokens=MAX_NEW_TOKENS)
print(rt)
for row, said in zip(last.rows, rt.verbalizations, strict=True):
    print(f"{row.batch} {row.position:2d} {row.token!r:10} {said.explanation}")

# %% [markdown]
# ## Check: the explained vectors are exactly what `run_with_cache` stores, and the scores add up

# %%
tokens = base.to_tokens(TEXT)  # BOS first where the tokenizer has one; explain leaves that one out
bos = int(base.cfg.default_prepend_bos)
_, cache = base.run_with_cache(tokens, names_filter=explained.hook_name)
assert torch.equal(explained.vectors, cache[explained.hook_name][0, bos:].float().to(explained.vectors.device))
assert [r.token for r in explained.rows] == [base.tokenizer.decode([t]) for t in tokens[0, bos:].tolist()]
assert len(table) == tokens.shape[1] - bos
assert saved.equals(table) and saved.attrs["summary"] == explained.summary()
mses = torch.tensor([r.mse for r in explained.rows])
assert abs(float(mses.mean()) - explained.round_trip.mean_mse) < 1e-5
if explained.round_trip.fve is None:  # a released pair's sidecar, under 32 tokens: no FVE in any row
    assert table["fve"].isna().all() and "no FVE" in explained.summary()
else:
    fves = torch.tensor([r.fve for r in explained.rows])
    assert table["fve"].notna().all() and abs(float(fves.mean()) - explained.round_trip.fve) < 1e-5
assert [row.position for row in last.rows] == [batch.shape[1] - 1] * len(prompts)  # left padding: last column
for i, prompt in enumerate(prompts):  # a padded row's vector is its prompt's own, run alone
    _, alone = base.run_with_cache(base.to_tokens(prompt), names_filter=explained.hook_name)
    own = alone[explained.hook_name][0, -1].float()
    assert (last.vectors[i] - own).norm() <= (5e-2 if REAL else 1e-3) * own.norm()
if not REAL:  # the toy's numbers, as the prose above reads them
    assert explained.round_trip.baseline_source == "sidecar (held-out)" and explained.round_trip.fve > 0.5
    second = explained.rows[1]
    assert second.token == "ac" and second.explanation.startswith('The token "os"') and second.fve < 0
print("ok")
