"""Do the toy NLA's explanations of SAE features name the token the feature fires on?

`python -m nla_lens.toy.sae_experiment` trains a small SAE on the toy base at layer K with
sae-lens's own training runner (offline: an in-memory dataset of the bundled held-out speeches, no
wandb, seeded), then, for every live feature whose top activations fall mostly on one token T,
asks the toy AV to explain the feature's decoder row and checks whether the explanation names T
(the toy's explanations start `The token "T"`). It reports that agreement with and without the
mean-residual offset, for the base residual at the feature's strongest activation (what
`feature_card(..., explain_contexts=True)` explains first), and a control that pairs each
explanation with another feature's T.

`--output run.json` saves a run's result (the figures it prints, the config and every feature's
row; `SAEExperimentResult.load` reads it back). Maintainers re-run it whenever the bundled toy is
retrained, with `--write`, which overwrites the numbers stored beside the checkpoints (the test
compares them with a fresh run; the README quotes the headline, docs/guide/sae.md the rest).

It needs the ``sae`` extra (sae-lens 6.x, TransformerLens 3.x); elsewhere it exits with the
[`BackendError`][nla_lens.errors.BackendError] that names the install.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor

from nla_lens.capture import resid_post, resid_post_name
from nla_lens.checks import check_input_file, check_output_path, file_kind, file_path
from nla_lens.display import format_number
from nla_lens.errors import InputError, NLAError
from nla_lens.nla import NLA
from nla_lens.results import TabularResult
from nla_lens.sae_columns import SAE_EXPERIMENT
from nla_lens.toy import BASE_MODEL
from nla_lens.toy.demo import TOY_DIR
from nla_lens.toy.evaluate import HELDOUT_FILE, MIN_CONTEXT, ToyNLA
from nla_lens.toy.labeler import names_token
from nla_lens.vector_files import OUTPUT_SUFFIXES, write_json

if TYPE_CHECKING:
    from sae_lens import SAE

SCORES_FILE = "sae_scores.json"


@dataclass(frozen=True)
class SAEExperimentConfig:
    d_sae: int = 512
    l1_coefficient: float = 10.0
    training_tokens: int = 100_000
    lr: float = 1e-3
    context_size: int = 128  # tokens per dataset row, cut from the concatenated speeches (as the base was trained)
    train_batch_size_tokens: int = 1024
    seed: int = 0
    top_k: int = 20  # a feature is live if it fires on at least this many positions; its top_k decide T
    purity: float = 0.8  # share of the top_k activations that must sit on T
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        if self.training_tokens < self.train_batch_size_tokens:
            raise InputError(f"training_tokens must be >= train_batch_size_tokens ({self.train_batch_size_tokens}): "
                             f"with {self.training_tokens} the SAE takes no training step and every number is noise")


@dataclass(frozen=True)
class TokenFeature:
    feature: int
    token: int
    purity: float


@dataclass(frozen=True)
class FeatureRow:
    """One token feature: its token T and what each readout of it said.

    Attributes:
        feature: the SAE feature's index.
        token: T, the token its top activations sit on, decoded.
        purity: the share of its top_k activations on T.
        explanation: the AV's explanation of the bare decoder row; None on a failed parse.
        explanation_offset: of mean + spread * unit row.
        explanation_top_context: of the base residual at the feature's strongest activation.
        named: `explanation` names T.
        named_offset: `explanation_offset` names T.
        named_top_context: `explanation_top_context` names T.
        control_token: another token feature's T, the control.
        named_control: `explanation` names the control token.
    """

    feature: int
    token: str
    purity: float
    explanation: str | None
    explanation_offset: str | None
    explanation_top_context: str | None
    named: bool
    named_offset: bool
    named_top_context: bool
    control_token: str
    named_control: bool


@dataclass(frozen=True, repr=False)
class SAEExperimentResult(TabularResult):
    """The scores of the run, and one row per token feature: its token T and whether each readout names it.

    Attributes:
        n_positions: the held-out positions the features' activations were read on.
        n_live: features that fire on at least `config.top_k` positions.
        n_token_features: live features whose top activations sit mostly on one token T (>= `config.purity`).
        agreement: share of the token features whose explanation of the bare decoder row names T.
        agreement_offset: the same for the explanation of mean + spread * unit row.
        agreement_top_context: the same for the explanation of the residual where the feature fires most.
        control: share whose explanation of the bare row names another feature's T.
        cosine: mean cos(AR reconstruction of the bare row's explanation, the row).
        cosine_offset: the same with the mean offset (reconstruction at the input's norm, minus the mean).
        control_cosine: mean cos(AR reconstruction, the control feature's row).
        sae_fvu: fraction of variance the SAE leaves unexplained on these positions.
        sae_l0: mean number of active features per position.
        train_seconds: the SAE's training time on this machine.
        config: the run's settings.
        rows: one per token feature.
    """

    n_positions: int
    n_live: int
    n_token_features: int
    agreement: float
    agreement_offset: float
    agreement_top_context: float
    control: float
    cosine: float
    cosine_offset: float
    control_cosine: float
    sae_fvu: float
    sae_l0: float
    train_seconds: float
    config: SAEExperimentConfig
    rows: list[FeatureRow]

    display_columns = ("feature", "token", "purity", "named", "named_offset", "named_top_context", "explanation")
    schema = SAE_EXPERIMENT.schema

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def headline(self) -> dict[str, Any]:
        """The figures the checkpoint gives, and the config: every field but the rows and the training time, which
        is the machine's (what `--write` stores in the package: a rerun on the same checkpoint leaves it unchanged)."""
        return {k: v for k, v in asdict(self).items() if k not in ("rows", "train_seconds")}

    def save(self, path: str | Path) -> Path:
        """`.json`: the whole result, the headline figures with the rows (`load` reads it back); `.parquet`,
        `.jsonl` or `.html` as for every result: the rows (a `.parquet` with the result type and summary line,
        which `nl.read_result` reads back as a DataFrame), or the view."""
        path = file_path(path, "save")
        if file_kind(path) != ".json":
            return super().save(path)
        check_output_path(path, (".json",))
        write_json(path, asdict(self), indent=1)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SAEExperimentResult:
        """A result `save` wrote as `.json`."""
        path = file_path(path, "load")
        kind = file_kind(path)
        if kind != ".json":
            rows = ""
            if kind in OUTPUT_SUFFIXES:  # a .parquet keeps the summary line as text, not the figures and config
                rows = f"; nl.read_result({str(path)!r}) reads this file's rows as a DataFrame"
                rows += ", with the result type and summary line in df.attrs" if kind == ".parquet" else ""
            raise InputError(f"{path}: only the .json file save wrote loads back as a result (the figures and config "
                             f"with the rows: result.save('run.json'), or the command's --output run.json){rows}")
        check_input_file(path, "SAE experiment result")
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{**saved, "config": SAEExperimentConfig(**saved["config"]),
                          "rows": [FeatureRow(**row) for row in saved["rows"]]})
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(f"{path} is no SAE experiment result that SAEExperimentResult.save wrote as .json "
                             f"({type(exc).__name__}: {exc})") from exc

    def summary(self) -> str:
        return (f"{self.n_token_features} of {self.n_live} live features fire >= {self.config.purity:.0%} on one "
                f"token in their top {self.config.top_k}; the AV names that token for {self.agreement:.1%} of them "
                f"(bare decoder rows), {self.agreement_offset:.1%} with the mean offset, "
                f"{self.agreement_top_context:.1%} for the residual where it fires most; control (another "
                f"feature's token) {self.control:.1%}. Mean AR cosine to the decoder row {format_number(self.cosine)} "
                f"({format_number(self.cosine_offset)} with the offset; {format_number(self.control_cosine)} to the "
                f"control's row). SAE: d_sae {self.config.d_sae}, L0 {format_number(self.sae_l0, 1)}, "
                f"FVU {format_number(self.sae_fvu)}, trained in {self.train_seconds:.0f} s")


def token_rows(toy: ToyNLA, folder: Path, context_size: int) -> Int[Tensor, "rows context"]:
    """The held-out speeches, tokenized, concatenated and cut into rows of `context_size` tokens."""
    docs = json.loads((folder / HELDOUT_FILE).read_text())
    stream = [t for doc in docs for t in toy.av.tokenizer.encode(doc["text"], add_special_tokens=False)]
    n = len(stream) // context_size
    return torch.tensor(stream[:n * context_size]).view(n, context_size)


@contextmanager
def _quiet_sae_lens() -> Iterator[None]:
    """sae-lens warns that an override dataset / model makes a run irreproducible from its config alone."""
    log = logging.getLogger("sae_lens")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def train_toy_sae(toy: ToyNLA, rows: Int[Tensor, "rows context"], cfg: SAEExperimentConfig) -> SAE:
    """A standard (L1) SAE on `blocks.K.hook_resid_post`, trained by sae-lens's own runner, offline and seeded.

    Positions before MIN_CONTEXT are left out (the toy AV never saw them); the torch RNG is seeded
    for the run (sae-lens's runner does not use its `seed` itself) and restored afterwards.
    """
    from datasets import Dataset

    from nla_lens.sae import require_sae_lens

    sae_lens = require_sae_lens()

    layer = toy.av.meta.layer
    sae_cfg = sae_lens.StandardTrainingSAEConfig(
        d_in=toy.av.meta.d_model, d_sae=cfg.d_sae, l1_coefficient=cfg.l1_coefficient,
        normalize_activations="none", dtype="float32", device="cpu")
    runner_cfg = sae_lens.LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=BASE_MODEL, hook_name=resid_post_name(layer),
        is_dataset_tokenized=True, streaming=False, context_size=rows.shape[1], prepend_bos=False,
        seqpos_slice=(MIN_CONTEXT, None), training_tokens=cfg.training_tokens,
        train_batch_size_tokens=cfg.train_batch_size_tokens, store_batch_size_prompts=16,
        n_batches_in_buffer=64, lr=cfg.lr, device="cpu", seed=cfg.seed,
        logger=sae_lens.LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=None,
        verbose=False, dead_feature_window=200, feature_sampling_window=400)
    dataset = Dataset.from_dict({"tokens": rows.tolist()})
    with torch.random.fork_rng(), _quiet_sae_lens():
        torch.manual_seed(cfg.seed)
        runner = sae_lens.LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset,
                                                         override_model=toy.base)
        sae = runner.run()
    return sae.eval()


