"""A fast KV-cached decoder for TransformerLens Gemma-3 models (the `hooked` backend's `verbalize`).

It computes what TL's Gemma-3 blocks compute on the same parameters (norms the loader's `GemmaRMSNorm`s:
``1 + w`` in fp32, multiplied before the cast as HF does; `W_E` pre-scaled by sqrt(d); see
`nla_lens.backends.gemma3`): RMSNorm before and after attention and MLP, q/k norms, rotary embeddings
with one table per layer (local or global base), keys beyond the sliding window masked on local layers,
`gelu_pytorch_tanh` gating. What it saves is TL's per-step overhead: TL caches keys before the rotary
embedding and re-rotates the whole cache in every layer at every step, repeats the K/V heads over the
whole cache and rebuilds masks per layer; here rotated keys live in a buffer allocated once.

The arithmetic is `decoding.FastBlocks`'s, shared with it (`_rms`, `_attention` with `_attend`,
`_attend_step` and `_kv_cache`, `_mlp`, TL's own final norm and unembed): TL's op order and
operand layouts, keys outside a local layer's window masked to -inf as TL masks them, not cut off.
So the logits of a prefill and of every decode step are TL's to the bit (measured on the CPU in
fp32 and bf16, one row or several, prompts and generations past the window), and attaching a hook,
which sends decoding to TL's forward, changes no token. Unlike `decoding.FastDecoder` it runs only
when no hook is attached to the model: any hook sends the call to TL's forward. The injection,
passed explicitly, is applied at `hook_embed` or `blocks.{i}.hook_resid_post` exactly where TL
would apply it.
"""

from __future__ import annotations

import re
from typing import cast

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformer_lens import HookedTransformer
from transformer_lens.components import Embed, GatedMLP, GroupedQueryAttention, TransformerBlock, Unembed

from nla_lens.backends import gemma3
from nla_lens.backends.gemma3_norm import GemmaRMSNorm
from nla_lens.decoding import _attention, _kv_cache, _last_logits, _Layer, _mlp, _rms
from nla_lens.errors import ConfigError
from nla_lens.fast_hooks import NO_BLOCK_HOOKS, torch_hook_reason
from nla_lens.injection import HookFn

_HOOKABLE = re.compile(r"^(hook_embed|blocks\.\d+\.hook_resid_post)$")


class _GemmaLayer(_Layer):
    """`decoding._Layer` plus Gemma-3's norms after attention and MLP and the layer's attention type. Every norm
    is a `GemmaRMSNorm` (`eligible` checks): fp32 ``1 + w``, multiplied before the cast to the model's dtype."""

    def __init__(self, block: TransformerBlock) -> None:
        super().__init__(block)
        self.ln1_post, self.ln2_post = cast(GemmaRMSNorm, block.ln1_post).w, cast(GemmaRMSNorm, block.ln2_post).w
        self.norm_dtype = cast(GemmaRMSNorm, block.ln1).out_dtype
        self.local = block.attn.attn_type == "local"

    @staticmethod
    def eligible(block: TransformerBlock) -> bool:
        attn = block.attn
        norms = (block.ln1, getattr(block, "ln1_post", None), block.ln2, getattr(block, "ln2_post", None),
                 attn.q_norm, attn.k_norm)
        return (type(attn) is GroupedQueryAttention and type(block.mlp) is GatedMLP
                and all(type(norm) is GemmaRMSNorm for norm in norms) and _Layer.in_hf_layout(block))


def check_window(model: HookedTransformer) -> None:
    """A Gemma-3 model with local (sliding-window) layers has an integer `cfg.window_size`, which their masks read:
    a hand-made config without one failed in the prefill with a bare TypeError."""
    local = [i for i, block in enumerate(model.blocks) if block.attn.attn_type == "local"]
    if local and not isinstance(model.cfg.window_size, int):
        raise ConfigError(f"blocks {local} of this Gemma-3 model use local (sliding-window) attention, but "
                          f"model.cfg.window_size is {model.cfg.window_size!r}: set it to the checkpoint's "
                          "sliding_window (config.json's, under text_config in the multimodal wrapper), as "
                          "nla_lens's loader and TransformerLens's Gemma-3 configs do")


