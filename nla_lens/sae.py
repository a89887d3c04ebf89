"""SAE features read out through an NLA: verbalize sae-lens decoder directions, score them with the AR.

An SAE trained on ``blocks.K.hook_resid_post`` writes each feature ``f`` into the residual along
its decoder row ``sae.W_dec[f]`` (``[d_sae, d_in]``). The AV reads exactly that residual, so a
decoder row can be verbalized like any activation; with an AR the explanation is rebuilt into a
vector and compared with the row (cosine). [`nla_lens.feature_cards`][nla_lens.feature_cards] puts the explanation next
to the contexts the feature fires on, which is how to check it.

Needs the ``sae`` extra (``pip install 'nla_lens[sae]'``): sae-lens 6.x, which requires
transformer-lens < 4, so this module raises [`BackendError`][nla_lens.errors.BackendError] on import under
TransformerLens 4.x. The SAE itself is only read through ``W_dec``, ``encode``, ``cfg.d_in`` and
``cfg.metadata`` (``hook_name``, and ``model_name``, which a warning compares with the base's name).

``nl.capture`` on a ``HookedSAETransformer`` records the output of block K, i.e. what block K+1
reads: with an SAE attached at ``blocks.K.hook_resid_post`` that is the SAE's reconstruction, or
the original residual (reconstruction + error) when the SAE was added with ``use_error_term=True``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from numbers import Integral
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nla_lens import backends
from nla_lens.capture import activation_at, check_block, check_no_sae_at, resid_post_name, text_resid_post
from nla_lens.checks import check_counts, check_encodable, counted, is_real
from nla_lens.display import format_number
from nla_lens.errors import BackendError, InputError, SAEMismatchError, VectorError
from nla_lens.explain import bos_skip
from nla_lens.injection import check_vectors, past_float32_rows, prescaled, unit
from nla_lens.nla import (
    NLA,
    check_read_keywords,
    directionless_warning,
    nla_type_name,
    ran_on_warning,
    rows_the_ar_reads,
    scored_misses,
    too_long_warning,
    warn_at_caller,
    warn_kept,
)
from nla_lens.parsing import RowNamer
from nla_lens.results import TabularResult
from nla_lens.sae_columns import FEATURE_VERBALIZATIONS, OFFSET_COLUMNS
from nla_lens.sidecar import text_ids
from nla_lens.verbalizer import MAX_NEW_TOKENS, ActivationVerbalizer, Verbalization, Verbalizations

if TYPE_CHECKING:
    from sae_lens import SAE, HookedSAETransformer
    from transformer_lens import HookedTransformer

    from nla_lens.backends import TLModel


def require_sae_lens() -> ModuleType:
    """`sae_lens`, or a `BackendError` that says which install fixes it."""
    if backends.transformer_lens_major() >= 4:
        raise BackendError(
            "SAE features need sae-lens 6.x, which requires transformer-lens < 4 (it builds on "
            f"HookedTransformer); this environment has transformer-lens {metadata.version('transformer-lens')}. "
            f"Use a TransformerLens 3.x environment: {_install('tl3,sae')}"
        )
    try:
        import sae_lens
    except ImportError as error:
        raise BackendError(f"SAE features need sae-lens 6.x: {_install('sae')}") from error
    return sae_lens


def _install(extras: str) -> str:
    """The pip command that brings `extras`, for an installed nla_lens and for a git checkout."""
    return f"pip install 'nla_lens[{extras}]' (from a git checkout of nla_lens: pip install -e '.[{extras}]')"


require_sae_lens()


def resid_hook_names(layer: int) -> tuple[str, str]:
    """The two TL names of the residual after block `layer` (the second is the next block's input)."""
    return resid_post_name(layer), f"blocks.{layer + 1}.hook_resid_pre"


def decoder_space(sae: SAE) -> tuple[str, str | None, int]:
    """(the metadata field naming it, the hook point, the width) of where `sae`'s decoder rows are directions: an SAE
    decodes into the hook point it reads (`hook_name`, d_in); a sae-lens transcoder reads one hook point and writes
    another (`hook_name_out`, d_out), so its rows live there, whatever it reads."""
    from sae_lens import Transcoder

    if isinstance(sae, Transcoder):
        return "hook_name_out", sae.cfg.metadata.hook_name_out, sae.cfg.d_out
    return "hook_name", sae.cfg.metadata.hook_name, sae.cfg.d_in


def check_sae_reads_layer(sae: SAE, layer: int, d_model: int, *, allow_other_hook: bool = False) -> str | None:
    """The SAE's hook name, after checking its decoder rows are directions of the residual the NLA verbalizes
    (`blocks.{layer}`): the hook point an SAE reads, the one a transcoder writes; None for an SAE that records
    none, which only `allow_other_hook=True` lets in (nothing says where it reads).

    A width mismatch cannot be overridden (the vectors would not fit), nor can an SAE of the heads' z (no residual
    direction at any width); a different hook point can, with `allow_other_hook=True`, for users who know the two
    activations live in one space.
    """
    if not hasattr(sae, "W_dec") or not hasattr(getattr(sae, "cfg", None), "d_sae"):
        raise InputError(f"expected a sae-lens SAE, got {type(sae).__name__}; check the order of the arguments")
    hook_name = sae.cfg.metadata.hook_name
    field, written, width = decoder_space(sae)
    at = "" if written is None else f" ({written})"  # sae-lens's metadata answers None for a name never set
    width_name, moves = ("d_in", "reads") if field == "hook_name" else ("d_out", "writes")
    if (written or "").endswith(".hook_z") or (field == "hook_name" and sae.cfg.reshape_activations == "hook_z"):
        raise SAEMismatchError(_heads_z_refusal(written, moves))
    if width != d_model:
        raise SAEMismatchError(
            f"the SAE {moves} {width}-dim activations{at} but the NLA verbalizes "
            f"d_model={d_model} residuals; use an SAE trained on this NLA's base model"
        )
    if tuple(sae.W_dec.shape) != (sae.cfg.d_sae, width):
        raise InputError(
            f"sae.W_dec has shape {list(sae.W_dec.shape)} but a sae-lens decoder is [d_sae, {width_name}] = "
            f"{[sae.cfg.d_sae, width]}, one row per feature; if yours stores features as columns, transpose it"
        )
    if sae.cfg.metadata.hook_head_index is not None:
        of = "" if hook_name is None else f" of {hook_name}"
        raise SAEMismatchError(f"the SAE reads one attention head{of} (hook_head_index="
                               f"{sae.cfg.metadata.hook_head_index}), not the residual stream")
    if not allow_other_hook:
        _check_hooks_named(hook_name, field, written, layer)
    _check_weights_hold_values(sae)
    return hook_name


def _check_weights_hold_values(sae: SAE) -> None:
    """Refuse an SAE whose weights are on the meta device (built with device="meta", or whose weights were never
    loaded): reading its decoder rows raised a bare NotImplementedError ("Cannot copy out of meta tensor")."""
    on_meta = [name for name, tensor in sae.state_dict().items() if tensor.device.type == "meta"]
    if on_meta:
        raise VectorError(f"the SAE's {', '.join(on_meta)} {'is' if len(on_meta) == 1 else 'are'} on the meta device, "
                          "which holds no values (an SAE built with device='meta', its weights never loaded): load its "
                          "weights onto a real device, e.g. SAE.from_pretrained(..., device='cpu') or "
                          "sae.load_state_dict(weights, assign=True)")


def _heads_z_refusal(hook_name: str | None, moves: str) -> str:
    """Why an SAE of the heads' z has no direction the NLA reads, and the one its feature writes into the residual."""
    layer = re.fullmatch(r"blocks\.(\d+)\.attn\.hook_z", hook_name or "")
    block = f"base.blocks[{layer.group(1) if layer else 'L'}]"
    named = hook_name or "sae.cfg.reshape_activations='hook_z'"
    return (f"the SAE {moves} the attention heads' z ({named}), before W_O: its decoder rows are [n_heads * d_head] "
            "vectors of that space, no direction of the residual even where n_heads * d_head == d_model, so "
            "allow_other_hook=True does not let it in. What feature f writes into the residual is "
            f"einsum('hd,hdm->m', sae.W_dec[f].reshape(n_heads, d_head), {block}.attn.W_O): verbalize that with "
            "nl.verbalize_direction")


def _check_hooks_named(hook_name: str | None, field: str, written: str | None, layer: int) -> None:
    """The SAE names its hook points, and its decoder rows (at `written`, named by metadata `field`) are directions of
    the NLA's residual."""
    residual = resid_hook_names(layer)[0]
    transcoder = field == "hook_name_out"
    if written is None:
        raise SAEMismatchError(
            f"the SAE records no hook point (sae.cfg.metadata.{field} is None), so nothing says it "
            f"{'writes' if transcoder else 'reads'} {residual!r}, the residual the NLA verbalizes (layer K={layer}); "
            f"if it does, set sae.cfg.metadata.{field} = {residual!r}"
        )
    if written not in resid_hook_names(layer):
        where = (f"reads {hook_name!r} and writes {written!r}, so its decoder rows are directions of {written!r},"
                 if transcoder else f"reads {written!r}")
        raise SAEMismatchError(
            f"the SAE {where} but the NLA verbalizes {residual!r} (layer K={layer}); "
            "use an SAE of that hook point, or pass allow_other_hook=True if you know its decoder "
            "directions live in the same space"
        )
    if hook_name is None:  # a transcoder that records where it writes only: a card scans where it reads
        raise SAEMismatchError(
            f"the SAE records no hook point to read (sae.cfg.metadata.hook_name is None; it writes {written!r}), "
            "so nothing says where its encoder reads, which is where a card finds the feature's contexts; set "
            "sae.cfg.metadata.hook_name to it"
        )


def sae_hook_phrase(hook_name: str | None) -> str:
    """Where an SAE reads, as summaries name it: its hook point, or that it records none (let in by
    `allow_other_hook=True`, and taken to read the residual the NLA verbalizes)."""
    if hook_name is None:
        return "an SAE that records no hook point (taken as reading the NLA's residual: allow_other_hook=True)"
    return hook_name


SIDECAR_BASE = "the NLA sidecar's base_model"  # where a name of the base comes from, as the warning names it


def warn_of_other_model(sae: SAE, base_names: Sequence[tuple[str | None, str]]) -> list[str]:
    """The warning, emitted at the user's line and returned for a result to keep (none where the SAE names no model,
    nothing names the base, or a name matches), that `sae` was trained on another model than the base: an SAE of
    another model of the same width passes every other check, and its features are directions of another residual
    stream. `base_names`: (a name of the base or None, where it comes from), compared by `model_key`."""
    trained_on = getattr(sae.cfg.metadata, "model_name", None)
    known = [(name, where) for name, where in base_names if isinstance(name, str) and name]
    if not isinstance(trained_on, str) or not trained_on or not known:
        return []
    if model_key(trained_on) in {model_key(name) for name, _ in known}:
        return []
    base = " and ".join(f"{name!r} ({where})" for name, where in known)
    return warn_kept(f"the SAE was trained on {trained_on!r} (sae.cfg.metadata.model_name) but the base model is "
                     f"{base}: an SAE of another model reads another residual stream, even at the same width, so its "
                     "features are not directions of this one. Use an SAE trained on this base; if it is one (saved "
                     f"under another name), set sae.cfg.metadata.model_name = {known[0][0]!r} to silence this warning")


def model_key(name: str) -> str:
    """A model's name as `warn_of_other_model` compares it: the last part of a hub id or a folder path, case and
    '_' / '-' folded (`Qwen/Qwen3-8B`, `qwen3-8b` and `/models/Qwen3_8B/` alike); a folder of the HF cache
    (`.../models--Qwen--Qwen3-8B/snapshots/<commit>`, where a hub id loads from) by its repository's name."""
    parts = [part for part in re.split(r"[/\\]", name.strip()) if part]
    cached = [part for part in parts if part.startswith("models--")]
    last = cached[-1].split("--")[-1] if cached else parts[-1] if parts else name
    return last.casefold().replace("_", "-")


def tl_model_name(model: TLModel) -> str | None:
    """`model.cfg.model_name` where it names the model: not TransformerLens's "custom" (a model built from a config)
    nor the architecture nla_lens records for an HF config that names no model."""
    name = getattr(model.cfg, "model_name", None)
    return None if name in ("custom", getattr(model.cfg, "original_architecture", None)) else name


@dataclass(frozen=True, eq=False)  # == on the tensor field would raise; identity, as the result classes
class ResidualStats:
    """Mean of layer-K residuals and their spread, the RMS L2 distance from that mean.

    Decoder rows lack the mean component that every real residual carries; `offset=stats` in
    [`verbalize_sae_features`][nla_lens.sae.verbalize_sae_features] verbalizes
    ``mean + spread * W_dec[f] / ||W_dec[f]||``, a vector of the size of a real residual's deviation
    from the mean.

    Attributes:
        mean: the mean residual.
        spread: the RMS L2 distance of the residuals from `mean`.
        n: how many residuals the stats rest on.
        layer: the block the residuals came from, checked against the NLA's K; None: unknown.
    """

    mean: Float[Tensor, " d_model"]
    spread: float
    n: int
    layer: int | None = None

    def __post_init__(self) -> None:
        """A mean that is no finite [d_model] float vector would fail later: an int one in the result's repr, after
        the generation, a NaN one as 'vectors at rows [0] hold NaN or Inf' of the AV's batch. The spread is kept as
        a float, refused where no RMS distance is that (`_checked_spread`)."""
        mean = self.mean
        build = "build the stats with nl.residual_stats(base, texts, layer) or ResidualStats.from_vectors(residuals)"
        if not isinstance(mean, Tensor) or mean.ndim != 1 or not mean.is_floating_point():
            got = (f"a {mean.dtype} tensor of shape {list(mean.shape)}" if isinstance(mean, Tensor)
                   else type(mean).__name__)
            raise VectorError(f"ResidualStats.mean must be a [d_model] float tensor, the mean residual; got {got}: "
                              f"{build}")
        if mean.device.type == "meta":  # its isfinite below raised a bare RuntimeError (no values to read)
            raise VectorError(f"ResidualStats.mean is on the meta device, which holds no values: {build}")
        if not torch.isfinite(mean).all():
            raise VectorError(f"ResidualStats.mean holds NaN or Inf (residuals near the float32 limit overflow their "
                              f"sum); {build}")
        object.__setattr__(self, "spread", _checked_spread(self.spread, self.n, build))  # frozen: set once, here

    def __repr__(self) -> str:
        return (f"ResidualStats(n={self.n}, layer={self.layer}, d_model={self.mean.shape[-1]}, "
                f"spread={self.spread:.4g}, mean norm={float(self.mean.norm()):.4g})")

    @classmethod
    def from_vectors(cls, vectors: Float[Tensor, "n d_model"], layer: int | None = None) -> ResidualStats:
        """The stats of residuals already in hand (`nl.residual_stats` captures them from texts itself)."""
        if not isinstance(vectors, Tensor) or vectors.ndim != 2:
            raise VectorError(f"vectors must be a [n, d_model] tensor of residuals, got "
                              f"{list(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__}")
        if len(vectors) == 0:
            raise VectorError("no vectors given: the mean and spread need at least one residual")
        moments = RunningMoments()
        moments.add(vectors)
        return moments.stats(layer)


def _checked_spread(spread: float, n: int, build: str) -> float:
    """`spread` as a float where it is one an RMS distance can be (finite, >= 0; zero is one residual's): a NaN,
    infinite or negative one was refused only where an offset used it, a string one with a bare TypeError there."""
    if not is_real(spread):
        raise VectorError(f"ResidualStats.spread={spread!r} must be a number, the RMS distance of the residuals from "
                          f"the mean; {build}")
    value = float(spread)
    if not (math.isfinite(value) and value >= 0):
        outcome = "be NaN or Inf" if not math.isfinite(value) else "move the mean against each feature's direction"
        raise VectorError(f"ResidualStats.spread is {value} (n={n}), which no RMS distance is (they are finite and "
                          f">= 0): an offset mean + spread * W_dec[f] / ||W_dec[f]|| would {outcome}; {build}")
    return value


class RunningMoments:
    """Count, mean and sum of squared L2 distances from the mean of the residuals added so far.

    Each block's moments (float32, as the residuals) merge into the running ones in float64 by the
    parallel update of Chan, Golub & LeVeque (1979), so a scan over many texts keeps O(d_model), not
    every position.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Float[Tensor, " d_model"] | None = None  # float64, on the CPU (MPS has no float64)
        self.squares = 0.0  # sum over positions of ||x - mean||^2
        self.device: torch.device | None = None

    def add(self, block: Float[Tensor, "pos d_model"]) -> None:
        """Merge one block of residuals in (an empty one changes nothing); NaN or Inf is refused."""
        if not torch.isfinite(block).all():
            raise VectorError("vectors hold NaN or Inf, which would make the mean and spread NaN; check how they "
                              "were computed")
        if len(block) == 0:
            return
        block = block.float()
        block_mean = block.mean(dim=0)
        block_squares = float((block - block_mean).pow(2).sum())
        block_mean = block_mean.cpu().double()
        n = self.n + len(block)
        if self.mean is None:
            self.mean, self.squares, self.device = block_mean, block_squares, block.device
        else:
            delta = block_mean - self.mean
            self.mean = self.mean + delta * (len(block) / n)
            self.squares += block_squares + float(delta.pow(2).sum()) * self.n * len(block) / n
        self.n = n

    def stats(self, layer: int | None) -> ResidualStats:
        """The mean (float32, on the device of the first block) and the RMS distance from it."""
        if self.mean is None:
            raise VectorError("no residuals were added: the mean and spread need at least one")
        return ResidualStats(self.mean.float().to(self.device), math.sqrt(self.squares / self.n), self.n, layer)


def check_texts(texts: Iterable[str]) -> list[str]:
    """`texts` as a list of strings; any iterable of them passes (a pandas Series, a generator), as in `explain`."""
    items = list(texts) if isinstance(texts, Iterable) and not isinstance(texts, str) else []
    if not items:
        raise InputError(f"texts must be a non-empty list of strings, got {type(texts).__name__} {texts!r:.60} "
                         "(one text goes in a list: [text])")
    wrong = [(i, text) for i, text in enumerate(items) if not isinstance(text, str)]
    if wrong:
        i, text = wrong[0]
        raise InputError(f"texts[{i}] is {text!r:.60} ({type(text).__name__}), not a string "
                         f"({counted(len(wrong), 'such item')}); pass the texts themselves")
    for i, text in enumerate(items):
        check_encodable(text, f"texts[{i}]")
    return items


def text_residuals(base: TLModel, texts: Iterable[str], layer: int, *, max_tokens: int | None = None,
                   hook_name: str | None = None) -> list[tuple[list[int], Float[Tensor, "pos d_model"]]]:
    """(token ids, `blocks.{layer}.hook_resid_post` at every position) of each text, one run per text.

    Texts are tokenized with special tokens (a BOS first where the tokenizer has one), as the NLA
    training code extracted its activations; `max_tokens` cuts each text (default: the context, silently: the
    scans `feature_card` and `residual_stats` warn of it), and one over the base's n_ctx is an `InputError`.
    `hook_name` reads that `[pos, d]` hook point instead (an SAE of another hook, read where it fires).
    """
    return list(each_text_residuals(base, texts, layer, max_tokens=max_tokens, hook_name=hook_name))


def each_text_residuals(base: TLModel, texts: Iterable[str], layer: int, *, max_tokens: int | None = None,
                        hook_name: str | None = None, cut: list[int] | None = None,
                        ) -> Iterator[tuple[list[int], Float[Tensor, "pos d_model"]]]:
    """[`text_residuals`][nla_lens.sae.text_residuals] one text at a time, for scans that keep less than
    every position. `cut`, where given, collects the indices of the texts the base's context cut (with no
    `max_tokens`, which asks for its cut), for the scan to warn of (`warn_of_cut_texts`)."""
    texts = check_texts(texts)
    backends.backend_of(base)
    if base.tokenizer is None:
        raise InputError("the base model has no tokenizer to tokenize the texts with; load it with "
                         "nl.load_base(...), or set base.tokenizer to its tokenizer")
    layer = check_block(base, layer)
    if max_tokens is not None:
        (max_tokens,) = check_counts(1, max_tokens=max_tokens)
        check_max_tokens_fit(base, max_tokens)
    limit = max_tokens or base.cfg.n_ctx
    for i, text in enumerate(texts):
        ids = text_ids(base.tokenizer, text)
        if cut is not None and max_tokens is None and len(ids) > limit:
            cut.append(i)
        ids = ids[:limit]
        if not ids:  # an empty text where the tokenizer adds no BOS
            raise InputError(f"texts[{i}] ({text!r:.60}) has no tokens, so there is nothing to scan in it: leave it "
                             "out of texts")
        tokens = torch.tensor([ids], device=base.cfg.device)
        with torch.inference_mode():  # entered per text: a generator suspended inside it would leak it to the caller
            resid = (text_resid_post(base, tokens, layer) if hook_name is None
                     else _text_activation(base, tokens, hook_name)).float()
        yield ids, resid


def check_max_tokens_fit(base: TLModel, max_tokens: int) -> None:
    """Refuse a `max_tokens` past the base's n_ctx, before any text runs: a text that long failed mid-scan with a
    `PromptTooLongError` that named its columns, not `max_tokens` (as `extract_activations` refuses it)."""
    if max_tokens > base.cfg.n_ctx:
        raise InputError(f"max_tokens={max_tokens} is over the base model's context n_ctx={base.cfg.n_ctx}: pass "
                         f"max_tokens <= {base.cfg.n_ctx}, or none to cut each text to the context (with a warning "
                         "naming the texts cut)")


def warn_of_cut_texts(cut: list[int], n_texts: int, n_ctx: int, consequence: str) -> list[str]:
    """The warning, emitted at the user's line and returned for a result to keep (none where no text was cut), that
    the texts at `cut` were longer than the base's context and cut to it: else a scan left their ends out without a
    word."""
    if not cut:
        return []
    note = (f"{len(cut)}/{n_texts} texts are longer than the base model's context and were cut to its n_ctx={n_ctx} "
            f"tokens (texts {cut[:8]}), so {consequence}: split such texts to scan them whole")
    return warn_kept(note)


def _text_activation(base: TLModel, tokens: Int[Tensor, "1 pos"], hook_name: str) -> Float[Tensor, "pos d"]:
    """`hook_name` at every token of one unpadded text (all real, as `text_resid_post`)."""
    check_no_sae_at(base, hook_name)
    if hook_name not in base.hook_dict:
        raise SAEMismatchError(f"the SAE reads {hook_name!r}, which this base model has no hook point for; use an "
                               "SAE of this model")
    activation = activation_at(base, tokens, hook_name, attention_mask=torch.ones_like(tokens))[0]
    if activation.ndim != 2:
        raise SAEMismatchError(f"the SAE reads {hook_name!r}, whose activation is {list(activation.shape)} per text, "
                               "not [pos, d]; per-head hook points are not supported here")
    return activation


def check_skip_first(skip_first: int | None) -> int | None:
    """`skip_first` is None (leave out the BOS) or a whole number, returned as a Python int."""
    if skip_first is None:
        return None
    (skip_first,) = check_counts(0, skip_first=skip_first)
    return skip_first


def skipped(tokenizer: Any, ids: list[int], skip_first: int | None) -> int:
    """How many leading positions of a text a scan leaves out: `skip_first`, or by default (None) the BOS
    the tokenizer puts first, as `explain` does (an attention sink with a huge norm on Gemma / Llama)."""
    return bos_skip(tokenizer, ids) if skip_first is None else skip_first


def residual_stats(base: TLModel, texts: Iterable[str], layer: int, *, skip_first: int | None = None,
                   max_tokens: int | None = None) -> ResidualStats:
    """[`ResidualStats`][nla_lens.sae.ResidualStats] of layer `layer` over every position of `texts` past
    the first `skip_first` (default: past the BOS the tokenizer puts first, none on Qwen). A text longer than the
    base's n_ctx is cut to it, with a warning naming such texts; `max_tokens` (at most n_ctx) cuts shorter.

    Streams: each text's residuals merge into a running mean and spread, so memory is O(d_model) plus
    one text's residuals, however many texts there are.
    """
    skip_first = check_skip_first(skip_first)
    moments = RunningMoments()
    texts = check_texts(texts)  # a list: the warning counts them
    cut: list[int] = []
    for ids, resid in each_text_residuals(base, texts, layer, max_tokens=max_tokens, cut=cut):
        moments.add(resid[skipped(base.tokenizer, ids, skip_first):])
    warn_of_cut_texts(cut, len(texts), base.cfg.n_ctx, "their positions past it are not in the stats")
    if moments.n == 0:
        bos = " (the BOS)" if skip_first is None else ""
        raise InputError(f"no positions left after skip_first={skip_first}{bos}; use longer texts")
    return moments.stats(int(layer))  # checked by each_text_residuals: a NumPy int stored as the int it is


def offset_columns(stats: ResidualStats | None) -> dict[str, Any]:
    """The `OFFSET_COLUMNS` of one row: the stats' n, layer, mean norm and spread, or None in each."""
    if stats is None:
        return dict.fromkeys(OFFSET_COLUMNS)
    return {"offset_n": stats.n, "offset_layer": stats.layer, "offset_mean_norm": float(stats.mean.norm()),
            "offset_spread": stats.spread}


