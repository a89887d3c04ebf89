"""`nla.explain` / `nla-lens explain`, `NLA.from_pretrained`, `nl.load_base` and `nl.toy.load`."""

from __future__ import annotations

import copy
import dataclasses
import html
import re
import shutil
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from base_batches import distinct_readouts, load_base, no_hooks_left
from conftest import saved_without

import nla_lens as nl
from nla_lens import metrics
from nla_lens.cli import main
from nla_lens.display import text_label
from nla_lens.explain import bos_skip, explain_tokens, select_positions
from nla_lens.loading import prepends_bos
from nla_lens.sidecar import text_ids
from nla_lens.toy.evaluate import MIN_CONTEXT
from nla_lens.toy.labeler import names_token
from nla_lens.verbalizer import Verbalization

FAST = {"max_new_tokens": 4}
TEXTS = ["The cat sat on the mat.", "A dog ran"]


@pytest.fixture(scope="module")
def toy():
    return nl.toy.load()


def test_explain_has_a_row_per_token_scored_as_a_round_trip_of_the_captured_vectors(base, nla, monkeypatch):
    distinct_readouts(nla.av, monkeypatch)
    ex = nla.explain(base, TEXTS, baseline=0.8, **FAST)
    ids = [base.tokenizer.encode(t, add_special_tokens=True) for t in TEXTS]
    sites = [(t, p) for t, row in enumerate(ids) for p in range(len(row))]
    assert [(r.text_index, r.position) for r in ex.rows] == sites
    assert [r.token for r in ex.rows] == [tok for t in TEXTS for tok in base.to_str_tokens(t, prepend_bos=False)]
    name = f"blocks.{nla.layer}.hook_resid_post"
    expected = torch.cat([base.run_with_cache(torch.tensor([row]), names_filter=name)[1][name][0] for row in ids])
    assert torch.equal(ex.vectors, expected.float())
    said = nla.av.verbalize(expected)
    assert [r.verbalization for r in ex.rows] == said
    # Each row's MSE from the AR alone, on the vector at that row's own site.
    scale = nla.ar.meta.mse_scale
    mse = metrics.mse_per_item(nla.ar.reconstruct([v.explanation for v in said]), expected.float(), scale)
    assert [r.mse for r in ex.rows] == pytest.approx(mse.tolist(), abs=1e-5)
    assert [r.fve for r in ex.rows] == pytest.approx((1 - mse / 0.8).tolist(), abs=1e-5)
    assert len({round(r.mse, 6) for r in ex.rows}) == len(ex.rows)
    records = ex.to_records()
    assert {r["baseline"] for r in records} == {0.8} and {r["baseline_source"] for r in records} == {"given"}
    assert set(records[0]) >= {"text_index", "position", "token", "explanation", "parsed", "text", "mse", "fve",
                               "baseline", "baseline_source", "layer"}
    assert ex.texts == TEXTS and no_hooks_left(base)


@pytest.mark.parametrize("where", ["end", "start"])
def test_a_pad_id_token_in_a_text_is_explained_as_a_real_token(base, nla, tiny_paths, where, monkeypatch):
    """Qwen's pad token is <|endoftext|>, which ends documents: explain runs one unpadded text, so such a token
    is real (as in plain HF). It was taken for padding: an InputError for every text holding it at either end."""
    from hf_reference import load_hf

    distinct_readouts(nla.av, monkeypatch)
    pad = base.tokenizer.pad_token
    text = TEXTS[0] + pad if where == "end" else pad + TEXTS[0]
    ex = nla.explain(base, text, baseline=0.8, **FAST)
    ids = base.tokenizer.encode(text, add_special_tokens=True)
    assert base.tokenizer.pad_token_id in (ids[0], ids[-1])
    assert [r.position for r in ex.rows] == list(range(len(ids)))
    hf, _ = load_hf(tiny_paths["av_karvonen"])
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[nla.layer + 1][0]
    assert torch.allclose(ex.vectors, expected, rtol=0, atol=1e-4)
    assert no_hooks_left(base)


def test_explain_runs_under_the_users_hooks(base, nla):
    name = f"blocks.{nla.layer}.hook_resid_post"
    push = torch.randn(64, generator=torch.Generator().manual_seed(3))
    plain = nla.explain(base, TEXTS[0], positions=[-1, 0], baseline=0.8, **FAST)
    with base.hooks(fwd_hooks=[(name, lambda resid, hook: resid + push)]):
        steered = nla.explain(base, TEXTS[0], positions=[-1, 0], baseline=0.8, **FAST)
    passed = nla.explain(base, TEXTS[0], positions=[-1, 0], baseline=0.8,
                         fwd_hooks=[(name, lambda resid, hook: resid + push)], **FAST)
    assert torch.allclose(steered.vectors, plain.vectors + push, atol=1e-5)
    assert torch.equal(passed.vectors, steered.vectors)
    assert no_hooks_left(base)


def test_a_zeroed_residual_is_named_by_its_text_position_and_token(base, nla):
    """A hook zeroing layer K at one column failed the call naming "rows [2, 6]" of the concatenated captures."""
    def ablate(resid, hook):
        resid[:, 2] = 0
        return resid

    name = f"blocks.{nla.layer}.hook_resid_post"
    tokens = [[base.tokenizer.decode([i]) for i in base.tokenizer.encode(text)] for text in TEXTS]
    with pytest.raises(nl.VectorError, match=re.escape(f"the layer-{nla.layer} residual at text 0 position 2 "
                                                       f"({tokens[0][2]!r}), text 1 position 2 ({tokens[1][2]!r}) "
                                                       "is zero or not finite")):
        nla.explain(base, TEXTS, fwd_hooks=[(name, ablate)], baseline=0.8, **FAST)
    assert no_hooks_left(base)
    assert len(nla.explain(base, TEXTS, positions=[0, 1], fwd_hooks=[(name, ablate)], baseline=0.8, **FAST).rows) == 4


