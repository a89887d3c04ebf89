"""Explain a text token by token in one call: capture layer K, verbalize, reconstruct, score.

`explain` tokenizes each text as the NLA's training data was (with special tokens: BOS first where the
tokenizer has one), runs the base model once per text (no padding, so no mask to get wrong) under the
hooks the caller has installed plus `fwd_hooks`, captures `blocks.K.hook_resid_post` at the chosen
positions, and round-trips every captured vector in one batch. The result is an
[`Explanation`][nla_lens.explain.Explanation]: one row per explained token, a notebook view with the
tokens coloured by FVE, `to_pandas()` and `save()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from nla_lens import backends, display
from nla_lens.base_model import check_base_model
from nla_lens.capture import capture, check_token_ids, resid_post_name
from nla_lens.checks import check_encodable, check_fwd_hooks, counted, first_five, is_integer
from nla_lens.errors import InputError, PromptTooLongError, VectorError
from nla_lens.injection import directionless_rows
from nla_lens.loading import prepends_bos
from nla_lens.nla import NLA, RoundTrip, baseline_phrase, check_read_keywords, nla_type_name
from nla_lens.parsing import failed_parse_note
from nla_lens.results import TabularResult
from nla_lens.sidecar import text_ids
from nla_lens.verbalizer import Verbalization

if TYPE_CHECKING:
    from nla_lens.backends import TLModel

_LABEL_WIDTH = 80  # a text's head in the view: its tokens under it show the rest
ExplainPositions = int | Sequence[int] | slice | Int[Tensor, " k"] | np.ndarray | None


@dataclass(frozen=True)
class ExplainedToken:
    """One explained token: where it is, what the AV said, and how well the AR rebuilt its vector.

    Attributes:
        text_index: index into the explained texts.
        position: column in that text's tokens, a tokenizer-added BOS being column 0.
        token: the token there, decoded on its own.
        verbalization: the AV's output for the token's layer-K residual.
        mse: round-trip MSE of this token's vector (see NLA.round_trip).
        fve: the token's own FVE, 1 - mse / baseline; None when there is no trustworthy baseline.
        miss: whether its scores are the miss (`RoundTrip.misses`): a failed parse, an explanation the AR cannot
            read within its n_ctx, or a reconstruction with no direction.
    """

    text_index: int
    position: int
    token: str
    verbalization: Verbalization
    mse: float
    fve: float | None
    miss: bool = False

    @property
    def explanation(self) -> str | None:
        """The parsed explanation, None where the AV's text did not parse."""
        return self.verbalization.explanation


