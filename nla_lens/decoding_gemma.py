"""A fast KV-cached decoder for TransformerLens Gemma-3 models (the `hooked` backend's `verbalize`).

It computes what TL's Gemma-3 blocks compute on the same parameters (norm weights stored as
``1 + w``, `W_E` pre-scaled by sqrt(d), see `nla_lens.backends.gemma3`): RMSNorm before and after
attention and MLP, q/k norms, rotary embeddings with one table per layer (local or global base),
keys beyond the sliding window masked on local layers, `gelu_pytorch_tanh` gating. What it saves is
TL's per-step overhead: TL caches keys before the rotary embedding and re-rotates the whole cache in
every layer at every step, repeats the K/V heads over the whole cache and rebuilds masks per layer;
here rotated keys live in a buffer allocated once and attention runs in torch's fused kernel.

Unlike `decoding.FastDecoder` it runs only when no hook is attached to the model: any hook sends the
call to TL's forward. The injection, passed explicitly, is applied at `hook_embed` or
`blocks.{i}.hook_resid_post` exactly where TL would apply it. It is not TL's to the bit: the fused
attention and norm round otherwise (measured on the tiny Gemma-3: logits within 1.5e-6 of TL's in
fp32, about one ulp, up to 0.035, in bf16), so in bf16 attaching a hook, even a no-op one, can flip
a greedy token where two logits nearly tie.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformer_lens import HookedTransformer
from transformer_lens.components import Embed, GatedMLP, GroupedQueryAttention, RMSNorm, Unembed

from nla_lens.backends import gemma3
from nla_lens.fast_hooks import torch_hook_reason
from nla_lens.injection import HookFn

_HOOKABLE = re.compile(r"^(hook_embed|blocks\.\d+\.hook_resid_post)$")


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """TL's RMSNorm: statistics in fp32 at least, the weight applied in the model's dtype."""
    if x.dtype in (torch.float32, torch.float64):
        return F.rms_norm(x, x.shape[-1:], eps=eps) * w
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype) * w


def _linear_rows(weight: Float[Tensor, "n d_model d_head"]) -> Tensor:
    """A TL `[n, d_model, d_head]` attention weight as HF's `[n * d_head, d_model]` (a free view here)."""
    return weight.permute(0, 2, 1).reshape(-1, weight.shape[1])


def _stacked(*weights: Tensor) -> tuple[Tensor, ...]:
    """`weights` as one `[sum of rows, in]` view where they are consecutive rows of one storage (the
    loader lays q/k/v out so), else as given: never a copy of the weights."""
    first, offset = weights[0], weights[0].storage_offset()
    for w in weights:
        if (not w.is_contiguous() or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or w.storage_offset() != offset):
            return weights
        offset += w.numel()
    return (first.as_strided((sum(w.shape[0] for w in weights), first.shape[1]), (first.shape[1], 1)),)


class _GemmaLayer:
    def __init__(self, block: torch.nn.Module) -> None:
        attn, mlp = block.attn, block.mlp
        self.n_heads, self.n_kv, self.d_head = attn.W_Q.shape[0], attn._W_K.shape[0], attn.W_Q.shape[2]
        self.qkv = _stacked(_linear_rows(attn.W_Q), _linear_rows(attn._W_K), _linear_rows(attn._W_V))
        self.w_o = attn.W_O.permute(2, 0, 1).reshape(attn.W_O.shape[2], -1)
        self.q_norm, self.k_norm = attn.q_norm.w, attn.k_norm.w
        self.scale = 1.0 / attn.attn_scale
        self.local = attn.attn_type == "local"
        self.cos, self.sin = attn.rotary_cos, attn.rotary_sin
        self.ln1, self.ln1_post, self.ln2, self.ln2_post = block.ln1.w, block.ln1_post.w, block.ln2.w, block.ln2_post.w
        self.eps = block.ln1.eps
        self.w_gate, self.w_in, self.w_out = mlp.W_gate.T, mlp.W_in.T, mlp.W_out.T

    @staticmethod
    def eligible(block: torch.nn.Module) -> bool:
        attn = block.attn
        norms = (block.ln1, getattr(block, "ln1_post", None), block.ln2, getattr(block, "ln2_post", None),
                 attn.q_norm, attn.k_norm)
        return (type(attn) is GroupedQueryAttention and type(block.mlp) is GatedMLP
                and all(type(norm) is RMSNorm for norm in norms)
                and not any(bool(b.any()) for b in (attn.b_Q, attn._b_K, attn._b_V, attn.b_O, block.mlp.b_in,
                                                     block.mlp.b_out)))


