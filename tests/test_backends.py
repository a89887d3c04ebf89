"""Both TransformerLens backends: how one is picked, the hook names nla_lens relies on, the KV cache.

The rest of the suite runs unchanged on whichever backend the installed TransformerLens implies
(CI runs it on 3.x and on 4.x); the tests here pin what differs between the two.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from base_batches import load_base, no_hooks_left, padded
from conftest import LAYER
from safetensors.torch import load_file, save_file

import hf_reference as ref
import nla_lens as nl
from nla_lens import backends, loading
from nla_lens.capture import resid_post

ATOL = 1e-5
MAX_NEW = 12


def test_default_backend_follows_the_transformer_lens_major(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected = "hooked" if backends.transformer_lens_major() < 4 else "bridge"
    assert backends.default_backend() == expected


def test_backend_env_var_overrides_and_unknown_names_are_refused(monkeypatch, tiny_paths):
    monkeypatch.setenv(backends.ENV_VAR, "bridge")
    assert backends.default_backend() == "bridge"
    monkeypatch.setenv(backends.ENV_VAR, "hookedtransformer")
    with pytest.raises(nl.BackendError, match=r"\$NLA_LENS_BACKEND is 'hookedtransformer'; pick one of"):
        backends.default_backend()
    with pytest.raises(nl.BackendError, match="backend is 'tl5'"):
        nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], backend="tl5")


@pytest.mark.skipif(backends.transformer_lens_major() < 4, reason="HookedTransformer exists on 3.x")
def test_hooked_backend_on_transformer_lens_4_says_how_to_get_it(tiny_paths):
    with pytest.raises(nl.BackendError, match="transformer-lens==3.9.0"):
        nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"], backend="hooked")


def test_hooked_backend_from_the_env_var_on_transformer_lens_4_says_to_unset_it(monkeypatch):
    """The commands take no backend=: on TL 4.x, $NLA_LENS_BACKEND=hooked (left from a 3.x setup) was answered with
    "Use backend='bridge'", which a shell user cannot pass. TL 4.x stood in for on the 3.x leg."""
    monkeypatch.setattr(backends, "transformer_lens_major", lambda: 4)
    monkeypatch.setenv(backends.ENV_VAR, "hooked")
    with pytest.raises(nl.BackendError, match=r"\$NLA_LENS_BACKEND asks for it: unset it or set it to 'bridge'") as exc:
        backends.resolve_name()
    assert "backend='bridge'" not in str(exc.value) and "transformer-lens==3.9.0" in str(exc.value)
    with pytest.raises(nl.BackendError, match=r"\(removed in 4.0\)\. Use backend='bridge'"):
        backends.resolve_name("hooked")


@pytest.mark.skipif(backends.default_backend() == "hooked", reason="training runs on the hooked backend")
def test_training_on_the_bridge_is_a_backend_error_saying_how_to_get_tl3(base_folder, dataset_meta, av_karvonen,
                                                                          tmp_path):
    from nla_lens.training import export_av, init_ar, init_av

    match = r"training needs the TL 3.x backend: pip install 'nla_lens\[tl3\]'"
    for init in (init_av, init_ar):
        with pytest.raises(nl.BackendError, match=match):
            init(base_folder, dataset_meta)
    with pytest.raises(nl.BackendError, match=r"export needs the TL 3.x backend.*model is a TransformerBridge"):
        export_av(av_karvonen, tmp_path / "av", base_folder)
    assert not (tmp_path / "av").exists()


@pytest.mark.parametrize(("command", "setting"), [
    ("train-av", {"hook_point": "blocks.1.hook_resid_mid"}),  # a site the bridge refuses with its own words
    ("train-ar", {}),
    ("train-rl", {}),
])
def test_training_runs_on_the_bridge_say_training_needs_tl3_before_reading_the_activations(
        tmp_path, capsys, monkeypatch, base_folder, dataset_meta, tiny_paths, command, setting):
    """On both legs (the bridge chosen by $NLA_LENS_BACKEND on TL 3.x). run_train_av / run_train_ar / run_train_rl
    read, labelled and split the whole extraction before the backend refused (train-rl's command too: the others'
    checked the backend among their early checks, where a hook point was otherwise judged by the bridge's rules)."""
    from nla_lens.cli import main
    from nla_lens.sidecar import dump_meta
    from nla_lens.training import ARRunConfig, AVRunConfig, RLRunConfig, load_config, pipeline

    monkeypatch.setattr(pipeline, "load_activations", lambda *a, **k: pytest.fail("activations read"))
    monkeypatch.setenv(backends.ENV_VAR, "bridge")
    (tmp_path / "acts").mkdir()
    dump_meta(dataset_meta.raw, tmp_path / "acts")  # an extraction's sidecar and no shards: nothing may read them
    (tmp_path / "explanations.jsonl").write_text("")
    models = ({"av": str(tiny_paths["av_karvonen"]), "ar": str(tiny_paths["ar_paper"])} if command == "train-rl"
              else {"base_model": str(base_folder)})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**models, "activations": str(tmp_path / "acts"),
                                      "explanations": str(tmp_path / "explanations.jsonl"),
                                      "out_dir": str(tmp_path / "out"), **setting}))
    assert main([command, str(config)]) == 2
    assert "BackendError: training needs the TL 3.x backend" in capsys.readouterr().err
    config_cls, run = {"train-av": (AVRunConfig, pipeline.run_train_av),
                       "train-ar": (ARRunConfig, pipeline.run_train_ar),
                       "train-rl": (RLRunConfig, pipeline.run_train_rl)}[command]
    with pytest.raises(nl.BackendError, match=r"training needs the TL 3.x backend: pip install 'nla_lens\[tl3\]'"):
        run(load_config(config_cls, config))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["extract", "train-av", "train-ar", "train-rl"])
