"""`verbalize` equals plain-HF `generate` with the reference injection hook, token for token."""

from __future__ import annotations

import contextlib
import re
import warnings

import numpy as np
import pytest
import torch

import hf_reference as ref
import nla_lens as nl
from nla_lens.sidecar import InjectionSpec

MAX_NEW = 12


def hf_generate(folder, vectors, *, steer=None, steer_layer=2, steer_first=False, edit=None):
    """HF greedy generate with the training-time injection hook (and an optional steering hook on the
    output of decoder layer `steer_layer`, run before the injection's hook if `steer_first`; `edit(hf)`:
    one more torch-hook context)."""
    hf, tok = ref.load_hf(folder)
    meta = ref.sidecar(folder)
    ids = torch.tensor([ref.av_prompt(tok, meta)] * len(vectors))
    sites = ref.marker_sites(ids, meta["tokens"])
    if meta["kind"] == "nla_dataset":
        inject = ref.karvonen_hook(hf, sites, vectors)
    else:
        inject = ref.embedding_hook(hf, sites, vectors, meta["extraction"]["injection_scale"])
    steering = ref.layer_output_hook(hf, steer_layer, steer or (lambda h: h))
    first, second = (steering, inject) if steer_first else (inject, steering)  # torch hooks run in that order
    eos = hf.generation_config.eos_token_id
    with torch.no_grad(), first, second, edit(hf) if edit else contextlib.nullcontext():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=tok.pad_token_id)
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("which", ["av_karvonen", "av_embedding"])
def test_greedy_verbalize_equals_hf_generate_with_reference_hook(request, tiny_paths, which, vectors):
    av = request.getfixturevalue(which)
    out = av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    expected = hf_generate(tiny_paths[which], vectors)
    assert [o.tokens for o in out] == expected
    assert len({tuple(r) for r in expected}) > 1, "vectors should lead to different outputs"
    if which == "av_karvonen":  # this fixture stops some rows at EOS early: per-row stopping is exercised
        assert min(map(len, expected)) < MAX_NEW == max(map(len, expected))
    for o in out:
        assert o.text == av.tokenizer.decode(o.tokens, skip_special_tokens=True)


def test_batched_verbalize_equals_one_at_a_time(av_karvonen, vectors):
    batched = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, batch_size=4, progress=False)
    single = [av_karvonen.verbalize(v, max_new_tokens=MAX_NEW, progress=False)[0] for v in vectors]
    uneven = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, batch_size=3, progress=False)
    assert batched == single == uneven


@pytest.mark.parametrize("family", ["llama_av", "gemma_av"])
def test_a_batch_of_16_gives_each_row_its_greedy_tokens_alone_with_a_bos(bos_paths, family):
    """The families whose AV prompt starts with a BOS (Gemma through its own fast decoder): every row of a batch of
    16, decoded to the cap, gets the tokens it gets alone."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths[family])
    av.eos_token_ids = []  # no row stops early: every step of every row is compared
    vectors = 5.0 * torch.randn(16, av.meta.d_model, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # a random AV may echo the marker: not this test's point
        warnings.simplefilter("ignore", UserWarning)
        batched = av.verbalize(vectors, max_new_tokens=MAX_NEW, batch_size=16, progress=False)
        alone = [av.verbalize(v, max_new_tokens=MAX_NEW, batch_size=1, progress=False)[0] for v in vectors]
    assert batched == alone
    assert len({tuple(o.tokens) for o in batched}) > 8  # the vectors steer the rows apart


@pytest.mark.parametrize("uncovered", [False, True])  # True: a hook the fast decoder can't honour, TL's forward
def test_cached_decoding_equals_full_forwards_under_a_steering_hook(av_karvonen, vectors, uncovered):
    """Every step's logits equal those of one uncached forward over the prompt and the tokens before it, with the
    injection and a user's steering hook at a later layer (fp32; measured within 6e-6, the bound is 1e-4)."""
    model = av_karvonen.model
    steer = 4.0 * torch.randn(av_karvonen.meta.d_model, generator=torch.Generator().manual_seed(11))
    user_hooks = [("blocks.2.hook_resid_post", lambda resid, hook: resid + steer)]
    if uncovered:
        user_hooks.append(("blocks.0.attn.hook_pattern", lambda pattern, hook: None))
    tokens = av_karvonen.prompt_tokens(len(vectors))
    with model.hooks(fwd_hooks=user_hooks), torch.inference_mode():
        site_hooks = av_karvonen.injection(vectors, tokens).site_hooks()
        decoder = nl.backends.decoder(model, len(vectors), tokens.shape[1] + MAX_NEW, site_hooks)
        cached = [decoder.prefill(tokens, site_hooks)]
        for _ in range(MAX_NEW - 1):
            cached.append(decoder.step(cached[-1].argmax(dim=-1)))
        cached = torch.stack(cached, dim=1)
        full = torch.cat([tokens, cached[:, :-1].argmax(dim=-1)], dim=1)
        uncached = nl.backends.run_with_hooks(model, full, fwd_hooks=av_karvonen.injection(vectors, full).fwd_hooks())
    assert (cached - uncached[:, tokens.shape[1] - 1:]).abs().max() < 1e-4
    assert (decoder.fallback_reason is not None) == (uncovered or nl.backends.default_backend() == "bridge")


