"""The `nla-lens` command: a thin layer over the library.

Each subcommand lives beside the code it drives and registers itself through an `add_parser`
function taking the subparsers object; this module only assembles them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from tqdm import tqdm

from nla_lens import __version__
from nla_lens.distributed import World
from nla_lens.errors import ConfigError, InputError, NLAError


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="print a checkpoint's sidecar and check the folder as from_pretrained does",
        description="Read nla_meta.yaml from an NLA checkpoint folder, print the facts nla_lens will use "
                    "(kind, role, layer, injection, scales, marker ids) and validate them against the "
                    "folder's tokenizer, config.json and weight-file headers (an AR's readout too), as "
                    "from_pretrained does before reading weights. Exits nonzero with the reason when anything "
                    "is off.")
    parser.add_argument("checkpoint", help="an AV or AR checkpoint folder (or a hub id in the local HF cache)")
    parser.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> None:
    from nla_lens import loading
    from nla_lens.sidecar import SIDECAR_NAME, check_role_template, check_tokenizer, load_meta
    from nla_lens.training.extraction import SHARD_DIR

    folder = loading.resolve_checkpoint(args.checkpoint)
    meta = load_meta(folder)
    if (folder / SHARD_DIR).is_dir() and not (folder / "config.json").is_file():  # else: "copy tokenizer files in"
        raise InputError(f"{folder} is an extraction (nla-lens extract wrote it: vectors in {SHARD_DIR}/), not a "
                         "checkpoint; inspect reads AV / AR folders. Read the vectors with "
                         "nla_lens.training.load_activations")
    role = loading.checkpoint_role(folder, meta)  # the folder's, where the sidecar has none
    print(f"{'role':28s} {role!r}")
    for name in ("kind", "schema_version", "d_model", "layer", "injection", "injection_scale",
                 "mse_scale", "injection_char", "injection_token_id", "injection_left_neighbor_id",
                 "injection_right_neighbor_id", "critic_suffix_ids", "base_model", "fve_baseline", "fve_baseline_n"):
        print(f"{name:28s} {getattr(meta, name)!r}")
    for name in ("stage", "tokenization"):  # what nla_lens's exporter records (absent from released sidecars)
        print(f"{name:28s} {meta.raw.get(name)!r}")
    check_role_template(meta, role, folder)
    tokenizer = loading.load_tokenizer(folder)
    check_tokenizer(meta, tokenizer, role=role, source=str(folder / SIDECAR_NAME))  # as from_pretrained checks it
    print(f"{'tokenizer check':28s} ok")
    loading.check_config(folder, meta, tokenizer)
    print(f"{'config.json check':28s} ok")
    loading.check_checkpoint_files(folder, meta, role)
    print(f"{'weight files check':28s} ok (headers and AR readout; the model's weights are not read)")


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    from nla_lens import bench
    from nla_lens.commands import add_explain, add_reconstruct, add_round_trip, add_verbalize
    from nla_lens.steer_words_cli import add_parser as add_steer_words
    from nla_lens.toy.demo import add_parser as add_demo
    from nla_lens.training.cli import add_curve, add_extract, add_train_ar, add_train_av, add_train_rl

    return [add_demo, add_explain, add_steer_words, add_verbalize, add_round_trip, add_reconstruct, _add_inspect,
            add_extract, add_train_av, add_train_ar, add_train_rl, add_curve, bench.add_parser]


_DESCRIPTION = ("Natural Language Autoencoders (NLAs) on TransformerLens models. An NLA's activation verbalizer (AV) "
                "explains a base model's residual at its layer K in words; its activation reconstructor (AR) rebuilds "
                "the vector from those words, which scores the explanation (MSE, FVE). Start with nla-lens demo "
                "(offline, on a bundled toy NLA); nla-lens COMMAND --help describes each command.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nla-lens", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in _registrars():
        register(subparsers)
    for subparser in subparsers.choices.values():
        subparser.set_defaults(flags={action.dest: action.option_strings[0] for action in subparser._actions
                                      if action.option_strings[:1] and action.option_strings[0].startswith("--")})
    return parser


def in_flags(message: str, flags: dict[str, str]) -> str:
    """A library message as the shell user types it: `max_new_tokens=0` (the Python keyword the library names) as
    `--max-new-tokens 0` (a bare `baseline=` as `--baseline`, a bound `samples > 1` as `--samples > 1`), for the
    keywords that are flags of this subcommand; others (YAML keys, Python-only arguments) are left as they are."""
    for dest, flag in flags.items():
        name = rf"(?<![\w.-]){re.escape(dest)}"
        message = re.sub(name + r"=(?=[^\s),;])", f"{flag} ", message)
        message = re.sub(name + "=", flag, message)
        message = re.sub(name + r"(?= [<>]=? -?\d)", flag, message)
    return message


# A list or slice of positions starting with '-' (-2,-1 or -4:): argparse reads a value that starts with '-' as a
# flag unless it is one number, so `--positions -2,-1` would be "expected one argument".
_NEGATIVE_SPEC = re.compile(r"-\d[\d,:-]*")


def _negative_specs_joined(argv: Sequence[str]) -> list[str]:
    """`--positions -2,-1` as `--positions=-2,-1`, which argparse reads."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] == "--positions" and isinstance(arg, str) and _NEGATIVE_SPEC.fullmatch(arg):
            joined[-1] = f"--positions={arg}"
        else:
            joined.append(arg)
    return joined


