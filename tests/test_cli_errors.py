"""Wrong input on the command line and in the API: a typed error that says what to do, before any model loads.

Each CLI case runs `main` with the loaders replaced by a tripwire, so a check that ran after the
expensive work fails the test; the command must exit 2 with the message and no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NEEDS_TL3
from safetensors.torch import load_file, save_file

import nla_lens as nl
from nla_lens import backends, loading
from nla_lens.cli import build_parser, main
from nla_lens.testing import save_base_model
from nla_lens.toy import demo
from nla_lens.vector_files import write_vectors


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any model load (AV, AR, base, the toy) fails the test: the checks must come first."""
    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    for owner, name in [(nl.ActivationVerbalizer, "from_pretrained"), (nl.ActivationReconstructor, "from_pretrained"),
                        (backends, "load_model"), (demo, "run_demo")]:
        monkeypatch.setattr(owner, name, tripwire)


def _fails(argv: list[str], capsys, *expected: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"nla-lens {argv[0]}: ")
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture()
def vector_file(tmp_path) -> Path:
    path = tmp_path / "v.safetensors"
    save_file({"vectors": torch.randn(3, 64)}, path)
    return path


def test_the_no_fve_warning_names_the_cli_flag(tiny_paths, vector_file, tmp_path, capsys):
    """The command printed the library's "Pass baseline=": a command-line user passes --baseline."""
    assert main(["round-trip", "--av", str(tiny_paths["av_karvonen"]), "--ar", str(tiny_paths["ar_nanonla"]),
                 "--input", str(vector_file), "--output", str(tmp_path / "s.parquet"), "--max-new-tokens", "4"]) == 0
    assert "no FVE" in (err := capsys.readouterr().err) and "Pass --baseline (metrics.paper_baseline" in err


def test_empty_text(tiny_paths, no_model_loads, capsys):
    av = tiny_paths["av_karvonen"]
    _fails(["verbalize", "--av", av, "--base", av, "--text", ""], capsys, "InputError", "--text is empty")


def test_verbalize_refuses_a_second_text(tiny_paths, no_model_loads, capsys):
    """argparse kept the last --text: the first was dropped without a word."""
    av = tiny_paths["av_karvonen"]
    _fails(["verbalize", "--av", av, "--base", av, "--text", "a cat", "--text", "a dog"], capsys, "InputError",
           "--text was given 2 times; verbalize explains one text", "nla-lens explain")


def test_missing_input_file(tiny_paths, tmp_path, no_model_loads, capsys):
    _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--input", tmp_path / "nope.safetensors"], capsys,
           "InputError", "nope.safetensors does not exist")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".parquet"])
def test_corrupt_input_file(tiny_paths, tmp_path, no_model_loads, capsys, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"not a tensor file" * 8)
    err = _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--input", path], capsys, "InputError",
                 f"cannot be read as a {suffix} file", "save_file")
    assert "weights_only=False" not in err  # torch's advice would run pickled code


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".parquet"])
def test_a_vector_file_that_cannot_be_read_says_permission_denied(tiny_paths, tmp_path, no_model_loads, monkeypatch,
                                                                   capsys, suffix):
    """A file this process may not read (mode 000, another user's) was "No such file or directory" (safetensors) or
    "corrupt or of another format" (.pt): now the OS's error, exit 1 as for every failed file operation. Root reads
    any file, so the denial is the OS's error raised when the file is opened."""
    path = tmp_path / f"v{suffix}"
    path.write_bytes(b"x")
    opened = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    assert main(["verbalize", "--av", str(tiny_paths["av_karvonen"]), "--input", str(path)]) == 1
    assert capsys.readouterr().err == f"nla-lens verbalize: [Errno 13] Permission denied: '{path}'\n"


@pytest.mark.parametrize("device, expected", [
    pytest.param("cuda", "has no CUDA support",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")),
    ("gpu", "torch calls NVIDIA GPUs 'cuda'"),
    ("cuda:x", "is not a torch device"),
    ("meta", "device 'meta' holds no values"),  # loaded, then the first run raised a bare RuntimeError
    ("xla", "device 'xla' cannot hold tensors in this torch"),  # a bare NotImplementedError while loading
])
def test_device_that_cannot_run(tiny_paths, vector_file, no_model_loads, capsys, device, expected):
    _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--input", vector_file, "--device", device], capsys,
           "InputError", expected)
    _fails(["reconstruct", "--ar", tiny_paths["ar_nanonla"], "a cat", "--device", device], capsys, expected)


def test_sampling_settings_name_each_wrong_value_by_its_flag(tiny_paths, vector_file, no_model_loads, capsys):
    """The library names the Python keywords (`top_p=0.0`); the shell user typed flags (`--top-p 0`)."""
    err = _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--input", vector_file, "--temperature", "-1",
                  "--top-p", "0"], capsys, "--temperature -1.0 must be a finite number >= 0",
                 "--top-p 0.0 must be in (0, 1]")
    assert "max_new_tokens" not in err and "batch_size" not in err and "top_p=" not in err
    _fails(["round-trip", "--av", tiny_paths["av_karvonen"], "--ar", tiny_paths["ar_nanonla"], "--input",
            vector_file, "--output", vector_file.with_suffix(".parquet"), "--max-new-tokens", "0"], capsys,
           "--max-new-tokens 0 must be a whole number >= 1")


def test_messages_name_only_this_commands_flags():
    """A keyword that is no flag of the subcommand (a Python-only argument, a sidecar fact) keeps its name."""
    from nla_lens.cli import in_flags

    flags = build_parser().parse_args(["steer-words", "--av", "a", "--ar", "r", "--text", "t", "--edit-to", "e"]).flags
    message = "samples=5, temperature=0.0: pass samples=1; explanations= and n_ctx=64 and rl.samples=2 stay"
    assert in_flags(message, flags) == ("--samples 5, --temperature 0.0: pass --samples 1; explanations= and n_ctx=64 "
                                         "and rl.samples=2 stay")
    explain_flags = build_parser().parse_args(["explain", "--av", "a", "--ar", "r", "--text", "t"]).flags
    assert in_flags("no baseline: pass baseline= (or 32 vectors), baseline=)", explain_flags) == (
        "no baseline: pass --baseline (or 32 vectors), --baseline)")
    bound = "pass samples > 1 (e.g. samples=5), temperature >= 0.5 or rl.samples > 1; samples are text"
    assert in_flags(bound, flags) == ("pass --samples > 1 (e.g. --samples 5), --temperature >= 0.5 or rl.samples > 1; "
                                      "samples are text")


def test_demo_wrong_checkpoint_folder(tmp_path, capsys, monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(backends, "load_model", tripwire)
    _fails(["demo", "--checkpoint", tmp_path], capsys, "CheckpointError", "is not a toy NLA folder",
           "base", "heldout.json")


@pytest.mark.parametrize("sentences", ["0", "-1"])
def test_demo_counts_are_named_as_every_commands_flags_are(capsys, monkeypatch, sentences):
    """demo said `--sentences=0:` where every other command says `--batch-size 0:` (flag, space, value)."""
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("loaded the toy"))
    _fails(["demo", "--sentences", sentences], capsys, "InputError",
           f"--sentences {sentences}: must be a whole number >= 1")
    _fails(["demo", "--max-new-tokens", sentences], capsys, "InputError",
           f"--max-new-tokens {sentences}: must be a whole number >= 1")


def test_demo_html_in_a_missing_folder(tmp_path, no_model_loads, capsys):
    _fails(["demo", "--html", tmp_path / "no" / "such" / "p.html"], capsys, "InputError", "--html",
           "does not exist; create it first")
    _fails(["demo", "--html", tmp_path], capsys, "is a folder")


