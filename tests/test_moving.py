"""`.to()` on a loaded AV, AR and NLA: moved and cast as torch's `Module.to` does, checked as a load checks."""

from __future__ import annotations

import pytest
import torch
from conftest import D_MODEL

import nla_lens as nl
from nla_lens import backends
from nla_lens.toy import TOY_DIR

HOOKED = backends.default_backend() == "hooked"
NEEDS_HOOKED = pytest.mark.skipif(not HOOKED, reason="the bridge backend refuses a cast (tested below)")
TEXTS = ["the sea is calm", "a storm that is longer than that", "a"]


def _state(nla: nl.NLA) -> list:
    """Where each model and the readout are, in which dtype, and what TransformerLens's cfg says."""
    return [(model.W_E.device, model.W_E.dtype, model.cfg.device, model.cfg.dtype)
            for model in (nla.av.model, nla.ar.model)] + [(nla.ar.readout.weight.device, nla.ar.readout.weight.dtype)]


def _tiny_nla(tiny_paths, **kwargs) -> nl.NLA:
    return nl.NLA.from_pretrained(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], **kwargs)


def test_to_takes_a_device_and_a_dtype_as_torch_does():
    from nla_lens.checks import resolve_move

    assert resolve_move(None, None) == (None, None)
    assert resolve_move(torch.float64, None) == (None, torch.float64)  # av.to(torch.float64)
    assert resolve_move("bf16", None) == (None, torch.bfloat16)
    assert resolve_move("cpu", "double") == (torch.device("cpu"), torch.float64)
    assert resolve_move(None, "fp16") == (None, torch.float16)
    with pytest.raises(nl.InputError, match=r"^to\(torch\.float16, 'bf16'\) names two dtypes; pass to\(device, "):
        resolve_move(torch.float16, "bf16")
    # A dtype torch has but runs no model in is refused as a dtype, not as "not a torch device"
    for name in ["float8_e4m3fn", "int8"]:
        with pytest.raises(nl.InputError, match=rf"^dtype '{name}' is not one nla_lens loads; pass a torch dtype or "):
            resolve_move(name, None)


@NEEDS_HOOKED
def test_an_nla_cast_to_float64_verbalizes_reconstructs_and_round_trips_as_a_float64_load():
    """There was no `.to()`: a user reloaded. TL's own `model.to(dtype)` casts the rotary tables of the load's dtype,
    where a float64 load computes them in float64: a float32 model cast so ran float32's angles."""
    toy = nl.toy.load()
    ids = toy.av.tokenizer.encode("Macbeth: My lord, the king is dead, and I must go.")
    vectors = toy.activations(ids)[2:8]
    nla = toy.nla
    assert nla.to(torch.float64) is nla
    fresh = nl.NLA.from_pretrained(TOY_DIR / "av", TOY_DIR / "ar", dtype=torch.float64)
    assert _state(nla) == _state(fresh)
    moved_out, fresh_out = nla.av.verbalize(vectors), fresh.av.verbalize(vectors)
    assert [v.tokens for v in moved_out] == [v.tokens for v in fresh_out]
    explanations = [v.explanation for v in fresh_out if v.explanation is not None]
    assert len(explanations) == len(vectors)  # the toy explains each: the AR reads every row
    # Bit for bit (measured 0.0); with the float32 tables cast, reconstructions were 7.6e-6 apart
    assert torch.allclose(nla.ar.reconstruct(explanations), fresh.ar.reconstruct(explanations), rtol=0, atol=1e-12)
    moved_rt, fresh_rt = nla.round_trip(vectors), fresh.round_trip(vectors)
    assert moved_rt.explanations == fresh_rt.explanations
    assert torch.allclose(moved_rt.mse, fresh_rt.mse, rtol=0, atol=1e-12)
    assert moved_rt.fve == pytest.approx(fresh_rt.fve, abs=1e-12)


