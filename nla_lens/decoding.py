"""Fast paths for the AV and AR forwards, with TransformerLens's own forward as the fallback.

`verbalize` decodes through one of two decoders sharing one interface (`prefill(tokens,
fwd_hooks)` then `step(ids)`, each returning the logits at the last position only, as HF
`generate` computes them, so a prefill never holds a `[batch, pos, d_vocab]` tensor; a hook on the
final norm or the unembed still sees every prompt position, as under TL's forward):

* `HookedDecoder` runs every step through `HookedTransformer.forward` with TL's KV cache, so every
  hook fires on every step. It serves any model and any hooks.
* `FastDecoder` computes what TL's Qwen / Llama blocks compute, on the same parameters, without
  TL's per-step overheads: TL caches keys before the rotary embedding and so re-rotates the whole
  cache in every layer at every step, and rebuilds masks per layer. Here keys are cached rotated
  in a buffer allocated once and q/k/v run as one matmul (the loader lays them out for that).
  Norms and attention keep TL's op order and operand layouts, so the activations and logits of a
  prefill, of every decode step and of the AR are TL's to the bit (measured on the CPU in fp32, bf16
  and fp16, one row or several). See `_attend`, `_attend_step` and `_kv_cache`.

`FastBlocks` (the block stack behind `FastDecoder`) also serves `reconstruct`. Both fast paths
honour the hooks attached to the model (and the injection, installed for the prefill): at each
hook point `nla_lens.fast_hooks` covers, they materialise the activation as TL does and call the
`HookPoint`. A hook they cannot honour sends the call to TL's forward; the decoder's
`fallback_reason` (and a debug log line) says why.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.components import Embed, GatedMLP, GroupedQueryAttention, RMSNorm, TransformerBlock, Unembed
from transformer_lens.components.attention import Attention

from nla_lens import backends
from nla_lens.errors import BackendError
from nla_lens.fast_hooks import NO_BLOCK_HOOKS, BlockHooks, HookPlan
from nla_lens.injection import HookFn

logger = logging.getLogger(__name__)

# cfg values under which a TL block computes exactly what `FastDecoder` computes (the loader's
# Qwen3 / Qwen2 / Llama configs); the rotary frequencies are read from TL's own sin/cos buffers.
_FAST_CFG = {
    "positional_embedding_type": "rotary", "rotary_adjacent_pairs": False, "normalization_type": "RMS",
    "final_rms": True, "gated_mlp": True, "act_fn": "silu", "n_devices": 1, "load_in_4bit": False,
    "attention_dir": "causal", "attn_only": False, "parallel_attn_mlp": False, "post_embedding_ln": False,
    "use_normalization_before_and_after": False, "use_logn_attn": False, "use_dynamic_ntk_rope": False,
    "clip_qkv": None, "use_attention_sinks": False, "attn_types": None,
    "ungroup_grouped_query_attention": False,  # else TL's hook_k / hook_v hold n_heads heads
    # else TL sums per-head results (hook_result), which rounds otherwise: bf16 logits moved by 0.08, greedy tokens too
    "use_attn_result": False,
}
_FAST_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
_NO_FAST_PATH = ("no fast path for this model (Qwen2 / Qwen3 / Llama blocks in the loader's layout, within "
                 "TL's rotary tables, use_attn_result off)")


def decoder_for(model: HookedTransformer, batch: int, max_len: int,
                fwd_hooks: list[tuple[str, HookFn]]) -> HookedDecoder | FastDecoder:
    """The fast decoder when it computes what TL would and honours every hook attached."""
    reason = HookPlan.of(model, extra=[name for name, _ in fwd_hooks]).fallback_reason
    fast = FastDecoder.build(model, batch, max_len, HookPlan.of(model)) if reason is None else None
    if fast is not None:
        return fast
    reason = reason or _NO_FAST_PATH
    logger.debug("verbalize runs TransformerLens's forward at every step: %s", reason)
    return HookedDecoder(model, batch, reason)


class ARForward:
    """`model(tokens, attention_mask=...)[:, -1]` for an AR model (no final norm, no unembed), set up once
    per `reconstruct` call: the attached hooks and the fast blocks are read here, not per batch (reading
    them syncs a GPU several times per block).

    `fallback_reason` says why the call runs TL's forward (None: the fast path serves every batch within TL's
    rotary tables, which span n_ctx; `reconstruct` refuses a longer prompt before it runs).
    """

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model
        self.hooks = HookPlan.of(model)
        self.blocks, self.fallback_reason = _ar_blocks(model, self.hooks)

    def __call__(self, tokens: Int[Tensor, "batch pos"],
                 attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_model"]:
        batch, n_pos = tokens.shape
        blocks = self.blocks
        if blocks is None or n_pos > blocks.max_len:
            logger.debug("reconstruct runs TransformerLens's forward: %s", self.fallback_reason or _NO_FAST_PATH)
            return self.model(tokens, attention_mask=attention_mask)[:, -1]
        keys = torch.empty(1, batch, blocks.n_kv, n_pos, blocks.d_head, dtype=self.model.cfg.dtype,
                           device=tokens.device)
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # as TL's get_offset_position_ids
        # Pad queries see themselves only, so no softmax row is empty (an empty row would be NaN).
        eye = torch.eye(n_pos, dtype=torch.bool, device=tokens.device)
        mask = (eye.logical_not().tril() & attention_mask.bool()[:, None, None, :]) | eye
        # Under hooks, pad positions also hold what TL computes there: a fully masked row, z = 0.
        pad_queries = (attention_mask == 0)[:, None, :, None] if self.hooks.any_hooked else None
        return blocks.run(tokens, positions, mask, keys, torch.empty_like(keys), start=0, shared_cache=True,
                          hooks=self.hooks, pad_queries=pad_queries)[:, -1]


def _ar_blocks(model: HookedTransformer, hooks: HookPlan) -> tuple[FastBlocks | None, str | None]:
    if hooks.fallback_reason is not None:
        return None, hooks.fallback_reason
    blocks = FastBlocks.build(model) if _is_identity(model.ln_final) and _is_identity(model.unembed) else None
    return blocks, None if blocks is not None else _NO_FAST_PATH


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal tables; the loader shares one tensor between layers, which needs no comparison (a GPU sync)."""
    return a is b or torch.equal(a, b)


