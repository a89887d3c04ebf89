"""HF checkpoint folder -> TransformerLens `HookedTransformer`, with no weight processing.

The `hooked` backend (`nla_lens.backends`) builds its models here (with `decoding.py`, its fast
forward); the helpers that read folders, tokenizers and the AR readout serve both backends. The
weights are streamed tensor by tensor from the safetensors shards straight into the parameters of a
model built with uninitialised storage, so peak host memory stays near one copy of the weights (TL's
own HF-model -> state-dict path needs two to three); a bf16 -> fp32 cast goes through a 16 MiB
buffer. Matrices are stored in HF's `[out, in]` layout with the TL parameters as strided views of
that storage, so the rearranges TL's forward applies before every `F.linear` are free views rather
than copies of every weight. No fold_ln, no centering, no value-bias folding: activations equal HF's.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO, Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from nla_lens import backends, toy
from nla_lens.backends import gemma3, hf_names
from nla_lens.checks import blocks_phrase, did_you_mean, warn_at_caller
from nla_lens.errors import CheckpointError, InjectionError, InputError, SidecarError, TokenizerDriftError
from nla_lens.sidecar import SIDECAR_NAME, NLAMeta, check_tokenizer, load_meta, prepends_bos, run_exports

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4.x: the helpers below still serve nla_lens.backends.bridge
    HookedTransformer = HookedTransformerConfig = None  # type: ignore[misc, assignment]

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", *gemma3.ARCHITECTURES)
VALUE_HEAD_FILE = "value_head.safetensors"
WEIGHT_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's, read before model.safetensors
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the hub spells repo ids
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_READ_CHUNK = 1 << 28  # bytes per read() call; Linux caps a single read near 2 GiB
_CAST_CHUNK = 1 << 24  # bytes of the host buffer used when a tensor is cast or sent to a device


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local folder, or a hub id already in the local HF cache (never downloads)."""
    if not isinstance(path_or_id, str | os.PathLike):  # a loaded model would fail in Path() with a bare TypeError
        raise InputError(f"expected a checkpoint folder or a hub id, got {type(path_or_id).__name__}: pass the "
                         "path the model was loaded from (this call loads the checkpoint itself)")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if looks_like_path(path_or_id):
        raise CheckpointError(f"{missing_folder(path_or_id)}; {_path_fix(path_or_id)}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id), local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available offline"
        raise CheckpointError(
            f"{path_or_id!r} is neither a local folder nor a hub id in the local HF cache. "
            f"Download it first (hf download {path_or_id}) or pass the folder path."
        ) from exc


def named_base_folder(base_model: str) -> Path:
    """The folder a sidecar's `base_model` names: the toy's base by its name, else a local folder or a cached hub
    id (`resolve_checkpoint`)."""
    return toy.TOY_DIR / "base" if base_model == toy.BASE_MODEL else resolve_checkpoint(base_model)


_SAMPLES, _SAMPLE_BYTES = 64, 4096


def folder_fingerprint(folder: Path, suffixes: Sequence[str] | None = None) -> str:
    """A fingerprint of a checkpoint folder's files (those ending in `suffixes`, if given) that costs the same at any
    size: each file's name and length, small files whole, and 64 blocks of 4 KiB spread over each large one. Other
    weights saved into the same folder differ in nearly every block; a copy of them elsewhere does not differ."""
    digest = hashlib.sha256()
    files = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for path in sorted(p for p in files if suffixes is None or p.name.endswith(tuple(suffixes))):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= _SAMPLES * _SAMPLE_BYTES:
                digest.update(f.read())
                continue
            for i in range(_SAMPLES):
                f.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def recorded_path(path_or_id: str | Path) -> str:
    """How a sidecar records a checkpoint (`base_model`): a local folder by its absolute path, so the record
    finds it from any working folder; anything else (a hub id) as written."""
    path = Path(path_or_id).expanduser()
    return str(path.resolve()) if path.is_dir() else str(path_or_id)


def looks_like_path(path_or_id: str | Path) -> bool:
    """Whether a name that is not a folder here was meant as one, not as a hub id (`owner/name`): a
    Path, a file, a name starting with '/', '.' or '~', one with more than one '/' or a character hub ids
    lack, or one whose first part is a local folder (`runs/av` where `runs/` exists)."""
    name = str(path_or_id)
    if isinstance(path_or_id, Path) or name.startswith(("/", ".", "~")) or Path(name).exists():
        return True
    if "/" not in name and "\\" not in name:
        return False  # a bare name such as `gpt2` may be either
    return _HUB_ID.fullmatch(name) is None or Path(name.split("/")[0]).is_dir()


def missing_folder(path_or_id: str | Path) -> str:
    """What is wrong with a path that names no folder: nothing there, or a file."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return f"{str(path_or_id)!r} is a file, not a checkpoint folder"
    return f"{str(path_or_id)!r}: no such folder" + ("" if path.is_absolute() else f" (relative to {Path.cwd()})")


def _path_fix(path_or_id: str | Path) -> str:
    """The folder beside a missing one whose name is closest, where that looks like a typo of it."""
    path = Path(path_or_id).expanduser()
    siblings = [p.name for p in path.parent.iterdir() if p.is_dir()] if path.parent.is_dir() else []
    close = difflib.get_close_matches(path.name, siblings, n=1)
    return f"did you mean {path.parent / close[0]}?" if close else "check the path"


def checkpoint_role(folder: Path, meta: NLAMeta) -> Literal["av", "ar"] | None:
    """The sidecar's role, else "ar" where the folder holds an AR readout (`value_head.safetensors`);
    None where neither tells (nanoNLA's `nla_dataset` sidecars record no role). An AV sidecar beside an AR
    readout is refused: an AV's sidecar copied into an AR folder, which loaded as an AV until a weight misfit."""
    has_readout = (folder / VALUE_HEAD_FILE).is_file()
    if meta.role == "av" and has_readout:
        raise SidecarError(f"{folder}/nla_meta.yaml says role 'av', but the folder holds an AR readout "
                           f"({VALUE_HEAD_FILE}): the sidecar is another checkpoint's. Restore the nla_meta.yaml "
                           "released with this AR")
    if meta.role is not None:
        return meta.role
    return "ar" if has_readout else None


_ROLE_NAMES = {"av": "AV (activation verbalizer)", "ar": "AR (activation reconstructor)"}


def nla_checkpoint(path_or_id: str | Path, role: Literal["av", "ar"],
                   arguments: dict[str, str]) -> tuple[Path, NLAMeta]:
    """The folder and sidecar passed as the `role` checkpoint, checked to hold a sidecar of that role before any
    weight is read. `arguments` names each role's argument as the caller's user writes it (`--av` on the command
    line, `av=` in Python), so the message says which to change."""
    given = arguments[role]
    passed = f"{given}{path_or_id}" if given.endswith("=") else f"{given} {path_or_id}"
    folder = resolve_checkpoint(path_or_id)
    if not (folder / SIDECAR_NAME).is_file():
        exports = run_exports(folder, ("model", role))
        what = (f"a training run's out_dir? Its export: {' or '.join(exports)}" if exports
                else "a base model folder?")
        raise SidecarError(f"{passed}: no nla_meta.yaml there, so it is not an NLA checkpoint ({what}). "
                           f"Pass the {_ROLE_NAMES[role]} folder, with the sidecar released with it")
    meta = load_meta(folder)
    found = checkpoint_role(folder, meta)
    if found is not None and found != role:
        other = "ar" if role == "av" else "av"
        raise InputError(f"{passed} is an {_ROLE_NAMES[found]} checkpoint: pass it as {arguments[other]}, "
                         f"and give {given} the {_ROLE_NAMES[role]} trained with it")
    return folder, meta


def check_base_folder(folder: Path, label: str, base_model: str | None = None) -> None:
    """A folder given as the base model. An AR can never serve (it holds only the first K+1 blocks);
    an AV loads, with a warning, since its fine-tuned activations are not the ones the NLA reads.
    `label` names the folder as the caller's user passed it; `base_model` is the sidecar's name for it."""
    if not (folder / "nla_meta.yaml").is_file():
        return
    named = f" (the sidecar names {base_model!r})" if base_model else ""
    if checkpoint_role(folder, load_meta(folder)) == "ar":
        raise InputError(f"{label} is an AR checkpoint, which holds only the first K+1 blocks of the base model. "
                         f"Pass the base model the NLA reads{named}")
    warn_at_caller(f"{label} is an AV checkpoint, a fine-tuned copy of the base model: its activations are not the "
                   f"base model's. Pass the base model the NLA reads{named}")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    # Without its files AutoTokenizer builds an empty tokenizer from config.json alone, and a broken
    # tokenizer.json raises transformers' ValueError: both name the folder here instead.
    restore = "copy the tokenizer files saved with the checkpoint (tokenizer.json, tokenizer_config.json) into it"
    if not any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(f"{folder} holds no tokenizer ({' / '.join(_TOKENIZER_FILES)}); {restore}")
    if (Path(folder) / "config.json").is_file():  # AutoTokenizer reads it too: name a broken one as config.json
        load_hf_config(Path(folder), trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"the tokenizer in {folder} cannot be loaded ({type(exc).__name__}: {reason}); "
                              f"{restore}") from exc
    return _set_up_padding(_without_stray_bos(tokenizer))


def _without_stray_bos(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Drop a BOS that is the EOS and never put first: what TransformerLens sets on a tokenizer without one (Qwen),
    and NLAs exported before nla_lens copied the base's tokenizer files recorded. Kept, TransformerLens reloads the
    tokenizer with `add_bos_token=True`, so the model's tokenizer put that EOS first, unlike the base's. Nothing
    nla_lens tokenizes changes: the BOS was never put first."""
    if tokenizer.bos_token is not None and tokenizer.bos_token == tokenizer.eos_token and not prepends_bos(tokenizer):
        tokenizer.bos_token = None
    return tokenizer


def _set_up_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (an AR's last real token is then at -1; TL pads the AV's prompts on the left) and a pad token
    (Llama has none; its EOS, which attention masks keep out)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_tokenizer(folder: Path, meta: NLAMeta, role: Literal["av", "ar"], given: Any = None, *,
                         trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of the AV or AR in `folder`, checked against its sidecar: `given` (the `tokenizer=` of
    `from_pretrained`, loaded by the caller, and set up as `load_tokenizer` sets one up: left padding, a pad token)
    or else the folder's own. A given one that does not fit is named as the argument, since the folder's tokenizer
    files were never read."""
    if given is None:
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
        check_tokenizer(meta, tokenizer, role=role, source=str(folder / SIDECAR_NAME))
        return tokenizer
    if not isinstance(given, PreTrainedTokenizerBase):
        raise InputError(f"tokenizer= takes a loaded tokenizer (nla_lens.loading.load_tokenizer(folder)), got "
                         f"{type(given).__name__} {str(given)[:60]!r}; leave it out to load the one in {folder}")
    try:
        check_tokenizer(meta, given, role=role, source=str(folder / SIDECAR_NAME))
    except TokenizerDriftError as exc:
        raise TokenizerDriftError(f"tokenizer= is not the tokenizer of {folder} (leave it out to load that one): "
                                  f"{exc}") from exc
    return _set_up_padding(given)


def truncate_config(config: Any, n_layers: int) -> None:
    """Cut an HF (text) config to its first `n_layers` blocks, in place: the AR backbone's shape. Gemma-3 and
    newer Qwen configs list a per-block `layer_types` that must shrink with it."""
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:n_layers]


def load_hf_config(folder: Path, *, trust_remote_code: bool = False) -> Any:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; point at an HF checkpoint folder")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, StrictDataclassError) as exc:
        # Not JSON, not a mapping, no or an unknown model_type, a field of the wrong type ("hidden_size": "64")
        # or out of step with another (num_hidden_layers vs layer_types): transformers' untyped errors.
        lines = [line.strip() for line in str(exc).strip().splitlines()]
        reason = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1]) or type(exc).__name__
        raise CheckpointError(f"{folder}/config.json cannot be read as a model config ({reason}); restore the "
                              "config.json saved with the checkpoint (nla_lens loads "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)})") from exc


