"""TransformerLens 3.x: `HookedTransformer`, built by `nla_lens.loading` (streamed, unprocessed)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import warn_if_mps
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
    """`backends.move` that keeps the load's shared storage (`_StorageMove`), then sets `cfg.device` and `cfg.dtype`
    as TL's own `to` does and computes the rotary tables as a load computes them. TL's `to` (`Module._apply`) gave
    each tensor a storage of its own: a block's q/k/v, one storage at load (`loading._FUSED`), became three matmuls
    in the fast decoder."""
    if device is not None:
        warn_if_mps(device)
    model._apply(_StorageMove(model, device, dtype))
    if device is not None:
        model.cfg.device = str(device)  # as TL's to(str): its to(torch.device) kept the type alone, cuda:1 became cuda
    if dtype is not None:
        model.cfg.dtype = dtype
    _compute_rotary_tables(model)


# A storage as `_StorageMove` knows it: device, address, size in bytes, and the dtype its tensors read it as.
_StorageKey = tuple[torch.device, int, int, torch.dtype]


class _StorageMove:
    """`Module._apply`'s function for `Module.to(device, dtype)` (floating tensors alone cast) that moves each storage
    once and points its tensors at the same shape, stride and offset of the new one, so tensors that shared a storage
    still share it. `_apply` keeps the `nn.Parameter` objects (`param.data = ...`) and runs modules' own `_apply`
    (`GemmaRMSNorm`'s). A storage the model's tensors do not cover whole (a slice of a user's larger tensor) is
    converted tensor by tensor, as torch does: moving it whole would copy bytes the model never reads."""

    def __init__(self, model: nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> None:
        self.device, self.dtype = device, dtype
        self.whole = _covered_storages([*model.parameters(), *model.buffers()])
        self.moved: dict[_StorageKey, Tensor] = {}

    def __call__(self, tensor: Tensor) -> Tensor:
        dtype = self.dtype if tensor.is_floating_point() or tensor.is_complex() else None
        key = _storage_key(tensor)
        if key not in self.whole:
            return tensor.to(self.device, dtype)
        if key not in self.moved:
            self.moved[key] = _storage_as_tensor(tensor).to(self.device, dtype)
        return self.moved[key].as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())


def _storage_key(tensor: Tensor) -> _StorageKey | None:
    """None for what `_StorageMove` leaves to torch: an empty storage (no address to share) or a tensor that is not a
    plain strided one (a DTensor shard)."""
    if type(tensor.data) is not Tensor or tensor.layout != torch.strided:
        return None
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return tensor.device, storage.data_ptr(), storage.nbytes(), tensor.dtype


def _covered_storages(tensors: list[Tensor]) -> set[_StorageKey]:
    """The storages whose every element some tensor of `tensors` reads, each tensor dense: those a whole move copies
    nothing extra of (the loader gives each parameter exactly its bytes, a block's q/k/v together theirs)."""
    spans: dict[_StorageKey, list[tuple[int, int]]] = {}
    gapped: set[_StorageKey] = set()
    for tensor in tensors:
        key = _storage_key(tensor)
        if key is None:
            continue
        span = _dense_span(tensor)
        if span is None:
            gapped.add(key)
        else:
            spans.setdefault(key, []).append(span)
    return {key for key, key_spans in spans.items()
            if key not in gapped and _cover(key_spans, key[2] // key[3].itemsize)}


def _dense_span(tensor: Tensor) -> tuple[int, int] | None:
    """The elements `[start, end)` of its storage that `tensor` reads, when it reads each of them once (None: a
    strided view with gaps or overlaps, whose footprint is not one span)."""
    by_stride = sorted(range(tensor.ndim), key=tensor.stride, reverse=True)
    if not tensor.permute(by_stride).is_contiguous():
        return None
    start = int(tensor.storage_offset())
    return start, start + tensor.numel()


def _cover(spans: list[tuple[int, int]], n_elements: int) -> bool:
    """Whether `spans` (they may overlap: tied weights) together cover elements `[0, n_elements)`."""
    covered = 0
    for start, end in sorted(spans):
        if start > covered:
            return False
        covered = max(covered, end)
    return covered == n_elements


def _storage_as_tensor(tensor: Tensor) -> Tensor:
    """`tensor`'s whole storage as one flat tensor of its dtype, element i at storage offset i."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(tensor.untyped_storage())


def _compute_rotary_tables(model: HookedTransformer) -> None:
    """Each attention's rotary tables computed afresh on its device in `cfg.dtype`, one tensor per kind shared by
    the layers alike, as the loader gives them (`loading._share_block_buffers`). TL computes them in float32 (float64
    for a float64 model) and rounds once; a cast rounds the load's tables instead: a float32 model cast to float64
    kept float32's angles (logits 8e-7 off a float64 load)."""
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
