"""The `nla-lens` subcommands over the tiny fixtures: thin layers that give the library's numbers."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import NEEDS_TL3
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import nla_lens as nl
from nla_lens import loading, shard_store
from nla_lens.checks import DTYPES
from nla_lens.cli import build_parser, main
from nla_lens.sidecar import load_meta


def test_verbalize_from_a_vector_file_matches_the_library(av_karvonen, tiny_paths, vectors, tmp_path, capsys):
    save_file({"vectors": vectors}, tmp_path / "v.safetensors")
    out = tmp_path / "out.jsonl"
    assert main(["verbalize", "--av", str(tiny_paths["av_karvonen"]), "--vectors", str(tmp_path / "v.safetensors"),
                 "--max-new-tokens", "6", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = av_karvonen.verbalize(vectors, max_new_tokens=6, progress=False)
    assert [r["text"] for r in rows] == [v.text for v in expected]
    assert capsys.readouterr().out.startswith(f"wrote 4 rows to {out}")  # a summary, not every row
    torch.save(vectors, tmp_path / "v.pt")
    assert main(["verbalize", "--av", str(tiny_paths["av_karvonen"]), "--vectors", str(tmp_path / "v.pt"),
                 "--max-new-tokens", "6"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(vectors)


def test_verbalize_text_explains_the_avs_layer_at_every_position_of_the_base(av_karvonen, base, tiny_paths, capsys):
    from nla_lens.display import format_cell, visible_token

    folder = str(tiny_paths["av_karvonen"])
    assert main(["verbalize", "--av", folder, "--base", folder, "--text", "the cat sat", "--max-new-tokens", "3"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.encode("the cat sat")
    lines = capsys.readouterr().out.strip().splitlines()
    # One line per position: index, the token it explains, the explanation.
    expected = [[str(i), visible_token(tokenizer.decode([t]))] for i, t in enumerate(ids)]
    assert [line.split("\t")[:2] for line in lines] == expected
    # The explanations are of the AV's own layer (no --layer given), captured here with a plain TL forward.
    hook = f"blocks.{av_karvonen.meta.layer}.hook_resid_post"
    with torch.inference_mode():
        _, cache = base.run_with_cache(torch.tensor([ids]), names_filter=hook)
    assert av_karvonen.meta.layer != 0  # so that the default layer is told apart from layer 0
    # Greedy and deterministic: the tiny AV's babble is the same string for the same vector, compared exactly.
    explained = av_karvonen.verbalize(cache[hook][0].float(), max_new_tokens=3, progress=False)
    failed = {True: "(cut at max_new_tokens before </explanation>) ", False: "(no <explanation> tags) "}
    shown = [format_cell(v.explanation if v.explanation is not None else failed[v.truncated] + v.text)
             for v in explained]
    assert [line.split("\t", 2)[2] for line in lines] == shown


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_verbalize_text_output_names_the_text_each_row_explains(tiny_paths, tmp_path, suffix):
    """`verbalize --text --output` wrote each row's `position` and `token` but not the text: a file read back later
    did not say what it explains. Its rows hold `input_text`, as `explain`'s do."""
    folder, text, out = str(tiny_paths["av_karvonen"]), "the cat sat", tmp_path / f"out{suffix}"
    assert main(["verbalize", "--av", folder, "--base", folder, "--text", text, "--max-new-tokens", "2",
                 "--output", str(out)]) == 0
    frame = nl.read_result(out)
    ids = AutoTokenizer.from_pretrained(folder).encode(text)
    assert list(frame["position"]) == list(range(len(ids))) and list(frame["input_text"]) == [text] * len(ids)
    assert list(frame.columns[:4]) == ["index", "input_text", "position", "token"]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_verbalize_text_output_reads_back_as_the_verbalizations_python_saves(av_karvonen, base, tiny_paths, tmp_path,
                                                                             suffix):
    """`verbalize --text --output` wrote a file job's rows with no record: `nl.read_result` gave no result type,
    summary or warnings, and refused `result_type=nl.Verbalizations`, where `verbalize(...).save(...)` reads back
    as Verbalizations. Its rows are now verbalize's, with the text, position and token each explains after the
    index."""
    import pandas as pd

    folder, text, out = str(tiny_paths["av_karvonen"]), "the cat sat", tmp_path / f"out{suffix}"
    assert main(["verbalize", "--av", folder, "--base", folder, "--text", text, "--max-new-tokens", "2",
                 "--output", str(out)]) == 0
    ids = AutoTokenizer.from_pretrained(folder).encode(text)  # no BOS: every position is explained
    hook = f"blocks.{av_karvonen.meta.layer}.hook_resid_post"
    with torch.inference_mode():
        _, cache = base.run_with_cache(torch.tensor([ids]), names_filter=hook)
    expected = av_karvonen.verbalize(cache[hook][0].float(), max_new_tokens=2, progress=False)
    saved = nl.read_result(expected.save(tmp_path / f"python{suffix}"), result_type=nl.Verbalizations)
    frame = nl.read_result(out, result_type=nl.Verbalizations)
    context = ["input_text", "position", "token"]
    assert list(frame.columns) == ["index", *context, *saved.columns[1:]]
    pd.testing.assert_frame_equal(frame.drop(columns=context), saved)
    assert frame.attrs == saved.attrs
    if suffix == ".parquet":  # read without naming the type, as the Python file reads
        assert nl.read_result(out).attrs == saved.attrs
        assert saved.attrs["result_type"] == "Verbalizations" and saved.attrs["summary"] == expected.summary()


