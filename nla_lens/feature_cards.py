"""Feature cards: where an SAE feature fires in the user's texts, next to what the NLA says it is.

The contexts are the check on the explanation: a feature whose top activations all sit on one
token should be explained as that token. The card is one self-contained HTML view (no scripts,
no network) that a notebook shows inline; `to_pandas()` gives one row per context.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nla_lens.errors import InputError
from nla_lens.nla import NLA
from nla_lens.sae import (
    ResidualStats,
    check_sae_reads_layer,
    save_records,
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


@dataclass(frozen=True)
class FeatureCard:
    feature: int
    hook_name: str
    verbalization: Verbalization
    cosine: float | None  # cos(AR reconstruction, decoder row); None without an AR or on a failed parse
    contexts: list[FeatureContext]  # strongest first
    n_positions: int  # positions scanned
    n_active: int  # positions where the feature is > 0

    @property
    def explanation(self) -> str | None:
        return self.verbalization.explanation

    def top_tokens(self) -> list[tuple[str, int]]:
        """The tokens the top contexts sit on, most frequent first."""
        return Counter(c.token for c in self.contexts).most_common()

    def __repr__(self) -> str:
        token, count = self.top_tokens()[0] if self.contexts else ("-", 0)
        return (f"FeatureCard(feature {self.feature} of {self.hook_name}: {self.explanation!r}; "
                f"top {len(self.contexts)} contexts, {count} on {token!r}; active at "
                f"{self.n_active}/{self.n_positions} positions)")

    def records(self) -> list[dict[str, Any]]:
        return [{"feature": self.feature, "text": c.text, "position": c.position, "token": c.token,
                 "activation": c.activation, "context": "".join(c.tokens), "explanation": self.explanation}
                for c in self.contexts]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.records(), columns=["feature", "text", "position", "token", "activation",
                                                     "context", "explanation"])

    def _repr_html_(self) -> str:
        top = max((c.activation for c in self.contexts), default=0.0) or 1.0
        explanation = (html.escape(self.explanation) if self.explanation is not None
                       else "<i>failed to parse:</i> " + html.escape(self.verbalization.text))
        cosine = "" if self.cosine is None else f" &middot; AR cosine to the decoder row {self.cosine:.3f}"
        rows = "".join(
            f"<tr><td style='text-align:right;padding-right:1em'>{c.activation:.2f}</td><td style='text-align:left'>"
            + "".join(_token_span(t, a / top, i == c.center) for i, (t, a) in
                      enumerate(zip(c.tokens, c.activations, strict=True)))
            + "</td></tr>" for c in self.contexts)
        return (f"<div style='font-family:sans-serif;max-width:60em'>"
                f"<h3 style='margin:0.3em 0'>Feature {self.feature} <small>({html.escape(self.hook_name)})</small></h3>"
                f"<p style='background:#f4f4f4;padding:0.5em;border-left:4px solid #888'>NLA: {explanation}</p>"
                f"<p style='color:#555;font-size:0.9em'>active at {self.n_active} of {self.n_positions} "
                f"positions{cosine}; top {len(self.contexts)} contexts, the strongest token outlined</p>"
                f"<table style='font-family:monospace;border-collapse:collapse'>{rows}</table></div>")

    def save(self, path: str | Path) -> Path:
        """Write the card: `.html` (the view above), `.parquet` or `.json` (the contexts), by the suffix."""
        return save_records(self.records(), Path(path), self._repr_html_)


def _token_span(token: str, strength: float, center: bool) -> str:
    alpha = min(max(strength, 0.0), 1.0)
    outline = "outline:2px solid #c00;" if center else ""
    shown = html.escape(token.replace("\n", "\u21b5"))
    return f"<span style='background:rgba(255,140,0,{alpha:.2f});{outline}white-space:pre'>{shown}</span>"


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
