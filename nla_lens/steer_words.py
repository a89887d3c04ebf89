"""Steer with words: edit an explanation, let the AR turn the edit into a steering vector.

The paper's "Planning in Poetry" and "Reasoning about Rewards" case studies run the NLA backwards:
read the AV's explanation of the base model's residual at one token, edit its text (rabbit -> mouse,
"reward" -> "penalty"), and steer the base model with the difference of the AR's reconstructions:

    Delta = mean over samples s of [ unit(AR(edited_s)) - unit(AR(original_s)) ]
    add:      h <- h + alpha * ||h|| * Delta / ||Delta||            (at blocks.K.hook_resid_post)
    replace:  h <- h + alpha * (||h|| * T / ||T|| - h),  T = mean_s unit(AR(edited_s))

Each reconstruction is normalised first because the AR was trained on rescaled targets (its output
norm carries no meaning); ||h|| is the live residual's norm at the steered site, so alpha is a
fraction of the activation's own size, scale-free across models. `replace` with alpha=1 is the
"patch with words" variant (the residual becomes the edited explanation's reconstruction at the
residual's norm). With `samples > 1` the AV samples several explanations per site and Delta is the
mean over them (the paper averaged 5). The formulas are those of issue #16; the paper's own pages
(transformer-circuits.pub/2026/nla) were not in the stored corpus this module was written against,
see docs/guide/steer-words.md ("Where the method comes from") for what was checked and where.

The steering is one plain TransformerLens hook at `blocks.K.hook_resid_post` (`result.fwd_hooks()`),
bound to the token shape it was built for; it leaves single-token KV-cached decode steps alone, so
it can stay installed around `generate`. This module calls the core (capture, verbalize,
reconstruct); the core never calls it.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import pyarrow as pa
import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from nla_lens import backends
from nla_lens.base_model import check_base_model
from nla_lens.capture import (
    PositionSpec,
    check_token_ids,
    decoded_prompts,
    real_tokens,
    resid_post,
    resid_post_name,
    resolve_positions,
)
from nla_lens.checks import (
    check_counts,
    check_finite,
    check_input_file,
    check_output_path,
    check_sampling,
    counted,
    file_kind,
    file_path,
    is_bool,
    is_count,
    is_integer,
)
from nla_lens.display import format_cell, format_number
from nla_lens.errors import InputError, PairMismatchError, PromptTooLongError, VectorError
from nla_lens.injection import HookFn, check_vectors, directionless_rows, prescaled, unit
from nla_lens.nla import NLA, nla_type_name, rows_the_ar_reads, warn_kept
from nla_lens.parsing import failed_parse_note
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.results import TabularResult
from nla_lens.sidecar import ar_prompt_ids
from nla_lens.vector_files import save_tensors
from nla_lens.verbalizer import MAX_NEW_TOKENS, ActivationVerbalizer, Verbalization

if TYPE_CHECKING:
    from nla_lens.backends import TLModel

Mode = Literal["add", "replace"]
EditFn = Callable[[str], str]
# One edit for every site (a function of the explanation, or the edited text itself), or one per site.
Edit = EditFn | str | Sequence[EditFn | str]
_TABLE_TOP_K = 3  # next tokens per site in the table; next_tokens(k) gives more
# What save_vectors writes, and fwd_hooks_from needs: tensors, and settings as safetensors' text metadata.
_SAVED_TENSORS = ("delta", "target", "rows", "positions")
_SAVED_SETTINGS = ("hook_name", "layer", "alpha", "mode", "token_shape")


def site_steering_hook(directions: Float[Tensor, "n d_model"], rows: Int[Tensor, " n"], cols: Int[Tensor, " n"],
                       token_shape: tuple[int, int], alpha: float, mode: Mode, hook_name: str,
                       named_as: tuple[Int[Tensor, " n"], Int[Tensor, " n"]] | None = None) -> HookFn:
    """A TL hook for `hook_name` (`blocks.K.hook_resid_post`) that steers residual `(rows[i], cols[i])` along
    `directions[i]`. Errors name `hook_name`, not `hook.name`: the bridge reports its own (`blocks.K.hook_out`),
    and the sites as `named_as` (rows, columns) where given: those of the user's batch, for a hook on one unpadded row.

    add: ``h + alpha * ||h|| * d / ||d||``; replace: ``h + alpha * (||h|| * d / ||d|| - h)``; ``||h||`` is
    the residual as it reaches the hook (after any hook added before this one). Computed in float32 and
    written back in the residual's dtype; an alpha that steers a residual past what the layers after can read
    raises `VectorError` naming alpha and the sites. Runs of the built shape are steered, as are longer runs
    with the same batch (uncached generation: the prompt plus generated tokens); a one-token run
    of a longer prompt is a KV-cached decode step and is left alone, as the prompt was steered at prefill.
    (A one-token prompt cannot be told from a decode step: KV-cached generation would steer every step.)
    """
    directions = unit(directions.float())
    batch, width = token_shape

    def hook(resid: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor | None:
        n, pos = resid.shape[:2]
        if pos == 1 and width > 1:
            return None
        if n != batch or pos < width:
            raise InputError(
                f"{hook_name}: this steering was built for tokens of shape {[batch, width]} but the run has "
                f"[batch, pos] = {[n, pos]}; run the tokens you passed to steer_with_words (generate may "
                "append tokens), or call steer_with_words again for these"
            )
        if resid.shape[-1] != directions.shape[-1]:
            raise PairMismatchError(
                f"{hook_name}: this steering's directions are {directions.shape[-1]}-d but the run's residual is "
                f"{resid.shape[-1]}-d: the model is not the base the NLA reads; steer the base it was built on"
            )
        at = (rows.to(resid.device), cols.to(resid.device))
        h = resid[at].float()
        norm = h.norm(dim=-1, keepdim=True)
        d = directions.to(resid.device)
        new = h + alpha * norm * d if mode == "add" else h + alpha * (norm * d - h)
        written = new.to(resid.dtype)
        _check_readable(h, new, written, alpha, hook_name, *(named_as or (rows, cols)))
        return resid.index_put(at, written)

    return hook


def _check_readable(h: Float[Tensor, "n d_model"], new: Float[Tensor, "n d_model"],
                    written: Float[Tensor, "n d_model"], alpha: float, hook_name: str, rows: Int[Tensor, " n"],
                    cols: Int[Tensor, " n"]) -> None:
    """The steered residuals must stay readable by the layers after: entries past the residual's dtype are inf,
    and a squared norm past float32's makes the next layer norm's mean of squares inf, which reads the residual as
    zero (alpha=1e30: uniform next-token odds) or NaN, without a word. A site that arrived non-finite is not
    the steering's doing and is left to the run."""
    unreadable = h.isfinite().all(dim=-1) & ~(written.isfinite().all(dim=-1) & new.pow(2).sum(dim=-1).isfinite())
    if not unreadable.any():
        return
    bad = unreadable.nonzero().flatten()
    sites = [(int(rows[i]), int(cols[i])) for i in bad[:8]]
    first = int(bad[0])
    cause = (f"entries past {written.dtype}'s range" if new[first].isfinite().all() and
             not written[first].isfinite().all() else
             "a squared norm past float32's range, which the next layer norm reads as zero (or NaN)")
    raise VectorError(f"{hook_name}: alpha={alpha:g} steers the residual at (batch, position) {sites} past what the "
                      f"layers after can read: {cause}, so the steered run would be garbage. The first site's norm "
                      f"before steering is {float(h[first].double().norm()):.3g}; lower |alpha|")


