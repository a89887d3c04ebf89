"""TransformerLens 3.x: `HookedTransformer`, built by `nla_lens.loading` (streamed, unprocessed)."""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformers import PreTrainedTokenizerBase

from nla_lens import loading


def load_model(folder: Path, tokenizer: PreTrainedTokenizerBase, *, dtype: torch.dtype,
               device: str | torch.device, n_layers: int | None = None,
               trust_remote_code: bool = False) -> HookedTransformer:
    return loading.load_hooked_transformer(folder, tokenizer, dtype=dtype, device=device, n_layers=n_layers,
                                           trust_remote_code=trust_remote_code)


class _CachedForward:
    """TL's own cache; it keeps the attention mask of every token it has seen."""

    def __init__(self, model: HookedTransformer, batch_size: int, device: torch.device) -> None:
        self.model = model
        self.cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, batch_size)

    def __call__(self, tokens: Int[Tensor, "batch pos"],
                 attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.model(tokens, attention_mask=attention_mask, past_kv_cache=self.cache)


def kv_cached_forward(model: HookedTransformer, batch_size: int, device: torch.device) -> _CachedForward:
    return _CachedForward(model, batch_size, device)
