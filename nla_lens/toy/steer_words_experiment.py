"""Steer with words on the bundled toy NLA: edit the predicted token in an explanation, steer, count.

At held-out positions whose explanation parses as ``The token "X", after "Y", predicting "Z".``, the
edit writes a different frequent token Z' for Z, and `nl.steer_with_words` steers the base model's
layer-K residual at that position along the AR's Delta. Per alpha: how often the base model's
argmax next token becomes Z', and the mean change of log p(Z'); the control adds a random direction
of the same norm (alpha * ||h||) at the same sites, and a reference shows what the same push can do
along a direction read off the base model itself: the mean unit residual of held-out positions where
the base predicts Z' minus that where it predicts its argmax at the site (the "oracle"; it needs no
NLA, so it separates what the intervention can do from what the AR's Delta gets of it). Z' comes
from the most frequent predicted tokens, never Z and never the base model's own argmax there, so
every hit is a change:

* ``choice="random"``: Z' drawn uniformly (seeded) from those tokens;
* ``choice="plausible"``: the one the base model already finds most likely at the site, i.e. an
  edit the explanation could have said (as the paper's rabbit -> mouse). The toy AR was trained only
  on explanations consistent with their context and reads an implausible Z' weakly
  (docs/guide/steer-words.md); the issue's bar is met with these edits, not with uniform ones.

Run it:

    python -m nla_lens.toy.steer_words_experiment [--checkpoint DIR] [--sites 100] [--samples 1]
        [--choice random|plausible] [--mode add|replace]

Re-run it whenever the bundled toy is retrained; the tables of docs/guide/steer-words.md are its output.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor

from nla_lens import backends
from nla_lens.capture import resid_post_name
from nla_lens.checks import check_counts, check_finite, counted, is_count
from nla_lens.display import format_number
from nla_lens.errors import InputError, NLAError
from nla_lens.injection import unit
from nla_lens.nla import NLA
from nla_lens.results import TabularResult
from nla_lens.steer_words import Mode, WordSteering, steer_with_words
from nla_lens.toy.demo import TOY_DIR
from nla_lens.toy.evaluate import HELDOUT_FILE, MAX_TOKENS, MIN_CONTEXT, ToyNLA
from nla_lens.toy.labeler import quote

ALPHAS = (0.25, 0.5, 1.0, 2.0)
Choice = Literal["random", "plausible"]
# The labeler's format (nla_lens.toy.labeler.describe_position); "after" is absent at a text's start.
EXPLANATION = re.compile(r'^The token (".*?"), (?:after (".*?"), )?predicting (".*")\.$')


@dataclass(frozen=True)
class AlphaRow:
    """One steering strength: what steering with the words, the random control and the oracle direction did.

    Attributes:
        alpha: the steering strength, a fraction of the residual's norm.
        argmax_hit: fraction of sites where Z' became the argmax next token.
        delta_logp: mean change of log p(Z') at the site, in nats.
        control_argmax_hit: `argmax_hit` with a random direction of the same norm.
        control_delta_logp: `delta_logp` with that random direction.
        oracle_argmax_hit: `argmax_hit` along the base model's own Z' - argmax direction (module docstring).
        oracle_delta_logp: `delta_logp` along that direction.
    """

    alpha: float
    argmax_hit: float
    delta_logp: float
    control_argmax_hit: float
    control_delta_logp: float
    oracle_argmax_hit: float
    oracle_delta_logp: float


@dataclass(frozen=True, repr=False)
class SteerWordsExperiment(TabularResult):
    """Per alpha, how often steering with the edited explanation makes Z' the argmax, and the control.

    Attributes:
        n_sites: held-out sites steered.
        samples: explanations per site that Delta averages over (1: the greedy one).
        choice: how Z' was chosen: "random" or "plausible" (module docstring).
        mode: the steering mode, "add" or "replace".
        av_names_argmax: fraction of sites where the explanation's Z is the base model's argmax.
        oracle_cosine: mean cosine between the words' Delta and the oracle direction, per site.
        rows: one per alpha.
    """

    n_sites: int
    samples: int
    choice: str
    mode: str
    av_names_argmax: float
    oracle_cosine: float
    rows: list[AlphaRow]

    display_columns = ("alpha", "argmax_hit", "delta_logp", "control_argmax_hit", "control_delta_logp",
                       "oracle_argmax_hit")
    schema = pa.schema({"alpha": pa.float64(), "argmax_hit": pa.float64(), "delta_logp": pa.float64(),
                        "control_argmax_hit": pa.float64(), "control_delta_logp": pa.float64(),
                        "oracle_argmax_hit": pa.float64(), "oracle_delta_logp": pa.float64(), "n_sites": pa.int64(),
                        "samples": pa.int64(), "choice": pa.string(), "mode": pa.string(),
                        "av_names_argmax": pa.float64(), "oracle_cosine": pa.float64()})

    def meets_target(self, hit: float = 0.5, control: float = 0.05, max_alpha: float = 2.0) -> bool:
        """Issue #16's bar: at some alpha <= 2, Z' is the argmax at >= 50% of sites, the control at <= 5%."""
        return any(r.alpha <= max_alpha and r.argmax_hit >= hit and r.control_argmax_hit <= control
                   for r in self.rows)

    def to_markdown(self) -> str:
        lines = ["| alpha | Z' argmax (words) | mean Δ log p(Z') (words) | Z' argmax (random) "
                 "| mean Δ log p(Z') (random) | Z' argmax (oracle) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.alpha:g} | {r.argmax_hit:.0%} | {format_number(r.delta_logp, 2, signed=True)} "
                  f"| {r.control_argmax_hit:.0%} | {format_number(r.control_delta_logp, 2, signed=True)} "
                  f"| {r.oracle_argmax_hit:.0%} |" for r in self.rows]
        return "\n".join(lines)

    def to_records(self) -> list[dict[str, Any]]:
        settings = {"n_sites": self.n_sites, "samples": self.samples, "choice": self.choice, "mode": self.mode,
                    "av_names_argmax": self.av_names_argmax, "oracle_cosine": self.oracle_cosine}
        return [{**asdict(r), **settings} for r in self.rows]

    def summary(self) -> str:
        said = (f"{counted(self.n_sites, 'held-out site')}, {self.choice} Z', mode={self.mode}, "
                f"{counted(self.samples, 'explanation sample')} per site; the AV's Z is the base model's argmax at "
                f"{self.av_names_argmax:.0%} of them; ")
        if not self.rows:  # `save` records the summary of any result, one with no alpha too
            return said + "no alpha run"
        best = max(self.rows, key=lambda r: r.argmax_hit)
        return said + (f"best alpha={best.alpha:g}: Z' argmax {best.argmax_hit:.0%} vs random "
                       f"{best.control_argmax_hit:.0%} (oracle direction {best.oracle_argmax_hit:.0%}; cosine of Delta "
                       f"with it {format_number(self.oracle_cosine, 2)})")


def run_experiment(folder: Path = TOY_DIR, n_sites: int = 100, alphas: tuple[float, ...] = ALPHAS,
                   samples: int = 1, choice: Choice = "random", mode: Mode = "add", stride: int = 5, per_doc: int = 2,
                   frequent: int = 8, seed: int = 0) -> SteerWordsExperiment:
    """The measurement behind docs/guide/steer-words.md's tables; `samples > 1` averages Delta over sampled
    explanations."""
    if choice not in ("random", "plausible"):
        raise InputError(f"choice must be 'random' or 'plausible', got {choice!r}")
    if not is_count(n_sites, 1):
        raise InputError(f"n_sites must be >= 1 (the experiment steers at that many held-out sites), got {n_sites}")
    if not alphas:  # a table of no rows, after minutes of verbalizing
        raise InputError("alphas must name at least one steering strength, e.g. (0.5, 1.0)")
    check_finite(**{f"alphas[{i}]": alpha for i, alpha in enumerate(alphas)})  # not after the AV and AR ran
    if mode not in ("add", "replace"):
        raise InputError(f"mode must be 'add' or 'replace', got {mode!r}")
    # samples < 1 would run the greedy branch as one sample; a stride < 1 or no site per speech picks no column
    check_counts(1, samples=samples, stride=stride, per_doc=per_doc)
    if frequent < 3:  # Z' excludes Z and the base's argmax: fewer than 3 candidates can leave none
        raise InputError(f"frequent must be >= 3 (Z' is drawn from that many frequent tokens, never Z and never "
                         f"the base model's argmax), got {frequent}")
    toy = ToyNLA.load(folder)
    nla = NLA(toy.av, toy.ar)
    tokens, positions = _candidate_sites(toy, folder, stride, per_doc, limit=n_sites + n_sites // 4)
    if len(tokens) < n_sites:
        raise InputError(f"the held-out speeches give {len(tokens)} sites ({per_doc} per speech of at least "
                         f"{MIN_CONTEXT + (per_doc - 1) * stride + 1} tokens), fewer than n_sites={n_sites}; lower "
                         "n_sites, or raise per_doc")
    with torch.no_grad():
        clean = _site_logprobs(toy.base, tokens, positions, [])
        vectors = _site_vectors(toy, tokens, positions)
        said = [v.explanation for v in toy.av.verbalize(vectors, max_new_tokens=48, batch_size=64, progress=False)]
    keep, edits, targets, named = _choose_edits(toy, said, clean, choice, frequent, seed, n_sites)
    if len(keep) < n_sites:
        raise InputError(f"only {len(keep)} held-out sites have a parsable explanation; lower n_sites or stride")
    tokens, positions, clean = tokens[keep], positions[keep], clean[keep]
    # One sample: the greedy explanations read above; more: the AV samples them (seeded) inside the call.
    sampling = ({"samples": samples, "seed": seed, "max_new_tokens": 48} if samples > 1
                else {"explanations": [said[i] for i in keep]})
    steering = steer_with_words(nla, toy.base, tokens, positions, edit=edits, mode=mode, **sampling, batch_size=64,
                                compare=False, continue_tokens=0)
    noise = torch.randn(steering.delta.shape, generator=torch.Generator().manual_seed(seed))
    control = replace(steering, delta=noise, target=noise)
    oracle_directions = _oracle_directions(toy, folder, clean.argmax(-1), targets)
    oracle = replace(steering, delta=oracle_directions, target=oracle_directions)
    rows = []
    with torch.no_grad():
        for alpha in alphas:
            words = _effect(toy.base, tokens, positions, steering, alpha, clean, targets)
            random = _effect(toy.base, tokens, positions, control, alpha, clean, targets)
            reference = _effect(toy.base, tokens, positions, oracle, alpha, clean, targets)
            rows.append(AlphaRow(alpha, *words, *random, *reference))
    cosine = float(torch.nn.functional.cosine_similarity(steering.delta, oracle_directions, dim=-1).mean())
    return SteerWordsExperiment(len(keep), samples, choice, mode, av_names_argmax=sum(named) / len(named),
                                oracle_cosine=cosine, rows=rows)


def _candidate_sites(toy: ToyNLA, folder: Path, stride: int, per_doc: int,
                     limit: int) -> tuple[Int[Tensor, "n pos"], Int[Tensor, " n"]]:
    """One row per site, in file order: the first tokens of a held-out speech, the site at column
    MIN_CONTEXT + j * stride (j < per_doc). Rows end at the last site, so none needs padding."""
    docs = json.loads((folder / HELDOUT_FILE).read_text())
    columns = [MIN_CONTEXT + j * stride for j in range(per_doc)]
    width = columns[-1] + 1
    rows, positions = [], []
    for doc in docs:
        ids = toy.av.tokenizer.encode(doc["text"], add_special_tokens=False)
        if len(ids) >= width:
            rows += [ids[:width]] * per_doc
            positions += columns
        if len(rows) >= limit:
            break
    return torch.tensor(rows[:limit]), torch.tensor(positions[:limit])


def _site_vectors(toy: ToyNLA, tokens: Tensor, positions: Tensor) -> Tensor:
    k = toy.av.meta.layer
    kept: list[Tensor] = []
    backends.run_with_hooks(toy.base, tokens, stop_at_layer=k + 1, fwd_hooks=[
        (resid_post_name(k), lambda resid, hook: kept.append(resid[torch.arange(len(tokens)), positions]))])
    return kept[0].float()


@torch.no_grad()
def _oracle_directions(toy: ToyNLA, folder: Path, argmax: Int[Tensor, " n"],
                       targets: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
    """Per site: mean unit layer-K residual of held-out positions the base predicts Z' minus that of
    positions it predicts its argmax at the site (positions past MIN_CONTEXT, first MAX_TOKENS)."""
    k = toy.av.meta.layer
    sums: dict[int, Tensor] = {}
    counts: Counter[int] = Counter()
    kept: list[Tensor] = []
    keep = (resid_post_name(k), lambda resid, hook: kept.append(resid[0, MIN_CONTEXT:]))
    for doc in json.loads((folder / HELDOUT_FILE).read_text()):
        ids = toy.av.tokenizer.encode(doc["text"], add_special_tokens=False)[:MAX_TOKENS]
        if len(ids) <= MIN_CONTEXT:
            continue
        kept.clear()
        logits = backends.run_with_hooks(toy.base, torch.tensor([ids]), fwd_hooks=[keep])
        residuals = unit(kept[0].float())
        for predicted, residual in zip(logits[0, MIN_CONTEXT:].argmax(-1).tolist(), residuals, strict=True):
            sums[predicted] = sums.get(predicted, 0) + residual
            counts[predicted] += 1
    means = {token: total / counts[token] for token, total in sums.items()}
    missing = sorted({int(t) for t in (*targets, *argmax)} - set(means))
    if missing:  # a direction needs the mean residual of positions where the base predicts the token
        names = ", ".join(f"{quote(cast(str, toy.av.tokenizer.decode([t])))} (id {t})" for t in missing)
        raise InputError(
            f"the base model never predicts {names} at the held-out positions the oracle reads (past column "
            f"{MIN_CONTEXT}, the first {MAX_TOKENS} tokens of each text in {folder / HELDOUT_FILE}), so it has no "
            "oracle direction towards it; draw Z' from fewer frequent tokens (frequent=) or with another seed"
        )
    return torch.stack([means[int(z)] - means[int(a)] for z, a in zip(targets, argmax, strict=True)])


def _site_logprobs(base, tokens: Tensor, positions: Tensor, fwd_hooks: list) -> Tensor:
    mask = backends.implicit_attention_mask(base, tokens)
    logits = backends.run_with_hooks(base, tokens, attention_mask=mask, fwd_hooks=fwd_hooks)
    return logits[torch.arange(len(tokens)), positions].float().log_softmax(-1)


def _choose_edits(toy: ToyNLA, said: list[str | None], clean: Tensor, choice: Choice, frequent: int, seed: int,
                  limit: int) -> tuple[list[int], list, Tensor, list[bool]]:
    """Sites whose explanation parses, each with Z' (frequent, != Z, != the base argmax) and its edit."""
    argmax = clean.argmax(-1)
    tokenizer = toy.av.tokenizer
    quoted = {quote(cast(str, tokenizer.decode([i]))): i for i in reversed(range(len(tokenizer)))}  # lowest id wins
    parsed = [EXPLANATION.match(s or "") for s in said]
    counts = Counter(m.group(3) for m in parsed if m and m.group(3) in quoted)
    pool = [z for z, _ in counts.most_common(frequent)]
    rng = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    edits: list[Callable[[str], str]] = []
    targets: list[int] = []
    named: list[bool] = []
    for i, m in enumerate(parsed):
        if m is None or len(keep) == limit:
            continue
        options = [z for z in pool if z != m.group(3) and quoted[z] != int(argmax[i])]
        if choice == "random":
            new = options[int(torch.randint(len(options), (1,), generator=rng))]
        else:
            new = max(options, key=lambda z: float(clean[i, quoted[z]]))
        keep.append(i)
        edits.append(_set_prediction(new))
        targets.append(quoted[new])
        named.append(quoted.get(m.group(3)) == int(argmax[i]))
    return keep, edits, torch.tensor(targets), named


def _set_prediction(new: str):
    """The edit: whatever token an explanation predicts becomes `new` (a sample that does not parse is kept)."""
    def edit(explanation: str) -> str:
        m = EXPLANATION.match(explanation)
        return explanation if m is None else explanation[:m.start(3)] + new + "."
    return edit


def _effect(base, tokens: Tensor, positions: Tensor, steering: WordSteering, alpha: float, clean: Tensor,
            targets: Tensor) -> tuple[float, float]:
    steered = _site_logprobs(base, tokens, positions, steering.fwd_hooks(alpha=alpha))
    rows = torch.arange(len(targets))
    hit = (steered.argmax(-1) == targets).float().mean()
    delta = (steered[rows, targets] - clean[rows, targets]).mean()
    return float(hit), float(delta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=TOY_DIR,
                        help="the toy folder holding base/, av/, ar/ and heldout.json (default: the bundled toy)")
    parser.add_argument("--sites", "--positions", dest="sites", type=int, default=100,
                        help="how many held-out sites to steer at (default 100; --positions is its older name)")
    parser.add_argument("--samples", type=int, default=1,
                        help="explanations sampled per site, Delta averaged over them (default 1: the greedy one)")
    parser.add_argument("--choice", choices=["random", "plausible"], default="random",
                        help="Z': a random frequent token, or the one the base model finds most likely at the site "
                             "(default random)")
    parser.add_argument("--mode", choices=["add", "replace"], default="add",
                        help="steer along Delta (add) or towards the edited reconstruction T (replace; default add)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random Z', the control direction and sampled explanations (default 0)")
    args = parser.parse_args(argv)
    try:
        result = run_experiment(args.checkpoint, args.sites, samples=args.samples, choice=args.choice,
                                mode=args.mode, seed=args.seed)
    except NLAError as error:
        parser.exit(2, f"error: {error}\n")
    print(result.summary())
    print(result.to_markdown())
    print("target met" if result.meets_target() else "target NOT met")


if __name__ == "__main__":
    main()