def test_an_output_under_a_file_says_the_file_is_not_a_folder(tiny_paths, vector_file, tmp_path, no_model_loads,
                                                              capsys):
    """`--output notes.txt/x.parquet` said "the folder notes.txt does not exist" of a file that exists."""
    (tmp_path / "notes.txt").write_text("x")
    notes = tmp_path / "notes.txt"
    _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--input", vector_file, "--output", notes / "x.parquet"],
           capsys, "InputError", f"{notes} is a file, not a folder")

    class Rows(nl.TabularResult):
        def to_records(self):
            return [{"a": 1}]

    with pytest.raises(nl.InputError, match="is a file, not a folder"):
        Rows().save(tmp_path / "notes.txt" / "rows.jsonl")


def test_round_trip_output_that_is_a_folder(tiny_paths, vector_file, tmp_path, no_model_loads, capsys):
    folder = tmp_path / "scores.parquet"
    folder.mkdir()
    _fails(["round-trip", "--av", tiny_paths["av_karvonen"], "--ar", tiny_paths["ar_nanonla"], "--input",
            vector_file, "--output", folder], capsys, "InputError", "is a folder")
    _fails(["round-trip", "--av", tiny_paths["av_karvonen"], "--ar", tiny_paths["ar_nanonla"], "--input",
            vector_file, "--output", tmp_path / "absent" / "s.parquet"], capsys, "does not exist; create it first")
    assert not (tmp_path / "absent").exists()  # no folder made on the way to the error


def test_verbalize_output_checked_before_the_run(tiny_paths, vector_file, tmp_path, no_model_loads, capsys):
    av = tiny_paths["av_karvonen"]
    _fails(["verbalize", "--av", av, "--input", vector_file, "--output", tmp_path / "out.csv"], capsys,
           "must end in .parquet or .jsonl")
    _fails(["verbalize", "--av", av, "--base", av, "--text", "the cat", "--output", tmp_path], capsys, "is a folder")


def test_reconstruct_output_and_input_checked_first(tiny_paths, tmp_path, no_model_loads, capsys):
    ar = tiny_paths["ar_nanonla"]
    _fails(["reconstruct", "--ar", ar, "a cat", "--output", tmp_path / "v.npy"], capsys,
           "must end in .safetensors or .pt")
    _fails(["reconstruct", "--ar", ar, "--input", tmp_path / "nope.txt"], capsys, "nope.txt does not exist")
    _fails(["reconstruct", "--ar", ar], capsys, "no explanations: give them as arguments, or --input FILE")
    _fails(["reconstruct", "--ar", ar, "a cat", "--batch-size", "0"], capsys, "--batch-size 0")
    # Arguments came first and the file's lines after them: vector i was no longer line i's.
    (lines := tmp_path / "e.txt").write_text("the sea\n", encoding="utf-8")
    _fails(["reconstruct", "--ar", ar, "a cat", "--input", lines], capsys, "as arguments or in --input FILE, not both")
    # A slip on a command line (read as <text></text>); the library reads one, as round trips score an AV's empty one
    _fails(["reconstruct", "--ar", ar, "a cat", "  "], capsys, "explanation 1 is empty",
           "as round trips score an AV's empty one, call ar.reconstruct([\"\"]) in Python")


def test_reconstruct_refuses_a_blank_line_that_would_shift_the_vectors(tiny_paths, tmp_path, no_model_loads, capsys):
    """Blank lines were skipped, so vector i of --output was no longer line i's explanation."""
    explanations = tmp_path / "explanations.txt"
    explanations.write_text("a cat\n\nthe sea\n   \na dog\n\n", encoding="utf-8")  # trailing blanks shift nothing
    _fails(["reconstruct", "--ar", tiny_paths["ar_nanonla"], "--input", explanations, "--output",
            tmp_path / "v.safetensors"], capsys, "line(s) [2, 4] are blank", "one explanation on every line")


def test_reconstruct_refuses_a_jsonl_of_explanations(tiny_paths, tmp_path, no_model_loads, capsys):
    """A training explanations file was read line by line: the AR encoded each JSON object, keys and the
    extraction record included, as if it were an explanation."""
    explanations = tmp_path / "explanations.jsonl"
    explanations.write_text('{"extraction": {"rows": 1}}\n{"doc_id": "0", "position": 4, "explanation": "a cat"}\n',
                            encoding="utf-8")
    _fails(["reconstruct", "--ar", tiny_paths["ar_nanonla"], "--input", explanations], capsys, "InputError",
           "holds JSON objects (line 1: ", "not one explanation a line", "['explanation']")


def test_reconstruct_writes_pt_as_a_tensor_file(tiny_paths, ar_nanonla, tmp_path):
    for name in ("v.pt", "v.safetensors"):
        assert main(["reconstruct", "--ar", str(tiny_paths["ar_nanonla"]), "a cat", "--output",
                     str(tmp_path / name)]) == 0
    expected = ar_nanonla.reconstruct(["a cat"])
    assert torch.equal(torch.load(tmp_path / "v.pt", weights_only=True), expected)
    assert torch.equal(load_file(str(tmp_path / "v.safetensors"))["vectors"], expected)



@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder no file can be created in")
@pytest.mark.parametrize("name", ["v.pt", "v.safetensors"])
def test_reconstruct_output_in_a_folder_it_cannot_write_is_refused_before_the_ar_loads(tiny_paths, capsys, name,
                                                                                        no_model_loads):
    _fails(["reconstruct", "--ar", tiny_paths["ar_nanonla"], "a cat", "--output", f"/proc/{name}"], capsys,
           f"--output /proc/{name}: no file can be created in /proc")
    with pytest.raises(OSError, match="No such file"):  # torch.save and save_file raised their own error types
        write_vectors(torch.zeros(2, 4), Path("/proc") / name)  # where the CLI gives a failed write exit 1

def test_checkpoints_given_to_the_wrong_flag(tiny_paths, vector_file, tmp_path, no_model_loads, capsys):
    av, ar = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]  # the nanoNLA AR's sidecar records no role
    err = _fails(["verbalize", "--av", ar, "--input", vector_file], capsys, "InputError", "is an AR",
                 "pass it as --ar")
    assert "ActivationReconstructor" not in err  # a CLI user is told the flag, not the class
    _fails(["round-trip", "--av", av, "--ar", tiny_paths["av_embedding"], "--input", vector_file, "--output",
            tmp_path / "s.parquet"], capsys, "--ar", "is an AV", "pass it as --av")
    _fails(["reconstruct", "--ar", av, "a cat"], capsys, "has no value_head.safetensors", "not an AR")
    _fails(["verbalize", "--av", av, "--base", ar, "--text", "the cat"], capsys, "--base", "is an AR checkpoint")
    _fails(["verbalize", "--av", av, "--base", av, "--text", "the cat", "--layer", "9"], capsys, "InputError",
           f"--layer 9 is outside --base {av}, which has 4 blocks (0-3)")


@pytest.mark.parametrize(("run", "export"), [("av", "model"), ("rl", "av")])
def test_a_training_runs_out_dir_given_as_av_names_its_export(tiny_paths, vector_file, tmp_path, no_model_loads,
                                                             capsys, run, export):
    """`--av runs/av` (the out_dir, not its model/) was told "a base model folder?", which it is not."""
    shutil.copytree(tiny_paths["av_karvonen"], tmp_path / run / export)
    err = _fails(["verbalize", "--av", tmp_path / run, "--input", vector_file], capsys, "SidecarError",
                 f"(a training run's out_dir? Its export: {tmp_path / run / export})")
    assert "base model" not in err