@dataclass(frozen=True, eq=False, repr=False)
class WordSteering(TabularResult):
    """What `steer_with_words` built: the explanations before and after the edit, Delta, the hook, comparisons.

    Attributes:
        hook_name: where the hook steers: blocks.{layer}.hook_resid_post.
        layer: the NLA's layer K, at which the sites were read and are steered.
        alpha: the steering strength, a fraction of the residual's own norm (module docstring).
        mode: "add" (h + alpha ||h|| Delta / ||Delta||) or "replace" (towards ||h|| T / ||T||).
        rows: the batch row of each steered site i.
        positions: the column of each steered site i.
        tokens_at: the token at each steered site.
        token_shape: the [batch, pos] shape of the tokens the hook was built for (it steers no other).
        explanations: per site, the explanations of its residual: the AV's, one per sample (failed parses
            dropped), or those passed as `explanations=`.
        edited: per site, those explanations after the edit.
        delta: per site, the mean of unit(AR(edited)) - unit(AR(original)): Delta, what "add" steers along.
        target: per site, the mean of unit(AR(edited)): T, what "replace" steers towards.
        prompts: per row of the tokens, its prompt: its real tokens decoded with the base model's tokenizer (padding
            left out, special tokens kept), so that a saved file says which prompt a site's `batch` was; None
            without a tokenizer.
        clean_logprobs: the base model's next-token log-probs at each site without the hook (`compare=True`);
            else None.
        steered_logprobs: the same with the hook installed.
        tokenizer: the base model's, to name tokens in the tables.
        continuations: (clean, steered) greedy continuations of each row's real tokens (`continue_tokens > 0`);
            else None.
        warnings: what `steer_with_words` warned of (samples dropped for a failed parse, an edit leaving some
            samples unchanged), kept so a notebook's view and a saved `.parquet` still say it.
    """

    hook_name: str
    layer: int
    alpha: float
    mode: Mode
    rows: Int[Tensor, " n"]
    positions: Int[Tensor, " n"]
    tokens_at: list[str]
    token_shape: tuple[int, int]
    explanations: list[list[str]]
    edited: list[list[str]]
    delta: Float[Tensor, "n d_model"]
    target: Float[Tensor, "n d_model"]
    prompts: list[str | None]
    clean_logprobs: Float[Tensor, "n d_vocab"] | None = None
    steered_logprobs: Float[Tensor, "n d_vocab"] | None = None
    tokenizer: Any = None
    continuations: list[tuple[str, str]] | None = None
    warnings: list[str] = field(default_factory=list)

    warnings_at = "warnings"
    # Each pair side by side, clean then steered: what the steering changed
    display_columns = ("batch", "position", "token", "explanation", "edited", "delta_norm", "clean_next",
                       "steered_next", "kl", "clean_continuation", "steered_continuation")
    schema = pa.schema({"batch": pa.int64(), "prompt": pa.string(), "position": pa.int64(), "token": pa.string(),
                        "explanation": pa.string(), "edited": pa.string(), "samples": pa.int64(),
                        "explanation_samples": pa.list_(pa.string()), "edited_samples": pa.list_(pa.string()),
                        "delta_norm": pa.float64(), "hook_name": pa.string(), "mode": pa.string(),
                        "alpha": pa.float64(), "clean_next": pa.string(), "steered_next": pa.string(),
                        "kl": pa.float64(), "clean_continuation": pa.string(), "steered_continuation": pa.string()})
    # clean_next .. kl only with compare=True, the continuations only with continue_tokens > 0; prompt in every row,
    # but not in files saved before rows named their prompt
    optional_columns = ("prompt", "clean_next", "steered_next", "kl", "clean_continuation", "steered_continuation")

    def fwd_hooks(self, alpha: float | None = None) -> list[tuple[str, HookFn]]:
        """`[(blocks.K.hook_resid_post, hook)]` for `run_with_hooks` or `model.hooks(...)`; `alpha` overrides."""
        return _fwd_hooks(self.hook_name, self.mode, self.delta, self.target, self.rows, self.positions,
                          self.token_shape, self.alpha, alpha)

    @classmethod
    def fwd_hooks_from(cls, path: str | Path, alpha: float | None = None) -> list[tuple[str, HookFn]]:
        """The `fwd_hooks(alpha)` of the result whose `save_vectors` wrote `path`: steer again without the AV
        and the AR. Tensors and text only are read (safetensors runs no code); a file of another kind is refused."""
        path = file_path(path, "fwd_hooks_from")
        if file_kind(path) != ".safetensors":
            raise InputError(f"{path}: fwd_hooks_from reads the .safetensors file save_vectors wrote")
        check_input_file(path, "steering file")
        saved = _read_saved(path)
        return _fwd_hooks(saved["hook_name"], saved["mode"], saved["delta"], saved["target"], saved["rows"],
                          saved["positions"], saved["token_shape"], saved["alpha"], alpha)

    def next_tokens(self, k: int = 5) -> list[dict[str, Any]]:
        """Per site: the top-k next tokens without and with steering, and KL(clean || steered) in nats."""
        if self.clean_logprobs is None or self.steered_logprobs is None:
            raise InputError("this result holds no next-token comparison; call steer_with_words(..., compare=True)")
        (k,) = check_counts(1, k=k)
        k = min(k, self.clean_logprobs.shape[-1])  # topk past the vocabulary raises a bare RuntimeError
        kl = (self.clean_logprobs.exp() * (self.clean_logprobs - self.steered_logprobs)).sum(-1)
        out = []
        for i in range(len(self.rows)):
            out.append({"clean_top": self._top(self.clean_logprobs[i], k),
                        "steered_top": self._top(self.steered_logprobs[i], k), "kl": float(kl[i])})
        return out

    def _top(self, logprobs: Tensor, k: int) -> list[tuple[str, float]]:
        values, ids = logprobs.topk(k)
        names = [_decode(self.tokenizer, int(i)) for i in ids]
        # 4 significant digits, not 4 decimals: those read a flat distribution's tops (1e-5 each) as 0
        return [(name, float(f"{float(v.exp()):.4g}")) for name, v in zip(names, values, strict=True)]

    def to_records(self) -> list[dict[str, Any]]:
        """One row per steered site: where (with its row's `prompt`), the first explanation and its edit (every
        sample in the `*_samples` columns), Delta's size `delta_norm` (how far the edit moved the reconstruction: add
        mode steers along Delta, replace mode towards T, so an unchanged edit there is 0 and still steers), the top
        next tokens without / with steering, the continuations."""
        tops = self.next_tokens(_TABLE_TOP_K) if self.clean_logprobs is not None else [{}] * len(self.rows)
        records = []
        for i in range(len(self.rows)):
            row = int(self.rows[i])
            record = {"batch": row, "prompt": self.prompts[row], "position": int(self.positions[i]),
                      "token": self.tokens_at[i], "explanation": self.explanations[i][0], "edited": self.edited[i][0],
                      "samples": len(self.explanations[i]), "explanation_samples": self.explanations[i],
                      "edited_samples": self.edited[i], "delta_norm": float(self.delta[i].norm()),
                      "hook_name": self.hook_name, "mode": self.mode, "alpha": self.alpha}
            if tops[i]:
                record.update({"clean_next": _tops_text(tops[i]["clean_top"]),
                               "steered_next": _tops_text(tops[i]["steered_top"]), "kl": tops[i]["kl"]})
            if self.continuations is not None:
                record["clean_continuation"], record["steered_continuation"] = self.continuations[row]
            records.append(record)
        return records

    def summary(self) -> str:
        samples = max((len(e) for e in self.explanations), default=0)
        return (f"{counted(len(self.rows), 'site')} at {self.hook_name}, mode={self.mode}, alpha={self.alpha:g}, "
                f"{counted(samples, 'sample')} per site")

    def save_vectors(self, path: str | Path) -> Path:
        """Delta and T (with the sites and settings, the token shape the hook is bound to among them) to
        `.safetensors`, to steer again without the AV and AR (`fwd_hooks_from`); `save` writes the table."""
        path = file_path(path, "save_vectors")
        if file_kind(path) != ".safetensors":
            raise InputError(f"{path}: save_vectors writes a .safetensors file; save() writes the table")
        check_output_path(path, (".safetensors",))
        tensors = {name: getattr(self, name).contiguous() for name in _SAVED_TENSORS}  # what fwd_hooks_from reads
        metadata = {"hook_name": self.hook_name, "layer": str(self.layer), "alpha": str(self.alpha), "mode": self.mode,
                    "token_shape": json.dumps(list(self.token_shape))}
        save_tensors(tensors, path, metadata)
        return path