def test_training_commands_on_the_bridge_say_training_needs_tl3_before_checking_their_inputs(
        tmp_path, capsys, monkeypatch, command):
    """examples/ run from a clone on TL 4.3, before `nla-lens extract`: train-av said its activations did not exist
    ("nla-lens extract writes it"), and only then did extract say training needs TL 3.x."""
    from nla_lens.cli import main

    monkeypatch.setenv(backends.ENV_VAR, "bridge")
    monkeypatch.chdir(tmp_path)  # no runs/ here: every input the example names is missing
    config = Path(__file__).parents[1] / "examples" / f"{command}.yaml"
    assert main([command, str(config)]) == 2
    err = capsys.readouterr().err
    assert f"nla-lens {command}: BackendError: training needs the TL 3.x backend" in err and "ConfigError" not in err


def test_the_model_built_is_the_chosen_backends(av_karvonen, ar_paper):
    assert backends.backend_of(av_karvonen.model) == backends.default_backend()
    assert backends.backend_of(ar_paper.model) == backends.default_backend()
    with pytest.raises(nl.BackendError, match=r"\(HookedTransformer or TransformerBridge\), got Linear"):
        backends.backend_of(torch.nn.Linear(2, 2))


def test_load_model_takes_a_folder_as_a_string(av_karvonen, tiny_paths):
    """As `loading.load_tokenizer` does: a str folder raised TypeError ('str' / 'str') on both backends."""
    folder = str(tiny_paths["av_karvonen"])
    model = backends.load_model(folder, loading.load_tokenizer(folder), dtype="float32", device="cpu")
    tokens = av_karvonen.prompt_tokens(1)
    assert backends.backend_of(model) == backends.default_backend()
    assert torch.equal(model(tokens), av_karvonen.model(tokens))


