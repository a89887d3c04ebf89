"""Pad token-id lists into one batch with an attention mask."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor


def pad(rows: list[list[int]], pad_id: int, side: Literal["left", "right"]) -> tuple[
        Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Tokens and mask for `rows`; pads sit on `side` and are masked out, so `pad_id` never matters."""
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return tokens, mask
