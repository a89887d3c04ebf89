"""`read_training_run`: a run's curve read back from what the training commands wrote (the shipped examples, run
once here), as a result that prints, draws and saves; and the errors for what is not a run."""

from __future__ import annotations

import dataclasses
import json
import math
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import NEEDS_TL3

import nla_lens as nl
from nla_lens.cli import main
from nla_lens.training import TrainingRun, read_training_run

pytestmark = NEEDS_TL3
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The examples' pipeline (extract, label, train-av, train-ar, train-rl) on the toy base: real run folders."""
    folder = tmp_path_factory.mktemp("runs")
    for name in ("examples", "nla_lens"):
        (folder / name).symlink_to(ROOT / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(["extract", "examples/extract.yaml"]) == 0
        patch.setattr(sys, "argv", ["label.py", "runs/activations", "runs/explanations.jsonl"])
        runpy.run_path("examples/label.py", run_name="__main__")
        for command in ("train-av", "train-ar", "train-rl"):
            assert main([command, f"examples/{command}.yaml"]) == 0
    return folder / "runs"


def _record(folder: Path) -> dict:
    return json.loads((folder / "train_result.json").read_text())


@pytest.mark.parametrize(("name", "command"), [("av", "train-av"), ("ar", "train-ar"), ("rl", "train-rl")])
def test_a_finished_run_reads_back_as_its_record_one_row_per_step(runs, name, command):
    record = _record(runs / name)
    run = read_training_run(runs / name)
    assert (run.command, run.finished, run.steps) == (command, True, record["steps"])
    rows = run.to_records()
    # Step 0 holds the evaluation before training; every other row one logged step, with its evaluation if one ran.
    assert [row["step"] for row in rows] == [0] + [step["step"] for step in record["history"]]
    for step in record["history"]:
        row = rows[step["step"]]
        assert all(row[key] == value for key, value in step.items())
    for evaluation in record["evals"]:
        row = rows[evaluation["step"]]
        assert all(row[key] == value for key, value in evaluation.items())
    assert len({tuple(row) for row in rows}) == 1  # every row has every column, None where nothing was logged


def test_the_summary_gives_what_moved_from_the_record(runs):
    rl, av = _record(runs / "rl"), _record(runs / "av")
    summary = read_training_run(runs / "rl").summary()
    first, last = rl["history"][0]["reward"], rl["history"][-1]["reward"]
    assert summary.startswith(f"train-rl, {len(rl['history'])} of {rl['steps']} steps (finished), "
                              f"{rl['seconds']:.0f} s;")  # under a minute: seconds
    assert f"reward {first:.4f} -> {last:.4f}" in summary
    assert f"largest step KL {max(step['kl'] for step in rl['history']):.3g}" in summary
    fves = [e["eval_fve"] for e in rl["evals"]]
    assert f"held-out FVE {fves[0]:.4f} -> {fves[-1]:.4f}" in summary
    losses = [e["eval_loss"] for e in av["evals"]]
    assert f"eval loss {losses[0]:.4f} -> {losses[-1]:.4f}" in read_training_run(runs / "av").summary()
    assert repr(read_training_run(runs / "av")).startswith("TrainingRun: train-av, ")
    one_step = dataclasses.replace(read_training_run(runs / "rl"), steps=1, history=rl["history"][:1])
    assert one_step.summary().startswith("train-rl, 1 of 1 step (")  # not "1 of 1 steps"


def test_the_summary_names_a_value_logged_once_and_a_diverged_last_one(runs):
    """A run stopped before its second evaluation read "eval loss 7.3697 -> 7.3697", and one whose last evaluation
    was NaN (diverged) gave its last finite value: both looked like a run whose eval loss did not move."""
    run = read_training_run(runs / "av")
    first = run.evals[0]
    stopped = dataclasses.replace(run, evals=[first], history=run.history[:5])
    summary = stopped.summary()
    assert f"eval loss {first['eval_loss']:.4f} at step 0" in summary and "eval loss" in summary.split(";")[-1]
    assert f"loss {run.history[0]['loss']:.4f} -> {run.history[4]['loss']:.4f}" in summary
    diverged = dataclasses.replace(run, evals=[first, {**run.evals[-1], "eval_loss": None}])
    assert f"eval loss {first['eval_loss']:.4f} -> nan" in diverged.summary()
    no_fve = dataclasses.replace(read_training_run(runs / "ar"),
                                 evals=[{**e, "fve": None} for e in read_training_run(runs / "ar").evals])
    assert "held-out FVE" not in no_fve.summary()  # an AR's FVE from under 32 held-out vectors is never reported


def test_a_run_still_going_reads_from_its_newest_checkpoint(runs, tmp_path):
    """No train_result.json yet: the newest checkpoint's history. A stopped run (its checkpoint short of `steps`)
    says so, and an AR's run is told from an AV's by its trainable readout."""
    for name, command in (("av", "train-av"), ("ar", "train-ar"), ("rl", "train-rl")):
        going = tmp_path / name
        shutil.copytree(runs / name / "checkpoints", going / "checkpoints")
        newest = sorted((going / "checkpoints").iterdir())[-1]
        state = json.loads((newest / "trainer_state.json").read_text())
        run = read_training_run(going)
        # Its last step's checkpoint, but no record: the export after training did not finish.
        assert (run.command, run.source, run.finished) == (command, newest / "trainer_state.json", False)
        assert f"{state['config']['steps']} of {state['config']['steps']} steps (all steps done, no " \
               f"train_result.json: an nla-lens command writes it after the export, and resume: latest finishes " \
               f"one cut short; train_av / train_ar / train_rl from Python write none; read from checkpoint " \
               f"{newest.name})" in run.summary()
        in_finished_run = read_training_run(runs / name / "checkpoints" / newest.name)
        assert in_finished_run.finished and f"(finished; read from checkpoint {newest.name})" in \
               in_finished_run.summary()
        assert [row["step"] for row in run.to_records() if row.get("loss") is not None] == [
            step["step"] for step in state["history"]]
        assert read_training_run(newest).to_records() == run.to_records()
        state["config"]["steps"] *= 2  # a run set for twice the steps, stopped (or still going) at this checkpoint
        (newest / "trainer_state.json").write_text(json.dumps(state))
        stopped = read_training_run(going)
        assert not stopped.finished and f"of {state['config']['steps']} steps (running or stopped; read from " \
                                          f"checkpoint {newest.name})" in stopped.summary()
    # A checkpoint keeps NaN for a metric not computed (the SFT term is off); the rows say None, as the record does.
    assert all(math.isnan(step["sft_loss"]) for step in state["history"])
    assert [row["sft_loss"] for row in stopped.to_records()] == [None] * len(stopped.to_records())


def test_its_view_draws_the_curves_it_logged(runs):
    run = read_training_run(runs / "rl")
    page = run._repr_html_()
    rewards = [step["reward"] for step in _record(runs / "rl")["history"]]
    # reward, rollout fve, eval_fve, kl, length, parse_failure_rate: one chart each
    assert page.count("<svg") == 6 and f"reward: {rewards[-1]:.4g} at step {len(rewards)}" in page
    reward_chart = page[page.index("reward: "):page.index("</svg>", page.index("reward: "))]
    assert reward_chart.count(",") == len(rewards)  # one x,y pair per logged step
    assert ">reward</th>" in page and ">clip_frac</th>" not in page  # the table shows the curves' columns
    assert "clip_frac" in run.to_pandas().columns


def test_it_saves_and_reads_back_like_every_result(runs, tmp_path):
    run = read_training_run(runs / "ar")
    frame = nl.read_result(run.save(tmp_path / "ar.parquet"))
    pd.testing.assert_frame_equal(frame, run.to_pandas())
    assert frame.attrs["result_type"] == "TrainingRun" and frame.attrs["summary"] == run.summary()
    typed = nl.read_result(run.save(tmp_path / "ar.jsonl"), TrainingRun)  # its columns vary: read off the values
    pd.testing.assert_frame_equal(typed, run.to_pandas())
    assert "<svg" in run.save(tmp_path / "ar.html").read_text()


def test_what_is_not_a_run_is_refused_with_the_way_on(runs, tmp_path):
    with pytest.raises(nl.InputError, match="does not exist; pass the out_dir of an nla-lens train-av"):
        read_training_run(tmp_path / "missing")
    with pytest.raises(nl.InputError, match=r"holds no training run: no train_result.json and no checkpoints"):
        read_training_run(runs / "activations")  # an extraction, not a training run
    for export in (runs / "av" / "model", runs / "rl" / "ar"):
        with pytest.raises(nl.InputError, match=f"is an export of the training run in {export.parent}: pass that"):
            read_training_run(export)
    with pytest.raises(nl.InputError, match=r"is a file, not a training run: pass the run's out_dir"):
        read_training_run(runs / "explanations.jsonl")
    with pytest.raises(nl.InputError, match="takes a file path"):
        read_training_run(None)
    for damaged, problem in (("[]", "holds a list, not a JSON object"), ('{"config": {}}', "history is missing"),
                             ("{", "cannot be read"),
                             ('{"config": {}, "history": [1], "evals": [], "steps": 1, "seconds": 0}',
                              "a row of history is not an object with an integer step")):
        (tmp_path / "train_result.json").write_text(damaged)
        with pytest.raises(nl.InputError, match=problem):
            read_training_run(tmp_path)


def test_a_command_whose_reader_leaves_still_writes_its_files_and_exits_quietly(runs, tmp_path):
    """`nla-lens curve RUN --output f | head`: the print met a closed pipe and the command stopped on
    "[Errno 32] Broken pipe" (exit 1); where the printed text came before the --output (explain), without it."""
    output = tmp_path / "av.parquet"
    command = subprocess.Popen([sys.executable, "-m", "nla_lens.cli", "curve", str(runs / "av"), "--output",
                                str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert command.stdout is not None and command.stderr is not None
    command.stdout.close()  # the reader is gone before the first line
    said = command.stderr.read().decode()
    assert command.wait() == 0 and "Broken pipe" not in said and "Error" not in said
    assert len(nl.read_result(output)) == 21


def test_the_curve_command_prints_the_run_at_a_dozen_steps_and_saves_its_view(runs, tmp_path, capsys):
    record = _record(runs / "av")  # 20 steps: the printed table picks 12 rows, the first and the last among them
    assert main(["curve", str(runs / "av"), "--html", str(tmp_path / "av.html"),
                 "--output", str(tmp_path / "av.parquet")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == read_training_run(runs / "av").summary()
    steps = [int(line.split()[0]) for line in lines[2:] if not line.startswith("wrote")]
    assert len(steps) == 12 and steps[0] == 0 and steps[-1] == record["steps"] and steps == sorted(set(steps))
    assert "<svg" in (tmp_path / "av.html").read_text() and len(nl.read_result(tmp_path / "av.parquet")) == 21
    for flags, said in ((["--html", str(tmp_path / "x.parquet")], "--html"), (["--output", str(tmp_path / "x.html")],
                                                                            "--output")):
        assert main(["curve", str(runs / "av"), *flags]) == 2
        assert f"InputError: {said} " in capsys.readouterr().err
    assert main(["curve", str(runs / "activations")]) == 2
    assert "holds no training run" in capsys.readouterr().err


def test_the_examples_extraction_verbalized_by_the_toy_av_is_not_called_another_bases(runs, capsys):
    """The toy AV names its base "nla-lens-toy-shakespeare" and the extraction records .../checkpoints/base: compared
    by last path part, verbalizing the README's own extraction warned that it came from another base."""
    shard = next((runs / "activations" / "shards").glob("acts-*.safetensors"))
    assert main(["verbalize", "--av", str(ROOT / "nla_lens/toy/checkpoints/av"), "--input", str(shard),
                 "--max-new-tokens", "2"]) == 0
    assert "was extracted from base" not in capsys.readouterr().err


def test_a_base_in_the_hf_cache_goes_by_its_repository_name(tmp_path):
    from nla_lens.sharded import _base_names

    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-8B" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert {"0123abcd", "qwen3-8b"} <= _base_names(str(snapshot))
    assert not _base_names(str(snapshot)).isdisjoint(_base_names("Qwen/Qwen3-8B"))  # the sidecar's hub id
    assert _base_names(str(snapshot)).isdisjoint(_base_names("Qwen/Qwen2.5-7B-Instruct"))
