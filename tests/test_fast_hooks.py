"""The fast decoder and the fast AR forward honour the user's hooks as TransformerLens's forward does.

At every covered hook point a recording hook sees what it sees under TL's forward (prefill and
decode steps); editing hooks give the tokens TL's forward and plain HF with the equivalent torch hook
give; `add_hook` hooks persist; anything the fast path cannot honour sends the call to TL's forward,
and says why.
"""

from __future__ import annotations

import pytest
import torch

import hf_reference as ref
import nla_lens as nl
from nla_lens import backends

if backends.default_backend() != "hooked":  # before importing a HookedTransformer-only module
    pytest.skip("the fast paths serve the TL 3.x (HookedTransformer) backend", allow_module_level=True)

from nla_lens.decoding import ARForward, FastDecoder, HookedDecoder, decoder_for  # noqa: E402
from nla_lens.fast_hooks import COVERED_BLOCK_POINTS, BlockHooks, HookPlan  # noqa: E402

STEPS = 4
MAX_NEW = 12
# Layer 1 and the last layer (whose hooks stop the fast path from computing the last position only).
AV_POINTS = ["hook_embed"] + [f"blocks.{i}.{p}" for i in (1, 3) for p in COVERED_BLOCK_POINTS]
AR_POINTS = ["hook_embed"] + [f"blocks.{i}.{p}" for i in (0, 2) for p in COVERED_BLOCK_POINTS]
# Prefills, decode steps and AR forwards keep TL's op order: what they record is TL's tensor (max abs
# diff 0.0 in fp32 and fp64 where this was written); the bound is the issue's.
EXACT = 1e-6
UNCOVERED = "blocks.0.attn.hook_pattern"


def _no_op(act, hook):
    return None


@pytest.fixture(scope="module")
def av64(tiny_paths):
    return nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype=torch.float64)


@pytest.fixture(scope="module")
def ar64(tiny_paths):
    return nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_paper"], dtype=torch.float64)


def _recorder(log):
    def record(act, hook):
        log.append((hook.name, hook.layer() if hook.name.startswith("blocks.") else None, act.clone()))
    return record


def _assert_same_records(fast, tl):
    """Each record within EXACT of TL's."""
    assert len(fast) == len(tl) > 0
    for (name, layer, a), (tl_name, tl_layer, b) in zip(fast, tl, strict=True):
        assert (name, layer, a.shape, a.dtype) == (tl_name, tl_layer, b.shape, b.dtype)
        assert float((a - b).abs().max()) <= EXACT, name