def _is_identity(module: nn.Module) -> bool:
    return type(module) is nn.Identity


def _last_logits(model: HookedTransformer, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch vocab"]:
    logits = model.unembed(model.ln_final(resid[:, -1:]))[:, -1]
    cap = model.cfg.output_logits_soft_cap
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


class HookedDecoder:
    """Each step is a `HookedTransformer.forward` with TL's KV cache: every hook fires every step.

    `fallback_reason` says why this call is not served by `FastDecoder`.
    """

    def __init__(self, model: HookedTransformer, batch: int, fallback_reason: str) -> None:
        self.model = model
        self.fallback_reason = fallback_reason
        self.cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.W_E.device, batch)
        self.step_mask = torch.ones(batch, 1, dtype=torch.long, device=model.W_E.device)

    def prefill(self, tokens: Int[Tensor, "batch pos"],
                fwd_hooks: list[tuple[str, HookFn]]) -> Float[Tensor, "batch d_vocab"]:
        with backends.hooks(self.model, fwd_hooks):
            if _head_hooked(self.model):  # TL's forward shows such hooks every position, so the prefill does too
                return self.model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=self.cache)[:, -1]
            resid = self.model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=self.cache,
                               stop_at_layer=self.model.cfg.n_layers)
            return _last_logits(self.model, resid)

    def step(self, ids: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        return self.model(ids[:, None], attention_mask=self.step_mask, past_kv_cache=self.cache)[:, -1]


def _head_hooked(model: HookedTransformer) -> bool:
    """A hook (a TL hook point's or a torch hook) on the final norm or the unembed, which `_last_logits` runs on
    the last position only."""
    return any(module._forward_hooks or module._forward_pre_hooks
               for head in (model.ln_final, model.unembed) for module in head.modules())


class _Layer:
    """One block's weights as HF-layout `[out, in]` views (free: the loader stores them that way).

    q/k/v run as one matmul when they are consecutive rows of one storage, as the loader lays them
    out. (Gate and up stay two: on CPU one wide matmul measured slower than two.)
    The block's norms and MLP are the classes `FastBlocks.build` / `_GemmaLayer.eligible` checked.
    """

    def __init__(self, block: TransformerBlock) -> None:
        attn, mlp = block.attn, cast(GatedMLP, block.mlp)
        ln1, ln2 = cast(RMSNorm, block.ln1), cast(RMSNorm, block.ln2)
        if isinstance(attn, GroupedQueryAttention):
            w_k, w_v, b_k, b_v = attn._W_K, attn._W_V, attn._b_K, attn._b_V
        else:
            w_k, w_v, b_k, b_v = attn.W_K, attn.W_V, attn.b_K, attn.b_V
        self.n_heads, self.n_kv, self.d_head = attn.W_Q.shape[0], w_k.shape[0], attn.W_Q.shape[2]
        self.qkv = _rows(_as_linear(attn.W_Q), _as_linear(w_k), _as_linear(w_v))
        b_qkv = torch.cat([attn.b_Q.reshape(-1), b_k.reshape(-1), b_v.reshape(-1)])
        self.b_qkv = b_qkv if bool(b_qkv.any()) else None  # only Qwen2 has q/k/v biases
        self.w_o = attn.W_O.permute(2, 0, 1).reshape(attn.W_O.shape[2], -1)
        self.b_o = attn.b_O
        self.qk_norm = None  # q and k are normalised as one [n_heads + n_kv, d_head] block
        if attn.q_norm is not None and attn.k_norm is not None:  # TL builds both or neither
            self.qk_norm = torch.cat([attn.q_norm.w.expand(self.n_heads, -1), attn.k_norm.w.expand(self.n_kv, -1)])
        self.attn_scale = attn.attn_scale
        self.cos, self.sin = attn.rotary_cos, attn.rotary_sin
        self.ln1, self.ln2, self.eps = ln1.w, ln2.w, ln1.eps
        self.norm_dtype: torch.dtype | None = None  # `_rms`'s: None, TL's RMSNorm (a Gemma layer casts after * w)
        self.w_gate, self.w_in, self.act = mlp.W_gate.T, mlp.W_in.T, mlp.act_fn  # TL's own (Gemma: tanh GELU)
        self.b_in = mlp.b_in if bool(mlp.b_in.any()) else None  # TL adds it after the gating
        self.w_out, self.b_out = mlp.W_out.T, mlp.b_out

    @staticmethod
    def in_hf_layout(block: TransformerBlock) -> bool:
        """Whether every `[out, in]` view above is free (else building them would copy weights)."""
        attn, mlp = block.attn, cast(GatedMLP, block.mlp)
        if isinstance(attn, GroupedQueryAttention):
            qkv = (attn.W_Q, attn._W_K, attn._W_V)
        else:
            qkv = (attn.W_Q, attn.W_K, attn.W_V)
        return (all(w.permute(0, 2, 1).is_contiguous() for w in qkv) and attn.W_O.permute(2, 0, 1).is_contiguous()
                and all(w.T.is_contiguous() for w in (mlp.W_gate, mlp.W_in, mlp.W_out)))


def _as_linear(w: Float[Tensor, "n d_model d_head"]) -> Float[Tensor, "n_d_head d_model"]:
    return w.permute(0, 2, 1).reshape(-1, w.shape[1])


def _rows(*weights: Tensor) -> tuple[Tensor, ...]:
    """`weights` as one `[sum of rows, in]` view when they are consecutive in memory, else as given."""
    first = weights[0]
    offset = first.storage_offset()
    for w in weights:
        if (not w.is_contiguous() or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or w.storage_offset() != offset or w.shape[1] != first.shape[1]):
            return weights
        offset += w.numel()
    return (first.as_strided((sum(w.shape[0] for w in weights), first.shape[1]), (first.shape[1], 1)),)


def _linear(x: Tensor, weights: tuple[Tensor, ...], bias: Tensor | None = None) -> Tensor:
    """The bias goes into `F.linear`, as in TL's `simple_attn_linear`: in bf16 / fp16 a fused add rounds once."""
    if len(weights) == 1:
        return F.linear(x, weights[0], bias)
    biases = (None,) * len(weights) if bias is None else bias.split([w.shape[0] for w in weights])
    return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)


