"""`nl.capture` records exactly what `run_with_cache` stores, under the user's own hooks and padding."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from base_batches import PROMPTS, load_base, no_hooks_left, padded
from conftest import LAYER, TL4

import nla_lens as nl
from nla_lens.capture import activation_at, resid_post, text_resid_post

NAME = f"blocks.{LAYER}.hook_resid_post"



STEER = torch.randn(64, generator=torch.Generator().manual_seed(3))


def steer_hook(scale: float):
    return lambda resid, hook: resid + scale * STEER


@pytest.mark.parametrize("user_hooks", ["none", "steer_layer_0", "steer_captured_layer"])
def test_capture_equals_run_with_cache_on_left_padded_batch(base, user_hooks):
    tokens, mask = padded(base, "left")
    hooks = {"none": [], "steer_layer_0": [("blocks.0.hook_resid_post", steer_hook(4.0))],
             "steer_captured_layer": [(NAME, steer_hook(4.0))]}[user_hooks]
    with nl.capture(base, LAYER, -1, attention_mask=mask, tokens=tokens) as cap:
        base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
    with base.hooks(fwd_hooks=hooks):
        _, cache = base.run_with_cache(tokens, attention_mask=mask, names_filter=NAME)
    assert torch.equal(cap.vectors, cache[NAME][:, -1])
    assert cap.vectors.dtype == torch.float32
    width = tokens.shape[1]
    assert [(r.batch, r.position, r.call) for r in cap.rows] == [(b, width - 1, 0) for b in range(len(PROMPTS))]
    assert [r.token for r in cap.rows] == base.to_str_tokens(tokens[:, -1])
    assert no_hooks_left(base)


def test_capture_sees_a_steering_hook_at_the_captured_layer(base):
    tokens, mask = padded(base, "left")
    with nl.capture(base, LAYER, -1, attention_mask=mask) as clean:
        base(tokens, attention_mask=mask)
    with nl.capture(base, LAYER, -1, attention_mask=mask) as steered:
        base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(NAME, steer_hook(2.5))])
    assert (steered.vectors - clean.vectors - 2.5 * STEER).abs().max() < 1e-5


@pytest.mark.parametrize("source", ["attention_mask", "pad_tokens"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_negative_positions_count_back_from_the_last_real_token(base, side, source):
    tokens, mask = padded(base, side)
    lengths = mask.sum(dim=1)
    last = lengths - 1 if side == "right" else torch.full_like(lengths, tokens.shape[1] - 1)
    kwargs = {"attention_mask": mask} if source == "attention_mask" else {}
    with nl.capture(base, LAYER, [-1, -2], tokens=tokens, **kwargs) as cap:
        _, cache = base.run_with_cache(tokens, attention_mask=mask, names_filter=NAME)
    rows = torch.arange(len(PROMPTS)).repeat_interleave(2)
    cols = torch.stack([last, last - 1], dim=1).flatten()
    assert [(r.batch, r.position) for r in cap.rows] == list(zip(rows.tolist(), cols.tolist(), strict=True))
    assert torch.equal(cap.vectors, cache[NAME][rows, cols])


def _positions_cases(mask: torch.Tensor) -> list[tuple[object, list[tuple[int, int]]]]:
    width = mask.shape[1]
    bool_mask = torch.zeros_like(mask, dtype=torch.bool)
    bool_mask[0, -3:] = True
    bool_mask[2, -1] = True
    return [
        (width - 2, [(b, width - 2) for b in range(4)]),
        ([width - 1, width - 2], [(b, c) for b in range(4) for c in (width - 1, width - 2)]),
        (torch.tensor([width - 1, width - 2, -3, -1]), [(0, width - 1), (1, width - 2), (2, width - 3),
                                                          (3, width - 1)]),
        (bool_mask, [(0, width - 3), (0, width - 2), (0, width - 1), (2, width - 1)]),
        (mask.bool(), [(b, c) for b in range(4) for c in range(width) if mask[b, c]]),
    ]


def test_a_row_of_only_padding_is_refused_whether_a_mask_or_the_pad_tokens_say_so(base):
    """The message blamed "their attention mask is all zeros" where no mask was given and the row was pad tokens."""
    tokens, mask = padded(base, "left")
    tokens[1], mask[1] = base.tokenizer.pad_token_id, 0
    for run in ({"attention_mask": mask}, {}):
        with pytest.raises(nl.InputError, match=r"^rows \[1\] have no real token \(an attention mask of zeros, or only "
                                                r"pad tokens\): drop those rows"):
            with nl.capture(base, LAYER, positions=-1):
                base(tokens, stop_at_layer=LAYER + 1, **run)
        assert no_hooks_left(base)


@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_reads_tokens_and_mask_from_the_run_when_not_given_them(base, side):
    tokens, mask = padded(base, side)
    with nl.capture(base, LAYER, positions=-1) as cap:  # nothing passed twice
        _, cache = base.run_with_cache(tokens, attention_mask=mask, names_filter=NAME)
    last = [int(row.nonzero().max()) for row in mask]
    assert [(r.batch, r.position) for r in cap.rows] == list(enumerate(last))
    assert [r.token for r in cap.rows] == [base.to_single_str_token(int(tokens[b, p])) for b, p in enumerate(last)]
    assert torch.equal(cap.vectors, cache[NAME][torch.arange(len(last)), torch.tensor(last)])
    with nl.capture(base, LAYER, positions=-1) as from_strings:  # strings: the tokens the model makes of them
        base(PROMPTS[0], stop_at_layer=LAYER + 1)
    assert from_strings.rows[-1].token == base.to_str_tokens(PROMPTS[0])[-1]
    assert no_hooks_left(base)


@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_reads_tokens_and_mask_from_run_with_hooks_when_not_given_them(base, side):
    """HookedTransformer's run_with_hooks calls `forward` directly, past a torch pre-hook on the model: the
    right-padded row's last real token was missed and the pad column after it recorded."""
    tokens, mask = padded(base, side)
    last = [int(row.nonzero().max()) for row in mask]
    _, cache = base.run_with_cache(tokens, attention_mask=mask, names_filter=NAME)
    with nl.capture(base, LAYER, positions=-1) as outer, nl.capture(base, LAYER, positions=-1) as inner:
        base.run_with_hooks(tokens, attention_mask=mask)
    for cap in (outer, inner):
        assert [(r.batch, r.position) for r in cap.rows] == list(enumerate(last))
        assert [r.token for r in cap.rows] == [base.to_single_str_token(int(tokens[b, p])) for b, p in enumerate(last)]
        assert torch.equal(cap.vectors, cache[NAME][torch.arange(len(last)), torch.tensor(last)])
    with nl.capture(base, LAYER, positions=-1) as from_strings:
        base.run_with_hooks(PROMPTS, padding_side=side, stop_at_layer=LAYER + 1)
    strings = base.to_tokens(PROMPTS, padding_side=side)
    real = strings != base.tokenizer.pad_token_id
    assert [r.position for r in from_strings.rows] == [int(row.nonzero().max()) for row in real]
    assert no_hooks_left(base) and "forward" not in vars(base)  # the wrapper is gone, the class's forward back


