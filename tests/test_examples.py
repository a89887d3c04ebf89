"""The example configs in examples/ run as shipped: extract, label, train-av, train-ar, train-rl on the toy base
(TL 3.x); what label.py and the commands say of a wrong call, on both backends."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from conftest import NEEDS_TL3

import nla_lens as nl
from nla_lens.cli import main

ROOT = Path(__file__).parents[1]


@NEEDS_TL3  # extract and the training commands
def test_example_configs_extract_and_train_an_nla_that_loads(tmp_path, monkeypatch, capsys):
    # The configs name paths relative to the repository root; mirror it so outputs land in tmp_path/runs.
    for name in ("examples", "nla_lens"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    assert main(["extract", "examples/extract.yaml"]) == 0
    monkeypatch.setattr(sys, "argv", ["label.py", "runs/activations", "runs/explanations.jsonl"])
    runpy.run_path("examples/label.py", run_name="__main__")
    assert main(["train-av", "examples/train-av.yaml"]) == 0
    assert main(["train-ar", "examples/train-ar.yaml"]) == 0
    out = capsys.readouterr().out
    assert "explanations written to" in out and "eval loss" in out and "held-out FVE" in out

    av = nl.ActivationVerbalizer.from_pretrained(tmp_path / "runs/av/model")
    ar = nl.ActivationReconstructor.from_pretrained(tmp_path / "runs/ar/model")
    assert (av.meta.layer, ar.meta.layer, ar.model.cfg.n_layers) == (3, 3, 4)
    assert av.injection_spec == nl.InjectionSpec("karvonen", "blocks.1.hook_resid_post")
    assert main(["train-rl", "examples/train-rl.yaml"]) == 0
    assert "held-out FVE" in capsys.readouterr().out
    # Strict JSON for readers outside Python: the SFT term is off, so its per-step loss is null, not NaN.
    result = json.loads((tmp_path / "runs/rl/train_result.json").read_text(), parse_constant=_not_json)
    assert [step["sft_loss"] for step in result["history"]] == [None] * 4
    rl_av = nl.ActivationVerbalizer.from_pretrained(tmp_path / "runs/rl/av")
    assert rl_av.meta.raw["stage"] == "rl" and rl_av.injection_spec == av.injection_spec
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["activations", "ar", "av", "explanations.jsonl",
                                                                     "rl"]
    # The README's block that reads these runs, as a newcomer runs it after the examples: it read a
    # runs/rl-lr2e-4 that nothing writes (InputError).
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("To look at a run, finished or still going")[1].split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert sorted(set(namespace["runs"]["run"])) == ["runs/ar", "runs/av", "runs/rl"]
    assert namespace["run"].summary().startswith("train-rl, 4 of 4 steps (finished)")
    assert (tmp_path / "rl-curve.html").is_file()


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} is Python's extension, not JSON")


def test_label_example_says_what_is_wrong_without_a_traceback(tmp_path, monkeypatch, capsys):
    """Run without arguments it raised a TypeError; with a wrong folder, a SidecarError traceback."""
    monkeypatch.setattr(sys, "argv", ["label.py"])
    with pytest.raises(SystemExit) as usage:
        runpy.run_path(str(ROOT / "examples/label.py"), run_name="__main__")
    assert usage.value.code == 2 and "required: activations, out" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["label.py", str(tmp_path / "missing"), str(tmp_path / "out.jsonl")])
    with pytest.raises(SystemExit) as wrong:
        runpy.run_path(str(ROOT / "examples/label.py"), run_name="__main__")
    assert str(wrong.value.code).startswith("SidecarError: ") and "is not an extraction folder" in str(wrong.value.code)


@pytest.mark.parametrize(("command", "example", "meant"), [
    ("train-av", "train-ar.yaml", "train-ar"),  # an AR's keys are all an AV's: only its command: key tells
    ("train-ar", "train-av.yaml", "train-av"),
    ("extract", "train-rl.yaml", "train-rl"),
])
def test_an_example_config_given_to_another_command_names_its_own_before_anything_runs(
        tmp_path, monkeypatch, capsys, command, example, meant):
    """`nla-lens train-av examples/train-ar.yaml` trained an AV into runs/ar on a first run."""
    for name in ("examples", "nla_lens"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    config = f"examples/{example}"
    assert main([command, config]) == 2
    err = capsys.readouterr().err
    assert f"{config}: command: this config is for nla-lens {meant}, not {command}" in err
    assert f"run nla-lens {meant} {config}" in err and not (tmp_path / "runs").exists()