def offset_summary(stats: ResidualStats) -> str:
    """The offset in a repr, in the words of `OFFSET_COLUMNS`."""
    return f"mean of {stats.n} residuals (norm {float(stats.mean.norm()):.4g}), spread {stats.spread:.4g}"


@dataclass(frozen=True, eq=False, repr=False)
class FeatureVerbalizations(TabularResult):
    """The AV's explanations of SAE features; with an AR, how well each explanation rebuilds the feature.

    Attributes:
        features: the SAE feature indices, one per row.
        verbalizations: the AV's output for each feature.
        vectors: what the AV was given.
        hook_name: the SAE's hook point; None for an SAE that records none (`allow_other_hook=True` let it in).
        offset: True: mean residual + spread * unit decoder row; False: the decoder row.
        cosines: cos(reconstruction rescaled to the AV input's norm - offset mean, decoder row); NaN on failed
            parses, on explanations the AR cannot read within its n_ctx and on reconstructions with no direction
            (NaN, Inf or zero): a warning names those two; None without an AR.
        reconstructions: the AR's vectors; NaN rows where the parse failed or the AR could not read the
            explanation; None without an AR.
        offset_stats: the stats of the offset; saved as its n, layer, mean norm, spread.
    """

    features: list[int]
    verbalizations: list[Verbalization]
    vectors: Float[Tensor, "n d_model"]
    hook_name: str | None
    offset: bool
    cosines: Float[Tensor, " n"] | None
    reconstructions: Float[Tensor, "n d_model"] | None
    offset_stats: ResidualStats | None = None

    warnings_at = "verbalizations.warnings"  # the failed injection verbalize warned of
    display_columns = ("feature", "explanation", "parsed", "cosine")
    schema = FEATURE_VERBALIZATIONS.schema

    @property
    def explanations(self) -> list[str | None]:
        """Each feature's parsed explanation, in `features` order (None where the AV's output did not parse)."""
        return [v.explanation for v in self.verbalizations]

    def __len__(self) -> int:
        return len(self.features)

    def to_records(self) -> list[dict[str, Any]]:
        cosines = [None] * len(self) if self.cosines is None else self.cosines.tolist()
        offset = offset_columns(self.offset_stats)
        return [{"feature": f, "explanation": v.explanation, "parsed": v.explanation is not None, "text": v.text,
                 "truncated": v.truncated, "cosine": None if c is None or math.isnan(c) else c,
                 "hook_name": self.hook_name, "offset": self.offset, **offset}
                for f, v, c in zip(self.features, self.verbalizations, cosines, strict=True)]

    def summary(self) -> str:
        failed = sum(e is None for e in self.explanations)
        if self.cosines is None:
            cosine = "no AR cosine (AV only)"
        elif self.cosines.isnan().all():
            cosine = ("no AR cosine (no explanation parsed)" if failed == len(self) else
                      "no AR cosine (no reconstruction of a parsed explanation has a direction)")
        else:
            cosine = f"mean AR cosine to the decoder row {format_number(float(self.cosines.nanmean()))}"
        offset = (offset_summary(self.offset_stats) if self.offset_stats is not None
                  else "mean" if self.offset else "none")
        return (f"{counted(len(self), 'feature')} of {sae_hook_phrase(self.hook_name)}, offset={offset}, "
                f"{counted(failed, 'failed parse')}, {cosine}")