@pytest.mark.parametrize("case", range(5), ids=["int", "list", "per_row_tensor", "bool_mask", "all_real_tokens"])
def test_positions_variants_select_the_right_sites(base, case):
    tokens, mask = padded(base, "left")
    positions, expected = _positions_cases(mask)[case]
    with nl.capture(base, LAYER, positions, attention_mask=mask) as cap:
        _, cache = base.run_with_cache(tokens, attention_mask=mask, names_filter=NAME)
    assert [(r.batch, r.position) for r in cap.rows] == expected
    rows, cols = map(torch.tensor, zip(*expected, strict=True))
    assert torch.equal(cap.vectors, cache[NAME][rows, cols])
    # Not given the tokens, capture read them from the run itself.
    assert [r.token for r in cap.rows] == [base.to_single_str_token(int(tokens[b, c])) for b, c in expected]


def test_capture_outlives_the_users_hook_contexts_and_first_call_is_the_default(base):
    tokens, mask = padded(base, "left")
    with nl.capture(base, LAYER, -1, attention_mask=mask) as first:
        base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(NAME, steer_hook(1.0))])
        base(tokens, attention_mask=mask)
    with nl.capture(base, LAYER, -1, attention_mask=mask, calls="all") as both:
        base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(NAME, steer_hook(1.0))])
        base(tokens, attention_mask=mask)
    assert first.n_calls == 2 and len(first.rows) == 4
    assert both.n_calls == 2 and [r.call for r in both.rows] == [0] * 4 + [1] * 4
    assert torch.equal(both.vectors[:4], first.vectors)
    assert (both.vectors[:4] - both.vectors[4:] - STEER).abs().max() < 1e-5


