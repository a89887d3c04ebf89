"""Steer with words: the hook adds exactly the documented vector at exactly the given sites, composes,
never leaks, and bad input gets typed errors. Tiny random NLA (API and maths) plus the toy (the AV path)."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from base_batches import no_hooks_left, padded
from conftest import LAYER, saved_without, stray_byte_verbalization
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nla_lens as nl
from hf_reference import ar_reconstruct, layer_output_hook, load_hf
from nla_lens.injection import unit
from nla_lens.testing import TINY_LABELS

NAME = f"blocks.{LAYER}.hook_resid_post"


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def steer(nla, base, tokens, positions, mask=None, **kwargs):
    """steer_with_words on given explanations (the tiny AV only babbles): one site per row, swapped words."""
    kwargs.setdefault("explanations", TINY_LABELS[:len(tokens)])
    kwargs.setdefault("edit", lambda text: text.replace("the", "a") if "the" in text else text + " the end")
    return nl.steer_with_words(nla, base, tokens, positions, attention_mask=mask, **kwargs)


def hand_written(sites, directions, alpha, mode):
    """The documented steering, written out: h + alpha ||h|| d/||d|| (add) or h + alpha (||h|| d/||d|| - h)."""
    def hook(resid, hook):
        resid = resid.clone()
        for (row, col), d in zip(sites, directions, strict=True):
            h = resid[row, col].float()
            target = h.norm() * d / d.norm()
            resid[row, col] = (h + alpha * target if mode == "add" else h + alpha * (target - h)).to(resid.dtype)
        return resid
    return hook


def resid_and_logits(base, tokens, mask, fwd_hooks):
    kept = {}
    hooks = [*fwd_hooks, (NAME, lambda resid, hook: kept.setdefault("resid", resid.detach().clone()))]
    logits = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
    return kept["resid"], logits


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_hook_adds_exactly_the_documented_vector_at_exactly_the_sites(base, nla, mode):
    tokens, mask = padded(base, "left")
    positions = torch.tensor([-1, -2, -1, -3])  # the last, second-last, ... real token of each row
    result = steer(nla, base, tokens, positions, mask, alpha=0.7, mode=mode, compare=False)
    width = tokens.shape[1]
    real_last = width - 1
    sites = [(0, real_last), (1, real_last - 1), (2, real_last), (3, real_last - 2)]
    assert list(zip(result.rows.tolist(), result.positions.tolist(), strict=True)) == sites
    directions = result.delta if mode == "add" else result.target

    clean, _ = resid_and_logits(base, tokens, mask, [])
    steered, logits = resid_and_logits(base, tokens, mask, result.fwd_hooks())
    reference, reference_logits = resid_and_logits(base, tokens, mask, [(NAME, hand_written(sites, directions, 0.7,
                                                                                             mode))])
    moved = steered - clean
    at = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, col in sites:
        at[row, col] = True
        h = clean[row, col]
        expected = 0.7 * (h.norm() * unit(directions[row]) - (h if mode == "replace" else 0))
        assert torch.allclose(moved[row, col], expected, atol=1e-5 * float(h.norm()), rtol=0)
    assert torch.equal(moved[~at], torch.zeros_like(moved[~at]))  # nothing else moves
    # the same maths in another order: equal to float32 rounding of one multiply-add
    assert torch.allclose(steered, reference, rtol=0, atol=1e-6 * float(steered.abs().max()))
    assert torch.allclose(logits, reference_logits, rtol=0, atol=1e-5 * float(logits.abs().max()))
    assert no_hooks_left(base)


def fake_verbalize(said: dict):
    """An AV stand-in (the tiny AVs only babble) that records the vectors it is given and reads vector i as
    TINY_LABELS[i % 8], so two samples per site give two different explanations."""
    def verbalize(vectors, **kwargs):
        said["vectors"], said["kwargs"] = vectors, kwargs
        return [nl.Verbalization(f"<explanation>{TINY_LABELS[i % 8]}</explanation>", TINY_LABELS[i % 8], [])
                for i in range(len(vectors))]
    return verbalize


@pytest.mark.parametrize(("family", "mode", "alpha"), [("qwen", "add", 0.7), ("qwen", "replace", -0.5),
                                                       ("gemma", "add", 1.5), ("llama", "replace", 0.6)])
def test_the_whole_method_matches_plain_hf_and_the_ar_reference(family, mode, alpha, request, monkeypatch):
    """Independent of nla_lens: the site residuals are HF's hidden_states[K+1] at the sites, Delta and T are
    means of the unit outputs of the plain-HF AR reference, and the steered next-token log-probs are those of
    the HF model under a plain forward hook on decoder layer K that writes the documented formula. Left-padded
    batches; Gemma and Llama put a BOS first."""
    if family == "qwen":
        paths = request.getfixturevalue("tiny_paths")
        av_folder, ar_folder = paths["av_karvonen"], paths["ar_nanonla"]
        nla, base = request.getfixturevalue("nla"), request.getfixturevalue("base")
        tokens, mask = padded(base, "left")
        positions = torch.tensor([-1, -2, -1, -3])
    else:
        paths = request.getfixturevalue("bos_paths")
        av_folder, ar_folder = paths[f"{family}_av"], paths[f"{family}_ar"]
        nla = nl.NLA.from_pretrained(av_folder, ar_folder)
        with pytest.warns(UserWarning, match="not the base model"):  # a tiny AV stands in for the base here
            base = nl.load_base(av_folder)
        batch = base.tokenizer(["The cat sat on the mat.", "A dog ran"], padding=True, return_tensors="pt")
        tokens, mask = batch["input_ids"], batch["attention_mask"]
        assert tokens[0, 0] == base.tokenizer.bos_token_id and mask[1, 0] == 0  # BOS first, row 1 left-padded
        positions = torch.tensor([-1, -3])
    said = {}
    monkeypatch.setattr(nla.av, "verbalize", fake_verbalize(said))
    edit = lambda text: text + " the sea"  # noqa: E731
    result = nl.steer_with_words(nla, base, tokens, positions, attention_mask=mask, edit=edit, samples=2,
                                 alpha=alpha, mode=mode, continue_tokens=0)
    sites = list(zip(result.rows.tolist(), result.positions.tolist(), strict=True))
    assert [(row, col) for row, col in sites] == [(row, tokens.shape[1] + int(p)) for row, p in enumerate(positions)]

    hf, _ = load_hf(av_folder)
    clean = hf(tokens, attention_mask=mask, output_hidden_states=True)
    resid = clean.hidden_states[LAYER + 1][result.rows, result.positions]
    assert torch.allclose(said["vectors"], resid.repeat_interleave(2, dim=0), rtol=0, atol=1e-4)
    texts = [TINY_LABELS[i % 8] for i in range(2 * len(sites))]
    reference = unit(ar_reconstruct(ar_folder, texts + [edit(t) for t in texts]))
    before, after = reference[:len(texts)].view(len(sites), 2, -1), reference[len(texts):].view(len(sites), 2, -1)
    assert torch.allclose(result.delta, (after - before).mean(1), rtol=0, atol=1e-5)
    assert torch.allclose(result.target, after.mean(1), rtol=0, atol=1e-5)

    direction = unit((after - before).mean(1) if mode == "add" else after.mean(1))

    def documented(h):  # h + alpha ||h|| d (add), h + alpha (||h|| d - h) (replace), at the sites only
        h = h.clone()
        for (row, col), d in zip(sites, direction, strict=True):
            x = h[row, col]
            h[row, col] = x + alpha * (x.norm() * d - (x if mode == "replace" else 0))
        return h

    with layer_output_hook(hf, LAYER, documented):
        steered = hf(tokens, attention_mask=mask).logits
    at = (result.rows, result.positions)
    assert torch.allclose(result.clean_logprobs, clean.logits[at].log_softmax(-1), rtol=0, atol=1e-4)
    assert torch.allclose(result.steered_logprobs, steered[at].log_softmax(-1), rtol=0, atol=1e-4)
    assert (result.steered_logprobs - result.clean_logprobs).abs().max() > 0.1  # the steering did move them


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_alpha_zero_is_no_steering_bit_for_bit(base, nla, mode):
    tokens, mask = padded(base, "left")
    result = steer(nla, base, tokens, -1, mask, alpha=0.0, mode=mode, continue_tokens=3)
    assert torch.equal(result.steered_logprobs, result.clean_logprobs)
    assert [t["kl"] for t in result.next_tokens()] == [0.0] * len(tokens)
    assert all(clean == steered for clean, steered in result.continuations)
    plain = base(tokens, attention_mask=mask)
    assert torch.equal(base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=result.fwd_hooks()), plain)
    moved = steer(nla, base, tokens, -1, mask, mode=mode, compare=False, continue_tokens=0)
    assert torch.equal(base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=moved.fwd_hooks(alpha=0)), plain)


def test_a_padded_batch_steers_each_row_as_it_would_alone(base, nla):
    tokens, mask = padded(base, "left")
    batch = steer(nla, base, tokens, -1, mask, alpha=1.5, continue_tokens=3)
    for row in range(len(tokens)):
        alone = steer(nla, base, tokens[row][mask[row].bool()][None], -1, None, alpha=1.5, continue_tokens=3,
                      explanations=TINY_LABELS[row:row + 1])
        assert torch.allclose(alone.delta[0], batch.delta[row], rtol=0, atol=1e-5)
        assert torch.allclose(alone.clean_logprobs[0], batch.clean_logprobs[row], rtol=0, atol=1e-4)
        assert torch.allclose(alone.steered_logprobs[0], batch.steered_logprobs[row], rtol=0, atol=1e-4)
        assert alone.continuations[0] == batch.continuations[row]


def test_delta_and_target_are_means_of_unit_reconstructions(base, nla):
    tokens, mask = padded(base, "left")
    samples = [TINY_LABELS[:2], TINY_LABELS[2:5], TINY_LABELS[5:6], TINY_LABELS[6:8]]
    edit = lambda text: text + " the sea"  # noqa: E731
    result = steer(nla, base, tokens, -1, mask, explanations=samples, edit=edit, compare=False)
    for i, texts in enumerate(samples):
        before = unit(nla.ar.reconstruct(texts))
        after = unit(nla.ar.reconstruct([edit(t) for t in texts]))
        assert torch.allclose(result.delta[i], (after - before).mean(0), atol=1e-6)
        assert torch.allclose(result.target[i], after.mean(0), atol=1e-6)
        assert result.explanations[i] == texts and result.edited[i] == [edit(t) for t in texts]


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_an_edit_that_leaves_some_samples_unchanged_is_named_in_a_warning(base, nla, mode, tmp_path):
    """With samples > 1 a str.replace edit often misses a sample that lacks the words: Delta was averaged over
    fewer edits than asked, and replace mode's T mixed in the unedited reconstructions, without a word."""
    tokens, mask = padded(base, "left")
    swap = lambda text: text.replace("cat", "dog")  # noqa: E731
    with pytest.warns(UserWarning, match=r"leaves 1 of the 2 explanations of site 0 \(row 0, column \d+\) unchanged, "
                                         r"e\.g\. 'the sea is calm'") as emitted:
        result = steer(nla, base, tokens[:1], -1, mask[:1], explanations=[["the cat sat", "the sea is calm"]],
                       edit=swap, mode=mode, compare=False, continue_tokens=0)
    # Kept on the result too: its repr counts it, and a saved .parquet keeps it (it was only emitted).
    assert result.warnings == [str(w.message) for w in emitted]
    assert "1 warning (.warnings)" in repr(result)
    assert nl.read_result(result.save(tmp_path / "steer.parquet")).attrs["warnings"] == result.warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every sample edited: nothing to say
        steer(nla, base, tokens[:1], -1, mask[:1], explanations=[["the cat sat", "a cat ran"]], edit=swap,
              mode=mode, compare=False, continue_tokens=0)


