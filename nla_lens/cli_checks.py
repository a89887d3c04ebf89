"""Checks of `nla-lens` arguments that read only small files (sidecars, configs, tokenizers), run before any
model is loaded. Their messages name the command-line flag to change; the library's own checks
(`nla_lens.checks`) name the Python argument.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

from nla_lens import loading
from nla_lens.checks import blocks_phrase
from nla_lens.errors import InputError, PairMismatchError
from nla_lens.nla import shares_vocabulary
from nla_lens.sidecar import NLAMeta

_FLAGS = {"av": "--av", "ar": "--ar"}


def nla_checkpoint(path_or_id: str | Path, role: Literal["av", "ar"]) -> tuple[Path, NLAMeta]:
    """The folder and sidecar passed as `--av` or `--ar`, checked to be a checkpoint of that role."""
    folder, meta = loading.nla_checkpoint(path_or_id, role, _FLAGS)
    if role == "ar" and not (folder / loading.VALUE_HEAD_FILE).is_file():
        raise InputError(f"--ar {path_or_id} has no {loading.VALUE_HEAD_FILE}, the readout every AR checkpoint "
                         "carries, so it is not an AR (an AV folder?). Give --ar the AR trained with your AV")
    return folder, meta


def base_for(path_or_id: str | Path | None, av_folder: Path, av_meta: NLAMeta, av_tokenizer: PreTrainedTokenizerBase,
             layer: int | None = None) -> tuple[Path, PreTrainedTokenizerBase]:
    """The folder and tokenizer of the base model to capture from, `--base` (None: the one the AV's sidecar names),
    checked against the AV's folder, sidecar and tokenizer before any model is loaded. `layer` is `--layer`, None
    where it was left out (the AV's own layer).

    An AR can never serve (it is truncated), nor a base of another width or vocabulary, too shallow to reach the AV's
    layer or deeper than the AV (a full copy of its base), or whose tokenizer puts a BOS first where the AV's puts
    none (or the reverse): the NLA was not trained to read it (PairMismatchError). A `--layer` outside the base is an
    InputError. An AV folder or a layer other than the sidecar's runs, with a warning, since explaining them is
    possible but off the distribution the AV was trained on.
    """
    from nla_lens.base_model import bos_rule_difference, sidecar_base_folder

    from_sidecar = path_or_id is None
    folder = sidecar_base_folder(av_meta) if path_or_id is None else loading.resolve_checkpoint(path_or_id)
    base = _sidecar_base(av_meta, folder) if from_sidecar else f"--base {path_or_id}"
    loading.check_base_folder(folder, base, av_meta.base_model)
    # The library's own checks say nl.load_base(nla); a shell user gives --base or leaves it out.
    pass_base = "give --base the base model this NLA was trained on" + (
        f", or leave --base out to use the one its sidecar names ({av_meta.base_model})"
        if av_meta.base_model and not from_sidecar else "")
    config = loading.load_hf_config(folder).get_text_config()  # multimodal wrappers keep it in text_config
    if config.hidden_size != av_meta.d_model:
        raise PairMismatchError(f"{base} has d_model {config.hidden_size}, the AV reads vectors of "
                                f"{av_meta.d_model}: {pass_base}")
    n_blocks = config.num_hidden_layers
    if n_blocks <= av_meta.layer:
        raise PairMismatchError(f"{base} has {blocks_phrase(n_blocks)}, and the AV reads layer {av_meta.layer}: it "
                                f"is another base, whose activations the NLA was not trained to read; {pass_base}")
    av_blocks = loading.load_hf_config(av_folder).get_text_config().num_hidden_layers
    if n_blocks > av_blocks:
        raise PairMismatchError(f"{base} has {blocks_phrase(n_blocks)}, more than the {av_blocks} of the AV, a full "
                                "copy of the base it reads: it is another base, whose activations the NLA was not "
                                f"trained to read; {pass_base}")
    base_tokenizer = loading.load_tokenizer(folder)
    if not shares_vocabulary(base_tokenizer, av_tokenizer):
        raise PairMismatchError(f"{base} has a tokenizer of another vocabulary than the AV's "
                                f"({len(base_tokenizer)} and {len(av_tokenizer)} tokens): it is another base, whose "
                                f"activations the NLA was not trained to read; {pass_base}")
    difference = bos_rule_difference(base_tokenizer, av_tokenizer)
    if difference is not None:  # explain refused it too, but only once every model's weights had loaded
        raise PairMismatchError(f"{base} has a tokenizer that {difference}: its texts would not be tokenized as the "
                                f"NLA's training texts were; {pass_base}")
    if layer is not None and not 0 <= layer < n_blocks:
        raise InputError(f"--layer {layer} is outside {base}, which has {blocks_phrase(n_blocks)}: pass one of "
                         f"those, or leave --layer out for layer {av_meta.layer}, the one this AV reads")
    if layer is not None and layer != av_meta.layer:
        warnings.warn(f"--layer {layer} differs from layer {av_meta.layer}, the one this AV was trained to read "
                      f"(its sidecar): explanations of other layers are off-distribution. Leave --layer out to "
                      f"use {av_meta.layer}", stacklevel=2)
    return folder, base_tokenizer


def _sidecar_base(av_meta: NLAMeta, folder: Path) -> str:
    """The base model the AV's sidecar names, as messages name it: with the folder it was found in, where the name
    is not that folder's path (a cached hub id, the toy's name)."""
    name = f"the sidecar's base_model {av_meta.base_model}"
    return name if str(folder) == av_meta.base_model else f"{name} (found at {folder})"
