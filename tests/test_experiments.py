"""Steer / patch then verbalize, and verbalize any direction: the helpers equal hand-written TL runs."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
import torch
from base_batches import distinct_readouts, no_hooks_left, padded
from conftest import D_MODEL, HAS_SAE_LENS, LAYER, make_sae, saved_without

import nla_lens as nl
from nla_lens import backends, loading, metrics
from nla_lens.capture import resid_post
from nla_lens.experiments import steering_hook, word_diff
from nla_lens.explain import explain_tokens
from nla_lens.testing import save_base_model

NAME = f"blocks.{LAYER}.hook_resid_post"
FAST = {"max_new_tokens": 4, "progress": False}



@pytest.fixture()
def steer() -> torch.Tensor:
    return torch.randn(D_MODEL, generator=torch.Generator().manual_seed(11))


def equal_length_pair(base) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted prompts that differ in one token, as transformer_lens.patching expects."""
    clean = base.tokenizer.encode("The cat sat on the mat.", add_special_tokens=False)
    corrupted = base.tokenizer.encode("The dog sat on the mat.", add_special_tokens=False)
    assert len(clean) == len(corrupted) and sum(a != b for a, b in zip(clean, corrupted, strict=True)) >= 1
    return torch.tensor([clean, clean[::-1]]), torch.tensor([corrupted, corrupted[::-1]])


def _independent_mse(nla, explanation, vector) -> float:
    """One row's round-trip MSE, from the AR alone."""
    return float(metrics.mse_per_item(nla.ar.reconstruct([explanation]), vector[None], nla.ar.meta.mse_scale)[0])


def test_steering_at_the_captured_layer_moves_it_by_exactly_scale_times_vector(base, nla, steer, monkeypatch):
    distinct_readouts(nla.av, monkeypatch)
    tokens, mask = padded(base, "left")
    result = nl.steer_then_verbalize(base, nla, tokens, attention_mask=mask, steering_vector=steer, scale=3.0,
                                     steer_layer=LAYER, baseline=0.5, **FAST)
    assert (result.steered_vectors - result.clean_vectors - 3.0 * steer).abs().max() < 1e-5
    assert [(r.batch, r.position, r.token) for r in result.rows] == [
        (b, tokens.shape[1] - 1, t) for b, t in enumerate(base.to_str_tokens(tokens[:, -1]))]
    rt = result.round_trip
    assert rt is not None and rt.baseline == 0.5 and len(rt.verbalizations) == 2 * len(tokens)
    for i, row in enumerate(result.rows):
        assert row.clean == rt.verbalizations[i] and row.steered == rt.verbalizations[len(tokens) + i]
        clean_mse = _independent_mse(nla, row.clean.explanation, result.clean_vectors[i])
        steered_mse = _independent_mse(nla, row.steered.explanation, result.steered_vectors[i])
        assert row.fve_clean == pytest.approx(1 - clean_mse / 0.5, abs=1e-5)
        assert row.fve_steered == pytest.approx(1 - steered_mse / 0.5, abs=1e-5)
        assert row.cosine == pytest.approx(float(torch.cosine_similarity(
            result.clean_vectors[i], result.steered_vectors[i], dim=0)), abs=1e-6)
    fves = [r.fve_clean for r in result.rows] + [r.fve_steered for r in result.rows]
    assert len({round(f, 6) for f in fves}) == len(fves)  # every row scored apart: a mix-up would show
    assert no_hooks_left(base)


def test_summaries_give_each_runs_fve_not_one_pooled_over_the_runs(base, nla, steer, monkeypatch):
    """A steering (patching) study's one-line summary scores each run apart: one FVE over clean and steered
    rows together (what it printed before) hides the difference the study is about."""
    distinct_readouts(nla.av, monkeypatch)
    tokens, mask = padded(base, "left")
    result = nl.steer_then_verbalize(base, nla, tokens, attention_mask=mask, steering_vector=steer, scale=3.0,
                                     steer_layer=LAYER, baseline=0.5, **FAST)
    clean = sum(r.fve_clean for r in result.rows) / len(result.rows)
    steered = sum(r.fve_steered for r in result.rows) / len(result.rows)
    assert abs(clean - steered) > 1e-3
    assert f"FVE clean {clean:.3f}, steered {steered:.3f} (baseline 0.500, given)" in result.summary()
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    study = nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=1,
                              baseline=0.5, **FAST)
    per_run = [sum(r.fve for r in study.rows if r.run == run) / len(clean_tokens)
               for run in ("clean", "corrupted", "patched")]
    assert "FVE clean {:.3f}, corrupted {:.3f}, patched {:.3f} (baseline".format(*per_run) in study.summary()


def test_a_left_padded_batch_without_a_mask_runs_as_with_its_mask(base, av_karvonen, steer):
    """HookedTransformer masks leading pads of a token tensor itself; on the bridge the helpers do it."""
    tokens, mask = padded(base, "left")
    kwargs = {"steering_vector": steer, "scale": 2.0, "steer_layer": 0, **FAST}
    implicit = nl.steer_then_verbalize(base, av_karvonen, tokens, **kwargs)
    explicit = nl.steer_then_verbalize(base, av_karvonen, tokens, attention_mask=mask, **kwargs)
    assert torch.equal(implicit.clean_vectors, explicit.clean_vectors)
    assert torch.equal(implicit.steered_vectors, explicit.steered_vectors)


def test_steer_then_verbalize_equals_hand_written_runs(base, av_karvonen, steer):
    tokens, mask = padded(base, "left")
    result = nl.steer_then_verbalize(base, av_karvonen, tokens, attention_mask=mask, steering_vector=steer,
                                     scale=2.0, steer_layer=0, positions=[-1, -2], steer_positions=-2, **FAST)

    def add_at_second_last(resid, hook):
        resid = resid.clone()
        resid[:, -2] += 2.0 * steer
        return resid

    _, clean = base.run_with_cache(tokens, attention_mask=mask, names_filter=NAME)
    with base.hooks(fwd_hooks=[("blocks.0.hook_resid_post", add_at_second_last)]):
        _, steered = base.run_with_cache(tokens, attention_mask=mask, names_filter=NAME)
    sites = torch.arange(len(tokens)).repeat_interleave(2), torch.tensor([-1, -2] * len(tokens))
    assert torch.equal(result.clean_vectors, clean[NAME][sites])
    assert torch.equal(result.steered_vectors, steered[NAME][sites])
    # The steering reached the other captured position through attention only.
    assert (result.steered_vectors - result.clean_vectors).abs().max() > 1e-2
    expected = av_karvonen.verbalize(torch.cat([clean[NAME][sites], steered[NAME][sites]]), **FAST)
    assert [r.clean for r in result.rows] + [r.steered for r in result.rows] == expected
    assert result.round_trip is None and all(r.fve_clean is None for r in result.rows)
    for row in result.rows:
        assert (row.added, row.removed) == word_diff(row.clean.text, row.steered.text)  # nothing parses


def test_each_readout_is_indexed_by_its_own_row_though_the_runs_share_one_av_batch(base, av_karvonen, steer,
                                                                                     monkeypatch):
    """Clean and steered (clean, corrupted and patched) vectors are verbalized in one batch, so a steered readout's
    `index` was its row in that batch (n + i) instead of its own row i of `steered_vectors`."""
    batches = []
    verbalize = av_karvonen.verbalize
    monkeypatch.setattr(av_karvonen, "verbalize", lambda vectors, **kw: batches.append(len(vectors)) or verbalize(
        vectors, **kw))
    tokens, mask = padded(base, "left")
    result = nl.steer_then_verbalize(base, av_karvonen, tokens, attention_mask=mask, steering_vector=steer,
                                     scale=2.0, steer_layer=0, positions=[-1, -2], **FAST)
    n = len(result.rows)
    assert n == 2 * len(tokens) and batches == [2 * n]  # still one AV batch
    assert [r.clean.index for r in result.rows] == [r.steered.index for r in result.rows] == list(range(n))
    batches.clear()
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    study = nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=1, patch_position=1,
                              capture_position=[-1, 0], **FAST)
    assert batches == [len(study.rows)] == [12]
    for run in ("clean", "corrupted", "patched"):
        assert [r.verbalization.index for r in study.rows if r.run == run] == [0, 1, 2, 3]


def hand_written_patching(base, clean_tokens, corrupted_tokens, layer, position):
    """transformer_lens.patching's resid_pre patch, written out: clean cache -> hook -> corrupted run."""
    patch_name = f"blocks.{layer}.hook_resid_pre"
    _, clean_cache = base.run_with_cache(clean_tokens, names_filter=[patch_name, NAME])

    def patch(corrupted, hook):
        corrupted = corrupted.clone()
        corrupted[:, position, :] = clean_cache[patch_name][:, position, :]
        return corrupted

    _, corrupted_cache = base.run_with_cache(corrupted_tokens, names_filter=NAME)
    with base.hooks(fwd_hooks=[(patch_name, patch)]):
        _, patched_cache = base.run_with_cache(corrupted_tokens, names_filter=NAME)
    return clean_cache[NAME][:, -1], corrupted_cache[NAME][:, -1], patched_cache[NAME][:, -1]


