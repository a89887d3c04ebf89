"""Each released family end to end against plain HF with plain torch hooks (`hf_reference.py`), fp32 and bf16.

Beside `test_gemma3.py` (Gemma-3) and `test_injection_equivalence.py` (Qwen3): the Llama AV (BOS first,
Llama-3.3's `llama3` rotary scaling), the Qwen2 pair (Qwen2.5's architecture: GQA with q/k/v biases, no
BOS), every family in bf16, and every family's KV-cached decode steps against HF's full forward. In bf16 HF
and TransformerLens round differently (SDPA or eager attention, op order), so the bound there is HF's own bf16
error: nla_lens in bf16 must sit as near the fp32 reference as HF in bf16 does (measured: 0.78-1.31x), while the
injection moves the logits 8-40x further. Gemma-3's bound is tighter: its norms compute HF's arithmetic (fp32
1 + w, multiplied before the cast), measured 0.93-1.13x on both backends (1.12-1.36x while the hooked backend's
rounded 1 + w to bf16 and multiplied after the cast). The rest is HF's default attention (SDPA, whose scores and
softmax stay fp32): against HF's eager attention, every family's bf16 outputs are HF's to the bit on both backends
(but one KV-cached step of the tiny Llama on the hooked backend: `DECODE_OFF_EAGER`; and where torch's CPU kernels
are AVX2 ones, the Llama's and Qwen3's are near it: `AVX2_KERNELS`). The embedding, Gemma's
sqrt(d) scale and the replaced marker row included, is HF's to the bit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math

import pytest
import torch
from conftest import LAYER
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import hf_reference as ref
import nla_lens as nl
from nla_lens import backends, loading, testing
from nla_lens.sidecar import text_ids
from nla_lens.testing_families import (
    GEMMA_MARKER,
    build_gemma3,
    build_qwen2,
    gemma_tokenizer,
    paper_sidecar,
    save_folder,
    token_facts,
)

ATOL = 1e-5
DECODE_ATOL = 2e-5  # measured up to 1e-5 (the Qwen3 AV, whose logits are largest), 2.7e-6 elsewhere
MAX_NEW = 10
# nla_lens's bf16 error over HF's own (both against HF fp32), HF's eager attention's own over its SDPA's: measured
# 0.78-1.31 (1.34 with ATEN_CPU_CAPABILITY=avx2), Gemma-3's 0.93-1.13
BF16_NOISE_RATIO = 1.4
GEMMA_BF16_NOISE_RATIO = 1.2
EXPLANATIONS = ["the cat sat on the mat", "a dog ran in the park and the weather", "the sea"]
TEXT = "The cat sat on the mat. A dog ran in the park."
CONTINUATION = "<explanation>\nThe cat sat on the mat. A dog ran in the park and the weather and the sea."
# (fixture, key) of every AV family: nanoNLA's Qwen3 (Karvonen) and the paper's (embedding replacement).
AVS = {"qwen3": ("tiny_paths", "av_karvonen"), "qwen2": ("bos_paths", "qwen2_av"),
       "llama": ("bos_paths", "llama_av"), "gemma": ("bos_paths", "gemma_av"),
       "gemma_multimodal": ("bos_paths", "gemma_av_multimodal")}
ARS = {"qwen3": ("tiny_paths", "ar_nanonla"), "qwen2": ("bos_paths", "qwen2_ar"),
       "llama": ("bos_paths", "llama_ar"), "gemma": ("bos_paths", "gemma_ar")}


def _bf16_bound(family: str) -> float:
    return GEMMA_BF16_NOISE_RATIO if family.startswith("gemma") else BF16_NOISE_RATIO


def _folder(request, where):
    fixture, key = where
    return request.getfixturevalue(fixture)[key]


def _hf(folder, dtype=torch.float32, attn_implementation=None):
    """HF's model of `folder`; `attn_implementation` None for HF's default attention (SDPA), or "eager"."""
    model_class = Gemma3ForConditionalGeneration if "multimodal" in folder.name else AutoModelForCausalLM
    return model_class.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation).eval()


def _reference_injection(hf, folder, tokens, vectors):
    """The training code's injection on the HF model, read from the raw sidecar: Karvonen on decoder layer 1
    (nanoNLA's dataset dialect), else the marker's embedding replaced with the sidecar's injection_scale."""
    meta = ref.sidecar(folder)
    sites = ref.marker_sites(tokens, meta["tokens"])
    if meta["kind"] == "nla_dataset":
        return ref.karvonen_hook(hf, sites, vectors, layer_module=ref.text_causal_lm(hf).model.layers[1])
    return ref.embedding_hook(hf, sites, vectors, meta["extraction"]["injection_scale"])


@pytest.fixture()
def family_vectors() -> torch.Tensor:
    return 5.0 * torch.randn(3, 64, generator=torch.Generator().manual_seed(7))


# --- fp32: the families no other module compares with HF ---

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_av_prompt_is_the_chat_template_with_bos_only_where_the_family_has_one(request, family):
    folder = _folder(request, AVS[family])
    av = nl.ActivationVerbalizer.from_pretrained(folder)
    tokenizer, meta = AutoTokenizer.from_pretrained(folder), ref.sidecar(folder)
    expected = ref.av_prompt(tokenizer, meta)
    assert av.prompt_tokens(1)[0].tolist() == expected
    if family == "llama":
        assert expected[0] == tokenizer.bos_token_id and expected.count(tokenizer.bos_token_id) == 1
    else:
        assert tokenizer.bos_token_id is None
    assert len(ref.marker_sites(torch.tensor([expected]), meta["tokens"])) == 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_av_logits_and_greedy_tokens_match_hf_embedding_replacement(request, family, family_vectors):
    folder = _folder(request, AVS[family])
    av = nl.ActivationVerbalizer.from_pretrained(folder)
    tokens = av.prompt_tokens(len(family_vectors))
    logits = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(family_vectors, tokens).fwd_hooks())
    ours = [v.tokens for v in av.verbalize(family_vectors, max_new_tokens=MAX_NEW)]

    hf = _hf(folder)
    with torch.no_grad():
        plain = hf(tokens).logits
        with _reference_injection(hf, folder, tokens, family_vectors):
            expected = hf(tokens).logits
            generated = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=MAX_NEW,
                                    do_sample=False, eos_token_id=av.eos_token_ids,
                                    pad_token_id=av.tokenizer.pad_token_id)[:, tokens.shape[1]:]
    eos = set(av.eos_token_ids)
    theirs = [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in generated.tolist()]
    assert (logits - expected).abs().max() < ATOL
    assert ours == theirs
    assert (expected - plain).abs().max() > 0.1 and len({tuple(row) for row in ours}) > 1  # the vectors count