def feature_id(feature: Any) -> Any:
    """An integer id of any kind (numpy's, a 0-d tensor from iterating `topk().indices`, a 0-d array) as a Python
    int; anything else (bools, floats, a 1-element tensor) as it came, to be refused by the range check."""
    if getattr(feature, "ndim", None) == 0 and hasattr(feature, "item"):  # a 0-d tensor or numpy array, a numpy scalar
        feature = feature.item()
    return int(feature) if isinstance(feature, Integral) and not isinstance(feature, bool) else feature


def feature_ids(features: list[int] | Int[Tensor, " n_features"]) -> list[int]:
    """`features` as a list of [`feature_id`][nla_lens.sae.feature_id]s (a tensor's or array's values, any
    iterable's items); a bare id is refused, not guessed."""
    if isinstance(features, (Tensor, np.ndarray)):  # a 0-d array cannot be iterated: its tolist() is the bare id
        features = features.tolist()
    ids = list(features) if isinstance(features, Iterable) and not isinstance(features, str) else []
    if not ids:
        raise InputError(f"features must be a non-empty list of feature ids, got {features!r} "
                         "(for one feature write [f])")
    return [feature_id(f) for f in ids]


def decoder_rows(sae: SAE, features: list[int]) -> Float[Tensor, "n d_in"]:
    """`sae.W_dec[features]` as float32, after checking the ids."""
    features = feature_ids(features)
    named = _features_named(features)
    d_sae = sae.cfg.d_sae
    bad = [i for i, f in enumerate(features) if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < d_sae]
    if bad:
        raise InputError(f"{named(bad)} are not ints in 0..{d_sae - 1} (this SAE has d_sae={d_sae})")
    rows = sae.W_dec.detach()[features]
    _check_float32_range(rows, features)
    rows = rows.float()
    broken = [i for i, finite in enumerate(rows.isfinite().all(dim=1).tolist()) if not finite]
    if broken:  # check_vectors would name the rows of the batch and ask how they were computed
        raise VectorError(f"{named(broken)} have NaN or Inf in their decoder rows (sae.W_dec): the SAE's "
                          "weights are broken (a diverged training run, a float16 overflow); reload or retrain it")
    # Not the norm: it underflows to 0 for entries near 1e-23, a direction the AV injection still reads.
    zero = [i for i, empty in enumerate((rows == 0).all(dim=1).tolist()) if empty]
    if zero:
        raise InputError(f"{named(zero)} have all-zero decoder rows (sae.W_dec): such a feature writes nothing "
                         "into the residual, wherever it fires, so there is no direction to verbalize; leave it out "
                         "(the features with a direction: sae.W_dec.any(dim=1).nonzero())")
    return rows


