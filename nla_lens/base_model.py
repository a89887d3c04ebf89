"""The base model an NLA reads, loaded as TransformerLens sees it with no weight processing.

`load_base` takes the folder from the caller or from the sidecar's `base_model` (a local folder or a
hub id in the local HF cache; the bundled toy's name resolves to the bundled base). It goes through
`nla_lens.backends`, so activations equal HF's: TL's default processing (centering, folded norms)
would change the residual stream the NLA was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nla_lens import backends, loading
from nla_lens.checks import blocks_phrase, warn_at_caller
from nla_lens.errors import CheckpointError, InputError, PairMismatchError
from nla_lens.nla import NLA, shares_vocabulary
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.sidecar import NLAMeta, prepends_bos
from nla_lens.verbalizer import ActivationVerbalizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nla_lens.backends import TLModel

_PASS_BASE = "pass the base model's folder: --base path/to/base (nla-lens explain) or nl.load_base('path/to/base')"


def load_base(source: NLA | ActivationVerbalizer | ActivationReconstructor | NLAMeta | str | Path, *,
              device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
              backend: str | None = None) -> TLModel:
    """Load the base model: `source` is a folder (or cached hub id), or an NLA / AV / AR / NLAMeta whose
    sidecar names it (`base_model`). Checks d_model and depth against the NLA before reading weights."""
    meta = _meta_of(source)
    folder = _base_folder(source, meta)
    loading.check_base_folder(folder, str(folder), None if meta is None else meta.base_model)
    config = loading.load_hf_config(folder).get_text_config()  # a Gemma-3 wrapper keeps the sizes in text_config
    if meta is not None:
        d_model, n_layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
        if d_model is not None and d_model != meta.d_model:
            raise PairMismatchError(f"{folder} has d_model={d_model} but the NLA reads {meta.d_model}-d vectors: "
                                    "it is not the base model this NLA was trained on")
        if n_layers is not None and n_layers <= meta.layer:
            raise PairMismatchError(f"{folder} has {n_layers} layers but the NLA reads layer {meta.layer}: it is "
                                    "not the base model this NLA was trained on")
    return backends.load_model(folder, loading.load_tokenizer(folder), backend=backend, dtype=dtype, device=device)


def check_base_model(base: TLModel, nla_or_av: NLA | ActivationVerbalizer, layer: int | None = None) -> None:
    """`base` can be the model the NLA reads: a TransformerLens model of the NLA's d_model (with a block `layer`, if
    given, and no more blocks than the AV) whose tokenizer, if it has one, has the AV's vocabulary. The AV's own
    model runs too, but it is fine-tuned: a warning, as for an AV folder. The AR's model is refused, as an AR folder
    is: its first K+1 blocks run, fine-tuned, and look plausible. Another width or vocabulary, or too few blocks to
    reach `layer`, is a `PairMismatchError`, as from `load_base` and `--base`: a base the NLA does not read; so are
    more blocks than the AV's (a full copy of the base), as from `--base`. Fewer blocks that still reach `layer` run:
    a base cut short to capture cheaply."""
    av = nla_or_av.av if isinstance(nla_or_av, NLA) else nla_or_av
    backends.backend_of(base)
    backends.check_holds_weights(base, "base")
    if isinstance(nla_or_av, NLA) and base is nla_or_av.ar.model:
        raise InputError("the base model given is the AR's own model (a fine-tuned copy of the base's first K+1 "
                         "blocks): its activations are not the ones the NLA was trained to read. Pass the base "
                         "model (nl.load_base(nla))")
    if base.cfg.d_model != av.meta.d_model:
        raise PairMismatchError(f"the base model has d_model={base.cfg.d_model} but this NLA reads "
                                f"{av.meta.d_model}-d vectors; pass the base model the NLA was trained on "
                                "(nl.load_base(nla) loads the one its sidecar names)")
    if layer is not None and base.cfg.n_layers <= layer:
        raise PairMismatchError(f"the base model has {blocks_phrase(base.cfg.n_layers)}, but this NLA reads layer "
                                f"{layer}; pass the base model the NLA was trained on")
    if base.cfg.n_layers > av.model.cfg.n_layers:  # fewer reaching layer K is a cheap capture; more is another model
        raise PairMismatchError(f"the base model has {blocks_phrase(base.cfg.n_layers)}, more than the "
                                f"{av.model.cfg.n_layers} of this NLA's AV, a full copy of the base it reads: it is "
                                "another base, whose activations the NLA was not trained to read. Pass the base model "
                                "the NLA was trained on (nl.load_base(nla) loads the one its sidecar names)")
    if base.tokenizer is not None and not shares_vocabulary(base.tokenizer, av.tokenizer):
        raise PairMismatchError(f"the base model's tokenizer has another vocabulary than the NLA's "
                                f"({len(base.tokenizer)} and {len(av.tokenizer)} tokens): it is another base, whose "
                                "activations the NLA was not trained to read. Pass the base model the NLA was "
                                "trained on (nl.load_base(nla) loads the one its sidecar names)")
    if base.tokenizer is not None:  # after the vocabularies: another family is named as such
        check_bos_rule(base.tokenizer, av.tokenizer)
    if base is av.model:
        warn_at_caller("the base model given is the AV's own model, a fine-tuned copy: its activations are not the "
                       "ones the NLA was trained to read. Pass the base model (nl.load_base(nla))")


def check_bos_rule(base_tokenizer: PreTrainedTokenizerBase, nla_tokenizer: PreTrainedTokenizerBase) -> None:
    """A PairMismatchError where the base's tokenizer puts a BOS first and the NLA's does not, or the reverse (one
    loaded with another `add_bos_token`): the texts would start unlike those the NLA was trained on, and every
    residual after would move. The vocabularies are `check_base_model`'s to compare."""
    difference = bos_rule_difference(base_tokenizer, nla_tokenizer)
    if difference is not None:
        raise PairMismatchError(f"the base model's tokenizer {difference}: its texts would not be tokenized as the "
                                "NLA's training texts were. Set base.tokenizer = nla.av.tokenizer, or load the base "
                                "with nl.load_base(nla)")