# padding_side="left": the bridge reads a pre-padded tensor's padding off its pad tokens only when asked
# (HookedTransformer always does); without it the pads are attended to.
GENERATE = {"max_new_tokens": 3, "do_sample": False, "stop_at_eos": False, "verbose": False, "padding_side": "left"}


def test_generate_records_the_prefill_or_every_new_token(base):
    tokens, mask = padded(base, "left")
    with nl.capture(base, LAYER, -1, tokens=tokens) as prefill:
        base.generate(tokens, **GENERATE)
    with nl.capture(base, LAYER, -1, tokens=tokens, calls="all") as every:
        out = base.generate(tokens, **GENERATE)
    assert prefill.n_calls == 3 and len(prefill.rows) == 4
    assert [r.call for r in every.rows] == [0] * 4 + [1] * 4 + [2] * 4
    fed = out[:, :-1].clone()  # the last sampled token is never fed back; clone: out is an inference tensor
    full_mask = torch.cat([mask, torch.ones(4, 2, dtype=mask.dtype)], dim=1)
    _, cache = base.run_with_cache(fed, attention_mask=full_mask, names_filter=NAME)
    width = tokens.shape[1]
    expected = cache[NAME][:, width - 1:].transpose(0, 1).reshape(-1, 64)  # call-major, like the rows
    assert torch.equal(prefill.vectors, every.vectors[:4])
    assert (every.vectors - expected).abs().max() < 1e-4  # KV cache vs full forward


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("given", [False, True], ids=["tokens_from_the_run", "tokens_given"])
def test_generate_names_the_token_of_every_row_prompt_and_generated(base, given, kv_cache):
    """TL 3.9's generate runs forward on embeddings it made itself, so every row's token was None there; on either
    backend, the rows of the decode steps were None when capture was given the prompt's tokens."""
    tokens, _ = padded(base, "left")
    with nl.capture(base, LAYER, -1, tokens=tokens if given else None, calls="all") as cap:
        out = base.generate(tokens, use_past_kv_cache=kv_cache, **GENERATE)
    fed = out[:, tokens.shape[1] - 1:-1]  # each pass's last token: the prompt's, then each new one fed back
    assert [r.token for r in cap.rows] == [base.to_single_str_token(int(t)) for t in fed.T.flatten()]
    assert "generate" not in base.__dict__ and not base.embed._forward_pre_hooks


def test_positions_that_a_decode_step_lacks_name_the_pass_and_what_fits_every_pass(base):
    """The prompt's columns given with calls="all": the first decode step raised "position 1 is outside row 0
    (columns 0..0, ...)", which read as wrong about the prompt that has them."""
    tokens = base.to_tokens("the cat sat on", prepend_bos=False)
    with pytest.raises(nl.InputError, match=r"^pass 1 inside the capture \(calls='all'\) ran 1 column \(a "
                                            r"KV-cached step of generate .* positions=-1 fits every pass, .*\): "
                                            r"positions: position 1 is outside row 0 \(columns 0..0"):
        with nl.capture(base, LAYER, [0, 1], calls="all"):
            base.generate(tokens, **GENERATE)
    last = tokens.shape[1] - 1
    with pytest.raises(nl.InputError, match=rf"^positions: position 9 is outside row 0 \(columns 0..{last},"):
        with nl.capture(base, LAYER, [9], calls="all"):  # wrong on the prompt itself: said as before
            base.generate(tokens, **GENERATE)
    assert no_hooks_left(base)


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_a_generated_token_that_shares_the_pad_id_is_captured(base, kv_cache):
    """A generated token equal to the pad id (Qwen pads with its EOS, which generate feeds back once a row
    ends) is real: on the bridge a KV-cached decode step's one column was taken for padding (the capture raised
    "rows [0] have no real token"), and without the cache, trailing padding, so the prompt's last token was
    recorded again, without a word."""
    tokens = base.to_tokens("the cat sat on", prepend_bos=False)
    generated = base.generate(tokens, use_past_kv_cache=kv_cache, **GENERATE)[0, tokens.shape[1]:]
    tokenizer = base.tokenizer
    pad = tokenizer.pad_token_id
    assert int(generated[0]) not in tokens[0].tolist()
    tokenizer.pad_token_id = int(generated[0])
    try:
        with nl.capture(base, LAYER, -1, calls="all") as cap:
            base.generate(tokens, use_past_kv_cache=kv_cache, **GENERATE)
    finally:
        tokenizer.pad_token_id = pad
    assert cap.n_calls == 3
    fed = torch.cat([tokens[0, -1:], generated[:-1]])
    assert [r.token for r in cap.rows] == [base.to_single_str_token(int(t)) for t in fed]