def test_hook_names_carry_the_hf_tensors(av_karvonen, tiny_paths, vectors):
    """The names nla_lens and its users hook, with the shapes HookedTransformer gives them."""
    model, cfg = av_karvonen.model, av_karvonen.model.cfg
    tokens = av_karvonen.prompt_tokens(2)
    names = ["hook_embed", "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre", "blocks.3.attn.hook_z"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)

    hf, _ = ref.load_hf(tiny_paths["av_karvonen"])
    o_proj_in = {}
    handle = hf.model.layers[3].self_attn.o_proj.register_forward_pre_hook(
        lambda _m, args: o_proj_in.setdefault("z", args[0]))
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    handle.remove()
    batch, pos = tokens.shape
    expected = {
        "hook_embed": hidden[0],
        "blocks.1.hook_resid_post": hidden[2],  # output of decoder layer 1
        "blocks.2.hook_resid_pre": hidden[2],
        "blocks.3.attn.hook_z": o_proj_in["z"].reshape(batch, pos, cfg.n_heads, cfg.d_head),
    }
    for name, value in expected.items():
        assert cache[name].shape == value.shape, name
        assert (cache[name] - value).abs().max() < ATOL, name
    assert cache["blocks.3.attn.hook_z"].shape == (batch, pos, cfg.n_heads, cfg.d_head)


def test_to_tokens_adds_no_bos(av_karvonen):
    text = "The cat sat on the mat."
    assert av_karvonen.model.to_tokens(text)[0].tolist() == av_karvonen.tokenizer.encode(text)


def test_hooks_see_the_prompt_at_prefill_then_one_token_per_step(av_karvonen, vectors):
    seen = []
    with av_karvonen.model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: seen.append(a.shape))]):
        out = av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    n, d_model = len(vectors), av_karvonen.meta.d_model
    steps = max(len(o.tokens) for o in out)
    assert seen == [(n, av_karvonen.prompt_tokens(1).shape[1], d_model)] + [(n, 1, d_model)] * (steps - 1)