class FastBlocks:
    """The block stack of an eligible model, run with TL's block arithmetic on its parameters."""

    def __init__(self, model: HookedTransformer, layers: list[_Layer]) -> None:
        self.model = model
        self.layers = layers
        self.n_kv, self.d_head = layers[0].n_kv, layers[0].d_head
        self.max_len = min(layer.cos.shape[0] for layer in layers)  # positions TL's rotary buffers cover
        self.shared_rotary = all(_same(layer.cos, layers[0].cos) and _same(layer.sin, layers[0].sin)
                                 for layer in layers)

    @classmethod
    def build(cls, model: HookedTransformer) -> FastBlocks | None:
        cfg = model.cfg
        if cfg.original_architecture not in _FAST_ARCHITECTURES:
            return None
        if any(getattr(cfg, key) != value for key, value in _FAST_CFG.items()):
            return None
        if cfg.rotary_dim != cfg.d_head or cfg.attn_scores_soft_cap > 0 or cfg.use_hook_tokens:
            return None
        if any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP shards are whole only inside TL's forward
            return None
        if type(model.embed) is not Embed:
            return None
        for block in model.blocks:
            if not (type(block.attn) in (Attention, GroupedQueryAttention) and type(block.mlp) is GatedMLP
                    and type(block.ln1) is RMSNorm and type(block.ln2) is RMSNorm):
                return None
        if not all(_Layer.in_hf_layout(block) for block in model.blocks):
            return None
        return cls(model, [_Layer(block) for block in model.blocks])

    def run(self, ids: Int[Tensor, "batch pos"], positions: Int[Tensor, "batch pos"],
            mask: Bool[Tensor, "batch 1 pos kv_pos"] | None, keys: Float[Tensor, "layers batch n_kv max_len d_head"],
            values: Float[Tensor, "layers batch n_kv max_len d_head"], *, start: int, shared_cache: bool = False,
            hooks: HookPlan | None = None,
            pad_queries: Bool[Tensor, "batch 1 pos 1"] | None = None) -> Float[Tensor, "batch pos d_model"]:
        """Blocks over `ids` at cache positions [start, start + pos); keys / values are
        `[layers, batch, n_kv, max_len, d_head]` (one layer reused by all when `shared_cache`).

        `mask` (True = attend) of `[batch, 1, pos, start + pos]`, or None for plain causal
        attention (start = 0) or for one new token attending to the whole cache. Every block computes
        every position, as TL does, though only the last one's residual is read: a last block run on the
        last position alone multiplies other shapes, which round differently (the output would not be TL's).
        `hooks` names the hooked points to call; `pad_queries` (True = pad) zeroes those rows of z.
        """
        x = self.model.embed.W_E[ids]
        if hooks is not None and hooks.embed is not None:
            x = hooks.embed(x)
        block_hooks = hooks.blocks if hooks is not None else (NO_BLOCK_HOOKS,) * len(self.layers)
        end = start + ids.shape[1]
        for i, (layer, hook) in enumerate(zip(self.layers, block_hooks, strict=True)):
            cache = 0 if shared_cache else i
            if i == 0 or not self.shared_rotary:  # TL keeps one identical table per layer
                cos, sin = layer.cos[positions][:, None], layer.sin[positions][:, None]
            if hook.resid_pre is not None:
                x = hook.resid_pre(x)
            attn_out = _attention(layer, hook, _rms(x, layer.ln1, layer.eps), cos, sin, mask,
                                  keys[cache], values[cache], start, end, pad_queries)
            if hook.attn_out is not None:
                attn_out = hook.attn_out(attn_out)
            x = x + attn_out
            if hook.resid_mid is not None:
                x = hook.resid_mid(x)
            x = x + _mlp(layer, hook, _rms(x, layer.ln2, layer.eps))
            if hook.resid_post is not None:
                x = hook.resid_post(x)
        return x