@dataclass(frozen=True, eq=False, repr=False)
class Explanation(TabularResult):
    """What `NLA.explain` returns: one row per explained token of one or more texts.

    Attributes:
        rows: one per explained token, text by text, in token order.
        texts: the explained texts; a row's is its `input_text` in the records and a saved file.
        tokens: every token of each text, explained or not (what the view draws).
        layer: the base model's layer read (blocks.{layer}.hook_resid_post), the NLA's K.
        vectors: the captured residuals, one per row.
        round_trip: the round trip of `vectors`: the scores behind each row's mse and fve, and the baseline.
        model_name: the base model's `cfg.model_name`, named in the view's title; None when it has none.
    """

    rows: list[ExplainedToken]
    texts: list[str]
    tokens: list[list[str]]
    layer: int
    vectors: Float[Tensor, "n d_model"]
    round_trip: RoundTrip
    model_name: str | None = None

    display_columns = ("text_index", "position", "token", "explanation", "parsed", "fve", "mse")
    # input_text is the explained text, so that a saved file says what each row explains (`text` is the AV's raw
    # output, as in RoundTrip's and verbalize's rows).
    schema = pa.schema({"text_index": pa.int64(), "input_text": pa.string(), "position": pa.int64(),
                        "token": pa.string(), "explanation": pa.string(), "parsed": pa.bool_(), "text": pa.string(),
                        "truncated": pa.bool_(), "mse": pa.float64(), "fve": pa.float64(), "miss": pa.bool_(),
                        "baseline": pa.float64(), "baseline_source": pa.string(), "layer": pa.int64()})
    # Every row has it, but files saved before rows recorded it do not: read_result reads those as they are.
    optional_columns = ("input_text",)
    warnings_at = "round_trip.warnings"

    @property
    def hook_name(self) -> str:
        """The hook point the explained vectors were read at: `blocks.{layer}.hook_resid_post`."""
        return resid_post_name(self.layer)

    @property
    def explanations(self) -> list[str | None]:
        """Each row's parsed explanation, None where the AV's text did not parse."""
        return [row.explanation for row in self.rows]

    def to_records(self) -> list[dict[str, Any]]:
        rt = self.round_trip
        return [{"text_index": r.text_index, "input_text": self.texts[r.text_index], "position": r.position,
                 "token": r.token, "explanation": r.explanation, "parsed": r.explanation is not None,
                 "text": r.verbalization.text, "truncated": r.verbalization.truncated, "mse": r.mse, "fve": r.fve,
                 "miss": r.miss, "baseline": rt.baseline, "baseline_source": rt.baseline_source, "layer": self.layer}
                for r in self.rows]

    def summary(self) -> str:
        rt = self.round_trip
        return (f"{counted(len(self.rows), 'token')} of {counted(len(self.texts), 'text')} at layer {self.layer}, "
                f"mean MSE {display.format_number(rt.mean_mse)}, "
                f"{baseline_phrase(rt.fve, rt.baseline, rt.baseline_source, rt.baseline_n)}, "
                f"{counted(rt.n_failed_parses, 'failed parse')}{failed_parse_note(rt.verbalizations)}")

    def cells(self) -> list[list[display.TokenCell]]:
        """Every token of every text as the view draws it (context tokens unexplained)."""
        by_site = {(r.text_index, r.position): r for r in self.rows}
        out = []
        for t, tokens in enumerate(self.tokens):
            cells = []
            for p, token in enumerate(tokens):
                row = by_site.get((t, p))
                cells.append(display.TokenCell(token, p) if row is None else display.TokenCell(
                    token, p, True, row.explanation, row.verbalization.text, row.fve, row.mse,
                    row.verbalization.truncated, row.miss))
            out.append(cells)
        return out

    def _repr_html_(self) -> str:
        title = "Explained text" + (f" · {display.model_label(self.model_name)}" if self.model_name else "")
        labels = [display.text_label(t, text, _LABEL_WIDTH) for t, text in enumerate(self.texts)]
        return display.explained_text_html(self.cells(), title=title, layer=self.layer, summary=self._headline(),
                                           hook_name=self.hook_name, warnings=self._held_warnings(), labels=labels)


def explain(nla: NLA, base: TLModel, text_or_texts: str | Sequence[str], *, positions: ExplainPositions = None,
            baseline: float | None = None, fwd_hooks: Sequence[tuple[str, Any]] = (),
            **verbalize_kwargs: Any) -> Explanation:
    """Explain `positions` (default: every token but the BOS the tokenizer puts first) of each text with `nla`.

    `positions` is an int, a list of ints (negative counts from the end; also a 1-d integer tensor or NumPy
    array, or a 0-d one such as an `argmax()`, as `nl.capture` takes them) or a slice, applied to every
    text; each text's rows come in token order, a position named twice once (`[5, 1]` gives rows 1, 5).
    `baseline` is the FVE baseline (default: as `NLA.round_trip` picks it, the AR sidecar's, else the paper
    baseline of the explained tokens' vectors when there are at least 32);
    `verbalize_kwargs` go to `verbalize` (e.g. `max_new_tokens`, `batch_size`). Texts already tokenized go
    to `explain_tokens` (`from nla_lens.explain import explain_tokens`).
    """
    backends.backend_of(base)  # the text is tokenized with its tokenizer before explain_tokens checks it
    texts = _texts(text_or_texts)
    rows, skip = text_rows(_tokenizer(base), texts)
    return _explain_rows(nla, base, rows, positions=positions, skip=skip, skip_is_bos=True, texts=texts,
                         baseline=baseline, fwd_hooks=fwd_hooks, **verbalize_kwargs)