def test_a_base_of_another_width_is_a_pair_mismatch_from_the_cli_and_the_library(tiny_paths, no_model_loads,
                                                                                 capsys):
    """`--base` said PairMismatchError and `nl.load_base` InputError, for the same base of another width."""
    av, ar, wider = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], nl.toy.TOY_DIR / "base"
    _fails(["explain", "--av", av, "--ar", ar, "--base", wider, "--text", "the cat"], capsys, "PairMismatchError",
           f"--base {wider} has d_model 128")
    meta = dataclasses.replace(nl.load_meta(av), base_model=str(wider))
    with pytest.raises(nl.PairMismatchError, match="d_model=128 but the NLA reads 64-d vectors"):
        nl.load_base(meta)


def test_a_base_of_another_vocabulary_names_the_flag_before_any_model_loads(tiny_paths, bos_paths, tmp_path,
                                                                           no_model_loads, capsys):
    """`explain` loaded the NLA and the base, then said to call nl.load_base(nla), which a shell user cannot;
    `verbalize --text` explained the other base's activations without a word."""
    av, ar = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]
    base = shutil.copytree(bos_paths["gemma_av"], tmp_path / "gemma_base")  # the tiny NLA's width and depth
    (base / "nla_meta.yaml").unlink()  # a base model folder has no sidecar
    for command in (["explain", "--av", av, "--ar", ar], ["verbalize", "--av", av]):
        err = _fails([*command, "--base", base, "--text", "the cat"], capsys, "PairMismatchError",
                     f"--base {base} has a tokenizer of another vocabulary than the AV's",
                     "give --base the base model this NLA was trained on, or leave --base out to use the one its "
                     "sidecar names (tiny-qwen3)")
        assert "nl.load_base" not in err


def test_a_sidecar_base_of_another_vocabulary_is_named_as_the_sidecars_not_as_base(tiny_paths, bos_paths, tmp_path,
                                                                                    no_model_loads, capsys):
    """With --base left out, verbalize --text named the sidecar's base_model `--base` and said to leave --base out,
    which is what the user had done; explain loaded the NLA and the base first and said to call nl.load_base."""
    base = shutil.copytree(bos_paths["gemma_av"], tmp_path / "gemma_base")  # the tiny NLA's width and depth
    (base / "nla_meta.yaml").unlink()
    av = _av_naming_base(tiny_paths, tmp_path / "av", base)
    for command in (["verbalize", "--av", av], ["explain", "--av", av, "--ar", tiny_paths["ar_nanonla"]]):
        err = _fails([*command, "--text", "the cat"], capsys, "PairMismatchError",
                     f"the sidecar's base_model {base} has a tokenizer of another vocabulary than the AV's",
                     "give --base the base model this NLA was trained on")
        assert "--base " + str(base) not in err and "leave --base out" not in err and "nl.load_base" not in err


def _av_naming_base(tiny_paths, folder: Path, base: Path | str) -> Path:
    """A copy of the tiny AV whose sidecar names `base` as its base model."""
    av = shutil.copytree(tiny_paths["av_karvonen"], folder)
    meta = yaml.safe_load((av / "nla_meta.yaml").read_text(encoding="utf-8"))
    meta["extraction"]["base_model"] = str(base)
    (av / "nla_meta.yaml").write_text(yaml.safe_dump(meta), encoding="utf-8")
    return av


def test_a_base_without_the_avs_layer_is_a_pair_mismatch_named_as_the_user_gave_it(tiny_paths, tmp_path,
                                                                                   no_model_loads, capsys):
    """A base shallower than the AV's layer K said `--layer 2 is outside the base model's 2 blocks` (an InputError)
    where the user gave no --layer, and from explain, which has no --layer; with --base left out it did not say the
    base was the sidecar's. It is another base than the NLA's, as one of another width is."""
    shallow = save_base_model(tmp_path / "shallow", n_layers=2)  # the tiny NLA's width and vocabulary
    av, ar = _av_naming_base(tiny_paths, tmp_path / "av", shallow), tiny_paths["ar_nanonla"]
    capsys.readouterr()  # the base's save progress
    for command in (["verbalize", "--av", av], ["explain", "--av", av, "--ar", ar]):
        err = _fails([*command, "--text", "the cat"], capsys, "PairMismatchError",
                     f"the sidecar's base_model {shallow} has 2 blocks (0-1), and the AV reads layer 2",
                     "give --base the base model this NLA was trained on")
        assert "--layer" not in err and "leave --base out" not in err
    err = _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--base", shallow, "--text", "the cat"], capsys,
                 "PairMismatchError", f"--base {shallow} has 2 blocks (0-1), and the AV reads layer 2",
                 "leave --base out to use the one its sidecar names")
    assert "--layer" not in err


def test_a_base_deeper_than_the_av_is_a_pair_mismatch_before_any_model_loads(tiny_paths, tmp_path, no_model_loads,
                                                                              capsys):
    """A base of the NLA's width and vocabulary with a block more than the AV (a full copy of its base) is another
    model, whose layer-K residuals the NLA never read: --base and the sidecar's base_model ran with it silently."""
    deep = save_base_model(tmp_path / "deep", n_layers=5)  # the tiny AV has 4 blocks and reads layer 2
    av, ar = _av_naming_base(tiny_paths, tmp_path / "av", deep), tiny_paths["ar_nanonla"]
    capsys.readouterr()  # the base's save progress
    for command in (["verbalize", "--av", av], ["explain", "--av", av, "--ar", ar]):
        err = _fails([*command, "--text", "the cat"], capsys, "PairMismatchError",
                     f"the sidecar's base_model {deep} has 5 blocks (0-4), more than the 4 of the AV, a full copy of "
                     "the base it reads: it is another base", "give --base the base model this NLA was trained on")
        assert "leave --base out" not in err
    _fails(["explain", "--av", tiny_paths["av_karvonen"], "--ar", ar, "--base", deep, "--text", "the cat"], capsys,
           "PairMismatchError", f"--base {deep} has 5 blocks (0-4), more than the 4 of the AV",
           "leave --base out to use the one its sidecar names")


