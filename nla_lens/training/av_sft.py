"""AV SFT: the base model learns to answer the canonical prompt, vector injected, with the explanation.

The injection is the AV's own `Injection` hook, installed with `backends.hooks(...)` around every
training and eval forward, so the model is trained exactly as `verbalize` serves it (and checked to have run there, as
`verbalize` checks its prefill). With
`activation_checkpointing`, the recompute in backward replays that hook (`training.recompute`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from nla_lens import backends, loading
from nla_lens.distributed import inference
from nla_lens.errors import ConfigError, InjectionError, InputError
from nla_lens.injection import NotingItRan
from nla_lens.parsing import injection_warning_held
from nla_lens.sidecar import InjectionSpec, NLAMeta, check_tokenizer, parse_meta
from nla_lens.training import loop
from nla_lens.training.config import TrainConfig
from nla_lens.training.dataset import (
    AVRows,
    LabelledActivations,
    av_rows,
    check_base_fits,
    check_document_disjoint,
    check_fits,
    data_fingerprint,
    encoded_av_rows,
    turn_end_ids,
)
from nla_lens.training.export import freeze_weights_hf_lacks, model_sidecar
from nla_lens.training.padding import pad
from nla_lens.verbalizer import ActivationVerbalizer, _injection_spec

# The points `response_logits` runs with the hooks on: the embedding and everything inside the blocks
_TRAINABLE_HOOK_POINT = re.compile(r"hook_embed|hook_pos_embed|blocks\.\d+\..+")


def init_av(
    base_model: str | Path,
    dataset: NLAMeta,
    *,
    injection: InjectionSpec | str | None = None,
    hook_point: str | None = None,
    injection_scale: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    train_on: Sequence[LabelledActivations] = (),
) -> ActivationVerbalizer:
    """An untrained AV: the full base model, with the sidecar it will be exported with.

    The injection defaults to what `dataset`'s sidecar implies (Karvonen at the output of decoder
    layer 1 for an `nla_dataset`); embedding replacement needs an `injection_scale`. `train_on`: the labelled rows
    it will train and be evaluated on, checked to fit the base's context (from its config.json) before the weights
    load (`PromptTooLongError` naming them; `train_av` checks them again, after a load).
    """
    backends.require_hooked("training")
    spec = _injection_spec(dataset, injection, hook_point)
    if (spec.method == "embedding") != (injection_scale is not None):
        raise ConfigError("injection_scale is needed by embedding replacement and used by nothing else; "
                          f"got {injection_scale!r} with injection {spec.method!r}")
    folder = loading.resolve_checkpoint(base_model)
    hf_config = loading.load_hf_config(folder)
    check_base_fits(hf_config, dataset, base_model, folder=folder, role="av")
    tokenizer = loading.load_tokenizer(folder)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the base model's tokenizer ({folder}) has no EOS token, one of the ids the AV stops on; "
                          "use the base model's own tokenizer files")
    # Its templates and token facts are the extraction's: errors name the file they came from.
    meta = parse_meta(model_sidecar(dataset, "av", injection=spec, injection_scale=injection_scale),
                      source=f"the AV sidecar made from {dataset.source}")
    check_tokenizer(meta, tokenizer, tokenizer_of="extraction")
    # It stops where every training row ends, and on the EOS too, as HF's generation_config of an instruct model does.
    stop_ids = sorted({turn_end_ids(tokenizer)[-1], tokenizer.eos_token_id})
    loading.check_hook_point(folder, spec.hook_point, backend="hooked")  # a typo here cost a full load
    check_trainable_hook_point(spec.hook_point)
    n_ctx = loading.context_length(hf_config)
    if n_ctx is not None and train_on:
        check_fits(n_ctx, *(encoded_av_rows(data, meta, tokenizer) for data in train_on))
    model = loading.load_hooked_transformer(folder, tokenizer, dtype=dtype, device=device)
    freeze_weights_hf_lacks(model, hf_config)
    return ActivationVerbalizer(model, tokenizer, meta, spec, stop_ids)


def check_trainable_hook_point(hook_point: str) -> None:
    """Refuse an injection point that training's teacher-forced forward (`response_logits`) never runs: it runs the
    embedding and the blocks with the hooks on (`stop_at_layer`), then the final norm and the unembed without them, on
    the scored positions only. `verbalize` serves such a point, but SFT and RL would train on the prompt without the
    vectors: `response_logits` refuses that at the first forward, once the weights have loaded; this, before."""
    if not _TRAINABLE_HOOK_POINT.fullmatch(hook_point):
        raise InjectionError(
            f"hook point {hook_point!r} is outside the embedding and the blocks, the part of AV training's forward "
            "that runs with the hooks on (the final norm and the unembed run after it, without them), so the AV "
            "would learn from its prompt without the vectors; training injects at hook_embed or a point inside the "
            "blocks (blocks.<i>.*, e.g. blocks.1.hook_resid_post): set hook_point to one of those"
        )


def check_stops_at_turn_end(av: ActivationVerbalizer) -> None:
    """Refuse to train an AV whose stop ids lack the token every training row ends with (`turn_end_ids`): it would
    learn to end its turn where generation goes on."""
    end = turn_end_ids(av.tokenizer)[-1]
    if end not in av.eos_token_ids:
        raise ConfigError(f"every AV training row ends the turn with {av.tokenizer.convert_ids_to_tokens(end)!r} (id "
                          f"{end}), as the chat template does, but the AV stops on ids {av.eos_token_ids}, so it would "
                          f"learn to stop where generation goes on; add {end} to eos_token_id in the AV folder's "
                          "generation_config.json")


def response_logits(av: ActivationVerbalizer, prompt: list[int], responses: list[list[int]],
                    vectors: Float[Tensor, "n d_model"]) -> tuple[Float[Tensor, "tokens vocab"],
                                                                  Int[Tensor, " tokens"]]:
    """Logits that predict each response token (prompt + response teacher-forced, injection hook
    installed) and those tokens, concatenated over the rows in order: what SFT and RL score."""
    tokens, mask = pad([prompt + response for response in responses], 0, side="right")
    tokens, mask = tokens.to(av.device), mask.to(av.device)
    # Sites from the prompt columns only (a sampled response may echo the marker and its neighbours); the
    # forward runs the whole sequence, which the hook injects at those same sites.
    injection = av.injection(vectors.to(av.device), tokens[:, :len(prompt)])
    inject = NotingItRan(injection.fwd_hooks())
    # Through the backend's helper: TL 3.x's hooks() took away on exit the hooks a caller had left on the AV
    with backends.hooks(av.model, inject.fwd_hooks):
        resid = av.model(tokens, attention_mask=mask, stop_at_layer=av.model.cfg.n_layers)
    if not inject.ran:
        raise InjectionError(
            f"the injection at {injection.spec.hook_point} never ran in the teacher-forced forward, so the AV would "
            "learn from its prompt without the vectors: that forward runs the blocks alone (the final norm and the "
            "unembed run after it, on the scored positions only), so inject at a point inside them (e.g. "
            "blocks.1.hook_resid_post or hook_embed). A hook of yours that removes hooks mid-forward, or a hook point "
            "replaced on the model without model.setup(), does this too"
        )
    # Position t predicts token t+1: score positions whose next token is a response token.
    scored = mask[:, 1:].bool()
    scored[:, :len(prompt) - 1] = False
    # Final norm + unembed of the scored positions only (TL's own tail of the forward, from the last
    # block on): the logits of prompt and pad positions are never needed.
    logits = av.model(resid[:, :-1][scored][None], start_at_layer=av.model.cfg.n_layers)[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
    return logits, tokens[:, 1:][scored]


def av_loss(av: ActivationVerbalizer, rows: AVRows, index: Int[Tensor, " batch"], *,
            reduction: str = "mean") -> Float[Tensor, ""]:
    """Cross-entropy on the response tokens (explanation + turn end) only, injection hook installed."""
    logits, targets = response_logits(av, rows.prompt.tolist(), [rows.responses[i] for i in index.tolist()],
                                      rows.vectors[index])
    return F.cross_entropy(logits, targets, reduction=reduction)


def evaluate_av(av: ActivationVerbalizer, rows: AVRows, *, batch_size: int, n_samples: int,
                max_new_tokens: int) -> dict:
    """Held-out response loss (per token) and greedy verbalizations of the first `n_samples` rows."""
    with inference(av.model):
        total = sum(float(av_loss(av, rows, index, reduction="sum"))
                    for index in torch.arange(len(rows)).split(batch_size))
    metrics: dict = {"eval_loss": total / sum(map(len, rows.responses))}
    if n_samples:
        with injection_warning_held():  # an untrained AV echoing the marker is expected
            outputs = av.verbalize(rows.vectors[:n_samples], max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=False)
        pairs = list(zip(outputs, rows.explanations, strict=False))
        metrics["sample_exact_match"] = sum(o.explanation == t for o, t in pairs) / len(pairs)
        metrics["samples"] = [{"target": t, "text": o.text} for o, t in pairs]
    return metrics


def train_av(
    av: ActivationVerbalizer,
    train: LabelledActivations,
    evaluation: LabelledActivations,
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    n_samples: int = 4,
    sample_max_new_tokens: int = 64,
    progress: bool = True,
) -> loop.TrainResult:
    """Fine-tune `av.model` in place on `train`; `evaluation` must hold other documents."""
    backends.require_hooked("training", av.model)
    check_document_disjoint(train, evaluation)
    if len(train) == 0:  # else the tokenizer raises a raw IndexError on no explanations
        raise InputError("the training split is empty; pass labelled rows to train on")
    if len(evaluation) == 0:  # else the first evaluation's mean loss divides by zero tokens
        raise InputError("the held-out split is empty, and AV SFT reports a held-out loss; raise eval_fraction "
                         "or pass held-out rows")
    check_stops_at_turn_end(av)
    rows, eval_rows = (av_rows(data, av.meta, av.tokenizer) for data in (train, evaluation))
    check_fits(av.model.cfg.n_ctx, rows, eval_rows)
    return loop.train(
        modules={"model": av.model}, n_rows=len(rows),
        loss_sum=lambda index: av_loss(av, rows, index, reduction="sum"),
        units=lambda index: sum(len(rows.responses[i]) for i in index.tolist()),
        evaluate=lambda: evaluate_av(av, eval_rows, batch_size=config.batch_size, n_samples=n_samples,
                                     max_new_tokens=sample_max_new_tokens),
        config=config, out_dir=out_dir, resume=resume, desc="av sft", progress=progress,
        data=data_fingerprint(av.model, train, evaluation), settings=injection_settings(av),
    )


def injection_settings(av: ActivationVerbalizer) -> dict[str, Any]:
    """The AV's injection, by its config keys: the trajectory depends on it, and the export records it, so a resume
    with another one (a hook_point edited between launches) mixed two runs, or exported the finished weights with a
    site they were not trained at."""
    return {"injection": av.injection_spec.method, "hook_point": av.injection_spec.hook_point,
            "injection_scale": av.meta.injection_scale}
