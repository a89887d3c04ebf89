"""`nla-lens steer-words`: `nl.steer_with_words` from the shell, on texts left-padded into one batch."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from nla_lens.checks import check_counts, check_finite, check_output_path, resolve_device
from nla_lens.commands import add_dtype_flag, add_nla_flags, nla_and_base_folders
from nla_lens.errors import InputError
from nla_lens.verbalizer import MAX_NEW_TOKENS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "steer-words", help="steer the base model by editing the AV's explanation (nl.steer_with_words)",
        description="Steer with words: the AV explains the base model's layer-K residual at --positions of each "
                    "text, each explanation is edited (--replace OLD NEW, or --edit-to the whole edited text), "
                    "and the AR's reconstructions of the edited and original explanations give the steering "
                    "Delta, added at blocks.K.hook_resid_post (--mode add; --mode replace patches in the edited "
                    "explanation's reconstruction). Prints one row per steered site (explanation, edit, Delta's "
                    "norm, the top next tokens with steering, KL against without) and each text's greedy "
                    "continuation without and with it. The texts are tokenized as explain does (BOS first where "
                    "the tokenizer has one) and left-padded into one batch with its attention mask.")
    add_nla_flags(parser)
    parser.add_argument("--text", action="append", required=True, help="a text to steer (repeat for several)")
    parser.add_argument("--positions", type=_steer_positions_arg, default=[-1],
                        help="which tokens of every text to steer: comma-separated positions in each text's own "
                             "tokens (0 is its first, the BOS where the tokenizer puts one), negative from its last "
                             "token (default -1, the last token), such as 3 or -2,-1. The rows' batch and position "
                             "are the text's index and its column in the left-padded batch that --save-vectors "
                             "steers")
    edit = parser.add_mutually_exclusive_group(required=True)
    edit.add_argument("--replace", nargs=2, action="append", metavar=("OLD", "NEW"),
                      help="edit every explanation by replacing OLD with NEW (repeat for several, applied in order); "
                           "an edit that leaves an explanation unchanged is refused in add mode")
    edit.add_argument("--edit-to", help="the edited explanation itself, used for every steered site")
    parser.add_argument("--mode", choices=("add", "replace"), default="add",
                        help="add: h + alpha * ||h|| * Delta / ||Delta||; replace: patch in the edited "
                             "explanation's reconstruction at h's norm (default add)")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="steering strength, a fraction of the residual's own norm (default 1.0)")
    parser.add_argument("--samples", type=int,
                        help="explanations sampled per site, Delta averaged over them (default 1: the greedy one)")
    parser.add_argument("--temperature", type=float,
                        help="sampling temperature with --samples > 1 (default 1.0)")
    parser.add_argument("--seed", type=int, help="sampling seed with --samples > 1 (default 0)")
    parser.add_argument("--max-new-tokens", type=int, help=f"longest explanation (default {MAX_NEW_TOKENS})")
    parser.add_argument("--continue-tokens", type=int, default=8,
                        help="greedy tokens to continue each text with, without and with steering; 0 for none "
                             "(default 8)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="explanations per AV batch and per AR batch (default 32)")
    parser.add_argument("--output", type=Path, help="also write the rows to .parquet / .jsonl, or the view to .html")
    parser.add_argument("--save-vectors", type=Path,
                        help="write Delta and T to this .safetensors file, to steer again without the AV and AR "
                             "(nl.WordSteering.fwd_hooks_from)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    add_dtype_flag(parser)
    parser.set_defaults(run=_run_steer_words)


def _steer_positions_arg(value: str) -> list[int]:
    try:
        return [int(p) for p in value.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected positions such as -1 or 3,-1, got {value!r}") from exc


def _site_mask(positions: list[int], lengths: list[int], width: int) -> Bool[Tensor, "batch pos"]:
    """`--positions` counted in each text's own tokens, as a mask over the left-padded batch: passed as columns, a
    positive position counted the padding, so it named a different token of each text of another length."""
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        own = [p if p >= 0 else length + p for p in positions]
        outside = [p for p, q in zip(positions, own, strict=True) if not 0 <= q < length]
        if outside:
            raise InputError(f"--positions {outside[0]} is outside text {row}, which is {length} tokens "
                             f"(0..{length - 1}, or -{length}..-1 from its last); pick positions inside every text")
        if len(set(own)) < len(own):
            raise InputError(f"--positions {','.join(map(str, positions))} name the same token of text {row} twice; "
                             "steer each token once")
        mask[row, [width - length + q for q in own]] = True
    return mask


def _batch(tokenizer: Any, texts: list[str], positions: list[int], n_ctx: int | None
           ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """The texts tokenized as explain does, each checked against the base's context `n_ctx` (None: unknown) as
    explain checks them, in one left-padded batch with its attention mask, and the sites that `--positions` names
    there. The pads are masked out, so their id is 0 as in every other pad() call (Llama 3's tokenizer has no pad
    token)."""
    from nla_lens.explain import check_rows_fit
    from nla_lens.sidecar import text_ids
    from nla_lens.training.padding import pad

    rows = [text_ids(tokenizer, text) for text in texts]
    check_rows_fit(rows, n_ctx, texts)
    tokens, mask = pad(rows, 0, "left")
    return tokens, mask, _site_mask(positions, [len(row) for row in rows], tokens.shape[1])


def _word_edit(args: argparse.Namespace) -> str | Callable[[str], str]:
    """`--edit-to` as the edited text, or `--replace` as a function of the explanation."""
    if args.edit_to is not None:
        return args.edit_to
    empty = [new for old, new in args.replace if not old]
    if empty:  # str.replace("", new) writes new between every two characters
        raise InputError(f"--replace '' {empty[0]!r}: OLD is empty; give the words of the explanation to replace")
    pairs = list(args.replace)

    def edit(explanation: str) -> str:
        for old, new in pairs:
            explanation = explanation.replace(old, new)
        return explanation

    return edit


def _run_steer_words(args: argparse.Namespace) -> None:
    from nla_lens.display import format_cell
    from nla_lens.results import check_save_path
    from nla_lens.steer_words import sampling_settings, steer_with_words

    if not all(text.strip() for text in args.text):
        raise InputError("--text is empty; give the texts whose tokens to steer")
    edit = _word_edit(args)
    device = resolve_device(args.device)
    if args.output is not None:
        check_save_path(args.output, "--output")
    if args.save_vectors is not None:
        check_output_path(args.save_vectors, (".safetensors",), "--save-vectors")
    # The library's own checks of these settings, run before the models load; steer_with_words runs them again.
    sampling_settings(None, args.samples, args.temperature, args.seed, args.max_new_tokens, args.batch_size)
    check_finite(alpha=args.alpha)
    check_counts(0, continue_tokens=args.continue_tokens)
    folders = nla_and_base_folders(args)
    # The texts' lengths and --positions checked before any weight is read; the batch steered is the loaded base
    # tokenizer's own
    _batch(folders.base_tokenizer, args.text, args.positions, folders.base_context())
    nla, base = folders.load(device, args.dtype)
    tokens, mask, sites = _batch(base.tokenizer, args.text, args.positions, base.cfg.n_ctx)
    result = steer_with_words(nla, base, tokens.to(device), sites.to(device), edit=edit, alpha=args.alpha,
                              mode=args.mode, samples=args.samples, temperature=args.temperature, seed=args.seed,
                              attention_mask=mask.to(device), continue_tokens=args.continue_tokens,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    for i, text in enumerate(args.text):
        print(f"[{i}] {format_cell(text)}")
    print(result)
    for i, (clean, steered) in enumerate(result.continuations or []):
        print(f"[{i}] clean:   {format_cell(clean)}\n[{i}] steered: {format_cell(steered)}")
    if args.output is not None:
        print(f"wrote {result.save(args.output)}")
    if args.save_vectors is not None:
        print(f"wrote {result.save_vectors(args.save_vectors)}")
