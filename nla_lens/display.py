"""HTML views of results: one explained-text view for any model, a feature card, and a plain table for the rest.

Everything here returns self-contained HTML: inline CSS scoped under ``.nla-view``, no scripts, no
external resources, so a page works offline and a notebook cell does not restyle the notebook; nor does the notebook
restyle the view, which draws on its own white background in a dark theme too.
Tokens, explanations and raw AV outputs are HTML-escaped, their control and format characters (and lone
surrogates) shown as escapes (`\\x00`, `\\u202e`, `\\ud800`): what a model writes is shown, never interpreted.

The explained-text view ([`explained_text_html`][nla_lens.display.explained_text_html]) shows each text, under
its label (`[1] A dog ran`), as a line of tokens coloured by round-trip FVE, with every explained token's
explanation in rows under the text (readable without hovering; hovering a token shows it too). The colour scale
spreads the observed range: non-negative FVE runs by rank from pale yellow (the lowest seen) to blue (the highest
seen), with the observed quantiles on the legend; negative FVE (worse than predicting the mean vector)
is red, darker the more negative, so it never passes for a low positive score. A failed parse scores as a miss (an
orthogonal guess), as does a parsed explanation the AR could not score (too long for it, a reconstruction with no
direction): its token stays off the scale, blank in a dashed outline, and its scores read `miss (-1.500)`, as they do
in every table. A token whose score is NaN or infinite (a NaN vector) is lilac, off the scale, and the legend
names it. Without a baseline the tokens are coloured by MSE instead (lower is better), and the legend says so.

The feature card ([`feature_card_html`][nla_lens.display.feature_card_html]) shows an SAE feature's
strongest contexts, each token shaded by the feature's activation there (white at 0 to orange at the
card's top activation), under the NLA's explanation of the feature.
"""

from __future__ import annotations

import bisect
import html
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Literal

_SEQUENTIAL = ((255, 255, 204), (161, 218, 180), (65, 182, 196), (44, 127, 184), (34, 84, 160))  # YlGnBu
_NEGATIVE = ((254, 224, 210), (222, 45, 38))  # light to dark red
_ACTIVATION = ((255, 255, 255), (253, 141, 60))  # white to orange
_CONTEXT = "#e8e8e8"
_FAILED = "#ffffff"  # a failed parse's token: blank inside its dashed outline, off the colour scale
_NOT_FINITE = "#d4b9da"  # a token whose score is NaN or infinite: lilac, on no scale and not the context's grey
_MAX_TABLE_ROWS = 200
_ROWS_IN_BOX = 20  # about the rows a table's 36em box shows before it scrolls (see `_STYLE`)
_NUMERIC_HEADER = " class='num'"  # a number column's header, aligned right over its numbers
_PROSE = 24  # characters: a table cell longer than this holds text to read (see `_cell`)
_CURVE_SIZE, _CURVE_X, _CURVE_Y = (264, 112), (62, 254), (8, 92)  # a chart's size and its plot area's x / y span
_CURVE_INK = "#2c7fb8"
_HUB_ID = re.compile(r"\w[\w.-]*/[\w.-]+")  # owner/name, as the HF hub spells a repository
# Written as escapes: control characters, line and paragraph separators, format characters (bidi controls,
# which reorder the text drawn after them; zero-width spaces and marks, which draw nothing) and lone surrogates
# (a JSON file's "\ud800"), which UTF-8 cannot encode: bare, a saved page or a notebook's view of one fails
_UNSEEN = ("Cc", "Zl", "Zp", "Cf", "Cs")
# A table's text column and the record keys of its parse: the flag saying whether it parsed, the raw completion and
# the truncated flag, where the column is None on a failed parse (the steering tables' clean / steered hold the raw
# completion themselves, with no truncated flag: None). The first whose flag the row has: a feature card's rows name
# their own explanation's keys after it, as they do a context's, since their `text` is the index of a context's text.
_PARSE_KEYS = {"explanation": (("parsed", "text", "truncated"),
                               ("explanation_parsed", "explanation_text", "explanation_truncated")),
               "clean": (("clean_parsed", None, None),), "steered": (("steered_parsed", None, None),),
               "context_explanation": (("context_explanation_parsed", "context_explanation_text",
                                        "context_explanation_truncated"),)}
# A table's score column and the record keys saying whether its row parsed and whether it scored the miss
# (`RoundTrip.misses`): a failed parse scores as a miss (metrics.miss_mse, an orthogonal guess), and so does a parsed
# row the AR could not score (too long for it, a reconstruction with no direction), numbers that unmarked read as a
# reconstruction that bad.
_SCORE_FLAGS = {"mse": ("parsed", "miss"), "fve": ("parsed", "miss"), "fve_clean": ("clean_parsed", "clean_miss"),
                "fve_steered": ("steered_parsed", "steered_miss")}