def text_rows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Each text's token ids as `explain` reads them (BOS first where the tokenizer has one, never two), and how
    many leading ones it leaves out by default (that BOS)."""
    rows = [text_ids(tokenizer, text) for text in texts]
    return rows, [bos_skip(tokenizer, ids) for ids in rows]


def text_columns(positions: ExplainPositions, token_rows: Sequence[Sequence[int]], skip: Sequence[int],
                 texts: Sequence[str], *, skip_is_bos: bool = True) -> list[list[int]]:
    """The columns of each row that `positions` names (`select_positions`), its errors naming the text as the
    table does; `nla-lens explain` checks its `--positions` with it before any weight is read."""
    return [select_positions(positions, len(row), s, text=f"text {t} ({display.format_cell(text, 30)!r})",
                             skip_is_bos=skip_is_bos)
            for t, (row, s, text) in enumerate(zip(token_rows, skip, texts, strict=True))]


def check_rows_fit(token_rows: Sequence[Sequence[int]], n_ctx: int | None, texts: Sequence[str] | None) -> None:
    """A PromptTooLongError naming the first row longer than the base's context `n_ctx` (by its text where `texts`
    are given; None: a context config.json does not say, nothing to check); `nla-lens explain` and `steer-words`
    check with the config's n_ctx before any weight is read."""
    if n_ctx is None:
        return
    too_long = next((t for t, row in enumerate(token_rows) if len(row) > n_ctx), None)
    if too_long is not None:
        name = (f"token_rows[{too_long}]" if texts is None
                else f"text {too_long} ({display.format_cell(texts[too_long], 30)!r})")
        raise PromptTooLongError(f"{name} is {len(token_rows[too_long])} tokens, over the base model's context of "
                                 f"{n_ctx}; split it into shorter texts")


def _tokenizer(base: TLModel) -> PreTrainedTokenizerBase:
    """The base model's tokenizer: `explain` tokenizes the texts with it, `explain_tokens` names each token."""
    if base.tokenizer is None:
        raise InputError("the base model has no tokenizer; load it with nl.load_base(...), or set base.tokenizer to "
                         "its tokenizer")
    return base.tokenizer


def _texts(text_or_texts: object) -> list[str]:
    """`explain`'s texts as a list of non-blank strings; anything else is an InputError saying what was given."""
    if isinstance(text_or_texts, str):
        texts = [text_or_texts]
    elif isinstance(text_or_texts, bytes | bytearray | Mapping):  # iterate as ints, and as keys: not the texts
        hint = ("; decode it first (text.decode('utf-8'))" if isinstance(text_or_texts, bytes | bytearray)
                else "; pass the texts as a list (list(d.values()) for a dict of texts)")
        raise InputError(f"explain takes a str or a list of str, got {type(text_or_texts).__name__}{hint}")
    elif isinstance(text_or_texts, Iterable) and not isinstance(text_or_texts, Tensor):
        texts = list(text_or_texts)
    else:  # a tensor iterates as tensors, None or a number not at all: neither is a list of texts
        hint = ("; token ids go to explain_tokens (from nla_lens.explain import explain_tokens)"
                if isinstance(text_or_texts, Tensor) else "")
        raise InputError(f"explain takes a str or a list of str, got {type(text_or_texts).__name__}{hint}")
    if not texts:
        raise InputError("pass a non-empty text, or a non-empty list of non-empty texts, to explain")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"explain takes a str or a list of str; text {i} is {type(text).__name__}")
        if not text:
            raise InputError(f"text {i} is empty: pass non-empty texts to explain")
        if not text.strip():
            raise InputError(f"text {i} is {text!r}, blank (whitespace only): pass texts with a non-space character "
                             "to explain")
        check_encodable(text, f"text {i}")
    return texts


def bos_skip(tokenizer: Any, ids: Sequence[int]) -> int:
    """How many leading tokens of `ids` are left out by default: the BOS the tokenizer puts first (1), else 0.
    A BOS residual is an attention sink with a huge norm, so its explanation is noise."""
    return int(prepends_bos(tokenizer) and list(ids[:1]) == [tokenizer.bos_token_id])