def test_user_steering_hook_is_honoured_in_prefill_and_decode(av_karvonen, tiny_paths, vectors):
    steer = 4.0 * torch.randn(av_karvonen.meta.d_model, generator=torch.Generator().manual_seed(11))
    with av_karvonen.model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", lambda r, hook: r + steer)]):
        steered = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    expected = hf_generate(tiny_paths["av_karvonen"], vectors, steer=lambda h: h + steer)
    plain = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    assert [o.tokens for o in steered] == expected
    assert [o.tokens for o in steered] != [o.tokens for o in plain]


@pytest.mark.parametrize("edit", ["ablate_head_z", "scale_mlp_post"])
def test_head_ablation_and_mlp_edits_are_honoured_on_every_backend(av_karvonen, tiny_paths, vectors, edit):
    """README's `verbalize` under `model.hooks(...)` at `attn.hook_z` / `mlp.hook_post`: HF `generate` with the
    equivalent torch hook gives the same tokens (test_fast_hooks pins the hooked fast path; this runs on both)."""
    d_head, d_mlp = av_karvonen.model.cfg.d_head, av_karvonen.model.cfg.d_mlp
    scale = 1.0 + torch.rand(d_mlp, generator=torch.Generator().manual_seed(3))

    def zero_head(z, hook):
        z[:, :, 2] = 0.0

    tl_hook, hf_edit = {
        "ablate_head_z": (("blocks.1.attn.hook_z", zero_head), lambda hf: ref.head_ablation_hook(hf, 1, 2, d_head)),
        "scale_mlp_post": (("blocks.2.mlp.hook_post", lambda a, hook: a * scale),
                           lambda hf: ref.mlp_post_hook(hf, 2, lambda a: a * scale)),
    }[edit]
    with av_karvonen.model.hooks(fwd_hooks=[tl_hook]):
        edited = [o.tokens for o in av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)]
    assert edited == hf_generate(tiny_paths["av_karvonen"], vectors, edit=hf_edit)
    assert edited != [o.tokens for o in av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)]


def test_steering_only_in_decode_steps_changes_later_tokens(av_karvonen, vectors):
    """A hook that fires on decode steps only proves user hooks stay installed after the prefill."""
    steer = 4.0 * torch.randn(av_karvonen.meta.d_model, generator=torch.Generator().manual_seed(12))

    def decode_only(resid, hook):
        return resid + steer if resid.shape[1] == 1 else resid

    plain = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    with av_karvonen.model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", decode_only)]):
        steered = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    assert [o.tokens[0] for o in steered] == [o.tokens[0] for o in plain]
    assert [o.tokens for o in steered] != [o.tokens for o in plain]


