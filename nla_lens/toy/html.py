"""A self-contained HTML page of a demo run: tokens coloured by round-trip FVE, explanations on hover."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenRow:
    token: str
    explanation: str | None
    fve: float | None  # None: a context token that was not explained


_STYLE = """
body { font-family: Georgia, serif; max-width: 60em; margin: 2em auto; line-height: 2.4; color: #222; }
h1 { font-size: 1.4em; } p.meta { font-family: sans-serif; font-size: 0.9em; color: #555; line-height: 1.4; }
span.tok { position: relative; padding: 0.15em 0; white-space: pre-wrap; cursor: help;
  box-shadow: inset -1px 0 rgba(255,255,255,0.8); }
span.tok .tip { display: none; position: absolute; left: 0; top: 1.9em; z-index: 1; width: 24em;
  background: #222; color: #fff; font: 0.8em/1.4 sans-serif; padding: 0.5em; border-radius: 4px; white-space: normal; }
span.tok:hover .tip { display: block; }
div.legend span { display: inline-block; width: 4em; text-align: center; font: 0.8em sans-serif; }
"""


def _colour(fve: float | None) -> str:
    """Red (FVE <= 0) through yellow to green (FVE 1); grey for context tokens."""
    if fve is None:
        return "#eeeeee"
    x = min(max(fve, 0.0), 1.0)
    red, green = (255, int(510 * x)) if x < 0.5 else (int(510 * (1 - x)), 255)
    return f"rgb({red},{green},120)"


def render_page(title: str, sentences: Sequence[Sequence[TokenRow]], summary: str) -> str:
    """The page as one HTML string: no scripts, no external resources."""
    body = []
    for rows in sentences:
        spans = []
        for row in rows:
            tip = "context token (not explained)" if row.fve is None else (
                f"FVE {row.fve:.2f}<br>{html.escape(row.explanation or '(explanation failed to parse)')}")
            spans.append(f'<span class="tok" style="background:{_colour(row.fve)}">{html.escape(row.token)}'
                         f'<span class="tip">{tip}</span></span>')
        body.append("<p>" + "<wbr>".join(spans) + "</p>")  # lines may break between tokens
    legend = "".join(f'<span style="background:{_colour(x / 4)}">{x / 4:.2f}</span>' for x in range(5))
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='meta'>{html.escape(summary)}</p><div class='legend'>FVE: {legend}</div>"
            + "\n".join(body) + "</body></html>\n")