def _decode_recording(av, vectors, point, decoder_kind):
    """Prefill (with the injection) and STEPS fixed decode steps, recording `point` throughout."""
    log = []
    tokens = av.prompt_tokens(len(vectors))
    injection = av.injection(vectors, tokens).site_hooks()
    with torch.inference_mode(), av.model.hooks(fwd_hooks=[(point, _recorder(log))]):
        if decoder_kind == "fast":
            decoder = decoder_for(av.model, len(vectors), tokens.shape[1] + STEPS, injection)
            assert isinstance(decoder, FastDecoder), decoder.fallback_reason
        else:
            decoder = HookedDecoder(av.model, len(vectors), "the reference")
        decoder.prefill(tokens, injection)
        for step in range(STEPS):
            decoder.step(torch.arange(len(vectors)) + 7 * step)
    return log


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("point", AV_POINTS)
def test_recording_hook_sees_tl_activation_on_prefill_and_decode_steps(av_karvonen, av64, vectors, point, dtype):
    av = av_karvonen if dtype == torch.float32 else av64
    vectors = vectors.to(dtype)
    fast = _decode_recording(av, vectors, point, "fast")
    tl = _decode_recording(av, vectors, point, "tl")
    assert len(fast) == 1 + STEPS and fast[0][2].shape[1] > 1 and fast[1][2].shape[1] == 1
    _assert_same_records(fast, tl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("point", AR_POINTS)
def test_recording_hook_sees_tl_activation_in_the_ar_pads_included(ar_paper, ar64, point, dtype):
    ar = ar_paper if dtype == torch.float32 else ar64
    tokens, mask = ar.prompt_tokens(["a cat", "the sea and the park and a dog ran", "one"])
    assert (mask == 0).any()
    fast, tl = [], []
    with torch.inference_mode():
        with ar.model.hooks(fwd_hooks=[(point, _recorder(fast))]):
            assert backends.ar_forward(ar.model).fallback_reason is None
            ARForward(ar.model)(tokens, mask)
        with ar.model.hooks(fwd_hooks=[(point, _recorder(tl))]):
            ar.model(tokens, attention_mask=mask)
    _assert_same_records(fast, tl)


def test_block_hooks_hold_one_field_per_covered_point():
    assert sorted(COVERED_BLOCK_POINTS.values()) == sorted(BlockHooks.__dataclass_fields__)


# --- editing hooks: the same greedy tokens as TL's forward and as plain HF with torch hooks ---------

def _steer(d_model):
    return 4.0 * torch.randn(d_model, generator=torch.Generator().manual_seed(11))


def _edits(av):
    """(TL hooks, HF hook context factory) per edit: steering, a head ablation, an MLP scaling."""
    steer = _steer(av.meta.d_model)
    d_head = av.model.cfg.d_head
    scale = 1.0 + torch.rand(av.model.cfg.d_mlp, generator=torch.Generator().manual_seed(3))

    def zero_head(z, hook):
        z[:, :, 2] = 0.0  # in place, as TL allows

    return {
        "steer_resid_post": ([("blocks.2.hook_resid_post", lambda r, hook: r + steer)],
                             lambda hf: ref.layer_output_hook(hf, 2, lambda h: h + steer)),
        "ablate_head_z": ([("blocks.1.attn.hook_z", zero_head)],
                          lambda hf: ref.head_ablation_hook(hf, 1, 2, d_head)),
        "scale_mlp_post": ([("blocks.2.mlp.hook_post", lambda a, hook: a * scale)],
                           lambda hf: ref.mlp_post_hook(hf, 2, lambda a: a * scale)),
    }


def _hf_generate(folder, vectors, edit):
    hf, tok = ref.load_hf(folder)
    meta = ref.sidecar(folder)
    ids = torch.tensor([ref.av_prompt(tok, meta)] * len(vectors))
    eos = hf.generation_config.eos_token_id
    with torch.no_grad(), ref.karvonen_hook(hf, ref.marker_sites(ids, meta["tokens"]), vectors), edit(hf):
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=tok.pad_token_id)
    rows = out[:, ids.shape[1]:].tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t == eos), len(row))] for row in rows]


def _fast_and_tl_tokens(av, fwd_hooks, vectors) -> tuple[list, list]:
    """The tokens `av` verbalizes under `fwd_hooks` on its fast decoder, then through TL's forward (an uncovered no-op
    hook beside them forces the fallback), each path checked to be the one that ran."""
    with av.model.hooks(fwd_hooks=fwd_hooks):
        fast = [o.tokens for o in av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)]
        assert av.fallback_reason is None
        with av.model.hooks(fwd_hooks=[(UNCOVERED, _no_op)]):
            tl = [o.tokens for o in av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)]
            assert UNCOVERED in av.fallback_reason
    return fast, tl


@pytest.mark.parametrize("edit", ["steer_resid_post", "ablate_head_z", "scale_mlp_post"])
def test_editing_hook_gives_tl_and_hf_tokens(av_karvonen, tiny_paths, vectors, edit):
    av = av_karvonen
    tl_hooks, hf_hooks = _edits(av)[edit]
    fast, tl = _fast_and_tl_tokens(av, tl_hooks, vectors)
    assert fast == tl == _hf_generate(tiny_paths["av_karvonen"], vectors, hf_hooks)
    assert fast != [o.tokens for o in av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)]


def test_a_float32_steer_of_a_bf16_residual_runs_on_as_under_tl_forward(tiny_paths, vectors):
    """A float32 steering vector added to a bf16 residual returns a float32 residual. TL's forward runs on (its
    RMSNorm casts its output to cfg.dtype); the fast decoder's norm kept the input's dtype and its next matmul
    failed ("expected m1 and m2 to have the same dtype")."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype=torch.bfloat16)
    steer = _steer(av.meta.d_model)  # float32
    fast, tl = _fast_and_tl_tokens(av, [("blocks.1.hook_resid_post", lambda r, hook: r + steer)], vectors)
    assert fast == tl


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_a_z_hook_returning_another_dtype_runs_on_as_under_tl_forward(av_karvonen, vectors, dtype):
    """TL's attention casts z to W_O's dtype before the output projection, so a hook_z returning float64 (a head
    scaled in double precision) runs on; the fast decoder's projection failed ("mat1 and mat2 must have the same
    dtype")."""
    def z_in(z, hook):
        return z.to(dtype)

    fast, tl = _fast_and_tl_tokens(av_karvonen, [("blocks.1.attn.hook_z", z_in)], vectors)
    assert fast == tl


