"""The `nla-lens` subcommands over the tiny fixtures: thin layers that give the library's numbers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from nla_lens.cli import main


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


def test_verbalize_text_captures_every_position_of_the_base(tiny_paths, capsys):
    folder = str(tiny_paths["av_karvonen"])
    assert main(["verbalize", "--av", folder, "--base", folder, "--text", "the cat sat", "--max-new-tokens", "3"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.encode("the cat sat")
    lines = capsys.readouterr().out.strip().splitlines()
    # One line per position: index, the token it explains, the explanation.
    expected = [[str(i), repr(tokenizer.decode([t]))] for i, t in enumerate(ids)]
    assert [line.split("\t")[:2] for line in lines] == expected


def test_reconstruct_writes_the_ar_vectors(ar_nanonla, tiny_paths, tmp_path):
    out = tmp_path / "r.safetensors"
    assert main(["reconstruct", "--ar", str(tiny_paths["ar_nanonla"]), "a cat", "the sea", "--output", str(out)]) == 0
    assert torch.equal(load_file(str(out))["vectors"], ar_nanonla.reconstruct(["a cat", "the sea"]))


def test_inspect_prints_the_role_stage_and_recorded_baseline(capsys):
    from nla_lens.toy.demo import TOY_DIR

    assert main(["inspect", str(TOY_DIR / "rl" / "ar")]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if " " in line)
    assert lines["role"] == "'ar'" and lines["stage"] == "'rl'" and lines["fve_baseline_n"] == "1943"
    assert "'bos_token_id': None" in lines["tokenization"]


def test_errors_exit_2_with_the_typed_reason(tiny_paths, tmp_path, capsys):
    assert main(["inspect", str(tiny_paths["ar_paper"])]) == 0
    assert main(["inspect", str(tmp_path)]) == 2
    assert "SidecarError" in capsys.readouterr().err
    save_file({"a": torch.zeros(2, 64), "b": torch.zeros(2, 64)}, tmp_path / "two.safetensors")
    av = str(tiny_paths["av_karvonen"])
    assert main(["verbalize", "--av", av, "--vectors", str(tmp_path / "two.safetensors")]) == 2
    assert main(["verbalize", "--av", av, "--text", "hi"]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert main(["verbalize", "--av", av, "--base", av, "--text", "the cat sat " * 200]) == 2
    assert "PromptTooLongError" in capsys.readouterr().err  # not an IndexError from the rotary table
    assert main(["verbalize", "--av", av, "--base", av, "--text", "hi", "--shards", "0"]) == 2
    assert "apply to --input" in capsys.readouterr().err


def test_every_subcommand_explains_its_flags(capsys):
    for command in ["demo", "verbalize", "round-trip", "reconstruct", "inspect", "extract", "train-av", "train-ar"]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--" in capsys.readouterr().out or command == "inspect"