def test_a_forward_from_embeddings_after_generate_is_not_named_by_the_generated_tokens(base):
    """The ids generate embeds name its own passes only: a later run from embeddings the user made holds no token."""
    tokens, _ = padded(base, "left")
    with nl.capture(base, LAYER, -1, calls="all") as cap:
        base.generate(tokens, **GENERATE)
        base(base.embed(tokens[:, -1:]), start_at_layer=0)
    assert cap.n_calls == 4 and all(r.token is not None for r in cap.rows[:12])
    assert [r.token for r in cap.rows[12:]] == [None] * 4


@pytest.mark.parametrize("layer", range(4))
def test_resid_post_is_the_hooked_residual_at_every_layer_the_last_included(base, layer):
    """On the bridge, stop_at_layer=n_layers returns logits; resid_post reads the hook on both backends."""
    tokens, mask = padded(base, "left")
    name = f"blocks.{layer}.hook_resid_post"
    _, cache = base.run_with_cache(tokens, attention_mask=mask, names_filter=name)
    assert torch.equal(resid_post(base, tokens, layer, attention_mask=mask), cache[name])


def test_resid_post_of_left_padded_tokens_without_a_mask_masks_the_pads_on_both_backends(base):
    """HookedTransformer masks a left-padded tensor's leading pads itself; the bridge attended to them, so
    resid_post's real positions moved by up to 8.2 on the bridge (tiny model) without a word."""
    tokens, mask = padded(base, "left")
    real = mask.bool()
    unmasked = resid_post(base, tokens, LAYER)
    assert (unmasked - resid_post(base, tokens, LAYER, attention_mask=mask))[real].abs().max() < 1e-6


