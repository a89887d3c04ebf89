"""A griffe extension for the API reference: an attribute's trailing `# comment` becomes its docstring.

nla_lens documents dataclass fields where the code reads them (`mse: Float[Tensor, " n"]  # per-row ...`);
griffe reads only docstrings, so without this every field of a result type showed on its page bare.
"""

from __future__ import annotations

import io
import tokenize
from typing import Any

from griffe import Attribute, Docstring, Extension

_TOOL_COMMENTS = ("type:", "noqa", "pragma", "fmt:")  # for linters and checkers, not for readers


def trailing_comment(line: str) -> str | None:
    """The text of the comment that ends one complete statement's line, if any."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip()).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    comments = [t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT]
    if not comments or not comments[-1] or comments[-1].startswith(_TOOL_COMMENTS):
        return None
    return comments[-1]


class FieldComments(Extension):
    """Gives an undocumented one-line attribute its trailing comment as docstring."""

    def on_attribute_instance(self, *, attr: Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None or attr.lineno != attr.endlineno:
            return
        lines = attr.lines
        comment = trailing_comment(lines[0]) if len(lines) == 1 else None
        if comment:
            attr.docstring = Docstring(comment, lineno=attr.lineno, endlineno=attr.lineno, parent=attr)