def test_a_base_of_the_first_k_plus_1_blocks_is_taken_as_the_base(tiny_paths, tmp_path, capsys):
    """A base cut short to its first K+1 blocks (captured cheaply) is the same model up to layer K: the check for a
    base deeper than the AV lets it through, and it captures what the whole base does."""
    from transformers import AutoModelForCausalLM

    whole = save_base_model(tmp_path / "whole")  # 4 blocks, as the tiny AV; it reads layer 2
    short = shutil.copytree(whole, tmp_path / "short")
    model = AutoModelForCausalLM.from_pretrained(whole)
    model.model.layers = model.model.layers[:3]
    loading.truncate_config(model.config, 3)
    model.save_pretrained(short)
    capsys.readouterr()  # the base's save progress
    printed = []
    for base in (short, whole):
        assert main(["verbalize", "--av", str(tiny_paths["av_karvonen"]), "--base", str(base), "--text", "the cat",
                     "--max-new-tokens", "2"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[0]


def test_a_sidecar_base_named_by_other_than_its_path_is_named_with_its_folder(tiny_paths, tmp_path, no_model_loads,
                                                                              capsys):
    """A sidecar's base_model that is a name (the toy's, a cached hub id) is shown with the folder it resolved to."""
    av = _av_naming_base(tiny_paths, tmp_path / "av", nl.toy.BASE_MODEL)
    _fails(["verbalize", "--av", av, "--text", "the cat"], capsys, "PairMismatchError",
           f"the sidecar's base_model {nl.toy.BASE_MODEL} (found at {nl.toy.TOY_DIR / 'base'}) has d_model 128")


def test_a_layer_outside_the_sidecars_base_names_that_base_and_the_fix(tiny_paths, tmp_path, no_model_loads, capsys):
    """With --base left out, `--layer 9` was "outside the base model's 4 blocks", as if a base had been given."""
    base = save_base_model(tmp_path / "base")  # 4 blocks, the tiny NLA's width and vocabulary
    av = _av_naming_base(tiny_paths, tmp_path / "av", base)
    capsys.readouterr()  # the base's save progress
    _fails(["verbalize", "--av", av, "--text", "the cat", "--layer", "9"], capsys, "InputError",
           f"--layer 9 is outside the sidecar's base_model {base}, which has 4 blocks (0-3): pass one of those, or "
           "leave --layer out for layer 2, the one this AV reads")


def test_av_as_base_and_another_layer_warn(tiny_paths, capsys):
    av = str(tiny_paths["av_karvonen"])
    assert main(["verbalize", "--av", av, "--base", av, "--text", "the cat", "--layer", "1",
                 "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "nla-lens verbalize: warning: --base" in err and "is an AV checkpoint" in err
    assert "warning: --layer 1 differs from layer 2, the one this AV was trained to read" in err


def test_explain_with_an_av_as_base_warns_once(tiny_paths, capsys):
    av, ar = str(tiny_paths["av_karvonen"]), str(tiny_paths["ar_nanonla"])
    assert main(["explain", "--av", av, "--ar", ar, "--base", av, "--text", "the cat", "--positions", "-1",
                 "--max-new-tokens", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len([w for w in warnings if "checkpoint" in w]) == 1 and "--base" in warnings[0]


def test_base_and_layer_are_refused_beside_an_input_file(tiny_paths, vector_file, no_model_loads, capsys):
    av = tiny_paths["av_karvonen"]
    for extra in (["--layer", "2"], ["--base", av]):
        _fails(["verbalize", "--av", av, "--input", vector_file, *extra], capsys, "InputError",
               "--base and --layer apply to --text")


def test_shards_without_an_output_file_are_refused(tiny_paths, vector_file, no_model_loads, capsys):
    """Without --output the rows are printed from one process: --shards was silently ignored."""
    for flag in (["--shards", "0"], ["--shard-size", "8"]):
        _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--input", vector_file, *flag], capsys,
               "InputError", "give --output FILE too")


def test_shard_flags_are_refused_beside_a_text(tiny_paths, no_model_loads, capsys):
    """A --text is explained in one process: --shard-size was silently ignored there."""
    av = tiny_paths["av_karvonen"]
    _fails(["verbalize", "--av", av, "--text", "the cat", "--shard-size", "8"], capsys, "InputError",
           "--shards, --shard-size and --column apply to --input files")


def test_an_empty_shard_list_is_refused(tiny_paths, vector_file, tmp_path, no_model_loads, capsys):
    """`--shards=""` computed no shard and exited 0."""
    with pytest.raises(SystemExit) as info:
        main(["verbalize", "--av", str(tiny_paths["av_karvonen"]), "--input", str(vector_file), "--output",
              str(tmp_path / "o.parquet"), "--shards="])
    assert info.value.code == 2
    assert "argument --shards: expected at least one shard id" in capsys.readouterr().err


# --- the same checks from Python ---

@pytest.mark.parametrize("bad, expected", [
    ([None], "explanation 0 is None (NoneType), not a string (1 such item). A failed parse"),
    ([123], "explanation 0 is 123 (int)"),
    (["ok", None, None], "explanation 1 is None (NoneType), not a string (2 such items)"),
])
def test_reconstruct_names_the_item_that_is_not_a_string(ar_nanonla, bad, expected):
    with pytest.raises(nl.InputError, match=r"not a string") as info:
        ar_nanonla.reconstruct(bad)
    assert expected in str(info.value)


def test_reconstruct_given_verbalize_output_says_to_pass_the_strings(ar_nanonla):
    out = [nl.Verbalization("<explanation>\nthe cat\n</explanation>", "the cat", [1, 2])]
    with pytest.raises(nl.InputError, match=r"\(Verbalization\), not a string") as info:
        ar_nanonla.reconstruct(out)
    assert "[v.explanation for v in verbalizations if v.explanation is not None]" in str(info.value)


def test_verbalize_names_the_wrong_setting(av_karvonen, vectors):
    with pytest.raises(nl.InputError) as info:
        av_karvonen.verbalize(vectors, temperature=0.5, top_p=1.5, progress=False)
    assert str(info.value) == "top_p=1.5 must be in (0, 1] (1 keeps every token)"


def test_verbalize_names_a_setting_that_is_not_a_number(av_karvonen, vectors):
    """temperature="0.5" (a value read from a config or argv as text) failed in the range comparison with
    TypeError "'<=' not supported between instances of 'int' and 'str'"."""
    with pytest.raises(nl.InputError) as info:
        av_karvonen.verbalize(vectors, temperature="0.5", top_p=True, progress=False)
    assert str(info.value) == ("temperature='0.5' must be a finite number >= 0 (0 is greedy); "
                               "top_p=True must be in (0, 1] (1 keeps every token)")



def test_verbalize_takes_settings_held_in_one_element_tensors(av_karvonen, vectors):
    """A sweep over torch.linspace hands verbalize 0-dim tensors: they decode as their floats (the non-number
    check refused them as "must be a finite number"); a tensor of several values is still refused."""
    settings = dict(max_new_tokens=6, seed=1, progress=False)
    as_floats = av_karvonen.verbalize(vectors, temperature=0.7, top_p=0.9, **settings)
    as_tensors = av_karvonen.verbalize(vectors, temperature=torch.tensor(0.7), top_p=torch.tensor([0.9]), **settings)
    assert [v.text for v in as_tensors] == [v.text for v in as_floats]
    with pytest.raises(nl.InputError, match=r"^temperature=tensor\(\[0\.5000, 0\.7000\]\) must be a finite number"):
        av_karvonen.verbalize(vectors, temperature=torch.tensor([0.5, 0.7]), progress=False)

def test_from_pretrained_takes_dtype_names(tiny_paths):
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype="bfloat16")
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"], dtype="bf16")
    assert av.model.W_E.dtype == ar.model.W_E.dtype == ar.readout.weight.dtype == torch.bfloat16
    with pytest.raises(nl.InputError, match="'float8' is not one nla_lens loads"):
        nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype="float8")


@pytest.mark.parametrize("name", ["float64", "fp64", "double", "torch.float64", "FP64"])
def test_float64_names_load_where_torch_float64_does(tiny_paths, name):
    """torch.float64 loads on the hooked backend (TL 3.x), but its names were refused as no dtype nla_lens loads. The
    bridge (TL 4.x) refuses float64 at load, by name as by torch dtype, saying why."""
    from nla_lens.checks import resolve_dtype

    assert resolve_dtype(name) is torch.float64
    if backends.default_backend() == "hooked":
        av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype=name)
        ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"], dtype=name)
        dtypes = {av.model.W_E.dtype, av.model.cfg.dtype, ar.model.W_E.dtype, ar.readout.weight.dtype}
        assert dtypes == {torch.float64}
        return
    refused = (r"^float64 is not supported on the bridge backend \(TransformerLens 4\.x\): .* use TransformerLens 3\.x "
               r"\(HookedTransformer\) for float64")
    for dtype in (name, torch.float64):
        with pytest.raises(nl.BackendError, match=refused):
            nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype=dtype)


def test_an_integer_dtype_is_refused_before_loading(tiny_paths, monkeypatch):
    """torch.int8 reached the model build: RuntimeError "Only Tensors of floating point ... can require gradients"."""
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for load, folder in [(nl.ActivationVerbalizer.from_pretrained, "av_karvonen"),
                         (nl.ActivationReconstructor.from_pretrained, "ar_nanonla")]:
        with pytest.raises(nl.InputError, match=r"dtype torch\.int8 is not a floating-point dtype.*bfloat16/bf16"):
            load(tiny_paths[folder], dtype=torch.int8)


def test_from_pretrained_rejects_a_device_before_loading(tiny_paths, monkeypatch):
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(nl.InputError, match="torch calls NVIDIA GPUs 'cuda'"):
        nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], device="gpu")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_dtype_is_refused_before_loading(tiny_paths, base_folder, monkeypatch, dtype):
    """float8 is floating point to torch, so it loaded; the first verbalize raised a bare NotImplementedError
    ('"neg_cpu" not implemented for 'Float8_e4m3fn''). nl.load_base refuses it in load_model, before its weights."""
    refused = rf"dtype {dtype} is a storage format torch runs no model in.*bf16"
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for load, folder in [(nl.ActivationVerbalizer.from_pretrained, "av_karvonen"),
                         (nl.ActivationReconstructor.from_pretrained, "ar_nanonla")]:
        with pytest.raises(nl.InputError, match=refused):
            load(tiny_paths[folder], dtype=dtype)
    monkeypatch.undo()
    with pytest.raises(nl.InputError, match=refused):
        nl.load_base(base_folder, dtype=dtype)


