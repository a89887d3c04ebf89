"""AV forward passes with nla_lens's TL hooks equal plain HF with plain torch hooks (fp32, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_reference as ref
import nla_lens as nl

ATOL = 1e-5


def _no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("which", ["av_karvonen", "av_embedding"])
def test_injection_matches_hf_reference(request, tiny_paths, which, vectors):
    av = request.getfixturevalue(which)
    tokens = av.prompt_tokens(len(vectors))
    logits = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(vectors, tokens).fwd_hooks())

    hf, _ = ref.load_hf(tiny_paths[which])
    meta = ref.sidecar(tiny_paths[which])
    sites = ref.marker_sites(tokens, meta["tokens"])
    if which == "av_karvonen":
        hook = ref.karvonen_hook(hf, sites, vectors)
    else:
        hook = ref.embedding_hook(hf, sites, vectors, meta["extraction"]["injection_scale"])
    with torch.no_grad(), hook:
        expected = hf(tokens).logits
    with torch.no_grad():
        plain = hf(tokens).logits
    assert (logits - expected).abs().max() < ATOL
    # The check has teeth: the injection moves the logits far more than the tolerance.
    assert (expected - plain).abs().max() > 1e-2


def test_karvonen_matches_hf_layer1_hook_on_left_padded_batch(av_karvonen, tiny_paths, vectors):
    tok = av_karvonen.tokenizer
    marker = av_karvonen.meta.injection_char
    prefixes = ["", "the cat ", "a dog ran in the park and ", "sea "]
    rows = [tok.apply_chat_template([{"role": "user", "content": f"{p}<c>{marker}</c>"}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False)
            for p in prefixes]
    width = max(map(len, rows))
    assert len({len(r) for r in rows}) == 4
    tokens = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

    inj = av_karvonen.injection(vectors, tokens)
    logits = av_karvonen.model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=inj.fwd_hooks())

    hf, _ = ref.load_hf(tiny_paths["av_karvonen"])
    sites = ref.marker_sites(tokens, ref.sidecar(tiny_paths["av_karvonen"])["tokens"])
    with torch.no_grad(), ref.karvonen_hook(hf, sites, vectors):
        # Positions count real tokens only, as HF generate does for left-padded batches.
        expected = hf(tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max() < ATOL


def test_injection_composes_with_user_ablation_and_steering_in_one_run(av_karvonen, tiny_paths, vectors):
    steer = torch.randn(av_karvonen.meta.d_model, generator=torch.Generator().manual_seed(7))
    head_dim = av_karvonen.model.cfg.d_head

    def ablate_head_1(z, hook):
        z[:, :, 1] = 0.0
        return z

    def add_steer(resid, hook):
        return resid + 2.0 * steer

    tokens = av_karvonen.prompt_tokens(len(vectors))
    inj = av_karvonen.injection(vectors, tokens)
    logits = av_karvonen.model.run_with_hooks(tokens, fwd_hooks=[
        *inj.fwd_hooks(), ("blocks.3.attn.hook_z", ablate_head_1), ("blocks.2.hook_resid_post", add_steer)])

    hf, _ = ref.load_hf(tiny_paths["av_karvonen"])
    sites = ref.marker_sites(tokens, ref.sidecar(tiny_paths["av_karvonen"])["tokens"])
    with (torch.no_grad(), ref.karvonen_hook(hf, sites, vectors),
          ref.head_ablation_hook(hf, 3, 1, head_dim), ref.layer_output_hook(hf, 2, lambda h: h + 2.0 * steer)):
        expected = hf(tokens).logits
    with torch.no_grad(), ref.karvonen_hook(hf, sites, vectors):
        injection_only = hf(tokens).logits
    assert (logits - expected).abs().max() < ATOL
    assert (expected - injection_only).abs().max() > 1e-2
    assert _no_hooks_left(av_karvonen.model)


def test_run_with_cache_under_the_injection_and_the_next_hook_point_show_the_injected_residual(
        av_karvonen, tiny_paths, vectors):
    """What the README tells a researcher who wants the injected residual: `run_with_cache` inside
    `model.hooks(fwd_hooks=inj.fwd_hooks())` caches it at the injection's point and at the next one
    (`blocks.2.hook_resid_pre`), as HF's hidden state after layer 1 under the reference hook holds it."""
    tokens = av_karvonen.prompt_tokens(len(vectors))
    with av_karvonen.model.hooks(fwd_hooks=av_karvonen.injection(vectors, tokens).fwd_hooks()):
        _, cache = av_karvonen.model.run_with_cache(tokens)
    assert _no_hooks_left(av_karvonen.model)
    hf, _ = ref.load_hf(tiny_paths["av_karvonen"])
    sites = ref.marker_sites(tokens, ref.sidecar(tiny_paths["av_karvonen"])["tokens"])
    with torch.no_grad(), ref.karvonen_hook(hf, sites, vectors):
        injected = hf(tokens, output_hidden_states=True).hidden_states[2]
    with torch.no_grad():
        plain = hf(tokens, output_hidden_states=True).hidden_states[2]
    for name in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"):
        assert (cache[name] - injected).abs().max() < ATOL
    assert (injected - plain).abs().max() > 1e-2