@pytest.mark.parametrize("run", ["forward", "generate"])
def test_a_left_padded_run_without_a_mask_captures_the_unpadded_residuals_or_warns_at_the_users_line(base, run):
    """HookedTransformer masks a left-padded batch's pads itself; the bridge attends to them, so a capture of
    base(tokens) there read residuals off by up to 11 (tiny model) from each row's unpadded run, without a word,
    while it took the very same columns for padding. The warning, raised inside a torch hook, was filed under
    capture.py with stacklevel=2 (torch's own frame), which Python's default filter shows once per session: it
    points at the user's line that ran the model."""
    tokens, mask = padded(base, "left")
    with torch.no_grad():
        alone = torch.stack([text_resid_post(base, ids[real][None], LAYER)[-1]
                             for ids, real in zip(tokens, mask.bool(), strict=True)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with nl.capture(base, LAYER, -1) as cap:
            if run == "forward":
                base(tokens)
            else:
                base.generate(tokens, **{**GENERATE, "padding_side": None})
    said = [str(w.message) for w in caught if "attended to their pads" in str(w.message)]
    off = float((cap.vectors - alone).abs().max())
    if TL4:
        padded_rows = (mask[:, 0] == 0).nonzero().flatten().tolist()
        assert [w.filename for w in caught if "attended to their pads" in str(w.message)] == [__file__]
        assert off > 0.1 and said == [
            f"the bridge (TransformerLens 4.x) ran a left-padded batch without attention_mask=, so the real tokens of "
            f"rows {padded_rows} attended to their pads and what capture records differs from their unpadded runs. "
            "Pass the mask to the run: model(tokens, attention_mask=mask), or generate(tokens, padding_side='left')"]
    else:
        assert off < 1e-5 and said == []
    with warnings.catch_warnings(record=True) as caught:  # the same run with its mask: no word, the unpadded values
        warnings.simplefilter("always")
        with nl.capture(base, LAYER, -1) as masked:
            base(tokens, attention_mask=mask)
    assert not caught and (masked.vectors - alone).abs().max() < 1e-5

def test_a_float64_model_captures_each_rows_unpadded_residual_or_is_refused(tiny_paths):
    """TL 4.3's bridge softmaxes attention in float32, where a float64 mask's finfo.min is -inf: a left-padded
    row's pads attend to nothing and their NaN reached every real token from the next block on, so the capture of a
    padded float64 batch (and every AR batch) was NaN without a word. The bridge refuses float64 at load."""
    if TL4:
        with pytest.raises(nl.BackendError, match=r"float64 is not supported on the bridge .* Load in float32"):
            load_base(tiny_paths["av_karvonen"], dtype=torch.float64)
        return
    base64 = load_base(tiny_paths["av_karvonen"], dtype=torch.float64)
    tokens, mask = padded(base64, "left")
    with nl.capture(base64, LAYER, -1, attention_mask=mask) as cap:
        base64(tokens, attention_mask=mask)
    for row, (ids, real) in enumerate(zip(tokens, mask.bool(), strict=True)):
        alone = text_resid_post(base64, ids[real][None], LAYER)
        assert (cap.vectors[row] - alone[-1].float()).abs().max() < 1e-5

def test_hooks_removed_after_an_exception_inside_the_context(base):
    tokens, mask = padded(base, "left")

    def explode(resid, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        with nl.capture(base, LAYER, -1, attention_mask=mask):
            base.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[("blocks.3.hook_resid_post", explode)])
    assert no_hooks_left(base)
    with pytest.raises(KeyError):
        with nl.capture(base, LAYER, -1), base.hooks(fwd_hooks=[(NAME, steer_hook(1.0))]):
            raise KeyError("the user's own code failed")
    assert no_hooks_left(base)


@pytest.mark.parametrize("model", [None, "path/to/base", torch.nn.Linear(2, 2)])
def test_capture_of_something_other_than_a_tl_model_is_a_backend_error(model):
    """An NLA, an AV or a folder here ended in AttributeError: 'NLA' object has no attribute 'cfg'."""
    with pytest.raises(nl.BackendError, match="expected a TransformerLens model .* check the order of the arguments"):
        nl.capture(model, 1)


@pytest.mark.parametrize("layer", [4, -1, 1.0, "2", True, np.bool_(True), np.float64(2.0), np.int64(4)])
def test_bad_layer_is_an_input_error(base, layer):
    with pytest.raises(nl.InputError, match=r"layer must be an int indexing the model's 4 blocks \(0-3\)"):
        nl.capture(base, layer)


@pytest.mark.parametrize("positions", [99, -99, [0, 99], torch.tensor([0, 1, 99, 0])])
def test_positions_out_of_range_fail_before_the_run_when_the_shape_is_known(base, positions):
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match="outside row"):
        nl.capture(base, LAYER, positions, attention_mask=mask)


def test_positions_out_of_range_fail_inside_the_run_and_leave_no_hook(base):
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match="outside row"):
        with nl.capture(base, LAYER, tokens.shape[1]):
            base(tokens, attention_mask=mask)
    assert no_hooks_left(base)


@pytest.mark.parametrize("positions, match", [
    (0, "is padding"),
    (torch.ones(4, 3, dtype=torch.bool), "boolean positions mask must have"),
    (torch.tensor([0, 1]), r"one per row, batch=4"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integers"),
    ([], "non-empty list"),
    ("last", "positions must be"),
])
def test_bad_positions_are_input_errors(base, positions, match):
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=match):
        nl.capture(base, LAYER, positions, attention_mask=mask)


@pytest.mark.parametrize("positions", ["all", 1.5, [], [0, "1"], True])
def test_a_positions_spec_of_the_wrong_kind_fails_before_the_run_without_tokens(base, positions):
    """Without tokens or a mask only the kind can be checked before the run; it was checked inside the forward."""
    with pytest.raises(nl.InputError, match="positions must be an int, a non-empty list of ints"):
        nl.capture(base, LAYER, positions)
    assert no_hooks_left(base)