@NEEDS_HOOKED
@pytest.mark.filterwarnings("ignore:.*the injection probably failed")  # the tiny AVs babble
@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_a_cast_computes_each_kind_of_rotary_table_as_a_load_does(bos_paths, family):
    """Gemma-3's local and global layers have tables of their own (other bases, global scaling), Llama-3's its
    NTK-by-parts frequencies: each is computed afresh, shared by the layers of its kind as a load shares it."""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths[f"{family}_av"]).to(torch.float64)
    fresh = nl.ActivationVerbalizer.from_pretrained(bos_paths[f"{family}_av"], dtype=torch.float64)
    tables = {name: table for name, table in av.model.named_buffers() if ".rotary_" in name}
    fresh_tables = dict(fresh.model.named_buffers())
    assert all(torch.equal(table, fresh_tables[name]) for name, table in tables.items())
    assert len({t.data_ptr() for t in tables.values()}) == len({fresh_tables[n].data_ptr() for n in tables})
    vectors = 5.0 * torch.randn(3, av.model.cfg.d_model, generator=torch.Generator().manual_seed(7))
    assert av.verbalize(vectors, max_new_tokens=12) == fresh.verbalize(vectors, max_new_tokens=12)


@NEEDS_HOOKED
def test_after_a_cast_the_readout_and_the_model_share_the_dtype(tiny_paths, vectors):
    """`ar.model.to(dtype)` cast the model alone; `ar.to(dtype)` casts the readout with it, and reads what an AR
    loaded in that dtype reads."""
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    assert ar.to("bf16") is ar
    assert ar.model.W_E.dtype == ar.model.cfg.dtype == ar.readout.weight.dtype == torch.bfloat16
    fresh = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"], dtype=torch.bfloat16)
    assert torch.equal(ar.reconstruct(TEXTS), fresh.reconstruct(TEXTS))  # the float32 weights round as a load rounds
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"])
    assert av.to(torch.float16) is av and av.model.W_E.dtype == av.model.cfg.dtype == torch.float16
    fresh_av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype=torch.float16)
    assert av.verbalize(vectors, max_new_tokens=12) == fresh_av.verbalize(vectors, max_new_tokens=12)


def _storage_layout(model: torch.nn.Module) -> dict[str, tuple]:
    """Each parameter and rotary table's dtype, shape, stride, offset into its storage, that storage's size, and
    which storage it is (numbered by first use): equal layouts share the same storages the same way, byte for byte.
    (TL's other buffers, the causal mask and the -inf fill, keep float32 in a float64 load but not through a cast.)"""
    storages: dict[int, int] = {}
    layout = {}
    tables = [(name, table) for name, table in model.named_buffers(remove_duplicate=False) if ".rotary_" in name]
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *tables]:
        storage = tensor.untyped_storage()
        number = storages.setdefault(storage.data_ptr(), len(storages)) if storage.nbytes() else None
        layout[name] = (tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), storage.nbytes(),
                        number)
    return layout


def _runs_qkv_as_one_matmul(model) -> bool:
    """What the fast decoders see: each block in HF layout (free `[out, in]` views), its q/k/v one `[rows, in]`
    matrix (`decoding._rows`)."""
    from nla_lens import decoding  # HookedTransformer's: TL 3.x only

    return all(decoding._Layer.in_hf_layout(block) and len(decoding._Layer(block).qkv) == 1 for block in model.blocks)


@NEEDS_HOOKED
def test_a_cast_keeps_the_loads_shared_storage_so_qkv_stay_one_matmul(tiny_paths, vectors):
    """The loader lays a block's q/k/v out in one storage, which the fast decoder runs as one matmul; TL's
    `model.to` gave each its own, three matmuls. A cast, and a cast there and back, now leave the storages a load in
    that dtype gives: the same sharing, strides and bytes (nothing more copied), and the same outputs."""
    nla = _tiny_nla(tiny_paths)
    for dtype in (torch.float64, torch.float32):
        assert nla.to(dtype) is nla
        fresh = _tiny_nla(tiny_paths, dtype=dtype)
        for model, fresh_model in ((nla.av.model, fresh.av.model), (nla.ar.model, fresh.ar.model)):
            assert _storage_layout(model) == _storage_layout(fresh_model)
            assert _runs_qkv_as_one_matmul(model)
            assert len({block.attn.rotary_cos.data_ptr() for block in model.blocks}) == 1
        assert nla.av.verbalize(vectors, max_new_tokens=12) == fresh.av.verbalize(vectors, max_new_tokens=12)
        assert torch.equal(nla.ar.reconstruct(TEXTS), fresh.ar.reconstruct(TEXTS))


