"""Tiny random NLA checkpoints, written as real HF folders with sidecars, for tests and tutorials.

Everything is built locally (no hub): a byte-level BPE tokenizer trained on a few sentences that
holds the marker char as one token between '>' and '</', a Qwen3-shaped model with GQA and
non-trivial q/k norms, and the AV / AR folders in the layouts found in the wild.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from nla_lens.sidecar import dump_meta

MARKER = "㈎"
# Short on purpose: in a random model the marker's influence is diluted by every other position.
AV_TEMPLATE = "<c>{injection_char}</c>"
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    AV_TEMPLATE, AR_TEMPLATE, "<explanation>\n", "\n</explanation>",
    "The cat sat on the mat. A dog ran in the park. Words about the weather and the sea.",
    "</text> </summary> </concept> </explanation> <text> <summary> <concept> <explanation>",
    "numbers one two three, names of places, a question, the end of a sentence.",
]


def build_tokenizer(folder: Path | None = None, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A Qwen-like byte-level BPE with a chat template; the marker is a single added token."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(_CORPUS * 20, trainer)
    core.add_tokens([AddedToken(MARKER, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def token_facts(tokenizer: PreTrainedTokenizerFast, av_template: str = AV_TEMPLATE, marker: str = MARKER) -> dict:
    """The sidecar's `tokens:` block, derived from the tokenizer as the training code derives it."""
    prompt = cast(list[int], tokenizer.apply_chat_template(  # one conversation, tokenized: its ids
        [{"role": "user", "content": av_template.replace("{injection_char}", marker)}],
        add_generation_prompt=True, tokenize=True, return_dict=False))
    marker_id = cast(int, tokenizer.convert_tokens_to_ids(marker))
    at = prompt.index(marker_id)
    suffix = AR_TEMPLATE.split("{explanation}")[1]
    return {
        "injection_char": marker,
        "injection_token_id": marker_id,
        "injection_left_neighbor_id": prompt[at - 1],
        "injection_right_neighbor_id": prompt[at + 1],
        "critic_suffix_ids": tokenizer.encode(suffix, add_special_tokens=False)[1:],
    }


def build_base_model(tokenizer: PreTrainedTokenizerFast, *, n_layers: int = 4, d_model: int = 64,
                     seed: int = 0) -> Qwen3ForCausalLM:
    """A random Qwen3-shaped model (GQA, q/k norms) with peaked logits and non-trivial norm weights."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=d_model // 4, max_position_embeddings=256, rms_norm_eps=1e-6,
        initializer_range=0.2, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith(("embed_tokens.weight", "o_proj.weight", "down_proj.weight")):
                # Writes into the residual stream stay small, so fp32 rounding stays near 1e-6
                # while the large q/k/v/mlp-in weights keep the logits peaked.
                param.normal_(0.0, 0.05)
    return model


def _dataset_sidecar(tokens: dict, d_model: int, layer: int) -> dict:
    """The nanoNLA dialect: the dataset sidecar copied into a checkpoint."""
    return {
        "dataset_id": "tiny", "stage": "ar_sft",
        "extraction": {"base_model": "tiny-qwen3", "d_model": d_model, "layer_index": layer,
                       "norm": "none"},
        "kind": "nla_dataset", "schema_version": 1, "tokens": tokens,
        "prompt_templates": {"actor": AV_TEMPLATE, "critic": AR_TEMPLATE},
    }


def paper_sidecar(tokens: dict, d_model: int, layer: int, role: str, injection_scale: float | None,
                  av_template: str = AV_TEMPLATE) -> dict:
    """The paper's dialect (after its release scrubber: role av/ar, top-level layer index)."""
    return {
        "kind": "nla_model", "schema_version": 2, "role": role, "stage": "rl",
        "d_model": d_model, "extraction_layer_index": layer,
        "extraction": {"injection_scale": injection_scale, "mse_scale": math.sqrt(d_model)},
        "tokens": tokens if role == "ar" else {**tokens, "critic_suffix_ids": None},
        "prompt_templates": {"av": av_template, "ar": AR_TEMPLATE},
        "critic": {"extraction_layer_index": layer},
    }