def steer_with_words(
    nla: NLA,
    base: TLModel,
    tokens: Int[Tensor, "batch pos"],
    positions: PositionSpec,
    *,
    edit: Edit,
    alpha: float = 1.0,
    mode: Mode = "add",
    samples: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    explanations: Sequence[str | Sequence[str]] | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    layer: int | None = None,
    compare: bool = True,
    continue_tokens: int = 8,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> WordSteering:
    """Verbalize the base model's residual at `positions` (or take `explanations`), apply `edit`, build
    Delta with the AR and return the steering as a composable hook plus comparisons.

    `positions` is any `nl.capture` position spec (ints, negative = from each row's last real token,
    a [batch] tensor, a [batch, pos] mask). `edit` is a function of the explanation text, the edited
    text itself, or a sequence with one of those per site. `samples > 1` samples that many
    explanations per site at `temperature` (default 1.0) with `seed` (default 0) and averages Delta over
    them; `samples = 1` (the default) is the greedy explanation, which takes no seed and no temperature
    but 0. `explanations` (one string, or one list of samples, per site) skips the AV, so it takes none
    of the three, nor `max_new_tokens` (how long the AV writes, default 150). `batch_size` bounds both
    the AV's batches and the AR's (which reads every original and edited explanation).
    `compare` stores next-token log-probs at the sites without and with steering; `continue_tokens`
    (0 for none) greedy tokens continue each row without and with it. `layer`, if given, must be K.
    The AR reads every explanation and edit: a `max_new_tokens` whose samples it could not read is refused before
    the AV runs (`PromptTooLongError`, `NLA.round_trip`'s rule); an AV sample whose text still retokenizes past the
    AR's n_ctx is dropped, as a failed parse is; an edit or a given explanation past it is refused by site before
    the AR reads any (no bound set before the edit holds for it), an edit given as text before the AV runs.
    """
    _check_inputs(nla, base, tokens, layer, alpha, mode, compare, continue_tokens)
    samples, sampling = sampling_settings(explanations, samples, temperature, seed, max_new_tokens, batch_size)
    if explanations is None:  # the AR reads the AV's samples: `NLA.round_trip`'s rule, before the base model runs
        nla.ar.check_reads_samples(sampling["max_new_tokens"])
    k = nla.ar.meta.layer
    real = real_tokens(base, attention_mask, tokens)
    if real is None:
        real = torch.ones(tokens.shape, dtype=torch.bool)
    _check_context(base, real, continue_tokens)
    rows, cols = resolve_positions(positions, real.to(tokens.device))
    sites = list(zip(rows.tolist(), cols.tolist(), strict=True))
    if len(set(sites)) != len(sites):
        raise InputError("positions name the same (row, column) twice; steer each site once")
    per_site = _site_edits(edit, len(sites))
    if explanations is None:
        _check_fixed_edits(nla.ar, per_site, samples, sites)
    run_mask = attention_mask if attention_mask is not None else backends.implicit_attention_mask(base, tokens)
    with torch.no_grad():
        if explanations is None:
            texts, dropped = _verbalize_sites(nla, base, tokens, rows, cols, run_mask, k, samples, sampling,
                                              batch_size)
        else:
            texts, dropped = _given_explanations(explanations, len(sites)), []
        edited = _apply_edits(per_site, texts)
        _check_ar_reads(nla.ar, texts, edited, sites)
        delta, target, warned = _delta(nla, texts, edited, sites, mode, batch_size)
        named = [_decode(base.tokenizer, int(tokens[r, c])) for r, c in sites]
        result = WordSteering(resid_post_name(k), k, float(alpha), mode, rows.cpu(), cols.cpu(), named,
                              (tokens.shape[0], tokens.shape[1]), texts, edited, delta, target,
                              decoded_prompts(base, tokens, real), warnings=dropped + warned)
        clean = steered = continuations = None
        if compare:
            clean = _site_logprobs(base, tokens, run_mask, rows, cols, [])
            steered = _site_logprobs(base, tokens, run_mask, rows, cols, result.fwd_hooks())
        if continue_tokens:
            continuations = _continuations(base, tokens, real, result, continue_tokens)
    return replace(result, clean_logprobs=clean, steered_logprobs=steered, tokenizer=base.tokenizer,
                   continuations=continuations)


@dataclass(frozen=True, eq=False, repr=False)
class Difference(TabularResult):
    """`describe_difference`: the AV's reading of ``a - b`` per row, next to how far apart a and b are.

    Attributes:
        difference: a - b per row, what the AV read.
        cosine: cos(a, b) per row; NaN where a or b is zero (no angle).
        verbalizations: the AV's output for each row of `difference`.
    """

    difference: Float[Tensor, "n d_model"]
    cosine: Float[Tensor, " n"]
    verbalizations: list[Verbalization]

    warnings_at = "verbalizations.warnings"  # the failed injection verbalize warned of
    display_columns = ("index", "explanation", "parsed", "cos_a_b", "norm_a_minus_b")
    schema = pa.schema({"index": pa.int64(), "explanation": pa.string(), "parsed": pa.bool_(), "text": pa.string(),
                        "truncated": pa.bool_(), "cos_a_b": pa.float64(), "norm_a_minus_b": pa.float64()})

    @property
    def explanations(self) -> list[str | None]:
        """Each row's parsed explanation of a - b, None where the AV's text did not parse."""
        return [v.explanation for v in self.verbalizations]

    def to_records(self) -> list[dict[str, Any]]:
        norms = self.difference.double().norm(dim=-1).tolist()  # float64 holds the square of any float32 entry
        return [{"index": i, "explanation": v.explanation, "parsed": v.explanation is not None, "text": v.text,
                 "truncated": v.truncated, "cos_a_b": cos, "norm_a_minus_b": norm}
                for i, (v, cos, norm) in enumerate(zip(self.verbalizations, self.cosine.tolist(), norms, strict=True))]

    def summary(self) -> str:
        failed = sum(e is None for e in self.explanations)
        return f"{counted(len(self.verbalizations), 'difference')} a - b verbalized, {failed} failed to parse"


def describe_difference(nla_or_av: NLA | ActivationVerbalizer, a: Float[Tensor, "n d_model"],
                        b: Float[Tensor, "n d_model"], **verbalize_kwargs: Any) -> Difference:
    """Verbalize ``a - b`` (Neuronpedia's "compare"): a steered vs a clean residual, a patched vs a clean one,
    or two steering vectors. `b` may be one vector for all rows of `a`. Only the direction reaches the AV, so
    only the difference must have one: a or b may be zero (b = 0 reads a itself), a row where a equals b is refused."""
    if not isinstance(nla_or_av, (NLA, ActivationVerbalizer)):
        raise InputError(f"describe_difference reads a - b with an NLA or an ActivationVerbalizer, got "
                         f"{nla_type_name(nla_or_av)}")
    av = nla_or_av.av if isinstance(nla_or_av, NLA) else nla_or_av
    d = av.meta.d_model
    a = check_vectors(a, d, "a", zero_ok=True, as_float32=True)
    b = check_vectors(b, d, "b", zero_ok=True, as_float32=True)
    if b.shape[0] not in (1, a.shape[0]):
        raise VectorError(f"b has {b.shape[0]} rows; pass one vector or one per row of a ({a.shape[0]})")
    b = b.to(a.device).expand_as(a)
    difference = a - b
    past_range, same = directionless_rows(difference)
    if past_range:
        raise VectorError(f"a - b at rows {past_range[:8]} is past float32's range (about 3.4e38), in which the AV "
                          "reads it; scale a and b down together (only the direction of a - b reaches the AV)")
    if same:
        raise VectorError(f"a and b are equal at rows {same[:8]}: their difference has no direction to verbalize")
    verbalize_kwargs.setdefault("progress", False)
    return Difference(difference, _cosine(a, b), av.verbalize(difference, **verbalize_kwargs))


def _cosine(a: Float[Tensor, "n d_model"], b: Float[Tensor, "n d_model"]) -> Float[Tensor, " n"]:
    """cos(a, b) per row, of the rows brought to a largest entry near 1 first (`prescaled`, exact): on the raw rows
    torch reads entries ~1e-25 or ~1e25 as cosine 0, their squared norms leaving float32. NaN where a or b is zero,
    which makes no angle (torch says 0, as for orthogonal rows)."""
    zero = (a == 0).all(dim=-1) | (b == 0).all(dim=-1)
    return torch.cosine_similarity(prescaled(a), prescaled(b), dim=-1).masked_fill(zero, math.nan)


def _check_inputs(nla: NLA, base: TLModel, tokens: Tensor, layer: int | None, alpha: float, mode: str,
                  compare: bool, continue_tokens: int) -> None:
    if not isinstance(nla, NLA):
        raise InputError(f"steer_with_words needs an NLA (AV + AR), got {nla_type_name(nla)}")
    backends.backend_of(base)
    k = nla.ar.meta.layer
    if layer is not None and not is_integer(layer):
        raise InputError(f"layer={layer!r} must be a whole number, the NLA's layer {k}, or None; leave it out to steer "
                         f"at blocks.{k}.hook_resid_post")
    if layer is not None and layer != k:
        raise PairMismatchError(
            f"this AR reconstructs layer-{k} residuals (blocks.{k}.hook_resid_post), so its Delta only means "
            f"something there; steering at layer {layer} needs an NLA trained on layer {layer}. Drop layer= "
            f"or pass layer={k}"
        )
    check_base_model(base, nla, layer=k)
    check_token_ids(base, tokens)
    if mode not in ("add", "replace"):
        raise InputError(f"mode must be 'add' or 'replace', got {mode!r}")
    check_finite(alpha=alpha)
    if not is_bool(compare):  # compare="no" is truthy: it would run the comparison it meant to skip
        raise InputError(f"compare must be True or False, got {compare!r}: compare=False skips the next-token "
                         "comparison")
    if not is_count(continue_tokens, 0):
        raise InputError(f"continue_tokens must be an int >= 0, got {continue_tokens!r}")
    if continue_tokens and base.tokenizer is None:  # checked before the AV and AR run, not after
        raise InputError(f"continue_tokens={continue_tokens} decodes the continuations with the base model's "
                         "tokenizer, and this model has none: pass continue_tokens=0, or set base.tokenizer")


def _check_context(base: TLModel, real: Tensor, continue_tokens: int) -> None:
    """A continuation past the base model's context fails inside TransformerLens (an IndexError from the rotary
    table); refused before the AV runs (the tokens themselves were checked with `check_token_ids`). Its widest
    forward is its row's real tokens plus all but the last new one."""
    n_ctx = base.cfg.n_ctx
    longest = int(real.sum(dim=1).max())
    if continue_tokens and longest + continue_tokens - 1 > n_ctx:
        raise PromptTooLongError(f"continue_tokens={continue_tokens} would grow a row of {longest} tokens past the "
                                 f"base model's context of {n_ctx}; pass continue_tokens={n_ctx - longest + 1} or "
                                 "fewer (0 for none)")


def sampling_settings(explanations: object, samples: int | None, temperature: float | None, seed: int | None,
                      max_new_tokens: int | None, batch_size: int) -> tuple[int, dict[str, Any]]:
    """Samples per site and the AV's decoding settings (max_new_tokens among them), checked before the base model
    runs; a setting that would not apply (the AV does not run, or samples=1 is greedy) is refused, not ignored."""
    given = {name: value for name, value in (("samples", samples), ("temperature", temperature), ("seed", seed))
             if value is not None}
    if explanations is not None:
        if given:
            settings = ", ".join(f"{name}={value!r}" for name, value in given.items())
            raise InputError(f"{settings}: samples, temperature and seed set how the AV samples explanations, and "
                             "explanations= skips the AV; drop them, or drop explanations= to let the AV read the "
                             "sites (pass several explanations per site as a list to average Delta over them)")
        if max_new_tokens is not None:
            raise InputError(f"max_new_tokens={max_new_tokens!r}: it sets how long the AV writes, and explanations= "
                             "skips the AV; drop it, or drop explanations= to let the AV read the sites")
        return 1, {}
    max_new_tokens = MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    samples = 1 if samples is None else samples
    (samples,) = check_counts(1, samples=samples)
    if samples == 1:
        # temperature 0 (int, float or NumPy) says what samples=1 does; a seed has no effect on a greedy read
        greedy = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool) and temperature == 0
        unused = {name: value for name, value in given.items()
                  if name == "seed" or (name == "temperature" and not greedy)}
        if unused:
            settings = ", ".join(f"{name}={value!r}" for name, value in unused.items())
            raise InputError(f"{settings}: samples=1 reads the greedy explanation, which takes no seed and no "
                             "temperature other than 0; pass samples > 1 (e.g. samples=5) to sample, or drop them")
        max_new_tokens, _ = check_sampling(0.0, 1.0, max_new_tokens, batch_size)
        return 1, {"temperature": 0.0, "max_new_tokens": max_new_tokens}
    sampling: dict[str, Any] = {"temperature": 1.0 if temperature is None else temperature,
                                "seed": 0 if seed is None else seed}
    sampling["max_new_tokens"], _ = check_sampling(sampling["temperature"], 1.0, max_new_tokens, batch_size,
                                                   sampling["seed"])
    if sampling["temperature"] == 0:  # every sample would be the greedy explanation: Delta averaged over copies
        raise InputError(f"samples={samples}, temperature={temperature!r}: at temperature 0 every sample is the same "
                         "greedy explanation; pass samples=1 for it, or a temperature > 0 to sample")
    return samples, sampling