def bos_rule_difference(base_tokenizer: PreTrainedTokenizerBase, nla_tokenizer: PreTrainedTokenizerBase) -> str | None:
    """How the base's tokenizer and the NLA's differ in putting a BOS first ("puts a BOS first and the NLA's tokenizer
    does not"), None where they agree; `nla-lens` checks it before any weight loads, `explain` on the live models."""
    base_adds = prepends_bos(base_tokenizer)
    if base_adds == prepends_bos(nla_tokenizer):
        return None
    return ("puts a BOS first and the NLA's tokenizer does not" if base_adds
            else "puts no BOS first and the NLA's tokenizer does")


def _meta_of(source: object) -> NLAMeta | None:
    if isinstance(source, NLA):
        return source.av.meta
    if isinstance(source, (ActivationVerbalizer, ActivationReconstructor)):
        return source.meta
    if isinstance(source, NLAMeta):
        return source
    if isinstance(source, (str, Path)):
        return None
    # The bundled toy (nl.toy.load()) is not an NLA but carries its base already.
    toy = "; it carries its base model already: use its .base" if hasattr(source, "base") else ""
    raise InputError(f"load_base takes a folder, a hub id, or an NLA / AV / AR; got {type(source).__name__}{toy}")


def _base_folder(source: object, meta: NLAMeta | None) -> Path:
    if meta is None:
        return loading.resolve_checkpoint(source)  # type: ignore[arg-type]
    return sidecar_base_folder(meta)


def sidecar_base_folder(meta: NLAMeta) -> Path:
    """The folder of the base model the sidecar names (`base_model`: a path, a cached hub id, or the toy's)."""
    name = meta.base_model
    if name is None:
        raise CheckpointError(f"the sidecar does not name its base model (no base_model entry); {_PASS_BASE}")
    try:
        return loading.named_base_folder(name)
    except CheckpointError as exc:
        if loading.looks_like_path(name):
            moved = "" if Path(name).expanduser().is_absolute() else " (a relative one resolves only from there)"
            raise CheckpointError(f"the sidecar names base model {loading.missing_folder(name)}. An export records "
                                  f"the base model's path where it was trained{moved}; {_PASS_BASE}") from exc
        raise CheckpointError(f"the sidecar names base model {name!r}, which is neither a local folder nor in "
                              f"the local HF cache. Download it (hf download {name}), or {_PASS_BASE}") from exc