def test_verbalize_text_prints_tokens_and_explanations_as_explain_does(tiny_paths, capsys, monkeypatch):
    """Tokens were printed as Python reprs (`' '`, `'\\n'`) where `explain` and the views draw ␣ and ↵, and an
    explanation holding a newline split its row in two."""
    from nla_lens.verbalizer import ActivationVerbalizer, Verbalization, Verbalizations

    said = [Verbalization("<explanation>\ntwo\nlines\n</explanation>", "two\nlines", [1]),
            Verbalization("raw\rtext", None, [2]), Verbalization("<explanation>\ncut", None, [3], truncated=True)]
    monkeypatch.setattr(ActivationVerbalizer, "verbalize",
                        lambda self, vectors, **kw: Verbalizations(said[i % 3] for i in range(len(vectors))))
    folder = str(tiny_paths["av_karvonen"])
    assert main(["verbalize", "--av", folder, "--base", folder, "--text", "the  cat\n\tsat"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    # The tiny tokenizer: t, he, " ", " cat", "\n", "\t", s, at (as in the explain test)
    assert [row[1] for row in rows] == ["t", "he", "\u2423", " cat", "\u21b5", "\\t", "s", "at"]
    assert [row[2] for row in rows[:3]] == ["two\\nlines", "(no <explanation> tags) raw\\rtext",
                                            "(cut at max_new_tokens before </explanation>) <explanation>\\ncut"]
    assert [len(row) for row in rows] == [3] * 8


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_verbalize_text_leaves_out_the_bos_the_tokenizer_puts_first_as_explain_does(bos_paths, family, tmp_path,
                                                                                    capsys):
    """`verbalize --text` explained the BOS row too, which `explain` leaves out (a BOS residual is an attention
    sink with a huge norm: its explanation is noise)."""
    from nla_lens.display import visible_token
    from nla_lens.explain import select_positions
    from nla_lens.sidecar import text_ids

    folder = str(bos_paths[f"{family}_av"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = text_ids(tokenizer, "the cat sat")
    assert ids[0] == tokenizer.bos_token_id
    explained = select_positions(None, len(ids), skip=1)  # explain's default for a BOS-first text
    assert explained == list(range(1, len(ids)))
    assert main(["verbalize", "--av", folder, "--base", folder, "--text", "the cat sat", "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr()
    rows = [line.split("\t")[:2] for line in printed.out.strip().splitlines()]
    assert rows == [[str(p), visible_token(tokenizer.decode([ids[p]]))] for p in explained]
    assert "position 0, the BOS the tokenizer puts first, is not explained (as in explain)" in printed.err
    out = tmp_path / "out.jsonl"
    assert main(["verbalize", "--av", folder, "--base", folder, "--text", "the cat sat", "--max-new-tokens", "2",
                 "--output", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["position"]) for r in written] == list(enumerate(explained))
    assert {r["input_text"] for r in written} == {"the cat sat"}  # the text given, without the BOS


def test_reconstruct_writes_the_ar_vectors(ar_nanonla, tiny_paths, tmp_path):
    out = tmp_path / "r.safetensors"
    assert main(["reconstruct", "--ar", str(tiny_paths["ar_nanonla"]), "a cat", "the sea", "--output", str(out)]) == 0
    assert torch.equal(load_file(str(out))["vectors"], ar_nanonla.reconstruct(["a cat", "the sea"]))
    (tmp_path / "explanations.txt").write_text("a cat\nthe sea\n\n", encoding="utf-8")  # a trailing blank line
    assert main(["reconstruct", "--ar", str(tiny_paths["ar_nanonla"]), "--input", str(tmp_path / "explanations.txt"),
                 "--output", str(out)]) == 0
    assert torch.equal(load_file(str(out))["vectors"], ar_nanonla.reconstruct(["a cat", "the sea"]))


def test_reconstruct_input_lines_are_split_at_newlines_only(ar_nanonla, tiny_paths, tmp_path):
    """str.splitlines also splits at U+2028, form feeds and U+0085, so an explanation holding one became two lines,
    and every later vector sat one line off its own explanation."""
    explanations = ["a cat\u2028on a mat", "the\x0csea", "a dog\x85ran"]
    (tmp_path / "explanations.txt").write_text("\r\n".join(explanations) + "\n", encoding="utf-8")
    out = tmp_path / "r.safetensors"
    assert main(["reconstruct", "--ar", str(tiny_paths["ar_nanonla"]), "--input", str(tmp_path / "explanations.txt"),
                 "--output", str(out)]) == 0
    assert torch.equal(load_file(str(out))["vectors"], ar_nanonla.reconstruct(explanations))


def test_reconstruct_prints_huge_and_tiny_norms_and_entries_in_e_notation(tiny_paths, monkeypatch, capsys):
    """A norm of 5e-10 printed as 0.000 and its entries (round(x, 3)) as 0.0, a diverged AR's norm with every digit
    (1e15) or, past 2e19, as inf (float32's squares overflow); now as a table cell writes them, the norm taken in
    float64. Ordinary norms print as before; entries get the cell's 3 decimals."""
    vectors = torch.zeros(4, 64)
    vectors[0, 0] = 1e30
    vectors[1, :2] = torch.tensor([3e-10, -4e-10])
    vectors[2, :3] = torch.tensor([0.6, -0.8, 0.25])
    vectors[3, 0] = 1e15
    monkeypatch.setattr(nl.ActivationReconstructor, "reconstruct", lambda self, texts, batch_size: vectors)
    assert main(["reconstruct", "--ar", str(tiny_paths["ar_nanonla"]), "a", "b", "c", "d"]) == 0
    assert capsys.readouterr().out.splitlines() == ["0\tnorm 1.00e+30\t[1.00e+30, 0.000, 0.000, 0.000] ...",
                                                    "1\tnorm 5.00e-10\t[3.00e-10, -4.00e-10, 0.000, 0.000] ...",
                                                    "2\tnorm 1.031\t[0.600, -0.800, 0.250, 0.000] ...",
                                                    "3\tnorm 1.00e+15\t[1.00e+15, 0.000, 0.000, 0.000] ..."]


def test_inspect_prints_the_role_stage_and_recorded_baseline(capsys):
    from nla_lens.toy.demo import TOY_DIR

    assert main(["inspect", str(TOY_DIR / "rl" / "ar")]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if " " in line)
    assert lines["role"] == "'ar'" and lines["stage"] == "'rl'" and lines["fve_baseline_n"] == "1943"
    assert "'bos_token_id': None" in lines["tokenization"]


def test_inspect_of_an_ar_does_not_build_the_av_chat_prompt(tiny_paths, tmp_path):
    """An AR's tokenizer need not carry a chat template (the AR loads without one): inspect checks what
    ActivationReconstructor.from_pretrained checks, not the AV's chat prompt."""
    folder = shutil.copytree(tiny_paths["ar_paper"], tmp_path / "ar")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in folder.glob("chat_template*"):
        extra.unlink()
    assert main(["inspect", str(folder)]) == 0


def test_verbalize_text_reads_the_base_model_the_sidecar_names(capsys):
    from nla_lens import toy

    assert main(["verbalize", "--av", str(toy.TOY_DIR / "av"), "--text", "Good morrow", "--max-new-tokens", "4"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(toy.TOY_DIR / "base")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(tokenizer.encode("Good morrow"))  # one per position of the toy base's tokens


@pytest.fixture()
def tokenizer_loads(monkeypatch) -> Counter:
    """How many times each folder's tokenizer is loaded, by the folder's resolved path."""
    loads: Counter = Counter()
    load_tokenizer = loading.load_tokenizer

    def counted(folder, **kwargs):
        loads[Path(folder).resolve()] += 1
        return load_tokenizer(folder, **kwargs)

    monkeypatch.setattr(loading, "load_tokenizer", counted)
    return loads


def test_verbalize_text_and_explain_from_a_base_load_each_tokenizer_once(tiny_paths, tmp_path, tokenizer_loads):
    """The base check loaded the AV's and the base's tokenizers, then the AV, the AR and the base (and explain's pair
    check) loaded them again: 4 loads for verbalize and 7 for explain, about 1 s each on a Qwen-sized tokenizer."""
    av, ar = tiny_paths["av_karvonen"].resolve(), tiny_paths["ar_nanonla"].resolve()
    base = shutil.copytree(av, tmp_path / "base").resolve()  # the tiny base: the AV folder holds a full copy of it
    (base / "nla_meta.yaml").unlink()
    assert main(["verbalize", "--av", str(av), "--base", str(base), "--text", "the cat", "--max-new-tokens", "2"]) == 0
    assert tokenizer_loads == {av: 1, base: 1}
    tokenizer_loads.clear()
    assert main(["explain", "--av", str(av), "--ar", str(ar), "--base", str(base), "--text", "the cat",
                 "--positions", "-1", "--max-new-tokens", "2"]) == 0
    assert tokenizer_loads == {av: 1, ar: 1, base: 1}


@pytest.fixture()
def tokenizer_checks(monkeypatch) -> Counter:
    """How many times each sidecar checks a tokenizer (`loading.check_tokenizer`), by the sidecar's path."""
    checks: Counter = Counter()
    check_tokenizer = loading.check_tokenizer

    def counted(meta, tokenizer, role=None, **kwargs):
        checks[Path(kwargs["source"]).resolve()] += 1
        return check_tokenizer(meta, tokenizer, role, **kwargs)

    monkeypatch.setattr(loading, "check_tokenizer", counted)
    return checks


def test_verbalize_text_and_explain_check_each_tokenizer_against_its_sidecar_once(tiny_paths, tmp_path,
                                                                                  tokenizer_checks):
    """The AV's tokenizer was checked for the base, then again by the loader it was handed to (`tokenizer=`). A
    drifted tokenizer is still refused (`test_a_drifted_tokenizer_fails_verbalize_text_before_the_base_loads`)."""
    av, ar = tiny_paths["av_karvonen"].resolve(), tiny_paths["ar_nanonla"].resolve()
    base = shutil.copytree(av, tmp_path / "base").resolve()
    (base / "nla_meta.yaml").unlink()
    assert main(["verbalize", "--av", str(av), "--base", str(base), "--text", "the cat", "--max-new-tokens", "2"]) == 0
    assert tokenizer_checks == {av / "nla_meta.yaml": 1}
    tokenizer_checks.clear()
    assert main(["explain", "--av", str(av), "--ar", str(ar), "--base", str(base), "--text", "the cat",
                 "--positions", "-1", "--max-new-tokens", "2"]) == 0
    assert tokenizer_checks == {av / "nla_meta.yaml": 1, ar / "nla_meta.yaml": 1}


def test_errors_exit_2_with_the_typed_reason(tiny_paths, tmp_path, capsys):
    assert main(["inspect", str(tiny_paths["ar_paper"])]) == 0
    assert main(["inspect", str(tmp_path)]) == 2
    assert "SidecarError" in capsys.readouterr().err
    save_file({"a": torch.zeros(2, 64), "b": torch.zeros(2, 64)}, tmp_path / "two.safetensors")
    av = str(tiny_paths["av_karvonen"])
    assert main(["verbalize", "--av", av, "--vectors", str(tmp_path / "two.safetensors")]) == 2
    assert main(["verbalize", "--av", av, "--text", "hi"]) == 2  # --base defaults to the sidecar's, not cached
    assert "hf download" in capsys.readouterr().err
    assert main(["verbalize", "--av", av, "--base", av, "--text", "the cat sat " * 200]) == 2
    assert "PromptTooLongError" in capsys.readouterr().err  # not an IndexError from the rotary table
    assert main(["verbalize", "--av", av, "--base", av, "--text", "hi", "--shards", "0"]) == 2
    assert "apply to --input" in capsys.readouterr().err


def test_every_subcommand_describes_itself_and_explains_each_flag_in_its_help(capsys):
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"demo", "verbalize", "round-trip", "reconstruct", "inspect", "extract", "train-av", "train-ar"} <= set(
        subcommands)

    def words(text: str) -> str:  # argparse rewraps text to the terminal width
        return " ".join(text.split())

    for command, subparser in subcommands.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = words(capsys.readouterr().out)
        assert subparser.description and subparser.description.strip(), command
        assert words(subparser.description) in out, command
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, (command, action.dest)
            assert words(action.help) in out, (command, action.dest)
            assert all(flag in out for flag in action.option_strings), (command, action.dest)


_REQUIRED_FLAGS = {"verbalize": ["--av", "a", "--text", "t"],
                   "round-trip": ["--av", "a", "--ar", "r", "--input", "v.pt", "--output", "o.jsonl"],
                   "reconstruct": ["--ar", "r"], "explain": ["--av", "a", "--ar", "r", "--text", "t"]}


@pytest.mark.parametrize("command", sorted(_REQUIRED_FLAGS))
def test_every_dtype_flag_takes_every_dtype_name_the_library_takes(command):
    parser = build_parser()
    for name, dtype in DTYPES.items():
        assert parser.parse_args([command, *_REQUIRED_FLAGS[command], "--dtype", name]).dtype == dtype, name


def test_dtype_bf16_loads_in_bfloat16_and_a_bad_name_lists_the_good_ones(tiny_paths, tmp_path, capsys):
    ar, out = str(tiny_paths["ar_nanonla"]), tmp_path / "r.safetensors"
    assert main(["reconstruct", "--ar", ar, "--dtype", "bf16", "a cat", "--output", str(out)]) == 0
    expected = nl.ActivationReconstructor.from_pretrained(ar, dtype=torch.bfloat16).reconstruct(["a cat"])
    assert torch.equal(load_file(str(out))["vectors"], expected)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["reconstruct", "--ar", ar, "--dtype", "bf17", "a cat"])
    assert info.value.code == 2
    assert ("argument --dtype: 'bf17' is not a dtype nla_lens loads; pass one of "
            "float32/fp32/float, bfloat16/bf16, float16/fp16/half, float64/fp64/double") in capsys.readouterr().err


def test_round_trip_with_a_text_points_to_explain(capsys):
    """`round-trip --text` (as `verbalize --text` works) got argparse's "required: --input/--vectors, --output"."""
    with pytest.raises(SystemExit) as info:
        main(["round-trip", "--av", "av", "--ar", "ar", "--text", "Macbeth: the king is dead"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "round-trip scores a file of vectors (--input, --output)" in err
    assert '`nla-lens explain --av ... --ar ... --text "..."`' in err
    assert "the following arguments are required" not in err


@pytest.mark.parametrize("command", ["round-trip", "explain"])
def test_baseline_help_names_the_baseline_the_command_uses(command):
    """Without --baseline both take the AR sidecar's held-out baseline, else the paper baseline of the vectors when
    there are >= 32 (`round_trip_file`, `nla.explain`); explain's help named only the sidecar's."""
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    baseline = next(a for a in subcommands[command]._actions if a.dest == "baseline")
    assert "AR sidecar's held-out" in baseline.help
    assert ">= 32" in baseline.help


def test_the_top_level_help_says_what_an_nla_is_and_where_to_start(capsys):
    """`nla-lens --help` said "The `nla-lens` command: a thin layer over the library.": to a newcomer, neither what
    an AV or an AR is, which the commands' own lines name, nor where to start."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "activation verbalizer (AV)" in out and "activation reconstructor (AR)" in out
    assert "Start with nla-lens demo" in out and "nla-lens COMMAND --help" in out


@pytest.mark.parametrize("command", ["extract", "train-av", "train-ar", "train-rl"])
def test_a_training_configs_help_names_a_class_the_user_can_import(command):
    """The config's help named `ExtractRunConfig`, which `nla_lens` does not export; `nla_lens.training` does."""
    import nla_lens.training

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    config = next(a for a in subcommands[command]._actions if a.dest == "config")
    named = re.search(r"the fields of ([\w.]+)", config.help).group(1)
    module, _, name = named.rpartition(".")
    assert module == "nla_lens.training" and isinstance(getattr(nla_lens.training, name), type)


def _screen(text: str) -> list[str]:
    """Lines as a terminal draws them: a carriage return goes back to column 0 and overwrites."""
    lines = []
    for line in text.split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return lines


def test_a_warning_during_a_progress_bar_prints_on_a_line_of_its_own(tiny_paths, vectors, tmp_path, capsys,
                                                                      monkeypatch):
    generate = nl.ActivationVerbalizer._generate

    def warn_then_generate(self, *args, **kwargs):  # as a torch or transformers warning in a forward would
        warnings.warn("a warning mid-bar", UserWarning, stacklevel=1)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(nl.ActivationVerbalizer, "_generate", warn_then_generate)
    save_file({"vectors": vectors}, tmp_path / "v.safetensors")
    shown_before = warnings.showwarning
    assert main(["verbalize", "--av", str(tiny_paths["av_karvonen"]), "--input", str(tmp_path / "v.safetensors"),
                 "--max-new-tokens", "2", "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "verbalize:" in err and "batch" in err  # the bar was drawn
    lines = _screen(err)
    # It was printed after the half-drawn bar, on its line: "verbalize:   0%| | 0/2 [...]nla-lens verbalize: ..."
    assert "nla-lens verbalize: warning: a warning mid-bar" in lines, lines
    assert warnings.showwarning is shown_before  # the CLI's printer is gone once the command returns


def test_explain_prints_whitespace_tokens_visibly_as_the_views_do(tiny_paths, capsys):
    from nla_lens.display import visible_token

    av, ar = str(tiny_paths["av_karvonen"]), str(tiny_paths["ar_nanonla"])
    assert main(["explain", "--av", av, "--ar", ar, "--base", av, "--text", "the  cat\n\tsat",
                 "--max-new-tokens", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line[:6].strip().isdigit()]
    tokens = {int(line[:6]): line[8:22].rstrip() for line in rows}  # "  {pos:>4}  {token:<14} ..."
    # The tiny tokenizer: t, he, " ", " cat", "\n", "\t", s, at. A lone space printed blank.
    assert tokens == {0: "t", 1: "he", 2: "\u2423", 3: " cat", 4: "\u21b5", 5: "\\t", 6: "s", 7: "at"}
    assert tokens[2] == visible_token(" ")  # the explained view's chip and the reprs draw it so


def test_explain_keeps_a_texts_header_on_one_line(tiny_paths, capsys):
    """A newline in --text split the "[i] text" header: its second half sat above the column titles."""
    av, ar = str(tiny_paths["av_karvonen"]), str(tiny_paths["ar_nanonla"])
    assert main(["explain", "--av", av, "--ar", ar, "--base", av, "--text", "the cat\nsat", "--text", "a\tdog",
                 "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert [lines[i] for i in headers] == ["[0] the cat\\nsat", "[1] a\\tdog"]
    assert all(lines[i + 1].split() == ["pos", "token", "FVE", "MSE", "explanation"] for i in headers)


def test_explain_says_each_warning_once_as_the_cli_does_and_its_summary_names_the_flag(tiny_paths, capsys):
    """The summary on stdout said "pass baseline=" (the Python keyword), and the round trip's warnings were printed
    again after the library had warned of them, without the command's prefix: "no FVE" twice, once as baseline=."""
    av, ar = str(tiny_paths["av_karvonen"]), str(tiny_paths["ar_nanonla"])
    assert main(["explain", "--av", av, "--ar", ar, "--base", av, "--text", "the cat", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert "no FVE (no baseline: pass --baseline)" in out and "baseline=" not in out
    warned = [line for line in err.splitlines() if "warning: " in line]
    assert warned and all(line.startswith("nla-lens explain: warning: ") for line in warned), warned
    assert sum("no FVE" in line for line in warned) == 1 and "baseline=" not in err


_STEER_FLAGS = ["--av", "a", "--ar", "r", "--text", "t", "--replace", "a", "b"]


@pytest.mark.parametrize("command, flags, value, expected", [
    ("explain", _REQUIRED_FLAGS["explain"], "-2,-1", [-2, -1]),
    ("explain", _REQUIRED_FLAGS["explain"], "-4:", slice(-4, None)),
    ("explain", _REQUIRED_FLAGS["explain"], "-4:-1", slice(-4, -1)),
    ("explain", _REQUIRED_FLAGS["explain"], "-2", [-2]),
    ("steer-words", _STEER_FLAGS, "-2,-1", [-2, -1]),
    ("steer-words", _STEER_FLAGS, "3,-1", [3, -1]),
])
def test_positions_takes_a_negative_list_or_slice_after_a_space(command, flags, value, expected):
    """`--positions -2,-1` was argparse's bare "expected one argument" (a value starting with '-' that is not one
    number reads as a flag); the help asked for `--positions=-2,-1`."""
    from nla_lens.cli import _negative_specs_joined

    args = build_parser().parse_args(_negative_specs_joined([command, *flags, "--positions", value]))
    assert args.positions == expected
    assert _negative_specs_joined(["--text", "-2,-1", "--positions", "x"]) == ["--text", "-2,-1", "--positions", "x"]


def test_verbalize_and_round_trip_warn_of_rows_cut_by_max_new_tokens(tmp_path, capsys):
    """Every row cut at --max-new-tokens was reported as plain success (round-trip's summary counted them, verbalize
    said nothing); a file job's fix also needs a new --output, since its shards hold the cut rows."""
    av, ar = str(nl.toy.TOY_DIR / "av"), str(nl.toy.TOY_DIR / "ar")
    vectors = torch.randn(3, load_meta(av).d_model, generator=torch.Generator().manual_seed(0))
    save_file({"vectors": vectors}, tmp_path / "v.safetensors")
    source = ["--input", str(tmp_path / "v.safetensors")]
    cut = "warning: 3 of 3 rows were cut at --max-new-tokens 1 before the AV ended them"
    assert main(["verbalize", "--av", av, *source, "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert f"nla-lens verbalize: {cut}" in err and "larger --max-new-tokens" in err
    for command in (["verbalize", "--av", av], ["round-trip", "--av", av, "--ar", ar]):
        out = tmp_path / f"{command[0]}.jsonl"
        assert main([*command, *source, "--output", str(out), "--max-new-tokens", "1"]) == 0
        err = capsys.readouterr().err
        assert f"nla-lens {command[0]}: {cut}" in err and f"into a new --output (or delete {out}.shards" in err
        assert all(json.loads(line)["truncated"] for line in out.read_text().splitlines())
    assert main(["verbalize", "--av", av, *source]) == 0  # the toy AV ends its explanations well within 150 tokens
    assert "were cut" not in capsys.readouterr().err


def test_rows_cut_after_closing_their_tag_are_not_called_cut_short_or_missing(tmp_path, capsys, monkeypatch):
    """A row whose explanation closed its tag and ran on to --max-new-tokens holds a whole explanation (a round trip
    scores it): the warning called every cut row's explanation "cut short or missing (no closing tag)"."""
    from nla_lens.sharded import Sampling

    av, ar = str(nl.toy.TOY_DIR / "av"), str(nl.toy.TOY_DIR / "ar")
    save_file({"vectors": torch.randn(3, load_meta(av).d_model, generator=torch.Generator().manual_seed(0))},
              tmp_path / "v.safetensors")
    source = ["--input", str(tmp_path / "v.safetensors"), "--max-new-tokens", "5"]
    ran_on = nl.Verbalization("<explanation>the cat</explanation> and", "the cat", [1] * 5, truncated=True)
    cut = nl.Verbalization("<explanation>the cat and so", None, [1] * 5, truncated=True)
    ended = nl.Verbalization("<explanation>the cat</explanation>", "the cat", [1, 2])
    said = nl.verbalizer.Verbalizations([ran_on, cut, ended])
    monkeypatch.setattr(nl.ActivationVerbalizer, "verbalize", lambda self, vectors, **kw: said)
    assert main(["verbalize", "--av", av, *source]) == 0
    assert ("nla-lens verbalize: warning: 2 of 3 rows were cut at --max-new-tokens 5 before the AV ended them: 1 "
            "before closing the explanation tag, so they have no explanation; 1 after closing it: their explanation "
            "is whole, and what the AV wrote on past the tag is in their text. Rerun with a larger --max-new-tokens\n"
            in capsys.readouterr().err)
    monkeypatch.setattr(Sampling, "verbalize", lambda self, av, vectors, shard: [ran_on, ended, ended])
    out = tmp_path / "rt.jsonl"
    assert main(["round-trip", "--av", av, "--ar", ar, *source, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert ("nla-lens round-trip: warning: 1 of 3 rows were cut at --max-new-tokens 5 before the AV ended them: 1 "
            "after closing it: their explanation is whole, and what the AV wrote on past the tag is in their text. "
            f"Rerun with a larger --max-new-tokens into a new --output (or delete {out}.shards") in err
    assert "no explanation" not in err and "1/3 explanations closed their tag" in err  # the round trip's own note


def _interrupt(*_: object, **__: object) -> None:
    raise KeyboardInterrupt


def _main_interrupted(argv: list[str]) -> int:
    """`main` on a command whose work raises KeyboardInterrupt: one that escapes fails this test, not the session."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped nla_lens.cli.main")


def _training_config(tmp_path, command: str) -> str:
    """A config that passes the command's checks before its pipeline runs (the inputs exist, the base resolves)."""
    toy = nl.toy.TOY_DIR
    (tmp_path / "acts").mkdir()
    (tmp_path / "explanations.jsonl").write_text("")
    (tmp_path / "corpus.jsonl").write_text("")
    inputs = {"activations": str(tmp_path / "acts"), "explanations": str(tmp_path / "explanations.jsonl"),
              "out_dir": str(tmp_path / "run")}
    config = {"extract": {"base_model": str(toy / "base"), "corpus": str(tmp_path / "corpus.jsonl"),
                          "out_dir": str(tmp_path / "run"), "extract": {"layer": 1}},
              "train-av": {"base_model": str(toy / "base"), **inputs},
              "train-ar": {"base_model": str(toy / "base"), **inputs},
              "train-rl": {"av": str(toy / "av"), "ar": str(toy / "ar"), **inputs}}[command]
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def test_the_commands_a_config_may_name_are_the_subcommands_reading_those_configs():
    """`command:` in a config is checked against config.COMMANDS, which the CLI registers under names of its own:
    each named command is a subcommand whose config is the class carrying that name."""
    from nla_lens.training.config import COMMANDS, ARRunConfig, AVRunConfig, ExtractRunConfig, RLRunConfig

    subcommands = next(action for action in build_parser()._actions
                       if isinstance(action, argparse._SubParsersAction)).choices
    run_configs = {cls.COMMAND: cls for cls in (ExtractRunConfig, ARRunConfig, AVRunConfig, RLRunConfig)}
    assert sorted(run_configs) == sorted(COMMANDS)
    for command, config_cls in run_configs.items():
        config_help = next(action.help for action in subcommands[command]._actions if action.dest == "config")
        assert f"nla_lens.training.{config_cls.__name__} " in config_help, (command, config_help)


@pytest.mark.parametrize("command, work, hint", [
    pytest.param("extract", "run_extract", "; rerun the same command to continue: the shards already in out_dir are "
                 "kept", marks=NEEDS_TL3),  # every training command refuses the bridge once its YAML is read
    pytest.param("train-av", "run_train_av", "; to continue from the newest checkpoint in out_dir/checkpoints, rerun "
                 "the same command with resume: latest in {config} (checkpoints are written every train.",
                 marks=NEEDS_TL3),  # SFT refuses the bridge before its work starts
    pytest.param("train-ar", "run_train_ar", "rerun the same command with resume: latest in {config} (checkpoints "
                 "are written every train.save_every steps; with 0 there is none before the end", marks=NEEDS_TL3),
    pytest.param("train-rl", "run_train_rl", "rerun the same command with resume: latest in {config} (checkpoints "
                 "are written every rl.save_every steps", marks=NEEDS_TL3),
], ids=["extract", "train-av", "train-ar", "train-rl"])
def test_ctrl_c_during_extract_or_training_exits_130_saying_how_to_continue(command, work, hint, tmp_path, capsys,
                                                                           monkeypatch):
    """Ctrl-C printed a raw KeyboardInterrupt traceback and no word on what the run left to continue from."""
    from nla_lens.training import pipeline

    monkeypatch.setattr(pipeline, work, _interrupt)
    config = _training_config(tmp_path, command)
    assert _main_interrupted([command, config]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"nla-lens {command}: interrupted") and err.count("\n") == 1, err
    assert hint.format(config=config) in err


@pytest.mark.parametrize("command, work, run, line", [
    pytest.param("train-av", "run_train_av", {"evals": [{"eval_loss": 7.36974}, {"eval_loss": 1e57}]},
                 "eval loss 7.3697 -> 1.00e+57; AV exported to ", marks=NEEDS_TL3),
    pytest.param("train-ar", "run_train_ar", {"evals": [{"fve": -3e20, "baseline_source": "given"},
                                                        {"fve": 0.8124, "baseline_source": "given"}]},
                 "held-out FVE -3.00e+20 -> 0.812 (baseline: given); AR exported to ", marks=NEEDS_TL3),
    pytest.param("train-ar", "run_train_ar", {"evals": [{"eval_mse": 2e9, "fve": None}, {"eval_mse": 0.00004,
                                                                                         "fve": None}]},
                 "held-out MSE 2.00e+09 -> 4.00e-05 (no FVE", marks=NEEDS_TL3),
    pytest.param("train-rl", "run_train_rl", {"history": [{"reward": -1e30, "fve": 0.1234, "kl": 0.0},
                                                          {"reward": -0.25, "fve": 3e7, "kl": 2e-6}],
                                              "evals": [{"eval_fve": 0.0001}, {"eval_fve": 0.5}]},
                 "reward -1.00e+30 -> -0.2500, rollout FVE 0.123 -> 3.00e+07, KL 2.00e-06; held-out FVE 1.00e-04 -> "
                 "0.500; AV ", marks=NEEDS_TL3),
], ids=["train-av", "train-ar", "train-ar-no-fve", "train-rl"])
def test_a_training_commands_last_line_writes_huge_and_tiny_scores_in_e_notation(command, work, run, line, tmp_path,
                                                                                capsys, monkeypatch):
    """train-av / train-ar / train-rl printed their eval loss, reward, KL and FVE with every digit (a diverged loss
    of 1e57 as 62 characters) and a KL of 2e-6 as 0.0000, where `nla-lens curve` wrote 1.00e+57 and 2.00e-06."""
    from types import SimpleNamespace

    from nla_lens.training import pipeline

    result = SimpleNamespace(train=SimpleNamespace(evals=run["evals"], history=run.get("history")),
                             model_dir="out", av_dir="out/av", ar_dir="out/ar")
    monkeypatch.setattr(pipeline, work, lambda *_, **__: result)
    assert main([command, _training_config(tmp_path, command)]) == 0
    assert line in capsys.readouterr().out


def test_ctrl_c_during_a_file_job_exits_130_saying_a_rerun_keeps_its_shards(tmp_path, capsys, monkeypatch):
    from nla_lens import sharded

    av, ar = str(nl.toy.TOY_DIR / "av"), str(nl.toy.TOY_DIR / "ar")
    save_file({"vectors": torch.zeros(2, load_meta(av).d_model)}, tmp_path / "v.safetensors")
    source = ["--input", str(tmp_path / "v.safetensors")]
    monkeypatch.setattr(sharded, "verbalize_file", _interrupt)
    monkeypatch.setattr(sharded, "round_trip_file", _interrupt)
    out = tmp_path / "out.jsonl"
    assert _main_interrupted(["verbalize", "--av", av, *source, "--output", str(out)]) == 130
    assert capsys.readouterr().err == ("nla-lens verbalize: interrupted; no shard was finished, so a rerun of the same "
                                       "command starts from the first\n")  # it named a shards folder not yet made
    shard_store.shard_folder(out).mkdir()
    (shard_store.shard_folder(out) / "shard-00000.parquet").touch()
    for command in (["verbalize", "--av", av], ["round-trip", "--av", av, "--ar", ar]):
        assert _main_interrupted([*command, *source, "--output", str(out)]) == 130
        assert capsys.readouterr().err == (f"nla-lens {command[0]}: interrupted; rerun the same command to continue: "
                                           f"the finished shards in {out}.shards are kept and only the others are "
                                           "computed\n")
    # Printed rows are not kept anywhere: nothing to continue from.
    monkeypatch.setattr(nl.ActivationVerbalizer, "verbalize", _interrupt)
    assert _main_interrupted(["verbalize", "--av", av, *source]) == 130
    assert capsys.readouterr().err == "nla-lens verbalize: interrupted\n"


def test_ctrl_c_under_torchrun_is_reported_by_rank_0_only(tmp_path, capsys, monkeypatch):
    """Ctrl-C reaches every rank: each printed the same line."""
    from nla_lens import sharded

    av = str(nl.toy.TOY_DIR / "av")
    save_file({"vectors": torch.zeros(2, load_meta(av).d_model)}, tmp_path / "v.safetensors")
    monkeypatch.setattr(sharded, "verbalize_file", _interrupt)
    argv = ["verbalize", "--av", av, "--input", str(tmp_path / "v.safetensors"), "--output", str(tmp_path / "o.jsonl")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert _main_interrupted(argv) == 130
        assert capsys.readouterr().err.count("nla-lens verbalize: interrupted") == lines


def test_explain_prints_a_parsed_rows_miss_as_the_miss(capsys, monkeypatch):
    """A parsed row whose reconstruction has no direction scores the miss, as a failed parse does, but `nla-lens
    explain` printed only a failed parse's scores as "miss": these read as a reconstruction that bad."""
    av, ar = str(nl.toy.TOY_DIR / "av"), str(nl.toy.TOY_DIR / "ar")
    d_model = load_meta(ar).d_model
    monkeypatch.setattr(nl.ActivationReconstructor, "reconstruct", lambda self, texts, **kw: torch.zeros(len(texts),
                                                                                                          d_model))
    argv = ["explain", "--av", av, "--ar", ar, "--text", "Macbeth: the king is dead", "--positions", "-2,-1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert len(rows) == 2 and all(row[2:4] == ["miss", "miss"] for row in rows)
    assert "(no <explanation> tags)" not in out  # they parsed: their explanations are printed as they are
    assert "2/2 reconstructions have no direction" in err
    # named as the table shows them, not as rows of the round trip ("rows [0, 1]")
    tokenizer = AutoTokenizer.from_pretrained(av)
    ids = tokenizer("Macbeth: the king is dead")["input_ids"]
    named = ", ".join(f"text 0 position {p} ({tokenizer.decode([ids[p]], clean_up_tokenization_spaces=False)!r})"
                      for p in (len(ids) - 2, len(ids) - 1))
    assert f"(NaN, Inf or zero; {named})" in err and "rows [" not in err


def test_explain_warns_of_rows_cut_by_max_new_tokens(capsys):
    """explain's table had the truncated column, but the command printed a cut-short run as a plain success."""
    av, ar = str(nl.toy.TOY_DIR / "av"), str(nl.toy.TOY_DIR / "ar")
    text = "Macbeth: the king is dead"
    argv = ["explain", "--av", av, "--ar", ar, "--text", text, "--positions", "-2,-1"]
    assert main([*argv, "--max-new-tokens", "1"]) == 0
    out, err = capsys.readouterr()
    assert "nla-lens explain: warning: 2 of 2 rows were cut at --max-new-tokens 1" in err
    assert out.count("(cut at max_new_tokens before </explanation>) <explanation>") == 2  # each row says why
    # Their FVE and MSE are the miss they were scored as, not a reconstruction's (they printed as plain numbers)
    rows = [line.split() for line in out.splitlines() if "(cut at max_new_tokens" in line]
    assert [row[2:4] for row in rows] == [["miss", "miss"]] * 2
    assert main(["explain", "--av", av, "--ar", ar, "--text", text, "--positions=-2,-1"]) == 0
    assert "were cut" not in capsys.readouterr().err
