"""`nla-lens demo`: explain a small LM's activations token by token with the bundled toy NLA."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from nla_lens.checks import check_counts, check_output_path
from nla_lens.display import format_number
from nla_lens.explain import Explanation, explain_tokens
from nla_lens.toy import TOY_DIR
from nla_lens.toy.evaluate import HELDOUT_FILE, MAX_TOKENS, MIN_CONTEXT, PAIRS, ToyNLA, best_pair, read_scores


@dataclass(frozen=True)
class DemoResult:
    """What `nla-lens demo` explained, and with which bundled pair."""

    explanation: Explanation  # every token past the first MIN_CONTEXT of each speech
    pair: str  # "sft" or "rl": which of the bundled pairs explained


def run_demo(folder: Path = TOY_DIR, n_sentences: int = 3, max_new_tokens: int = 48,
             progress: bool = False, pair: str | None = None) -> DemoResult:
    """Round-trip every position past the toy's minimum context in a few held-out speeches, with
    `pair` ("sft" / "rl"; default: the one with the better held-out FVE in `scores.json`)."""
    check_counts(1, n_sentences=n_sentences, max_new_tokens=max_new_tokens)
    pair = pair or best_pair(folder)
    toy = ToyNLA.load(folder, pair=pair)
    tokenizer = toy.av.tokenizer
    docs = json.loads((folder / HELDOUT_FILE).read_text())[:n_sentences]
    token_ids = [tokenizer.encode(d["text"], add_special_tokens=False)[:MAX_TOKENS] for d in docs]
    explanation = explain_tokens(toy.nla, toy.base, token_ids, positions=slice(MIN_CONTEXT, None),
                                 max_new_tokens=max_new_tokens, batch_size=64, progress=progress)
    return DemoResult(explanation, pair)


def pair_line(folder: Path, pair: str) -> str:
    """Which pair explains, and the held-out FVE of each pair that the training script recorded."""
    scores = read_scores(folder)
    recorded = {"sft": scores.get("heldout", {}).get("fve"), "rl": scores.get("rl", {}).get("heldout", {}).get("fve")}
    measured = ", ".join(f"{name.upper()} {format_number(fve)}" for name, fve in recorded.items() if fve is not None)
    names = {"sft": "SFT pair (supervised fine-tuning only)", "rl": "RL pair (GRPO after SFT)"}
    return f"NLA: the {names[pair]}" + (f"; held-out round-trip FVE in scores.json: {measured}" if measured else "")


def summary_line(result: DemoResult) -> str:
    return result.explanation.summary()


def print_demo(result: DemoResult, folder: Path = TOY_DIR) -> None:
    print(pair_line(folder, result.pair))
    explanation = result.explanation
    for i, tokens in enumerate(explanation.tokens):
        print(f"\n[{i + 1}] " + "".join(tokens))
        print(f"    {'token':<14} {'FVE':>6}  explanation")
        for row in explanation.rows:
            if row.text_index == i:
                fve = "" if row.fve is None else format_number(row.fve)
                print(f"    {_shown(row.token):<14} {fve:>6}  {row.explanation}")
    print("\n" + summary_line(result))


def _shown(token: str) -> str:
    """A token as printed in the table: escapes visible, cut to the column."""
    return repr(token)[1:-1][:14]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="explain a toy Shakespeare LM's activations token by token (offline, bundled NLA)",
        description="Runs the bundled toy NLA on held-out Shakespeare: for each token past the first "
                    f"{MIN_CONTEXT} of a few speeches, capture the base LM's layer-K residual, verbalize it with "
                    "the AV, rebuild it from the words with the AR, and print the explanation and the round-trip "
                    "FVE, then the mean FVE and the baseline it used.")
    parser.add_argument("--checkpoint", type=Path, default=TOY_DIR,
                        help="a folder with base/, av/, ar/ and heldout.json (default: the bundled toy NLA)")
    parser.add_argument("--sentences", type=int, default=3, help="how many held-out speeches to explain (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="longest explanation the AV may write (default 48)")
    parser.add_argument("--pair", choices=PAIRS, default=None,
                        help="which bundled AV/AR pair to use (default: the better one on held-out FVE)")
    parser.add_argument("--html", type=Path, default=None,
                        help="also write a self-contained page: tokens coloured by FVE, explanations in rows below")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    check_counts(1, sentences=args.sentences, max_new_tokens=args.max_new_tokens)  # named by their flags (in_flags)
    if args.html:
        check_output_path(args.html, (".html",), "--html")
    result = run_demo(args.checkpoint, args.sentences, args.max_new_tokens, progress=True, pair=args.pair)
    print_demo(result, args.checkpoint)
    if args.html:
        result.explanation.save(args.html)
        print(f"wrote {args.html}")