@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_the_meta_device_is_refused_before_loading(tiny_paths, base_folder, monkeypatch, device):
    """A model loaded on meta has shapes and no weights: every load succeeded, then verbalize, reconstruct and a
    capture raised bare NotImplementedError / RuntimeError ('Cannot copy out of meta tensor')."""
    refused = "device 'meta' holds no values.*use 'cpu' or 'cuda'"
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for load, paths in [(nl.ActivationVerbalizer.from_pretrained, ["av_karvonen"]),
                        (nl.ActivationReconstructor.from_pretrained, ["ar_nanonla"]),
                        (nl.NLA.from_pretrained, ["av_karvonen", "ar_nanonla"])]:
        with pytest.raises(nl.InputError, match=refused):
            load(*(tiny_paths[name] for name in paths), device=device)
    monkeypatch.undo()
    with pytest.raises(nl.InputError, match=refused):
        nl.load_base(base_folder, device=device)


def test_loading_an_ar_folder_as_an_av_says_so(tiny_paths):
    with pytest.raises(nl.SidecarError, match="is an AR checkpoint, not an AV"):
        nl.ActivationVerbalizer.from_pretrained(tiny_paths["ar_nanonla"])  # was: missing ln_final weights


@pytest.mark.parametrize(("role", "entry", "expected"), [
    ("av_karvonen", ("d_model", 256), "SidecarError: {folder}: the sidecar says d_model=256 but config.json has "
                                      "hidden_size="),
    ("ar_nanonla", ("d_model", 256), "the sidecar belongs to another checkpoint"),
    ("av_karvonen", ("layer_index", 99), "CheckpointError: {folder}: the sidecar reads layer K=99, which needs "
                                         "K+1=100"),
])
def test_a_sidecar_that_contradicts_config_json_is_refused_before_loading(tiny_paths, tmp_path, monkeypatch, capsys,
                                                                          role, entry, expected):
    """A sidecar copied into another checkpoint's folder: `inspect` said ok, and from_pretrained read every
    weight before the AV's d_model check failed."""
    folder = shutil.copytree(tiny_paths[role], tmp_path / role)
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    key, value = entry
    meta["extraction"][key] = value  # the nanoNLA dialect of the tiny checkpoints
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    expected = expected.format(folder=folder)
    loader = nl.ActivationVerbalizer if role.startswith("av") else nl.ActivationReconstructor
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(nl.NLAError) as raised:
        loader.from_pretrained(folder)
    assert expected.split(": ", 1)[-1] in str(raised.value)
    _fails(["inspect", folder], capsys, expected)


def _drop_template(folder: Path, tiny_paths) -> None:
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    meta["prompt_templates"].pop(meta["role"])  # the paper dialect's av / ar
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))


def _truncate_weights(folder: Path, tiny_paths) -> None:
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:5000])


def _grow_tokenizer(folder: Path, tiny_paths) -> None:
    """Another model's tokenizer that still encodes the marker and its neighbours as the sidecar says."""
    tokenizer = loading.load_tokenizer(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(40)])
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize(("role", "damage", "expected"), [
    ("av_karvonen", _grow_tokenizer, "CheckpointError: {folder}: the tokenizer has 420 tokens, but config.json's "
                                     "vocab_size is 380"),
    ("ar_nanonla", _grow_tokenizer, "the tokenizer files are another model's"),
    ("av_embedding", _drop_template, "SidecarError: {folder}/nla_meta.yaml has no AV (actor) prompt template"),
    ("ar_paper", _drop_template, "SidecarError: {folder}/nla_meta.yaml has no AR (critic) prompt template"),
    ("av_karvonen", lambda f, _: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
     "safetensors only, never pickle"),
    ("av_karvonen", _truncate_weights, "model.safetensors ends early"),
    ("av_karvonen", lambda f, paths: shutil.copy(paths["ar_nanonla"] / "config.json", f / "config.json"),
     "a block past the 3 of"),
    ("ar_paper", lambda f, _: (f / "value_head.safetensors").unlink(), "has no value_head.safetensors"),
], ids=["av_tokenizer", "ar_tokenizer", "av_template", "ar_template", "pickle", "truncated", "ar_config_in_av",
         "no_readout"])
def test_inspect_refuses_what_from_pretrained_refuses_before_the_weights(tiny_paths, tmp_path, monkeypatch, capsys,
                                                                         role, damage, expected):
    """Each damage is refused before the weights, by from_pretrained and `nla-lens inspect` alike; inspect said ok
    on all of them, and from_pretrained loaded another model's (larger) tokenizer."""
    folder = shutil.copytree(tiny_paths[role], tmp_path / role)
    damage(folder, tiny_paths)
    expected = expected.format(folder=folder)
    loader = nl.ActivationVerbalizer if role.startswith("av") else nl.ActivationReconstructor
    with pytest.raises(nl.NLAError, match=re.escape(expected.split(": ", 1)[-1])):
        loader.from_pretrained(folder)
    _fails(["inspect", folder], capsys, expected)


@pytest.mark.parametrize("broken", ["missing", "corrupt", "gone"])
def test_a_checkpoint_without_a_readable_tokenizer_is_a_checkpoint_error(tiny_paths, tmp_path, capsys, broken):
    """Was transformers' ValueError traceback (missing or corrupt tokenizer.json), or, with no tokenizer
    files at all, an empty tokenizer from config.json whose marker then 'drifted'."""
    folder = tmp_path / "av"
    shutil.copytree(tiny_paths["av_karvonen"], folder)
    if broken == "corrupt":
        (folder / "tokenizer.json").write_text("{garbage")
    else:
        (folder / "tokenizer.json").unlink()
    if broken == "gone":
        for name in ("tokenizer_config.json", "vocab.json", "tokenizer.model"):
            (folder / name).unlink(missing_ok=True)
    with pytest.raises(nl.CheckpointError, match="copy the tokenizer files saved with the checkpoint"):
        nl.ActivationVerbalizer.from_pretrained(folder)
    _fails(["inspect", folder], capsys, "CheckpointError", str(folder))


