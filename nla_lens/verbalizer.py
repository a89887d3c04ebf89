"""The activation verbalizer (AV): a vector in, an explanation out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsIndex, cast, overload

import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nla_lens import backends, loading
from nla_lens.checks import (
    check_draws_of,
    check_sampling,
    counted,
    is_count,
    resolve_device,
    resolve_dtype,
    resolve_move,
    warn_at_caller,
)
from nla_lens.distributed import inference
from nla_lens.errors import InjectionError, InputError, PromptTooLongError, SidecarError
from nla_lens.injection import BLOCK_0_INPUT, Injection, NotingItRan, check_vectors, is_injection_hook
from nla_lens.markers import find_marker_sites
from nla_lens.parsing import failed_parse_note, injection_warning, parse_explanation
from nla_lens.results import TabularResult
from nla_lens.sidecar import (
    DEFAULT_HOOK_POINT,
    InjectionSpec,
    NLAMeta,
    av_prompt_ids,
    check_role_template,
    load_meta,
)

if TYPE_CHECKING:
    from nla_lens.backends import TLModel

MAX_NEW_TOKENS = 150  # verbalize's default, shared by the callers that run it for you (steer words, sharded)

# Decode steps between checks that every row has emitted EOS: reading the flag waits for the
# accelerator, which then idles while the host queues the next step. Free on the CPU.
_STOP_CHECK_EVERY = {"cpu": 1}
_STOP_CHECK_EVERY_DEFAULT = 8


@dataclass(frozen=True)
class Verbalization:
    """One AV output: the raw completion, the parsed explanation (None if untagged), the ids.

    Attributes:
        text: the completion, decoded without special tokens (no EOS).
        explanation: the text between the explanation tags, stripped; None when the completion has no such pair.
        tokens: the generated ids, up to and including the first EOS.
        truncated: cut at `max_new_tokens` before any EOS: the explanation may be unfinished, or untagged for
            that reason. Read off `tokens`, as `verbalize` ends rows.
        index: the row of `verbalize`'s vectors it explains, kept through slices and concatenation (None: built
            by hand). Not compared: the same completion of another row (or another call) is an equal output.
    """

    text: str
    explanation: str | None
    tokens: list[int]
    truncated: bool = field(default=False, compare=False)
    index: int | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        said = repr(self.explanation) if self.explanation is not None else f"None, text={self.text!r}"
        return f"Verbalization({said}, {len(self.tokens)} tokens{', truncated' if self.truncated else ''})"


class Verbalizations(TabularResult, list):
    """What `verbalize` returns: a list of `Verbalization`s (a slice, `+` on either side, `*` and `copy()` are one too)
    that also prints short, shows as a table in a notebook, and has `to_pandas()` / `save()` (one row per vector). A
    row's `index` is the row of the vectors it explains (its position here for rows built by hand), so `out[10:]`
    starts at 10. `warnings` holds what `verbalize` warned of (a failed injection), kept so the repr, the view and a
    saved `.parquet` still say it; slices, copies and concatenations (`+=` and `extend` too) keep it."""

    warnings_at = "warnings"

    def __init__(self, verbalizations: Iterable[Verbalization] = (), *, warnings: Iterable[str] = ()) -> None:
        super().__init__(verbalizations)
        self.warnings: list[str] = list(warnings)

    def to_records(self) -> list[dict[str, Any]]:
        return [{"index": i if v.index is None else v.index, "explanation": v.explanation,
                 "parsed": v.explanation is not None, "text": v.text, "n_tokens": len(v.tokens),
                 "truncated": v.truncated}
                for i, v in enumerate(self)]

    def summary(self) -> str:
        failed = sum(v.explanation is None for v in self)
        return f"{counted(len(self), 'verbalization')}, {failed} failed to parse{failed_parse_note(self)}"

    display_columns = ("index", "explanation", "parsed")
    schema = pa.schema({"index": pa.int64(), "explanation": pa.string(), "parsed": pa.bool_(), "text": pa.string(),
                        "n_tokens": pa.int64(), "truncated": pa.bool_()})
    # `nla-lens verbalize --text --output` names the text, position and token each row explains, as `explain`'s rows
    # do, after the index
    context_schema = pa.schema({"input_text": pa.string(), "position": pa.int64(), "token": pa.string()})

    @overload
    def __getitem__(self, index: SupportsIndex) -> Verbalization: ...

    @overload
    def __getitem__(self, index: slice) -> Verbalizations: ...

    def __getitem__(self, index: SupportsIndex | slice) -> Verbalization | Verbalizations:
        """A slice stays a `Verbalizations` (list's own is a plain list), keeping the repr, `to_pandas()`, `save()`."""
        if isinstance(index, slice):
            return Verbalizations(super().__getitem__(index), warnings=self.warnings)
        return super().__getitem__(index)

    def __add__(self, other: list[Verbalization]) -> Verbalizations:  # type: ignore[override]
        return Verbalizations(super().__add__(other), warnings=_joined_warnings(self, other))

    def __radd__(self, other: list[Verbalization]) -> Verbalizations:
        """`[v0] + out` is one too: Python asks a list subclass's `__radd__` before list's own `+` (a plain list)."""
        if not isinstance(other, list):
            return NotImplemented
        return Verbalizations([*other, *self], warnings=_joined_warnings(other, self))

    def __iadd__(self, other: Iterable[Verbalization]) -> Verbalizations:  # type: ignore[override, misc]
        self.warnings = _joined_warnings(self, other)
        return super().__iadd__(other)

    def extend(self, other: Iterable[Verbalization]) -> None:
        """As `list.extend`, keeping the warnings of both."""
        self.warnings = _joined_warnings(self, other)
        super().extend(other)

    def __mul__(self, times: SupportsIndex) -> Verbalizations:
        return Verbalizations(super().__mul__(times), warnings=self.warnings)

    __rmul__ = __mul__

    def copy(self) -> Verbalizations:
        """As `list.copy`, with the warnings."""
        return Verbalizations(self, warnings=self.warnings)


def _joined_warnings(*parts: Iterable[Verbalization]) -> list[str]:
    """The warnings of each part that holds any, each once, in order."""
    return list(dict.fromkeys(w for part in parts for w in getattr(part, "warnings", ())))


class ActivationVerbalizer:
    """Holds the AV as a TL model (`.model`: `HookedTransformer` or `TransformerBridge`, see
    `nla_lens.backends`), its tokenizer and its `NLAMeta`.

    The injection is an ordinary TL hook (`self.injection(...)`), so it composes with any other
    hooks; `verbalize` adds it for the prefill only and leaves hooks the caller installed with
    `self.model.hooks(...)` in force for every step. After each batch, `fallback_reason` says why
    it ran TL's forward at every step instead of the fast decoder (None: it didn't).
    """

    def __init__(self, model: TLModel, tokenizer: PreTrainedTokenizerBase, meta: NLAMeta,
                 injection_spec: InjectionSpec, eos_token_ids: list[int]) -> None:
        if meta.d_model != model.cfg.d_model:
            raise SidecarError(
                f"the sidecar says d_model={meta.d_model} but the model has {model.cfg.d_model}: "
                "the sidecar belongs to another checkpoint"
            )
        if injection_spec.hook_point not in model.hook_dict:
            raise InjectionError(
                f"hook point {injection_spec.hook_point!r} does not exist in this model; pick one of "
                "model.hook_dict, e.g. 'blocks.1.hook_resid_post' or 'hook_embed'"
            )
        backends.check_patchable(model, injection_spec.hook_point)  # the bridge's resid_mid takes no writes
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.injection_spec = injection_spec
        self.eos_token_ids = eos_token_ids
        self._prompt = torch.tensor(av_prompt_ids(meta, tokenizer))
        self.fallback_reason: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        injection: InjectionSpec | str | None = None,
        hook_point: str | None = None,
        trust_remote_code: bool = False,
        backend: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> ActivationVerbalizer:
        """Load an AV checkpoint folder (or a cached hub id) and validate it before reading weights.

        `injection` ("karvonen" / "embedding" / an InjectionSpec) and `hook_point` override what the
        sidecar implies; by default the checkpoint is served exactly as it was trained. `backend`
        ("hooked" / "bridge") overrides the one the installed TransformerLens implies. `dtype` may
        be a name ("bfloat16"). `tokenizer`: the folder's tokenizer where the caller has loaded it already
        (`loading.load_tokenizer`), checked as one loaded here is and set to pad on the left with a pad token, as
        `load_tokenizer` sets one; it saves loading it again (about 1 s on Qwen's).
        """
        folder = loading.resolve_checkpoint(path_or_id)
        return cls._from_folder(folder, load_meta(folder), device=device, dtype=dtype, injection=injection,
                                hook_point=hook_point, trust_remote_code=trust_remote_code, backend=backend,
                                tokenizer=tokenizer, checked_tokenizer=None)

    @classmethod
    def _from_folder(cls, folder: Path, meta: NLAMeta, *, device: str | torch.device, dtype: torch.dtype | str,
                     injection: InjectionSpec | str | None = None, hook_point: str | None = None,
                     trust_remote_code: bool = False, backend: str | None = None,
                     tokenizer: PreTrainedTokenizerBase | None = None,
                     checked_tokenizer: PreTrainedTokenizerBase | None = None) -> ActivationVerbalizer:
        """`from_pretrained` of a resolved folder and its parsed sidecar. `checked_tokenizer`: the folder's tokenizer
        already checked against this sidecar (`NLA.from_pretrained` checks it for the pair, `nla-lens verbalize --text`
        for the base), not checked again."""
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        if loading.checkpoint_role(folder, meta) == "ar":
            raise SidecarError(f"{folder} is an AR checkpoint, not an AV: load it with "
                               "ActivationReconstructor.from_pretrained")
        check_role_template(meta, "av", folder)  # the AV's prompt is built from it: refuse before reading weights
        spec = _injection_spec(meta, injection, hook_point)
        if spec.method == "embedding" and meta.injection_scale is None:  # every injection would fail: say so now
            raise InjectionError(
                f"embedding replacement needs an injection_scale, and {folder}/nla_meta.yaml has none "
                "(extraction.injection_scale). Pass injection='karvonen' if this checkpoint was trained with the "
                "additive injection, or add the injection_scale it was trained with to the sidecar"
            )
        tokenizer = (loading.checkpoint_tokenizer(folder, meta, "av", tokenizer, trust_remote_code=trust_remote_code)
                     if checked_tokenizer is None else checked_tokenizer)
        loading.check_config(folder, meta, tokenizer, trust_remote_code=trust_remote_code)
        loading.check_hook_point(folder, spec.hook_point, backend=backends.resolve_name(backend),
                                 trust_remote_code=trust_remote_code)
        eos = loading.eos_token_ids(folder, tokenizer)  # before TransformerLens gives the tokenizer a stand-in EOS
        model = backends.load_model(folder, tokenizer, backend=backend, dtype=dtype, device=device,
                                    trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, meta, spec, eos)

    @property
    def device(self) -> torch.device:
        """Where the AV's weights are: `verbalize` moves the vectors there."""
        return self.model.W_E.device

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | str | None = None) -> ActivationVerbalizer:
        """Move the AV to `device` and / or cast it to `dtype` in place, and return it, as torch's `Module.to` does:
        `av.to("cuda")`, `av.to(torch.bfloat16)`, `av.to("cuda", "bf16")`. Each is checked as `from_pretrained` checks
        it; a refused move changes nothing. See `NLA.to` for what a cast keeps of the load."""
        device, dtype = resolve_move(device, dtype)
        self._check_movable(dtype)
        self._move(device, dtype)
        return self

    def _check_movable(self, dtype: torch.dtype | None) -> None:
        backends.check_movable(self.model, "AV", dtype)

    def _move(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """The model is all it holds on a device: `prompt_tokens` moves the prompt to `device` at each call."""
        backends.move(self.model, device, dtype)

    def __repr__(self) -> str:
        spec = self.injection_spec
        return (f"ActivationVerbalizer(layer={self.meta.layer}, d_model={self.meta.d_model}, injection={spec.method} "
                f"at {spec.hook_point}, stage={self.meta.raw.get('stage')!r}, base_model={self.meta.base_model!r}, "
                f"{self.device}, {self.model.W_E.dtype})")

    def prompt_tokens(self, n: int) -> Int[Tensor, "n pos"]:
        """`n` copies of the canonical AV prompt, each holding one marker site."""
        if isinstance(n, Tensor) and n.ndim:  # the vectors themselves, a plausible slip: their repr fills a message
            raise InputError(f"prompt_tokens(n) takes the number of prompts, got a tensor of shape {list(n.shape)}: "
                             "pass len(vectors)")
        if not is_count(n, 1):  # expand(-1) gave one copy
            raise InputError(f"n={n!r}: prompt_tokens(n) needs a whole number >= 1 of prompts")
        return self._prompt.to(self.device).expand(int(n), -1).clone()

    def injection(self, vectors: Float[Tensor, "n d_model"],
                  tokens: Int[Tensor, "n pos"] | None = None) -> Injection:
        """Bind `vectors` to the marker sites of `tokens` (default: the canonical prompts): vector i goes to the
        i-th neighbour-anchored site in row-major order. A site count other than the number of vectors is a
        `MarkerError`."""
        vectors = check_vectors(vectors, self.meta.d_model)
        backends.check_holds_weights(self.model, "AV")
        setter = backends.switch_needed(self.model, self.injection_spec.hook_point)
        if setter is not None:
            raise InjectionError(f"{self.injection_spec.hook_point} would not fire, so the vectors would never reach "
                                 f"the AV: TransformerLens computes it only when asked. Call av.model.{setter}(True) "
                                 "first, or inject where TL always computes (e.g. blocks.1.hook_resid_post or "
                                 "hook_embed)")
        if tokens is None:
            tokens = self.prompt_tokens(vectors.shape[0])
        rows, positions = find_marker_sites(
            tokens, self.meta.injection_token_id, self.meta.injection_left_neighbor_id,
            self.meta.injection_right_neighbor_id, expected=vectors.shape[0],
        )
        rotary = getattr(self.model.cfg, "positional_embedding_type", None) == "rotary"
        return Injection(self.injection_spec, vectors.to(self.device), rows, positions,
                         (tokens.shape[0], tokens.shape[1]), self.meta.injection_scale,
                         embed_is_block_input=rotary and BLOCK_0_INPUT in self.model.hook_dict)

    def verbalize(
        self,
        vectors: Float[Tensor, "n d_model"],
        *,
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 32,
        seed: int | None = None,
        progress: bool = False,
        draws_of: Sequence[int] | Tensor | None = None,
    ) -> Verbalizations:
        """Explain each vector: one `Verbalization` per row of `vectors`, in order.

        `vectors` is `[n, d_model]` (or one `[d_model]` vector) of any float dtype and device: base-model
        residuals at `blocks.K.hook_resid_post` (K = `meta.layer`), or any direction, since only the direction
        reaches the AV. `max_new_tokens` caps each completion, EOS included. Temperature 0 is greedy; a seed
        makes sampling reproducible for the same vectors, `batch_size` and device (a batch's rows draw from one
        generator in turn, so a row sampled alone or in another batch gets other draws). `draws_of` gives rows common
        random numbers, for comparing readouts of paired vectors (clean and steered): row i samples with row
        `draws_of[i]`'s numbers, one uniform per step read through the inverse CDF of its distribution over token ids,
        so rows that share them write the same sample from equal vectors and mostly the same tokens from similar
        ones, where their own draws would part them by sampling noise alone. Its numbers come from one table drawn
        per call (seeded by `seed`, else torch's global generator), so they do not depend on `batch_size`; greedy
        decoding draws none. `progress` shows a bar
        over batches (off by default; the CLI turns it on). Raises `VectorError` (wrong shape, NaN / Inf, a zero
        row), `PromptTooLongError` (the AV prompt plus `max_new_tokens` past `n_ctx`), `InputError` (a sampling
        setting out of range; a HookedTransformer cast with `.half()` / `.bfloat16()`, whose `cfg.dtype` is stale)
        and `BackendError` (a bridge cast to float64 after loading)."""
        max_new_tokens, batch_size = check_sampling(temperature, top_p, max_new_tokens, batch_size, seed)
        self._check_fits(max_new_tokens)
        backends.check_holds_weights(self.model, "AV")
        backends.check_dtype_current(self.model, "AV")
        _check_no_injection_attached(self.model)
        vectors = check_vectors(vectors, self.meta.d_model)
        draws = None if draws_of is None else check_draws_of(draws_of, vectors.shape[0])
        uniforms = None if draws is None or temperature == 0 else _common_uniforms(draws, max_new_tokens, seed)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))  # numpy's too
        results = Verbalizations()
        eos = set(self.eos_token_ids)  # `_generate` ends a row at its first EOS, or at max_new_tokens
        starts = range(0, vectors.shape[0], batch_size)
        with inference(self.model):
            for start in tqdm(starts, desc="verbalize", disable=not progress, unit="batch"):
                batch_uniforms = None if uniforms is None else uniforms[start:start + batch_size]
                for ids in self._generate(vectors[start:start + batch_size], max_new_tokens, temperature, top_p,
                                          generator, batch_uniforms):
                    text = cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))
                    results.append(Verbalization(text, parse_explanation(text), ids, truncated=ids[-1] not in eos,
                                                 index=len(results)))
        warning = injection_warning([r.text for r in results], self.meta.injection_char)
        if warning:
            warn_at_caller(warning)  # the user's line, also when a helper (steer_then_verbalize, ...) called this
            results.warnings.append(warning)
        return results

    def _check_fits(self, max_new_tokens: int) -> None:
        """The last sampled token is never fed back, so the model sees prompt + max_new_tokens - 1 positions."""
        prompt, n_ctx = self._prompt.shape[-1], self.model.cfg.n_ctx
        if prompt + max_new_tokens - 1 > n_ctx:
            raise PromptTooLongError(
                f"max_new_tokens={max_new_tokens} after the {prompt}-token AV prompt runs past n_ctx={n_ctx}; "
                f"use max_new_tokens <= {n_ctx - prompt + 1}"
            )

    def _generate(self, vectors: Float[Tensor, "n d_model"], max_new_tokens: int, temperature: float,
                  top_p: float, generator: torch.Generator | None,
                  uniforms: Float[Tensor, "n max_new_tokens"] | None = None) -> list[list[int]]:
        """KV-cached decoding; the injection hook is installed for the prefill forward only. `uniforms`: each row's
        draw per step for `_sample_inverse_cdf` (None: `_sample`'s multinomial with `generator`)."""
        n = vectors.shape[0]
        tokens = self.prompt_tokens(n)
        # The last token is never fed back: the cache holds prompt + max_new_tokens - 1 positions, so the
        # longest generation `_check_fits` allows still fits the fast decoders' rotary tables (n_ctx).
        decoder, logits = injected_prefill(self.model, tokens, self.injection(vectors, tokens),
                                           tokens.shape[1] + max_new_tokens - 1)
        self.fallback_reason = decoder.fallback_reason
        eos = torch.tensor(self.eos_token_ids, device=self.device, dtype=torch.long)
        finished = torch.zeros(n, dtype=torch.bool, device=self.device)
        generated = torch.empty(n, max_new_tokens, dtype=torch.long, device=self.device)
        check_every = _STOP_CHECK_EVERY.get(self.device.type, _STOP_CHECK_EVERY_DEFAULT)
        if uniforms is not None:
            uniforms = uniforms.to(self.device)
        for step in range(max_new_tokens):
            next_ids = (_sample(logits, temperature, top_p, generator) if uniforms is None
                        else _sample_inverse_cdf(logits, temperature, top_p, uniforms[:, step]))
            generated[:, step] = next_ids
            finished |= torch.isin(next_ids, eos)
            if step == max_new_tokens - 1 or (step % check_every == 0 and bool(finished.all())):
                break
            logits = decoder.step(next_ids)
        rows = generated[:, :step + 1].tolist()
        eos_ids = set(self.eos_token_ids)
        return [row[:next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))] for row in rows]


