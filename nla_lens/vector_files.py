"""Vector files in, result tables out: .safetensors / .pt / .parquet inputs, .parquet / .jsonl outputs.

A parquet input keeps its provenance: its scalar columns (ids, doc_id, position, ...) travel with
each vector to the output rows. Every write goes to a temporary name first and is then renamed, so
a reader (or a resumed job) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save, save_file
from torch import Tensor

from nla_lens.checks import (
    check_input_file,
    check_output_path,
    file_kind,
    leads_round_a_loop,
    loop_refusal,
    warn_at_caller,
)
from nla_lens.errors import ConfigError, InputError

# Column names the jobs write; an input column of the same name would be overwritten.
RESULT_COLUMNS = ("index", "explanation", "text", "truncated", "mse", "miss")


@dataclass(frozen=True)
class VectorTable:
    """Vectors to explain, with the input's scalar columns (none unless read from parquet)."""

    vectors: Float[Tensor, "n d_model"]
    columns: pa.Table


def read_vectors(path: Path) -> Float[Tensor, "n d_model"]:
    """Vectors from .safetensors or .pt (weights_only load): a bare tensor (.pt), or of several tensors the one
    named `vectors`, or the only one."""
    if file_kind(path) not in (".safetensors", ".pt"):
        hint = ("; convert it once: torch.save(torch.from_numpy(numpy.load(path)).float(), 'vectors.pt')"
                if file_kind(path) == ".npy" else "")  # NumPy's own format, the one a newcomer most often has
        raise InputError(f"{path}: expected a .safetensors, .pt or .parquet file of [n, d_model] vectors{hint}")
    check_input_file(path, "vector file")
    if file_kind(path) == ".safetensors":
        return _named_vectors(_readable(path, lambda: load_file(str(path))), path)
    # tensors only: no pickled code runs. On the CPU: a tensor saved from a GPU (or one that required grad)
    # is read as its values, as a CPU-only machine can and as the job's input hash needs.
    loaded = _readable(path, lambda: torch.load(path, weights_only=True, map_location="cpu"))
    if isinstance(loaded, dict):
        loaded = _named_vectors(loaded, path)
    if not isinstance(loaded, Tensor):
        raise InputError(f"{path} must hold a [n, d_model] tensor, got {type(loaded).__name__}; save the bare "
                         "tensor (torch.save(vectors, path)) or a dict with a 'vectors' entry")
    return loaded.detach()


def _named_vectors(tensors: dict[str, Any], path: Path) -> Any:
    """The entry named `vectors`, else the only one: one rule for a .safetensors file and a .pt dict."""
    if "vectors" not in tensors and len(tensors) != 1:
        raise InputError(f"{path} holds {sorted(map(str, tensors))}: which is the [n, d_model] vectors? Name that "
                         "tensor 'vectors' ({'vectors': v, ...}), or save it alone")
    return tensors.get("vectors", next(iter(tensors.values())))


def _readable(path: Path, read: Callable[[], Any]) -> Any:
    """`read()`, with a corrupt or mislabelled file reported as such rather than as the reader's traceback. A file
    this process may not read is the OS's PermissionError (the CLI's exit 1), met by opening it first: safetensors
    called it missing (FileNotFoundError) and torch's error read as a corrupt file."""
    path.open("rb").close()
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and arrow each raise their own types
        objects = _pickled_objects(path) if file_kind(path) == ".pt" else []
        if objects:
            raise InputError(_pickled_objects_message(path, objects)) from exc
        # torch's own text suggests weights_only=False, which would run pickled code: never pass that on.
        detail = "" if file_kind(path) == ".pt" else f" ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
        raise InputError(f"{path} cannot be read as a {path.suffix} file of vectors{detail}; is it corrupt or of "
                         "another format? Write vectors with safetensors.torch.save_file({'vectors': v}, path)"
                         ) from exc


