"""Feature cards: where an SAE feature fires in the user's texts, next to what the NLA says it is.

The contexts are the check on the explanation: a feature whose top activations all sit on one
token should be explained as that token. A card is a result like the others (`nla_lens.results`):
one row per context in `to_pandas()` and `save()` (a feature that never fires: one row of the card's own
columns, so its explanation is saved too), and in a notebook the feature-card view of
[`nla_lens.display`][nla_lens.display] (the contexts' tokens shaded by activation, under the explanation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Float
from torch import Tensor

from nla_lens import display
from nla_lens.base_model import check_base_model
from nla_lens.checks import check_counts, counted
from nla_lens.errors import InputError, VectorError
from nla_lens.nla import NLA, check_read_keywords, nla_type_name
from nla_lens.results import TabularResult
from nla_lens.sae import (
    SIDECAR_BASE,
    ResidualStats,
    check_ar_reads_samples,
    check_sae_reads_layer,
    check_skip_first,
    check_texts,
    decoder_rows,
    each_text_residuals,
    feature_id,
    offset_columns,
    offset_summary,
    read_features,
    resid_hook_names,
    sae_hook_phrase,
    skipped,
    text_residuals,
    tl_model_name,
    warn_of_cut_texts,
    warn_of_other_model,
)
from nla_lens.sae_columns import FEATURE_CARD
from nla_lens.verbalizer import ActivationVerbalizer, Verbalization

if TYPE_CHECKING:
    from sae_lens import SAE

    from nla_lens.backends import TLModel

# A row's columns that describe its context; a silent card's one row has None in each.
_CONTEXT_COLUMNS = ("text", "position", "token", "activation", "context", "context_explanation",
                    "context_explanation_parsed", "context_explanation_text", "context_explanation_truncated")


@dataclass(frozen=True)
class FeatureContext:
    """One top activation: the text it came from and a window of tokens around it.

    Attributes:
        text: index into the texts given.
        position: token position of the activation in that text.
        activation: the feature's activation there.
        tokens: the window, decoded one token at a time.
        activations: the feature's activation at each token of the window (NaN: left out by skip_first).
        center: index of `position` inside the window.
        context: the window decoded as one text: a character that spans several tokens (an emoji, a rare CJK
            character under a byte-level BPE) reads whole here, where each of its tokens alone decodes to U+FFFD.
        explanation: the AV's explanation of the base residual here (`explain_contexts=True`), else None.
        explanation_text: the AV's raw completion there, which the card shows when it failed to parse.
        explanation_truncated: max_new_tokens cut that completion: why its parse failed.
    """

    text: int
    position: int
    activation: float
    tokens: list[str]
    activations: list[float]
    center: int
    context: str
    explanation: str | None = None
    explanation_text: str = ""
    explanation_truncated: bool = False

    @property
    def token(self) -> str:
        return self.tokens[self.center]


@dataclass(frozen=True, repr=False)
class FeatureCard(TabularResult):
    """What `feature_card` returns: one row per context, and a view of them under the explanation. A feature that
    never fires has one row all the same, of the card's own columns (the context columns None): a file of no rows
    would keep its explanation nowhere.

    Attributes:
        feature: the SAE feature's index.
        hook_name: the SAE's hook point, where the feature is read; None for an SAE that records none
            (`allow_other_hook=True` let it in), read at the NLA's residual.
        verbalization: the AV's output for the feature's decoder direction.
        cosine: verbalize_sae_features's cosine: cos(AR reconstruction, decoder row), the offset's mean taken off
            the reconstruction when there is one; None without an AR, on a failed parse, or where the reconstruction
            has no direction (verbalize_sae_features warns of it).
        contexts: the top activations, strongest first.
        n_positions: positions scanned.
        n_active: positions where the feature is > 0.
        explained_contexts: each context carries the AV's explanation of its own residual.
        offset_stats: the explanation is of mean + spread * unit row (`offset=`); None: of the bare row.
        warnings: what the card warned of (texts longer than the base's context, cut to it), then what the
            explanations' verbalizations warned of, kept so the repr, the view and a saved `.parquet` still say it.
    """

    feature: int
    hook_name: str | None
    verbalization: Verbalization
    cosine: float | None
    contexts: list[FeatureContext]
    n_positions: int
    n_active: int
    explained_contexts: bool = False
    offset_stats: ResidualStats | None = None
    warnings: list[str] = field(default_factory=list)

    display_columns = ("text", "position", "token", "activation", "context")
    schema = FEATURE_CARD.schema
    warnings_at = "warnings"

    @property
    def explanation(self) -> str | None:
        """The feature's parsed explanation (None where the AV's output did not parse)."""
        return self.verbalization.explanation

    def top_tokens(self) -> list[tuple[str, int]]:
        """The tokens the top contexts sit on, most frequent first."""
        return Counter(c.token for c in self.contexts).most_common()

    def to_records(self) -> list[dict[str, Any]]:
        offset = {"offset": self.offset_stats is not None, **offset_columns(self.offset_stats)}
        said = {"explanation": self.explanation, "explanation_parsed": self.explanation is not None,
                "explanation_text": self.verbalization.text, "explanation_truncated": self.verbalization.truncated}
        contexts = [{"text": c.text, "position": c.position, "token": c.token, "activation": c.activation,
                     "context": c.context, **self._said_at(c)} for c in self.contexts]
        return [{"feature": self.feature, **context, **said, "cosine": self.cosine, **offset}
                for context in contexts or [dict.fromkeys(_CONTEXT_COLUMNS)]]

    def _said_at(self, context: FeatureContext) -> dict[str, Any]:
        """The context_explanation columns of one row: what the AV said at its peak, None in each when not asked."""
        if not self.explained_contexts:
            return dict.fromkeys(("context_explanation", "context_explanation_parsed", "context_explanation_text",
                                  "context_explanation_truncated"))
        return {"context_explanation": context.explanation,
                "context_explanation_parsed": context.explanation is not None,
                "context_explanation_text": context.explanation_text,
                "context_explanation_truncated": context.explanation_truncated}

    def summary(self) -> str:
        said_by = self.verbalization
        said = (display.format_cell(self.explanation, 100) if self.explanation is not None
                else f"(failed to parse: {display.parse_failure(said_by.text, said_by.truncated)})")
        if self.offset_stats is not None:
            said += f" (of the row offset by the {offset_summary(self.offset_stats)})"
        cosine = "" if self.cosine is None else f"; AR cosine to the decoder row {display.format_number(self.cosine)}"
        if not self.contexts:
            return (f"feature {self.feature} of {sae_hook_phrase(self.hook_name)}: {said}; no contexts: not active at "
                    f"{display.positions_scanned(self.n_positions)}{cosine}")
        token, count = self.top_tokens()[0]
        return (f"feature {self.feature} of {sae_hook_phrase(self.hook_name)}: {said}; top "
                f"{counted(len(self.contexts), 'context')}, "
                f"{count} on {token!r}; active at {self.n_active}/{self.n_positions} positions{cosine}")

    def _shown_columns(self, records: list[dict[str, Any]]) -> list[str]:
        """With `explain_contexts=True`, the repr shows what the AV said at each context beside it. A silent card's
        row has no context to show (its summary says so)."""
        if not self.contexts:
            return []
        return super()._shown_columns(records) + (["context_explanation"] if self.explained_contexts else [])

    def _repr_html_(self) -> str:
        windows = [(c.tokens, c.activations, c.center) for c in self.contexts]
        said_here = ([display.Readout(c.explanation, c.explanation_text, c.explanation_truncated)
                      for c in self.contexts] if self.explained_contexts else None)
        return display.feature_card_html(f"Feature {self.feature}", self.hook_name, self._headline(), self.explanation,
                                         self.verbalization.text, windows, said_here,
                                         truncated=self.verbalization.truncated, n_positions=self.n_positions,
                                         warnings=self._held_warnings())


def feature_card(
    sae: SAE,
    base: TLModel,
    texts: Iterable[str],
    feature: int,
    nla: ActivationVerbalizer | NLA,
    *,
    k: int = 10,
    before: int = 8,
    after: int = 2,
    skip_first: int | None = None,
    offset: ResidualStats | None = None,
    explain_contexts: bool = False,
    allow_other_hook: bool = False,
    **verbalize_kwargs: Any,
) -> FeatureCard:
    """The `k` strongest activations of `feature` in `texts` (each with `before` / `after` tokens of
    context) next to the NLA's explanation of the feature's decoder row.

    The base model runs each text to layer K, `sae.encode` reads `blocks.K.hook_resid_post` (an SAE of
    another hook, let in by `allow_other_hook=True`, reads its own hook point); the first `skip_first`
    positions of each text are left out (default: the BOS the tokenizer puts first, as `explain` leaves it out;
    none on Qwen). A text longer than the base's n_ctx is scanned up to it, with a warning, kept in the card's
    `warnings`, naming such texts. So is an SAE whose `sae.cfg.metadata.model_name` names neither the sidecar's
    `base_model` nor `base.cfg.model_name` (compared by `nla_lens.sae.model_key`): warned of once, before the scan.
    `explain_contexts=True` also verbalizes the base residual at each context's peak (`k` more AV
    generations): what the NLA says where the feature fires, beside what it says of the decoder row
    (on the bundled toy the former names the feature's token far more often: docs/guide/sae.md).
    `offset` and `verbalize_kwargs` are as in [`verbalize_sae_features`][nla_lens.sae.verbalize_sae_features],
    which also refuses a feature whose decoder row is all zero or not finite: here before the scan. NaN or Inf from
    `sae.encode` at a scanned position is a `VectorError` naming its cause (broken SAE weights or base activations,
    else an encoder that overflowed its dtype: a float16 SAE), not a context ranked by a value that means nothing.
    """
    av = nla.av if isinstance(nla, NLA) else nla
    if not isinstance(av, ActivationVerbalizer):
        raise InputError(f"nla must be an NLA or an ActivationVerbalizer, got {nla_type_name(nla)}: call "
                         "nl.feature_card(sae, base, texts, feature, nla), the SAE first and the NLA fifth "
                         "(nl.verbalize_sae_features takes the NLA first)")
    hook_name = check_sae_reads_layer(sae, av.meta.layer, av.meta.d_model, allow_other_hook=allow_other_hook)
    # Another base of the NLA's width and depth scans without error, and its contexts would sit beside an explanation
    # of this base's feature.
    check_base_model(base, nla, av.meta.layer)
    check_read_keywords(av, verbalize_kwargs, "feature_card")  # a typo was verbalize's TypeError, after the scan
    texts = check_texts(texts)  # a list: the contexts are explained by index
    (k,) = check_counts(1, k=k)
    before, after = check_counts(0, before=before, after=after)
    skip_first = check_skip_first(skip_first)
    feature = feature_id(feature)
    if isinstance(feature, (Iterable, Tensor)) and not isinstance(feature, str):  # verbalize_sae_features takes lists
        raise InputError(f"feature_card draws one feature's card, got features {feature!r:.60}: pass one id, or one "
                         "card per feature: [nl.feature_card(sae, base, texts, f, nla) for f in features]")
    decoder_rows(sae, [feature])  # checks the id before the scan indexes with it
    check_ar_reads_samples(nla, verbalize_kwargs)  # as read_features will, but before the scan
    notes = warn_of_other_model(sae, [(av.meta.base_model, SIDECAR_BASE), (tl_model_name(base), "base.cfg.model_name")])
    per_text: list[tuple[list[int], Tensor]] = []
    cut: list[int] = []
    with torch.inference_mode():
        # The SAE encodes what it was trained on: another hook's activations when allow_other_hook let it in (the
        # NLA's residual for one that records no hook point, as allow_other_hook took it).
        scanned_hook = None if hook_name is None or hook_name in resid_hook_names(av.meta.layer) else hook_name
        # One text's residuals at a time: the card keeps only the feature's activations of each.
        for ids, resid in each_text_residuals(base, texts, av.meta.layer, hook_name=scanned_hook, cut=cut):
            acts = _encode_text(sae, resid.to(sae.W_dec.device, sae.W_dec.dtype))
            # TopK training SAEs with use_sparse_activations encode to a sparse COO tensor. A copy, not a view of
            # column `feature`: a view would keep this text's whole [pos, d_sae] encoding alive in per_text.
            acts = (acts.to_dense() if acts.is_sparse else acts)[:, feature].to("cpu", torch.float32, copy=True)
            skip = skipped(base.tokenizer, ids, skip_first)
            # NaN below marks what skip_first left out: the card would drop these; Inf would top it, unranked
            if not acts[skip:].isfinite().all():
                raise VectorError(_non_finite_activations(sae, feature, len(per_text), resid))
            acts[:skip] = float("nan")
            per_text.append((ids, acts))
    notes += warn_of_cut_texts(cut, len(texts), base.cfg.n_ctx, "the card holds no context past it")
    flat = torch.cat([acts for _, acts in per_text])
    scanned = ~flat.isnan()
    if not scanned.any():  # as residual_stats refuses it: an empty card would look like a dead feature
        longest = max(len(ids) for ids, _ in per_text)
        bos, fix = ((" (the BOS)", "skip_first=0 to scan the BOS") if skip_first is None
                    else ("", "a smaller skip_first"))
        raise InputError(f"no positions left after skip_first={skip_first}{bos}: the longest text has "
                         f"{counted(longest, 'token')}; use longer texts or {fix}")
    readout = read_features(nla, sae, [feature], hook_name, offset, [], verbalize_kwargs)  # its model warned of above
    n_active = int((flat[scanned] > 0).sum())
    # Stable: exact ties (a text repeated, a shared prefix) keep text-then-position order, the same on every run.
    order = torch.nan_to_num(flat, nan=-float("inf")).argsort(descending=True, stable=True)[:min(k, n_active)].tolist()
    starts = [0]
    for ids, _ in per_text:
        starts.append(starts[-1] + len(ids))
    tokenizer = base.tokenizer
    assert tokenizer is not None  # each_text_residuals refused a base without one before the scan
    contexts = []
    for index in order:
        text = next(i for i in range(len(per_text)) if starts[i + 1] > index)
        ids, acts = per_text[text]
        position = index - starts[text]
        lo, hi = max(0, position - before), min(len(ids), position + after + 1)
        window = ids[lo:hi]
        contexts.append(FeatureContext(
            text, position, float(acts[position]),
            [cast(str, tokenizer.decode([t], clean_up_tokenization_spaces=False)) for t in window],
            acts[lo:hi].tolist(), position - lo,
            cast(str, tokenizer.decode(window, clean_up_tokenization_spaces=False))))
    notes += getattr(readout.verbalizations, "warnings", [])
    if explain_contexts and contexts:
        contexts, said_notes = _explain_contexts(av, base, texts, contexts, verbalize_kwargs)
        notes += said_notes
    cosine = None if readout.cosines is None or readout.cosines[0].isnan() else float(readout.cosines[0])
    return FeatureCard(feature, readout.hook_name, readout.verbalizations[0], cosine, contexts,
                       int(scanned.sum()), n_active, explain_contexts, offset, notes)


def _encode_text(sae: SAE, activations: Float[Tensor, "pos d"]) -> Float[Tensor, "pos d_sae"]:
    """`sae.encode` of one text's activations. A sae-lens TemporalSAE attends over the text's earlier positions, so
    it encodes a [batch, pos, d] batch (a [pos, d] text was a bare ValueError); the others encode each position by
    itself, some as [pos, d] only (matching pursuit picks its features along dim 1)."""
    from sae_lens import TemporalSAE

    if isinstance(sae, TemporalSAE):
        return sae.encode(activations[None])[0]
    return sae.encode(activations)


def _non_finite_activations(sae: SAE, feature: int, text: int, resid: Float[Tensor, "pos d"]) -> str:
    """What made `sae.encode` give NaN or Inf for `feature` on text `text`, and what to do about it."""
    said = f"sae.encode gives NaN or Inf for feature {feature} on texts[{text}]: "
    broken = [name for name, tensor in sae.state_dict().items() if tensor.is_floating_point()
              and not tensor.isfinite().all()]
    if broken:
        return said + f"NaN or Inf in the SAE's {', '.join(broken)}; reload or retrain the SAE"
    if not resid.isfinite().all():
        return said + "the base model's activations there hold NaN or Inf; check the base model and its dtype"
    fix = ("load the SAE in float32 (sae.to(torch.float32))" if sae.W_dec.dtype in (torch.float16, torch.bfloat16)
           else "check sae.encode on these activations")
    return said + f"its weights and these activations are finite, so its encoder overflowed in {sae.W_dec.dtype}; {fix}"


def _explain_contexts(av: ActivationVerbalizer, base: TLModel, texts: list[str], contexts: list[FeatureContext],
                      verbalize_kwargs: dict[str, Any]) -> tuple[list[FeatureContext], list[str]]:
    """Each context with the AV's explanation of the base residual at its peak, and what `verbalize` warned of.
    The (at most k) texts involved run once more rather than every text's residuals being kept through the scan."""
    chosen = sorted({c.text for c in contexts})
    residuals = dict(zip(chosen, (resid for _, resid in text_residuals(base, [texts[i] for i in chosen],
                                                                        av.meta.layer)), strict=True))
    said = av.verbalize(torch.stack([residuals[c.text][c.position] for c in contexts]), **verbalize_kwargs)
    return ([replace(c, explanation=v.explanation, explanation_text=v.text, explanation_truncated=v.truncated)
             for c, v in zip(contexts, said, strict=True)], list(getattr(said, "warnings", [])))