def test_past_five_sites_a_refusal_names_the_first_five_and_counts_the_rest(base, nla):
    """Sites are named as the experiments name theirs (`checks.first_five`): five, then how many more."""
    def ablate(resid, hook):
        resid[:, 1:] = 0
        return resid

    name = f"blocks.{nla.layer}.hook_resid_post"
    tokens = [[base.tokenizer.decode([i]) for i in base.tokenizer.encode(text)] for text in TEXTS]
    zeroed = [(t, p) for t, row in enumerate(tokens) for p in range(1, len(row))]
    shown = ", ".join(f"text {t} position {p} ({tokens[t][p]!r})" for t, p in zeroed[:5])
    assert len(zeroed) > 5
    with pytest.raises(nl.VectorError, match=re.escape(f"residual at {shown} and {len(zeroed) - 5} more is zero")):
        nla.explain(base, TEXTS, fwd_hooks=[(name, ablate)], baseline=0.8, **FAST)


def test_the_round_trips_warnings_name_each_row_by_its_text_position_and_token(base, nla, monkeypatch):
    """A failed injection, a reconstruction with no direction and a sample that ran on past its tag were named by
    their index among every text's explained positions ("rows [9]"), a number the explain table does not show."""
    tokens = [[base.tokenizer.decode([i]) for i in base.tokenizer.encode(text)] for text in TEXTS]
    sites = [(t, p) for t, row in enumerate(tokens) for p in range(len(row))]
    echoed, directionless, ran_on = sites.index((1, 1)), sites.index((1, 2)), sites.index((0, 2))
    marker = nla.av.meta.injection_char
    cat = Verbalization("<explanation>the cat</explanation>", "the cat", [])
    said = [cat] * len(sites)
    said[echoed] = Verbalization(f"<explanation>{marker}</explanation>", marker, [])
    said[ran_on] = Verbalization("<explanation>the cat</explanation> and", "the cat", [], truncated=True)
    monkeypatch.setattr(nla.av, "verbalize", lambda v, **kw: said)

    def zero_one_reconstruction(resid, hook):  # every explanation parses and fits: the AR reads every row in order
        resid[directionless] = 0.0
        return resid

    with nla.ar.model.hooks(fwd_hooks=[(f"blocks.{nla.layer}.hook_resid_post", zero_one_reconstruction)]):
        explained = nla.explain(base, TEXTS, baseline=0.8, **FAST)

    assert [r.miss for r in explained.rows] == [i == directionless for i in range(len(sites))]
    n, warned = len(sites), explained.round_trip.warnings
    assert len(warned) == 3 and not any("rows [" in w for w in warned)
    assert warned[0].startswith(f"1/{n} AV outputs echo the marker {marker!r} or are mostly CJK (text 1 position 1 "
                                f"({tokens[1][1]!r})): the injection probably failed")
    assert warned[1].startswith(f"1/{n} reconstructions have no direction (NaN, Inf or zero; text 1 position 2 "
                                f"({tokens[1][2]!r})), scored as misses")
    assert warned[2].startswith(f"1/{n} explanations closed their tag but the AV did not end the sample before "
                                f"max_new_tokens (text 0 position 2 ({tokens[0][2]!r})): the round trip scores them")
    assert no_hooks_left(base)

def test_a_hook_name_typo_or_a_lone_pair_in_fwd_hooks_is_a_typed_error_naming_the_fix(base, nla):
    """TL answers both with a bare KeyError / ValueError; explain says which name it meant and the form."""
    typo = f"blocks.{nla.layer}.hook_resid_pst"
    with pytest.raises(nl.InputError, match=rf"'{typo}', which is not a hook point.*did you mean "
                                            rf"'blocks.{nla.layer}.hook_resid_post'"):
        nla.explain(base, TEXTS[0], fwd_hooks=[(typo, lambda resid, hook: resid)], **FAST)
    with pytest.raises(nl.InputError, match=r"list of \(hook_name, hook_fn\) pairs.*fwd_hooks=\[\(name, fn\)\]"):
        nla.explain(base, TEXTS[0], fwd_hooks=("blocks.0.hook_resid_post", lambda resid, hook: resid), **FAST)
    assert no_hooks_left(base)


@pytest.mark.parametrize(("point", "setter"), [("attn.hook_result", "set_use_attn_result"),
                                             ("hook_mlp_in", "set_use_hook_mlp_in"),
                                             ("hook_q_input", "set_use_split_qkv_input")])
def test_a_hook_where_tl_computes_only_when_asked_is_a_typed_error_naming_the_switch(base, nla, point, setter):
    """HookedTransformer attached such a hook and never ran it: explain returned the unhooked explanations as the
    ablated ones. The bridge refused it with a bare ValueError. Once switched on, the hook runs."""
    name = f"blocks.0.{point}"
    calls = []

    def record(activation, hook):
        calls.append(activation.shape)

    with pytest.raises(nl.InputError, match=rf"'{re.escape(name)}', which TransformerLens computes only when asked.*"
                                            rf"base\.{setter}\(True\) first"):
        nla.explain(base, TEXTS[0], positions=-1, fwd_hooks=[(name, record)], **FAST)
    assert calls == [] and no_hooks_left(base)
    getattr(base, setter)(True)
    try:
        nla.explain(base, TEXTS[0], positions=-1, fwd_hooks=[(name, record)], **FAST)
    finally:
        getattr(base, setter)(False)
    assert len(calls) == 1 and no_hooks_left(base)


