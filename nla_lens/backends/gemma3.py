"""Gemma-3 checkpoints, text-only or in the multimodal wrapper, for both backends.

The paper's Gemma-3 NLAs ship as `Gemma3ForCausalLM` or as `Gemma3ForConditionalGeneration`, whose
config nests the text model under `text_config` and whose weights carry a `language_model` prefix
beside a vision tower and projector. nla_lens serves the text model only and never reads a vision
tensor's bytes (the streaming reader seeks past them).

The `HookedTransformer` is configured as TransformerLens 3.9 configures its own Gemma-3 models
(`loading_from_pretrained`: sliding-window local layers between global ones, local and global
rotary bases with linear scaling on the global ones, q/k norms, norms before and after attention
and MLP, `gelu_pytorch_tanh`), and its weights follow TL's `convert_gemma_weights`: every RMSNorm
weight stored as ``1 + w`` (Gemma's norm multiplies by ``1 + w``), `W_E` pre-scaled by ``sqrt(d_model)``
in the model's dtype, and the tied unembedding the *unscaled* embedding. So `hook_embed` holds the
scaled embedding, exactly what HF's `Gemma3TextScaledWordEmbedding` returns, and the paper's embedding
replacement there equals overwriting HF's embedded row. Two deliberate differences from TL 3.9: each
RMSNorm is a `gemma3_norm.GemmaRMSNorm`, which holds ``1 + w`` in fp32 and multiplies before casting, as
HF does (TL's rounds twice more in bf16), and the attention scale is read from the checkpoint's
`query_pre_attn_scalar` (TL's Gemma-3-27B config omits it and would divide by sqrt(128), not sqrt(168)).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nla_lens.backends import hf_names
from nla_lens.errors import CheckpointError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
TEXT_ARCHITECTURE = "Gemma3ForCausalLM"

# HF Gemma-3 decoder-layer tensors -> TL block parameters (TL's convert_gemma_weights names).
BLOCK_NAMES = {
    "input_layernorm.weight": "ln1.w",
    "post_attention_layernorm.weight": "ln1_post.w",
    "pre_feedforward_layernorm.weight": "ln2.w",
    "post_feedforward_layernorm.weight": "ln2_post.w",
    **hf_names.ATTENTION_AND_MLP,
}
# The multimodal wrapper's text weights: `language_model.model.*` as transformers writes them (and
# Google's releases hold), `model.language_model.*` as transformers 5 names them in memory.
_WRAPPED_TEXT = re.compile(r"^(?:language_model\.model\.|model\.language_model\.)(.+)$")
_WRAPPED_HEAD = ("language_model.lm_head.weight", "lm_head.weight")
_ATTN_TYPES = {"sliding_attention": "local", "full_attention": "global"}


def is_gemma3(hf_config: Any) -> bool:
    return (getattr(hf_config, "architectures", None) or [None])[0] in ARCHITECTURES


def is_wrapper(hf_config: Any) -> bool:
    """Whether the folder holds the multimodal wrapper (text model under `text_config`)."""
    return getattr(hf_config, "text_config", None) is not None and is_gemma3(hf_config)


def text_config(hf_config: Any) -> Any:
    """The text model's config (the wrapper's `text_config`, else the config itself)."""
    if not is_wrapper(hf_config):
        return hf_config
    text = hf_config.text_config
    text.architectures = [TEXT_ARCHITECTURE]
    # The wrapper's own flag decides whether its lm_head is the embedding (HF ties on the wrapper).
    text.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", text.tie_word_embeddings))
    return text


def text_tensor_name(name: str) -> str | None:
    """A wrapper checkpoint's tensor name as the text-only model names it; None for vision tensors."""
    if name in _WRAPPED_HEAD:
        return "lm_head.weight"
    match = _WRAPPED_TEXT.match(name)
    return None if match is None else f"model.{match.group(1)}"