def test_mask_of_another_shape_and_an_empty_capture_are_input_errors(base):
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match="the model ran"):
        with nl.capture(base, LAYER, -1, attention_mask=mask[:, 1:]):
            base(tokens, attention_mask=mask)
    with nl.capture(base, LAYER, -1) as cap:
        base(tokens, attention_mask=mask, stop_at_layer=LAYER)
    with pytest.raises(nl.InputError, match="nothing was captured"):
        cap.vectors  # noqa: B018
    assert no_hooks_left(base)


@pytest.mark.parametrize(("wrong", "message"), [
    (lambda mask: mask.float(), "got dtype torch.float32; pass mask.long()"),
    (lambda mask: mask * 2, r"must hold only 0 and 1, got values \[0, 2\]"),
    (lambda mask: mask * 2 - 1, r"must hold only 0 and 1, got values \[-1, 1\]"),
])
def test_a_mask_that_is_not_0_1_is_refused(base, wrong, message):
    """A float mask raised TL's bare IndexError; a mask of 2s or -1s ran with positions from its cumsum."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=message):
        nl.capture(base, LAYER, -1, attention_mask=wrong(mask.long()), tokens=tokens)
    with nl.capture(base, LAYER, -1, attention_mask=mask.bool(), tokens=tokens) as cap:
        base(tokens, attention_mask=mask)
    assert len(cap.vectors) == len(tokens)


def test_a_mask_that_is_not_0_1_in_the_run_inside_a_capture_is_refused_on_both_backends(base):
    """A capture reads the mask of the run it records: on HookedTransformer a float one was TL's bare IndexError
    from the user's own call (the bridge already met the capture's check)."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=r"^attention_mask must hold 0/1 integers or booleans, got dtype "
                                            r"torch\.float32; pass mask\.long\(\)"):
        with nl.capture(base, LAYER, -1):
            base(tokens, attention_mask=mask.float())
    assert no_hooks_left(base) and "forward" not in base.__dict__


