"""`nla-lens extract / train-av / train-ar` from YAML configs, end to end, on the tiny base model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import D_MODEL, LAYER, NEEDS_TL3, cut_write_text_short
from safetensors.torch import load_file

import nla_lens as nl
from nla_lens import loading, testing
from nla_lens.base_model import sidecar_base_folder
from nla_lens.cli import main
from nla_lens.sharded import check_extraction_input
from nla_lens.sidecar import dump_meta, load_meta
from nla_lens.training import (
    ARRunConfig,
    AVRunConfig,
    LabelledActivations,
    RLConfig,
    RLRunConfig,
    TrainConfig,
    TrainResult,
    export_ar,
    init_ar,
    label_activations,
    load_activations,
    load_config,
    pipeline,
    save_explanations,
)
from nla_lens.training.cli import check_inputs
from nla_lens.training.loop import check_not_an_input_folder, save_checkpoint


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def _training_inputs(tmp_path: Path, base_model: str, extract_config) -> tuple[dict, LabelledActivations]:
    """Extract the tiny corpus with `nla-lens extract` and label it: the fields train-av and train-ar share."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n"
                              for d in testing.tiny_corpus(12, words_per_doc=10)))
    acts = tmp_path / "acts"
    assert main(["extract", _write(tmp_path / "extract.yaml", {
        "base_model": base_model, "corpus": str(corpus), "out_dir": str(acts),
        "extract": dataclasses.asdict(extract_config)})]) == 0
    data = label_activations(load_activations(acts), lambda r: f"the token {r.token.strip()}")
    explanations = save_explanations(data, tmp_path / "explanations.jsonl")
    common = {"base_model": base_model, "activations": str(acts), "explanations": str(explanations),
              "eval_fraction": 0.25, "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1}}
    return common, data


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@NEEDS_TL3
def test_cli_extracts_trains_and_exports_an_nla_that_loads_with_no_flags(tmp_path, base_folder, extract_config,
                                                                           capsys):
    common, data = _training_inputs(tmp_path, str(base_folder), extract_config)
    av_config = _write(tmp_path / "av.yaml", {**common, "out_dir": str(tmp_path / "av"), "n_samples": 2,
                                              "sample_max_new_tokens": 8})
    assert main(["train-av", av_config]) == 0
    assert main(["train-ar", _write(tmp_path / "ar.yaml", {**common, "out_dir": str(tmp_path / "ar")})]) == 0
    out = capsys.readouterr().out
    assert "eval loss" in out and "held-out MSE" in out and "(no FVE: too few held-out vectors)" in out

    av = nl.ActivationVerbalizer.from_pretrained(tmp_path / "av" / "model")
    ar = nl.ActivationReconstructor.from_pretrained(tmp_path / "ar" / "model")
    assert av.injection_spec == nl.InjectionSpec("karvonen", "blocks.1.hook_resid_post")
    assert (av.meta.layer, ar.meta.layer, ar.model.cfg.n_layers) == (LAYER, LAYER, LAYER + 1)
    round_trip = nl.NLA(av, ar).round_trip(data.vectors[:3], max_new_tokens=8, progress=False)
    assert round_trip.mse.shape == (3,)
    result = json.loads((tmp_path / "ar" / "train_result.json").read_text())
    assert len(result["history"]) == 3 and result["evals"][-1]["baseline_source"] == "none"  # < 32 held out

    # Resuming a finished run from its latest checkpoint runs no further step.
    resumed = yaml.safe_load(Path(av_config).read_text()) | {"resume": "latest"}
    assert main(["train-av", _write(tmp_path / "av_resume.yaml", resumed)]) == 0
    assert len(json.loads((tmp_path / "av" / "train_result.json").read_text())["history"]) == 3


@NEEDS_TL3
def test_train_av_given_the_ars_config_refuses_its_export_folder_and_leaves_it_untouched(
        tmp_path, base_folder, extract_config, capsys):
    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    ar_config = _write(tmp_path / "ar.yaml", {**common, "out_dir": str(tmp_path / "ar")})
    assert main(["train-ar", ar_config]) == 0
    before = _files(tmp_path / "ar")
    capsys.readouterr()

    assert main(["train-av", ar_config]) == 2  # the AR's YAML given to train-av: the files sit side by side
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nla-lens train-av: ConfigError: ")
    assert f"{tmp_path / 'ar' / 'model'} already holds an NLA AR (its nla_meta.yaml says role: ar)" in err
    assert "Point out_dir at another folder" in err and "run it with nla-lens train-ar" in err
    assert _files(tmp_path / "ar") == before  # no checkpoint, result or weight written: refused before training

    # Re-running the AR's own command (resuming its finished run) re-exports it.
    resumed = _write(tmp_path / "ar_resume.yaml", {**common, "out_dir": str(tmp_path / "ar"), "resume": "latest"})
    assert main(["train-ar", resumed]) == 0
    assert load_meta(tmp_path / "ar" / "model").role == "ar"


@NEEDS_TL3
def test_a_fresh_run_into_an_out_dir_with_a_longer_runs_checkpoints_is_refused_before_training(
        tmp_path, base_folder, extract_config, capsys):
    """A shorter fresh run there pruned its own checkpoint (train_result.json named a deleted folder) and left the
    other run's as the one `resume: latest` picks."""
    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    assert main(["train-ar", _write(tmp_path / "ar.yaml", {**common, "out_dir": str(tmp_path / "ar")})]) == 0
    before = _files(tmp_path / "ar")
    capsys.readouterr()
    shorter = {**common, "out_dir": str(tmp_path / "ar"), "train": {**common["train"], "steps": 2,
                                                                    "keep_checkpoints": 1}}
    assert main(["train-ar", _write(tmp_path / "shorter.yaml", shorter)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nla-lens train-ar: ConfigError: ")
    assert "holds a finished run: its checkpoints reach its last step, 3 (step-000003)" in err
    assert "To train again, point out_dir at a new folder" in err
    assert _files(tmp_path / "ar") == before  # refused before training: nothing written


@NEEDS_TL3
def test_rerunning_a_finished_run_without_resume_says_it_finished_and_that_resume_latest_only_exports_it_again(
        tmp_path, base_folder, extract_config, capsys):
    """The refusal said "Set resume: latest to continue that run" of a run that had finished: resume: latest runs no
    further step there, it exports the same weights again."""
    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    out = tmp_path / "ar"
    config = {**common, "out_dir": str(out)}
    assert main(["train-ar", _write(tmp_path / "ar.yaml", config)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["train-ar", str(tmp_path / "ar.yaml")]) == 2
    assert capsys.readouterr().err == (
        f"nla-lens train-ar: ConfigError: {out} holds a finished run: its checkpoints reach its last step, 3 "
        "(step-000003), and beside them: model, train_result.json. A run without resume would start at step 0 over "
        f"it. To train again, point out_dir at a new folder (or remove {out / 'checkpoints'}). resume: latest "
        "(resume=\"latest\" from Python) runs no further step: it restores the finished weights, which the nla-lens "
        "commands export again\n")
    assert _files(out) == before  # refused before training: nothing written

    assert main(["train-ar", _write(tmp_path / "ar_resume.yaml", {**config, "resume": "latest"})]) == 0
    history = json.loads((out / "train_result.json").read_text())["history"]
    assert [row["step"] for row in history] == [1, 2, 3]
    exported = {name: data for name, data in _files(out).items() if name.startswith("model/")}
    assert exported == {name: data for name, data in before.items() if name.startswith("model/")}


@NEEDS_TL3
def test_rerunning_an_interrupted_run_without_resume_is_refused_and_resume_latest_continues_it(
        tmp_path, base_folder, extract_config, capsys, caplog):
    """The rerun started at step 0 and overwrote the interrupted run's checkpoints (only checkpoints past its
    last step were refused). `resume: latest` before any checkpoint was a CheckpointError: now the first launch
    of a preemptible job's config starts at step 0."""
    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    config = {**common, "out_dir": str(tmp_path / "ar"), "resume": "latest",
              "train": {**common["train"], "save_every": 1, "keep_checkpoints": 3}}
    with caplog.at_level("INFO", logger="nla_lens.training.loop"):
        assert main(["train-ar", _write(tmp_path / "ar.yaml", config)]) == 0
    assert f"resume: latest found no checkpoint under {tmp_path / 'ar'}; starting at step 0" in caplog.text
    # Interrupted after step 2: its last checkpoint, record and export never written.
    shutil.rmtree(tmp_path / "ar" / "checkpoints" / "step-000003")
    shutil.rmtree(tmp_path / "ar" / "model")
    (tmp_path / "ar" / "train_result.json").unlink()
    before = _files(tmp_path / "ar")
    capsys.readouterr()
    fresh = _write(tmp_path / "fresh.yaml", {k: v for k, v in config.items() if k != "resume"})
    assert main(["train-ar", fresh]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nla-lens train-ar: ConfigError: ")
    assert "holds checkpoints up to step 2 (step-000001, step-000002)" in err and "Set resume: latest" in err
    assert _files(tmp_path / "ar") == before  # refused before training: nothing overwritten
    assert main(["train-ar", str(tmp_path / "ar.yaml")]) == 0
    history = json.loads((tmp_path / "ar" / "train_result.json").read_text())["history"]
    assert [row["step"] for row in history] == [1, 2, 3]


@NEEDS_TL3
@pytest.mark.parametrize(("field", "message"), [
    ("explanations", "InputError: explanations {path} is a folder; point it at the JSONL file itself"),
    ("out_dir", "ConfigError: {config}: out_dir {path} is a file; point out_dir at a folder"),
])
def test_an_explanations_folder_or_an_out_dir_file_is_named_before_training(tmp_path, base_folder, extract_config,
                                                                          capsys, field, message):
    """A folder as explanations raised a bare IsADirectoryError; a file as out_dir failed only after training."""
    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    wrong = {"explanations": tmp_path / "acts", "out_dir": tmp_path / "explanations.jsonl"}[field]
    config = _write(tmp_path / "ar.yaml", {**common, "out_dir": str(tmp_path / "ar"), field: str(wrong)})
    capsys.readouterr()
    assert main(["train-ar", config]) == 2
    assert message.format(path=wrong, config=config) in capsys.readouterr().err
    assert not (tmp_path / "ar").exists()


@NEEDS_TL3
@pytest.mark.parametrize("command", ["train-av", "train-ar", "train-rl"])
@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_out_dir_that_cannot_be_written_is_refused_before_any_model_loads(tmp_path, tiny_paths, base_folder,
                                                                             capsys, monkeypatch, command, where):
    """An out_dir under a file or on /proc failed at the first checkpoint write, after the training."""
    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, a folder no file can be created in")
    for role in (nl.ActivationVerbalizer, nl.ActivationReconstructor):
        monkeypatch.setattr(role, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "notes.txt").write_text("a file")
    out_dir = tmp_path / "notes.txt" / "run" if where == "under_a_file" else Path("/proc/nla_lens_run")
    fields = ({"av": str(tiny_paths["av_karvonen"]), "ar": str(tiny_paths["ar_paper"])} if command == "train-rl"
              else {"base_model": str(base_folder)})
    config = _write(tmp_path / "c.yaml", {**fields, "activations": str(tmp_path), "explanations": str(tmp_path),
                                          "out_dir": str(out_dir)})
    assert main([command, config]) == 2
    err = capsys.readouterr().err
    assert f"ConfigError: out_dir '{out_dir}' cannot be written" in err and "set out_dir to a folder" in err, err


@NEEDS_TL3
def test_train_rl_refuses_an_out_dir_whose_av_folder_holds_an_ar(tmp_path, tiny_paths, capsys, monkeypatch):
    monkeypatch.setattr(nl.ActivationVerbalizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded the AV"))
    shutil.copytree(tiny_paths["ar_paper"], tmp_path / "rl" / "av")
    config = _write(tmp_path / "rl.yaml", {"av": str(tiny_paths["av_karvonen"]), "ar": str(tiny_paths["ar_paper"]),
                                           "activations": str(tmp_path), "explanations": str(tmp_path),
                                           "out_dir": str(tmp_path / "rl")})
    assert main(["train-rl", config]) == 2
    assert f"ConfigError: {tmp_path / 'rl' / 'av'} already holds an NLA AR" in capsys.readouterr().err


@NEEDS_TL3
def test_train_rl_refuses_the_users_files_beside_an_earlier_export_before_training(tmp_path, tiny_paths, capsys,
                                                                                    monkeypatch):
    """out_dir/av holding an earlier AV and a file of the user's: the export replaced the folder whole after the run,
    and deleted the file."""
    monkeypatch.setattr(nl.ActivationVerbalizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded the AV"))
    shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "rl" / "av")
    (tmp_path / "rl" / "av" / "notes.txt").write_text("mine")
    config = _write(tmp_path / "rl.yaml", {"av": str(tiny_paths["av_karvonen"]), "ar": str(tiny_paths["ar_paper"]),
                                           "activations": str(tmp_path), "explanations": str(tmp_path),
                                           "out_dir": str(tmp_path / "rl")})
    assert main(["train-rl", config]) == 2
    assert (f"ConfigError: {tmp_path / 'rl' / 'av'} holds 1 file that no export writes (notes.txt), and an export "
            "replaces its folder whole") in capsys.readouterr().err
    assert (tmp_path / "rl" / "av" / "notes.txt").read_text() == "mine"


@NEEDS_TL3
def test_train_rl_into_the_sft_avs_out_dir_is_refused_before_training(tmp_path, tiny_paths, capsys, monkeypatch):
    """RL pointed at the SFT AV's out_dir overwrote its train_result.json and mixed checkpoints with it."""
    monkeypatch.setattr(nl.ActivationVerbalizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded the AV"))
    record = tmp_path / "av" / "train_result.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"config": {"injection": "karvonen", "train": {"steps": 3}}}))
    before = record.read_text()
    config = _write(tmp_path / "rl.yaml", {"av": str(tiny_paths["av_karvonen"]), "ar": str(tiny_paths["ar_paper"]),
                                           "activations": str(tmp_path), "explanations": str(tmp_path),
                                           "out_dir": str(tmp_path / "av")})
    assert main(["train-rl", config]) == 2
    err = capsys.readouterr().err
    assert f"ConfigError: {tmp_path / 'av'} holds a train-av run ({record}); train-rl would overwrite" in err
    assert "run it with nla-lens train-av" in err and record.read_text() == before


def _checkpoint_of(command: str, out_dir: Path) -> Path:
    """A one-step checkpoint of a `command` run, as its trainer writes it (`checkpoint_command` tells its stage)."""
    names = ["model.w", "readout.weight"] if command == "train-ar" else ["model.w"]
    params = {name: torch.nn.Parameter(torch.ones(2, 2)) for name in names}
    config = RLConfig(steps=2) if command == "train-rl" else TrainConfig(steps=2, warmup_steps=0)
    return save_checkpoint(out_dir, 1, params, torch.optim.AdamW(params.values()), config, TrainResult(steps=2),
                           seconds=0.0)


@NEEDS_TL3
@pytest.mark.parametrize("given", ["its-folder", "latest"])
@pytest.mark.parametrize(("saved_by", "resumed_by"), [("train-av", "train-ar"), ("train-ar", "train-av"),
                                                      ("train-rl", "train-av"), ("train-av", "train-rl")])
def test_a_resume_from_another_stages_checkpoint_is_refused_before_any_model_loads(
        tmp_path, tiny_paths, base_folder, capsys, monkeypatch, saved_by, resumed_by, given):
    """`load_checkpoint` refused it (naming both commands) only once the base model, or RL's AV, AR and reference,
    had loaded. `latest`: an interrupted run of the other stage in out_dir (no train_result.json yet)."""
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(nl.ActivationVerbalizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded the AV"))
    monkeypatch.setattr(nl.ActivationReconstructor, "from_pretrained", lambda *a, **k: pytest.fail("loaded the AR"))
    out_dir = tmp_path / "run"
    folder = _checkpoint_of(saved_by, tmp_path / "other" if given == "its-folder" else out_dir)
    inputs = ({"base_model": str(base_folder)} if resumed_by != "train-rl"
              else {"av": str(tiny_paths["av_karvonen"]), "ar": str(tiny_paths["ar_paper"])})
    config = _write(tmp_path / "run.yaml", {**inputs, "activations": str(tmp_path), "explanations": str(tmp_path),
                                            "out_dir": str(out_dir),
                                            "resume": str(folder) if given == "its-folder" else "latest"})
    assert main([resumed_by, config]) == 2
    assert capsys.readouterr().err == (
        f"nla-lens {resumed_by}: ConfigError: {folder} is a checkpoint of a {saved_by} run, and this is {resumed_by}: "
        "a resume continues a run of the same command. Point resume at a checkpoints/step-NNNNNN folder of a "
        f"{resumed_by} run (or at latest in that run's out_dir), or leave resume out to start from step 0\n")


@NEEDS_TL3
@pytest.mark.parametrize("below", ["", "runs/run"], ids=["the-folder", "inside-it"])
@pytest.mark.parametrize("command", ["train-av", "train-rl"])
@pytest.mark.parametrize(("kind", "made_by"), [
    ("an extraction", lambda tmp_path, tiny_paths: _extraction_files(tmp_path / "acts")),
    ("a model folder", lambda tmp_path, tiny_paths: shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "model")),
])
def test_training_into_an_extraction_or_a_model_folder_or_inside_one_is_refused_before_training(
        tmp_path, tiny_paths, base_folder, capsys, monkeypatch, command, kind, made_by, below):
    """train-av with out_dir at its activations (or train-rl at the SFT AV's export) wrote checkpoints, exports and
    train_result.json among that folder's files; out_dir: activations/run (or the SFT AV's export/rl) passed the
    check of out_dir itself: the run wrote inside the input, which deleting it took along, and the SFT AV's export
    then refused to be written again over the run's folder."""
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(nl.ActivationVerbalizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded the AV"))
    folder = Path(made_by(tmp_path, tiny_paths))
    before = _files(folder)
    out = folder / below if below else folder
    inputs = ({"base_model": str(base_folder)} if command == "train-av"
              else {"av": str(tiny_paths["av_karvonen"]), "ar": str(tiny_paths["ar_paper"])})
    config = _write(tmp_path / "run.yaml", {**inputs, "activations": str(tmp_path), "explanations": str(tmp_path),
                                            "out_dir": str(out)})
    assert main([command, config]) == 2
    err = capsys.readouterr().err
    said = f"out_dir {out} lies inside {folder}, {kind}" if below else f"out_dir {out} is {kind}"
    assert f"ConfigError: {said}" in err and "Point out_dir at a new folder" in err, err
    assert _files(folder) == before and not (folder / "runs").exists()


@NEEDS_TL3
@pytest.mark.parametrize(("kind", "made_by"), [
    ("an extraction", lambda tmp_path, tiny_paths: _extraction_files(tmp_path / "acts")),
    ("a model folder", lambda tmp_path, tiny_paths: shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "model")),
])
def test_extract_into_a_folder_inside_an_extraction_or_a_model_folder_is_refused_before_the_model_loads(
        tmp_path, tiny_paths, base_folder, capsys, monkeypatch, kind, made_by):
    """extract wrote its shards into activations/more or an SFT export's model/acts: deleting the input took them
    along, and the export then refused to be written again over them."""
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("loaded the model"))
    inside = Path(made_by(tmp_path, tiny_paths))
    before = _files(inside)
    out = inside / "more"
    config = _write(tmp_path / "extract.yaml", {"base_model": str(base_folder), "corpus": "examples/corpus.jsonl",
                                                "out_dir": str(out), "extract": {"layer": 1}})
    assert main(["extract", config]) == 2
    assert capsys.readouterr().err == (
        f"nla-lens extract: ConfigError: out_dir {out} lies inside {inside}, {kind} "
        f"{_KIND_DETAIL[kind]}, an input of runs, not a run's out_dir: extract would write its shards among its files. "
        "Point out_dir at a new folder outside it\n")
    assert _files(inside) == before and not out.exists()


_KIND_DETAIL = {"an extraction": "(nla-lens extract's out_dir)",
                "a model folder": "(an NLA export or a base model: it holds config.json or nla_meta.yaml)"}


def test_an_out_dir_below_a_folder_holding_only_a_config_json_is_not_a_model_folder(tmp_path):
    """A project folder may hold a config.json of its own: above out_dir, a model folder needs weights beside it."""
    (tmp_path / "config.json").write_text("{}")
    check_not_an_input_folder(tmp_path / "runs" / "av")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(nl.ConfigError, match="lies inside .*, a model folder"):
        check_not_an_input_folder(tmp_path / "runs" / "av")


def _extraction_files(folder: Path) -> Path:
    """The files that make a folder an extraction's, as far as an out_dir check looks."""
    (folder / "shards").mkdir(parents=True)
    (folder / "extraction.complete.json").write_text(json.dumps({"shards": 0, "rows": 0}))
    return folder


@NEEDS_TL3
@pytest.mark.parametrize(("recorded", "found"), [({"injection": "karvonen", "train": {}}, "train-av"),
                                               ({"train": {}}, "train-ar"), ({"rl": {}}, "train-rl")])
def test_extract_into_a_training_runs_out_dir_is_refused_before_the_model_loads(tmp_path, base_folder, capsys,
                                                                                monkeypatch, recorded, found):
    """nla-lens extract wrote its sidecar and shards among a training run's files."""
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("loaded the model"))
    record = tmp_path / "run" / "train_result.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"config": recorded}))
    assert main(["extract", _one_document_extraction(tmp_path, base_folder, record.parent)]) == 2
    err = capsys.readouterr().err
    assert f"ConfigError: {record.parent} holds a {found} run ({record}); extract would overwrite or mix" in err, err
    assert "Point out_dir at a new folder" in err and os.listdir(record.parent) == ["train_result.json"]


@NEEDS_TL3
@pytest.mark.parametrize("holding", ["exported model", "run checkpoints", "other files"])
def test_extract_into_a_folder_of_other_files_is_refused_before_the_model_loads(tmp_path, base_folder, tiny_paths,
                                                                                capsys, monkeypatch, holding):
    """An exported model's folder got an empty shards/ and a list of every sidecar setting that differed; a
    training run's checkpoints/ or a folder of unrelated files got the shards mixed among their files."""
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("loaded the model"))
    out_dir = tmp_path / "out"
    if holding == "exported model":
        shutil.copytree(tiny_paths["av_embedding"], out_dir)
        expected = "config.json"
    elif holding == "run checkpoints":
        out_dir = tmp_path / "run" / "checkpoints"
        (out_dir / "step-000002").mkdir(parents=True)
        (out_dir / "step-000002" / "trainer_state.json").write_text("{}")
        expected = "step-000002"
    else:
        out_dir.mkdir()
        (out_dir / "notes.txt").write_text("mine")
        expected = "notes.txt"
    before = _files(out_dir)
    assert main(["extract", _one_document_extraction(tmp_path, base_folder, out_dir)]) == 2
    err = capsys.readouterr().err
    assert f"ConfigError: {out_dir} holds " in err and expected in err and "which no extraction writes" in err, err
    assert _files(out_dir) == before and not (out_dir / "shards").exists()


@NEEDS_TL3
def test_extract_into_a_folder_of_only_hidden_files_extracts(tmp_path, base_folder):
    """A killed write's temporary file (hidden) is no one's data: the folder counts as empty."""
    out_dir = tmp_path / "acts"
    out_dir.mkdir()
    (out_dir / ".nla_meta.yaml.0123.tmp").write_text("half")
    assert main(["extract", _one_document_extraction(tmp_path, base_folder, out_dir)]) == 0
    assert len(load_activations(out_dir)) > 0


@NEEDS_TL3
def test_extract_into_an_out_dir_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, base_folder,
                                                                                          capsys, monkeypatch):
    """An out_dir under a file failed with a bare error once the base model had loaded."""
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("loaded the model"))
    out_dir = tmp_path / "corpus.jsonl" / "acts"
    assert main(["extract", _one_document_extraction(tmp_path, base_folder, out_dir)]) == 2
    assert f"ConfigError: out_dir '{out_dir}' cannot be written" in capsys.readouterr().err


@NEEDS_TL3
@pytest.mark.parametrize("changed", ["dtype", "weights"])
def test_resuming_an_extraction_in_another_dtype_or_from_other_weights_is_refused_before_the_model_loads(
        tmp_path, base_folder, capsys, monkeypatch, changed):
    """The config names the dtype and the base folder, yet a resume in another dtype than the extraction recorded (or
    from weight files replaced since) was refused only once the base model had loaded: minutes for an 8B."""
    base = shutil.copytree(base_folder, tmp_path / "base")
    out_dir = tmp_path / "acts"
    config = _one_document_extraction(tmp_path, base, out_dir)
    assert main(["extract", config]) == 0
    before = _files(out_dir)
    if changed == "dtype":
        config = _write(Path(config), {**yaml.safe_load(Path(config).read_text(encoding="utf-8")), "dtype": "bf16"})
        expected = ("was extracted with the base model in float32, and this run has it in bfloat16: its shards would "
                    "mix the two precisions")
    else:
        testing.save_base_model(base, d_model=D_MODEL, seed=1)
        expected = f"was extracted from other weight files of base model {base} than this run reads"
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["extract", config]) == 2
    err = capsys.readouterr().err
    assert f"ConfigError: {out_dir} {expected}" in err, err
    assert _files(out_dir) == before


def _one_document_extraction(tmp_path: Path, base_folder: Path, out_dir: Path) -> str:
    """An extract config of a one-document corpus, `tmp_path/corpus.jsonl`, into `out_dir`."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "the sea was calm"}) + "\n")
    return _write(tmp_path / "extract.yaml", {"base_model": str(base_folder), "corpus": str(corpus),
                                              "out_dir": str(out_dir), "extract": {"layer": LAYER}})


@NEEDS_TL3
def test_export_refuses_a_folder_of_the_other_role_and_rewrites_its_own(tmp_path, tiny_paths, base_folder,
                                                                       dataset_meta):
    av_folder = shutil.copytree(tiny_paths["av_embedding"], tmp_path / "av")  # a paper AV: role av
    before = _files(av_folder)
    ar = init_ar(base_folder, dataset_meta)
    with pytest.raises(nl.ConfigError, match="already holds an NLA AV"):
        export_ar(ar, av_folder, base_folder)
    assert _files(av_folder) == before
    export_ar(ar, tmp_path / "ar", base_folder)
    again = export_ar(ar, tmp_path / "ar", base_folder)  # the same role into its own folder: a re-export
    assert nl.ActivationReconstructor.from_pretrained(again).meta.role == "ar"


@NEEDS_TL3
def test_export_refuses_a_sharded_models_folder_whose_index_would_outrank_it(tmp_path, base_folder, dataset_meta):
    """An AR folder sharded as released checkpoints are (an index and its shards): the export wrote its own
    model.safetensors beside them, and loading, which reads the index first, gave back the old weights."""
    ar = init_ar(base_folder, dataset_meta)
    folder = export_ar(ar, tmp_path / "ar", base_folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(weights, "model-00001-of-00001.safetensors")}))
    before = _files(folder)
    with pytest.raises(nl.ConfigError, match=r"holds model.safetensors.index.json, which an export does not write "
                                             r"and which loading reads before the exported model.safetensors, .*"
                                             r"Export into a new folder \(or remove the index and its shards\)$"):
        export_ar(ar, folder, base_folder)
    assert _files(folder) == before


@NEEDS_TL3
def test_exports_record_a_local_base_model_by_its_absolute_path(tmp_path, base_folder, extract_config,
                                                              dataset_meta, monkeypatch):
    monkeypatch.chdir(base_folder.parent)  # the configs name the base relatively, as the example YAMLs do
    common, _ = _training_inputs(tmp_path, base_folder.name, extract_config)
    assert main(["train-av", _write(tmp_path / "av.yaml", {**common, "out_dir": str(tmp_path / "av"),
                                                           "n_samples": 1, "sample_max_new_tokens": 4})]) == 0
    assert main(["train-ar", _write(tmp_path / "ar.yaml", {**common, "out_dir": str(tmp_path / "ar")})]) == 0
    for role in ("av", "ar"):
        assert load_meta(tmp_path / role / "model").base_model == str(base_folder.resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere, the exported pair still finds its base
    nla = nl.NLA.from_pretrained(tmp_path / "av" / "model", tmp_path / "ar" / "model")
    assert nl.load_base(nla).cfg.d_model == nla.av.meta.d_model
    # A name that is no local folder (a hub id) is recorded as written.
    ar = init_ar(base_folder, dataset_meta)
    assert load_meta(export_ar(ar, tmp_path / "hub", base_folder)).base_model == dataset_meta.base_model == "tiny"


@NEEDS_TL3
def test_an_extraction_records_a_local_base_model_by_its_absolute_path(tmp_path, base_folder, extract_config,
                                                                     monkeypatch):
    """A relative base_model was recorded as written: read from another folder, the extraction's sidecar named no
    folder, and so did the sidecar of every model trained on it (the exporters copy the extraction's)."""
    monkeypatch.chdir(base_folder.parent)
    common, _ = _training_inputs(tmp_path, base_folder.name, extract_config)
    acts = Path(common["activations"])
    assert load_meta(acts).base_model == str(base_folder.resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # train from another folder, naming the base absolutely
    config = {**common, "base_model": str(base_folder), "out_dir": str(tmp_path / "av"), "n_samples": 0}
    assert main(["train-av", _write(tmp_path / "av.yaml", config)]) == 0
    av_meta = load_meta(tmp_path / "av" / "model")
    assert av_meta.base_model == str(base_folder.resolve())
    assert sidecar_base_folder(av_meta) == base_folder.resolve()  # what nl.load_base and verbalize --text read
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shard of the extraction and the AV name one base: no mix warned of
        check_extraction_input(next((acts / "shards").iterdir()), av_meta)


@NEEDS_TL3
def test_cli_trains_and_exports_with_dtype_names_the_library_takes(tmp_path, base_folder, extract_config):
    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    config = {**common, "out_dir": str(tmp_path / "ar"), "dtype": "fp32", "export_dtype": "bf16"}
    assert main(["train-ar", _write(tmp_path / "ar.yaml", config)]) == 0
    weights = load_file(str(tmp_path / "ar" / "model" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}


@pytest.mark.parametrize(("command", "key", "value"), [
    ("extract", "dtype", "bf17"), ("train-ar", "dtype", "float8"), ("train-ar", "export_dtype", "int8"),
    ("train-rl", "export_dtype", "half-float"),
])
def test_cli_refuses_a_dtype_name_before_anything_loads(tmp_path, capsys, command, key, value):
    config = {**_REQUIRED[command], key: value, **({"extract": {"layer": 1}} if command == "extract" else {})}
    path = _write(tmp_path / "bad.yaml", config)
    assert main([command, path]) == 2
    err = capsys.readouterr().err
    assert err == (f"nla-lens {command}: ConfigError: {path}: {key}: {value!r} is not a dtype nla_lens knows; "
                   "use one of float32/fp32/float, bfloat16/bf16, float16/fp16/half, float64/fp64/double\n")


@pytest.mark.parametrize(("command", "key", "value"), [
    ("train-ar", "export_dtype", "float8_e4m3fn"), ("train-rl", "export_dtype", "float8_e5m2"),
    ("train-av", "dtype", "float8_e5m2"), ("extract", "dtype", "float8_e4m3fn"),
])
def test_cli_refuses_a_float_dtype_under_16_bits_before_anything_loads(tmp_path, capsys, command, key, value):
    """torch names float8 dtypes floating-point, so they passed: an 8-bit export trained the whole run, then stopped on
    a bare NotImplementedError ("isfinite" not implemented for 'Float8_e4m3fn'), and training in one stopped on
    another as the model loaded."""
    config = {**_REQUIRED[command], key: value, **({"extract": {"layer": 1}} if command == "extract" else {})}
    path = _write(tmp_path / "bad.yaml", config)
    assert main([command, path]) == 2
    assert capsys.readouterr().err == (
        f"nla-lens {command}: ConfigError: {path}: {key}: {value!r} is a float narrower than 16 bits, which nla_lens "
        "neither trains nor exports in; use one of float32/fp32/float, bfloat16/bf16, float16/fp16/half, "
        "float64/fp64/double (bfloat16 is the smallest)\n")


@pytest.mark.parametrize("command", ["train-av", "train-ar", "train-rl"])
def test_cli_refuses_float16_training_and_takes_a_float16_export(tmp_path, capsys, command):
    """Adam's eps rounds to 0 in float16: a train-av / train-ar run turned every weight NaN and exported them, and a
    train-rl run stopped on torch's sampling error. Exporting in float16 is fine."""
    path = _write(tmp_path / "bad.yaml", {**_REQUIRED[command], "dtype": "fp16"})
    assert main([command, path]) == 2
    assert capsys.readouterr().err.startswith(f"nla-lens {command}: ConfigError: {path}: dtype: float16 weights "
                                              "cannot train here: Adam's eps (1e-8) rounds to 0 in float16")
    config_cls = {"train-av": AVRunConfig, "train-ar": ARRunConfig, "train-rl": RLRunConfig}[command]
    assert load_config(config_cls, _write(tmp_path / "ok.yaml", {**_REQUIRED[command], "export_dtype": "fp16"}))


def test_a_file_that_is_not_yaml_is_named_in_one_line(capsys):
    assert main(["extract", "examples/corpus.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "examples/corpus.jsonl is not a YAML config (" in err and "at line 2" in err


def test_a_config_key_given_twice_is_refused_not_the_last_one_kept(tmp_path, capsys):
    """PyYAML keeps the last of two equal keys: a copied config with a second `steps:` trained silently."""
    path = tmp_path / "ar.yaml"
    path.write_text("base_model: x\nactivations: y\nexplanations: z\nout_dir: o\ntrain:\n  steps: 10\n  steps: 2\n")
    assert main(["train-ar", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the key 'steps' is given twice at line 7" in err
    assert "delete one of the two" in err and "not a YAML config" not in err  # it was 'pass the run's .yaml file'


def test_cli_rejects_an_unknown_config_key(tmp_path, capsys):
    config = _write(tmp_path / "bad.yaml", {"base_model": "x", "activations": "y", "explanations": "z",
                                            "out_dir": "o", "trian": {"steps": 1}})
    assert main(["train-ar", config]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "'trian'" in err


@NEEDS_TL3  # on the bridge the command refuses first (test_backends)
def test_a_missing_relative_input_names_the_folder_it_is_read_from(tmp_path, monkeypatch, capsys):
    """examples/extract.yaml run from outside the repository said only "corpus examples/corpus.jsonl does not
    exist", while the file sits beside the YAML: relative paths are read from the current folder."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = _write(tmp_path / "extract.yaml", {**_REQUIRED["extract"], "corpus": "examples/corpus.jsonl",
                                                "extract": {"layer": 1}})
    assert main(["extract", config]) == 2
    assert (f"corpus examples/corpus.jsonl does not exist (relative to the current folder {tmp_path / 'elsewhere'}); "
            "check the path") in capsys.readouterr().err
    absolute = _write(tmp_path / "abs.yaml", {**_REQUIRED["train-ar"], "activations": str(tmp_path / "acts")})
    assert main(["train-ar", absolute]) == 2
    err = capsys.readouterr().err
    assert f"activations {tmp_path / 'acts'} does not exist (nla-lens extract writes it); check the path" in err


def test_cli_names_missing_config_keys_as_keys(tmp_path, capsys):
    """A config without its required keys said "ExtractRunConfig.__init__() missing 3 required positional
    arguments": the YAML has no arguments, positional or not."""
    config = _write(tmp_path / "bad.yaml", {"base_model": "x"})
    assert main(["extract", config]) == 2
    err = capsys.readouterr().err
    assert "missing key(s) ['corpus', 'out_dir', 'extract'] for ExtractRunConfig; add them" in err
    assert "positional" not in err
    config = _write(tmp_path / "bad_section.yaml", {**_REQUIRED["extract"], "extract": {"seed": 1}})
    assert main(["extract", config]) == 2
    assert "extract: missing key(s) ['layer'] for ExtractConfig" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "message"), [
    ({"steps": "many"}, "train.steps: expected an integer, got 'many'"),
    ({"steps": 4.5}, "train.steps: expected an integer, got 4.5"),
    ({"lr": "1e-5"}, "train.lr: expected a number, got '1e-5' (YAML reads 1e-5 as text: write 1.0e-5)"),
    ({"lr": "fast"}, "train.lr: expected a number, got 'fast'\n"),
    ({"lr": True}, "train.lr: expected a number, got True"),
])
def test_cli_names_a_config_value_of_the_wrong_kind(tmp_path, capsys, value, message):
    config = _write(tmp_path / "bad.yaml", {"base_model": "x", "activations": "y", "explanations": "z",
                                            "out_dir": "o", "train": value})
    assert main(["train-ar", config]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train-av", "train-ar", "train-rl"])
@pytest.mark.parametrize("value", [True, 3])
def test_a_resume_that_is_not_a_string_says_what_resume_takes(tmp_path, capsys, command, value):
    """`resume: true` said only "expected a string, got True", leaving the newcomer to guess which string."""
    config = _write(tmp_path / "bad.yaml", {**_REQUIRED[command], "resume": value})
    assert main([command, config]) == 2
    assert (f"resume: expected a string, got {value!r} (resume: latest, or a checkpoints/step-NNNNNN folder; leave "
            "it out to start at step 0)") in capsys.readouterr().err


_REQUIRED = {"extract": {"base_model": "x", "corpus": "y", "out_dir": "o"},
             "train-ar": {"base_model": "x", "activations": "y", "explanations": "z", "out_dir": "o"},
             "train-av": {"base_model": "x", "activations": "y", "explanations": "z", "out_dir": "o"},
             "train-rl": {"av": "a", "ar": "r", "activations": "y", "explanations": "z", "out_dir": "o"}}


@pytest.mark.parametrize(("command", "section", "value", "message"), [
    ("extract", "extract", {"layer": 1, "batch_size": 0}, "need batch_size >= 1 and docs_per_shard >= 1"),
    ("extract", "extract", {"layer": 1, "docs_per_shard": -1}, "need batch_size >= 1 and docs_per_shard >= 1"),
    ("extract", "extract", {"layer": 1, "positions_per_doc": 0}, "need layer >= 0, positions_per_doc >= 1"),
    ("extract", "extract", {"layer": 1, "min_context": 40, "max_tokens": 32}, "max_tokens > min_context"),
    ("extract", "extract", {"layer": -1}, "need layer >= 0"),
    ("train-ar", "train", {"weight_decay": -50.0}, "weight_decay must be >= 0"),
    ("train-ar", "train", {"betas": [0.9, 1.5]}, "betas must be two numbers in [0, 1)"),
    ("train-rl", "rl", {"betas": [0.9]}, "betas must be two numbers in [0, 1)"),
    ("train-rl", "rl", {"betas": [0.9, "0.99"]}, "betas must be two numbers in [0, 1)"),
    ("train-rl", "rl", {"betas": 0.9}, "betas must be two numbers in [0, 1)"),
    ("train-rl", "rl", {"clip_eps": 1.5}, "clip_eps must be in (0, 1)"),
    ("train-rl", "rl", {"clip_eps": 0.0}, "clip_eps must be in (0, 1)"),
    ("train-ar", "train", {"trainable_blocks": 3}, "trainable_blocks must be a list of block indices"),
    ("train-ar", "train", {"trainable_blocks": ["2"]}, "trainable_blocks must be a list of block indices"),
    # Each out-of-range field is named with its section and the value given, not a list of rules to check.
    ("train-av", "train", {"lr": -1e-3}, "train: need lr > 0 (got -0.001)"),
    ("train-ar", "train", {"batch_size": 0, "grad_accum": 0}, "train: need batch_size >= 1 (got 0); grad_accum >= 1"),
    ("train-ar", "train", {"min_lr_ratio": 2.0}, "train: need min_lr_ratio in [0, 1] (got 2.0)"),
    ("train-ar", "train", {"keep_checkpoints": 0}, "train: need keep_checkpoints >= 1 (got 0)"),
    ("train-rl", "rl", {"max_new_tokens": 0}, "rl: need max_new_tokens >= 1 (got 0)"),
    ("train-rl", "rl", {"kl_coef": -0.1}, "rl: need kl_coef >= 0 (got -0.1)"),
    ("train-rl", "rl", {"top_p": 0.0}, "rl: need top_p in (0, 1] (got 0.0)"),
    ("train-rl", "rl", {"group_size": 1}, "rl: group_size must be >= 2"),
    ("train-rl", "rl", {"eval_vectors": -1}, "rl: need eval_vectors >= 0 (got -1)"),
    # A held-out round trip every N steps of none: accepted, and no evaluation ran.
    ("train-rl", "rl", {"eval_every": 5, "eval_vectors": 0}, "rl: eval_every=5 asks for a held-out round trip every "
     "5 steps, but eval_vectors=0 runs none (FVE needs >= 2 vectors); set eval_vectors >= 2 (the default is 64), or "
     "eval_every: 0"),
    ("train-rl", "rl", {"eval_every": 1, "eval_vectors": 1}, "but eval_vectors=1 runs none"),
    ("train-av", "eval_fraction", 1.5, "need eval_fraction in (0, 1): the share of documents held out (got 1.5)"),
    ("train-rl", "eval_fraction", 0.0, "need eval_fraction in (0, 1): the share of documents held out (got 0.0)"),
    ("train-av", "injection", "karvonnen", "injection: 'karvonnen' is no injection method; set one of ['embedding', "
     "'karvonen']"),
    ("train-av", "n_samples", -1, "need n_samples >= 0"),
    ("train-av", "sample_max_new_tokens", 0, "sample_max_new_tokens >= 1"),
    # A section whose keys are all commented out is YAML null, not the defaults.
    ("train-ar", "train", None, "train: expected a mapping for TrainConfig, got an empty section"),
    ("train-rl", "rl", None, "rl: expected a mapping for RLConfig, got an empty section"),
    ("extract", "extract", None, "extract: expected a mapping for ExtractConfig, got an empty section"),
])
def test_cli_refuses_an_out_of_range_setting_before_anything_loads(tmp_path, capsys, command, section, value,
                                                                   message):
    config = _write(tmp_path / "bad.yaml", {**_REQUIRED[command], section: value})
    assert main([command, config]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and message in err


@pytest.mark.parametrize(("command", "section", "setting", "message"), [
    ("train-ar", "train", "lr: .inf", "train: need a finite number for lr (got inf); write one\n"),
    ("train-av", "train", "weight_decay: .nan", "train: need a finite number for weight_decay (got nan); write one\n"),
    ("train-ar", "train", "grad_clip: .inf", "train: need a finite number for grad_clip (got inf); write one "
     "(grad_clip: 1.0e6 clips nothing)\n"),
    ("train-rl", "rl", "sft_coef: .nan", "rl: need a finite number for sft_coef (got nan); write one\n"),
    ("train-rl", "rl", "temperature: .inf", "rl: need a finite number for temperature (got inf); write one\n"),
])
def test_a_nan_or_infinite_setting_is_refused_before_anything_loads(tmp_path, capsys, command, section, setting,
                                                                    message):
    """NaN passed every range check written as `v < 0`, and .inf every `v > 0`: `lr: .inf` and `weight_decay: .nan`
    trained the whole run, then refused to export its NaN weights; `rl.sft_coef: .nan` skipped every AV update."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_REQUIRED[command]) + f"{section}:\n  {setting}\n", encoding="utf-8")
    assert main([command, str(path)]) == 2
    assert capsys.readouterr().err == f"nla-lens {command}: ConfigError: {path}: {message}"


@NEEDS_TL3
def test_extract_refuses_a_layer_the_base_model_lacks_before_its_weights_load(tmp_path, capsys, base_folder,
                                                                             extract_config, monkeypatch):
    """It was refused only once the whole base model had loaded (minutes for an 8B model)."""
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("weights read"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    assert main(["extract", _write(tmp_path / "extract.yaml", {
        "base_model": str(base_folder), "corpus": str(corpus), "out_dir": str(tmp_path / "acts"),
        "extract": {**dataclasses.asdict(extract_config), "layer": 4}})]) == 2
    assert (f"ConfigError: extract.layer 4 is outside base_model {base_folder}'s 4 blocks (0-3); set it to one of "
            "those indices") in capsys.readouterr().err
    assert not (tmp_path / "acts").exists()


@NEEDS_TL3
@pytest.mark.parametrize("text", [None, 5, ["a", "b"]])
def test_a_corpus_line_whose_text_is_not_a_string_is_named_before_extraction(tmp_path, capsys, base_folder,
                                                                             extract_config, text):
    """It was a raw tokenizer ValueError from inside the extraction, once the shards before it were written."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n" + json.dumps({"text": text}) + "\n")
    acts = tmp_path / "acts"
    assert main(["extract", _write(tmp_path / "extract.yaml", {
        "base_model": str(base_folder), "corpus": str(corpus), "out_dir": str(acts),
        "extract": dataclasses.asdict(extract_config)})]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"InputError: {corpus}:2: 'text' must be a string, got {text!r}" in err
    assert not acts.exists()


@NEEDS_TL3
def test_a_repeated_document_id_is_named_by_its_lines_before_the_base_model_loads(tmp_path, capsys, base_folder,
                                                                                  extract_config, monkeypatch):
    """It was found inside the extraction, after the model loaded, leaving nla_meta.yaml and an empty shards/."""
    monkeypatch.setattr(pipeline.loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("model loaded"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": "the cat sat on the mat"}) + "\n"
                              for i in ("a", "b", "a")))
    acts = tmp_path / "acts"
    assert main(["extract", _write(tmp_path / "extract.yaml", {
        "base_model": str(base_folder), "corpus": str(corpus), "out_dir": str(acts),
        "extract": dataclasses.asdict(extract_config)})]) == 2
    assert capsys.readouterr().err == (f"nla-lens extract: InputError: {corpus}:3: document id 'a' is line 1's too; "
                                       "give every document its own id (splits are made by document)\n")
    assert not acts.exists()


@NEEDS_TL3  # on the bridge the command refuses first (test_backends)
def test_a_missing_base_model_is_named_by_its_key_before_the_activations_are_read(tmp_path, capsys, monkeypatch):
    """It was a CheckpointError without the key or the YAML, once the (possibly large) activations had loaded."""
    monkeypatch.setattr(pipeline, "load_activations", lambda *a, **k: pytest.fail("activations read"))
    (tmp_path / "acts").mkdir()
    (tmp_path / "explanations.jsonl").write_text("")
    config = _write(tmp_path / "av.yaml", {**_REQUIRED["train-av"], "base_model": str(tmp_path / "no_base"),
                                           "activations": str(tmp_path / "acts"),
                                           "explanations": str(tmp_path / "explanations.jsonl")})
    assert main(["train-av", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nla-lens train-av: ConfigError: {config}: base_model: ")
    assert str(tmp_path / "no_base") in err


def _fake_extraction(tmp_path: Path, dataset_meta) -> dict:
    """Inputs that exist, with the extraction's sidecar (the AR's depth) and no shards: nothing may read them."""
    acts = tmp_path / "acts"
    acts.mkdir()
    dump_meta(dataset_meta.raw, acts)
    (tmp_path / "explanations.jsonl").write_text("")
    return {"activations": str(acts), "explanations": str(tmp_path / "explanations.jsonl"),
            "out_dir": str(tmp_path / "out")}


@NEEDS_TL3
@pytest.mark.parametrize(("command", "setting", "message"), [
    ("train-av", {"hook_point": "blocks.99.hook_resid_post"},
     "hook_point: hook point 'blocks.99.hook_resid_post' names block 99, but {base}/config.json has 4 blocks (0-3)"),
    ("train-av", {"hook_point": "blocks.1.hook_resid_psot"},
     "hook_point: hook point 'blocks.1.hook_resid_psot' does not exist in this model; did you mean "
     "'blocks.1.hook_resid_post'? pick one of model.hook_dict, e.g. 'blocks.1.hook_resid_post' or 'hook_embed'"),
    ("train-av", {"injection": "embedding", "injection_scale": 50.0, "hook_point": "embed"},
     "hook_point: hook point 'embed' does not exist in this model"),
    ("train-av", {"hook_point": "ln_final.hook_normalized"},
     "hook_point: hook point 'ln_final.hook_normalized' is outside the embedding and the blocks, the part of AV "
     "training's forward that runs with the hooks on"),
    ("train-av", {"train": {"trainable_blocks": [2, 4]}},
     "train.trainable_blocks: [2, 4] names block(s) [4], but the AV trains the 4 blocks (0-3) of base_model {base}; "
     "use indices among those (null: every block)"),
    ("train-ar", {"train": {"trainable_blocks": [-1, 2, 3]}},
     f"train.trainable_blocks: [-1, 2, 3] names block(s) [-1, 3], but the AR trains the first K+1 = {LAYER + 1} "
     f"blocks (0-{LAYER}) of base_model {{base}} (the activations are layer K = {LAYER}'s); use indices among those "
     "(null: every block)"),
])
def test_a_hook_point_or_trainable_block_the_base_lacks_is_refused_from_its_config_json(
        tmp_path, capsys, monkeypatch, base_folder, dataset_meta, command, setting, message):
    """Both were refused only once the activations and the base model's weights had loaded (minutes for an 8B)."""
    monkeypatch.setattr(pipeline, "load_activations", lambda *a, **k: pytest.fail("activations read"))
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("weights read"))
    config = _write(tmp_path / "run.yaml", {"base_model": str(base_folder), **_fake_extraction(tmp_path, dataset_meta),
                                            **setting})
    assert main([command, config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nla-lens {command}: ConfigError: {config}: ")
    assert message.format(base=base_folder) in err


@NEEDS_TL3
def test_an_injection_site_a_one_block_base_lacks_names_the_injection_key(tmp_path, capsys, monkeypatch,
                                                                          dataset_meta):
    """With hook_point unset the method's default site (karvonen: blocks.1.hook_resid_post) is checked, and named;
    one block reads as one ("1 block (0)", was "1 blocks (0-0)")."""
    monkeypatch.setattr(pipeline, "load_activations", lambda *a, **k: pytest.fail("activations read"))
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("weights read"))
    base = testing.save_base_model(tmp_path / "one_block", n_layers=1)
    extraction = _fake_extraction(tmp_path, dataset_meta)
    config = _write(tmp_path / "av.yaml", {"base_model": str(base), **extraction})
    assert main(["train-av", config]) == 2
    assert (f"ConfigError: {config}: injection (hook_point unset: karvonen's default): hook point "
            f"'blocks.1.hook_resid_post' names block 1, but {base}/config.json has 1 block (0); fix"
            ) in capsys.readouterr().err
    config = _write(tmp_path / "av.yaml", {"base_model": str(base), "hook_point": "blocks.0.hook_resid_post",
                                           "train": {"trainable_blocks": [1]}, **extraction})
    assert main(["train-av", config]) == 2
    assert (f"names block(s) [1], but the AV trains the 1 block (0) of base_model {base}; use indices among those"
            ) in capsys.readouterr().err


@NEEDS_TL3
@pytest.mark.parametrize(("command", "setting"), [
    ("train-av", {"hook_point": "blocks.3.hook_resid_post", "train": {"trainable_blocks": [0, 3]}}),
    ("train-av", {"injection": "embedding", "injection_scale": 50.0}),
    ("train-ar", {"train": {"trainable_blocks": [0, LAYER]}}),
])
def test_hook_points_and_trainable_blocks_at_the_edge_of_the_base_pass_the_early_checks(
        tmp_path, base_folder, dataset_meta, command, setting):
    config_cls = {"train-av": AVRunConfig, "train-ar": ARRunConfig}[command]
    path = _write(tmp_path / "run.yaml", {"base_model": str(base_folder), **_fake_extraction(tmp_path, dataset_meta),
                                          **setting})
    check_inputs(load_config(config_cls, path), path)


@NEEDS_TL3
def test_training_on_another_local_base_than_the_extraction_names_warns(tmp_path, base_folder, extract_config,
                                                                         capsys):
    """A base of the extraction's width and depth trained on another model's activations without a word (the
    extraction's base_model was recorded as written, often relative, so it could not be compared)."""
    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    other = testing.save_base_model(tmp_path / "other_base", seed=1)
    config = {**common, "base_model": str(other), "out_dir": str(tmp_path / "ar"),
              "train": {"steps": 1, "warmup_steps": 0}}
    capsys.readouterr()
    assert main(["train-ar", _write(tmp_path / "ar.yaml", config)]) == 0
    assert (f"nla-lens train-ar: warning: the activations were extracted from base model {base_folder.resolve()}, "
            f"but base_model is {other.resolve()}: the AR would learn another model's activations; set base_model to "
            f"{base_folder.resolve()}, or ignore this if the two folders hold one model") in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same folder, named relatively from its parent: no warning
        init_ar(os.path.relpath(base_folder), load_meta(common["activations"]))


@NEEDS_TL3
def test_training_on_another_layers_extraction_than_the_explanations_label_is_refused_before_training(
        tmp_path, base_folder, extract_config, capsys):
    """Labels of the layer-2 extraction trained an AR on the layer-1 extraction of the same corpus without a word:
    every (doc_id, position) matched, and the explanations described other vectors."""
    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    other = tmp_path / "acts_layer1"
    assert main(["extract", _write(tmp_path / "extract1.yaml", {
        "base_model": str(base_folder), "corpus": str(tmp_path / "corpus.jsonl"), "out_dir": str(other),
        "extract": dataclasses.asdict(extract_config) | {"layer": extract_config.layer - 1}})]) == 0
    capsys.readouterr()
    for command in ("train-ar", "train-av"):
        out = tmp_path / command
        config = _write(tmp_path / f"{command}.yaml", {**common, "activations": str(other), "out_dir": str(out)})
        assert main([command, config]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nla-lens {command}: ConfigError: explanations {common['explanations']} label the "
                              f"extraction {Path(common['activations']).absolute()}, not activations {other} "
                              f"(layer: {extract_config.layer} in the explanations, {extract_config.layer - 1} in "
                              "the activations)")
        assert not (out / "checkpoints").exists() and not (out / "model").exists()


@pytest.mark.parametrize(("key", "template", "problem"), [
    ("av_template", "Describe this activation.", "the AV template has no '{injection_char}' placeholder"),
    ("av_template", "{injection_char} and {injection_char}", "the AV template holds the '{injection_char}' "
                                                             "placeholder 2 times"),
    ("ar_template", "Summary: <summary>", "the AR template has no '{explanation}' placeholder"),
])
def test_an_extract_template_without_its_placeholder_names_the_config_key_before_the_model_loads(
        tmp_path, base_folder, capsys, monkeypatch, key, template, problem):
    """It said "sidecar: the AV template has no ...; restore the released template" once the base had loaded, of a
    template the config gave."""
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("loaded the base model"))
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
    config = _write(tmp_path / "extract.yaml", {"base_model": str(base_folder),
                                                "corpus": str(tmp_path / "corpus.jsonl"),
                                                "out_dir": str(tmp_path / "acts"),
                                                "extract": {"layer": 1, key: template}})
    assert main(["extract", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nla-lens extract: ConfigError: {config}: extract: {key}: {problem}")
    assert "sidecar" not in err and not (tmp_path / "acts").exists()


@NEEDS_TL3
def test_a_config_that_names_its_command_is_refused_by_every_other_and_run_by_its_own(
        tmp_path, base_folder, extract_config, capsys):
    """`nla-lens train-av` given the AR's YAML trained an AV into the AR's out_dir on a first run: an AR's keys are
    a subset of an AV's. The `command:` key the shipped examples carry tells them apart."""
    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    ar_config = _write(tmp_path / "ar.yaml", {"command": "train-ar", **common, "out_dir": str(tmp_path / "ar")})
    capsys.readouterr()
    assert main(["train-av", ar_config]) == 2
    err = capsys.readouterr().err
    # The command: line may be the slip (a copy of another command's config): the fix for that is named too
    assert err == (f"nla-lens train-av: ConfigError: {ar_config}: command: this config is for nla-lens train-ar, not "
                   f"train-av (if it is train-av's, set command: train-av). {ar_config} reads as a config for nla-lens "
                   f"train-ar: run nla-lens train-ar {ar_config}, or give nla-lens train-av its own config (examples/ "
                   "has one for each command)\n")
    assert not (tmp_path / "ar").exists()
    with pytest.raises(nl.ConfigError, match=r"^command: this config is for nla-lens train-ar, not train-av \(if it "
                                             r"is train-av's, set command: train-av\)$"):
        AVRunConfig(**yaml.safe_load(Path(ar_config).read_text()))  # from Python too
    assert main(["train-ar", ar_config]) == 0
    assert load_meta(tmp_path / "ar" / "model").role == "ar"


def test_a_config_naming_no_known_command_is_refused(tmp_path, capsys):
    config = _write(tmp_path / "ar.yaml", {"command": "train-critic", "base_model": "b", "activations": "a",
                                           "explanations": "e.jsonl", "out_dir": "o"})
    assert main(["train-ar", config]) == 2
    assert (f"{config}: command: 'train-critic' is no nla-lens command with a config; set one of ['extract', "
            "'train-ar', 'train-av', 'train-rl'] (the command this config is for), or leave it out"
            ) in capsys.readouterr().err


def test_a_run_record_cut_short_leaves_the_earlier_record_whole(tmp_path, monkeypatch):
    """train_result.json was written in place: a full disk (or Ctrl-C) mid-write left half a JSON file, which
    read back as no record at all."""
    from nla_lens.distributed import World

    config = RLRunConfig(av="av", ar="ar", activations="acts", explanations="e.jsonl", out_dir=str(tmp_path))
    pipeline._save_result(config, tmp_path / "av", TrainResult(steps=1), World())
    record = tmp_path / pipeline.RESULT_FILE
    before = record.read_bytes()
    cut_write_text_short(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        pipeline._save_result(config, tmp_path / "av", TrainResult(steps=2), World())
    monkeypatch.undo()
    assert record.read_bytes() == before
    assert json.loads(before)["steps"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [pipeline.RESULT_FILE]


@NEEDS_TL3
@pytest.mark.parametrize("command", ["train-av", "train-ar"])
def test_labels_too_long_for_the_context_are_named_by_row_before_the_base_model_loads(tmp_path, base_folder,
                                                                                      extract_config, monkeypatch,
                                                                                      command):
    """A label past the base's n_ctx (256 here) was refused only after the weights loaded, as 'a training row has N
    tokens', naming no row."""
    common, data = _training_inputs(tmp_path, str(base_folder), extract_config)
    long_rows = {(data.doc_ids[i], data.positions[i]) for i in (0, 5)}
    labels = [" ".join(["token"] * 300) if (d, p) in long_rows else text
              for d, p, text in zip(data.doc_ids, data.positions, data.explanations, strict=True)]
    save_explanations(dataclasses.replace(data, explanations=labels), common["explanations"])
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("weights read"))
    config = load_config(AVRunConfig if command == "train-av" else ARRunConfig,
                         _write(tmp_path / "run.yaml", {**common, "out_dir": str(tmp_path / "run")}))
    run = pipeline.run_train_av if command == "train-av" else pipeline.run_train_ar
    with pytest.raises(nl.PromptTooLongError) as info:
        run(config, progress=False)
    named = [f"doc_id {d!r} position {p}: " for d, p in sorted(long_rows)]
    message = str(info.value)
    assert message.startswith("2 training rows are longer than the model's context of n_ctx=256 tokens (")
    assert all(row in message for row in named)
    assert message.endswith("shorten those explanations, or leave the rows out (delete their lines; a labeler "
                            "returns None for a row to leave out)")


@NEEDS_TL3
def test_train_rl_names_anchor_rows_too_long_for_the_avs_context_before_the_weights_load(tmp_path, tiny_paths,
                                                                                          base_folder, extract_config,
                                                                                          monkeypatch):
    """RL's `sft_coef` term trains the AV on labelled rows of the training split, as SFT does: one past the AV's
    n_ctx (256 here) was refused only after the AV, the AR and the reference had loaded."""
    from nla_lens.training import split_by_document

    common, data = _training_inputs(tmp_path, str(base_folder), extract_config)
    train, held_out = split_by_document(data, common["eval_fraction"], 0)
    long_rows = {(train.doc_ids[0], train.positions[0]), (held_out.doc_ids[0], held_out.positions[0])}
    labels = [" ".join(["token"] * 300) if (d, p) in long_rows else text
              for d, p, text in zip(data.doc_ids, data.positions, data.explanations, strict=True)]
    save_explanations(dataclasses.replace(data, explanations=labels), common["explanations"])

    class WeightsRead(Exception):
        pass

    def weights_read(*args, **kwargs):
        raise WeightsRead

    monkeypatch.setattr(loading, "load_hooked_transformer", weights_read)
    fields = {"av": str(tiny_paths["av_karvonen"]), "ar": str(tiny_paths["ar_paper"]),
              "activations": common["activations"], "explanations": common["explanations"],
              "eval_fraction": common["eval_fraction"], "out_dir": str(tmp_path / "rl")}
    for sft_coef, raised in ((0.5, pytest.raises(nl.PromptTooLongError)), (0.0, pytest.raises(WeightsRead))):
        config = load_config(RLRunConfig, _write(tmp_path / "rl.yaml", {**fields, "rl": {"sft_coef": sft_coef}}))
        with warnings.catch_warnings(), raised as info:  # without the term: on to the weights
            warnings.simplefilter("ignore")  # another base, another split: the tiny pair is not this extraction's
            pipeline.run_train_rl(config, progress=False)
        if sft_coef:  # the training split's row alone: the held-out rows are no anchor rows
            assert str(info.value).startswith("1 training row is longer than the model's context of n_ctx=256 tokens "
                                              f"(doc_id {train.doc_ids[0]!r} position {train.positions[0]}: ")


@NEEDS_TL3
def test_an_sft_rerun_stopped_after_its_export_leaves_no_earlier_record_beside_the_new_model(
        tmp_path, base_folder, extract_config, monkeypatch):
    """train_result.json is written after the export: a rerun (resume: latest) stopped between the two left the
    earlier run's record beside the new model, read back as a finished run. The record goes just before the swap."""
    from nla_lens.training import read_training_run

    common, _ = _training_inputs(tmp_path, str(base_folder), extract_config)
    config = {**common, "out_dir": str(tmp_path / "ar")}
    assert main(["train-ar", _write(tmp_path / "ar.yaml", config)]) == 0
    record = tmp_path / "ar" / pipeline.RESULT_FILE
    assert read_training_run(tmp_path / "ar").finished

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    resumed = _write(tmp_path / "ar_resume.yaml", {**config, "resume": "latest"})
    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "_save_result", stopped)
        assert main(["train-ar", resumed]) == 130  # Ctrl-C's exit
    assert not record.exists() and load_meta(tmp_path / "ar" / "model").role == "ar"
    assert not read_training_run(tmp_path / "ar").finished  # the newest checkpoint: its export cut short
    assert main(["train-ar", resumed]) == 0 and read_training_run(tmp_path / "ar").finished