def hooked_config_fields(text: Any) -> dict[str, Any]:
    """The Gemma-3 fields of a `HookedTransformerConfig`, from the text config (TL 3.9's conventions)."""
    rope = getattr(text, "rope_parameters", None) or {}
    global_rope, local_rope = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    if local_rope.get("rope_type", "default") != "default" or global_rope.get("rope_type", "default") not in (
            "default", "linear"):
        raise CheckpointError(
            f"Gemma-3 rope {rope!r} is not supported: nla_lens serves default local and default or linear "
            "global rotary embeddings, as TransformerLens models Gemma-3"
        )
    layer_types = list(text.layer_types)
    if any(kind not in _ATTN_TYPES for kind in layer_types):
        raise CheckpointError(f"unknown Gemma-3 layer types {sorted(set(layer_types))}")
    return {
        "act_fn": text.hidden_activation,
        "rotary_base": float(global_rope.get("rope_theta", 1_000_000.0)),
        "rotary_base_local": float(local_rope.get("rope_theta", 10_000.0)),
        "rotary_scaling_factor": float(global_rope.get("factor", 1.0)) if global_rope.get(
            "rope_type") == "linear" else 1.0,
        "use_attn_scale": True,
        "attn_scale": math.sqrt(text.query_pre_attn_scalar),
        "use_normalization_before_and_after": True,
        "use_qk_norm": True,
        "use_local_attn": True,
        "window_size": int(text.sliding_window),
        "attn_types": [_ATTN_TYPES[kind] for kind in layer_types],
        "attn_scores_soft_cap": float(text.attn_logit_softcapping or -1.0),
        "output_logits_soft_cap": float(text.final_logit_softcapping or -1.0),
    }


@torch.no_grad()
def finish_hooked(model: HookedTransformer, d_model: int) -> None:
    """Gemma's weight conventions on freshly streamed HF tensors: each norm a `GemmaRMSNorm` holding HF's
    ``1.0 + w.float()`` in fp32, `W_E` scaled by ``sqrt(d_model)`` in the model's dtype (as HF's scaled
    embedding multiplies). Call after the tied unembedding copied the raw embedding."""
    from nla_lens.backends import gemma3_norm  # TransformerLens 3.x only

    gemma3_norm.use_hf_norms(model)
    embed = model.embed.W_E
    embed.mul_(torch.tensor(d_model ** 0.5, dtype=embed.dtype))


def load_text_model(folder: Path, hf_config: Any, *, dtype: torch.dtype, device: str | torch.device,
                    n_layers: int | None) -> nn.Module:
    """HF `Gemma3ForCausalLM` of a wrapper folder's text weights, streamed; vision tensors never read.

    With `n_layers`, only the first blocks (the AR backbone); the final norm and lm_head are then
    left as HF builds them and the bridge replaces both.
    """
    from transformers import Gemma3ForCausalLM
    from transformers.initialization import no_init_weights

    from nla_lens import loading

    text = text_config(hf_config)
    if n_layers is not None:
        loading.truncate_config(text, n_layers)
    with torch.device(device), no_init_weights():
        model = Gemma3ForCausalLM._from_config(text, dtype=dtype, attn_implementation="eager")
    params = dict(model.named_parameters())
    written: set[str] = set()
    buffer = bytearray(loading._CAST_CHUNK)
    for file in loading._weight_files(folder):
        for name, info, f in loading._safetensors_entries(file):
            target = _text_target(text_tensor_name(name), n_layers)
            if target is None or target not in params:
                continue
            param = params[target]
            if tuple(param.shape) != info.shape:
                raise loading.misshapen_weight(folder, name, info.shape, param.shape)
            loading._read_into(f, info, param.data, file, buffer)
            written.add(target)
    if text.tie_word_embeddings:
        model.tie_weights()
        written.add("lm_head.weight")
    ignored = {"model.norm.weight", "lm_head.weight"} if n_layers is not None else set()
    missing = sorted(set(params) - written - ignored)
    if missing:
        raise loading.missing_weights(folder, missing)
    return model.eval()


def _text_target(name: str | None, n_layers: int | None) -> str | None:
    """The text model's parameter for a checkpoint tensor, None for tensors a truncated model drops."""
    if name is None or n_layers is None:
        return name
    layer = re.match(r"^model\.layers\.(\d+)\.", name)
    return None if layer is not None and int(layer.group(1)) >= n_layers else name
