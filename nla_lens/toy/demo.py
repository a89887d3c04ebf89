"""`nla-lens demo`: explain a small LM's activations token by token with the bundled toy NLA."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nla_lens.checks import check_at_least_one, check_output_path
from nla_lens.nla import NLA
from nla_lens.toy.evaluate import HELDOUT_FILE, MAX_TOKENS, MIN_CONTEXT, ToyNLA
from nla_lens.toy.html import TokenRow, render_page

TOY_DIR = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True)
class DemoResult:
    sentences: list[list[TokenRow]]
    mean_fve: float
    baseline: float
    n_explained: int
    failed_parses: int


def run_demo(folder: Path = TOY_DIR, n_sentences: int = 3, max_new_tokens: int = 48) -> DemoResult:
    """Round-trip every position past the toy's minimum context in a few held-out speeches."""
    check_at_least_one(n_sentences=n_sentences, max_new_tokens=max_new_tokens)
    toy = ToyNLA.load(folder)
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
    return DemoResult(sentences, round_trip.fve, round_trip.baseline, len(vectors), round_trip.n_failed_parses)


def summary_line(result: DemoResult) -> str:
    return (f"mean round-trip FVE {result.mean_fve:.3f} over {result.n_explained} tokens "
            f"(paper baseline {result.baseline:.3f}: mean squared distance of these rescaled vectors from their "
            f"mean); {result.failed_parses} explanations failed to parse")


def print_demo(result: DemoResult) -> None:
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
    parser.add_argument("--html", type=Path, default=None,
                        help="also write a self-contained page: tokens coloured by FVE, explanation on hover")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    if args.html:
        check_output_path(args.html, what="--html")
    result = run_demo(args.checkpoint, args.sentences, args.max_new_tokens)
    print_demo(result)
    if args.html:
        args.html.write_text(render_page("nla_lens toy NLA: round trip of held-out Shakespeare", result.sentences,
                                         summary_line(result)), encoding="utf-8")
        print(f"wrote {args.html}")