def test_positions_select_the_same_tokens_in_every_text():
    assert select_positions(None, 5) == [0, 1, 2, 3, 4]
    assert select_positions(None, 5, skip=1) == [1, 2, 3, 4]  # a BOS the tokenizer added
    assert select_positions(-1, 5) == [4] and select_positions([3, -1, 3], 5) == [3, 4]
    assert select_positions(slice(2, None), 5) == [2, 3, 4]
    with pytest.raises(nl.InputError, match="outside a text of 5 tokens"):
        select_positions([7], 5)
    with pytest.raises(nl.InputError, match=r"^positions 9: select no token of a text of 5 tokens \(0..4\); pick"):
        select_positions(slice(9, None), 5)  # written as the CLI's --positions takes it, not slice(9, None, None)
    with pytest.raises(nl.InputError, match=r"^positions 1:1:2 select no token"):
        select_positions(slice(1, 1, 2), 5)
    with pytest.raises(nl.InputError, match="positions must be"):
        select_positions("last", 5)


def test_explain_positions_take_numpy_integers_not_numpy_bools():
    """NumPy ints (an argmax over a text's tokens) were refused as not an int, as capture's positions refused them."""
    assert select_positions(np.int64(-1), 5) == [4]
    assert select_positions([np.int32(3), np.int64(-1)], 5) == [3, 4]
    assert select_positions(slice(np.int64(2), None), 5) == [2, 3, 4]
    for wrong in (np.bool_(True), [np.bool_(True)], np.float64(1.0)):
        with pytest.raises(nl.InputError, match="positions must be"):
            select_positions(wrong, 5)


def test_explain_positions_take_integer_tensors_and_arrays_as_capture_does(base, nla, monkeypatch):
    """A 1-d integer tensor or NumPy array and a 0-d one (an argmax) were refused as 'positions must be', though
    nl.capture takes them; float and bool ones stay refused."""
    for given in (torch.tensor([3, -1]), np.array([3, -1]), torch.tensor([3, -1], dtype=torch.int32),
                  np.array([3, -1], dtype=np.int16)):
        assert select_positions(given, 5) == [3, 4]
    assert select_positions(torch.tensor([0.1, 0.2, 0.3, 0.4, 4.0]).argmax(), 5) == [4]
    assert select_positions(np.array(-2), 5) == [3]
    for wrong in (torch.tensor([1.0]), torch.tensor([True]), torch.tensor(2.0), torch.tensor([[1, 2]]),
                  np.array([1.0]), np.array([True]), np.array(True), torch.tensor([], dtype=torch.long)):
        with pytest.raises(nl.InputError, match=r"^positions must be None \(every token\), an int, a non-empty list"):
            select_positions(wrong, 5)
    distinct_readouts(nla.av, monkeypatch)
    listed = nla.explain(base, TEXTS, positions=[0, -1], baseline=0.8, **FAST)
    tensor = nla.explain(base, TEXTS, positions=torch.tensor([0, -1]), baseline=0.8, **FAST)
    assert [(r.text_index, r.position) for r in tensor.rows] == [(r.text_index, r.position) for r in listed.rows]
    assert len(tensor.rows) == 4


@pytest.mark.parametrize("positions", [slice(None, None, 0), slice(1.0, None), slice("a", None)])
def test_a_slice_of_positions_with_step_zero_or_non_int_bounds_is_an_input_error(positions):
    """A step of 0 raised Python's bare ValueError, a float or str bound its TypeError, from inside select_positions."""
    with pytest.raises(nl.InputError, match=r"^positions .* is not a slice of token positions: its start, stop and "
                                            r"step are ints \(or left out\) and its step is not 0"):
        select_positions(positions, 5)


def test_entry_points_given_the_bundled_toy_itself_say_to_pass_toy_nla(toy):
    """Each said "got ToyNLA" and no more, though the toy holds the NLA they want as `toy.nla`."""
    tokens = toy.base.to_tokens("the king is dead")
    d = toy.av.meta.d_model
    calls = {
        "explain": lambda: nl.explain(toy, toy.base, "the king is dead"),
        "explain_tokens": lambda: explain_tokens(toy, toy.base, tokens),
        "steer_with_words": lambda: nl.steer_with_words(toy, toy.base, tokens, -1, edit="queen"),
        "describe_difference": lambda: nl.describe_difference(toy, torch.ones(1, d), torch.zeros(1, d)),
        "steer_then_verbalize": lambda: nl.steer_then_verbalize(toy.base, toy, tokens, steering_vector=torch.ones(d),
                                                                scale=1.0, steer_layer=0),
        "patching_study": lambda: nl.patching_study(toy.base, toy, tokens, tokens, patch_layer=0, patch_position=-1),
        "verbalize_direction": lambda: nl.verbalize_direction(toy, torch.ones(1, d)),
    }
    for call in calls.values():
        with pytest.raises(nl.InputError, match=r"got ToyNLA \(the bundled toy, not an NLA itself: pass toy\.nla\)"):
            call()
    with pytest.raises(nl.InputError, match=r"got int$"):  # anything else is named by its type alone
        nl.steer_with_words(3, toy.base, tokens, -1, edit="queen")


def test_a_position_outside_a_one_token_text_counts_one_token_in_words():
    """It said "outside text 0 ('x') of 1 tokens"."""
    with pytest.raises(nl.InputError, match=re.escape("position 2 is outside text 0 ('x') of 1 token (0..0, or -1")):
        select_positions(2, 1, text="text 0 ('x')")
    with pytest.raises(nl.InputError, match=re.escape("positions 3: select no token of a text of 1 token (0..0);")):
        select_positions(slice(3, None), 1)