def test_missing_checkpoint_points_at_the_hf_command(tmp_path):
    with pytest.raises(nl.CheckpointError, match=r"\(hf download no-such/model\)") as info:
        loading.resolve_checkpoint("no-such/model")
    assert "huggingface-cli" not in str(info.value)


def test_a_typo_in_a_checkpoint_path_is_no_such_folder(no_model_loads, monkeypatch, capsys):
    monkeypatch.chdir(nl.toy.TOY_DIR.parents[2])
    err = _fails(["explain", "--av", "nla_lens/toy/checkpoints/avv", "--ar", "nla_lens/toy/checkpoints/ar",
                  "--text", "the cat"], capsys, "CheckpointError: 'nla_lens/toy/checkpoints/avv': no such folder",
                 "did you mean nla_lens/toy/checkpoints/av?")
    assert "hf download" not in err


def test_round_trip_checks_the_reconstruct_batch_before_verbalizing(av_karvonen, ar_nanonla, vectors, monkeypatch):
    monkeypatch.setattr(av_karvonen, "verbalize", lambda *a, **k: pytest.fail("verbalized first"))
    with pytest.raises(nl.InputError, match="reconstruct_batch_size=0"):
        nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, reconstruct_batch_size=0)


@NEEDS_TL3  # on the bridge every training command refuses once its YAML is read (test_backends pins it)
@pytest.mark.parametrize("command, config, expected", [
    ("extract", {"corpus": "no/corpus.jsonl", "out_dir": "acts", "extract": {"layer": 1}}, "corpus no/corpus.jsonl"),
    ("train-av", {"activations": "no/acts", "explanations": "e.jsonl", "out_dir": "av"}, "nla-lens extract writes"),
    ("train-ar", {"activations": ".", "explanations": "no/e.jsonl", "out_dir": "ar"}, "explanations no/e.jsonl"),
    ("train-ar", {"activations": ".", "explanations": ".", "out_dir": "ar", "device": "gpu"}, "NVIDIA GPUs 'cuda'"),
])
def test_training_configs_are_checked_before_loading(tmp_path, no_model_loads, monkeypatch, capsys, command,
                                                     config, expected):
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base_model": "base", **config}), encoding="utf-8")
    _fails([command, "c.yaml"], capsys, expected)


def test_bench_device_is_checked_first(capsys):
    _fails(["bench", "--device", "gpu"], capsys, "InputError", "NVIDIA GPUs 'cuda'")


def test_dtype_names_reach_every_loader(tiny_paths):
    base = backends.load_model(tiny_paths["av_karvonen"], loading.load_tokenizer(tiny_paths["av_karvonen"]),
                               dtype="float16", device="cpu")
    assert base.W_E.dtype == torch.float16


def test_load_model_without_a_tokenizer_says_how_to_load_one(tiny_paths):
    """None (a forgotten tokenizer) or the folder again was an AttributeError on 'bos_token_id'."""
    folder = tiny_paths["av_karvonen"]
    for bad, kind in [(None, "NoneType"), (str(folder), "str")]:
        with pytest.raises(nl.InputError, match=rf"tokenizer must be a loaded tokenizer, got {kind}; pass "
                                                r"loading\.load_tokenizer\(folder\)"):
            backends.load_model(folder, bad, dtype="float32", device="cpu")


def test_a_numpy_input_file_is_told_how_to_convert_it(tiny_paths, tmp_path, no_model_loads, capsys):
    path = tmp_path / "vectors.npy"
    path.write_bytes(b"\x93NUMPY")
    _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--input", path], capsys, "InputError",
           "expected a .safetensors, .pt or .parquet file", "torch.from_numpy(numpy.load(path)).float()")


def test_explain_checks_the_roles_of_its_folders_first(tiny_paths, no_model_loads, capsys):
    av, ar = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]
    _fails(["explain", "--av", ar, "--ar", ar, "--text", "the cat"], capsys, "--av", "pass it as --ar")
    _fails(["explain", "--av", av, "--ar", av, "--text", "the cat"], capsys, "--ar", "not an AR")
    _fails(["explain", "--av", av, "--ar", ar, "--base", ar, "--text", "the cat"], capsys, "--base",
           "is an AR checkpoint")


def test_explain_output_errors_name_the_flag(tiny_paths, tmp_path, no_model_loads, capsys):
    """They said "output .../x.html" (the library's `save` wording), not the flag the user typed."""
    av, ar = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]
    _fails(["explain", "--av", av, "--ar", ar, "--text", "the cat", "--output", tmp_path / "absent" / "x.html"],
           capsys, f"InputError: --output {tmp_path / 'absent' / 'x.html'}: ", "does not exist; create it first")
    _fails(["explain", "--av", av, "--ar", ar, "--text", "the cat", "--output", tmp_path / "x.csv"], capsys,
           f"InputError: --output {tmp_path / 'x.csv'}: save to a .parquet or .jsonl file")


TOY_AV, TOY_AR = nl.toy.TOY_DIR / "av", nl.toy.TOY_DIR / "ar"


@pytest.mark.parametrize(("flags", "expected"), [
    (["--baseline", "-1"], "InputError: --baseline -1.0 must be a positive finite number"),
    (["--baseline", "nan"], "InputError: --baseline nan must be a positive finite number"),
    (["--positions", "4"], "InputError: position 4 is outside text 1 ('Thou art') of 3 tokens (0..2"),
    (["--positions", "5:9"], "InputError: positions 5:9 select no token of text 1 ('Thou art') of 3 tokens"),
], ids=["negative-baseline", "nan-baseline", "position-outside", "empty-slice"])
def test_explain_checks_baseline_and_positions_before_any_model_loads(no_model_loads, capsys, flags, expected):
    """A bad --baseline or --positions was met only inside nla.explain: after the AV, the AR and the base model
    had loaded and the base had run (minutes for an 8B pair), and the baseline was named `baseline`, not its flag."""
    _fails(["explain", "--av", TOY_AV, "--ar", TOY_AR, "--text", "Romeo: wherefore art thou", "--text", "Thou art",
            *flags], capsys, expected)


def test_steer_words_checks_positions_before_any_model_loads(no_model_loads, capsys):
    """--positions outside a text was refused only after the AV, the AR and the base model had loaded."""
    _fails(["steer-words", "--av", TOY_AV, "--ar", TOY_AR, "--text", "Romeo: wherefore art thou", "--text", "Thou art",
            "--replace", "a", "b", "--positions", "3"], capsys,
           "InputError: --positions 3 is outside text 1, which is 3 tokens (0..2, or -3..-1 from its last)")


def test_text_files_that_are_not_utf8_are_input_errors(tiny_paths, tmp_path, no_model_loads, monkeypatch, capsys):
    """A UTF-16 file (what Windows PowerShell's `>` writes) was a UnicodeDecodeError traceback in every reader
    but `explain --file`."""
    from nla_lens.training import label_activations
    from nla_lens.training.pipeline import read_corpus

    utf16 = tmp_path / "utf16.txt"
    utf16.write_text('{"id": "a", "text": "a cat"}\n', encoding="utf-16")
    _fails(["reconstruct", "--ar", tiny_paths["ar_nanonla"], "--input", utf16], capsys, "InputError",
           "is not UTF-8 text")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("base_model: base\ncorpus: c.jsonl\n", encoding="utf-16")
    _fails(["extract", "c.yaml"], capsys, "ConfigError", "c.yaml is not UTF-8 text")
    with pytest.raises(nl.InputError, match="corpus .* is not UTF-8 text"):
        read_corpus(utf16)
    with pytest.raises(nl.InputError, match="explanations .* is not UTF-8 text"):
        label_activations(None, utf16)  # the file is read before any row is looked at


