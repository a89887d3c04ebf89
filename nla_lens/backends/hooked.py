"""TransformerLens 3.x: `HookedTransformer`, built by `nla_lens.loading` (streamed, unprocessed)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from nla_lens import decoding, loading


def load_model(folder: Path, tokenizer: PreTrainedTokenizerBase, *, dtype: torch.dtype,
               device: str | torch.device, n_layers: int | None = None,
               trust_remote_code: bool = False) -> HookedTransformer:
    return loading.load_hooked_transformer(folder, tokenizer, dtype=dtype, device=device, n_layers=n_layers,
                                           trust_remote_code=trust_remote_code)


# The fast paths (decoding.py) honour the hooks they cover and fall back to TL's own forward for others.
decoder = decoding.decoder_for
last_residual = decoding.last_residual
ar_fallback_reason = decoding.ar_fallback_reason
