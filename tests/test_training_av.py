"""AV SFT on a TransformerLens model: response-only loss, the injection in every forward, exact resume,
and an export that `ActivationVerbalizer.from_pretrained` reads back with no flags."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import NEEDS_TL3
from transformer_lens.hook_points import HookPoint

import hf_reference as ref
import nla_lens as nl
from nla_lens import loading, testing
from nla_lens.injection import Injection
from nla_lens.training import TrainConfig, av_loss, av_rows, export_av, init_av, train_av

pytestmark = NEEDS_TL3

CONFIG = TrainConfig(steps=100, batch_size=16, lr=1e-3, warmup_steps=10)


@pytest.fixture(scope="module")
def trained(base_folder, dataset_meta, label_split, tmp_path_factory):
    av = init_av(base_folder, dataset_meta)
    train, held_out = label_split
    result = train_av(av, train, held_out, CONFIG, out_dir=tmp_path_factory.mktemp("av_run"), n_samples=8,
                      sample_max_new_tokens=16, progress=False)
    return av, result


def test_av_sft_halves_the_held_out_response_loss(trained):
    _, result = trained
    first, last = result.evals[0], result.evals[-1]
    drop = 1 - last["eval_loss"] / first["eval_loss"]
    # Measured: 7.13 -> 0.03 (a 99.6% drop) in 100 steps, ~4 s on one CPU thread.
    assert drop >= 0.5, f"held-out loss {first['eval_loss']:.3f} -> {last['eval_loss']:.3f} ({drop:.1%})"
    assert 1 - result.history[-1]["loss"] / result.history[0]["loss"] >= 0.5
    # The vector, not just the format, is read: greedy samples reproduce held-out labels.
    assert last["sample_exact_match"] >= 0.5, last["samples"]


def test_av_loss_scores_the_response_tokens_only(base_folder, dataset_meta, label_split):
    av = init_av(base_folder, dataset_meta)
    rows = av_rows(label_split[0], av.meta, av.tokenizer)
    index = torch.tensor([0, 5, 9])
    loss = av_loss(av, rows, index).detach()

    losses = []
    for i in index.tolist():  # one row at a time: no padding, full logits, explicit response slice
        tokens = torch.cat([rows.prompt, torch.tensor(rows.responses[i])])[None]
        inj = av.injection(rows.vectors[i:i + 1], tokens)
        with torch.no_grad():
            logits = av.model.run_with_hooks(tokens, fwd_hooks=inj.fwd_hooks())[0]
        start = rows.prompt.numel()
        losses.append(F.cross_entropy(logits[start - 1:-1], tokens[0, start:], reduction="none"))
    assert abs(float(loss) - float(torch.cat(losses).mean())) < 1e-5
    # The injected vector matters: other vectors give another loss.
    shuffled = dataclasses.replace(rows, vectors=rows.vectors.roll(1, dims=0))
    assert abs(float(av_loss(av, shuffled, index).detach()) - float(loss)) > 1e-3


def test_a_hook_the_caller_left_on_the_av_stays_through_its_training_forwards(base_folder, dataset_meta, label_split):
    """The loss ran its forward under TL's own `hooks()`, which on TransformerLens 3.x removes on exit every hook at
    its context level: a hook left by `run_with_hooks(..., reset_hooks_end=False)` (level 1) ran in the first
    forward and was gone for the rest. It now goes through nla_lens's backend helper, as `verbalize` does."""
    av = init_av(base_folder, dataset_meta)
    rows = av_rows(label_split[0], av.meta, av.tokenizer)
    point = "blocks.0.hook_resid_post"
    calls: list[int] = []
    av.model.run_with_hooks(rows.prompt[None], fwd_hooks=[(point, lambda resid, hook: calls.append(1))],
                            reset_hooks_end=False)
    try:
        for _ in range(2):
            av_loss(av, rows, torch.tensor([0, 1]))
        assert len(calls) == 3 and len(av.model.hook_dict[point].fwd_hooks) == 1
    finally:
        av.model.reset_hooks()