@pytest.mark.parametrize("layer, position", [(0, 1), (1, 1), (LAYER, -1)])
def test_patching_study_equals_hand_written_tl_patching(base, nla, layer, position):
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    study = nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=layer,
                              patch_position=position, baseline=0.5, **FAST)
    clean, corrupted, patched = hand_written_patching(base, clean_tokens, corrupted_tokens, layer, position)
    assert study.hook_name == f"blocks.{layer}.hook_resid_pre"
    assert torch.equal(study.clean_vectors, clean)
    assert torch.equal(study.corrupted_vectors, corrupted)
    assert torch.equal(study.patched_vectors, patched)
    assert (clean - corrupted).abs().max() > 1e-2  # the prompts do differ at layer K
    assert no_hooks_left(base)


def test_permanent_hooks_run_in_every_helper_run_before_the_patch_and_stay_attached(base, nla):
    """What the README promises of the helpers: a permanent hook of the user's on the base model runs in the clean,
    corrupted and patched runs, before the patch at its own point (added first, it sees the corrupted value
    there); one on the AV runs in the readout; both stay attached, and the patch is the hand-written one."""
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    seen, av_calls = [], []
    base.add_perma_hook("blocks.0.hook_resid_pre", lambda resid, hook: seen.append(resid[:, 1].clone()))
    nla.av.model.add_perma_hook("blocks.0.hook_resid_post", lambda resid, hook: av_calls.append(resid.shape[1]))
    try:
        study = nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=1,
                                  baseline=0.5, **FAST)
        assert [len(point.fwd_hooks) for point in (base.hook_dict["blocks.0.hook_resid_pre"],
                                                   nla.av.model.hook_dict["blocks.0.hook_resid_post"])] == [1, 1]
    finally:
        base.reset_hooks(including_permanent=True)
        nla.av.model.reset_hooks(including_permanent=True)
    assert len(seen) == 3 and not torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert av_calls and av_calls[0] > 1  # the prefill, then decode steps
    assert torch.equal(study.patched_vectors, hand_written_patching(base, clean_tokens, corrupted_tokens, 0, 1)[2])
    assert no_hooks_left(base) and no_hooks_left(nla.av.model)


def test_a_failed_injection_warns_at_the_callers_line_through_every_helper(base, nla, steer, monkeypatch):
    """verbalize warned with stacklevel=2, so a helper's call put the warning at nla_lens's own line
    (experiments.py, steer_words.py) and Python's default filter showed it once per session, not at the user's."""
    echo = nla.av.tokenizer.encode(nla.av.meta.injection_char * 4, add_special_tokens=False)
    monkeypatch.setattr(nla.av, "_generate", lambda batch, *_: [echo] * len(batch))
    clean_tokens, _ = equal_length_pair(base)
    runs = {"verbalize": lambda: nla.av.verbalize(steer[None], **FAST),
            "verbalize_direction": lambda: nl.verbalize_direction(nla.av, steer, **FAST),
            "describe_difference": lambda: nl.describe_difference(nla, steer[None] * 2, steer[None], **FAST),
            "steer_then_verbalize": lambda: nl.steer_then_verbalize(  # an AV alone: with an AR, the round trip keeps it
                base, nla.av, clean_tokens, steering_vector=steer, scale=1.0, steer_layer=0, **FAST)}
    for name, run in runs.items():
        with pytest.warns(UserWarning, match="injection probably failed") as seen:
            run()
        assert {w.filename for w in seen if "injection probably failed" in str(w.message)} == {__file__}, name


def test_reading_out_another_layer_than_the_nlas_warns_as_the_cli_does(base, nla, steer, recwarn):
    """capture_layer=1 ran the layer-2 NLA on layer-1 vectors, scored against the layer-2 baseline, silently."""
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    runs = {"steer_then_verbalize": lambda **kw: nl.steer_then_verbalize(
                base, nla, clean_tokens, steering_vector=steer, scale=1.0, steer_layer=0, baseline=0.5, **FAST, **kw),
            "patching_study": lambda **kw: nl.patching_study(
                base, nla, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=1, baseline=0.5, **FAST, **kw)}
    for name, run in runs.items():
        with pytest.warns(UserWarning, match=f"^capture_layer=1 differs from layer {LAYER}, the one this NLA") as seen:
            run(capture_layer=1)
        assert seen[0].filename == __file__, name  # the warning points at the caller's line
        recwarn.clear()
        run(capture_layer=LAYER)
        run()
        assert not [w for w in recwarn if "capture_layer" in str(w.message)], name


def test_numpy_integer_layers_steer_patch_and_read_out_as_their_ints(base, av_karvonen, steer):
    """steer_layer / patch_layer / capture_layer=np.int64(...) were refused as not an int, where positions took
    NumPy ints; a capture_layer that is no int at all ('1') was a bare TypeError from comparing it with steer_layer."""
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    steering = {"steering_vector": steer, "scale": 1.0, **FAST}
    got = nl.steer_then_verbalize(base, av_karvonen, clean_tokens, steer_layer=np.int64(0),
                                  capture_layer=np.int32(LAYER), **steering)
    expected = nl.steer_then_verbalize(base, av_karvonen, clean_tokens, steer_layer=0, **steering)
    assert (type(got.steer_layer), type(got.layer)) == (int, int)
    assert torch.equal(got.steered_vectors, expected.steered_vectors)
    study = nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=np.int64(1),
                              patch_position=1, **FAST)
    assert study.hook_name == "blocks.1.hook_resid_pre"
    assert torch.equal(study.patched_vectors, nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens,
                                                                patch_layer=1, patch_position=1,
                                                                **FAST).patched_vectors)
    with pytest.raises(nl.InputError, match=r"^capture_layer must be an int indexing the model's 4 blocks \(0-3\), "
                                            r"got '1'$"):
        nl.steer_then_verbalize(base, av_karvonen, clean_tokens, steer_layer=0, capture_layer="1", **steering)


def test_patching_the_embedding_of_the_one_differing_token_gives_the_clean_run(base, av_karvonen):
    """activation_name="embed" was refused: TL's get_act_name("embed", 0) says blocks.0.hook_embed. The tiny base
    has no positional embedding, so the corrupted run with the clean token's embedding is the clean run."""
    clean_tokens, corrupted_tokens = (t[:1] for t in equal_length_pair(base))
    column = int((clean_tokens[0] != corrupted_tokens[0]).nonzero()[0])
    study = nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=0,
                              patch_position=column, activation_name="embed", **FAST)
    assert study.hook_name == "hook_embed"
    assert torch.equal(study.patched_vectors, study.clean_vectors)
    assert (study.corrupted_vectors - study.clean_vectors).abs().max() > 1e-2
    with pytest.raises(nl.InputError, match="embedding before block 0, so patch_layer must be 0, got 1"):
        nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=1, patch_position=column,
                          activation_name="embed")
    assert no_hooks_left(base)


def test_patching_pos_embed_of_a_rotary_model_says_it_has_none_and_what_to_patch(base, av_karvonen):
    """The bridge lists hook_pos_embed on the rotary tiny base (an alias of the rotary module, which never fires):
    "pos_embed" was told to call set_use_attn_result(True), which changes nothing; on HookedTransformer it was
    'not a hook point'. Both now say the model has no position embedding and name what to patch instead."""
    assert base.cfg.positional_embedding_type == "rotary"
    clean_tokens, corrupted_tokens = (t[:1] for t in equal_length_pair(base))
    with pytest.raises(nl.InputError, match=r"no position embedding .*'rotary'.*activation_name='embed'") as refused:
        nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=1,
                          activation_name="pos_embed", **FAST)
    assert "set_use" not in str(refused.value)
    assert no_hooks_left(base)


def hf_patching(folder, clean_tokens, corrupted_tokens, position):
    """Plain HF: decoder layer 0's output (TL's blocks.1.hook_resid_pre) at `position` copied from the clean
    run into the corrupted one, every token attended; hidden states of layer K at the last column."""
    from hf_reference import load_hf

    hf, _ = load_hf(folder)
    layer0 = hf.model.layers[0]

    def run(tokens):
        return hf(tokens, attention_mask=torch.ones_like(tokens), output_hidden_states=True).hidden_states

    def hidden(out):
        return out[0] if isinstance(out, tuple) else out

    kept = {}

    def keep(module, inputs, out):
        kept["clean"] = hidden(out).clone()

    def patch(module, inputs, out):
        h = hidden(out).clone()
        h[:, position] = kept["clean"][:, position]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = layer0.register_forward_hook(keep)
    clean = run(clean_tokens)[LAYER + 1][:, -1]
    handle.remove()

    corrupted = run(corrupted_tokens)[LAYER + 1][:, -1]
    handle = layer0.register_forward_hook(patch)
    patched = run(corrupted_tokens)[LAYER + 1][:, -1]
    handle.remove()
    return clean, corrupted, patched


