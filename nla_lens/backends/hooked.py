"""TransformerLens 3.x: `HookedTransformer`, built by `nla_lens.loading` (streamed, unprocessed)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint
from transformers import PreTrainedTokenizerBase

from nla_lens import backends, decoding, decoding_gemma, loading

# Context levels TL never gives out (its own count up from 1), one per `hooks` call.
_OWN_LEVELS = itertools.count(-1, -1)


def load_model(folder: Path, tokenizer: PreTrainedTokenizerBase, *, dtype: torch.dtype,
               device: str | torch.device, n_layers: int | None = None,
               trust_remote_code: bool = False) -> HookedTransformer:
    return loading.load_hooked_transformer(folder, tokenizer, dtype=dtype, device=device, n_layers=n_layers,
                                           trust_remote_code=trust_remote_code)


def decoder(model: HookedTransformer, batch_size: int, max_len: int, fwd_hooks: list) -> backends.Decoder:
    """Gemma-3's fast decoder (decoding_gemma.py) when no hook could observe it; otherwise decoding.py's,
    which honours the hooks it covers and falls back to TL's own forward for others."""
    gemma = decoding_gemma.GemmaDecoder.build(model, batch_size, max_len, fwd_hooks)
    return gemma if gemma is not None else decoding.decoder_for(model, batch_size, max_len, fwd_hooks)


ARForward = decoding.ARForward


def move(model: HookedTransformer, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """`backends.move` through TL's own `to`, which updates `cfg.device` and `cfg.dtype`; then the rotary tables as a
    load computes them."""
    if device is not None:
        model.to(str(device), print_details=False)  # a torch.device leaves cfg.device its type: cuda:1 became cuda
    if dtype is not None:
        model.to(dtype, print_details=False)
    _compute_rotary_tables(model)


def _compute_rotary_tables(model: HookedTransformer) -> None:
    """Each attention's rotary tables computed afresh on its device in `cfg.dtype`, one tensor per kind shared by
    the layers alike, as the loader gives them (`loading._share_block_buffers`). TL computes them in float32 (float64
    for a float64 model) and rounds once; a cast rounds the load's tables instead: a float32 model cast to float64
    kept float32's angles (logits 8e-7 off a float64 load), and `Module.to` gives each layer a copy of its own."""
    if model.cfg.positional_embedding_type != "rotary":
        return
    rotary_dim = cast(int, model.cfg.rotary_dim)  # set for every rotary model
    tables: dict[tuple[str, float, int], tuple[Tensor, Tensor]] = {}
    for block in model.blocks:
        attn = block.attn
        device, size = attn.rotary_cos.device, attn.rotary_cos.shape[0]  # the size TL has grown it to, if it has
        kind = (attn.attn_type, attn._rotary_base(), size)  # Gemma-3: local and global layers differ
        if kind not in tables:
            with torch.device(device):  # where the loader computed them: a GPU's sin and cos may round otherwise
                tables[kind] = attn.calculate_sin_cos_rotary(rotary_dim, size, base=kind[1], dtype=model.cfg.dtype)
        attn.rotary_sin, attn.rotary_cos = tables[kind]


def run_with_hooks(model: HookedTransformer, *args: Any, fwd_hooks: list, **kwargs: Any) -> Any:
    """TL's `run_with_hooks` (`forward` under the hooks) with `hooks` in place of TL's `hooks()`."""
    with hooks(model, fwd_hooks):
        return model.forward(*args, **kwargs)


def cached_activation(model: HookedTransformer, hook_name: str, *args: Any, **kwargs: Any) -> Tensor | None:
    """TL's `run_with_cache(names_filter=hook_name)` (the activation detached, from `model(...)`) under `hooks`."""
    cache: dict[str, Tensor] = {}
    with hooks(model, [(hook_name, lambda activation, hook: cache.setdefault(hook_name, activation.detach()))]):
        model(*args, **kwargs)
    return cache.get(hook_name)


@contextmanager
def hooks(model: HookedTransformer, fwd_hooks: list) -> Iterator[HookedTransformer]:
    """`model.hooks(fwd_hooks=...)` under a level of its own. TL's `hooks()` removes on exit every hook at its
    context level, and hooks that `run_with_hooks(..., reset_hooks_end=False)` left (TL's way to keep
    backward hooks) sit at level 1: they went with the prefill's injection, so decode steps ran without them."""
    level = next(_OWN_LEVELS)
    try:
        for name, fn in fwd_hooks:  # a name or a filter on names, as TL's hooks() takes them
            # A name is looked up in mod_dict, as TL's add_hook does; it names a HookPoint there.
            points = [cast(HookPoint, model.mod_dict[name])] if isinstance(name, str) else [
                point for point_name, point in model.hook_dict.items() if name(point_name)]
            for point in points:
                point.add_hook(fn, dir="fwd", level=level)
        yield model
    finally:
        for point in model.hook_dict.values():
            point.remove_hooks("fwd", level=level)