@pytest.mark.parametrize("uncovered", [False, True])  # True: a hook the fast decoder can't honour, TL's forward
def test_a_hook_left_by_run_with_hooks_steers_every_step_and_stays(av_karvonen, vectors, uncovered):
    """`run_with_hooks(..., reset_hooks_end=False)` (TL's way to keep backward hooks) leaves hooks at context
    level 1, which TL 3.x's `hooks()` removes on exit with its own: the prefill's injection context took them
    away, so the decode steps ran unsteered and the user's hooks were gone."""
    model = av_karvonen.model
    steer = 4.0 * torch.randn(av_karvonen.meta.d_model, generator=torch.Generator().manual_seed(13))
    fwd_hooks = [("blocks.2.hook_resid_post", lambda resid, hook: resid + steer)]
    if uncovered:
        fwd_hooks.append(("blocks.0.attn.hook_pattern", lambda pattern, hook: None))
    with model.hooks(fwd_hooks=fwd_hooks):
        expected = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    try:
        model.run_with_hooks(av_karvonen.prompt_tokens(1), fwd_hooks=fwd_hooks, reset_hooks_end=False)
        assert av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False) == expected
        assert [len(model.hook_dict[name].fwd_hooks) for name, _ in fwd_hooks] == [1] * len(fwd_hooks)
    finally:
        model.reset_hooks()
    assert expected != av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)


def test_hooks_on_the_final_norm_and_unembed_see_every_prompt_position(av_karvonen, vectors):
    """As under TL's forward (and the bridge's): the hooked backend's prefill ran the final norm and the unembed on
    the last position only, so such a hook saw `[n, 1, ...]` there and a position-indexed one failed or hit the
    wrong position."""
    points = ("ln_final.hook_normalized", "unembed.hook_out")
    widths: dict[str, list[int]] = {point: [] for point in points}
    hooks = [(point, lambda x, hook, point=point: widths[point].append(x.shape[1])) for point in points]
    with av_karvonen.model.hooks(fwd_hooks=hooks):
        out = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    prompt, forwards = av_karvonen.prompt_tokens(1).shape[1], max(len(o.tokens) for o in out)
    assert widths == {point: [prompt] + [1] * (forwards - 1) for point in points}
    assert out == av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)


def test_seeded_sampling_is_reproducible_and_temperature_zero_is_greedy(av_karvonen, vectors):
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.0, progress=False)
    first = av_karvonen.verbalize(vectors, seed=3, **kwargs)
    again = av_karvonen.verbalize(vectors, seed=3, **kwargs)
    other = av_karvonen.verbalize(vectors, seed=4, **kwargs)
    greedy = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    assert first == again
    assert first != other
    assert first != greedy
    # top_p this small keeps only the most likely token: sampling collapses to greedy.
    assert av_karvonen.verbalize(vectors, seed=5, top_p=1e-9, **{**kwargs, "temperature": 0.7}) == greedy
    # So does a temperature so small that logits / temperature overflows float32 (it gave NaN probabilities).
    assert av_karvonen.verbalize(vectors, seed=5, **{**kwargs, "temperature": 1e-38}) == greedy
    # And one below float32's smallest number, which is 0 there (0 / 0: NaN, a RuntimeError in multinomial).
    assert av_karvonen.verbalize(vectors, seed=5, **{**kwargs, "temperature": 1e-46}) == greedy


def test_a_numpy_seed_samples_as_its_int_and_a_seed_past_64_bits_is_an_input_error(av_karvonen, vectors):
    """check_sampling took a NumPy integer seed, then torch's manual_seed raised a bare TypeError; a seed past
    64 bits got torch's bare ValueError ('Overflow when unpacking long long')."""
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.0, progress=False)
    as_int = av_karvonen.verbalize(vectors, seed=3, **kwargs)
    assert av_karvonen.verbalize(vectors, seed=np.int64(3), **kwargs) == as_int
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(nl.InputError, match=rf"seed={seed} is outside the 64-bit range"):
            av_karvonen.verbalize(vectors, seed=seed, **kwargs)


def test_numpy_integer_counts_decode_as_their_ints_and_numpy_bools_and_floats_are_refused(av_karvonen, vectors):
    """check_sampling took a NumPy seed but refused max_new_tokens=np.int64(12) and batch_size=np.int32(2) as not
    whole numbers."""
    as_ints = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, batch_size=2, progress=False)
    assert av_karvonen.verbalize(vectors, max_new_tokens=np.int64(MAX_NEW), batch_size=np.int32(2),
                                 progress=False) == as_ints
    for wrong in (np.bool_(True), np.float64(2.0)):
        shown = re.escape(repr(wrong))
        with pytest.raises(nl.InputError, match=rf"^max_new_tokens={shown} must be a whole number >= 1; "
                                                rf"batch_size={shown} must be a whole number >= 1$"):
            av_karvonen.verbalize(vectors, max_new_tokens=wrong, batch_size=wrong, progress=False)