@pytest.mark.parametrize("where", ["end", "start"])
def test_patching_study_reads_pad_id_tokens_the_attention_mask_marks_real(base, av_karvonen, tiny_paths, where):
    """Qwen's pad token is <|endoftext|>, which ends documents: with no attention_mask argument, a prompt ending
    in it was read one column early (-1 skipped it as padding) and a leading one was masked on both backends."""
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    pad = torch.full((len(clean_tokens), 1), base.tokenizer.pad_token_id)
    clean_tokens, corrupted_tokens = ((torch.cat([t, pad], 1) if where == "end" else torch.cat([pad, t], 1))
                                      for t in (clean_tokens, corrupted_tokens))
    position = 2 if where == "start" else 1
    study = nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=1,
                              patch_position=position, attention_mask=torch.ones_like(clean_tokens), **FAST)
    assert [r.position for r in study.rows] == [clean_tokens.shape[1] - 1] * 3 * len(clean_tokens)
    with torch.no_grad():
        expected = hf_patching(tiny_paths["av_karvonen"], clean_tokens, corrupted_tokens, position)
    for got, want in zip((study.clean_vectors, study.corrupted_vectors, study.patched_vectors), expected, strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-4)
    assert (study.patched_vectors - study.corrupted_vectors).abs().max() > 1e-2
    assert no_hooks_left(base)


def test_patching_an_attention_pattern_patches_the_query_row_of_every_head(base, av_karvonen):
    """`[batch, head, query, key]`: patch_position is the query row, as TL's pattern patchers read it."""
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    pattern = "blocks.1.attn.hook_pattern"
    study = nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=1, patch_position=-2,
                              activation_name="pattern", **FAST)
    _, clean_cache = base.run_with_cache(clean_tokens, names_filter=pattern)
    query = clean_tokens.shape[1] - 2

    def patch(corrupted, hook):
        corrupted = corrupted.clone()
        corrupted[:, :, query, :] = clean_cache[pattern][:, :, query, :]
        return corrupted

    with base.hooks(fwd_hooks=[(pattern, patch)]):
        _, patched = base.run_with_cache(corrupted_tokens, names_filter=NAME)
    assert study.hook_name == pattern
    assert torch.equal(study.patched_vectors, patched[NAME][:, -1])
    assert (study.patched_vectors - study.corrupted_vectors).abs().max() > 1e-4
    with pytest.raises(nl.InputError, match="patch_position must be"):  # a query row, not one of 4 heads
        nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=1,
                          patch_position=clean_tokens.shape[1], activation_name="pattern")
    assert no_hooks_left(base)


@pytest.mark.parametrize(("name", "setter"), [("result", "set_use_attn_result"), ("mlp_in", "set_use_hook_mlp_in"),
                                              ("q_input", "set_use_split_qkv_input")])
def test_patching_an_activation_tl_computes_only_on_request_says_how_to_turn_it_on(base, av_karvonen, name, setter):
    """hook_result and friends are hook points of every block but fire only after their set_use_* switch: it
    was a KeyError, then an error naming set_use_attn_result for all of them."""
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    assert not (base.cfg.use_attn_result or base.cfg.use_hook_mlp_in or base.cfg.use_split_qkv_input)
    with pytest.raises(nl.InputError, match=rf"blocks.1.*hook_{name} would not fire: .*{setter}\(True\)"):
        nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=1, patch_position=1,
                          activation_name=name, **FAST)
    assert no_hooks_left(base)


def test_steer_positions_on_padding_are_refused_before_either_run(base, nla, steer, monkeypatch):
    tokens, _ = padded(base, "left")

    def no_run(*args: object) -> None:
        raise AssertionError("a run started before steer_positions were checked")

    monkeypatch.setattr(nl.experiments, "_capture_run", no_run)
    # The message named no argument ("position 0 of row 1 is padding"): the user had given two kinds of positions
    with pytest.raises(nl.InputError, match=r"steer_positions: position 0 of row \d is padding"):
        nl.steer_then_verbalize(base, nla, tokens, steering_vector=steer, scale=1.0, steer_layer=LAYER,
                                steer_positions=0, **FAST)  # column 0 is padding in the shorter rows


def test_an_all_false_positions_mask_is_named_not_reported_as_no_vectors(base, nla, steer):
    """It said "no vectors given: pass at least one [d_model] vector", which sent the user to the wrong argument."""
    tokens, mask = padded(base, "left")
    nothing = torch.zeros(tokens.shape, dtype=torch.bool)
    message = r"the boolean positions mask selects no token \(every entry is False\)"
    with pytest.raises(nl.InputError, match=message):
        nl.steer_then_verbalize(base, nla, tokens, attention_mask=mask, steering_vector=steer, scale=1.0,
                                steer_layer=LAYER, positions=nothing, **FAST)
    with pytest.raises(nl.InputError, match=message):
        nl.steer_with_words(nla, base, tokens, nothing, edit="a dog", attention_mask=mask)


@pytest.mark.parametrize(("wrong", "message"), [
    (lambda tokens, vocab: tokens.float(), "must hold integer token ids, got dtype torch.float32"),
    (lambda tokens, vocab: tokens.index_fill(1, torch.tensor([1]), vocab), r"hold id \d+, outside this model's "
                                                                          r"vocabulary \(0\.\.\d+\)"),
    (lambda tokens, vocab: tokens.index_fill(1, torch.tensor([1]), -1), r"hold id -1, outside"),
])
def test_token_ids_the_base_cannot_embed_are_input_errors(base, nla, steer, wrong, message):
    """Tokens of another tokenizer (or floats) raised TL's bare IndexError from its embedding, or a shape error from
    HF's rotary on the bridge; a negative id ran on HookedTransformer, embedding a row counted from the end."""
    tokens, mask = padded(base, "left")
    bad = wrong(tokens, base.cfg.d_vocab)
    with pytest.raises(nl.InputError, match="tokens " + message):
        nl.steer_then_verbalize(base, nla, bad, attention_mask=mask, steering_vector=steer, scale=1.0,
                                steer_layer=LAYER, **FAST)
    with pytest.raises(nl.InputError, match="corrupted_tokens " + message):
        nl.patching_study(base, nla, tokens, bad, patch_layer=0, patch_position=-1, attention_mask=mask, **FAST)
    with pytest.raises(nl.InputError, match="tokens " + message):
        nl.steer_with_words(nla, base, bad, -1, edit="a dog", attention_mask=mask)
    with pytest.raises(nl.InputError, match="tokens " + message):
        nl.capture(base, LAYER, -1, tokens=bad, attention_mask=mask)
    with pytest.raises(nl.InputError, match=r"token_rows\[0\] " + message):
        explain_tokens(nla, base, [bad[0].tolist()])
    assert no_hooks_left(base)


def test_tokens_wider_than_the_base_context_are_refused_before_a_run(base, nla, steer):
    """They died inside TransformerLens with an IndexError from the rotary table, as steer_with_words' once did."""
    n_ctx = base.cfg.n_ctx
    word = base.tokenizer.encode(" sea", add_special_tokens=False)
    wide, fits = torch.tensor([word * (n_ctx + 1)]), torch.tensor([word * n_ctx])
    message = rf"tokens have {n_ctx + 1} columns, over the base model's context of {n_ctx}"
    with pytest.raises(nl.PromptTooLongError, match=message):
        nl.steer_then_verbalize(base, nla, wide, steering_vector=steer, scale=1.0, steer_layer=LAYER, **FAST)
    with pytest.raises(nl.PromptTooLongError, match="clean_" + message):
        nl.patching_study(base, nla, wide, wide, patch_layer=0, patch_position=-1, **FAST)
    with pytest.raises(nl.PromptTooLongError, match=message):
        nl.capture(base, LAYER, -1, tokens=wide)
    with nl.capture(base, LAYER, -1, tokens=fits) as cap:
        base(fits)
    assert len(cap.vectors) == 1 and no_hooks_left(base)


def test_an_all_false_steer_positions_mask_is_named_steer_positions(base, nla, steer):
    """It said "the boolean positions mask ... set True at the real tokens to read": `positions`, the captured
    tokens, which the user had not given, and nothing about steering."""
    tokens, mask = padded(base, "left")
    nothing = torch.zeros(tokens.shape, dtype=torch.bool)
    with pytest.raises(nl.InputError, match=r"the boolean steer_positions mask selects no token \(every entry is "
                                            r"False\); set True at the real tokens to steer"):
        nl.steer_then_verbalize(base, nla, tokens, attention_mask=mask, steering_vector=steer, scale=1.0,
                                steer_layer=LAYER, steer_positions=nothing, **FAST)
    with pytest.raises(nl.InputError, match=r"a boolean steer_positions mask must have the \[batch, pos\] shape"):
        nl.steer_then_verbalize(base, nla, tokens, attention_mask=mask, steering_vector=steer, scale=1.0,
                                steer_layer=LAYER, steer_positions=nothing[:1], **FAST)


