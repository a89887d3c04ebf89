"""Argument checks that run before any weight is read, shared by the library and the `nla-lens` command.

Each raises `InputError` naming the value that is wrong and what to pass instead, so a typo costs
nothing rather than surfacing as a traceback after minutes of loading or decoding.
"""

from __future__ import annotations

import difflib
import errno
import json
import math
import numbers
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, TypeGuard, cast

import numpy as np
import torch

from nla_lens.errors import InputError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,  # refused at load on the bridge
}
_GPU_WORDS = ("gpu", "nvidia", "cuda0", "gpu0")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or its name: "bfloat16", "bf16", "float32", "torch.float16", ..."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:  # an integer model fails deep in torch ("Only Tensors of floating point ...")
            raise InputError(f"dtype {dtype} is not a floating-point dtype, so no model can be loaded in it; pass "
                             f"one of {dtype_names()}")
        # The float dtypes torch computes in: float8 loaded, then its first run failed ('"neg_cpu" not implemented ...')
        if dtype not in DTYPES.values():
            raise InputError(f"dtype {dtype} is a storage format torch runs no model in (no norms or matmuls); pass "
                             f"one of {dtype_names()}")
        return dtype
    if isinstance(dtype, str) and _dtype_key(dtype) in DTYPES:
        return DTYPES[_dtype_key(dtype)]
    raise InputError(f"dtype {dtype!r} is not one nla_lens loads; pass a torch dtype or one of {dtype_names()}")


def _dtype_key(name: str) -> str:
    """How `DTYPES` spells a dtype name: "torch.float16" is "float16", "BF16" is "bf16"."""
    return name.lower().removeprefix("torch.")


def resolve_move(device: torch.device | str | torch.dtype | None,
                 dtype: torch.dtype | str | None) -> tuple[torch.device | None, torch.dtype | None]:
    """The arguments of an AV's, AR's or NLA's `.to()`, each checked as a load checks it (None where not given). As
    torch's `Module.to` takes them, a dtype may come first: `av.to(torch.float64)`, `av.to("bf16")`."""
    if isinstance(device, torch.dtype) or isinstance(device, str) and _names_a_dtype(device):
        if dtype is not None:
            raise InputError(f"to({device!r}, {dtype!r}) names two dtypes; pass to(device, dtype), e.g. "
                             "to('cuda', torch.bfloat16)")
        device, dtype = None, device
    return (None if device is None else resolve_device(device), None if dtype is None else resolve_dtype(dtype))


def _names_a_dtype(name: str) -> bool:
    """Whether `name` is a dtype's name: one `DTYPES` knows, or any of torch's ("float8_e4m3fn", "int8"), which
    `resolve_dtype` then refuses as a dtype it does not load, rather than `resolve_device` as no torch device."""
    return _dtype_key(name) in DTYPES or isinstance(getattr(torch, _dtype_key(name), None), torch.dtype)


def dtype_names() -> str:
    """The names `resolve_dtype` takes, grouped by dtype for help texts and errors: 'float32/fp32/float, ...'."""
    groups: dict[torch.dtype, list[str]] = {}
    for name, dtype in DTYPES.items():
        groups.setdefault(dtype, []).append(name)
    return ", ".join("/".join(names) for names in groups.values())


def counted(n: int, noun: str) -> str:
    """'1 row', '3 rows': a count as messages say it."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def first_few(items: Sequence[str]) -> str:
    """The first three of `items`, then how many more: 'a, b, c, and 4 more'."""
    return ", ".join(items[:3]) + (f", and {len(items) - 3} more" if len(items) > 3 else "")


def first_five(rows: Sequence[int], name: Callable[[int], str]) -> str:
    """The first five of `rows` as `name` writes each, then how many more: 'a, b, c, d, e and 2 more'. How warnings
    name rows of a batch whose index means nothing to the reader (`explain`'s texts, an experiment's runs)."""
    return ", ".join(map(name, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def blocks_phrase(n_blocks: int) -> str:
    """A model's blocks and their indices as messages name them: '4 blocks (0-3)', '1 block (0)'."""
    return "1 block (0)" if n_blocks == 1 else f"{n_blocks} blocks (0-{n_blocks - 1})"


