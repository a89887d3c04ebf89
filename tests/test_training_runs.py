"""`read_training_run`: a run's curve read back from what the training commands wrote, as a result that prints, draws
and saves; and the errors for what is not a run. The tests read two sets of runs: the shipped examples trained once
(TransformerLens 3.x only, as training is) and runs written without training by the trainers' own record writers,
so the reading is tested on both TransformerLens legs."""

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
import torch
from conftest import NEEDS_TL3, TL4

import nla_lens as nl
from nla_lens.cli import main
from nla_lens.distributed import World
from nla_lens.training import ARRunConfig, AVRunConfig, RLRunConfig, TrainingRun, load_config, read_training_run
from nla_lens.training.loop import TrainResult, save_checkpoint
from nla_lens.training.pipeline import _save_result

ROOT = Path(__file__).parents[1]
_CONFIGS = {"av": AVRunConfig, "ar": ARRunConfig, "rl": RLRunConfig}


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory) -> Path:
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


@pytest.fixture(scope="module")
def written_runs(tmp_path_factory) -> Path:
    """The run folders of the examples' configs as the trainers leave them (the newest checkpoint's state, the
    exports' folders, the run's record), written by the trainers' writers with made-up metrics instead of training:
    what `read_training_run` reads, on any backend. `test_written_runs_hold_the_files_and_keys_trained_runs_write`
    pins them to `trained_runs`."""
    root = tmp_path_factory.mktemp("written") / "runs"
    (root / "activations").mkdir(parents=True)
    (root / "explanations.jsonl").write_text("")
    for name, (history, evals, seconds) in {"av": (*_av_metrics(20), 24.1), "ar": (*_ar_metrics(20), 46.3),
                                            "rl": (*_rl_metrics(4), 17.3)}.items():
        config = load_config(_CONFIGS[name], ROOT / f"examples/train-{name}.yaml")
        _write_run(dataclasses.replace(config, out_dir=str(root / name)), history, evals, seconds)
    return root


def _write_run(config: AVRunConfig | ARRunConfig | RLRunConfig, history: list[dict], evals: list[dict],
               seconds: float) -> None:
    """A finished run of `config`: its last step's checkpoint, its exports' folders, then its record."""
    out_dir = Path(config.out_dir)
    training = config.rl if isinstance(config, RLRunConfig) else config.train
    names = {RLRunConfig: ["av.w", "ar.readout.weight"], ARRunConfig: ["model.w", "readout.weight"]}.get(
        type(config), ["model.w"])
    params = {name: torch.nn.Parameter(torch.ones(2, 2)) for name in names}
    optimizer = torch.optim.AdamW(params.values())
    sum(params.values()).sum().backward()
    optimizer.step()
    result = TrainResult(steps=training.steps, history=history, evals=evals, seconds=seconds)
    result.checkpoint = save_checkpoint(out_dir, training.steps, params, optimizer, training, result, seconds=seconds)
    exports = ["av", "ar"] if isinstance(config, RLRunConfig) else ["model"]
    for export in exports:
        (out_dir / export).mkdir()
    _save_result(config, out_dir / exports[0], result, World())


def _av_metrics(steps: int) -> tuple[list[dict], list[dict]]:
    history = [{"step": s, "loss": 7.4 * 0.95 ** s, "lr": 2e-3, "grad_norm": 10.5 / s} for s in range(1, steps + 1)]
    evals = [{"step": s, "eval_loss": 7.37 * 0.95 ** s, "sample_exact_match": 0.0,
              "samples": [{"target": "The token ':'.", "text": "</explanation>"}]} for s in (0, steps)]
    return history, evals


def _ar_metrics(steps: int) -> tuple[list[dict], list[dict]]:
    history = [{"step": s, "loss": 1.5 * 0.98 ** s, "lr": 1e-3, "grad_norm": 18.5 / s} for s in range(1, steps + 1)]
    evals = [{"step": s, "eval_mse": 1.58 * 0.98 ** s, "fve": 1 - 1.58 * 0.98 ** s / 0.79, "baseline": 0.79,
              "baseline_source": "paper (held-out targets)"} for s in (0, steps)]
    return history, evals