def test_explanations_are_parsed_from_tags():
    from nla_lens.parsing import parse_explanation

    assert parse_explanation("<explanation>\n a cat \n</explanation><|im_end|>") == "a cat"
    assert parse_explanation("<think>\n\n</think><explanation>x</explanation> <explanation>y</explanation>") == "x"
    assert parse_explanation("<explanation> never closed") is None
    assert parse_explanation("no tags") is None


def test_an_explanation_of_several_lines_is_parsed_whole():
    """The parse reads across newlines (re.DOTALL): without it an explanation of two lines would fail to parse."""
    from nla_lens.parsing import parse_explanation

    text = "<explanation>\nThe cat sat on the mat.\nThen it slept.\n</explanation><|im_end|>"
    assert parse_explanation(text) == "The cat sat on the mat.\nThen it slept."


def test_the_cjk_share_is_of_the_visible_characters():
    """Whitespace does not dilute the share: an output of two CJK characters and one Latin letter over blank lines
    is 2/3 CJK, and flagged, however many newlines it holds."""
    from nla_lens.parsing import cjk_fraction, looks_like_failed_injection

    text = "中文 a\n\n\n\n\n\n\n\n"
    assert cjk_fraction(text) == pytest.approx(2 / 3, abs=1e-12)
    assert looks_like_failed_injection(text, "㈎")


def test_kana_and_hangul_count_as_cjk():
    """The CJK share takes in Japanese kana (U+3040-U+30FF) and Korean Hangul syllables (U+AC00-U+D7AF) besides the
    Chinese ideographs."""
    from nla_lens.parsing import cjk_fraction, looks_like_failed_injection

    for text in ("ひらがな カタカナ", "한국어 문장"):
        assert cjk_fraction(text) == 1.0
        assert looks_like_failed_injection(text, "㈎")
    assert cjk_fraction("a cat, 3 dogs") == 0.0


def test_failed_injection_is_flagged():
    from nla_lens.parsing import injection_warning, looks_like_failed_injection

    assert looks_like_failed_injection("这是一个中文的输出文本", "㈎")
    assert looks_like_failed_injection("<explanation>㈎㈎</explanation>", "㈎")
    assert not looks_like_failed_injection("<explanation>\nThe cat sat.\n</explanation>", "㈎")
    assert injection_warning(["fine text", "中文中文中文"], "㈎").startswith("1/2 AV outputs")
    assert injection_warning(["fine text"], "㈎") is None


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.empty(0, 64), "no vectors"),
        (torch.randn(4, 63), r"shape \[n, 64\]"),
        (torch.randn(2, 3, 64), r"shape \[n, 64\]"),
        (torch.ones(4, 64, dtype=torch.long), "floating point"),
        (torch.randn(4, 64).to(torch.float8_e5m2), r"float8_e5m2, in which torch cannot test for NaN"),
        (torch.randn(4, 64).to_sparse(), "dense tensor"),
        (torch.tensor([[float("nan")] * 64]), "NaN or Inf"),
        (torch.tensor([[float("inf")] + [0.0] * 63]), "NaN or Inf"),
        (torch.zeros(2, 64), "zero"),
        (torch.randn(2, 64, device="meta"), "device"),
        ([[0.0] * 64], "torch.Tensor"),
    ],
)
def test_bad_vectors_raise_vector_error(av_karvonen, bad, match):
    with pytest.raises(nl.VectorError, match=match):
        av_karvonen.verbalize(bad, max_new_tokens=2, progress=False)


def test_a_vector_with_zero_entries_is_a_direction_not_a_zero_vector(av_karvonen):
    """Only a row of zeros has no direction to inject: a basis vector (one neuron's direction, zero elsewhere) is
    injected as it is, and beside it only the all-zero row is named."""
    basis = torch.eye(64)[:2]
    assert torch.equal(av_karvonen.injection(basis).vectors, basis)
    with pytest.raises(nl.VectorError, match=r"^vectors at rows \[1\] are zero"):
        av_karvonen.injection(torch.stack([basis[0], torch.zeros(64)]))


