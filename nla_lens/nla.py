"""An AV and an AR trained as one NLA, and the round trip v -> text -> v_hat."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import torch
from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from nla_lens import loading, metrics
from nla_lens.checks import check_counts, check_keywords, counted, resolve_move, warn_at_caller
from nla_lens.display import format_number
from nla_lens.errors import CheckpointError, InputError, PairMismatchError, SidecarError
from nla_lens.injection import check_vectors, directionless_rows
from nla_lens.parsing import RowNamer, failed_parse_note, injection_warning, injection_warning_held, row_indices
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.results import TabularResult
from nla_lens.sidecar import InjectionSpec, NLAMeta, load_meta
from nla_lens.verbalizer import MAX_NEW_TOKENS, ActivationVerbalizer, Verbalization

if TYPE_CHECKING:
    from nla_lens.backends import TLModel
    from nla_lens.explain import ExplainPositions, Explanation


def check_pair(av_meta: NLAMeta, ar_meta: NLAMeta) -> None:
    """An AV and an AR form one NLA only if they share d_model and layer (readable before loading weights)."""
    for name in ("d_model", "layer"):
        if getattr(av_meta, name) != getattr(ar_meta, name):
            raise PairMismatchError(
                f"AV and AR disagree on {name} ({getattr(av_meta, name)} vs "
                f"{getattr(ar_meta, name)}): load the AR trained with this AV"
            )


def _check_roles(av_folder: Path, av_meta: NLAMeta, ar_folder: Path, ar_meta: NLAMeta) -> None:
    """`NLA.from_pretrained(av_path, ar_path)` got the two the other way round, or two of one role: said in this
    call's terms before any weight is read (each loader alone loaded the AV first, then said to call the other)."""
    av_role, ar_role = loading.checkpoint_role(av_folder, av_meta), loading.checkpoint_role(ar_folder, ar_meta)
    if av_role == "ar" and ar_role != "ar":
        raise PairMismatchError(f"NLA.from_pretrained(av_path, ar_path) was given the AR first ({av_folder}) and the "
                                f"AV second ({ar_folder}): swap them")
    if av_role == "ar":
        raise SidecarError(f"av_path {av_folder} is an AR checkpoint, not an AV, as is ar_path {ar_folder}: pass the "
                           "AV trained with this AR as av_path")
    if ar_role == "av":
        raise SidecarError(f"ar_path {ar_folder} is an AV checkpoint, not an AR: pass the AR trained with this AV as "
                           "ar_path")
    if ar_role is None:  # no role in the sidecar (nanoNLA) and no readout: an AV, or an AR missing its readout
        loading.readout_file(ar_folder)


# Explanation-like text: words, digits, punctuation, casing. Its token strings map to the same ids in two
# tokenizers of one base, whatever their options (add_prefix_space, an added marker token); tokenizers of
# different families (Qwen, Gemma, Llama) map them to other ids or none. Bases that share one tokenizer (Llama
# 3.1 and 3.3) agree; for an AV and an AR the sidecars' base names tell those apart (`warn_if_bases_differ`).
_VOCAB_PROBE = "The speaker, ANTONIO, asks whether 3 sailors can't hear him: 'Boatswain!' (twice)."


def shares_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether each tokenizer's pieces of a probe text have the same ids in the other: copies of one base
    do; a mixed pair or a base of another family (same width and depth) does not, and would run without an
    error on ids that mean other words. Compares vocabularies, not splitting options."""
    for x, y in ((a, b), (b, a)):
        pieces = x.tokenize(_VOCAB_PROBE)
        if x.convert_tokens_to_ids(pieces) != y.convert_tokens_to_ids(pieces):
            return False
    return True


def check_vocabularies(av_tokenizer: PreTrainedTokenizerBase, ar_tokenizer: PreTrainedTokenizerBase) -> None:
    """The AR reads the text the AV writes: from another base's tokenizer its ids would be other words."""
    if not shares_vocabulary(av_tokenizer, ar_tokenizer):
        raise PairMismatchError(
            f"the AV's and the AR's tokenizers have different vocabularies (the AV's has {len(av_tokenizer)} "
            f"tokens, the AR's {len(ar_tokenizer)}): they are copies of different bases; load the AR trained "
            "with this AV")