def test_any_hook_point_can_be_chosen(tiny_paths, vectors):
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], hook_point="blocks.0.hook_resid_post")
    tokens = av.prompt_tokens(len(vectors))
    logits = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(vectors, tokens).fwd_hooks())
    hf, _ = ref.load_hf(tiny_paths["av_karvonen"])
    sites = ref.marker_sites(tokens, ref.sidecar(tiny_paths["av_karvonen"])["tokens"])
    with torch.no_grad(), ref.karvonen_hook(hf, sites, vectors, layer_module=hf.model.layers[0]):
        expected = hf(tokens).logits
    assert (logits - expected).abs().max() < ATOL


def test_hooks_never_leak_after_an_exception(av_karvonen, vectors):
    def explode(act, hook):
        raise RuntimeError("user hook failed")

    tokens = av_karvonen.prompt_tokens(len(vectors))
    inj = av_karvonen.injection(vectors, tokens)
    with pytest.raises(RuntimeError, match="user hook failed"):
        av_karvonen.model.run_with_hooks(tokens, fwd_hooks=[*inj.fwd_hooks(), ("blocks.3.hook_resid_post", explode)])
    assert _no_hooks_left(av_karvonen.model)
    with pytest.raises(RuntimeError, match="user hook failed"):
        with av_karvonen.model.hooks(fwd_hooks=[("blocks.3.hook_resid_post", explode)]):
            av_karvonen.verbalize(vectors, max_new_tokens=3, progress=False)
    assert _no_hooks_left(av_karvonen.model)


@pytest.mark.parametrize("at_call", [1, 3], ids=["prefill", "decode_step"])
def test_a_keyboard_interrupt_mid_generation_leaves_no_hook_and_no_state(av_karvonen, vectors, at_call):
    """Ctrl-C inside a user hook, in the prefill (the injection installed) or a decode step: the user's context and
    `verbalize`'s own remove every hook, and the next call decodes as if nothing had happened."""
    plain = av_karvonen.verbalize(vectors, max_new_tokens=4, progress=False)
    calls = []

    def interrupt(resid, hook):
        calls.append(resid.shape[1])
        if len(calls) == at_call:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), av_karvonen.model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", interrupt)]):
        av_karvonen.verbalize(vectors, max_new_tokens=4, progress=False)
    assert calls[-1] == (av_karvonen.prompt_tokens(1).shape[1] if at_call == 1 else 1)
    assert _no_hooks_left(av_karvonen.model)
    assert av_karvonen.verbalize(vectors, max_new_tokens=4, progress=False) == plain