def check_config(folder: Path, meta: NLAMeta, tokenizer: PreTrainedTokenizerBase | None = None, *,
                 trust_remote_code: bool = False) -> None:
    """The sidecar fits the model config.json describes (d_model, at least K+1 blocks), before any weight
    is read: a sidecar copied into another checkpoint's folder is reported here, not after the load. So does
    `tokenizer`: one with more tokens than the embedding has rows is another model's (an id past them fails
    mid-run, on a GPU as a device-side assert)."""
    config = load_hf_config(folder, trust_remote_code=trust_remote_code).get_text_config()
    vocab_size = getattr(config, "vocab_size", None)
    if tokenizer is not None and vocab_size is not None and len(tokenizer) > vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, but config.json's vocab_size is "
                              f"{vocab_size}: the tokenizer files are another model's; copy the tokenizer files saved "
                              "with the checkpoint (tokenizer.json, tokenizer_config.json) into the folder")
    d_model, blocks = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if d_model is not None and d_model != meta.d_model:
        raise SidecarError(f"{folder}: the sidecar says d_model={meta.d_model} but config.json has hidden_size="
                           f"{d_model}: the sidecar belongs to another checkpoint. Copy the nla_meta.yaml released "
                           "with this checkpoint into the folder")
    if blocks is not None and blocks <= meta.layer:  # more is fine: an AR folder of full depth, blocks past K unread
        raise CheckpointError(
            f"{folder}: the sidecar reads layer K={meta.layer}, which needs K+1={blocks_phrase(meta.layer + 1)}, but "
            f"config.json has num_hidden_layers={blocks}: the sidecar and weights are from different checkpoints; "
            "fix the sidecar's layer or use the folder the checkpoint was exported to"
        )