def _warn_if_stages_differ(av_meta: NLAMeta, ar_meta: NLAMeta) -> None:
    """An SFT AV with an RL AR runs, but scores a pair that was never trained together. Only the model
    dialect's `stage` names the training stage (the dataset dialect's names its data, e.g. 'ar_sft')."""
    if av_meta.kind != "nla_model" or ar_meta.kind != "nla_model":
        return
    stages = av_meta.raw.get("stage"), ar_meta.raw.get("stage")
    if None not in stages and stages[0] != stages[1]:
        warn_at_caller(f"the AV is from training stage {stages[0]!r} and the AR from {stages[1]!r}: they were not "
                       "trained together; load both from one stage")


def warn_if_bases_differ(av_meta: NLAMeta, ar_meta: NLAMeta) -> None:
    """Two bases of one width and depth pass `check_pair`; the sidecars' recorded base names tell them
    apart. A warning, not an error, since a renamed folder is not a different model."""
    av_base, ar_base = av_meta.base_model, ar_meta.base_model
    if av_base is not None and ar_base is not None and not _name_one_base(av_base, ar_base):
        warn_at_caller(f"the AV's sidecar names base model {av_base!r} and the AR's {ar_base!r}, which are not one "
                       "folder here: an NLA's AV and AR are copies of one base. Load the AR trained with this AV, "
                       "or ignore this if both name the same base")


def _name_one_base(a: str, b: str) -> bool:
    """Same last path part (a hub id and a local copy of it: "Qwen/Qwen3-8B", "/models/qwen3-8b"), or the same
    folder here (the toy's base by its name and by its path, a folder and a link to it)."""
    if Path(a).name.lower() == Path(b).name.lower():
        return True
    try:
        return loading.named_base_folder(a).resolve() == loading.named_base_folder(b).resolve()
    except CheckpointError:
        return False


def check_read_keywords(nla_or_av: NLA | ActivationVerbalizer, keywords: Iterable[str], where: str) -> None:
    """Refuse a keyword the closing `verbalize` (or, with an NLA, `round_trip`) call would reject, before the
    base-model runs an experiment makes first."""
    accepted = set(inspect.signature(ActivationVerbalizer.verbalize).parameters) - {"self", "vectors"}
    passed_to = "verbalize"
    if isinstance(nla_or_av, NLA):
        # bound by the experiment itself (its baseline, how its warnings name its rows), never passed through
        own = {"self", "vectors", "baseline", "name_rows", "verbalize_kwargs"}
        accepted |= set(inspect.signature(NLA.round_trip).parameters) - own
        passed_to = "round_trip"
    check_keywords(keywords, accepted, where, passed_to)


def nla_type_name(got: object) -> str:
    """`got`'s type for the error of an entry point that takes an NLA; the bundled toy (`nl.toy.load()`), which holds
    an AV and an AR without being an NLA, is pointed to its `.nla`."""
    name = type(got).__name__
    holds_pair = (isinstance(getattr(got, "av", None), ActivationVerbalizer)
                  and isinstance(getattr(got, "ar", None), ActivationReconstructor))
    return f"{name} (the bundled toy, not an NLA itself: pass toy.nla)" if holds_pair else name


MIN_BASELINE_VECTORS = 32  # fewer vectors than this give a paper baseline too noisy to divide by


@dataclass(frozen=True)
class Baseline:
    """The FVE denominator a round trip used, where it came from, and how many vectors it rests on.

    Attributes:
        value: the baseline; None when no baseline can be trusted, so no FVE.
        source: "given", "sidecar (held-out)", "paper (these vectors)" or "none".
        n: how many vectors a sidecar or paper baseline rests on (None for a given one).
        warning: why there is no baseline and how to get one; None when there is one.
    """

    value: float | None
    source: str
    n: int | None = None
    warning: str | None = None