def _verbalize_sites(nla: NLA, base: TLModel, tokens: Tensor, rows: Tensor, cols: Tensor,
                     run_mask: Tensor | None, k: int, samples: int, sampling: dict[str, Any],
                     batch_size: int) -> tuple[list[list[str]], list[str]]:
    """Up to `samples` explanations per site (greedy for one), those that parse and that the AR reads within its
    n_ctx (`rows_the_ar_reads`: a text may retokenize longer than sampled); a site with none raises, a site with
    fewer is warned of (the warnings are returned too)."""
    resid = resid_post(base, tokens, k, attention_mask=run_mask)
    vectors = resid[rows.to(resid.device), cols.to(resid.device)].float()
    _check_site_residuals(vectors, rows, cols, k)
    vectors = vectors.repeat_interleave(samples, dim=0)
    said = nla.av.verbalize(vectors, batch_size=batch_size, progress=False, **sampling)
    read, too_long = rows_the_ar_reads(nla.ar, [v.explanation for v in said])
    texts: list[list[str]] = [[] for _ in range(len(rows))]
    for j in read:  # sample j is of site j // samples
        texts[j // samples].append(cast(str, said[j].explanation))
    failed = [i for i, t in enumerate(texts) if not t]
    if failed:
        i = failed[0]
        site = f"site {i} (row {int(rows[i])}, column {int(cols[i])})"
        unread = sum(j // samples == i for j in too_long)
        if unread:
            raise PromptTooLongError(
                f"{unread} of the AV's {samples} explanations of {site} make AR prompts over the AR's "
                f"n_ctx={nla.ar.model.cfg.n_ctx}, the rest failed to parse: a text retokenizes to more tokens than "
                "the AV sampled (a sampled token holding stray bytes of a split character decodes to U+FFFD, which "
                "may tokenize as three); pass explanations= yourself"
            )
        raise InputError(
            f"the AV wrote no parsable explanation for {site}; raise max_new_tokens (now "
            f"{sampling['max_new_tokens']}) or pass explanations= yourself"
        )
    return texts, _warn_dropped_samples(said, too_long, texts, samples, rows, cols)


def _warn_dropped_samples(said: Sequence[Verbalization], too_long: list[int], texts: list[list[str]], samples: int,
                          rows: Tensor, cols: Tensor) -> list[str]:
    """One warning naming the sites whose Delta averages fewer explanations than `samples` asked for, and why (the
    summary's "N samples per site" is the most any site kept); one warning, not one a site: a run of hundreds of
    sites would print hundreds."""
    short = []
    for i, kept in enumerate(texts):
        if len(kept) == samples:
            continue
        own = said[i * samples:(i + 1) * samples]  # sample j is of site j // samples
        failed = [v for v in own if v.explanation is None]
        unread = sum(j // samples == i for j in too_long)
        why = ([f"{len(failed)} failed to parse{failed_parse_note(failed)}"] if failed else []) + (
            [f"{unread} make AR prompts over the AR's n_ctx"] if unread else [])
        short.append(f"site {i} (row {int(rows[i])}, column {int(cols[i])}) dropped {samples - len(kept)}, "
                     f"{' and '.join(why)}")
    if not short:
        return []
    more = f"; and {len(short) - 5} more" if len(short) > 5 else ""
    note = (f"{len(short)} of {counted(len(texts), 'site')} kept fewer than the AV's {samples} explanations: "
            f"{'; '.join(short[:5])}{more}. Delta averages those left. Raise max_new_tokens, or pass explanations= "
            "yourself")
    return warn_kept(note)


def _check_site_residuals(vectors: Float[Tensor, "n d_model"], rows: Int[Tensor, " n"], cols: Int[Tensor, " n"],
                          layer: int) -> None:
    """Refuse site residuals the AV cannot be given (zero: no direction; non-finite), by (batch, position), before
    it runs: `verbalize` named rows of its own batch, each site repeated once per sample."""
    non_finite, zero = directionless_rows(vectors)
    for bad, what in ((non_finite, "not finite (NaN or Inf)"), (zero, "zero")):
        if bad:
            sites = [(int(rows[i]), int(cols[i])) for i in bad[:8]]
            raise VectorError(f"the base model's {resid_post_name(layer)} at (batch, position) {sites} is {what}, so "
                              "the AV has no direction to read there (a hook of yours that writes it, or weights "
                              "that overflow in this dtype). Steer other positions, or run without that hook")


def _given_explanations(explanations: Sequence[str | Sequence[str]], n_sites: int) -> list[list[str]]:
    if isinstance(explanations, str) or not isinstance(explanations, Sequence) or len(explanations) != n_sites:
        raise InputError(f"explanations must hold one entry per steered site ({n_sites}): a string or a list of them")
    # Anything but a list of samples is one sample, so that None (a failed parse's explanation) is refused by name.
    texts = [list(e) if isinstance(e, (list, tuple)) else [e] for e in explanations]
    if not all(t and all(isinstance(s, str) for s in t) for t in texts):
        raise InputError("each site's explanations must be a non-empty string or a non-empty list of strings (a "
                         "failed parse's explanation is None: give that site a text, or leave explanations= out)")
    return cast(list[list[str]], texts)  # every entry a str, as checked just above


def _check_ar_reads(ar: ActivationReconstructor, texts: list[list[str]], edited: list[list[str]],
                    sites: list[tuple[int, int]]) -> None:
    """Every explanation and edit fits the AR's n_ctx, checked by site before the AR reads any (it refused the first
    too long by its place among every site's texts). No bound set before the AV ran holds here: an edit may
    lengthen its text, and `explanations=` are the caller's."""
    n_ctx = ar.model.cfg.n_ctx
    for i, (before, after) in enumerate(zip(texts, edited, strict=True)):
        for what, samples in (("explanation", before), ("edited explanation", after)):
            too_long = [text for text, fits in zip(samples, ar.prompts_fit(samples), strict=True) if not fits]
            if too_long:
                length = len(ar_prompt_ids(ar.meta, ar.tokenizer, too_long[0]))
                raise PromptTooLongError(
                    f"the {what} {format_cell(too_long[0], 60)!r} of site {i} (row {sites[i][0]}, column "
                    f"{sites[i][1]}) makes an AR prompt of {length} tokens, over the AR's n_ctx={n_ctx} "
                    f"({len(too_long)} of the site's {len(samples)}); shorten it"
                )


def _site_edits(edit: Edit, n_sites: int) -> list[EditFn | str]:
    """`edit` as one str or function per site, checked before the AV runs."""
    if isinstance(edit, (bytes, bytearray)):  # a Sequence of ints: it read as per-site edits, "got int"
        raise InputError(f"edit is {type(edit).__name__}, not text: pass .decode() of it, the edited explanation "
                         "as a str")
    if callable(edit) or isinstance(edit, str):
        per_site: list[EditFn | str] = [edit] * n_sites
    elif isinstance(edit, Sequence) and len(edit) == n_sites:
        per_site = list(edit)
    else:
        raise InputError(
            f"edit must be a function of the explanation, the edited text, or one of those per site ({n_sites})"
        )
    for site_edit in per_site:
        if not isinstance(site_edit, str) and not callable(site_edit):
            raise InputError(f"each edit must be a str or a function str -> str, got {type(site_edit).__name__}")
    return per_site


def _check_fixed_edits(ar: ActivationReconstructor, per_site: list[EditFn | str], samples: int,
                       sites: list[tuple[int, int]]) -> None:
    """The edits given as text, checked as `_apply_edits` and `_check_ar_reads` check every edit, but before the AV
    runs: what the AV says does not change them."""
    fixed = [[site_edit] * samples if isinstance(site_edit, str) else [] for site_edit in per_site]
    _check_not_empty(fixed)
    _check_ar_reads(ar, [[] for _ in per_site], fixed, sites)


def _apply_edits(per_site: list[EditFn | str], texts: list[list[str]]) -> list[list[str]]:
    edited = []
    for site_edit, samples in zip(per_site, texts, strict=True):
        if isinstance(site_edit, str):
            edited.append([site_edit] * len(samples))
        else:
            new = [site_edit(text) for text in samples]
            if not all(isinstance(t, str) for t in new):
                raise InputError("an edit function must return the edited explanation as a str")
            edited.append(new)
    _check_not_empty(edited)
    return edited


def _check_not_empty(edited: list[list[str]]) -> None:
    for i, samples in enumerate(edited):
        if any(not text.strip() for text in samples):
            raise InputError(f"the edit of site {i} gives an empty explanation: the AR would read an empty "
                             "<text></text> and steer towards that. Pass the edited explanation's text (or a "
                             "function returning it)")


def _delta(nla: NLA, texts: list[list[str]], edited: list[list[str]], sites: list[tuple[int, int]],
           mode: Mode, batch_size: int) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, "n d_model"], list[str]]:
    """Delta and T per site, the AR reading originals and edits `batch_size` at a time, and the warnings emitted. In
    add mode an edit that changes nothing raises (Delta = 0); replace mode steers with T, so there it patches in the
    original's own reconstruction."""
    for i, (before, after) in enumerate(zip(texts, edited, strict=True)):
        if before == after and mode == "add":
            raise InputError(
                f"the edit leaves the explanation of site {i} (row {sites[i][0]}, column {sites[i][1]}) unchanged "
                f"({before[0]!r}), so Delta = 0 and there is nothing to steer with; edit words that occur in it"
            )
    warned = []
    for i, (before, after) in enumerate(zip(texts, edited, strict=True)):
        same = [b for b, a in zip(before, after, strict=True) if b == a]
        if same and len(same) < len(before):  # all unchanged is refused above (add) or the control (replace)
            effect = ("Delta is their mean over all of them, so it follows the others alone" if mode == "add"
                      else "T averages their own reconstructions in, pulling the patch towards what is there")
            warned += warn_kept(f"the edit leaves {len(same)} of the {len(before)} explanations of site {i} (row "
                                f"{sites[i][0]}, column {sites[i][1]}) unchanged, e.g. {same[0]!r}; {effect}. Edit "
                                "words every sample holds (see result.explanations), or pass explanations= yourself")
    flat_before = [t for site in texts for t in site]
    flat_after = [t for site in edited for t in site]
    reconstructed = unit(nla.ar.reconstruct(flat_before + flat_after, batch_size=batch_size).float().cpu())
    n = len(flat_before)
    unit_before, unit_after = reconstructed[:n], reconstructed[n:]
    site = torch.tensor([i for i, samples in enumerate(texts) for _ in samples])
    counts = torch.bincount(site, minlength=len(texts)).float()[:, None]
    delta = torch.zeros(len(texts), unit_before.shape[1]).index_add_(0, site, unit_after - unit_before) / counts
    target = torch.zeros(len(texts), unit_before.shape[1]).index_add_(0, site, unit_after) / counts
    flat = ((delta if mode == "add" else target).norm(dim=-1) == 0).nonzero().flatten().tolist()
    if flat and mode == "add":
        raise InputError(
            f"the AR reconstructs the edited and original explanations of site {flat[0]} identically, so Delta = 0; "
            "make an edit the AR can read (change content words, not only whitespace)"
        )
    if flat:
        raise InputError(
            f"the AR's unit reconstructions of the edited explanations of site {flat[0]} cancel out, so T = 0 and "
            "replace mode has no direction to patch in; drop the samples that disagree, or use mode='add'"
        )
    return delta, target, warned


def _site_logprobs(base: TLModel, tokens: Tensor, run_mask: Tensor | None, rows: Tensor, cols: Tensor,
                   fwd_hooks: list) -> Float[Tensor, "n d_vocab"]:
    logits = backends.run_with_hooks(base, tokens, attention_mask=run_mask, fwd_hooks=fwd_hooks)
    return logits[rows.to(logits.device), cols.to(logits.device)].float().log_softmax(-1).cpu()


def _continuations(base: TLModel, tokens: Tensor, real: Tensor, result: WordSteering,
                   n_new: int) -> list[tuple[str, str]]:
    """Greedy continuations of each row's real tokens, without and with the steering (no padding, no KV cache:
    the steering hook sees the prompt columns in every forward pass). Run with an all-ones mask: every token
    kept is real, a pad-id one too (Qwen's <|endoftext|>), which HookedTransformer would mask when it leads."""
    tokenizer = base.tokenizer
    assert tokenizer is not None  # _check_inputs refused continue_tokens for a base without one
    out = []
    for row in range(tokens.shape[0]):
        keep = real[row].nonzero().flatten().to(tokens.device)
        ids = tokens[row, keep][None]
        mine = result.rows == row
        shifted = torch.searchsorted(keep.cpu(), result.positions[mine])  # columns within the unpadded row
        directions = (result.delta if result.mode == "add" else result.target)[mine]
        hook = site_steering_hook(directions, torch.zeros_like(shifted), shifted, (1, ids.shape[1]), result.alpha,
                                  result.mode, result.hook_name, named_as=(result.rows[mine], result.positions[mine]))
        pair = []
        for fwd_hooks in ([], [(result.hook_name, hook)]):
            grown = ids
            for _ in range(n_new):
                logits = backends.run_with_hooks(base, grown, attention_mask=torch.ones_like(grown),
                                                  fwd_hooks=fwd_hooks)
                # TL moves the tokens to the model's device; the logits come back there, not to `grown`'s.
                grown = torch.cat([grown, logits[:, -1].argmax(-1, keepdim=True).to(grown.device)], dim=1)
            pair.append(cast(str, tokenizer.decode(grown[0, ids.shape[1]:].tolist())))
        out.append((pair[0], pair[1]))
    return out


def _fwd_hooks(hook_name: str, mode: Mode, delta: Float[Tensor, "n d_model"], target: Float[Tensor, "n d_model"],
               rows: Int[Tensor, " n"], positions: Int[Tensor, " n"], token_shape: tuple[int, int], alpha: float,
               override: float | None) -> list[tuple[str, HookFn]]:
    """The steering hook of a live result or of its saved vectors; `override` replaces `alpha`."""
    if override is not None:
        check_finite(alpha=override)
    scale = alpha if override is None else float(override)
    directions = delta if mode == "add" else target
    return [(hook_name, site_steering_hook(directions, rows, positions, token_shape, scale, mode, hook_name))]


def _read_saved(path: Path) -> dict[str, Any]:
    """The tensors and settings `save_vectors` wrote, checked to fit together: anything else is refused."""
    not_ours = f"{path} is not a file WordSteering.save_vectors wrote"
    try:
        with safe_open(str(path), "pt") as file:
            # Settings only from the text metadata and tensors only by their names: neither can stand in for the other.
            metadata = file.metadata() or {}
            saved: dict[str, Any] = {**{name: metadata[name] for name in _SAVED_SETTINGS if name in metadata},
                                     **{name: file.get_tensor(name) for name in _SAVED_TENSORS if name in file.keys()}}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on a damaged file
        raise InputError(f"{not_ours}: it cannot be read as .safetensors ({type(exc).__name__}); is it corrupt "
                         "or of another format?") from exc
    missing = [name for name in (*_SAVED_TENSORS, *_SAVED_SETTINGS) if name not in saved]
    if missing:
        raise InputError(f"{not_ours}: it lacks {missing}; write it with result.save_vectors(path)")
    if saved["mode"] not in ("add", "replace"):
        raise InputError(f"{path}: mode {saved['mode']!r} is neither 'add' nor 'replace'; the steering hook "
                         "knows only those: write the file with result.save_vectors(path)")
    try:
        if not saved["layer"].isdigit():
            raise ValueError(f"layer {saved['layer']!r} is not a whole number >= 0")
        saved["layer"] = int(saved["layer"])
        saved["alpha"], saved["token_shape"] = float(saved["alpha"]), tuple(json.loads(saved["token_shape"]))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{not_ours}: its layer, alpha or token_shape does not parse ({exc})") from exc
    resid = resid_post_name(saved["layer"])
    if saved["hook_name"] != resid:  # the hook goes where hook_name says: Delta means something only at layer K
        raise InputError(f"{path}: its hook_name {saved['hook_name']!r} is not layer {saved['layer']}'s residual "
                         f"hook {resid!r}, and save_vectors writes the two together: the file was edited or "
                         "damaged; write it again with result.save_vectors(path)")
    delta, rows = saved["delta"], saved["rows"]
    if not (math.isfinite(saved["alpha"]) and delta.isfinite().all() and saved["target"].isfinite().all()):
        raise InputError(f"{path} holds NaN or Inf in its alpha, delta or target, which the hook would write into "
                         "the residual; write it again with result.save_vectors(path)")
    fits = (delta.ndim == 2 and saved["target"].shape == delta.shape and rows.shape == saved["positions"].shape
            == delta.shape[:1] and not rows.is_floating_point() and not saved["positions"].is_floating_point()
            and len(saved["token_shape"]) == 2 and all(type(n) is int for n in saved["token_shape"]))
    if not fits:
        raise InputError(f"{not_ours}: its delta {list(delta.shape)}, target {list(saved['target'].shape)}, rows, "
                         f"positions and token_shape {saved['token_shape']} do not fit together")
    batch, width = saved["token_shape"]
    positions = saved["positions"]
    if not (rows.ge(0).all() and rows.lt(batch).all() and positions.ge(0).all() and positions.lt(width).all()):
        raise InputError(f"{not_ours}: its sites (rows {rows.tolist()[:8]}, positions {positions.tolist()[:8]}) lie "
                         f"outside its token_shape {[batch, width]}, where the hook would steer; write it again with "
                         "result.save_vectors(path)")
    return saved


def _decode(tokenizer: Any, token_id: int) -> str:
    """One token as TL's to_str_tokens shows it; its id where the base model has no tokenizer."""
    if tokenizer is None:
        return str(token_id)
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


def _tops_text(tops: list[tuple[str, float]]) -> str:
    return ", ".join(f"{token!r} {format_number(p)}" for token, p in tops)
