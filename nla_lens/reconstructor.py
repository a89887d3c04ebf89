"""The activation reconstructor (AR): an explanation in, a vector out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nla_lens import backends, loading
from nla_lens.checks import (
    check_counts,
    check_explanations,
    context_overflow,
    resolve_device,
    resolve_dtype,
    resolve_move,
)
from nla_lens.distributed import inference
from nla_lens.errors import InputError, PromptTooLongError, SidecarError
from nla_lens.sidecar import NLAMeta, ar_prompt_ids, check_role_template, load_meta

if TYPE_CHECKING:
    from nla_lens.backends import TLModel


class ActivationReconstructor:
    """Holds the AR: a truncated TL model (K+1 blocks, no final norm, no unembed, so
    `model(tokens)` returns the residual stream), its `Linear(d, d, bias=False)` readout and meta.
    After each `reconstruct`, `fallback_reason` says why it ran TL's own forward instead of the
    fast path (None: it didn't), e.g. a hook at a point the fast path does not compute.
    """

    def __init__(self, model: TLModel, readout: nn.Linear,
                 tokenizer: PreTrainedTokenizerBase, meta: NLAMeta) -> None:
        if model.cfg.d_model != meta.d_model or readout.in_features != meta.d_model:
            raise SidecarError(
                f"the sidecar says d_model={meta.d_model}, the model has {model.cfg.d_model} and "
                f"the readout {readout.in_features}: the files belong to different checkpoints"
            )
        self.model = model
        self.readout = readout
        self.tokenizer = tokenizer
        self.meta = meta
        self.fallback_reason: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        trust_remote_code: bool = False,
        backend: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> ActivationReconstructor:
        """Load an AR folder (truncated HF backbone + `value_head.safetensors`); reads K+1 blocks.

        `backend` ("hooked" / "bridge") overrides the one the installed TransformerLens implies.
        `dtype` may be a name ("bfloat16"). `tokenizer`: the folder's tokenizer where the caller has loaded it
        already (`loading.load_tokenizer`), checked as one loaded here is and set to pad on the left with a pad
        token, as `load_tokenizer` sets one; it saves loading it again.
        """
        folder = loading.resolve_checkpoint(path_or_id)
        return cls._from_folder(folder, load_meta(folder), device=device, dtype=dtype,
                                trust_remote_code=trust_remote_code, backend=backend, tokenizer=tokenizer,
                                checked_tokenizer=None)

    @classmethod
    def _from_folder(cls, folder: Path, meta: NLAMeta, *, device: str | torch.device, dtype: torch.dtype | str,
                     trust_remote_code: bool = False, backend: str | None = None,
                     tokenizer: PreTrainedTokenizerBase | None = None,
                     checked_tokenizer: PreTrainedTokenizerBase | None = None) -> ActivationReconstructor:
        """`from_pretrained` of a resolved folder and its parsed sidecar. `checked_tokenizer`: the folder's tokenizer
        already checked against this sidecar (`NLA.from_pretrained` checks it for the pair, `round_trip_file` for its
        sample length), not checked again."""
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        if loading.checkpoint_role(folder, meta) == "av":
            raise SidecarError(f"{folder} is an AV checkpoint, not an AR: load it with "
                               "ActivationVerbalizer.from_pretrained")
        check_role_template(meta, "ar", folder)
        tokenizer = (loading.checkpoint_tokenizer(folder, meta, "ar", tokenizer, trust_remote_code=trust_remote_code)
                     if checked_tokenizer is None else checked_tokenizer)
        loading.check_config(folder, meta, tokenizer, trust_remote_code=trust_remote_code)
        # The readout first: one [d, d] matrix, so a missing or damaged one is reported before the backbone is read.
        readout = loading.load_readout(folder, meta.d_model, dtype=dtype, device=device)
        model = backends.load_model(folder, tokenizer, backend=backend, dtype=dtype, device=device,
                                    n_layers=meta.layer + 1, trust_remote_code=trust_remote_code)
        return cls(model, readout, tokenizer, meta)

    @property
    def device(self) -> torch.device:
        """Where the AR's weights are; `reconstruct` returns its vectors there."""
        return self.model.W_E.device

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | str | None = None) -> ActivationReconstructor:
        """Move the AR, its model and its readout, to `device` and / or cast both to `dtype` in place, and return it,
        as torch's `Module.to` does: `ar.to("cuda")`, `ar.to(torch.bfloat16)`. Each is checked as `from_pretrained`
        checks it; a refused move changes nothing (`ar.model.to(...)` moves the model alone). See `NLA.to` for what a
        cast keeps of the load."""
        device, dtype = resolve_move(device, dtype)
        self._check_movable(dtype)
        self._move(device, dtype)
        return self

    def _check_movable(self, dtype: torch.dtype | None) -> None:
        backends.check_movable(self.model, "AR", dtype)
        if any(t.is_meta for t in (*self.readout.parameters(), *self.readout.buffers())):
            raise InputError("the AR's readout (value head) is on the meta device, which holds no values, so there is "
                             "nothing to move: load the AR again")

    def _move(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        backends.move(self.model, device, dtype)
        self.readout.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return (f"ActivationReconstructor(layer={self.meta.layer}, d_model={self.meta.d_model}, "
                f"mse_scale={self.meta.mse_scale:.4g}, stage={self.meta.raw.get('stage')!r}, "
                f"base_model={self.meta.base_model!r}, {self.device}, {self.model.W_E.dtype})")

    def check_reads_samples(self, max_new_tokens: int) -> None:
        """`check_sample_fits` for this AR: it reads the explanation of an AV sample of up to `max_new_tokens`."""
        check_sample_fits(self.meta, self.tokenizer, self.model.cfg.n_ctx, max_new_tokens)

    def prompts_fit(self, explanations: list[str]) -> list[bool]:
        """Whether each explanation's AR prompt fits n_ctx (`reconstruct` refuses a call holding one that does not)."""
        return [len(ar_prompt_ids(self.meta, self.tokenizer, e)) <= self.model.cfg.n_ctx for e in explanations]

    def prompt_tokens(self, explanations: list[str]) -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n pos"]]:
        """Left-padded AR prompts and their attention mask, tokenized as the paper's critic does
        (with special tokens: BOS first on Gemma / Llama, nothing added on Qwen)."""
        check_explanations(explanations)
        ids = [ar_prompt_ids(self.meta, self.tokenizer, e) for e in explanations]
        n_ctx = self.model.cfg.n_ctx
        too_long = [(i, len(row)) for i, row in enumerate(ids) if len(row) > n_ctx]
        if too_long:
            row, length = too_long[0]
            raise PromptTooLongError(
                f"explanation {row} makes an AR prompt of {length} tokens, over n_ctx={n_ctx} "
                f"({len(too_long)} such rows); shorten it rather than let it be truncated"
            )
        width = max(len(row) for row in ids)
        pad = self.tokenizer.pad_token_id
        tokens = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=self.device)
        return tokens, mask

    def reconstruct(self, explanations: list[str], batch_size: int = 64,
                    progress: bool = False) -> Float[Tensor, "n d_model"]:
        """The readout at the last token of each AR prompt: `[n, d_model]` float32 on the AR's device, one row
        per explanation. Only the direction means anything: the AR was trained against targets rescaled to
        `meta.mse_scale` (`metrics.rescale` before comparing with a residual's norm). Raises `InputError`
        (not a non-empty list of strings; a HookedTransformer cast with `.half()` / `.bfloat16()`, whose
        `cfg.dtype` is stale), `PromptTooLongError` (an AR prompt past `n_ctx`) and `BackendError` (a bridge cast to
        float64 after loading)."""
        (batch_size,) = check_counts(1, batch_size=batch_size)
        backends.check_holds_weights(self.model, "AR")
        backends.check_dtype_current(self.model, "AR")
        weight = getattr(self.readout, "weight", None)
        if isinstance(weight, Tensor):
            self._check_readout_device(weight.device)
        tokens, mask = self.prompt_tokens(explanations)
        # A model cast after loading (`ar.model.to(...)`) leaves the readout as loaded: feed it its own float dtype.
        # A readout without float weights (quantized, or a user's module) takes the residual as it is.
        readout_dtype = weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else None
        lengths = mask.sum(dim=1).tolist()  # read once: a read per batch would sync a GPU per batch
        out = []
        with inference(self.model, self.readout):
            forward = backends.ar_forward(self.model)
            self.fallback_reason = forward.fallback_reason
            for start in tqdm(range(0, len(explanations), batch_size), desc="reconstruct",
                              disable=not progress, unit="batch"):
                rows = slice(start, start + batch_size)
                width = max(lengths[rows])  # drop columns that are padding in every row
                resid = forward(tokens[rows, -width:], mask[rows, -width:])
                out.append(self.readout(resid if readout_dtype is None else resid.to(readout_dtype)).float())
        return torch.cat(out)

    def _check_readout_device(self, readout_device: torch.device) -> None:
        """The readout must sit with the model: `ar.model.to(device)` moves the model alone. A readout on another GPU
        failed with a bare RuntimeError, and one on the meta device returned uninitialised memory as the vectors."""
        if readout_device == self.device:
            return
        where = f"the AR's readout (value head) is on {readout_device}"
        if readout_device.type == "meta":  # nothing to move back: torch cannot copy out of meta
            raise InputError(f"{where}, which holds no values, but its model is on {self.device}: load the AR again")
        raise InputError(f"{where}, but its model is on {self.device}: move the AR as one, ar.to(device) "
                         "(ar.model.to(...) moves only the model), or the readout alone, ar.readout.to(ar.device)")


def check_sample_fits(meta: NLAMeta, tokenizer: PreTrainedTokenizerBase, n_ctx: int, max_new_tokens: int) -> None:
    """The AR (its sidecar, tokenizer and `n_ctx`) can read the explanation of an AV sample of up to `max_new_tokens`
    tokens, by RL's rule: the AR prompt of an empty explanation plus the whole sample fits. Checked before
    verbalizing, so that `reconstruct` does not refuse a long explanation once the AV's work is done."""
    problem = context_overflow(max_new_tokens, len(ar_prompt_ids(meta, tokenizer, "")), n_ctx, "AR")
    if problem:
        raise PromptTooLongError(f"{problem}: the AR reads each sample's explanation in its prompt, and one that long "
                                 "would not fit (checked before verbalizing)")