def test_explicit_edited_text_and_one_edit_per_site(base, nla):
    tokens, mask = padded(base, "left")
    one = steer(nla, base, tokens[:1], -1, mask[:1], explanations=["the cat sat on the mat"],
                edit="a dog ran in the park", compare=False)
    assert one.edited == [["a dog ran in the park"]]
    before, after = unit(nla.ar.reconstruct(["the cat sat on the mat", "a dog ran in the park"]))
    expected = (after - before)[None]
    assert torch.allclose(one.delta, expected, atol=1e-6)
    per_site = steer(nla, base, tokens, -1, mask, edit=["the sea", str.upper, "names of places", "a question"],
                     compare=False)
    assert [e[0] for e in per_site.edited] == ["the sea", TINY_LABELS[1].upper(), "names of places", "a question"]


def test_composes_with_other_hooks_in_one_run(base, nla):
    tokens, mask = padded(base, "left")
    result = steer(nla, base, tokens, -1, mask, alpha=1.5, compare=False)
    sites = list(zip(result.rows.tolist(), result.positions.tolist(), strict=True))
    push = torch.randn(base.cfg.d_model, generator=torch.Generator().manual_seed(5))
    earlier = ("blocks.0.hook_resid_post", lambda resid, hook: resid + push)
    later = ("blocks.3.hook_resid_pre", lambda resid, hook: resid * 0.5)
    ours = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[earlier, *result.fwd_hooks(), later])
    reference = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[
        earlier, (NAME, hand_written(sites, result.delta, 1.5, "add")), later])
    assert torch.allclose(ours, reference, rtol=0, atol=1e-5 * float(ours.abs().max()))
    alone = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=result.fwd_hooks())
    assert (ours - alone).abs().max() > 1e-2  # the other hooks really acted in the same run
    # alpha can be overridden per call: a sweep reuses one result
    swept = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=result.fwd_hooks(alpha=0.25))
    reference = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[
        (NAME, hand_written(sites, result.delta, 0.25, "add"))])
    assert torch.allclose(swept, reference, rtol=0, atol=1e-5 * float(swept.abs().max()))
    assert no_hooks_left(base)


@pytest.mark.parametrize("as_given", [np.float32, torch.tensor], ids=["numpy_float32", "tensor_0d"])
def test_alpha_from_a_numpy_or_torch_sweep_steers_as_its_float(base, nla, as_given):
    """`for alpha in torch.linspace(0, 2, 5)` (or np.float32 values) was refused as "must be a finite number"."""
    tokens, mask = padded(base, "left")
    result = steer(nla, base, tokens, -1, mask, alpha=as_given(0.5), compare=False, continue_tokens=0)
    assert type(result.alpha) is float and result.alpha == float(as_given(0.5))
    as_float = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=result.fwd_hooks(alpha=0.25))
    swept = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=result.fwd_hooks(alpha=as_given(0.25)))
    assert torch.equal(swept, as_float)
    with pytest.raises(nl.InputError, match=r"^alpha=\S*nan\)?: must be a finite number"):
        result.fwd_hooks(alpha=as_given(float("nan")))


def test_generation_under_the_hook_steers_the_prefill_only(base, nla):
    tokens = torch.tensor([base.tokenizer.encode("The cat sat on the mat.", add_special_tokens=False)])
    result = steer(nla, base, tokens, -1, alpha=2.0, compare=True, continue_tokens=3)
    first = int(result.steered_logprobs[0].argmax())
    with base.hooks(fwd_hooks=result.fwd_hooks()):  # KV-cached decode steps are one token wide: left alone
        generated = base.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
    assert int(generated[0, tokens.shape[1]]) == first
    steered_text = result.continuations[0][1]
    assert base.tokenizer.decode(generated[0, tokens.shape[1]:].tolist()) == steered_text
    assert no_hooks_left(base)


def test_hooks_never_stay_attached_after_an_exception(base, nla):
    tokens, mask = padded(base, "left")
    result = steer(nla, base, tokens, -1, mask, compare=False)

    def boom(resid, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[*result.fwd_hooks(), ("blocks.3.hook_resid_pre",
                                                                                          boom)])
    assert no_hooks_left(base)
    with pytest.raises(RuntimeError, match="user hook failed"), base.hooks(fwd_hooks=result.fwd_hooks()):
        base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[("blocks.3.hook_resid_pre", boom)])
    assert no_hooks_left(base)
    # named as the user installs it: the bridge's hook.name would say blocks.K.hook_out
    with pytest.raises(nl.InputError, match=f"^{re.escape(result.hook_name)}: this steering was built for tokens"):
        base.run_with_hooks(tokens[:2], fwd_hooks=result.fwd_hooks())
    assert no_hooks_left(base)


@pytest.mark.parametrize(("mode", "alpha", "compare", "continue_tokens"), [
    ("add", 1e30, True, 0), ("replace", -1e39, True, 0), ("add", 1e30, False, 2)])
def test_an_alpha_past_what_the_layers_after_read_is_refused_by_alpha_and_site(base, nla, mode, alpha, compare,
                                                                                continue_tokens):
    """alpha=1e30 made the steered residual's squared norm inf in float32: the next layer norm read it as zero, so the
    steered next-token odds came out uniform (1e39: NaN, a NaN KL) and the continuations garbage, without a word."""
    tokens, mask = padded(base, "left")
    last = tokens.shape[1] - 1
    # The comparison steers the batch; each continuation one row alone, unpadded, named by its site in the batch
    # ("A dog ran": its last token is column 2 of its own three).
    steered, steered_mask = (tokens, mask) if compare else (tokens[1:], mask[1:])
    sites = re.escape(str([(row, last) for row in range(len(steered) if compare else 1)]))
    with pytest.raises(nl.VectorError, match=rf"^{NAME}: alpha={re.escape(f'{alpha:g}')} steers the residual at "
                                             rf"\(batch, position\) {sites} past what the layers after can read: a "
                                             "squared norm past float32's range.*lower \\|alpha\\|"):
        steer(nla, base, steered, -1, steered_mask, alpha=alpha, mode=mode, compare=compare,
              continue_tokens=continue_tokens)
    assert no_hooks_left(base)
    result = steer(nla, base, tokens, -1, mask, mode=mode, compare=False, continue_tokens=0)
    with pytest.raises(nl.VectorError, match=f"alpha={re.escape(f'{alpha:g}')} steers the residual"):  # a user's run
        base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=result.fwd_hooks(alpha=alpha))
    assert no_hooks_left(base)
    # just inside float32's squares the model still reads the steered site: the next token follows the direction
    large = steer(nla, base, tokens, -1, mask, alpha=1e15 if mode == "add" else -1e15, mode=mode, continue_tokens=0)
    assert large.steered_logprobs.isfinite().all() and large.steered_logprobs.exp().max() > 0.01


