"""Smoke test of an installed nla_lens wheel, run by .ci/wheel_check.sh as `python -I` from outside the clone.

    python -I wheel_smoke.py CLONE DEMO_OUTPUT BACKEND

Checks that nla_lens comes from the venv (not the clone), that its version is the distribution's, that the install
gives the BACKEND expected of it ("hooked" with the tl3 extra, "bridge" without one), that
`nla-lens demo` (its stdout in DEMO_OUTPUT) met the toy's held-out bar, and that the public API loads the
toy AV from the installed package and verbalizes captured base-model activations into parsed explanations.
"""

from __future__ import annotations

import json
import re
import sys
from importlib.metadata import version
from pathlib import Path

import torch

import nla_lens as nl
from nla_lens import backends, loading
from nla_lens.toy.labeler import names_token

POSITIONS = [8, 12, 16, 20, 24, 28, 32, 36]  # past the toy's minimum context of 8 tokens
DEMO_MIN_FVE = 0.8  # the held-out bar tests/test_toy.py holds the bundled toy to


def check_installed(clone: Path) -> Path:
    package = Path(nl.__file__).resolve().parent
    assert package.is_relative_to(Path(sys.prefix).resolve()), f"nla_lens imported from {package}, not the venv"
    assert not package.is_relative_to(clone), f"nla_lens imported from the clone ({package})"
    assert nl.__version__ == version("nla_lens"), f"__version__ {nl.__version__} != {version('nla_lens')}"
    return package


def check_backend(expected: str) -> None:
    found = backends.default_backend()
    assert found == expected, f"backend {found} on transformer-lens {version('transformer-lens')}, expected {expected}"
    print(f"backend ok: {found} on transformer-lens {version('transformer-lens')}")


def check_demo(demo_output: str) -> None:
    # Explanation.summary(): "122 tokens of 3 texts at layer 3, mean MSE 0.103, FVE 0.876 (...), 0 failed parses"
    found = re.search(r"(\d+) tokens of \d+ texts? at layer \d+, mean MSE \S+, FVE (\S+) \(.*\), (\d+) failed parses",
                      demo_output)
    assert found, "nla-lens demo printed no summary line"
    n_tokens, fve, failed = int(found[1]), float(found[2]), int(found[3])
    assert fve >= DEMO_MIN_FVE and n_tokens > 0 and failed == 0, found[0]
    print(f"demo ok: FVE {fve:.3f} over {n_tokens} tokens, {failed} failed parses")


def check_verbalize(toy: Path) -> None:
    av = nl.ActivationVerbalizer.from_pretrained(toy / "av")
    tokenizer = loading.load_tokenizer(toy / "base")
    base = backends.load_model(toy / "base", tokenizer, dtype=torch.float32, device="cpu")
    speeches = [tokenizer.encode(doc["text"], add_special_tokens=False)
                for doc in json.loads((toy / "heldout.json").read_text())]
    ids = next(ids for ids in speeches if len(ids) > POSITIONS[-1])
    with nl.capture(base, av.meta.layer, positions=POSITIONS) as cap:
        base(torch.tensor([ids]))
    out = av.verbalize(cap.vectors, max_new_tokens=48, progress=False)
    for v in out:
        assert v.explanation is not None and v.explanation.startswith('The token "'), f"unparsed: {v.text!r}"
    named = sum(names_token(v.explanation, tokenizer, ids[p]) for v, p in zip(out, POSITIONS, strict=True))
    # The toy names the true token 75% of the time on held-out text (README); half is a generous floor.
    assert named >= len(POSITIONS) // 2, f"only {named} of {len(POSITIONS)} explanations name their token"
    print(f"verbalize ok: {len(out)} parsed explanations, {named} name their token, e.g. {out[0].explanation!r}")


def main() -> None:
    clone, demo_output, backend = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), sys.argv[3]
    package = check_installed(clone)
    print(f"installed ok: nla_lens {nl.__version__} from {package}")
    check_backend(backend)
    check_demo(demo_output.read_text())
    check_verbalize(package / "toy" / "checkpoints")


if __name__ == "__main__":
    main()