def check_baseline(given: float | Tensor) -> float:
    """A caller's FVE baseline as a float, checked: `nla-lens explain` checks its `--baseline` so before any weight
    is read, where `explain` would meet it only after the base model's forward."""
    if isinstance(given, Tensor) and given.numel() == 1:  # e.g. a baseline computed in torch
        given = given.item()
    # numbers.Real takes numpy scalars too; inf would make every FVE 1.0
    if isinstance(given, bool) or not isinstance(given, numbers.Real) or not 0 < given < math.inf:
        raise InputError(f"baseline={given!r} must be a positive finite number (a held-out set's paper baseline)")
    return float(given)


def resolve_baseline(vectors: Float[Tensor, "n d_model"], mse_scale: float, given: float | None = None,
                     recorded: NLAMeta | None = None) -> Baseline:
    """The caller's baseline, else the one recorded in the sidecar at export, else the paper baseline of
    `vectors` if there are at least `MIN_BASELINE_VECTORS` of them, else none (FVE None, with a warning)."""
    if given is not None:
        return Baseline(check_baseline(given), "given")
    if recorded is not None and recorded.fve_baseline is not None:
        return Baseline(recorded.fve_baseline, "sidecar (held-out)", recorded.fve_baseline_n)
    n = vectors.shape[0]
    problem = f"{n} vector{' is' if n == 1 else 's are'} too few for one (need >= {MIN_BASELINE_VECTORS})"
    if n >= MIN_BASELINE_VECTORS:
        value = metrics.paper_baseline(vectors, mse_scale)
        # Rescaled rows have mean square mse_scale^2 / d per dim; a spread far below that is rounding noise.
        if value > 1e-6 * mse_scale**2 / vectors.shape[1]:
            return Baseline(value, "paper (these vectors)", n)
        problem = f"these {n} vectors all point the same way (their paper baseline is {value:.2g})"
    return Baseline(None, "none", warning=(
        f"no FVE: the AR's sidecar records no held-out baseline and {problem}. Pass baseline= "
        "(metrics.paper_baseline of a few hundred held-out layer-K vectors; about 0.56 for Qwen3-8B layer-24 "
        "vectors), or score more vectors at once."))