def test_an_alpha_past_a_float16_residual_is_refused_by_alpha_and_site(tiny_paths, nla):
    """In a float16 base the steered entries themselves overflow (65504) long before float32's squares do."""
    from base_batches import load_base

    base16 = load_base(tiny_paths["av_karvonen"], dtype=torch.float16)
    tokens, mask = padded(base16, "left")
    steered = steer(nla, base16, tokens, -1, mask, alpha=10.0, continue_tokens=0)
    assert steered.steered_logprobs.isfinite().all()
    with pytest.raises(nl.VectorError, match=r"alpha=1e\+06 steers the residual .* entries past torch.float16's range"):
        steer(nla, base16, tokens, -1, mask, alpha=1e6, continue_tokens=0)
    assert no_hooks_left(base16)


def test_bad_input_gets_typed_errors_that_say_what_to_do(base, nla):
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match="outside row"):
        steer(nla, base, tokens, [tokens.shape[1] + 3], mask)
    with pytest.raises(nl.InputError, match="padding"):
        steer(nla, base, tokens, [0], mask)  # row 1 is left-padded at column 0
    with pytest.raises(nl.InputError, match="unchanged.*Delta = 0"):
        steer(nla, base, tokens, -1, mask, edit=lambda text: text)
    with pytest.raises(nl.InputError, match="unchanged"):
        steer(nla, base, tokens[:1], -1, mask[:1], explanations=["the sea"], edit="the sea")
    for empty in ("", " \n", lambda text: ""):  # a --edit "" or a regex that removed everything
        with pytest.raises(nl.InputError, match="edit of site 0 gives an empty explanation"):
            steer(nla, base, tokens[:1], -1, mask[:1], explanations=["the sea"], edit=empty)
    with pytest.raises(nl.PairMismatchError, match=f"reconstructs layer-{LAYER}.*pass layer={LAYER}"):
        steer(nla, base, tokens, -1, mask, layer=LAYER - 1)
    with pytest.raises(nl.InputError, match="one entry per steered site"):
        steer(nla, base, tokens, -1, mask, explanations=TINY_LABELS[:3])
    with pytest.raises(nl.InputError, match="mode"):
        steer(nla, base, tokens, -1, mask, mode="patch")
    with pytest.raises(nl.InputError, match="same"):
        steer(nla, base, tokens, [-1, -1], mask, explanations=[[t] for t in TINY_LABELS[:8]])
    with pytest.raises(nl.InputError, match="alpha=nan: must be a finite number"):
        steer(nla, base, tokens, -1, mask, alpha=float("nan"))
    result = steer(nla, base, tokens, -1, mask, compare=False, continue_tokens=0)
    with pytest.raises(nl.InputError, match="alpha=inf: must be a finite number"):
        result.fwd_hooks(alpha=float("inf"))
    assert no_hooks_left(base)


@pytest.mark.parametrize("edit", [b"the sea", bytearray(b"the sea")], ids=["bytes", "bytearray"])
def test_an_edit_given_as_bytes_is_refused_as_bytes_not_as_its_ints(base, nla, edit):
    """bytes is a Sequence of ints: the per-site check read b"x" as one int edit and said "got int"."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=f"edit is {type(edit).__name__}, not text: pass .decode\\(\\)"):
        steer(nla, base, tokens[:1], -1, mask[:1], explanations=["the land"], edit=edit)


def test_a_steering_run_on_a_base_of_another_width_is_a_pair_mismatch(base, nla, tmp_path):
    """The live hook and the one read back from save_vectors, on a residual of another d_model (a base the NLA does
    not read): a PairMismatchError naming both widths; it was torch's bare size-mismatch RuntimeError."""
    tokens, mask = padded(base, "left")
    result = steer(nla, base, tokens, -1, mask, compare=False, continue_tokens=0)
    d = result.delta.shape[1]
    wider = torch.zeros(*tokens.shape, 2 * d)
    result.save_vectors(tmp_path / "delta.safetensors")
    for _name, hook in [*result.fwd_hooks(), *nl.WordSteering.fwd_hooks_from(tmp_path / "delta.safetensors")]:
        with pytest.raises(nl.PairMismatchError, match=f"^{re.escape(NAME)}: .*{d}-d.*{2 * d}-d"):
            hook(wider, None)


@pytest.mark.parametrize("layer", ["2", True, 2.0])
def test_a_layer_that_is_not_a_whole_number_is_refused_by_type(base, nla, layer):
    """layer="2" was refused as "steering at layer 2 needs an NLA trained on layer 2", a PairMismatchError with the
    NLA's own layer; layer=True as "steering at layer True"."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=rf"^layer={re.escape(repr(layer))} must be a whole number, the NLA's "
                                            rf"layer {LAYER}, or None"):
        steer(nla, base, tokens, -1, mask, layer=layer)
    assert steer(nla, base, tokens, -1, mask, layer=np.int64(LAYER), compare=False, continue_tokens=0).layer == LAYER


def test_tokens_without_rows_are_an_input_error(base, nla):
    """A [0, pos] batch failed in torch (max() of an empty tensor) after the checks had passed it."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=rf"^tokens are empty \(shape \[0, {tokens.shape[1]}\]\)"):
        steer(nla, base, tokens[:0], -1, mask[:0])


@pytest.mark.parametrize("flag", ["no", 0, None, np.int64(1), torch.tensor(0)])
def test_compare_that_is_not_a_bool_is_refused(base, nla, flag):
    """compare="no" is truthy: it ran the next-token comparison it meant to skip."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=rf"^compare must be True or False, got {re.escape(repr(flag))}"):
        steer(nla, base, tokens, -1, mask, compare=flag, continue_tokens=0)


@pytest.mark.parametrize("flag", [np.True_, np.False_, torch.tensor(True), torch.tensor([False])],
                         ids=["numpy_true", "numpy_false", "tensor_true", "tensor_false"])
def test_compare_as_a_numpy_or_torch_bool_runs_or_skips_the_comparison_as_that_bool(base, nla, flag):
    """compare=np.True_ (an element of a NumPy mask) was refused as "must be True or False", though alpha takes
    NumPy's and torch's numbers."""
    tokens, mask = padded(base, "left")
    result = steer(nla, base, tokens, -1, mask, compare=flag, continue_tokens=0)
    compared = (result.clean_logprobs is not None, result.steered_logprobs is not None)
    assert compared == (bool(flag), bool(flag))


@pytest.mark.parametrize("given", [[None], [["the sea", None]], 3])
def test_explanations_holding_none_or_no_list_are_input_errors(base, nla, given):
    """A failed parse's None among the explanations (or a number for them) raised a bare TypeError from a list()."""
    tokens, mask = padded(base, "left")
    match = "failed parse's explanation is None" if isinstance(given, list) else "one entry per steered site"
    with pytest.raises(nl.InputError, match=match):
        steer(nla, base, tokens[:1], -1, mask[:1], explanations=given, edit="the sea")


def test_runs_past_the_base_context_are_refused_before_they_start(base, nla):
    """Tokens wider than n_ctx, or continuations that would grow past it, died inside TransformerLens with an
    IndexError from the rotary table (`nla-lens steer-words` on a long --text printed a traceback)."""
    n_ctx = base.cfg.n_ctx
    word = base.tokenizer.encode(" sea", add_special_tokens=False)
    with pytest.raises(nl.PromptTooLongError, match=f"{n_ctx + 1} columns, over the base model's context of {n_ctx}"):
        steer(nla, base, torch.tensor([word * (n_ctx + 1)]), -1, continue_tokens=0)
    full = torch.tensor([word * n_ctx])
    grows = f"continue_tokens=2 would grow a row of {n_ctx} tokens past the base model's context of {n_ctx}; pass "
    with pytest.raises(nl.PromptTooLongError, match=grows + "continue_tokens=1 or fewer"):
        steer(nla, base, full, -1, compare=False, continue_tokens=2)
    result = steer(nla, base, full, -1, compare=False, continue_tokens=1)  # its one forward is n_ctx wide
    assert len(result.continuations) == 1 and no_hooks_left(base)


def test_a_base_that_is_not_a_transformer_lens_model_gets_a_typed_error(base, nla):
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.BackendError, match="expected a TransformerLens model.*check the order of the arguments"):
        steer(nla, base.tokenizer, tokens, -1, mask)  # e.g. an HF model, or the tokenizer, passed as the base