def test_a_hook_that_removes_the_injection_before_it_fires_is_an_injection_error(av_karvonen, vectors):
    """`model.reset_hooks()` inside a hook of the user's that fires before the injection's point took the prefill's
    injection with it: every vector was explained as the bare prompt, with no warning. After that point the injection
    has run, and the call reads the vectors as usual."""
    model = av_karvonen.model
    plain = av_karvonen.verbalize(vectors, max_new_tokens=4, progress=False)

    def reset(activation, hook):
        model.reset_hooks()

    removed = pytest.raises(nl.InjectionError, match=r"injection at blocks.1.hook_resid_post never ran in the "
                                                     r"prefill.*reset_hooks\(\)")
    with removed, model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", reset)]):
        av_karvonen.verbalize(vectors, max_new_tokens=4, progress=False)
    assert _no_hooks_left(model)
    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", reset)]):
        assert av_karvonen.verbalize(vectors, max_new_tokens=4, progress=False) == plain
    assert av_karvonen.verbalize(vectors, max_new_tokens=4, progress=False) == plain


@pytest.mark.parametrize("how", ["hooks_context", "run_with_hooks_left", "perma_hook", "karvonen_at_hook_embed"])
def test_verbalize_refuses_an_injection_left_attached_to_the_av(tiny_paths, vectors, how):
    """An injection of the user's still attached when `verbalize` adds its own went in twice (a Karvonen add at the
    marker twice over), silently: other explanations than the vectors' own. Refused up front, on every way a hook
    stays attached; with it removed the call reads the vectors as usual."""
    hook_point = "hook_embed" if how == "karvonen_at_hook_embed" else None
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], hook_point=hook_point)
    model = av.model
    plain = av.verbalize(vectors, max_new_tokens=4, progress=False)
    tokens = av.prompt_tokens(len(vectors))
    injection = av.injection(vectors, tokens)
    refused = pytest.raises(nl.InjectionError, match=r"an injection is attached to the AV at .*injected twice")
    if how in ("hooks_context", "karvonen_at_hook_embed"):
        with refused, model.hooks(fwd_hooks=injection.fwd_hooks()):
            av.verbalize(vectors, max_new_tokens=4, progress=False)
    else:
        if how == "run_with_hooks_left":
            model.run_with_hooks(tokens, fwd_hooks=injection.fwd_hooks(), reset_hooks_end=False)
        else:
            model.add_perma_hook(*injection.site_hooks()[0])
        with refused:
            av.verbalize(vectors, max_new_tokens=4, progress=False)
        model.reset_hooks(including_permanent=True)
    assert _no_hooks_left(model)
    assert av.verbalize(vectors, max_new_tokens=4, progress=False) == plain


def test_an_injection_run_on_a_model_of_another_width_says_another_models_av_built_it(av_karvonen, vectors):
    """The message pointed at residual-stream hook points, naming the very point the injection was at."""
    tokens = av_karvonen.prompt_tokens(len(vectors))
    narrow = dataclasses.replace(av_karvonen.injection(vectors, tokens), vectors=vectors[:, :32])
    with pytest.raises(nl.InjectionError, match=r"^blocks.1.hook_resid_post carries activations of d_model 64, "
                                                r"but this injection's vectors have d_model 32: another model's AV"):
        av_karvonen.model.run_with_hooks(tokens, fwd_hooks=narrow.fwd_hooks())
    assert _no_hooks_left(av_karvonen.model)


