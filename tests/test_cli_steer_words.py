"""`nla-lens steer-words`: a thin layer over `nl.steer_with_words` on the bundled toy; wrong input exits 2."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import nla_lens as nl
from nla_lens import backends
from nla_lens.cli import main

AV, AR = str(nl.toy.TOY_DIR / "av"), str(nl.toy.TOY_DIR / "ar")
TEXTS = ["Romeo: I will not hear you, for I am", "Thou art a villain"]  # 11 and 5 tokens: one row is padded


@pytest.fixture(scope="module")
def toy():
    """The toy pair and its base as the command loads them: from the folders, the base from the AV's sidecar."""
    nla = nl.NLA.from_pretrained(AV, AR)
    return nla, nl.load_base(nla)


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any model load fails the test: these checks must come first."""
    def tripwire(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    for owner, name in [(nl.ActivationVerbalizer, "from_pretrained"), (nl.ActivationReconstructor, "from_pretrained"),
                        (backends, "load_model")]:
        monkeypatch.setattr(owner, name, tripwire)


def _edit(pairs):
    def edit(text):
        for old, new in pairs:
            text = text.replace(old, new)
        return text
    return edit


@pytest.mark.parametrize("flags, kwargs", [
    (["--replace", "predicting", "foretelling", "--replace", "token", "word", "--positions", "-2,-1"],
     {"edit": _edit([("predicting", "foretelling"), ("token", "word")]), "positions": [-2, -1]}),
    (["--edit-to", 'The token " am", after "I", predicting " the".', "--mode", "replace", "--alpha", "0.5",
      "--samples", "2", "--temperature", "0.7", "--seed", "3"],
     {"edit": 'The token " am", after "I", predicting " the".', "positions": [-1], "mode": "replace", "alpha": 0.5,
      "samples": 2, "temperature": 0.7, "seed": 3}),
])
def test_steer_words_command_writes_what_the_library_computes(toy, tmp_path, capsys, flags, kwargs):
    """The table and Delta the command writes are those of steer_with_words on the texts left-padded by the base
    tokenizer with their mask, and its saved vectors steer as the live hooks do, bit for bit."""
    table, vectors = tmp_path / "steer.parquet", tmp_path / "delta.safetensors"
    argv = ["steer-words", "--av", AV, "--ar", AR, *[a for t in TEXTS for a in ("--text", t)], *flags,
            "--max-new-tokens", "48", "--continue-tokens", "3", "--output", str(table), "--save-vectors", str(vectors)]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    nla, base = toy
    batch = base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[1, 0] == 0 and mask[0].all()  # left-padded: the last column is each text's last token
    result = nl.steer_with_words(nla, base, tokens, attention_mask=mask, continue_tokens=3, max_new_tokens=48,
                                 **kwargs)
    n_sites = len(kwargs["positions"]) * len(TEXTS)
    assert result.summary() in printed and printed.count("steered: ") == len(TEXTS)
    assert f"wrote {table}" in printed and f"wrote {vectors}" in printed

    rows, records = pq.read_table(table).to_pylist(), result.to_records()
    assert len(rows) == len(records) == n_sites
    assert [row["prompt"] for row in rows] == [TEXTS[row["batch"]] for row in rows]  # the toy puts no BOS first
    for row, record in zip(rows, records, strict=True):
        assert row.keys() == record.keys()
        for name, value in record.items():
            if isinstance(value, float):
                assert math.isclose(row[name], value, rel_tol=1e-6, abs_tol=1e-9), name
            else:
                assert row[name] == value, name
    assert {len(r["explanation_samples"]) for r in rows} == {kwargs.get("samples", 1)}

    saved = load_file(str(vectors))
    assert torch.equal(saved["delta"], result.delta) and torch.equal(saved["target"], result.target)
    assert saved["positions"].tolist() == result.positions.tolist() and saved["rows"].tolist() == result.rows.tolist()
    clean = base(tokens, attention_mask=mask)
    live = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=result.fwd_hooks())
    loaded = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=nl.WordSteering.fwd_hooks_from(vectors))
    assert torch.equal(loaded, live) and (live - clean).abs().max() > 1e-2  # the same steering, and it steers


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_steer_words_takes_exactly_one_edit(no_model_loads, capsys):
    base_argv = ["steer-words", "--av", AV, "--ar", AR, "--text", TEXTS[0]]
    assert _usage_error(base_argv, capsys) == (
        "nla-lens steer-words: error: one of the arguments --replace --edit-to is required")
    assert _usage_error([*base_argv, "--replace", "a", "b", "--edit-to", "c"], capsys) == (
        "nla-lens steer-words: error: argument --edit-to: not allowed with argument --replace")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0.7"], "InputError: --temperature 0.7: --samples 1 reads the greedy explanation, which takes "
                               "no seed and no temperature other than 0"),
    (["--seed", "1"], "InputError: --seed 1: --samples 1 reads the greedy explanation"),
    (["--samples", "2", "--temperature", "-3"], "InputError: --temperature -3.0 must be a finite number >= 0"),
    (["--samples", "0"], "InputError: --samples 0: must be a whole number >= 1"),
    (["--samples", "2", "--temperature", "0"], "InputError: --samples 2, --temperature 0.0: at temperature 0 every "
                                                "sample is the same greedy explanation"),
    (["--alpha", "nan"], "InputError: --alpha nan: must be a finite number"),
    (["--continue-tokens", "-1"], "InputError: --continue-tokens -1: must be a whole number >= 0"),
    (["--replace", "", "mouse"], "InputError: --replace '' 'mouse': OLD is empty"),
    (["--replace", "a", "b", "--text", " "], "InputError: --text is empty"),
    (["--save-vectors", "delta.pt"], "InputError: --save-vectors delta.pt: the file name must end in .safetensors"),
    (["--output", "steer.csv"], r"InputError: --output steer.csv: save to a .parquet or .jsonl file"),
])
def test_steer_words_refuses_bad_settings_in_one_line_before_loading(no_model_loads, capsys, flags, message):
    edit = [] if "--replace" in flags else ["--replace", "a", "b"]
    assert main(["steer-words", "--av", AV, "--ar", AR, "--text", TEXTS[0], *edit, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nla-lens steer-words: {message}") and err.count("\n") == 1, err


def test_steer_words_refuses_an_edit_that_changes_nothing(capsys):
    """The library's check: a --replace whose OLD is in no explanation leaves Delta = 0 in add mode."""
    assert main(["steer-words", "--av", AV, "--ar", AR, "--text", TEXTS[0], "--replace", "rabbit", "mouse",
                 "--max-new-tokens", "48"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nla-lens steer-words: InputError: the edit leaves the explanation of site 0 (row 0, column "
                          "10) unchanged") and err.count("\n") == 1, err


def test_steer_words_refuses_an_alpha_the_layers_after_cannot_read_in_one_line(capsys):
    """--alpha 1e30 printed uniform next-token odds (the next layer norm read the steered residual as zero) and a
    garbage continuation, exit 0."""
    assert main(["steer-words", "--av", AV, "--ar", AR, "--text", TEXTS[0], "--replace", '" not"', '" the"',
                 "--alpha", "1e30", "--max-new-tokens", "48", "--continue-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nla-lens steer-words: VectorError: blocks.3.hook_resid_post: --alpha 1e+30 steers the "
                          "residual at (batch, position) [(0, 10)] past what the layers after can read") and (
        err.count("\n") == 1), err


def test_steer_words_refuses_a_text_past_the_base_context_in_one_line(capsys):
    """A --text longer than the base model's context printed TransformerLens's IndexError traceback."""
    assert main(["steer-words", "--av", AV, "--ar", AR, "--text", "the king is dead " * 100, "--replace", "a", "b",
                 "--continue-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nla-lens steer-words: PromptTooLongError: text 0 ('the king is dead the king is …') is "
                          ) and err.count("\n") == 1, err
    assert "tokens, over the base model's context of 256; split it into shorter texts" in err  # explain's words


def test_steer_words_pads_texts_for_a_tokenizer_without_a_pad_token(tmp_path, capsys, monkeypatch):
    """Llama 3's tokenizer has no pad token: the command padded with None (a TypeError in torch.full). The pads are
    masked out, so the table is the one a tokenizer with a pad token gives."""
    from nla_lens.commands import NLAFolders

    load = NLAFolders.load
    tables = {}
    for has_pad in (True, False):
        def loader(folders, device, dtype, has_pad=has_pad):
            nla, base = load(folders, device, dtype)
            if not has_pad:
                base.tokenizer.pad_token = None  # this load's own tokenizer, dropped after the command
                assert base.tokenizer.pad_token_id is None
            return nla, base

        monkeypatch.setattr(NLAFolders, "load", loader)
        tables[has_pad] = tmp_path / f"pad-{has_pad}.parquet"
        assert main(["steer-words", "--av", AV, "--ar", AR, *[a for t in TEXTS for a in ("--text", t)],
                     "--replace", "predicting", "foretelling", "--max-new-tokens", "48", "--continue-tokens", "2",
                     "--output", str(tables[has_pad])]) == 0
    with_pad, without = pq.read_table(tables[True]).to_pylist(), pq.read_table(tables[False]).to_pylist()
    assert len(with_pad) == len(TEXTS) and with_pad == without


def test_positive_positions_count_each_texts_own_tokens(toy, tmp_path, capsys):
    """--positions 1 steered column 1 of the left-padded batch: the second token of the longest text, and a pad
    (refused) or another token of every shorter one. It is each text's own token 1, as the help says."""
    _, base = toy
    ids = [base.tokenizer(text)["input_ids"] for text in TEXTS]
    width = max(len(row) for row in ids)
    table = tmp_path / "steer.parquet"
    assert main(["steer-words", "--av", AV, "--ar", AR, *[a for t in TEXTS for a in ("--text", t)],
                 "--replace", "predicting", "foretelling", "--positions=1,-1", "--continue-tokens", "0",
                 "--output", str(table)]) == 0
    rows = pq.read_table(table).to_pylist()
    expected = [(i, width - len(row) + p, base.tokenizer.decode([row[p]])) for i, row in enumerate(ids)
                for p in (1, len(row) - 1)]
    assert [(r["batch"], r["position"], r["token"]) for r in rows] == expected

    short = len(ids[1])
    for positions, message in ((f"{short}", f"--positions {short} is outside text 1, which is {short} tokens"),
                               (f"0,-{short}", f"--positions 0,-{short} name the same token of text 1 twice")):
        assert main(["steer-words", "--av", AV, "--ar", AR, *[a for t in TEXTS for a in ("--text", t)],
                     "--replace", "a", "b", f"--positions={positions}"]) == 2
        assert message in capsys.readouterr().err