_DEFAULT_ID = (" (line {line} has no 'id', so its id is its line index counted from 0, and ids compare as text: 1 "
               "and \"1\" are one id)")


@pytest.mark.parametrize(("lines", "repeated", "default_on"), [
    ([{}, {}, {"id": 1}], "3: document id '1' is line 2's too", 2),  # line 2's id is its index, 1
    ([{"id": "1"}, {}], "2: document id '1' is line 1's too", 2),
    ([{"id": "2"}, None, {}], "3: document id '2' is line 1's too", 3),  # the blank line 2 counts
    ([{"id": "a"}, {"id": "a"}], "2: document id 'a' is line 1's too", None),
])
def test_a_repeated_document_id_says_when_one_line_took_its_line_index_as_id(tmp_path, lines, repeated, default_on):
    """A corpus mixing lines with and without ids collided (id 1, and no id on line 2) with no word of where the
    line without one got its id."""
    from nla_lens.training.pipeline import read_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join("\n" if row is None else json.dumps({**row, "text": "a cat"}) + "\n" for row in lines))
    default = "" if default_on is None else _DEFAULT_ID.format(line=default_on)
    with pytest.raises(nl.InputError) as info:
        read_corpus(corpus)
    assert str(info.value) == (f"{corpus}:{repeated}{default}; give every document its own id (splits are made by "
                               "document)")


def test_a_null_document_id_is_the_line_index_as_a_missing_one_is(tmp_path):
    """`{"id": null}` was the document id "None": every such line one document, whatever its text."""
    from nla_lens.training.pipeline import read_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({**row, "text": "a cat"}) + "\n" for row in [{"id": None}, {}, {"id": None}]))
    assert [doc.id for doc in read_corpus(corpus)] == ["0", "1", "2"]
    corpus.write_text("".join(json.dumps({**row, "text": "a cat"}) + "\n" for row in [{"id": None}, {"id": 0}]))
    with pytest.raises(nl.InputError, match=re.escape("document id '0' is line 1's too (line 1 has 'id': null, so "
                                                      "its id is its line index counted from 0")):
        read_corpus(corpus)


@pytest.mark.parametrize(("first", "second"), [(1, "1"), ("1", 1)], ids=["number-then-string", "string-then-number"])
def test_two_given_ids_that_are_one_as_text_say_that_ids_compare_as_text(tmp_path, first, second):
    """Ids 1 and "1" collided with no word of why two different ids were one."""
    from nla_lens.training.pipeline import read_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": "a cat"}) + "\n" for i in (first, "x", second)))
    with pytest.raises(nl.InputError) as info:
        read_corpus(corpus)
    assert str(info.value) == (f"{corpus}:3: document id {str(first)!r} is line 1's too (ids compare as text: line "
                               f"1's {json.dumps(first)} and line 3's {json.dumps(second)} are one id); give every "
                               "document its own id (splits are made by document)")


@pytest.mark.parametrize("given", [1.0, True, [1], {"n": 1}], ids=["float", "bool", "list", "object"])
def test_an_id_that_is_neither_a_string_nor_an_integer_is_refused_with_its_line(tmp_path, given):
    """1.0, true or [1] became the ids "1.0", "True", "[1]": strings the corpus never wrote."""
    from nla_lens.training.pipeline import read_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": "a cat"}) + "\n" for i in ("a", given)))
    with pytest.raises(nl.InputError, match=re.escape(f"{corpus}:2: 'id' must be a string or an integer, got "
                                                      f"{json.dumps(given)}")):
        read_corpus(corpus)


def test_inspect_of_an_extraction_folder_says_it_is_one(dataset_meta, tmp_path, capsys):
    """It printed the sidecar, then asked for tokenizer files to be copied into the folder."""
    folder = tmp_path / "activations"
    (folder / "shards").mkdir(parents=True)
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(dataset_meta.raw, allow_unicode=True), encoding="utf-8")
    _fails(["inspect", folder], capsys, "InputError", "is an extraction (nla-lens extract wrote it",
           "nla_lens.training.load_activations")


def _extraction(folder: Path, raw: dict, layer: int) -> Path:
    """An `nla-lens extract` folder as it lies on disk: the dataset sidecar and one shard of vectors."""
    raw = {**raw, "extraction": {**raw["extraction"], "layer_index": layer}}
    (folder / "shards").mkdir(parents=True)
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    shard = folder / "shards" / "acts-00000.safetensors"
    save_file({"vectors": torch.randn(3, 64), "positions": torch.arange(3)}, shard)
    return folder


def test_an_extraction_shard_of_another_layer_is_refused(dataset_meta, tiny_paths, tmp_path, no_model_loads, capsys):
    """A layer-1 shard given to a layer-2 AV of the same width was explained without a word."""
    shard = _extraction(tmp_path / "acts", dataset_meta.raw, layer=1) / "shards" / "acts-00000.safetensors"
    for job in (["--output", tmp_path / "out.parquet"], []):  # the sharded file job and the printed one
        _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--input", shard, *job], capsys, "InputError",
               "holds layer-1 vectors", "the AV explains layer 2")
    _fails(["round-trip", "--av", tiny_paths["av_karvonen"], "--ar", tiny_paths["ar_nanonla"], "--input", shard,
            "--output", tmp_path / "rt.parquet"], capsys, "InputError", "holds layer-1 vectors")
    _fails(["verbalize", "--av", tiny_paths["av_karvonen"], "--input", tmp_path / "acts"], capsys, "InputError",
           "is an extraction folder, not a vector file", "acts-*.safetensors")