def injected_prefill(model: TLModel, tokens: Int[Tensor, "n pos"], injection: Injection,
                     max_len: int) -> tuple[backends.Decoder, Float[Tensor, "n d_vocab"]]:
    """A decoder for `tokens` (and what follows, up to `max_len` positions) and its prefill's last logits, the
    injection installed for the prefill only: what `verbalize` and RL's sampling decode from. An `InjectionError`
    where the injection never ran there: every row would explain the bare prompt."""
    inject = NotingItRan(injection.site_hooks())
    decoder = backends.decoder(model, tokens.shape[0], max_len, inject.fwd_hooks)
    logits = decoder.prefill(tokens, inject.fwd_hooks)
    if not inject.ran:
        point = injection.spec.hook_point
        raise InjectionError(
            f"the injection at {point} never ran in the prefill, so the AV read its prompt without the vectors: a "
            "hook removed it before that point fired (model.reset_hooks() or remove_hooks() called from inside a hook "
            "of yours? Remove hooks after the call returns, not from inside one of its forward passes), or the name "
            f"{point} leads to a HookPoint the forward does not pass through (a hook point replaced on the model "
            "without model.setup()?)"
        )
    return decoder, logits


def _check_no_injection_attached(model: TLModel) -> None:
    """Refuse to verbalize while an `Injection`'s hook is attached to the AV (a `model.hooks(fwd_hooks=inj.fwd_hooks())`
    block around the call, `run_with_hooks(..., reset_hooks_end=False)`, `add_hook`): `verbalize` adds its own, and the
    vectors would go in twice (a Karvonen add doubles), or an injection built for other tokens would raise mid-run."""
    for name, point in model.hook_dict.items():
        if any(is_injection_hook(getattr(handle, "user_hook", None)) for handle in point.fwd_hooks):
            raise InjectionError(
                f"an injection is attached to the AV at {name}, and verbalize adds its own to every batch: the "
                "vectors would be injected twice. Remove it first (leave the `with av.model.hooks(...)` block that "
                "installed it, or call av.model.reset_hooks()); to decode under your own injection, run TL's "
                "generate inside that block instead"
            )