@pytest.mark.parametrize("edit", ["steer_resid_post", "ablate_head_z", "scale_mlp_post"])
def test_editing_hook_in_the_ar_matches_tl_and_hf(ar_paper, tiny_paths, edit):
    ar = ar_paper
    texts = ["a cat sat on the mat", "the sea", "one two three names of places"]
    tl_hooks, hf_hooks = _ar_edits(ar)[edit]
    with ar.model.hooks(fwd_hooks=tl_hooks):
        fast = ar.reconstruct(texts, batch_size=3)
        assert ar.fallback_reason is None
        with ar.model.hooks(fwd_hooks=[(UNCOVERED, _no_op)]):
            tl = ar.reconstruct(texts, batch_size=3)
            assert UNCOVERED in ar.fallback_reason
    expected = ref.ar_reconstruct(tiny_paths["ar_paper"], texts, hooks=hf_hooks)
    assert (fast - tl).abs().max() < 1e-5 and (fast - expected).abs().max() < 1e-5
    assert (fast - ar.reconstruct(texts, batch_size=3)).abs().max() > 1e-2  # the edit matters


def _ar_edits(ar):
    """The AR keeps blocks 0..2: steer and scale at block 1, ablate head 2 of block 0."""
    steer = _steer(ar.meta.d_model)
    scale = 1.0 + torch.rand(ar.model.cfg.d_mlp, generator=torch.Generator().manual_seed(3))

    def zero_head(z, hook):
        z[:, :, 2] = 0.0

    return {
        "steer_resid_post": ([("blocks.1.hook_resid_post", lambda r, hook: r + steer)],
                             lambda hf: ref.layer_output_hook(hf, 1, lambda h: h + steer)),
        "ablate_head_z": ([("blocks.0.attn.hook_z", zero_head)],
                          lambda hf: ref.head_ablation_hook(hf, 0, 2, ar.model.cfg.d_head)),
        "scale_mlp_post": ([("blocks.1.mlp.hook_post", lambda a, hook: a * scale)],
                           lambda hf: ref.mlp_post_hook(hf, 1, lambda a: a * scale)),
    }


# --- TransformerLens hook semantics: add_hook persistence, ctx, backward hooks, fallbacks ----------

def test_add_hook_persists_until_reset_and_permanent_hooks_survive(av_karvonen, vectors):
    model = av_karvonen.model
    calls = []

    def count(act, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1
        calls.append(act.shape[1])

    try:
        model.add_hook("blocks.1.hook_resid_post", count)
        model.add_hook("blocks.2.hook_mlp_out", count, is_permanent=True)
        for _ in range(2):
            av_karvonen.verbalize(vectors, max_new_tokens=3, progress=False)
            assert av_karvonen.fallback_reason is None
        # Two hooks, two calls, a prefill and two decode steps each (the third token needs no forward).
        assert len(calls) == 2 * 2 * 3
        assert model.hook_dict["blocks.1.hook_resid_post"].ctx["calls"] == 6
        model.reset_hooks()  # removes the plain add_hook, keeps the permanent one
        calls.clear()
        av_karvonen.verbalize(vectors, max_new_tokens=3, progress=False)
        assert len(calls) == 3
    finally:
        model.reset_hooks(including_permanent=True)
        model.hook_dict["blocks.1.hook_resid_post"].ctx.clear()
        model.hook_dict["blocks.2.hook_mlp_out"].ctx.clear()
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())


