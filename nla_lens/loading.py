"""HF checkpoint folder -> TransformerLens `HookedTransformer`, with no weight processing.

The `hooked` backend (`nla_lens.backends`) builds its models here; the helpers that read folders,
tokenizers and the AR readout serve both backends. The weights are streamed tensor by tensor from
the safetensors shards straight into the parameters of a model built with uninitialised storage, so
peak host memory stays near one copy of the weights (TL's own HF-model -> state-dict path needs
about three). No fold_ln, no centering, no value-bias folding: activations equal HF's.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import einops
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from nla_lens.errors import CheckpointError

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4.x: the helpers below still serve nla_lens.backends.bridge
    HookedTransformer = HookedTransformerConfig = None

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
VALUE_HEAD_FILE = "value_head.safetensors"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local folder, or a hub id already in the local HF cache (never downloads)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id), local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available offline"
        raise CheckpointError(
            f"{path_or_id!r} is neither a local folder nor a hub id in the local HF cache. "
            f"Download it first (huggingface-cli download {path_or_id}) or pass the folder path."
        ) from exc


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_hf_config(folder: Path, *, trust_remote_code: bool = False) -> Any:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; point at an HF checkpoint folder")
    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def eos_token_ids(folder: Path, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids as HF `generate` uses them: generation_config.json first, then the tokenizer."""
    gen = folder / "generation_config.json"
    ids: Any = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if ids is None:
        ids = tokenizer.eos_token_id
    return sorted({ids} if isinstance(ids, int) else set(ids))


def hooked_config(hf_config: Any, *, n_layers: int | None, dtype: torch.dtype,
                  device: str | torch.device) -> HookedTransformerConfig:
    """TL config for the Qwen3 / Qwen2 / Llama families, n_ctx taken from the HF config."""
    arch = (hf_config.architectures or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"architecture {arch!r} is not supported yet; nla_lens loads {SUPPORTED_ARCHITECTURES}"
        )
    rope = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or rope
    if scaling.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope scaling {scaling.get('rope_type')!r} is not supported yet")
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    n_kv = hf_config.num_key_value_heads
    return HookedTransformerConfig(
        model_name=str(getattr(hf_config, "_name_or_path", "") or arch),
        original_architecture=arch,
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=None if n_kv == hf_config.num_attention_heads else n_kv,
        d_mlp=hf_config.intermediate_size,
        n_layers=n_layers if n_layers is not None else hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings,
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_base=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        use_qk_norm=arch == "Qwen3ForCausalLM",
        default_prepend_bos=False,
        init_weights=False,
        dtype=dtype,
        device=str(device),
    )


def read_safetensors(path: Path, keep: set[str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) from one safetensors file, one tensor in memory at a time.

    Reads into fresh buffers instead of mmapping the file, so touched file pages never pile up in
    the process's resident memory while a multi-GB shard is converted.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        start = 8 + header_len
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if keep is not None and name not in keep:
                continue
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(info["shape"])


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{folder} holds no model.safetensors (or index): nla_lens loads safetensors only, "
        "never pickle. Convert .bin weights with transformers' save_pretrained(safe_serialization=True)."
    )


def _tl_targets(name: str, tensor: Tensor, cfg: HookedTransformerConfig) -> list[tuple[str, Tensor]]:
    """TL parameter name(s) and value(s) for one HF Qwen/Llama tensor; [] for tensors TL ignores."""
    if name == "model.embed_tokens.weight":
        return [("embed.W_E", tensor)]
    if name == "model.norm.weight":
        return [("ln_final.w", tensor)]
    if name == "lm_head.weight":
        return [("unembed.W_U", tensor.T)]
    match = _LAYER.match(name)
    if match is None:
        return []
    layer, rest = int(match.group(1)), match.group(2)
    if layer >= cfg.n_layers:
        return []
    gqa = "_" if cfg.n_key_value_heads is not None else ""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    prefix = f"blocks.{layer}."
    heads = {"q": (cfg.n_heads, "W_Q", "b_Q"), "k": (n_kv, f"{gqa}W_K", f"{gqa}b_K"),
             "v": (n_kv, f"{gqa}W_V", f"{gqa}b_V")}
    simple = {
        "input_layernorm.weight": ("ln1.w", lambda t: t),
        "post_attention_layernorm.weight": ("ln2.w", lambda t: t),
        "self_attn.q_norm.weight": ("attn.q_norm.w", lambda t: t),
        "self_attn.k_norm.weight": ("attn.k_norm.w", lambda t: t),
        "self_attn.o_proj.weight": ("attn.W_O", lambda t: einops.rearrange(t, "m (n h) -> n h m", n=cfg.n_heads)),
        "mlp.up_proj.weight": ("mlp.W_in", lambda t: t.T),
        "mlp.gate_proj.weight": ("mlp.W_gate", lambda t: t.T),
        "mlp.down_proj.weight": ("mlp.W_out", lambda t: t.T),
    }
    if rest in simple:
        tl_name, transform = simple[rest]
        return [(prefix + tl_name, transform(tensor))]
    proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
    if proj is None:
        raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint; is it a supported architecture?")
    n, w_name, b_name = heads[proj.group(1)]
    if proj.group(2) == "weight":
        return [(prefix + "attn." + w_name, einops.rearrange(tensor, "(n h) m -> n m h", n=n))]
    return [(prefix + "attn." + b_name, einops.rearrange(tensor, "(n h) -> n h", n=n))]


