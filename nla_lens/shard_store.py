"""The shards folder of a sharded job: its manifest, one parquet file per finished shard, the merge.

`<output>.shards/` holds `manifest.json` (every setting that determines the results) and
`shard-00000.parquet`, `shard-00001.parquet`, ... Shards are fixed-size chunks of consecutive input
rows, numbered independently of the world size, so a result never depends on how many ranks ran it.
A shard file exists only once it is complete (written under a temporary name, then renamed), so
"the file exists" is the whole resume rule.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from nla_lens.checks import check_writable, leads_round_a_loop, loop_refusal
from nla_lens.distributed import World
from nla_lens.errors import ConfigError, InputError
from nla_lens.vector_files import write_atomic

MANIFEST = "manifest.json"
SHARD_KEY = "nla_lens_manifest"  # a shard file's schema metadata: the manifest of the job that computed it
# Facts that older manifests lack, with the value they are read as. Those recorded neither the device nor a greedy
# job's batch size: a CPU job's shards resume (greedy CPU rows ignore batching); a GPU job's are refused.
_UNRECORDED = {"device": "cpu"}
# Facts no row depends on, not compared: a round trip's --baseline (older manifests recorded it) only rescales the FVE
# the merge computes, so another one takes no recomputed shard; the input's size changes with how the same vectors and
# columns were written (compression, a pandas or safetensors metadata header), and their hashes are compared; an
# output's job record adds the nla_lens version that merged it.
_NOT_ROW_FACTS = ("baseline", "input_bytes", "nla_lens_version")


class LocationFact(NamedTuple):
    """What the job's warning calls a moved input or checkpoint, and what showed its contents the same."""

    name: str
    shown_same_by: str


# Facts that say where a file or folder was found, not what it holds: the manifest records the input's size and content
# hashes and each checkpoint's fingerprint beside them, so the same bytes found at another path (a moved or renamed
# input or checkpoint) resume, and the job says so.
LOCATION_FACTS = {"input": LocationFact("input", "same vectors and columns"),
                  "av": LocationFact("AV", "same fingerprint of its files"),
                  "ar": LocationFact("AR", "same fingerprint of its files")}


def shard_folder(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def check_folder(folder: Path) -> None:
    """The shards folder can take shards, checked before any model loads: a file of its name, or a folder the job
    may not write, failed only at the first shard's write, with a bare OSError; so did a symlink that leads round a
    loop."""
    if leads_round_a_loop(folder):
        raise InputError(f"shards folder {loop_refusal(folder, 'folder')}")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, where the job keeps its shards in a folder of that name; move the file "
                         "or pass another output=")
    if folder.is_dir():
        check_writable(folder, "shards folder")


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.parquet"


def holds_shards(folder: Path) -> bool:
    """Whether any shard was finished in `folder` (a missing folder holds none)."""
    return any(folder.glob("shard-*.parquet"))


def shard_rows(n_rows: int, shard_size: int) -> list[range]:
    """The input rows of each shard: consecutive chunks of `shard_size` (>= 1, checked by the jobs; the last chunk
    may be shorter)."""
    return [range(start, min(start + shard_size, n_rows)) for start in range(0, n_rows, shard_size)]


def assigned_shards(n_shards: int, world: World, only: Sequence[int] | None = None) -> list[int]:
    """This rank's shards: every world_size-th of `only` (default: all shards), starting at its rank."""
    ids = list(range(n_shards)) if only is None else sorted(set(only))
    outside = [i for i in ids if not 0 <= i < n_shards]
    if outside:
        raise InputError(f"shards={outside} names shards that do not exist: this input has shards 0..{n_shards - 1}")
    return ids[world.rank::world.world_size]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest saved with the folder's first shard, as written; None before any shard was saved. Shards
    without it (a deleted manifest, shard files copied alone) cannot be checked against this run: with none,
    they were reused whatever settings computed them."""
    path = folder / MANIFEST
    had_shards = holds_shards(folder)  # looked at first: `save_shard` writes the manifest before any shard
    if not path.exists():
        if had_shards:
            raise ConfigError(f"{folder} holds shards but no {MANIFEST}, so they cannot be checked against this "
                              f"run's settings. Delete {folder} and rerun to start over")
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # cut short after its rename, as a shard can be (see _read_shard)
        raise _damaged_manifest(path, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(manifest, dict):  # what `save_shard` writes is an object; else a bare AttributeError later
        raise _damaged_manifest(path, f"it holds a JSON {type(manifest).__name__}, not an object")
    return manifest


def _damaged_manifest(path: Path, reason: str) -> ConfigError:
    return ConfigError(f"{path} cannot be read ({reason}): it is damaged or cut short, so the shards beside it cannot "
                       f"be checked against this run. Delete {path.parent} and rerun to start over")


def check_manifest(folder: Path, recorded: dict[str, Any] | None, manifest: dict[str, Any]) -> dict[str, Any]:
    """Refuse to resume from shards that were computed with other settings (`recorded`, the folder's
    `read_manifest`). Returns the location facts recorded with another value, by their recorded value, where nothing
    else differs: the same file, found at another path."""
    if recorded is None:
        return {}
    differing = differing_facts(recorded, manifest)
    relocated = {k: recorded[k] for k in differing if k in LOCATION_FACTS and k in recorded}
    if len(relocated) < len(differing):
        raise ConfigError(
            f"{folder} holds shards computed with other settings ({changes(recorded, manifest, differing)}). Pass "
            "another output=, or delete that folder to start over"
        )
    return relocated


def differing_facts(recorded: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The facts `recorded` (a shards folder's manifest, or an output's job record) and this run's `manifest` disagree
    on, sorted: those no row depends on, and the nla_lens version a job record adds, left out."""
    recorded, manifest = ({k: v for k, v in facts.items() if k not in _NOT_ROW_FACTS}
                          for facts in (recorded, manifest))
    read = _UNRECORDED | recorded
    return sorted(k for k in read.keys() | manifest.keys() if read.get(k) != manifest.get(k))


