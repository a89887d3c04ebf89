"""A programmatic labeler: what the context at position p really contains, NLA-style.

The paper asks an LLM to describe the context; the toy NLA states facts a mid-layer residual of a
small LM really carries: the token at p, the words just before it, and the token the base model
predicts next. Each snippet quotes tokens exactly as the tokenizer decodes them, so the AR can
rebuild the vector from the words and a test can check the AV named the right token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from transformers import PreTrainedTokenizerBase


def quote(piece: str) -> str:
    """A token piece as the explanations write it: double quotes, newlines made visible."""
    return '"' + piece.replace("\n", "\\n").replace('"', "'") + '"'


def describe_position(tokenizer: PreTrainedTokenizerBase, prefix: Sequence[int], predicted: int,
                      context_tokens: int = 1) -> str:
    """2-3 snippets about the last token of `prefix`, given the base model's next-token guess."""
    final = cast(str, tokenizer.decode([prefix[-1]]))
    before = cast(str, tokenizer.decode(list(prefix[-1 - context_tokens:-1]))).strip()
    snippets = [f"The token {quote(final)}"]
    if before:
        snippets.append(f"after {quote(before)}")
    snippets.append(f"predicting {quote(cast(str, tokenizer.decode([predicted])))}.")
    return ", ".join(snippets)


def names_token(explanation: str | None, tokenizer: PreTrainedTokenizerBase, token: int) -> bool:
    """Whether an explanation's first snippet names `token` (the check behind the demo's accuracy)."""
    return explanation is not None and explanation.startswith(
        f"The token {quote(cast(str, tokenizer.decode([token])))}")