def test_a_base_without_a_tokenizer_names_tokens_by_id(base, nla, monkeypatch):
    tokens, mask = padded(base, "left")
    monkeypatch.setattr(base, "tokenizer", None)  # e.g. a HookedTransformer built from a bare config
    with pytest.raises(nl.InputError, match="continue_tokens=2 decodes the continuations.*has none"):
        steer(nla, base, tokens, -1, mask, continue_tokens=2)
    result = steer(nla, base, tokens, -1, mask, continue_tokens=0)
    assert list(result.to_pandas()["token"]) == [str(int(t)) for t in tokens[:, -1]]
    assert list(result.to_pandas()["prompt"]) == [None] * len(tokens)  # nothing to decode them with
    assert result.next_tokens(k=1)[0]["clean_top"][0][0] == str(int(result.clean_logprobs[0].argmax()))


def test_numpy_integer_counts_steer_as_their_ints(base, nla, monkeypatch):
    """samples, continue_tokens, max_new_tokens, batch_size and next_tokens' k of NumPy's were refused as not whole
    numbers (continue_tokens as not an int), where positions and layer= took NumPy ints."""
    tokens, mask = padded(base, "left")
    seen: dict = {}
    monkeypatch.setattr(nla.av, "verbalize", fake_verbalize(seen))
    av_path = {"explanations": None, "temperature": 1.0, "seed": 0}
    expected = steer(nla, base, tokens, -1, mask, **av_path, samples=2, continue_tokens=2, max_new_tokens=20,
                     batch_size=3)
    got = steer(nla, base, tokens, -1, mask, **av_path, samples=np.int64(2), continue_tokens=np.int64(2),
                max_new_tokens=np.int64(20), batch_size=np.int32(3))
    assert type(seen["kwargs"]["max_new_tokens"]) is int and seen["kwargs"]["max_new_tokens"] == 20
    assert got.explanations == expected.explanations and got.continuations == expected.continuations
    assert torch.equal(got.delta, expected.delta)
    assert got.next_tokens(k=np.int64(2)) == expected.next_tokens(k=2)
    with pytest.raises(nl.InputError, match=r"^continue_tokens must be an int >= 0, got np\.float64\(2\.0\)$"):
        steer(nla, base, tokens, -1, mask, continue_tokens=np.float64(2.0))


def test_next_token_probabilities_below_the_tables_decimals_show_in_e_notation(base, nla):
    """A confident site's runners-up (p 2e-5, 1e-6) read 0.000 in clean_next and steered_next (3 decimals), and
    next_tokens rounded them to 4 decimals, to 0.0; ordinary probabilities print as before."""
    import dataclasses

    tokens, mask = padded(base, "left")
    result = steer(nla, base, tokens, -1, mask, explanations=[TINY_LABELS[:1]] * 4)
    confident, spread = (torch.full_like(result.clean_logprobs, -100.0) for _ in range(2))
    confident[:, :3] = torch.tensor([1.0, 2e-5, 1e-6]).log()
    spread[:, :3] = torch.tensor([0.6, 0.3, 0.1]).log()
    result = dataclasses.replace(result, clean_logprobs=confident.log_softmax(-1),
                                 steered_logprobs=spread.log_softmax(-1))
    names = [repr(base.tokenizer.decode([i], clean_up_tokenization_spaces=False)) for i in range(3)]
    record = result.to_records()[0]
    assert record["clean_next"] == f"{names[0]} 1.000, {names[1]} 2.00e-05, {names[2]} 1.00e-06"
    assert record["steered_next"] == f"{names[0]} 0.600, {names[1]} 0.300, {names[2]} 0.100"
    clean_top = [p for _, p in result.next_tokens(k=3)[0]["clean_top"]]
    assert clean_top == pytest.approx([1.0, 2e-5, 1e-6], rel=1e-3)


def test_result_rows_carry_sites_samples_and_comparisons(base, nla):
    tokens, mask = padded(base, "left")
    samples = [TINY_LABELS[:2], TINY_LABELS[2:3], TINY_LABELS[3:4], TINY_LABELS[4:6]]
    result = steer(nla, base, tokens, -1, mask, explanations=samples, continue_tokens=2)
    assert repr(result).startswith(f"WordSteering: 4 sites at {NAME}, mode=add, alpha=1, 2 samples per site")
    frame = result.to_pandas()
    assert list(frame["position"]) == [tokens.shape[1] - 1] * 4 and list(frame["samples"]) == [2, 1, 1, 2]
    assert [list(s) for s in frame["explanation_samples"]] == samples
    assert list(frame["explanation"]) == [s[0] for s in samples]
    assert list(frame["delta_norm"]) == pytest.approx(result.delta.norm(dim=-1).tolist())
    assert list(frame["kl"]) == pytest.approx([t["kl"] for t in result.next_tokens()])
    assert (frame["kl"] > 0).all()  # the steering moved every site's next-token distribution
    vocab = result.clean_logprobs.shape[-1]
    assert len(result.next_tokens(k=vocab + 5)[0]["clean_top"]) == vocab  # the whole vocabulary, not a RuntimeError
    for k in (0, -1, 2.5):
        with pytest.raises(nl.InputError, match=rf"k={k!r}: must be a whole number >= 1"):
            result.next_tokens(k=k)
    assert list(frame["steered_continuation"]) == [c[1] for c in result.continuations]
    bare = steer(nla, base, tokens, -1, mask, compare=False, continue_tokens=0)
    assert not {"kl", "steered_next", "clean_continuation"} & set(bare.to_pandas().columns)
    assert "kl" not in repr(bare).splitlines()[1]  # the table shows only the columns the rows have