def test_llama3_rope_scaling_is_served_as_hf_computes_it(bos_paths):
    """Llama-3.1 / 3.3 checkpoints say `rope_type: llama3`; the tiny Llama's shrunk original context makes it bite,
    in each of NTK-by-parts' three bands: kept, interpolated (smoothed) and divided by the factor."""
    folder = bos_paths["llama_av"]
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "llama3"
    av = nl.ActivationVerbalizer.from_pretrained(folder)
    tokens = av.prompt_tokens(1)
    hf = _hf(folder)
    with torch.no_grad():
        expected = hf(tokens).logits
        unscaled = _llama_with_rope(hf, {"rope_type": "default", "rope_theta": rope["rope_theta"]})(tokens).logits
        # low_freq_factor 2 moves the one interpolated frequency (wavelength 32.4) into the divided band, alone
        unsmoothed = _llama_with_rope(hf, {**rope, "low_freq_factor": 2.0})(tokens).logits
    assert (av.model(tokens) - expected).abs().max() < ATOL
    wavelengths = 2 * math.pi * rope["rope_theta"] ** (torch.arange(0, hf.config.head_dim, 2) / hf.config.head_dim)
    original = rope["original_max_position_embeddings"]
    bands = torch.bucketize(wavelengths, torch.tensor([original / rope["high_freq_factor"],
                                                       original / rope["low_freq_factor"]]), right=False)
    assert bands.tolist() == [0, 1] + [2] * (len(wavelengths) - 2)
    # Teeth: the scaling moves the logits, and so does the interpolated band by itself.
    assert (expected - unscaled).abs().max() > 0.1
    assert (expected - unsmoothed).abs().max() > 0.1


