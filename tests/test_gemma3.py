"""Gemma-3 NLAs (issue #13) equal the paper's recipe in plain HF, text-only and in the multimodal wrapper.

The AV reference embeds with HF's own (sqrt(d)-scaled) embedding layer, overwrites the marker row with
v * injection_scale / ||v|| and runs `inputs_embeds` (kitft docs/inference.md); the AR reference is
the paper's critic (BOS first, final norm removed, value head at the last token). fp32 on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

import hf_reference as ref
import nla_lens as nl
from nla_lens import backends
from nla_lens.testing_families import SLIDING_WINDOW

ATOL = 1e-5
MAX_NEW = 12
LAYOUTS = ["gemma_av", "gemma_av_multimodal"]
EXPLANATIONS = ["the cat sat on the mat", "a dog ran in the park and the weather", "the sea"]


def _hf_av(folder):
    model_class = Gemma3ForConditionalGeneration if "multimodal" in folder.name else AutoModelForCausalLM
    return model_class.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gemma_avs(bos_paths) -> dict[str, nl.ActivationVerbalizer]:
    return {name: nl.ActivationVerbalizer.from_pretrained(bos_paths[name]) for name in LAYOUTS}


@pytest.fixture()
def gemma_vectors() -> torch.Tensor:
    return 5.0 * torch.randn(3, 64, generator=torch.Generator().manual_seed(7))


def _reference_embeds(hf, av, tokens, vectors):
    sites = ref.marker_sites(tokens, av.meta.raw["tokens"])
    return ref.replaced_embeddings(hf, tokens, sites, vectors, av.meta.injection_scale)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemma3_av_logits_match_hf_embedding_replacement(gemma_avs, bos_paths, layout, gemma_vectors):
    av = gemma_avs[layout]
    tokens = av.prompt_tokens(len(gemma_vectors))
    logits = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(gemma_vectors, tokens).fwd_hooks())

    hf = _hf_av(bos_paths[layout])
    with torch.no_grad():
        embeds = _reference_embeds(hf, av, tokens, gemma_vectors)
        expected = hf(inputs_embeds=embeds).logits
        plain = hf(tokens).logits
        hf.config.get_text_config().sliding_window = 10_000  # the same model without its local window
        unwindowed = hf(inputs_embeds=embeds).logits
    assert (logits - expected).abs().max() < ATOL
    # Teeth: the injection moves the logits, and the prompt outgrows the sliding window, so local
    # attention differs from global attention on it.
    assert tokens.shape[1] > 4 * SLIDING_WINDOW
    assert (expected - plain).abs().max() > 1e-2
    assert (expected - unwindowed).abs().max() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemma3_av_prompt_holds_exactly_one_bos(gemma_avs, layout):
    av = gemma_avs[layout]
    tokens = av.prompt_tokens(1)[0].tolist()
    assert tokens[0] == av.tokenizer.bos_token_id
    assert tokens.count(av.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemma3_greedy_verbalize_equals_hf_generate_from_inputs_embeds(gemma_avs, bos_paths, layout,
                                                                        gemma_vectors):
    av = gemma_avs[layout]
    ours = [v.tokens for v in av.verbalize(gemma_vectors, max_new_tokens=MAX_NEW, progress=False)]

    hf = ref.text_causal_lm(_hf_av(bos_paths[layout]))
    tokens = av.prompt_tokens(len(gemma_vectors))
    with torch.no_grad():
        embeds = _reference_embeds(hf, av, tokens, gemma_vectors)
        generated = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(tokens),
                                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=av.eos_token_ids,
                                pad_token_id=av.tokenizer.pad_token_id)
    eos = set(av.eos_token_ids)
    theirs = [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in generated.tolist()]
    assert ours == theirs
    assert len({tuple(row) for row in ours}) > 1  # the vectors steer the text apart


def _cut_vision_bytes(folder) -> int:
    """Truncate the safetensors file where the first vision / projector tensor's data begins."""
    path = folder / "model.safetensors"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    vision = [info["data_offsets"][0] for name, info in header.items() if not name.startswith("language_model.")]
    text_end = max(info["data_offsets"][1] for name, info in header.items() if name.startswith("language_model."))
    cut = 8 + header_len + min(vision)
    assert vision and cut >= 8 + header_len + text_end  # every text tensor lies before the cut
    with open(path, "r+b") as f:
        f.truncate(cut)
    return len(vision)


