"""A training run's curve as a result: `read_training_run(out_dir)` reads what `nla-lens train-av / train-ar /
train-rl` (or `run_train_*`) recorded, finished or still running, into a `TrainingRun` that prints its headline,
draws its curves in a notebook and saves like every other result.

A finished run is read from its `train_result.json`; a run still going (or cut short) from its newest checkpoint's
`trainer_state.json`, which holds the history up to that checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nla_lens import display
from nla_lens.checks import counted, file_path
from nla_lens.errors import InputError
from nla_lens.results import TabularResult, text_table
from nla_lens.training.loop import checkpoint_command, checkpoints, read_trainer_state
from nla_lens.training.pipeline import RESULT_FILE, run_command

# The curves each command's view draws, in order, where the run logged them (history and eval columns).
_CURVES = {
    "train-rl": ("reward", "fve", "eval_fve", "kl", "length", "parse_failure_rate"),
    "train-av": ("loss", "eval_loss", "grad_norm", "lr"),
    "train-ar": ("loss", "eval_mse", "fve", "grad_norm", "lr"),
}
_HELD_OUT_FVE = {"train-rl": "eval_fve", "train-ar": "fve"}


@dataclass(frozen=True, eq=False, repr=False)
class TrainingRun(TabularResult):
    """What `read_training_run` returns: one row per step (the step's logged metrics, and the evaluation's where
    one ran after it; step 0 holds the evaluation before training).

    Attributes:
        command: the nla-lens command that ran it: "train-av", "train-ar" or "train-rl".
        source: the file read: the run's `train_result.json`, or its newest checkpoint's `trainer_state.json`.
        finished: whether the run wrote `train_result.json`, which the nla-lens commands (and `run_train_*`) write
            after the export; a checkpoint at the last step is not enough.
        steps: the steps the run was set to take (`len(history)` of them are done).
        history: the trainer's per-step records, as logged.
        evals: the evaluations, each with its `step`.
        seconds: training time so far.
        config: the config recorded with the run (the whole YAML's for a finished run, the training section's for
            a checkpoint).
    """

    command: str
    source: Path
    finished: bool
    steps: int
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    seconds: float
    config: dict[str, Any]

    def to_records(self) -> list[dict[str, Any]]:
        return _table_rows(self._logged_rows())

    def _logged_rows(self) -> list[dict[str, Any]]:
        """One dict per step, in step order, of the values logged at it as recorded: a NaN kept (a finished run's
        null is a non-finite value its JSON could not hold), a column the step did not log absent."""
        logged = {key for record in self.history for key in record}
        rows: dict[int, dict[str, Any]] = {record["step"]: dict(record) for record in self.history}
        for evaluation in self.evals:  # an eval key that a step also logs (none today) keeps both, apart
            row = rows.setdefault(evaluation["step"], {"step": evaluation["step"]})
            row.update({(f"eval_{k}" if k in logged else k): v for k, v in evaluation.items() if k != "step"})
        return [rows[step] for step in sorted(rows)]

    def summary(self) -> str:
        done = len(self.history)
        state = _state(self)
        took = f"{self.seconds:.0f} s" if self.seconds < 60 else f"{self.seconds / 60:.1f} min"
        parts = [f"{self.command}, {done} of {counted(self.steps, 'step')} ({state}), {took}"]
        first_last = [("loss", "loss")] if self.command != "train-rl" else [("reward", "reward")]
        if self.command in _HELD_OUT_FVE:
            first_last.append(("held-out FVE", _HELD_OUT_FVE[self.command]))
        if self.command == "train-av":
            first_last.append(("eval loss", "eval_loss"))
        logged = self._logged_rows()
        for label, column in first_last:
            # NaN kept: a diverged last value reads "-> nan", not the last finite one. A column never finite (an
            # FVE from too few vectors) is left out; one logged once reads "at step N", not "x -> x".
            values = _logged_series(logged, column)
            if not any(math.isfinite(value) for _, value in values):
                continue
            (first_step, first), (_, last) = values[0], values[-1]
            first_text, last_text = (display.format_number(value, 4) for value in (first, last))
            parts.append(f"{label} {first_text} at step {first_step}" if len(values) == 1 else
                         f"{label} {first_text} -> {last_text}")
        kls = _series(logged, "kl")
        if kls:
            parts.append(f"largest step KL {max(v for _, v in kls):.3g}")
        return "; ".join(parts)

    def curve_text(self, most: int = 12) -> str:
        """The summary and at most `most` rows spread evenly over the run, its first and last among them: the curve
        in a terminal (`nla-lens curve`)."""
        records = self.to_records()
        picks = sorted({round(i * (len(records) - 1) / max(most - 1, 1)) for i in range(most)}) if records else []
        return "\n".join([self.summary(), *text_table([records[i] for i in picks], self._shown_columns(records))])

    def _shown_columns(self, records: list[dict[str, Any]]) -> list[str]:
        """The step and the curves' columns: an RL step logs about twenty (`to_pandas()` has them all)."""
        return [c for c in ("step", *_CURVES[self.command]) if records and c in records[0]]

    def _repr_html_(self) -> str:
        logged = self._logged_rows()
        records = _table_rows(logged)
        curves = display.curves_html([(column, _logged_series(logged, column)) for column in _CURVES[self.command]])
        return display.result_html(type(self).__name__, self._headline(), records, self._shown_columns(records),
                                   figure=curves)


