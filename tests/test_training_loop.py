"""The shared SFT loop's pure parts: the learning-rate schedule and the seeded data order."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NEEDS_TL3, record_postfixes
from safetensors.torch import load_file, save_file

import nla_lens as nl
from nla_lens.cli import main
from nla_lens.training import TrainConfig
from nla_lens.training.config import (
    ARRunConfig,
    AVRunConfig,
    ExtractRunConfig,
    RLConfig,
    RLRunConfig,
    load_config,
)
from nla_lens.training.loop import TrainResult, load_checkpoint, lr_at, make_optimizer, micro_batches, save_checkpoint


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    config = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, config) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(10, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert lr_at(110, config) == pytest.approx(1e-4)
    lrs = [lr_at(s, config) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize(("steps", "warmup_steps", "peak", "said"), [
    (3, 10, 3e-5, "warmup_steps=10 (the default) >= steps=3: the run ends inside its warmup, so the learning rate "
                  "peaks at 3e-05 (lr * steps / warmup_steps), short of lr=0.0001, and the cosine decay to lr * "
                  "min_lr_ratio never starts. Set warmup_steps below steps (0: no warmup)"),
    (4, 4, 1e-4, "warmup_steps=4 >= steps=4: the run ends inside its warmup, so the learning rate reaches lr=0.0001 "
                 "only on the last step, and the cosine decay"),
])
def test_a_run_that_ends_inside_its_warmup_warns_with_the_rate_it_peaks_at(steps, warmup_steps, peak, said):
    """The default warmup of 10 ran every run of up to 10 steps without decay, and one of under 10 below `lr`,
    without a word."""
    with pytest.warns(UserWarning, match=f"^{re.escape(said)}") as caught:
        config = TrainConfig(steps=steps, warmup_steps=warmup_steps)
    assert len(caught) == 1 and caught[0].filename == __file__
    rates = [lr_at(step, config) for step in range(steps)]
    assert max(rates) == pytest.approx(peak, rel=1e-12) and rates == sorted(rates)  # the schedule says the same


@pytest.mark.parametrize(("steps", "warmup_steps"), [(11, 10), (200, 10), (1, 1), (1, 0), (3, 0)])
def test_a_warmup_shorter_than_the_run_or_a_one_step_run_at_lr_does_not_warn(steps, warmup_steps):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = TrainConfig(steps=steps, warmup_steps=warmup_steps)
    assert lr_at(steps - 1, config) <= lr_at(min(warmup_steps, steps - 1), config) == pytest.approx(1e-4, rel=1e-12)


def test_a_yaml_run_that_ends_inside_its_warmup_warns_as_the_config_is_read(tmp_path):
    """`nla-lens train-av` / `train-ar` read the YAML before any model loads: the warning comes then."""
    path = tmp_path / "ar.yaml"
    path.write_text("base_model: b\nactivations: a\nexplanations: e.jsonl\nout_dir: o\ntrain:\n  steps: 5\n")
    with pytest.warns(UserWarning, match=r"^warmup_steps=10 \(the default\) >= steps=5: .* peaks at 5e-05"):
        load_config(ARRunConfig, path)


_RL_RUN = {"av": "a", "ar": "r", "activations": "x", "explanations": "e.jsonl", "out_dir": "o"}
_AV_RUN = {"base_model": "b", "activations": "x", "explanations": "e.jsonl", "out_dir": "o"}
_NO_SFT_TERM = "rl.sft_coef is 0, so RL adds no SFT term (set rl.sft_coef > 0 to add one), or delete rl.sft_batch"


@pytest.mark.parametrize(("cls", "data", "said"), [
    (RLRunConfig, {**_RL_RUN, "rl": {"sft_batch": 8}}, f"rl.sft_batch has no effect: {_NO_SFT_TERM}"),
    (RLRunConfig, {**_RL_RUN, "rl": {"sft_coef": 0.0, "sft_batch": 8}}, f"rl.sft_batch has no effect: {_NO_SFT_TERM}"),
    (RLRunConfig, {**_RL_RUN, "rl": {"train_ar": False, "ar_lr": 1.0e-4}},
     "rl.ar_lr has no effect: rl.train_ar is false, so the AR is a frozen reward model (set rl.train_ar: true to "
     "train it), or delete rl.ar_lr"),
    (AVRunConfig, {**_AV_RUN, "n_samples": 0, "sample_max_new_tokens": 16},
     "sample_max_new_tokens has no effect: n_samples is 0, so no held-out vector is verbalized at evaluation (set "
     "n_samples > 0 to log some), or delete sample_max_new_tokens"),
])
def test_a_yaml_key_the_rest_of_the_file_leaves_without_effect_warns_naming_it(tmp_path, cls, data, said):
    """`rl.sft_batch` without `rl.sft_coef`, `rl.ar_lr` with `rl.train_ar: false` and `sample_max_new_tokens` with
    `n_samples: 0` were read and ignored: the file read as if they were in use."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        load_config(cls, path)
    assert [str(w.message) for w in caught] == [f"{path}: {said}"] and caught[0].filename == __file__