def test_gemma3_multimodal_loads_without_reading_the_vision_tower(bos_paths, tmp_path, gemma_vectors,
                                                                   gemma_avs):
    folder = tmp_path / "wrapper"
    shutil.copytree(bos_paths["gemma_av_multimodal"], folder)
    n_vision = _cut_vision_bytes(folder)
    assert n_vision > 10
    with pytest.raises(Exception):  # noqa: B017 - the vision bytes are gone: safetensors refuses the file
        safe_open(str(folder / "model.safetensors"), framework="pt")

    av = nl.ActivationVerbalizer.from_pretrained(folder)
    tokens = av.prompt_tokens(len(gemma_vectors))
    logits = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(gemma_vectors, tokens).fwd_hooks())
    intact = gemma_avs["gemma_av_multimodal"]
    expected = intact.model.run_with_hooks(tokens, fwd_hooks=intact.injection(gemma_vectors, tokens).fwd_hooks())
    assert torch.equal(logits, expected)
    assert not any("vision" in name for name, _ in av.model.named_parameters())


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer config")
def test_gemma3_hooked_config_follows_the_checkpoint(gemma_avs):
    cfg = gemma_avs["gemma_av"].model.cfg
    assert cfg.attn_types == ["local", "local", "global", "local"] and cfg.window_size == SLIDING_WINDOW
    assert cfg.use_normalization_before_and_after and cfg.use_qk_norm
    assert (cfg.rotary_base, cfg.rotary_base_local, cfg.rotary_scaling_factor) == (1e6, 1e4, 8.0)
    assert cfg.attn_scale == pytest.approx(24 ** 0.5)  # sqrt(query_pre_attn_scalar), not sqrt(d_head) = 4
    assert cfg.default_prepend_bos  # model.to_tokens(text) puts BOS first, as the training code did


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer's buffers")
def test_gemma3_shared_buffers_equal_the_ones_tl_builds_per_layer(gemma_avs):
    """The loader computes rotary tables once per kind of layer; each layer's must equal what TL's own
    construction gives that layer (local and global layers have different rotary bases)."""
    from transformer_lens import HookedTransformer

    model = gemma_avs["gemma_av"].model
    own = HookedTransformer(model.cfg, move_to_device=False)
    for index, (block, tl_block) in enumerate(zip(model.blocks, own.blocks, strict=True)):
        ours, theirs = dict(block.named_buffers()), dict(tl_block.named_buffers())
        assert ours.keys() == theirs.keys()
        for name, buffer in theirs.items():
            assert torch.equal(ours[name], buffer), f"blocks.{index}.{name}"
    local, global_ = model.blocks[0].attn, model.blocks[2].attn
    assert not torch.equal(local.rotary_sin, global_.rotary_sin)


# TL 3.9's Gemma-3 norms -> HF Gemma3ForCausalLM's, per block (and the final norm).
_HF_NORMS = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm", "ln2": "pre_feedforward_layernorm",
             "ln2_post": "post_feedforward_layernorm", "attn.q_norm": "self_attn.q_norm",
             "attn.k_norm": "self_attn.k_norm"}