def _stream_weights(model: HookedTransformer, folder: Path, *, skip: frozenset[str]) -> set[str]:
    """Copy checkpoint tensors into `model`'s parameters; return the TL names written."""
    params = dict(model.named_parameters())
    written: set[str] = set()
    for file in _weight_files(folder):
        for name, tensor in read_safetensors(file):
            if name in skip:
                continue
            for tl_name, value in _tl_targets(name, tensor, model.cfg):
                if tl_name not in params:
                    continue
                param = params[tl_name]
                if param.shape != value.shape:
                    raise CheckpointError(
                        f"{name} has shape {tuple(tensor.shape)}, which does not fit {tl_name} "
                        f"{tuple(param.shape)}: config.json and the weights disagree"
                    )
                with torch.no_grad():
                    param.copy_(value)
                written.add(tl_name)
    return written


def _zero_absent_biases(model: HookedTransformer, written: set[str]) -> None:
    """HF Qwen/Llama have no o/mlp/unembed biases (Qwen2 has q/k/v ones): TL's must be exact zeros."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in written and re.search(r"(^|\.)_?b_\w+$", name):
                param.zero_()
                written.add(name)


def _check_complete(model: HookedTransformer, written: set[str], folder: Path) -> None:
    missing = [n for n, _ in model.named_parameters() if n not in written]
    if missing:
        raise CheckpointError(f"{folder} lacks weights for {missing[:6]} ({len(missing)} in all)")


def load_hooked_transformer(
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    n_layers: int | None = None,
    trust_remote_code: bool = False,
) -> HookedTransformer:
    """Build a `HookedTransformer` from an HF folder; with `n_layers`, only the first blocks.

    A truncated model (the AR) has no final norm and no unembed: `model(tokens)` returns the
    residual stream after its last block, and only the kept blocks' weights are read.
    """
    hf_config = load_hf_config(folder, trust_remote_code=trust_remote_code)
    cfg = hooked_config(hf_config, n_layers=n_layers, dtype=dtype, device=device)
    if n_layers is not None and n_layers > hf_config.num_hidden_layers:
        raise CheckpointError(f"{folder} has {hf_config.num_hidden_layers} layers, {n_layers} requested")
    with torch.device(device):
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="left")
    truncated = n_layers is not None
    if truncated:
        # The AR reads the raw residual: drop the final norm and unembed before touching weights.
        model.ln_final = nn.Identity()
        model.unembed = nn.Identity()
        model.setup()
    skip = frozenset({"model.norm.weight", "lm_head.weight"}) if truncated else frozenset()
    written = _stream_weights(model, folder, skip=skip)
    if not truncated and getattr(hf_config, "tie_word_embeddings", False) and "unembed.W_U" not in written:
        with torch.no_grad():
            model.unembed.W_U.copy_(model.embed.W_E.T)
        written.add("unembed.W_U")
    _zero_absent_biases(model, written)
    _check_complete(model, written, folder)
    return model.eval()


def load_readout(folder: Path, d_model: int, *, dtype: torch.dtype, device: str | torch.device) -> nn.Linear:
    """The AR's `Linear(d, d, bias=False)` readout from `value_head.safetensors` (`weight` [d, d])."""
    path = folder / VALUE_HEAD_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {VALUE_HEAD_FILE}: an AR checkpoint carries its readout there "
            "(a `weight` of shape [d_model, d_model])"
        )
    tensors = dict(read_safetensors(path))
    weight = tensors.get("weight")
    if weight is None or tuple(weight.shape) != (d_model, d_model):
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        raise CheckpointError(f"{path} must hold `weight` of shape [{d_model}, {d_model}], found {found}")
    readout = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        readout.weight.copy_(weight)
    return readout.eval()
