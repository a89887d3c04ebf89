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
    """The fast decoders (decoding.py; decoding_gemma.py for Gemma-3) fall back to TL's own forward
    whenever a hook could observe it."""
    gemma = decoding_gemma.GemmaDecoder.build(model, batch, max_len, fwd_hooks)
    return gemma if gemma is not None else decoding.decoder_for(model, batch, max_len, fwd_hooks)


last_residual = decoding.last_residual