@dataclass(frozen=True, eq=False, repr=False)
class RoundTrip(TabularResult):
    """Scores of one round trip. A failed parse scores as a miss (an orthogonal guess); see `NLA.round_trip`.

    `fve` and `fves` are None when no baseline could be trusted (see `resolve_baseline`); `warnings`
    then says how to get one. The result is the record of its warnings: they are not also emitted with
    `warnings.warn` (the `nla-lens` commands print them).

    Attributes:
        verbalizations: the AV's output for each vector, in the order of the vectors.
        reconstructions: the AR's vector for each explanation; NaN rows where the explanation failed to parse or
            its AR prompt is over the AR's n_ctx.
        mse: per row, of the vectors rescaled to mse_scale; a failed parse, an explanation the AR cannot read within
            its n_ctx, or a reconstruction with no direction (NaN, Inf or zero), scores `metrics.miss_mse`.
        mean_mse: the mean of `mse`.
        fve: 1 - mean_mse / baseline; None without a trustworthy baseline.
        baseline: the FVE denominator; None when there is none.
        baseline_source: "given", "sidecar (held-out)", "paper (these vectors)" or "none".
        n_failed_parses: rows whose completion had no parseable explanation.
        warnings: what to check before trusting the scores: outputs that look like a failed injection,
            explanations too long for the AR, reconstructions with no direction, explanations whose sample ran on
            to max_new_tokens after closing its tag (scored, though RL scores them as misses), no baseline (and
            how to get one).
        fves: per-row FVE, 1 - mse_i / baseline; None without a baseline.
        baseline_n: how many vectors a sidecar or paper baseline rests on.
    """

    verbalizations: list[Verbalization]
    reconstructions: Float[Tensor, "n d_model"]
    mse: Float[Tensor, " n"]
    mean_mse: float
    fve: float | None
    baseline: float | None
    baseline_source: str
    n_failed_parses: int
    warnings: list[str] = field(default_factory=list)
    fves: Float[Tensor, " n"] | None = None
    baseline_n: int | None = None

    display_columns = ("index", "explanation", "parsed", "mse", "fve")
    schema = pa.schema({"index": pa.int64(), "explanation": pa.string(), "parsed": pa.bool_(), "text": pa.string(),
                        "truncated": pa.bool_(), "mse": pa.float64(), "fve": pa.float64(), "miss": pa.bool_()})
    warnings_at = "warnings"

    @property
    def explanations(self) -> list[str | None]:
        """Each vector's parsed explanation, None where the AV's text did not parse (it scores as a miss)."""
        return [v.explanation for v in self.verbalizations]

    @property
    def misses(self) -> list[bool]:
        """Per row, whether it scored `metrics.miss_mse` (see `NLA.score`): a failed parse, an explanation the AR
        cannot read within its n_ctx, a reconstruction with no direction. Those are the rows whose reconstruction
        has no direction (NaN, Inf or zero), which the tables mark "miss" (the record's `miss`)."""
        missed = scored_misses(self.reconstructions)
        return [i in missed for i in range(len(self.verbalizations))]

    def to_records(self) -> list[dict[str, Any]]:
        fves = [None] * len(self.mse) if self.fves is None else self.fves.tolist()
        return [{"index": i, "explanation": v.explanation, "parsed": v.explanation is not None, "text": v.text,
                 "truncated": v.truncated, "mse": mse, "fve": fve, "miss": miss}
                for i, (v, mse, fve, miss) in enumerate(zip(self.verbalizations, self.mse.tolist(), fves, self.misses,
                                                            strict=True))]

    def summary(self) -> str:
        return (f"{counted(len(self.verbalizations), 'vector')}, mean MSE {format_number(self.mean_mse)}, "
                f"{baseline_phrase(self.fve, self.baseline, self.baseline_source, self.baseline_n)}, "
                f"{counted(self.n_failed_parses, 'failed parse')}{failed_parse_note(self.verbalizations)}")


def baseline_phrase(fve: float | dict[str, float] | None, baseline: float | None, source: str,
                    n: int | None) -> str:
    """"FVE 0.812 (baseline 0.801, sidecar (held-out), n=1982)", or why there is no FVE. `fve` may name
    several runs scored at one baseline: "FVE clean 0.734, steered 0.477 (baseline ...)"."""
    if fve is None or baseline is None:
        return "no FVE (no baseline: pass baseline=)"
    scores = (format_number(fve) if isinstance(fve, float)
              else ", ".join(f"{run} {format_number(value)}" for run, value in fve.items()))
    return f"FVE {scores} (baseline {format_number(baseline)}, {source}{'' if n is None else f', n={n}'})"


def warn_kept(message: str) -> list[str]:
    """`message` emitted at the user's line and returned, for the result to keep: a notebook's repr and view and a
    saved `.parquet` then still say it, as they say the round trip's warnings."""
    warn_at_caller(message)
    return [message]


# Why a parsed explanation's reconstruction has no direction, and what to do about it.
DIRECTIONLESS_CAUSE = ("the AR's forward overflowed its dtype (load it in bfloat16 or float32 rather than float16) "
                       "or a hook on ar.model broke it")


def scored_misses(reconstructions: Float[Tensor, "n d_model"]) -> set[int]:
    """The rows `NLA.score` scored `metrics.miss_mse`: it leaves each of them (a failed parse, an explanation too
    long for the AR, a reconstruction with no direction) a reconstruction with no direction (NaN, Inf or zero)."""
    non_finite, zero = directionless_rows(reconstructions)
    return {*non_finite, *zero}


