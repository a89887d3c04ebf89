"""The Gemma-3 part of `nla-lens bench`: load memory (text-only and multimodal) and verbalize speed.

Same method as `nla_lens.bench`: random bf16 weights written as sharded safetensors, each load in a
fresh forked process, timings interleaved with medians. The multimodal folder wraps the same text
weights with a SigLIP tower that nla_lens never reads. Two memory ratios are printed: peak RSS growth
over the bytes of the loaded parameters (TL holds Gemma's tied unembedding as its own unscaled copy
beside the sqrt(d)-scaled `W_E`, so these include one extra [vocab, d_model] matrix), and over the
bytes of the checkpoint's text weights in the loaded dtype. The speed reference is HF `generate`
from `inputs_embeds` after the paper's embedding replacement (kitft docs/inference.md).
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla_lens import bench
from nla_lens.checks import blocks_phrase


@dataclass(frozen=True)
class GemmaShape:
    """A Gemma-3-shaped text model: five local layers per global one, head_dim fixed, tied embeddings."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab: int
    sliding_window: int

    @property
    def ar_layer(self) -> int:
        """K, as the paper picks it: 2/3 of the depth (32 of 48 for Gemma-3-12B); the AR keeps K + 1 blocks."""
        return 2 * self.n_layers // 3

    def n_params(self) -> int:
        d, q, kv = self.d_model, self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        return self.vocab * d + d + self.n_layers * (2 * d * q + 2 * d * kv + 3 * d * self.d_mlp + 4 * d
                                                      + 2 * self.d_head)

    def describe(self) -> str:
        return (f"{self.n_params() / 1e6:.1f}M params (d_model {self.d_model}, {self.n_layers} layers, 5 local : 1 "
                f"global, window {self.sliding_window}, {self.n_heads}/{self.n_kv_heads} heads of {self.d_head}, "
                f"d_mlp {self.d_mlp}, vocab {self.vocab}, tied embeddings "
                f"{self.vocab * self.d_model / self.n_params():.1%} of the weights)")


@dataclass(frozen=True)
class GemmaPlan:
    """The Gemma-3 section's shapes and workload, as `Plan` is the Qwen3 section's."""

    memory: GemmaShape
    speed: GemmaShape
    batches: tuple[int, ...]
    new_tokens: int
    reps: int
    vision: tuple[int, int]  # SigLIP tower of the multimodal folder: (hidden size, layers)


# The memory model's embedding is 8.2% of its weights, as Gemma-3-12B's is 8.5% (27B: 5.2%): TL holds the
# tied unembedding as a second [vocab, d_model] matrix, so that share sets the overhead over the text weights.
FULL = GemmaPlan(memory=GemmaShape(1024, 24, 8, 4, 128, 4096, 32768, 1024),
                 speed=GemmaShape(512, 6, 8, 4, 64, 2048, 16384, 16), batches=(1, 16),
                 new_tokens=64, reps=5, vision=(768, 4))
QUICK = GemmaPlan(memory=GemmaShape(64, 6, 4, 2, 16, 128, 512, 8), speed=GemmaShape(64, 6, 4, 2, 16, 128, 512, 8),
                  batches=(1, 4), new_tokens=8, reps=1, vision=(32, 1))


def run(root: Path, plan: GemmaPlan, *, device: str, out: Callable[[str], None]) -> None:
    """Write the Gemma-3 checkpoints under `root`, print memory then speed; the caller deletes `root`."""
    memory = write_checkpoints(root / "memory", plan.memory, plan.vision)
    _report_memory(memory, plan, device, out)
    speed = write_checkpoints(root / "speed", plan.speed, plan.vision)
    _report_speed(speed, plan, device, out)