# From here up, fixed decimals run to dozens of digits: numbers are written in e notation (format_number)
_E_FROM = 1e6
# Rates a table writes as percentages, as the result's summary and the README do (the record keys hold fractions)
_PERCENT = frozenset({"argmax_hit", "control_argmax_hit", "oracle_argmax_hit", "av_names_argmax"})
# Units a table's header names after the column (the record keys stay bare)
_UNITS = {"kl": "nats", "delta_logp": "nats", "control_delta_logp": "nats", "clean_next": "token p",
          "steered_next": "token p"}

# The view draws on its own white background: its colours are chosen against white, and a notebook's dark theme
# would leave its dark text on a dark page. Its table rules outrank a notebook's own (JupyterLab right-aligns
# every cell, stripes rows in its theme's colours and sets the table's text colour): `.nla-view .nla-table`
# selectors. A table too wide for the page scrolls inside the view; a header wraps at its spaces, never inside a word.
# A tall table scrolls in a box of its own height, its headers kept in view: at the table's full height, the bar to
# scroll it sideways sat under its last row, out of sight while reading the first. The box is the table's width (at
# most the view's), so the bar to scroll it down sits beside its rows.
# A token chip in a table is never broken: the table's automatic layout squeezed a token column beside long text to
# a sliver, breaking " villain" after its space. A chip outlined inside its box (a miss, a card's peak) is padded by
# the outline's width, which covered a narrow glyph (",", "l") whole.
# The lines of text around them (the title, summary, warnings, a card's explanation) wrap a word too long for the
# view anywhere, as the table cells do: a degenerate AV output's one long word ran the page far off to the side.
_STYLE = """
.nla-view { font: 14px/1.45 system-ui, sans-serif; color: #222; background: #fff; max-width: 72em;
  padding: 0.4em 0.8em; border-radius: 4px; }
.nla-view .nla-head { margin: 0.3em 0; } .nla-view .nla-head b { font-size: 1.1em; }
.nla-view .nla-meta { color: #555; font-size: 0.9em; margin: 0.2em 0 0.6em; }
.nla-view .nla-warn { color: #8a4b00; font-size: 0.9em; margin: 0.2em 0; }
.nla-view .nla-legend { display: flex; flex-wrap: wrap; gap: 0.4em 1.4em; align-items: center; font-size: 0.85em;
  margin: 0.4em 0 0.8em; }
.nla-view .nla-scale { display: inline-flex; flex-direction: column; vertical-align: middle; width: 16em; }
.nla-view .nla-bar { display: block; height: 1em; border: 1px solid #999; }
.nla-view .nla-ticks { display: flex; justify-content: space-between; font-size: 0.85em; }
.nla-view .nla-note { color: #666; }
.nla-view .nla-swatch { display: inline-block; width: 1.4em; height: 1em; vertical-align: middle;
  border: 1px solid #999; margin-right: 0.3em; }
.nla-view .nla-text { margin: 0 0 1.4em; border-top: 1px solid #ddd; padding-top: 0.5em; }
.nla-view .nla-label { font-weight: bold; overflow-wrap: anywhere; }
.nla-view .nla-tokens { font: 16px/2.2 Georgia, serif; margin: 0.2em 0 0.5em; }
.nla-view .nla-tok { white-space: pre-wrap; overflow-wrap: anywhere; padding: 0.12em 0.05em; border-radius: 2px;
  box-shadow: inset -1px 0 rgba(255,255,255,0.9); }
.nla-view .nla-tok sub { font: 9px sans-serif; color: inherit; }
.nla-view .nla-failed { outline: 2px dashed #b00; outline-offset: -2px; }
.nla-view .nla-peak { outline: 2px solid #b00; outline-offset: -2px; }
.nla-view .nla-tok.nla-failed, .nla-view .nla-tok.nla-peak { padding-left: calc(0.05em + 2px);
  padding-right: calc(0.05em + 2px); }
.nla-view .nla-table .nla-tok { white-space: pre; }
.nla-view .nla-said { background: #f4f4f4; border-left: 4px solid #888; padding: 0.4em 0.6em; margin: 0.4em 0; }
.nla-view .nla-head, .nla-view .nla-meta, .nla-view .nla-warn, .nla-view .nla-said { overflow-wrap: anywhere; }
.nla-view .nla-table { overflow: auto; max-height: 36em; width: fit-content; max-width: 100%; }
.nla-view .nla-table table { border-collapse: collapse; font-size: 0.9em; color: inherit; margin: 0;
  table-layout: auto; }
.nla-view .nla-table tr:nth-child(n) { background: none; }
.nla-view .nla-table th, .nla-view .nla-table td { text-align: left; line-height: 1.45; padding: 0.15em 0.6em;
  border-bottom: 1px solid #eee; overflow-wrap: anywhere; vertical-align: top; }
.nla-view .nla-table th { overflow-wrap: normal; position: sticky; top: 0; z-index: 1; background: #fff; }
.nla-view .nla-table th.num { text-align: right; }
.nla-view .nla-table td.nla-prose { min-width: 8em; }
.nla-view .nla-table td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.nla-view .nla-table td.nla-context { font: 15px/1.9 Georgia, serif; }
.nla-view .nla-unparsed { color: #a00; font-style: italic; }
.nla-view .nla-curves { display: flex; flex-wrap: wrap; gap: 0.6em 1.2em; margin: 0.3em 0 0.8em; }
.nla-view .nla-curve text { font: 11px system-ui, sans-serif; fill: #444; }
.nla-view .nla-curve-title { font: bold 11px system-ui, sans-serif; color: #444; overflow-wrap: anywhere; }
.nla-view .nla-empty { font-style: italic; padding: 0.4em 0.6em; border: 1px dashed #bbb; display: inline-block; }
"""


