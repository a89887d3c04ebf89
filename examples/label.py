"""Write explanations for an extraction: `python examples/label.py runs/activations runs/explanations.jsonl`.

A real NLA learns from explanations an LLM wrote for each position. This stands in with a programmatic
label (the token and the text just before it), enough to watch the AV and AR learn on the toy base model.
"""

from __future__ import annotations

import argparse
import sys

from nla_lens.errors import NLAError
from nla_lens.training import label_activations, load_activations, save_explanations
from nla_lens.training.extraction import ActivationRecord


def describe(record: ActivationRecord) -> str:
    return f"The token {record.token!r}, after {record.prefix[-24:]!r}."


def main(activations: str, out: str) -> None:
    path = save_explanations(label_activations(load_activations(activations), describe), out)
    print(f"explanations written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Label an extraction with stand-in explanations.")
    parser.add_argument("activations", help="the out_dir nla-lens extract wrote")
    parser.add_argument("out", help="the explanations file to write (.jsonl)")
    args = parser.parse_args()
    try:
        main(args.activations, args.out)
    except NLAError as exc:  # a wrong path or file: the message says what to fix, no traceback
        sys.exit(f"{type(exc).__name__}: {exc}")