@pytest.mark.parametrize(("steer_positions", "message"), [
    ("last", r"^steer_positions must be an int, a non-empty list of ints"),
    (torch.tensor([0.0, 1.0]), r"^a steer_positions tensor must be \[batch\] integers"),
    ([2**70], r"^steer_positions: position 1180591620717411303424 is outside every row \(past int64\)"),
])
def test_steer_positions_of_the_wrong_kind_are_named_steer_positions(base, nla, steer, steer_positions, message):
    """These said "positions must be ...", the captured tokens' argument, which the user had not given."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=message):
        nl.steer_then_verbalize(base, nla, tokens, attention_mask=mask, steering_vector=steer, scale=1.0,
                                steer_layer=LAYER, steer_positions=steer_positions, **FAST)


def test_numpy_integer_positions_steer_and_patch_as_python_ints(base, av_karvonen, steer):
    """`steer_positions` and `patch_position` of NumPy ints were refused as not ints."""
    tokens, mask = padded(base, "left")
    kwargs = {"attention_mask": mask, "steering_vector": steer, "scale": 2.0, "steer_layer": 0, **FAST}
    got = nl.steer_then_verbalize(base, av_karvonen, tokens, steer_positions=[np.int64(-2)], **kwargs)
    expected = nl.steer_then_verbalize(base, av_karvonen, tokens, steer_positions=[-2], **kwargs)
    assert torch.equal(got.steered_vectors, expected.steered_vectors)
    assert not torch.equal(got.steered_vectors, got.clean_vectors)
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    studies = [nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=0,
                                 patch_position=position, **FAST) for position in (np.int64(1), 1)]
    assert torch.equal(studies[0].patched_vectors, studies[1].patched_vectors)
    assert type(studies[0].patch_position) is int and studies[0].patch_position == 1


@pytest.mark.parametrize("use_nla", [True, False], ids=["nla", "av"])
def test_a_keyword_verbalize_does_not_take_is_refused_before_any_base_run(base, nla, steer, monkeypatch, use_nla):
    """A typo in **verbalize_kwargs was a TypeError from verbalize, after every base-model run."""
    reader = nla if use_nla else nla.av
    clean, corrupted = equal_length_pair(base)
    monkeypatch.setattr(type(base), "run_with_hooks", lambda *a, **k: pytest.fail("a base run started"))
    monkeypatch.setattr(type(base), "run_with_cache", lambda *a, **k: pytest.fail("a base run started"))
    passed_to = "round_trip" if use_nla else "verbalize"
    with pytest.raises(nl.InputError, match=rf"\['max_new_token'\], which neither it nor {passed_to} takes; "
                                            "did you mean 'max_new_tokens'"):
        nl.steer_then_verbalize(base, reader, clean, steering_vector=steer, scale=1.0, steer_layer=LAYER,
                                max_new_token=4)
    with pytest.raises(nl.InputError, match=r"patching_study got the keyword\(s\) \['clean_mask'\]"):
        nl.patching_study(base, reader, clean, corrupted, patch_layer=0, patch_position=-1, clean_mask=None)
    if use_nla:  # explain reads with an NLA only
        with pytest.raises(nl.InputError, match=r"explain got the keyword\(s\) \['batchsize'\].*'batch_size'"):
            nla.explain(base, "The cat sat", batchsize=2)
    else:  # reconstruct_batch_size is the round trip's: an AV alone does not take it
        with pytest.raises(nl.InputError, match=r"\['reconstruct_batch_size'\], which neither it nor verbalize"):
            nl.steer_then_verbalize(base, reader, clean, steering_vector=steer, scale=1.0, steer_layer=LAYER,
                                    reconstruct_batch_size=4)


def test_steer_positions_skip_right_padding_without_a_mask(base, nla, steer):
    """Without a mask the steering hook reads padding as the capture does: -1 is each row's last real token."""
    tokens, mask = padded(base, "right")
    kwargs = {"steering_vector": steer, "scale": 3.0, "steer_layer": LAYER, "steer_positions": -1, **FAST}
    implicit = nl.steer_then_verbalize(base, nla, tokens, baseline=0.5, **kwargs)
    explicit = nl.steer_then_verbalize(base, nla, tokens, attention_mask=mask, baseline=0.5, **kwargs)
    assert (implicit.steered_vectors - implicit.clean_vectors - 3.0 * steer).abs().max() < 1e-5
    assert [(r.batch, r.position) for r in implicit.rows] == [(b, int(m.sum()) - 1) for b, m in enumerate(mask)]
    assert torch.equal(implicit.steered_vectors, explicit.steered_vectors)


def test_a_site_two_steer_positions_name_is_steered_once(base, av_karvonen, steer):
    """[2, -1] names column 2 twice in the 3-token row: it moved by 2 * scale * vector there (index_put accumulated)."""
    tokens, mask = padded(base, "right")
    assert int(mask[1].sum()) == 3
    result = nl.steer_then_verbalize(base, av_karvonen, tokens, attention_mask=mask, steering_vector=steer,
                                     scale=1.5, steer_layer=LAYER, positions=[2], steer_positions=[2, -1], **FAST)
    assert (result.steered_vectors - result.clean_vectors - 1.5 * steer).abs().max() < 1e-5
    assert no_hooks_left(base)


def test_a_steering_that_overflows_the_residual_is_named_by_run_and_site(base, av_karvonen, steer):
    """It was the AV's refusal of "vectors at rows [4, 5, 6, 7]": rows of its joint batch of both runs, which the
    user's four-row batch does not have, with no word of the steering."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.VectorError, match=r"^the steered run's layer-2 residuals hold NaN or Inf at \(batch, "
                                             r"position\) \[\(0, 8\), \(1, 8\), \(2, 8\), \(3, 8\)\]: .*lower scale"):
        nl.steer_then_verbalize(base, av_karvonen, tokens, attention_mask=mask, steering_vector=steer * 1e37,
                                scale=100.0, steer_layer=1, **FAST)
    assert no_hooks_left(base)


def test_a_steering_that_cannot_reach_the_captured_sites_warns(base, av_karvonen, steer, recwarn):
    """Steering tokens after the captured ones (attention is causal) left every readout as it was, without a word."""
    tokens, mask = padded(base, "left")
    kwargs = {"attention_mask": mask, "steering_vector": steer, "scale": 5.0, "steer_layer": 1, "positions": -3, **FAST}
    with pytest.warns(UserWarning, match="the steering changed no captured residual.*after the captured positions"):
        unreached = nl.steer_then_verbalize(base, av_karvonen, tokens, steer_positions=-1, **kwargs)
    assert torch.equal(unreached.steered_vectors, unreached.clean_vectors)
    recwarn.clear()
    reached = nl.steer_then_verbalize(base, av_karvonen, tokens, steer_positions=-3, **kwargs)
    assert not recwarn.list and (reached.steered_vectors - reached.clean_vectors).abs().max() > 1e-2


def test_steering_hook_refuses_a_vector_it_would_broadcast_or_spread_as_nan(base, steer):
    """A [9, d_model] tensor was added position by position to a 9-token run, a NaN spread through it, and a
    vector of another width or a list failed inside the forward with torch's own error."""
    tokens, mask = padded(base, "left")
    assert tokens.shape[1] == 9
    for vector, message in [(torch.randn(9, D_MODEL), r"^vector must be one \[d_model\] tensor .*got \[9, 64\]"),
                            ([1.0] * D_MODEL, r"^vector must be one \[d_model\] tensor .*got list"),
                            (torch.full((D_MODEL,), float("nan")), r"^vector at rows \[0\] hold NaN")]:
        with pytest.raises(nl.VectorError, match=message):
            steering_hook(vector, 1.0)
    with pytest.raises(nl.InputError, match="scale=nan: must be a finite number"):
        steering_hook(steer, float("nan"))
    wide = steering_hook(torch.randn(D_MODEL + 1), 1.0)
    with pytest.raises(nl.VectorError, match="vector has 65 entries but the residual there has d_model = 64"):
        base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[("blocks.1.hook_resid_post", wide)])
    assert no_hooks_left(base)


def test_patching_study_table_has_a_row_per_run_and_site_with_fve(base, nla, monkeypatch):
    distinct_readouts(nla.av, monkeypatch)
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    study = nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=1, patch_position=1,
                              capture_position=[-1, 0], baseline=0.8, **FAST)
    rt = study.round_trip
    assert rt is not None and rt.baseline_source == "given"
    assert [r.run for r in study.rows] == ["clean"] * 4 + ["corrupted"] * 4 + ["patched"] * 4
    width = clean_tokens.shape[1]
    assert [(r.batch, r.position) for r in study.rows[:4]] == [(0, width - 1), (0, 0), (1, width - 1), (1, 0)]
    vectors = torch.cat([study.clean_vectors, study.corrupted_vectors, study.patched_vectors])
    for i, row in enumerate(study.rows):
        assert row.verbalization == rt.verbalizations[i]
        mse = _independent_mse(nla, row.verbalization.explanation, vectors[i])
        assert row.fve == pytest.approx(1 - mse / rt.baseline, abs=1e-5)
    assert len({round(r.fve, 6) for r in study.rows[:4]}) == 4
    assert all(r.cosine_to_clean == pytest.approx(1.0, abs=1e-6) for r in study.rows[:4])
    # Column 0 comes before the patched column 1, so the patch cannot reach it.
    assert torch.equal(study.patched_vectors[1::2], study.corrupted_vectors[1::2])
    assert set(dataclasses.asdict(study.rows[0])) >= {"run", "batch", "position", "token", "fve"}


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_patch_column_on_padding_warns_naming_the_rows_it_cannot_reach(base, av_karvonen, side):
    """Right-padded, -1 is a pad column in every row but the longest: where the corrupted row pads it, the
    patched vector was the corrupted one, with no sign of it."""
    clean_tokens, mask = padded(base, side)
    corrupted_tokens = clean_tokens.flip(0)
    pad_column = -1 if side == "right" else 0
    padded_rows = sorted({*(~mask[:, pad_column].bool()).nonzero().flatten().tolist(),
                          *(~mask.flip(0)[:, pad_column].bool()).nonzero().flatten().tolist()})
    assert padded_rows
    with (pytest.warns(UserWarning, match=rf"padding in rows \[{', '.join(map(str, padded_rows))}\]"),
          pytest.warns(UserWarning, match="different columns")):  # flipped rows of different lengths
        study = nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=0,
                                  patch_position=pad_column, **FAST)
    for row in (~corrupted_tokens.ne(base.tokenizer.pad_token_id)[:, pad_column]).nonzero().flatten().tolist():
        assert torch.equal(study.patched_vectors[row], study.corrupted_vectors[row])
    assert no_hooks_left(base)