@dataclass(frozen=True)
class TokenCell:
    """One token of an explained text, as the view draws it."""

    token: str
    position: int
    explained: bool = False  # False: a context token, drawn grey with no row
    explanation: str | None = None  # None when explained: the AV output failed to parse
    raw_text: str | None = None  # the AV's raw completion, shown when the parse failed
    fve: float | None = None
    mse: float | None = None
    truncated: bool = False  # max_new_tokens cut the AV's completion: why a parse failed
    miss: bool = False  # its scores are the miss though it parsed: the AR could not read it, or rebuilt no direction

    @property
    def missed(self) -> bool:
        """An explained token whose scores are the miss (`metrics.miss_mse`): a failed parse, or `miss`."""
        return self.explained and (self.explanation is None or self.miss)


@dataclass(frozen=True)
class Readout:
    """What the AV said of one vector, as a card shows it: the explanation, or (None) the failed parse's raw
    completion and whether max_new_tokens cut it."""

    explanation: str | None
    raw_text: str = ""
    truncated: bool = False


@dataclass(frozen=True)
class ColourScale:
    """Maps a token's score to a background colour by its rank among the scores seen.

    Ranks spread the colours evenly over whatever range was observed (a text whose FVEs all lie in
    0.85-0.99 still shows which tokens are worst); the legend labels the gradient with the observed
    quantiles, so the colours stay readable as numbers.
    """

    metric: Literal["FVE", "MSE"]
    observed: tuple[float, ...]  # sorted; FVE: the non-negative values, MSE: all values
    most_negative: float | None  # FVE only: the lowest negative value seen, None if there is none
    not_finite: bool = False  # some parsed token's score is NaN or infinite: the legend names their colour

    @classmethod
    def from_cells(cls, cells: Sequence[TokenCell]) -> ColourScale:
        """FVE when every explained token has one (None: no baseline), else MSE. A miss (a failed parse's score, or
        a parsed one the AR could not score) stays off the scale: it would set the darkest red, paling every real
        negative FVE; so does a score that is not finite, which has no rank among the others."""
        explained = [c for c in cells if c.explained]
        scored = [c for c in explained if not c.missed]
        metric: Literal["FVE", "MSE"] = "FVE" if explained and all(c.fve is not None for c in explained) else "MSE"
        scores = [c.fve if metric == "FVE" else c.mse for c in scored]
        finite = [v for v in scores if v is not None and math.isfinite(v)]
        not_finite = len(finite) < sum(v is not None for v in scores)
        if metric == "MSE":
            return cls("MSE", tuple(sorted(finite)), None, not_finite)
        negative = [f for f in finite if f < 0]
        return cls("FVE", tuple(sorted(f for f in finite if f >= 0)), min(negative) if negative else None, not_finite)

    def value(self, cell: TokenCell) -> float | None:
        return cell.fve if self.metric == "FVE" else cell.mse

    def colour(self, value: float | None) -> str:
        if value is None:
            return _CONTEXT
        if not math.isfinite(value):
            return _NOT_FINITE
        if self.metric == "FVE" and value < 0:
            return _rgb(_ramp(_NEGATIVE, value / self.most_negative if self.most_negative else 1.0))
        t = self._rank(value)
        return _rgb(_ramp(_SEQUENTIAL, 1.0 - t if self.metric == "MSE" else t))

    def _rank(self, value: float) -> float:
        """Where `value` falls among the observed values, 0 (lowest) to 1 (highest)."""
        n = len(self.observed)
        if n < 2 or self.observed[0] == self.observed[-1]:
            return 0.5  # nothing to spread: the middle, as ties are ranked, in FVE and MSE alike
        below = bisect.bisect_left(self.observed, value)
        same = bisect.bisect_right(self.observed, value) - below
        return min(max((below + (same - 1) / 2) / (n - 1), 0.0), 1.0)

    def quantiles(self, k: int = 5) -> list[float]:
        """`k` observed values from the lowest to the highest, evenly spaced in rank (the legend's labels)."""
        n = len(self.observed)
        return [self.observed[round(i * (n - 1) / (k - 1))] for i in range(k)] if n else []

    def legend_html(self) -> str:
        labels = self.quantiles()
        if self.metric == "MSE":
            labels = labels[::-1]
        stops = ", ".join(_rgb(_ramp(_SEQUENTIAL, i / 8)) for i in range(9))
        # Each label once: a lone value (or a few) fills the quantiles with repeats; a single one sits mid-bar,
        # where the scale draws it
        shown = list(dict.fromkeys(format_number(v, 2) for v in labels))
        ticks = "".join(f"<span>{label}</span>" for label in shown)
        centred = " style='justify-content: center'" if len(shown) == 1 else ""
        note = ("lower MSE is better; no FVE without a baseline" if self.metric == "MSE" else
                "colours spread by rank over the observed values")
        bar = (f"<span class='nla-scale'><span class='nla-bar' style='background: linear-gradient(to right, {stops})'>"
               f"</span><span class='nla-ticks'{centred}>{ticks}</span></span> ")
        if not self.observed:  # a bar with no value on it (every FVE negative, or every parse failed): no bar
            bar, note = "", "no token scored 0 or above" if self.most_negative is not None else "no token scored"
        parts = [f"<span><b>{self.metric}</b> {bar}<span class='nla-note'>({note})</span></span>"]
        if self.most_negative is not None:
            light, dark = _rgb(_NEGATIVE[0]), _rgb(_NEGATIVE[1])
            parts.append(f"<span><span class='nla-swatch' style='background: linear-gradient(to right, {light}, "
                         f"{dark})'></span>FVE below 0, down to {format_number(self.most_negative, 2)}: worse than "
                         "the mean vector</span>")
        if self.not_finite:
            parts.append(f"<span><span class='nla-swatch' style='background:{_NOT_FINITE}'></span>score not finite "
                         "(NaN or inf)</span>")
        parts.append(f"<span><span class='nla-swatch' style='background:{_CONTEXT}'></span>not explained</span>")
        parts.append(f"<span><span class='nla-swatch nla-failed' style='background:{_FAILED}'></span>scored as the "
                     "miss, off the scale: the explanation failed to parse, or the AR could not score it</span>")
        return "<div class='nla-legend'>" + "".join(parts) + "</div>"