@pytest.mark.parametrize("which", ["av_karvonen", "av_embedding"])
def test_kv_cached_greedy_decoding_equals_full_recompute(request, which, vectors):
    """Catches a KV cache that stops filling (transformer-lens 4.3 with transformers 5.24): the
    reference recomputes the whole sequence every step, with the same injection at the prompt."""
    av = request.getfixturevalue(which)
    out = av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    tokens = av.prompt_tokens(len(vectors))
    prompt = av.injection(vectors, tokens)
    for _ in range(MAX_NEW):  # each run extends the prompt: the injection goes in at its sites again
        with torch.inference_mode():
            logits = av.model.run_with_hooks(tokens, fwd_hooks=prompt.fwd_hooks())
        tokens = torch.cat([tokens, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    recomputed = tokens[:, prompt.token_shape[1]:].tolist()
    assert [o.tokens for o in out] == [row[:len(o.tokens)] for o, row in zip(out, recomputed, strict=True)]
    assert max(len(o.tokens) for o in out) == MAX_NEW  # the comparison covers many decode steps


def test_mismatched_weight_shapes_are_refused(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down_proj.weight"][:, :64].contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(nl.CheckpointError, match="config.json and the weights disagree"):
        nl.ActivationVerbalizer.from_pretrained(folder)


@pytest.mark.skipif(backends.default_backend() != "bridge", reason="the bridge's HF cache only")
def test_a_kv_cache_that_stays_empty_is_an_error_not_wrong_text(av_karvonen, vectors, monkeypatch):
    """What transformers 5.24 does to transformer-lens 4.3: attention never writes the cache."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", lambda self, k, v, **kwargs: (k, v))
    with pytest.raises(nl.BackendError, match="KV cache holds 0 positions"):
        av_karvonen.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    assert no_hooks_left(av_karvonen.model)  # the failing prefill took its injection hook with it


@pytest.mark.skipif(backends.default_backend() != "bridge", reason="the bridge's float32 attention softmax")
def test_a_bridge_cast_to_float64_after_loading_is_refused_as_a_float64_load_is(tiny_paths, vectors):
    """TL 4.3's bridge softmaxes attention in float32, where a float64 mask's padding value is -inf: loading in
    float64 is refused, but `model.to(torch.float64)` after a float32 load gave NaN rows without a word (the AR's
    shorter explanation, three of the four rows of a padded capture)."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"])
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    base = load_base(tiny_paths["av_karvonen"])
    tokens, mask = padded(base, "left")
    explanations = ["the sea", "a longer explanation of the sea and the mat"]
    av.model.double()
    ar.model.to(torch.float64)
    base.to(torch.float64)
    refused = (r"^float64 is not supported on the bridge backend \(TransformerLens 4\.x\): .* comes out NaN\. The {} "
               r"model was cast to float64 after loading .*: cast it back with model\.to\(torch\.float32\)")
    with pytest.raises(nl.BackendError, match=refused.format("AV")):
        av.verbalize(vectors, max_new_tokens=2, progress=False)
    with pytest.raises(nl.BackendError, match=refused.format("AR")):
        ar.reconstruct(explanations)
    with pytest.raises(nl.BackendError, match=refused.format("base")):
        with nl.capture(base, LAYER, -1, attention_mask=mask):
            base(tokens, attention_mask=mask)
    with pytest.raises(nl.BackendError, match=refused.format("base")):
        resid_post(base, tokens, LAYER, attention_mask=mask)
    assert no_hooks_left(base) and no_hooks_left(av.model) and no_hooks_left(ar.model)
    ar.model.to(torch.float32)  # cast back, as the message says: every row finite again
    assert torch.isfinite(ar.reconstruct(explanations)).all()


@pytest.mark.skipif(backends.transformer_lens_major() >= 4, reason="both backends exist on 3.x only")
def test_both_backends_agree_on_one_install(tiny_paths, vectors):
    """On TransformerLens 3.9 both models can be built: same logits, explanations and vectors."""
    hooked = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_embedding"], backend="hooked")
    bridge = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_embedding"], backend="bridge")
    tokens = hooked.prompt_tokens(len(vectors))
    logits = [av.model.run_with_hooks(tokens, fwd_hooks=av.injection(vectors, tokens).fwd_hooks())
              for av in (hooked, bridge)]
    assert (logits[0] - logits[1]).abs().max() < 2 * ATOL  # each is within ATOL of plain HF
    kwargs = dict(max_new_tokens=MAX_NEW, progress=False)
    assert hooked.verbalize(vectors, **kwargs) == bridge.verbalize(vectors, **kwargs)
    texts = ["a cat", "The cat sat on the mat."]
    ars = [nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_paper"], backend=b) for b in backends.BACKENDS]
    assert (ars[0].reconstruct(texts) - ars[1].reconstruct(texts)).abs().max() < 2 * ATOL


def test_a_resid_mid_patch_reaches_the_residual_stream_or_is_refused(base, av_karvonen):
    """HookedTransformer's resid_mid is the residual the MLP output is added to; the bridge's is the MLP
    norm's input (ln2.hook_in), so a write there skips the residual add and patching_study refuses it."""
    tokens = base.to_tokens(["The cat sat on the mat.", "The dog sat on the mat."])
    shift = torch.ones(base.cfg.d_model)
    post = []
    for name in ("blocks.1.hook_resid_mid", "blocks.1.hook_attn_out"):  # resid_mid = resid_pre + attn_out
        with torch.no_grad():
            base.run_with_hooks(tokens, stop_at_layer=2, fwd_hooks=[
                (name, lambda x, hook: x + shift), ("blocks.1.hook_resid_post", lambda x, hook: post.append(x))])
    reaches = bool((post[0] - post[1]).abs().max() < ATOL)
    assert reaches == (backends.backend_of(base) == "hooked")
    patch = dict(patch_layer=1, patch_position=2, activation_name="resid_mid", max_new_tokens=2)
    if reaches:
        study = nl.patching_study(base, av_karvonen, tokens, tokens.flip(0), **patch)
        assert study.hook_name == "blocks.1.hook_resid_mid"
    else:
        with pytest.raises(nl.BackendError, match=r"ln2.hook_in.*Patch 'resid_pre', 'attn_out' or 'resid_post'"):
            nl.patching_study(base, av_karvonen, tokens, tokens.flip(0), **patch)


def test_an_injection_at_resid_mid_reaches_the_residual_stream_or_is_refused(tiny_paths, monkeypatch):
    """The injection is a write too: at the bridge's resid_mid it moved the MLP's input only, so the AV read a
    different vector than on HookedTransformer (the toy's explanation changed) without a word. The bridge
    refuses it before reading any weight."""
    load = dict(injection="karvonen", hook_point="blocks.1.hook_resid_mid")
    if backends.default_backend() == "hooked":
        av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], **load)
        assert av.injection_spec.hook_point == "blocks.1.hook_resid_mid"
    else:
        monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
        with pytest.raises(nl.BackendError, match=r"ln2.hook_in.*patch or injection written there"):
            nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], **load)