def _text_config(shape: GemmaShape, tokenizer: Any) -> Any:
    from transformers import Gemma3TextConfig

    from nla_lens import testing_families as fam

    kinds = ["sliding_attention"] * 5 + ["full_attention"]
    return Gemma3TextConfig(
        vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.d_head, query_pre_attn_scalar=shape.d_head, sliding_window=shape.sliding_window,
        layer_types=[kinds[i % 6] for i in range(shape.n_layers)], rope_parameters=copy.deepcopy(fam.GEMMA3_ROPE),
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def write_checkpoints(root: Path, shape: GemmaShape, vision: tuple[int, int], seed: int = 0) -> dict[str, Path]:
    """AV text-only, AV in the multimodal wrapper (same text weights), AR (K+1 blocks), bf16 shards."""
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    from nla_lens import testing_families as fam

    tokenizer = fam.gemma_tokenizer()
    tokens = fam.token_facts(tokenizer, fam.GEMMA_MARKER)
    text_config = _text_config(shape, tokenizer)
    ar_layer = shape.ar_layer
    with torch.device("meta"):
        text = Gemma3ForCausalLM(text_config)
    # Every parameter is written below. (transformers wraps `to` in functools.wraps(nn.Module.to), whose type
    # takes the dtype for `self`: hence the ignores.)
    text = text.to_empty(device="cpu").to(torch.bfloat16).eval()  # type: ignore[arg-type]
    text.tie_weights()  # to_empty gave lm_head storage of its own
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in text.named_parameters():
            if param.ndim == 1:  # Gemma's norms multiply by 1 + w
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("embed_tokens.weight", "o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, 0.05, generator=generator)
            else:
                param.normal_(0.0, 1.6 / math.sqrt(param.shape[1]), generator=generator)
    n_params = sum(p.numel() for p in text.parameters())
    shard = f"{max(1, n_params * 2 // 3 // 2**20)}MB"  # about three shards
    av_sidecar = fam.paper_sidecar(tokens, shape.d_model, ar_layer, "av", 40.0 * math.sqrt(shape.d_model))
    paths = {"av": fam.save_folder(text, tokenizer, root / "av", av_sidecar, max_shard_size=shard)}
    siglip = {"hidden_size": vision[0], "intermediate_size": 4 * vision[0], "num_hidden_layers": vision[1],
              "num_attention_heads": max(1, vision[0] // 64), "image_size": 224, "patch_size": 14}
    with torch.device("meta"):
        wrapper = Gemma3ForConditionalGeneration(fam.gemma3_wrapper_config(tokenizer, text_config, siglip))
    wrapper = wrapper.to_empty(device="cpu").to(torch.bfloat16).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for param in wrapper.model.vision_tower.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for param in wrapper.model.multi_modal_projector.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        wrapper.model.language_model.load_state_dict(text.model.state_dict())
    wrapper.tie_weights()
    paths["av_multimodal"] = fam.save_folder(wrapper, tokenizer, root / "av_multimodal", av_sidecar,
                                             max_shard_size=shard)
    del wrapper
    readout = torch.eye(shape.d_model) + 0.05 * torch.randn(shape.d_model, shape.d_model, generator=generator)
    paths["ar"] = fam.save_truncated_ar(text, tokenizer, root / "ar",
                                        fam.paper_sidecar(tokens, shape.d_model, ar_layer, "ar", None), ar_layer,
                                        readout.to(torch.bfloat16))
    return paths


_MEMORY_RUNS = (  # (label, loader, folder, dtype)
    ("AV nla_lens, text-only", "nla_av", "av", "bfloat16"), ("AV nla_lens, multimodal", "nla_av", "av_multimodal",
                                                              "bfloat16"),
    ("AV HF from_pretrained, text-only", "hf", "av", "bfloat16"), ("AR nla_lens (kept blocks)", "nla_ar", "ar",
                                                                   "bfloat16"),
    ("AV nla_lens, text-only", "nla_av", "av", "float32"), ("AV nla_lens, multimodal", "nla_av", "av_multimodal",
                                                             "float32"),
)


def text_weight_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes of the folder's text weights (vision tower and projector excluded) in `dtype`."""
    from nla_lens.backends.gemma3 import text_tensor_name

    total = 0
    for file in folder.glob("*.safetensors"):
        if file.name == "value_head.safetensors":
            continue
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        for name, info in header.items():
            wrapped = not name.startswith("model.") or name.startswith("model.language_model.")
            if not wrapped or text_tensor_name(name) is not None:
                total += math.prod(info["shape"]) * dtype.itemsize
    return total


def _report_memory(paths: dict[str, Path], plan: GemmaPlan, device: str, out: Callable[[str], None]) -> None:
    out(f"memory model: Gemma-3-shaped, {plan.memory.describe()}, AR keeps {blocks_phrase(plan.memory.ar_layer + 1)}; "
        f"bf16 sharded safetensors ({bench.size_text(bench.folder_bytes(paths['av']))} text-only AV, "
        f"{bench.size_text(bench.folder_bytes(paths['av_multimodal']))} multimodal AV with a SigLIP tower)")
    out("  peak RSS over load + one forward / bytes of the loaded parameters, and / the checkpoint's text weights")
    with bench._ForkServer() as server:
        for label, loader, folder, dtype in _MEMORY_RUNS:
            result = server.measure(loader, paths[folder], dtype, device)
            text = text_weight_bytes(paths[folder], getattr(torch, dtype))
            name = f"{label} (bf16 file -> {'bf16' if dtype == 'bfloat16' else 'fp32'} model)"
            out(f"  {name:62s} {result['growth'] / result['weights']:5.2f}x loaded, "
                f"{result['growth'] / text:5.2f}x text weights   (loaded {bench.size_text(result['weights']):>7s}, "
                f"text weights {bench.size_text(text):>7s}, peak growth {bench.size_text(result['growth']):>7s})")


def _report_speed(paths: dict[str, Path], plan: GemmaPlan, device: str, out: Callable[[str], None]) -> None:
    from transformers import AutoModelForCausalLM

    import nla_lens as nl

    av = nl.ActivationVerbalizer.from_pretrained(paths["av"], device=device)
    av.eos_token_ids = []  # every row runs the full plan.new_tokens, as on the HF side
    hf = AutoModelForCausalLM.from_pretrained(paths["av"], dtype=torch.float32, device_map=device).eval()
    out(f"speed model: Gemma-3-shaped, {plan.speed.describe()}, fp32 on {device}; AV prompt "
        f"{av.prompt_tokens(1).shape[1]} tokens (longer than the window)")
    generator = torch.Generator().manual_seed(1)
    for batch in plan.batches:
        vectors = (3.0 * torch.randn(batch, plan.speed.d_model, generator=generator)).to(device)

        def ours(vectors: torch.Tensor = vectors) -> list[list[int]]:
            outputs = av.verbalize(vectors, max_new_tokens=plan.new_tokens, batch_size=len(vectors), progress=False)
            return [o.tokens for o in outputs]

        def theirs(vectors: torch.Tensor = vectors) -> list[list[int]]:
            return _hf_generate(hf, av, vectors, plan.new_tokens)

        same = sum(a == b for a, b in zip(ours(), theirs(), strict=True))
        t_ours, t_theirs = bench._interleaved(ours, theirs, plan.reps, device)
        tokens = batch * plan.new_tokens
        out(f"  Gemma verbalize, batch {batch:2d}, {plan.new_tokens} new tokens, greedy: nla_lens "
            f"{tokens / t_ours:7.1f} tok/s ({bench.decoder_path(av)}), HF generate(inputs_embeds) "
            f"{tokens / t_theirs:7.1f} tok/s -> "
            f"{t_theirs / t_ours:.2f}x (rows with the same tokens as HF: {same}/{batch})")


def _hf_generate(hf: Any, av: Any, vectors: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """HF greedy `generate` from `inputs_embeds`: HF's scaled embedding with the marker rows replaced."""
    tokens = av.prompt_tokens(len(vectors))
    injection = av.injection(vectors, tokens)
    with torch.inference_mode():
        embeds = hf.get_input_embeddings()(tokens)
        unit = vectors.float() / vectors.float().norm(dim=-1, keepdim=True)
        embeds[injection.rows, injection.positions] = (unit * av.meta.injection_scale).to(embeds.dtype)
        out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(tokens), max_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=av.tokenizer.pad_token_id)
    return out.tolist()