def _attention(layer: _Layer, hook: BlockHooks, h: Float[Tensor, "batch pos d_model"], cos: Tensor, sin: Tensor,
               mask: Tensor | None, keys: Tensor, values: Tensor, start: int, end: int,
               pad_queries: Tensor | None) -> Float[Tensor, "batch pos d_model"]:
    """TL's attention of one block over cache positions [start, end), writing the new keys and values.

    `mask` as in `FastBlocks.run`; a decode step (one query, start > 0) may also have one, e.g. a
    sliding window, which `_attend_step` applies.
    """
    batch, n_pos, n_heads, n_kv = h.shape[0], h.shape[1], layer.n_heads, layer.n_kv
    qkv = _linear(h, layer.qkv, layer.b_qkv).view(batch, n_pos, n_heads + 2 * n_kv, layer.d_head)
    if hook.q is not None or hook.k is not None or hook.v is not None:
        qkv = _hooked_qkv(hook, qkv, n_heads, n_kv)
    # [batch, heads, pos, d_head] throughout: the layout where the rotary broadcast is cheap.
    qkv = qkv.transpose(1, 2)
    qk = qkv[:, :n_heads + n_kv]
    if layer.qk_norm is not None:
        qk = _rms(qk, layer.qk_norm[:, None], layer.eps, layer.norm_dtype)
    half = layer.d_head // 2  # TL's (GPT-NeoX style) rotary embedding
    qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
    keys[:, :, start:end] = qk[:, n_heads:]
    values[:, :, start:end] = qkv[:, n_heads + n_kv:]
    queries = qk[:, :n_heads]
    if queries.shape[2] == 1 and (mask is None or start > 0):
        z = _attend_step(queries, keys[:, :, :end], values[:, :, :end], layer.attn_scale, mask)
    else:
        z = _attend(queries, keys[:, :, :end], values[:, :, :end], mask, start, layer.attn_scale)
    if pad_queries is not None:
        z = z.masked_fill(pad_queries, 0.0)
    z = z.transpose(1, 2)  # [batch, pos, heads, d_head]: TL's hook_z
    if hook.z is not None:
        z = hook.z(z).to(layer.w_o.dtype)  # TL casts z to W_O's dtype, whatever dtype a hook returned
    return F.linear(z.reshape(batch, z.shape[1], -1), layer.w_o, layer.b_o)