def rows_the_ar_reads(ar: ActivationReconstructor, explanations: Sequence[str | None]) -> tuple[
        list[int], list[int]]:
    """The rows whose parsed explanation (None: a failed parse) the AR reads, and the parsed rows whose AR prompt is
    over its n_ctx, which `NLA.score` and RL's reward score as misses. `check_sample_fits` bounds the tokens the AV
    samples, not its text retokenized: a sampled token holding a split character's stray bytes decodes to U+FFFD,
    which a byte-level BPE may take back as up to three tokens."""
    parsed = [i for i, e in enumerate(explanations) if e is not None]
    fits = ar.prompts_fit([cast(str, explanations[i]) for i in parsed])
    return ([i for i, ok in zip(parsed, fits, strict=True) if ok],
            [i for i, ok in zip(parsed, fits, strict=True) if not ok])


def miss_warnings(ar: ActivationReconstructor, verbalizations: Sequence[Verbalization],
                  reconstructions: Float[Tensor, "n d_model"], first_row: int = 0,
                  name_rows: RowNamer = row_indices) -> list[str]:
    """The parsed rows `NLA.score` scored as misses, named by `name_rows` (numbered from `first_row`: a shard's place
    in its input): explanations the AR cannot read within its n_ctx, reconstructions with no direction."""
    read, too_long = rows_the_ar_reads(ar, [v.explanation for v in verbalizations])
    notes = [too_long_warning(too_long, len(verbalizations), ar.model.cfg.n_ctx, first_row, name_rows),
             directionless_warning(reconstructions, read, first_row, name_rows)]
    return [note for note in notes if note]


def too_long_warning(rows: Sequence[int], n: int, n_ctx: int, first_row: int = 0,
                     name_rows: RowNamer = row_indices, *, consequence: str = "scored as misses") -> str | None:
    """Rows whose explanation the AR cannot read within its n_ctx (`rows_the_ar_reads`), which `NLA.score` scored as
    misses (`consequence` says what they get where nothing is scored)."""
    if not rows:
        return None
    shown = name_rows([first_row + i for i in rows])
    return (f"{len(rows)}/{n} explanations make AR prompts over the AR's n_ctx={n_ctx} ({shown}), {consequence}: "
            "their text retokenizes to more tokens than the AV sampled (a sampled token holding stray bytes of a "
            "split character decodes to U+FFFD, which may tokenize as three); read their `text`")


def directionless_warning(reconstructions: Float[Tensor, "n d_model"], read: Sequence[int], first_row: int = 0,
                          name_rows: RowNamer = row_indices, *, consequence: str = "scored as misses") -> str | None:
    """A warning naming the rows the AR read (`read`, numbered from `first_row`) whose reconstruction has no direction
    (NaN, Inf or zero), which `NLA.score` scored as misses (`consequence` says what they get where nothing is
    scored); None when there are none."""
    rows = sorted(first_row + i for i in scored_misses(reconstructions) & set(read))
    if not rows:
        return None
    return (f"{len(rows)}/{len(reconstructions)} reconstructions have no direction (NaN, Inf or zero; "
            f"{name_rows(rows)}), {consequence}: {DIRECTIONLESS_CAUSE}")


def ran_on_warning(rows: Sequence[int], n: int, name_rows: RowNamer = row_indices, *,
                   consequence: str = "the round trip scores them") -> str | None:
    """Of `n` rows, the `rows` whose explanation closed its tag but whose sample reached max_new_tokens without the
    AV's EOS (`Verbalization.truncated`): round trips score them by the paper's parse rule, RL's reward (the
    recipe's) as misses, so the two disagree on them (`consequence` says what they get where nothing is scored)."""
    if not rows:
        return None
    return (f"{len(rows)}/{n} explanations closed their tag but the AV did not end the sample before max_new_tokens "
            f"({name_rows(rows)}): {consequence}, by the paper's parse rule, where RL's reward scores such samples "
            "as misses. A larger max_new_tokens lets a tag closed at the cap end with EOS; what the AV wrote on "
            "after its tag is in the row's `text`")