def resolve_device(device: torch.device | str) -> torch.device:
    """A torch device that this torch build can use; 'cuda' without an index stays index-free."""
    if isinstance(device, torch.device):
        parsed = device
    else:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            hint = " (torch calls NVIDIA GPUs 'cuda')" if str(device).lower() in _GPU_WORDS else ""
            raise InputError(f"device {device!r} is not a torch device{hint}: use 'cpu', 'cuda' (or 'cuda:N' "
                             "for GPU N) or 'mps'") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
            raise InputError(f"device {str(parsed)!r}: this torch ({torch.__version__}) {build}; use 'cpu', or "
                             "install a CUDA build of torch on a machine with an NVIDIA GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device {str(parsed)!r}: only {torch.cuda.device_count()} GPU(s) visible "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' is not available in this torch build or machine; use 'cpu'")
    if parsed.type == "meta":  # a model loaded there has shapes and no weights: every run failed deep in torch
        raise InputError("device 'meta' holds no values, so a model loaded there has no weights to run; use 'cpu' "
                         "or 'cuda'")
    if parsed.type not in ("cpu", "cuda", "mps"):
        _check_can_allocate(parsed)
    return parsed


def _check_can_allocate(device: torch.device) -> None:
    """Another accelerator type ('xla', 'xpu', 'hpu', ...): torch parses the name whether or not this build and machine
    have one, then the first tensor put there failed in loading with NotImplementedError or AssertionError."""
    try:
        torch.empty(0, device=device)
    except Exception as exc:  # torch raises a different type for each backend it lacks
        raise InputError(f"device {str(device)!r} cannot hold tensors in this torch ({torch.__version__}) on this "
                         f"machine ({type(exc).__name__}); use 'cpu', or 'cuda' on a machine with an NVIDIA "
                         "GPU") from exc


def check_counts(minimum: int, /, **values: int) -> tuple[int, ...]:
    """Each named count must be a whole number >= `minimum` (`is_integer`: NumPy's too, not a bool or a float);
    returns them as Python ints in the order given, e.g. `(batch_size,) = check_counts(1, batch_size=batch_size)`,
    so a NumPy one goes on as the int a JSON manifest or a result's file can hold."""
    wrong = [f"{name}={value!r}" for name, value in values.items() if not is_count(value, minimum)]
    if wrong:
        raise InputError(f"{', '.join(wrong)}: must be a whole number >= {minimum}")
    return tuple(int(value) for value in values.values())


def is_count(value: object, minimum: int) -> bool:
    """A whole number (`is_integer`) >= `minimum`."""
    return is_integer(value) and int(value) >= minimum


def check_finite(**values: float) -> None:
    """Each named value must be a finite real number (not a bool, NaN or inf), e.g. a steering scale; NumPy's and
    one-element tensors count, as in `check_sampling` (an alpha sweep over torch.linspace or np.float32 values)."""
    wrong = [f"{name}={value!r}" for name, value in values.items()
             if not is_real(value) or not math.isfinite(float(value))]
    if wrong:
        raise InputError(f"{', '.join(wrong)}: must be a finite number")


def check_sampling(temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
                   seed: int | None = None) -> tuple[int, int]:
    """The decoding settings of `verbalize`; the message names every value that is out of range. Returns
    `max_new_tokens` and `batch_size` as Python ints (NumPy's are taken, as by `check_counts`)."""
    wrong = []
    if seed is not None and not is_integer(seed):
        wrong.append(f"seed={seed!r} must be a whole number (or None for an unseeded draw)")
    elif seed is not None and not -2**63 <= int(seed) < 2**64:  # torch's generator takes a 64-bit seed
        wrong.append(f"seed={seed!r} is outside the 64-bit range a torch generator takes: pick one in [-2**63, 2**64)")
    if not is_real(temperature) or not 0 <= temperature < math.inf:
        wrong.append(f"temperature={temperature!r} must be a finite number >= 0 (0 is greedy)")
    if not is_real(top_p) or not 0 < top_p <= 1:
        wrong.append(f"top_p={top_p!r} must be in (0, 1] (1 keeps every token)")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not is_count(value, 1):
            wrong.append(f"{name}={value!r} must be a whole number >= 1")
    if wrong:
        raise InputError("; ".join(wrong))
    return int(max_new_tokens), int(batch_size)


def context_overflow(max_new_tokens: int, prompt: int, n_ctx: int, model: str) -> str | None:
    """Why a sample of up to `max_new_tokens` tokens after a `prompt`-token prompt runs past `model`'s ("AV", "AR")
    n_ctx, naming the most that fits; None when it fits. RL's teacher-forced AV forward and the AR's reading of a
    sample's explanation (its tags and EOS are among the sample's tokens) each take prompt + sample positions."""
    if prompt + max_new_tokens <= n_ctx:
        return None
    return (f"max_new_tokens={max_new_tokens} after the {prompt}-token {model} prompt needs {prompt + max_new_tokens} "
            f"positions, over the {model}'s n_ctx={n_ctx}; set max_new_tokens <= {n_ctx - prompt}")


def is_bool(value: object) -> bool:
    """True or False, NumPy's (an element of a mask) or a one-element bool tensor's too; not 0, 1 or "no", which an
    `if` would take for one."""
    return isinstance(_python_scalar(value), bool)


def check_draws_of(draws_of: object, n: int) -> torch.Tensor:
    """`verbalize`'s `draws_of` as a `[n]` long tensor on the CPU: one row index in [0, n) per vector."""
    items = draws_of.tolist() if isinstance(draws_of, (torch.Tensor, np.ndarray)) else draws_of
    if not isinstance(items, (list, tuple, range)) or not all(is_integer(i) for i in items):
        raise InputError(f"draws_of must hold one row index (a whole number) per vector, e.g. "
                         f"[*range(n), *range(n)] for two runs of n sites; got {type(draws_of).__name__} {items!r:.80}")
    if len(items) != n:
        raise InputError(f"draws_of has {len(items)} entries for {n} vectors: give one row index per vector")
    outside = [int(i) for i in items if not 0 <= int(i) < n]
    if outside:
        raise InputError(f"draws_of holds {outside[:5]}, outside the rows 0..{n - 1}: each entry names the row whose "
                         "random numbers that row draws")
    return torch.tensor([int(i) for i in items], dtype=torch.long)


def is_integer(value: object) -> TypeGuard[numbers.Integral]:
    """A whole number, Python's or NumPy's (an element of an index array, an argmax), not a bool of either."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (numpy's, or a one-element tensor such as a step of torch.linspace), not a bool: a string
    ("0.5") would fail in the range comparison with a bare TypeError."""
    value = _python_scalar(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _python_scalar(value: object) -> object:
    """A NumPy scalar or a one-element tensor as the Python number or bool it holds; anything else as given (a meta
    tensor holds no number: its `.item()` raised a bare RuntimeError)."""
    if isinstance(value, np.generic) or isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        return value.item()
    return value


def check_explanations(explanations: Sequence[str]) -> None:
    """A non-empty list of strings, as the AR reads them."""
    if isinstance(explanations, str) or not isinstance(explanations, Sequence) or not explanations:
        raise InputError("pass a non-empty list of explanation strings (a single string goes in a list: [text])")
    wrong = [(i, item) for i, item in enumerate(explanations) if not isinstance(item, str)]
    if wrong:
        i, item = wrong[0]
        hint = ""
        if item is None:
            hint = " A failed parse has explanation None: drop those rows, or let NLA.round_trip score them as misses."
        elif hasattr(item, "explanation"):  # verbalize's output handed on whole
            hint = (" Pass the strings: [v.explanation for v in verbalizations if v.explanation is not None], or "
                    "score the vectors with NLA.round_trip.")
        raise InputError(f"explanation {i} is {item!r} ({type(item).__name__}), not a string "
                         f"({counted(len(wrong), 'such item')}).{hint}")
    for i, item in enumerate(explanations):
        check_encodable(item, f"explanation {i}")


def check_encodable(text: str, name: str) -> None:
    """A text a tokenizer can encode: a lone surrogate (a JSON ``"\\ud800"`` escape, a file read with
    ``errors="surrogateescape"``) is no UTF-8, and the tokenizers raise a bare TypeError on it naming no text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{name} holds {text[exc.start:exc.end]!r} at character {exc.start}, a lone surrogate, which "
                         "is no Unicode character and which no tokenizer encodes (a JSON '\\ud800' escape or a file "
                         "read with errors='surrogateescape' leaves one); drop it, or replace it with "
                         "text.encode('utf-8', 'replace').decode('utf-8')") from None


def check_input_file(path: Path, what: str = "input") -> None:
    """An existing regular file."""
    if not path.exists():
        raise InputError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")


_PARQUET_MAGIC = b"PAR1"


def jsonl_lines(path: str | Path, what: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a UTF-8 JSONL file, numbered from 1; a file in another encoding is an
    `InputError` (its decode error is raised while reading a line, outside each caller's per-line check)."""
    if Path(path).is_dir():  # else a bare IsADirectoryError that names neither the field nor the fix
        raise InputError(f"{what} {path} is a folder; point it at the JSONL file itself")
    try:
        with Path(path).open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield line_no, line
    except FileNotFoundError as exc:
        raise InputError(f"{what} {path} does not exist; check the path") from exc
    except UnicodeDecodeError as exc:
        with Path(path).open("rb") as f:
            if f.read(4) == _PARQUET_MAGIC:  # a table saved (or renamed) under a .jsonl name
                raise InputError(f"{what} {path} is a parquet file (it starts with {_PARQUET_MAGIC!r}), not JSONL "
                                 "text: give it a .parquet name") from exc
        raise InputError(f"{what} {path} is not UTF-8 text ({exc}); write it as UTF-8 JSONL") from exc


def jsonl_objects(path: str | Path, what: str, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The non-blank lines of a JSONL file as JSON objects, numbered from 1. A line that is not JSON, or JSON but not
    an object, is an `InputError` naming the line, in words rather than Python's, and ending in `expected` (what
    each line should hold)."""
    for line_no, line in jsonl_lines(path, what):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{line_no}: not JSON ({exc.msg} at character {exc.pos + 1}); {expected}") from exc
        if not isinstance(row, dict):
            raise InputError(f"{path}:{line_no}: holds {line.strip()[:60]}, not a JSON object; {expected}")
        yield line_no, row


def file_path(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path with `~` expanded; anything else (None, bytes, a number) is an InputError, not pathlib's
    bare TypeError."""
    if not isinstance(path, str | os.PathLike):
        raise InputError(f"{what} takes a file path (a str or pathlib.Path), got {type(path).__name__}")
    return Path(path).expanduser()


def file_kind(path: Path) -> str:
    """The suffix nla_lens reads and writes a file by, in lower case: `out.PARQUET` is a parquet file."""
    return path.suffix.lower()


def check_output_path(path: Path, suffixes: Sequence[str], what: str = "output") -> None:
    """A file nla_lens may write: its folder exists and takes files, it is not a folder nor a symlink that leads round
    a loop, and its suffix is one it writes."""
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file path, e.g. {path / ('out' + suffixes[0])}")
    if file_kind(path) not in suffixes:
        raise InputError(f"{what} {path}: the file name must end in {' or '.join(suffixes)}")
    if leads_round_a_loop(path):  # refused by the write itself only after the work
        raise InputError(f"{what} {loop_refusal(path, 'file')}")
    if not path.parent.is_dir():
        raise InputError(f"{what} {path}: {no_folder(path.parent)}")
    check_writable(path.parent, f"{what} {path}")


def leads_round_a_loop(path: Path) -> bool:
    """Whether `path` is a symlink that leads round a loop of links (os.stat's ELOOP): `exists()` and `is_dir()` call
    it absent, and `Path.resolve` raised a bare RuntimeError on it (Python 3.11) or said nothing (3.13)."""
    if not path.is_symlink():
        return False
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def loop_refusal(path: Path, kind: str) -> str:
    """Why nothing can be written at `path`, a symlink that leads round a loop, and the ways on; `kind`: what the
    writer writes there ("file", "folder")."""
    return (f"{path} is a symlink that leads round a loop of links, so there is no {kind} there to write into: "
            f"point it at a {kind}, or remove it")


def check_writable(folder: Path, what: str) -> None:
    """An existing `folder` takes new files, checked before the work whose result goes there: one the process may
    not write failed only at the write, with a PermissionError naming the hidden temporary file."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"{what}: no file can be created in {folder} ({exc.strerror or exc}); pick a folder this "
                         "process can write to") from exc


def check_keywords(given: Iterable[str], accepted: Iterable[str], where: str, passed_to: str) -> None:
    """Refuse a keyword that `where` would pass on to `passed_to`, which does not take it, before the work
    that comes first: a typo in `**kwargs` otherwise surfaces as a TypeError only after it."""
    accepted = sorted(accepted)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InputError(f"{where} got the keyword(s) {unknown}, which neither it nor {passed_to} takes; "
                         f"{did_you_mean(unknown[0], accepted)}{passed_to} takes {accepted}")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """"did you mean 'x'? " for the choice closest to a mistyped `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def check_fwd_hooks(fwd_hooks: Sequence, hook_names: Iterable[str], where: str) -> list:
    """`fwd_hooks` as TL's `run_with_hooks` takes them: a list of (hook name or name filter, hook fn) pairs,
    each name a hook point of the model. TL answers a typo with a bare KeyError, a lone pair with a ValueError."""
    if not isinstance(fwd_hooks, (list, tuple)) or not all(_is_hook_pair(pair) for pair in fwd_hooks):
        raise InputError(f"{where}: fwd_hooks must be a list of (hook_name, hook_fn) pairs, as TL's run_with_hooks "
                         f"takes them: fwd_hooks=[(name, fn)]; got {fwd_hooks!r}")
    names = list(hook_names)
    for name, _ in fwd_hooks:
        if isinstance(name, str) and name not in names:
            raise InputError(f"{where}: fwd_hooks names {name!r}, which is not a hook point of this model; "
                             f"{did_you_mean(name, names)}pick one of base.hook_dict, e.g. 'blocks.1.hook_resid_post'")
    return list(fwd_hooks)


def _is_hook_pair(pair: object) -> bool:
    return (isinstance(pair, (tuple, list)) and len(pair) == 2 and callable(pair[1])
            and (isinstance(pair[0], str) or callable(pair[0])))


def no_folder(folder: Path) -> str:
    """Why `folder` cannot hold an output file: it does not exist, or it is a file."""
    if folder.exists():
        return f"{folder} is a file, not a folder; give a path inside a folder"
    return f"the folder {folder} does not exist; create it first"


def warn_at_caller(message: str, *, through: Sequence[ModuleType] = ()) -> None:
    """`warnings.warn` pointing at the first frame outside nla_lens: the user's line, however deep the call. From
    inside a torch hook, `through` names the packages whose frames lie between the hook and the user's line (torch,
    and the model's own code): those are passed over too. A warning filed under a library's line is shown once per
    session by Python's default filter, and points the user nowhere. Code these packages generate (a dataclass's
    `__init__`, filed under "<string>") counts as theirs: it runs in their module's globals."""
    folders = [Path(__file__).parent, *(Path(cast(str, package.__file__)).parent for package in through)]
    inside = tuple(f"{folder}{os.sep}" for folder in folders)
    names = (__name__.split(".")[0], *(package.__name__ for package in through))
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and _runs_inside(frame, inside, names):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _runs_inside(frame: FrameType, folders: tuple[str, ...], names: tuple[str, ...]) -> bool:
    """Whether `frame` runs code of one of the packages in `folders` (by file) or `names` (generated code, by the
    module whose globals it runs in)."""
    if frame.f_code.co_filename.startswith(folders):
        return True
    module = str(frame.f_globals.get("__name__", ""))
    return frame.f_code.co_filename.startswith("<") and module.split(".")[0] in names
