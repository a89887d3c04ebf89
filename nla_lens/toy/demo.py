"""`nla-lens demo`: explain a small LM's activations token by token with the bundled toy NLA."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nla_lens.nla import NLA
from nla_lens.toy.evaluate import HELDOUT_FILE, MAX_TOKENS, MIN_CONTEXT, PAIRS, SCORES_FILE, ToyNLA, best_pair
from nla_lens.toy.html import TokenRow, render_page

TOY_DIR = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True)
class DemoResult:
    sentences: list[list[TokenRow]]
    mean_fve: float
    baseline: float
    n_explained: int
    failed_parses: int
    pair: str  # "sft" or "rl": which of the bundled pairs explained


def run_demo(folder: Path = TOY_DIR, n_sentences: int = 3, max_new_tokens: int = 48,
             pair: str | None = None) -> DemoResult:
    """Round-trip every position past the toy's minimum context in a few held-out speeches, with
    `pair` ("sft" / "rl"; default: the one with the better held-out FVE in `scores.json`)."""
    pair = pair or best_pair(folder)
    toy = ToyNLA.load(folder, pair=pair)
    tokenizer = toy.av.tokenizer
    docs = json.loads((folder / HELDOUT_FILE).read_text())[:n_sentences]
    token_ids = [tokenizer.encode(d["text"], add_special_tokens=False)[:MAX_TOKENS] for d in docs]
    vectors = torch.cat([toy.activations(ids)[MIN_CONTEXT:] for ids in token_ids])
    round_trip = NLA(toy.av, toy.ar).round_trip(vectors, max_new_tokens=max_new_tokens, batch_size=64,
                                                progress=False)
    per_token = (1 - round_trip.mse / round_trip.baseline).tolist()
    sentences, at = [], 0
    for ids in token_ids:
        rows = [TokenRow(tokenizer.decode([t]), None, None) for t in ids[:MIN_CONTEXT]]
        for t in ids[MIN_CONTEXT:]:
            rows.append(TokenRow(tokenizer.decode([t]), round_trip.verbalizations[at].explanation, per_token[at]))
            at += 1
        sentences.append(rows)
    return DemoResult(sentences, round_trip.fve, round_trip.baseline, len(vectors), round_trip.n_failed_parses, pair)


def pair_line(folder: Path, pair: str) -> str:
    """Which pair explains, and the held-out FVE of each pair that the training script recorded."""
    scores = json.loads((folder / SCORES_FILE).read_text()) if (folder / SCORES_FILE).is_file() else {}
    recorded = {"sft": scores.get("heldout", {}).get("fve"), "rl": scores.get("rl", {}).get("heldout", {}).get("fve")}
    measured = ", ".join(f"{name.upper()} {fve:.3f}" for name, fve in recorded.items() if fve is not None)
    names = {"sft": "SFT pair (supervised fine-tuning only)", "rl": "RL pair (GRPO after SFT)"}
    return f"NLA: the {names[pair]}" + (f"; held-out round-trip FVE in scores.json: {measured}" if measured else "")


def summary_line(result: DemoResult) -> str:
    return (f"mean round-trip FVE {result.mean_fve:.3f} over {result.n_explained} tokens "
            f"(paper baseline {result.baseline:.3f}: mean squared distance of these rescaled vectors from their "
            f"mean); {result.failed_parses} explanations failed to parse")


def print_demo(result: DemoResult, folder: Path = TOY_DIR) -> None:
    print(pair_line(folder, result.pair))
    for i, rows in enumerate(result.sentences, 1):
        print(f"\n[{i}] " + "".join(r.token for r in rows))
        print(f"    {'token':<14} {'FVE':>6}  explanation")
        for row in rows:
            if row.fve is not None:
                print(f"    {_shown(row.token):<14} {row.fve:>6.2f}  {row.explanation}")
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
    parser.add_argument("--sentences", type=int, default=3, help="how many held-out speeches to explain")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest explanation the AV may write")
    parser.add_argument("--pair", choices=PAIRS, default=None,
                        help="which bundled AV/AR pair to use (default: the better one on held-out FVE)")
    parser.add_argument("--html", type=Path, default=None,
                        help="also write a self-contained page: tokens coloured by FVE, explanation on hover")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    result = run_demo(args.checkpoint, args.sentences, args.max_new_tokens, args.pair)
    print_demo(result, args.checkpoint)
    if args.html:
        args.html.write_text(render_page("nla_lens toy NLA: round trip of held-out Shakespeare", result.sentences,
                                         summary_line(result)), encoding="utf-8")
        print(f"wrote {args.html}")