def test_injection_refuses_tokens_it_was_not_built_for(av_karvonen, vectors):
    inj = av_karvonen.injection(vectors)
    other = av_karvonen.prompt_tokens(len(vectors) + 1)
    with pytest.raises(nl.InjectionError, match="built for tokens of shape"):
        av_karvonen.model.run_with_hooks(other, fwd_hooks=inj.fwd_hooks())
    assert _no_hooks_left(av_karvonen.model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_karvonen_add_matches_the_reference_bits_and_survives_extreme_norms(dtype):
    """The reference casts v to the residual's dtype, then normalises; a power-of-two prescale keeps
    its bits while a norm past fp16's range (or entries below it) still gives v's direction."""
    from nla_lens.injection import karvonen_add

    g = torch.Generator().manual_seed(0)
    resid = (3 * torch.randn(5, 64, generator=g)).to(dtype)
    v = 7.3 * torch.randn(5, 64, generator=g)
    cast = v.to(dtype)
    reference = resid + resid.norm(dim=-1, keepdim=True) * (cast / cast.norm(dim=-1, keepdim=True))
    assert torch.equal(karvonen_add(resid, v), reference)
    for scale in (2.0**20, 2.0**-40):  # ||v|| ~ 6e7 overflows fp16; entries ~ 7e-12 vanish in it
        assert torch.equal(karvonen_add(resid, v * scale), reference)


def _karvonen_reference(resid: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """h + ||h|| v / ||v||, written out as the reference forward hook computes it."""
    return resid + resid.norm(dim=-1, keepdim=True) * (vectors / vectors.norm(dim=-1, keepdim=True))


def test_a_one_position_run_skips_the_write_only_as_a_decode_step_of_a_longer_prompt():
    """A one-position run under an injection built for longer rows is a KV-cached decode step after the
    prefill that injected: nothing to write. An injection built for one-position rows writes there, since that
    run is its whole prompt."""
    from nla_lens.injection import Injection
    from nla_lens.sidecar import InjectionSpec

    g = torch.Generator().manual_seed(1)
    vectors, resid = torch.randn(1, 64, generator=g), torch.randn(1, 1, 64, generator=g)
    site = (torch.tensor([0]), torch.tensor([0]))
    one = Injection(InjectionSpec.of("karvonen"), vectors, *site, (1, 1))
    assert torch.equal(one.hook(resid, None), _karvonen_reference(resid, vectors[:, None]))
    longer = Injection(InjectionSpec.of("karvonen"), vectors, *site, (1, 5))
    assert longer.hook(resid, None) is None


def test_block_0s_karvonen_add_skips_only_when_hook_embed_added_in_the_same_forward():
    """The `fwd_hooks()` pair of a Karvonen add at `hook_embed`. After a forward that added at `hook_embed` (block 0
    then adds nothing), a forward that never fires `hook_embed` (TL 3.x's `generate`) and reaches block 0's input
    with other rows there than the last forward's (a hook of yours ahead of the injection at block 0's input, or
    weights a training step changed) still gets the vectors: the rows `hook_embed` saw are compared once, then
    forgotten. Had they been kept, that forward would have run without its vectors, silently."""
    from nla_lens.injection import Injection
    from nla_lens.sidecar import InjectionSpec

    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(2, 64, generator=g)
    rows, positions = torch.tensor([0, 1]), torch.tensor([3, 2])
    injection = Injection(InjectionSpec.of("karvonen", "hook_embed"), vectors, rows, positions, (2, 5),
                          embed_is_block_input=True)
    (_, at_embed), (_, at_block_0) = injection.fwd_hooks()
    embed = torch.randn(2, 5, 64, generator=g)
    added = at_embed(embed, None)
    assert at_block_0(added, None) is None  # added once, at hook_embed
    steered = embed + 0.5  # the next forward: hook_embed skipped, block 0's input steered first
    expected = steered.clone()
    expected[rows, positions] = _karvonen_reference(steered[rows, positions], vectors)
    assert torch.equal(at_block_0(steered, None), expected)


def test_an_injection_at_a_hook_point_that_is_not_the_residual_is_refused(tiny_paths, vectors):
    for hook_point in ("blocks.1.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern"):
        av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], hook_point=hook_point)
        with pytest.raises(nl.InjectionError, match=f"{hook_point} carries activations of shape.*residual-stream"):
            av.verbalize(vectors, max_new_tokens=2, progress=False)
        assert _no_hooks_left(av.model)