def _rl_metrics(steps: int) -> tuple[list[dict], list[dict]]:
    """RL's step metrics, `sft_loss` NaN as a run with the SFT term off logs it."""
    history = [{"step": s, "loss": 1e-3 * s, "reward": -1.97 + 0.02 * s, "fve": -1.58 + 0.01 * s, "kl": 2e-5 * (s - 1),
                "clip_frac": 0.0, "length": 26.75, "parse_failure_rate": 0.6875, "truncation_rate": 0.6875,
                "ar_miss_rate": 0.0, "cjk_rate": 0.0, "scored": 0.0625, "av_grad_norm": 1.63, "av_skipped": 0.0,
                "ar_mse": 1.5, "ar_grad_norm": 4.02, "ar_skipped": 0.0, "sft_loss": math.nan, "sample_seconds": 2.8,
                "seconds": 4.3} for s in range(1, steps + 1)]
    evals = [{"step": s, "eval_fve": -1.53 + 0.05 * s, "eval_baseline": 0.79, "eval_parse_failures": 8,
              "eval_length": 2.0} for s in (0, steps)]
    return history, evals


@pytest.fixture(params=["written", pytest.param("trained", marks=NEEDS_TL3)])
def runs(request) -> Path:
    return request.getfixturevalue(f"{request.param}_runs")


@NEEDS_TL3
def test_written_runs_hold_the_files_and_keys_trained_runs_write(written_runs, trained_runs):
    """What the written runs stand in for: the same files in each run folder, the same keys in each record, config
    and checkpoint state, the same metrics in each history and evaluation row."""
    assert sorted(p.name for p in written_runs.iterdir()) == sorted(p.name for p in trained_runs.iterdir())
    for name in _CONFIGS:
        written, trained = written_runs / name, trained_runs / name
        assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in trained.iterdir())
        assert _shape(_record(written)) == _shape(_record(trained))
        assert _shape(_newest_state(written)) == _shape(_newest_state(trained))
        assert sorted(p.name for p in (written / "checkpoints").iterdir()) == \
               sorted(p.name for p in (trained / "checkpoints").iterdir())


def _newest_state(run: Path) -> dict:
    return json.loads((sorted((run / "checkpoints").iterdir())[-1] / "trainer_state.json").read_text())


def _shape(record: dict) -> dict:
    """The keys of a run's record or checkpoint state, of its config (and its sections) and of its rows."""
    return {"keys": sorted(record), "config": {key: sorted(value) if isinstance(value, dict) else None
                                               for key, value in record["config"].items()},
            "history": {tuple(sorted(row)) for row in record["history"]},
            "evals": {tuple(sorted(row)) for row in record["evals"]}}


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


@pytest.mark.skipif(TL4, reason="the same on both legs, and its `nla-lens curve` process takes 7 s to start: run on "
                                 "the TL 3.x leg only")
def test_a_command_whose_reader_leaves_still_writes_its_files_and_exits_quietly(written_runs, tmp_path):
    """`nla-lens curve RUN --output f | head`: the print met a closed pipe and the command stopped on
    "[Errno 32] Broken pipe" (exit 1); where the printed text came before the --output (explain), without it."""
    output = tmp_path / "av.parquet"
    command = subprocess.Popen([sys.executable, "-m", "nla_lens.cli", "curve", str(written_runs / "av"), "--output",
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


@NEEDS_TL3
def test_the_examples_extraction_verbalized_by_the_toy_av_is_not_called_another_bases(trained_runs, capsys):
    """The toy AV names its base "nla-lens-toy-shakespeare" and the extraction records .../checkpoints/base: compared
    by last path part, verbalizing the README's own extraction warned that it came from another base."""
    shard = next((trained_runs / "activations" / "shards").glob("acts-*.safetensors"))
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