@pytest.mark.parametrize(("cls", "data"), [
    (RLRunConfig, {**_RL_RUN, "rl": {"sft_coef": 0.5, "sft_batch": 8, "ar_lr": 1.0e-4}}),
    (RLRunConfig, {**_RL_RUN, "rl": {"train_ar": False, "sft_coef": 0.0}}),  # the settings, not the inert keys
    (AVRunConfig, {**_AV_RUN, "n_samples": 0}),
    (AVRunConfig, {**_AV_RUN, "n_samples": 2, "sample_max_new_tokens": 16}),
])
def test_a_yaml_key_in_use_or_a_python_config_does_not_warn(tmp_path, cls, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(cls, path)
        RLConfig(sft_batch=8, train_ar=False, ar_lr=1e-4)  # Python callers: no file, left as they are
        AVRunConfig(**_AV_RUN, n_samples=0, sample_max_new_tokens=16)


def test_the_shipped_example_configs_write_no_key_without_effect():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, cls in [("extract", ExtractRunConfig), ("train-av", AVRunConfig), ("train-ar", ARRunConfig),
                          ("train-rl", RLRunConfig)]:
            load_config(cls, Path(__file__).parents[1] / "examples" / f"{name}.yaml")


def test_a_config_refused_as_another_commands_warns_of_nothing_that_command_would_ignore(tmp_path, capsys):
    """The refusal tries the file as each other command's config: that command's warnings are not this run's."""
    path = tmp_path / "av.yaml"
    path.write_text(yaml.safe_dump({**_AV_RUN, "n_samples": 0, "sample_max_new_tokens": 16}), encoding="utf-8")
    assert main(["train-ar", str(path)]) == 2
    err = capsys.readouterr().err
    assert "reads as a config for nla-lens train-av" in err and "warning" not in err


def test_micro_batches_visit_every_row_once_per_epoch_in_a_seeded_order():
    config = TrainConfig(steps=10, batch_size=4, grad_accum=2, warmup_steps=0, seed=3)
    first_epoch = torch.cat([i for step in range(2) for i in micro_batches(step, 13, config)])
    assert sorted(first_epoch.tolist()) == list(range(13))  # 4 micro-batches of 4, 4, 4, 1
    assert [len(i) for i in micro_batches(1, 13, config)] == [4, 1]
    second_epoch = torch.cat([i for step in range(2, 4) for i in micro_batches(step, 13, config)])
    assert sorted(second_epoch.tolist()) == list(range(13)) and not torch.equal(first_epoch, second_epoch)
    assert all(torch.equal(a, b) for a, b in zip(micro_batches(5, 13, config), micro_batches(5, 13, config),
                                                 strict=True))


def test_config_rejects_settings_that_cannot_train():
    with pytest.raises(nl.ConfigError):
        TrainConfig(steps=0)
    with pytest.raises(nl.ConfigError):
        TrainConfig(min_lr_ratio=2.0)


@NEEDS_TL3
def test_a_step_with_a_non_finite_gradient_is_skipped_not_applied():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from nla_lens.training.loop import train

    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5,
                                                      act_fn="relu", seed=0))
    calls, snapshots = [], []

    def loss_sum(rows):
        calls.append(len(rows))
        factor = float("nan") if len(calls) == 2 else 1.0  # the second step's gradient is NaN
        return factor * (model.W_E ** 2).sum() * len(rows)

    def evaluate():
        snapshots.append(model.W_E.detach().clone())
        return {}

    config = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, eval_every=1, seed=0)
    result = train(modules={"model": model}, n_rows=4, loss_sum=loss_sum, units=len, evaluate=evaluate,
                   config=config, progress=False)
    assert [math.isfinite(h["grad_norm"]) for h in result.history] == [True, False, True]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    before, after_first, after_nan, after_third = snapshots
    assert not torch.equal(after_first, before) and torch.equal(after_nan, after_first)
    assert not torch.equal(after_third, after_nan)


