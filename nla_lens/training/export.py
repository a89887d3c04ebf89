"""Export trained TransformerLens models as HF folders that `from_pretrained` reads with no flags.

The weight converter is the inverse of `loading._tl_targets` for the Qwen3 / Qwen2 / Llama
families. TransformerLens carries biases those HF models lack (o_proj, MLP, unembed, and q/k/v
except in Qwen2); `freeze_weights_hf_lacks` keeps them frozen at zero during training and
the exporter refuses to drop one that is not zero.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from nla_lens import backends, loading, metrics
from nla_lens.backends import gemma3
from nla_lens.checks import counted, first_few, warn_at_caller
from nla_lens.errors import CheckpointError, ConfigError, TokenizerDriftError
from nla_lens.nla import MIN_BASELINE_VECTORS
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.sidecar import SIDECAR_NAME, InjectionSpec, NLAMeta, ar_prompt_ids, av_prompt_ids, dump_meta, load_meta
from nla_lens.training.parallel import current_world, gathered_on_main, whole
from nla_lens.vector_files import link_target, replaced_folders, save_tensors
from nla_lens.verbalizer import ActivationVerbalizer

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from nla_lens.backends import TLModel

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ROLE_NAMES = {"av": "AV", "ar": "AR"}
Role = Literal["av", "ar"]
_SAME = {"ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight",
         "attn.q_norm.w": "self_attn.q_norm.weight", "attn.k_norm.w": "self_attn.k_norm.weight"}


def has_qkv_bias(hf_config: Any) -> bool:
    """Qwen2 has q/k/v biases. (Llama / Qwen3 with `attention_bias` also bias o_proj; the loader
    refuses those checkpoints, so they never reach the exporter.)"""
    return (hf_config.architectures or [None])[0] == "Qwen2ForCausalLM"


def _hf_target(name: str, tensor: Tensor, qkv_bias: bool) -> tuple[str, Tensor] | None:
    """HF name and value for one TL parameter; None for a TL-only bias (which must be zero)."""
    if name == "embed.W_E":
        return "model.embed_tokens.weight", tensor
    if name == "ln_final.w":
        return "model.norm.weight", tensor
    if name == "unembed.W_U":
        return "lm_head.weight", tensor.T
    if name == "unembed.b_U":
        return None
    match = _BLOCK.match(name)
    if match is None:
        raise CheckpointError(f"no HF counterpart known for {name!r}; export supports "
                              f"{loading.SUPPORTED_ARCHITECTURES}")
    prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
    if rest in _SAME:
        return prefix + _SAME[rest], tensor
    proj = re.fullmatch(r"attn\._?([Wb])_([QKV])", rest)
    if proj is not None:
        kind, head = proj.groups()
        hf = f"{prefix}self_attn.{head.lower()}_proj."
        if kind == "W":
            return hf + "weight", einops.rearrange(tensor, "n m h -> (n h) m")
        return (hf + "bias", einops.rearrange(tensor, "n h -> (n h)")) if qkv_bias else None
    if rest == "attn.W_O":
        return prefix + "self_attn.o_proj.weight", einops.rearrange(tensor, "n h m -> m (n h)")
    mlp = {"mlp.W_in": "mlp.up_proj.weight", "mlp.W_gate": "mlp.gate_proj.weight", "mlp.W_out": "mlp.down_proj.weight"}
    if rest in mlp:
        return prefix + mlp[rest], tensor.T
    if rest in ("attn.b_O", "mlp.b_in", "mlp.b_out"):
        return None
    raise CheckpointError(f"no HF counterpart known for {name!r}")


def hf_state_dict(model: HookedTransformer, *, qkv_bias: bool,
                  dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The model's weights under HF Qwen/Llama names (no final norm / lm_head for a truncated AR).

    FSDP-sharded weights are gathered whole: under `torchrun` every rank must call this, and only
    rank 0 keeps them (the dict is empty on the others).
    """
    backends.require_hooked("export", model)
    check_trainable(model)
    keep = current_world().is_main
    out = {}
    for name, param in model.named_parameters():
        weight = whole(param.detach())
        target = _hf_target(name, weight, qkv_bias)
        if target is None:
            if bool(weight.any()):
                raise CheckpointError(
                    f"{name} is not zero, but {model.cfg.original_architecture} has no such weight; "
                    "train with freeze_weights_hf_lacks(model, hf_config) so it stays zero"
                )
            continue
        hf_name, value = target
        if keep:
            out[hf_name] = value.to(dtype or value.dtype).contiguous().cpu()
    return out