def test_the_injection_hook_fires_in_every_training_and_eval_forward(base_folder, dataset_meta, label_split,
                                                                     monkeypatch):
    calls = []
    original = Injection.hook

    def counting(self, activation, hook):
        calls.append(hook.name)
        return original(self, activation, hook)

    monkeypatch.setattr(Injection, "hook", counting)
    av = init_av(base_folder, dataset_meta)
    train, held_out = label_split
    config = TrainConfig(steps=3, batch_size=8, grad_accum=2, warmup_steps=0)
    train_av(av, train, held_out, config, n_samples=0, progress=False)
    eval_forwards = -(-len(held_out) // config.batch_size)
    assert len(calls) == config.steps * config.grad_accum + 2 * eval_forwards
    assert set(calls) == {"blocks.1.hook_resid_post"}


@pytest.mark.parametrize("how", ["past-the-blocks", "point-replaced"])
def test_an_injection_that_never_runs_in_the_training_forward_is_an_injection_error(tiny_paths, base_folder,
                                                                                    dataset_meta, label_split,
                                                                                    monkeypatch, how):
    """The training forward runs the blocks alone (stop_at_layer): an injection at the final norm, which `verbalize`
    serves, never fired there, nor one whose name leads to a HookPoint off the forward's path, and the AV trained on
    its prompt without the vectors, its loss falling all the same. `init_av` refuses the first; an AV loaded to train
    further reaches the forward with it."""
    if how == "past-the-blocks":
        av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], hook_point="ln_final.hook_normalized",
                                                     backend="hooked")
    else:
        av = init_av(base_folder, dataset_meta)
    point = av.injection_spec.hook_point
    if how == "point-replaced":
        monkeypatch.setitem(av.model.mod_dict, point, HookPoint())  # hooks added by name go there
    with pytest.raises(nl.InjectionError, match=rf"^the injection at {point} never ran in the teacher-forced forward, "
                                                r"so the AV would learn from its prompt without the vectors: .* inject "
                                                r"at a point inside them \(e\.g\. blocks\.1\.hook_resid_post"):
        train_av(av, *label_split, TrainConfig(steps=1, batch_size=8, warmup_steps=0), n_samples=0, progress=False)
    assert all(not hp.fwd_hooks for hp in av.model.hook_dict.values())


def test_training_runs_on_deterministic_kernels_and_restores_the_setting(base_folder, dataset_meta, label_split,
                                                                           monkeypatch):
    """Two CPU threads made reruns differ (see loop.deterministic_algorithms); every step must run with
    torch's deterministic kernels, and the caller's setting comes back afterwards."""
    seen = []
    original = Injection.hook

    def recording(self, activation, hook):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(self, activation, hook)

    monkeypatch.setattr(Injection, "hook", recording)
    train, held_out = label_split
    assert not torch.are_deterministic_algorithms_enabled()
    train_av(init_av(base_folder, dataset_meta), train, held_out, TrainConfig(steps=2, batch_size=8, warmup_steps=0),
             n_samples=0, progress=False)
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()