def _attend(queries: Float[Tensor, "batch heads pos d_head"], keys: Float[Tensor, "batch kv_heads kv_pos d_head"],
            values: Float[Tensor, "batch kv_heads kv_pos d_head"], mask: Tensor | None, start: int,
            attn_scale: float) -> Float[Tensor, "batch heads pos d_head"]:
    """TL's attention in TL's op order (q @ k^T / attn_scale, masked to -inf, softmax, pattern @ v), so
    fp32 z matches TL's to the bit; SDPA scales q first and fuses the softmax (other roundings).

    Each product gets the operands TL's gets, in TL's memory layout: q as a `[batch, pos, heads, d_head]`
    tensor read head-first, k and v repeated per query head (TL's repeat_interleave) in the same layout.
    torch's CPU matmul takes another kernel, which rounds differently, by layout: with a batch of one it
    multiplies these views in place where a larger batch copies them. Cheap for a prefill or an AR
    forward; decode steps use `_attend_step`, which reads the cache in place.
    """
    n_pos, group = queries.shape[2], queries.shape[1] // keys.shape[1]
    q = queries.transpose(1, 2).contiguous().transpose(1, 2)
    k = keys.transpose(1, 2).repeat_interleave(group, dim=2).permute(0, 2, 3, 1)
    v = values.transpose(1, 2).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = q @ k / attn_scale
    if mask is None and n_pos > 1:  # causal over the cache positions [0, start + pos)
        mask = torch.ones(n_pos, scores.shape[-1], dtype=torch.bool, device=scores.device).tril(start)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _attend_step(queries: Float[Tensor, "batch heads 1 d_head"], keys: Float[Tensor, "batch kv_heads kv_pos d_head"],
                 values: Float[Tensor, "batch kv_heads kv_pos d_head"], attn_scale: float,
                 mask: Tensor | None = None) -> Float[Tensor, "batch heads 1 d_head"]:
    """A decode step's attention in TL's op order without copying the cache per query head.

    One batched product per position within a kv group (query heads j, j + group, ... share kv
    head j // group), each a one-row product per head as in TL, so z is TL's to the bit while the
    cache is read in place (`_attend`'s broadcast, like TL's repeat_interleave, copies it). The
    products write into `[batch, heads, ...]` buffers, where TL's land: torch's CPU kernel for a
    pos-major key matrix rounds by where its output starts. `keys` come from `_kv_cache`, which lays
    them out as TL's product reads them. `mask` (True = attend, broadcast over `[batch, heads, 1,
    kv_pos]`) masks scores to -inf as TL does: keys outside a sliding window stay in the product.
    """
    batch, n_heads, _, d_head = queries.shape
    n_kv, n_keys = keys.shape[1], keys.shape[2]
    group = n_heads // n_kv
    grouped = queries.view(batch, n_kv, group, 1, d_head)
    keys_t = keys.transpose(-1, -2)
    scores = queries.new_empty(batch, n_kv, group, 1, n_keys)
    for j in range(group):
        torch.matmul(grouped[:, :, j], keys_t, out=scores[:, :, j])
    scores = scores.view(batch, n_heads, 1, n_keys) / attn_scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    pattern = scores.softmax(dim=-1).view(batch, n_kv, group, 1, n_keys)
    z = torch.empty_like(grouped)
    for j in range(group):
        torch.matmul(pattern[:, :, j], values, out=z[:, :, j])
    return z.view(batch, n_heads, 1, d_head)