def _hf_norm_of(hf, tl_name: str):
    if tl_name == "ln_final":
        return hf.model.norm
    _, index, rest = tl_name.split(".", 2)
    return hf.model.layers[int(index)].get_submodule(_HF_NORMS[rest])


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer's norms")
def test_gemma3_bf16_norms_compute_hf_gemma3_rmsnorm(bos_paths):
    """Every Gemma-3 norm (4 per block, q/k norms, the final norm) holds HF's fp32 ``1.0 + w.float()`` and
    multiplies before its one cast, as HF's `Gemma3RMSNorm`: bit for bit against that arithmetic with TL's
    division, and HF's module itself (which multiplies by rsqrt) within one bf16 ulp (measured: none differ). TL's
    norm held 1 + w in bf16 and multiplied after the cast: 37% of these outputs differed from HF's, by up to 2 ulps.
    The hook points see what TL's did: the fp32 RMS and the fp32 x / RMS."""
    from transformer_lens.components import RMSNorm

    av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"], dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(bos_paths["gemma_av"], dtype=torch.bfloat16).eval()
    norms = {name: module for name, module in av.model.named_modules() if isinstance(module, RMSNorm)}
    assert len(norms) == 6 * av.model.cfg.n_layers + 1  # TL 3.9's Gemma-3 block has six, plus ln_final
    generator = torch.Generator().manual_seed(0)
    mismatched = total = 0
    for name, norm in norms.items():
        hf_norm = _hf_norm_of(hf, name)
        one_plus_w = 1.0 + hf_norm.weight.float()
        assert norm.w.dtype == torch.float32 and torch.equal(norm.w, one_plus_w), name
        x = (3.0 * torch.randn(3, 7, norm.length, generator=generator)).to(torch.bfloat16)
        with torch.no_grad():
            ours, theirs = norm(x), hf_norm(x)
        wide = x.float()
        expected = (wide / (wide.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * one_plus_w).to(torch.bfloat16)
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, expected), name
        ulp = torch.ldexp(torch.ones_like(expected.float()), torch.frexp(theirs.float()).exponent - 8)  # bf16's
        assert ((ours.float() - theirs.float()).abs() <= ulp).all(), name
        mismatched, total = mismatched + int((ours != theirs).sum()), total + ours.numel()
    assert mismatched / total < 1e-3
    # In fp32 the arithmetic is TL's RMSNorm's, bit for bit.
    fp32 = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"]).model.blocks[1].ln2
    tl_norm = RMSNorm(fp32.cfg)
    tl_norm.w.data.copy_(fp32.w)
    x = torch.randn(3, 7, fp32.length, generator=generator)
    with torch.no_grad():
        assert torch.equal(fp32(x), tl_norm(x))

    tokens = av.prompt_tokens(2)
    names = ("blocks.1.hook_resid_mid", "blocks.1.ln2.hook_scale", "blocks.1.ln2.hook_normalized")
    _, cache = av.model.run_with_cache(tokens, names_filter=lambda hook_name: hook_name in names)
    resid = cache["blocks.1.hook_resid_mid"].float()
    scale = (resid.pow(2).mean(-1, keepdim=True) + av.model.cfg.eps).sqrt()
    assert cache["blocks.1.ln2.hook_scale"].dtype == torch.float32
    assert torch.equal(cache["blocks.1.ln2.hook_scale"], scale)
    assert torch.equal(cache["blocks.1.ln2.hook_normalized"], resid / scale)


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer's norms")
def test_gemma3_norm_weights_stay_fp32_through_model_casts(bos_paths):
    """`model.to(dtype)`, `.half()`, `.bfloat16()` and device moves keep the norms' fp32 1 + w unrounded: a round
    trip through fp32 gives the bf16 logits back bit for bit. `.float()`, which TL leaves out of cfg.dtype, still
    runs, in fp32, as TL's own norm made it run."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"], dtype=torch.bfloat16)
    model, tokens = av.model, av.prompt_tokens(2)
    loaded = {name: param.detach().clone() for name, param in model.named_parameters() if name.endswith(".w")}
    before = model(tokens)

    def norms_kept() -> bool:
        params = dict(model.named_parameters())
        return all(params[name].dtype == torch.float32 and torch.equal(params[name], w) for name, w in loaded.items())

    model.to(torch.float32, print_details=False)
    assert norms_kept() and model.W_E.dtype == torch.float32
    model.to(torch.bfloat16, print_details=False)
    assert norms_kept() and torch.equal(model(tokens), before)
    for cast in (model.half, model.bfloat16, lambda: model.to("cpu", print_details=False)):
        cast()
        assert norms_kept()
    assert torch.equal(model(tokens), before)
    ln_final = model.ln_final
    ln_final.to("meta")
    assert ln_final.w.device.type == "meta" and ln_final.w.dtype == torch.float32
    ln_final.to_empty(device="cpu")
    ln_final.w.data.copy_(loaded["ln_final.w"])
    model.float()  # cfg.dtype stays bf16
    assert norms_kept() and model.cfg.dtype == torch.bfloat16 and model(tokens).dtype == torch.float32


@pytest.mark.parametrize("which", ["gemma_ar", "llama_ar"])
def test_bos_family_ar_matches_the_paper_critic(bos_paths, which):
    ar = nl.ActivationReconstructor.from_pretrained(bos_paths[which])
    tokens, mask = ar.prompt_tokens(EXPLANATIONS)
    bos = ar.tokenizer.bos_token_id
    first_real = tokens[torch.arange(len(tokens)), (mask == 0).sum(dim=1)]
    assert (first_real == bos).all() and ((tokens == bos) & mask.bool()).sum() == len(EXPLANATIONS)

    ours = ar.reconstruct(EXPLANATIONS, batch_size=2)
    expected = ref.ar_reconstruct(bos_paths[which], EXPLANATIONS)
    assert (ours - expected).abs().max() < ATOL
    # Teeth: without the BOS the critic reads other tokens and lands elsewhere.
    unbosed = ref.ar_reconstruct(bos_paths[which], EXPLANATIONS, special_tokens=False)
    assert (unbosed - expected).abs().max() > 0.1


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer fast decoder")
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemma3_fast_decoder_logits_are_tl_bits_past_the_window(bos_paths, layout, dtype, rows):
    """The prefill's and every decode step's logits equal TL's forward's: a 35-token prompt under a window
    of 6, then a window of 40 that the generation crosses. (Through SDPA and fused rms_norm they were up to
    1.5e-6 off in fp32 and one ulp, 0.03, in bf16.)"""
    from nla_lens import decoding
    from nla_lens.decoding_gemma import GemmaDecoder

    av = nl.ActivationVerbalizer.from_pretrained(bos_paths[layout], dtype=dtype)
    vectors = (5.0 * torch.randn(rows, 64, generator=torch.Generator().manual_seed(7))).to(dtype)
    tokens = av.prompt_tokens(rows)
    hooks = av.injection(vectors, tokens).site_hooks()
    for window in (SLIDING_WINDOW, tokens.shape[1] + 5):
        av.model.cfg.window_size = window  # TL's masks read it at every forward, as the decoder does
        fast = backends.decoder(av.model, rows, tokens.shape[1] + MAX_NEW, hooks)
        assert isinstance(fast, GemmaDecoder)
        slow = decoding.HookedDecoder(av.model, rows, "the reference: TL's own forward")
        with torch.inference_mode():
            ours, theirs = fast.prefill(tokens, hooks), slow.prefill(tokens, hooks)
            assert torch.equal(ours, theirs)
            for step in range(MAX_NEW - 1):
                ids = theirs.argmax(dim=-1)
                ours, theirs = fast.step(ids), slow.step(ids)
                assert torch.equal(ours, theirs), (window, step)


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer fast decoder")
def test_gemma3_a_no_op_hook_changes_no_greedy_token_in_bf16(bos_paths):
    """A hook sends decoding to TL's forward; its greedy tokens are the fast decoder's (while the fast decoder
    rounded otherwise, a no-op hook changed 3 of these 5 bf16 rows within 20 tokens)."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"], dtype=torch.bfloat16)
    av.eos_token_ids = []  # every row runs all 20 tokens
    vectors = 5.0 * torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    plain = av.verbalize(vectors, max_new_tokens=20, progress=False)
    assert av.fallback_reason is None
    with av.model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", lambda resid, hook: resid)]):
        hooked = av.verbalize(vectors, max_new_tokens=20, progress=False)
    assert av.fallback_reason is not None
    assert [o.tokens for o in hooked] == [o.tokens for o in plain]


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer fast decoder")
def test_gemma3_hooks_that_could_observe_tl_send_decoding_to_its_forward(gemma_avs, gemma_vectors):
    from nla_lens import decoding

    av = gemma_avs["gemma_av"]
    hooks = av.injection(gemma_vectors, av.prompt_tokens(len(gemma_vectors))).site_hooks()
    with av.model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: z)]):
        assert isinstance(backends.decoder(av.model, 1, 64, hooks), decoding.HookedDecoder)
    assert isinstance(backends.decoder(av.model, 1, 64, [("blocks.0.hook_mlp_out", hooks[0][1])]),
                      decoding.HookedDecoder)


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer fast decoder")
def test_gemma3_torch_hooks_and_capture_see_every_decode_step(gemma_avs, gemma_vectors):
    """The Gemma decoder never calls TL's block modules, so a plain torch hook sends decoding to TL's forward."""
    av = gemma_avs["gemma_av"]
    widths = []
    handle = av.model.blocks[1].register_forward_hook(lambda module, args, output: widths.append(output.shape[1]))
    try:
        out = av.verbalize(gemma_vectors[:1], max_new_tokens=4)
    finally:
        handle.remove()
    assert av.fallback_reason is not None and "torch hook on module blocks.1" in av.fallback_reason
    assert widths == [av.prompt_tokens(1).shape[1]] + [1] * (len(out[0].tokens) - 1)
    with nl.capture(av.model, 1, calls="all") as captured:
        av.verbalize(gemma_vectors[:1], max_new_tokens=4)
    assert len(captured.vectors) == len(widths)


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer fast decoder")
def test_gemma3_fast_decoder_without_local_layers_needs_no_window(bos_paths, gemma_vectors):
    """A Gemma-3 config without window_size (a hand-made HookedTransformerConfig) crashed the fast decoder's prefill
    with a TypeError, though with every layer global no mask reads the window."""
    from nla_lens import decoding
    from nla_lens.decoding_gemma import GemmaDecoder

    av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"])
    for block in av.model.blocks:
        block.attn.attn_type = "global"
    av.model.cfg.attn_types, av.model.cfg.window_size = ["global"] * av.model.cfg.n_layers, None
    tokens = av.prompt_tokens(len(gemma_vectors))
    hooks = av.injection(gemma_vectors, tokens).site_hooks()
    fast = backends.decoder(av.model, len(tokens), tokens.shape[1] + 2, hooks)
    assert isinstance(fast, GemmaDecoder)
    slow = decoding.HookedDecoder(av.model, len(tokens), "the reference: TL's own forward")
    with torch.inference_mode():
        ours, theirs = fast.prefill(tokens, hooks), slow.prefill(tokens, hooks)
        assert torch.equal(ours, theirs)
        ids = theirs.argmax(dim=-1)
        assert torch.equal(fast.step(ids), slow.step(ids))


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the HookedTransformer fast decoder")
def test_gemma3_local_layers_without_a_window_are_a_config_error_naming_them(bos_paths, gemma_vectors):
    """They were a TypeError deep in the fast decoder's prefill (TL's forward, after a hook, a bare ValueError)."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"])
    av.model.cfg.window_size = None
    local = [i for i, kind in enumerate(av.model.cfg.attn_types) if kind == "local"]
    assert local and len(local) < av.model.cfg.n_layers  # the fixture mixes local and global layers
    with pytest.raises(nl.ConfigError, match=rf"^blocks {re.escape(str(local))} of this Gemma-3 model use local "
                                             r"\(sliding-window\) attention, but model\.cfg\.window_size is None: set "
                                             "it to the checkpoint's sliding_window"):
        av.verbalize(gemma_vectors, max_new_tokens=2, progress=False)


def test_load_base_checks_a_multimodal_wrapper_against_the_nla(gemma_avs, bos_paths, tmp_path):
    """A Gemma-3 wrapper keeps d_model and depth in text_config; they are checked before weights load."""
    folder = shutil.copytree(bos_paths["gemma_av_multimodal"], tmp_path / "base")
    (folder / "nla_meta.yaml").unlink()  # a base model folder has no sidecar
    meta = gemma_avs["gemma_av_multimodal"].meta
    text = json.loads((folder / "config.json").read_text())["text_config"]
    wider = dataclasses.replace(meta, d_model=2 * meta.d_model, base_model=str(folder))
    with pytest.raises(nl.PairMismatchError,
                       match=f"d_model={text['hidden_size']} but the NLA reads {2 * meta.d_model}"):
        nl.load_base(wider)
    deeper = dataclasses.replace(meta, layer=text["num_hidden_layers"], base_model=str(folder))
    with pytest.raises(nl.PairMismatchError, match=f"has {text['num_hidden_layers']} layers"):
        nl.load_base(deeper)
    base = nl.load_base(dataclasses.replace(meta, base_model=str(folder)))
    assert base.cfg.d_model == meta.d_model


# The text_config of Google's released Gemma-3-12B-IT / 27B-IT config.json (the multimodal wrapper).
_RELEASED = {
    "google/gemma-3-12b-it": {"hidden_size": 3840, "intermediate_size": 15360, "num_attention_heads": 16,
                              "num_hidden_layers": 48, "num_key_value_heads": 8, "head_dim": 256,
                              "query_pre_attn_scalar": 256},
    "google/gemma-3-27b-it": {"hidden_size": 5376, "intermediate_size": 21504, "num_attention_heads": 32,
                              "num_hidden_layers": 62, "num_key_value_heads": 16, "head_dim": 128,
                              "query_pre_attn_scalar": 168},
}


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="compares with TransformerLens 3.9's configs")
@pytest.mark.parametrize("name", sorted(_RELEASED))
def test_gemma3_config_from_config_json_equals_transformer_lens_own(name, tmp_path):
    from transformer_lens import loading_from_pretrained

    from nla_lens import loading

    text = {**_RELEASED[name], "model_type": "gemma3_text", "sliding_window": 1024, "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model"}, "image_token_index": 262144}))
    ours = loading.hooked_config(loading.load_hf_config(tmp_path), n_layers=None, dtype=torch.float32, device="cpu")
    theirs = loading_from_pretrained.convert_hf_model_config(name)
    skip = {"n_ctx", "initializer_range", "attn_scale"}  # TL caps n_ctx at 8192; init is irrelevant here
    for key, value in theirs.items():
        if key not in skip and key not in ("original_architecture", "tokenizer_name"):
            assert getattr(ours, key) == value, key
    # TL's hard-coded 27B config has no attn_scale (it would divide by sqrt(d_head) = sqrt(128)); the
    # checkpoint says query_pre_attn_scalar = 168, which HF and nla_lens use.
    assert ours.attn_scale == pytest.approx(_RELEASED[name]["query_pre_attn_scalar"] ** 0.5)
    tl_scale = theirs.get("attn_scale", theirs["d_head"] ** 0.5)  # TL's default: sqrt(d_head)
    assert (tl_scale == pytest.approx(ours.attn_scale)) == name.endswith("12b-it")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemma3_missing_text_weights_say_to_download_again(bos_paths, tmp_path, layout):
    folder = shutil.copytree(bos_paths[layout], tmp_path / "av")
    weights = load_file(str(folder / "model.safetensors"))
    gone = next(name for name in weights if "layers.1.mlp.up_proj" in name)
    del weights[gone]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(nl.CheckpointError, match=r"lacks weights for .*1 in all.*download the checkpoint again"):
        nl.ActivationVerbalizer.from_pretrained(folder)