def explain_tokens(nla: NLA, base: TLModel, token_rows: Sequence[Sequence[int]] | Int[Tensor, "1 pos"], *,
                   positions: ExplainPositions = None, skip: Sequence[int] | None = None,
                   texts: Sequence[str] | None = None, baseline: float | None = None,
                   fwd_hooks: Sequence[tuple[str, Any]] = (), **verbalize_kwargs: Any) -> Explanation:
    """`explain` for texts already tokenized (`token_rows`: a list of each text's unpadded ids, or one text's
    `base.to_tokens(text)`); `skip[i]` leading tokens of row i are left out when `positions` is None (a BOS the
    tokenizer added)."""
    return _explain_rows(nla, base, token_rows, positions=positions, skip=skip, skip_is_bos=False, texts=texts,
                         baseline=baseline, fwd_hooks=fwd_hooks, **verbalize_kwargs)


def _check_hooks_fire(base: TLModel, fwd_hooks: Sequence[tuple[Any, Any]]) -> None:
    """Refuse a hook at a point TransformerLens computes only when asked (`attn.hook_result`, `hook_mlp_in`, ...):
    HookedTransformer attaches it and never runs it, so the explanations would be the unhooked ones; the bridge
    refuses it with a bare ValueError."""
    for name, _ in fwd_hooks:
        setter = backends.switch_needed(base, name) if isinstance(name, str) else None
        if setter is not None:
            raise InputError(f"explain: fwd_hooks names {name!r}, which TransformerLens computes only when asked, so "
                             f"the hook would never run: call base.{setter}(True) first")


def _explain_rows(nla: NLA, base: TLModel, token_rows: Sequence[Sequence[int]] | Int[Tensor, "1 pos"], *,
                  positions: ExplainPositions, skip: Sequence[int] | None, skip_is_bos: bool,
                  texts: Sequence[str] | None, baseline: float | None, fwd_hooks: Sequence[tuple[str, Any]],
                  **verbalize_kwargs: Any) -> Explanation:
    """`explain_tokens`; `skip_is_bos` says whether `skip` is `explain`'s own (each row's BOS) or the caller's, so a
    row it leaves nothing of is named by what was skipped."""
    if not isinstance(nla, NLA):  # an AV alone has no AR to score with: an AttributeError further down
        raise InputError(f"explain needs an NLA (AV and AR: nl.NLA(av, ar)), got {nla_type_name(nla)}; with an AV "
                         "alone, capture the vectors with nl.capture and call av.verbalize")
    layer = nla.layer
    check_base_model(base, nla, layer)
    check_read_keywords(nla, verbalize_kwargs, "explain")
    fwd_hooks = check_fwd_hooks(fwd_hooks, base.hook_dict, "explain")
    _check_hooks_fire(base, fwd_hooks)
    token_rows = _rows_of(token_rows)
    if not token_rows or not all(len(row) for row in token_rows):
        raise InputError("every text to explain needs at least one token")
    _check_per_row(token_rows, skip=skip, texts=texts)
    check_rows_fit(token_rows, base.cfg.n_ctx, texts)
    for t, row in enumerate(token_rows):
        try:
            ids = torch.tensor([list(row)])
        except (TypeError, ValueError, RuntimeError) as exc:  # torch's words for a string or a ragged entry
            raise InputError(f"token_rows[{t}] must hold integer token ids, got {display.format_cell(list(row), 60)}; "
                             "tokenize with base.to_tokens(text), or explain the text with nla.explain") from exc
        check_token_ids(base, ids, f"token_rows[{t}]")
    skip = [0] * len(token_rows) if skip is None else list(skip)
    tokenizer = _tokenizer(base)
    texts = [cast(str, tokenizer.decode(list(row))) for row in token_rows] if texts is None else list(texts)
    columns = text_columns(positions, token_rows, skip, texts, skip_is_bos=skip_is_bos)
    device = base.W_E.device
    vectors, sites = [], []
    with torch.no_grad():
        for t, (row, cols) in enumerate(zip(token_rows, columns, strict=True)):
            tokens = torch.tensor([list(row)], device=device)
            # One unpadded text: every token is real, a pad-id one too (Qwen's pad is <|endoftext|>, which ends
            # documents); without the mask, capture and HookedTransformer took it for padding.
            mask = torch.ones_like(tokens)
            with capture(base, layer, positions=cols, attention_mask=mask) as cap:
                backends.run_with_hooks(base, tokens, attention_mask=mask, fwd_hooks=fwd_hooks, stop_at_layer=layer + 1)
            vectors.append(cap.vectors)
            sites += [(t, p) for p in cols]
    captured = torch.cat(vectors)
    strings = [[cast(str, tokenizer.decode([i], clean_up_tokenization_spaces=False)) for i in row]
               for row in token_rows]
    _check_directions(captured, sites, strings, layer)
    round_trip = nla.round_trip(captured, baseline=baseline, name_rows=lambda rows: _name_sites(rows, sites, strings),
                                **verbalize_kwargs)
    fves = [None] * len(sites) if round_trip.fves is None else round_trip.fves.tolist()
    explained = [ExplainedToken(t, p, strings[t][p], v, mse, fve, miss) for (t, p), v, mse, fve, miss in
                 zip(sites, round_trip.verbalizations, round_trip.mse.tolist(), fves, round_trip.misses, strict=True)]
    return Explanation(explained, texts, strings, layer, captured, round_trip, getattr(base.cfg, "model_name", None))