def test_a_patch_column_real_in_every_row_does_not_warn(base, av_karvonen, recwarn):
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=-1, **FAST)
    assert not [w for w in recwarn if "padding" in str(w.message)]


def test_patching_the_captured_site_itself_restores_the_clean_vector(base, av_karvonen):
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    study = nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=LAYER,
                              patch_position=-1, activation_name="resid_post", **FAST)
    assert study.hook_name == NAME
    assert torch.equal(study.patched_vectors, study.clean_vectors)
    assert not torch.equal(study.corrupted_vectors, study.clean_vectors)
    assert [r.verbalization for r in study.rows[4:]] == [r.verbalization for r in study.rows[:2]]
    assert all(r.fve is None for r in study.rows)


@pytest.mark.parametrize("which", ["av_karvonen", "av_embedding"])
def test_injection_only_sees_the_direction_so_verbalize_direction_is_scale_free(request, which):
    av = request.getfixturevalue(which)
    direction = torch.randn(2, D_MODEL, generator=torch.Generator().manual_seed(5))
    tokens = av.prompt_tokens(2)
    small = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(direction, tokens).fwd_hooks())
    large = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(1000 * direction, tokens).fwd_hooks())
    assert (small - large).abs().max() < 1e-4
    reference = torch.randn(8, D_MODEL, generator=torch.Generator().manual_seed(6)) * 7.0
    plain = nl.verbalize_direction(av, direction, **FAST)
    rescaled = nl.verbalize_direction(av, 1000 * direction, scale_like=reference, **FAST)
    assert plain.verbalizations == rescaled.verbalizations
    assert torch.equal(plain.vectors, direction)
    norms = rescaled.vectors.norm(dim=-1)
    assert torch.allclose(norms, reference.norm(dim=-1).mean().expand(2), rtol=1e-6)
    assert torch.allclose(torch.cosine_similarity(rescaled.vectors, direction, dim=-1), torch.ones(2), atol=1e-6)
    assert plain.explanations == [v.explanation for v in plain.verbalizations]


@pytest.mark.parametrize("size", [1e-25, 1e25])
def test_scale_like_rescales_a_direction_whose_squared_norm_leaves_fp32(av_karvonen, size):
    """The AV reads such a direction as usual; rescaling it by its plain norm (which underflows to 0 or
    overflows to inf) made it NaN or zero, and verbalize refused it."""
    direction = torch.randn(2, D_MODEL, generator=torch.Generator().manual_seed(5))
    reference = torch.randn(8, D_MODEL, generator=torch.Generator().manual_seed(6)) * 7.0
    plain = nl.verbalize_direction(av_karvonen, direction, **FAST)
    rescaled = nl.verbalize_direction(av_karvonen, size * direction, scale_like=reference, **FAST)
    assert rescaled.verbalizations == plain.verbalizations
    assert torch.allclose(rescaled.vectors.norm(dim=-1), reference.norm(dim=-1).mean().expand(2), rtol=1e-6)
    assert torch.allclose(torch.cosine_similarity(rescaled.vectors, direction, dim=-1), torch.ones(2), atol=1e-6)


