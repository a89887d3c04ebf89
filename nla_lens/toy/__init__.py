"""The bundled toy NLA: a small Shakespeare LM (base), its AV and AR, trained offline by `nla_lens.toy.train`.

>>> toy = nl.toy.load()                  # base, av, ar and nla, all on the CPU in seconds
>>> toy.nla.explain(toy.base, "Romeo: wherefore art thou")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nla_lens.toy.evaluate import ToyNLA

TOY_DIR = Path(__file__).parent / "checkpoints"
BASE_MODEL = "nla-lens-toy-shakespeare"  # the `base_model` its sidecars name; `nl.load_base` knows it


def load(device: str | torch.device = "cpu", pair: str = "sft") -> ToyNLA:
    """The bundled checkpoints, loaded: `.base` (a TL model, no weight processing), `.av`, `.ar`, `.nla`.

    `pair`: "sft" (the pair the tutorials and toy experiments measure) or "rl" (trained on from it by RL).
    """
    from nla_lens.toy.evaluate import ToyNLA

    return ToyNLA.load(TOY_DIR, device=str(device), pair=pair)


def heldout_texts(n: int | None = None) -> list[str]:
    """Speeches from the two plays the toy never saw in training (Macbeth, The Tempest)."""
    from nla_lens.toy.evaluate import HELDOUT_FILE

    docs = json.loads((TOY_DIR / HELDOUT_FILE).read_text(encoding="utf-8"))
    return [doc["text"] for doc in docs[:n]]
