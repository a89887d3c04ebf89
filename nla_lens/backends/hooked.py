"""TransformerLens 3.x: `HookedTransformer`, built by `nla_lens.loading` (streamed, unprocessed)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from nla_lens import backends, decoding, decoding_gemma, loading


def load_model(folder: Path, tokenizer: PreTrainedTokenizerBase, *, dtype: torch.dtype,
               device: str | torch.device, n_layers: int | None = None,
               trust_remote_code: bool = False) -> HookedTransformer:
    return loading.load_hooked_transformer(folder, tokenizer, dtype=dtype, device=device, n_layers=n_layers,
                                           trust_remote_code=trust_remote_code)


def decoder(model: HookedTransformer, batch: int, max_len: int, fwd_hooks: list) -> backends.Decoder:
    """Gemma-3's fast decoder (decoding_gemma.py) when no hook could observe it; otherwise decoding.py's,
    which honours the hooks it covers and falls back to TL's own forward for others."""
    gemma = decoding_gemma.GemmaDecoder.build(model, batch, max_len, fwd_hooks)
    return gemma if gemma is not None else decoding.decoder_for(model, batch, max_len, fwd_hooks)


last_residual = decoding.last_residual
ar_fallback_reason = decoding.ar_fallback_reason
