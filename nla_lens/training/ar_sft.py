"""AR SFT: the base's first K+1 blocks plus an identity-initialised readout learn explanation -> vector.

The loss is the paper's MSE on vectors rescaled to `mse_scale`; the held-out score is FVE against
the paper baseline of the held-out targets (from at least `MIN_BASELINE_VECTORS` of them). Training
batches are built like `ActivationReconstructor.prompt_tokens` (left padding, readout at the last token), and evaluation
calls `reconstruct` itself, so the AR is scored exactly as it will be served.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from nla_lens import backends, loading, metrics
from nla_lens.checks import counted, warn_at_caller
from nla_lens.errors import InputError
from nla_lens.nla import MIN_BASELINE_VECTORS, resolve_baseline
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.sidecar import NLAMeta, check_tokenizer, parse_meta
from nla_lens.training import loop
from nla_lens.training.config import TrainConfig
from nla_lens.training.dataset import (
    ARRows,
    LabelledActivations,
    ar_rows,
    check_base_fits,
    check_document_disjoint,
    check_fits,
    data_fingerprint,
    encoded_ar_rows,
)
from nla_lens.training.export import freeze_weights_hf_lacks, model_sidecar
from nla_lens.training.padding import pad


def init_ar(base_model: str | Path, dataset: NLAMeta, *, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32,
            train_on: Sequence[LabelledActivations] = ()) -> ActivationReconstructor:
    """An untrained AR: the base's first K+1 blocks (no final norm, no unembed), readout = identity.

    `train_on`: the labelled rows it will train and be evaluated on, checked to fit the base's context (from its
    config.json) before the weights load (`PromptTooLongError` naming them; `train_ar` checks them again)."""
    backends.require_hooked("training")
    folder = loading.resolve_checkpoint(base_model)
    hf_config = loading.load_hf_config(folder)
    check_base_fits(hf_config, dataset, base_model, folder=folder, role="ar")
    tokenizer = loading.load_tokenizer(folder)
    meta = parse_meta(model_sidecar(dataset, "ar"), source=f"the AR sidecar made from {dataset.source}")
    check_tokenizer(meta, tokenizer, role="ar", tokenizer_of="extraction")
    n_ctx = loading.context_length(hf_config)
    if n_ctx is not None and train_on:
        check_fits(n_ctx, *(encoded_ar_rows(data, meta, tokenizer) for data in train_on))
    model = loading.load_hooked_transformer(folder, tokenizer, dtype=dtype, device=device, n_layers=meta.layer + 1)
    freeze_weights_hf_lacks(model, hf_config)
    readout = nn.Linear(meta.d_model, meta.d_model, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        readout.weight.copy_(torch.eye(meta.d_model))
    return ActivationReconstructor(model, readout, tokenizer, meta)


def ar_loss(ar: ActivationReconstructor, rows: ARRows, index: Int[Tensor, " batch"], *,
            reduction: str = "mean") -> Float[Tensor, ""]:
    """MSE of the rescaled readout at the last prompt token against the rescaled targets (mean or sum)."""
    tokens, mask = pad([rows.prompts[i] for i in index.tolist()], 0, side="left")
    resid = ar.model(tokens.to(ar.device), attention_mask=mask.to(ar.device))
    predicted = ar.readout(resid[:, -1])
    mse = metrics.mse_per_item(predicted, rows.vectors[index].to(ar.device), ar.meta.mse_scale)
    return mse.sum() if reduction == "sum" else mse.mean()


def evaluate_ar(ar: ActivationReconstructor, rows: ARRows, *, batch_size: int) -> dict:
    """Held-out MSE, and FVE against the paper baseline of the held-out targets; no FVE (None) from fewer than
    `MIN_BASELINE_VECTORS` of them, whose baseline is too noisy to divide by (README "Scores")."""
    predicted = ar.reconstruct(rows.explanations, batch_size=batch_size)
    targets = rows.vectors.to(predicted.device)
    mse = metrics.mse_per_item(predicted, targets, ar.meta.mse_scale)
    baseline = resolve_baseline(targets, ar.meta.mse_scale).value
    return {"eval_mse": float(mse.mean()), "fve": None if baseline is None else metrics.fve(mse, baseline),
            "baseline": baseline, "baseline_source": "none" if baseline is None else "paper (held-out targets)"}


def train_ar(
    ar: ActivationReconstructor,
    train: LabelledActivations,
    evaluation: LabelledActivations,
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
) -> loop.TrainResult:
    """Fine-tune `ar.model` and `ar.readout` in place on `train`; `evaluation` must hold other documents."""
    backends.require_hooked("training", ar.model)
    check_document_disjoint(train, evaluation)
    if len(train) == 0:  # else a raw ValueError from the row-length check
        raise InputError("the training split is empty; pass labelled rows to train on")
    if len(evaluation) == 0:
        raise InputError("the held-out split is empty, so the AR cannot be scored; raise eval_fraction or extract "
                         "more documents")
    if len(evaluation) < MIN_BASELINE_VECTORS:
        warn_at_caller(f"AR SFT reports the held-out MSE but no FVE: a baseline from "
                       f"{counted(len(evaluation), 'held-out vector')} is not trustworthy (need >= "
                       f"{MIN_BASELINE_VECTORS}); raise eval_fraction or extract more documents for an FVE")
    rows, eval_rows = (ar_rows(data, ar.meta, ar.tokenizer) for data in (train, evaluation))
    check_fits(ar.model.cfg.n_ctx, rows, eval_rows)
    return loop.train(
        modules={"model": ar.model, "readout": ar.readout}, n_rows=len(rows),
        loss_sum=lambda index: ar_loss(ar, rows, index, reduction="sum"),
        units=len,
        evaluate=lambda: evaluate_ar(ar, eval_rows, batch_size=config.batch_size),
        config=config, out_dir=out_dir, resume=resume, desc="ar sft", progress=progress,
        data=data_fingerprint(ar.model, ar.readout, train, evaluation),
    )