def test_continuations_keep_a_leading_pad_id_token_marked_real(base, nla, tiny_paths):
    """Qwen's pad token is <|endoftext|>, which starts documents too: a row that leads with it, marked real by
    the mask, was continued without a mask, and HookedTransformer masked it as left padding."""
    from hf_reference import load_hf

    pad = base.tokenizer.pad_token_id
    tokens = torch.tensor([[pad, *base.tokenizer.encode("The cat sat on the mat.", add_special_tokens=False)]])
    mask = torch.ones_like(tokens)
    result = steer(nla, base, tokens, -1, mask, continue_tokens=4)
    hf, _ = load_hf(tiny_paths["av_karvonen"])
    grown = tokens
    for _ in range(4):  # plain HF greedy decoding, every token attended
        logits = hf(grown, attention_mask=torch.ones_like(grown)).logits
        grown = torch.cat([grown, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    clean, steered = result.continuations[0]
    assert clean == base.tokenizer.decode(grown[0, tokens.shape[1]:].tolist())
    # The continuations read the row as the next-token comparison does.
    assert steered.startswith(base.tokenizer.decode([int(result.steered_logprobs[0].argmax())]))


def test_delta_saves_to_safetensors_beside_the_table(base, nla, tmp_path):
    tokens, mask = padded(base, "left")
    result = steer(nla, base, tokens, -1, mask, compare=False, continue_tokens=0)
    vectors = load_file(str(result.save_vectors(tmp_path / "delta.safetensors")))
    assert torch.equal(vectors["delta"], result.delta) and torch.equal(vectors["target"], result.target)
    with safe_open(str(tmp_path / "delta.safetensors"), "pt") as saved:  # what the hook is bound to, too
        assert saved.metadata() == {"hook_name": NAME, "layer": str(LAYER), "alpha": "1.0", "mode": "add",
                                    "token_shape": json.dumps(list(tokens.shape))}
    assert torch.equal(vectors["rows"], result.rows) and torch.equal(vectors["positions"], result.positions)
    with pytest.raises(nl.InputError, match="save_vectors writes a .safetensors"):
        result.save_vectors(tmp_path / "delta.parquet")
    with pytest.raises(nl.InputError, match="does not exist"):
        result.save_vectors(tmp_path / "no" / "delta.safetensors")


TWO_PROMPTS = ["The cat sat on the mat.", "A dog ran"]  # of different token lengths


def _steering_of_two_prompts(base, nla) -> nl.WordSteering:
    """Two sites in each of two left-padded prompts."""
    tokens, mask = padded(base, "left", TWO_PROMPTS)
    assert not mask.all()  # row 1 has padding, which its prompt should not hold
    return steer(nla, base, tokens, [-2, -1], mask, explanations=TINY_LABELS[:4], continue_tokens=0)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_a_saved_word_steering_names_the_prompt_of_each_sites_row(base, nla, tmp_path, suffix):
    """The rows held `batch`, `position` and `token` but not the prompt: a file read back later could not say which
    prompt `batch=1` was. Each site's `prompt` is its row's real tokens decoded, padding left out."""
    result = _steering_of_two_prompts(base, nla)
    path = result.save(tmp_path / f"steer{suffix}")
    frame = nl.read_result(path)
    assert list(frame["batch"]) == [0, 0, 1, 1]
    assert list(frame["prompt"]) == [TWO_PROMPTS[batch] for batch in frame["batch"]]
    pd.testing.assert_frame_equal(frame, result.to_pandas())
    pd.testing.assert_frame_equal(nl.read_result(path, result_type=nl.WordSteering), result.to_pandas())
    assert "prompt" not in repr(result).splitlines()[1]  # the repr's columns stay as they were


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_a_word_steering_saved_before_rows_named_their_prompt_still_reads(base, nla, tmp_path, suffix):
    """Files saved before rows held `prompt` read back, typed or not, with their rows as they were written."""
    result = _steering_of_two_prompts(base, nla)
    path = saved_without(result, tmp_path / f"old{suffix}", "prompt")
    for result_type in (None, nl.WordSteering):
        pd.testing.assert_frame_equal(nl.read_result(path, result_type=result_type),
                                      result.to_pandas().drop(columns=["prompt"]))


def test_describe_difference_verbalizes_a_minus_b(nla):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, nla.av.meta.d_model, generator=g), torch.randn(nla.av.meta.d_model, generator=g)
    said = nl.describe_difference(nla, a, b, max_new_tokens=6)
    assert torch.equal(said.difference, a - b)
    assert [v.text for v in said.verbalizations] == [v.text for v in nla.av.verbalize(a - b, max_new_tokens=6,
                                                                                      progress=False)]
    assert [r["cos_a_b"] for r in said.to_records()] == pytest.approx(torch.cosine_similarity(a, b[None]).tolist())
    assert [r["norm_a_minus_b"] for r in said.to_records()] == pytest.approx((a - b).norm(dim=-1).tolist())
    with pytest.raises(nl.VectorError, match="equal at rows \\[1\\]"):
        nl.describe_difference(nla.av, torch.stack([a[0], b, a[2]]), b)
    with pytest.raises(nl.InputError, match="an NLA or an ActivationVerbalizer, got ActivationReconstructor"):
        nl.describe_difference(nla.ar, a, b)  # was an AttributeError: an AR has no verbalize
    with pytest.raises(nl.VectorError, match=r"^b must have shape"):  # it said "vectors"
        nl.describe_difference(nla.av, a, b[:5])


def test_describe_difference_needs_a_direction_of_a_minus_b_only(nla):
    """b = 0 verbalizes a itself and a = 0 verbalizes -b (both were refused: "a zero vector has no direction"); their
    cosine is NaN, not torch's 0 (orthogonal). Only a row where a equals b has no direction."""
    d = nla.av.meta.d_model
    a = torch.randn(2, d, generator=torch.Generator().manual_seed(3))
    expected = [v.text for v in nla.av.verbalize(a, max_new_tokens=6, progress=False)]
    for said, difference in [(nl.describe_difference(nla, a, torch.zeros(d), max_new_tokens=6), a),
                             (nl.describe_difference(nla, torch.zeros(2, d), -a, max_new_tokens=6), a)]:
        assert torch.equal(said.difference, difference)
        assert [v.text for v in said.verbalizations] == expected
        assert all(math.isnan(r["cos_a_b"]) for r in said.to_records())
        assert [r["norm_a_minus_b"] for r in said.to_records()] == pytest.approx(a.norm(dim=-1).tolist(), rel=1e-6)
    with pytest.raises(nl.VectorError, match=r"equal at rows \[1\]: their difference has no direction"):
        nl.describe_difference(nla, torch.stack([a[0], torch.zeros(d)]), torch.zeros(d))


@pytest.mark.parametrize("scale", [1e-30, 1e25])
def test_describe_difference_of_tiny_or_huge_rows_matches_float64(nla, scale):
    """Entries ~1e-30 or ~1e25 square out of float32: two tiny rows were refused as equal (their difference's norm
    underflowed to 0) and cos_a_b came out 0 for parallel rows; cosine and norm now match the float64 reference."""
    d = nla.av.meta.d_model
    g = torch.Generator().manual_seed(4)
    a, b = scale * torch.randn(3, d, generator=g), scale * torch.randn(3, d, generator=g)
    b[0] = 0.5 * a[0]  # parallel: cosine 1
    said = nl.describe_difference(nla, a, b, max_new_tokens=6)
    assert torch.equal(said.difference, a - b) and len(said.verbalizations) == 3
    reference = torch.cosine_similarity(a.double() / scale, b.double() / scale, dim=-1)
    assert [r["cos_a_b"] for r in said.to_records()] == pytest.approx(reference.tolist(), abs=1e-6)
    assert said.to_records()[0]["cos_a_b"] == pytest.approx(1.0, abs=1e-6)
    norms = (a.double() - b.double()).norm(dim=-1)
    assert [r["norm_a_minus_b"] for r in said.to_records()] == pytest.approx(norms.tolist(), rel=1e-6)


def test_describe_difference_refuses_a_difference_past_float32(nla):
    """a - b past float32 (3e38 - -3e38, or a float64 a past its range) was verbalized as NaN rows ("vectors at
    rows [0] hold NaN or Inf"): the error names a - b and the rows, or the float64 operand past float32's range
    (a tiny one: a - b read as zero, "a and b are equal")."""
    d = nla.av.meta.d_model
    with pytest.raises(nl.VectorError, match=r"a - b at rows \[0\] is past float32's range"):
        nl.describe_difference(nla, torch.full((d,), 3e38), torch.full((d,), -3e38))
    for huge_or_tiny in (1e300, 1e-300):
        with pytest.raises(nl.VectorError, match=r"^a at rows \[1\] are float64 past float32's range"):
            nl.describe_difference(nla, torch.tensor([[1.0] * d, [huge_or_tiny] * d], dtype=torch.float64),
                                   torch.zeros(d))


def test_toy_verbalizes_samples_edits_and_steers():
    """The AV path on the bundled toy: sampled explanations parse, the edit applies, Z' gains probability."""
    from nla_lens.toy.demo import TOY_DIR
    from nla_lens.toy.evaluate import ToyNLA

    toy = ToyNLA.load(TOY_DIR)
    tokenizer = toy.av.tokenizer
    tokens = torch.tensor([tokenizer.encode("Romeo: I will not hear you, for I am", add_special_tokens=False)])
    target = tokenizer.encode(" the", add_special_tokens=False)
    assert len(target) == 1

    def edit(text):
        head, found, _ = text.rpartition("predicting ")
        return head + found + '" the".' if found else text

    result = nl.steer_with_words(nl.NLA(toy.av, toy.ar), toy.base, tokens, -1, edit=edit, samples=3, alpha=1.0,
                                 max_new_tokens=48, continue_tokens=4)
    assert len(result.explanations[0]) == 3 and all(e.startswith("The token") for e in result.explanations[0])
    assert all(e.endswith('predicting " the".') for e in result.edited[0])
    gain = result.steered_logprobs[0, target[0]] - result.clean_logprobs[0, target[0]]
    assert gain > 0.5
    assert len(result.continuations) == 1 and no_hooks_left(toy.base)


def test_verbalizes_the_sites_in_the_order_given_with_samples(base, nla, monkeypatch):
    """The AV path: the residual at each site, in `positions` order, once per sample (sampled, seeded)."""
    tokens, mask = padded(base, "left")
    seen = {}

    monkeypatch.setattr(nla.av, "verbalize", fake_verbalize(seen))
    width = tokens.shape[1]
    result = nl.steer_with_words(nla, base, tokens[:1], [width - 1, width - 4], attention_mask=mask[:1],
                                 edit=lambda text: text + " the end", samples=2, seed=7, compare=False)
    clean, _ = resid_and_logits(base, tokens[:1], mask[:1], [])
    expected = clean[0, [width - 1, width - 1, width - 4, width - 4]]
    assert torch.allclose(seen["vectors"], expected, atol=1e-6)
    assert seen["kwargs"]["temperature"] == 1.0 and seen["kwargs"]["seed"] == 7
    assert result.explanations == [TINY_LABELS[0:2], TINY_LABELS[2:4]] and result.positions.tolist() == [
        width - 1, width - 4]


@pytest.mark.parametrize(("value", "said"), [(math.nan, "not finite"), (0.0, "zero")])
def test_a_site_residual_the_av_cannot_read_is_named_by_site_not_av_row(base, nla, monkeypatch, value, said):
    """A hook of the user's that leaves NaN or zero at a site: named by (batch, position), before the AV runs;
    verbalize named rows of its joint batch (each site repeated per sample), none of which is a row of the user's."""
    tokens, mask = padded(base, "left")
    width = tokens.shape[1]
    monkeypatch.setattr(nla.av, "verbalize", lambda *a, **k: pytest.fail("the AV ran"))

    def spoil(resid, hook):
        resid = resid.clone()
        resid[0, width - 1] = value
        return resid

    with base.hooks(fwd_hooks=[(NAME, spoil)]), pytest.raises(nl.VectorError) as caught:
        nl.steer_with_words(nla, base, tokens[:1], [width - 4, width - 1], attention_mask=mask[:1],
                            edit=lambda text: text + " the end", samples=3, compare=False, continue_tokens=0)
    message = str(caught.value)
    assert f"(batch, position) [(0, {width - 1})]" in message and said in message and NAME in message
    assert no_hooks_left(base)


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_saved_vectors_steer_again_exactly_as_the_live_hooks(base, nla, tmp_path, mode):
    """save_vectors then fwd_hooks_from: the same logits as the live result's hooks, bit for bit, alpha sweeps too."""
    tokens, mask = padded(base, "left")
    result = steer(nla, base, tokens, torch.tensor([-1, -2, -1, -3]), mask, alpha=0.7, mode=mode, compare=False,
                   continue_tokens=0)
    path = result.save_vectors(tmp_path / "delta.safetensors")
    for alpha in (None, 2.0, 0):
        live = base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=result.fwd_hooks(alpha=alpha))
        loaded = nl.WordSteering.fwd_hooks_from(str(path), alpha=alpha)
        assert [name for name, _ in loaded] == [NAME]
        assert torch.equal(base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=loaded), live)
    assert (live - base(tokens, attention_mask=mask)).abs().max() == 0  # alpha 0: no steering, as live
    with pytest.raises(nl.InputError, match="alpha=nan: must be a finite number"):
        nl.WordSteering.fwd_hooks_from(path, alpha=float("nan"))
    with pytest.raises(nl.InputError, match="this steering was built for tokens of shape"):  # bound as the live one
        base.run_with_hooks(tokens[:2], fwd_hooks=nl.WordSteering.fwd_hooks_from(path))
    assert no_hooks_left(base)


