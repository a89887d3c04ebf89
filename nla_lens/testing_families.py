"""Tiny random Gemma-3, Llama and Qwen2 NLA checkpoints: the released families beside nanoNLA's Qwen3.

Like `nla_lens.testing`, everything is built locally and saved as real HF folders with sidecars in
the paper's dialect. The Gemma and Llama tokenizers add a BOS with their special tokens and their chat
templates start with it, as Gemma-3's and Llama-3's do; the Qwen2 model (Qwen2.5's architecture: q/k/v
biases, GQA) uses the BOS-less Qwen tokenizer of `nla_lens.testing`. The Llama model has Llama-3.3's
`llama3` rotary scaling. The Gemma-3 model exercises what TransformerLens
models for it: local layers with a sliding window shorter than the AV prompt, local and global
rotary bases with linear scaling on the global layers, q/k norms, pre- and post-norms,
`query_pre_attn_scalar` != head_dim (as in Gemma-3-27B), the sqrt(d) embedding scale and a tied
unembedding. The multimodal layout wraps it with a tiny SigLIP tower.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from nla_lens import testing
from nla_lens.sidecar import dump_meta
from nla_lens.testing import AR_TEMPLATE
from nla_lens.testing import paper_sidecar as _paper_sidecar

GEMMA_MARKER = "㈜"  # U+321C, the paper's Gemma-3 marker
LLAMA_MARKER = "㎡"  # the paper's Llama-3.3 marker: '㈎' is three tokens in Llama-3's tokenizer
# Long enough that the AV prompt outgrows the sliding window (SLIDING_WINDOW tokens) several times.
AV_TEMPLATE = "Here is the vector:\n\n<concept>{injection_char}</concept>\n\nPlease provide an explanation."
SLIDING_WINDOW = 6
# Llama-3.3-70B's rope block, its original context shrunk from 8192 to 64 so that, at head_dim 16, NTK-by-parts
# leaves the highest frequency alone, interpolates the next (its wavelength, 32.5, lies between 64 / 4 and 64 / 1:
# the smoothed band, 6 of Llama-3.3's 64 frequencies) and divides the rest by 8, each turned by radians within
# the AV prompt.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# Gemma-3's rotary bases: linear scaling on the global layers, none on the local ones.
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>user\n{{ m['content'] }}<end_of_turn>\n"
              "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>user<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_CORPUS = [
    AV_TEMPLATE, AR_TEMPLATE, "<explanation>\n", "\n</explanation>",
    "The cat sat on the mat. A dog ran in the park. Words about the weather and the sea.",
    "</text> </summary> </concept> </explanation> <text> <summary> <concept> <explanation>",
]


def build_bos_tokenizer(*, marker: str, specials: list[str], bos: str, eos: str, pad: str,
                        chat_template: str, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose special tokens put `bos` first, with a chat template that starts with it."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_CORPUS * 20, trainer)
    core.add_tokens([AddedToken(marker, normalized=False)])
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                        special_tokens=[(bos, core.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=chat_template)


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    return build_bos_tokenizer(marker=GEMMA_MARKER, specials=GEMMA_SPECIALS, bos="<bos>", eos="<end_of_turn>",
                               pad="<pad>", chat_template=GEMMA_CHAT)


def llama_tokenizer() -> PreTrainedTokenizerFast:
    return build_bos_tokenizer(marker=LLAMA_MARKER, specials=LLAMA_SPECIALS, bos="<|begin_of_text|>",
                               eos="<|eot_id|>", pad="<|end_of_text|>", chat_template=LLAMA_CHAT)


def token_facts(tokenizer: PreTrainedTokenizerFast, marker: str) -> dict:
    """`nla_lens.testing.token_facts` for these families' AV template and `marker`."""
    return testing.token_facts(tokenizer, AV_TEMPLATE, marker)


