"""`reconstruct` equals the paper's reference critic: truncated HF model, no final norm, value head."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import hf_reference as ref
import nla_lens as nl

TEXTS = [
    "a cat",
    "The cat sat on the mat. A dog ran in the park.",
    "numbers one two three",
    "Words about the weather and the sea, names of places, a question, the end of a sentence.",
    "x",
]


@pytest.mark.parametrize("which", ["ar_nanonla", "ar_paper"])
def test_reconstruct_matches_hf_truncated_model_and_readout(request, tiny_paths, which):
    ar = request.getfixturevalue(which)
    assert ar.model.cfg.n_layers == ar.meta.layer + 1
    got = ar.reconstruct(TEXTS, batch_size=64)
    expected = ref.ar_reconstruct(tiny_paths[which], TEXTS)
    assert got.shape == (len(TEXTS), ar.meta.d_model)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 1e-5
    # Padding-safe: small batches (less padding) give the same vectors.
    assert (ar.reconstruct(TEXTS, batch_size=2) - expected).abs().max() < 1e-5


def test_reconstruct_under_a_head_ablation_matches_hf_on_every_backend(ar_paper, tiny_paths):
    """README: `ar.reconstruct` runs under the AR model's hooks (here `attn.hook_z`, HF: o_proj's input)."""
    d_head = ar_paper.model.cfg.d_head

    def zero_head(z, hook):
        z[:, :, 2] = 0.0

    with ar_paper.model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_head)]):
        got = ar_paper.reconstruct(TEXTS, batch_size=2)
    expected = ref.ar_reconstruct(tiny_paths["ar_paper"], TEXTS,
                                  hooks=lambda hf: ref.head_ablation_hook(hf, 0, 2, d_head))
    assert (got - expected).abs().max() < 1e-5
    assert (got - ar_paper.reconstruct(TEXTS)).abs().max() > 1e-2  # the ablation matters


def test_ar_readout_of_last_token_residual_matches_reference(ar_paper, tiny_paths):
    tokens, mask = ar_paper.prompt_tokens(TEXTS[:1])
    resid = ar_paper.model(tokens, attention_mask=mask)
    got = ar_paper.readout(resid[:, -1])
    assert (got - ref.ar_reconstruct(tiny_paths["ar_paper"], TEXTS[:1])).abs().max() < 1e-5


def test_ar_prompt_ends_with_the_critic_suffix(ar_nanonla):
    tokens, mask = ar_nanonla.prompt_tokens(TEXTS)
    suffix = list(ar_nanonla.meta.critic_suffix_ids)
    for row in tokens.tolist():
        assert row[-len(suffix):] == suffix


def test_overlong_explanation_is_an_error_naming_the_row(ar_nanonla):
    long = " ".join(["word"] * 400)
    with pytest.raises(nl.PromptTooLongError, match="explanation 1 makes an AR prompt"):
        ar_nanonla.reconstruct(["short", long])


def test_empty_explanations_are_an_input_error(ar_nanonla):
    with pytest.raises(nl.InputError):
        ar_nanonla.reconstruct([])
    with pytest.raises(nl.InputError):
        ar_nanonla.reconstruct("a bare string, not a list")


def test_a_numpy_integer_batch_size_reads_as_its_int_and_numpy_bools_and_floats_are_refused(ar_nanonla):
    """check_counts refused batch_size=np.int64(2) as not a whole number, where positions and seeds took NumPy
    ints."""
    assert torch.equal(ar_nanonla.reconstruct(TEXTS, batch_size=np.int64(2)),
                       ar_nanonla.reconstruct(TEXTS, batch_size=2))
    for wrong in (np.bool_(True), np.float64(2.0), np.int64(0)):
        with pytest.raises(nl.InputError, match=rf"^batch_size={re.escape(repr(wrong))}: must be a whole number >= 1$"):
            ar_nanonla.reconstruct(TEXTS, batch_size=wrong)


def test_a_model_cast_after_loading_is_refused_or_read_in_the_readouts_dtype(tiny_paths):
    """`.half()` left a HookedTransformer's cfg.dtype stale and reconstruct failed deep in torch; `.to(dtype)`
    (which updates cfg.dtype) then failed at the float32 readout. Now the first is a typed error saying what to
    do, the second runs with the residual cast to the readout's dtype."""
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    texts = ["the sea is calm", "a storm"]
    reference = ar.reconstruct(texts)
    if nl.backends.backend_of(ar.model) == "hooked":
        ar.model.half()
        with pytest.raises(nl.InputError, match=r"AR model's weights are float16 but its cfg.dtype is float32.*"
                                                r"model.to\(torch.float16\)"):
            ar.reconstruct(texts)
        ar.model.float()
    ar.model.to(torch.bfloat16)
    cast = ar.reconstruct(texts)
    assert cast.dtype == torch.float32 and ar.readout.weight.dtype == torch.float32
    assert torch.allclose(cast, reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))