def _pickled_objects(path: Path) -> list[str]:
    """The Python objects besides tensors that a .pt file pickles (a NumPy array's `numpy.ndarray`, ...), which the
    weights-only load refuses; listed without running the pickle. Empty for a file torch.save did not write."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a torch.save zip file: corrupt, or of another format
        return []


def _pickled_objects_message(path: Path, objects: list[str]) -> str:
    """Why a .pt file that torch.save wrote is refused, and how to save its vectors as tensors."""
    why = (f"nla_lens reads a .pt file with torch.load(weights_only=True), so that no pickled code runs, which "
           f"refuses the pickled {', '.join(objects)}")
    if "numpy.ndarray" in objects:
        return (f"{path} holds a NumPy array, not a torch tensor: {why}. Save the array as a tensor, "
                "torch.save(torch.from_numpy(array), path), or as safetensors, "
                "safetensors.torch.save_file({'vectors': torch.from_numpy(array)}, 'vectors.safetensors')")
    return (f"{path} holds Python objects besides tensors: {why}. Save the vectors as a bare tensor "
            "(torch.save(vectors, path)) or with safetensors.torch.save_file({'vectors': v}, path)")


def read_input(path: Path, column: str | None = None) -> VectorTable:
    """A vector file as a `VectorTable`; `column` names the vector column of a parquet file."""
    if file_kind(path) != ".parquet":
        if column is not None:
            raise InputError(f"--column only applies to parquet inputs, not {path.name}")
        return VectorTable(read_vectors(path), pa.table({}))
    check_input_file(path, "vector file")
    table = _readable(path, lambda: pq.read_table(path))
    name = _vector_column(table.schema, column, path)
    carried = [f.name for f in table.schema if f.name != name and not pa.types.is_nested(f.type)]
    dropped = [f.name for f in table.schema if f.name != name and pa.types.is_nested(f.type)]
    if dropped:
        warn_at_caller(f"{path}: columns {dropped} are lists or structs and are not copied to the output rows (only "
                       "scalar columns are); keep what you need from them by the output's index column")
    clash = sorted(set(carried) & set(RESULT_COLUMNS))
    if clash:
        raise InputError(f"{path} has columns {clash}, which the output writes itself; rename them")
    return VectorTable(_to_tensor(table.column(name), name, path), table.select(carried))


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _is_float_list(kind: pa.DataType) -> bool:
    return _is_list(kind) and pa.types.is_floating(kind.value_type)


def _vector_column(schema: pa.Schema, column: str | None, path: Path) -> str:
    """The named column, or the only list-of-floats column."""
    if column is not None:
        if column not in schema.names:
            raise InputError(f"{path} has no column {column!r}; its columns are {schema.names}")
        if not _is_float_list(schema.field(column).type):
            raise InputError(f"{path}: column {column!r} is {schema.field(column).type}, not a list of floats")
        return column
    candidates = [f.name for f in schema if _is_float_list(f.type)]
    other_lists = [f"{f.name!r} ({f.type})" for f in schema if _is_list(f.type) and not _is_float_list(f.type)]
    if not candidates and other_lists:  # --column would only refuse it next: the fix is in the file
        raise InputError(f"{path}: expected a list-of-floats column for the vectors, found lists of other values: "
                         f"{', '.join(other_lists)}; write the vectors as floats (e.g. list<float32>)")
    if len(candidates) != 1:
        found = f"several: {candidates}" if candidates else "none"
        raise InputError(f"{path}: expected exactly one list-of-floats column for the vectors, found {found}; "
                         "name it with --column")
    return candidates[0]


def _to_tensor(values: pa.ChunkedArray, name: str, path: Path) -> Float[Tensor, "n d_model"]:
    values = values.combine_chunks()
    if len(values) == 0:  # else its width reads as 0: "shape [n, d_model], got (0, 0)" hides that it is empty
        raise InputError(f"{path}: column {name!r} has no rows; there is nothing to explain")
    if values.null_count:
        raise InputError(f"{path}: column {name!r} has {values.null_count} null rows; drop or fill them")
    lengths = sorted(pc.unique(pc.list_value_length(values)).to_pylist())
    if len(lengths) > 1:
        raise InputError(f"{path}: column {name!r} holds vectors of lengths {lengths[:8]}; "
                         "every row must have d_model values")
    width = lengths[0] if lengths else 0
    flat = values.flatten()
    if flat.null_count:  # to_numpy reads them as NaN, which the vector check then named as NaN or Inf
        rows = sorted(set(pc.filter(pc.list_parent_indices(values), pc.is_null(flat)).to_pylist()))
        raise InputError(f"{path}: column {name!r} holds null values inside rows {rows[:8]}"
                         f"{' ...' if len(rows) > 8 else ''}; fill or drop them")
    # a copy: arrow's buffers are read-only
    return torch.tensor(flat.to_numpy(zero_copy_only=False)).reshape(len(values), width)


OUTPUT_SUFFIXES = (".parquet", ".jsonl")


def check_output(path: Path) -> None:
    """Checked before a job starts, so a typo does not surface only after hours of work."""
    check_output_path(path, OUTPUT_SUFFIXES)


def write_table(table: pa.Table, path: Path) -> None:
    """Write `table` as .parquet or .jsonl (one JSON object per row), atomically."""
    check_output(path)
    if file_kind(path) == ".parquet":
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))
    else:
        write_atomic(path, lambda tmp: tmp.write_text(
            "".join(json_text(row) + "\n" for row in table.to_pylist()), encoding="utf-8"))


def write_json(path: Path, value: Any, indent: int) -> None:
    """`value` as strict JSON (`json_text`) with a final newline, written atomically (`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_text(json_text(value, indent=indent) + "\n", encoding="utf-8"))


def json_text(value: Any, indent: int | None = None) -> str:
    """Strict JSON: a NaN or infinite float (a metric not computed, a failed parse's MSE) becomes null,
    since jq, JavaScript and most JSON readers outside Python reject Python's `NaN` literal."""
    return json.dumps(_finite_or_null(value), ensure_ascii=False, default=str, indent=indent, allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


def write_vectors(vectors: Float[Tensor, "n d_model"], path: Path) -> None:
    """Write vectors as .safetensors (tensor `vectors`) or .pt (the tensor alone), atomically; both read back
    with `read_vectors`."""
    vectors = vectors.detach().contiguous().cpu()
    if file_kind(path) == ".safetensors":
        data = save({"vectors": vectors})
    elif file_kind(path) == ".pt":
        buffer = io.BytesIO()
        torch.save(vectors, buffer)
        data = buffer.getvalue()
    else:
        raise InputError(f"{path}: vectors are written as .safetensors or .pt")
    # Serialised in memory and written by Python: a full disk or a folder one may not write is an OSError
    # (the CLI's exit 1), where save_file and torch.save to a path raise their own exception types.
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, through `write_atomic`: readable by the other users of a shared machine (it
    creates its files 0600), and never half-written under `path`."""
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a private temporary name beside `path`, then rename: readers never see half a file,
    and a write that fails leaves nothing behind (a large shard's half would only fill the disk). The file
    gets the mode `open()` gives (0666 less the umask) whatever mode `write` left it with, where the filesystem
    keeps modes: one that refuses chmod (some FUSE and SMB mounts) keeps the written file as it is. A symlink's target
    is written, as `open()` writes it, and the link kept: renaming onto the link replaced it, the target left stale; a
    link that leads round a loop is an `InputError` (`link_target`)."""
    path = link_target(path, "file") if path.is_symlink() else path
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.touch(exist_ok=False)
        created_mode = stat.S_IMODE(tmp.stat().st_mode)
        write(tmp)
        if stat.S_IMODE(tmp.stat().st_mode) != created_mode:  # safetensors replaces the file with a 0600 one
            with contextlib.suppress(OSError):  # the mode is a courtesy; failing here lost the finished write
                tmp.chmod(created_mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_folders(folders: Sequence[Path], before_swap: Callable[[], object] | None = None
                     ) -> Iterator[list[Path]]:
    """Hidden temporary siblings to write `folders` into (named as `write_atomic` names its files), renamed into
    their places only once the block ends without an error, all together; a block that fails leaves the old folders
    as they were and removes the temporary ones. A folder written in place and cut short (Ctrl-C) loaded with old and
    new files mixed. The swap moves every old folder aside before moving any new one in, so a crash inside it leaves
    a folder missing, never some new folders beside old ones (a new AV beside the old AR). A symlink's target is
    replaced and the link kept, as `write_atomic` does: renaming onto the link replaced it, the target left stale; a
    link that leads round a loop is a `ConfigError` (`link_target`). `before_swap` runs once the new folders are
    written, just before the swap: a record of the old folders (a run's train_result.json) removed there never sits
    beside the new ones, which a crash after the swap left it doing."""
    folders = [link_target(folder) if folder.is_symlink() else folder for folder in folders]
    token = uuid.uuid4().hex
    staged = [folder.with_name(f".{folder.name}.{token}.tmp") for folder in folders]
    try:
        yield staged
        if before_swap is not None:
            before_swap()
        _swap_in(staged, folders, [folder.with_name(f".{folder.name}.{token}.old") for folder in folders])
    finally:
        for folder in staged:
            shutil.rmtree(folder, ignore_errors=True)


def link_target(link: Path, kind: Literal["file", "folder"] = "folder") -> Path:
    """Where the symlink `link` leads. One that leads round a loop (`checks.leads_round_a_loop`), of which
    `Path.resolve` raised a bare RuntimeError (Python 3.11) or said nothing (3.13), is refused naming the link, with
    the error its writer's other path refusals give: a `ConfigError` for a folder (an export's), an `InputError` for
    a file (as `check_output_path` refuses one)."""
    if leads_round_a_loop(link):
        error = InputError if kind == "file" else ConfigError
        raise error(loop_refusal(link, kind))
    return link.resolve()


def _swap_in(staged: list[Path], folders: list[Path], aside: list[Path]) -> None:
    """Rename each of `staged` to its place in `folders`, the old folders first renamed to `aside` and then deleted;
    a rename that fails puts back what was moved."""
    moved: list[tuple[Path, Path]] = []  # (from, to), in order, to undo
    try:
        for folder, old in zip(folders, aside, strict=True):
            if os.path.lexists(folder):
                os.replace(folder, old)
                moved.append((folder, old))
        for new, folder in zip(staged, folders, strict=True):
            os.replace(new, folder)
            moved.append((new, folder))
    except BaseException:
        for source, target in reversed(moved):
            os.replace(target, source)
        raise
    for old in aside:
        if old.exists():
            shutil.rmtree(old)