def test_use_attn_result_gives_tl_forwards_output_not_the_fast_paths(tiny_paths, ar_paper, vectors):
    """`set_use_attn_result(True)` makes TL sum per-head results (`hook_result`) where the fast paths run one matmul
    over the heads: other roundings, which in bf16 moved the fast decoder's logits by 0.08 and changed greedy tokens.
    Both fast paths now step aside for it, with or without a hook at `hook_result`."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype=torch.bfloat16)
    av.model.set_use_attn_result(True)
    served = av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    with av.model.hooks(fwd_hooks=[(UNCOVERED, _no_op)]):
        assert av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False) == served
    texts = ["a cat sat on the mat", "the sea", "one two three names of places"]
    ar_paper.model.set_use_attn_result(True)
    try:
        served = ar_paper.reconstruct(texts, batch_size=3)
        with ar_paper.model.hooks(fwd_hooks=[(UNCOVERED, _no_op)]):
            assert torch.equal(ar_paper.reconstruct(texts, batch_size=3), served)
    finally:
        ar_paper.model.set_use_attn_result(False)


def test_a_global_torch_hook_sends_the_call_to_tl_forward(av_karvonen, ar_paper, vectors):
    """`register_module_forward_hook` runs on every module's call, and the fast paths call only HookPoints: a global
    hook that zeroed block 1's MLP was skipped there, silently. The call now runs TL's forward, where it edits what
    the same hook on that one module edits."""
    texts = ["a cat sat on the mat", "the sea"]
    served = [v.text for v in av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)]
    served_vectors = ar_paper.reconstruct(texts)
    mlps = {av_karvonen.model.blocks[1].mlp, ar_paper.model.blocks[1].mlp}
    results = {}
    for how in ("global", "module"):
        if how == "global":
            handle = torch.nn.modules.module.register_module_forward_hook(
                lambda module, args, output: output * 0 if module in mlps else None)
            handles = [handle]
        else:
            handles = [mlp.register_forward_hook(lambda module, args, output: output * 0) for mlp in mlps]
        try:
            said = [v.text for v in av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)]
            results[how] = (said, ar_paper.reconstruct(texts), av_karvonen.fallback_reason, ar_paper.fallback_reason)
        finally:
            for handle in handles:
                handle.remove()
    assert results["global"][0] == results["module"][0]
    assert torch.equal(results["global"][1], results["module"][1])
    assert results["global"][0] != served and not torch.equal(results["global"][1], served_vectors)
    assert all("global torch module hook" in reason for reason in results["global"][2:])
    assert av_karvonen.verbalize(vectors, max_new_tokens=3, progress=False) and av_karvonen.fallback_reason is None


def test_backward_hook_forces_tl_forward(av_karvonen, ar_paper, vectors):
    for model in (av_karvonen.model, ar_paper.model):
        model.add_hook("blocks.1.hook_resid_post", _no_op, dir="bwd")
    try:
        decoder = decoder_for(av_karvonen.model, 4, 64, [])
        assert isinstance(decoder, HookedDecoder) and "backward hook" in decoder.fallback_reason
        av_karvonen.verbalize(vectors, max_new_tokens=3, progress=False)
        assert "backward hook at blocks.1.hook_resid_post" in av_karvonen.fallback_reason
        ar_paper.reconstruct(["a cat"])
        assert "backward hook" in ar_paper.fallback_reason
    finally:
        av_karvonen.model.reset_hooks()
        ar_paper.model.reset_hooks()
    assert av_karvonen.verbalize(vectors, max_new_tokens=3, progress=False) and av_karvonen.fallback_reason is None


def test_uncovered_points_and_plain_torch_hooks_fall_back_visibly(av_karvonen, vectors, caplog):
    model = av_karvonen.model
    injection = av_karvonen.injection(vectors).fwd_hooks()
    assert isinstance(decoder_for(model, 4, 64, injection), FastDecoder)
    # An injection at a point the fast path does not compute is served by TL's forward.
    decoder = decoder_for(model, 4, 64, [("blocks.1.attn.hook_rot_k", injection[0][1])])
    assert isinstance(decoder, HookedDecoder) and "blocks.1.attn.hook_rot_k" in decoder.fallback_reason
    plain = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    with caplog.at_level("DEBUG", logger="nla_lens.decoding"), model.hooks(fwd_hooks=[(UNCOVERED, _no_op)]):
        assert av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False) == plain
    assert UNCOVERED in av_karvonen.fallback_reason and UNCOVERED in caplog.text
    handle = model.blocks[1].mlp.register_forward_hook(lambda module, args, out: None)
    try:
        assert av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False) == plain
        assert "torch hook on module blocks.1.mlp" in av_karvonen.fallback_reason
    finally:
        handle.remove()


def test_hook_plan_reads_only_points_with_hooks(av_karvonen):
    model = av_karvonen.model
    assert not HookPlan.of(model).any_hooked and HookPlan.of(model).fallback_reason is None
    with model.hooks(fwd_hooks=[("blocks.2.attn.hook_z", _no_op), ("hook_embed", _no_op)]):
        plan = HookPlan.of(model)
    assert plan.embed is model.hook_dict["hook_embed"]
    assert plan.blocks[2].z is model.hook_dict["blocks.2.attn.hook_z"]
    assert [b == BlockHooks() for b in plan.blocks] == [True, True, False, True]


def test_hooks_never_leak_from_a_fast_prefill_after_an_exception(av_karvonen, vectors):
    def explode(act, hook):
        raise RuntimeError("boom")

    with av_karvonen.model.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", explode)]), \
            pytest.raises(RuntimeError, match="boom"):
        av_karvonen.verbalize(vectors, max_new_tokens=3, progress=False)
    assert not any(hp._forward_hooks for hp in av_karvonen.model.hook_dict.values())