@pytest.mark.parametrize("size", [1e-25, 1e25])
def test_scale_like_whose_squared_norm_leaves_fp32_gives_its_norm(av_karvonen, size):
    """scale_like's own fp32 norm underflowed to 0 or overflowed to inf, so verbalize refused the rescaled vectors
    as zero or non-finite ("vectors at rows [0]"), an argument the user never passed."""
    direction = torch.randn(2, D_MODEL, generator=torch.Generator().manual_seed(5))
    reference = torch.randn(8, D_MODEL, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * size
    rescaled = nl.verbalize_direction(av_karvonen, direction, scale_like=reference.float(), **FAST)
    assert rescaled.verbalizations == nl.verbalize_direction(av_karvonen, direction, **FAST).verbalizations
    expected = reference.float().double().norm(dim=-1).mean()
    assert torch.allclose(rescaled.vectors.double().norm(dim=-1), expected.expand(2), rtol=1e-6)
    with pytest.raises(nl.VectorError, match=r"^scale_like's mean norm .* is past float32's range"):
        nl.verbalize_direction(av_karvonen, direction, scale_like=torch.full((2, D_MODEL), 1e38), **FAST)


@pytest.mark.parametrize("peak", [1e39, 1e-46], ids=["overflow", "underflow"])
def test_verbalize_direction_names_a_float64_argument_past_float32s_range(av_karvonen, peak):
    """Its .float() made such a row inf or zero: a direction was refused as "vectors at rows [1] hold NaN or Inf" (a
    name the user never passed), and a tiny scale_like rescaled every vector to zero ("vectors ... are zero")."""
    direction = torch.randn(2, D_MODEL, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    wide = direction.clone()
    wide[1] = wide[1] / wide[1].abs().max() * peak
    with pytest.raises(nl.VectorError, match=r"^direction at rows \[1\] are float64 past float32's range"):
        nl.verbalize_direction(av_karvonen, wide, **FAST)
    with pytest.raises(nl.VectorError, match=r"^scale_like at rows \[1\] are float64 past float32's range"):
        nl.verbalize_direction(av_karvonen, direction, scale_like=wide, **FAST)


def test_verbalize_direction_takes_an_nla_as_the_other_helpers_do(nla, steer):
    through_nla = nl.verbalize_direction(nla, steer, **FAST)
    assert through_nla.verbalizations == nla.av.verbalize(steer[None], **FAST)
    assert through_nla.summary().startswith("1 direction verbalized, ")


@pytest.mark.parametrize("shape", [(D_MODEL,), (1, D_MODEL)], ids=["one_vector", "batch"])
def test_verbalize_direction_returns_a_copy_of_the_direction(av_karvonen, steer, shape):
    """Without scale_like, `.vectors` was the caller's float32 tensor itself (a view of a single vector): an edit of
    the result edited the direction, and a direction that required grad came back attached to its graph."""
    direction = steer.reshape(shape).clone()
    result = nl.verbalize_direction(av_karvonen, direction, **FAST)
    assert torch.equal(result.vectors, steer[None])
    result.vectors.mul_(2.0)
    assert torch.equal(direction.reshape(D_MODEL), steer)
    assert not nl.verbalize_direction(av_karvonen, direction.requires_grad_(), **FAST).vectors.requires_grad


@pytest.mark.parametrize("use_nla", [True, False], ids=["nla", "av"])
def test_verbalize_direction_refuses_a_keyword_verbalize_does_not_take(nla, steer, use_nla):
    """A typo, or a round-trip keyword such as baseline= given with an NLA, was verbalize's bare TypeError."""
    reader = nla if use_nla else nla.av
    with pytest.raises(nl.InputError, match=r"^verbalize_direction got the keyword\(s\) \['max_new_token'\], which "
                                            "neither it nor verbalize takes; did you mean 'max_new_tokens'"):
        nl.verbalize_direction(reader, steer, max_new_token=4)
    with pytest.raises(nl.InputError, match=r"^verbalize_direction got the keyword\(s\) \['baseline'\]"):
        nl.verbalize_direction(reader, steer, baseline=0.5, **FAST)


def test_word_diff_reports_added_and_removed_words():
    assert word_diff("the cat sat on the mat", "the dog sat on a red mat") == (["dog", "a", "red"], ["cat", "the"])
    assert word_diff("same words", "same words") == ([], [])
    # Quotes and punctuation around a word are not part of it; a word of punctuation only is what its quotes hold.
    assert word_diff('The token " be", after "he".', 'The token " am", after "he"') == (["am"], ["be"])
    assert word_diff('The token "s"', 'The token ","') == ([","], ["s"])
    assert word_diff("\u201cFear\u201d, he said", "Fear he said!") == ([], [])


def test_word_diff_leaves_no_quotes_or_punctuation_attached_and_no_empty_words():
    """Steering rows listed '",".' and a lone '"' (the opening quote of '" heard"') as words."""
    clean = 'The token " heard", after "I", predicting " you".'
    steered = 'The token "love", after "will", predicting ",".'
    assert word_diff(clean, steered) == (["love", "will", ","], ["heard", "I", "you"])
    assert word_diff('"\'", a , b -- "', "a b") == ([], ["'"])  # a bare comma, dash or lone quote is no word


def test_a_studys_round_trip_warnings_are_counted_where_its_repr_and_view_show_it(base, nla, av_karvonen, steer):
    """The round trip's "no FVE" is kept on `result.round_trip.warnings`, never emitted: the repr and view said "no
    FVE" but not where to read why. Counts are in words: "1 sites, 0 readouts changed" read as a typo."""
    tokens, _ = padded(base, "left")
    steered = nl.steer_then_verbalize(base, nla, tokens[:1], steering_vector=steer, scale=0.0, steer_layer=0, **FAST)
    assert len(steered.round_trip.warnings) == 1  # two vectors: no baseline
    assert repr(steered).splitlines()[0].endswith("1 site, 0 readouts changed by steering; no FVE (no baseline: "
                                                  "pass baseline=); 1 warning (.warnings)")
    assert "1 warning (.warnings)" in steered._repr_html_()
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    study = nl.patching_study(base, nla, clean_tokens[:1], corrupted_tokens[:1], patch_layer=0, patch_position=0,
                              **FAST)
    assert repr(study).splitlines()[0].endswith("; 1 warning (.warnings)")
    av_only = nl.patching_study(base, av_karvonen, clean_tokens[:1], corrupted_tokens[:1], patch_layer=0,
                                patch_position=0, **FAST)
    assert av_only.round_trip is None and "warning" not in repr(av_only) + av_only._repr_html_()


def test_a_saved_study_keeps_its_round_trips_warnings(base, nla, av_karvonen, steer, tmp_path):
    """`result.round_trip.warnings` ("no FVE", a failed injection) were in no saved file: a .parquet read back later
    said "no FVE" in its summary but not why, and nothing of a failed injection."""
    tokens, _ = padded(base, "left")
    steered = nl.steer_then_verbalize(base, nla, tokens[:1], steering_vector=steer, scale=0.0, steer_layer=0, **FAST)
    saved = nl.read_result(steered.save(tmp_path / "steered.parquet"))
    assert saved.attrs["warnings"] == steered.round_trip.warnings and saved.attrs["warnings"][0].startswith("no FVE")
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    study = nl.patching_study(base, nla, clean_tokens[:1], corrupted_tokens[:1], patch_layer=0, patch_position=0,
                              **FAST)
    assert nl.read_result(study.save(tmp_path / "study.parquet")).attrs["warnings"] == study.round_trip.warnings
    av_only = nl.patching_study(base, av_karvonen, clean_tokens[:1], corrupted_tokens[:1], patch_layer=0,
                                patch_position=0, **FAST)
    assert nl.read_result(av_only.save(tmp_path / "av_only.parquet")).attrs["warnings"] == []


@pytest.mark.parametrize("use_nla", [True, False], ids=["nla", "av-only"])
def test_a_studys_own_warnings_are_kept_on_the_result_and_in_its_saved_file(base, nla, av_karvonen, steer, tmp_path,
                                                                             use_nla):
    """What the studies warned of themselves (a patch column on padding, rows of different token lengths, steering
    that changed nothing, another layer than the NLA's) was emitted once and kept nowhere: `.warnings` held the round
    trip's alone, so a notebook's view and a saved .parquet said nothing of it."""
    reader = nla if use_nla else av_karvonen
    tokens, mask = padded(base, "left")
    with pytest.warns(UserWarning) as seen:
        steered = nl.steer_then_verbalize(base, reader, tokens, attention_mask=mask, steering_vector=steer, scale=5.0,
                                          steer_layer=1, positions=-3, steer_positions=-1, capture_layer=1, **FAST)
        study = nl.patching_study(base, reader, tokens, tokens.flip(0), patch_layer=0, patch_position=0, **FAST)
    emitted = [str(w.message) for w in seen]
    read = [] if not use_nla else steered.round_trip.warnings
    assert steered.warnings[:2] == emitted[:2] and steered.warnings[2:] == read
    assert steered.warnings[0].startswith("capture_layer=1 differs") and "changed no captured" in steered.warnings[1]
    read = [] if not use_nla else study.round_trip.warnings
    assert study.warnings[:2] == emitted[2:] and study.warnings[2:] == read
    assert "is padding in rows" in study.warnings[0] and "different columns" in study.warnings[1]
    for name, result in (("steered", steered), ("study", study)):
        saved = nl.read_result(result.save(tmp_path / f"{name}.parquet"))
        assert saved.attrs["warnings"] == result.warnings
        assert f"{len(result.warnings)} warnings (.warnings)" in repr(result).splitlines()[0]


# Two prompts of different token lengths, left-padded into one batch; the corrupted ones swap one word each.
CLEAN_PROMPTS = ["The cat sat on the mat.", "A dog ran"]
CORRUPTED_PROMPTS = ["The dog sat on the mat.", "A cat ran"]


def _studies_of_two_prompts(base, nla, steer) -> dict[str, nl.TabularResult]:
    clean, mask = padded(base, "left", CLEAN_PROMPTS)
    corrupted, corrupted_mask = padded(base, "left", CORRUPTED_PROMPTS)
    assert torch.equal(mask, corrupted_mask) and not mask.all()  # row 1 has padding, which no prompt should hold
    steered = nl.steer_then_verbalize(base, nla, clean, attention_mask=mask, steering_vector=steer, scale=2.0,
                                      steer_layer=0, baseline=0.5, **FAST)
    study = nl.patching_study(base, nla, clean, corrupted, attention_mask=mask, patch_layer=0, patch_position=-1,
                              baseline=0.5, **FAST)
    return {"steered": steered, "study": study}


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_saved_steering_and_patching_rows_name_the_prompt_of_their_batch_row(base, nla, steer, tmp_path, suffix):
    """The rows held `batch`, `position` and `token` but not the prompt: a file read back later could not say which
    prompt `batch=1` was. Each row's `prompt` is its row's real tokens decoded (padding left out); a patched row ran
    the corrupted tokens."""
    for name, result in _studies_of_two_prompts(base, nla, steer).items():
        path = result.save(tmp_path / f"{name}{suffix}")
        frame = nl.read_result(path)
        runs = list(frame["run"]) if "run" in frame else ["clean"] * len(frame)
        assert set(frame["batch"]) == {0, 1} and len(set(runs)) == (3 if name == "study" else 1)
        expected = [(CLEAN_PROMPTS if run == "clean" else CORRUPTED_PROMPTS)[batch]
                    for run, batch in zip(runs, frame["batch"], strict=True)]
        assert list(frame["prompt"]) == expected
        pd.testing.assert_frame_equal(frame, result.to_pandas())
        pd.testing.assert_frame_equal(nl.read_result(path, result_type=type(result)), result.to_pandas())
        assert "prompt" not in repr(result).splitlines()[1]  # the repr's columns stay as they were


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_steering_and_patching_files_saved_before_rows_named_their_prompt_still_read(base, nla, steer, tmp_path,
                                                                                    suffix):
    """Files saved before rows held `prompt` read back, typed or not, with their rows as they were written."""
    for name, result in _studies_of_two_prompts(base, nla, steer).items():
        path = saved_without(result, tmp_path / f"old-{name}{suffix}", "prompt")
        expected = result.to_pandas().drop(columns=["prompt"])
        for result_type in (None, type(result)):
            pd.testing.assert_frame_equal(nl.read_result(path, result_type=result_type), expected)
        if suffix == ".parquet":
            assert nl.read_result(path).attrs["result_type"] == type(result).__name__


def test_a_bridge_hook_name_for_activation_name_is_answered_with_its_tl_short_name(base, nla):
    """The message took the last part of the name: 'blocks.1.ln2.hook_in' -> 'in', and on the bridge
    get_act_name('in', 1) is blocks.1.hook_in, the block's input (resid_pre), not the MLP norm's input it named."""
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    on_bridge = nl.backends.backend_of(base) == "bridge"
    none = "no short name reaches it on this model"
    for full, fix in [("blocks.1.hook_out", "activation_name='resid_post', patch_layer=1" if on_bridge else none),
                      ("blocks.1.ln2.hook_in", "activation_name='resid_mid', patch_layer=1" if on_bridge else none),
                      ("blocks.1.ln1.hook_scale", none)]:  # TL names it with get_act_name's layer_type alone
        full_name = re.escape(f"activation_name={full!r} is a full hook name")
        with pytest.raises(nl.InputError, match=f"{full_name}.*{fix}"):
            nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=1, patch_position=0,
                              activation_name=full)


def test_experiment_arguments_are_checked_with_typed_errors(base, nla, av_karvonen, steer):
    tokens, mask = padded(base, "left")
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    with pytest.raises(nl.InputError, match="comes after the captured layer"):
        nl.steer_then_verbalize(base, nla, tokens, steering_vector=steer, scale=1.0, steer_layer=LAYER + 1)
    with pytest.raises(nl.InputError, match="steer_layer must be an int"):
        nl.steer_then_verbalize(base, nla, tokens, steering_vector=steer, scale=1.0, steer_layer=-1)
    one_vector = rf"steering_vector must be one \[d_model\] = \[{D_MODEL}\] vector .* got shape \[10\]"
    with pytest.raises(nl.VectorError, match=one_vector):
        nl.steer_then_verbalize(base, nla, tokens, steering_vector=steer[:10], scale=1.0, steer_layer=0)
    with pytest.raises(nl.InputError, match="outside row"):
        nl.steer_then_verbalize(base, nla, tokens, attention_mask=mask, steering_vector=steer, scale=1.0,
                                steer_layer=0, positions=99)
    with pytest.raises(nl.InputError, match="one shape"):
        nl.patching_study(base, nla, clean_tokens, corrupted_tokens[:, 1:], patch_layer=0, patch_position=0)
    with pytest.raises(nl.InputError, match="patch_position must be"):
        nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=99)
    with pytest.raises(nl.InputError, match="not a hook point"):
        nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=0,
                          activation_name="no_such_activation")
    # A full hook name, where TL's short one goes: the message named 'blocks.1.hook_blocks.1.hook_resid_pre'.
    for full, short in [("blocks.1.hook_resid_pre", "activation_name='resid_pre', patch_layer=1"),
                        ("blocks.0.attn.hook_z", "activation_name='z', patch_layer=0"),
                        ("hook_embed", "activation_name='embed', patch_layer=0")]:
        with pytest.raises(nl.InputError, match=re.escape(f"activation_name={full!r} is a full hook name; pass the "
                                                          f"short name") + f".*{re.escape(short)}$"):
            nl.patching_study(base, nla, clean_tokens, corrupted_tokens, patch_layer=1, patch_position=0,
                              activation_name=full)
    result = nl.steer_then_verbalize(base, nla, tokens[:1], steering_vector=steer, scale=0.0, steer_layer=0, **FAST)
    assert all(r.fve_clean is None and r.fve_steered is None for r in result.rows)  # two vectors: no baseline
    assert [w[:6] for w in result.round_trip.warnings] == ["no FVE"] and "no FVE" in result.summary()
    with pytest.raises(nl.InputError, match="expected an NLA or an ActivationVerbalizer"):
        nl.patching_study(base, base, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=0)
    with pytest.raises(nl.VectorError, match="zero"):
        nl.verbalize_direction(av_karvonen, torch.zeros(D_MODEL))
    with pytest.raises(nl.InputError, match="scale=nan: must be a finite number"):
        nl.steer_then_verbalize(base, nla, tokens, steering_vector=steer, scale=float("nan"), steer_layer=0)
    with pytest.raises(nl.InputError, match=r"tokens must be a \[batch, pos\] tensor.*to_tokens.*got str"):
        nl.steer_then_verbalize(base, nla, "The cat", steering_vector=steer, scale=1.0, steer_layer=0)
    with pytest.raises(nl.InputError, match=r"tokens must be a \[batch, pos\] tensor"):
        nl.patching_study(base, nla, "The cat", "The dog", patch_layer=0, patch_position=0)
    assert no_hooks_left(base)