@pytest.mark.parametrize(("positions", "message"), [
    (2**70, r"^positions: position 1180591620717411303424 is outside every row \(past int64\); pick positions "),
    ([-1, -(2**64)], r"^positions: position -18446744073709551616 is outside every row"),
    (torch.tensor([1j, 1j, 1j, 1j]), r"^a positions tensor must be \[batch\] integers .* got torch\.complex64"),
])
def test_positions_past_int64_or_complex_are_input_errors(base, positions, message):
    """A position past int64 was torch's bare OverflowError; a complex tensor lost its imaginary part and read
    column 0 (here: 'position 0 of row 0 is padding', a claim about another spec)."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=message):
        nl.capture(base, LAYER, positions, attention_mask=mask)


def test_numpy_integer_positions_capture_what_python_ints_do(base):
    """`positions=np.int64(-1)` or a list of NumPy ints (an argmax, an index array's elements) were refused as not an
    int; alpha, layer= of steer_with_words and SAE feature ids took them."""
    tokens, mask = padded(base, "left")
    for numpy_positions, positions in [(np.int64(-1), -1), ([np.int32(-2), np.int64(-1)], [-2, -1]),
                                       (torch.tensor(np.int64(-1)), -1)]:
        with nl.capture(base, LAYER, numpy_positions, attention_mask=mask) as got:
            base(tokens, attention_mask=mask)
        with nl.capture(base, LAYER, positions, attention_mask=mask) as expected:
            base(tokens, attention_mask=mask)
        assert [(r.batch, r.position) for r in got.rows] == [(r.batch, r.position) for r in expected.rows]
        assert torch.equal(got.vectors, expected.vectors)
    with pytest.raises(nl.InputError, match=r"^positions: position 9223372036854775808 is outside every row"):
        nl.capture(base, LAYER, [np.uint64(2**63)], attention_mask=mask)


def test_a_numpy_integer_layer_captures_and_reads_what_its_int_does(base):
    """`layer=np.int64(2)` was refused as not an int by capture and resid_post, where positions took NumPy ints."""
    tokens, mask = padded(base, "left")
    with nl.capture(base, np.int64(LAYER), attention_mask=mask) as got:
        base(tokens, attention_mask=mask)
    with nl.capture(base, LAYER, attention_mask=mask) as expected:
        base(tokens, attention_mask=mask)
    assert type(got.layer) is int and got.hook_name == NAME
    assert torch.equal(got.vectors, expected.vectors)
    assert torch.equal(resid_post(base, tokens, np.int32(LAYER), attention_mask=mask),
                       resid_post(base, tokens, LAYER, attention_mask=mask))


@pytest.mark.parametrize("positions", [np.bool_(True), np.float64(-1.0), [np.bool_(False)], [np.float32(1.0)]])
def test_numpy_bools_and_floats_are_not_positions(base, positions):
    with pytest.raises(nl.InputError, match="positions must be an int, a non-empty list of ints"):
        nl.capture(base, LAYER, positions)


_BAD_RUN_INPUTS = {
    "float mask": (lambda t, m: (t, m.float()), r"^attention_mask must hold 0/1 integers or booleans, got dtype "
                                                r"torch\.float32; pass mask\.long\(\)"),
    "mask of 2s": (lambda t, m: (t, m * 2), r"^attention_mask must hold only 0 and 1, got values \[0, 2\]"),
    "mask of another shape": (lambda t, m: (t, m[:, 1:]), r"^tokens \[4, 9\] and attention_mask \[4, 8\] must "
                                                          r"have the same shape"),
    "1-d mask": (lambda t, m: (t, m[0]), r"^attention_mask must be \[batch, pos\], got shape \[9\]"),
    "mask as a list": (lambda t, m: (t, m.tolist()), r"^attention_mask must be a \[batch, pos\] tensor"),
    "float tokens": (lambda t, m: (t.float(), m), r"^tokens must hold integer token ids, got dtype torch\.float32"),
    "1-d tokens": (lambda t, m: (t[0], None), r"^tokens must be \[batch, pos\], got shape \[9\]"),
    "ids past the vocabulary": (lambda t, m: (t + 10**6, m), r"^tokens hold id 1000\d+, outside this model's "
                                                             r"vocabulary"),
    "no column": (lambda t, m: (t[:, :0], None), r"^tokens are empty \(shape \[4, 0\]\); pass at least one row"),
}


@pytest.mark.parametrize("case", list(_BAD_RUN_INPUTS))
@pytest.mark.parametrize("read", ["resid_post", "activation_at"])
def test_resid_post_and_activation_at_refuse_bad_tokens_and_masks(base, case, read):
    """A float mask or tokens were TL's bare IndexError, a mask of another shape its AssertionError, a mask of 2s
    ran with positions from its cumsum, an empty batch was the bridge's RuntimeError."""
    wrong, message = _BAD_RUN_INPUTS[case]
    tokens, mask = wrong(*padded(base, "left"))
    with pytest.raises(nl.InputError, match=message):
        if read == "resid_post":
            resid_post(base, tokens, LAYER, attention_mask=mask)
        else:
            activation_at(base, tokens, NAME, attention_mask=mask)
    assert no_hooks_left(base)


def test_resid_post_of_a_missing_block_and_activation_at_of_a_missing_hook_are_input_errors(base):
    """Both were TL's bare KeyError ('blocks.4.hook_resid_post')."""
    tokens, mask = padded(base, "left")
    with pytest.raises(nl.InputError, match=r"^layer must be an int indexing the model's 4 blocks \(0-3\), got 4"):
        resid_post(base, tokens, 4, attention_mask=mask)
    with pytest.raises(nl.InputError, match=r"^'blocks\.4\.hook_resid_post' is not a hook point of this model; pass "
                                            r"a name in model\.hook_dict"):
        activation_at(base, tokens, "blocks.4.hook_resid_post", attention_mask=mask)


def test_reentering_a_capture_that_is_recording_is_refused_and_leaks_no_hook(base):
    """A second `with cap:` inside the first would replace the handles, leaving a hook on the block forever."""
    tokens, mask = padded(base, "left")
    cap = nl.capture(base, LAYER, -1, attention_mask=mask)
    with pytest.raises(nl.InputError, match="already recording"):
        with cap, cap:
            base(tokens, attention_mask=mask)
    assert no_hooks_left(base) and not base._forward_pre_hooks
    with cap:  # one after the other is fine, and starts afresh
        base(tokens, attention_mask=mask)
    assert cap.n_calls == 1 and len(cap.rows) == 4


def test_captures_closed_out_of_order_leave_the_models_own_forward(base):
    """Two captures closed in the order they opened (not nested) left the first one's pass-through on the
    instance forever: `copy.deepcopy(base)` then ran the original model (an ablation on the copy did
    nothing) and `torch.save(base)` could not pickle it."""
    tokens, mask = padded(base, "right")
    first, second = nl.capture(base, 1), nl.capture(base, LAYER)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    base(tokens, attention_mask=mask)
    second.__exit__(None, None, None)
    assert "forward" not in base.__dict__ and no_hooks_left(base)
    assert second.rows[1].position == 2  # the second still read the mask while the first was gone
    twin = copy.deepcopy(base)
    with torch.no_grad():
        twin.blocks[0].attn.W_O.zero_()
        assert not torch.equal(twin(tokens), base(tokens))


def test_a_capture_says_what_it_records_and_how_much_it_has(base):
    """A notebook showed `<nla_lens.capture.Capture object at 0x...>`."""
    tokens, mask = padded(base, "left")
    cap = nl.capture(base, LAYER, -1, calls="first")
    assert repr(cap) == (f"Capture(blocks.{LAYER}.hook_resid_post, positions=-1, calls='first'): "
                         "0 vectors from 0 forward passes")
    with cap:
        base(tokens, attention_mask=mask)
        assert repr(cap).endswith(f"(recording): {len(tokens)} vectors from 1 forward pass")
        base(tokens, attention_mask=mask)
    assert repr(cap).endswith(f": {len(tokens)} vectors from 2 forward passes, the first recorded")
    every = nl.capture(base, LAYER, torch.ones_like(mask, dtype=torch.bool), calls="all")
    assert repr(every).startswith(f"Capture(blocks.{LAYER}.hook_resid_post, positions=<torch.bool tensor "
                                  f"{list(mask.shape)}>, calls='all')")


def test_a_base_moved_to_the_meta_device_is_refused_by_capture_and_the_experiments(tiny_paths, nla):
    """`base.to("meta")` keeps shapes and drops the weights: capture, steer_then_verbalize and explain raised bare
    NotImplementedError / RuntimeError from torch."""
    base = load_base(tiny_paths["av_karvonen"])
    tokens, _ = padded(base, "left")
    base.to("meta")
    refused = r"^the base model's weights \(.+\) are on the meta device, which holds no values, so it cannot run"
    with pytest.raises(nl.InputError, match=refused):
        nl.capture(base, layer=LAYER)
    with pytest.raises(nl.InputError, match=refused):
        nl.steer_then_verbalize(base, nla, tokens, steering_vector=STEER, scale=1.0, steer_layer=1)
    with pytest.raises(nl.InputError, match=refused):
        nla.explain(base, "the cat sat", max_new_tokens=2)


def test_tokens_masks_positions_and_scales_on_the_meta_device_are_refused(base, nla):
    """Meta tensors hold no values: reading their pads, ids, columns or number raised bare NotImplementedError /
    RuntimeError ('Tensor.item() cannot be called on meta tensors') in capture and the experiments."""
    tokens, mask = padded(base, "left")
    on_meta = r": on the meta device, which holds no values"
    with pytest.raises(nl.InputError, match="^tokens" + on_meta):
        nl.capture(base, layer=LAYER, tokens=tokens.to("meta"))
    with pytest.raises(nl.InputError, match="^attention_mask" + on_meta):
        nl.capture(base, layer=LAYER, attention_mask=mask.to("meta"))
    with pytest.raises(nl.InputError, match="^positions" + on_meta):
        nl.capture(base, layer=LAYER, positions=torch.ones_like(mask, dtype=torch.bool, device="meta"), tokens=tokens)
    with pytest.raises(nl.InputError, match="^corrupted_tokens" + on_meta):
        nl.patching_study(base, nla, tokens, tokens.to("meta"), patch_layer=1, patch_position=1, attention_mask=mask)
    with pytest.raises(nl.InputError, match=r"^scale=tensor\(\.\.\., device='meta', size=\(\)\): must be a finite"):
        nl.steer_then_verbalize(base, nla, tokens, steering_vector=STEER, scale=torch.tensor(1.0, device="meta"),
                                steer_layer=1, attention_mask=mask)
