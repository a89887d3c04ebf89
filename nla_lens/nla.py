"""An AV and an AR trained as one NLA, and the round trip v -> text -> v_hat."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from nla_lens import metrics
from nla_lens.checks import check_at_least_one
from nla_lens.errors import InputError, PairMismatchError
from nla_lens.injection import check_vectors
from nla_lens.parsing import injection_warning
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.sidecar import NLAMeta
from nla_lens.verbalizer import ActivationVerbalizer, Verbalization


def check_pair(av_meta: NLAMeta, ar_meta: NLAMeta) -> None:
    """An AV and an AR form one NLA only if they share d_model and layer (readable before loading weights)."""
    for name in ("d_model", "layer"):
        if getattr(av_meta, name) != getattr(ar_meta, name):
            raise PairMismatchError(
                f"AV and AR disagree on {name} ({getattr(av_meta, name)} vs "
                f"{getattr(ar_meta, name)}): load the AR trained with this AV"
            )


def fve_baseline(vectors: Float[Tensor, "n d_model"], mse_scale: float,
                 baseline: float | None = None) -> tuple[float, str]:
    """The FVE baseline and where it came from: `baseline` if given, else the paper's of `vectors`."""
    source = "given"
    if baseline is None:
        baseline, source = metrics.paper_baseline(vectors, mse_scale), "paper (these vectors)"
    if not baseline > 0:
        raise InputError(
            f"the FVE baseline is {baseline:g}: with a single vector (or only parallel ones) the paper "
            "baseline is zero. Pass baseline= computed on a larger held-out set (metrics.paper_baseline)."
        )
    return baseline, source


@dataclass(frozen=True)
class RoundTrip:
    """Scores of one round trip. A failed parse scores as a miss (an orthogonal guess)."""

    verbalizations: list[Verbalization]
    reconstructions: Float[Tensor, "n d_model"]  # NaN rows where the explanation failed to parse
    mse: Float[Tensor, " n"]
    mean_mse: float
    fve: float
    baseline: float
    baseline_source: str  # "paper (these vectors)" or "given"
    n_failed_parses: int
    warnings: list[str] = field(default_factory=list)

    @property
    def explanations(self) -> list[str | None]:
        return [v.explanation for v in self.verbalizations]


class NLA:
    """The AV/AR pair; checks at construction that they share d_model and layer."""

    def __init__(self, av: ActivationVerbalizer, ar: ActivationReconstructor) -> None:
        check_pair(av.meta, ar.meta)
        self.av = av
        self.ar = ar

    @property
    def mse_scale(self) -> float:
        return self.ar.meta.mse_scale

    def round_trip(self, vectors: Float[Tensor, "n d_model"], *, baseline: float | None = None,
                   reconstruct_batch_size: int = 64, **verbalize_kwargs: Any) -> RoundTrip:
        """Verbalize, reconstruct and score `vectors`.

        `baseline` defaults to the paper's baseline of these vectors; pass a held-out set's
        baseline when scoring a few vectors (the released Qwen3-8B L24 pair: about 0.56).
        """
        check_at_least_one(reconstruct_batch_size=reconstruct_batch_size)
        vectors = check_vectors(vectors, self.av.meta.d_model).float()
        baseline, source = fve_baseline(vectors, self.mse_scale, baseline)  # before the expensive part
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported once on the result instead
            verbalizations = self.av.verbalize(vectors, **verbalize_kwargs)
        reconstructions, mse = self.score(vectors, verbalizations, reconstruct_batch_size=reconstruct_batch_size)
        notes = [w for w in [injection_warning([v.text for v in verbalizations],
                                               self.av.meta.injection_char)] if w]
        n_failed = sum(v.explanation is None for v in verbalizations)
        return RoundTrip(verbalizations, reconstructions, mse, float(mse.mean()),
                         metrics.fve(mse, baseline), baseline, source, n_failed, notes)

    def score(self, vectors: Float[Tensor, "n d_model"], verbalizations: list[Verbalization], *,
              reconstruct_batch_size: int = 64) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, " n"]]:
        """Reconstruct each parsed explanation and score it against its vector.

        Returns the reconstructions (NaN rows for failed parses) and the per-row MSE, where a failed
        parse scores `metrics.miss_mse`. The one scoring rule of `round_trip` and of sharded jobs.
        """
        vectors = vectors.float()
        scale = self.mse_scale
        parsed = [i for i, v in enumerate(verbalizations) if v.explanation is not None]
        reconstructions = torch.full_like(vectors, float("nan"))
        mse = torch.full((len(vectors),), metrics.miss_mse(self.av.meta.d_model, scale))
        if parsed:
            texts = [verbalizations[i].explanation for i in parsed]
            predicted = self.ar.reconstruct(texts, batch_size=reconstruct_batch_size).to(vectors.device)
            reconstructions[parsed] = predicted
            mse[parsed] = metrics.mse_per_item(predicted, vectors[parsed], scale).cpu()
        return reconstructions, mse
