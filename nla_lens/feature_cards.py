"""Feature cards: where an SAE feature fires in the user's texts, next to what the NLA says it is.

The contexts are the check on the explanation: a feature whose top activations all sit on one
token should be explained as that token. A card is a result like the others (`nla_lens.results`):
one row per context in `to_pandas()` and `save()`, and in a notebook the feature-card view of
:mod:`nla_lens.display` (the contexts' tokens shaded by activation, under the explanation).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from nla_lens import display
from nla_lens.errors import InputError
from nla_lens.nla import NLA
from nla_lens.results import TabularResult
from nla_lens.sae import (
    ResidualStats,
    check_sae_reads_layer,
    text_residuals,
    verbalize_sae_features,
)
from nla_lens.verbalizer import ActivationVerbalizer, Verbalization

if TYPE_CHECKING:
    from sae_lens import SAE

    from nla_lens.backends import TLModel


@dataclass(frozen=True)
class FeatureContext:
    """One top activation: the text it came from and a window of tokens around it."""

    text: int  # index into the texts given
    position: int  # token position of the activation in that text
    activation: float
    tokens: list[str]  # the window, decoded one token at a time
    activations: list[float]  # the feature's activation at each token of the window
    center: int  # index of `position` inside the window

    @property
    def token(self) -> str:
        return self.tokens[self.center]


@dataclass(frozen=True, repr=False)
class FeatureCard(TabularResult):
    """What `feature_card` returns: one row per context, and a view of them under the explanation."""

    feature: int
    hook_name: str
    verbalization: Verbalization
    cosine: float | None  # cos(AR reconstruction, decoder row); None without an AR or on a failed parse
    contexts: list[FeatureContext]  # strongest first
    n_positions: int  # positions scanned
    n_active: int  # positions where the feature is > 0

    display_columns = ("text", "position", "token", "activation", "context")

    @property
    def explanation(self) -> str | None:
        return self.verbalization.explanation

    def top_tokens(self) -> list[tuple[str, int]]:
        """The tokens the top contexts sit on, most frequent first."""
        return Counter(c.token for c in self.contexts).most_common()

    def to_records(self) -> list[dict[str, Any]]:
        return [{"feature": self.feature, "text": c.text, "position": c.position, "token": c.token,
                 "activation": c.activation, "context": "".join(c.tokens), "explanation": self.explanation,
                 "cosine": self.cosine} for c in self.contexts]

    def summary(self) -> str:
        token, count = self.top_tokens()[0] if self.contexts else ("-", 0)
        said = display.format_cell(self.explanation, 100) if self.explanation is not None else "(failed to parse)"
        cosine = "" if self.cosine is None else f"; AR cosine to the decoder row {self.cosine:.3f}"
        return (f"feature {self.feature} of {self.hook_name}: {said}; top {len(self.contexts)} contexts, {count} "
                f"on {token!r}; active at {self.n_active}/{self.n_positions} positions{cosine}")

    def _repr_html_(self) -> str:
        windows = [(c.tokens, c.activations, c.center) for c in self.contexts]
        return display.feature_card_html(f"Feature {self.feature}", self.hook_name, self.summary(), self.explanation,
                                         self.verbalization.text, windows)


def feature_card(
    sae: SAE,
    base: TLModel,
    texts: list[str],
    feature: int,
    nla: ActivationVerbalizer | NLA,
    *,
    k: int = 10,
    before: int = 8,
    after: int = 2,
    skip_first: int = 0,
    offset: ResidualStats | None = None,
    allow_other_hook: bool = False,
    **verbalize_kwargs: Any,
) -> FeatureCard:
    """The `k` strongest activations of `feature` in `texts` (each with `before` / `after` tokens of
    context) next to the NLA's explanation of the feature's decoder row.

    The base model runs each text to layer K, `sae.encode` reads `blocks.K.hook_resid_post`; the
    first `skip_first` positions of each text are left out (e.g. a BOS that every feature ignores).
    `offset` and `verbalize_kwargs` are as in :func:`~nla_lens.sae.verbalize_sae_features`.
    """
    av = nla.av if isinstance(nla, NLA) else nla
    if not isinstance(av, ActivationVerbalizer):
        raise InputError(f"nla must be an NLA or an ActivationVerbalizer, got {type(nla).__name__}")
    check_sae_reads_layer(sae, av.meta.layer, av.meta.d_model, allow_other_hook=allow_other_hook)
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    readout = verbalize_sae_features(nla, sae, [feature], offset=offset, allow_other_hook=allow_other_hook,
                                     **verbalize_kwargs)
    per_text = []
    with torch.inference_mode():
        for ids, resid in text_residuals(base, texts, av.meta.layer):
            acts = sae.encode(resid.to(sae.W_dec.device, sae.W_dec.dtype))[:, feature].float().cpu()
            acts[:skip_first] = float("nan")
            per_text.append((ids, acts))
    flat = torch.cat([acts for _, acts in per_text])
    scanned = ~flat.isnan()
    n_active = int((flat[scanned] > 0).sum())
    order = torch.nan_to_num(flat, nan=-float("inf")).argsort(descending=True)[:min(k, n_active)].tolist()
    starts = [0]
    for ids, _ in per_text:
        starts.append(starts[-1] + len(ids))
    contexts = []
    for index in order:
        text = next(i for i in range(len(per_text)) if starts[i + 1] > index)
        ids, acts = per_text[text]
        position = index - starts[text]
        lo, hi = max(0, position - before), min(len(ids), position + after + 1)
        contexts.append(FeatureContext(
            text, position, float(acts[position]),
            [base.tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in ids[lo:hi]],
            torch.nan_to_num(acts[lo:hi], nan=0.0).tolist(), position - lo))
    cosine = None if readout.cosines is None or readout.cosines[0].isnan() else float(readout.cosines[0])
    return FeatureCard(feature, readout.hook_name, readout.verbalizations[0], cosine, contexts,
                       int(scanned.sum()), n_active)