def test_an_extraction_shard_of_the_avs_layer_is_explained(dataset_meta, tiny_paths, tmp_path, capsys):
    shard = _extraction(tmp_path / "acts", dataset_meta.raw, layer=2) / "shards" / "acts-00000.safetensors"
    assert dataset_meta.base_model == "tiny"  # the tiny AV's sidecar names another base: the mix is warned of
    assert main(["verbalize", "--av", str(tiny_paths["av_karvonen"]), "--input", str(shard),
                 "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and "was extracted from base 'tiny' and the AV trained from 'tiny-qwen3'" in err


@pytest.mark.parametrize(("line", "message"), [
    ({"id": "a", "content": "a cat"}, "expected a JSON object with a 'text' key, but its keys are ['content', 'id']; "
                                      "write each line as {\"id\": ..., \"text\": ...} (rename the key that holds "
                                      "the document's text to 'text')"),
    (["a cat"], 'holds ["a cat"], not a JSON object; write each line as {"id": ..., "text": ...}'),
    ('{"text": "a cat"', "not JSON (Expecting ',' delimiter at character 18); write each line as "
                         '{"id": ..., "text": ...}'),
], ids=["other-key", "not-an-object", "not-json"])
def test_a_corpus_line_without_text_names_what_it_holds_and_the_fix(tmp_path, line, message):
    """A line keyed "content" was "expected a JSON object with a 'text' key ('text')": a KeyError's repr, with
    neither the line's keys nor what to write; a line that is not JSON ended in Python's words."""
    from nla_lens.training.pipeline import read_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "first", "text": "a dog"}) + "\n" + (
        line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(nl.InputError) as info:
        read_corpus(corpus)
    assert str(info.value) == f"{corpus}:2: {message}"


@pytest.mark.parametrize(("command", "example", "meant"), [
    ("train-rl", "train-av.yaml", "train-av"),
    ("train-ar", "train-av.yaml", "train-av"),
    ("extract", "train-ar.yaml", "train-ar"),
    ("train-av", "extract.yaml", "extract"),
])
@pytest.mark.parametrize("declared", [True, False], ids=["command-key", "keys-only"])
def test_a_config_written_for_another_training_command_names_that_command(tmp_path, capsys, command, example, meant,
                                                                          declared):
    """`nla-lens train-rl examples/train-av.yaml` listed the AV's keys as unknown, with no word that the file was
    a sound config for another command. The shipped examples say which command they are for (`command:`); a
    config written before that key is told by its keys."""
    config = Path(__file__).parents[1] / "examples" / example
    if not declared:
        text = config.read_text(encoding="utf-8")
        config = tmp_path / example
        config.write_text("".join(line for line in text.splitlines(keepends=True) if not line.startswith("command:")))
    problem = f"command: this config is for nla-lens {meant}, not {command}" if declared else "unknown key(s)"
    _fails([command, config], capsys, "ConfigError", f"{config}: {problem}",
           f"{config} reads as a config for nla-lens {meant}: run nla-lens {meant} {config}, or give nla-lens "
           f"{command} its own config")


def test_a_config_that_fits_no_command_is_refused_without_naming_one(tmp_path, capsys):
    config = tmp_path / "av.yaml"
    config.write_text((Path(__file__).parents[1] / "examples" / "train-av.yaml").read_text() + "epochs: 3\n")
    err = _fails(["train-av", config], capsys, "ConfigError", "unknown key(s) ['epochs']")
    assert "reads as a config for" not in err


@pytest.mark.parametrize("text", ["", "# base_model: my/base\n"], ids=["empty", "only-comments"])
def test_an_empty_config_says_it_is_empty(tmp_path, capsys, text):
    """It said "expected a mapping for ExtractRunConfig, got NoneType"."""
    config = tmp_path / "extract.yaml"
    config.write_text(text, encoding="utf-8")
    _fails(["extract", config], capsys, "ConfigError", f"config {config} is empty (or only comments); write the run's "
           "keys in it (examples/ has a config for each command)")


LONG_TEXT = "the king is dead " * 100  # past the toy base's context of 256 tokens


@pytest.mark.parametrize("command", [
    ["verbalize", "--av", TOY_AV, "--text", LONG_TEXT],
    ["explain", "--av", TOY_AV, "--ar", TOY_AR, "--text", "Thou art", "--text", LONG_TEXT],
    ["steer-words", "--av", TOY_AV, "--ar", TOY_AR, "--text", "Thou art", "--text", LONG_TEXT, "--replace", "a", "b"],
], ids=["verbalize", "explain", "steer-words"])
def test_a_text_past_the_base_context_is_refused_before_any_model_loads(command, monkeypatch, capsys):
    """verbalize --text, explain and steer-words met a text too long for the base only once the base had loaded
    (explain, steer-words: the AV and the AR too). They check it against the context in the base's config.json
    first, in the words of the check after the load, which still stands (here it is what a config without
    max_position_embeddings meets)."""
    from nla_lens import commands

    with monkeypatch.context() as patched:
        patched.setattr(commands, "_config_context", lambda folder: None, raising=False)
        late = _fails(command, capsys, "PromptTooLongError: ")
    with monkeypatch.context() as patched:
        def tripwire(*args, **kwargs):
            raise AssertionError("a model was loaded before the bad input was reported")

        for owner, name in [(nl.ActivationVerbalizer, "from_pretrained"), (backends, "load_model")]:
            patched.setattr(owner, name, tripwire)
        assert _fails(command, capsys, "PromptTooLongError: ") == late
    assert re.search(r"PromptTooLongError: (--text|text 1 \('the king is dead the king is …'\)) is \d+ tokens, over "
                     r"the base model's context of 256; (pass a shorter text|split it into shorter texts)\n$", late)


@pytest.mark.parametrize(("command", "flag", "name"), [
    (["verbalize", "--av", TOY_AV, "--text", "Thou art"], "--output", "rows.parquet"),
    (["explain", "--av", TOY_AV, "--ar", TOY_AR, "--text", "Thou art"], "--output", "view.html"),
    (["reconstruct", "--ar", TOY_AR, "a king"], "--output", "vectors.safetensors"),
    (["steer-words", "--av", TOY_AV, "--ar", TOY_AR, "--text", "Thou art", "--replace", "a", "b"], "--output",
     "steering.jsonl"),
    (["steer-words", "--av", TOY_AV, "--ar", TOY_AR, "--text", "Thou art", "--replace", "a", "b"], "--save-vectors",
     "steering.safetensors"),
], ids=["verbalize", "explain", "reconstruct", "steer-words", "steer-words-vectors"])
def test_an_output_that_is_a_symlink_loop_is_refused_before_any_model_loads(command, flag, name, tmp_path,
                                                                            no_model_loads, capsys):
    """check_output_path passed a link that leads round a loop (exists() and is_dir() call it absent): the command
    ran, then its write's Path.resolve raised a bare RuntimeError ("Symlink loop from ...")."""
    link = tmp_path / name
    link.symlink_to(name)
    _fails([*command, flag, link], capsys, f"InputError: {flag} {link} is a symlink that leads round a loop of "
                                           "links, so there is no file there to write into: point it at a file, or "
                                           "remove it")
    assert [(p.name, os.readlink(p)) for p in tmp_path.iterdir()] == [(name, name)]


def test_explain_of_a_text_that_is_only_its_bos_names_it_before_any_model_loads(bos_paths, no_model_loads, capsys):
    """`nla-lens explain --text "<bos>"` explained the BOS, which it leaves out of every other text."""
    av, ar = bos_paths["gemma_av"], bos_paths["gemma_ar"]
    _fails(["explain", "--av", av, "--ar", ar, "--base", av, "--text", "the cat", "--text", "<bos>"], capsys,
           "InputError", "text 1 ('<bos>') has no token past its BOS, which is left out by default")
    _fails(["verbalize", "--av", av, "--base", av, "--text", "<bos>"], capsys, "InputError",
           "--text '<bos>' has no token past its BOS, which is left out by default")


def _base_putting_no_bos_first(gemma_av: Path, folder: Path) -> Path:
    """The tiny Gemma AV as a base folder whose tokenizer puts no BOS first: the BOS comes from tokenizer.json's
    post_processor (a TemplateProcessing), not from add_bos_token, so that is what is edited."""
    base = shutil.copytree(gemma_av, folder)
    (base / "nla_meta.yaml").unlink()  # a base model folder has no sidecar
    spec = json.loads((base / "tokenizer.json").read_text())
    text_a, text_b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [text_a], "pair": [text_a, text_b],
                              "special_tokens": {}}
    (base / "tokenizer.json").write_text(json.dumps(spec))
    return base


def test_a_base_tokenizer_with_another_bos_rule_is_refused_before_any_model_loads(bos_paths, tmp_path, no_model_loads,
                                                                                  capsys):
    """`nla-lens explain` refused such a base only after the AV, the AR and the base had all loaded (explain's
    check_bos_rule); `verbalize --text` and `steer-words` ran on its BOS-less texts without a word."""
    av, ar = bos_paths["gemma_av"], bos_paths["gemma_ar"]
    base = _base_putting_no_bos_first(av, tmp_path / "base")
    from nla_lens.loading import prepends_bos

    assert not prepends_bos(loading.load_tokenizer(base)) and prepends_bos(loading.load_tokenizer(av))
    for command in (["explain", "--av", av, "--ar", ar], ["verbalize", "--av", av],
                    ["steer-words", "--av", av, "--ar", ar, "--replace", "cat", "dog"]):
        _fails([*command, "--base", base, "--text", "the cat"], capsys, "PairMismatchError",
               f"--base {base} has a tokenizer that puts no BOS first and the NLA's tokenizer does: its texts would "
               "not be tokenized as the NLA's training texts were; give --base the base model this NLA was trained on")
