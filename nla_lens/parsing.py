"""Reading the AV's output: the explanation between the tags, and signs of a failed injection."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nla_lens.verbalizer import Verbalization

# The paper's inference code: first match, surrounding whitespace dropped.
_EXPLANATION = re.compile(r"<explanation>\s*(.*?)\s*</explanation>", re.DOTALL)
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")

# How a warning names the rows it is about, given their indices in the batch: "rows [0, 2]" by default; `explain`
# names its text, position and token, since its table has no flat row index.
RowNamer = Callable[[Sequence[int]], str]


def row_indices(rows: Sequence[int]) -> str:
    """Rows named by their index in the batch, the first 8: "rows [0, 2]"."""
    return f"rows {list(rows[:8])}"


def parse_explanation(text: str) -> str | None:
    """The explanation between `<explanation>` tags, stripped; None when the tags are missing."""
    match = _EXPLANATION.search(text)
    return match.group(1).strip() if match else None


def failed_parse_note(verbalizations: Iterable[Verbalization]) -> str:
    """" (k cut at max_new_tokens before </explanation>: ...)" for a summary's failed parses, which a count of
    failures alone does not say; those that opened the tag and ended without closing it are counted apart, since a
    larger `max_new_tokens` would not have closed them. "" when neither occurs."""
    failed = [v for v in verbalizations if v.explanation is None]
    cut = sum(v.truncated for v in failed)
    unclosed = sum(not v.truncated and "<explanation>" in v.text for v in failed)
    notes = ([f"{cut} cut at max_new_tokens before </explanation>: verbalize with a larger one"] if cut else []) + (
        [f"{unclosed} opened <explanation> and ended without closing it"] if unclosed else [])
    return f" ({'; '.join(notes)})" if notes else ""


def cjk_fraction(text: str) -> float:
    """The share of visible characters that are CJK (what RL logs: a drifting AV turns to CJK)."""
    visible = [c for c in text if not c.isspace()]
    return len(_CJK.findall(text)) / len(visible) if visible else 0.0


def looks_like_failed_injection(text: str, marker_char: str, cjk_fraction: float = 0.3) -> bool:
    """What users of the reference code watch for: the marker echoed, or output dominated by CJK.

    A vector that never reached the AV (wrong site, wrong scale) leaves it to continue from the bare
    marker char, which for Qwen-family tokenizers drifts into CJK text.
    """
    if marker_char in text:
        return True
    visible = [c for c in text if not c.isspace()]
    return bool(visible) and len(_CJK.findall(text)) / len(visible) > cjk_fraction


@contextmanager
def injection_warning_held() -> Iterator[None]:
    """Around a `verbalize` whose caller reports a failed injection itself (on its result, once over a whole job):
    that warning is held back, and any other (torch's, TransformerLens's, the user's hooks') still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\d+/\d+ AV outputs echo the marker ")
        yield


def injection_warning(texts: list[str], marker_char: str, name_rows: RowNamer = row_indices) -> str | None:
    """A warning for a batch of AV outputs, naming the flagged rows with `name_rows`; None when they look healthy."""
    flagged = [i for i, t in enumerate(texts) if looks_like_failed_injection(t, marker_char)]
    if not flagged:
        return None
    return (
        f"{len(flagged)}/{len(texts)} AV outputs echo the marker {marker_char!r} or are mostly CJK "
        f"({name_rows(flagged)}): the injection probably failed. Check the injection method and hook "
        "point against how this AV was trained (av.injection_spec)."
    )
