"""The BOS rules of the training code (issue #13), everywhere nla_lens tokenizes text itself.

Base text for activations and AR prompts are tokenized with the tokenizer's special tokens (kitft
`nla/datagen/extractors.py`, the critic in `nla_inference.py`): BOS first on Gemma / Llama, nothing
added on Qwen. Checked against plain HF on the tiny Gemma-3 checkpoint (whose tokenizer puts `<bos>`
first) and unchanged on the tiny Qwen3 one (no BOS).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import HAS_SAE_LENS, LAYER, NEEDS_TL3
from transformers import AutoModelForCausalLM, AutoTokenizer

import nla_lens as nl
from nla_lens import commands, loading
from nla_lens.sidecar import text_ids
from nla_lens.testing_families import AV_TEMPLATE, GEMMA_MARKER
from nla_lens.vector_files import VectorTable

ATOL = 1e-5
TEXT = "The cat sat on the mat. A dog ran in the park."


def _hf_resid(folder, ids: list[int]) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]


def test_base_text_puts_bos_first_only_where_the_tokenizer_has_one(bos_paths, tiny_paths):
    gemma = AutoTokenizer.from_pretrained(bos_paths["gemma_av"])
    qwen = AutoTokenizer.from_pretrained(tiny_paths["av_karvonen"])
    assert text_ids(gemma, TEXT)[0] == gemma.bos_token_id
    assert text_ids(gemma, TEXT)[1:] == gemma.encode(TEXT, add_special_tokens=False)
    assert text_ids(qwen, TEXT) == qwen.encode(TEXT, add_special_tokens=False)  # Qwen: unchanged


def test_to_tokens_of_a_loaded_model_follows_the_rule(bos_paths, av_karvonen):
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"])
    tokens = av.model.to_tokens(TEXT)[0].tolist()
    assert tokens == text_ids(av.tokenizer, TEXT) and tokens.count(av.tokenizer.bos_token_id) == 1
    assert av_karvonen.model.to_tokens(TEXT)[0].tolist() == text_ids(av_karvonen.tokenizer, TEXT)


def _capture(folder: Path, text: str) -> VectorTable:
    """What `nla-lens verbalize --text` captures from the base model in `folder`, at the tiny NLA's layer."""
    return commands.capture_text(folder, loading.load_tokenizer(folder), LAYER, text, "cpu", torch.float32)


def test_cli_text_capture_reads_the_bos_first_tokens(bos_paths):
    folder = bos_paths["gemma_av"]
    table = _capture(folder, TEXT)
    ids = text_ids(AutoTokenizer.from_pretrained(folder), TEXT)
    expected = _hf_resid(folder, ids)[1:]  # read after the BOS; the BOS itself is not explained, as in explain
    assert table.columns.column("position").to_pylist() == list(range(1, len(ids)))
    assert table.vectors.shape == expected.shape
    assert (table.vectors - expected).abs().max() < ATOL


def test_training_ar_rows_and_sidecars_record_the_rule(bos_paths, tiny_paths):
    from nla_lens.training.dataset import LabelledActivations, ar_rows

    for folder, bos in ((bos_paths["gemma_ar"], True), (tiny_paths["ar_paper"], False)):
        ar_meta = nl.load_meta(folder)
        tokenizer = loading.load_tokenizer(folder)
        data = LabelledActivations(torch.zeros(1, ar_meta.d_model), ["doc-0"], [3], ["the cat"])
        prompt = ar_rows(data, ar_meta, tokenizer).prompts[0]
        assert prompt == text_ids(tokenizer, ar_meta.ar_prompt("the cat"))
        assert (prompt[0] == tokenizer.bos_token_id) is bos


@NEEDS_TL3
def test_extraction_on_a_bos_base_stores_the_activations_of_bos_first_text(bos_paths, tmp_path):
    from nla_lens.testing import AR_TEMPLATE
    from nla_lens.training import ExtractConfig, extract_activations, load_activations

    folder = bos_paths["gemma_av"]
    tokenizer = loading.load_tokenizer(folder)
    model = loading.load_hooked_transformer(folder, tokenizer, dtype=torch.float32, device="cpu")
    config = ExtractConfig(layer=LAYER, positions_per_doc=2, min_context=2, max_tokens=24, batch_size=2,
                           injection_char=GEMMA_MARKER, av_template=AV_TEMPLATE, ar_template=AR_TEMPLATE)
    acts = load_activations(extract_activations(model, tokenizer, [TEXT], tmp_path, config, progress=False))
    assert acts.meta.raw["tokenization"]["bos_token_id"] == tokenizer.bos_token_id
    ids = text_ids(tokenizer, TEXT)[:config.max_tokens]
    expected = _hf_resid(folder, ids)
    for record, vector in zip(acts.records, acts.vectors, strict=True):
        assert record.token_id == ids[record.position]
        assert (vector - expected[record.position]).abs().max() < ATOL


def test_a_multimodal_gemma_base_captures_as_its_text_model(bos_paths):
    text = _capture(bos_paths["gemma_av"], TEXT).vectors
    wrapped = _capture(bos_paths["gemma_av_multimodal"], TEXT).vectors
    assert torch.equal(text, wrapped)