@NEEDS_TL3
def test_each_checkpoint_records_the_runs_time_up_to_it_and_a_resume_adds_to_it(tmp_path, monkeypatch):
    """Every checkpoint recorded the seconds of earlier resumed stretches only (0.0 in a run never resumed), so a
    resumed run's train_result lost the time of the stretch that wrote its checkpoint."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from nla_lens.training import loop

    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5,
                                                      act_fn="relu", seed=0))
    clock = iter(range(0, 1000, 10))  # every reading of the clock is 10 s after the one before
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(clock)))

    def run(steps: int) -> TrainResult:
        config = TrainConfig(steps=steps, batch_size=2, warmup_steps=0, save_every=1)
        return loop.train(modules={"model": model}, n_rows=4, units=len, evaluate=dict, config=config,
                          loss_sum=lambda rows: (model.W_E ** 2).sum() * len(rows), out_dir=tmp_path,
                          resume="latest", progress=False)

    run(2)
    saved = [json.loads((f / "trainer_state.json").read_text())["seconds"] for f in loop.checkpoints(tmp_path)]
    assert saved == [10.0, 20.0]  # the train() clock starts at 0; each save reads it once, 10 s later
    resumed = run(2)  # a finished run: resume restores step 2 and runs no step
    assert resumed.seconds == 20.0 + 10.0  # the checkpoint's 20 s and this stretch's start-to-end 10 s


@NEEDS_TL3
def test_a_resume_with_other_steps_shows_both_values_and_says_a_run_cannot_be_extended(tmp_path):
    """The refusal said only "other settings for ['steps']": neither value, nor that extending a run is impossible."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from nla_lens.training.loop import train

    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5,
                                                      act_fn="relu", seed=0))

    def run(config: TrainConfig) -> None:
        train(modules={"model": model}, n_rows=4, loss_sum=lambda rows: (model.W_E ** 2).sum() * len(rows),
              units=len, evaluate=dict, config=config, out_dir=tmp_path, resume="latest", progress=False)

    config = TrainConfig(steps=2, batch_size=2, warmup_steps=0)
    run(config)
    with pytest.raises(nl.ConfigError) as info:
        run(TrainConfig(steps=4, batch_size=2, warmup_steps=0))
    assert "other settings (steps: 2 in the checkpoint, 4 now); an exact resume needs the config" in str(info.value)
    assert ("steps cannot change on a resume, so a run cannot be extended: the cosine schedule decays the learning "
            "rate over all steps") in str(info.value)
    assert "Finish this run with steps: 2, or train longer from step 0 in a new out_dir" in str(info.value)
    with pytest.raises(nl.ConfigError) as info:
        run(TrainConfig(steps=2, batch_size=2, warmup_steps=0, lr=2e-3, betas=(0.8, 0.95)))
    assert str(info.value).endswith("with other settings (betas: [0.9, 0.999] in the checkpoint, [0.8, 0.95] now; "
                                    "lr: 0.0001 in the checkpoint, 0.002 now); an exact resume needs the config the "
                                    "run started with, so set them back.")