def test_a_text_opening_with_two_bos_strings_keeps_both_where_the_tokenizer_adds_no_bos(toy):
    """The toy's tokenizer names <|im_end|> its bos_token but never puts it first: text_ids dropped the text's own
    first <|im_end|> of two, so every explained token sat one position off the text's tokens."""
    tokenizer = toy.base.tokenizer
    bos = tokenizer.bos_token
    assert bos is not None and not prepends_bos(tokenizer)
    text = f"{bos}{bos} the king"
    assert text_ids(tokenizer, text) == tokenizer.encode(text)
    explained = toy.nla.explain(toy.base, text, positions=[0, 1], max_new_tokens=4)
    assert explained.tokens[0][:2] == [bos, bos] and len(explained.tokens[0]) == len(tokenizer.encode(text))


def test_a_base_tokenizer_with_another_bos_rule_than_the_nlas_is_a_pair_mismatch(toy, monkeypatch):
    """A base whose tokenizer put a BOS first where the NLA's puts none (or none where it puts one) was explained
    silently, every text starting with a token the NLA was never trained to read there."""
    plain = toy.base.tokenizer
    adds_bos = copy.deepcopy(plain)
    adds_bos.add_bos_token = True
    assert prepends_bos(adds_bos) and not prepends_bos(plain)
    monkeypatch.setattr(toy.base, "tokenizer", adds_bos)
    with pytest.raises(nl.PairMismatchError, match=re.escape(
            "the base model's tokenizer puts a BOS first and the NLA's tokenizer does not: its texts would not be "
            "tokenized as the NLA's training texts were. Set base.tokenizer = nla.av.tokenizer, or load the base")):
        toy.nla.explain(toy.base, "the king is dead", max_new_tokens=4)
    from nla_lens.base_model import check_bos_rule

    with pytest.raises(nl.PairMismatchError, match=r"^the base model's tokenizer puts no BOS first and the NLA's "
                                                   r"tokenizer does:"):
        check_bos_rule(plain, adds_bos)
    check_bos_rule(plain, plain)


@pytest.mark.parametrize("run", ["steer_then_verbalize", "patching_study", "steer_with_words"])
def test_every_experiment_refuses_a_base_tokenizer_with_another_bos_rule_before_it_runs(toy, monkeypatch, run):
    """explain refused a base whose tokenizer puts a BOS first where the NLA's puts none; the experiments, whose
    tokens come from the same base.to_tokens, ran on them silently. check_base_model now checks the rule for all."""
    tokens = toy.base.to_tokens(["the king is dead"])
    adds_bos = copy.deepcopy(toy.base.tokenizer)
    adds_bos.add_bos_token = True
    monkeypatch.setattr(toy.base, "tokenizer", adds_bos)
    monkeypatch.setattr(toy.base, "run_with_hooks", lambda *a, **k: pytest.fail("ran the base"))
    calls = {
        "steer_then_verbalize": lambda: nl.steer_then_verbalize(toy.base, toy.nla, tokens, steer_layer=0, scale=1.0,
                                                                steering_vector=torch.ones(toy.base.cfg.d_model)),
        "patching_study": lambda: nl.patching_study(toy.base, toy.nla, tokens, tokens, patch_layer=0,
                                                    patch_position=0),
        "steer_with_words": lambda: nl.steer_with_words(toy.nla, toy.base, tokens, -1, edit="a dog"),
    }
    with pytest.raises(nl.PairMismatchError, match="^the base model's tokenizer puts a BOS first and the NLA's"):
        calls[run]()


def test_explain_refuses_empty_texts_with_a_typed_error(base, nla):
    for bad in ("", [], ["fine", ""]):
        with pytest.raises(nl.InputError, match="non-empty"):
            nla.explain(base, bad)
    with pytest.raises(nl.InputError, match=r"^text 1 is empty: pass non-empty texts"):
        nla.explain(base, ["fine", ""])


def test_explain_says_a_whitespace_only_text_is_blank_not_empty(base, nla):
    """It said "pass non-empty texts" of '   ', which is not empty."""
    for bad, i, blank in (("   ", 0, "   "), (["fine", "  "], 1, "  "), (["\n\t"], 0, "\n\t")):
        with pytest.raises(nl.InputError, match=rf"^text {i} is {re.escape(repr(blank))}, blank \(whitespace only\): "
                                                "pass texts with a non-space character") as info:
            nla.explain(base, bad)
        assert "non-empty" not in str(info.value)


def test_a_lone_surrogate_in_a_text_or_an_explanation_is_named_before_the_tokenizer_sees_it(base, nla):
    """A lone surrogate (a JSON '\\ud800' escape) reached the tokenizers, whose bare TypeError ("TextEncodeInput must
    be ...") named no text; the AR's explanations alike."""
    said = r"holds '\\ud800' at character 4, a lone surrogate, which is no Unicode character .*text\.encode\('utf-8', "
    with pytest.raises(nl.InputError, match=r"^text 1 " + said):
        nla.explain(base, ["fine", "bad \ud800 text"])
    with pytest.raises(nl.InputError, match=r"^explanation 0 " + said):
        nla.ar.reconstruct(["bad \ud800 text", "fine"])


def test_explain_says_texts_are_str_and_what_it_got_instead(base, nla):
    """It said "pass a non-empty text" for a number, None or a tensor of token ids; bytes it read as ints ("text 0
    is int"), and a dict it explained silently, its keys as the texts."""
    for bad, said in [(3, ", got int"), (None, ", got NoneType"), (["fine", 7], "; text 1 is int"),
                      (b"a cat", ", got bytes; decode it first (text.decode('utf-8'))"),
                      ({"a cat": 1}, ", got dict; pass the texts as a list (list(d.values()) for a dict of texts)"),
                      (torch.tensor([[1, 2]]),
                       ", got Tensor; token ids go to explain_tokens (from nla_lens.explain import explain_tokens)")]:
        with pytest.raises(nl.InputError, match=re.escape(f"explain takes a str or a list of str{said}")):
            nla.explain(base, bad)