def gemma3_text_config(tokenizer: PreTrainedTokenizerFast, *, n_layers: int = 4, d_model: int = 64,
                       sliding_window: int = SLIDING_WINDOW) -> Gemma3TextConfig:
    kinds = ["sliding_attention", "sliding_attention", "full_attention"]
    return Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=d_model // 4,
        query_pre_attn_scalar=3 * d_model // 8, sliding_window=sliding_window,
        layer_types=[kinds[i % 3] for i in range(n_layers)], rope_parameters=copy.deepcopy(GEMMA3_ROPE),
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _randomize(model: PreTrainedModel, *, norm_offset: float) -> None:
    """Non-trivial norm weights; small writes into the residual stream, so fp32 rounding stays near 1e-6."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and "vision" not in name:
                param.copy_(norm_offset + 0.3 * torch.randn_like(param))
            elif name.endswith(("embed_tokens.weight", "o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, 0.05)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "up_proj.weight",
                                "gate_proj.weight")):
                param.normal_(0.0, 0.2)


def build_gemma3(tokenizer: PreTrainedTokenizerFast, *, n_layers: int = 4, d_model: int = 64,
                 multimodal: bool = False, seed: int = 0) -> Gemma3ForCausalLM | Gemma3ForConditionalGeneration:
    """A random Gemma-3 text model, or the same text weights inside the multimodal wrapper."""
    torch.manual_seed(seed)
    text = Gemma3ForCausalLM(gemma3_text_config(tokenizer, n_layers=n_layers, d_model=d_model)).float().eval()
    _randomize(text, norm_offset=0.0)  # Gemma's norms multiply by 1 + w
    if not multimodal:
        return text
    siglip = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    wrapper = Gemma3ForConditionalGeneration(gemma3_wrapper_config(tokenizer, text.config, siglip)).float().eval()
    wrapper.model.language_model.load_state_dict(text.model.state_dict())
    return wrapper


def gemma3_wrapper_config(tokenizer: PreTrainedTokenizerFast, text_config: Gemma3TextConfig,
                          vision_config: dict[str, Any]) -> Gemma3Config:
    """The multimodal wrapper's config around `text_config`: a SigLIP tower (`vision_config`, never read by
    nla_lens) and the tokenizer's image tokens."""
    ids = tokenizer.convert_tokens_to_ids
    return Gemma3Config(
        text_config=text_config.to_dict(), vision_config=vision_config, mm_tokens_per_image=4,
        boi_token_index=cast(int, ids("<start_of_image>")), eoi_token_index=cast(int, ids("<end_of_image>")),
        image_token_index=cast(int, ids("<image_soft_token>")), tie_word_embeddings=True,
    )


def build_llama(tokenizer: PreTrainedTokenizerFast, *, n_layers: int = 4, d_model: int = 64,
                seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=d_model // 4, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, rope_parameters=dict(LLAMA3_ROPE),
    )
    model = LlamaForCausalLM(config).float().eval()
    _randomize(model, norm_offset=1.0)
    return model


