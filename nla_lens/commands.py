"""`nla-lens verbalize`, `round-trip`, `reconstruct` and `explain`: the library from the shell."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from jaxtyping import Float
from torch import Tensor

from nla_lens import loading, shard_store, sharded
from nla_lens.checks import (
    check_counts,
    check_input_file,
    check_output_path,
    counted,
    dtype_names,
    resolve_device,
    resolve_dtype,
)
from nla_lens.cli import in_flags
from nla_lens.cli_checks import base_for, nla_checkpoint
from nla_lens.display import format_cell, format_number
from nla_lens.distributed import World
from nla_lens.errors import InputError, PromptTooLongError
from nla_lens.results import write_rows
from nla_lens.sharded import Sampling
from nla_lens.sidecar import text_ids
from nla_lens.vector_files import OUTPUT_SUFFIXES, VectorTable, read_input, write_vectors
from nla_lens.verbalizer import MAX_NEW_TOKENS, Verbalizations

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nla_lens.backends import TLModel
    from nla_lens.nla import NLA
    from nla_lens.sidecar import NLAMeta

_VECTOR_SUFFIXES = (".safetensors", ".pt")  # what `reconstruct --output` writes


def _check_text_fits(row: Sequence[int], n_ctx: int | None) -> None:
    """`verbalize --text`'s token ids fit the base's context `n_ctx` (None: its config.json does not say)."""
    if n_ctx is not None and len(row) > n_ctx:
        raise PromptTooLongError(f"--text is {len(row)} tokens, over the base model's context of {n_ctx}; pass a "
                                 "shorter text")


def _config_context(folder: Path) -> int | None:
    """The n_ctx the base in `folder` will load with, from its config.json: known before any weight loads."""
    return loading.context_length(loading.load_hf_config(folder))


def capture_text(base: Path, tokenizer: PreTrainedTokenizerBase, layer: int, text: str, device: str,
                 dtype: torch.dtype) -> VectorTable:
    """`blocks.{layer}.hook_resid_post` of the base model in folder `base` (with its loaded `tokenizer`; both, and
    `layer`, checked by `cli_checks.base_for`) at the positions of `text` (found non-empty by `_run_verbalize`) that
    `explain` explains by default (every one but a BOS the tokenizer puts first), with each one's `input_text` (the
    text, as `explain`'s rows name it), `position` and `token` columns, so an explanation can be read against what it
    explains."""
    from nla_lens import backends
    from nla_lens.capture import text_resid_post
    from nla_lens.explain import bos_skip, select_positions

    model = backends.load_model(base, tokenizer, dtype=dtype, device=device)
    row = text_ids(tokenizer, text)  # BOS first where the base has one
    _check_text_fits(row, model.cfg.n_ctx)
    with torch.inference_mode():
        vectors = text_resid_post(model, torch.tensor([row], device=device), layer).float()
    positions = select_positions(None, len(row), bos_skip(tokenizer, row))
    return VectorTable(vectors[positions], pa.table({"input_text": pa.array([text] * len(positions), pa.string()),
                                                     "position": pa.array(positions, pa.int64()),
                                                     "token": [tokenizer.decode([row[p]]) for p in positions]}))


def _text_records(table: VectorTable, out: Verbalizations) -> list[dict[str, Any]]:
    """`verbalize --text`'s rows: `out`'s, each with the input_text, position and token it explains (`table`'s
    columns, `Verbalizations.context_schema`) after its index, so that its file reads back as `Verbalizations`."""
    return [{"index": row["index"], **context, **row}
            for context, row in zip(table.columns.to_pylist(), out.to_records(), strict=True)]


def add_verbalize(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verbalize", help="explain activation vectors with an AV",
        description="Explain vectors with an activation verbalizer. Take them from a file (--input) or capture "
                    "them from a base model (--base, --layer, --text: every position of the text but a BOS the "
                    "tokenizer puts first, which explain leaves out too: its residual is an attention sink whose "
                    "explanation is noise). With --input and --output the job is sharded: run it as one process "
                    "or under torchrun (torchrun --nproc-per-node N -m nla_lens.cli verbalize ...), and rerun the "
                    "same command to resume. " + _SHARDING_NOTE)
    parser.add_argument("--av", required=True, help="the AV checkpoint folder (or a hub id in the local HF cache)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", "--vectors", dest="input", type=Path, help=_INPUT_HELP)
    source.add_argument("--text", action="append",
                        help="text to run through the base model; each of its positions is explained, but a BOS "
                             "the tokenizer puts first (as in explain); one text (nla-lens explain takes several)")
    parser.add_argument("--base", help="base model folder for --text (default: the sidecar's base_model)")
    parser.add_argument("--layer", type=int, help="layer K for --text (default: the AV's sidecar layer)")
    parser.add_argument("--output", type=Path,
                        help="write the rows to this .parquet or .jsonl file instead of printing them: with --input "
                             "the file job's (index, the input's columns, explanation, text, truncated); with --text "
                             "verbalize's (index, input_text, position, token, explanation, parsed, text, n_tokens, "
                             "truncated), which nl.read_result reads back as Verbalizations rows (from .parquet with "
                             "their summary and warnings), as verbalize(...).save writes them")
    _add_job_flags(parser)
    parser.set_defaults(run=_run_verbalize)


def add_round_trip(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "round-trip", help="verbalize, reconstruct and score vectors (MSE, FVE) with an AV/AR pair",
        description="Score an NLA on a vector file: each vector is explained by the AV, rebuilt from the "
                    "explanation by the AR and scored as NLA.round_trip does (a failed parse scores as a miss). "
                    "Writes the rows (index, the input's columns, explanation, text, truncated, mse, miss) to --output "
                    "and the mean MSE, baseline, FVE and the count of rows scored the miss (n_misses, failed parses "
                    "included) over all rows to <output stem>.summary.json. Runs as one "
                    "process or under torchrun; rerun the same command to resume. " + _SHARDING_NOTE)
    parser.add_argument("--av", required=True, help="the AV checkpoint folder (or a hub id in the local HF cache)")
    parser.add_argument("--ar", required=True, help="the AR trained with this AV")
    parser.add_argument("--input", "--vectors", dest="input", type=Path, required=True, help=_INPUT_HELP)
    parser.add_argument("--output", type=Path, required=True, help="the per-row .parquet or .jsonl file")
    parser.add_argument("--baseline", type=float,
                        help="FVE baseline (default: the AR sidecar's held-out one, else the paper baseline of "
                             "all input vectors when there are >= 32; otherwise no FVE)")
    parser.add_argument("--reconstruct-batch-size", type=int, default=64, help="explanations per AR batch (default 64)")
    parser.add_argument("--text", action=_PointToExplain,
                        help="not taken here: the round trip of a text's tokens is `nla-lens explain --text`")
    _add_job_flags(parser)
    parser.set_defaults(run=_run_round_trip)


class _PointToExplain(argparse.Action):
    """`round-trip --text`, as `verbalize --text` works: refused at once with the command that does it, rather
    than with argparse's list of the file job's missing flags."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        parser.error("round-trip scores a file of vectors (--input, --output); the round trip of a text's tokens "
                     "(explanation, MSE, FVE per token) is `nla-lens explain --av ... --ar ... --text \"...\"`")