def _llama_with_rope(hf, rope: dict):
    """`hf`'s weights under another rope block."""
    model = AutoModelForCausalLM.from_config(hf.config.__class__(**{**hf.config.to_dict(), "rope_parameters": rope}))
    model.load_state_dict(hf.state_dict())
    return model.eval()


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="compares with TransformerLens 3.9's configs")
def test_llama33_config_json_gives_transformer_lens_own_rope(tmp_path):
    """The config.json of meta-llama/Llama-3.3-70B-Instruct (the released Llama NLA's base) loads with the
    NTK-by-parts rotary fields TransformerLens hard-codes for that model."""
    from transformer_lens import loading_from_pretrained

    from nla_lens import loading

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80, "head_dim": 128,
        "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "vocab_size": 128256,
        "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}}))
    ours = loading.hooked_config(loading.load_hf_config(tmp_path), n_layers=None, dtype=torch.float32, device="cpu")
    theirs = loading_from_pretrained.convert_hf_model_config("meta-llama/Llama-3.3-70B-Instruct")
    for key, value in theirs.items():
        if key not in ("n_ctx", "original_architecture", "tokenizer_name", "quantization_method"):
            assert getattr(ours, key) == value, key


def test_qwen2_ar_matches_the_paper_critic_and_reads_no_bos(bos_paths):
    ar = nl.ActivationReconstructor.from_pretrained(bos_paths["qwen2_ar"])
    tokens, mask = ar.prompt_tokens(EXPLANATIONS)
    tokenizer = AutoTokenizer.from_pretrained(bos_paths["qwen2_ar"])
    template = ref.sidecar(bos_paths["qwen2_ar"])["prompt_templates"]["ar"]
    assert [row[m.bool()].tolist() for row, m in zip(tokens, mask, strict=True)] == [
        tokenizer(template.replace("{explanation}", e))["input_ids"] for e in EXPLANATIONS]
    assert tokenizer.bos_token_id is None
    assert (ar.reconstruct(EXPLANATIONS, batch_size=2) - ref.ar_reconstruct(bos_paths["qwen2_ar"], EXPLANATIONS)
            ).abs().max() < ATOL
    # Teeth: Qwen2's q/k/v biases are part of what the AR computes.
    assert (ref.ar_reconstruct(bos_paths["qwen2_ar"], EXPLANATIONS, hooks=_zero_qkv_biases)
            - ref.ar_reconstruct(bos_paths["qwen2_ar"], EXPLANATIONS)).abs().max() > 0.1


def test_qwen2_sliding_window_blocks_are_hf_on_the_bridge_and_refused_on_hooked(tmp_path):
    """A Qwen2 / Qwen3 config with `use_sliding_window: true` slides its blocks from `max_window_layers` on. The
    bridge runs HF's attention; the HookedTransformer attended past the window (logits 0.5 off) and now refuses
    such blocks, unless an AR's kept blocks hold none."""
    tokenizer = testing.build_tokenizer()
    full = build_qwen2(tokenizer)
    sliding = Qwen2ForCausalLM(Qwen2Config(**{**full.config.to_dict(), "use_sliding_window": True, "sliding_window": 4,
                                              "max_window_layers": 2, "layer_types": None})).eval()
    sliding.load_state_dict(full.state_dict())
    assert sliding.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    folder = tmp_path / "qwen2_sliding"
    sliding.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        expected, unwindowed = sliding(ids).logits, full(ids).logits
    load = functools.partial(backends.load_model, folder, loading.load_tokenizer(folder), dtype=torch.float32,
                             device="cpu")
    assert (load(backend="bridge")(ids) - expected).abs().max() < ATOL
    # Teeth: the window bites within the text.
    assert ids.shape[1] > 3 * 4 and (expected - unwindowed).abs().max() > 0.1
    if backends.transformer_lens_major() < 4:
        with pytest.raises(nl.CheckpointError, match=r"^blocks \[2, 3\] of this checkpoint use sliding-window "
                                                     r"attention .*: it would attend past the window\. Load it with "
                                                     r"backend='bridge'"):
            load(backend="hooked")
        assert load(backend="hooked", n_layers=2).cfg.n_layers == 2  # an AR of the full-attention blocks