def test_explain_tokens_says_its_rows_hold_token_ids(base, nla):
    """A string among the ids raised torch's bare ValueError; rows of tensor ids (to_tokens' rows) still run."""
    from nla_lens.explain import explain_tokens

    for bad in ([[1, "2"]], [[1, [2, 3]]]):
        with pytest.raises(nl.InputError, match=r"^token_rows\[0\] must hold integer token ids, got "):
            explain_tokens(nla, base, bad)
    ids = base.to_tokens("a b")[0]
    assert explain_tokens(nla, base, [ids], max_new_tokens=4).rows == explain_tokens(
        nla, base, [ids.tolist()], max_new_tokens=4).rows


def test_explain_tokens_takes_to_tokens_of_one_text_as_its_one_row(base, nla):
    """The tensor explain's own error sends token ids on with (base.to_tokens(text), [1, pos]) raised torch's
    "Boolean value of Tensor with more than one value is ambiguous"."""
    tokens = base.to_tokens("a b")
    assert explain_tokens(nla, base, tokens, max_new_tokens=4).rows == explain_tokens(
        nla, base, [tokens[0].tolist()], max_new_tokens=4).rows


@pytest.mark.parametrize(("token_rows", "message"), [
    (torch.tensor([[5, 6], [7, 8]]), r"^token_rows is a tensor of shape \[2, 2\]; pass a list of each text's own "
                                     r"unpadded ids"),
    (torch.tensor([5, 6]), r"^token_rows is a tensor of shape \[2\]"),
    ([5, 6], r"^token_rows holds ids, not rows of ids: pass a list of rows, one per text \(\[ids\] for one\)"),
    ("5 6", r"^token_rows must be a list of token-id rows, one per text, got str"),
])
def test_explain_tokens_refuses_rows_that_are_not_one_list_per_text(base, nla, token_rows, message):
    """A flat list of ids was a bare TypeError (len of an int), a [2, pos] tensor torch's RuntimeError; a padded
    batch's pads would be explained as tokens."""
    with pytest.raises(nl.InputError, match=message):
        explain_tokens(nla, base, token_rows, max_new_tokens=4)


@pytest.mark.parametrize(("keywords", "message"), [
    ({"skip": [0]}, r"^skip gives 1 for 2 rows of token_rows; give one per row, or leave skip out"),
    ({"texts": ["a b"]}, r"^texts gives 1 for 2 rows of token_rows; give one per row, or leave texts out"),
    ({"skip": [0, -2]}, r"^skip holds -2: each entry is how many leading tokens of its row to leave out"),
])
def test_explain_tokens_checks_skip_and_texts_give_one_entry_per_row(base, nla, keywords, message):
    """A short skip or texts was zip's bare ValueError; a negative skip explained positions from the end, each twice
    (a 4-token row gave 7 rows)."""
    ids = base.to_tokens("a b")[0].tolist()
    with pytest.raises(nl.InputError, match=message):
        explain_tokens(nla, base, [ids, ids], max_new_tokens=4, **keywords)


def test_a_position_outside_a_text_names_that_text(base, nla):
    """It said "outside a text of 3 tokens" without saying which of the texts."""
    long, short = "The cat sat on the mat and then it slept all day long", "A dog"
    n = len(base.to_tokens(short)[0])
    with pytest.raises(nl.InputError, match=re.escape(f"position 5 is outside text 1 ('A dog') of {n} tokens")):
        nla.explain(base, [long, short], positions=5, **FAST)
    with pytest.raises(nl.InputError, match=re.escape("select no token of text 0 ('The cat sat on the mat and th…')")):
        nla.explain(base, [long, short], positions=slice(50, None), **FAST)


def test_a_text_past_the_context_names_that_text(base, nla):
    """It said "a text is N tokens" without saying which of the texts."""
    from nla_lens.explain import explain_tokens

    n_ctx = base.cfg.n_ctx
    long = " ".join(["cat"] * 2 * n_ctx)
    n = len(base.to_tokens(long, truncate=False)[0])
    with pytest.raises(nl.PromptTooLongError, match=re.escape(
            f"text 1 ('cat cat cat cat cat cat cat c…') is {n} tokens, over the base model's context of {n_ctx}; "
            "split it into shorter texts")):
        nla.explain(base, ["A dog", long], **FAST)
    with pytest.raises(nl.PromptTooLongError, match=re.escape(f"token_rows[0] is {n_ctx + 1} tokens")):
        explain_tokens(nla, base, [[1] * (n_ctx + 1)])


def test_arguments_in_the_wrong_order_or_of_the_wrong_kind_are_named(base, nla):
    with pytest.raises(nl.PairMismatchError, match="AR first and the AV second: swap them"):
        nl.NLA(nla.ar, nla.av)
    with pytest.raises(nl.InputError, match="got HookedTransformer and ActivationReconstructor|got TransformerBridge"):
        nl.NLA(base, nla.ar)
    with pytest.raises(nl.BackendError, match="got str; check the order of the arguments"):
        nla.explain("the cat", base)


def test_explain_given_an_av_or_a_base_folder_says_what_to_pass(base, nla, tiny_paths):
    """nl.explain(av, ...) was an AttributeError ('ActivationVerbalizer' object has no attribute 'layer');
    a base folder got only "check the order of the arguments"."""
    with pytest.raises(nl.InputError, match=r"explain needs an NLA \(AV and AR: nl\.NLA\(av, ar\)\), got "
                                            "ActivationVerbalizer"):
        nl.explain(nla.av, base, "the cat")
    with pytest.raises(nl.BackendError, match=r"got str; check the order of the arguments, and load a model folder "
                                              r"first: nl\.load_base\(path\)"):
        nla.explain(str(tiny_paths["av_karvonen"]), "the cat")