def _check_float32_range(rows: Float[Tensor, "n d_in"], features: list[int]) -> None:
    """Float64 decoder rows float32 cannot hold, named by feature (`check_float32_range`'s rule): their `.float()`
    is inf, zero or a few coarse steps, refused as broken weights or as an all-zero row, or read as another
    direction."""
    past = past_float32_rows(rows)
    if past:
        peak = float(rows[past[0]].abs().amax())
        raise VectorError(
            f"{_features_named(features)(past)} have float64 decoder rows (sae.W_dec) past float32's range, "
            f"in which nla_lens verbalizes them: feature {features[past[0]]}'s largest entry is {peak:.3g} in "
            f"magnitude, where float32 holds {torch.finfo(torch.float32).tiny:.3g} to "
            f"{torch.finfo(torch.float32).max:.3g}, so the row would become inf, zero or a few coarse steps. Only a "
            "row's direction reaches the AV: rescale such rows into that range (sae.W_dec[f] / "
            "sae.W_dec[f].abs().amax() keeps feature f's direction) and verbalize them with nl.verbalize_direction")


def feature_vectors(rows: Float[Tensor, "n d_model"], offset: ResidualStats | None) -> Float[Tensor, "n d_model"]:
    """What the AV reads for each decoder row: the row, or `mean + spread * row / ||row||`."""
    if offset is None:
        return rows
    if not isinstance(offset, ResidualStats):
        raise InputError(f"offset must be a ResidualStats (nl.residual_stats(base, texts, layer)), got "
                         f"{type(offset).__name__}")
    if offset.mean.shape != rows.shape[1:]:
        raise VectorError(f"the offset mean has shape {list(offset.mean.shape)} but the NLA verbalizes "
                          f"d_model={rows.shape[1]} residuals; take the stats from this NLA's base model")
    if offset.spread == 0:  # one residual, or all of them alike: true stats, but no offset
        raise VectorError(f"the offset's spread is {offset.spread} (n={offset.n}): every feature would be verbalized "
                          "as the mean residual, its decoder row scaled away; take the stats over many positions, "
                          "nl.residual_stats(base, texts, layer)")
    # prescaled: the same bits as rows / ||rows|| where that norm is representable, a unit row where it is not
    return offset.mean.to(rows.device).float() + offset.spread * unit(prescaled(rows))