def test_gradient_accumulation_equals_one_batch_of_the_same_rows(base_folder, dataset_meta, label_split):
    """4 micro-batches of 4 rows take the step of one 16-row batch: the AV's loss is a mean over the step's
    response tokens, not a mean of per-micro-batch means (rows with short responses weighed more)."""
    train, held_out = label_split
    runs = []
    for batch_size, grad_accum in ((16, 1), (4, 4)):  # step s visits rows 16s .. 16s+15 of one seeded order
        av = init_av(base_folder, dataset_meta, dtype=torch.float64)
        config = TrainConfig(steps=2, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, warmup_steps=1)
        runs.append((av, train_av(av, train, held_out, config, n_samples=0, progress=False)))
    (one, whole), (accumulated, parts) = runs
    for a, b in zip(whole.history, parts.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-10)
    for (name, a), (_, b) in zip(one.model.named_parameters(), accumulated.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_resume_from_a_mid_run_checkpoint_gives_the_uninterrupted_weights(base_folder, dataset_meta, label_split,
                                                                          tmp_path):
    train, held_out = label_split
    config = TrainConfig(steps=6, batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=2, save_every=3,
                         keep_checkpoints=3, weight_decay=0.1)
    whole = init_av(base_folder, dataset_meta)
    full = train_av(whole, train, held_out, config, out_dir=tmp_path / "whole", n_samples=0, progress=False)

    resumed = init_av(base_folder, dataset_meta)
    mid = tmp_path / "whole" / "checkpoints" / "step-000003"
    # Pickle-free: weights and optimizer tensors in safetensors, scalars and history in JSON.
    assert sorted(p.name for p in mid.iterdir()) == ["optimizer.safetensors", "params.safetensors",
                                                      "trainer_state.json"]
    second = train_av(resumed, train, held_out, config, out_dir=tmp_path / "resumed", resume=mid, n_samples=0,
                      progress=False)
    assert second.history == full.history
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name

    with pytest.raises(nl.ConfigError, match="lr"):
        train_av(init_av(base_folder, dataset_meta), train, held_out, dataclasses.replace(config, lr=2e-3),
                 resume=mid, n_samples=0, progress=False)


def test_a_resume_with_another_injection_is_refused_naming_both(base_folder, dataset_meta, label_split, tmp_path):
    """The injection is no TrainConfig field: a resume with another hook_point (or method) trained the rest of the
    run at another site, and a finished run's `resume: latest` exported its weights with the new site."""
    train, held_out = label_split
    config = TrainConfig(steps=1, batch_size=8, warmup_steps=0)
    train_av(init_av(base_folder, dataset_meta), train, held_out, config, out_dir=tmp_path, n_samples=0,
             progress=False)
    moved = init_av(base_folder, dataset_meta, hook_point="blocks.2.hook_resid_post")
    with pytest.raises(nl.ConfigError, match=r"with other settings \(hook_point: 'blocks.1.hook_resid_post' in the "
                                             r"checkpoint, 'blocks.2.hook_resid_post' now\); an exact resume"):
        train_av(moved, train, held_out, config, out_dir=tmp_path, resume="latest", n_samples=0, progress=False)
    embedding = init_av(base_folder, dataset_meta, injection="embedding", injection_scale=50.0)
    with pytest.raises(nl.ConfigError, match=r"\(hook_point: 'blocks.1.hook_resid_post' in the checkpoint, "
                                             r"'hook_embed' now; injection: 'karvonen' in the checkpoint, 'embedding' "
                                             r"now; injection_scale: None in the checkpoint, 50.0 now\)"):
        train_av(embedding, train, held_out, config, out_dir=tmp_path, resume="latest", n_samples=0, progress=False)
    resumed = train_av(init_av(base_folder, dataset_meta), train, held_out, config, out_dir=tmp_path,
                       resume="latest", n_samples=0, progress=False)
    assert len(resumed.history) == 1


def test_trainable_blocks_leave_every_other_weight_untouched(base_folder, dataset_meta, label_split):
    av = init_av(base_folder, dataset_meta)
    before = {n: p.detach().clone() for n, p in av.model.named_parameters()}
    train_av(av, *label_split, TrainConfig(steps=2, lr=1e-2, warmup_steps=0, trainable_blocks=[3]), n_samples=0,
             progress=False)
    changed = {n for n, p in av.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("blocks.3.") for n in changed)
    assert "blocks.3.attn.b_O" not in changed  # a bias HF Qwen3 lacks stays frozen at zero


def test_exported_av_reloads_with_no_flags_and_identical_logits(trained, base_folder, tmp_path):
    av, _ = trained
    folder = export_av(av, tmp_path / "av", base_folder)
    reloaded = nl.ActivationVerbalizer.from_pretrained(folder)
    assert reloaded.injection_spec == av.injection_spec == nl.InjectionSpec("karvonen", "blocks.1.hook_resid_post")
    assert reloaded.eos_token_ids == av.eos_token_ids
    vectors = torch.randn(4, av.meta.d_model, generator=torch.Generator().manual_seed(5))
    tokens = av.prompt_tokens(4)
    with torch.no_grad():
        before = av.model.run_with_hooks(tokens, fwd_hooks=av.injection(vectors, tokens).fwd_hooks())
        after = reloaded.model.run_with_hooks(tokens, fwd_hooks=reloaded.injection(vectors, tokens).fwd_hooks())
    assert (before - after).abs().max() <= 1e-6
    # Plain HF transformers reads the folder too, and agrees with the reference forward hook.
    hf, _ = ref.load_hf(folder)
    sites = ref.marker_sites(tokens, ref.sidecar(folder)["tokens"])
    with torch.no_grad(), ref.karvonen_hook(hf, sites, vectors):
        expected = hf(tokens).logits
    assert (before - expected).abs().max() < 1e-5
    assert [v.text for v in reloaded.verbalize(vectors, max_new_tokens=12, progress=False)] == \
        [v.text for v in av.verbalize(vectors, max_new_tokens=12, progress=False)]


def test_an_embedding_replacement_av_exports_its_method_and_scale(base_folder, dataset_meta, label_split, tmp_path):
    with pytest.raises(nl.ConfigError, match="injection_scale"):
        init_av(base_folder, dataset_meta, injection="embedding")
    with pytest.raises(nl.ConfigError, match="injection_scale"):
        init_av(base_folder, dataset_meta, injection_scale=5.0)
    av = init_av(base_folder, dataset_meta, injection="embedding", injection_scale=5.0)
    train_av(av, *label_split, TrainConfig(steps=2, warmup_steps=0), n_samples=0, progress=False)
    reloaded = nl.ActivationVerbalizer.from_pretrained(export_av(av, tmp_path / "av", base_folder))
    assert reloaded.injection_spec == nl.InjectionSpec("embedding", "hook_embed")
    assert reloaded.meta.injection_scale == 5.0


def test_an_empty_held_out_split_is_refused_before_training(base_folder, dataset_meta, label_split):
    # The first evaluation's mean loss would divide by zero held-out tokens.
    train, held_out = label_split
    with pytest.raises(nl.InputError, match="held-out split is empty"):
        train_av(init_av(base_folder, dataset_meta), train, held_out.select([]), TrainConfig(steps=1, warmup_steps=0),
                 progress=False)


def test_a_base_tokenizer_without_eos_is_refused_before_the_weights(base_folder, dataset_meta, tmp_path, monkeypatch):
    """The AV stops on the EOS as well as on the turn end its rows end with: a tokenizer without one built an AV
    whose stop ids were [None]."""
    folder = shutil.copytree(base_folder, tmp_path / "base")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("read the weights"))
    with pytest.raises(nl.ConfigError, match=r"tokenizer \(.*\) has no EOS token"):
        init_av(folder, dataset_meta)