class GemmaDecoder:
    """`backends.Decoder` for TL Gemma-3 models: prefill, then one token per `step`."""

    fallback_reason = None  # built only when it serves the call: nothing falls back to TL's forward

    def __init__(self, model: HookedTransformer, batch: int, max_len: int) -> None:
        self.model = model
        self.layers = [_GemmaLayer(block) for block in model.blocks]
        # None without local layers: global ones mask causally only (build refused local ones without a window)
        self.window = model.cfg.window_size if any(layer.local for layer in self.layers) else None
        first = self.layers[0]
        self.keys, self.values = _kv_cache(len(self.layers), batch, first.n_kv, max_len, first.d_head,
                                           model.cfg.dtype, model.W_E.device)
        self.pos = 0

    @classmethod
    def build(cls, model: HookedTransformer, batch: int, max_len: int,
              fwd_hooks: list[tuple[str, HookFn]]) -> GemmaDecoder | None:
        """The decoder when it computes what TL would and nothing can observe TL's internals, else None."""
        cfg = model.cfg
        if cfg.original_architecture not in gemma3.ARCHITECTURES:
            return None
        check_window(model)  # before any fallback: TL's own forward fails on it too, with an untyped ValueError
        if cfg.n_devices != 1:
            return None
        if not all(_HOOKABLE.match(name) for name, _ in fwd_hooks):
            return None
        if any(hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks or hp._backward_pre_hooks
               for hp in model.hook_dict.values()):
            return None
        if torch_hook_reason(model) is not None:  # e.g. nl.capture on a block: only TL's forward calls it
            return None
        if cfg.attn_scores_soft_cap > 0 or cfg.use_attn_result or cfg.use_split_qkv_input or cfg.use_attn_in:
            return None
        if cfg.rotary_dim != cfg.d_head or cfg.rotary_adjacent_pairs or cfg.use_hook_tokens or cfg.load_in_4bit:
            return None
        if any(isinstance(p, DTensor) for p in model.parameters()):
            return None
        if type(model.embed) is not Embed or type(model.unembed) is not Unembed:
            return None
        if type(model.ln_final) is not GemmaRMSNorm:  # e.g. TL's own Gemma-3 model: its forward serves it
            return None
        if not all(_GemmaLayer.eligible(block) for block in model.blocks):
            return None
        if max_len > min(block.attn.rotary_cos.shape[0] for block in model.blocks):
            return None
        return cls(model, batch, max_len)

    def prefill(self, tokens: Int[Tensor, "batch pos"],
                fwd_hooks: list[tuple[str, HookFn]]) -> Float[Tensor, "batch d_vocab"]:
        local = None
        if self.window is not None:
            query = torch.arange(tokens.shape[1], device=tokens.device)
            local = (query[None, :] <= query[:, None]) & (query[None, :] > query[:, None] - self.window)
        resid = self._run(tokens, 0, local, dict(fwd_hooks))
        self.pos = tokens.shape[1]
        return _last_logits(self.model, resid)

    def step(self, ids: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        local = None
        if self.window is not None:
            local = (torch.arange(self.pos + 1, device=ids.device) > self.pos - self.window)[None, :]
        resid = self._run(ids[:, None], self.pos, local, {})
        self.pos += 1
        return _last_logits(self.model, resid)

    def _run(self, ids: Int[Tensor, "batch pos"], start: int, local_mask: Bool[Tensor, "query key"] | None,
             hooks: dict[str, HookFn]) -> Float[Tensor, "batch pos d_model"]:
        """Blocks over `ids` at cache positions [start, start + pos); global layers attend causally,
        local ones through `local_mask` (True = attend; None without local layers), which also holds the causal
        part."""
        x = self._hooked(hooks, "hook_embed", self.model.embed.W_E[ids])
        positions = torch.arange(start, start + ids.shape[1], device=ids.device).expand_as(ids)
        end = start + ids.shape[1]
        for i, layer in enumerate(self.layers):
            cos, sin = layer.cos[positions][:, None], layer.sin[positions][:, None]
            attn = _attention(layer, NO_BLOCK_HOOKS, _rms(x, layer.ln1, layer.eps, layer.norm_dtype), cos, sin,
                              local_mask if layer.local else None, self.keys[i], self.values[i], start, end, None)
            x = x + _rms(attn, layer.ln1_post, layer.eps, layer.norm_dtype)
            mlp = _mlp(layer, NO_BLOCK_HOOKS, _rms(x, layer.ln2, layer.eps, layer.norm_dtype))
            x = self._hooked(hooks, f"blocks.{i}.hook_resid_post",
                             x + _rms(mlp, layer.ln2_post, layer.eps, layer.norm_dtype))
        return x

    def _hooked(self, hooks: dict[str, HookFn], name: str, activation: Tensor) -> Tensor:
        if name not in hooks:
            return activation
        out = hooks[name](activation, self.model.hook_dict[name])
        return activation if out is None else out