_INPUT_HELP = (".safetensors or .pt (tensor 'vectors', or the only one) or .parquet file of [n, d_model] vectors; "
               "a parquet file's other scalar columns (ids, positions, ...) are copied to the output rows")
_SHARDING_NOTE = ("Shards are --shard-size consecutive rows, written to <output>.shards/ as they finish; the "
                  "folder is kept after the merge (delete it when done; a rerun then recomputes everything). Its "
                  "manifest.json, what produced the output, is also kept in a .parquet output's schema metadata "
                  "(nla_lens_job) and in a round trip's summary (job). An existing --output file this job did not "
                  "write (by that record, or, for .jsonl, by the shards beside it) is refused, not replaced.")


_SHARD_SIZE = 256


def _add_job_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--column", help="the parquet column holding the vectors (default: the only list-of-floats "
                                         "column)")
    parser.add_argument("--shard-size", type=int, help=f"input rows per shard of a file job (default {_SHARD_SIZE})")
    parser.add_argument("--shards", type=_shard_ids,
                        help="compute only these shard ids, e.g. 0,3 (to redo a failed rank's shards in one "
                             "process); the output is merged once every shard exists")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help=f"longest explanation (default {MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass at temperature > 0 (default 1.0: off)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for sampling at temperature > 0 (default 0); each shard of a file job derives its "
                             "own from it")
    parser.add_argument("--batch-size", type=int, default=32, help="vectors per AV batch (default 32)")
    parser.add_argument("--device", default="cpu",
                        help="torch device; cuda under torchrun means cuda:LOCAL_RANK (cuda:0 where each rank sees "
                             "one GPU), and cuda:N is refused there (default cpu)")
    add_dtype_flag(parser)