def test_an_av_whose_eos_is_not_the_turn_end_stops_on_the_turn_end_its_rows_end_with(base_folder, dataset_meta,
                                                                                     label_split, tmp_path):
    """Some tokenizers name as EOS a token their chat template never writes (`<|endoftext|>` in some Qwen base
    tokenizers, `<eos>` in Gemma-3's): the rows ended with it and the AV stopped on it alone, so it learned that token
    where the paper's AV learns the turn end. Here the base's EOS is made `<|endoftext|>`; its template ends a turn
    with `<|im_end|>`."""
    folder = shutil.copytree(base_folder, tmp_path / "base")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    av = init_av(folder, dataset_meta)
    im_end, endoftext = av.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert av.tokenizer.eos_token_id == endoftext != im_end
    assert av.eos_token_ids == sorted([im_end, endoftext])
    assert {row[-1] for row in av_rows(label_split[0], av.meta, av.tokenizer).responses} == {im_end}
    av.eos_token_ids = [endoftext]  # e.g. an AV folder whose generation_config.json names only the EOS
    with pytest.raises(nl.ConfigError, match=rf"^every AV training row ends the turn with '<\|im_end\|>' \(id "
                                             rf"{im_end}\), as the chat template does, but the AV stops on ids "
                                             rf"\[{endoftext}\], so it would learn to stop where generation goes "
                                             rf"on; add {im_end} to eos_token_id in the AV folder's "
                                             r"generation_config.json$"):
        train_av(av, *label_split, TrainConfig(steps=1, warmup_steps=0), n_samples=0, progress=False)


@pytest.mark.parametrize("hook_point", ["blocks.99.hook_resid_post", "blocks.1.hook_resid_pots"])
def test_init_av_refuses_a_hook_point_the_base_lacks_before_its_weights_load(base_folder, dataset_meta, monkeypatch,
                                                                            hook_point):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(loading, "load_hooked_transformer", no_weights)
    with pytest.raises(nl.InjectionError, match=f"hook point '{hook_point}'"):
        init_av(base_folder, dataset_meta, hook_point=hook_point)