@NEEDS_HOOKED
@pytest.mark.filterwarnings("ignore:.*the injection probably failed")  # the tiny AVs babble
@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_a_cast_keeps_the_loads_shared_storage_on_other_families(bos_paths, family):
    """Gemma-3 (its norms' own `_apply`, two kinds of rotary table) and Llama-3 keep their load's sharing, shapes,
    strides and offsets too. (A float64 load keeps Gemma's norms in float32, which a cast widens: no value changes.)"""
    av = nl.ActivationVerbalizer.from_pretrained(bos_paths[f"{family}_av"]).to(torch.float64)
    fresh = nl.ActivationVerbalizer.from_pretrained(bos_paths[f"{family}_av"], dtype=torch.float64)
    without_dtype = [{name: (*entry[1:4], entry[5]) for name, entry in _storage_layout(model).items()}
                     for model in (av.model, fresh.model)]
    assert without_dtype[0] == without_dtype[1]
    assert _runs_qkv_as_one_matmul(av.model)


@NEEDS_HOOKED
def test_a_move_keeps_a_users_tied_weights_tied_and_copies_only_a_slices_bytes(tiny_paths):
    """A storage the model's tensors read whole moves whole, so weights a user tied stay tied (TL's `to` untied
    them); one that holds more than the model reads (a slice of a user's larger tensor) moves tensor by tensor, as
    torch moves it: only the slice's bytes are copied."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"])
    model = av.model
    model.unembed.W_U.data = model.embed.W_E.data.T  # tied as HF ties them, the unembedding a view of the embedding
    larger = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(3))
    model.blocks[0].ln1.w.data = larger[1]
    embedding, ln1 = model.embed.W_E.detach().clone(), model.blocks[0].ln1.w
    av.to(torch.float64)
    assert model.unembed.W_U.untyped_storage().data_ptr() == model.embed.W_E.untyped_storage().data_ptr()
    assert torch.equal(model.unembed.W_U, embedding.double().T) and torch.equal(model.embed.W_E, embedding.double())
    assert model.blocks[0].ln1.w is ln1 and ln1.requires_grad  # the user's Parameter, moved in place
    assert torch.equal(ln1, larger[1].double()) and ln1.untyped_storage().nbytes() == D_MODEL * 8
    assert _runs_qkv_as_one_matmul(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_move_to_a_gpu_and_back_keeps_the_loads_shared_storage(tiny_paths, vectors):
    """The move `.to()` is mostly for: onto a GPU, where the fast decoder's one q/k/v matmul matters most."""
    nla = _tiny_nla(tiny_paths)
    for device in ("cuda", "cpu"):
        assert nla.to(device) is nla
        fresh = _tiny_nla(tiny_paths, device=device)
        for model, fresh_model in ((nla.av.model, fresh.av.model), (nla.ar.model, fresh.ar.model)):
            assert model.W_E.device.type == device and model.cfg.device == device
            assert {name: entry[:5] for name, entry in _storage_layout(model).items()} == {
                name: entry[:5] for name, entry in _storage_layout(fresh_model).items()}
            if HOOKED:
                assert _storage_layout(model) == _storage_layout(fresh_model)
                assert _runs_qkv_as_one_matmul(model)
        assert nla.av.verbalize(vectors, max_new_tokens=12) == fresh.av.verbalize(vectors, max_new_tokens=12)
        assert torch.allclose(nla.ar.reconstruct(TEXTS), fresh.ar.reconstruct(TEXTS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("move", [{"device": "meta"}, {"device": torch.device("meta")},
                                  {"dtype": torch.float8_e4m3fn}, {"device": "gpu"}],
                         ids=["meta", "meta_device", "float8", "gpu"])
def test_a_move_a_load_refuses_is_refused_and_changes_nothing(tiny_paths, move):
    """`.to("meta")` would leave shapes without weights, float8 a model torch cannot run: refused as at load, before
    anything moves."""
    nla = _tiny_nla(tiny_paths)
    before, reconstructed = _state(nla), nla.ar.reconstruct(TEXTS)
    for thing in (nla, nla.av, nla.ar):
        with pytest.raises(nl.InputError, match=r"^(device 'meta' holds no values|dtype torch\.float8_e4m3fn is a "
                                                r"storage format|device 'gpu' is not a torch device)"):
            thing.to(**move)
    assert _state(nla) == before
    assert torch.equal(nla.ar.reconstruct(TEXTS), reconstructed)


@NEEDS_HOOKED
def test_an_nla_checks_both_models_before_moving_either(tiny_paths):
    """An AR that cannot move (its model on the meta device) is refused before the AV is cast."""
    nla = _tiny_nla(tiny_paths)
    nla.ar.model.to("meta", print_details=False)
    with pytest.raises(nl.InputError, match=r"^the AR model's weights \(.+\) are on the meta device"):
        nla.to(torch.float64)
    assert nla.av.model.W_E.dtype == nla.av.model.cfg.dtype == torch.float32


def test_an_ar_whose_readout_is_on_the_meta_device_is_refused_before_moving(tiny_paths):
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    ar.readout.to("meta")
    with pytest.raises(nl.InputError, match=r"^the AR's readout \(value head\) is on the meta device, which holds no "
                                            r"values, so there is nothing to move: load the AR again"):
        ar.to("cpu")


def test_a_move_to_the_device_it_is_on_keeps_cfg_and_outputs(tiny_paths, vectors):
    nla = _tiny_nla(tiny_paths)
    before = _state(nla)
    verbalized, reconstructed = nla.av.verbalize(vectors, max_new_tokens=8), nla.ar.reconstruct(TEXTS)
    assert nla.to("cpu", torch.float32) is nla and nla.av.to(torch.device("cpu")) is nla.av
    assert _state(nla) == before and nla.av.model.cfg.device == "cpu"
    assert nla.av.verbalize(vectors, max_new_tokens=8) == verbalized
    assert torch.equal(nla.ar.reconstruct(TEXTS), reconstructed)


def test_the_bridge_refuses_a_cast_and_says_to_load_again(tiny_paths):
    """TL 4.3's `TransformerBridge.to(dtype)` casts HF's float32 rotary frequencies too: a bridge cast from float32 to
    bfloat16 wrote other greedy tokens than one loaded in bfloat16 (logits 0.11 apart). Refused, as float64 is at
    load; its own dtype and device moves go through."""
    nla = _tiny_nla(tiny_paths, backend="bridge")
    before = _state(nla)
    for thing, role in ((nla, "AV"), (nla.av, "AV"), (nla.ar, "AR")):
        with pytest.raises(nl.BackendError, match=rf"^the {role} model cannot be cast to bfloat16 on the bridge "
                                                  r"backend .* Load it again with dtype=torch\.bfloat16; a move to "
                                                  r"another device alone \(\.to\(device\)\) is fine"):
            thing.to("cpu", torch.bfloat16)
        with pytest.raises(nl.BackendError, match=rf"^float64 is not supported on the bridge backend .* Keep the "
                                                  rf"{role} model in float32, or use TransformerLens 3\.x"):
            thing.to(torch.float64)
    assert _state(nla) == before
    assert nla.to("cpu", "float32") is nla and _state(nla) == before
    assert nla.ar.reconstruct(TEXTS).shape == (len(TEXTS), D_MODEL)