@pytest.mark.parametrize("power", [1000, -1000])
def test_verbalize_reads_float64_vectors_past_float32s_range_as_their_direction(av_karvonen, av_embedding, vectors,
                                                                                 power):
    """The AV takes float64 rows as they are (each is scaled to a largest entry near 1 in float64 before the
    injection's float32 or model-dtype arithmetic, exactly): a row past float32's range says what its direction
    says, bit for bit here (a power of two apart), where `round_trip`, which computes in float32, refuses it."""
    wide = vectors.double() * 2.0 ** power  # ~1e301 or ~1e-301
    for av in (av_karvonen, av_embedding):
        said = av.verbalize(wide, max_new_tokens=6, progress=False)
        assert [v.tokens for v in said] == [v.tokens for v in av.verbalize(vectors, max_new_tokens=6,
                                                                           progress=False)]


@pytest.mark.parametrize(
    ("bad", "fix"),
    [
        (np.ones((2, 64), dtype=np.float32), "torch.as_tensor(vectors, dtype=torch.float32)"),
        ([torch.randn(64), torch.randn(64)], "torch.stack(vectors)"),
        ("vectors.safetensors", "safetensors.torch.load_file(path)['vectors']"),
        ({"vectors": torch.randn(2, 64)}, "loaded['vectors']"),
    ],
)
def test_a_non_tensor_is_told_how_to_become_one(av_karvonen, bad, fix):
    """A NumPy array, a list of rows, a file name or a loaded safetensors dict got only "must be a torch.Tensor"."""
    with pytest.raises(nl.VectorError, match="must be a torch.Tensor") as raised:
        av_karvonen.verbalize(bad, max_new_tokens=2, progress=False)
    assert fix in str(raised.value)


def test_bad_generation_settings_raise_input_error(av_karvonen, vectors):
    for kwargs in ({"temperature": -1.0}, {"temperature": float("inf")}, {"temperature": float("nan")},
                   {"top_p": 0.0}, {"max_new_tokens": 0}, {"batch_size": 0}):
        with pytest.raises(nl.InputError):
            av_karvonen.verbalize(vectors, progress=False, **kwargs)


def test_max_new_tokens_past_the_context_is_refused_up_front(av_karvonen, vectors, monkeypatch):
    """An AV that never stops uses prompt + max_new_tokens - 1 positions (the last token is not fed back)."""
    monkeypatch.setattr(av_karvonen, "eos_token_ids", [av_karvonen.model.cfg.d_vocab + 1])  # never sampled
    longest = av_karvonen.model.cfg.n_ctx - av_karvonen.prompt_tokens(1).shape[1] + 1
    with warnings.catch_warnings():  # a random AV babbling that long may echo the marker: not this test's point
        warnings.simplefilter("ignore", UserWarning)
        assert len(av_karvonen.verbalize(vectors[:1], max_new_tokens=longest)[0].tokens) == longest
    if nl.backends.default_backend() == "hooked":  # the cache never holds the last token: it fits the rotary tables
        assert av_karvonen.fallback_reason is None
    with pytest.raises(nl.PromptTooLongError, match=rf"max_new_tokens={longest + 1} .* <= {longest}"):
        av_karvonen.verbalize(vectors[:1], max_new_tokens=longest + 1)


def test_a_hook_point_given_beside_an_injection_spec_is_honoured(tiny_paths):
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], injection=InjectionSpec.of("karvonen"),
                                                 hook_point="blocks.3.hook_resid_post")
    assert av.injection_spec == InjectionSpec("karvonen", "blocks.3.hook_resid_post")


@pytest.mark.parametrize("installed", ["hooks_context", "perma_hook"])
def test_a_user_hook_at_the_injection_site_runs_before_the_injection(av_karvonen, tiny_paths, vectors, installed):
    """TL runs a point's hooks in the order they were added and `verbalize` adds the injection last, so
    steering at the injection site changes the ||h|| that the Karvonen add scales by; a permanent hook too."""
    assert av_karvonen.injection_spec.hook_point == "blocks.1.hook_resid_post"
    steer = 3.0 * torch.randn(av_karvonen.meta.d_model, generator=torch.Generator().manual_seed(1))
    steering = ("blocks.1.hook_resid_post", lambda r, hook: r + steer)
    if installed == "perma_hook":
        av_karvonen.model.add_perma_hook(*steering)
        try:
            out = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
        finally:
            av_karvonen.model.reset_hooks(including_permanent=True)
    else:
        with av_karvonen.model.hooks(fwd_hooks=[steering]):
            out = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    kwargs = dict(steer=lambda h: h + steer, steer_layer=1)
    steered_first = hf_generate(tiny_paths["av_karvonen"], vectors, steer_first=True, **kwargs)
    assert [o.tokens for o in out] == steered_first
    assert steered_first != hf_generate(tiny_paths["av_karvonen"], vectors, steer_first=False, **kwargs)