def save_av(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path,
            sidecar: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    dump_meta(sidecar, folder)
    return folder


def save_ar(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path, sidecar: dict,
            layer: int, *, readout: Float[torch.Tensor, "d_model d_model"], shards: int = 1,
            placeholders: bool = False) -> Path:
    """A truncated K+1-block backbone + `value_head.safetensors`; sharded and with the Megatron
    placeholders (`model.norm.weight` = ones, `lm_head.weight` = eye(d)) when asked."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict() | {"num_hidden_layers": layer + 1}
    config.pop("layer_types", None)
    Qwen3Config(**config).save_pretrained(folder)
    keep = {k: v.contiguous() for k, v in model.state_dict().items()
            if k.startswith("model.embed_tokens") or (block := _layer_of(k)) is not None and block <= layer}
    d_model = model.config.hidden_size
    if placeholders:
        keep["model.norm.weight"] = torch.ones(d_model)
        keep["lm_head.weight"] = torch.eye(d_model)
    names = sorted(keep)
    if shards == 1:
        save_file(keep, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: keep[k] for k in names[i::shards]}
            save_file(part, folder / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    save_file({"weight": readout.contiguous()}, folder / "value_head.safetensors")
    tokenizer.save_pretrained(folder)
    dump_meta(sidecar, folder)
    return folder


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def make_tiny_nla(root: str | Path, *, n_layers: int = 4, layer: int = 2, d_model: int = 64,
                  injection_scale: float = 1.0, seed: int = 3) -> dict[str, Path]:
    """Write a family of tiny NLA folders under `root` and return their paths by name.

    * ``av_karvonen``: nanoNLA dialect, served with the Karvonen add at layer-1 output;
    * ``av_embedding``: paper dialect with an injection_scale, served with embedding replacement;
    * ``ar_nanonla``: nanoNLA AR (one safetensors file, no norm / lm_head);
    * ``ar_paper``: paper AR (sharded, Megatron placeholders for norm / lm_head).
    """
    root = Path(root)
    tokenizer = build_tokenizer()
    tokens = token_facts(tokenizer)
    model = build_base_model(tokenizer, n_layers=n_layers, d_model=d_model, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    readout = torch.eye(d_model) + 0.05 * torch.randn(d_model, d_model, generator=generator)
    return {
        "av_karvonen": save_av(model, tokenizer, root / "av_karvonen",
                               _dataset_sidecar(tokens, d_model, layer)),
        "av_embedding": save_av(model, tokenizer, root / "av_embedding",
                                paper_sidecar(tokens, d_model, layer, "av", injection_scale)),
        "ar_nanonla": save_ar(model, tokenizer, root / "ar_nanonla",
                              _dataset_sidecar(tokens, d_model, layer), layer, readout=readout),
        "ar_paper": save_ar(model, tokenizer, root / "ar_paper",
                            paper_sidecar(tokens, d_model, layer, "ar", None), layer,
                            readout=readout, shards=3, placeholders=True),
    }


# Explanations the tiny tokenizer encodes in few tokens (its BPE was trained on these words).
TINY_LABELS = ["the cat sat on the mat", "a dog ran in the park", "words about the weather", "the sea",
               "numbers one two three", "names of places", "a question", "the end of a sentence"]


def save_base_model(folder: str | Path, *, n_layers: int = 4, d_model: int = 64, seed: int = 0) -> Path:
    """A tiny base model as a plain HF folder (weights + tokenizer, no sidecar), for training tests."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    build_base_model(tokenizer, n_layers=n_layers, d_model=d_model, seed=seed).save_pretrained(folder)
    return folder


def tiny_corpus(n_docs: int, *, words_per_doc: int = 24, seed: int = 0) -> list:
    """Documents of random words from the tiny tokenizer's vocabulary, with ids ``doc-0``, ``doc-1``, ..."""
    import random

    from nla_lens.training.extraction import Document

    rng = random.Random(seed)
    vocabulary = " ".join(TINY_LABELS).split()
    return [Document(f"doc-{i}", " ".join(rng.choice(vocabulary) for _ in range(words_per_doc)))
            for i in range(n_docs)]


def label_determined_vectors(n_docs: int, *, rows_per_doc: int = 4, d_model: int = 64, noise: float = 0.05,
                             seed: int = 0):
    """A synthetic labelled set where the label fully determines the vector (up to `noise`).

    Each label owns a random direction; every vector also shares one large common direction, as real
    residuals do, so the paper baseline (distance from the mean) is what is left to explain.
    """
    from nla_lens.training.dataset import LabelledActivations

    generator = torch.Generator().manual_seed(seed)
    centroids = torch.randn(len(TINY_LABELS), d_model, generator=generator)
    common = 2.0 * torch.randn(d_model, generator=generator)
    labels = torch.randint(len(TINY_LABELS), (n_docs * rows_per_doc,), generator=generator)
    vectors = common + centroids[labels] + noise * torch.randn(len(labels), d_model, generator=generator)
    return LabelledActivations(vectors, [f"doc-{i // rows_per_doc}" for i in range(len(labels))],
                               [8 + i % rows_per_doc for i in range(len(labels))],
                               [TINY_LABELS[k] for k in labels.tolist()])