def _checkpoint_of_a_moved_layer(tmp_path, step: int = 1):
    """A checkpoint at `step` of a 2-step run of a Linear, then the Linear moved off it (a restore before an error
    would show), with its parameters, optimizer and config."""
    layer = torch.nn.Linear(4, 4)
    params = dict(layer.named_parameters())
    config = TrainConfig(steps=2, warmup_steps=0)
    optimizer = make_optimizer(params, config)
    layer(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    folder = save_checkpoint(tmp_path, step, params, optimizer, config, TrainResult(steps=2), seconds=0.0)
    with torch.no_grad():
        layer.weight.add_(1.0)
    return folder, params, optimizer, config


@pytest.mark.parametrize(("saved_by", "resumed_by"), [("train-ar", "train-av"), ("train-av", "train-ar"),
                                                      ("train-av", "train-rl")])
def test_a_resume_from_another_commands_checkpoint_names_both_commands(tmp_path, saved_by, resumed_by):
    """`resume:` naming the AR run's checkpoint in train-av (or an SFT one in train-rl) was refused as "other
    settings (lr ...)", to set back, though no setting of this command could match that run."""
    from nla_lens.training import RLConfig

    def parts(command):
        names = ["model.w", "readout.weight"] if command == "train-ar" else ["model.w"]
        params = {name: torch.nn.Parameter(torch.ones(2, 2)) for name in names}
        config = (RLConfig(steps=2) if command == "train-rl"
                  else TrainConfig(steps=2, lr=len(names) * 1e-3, warmup_steps=0))
        return params, config

    params, config = parts(saved_by)
    folder = save_checkpoint(tmp_path, 1, params, torch.optim.AdamW(params.values()), config, TrainResult(steps=2),
                             seconds=0.0)
    params, config = parts(resumed_by)
    with pytest.raises(nl.ConfigError, match=rf"is a checkpoint of a {saved_by} run, and this is {resumed_by}: a "
                                             "resume continues a run of the same command"):
        load_checkpoint(folder, params, torch.optim.AdamW(params.values()), config)


def test_an_rl_resume_with_fewer_steps_than_its_checkpoint_is_refused_naming_both(tmp_path):
    """RL may change `steps` on a resume; below the checkpoint's step it ran no step, exported that step's weights
    and recorded them as a shorter run ('train-rl, 2 of 1 step (finished)')."""
    from nla_lens.training.rl import RESUMABLE

    params = {"model.w": torch.nn.Parameter(torch.ones(2, 2))}
    folder = save_checkpoint(tmp_path, 2, params, torch.optim.Adam(params.values()), RLConfig(steps=2),
                             TrainResult(steps=2), seconds=0.0)
    with pytest.raises(nl.ConfigError, match=r"at step 2, with steps: 1: a resume cannot go back, .* Set steps to 2 "
                                             r"or more \(its run set 2\), or resume from a checkpoint at step 1 or "
                                             "before$"):
        load_checkpoint(folder, params, torch.optim.Adam(params.values()), RLConfig(steps=1), RESUMABLE)
    assert len(load_checkpoint(folder, params, torch.optim.Adam(params.values()), RLConfig(steps=3),
                               RESUMABLE).history) == 0  # extending it still resumes


@pytest.mark.parametrize("damaged", ["params.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_a_truncated_training_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path, damaged):
    folder, params, optimizer, config = _checkpoint_of_a_moved_layer(tmp_path)
    file = folder / damaged
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])  # a copy cut short
    moved = {name: param.detach().clone() for name, param in params.items()}
    with pytest.raises(nl.CheckpointError, match=rf"{damaged} cannot be read .*damaged or incomplete.*earlier"):
        load_checkpoint(folder, params, optimizer, config)
    assert all(torch.equal(params[name], moved[name]) for name in params)  # nothing half-restored


@pytest.mark.parametrize(("file", "edit", "problem"), [
    ("params.safetensors", lambda saved: {"weight": saved["weight"]},
     r"lacks 1 trainable parameter \(bias\)"),
    ("params.safetensors", lambda saved: {**saved, "weight": torch.zeros(4, 5)},
     r"holds 1 parameter of another shape \(weight as \[4, 5\] where this model's is \[4, 4\]; if the run trained "
     r"another base model, resume with that one\)"),
    ("optimizer.safetensors", lambda saved: {**saved, "0.exp_avg": torch.zeros(3)},
     r"holds optimizer moments that fit no parameter \(0.exp_avg is \[3\] where its parameter is \[4, 4\]\)"),
    ("optimizer.safetensors", lambda saved: {**saved, "2.exp_avg": torch.zeros(4)},
     r"holds optimizer moments that fit no parameter \(2.exp_avg is of parameter 2, but the optimizer has 2\)"),
])
def test_a_checkpoint_lacking_a_tensor_or_holding_one_of_another_shape_is_a_checkpoint_error_naming_it(
        tmp_path, file, edit, problem):
    """A readable params.safetensors without one of the model's parameters (or with one of another shape) ended in a
    bare KeyError (or RuntimeError), the parameters before it already restored."""
    folder, params, optimizer, config = _checkpoint_of_a_moved_layer(tmp_path)
    path = folder / file
    save_file(edit(load_file(path)), path)
    moved = {name: param.detach().clone() for name, param in params.items()}
    with pytest.raises(nl.CheckpointError, match=rf"^{re.escape(str(path))} {problem}: this training checkpoint is "
                                                 "damaged or incomplete. Resume from an earlier checkpoint"):
        load_checkpoint(folder, params, optimizer, config)
    assert all(torch.equal(params[name], moved[name]) for name in params)  # nothing half-restored


_KEYS = ("step", "config", "param_names", "param_groups", "optimizer_scalars", "history", "evals", "seconds")


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda state: [state], "holds an array, not a JSON object"),
    *[(lambda state, key=key: {k: v for k, v in state.items() if k != key}, rf"\({key} is missing\)")
      for key in _KEYS],
    (lambda state: {**state, "seconds": "12", "history": {}},
     r"\(history is an object, not an array; seconds is a string, not a number\)"),
    (lambda state: {**state, "step": True}, r"\(step is a boolean, not an integer\)"),
    (lambda state: {**state, "param_groups": [*state["param_groups"][:1], None]},
     r"\(param_groups\[1\] is not an object with a betas array\)"),
    (lambda state: {**state, "optimizer_scalars": {"step": 1.0}},
     r"\(optimizer_scalars key 'step' is not <index>.<name>\)"),
])
def test_a_trainer_state_of_another_shape_is_a_checkpoint_error_before_any_weight_is_restored(tmp_path, edit,
                                                                                            problem):
    """Valid JSON of another shape (a list, a key missing, a key of another type) ended in a bare KeyError,
    TypeError or AttributeError, some after the weights were restored."""
    folder, params, optimizer, config = _checkpoint_of_a_moved_layer(tmp_path)
    path = folder / "trainer_state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    moved = {name: param.detach().clone() for name, param in params.items()}
    with pytest.raises(nl.CheckpointError, match=rf"^{re.escape(str(path))} .*{problem}: this training checkpoint "
                                                 "is damaged or incomplete. Resume from an earlier checkpoint"):
        load_checkpoint(folder, params, optimizer, config)
    assert all(torch.equal(params[name], moved[name]) for name in params)