@pytest.mark.parametrize("n", [-1, 0, 2.0, True])
def test_prompt_tokens_refuses_a_count_that_is_not_a_whole_number_above_zero(av_karvonen, n):
    """`n` copies: n=-1 gave one copy (expand(-1) keeps the size), 0 an empty batch, 2.0 a bare TypeError."""
    with pytest.raises(nl.InputError, match="n="):
        av_karvonen.prompt_tokens(n)
    assert av_karvonen.prompt_tokens(3).shape[0] == av_karvonen.prompt_tokens(np.int64(3)).shape[0] == 3


def test_prompt_tokens_given_the_vectors_asks_for_their_count_without_printing_them(av_karvonen, vectors):
    """`av.prompt_tokens(vectors)` printed every entry of the vectors as `n=tensor([[...`."""
    with pytest.raises(nl.InputError, match=r"^prompt_tokens\(n\) takes the number of prompts, got a tensor of "
                                            r"shape \[4, 64\]: pass len\(vectors\)$"):
        av_karvonen.prompt_tokens(vectors)
    with pytest.raises(nl.InputError, match=r"^n=tensor\(3\)"):  # a 0-d tensor is no int either, but short
        av_karvonen.prompt_tokens(torch.tensor(3))


def test_a_half_cast_that_left_cfg_dtype_stale_is_a_typed_error_naming_the_fix(tiny_paths, vectors):
    """`.half()` changes a HookedTransformer's weights but not its cfg.dtype, in which the KV caches are made:
    verbalize failed with torch's bare "expected scalar type Float but found Half"."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"])
    if nl.backends.backend_of(av.model) != "hooked":
        pytest.skip("the bridge decodes in the weights' dtype: .half() runs there")
    av.model.half()
    with pytest.raises(nl.InputError, match=r"AV model's weights are float16 but its cfg.dtype is float32.*"
                                            r"model.to\(torch.float16\)"):
        av.verbalize(vectors, max_new_tokens=4)
    assert not av.model.hook_dict["blocks.1.hook_resid_post"].fwd_hooks
    av.model.to(torch.float16)  # the fix the message gives
    assert len(av.verbalize(vectors, max_new_tokens=4)) == len(vectors)


def test_verbalize_keeps_its_failed_injection_warning_where_a_notebook_and_a_saved_file_show_it(
        av_karvonen, vectors, monkeypatch, tmp_path):
    """It was only emitted: the repr, the view and a saved .parquet of the explanations said nothing of it."""
    echo = av_karvonen.tokenizer.encode(av_karvonen.meta.injection_char * 4, add_special_tokens=False)
    monkeypatch.setattr(av_karvonen, "_generate", lambda batch, *_: [echo] * len(batch))
    with pytest.warns(UserWarning, match="injection probably failed") as emitted:
        out = av_karvonen.verbalize(vectors[:3])
    assert out.warnings == [str(w.message) for w in emitted] and len(out.warnings) == 1
    assert repr(out).splitlines()[0] == f"Verbalizations: {out.summary()}; 1 warning (.warnings)"
    assert "1 warning (.warnings)" in out._repr_html_()
    for derived in (out[1:], out.copy(), out + [], [] + out, out * 2):
        assert derived.warnings == out.warnings
    assert (out + out).warnings == out.warnings  # once, not twice
    gathered = nl.Verbalizations()
    gathered += out  # batches collected in a loop
    assert gathered.warnings == out.warnings and len(gathered) == len(out)
    extended = nl.Verbalizations()
    extended.extend(out)
    assert extended.warnings == out.warnings and len(extended) == len(out)
    assert nl.read_result(out.save(tmp_path / "said.parquet")).attrs["warnings"] == out.warnings
    held = nl.DirectionVerbalization(vectors[:3], out)  # as verbalize_direction returns it
    assert repr(held).splitlines()[0].endswith("; 1 warning (.verbalizations.warnings)")
    said = av_karvonen.tokenizer.encode("<explanation>\nthe cat\n</explanation>", add_special_tokens=False)
    monkeypatch.setattr(av_karvonen, "_generate", lambda batch, *_: [said] * len(batch))
    fine = av_karvonen.verbalize(vectors[:2])
    assert fine.warnings == [] and "warning" not in repr(fine)


def test_rows_sharing_draws_sample_equal_vectors_alike_whatever_the_batch_size(av_karvonen, vectors):
    """`draws_of`: common random numbers for paired rows. Without it each row draws its own numbers, so a vector
    repeated in one call is sampled otherwise each time (measured: all four pairs differ)."""
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.0, seed=0, progress=False)
    twice = torch.cat([vectors, vectors])
    paired = av_karvonen.verbalize(twice, draws_of=[0, 1, 2, 3] * 2, **kwargs)
    assert paired[:4] == paired[4:] and len({v.text for v in paired}) == 4
    assert av_karvonen.verbalize(twice, draws_of=torch.arange(4).repeat(2), batch_size=2, **kwargs) == paired
    own = av_karvonen.verbalize(twice, **kwargs)
    assert all(own[i] != own[i + 4] for i in range(4))
    assert av_karvonen.verbalize(twice, draws_of=range(8), **kwargs) != paired
    greedy = av_karvonen.verbalize(twice, max_new_tokens=MAX_NEW, progress=False)
    assert av_karvonen.verbalize(twice, draws_of=[0] * 8, max_new_tokens=MAX_NEW, progress=False) == greedy


@pytest.mark.parametrize(("draws_of", "match"), [
    ([0, 1, 2], r"^draws_of has 3 entries for 4 vectors: give one row index per vector$"),
    ([0, 1, 4, -1], r"^draws_of holds \[4, -1\], outside the rows 0\.\.3: each entry names the row"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), r"^draws_of must hold one row index \(a whole number\) per vector"),
    ([0, 1, True, 3], r"^draws_of must hold one row index"),
    (3, r"^draws_of must hold one row index .*got int 3$"),
])
def test_draws_of_other_than_one_row_index_per_vector_is_an_input_error(av_karvonen, vectors, draws_of, match):
    with pytest.raises(nl.InputError, match=match):
        av_karvonen.verbalize(vectors, draws_of=draws_of, max_new_tokens=2, progress=False)


def test_inverse_cdf_sampling_follows_the_distribution_and_never_picks_a_token_cut_by_top_p():
    from nla_lens.verbalizer import _sample_inverse_cdf

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    grid = (torch.arange(1000) + 0.5) / 1000  # evenly spread draws: each token's share is its probability
    picks = torch.cat([_sample_inverse_cdf(logits, 1.0, 1.0, u[None]) for u in grid])
    assert torch.bincount(picks, minlength=4).tolist() == [100, 200, 300, 400]
    # top_p 0.6 keeps tokens 3 and 2 (mass 0.7); a draw of 1.0 (u * mass rounds to the mass) still takes token 3
    cut = torch.cat([_sample_inverse_cdf(logits, 1.0, 0.6, u[None]) for u in [*grid, torch.tensor(1.0)]])
    assert set(cut.tolist()) == {2, 3} and cut[-1] == 3
    assert torch.bincount(cut[:-1], minlength=4).tolist() == [0, 0, 429, 571]  # 0.3 / 0.7 and 0.4 / 0.7 of 1000


def test_an_av_moved_to_the_meta_device_is_refused(tiny_paths, vectors):
    """`av.model.to("meta")` keeps shapes and drops the weights; verbalize (with a seed: its generator) and injection
    raised bare RuntimeError / NotImplementedError from torch."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"])
    av.model.to("meta")
    refused = r"^the AV model's weights \(.+\) are on the meta device, which holds no values, so it cannot run"
    with pytest.raises(nl.InputError, match=refused):
        av.verbalize(vectors, max_new_tokens=2, temperature=1.0, seed=0)
    with pytest.raises(nl.InputError, match=refused):
        av.injection(vectors)