def test_a_base_without_a_tokenizer_is_told_a_fix_that_exists(base, nla, monkeypatch):
    """explain has no tokenizer= argument (it went on to verbalize as a TypeError); the message says what works."""
    monkeypatch.setattr(base, "tokenizer", None)
    with pytest.raises(nl.InputError, match="no tokenizer") as raised:
        nla.explain(base, "the cat")
    assert "tokenizer=" not in str(raised.value) and "base.tokenizer" in str(raised.value)


def test_explain_tokens_with_a_base_without_a_tokenizer_is_told_a_fix_that_exists(base, nla, monkeypatch):
    """explain_tokens decodes each token to name it; a base without a tokenizer was an AttributeError on None."""
    ids = [base.tokenizer.encode("the cat", add_special_tokens=True)]
    monkeypatch.setattr(base, "tokenizer", None)
    with pytest.raises(nl.InputError, match="no tokenizer.*set base.tokenizer"):
        explain_tokens(nla, base, ids, positions=-1, max_new_tokens=2)


def test_explaining_with_the_avs_own_model_as_base_warns_at_the_callers_line(nla):
    """From nla.explain the warning pointed at a line of nla_lens's explain.py, not the user's."""
    ids = [nla.av.model.to_tokens("the cat")[0].tolist()]
    for run in (lambda: nla.explain(nla.av.model, "the cat", positions=-1, max_new_tokens=2),
                lambda: explain_tokens(nla, nla.av.model, ids, positions=-1, max_new_tokens=2)):
        with pytest.warns(UserWarning, match="the AV's own model, a fine-tuned copy") as seen:
            run()
        assert [w.filename for w in seen if "AV's own model" in str(w.message)] == [__file__]


def test_the_ars_own_model_as_base_is_refused(nla):
    """Its first K+1 blocks run and gave plausible FVEs from fine-tuned activations; refused as an AR folder is."""
    tokens = nla.av.model.to_tokens("the cat")
    calls = (lambda: nla.explain(nla.ar.model, "the cat", positions=-1, **FAST),
             lambda: nl.steer_then_verbalize(nla.ar.model, nla, tokens, steering_vector=torch.ones(nla.av.meta.d_model),
                                             scale=1.0, steer_layer=0, **FAST),
             lambda: nl.patching_study(nla.ar.model, nla, tokens, tokens, patch_layer=0, patch_position=0, **FAST),
             lambda: nl.steer_with_words(nla, nla.ar.model, tokens, positions=-1, edit="a dog"))
    for call in calls:
        with pytest.raises(nl.InputError, match="the AR's own model"):
            call()


def test_an_av_and_ar_from_different_training_stages_warn(toy):
    from nla_lens.toy.demo import TOY_DIR
    from nla_lens.toy.evaluate import ToyNLA

    rl = ToyNLA.load(TOY_DIR, pair="rl")
    with pytest.warns(UserWarning, match="stage 'sft' and the AR from 'rl'"):
        nl.NLA(toy.av, rl.ar)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nl.NLA(rl.av, rl.ar)