def changes(recorded: dict[str, Any], manifest: dict[str, Any], differing: list[str]) -> str:
    """The `differing` facts as messages name them: `recorded value -> this run's`."""
    return ", ".join(f"{k}: {_recorded_value(recorded, k)} -> {repr(manifest[k]) if k in manifest else 'not used'}"
                     for k in differing)


def record_locations(folder: Path, recorded: dict[str, Any], manifest: dict[str, Any],
                     relocated: dict[str, Any]) -> None:
    """Write this run's paths for the `relocated` location facts into the folder's manifest (`recorded`, as
    `check_manifest` found the same contents there): a rerun from the new place then resumes without warning again."""
    updated = recorded | {k: manifest[k] for k in relocated}
    write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(updated, indent=2, sort_keys=True) + "\n",
                                                               encoding="utf-8"))


def _recorded_value(recorded: dict[str, Any], key: str) -> str:
    """A manifest value as the mismatch message shows it, saying when an older manifest lacks it."""
    if key in recorded:
        return repr(recorded[key])
    if key in _UNRECORDED:
        return f"not recorded (an older nla_lens; read as {_UNRECORDED[key]!r})"
    return "not recorded"


def save_shard(folder: Path, index: int, table: pa.Table, manifest: dict[str, Any]) -> None:
    """Write one finished shard; it counts as done only once renamed to its final name.

    The manifest is written with the first shard, so a run that fails before finishing any shard
    (bad settings, a model that does not load) leaves nothing a corrected rerun would be checked
    against. Concurrent ranks write identical content under private names, then rename. Each shard keeps its job's
    manifest too, which the merge checks: the folder's manifest speaks only for the shards its own job wrote.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MANIFEST).exists():
        write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"))
    table = table.replace_schema_metadata({SHARD_KEY: json.dumps(manifest, sort_keys=True)})
    write_atomic(shard_path(folder, index), lambda tmp: pq.write_table(table, tmp))


def missing_shards(folder: Path, n_shards: int) -> list[int]:
    return [i for i in range(n_shards) if not shard_path(folder, i).exists()]


def merge(folder: Path, ranges: Sequence[range], manifest: dict[str, Any]) -> pa.Table:
    """Every shard (`ranges`: each one's input rows, `shard_rows`) of the job `manifest` describes, in shard order,
    which is input row order. Shards an older nla_lens wrote lack the columns added since (`truncated`, a round trip's
    `miss`): those rows hold nulls there, unknown rather than false (the round trip then tells `miss` from the rows)."""
    return pa.concat_tables([_read_shard(folder, i, rows, manifest) for i, rows in enumerate(ranges)],
                            promote_options="default")


def _read_shard(folder: Path, index: int, rows: range, manifest: dict[str, Any]) -> pa.Table:
    """Shard `index`'s file, holding input `rows` computed as `manifest` says. One cut short after its rename (a node
    that crashed before the data reached the disk, an interrupted copy of the folder) is named, with the fix, instead
    of arrow's traceback; so is one that holds other rows (another shard's file copied over it), which merged as these
    rows, and one another job computed (its file copied in, or a second job writing into the same folder), which
    merged as this job's rows: the manifest checked on resume is the first job's alone."""
    path = shard_path(folder, index)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path} cannot be read ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}): "
                          "it is damaged or cut short. Delete it and rerun the same command to compute that shard "
                          "again") from exc
    held = table.column("index").to_pylist() if "index" in table.column_names else None
    if held != list(rows):
        found = "no index column" if held is None else f"input rows {_shown_rows(held)}"
        raise ConfigError(f"{path} holds {found}, where shard {index} holds input rows {_shown_rows(rows)}: it is "
                          "another shard's or another job's file. Delete it and rerun the same command to compute "
                          "that shard again")
    _check_shard_job(path, table, manifest)
    return table.replace_schema_metadata(None)


def _check_shard_job(path: Path, table: pa.Table, manifest: dict[str, Any]) -> None:
    """The shard `table` read from `path` was computed by the job `manifest` describes, as `check_manifest` compares
    a folder's manifest (the same file found at another path is the same job). A shard an older nla_lens wrote keeps
    no manifest: nothing tells."""
    written = (table.schema.metadata or {}).get(SHARD_KEY.encode())
    if written is None:
        return
    recorded = json.loads(written)
    differing = [k for k in differing_facts(recorded, manifest) if k not in LOCATION_FACTS]
    if differing:
        raise ConfigError(f"{path} holds rows that another job computed ({changes(recorded, manifest, differing)}): "
                          "its file copied in from another job's folder, or written by a second job started on the "
                          "same output. Delete it and rerun the same command to compute that shard again")


def _shown_rows(rows: Sequence[int]) -> str:
    """Input row indices as a message names them: "3-5" where consecutive, else the first few."""
    if len(rows) == 1:
        return f"{rows[0]}"
    if rows and list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return f"{rows[0]}-{rows[-1]}"
    return f"{list(rows[:6])}{' ...' if len(rows) > 6 else ''} ({len(rows)} rows)"