def read_training_run(path: str | Path) -> TrainingRun:
    """The curve of the training run in `path`: a run's `out_dir` (finished: its `train_result.json`; not
    finished: its newest checkpoint), one of its `checkpoints/step-NNNNNN` folders, or a `train_result.json`."""
    path = file_path(path, "read_training_run")
    if not path.exists():
        raise InputError(f"{path} does not exist; pass the out_dir of an nla-lens train-av, train-ar or train-rl run")
    if path.is_file():
        if path.name != RESULT_FILE:
            raise InputError(f"{path} is a file, not a training run: pass the run's out_dir (or its {RESULT_FILE})")
        return _finished(path)
    if (path / RESULT_FILE).is_file():
        return _finished(path / RESULT_FILE)
    folder = path if (path / "trainer_state.json").is_file() else next(reversed(checkpoints(path)), None)
    if folder is None and ((path.parent / RESULT_FILE).is_file() or checkpoints(path.parent)):
        raise InputError(f"{path} is an export of the training run in {path.parent}: pass that folder")
    if folder is None:
        raise InputError(f"{path} holds no training run: no {RESULT_FILE} and no checkpoints/step-NNNNNN folder. "
                         "Pass the out_dir of an nla-lens train-av, train-ar or train-rl run; a run shows here once "
                         "it has written its first checkpoint (every save_every steps)")
    return _in_progress(folder / "trainer_state.json")


def _finished(path: Path) -> TrainingRun:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path} cannot be read as a training run's record ({type(exc).__name__}: {exc})") from exc
    problems = _shape_problems(record, {"config": dict, "history": list, "evals": list, "steps": int,
                                        "seconds": (int, float)})
    if problems:
        raise InputError(f"{path} is not the {RESULT_FILE} an nla-lens training run writes ({'; '.join(problems)})")
    return TrainingRun(command=run_command(record["config"]), source=path, finished=True, steps=record["steps"],
                       history=record["history"], evals=record["evals"], seconds=float(record["seconds"]),
                       config=record["config"])


def _in_progress(path: Path) -> TrainingRun:
    state = read_trainer_state(path)
    problems = _shape_problems(state, {"history": list, "evals": list})
    if problems or not isinstance(state["config"].get("steps"), int):
        raise InputError(f"{path} is not a training checkpoint's state ({'; '.join(problems) or 'no config.steps'})")
    config = state["config"]
    run_dir = path.parent.parent.parent  # out_dir/checkpoints/step-NNNNNN/trainer_state.json
    return TrainingRun(command=checkpoint_command(config, state["param_names"]), source=path,
                       finished=(run_dir / RESULT_FILE).is_file(), steps=config["steps"],
                       history=state["history"], evals=state["evals"],
                       seconds=float(state["seconds"]), config=config)


def _state(run: TrainingRun) -> str:
    """How far the run got, for its summary. A checkpoint at the last step without the run's record is a command's
    run whose export was cut short (or is being written), or a `train_av` / `train_ar` / `train_rl` call's, which
    writes no record."""
    if run.source.name == RESULT_FILE:
        return "finished"
    checkpoint = f"read from checkpoint {run.source.parent.name}"
    if run.finished:
        return f"finished; {checkpoint}"
    if len(run.history) >= run.steps:
        return (f"all steps done, no {RESULT_FILE}: an nla-lens command writes it after the export, and resume: "
                f"latest finishes one cut short; train_av / train_ar / train_rl from Python write none; {checkpoint}")
    return f"running or stopped; {checkpoint}"


def _shape_problems(record: Any, expected: dict[str, type | tuple[type, ...]]) -> list[str]:
    """What keeps `record` from being a JSON object with `expected`'s keys, types, and step-numbered rows."""
    if not isinstance(record, dict):
        return [f"it holds a {type(record).__name__}, not a JSON object"]
    problems = [f"{key} is missing" if key not in record else f"{key} is a {type(record[key]).__name__}"
                for key, kind in expected.items()
                if key not in record or not isinstance(record[key], kind) or isinstance(record[key], bool)]
    for key in ("history", "evals"):
        rows = record.get(key)
        if isinstance(rows, list) and not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in rows):
            problems.append(f"a row of {key} is not an object with an integer step")
    return problems


def _table_rows(logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logged rows as `to_records` gives them: every column in every row, a value that is not finite as None."""
    columns = list(dict.fromkeys(key for row in logged for key in row))
    return [{column: _finite_or_none(row.get(column)) for column in columns} for row in logged]


def _series(records: list[dict[str, Any]], column: str) -> list[tuple[int, float]]:
    """(step, value) of every row where `column` holds a finite number."""
    return [(step, value) for step, value in _logged_series(records, column) if math.isfinite(value)]


def _logged_series(rows: list[dict[str, Any]], column: str) -> list[tuple[int, float]]:
    """(step, value) of every row that logged `column` as a number or null, null as NaN: the curve's chart draws the
    finite values and names the steps of the others (a diverged loss)."""
    return [(row["step"], math.nan if row[column] is None else float(row[column])) for row in rows
            if column in row and (row[column] is None or display.is_number(row[column]))]


def _finite_or_none(value: Any) -> Any:
    """A checkpoint's JSON keeps NaN (a metric not computed); the finished record writes null, so both read alike."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