def test_an_injection_where_tl_computes_only_on_request_is_refused_until_switched_on(tiny_paths, vectors):
    """TL computes blocks.L.hook_mlp_in only after set_use_hook_mlp_in(True), and nla_lens's decoders attach
    hooks past TL's add_hook check: the injection went nowhere, and every vector gave the bare prompt's text."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], hook_point="blocks.1.hook_mlp_in")
    with pytest.raises(nl.InjectionError, match=r"^blocks.1.hook_mlp_in would not fire.*"
                                                r"av.model.set_use_hook_mlp_in\(True\) first"):
        av.verbalize(vectors, max_new_tokens=2, progress=False)
    assert _no_hooks_left(av.model)
    av.model.set_use_hook_mlp_in(True)
    tokens = av.prompt_tokens(len(vectors))
    mlp_in = av.model.run_with_cache(tokens, names_filter="blocks.1.hook_mlp_in")[1]["blocks.1.hook_mlp_in"]
    written = {}
    hooks = [*av.injection(vectors, tokens).fwd_hooks(),
             ("blocks.1.hook_mlp_in", lambda activation, hook: written.setdefault("mlp_in", activation))]
    av.model.run_with_hooks(tokens, fwd_hooks=hooks)
    sites = av.injection(vectors, tokens)
    marker = mlp_in[sites.rows, sites.positions]
    expected = mlp_in.clone()
    expected[sites.rows, sites.positions] = marker + marker.norm(dim=-1, keepdim=True) * vectors / vectors.norm(
        dim=-1, keepdim=True)
    torch.testing.assert_close(written["mlp_in"], expected)


@pytest.mark.parametrize("which", ["av_karvonen", "av_embedding"])
@pytest.mark.parametrize("scaled", [lambda v: v * 2.0**100, lambda v: v * 2.0**-110,
                                    lambda v: v.double() * 2.0**600, lambda v: v.double() * 2.0**-600],
                         ids=["fp32_norm_overflows", "fp32_norm_underflows", "fp64_norm_overflows",
                              "fp64_norm_underflows"])
def test_a_vector_of_extreme_norm_injects_its_direction(request, which, scaled, vectors):
    """Only v's direction reaches the AV: a power-of-two rescale must give the same logits bit for bit,
    even where squaring the entries leaves the float range (a norm of inf or 0 made the marker zero or NaN)."""
    av = request.getfixturevalue(which)
    tokens = av.prompt_tokens(len(vectors))
    expected = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(vectors, tokens).fwd_hooks())
    logits = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(scaled(vectors), tokens).fwd_hooks())
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("which", ["av_karvonen", "av_embedding"])
@pytest.mark.parametrize(("dtype", "power"), [(torch.float32, -140), (torch.float64, -1050)],
                         ids=["fp32_subnormal", "fp64_subnormal"])
def test_a_vector_of_subnormal_entries_injects_its_direction(request, which, dtype, power, vectors):
    """Entries below the smallest normal number keep fewer bits, but their direction still reaches the AV:
    the same run as those very values scaled back into the normal range (ldexp by 2**140 made them inf)."""
    av = request.getfixturevalue(which)
    tokens = av.prompt_tokens(len(vectors))
    tiny = vectors.to(dtype) * 2.0**power
    assert (tiny.abs().amax(dim=-1) < torch.finfo(dtype).tiny).all()
    normal = (tiny.double() * 2.0**(-power // 2) * 2.0**(-power // 2)).to(dtype)  # exact: the same significands
    expected = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(normal, tokens).fwd_hooks())
    logits = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(tiny, tokens).fwd_hooks())
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("which", ["av_karvonen", "av_embedding"])
def test_a_run_that_extends_the_prompt_is_injected_at_the_same_sites(request, which, vectors):
    """Generation without a KV cache, or a teacher-forced explanation, runs the prompt followed by more
    tokens: the marker sites are the same columns, as the reference hook injects on every such forward."""
    av = request.getfixturevalue(which)
    tokens = av.prompt_tokens(len(vectors))
    longer = torch.cat([tokens, torch.tensor([[40, 41, 42]] * len(vectors))], dim=1)
    expected = av.model.run_with_hooks(longer, fwd_hooks=av.injection(vectors, longer).fwd_hooks())
    logits = av.model.run_with_hooks(longer, fwd_hooks=av.injection(vectors, tokens).fwd_hooks())
    assert torch.equal(logits, expected)
    with pytest.raises(nl.InjectionError, match="built for tokens of shape"):  # shorter than the prompt
        av.model.run_with_hooks(tokens[:, :-2], fwd_hooks=av.injection(vectors, tokens).fwd_hooks())
    assert _no_hooks_left(av.model)


@pytest.mark.parametrize("which", ["av_karvonen", "av_embedding"])
def test_gradients_reach_the_injected_vectors_along_their_sphere(request, which, vectors):
    """The injection keeps the autograd graph (optimising v against the AV needs it); v enters only
    through v/||v||, so its gradient has no component along v."""
    av = request.getfixturevalue(which)
    v = vectors.clone().requires_grad_()
    tokens = av.prompt_tokens(len(v))
    av.model.run_with_hooks(tokens, fwd_hooks=av.injection(v, tokens).fwd_hooks())[:, -1].logsumexp(-1).sum().backward()
    assert v.grad is not None and (v.grad.norm(dim=-1) > 1e-3).all()
    radial = (v.grad * v).sum(-1) / v.norm(dim=-1)
    assert (radial.abs() < 1e-4 * v.grad.norm(dim=-1)).all()


def test_embedding_replacement_at_block_0_resid_pre_equals_hook_embed(av_embedding, tiny_paths, vectors):
    """The README's way around TL 3.x's `generate`, which skips `hook_embed`: block 0's input is the
    embedding itself (no position embedding is added), so the same replacement there gives the same run."""
    at_block_0 = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_embedding"],
                                                         hook_point="blocks.0.hook_resid_pre")
    tokens = av_embedding.prompt_tokens(len(vectors))
    expected = av_embedding.model.run_with_hooks(tokens, fwd_hooks=av_embedding.injection(vectors, tokens).fwd_hooks())
    logits = at_block_0.model.run_with_hooks(tokens, fwd_hooks=at_block_0.injection(vectors, tokens).fwd_hooks())
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("kv_cache", [True, False])
@pytest.mark.parametrize("method", ["karvonen", "embedding"])
def test_the_injection_installed_around_tl_generate_gives_verbalize_tokens(method, kv_cache, request, vectors):
    """README: `model.hooks(fwd_hooks=inj.fwd_hooks())` around TL's `generate`. TL 3.x's generate embeds
    outside its forward (`hook_embed` never fires), so the embedding replacement is also written at block
    0's input; without that second write every row ran without its vector and came out alike. The README
    claims this on both backends, so it runs on the bridge (TL 4.3's `generate`) too."""
    av = request.getfixturevalue(f"av_{method}")
    generated = _generate_under_injection(av, vectors, 6, kv_cache)
    _assert_verbalize_gives(av, vectors, 6, generated)
    assert len({tuple(row) for row in generated}) > 1  # the vectors reached the rows
    # Where hook_embed does fire (an ordinary forward), the second write changes nothing.
    tokens = av.prompt_tokens(len(vectors))
    injection = av.injection(vectors, tokens)
    with_both = av.model.run_with_hooks(tokens, fwd_hooks=injection.fwd_hooks())
    assert torch.equal(with_both, av.model.run_with_hooks(tokens, fwd_hooks=injection.site_hooks()))


@pytest.mark.parametrize("kv_cache", [True, False])
def test_a_karvonen_add_at_hook_embed_reaches_tl_generate_and_is_added_once(tiny_paths, vectors, kv_cache):
    """A Karvonen AV told to inject at `hook_embed`: TL 3.x's `generate` never fires that point, so under
    `model.hooks(fwd_hooks=inj.fwd_hooks())` every row generated the bare prompt's tokens. The add is not
    idempotent, so block 0's input gets it only in a forward that skipped `hook_embed`: an ordinary forward under
    `fwd_hooks()` equals one under the single site hook, and the same hook list serves both runs in turn."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], hook_point="hook_embed")
    tokens = av.prompt_tokens(len(vectors))
    injection = av.injection(vectors, tokens)
    hooks = injection.fwd_hooks()
    once = av.model.run_with_hooks(tokens, fwd_hooks=injection.site_hooks())
    assert torch.equal(av.model.run_with_hooks(tokens, fwd_hooks=hooks), once)
    with av.model.hooks(fwd_hooks=hooks):
        out = av.model.generate(tokens, max_new_tokens=6, do_sample=False, use_past_kv_cache=kv_cache,
                                stop_at_eos=False, verbose=False)
    generated = out[:, tokens.shape[1]:].tolist()
    _assert_verbalize_gives(av, vectors, 6, generated)
    assert len({tuple(row) for row in generated}) > 1  # the vectors reached the rows
    assert torch.equal(av.model.run_with_hooks(tokens, fwd_hooks=hooks), once)


@pytest.mark.parametrize("stopped_by", ["a raising hook", "stop_at_layer=0"])
def test_a_karvonen_add_at_hook_embed_reaches_tl_generate_after_a_forward_that_never_reached_block_0(
        tiny_paths, vectors, stopped_by):
    """The list `fwd_hooks()` returns serves one run after another. A forward that fired `hook_embed` but never reached
    block 0's input (a hook of yours there raised, or `stop_at_layer=0`) left the pair's "added at hook_embed" flag
    set, so in the next TL 3.x `generate` under the same list, which never fires `hook_embed`, block 0's hook skipped
    the add too: every row ran without its vector, silently. A hook of yours after the injection's at `hook_embed`, or
    ahead of it at block 0's input, still leaves a forward one add."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], hook_point="hook_embed")
    tokens = av.prompt_tokens(len(vectors))
    injection = av.injection(vectors, tokens)
    hooks = injection.fwd_hooks()

    def explode(resid, hook):
        raise RuntimeError("user hook failed")

    if stopped_by == "stop_at_layer=0":
        av.model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=0)
    else:
        with pytest.raises(RuntimeError, match="user hook failed"):
            av.model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", explode), *hooks])
    with av.model.hooks(fwd_hooks=hooks):
        out = av.model.generate(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    _assert_verbalize_gives(av, vectors, 6, out[:, tokens.shape[1]:].tolist())
    double = ("hook_embed", lambda embed, hook: embed * 2)
    assert torch.equal(av.model.run_with_hooks(tokens, fwd_hooks=[*hooks, double]),
                       av.model.run_with_hooks(tokens, fwd_hooks=[*injection.site_hooks(), double]))
    double = ("blocks.0.hook_resid_pre", double[1])
    assert torch.equal(av.model.run_with_hooks(tokens, fwd_hooks=[double, *hooks]),
                       av.model.run_with_hooks(tokens, fwd_hooks=[double, *injection.site_hooks()]))
    assert _no_hooks_left(av.model)


@pytest.mark.parametrize("family", ["gemma_av", "llama_av", "qwen2_av"])
def test_a_released_family_av_under_tl_generate_gives_verbalize_tokens(family, bos_paths):
    """The paper's AVs (embedding replacement; Gemma's after its sqrt(d) scale, which `hook_embed`
    already holds, so block 0's input is the same tensor) under TL 3.x's `generate`."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths[family])
    vectors = torch.randn(3, av.meta.d_model, generator=torch.Generator().manual_seed(7))
    _assert_verbalize_gives(av, vectors, 5, _generate_under_injection(av, vectors, 5))


def _generate_under_injection(av, vectors, max_new_tokens: int, kv_cache: bool = True) -> list[list[int]]:
    """TL's own greedy `generate` with the injection installed around it: each row's new tokens."""
    tokens = av.prompt_tokens(len(vectors))
    with av.model.hooks(fwd_hooks=av.injection(vectors, tokens).fwd_hooks()):
        out = av.model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False, use_past_kv_cache=kv_cache,
                                stop_at_eos=False, verbose=False)
    return out[:, tokens.shape[1]:].tolist()


def _assert_verbalize_gives(av, vectors, max_new_tokens: int, generated: list[list[int]]) -> None:
    """`verbalize`'s tokens are each generated row's, up to where verbalize stopped (its EOS)."""
    said = av.verbalize(vectors, max_new_tokens=max_new_tokens)
    assert [row[:len(v.tokens)] for row, v in zip(generated, said, strict=True)] == [v.tokens for v in said]