@pytest.mark.parametrize("hook_point", ["ln_final.hook_normalized", "ln_final.hook_scale", "unembed.hook_in"])
def test_init_av_refuses_a_hook_point_past_the_blocks_before_its_weights_load(base_folder, dataset_meta,
                                                                             extract_config, tmp_path, monkeypatch,
                                                                             hook_point):
    """The training forward runs the injection with the blocks only (`stop_at_layer`): an AV built to inject at the
    final norm or the unembed, which `verbalize` serves, was refused only at the first training forward, its weights
    loaded (from a train-av config's hook_point too)."""
    from nla_lens.training import (
        AVRunConfig,
        extract_activations,
        label_activations,
        load_activations,
        run_train_av,
        save_explanations,
    )

    said = (rf"^hook point '{re.escape(hook_point)}' is outside the embedding and the blocks, the part of AV "
            r"training's forward that runs with the hooks on .* training injects at hook_embed or a point inside the "
            r"blocks \(blocks\.<i>\.\*, e\.g\. blocks\.1\.hook_resid_post\): set hook_point to one of those$")
    tokenizer = loading.load_tokenizer(base_folder)
    base = loading.load_hooked_transformer(base_folder, tokenizer, dtype=torch.float32, device="cpu")
    acts = extract_activations(base, tokenizer, testing.tiny_corpus(4, words_per_doc=10), tmp_path / "acts",
                               extract_config, base_model=str(base_folder), progress=False)
    save_explanations(label_activations(load_activations(acts), lambda r: "a token"), tmp_path / "labels.jsonl")
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("read the weights"))
    with pytest.raises(nl.InjectionError, match=said):
        init_av(base_folder, dataset_meta, hook_point=hook_point)
    config = AVRunConfig(base_model=str(base_folder), activations=str(acts),
                         explanations=str(tmp_path / "labels.jsonl"), out_dir=str(tmp_path / "run"),
                         hook_point=hook_point)
    with pytest.raises(nl.InjectionError, match=said):
        run_train_av(config, progress=False)


def test_an_ar_folder_as_base_model_is_named_before_its_weights_load(tiny_paths, dataset_meta, extract_config,
                                                                     monkeypatch, tmp_path):
    """Its missing final norm and unembedding were reported as an incomplete download ("download the checkpoint
    again") by train-av and extract."""
    from nla_lens.training import ExtractRunConfig, init_ar, pipeline

    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("read the weights"))
    ar_folder = tiny_paths["ar_nanonla"]
    message = f"base_model {ar_folder} is an AR checkpoint, which holds only the first K\\+1 blocks"
    for init in (init_av, init_ar):
        with pytest.raises(nl.InputError, match=message):
            init(ar_folder, dataset_meta)
    config = ExtractRunConfig(base_model=str(ar_folder), corpus=str(tmp_path / "corpus.jsonl"),
                              out_dir=str(tmp_path / "acts"), extract=extract_config)
    with pytest.raises(nl.InputError, match=message):
        pipeline.run_extract(config, progress=False)


def test_sft_tokenizer_drift_advises_the_base_the_extraction_used(base_folder, dataset_meta, monkeypatch):
    """SFT checks the extraction's token facts against base_model's tokenizer; the advice was to load the tokenizer
    saved with a checkpoint, which SFT has not got: the fix is to train the base the activations came from."""
    from nla_lens.training import init_ar

    tokens = {**dataset_meta.raw["tokens"], "injection_token_id": dataset_meta.injection_token_id + 1}
    drifted = nl.parse_meta({**dataset_meta.raw, "tokens": tokens}, source="acts/nla_meta.yaml")
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("read the weights"))
    for init, role in ((init_av, "AV"), (init_ar, "AR")):
        with pytest.raises(nl.TokenizerDriftError, match=rf"encodes to .* but the sidecar says .*: the base model's "
                                                         rf"tokenizer is not the one the activations were extracted "
                                                         rf"with \(the {role} sidecar made from acts/nla_meta.yaml\). "
                                                         rf"Train with the base model the extraction used "
                                                         rf"\({dataset_meta.base_model}\)$") as refused:
            init(base_folder, drifted)
        assert "checkpoint" not in str(refused.value)


def test_an_extractions_av_template_holding_the_marker_names_the_extractions_sidecar(base_folder, extract_config,
                                                                                    tmp_path, monkeypatch):
    """It said "sidecar: the AV template ... (restore the released template)", naming no file: the template is the
    extraction's, in its nla_meta.yaml."""
    import yaml

    from nla_lens.sidecar import load_meta
    from nla_lens.training.extraction import dataset_sidecar

    sidecar = dataset_sidecar(loading.load_tokenizer(base_folder), extract_config, base_model=str(base_folder),
                              d_model=64)
    sidecar["prompt_templates"]["actor"] += f" and <c>{sidecar['tokens']['injection_char']}</c>"
    path = tmp_path / "acts" / "nla_meta.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(sidecar, allow_unicode=True), encoding="utf-8")
    monkeypatch.setattr(loading, "load_hooked_transformer", lambda *a, **k: pytest.fail("read the weights"))
    with pytest.raises(nl.SidecarError, match="holds the marker .* itself besides the '{injection_char}' "
                                              "placeholder") as refused:
        init_av(base_folder, load_meta(path.parent))
    assert str(refused.value).startswith(f"the AV sidecar made from {path}: the AV template ")