class NLA:
    """The AV/AR pair; checks at construction that they share d_model and layer, and that their tokenizers share
    a vocabulary (the AR reads what the AV writes)."""

    def __init__(self, av: ActivationVerbalizer, ar: ActivationReconstructor) -> None:
        if isinstance(av, ActivationReconstructor) and isinstance(ar, ActivationVerbalizer):
            raise PairMismatchError("NLA(av, ar) was given the AR first and the AV second: swap them")
        if not isinstance(av, ActivationVerbalizer) or not isinstance(ar, ActivationReconstructor):
            raise InputError(f"NLA(av, ar) takes an ActivationVerbalizer and an ActivationReconstructor, got "
                             f"{type(av).__name__} and {type(ar).__name__}")
        check_pair(av.meta, ar.meta)
        check_vocabularies(av.tokenizer, ar.tokenizer)
        _warn_if_stages_differ(av.meta, ar.meta)
        warn_if_bases_differ(av.meta, ar.meta)
        self.av = av
        self.ar = ar

    @classmethod
    def from_pretrained(cls, av_path: str | Path, ar_path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, backend: str | None = None,
                        injection: InjectionSpec | str | None = None, hook_point: str | None = None,
                        trust_remote_code: bool = False, tokenizer: PreTrainedTokenizerBase | None = None) -> NLA:
        """Load an AV and its AR (folders or cached hub ids), checking that they pair before reading weights.

        `injection`, `hook_point` and `tokenizer` are the AV's, as `ActivationVerbalizer.from_pretrained` takes
        them; `trust_remote_code` applies to both. Each tokenizer is loaded and checked against its sidecar once,
        for the pair's check and its model.
        """
        av_folder, ar_folder = loading.resolve_checkpoint(av_path), loading.resolve_checkpoint(ar_path)
        av_meta, ar_meta = load_meta(av_folder), load_meta(ar_folder)
        return cls._from_folders(av_folder, av_meta, ar_folder, ar_meta, device=device, dtype=dtype, backend=backend,
                                 injection=injection, hook_point=hook_point, trust_remote_code=trust_remote_code,
                                 tokenizer=tokenizer, checked_av_tokenizer=None)

    @classmethod
    def _from_folders(cls, av_folder: Path, av_meta: NLAMeta, ar_folder: Path, ar_meta: NLAMeta, *,
                      device: str | torch.device, dtype: torch.dtype | str, backend: str | None = None,
                      injection: InjectionSpec | str | None = None, hook_point: str | None = None,
                      trust_remote_code: bool = False, tokenizer: PreTrainedTokenizerBase | None = None,
                      checked_av_tokenizer: PreTrainedTokenizerBase | None = None) -> NLA:
        """`from_pretrained` of resolved folders and their parsed sidecars. `checked_av_tokenizer`: the AV folder's
        tokenizer already checked against its sidecar (the CLI checks it for the base), not checked again."""
        _check_roles(av_folder, av_meta, ar_folder, ar_meta)
        check_pair(av_meta, ar_meta)
        # A given tokenizer is checked before the pair's vocabularies: another model's is the argument's fault
        av_tokenizer = (loading.checkpoint_tokenizer(av_folder, av_meta, "av", tokenizer,
                                                     trust_remote_code=trust_remote_code)
                        if checked_av_tokenizer is None else checked_av_tokenizer)
        ar_tokenizer = loading.checkpoint_tokenizer(ar_folder, ar_meta, "ar", trust_remote_code=trust_remote_code)
        check_vocabularies(av_tokenizer, ar_tokenizer)
        av = ActivationVerbalizer._from_folder(
            av_folder, av_meta, device=device, dtype=dtype, injection=injection, hook_point=hook_point,
            trust_remote_code=trust_remote_code, backend=backend, tokenizer=None, checked_tokenizer=av_tokenizer)
        ar = ActivationReconstructor._from_folder(
            ar_folder, ar_meta, device=device, dtype=dtype, trust_remote_code=trust_remote_code, backend=backend,
            tokenizer=None, checked_tokenizer=ar_tokenizer)
        return cls(av, ar)

    def to(self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | str | None = None) -> NLA:
        """Move the AV and the AR (model and readout) to `device` and / or cast them to `dtype` in place, and return
        the NLA, as torch's `Module.to` does: `nla.to("cuda")`, `nla.to(torch.float64)`, `nla.to("cuda", "bf16")`.

        Both are checked as `from_pretrained` checks them (no 'meta', no float8, a device this torch can use), and
        both models before either moves: a refused move changes nothing. TransformerLens's `cfg.device` and
        `cfg.dtype` follow, so `model.to_tokens` and `generate` agree, and the rotary tables are computed afresh as a
        load computes them. A cast gives what a load in that dtype gives where the weights as loaded hold the
        checkpoint's (the float32 toy cast to float64 matches a float64 load to the bit), but not for Gemma-3 on the
        hooked backend, whose norms keep float32 weights through a cast and whose embedding the loader scaled in the
        load's dtype; a cast to a narrower dtype and back keeps the narrower one's rounding. Load in the dtype you
        want for the checkpoint's own weights. The bridge backend (TransformerLens 4.x) moves between devices only: a
        cast there is a `BackendError` (load again with `dtype=`)."""
        device, dtype = resolve_move(device, dtype)
        for part in (self.av, self.ar):
            part._check_movable(dtype)
        for part in (self.av, self.ar):
            part._move(device, dtype)
        return self

    def __repr__(self) -> str:
        return f"NLA(\n  av={self.av!r},\n  ar={self.ar!r})"

    @property
    def mse_scale(self) -> float:
        """The norm both vectors are rescaled to before MSE / FVE (the AR sidecar's)."""
        return self.ar.meta.mse_scale

    @property
    def layer(self) -> int:
        """Layer K: the NLA reads `blocks.K.hook_resid_post` of the base model."""
        return self.av.meta.layer

    def explain(self, base: TLModel, text_or_texts: str | Sequence[str], *, positions: ExplainPositions = None,
                baseline: float | None = None, fwd_hooks: Sequence[tuple[str, Any]] = (),
                **verbalize_kwargs: Any) -> Explanation:
        """Explain every token but a BOS the tokenizer adds (or `positions`) of one or more texts: one row per token
        with its explanation, round-trip MSE and FVE. Runs `base` under any hooks you have installed, plus
        `fwd_hooks`.

        `positions`: an int, a list of ints (negative from each text's end; or a 0-d / 1-d integer tensor or NumPy
        array) or a slice, for every text; each
        text's rows come in token order. `baseline`: the FVE baseline (default: as `round_trip` picks it, the AR
        sidecar's, else the paper baseline of the explained tokens' vectors when there are at least 32). Other
        keywords go to `verbalize` (`max_new_tokens`, `batch_size`, ...). This is `nla_lens.explain.explain`."""
        from nla_lens.explain import explain

        return explain(self, base, text_or_texts, positions=positions, baseline=baseline, fwd_hooks=fwd_hooks,
                       **verbalize_kwargs)

    def round_trip(self, vectors: Float[Tensor, "n d_model"], *, baseline: float | None = None,
                   reconstruct_batch_size: int = 64, name_rows: RowNamer = row_indices,
                   **verbalize_kwargs: Any) -> RoundTrip:
        """Verbalize, reconstruct and score `vectors` (`[n, d_model]`, or one `[d_model]` vector).

        Other keywords go to `verbalize` (`max_new_tokens`, `temperature`, `batch_size`, `seed`, ...);
        `reconstruct_batch_size` bounds the AR's batches. `name_rows` names the rows a warning is about, given
        their indices in `vectors` (default "rows [0, 2]"; `explain` names each row's text, position and token).

        The FVE baseline is `baseline` if given, else the one the AR's sidecar records (nla_lens's
        exporter writes the held-out one), else the paper baseline of `vectors` when there are at least
        32 of them; otherwise `fve` is None and `warnings` says how to get one (for Qwen3-8B
        layer-24 vectors: about 0.56).

        Scoring follows the paper's parse rule (`score`): a parsed explanation is reconstructed, an empty one
        (`<explanation></explanation>`) too, as the paper's critic and RL's reward read it, and so is one whose
        sample ran on to `max_new_tokens` after closing its tag, which RL's reward scores as a miss: `warnings`
        names those rows. Raises `PromptTooLongError` before verbalizing when an AR prompt holding a sample of
        `max_new_tokens` tokens would not fit the AR's n_ctx (`check_sample_fits`, RL's rule).
        """
        max_new_tokens = verbalize_kwargs.get("max_new_tokens", MAX_NEW_TOKENS)
        check_counts(1, reconstruct_batch_size=reconstruct_batch_size, max_new_tokens=max_new_tokens)
        vectors = check_vectors(vectors, self.av.meta.d_model, as_float32=True)
        resolved = resolve_baseline(vectors, self.mse_scale, baseline, self.ar.meta)  # before the expensive part
        self.ar.check_reads_samples(max_new_tokens)
        with injection_warning_held():  # reported once on the result instead
            verbalizations = self.av.verbalize(vectors, **verbalize_kwargs)
        reconstructions, mse = self.score(vectors, verbalizations, reconstruct_batch_size=reconstruct_batch_size)
        ran_on = [i for i, v in enumerate(verbalizations) if v.truncated and v.explanation is not None]
        notes = [w for w in [injection_warning([v.text for v in verbalizations], self.av.meta.injection_char,
                                               name_rows),
                             *miss_warnings(self.ar, verbalizations, reconstructions, name_rows=name_rows),
                             ran_on_warning(ran_on, len(verbalizations), name_rows), resolved.warning] if w]
        n_failed = sum(v.explanation is None for v in verbalizations)
        value = resolved.value
        return RoundTrip(verbalizations, reconstructions, mse, float(mse.mean()),
                         None if value is None else metrics.fve(mse, value), value, resolved.source, n_failed,
                         notes, None if value is None else 1.0 - mse / value, resolved.n)

    def score(self, vectors: Float[Tensor, "n d_model"], verbalizations: list[Verbalization], *,
              reconstruct_batch_size: int = 64) -> tuple[Float[Tensor, "n d_model"], Float[Tensor, " n"]]:
        """Reconstruct each parsed explanation and score it against its vector.

        Returns the reconstructions (NaN rows where none was made) and the per-row MSE, where a failed
        parse scores `metrics.miss_mse`, and so do an explanation whose AR prompt is over the AR's n_ctx (left out
        rather than refused after the AV's work: `rows_the_ar_reads`) and a reconstruction with no direction (NaN,
        Inf or zero: an AR that overflowed its dtype, or a hook on `ar.model`), as RL's rewards score it: its MSE
        would be NaN, and so the mean MSE and FVE of every row. Every parsed explanation that fits is scored, an
        empty one and one whose sample ran on to `max_new_tokens` included (the paper's parse rule).
        `miss_warnings` names the parsed rows scored as misses. The one scoring rule of
        `round_trip` and of sharded jobs.
        """
        vectors = vectors.float()
        scale = self.mse_scale
        read, _ = rows_the_ar_reads(self.ar, [v.explanation for v in verbalizations])
        reconstructions = torch.full_like(vectors, float("nan"))
        miss = metrics.miss_mse(self.av.meta.d_model, scale)
        mse = torch.full((len(vectors),), miss)
        if read:
            texts = [cast(str, verbalizations[i].explanation) for i in read]
            predicted = self.ar.reconstruct(texts, batch_size=reconstruct_batch_size).to(vectors.device)
            reconstructions[read] = predicted
            scored = metrics.mse_per_item(predicted, vectors[read], scale).cpu()
            mse[read] = torch.where(scored.isfinite(), scored, miss)  # the targets have one (check_vectors)
        return reconstructions, mse