def check_trainable(model: HookedTransformer) -> None:
    """Refuse a Gemma-3 model before training (and export): the exporter has no way back to its HF weights."""
    if model.cfg.original_architecture in gemma3.ARCHITECTURES:
        # TL stores Gemma's norms as 1 + w and W_E pre-scaled by sqrt(d); no inverse is written yet.
        raise CheckpointError("training and exporting a Gemma-3 NLA is not supported yet: nla_lens serves Gemma-3 "
                              "checkpoints and extracts Gemma-3 activations, but trains Qwen / Llama bases only")


def freeze_weights_hf_lacks(model: HookedTransformer, hf_config: Any | None = None) -> list[str]:
    """Freeze (at zero) the TL parameters the HF architecture has no weight for; return their names.

    Without `hf_config`, the architecture TL recorded (`cfg.original_architecture`) decides. A Gemma-3
    model is refused (`check_trainable`)."""
    check_trainable(model)
    qkv_bias = (has_qkv_bias(hf_config) if hf_config is not None
                else model.cfg.original_architecture == "Qwen2ForCausalLM")
    frozen = []
    for name, param in model.named_parameters():
        if _hf_target(name, param.detach(), qkv_bias) is None:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def model_sidecar(dataset: NLAMeta, role: str, *, injection: InjectionSpec | None = None,
                  injection_scale: float | None = None, stage: str = "sft") -> dict[str, Any]:
    """The `nla_model` schema-2 sidecar of an AV or AR trained on `dataset` (an `nla_dataset` meta).

    Unlike the released sidecars it records the injection (`method`, `hook_point`) explicitly.
    """
    tokens = {
        "injection_char": dataset.injection_char,
        "injection_token_id": dataset.injection_token_id,
        "injection_left_neighbor_id": dataset.injection_left_neighbor_id,
        "injection_right_neighbor_id": dataset.injection_right_neighbor_id,
        "critic_suffix_ids": None if dataset.critic_suffix_ids is None else list(dataset.critic_suffix_ids),
    }
    sidecar: dict[str, Any] = {
        "kind": "nla_model", "schema_version": 2, "role": role, "stage": stage,
        "d_model": dataset.d_model, "extraction_layer_index": dataset.layer,
        "extraction": {"base_model": dataset.base_model, "injection_scale": injection_scale,
                       "mse_scale": dataset.mse_scale},
        "tokens": tokens,
        "prompt_templates": {"av": dataset.av_template, "ar": dataset.ar_template},
    }
    if "tokenization" in dataset.raw:  # the BOS rule base text and AR prompts were tokenized with
        sidecar["tokenization"] = dataset.raw["tokenization"]
    if role == "av":
        if injection is None:
            raise CheckpointError("an AV sidecar needs its injection (method and hook point)")
        sidecar["injection"] = {"method": injection.method, "hook_point": injection.hook_point}
    else:
        sidecar["critic"] = {"extraction_layer_index": dataset.layer}
        sidecar["ar"] = {"num_hidden_layers": dataset.layer + 1}
    return sidecar


def _hf_config(base_model: str | Path, *, n_layers: int | None, untie: bool, dtype: torch.dtype) -> Any:
    config = loading.load_hf_config(loading.resolve_checkpoint(base_model))
    if n_layers is not None:
        loading.truncate_config(config, n_layers)
    if untie:  # the AV's embedding and unembedding were trained apart
        config.tie_word_embeddings = False
    config.dtype = str(dtype).removeprefix("torch.")
    return config