def test_an_av_and_ar_recorded_from_different_bases_warn(tiny_paths, tmp_path):
    """Same width and layer, so `check_pair` passes; the recorded base names differ. A hub id and a local
    folder of the same model (last path part, any case) do not warn."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"])
    assert av.meta.base_model == "tiny-qwen3"
    for recorded, warns in (("org/Other-Model", True), ("/models/TINY-QWEN3", False)):
        folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / recorded.replace("/", "_"))
        meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
        meta["extraction"]["base_model"] = recorded
        (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
        ar = nl.ActivationReconstructor.from_pretrained(folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nl.NLA(av, ar)
        messages = [str(w.message) for w in caught]
        assert any("names base model 'tiny-qwen3' and the AR's 'org/Other-Model'" in m for m in messages) == warns


def test_the_toys_base_by_its_name_by_its_path_and_by_a_link_is_one_base(toy, tmp_path):
    """The AV's sidecar names the toy's base by name; an AR trained from its folder records the path (the last
    parts differ): both name one folder here, so no warning that the bases differ."""
    from nla_lens.toy.demo import TOY_DIR

    assert toy.av.meta.base_model == nl.toy.BASE_MODEL
    (tmp_path / "link").symlink_to(TOY_DIR / "base")
    for i, recorded in enumerate((str(TOY_DIR / "base"), str(tmp_path / "link"))):
        folder = shutil.copytree(TOY_DIR / "ar", tmp_path / f"ar{i}")
        meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
        meta["extraction"]["base_model"] = recorded
        (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
        ar = nl.ActivationReconstructor.from_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            nl.NLA(toy.av, ar)


def test_nla_from_pretrained_checks_the_pair_before_loading(tiny_paths, tmp_path):
    nla = nl.NLA.from_pretrained(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"])
    assert nla.layer == nla.ar.meta.layer and nla.av.injection_spec.method == "karvonen"
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    meta["extraction"]["layer_index"] = 1
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    (folder / "model.safetensors").write_bytes(b"not weights")  # never read: the sidecars already disagree
    with pytest.raises(nl.PairMismatchError, match="layer"):
        nl.NLA.from_pretrained(tiny_paths["av_karvonen"], folder)


def test_load_base_warns_on_an_av_refuses_an_ar_and_names_a_missing_base(tiny_paths, nla):
    with pytest.warns(UserWarning, match="is an AV checkpoint, a fine-tuned copy"):
        nl.load_base(tiny_paths["av_karvonen"])
    with pytest.raises(nl.InputError, match="is an AR checkpoint, which holds only the first K\\+1 blocks"):
        nl.load_base(tiny_paths["ar_nanonla"])  # it used to fail later, on missing ln_final / unembed weights
    with pytest.raises(nl.CheckpointError, match="hf download"):
        nl.load_base(nla.av.meta)  # the tiny sidecar names a hub id that is not in the cache


@pytest.mark.parametrize(("base_model", "expected"), [
    ("runs/sft/base", "the sidecar names base model 'runs/sft/base': no such folder (relative to "),
    ("/gone/base", "the sidecar names base model '/gone/base': no such folder. An export records"),
    ("nobody/no-such-base", "Download it (hf download nobody/no-such-base), or pass"),
])
def test_load_base_of_a_missing_base_says_what_is_missing_and_both_ways_to_pass_one(nla, base_model, expected):
    with pytest.raises(nl.CheckpointError) as info:
        nl.load_base(dataclasses.replace(nla.av.meta, base_model=base_model))
    message = str(info.value)
    assert expected in message
    assert "--base path/to/base (nla-lens explain) or nl.load_base('path/to/base')" in message
    assert ("hf download" in message) == (base_model == "nobody/no-such-base")


def test_no_tl_deprecation_nag_and_no_progress_bars_from_library_calls(tiny_paths, av_karvonen, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_base(tiny_paths["av_karvonen"])
    assert not [w for w in caught if "enable_compatibility_mode" in str(w.message)]
    capfd.readouterr()
    av_karvonen.verbalize(torch.randn(2, 64), **FAST)
    assert capfd.readouterr().err == ""


def test_the_toy_explains_held_out_shakespeare_with_meaningful_scores(toy):
    text = nl.toy.heldout_texts(1)[0]
    ex = toy.nla.explain(toy.base, text, max_new_tokens=48, batch_size=64)
    rt = ex.round_trip
    assert rt.baseline_source == "sidecar (held-out)" and rt.baseline_n > 1000
    assert rt.fve > 0.5 and rt.n_failed_parses <= len(ex.rows) // 10
    late = [r for r in ex.rows if r.position >= MIN_CONTEXT]
    ids = toy.base.tokenizer.encode(text, add_special_tokens=True)
    named = [names_token(r.explanation, toy.av.tokenizer, ids[r.position]) for r in late]
    assert sum(named) >= 0.5 * len(late)  # the AV names the token it reads for most positions
    html = ex._repr_html_()
    assert "blocks.3.hook_resid_post" in html and html.count("<tr>") == len(ex.rows) + 1


def test_load_base_finds_the_toy_base_from_its_sidecar(toy):
    base = nl.load_base(toy.nla)
    assert torch.equal(base.W_E, toy.base.W_E) and base.cfg.n_layers == toy.base.cfg.n_layers


def test_load_base_of_the_toy_itself_points_at_its_base(toy):
    """`nl.load_base(nl.toy.load())` is a newcomer's first guess; the toy already holds its base."""
    with pytest.raises(nl.InputError, match=r"got ToyNLA; it carries its base model already: use its \.base"):
        nl.load_base(toy)
    with pytest.raises(nl.InputError, match=r"got int$"):
        nl.load_base(3)


def test_explain_command_prints_rows_and_writes_them(tmp_path, capsys):
    toy_dir = nl.toy.TOY_DIR
    out = tmp_path / "rows.parquet"
    assert main(["explain", "--av", str(toy_dir / "av"), "--ar", str(toy_dir / "ar"), "--text", "Romeo: wherefore art",
                 "--text", "Thou art a villain", "--positions", "-1", "--max-new-tokens", "48", "--output",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[0] Romeo: wherefore art" in printed and "[1] Thou art a villain" in printed
    assert "sidecar (held-out)" in printed and printed.count("The token") == 2
    rows = pq.read_table(out).to_pylist()
    assert [r["text_index"] for r in rows] == [0, 1] and all(r["fve"] is not None for r in rows)
    assert [r["input_text"] for r in rows] == ["Romeo: wherefore art", "Thou art a villain"]


@pytest.mark.parametrize("value, positions", [("-1", [-1]), ("=-2,-1", [-2, -1]), ("=-4:", slice(-4, None)),
                                             ("=3,-1", [3, -1]), ("=8:", slice(8, None))])
def test_explain_positions_take_the_forms_the_help_shows(value, positions):
    from nla_lens.cli import build_parser

    flag = ["--positions" + value] if value.startswith("=") else ["--positions", value]
    args = build_parser().parse_args(["explain", "--av", "a", "--ar", "b", "--text", "x", *flag])
    assert args.positions == positions


@pytest.mark.parametrize("value", ["=1,,2", "=3,", "=", "=,-1", "=::0", "=1:4:0"])
def test_explain_positions_refuse_empty_entries(value, capsys):
    """'1,,2' was read as [1, 2] and '=' as no positions at all: a typo now stops at the parser."""
    from nla_lens.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["explain", "--av", "a", "--ar", "b", "--text", "x", "--positions" + value])
    assert "expected positions such as 3,5,-1" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--text", ""], "nothing to explain"),
    (["--file", "/no/such/file.txt"], "does not exist"),
    (["--text", "hi", "--output", "/no/such/dir/out.parquet"], "does not exist"),
    (["--text", "hi", "--output", "out.csv"], r"\.parquet or \.jsonl"),
    (["--text", "hi", "--device", "gpu"], "not a torch device"),
])
def test_explain_command_rejects_bad_input_before_loading_anything(args, message, capsys, tmp_path):
    assert main(["explain", "--av", str(tmp_path / "missing"), "--ar", str(tmp_path / "missing"), *args]) == 2
    err = capsys.readouterr().err
    assert "InputError" in err and message.replace("\\", "") in err