def verbalize_sae_features(
    av_or_nla: ActivationVerbalizer | NLA,
    sae: SAE,
    features: list[int] | Int[Tensor, " n_features"],
    *,
    offset: ResidualStats | None = None,
    allow_other_hook: bool = False,
    **verbalize_kwargs: Any,
) -> FeatureVerbalizations:
    """Explain SAE features with the NLA's AV: each feature's decoder row `sae.W_dec[f]` is verbalized.

    The SAE must read the residual the NLA verbalizes (`blocks.K.hook_resid_post`, width d_model):
    a `SAEMismatchError` otherwise; `allow_other_hook=True` accepts another hook point of that width. An SAE whose
    `sae.cfg.metadata.model_name` names another model than the sidecar's `base_model` is warned of (`model_key`
    compares them), the warning kept in `verbalizations.warnings`.
    `offset` (a [`ResidualStats`][nla_lens.sae.ResidualStats], e.g. from
    [`residual_stats`][nla_lens.sae.residual_stats]) verbalizes `mean + spread * W_dec[f] / ||W_dec[f]||`
    instead of the bare row: decoder rows lack the mean that real residuals carry. On the bundled toy the
    bare rows read better (docs/guide/sae.md, "Measured on the bundled toy").
    With an NLA, the AR rebuilds each explanation and `cosines` holds cos(reconstruction - offset mean,
    W_dec[f]), the reconstruction first rescaled to the norm of the vector the AV read (the AR's output
    norm carries no meaning); NaN where the explanation failed to parse, where its AR prompt is over the AR's
    n_ctx, and where its reconstruction has no direction (NaN, Inf or zero: an AR that overflowed float16), the last
    two named in a warning kept in `verbalizations.warnings`, as `round_trip`'s are; so are the features scored
    although their sample reached `max_new_tokens` after closing its tag (RL's reward scores such a sample as a
    miss). `verbalize_kwargs` go to
    `av.verbalize`. With an NLA, a `max_new_tokens` whose samples the AR could not read is refused before
    verbalizing (`PromptTooLongError`, as `NLA.round_trip` refuses it).

    A feature with no direction to verbalize fails the whole call before any generation, and the error names every
    such feature in `features` (a blank row would read as an explanation that failed to parse): an all-zero
    decoder row (it writes nothing into the residual) is an `InputError`, NaN or Inf in a row (broken SAE
    weights) a `VectorError`. `sae.W_dec.any(dim=1)` picks the features that have a direction.
    """
    nla = av_or_nla if isinstance(av_or_nla, NLA) else None
    av = nla.av if nla is not None else av_or_nla
    if not isinstance(av, ActivationVerbalizer):
        raise InputError(f"av_or_nla must be an ActivationVerbalizer or an NLA, got {nla_type_name(av_or_nla)}: call "
                         "nl.verbalize_sae_features(nla, sae, features), the NLA first (nl.feature_card takes it "
                         "fifth: (sae, base, texts, feature, nla))")
    hook_name = check_sae_reads_layer(sae, av.meta.layer, av.meta.d_model, allow_other_hook=allow_other_hook)
    check_read_keywords(av, verbalize_kwargs, "verbalize_sae_features")  # the AR's reconstruct takes none of them
    notes = warn_of_other_model(sae, [(av.meta.base_model, SIDECAR_BASE)])
    return read_features(av_or_nla, sae, features, hook_name, offset, notes, verbalize_kwargs)