@pytest.mark.parametrize("command", ["train-av", "train-ar", "train-rl"])
def test_a_finished_runs_out_dir_is_refused_as_finished_and_only_rl_is_told_more_steps_extend_it(tmp_path, command):
    """"Set resume: latest to continue that run" was said of a finished run too; SFT cannot extend one (its cosine
    schedule spans `steps`), RL can."""
    from nla_lens.training.pipeline import check_out_dir

    _checkpoint_of_a_moved_layer(tmp_path, step=2)
    with pytest.raises(nl.ConfigError, match=r"holds a finished run: its checkpoints reach its last step, 2 "
                                             r"\(step-000002\)\. A run without resume") as info:
        check_out_dir(tmp_path, command, None)
    assert str(info.value).endswith(", unless you raise steps: then it extends the run") == (command == "train-rl")
    if command == "train-av":
        check_out_dir(tmp_path, command, "latest")
    else:  # the checkpoint is an SFT run's of a Linear (a train-av run's): another command cannot continue it
        with pytest.raises(nl.ConfigError, match=rf"is a checkpoint of a train-av run, and this is {command}"):
            check_out_dir(tmp_path, command, "latest")


@pytest.mark.parametrize(("command", "exports"), [("train-av", ["model"]), ("train-rl", ["ar", "av"])])
def test_a_finished_runs_refusal_names_what_the_run_wrote_not_the_users_files_beside_it(tmp_path, command, exports):
    """It listed everything in out_dir (the user's notes and data too) as what lay beside the run's checkpoints."""
    from nla_lens.training.pipeline import RESULT_FILE, check_out_dir

    _checkpoint_of_a_moved_layer(tmp_path, step=2)
    for name in exports:
        (tmp_path / name).mkdir()
    (tmp_path / RESULT_FILE).write_text("")  # no record check_result_file reads: only its name matters here
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "corpus").mkdir()
    with pytest.raises(nl.ConfigError) as info:
        check_out_dir(tmp_path, command, None)
    assert f"(step-000002), and beside them: {', '.join([*exports, RESULT_FILE])}. A run without" in str(info.value)
    assert "notes.txt" not in str(info.value) and "corpus" not in str(info.value)