def eos_token_ids(folder: Path, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids as HF `generate` uses them: generation_config.json first, then the tokenizer."""
    gen = folder / "generation_config.json"
    restore = "load the tokenizer and generation_config.json saved with the checkpoint"
    ids: Any = None
    if gen.is_file():
        try:
            config = json.loads(gen.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{gen} is not valid JSON ({exc}); {restore}") from exc
        ids = config.get("eos_token_id") if isinstance(config, dict) else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None or ids == []:
        raise CheckpointError(f"{folder} names no EOS token (generation_config.json eos_token_id, or the "
                              f"tokenizer's eos_token), so the AV could never stop: {restore}")
    ids = [ids] if not isinstance(ids, list) else ids
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise CheckpointError(f"{gen}: eos_token_id must be a token id or a list of token ids, got {ids!r}; {restore}")
    return sorted(set(ids))


def context_length(hf_config: Any) -> int | None:
    """The n_ctx `hooked_config` gives the model, from its config.json: known before the weights load, so texts and
    training rows are checked against it first. None where the config does not say."""
    return getattr(hf_config.get_text_config(), "max_position_embeddings", None)


def hooked_config(hf_config: Any, *, n_layers: int | None, dtype: torch.dtype,
                  device: str | torch.device) -> HookedTransformerConfig:
    """TL config for the Qwen3 / Qwen2 / Llama / Gemma-3 families, n_ctx taken from the HF config."""
    arch = (hf_config.architectures or [None])[0]
    if arch in gemma3.ARCHITECTURES:
        hf_config = gemma3.text_config(hf_config)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"architecture {arch!r} is not supported yet; nla_lens loads {SUPPORTED_ARCHITECTURES}"
        )
    rope = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if arch not in gemma3.ARCHITECTURES and rope_type not in ("default", "llama3"):
        raise CheckpointError(f"rope scaling {rope_type!r} is not supported yet (nla_lens serves default and "
                              "llama3 rotary embeddings, and Gemma-3's)")
    if arch not in gemma3.ARCHITECTURES:
        _refuse_sliding_layers(hf_config, n_layers)
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    n_kv = hf_config.num_key_value_heads
    family = gemma3.hooked_config_fields(hf_config) if arch in gemma3.ARCHITECTURES else {
        "act_fn": hf_config.hidden_act,
        "rotary_base": float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        "use_qk_norm": arch == "Qwen3ForCausalLM",
        **(_llama3_rope_fields(scaling, hf_config.max_position_embeddings) if rope_type == "llama3" else {}),
    }
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
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        default_prepend_bos=False,
        init_weights=False,
        dtype=dtype,
        device=str(device),
        **family,
    )


def _refuse_sliding_layers(hf_config: Any, n_layers: int | None) -> None:
    """A Qwen config with `use_sliding_window: true` gives blocks from `max_window_layers` on sliding-window
    attention in HF; the HookedTransformer built here attends to every earlier token, so past the window each such
    block computed something else (a tiny Qwen2, window 4, 14 tokens: logits 0.5 off). Gemma-3 serves its own."""
    layer_types = list(getattr(hf_config, "layer_types", None) or [])[:n_layers]
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if sliding:
        raise CheckpointError(
            f"blocks {sliding} of this checkpoint use sliding-window attention (config.json: use_sliding_window, "
            f"sliding_window={getattr(hf_config, 'sliding_window', None)}), which nla_lens's HookedTransformer does "
            "not model on Qwen / Llama blocks: it would attend past the window. Load it with backend='bridge', "
            "which runs HF's own attention"
        )


def _llama3_rope_fields(scaling: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """Llama-3.1 / 3.3's `rope_type: llama3` (Llama-3.3-70B's NLA pair) as TL models it: NTK-by-parts
    frequencies, the formula of HF's `_compute_llama3_parameters`, read as TL 3.9's own loader reads them."""
    return {
        "use_NTK_by_parts_rope": True,
        "NTK_original_ctx_len": scaling.get("original_max_position_embeddings", max_positions),
        "NTK_by_parts_low_freq_factor": scaling.get("low_freq_factor", 1.0),
        "NTK_by_parts_high_freq_factor": scaling.get("high_freq_factor", 4.0),
        "NTK_by_parts_factor": scaling.get("factor", 1.0),
    }


def read_safetensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) from one safetensors file, one tensor in memory at a time.

    Reads into fresh buffers instead of mmapping the file, so touched file pages never pile up in
    the process's resident memory while a multi-GB shard is converted.
    """
    for name, info, f in _safetensors_entries(path):
        buffer = bytearray(info.nbytes)
        _read_exactly(f, memoryview(buffer), path)
        tensor = torch.frombuffer(buffer, dtype=info.dtype) if buffer else torch.empty(0, dtype=info.dtype)
        yield name, tensor.reshape(info.shape)