def read_features(av_or_nla: ActivationVerbalizer | NLA, sae: SAE, features: list[int] | Int[Tensor, " n_features"],
                  hook_name: str | None, offset: ResidualStats | None, notes: list[str],
                  verbalize_kwargs: dict[str, Any]) -> FeatureVerbalizations:
    """`verbalize_sae_features` once `sae` is checked (`hook_name` is what the check gave), keeping `notes`, warnings
    already emitted, ahead of those it emits: `feature_card` warns of the SAE's model itself, knowing the base's name
    too, and warns once."""
    nla = av_or_nla if isinstance(av_or_nla, NLA) else None
    av = nla.av if nla is not None else cast(ActivationVerbalizer, av_or_nla)
    if isinstance(offset, ResidualStats) and offset.layer not in (None, av.meta.layer):
        raise InputError(
            f"the offset was measured at layer {offset.layer} but the NLA verbalizes layer K={av.meta.layer}; "
            f"take it there: nl.residual_stats(base, texts, {av.meta.layer})"
        )
    features = feature_ids(features)
    rows = decoder_rows(sae, features)
    vectors = check_vectors(feature_vectors(rows, offset), av.meta.d_model)
    check_ar_reads_samples(av_or_nla, verbalize_kwargs)
    verbalizations = av.verbalize(vectors, **verbalize_kwargs)
    if notes:
        verbalizations = Verbalizations(verbalizations, warnings=[*notes, *getattr(verbalizations, "warnings", ())])
    if nla is None:
        return FeatureVerbalizations(features, verbalizations, vectors, hook_name, offset is not None, None, None,
                                     offset)
    # Only the cosine is reported: a round trip's FVE needs a baseline over many real activations.
    reconstructions = torch.full_like(vectors, float("nan"))
    read, too_long = rows_the_ar_reads(nla.ar, [v.explanation for v in verbalizations])
    if read:
        texts = [cast(str, verbalizations[i].explanation) for i in read]
        reconstructions[read] = nla.ar.reconstruct(texts).to(vectors.device)
    if offset is not None:
        # The AR was trained on rescaled targets, so its output norm means nothing: give each reconstruction
        # the norm of the vector the AV read before the mean comes off.
        scaled = reconstructions * (vectors.norm(dim=1, keepdim=True) / reconstructions.norm(dim=1, keepdim=True))
        centred = scaled - offset.mean.to(vectors.device).float()
    else:
        centred = reconstructions
    # The row prescaled: cosine_similarity clamps the norm product at 1e-8, which a tiny row's norm falls under.
    cosines = torch.nn.functional.cosine_similarity(centred, prescaled(rows), dim=1)
    # cosine_similarity scores a zero reconstruction 0 (its norm clamped) and a NaN or Inf one NaN, as a failed parse
    directionless = sorted(scored_misses(reconstructions) & set(read))  # not the too long: no reconstruction at all
    if directionless:
        cosines[directionless] = float("nan")
    # A sample that ran on past its closed tag is scored as a round trip scores it: RL's reward would call it a miss.
    ran_on = [i for i in read if verbalizations[i].truncated and i not in directionless]
    named = _features_named(features)
    scoring = [too_long_warning(too_long, len(features), nla.ar.model.cfg.n_ctx, name_rows=named,
                                consequence="so they have no reconstruction and no cosine (NaN)"),
               directionless_warning(reconstructions, read, name_rows=named, consequence="so they have no cosine"),
               ran_on_warning(ran_on, len(features), named, consequence="they have a reconstruction and a cosine")]
    for note in filter(None, scoring):
        verbalizations = warned(verbalizations, note)
    return FeatureVerbalizations(features, verbalizations, vectors, hook_name, offset is not None, cosines,
                                 reconstructions, offset)