# The tokenizer's files, which of them depending on the tokenizer's class and the transformers version that saved it
# (vocab.json and merges.txt for Qwen's, tokenizer.model for a sentencepiece one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "additional_chat_templates", "vocab.json", "merges.txt",
                   "tokenizer.model")

# Every name an export (or the toy's base) writes into its folder: the model's config, weights and generation config,
# the AR's readout, the sidecar, and the tokenizer's files. A re-export replaces these whole; any other file in the
# folder is the user's.
EXPORT_FILES = frozenset({
    "config.json", "model.safetensors", "generation_config.json", loading.VALUE_HEAD_FILE, SIDECAR_NAME,
    *TOKENIZER_FILES,
})

# Files the operating system writes into a folder a user merely opens (macOS Finder's .DS_Store, Windows Explorer's
# Thumbs.db and desktop.ini; AppleDouble ._* files beside each file copied to a non-Mac disk): not the user's, so they
# go with the folder an export replaces.
OS_METADATA_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def check_export_folder(folder: str | Path, role: Literal["av", "ar"]) -> None:
    """Refuse a folder that holds an NLA export of the other role: the export replaces its folder whole, and
    would destroy it. Refuse a sharded model's folder too (a base, a released NLA): its weight index outranks the
    export's single file; and a file, a folder of files but no sidecar, or an earlier export with files beside it
    that no export writes (`EXPORT_FILES`), which the export would delete, and a symlink that leads round a loop,
    which `replaced_folders` refuses only once the weights are trained. The OS's metadata files (`OS_METADATA_FILES`,
    AppleDouble `._*`) are no user's: they block nothing, and go with the folder."""
    folder = Path(folder)
    if folder.is_symlink():
        link_target(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, and an export writes a folder there; export into a new folder")
    if (folder / SIDECAR_NAME).is_file():  # the other role first: the most specific way on
        found = loading.checkpoint_role(folder, load_meta(folder))
        if found is not None and found != role:
            raise ConfigError(
                f"{folder} already holds an NLA {_ROLE_NAMES[found]} (its {SIDECAR_NAME} says role: {found}), so an "
                f"{_ROLE_NAMES[role]} cannot be exported there without destroying it. Point out_dir at another "
                f"folder, or, if this config is the {_ROLE_NAMES[found]}'s, run it with nla-lens train-{found}"
            )
    if (folder / loading.WEIGHT_INDEX).is_file():  # never written here, and read before model.safetensors
        raise ConfigError(f"{folder} holds {loading.WEIGHT_INDEX}, which an export does not write and which loading "
                          "reads before the exported model.safetensors, so the folder would load the weights its index "
                          "names, not the trained ones. Export into a new folder (or remove the index and its "
                          "shards)")
    if not (folder / SIDECAR_NAME).is_file() and folder.is_dir() and _users_entries(folder):
        raise ConfigError(f"{folder} holds files but no {SIDECAR_NAME}, so it is no NLA export, and an export "
                          "replaces its folder whole: they would be deleted. Export into a new or empty folder "
                          "(or, if it is an export that was cut short, delete it)")
    check_no_foreign_files(folder, "an export replaces its folder whole", "export into another folder")


def check_no_foreign_files(folder: Path, replaced: str, elsewhere: str) -> None:
    """Refuse a folder about to be replaced whole that holds files no export writes (`EXPORT_FILES`): a user's notes
    or results beside an earlier export (not the OS's metadata files). `replaced` says what replaces it, `elsewhere`
    the other way on."""
    foreign = sorted(path.name + ("/" if path.is_dir() else "") for path in _users_entries(folder)
                     if path.name not in EXPORT_FILES) if folder.is_dir() else []
    if foreign:
        raise ConfigError(f"{folder} holds {counted(len(foreign), 'file')} that no export writes "
                          f"({first_few(foreign)}), and {replaced}: they would be deleted. Move them out of {folder}, "
                          f"or {elsewhere}")


def _users_entries(folder: Path) -> list[Path]:
    """The entries of `folder` that a user may have put there: all but the OS's metadata files."""
    return [path for path in folder.iterdir()
            if not (path.is_file() and (path.name in OS_METADATA_FILES or path.name.startswith("._")))]


def _export_backbone(model: TLModel, folder: Path, staged: Path, base_model: str | Path, *, n_layers: int | None,
                     untie: bool, dtype: torch.dtype) -> bool:
    """Gather the weights (every rank), then on rank 0 write `config.json` + `model.safetensors` into `staged`,
    the folder that becomes `folder` (`_staged`).

    Returns whether this rank wrote them, i.e. whether it goes on to write the rest of the folder.
    """
    backends.require_hooked("export", model)
    config = _hf_config(base_model, n_layers=n_layers, untie=untie, dtype=dtype)
    weights = hf_state_dict(cast("HookedTransformer", model), qkv_bias=has_qkv_bias(config), dtype=dtype)
    if not current_world().is_main:
        return False
    _check_finite_weights(weights, folder, dtype)
    staged.mkdir(parents=True)
    config.save_pretrained(staged)
    save_tensors(weights, staged / "model.safetensors", {"format": "pt"})
    return True


def _check_finite_weights(weights: dict[str, Tensor], folder: Path, dtype: torch.dtype) -> None:
    """Refuse to write NaN or infinite weights (a diverged run, or values past the export dtype's range): the folder
    would load and verbalize or reconstruct garbage, with only the run's last loss to tell."""
    bad = [name for name, weight in weights.items() if not torch.isfinite(weight).all()]
    if bad:
        raise ConfigError(f"not exporting to {folder}: {len(bad)} of {counted(len(weights), 'weight tensor')} "
                          f"{'holds' if len(bad) == 1 else 'hold'} NaN or inf in {str(dtype).removeprefix('torch.')} "
                          f"({first_few(bad)}). The training diverged (a loss of nan), or a weight exceeds the export "
                          "dtype's range: lower lr and train again, or export in float32")


def export_av(av: ActivationVerbalizer, folder: str | Path, base_model: str | Path, *,
              dtype: torch.dtype = torch.float32, stage: str | None = None,
              before_swap: Callable[[], object] | None = None) -> Path:
    """Write the AV as an HF folder + tokenizer + generation_config + `nla_meta.yaml` (role av). The tokenizer's
    files are `base_model`'s, copied as they are there (for an NLA checkpoint as `base_model`, those of the base its
    sidecar names: `tokenizer_source`), and refused with a `TokenizerDriftError` where they tokenize the sidecar's
    prompts otherwise than `av.tokenizer` (`check_tokenizer_files`).

    `stage` ("sft", "rl") replaces the sidecar's record of the training stage. The folder is written beside its
    place and then renamed into it, replacing an earlier export whole (`replaced_folders`): an export cut short
    leaves the old folder as it was; `before_swap` runs just before the rename (`replaced_folders`), on rank 0. A
    folder holding an AR, files but no sidecar, or files no export writes beside an earlier export, is refused; a
    symlink's target is written, the link kept. Under `torchrun` every rank calls this (to gather FSDP shards) and
    rank 0 writes.
    """
    folder = Path(folder)
    check_export_folder(folder, "av")
    with _staged([folder], before_swap) as (staged,):
        _write_av(av, folder, staged, base_model, dtype=dtype, stage=stage)
    return folder


def export_ar(ar: ActivationReconstructor, folder: str | Path, base_model: str | Path, *,
              dtype: torch.dtype = torch.float32, heldout: Float[Tensor, "n d_model"] | None = None,
              stage: str | None = None, before_swap: Callable[[], object] | None = None) -> Path:
    """Write the AR as a truncated HF folder (K+1 layers, no norm / lm_head) + `value_head.safetensors`, with
    `base_model`'s tokenizer files, as `export_av` copies them.

    `heldout` (the held-out layer-K vectors, e.g. the eval split) puts their paper baseline and count
    in the sidecar (`fve_baseline: {value, n}`), the baseline `NLA.round_trip` then uses by default; fewer
    than `MIN_BASELINE_VECTORS` of them put none (a warning says so).
    `stage` ("sft", "rl") replaces the sidecar's record of the training stage. Written and renamed into place as
    `export_av` is, `before_swap` too; a folder is refused as there, one holding an AV in place of one holding an AR.
    Under `torchrun` every rank calls this (to gather FSDP shards) and rank 0 writes.
    """
    folder = Path(folder)
    check_export_folder(folder, "ar")
    with _staged([folder], before_swap) as (staged,):
        _write_ar(ar, folder, staged, base_model, dtype=dtype, heldout=heldout, stage=stage)
    return folder


def export_pair(av: ActivationVerbalizer, ar: ActivationReconstructor, folders: tuple[Path, Path],
                base_models: tuple[str | Path, str | Path], *, dtype: torch.dtype = torch.float32,
                heldout: Float[Tensor, "n d_model"] | None = None, stage: str | None = None,
                before_swap: Callable[[], object] | None = None) -> tuple[Path, Path]:
    """`export_av` and `export_ar` into `folders` (AV, AR), both renamed into place only once both are written:
    exported one after the other, a run cut short between them left the new AV beside the old AR, a pair that
    loads and was never trained together (train-rl extending a run). `base_models`: each one's, as there;
    `before_swap` runs once, just before the two renames."""
    for folder, role in zip(folders, ("av", "ar"), strict=True):
        check_export_folder(folder, cast(Literal["av", "ar"], role))
    with _staged(list(folders), before_swap) as (av_staged, ar_staged):
        _write_av(av, folders[0], av_staged, base_models[0], dtype=dtype, stage=stage)
        _write_ar(ar, folders[1], ar_staged, base_models[1], dtype=dtype, heldout=heldout, stage=stage)
    return folders


@contextlib.contextmanager
def _staged(folders: list[Path], before_swap: Callable[[], object] | None) -> Iterator[list[Path]]:
    """Where to write `folders`: `replaced_folders` on rank 0, the one that writes; the other ranks only gather."""
    if not current_world().is_main:
        yield folders
        return
    with replaced_folders(folders, before_swap) as staged:
        yield staged


def _write_av(av: ActivationVerbalizer, folder: Path, staged: Path, base_model: str | Path, *, dtype: torch.dtype,
              stage: str | None) -> None:
    """The AV's export, written into `staged` (messages name `folder`, where it goes)."""
    if not _export_backbone(av.model, folder, staged, base_model, n_layers=None, untie=True, dtype=dtype):
        return
    # `verbalize` stops on these ids (loading.eos_token_ids reads this file first).
    GenerationConfig(eos_token_id=av.eos_token_ids, pad_token_id=av.tokenizer.pad_token_id).save_pretrained(staged)
    _write_tokenizer_files(av.tokenizer, av.meta, "av", base_model, staged)
    spec = av.injection_spec  # what the AV was trained with, even where its sidecar left it implicit
    dump_meta({**_exported_sidecar(av.meta, stage), "injection": {"method": spec.method,
                                                                   "hook_point": spec.hook_point}}, staged)


def _write_ar(ar: ActivationReconstructor, folder: Path, staged: Path, base_model: str | Path, *,
              dtype: torch.dtype, heldout: Tensor | None, stage: str | None) -> None:
    """The AR's export, written into `staged` (messages name `folder`, where it goes)."""
    readout = {name: weight.to(dtype) for name, weight in gathered_on_main([("weight", ar.readout.weight)]).items()}
    _check_finite_weights(readout, folder, dtype)  # before the backbone's files are written
    if not _export_backbone(ar.model, folder, staged, base_model, n_layers=ar.meta.layer + 1, untie=False,
                            dtype=dtype):
        return
    save_tensors(readout, staged / loading.VALUE_HEAD_FILE)
    _write_tokenizer_files(ar.tokenizer, ar.meta, "ar", base_model, staged)
    dump_meta({**_exported_sidecar(ar.meta, stage), **_baseline_block(heldout, ar.meta)}, staged)


def _write_tokenizer_files(tokenizer: PreTrainedTokenizerBase, meta: NLAMeta, role: Role, base_model: str | Path,
                           staged: Path) -> None:
    """Copy the tokenizer files `tokenizer_source` picks for `base_model` into `staged`, and check they tokenize as
    `tokenizer`, the one training used (`check_tokenizer_files`)."""
    source = tokenizer_source(loading.resolve_checkpoint(base_model), tokenizer, meta, role)
    copy_tokenizer_files(source, staged)
    check_tokenizer_files(tokenizer, staged, meta, role, source=source)


def tokenizer_source(folder: Path, tokenizer: PreTrainedTokenizerBase, meta: NLAMeta, role: Role) -> Path:
    """The folder whose tokenizer files an export of a model initialised from `folder` copies: `folder` itself, a
    base model; for an NLA checkpoint (train-rl's SFT pair), the base model its sidecar names where this machine has it
    and it tokenizes as `tokenizer`, the one training used (an NLA exported before nla_lens copied its base's files
    recorded its EOS as a BOS the base lacks); else the checkpoint's own files, which the export then checks."""
    if not (folder / SIDECAR_NAME).is_file():
        return folder
    name = load_meta(folder).base_model
    if name is None:
        return folder
    try:
        base = loading.named_base_folder(name)
        check_tokenizer_files(tokenizer, base, meta, role, source=base)
    except (CheckpointError, TokenizerDriftError):  # not here, or not its base (the toy's name, trained elsewhere)
        return folder
    return base


def check_tokenizer_source(folder: Path, role: Role) -> None:
    """Refuse, before training, the tokenizer files an export of a model initialised from the NLA (`role`) in `folder`
    would copy (`tokenizer_source`) where they tokenize otherwise than the tokenizer training loads from `folder`: the
    export refuses them too (`check_tokenizer_files`), but only once the run is over."""
    tokenizer, meta = loading.load_tokenizer(folder), load_meta(folder)
    if tokenizer_source(folder, tokenizer, meta, role) == folder:  # a base it picks has passed the same check
        check_tokenizer_files(tokenizer, folder, meta, role, source=folder)


_PROBE_EXPLANATION = "The text is about a cat."  # what the AR template is filled with to probe it


def check_tokenizer_files(tokenizer: PreTrainedTokenizerBase, folder: Path, meta: NLAMeta, role: Role, *,
                          source: Path) -> None:
    """A `TokenizerDriftError` where the tokenizer files in `folder` (copied from `source`) tokenize the prompts of the
    AV or AR (`role`) otherwise than `tokenizer`, the one training used, read as nla_lens reads a folder or as
    TransformerLens does (`add_bos_token=True`, under which a BOS the base lacks goes first): the export would be
    served, or read by other tools, with other prompts than those it was trained on."""
    trained = _probe_ids(tokenizer, meta, role)
    readings = (("as nla_lens reads them", loading.load_tokenizer(folder)),
                ("as TransformerLens reads a folder (add_bos_token=True)",
                 AutoTokenizer.from_pretrained(folder, add_bos_token=True)))
    for how, files in readings:
        for probe, ids in _probe_ids(files, meta, role).items():
            if ids != trained[probe]:
                at = next((i for i, (a, b) in enumerate(zip(ids, trained[probe], strict=False)) if a != b),
                          min(len(ids), len(trained[probe])))
                raise TokenizerDriftError(
                    f"the tokenizer files of {source}, read {how}, tokenize {probe} otherwise than the tokenizer "
                    f"training used ({tokenizer.name_or_path}): from token {at}, {_tokens(files, ids[at:])} where "
                    f"training had {_tokens(tokenizer, trained[probe][at:])}, so an export would carry another "
                    f"tokenizer than the one it was trained with. {_tokenizer_fix(source)}")


def _probe_ids(tokenizer: PreTrainedTokenizerBase, meta: NLAMeta, role: Role) -> dict[str, list[int]]:
    """The ids of the AV's or AR's prompts (`role`) as training tokenized them, by name, where the sidecar has the
    template: the AV prompt through the chat template and its template's text with special tokens (where a BOS goes),
    or the AR prompt."""
    if role == "av" and meta.av_template is not None:
        return {"the AV prompt": av_prompt_ids(meta, tokenizer),
                "the AV template's text": list(tokenizer.encode(meta.av_prompt(), add_special_tokens=True))}
    if role == "ar" and meta.ar_template is not None:
        return {"the AR prompt": ar_prompt_ids(meta, tokenizer, _PROBE_EXPLANATION)}
    return {}


def _tokens(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The first few of `ids` as tokens, for a message."""
    shown = ", ".join(repr(token) for token in tokenizer.convert_ids_to_tokens(ids[:4]))
    return f"[{shown}{', ...' if len(ids) > 4 else ''}]"


def _tokenizer_fix(source: Path) -> str:
    if (source / SIDECAR_NAME).is_file():  # `tokenizer_source` found no base to copy from
        return (f"{source} is an NLA checkpoint, and the base model its sidecar names ({load_meta(source).base_model}) "
                "is not on this machine, or tokenizes otherwise too, so there are no base's files to copy (an NLA "
                "exported before nla_lens copied them records its EOS as a BOS the base lacks): make that base "
                f"available here (its folder, or hf download), or copy its tokenizer files into {source}")
    return (f"Export with the tokenizer files of the base model the checkpoint was trained from: {source} holds "
            "another tokenizer (another base, or files replaced since training)")


def copy_tokenizer_files(source: Path, staged: Path) -> None:
    """Copy the tokenizer's files byte for byte from `source` (`tokenizer_source`), not the live tokenizer's: it is no
    longer the one they hold: TransformerLens sets its `bos_token` to the EOS where it has none (Qwen), and
    saved, every exported Qwen NLA recorded a BOS its base never had, which TransformerLens, loading the folder,
    then put first."""
    for name in TOKENIZER_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, staged / name)
        elif path.is_file():
            shutil.copyfile(path, staged / name)


def _baseline_block(heldout: Tensor | None, meta: NLAMeta) -> dict[str, Any]:
    """Round trips use the sidecar's baseline whatever its `n`, so one of fewer than `MIN_BASELINE_VECTORS`
    vectors (noise, README "Scores") is not written: it would set every later FVE."""
    if heldout is None:
        return {}
    n = heldout.shape[0]
    if n < MIN_BASELINE_VECTORS:
        if meta.fve_baseline is None:
            warn_at_caller(f"the exported AR's sidecar records no fve_baseline: {n} held-out vectors are too few "
                           f"for a trustworthy one (need >= {MIN_BASELINE_VECTORS}), so its round trips need "
                           f"baseline= or >= {MIN_BASELINE_VECTORS} vectors at once. Hold out more vectors "
                           "(eval_fraction) to record one")
        return {}
    return {"fve_baseline": {"value": metrics.paper_baseline(heldout.float(), meta.mse_scale), "n": int(n)}}


def _exported_sidecar(meta: NLAMeta, stage: str | None) -> dict[str, Any]:
    """The sidecar to write: `stage` replaces the recorded one, and a base model named by a local folder
    is recorded by its absolute path, so the export finds its base from any working directory (a hub id
    stays a hub id)."""
    raw = meta.raw if stage is None else {**meta.raw, "stage": stage}
    absolute = None if meta.base_model is None else loading.recorded_path(meta.base_model)
    if absolute is None or absolute == meta.base_model:
        return raw
    extraction = raw.get("extraction")
    if isinstance(extraction, dict) and "base_model" in extraction:
        return {**raw, "extraction": {**extraction, "base_model": absolute}}
    return {**raw, "base_model": absolute}
