"""griffe extensions for the API reference: each dataclass field shows once, under its own heading, with its meaning.

Result types describe their fields in an `Attributes:` section of the class docstring, so that `help()` and `?`
show them; mkdocstrings would render that section as a table above the same fields listed again, bare.
`AttributesSection` moves each entry onto its field instead. Other dataclasses document a field with a trailing
`# comment` where the code reads it (`context_size: int = 128  # tokens per dataset row`); griffe reads only
docstrings, so `FieldComments` makes that comment the field's docstring.
"""

from __future__ import annotations

import io
import tokenize
from typing import Any

from griffe import Attribute, Class, Docstring, DocstringSectionKind, Extension, logger

_TOOL_COMMENTS = ("type:", "noqa", "pragma", "fmt:")  # for linters and checkers, not for readers
_HEADER = "Attributes:"


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


def without_attributes_section(text: str) -> str:
    """A Google-style docstring with its `Attributes:` section (the header and the indented lines under it) cut."""
    lines = text.splitlines()
    start = lines.index(_HEADER)
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[:start] + lines[end:]).strip()


class AttributesSection(Extension):
    """Gives each field named in a class docstring's `Attributes:` section that entry as its docstring, and takes
    the section out of the class docstring."""

    def on_class_members(self, *, cls: Class, **kwargs: Any) -> None:
        docstring = cls.docstring
        if docstring is None or _HEADER not in docstring.value.splitlines():
            return
        for section in docstring.parse("google"):
            if section.kind is not DocstringSectionKind.attributes:
                continue
            for entry in section.value:
                member = cls.members.get(entry.name)
                if not isinstance(member, Attribute):  # a warning fails the strict build: no entry is lost
                    logger.warning(f"{cls.path}: its Attributes section describes {entry.name!r}, not a field of it")
                elif member.docstring is not None:
                    logger.warning(f"{cls.path}.{entry.name} is described twice: in the Attributes section and "
                                   "by a comment or docstring of its own; keep one")
                else:
                    member.docstring = Docstring(entry.description, parent=member)
        cls.docstring = Docstring(without_attributes_section(docstring.value), lineno=docstring.lineno,
                                  endlineno=docstring.endlineno, parent=cls)


class FieldComments(Extension):
    """Gives an undocumented one-line attribute its trailing comment as docstring."""

    def on_attribute_instance(self, *, attr: Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None or attr.lineno != attr.endlineno:
            return
        lines = attr.lines
        comment = trailing_comment(lines[0]) if len(lines) == 1 else None
        if comment:
            attr.docstring = Docstring(comment, lineno=attr.lineno, endlineno=attr.lineno, parent=attr)