def explained_text_html(texts: Sequence[Sequence[TokenCell]], *, title: str, layer: int | None,
                        summary: str = "", hook_name: str | None = None, warnings: Sequence[str] = (),
                        labels: Sequence[str] | None = None) -> str:
    """The view of one or more explained texts: coloured tokens, then one row per explained token. `labels` head
    each text's block (`text_label`), so a row's `text_index` finds its block."""
    scale = ColourScale.from_cells([c for cells in texts for c in cells])
    where = ""
    if layer is not None:
        where = f" · layer {layer} (<code>{_shown_text(hook_name or f'blocks.{layer}.hook_resid_post')}</code>)"
    heads = [None] * len(texts) if labels is None else labels
    blocks = [_text_block(cells, scale, label) for cells, label in zip(texts, heads, strict=True)]
    return (f"<div class='nla-view'><style>{_STYLE}</style>"
            f"<div class='nla-head'><b>{_shown_text(title)}</b>{where}</div>"
            + (f"<div class='nla-meta'>{_shown_text(summary)}</div>" if summary else "") + warning_lines(warnings)
            + scale.legend_html() + "".join(blocks) + "</div>")


def warning_lines(warnings: Sequence[str]) -> str:
    """A result's warnings in its view, word for word: a saved page has no `.warnings` to look them up in."""
    return "".join(f"<div class='nla-warn'>warning: {_shown_text(w)}</div>" for w in warnings)


def model_label(name: str) -> str:
    """A model's name as a view's title shows it: a hub id (`Qwen/Qwen3-8B`) or a bare name as it is, a local path
    by its folder's name. A model loaded from a folder is named by its path (HF's `_name_or_path`), which would put
    the user's filesystem into every shared page. A relative path of one slash (`models/qwen3-8b`) is spelled as a
    hub id; it is a folder when it exists, as `from_pretrained` reads it."""
    if not any(sep in name for sep in "/\\") or (_HUB_ID.fullmatch(name) and not Path(name).exists()):
        return name
    return PureWindowsPath(name).name or name  # splits at / and \ alike; a bare root has no name


def text_label(index: int, text: str, width: int | None = None) -> str:
    """How a text is headed where several are shown, `[1] A dog ran`: the `text_index` of its rows, then the text
    (control characters escaped, cut to `width`), in `nla-lens explain`'s output and the explained-text view alike."""
    return f"[{index}] {format_cell(text, width)}"


def _text_block(cells: Sequence[TokenCell], scale: ColourScale, label: str | None = None) -> str:
    spans, rows = [], []
    for cell in cells:
        missed = cell.missed
        value = scale.value(cell) if cell.explained else None
        background = _FAILED if missed else scale.colour(value) if cell.explained else _CONTEXT
        said = _said(cell)
        score = _missed(format_cell(value)) if missed and value is not None else format_cell(value)
        if not missed and value is not None and not math.isfinite(value):
            score += " (score not finite)"
        tip = f"{scale.metric} {score}: {said}" if cell.explained else "context token (not explained)"
        outline = " nla-failed" if missed else ""
        spans.append(f"<span class='nla-tok{outline}' style='background:{background};color:{_ink(background)}' "
                     f"title='{html.escape(tip, quote=True)}'>{_shown_token(cell.token)}"
                     f"<sub>{cell.position}</sub></span>")
        if cell.explained:
            chip = (f"<span class='nla-tok{outline}' style='background:{background};color:{_ink(background)}'>"
                    f"{_shown_token(cell.token)}</span>")
            explanation = (f"<td>{_shown_text(cell.explanation)}</td>" if cell.explanation is not None else
                           f"<td class='nla-unparsed'>{html.escape(said)}</td>")
            rows.append(f"<tr><td class='num'>{cell.position}</td><td>{chip}</td>{_score_cell(cell.fve, missed)}"
                        f"{_score_cell(cell.mse, missed)}{explanation}</tr>")
    table = _scroll_note(len(rows)) + _table(f"<tr><th{_NUMERIC_HEADER}>pos</th><th>token</th>"
                                             f"<th{_NUMERIC_HEADER}>FVE</th><th{_NUMERIC_HEADER}>MSE</th>"
                                             "<th>explanation</th></tr>" + "".join(rows)) if rows else ""
    head = "" if label is None else f"<div class='nla-label'>{html.escape(label)}</div>"
    return f"<div class='nla-text'>{head}<div class='nla-tokens'>{'<wbr>'.join(spans)}</div>{table}</div>"


