"""The fast decoder computes what TransformerLens's own KV-cached forward computes (its hooks:
test_fast_hooks.py); the loader's HF-layout storage makes TL's per-forward rearranges free."""

from __future__ import annotations

import einops
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nla_lens as nl
from nla_lens import backends

if backends.default_backend() != "hooked":  # before importing a HookedTransformer-only module
    pytest.skip("the fast decoder serves the TL 3.x (HookedTransformer) backend", allow_module_level=True)

from nla_lens.decoding import ARForward, FastDecoder, HookedDecoder, decoder_for  # noqa: E402

STEPS = 10


def _run_both(av, vectors, atol, steps=STEPS):
    tokens = av.prompt_tokens(len(vectors))
    fast = decoder_for(av.model, len(vectors), tokens.shape[1] + steps, [])
    assert isinstance(fast, FastDecoder), fast.fallback_reason
    hooked = HookedDecoder(av.model, len(vectors), "the reference")
    with torch.inference_mode():
        ours = fast.prefill(tokens, av.injection(vectors, tokens).site_hooks())
        theirs = hooked.prefill(tokens, av.injection(vectors, tokens).site_hooks())
        for step in range(steps + 1):
            if step:
                ids = theirs.argmax(dim=-1)
                ours, theirs = fast.step(ids), hooked.step(ids)
            assert (ours - theirs).abs().max() <= atol, step
            assert torch.equal(ours.argmax(dim=-1), theirs.argmax(dim=-1)), step  # the same greedy tokens


def test_loaded_weights_sit_in_hf_layout_so_tl_rearranges_are_views(av_karvonen):
    attn, mlp = av_karvonen.model.blocks[1].attn, av_karvonen.model.blocks[1].mlp
    for w in (attn.W_Q, attn._W_K, attn._W_V):
        assert einops.rearrange(w, "n m h -> (n h) m").is_contiguous()
    assert einops.rearrange(attn.W_O, "n h m -> m (n h)").is_contiguous()
    assert mlp.W_in.T.is_contiguous() and mlp.W_gate.T.is_contiguous() and mlp.W_out.T.is_contiguous()
    assert av_karvonen.model.W_U.T.is_contiguous()
    # q/k/v are consecutive rows of one storage: one matmul when decoding.
    assert attn._W_K.data_ptr() == attn.W_Q.data_ptr() + attn.W_Q.numel() * attn.W_Q.element_size()
    assert attn._W_V.data_ptr() == attn._W_K.data_ptr() + attn._W_K.numel() * attn._W_K.element_size()


@pytest.mark.parametrize("n", [1, 5])
def test_fast_decoder_logits_are_tl_bits_with_kv_cache(av_karvonen, vectors, n):
    """fp32 logits equal TL's at every step, for one row (where torch's CPU matmul multiplies TL's head views
    in place, another kernel) and for several; the last block computes every position, as TL does."""
    rows = torch.cat([vectors, -vectors])[:n]
    _run_both(av_karvonen, rows, atol=0.0)


@pytest.mark.parametrize("family", ["llama_av", "qwen2_av"])
def test_fast_decoder_steps_of_a_batch_are_tl_bits_over_a_long_cache(bos_paths, family):
    """Several fp32 rows decoded past 25 cached keys (Llama's prompt alone is 41 tokens), where torch's CPU
    matmul leaves its small-product kernel: TL's step multiplies a pos-major copy of a batch's keys, whose
    rounding depends on where each output row starts. Read d_head-major in place, logits moved by up to 7e-7."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths[family])
    vectors = 5.0 * torch.randn(3, av.model.cfg.d_model, generator=torch.Generator().manual_seed(7))
    _run_both(av, vectors, atol=0.0, steps=20)


def test_fast_decoder_matches_in_bf16_and_after_a_dtype_move(tiny_paths, vectors):
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype=torch.bfloat16)
    _run_both(av, vectors, atol=0.0)
    av.model.to(torch.float64)  # each parameter gets its own storage: q/k/v run as three matmuls
    _run_both(av, vectors.double(), atol=0.0)


@pytest.mark.parametrize("texts", [["x", "the sea and the park and a dog ran " * 12, "one"], ["a cat"]],
                         ids=["left_padded", "one_row"])
def test_fast_ar_last_residual_is_tl_bits(ar_paper, texts):
    """Explanations of 1 to 100+ tokens in one left-padded batch, and a batch of one: fp32 bits equal TL's."""
    tokens, mask = ar_paper.prompt_tokens(texts)
    assert (mask == 0).any() == (len(texts) > 1)
    with torch.inference_mode():
        fast = ARForward(ar_paper.model)(tokens, mask)
        reference = ar_paper.model(tokens, attention_mask=mask)[:, -1]
    assert torch.equal(fast, reference)


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a device value back to the host: on a GPU each one waits for the queue."""

    READS = (torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
             torch.ops.aten._local_scalar_dense.default)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def test_reconstruct_reads_the_device_back_once_per_call_not_per_batch(ar_paper):
    """The fast blocks (which test each block's biases) are built once per call: built per batch, eight
    batches made nine times the host reads of one (the AR ran at 0.73x of HF on an H200)."""
    texts = ["a cat", "the sea and the park", "one", "x y z"] * 2
    counts = []
    for batch_size in (len(texts), 1):
        with _HostReads() as reads:
            ar_paper.reconstruct(texts, batch_size=batch_size)
        counts.append(reads.count)
    assert ar_paper.fallback_reason is None
    assert counts[0] == counts[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_qwen2_qkv_biases_round_as_tl_in_half_precision(bos_paths, dtype):
    """Qwen2's q/k/v biases are added inside the matmul, as TL's F.linear adds them: added after it, the
    bf16 residual moved by up to 0.12 and the AV's logits by up to 0.8."""
    ar = nl.ActivationReconstructor.from_pretrained(bos_paths["qwen2_ar"], dtype=dtype)
    tokens, mask = ar.prompt_tokens(["x", "the sea and the park and a dog ran " * 12, "one"])
    assert bool(ar.model.blocks[0].attn.b_Q.any())
    with torch.inference_mode():
        fast = ARForward(ar.model)(tokens, mask)
        reference = ar.model(tokens, attention_mask=mask)[:, -1]
    assert torch.equal(fast, reference)


@pytest.mark.parametrize("max_new_tokens", [1, 3])
def test_short_generations_stop_where_asked(av_karvonen, vectors, max_new_tokens):
    out = av_karvonen.verbalize(vectors, max_new_tokens=max_new_tokens, progress=False)
    assert all(1 <= len(o.tokens) <= max_new_tokens for o in out)