def _sample(logits: Float[Tensor, "n vocab"], temperature: float, top_p: float,
            generator: torch.Generator | None) -> Int[Tensor, " n"]:
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(_probabilities(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def _sample_inverse_cdf(logits: Float[Tensor, "n vocab"], temperature: float, top_p: float,
                        uniforms: Float[Tensor, " n"]) -> Int[Tensor, " n"]:
    """Row i takes the first token id whose cumulative probability passes `uniforms[i]` of the row's mass: rows given
    one uniform and near-equal distributions take one token unless it falls between their cumulative sums."""
    cdf = _probabilities(logits, temperature, top_p).cumsum(dim=-1)
    mass = cdf[:, -1:].contiguous()
    chosen = torch.searchsorted(cdf, uniforms[:, None].to(cdf.dtype) * mass, right=True)
    # u * mass may round up to the mass itself, past every token: take the last token with probability then
    return torch.minimum(chosen, torch.searchsorted(cdf, mass)).squeeze(-1)


def _probabilities(logits: Float[Tensor, "n vocab"], temperature: float, top_p: float) -> Float[Tensor, "n vocab"]:
    """The sampling distribution at `temperature` (> 0), cut to the top-p nucleus (not renormalised)."""
    scaled = logits.float() / temperature
    if not bool(scaled.isfinite().all()):  # a tiny temperature overflows: the same distribution, shifted first
        # in fp64: a temperature below fp32's smallest number (1.4e-45) is 0 there, and 0 / 0 is NaN
        wide = logits.double()
        scaled = ((wide - wide.amax(dim=-1, keepdim=True)) / temperature).float()
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def _common_uniforms(draws: Int[Tensor, " n"], max_new_tokens: int,
                     seed: int | None) -> Float[Tensor, "n max_new_tokens"]:
    """Row i's uniform per decode step: row `draws[i]` of one table drawn on the CPU, whatever the device and
    `batch_size`."""
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    return torch.rand(len(draws), max_new_tokens, generator=generator)[draws]


def _injection_spec(meta: NLAMeta, injection: InjectionSpec | str | None,
                    hook_point: str | None) -> InjectionSpec:
    """User override > explicit sidecar block > the dialect rule (resolved by the sidecar parser)."""
    if isinstance(injection, InjectionSpec):
        return injection if hook_point is None else InjectionSpec(injection.method, hook_point)
    if isinstance(injection, str):
        if injection not in DEFAULT_HOOK_POINT:  # the user's argument, not the sidecar's: an InputError
            raise InputError(f"injection={injection!r} is no injection method; pass one of "
                             f"{sorted(DEFAULT_HOOK_POINT)}, an InjectionSpec, or None for the sidecar's")
        return InjectionSpec.of(injection, hook_point)
    if injection is not None:
        raise InputError(f"injection must be a method name ({sorted(DEFAULT_HOOK_POINT)}), an InjectionSpec, or None "
                         f"for the sidecar's; got {type(injection).__name__}")
    if meta.injection is None:
        raise SidecarError(
            "the sidecar does not say how vectors were injected (no injection block, no "
            "injection_scale); pass injection='karvonen', or add the extraction.injection_scale the AV was "
            "trained with to the sidecar for embedding replacement"
        )
    if hook_point is not None:
        return InjectionSpec(meta.injection.method, hook_point)
    return meta.injection
