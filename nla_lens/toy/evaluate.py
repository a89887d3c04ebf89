"""Held-out scores of the bundled toy NLA: round-trip FVE, final-token naming, shuffled control."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nla_lens import backends, loading, metrics
from nla_lens.capture import resid_post
from nla_lens.errors import CheckpointError, InputError
from nla_lens.nla import NLA
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.toy.corpus import Play
from nla_lens.toy.labeler import names_token
from nla_lens.verbalizer import ActivationVerbalizer

HELDOUT_FILE = "heldout.json"
SCORES_FILE = "scores.json"
TOY_PARTS = ("base", "av", "ar", HELDOUT_FILE)  # what `ToyNLA.load` reads: the base, the SFT pair, the positions
PAIRS = ("sft", "rl")  # the SFT pair sits in av/ and ar/, the RL pair in rl/av and rl/ar
MIN_CONTEXT = 8  # the toy AV was trained on positions past this much context
MAX_TOKENS = 64


@dataclass(frozen=True)
class ToyScores:
    n: int
    fve: float  # paper baseline of these held-out vectors
    baseline: float
    names_final_token: float  # fraction of explanations whose first snippet names the true token
    shuffled_fve: float  # explanations paired with the wrong vectors
    failed_parses: int


def require_parts(folder: Path, parts: tuple[str, ...], what: str, fix: str) -> None:
    """A `CheckpointError` naming the `parts` a toy checkpoint folder lacks, before any of it is read."""
    missing = [name for name in parts if not (Path(folder) / name).exists()]
    if missing:
        raise CheckpointError(f"{folder} {what}: it lacks {missing}. {fix}")


def pair_folder(folder: Path, pair: str) -> Path:
    """Where a pair's av/ and ar/ live in a toy checkpoint folder."""
    if pair not in PAIRS:
        raise InputError(f"pair must be one of {PAIRS}, got {pair!r}")
    return folder if pair == "sft" else folder / pair


def best_pair(folder: Path) -> str:
    """The pair the training script found better on the held-out positions (`scores.json`), else SFT."""
    scores = folder / SCORES_FILE
    best = json.loads(scores.read_text()).get("best_pair", "sft") if scores.is_file() else "sft"
    return best if (pair_folder(folder, best) / "av").is_dir() else "sft"


@dataclass(frozen=True)
class ToyNLA:
    """The bundled checkpoints, loaded: the base LM (a TL model of the default backend), the AV and the AR
    (`.nla` pairs them)."""

    base: object
    av: ActivationVerbalizer
    ar: ActivationReconstructor

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", pair: str = "sft") -> ToyNLA:
        """`pair`: "sft" (av/, ar/) or "rl" (rl/av, rl/ar); `best_pair(folder)` names the better one."""
        require_parts(folder, TOY_PARTS, "is not a toy NLA folder", "Pass a folder with base/, av/, ar/ and "
                      "heldout.json (as nla_lens.toy.train writes), or leave it out to use the bundled one")
        tokenizer = loading.load_tokenizer(folder / "base")
        base = backends.load_model(folder / "base", tokenizer, dtype=torch.float32, device=device)
        pair_dir = pair_folder(folder, pair)
        return cls(base, ActivationVerbalizer.from_pretrained(pair_dir / "av", device=device),
                   ActivationReconstructor.from_pretrained(pair_dir / "ar", device=device))

    @property
    def nla(self) -> NLA:
        return NLA(self.av, self.ar)

    @torch.inference_mode()
    def activations(self, ids: list[int]) -> Float[Tensor, "pos d_model"]:
        """`blocks.K.hook_resid_post` at every position of one tokenized text."""
        return resid_post(self.base, torch.tensor([ids]), self.av.meta.layer)[0].float()


def heldout_documents(plays: list[Play], path: Path, per_play: int = 150) -> Path:
    """Speeches of the held-out plays that are long enough to explain, stored beside the checkpoints."""
    docs = []
    for play in plays:
        lines = [line for line in play.text.splitlines() if len(line) > 80]
        docs += [{"id": f"{play.title}/{i}", "text": line} for i, line in enumerate(lines[:per_play])]
    path.write_text(json.dumps(docs, indent=0, ensure_ascii=False))
    return path


def heldout_positions(toy: ToyNLA, folder: Path, per_doc: int = 2,
                      limit: int = 256) -> tuple[Float[Tensor, "n d_model"], Int[Tensor, " n"]]:
    """Vectors and their token ids at fixed positions (every 7th past the context) of held-out speeches."""
    docs = json.loads((folder / HELDOUT_FILE).read_text())
    vectors, tokens = [], []
    for doc in docs:
        ids = toy.av.tokenizer.encode(doc["text"], add_special_tokens=False)[:MAX_TOKENS]
        positions = list(range(MIN_CONTEXT, len(ids), 7))[:per_doc]
        if positions:
            vectors.append(toy.activations(ids)[positions])
            tokens += [ids[p] for p in positions]
        if len(tokens) >= limit:
            break
    return torch.cat(vectors)[:limit], torch.tensor(tokens[:limit])


def evaluate_toy(folder: Path, limit: int = 256, pair: str = "sft") -> ToyScores:
    """Round trip of the held-out positions with one pair of the toy folder."""
    toy = ToyNLA.load(folder, pair=pair)
    vectors, tokens = heldout_positions(toy, folder, limit=limit)
    # The paper baseline of these held-out vectors, not the sidecar's (of the training run's eval split).
    baseline = metrics.paper_baseline(vectors, toy.ar.meta.mse_scale)
    round_trip = toy.nla.round_trip(vectors, baseline=baseline, max_new_tokens=48, batch_size=64)
    named = [names_token(v.explanation, toy.av.tokenizer, int(t))
             for v, t in zip(round_trip.verbalizations, tokens, strict=True)]
    return ToyScores(
        n=len(vectors), fve=round_trip.fve, baseline=round_trip.baseline,
        names_final_token=sum(named) / len(named), shuffled_fve=shuffled_fve(round_trip.reconstructions, vectors,
                                                                              toy.ar.meta.mse_scale,
                                                                              round_trip.baseline),
        failed_parses=round_trip.n_failed_parses)


def shuffled_fve(reconstructions: Float[Tensor, "n d_model"], vectors: Float[Tensor, "n d_model"],
                 mse_scale: float, baseline: float) -> float:
    """FVE when each explanation's reconstruction is scored against another row's vector (a roll by one);
    failed parses count as misses, as in the round trip."""
    rolled = reconstructions.roll(1, dims=0)
    ok = ~torch.isnan(rolled).any(dim=1)
    mse = torch.full((len(vectors),), metrics.miss_mse(vectors.shape[1], mse_scale))
    mse[ok] = metrics.mse_per_item(rolled[ok], vectors[ok], mse_scale)
    return metrics.fve(mse, baseline)
