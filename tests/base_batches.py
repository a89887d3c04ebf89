"""The tiny base model and padded prompt batches shared by the capture and experiment tests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nla_lens import backends, loading

if TYPE_CHECKING:
    from nla_lens.backends import TLModel

PROMPTS = ["The cat sat on the mat.", "A dog ran", "the sea and the mat", "Words about the weather and the sea."]


def load_base(folder: Path, dtype: torch.dtype = torch.float32) -> TLModel:
    """The tiny base model (the tiny AV folder holds a full copy of it), unprocessed, on the default backend."""
    return backends.load_model(folder, loading.load_tokenizer(folder), dtype=dtype, device="cpu")


def padded(base: TLModel, side: str, prompts: list[str] = PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths, padded with pad_token_id on `side`, and their attention mask."""
    tok = base.tokenizer
    rows = [tok.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, rows))
    assert len({len(r) for r in rows}) == len(rows)
    tokens, mask = [], []
    for row in rows:
        pad = width - len(row)
        if side == "left":
            tokens.append([tok.pad_token_id] * pad + row)
            mask.append([0] * pad + [1] * len(row))
        else:
            tokens.append(row + [tok.pad_token_id] * pad)
            mask.append([1] * len(row) + [0] * pad)
    return torch.tensor(tokens), torch.tensor(mask)


def no_hooks_left(model: TLModel) -> bool:
    """No TL hook on any hook point and no torch forward hook on any block."""
    return (all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
            and all(not block._forward_hooks for block in model.blocks))


def distinct_readouts(av, monkeypatch) -> None:
    """Make `av.verbalize` return a parsed explanation per vector that differs with the vector, so every
    row's round-trip MSE differs: the tiny AV's few tokens never close the tag, and all-miss rows (MSE 2.0
    each) would let a row mix-up pass unseen."""
    from nla_lens.parsing import parse_explanation
    from nla_lens.verbalizer import Verbalization

    def verbalize(vectors, **_):
        texts = [f"<explanation>the sea {float(v.double().sum()):.4f}</explanation>" for v in vectors]
        return [Verbalization(t, parse_explanation(t), []) for t in texts]

    monkeypatch.setattr(av, "verbalize", verbalize)