def _kv_cache(n_layers: int, batch: int, n_kv: int, max_len: int, d_head: int, dtype: torch.dtype,
              device: torch.device) -> tuple[Tensor, Tensor]:
    """Empty keys and values, each `[layers, batch, n_kv, max_len, d_head]`, the keys laid out as TL's
    decode step multiplies them: its `q @ k^T` reads one row's keys in place (d_head contiguous) but
    copies a larger batch's (pos contiguous), and torch's CPU kernels round the two differently."""
    values = torch.empty(n_layers, batch, n_kv, max_len, d_head, dtype=dtype, device=device)
    if batch == 1:
        return torch.empty_like(values), values
    return torch.empty(n_layers, batch, n_kv, d_head, max_len, dtype=dtype, device=device).transpose(-1, -2), values


def _hooked_qkv(hook: BlockHooks, qkv: Float[Tensor, "batch pos qkv_heads d_head"], n_heads: int,
                n_kv: int) -> Float[Tensor, "batch pos qkv_heads d_head"]:
    """TL's hook_q / hook_k / hook_v: `[batch, pos, heads, d_head]` each, before the q/k norms and rotary."""
    q, k, v = (t.contiguous() for t in qkv.split([n_heads, n_kv, n_kv], dim=2))
    if hook.q is not None:
        q = hook.q(q)
    if hook.k is not None:
        k = hook.k(k)
    if hook.v is not None:
        v = hook.v(v)
    return torch.cat([q, k, v], dim=2)