def _base_runs(base, nla, tokens, mask):
    """Every helper that runs the base model, each called once (the AV's readout stubbed where it is not needed)."""
    clean, corrupted = equal_length_pair(base)
    vector = torch.ones(D_MODEL)
    return {
        "explain": lambda: nla.explain(base, "the cat sat", positions=-1, **FAST),
        "steer_then_verbalize": lambda: nl.steer_then_verbalize(base, nla, tokens, attention_mask=mask, scale=1.0,
                                                                steering_vector=vector, steer_layer=1, **FAST),
        "patching_study": lambda: nl.patching_study(base, nla, clean, corrupted, patch_layer=1, patch_position=1,
                                                    attention_mask=torch.ones_like(clean), **FAST),
        "steer_with_words": lambda: nl.steer_with_words(nla, base, tokens, -1, attention_mask=mask, edit="the sea",
                                                        explanations=["a cat"] * len(tokens), continue_tokens=1),
        "resid_post": lambda: resid_post(base, tokens, LAYER, attention_mask=mask),
    }


@pytest.mark.parametrize("helper", ["explain", "steer_then_verbalize", "patching_study", "steer_with_words",
                                    "resid_post"])
def test_a_hook_left_by_run_with_hooks_stays_on_the_base_and_runs(base, nla, helper, monkeypatch):
    """`run_with_hooks(..., reset_hooks_end=False)` (TL's way to keep backward hooks) leaves a hook at context
    level 1, and TL 3.x's `run_with_hooks` / `run_with_cache` remove every level-1 hook on exit: the helpers'
    base runs took the user's hook away."""
    distinct_readouts(nla.av, monkeypatch)
    tokens, mask = padded(base, "left")
    calls = []
    base.run_with_hooks(tokens[:1], fwd_hooks=[("blocks.0.hook_resid_post", lambda resid, hook: calls.append(1))],
                        reset_hooks_end=False)
    try:
        calls.clear()
        _base_runs(base, nla, tokens, mask)[helper]()
        assert calls and len(base.hook_dict["blocks.0.hook_resid_post"].fwd_hooks) == 1
    finally:
        base.reset_hooks()
    assert no_hooks_left(base)


def _gemma_stand_in_base(bos_paths):
    with pytest.warns(UserWarning, match="is an AV checkpoint"):  # a stand-in base: the Gemma AV's weights
        return nl.load_base(bos_paths["gemma_av"])


@pytest.mark.parametrize("run", ["steer_then_verbalize", "patching_study", "explain", "steer_with_words", pytest.param(
    "feature_card", marks=pytest.mark.skipif(not HAS_SAE_LENS, reason="feature cards need sae-lens (TL 3.x)"))])
@pytest.mark.parametrize(("other_base", "message"), [
    # Every experiment names a width mismatch with one message (steer_with_words had its own), as a
    # PairMismatchError: a base the NLA does not read, as `--base` and nl.load_base say (it was an InputError).
    (lambda paths: nl.toy.load().base, f"the base model has d_model=128 but this NLA reads {D_MODEL}-d vectors"),
    # A Gemma base of the tiny NLA's width and depth passed every check, and its activations were explained
    # as if they were the Qwen base's.
    (_gemma_stand_in_base, "the base model's tokenizer has another vocabulary than the NLA's"),
    # A base of the NLA's width and tokenizer that stops before layer K: the experiments said only "layer
    # must be an int in 0..1", not that the base is the wrong one.
    (lambda paths: nl.load_base(save_base_model(paths["gemma_av"].parent / "two_block_base", n_layers=2)),
     rf"the base model has 2 blocks \(0-1\), but this NLA reads layer {LAYER}"),
    # One of the NLA's width and tokenizer with a block more than the AV (a full copy of its base): another model,
    # whose layer-K residuals the NLA never read, ran silently.
    (lambda paths: nl.load_base(save_base_model(paths["gemma_av"].parent / "five_block_base", n_layers=5)),
     r"the base model has 5 blocks \(0-4\), more than the 4 of this NLA's AV, a full copy of the base it reads"),
], ids=["another-width", "another-family", "too-few-blocks", "more-blocks-than-the-av"])
def test_a_base_model_the_nla_cannot_read_is_refused_before_it_runs(nla, bos_paths, run, other_base, message,
                                                                    monkeypatch):
    other = other_base(bos_paths)
    monkeypatch.setattr(other, "run_with_hooks", lambda *a, **k: pytest.fail("ran the base"))
    monkeypatch.setattr(other, "forward", lambda *a, **k: pytest.fail("ran the base"))
    tokens = other.to_tokens(["The cat sat on the mat."])
    calls = {
        "steer_then_verbalize": lambda: nl.steer_then_verbalize(other, nla, tokens, steering_vector=torch.ones(64),
                                                                scale=1.0, steer_layer=0),
        "patching_study": lambda: nl.patching_study(other, nla, tokens, tokens, patch_layer=0, patch_position=0),
        "explain": lambda: nla.explain(other, "The cat sat on the mat."),
        "steer_with_words": lambda: nl.steer_with_words(nla, other, tokens, -1, edit="a dog"),
        # The card scanned the other base and set its contexts beside the explanation of this base's feature.
        "feature_card": lambda: nl.feature_card(make_sae(D_MODEL, 8, NAME), other, ["The cat sat on the mat."], 0, nla),
    }
    with pytest.raises(nl.PairMismatchError, match=message):
        calls[run]()


def test_a_base_cut_short_that_still_reaches_layer_k_explains_as_the_whole_base(nla, base_folder):
    """A base of fewer blocks than the AV that reaches layer K (its first K+1 blocks, loaded to capture cheaply) is
    the same model up to layer K: the check for a base deeper than the AV lets it through, and it captures the
    whole base's residuals."""
    whole = nl.load_base(base_folder)
    short = backends.load_model(base_folder, loading.load_tokenizer(base_folder), dtype=torch.float32, device="cpu",
                                n_layers=LAYER + 1)
    assert short.cfg.n_layers == LAYER + 1 < whole.cfg.n_layers == nla.av.model.cfg.n_layers
    short_rows, whole_rows = (nla.explain(model, "The cat sat on the mat.", positions=[1, -1], max_new_tokens=2)
                              for model in (short, whole))
    torch.testing.assert_close(short_rows.vectors, whole_rows.vectors, rtol=1e-5, atol=1e-5)