@NEEDS_TL3
@pytest.mark.parametrize("trainer", ["train_av", "train_ar", "train_rl"])
@pytest.mark.parametrize("kind", ["an extraction", "a model folder"])
def test_a_trainer_called_directly_refuses_an_out_dir_that_is_a_runs_input(
        tmp_path, base_folder, dataset_meta, label_split, av_karvonen, ar_nanonla, trainer, kind):
    """Only the CLI and run_train_* refused one: train_av(out_dir=the base) wrote checkpoints/ among the base
    model's files, where a later export there would overwrite them."""
    from nla_lens.training import RLConfig, init_ar, init_av, train_ar, train_av, train_rl
    from nla_lens.training.extraction import COMPLETE

    if kind == "a model folder":
        out_dir = shutil.copytree(base_folder, tmp_path / "base")
    else:
        out_dir = tmp_path / "acts"
        out_dir.mkdir()
        (out_dir / COMPLETE).write_text(json.dumps({"shards": 0, "rows": 0}))
    before = sorted(os.listdir(out_dir))
    one_step = TrainConfig(steps=1, batch_size=4, warmup_steps=0)
    with pytest.raises(nl.ConfigError, match=rf"^out_dir {re.escape(str(out_dir))} is {kind}.*Point out_dir at a "
                                             "new folder$"):
        if trainer == "train_av":
            train_av(init_av(base_folder, dataset_meta), *label_split, one_step, out_dir=out_dir, n_samples=0,
                     progress=False)
        elif trainer == "train_ar":
            train_ar(init_ar(base_folder, dataset_meta), *label_split, one_step, out_dir=out_dir, progress=False)
        else:
            vectors = torch.randn(8, av_karvonen.meta.d_model, generator=torch.Generator().manual_seed(0))
            train_rl(av_karvonen, ar_nanonla, None, vectors, vectors[:0],
                     RLConfig(steps=1, prompts_per_step=2, group_size=2, kl_coef=0.0, eval_vectors=0),
                     out_dir=out_dir, progress=False)
    assert sorted(os.listdir(out_dir)) == before


@NEEDS_TL3
def test_the_progress_bar_writes_a_huge_or_tiny_loss_in_e_notation(monkeypatch):
    """The bar's postfix wrote the step's loss to 4 decimals: a diverged 1e30 with all 31 digits, 1e-9 as 0.0000."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from nla_lens.training import loop

    postfixes = record_postfixes(monkeypatch, loop)
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5,
                                                      act_fn="relu", seed=0))
    losses = iter([1e30, 1e-9, 0.25])

    def loss_sum(rows):  # the step's loss, whatever the weights: each value one step's mean
        return (model.W_E.sum() * 0 + next(losses)) * len(rows)

    loop.train(modules={"model": model}, n_rows=2, loss_sum=loss_sum, units=len, evaluate=dict,
               config=TrainConfig(steps=3, batch_size=2, warmup_steps=0))
    assert postfixes == [{"loss": "1.00e+30"}, {"loss": "1.00e-09"}, {"loss": "0.2500"}]


@NEEDS_TL3
def test_a_resume_in_another_dtype_than_the_run_trained_in_is_refused(tmp_path):
    """The data fingerprint samples weights as float32, so a base stored in bfloat16 fingerprinted alike loaded in
    float32 or bfloat16: `dtype: bfloat16` on the resume of a float32 run (or float64 on a float32 one) went on at
    another precision, the saved weights rounded (or widened), without a word."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from nla_lens.training import loop

    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5,
                                                      act_fn="relu", seed=0))
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=0, save_every=1)

    def run(resume: str | None) -> TrainResult:
        return loop.train(modules={"model": model}, n_rows=4, units=len, evaluate=dict, config=config,
                          loss_sum=lambda rows: (model.W_E.float() ** 2).sum() * len(rows), out_dir=tmp_path,
                          resume=resume, progress=False)

    run(None)
    first = tmp_path / "checkpoints" / "step-000001"
    model.to(torch.float64)
    with pytest.raises(nl.ConfigError, match=rf"resuming from {re.escape(str(first))}, whose run trained in float32, "
                                             r"with weights in float64: an exact resume needs the dtype the run "
                                             r"started with; set dtype: float32 back"):
        run(str(first))
    model.to(torch.float32)
    assert len(run(str(first)).history) == 2  # the run's own dtype resumes
