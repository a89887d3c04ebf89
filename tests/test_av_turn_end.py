"""How an AV training row ends: with the tokens the chat template closes an assistant turn with, as the paper's AV
SFT ends it (kitft `nla/rollout/sft_actor.py` through miles' `MultiTurnLossMaskGenerator`), up to the token the AV
stops on; not with the tokenizer's EOS, which on Gemma-3 is `<eos>`, a token its template never writes.

The real tokenizers are those of `test_qwen3_tokenizer_facts.py` and `test_bos_tokenizer_facts.py` (fetched by
`.ci/fetch_qwen3_tokenizer.sh` and `.ci/fetch_bos_tokenizers.sh`); each test skips when its tokenizer is absent.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import nla_lens as nl
from nla_lens import testing
from nla_lens.loading import load_tokenizer
from nla_lens.sidecar import load_meta
from nla_lens.toy import TOY_DIR
from nla_lens.training import LabelledActivations, av_rows
from nla_lens.training.dataset import response_text, turn_end_ids

PAPER_AV = ("We will pass the vector enclosed in <concept> tags into your context. You must then produce an "
            "explanation for the vector, enclosed within <explanation> tags.\n\nHere is the vector:\n\n"
            "<concept>{injection_char}</concept>\n\nPlease provide an explanation.")
EXPLANATIONS = ["The token ' cat', after 'The'. Animals; a short story.", "Line one\nline two: <concept> 3.5%", ""]
# The tokenizer's folder, its environment override, its marker facts, and the tokens its chat template writes
# after an assistant message: those the row ends with, then those it leaves out (they follow the stop).
QWEN3 = {"dir": "qwen3-tokenizer", "env": "NLA_QWEN3_TOKENIZER_DIR", "marker": "㈎", "marker_id": 149705,
         "left": 29, "right": 522, "suffix": [1318, 29, 366, 1708, 29], "row_end": [151645], "left_out": [198]}
GEMMA3 = {"dir": "gemma3-tokenizer", "env": "NLA_GEMMA3_TOKENIZER_DIR", "marker": "㈜", "marker_id": 246566,
          "left": 236813, "right": 954, "suffix": [1005, 236813, 655, 6011, 236813], "row_end": [106],
          "left_out": [107]}
LLAMA3 = {"dir": "llama3_1-tokenizer", "env": "NLA_LLAMA3_TOKENIZER_DIR", "marker": "㎡", "marker_id": 105565,
          "left": 29, "right": 524, "suffix": [1342, 29, 366, 1743, 29], "row_end": [128009], "left_out": []}


def _folder(family: dict) -> Path:
    folder = Path(os.environ.get(family["env"]) or Path("~/.cache/nla_lens").expanduser() / family["dir"])
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no real tokenizer in {folder}: run .ci/fetch_qwen3_tokenizer.sh / .ci/fetch_bos_tokenizers.sh")
    return folder


@functools.cache
def _load(folder: Path):  # a real tokenizer.json takes seconds to parse: once per session
    return load_tokenizer(folder)


def _meta(family: dict) -> nl.NLAMeta:
    tokens = {"injection_char": family["marker"], "injection_token_id": family["marker_id"],
              "injection_left_neighbor_id": family["left"], "injection_right_neighbor_id": family["right"],
              "critic_suffix_ids": family["suffix"]}
    return nl.parse_meta({
        "kind": "nla_model", "schema_version": 2, "role": "av", "d_model": 8, "extraction_layer_index": 2,
        "extraction": {"injection_scale": 150.0, "mse_scale": math.sqrt(8)}, "tokens": tokens,
        "prompt_templates": {"av": PAPER_AV, "ar": "<text>{explanation}</text> <summary>"},
    })


def _labelled(texts: list[str]) -> LabelledActivations:
    return LabelledActivations(torch.zeros(len(texts), 8), [f"doc-{i}" for i in range(len(texts))],
                               list(range(len(texts))), texts)


def _ids(encoded) -> list[int]:
    # transformers 5.x returns a BatchEncoding for tokenize=True (4.x: a list).
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.fixture(scope="module")
def gemma3_google_eos(tmp_path_factory):
    """The Gemma-3 tokenizer with the EOS google's IT models name, `<eos>` (id 1; their generation_config.json adds
    `<end_of_turn>`; huggingface/transformers#38182): the npm copy names `<end_of_turn>`."""
    folder = _folder(GEMMA3)
    copy = tmp_path_factory.mktemp("gemma3-google")
    (copy / "tokenizer.json").symlink_to(folder / "tokenizer.json")
    shutil.copy(folder / "tokenizer_config.json", copy)
    tokenizer = load_tokenizer(copy)
    tokenizer.eos_token = "<eos>"
    assert tokenizer.eos_token_id == 1
    return tokenizer


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "gemma3_google_eos", "llama3_1"])
def test_av_rows_end_as_the_chat_template_ends_the_assistant_turn_on_the_real_tokenizers(family, request):
    facts = {"qwen3": QWEN3, "gemma3": GEMMA3, "gemma3_google_eos": GEMMA3, "llama3_1": LLAMA3}[family]
    tokenizer = (request.getfixturevalue("gemma3_google_eos") if family == "gemma3_google_eos"
                 else _load(_folder(facts)))
    meta = _meta(facts)
    rows = av_rows(_labelled(EXPLANATIONS), meta, tokenizer)
    assert turn_end_ids(tokenizer) == facts["row_end"]
    for explanation, response in zip(EXPLANATIONS, rows.responses, strict=True):
        # The independent construction: the whole conversation through the chat template, tokenized in one step.
        conversation = [{"role": "user", "content": meta.av_prompt()},
                        {"role": "assistant", "content": response_text(explanation)}]
        full = _ids(tokenizer.apply_chat_template(conversation, tokenize=True))
        assert full[:rows.prompt.numel()] == rows.prompt.tolist()
        assert full[len(full) - len(response) - len(facts["left_out"]):] == response + facts["left_out"]


def test_the_toys_av_rows_are_unchanged_so_its_bundled_checkpoints_stay_valid():
    """The toy's template ends a turn with `<|im_end|>\\n`, its EOS then a newline: its rows still end with the EOS
    alone, token for token as when the bundled checkpoints were trained."""
    tokenizer, meta = load_tokenizer(TOY_DIR / "base"), load_meta(TOY_DIR / "av")
    rows = av_rows(_labelled(EXPLANATIONS), meta, tokenizer)
    as_trained = [tokenizer(response_text(e), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                  for e in EXPLANATIONS]
    assert rows.responses == as_trained


@pytest.mark.parametrize(("template", "message"), [
    ("{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}",
     r"ends an assistant turn with '\\n\\n', which holds no special token, so an AV trained with it would have no "
     r"token to stop on"),
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>{{ m['content'] }}<|im_end|>{% endif %}"
     "{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}",
     "does not write an assistant message's text"),
])
def test_a_chat_template_that_closes_no_turn_with_a_special_token_is_refused(template, message):
    tokenizer = testing.build_tokenizer()
    tokenizer.chat_template = template
    with pytest.raises(nl.ChatTemplateError, match=message):
        turn_end_ids(tokenizer)
