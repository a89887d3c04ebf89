"""`nla-lens extract / train-av / train-ar` from YAML configs, end to end, on the tiny base model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import LAYER, NEEDS_TL3

import nla_lens as nl
from nla_lens import testing
from nla_lens.cli import main
from nla_lens.training import label_activations, load_activations, save_explanations

pytestmark = NEEDS_TL3


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def test_cli_extracts_trains_and_exports_an_nla_that_loads_with_no_flags(tmp_path, base_folder, extract_config,
                                                                           capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n"
                              for d in testing.tiny_corpus(12, words_per_doc=10)))
    acts = tmp_path / "acts"
    assert main(["extract", _write(tmp_path / "extract.yaml", {
        "base_model": str(base_folder), "corpus": str(corpus), "out_dir": str(acts),
        "extract": dataclasses.asdict(extract_config)})]) == 0
    data = label_activations(load_activations(acts), lambda r: f"the token {r.token.strip()}")
    explanations = save_explanations(data, tmp_path / "explanations.jsonl")

    common = {"base_model": str(base_folder), "activations": str(acts), "explanations": str(explanations),
              "eval_fraction": 0.25, "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1}}
    av_config = _write(tmp_path / "av.yaml", {**common, "out_dir": str(tmp_path / "av"), "n_samples": 2,
                                              "sample_max_new_tokens": 8})
    assert main(["train-av", av_config]) == 0
    assert main(["train-ar", _write(tmp_path / "ar.yaml", {**common, "out_dir": str(tmp_path / "ar")})]) == 0
    out = capsys.readouterr().out
    assert "eval loss" in out and "held-out FVE" in out

    av = nl.ActivationVerbalizer.from_pretrained(tmp_path / "av" / "model")
    ar = nl.ActivationReconstructor.from_pretrained(tmp_path / "ar" / "model")
    assert av.injection_spec == nl.InjectionSpec("karvonen", "blocks.1.hook_resid_post")
    assert (av.meta.layer, ar.meta.layer, ar.model.cfg.n_layers) == (LAYER, LAYER, LAYER + 1)
    round_trip = nl.NLA(av, ar).round_trip(data.vectors[:3], max_new_tokens=8, progress=False)
    assert round_trip.mse.shape == (3,)
    result = json.loads((tmp_path / "ar" / "train_result.json").read_text())
    assert len(result["history"]) == 3 and result["evals"][-1]["baseline_source"] == "paper (held-out targets)"

    # Resuming a finished run from its latest checkpoint runs no further step.
    resumed = yaml.safe_load(Path(av_config).read_text()) | {"resume": "latest"}
    assert main(["train-av", _write(tmp_path / "av_resume.yaml", resumed)]) == 0
    assert len(json.loads((tmp_path / "av" / "train_result.json").read_text())["history"]) == 3


def test_cli_rejects_an_unknown_config_key(tmp_path, capsys):
    config = _write(tmp_path / "bad.yaml", {"base_model": "x", "activations": "y", "explanations": "z",
                                            "out_dir": "o", "trian": {"steps": 1}})
    assert main(["train-ar", config]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "'trian'" in err


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


_REQUIRED = {"extract": {"base_model": "x", "corpus": "y", "out_dir": "o"},
             "train-ar": {"base_model": "x", "activations": "y", "explanations": "z", "out_dir": "o"},
             "train-rl": {"av": "a", "ar": "r", "activations": "y", "explanations": "z", "out_dir": "o"}}


@pytest.mark.parametrize(("command", "section", "value", "message"), [
    ("extract", "extract", {"layer": 1, "batch_size": 0}, "need batch_size >= 1 and docs_per_shard >= 1"),
    ("extract", "extract", {"layer": 1, "docs_per_shard": -1}, "need batch_size >= 1 and docs_per_shard >= 1"),
    ("train-ar", "train", {"weight_decay": -50.0}, "weight_decay must be >= 0"),
    ("train-ar", "train", {"betas": [0.9, 1.5]}, "betas must be two numbers in [0, 1)"),
    ("train-rl", "rl", {"betas": [0.9]}, "betas must be two numbers in [0, 1)"),
    ("train-rl", "rl", {"betas": [0.9, "0.99"]}, "betas must be two numbers in [0, 1)"),
    ("train-rl", "rl", {"betas": 0.9}, "betas must be two numbers in [0, 1)"),
    ("train-rl", "rl", {"clip_eps": 1.5}, "clip_eps must be in (0, 1)"),
    ("train-rl", "rl", {"clip_eps": 0.0}, "clip_eps must be in (0, 1)"),
])
def test_cli_refuses_an_out_of_range_setting_before_anything_loads(tmp_path, capsys, command, section, value,
                                                                   message):
    config = _write(tmp_path / "bad.yaml", {**_REQUIRED[command], section: value})
    assert main([command, config]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and message in err