@pytest.mark.skipif(backends.default_backend() != "bridge", reason="a name only the bridge has")
def test_an_injection_at_the_bridges_own_name_of_resid_mid_is_refused(tiny_paths):
    """`blocks.1.ln2.hook_in` is the bridge's resid_mid under its own name: the name check let it through and the
    AV injected into the MLP's input alone, silently."""
    with pytest.raises(nl.BackendError, match=r"blocks.1.hook_resid_mid is the MLP norm's input"):
        nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], injection="karvonen",
                                                hook_point="blocks.1.ln2.hook_in")


def test_a_hook_the_caller_left_on_the_bridge_stays_through_verbalize_and_the_helpers(tiny_paths, vectors):
    """TransformerLens 3.9's bridge (`backend="bridge"` there) removes on leaving its `hooks()`, `run_with_hooks` and
    `run_with_cache` every hook at their context level on each hook point they touched, the caller's too: a steering
    hook left at the injection's point by `run_with_hooks(..., reset_hooks_end=False)` went with the prefill's
    injection (the decode steps ran unsteered, and the hook was gone), and hooks left at a steered or patched point, or
    at the block where the helpers' base runs stop, went with those runs."""
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], backend="bridge")
    model = av.model
    steer = 4.0 * torch.randn(av.meta.d_model, generator=torch.Generator().manual_seed(13))
    at_injection = [(av.injection_spec.hook_point, lambda resid, hook: resid + steer)]
    with model.hooks(fwd_hooks=at_injection):
        expected = av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False)
    base = backends.load_model(tiny_paths["av_karvonen"], av.tokenizer, backend="bridge", dtype=torch.float32,
                               device="cpu")
    tokens, mask = padded(base, "left")
    calls: dict[str, int] = {}
    left = ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", f"blocks.{LAYER + 1}.hook_resid_pre"]
    try:
        model.run_with_hooks(av.prompt_tokens(1), fwd_hooks=at_injection, reset_hooks_end=False)
        assert av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False) == expected
        assert len(model.hook_dict[av.injection_spec.hook_point].fwd_hooks) == 1
        base.run_with_hooks(tokens, attention_mask=mask, reset_hooks_end=False, fwd_hooks=[
            (name, lambda resid, hook, name=name: calls.update({name: calls.get(name, 0) + 1})) for name in left])
        calls.clear()
        nl.steer_then_verbalize(base, av, tokens, attention_mask=mask, steering_vector=steer, scale=1.0,
                                steer_layer=1, max_new_tokens=2)
        nl.patching_study(base, av, tokens, tokens.flip(0), attention_mask=mask.flip(0) * mask, patch_layer=1,
                          patch_position=-1, max_new_tokens=2)
        assert [len(base.hook_dict[name].fwd_hooks) for name in left] == [1, 1, 1]
        # Two steering runs, three patching runs (clean, corrupted, patched); the bridge stops them at the
        # input of block LAYER + 1, after the hooks there.
        assert calls == dict.fromkeys(left, 5)
    finally:
        model.reset_hooks()
        base.reset_hooks()
    assert av.verbalize(vectors, max_new_tokens=MAX_NEW, progress=False) != expected
    assert no_hooks_left(model) and no_hooks_left(base)