def token_features(acts: Float[Tensor, "n d_sae"], tokens: Int[Tensor, " n"], top_k: int,
                   purity: float) -> tuple[int, list[TokenFeature]]:
    """(number of live features, the live features whose top_k activations fall >= purity on one token)."""
    live = ((acts > 0).sum(dim=0) >= top_k).nonzero().flatten()
    top = acts[:, live].topk(top_k, dim=0).indices  # [top_k, n_live]
    found = []
    for column, feature in enumerate(live.tolist()):
        values, counts = tokens[top[:, column]].unique(return_counts=True)
        best = int(counts.argmax())
        if counts[best] >= purity * top_k:
            found.append(TokenFeature(feature, int(values[best]), int(counts[best]) / top_k))
    return len(live), found


def control_pairs(tokens: list[int]) -> list[int]:
    """For each feature, the index of the next feature (cyclically) whose token differs from its own."""
    n = len(tokens)
    return [next(((i + j) % n for j in range(1, n) if tokens[(i + j) % n] != token), i)
            for i, token in enumerate(tokens)]


def run_sae_experiment(folder: Path = TOY_DIR, cfg: SAEExperimentConfig | None = None) -> SAEExperimentResult:
    # Here, not at the top: on TransformerLens 4.x it raises the BackendError that names the install, which `main`
    # prints as one line, and the module's result types still load
    from nla_lens.sae import ResidualStats, verbalize_sae_features

    cfg = cfg or SAEExperimentConfig()
    toy = ToyNLA.load(folder)
    tokenizer = toy.av.tokenizer
    rows = token_rows(toy, folder, cfg.context_size)
    start = time.perf_counter()
    sae = train_toy_sae(toy, rows, cfg)
    train_seconds = time.perf_counter() - start
    with torch.inference_mode():
        resid = torch.cat([resid_post(toy.base, chunk, toy.av.meta.layer)[:, MIN_CONTEXT:].float()
                           for chunk in rows.split(32)]).flatten(0, 1)
        acts = sae.encode(resid)
        sae_fvu = float((sae.decode(acts) - resid).pow(2).sum() / (resid - resid.mean(dim=0)).pow(2).sum())
    tokens = rows[:, MIN_CONTEXT:].flatten()
    n_live, found = token_features(acts, tokens, cfg.top_k, cfg.purity)
    if not found:
        raise InputError(f"no live feature fires >= {cfg.purity:.0%} on one token after {cfg.training_tokens} "
                         "training tokens: train the SAE longer (--training-tokens, default "
                         f"{SAEExperimentConfig.training_tokens})")
    features = [f.feature for f in found]
    targets = [f.token for f in found]
    pairs = control_pairs(targets)
    controls = [targets[j] for j in pairs]
    nla = NLA(toy.av, toy.ar)
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "batch_size": 128, "progress": False}
    bare = verbalize_sae_features(nla, sae, features, **kwargs)
    shifted = verbalize_sae_features(nla, sae, features, offset=ResidualStats.from_vectors(resid, toy.av.meta.layer),
                                     **kwargs)
    # Given an NLA, the AR rebuilt each explanation: both runs carry reconstructions and cosines.
    assert bare.reconstructions is not None and bare.cosines is not None and shifted.cosines is not None
    strongest = resid[acts[:, features].argmax(dim=0)]  # [n_features, d_model]
    top_context = nla.av.verbalize(strongest, **kwargs)
    other_rows = sae.W_dec.detach()[[features[j] for j in pairs]].float()
    control_cosines = torch.nn.functional.cosine_similarity(bare.reconstructions, other_rows, dim=1)
    table = []
    for f, e, e_offset, top, control in zip(found, bare.explanations, shifted.explanations, top_context, controls,
                                            strict=True):
        table.append(FeatureRow(
            f.feature, cast(str, tokenizer.decode([f.token])), f.purity, e, e_offset, top.explanation,
            names_token(e, tokenizer, f.token), names_token(e_offset, tokenizer, f.token),
            names_token(top.explanation, tokenizer, f.token), cast(str, tokenizer.decode([control])),
            names_token(e, tokenizer, control)))
    n = len(table)
    return SAEExperimentResult(
        n_positions=len(tokens), n_live=n_live, n_token_features=n,
        agreement=sum(r.named for r in table) / n, agreement_offset=sum(r.named_offset for r in table) / n,
        agreement_top_context=sum(r.named_top_context for r in table) / n,
        control=sum(r.named_control for r in table) / n, cosine=float(bare.cosines.nanmean()),
        cosine_offset=float(shifted.cosines.nanmean()), control_cosine=float(control_cosines.nanmean()),
        sae_fvu=sae_fvu,
        sae_l0=float((acts > 0).sum(dim=1).float().mean()), train_seconds=train_seconds, config=cfg, rows=table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nla_lens.toy.sae_experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=TOY_DIR, help="the toy NLA folder (default: bundled)")
    parser.add_argument("--seed", type=int, default=SAEExperimentConfig.seed)
    parser.add_argument("--training-tokens", type=int, default=SAEExperimentConfig.training_tokens)
    parser.add_argument("--rows", action="store_true", help="also print every feature's token and explanations")
    parser.add_argument("--output", type=Path,
                        help="save the result as this .json file: the figures printed at the end, the config and "
                             "every feature's row (SAEExperimentResult.load reads it back)")
    parser.add_argument("--write", action="store_true",
                        help=f"maintainers' use, after retraining the toy: overwrite {SCORES_FILE} in the "
                             "--checkpoint folder (in the package by default), the numbers tests/test_sae.py "
                             "compares with (the README quotes the headline, docs/guide/sae.md the rest: update "
                             "them too); to keep a run's result, use --output")
    args = parser.parse_args(argv)
    scores = args.checkpoint / SCORES_FILE
    try:  # the outputs are checked before the minutes of work whose result goes there
        if args.output is not None:
            check_output_path(file_path(args.output, "--output"), (".json",), "--output")
        if args.write:
            check_output_path(scores, (".json",), "--write")
        result = run_sae_experiment(args.checkpoint, SAEExperimentConfig(seed=args.seed,
                                                                         training_tokens=args.training_tokens))
    except NLAError as error:
        parser.exit(2, f"error: {error}\n")
    if args.rows:
        for r in result.rows:
            print(f"{r.feature:>5} {r.token!r:<12} named={r.named!s:<5} offset={r.named_offset!s:<5} "
                  f"top_context={r.named_top_context!s:<5} {r.explanation}")
    print(result.summary())
    if args.output is not None:
        print(f"wrote {result.save(args.output)}")
    if args.write:
        write_json(scores, result.headline(), indent=1)
        print(f"wrote {scores}")


if __name__ == "__main__":
    main()