def add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", type=_dtype_arg, default="float32", metavar="DTYPE",
                        help=f"model dtype: {dtype_names()} (default float32)")


def _dtype_arg(value: str) -> torch.dtype:
    """Every name the library takes (`checks.DTYPES`), so `--dtype bf16` works as `dtype="bf16"` does."""
    try:
        return resolve_dtype(value)
    except InputError:  # its message offers torch dtypes, which no flag value is
        message = f"{value!r} is not a dtype nla_lens loads; pass one of {dtype_names()}"
        raise argparse.ArgumentTypeError(message) from None


def _shard_ids(value: str) -> list[int]:
    try:
        ids = [int(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated shard ids such as 0,3, got {value!r}") from exc
    if not ids:  # an empty list would compute nothing and exit 0
        raise argparse.ArgumentTypeError(f"expected at least one shard id, such as 0 or 0,3, got {value!r}; leave "
                                         "--shards out to compute every unfinished shard")
    return ids


def _sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.batch_size)


def _job_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    shard_size = _SHARD_SIZE if args.shard_size is None else args.shard_size
    return {"sampling": _sampling(args), "column": args.column, "shard_size": shard_size,
            "shards": args.shards, "device": args.device, "dtype": args.dtype, "progress": True}


def _run_verbalize(args: argparse.Namespace) -> None:
    sampling = _sampling(args)
    resolve_device(args.device)
    av_folder, meta = nla_checkpoint(args.av, "av")
    if args.text is None and (args.base is not None or args.layer is not None):
        raise InputError("--base and --layer apply to --text (the activations to capture); an --input file "
                         "already holds its vectors: leave them out")
    if args.output is not None:
        check_output_path(args.output, OUTPUT_SUFFIXES, "--output")
    if args.input is not None and args.output is not None:
        _report(sharded.verbalize_file(args.av, args.input, args.output, **_job_kwargs(args)), args.max_new_tokens)
        return
    if World.from_env().is_distributed:
        raise InputError("under torchrun, give --input FILE and --output FILE: only file jobs are sharded")
    if args.text is not None:
        if len(args.text) > 1:  # argparse kept only the last --text and explained it alone
            raise InputError(f"--text was given {len(args.text)} times; verbalize explains one text: run it once per "
                             "text, or give them all to nla-lens explain (--text repeated)")
        args.text = args.text[0]
        if not args.text.strip():
            raise InputError("--text is empty; give the text whose positions to explain")
        if args.shards is not None or args.shard_size is not None or args.column is not None:
            raise InputError("--shards, --shard-size and --column apply to --input files; --text is explained in "
                             "one process")
        av_tokenizer = loading.checkpoint_tokenizer(av_folder, meta, "av")  # the base is checked against it
        base, base_tokenizer = base_for(args.base, av_folder, meta, av_tokenizer, args.layer)
        from nla_lens.explain import bos_skip, select_positions

        row = text_ids(base_tokenizer, args.text)
        _check_text_fits(row, _config_context(base))  # capture_text checks it again
        select_positions(None, len(row), bos_skip(base_tokenizer, row), text=f"--text {format_cell(args.text, 30)!r}")
        layer = meta.layer if args.layer is None else args.layer
        table = capture_text(base, base_tokenizer, layer, args.text, args.device, args.dtype)
        if table.columns.column("position")[0].as_py() > 0:
            print("position 0, the BOS the tokenizer puts first, is not explained (as in explain)", file=sys.stderr)
    else:
        if args.shards is not None or args.shard_size is not None:
            raise InputError("--shards and --shard-size apply to a file job: give --output FILE too (without it "
                             "the rows are printed, all in one process)")
        sharded.check_extraction_input(args.input, meta)
        table = read_input(args.input, args.column)
        av_tokenizer = None  # loaded with the AV
    from nla_lens.verbalizer import ActivationVerbalizer

    av = ActivationVerbalizer._from_folder(av_folder, meta, device=args.device, dtype=args.dtype,
                                           checked_tokenizer=av_tokenizer)
    out = av.verbalize(table.vectors, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                       top_p=sampling.top_p, seed=sampling.seed, batch_size=sampling.batch_size, progress=True)
    _warn_truncated([v.truncated for v in out], [v.explanation is not None for v in out], sampling.max_new_tokens)
    if args.output:
        write_rows(out, _text_records(table, out), args.output)
        print(f"wrote {counted(len(out), 'row')} to {args.output}")
        return
    from nla_lens.display import unparsed_text, visible_token

    tokens = table.columns.column("token").to_pylist() if "token" in table.columns.column_names else None
    # A --text row is its token's position in the text; an --input row, the input row.
    rows = table.columns.column("position").to_pylist() if args.text is not None else range(len(out))
    # As `explain` prints them: tokens as the views draw them (a lone space ␣, a newline ↵), and control characters
    # escaped, so that each row stays on one line
    for i, (row, v) in enumerate(zip(rows, out, strict=True)):
        token = f"{format_cell(visible_token(tokens[i]))}\t" if tokens is not None else ""
        explanation = v.explanation if v.explanation is not None else unparsed_text(v.text, v.truncated)
        print(f"{row}\t{token}{format_cell(explanation)}")


def _text_lines(path: Path, flag: str, item: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file given as `flag`, one `item` each."""
    return [line for line in _lines(path, flag, item) if line.strip()]


def _lines(path: Path, flag: str, item: str) -> list[str]:
    """The file's lines, split at line ends only (`\\n`, `\\r\\n`, `\\r`): `str.splitlines` also splits at U+2028,
    form feeds and U+0085, which an explanation or a text may hold, and would move every later line's vector."""
    try:
        text = path.read_text(encoding="utf-8")  # universal newlines: every line end reads as a newline
    except UnicodeDecodeError as exc:
        raise InputError(f"{flag} {path} is not UTF-8 text ({exc}); pass a plain text file, one {item} a "
                         "line") from exc
    return text.removesuffix("\n").split("\n")


def _explanation_lines(path: Path) -> list[str]:
    """Line i's explanation is vector i of the output, which holds no ids: a blank line before the last
    explanation is refused, since skipping it would move every later vector onto the line above its own."""
    lines = _lines(path, "--input", "explanation")
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise InputError(f"--input {path}: line(s) {blank[:8]} are blank; vector i of the output is line i's "
                         "explanation, so give one explanation on every line (remove the blank lines, or put a "
                         "placeholder where an explanation is missing)")
    if lines and _is_json_object(lines[0]):  # the AR would encode each line's JSON, keys and all, and score it
        raise InputError(f"--input {path} holds JSON objects (line 1: {lines[0][:80]!r}), not one explanation a line: "
                         "write the explanations alone, one a line (from a training explanations file: "
                         "pandas.read_json(path, lines=True)['explanation'].dropna()), and pass that file")
    return lines


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _run_round_trip(args: argparse.Namespace) -> None:
    _sampling(args)
    resolve_device(args.device)
    nla_checkpoint(args.av, "av")
    nla_checkpoint(args.ar, "ar")
    check_output_path(args.output, OUTPUT_SUFFIXES, "--output")
    result = sharded.round_trip_file(args.av, args.ar, args.input, args.output, baseline=args.baseline,
                                     reconstruct_batch_size=args.reconstruct_batch_size, **_job_kwargs(args))
    _report(result, args.max_new_tokens)
    if result.summary is not None:
        for name, value in asdict(result.summary).items():
            print(f"{name:16s} {value}")
        print(f"summary written to {sharded.summary_path(args.output)}")


def _report(result: sharded.JobResult, max_new_tokens: int) -> None:
    """One line per outcome, from rank 0 only (the other ranks' results carry no merge)."""
    folder = shard_store.shard_folder(result.output)
    if result.missing:
        ids = ",".join(map(str, result.missing))
        print(f"{result.n_shards - len(result.missing)} of {result.n_shards} shards done ({len(result.computed)} by "
              f"this process), so {result.output} is not written yet: it is merged once all {result.n_shards} are. "
              f"Rerun the same command with --shards {ids} (the missing ones: --shards left them out, or a rank "
              f"failed), or without --shards, to finish; the finished shards in {folder} are kept")
    elif result.table is not None:
        print(f"wrote {counted(result.table.num_rows, 'row')} to {result.output} ({len(result.computed)} of "
              f"{result.n_shards} shards computed by this process; shards kept in {folder})")
        parsed = [e is not None for e in result.table.column("explanation").to_pylist()]
        _warn_truncated(result.table.column("truncated").to_pylist(), parsed, max_new_tokens,
                        f" into a new --output (or delete {folder}: its shards hold these rows)")
    for warning in result.warnings:
        warnings.warn(warning, stacklevel=1)  # printed by `cli.main` as every warning is, once


def _warn_truncated(truncated: list[bool | None], parsed: list[bool], max_new_tokens: int, rerun: str = "") -> None:
    """Rows `max_new_tokens` cut before the AV's EOS: those cut before the closing tag have no explanation, those cut
    after it hold a whole one and ran on past it (round trips score it, RL's reward would not). A command that
    printed only its success line hid them. None is a shard from before the column: unknown."""
    cut = [p for t, p in zip(truncated, parsed, strict=True) if t is True]
    if not cut:
        return
    parts = [f"{n} {what}" for n, what in (
        (cut.count(False), "before closing the explanation tag, so they have no explanation"),
        (cut.count(True), "after closing it: their explanation is whole, and what the AV wrote on past the tag is in "
                          "their text")) if n]
    warnings.warn(f"{len(cut)} of {len(truncated)} rows were cut at --max-new-tokens {max_new_tokens} before the AV "
                  f"ended them: {'; '.join(parts)}. Rerun with a larger --max-new-tokens{rerun}", stacklevel=1)


def add_reconstruct(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reconstruct", help="rebuild activation vectors from explanations with an AR",
        description="Map explanations back to vectors with an activation reconstructor.")
    parser.add_argument("--ar", required=True, help="the AR checkpoint folder (or a hub id in the local HF cache)")
    parser.add_argument("explanations", nargs="*", help="explanation strings")
    parser.add_argument("--input", type=Path,
                        help="a text file with one explanation per line (vector i is line i's; no blank lines)")
    parser.add_argument("--output", type=Path,
                        help="write the vectors here: .safetensors (tensor 'vectors') or .pt (one tensor)")
    parser.add_argument("--batch-size", type=int, default=64, help="explanations per AR batch (default 64)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    add_dtype_flag(parser)
    parser.set_defaults(run=_run_reconstruct)


def _run_reconstruct(args: argparse.Namespace) -> None:
    from nla_lens.reconstructor import ActivationReconstructor

    resolve_device(args.device)
    check_counts(1, batch_size=args.batch_size)
    nla_checkpoint(args.ar, "ar")
    if args.output:
        check_output_path(args.output, _VECTOR_SUFFIXES, "--output")
    if args.input and args.explanations:  # vector i would not be line i's, as --input's help says
        raise InputError("give the explanations as arguments or in --input FILE, not both")
    texts = list(args.explanations)
    if args.input:
        check_input_file(args.input, "--input")
        texts = _explanation_lines(args.input)
    if not texts:
        raise InputError("no explanations: give them as arguments, or --input FILE with one per line")
    blank = [i for i, text in enumerate(texts) if not text.strip()]
    if blank:  # a slip (an unset shell variable): the AR would read an empty <text></text> and return a vector for it
        raise InputError(f"explanation {blank[0]} is empty; give the explanation's text (to reconstruct an empty "
                         "explanation on purpose, as round trips score an AV's empty one, call ar.reconstruct([\"\"]) "
                         "in Python)")
    ar = ActivationReconstructor.from_pretrained(args.ar, device=args.device, dtype=args.dtype)
    vectors = ar.reconstruct(texts, batch_size=args.batch_size)
    for i, v in enumerate(vectors):
        print(vector_line(i, v))
    if args.output:
        write_vectors(vectors, args.output)
        print(f"wrote {len(vectors)} vectors to {args.output}")


def vector_line(index: int, vector: Float[Tensor, " d_model"]) -> str:
    """`nla-lens reconstruct`'s printed row: the vector's norm and first entries, as a table cell writes numbers
    (`format_number`): a diverged AR's norm of 1e15 printed every digit, and a norm of 1e-9 read 0.000, its entries
    0.0. The norm is taken in float64: in float32 or bf16 the squares of entries past 2e19 overflow, and it read inf."""
    head = ", ".join(format_number(x) for x in vector[:4].tolist())
    return f"{index}\tnorm {format_number(float(vector.double().norm()))}\t[{head}] ..."


def add_explain(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain", help="explain every token of a text with an AV/AR pair (explanation, MSE, FVE per token)",
        description="Run each text through the base model, capture layer K (the NLA's) at every token (or "
                    "--positions), explain each vector with the AV, rebuild it from the words with the AR, and "
                    "print one row per token: position, token, FVE, MSE, explanation (a BOS the tokenizer adds is "
                    "not explained). FVE uses --baseline, else "
                    "the AR sidecar's held-out baseline, else that of the captured vectors when there are >= 32.")
    add_nla_flags(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to explain (repeat for several)")
    source.add_argument("--file", type=Path, help="a UTF-8 text file: each non-empty line is one text")
    parser.add_argument("--positions", type=_positions_arg,
                        help="which tokens: comma-separated positions (negative from the end) such as 3,-1 or "
                             "-2,-1, or a slice such as 8: or -4: (default: every token but an added BOS)")
    parser.add_argument("--baseline", type=float,
                        help="FVE baseline (default: the AR sidecar's held-out one, else the paper baseline of the "
                             "captured vectors when there are >= 32; otherwise no FVE)")
    parser.add_argument("--output", type=Path, help="also write the rows to .parquet / .jsonl, or the view to .html")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help=f"longest explanation (default {MAX_NEW_TOKENS})")
    parser.add_argument("--batch-size", type=int, default=32, help="vectors per AV batch (default 32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    add_dtype_flag(parser)
    parser.set_defaults(run=_run_explain)


def _positions_arg(value: str) -> list[int] | slice:
    try:
        if ":" in value:
            parts = [int(p) if p.strip() else None for p in value.split(":")]
            if len(parts) > 3 or parts[2:] == [0]:  # a step of 0 selects nothing: Python refuses it too
                raise ValueError(value)
            return slice(*parts)
        return [int(p) for p in value.split(",")]  # int('') fails: '1,,2' and '3,' are typos, not positions
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected positions such as 3,5,-1 or a slice such as 8: or 2:10, "
                                         f"got {value!r}") from exc


def _explain_texts(args: argparse.Namespace) -> list[str]:
    if args.file is None:
        texts = list(args.text)
    else:
        if not args.file.is_file():
            raise InputError(f"--file {args.file} does not exist (or is not a file); pass a text file, one text a line")
        texts = _text_lines(args.file, "--file", "text")
    if not texts or not all(t.strip() for t in texts):
        raise InputError("nothing to explain: give a non-empty --text, or a --file with at least one non-empty line")
    return texts


def add_nla_flags(parser: argparse.ArgumentParser) -> None:
    """`--av`, `--ar` and `--base`: what `nla_and_base_folders` reads."""
    parser.add_argument("--av", required=True, help="the AV checkpoint folder (or a hub id in the local HF cache)")
    parser.add_argument("--ar", required=True, help="the AR trained with this AV")
    parser.add_argument("--base", help="the base model folder (default: the sidecar's base_model)")


@dataclass(frozen=True)
class NLAFolders:
    """The folders `--av`, `--ar` and `--base` name, each checked for its role and the base against the AV, with
    the tokenizers read on the way: a command checks what depends on the base's tokens (`--positions`) with
    `base_tokenizer` before `load` reads any weight."""

    av: Path
    av_meta: NLAMeta
    av_tokenizer: PreTrainedTokenizerBase
    ar: Path
    ar_meta: NLAMeta
    base: Path
    base_tokenizer: PreTrainedTokenizerBase

    def load(self, device: torch.device, dtype: torch.dtype) -> tuple[NLA, TLModel]:
        """The NLA and the base model."""
        from nla_lens import backends
        from nla_lens.nla import NLA

        nla = NLA._from_folders(self.av, self.av_meta, self.ar, self.ar_meta, device=device, dtype=dtype,
                                checked_av_tokenizer=self.av_tokenizer)
        return nla, backends.load_model(self.base, self.base_tokenizer, dtype=dtype, device=device)

    def base_context(self) -> int | None:
        """The base's n_ctx from its config.json (None where it does not say): texts are checked against it before
        `load` reads any weight."""
        return _config_context(self.base)


def nla_and_base_folders(args: argparse.Namespace) -> NLAFolders:
    """The `--av` / `--ar` pair and the base model (`--base`, else the sidecar's base_model), each folder checked
    for its role before anything loads."""
    av_folder, av_meta = nla_checkpoint(args.av, "av")
    ar_folder, ar_meta = nla_checkpoint(args.ar, "ar")
    av_tokenizer = loading.checkpoint_tokenizer(av_folder, av_meta, "av")  # the base is checked against it
    base_folder, base_tokenizer = base_for(args.base, av_folder, av_meta, av_tokenizer)  # warned once
    return NLAFolders(av_folder, av_meta, av_tokenizer, ar_folder, ar_meta, base_folder, base_tokenizer)


def _run_explain(args: argparse.Namespace) -> None:
    from nla_lens.display import text_label, unparsed_text, visible_token
    from nla_lens.explain import check_rows_fit, text_columns, text_rows
    from nla_lens.nla import check_baseline
    from nla_lens.results import check_save_path

    texts = _explain_texts(args)  # every input checked before any model is loaded
    device = resolve_device(args.device)
    if args.output is not None:
        check_save_path(args.output, "--output")
    check_counts(1, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    if args.baseline is not None:
        check_baseline(args.baseline)
    folders = nla_and_base_folders(args)
    token_rows, skip = text_rows(folders.base_tokenizer, texts)
    check_rows_fit(token_rows, folders.base_context(), texts)  # explain checks it again against the loaded base
    text_columns(args.positions, token_rows, skip, texts)  # explain picks them again
    nla, base = folders.load(device, args.dtype)
    explanation = nla.explain(base, texts, positions=args.positions, baseline=args.baseline,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True)
    for i, text in enumerate(explanation.texts):
        print(f"\n{text_label(i, text)}")  # as the view heads the text's block, a newline in it escaped
        print(f"  {'pos':>4}  {'token':<14} {'FVE':>6} {'MSE':>6}  explanation")
        for row in (r for r in explanation.rows if r.text_index == i):
            said, fve, mse = row.explanation, format_cell(row.fve), format_cell(row.mse)
            if row.miss:  # a failed parse, or one the AR could not score: an orthogonal guess, as the views say
                fve, mse = ("miss" if row.fve is not None else fve), "miss"
            if said is None:
                said = unparsed_text(row.verbalization.text, row.verbalization.truncated)
            token = format_cell(visible_token(row.token), 14)  # a lone space as ␣, a newline as ↵: as the views
            print(f"  {row.position:>4}  {token:<14} {fve:>6} {mse:>6}  {format_cell(said)}")
    print("\n" + in_flags(explanation.summary(), args.flags))
    _warn_truncated([row.verbalization.truncated for row in explanation.rows],
                    [row.explanation is not None for row in explanation.rows], args.max_new_tokens)
    for warning in explanation.round_trip.warnings:
        warnings.warn(warning, stacklevel=1)
    if args.output is not None:
        print(f"wrote {explanation.save(args.output)}")