def test_a_bfloat16_ar_returns_float32_vectors(tiny_paths):
    """`reconstruct` returns float32 whatever the AR's dtype (its docstring's contract; scores and files take
    float32): a bfloat16 AR gave bfloat16 rows. They are the float32 AR's to bfloat16's precision."""
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"], dtype=torch.bfloat16)
    got = ar.reconstruct(TEXTS)
    expected = ref.ar_reconstruct(tiny_paths["ar_nanonla"], TEXTS)
    assert got.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.99


def test_a_readout_without_float_weights_gets_the_residual_as_it_is(tiny_paths):
    """The cast to the readout's dtype is for float readouts only: a quantized readout (int8 weights, its own
    float forward) got the residual cast to int8, every value truncated."""

    class Int8Readout(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.scale = float(linear.weight.detach().abs().max()) / 127
            self.register_buffer("weight", (linear.weight.detach() / self.scale).round().to(torch.int8))
            self.seen = []

        def forward(self, resid):
            self.seen.append(resid.dtype)
            return resid @ (self.weight.to(resid.dtype) * self.scale).T

    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    texts = ["the sea is calm", "a storm"]
    reference = ar.reconstruct(texts)
    ar.readout = Int8Readout(ar.readout)
    quantized = ar.reconstruct(texts)
    assert ar.readout.seen == [torch.float32]
    assert torch.nn.functional.cosine_similarity(quantized, reference).min() > 0.99


def test_a_readout_left_on_another_device_than_the_model_is_refused(tiny_paths):
    """`ar.model.to(device)` moves the model alone. A readout left on another device returned uninitialised memory as
    the reconstructions, without a word, when that device was meta (which stands in for a second device on this
    CPU-only suite: a readout on another GPU raised a bare RuntimeError)."""
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    ar.readout.to("meta")
    # nothing to move back: torch copies nothing off meta
    with pytest.raises(nl.InputError, match=r"^the AR's readout \(value head\) is on meta, which holds no values, but "
                                            r"its model is on cpu: load the AR again$"):
        ar.reconstruct(["the sea is calm", "a storm"])
    with pytest.raises(nl.InputError, match=r"^the AR's readout \(value head\) is on cuda:1, but its model is on cpu: "
                                            r"move the AR as one, ar\.to\(device\) \(ar\.model\.to\(\.\.\.\) moves "
                                            r"only the model\), or the readout alone, ar\.readout\.to\(ar\.device\)$"):
        ar._check_readout_device(torch.device("cuda:1"))  # a second GPU, which this suite has not


def test_an_ar_moved_to_the_meta_device_is_refused(tiny_paths):
    """`ar.model.to("meta")` keeps shapes and drops the weights; reconstruct raised a bare NotImplementedError
    ('Cannot copy out of meta tensor')."""
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    ar.model.to("meta")
    with pytest.raises(nl.InputError, match=r"^the AR model's weights \(.+\) are on the meta device, which holds no "
                                            r"values, so it cannot run: load it again onto 'cpu' or 'cuda'"):
        ar.reconstruct(["the sea is calm"])