class GemmaDecoder:
    """`backends.Decoder` for TL Gemma-3 models: prefill, then one token per `step`."""

    fallback_reason = None  # built only when it serves the call: nothing falls back to TL's forward

    def __init__(self, model: HookedTransformer, batch: int, max_len: int) -> None:
        self.model = model
        self.layers = [_GemmaLayer(block) for block in model.blocks]
        self.window = model.cfg.window_size
        first = self.layers[0]
        shape = (len(self.layers), batch, first.n_kv, max_len, first.d_head)
        self.keys = torch.empty(shape, dtype=model.cfg.dtype, device=model.W_E.device)
        self.values = torch.empty_like(self.keys)
        self.pos = 0

    @classmethod
    def build(cls, model: HookedTransformer, batch: int, max_len: int,
              fwd_hooks: list[tuple[str, HookFn]]) -> GemmaDecoder | None:
        """The decoder when it computes what TL would and nothing can observe TL's internals, else None."""
        cfg = model.cfg
        if cfg.original_architecture not in gemma3.ARCHITECTURES or cfg.n_devices != 1:
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
        if type(model.embed) is not Embed or type(model.ln_final) is not RMSNorm or type(model.unembed) is not Unembed:
            return None
        if not all(_GemmaLayer.eligible(block) for block in model.blocks):
            return None
        if max_len > min(block.attn.rotary_cos.shape[0] for block in model.blocks):
            return None
        return cls(model, batch, max_len)

    def prefill(self, tokens: Int[Tensor, "batch pos"], fwd_hooks: list[tuple[str, HookFn]]) -> Tensor:
        query = torch.arange(tokens.shape[1], device=tokens.device)
        local = (query[None, :] <= query[:, None]) & (query[None, :] > query[:, None] - self.window)
        resid = self._run(tokens, 0, local, dict(fwd_hooks))
        self.pos = tokens.shape[1]
        return self._logits(resid[:, -1:])[:, -1]

    def step(self, ids: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        local = (torch.arange(self.pos + 1, device=ids.device) > self.pos - self.window)[None, :]
        resid = self._run(ids[:, None], self.pos, local, {})
        self.pos += 1
        return self._logits(resid)[:, -1]

    def _run(self, ids: Int[Tensor, "batch pos"], start: int, local_mask: Tensor,
             hooks: dict[str, HookFn]) -> Float[Tensor, "batch pos d_model"]:
        """Blocks over `ids` at cache positions [start, start + pos); global layers attend causally,
        local ones through `local_mask` (True = attend), which also holds the causal part."""
        x = self._hooked(hooks, "hook_embed", self.model.embed.W_E[ids])
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        for i, layer in enumerate(self.layers):
            mask = local_mask if layer.local else None
            attn = self._attention(layer, _rms(x, layer.ln1, layer.eps), positions, mask, i, start)
            x = x + _rms(attn, layer.ln1_post, layer.eps)
            h = _rms(x, layer.ln2, layer.eps)
            mlp = F.linear(F.gelu(F.linear(h, layer.w_gate), approximate="tanh") * F.linear(h, layer.w_in),
                           layer.w_out)
            x = self._hooked(hooks, f"blocks.{i}.hook_resid_post", x + _rms(mlp, layer.ln2_post, layer.eps))
        return x

    def _hooked(self, hooks: dict[str, HookFn], name: str, activation: Tensor) -> Tensor:
        if name not in hooks:
            return activation
        out = hooks[name](activation, self.model.hook_dict[name])
        return activation if out is None else out

    def _attention(self, layer: _GemmaLayer, h: Tensor, positions: Tensor, mask: Tensor | None, i: int,
                   start: int) -> Tensor:
        batch, n_pos = h.shape[:2]
        end = start + n_pos
        n_heads, n_kv, d_head = layer.n_heads, layer.n_kv, layer.d_head
        qkv = F.linear(h, layer.qkv[0]) if len(layer.qkv) == 1 else torch.cat([F.linear(h, w) for w in layer.qkv], -1)
        qkv = qkv.view(batch, n_pos, n_heads + 2 * n_kv, d_head)
        q = _rms(qkv[:, :, :n_heads], layer.q_norm, layer.eps).transpose(1, 2)
        k = _rms(qkv[:, :, n_heads:n_heads + n_kv], layer.k_norm, layer.eps).transpose(1, 2)
        v = qkv[:, :, n_heads + n_kv:].transpose(1, 2)
        cos, sin = layer.cos[positions], layer.sin[positions]  # TL's (GPT-NeoX style) rotary embedding
        half = d_head // 2
        q = q * cos + torch.cat([-q[..., half:], q[..., :half]], dim=-1) * sin
        k = k * cos + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin
        self.keys[i, :, :, start:end] = k
        self.values[i, :, :, start:end] = v
        # Query head j reads kv head j // (n_heads / n_kv), as TL's repeat_interleave does.
        z = F.scaled_dot_product_attention(q, self.keys[i, :, :, :end], self.values[i, :, :, :end], attn_mask=mask,
                                           is_causal=mask is None and n_pos > 1, scale=layer.scale, enable_gqa=True)
        return F.linear(z.transpose(1, 2).reshape(batch, n_pos, -1), layer.w_o)

    def _logits(self, resid: Float[Tensor, "batch 1 d_model"]) -> Float[Tensor, "batch 1 vocab"]:
        model = self.model
        logits = F.linear(_rms(resid, model.ln_final.w, model.ln_final.eps), model.W_U.T, model.unembed.b_U)
        cap = model.cfg.output_logits_soft_cap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits
