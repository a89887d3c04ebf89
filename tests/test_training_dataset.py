"""Dataset building: explanations paired with activations, document-disjoint splits, AV and AR rows."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import D_MODEL, NEEDS_TL3
from transformers import AutoModelForCausalLM

import nla_lens as nl
from nla_lens import backends, loading, testing
from nla_lens.markers import find_marker_sites
from nla_lens.parsing import parse_explanation
from nla_lens.sidecar import av_prompt_ids
from nla_lens.training import (
    ActivationDataset,
    ActivationRecord,
    ExtractConfig,
    TrainConfig,
    ar_rows,
    av_rows,
    check_document_disjoint,
    extract_activations,
    init_ar,
    init_av,
    label_activations,
    load_activations,
    save_explanations,
    split_by_document,
    train_ar,
    train_av,
)
from nla_lens.training.dataset import texts_holding


def label_by_token(record: ActivationRecord) -> str:
    return f"the token {record.token.strip()}"


class HFResidPost:
    """What `extract_activations` asks of its model, from plain HF transformers: `model(tokens, attention_mask=mask,
    stop_at_layer=K + 1)` is `hidden_states[K + 1]`, the output of decoder layer K (TL's `blocks.K.hook_resid_post`;
    for K + 1 below the layer count, where HF has not applied the final norm). The dataset tests extract through it
    on either TransformerLens leg; `test_the_hf_stand_in_extracts_what_the_hooked_transformer_extracts` pins it."""

    def __init__(self, folder: Path):
        self.hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        config = self.hf.config
        self.cfg = SimpleNamespace(n_layers=config.num_hidden_layers, n_ctx=config.max_position_embeddings,
                                   d_model=config.hidden_size, model_name=config._name_or_path)
        self.W_E = self.hf.get_input_embeddings().weight

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, *, attention_mask: torch.Tensor, stop_at_layer: int) -> torch.Tensor:
        assert stop_at_layer < self.cfg.n_layers, "the last hidden state is after the final norm"
        return self.hf(tokens, attention_mask=attention_mask, output_hidden_states=True).hidden_states[stop_at_layer]


def _extract(model, base_folder: Path, folder: Path, config: ExtractConfig) -> ActivationDataset:
    extract_activations(model, loading.load_tokenizer(base_folder), testing.tiny_corpus(8, words_per_doc=10), folder,
                        config, progress=False)
    return load_activations(folder)


def _extract_through_hf(base_folder: Path, folder: Path, config: ExtractConfig) -> ActivationDataset:
    """The tiny corpus extracted by `extract_activations` through `HFResidPost`, its backend check (training needs
    TL 3.x) set aside: a real extraction folder for the labelling tests on both legs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "require_hooked", lambda *_: None)
        return _extract(HFResidPost(base_folder), base_folder, folder, config)


@pytest.fixture(scope="module")
def acts(tmp_path_factory, base_folder, extract_config):
    return _extract_through_hf(base_folder, tmp_path_factory.mktemp("acts"), extract_config)


@NEEDS_TL3
def test_the_hf_stand_in_extracts_what_the_hooked_transformer_extracts(acts, base_folder, extract_config, tmp_path):
    """The same sidecar, shards and rows, and the same vectors to float32 rounding: the stand-in behind `acts` is
    the extraction nla-lens extract runs."""
    tokenizer = loading.load_tokenizer(base_folder)
    model = loading.load_hooked_transformer(base_folder, tokenizer, dtype=torch.float32, device="cpu")
    hooked = _extract(model, base_folder, tmp_path, extract_config)
    assert hooked.meta.raw == acts.meta.raw and hooked.records == acts.records
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(
        p.name for p in (acts.folder / "shards").iterdir())
    assert hooked.vectors.shape == acts.vectors.shape == (len(acts), D_MODEL)
    assert torch.allclose(hooked.vectors, acts.vectors, rtol=0, atol=1e-5)


def test_explanations_from_jsonl_equal_those_from_a_labeler(acts, tmp_path):
    from_labeler = label_activations(acts, label_by_token)
    path = save_explanations(from_labeler, tmp_path / "explanations.jsonl")
    from_jsonl = label_activations(acts, path)
    assert from_jsonl.explanations == from_labeler.explanations == [label_by_token(r) for r in acts.records]
    assert from_jsonl.doc_ids == [r.doc_id for r in acts.records]
    assert torch.equal(from_jsonl.vectors, acts.vectors)


def test_save_explanations_checks_its_path_first(acts, tmp_path):
    """A missing folder was open()'s FileNotFoundError traceback (examples/label.py printed it whole)."""
    data = label_activations(acts, label_by_token)
    with pytest.raises(nl.InputError, match="does not exist; create it first"):
        save_explanations(data, tmp_path / "absent" / "explanations.jsonl")
    with pytest.raises(nl.InputError, match="the file name must end in .jsonl"):
        save_explanations(data, tmp_path / "explanations.csv")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("value", "said"), [(float("nan"), "hold NaN or Inf"), (float("inf"), "hold NaN or Inf"),
                                           (0.0, "are zero: no direction")])
def test_labelled_rows_without_a_direction_are_refused_by_document_and_position(acts, value, said):
    """A float16 extraction overflows to Inf: AV SFT stopped at the first batch holding such a row, naming its index in
    that batch, and AR SFT skipped each step holding one (a NaN loss), logging a warning."""
    vectors = acts.vectors.clone()
    if value == 0.0:
        vectors[[2, 5]] = 0.0
    else:
        vectors[[2, 5], 3] = value
    broken = dataclasses.replace(acts, vectors=vectors)
    named = "; ".join(f"doc_id {acts.records[i].doc_id!r} position {acts.records[i].position}" for i in (2, 5))
    with pytest.raises(nl.VectorError, match=rf"^2 labelled activation rows of .* {said} \({re.escape(named)}\), so "
                                             "they cannot train an AV or an AR. Extract again in float32 or bfloat16 "
                                             r".*, or leave those rows out of the explanations"):
        label_activations(broken, label_by_token)
    kept = label_activations(broken, lambda r: None if r in (acts.records[2], acts.records[5]) else "x")
    assert len(kept) == len(acts) - 2 and torch.isfinite(kept.vectors).all()


def test_empty_or_whitespace_explanations_are_refused_by_document_and_position(acts, tmp_path):
    """A labeler that answered nothing trained the AV to write an empty explanation, without a word."""
    blank = {0: "", 3: " \n\t"}
    texts = {r: blank.get(i, label_by_token(r)) for i, r in enumerate(acts.records)}
    named = "; ".join(f"doc_id {acts.records[i].doc_id!r} position {acts.records[i].position}" for i in blank)
    said = rf"^2 explanations are empty or only whitespace \({re.escape(named)}\): the AV would learn to explain "
    with pytest.raises(nl.InputError, match=said + "nothing. Label those rows again, or leave them out"):
        label_activations(acts, texts.__getitem__)
    path = tmp_path / "explanations.jsonl"
    path.write_text("".join(json.dumps({"doc_id": r.doc_id, "position": r.position, "explanation": text}) + "\n"
                            for r, text in texts.items()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file records no extraction
        with pytest.raises(nl.InputError, match=said):
            label_activations(acts, path)


def test_a_labeler_returning_no_string_is_refused_by_document_position_and_type(acts):
    """NaN from a pandas lookup of a missing label, or an int, failed in the blank check with a bare AttributeError
    ('float' object has no attribute 'strip') naming no row."""
    wrong = {1: float("nan"), 4: 7, 6: b"bytes"}
    named = "; ".join(f"doc_id {acts.records[i].doc_id!r} position {acts.records[i].position}: {kind}"
                      for i, kind in ((1, "float nan"), (4, "int 7"), (6, "bytes b'bytes'")))
    with pytest.raises(nl.InputError, match=rf"^the labeler returned 3 values that are not a string \("
                                            rf"{re.escape(named)}\): a labeler returns each row's explanation as a "
                                            r"str, or None to leave the row out"):
        label_activations(acts, lambda r: wrong.get(acts.records.index(r), label_by_token(r)))


def test_a_mapping_keyed_by_document_and_position_labels_the_rows_the_same_jsonl_labels(acts, tmp_path):
    """A dict of explanations, keyed as the JSONL lines are, failed with a bare TypeError from Path(dict). Rows
    without a key, or whose value is None, are left out, as a labeler's None leaves them out."""
    mapping = {(r.doc_id, r.position): None if i == 4 else label_by_token(r)
               for i, r in enumerate(acts.records) if i % 3}
    path = tmp_path / "explanations.jsonl"
    path.write_text("".join(json.dumps({"doc_id": doc_id, "position": position, "explanation": text}) + "\n"
                            for (doc_id, position), text in mapping.items() if text is not None))
    from_mapping = label_activations(acts, mapping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file records no extraction
        from_jsonl = label_activations(acts, path)
    kept = [i for i in range(len(acts)) if i % 3 and i != 4]
    assert from_mapping.explanations == from_jsonl.explanations == [label_by_token(acts.records[i]) for i in kept]
    assert from_mapping.doc_ids == from_jsonl.doc_ids and from_mapping.positions == from_jsonl.positions
    assert torch.equal(from_mapping.vectors, acts.vectors[kept])
    assert from_mapping.extraction == label_activations(acts, label_by_token).extraction


def test_a_mapping_key_matching_no_row_or_a_value_not_text_is_refused_by_name(acts):
    first, second = acts.records[0], acts.records[1]
    labels = {(first.doc_id, first.position): "a label"}
    with pytest.raises(nl.InputError, match=rf"^2 keys of the explanations mapping match no activation row, e\.g\. "
                                            rf"\('doc-0', {first.position}, 'x'\): key each explanation by \(doc_id, "
                                            r"position\), the row's document id as text and its token index, as in "
                                            rf"{re.escape(repr((first.doc_id, first.position)))}$"):
        label_activations(acts, {**labels, ("doc-0", first.position, "x"): "y", 0: "z"})
    with pytest.raises(nl.InputError, match=r"^1 key of the explanations mapping matches no activation row, e\.g\. "
                                            rf"\(0, {first.position}\):"):
        label_activations(acts, {**labels, (0, first.position): "a doc_id given as a number"})
    named = f"doc_id {second.doc_id!r} position {second.position}: float nan"
    with pytest.raises(nl.InputError, match=rf"^the explanations mapping holds 1 value that is not a string \("
                                            rf"{re.escape(named)}\): a mapping holds each row's explanation as a str, "
                                            r"or None to leave the row out"):
        label_activations(acts, {**labels, (second.doc_id, second.position): float("nan")})


@pytest.mark.parametrize("explanations", [["a label"], None, b"explanations.jsonl", 3])
def test_explanations_of_another_kind_are_refused_saying_what_to_pass(acts, explanations):
    """A list, None, an int or a bytes path failed with a bare TypeError from Path(...)."""
    with pytest.raises(nl.InputError, match=r"^explanations must be the path of a JSONL file, a mapping "
                                            r"\{\(doc_id, position\): explanation\} or a labeler\(record\) -> str "
                                            rf"\| None; got {type(explanations).__name__} "):
        label_activations(acts, explanations)


def test_rows_without_explanation_are_left_out(acts):
    data = label_activations(acts, lambda r: None if r.position % 2 else label_by_token(r))
    assert data.positions == [r.position for r in acts.records if r.position % 2 == 0]


def test_an_explanation_matching_no_row_is_rejected(acts, tmp_path):
    path = tmp_path / "explanations.jsonl"
    path.write_text(json.dumps({"doc_id": "nope", "position": 3, "explanation": "x"}) + "\n")
    with pytest.raises(nl.InputError, match=r"^1 explanation in .* matches no activation row"):
        label_activations(acts, path)


@pytest.mark.parametrize(("line", "message"), [
    ('{"doc_id": "0", "position": 3', r"explanations.jsonl:2: not JSON \(Expecting ',' delimiter at character 31\)"),
    ("[1, 2]", r"explanations.jsonl:2: holds \[1, 2\], not a JSON object; write one JSON object per line, with "
               r"doc_id, position and explanation$"),
    ('{"doc_id": "0", "explanation": "x"}', "explanations.jsonl:2: the object lacks position; each line needs"),
    ('{"doc_id": "0", "position": "x", "explanation": "x"}', 'position must be .* a whole number >= 0; got "x"'),
    ('{"doc_id": "0", "position": 1.7, "explanation": "x"}', "position must be .* got 1.7$"),
    ('{"doc_id": "0", "position": true, "explanation": "x"}', "position must be .* got true$"),
    ('{"doc_id": "0", "position": 3, "explanation": null}', "explanation must be a string, got null$"),
])
def test_a_bad_explanations_line_is_named_with_what_is_wrong_in_words(acts, tmp_path, line, message):
    """The errors ended in Python's text ("(list indices must be integers or slices, not str)", "('position')"),
    and a position of 1.7 or true was read as 1: another row's explanation."""
    path = tmp_path / "explanations.jsonl"
    good = {"doc_id": acts.records[0].doc_id, "position": acts.records[0].position, "explanation": "x"}
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(nl.InputError, match=message):
        label_activations(acts, path)


def test_whole_number_positions_written_as_floats_or_strings_still_match(acts, tmp_path):
    record = acts.records[0]
    path = tmp_path / "explanations.jsonl"
    path.write_text(json.dumps({"doc_id": record.doc_id, "position": float(record.position), "explanation": "a"})
                    + "\n" + json.dumps({"doc_id": acts.records[1].doc_id, "position": str(acts.records[1].position),
                                         "explanation": "b"}) + "\n")
    assert label_activations(acts, path).explanations == ["a", "b"]
    with pytest.raises(nl.InputError, match="explanations .*missing.jsonl does not exist"):
        label_activations(acts, tmp_path / "missing.jsonl")


def test_split_is_document_disjoint_and_seeded():
    data = testing.label_determined_vectors(40)
    train, held_out = split_by_document(data, eval_fraction=0.25, seed=1)
    assert not set(train.doc_ids) & set(held_out.doc_ids)
    assert len(set(held_out.doc_ids)) == 10 and len(train) + len(held_out) == len(data)
    again, _ = split_by_document(data, eval_fraction=0.25, seed=1)
    assert again.doc_ids == train.doc_ids
    assert split_by_document(data, eval_fraction=0.25, seed=2)[0].doc_ids != train.doc_ids


@NEEDS_TL3
def test_document_overlap_between_train_and_eval_is_rejected(base_folder, dataset_meta):
    data = testing.label_determined_vectors(10)
    # A row-level split: every document lands on both sides.
    row_train, row_eval = data.select(range(0, len(data), 2)), data.select(range(1, len(data), 2))
    with pytest.raises(nl.SplitLeakError, match="documents have rows in both train and eval"):
        check_document_disjoint(row_train, row_eval)
    one_shared = data.select([i for i, d in enumerate(data.doc_ids) if d == data.doc_ids[0]])
    with pytest.raises(nl.SplitLeakError, match="^1 document has rows in both"):  # it said "1 document(s) have"
        check_document_disjoint(one_shared, one_shared)
    config = TrainConfig(steps=1, warmup_steps=0)
    with pytest.raises(nl.SplitLeakError):
        train_av(init_av(base_folder, dataset_meta), row_train, row_eval, config, progress=False)
    with pytest.raises(nl.SplitLeakError):
        train_ar(init_ar(base_folder, dataset_meta), row_train, row_eval, config, progress=False)


@NEEDS_TL3
def test_an_empty_training_split_is_refused_before_training(base_folder, dataset_meta, label_split):
    """It was a raw IndexError (AV: the tokenizer on no explanations) or ValueError (AR: max of no rows)."""
    train, held_out = label_split
    for trainer, init in ((train_av, init_av), (train_ar, init_ar)):
        with pytest.raises(nl.InputError, match="the training split is empty"):
            trainer(init(base_folder, dataset_meta), train.select([]), held_out, TrainConfig(steps=1, warmup_steps=0),
                    progress=False)


def test_av_rows_are_the_canonical_prompt_then_tagged_explanation_and_the_turn_end(base_folder, dataset_meta):
    tokenizer = loading.load_tokenizer(base_folder)
    data = testing.label_determined_vectors(3)
    rows = av_rows(data, dataset_meta, tokenizer)
    assert rows.prompt.tolist() == av_prompt_ids(dataset_meta, tokenizer)
    find_marker_sites(rows.prompt[None], dataset_meta.injection_token_id, dataset_meta.injection_left_neighbor_id,
                      dataset_meta.injection_right_neighbor_id, expected=1)
    for response, explanation in zip(rows.responses, data.explanations, strict=True):
        assert response[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the test template's turn end
        text = tokenizer.decode(response[:-1])
        assert text == f"<explanation>\n{explanation}\n</explanation>"
        assert parse_explanation(text) == explanation


def test_ar_rows_are_the_critic_prompt_without_special_tokens(base_folder, dataset_meta):
    tokenizer = loading.load_tokenizer(base_folder)
    data = testing.label_determined_vectors(3)
    rows = ar_rows(data, dataset_meta, tokenizer)
    suffix = list(dataset_meta.critic_suffix_ids)
    for prompt, explanation in zip(rows.prompts, data.explanations, strict=True):
        assert prompt == tokenizer.encode(dataset_meta.ar_prompt(explanation), add_special_tokens=False)
        assert prompt[-len(suffix):] == suffix
    assert torch.equal(rows.vectors, data.vectors)


def _with_explanations(data, changes: dict[int, str]):
    texts = [changes.get(i, text) for i, text in enumerate(data.explanations)]
    return dataclasses.replace(data, explanations=texts)


@pytest.mark.parametrize(("rows_of", "consequence"), [
    ("av", "So the AV learns to write those tokens, but verbalize ends an explanation at an EOS and leaves special "
           "tokens out of the text it decodes; remove or reword that text in the explanations"),
    ("ar", "So the AR learns to read those tokens, which the AV's explanations never hold (verbalize decodes without "
           "special tokens); remove or reword that text in the explanations"),
])
def test_rows_keep_special_token_text_as_the_token_as_the_papers_training_does_and_name_those_rows(
        base_folder, dataset_meta, rows_of, consequence):
    """A label quoting '<|im_end|>' put the EOS id mid-response without a word. The paper's training code
    tokenizes labels with HF's defaults, which parse special tokens (kitft `sft_actor.py`: the response through
    `tokenizer(..., add_special_tokens=False)` or the chat template; `sft_critic.py`: `tokenizer(prompt,
    add_special_tokens=True)`), so the rows keep doing so, and say which rows."""
    tokenizer = loading.load_tokenizer(base_folder)
    clean = testing.label_determined_vectors(2)
    data = _with_explanations(clean, {2: clean.explanations[2] + " <|im_end|> more", 5: "<|im_start|>x"})
    build = (lambda d: av_rows(d, dataset_meta, tokenizer)) if rows_of == "av" else (
        lambda d: ar_rows(d, dataset_meta, tokenizer))
    said = ("2 explanations of 8 hold special-token text, which the tokenizer reads as the special token itself (as "
            "the paper's training code does): doc_id 'doc-0' position 10 (<|im_end|>); doc_id 'doc-1' position 9 "
            f"(<|im_start|>). {consequence}")
    with pytest.warns(UserWarning, match=f"^{re.escape(said)}$") as caught:
        rows = build(data)
    assert len(caught) == 1 and caught[0].filename == __file__
    if rows_of == "av":
        tokens = rows.responses[2][:-1]
        assert tokens == tokenizer(f"<explanation>\n{data.explanations[2]}\n</explanation>",
                                   add_special_tokens=False)["input_ids"]
    else:
        tokens = rows.prompts[2]
        assert tokens == tokenizer(dataset_meta.ar_prompt(data.explanations[2]), add_special_tokens=True)["input_ids"]
    assert tokens.count(tokenizer.eos_token_id) == 1  # the special token, where its characters stood
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(clean)


def test_a_warning_of_special_token_text_names_five_rows_and_counts_the_rest(base_folder, dataset_meta):
    tokenizer = loading.load_tokenizer(base_folder)
    clean = testing.label_determined_vectors(2)
    data = _with_explanations(clean, {i: f"a {text} <|endoftext|>" for i, text in enumerate(clean.explanations)})
    with pytest.warns(UserWarning, match=r"^8 explanations of 8 hold .*: (doc_id '[^']+' position \d+ "
                                         r"\(<\|endoftext\|>\); ){5}and 3 more\. So the AR"):
        ar_rows(data, dataset_meta, tokenizer)


def test_special_token_text_is_found_in_one_pass_in_the_rows_a_search_for_each_token_finds():
    """`warn_special_token_text` searched every label for every special token (a real tokenizer has hundreds; Gemma-3
    thousands). One regex a label must name the same rows and tokens as that search, also where a token begins or
    holds another, overlaps itself, or holds regex syntax."""
    rng = random.Random(0)
    specials = sorted({*(f"<|reserved_special_token_{i}|>" for i in range(300)), "<|end|>", "<|end|>x", "<pad>",
                       "<<pad>>", "[MASK]", "a.b", "(x)|y", "\\d+", "$", "^", "㈎", "<|im_end|>", "aa"})
    fragments = [*specials, *(s[:rng.randrange(1, len(s))] for s in specials if len(s) > 1),
                 "the cat", " ", "<", "|", ">", "a", "ab", "x", "d"]
    texts = ["".join(rng.choice(fragments) for _ in range(rng.randrange(0, 4))) for _ in range(3000)]
    each_token = [(i, [s for s in specials if s in text]) for i, text in enumerate(texts)]  # the old search
    expected = [(i, held) for i, held in each_token if held]
    found = texts_holding(texts, specials)
    assert found == expected
    assert 500 < len(found) < 2500 and any(len(held) > 1 for _, held in found)  # both kinds, and several tokens
    assert texts_holding(texts, []) == []


# The AV reads the injected vector, not layer K of its own stack: only its width must match.
@NEEDS_TL3
@pytest.mark.parametrize(("init", "shape", "message"), [
    (init_ar, {"n_layers": 2}, r"has 2 layers, but the AR needs its first 3 \(the activations are layer 2's\)"),
    (init_ar, {"d_model": 32}, r"has d_model=32, but the activations are 64-d vectors of layer 2"),
    (init_av, {"d_model": 32}, r"has d_model=32, but the activations are 64-d vectors of layer 2"),
])
def test_a_base_model_that_cannot_hold_the_extractions_vectors_is_refused_before_its_weights_load(
        tmp_path, dataset_meta, monkeypatch, init, shape, message):
    """A narrower base failed only after its weights had loaded, blaming a sidecar; a shallower one gave the AR a
    CheckpointError that said nothing of the fix."""
    base = testing.save_base_model(tmp_path / "other", **{"d_model": 64, **shape})
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("read the weights"))
    with pytest.raises(nl.ConfigError, match=message) as refused:
        init(base, dataset_meta)
    assert "set base_model to the model the activations were extracted from (tiny)" in str(refused.value)


@pytest.fixture(scope="module")
def other_layer_acts(tmp_path_factory, base_folder, extract_config):
    """The `acts` corpus and positions at another layer: its (doc_id, position) keys are every one of `acts`'."""
    return _extract_through_hf(base_folder, tmp_path_factory.mktemp("acts_other_layer"),
                               dataclasses.replace(extract_config, layer=extract_config.layer - 1))


def test_explanations_saved_for_one_extraction_are_refused_on_another_layers(acts, other_layer_acts, tmp_path):
    """Labels of a layer-2 extraction trained on the layer-1 vectors of the same rows without a word: every
    (doc_id, position) matched."""
    path = save_explanations(label_activations(acts, label_by_token), tmp_path / "explanations.jsonl")
    with pytest.raises(nl.ConfigError) as refused:
        label_activations(other_layer_acts, path)
    message = str(refused.value)
    labelled, other = acts.folder.absolute(), other_layer_acts.folder.absolute()
    layer = acts.meta.layer
    assert message.startswith(f"explanations {path} label the extraction {labelled}, not activations {other} "
                              f"(layer: {layer} in the explanations, {layer - 1} in the activations)")
    assert message.endswith(f"label {other} and train on those explanations, or point activations at {labelled}")


def test_explanations_record_their_extractions_base_and_rows(acts, tmp_path):
    path = save_explanations(label_activations(acts, label_by_token), tmp_path / "explanations.jsonl")
    assert label_activations(acts, path).extraction == label_activations(acts, label_by_token).extraction
    other_base = dataclasses.replace(acts, meta=dataclasses.replace(acts.meta, base_model="other/base"))
    with pytest.raises(nl.ConfigError, match=f"base_model: {acts.meta.base_model!r} in the explanations, "
                                             "'other/base' in the activations") as refused:
        label_activations(other_base, path)
    folder = acts.folder.absolute()  # one folder, extracted again since the labels were written
    assert f"label the extraction {folder} held when they were written, not activations {folder} (" in str(
        refused.value) and str(refused.value).endswith(f"To fix it, label {folder} again")
    # One token changed: the same count and keys, other rows (an extraction of an edited corpus).
    first = dataclasses.replace(acts.records[0], token_id=acts.records[0].token_id + 1)
    edited = dataclasses.replace(acts, records=[first, *acts.records[1:]])
    with pytest.raises(nl.ConfigError, match=rf"rows: {len(acts)} in both, but other documents, positions or tokens"):
        label_activations(edited, path)


def test_a_file_joining_two_extractions_explanations_or_a_damaged_record_is_named_by_its_line(
        acts, other_layer_acts, tmp_path):
    first = save_explanations(label_activations(acts, label_by_token), tmp_path / "a.jsonl").read_text()
    second = save_explanations(label_activations(other_layer_acts, label_by_token), tmp_path / "b.jsonl").read_text()
    joined = tmp_path / "joined.jsonl"
    joined.write_text(first + second)
    line = first.count("\n") + 1
    with pytest.raises(nl.InputError, match=rf"joined.jsonl:{line}: records another extraction than line 1 "
                                            rf"\({other_layer_acts.folder.absolute()}; line 1: {acts.folder.absolute()}"
                                            rf"\): the file joins the explanations of two"):
        label_activations(acts, joined)
    again = dataclasses.replace(other_layer_acts, folder=acts.folder)  # the same folder, extracted again since
    joined.write_text(first + save_explanations(label_activations(again, label_by_token), tmp_path / "c.jsonl")
                      .read_text())
    with pytest.raises(nl.InputError, match=rf"records another extraction than line 1 \(both of "
                                            rf"{acts.folder.absolute()}, extracted again in between\)"):
        label_activations(acts, joined)
    joined.write_text(first + first)  # one extraction's explanations twice over: the same record, then repeats
    with pytest.raises(nl.InputError, match="a second explanation for doc_id"):
        label_activations(acts, joined)
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text(json.dumps({"extraction": {"layer": 2}}) + "\n" + first.split("\n", 1)[1])
    with pytest.raises(nl.InputError, match=r"damaged.jsonl:1: a damaged record of the extraction labelled"):
        label_activations(acts, damaged)


def test_explanations_edited_with_pandas_and_written_back_keep_their_record_and_ids(acts, tmp_path):
    """`pd.read_json(lines=True)` reads the record as a row of its own, and beside its missing doc_id makes ids
    "0", "1" floats; `to_json(orient="records", lines=True)` wrote the record back with null keys, which was read as
    an explanation ("position must be the row's token index ... got null"), and the ids as 0.0, 1.0."""
    import pandas as pd

    numbered = dataclasses.replace(acts, records=[dataclasses.replace(r, doc_id=r.doc_id.removeprefix("doc-"))
                                                  for r in acts.records])  # a corpus without ids: line indices
    path = save_explanations(label_activations(numbered, label_by_token), tmp_path / "explanations.jsonl")
    frame = pd.read_json(path, lines=True)
    frame.loc[1, "explanation"] = "edited"  # row 0 is the record
    frame.to_json(path, orient="records", lines=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the record is read: no "does not record which extraction" warning
        data = label_activations(numbered, path)
    assert data.explanations == ["edited"] + [label_by_token(r) for r in numbered.records[1:]]
    assert data.doc_ids == [r.doc_id for r in numbered.records]
    with pytest.raises(nl.ConfigError, match="rows: .* other documents, positions or tokens"):
        label_activations(acts, path)  # and it is checked: the ids "doc-0", ... are another extraction's


def test_read_result_of_a_label_file_says_how_to_read_one(acts, tmp_path):
    """It read the extraction record as a row of nulls among the explanations; as written and after pandas."""
    import pandas as pd

    path = save_explanations(label_activations(acts, label_by_token), tmp_path / "explanations.jsonl")
    with pytest.raises(nl.InputError, match=r"is a label file .*label_activations\(load_activations"):
        nl.read_result(path)
    pd.read_json(path, lines=True).to_json(path, orient="records", lines=True)
    with pytest.raises(nl.InputError, match="is a label file"):
        nl.read_result(path)


def test_explanations_without_an_extraction_record_load_with_one_warning(acts, tmp_path):
    """Files written before the record (or by other code) still train, with a word that nothing checks them."""
    path = tmp_path / "explanations.jsonl"
    path.write_text("".join(json.dumps({"doc_id": r.doc_id, "position": r.position, "explanation": "x"}) + "\n"
                            for r in acts.records))
    with pytest.warns(UserWarning, match=f"{path} does not record which extraction it labels") as warned:
        data = label_activations(acts, path)
    assert len(warned) == 1 and data.explanations == ["x"] * len(acts) and data.extraction is not None
    # The fix to run, whole: it named the activations as load_activations(...)
    fix = f"save_explanations(label_activations(load_activations({str(acts.folder.absolute())!r}), {str(path)!r}), "
    assert fix in str(warned[0].message)


def test_explanations_of_one_document_say_the_split_needs_labelled_rows_of_two(acts):
    one_document = label_activations(acts, lambda r: "x" if r.doc_id == acts.records[0].doc_id else None)
    with pytest.raises(nl.InputError) as refused:
        split_by_document(one_document, eval_fraction=0.25)
    assert str(refused.value) == (
        f"the split holds out whole documents, so it needs labelled rows of at least 2 documents, but all "
        f"{len(one_document)} labelled rows are of document {acts.records[0].doc_id!r}; label rows of more "
        "documents (the rows of a document without an explanation are left out)")