def test_the_summary_counts_in_words_one_token_of_one_text(toy):
    """It said "1 tokens of 1 text"."""
    explained = toy.nla.explain(toy.base, "Macbeth: the king is dead", positions=-1, max_new_tokens=48)
    assert explained.summary().startswith("1 token of 1 text at layer 3, ")


def test_a_text_that_is_only_its_bos_is_refused_naming_the_text(bos_paths):
    """Gemma's "<bos>" alone was explained at its BOS (the one token past nothing), which the default leaves out of
    every other text: its residual is an attention sink whose explanation is noise."""
    nla = nl.NLA.from_pretrained(bos_paths["gemma_av"], bos_paths["gemma_ar"])
    with pytest.warns(UserWarning, match="not the base model"):  # a tiny AV stands in for the base here
        base = nl.load_base(bos_paths["gemma_av"])
    bos = base.tokenizer.bos_token
    assert text_ids(base.tokenizer, bos) == [base.tokenizer.bos_token_id]
    for texts, index in ((bos, 0), (["the cat", bos], 1)):
        with pytest.raises(nl.InputError, match=re.escape(f"text {index} ('{bos}') has no token past its BOS, which is "
                                                          "left out by default: pass a text with a token after its "
                                                          "BOS, or positions=0")):
            nla.explain(base, texts, baseline=1.0, **FAST)
    explained = nla.explain(base, bos, positions=0, baseline=1.0, **FAST)  # asked for, the BOS is explained
    assert [(row.position, row.token) for row in explained.rows] == [(0, bos)]


@pytest.mark.parametrize("skip", [3, 5])
def test_a_skip_that_leaves_a_row_nothing_names_the_tokens_skip_leaves_out_not_a_bos(base, nla, skip):
    """explain_tokens said such a row "has no token past its BOS, which is left out by default" where skip= had left
    out its leading tokens, none of them a BOS (this tokenizer puts none first)."""
    ids = base.to_tokens("the cat")[0].tolist()
    assert len(ids) == 3 and bos_skip(base.tokenizer, ids) == 0  # no BOS: the default would skip nothing
    message = (f"text 1 ('the cat') has no token past the {skip} tokens skip= leaves out (it has 3): pass a smaller "
               "skip for it, or positions= to name the tokens to explain")
    with pytest.raises(nl.InputError, match=f"^{re.escape(message)}$"):
        explain_tokens(nla, base, [ids, ids], skip=[0, skip], texts=["a cat", "the cat"], **FAST)


def test_the_view_of_several_texts_heads_each_block_with_its_text_index_as_the_cli_prints_it(toy, capsys):
    """The blocks of an Explanation of several texts had no head: a row's text_index found no block, where
    `nla-lens explain` prints `[i] text` above each text's rows."""
    texts = ["the king <b>is</b> dead", "long live\nthe queen", "x " * 60]
    view = toy.nla.explain(toy.base, texts, positions=-1, **FAST)._repr_html_()
    heads = re.findall(r"<div class='nla-text'><div class='nla-label'>(.*?)</div>", view)
    assert heads == ["[0] the king &lt;b&gt;is&lt;/b&gt; dead", "[1] long live\\nthe queen",
                     "[2] " + "x " * 39 + "x…"]  # escaped, a newline shown as \n, a long text cut to 80 characters
    assert "<b>is</b>" not in view
    assert [html.unescape(head) for head in heads[:2]] == [text_label(i, text) for i, text in enumerate(texts[:2])]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_a_saved_explanation_names_the_input_text_of_each_row(base, nla, tmp_path, suffix):
    """A saved Explanation kept `text_index` but not the texts, and its `text` column is the AV's raw output: a reader
    of the file could not tell which text a row explained."""
    ex = nla.explain(base, TEXTS, baseline=0.8, **FAST)
    assert len(TEXTS[0]) != len(TEXTS[1]) and {r.text_index for r in ex.rows} == {0, 1}
    frame = nl.read_result(ex.save(tmp_path / f"explained{suffix}"))
    assert list(frame["input_text"]) == [TEXTS[t] for t in frame["text_index"]]
    assert list(frame["text"]) == [r.verbalization.text for r in ex.rows]  # still the AV's output
    pd.testing.assert_frame_equal(frame, ex.to_pandas())
    pd.testing.assert_frame_equal(nl.read_result(tmp_path / f"explained{suffix}", result_type=nl.Explanation),
                                  ex.to_pandas())
    view = ex._repr_html_()  # the view heads each text's block with the text its rows name
    heads = re.findall(r"<div class='nla-text'><div class='nla-label'>(.*?)</div>", view)
    named = dict(zip(frame["text_index"], frame["input_text"], strict=True))
    assert [html.unescape(head) for head in heads] == [text_label(t, named[t]) for t in sorted(named)]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_an_explanation_saved_before_rows_had_input_text_reads_back_without_it(base, nla, tmp_path, suffix):
    """Files saved before rows recorded `input_text` still read, typed or not: their rows as they were written."""
    ex = nla.explain(base, TEXTS, baseline=0.8, **FAST)
    path = saved_without(ex, tmp_path / f"old{suffix}", "input_text")
    expected = ex.to_pandas().drop(columns=["input_text"])
    for result_type in (None, nl.Explanation):
        pd.testing.assert_frame_equal(nl.read_result(path, result_type=result_type), expected)
    if suffix == ".parquet":
        assert nl.read_result(path).attrs["result_type"] == "Explanation"
