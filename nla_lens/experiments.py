"""Experiments read out through an NLA: steer or patch the base model, then verbalize; verbalize any direction.

Each helper is a few plain TransformerLens runs of the base model (hooks are ordinary
`(activation, hook)` functions), a [`capture`][nla_lens.capture.capture] at the NLA's layer K, and one
batched verbalization (with an NLA: one round trip) of everything captured. Base runs stop after
block K (`stop_at_layer`), since nothing later reaches the captured residual. Results are
dataclasses that print short, show as tables in a notebook, and have `to_pandas()` / `save()`
([`nla_lens.results`][nla_lens.results]).
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_act_name

from nla_lens import backends, metrics
from nla_lens.base_model import check_base_model
from nla_lens.capture import (
    Capture,
    CapturedRow,
    PositionSpec,
    capture,
    check_block,
    check_token_ids,
    decoded_prompts,
    real_tokens,
    resid_post_name,
    resolve_positions,
)
from nla_lens.checks import check_finite, counted, first_five, is_integer
from nla_lens.errors import InputError, VectorError
from nla_lens.injection import HookFn, check_vectors, directionless_rows
from nla_lens.nla import NLA, RoundTrip, baseline_phrase, check_read_keywords, nla_type_name, warn_kept
from nla_lens.results import TabularResult
from nla_lens.verbalizer import ActivationVerbalizer, Verbalization

if TYPE_CHECKING:
    from nla_lens.backends import TLModel


@dataclass(frozen=True)
class SteeringRow:
    """One captured site, read out without and with steering; both readouts' `index` is the site's row i of
    `clean_vectors` / `steered_vectors`.

    Attributes:
        batch: the row of the base model's tokens.
        position: the column captured in that row.
        token: the token at that column; None when the base model has no tokenizer.
        prompt: the row's prompt: its real tokens decoded with the base model's tokenizer (padding left out,
            special tokens kept), so that a saved file says which prompt `batch` was; None without a tokenizer.
        clean: the AV's readout of the site's vector without steering.
        steered: the AV's readout of the site's vector with steering.
        added: words of the steered readout (its explanation, or its raw text where that failed to parse) that the
            clean one lacks, in order (difflib); words as `word_diff` reads them, without the quotes and punctuation
            around them ('"love",' is "love", a lone '"' no word).
        removed: words of the clean readout that the steered one lacks, read the same way.
        cosine: between the clean and the steered captured vectors.
        fve_clean: per-row FVE of the round trip; None without an AR, or without a baseline (`round_trip.fves` is
            None: no `baseline=`, none in the AR sidecar, and too few or too alike vectors for the paper's).
        fve_steered: the same for the steered vector.
        clean_miss: whether the clean readout's scores are the miss (`RoundTrip.misses`: a failed parse, an
            explanation too long for the AR, a reconstruction with no direction); None without an AR.
        steered_miss: the same for the steered readout.
    """

    batch: int
    position: int
    token: str | None
    prompt: str | None
    clean: Verbalization
    steered: Verbalization
    added: list[str]
    removed: list[str]
    cosine: float
    fve_clean: float | None
    fve_steered: float | None
    clean_miss: bool | None = None
    steered_miss: bool | None = None


@dataclass(frozen=True, eq=False, repr=False)
class SteeringResult(TabularResult):
    """What `steer_then_verbalize` returns: one row per captured site, read out without and with steering.

    Attributes:
        rows: one per captured site, in the order of the capture (row-major).
        clean_vectors: the captured layer-`layer` residuals of the run without steering, one per row.
        steered_vectors: the same sites' residuals in the run with steering.
        round_trip: over clean then steered vectors; None without an AR.
        layer: the layer read out (blocks.{layer}.hook_resid_post).
        steer_layer: scale * steering_vector was added at blocks.{steer_layer}.hook_resid_post.
        scale: the multiple of the steering vector added.
        warnings: what the study warned of (steering that changed nothing, another layer than the NLA's), then the
            round trip's warnings (without an AR, the AV's), kept so the repr, the view and a saved `.parquet`
            still say them.
    """

    rows: list[SteeringRow]
    clean_vectors: Float[Tensor, "n d_model"]
    steered_vectors: Float[Tensor, "n d_model"]
    round_trip: RoundTrip | None
    layer: int
    steer_layer: int
    scale: float
    warnings: list[str] = field(default_factory=list)

    display_columns = ("batch", "position", "token", "clean", "steered", "added", "removed", "cosine",
                       "fve_clean", "fve_steered")
    schema = pa.schema({"batch": pa.int64(), "prompt": pa.string(), "position": pa.int64(), "token": pa.string(),
                        "clean": pa.string(), "clean_parsed": pa.bool_(), "steered": pa.string(),
                        "steered_parsed": pa.bool_(), "added": pa.list_(pa.string()), "removed": pa.list_(pa.string()),
                        "cosine": pa.float64(), "fve_clean": pa.float64(), "fve_steered": pa.float64(),
                        "clean_miss": pa.bool_(), "steered_miss": pa.bool_(), "layer": pa.int64(),
                        "steer_layer": pa.int64(), "scale": pa.float64()})
    optional_columns = ("prompt",)  # every row has it; files saved before rows named their prompt do not
    warnings_at = "warnings"

    def to_records(self) -> list[dict[str, Any]]:
        return [{"batch": r.batch, "prompt": r.prompt, "position": r.position, "token": r.token,
                 "clean": _readout(r.clean), "clean_parsed": r.clean.explanation is not None,
                 "steered": _readout(r.steered), "steered_parsed": r.steered.explanation is not None,
                 "added": r.added, "removed": r.removed,
                 "cosine": r.cosine, "fve_clean": r.fve_clean, "fve_steered": r.fve_steered,
                 "clean_miss": r.clean_miss, "steered_miss": r.steered_miss, "layer": self.layer,
                 "steer_layer": self.steer_layer, "scale": self.scale} for r in self.rows]

    def summary(self) -> str:
        changed = sum(_readout(r.clean) != _readout(r.steered) for r in self.rows)
        return (f"steered at layer {self.steer_layer} (scale {self.scale:g}), read out at layer {self.layer}: "
                f"{counted(len(self.rows), 'site')}, {counted(changed, 'readout')} changed by steering; "
                + _scores(self.round_trip, ("clean", "steered")))


@dataclass(frozen=True)
class PatchingRow:
    """One captured site of one run (clean, corrupted or patched), read out; the readout's `index` is the site's
    row in that run's vectors.

    Attributes:
        run: which run the site is from: "clean", "corrupted" or "patched".
        batch: the row of that run's tokens.
        position: the column read out (capture_position), not the patched one.
        token: the token at that column in that run; None when the base model has no tokenizer.
        prompt: the row's prompt in that run (a patched row's is the corrupted one): its real tokens decoded with
            the base model's tokenizer (padding left out, special tokens kept), so that a saved file says which
            prompt `batch` was; None without a tokenizer.
        verbalization: the AV's readout of the site's vector.
        fve: per-row FVE of the round trip; None without an AR, or without a baseline (`round_trip.fves` is None: no
            `baseline=`, none in the AR sidecar, and too few or too alike vectors for the paper's).
        cosine_to_clean: captured vector vs the clean run's at the same site.
        miss: whether the readout's scores are the miss (`RoundTrip.misses`: a failed parse, an explanation too
            long for the AR, a reconstruction with no direction); None without an AR.
    """

    run: Literal["clean", "corrupted", "patched"]
    batch: int
    position: int
    token: str | None
    prompt: str | None
    verbalization: Verbalization
    fve: float | None
    cosine_to_clean: float
    miss: bool | None = None


@dataclass(frozen=True, eq=False, repr=False)
class PatchingStudy(TabularResult):
    """What `patching_study` returns: the clean, corrupted and patched runs' captured sites, read out.

    Attributes:
        rows: clean rows, then corrupted, then patched.
        hook_name: the patched activation.
        clean_vectors: the captured layer-`layer` residuals of the clean run, one per site.
        corrupted_vectors: the same sites' residuals in the corrupted run.
        patched_vectors: the same sites' residuals in the corrupted run with the clean activation patched in.
        round_trip: over clean, corrupted, patched vectors; None without an AR.
        patch_position: the patched column (query row of an attention pattern), >= 0.
        layer: the layer read out (blocks.{layer}.hook_resid_post).
        warnings: what the study warned of (a patch column on padding, rows whose real tokens sit in different
            columns, another layer than the NLA's), then the round trip's warnings (without an AR, the AV's), kept so
            the repr, the view and a saved `.parquet` still say them.
    """

    rows: list[PatchingRow]
    hook_name: str
    clean_vectors: Float[Tensor, "n d_model"]
    corrupted_vectors: Float[Tensor, "n d_model"]
    patched_vectors: Float[Tensor, "n d_model"]
    round_trip: RoundTrip | None
    patch_position: int
    layer: int
    warnings: list[str] = field(default_factory=list)

    display_columns = ("run", "batch", "position", "token", "explanation", "cosine_to_clean", "fve")
    schema = pa.schema({"run": pa.string(), "batch": pa.int64(), "prompt": pa.string(), "position": pa.int64(),
                        "token": pa.string(), "explanation": pa.string(), "parsed": pa.bool_(),
                        "cosine_to_clean": pa.float64(), "fve": pa.float64(), "miss": pa.bool_(),
                        "patched": pa.string(), "patch_position": pa.int64(), "layer": pa.int64()})
    optional_columns = ("prompt",)  # every row has it; files saved before rows named their prompt do not
    warnings_at = "warnings"

    def to_records(self) -> list[dict[str, Any]]:
        return [{"run": r.run, "batch": r.batch, "prompt": r.prompt, "position": r.position, "token": r.token,
                 "explanation": _readout(r.verbalization), "parsed": r.verbalization.explanation is not None,
                 "cosine_to_clean": r.cosine_to_clean, "fve": r.fve, "miss": r.miss, "patched": self.hook_name,
                 "patch_position": self.patch_position, "layer": self.layer} for r in self.rows]

    def summary(self) -> str:
        return (f"patched {self.hook_name} at column {self.patch_position}, read out at layer {self.layer}; "
                f"{len(self.rows)} rows (clean, corrupted, patched); "
                + _scores(self.round_trip, ("clean", "corrupted", "patched")))


@dataclass(frozen=True, eq=False, repr=False)
class DirectionVerbalization(TabularResult):
    """What `verbalize_direction` returns: each direction's explanation and the vector as verbalized.

    Attributes:
        vectors: the directions as verbalized, a float32 copy detached from the caller's tensor (rescaled to
            `scale_like`'s mean norm if given).
        verbalizations: the AV's output for each direction, in order.
    """

    vectors: Float[Tensor, "n d_model"]
    verbalizations: list[Verbalization]

    warnings_at = "verbalizations.warnings"  # the failed injection verbalize warned of
    display_columns = ("index", "explanation", "norm")
    schema = pa.schema({"index": pa.int64(), "explanation": pa.string(), "parsed": pa.bool_(), "norm": pa.float64()})

    @property
    def explanations(self) -> list[str | None]:
        """Each direction's parsed explanation, None where the AV's text did not parse."""
        return [v.explanation for v in self.verbalizations]

    def to_records(self) -> list[dict[str, Any]]:
        norms = self.vectors.norm(dim=-1).tolist()
        return [{"index": i, "explanation": _readout(v), "parsed": v.explanation is not None, "norm": norm}
                for i, (v, norm) in enumerate(zip(self.verbalizations, norms, strict=True))]

    def summary(self) -> str:
        failed = sum(v.explanation is None for v in self.verbalizations)
        n = len(self.verbalizations)
        return f"{counted(n, 'direction')} verbalized, {failed} failed to parse"


def _scores(round_trip: RoundTrip | None, runs: tuple[str, ...]) -> str:
    """The FVE of each run over its own rows (the round trip holds the runs one after another): one FVE
    pooled over clean and steered rows would hide the very difference the study measures."""
    if round_trip is None:
        return "no round trip (AV only)"
    per_run = None if round_trip.fves is None else dict(
        zip(runs, round_trip.fves.reshape(len(runs), -1).mean(dim=1).tolist(), strict=True))
    return baseline_phrase(per_run, round_trip.baseline, round_trip.baseline_source, round_trip.baseline_n)


def steering_hook(vector: Float[Tensor, " d_model"], scale: float, positions: PositionSpec | None = None,
                  attention_mask: Int[Tensor, "batch pos"] | None = None) -> HookFn:
    """A TL hook adding `scale * vector` to the residual at `positions` (all positions when None).

    Each site is steered once, however many position entries name it ([2, -1] in a row whose last real
    token is column 2): adding once per entry would steer that row by a multiple of `scale`. The vector and
    scale are checked here, the width in the hook: a `[pos, d_model]` tensor would broadcast over the positions
    of a run of that width, a NaN would spread through the run, both without a word."""
    if not isinstance(vector, Tensor) or vector.ndim != 1:
        shape = list(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise VectorError(f"vector must be one [d_model] tensor (it is added to every steered residual), got {shape}")
    check_vectors(vector, vector.shape[0], "vector")
    check_finite(scale=scale)

    def hook(resid: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        if resid.shape[-1] != vector.shape[0]:
            raise VectorError(f"{hook.name}: vector has {vector.shape[0]} entries but the residual there has "
                              f"d_model = {resid.shape[-1]}; pass a vector of the base model's width")
        delta = (scale * vector).to(resid.device, resid.dtype)
        if positions is None:
            return resid + delta
        batch, width = resid.shape[:2]
        real = torch.ones(batch, width, dtype=torch.bool, device=resid.device)
        if attention_mask is not None and tuple(attention_mask.shape) == (batch, width):
            real = attention_mask.to(resid.device).bool()
        rows, cols = resolve_positions(positions, real)
        return resid.index_put((rows, cols), resid[rows, cols] + delta)

    return hook


def _check_sites(spec: PositionSpec, tokens: Int[Tensor, "batch pos"], real: Bool[Tensor, "batch pos"] | None,
                 name: str, use: str) -> None:
    """Refuse a position spec that names a site outside a row or on its padding (`real`, as `real_tokens` gives it)
    before any run, in errors that name the argument (`name`) as the caller spells it."""
    resolve_positions(spec, torch.ones(tokens.shape[:2], dtype=torch.bool) if real is None else real.bool(),
                      name=name, use=use)


def _warn_patch_on_padding(reals: Sequence[Bool[Tensor, "batch pos"] | None], column: int) -> list[str]:
    """Warn where the patch column is padding in a row of the clean or corrupted tokens (`reals`: their real
    tokens, TL's column rule, kept for sweeps): padding in the corrupted row leaves its patched vector silently the
    corrupted one; in the clean row, a pad's activation is written into a real token."""
    padded = set()
    for real in reals:
        if real is not None:
            padded |= set((~real[:, column]).nonzero().flatten().tolist())
    if not padded:
        return []
    return warn_kept(f"patch_position {column} is padding in rows {sorted(padded)} of the clean or corrupted tokens: "
                     "there the patch either cannot reach the row's real tokens (its patched vector is the corrupted "
                     "one) or writes a pad's activation into one. Patch a column that is a real token in every row "
                     "(e.g. left-pad the prompts and patch -1)")


def _warn_unaligned_rows(clean_real: Bool[Tensor, "batch pos"] | None,
                         corrupted_real: Bool[Tensor, "batch pos"] | None, column: int) -> list[str]:
    """Warn where a clean and a corrupted row hold their real tokens (read from their pads: one `attention_mask`
    marks both alike) in different columns: prompts of different token lengths padded to one shape pass the shape
    check, but the patch copies column to column, so in such a row it writes one token's activation into another
    token's position."""
    if clean_real is None or corrupted_real is None:
        return []
    rows = (clean_real != corrupted_real).any(dim=1).nonzero().flatten().tolist()
    if not rows:
        return []
    lengths = first_five(rows, lambda r: f"row {r}: {int(clean_real[r].sum())} vs {int(corrupted_real[r].sum())}")
    return warn_kept(f"the clean and corrupted tokens hold their real tokens in different columns in rows {rows} "
                     f"(real tokens, clean vs corrupted: {lengths}): prompts of different token lengths padded to "
                     f"one shape. The patch copies column {column} of each clean row into the same column of the "
                     "corrupted row, which there is another token's position; pick prompts of equal token length in "
                     "every row (swap words that are one token each)")


def steer_then_verbalize(
    base_model: TLModel,
    nla_or_av: NLA | ActivationVerbalizer,
    tokens: Int[Tensor, "batch pos"],
    *,
    steering_vector: Float[Tensor, " d_model"],
    scale: float,
    steer_layer: int,
    capture_layer: int | None = None,
    positions: PositionSpec = -1,
    steer_positions: PositionSpec | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    baseline: float | None = None,
    **verbalize_kwargs: Any,
) -> SteeringResult:
    """Run `tokens` without and with `scale * steering_vector` added at `blocks.{steer_layer}.hook_resid_post`
    (at `steer_positions`, default all), capture layer K (default: the NLA's) at `positions` in
    both runs, and verbalize both (round-trip them too when given an NLA).

    Steering at layer K itself moves the captured vector by exactly `scale * steering_vector`.
    Without `attention_mask`, `steer_positions` skip padding by the rule the capture uses.
    `baseline` is passed to the round trip: give a held-out set's for per-row FVEs that mean much.
    Other keywords go to `verbalize` (or the round trip). Sampled at `temperature > 0`, a site's clean and steered
    rows draw common random numbers (`verbalize`'s `draws_of`, set here), so readouts part only where the steering
    moved the vectors: equal vectors give the same sample and no added or removed words.
    """
    av = _verbalizer(nla_or_av)
    check_read_keywords(nla_or_av, verbalize_kwargs, "steer_then_verbalize")
    _check_draws_free(verbalize_kwargs, "steer_then_verbalize")
    check_base_model(base_model, nla_or_av, av.meta.layer)
    layer, notes = _capture_layer(base_model, av, capture_layer)
    d_model = base_model.cfg.d_model
    if isinstance(steering_vector, Tensor) and tuple(steering_vector.shape) not in ((d_model,), (1, d_model)):
        raise VectorError(f"steering_vector must be one [d_model] = [{d_model}] vector (it is added to the base "
                          f"model's residual stream), got shape {list(steering_vector.shape)}")
    vector = check_vectors(steering_vector, d_model, "steering_vector")
    steer_layer = _check_reaches(base_model, steer_layer, layer, "steer_layer")
    check_finite(scale=scale)
    check_token_ids(base_model, tokens)
    real = real_tokens(base_model, attention_mask, tokens)
    if steer_positions is not None:  # a site outside a row or on its padding is refused before either run
        _check_sites(steer_positions, tokens, real, "steer_positions", "steer")
    hook = (resid_post_name(steer_layer),
            steering_hook(vector[0], float(scale), steer_positions, None if real is None else real.long()))
    with torch.no_grad():
        clean = _capture_run(base_model, layer, positions, tokens, attention_mask, [])
        steered = _capture_run(base_model, layer, positions, tokens, attention_mask, [hook])
    steer_norm = abs(float(scale)) * float(vector.cpu().double().norm())  # float64 on the CPU: MPS has none
    _check_runs_finite(base_model, layer, clean, steered, steer_norm)
    if float(scale) != 0 and torch.equal(clean.vectors, steered.vectors):
        notes += warn_kept(
            f"the steering changed no captured residual: the steered run's layer-{layer} vectors equal the clean run's "
            "at every site. Steering at tokens after the captured positions cannot reach them (attention is causal), "
            f"and scale * steering_vector (norm {steer_norm:.3g}) below the residual's rounding adds nothing; steer "
            "at or before the captured tokens, or raise scale")
    n = len(clean.rows)
    verbalizations, fves, misses, round_trip = _read(
        nla_or_av, [("clean", clean), ("steered", steered)], baseline, verbalize_kwargs)
    cosines = torch.cosine_similarity(clean.vectors, steered.vectors, dim=-1).tolist()
    prompts = decoded_prompts(base_model, tokens, real)
    rows = []
    for i, site in enumerate(clean.rows):
        # One AV batch held clean then steered rows: a steered readout is given its own row i, not n + i.
        before, after = verbalizations[i], replace(verbalizations[n + i], index=i)
        added, removed = word_diff(_readout(before), _readout(after))
        rows.append(SteeringRow(site.batch, site.position, site.token, prompts[site.batch], before, after, added,
                                removed, cosines[i], fves[i], fves[n + i], misses[i], misses[n + i]))
    return SteeringResult(rows, clean.vectors, steered.vectors, round_trip, layer, steer_layer, float(scale),
                          _kept_warnings(notes, verbalizations, round_trip))


def _check_runs_finite(base_model: TLModel, layer: int, clean: Capture, steered: Capture, steer_norm: float) -> None:
    """NaN or Inf in a run's captured residuals, named by run and site with its likely cause: the AV refuses them
    anyway, but as rows of its joint batch of both runs (the steered ones numbered after the clean ones)."""
    dtype = next(base_model.parameters()).dtype
    for run, cap in (("clean", clean), ("steered", steered)):
        bad = directionless_rows(cap.vectors)[0]
        if not bad:
            continue
        sites = [(cap.rows[i].batch, cap.rows[i].position) for i in bad[:8]]
        cause = (f"the base model overflows in {dtype} on these tokens without steering; load it in float32 or "
                 "bfloat16" if run == "clean" else
                 f"adding scale * steering_vector (norm {steer_norm:.3g}) overflowed the base model's {dtype} "
                 "residual stream; lower scale or the vector's norm")
        raise VectorError(f"the {run} run's layer-{layer} residuals hold NaN or Inf at (batch, position) {sites}: "
                          f"{cause}")


def patching_study(
    base_model: TLModel,
    nla_or_av: NLA | ActivationVerbalizer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    *,
    patch_layer: int,
    patch_position: int,
    activation_name: str = "resid_pre",
    capture_layer: int | None = None,
    capture_position: PositionSpec = -1,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    baseline: float | None = None,
    **verbalize_kwargs: Any,
) -> PatchingStudy:
    """Patch one activation from the clean run into the corrupted run, then read all three runs out at layer K.

    Follows `transformer_lens.patching` (`get_act_patch_resid_pre` and friends): the activation is
    `utils.get_act_name(activation_name, patch_layer)` (default `blocks.{L}.hook_resid_pre`; `"embed"` with
    `patch_layer=0` is `hook_embed`, the token embedding before block 0, `"pos_embed"` `hook_pos_embed`), taken
    from `run_with_cache` on the clean tokens, and written into the corrupted run at column
    `patch_position` of every row (for `pattern` / `attn_scores`, `[batch, head, query, key]`: the
    query row `patch_position` of every head; a column that is padding in some row warns); clean and
    corrupted tokens have the same shape. The clean, corrupted and patched residuals at layer K
    (`capture_position`, default -1: each row's last real token) are verbalized (and round-tripped, with
    an NLA) in one batch.

    `attention_mask` marks the real tokens of both runs (they share a shape, and patching compares them
    column by column). Without it, padding is read from the pad tokens at either end of each, as the capture
    does; pass one (all ones for unpadded prompts) to keep a pad-id token at either end as a real token
    (Qwen's pad is `<|endoftext|>`, which ends documents).

    Other keywords go to `verbalize` (or the round trip). Sampled at `temperature > 0`, a site's clean, corrupted
    and patched rows draw common random numbers (`verbalize`'s `draws_of`, set here): a patch that leaves the
    corrupted vectors as they were reads out the corrupted run's sample.
    """
    av = _verbalizer(nla_or_av)
    check_read_keywords(nla_or_av, verbalize_kwargs, "patching_study")
    _check_draws_free(verbalize_kwargs, "patching_study")
    check_base_model(base_model, nla_or_av, av.meta.layer)
    layer, notes = _capture_layer(base_model, av, capture_layer)
    check_token_ids(base_model, clean_tokens, "clean_tokens")
    check_token_ids(base_model, corrupted_tokens, "corrupted_tokens")
    if clean_tokens.shape != corrupted_tokens.shape or clean_tokens.ndim != 2:
        raise InputError(
            f"clean {list(clean_tokens.shape)} and corrupted {list(corrupted_tokens.shape)} tokens must be "
            "[batch, pos] of one shape, as in transformer_lens.patching; pick prompts of equal token length"
        )
    patch_layer = _check_reaches(base_model, patch_layer, layer, "patch_layer")
    hook_name = _patch_hook_name(base_model, activation_name, patch_layer)
    width = clean_tokens.shape[1]
    if not is_integer(patch_position) or not -width <= int(patch_position) < width:
        raise InputError(f"patch_position must be an int column in -{width}..{width - 1}, got {patch_position!r}")
    column = int(patch_position) % width
    pairs = [(tokens, real_tokens(base_model, attention_mask, tokens)) for tokens in (clean_tokens, corrupted_tokens)]
    for tokens, real in pairs:  # the capture's own errors would call it "positions"
        _check_sites(capture_position, tokens, real, "capture_position", "read out")
    (_, clean_real), (_, corrupted_real) = pairs
    notes += _warn_patch_on_padding([clean_real, corrupted_real], column)
    if attention_mask is None:
        notes += _warn_unaligned_rows(clean_real, corrupted_real, column)
    with torch.no_grad():
        clean_mask = (backends.implicit_attention_mask(base_model, clean_tokens) if attention_mask is None
                      else attention_mask)
        with capture(base_model, layer, capture_position, attention_mask=attention_mask, tokens=clean_tokens) as clean:
            cached = backends.cached_activation(base_model, hook_name, clean_tokens, stop_at_layer=layer + 1,
                                                attention_mask=clean_mask)
        if cached is None:
            raise InputError(f"{hook_name} did not fire in the clean run; patch another activation_name")
        patch = (hook_name, _patch_hook(cached, column, _position_axis(hook_name)))
        corrupted = _capture_run(base_model, layer, capture_position, corrupted_tokens, attention_mask, [])
        patched = _capture_run(base_model, layer, capture_position, corrupted_tokens, attention_mask, [patch])
    runs: tuple[tuple[Literal["clean", "corrupted", "patched"], Capture], ...] = (
        ("clean", clean), ("corrupted", corrupted), ("patched", patched))
    verbalizations, fves, misses, round_trip = _read(nla_or_av, runs, baseline, verbalize_kwargs)
    n = len(clean.rows)
    clean_prompts, corrupted_prompts = (decoded_prompts(base_model, tokens, real) for tokens, real in pairs)
    prompts = {"clean": clean_prompts, "corrupted": corrupted_prompts, "patched": corrupted_prompts}
    rows = []
    for k, (run, cap) in enumerate(runs):
        cosines = torch.cosine_similarity(cap.vectors, clean.vectors, dim=-1).tolist()
        for i, site in enumerate(cap.rows):
            # One AV batch held the three runs: a readout is given its row i in its own run, not k * n + i.
            rows.append(PatchingRow(run, site.batch, site.position, site.token, prompts[run][site.batch],
                                    replace(verbalizations[k * n + i], index=i), fves[k * n + i], cosines[i],
                                    misses[k * n + i]))
    return PatchingStudy(rows, hook_name, clean.vectors, corrupted.vectors, patched.vectors, round_trip,
                         column, layer, _kept_warnings(notes, verbalizations, round_trip))


_BEFORE_BLOCKS = ("embed", "pos_embed")  # hook_embed / hook_pos_embed: model-level, before block 0
_ADDED_POSITIONS = ("standard", "shortformer")  # the positional_embedding_types that fire hook_pos_embed


def _short_name_of(base_model: TLModel, hook_name: str) -> tuple[str, str] | None:
    """The short name and block that `get_act_name` turns back into `hook_name`'s hook point, or None. A bridge's own
    name (`blocks.1.hook_out`, `blocks.1.ln2.hook_in`) is read through its TL alias (`resid_post`, `resid_mid`):
    its last part ('out', 'in') names another hook point or none."""
    hook_point = base_model.hook_dict.get(hook_name)
    aliases = [hook_name] if hook_point is None else [n for n, p in base_model.hook_dict.items() if p is hook_point]
    for name in aliases:
        short = name.rsplit(".", 1)[-1].removeprefix("hook_")
        block = re.match(r"blocks\.(\d+)\.", name)
        if short in _BEFORE_BLOCKS:
            built, layer = f"hook_{short}", "0"
        else:
            built, layer = get_act_name(short, int(block[1]) if block else 0), block[1] if block else "<block>"
        if built.endswith((".hook_in", ".hook_out")):  # a bridge's own name of a block's input or output, not TL's
            continue
        if built in base_model.hook_dict and (hook_point is None or base_model.hook_dict[built] is hook_point):
            return short, layer
    return None


def _patch_hook_name(base_model: TLModel, activation_name: str, patch_layer: int) -> str:
    """`get_act_name(activation_name, patch_layer)`, checked to be a hook point of `base_model` that takes writes,
    except for the embeddings, which TL names without a block (its `get_act_name("embed", 0)` says
    `blocks.0.hook_embed`, which no model has)."""
    if not isinstance(activation_name, str):  # else a bare TypeError from the `in` tests below
        raise InputError(f"activation_name must be the short name transformer_lens.utils.get_act_name takes (e.g. "
                         f"'resid_pre', 'attn_out', 'mlp_out', 'z', 'embed'), got {activation_name!r}")
    if "." in activation_name or activation_name.startswith("hook_"):  # get_act_name would nest it in blocks.L.hook_
        short_name = _short_name_of(base_model, activation_name)
        fix = (f"activation_name={short_name[0]!r}, patch_layer={short_name[1]}" if short_name else
               "no short name reaches it on this model, so patch another activation (e.g. 'resid_pre', "
               "'attn_out', 'mlp_out', 'z', 'embed')")
        raise InputError(f"activation_name={activation_name!r} is a full hook name; pass the short name "
                         f"transformer_lens.utils.get_act_name takes and the block apart: {fix}")
    if activation_name not in _BEFORE_BLOCKS:
        hook_name = get_act_name(activation_name, patch_layer)
    elif patch_layer != 0:
        raise InputError(f"activation_name={activation_name!r} is the embedding before block 0, so patch_layer must "
                         f"be 0, got {patch_layer}")
    else:
        hook_name = f"hook_{activation_name}"
    positions = base_model.cfg.positional_embedding_type
    if activation_name == "pos_embed" and positions not in _ADDED_POSITIONS:
        # A rotary model on the bridge still lists hook_pos_embed (its alias of the rotary module), which never fires.
        raise InputError(f"activation_name='pos_embed': this model has no position embedding to patch (its positions "
                         f"are {positions!r}, applied inside attention); patch activation_name='embed' or "
                         "'resid_pre' at patch_layer=0 instead")
    if hook_name not in base_model.hook_dict:
        raise InputError(f"activation_name={activation_name!r} at patch_layer={patch_layer} names {hook_name!r}, which "
                         "is not a hook point of this model; pass the short name transformer_lens.utils.get_act_name "
                         "takes (e.g. 'resid_pre', 'attn_out', 'mlp_out', 'z', 'embed') and the block as "
                         "patch_layer")
    setter = backends.switch_needed(base_model, hook_name)
    if setter is not None:
        raise InputError(f"{hook_name} would not fire: TransformerLens computes it only when asked "
                         f"(base_model.{setter}(True)); turn that on or patch another activation_name")
    backends.check_patchable(base_model, hook_name)
    return hook_name


def verbalize_direction(
    nla_or_av: NLA | ActivationVerbalizer,
    direction: Float[Tensor, "n d_model"],
    scale_like: Float[Tensor, "m d_model"] | None = None,
    **verbalize_kwargs: Any,
) -> DirectionVerbalization:
    """Verbalize arbitrary directions (a steering vector, an SAE decoder row, a probe weight).

    Only the direction reaches the AV. The Karvonen injection adds ``||h_p|| * v / ||v||`` (the
    marker residual's own norm, whatever ``||v||`` is); embedding replacement writes
    ``v * injection_scale / ||v||`` (the sidecar's injection_scale, whatever ``||v||`` is). So
    `scale_like` never changes an explanation: it rescales the returned `vectors` to the mean L2
    norm of the reference activations `scale_like` (e.g. real layer-K residuals), so that they can
    be stored, compared or round-tripped next to real activations.
    """
    av = _verbalizer(nla_or_av)
    check_read_keywords(av, verbalize_kwargs, "verbalize_direction")  # only verbalize runs, with an NLA too
    # A copy: `.float()` of a float32 direction is the caller's own tensor, which an edit of the result edited
    vectors = check_vectors(direction, av.meta.d_model, "direction", as_float32=True).detach().clone()
    if scale_like is not None:
        reference = check_vectors(scale_like, av.meta.d_model, "scale_like", as_float32=True)
        # In float64 (on the CPU: MPS has none), where every fp32 entry's square fits: an fp32 norm of entries ~1e-25
        # or ~1e25 underflows to 0 or overflows to inf, which made every returned vector zero or inf.
        target = float(reference.cpu().double().norm(dim=-1).mean())
        if target > torch.finfo(torch.float32).max:
            raise VectorError(f"scale_like's mean norm {target:.3g} is past float32's range, where the returned "
                              "vectors are kept; pass reference activations of a norm float32 holds")
        # metrics.rescale: a direction whose squared norm leaves fp32 (entries ~1e-25 or ~1e25) keeps its
        # direction instead of becoming NaN or zero, as the AV, which reads only the direction, keeps it.
        vectors = metrics.rescale(vectors, target)
    return DirectionVerbalization(vectors, av.verbalize(vectors, **verbalize_kwargs))


def word_diff(before: str, after: str) -> tuple[list[str], list[str]]:
    """(added, removed): the words `after` gains and loses relative to `before` (difflib on words).

    Words are compared without the quotes and punctuation around them ("mat." is "mat", '"be",' is "be"), so a
    moved comma is no change; a word of punctuation only is what its quotes hold (the quoted token '",".' is ",",
    which the toy's explanations name), and a lone quote or a bare comma is no word."""
    a, b = _words(before), _words(after)
    added: list[str] = []
    removed: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op != "equal":
            removed += a[i1:i2]
            added += b[j1:j2]
    return added, removed


def _words(text: str) -> list[str]:
    return [word for word in map(_word, text.split()) if word]


def _word(chunk: str) -> str:
    """A whitespace-split chunk as a word: the chunk without the punctuation around it; for a chunk of punctuation
    only, what its quotes hold; else "" (a lone quote, a bare comma)."""
    stripped = chunk.strip(_PUNCTUATION)
    if stripped:
        return stripped
    quoted = _QUOTED.fullmatch(chunk)
    return quoted.group(1) if quoted else ""


_PUNCTUATION = string.punctuation + "\u201c\u201d\u2018\u2019"  # ASCII and curly quotes
_QUOTED = re.compile("[\"'\u201c\u2018](.+?)[\"'\u201d\u2019][.,;:!?]*")  # '",".': a quoted token, then punctuation


def _readout(verbalization: Verbalization) -> str:
    """What a diff compares: the explanation, or the raw completion when it failed to parse."""
    return verbalization.text if verbalization.explanation is None else verbalization.explanation


def _position_axis(hook_name: str) -> int:
    """The token axis of a hook's activation: 2 (the query) in `[batch, head, query, key]` attention
    patterns and scores, 1 everywhere else."""
    return 2 if hook_name.endswith(("hook_pattern", "hook_attn_scores")) else 1


def _patch_hook(clean_activation: Tensor, position: int, axis: int = 1) -> HookFn:
    """TL's `layer_pos_patch_setter`: the clean activation at `position` (along `axis`) of every row."""
    index = (slice(None),) * axis + (position,)

    def hook(activation: Tensor, hook: HookPoint) -> Tensor:
        activation = activation.clone()
        activation[index] = clean_activation[index].to(activation.device)
        return activation

    return hook


def _capture_run(model: TLModel, layer: int, positions: PositionSpec, tokens: Tensor,
                 attention_mask: Tensor | None, fwd_hooks: list[tuple[str, HookFn]]) -> Capture:
    # Without a mask, the bridge attends to pads where HookedTransformer masks leading ones: run both alike.
    run_mask = backends.implicit_attention_mask(model, tokens) if attention_mask is None else attention_mask
    with capture(model, layer, positions, attention_mask=attention_mask, tokens=tokens) as cap:
        backends.run_with_hooks(model, tokens, attention_mask=run_mask, stop_at_layer=layer + 1, fwd_hooks=fwd_hooks)
    return cap


def _read(nla_or_av: NLA | ActivationVerbalizer, runs: Sequence[tuple[str, Capture]], baseline: float | None,
          verbalize_kwargs: dict[str, Any]
          ) -> tuple[list[Verbalization], list[float | None], list[bool | None], RoundTrip | None]:
    """Verbalizations, per-row FVEs (1 - mse_i / baseline) and whether each row scored the miss
    (`RoundTrip.misses`; None without an AR) of every run's captured vectors, in one AV batch, in the order of
    `runs`; the round trip's warnings name each row by its run and site. Site i of every run samples with the
    same random numbers (`verbalize`'s `draws_of`), so sampling noise alone does not part the runs' readouts."""
    vectors = torch.cat([cap.vectors for _, cap in runs])
    verbalize_kwargs = {**verbalize_kwargs, "draws_of": [i for _, cap in runs for i in range(len(cap.rows))]}
    if isinstance(nla_or_av, ActivationVerbalizer):
        return nla_or_av.verbalize(vectors, **verbalize_kwargs), [None] * len(vectors), [None] * len(vectors), None
    sites = [(run, row) for run, cap in runs for row in cap.rows]
    round_trip = nla_or_av.round_trip(vectors, baseline=baseline, name_rows=lambda rows: _name_run_sites(rows, sites),
                                      **verbalize_kwargs)
    fves: list[float | None] = [None] * len(vectors) if round_trip.fves is None else round_trip.fves.tolist()
    misses: list[bool | None] = list(round_trip.misses)
    return round_trip.verbalizations, fves, misses, round_trip


def _check_draws_free(verbalize_kwargs: dict[str, Any], where: str) -> None:
    """`draws_of` is the study's own: it pairs each site's rows across its runs."""
    if "draws_of" in verbalize_kwargs:
        raise InputError(f"{where} sets draws_of itself: site i of every run samples with the same random numbers, "
                         "so sampling noise alone does not part their readouts; drop draws_of")


def _name_run_sites(rows: Sequence[int], sites: Sequence[tuple[str, CapturedRow]]) -> str:
    """Rows of the joint AV batch of every run named as the table shows them: "steered run, batch 0 position 3
    (' cat')"; an index into that batch (the steered rows numbered after the clean ones) means nothing there."""
    def site(row: int) -> str:
        run, captured = sites[row]
        token = f" ({captured.token!r})" if captured.token else ""
        return f"{run} run, batch {captured.batch} position {captured.position}{token}"

    return first_five(rows, site)


def _capture_layer(base_model: TLModel, av: ActivationVerbalizer, capture_layer: int | None) -> tuple[int, list[str]]:
    """The layer to read out: the NLA's, or `capture_layer` with a warning (as `nla-lens --layer` warns), since the
    AV was trained on its own layer's vectors and the AR's baseline is that layer's; and the warning, if any."""
    if capture_layer is None:
        return av.meta.layer, []
    capture_layer = check_block(base_model, capture_layer, "capture_layer")
    if capture_layer == av.meta.layer:
        return capture_layer, []
    return capture_layer, warn_kept(
        f"capture_layer={capture_layer} differs from layer {av.meta.layer}, the one this NLA was trained to read (its "
        "sidecar): explanations of other layers are off-distribution, and FVEs against the AR sidecar's baseline are "
        f"that layer's. Leave capture_layer out to read layer {av.meta.layer}")


def _kept_warnings(notes: list[str], verbalizations: list[Verbalization], round_trip: RoundTrip | None) -> list[str]:
    """A study's own warnings, then its read-out's: the round trip's, or without an AR what `verbalize` warned of."""
    read = getattr(verbalizations, "warnings", []) if round_trip is None else round_trip.warnings
    return [*notes, *read]


def _verbalizer(nla_or_av: NLA | ActivationVerbalizer) -> ActivationVerbalizer:
    if isinstance(nla_or_av, NLA):
        return nla_or_av.av
    if isinstance(nla_or_av, ActivationVerbalizer):
        return nla_or_av
    raise InputError(f"expected an NLA or an ActivationVerbalizer, got {nla_type_name(nla_or_av)}")


def _check_reaches(base_model: TLModel, layer: int, capture_layer: int, name: str) -> int:
    """An intervention at block `layer` must run before the capture at `capture_layer`; `layer` as a Python int."""
    layer = check_block(base_model, layer, name)
    if layer > capture_layer:
        raise InputError(
            f"{name}={layer} comes after the captured layer {capture_layer}, so it cannot change what is "
            "captured; intervene at or before the NLA's layer"
        )
    return layer
