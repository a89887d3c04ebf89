"""TransformerLens 4.x: `TransformerBridge` around the HF model, with no weight processing.

The bridge runs HF's own modules and names their activations with TL hook points, keeping the
3.x names (`blocks.1.hook_resid_post`, `blocks.3.attn.hook_z`, `hook_embed`) as aliases of its
own (`blocks.1.hook_out`, ...), so the same hooks see the same tensors as on `HookedTransformer`.
Choices made here, each because the bridge's default would change what nla_lens computes:

* `enable_compatibility_mode()` / `process_weights()` are never called: they fold norms and
  centre weights, which changes activations. Weights stay byte-equal to the checkpoint.
* We load the HF model ourselves (then `boot_transformers(hf_model=...)`), with a config cut to
  K+1 layers for the AR, so the loading report can be checked (missing weights are an error) and
  an AR's Megatron placeholder `lm_head.weight = eye(d)` can be skipped rather than refused.
* An AR's final norm and unembed become `nn.Identity` inside their bridge components, so
  `model(tokens)` returns the residual after block K and `ln_final.*` hooks still fire.
* Decoding uses HF's own KV cache through the bridge's manual entry point
  (`past_key_values=`, `return_type="logits_and_cache"`); `generate()` is not used because it
  ignores `fwd_hooks`. Hooks installed with `model.hooks(...)` fire on the prefill and every step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from nla_lens import loading
from nla_lens.backends import gemma3
from nla_lens.errors import BackendError, CheckpointError

# An AR folder may lack these or hold placeholders for them; the AR drops both modules anyway.
_AR_IGNORED = frozenset({"model.norm.weight", "lm_head.weight"})


def load_model(folder: Path, tokenizer: PreTrainedTokenizerBase, *, dtype: torch.dtype,
               device: str | torch.device, n_layers: int | None = None,
               trust_remote_code: bool = False) -> TransformerBridge:
    """Boot a `TransformerBridge` on the HF folder; with `n_layers`, a truncated AR backbone."""
    if dtype == torch.float64:
        raise _float64_refused("Load in float32")
    hf_config = loading.load_hf_config(folder, trust_remote_code=trust_remote_code)
    arch = (hf_config.architectures or [None])[0]
    if arch not in loading.SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"architecture {arch!r} is not supported yet; nla_lens loads {loading.SUPPORTED_ARCHITECTURES}"
        )
    truncated = n_layers is not None
    n_blocks = gemma3.text_config(hf_config).num_hidden_layers
    # Pickle-only, truncated or integer weights, blocks past config.json's: refused before HF reads them.
    loading.check_weight_files(folder, wrapped=gemma3.is_wrapper(hf_config), n_blocks=None if truncated else n_blocks)
    if truncated and n_layers > n_blocks:
        raise CheckpointError(f"{folder} has {n_blocks} layers, {n_layers} requested")
    if gemma3.is_wrapper(hf_config):
        # The text model alone, streamed from the wrapper's folder: the vision tower is never read.
        hf_model = gemma3.load_text_model(folder, hf_config, dtype=dtype, device=device, n_layers=n_layers)
    else:
        hf_model = _load_hf_model(folder, hf_config, dtype=dtype, device=device, n_layers=n_layers,
                                  trust_remote_code=trust_remote_code)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf_model.eval(),
                                                 tokenizer=tokenizer, dtype=dtype, device=device,
                                                 trust_remote_code=trust_remote_code)
    # As on the hooked backend: `to_tokens` adds a BOS exactly where the training code did (Gemma,
    # Llama); nla_lens builds its AV / AR prompts itself.
    bridge.cfg.default_prepend_bos = loading.prepends_bos(tokenizer)
    if truncated:
        bridge.ln_final.set_original_component(nn.Identity())
        bridge.unembed.set_original_component(nn.Identity())
    return bridge.eval()


def check_dtype(model: TransformerBridge, role: str) -> None:
    """Refuse a bridge cast to float64 after loading (`model.to(torch.float64)`, `.double()`), as `load_model`
    refuses one loaded so. The embedding's dtype is the run's: HF builds its attention mask in it."""
    if _run_dtype(model) == torch.float64:
        raise _float64_refused(f"The {role} model was cast to float64 after loading (model.to(torch.float64) or "
                               ".double()): cast it back with model.to(torch.float32)")


def check_castable(model: TransformerBridge, role: str, dtype: torch.dtype) -> None:
    """Refuse to cast a loaded bridge to another dtype: HF's loader keeps each rotary `inv_freq` in float32, and a cast
    rounds it to the new dtype, so the outputs are no longer those of a load in that dtype (tiny Qwen3, float32 cast
    to bfloat16: logits 0.11 apart, other greedy explanations; 0.0 with `inv_freq` kept). float64 as `load_model`."""
    current = _run_dtype(model)
    if dtype == current:
        return
    if dtype == torch.float64:
        raise _float64_refused(f"Keep the {role} model in {str(current).removeprefix('torch.')}")
    name = str(dtype).removeprefix("torch.")
    raise BackendError(
        f"the {role} model cannot be cast to {name} on the bridge backend (TransformerLens 4.x): a cast rounds HF's "
        f"rotary frequencies (inv_freq, which HF's loader keeps in float32) to {name}, so its outputs would not be "
        f"those of a model loaded in {name}. Load it again with dtype=torch.{name}; a move to another device alone "
        "(.to(device)) is fine"
    )


def move(model: TransformerBridge, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """`backends.move` on the bridge: to `device` (`check_castable` let only the model's own dtype through), with
    `cfg.device` the weights' device, as `boot_transformers` sets it."""
    if device is not None:
        model.to(str(device), print_details=False)
        model.cfg.device = str(_embedding(model).device)


def _run_dtype(model: TransformerBridge) -> torch.dtype:
    """The dtype the bridge runs in: HF builds its attention mask in the embedding's."""
    return _embedding(model).dtype


def _embedding(model: TransformerBridge) -> Tensor:
    return cast(Tensor, cast(PreTrainedModel, model.original_model).get_input_embeddings().weight)


def _float64_refused(fix: str) -> BackendError:
    # The bridge's attention softmaxes in float32, where the float64 mask value (finfo.min) is -inf: a left pad
    # attends to nothing (NaN), and its NaN values reach every real token of the row from the next block on.
    return BackendError(
        "float64 is not supported on the bridge backend (TransformerLens 4.x): its attention softmax runs in "
        f"float32, so every left-padded row (the AR's batches, a padded base-model batch) comes out NaN. {fix}, "
        "or use TransformerLens 3.x (HookedTransformer) for float64: pip install 'nla-lens[tl3]'"
    )


def _load_hf_model(folder: Path, hf_config, *, dtype: torch.dtype, device: str | torch.device,
                   n_layers: int | None, trust_remote_code: bool) -> nn.Module:
    """HF's own loader, with the config cut to `n_layers` blocks for an AR; missing weights refused."""
    index = loading.weight_index(folder)
    if index is not None and not isinstance(index.get("metadata"), dict):  # transformers reads index["metadata"]
        raise CheckpointError(
            f"{folder}/model.safetensors.index.json has no \"metadata\" object, which transformers' loader (this "
            "backend's) needs: add \"metadata\": {} to it, or write the folder again with save_pretrained"
        )
    if n_layers is not None:
        loading.truncate_config(hf_config, n_layers)
    # With output_loading_info, transformers returns (model, report); its annotations say model only.
    hf_model, report = cast(tuple[nn.Module, dict], AutoModelForCausalLM.from_pretrained(
        folder, config=hf_config, dtype=dtype, device_map=torch.device(device), attn_implementation="eager",
        use_safetensors=True, ignore_mismatched_sizes=True, output_loading_info=True,
        trust_remote_code=trust_remote_code,
    ))
    _check_report(report, folder, ignored=_AR_IGNORED if n_layers is not None else frozenset())
    return hf_model


def _check_report(report: dict, folder: Path, *, ignored: frozenset[str]) -> None:
    """HF fills missing or misshapen weights with random values; nla_lens refuses them instead."""
    mismatched = [(name, tuple(found), tuple(wanted)) for name, found, wanted in report["mismatched_keys"]
                  if name not in ignored]
    if mismatched:
        raise loading.misshapen_weight(folder, *mismatched[0])
    missing = sorted(set(report["missing_keys"]) - ignored)
    if missing:
        raise loading.missing_weights(folder, missing)


class _CachedForward:
    """HF's `DynamicCache` driven through the bridge; keeps the mask of every token seen so far,
    as HF wants the mask of the cached prefix and the new tokens together."""

    def __init__(self, model: TransformerBridge, batch_size: int, device: torch.device) -> None:
        self.model = model
        self.cache = DynamicCache(config=cast(PreTrainedModel, model.original_model).config)
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)

    def __call__(self, tokens: Int[Tensor, "batch pos"],
                 attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        self.mask = torch.cat([self.mask, attention_mask.to(self.mask)], dim=1)
        logits, cache = self.model(tokens, attention_mask=self.mask, past_key_values=self.cache,
                                   return_type="logits_and_cache")
        if cache is None or cache.get_seq_length() != self.mask.shape[1]:
            # transformers 5.24 hands attention the cache as `cache=`, TL 4.3 reads `past_key_values=`:
            # the cache then stays empty and every decode step silently forgets the prompt.
            raise BackendError(
                f"the KV cache holds {0 if cache is None else cache.get_seq_length()} positions after "
                f"{self.mask.shape[1]} tokens: transformer-lens {metadata.version('transformer-lens')} "
                f"does not fill HF's cache with transformers {metadata.version('transformers')}. "
                "Install a tested pair (README, 'TransformerLens 3.x and 4.x'), e.g. transformers<5.24"
            )
        self.cache = cache
        return logits


_NO_FAST_PATH = "the bridge backend has no fast path: every forward is TransformerBridge's own"


class _Decoder:
    """`backends.Decoder` over the bridge's cached forward: every hook fires on every call."""

    fallback_reason = _NO_FAST_PATH

    def __init__(self, model: TransformerBridge, batch_size: int) -> None:
        device = next(model.parameters()).device
        self.model = model
        self.forward = _CachedForward(model, batch_size, device)
        self.step_mask = torch.ones(batch_size, 1, dtype=torch.long, device=device)

    def prefill(self, tokens: Int[Tensor, "batch pos"], fwd_hooks: list) -> Float[Tensor, "batch d_vocab"]:
        with hooks(self.model, fwd_hooks):
            return self.forward(tokens, torch.ones_like(tokens))[:, -1]

    def step(self, ids: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        return self.forward(ids[:, None], self.step_mask)[:, -1]


# Context levels TL never gives out (its own count up from 1), one per call of `_level_of_its_own`.
_OWN_LEVELS = itertools.count(-2, -1)


@contextmanager
def _level_of_its_own(model: TransformerBridge) -> Iterator[None]:
    """TL's `hooks()`, `run_with_hooks` and `run_with_cache` below add their hooks at `context_level + 1` of a level
    parked where TL never counts. TransformerLens 3.9's bridge removes on exit every hook at that level on each hook
    point it touched, not its own alone: a hook the caller left there at level 1 (`run_with_hooks(...,
    reset_hooks_end=False)`, `hooks(..., reset_hooks_end=False)`) went with the prefill's injection, a steering or a
    patch, and the steps after it ran without. TL 4.3's bridge removes its own hooks by handle either way."""
    outer = model.context_level
    model.context_level = next(_OWN_LEVELS)
    try:
        yield
    finally:
        model.context_level = outer


@contextmanager
def hooks(model: TransformerBridge, fwd_hooks: list) -> Iterator[TransformerBridge]:
    """`model.hooks(fwd_hooks=...)` that removes exactly the hooks it added (see `_level_of_its_own`)."""
    with _level_of_its_own(model), model.hooks(fwd_hooks=fwd_hooks):
        yield model


def run_with_hooks(model: TransformerBridge, input: Tensor, *, fwd_hooks: list, **kwargs: Any) -> Any:
    """`model.run_with_hooks` that removes exactly the hooks it added (see `_level_of_its_own`)."""
    with _level_of_its_own(model):
        return model.run_with_hooks(input, fwd_hooks=fwd_hooks, **kwargs)


def cached_activation(model: TransformerBridge, hook_name: str, input: Tensor, **kwargs: Any) -> Tensor | None:
    with _level_of_its_own(model):
        cache = model.run_with_cache(input, names_filter=hook_name, **kwargs)[1]
    return cache[hook_name] if hook_name in cache else None


def decoder(model: TransformerBridge, batch_size: int, max_len: int, fwd_hooks: list) -> _Decoder:
    """`backends.decoder` on the bridge: its cached forward, no fast path, so `max_len` and `fwd_hooks` (what the
    hooked backend's fast paths plan with) go unused here; `prefill` installs the hooks it is given."""
    return _Decoder(model, batch_size)


class ARForward:
    """The bridge's own forward to the AR's last residual (it has no fast path)."""

    fallback_reason = _NO_FAST_PATH

    def __init__(self, model: TransformerBridge) -> None:
        self.model = model

    def __call__(self, tokens: Int[Tensor, "batch pos"],
                 attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_model"]:
        return self.model(tokens, attention_mask=attention_mask)[:, -1]