def warned(verbalizations: list[Verbalization], warning: str) -> Verbalizations:
    """`verbalizations` holding `warning` beside what `verbalize` warned of, which is also emitted at the user's line,
    as `verbalize` emits its own."""
    warn_at_caller(warning)
    return Verbalizations(verbalizations, warnings=[*getattr(verbalizations, "warnings", ()), warning])


def check_ar_reads_samples(av_or_nla: ActivationVerbalizer | NLA, verbalize_kwargs: dict[str, Any]) -> None:
    """With an NLA, the AR can read the explanation of a sample of `verbalize_kwargs`' max_new_tokens: checked before
    the AV's work, as `NLA.round_trip` checks it (`check_sample_fits`)."""
    if isinstance(av_or_nla, NLA):
        max_new_tokens = verbalize_kwargs.get("max_new_tokens", MAX_NEW_TOKENS)
        check_counts(1, max_new_tokens=max_new_tokens)
        av_or_nla.ar.check_reads_samples(max_new_tokens)


def _features_named(features: list[int]) -> RowNamer:
    """How this module's warnings and errors name rows: by their feature ids, the first 8."""
    return lambda rows: f"features {[features[i] for i in rows][:8]}"


def hooked_sae_transformer(model: HookedTransformer) -> HookedSAETransformer:
    """The same model as a sae-lens `HookedSAETransformer` (shares the weights: no copy), for `add_sae`.

    Built from a copy of `model.cfg` on the meta device, then given `model`'s own tensors, so a model that
    nla_lens loaded without weight processing stays unprocessed. The settings are its own: a shared
    `cfg` let `set_use_attn_result` (and the other `set_use_*`) on one model switch the other too. A Gemma-3
    model's norms stay `GemmaRMSNorm`s, HF's arithmetic on the same fp32 weights.
    """
    from sae_lens import HookedSAETransformer

    backends.require_hooked("hooked_sae_transformer", model)
    from nla_lens.backends import gemma3_norm

    tokenizer = model.tokenizer
    side = tokenizer.padding_side if tokenizer is not None else "right"  # TL's default; unread without a tokenizer
    with torch.device("meta"):
        out = HookedSAETransformer(copy.deepcopy(model.cfg), tokenizer=tokenizer, move_to_device=False,
                                   default_padding_side=side)
    out.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)
    gemma3_norm.share_norms(out, model)
    return out.eval()