def test_loading_saved_vectors_refuses_what_save_vectors_did_not_write(base, nla, tmp_path):
    tokens, mask = padded(base, "left")
    path = steer(nla, base, tokens, -1, mask, compare=False, continue_tokens=0).save_vectors(tmp_path / "d.safetensors")
    with pytest.raises(nl.InputError, match="does not exist"):
        nl.WordSteering.fwd_hooks_from(tmp_path / "missing.safetensors")
    with pytest.raises(nl.InputError, match="reads the .safetensors file save_vectors wrote"):
        nl.WordSteering.fwd_hooks_from(tmp_path / "steer.parquet")
    other = tmp_path / "vectors.safetensors"  # a vector file of the CLI's kind
    save_file({"vectors": torch.randn(4, base.cfg.d_model)}, str(other))
    with pytest.raises(nl.InputError, match=r"not a file WordSteering.save_vectors wrote: it lacks \['delta'"):
        nl.WordSteering.fwd_hooks_from(other)
    other.write_bytes(b"not safetensors at all")
    with pytest.raises(nl.InputError, match="not a file WordSteering.save_vectors wrote: it cannot be read"):
        nl.WordSteering.fwd_hooks_from(other)
    with safe_open(str(path), "pt") as saved:
        tensors, metadata = load_file(str(path)), saved.metadata()
    save_file(tensors, str(other), metadata={**metadata, "mode": "patch"})
    with pytest.raises(nl.InputError, match="mode 'patch' is neither 'add' nor 'replace'"):
        nl.WordSteering.fwd_hooks_from(other)
    save_file({**tensors, "rows": tensors["rows"][:2]}, str(other), metadata=metadata)
    with pytest.raises(nl.InputError, match="do not fit together"):
        nl.WordSteering.fwd_hooks_from(other)
    save_file(tensors, str(other), metadata={**metadata, "token_shape": "4"})
    with pytest.raises(nl.InputError, match="token_shape does not parse"):
        nl.WordSteering.fwd_hooks_from(other)
    infinite = {**tensors, "delta": tensors["delta"] * torch.inf}
    for broken_tensors, broken_metadata in ((tensors, {**metadata, "alpha": "nan"}), (infinite, metadata)):
        save_file(broken_tensors, str(other), metadata=broken_metadata)
        with pytest.raises(nl.InputError, match="holds NaN or Inf"):  # the hook would write NaN into the residual
            nl.WordSteering.fwd_hooks_from(other)


@pytest.mark.parametrize("broken", ["position_past_width", "negative_row", "empty_token_shape"])
def test_a_saved_file_whose_sites_lie_outside_its_token_shape_is_refused(base, nla, tmp_path, broken):
    """Sites outside the [batch, pos] the hook is bound to: the hook raised a bare IndexError at its first run (or,
    for a negative index, steered a site counted from the end), or named a token shape [0, 0] no run has."""
    tokens, mask = padded(base, "left")
    path = steer(nla, base, tokens, -1, mask, compare=False, continue_tokens=0).save_vectors(tmp_path / "d.safetensors")
    with safe_open(str(path), "pt") as saved:
        tensors, metadata = load_file(str(path)), saved.metadata()
    batch, width = tokens.shape
    if broken == "position_past_width":
        tensors["positions"] = tensors["positions"] + width
    elif broken == "negative_row":
        tensors["rows"] = tensors["rows"] - batch
    else:
        metadata = {**metadata, "token_shape": "[0, 0]"}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(nl.InputError, match="sites .* lie outside its token_shape"):
        nl.WordSteering.fwd_hooks_from(path)


def test_replace_mode_patches_in_an_unchanged_explanations_own_reconstruction(base, nla):
    """The control of "patch with words": an edit that changes nothing makes T the original explanations' mean unit
    reconstruction, and replace mode steers with T; Delta = 0, which the table says. Add mode, which steers along
    Delta, still refuses it."""
    tokens, mask = padded(base, "left")
    samples = [TINY_LABELS[:2], TINY_LABELS[2:3], TINY_LABELS[3:4], TINY_LABELS[4:6]]
    result = steer(nla, base, tokens, -1, mask, explanations=samples, edit=lambda text: text, mode="replace",
                   continue_tokens=0)
    for i, texts in enumerate(samples):
        assert torch.allclose(result.target[i], unit(nla.ar.reconstruct(texts)).mean(0), rtol=0, atol=1e-6)
    assert torch.equal(result.delta, torch.zeros_like(result.delta))
    sites = list(zip(result.rows.tolist(), result.positions.tolist(), strict=True))
    _, logits = resid_and_logits(base, tokens, mask, result.fwd_hooks())
    _, reference = resid_and_logits(base, tokens, mask, [(NAME, hand_written(sites, result.target, 1.0, "replace"))])
    assert torch.allclose(logits, reference, rtol=0, atol=1e-5 * float(logits.abs().max()))
    frame = result.to_pandas()
    assert list(frame["delta_norm"]) == [0.0] * 4 and set(frame["mode"]) == {"replace"}
    assert (frame["kl"] > 0).all()  # it steered all the same
    with pytest.raises(nl.InputError, match="unchanged.*Delta = 0 and there is nothing to steer with"):
        steer(nla, base, tokens, -1, mask, explanations=samples, edit=lambda text: text, mode="add")


