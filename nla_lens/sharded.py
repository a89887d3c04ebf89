"""Sharded batch jobs: verbalize or round-trip a vector file, in one process or many under torchrun.

Rank r of W computes shards r, r+W, ... (see `nla_lens.shard_store`), skipping those already on
disk, then waits for the others; rank 0 merges once every shard exists. A killed or failed run is
finished by rerunning the same call; `shards=[...]` computes only the chosen shards not yet on disk (a
straggler's, say, in one process).
"""

from __future__ import annotations

import hashlib
import json
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from nla_lens import __version__, loading, metrics, shard_store
from nla_lens.checks import (
    check_counts,
    check_sampling,
    counted,
    file_kind,
    file_path,
    resolve_device,
    resolve_dtype,
)
from nla_lens.display import format_number
from nla_lens.distributed import World, barrier, device_for, process_group
from nla_lens.errors import CheckpointError, InputError
from nla_lens.injection import check_vectors
from nla_lens.nla import (
    NLA,
    baseline_phrase,
    check_pair,
    miss_warnings,
    ran_on_warning,
    resolve_baseline,
    scored_misses,
    warn_at_caller,
)
from nla_lens.parsing import injection_warning, injection_warning_held
from nla_lens.reconstructor import ActivationReconstructor, check_sample_fits
from nla_lens.results import RESULT_KEY
from nla_lens.sidecar import SIDECAR_NAME, NLAMeta, load_meta
from nla_lens.vector_files import VectorTable, check_output, json_text, read_input, write_json, write_table
from nla_lens.verbalizer import MAX_NEW_TOKENS, ActivationVerbalizer, Verbalization

_ARGUMENTS = {"av": "av=", "ar": "ar="}  # the checkpoint arguments, as `loading.nla_checkpoint`'s messages name them