def _rows_of(token_rows: object) -> list[Any]:
    """`explain_tokens`' rows as a list, one per text. A `[1, pos]` tensor (`base.to_tokens(text)`) is one row; a
    tensor of several rows is refused, as `to_tokens` of several texts pads them and a pad would be explained as a
    token; one row of ids not in a list is refused, as it would be read as texts of one token each."""
    if isinstance(token_rows, Tensor):
        if token_rows.ndim == 2 and token_rows.shape[0] == 1:
            return list(token_rows)
        raise InputError(f"token_rows is a tensor of shape {list(token_rows.shape)}; pass a list of each text's own "
                         "unpadded ids ([base.to_tokens(text)[0] for text in texts]), or one text's [1, pos] tokens")
    if not isinstance(token_rows, Sequence) or isinstance(token_rows, str):
        raise InputError(f"token_rows must be a list of token-id rows, one per text, got {type(token_rows).__name__}")
    if any(is_integer(row) or (isinstance(row, Tensor) and row.ndim == 0) for row in token_rows):
        raise InputError("token_rows holds ids, not rows of ids: pass a list of rows, one per text ([ids] for one)")
    return list(token_rows)


def _check_per_row(token_rows: Sequence[Sequence[int]], *, skip: Sequence[int] | None,
                   texts: Sequence[str] | None) -> None:
    """`skip` and `texts` give one entry per row, `skip` a count of leading tokens (>= 0): a shorter list was a bare
    ValueError from zip, and a negative skip named positions from the end, each twice."""
    n = len(token_rows)
    for name, given in (("skip", skip), ("texts", texts)):
        if given is not None and len(given) != n:
            raise InputError(f"{name} gives {len(given)} for {counted(n, 'row')} of token_rows; give one per row, "
                             f"or leave {name} out")
    bad = next((s for s in skip or () if not is_integer(s) or s < 0), None)
    if bad is not None:
        raise InputError(f"skip holds {bad!r}: each entry is how many leading tokens of its row to leave out, a whole "
                         "number >= 0")


def _name_sites(rows: Sequence[int], sites: Sequence[tuple[int, int]], strings: Sequence[Sequence[str]]) -> str:
    """Rows of the concatenation of every text's explained positions named as the table shows them: "text 0
    position 3 (' cat')"; an index into that concatenation means nothing to the reader of the table."""
    def site(row: int) -> str:
        text, position = sites[row]
        return f"text {text} position {position} ({strings[text][position]!r})"

    return first_five(rows, site)