def test_vector_errors_name_the_argument_the_vectors_were_passed_as(base, nla, av_karvonen, steer):
    """They said "vectors", which none of these arguments is called."""
    tokens, _ = padded(base, "left")
    with pytest.raises(nl.VectorError, match=r"^steering_vector at rows \[0\] hold NaN"):
        nl.steer_then_verbalize(base, nla, tokens, steering_vector=torch.full_like(steer, float("nan")), scale=1.0,
                                steer_layer=0)
    with pytest.raises(nl.VectorError, match=r"^direction at rows \[0\] are zero"):
        nl.verbalize_direction(av_karvonen, torch.zeros(D_MODEL))
    with pytest.raises(nl.VectorError, match=rf"^scale_like must have shape \[n, {D_MODEL}\]"):
        nl.verbalize_direction(av_karvonen, steer, scale_like=torch.ones(3, D_MODEL + 1))
    with pytest.raises(nl.VectorError, match=r"^scale_like must be a torch.Tensor, got list"):
        nl.verbalize_direction(av_karvonen, steer, scale_like=[1.0] * D_MODEL)


def test_clean_and_corrupted_rows_of_different_token_lengths_warn(base, av_karvonen):
    """Prompts of different lengths padded to one shape passed the shape check without a word, and the patch wrote
    one token's clean activation into another token's position of the corrupted row."""
    tokens, _ = padded(base, "left")
    clean_tokens = tokens[:2]
    corrupted_tokens = torch.stack([tokens[0], tokens[2]])  # row 1: another prompt, of another length
    with pytest.warns(UserWarning, match=r"different columns in rows \[1\] \(real tokens, clean vs corrupted: row 1: "
                                         rf"{_real(base, tokens[1])} vs {_real(base, tokens[2])}\)"):
        nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=-1, **FAST)
    assert no_hooks_left(base)


def test_clean_and_corrupted_rows_of_one_layout_or_one_mask_do_not_warn_of_columns(base, av_karvonen, recwarn):
    tokens, mask = padded(base, "left")
    nl.patching_study(base, av_karvonen, tokens, tokens, patch_layer=0, patch_position=-1, **FAST)
    nl.patching_study(base, av_karvonen, tokens, tokens.flip(0), attention_mask=mask * mask.flip(0), patch_layer=0,
                      patch_position=-1, **FAST)  # the mask marks both alike
    assert not [w for w in recwarn if "different columns" in str(w.message)]


def _real(base, row: torch.Tensor) -> int:
    return int((row != base.tokenizer.pad_token_id).sum())


def test_patching_study_errors_name_capture_position_and_a_non_string_activation_name(base, nla):
    """capture_position's errors called it "positions" (the capture's own word), and activation_name=None was a bare
    TypeError ("argument of type 'NoneType' is not iterable")."""
    clean, corrupted = equal_length_pair(base)
    width = clean.shape[1]
    with pytest.raises(nl.InputError, match=rf"^capture_position: position {width + 3} is outside row 0"):
        nl.patching_study(base, nla, clean, corrupted, patch_layer=0, patch_position=1, capture_position=width + 3,
                          **FAST)
    with pytest.raises(nl.InputError, match=r"^capture_position must be an int, a non-empty list of ints"):
        nl.patching_study(base, nla, clean, corrupted, patch_layer=0, patch_position=1, capture_position=True, **FAST)
    for name in (None, 5):
        with pytest.raises(nl.InputError, match=rf"^activation_name must be the short name .*, got {name!r}$"):
            nl.patching_study(base, nla, clean, corrupted, patch_layer=0, patch_position=1, activation_name=name,
                              **FAST)
    assert no_hooks_left(base)


SAMPLED = {"temperature": 1.0, "max_new_tokens": 12, "progress": False}
# The tiny AV's samples are nearly random tokens, some mostly CJK, which verbalize warns of as a failed injection.
CJK_SAMPLES = pytest.mark.filterwarnings("ignore:.*AV outputs echo the marker")


def _same_tokens(pairs) -> float:
    """The share of generated positions where both readouts of a pair hold one token (the longer one counts)."""
    same = sum(a == b for x, y in pairs for a, b in zip(x.tokens, y.tokens, strict=False))
    return same / sum(max(len(x.tokens), len(y.tokens)) for x, y in pairs)


@CJK_SAMPLES
@pytest.mark.parametrize("seed", [0, None], ids=["seeded", "unseeded"])
def test_a_steering_that_changes_nothing_reads_out_the_same_sample_at_temperature_1(base, av_karvonen, steer, seed):
    """Clean and steered rows drew their own random numbers in one AV batch, so at temperature 1 the readouts of
    equal vectors differed (every one of the 4 sites here) and word_diff reported sampling noise as the steering's
    effect. Each site's two rows now sample with common random numbers, seeded or not."""
    tokens, mask = padded(base, "left")
    with pytest.warns(UserWarning, match="the steering changed no captured residual"):
        result = nl.steer_then_verbalize(base, av_karvonen, tokens, attention_mask=mask, steering_vector=steer,
                                         scale=5.0, steer_layer=1, positions=-3, steer_positions=-1, seed=seed,
                                         **SAMPLED)
    assert torch.equal(result.steered_vectors, result.clean_vectors)
    assert len({r.clean.text for r in result.rows}) == 4  # sampled: four sites, four readouts
    assert [r.steered for r in result.rows] == [r.clean for r in result.rows]
    assert all(r.added == r.removed == [] for r in result.rows)
    assert "0 readouts changed by steering" in result.summary()


@CJK_SAMPLES
def test_a_small_steering_reads_out_mostly_the_same_tokens_at_temperature_1(base, av_karvonen, steer):
    """Cosine 0.99983 between clean and steered vectors: with common random numbers 70 of the 96 generated tokens
    match position by position (measured on TL 3.9 and 4.3), and 5 of the 8 readouts are equal; with each row's own
    draws none did (the tiny AV's distributions are nearly flat)."""
    tokens, mask = padded(base, "left")
    result = nl.steer_then_verbalize(base, av_karvonen, tokens, attention_mask=mask, steering_vector=steer,
                                     scale=0.02, steer_layer=1, positions=[-1, -2], seed=0, **SAMPLED)
    assert min(r.cosine for r in result.rows) == pytest.approx(0.99983, abs=5e-5)
    assert _same_tokens([(r.clean, r.steered) for r in result.rows]) >= 0.5  # measured 70 / 96 = 0.73
    assert sum(r.clean == r.steered for r in result.rows) >= 3  # measured 5 of 8


@CJK_SAMPLES
def test_a_seeded_sampled_study_reproduces(base, av_karvonen, steer):
    tokens, mask = padded(base, "left")
    kwargs = {"attention_mask": mask, "steering_vector": steer, "scale": 0.3, "steer_layer": 1, **SAMPLED}
    first = nl.steer_then_verbalize(base, av_karvonen, tokens, seed=3, **kwargs)
    again = nl.steer_then_verbalize(base, av_karvonen, tokens, seed=3, **kwargs)
    other = nl.steer_then_verbalize(base, av_karvonen, tokens, seed=4, **kwargs)
    assert [(r.clean, r.steered, r.added, r.removed) for r in again.rows] == [
        (r.clean, r.steered, r.added, r.removed) for r in first.rows]
    assert [r.clean for r in other.rows] != [r.clean for r in first.rows]
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    studies = [nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=1, patch_position=1,
                                 seed=3, **SAMPLED) for _ in range(2)]
    assert [r.verbalization for r in studies[0].rows] == [r.verbalization for r in studies[1].rows]


@CJK_SAMPLES
@pytest.mark.parametrize("seed", [0, None], ids=["seeded", "unseeded"])
def test_a_patch_that_changes_nothing_reads_out_the_corrupted_sample_at_temperature_1(base, av_karvonen, seed):
    """Column 0 ("The") holds one token and, attention being causal, one residual in both runs: patching it leaves
    the patched vectors the corrupted ones, whose readouts drew other random numbers than the patched run's."""
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    study = nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=0,
                              seed=seed, **SAMPLED)
    assert torch.equal(study.patched_vectors, study.corrupted_vectors)
    runs = {run: [r.verbalization for r in study.rows if r.run == run] for run in ("clean", "corrupted", "patched")}
    assert runs["patched"] == runs["corrupted"] != runs["clean"]
    assert len({v.text for v in runs["corrupted"]}) == 2


def test_a_study_refuses_draws_of_which_it_sets_itself(base, av_karvonen, steer):
    clean_tokens, corrupted_tokens = equal_length_pair(base)
    message = r"^{} sets draws_of itself: site i of every run samples with the same random numbers"
    with pytest.raises(nl.InputError, match=message.format("steer_then_verbalize")):
        nl.steer_then_verbalize(base, av_karvonen, clean_tokens, steering_vector=steer, scale=1.0, steer_layer=1,
                                draws_of=[0, 1, 0, 1])
    with pytest.raises(nl.InputError, match=message.format("patching_study")):
        nl.patching_study(base, av_karvonen, clean_tokens, corrupted_tokens, patch_layer=0, patch_position=0,
                          draws_of=[0, 1, 0, 1, 0, 1])