def build_qwen2(tokenizer: PreTrainedTokenizerFast, *, n_layers: int = 4, d_model: int = 64,
                seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2.5's architecture: GQA with q/k/v biases (non-zero here), no q/k norms, no BOS."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).float().eval()
    _randomize(model, norm_offset=1.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.normal_(0.0, 0.3)
    return model


def save_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path, sidecar: dict,
                max_shard_size: str = "5GB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    dump_meta(sidecar, folder)
    return folder


def save_truncated_ar(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                      folder: Path, sidecar: dict, layer: int, readout: Float[torch.Tensor, "d_model d_model"]) -> Path:
    """The paper's AR layout: a K+1-block text backbone (no final norm, no lm_head) + value head."""
    folder.mkdir(parents=True, exist_ok=True)
    cut: dict[str, Any] = {"num_hidden_layers": layer + 1}
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:
        cut["layer_types"] = layer_types[:layer + 1]
    config = type(model.config)(**(model.config.to_dict() | cut))
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    keep = {k: v.contiguous() for k, v in model.state_dict().items() if k == "model.embed_tokens.weight"
            or k.startswith("model.layers.") and int(k.split(".")[2]) <= layer}
    save_file(keep, folder / "model.safetensors", metadata={"format": "pt"})
    save_file({"weight": readout.contiguous()}, folder / "value_head.safetensors")
    tokenizer.save_pretrained(folder)
    dump_meta(sidecar, folder)
    return folder


def paper_sidecar(tokens: dict, d_model: int, layer: int, role: str, injection_scale: float | None) -> dict:
    """The paper's `nla_model` dialect with this module's AV prompt (the `<concept>` template)."""
    return _paper_sidecar(tokens, d_model, layer, role, injection_scale, av_template=AV_TEMPLATE)


def make_tiny_bos_nlas(root: str | Path, *, layer: int = 2, d_model: int = 64,
                       injection_scale: float = 40.0, seed: int = 5) -> dict[str, Path]:
    """Write the tiny BOS-family folders under `root`, by name:

    * ``gemma_av``: text-only Gemma-3 AV (embedding replacement after the sqrt(d) scale);
    * ``gemma_av_multimodal``: the same weights in the multimodal wrapper with a tiny vision tower;
    * ``gemma_ar``: the Gemma-3 AR (K+1 blocks + value head);
    * ``llama_av``: a Llama AV (embedding replacement) whose chat template starts with `<|begin_of_text|>`;
    * ``llama_ar``: the Llama AR, whose tokenizer puts `<|begin_of_text|>` first;
    * ``qwen2_av`` / ``qwen2_ar``: a Qwen2 AV (embedding replacement) and AR, no BOS anywhere.
    """
    root = Path(root)
    gemma_tok = gemma_tokenizer()
    gemma_tokens = token_facts(gemma_tok, GEMMA_MARKER)
    text = build_gemma3(gemma_tok, d_model=d_model, seed=seed)
    wrapper = build_gemma3(gemma_tok, d_model=d_model, seed=seed, multimodal=True)
    llama_tok = llama_tokenizer()
    llama_tokens = token_facts(llama_tok, LLAMA_MARKER)
    llama = build_llama(llama_tok, d_model=d_model, seed=seed)
    qwen_tok = testing.build_tokenizer()
    qwen_tokens = testing.token_facts(qwen_tok)
    qwen2 = build_qwen2(qwen_tok, d_model=d_model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    readout = torch.eye(d_model) + 0.05 * torch.randn(d_model, d_model, generator=generator)
    av_sidecar = paper_sidecar(gemma_tokens, d_model, layer, "av", injection_scale)
    return {
        "gemma_av": save_folder(text, gemma_tok, root / "gemma_av", av_sidecar),
        "gemma_av_multimodal": save_folder(wrapper, gemma_tok, root / "gemma_av_multimodal", av_sidecar),
        "gemma_ar": save_truncated_ar(text, gemma_tok, root / "gemma_ar",
                                      paper_sidecar(gemma_tokens, d_model, layer, "ar", None), layer, readout),
        "llama_av": save_folder(llama, llama_tok, root / "llama_av",
                                paper_sidecar(llama_tokens, d_model, layer, "av", injection_scale)),
        "llama_ar": save_truncated_ar(llama, llama_tok, root / "llama_ar",
                                      paper_sidecar(llama_tokens, d_model, layer, "ar", None), layer, readout),
        "qwen2_av": save_folder(qwen2, qwen_tok, root / "qwen2_av",
                                _paper_sidecar(qwen_tokens, d_model, layer, "av", 150.0)),
        "qwen2_ar": save_truncated_ar(qwen2, qwen_tok, root / "qwen2_ar",
                                      _paper_sidecar(qwen_tokens, d_model, layer, "ar", None), layer, readout),
    }