def test_replace_mode_refuses_edited_reconstructions_that_cancel_out(base, nla, monkeypatch):
    """T = 0 (two samples' unit reconstructions exactly opposite) has no direction: replace mode refuses it, and
    add mode, which steers along Delta, does not."""
    tokens, mask = padded(base, "left")
    v = torch.randn(nla.ar.meta.d_model, generator=torch.Generator().manual_seed(3))
    originals = torch.randn(2, nla.ar.meta.d_model, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(nla.ar, "reconstruct", lambda texts, **kwargs: torch.cat([originals, torch.stack([v, -v])]))
    one_site = {"explanations": [TINY_LABELS[:2]], "edit": lambda text: text + " the sea", "compare": False,
                "continue_tokens": 0}
    with pytest.raises(nl.InputError, match="site 0 cancel out, so T = 0"):
        steer(nla, base, tokens[:1], -1, mask[:1], mode="replace", **one_site)
    added = steer(nla, base, tokens[:1], -1, mask[:1], mode="add", **one_site)
    assert torch.equal(added.target, torch.zeros_like(added.target)) and added.delta.norm() > 0


def test_sampling_settings_that_would_not_apply_are_refused_before_the_av_runs(base, nla, monkeypatch):
    """samples / temperature / seed with explanations= (the AV does not run), and temperature / seed with samples=1
    (greedy), were ignored without a word: samples=5 reported "1 sample(s) per site", temperature=-3 passed."""
    tokens, mask = padded(base, "left")
    seen = {}

    monkeypatch.setattr(nla.av, "verbalize", fake_verbalize(seen))
    for given in ({"samples": 5}, {"samples": 1}, {"temperature": 0.7}, {"seed": 3}):
        name, value = next(iter(given.items()))
        with pytest.raises(nl.InputError, match=rf"^{name}={value!r}: samples, temperature and seed set how the AV "
                                                r"samples explanations, and explanations= skips the AV"):
            steer(nla, base, tokens, -1, mask, **given)
    av_path = {"explanations": None, "compare": False, "continue_tokens": 0}
    for given in ({"temperature": -3}, {"temperature": 0.5, "seed": 1}, {"samples": 1, "seed": 0}):
        with pytest.raises(nl.InputError, match="samples=1 reads the greedy explanation"):
            steer(nla, base, tokens, -1, mask, **av_path, **given)
    with pytest.raises(nl.InputError, match=r"temperature=-3 must be a finite number >= 0"):
        steer(nla, base, tokens, -1, mask, **av_path, samples=2, temperature=-3)
    with pytest.raises(nl.InputError, match=r"seed=1.5 must be a whole number"):
        steer(nla, base, tokens, -1, mask, **av_path, samples=2, seed=1.5)
    with pytest.raises(nl.InputError, match=r"samples=0: must be a whole number >= 1"):
        steer(nla, base, tokens, -1, mask, **av_path, samples=0)
    for zero in (0, 0.0, torch.tensor(0.0)):  # samples > 1 would average Delta over copies of the greedy text
        with pytest.raises(nl.InputError, match=r"^samples=3, temperature=.*: at temperature 0 every sample"):
            steer(nla, base, tokens, -1, mask, **av_path, samples=3, temperature=zero)
    assert not seen  # every refusal came before the AV ran
    # what applies still works as before: greedy by default, sampled at temperature 1 and seed 0 unless told
    assert repr(steer(nla, base, tokens, -1, mask, **av_path)).startswith("WordSteering: 4 sites")
    assert seen["kwargs"]["temperature"] == 0.0 and "seed" not in seen["kwargs"]
    sampled = steer(nla, base, tokens, -1, mask, **av_path, samples=2)
    assert seen["kwargs"]["temperature"] == 1.0 and seen["kwargs"]["seed"] == 0
    assert "2 samples per site" in repr(sampled)
    steer(nla, base, tokens, -1, mask, **av_path, samples=2, temperature=0.5, seed=9)
    assert seen["kwargs"]["temperature"] == 0.5 and seen["kwargs"]["seed"] == 9


def test_batch_size_bounds_the_ar_batches_too(base, nla):
    """The AR reconstructed every original and edited explanation in one batch, whatever batch_size said (on a big
    model, all of them at once); it runs them batch_size at a time, with the same Delta and T."""
    tokens, mask = padded(base, "left")
    samples = [TINY_LABELS[:2], TINY_LABELS[2:5], TINY_LABELS[5:6], TINY_LABELS[6:8]]  # 8 originals, 8 edits
    widths = []

    def record(resid, hook):
        widths.append(resid.shape[0])

    one_batch = steer(nla, base, tokens, -1, mask, explanations=samples, compare=False, continue_tokens=0)
    with nla.ar.model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", record)]):
        batched = steer(nla, base, tokens, -1, mask, explanations=samples, batch_size=3, compare=False,
                        continue_tokens=0)
    assert widths == [3, 3, 3, 3, 3, 1]
    assert torch.allclose(batched.delta, one_batch.delta, rtol=0, atol=1e-6)
    assert torch.allclose(batched.target, one_batch.target, rtol=0, atol=1e-6)
    with pytest.raises(nl.InputError, match=r"batch_size=0: must be a whole number >= 1"):  # was ignored
        steer(nla, base, tokens, -1, mask, explanations=samples, batch_size=0)


def test_max_new_tokens_with_given_explanations_is_refused(base, nla, monkeypatch):
    """max_new_tokens sets how long the AV writes, and explanations= skips the AV: it was ignored without a word."""
    tokens, mask = padded(base, "left")
    seen = {}
    monkeypatch.setattr(nla.av, "verbalize", fake_verbalize(seen))
    with pytest.raises(nl.InputError, match=r"^max_new_tokens=20: it sets how long the AV writes, and explanations= "
                                            "skips the AV"):
        steer(nla, base, tokens, -1, mask, max_new_tokens=20)
    av_path = {"explanations": None, "compare": False, "continue_tokens": 0}
    with pytest.raises(nl.InputError, match=r"max_new_tokens=0 must be a whole number >= 1"):
        steer(nla, base, tokens, -1, mask, **av_path, max_new_tokens=0)
    assert not seen  # refused before the AV ran
    steer(nla, base, tokens, -1, mask, **av_path)
    assert seen["kwargs"]["max_new_tokens"] == 150  # the default, as verbalize's
    steer(nla, base, tokens, -1, mask, **av_path, samples=2, max_new_tokens=20)
    assert seen["kwargs"]["max_new_tokens"] == 20


def test_a_max_new_tokens_the_ar_cannot_read_is_refused_before_the_av_runs(base, nla, monkeypatch):
    """`NLA.round_trip`'s rule (the AR prompt of an empty explanation plus the sample fits the AR's n_ctx): the AR
    refused a long explanation after the AV had verbalized every site. Given explanations skip the AV and the rule."""
    tokens, mask = padded(base, "left")
    seen = {}
    monkeypatch.setattr(nla.av, "verbalize", fake_verbalize(seen))
    prompt = len(nl.sidecar.ar_prompt_ids(nla.ar.meta, nla.ar.tokenizer, ""))
    monkeypatch.setattr(nla.ar.model.cfg, "n_ctx", prompt + 10)
    av_path = {"explanations": None, "compare": False, "continue_tokens": 0}
    with pytest.raises(nl.PromptTooLongError, match=re.escape(f"max_new_tokens=11 after the {prompt}-token AR prompt "
                                                              f"needs {prompt + 11} positions, over the AR's n_ctx="
                                                              f"{prompt + 10}; set max_new_tokens <= 10")):
        steer(nla, base, tokens, -1, mask, **av_path, max_new_tokens=11)
    with pytest.raises(nl.PromptTooLongError, match=re.escape("max_new_tokens=150 after")):
        steer(nla, base, tokens, -1, mask, **av_path)  # the default
    assert not seen  # refused before the AV ran
    assert steer(nla, base, tokens, -1, mask, **av_path, max_new_tokens=10).delta.isfinite().all()
    assert steer(nla, base, tokens, -1, mask, compare=False, continue_tokens=0).delta.isfinite().all()


def test_samples_dropped_for_a_failed_parse_are_counted_in_a_warning_the_result_keeps(base, nla, monkeypatch, tmp_path):
    """samples=3 with one sample cut at max_new_tokens: Delta averages the other two, which the result said nowhere
    (its summary read "2 samples per site"): a UserWarning naming the site, the count and why, kept in .warnings."""
    tokens, mask = padded(base, "left")
    cut = nl.Verbalization("<explanation>the ca", None, [5] * 4, truncated=True)
    said = [nl.Verbalization(f"<explanation>{t}</explanation>", t, []) for t in TINY_LABELS[:2]]
    monkeypatch.setattr(nla.av, "verbalize", lambda vectors, **kw: [said[0], cut, said[1]])
    with pytest.warns(UserWarning, match=re.escape(
            f"1 of 1 site kept fewer than the AV's 3 explanations: site 0 (row 0, column {tokens.shape[1] - 1}) "
            "dropped 1, 1 failed to parse (1 cut at max_new_tokens before </explanation>: verbalize with a larger "
            "one). Delta averages those left")) as caught:
        result = nl.steer_with_words(nla, base, tokens[:1], -1, attention_mask=mask[:1], samples=3,
                                     edit=lambda text: text + " the end", compare=False, continue_tokens=0)
    assert result.explanations == [TINY_LABELS[:2]]
    assert result.warnings == [str(w.message) for w in caught if "failed to parse" in str(w.message)]
    assert nl.read_result(result.save(tmp_path / "steer.parquet")).attrs["warnings"] == result.warnings


def test_sites_that_dropped_samples_are_named_in_one_warning_the_first_five_then_counted(base, nla, monkeypatch):
    """A warning a site printed hundreds for a run of hundreds of sites: one warning names the first five and counts
    the rest."""
    tokens, mask = padded(base, "left")
    cut = nl.Verbalization("<explanation>the ca", None, [5] * 4, truncated=True)
    kept = nl.Verbalization(f"<explanation>{TINY_LABELS[0]}</explanation>", TINY_LABELS[0], [])
    monkeypatch.setattr(nla.av, "verbalize", lambda vectors, **kw: [kept, cut] * (len(vectors) // 2))
    positions = list(range(tokens.shape[1]))[-7:]
    with pytest.warns(UserWarning) as caught:
        nl.steer_with_words(nla, base, tokens[:1], positions, attention_mask=mask[:1], samples=2,
                            edit=lambda text: text + " the end", compare=False, continue_tokens=0)
    said = [str(w.message) for w in caught if "kept fewer" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("7 of 7 sites kept fewer than the AV's 2 explanations: site 0 ")
    assert "site 4 (row 0" in said[0] and "site 5 " not in said[0] and "; and 2 more. Delta averages" in said[0]


def test_an_av_sample_that_retokenizes_past_the_ars_context_is_dropped_as_a_failed_parse(base, nla, monkeypatch):
    """The up-front check bounds the sampled tokens, not their text tokenized again (U+FFFD from a stray byte token):
    the AR refused the whole call after the AV's work. Such a sample is left out of its site's Delta, as a failed
    parse is; a site left with none is named."""
    tokens, mask = padded(base, "left")
    stray = stray_byte_verbalization(nla.ar.tokenizer)
    cat = nl.Verbalization("<explanation>the cat</explanation>", "the cat", [])
    prompt = len(nl.sidecar.ar_prompt_ids(nla.ar.meta, nla.ar.tokenizer, ""))
    monkeypatch.setattr(nla.ar.model.cfg, "n_ctx", prompt + len(stray.tokens))
    monkeypatch.setattr(nla.av, "verbalize", lambda vectors, **kw: [stray, cat][:len(vectors)])
    run = {"explanations": None, "compare": False, "continue_tokens": 0, "max_new_tokens": len(stray.tokens),
           "edit": lambda text: text.replace("cat", "dog")}
    with pytest.warns(UserWarning, match=r"1 of 1 site kept fewer than the AV's 2 explanations: site 0 .* dropped 1, "
                                         r"1 make AR prompts over the AR's n_ctx\. Delta averages those left"):
        result = steer(nla, base, tokens[:1], -1, mask[:1], samples=2, **run)
    assert result.explanations == [["the cat"]] and result.edited == [["the dog"]]
    expected = unit(nla.ar.reconstruct(["the dog"])) - unit(nla.ar.reconstruct(["the cat"]))
    assert torch.allclose(result.delta, expected, atol=1e-6)
    with pytest.raises(nl.PromptTooLongError, match=re.escape(
            f"1 of the AV's 1 explanations of site 0 (row 0, column {tokens.shape[1] - 1}) make AR prompts over the "
            f"AR's n_ctx={prompt + len(stray.tokens)}, the rest failed to parse: a text retokenizes to more tokens "
            "than the AV sampled")):
        steer(nla, base, tokens[:1], -1, mask[:1], **run)


def test_an_edit_past_the_ars_context_is_refused_by_site_before_the_ar_reads_any(base, nla, monkeypatch):
    """No bound set before the AV runs holds for an edit, which may lengthen its text: the AR refused "explanation 5",
    numbered among every site's originals and edits together. The site, and whether its explanation or its edit, is
    named before the AR reads any."""
    tokens, mask = padded(base, "left")
    prompt = len(nl.sidecar.ar_prompt_ids(nla.ar.meta, nla.ar.tokenizer, ""))
    monkeypatch.setattr(nla.ar.model.cfg, "n_ctx", prompt + 12)
    monkeypatch.setattr(nla.ar, "reconstruct", lambda *a, **kw: pytest.fail("the AR read before the check"))
    longer = ["the sea", "the sea and on and on and on and on and on and on"]
    length = len(nl.sidecar.ar_prompt_ids(nla.ar.meta, nla.ar.tokenizer, longer[1]))
    assert length > prompt + 12
    with pytest.raises(nl.PromptTooLongError, match=re.escape(
            f"the edited explanation 'the sea and on and on and on and on and on and on' of site 1 "
            f"(row 1, column {tokens.shape[1] - 1}) makes an AR prompt of {length} tokens, over the AR's n_ctx="
            f"{prompt + 12} (1 of the site's 1); shorten it")):
        steer(nla, base, tokens[:2], -1, mask[:2], explanations=["a dog", "the sea"], edit=["the cat", longer[1]])
    with pytest.raises(nl.PromptTooLongError, match=re.escape(
            f"the explanation 'the sea and on and on and on and on and on and on' of site 0 (row 0, column "
            f"{tokens.shape[1] - 1}) makes an AR prompt of {length} tokens, over the AR's n_ctx={prompt + 12} (1 of "
            "the site's 2)")):
        steer(nla, base, tokens[:1], -1, mask[:1], explanations=[longer], edit=lambda text: "the cat")


def test_an_edit_given_as_text_is_refused_before_the_av_runs(base, nla, monkeypatch):
    """An edit given as text does not depend on what the AV says, but one too long for the AR (or empty, or a list
    of edits of the wrong length) was refused only after the AV had verbalized every site."""
    tokens, mask = padded(base, "left")
    prompt = len(nl.sidecar.ar_prompt_ids(nla.ar.meta, nla.ar.tokenizer, ""))
    monkeypatch.setattr(nla.ar.model.cfg, "n_ctx", prompt + 12)
    monkeypatch.setattr(nla.av, "verbalize", lambda *a, **kw: pytest.fail("the AV ran before the edit was checked"))
    longer = "the sea and on and on and on and on and on and on"
    length = len(nl.sidecar.ar_prompt_ids(nla.ar.meta, nla.ar.tokenizer, longer))
    assert length > prompt + 12
    av_path = {"explanations": None, "compare": False, "continue_tokens": 0, "max_new_tokens": 12}
    with pytest.raises(nl.PromptTooLongError, match=re.escape(
            f"the edited explanation {longer!r} of site 1 (row 1, column {tokens.shape[1] - 1}) makes an AR prompt "
            f"of {length} tokens, over the AR's n_ctx={prompt + 12} (2 of the site's 2); shorten it")):
        steer(nla, base, tokens[:2], -1, mask[:2], **av_path, samples=2, edit=[lambda text: text, longer])
    with pytest.raises(nl.PromptTooLongError, match=re.escape(f"the edited explanation {longer!r} of site 0 ")):
        steer(nla, base, tokens[:2], -1, mask[:2], **av_path, edit=longer)
    with pytest.raises(nl.InputError, match="the edit of site 0 gives an empty explanation"):
        steer(nla, base, tokens[:2], -1, mask[:2], **av_path, edit=" ")
    with pytest.raises(nl.InputError, match=re.escape("or one of those per site (2)")):
        steer(nla, base, tokens[:2], -1, mask[:2], **av_path, edit=["the cat"])


@pytest.mark.parametrize("zero", [0, 0.0, np.float64(0.0), np.float32(0.0)])
def test_samples_one_at_temperature_zero_is_the_greedy_read(base, nla, monkeypatch, zero):
    """samples=1 is the greedy explanation, i.e. temperature 0: saying so was refused as a temperature it ignores.
    Any other temperature, and a seed (no effect on a greedy read), are still refused with samples=1."""
    tokens, mask = padded(base, "left")
    seen = {}
    monkeypatch.setattr(nla.av, "verbalize", fake_verbalize(seen))
    av_path = {"explanations": None, "compare": False, "continue_tokens": 0}
    plain = steer(nla, base, tokens, -1, mask, **av_path)
    for samples in (1, None):
        seen.clear()
        said = steer(nla, base, tokens, -1, mask, **av_path, samples=samples, temperature=zero)
        assert seen["kwargs"]["temperature"] == 0.0 and type(seen["kwargs"]["temperature"]) is float
        assert "seed" not in seen["kwargs"] and torch.equal(said.delta, plain.delta)
    seen.clear()
    with pytest.raises(nl.InputError, match=r"^seed=3: samples=1 reads the greedy explanation, which takes no seed"):
        steer(nla, base, tokens, -1, mask, **av_path, samples=1, temperature=zero, seed=3)
    for temperature in (0.5, 1e-9, -0.5, False):
        with pytest.raises(nl.InputError, match=rf"^temperature={temperature!r}: samples=1 reads the greedy "
                                                "explanation, which takes no seed and no temperature other than 0"):
            steer(nla, base, tokens, -1, mask, **av_path, samples=1, temperature=temperature)
    assert not seen  # refused before the AV ran


def test_a_saved_file_whose_hook_name_is_not_its_layers_residual_is_refused(base, nla, tmp_path):
    """save_vectors records layer K and blocks.K.hook_resid_post; a file where they disagree was edited or damaged
    (the hook went to whatever hook_name said: another layer, or another hook point, Delta meaning nothing there)."""
    tokens, mask = padded(base, "left")
    path = steer(nla, base, tokens, -1, mask, compare=False, continue_tokens=0).save_vectors(tmp_path / "d.safetensors")
    with safe_open(str(path), "pt") as saved:
        tensors, metadata = load_file(str(path)), saved.metadata()
    other = tmp_path / "edited.safetensors"
    for edited in ({"hook_name": f"blocks.{LAYER - 1}.hook_resid_post"}, {"layer": str(LAYER - 1)},
                   {"hook_name": f"blocks.{LAYER}.hook_resid_pre"}):
        save_file(tensors, str(other), metadata={**metadata, **edited})
        layer = edited.get("layer", LAYER)
        expected = f"blocks.{layer}.hook_resid_post"
        with pytest.raises(nl.InputError, match=rf"hook_name '{re.escape((metadata | edited)['hook_name'])}' is not "
                                                rf"layer {layer}'s residual hook '{re.escape(expected)}'"):
            nl.WordSteering.fwd_hooks_from(other)
    for layer in ("one", "-1"):
        save_file(tensors, str(other), metadata={**metadata, "layer": layer})
        with pytest.raises(nl.InputError, match="layer, alpha or token_shape does not parse"):
            nl.WordSteering.fwd_hooks_from(other)
    # A tensor named like a setting is not the setting (it shadowed the metadata: AttributeError on .isdigit()).
    save_file({**tensors, "layer": torch.tensor([LAYER])}, str(other), metadata=metadata)
    assert len(nl.WordSteering.fwd_hooks_from(other)) == 1
    without_layer = {k: v for k, v in metadata.items() if k != "layer"}
    save_file({**tensors, "layer": torch.tensor([LAYER])}, str(other), metadata=without_layer)
    with pytest.raises(nl.InputError, match=r"it lacks \['layer'\]"):
        nl.WordSteering.fwd_hooks_from(other)