def test_cli_text_capture_reads_a_leading_pad_id_token_as_a_real_one(tiny_paths):
    """Qwen's pad token is <|endoftext|>, which starts documents too: HookedTransformer masked it as left
    padding when it led the one unpadded text, and every residual after it moved."""
    folder = tiny_paths["av_karvonen"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.pad_token + TEXT
    ids = text_ids(tokenizer, text)
    assert ids[0] == tokenizer.pad_token_id
    captured = _capture(folder, text).vectors
    assert (captured - _hf_resid(folder, ids)).abs().max() < ATOL


@pytest.mark.skipif(not HAS_SAE_LENS, reason="needs sae-lens")
def test_sae_text_residuals_read_a_leading_pad_id_token_as_a_real_one(tiny_paths):
    from nla_lens.sae import text_residuals

    folder = tiny_paths["av_karvonen"]
    with pytest.warns(UserWarning, match="is an AV checkpoint"):  # a tiny model stands in for a base here
        base = nl.load_base(folder)
    text = base.tokenizer.pad_token + TEXT
    ids, resid = text_residuals(base, [text], LAYER)[0]
    assert ids[0] == base.tokenizer.pad_token_id
    assert (resid - _hf_resid(folder, ids)).abs().max() < ATOL


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_text_that_starts_with_its_bos_keeps_one_bos(bos_paths, tiny_paths, family):
    """A text copied with its BOS (`to_str_tokens`, a chat-formatted prompt) got a second one in front."""
    tokenizer = AutoTokenizer.from_pretrained(bos_paths[f"{family}_av"])
    assert text_ids(tokenizer, tokenizer.bos_token + TEXT) == text_ids(tokenizer, TEXT)
    qwen = AutoTokenizer.from_pretrained(tiny_paths["av_karvonen"])
    assert text_ids(qwen, qwen.pad_token + TEXT)[0] == qwen.pad_token_id  # no BOS rule: the text as written


def test_explain_and_cli_capture_of_bos_first_text_read_one_bos(bos_paths):
    av, ar = bos_paths["gemma_av"], bos_paths["gemma_ar"]
    nla = nl.NLA.from_pretrained(av, ar)
    with pytest.warns(UserWarning, match="not the base model"):  # a tiny AV stands in for the base here
        base = nl.load_base(av)
    bos = base.tokenizer.bos_token
    expected = _hf_resid(av, text_ids(base.tokenizer, TEXT))  # BOS at column 0, once
    explained = nla.explain(base, bos + TEXT, baseline=1.0, max_new_tokens=2)
    assert [row.position for row in explained.rows] == list(range(1, len(expected)))  # the BOS is not explained
    assert explained.tokens[0].count(bos) == 1
    assert (explained.vectors - expected[1:]).abs().max() < ATOL
    captured = _capture(av, bos + TEXT).vectors
    assert captured.shape == explained.vectors.shape and (captured - expected[1:]).abs().max() < ATOL


def test_to_tokens_of_bos_first_text_doubles_it_unless_prepend_bos_is_false(bos_paths):
    """What the README says of TransformerLens's own `to_tokens` on text that already holds its BOS."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"])
    text = av.tokenizer.bos_token + TEXT
    bos = av.tokenizer.bos_token_id
    assert av.model.to_tokens(text)[0, :2].tolist() == [bos, bos]
    assert av.model.to_tokens(text, prepend_bos=False)[0].tolist() == text_ids(av.tokenizer, text)
    assert text_ids(av.tokenizer, text).count(bos) == 1


def test_str_tokens_of_a_gemma_text_through_its_tokens(bos_paths):
    """The README's way past TL 3.9's `to_str_tokens(text)` on a Gemma tokenizer (a TypeError there): one
    string per token of `to_tokens(text)`, its BOS first."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"])
    tokens = av.model.to_tokens(TEXT)
    assert av.model.to_str_tokens(tokens) == [av.tokenizer.decode([t]) for t in text_ids(av.tokenizer, TEXT)]
    assert av.model.to_str_tokens(tokens)[0] == av.tokenizer.bos_token


def test_an_nla_exported_with_a_stray_bos_tokenizes_as_its_base_on_either_backend(tmp_path):
    """NLAs exported before the export copied the base's tokenizer files recorded the EOS TransformerLens had set as
    their BOS: TransformerLens then reloaded their tokenizer with add_bos_token=True, so the AV's model put `<|im_end|>`
    first where the Qwen-style base puts nothing, and the AV's model as the base was refused, not warned of."""
    import json
    import shutil

    from nla_lens.base_model import check_base_model
    from nla_lens.toy.demo import TOY_DIR

    folder = Path(shutil.copytree(TOY_DIR / "av", tmp_path / "av"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": config["eos_token"]}))
    av = nl.ActivationVerbalizer.from_pretrained(folder)
    assert av.model.tokenizer.encode(TEXT) == loading.load_tokenizer(TOY_DIR / "base").encode(TEXT)
    with pytest.warns(UserWarning, match="the AV's own model, a fine-tuned copy"):
        check_base_model(av.model, av)