def _check_directions(vectors: Float[Tensor, "n d_model"], sites: Sequence[tuple[int, int]],
                      strings: Sequence[Sequence[str]], layer: int) -> None:
    """Refuse residuals the AV cannot be given (zero: no direction; non-finite), naming each by its text,
    position and token; `verbalize` would name rows of the concatenation of every text's positions."""
    non_finite, zero = directionless_rows(vectors)
    if non_finite or zero:
        shown = _name_sites(sorted({*non_finite, *zero}), sites, strings)
        raise VectorError(f"the layer-{layer} residual at {shown} is zero or not finite, so it has no direction to "
                          "inject (a hook of yours that zeroes it, or a token whose embedding is zero). Leave those "
                          "positions out with positions=, or explain a run that leaves them their values")


def _unwrapped(positions: ExplainPositions) -> ExplainPositions:
    """A 0-d or 1-d integer tensor or NumPy array as the int or list of ints it holds (an `argmax()`, an index array,
    as `nl.capture` takes them); anything else, a float or bool array among them, as given, for the checks to refuse."""
    if not isinstance(positions, Tensor | np.ndarray) or positions.ndim > 1:
        return positions
    integral = (not positions.is_floating_point() and not positions.is_complex() and positions.dtype != torch.bool
                if isinstance(positions, Tensor) else np.issubdtype(positions.dtype, np.integer))
    return positions.tolist() if integral else positions


def _slice_text(positions: slice) -> str:
    """A slice as it is written (`3:`, `2:10`, `::2`), not `slice(3, None, None)`."""
    parts = ["" if v is None else str(v) for v in (positions.start, positions.stop, positions.step)]
    return ":".join(parts if positions.step is not None else parts[:2])


def _sliced(positions: slice, length: int) -> list[int]:
    """The columns a slice names; a step of 0 or a bound that is not an int is an InputError, not Python's."""
    bounds = (positions.start, positions.stop, positions.step)
    if not all(v is None or is_integer(v) for v in bounds) or positions.step == 0:
        raise InputError(f"positions {_slice_text(positions)} is not a slice of token positions: its start, stop and "
                         "step are ints (or left out) and its step is not 0, e.g. 8: or -4: or ::2")
    return list(range(length))[positions]


def select_positions(positions: ExplainPositions, length: int, skip: int = 0, text: str = "a text", *,
                     skip_is_bos: bool = True) -> list[int]:
    """The columns of a `length`-token text that `positions` names (see `explain`), sorted, no repeats; the errors
    name the text as `text` says ("text 2 ('The cat sat')"). `skip_is_bos`: the `skip` leading tokens are the BOS the
    default leaves out, else the ones a caller's `skip=` leaves out."""
    if positions is None:
        if skip >= length and skip_is_bos:  # a text that is only its BOS: explaining it would be the default's noise
            raise InputError(f"{text} has no token past its BOS, which is left out by default: pass a text with a "
                             "token after its BOS, or positions=0 (--positions 0) to explain the BOS itself")
        if skip >= length:
            raise InputError(f"{text} has no token past the {counted(skip, 'token')} skip= leaves out (it has "
                             f"{length}): pass a smaller skip for it, or positions= to name the tokens to explain")
        return list(range(skip, length))
    positions = _unwrapped(positions)
    if isinstance(positions, slice):
        chosen = _sliced(positions, length)
    elif is_integer(positions):
        chosen = [int(positions)]
    elif (isinstance(positions, Sequence) and not isinstance(positions, str) and positions
          and all(is_integer(p) for p in positions)):
        chosen = [int(p) for p in positions]
    else:
        raise InputError(f"positions must be None (every token), an int, a non-empty list of ints (or a 1-d integer "
                         f"tensor or array) or a slice; got {positions!r}")
    outside = [p for p in chosen if not -length <= p < length]
    if outside:
        raise InputError(f"position {outside[0]} is outside {text} of {counted(length, 'token')} (0..{length - 1}, or "
                         f"-{length}..-1 from the end)")
    if not chosen:
        shown = _slice_text(positions) if isinstance(positions, slice) else repr(positions)
        raise InputError(f"positions {shown} select no token of {text} of {counted(length, 'token')} "
                         f"(0..{length - 1}); pick positions inside every text, e.g. -1 for each one's last token")
    return sorted({p % length for p in chosen})