def _table(rows: str) -> str:
    """Rows of a view's table, in the wrapper its styles hang on (see `_STYLE`)."""
    return f"<div class='nla-table'><table>{rows}</table></div>"


def _scroll_note(n_rows: int) -> str:
    """Said above a table taller than its box: a scrollbar that shows only under the pointer (macOS, many Linux
    themes) leaves no sign of the rows below the box."""
    return f"<div class='nla-meta'>{n_rows} rows: scroll the table for the rest</div>" if n_rows > _ROWS_IN_BOX else ""


def _score_cell(value: float | None, missed: bool) -> str:
    """A score's cell in a view's row: a miss's (a failed parse's, or a parsed one the AR could not score) marked as
    the miss it is, styled as a failed parse's explanation."""
    if missed and value is not None:
        return f"<td class='num nla-unparsed'>{_missed(format_cell(value))}</td>"
    return f"<td class='num'>{format_cell(value)}</td>"


def _missed(score: str) -> str:
    """A miss's score as views and tables show it (a failed parse's, or a parsed one the AR could not score): the
    miss it was scored as, not a reconstruction's."""
    return f"miss ({score})"


def _shown_token(token: str) -> str:
    """A token as escaped HTML (see `visible_token`)."""
    return html.escape(visible_token(token))


def visible_token(token: str) -> str:
    """A token as text that shows every character: a newline drawn as ↵, the spaces of an all-whitespace token
    as ␣ (its tabs and other spaces, such as a no-break or ideographic space, as their escapes: \\t, \\xa0,
    \\u3000), other control and format characters as escapes (\\r, \\x0c, \\u200f); a tab beside other text is
    kept, as the indent it is. Bare, they leave a chip or a cell blank (a lone space is a sliver, invisible outside
    a chip; a lone tab a blank box), HTML reads a \\r as a line break, and a right-to-left override reverses the
    tokens drawn after it."""
    if token.strip() == "":
        token = "".join("\u2423" if c == " " else _escaped(c) if c == "\t" or unicodedata.category(c) == "Zs" else c
                        for c in token)
    return _visible(token.replace("\n", "\u21b5"), keep="\t")


