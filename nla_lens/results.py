"""Results that print short, show as a table in a notebook, and leave as a DataFrame or a file.

A result type mixes in [`TabularResult`][nla_lens.results.TabularResult], writes two methods and declares its
columns:

* ``to_records()``: one flat ``dict`` per row (str / int / float / bool / None, or a list of str);
* ``summary()``: one line that says what the result holds (counts, FVE, the baseline used);
* ``schema``: every column of the rows and its arrow type, so that an empty result, or a column that is None in
  every row (no baseline, every parse failed), keeps the columns and types of any other run's table; and
  ``optional_columns``, those of them its rows may leave out, where there are any.

Its fields are described once, in an ``Attributes:`` section of its docstring: what ``help()`` shows. A result
that keeps warnings (a round trip's instead of emitting them; `verbalize`'s and `steer_with_words`' as well as
emitting them) names where in ``warnings_at``; its repr and view count them.

It then has ``to_pandas()``, ``save(path)`` (``.parquet``, ``.jsonl``, or ``.html`` for the notebook
view as a standalone page; [`read_result`][nla_lens.results.read_result] reads the rows back, and from a
``.parquet`` file the result type, summary and warnings), a short ``__repr__`` (the summary and the first rows, never a
tensor) and ``_repr_html_`` (the summary and an HTML table, from [`nla_lens.display`][nla_lens.display]). A result
with a richer view (tokens coloured by FVE) overrides ``_repr_html_``. Tensors stay attributes. Dataclass results
are declared with ``repr=False`` so that the mixin's ``__repr__`` is the one Python uses, and those holding
tensors with ``eq=False``: a generated ``==`` compares the tensors and raises.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from nla_lens import __version__, display
from nla_lens.checks import check_input_file, check_output_path, counted, file_kind, file_path, jsonl_objects
from nla_lens.errors import InputError
from nla_lens.vector_files import OUTPUT_SUFFIXES, json_text, write_atomic, write_table

if TYPE_CHECKING:
    import pandas as pd

SAVE_SUFFIXES = (".parquet", ".jsonl", ".html")
RESULT_KEY = "nla_lens_result"  # a .parquet file's schema metadata key for what read_result puts in df.attrs
_REPR_ROWS = 5
_REPR_CELL = 60
# The result types `import nla_lens` does not load, by the name a .parquet file records: the module and name that
# declare their columns, which read_result imports to check such a file in a process that has not loaded the type.
# The SAE types' columns are declared apart from their modules, which need sae-lens: a read needs none.
_DECLARED_ELSEWHERE = {"FeatureVerbalizations": ("nla_lens.sae_columns", "FEATURE_VERBALIZATIONS"),
                       "FeatureCard": ("nla_lens.sae_columns", "FEATURE_CARD"),
                       "SAEExperimentResult": ("nla_lens.sae_columns", "SAE_EXPERIMENT"),
                       "SteerWordsExperiment": ("nla_lens.toy.steer_words_experiment", "SteerWordsExperiment")}


class TabularResult:
    """Mixin for result types: a table of flat rows plus a one-line summary (see the module docstring)."""

    #: Columns shown by ``repr`` and ``_repr_html_`` (all columns when None), in this order.
    display_columns: ClassVar[tuple[str, ...] | None] = None
    #: Every column the rows can have, in order, with its arrow type (None: inferred from the rows). The files keep
    #: these types, and an empty result these columns, where rows alone would give no column or arrow's null type.
    schema: ClassVar[pa.Schema | None] = None
    #: Columns of ``schema`` that the rows may leave out (a steering run without continuations), or that files saved
    #: before the type had them lack (an `Explanation`'s ``input_text``): `read_result` does not ask a file for them.
    optional_columns: ClassVar[tuple[str, ...]] = ()
    #: Columns that a command's file of this type holds before the rows' own, to say what each row reads (`nla-lens
    #: verbalize --text`'s input_text, position and token): never in ``to_records()``, but `read_result` reads a file
    #: that has them as this type, with their types. None where no command writes any.
    context_schema: ClassVar[pa.Schema | None] = None
    #: Where the result keeps warnings that its summary does not spell out (``"warnings"``,
    #: ``"round_trip.warnings"``), which ``repr`` and the view then count and point to and a ``.parquet`` file keeps;
    #: None where it keeps none.
    warnings_at: ClassVar[str | None] = None

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per row: what ``to_pandas`` and ``save`` write."""
        raise NotImplementedError

    def summary(self) -> str:
        """One line: what the result holds."""
        return counted(len(self.to_records()), 'row')

    def to_pandas(self) -> pd.DataFrame:
        """The rows as a `pandas.DataFrame` (one column per record key); `read_result` reads the same frame back
        from a saved file."""
        return records_frame(self.to_records(), self.schema)

    def save(self, path: str | Path) -> Path:
        """Write the rows to ``.parquet`` or ``.jsonl``, or the notebook view to a self-contained ``.html`` page.

        A ``.parquet`` file also keeps the result type, the summary line (FVE, baseline, failed parses), the
        nla_lens version and, for a type that keeps warnings (see ``warnings_at``), the warnings (a failed
        injection, no FVE) in its schema metadata, which `read_result` gives back; a ``.jsonl`` file, one JSON
        object per line, holds the rows alone."""
        path = check_save_path(path)
        if file_kind(path) == ".html":
            page = display.page(type(self).__name__, self._repr_html_())
            write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
            return path
        write_rows(self, self.to_records(), path)
        return path

    def __repr__(self) -> str:
        records = self.to_records()
        columns = self._shown_columns(records)
        # Control characters escaped, as in the rows and the views: a summary may quote model text or an SAE's metadata
        lines = [f"{type(self).__name__}: {display.format_cell(self._headline())}"]
        if records and columns:
            lines += text_table(records[:_REPR_ROWS], columns)
            if len(records) > _REPR_ROWS:
                lines.append(f"  ... {len(records) - _REPR_ROWS} more rows (.to_pandas() shows them all)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        records = self.to_records()
        return display.result_html(type(self).__name__, self._headline(), records, self._shown_columns(records),
                                   self._held_warnings())

    def _headline(self) -> str:
        """The summary, and how many warnings the result holds and where ("1 warning (.warnings)"): most types keep
        them without also emitting Python warnings, so a notebook's repr and view are where a user learns of them.
        Not part of `summary`, which the commands print before the warnings themselves."""
        held = self._held_warnings()
        if not held:
            return self.summary()
        return f"{self.summary()}; {counted(len(held), 'warning')} (.{self.warnings_at})"

    def _held_warnings(self) -> list[str]:
        """The warnings found at ``warnings_at``; none where the type keeps none."""
        if self.warnings_at is None:
            return []
        held: Any = self
        for name in self.warnings_at.split("."):  # None on the way (a study run without an AR): none held
            held = getattr(held, name, None)
        return list(held or [])

    def _shown_columns(self, records: list[dict[str, Any]]) -> list[str]:
        if self.display_columns is not None:  # those the rows have: optional columns may be absent
            return [c for c in self.display_columns if not records or c in records[0]]
        return list(records[0]) if records else []


@dataclass(frozen=True)
class ResultColumns:
    """What a result type's rows hold, apart from the type: what `read_result` checks a saved file against.

    Attributes:
        name: the type's name, as a ``.parquet`` file records it.
        schema: every column of the rows and its arrow type (the type's ``schema``, with its ``context_schema``).
        optional_columns: those the rows may leave out (the type's ``optional_columns``, and its
            ``context_schema``'s).
    """

    name: str
    schema: pa.Schema
    optional_columns: tuple[str, ...] = ()

    @classmethod
    def of(cls, result_type: type[TabularResult]) -> ResultColumns | None:
        """`result_type`'s columns, those a command may add (``context_schema``) among the optional ones; None for a
        type that declares none (a `TrainingRun`'s depend on its command)."""
        schema = file_schema(result_type)
        if schema is None:
            return None
        context = result_type.context_schema.names if result_type.context_schema is not None else []
        return cls(result_type.__name__, schema, (*result_type.optional_columns, *context))


def write_rows(result: TabularResult, records: list[dict[str, Any]], path: Path) -> None:
    """`records` as `result`'s rows in the ``.parquet`` or ``.jsonl`` file `path` (checked by the caller), with a
    ``.parquet`` file's metadata as `save` writes it: `save` passes ``to_records()``, `nla-lens verbalize --text`
    those rows with the type's ``context_schema`` columns, so that its file reads back as `result`'s type too."""
    table = records_table(records, file_schema(type(result)) if records else result.schema)
    if file_kind(path) == ".parquet":
        record: dict[str, str | list[str]] = {"result_type": type(result).__name__, "summary": result.summary(),
                                              "nla_lens_version": __version__}
        if result.warnings_at is not None:
            record["warnings"] = result._held_warnings()
        try:
            table = table.replace_schema_metadata({RESULT_KEY: json_text(record)})
        except UnicodeEncodeError:
            _refuse_lone_surrogate([("the summary", record["summary"]), *(
                (f"warning {i}", w) for i, w in enumerate(record.get("warnings", [])))])
            raise
    write_table(table, path)


def file_schema(result_type: type[TabularResult]) -> pa.Schema | None:
    """Every column a file of `result_type` may hold: its ``schema``, and its ``context_schema`` where it has one."""
    if result_type.schema is None or result_type.context_schema is None:
        return result_type.schema
    return pa.schema([*result_type.context_schema, *result_type.schema])


def check_save_path(path: str | Path, what: str = "output") -> Path:
    """Checked before writing: a known suffix, an existing folder, not a folder itself. `~` is expanded, as
    checkpoint paths are. `what` names the path in messages (a command's flag, e.g. "--output")."""
    path = file_path(path, "save")
    if file_kind(path) not in SAVE_SUFFIXES:
        raise InputError(f"{what} {path}: save to a .parquet or .jsonl file (the rows) or an .html file (the view)")
    check_output_path(path, SAVE_SUFFIXES, what)
    return path


def read_result(path: str | Path, result_type: type[TabularResult] | None = None) -> pd.DataFrame:
    """The rows of a result that `save` (or an `nla-lens` file job) wrote to ``.parquet`` or ``.jsonl``: the frame
    ``to_pandas()`` gave.

    From a ``.parquet`` file, ``df.attrs`` holds what the rows alone cannot say: ``result_type`` (e.g.
    ``"RoundTrip"``), ``summary`` (its summary line: FVE, which baseline, failed parses), ``nla_lens_version`` and,
    for a type that keeps warnings (``RoundTrip``, ``Explanation``, ``SteeringResult``, ``PatchingStudy``,
    ``WordSteering``, ``FeatureCard``), ``warnings`` (a list, empty when none: a failed injection, no FVE); for a
    file job's output ``job`` (the record of what produced it) and ``warnings``. A ``.jsonl`` file holds the rows
    alone, as does a table nla_lens did not write, so ``attrs`` stays empty; nor does it say which type wrote it, so
    its column types are read off the values (a score None in every row is an object column, an empty file has no
    columns) unless ``result_type`` names the type whose ``save`` wrote it (e.g. ``nl.RoundTrip``): then they are
    that type's, as ``to_pandas()`` gives them (a ``TrainingRun``'s columns depend on its command, so there too they
    are read off the values). A ``.parquet`` file keeps its types; there ``result_type`` is checked against the one
    it records. A file whose columns are no longer its type's (edited by hand: a column dropped, a score made text) is
    an `InputError` naming what changed: a ``.parquet`` file is checked against ``result_type`` or the type it records
    (one this process has not imported too: the SAE types' check needs no sae-lens), a ``.jsonl`` file against
    ``result_type``, and each of its rows against the first row's columns."""
    path = file_path(path, "read_result")
    kind = file_kind(path)
    if path.is_dir():  # e.g. a file job's `<output>.shards` folder, which a suffix check would call a ".shards file"
        raise InputError(f"{path} is a folder: read_result reads one .parquet or .jsonl file that a result's save() "
                         "or an nla-lens job wrote (a job's merged rows are in its --output file, beside its .shards "
                         "folder)")
    if kind == ".html":
        raise InputError(f"{path} is a result's HTML view, which holds no table to read back; read_result reads the "
                         ".parquet or .jsonl file that save() wrote (save to .parquet to keep the summary too)")
    if kind == ".safetensors":  # what WordSteering.save_vectors (and `nla-lens reconstruct --output`) writes
        raise InputError(f"{path} holds tensors, not a result's rows: safetensors.torch.load_file(path) loads them "
                         "(activation vectors, reconstructions), and nl.WordSteering.fwd_hooks_from(path) reads the "
                         "steering that save_vectors wrote; read_result reads the .parquet or .jsonl file save() wrote")
    if kind not in OUTPUT_SUFFIXES:
        raise InputError(f"{path}: read_result reads the .parquet or .jsonl file a result's save() or an nla-lens "
                         f"job wrote, not a {path.suffix or 'suffixless'} file")
    check_input_file(path, "result file")
    if result_type is not None:
        _check_result_type(result_type)
    if kind == ".jsonl":
        return _read_jsonl(path, result_type)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - arrow raises several types for a file that is not parquet
        raise InputError(f"{path} is not a parquet file ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); "
                         "read_result reads the tables a result's save() or an nla-lens job wrote") from exc
    metadata = table.schema.metadata or {}
    record = _saved_record(metadata, RESULT_KEY.encode(), path)
    recorded = record.get("result_type")
    if result_type is not None and recorded is not None and recorded != result_type.__name__:
        raise InputError(f"{path} holds {recorded} rows, not {result_type.__name__} rows: pass "
                         f"result_type={recorded}, or none (a .parquet file keeps its column types)")
    expected = ResultColumns.of(result_type) if result_type is not None else _recorded_columns(recorded)
    if expected is not None:
        _check_parquet_columns(path, table.schema, expected, record)
    frame = table_frame(table)
    frame.attrs.update(record)
    from nla_lens.sharded import JOB_KEY  # here: sharded imports the result types, which import this module

    if JOB_KEY.encode() in metadata:
        frame.attrs["job"] = _saved_record(metadata, JOB_KEY.encode(), path)
    return frame


def _saved_record(metadata: dict[bytes, bytes], key: bytes, path: Path) -> dict[str, Any]:
    """The JSON object nla_lens wrote under `key` of a parquet file's schema metadata; {} when there is none."""
    if key not in metadata:
        return {}
    try:
        record = json.loads(metadata[key])
    except ValueError as exc:
        raise InputError(f"{path}: its schema metadata {key.decode()!r} is not JSON ({exc}); the file was not written "
                         "by nla_lens, or was damaged") from exc
    if not isinstance(record, dict):
        raise InputError(f"{path}: its schema metadata {key.decode()!r} holds a {type(record).__name__}, not the "
                         "JSON object nla_lens writes")
    return record


def _check_result_type(result_type: Any) -> None:
    if not (isinstance(result_type, type) and issubclass(result_type, TabularResult)
            and result_type is not TabularResult):
        raise InputError(f"result_type={result_type!r} is not a result type: pass the class whose save() wrote the "
                         "file (nl.RoundTrip, nl.SteeringResult, ...), or none")


def _read_jsonl(path: Path, result_type: type[TabularResult] | None) -> pd.DataFrame:
    """A .jsonl result's rows (one JSON object per line), as `to_pandas` builds its frame from records: with
    `result_type`'s schema when it is given."""
    lines = list(jsonl_objects(path, "result file", "read_result reads the .jsonl file a result's save() wrote, "
                                                  "one JSON object (a row) per line"))
    records = [row for _, row in lines]
    if records:
        _refuse_label_file(path, records[0])
        _check_same_columns(path, lines)
    declared = None if result_type is None else ResultColumns.of(result_type)
    if result_type is None or declared is None:  # no type, or one whose columns vary (TrainingRun): from the values
        return records_frame(records)
    if not lines:  # the columns of an empty result of the type, not those a command's rows may add
        return records_frame(records, result_type.schema)
    _check_jsonl_columns(path, lines, declared)
    return records_frame(records, declared.schema)


def _recorded_columns(name: str | None) -> ResultColumns | None:
    """The columns of the result type a .parquet file records by `name`: of the one loaded type of that name, else
    those `_DECLARED_ELSEWHERE` declares (`import nla_lens` loads all but the SAE and toy experiment types); None
    where two loaded types share the name, or none has it (a file nla_lens did not write)."""
    found = [kind for kind in _result_types(TabularResult) if kind.__name__ == name]
    if found:
        return ResultColumns.of(found[0]) if len(found) == 1 else None
    return _declared_elsewhere(name) if name in _DECLARED_ELSEWHERE else None


def _declared_elsewhere(name: str) -> ResultColumns | None:
    """The columns of `name` that `_DECLARED_ELSEWHERE` points to, imported: a declaration, or the type itself."""
    module, declaration = _DECLARED_ELSEWHERE[name]
    declared = getattr(import_module(module), declaration)
    return declared if isinstance(declared, ResultColumns) else ResultColumns.of(declared)


def _result_types(parent: type[TabularResult]) -> set[type[TabularResult]]:
    return {kind for child in parent.__subclasses__() for kind in {child, *_result_types(child)}}


def _check_parquet_columns(path: Path, schema: pa.Schema, declared: ResultColumns, record: dict[str, Any]) -> None:
    """A parquet file holds the `declared` columns, each of its kind: one edited by hand (a column dropped, a score
    made text) read back as a frame that `to_pandas()` never gave, under the type and summary it records. Widths
    aside (pandas writes text as large_string, and a column None in every row as null), as `_holds` reads JSON."""
    expected = declared.schema
    problems = _column_problems(schema.names, declared)
    problems += [f"column {field.name!r} is {field.type}, not {expected.field(field.name).type}" for field in schema
                 if field.name in expected.names and not _same_kind(field.type, expected.field(field.name).type)]
    if not problems:
        return
    if "result_type" not in record:
        why = ("It records no result type (a result's save() did not write it): read it without result_type= to get "
               "its rows as they are")
    else:
        version = record.get("nla_lens_version", __version__)
        wrote = "" if version == __version__ else (f" (by nla_lens {version}, whose columns may differ: this is "
                                                   f"{__version__})")
        why = (f"The file was edited or damaged since save() wrote it{wrote}: save the result again, or read the "
               "file as it is with pandas.read_parquet(path)")
    raise InputError(f"{path} does not hold {declared.name} rows: {'; '.join(problems)}. {why}")


def _same_kind(kind: pa.DataType, declared: pa.DataType) -> bool:
    """Whether a parquet column of arrow type `kind` holds what a column `declared` does: integers, floats, booleans,
    text, or lists of one of those; a null column (None in every row) holds anything."""
    if pa.types.is_null(kind):
        return True
    if pa.types.is_list(declared) or pa.types.is_large_list(declared):
        return ((pa.types.is_list(kind) or pa.types.is_large_list(kind))
                and _same_kind(kind.value_type, declared.value_type))
    return any(test(kind) and test(declared) for test in (pa.types.is_integer, pa.types.is_floating,
                                                           pa.types.is_boolean, _is_text))


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _check_same_columns(path: Path, lines: list[tuple[int, dict[str, Any]]]) -> None:
    """Every row of a .jsonl file has the first row's columns, as `save` writes them: a row that lacks one (edited
    by hand) read back with NaN there."""
    first_line, first = lines[0]
    for line_no, row in lines[1:]:
        if row.keys() != first.keys():
            lacks, extra = [c for c in first if c not in row], [c for c in row if c not in first]
            differs = "; ".join(part for part in (lacks and f"lacks {lacks}", extra and f"adds {extra}") if part)
            raise InputError(f"{path}:{line_no}: its row {differs} beside line {first_line}'s columns; every row a "
                             "result's save() writes has the same columns: the file was edited or damaged")


def _check_jsonl_columns(path: Path, lines: list[tuple[int, dict[str, Any]]], declared: ResultColumns) -> None:
    """The rows of a .jsonl file hold the `declared` columns, each value of its column's type (or null)."""
    problems = _column_problems(list(lines[0][1]), declared)
    if problems:
        raise InputError(f"{path}: its rows are not {declared.name} rows: {'; '.join(problems)}. Pass the "
                         "result_type whose save() wrote the file, or none (as for an nla-lens file job's output, "
                         "whose columns are its own)")
    for line_no, row in lines:
        for name, value in row.items():
            kind = declared.schema.field(name).type
            if value is not None and not _holds(kind, value):
                raise InputError(f"{path}:{line_no}: {name} is {json_text(value)[:60]}, which the {name} "
                                 f"of {declared.name} rows ({kind}) cannot be: pass the result_type whose "
                                 "save() wrote the file, or none")


def _column_problems(columns: Sequence[str], declared: ResultColumns) -> list[str]:
    """Columns that the `declared` type's rows have not, and those its rows always have that are missing."""
    names = declared.schema.names
    unknown = [name for name in columns if name not in names]
    missing = [name for name in names if name not in columns and name not in declared.optional_columns]
    return ([f"it has the columns {unknown}, which {declared.name} rows have not"] if unknown else []) + (
        [f"it lacks the columns {missing}, which {declared.name}.save() writes"] if missing else [])


def _holds(kind: pa.DataType, value: Any) -> bool:
    """Whether a JSON `value` fits arrow type `kind` (those the result types declare: int, float, bool, str, lists
    of them); an int fits a float column, as JSON from elsewhere may write 2.0."""
    if pa.types.is_list(kind):
        return isinstance(value, list) and all(item is None or _holds(kind.value_type, item) for item in value)
    if pa.types.is_boolean(kind):
        return isinstance(value, bool)
    if pa.types.is_integer(kind):
        return isinstance(value, int) and not isinstance(value, bool)
    if pa.types.is_floating(kind):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def _refuse_label_file(path: Path, first_row: dict[str, Any]) -> None:
    """A label file (`save_explanations`) starts with the record of the extraction it labels, which is no row of a
    result: read as one, that record became a row of nulls."""
    from nla_lens.training.dataset import is_extraction_record  # here: the training package is not needed elsewhere

    if is_extraction_record(first_row):
        raise InputError(f"{path} is a label file (its first line records the extraction it labels), not a result's "
                         "rows: nla_lens.training.label_activations(load_activations(FOLDER), path) reads it with "
                         "the activations it labels, or pandas.read_json(path, lines=True) reads its lines as they "
                         "are")


def records_frame(records: list[dict[str, Any]], schema: pa.Schema | None = None) -> pd.DataFrame:
    """Records as a DataFrame, one column per key, with `schema`'s columns and dtypes when there are no records and
    its float columns float64 (a score None in every row: float, not object)."""
    import pandas as pd

    if not records:
        return records_table(records, schema).to_pandas()
    frame = pd.DataFrame.from_records(records)
    floats = [f.name for f in schema or () if pa.types.is_floating(f.type) and f.name in frame.columns]
    return frame.astype(dict.fromkeys(floats, "float64"))


def table_frame(table: pa.Table) -> pd.DataFrame:
    """``records_frame(table.to_pylist(), table.schema)`` without a dict per row, which took seconds for each million
    rows of a job's output: arrow converts each column, then one whose dtype differs from what the rows give is set
    as they give it (int32 -> int64, float32 -> float64, None in every row -> object). Types that arrow converts
    otherwise (lists, dates, dictionaries) go through the rows, one column at a time."""
    if table.num_rows == 0 or len(set(table.column_names)) < table.num_columns:
        return records_frame(table.to_pylist(), table.schema)
    frame = table.to_pandas(ignore_metadata=True)  # a pandas-written index stays a column, as in the rows
    for field, column in zip(table.schema, table.columns, strict=True):
        name, kind = field.name, field.type
        if not _converts_as_the_rows_do(kind):
            frame[name] = records_frame(table.select([name]).to_pylist())[name]
        elif pa.types.is_floating(kind):
            frame[name] = frame[name].astype("float64")
        elif column.null_count == len(column):  # the rows' None in every row: an object column
            frame[name] = None
        elif pa.types.is_integer(kind) and column.null_count == 0:  # with a None, arrow and the rows give float64
            frame[name] = frame[name].astype("int64")
    return frame


def _converts_as_the_rows_do(kind: pa.DataType) -> bool:
    """`table.to_pandas` gives this type's column the values (and, ints and floats widened, the dtype) that
    `records_frame` gives it from the rows: a uint64 past int64 stays uint64 there, a list is a list."""
    return (pa.types.is_signed_integer(kind) or pa.types.is_unsigned_integer(kind) and kind.bit_width < 64
            or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_string(kind)
            or pa.types.is_large_string(kind) or pa.types.is_null(kind))


def records_table(records: list[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """Records as an arrow table with `schema`'s types for the columns the records have (every column of it when
    there are no records). Inferred types give an empty result no columns and a column that is None in every row
    arrow's null type, which readers take for no value at all and which will not concatenate with another run's."""
    if schema is not None and records:
        schema = pa.schema([schema.field(name) for name in records[0]])
    try:
        return pa.Table.from_pylist(records, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"{_mixed_column(records) or 'the rows'} cannot be written as one arrow column ({exc}): a "
                         ".parquet or .jsonl file holds one kind of value per column. Make the column one kind "
                         "(to_pandas() gives the rows as they are), or save as .html") from exc
    except UnicodeEncodeError:
        _refuse_lone_surrogate((f"column {column!r} row {row}", value)
                               for row, record in enumerate(records) for column, value in record.items())
        raise


def _refuse_lone_surrogate(named_values: Iterable[tuple[str, Any]]) -> None:
    """An `InputError` naming the first value (text, or text in a list) that holds a lone surrogate, which arrow
    could not encode: its bare UnicodeEncodeError named no column and no row."""
    for name, value in named_values:
        char = _lone_surrogate(value)
        if char is not None:
            raise InputError(f"{name} holds {char!r}, a lone surrogate (a JSON '\\ud800' escape or a file read with "
                             "errors='surrogateescape' leaves one), which UTF-8 cannot encode, so no .parquet or "
                             ".jsonl file can hold it. Save as .html, whose view shows it as its escape, or replace "
                             "it (to_pandas() gives the rows; text.encode('utf-8', 'replace').decode('utf-8') "
                             "replaces it with '?')")


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in `value` (text, or text in lists and mappings), None where there is none."""
    if isinstance(value, str):
        return next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    if isinstance(value, dict):
        return _lone_surrogate([*value.keys(), *value.values()])
    if isinstance(value, (list, tuple)):
        return next((char for item in value if (char := _lone_surrogate(item)) is not None), None)
    return None


def _mixed_column(records: list[dict[str, Any]]) -> str | None:
    """The first column whose rows hold values of two kinds (a number in one, text in another), naming a row of
    each; None where every column holds one kind."""
    for column in dict.fromkeys(key for record in records for key in record):
        first: tuple[int, Any] | None = None
        for row, record in enumerate(records):
            value = record.get(column)
            if value is None:
                continue
            if first is None:
                first = row, value
            elif _value_kind(value) != _value_kind(first[1]):
                return (f"column {column!r} (row {first[0]}: {_value_kind(first[1])} {json_text(first[1])[:40]}; "
                        f"row {row}: {_value_kind(value)} {json_text(value)[:40]})")
    return None


def _value_kind(value: Any) -> str:
    """What arrow makes of a cell's value: an int and a float share a column, a flag or text does not."""
    if isinstance(value, bool):
        return "a flag"
    if isinstance(value, (int, float)):
        return "a number"
    return "text" if isinstance(value, str) else f"a {type(value).__name__}"


def _shown(record: dict[str, Any], column: str) -> Any:
    """A cell's value as a repr shows it: a token with its whitespace visible, a failed parse marked."""
    value = record.get(column)
    if column == "token" and isinstance(value, str):
        return display.visible_token(value)
    return display.unparsed_cell(record, column) or value


def text_table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """Rows as aligned plain-text lines (a header, then one line per record), for reprs."""
    cells = [[display.format_cell(_shown(r, c), _REPR_CELL, c) for c in columns] for r in records]
    headers = [display.header(c) for c in columns]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [display.numeric_column(records, c) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  " + "  ".join(v.rjust(w) if num else v.ljust(w)
                                for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return [line(headers)] + [line(row) for row in cells]