def _mlp(layer: _Layer, hook: BlockHooks, h: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """TL's `GatedMLP` (b_in added after the gating), with its hook points."""
    pre = F.linear(h, layer.w_gate)
    if hook.pre is not None:
        pre = hook.pre(pre)
    pre_linear = F.linear(h, layer.w_in)
    if hook.pre_linear is not None:
        pre_linear = hook.pre_linear(pre_linear)
    post = layer.act(pre) * pre_linear
    if layer.b_in is not None:
        post = post + layer.b_in
    if hook.post is not None:
        post = hook.post(post)
    out = F.linear(post, layer.w_out, layer.b_out)
    return out if hook.mlp_out is None else hook.mlp_out(out)


class FastDecoder:
    """`FastBlocks` with a preallocated cache of rotated keys, the final norm and the unembed.

    The hooked points are read once per call: for the prefill with its `fwd_hooks` (the injection)
    installed, and for the decode steps (`step_hooks`) before it.
    """

    fallback_reason = None

    def __init__(self, blocks: FastBlocks, batch: int, max_len: int, step_hooks: HookPlan) -> None:
        self.blocks = blocks
        self.model = model = blocks.model
        self.final_norm = cast(RMSNorm, model.ln_final)  # the class `build` checked
        self.keys, self.values = _kv_cache(len(blocks.layers), batch, blocks.n_kv, max_len, blocks.d_head,
                                           model.cfg.dtype, model.W_E.device)
        self.step_hooks = step_hooks
        self.pos = 0

    @classmethod
    def build(cls, model: HookedTransformer, batch: int, max_len: int, step_hooks: HookPlan) -> FastDecoder | None:
        blocks = FastBlocks.build(model)
        if blocks is None or model.cfg.output_logits_soft_cap > 0:
            return None
        if type(model.ln_final) is not RMSNorm or type(model.unembed) is not Unembed:
            return None
        if not model.W_U.T.is_contiguous() or max_len > blocks.max_len:
            return None
        return cls(blocks, batch, max_len, step_hooks)

    def prefill(self, tokens: Int[Tensor, "batch pos"],
                fwd_hooks: list[tuple[str, HookFn]]) -> Float[Tensor, "batch d_vocab"]:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        with backends.hooks(self.model, fwd_hooks):
            hooks = HookPlan.of(self.model)
            if hooks.fallback_reason is not None:
                raise BackendError(f"this decoder was built for other prefill hooks ({hooks.fallback_reason}); "
                                   "pass the prefill's fwd_hooks to decoder_for")
            resid = self.blocks.run(tokens, positions, None, self.keys, self.values, start=0, hooks=hooks)
        self.pos = tokens.shape[1]
        return self._logits(resid[:, -1:])[:, -1]

    def step(self, ids: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        positions = torch.full((len(ids), 1), self.pos, device=ids.device)
        resid = self.blocks.run(ids[:, None], positions, None, self.keys, self.values, start=self.pos,
                                hooks=self.step_hooks)
        self.pos += 1
        return self._logits(resid)[:, -1]

    def _logits(self, resid: Float[Tensor, "batch 1 d_model"]) -> Float[Tensor, "batch 1 vocab"]:
        model, norm = self.model, self.final_norm
        return F.linear(_rms(resid, norm.w, norm.eps), model.W_U.T, model.unembed.b_U)


def _rms(x: Tensor, w: Tensor, eps: float, dtype: torch.dtype | None = None) -> Tensor:
    """TL's `RMSNorm` op for op (x / sqrt(mean(x^2) + eps), then * w; statistics in fp32 at least), so
    fp32 activations match TL's to the bit (torch's fused `rms_norm` multiplies by rsqrt: another rounding). The
    result is in the model's dtype, as TL's is: a hook that widened the residual (a float32 steering vector added
    to a bf16 one) leaves the matmuls after it in the model's dtype. Without `dtype`, TL's `RMSNorm`: cast to the
    weights' dtype (TL's cfg.dtype), then * w. With it, `gemma3_norm.GemmaRMSNorm` (HF's Gemma arithmetic): * w
    (fp32) first, then one cast to `dtype`."""
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
    normalized = wide / (wide.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return normalized.to(w.dtype) * w if dtype is None else (normalized * w).to(dtype)