def _escaped(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


def _said(cell: TokenCell) -> str:
    """What the AV said of `cell`, its control characters escaped as in the tables."""
    return _visible(cell.explanation if cell.explanation is not None else
                    unparsed_text(cell.raw_text or "", cell.truncated))


def unparsed_text(raw_text: str, truncated: bool) -> str:
    """A failed parse as every view and table shows it: why it failed (`parse_failure`), then the raw completion."""
    return f"({parse_failure(raw_text, truncated)}) {raw_text}"


def parse_failure(raw_text: str, truncated: bool) -> str:
    """Why an explanation failed to parse, in the words of every view. A completion cut at max_new_tokens ran out of
    tokens before it could close its tag; one that opened the tag and ended (EOS) did not run out, and "no tags"
    would deny the tag its raw text shows."""
    if truncated:
        return "cut at max_new_tokens before </explanation>"
    return "<explanation> never closed" if "<explanation>" in raw_text else "no <explanation> tags"


def result_html(name: str, summary: str, records: Sequence[dict[str, Any]], columns: Sequence[str],
                warnings: Sequence[str] = (), figure: str = "") -> str:
    """A result as its summary line, `figure` (HTML from this module, e.g. `curves_html`) and an HTML table of
    `columns` (the first rows of a long result); long cells wrap and are shown whole, and a table too wide for the page
    scrolls inside the view."""
    shown = records[:_MAX_TABLE_ROWS]
    head = "".join(f"<th{_NUMERIC_HEADER if numeric_column(shown, c) else ''}>{html.escape(header(c))}</th>"
                   for c in columns)
    body = []
    for record in shown:
        cells = []
        for column in columns:
            value = record.get(column)
            numeric = is_number(value)
            failed = unparsed_cell(record, column)
            if column == "token" and isinstance(value, str):  # a chip, as in the views: its spaces show
                chip = f"<span class='nla-tok' style='background:{_CONTEXT}'>{_shown_token(value)}</span>"
                cells.append(f"<td>{chip}</td>")
            else:
                text = format_cell(value, column=column) if failed is None else format_cell(failed)
                cells.append(_cell(text, numeric, failed is not None))
        body.append("<tr>" + "".join(cells) + "</tr>")
    # Said above the table: under it, the note is out of sight until the reader has scrolled past every row shown
    if len(records) > len(shown):
        cut = (f"<div class='nla-meta'>the table shows the first {len(shown)} of {len(records)} rows (scroll it); "
               ".to_pandas() has them all</div>")
    else:
        cut = _scroll_note(len(shown))
    return (f"<div class='nla-view'><style>{_STYLE}</style><div class='nla-head'><b>{_shown_text(name)}</b></div>"
            f"<div class='nla-meta'>{_shown_text(summary)}</div>{warning_lines(warnings)}{figure}{cut}"
            f"{_table(f'<tr>{head}</tr>' + ''.join(body))}</div>")


def is_number(value: object) -> bool:
    """An int or a float, not a bool: a table aligns it right and a chart draws it."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_column(records: Sequence[dict[str, Any]], column: str) -> bool:
    """Whether `column` holds numbers in `records` (None aside, at least one): its header and text are then aligned
    right, over them, in a view's table and a repr's alike."""
    values = [r.get(column) for r in records if r.get(column) is not None]
    return bool(values) and all(is_number(v) for v in values)


def _cell(text: str, numeric: bool, unparsed: bool) -> str:
    """A table's cell: a number aligned right; text longer than `_PROSE` characters, to be read, keeps a readable
    width (`nla-prose`), which a long column beside it would otherwise squeeze to a word a line."""
    kinds = ("num" if numeric else "nla-prose" if len(text) > _PROSE else "", "nla-unparsed" if unparsed else "")
    classes = " ".join(kind for kind in kinds if kind)
    return f"<td class='{classes}'>{html.escape(text)}</td>" if classes else f"<td>{html.escape(text)}</td>"


def curves_html(curves: Sequence[tuple[str, Sequence[tuple[int, float]]]]) -> str:
    """Each (name, [(step, value), ...]) as a small line chart (inline SVG), side by side: a training run's curves.
    The y axis spans the curve's own finite range, labelled at both ends, the x axis every step given; the title gives
    the last finite value. NaN and infinite values are left out of the line and a note under the chart names their
    steps, so a run that diverged shows where; a curve with no finite value draws no chart."""
    charts = "".join(_curve(name, points) for name, points in curves if any(math.isfinite(v) for _, v in points))
    return f"<div class='nla-curves'>{charts}</div>" if charts else ""


def _curve(name: str, points: Sequence[tuple[int, float]]) -> str:
    """A curve's title (its last finite value), its chart, and under it the steps where its value is not finite.
    The title is text above the chart, not in it, so a long one wraps: the chart's box clipped "parse_failure_rate:
    0.04688 at step 2000" to "... at step 2"."""
    finite = [(step, value) for step, value in points if math.isfinite(value)]
    title = html.escape(f"{name}: {finite[-1][1]:.4g} at step {finite[-1][0]}")
    chart = _curve_svg(title, finite, (min(s for s, _ in points), max(s for s, _ in points)))
    lost = sorted(step for step, value in points if not math.isfinite(value))
    note = f"{name} not finite at step{'s' if len(lost) > 1 else ''} {_step_ranges(lost)}" if lost else ""
    return (f"<div style='width: {_CURVE_SIZE[0]}px'><div class='nla-curve-title'>{title}</div>{chart}"
            + (f"<div class='nla-warn'>{html.escape(note)}</div>" if note else "") + "</div>")


def _step_ranges(steps: Sequence[int], most: int = 4) -> str:
    """Sorted steps as runs of consecutive ones, "7-9, 12", the first `most` runs named and the rest counted."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][-1] + 1:
            runs[-1].append(step)
        else:
            runs.append([step])
    named = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs[:most])
    return named + (f" and {len(runs) - most} more" if len(runs) > most else "")


def _curve_svg(title: str, points: Sequence[tuple[int, float]], span: tuple[int, int]) -> str:
    """The chart of `points` (finite, at least one) on an x axis from the first to the last step of `span`; `title`
    (escaped) names it to a screen reader. A flat curve has one y label, beside its line: the two ends of a span
    labelled alike read as a range the line sat in the middle of."""
    (left, right), (top, bottom) = _CURVE_X, _CURVE_Y
    steps, values = [p[0] for p in points], [p[1] for p in points]
    low, high = min(values), max(values)
    first, last = span

    def x(step: int) -> float:
        return left + (right - left) * ((step - first) / (last - first) if last > first else 0.5)

    def y(value: float) -> float:
        return bottom - (bottom - top) * ((value - low) / (high - low) if high > low else 0.5)

    line = (f"<polyline fill='none' stroke='{_CURVE_INK}' stroke-width='1.5' points='"
            + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points) + "'/>"
            if len(points) > 1 else f"<circle cx='{x(steps[0]):.1f}' cy='{y(values[0]):.1f}' r='2.5' "
                                    f"fill='{_CURVE_INK}'/>")
    y_labels = (f"<text x='{left - 4}' y='{top + 4}' text-anchor='end'>{high:.3g}</text>"
                f"<text x='{left - 4}' y='{bottom}' text-anchor='end'>{low:.3g}</text>" if high > low else
                f"<text x='{left - 4}' y='{y(low) + 4:.1f}' text-anchor='end'>{low:.3g}</text>")
    labels = (f"{y_labels}<text x='{left}' y='{bottom + 14}'>{first}</text>"
              f"<text x='{right}' y='{bottom + 14}' text-anchor='end'>{last}</text>")
    return (f"<svg class='nla-curve' width='{_CURVE_SIZE[0]}' height='{_CURVE_SIZE[1]}' role='img' "
            f"aria-label='{title}'>"
            f"<rect x='{left}' y='{top}' width='{right - left}' height='{bottom - top}' fill='none' stroke='#ddd'/>"
            f"{line}{labels}</svg>")


def header(column: str) -> str:
    """A table's header for `column`: its name, with its unit where it has one ("kl (nats)")."""
    return f"{column} ({_UNITS[column]})" if column in _UNITS else column


def unparsed_cell(record: dict[str, Any], column: str) -> str | None:
    """The cell of `column` in a row whose explanation failed to parse, marked as the explained view marks it: a
    text column with the raw completion, a score column as the miss ("miss (2.000)"), as is the score of a parsed
    row that scored the miss (its `miss`); None when it parsed and scored (or the score is None). Unmarked, the raw
    text reads as an explanation (or the cell is blank) and the miss as a reconstruction that bad."""
    score_flags = _SCORE_FLAGS.get(column)
    if score_flags is not None:
        parsed, miss = score_flags
        score = record.get(column)
        missed = record.get(parsed) is False or record.get(miss) is True
        return _missed(format_cell(score)) if missed and score is not None else None
    flag, raw_key, truncated_key = next((keys for keys in _PARSE_KEYS.get(column, ()) if keys[0] in record),
                                        (None, None, None))
    if flag is None or record.get(flag) is not False:
        return None
    value = record.get(column)
    if raw_key is None or truncated_key is None:  # both or neither: the clean / steered columns have neither
        return unparsed_text(value or "", truncated=False)
    raw = value if value is not None else record.get(raw_key) or ""
    return unparsed_text(raw, record.get(truncated_key) is True)


def feature_card_html(title: str, hook_name: str | None, summary: str, explanation: str | None, raw_text: str,
                      windows: Sequence[tuple[Sequence[str], Sequence[float], int]],
                      said_here: Sequence[Readout] | None = None, *, truncated: bool = False,
                      n_positions: int | None = None, warnings: Sequence[str] = ()) -> str:
    """An SAE feature's card: the NLA's explanation, then one row per context window (tokens, their
    activations, the index of the token the window was picked for), strongest first; with `said_here`,
    a column of what the NLA says of the residual at each window's peak. `truncated`: the explanation's
    completion was cut at max_new_tokens; `n_positions`: how many were scanned, which a card without windows
    names in place of the table; `hook_name` None: the SAE records no hook point; `warnings`: the card's, word for
    word."""
    # The largest finite positive peak: an infinite (overflowed) or NaN one would make every shade NaN.
    top = max((a for _, acts, center in windows if math.isfinite(a := acts[center]) and a > 0), default=1.0)
    said = _readout_html(Readout(explanation, raw_text, truncated))
    rows = []
    for row, (tokens, activations, center) in enumerate(windows):
        spans = []
        for i, (token, activation) in enumerate(zip(tokens, activations, strict=True)):
            known = not math.isnan(activation)
            background = _rgb(_ramp(_ACTIVATION, activation / top if known else 0.0))
            # NaN off the peak: a token the card's skip_first left out; the peak was scanned, its value is NaN
            tip = format_number(activation) if known or i == center else "not scanned (skip_first)"
            peak = " nla-peak" if i == center else ""
            spans.append(f"<span class='nla-tok{peak}' style='background:{background};color:{_ink(background)}' "
                         f"title='{tip}'>{_shown_token(token)}</span>")
        here = "" if said_here is None else f"<td>{_readout_html(said_here[row])}</td>"
        rows.append(f"<tr><td class='num'>{format_cell(activations[center])}</td>"
                    f"<td class='nla-context'>{''.join(spans)}</td>{here}</tr>")
    stops = ", ".join(_rgb(c) for c in _ACTIVATION)
    legend = (f"<div class='nla-legend'><span><span class='nla-swatch' style='background: linear-gradient(to right, "
              f"{stops})'></span>activation 0 to {format_number(top, 2)}</span><span><span class='nla-swatch "
              "nla-peak'></span>the context's peak token</span></div>") if windows else ""
    return (f"<div class='nla-view'><style>{_STYLE}</style>"
            f"<div class='nla-head'><b>{_shown_text(title)}</b> · "
            f"{'no hook point recorded' if hook_name is None else f'<code>{_shown_text(hook_name)}</code>'}</div>"
            f"<div class='nla-said'>NLA: {said}</div><div class='nla-meta'>{_shown_text(summary)}</div>"
            f"{warning_lines(warnings)}{legend}"
            + (_contexts_table(rows, said_here is not None) if windows else _no_contexts(n_positions)) + "</div>")


def _readout_html(readout: Readout) -> str:
    """A card's explanation, or its failed parse marked as every view marks one (see `unparsed_text`)."""
    if readout.explanation is not None:
        return _shown_text(readout.explanation)
    failed = unparsed_text(readout.raw_text, readout.truncated)
    return f"<span class='nla-unparsed'>{_shown_text(failed)}</span>"


def _contexts_table(rows: Sequence[str], said_here: bool) -> str:
    here = "<th>NLA at the peak</th>" if said_here else ""
    return _table(f"<tr><th{_NUMERIC_HEADER}>activation</th><th>context</th>{here}</tr>" + "".join(rows))


def _no_contexts(n_positions: int | None) -> str:
    """A card's line in place of its table when the feature never fired: a table of headers alone reads as broken."""
    where = positions_scanned(n_positions)
    return f"<div class='nla-empty'>no contexts: the feature is not active (above 0) at {where}</div>"


def positions_scanned(n_positions: int | None) -> str:
    """Where a silent feature was looked for: 'any of the 38 positions scanned', 'the 1 position scanned'."""
    if n_positions is None:
        return "any position scanned"
    return "the 1 position scanned" if n_positions == 1 else f"any of the {n_positions} positions scanned"


def format_cell(value: Any, width: int | None = None, column: str | None = None) -> str:
    """A cell as text: floats as `format_number` writes them (a rate `column` as a percentage, in e notation from
    1e6 % up), lists joined, control characters escaped, long strings cut to `width`."""
    if value is None:
        text = ""
    elif isinstance(value, float) and column in _PERCENT and math.isfinite(percent := value * 100):
        text = f"{percent:.2e}%" if abs(percent) >= _E_FROM else f"{value:.0%}"
    elif isinstance(value, float):
        text = format_number(value)
    elif isinstance(value, (list, tuple)):
        text = _visible(" ".join(map(str, value)))
    elif isinstance(value, str):
        text = _visible(value)
    else:
        text = str(value)
    if width is not None and len(text) > width:
        text = text[:width - 1] + "…"
    return text


def format_number(value: float, decimals: int = 3, *, signed: bool = False) -> str:
    """`value` to `decimals` decimals, in e notation (1.00e+20) where they would misshow it: a table cell's rule,
    shared by the headlines, legends and tooltips that print numbers to other decimals. `signed`: with a + before a
    value >= 0, as a difference is written (+0.016)."""
    sign = "+" if signed else ""
    return f"{value:{sign}.2e}" if _beyond_decimals(value, decimals) else f"{value:{sign}.{decimals}f}"


def _beyond_decimals(value: float, decimals: int) -> bool:
    """Whether `decimals` decimals misshow `value`: below half the last one they read 0 (0.000 for a learning rate, a
    small KL); from 1e6 up they run to dozens of digits (1e20: a diverging loss), which a repr's cell cuts to a
    prefix read as a number."""
    return 0 < abs(value) < 0.5 * 10.0 ** -decimals or abs(value) >= _E_FROM


def _shown_text(text: str) -> str:
    """`text` as a view shows it: control and format characters written as escapes (`_visible`), then HTML-escaped.
    A view's own lines go through it as its rows do: a summary, warning or hook name quotes what the user or the
    model gave (a text, an explanation, an SAE's metadata)."""
    return html.escape(_visible(text))


def _visible(text: str, keep: str = "") -> str:
    """`text` with each control or format character (and line / paragraph separator) but those in `keep` written
    as its escape (\\n, \\r, \\x1b, \\u2028, \\u202e): bare, a \\r overwrites a printed row, an ESC starts a terminal
    command, a form feed or \\u2028 splits a row in two, a bidi control reorders the text after it, and a lone
    surrogate (\\ud800) cannot be written as UTF-8 at all."""
    if text.isprintable():
        return text
    return "".join(_escaped(c) if c not in keep and unicodedata.category(c) in _UNSEEN else c for c in text)


def page(title: str, body: str) -> str:
    """A fragment from this module as one standalone HTML page (no scripts, no external resources)."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='margin: 1.5em'>{body}</body></html>\n")


def _ramp(stops: Sequence[tuple[int, int, int]], t: float) -> tuple[int, int, int]:
    """Linear interpolation through colour stops, t in [0, 1] (clamped)."""
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    a, b = stops[i], stops[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))  # type: ignore[return-value]


def _rgb(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def _ink(background: str) -> str:
    """Black or white text, whichever contrasts more with `background` by WCAG's relative luminance: one of the two
    always reaches 4.58:1, above AA's 4.5, on any colour a scale can blend."""
    luminance = _luminance(background)
    return "#000" if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else "#fff"


def _luminance(colour: str) -> float:
    """WCAG 2 relative luminance of a `#rrggbb` colour."""
    channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