@dataclass(frozen=True)
class _TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def _safetensors_entries(path: Path) -> Iterator[tuple[str, _TensorInfo, BufferedReader]]:
    """(name, info, file positioned at its data) for each tensor of one file, in file order."""
    with open(path, "rb") as f:
        header = _safetensors_header(f, path)
        start = f.tell()
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} is stored as {info['dtype']}, which nla_lens does not "
                                      f"read ({', '.join(_SAFETENSORS_DTYPES)}); save the weights as bf16 or fp32")
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            yield name, _TensorInfo(_SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), end - begin), f


def _safetensors_header(f: BinaryIO, path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors header (metadata dropped); `f` is left at the data."""
    size = path.stat().st_size
    try:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(f"a {header_len}-byte header in a {size}-byte file")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        for info in header.values():
            begin, end = info["data_offsets"]
            if not (isinstance(info["dtype"], str) and isinstance(info["shape"], list) and 0 <= begin <= end):
                raise ValueError(f"a malformed entry {info!r}")
    except (struct.error, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}): it is truncated or corrupt; "
                              "download it again") from exc
    return header


def check_weight_files(folder: Path, *, wrapped: bool = False, n_blocks: int | None = None) -> list[Path]:
    """The weight files of `folder`, each header read (no tensor data), so a truncated or corrupt file, or
    weights stored as integers, are refused before any weight is read, on both backends (HF's loader raises
    a bare SafetensorError on the first and casts the second to float without a word). `wrapped`: a
    multimodal wrapper's folder, whose vision tensors are never read and so not checked. `n_blocks`: the
    blocks config.json gives a full model; weights of a block past them would be dropped without a word."""
    files = _weight_files(folder)
    for file in files:
        with open(file, "rb") as f:
            header = _safetensors_header(f, file)
            data_start = f.tell()
        size = file.stat().st_size
        for name, info in header.items():
            text_name = gemma3.text_tensor_name(name) if wrapped else name
            if text_name is None:
                continue
            block = _LAYER.match(text_name)
            if n_blocks is not None and block is not None and int(block[1]) >= n_blocks:
                raise CheckpointError(
                    f"{file} holds {name}, a block past the {n_blocks} of {folder}/config.json (num_hidden_layers): "
                    "config.json is another checkpoint's (an AR's K+1 blocks?) and the model would lose blocks. "
                    "Restore the config.json saved with these weights")
            end = data_start + info["data_offsets"][1]
            if end > size:
                raise CheckpointError(f"{file} ends early (tensor {name} needs byte {end}, the file has {size}): the "
                                      "file is truncated or corrupt; download it again")
            if name.endswith((".weight", ".bias")) and not info["dtype"].startswith(("F", "BF")):
                raise _integer_weight_error(name, info["dtype"], file)
    return files


def _integer_weight_error(name: str, dtype: str, path: Path) -> CheckpointError:
    """Weights and biases are floats; an integer or bool one is a quantized (int8, GPTQ) or damaged checkpoint."""
    return CheckpointError(f"{path}: tensor {name} is stored as {dtype}, but model weights are floating point: a "
                           "quantized or damaged checkpoint. nla_lens reads unquantized bf16 / fp16 / fp32 weights; "
                           "load the unquantized release, or download the file again")


def _read_exactly(f: BufferedReader, out: memoryview, path: Path) -> None:
    done = 0
    while done < len(out):
        n = f.readinto(out[done:done + _READ_CHUNK])
        if not n:
            raise CheckpointError(f"{path} ends early: the file is truncated or corrupt; download it again")
        done += n


def _read_into(f: BufferedReader, info: _TensorInfo, target: Tensor, path: Path, buffer: bytearray) -> None:
    """Fill `target` (contiguous, laid out as in the file) with one tensor's bytes.

    Same dtype on the CPU: read straight into the parameter's memory. Otherwise go through one
    reusable host buffer a chunk at a time, so a cast (bf16 -> fp32) or a device copy never holds
    a second full-size tensor.
    """
    flat = target.view(-1)
    if info.nbytes == 0:
        return
    if target.device.type == "cpu" and target.dtype == info.dtype:
        _read_exactly(f, flat.view(torch.uint8).numpy().data, path)
        return
    itemsize = info.dtype.itemsize
    step = len(buffer) // itemsize
    for first in range(0, flat.numel(), step):
        count = min(step, flat.numel() - first)
        view = memoryview(buffer)[:count * itemsize]
        _read_exactly(f, view, path)
        flat[first:first + count].copy_(torch.frombuffer(view, dtype=info.dtype))


def weight_index(folder: Path) -> dict[str, Any] | None:
    """`folder`'s `model.safetensors.index.json` (None: there is none), its weight_map checked to name a weight
    file in `folder` for each tensor: a damaged one got a bare TypeError here, or an IndexError inside
    transformers, and `../x.safetensors` or an absolute path was read from outside the checkpoint."""
    path = folder / WEIGHT_INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        files = list(index["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a weight index with a weight_map ({exc}); download it again") from exc
    wrong = [file for file in files if not isinstance(file, str) or not file]
    if not files or wrong:
        found = "no tensor" if not files else f"{wrong[0]!r} as a file"
        raise CheckpointError(f"{path} names {found}: its weight_map must give each tensor the name of the "
                              "safetensors file that holds it. The index is damaged; download it again")
    outside = [file for file in files if _leaves_folder(file)]
    if outside:  # a checkpoint is read as untrusted input: it names files, never a path elsewhere on the machine
        raise CheckpointError(f"{path} names {outside[0]!r}, a file outside {folder}: nla_lens reads a checkpoint's "
                              "weights from its own folder only. Put the weight files in the folder and name them "
                              "there (model-00001-of-00002.safetensors), or download the checkpoint again")
    return index


def _leaves_folder(name: str) -> bool:
    """A weight_map name that points outside its folder by POSIX or by Windows rules: a root or drive (`/x`, `\\x`,
    `C:x`, `\\\\server\\share\\x`) or a `..` part. Checked by both on every OS: on Windows `\\x` is not
    `is_absolute()` yet joins to the drive's root, and a checkpoint should load, or be refused, alike everywhere.
    Lexical only: a weight file that is a symlink (the HF cache's snapshots link into blobs/) is read as usual."""
    return any(path.anchor or ".." in path.parts for path in (PurePosixPath(name), PureWindowsPath(name)))


def _weight_files(folder: Path) -> list[Path]:
    index = weight_index(folder)
    if index is not None:
        shards = sorted(set(index["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: {len(missing)} of the {len(shards)} weight shards its index lists are "
                                  f"missing ({', '.join(missing[:3])}): the download is incomplete; download again")
        return [folder / name for name in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{folder} holds no model.safetensors (or index): nla_lens loads safetensors only, "
        "never pickle. Convert .bin weights with transformers' save_pretrained(safe_serialization=True)."
    )


_SIMPLE_NAMES = {
    "input_layernorm.weight": "ln1.w",
    "post_attention_layernorm.weight": "ln2.w",
    **hf_names.ATTENTION_AND_MLP,
}


def _tl_name(name: str, cfg: HookedTransformerConfig) -> str | None:
    """TL parameter name for one HF Qwen/Llama/Gemma-3 tensor; None for tensors TL has no place for."""
    if name == "model.embed_tokens.weight":
        return "embed.W_E"
    if name == "model.norm.weight":
        return "ln_final.w"
    if name == "lm_head.weight":
        return "unembed.W_U"
    match = _LAYER.match(name)
    if match is None:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if layer >= cfg.n_layers:
        return None
    if rest == "self_attn.rotary_emb.inv_freq":  # a buffer older transformers saved; RoPE comes from config.json
        return None
    prefix = f"blocks.{layer}."
    simple_names = gemma3.BLOCK_NAMES if cfg.original_architecture in gemma3.ARCHITECTURES else _SIMPLE_NAMES
    if rest in simple_names:
        return prefix + simple_names[rest]
    proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
    if proj is None:
        raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint; is it a supported architecture?")
    head, kind = proj.group(1).upper(), "W" if proj.group(2) == "weight" else "b"
    gqa = "_" if cfg.n_key_value_heads is not None and head != "Q" else ""
    return f"{prefix}attn.{gqa}{kind}_{head}"


def _hf_layout(tl_name: str, shape: torch.Size) -> tuple[tuple[int, ...], Callable[[Tensor], Tensor] | None]:
    """The HF shape of a TL parameter, and how to view HF-layout storage as the TL tensor.

    The view is None where the TL tensor already has HF's memory layout (embeddings, norms,
    biases). Attention and MLP matrices get HF-layout storage: TL's forward rearranges them to
    HF's `[out, in]` before every `F.linear`, which is then a free view instead of a copy of every
    weight on every forward, and the matmuls see exactly HF's operands.
    """
    leaf = tl_name.rsplit(".", 1)[-1]
    if leaf in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):  # TL [n, m, h] <- HF [(n h), m]
        n, m, h = shape
        return (n * h, m), lambda s: s.view(n, h, m).permute(0, 2, 1)
    if leaf == "W_O":  # TL [n, h, m] <- HF [m, (n h)]
        n, h, m = shape
        return (m, n * h), lambda s: s.view(m, n, h).permute(1, 2, 0)
    if leaf in ("W_in", "W_gate", "W_out", "W_U"):  # TL [in, out] <- HF [out, in]
        return (shape[1], shape[0]), lambda s: s.T
    if leaf in ("b_Q", "b_K", "b_V", "_b_K", "_b_V"):  # TL [n, h] <- HF [(n h)]
        return (shape.numel(),), None
    return tuple(shape), None


# q/k/v of a block share one HF-layout storage, rows in this order, so the fast decoder
# (decoding.py) runs them as one matmul.
_FUSED = {"W_Q": ("qkv", 0), "W_K": ("qkv", 1), "_W_K": ("qkv", 1), "W_V": ("qkv", 2), "_W_V": ("qkv", 2)}


def _allocate_hf_layout(model: HookedTransformer, device: str | torch.device) -> dict[str, Tensor]:
    """Give each meta parameter of `model` uninitialised storage on `device`; return, per TL name, a
    contiguous HF-shaped tensor sharing that storage, to stream bytes into.

    Parameters whose TL layout differs from HF's become strided views of HF-layout storage; q/k/v of
    each block are consecutive rows of one storage (see `_FUSED`). Each parameter's storage is
    allocated once, here: none is first given a TL-layout copy to be replaced (on a GPU that held
    both, a peak of about 1.6x the weights; on the CPU untouched pages never showed).
    """
    targets: dict[str, Tensor] = {}
    groups: dict[str, list[tuple[int, str, nn.Parameter]]] = {}
    for tl_name, param in list(model.named_parameters()):  # meta parameters: the list holds no storage
        module_name, leaf = tl_name.rsplit(".", 1)
        if leaf in _FUSED and module_name.startswith("blocks."):
            kind, rank = _FUSED[leaf]
            groups.setdefault(f"{module_name.rsplit('.', 1)[0]}.{kind}", []).append((rank, tl_name, param))
            continue
        hf_shape, view = _hf_layout(tl_name, param.shape)
        storage = torch.empty(hf_shape, dtype=param.dtype, device=device)
        _replace_parameter(model, tl_name, param, storage, view or _view_as(param.shape))
        targets[tl_name] = storage
    for members in groups.values():
        members.sort(key=lambda member: member[0])
        layouts = [_hf_layout(name, param.shape) for _, name, param in members]
        first = members[0][2]
        storage = torch.empty(sum(shape[0] for shape, _ in layouts), layouts[0][0][1], dtype=first.dtype,
                              device=device)
        start = 0
        for (_, name, param), (shape, view) in zip(members, layouts, strict=True):
            assert view is not None  # `_hf_layout` views every q/k/v matrix
            targets[name] = storage[start:start + shape[0]]
            _replace_parameter(model, name, param, targets[name], view)
            start += shape[0]
    return targets


def _view_as(shape: torch.Size) -> Callable[[Tensor], Tensor]:
    """The view of storage that already has the TL tensor's layout: its shape."""
    return lambda storage: storage.view(shape)


def _replace_parameter(model: HookedTransformer, tl_name: str, param: nn.Parameter, storage: Tensor,
                       view: Callable[[Tensor], Tensor]) -> None:
    module_name, attr = tl_name.rsplit(".", 1)
    setattr(model.get_submodule(module_name), attr, nn.Parameter(view(storage), param.requires_grad))


def _stream_weights(folder: Path, targets: dict[str, Tensor], cfg: HookedTransformerConfig, *,
                    skip: frozenset[str], wrapped: bool = False) -> set[str]:
    """Read checkpoint tensors straight into their targets; return the TL names written.

    `wrapped`: a multimodal wrapper's folder, whose text tensors are renamed as the text-only
    model's and whose other tensors (vision tower, projector) are skipped without being read.
    """
    written: set[str] = set()
    buffer = bytearray(_CAST_CHUNK)
    for file in _weight_files(folder):
        for stored_name, info, f in _safetensors_entries(file):
            name = gemma3.text_tensor_name(stored_name) if wrapped else stored_name
            if name is None or name in skip:
                continue
            tl_name = _tl_name(name, cfg)
            if tl_name is None or tl_name not in targets:
                continue
            target = targets[tl_name]
            if tuple(target.shape) != info.shape:
                raise misshapen_weight(folder, name, info.shape, target.shape)
            _read_into(f, info, target, file, buffer)
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
        raise missing_weights(folder, missing)


def missing_weights(folder: Path, missing: list[str]) -> CheckpointError:
    """The error for a checkpoint whose weight files lack tensors the model needs, with what to do about it."""
    return CheckpointError(f"{folder} lacks weights for {missing[:6]} ({len(missing)} in all): its weight files are "
                           "incomplete (an interrupted download, a shard left out) or belong to another model than "
                           "config.json describes; download the checkpoint again")


def misshapen_weight(folder: Path, name: str, found: Sequence[int], wanted: Sequence[int]) -> CheckpointError:
    """The error for a checkpoint tensor whose shape is not the one its folder's config.json gives it: one of the
    two was replaced (a config.json copied from another checkpoint, weights of another size)."""
    return CheckpointError(f"{name} in {folder} has shape {tuple(found)}, but its config.json makes it "
                           f"{tuple(wanted)}: config.json and the weights disagree, so one of them belongs to another "
                           "model. Restore the config.json saved with these weights, or download the checkpoint again")


def _meta_hooked_transformer(cfg: HookedTransformerConfig,
                             tokenizer: PreTrainedTokenizerBase | None) -> HookedTransformer:
    """A `HookedTransformer` on the meta device: its modules and hook names, no storage."""
    with torch.device("meta"), warnings.catch_warnings():
        # TL 3.9 urges TransformerBridge + enable_compatibility_mode(), whose weight processing would change
        # the activations the NLA reads: nla_lens serves both backends unprocessed, so the advice does not apply.
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        if tokenizer is None:
            return HookedTransformer(cfg, move_to_device=False)
        return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="left")


def check_hook_point(folder: Path, hook_point: str, *, backend: str, trust_remote_code: bool = False) -> None:
    """Refuse a hook point the model will not have before any weight is read (a typo in a sidecar or an
    argument cost a full load): a block index past config.json's layers on either backend, and on the
    hooked backend any name a one-block `HookedTransformer` of this config lacks. The bridge's own
    names are checked once it is built; its resid_mid, which takes no writes, here."""
    hf_config = load_hf_config(folder, trust_remote_code=trust_remote_code)
    n_layers = gemma3.text_config(hf_config).num_hidden_layers
    block = re.fullmatch(r"blocks\.(0|[1-9]\d*)\.(.+)", hook_point)
    if block and int(block[1]) >= n_layers:
        raise InjectionError(f"hook point {hook_point!r} names block {block[1]}, but {folder}/config.json has "
                             f"{blocks_phrase(n_layers)}; fix the injection hook_point")
    if backend != "hooked":
        backends.check_patchable_on(backend, hook_point)
        return
    one_block = _meta_hooked_transformer(hooked_config(hf_config, n_layers=1, dtype=torch.float32, device="meta"),
                                         tokenizer=None)
    name = f"blocks.0.{block[2]}" if block else hook_point
    if name not in one_block.hook_dict:
        # Suggested in the block asked for (or as blocks.<N>. where none was): the model has its own copy of each
        in_block = [n.replace("blocks.0.", f"blocks.{block[1] if block else '<N>'}.", 1) for n in one_block.hook_dict]
        raise InjectionError(f"hook point {hook_point!r} does not exist in this model; "
                             f"{did_you_mean(hook_point, in_block)}pick one of model.hook_dict, e.g. "
                             "'blocks.1.hook_resid_post' or 'hook_embed'")


def _share_block_buffers(model: HookedTransformer, cfg: HookedTransformerConfig, device: str | torch.device) -> None:
    """Give the meta model's buffers (rotary tables, masks) real values on `device`, computed once per
    distinct block (a Gemma-3 model has one local and one global kind) and shared by the layers alike:
    TL replaces a buffer when it grows one, never edits it in place. Building the model on the meta
    device keeps TL's per-layer temporaries out of memory; this keeps its buffers at one copy per kind.
    """
    reference_buffers: dict[tuple[type, str | None], dict[str, Tensor]] = {}
    restored: set[str] = set()
    for index, block in enumerate(model.blocks):
        kind = (type(block), getattr(block.attn, "attn_type", None))
        if kind not in reference_buffers:
            with torch.device(device):
                reference_buffers[kind] = dict(type(block)(cfg, index).named_buffers())
        for name, buffer in reference_buffers[kind].items():
            module_name, attr = f"blocks.{index}.{name}".rsplit(".", 1)
            model.get_submodule(module_name).register_buffer(attr, buffer)
            restored.add(f"blocks.{index}.{name}")
    unrestored = sorted(name for name, _ in model.named_buffers() if name not in restored)
    if unrestored:
        raise RuntimeError(f"nla_lens does not know how to initialise TransformerLens buffers {unrestored[:4]}: "
                           "this TransformerLens version is newer than nla_lens supports")


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
    wrapped = gemma3.is_wrapper(hf_config)
    check_weight_files(folder, wrapped=wrapped,
                       n_blocks=None if n_layers is not None else gemma3.text_config(hf_config).num_hidden_layers)
    cfg = hooked_config(hf_config, n_layers=n_layers, dtype=dtype, device=device)
    cfg.default_prepend_bos = prepends_bos(tokenizer)
    hf_config = gemma3.text_config(hf_config)
    if n_layers is not None and n_layers > hf_config.num_hidden_layers:
        raise CheckpointError(f"{folder} has {hf_config.num_hidden_layers} layers, {n_layers} requested")
    model = _meta_hooked_transformer(cfg, tokenizer)
    truncated = n_layers is not None
    if truncated:  # the AR reads the raw residual: no final norm, no unembed, and no storage for them
        model.ln_final = nn.Identity()
        model.unembed = nn.Identity()  # type: ignore[assignment]  # TL types it Unembed; the AR has none
        model.setup()
    _share_block_buffers(model, cfg, device)  # first: the block it builds is freed before the weights are allocated
    targets = _allocate_hf_layout(model, device)
    skip = frozenset({"model.norm.weight", "lm_head.weight"}) if truncated else frozenset()
    written = _stream_weights(folder, targets, cfg, skip=skip, wrapped=wrapped)
    if not truncated and getattr(hf_config, "tie_word_embeddings", False) and "unembed.W_U" not in written:
        with torch.no_grad():
            targets["unembed.W_U"].copy_(targets["embed.W_E"])
        written.add("unembed.W_U")
    if cfg.original_architecture in gemma3.ARCHITECTURES:
        gemma3.finish_hooked(model, cfg.d_model)
    _zero_absent_biases(model, written)
    _check_complete(model, written, folder)
    return model.eval()


def check_checkpoint_files(folder: Path, meta: NLAMeta, role: Literal["av", "ar"] | None, *,
                           trust_remote_code: bool = False) -> None:
    """What loading `role` would refuse in the weight files, without reading the model's weights (`nla-lens
    inspect`): the files' headers, and an AR's readout (one [d, d] matrix)."""
    hf_config = load_hf_config(folder, trust_remote_code=trust_remote_code)
    full_depth = None if role == "ar" else gemma3.text_config(hf_config).num_hidden_layers
    check_weight_files(folder, wrapped=gemma3.is_wrapper(hf_config), n_blocks=full_depth)
    if role == "ar":
        load_readout(folder, meta.d_model, dtype=torch.float32, device="cpu")


def readout_file(folder: Path) -> Path:
    """The AR readout's file, `value_head.safetensors`; where it is missing, a CheckpointError saying what to do."""
    path = folder / VALUE_HEAD_FILE
    if not path.is_file():
        pickled = sorted(p.name for p in folder.glob("value_head.*") if p.suffix in (".bin", ".pt", ".pth"))
        # nanoNLA sidecars name no role: an AV folder given as an AR reaches this point.
        convert = (f"; if it is an AV, load it with ActivationVerbalizer.from_pretrained, else copy in the "
                   f"{VALUE_HEAD_FILE} released with the AR") if not pickled else (
            f". It holds {pickled[0]}, a pickle, which nla_lens never loads (unpickling can run code): convert it "
            "where you trust it, safetensors.torch.save_file({'weight': <its [d_model, d_model] tensor>.contiguous()}, "
            f"'{VALUE_HEAD_FILE}')")
        raise CheckpointError(f"{folder} has no {VALUE_HEAD_FILE}: an AR checkpoint carries its readout there (a "
                              f"`weight` of shape [d_model, d_model]){convert}")
    return path


def load_readout(folder: Path, d_model: int, *, dtype: torch.dtype, device: str | torch.device) -> nn.Linear:
    """The AR's `Linear(d, d, bias=False)` readout from `value_head.safetensors` (`weight` [d, d])."""
    path = readout_file(folder)
    tensors = dict(read_safetensors(path))
    weight = tensors.get("weight")
    if weight is not None and not weight.is_floating_point():
        raise _integer_weight_error("weight", str(weight.dtype).removeprefix("torch."), path)
    if weight is None or tuple(weight.shape) != (d_model, d_model):
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        raise CheckpointError(f"{path} must hold `weight` of shape [{d_model}, {d_model}], found {found}")
    readout = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        readout.weight.copy_(weight)
    return readout.eval()