def _is_main_process() -> bool:
    """False on every torchrun rank but 0, so that a Ctrl-C, which reaches every rank, is reported once."""
    try:
        return World.from_env().is_main
    except ConfigError:  # a malformed RANK: report it rather than hide it
        return True


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue an interrupted command, for those whose rerun picks up what the first run wrote."""
    from nla_lens.training.config import CHECKPOINT_SECTIONS  # loaded already: the parser registered its commands

    if args.command == "extract":
        return ("; rerun the same command to continue: the shards already in out_dir are kept (checked against the "
                "corpus) and skipped")
    if args.command in CHECKPOINT_SECTIONS:
        return (f"; to continue from the newest checkpoint in out_dir/checkpoints, rerun the same command with resume: "
                f"latest in {args.config} (checkpoints are written every {CHECKPOINT_SECTIONS[args.command]}."
                "save_every steps; with 0 there is none before the end, and the rerun starts at step 0)")
    if args.command in ("verbalize", "round-trip") and args.input is not None and args.output is not None:
        from nla_lens.shard_store import holds_shards, shard_folder

        folder = shard_folder(args.output)
        if not holds_shards(folder):
            return "; no shard was finished, so a rerun of the same command starts from the first"
        return (f"; rerun the same command to continue: the finished shards in {folder} are kept and only the others "
                "are computed")
    return ""


class _StdoutWhoseReaderMayLeave:
    """`sys.stdout` while a command runs. Once its reader has gone (`nla-lens explain ... --output f | head`), what
    the command prints goes to /dev/null and the command goes on to write its files: the BrokenPipeError stopped
    it with "[Errno 32] Broken pipe", before its --output where that came after the printed table."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        """Point the stream's file descriptor at /dev/null: its buffered text, and the interpreter's flush at exit,
        then go there without an error."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Bad input exits 2 with the typed error's message, a failed file operation
    (permissions, a full disk) exits 1 with the OS's message, Ctrl-C exits 130 (as shells report SIGINT) with how to
    continue; library warnings print as one line each, on a line of their own above any progress bar. Messages name
    the subcommand's flags where the library names the Python keywords they set. A reader that leaves early
    (`| head`) stops only the printing: the command still writes its files and exits 0."""
    args = build_parser().parse_args(_negative_specs_joined(sys.argv[1:] if argv is None else argv))
    prefix = f"nla-lens {args.command}"

    shown: set[str] = set()

    def show_warning(message: Warning | str, *_: object, **__: object) -> None:
        # A file job's result repeats what it warned of before it started (the "no FVE"): one line each.
        line = f"{prefix}: warning: {in_flags(str(message), args.flags)}"
        if line not in shown:
            shown.add(line)
            # tqdm.write clears the bars drawn on stderr, writes the line and redraws them; a print landed mid-bar.
            tqdm.write(line, file=sys.stderr)

    with warnings.catch_warnings(), contextlib.redirect_stdout(_StdoutWhoseReaderMayLeave(sys.stdout)):
        warnings.showwarning = show_warning
        try:
            args.run(args)
            sys.stdout.flush()  # a reader gone before the buffer filled is met here, not at the interpreter's exit
        except NLAError as exc:
            print(f"{prefix}: {type(exc).__name__}: {in_flags(str(exc), args.flags)}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"{prefix}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            if _is_main_process():
                tqdm.write(f"{prefix}: interrupted{_resume_hint(args)}", file=sys.stderr)  # below the bar it cut short
            return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