def batches_matter(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether greedy rows (and the AR's scores) may change with the batch size. They were proven identical at
    every batch size on the CPU in float32 only; a GPU's kernels, or bf16 anywhere, may round otherwise."""
    return not (device.type == "cpu" and dtype == torch.float32)


@dataclass(frozen=True)
class Sampling:
    """How the AV decodes. With temperature > 0 each shard samples from its own seeded generator."""

    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        """Checked, and kept as Python numbers: a NumPy or tensor setting showed as `np.int64(5)` in the repr and
        went into the manifest's JSON as such."""
        max_new_tokens, batch_size = check_sampling(self.temperature, self.top_p, self.max_new_tokens,
                                                    self.batch_size, self.seed)
        plain = {"max_new_tokens": max_new_tokens, "temperature": float(self.temperature), "top_p": float(self.top_p),
                 "seed": self.seed if self.seed is None else int(self.seed), "batch_size": batch_size}
        for name, value in plain.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    def facts(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The settings a finished shard depends on, as the manifest's JSON holds them. Greedy rows depend on the
        batch size only where `batches_matter`."""
        facts: dict[str, Any] = {"device": device.type, "max_new_tokens": self.max_new_tokens,
                                 "temperature": self.temperature}
        if self.temperature > 0:
            facts |= {"top_p": self.top_p, "seed": self.seed}
        if self.temperature > 0 or batches_matter(device, dtype):
            facts["batch_size"] = self.batch_size
        return facts

    def verbalize(self, av: ActivationVerbalizer, vectors: Float[torch.Tensor, "n d_model"],
                  shard: int) -> list[Verbalization]:
        with injection_warning_held():  # checked once over every row at the merge
            return av.verbalize(vectors, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                top_p=self.top_p, batch_size=self.batch_size, seed=shard_seed(self.seed, shard),
                                progress=False)


@dataclass(frozen=True)
class RoundTripSummary:
    """Round-trip scores over the union of every shard's rows, as `NLA.round_trip` defines them."""

    n_rows: int
    mean_mse: float
    fve: float | None  # None without a trustworthy baseline (see nla.resolve_baseline)
    baseline: float | None
    baseline_source: str  # "given", "sidecar (held-out)", "paper (these vectors)" (all input vectors) or "none"
    n_failed_parses: int
    # Rows scored `metrics.miss_mse` (the `miss` column, `RoundTrip.misses`'s rule): the failed parses included, with
    # explanations too long for the AR and reconstructions with no direction
    n_misses: int
    n_truncated: int  # rows `max_new_tokens` cut before any EOS (rows of shards an older nla_lens wrote not counted)
    mse_scale: float


@dataclass(frozen=True, repr=False)
class JobResult:
    """What this process did. `table` (rank 0 only) is the merged output, once no shard is missing."""

    output: Path
    n_shards: int
    computed: list[int]
    missing: list[int]
    table: pa.Table | None = None
    summary: RoundTripSummary | None = None
    warnings: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        """One line, as every result prints: the merged table and the shard ids stay attributes."""
        done = f"{len(self.computed)} of {self.n_shards} shards computed here"
        if self.missing:
            shown = ", ".join(map(str, self.missing[:8])) + (", ..." if len(self.missing) > 8 else "")
            text = (f"{len(self.missing)} of {self.n_shards} shards not finished ({shown}), nothing merged into "
                    f"{self.output}; {done}")
        elif self.table is None:
            text = f"{done}; rank 0 merges them into {self.output}"
        else:
            text = f"wrote {counted(self.table.num_rows, 'row')} to {self.output} ({done})"
        if self.summary is not None:
            s = self.summary
            text += (f"; mean MSE {format_number(s.mean_mse)}, "
                     f"{baseline_phrase(s.fve, s.baseline, s.baseline_source, None)}, "
                     f"{counted(s.n_failed_parses, 'failed parse')}, {counted(s.n_misses, 'row')} scored the miss "
                     f"(failed parses included), {s.n_truncated} truncated")
        if self.warnings:
            text += f"; {counted(len(self.warnings), 'warning')} (.warnings)"
        return f"JobResult: {text}"


def shard_seed(seed: int, shard: int) -> int:
    """A generator seed per shard, so sampled rows do not depend on which rank ran the shard."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{shard}".encode()).digest()[:8], "little") >> 1


def verbalize_file(
    av: str | Path, input_path: str | Path, output: str | Path, *, sampling: Sampling = Sampling(),
    column: str | None = None, shard_size: int = 256, shards: Iterable[int] | None = None, device: str = "cpu",
    dtype: torch.dtype | str = torch.float32, progress: bool = False,
) -> JobResult:
    """Explain every vector of `input_path` into `output` (.parquet or .jsonl).

    `av` is a checkpoint folder (or cached hub id), loaded by each process. `input_path` holds `[n, d_model]`
    vectors: a .safetensors or .pt file (the tensor named `vectors`, or the only one), or a .parquet file whose
    list-of-floats column (`column` names it where there are several) holds them. `shard_size` input rows make
    one shard, the unit of work and of resuming; `shards` limits the work to those shard ids (one already on disk
    is kept, not redone). `device="cuda"` means each rank's own GPU (`nla_lens.distributed.device_for`).

    Output rows: index (the input row), the input's scalar columns, explanation (None if untagged), text,
    truncated (`max_new_tokens` cut the row before any EOS). An existing `output` is replaced only where this job
    wrote it (`_check_output_is_this_jobs`), else refused before any shard is computed.
    """
    input_path, output = file_path(input_path, "input_path"), file_path(output, "output")
    _check_paths(input_path, output)
    shards = _check_job_arguments(sampling, shards)
    (shard_size,) = check_counts(1, shard_size=shard_size)
    job_device, job_dtype = resolve_device(device), resolve_dtype(dtype)
    av_folder, av_meta = loading.nla_checkpoint(av, "av", _ARGUMENTS)
    table = _read(input_path, column, av_meta)
    manifest = {"job": "verbalize", **_input_facts(input_path, table), "shard_size": shard_size,
                **_checkpoint_facts("av", av_folder), "dtype": _dtype_name(dtype),
                **sampling.facts(job_device, job_dtype)}
    with process_group(device) as world:
        @cache
        def load() -> ActivationVerbalizer:
            return ActivationVerbalizer._from_folder(av_folder, av_meta, device=device_for(world, device), dtype=dtype)

        def compute(shard: int, rows: range) -> pa.Table:
            return output_rows(table, rows, sampling.verbalize(load(), table.vectors[rows.start:rows.stop], shard))

        return _run(table, output, manifest, compute, world, shard_size, shards, progress, av_meta.injection_char)


def round_trip_file(
    av: str | Path, ar: str | Path, input_path: str | Path, output: str | Path, *, sampling: Sampling = Sampling(),
    baseline: float | None = None, reconstruct_batch_size: int = 64, column: str | None = None,
    shard_size: int = 256, shards: Iterable[int] | None = None, device: str = "cpu",
    dtype: torch.dtype | str = torch.float32, progress: bool = False,
) -> JobResult:
    """Verbalize, reconstruct and score every vector of `input_path`; rows as `verbalize_file` plus `mse` and `miss`
    (the row scored `metrics.miss_mse`, as `RoundTrip.misses` says: a failed parse, an explanation too long for the
    AR, a reconstruction with no direction; recomputed for rows of shards an older nla_lens wrote, `_with_miss`).

    Each row is scored by `NLA.score`, and each shard warns of the misses `nla.miss_warnings` names; the merge adds a
    `RoundTripSummary` (written next to the output as `<stem>.summary.json`) whose baseline is the given one, else
    the AR sidecar's, else the paper's over all input vectors (at least 32 of them), as `NLA.round_trip` picks it,
    and which counts the rows scored the miss (`n_misses`, the failed parses included).
    A `sampling.max_new_tokens` whose samples the AR could not read (`check_sample_fits`) is refused before any
    weight is read.
    """
    input_path, output = file_path(input_path, "input_path"), file_path(output, "output")
    _check_paths(input_path, output)
    shards = _check_job_arguments(sampling, shards)
    _check_summary_is_ours(output)
    shard_size, reconstruct_batch_size = check_counts(1, shard_size=shard_size,
                                                      reconstruct_batch_size=reconstruct_batch_size)
    job_device, job_dtype = resolve_device(device), resolve_dtype(dtype)
    av_folder, av_meta = loading.nla_checkpoint(av, "av", _ARGUMENTS)
    ar_folder, ar_meta = loading.nla_checkpoint(ar, "ar", _ARGUMENTS)
    check_pair(av_meta, ar_meta)
    table = _read(input_path, column, av_meta)
    resolved = resolve_baseline(table.vectors, ar_meta.mse_scale, baseline, ar_meta)  # before any verbalization
    ar_tokenizer = loading.checkpoint_tokenizer(ar_folder, ar_meta, "ar")
    check_sample_fits(ar_meta, ar_tokenizer, _context_length(ar_folder), sampling.max_new_tokens)
    if resolved.warning:
        warnings.warn(resolved.warning, stacklevel=2)
    manifest = {"job": "round-trip", **_input_facts(input_path, table), "shard_size": shard_size,
                **_checkpoint_facts("av", av_folder), **_checkpoint_facts("ar", ar_folder),
                "dtype": _dtype_name(dtype), **sampling.facts(job_device, job_dtype)}
    if batches_matter(job_device, job_dtype):  # the AR's scores too
        manifest["reconstruct_batch_size"] = reconstruct_batch_size
    with process_group(device) as world:
        @cache
        def load() -> NLA:
            rank_device = device_for(world, device)
            return NLA(ActivationVerbalizer._from_folder(av_folder, av_meta, device=rank_device, dtype=dtype),
                       ActivationReconstructor._from_folder(ar_folder, ar_meta, device=rank_device, dtype=dtype,
                                                            checked_tokenizer=ar_tokenizer))

        def compute(shard: int, rows: range) -> pa.Table:
            nla, vectors = load(), table.vectors[rows.start:rows.stop]
            verbalizations = sampling.verbalize(nla.av, vectors, shard)
            reconstructions, mse = nla.score(vectors, verbalizations, reconstruct_batch_size=reconstruct_batch_size)
            for note in miss_warnings(nla.ar, verbalizations, reconstructions, rows.start):
                warn_at_caller(f"shard {shard}: {note}")  # the output keeps no reconstructions: said as it is scored
            missed = scored_misses(reconstructions)
            return output_rows(table, rows, verbalizations, mse=pa.array(mse.numpy(), pa.float32()),
                               miss=pa.array([i in missed for i in range(len(rows))], pa.bool_()))

        result = _run(table, output, manifest, compute, world, shard_size, shards, progress, av_meta.injection_char,
                      [w for w in [resolved.warning] if w], _ran_on_warning,
                      miss_mse=metrics.miss_mse(av_meta.d_model, ar_meta.mse_scale))
    if result.table is None:
        return result
    mse = torch.tensor(result.table.column("mse").to_numpy())
    fve = None if resolved.value is None else metrics.fve(mse, resolved.value)
    summary = RoundTripSummary(len(mse), float(mse.mean()), fve, resolved.value, resolved.source,
                               result.table.column("explanation").null_count,
                               result.table.column("miss").to_pylist().count(True),
                               result.table.column("truncated").to_pylist().count(True), ar_meta.mse_scale)
    record = {**asdict(summary), "warnings": result.warnings, "output": output.name, "job": job_record(manifest)}
    write_json(summary_path(output), record, indent=2)
    return replace(result, summary=summary)


def _context_length(folder: Path) -> int:
    """`loading.context_length` of the model in `folder`, which `check_sample_fits` needs: a config.json that does not
    say is of no architecture nla_lens loads (each has max_position_embeddings), refused before any weight is read."""
    config = loading.load_hf_config(folder)
    n_ctx = loading.context_length(config)
    if n_ctx is None:
        raise CheckpointError(f"{folder}/config.json (model_type {config.model_type!r}) gives no context length "
                              "(max_position_embeddings), so it is no model nla_lens loads "
                              f"({', '.join(loading.SUPPORTED_ARCHITECTURES)}); restore the config.json saved with "
                              "the checkpoint")
    return n_ctx


JOB_KEY = "nla_lens_job"  # the parquet output's schema metadata key for `job_record`


def job_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """What produced an output (the shard manifest and the nla_lens version), kept in the parquet output and
    the summary: the shards folder that also holds the manifest is meant to be deleted once the job is done."""
    return {"nla_lens_version": __version__, **manifest}


def summary_path(output: Path) -> Path:
    return output.with_name(output.stem + ".summary.json")


def _check_summary_is_ours(output: Path) -> None:
    """`scores.parquet` and `scores.jsonl` share `scores.summary.json`: the second job overwrote the first's summary.
    A summary that names another output (one an older nla_lens wrote names none) is refused before the job runs."""
    path = summary_path(output)
    if not path.is_file():
        return
    rename = "pass an output= of another stem (the summary is <output stem>.summary.json)"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise InputError(f"{path} is not a round-trip summary, and this round trip's summary would replace it; "
                         f"move it, or {rename}")
    if record.get("output", output.name) != output.name:
        raise InputError(f"{path} holds the summary of {record['output']}, and this round trip's summary would "
                         f"replace it; {rename}")


def _check_output_is_this_jobs(output: Path, manifest: dict[str, Any], shards_are_this_jobs: bool) -> None:
    """An existing `output` is replaced by the merge only where this job wrote it: its job record (a parquet output
    keeps one) names this job's settings, or, with no record (a .jsonl output), the shards folder beside it holds this
    job's shards (`check_manifest` passed). Another job's rows there, or a file of the user's, were overwritten."""
    if not output.exists():
        return
    record = _job_record_in(output)
    if record is None and shards_are_this_jobs:
        return
    differing = [] if record is None else [k for k in shard_store.differing_facts(record, manifest)
                                           if k not in shard_store.LOCATION_FACTS]  # the same file moved is no other
    if record is not None and not differing:
        return
    found = (f"holds the rows of another job ({shard_store.changes(record, manifest, differing)})" if record is not None
             else f"exists, and nothing shows this job wrote it (no job record in it, no shards of this job in "
                  f"{shard_store.shard_folder(output)})")
    raise InputError(f"{output} {found}: this job's merged rows would replace it. Pass another output=, or delete "
                     f"{output} to write this job's rows there")


def _job_record_in(output: Path) -> dict[str, Any] | None:
    """The `job_record` a parquet output keeps in its schema metadata; None for a .jsonl one, a file an nla_lens job
    did not write or one that is no parquet file."""
    if file_kind(output) != ".parquet":
        return None
    try:
        metadata = pq.read_schema(output).metadata or {}
        record = json.loads(metadata[JOB_KEY.encode()])
    except (pa.ArrowException, OSError, KeyError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _check_paths(input_path: Path, output: Path) -> None:
    """The output and its shards folder can be written, and the output is not the input file: there the rows
    would replace the vectors."""
    check_output(output)
    shard_store.check_folder(shard_store.shard_folder(output))
    if output.resolve() == input_path.resolve():
        raise InputError(f"output={output} is the input file: the rows written there would replace its vectors; "
                         "pass another output=")


def _check_job_arguments(sampling: Sampling, shards: Iterable[int] | None) -> list[int] | None:
    """`sampling` checked, and `shards` as the list of ids the job uses (a generator read once, here): a dict of
    settings, or a lone shard id, failed only later with a bare AttributeError or TypeError."""
    if not isinstance(sampling, Sampling):
        raise InputError(f"sampling= takes an nla_lens.sharded.Sampling, got {type(sampling).__name__}: pass "
                         "Sampling(max_new_tokens=..., temperature=..., ...)")
    return None if shards is None else _shard_ids(shards)


def _shard_ids(shards: Iterable[int]) -> list[int]:
    """`shards` as a list, read once (a generator too): ints, NumPy's or a tensor's integer elements."""
    wrong = InputError(f"shards={shards!r} must be a list of shard ids (whole numbers), e.g. shards=[3, 11]")
    if isinstance(shards, str) or not isinstance(shards, Iterable):
        raise wrong
    ids = list(shards)
    try:  # operator.index refuses floats and strings; a bool is an int to it
        if any(isinstance(i, bool) for i in ids):
            raise TypeError
        return [operator.index(i) for i in ids]
    except TypeError:
        raise wrong from None


def _extraction_meta(folder: Path) -> NLAMeta | None:
    """The sidecar `nla-lens extract` wrote in `folder`, if that is what the folder holds."""
    if not (folder / SIDECAR_NAME).is_file():
        return None
    meta = load_meta(folder)
    return meta if meta.kind == "nla_dataset" and "extraction" in meta.raw else None


def check_extraction_input(input_path: Path, av_meta: NLAMeta) -> None:
    """A shard of an `nla-lens extract` folder (`<out>/shards/acts-*.safetensors`) holds one base's layer-K
    vectors and the folder's sidecar says which: an AV of another layer but the same width would explain
    them without an error, and say nothing true."""
    if input_path.is_dir() and _extraction_meta(input_path) is not None:
        raise InputError(f"{input_path} is an extraction folder, not a vector file: pass one of its shards "
                         f"({input_path / 'shards'}/acts-*.safetensors), or load it in Python with "
                         "nla_lens.training.load_activations")
    if file_kind(input_path) != ".safetensors":
        return
    found = next(((m, f) for f in input_path.resolve().parents[:2] if (m := _extraction_meta(f))), None)
    if found is None:
        return
    source, folder = found
    if source.layer != av_meta.layer:
        raise InputError(f"{input_path} holds layer-{source.layer} vectors ({folder / SIDECAR_NAME} says so), but the "
                         f"AV explains layer {av_meta.layer}: extract at layer {av_meta.layer}, or use an AV of layer "
                         f"{source.layer}")
    if source.base_model is not None and av_meta.base_model is not None and _base_names(
            source.base_model).isdisjoint(_base_names(av_meta.base_model)):
        warn_at_caller(f"{input_path} was extracted from base {source.base_model!r} and the AV trained from "
                       f"{av_meta.base_model!r}: an AV explains its own base's activations")


def _base_names(base_model: str) -> set[str]:
    """The names a sidecar's `base_model` goes by, lower-cased: its last path part and, where it resolves to a local
    folder (the toy's by its name, a cached hub id), that folder's and, in the HF cache
    (`models--Owner--Name/snapshots/<hash>`), the repository's. The toy AV names its base "nla-lens-toy-shakespeare"
    and an extraction records the folder, `.../checkpoints/base`: by last parts alone they were two models."""
    names = {Path(base_model).name.lower()}
    try:
        folder = loading.named_base_folder(base_model).resolve()
    except CheckpointError:  # a folder on another machine, a hub id not cached here: the name alone
        return names
    return names | {folder.name.lower()} | {part.split("--")[-1].lower() for part in folder.parts
                                             if part.startswith("models--")}


def _read(input_path: Path, column: str | None, av_meta: NLAMeta) -> VectorTable:
    check_extraction_input(input_path, av_meta)
    table = read_input(input_path, column)
    # float32, in which the job computes: refused here, by input row, where a shard would name its own rows
    return VectorTable(check_vectors(table.vectors, av_meta.d_model, as_float32=True), table.columns)


def _dtype_name(dtype: torch.dtype | str) -> str:
    """One name per dtype ("bf16" and torch.bfloat16 alike), so a resume does not depend on the spelling."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def _input_facts(input_path: Path, table: VectorTable) -> dict[str, Any]:
    """Which input the shards were computed from: its path and size, and hashes of the vectors and of the
    columns carried into the output rows (an edited id column changes the output as an edited vector does).
    The rows depend on the hashed content only: the same file moved resumes (see `shard_store.check_manifest`)."""
    digest = hashlib.sha256(table.vectors.contiguous().numpy().data).hexdigest()
    return {"input": str(input_path.resolve()), "input_bytes": input_path.stat().st_size,
            "n_rows": table.vectors.shape[0], "vectors_sha256": digest, "columns_sha256": _table_sha256(table.columns)}


def _table_sha256(table: pa.Table) -> str:
    """A hash of a table's schema and values, whatever its chunking."""
    table = table.combine_chunks().replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def _checkpoint_facts(role: str, folder: Path) -> dict[str, str]:
    """A checkpoint's folder and `loading.folder_fingerprint` of its contents. A checkpoint exported again into the
    same folder differs in nearly every block of its trained weights; a copy of it at the same path on another node
    does not differ at all, and one moved elsewhere resumes as a moved input does."""
    # resolved, as the input is
    return {role: str(folder.resolve()), f"{role}_fingerprint": loading.folder_fingerprint(folder)}


def output_rows(table: VectorTable, rows: range, verbalizations: list[Verbalization], **extra: pa.Array) -> pa.Table:
    """One shard's output rows: input row index, the input's own columns, the AV's output, then `extra`."""
    carried = table.columns.slice(rows.start, len(rows))
    return pa.table({
        "index": pa.array(rows, pa.int64()),
        **{name: carried.column(name) for name in carried.column_names},
        "explanation": pa.array([v.explanation for v in verbalizations], pa.string()),
        "text": pa.array([v.text for v in verbalizations], pa.string()),
        "truncated": pa.array([v.truncated for v in verbalizations], pa.bool_()),
        **extra,
    })


def _run(table: VectorTable, output: Path, manifest: dict[str, Any], compute: Callable[[int, range], pa.Table],
         world: World, shard_size: int, shards: Sequence[int] | None, progress: bool, marker_char: str,
         known_warnings: Sequence[str] = (), merged_warning: Callable[[pa.Table], str | None] | None = None,
         miss_mse: float | None = None) -> JobResult:
    """Compute this rank's unfinished shards, wait for every rank, and merge on rank 0 if nothing is missing.

    The merged output keeps its warnings (`verbalize`'s failed-injection check, once over every row, then
    `merged_warning`'s over the merged rows, then `known_warnings`) beside the job record, so that a reader of the
    file learns of them too. `miss_mse`: a round trip's, which completes the `miss` column (`_with_miss`)."""
    check_output(output)
    folder = shard_store.shard_folder(output)
    recorded = shard_store.read_manifest(folder)
    relocated = shard_store.check_manifest(folder, recorded, manifest)
    _check_output_is_this_jobs(output, manifest, shards_are_this_jobs=recorded is not None)
    if relocated and world.is_main:
        _warn_relocated(folder, manifest, relocated)
        assert recorded is not None  # check_manifest relocates nothing without a recorded manifest
        shard_store.record_locations(folder, recorded, manifest, relocated)  # the next rerun from there says nothing
    ranges = shard_store.shard_rows(table.vectors.shape[0], shard_size)
    todo = [i for i in shard_store.assigned_shards(len(ranges), world, shards)
            if not shard_store.shard_path(folder, i).exists()]
    # no bar over no shards: a rerun of a finished job would print an empty one ("0shard [00:00, ?shard/s]")
    for shard in tqdm(todo, desc=manifest["job"], unit="shard", disable=not (progress and world.is_main and todo)):
        shard_store.save_shard(folder, shard, compute(shard, ranges[shard]), manifest)
    barrier(world)
    known = [w for w in known_warnings if w]  # the injection is checked at the merge, over every row
    if not world.is_main:
        return JobResult(output, len(ranges), todo, [], warnings=known)
    missing = shard_store.missing_shards(folder, len(ranges))
    if missing:
        return JobResult(output, len(ranges), todo, missing, warnings=known)
    merged = _with_new_columns(shard_store.merge(folder, ranges, manifest))
    if miss_mse is not None:
        merged = _with_miss(merged, miss_mse)
    found = injection_warning(merged.column("text").to_pylist(), marker_char)
    merged_note = merged_warning(merged) if merged_warning is not None else None
    job_warnings = [w for w in [found, merged_note, *known] if w]
    merged = merged.replace_schema_metadata({JOB_KEY: json_text(job_record(manifest)),
                                             RESULT_KEY: json_text({"warnings": job_warnings})})
    write_table(merged, output)
    return JobResult(output, len(ranges), todo, [], merged, warnings=job_warnings)


def _ran_on_warning(merged: pa.Table) -> str | None:
    """`ran_on_warning` over a round trip's merged rows, named by their input row."""
    closed = merged.column("explanation").is_valid().to_pylist()
    cut = merged.column("truncated").to_pylist()  # None in rows of shards an older nla_lens wrote: unknown
    index = merged.column("index").to_pylist()
    return ran_on_warning([row for row, c, t in zip(index, closed, cut, strict=True) if c and t is True], len(index))


def _warn_relocated(folder: Path, manifest: dict[str, Any], relocated: dict[str, Any]) -> None:
    """One warning for every input or checkpoint found where the manifest did not record it, with the same
    contents."""
    facts = shard_store.LOCATION_FACTS
    moves = "; ".join(f"{facts[k].name} found at {manifest[k]}, not at {old} where {folder / shard_store.MANIFEST} "
                      f"recorded it ({facts[k].shown_same_by})" for k, old in relocated.items())
    warnings.warn(f"{moves}: the shards are reused, and from now on the manifest and the output's job record name "
                  f"{' and '.join(manifest[k] for k in relocated)}", stacklevel=4)


# Output columns added since the first release that the rows cannot tell again, and the column each follows
_NEW_COLUMNS = (("truncated", "text"),)


def _with_new_columns(merged: pa.Table) -> pa.Table:
    """The merged rows with the `_NEW_COLUMNS` they lack, all null (unknown) where every shard was written by an
    nla_lens from before the column; the merge already nulls it in the rows of such shards among newer ones."""
    for name, after in _NEW_COLUMNS:
        if name not in merged.column_names and after in merged.column_names:
            merged = merged.add_column(merged.column_names.index(after) + 1, name,
                                       pa.nulls(merged.num_rows, pa.bool_()))
    return merged


def _with_miss(merged: pa.Table, miss_mse: float) -> pa.Table:
    """A round trip's rows with their `miss` column (after `mse`) filled in where a shard an older nla_lens wrote has
    none, from the columns it does hold: `NLA.score` gives `miss_mse` to every row it scores the miss, a failed parse
    always among them (before the miss rule took them, a reconstruction with no direction scored NaN)."""
    mse = merged.column("mse")
    scored_miss = pc.or_(pc.or_(merged.column("explanation").is_null(), pc.is_nan(mse)),
                         pc.equal(mse, pa.scalar(miss_mse, mse.type)))
    if "miss" not in merged.column_names:
        return merged.add_column(merged.column_names.index("mse") + 1, "miss", scored_miss)
    return merged.set_column(merged.column_names.index("miss"), "miss", pc.coalesce(merged.column("miss"),
                                                                                     scored_miss))
