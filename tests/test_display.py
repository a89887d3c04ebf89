"""The explained-text view, rendered by headless chromium: the colours it promises are on the screen."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nla_lens import display

FVES = [None, None, 0.95, 0.91, 0.62, 0.88, -0.4, -1.5, 0.97, -1.6]  # the last one a failed parse: a miss
WORDS = ["Romeo", ":", " where", "fore", " art", " thou", " Romeo", "?", " Deny", " thy"]


def _cells() -> list[display.TokenCell]:
    return [display.TokenCell(w, p) if fve is None else display.TokenCell(
        w, p, True, None if p == 9 else f'The token "{w}", after something.', "garbled" if p == 9 else None, fve,
        0.83 * (1 - fve)) for p, (w, fve) in enumerate(zip(WORDS, FVES, strict=True))]


def _screenshot(page: Path, out: Path, profile: Path) -> bytes:
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
                    "--window-size=1000,700", page.as_uri()], capture_output=True, timeout=120, check=True)
    return out.read_bytes()


def _pixels(png: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Decode an 8-bit RGB(A), non-interlaced PNG (what chromium writes) with zlib alone."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks, header = 8, [], None
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        data = png[at + 8:at + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            chunks.append(data)
        at += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0
    channels = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(b"".join(chunks)), width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(line)
        previous = line
    pixels = [tuple(row[x * channels:x * channels + 3]) for row in rows for x in range(width)]
    return width, height, pixels


# JupyterLab 4's rules for an HTML output's tables (@jupyterlab/rendermime's base.css) with the colours its dark theme
# gives them (@jupyterlab/theme-dark-extension): the page a notebook view lands on
_JUPYTERLAB_DARK = """
body { background: #111; margin: 1.5em; }
.jp-RenderedHTMLCommon { color: #fff; }
.jp-RenderedHTMLCommon table { color: rgba(255, 255, 255, 0.87); table-layout: fixed; margin-left: auto;
  margin-right: auto; }
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th, .jp-RenderedHTMLCommon tr { vertical-align: middle;
  padding: 0.5em; line-height: normal; white-space: normal; max-width: none; border: none; }
:not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon td, :not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon th {
  text-align: right; }
.jp-RenderedHTMLCommon tbody tr:nth-child(odd) { background: #111; }
.jp-RenderedHTMLCommon tbody tr:nth-child(even) { background: #212121; }
"""
# Each element of the view with text of its own (its text, class, table and column where it is in one, alignment,
# colour, the background it is drawn on, its opacity with its ancestors', its width and top), the page's visible and
# scrolled widths and its height, and each table wrapper's visible and scrolled width and height and its top and bottom
_READ_STYLES = """<script>
const drawnOn = e => { for (; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor;
  if (c !== 'rgba(0, 0, 0, 0)') return c; } return 'rgb(255, 255, 255)'; };
const own = e => [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
const opacity = e => { let o = 1; for (; e; e = e.parentElement) o *= Number(getComputedStyle(e).opacity); return o; };
const out = document.createElement('pre'); out.id = 'styles';
const page = document.documentElement;
const tables = [...document.querySelectorAll('table')];
out.textContent = JSON.stringify({
  elements: [...document.querySelectorAll('.nla-view *')].filter(own).map(e => ({
    text: e.textContent, tag: e.tagName, cls: e.className, table: tables.indexOf(e.closest('table')),
    column: e.cellIndex, opacity: opacity(e),
    align: getComputedStyle(e).textAlign, colour: getComputedStyle(e).color, background: drawnOn(e),
    width: e.getBoundingClientRect().width, top: e.getBoundingClientRect().top})),
  page: [page.clientWidth, page.scrollWidth, innerHeight],
  tables: [...document.querySelectorAll('.nla-view .nla-table')].map(e => ({visible: [e.clientWidth, e.clientHeight],
    scrolled: [e.scrollWidth, e.scrollHeight], top: e.getBoundingClientRect().top,
    bottom: e.getBoundingClientRect().bottom}))});
document.body.append(out);
</script>"""


def _styles(body: str, css: str, tmp_path: Path, width: int = 1000) -> dict:
    """What chromium computes for `body` on a page styled by `css` in a window `width` pixels wide: `elements`, one
    per text element, `page` and `tables` (see `_READ_STYLES`)."""
    return _computed(body, css, _READ_STYLES, tmp_path, width)


def _measured(body: str, expression: str, tmp_path: Path, width: int = 1000) -> Any:
    """The JSON value of the JavaScript `expression`, run by chromium on a page of `body` `width` pixels wide."""
    script = (f"<script>const out = document.createElement('pre'); out.id = 'styles'; "
              f"out.textContent = JSON.stringify({expression}); document.body.append(out);</script>")
    return _computed(body, "", script, tmp_path, width)


def _computed(body: str, css: str, script: str, tmp_path: Path, width: int) -> Any:
    """What `script` writes to `pre#styles` on a page of `body` styled by `css`, `width` pixels wide."""
    page = tmp_path / "styled.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{css}</style></head><body>"
                    f"<div class='jp-RenderedHTMLCommon'>{body}</div>{script}</body></html>", encoding="utf-8")
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--hide-scrollbars", f"--window-size={width},800", f"--user-data-dir={tmp_path / 'profile'}",
                          "--dump-dom", page.as_uri()], capture_output=True, timeout=120, check=True, text=True).stdout
    return json.loads(html.unescape(re.search(r"<pre id=\"styles\">(.*?)</pre>", dom, re.S).group(1)))


def _contrast(colour: str, background: str) -> float:
    """WCAG contrast ratio of two CSS rgb()/rgba() colours (alpha ignored)."""
    def luminance(css: str) -> float:
        channels = [int(c) / 255 for c in re.findall(r"[\d.]+", css)[:3]]
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    light, dark = sorted((luminance(colour), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def _seen(element: dict) -> str:
    """An element's text colour as drawn: blended into its background by its opacity (a chip's position number was
    drawn at 0.7, under 4.5:1 on its chip however well the ink itself contrasted)."""
    ink, under = ([float(c) for c in re.findall(r"[\d.]+", element[key])[:3]] for key in ("colour", "background"))
    alpha = element["opacity"]
    return "rgb({}, {}, {})".format(*(round(alpha * i + (1 - alpha) * u) for i, u in zip(ink, under, strict=True)))


def _css(colour: str) -> str:
    """A `#rgb` or `#rrggbb` colour as CSS rgb(), which `_contrast` reads."""
    digits = colour[1:] if len(colour) == 7 else "".join(c * 2 for c in colour[1:])
    return "rgb({}, {}, {})".format(*(int(digits[i:i + 2], 16) for i in (0, 2, 4)))


def _chips_of_every_colour() -> str:
    """Views whose token chips take every colour the views can give one: FVE spread over its whole scale and the
    negative reds, MSE, a failed parse, context tokens, and a feature card's activations from 0 to its top."""
    fves = [i / 300 for i in range(301)] + [-i / 100 for i in range(1, 301)]
    scored = [display.TokenCell(f" t{p}", p, True, "e", None, fve, 1 - fve) for p, fve in enumerate(fves)]
    unscored = [display.TokenCell(f" t{p}", p, True, "e", None, None, p / 300) for p in range(301)]
    extra = [display.TokenCell(" failed", 0, True, None, "raw", -1.5, 2.0), display.TokenCell(" context", 1),
             display.TokenCell(" nan", 2, True, "e", None, float("nan"), float("nan"))]
    card = display.feature_card_html("Feature 3", "blocks.3.hook_resid_post", "s", "e", "",
                                     [([f" t{i}" for i in range(301)], [i / 100 for i in range(301)], 300)])
    return "".join(display.explained_text_html([cells + extra], title="t", layer=3) for cells in (scored, unscored)
                   ) + card


def test_every_token_chip_colour_keeps_its_text_at_wcag_aa_contrast():
    """Black or white ink was chosen by a weighted mean of the gamma-encoded channels: white on the FVE scale's
    #2c7fb8 read at 4.35:1 and on a mid red (#e5544c) at 3.68:1, under WCAG AA's 4.5."""
    chips = re.findall(r"style='background:(#[0-9a-f]{6});color:(#[0-9a-f]{3,6})'", _chips_of_every_colour())
    assert len({background for background, _ in chips}) > 500  # the scales' blends, not a handful of stops
    for background, ink in set(chips):
        assert _contrast(_css(ink), _css(background)) >= 4.5, (background, ink)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_every_view_stays_readable_in_a_dark_jupyterlab_notebook(tmp_path):
    """The views set dark text and left no background of their own: in JupyterLab's dark theme the title, summary and
    legend were #222 on #111, the tables' rows took the theme's dark stripes, and every cell was right-aligned."""
    cells = _cells()
    views = {
        "explained": display.explained_text_html([cells], title="Explained text", layer=3, summary="10 tokens",
                                                 warnings=["check the injection"]),
        "table": display.result_html("RoundTrip", "2 vectors", [
            {"index": 0, "explanation": "The token a", "parsed": True, "fve": 0.5},
            {"index": 1, "explanation": None, "parsed": False, "text": "raw", "truncated": False, "fve": -1.5}],
            ["index", "explanation", "parsed", "fve"]),
        "card": display.feature_card_html("Feature 3", "blocks.3.hook_resid_post", "feature 3", "The token a", "",
                                          [([" a", " b"], [0.5, 2.0], 1)], [display.Readout("The token b")]),
        "chips": _chips_of_every_colour(),
    }
    for name, view in views.items():
        styles = _styles(view, _JUPYTERLAB_DARK, tmp_path)["elements"]
        assert len(styles) > 10, name
        for element in styles:  # a token chip's text too, on the chip's own background
            assert _contrast(_seen(element), element["background"]) >= 4.5, (name, element)
            if element["tag"] == "TD":
                assert element["align"] == ("right" if "num" in element["cls"].split() else "left"), (name, element)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_a_table_keeps_its_text_columns_readable_and_scrolls_inside_the_view_when_too_wide(tmp_path):
    """Cells wrap anywhere, so a long column (a degenerate steered explanation) squeezed its neighbour's text to a
    word a line, about 45 px; and a table of many columns (a WordSteering's eleven) ran past the view and the page."""
    clean = '<script>alert("x")</script> & "quoted" done'
    squeezed = display.result_html("SteeringResult", "1 site", [
        {"batch": 0, "clean": clean, "steered": "a very long explanation " * 30, "cosine": 0.7}],
        ["batch", "clean", "steered", "cosine"])
    cell = next(e for e in _styles(squeezed, "", tmp_path)["elements"] if e["tag"] == "TD" and e["text"] == clean)
    assert cell["width"] > 110 and "nla-prose" in cell["cls"]  # 8em of the table's 12.6 px font, and its padding
    said = "The token \" am\", after \"I\", predicting \" not\"."
    record = {"batch": 0, "position": 10, "token": " am", "explanation": said, "edited": said + " edited",
              "delta_norm": 0.158, "clean_next": "' a' 0.049, ' not' 0.046, ' no' 0.021",
              "steered_next": "' the' 0.084, ' a' 0.037, ' his' 0.024", "kl": 1.316,
              "clean_continuation": "a man. King Henry VI: I'll", "steered_continuation": "the king, And I have not"}
    wide = _styles(display.result_html("WordSteering", "1 site", [record], list(record)), "", tmp_path, width=800)
    table, = wide["tables"]
    assert wide["page"][1] <= wide["page"][0] and table["scrolled"][0] > table["visible"][0]  # the view scrolls
    assert all(e["width"] > 110 for e in wide["elements"] if "nla-prose" in e["cls"])


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_explained_text_view_renders_its_colours_in_headless_chromium(tmp_path):
    cells = _cells()
    scale = display.ColourScale.from_cells(cells)
    page = tmp_path / "view.html"
    page.write_text(display.page("view", display.explained_text_html(
        [cells], title="Explained text", layer=3, summary="10 tokens at layer 3")), encoding="utf-8")
    width, height, pixels = _pixels(_screenshot(page, tmp_path / "shot.png", tmp_path / "profile"))
    assert (width, height) == (1000, 700)
    counts = Counter(pixels)
    assert counts[(255, 255, 255)] < 0.97 * len(pixels)  # not a blank page
    # Each promised colour fills token boxes: the best FVE, the worst non-negative one, the most negative
    # (dark red), a milder negative (lighter red) and the grey of context tokens.
    for name, value in [("best", 0.97), ("lowest non-negative", 0.62), ("most negative", -1.5), ("negative", -0.4)]:
        assert counts[_hex(scale.colour(value))] > 100, name
    assert counts[_hex("#e8e8e8")] > 100, "context tokens"
    assert _hex(scale.colour(-1.5)) == (222, 45, 38)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_long_explanations_and_tokens_wrap_inside_the_page_and_are_shown_whole(tmp_path):
    said = "w" * 2000  # a degenerate AV output: one unbroken word
    table = display.result_html("Verbalizations", "1 row", [{"index": 0, "explanation": said, "fve": 0.5}],
                                ["index", "explanation", "fve"])
    view = display.explained_text_html([[display.TokenCell("y" * 300, 0, True, said, None, 0.5)]], title="t", layer=1)
    assert said in table and said in view  # whole, not cut at 300 characters
    for name, body in (("table", table), ("view", view)):
        page = tmp_path / f"{name}.html"
        page.write_text(display.page(name, body), encoding="utf-8")
        width, height, pixels = _pixels(_screenshot(page, tmp_path / f"{name}.png", tmp_path / "profile"))
        right_edge = [pixels[y * width + x] for y in range(height) for x in range(width - 20, width)]
        assert all(min(p) > 200 for p in right_edge), f"the {name} runs off the page"  # body margin: blank


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_a_long_unbroken_word_in_a_card_a_warning_or_a_summary_wraps_inside_the_page(tmp_path):
    """A feature card's explanation (or its failed parse's raw output), a warning (steer_with_words' quotes an
    unchanged explanation) and a summary line did not wrap a degenerate AV output's one long word: the card's
    "NLA:" line made a 1,000 px window's page 22,932 px wide, where the tables and the explained view wrap it."""
    said = "w" * 2000
    cards = [display.feature_card_html("Feature 3", "blocks.3.hook_resid_post", f"feature 3: {said}", explanation, said,
                                       [([" a", " b"], [0.5, 2.0], 1)]) for explanation in (said, None)]
    table = display.result_html("WordSteering", said, [{"index": 0}], ["index"], warnings=[f"e.g. {said!r}"])
    for name, body in (("card", cards[0]), ("failed card", cards[1]), ("table", table)):
        page = _measured(body, "[document.documentElement.clientWidth, document.documentElement.scrollWidth]",
                         tmp_path)
        assert page[1] <= page[0], f"the {name} runs off the page"
    assert all(card.count(said) == 2 for card in cards) and table.count(said) == 2  # wrapped, shown whole


def test_every_line_that_holds_model_text_may_break_inside_a_word():
    """What the browser test above measures, checked where no browser is (CI): every class a view puts model text or
    a warning in has a style rule that lets a long word break, so one degenerate word cannot widen the page."""
    rules = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", display._STYLE):
        for selector in selectors.split(","):
            rules.setdefault(selector.strip(), []).append(body)
    for cls in ("nla-head", "nla-meta", "nla-warn", "nla-said", "nla-label", "nla-tok"):
        assert any("overflow-wrap: anywhere" in body for body in rules.get(f".nla-view .{cls}", [])), cls


def test_curves_draw_each_series_in_its_own_range_and_skip_the_empty():
    """A training run's charts: the y axis spans each curve's own values; one point is a dot; no points, no chart."""
    page = display.curves_html([("loss", [(1, 4.0), (2, 2.0), (3, 1.0)]), ("kl", []), ("lr", [(5, 1e-3)]),
                                ("flat <b>", [(0, 0.5), (10, 0.5)])])
    assert page.count("<svg") == 3 and "kl" not in page
    loss = page[:page.index("</svg>")]
    assert "loss: 1 at step 3" in loss and ">4</text>" in loss and ">1</text>" in loss
    pairs = [pair.split(",") for pair in loss.split("points='")[1].split("'")[0].split()]
    xs, ys = [float(x) for x, _ in pairs], [float(y) for _, y in pairs]
    assert len(xs) == 3 and xs == sorted(xs) and ys == sorted(ys)  # later steps to the right, lower losses lower
    lr, flat = page.split("</svg>")[1:3]
    assert "<circle" in lr and "<polyline" not in lr and "<polyline" in flat  # one point is a dot; a flat run a line
    assert "flat &lt;b&gt;: 0.5 at step 10" in page and "flat <b>" not in page  # names are escaped
    assert display.curves_html([("kl", [])]) == ""


def test_a_table_cut_short_says_so_above_its_rows():
    """The note that rows were left out sat under the table's 200 rows, out of sight until scrolled past them."""
    records = [{"index": i, "explanation": f"row {i}"} for i in range(201)]
    view = display.result_html("Verbalizations", "201 verbalizations", records, ["index", "explanation"])
    note = "the table shows the first 200 of 201 rows (scroll it); .to_pandas() has them all"
    assert note in view and view.index(note) < view.index("<table") and "row 199" in view and "row 200" not in view
    assert "first 200" not in display.result_html("Verbalizations", "200", records[:200], ["index", "explanation"])


def test_a_table_taller_than_its_box_says_it_scrolls():
    """A table of 34 rows showed its first 20 in its box and nothing said more were there: a scrollbar that shows
    only under the pointer (macOS, many Linux themes) left the other 14 out of sight."""
    records = [{"index": i, "explanation": f"row {i}"} for i in range(34)]
    view = display.result_html("Verbalizations", "34 verbalizations", records, ["index", "explanation"])
    note = "34 rows: scroll the table for the rest"
    assert note in view and view.index(note) < view.index("<table")
    assert "scroll" not in display.result_html("Verbalizations", "20", records[:20], ["index", "explanation"])
    cells = [display.TokenCell(f" t{p}", p, True, f"The token t{p}", None, 0.5, 0.1) for p in range(34)]
    explained = display.explained_text_html([cells], title="t", layer=3)
    assert note in explained and explained.index(note) < explained.index("<table")


def test_the_explained_view_and_the_card_write_scores_as_every_table_does():
    """The explained view wrote FVE and MSE to 2 decimals where the result's repr, its to_pandas() table, the round
    trip's view and `nla-lens explain` write 3: a token of FVE 0.995, MSE 0.004 read 1.00 and 0.00 (a perfect
    reconstruction), a failed parse's miss -1.56 where the table said -1.562; a card's activation 6.44 beside its
    tooltip's 6.438."""
    cells = [display.TokenCell(" a", 0, True, "The token a", None, 0.995, 0.004),
             display.TokenCell(" b", 1, True, None, "garbled", -1.5625, 2.0)]
    view = display.explained_text_html([cells], title="Explained text", layer=3)
    assert "<td class='num'>0.995</td><td class='num'>0.004</td>" in view
    assert "<td class='num nla-unparsed'>miss (-1.562)</td><td class='num nla-unparsed'>miss (2.000)</td>" in view
    assert "title='FVE 0.995: The token a'" in view and ">1.00<" not in view
    card = display.feature_card_html("Feature 3", "blocks.3.hook_resid_post", "s", "e", "", [([" a"], [6.4375], 0)])
    assert "<td class='num'>6.438</td>" in card and "title='6.438'" in card


def test_a_table_cell_too_small_for_three_decimals_is_written_in_e_notation():
    """A learning rate of 2e-4 or a KL of 8e-5 printed as 0.000."""
    assert [display.format_cell(v) for v in (2.5e-4, -3e-5, 0.0, 0.0005, 0.123456)] == [
        "2.50e-04", "-3.00e-05", "0.000", "0.001", "0.123"]


def test_a_table_cell_too_large_for_three_decimals_is_written_in_e_notation_in_repr_html_and_terminal():
    """A diverging loss of 1e20 printed as 25 digits, and from about 1e57 a repr's 60-character cell cut the digits
    to a prefix that read as another number."""
    from nla_lens.training.runs import TrainingRun

    assert [display.format_cell(v) for v in (1e20, -3.2e9, 1e6, 999999.9, 123456.789, 0.901, 0.173)] == [
        "1.00e+20", "-3.20e+09", "1.00e+06", "999999.900", "123456.789", "0.901", "0.173"]
    history = [{"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 4e57}, {"step": 2, "loss": 1.5e20, "lr": 1e-3,
                                                                           "grad_norm": 1e58}]
    run = TrainingRun("train-av", Path("run/train_result.json"), True, 2, history, [], 1.0, {})
    for shown in (repr(run), run.curve_text()):
        assert shown.splitlines()[-1].split() == ["2", "1.50e+20", "1.00e+58", "0.001"]
    assert "<td class='num'>4.00e+57</td>" in run._repr_html_()



def test_headlines_legends_tooltips_and_rate_cells_follow_the_table_cells_e_notation():
    """format_cell wrote 1e20 as 1.00e+20 while a TrainingRun's headline (4 decimals: a loss of 1e57 as 58 digits),
    the views' legends and a card's tooltips (2 and 3 decimals) and a rate column (1e20 as a percentage of 23
    digits) printed every digit, and the legends' 2 decimals wrote 0.002 as 0.00. Ordinary values print as before."""
    from nla_lens.training.runs import TrainingRun

    history = [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 1e57, "lr": 1e-3}]
    run = TrainingRun("train-av", Path("run/train_result.json"), True, 2, history, [], 1.0, {})
    assert run.summary().endswith("; loss 2.5000 -> 1.00e+57")
    assert repr(run).splitlines()[0].endswith("; loss 2.5000 -> 1.00e+57")
    mse_legend = display.ColourScale("MSE", (0.002, 0.25, 3e20), None).legend_html()
    assert re.findall(r"<span>([^<]*)</span>", mse_legend)[:3] == ["3.00e+20", "0.25", "2.00e-03"]
    assert "FVE below 0, down to -4.00e+21:" in display.ColourScale("FVE", (0.5,), -4e21).legend_html()
    assert "FVE below 0, down to -1.50:" in display.ColourScale("FVE", (0.5,), -1.5).legend_html()
    card = display.feature_card_html("f", "h", "s", "e", "", [([" a", " b"], [1e20, 0.4375], 0)])
    assert "title='1.00e+20'" in card and "title='0.438'" in card and "activation 0 to 1.00e+20<" in card
    assert "activation 0 to 6.44<" in display.feature_card_html("f", "h", "s", "e", "", [([" a"], [6.4375], 0)])
    assert [display.format_cell(v, column="argmax_hit") for v in (1e20, -3e9, 0.4, 1.0, 0.004, 9999.0, 1e4)] == [
        "1.00e+22%", "-3.00e+11%", "40%", "100%", "0%", "999900%", "1.00e+06%"]

def test_round_trip_explanation_and_job_summaries_follow_the_table_cells_e_notation():
    """A round trip's, an explanation's and a file job's summary printed the mean MSE, the FVE and the baseline to 3
    decimals with every digit (a diverged mean MSE of 1e57 as 61 characters) and a small FVE as 0.000, where the
    tables beside them wrote 1.00e+57 and 4.00e-04. Ordinary values print as before."""
    import torch

    from nla_lens.explain import Explanation
    from nla_lens.nla import RoundTrip, baseline_phrase
    from nla_lens.sharded import JobResult, RoundTripSummary
    from nla_lens.verbalizer import Verbalization

    said = [Verbalization("<explanation>\na\n</explanation>", "a", [1])]
    rt = RoundTrip(said, torch.zeros(1, 4), torch.tensor([1e57]), 1e57, -2e56, 5.0, "given", 0)
    assert rt.summary() == "1 vector, mean MSE 1.00e+57, FVE -2.00e+56 (baseline 5.000, given), 0 failed parses"
    explained = Explanation([], ["abcd"], [["abcd"]], 1, torch.zeros(1, 4), rt)
    assert explained.summary().startswith("0 tokens of 1 text at layer 1, mean MSE 1.00e+57, FVE -2.00e+56 (")
    summary = RoundTripSummary(4, 3e20, 0.0004, 2e-5, "sidecar (held-out)", 0, 0, 0, 1.0)
    assert "; mean MSE 3.00e+20, FVE 4.00e-04 (baseline 2.00e-05, sidecar (held-out)), " in repr(
        JobResult(Path("out.parquet"), 1, [0], [], None, summary))
    assert baseline_phrase({"clean": 0.7341, "steered": 1e9}, 0.5, "given", 8) == (
        "FVE clean 0.734, steered 1.00e+09 (baseline 0.500, given, n=8)")


def _chip_backgrounds(view: str) -> dict[str, str]:
    """Each token's background in the line of tokens, by the token."""
    chips = re.findall(r"<span class='nla-tok[^']*' style='background:(#\w+);color:#\w+' title='[^']*'>([^<]*)<sub>",
                       view)
    return {token: background for background, token in chips}


def test_a_token_scored_nan_is_drawn_as_not_finite_and_leaves_the_others_coloured_by_fve():
    """A NaN FVE drew its token in the grey of a context token, and switched the whole view to MSE colouring."""
    scored = [display.TokenCell(" good", 0, True, "e", None, 0.9, 0.1),
              display.TokenCell(" fair", 1, True, "e", None, 0.5, 0.5),
              display.TokenCell(" bad", 2, True, "e", None, -0.4, 1.4), display.TokenCell(" context", 3)]
    nan = display.TokenCell(" nan", 4, True, "e", None, float("nan"), float("nan"))
    view = display.explained_text_html([[*scored, nan]], title="t", layer=3)
    chips = _chip_backgrounds(view)
    assert chips == {**_chip_backgrounds(display.explained_text_html([scored], title="t", layer=3)),
                     " nan": chips[" nan"]}  # the finite tokens keep their FVE colours
    assert chips[" nan"] not in {chips[" good"], chips[" fair"], chips[" bad"], chips[" context"]}
    assert "<b>FVE</b>" in view and "FVE nan (score not finite): e" in view
    legend = view[view.index("<div class='nla-legend'>"):view.index("<div class='nla-text'>")]
    assert f"background:{chips[' nan']}'></span>score not finite" in legend
    assert "score not finite" not in display.explained_text_html([scored], title="t", layer=3)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_a_number_column_has_its_header_aligned_right_over_its_numbers(tmp_path):
    """Every header was left-aligned, a number column's too, over numbers aligned right."""
    views = [display.result_html("RoundTrip", "2 vectors", [
                 {"index": 0, "explanation": "The token a", "fve": 0.5, "mse": None},
                 {"index": 1, "explanation": None, "parsed": False, "text": "raw", "fve": -1.5, "mse": 2.0}],
                 ["index", "explanation", "fve", "mse"]),
             display.explained_text_html([_cells()], title="Explained text", layer=3),
             display.feature_card_html("Feature 3", "blocks.3.hook_resid_post", "s", "e", "", [([" a"], [2.0], 0)])]
    elements = _styles("".join(views), "", tmp_path)["elements"]
    headers = {(e["table"], e["column"]): e for e in elements if e["tag"] == "TH"}
    cells = [e for e in elements if e["tag"] == "TD"]
    assert sum(h["align"] == "right" for h in headers.values()) == 7  # index, fve, mse; pos, FVE, MSE; activation
    for cell in cells:
        assert headers[cell["table"], cell["column"]]["align"] == cell["align"], cell


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_a_tall_wide_table_keeps_its_sideways_scrollbar_and_its_headers_in_view(tmp_path):
    """A WordSteering of 60 sites ran the table's full height, its sideways scrollbar under the last row, far below
    the window: to scroll the table sideways the reader first scrolled past every row."""
    said = "The token \" am\", after \"I\", predicting \" not\"."
    records = [{"batch": b, "position": 10, "token": " am", "explanation": said, "edited": said + " edited",
                "delta_norm": 0.158, "clean_next": "' a' 0.049, ' not' 0.046", "steered_next": "' the' 0.084",
                "kl": 1.316, "clean_continuation": "a man. King Henry VI: I'll", "steered_continuation": "the king"}
               for b in range(60)]
    view = display.result_html("WordSteering", "60 sites", records, list(records[0]))
    scrolled_down = "<script>document.querySelector('.nla-table').scrollTop = 300;</script>"
    read = _styles(view + scrolled_down, "", tmp_path, width=800)
    (table,), window_height = read["tables"], read["page"][2]
    assert table["scrolled"][0] > table["visible"][0]  # too wide: it scrolls sideways
    assert table["scrolled"][1] > table["visible"][1] and table["bottom"] <= window_height  # its bar is in view
    headers = [e for e in read["elements"] if e["tag"] == "TH"]
    assert headers and all(abs(h["top"] - table["top"]) < 1 for h in headers)  # scrolled, the headers stay on top


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_a_tall_narrow_table_keeps_its_scrollbar_beside_its_rows(tmp_path):
    """The table's box spanned the view's width: a narrow table's vertical scrollbar sat at the page's right edge,
    hundreds of pixels from the rows it scrolls."""
    records = [{"index": i, "explanation": f"The token t{i}", "fve": 0.5} for i in range(40)]
    read = _styles(display.result_html("RoundTrip", "40 vectors", records, list(records[0])), "", tmp_path)
    (table,) = read["tables"]
    assert table["scrolled"][1] > table["visible"][1]  # tall: it scrolls
    assert table["visible"][0] == table["scrolled"][0] < 400  # the box is the table's width, not the page's


def _polyline(chart: str) -> list[tuple[float, float]]:
    return [tuple(map(float, pair.split(","))) for pair in chart.split("points='")[1].split("'")[0].split()]


def test_a_curve_with_non_finite_values_draws_its_finite_points_and_names_the_other_steps():
    """A NaN or inf in a curve made every y coordinate NaN: an empty chart, the divergence invisible."""
    nan, inf = float("nan"), float("inf")
    page = display.curves_html([("loss", [(1, 4.0), (2, 2.0), (3, 1.0), (4, nan), (5, inf), (6, nan), (8, nan)]),
                                ("eval_fve", [(0, nan), (10, nan)])])
    assert page.count("<svg") == 1 and "eval_fve" not in page  # no finite value: no chart, as no value
    points = _polyline(page)
    assert len(points) == 3 and all(math.isfinite(c) for point in points for c in point)
    assert points[-1][0] < 200 and ">8</text>" in page  # the axis runs to step 8; the line stops at step 3
    assert "loss: 1 at step 3" in page and "loss not finite at steps 4-6, 8</div>" in page
    single = display.curves_html([("kl", [(1, 0.5), (2, nan)])])
    assert "kl not finite at step 2<" in single


def test_a_training_run_whose_loss_diverged_charts_it_up_to_the_divergence_and_names_the_steps_after():
    """The run's chart left out the null (non-finite) losses of a finished run's record without a word: it stopped
    at the last finite step, as if the run had ended there."""
    from nla_lens.training.runs import TrainingRun

    losses = [3.0, 2.0, 1.5, None, None]  # a finished run's record holds null where the loss was NaN
    history = [{"step": s, "loss": loss, "lr": 1e-3, "grad_norm": 1.0 if loss else None}
               for s, loss in enumerate(losses, start=1)]
    run = TrainingRun("train-av", Path("run/train_result.json"), True, 5, history, [{"step": 0, "loss": 3.5}], 1.0,
                      {})
    page = run._repr_html_()
    loss = page[page.index("<svg"):page.index("</svg>")]
    assert "loss: 1.5 at step 3" in loss and len(_polyline(loss)) == 3 and ">5</text>" in loss
    assert "loss not finite at steps 4-5<" in page and "grad_norm not finite at steps 4-5<" in page
    assert "eval_loss not finite" not in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_a_token_chip_in_a_table_beside_long_text_stays_on_one_line(tmp_path):
    """A steering table's automatic layout squeezed its token column to a sliver: the chip " villain" broke after
    its space, a blank sliver on one line and "villain" on the next."""
    said = "The token \"ction\", after \"c\", predicting \",\"."
    records = [{"batch": b, "position": 4, "token": token, "clean": said, "steered": said + " steered", "added": "a b",
                "removed": "c d", "cosine": 0.4, "fve_clean": 0.8, "fve_steered": -1.2}
               for b, token in enumerate((" dead", " villain", " wherefore"))]
    view = display.result_html("SteeringResult", "3 sites", records, list(records[0]))
    lines = _measured(view, "[...document.querySelectorAll('.nla-tok')].map(e => e.getClientRects().length)",
                      tmp_path, width=800)
    assert lines == [1, 1, 1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_an_outlined_token_is_padded_clear_of_its_outline(tmp_path):
    """The miss's dashed outline and a card's peak outline are drawn 2 px inside the chip, whose padding was 0.05 em
    (under 1 px): they covered a narrow glyph ("," or "l") whole."""
    missed = display.TokenCell(",", 0, True, None, "raw", -1.5, 2.0)
    views = (display.explained_text_html([[missed]], title="t", layer=1)
             + display.feature_card_html("f", "h", "s", "e", "", [(["B", "l", "ow"], [0.5, 2.0, 0.1], 1)]))
    chips = _measured(views, "[...document.querySelectorAll('.nla-tok.nla-failed, .nla-tok.nla-peak')].map(e => "
                             "[getComputedStyle(e).paddingLeft, getComputedStyle(e).paddingRight, "
                             "getComputedStyle(e).outlineWidth, getComputedStyle(e).outlineOffset])", tmp_path)
    assert len(chips) == 3  # the line's chip and the row's, and the card's peak
    for left, right, width, offset in ([float(v.removesuffix("px")) for v in chip] for chip in chips):
        assert offset == -width and min(left, right) >= width + 0.5


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_a_long_chart_title_is_shown_whole_above_its_chart(tmp_path):
    """The title was SVG text in the chart's 264 px box: "parse_failure_rate: 0.04688 at step 2000" was clipped to
    "... at step 2", a step the run had long passed."""
    curve = display.curves_html([("parse_failure_rate", [(1, 0.05), (2000, 0.04688)])])
    title = "parse_failure_rate: 0.04688 at step 2000"
    boxes = _measured(curve, "[...document.querySelectorAll('.nla-curves > div')].map(e => [e.getBoundingClientRect()"
                             ".right, [...e.querySelectorAll('*')].filter(c => c.textContent === "
                             f"{json.dumps(title)}).map(c => c.getBoundingClientRect().right)])", tmp_path)
    (chart_right, title_rights), = boxes
    assert title_rights and all(right <= chart_right + 0.5 for right in title_rights)


def test_a_flat_curve_labels_its_one_value_beside_its_line():
    """A curve whose values are all equal was labelled with that value at the top and at the bottom of its y axis,
    a range the line sat in the middle of."""
    flat = display.curves_html([("length", [(1, 30.0), (2, 30.0), (3, 30.0)])])
    assert flat.count(">30</text>") == 1
    line_y = {y for _, y in _polyline(flat)}
    label_y = float(re.search(r"<text x='\d+' y='([\d.]+)' text-anchor='end'>30</text>", flat).group(1))
    assert len(line_y) == 1 and abs(label_y - 4 - line_y.pop()) < 0.1  # on the line's height (its baseline 4 px down)
    dot = display.curves_html([("lr", [(5, 1e-3)])])
    assert dot.count(">0.001</text>") == 1


def test_format_number_signed_writes_a_plus_before_a_value_at_or_above_zero():
    """A difference is written +0.016, in e notation too where the decimals would misshow it (+2.00e-06)."""
    assert [display.format_number(v, signed=True) for v in (0.016, 0.0, -0.25, 2e-6, -3e20)] == [
        "+0.016", "+0.000", "-0.250", "+2.00e-06", "-3.00e+20"]
    assert [display.format_number(v, 2) for v in (0.016, 2e-6)] == ["0.02", "2.00e-06"]  # unsigned: as before


def test_explained_text_view_heads_each_block_with_its_label_escaped_and_none_without_labels():
    cells = _cells()
    view = display.explained_text_html([cells, cells], title="t", layer=3, labels=["[0] <i>a</i>", "[1] b & c"])
    assert re.findall(r"<div class='nla-text'><div class='nla-label'>(.*?)</div><div class='nla-tokens'>", view) == [
        "[0] &lt;i&gt;a&lt;/i&gt;", "[1] b &amp; c"]
    assert "nla-label'>" not in display.explained_text_html([cells], title="t", layer=3)
    assert display.text_label(2, "a\nb" + "c" * 20, width=8) == "[2] a\\nbccc…"