@contextlib.contextmanager
def _zero_qkv_biases(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.zero_()
    yield


# --- bf16: every family ---

def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("family", sorted(AVS))
def test_bf16_av_logits_sit_as_near_fp32_as_hf_bf16(request, family, family_vectors):
    folder = _folder(request, AVS[family])
    av = nl.ActivationVerbalizer.from_pretrained(folder, dtype=torch.bfloat16)
    tokens = av.prompt_tokens(len(family_vectors))
    hooks = av.injection(family_vectors, tokens).site_hooks()
    ours = av.model.run_with_hooks(tokens, fwd_hooks=hooks)
    with torch.inference_mode():  # what verbalize samples its first token from: the fast decoder's prefill
        prefill = backends.decoder(av.model, len(tokens), tokens.shape[1] + 1, hooks).prefill(tokens, hooks)

    expected = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = _hf(folder, dtype)
        with torch.no_grad(), _reference_injection(hf, folder, tokens, family_vectors):
            expected[dtype] = hf(tokens).logits.float()
    with torch.no_grad():
        plain = hf(tokens).logits
    truth, noise = expected[torch.float32], _mean_abs(expected[torch.bfloat16], expected[torch.float32])
    assert _mean_abs(ours, truth) < _bf16_bound(family) * noise
    last_noise = _mean_abs(expected[torch.bfloat16][:, -1], truth[:, -1])
    assert _mean_abs(prefill, truth[:, -1]) < _bf16_bound(family) * last_noise
    # Teeth: without the injection the logits would miss the bound several times over.
    assert _mean_abs(plain, truth) > 3 * BF16_NOISE_RATIO * noise


@pytest.fixture(scope="module")
def gemma_d48(tmp_path_factory):
    """A Gemma-3 AV with d_model = 48: sqrt(48) is not a bf16 number (62.0 for Gemma-3-12B's 3840 neither), so
    whether the embedding is scaled by the scale rounded to bf16, as HF's scaled embedding does, shows."""
    tokenizer = gemma_tokenizer()
    model = build_gemma3(tokenizer, d_model=48, seed=5)
    sidecar = paper_sidecar(token_facts(tokenizer, GEMMA_MARKER), 48, LAYER, "av", 80000.0)
    return save_folder(model, tokenizer, tmp_path_factory.mktemp("gemma_d48") / "av", sidecar)


@pytest.mark.parametrize("which", ["gemma_d48", "llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_injected_embedding_is_hf_embedding_to_the_bit(request, which, dtype):
    """hook_embed equals HF's `embed_tokens` output (Gemma: after its sqrt(d) scale, rounded to the model's
    dtype as HF rounds it) to the bit, the marker row overwritten by v * injection_scale / ||v||. That row
    is bf16's to the bit; in fp32 the order of the division and the product may move its last bit."""
    folder = request.getfixturevalue(which) if which == "gemma_d48" else _folder(request, AVS[which])
    av = nl.ActivationVerbalizer.from_pretrained(folder, dtype=dtype)
    vectors = 5.0 * torch.randn(2, av.meta.d_model, generator=torch.Generator().manual_seed(3))
    tokens = av.prompt_tokens(2)
    seen = []
    av.model.run_with_hooks(tokens, fwd_hooks=[*av.injection(vectors, tokens).fwd_hooks(),
                                               ("hook_embed", lambda x, hook: seen.append(x.detach().clone()))])
    hf = _hf(folder, dtype)
    meta = ref.sidecar(folder)
    sites = ref.marker_sites(tokens, meta["tokens"])
    with torch.no_grad():
        expected = ref.replaced_embeddings(hf, tokens, sites, vectors, meta["extraction"]["injection_scale"])
    marker = torch.zeros(tokens.shape, dtype=torch.bool)
    marker[tuple(torch.tensor(sites).T)] = True
    assert seen[0].dtype == expected.dtype == dtype
    assert torch.equal(seen[0][~marker], expected[~marker])
    if dtype == torch.bfloat16:
        assert torch.equal(seen[0][marker], expected[marker])
    else:
        torch.testing.assert_close(seen[0][marker], expected[marker], rtol=2e-7, atol=0.0)


@pytest.mark.parametrize("family", sorted(ARS))
def test_bf16_ar_sits_as_near_fp32_as_hf_bf16(request, family):
    folder = _folder(request, ARS[family])
    ours = nl.ActivationReconstructor.from_pretrained(folder, dtype=torch.bfloat16).reconstruct(EXPLANATIONS)
    expected = {dtype: ref.ar_reconstruct(folder, EXPLANATIONS, dtype=dtype)
                for dtype in (torch.float32, torch.bfloat16)}
    noise = _mean_abs(expected[torch.bfloat16], expected[torch.float32])
    assert _mean_abs(ours, expected[torch.float32]) < _bf16_bound(family) * noise
    # Teeth: another explanation lands far further away than bf16 rounds.
    assert _mean_abs(expected[torch.float32][0], expected[torch.float32][1]) > 10 * noise


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama", "gemma", "gemma_multimodal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_on_load_base_is_hf_hidden_states_k_plus_1(request, family, dtype):
    """`nl.capture` on `nl.load_base` reads HF's `hidden_states[K + 1]` of the BOS-first text (the AV folder
    stands in for the base: same architecture)."""
    folder = _folder(request, AVS[family])
    with pytest.warns(UserWarning, match="not the base model"):
        base = nl.load_base(folder, dtype=dtype)
    tokens = base.to_tokens(TEXT)
    ids = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]
    assert tokens[0].tolist() == ids == text_ids(base.tokenizer, TEXT)
    with nl.capture(base, LAYER, positions=torch.ones_like(tokens, dtype=torch.bool)) as captured:
        base(tokens)
    expected = {}
    for reference_dtype in {torch.float32, dtype}:
        hf = ref.text_causal_lm(_hf(folder, reference_dtype))
        with torch.no_grad():
            expected[reference_dtype] = hf.model(torch.tensor([ids]), output_hidden_states=True
                                                 ).hidden_states[LAYER + 1][0].float()
    if dtype == torch.float32:
        assert (captured.vectors - expected[dtype]).abs().max() < ATOL
    else:
        noise = _mean_abs(expected[dtype], expected[torch.float32])
        assert _mean_abs(captured.vectors, expected[torch.float32]) < _bf16_bound(family) * noise


# --- bf16: HF's eager attention to the bit, every family ---

# Where KV-cached decode steps are not HF eager's to the bit: (family, backend) -> (steps off, most they are off by).
# TL's attention softmaxes its bf16 scores in torch's bf16 kernel, whose sum over a row depends on the row's length,
# so a cached step's row (the keys so far) and the full forward's (masked past the query) can round a probability
# one bf16 step apart; HF's eager attention softmaxes in fp32. The tiny Llama's step 18: one probability in block 3.
DECODE_OFF_EAGER = {("llama", "hooked"): (1, 2**-9)}
# TL's RMSNorm divides by sqrt(mean x^2 + eps) where HF's multiplies by its rsqrt: fp32 results an ulp apart, of which
# a few survive the bf16 cast. On the CPUs CI ran on until 2026-12-06 none did for these inputs; where torch's CPU
# kernels are AVX2 ones (an AMD EPYC of this project's kind, 2026-12-06) some do: 20 elements of the tiny Llama's
# block-2 query differ (TL's W_Q einsum on HF's normed input is HF's Linear to the bit), and the Llama's outputs and
# Qwen3's decode steps were off eager's by 1/40-1/30 of HF's own SDPA-vs-eager gap (mean absolute); Qwen2's stayed
# to the bit, and Gemma-3's (its norms compute HF's arithmetic). There: a tenth of that gap.
AVX2_KERNELS = torch.backends.cpu.get_cpu_capability() == "AVX2"
AVX2_OFF_EAGER = 0.1


def _assert_hf_eager(ours: torch.Tensor, eager: torch.Tensor, sdpa: torch.Tensor, steps_off: int = 0,
                     most: float = 0.0) -> None:
    """`ours` is HF eager's to the bit but for `steps_off` positions (dim 1) off by at most `most`; on AVX2 kernels,
    within `AVX2_OFF_EAGER` of HF's own SDPA-vs-eager gap."""
    if AVX2_KERNELS:
        assert (ours - eager).abs().mean() <= AVX2_OFF_EAGER * (sdpa - eager).abs().mean()
        return
    assert (ours != eager).any(dim=2).any(dim=0).sum() <= steps_off
    assert (ours - eager).abs().max() <= most


@pytest.mark.parametrize("family", sorted(AVS))
def test_bf16_av_logits_and_decode_steps_are_hf_eager_attention_to_the_bit(request, family, family_vectors):
    """What is left of the bf16 gap to HF's default forward (0.78-1.31x HF's own bf16 error) is HF's attention, not
    nla_lens: HF's default SDPA keeps the q.k scores and the softmax in fp32 and rounds once at its output, where
    HF's eager attention (which the bridge loads) rounds the scores and the probabilities to bf16, as TL's attention
    does. Against eager, the injected prompt's logits (Qwen3's Karvonen add at layer 1's output, the others' replaced
    embedding) and every KV-cached decode step's (each decoder verbalize may run) are HF's to the bit, on either
    backend, but for `DECODE_OFF_EAGER` (and on AVX2 kernels: `AVX2_KERNELS`). (Before Gemma-3's norms computed HF's
    arithmetic, its outputs were not.)"""
    folder = _folder(request, AVS[family])
    av = nl.ActivationVerbalizer.from_pretrained(folder, dtype=torch.bfloat16)
    tokens = av.prompt_tokens(len(family_vectors))
    continuation = torch.tensor(av.tokenizer.encode(CONTINUATION, add_special_tokens=False)).expand(len(tokens), -1)
    full = torch.cat([tokens, continuation], dim=1)
    hooks = av.injection(family_vectors, tokens).site_hooks()
    decoders = [backends.decoder(av.model, len(tokens), full.shape[1], hooks)]
    if backends.default_backend() == "hooked":
        from nla_lens import decoding  # HookedTransformer's: TL 3.x only

        decoders.append(decoding.HookedDecoder(av.model, len(tokens), "the fallback"))
    with torch.inference_mode():
        decoded = [torch.stack([decoder.prefill(tokens, hooks)] + [decoder.step(ids) for ids in continuation.T[:-1]],
                               dim=1) for decoder in decoders]
    ours = av.model.run_with_hooks(tokens, fwd_hooks=hooks)

    hf, sdpa = _hf(folder, torch.bfloat16, attn_implementation="eager"), _hf(folder, torch.bfloat16)
    with torch.no_grad():
        expected, expected_steps = _injected_logits(hf, folder, tokens, full, family_vectors)
        sdpa_logits, sdpa_steps = _injected_logits(sdpa, folder, tokens, full, family_vectors)
        plain = hf(tokens).logits
    _assert_hf_eager(ours.detach(), expected, sdpa_logits)
    steps_off, most = DECODE_OFF_EAGER.get((family, backends.default_backend()), (0, 0.0))
    for steps in decoded:
        _assert_hf_eager(steps, expected_steps, sdpa_steps, steps_off, most)
    # Teeth: the injection moves the logits, and HF's default attention rounds otherwise.
    assert (expected - plain).abs().max() > 0.1
    assert (sdpa_logits - expected).abs().max() > 1e-3


def _injected_logits(hf, folder, tokens, full, vectors) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's logits of the injected prompt, and of each continuation step (the full sequence's, at the positions a
    KV-cached decoder predicts from)."""
    with _reference_injection(hf, folder, tokens, vectors):
        prompt = hf(tokens).logits
    with _reference_injection(hf, folder, full, vectors):
        steps = hf(full).logits[:, tokens.shape[1] - 1:full.shape[1] - 1]
    return prompt, steps


@pytest.mark.parametrize("family", sorted(ARS))
def test_bf16_ar_and_capture_are_hf_eager_attention_to_the_bit(request, family):
    """The AR's bf16 reconstructions and `nl.capture`'s bf16 residual (HF's `hidden_states[K + 1]`) are HF's eager
    attention forward to the bit, on either backend."""
    folder, av_folder = _folder(request, ARS[family]), _folder(request, AVS[family])
    ar = nl.ActivationReconstructor.from_pretrained(folder, dtype=torch.bfloat16)
    ours = ar.reconstruct(EXPLANATIONS, batch_size=2)  # one row padded
    expected = ref.ar_reconstruct(folder, EXPLANATIONS, dtype=torch.bfloat16, attn_implementation="eager")
    assert torch.equal(ours.float(), expected)
    with pytest.warns(UserWarning, match="not the base model"):
        base = nl.load_base(av_folder, dtype=torch.bfloat16)
    tokens = base.to_tokens(TEXT)
    with nl.capture(base, LAYER, positions=torch.ones_like(tokens, dtype=torch.bool)) as captured:
        base(tokens)
    with torch.no_grad():
        hidden = _hf(av_folder, torch.bfloat16, attn_implementation="eager").model(
            tokens, output_hidden_states=True).hidden_states[LAYER + 1][0]
    assert torch.equal(captured.vectors.float(), hidden.float())


# --- KV-cached decoding: every family, fp32 and bf16 ---

@pytest.mark.parametrize("family", sorted(AVS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("which", ["default", "tl_forward"])
def test_kv_cached_decode_steps_are_hf_full_forward_logits(request, family, dtype, which, family_vectors):
    """verbalize's decoders fed a fixed continuation: the default one (on `hooked` the fast one, Gemma-3's own
    included; on the bridge HF's cache) and on `hooked` the fallback a hook sends it to (TL's forward with TL's
    cache). Their prefill's and every step's logits are HF's full forward over prompt + continuation under the
    training code's injection, at DECODE_ATOL in fp32, and in bf16 as near HF fp32 as HF's own bf16 forward is
    (measured: 0.93-1.10x; Gemma-3's 1.25x while the hooked backend rounded its norms' 1 + w to bf16). Gemma's 24
    steps run on past its sliding window of 6."""
    if which == "tl_forward" and backends.default_backend() != "hooked":
        pytest.skip("the bridge has one decoder")
    folder = _folder(request, AVS[family])
    av = nl.ActivationVerbalizer.from_pretrained(folder, dtype=dtype)
    tokens = av.prompt_tokens(len(family_vectors))
    continuation = torch.tensor(av.tokenizer.encode(CONTINUATION, add_special_tokens=False)).expand(len(tokens), -1)
    full = torch.cat([tokens, continuation], dim=1)
    hooks = av.injection(family_vectors, tokens).site_hooks()
    if which == "default":
        decoder = backends.decoder(av.model, len(tokens), full.shape[1], hooks)
    else:
        from nla_lens import decoding  # HookedTransformer's: TL 3.x only

        decoder = decoding.HookedDecoder(av.model, len(tokens), "the fallback")
    with torch.inference_mode():
        steps = [decoder.prefill(tokens, hooks)] + [decoder.step(ids) for ids in continuation.T[:-1]]
    ours = torch.stack(steps, dim=1).float()

    decoded = slice(tokens.shape[1] - 1, full.shape[1] - 1)  # the positions whose logits pick each next token
    expected = {}
    for reference_dtype in dict.fromkeys((torch.float32, dtype)):
        hf = _hf(folder, reference_dtype)
        with torch.no_grad(), _reference_injection(hf, folder, full, family_vectors):
            expected[reference_dtype] = hf(full).logits[:, decoded].float()
        if reference_dtype == torch.float32:
            with torch.no_grad():
                plain = hf(full).logits[:, decoded]
    truth = expected[torch.float32]
    if dtype == torch.float32:
        assert (ours - truth).abs().max() < DECODE_ATOL
    else:
        assert _mean_abs(ours, truth) < _bf16_bound(family) * _mean_abs(expected[dtype], truth)
    # Teeth: every step reads the injected prompt back from the cache.
    assert (truth - plain).abs().amax(dim=(0, 2)).min() > 1e-2
