"""SAE features through the NLA (nla_lens.sae, nla_lens.feature_cards): checks, vectors, results, cards,
capture on a HookedSAETransformer, and the toy experiment (a real sae-lens training run) against its target."""

from __future__ import annotations

import html
import json
import math
import re
import warnings
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import docs_text
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from base_batches import no_hooks_left
from conftest import D_MODEL, HAS_SAE_LENS, LAYER, TL4, make_sae, make_transcoder, stray_byte_verbalization
from torch.multiprocessing.reductions import StorageWeakRef

import nla_lens as nl
from nla_lens import backends, display
from nla_lens.errors import BackendError

NEEDS_SAE_LENS = pytest.mark.skipif(
    not HAS_SAE_LENS,
    reason="sae-lens 6.x requires transformer-lens < 4: the TL 4.x leg has no sae-lens (CI installs the `sae` "
           "extra on the TL 3.x leg only)" if TL4 else "sae-lens not installed: pip install 'nla_lens[sae]'")


@pytest.mark.skipif(not TL4, reason="checks the TransformerLens 4.x environment, where sae-lens cannot install")
def test_sae_features_fail_with_a_typed_error_on_transformer_lens_4():
    with pytest.raises(BackendError, match="transformer-lens < 4"):
        nl.verbalize_sae_features  # noqa: B018
    with pytest.raises(BackendError, match=r"nla_lens\[tl3,sae\]"):
        import nla_lens.feature_cards  # noqa: F401


@pytest.mark.skipif(not TL4, reason="checks the TransformerLens 4.x environment, where sae-lens cannot install")
def test_the_sae_experiment_command_says_in_one_line_that_it_needs_transformer_lens_3(capsys):
    """`python -m nla_lens.toy.sae_experiment` on TransformerLens 4.x showed the traceback of its import of
    nla_lens.sae; it exits 2 with the BackendError's line, which names the install for a package and a checkout."""
    from nla_lens.toy import sae_experiment

    with pytest.raises(SystemExit) as info:
        sae_experiment.main([])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "error: SAE features need sae-lens 6.x, which requires transformer-lens < 4 (it builds on HookedTransformer); "
        f"this environment has transformer-lens {metadata.version('transformer-lens')}. Use a TransformerLens 3.x "
        "environment: pip install 'nla_lens[tl3,sae]' (from a git checkout of nla_lens: pip install -e "
        "'.[tl3,sae]')\n")


@NEEDS_SAE_LENS
def test_require_sae_lens_names_the_transformer_lens_conflict(monkeypatch):
    from nla_lens import sae

    monkeypatch.setattr(backends, "transformer_lens_major", lambda: 4)
    with pytest.raises(BackendError, match=r"requires transformer-lens < 4.*pip install 'nla_lens\[tl3,sae\]'"):
        sae.require_sae_lens()


@pytest.fixture(scope="module")
def toy():
    from nla_lens.toy.demo import TOY_DIR
    from nla_lens.toy.evaluate import ToyNLA

    return ToyNLA.load(TOY_DIR)


TOY_TEXTS = ["Macbeth: So foul and fair a day I have not seen.",
             "Miranda: O brave new world, that has such people in't!",
             "Prospero: We are such stuff as dreams are made on, and our little life is rounded with a sleep."]


@NEEDS_SAE_LENS
def test_sae_of_another_hook_or_width_is_refused_with_a_typed_error(av_karvonen):
    other = make_sae(D_MODEL, 8, f"blocks.{LAYER - 1}.hook_resid_post")
    with pytest.raises(nl.SAEMismatchError, match=rf"blocks.{LAYER - 1}.hook_resid_post.*allow_other_hook=True"):
        nl.verbalize_sae_features(av_karvonen, other, [0], max_new_tokens=2, progress=False)
    out = nl.verbalize_sae_features(av_karvonen, other, [0], allow_other_hook=True, max_new_tokens=2, progress=False)
    assert out.features == [0] and out.hook_name == f"blocks.{LAYER - 1}.hook_resid_post"
    narrow = make_sae(D_MODEL // 2, 8, f"blocks.{LAYER}.hook_resid_post")
    with pytest.raises(nl.SAEMismatchError, match=f"{D_MODEL // 2}-dim"):
        nl.verbalize_sae_features(av_karvonen, narrow, [0], allow_other_hook=True, progress=False)
    with pytest.raises(nl.InputError, match="0..7"):
        nl.verbalize_sae_features(av_karvonen, other, [8], allow_other_hook=True, progress=False)


@NEEDS_SAE_LENS
def test_an_sae_that_records_no_hook_point_is_told_how_to_name_it(av_karvonen, base):
    """An SAE built without metadata (sae-lens answers None for its hook_name) was refused as "the SAE reads None"."""
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    sae.cfg.metadata.hook_name = None
    fix = (rf"records no hook point \(sae.cfg.metadata.hook_name is None\), so nothing says it reads "
           rf"'blocks.{LAYER}.hook_resid_post'.*set sae.cfg.metadata.hook_name = 'blocks.{LAYER}.hook_resid_post'")
    with pytest.raises(nl.SAEMismatchError, match=fix):
        nl.verbalize_sae_features(av_karvonen, sae, [1], progress=False)
    with pytest.raises(nl.SAEMismatchError, match=fix):
        nl.feature_card(sae, base, ["The cat sat."], 1, av_karvonen, progress=False)
    sae.cfg.metadata.hook_name = f"blocks.{LAYER}.hook_resid_post"  # as the message says
    assert nl.verbalize_sae_features(av_karvonen, sae, [1], max_new_tokens=2, progress=False).hook_name == (
        f"blocks.{LAYER}.hook_resid_post")


def _model_warnings(caught: Any) -> list[str]:
    return [str(w.message) for w in caught if "sae.cfg.metadata.model_name" in str(w.message)]


@NEEDS_SAE_LENS
def test_an_sae_of_another_model_is_warned_of_once_naming_both_models_and_the_fix(av_karvonen, base, tmp_path):
    """sae.cfg.metadata.model_name was never read: an SAE of the NLA's width and hook trained on another model passed
    in silence, its features directions of another residual stream."""
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    sae.cfg.metadata.model_name = "google/gemma-2-2b"
    said = (r"the SAE was trained on 'google/gemma-2-2b' \(sae.cfg.metadata.model_name\) but the base model is "
            r"'tiny-qwen3' \(the NLA sidecar's base_model\){}: an SAE of another model reads another residual stream"
            r".*set sae.cfg.metadata.model_name = 'tiny-qwen3' to silence this warning")
    with pytest.warns(UserWarning) as caught:
        out = nl.verbalize_sae_features(av_karvonen, sae, [1, 2], max_new_tokens=2, progress=False)
    assert len(_model_warnings(caught)) == 1 and re.fullmatch(said.format(""), _model_warnings(caught)[0])
    assert out.verbalizations.warnings[:1] == _model_warnings(caught)  # kept: the repr, view and .parquet say it
    with pytest.warns(UserWarning) as caught:  # the card verbalizes its feature too: still one warning
        card = nl.feature_card(sae, base, ["The cat sat on the mat."], 1, av_karvonen, max_new_tokens=2,
                               progress=False)
    folder = re.escape(repr(base.cfg.model_name))
    assert len(_model_warnings(caught)) == 1
    assert re.fullmatch(said.format(rf" and {folder} \(base.cfg.model_name\)"), _model_warnings(caught)[0])
    assert card.warnings.count(_model_warnings(caught)[0]) == 1
    sae.cfg.metadata.model_name = "tiny-qwen3"  # as the message says
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        nl.verbalize_sae_features(av_karvonen, sae, [1], max_new_tokens=2, progress=False)
        sae.cfg.metadata.model_name = Path(base.cfg.model_name).name  # the folder the base was loaded from, by name
        nl.feature_card(sae, base, ["The cat sat on the mat."], 1, av_karvonen, max_new_tokens=2, progress=False)
        sae.cfg.metadata.model_name = None  # names no model: nothing to compare
        nl.verbalize_sae_features(av_karvonen, sae, [1], max_new_tokens=2, progress=False)


@NEEDS_SAE_LENS
@pytest.mark.parametrize(("trained_on", "base_name"), [
    ("Qwen/Qwen3-8B", "qwen3-8b"), ("qwen3_8b", "Qwen/Qwen3-8B"), ("Qwen/Qwen3-8B", "/models/Qwen3-8B/"),
    ("Qwen/Qwen3-8B", "/home/u/.cache/huggingface/hub/models--Qwen--Qwen3-8B/snapshots/0123abcd"),
    ("gemma-2-2b", "C:\\models\\gemma-2-2b")])
def test_model_names_match_as_hub_ids_folders_and_cache_snapshots_of_one_model(trained_on, base_name):
    from nla_lens.sae import model_key

    assert model_key(trained_on) == model_key(base_name)


@NEEDS_SAE_LENS
@pytest.mark.parametrize(("trained_on", "base_name"), [
    ("Qwen/Qwen3-8B", "Qwen/Qwen3-4B"), ("google/gemma-2-2b", "google/gemma-2-2b-it"),
    ("Qwen/Qwen3-8B", "/models/qwen3-8b-finetune")])
def test_model_names_of_other_models_differ(trained_on, base_name):
    from nla_lens.sae import model_key

    assert model_key(trained_on) != model_key(base_name)


@NEEDS_SAE_LENS
@pytest.mark.parametrize("features", [5, "5", [], None], ids=["bare_int", "str", "empty", "none"])
def test_features_that_are_not_a_list_of_ids_are_refused(av_karvonen, features):
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    with pytest.raises(nl.InputError, match=r"non-empty list of feature ids.*for one feature write \[f\]"):
        nl.verbalize_sae_features(av_karvonen, sae, features, progress=False)


@NEEDS_SAE_LENS
@pytest.mark.parametrize("bad", [{"skip_first": -1}, {"before": -1}, {"after": -2}, {"before": 1.5}, {"k": 0}])
def test_feature_card_window_and_skip_must_be_whole_numbers(toy, bad):
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    name, value = next(iter(bad.items()))
    with pytest.raises(nl.InputError, match=rf"{name}={value!r}: must be a whole number >= {int(name == 'k')}"):
        nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, **bad)
    if name == "skip_first":
        with pytest.raises(nl.InputError, match="skip_first=-1: must be a whole number >= 0"):
            nl.residual_stats(toy.base, TOY_TEXTS, toy.av.meta.layer, skip_first=-1)


@NEEDS_SAE_LENS
def test_a_card_with_no_position_left_after_skip_first_is_refused_as_residual_stats_is(toy, monkeypatch):
    """It came back empty ("active at 0/0 positions"), like a dead feature, after an AV generation."""
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    monkeypatch.setattr(toy.av, "verbalize", lambda *a, **k: pytest.fail("verbalized before the scan was checked"))
    with pytest.raises(nl.InputError, match=r"no positions left after skip_first=100: the longest text has \d+ "
                                            r"tokens; use longer texts or a smaller skip_first"):
        nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, skip_first=100)
    with pytest.raises(nl.InputError, match=r"^features \[32\] are not ints in 0..31 \(this SAE has d_sae=32\)$"):
        nl.feature_card(sae, toy.base, TOY_TEXTS, 32, toy.av)


@NEEDS_SAE_LENS
def test_sae_helpers_name_arguments_of_the_wrong_kind_or_order(toy):
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    with pytest.raises(nl.InputError, match=r"layer must be an int indexing the model's \d+ blocks \(0-\d+\), got 99"):
        nl.residual_stats(toy.base, TOY_TEXTS, 99)
    with pytest.raises(nl.InputError, match="offset must be a ResidualStats.*got Tensor"):
        nl.verbalize_sae_features(toy.av, sae, [1], offset=torch.randn(128))
    with pytest.raises(nl.InputError, match="expected a sae-lens SAE, got HookedTransformer"):
        nl.feature_card(toy.base, sae, TOY_TEXTS, 12, toy.av)
    # The two take the NLA in different places; each call in the other's order says how to call it (it said only
    # "nla must be an NLA or an ActivationVerbalizer, got int").
    with pytest.raises(nl.InputError, match=r"got int: call nl.feature_card\(sae, base, texts, feature, nla\), the "
                                            "SAE first and the NLA fifth"):
        nl.feature_card(toy.av, sae, toy.base, TOY_TEXTS, 12)
    with pytest.raises(nl.InputError, match=r"got StandardSAE: call nl.verbalize_sae_features\(nla, sae, features\), "
                                            "the NLA first"):
        nl.verbalize_sae_features(sae, toy.av, [12])


@NEEDS_SAE_LENS
def test_sae_helpers_given_the_bundled_toy_itself_say_to_pass_toy_nla(toy):
    """Both said "got ToyNLA" and no more, though the toy holds the NLA they take as `toy.nla`."""
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    toy_hint = r"got ToyNLA \(the bundled toy, not an NLA itself: pass toy\.nla\): call "
    with pytest.raises(nl.InputError, match=toy_hint + r"nl\.verbalize_sae_features"):
        nl.verbalize_sae_features(toy, sae, [12])
    with pytest.raises(nl.InputError, match=toy_hint + r"nl\.feature_card"):
        nl.feature_card(sae, toy.base, TOY_TEXTS, 12, toy)


@NEEDS_SAE_LENS
@pytest.mark.parametrize("features", [[12], [12, 40], torch.tensor([12]), np.array([12])])
def test_a_card_given_a_list_of_features_says_it_draws_one(toy, features):
    """verbalize_sae_features takes a list, so a list is what the next call gets; it was "feature ids [[12]] are
    not ints in 0..31", as if 12 were out of range."""
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    with pytest.raises(nl.InputError, match=r"draws one feature's card.*for f in features\]$"):
        nl.feature_card(sae, toy.base, TOY_TEXTS, features, toy.av)


@NEEDS_SAE_LENS
def test_a_keyword_verbalize_does_not_take_is_refused_before_any_scan_or_generation(nla, base, monkeypatch):
    """A typo in **verbalize_kwargs was verbalize's bare TypeError, in a card after the scan of every text."""
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    monkeypatch.setattr(sae, "encode", lambda *a, **k: pytest.fail("the scan started"))
    monkeypatch.setattr(nla.av, "verbalize", lambda *a, **k: pytest.fail("the AV generated"))
    with pytest.raises(nl.InputError, match=r"feature_card got the keyword\(s\) \['max_new_token'\], which neither it "
                                            r"nor verbalize takes; did you mean 'max_new_tokens'"):
        nl.feature_card(sae, base, ["The cat sat on the mat."], 3, nla, max_new_token=4)
    # reconstruct_batch_size is round_trip's: the SAE readout calls the AR with its own batches
    for reader in (nla, nla.av):
        with pytest.raises(nl.InputError, match=r"verbalize_sae_features got the keyword\(s\) "
                                                r"\['reconstruct_batch_size'\], which neither it nor verbalize takes"):
            nl.verbalize_sae_features(reader, sae, [3], reconstruct_batch_size=2)


@NEEDS_SAE_LENS
def test_a_base_without_a_tokenizer_gets_a_typed_error_before_any_scan(toy, monkeypatch):
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    monkeypatch.setattr(toy.base, "tokenizer", None)  # e.g. a HookedTransformer built from a bare config
    for scan in (lambda: nl.residual_stats(toy.base, TOY_TEXTS, toy.av.meta.layer),
                 lambda: nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av)):
        with pytest.raises(nl.InputError, match="the base model has no tokenizer.*set base.tokenizer"):
            scan()
    model = nl.hooked_sae_transformer(toy.base)  # needs no tokenizer: it runs token ids
    tokens = torch.tensor([[5, 6, 7]])
    assert model.tokenizer is None and torch.equal(model(tokens), toy.base(tokens))


@NEEDS_SAE_LENS
def test_a_decoder_stored_as_columns_is_refused_not_read_as_rows(av_karvonen):
    """sae-lens decoders are [d_sae, d_in], one row per feature; a [d_in, d_sae] one (a hand-built SAE)
    gave a misleading width error for some ids and an IndexError for others."""
    for d_sae in (8, 2 * D_MODEL):
        sae = make_sae(D_MODEL, d_sae, f"blocks.{LAYER}.hook_resid_post")
        sae.W_dec = torch.nn.Parameter(sae.W_dec.detach().T.contiguous())
        for feature in (1, d_sae - 1):
            with pytest.raises(nl.InputError, match=rf"W_dec has shape \[{D_MODEL}, {d_sae}\].*\[{d_sae}, {D_MODEL}\]"):
                nl.verbalize_sae_features(av_karvonen, sae, [feature], max_new_tokens=2, progress=False)


@NEEDS_SAE_LENS
def test_a_non_finite_decoder_row_is_named_by_its_feature_before_any_scan(av_karvonen, base, monkeypatch):
    """It was refused as "vectors at rows [0] hold NaN or Inf; check how they were computed" (the row in the
    batch, not the feature), and a feature card first scanned every text."""
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    with torch.no_grad():
        sae.W_dec[3] = float("nan")
        sae.W_dec[5, 0] = float("inf")
    monkeypatch.setattr(av_karvonen, "verbalize", lambda *a, **k: pytest.fail("verbalized a broken row"))
    for run in ("run_with_hooks", "forward"):
        monkeypatch.setattr(base, run, lambda *a, **k: pytest.fail("scanned before checking the row"))
    message = r"features \[3, 5\] have NaN or Inf in their decoder rows \(sae.W_dec\).*reload or retrain it"
    with pytest.raises(nl.VectorError, match=message):
        nl.verbalize_sae_features(av_karvonen, sae, [1, 3, 5], progress=False)
    with pytest.raises(nl.VectorError, match=message.replace("3, 5", "3")):
        nl.feature_card(sae, base, ["The cat sat on the mat."], 3, av_karvonen, progress=False)


@NEEDS_SAE_LENS
def test_an_sae_on_the_meta_device_is_told_to_load_its_weights_before_any_scan(av_karvonen, base, monkeypatch):
    """An SAE built with device="meta" (or one tensor of it left there) failed with a bare NotImplementedError
    ('Cannot copy out of meta tensor; no data!') from reading its decoder rows."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    hook = f"blocks.{LAYER}.hook_resid_post"
    built_on_meta = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=8, device="meta",
                                                  metadata=SAEMetadata(hook_name=hook)))
    decoder_on_meta = make_sae(D_MODEL, 8, hook)
    decoder_on_meta.W_dec = torch.nn.Parameter(torch.empty(8, D_MODEL, device="meta"))
    for run in ("run_with_hooks", "forward"):
        monkeypatch.setattr(base, run, lambda *a, **k: pytest.fail("scanned with an SAE that holds no values"))
    for sae, named in ((built_on_meta, "b_dec, W_dec, W_enc, b_enc are"), (decoder_on_meta, "W_dec is")):
        message = (rf"^the SAE's {named} on the meta device, which holds no values \(an SAE built with device='meta', "
                   r"its weights never loaded\): load its weights onto a real device")
        with pytest.raises(nl.VectorError, match=message):
            nl.verbalize_sae_features(av_karvonen, sae, [1], max_new_tokens=2, progress=False)
        with pytest.raises(nl.VectorError, match=message):
            nl.feature_card(sae, base, ["The cat sat on the mat."], 1, av_karvonen, max_new_tokens=2, progress=False)
    built_on_meta.load_state_dict(make_sae(D_MODEL, 8, hook).state_dict(), assign=True)  # as the message says
    assert len(nl.verbalize_sae_features(av_karvonen, built_on_meta, [1], max_new_tokens=2, progress=False)) == 1


@NEEDS_SAE_LENS
@pytest.mark.parametrize("peak", [1e40, 1e-40, 1e-50], ids=["overflow", "subnormal", "underflow"])
def test_float64_decoder_rows_past_float32s_range_are_named_by_feature_before_any_scan(av_karvonen, base, monkeypatch,
                                                                                       peak):
    """Their .float() was inf (refused as broken weights, 'NaN or Inf in their decoder rows'), zero (as an all-zero
    decoder row) or a few coarse subnormal steps (verbalized as another direction, silently)."""
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post").double()
    with torch.no_grad():
        sae.W_dec[3] *= peak / sae.W_dec[3].abs().amax()
    monkeypatch.setattr(av_karvonen, "verbalize", lambda *a, **k: pytest.fail("verbalized a row float32 cannot hold"))
    for run in ("run_with_hooks", "forward"):
        monkeypatch.setattr(base, run, lambda *a, **k: pytest.fail("scanned before checking the row"))
    message = (rf"^features \[3\] have float64 decoder rows \(sae.W_dec\) past float32's range, in which nla_lens "
               rf"verbalizes them: feature 3's largest entry is {re.escape(f'{peak:.3g}')} in magnitude.*rescale")
    with pytest.raises(nl.VectorError, match=message):
        nl.verbalize_sae_features(av_karvonen, sae, [1, 3], progress=False)
    with pytest.raises(nl.VectorError, match=message):
        nl.feature_card(sae, base, ["The cat sat on the mat."], 3, av_karvonen, progress=False)


@NEEDS_SAE_LENS
def test_a_zero_decoder_row_is_refused_by_name_with_how_to_pick_the_features_that_have_one(toy):
    """A feature whose decoder row is all zero (a pruned or dead one) writes nothing into the residual even where it
    fires: both entry points name it and say how to keep only the features with a direction."""
    from nla_lens.sae import text_residuals

    layer = toy.av.meta.layer
    sae = make_sae(128, 32, f"blocks.{layer}.hook_resid_post")
    with torch.no_grad():
        sae.W_dec[[9, 12]] = 0
        fires = sae.encode(text_residuals(toy.base, TOY_TEXTS[:1], layer)[0][1])[:, 9]
    assert float(fires.max()) > 0
    refusal = r"features \[{}\] have all-zero decoder rows.*writes nothing into the residual.*W_dec.any\(dim=1\)"
    with pytest.raises(nl.InputError, match=refusal.format("9, 12")):
        nl.verbalize_sae_features(toy.av, sae, [3, 9, 12], max_new_tokens=8, progress=False)
    with pytest.raises(nl.InputError, match=refusal.format("9")):
        nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=2, max_new_tokens=8, progress=False)
    assert 9 not in sae.W_dec.any(dim=1).nonzero().flatten().tolist()


@NEEDS_SAE_LENS
def test_a_card_refuses_nan_activations_naming_the_broken_sae_weights(av_karvonen, base, monkeypatch):
    """NaN marks the positions skip_first leaves out, so NaN from sae.encode dropped those positions without a word
    (all of them: "no positions left after skip_first=0", which blamed the texts)."""
    texts = ["The cat sat on the mat.", "A dog ran."]
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    with torch.no_grad():
        sae.b_enc[3] = float("nan")
    with pytest.raises(nl.VectorError, match=r"sae.encode gives NaN or Inf for feature 3 on texts\[0\]: NaN or Inf in "
                                             r"the SAE's b_enc; reload or retrain the SAE"):
        nl.feature_card(sae, base, texts, 3, av_karvonen, max_new_tokens=2, progress=False)
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    encode = sae.encode

    def nan_at(position: int, text: str):  # NaN at one position of one text, the SAE's weights finite
        def patched(resid):
            acts = encode(resid)
            if len(resid) == len(base.tokenizer(text)["input_ids"]):
                acts[position] = float("nan")
            return acts
        return patched

    monkeypatch.setattr(sae, "encode", nan_at(2, texts[1]))
    with pytest.raises(nl.VectorError, match=r"feature 3 on texts\[1\]: its weights and these activations are "
                                             r"finite, so its encoder overflowed in torch.float32; check sae.encode"):
        nl.feature_card(sae, base, texts, 3, av_karvonen, max_new_tokens=2, progress=False)
    monkeypatch.setattr(sae, "encode", nan_at(0, texts[1]))  # left out by skip_first: not scanned, not refused
    card = nl.feature_card(sae, base, texts, 3, av_karvonen, skip_first=1, max_new_tokens=2, progress=False)
    assert card.n_positions == sum(len(base.tokenizer(t)["input_ids"]) - 1 for t in texts)


@NEEDS_SAE_LENS
def test_a_card_refuses_infinite_activations_of_a_float16_sae_that_overflowed(av_karvonen, base):
    """A float16 SAE whose encoder overflows gives Inf: the card listed those positions first, each `inf`, their order
    arbitrary, with no word of the overflow that NaN from the same SAE was refused for."""
    from nla_lens.sae import text_residuals

    texts = ["The cat sat on the mat.", "A dog ran."]
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    with torch.no_grad():
        sae.W_enc[:, 3] *= 1e5  # ~1e4: finite in float16, its sums over d_model are not
    sae = sae.to(torch.float16)
    assert all(tensor.isfinite().all() for tensor in sae.state_dict().values())
    resid = text_residuals(base, texts[:1], LAYER)[0][1]
    assert sae.encode(resid.half())[:, 3].isinf().any()
    with pytest.raises(nl.VectorError, match=r"sae.encode gives NaN or Inf for feature 3 on texts\[0\]: its weights "
                                             r"and these activations are finite, so its encoder overflowed in "
                                             r"torch.float16; load the SAE in float32 \(sae.to\(torch.float32\)\)"):
        nl.feature_card(sae, base, texts, 3, av_karvonen, max_new_tokens=2, progress=False)


@NEEDS_SAE_LENS
def test_texts_are_any_iterable_of_strings_and_anything_else_among_them_is_named(av_karvonen, base):
    """A pandas Series or numpy array of texts was a bare ValueError ("truth value ... is ambiguous"), a generator
    broke explain_contexts with a TypeError, and a None among the texts reached the tokenizer (a bare ValueError)."""
    texts = ["The cat sat on the mat.", "A dog ran."]
    reference = nl.residual_stats(base, texts, LAYER)
    for given in (pd.Series(texts), np.array(texts), iter(texts)):
        assert torch.equal(nl.residual_stats(base, given, LAYER).mean, reference.mean)
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    fast = {"k": 2, "explain_contexts": True, "max_new_tokens": 2, "progress": False}
    card = nl.feature_card(sae, base, iter(texts), 3, av_karvonen, **fast)
    assert len(card.contexts) == 2 and card.contexts == nl.feature_card(sae, base, texts, 3, av_karvonen,
                                                                          **fast).contexts
    for scan in (lambda bad: nl.residual_stats(base, bad, LAYER),
                 lambda bad: nl.feature_card(sae, base, bad, 3, av_karvonen, progress=False)):
        with pytest.raises(nl.InputError, match=r"texts\[2\] is None \(NoneType\), not a string \(1 such item\);"):
            scan([*texts, None])
        with pytest.raises(nl.InputError, match=r"texts\[2\] is None \(NoneType\), not a string \(2 such items\);"):
            scan([*texts, None, 3])
        with pytest.raises(nl.InputError, match=r"non-empty list of strings, got Series .*one text goes in a list"):
            scan(pd.Series([], dtype=str))


@NEEDS_SAE_LENS
def test_a_lone_surrogate_among_the_texts_is_named_before_any_text_runs(base):
    """It reached the tokenizers, whose bare TypeError named no text (explain and the AR: tests/test_explain.py)."""
    with pytest.raises(nl.InputError, match=r"^texts\[1\] holds '\\ud800' at character 4, a lone surrogate"):
        nl.residual_stats(base, ["fine", "bad \ud800 text"], LAYER)


@NEEDS_SAE_LENS
def test_an_empty_text_among_the_texts_is_named_by_its_index(av_karvonen, base):
    """A text of no tokens (an empty line of a dataset, where the tokenizer adds no BOS) stopped a scan as "text ''
    has no tokens": not which of many texts, nor what to do."""
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    texts = ["The cat sat.", "", "A dog ran."]
    assert base.tokenizer("")["input_ids"] == []
    named = r"texts\[1\] \(''\) has no tokens, so there is nothing to scan in it: leave it out of texts"
    with pytest.raises(nl.InputError, match=named):
        nl.feature_card(sae, base, texts, 1, av_karvonen, max_new_tokens=2, progress=False)
    with pytest.raises(nl.InputError, match=named):
        nl.residual_stats(base, texts, LAYER)


@NEEDS_SAE_LENS
def test_numpy_integer_counts_scan_as_their_ints(av_karvonen, base):
    """residual_stats' layer, skip_first and max_tokens, and feature_card's k, before, after and skip_first, were
    refused as not whole numbers (the layer as not an int) when NumPy's, where positions and feature ids took them."""
    texts = ["The cat sat on the mat.", "A dog ran far away from home."]
    stats = nl.residual_stats(base, texts, np.int64(LAYER), skip_first=np.int64(1), max_tokens=np.int32(6))
    expected = nl.residual_stats(base, texts, LAYER, skip_first=1, max_tokens=6)
    assert type(stats.layer) is int and stats.n == expected.n == 10 and torch.equal(stats.mean, expected.mean)
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    window = {"k": 2, "before": 2, "after": 1, "skip_first": 0}  # 0: no NaN activations, which compare unequal
    fast = {"max_new_tokens": 2, "progress": False}
    numpy_window = {name: np.int64(n) for name, n in window.items()}
    card = nl.feature_card(sae, base, texts, 3, av_karvonen, **fast, **numpy_window)
    assert card.contexts == nl.feature_card(sae, base, texts, 3, av_karvonen, **fast, **window).contexts


@NEEDS_SAE_LENS
def test_residual_stats_merged_text_by_text_match_the_stats_of_all_positions_at_once(base):
    """residual_stats merges each text's block of residuals into a running mean and sum of squared distances
    (Chan et al.) instead of concatenating every position: the merge gives what the concatenation gives."""
    from nla_lens.sae import ResidualStats, RunningMoments, text_residuals

    texts = ["The cat sat on the mat.", "A dog", "The cat sat", "A dog ran far away from home.", "A dog ran."]
    blocks = [resid[2:] for _, resid in text_residuals(base, texts, LAYER)]
    assert [len(block) for block in blocks] == [5, 0, 1, 19, 2]  # one text emptied by skip_first, one left with one
    stats = nl.residual_stats(base, texts, LAYER, skip_first=2)
    expected = ResidualStats.from_vectors(torch.cat(blocks), LAYER)
    assert stats.n == expected.n == 27 and stats.layer == LAYER and stats.mean.dtype == torch.float32
    scale = float(expected.mean.abs().max())  # entries near 0 have no relative precision to speak of
    torch.testing.assert_close(stats.mean, expected.mean, rtol=1e-6, atol=1e-6 * scale)
    assert stats.spread == pytest.approx(expected.spread, rel=1e-6)
    exact = torch.cat(blocks).double()  # and both are the float64 mean and RMS distance from it
    torch.testing.assert_close(stats.mean.double(), exact.mean(dim=0), rtol=1e-6, atol=1e-6 * scale)
    spread = float((exact - exact.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt())
    assert stats.spread == pytest.approx(spread, rel=1e-6) and expected.spread == pytest.approx(spread, rel=1e-6)
    with pytest.raises(nl.VectorError, match="no residuals were added"):
        RunningMoments().stats(LAYER)


def held_outputs(monkeypatch, owner: object, name: str) -> list[int]:
    """Spy on `owner.name`, which returns a tensor: at each call, how many earlier calls' outputs still hold their
    memory. Their storage is watched, not the tensor: a view (of an inference tensor, without a `_base`) holds it."""
    made, held = [], []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        held.append(sum(not ref.expired() for ref in made))
        out = real(*args, **kwargs)
        made.append(StorageWeakRef(out.untyped_storage()))
        return out

    monkeypatch.setattr(owner, name, spy)
    return held


@NEEDS_SAE_LENS
def test_residual_stats_hold_one_texts_residuals_at_a_time(base, monkeypatch):
    """It concatenated the residual of every position before keeping a d_model mean and one number
    (1.6 GB for 100k tokens at d_model 4096)."""
    from nla_lens import sae

    texts = ["The cat sat on the mat.", "A dog ran.", "The cat sat", "A dog ran far away from home."]
    reference = nl.residual_stats(base, texts, LAYER)
    held = held_outputs(monkeypatch, sae, "text_resid_post")
    stats = nl.residual_stats(base, (text for text in texts), LAYER)
    assert len(held) == len(texts) and max(held) <= 1  # at most the previous text's, still bound to the loop
    assert torch.equal(stats.mean, reference.mean) and stats.spread == reference.spread and stats.n == reference.n


@NEEDS_SAE_LENS
def test_residual_stats_refuse_nan_residuals_unless_skip_first_leaves_them_out(base, monkeypatch):
    from nla_lens import sae

    texts = ["The cat sat on the mat.", "A dog ran.", "The cat sat"]
    read = sae.text_resid_post

    def nan_in_second_text(model, tokens, layer):
        resid = read(model, tokens, layer).clone()
        if tokens.shape[1] == 4:  # "A dog ran."
            resid[0, 5] = float("nan")
        return resid

    monkeypatch.setattr(sae, "text_resid_post", nan_in_second_text)
    with pytest.raises(nl.VectorError, match="hold NaN or Inf, which would make the mean and spread NaN"):
        nl.residual_stats(base, texts, LAYER)
    stats = nl.residual_stats(base, texts, LAYER, skip_first=1)
    assert stats.n == 7 + 4 + 3 - 3 and math.isfinite(stats.spread) and bool(stats.mean.isfinite().all())


@NEEDS_SAE_LENS
def test_hooked_sae_transformer_of_a_bf16_gemma_model_runs_it_as_loaded(bos_paths):
    """A Gemma-3 model's norms hold fp32 weights and cast after multiplying (HF's arithmetic): the SAE model built
    from it keeps them so, sharing the weights, and gives its logits bit for bit. With TL's own norms around those
    weights, bf16 activations came out fp32 and the next matmul refused them."""
    from base_batches import load_base

    gemma = load_base(bos_paths["gemma_av"], dtype=torch.bfloat16)
    model = nl.hooked_sae_transformer(gemma)
    tokens = gemma.to_tokens("The cat sat on the mat.")
    assert type(model.blocks[0].attn.q_norm) is type(gemma.blocks[0].attn.q_norm)
    assert model.ln_final.w is gemma.ln_final.w and model.blocks[1].ln2_post.w is gemma.blocks[1].ln2_post.w
    assert "blocks.0.ln1.hook_normalized" in model.hook_dict
    assert torch.equal(model(tokens), gemma(tokens))


@NEEDS_SAE_LENS
def test_sae_scans_leave_out_the_bos_by_default_as_explain_does(bos_paths, av_karvonen, base):
    """On a Gemma / Llama tokenizer the BOS (an attention sink with a huge norm) went into residual_stats' mean and
    spread, and into a feature card's contexts, while `explain` leaves it out by default."""
    from base_batches import load_base

    from nla_lens.explain import bos_skip
    from nla_lens.sae import ResidualStats, text_residuals

    texts = ["The cat sat on the mat.", "A dog ran far away from home."]
    gemma_av = nl.ActivationVerbalizer.from_pretrained(bos_paths["gemma_av"])
    gemma = load_base(bos_paths["gemma_av"])
    for model, av, bos in ((gemma, gemma_av, 1), (base, av_karvonen, 0)):  # the tiny Qwen base puts no BOS first
        encoded = text_residuals(model, texts, LAYER)
        assert [bos_skip(model.tokenizer, ids) for ids, _ in encoded] == [bos] * len(texts)
        stats = nl.residual_stats(model, texts, LAYER)
        expected = ResidualStats.from_vectors(torch.cat([resid[bos:] for _, resid in encoded]), LAYER)
        # streamed text by text, summed in another order: float32 rounding of the largest entry, not the BOS's norm
        scale = float(expected.mean.abs().max())
        assert stats.n == expected.n and torch.allclose(stats.mean, expected.mean, rtol=1e-6, atol=1e-6 * scale)
        assert stats.spread == pytest.approx(expected.spread)
        sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
        with torch.no_grad():  # feature 3 fires at position 0, hardest of all if that position is scanned
            sae.b_dec.zero_()
            sae.b_enc.zero_()
            sae.W_enc[:, 3] = 100 * encoded[0][1][0] / encoded[0][1][0].norm() ** 2
        card = nl.feature_card(sae, model, texts, 3, av, k=50, max_new_tokens=2, progress=False)
        assert card.n_positions == sum(len(ids) - bos for ids, _ in encoded)
        assert (min(c.position for c in card.contexts) > 0) == bool(bos)
        assert nl.feature_card(sae, model, texts, 3, av, k=50, skip_first=0, max_new_tokens=2,
                               progress=False).contexts[0].position == 0
    # A text that is only a BOS leaves nothing: the card says how to scan the BOS after all
    with pytest.raises(nl.InputError, match=r"skip_first=None \(the BOS\); use longer texts$"):
        nl.residual_stats(gemma, [""], LAYER)
    with pytest.raises(nl.InputError, match=r"skip_first=None \(the BOS\): the longest text has 1 token; use longer "
                                            r"texts or skip_first=0 to scan the BOS$"):
        nl.feature_card(sae, gemma, [""], 3, gemma_av, k=1, max_new_tokens=2, progress=False)


@NEEDS_SAE_LENS
def test_next_blocks_resid_pre_is_the_same_residual(av_karvonen):
    from nla_lens.sae import check_sae_reads_layer

    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER + 1}.hook_resid_pre")
    assert check_sae_reads_layer(sae, LAYER, D_MODEL) == f"blocks.{LAYER + 1}.hook_resid_pre"


@NEEDS_SAE_LENS
def test_a_transcoder_is_checked_where_its_decoder_writes_not_where_it_reads(av_karvonen, base):
    """A transcoder's decoder rows are directions of the hook point it writes (hook_name_out, d_out). One that read
    the NLA's residual and wrote the next block's was verbalized as if its rows were this residual's, silently; one of
    another d_out was told to transpose its decoder."""
    residual, after = f"blocks.{LAYER}.hook_resid_post", f"blocks.{LAYER + 1}.hook_resid_post"
    writes_after = make_transcoder(D_MODEL, D_MODEL, 8, residual, after)
    elsewhere = (rf"reads '{residual}' and writes '{after}', so its decoder rows are directions of '{after}', but the "
                 rf"NLA verbalizes '{residual}'.*allow_other_hook=True")
    with pytest.raises(nl.SAEMismatchError, match=elsewhere):
        nl.verbalize_sae_features(av_karvonen, writes_after, [1], max_new_tokens=2, progress=False)
    with pytest.raises(nl.SAEMismatchError, match=elsewhere):
        nl.feature_card(writes_after, base, ["The cat sat."], 1, av_karvonen, max_new_tokens=2, progress=False)
    narrow = make_transcoder(D_MODEL, D_MODEL // 2, 8, residual, f"blocks.{LAYER}.hook_mlp_out")
    with pytest.raises(nl.SAEMismatchError,
                       match=rf"writes {D_MODEL // 2}-dim activations \(blocks.{LAYER}.hook_mlp_out\)"):
        nl.verbalize_sae_features(av_karvonen, narrow, [1], allow_other_hook=True, progress=False)
    unnamed = make_transcoder(D_MODEL, D_MODEL, 8, residual, None)
    with pytest.raises(nl.SAEMismatchError, match=rf"hook_name_out is None\), so nothing says it writes '{residual}'.*"
                                                   rf"set sae.cfg.metadata.hook_name_out = '{residual}'"):
        nl.verbalize_sae_features(av_karvonen, unnamed, [1], progress=False)
    mid = f"blocks.{LAYER}.hook_resid_mid"  # writes the NLA's residual from block K's middle: its rows are ours
    writes_here = make_transcoder(D_MODEL, D_MODEL, 8, mid, residual)
    out = nl.verbalize_sae_features(av_karvonen, writes_here, [1, 5], max_new_tokens=2, progress=False)
    assert out.hook_name == mid and torch.equal(out.vectors, writes_here.W_dec.detach()[[1, 5]])
    writes_here.cfg.metadata.hook_name = None
    with pytest.raises(nl.SAEMismatchError, match=rf"no hook point to read \(sae.cfg.metadata.hook_name is None; it "
                                                   rf"writes '{residual}'\)"):
        nl.verbalize_sae_features(av_karvonen, writes_here, [1], progress=False)


def _assert_top_4_contexts(card, toy, sae, hook):
    """`card` (k=4, feature 9 over TOY_TEXTS) holds the 4 strongest activations of the feature at `hook`, as sae-lens
    encodes that hook's activations, in order, and counts every active token."""
    every = [(float(a), t, p) for t, text in enumerate(TOY_TEXTS)
             for p, a in enumerate(_reference_activations(toy, sae, text, 9, hook).tolist()) if a > 0]
    top = sorted(every, key=lambda e: (-e[0], e[1], e[2]))[:4]
    assert len(top) == 4 and card.hook_name == hook and card.n_active == len(every)
    assert [(c.text, c.position) for c in card.contexts] == [(t, p) for _, t, p in top]
    assert [c.activation for c in card.contexts] == pytest.approx([a for a, _, _ in top], abs=1e-5)


@NEEDS_SAE_LENS
def test_a_card_of_a_transcoder_that_writes_the_residual_scans_where_it_reads(toy):
    """Its encoder reads `hook_name`: the contexts are the activations there, as sae-lens computes them."""
    layer = toy.av.meta.layer
    mid = f"blocks.{layer}.hook_resid_mid"
    transcoder = make_transcoder(128, 128, 32, mid, f"blocks.{layer}.hook_resid_post")
    card = nl.feature_card(transcoder, toy.base, TOY_TEXTS, 9, toy.av, k=4, max_new_tokens=2, progress=False)
    _assert_top_4_contexts(card, toy, transcoder, mid)


@NEEDS_SAE_LENS
def test_an_sae_of_the_heads_z_is_refused_even_with_allow_other_hook_and_told_its_residual_direction(av_karvonen,
                                                                                                      base):
    """An attention SAE (blocks.L.attn.hook_z, d_in = n_heads * d_head, here d_model) decodes into the heads' z, before
    W_O. allow_other_hook=True let its z-space rows be verbalized as residuals, silently; its card then refused the
    per-head hook point without saying what to do."""
    n_heads, d_head = base.cfg.n_heads, base.cfg.d_head
    assert n_heads * d_head == D_MODEL
    z_name = f"blocks.{LAYER}.attn.hook_z"
    attention = make_sae(D_MODEL, 8, z_name)
    recipe = (rf"heads' z \({z_name}\), before W_O.*allow_other_hook=True does not let it in.*einsum\('hd,hdm->m', "
              rf"sae.W_dec\[f\].reshape\(n_heads, d_head\), base.blocks\[{LAYER}\].attn.W_O\).*nl.verbalize_direction")
    for allow in (False, True):
        with pytest.raises(nl.SAEMismatchError, match=recipe):
            nl.verbalize_sae_features(av_karvonen, attention, [1], allow_other_hook=allow, progress=False)
    with pytest.raises(nl.SAEMismatchError, match=recipe):
        nl.feature_card(attention, base, ["The cat sat."], 1, av_karvonen, allow_other_hook=True, progress=False)
    unnamed = make_sae(D_MODEL, 8, z_name)
    unnamed.cfg.metadata.hook_name, unnamed.cfg.reshape_activations = None, "hook_z"  # how sae-lens loads hook_z SAEs
    with pytest.raises(nl.SAEMismatchError, match=r"heads' z \(sae.cfg.reshape_activations='hook_z'\).*blocks\[L\]"):
        nl.verbalize_sae_features(av_karvonen, unnamed, [1], allow_other_hook=True, progress=False)

    # The direction the message gives is what the heads write: hook_attn_out moves by it where z moves by the row.
    row = attention.W_dec.detach()[1]
    tokens = base.to_tokens("The cat sat.")

    def attn_out(*fwd_hooks):
        seen = []
        base.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (f"blocks.{LAYER}.hook_attn_out",
                                                            lambda out, hook: seen.append(out[0, -1].clone()))])
        return seen[0]

    moved = attn_out((z_name, lambda z, hook: z + row.reshape(n_heads, d_head))) - attn_out()
    written = torch.einsum("hd,hdm->m", row.reshape(n_heads, d_head), base.blocks[LAYER].attn.W_O.detach())
    torch.testing.assert_close(moved, written, atol=1e-5, rtol=1e-4)
    assert no_hooks_left(base)


@NEEDS_SAE_LENS
def test_bare_features_are_verbalized_exactly_as_their_decoder_rows(av_karvonen):
    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    features = [3, 0, 11]
    out = nl.verbalize_sae_features(av_karvonen, sae, features, max_new_tokens=6, progress=False)
    reference = av_karvonen.verbalize(sae.W_dec.detach()[features], max_new_tokens=6, progress=False)
    assert out.features == features and not out.offset and out.cosines is None
    assert torch.equal(out.vectors, sae.W_dec.detach()[features])
    assert [v.tokens for v in out.verbalizations] == [v.tokens for v in reference]
    assert nl.verbalize_sae_features(av_karvonen, sae, torch.tensor(features), max_new_tokens=6,
                                     progress=False).features == features


@NEEDS_SAE_LENS
def test_mean_offset_adds_the_unit_row_scaled_to_the_residual_spread():
    from nla_lens.sae import ResidualStats, feature_vectors

    torch.manual_seed(0)
    residuals = torch.randn(50, 8) * 3 + 5
    stats = ResidualStats.from_vectors(residuals)
    mean = residuals.mean(dim=0)
    assert torch.allclose(stats.mean, mean)
    assert stats.spread == pytest.approx(float(((residuals - mean) ** 2).sum(dim=1).mean().sqrt()), rel=1e-6)
    rows = torch.randn(3, 8)
    shifted = feature_vectors(rows, stats)
    assert torch.allclose(shifted - mean, stats.spread * rows / rows.norm(dim=1, keepdim=True), atol=1e-6)
    assert (shifted - mean).norm(dim=1).allclose(torch.full((3,), stats.spread))


@NEEDS_SAE_LENS
def test_residual_stats_compare_by_identity_instead_of_raising():
    """`==` on the dataclass's tensor field raised 'Boolean value of Tensor ... is ambiguous'."""
    from nla_lens.sae import ResidualStats

    stats = ResidualStats.from_vectors(torch.randn(10, 8))
    assert stats == stats and stats != ResidualStats.from_vectors(torch.randn(10, 8))
    assert stats in [stats] and len({stats}) == 1

@NEEDS_SAE_LENS
@pytest.mark.parametrize("mean", [torch.zeros(D_MODEL, dtype=torch.long), torch.zeros(2, D_MODEL), [0.0] * D_MODEL,
                                  torch.full((D_MODEL,), float("nan")), torch.zeros(D_MODEL, device="meta")],
                         ids=["int", "2d", "list", "nan", "meta"])
def test_residual_stats_built_by_hand_refuse_a_mean_that_is_no_finite_float_vector(mean):
    """An int mean verbalized, then raised torch's RuntimeError from the result's repr; a NaN mean was 'vectors at
    rows [0] hold NaN or Inf; check how they were computed', rows of the AV's batch; a mean on the meta device was
    a bare RuntimeError ('Tensor.item() cannot be called on meta tensors')."""
    from nla_lens.sae import ResidualStats

    with pytest.raises(nl.VectorError, match=r"ResidualStats.mean (must be a \[d_model\] float tensor|holds NaN|is on "
                                             r"the meta device, which holds no values).*"
                                             r"nl.residual_stats\(base, texts, layer\)"):
        ResidualStats(mean, 3.0, 5, LAYER)
    with pytest.raises(nl.VectorError, match=r"ResidualStats.mean holds NaN or Inf \(residuals near the float32 limit"):
        ResidualStats.from_vectors(torch.full((4, D_MODEL), 3e38))  # finite residuals whose sum overflows
    ResidualStats(torch.zeros(D_MODEL, dtype=torch.float16), 3.0, 5, LAYER)  # any float dtype is a mean


@NEEDS_SAE_LENS
def test_offset_cosine_does_not_depend_on_the_ar_output_norm(nla, monkeypatch):
    """The AR was trained on rescaled targets, so its output norm means nothing: an AR that rebuilds what
    the AV was given exactly up to scale scores cosine 1 with the mean offset, whatever the scale."""
    from nla_lens.sae import ResidualStats

    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    stats = ResidualStats(torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1)) * 4, 3.0, 100, LAYER)
    given = {}

    def fake_verbalize(vectors, **kwargs):
        given["vectors"] = vectors
        return [nl.Verbalization(f"<explanation>{i}</explanation>", str(i), []) for i in range(len(vectors))]

    monkeypatch.setattr(nla.av, "verbalize", fake_verbalize)
    for scale in (0.1, 1.0, 7.0):
        monkeypatch.setattr(nla.ar, "reconstruct", lambda texts, s=scale: s * given["vectors"][[int(t) for t in texts]])
        out = nl.verbalize_sae_features(nla, sae, [2, 5, 9], offset=stats)
        assert torch.allclose(out.cosines, torch.ones(3), atol=1e-5), scale
        assert torch.allclose(out.reconstructions, scale * given["vectors"])  # the AR's own output, unscaled


@NEEDS_SAE_LENS
def test_a_tiny_decoder_row_is_a_direction_like_any_other(nla, monkeypatch):
    """Only a row's direction is read. A row of entries near 1e-10 scored a cosine near 0 (torch's cosine_similarity
    clamps the norm product at 1e-8); one near 1e-23, whose norm underflows in fp32, was refused as all-zero, and
    its offset vector was NaN."""
    from nla_lens.sae import ResidualStats

    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    features = [2, 5, 9]
    directions = sae.W_dec.detach()[features].clone()
    with torch.no_grad():
        for f, size in ((5, 1e-10), (9, 1e-23)):
            sae.W_dec[f] *= size / sae.W_dec[f].abs().max()
    generator = torch.Generator().manual_seed(2)
    stats = ResidualStats(torch.randn(D_MODEL, generator=generator) * 4, 3.0, 100, LAYER)
    rebuilt = torch.randn(3, D_MODEL, generator=generator) * 5  # what the stand-in AR returns for each explanation
    monkeypatch.setattr(nla.av, "verbalize", lambda vectors, **kwargs: [
        nl.Verbalization(f"<explanation>{i}</explanation>", str(i), []) for i in range(len(vectors))])
    monkeypatch.setattr(nla.ar, "reconstruct", lambda texts: rebuilt[[int(t) for t in texts]])
    bare = nl.verbalize_sae_features(nla, sae, features)
    assert torch.equal(bare.vectors, sae.W_dec.detach()[features])
    expected = torch.nn.functional.cosine_similarity(rebuilt, directions, dim=1)
    assert torch.allclose(bare.cosines, expected, atol=1e-5)
    shifted = nl.verbalize_sae_features(nla, sae, features, offset=stats)
    assert torch.allclose(shifted.vectors, stats.mean + 3.0 * directions / directions.norm(dim=1, keepdim=True),
                          atol=1e-5)
    at_input_norm = rebuilt * shifted.vectors.norm(dim=1, keepdim=True) / rebuilt.norm(dim=1, keepdim=True)
    expected = torch.nn.functional.cosine_similarity(at_input_norm - stats.mean, directions, dim=1)
    assert torch.allclose(shifted.cosines, expected, atol=1e-5)


@NEEDS_SAE_LENS
@pytest.mark.parametrize("offset", [False, True], ids=["bare", "offset"])
def test_a_parsed_explanation_rebuilt_with_no_direction_gets_no_cosine_and_a_warning(nla, base, monkeypatch,
                                                                                     tmp_path, offset):
    """An AR overflowing float16 rebuilds NaN, Inf or zero. A zero reconstruction scored cosine 0.000 (torch clamps
    its norm) and a NaN one a blank cosine beside parsed=True, the mean taken over the rest: both without a word."""
    from nla_lens.sae import ResidualStats

    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    generator = torch.Generator().manual_seed(3)
    stats = ResidualStats(torch.randn(D_MODEL, generator=generator), 3.0, 100, LAYER) if offset else None
    rebuilt = torch.randn(4, D_MODEL, generator=generator)
    rebuilt[0], rebuilt[1, 5], rebuilt[2, 7] = 0.0, float("nan"), float("inf")
    monkeypatch.setattr(nla.av, "verbalize", lambda vectors, **kwargs: [
        nl.Verbalization(f"<explanation>{i}</explanation>", str(i), []) for i in range(len(vectors))])
    monkeypatch.setattr(nla.ar, "reconstruct", lambda texts: rebuilt[[int(t) for t in texts]])
    features = [2, 5, 9, 11]
    with pytest.warns(UserWarning, match=r"3/4 reconstructions have no direction \(NaN, Inf or zero; features "
                                         r"\[2, 5, 9\]\), so they have no cosine.*float16") as caught:
        out = nl.verbalize_sae_features(nla, sae, features, offset=stats)
    assert caught[0].filename == __file__  # the user's line, not nla_lens's
    assert out.cosines[:3].isnan().all() and out.explanations[0] == "0"
    centred = rebuilt[3] * out.vectors[3].norm() / rebuilt[3].norm() - stats.mean if offset else rebuilt[3]
    expected = torch.nn.functional.cosine_similarity(centred, sae.W_dec.detach()[11], dim=0)
    assert float(out.cosines[3]) == pytest.approx(float(expected), abs=1e-5)
    assert f"mean AR cosine to the decoder row {float(expected):.3f}" in repr(out) and "1 warning" in repr(out)
    assert nl.read_result(out.save(tmp_path / "features.parquet")).attrs["warnings"] == out.verbalizations.warnings
    with pytest.warns(UserWarning, match=r"1/1 reconstructions have no direction.*features \[2\]"):
        card = nl.feature_card(sae, base, ["The cat sat on the mat."], 2, nla, k=2, offset=stats)
    assert card.cosine is None and "AR cosine" not in card.summary()
    with pytest.warns(UserWarning, match=r"2/2 reconstructions have no direction"):
        none = nl.verbalize_sae_features(nla, sae, [2, 5], offset=stats)
    assert none.summary().endswith("0 failed parses, no AR cosine (no reconstruction of a parsed explanation has a "
                                   "direction)")


@NEEDS_SAE_LENS
def test_offset_from_another_layer_or_width_or_bad_vectors_is_refused(toy, monkeypatch):
    from nla_lens.sae import ResidualStats

    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    layer_0 = nl.residual_stats(toy.base, TOY_TEXTS, 0)
    assert layer_0.layer == 0 and "layer=0" in repr(layer_0)
    with pytest.raises(nl.InputError, match=r"layer 0 .*layer K=3.*residual_stats\(base, texts, 3\)"):
        nl.verbalize_sae_features(toy.av, sae, [1], offset=layer_0)
    with pytest.raises(nl.VectorError, match=r"offset mean has shape \[64\].*d_model=128"):
        nl.verbalize_sae_features(toy.av, sae, [1], offset=ResidualStats(torch.randn(64), 1.0, 5))
    # A spread of 0 (one residual) verbalized the mean alone, the same vector for every feature.
    monkeypatch.setattr(toy.av, "verbalize", lambda *a, **k: pytest.fail("verbalized the mean for every feature"))
    with pytest.raises(nl.VectorError, match=r"offset's spread is 0.0 \(n=1\).*as the mean residual"):
        nl.verbalize_sae_features(toy.av, sae, [1, 2], offset=ResidualStats(torch.randn(128), 0.0, 1))
    with pytest.raises(nl.VectorError, match=r"spread is 0.0 \(n=1\)"):
        nl.verbalize_sae_features(toy.av, sae, [1], offset=ResidualStats.from_vectors(torch.randn(1, 128)))
    for bad in (torch.randn(128), torch.randn(0, 128), torch.full((2, 128), float("nan"))):
        with pytest.raises(nl.VectorError, match=r"\[n, d_model\]|no vectors|NaN"):
            ResidualStats.from_vectors(bad)
    with pytest.raises(nl.InputError, match="max_tokens=0: must be a whole number >= 1"):
        nl.residual_stats(toy.base, TOY_TEXTS, toy.av.meta.layer, max_tokens=0)


@NEEDS_SAE_LENS
@pytest.mark.parametrize(("spread", "outcome"), [(float("inf"), "be NaN or Inf"), (float("nan"), "be NaN or Inf"),
                                                 (-2.0, "move the mean against each feature's direction")])
def test_residual_stats_refuse_a_spread_no_rms_distance_has_when_built(spread, outcome):
    """An infinite, NaN or negative spread was taken when the stats were built, and refused only where an offset
    used it (first as a zero one is: 'every feature would be verbalized as the mean residual', which only a zero
    spread does)."""
    from nla_lens.sae import ResidualStats

    with pytest.raises(nl.VectorError, match=rf"^ResidualStats.spread is {spread} \(n=5\), which no RMS distance is "
                                             rf"\(they are finite and >= 0\): an offset mean \+ spread \* W_dec\[f\] / "
                                             rf"\|\|W_dec\[f\]\|\| would {outcome}; build the stats"):
        ResidualStats(torch.randn(D_MODEL), spread, 5)


@NEEDS_SAE_LENS
def test_residual_stats_keep_a_numeric_spread_as_a_float_and_refuse_any_other():
    """A NumPy or tensor spread is kept as its float (zero too: one residual's, refused only as an offset); a string
    one was taken, then failed the offset's check with a bare TypeError."""
    from nla_lens.sae import ResidualStats

    for given in (np.float32(2.5), torch.tensor(2.5), 2.5, 0):
        stats = ResidualStats(torch.zeros(D_MODEL), given, 5)
        assert type(stats.spread) is float and stats.spread == float(given)
    with pytest.raises(nl.VectorError, match=r"ResidualStats.spread='2.5' must be a number, the RMS distance"):
        ResidualStats(torch.zeros(D_MODEL), "2.5", 5)


@NEEDS_SAE_LENS
def test_an_sae_that_records_no_hook_point_is_named_so_not_as_reading_the_residual(av_karvonen, base, tmp_path):
    """allow_other_hook=True let it in, and its results named blocks.K.hook_resid_post as its hook point, an
    assumption stated as fact; a width or attention-head mismatch printed its hook point as 'None'."""
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    named = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")  # the same weights (seed 0), a hook point named
    sae.cfg.metadata.hook_name = None
    fast = {"allow_other_hook": True, "max_new_tokens": 2, "progress": False}
    out = nl.verbalize_sae_features(av_karvonen, sae, [1, 2], **fast)
    unnamed = "an SAE that records no hook point (taken as reading the NLA's residual: allow_other_hook=True)"
    assert out.hook_name is None and out.summary().startswith(f"2 features of {unnamed}, offset=none")
    out.save(tmp_path / "features.parquet")
    assert nl.read_result(tmp_path / "features.parquet")["hook_name"].isna().all()
    texts = ["The cat sat on the mat.", "A dog ran far away from home."]
    card = nl.feature_card(sae, base, texts, 3, av_karvonen, k=3, **fast)
    assert card.hook_name is None and card.summary().startswith(f"feature 3 of {unnamed}: ")
    assert "no hook point recorded</div>" in card._repr_html_()
    assert card.contexts == nl.feature_card(named, base, texts, 3, av_karvonen, k=3, **fast).contexts  # scanned at K
    narrow = make_sae(D_MODEL // 2, 8, f"blocks.{LAYER}.hook_resid_post")
    narrow.cfg.metadata.hook_name = None
    with pytest.raises(nl.SAEMismatchError, match=rf"^the SAE reads {D_MODEL // 2}-dim activations but the NLA "
                                                  rf"verbalizes d_model={D_MODEL} residuals"):
        nl.verbalize_sae_features(av_karvonen, narrow, [0], **fast)
    sae.cfg.metadata.hook_head_index = 1
    with pytest.raises(nl.SAEMismatchError, match=r"^the SAE reads one attention head \(hook_head_index=1\), not "
                                                  r"the residual stream$"):
        nl.verbalize_sae_features(av_karvonen, sae, [0], **fast)


@NEEDS_SAE_LENS
def test_numpy_feature_ids_are_ids(av_karvonen):
    import numpy as np

    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    out = nl.verbalize_sae_features(av_karvonen, sae, np.array([3, 1]), max_new_tokens=2, progress=False)
    assert out.features == [3, 1] and all(type(f) is int for f in out.features)
    assert torch.equal(out.vectors, sae.W_dec.detach()[[3, 1]])
    with pytest.raises(nl.InputError, match=r"\[True\] are not ints"):
        nl.verbalize_sae_features(av_karvonen, sae, [True], progress=False)


@NEEDS_SAE_LENS
def test_a_0d_numpy_array_is_one_id_as_a_0d_tensor_is(av_karvonen, base):
    """`np.array(5)` (what `arr[i]` of an object array, or `np.asarray(5)`, gives) was a bare TypeError, "iteration
    over a 0-d array", from verbalize_sae_features, and "got features array(5)" from a card, which takes one id."""
    import numpy as np

    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    for bare in (np.array(5), torch.tensor(5)):
        with pytest.raises(nl.InputError, match=r"features must be a non-empty list of feature ids, got 5 \(for one "
                                                r"feature write \[f\]\)"):
            nl.verbalize_sae_features(av_karvonen, sae, bare, progress=False)
    card = nl.feature_card(sae, base, ["The cat sat on the mat."], np.array(5), av_karvonen, max_new_tokens=2,
                           progress=False)
    assert card.feature == 5 and type(card.feature) is int
    with pytest.raises(nl.InputError, match=r"^features \[5.0\] are not ints"):
        nl.feature_card(sae, base, ["The cat sat on the mat."], np.array(5.0), av_karvonen, progress=False)


@NEEDS_SAE_LENS
def test_ids_taken_from_a_tensor_one_by_one_are_ids(toy):
    """`for f in acts.topk(3).indices` yields 0-d tensors: they were refused as 'not ints'."""
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    picked = torch.tensor([7, 2])
    out = nl.verbalize_sae_features(toy.av, sae, list(picked), max_new_tokens=2, progress=False)
    assert out.features == [7, 2] and torch.equal(out.vectors, sae.W_dec.detach()[[7, 2]])
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, picked[0], toy.av, k=2, max_new_tokens=2, progress=False)
    assert type(card.feature) is int and card.feature == 7
    every = [a for text in TOY_TEXTS for a in _reference_activations(toy, sae, text, 7).tolist()]
    assert [c.activation for c in card.contexts] == pytest.approx(sorted(every, reverse=True)[:2], abs=1e-5)
    for bad in (torch.tensor(True), torch.tensor(3.0)):
        with pytest.raises(nl.InputError, match="are not ints"):
            nl.feature_card(sae, toy.base, TOY_TEXTS, bad, toy.av, max_new_tokens=2, progress=False)


@NEEDS_SAE_LENS
def test_nla_cosine_is_the_ar_reconstruction_against_the_decoder_row(toy):
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    stats = nl.residual_stats(toy.base, TOY_TEXTS, toy.av.meta.layer, skip_first=8)
    out = nl.verbalize_sae_features(nl.NLA(toy.av, toy.ar), sae, [1, 5, 9], offset=stats, max_new_tokens=48,
                                    progress=False)
    parsed = [i for i, e in enumerate(out.explanations) if e is not None]  # a random row may not parse
    assert out.offset and len(parsed) >= 2
    rebuilt = toy.ar.reconstruct([out.explanations[i] for i in parsed])
    at_input_norm = rebuilt * out.vectors[parsed].norm(dim=1, keepdim=True) / rebuilt.norm(dim=1, keepdim=True)
    rows = sae.W_dec.detach()[[1, 5, 9]][parsed]
    expected = torch.nn.functional.cosine_similarity(at_input_norm - stats.mean, rows, dim=1)
    assert torch.allclose(out.cosines[parsed], expected, atol=1e-5)
    assert torch.allclose(out.reconstructions[parsed], rebuilt, atol=1e-5)


@NEEDS_SAE_LENS
def test_failed_parses_get_no_cosine(av_karvonen, ar_nanonla):
    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    out = nl.verbalize_sae_features(nl.NLA(av_karvonen, ar_nanonla), sae, [0, 1], max_new_tokens=3, progress=False)
    assert out.explanations == [None, None]  # three tokens of a random AV: no closing tag
    assert out.cosines.isnan().all() and out.reconstructions.isnan().all()
    assert [r["cosine"] for r in out.to_records()] == [None, None]


@NEEDS_SAE_LENS
def test_a_max_new_tokens_the_ar_cannot_read_is_refused_before_verbalizing(nla, base, monkeypatch):
    """`NLA.round_trip`'s rule (the AR prompt of an empty explanation plus the sample fits the AR's n_ctx):
    `reconstruct` refused a long explanation after the AV had verbalized every feature (a card: after its scan)."""
    from nla_lens import feature_cards

    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    prompt = len(nl.sidecar.ar_prompt_ids(nla.ar.meta, nla.ar.tokenizer, ""))
    monkeypatch.setattr(nla.ar.model.cfg, "n_ctx", prompt + 10)
    monkeypatch.setattr(nla.av, "verbalize", lambda v, **kw: pytest.fail("verbalized before the check"))
    monkeypatch.setattr(feature_cards, "each_text_residuals", lambda *a, **kw: pytest.fail("scanned first"))
    fits = f"over the AR's n_ctx={prompt + 10}; set max_new_tokens <= 10"
    with pytest.raises(nl.PromptTooLongError, match=re.escape(f"max_new_tokens=11 after the {prompt}-token AR "
                                                              f"prompt needs {prompt + 11} positions, {fits}")):
        nl.verbalize_sae_features(nla, sae, [0, 1], max_new_tokens=11)
    with pytest.raises(nl.PromptTooLongError, match=re.escape(f"max_new_tokens={nl.verbalizer.MAX_NEW_TOKENS} af")):
        nl.verbalize_sae_features(nla, sae, [0, 1])  # verbalize's default
    with pytest.raises(nl.PromptTooLongError, match=re.escape(fits)):
        nl.feature_card(sae, base, ["The cat sat."], 1, nla, max_new_tokens=11)
    said = nl.verbalizer.Verbalizations([nl.Verbalization("<explanation>a cat</explanation>", "a cat", [])] * 2)
    monkeypatch.setattr(nla.av, "verbalize", lambda v, **kw: said)
    assert nl.verbalize_sae_features(nla, sae, [0, 1], max_new_tokens=10).cosines.isfinite().all()
    assert nl.verbalize_sae_features(nla.av, sae, [0, 1], max_new_tokens=11).cosines is None  # no AR to read them


@NEEDS_SAE_LENS
def test_an_explanation_that_retokenizes_past_the_ars_context_gets_no_cosine_and_is_named(nla, monkeypatch):
    """The up-front check bounds the sampled tokens, not their text tokenized again: such an explanation made
    `reconstruct` refuse the whole call after the AV's work. It gets no reconstruction and no cosine, as a failed
    parse, and a warning names its feature (kept on the result, as verbalize's own)."""
    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    stray = stray_byte_verbalization(nla.ar.tokenizer)
    cat = nl.Verbalization("<explanation>the cat</explanation>", "the cat", [])
    prompt = len(nl.sidecar.ar_prompt_ids(nla.ar.meta, nla.ar.tokenizer, ""))
    monkeypatch.setattr(nla.ar.model.cfg, "n_ctx", prompt + len(stray.tokens))
    monkeypatch.setattr(nla.av, "verbalize", lambda v, **kw: nl.verbalizer.Verbalizations([cat, stray, cat]))
    with pytest.warns(UserWarning) as caught:
        out = nl.verbalize_sae_features(nla, sae, [2, 5, 9], max_new_tokens=len(stray.tokens))

    read = [0, 2]
    expected = torch.nn.functional.cosine_similarity(nla.ar.reconstruct(["the cat"] * 2),
                                                     sae.W_dec.detach()[[2, 9]], dim=1)
    assert torch.allclose(out.cosines[read], expected, atol=1e-5) and out.cosines[1].isnan()
    assert out.reconstructions[1].isnan().all() and out.reconstructions[read].isfinite().all()
    warning = (f"1/3 explanations make AR prompts over the AR's n_ctx={prompt + len(stray.tokens)} (features [5]), "
               "so they have no reconstruction and no cosine (NaN): their text retokenizes to more tokens than the AV "
               "sampled (a sampled token holding stray bytes of a split character decodes to U+FFFD, which may "
               "tokenize as three); read their `text`")
    assert [str(w.message) for w in caught] == [warning] and caught[0].filename == __file__
    assert out.verbalizations.warnings == [warning] and repr(out).splitlines()[0].endswith(
        "1 warning (.verbalizations.warnings)")
    assert [r["cosine"] for r in out.to_records()][1] is None


@NEEDS_SAE_LENS
def test_features_scored_though_their_sample_ran_on_past_the_closed_tag_are_named_as_round_trips_name_them(
        nla, monkeypatch):
    """A sample that closed its tag but reached max_new_tokens without EOS gets a cosine by the paper's parse rule,
    where RL's reward scores it as a miss: round trips name such rows, verbalize_sae_features said nothing. A failed
    parse cut at the cap has no cosine and is not named; a ran-on row rebuilt with no direction is named only as
    that."""
    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    ran_on = nl.Verbalization("<explanation>the cat</explanation> and then the", "the cat", [], truncated=True)
    cat = nl.Verbalization("<explanation>the cat</explanation>", "the cat", [])
    cut = nl.Verbalization("<explanation>the sea and", None, [], truncated=True)
    monkeypatch.setattr(nla.av, "verbalize", lambda v, **kw: nl.verbalizer.Verbalizations([ran_on, cat, cut,
                                                                                             ran_on, ran_on]))
    reconstruct = nla.ar.reconstruct
    monkeypatch.setattr(nla.ar, "reconstruct", lambda texts: torch.cat([reconstruct(texts[:-1]),
                                                                        torch.zeros(1, D_MODEL)]))
    with pytest.warns(UserWarning) as caught:
        out = nl.verbalize_sae_features(nla, sae, [2, 5, 9, 11, 13], max_new_tokens=8)

    assert out.cosines[[0, 1, 3]].isfinite().all() and out.cosines[[2, 4]].isnan().all()
    warning = ("2/5 explanations closed their tag but the AV did not end the sample before max_new_tokens (features "
               "[2, 11]): they have a reconstruction and a cosine, by the paper's parse rule, where RL's reward scores "
               "such samples as misses. A larger max_new_tokens lets a tag closed at the cap end with EOS; what the "
               "AV wrote on after its tag is in the row's `text`")
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and said[0].startswith("1/5 reconstructions have no direction (NaN, Inf or zero; features "
                                                 "[13]), so they have no cosine") and said[1] == warning
    assert out.verbalizations.warnings == said and all(w.filename == __file__ for w in caught)


@NEEDS_SAE_LENS
def test_feature_verbalizations_rows_carry_the_features_and_cosines(toy):
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    out = nl.verbalize_sae_features(nl.NLA(toy.av, toy.ar), sae, [4, 2], max_new_tokens=48, progress=False)
    records = out.to_records()
    assert [r["feature"] for r in records] == [4, 2] and [r["text"] for r in records] == [v.text for v in
                                                                                         out.verbalizations]
    assert [r["cosine"] for r in records] == pytest.approx(out.cosines.tolist())
    assert repr(out).startswith("FeatureVerbalizations: 2 features of blocks.3.hook_resid_post, offset=none")
    assert f"mean AR cosine to the decoder row {float(out.cosines.mean()):.3f}" in repr(out)


@NEEDS_SAE_LENS
def test_saved_sae_results_record_the_offset_stats_they_verbalized(toy, tmp_path):
    """A saved result said offset=True and nothing of the mean and spread the AV's vectors were built from: its
    rows now carry the stats' n, layer, mean norm and spread (None in each without an offset), in every format."""
    layer = toy.av.meta.layer
    sae = make_sae(128, 32, f"blocks.{layer}.hook_resid_post")
    stats = nl.residual_stats(toy.base, TOY_TEXTS, layer, skip_first=8)
    recorded = {"offset": True, "offset_n": stats.n, "offset_layer": layer,
                "offset_mean_norm": pytest.approx(float(stats.mean.norm()), rel=1e-6),
                "offset_spread": pytest.approx(stats.spread, rel=1e-6)}
    shifted = nl.verbalize_sae_features(toy.av, sae, [4, 2], offset=stats, max_new_tokens=8, progress=False)
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=2, skip_first=8, offset=stats, max_new_tokens=8,
                           progress=False)
    assert shifted.offset_stats is stats and card.offset_stats is stats and len(card.contexts) == 2
    assert f"offset=mean of {stats.n} residuals (norm {float(stats.mean.norm()):.4g}), spread" in repr(shifted)
    assert f"(of the row offset by the mean of {stats.n} residuals" in repr(card)
    for result, name in ((shifted, "features"), (card, "card")):
        parquet = pd.read_parquet(result.save(tmp_path / f"{name}.parquet"))
        jsonl = pd.read_json(result.save(tmp_path / f"{name}.jsonl"), lines=True)
        for rows in (parquet, jsonl):
            assert rows[list(recorded)].to_dict("records") == [recorded] * len(result.to_records())
    bare = nl.verbalize_sae_features(toy.av, sae, [4], max_new_tokens=8, progress=False)
    table = pq.read_table(bare.save(tmp_path / "bare.parquet"))
    assert table.schema.field("offset_n").type == "int64" and table.schema.field("offset_spread").type == "double"
    assert table.select(list(recorded)).to_pylist() == [dict.fromkeys(recorded) | {"offset": False}]


def _reference_activations(toy, sae, text: str, feature: int, name: str | None = None) -> torch.Tensor:
    """Independent reference: `feature`'s activation at every position of `text`, from a plain run_with_cache
    of `name` (default: layer K's residual)."""
    name = name or f"blocks.{toy.av.meta.layer}.hook_resid_post"
    _, cache = toy.base.run_with_cache(torch.tensor([toy.base.tokenizer(text)["input_ids"]]), names_filter=name)
    return sae.encode(cache[name][0])[:, feature].detach()  # values only: the SAE's weights require grad


@NEEDS_SAE_LENS
def test_feature_card_shows_the_strongest_contexts_next_to_the_explanation(toy, tmp_path):
    layer = toy.av.meta.layer
    sae = make_sae(128, 32, f"blocks.{layer}.hook_resid_post")
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=5, before=3, after=1, skip_first=8,
                           max_new_tokens=48, progress=False)
    everything = []
    for t, text in enumerate(TOY_TEXTS):
        acts = _reference_activations(toy, sae, text, 9)
        everything += [(float(a), t, p) for p, a in enumerate(acts.tolist()) if p >= 8]
    top = sorted((e for e in everything if e[0] > 0), reverse=True)[:5]  # a card lists where the feature fires
    assert len(top) == 5
    assert [(c.text, c.position) for c in card.contexts] == [(t, p) for _, t, p in top]
    assert [c.activation for c in card.contexts] == pytest.approx([a for a, _, _ in top], abs=1e-5)
    assert card.n_positions == len(everything) and card.n_active == sum(a > 0 for a, _, _ in everything)
    first = card.contexts[0]
    assert first.activations[first.center] == pytest.approx(first.activation) and len(first.tokens) <= 5
    assert card.explanation is not None and card.explanation.startswith("The token ")
    assert repr(card).startswith("FeatureCard: feature 9 of blocks.3.hook_resid_post")
    page = card.save(tmp_path / "card.html").read_text()
    assert html.escape(card.explanation) in page and "<script" not in page and "http" not in page
    assert page.count("nla-tok nla-peak") == len(card.contexts)  # each context's peak token is outlined
    assert list(card.to_pandas()["position"]) == [c.position for c in card.contexts]
    assert "NLA at the peak" not in page and set(card.to_pandas()["context_explanation"]) == {None}
    said = card.to_pandas()[["explanation", "explanation_parsed", "explanation_text", "explanation_truncated"]]
    assert set(map(tuple, said.to_numpy())) == {(card.explanation, True, card.verbalization.text, False)}


@NEEDS_SAE_LENS
def test_scans_warn_once_of_texts_cut_to_the_bases_context_and_a_card_keeps_the_warning(toy, tmp_path):
    """A text past the base's n_ctx was cut to it without a word: a card missed the contexts past it, and
    residual_stats their positions. The cut itself is unchanged: what max_tokens=n_ctx, which asks for it, gives."""
    from nla_lens.sae import skipped
    from nla_lens.sidecar import text_ids

    layer, n_ctx = toy.av.meta.layer, toy.base.cfg.n_ctx
    long = " ".join(["So foul and fair a day I have not seen."] * n_ctx)
    assert len(toy.base.tokenizer.encode(long)) > 2 * n_ctx
    texts = [TOY_TEXTS[0], long, TOY_TEXTS[1], long]
    said = (rf"2/4 texts are longer than the base model's context and were cut to its n_ctx={n_ctx} tokens "
            r"\(texts \[1, 3\]\), so {}: split such texts to scan them whole")
    with pytest.warns(UserWarning) as caught:
        stats = nl.residual_stats(toy.base, texts, layer)
    cut = [str(w.message) for w in caught if "longer than the base model's context" in str(w.message)]
    assert len(cut) == 1 and re.fullmatch(said.format("their positions past it are not in the stats"), cut[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a cut asked for, or texts within the context: nothing to warn of
        asked = nl.residual_stats(toy.base, texts, layer, max_tokens=n_ctx)
        nl.residual_stats(toy.base, TOY_TEXTS, layer)
    assert stats.n == asked.n and torch.allclose(stats.mean, asked.mean, atol=1e-6)
    assert stats.spread == pytest.approx(asked.spread, rel=1e-6)

    sae = make_sae(128, 32, f"blocks.{layer}.hook_resid_post")
    with pytest.warns(UserWarning) as caught:  # explain_contexts runs the texts again: still one warning
        card = nl.feature_card(sae, toy.base, texts, 9, toy.av, k=3, explain_contexts=True, max_new_tokens=8,
                               progress=False)
    cut = [str(w.message) for w in caught if "longer than the base model's context" in str(w.message)]
    assert len(cut) == 1 and re.fullmatch(said.format("the card holds no context past it"), cut[0])
    assert card.warnings == cut and repr(card).startswith(f"FeatureCard: {card.summary()}; 1 warning (.warnings)")
    assert nl.read_result(card.save(tmp_path / "card.parquet")).attrs["warnings"] == card.warnings
    assert html.escape(cut[0]) in card.save(tmp_path / "card.html").read_text()
    ids = [text_ids(toy.base.tokenizer, text) for text in texts]
    assert card.n_positions == stats.n == sum(min(len(i), n_ctx) - skipped(toy.base.tokenizer, i, None) for i in ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        short = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=3, max_new_tokens=8, progress=False)
    assert short.warnings == []


@NEEDS_SAE_LENS
def test_a_max_tokens_over_the_bases_context_is_refused_by_name_before_any_text_runs(toy, monkeypatch):
    """max_tokens=n_ctx + 1 let a long text through at n_ctx + 1 tokens, and the run failed with a PromptTooLongError
    ('tokens have 257 columns ... pass shorter texts') that never named max_tokens."""
    from nla_lens import sae

    layer, n_ctx = toy.av.meta.layer, toy.base.cfg.n_ctx
    long = " ".join(["So foul and fair a day I have not seen."] * n_ctx)
    monkeypatch.setattr(sae, "text_resid_post", lambda *a: pytest.fail("ran the base on a text"))
    said = (rf"^max_tokens={n_ctx + 1} is over the base model's context n_ctx={n_ctx}: pass max_tokens <= {n_ctx}, "
            r"or none to cut each text to the context \(with a warning naming the texts cut\)$")
    for scan in (nl.residual_stats, sae.text_residuals):
        with pytest.raises(nl.InputError, match=said):
            scan(toy.base, [TOY_TEXTS[0], long], layer, max_tokens=n_ctx + 1)
    monkeypatch.undo()
    assert [len(ids) for ids, _ in sae.text_residuals(toy.base, [long], layer, max_tokens=n_ctx)] == [n_ctx]


@NEEDS_SAE_LENS
def test_feature_card_scan_holds_one_texts_residuals_at_a_time(toy, monkeypatch):
    """The scan read every text's residuals into a list before encoding any; it keeps one [pos] row of
    the feature's activations per text, so one text's residuals at a time is all it needs, and of each text's
    [pos, d_sae] encoding only that row (a view of it held the whole encoding)."""
    from nla_lens import sae as sae_module

    layer = toy.av.meta.layer
    sae = make_sae(128, 32, f"blocks.{layer}.hook_resid_post")
    reference = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=3, max_new_tokens=8, progress=False)
    held = held_outputs(monkeypatch, sae_module, "text_resid_post")
    encoded = held_outputs(monkeypatch, sae, "encode")
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=3, max_new_tokens=8, progress=False)
    assert len(held) == len(TOY_TEXTS) and max(held) <= 1  # at most the previous text's, still bound to the loop
    # The [pos] row kept per text is a copy: a view of column `feature` held every text's [pos, d_sae] encoding.
    assert encoded == [0] * len(TOY_TEXTS)
    assert [(c.text, c.position, c.activation) for c in card.contexts] == [
        (c.text, c.position, c.activation) for c in reference.contexts]


@NEEDS_SAE_LENS
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.3.hook_resid_mid", "hook_embed"])
def test_a_card_of_an_sae_of_another_hook_scans_that_hook(toy, hook):
    """allow_other_hook let the SAE in, but the scan encoded layer K's residual: contexts of activations the
    SAE never sees. Its own hook point's are the ones a researcher looks for."""
    sae = make_sae(128, 32, hook)
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=4, allow_other_hook=True, max_new_tokens=2,
                           progress=False)
    _assert_top_4_contexts(card, toy, sae, hook)
    with pytest.raises(nl.SAEMismatchError, match="no hook point for"):
        nl.feature_card(make_sae(128, 32, "blocks.3.hook_nowhere"), toy.base, TOY_TEXTS, 9, toy.av,
                        allow_other_hook=True, max_new_tokens=2, progress=False)
    assert no_hooks_left(toy.base)


@NEEDS_SAE_LENS
def test_a_card_of_a_temporal_sae_encodes_each_text_as_one_sequence(toy):
    """A sae-lens TemporalSAE (pretrained ones exist: temporal-sae-gemma-2-2b) attends over a text's earlier positions
    and encodes [batch, pos, d]; the card gave it [pos, d], a bare ValueError from sae-lens."""
    from sae_lens import TemporalSAE, TemporalSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    residual = f"blocks.{toy.av.meta.layer}.hook_resid_post"
    torch.manual_seed(0)
    sae = TemporalSAE(TemporalSAEConfig(d_in=128, d_sae=32, n_heads=4, bottleneck_factor=2, kval_topk=4,
                                        metadata=SAEMetadata(hook_name=residual))).eval()
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=4, max_new_tokens=2, progress=False)
    every = []
    for t, text in enumerate(TOY_TEXTS):  # independent reference: the whole text's cached residuals as one sequence
        _, cache = toy.base.run_with_cache(torch.tensor([toy.base.tokenizer(text)["input_ids"]]), names_filter=residual)
        acts = sae.encode(cache[residual])[0, :, 9].detach()
        every += [(float(a), t, p) for p, a in enumerate(acts.tolist()) if a > 0]
    top = sorted(every, key=lambda e: (-e[0], e[1], e[2]))[:4]
    assert len(top) == 4 and card.n_active == len(every)
    assert [(c.text, c.position) for c in card.contexts] == [(t, p) for _, t, p in top]
    assert [c.activation for c in card.contexts] == pytest.approx([a for a, _, _ in top], abs=1e-5)


@NEEDS_SAE_LENS
def test_a_card_context_reads_a_character_split_over_tokens_whole(av_karvonen, base, tmp_path):
    """The `context` column joined the tokens decoded one by one: a character that a byte-level BPE splits over
    several tokens (an emoji, a rare CJK character on Qwen) read as U+FFFD replacement characters there."""
    text = "The cat \u2603 sat on the mat."  # the snowman: three byte tokens in the tiny tokenizer
    ids = base.tokenizer(text)["input_ids"]
    assert any("\ufffd" in base.tokenizer.decode([t]) for t in ids)
    sae = make_sae(D_MODEL, 8, f"blocks.{LAYER}.hook_resid_post")
    with torch.no_grad():
        sae.b_enc[3] = 1e3  # active at every position: each is a context
    card = nl.feature_card(sae, base, [text], 3, av_karvonen, k=len(ids), max_new_tokens=2, progress=False)
    records = card.to_records()
    assert len(records) == len(ids)
    for record in records:
        window = ids[max(0, record["position"] - 8):record["position"] + 3]
        assert record["context"] == base.tokenizer.decode(window, clean_up_tokenization_spaces=False)
    assert any("\u2603" in record["context"] for record in records)
    assert list(nl.read_result(card.save(tmp_path / "card.parquet"))["context"]) == [r["context"] for r in records]


@NEEDS_SAE_LENS
def test_tied_activations_are_listed_in_text_then_position_order(toy):
    """Identical texts give exactly tied activations; an unstable sort listed them in an arbitrary order."""
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    texts = [TOY_TEXTS[2]] * 4
    card = nl.feature_card(sae, toy.base, texts, 9, toy.av, k=12, max_new_tokens=2, progress=False)
    acts = _reference_activations(toy, sae, texts[0], 9)
    fired = sorted((p for p in range(len(acts)) if acts[p] > 0), key=lambda p: -float(acts[p]))
    assert len(fired) >= 3
    assert [(c.text, c.position) for c in card.contexts] == [(t, p) for p in fired for t in range(4)][:12]


@NEEDS_SAE_LENS
def test_a_card_reads_an_sae_that_encodes_to_sparse_tensors(toy):
    """A TopK training SAE with use_sparse_activations encodes to a sparse COO tensor: a bare TypeError before."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=128, d_sae=16, k=4, use_sparse_activations=True,
                                                metadata=SAEMetadata(hook_name="blocks.3.hook_resid_post")))
    feature = 0
    every = []
    for t, text in enumerate(TOY_TEXTS):
        name = "blocks.3.hook_resid_post"
        _, cache = toy.base.run_with_cache(torch.tensor([toy.base.tokenizer(text)["input_ids"]]), names_filter=name)
        acts = sae.encode(cache[name][0]).detach().to_dense()[:, feature]
        every += [(float(a), t, p) for p, a in enumerate(acts.tolist()) if p >= 1 and a > 0]
    top = sorted(every, key=lambda e: (-e[0], e[1], e[2]))[:3]
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, feature, toy.av, k=3, skip_first=1, max_new_tokens=2,
                           progress=False)
    assert len(top) == 3 and card.n_active == len(every)
    assert [(c.text, c.position) for c in card.contexts] == [(t, p) for _, t, p in top]
    assert [c.activation for c in card.contexts] == pytest.approx([a for a, _, _ in top], abs=1e-5)


@NEEDS_SAE_LENS
def test_a_card_window_marks_tokens_skip_first_left_out_instead_of_showing_zero(toy, tmp_path):
    """The window's tokens before `skip_first` were stored and shown as activation 0.000: never computed."""
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=3, before=12, after=0, skip_first=8,
                           max_new_tokens=8, progress=False)
    windows = [(c, range(c.position - c.center, c.position - c.center + len(c.tokens))) for c in card.contexts]
    assert any(spans[0] < 8 for _, spans in windows)
    for context, spans in windows:
        acts = _reference_activations(toy, sae, TOY_TEXTS[context.text], 9)
        for shown, position in zip(context.activations, spans, strict=True):
            assert math.isnan(shown) if position < 8 else shown == pytest.approx(float(acts[position]), abs=1e-5)
    page = card.save(tmp_path / "card.html").read_text()
    assert "not scanned (skip_first)" in page and "title='nan'" not in page


@NEEDS_SAE_LENS
def test_feature_card_explains_the_residual_at_each_context(toy, tmp_path):
    layer = toy.av.meta.layer
    sae = make_sae(128, 32, f"blocks.{layer}.hook_resid_post")
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=4, skip_first=8, explain_contexts=True,
                           max_new_tokens=48, progress=False)
    # Independent reference: the residuals at the card's positions from a plain run_with_cache, verbalized.
    expected = [v.explanation for v in toy.av.verbalize(_context_residuals(toy, card), max_new_tokens=48)]
    assert len(card.contexts) == 4 and [c.explanation for c in card.contexts] == expected
    assert all(e is not None and e.startswith("The token ") for e in expected)
    assert list(card.to_pandas()["context_explanation"]) == expected
    assert list(card.to_pandas()["context_explanation_parsed"]) == [True] * 4
    shown = repr(card).splitlines()  # the repr left the column out
    assert shown[1].split()[-1] == "context_explanation" and expected[0][:40] in shown[2]
    assert "context_explanation" not in repr(replace(card, explained_contexts=False))
    page = card.save(tmp_path / "card.html").read_text()
    assert "NLA at the peak" in page and all(html.escape(e) in page for e in expected)


def _context_residuals(toy, card) -> torch.Tensor:
    """The residuals at a card's context positions, from a plain run_with_cache of each text alone."""
    hook = f"blocks.{toy.av.meta.layer}.hook_resid_post"
    residuals = []
    for c in card.contexts:
        _, cache = toy.base.run_with_cache(torch.tensor([toy.base.tokenizer(TOY_TEXTS[c.text])["input_ids"]]),
                                           names_filter=hook)
        residuals.append(cache[hook][0, c.position])
    return torch.stack(residuals)


@NEEDS_SAE_LENS
def test_a_context_whose_explanation_failed_to_parse_keeps_its_raw_text_and_is_marked(toy, tmp_path):
    """A failed parse at a context's peak was a blank context_explanation cell: the rows held no parsed flag and no
    raw completion (only the HTML card showed it)."""
    layer = toy.av.meta.layer
    sae = make_sae(128, 32, f"blocks.{layer}.hook_resid_post")
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=3, skip_first=8, explain_contexts=True,
                           max_new_tokens=4, progress=False)  # too few tokens to close the tag
    expected = toy.av.verbalize(_context_residuals(toy, card), max_new_tokens=4)
    assert len(card.contexts) == 3 and all(v.explanation is None and v.truncated and v.text for v in expected)
    said = [{"context_explanation": None, "context_explanation_parsed": False, "context_explanation_text": v.text,
             "context_explanation_truncated": True} for v in expected]
    for rows in (card.to_pandas(), nl.read_result(card.save(tmp_path / "card.parquet")),
                 nl.read_result(card.save(tmp_path / "card.jsonl"))):
        assert rows[list(said[0])].replace({np.nan: None}).to_dict("records") == said
    shown = repr(card).splitlines()
    marked = display.format_cell(display.unparsed_text(expected[0].text, truncated=True), 60)
    assert shown[1].split()[-1] == "context_explanation" and shown[2].endswith(marked)
    assert marked.startswith("(cut at max_new_tokens before </explanation>) ")
    plain = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=3, skip_first=8, max_new_tokens=4,
                            progress=False)
    assert plain.to_pandas()[list(said[0])].isna().all().all()  # not asked: neither parsed nor failed


@NEEDS_SAE_LENS
def test_feature_card_of_a_feature_that_never_fires_says_so_and_saves_its_explanation(toy, tmp_path):
    """A silent card saved no row: its explanation reached a .parquet file's summary attrs only, and a .jsonl file or
    to_pandas() held nothing of it."""
    sae = make_sae(128, 32, f"blocks.{toy.av.meta.layer}.hook_resid_post")
    with torch.no_grad():
        sae.b_enc[9] = -1e6  # feature 9 is 0 everywhere
    card = nl.feature_card(sae, toy.base, TOY_TEXTS, 9, toy.av, k=3, max_new_tokens=48, progress=False)
    assert card.contexts == [] and card.n_active == 0 and card.explanation
    assert repr(card) == f"FeatureCard: {card.summary()}"  # no table of empty context cells
    assert f"not active at any of the {card.n_positions} positions scanned" in repr(card) and "'-'" not in repr(card)
    context = ["text", "position", "token", "activation", "context", "context_explanation",
               "context_explanation_parsed", "context_explanation_text", "context_explanation_truncated"]
    own = {"feature": 9, "explanation": card.explanation, "explanation_parsed": True,
           "explanation_text": card.verbalization.text, "explanation_truncated": False, "cosine": None,
           "offset": False, "offset_n": None, "offset_layer": None, "offset_mean_norm": None, "offset_spread": None}
    columns = ["feature", *context, "explanation", "explanation_parsed", "explanation_text", "explanation_truncated",
               "cosine", "offset", "offset_n", "offset_layer", "offset_mean_norm", "offset_spread"]
    for rows in (card.to_pandas(), nl.read_result(card.save(tmp_path / "card.parquet")),
                 nl.read_result(card.save(tmp_path / "card.jsonl"))):
        assert list(rows.columns) == columns
        assert rows.astype(object).where(rows.notna(), None).to_dict("records") == [{**dict.fromkeys(context), **own}]
    assert pq.read_table(tmp_path / "card.parquet").column_names == columns
    page = card.save(tmp_path / "card.html").read_text()
    assert "activation 0 to" not in page and "nla-peak" not in page.split("</style>")[1]


@NEEDS_SAE_LENS
def test_capture_on_hooked_sae_transformer_records_what_block_k_passes_on(toy):
    layer = toy.av.meta.layer
    model = nl.hooked_sae_transformer(toy.base)
    assert next(model.parameters()).data_ptr() == next(toy.base.parameters()).data_ptr()  # no copy
    sae = make_sae(128, 64, f"blocks.{layer}.hook_resid_post")
    tokens = torch.tensor([toy.av.tokenizer.encode(TOY_TEXTS[0])])
    with nl.capture(model, layer, positions=-1) as clean:
        model(tokens)
    resid = toy.activations(tokens[0].tolist())[-1]
    assert torch.equal(clean.vectors[0], resid)
    model.add_sae(sae)  # no error term: the SAE's reconstruction replaces the residual
    try:
        with nl.capture(model, layer, positions=-1) as reconstructed:
            model(tokens)
        model.add_sae(sae, use_error_term=True)  # reconstruction + error = the original residual
        with nl.capture(model, layer, positions=-1) as with_error:
            model(tokens)
    finally:
        model.reset_saes()
    with torch.no_grad():
        assert torch.allclose(reconstructed.vectors[0], sae(resid[None])[0], atol=1e-5)
    assert not torch.allclose(reconstructed.vectors[0], resid, atol=1e-2)
    assert torch.allclose(with_error.vectors[0], resid, atol=1e-4)
    assert no_hooks_left(model)


@NEEDS_SAE_LENS
def test_an_sae_with_no_token_feature_is_a_typed_error_the_command_prints(monkeypatch, capsys):
    """It was a bare RuntimeError: `python -m nla_lens.toy.sae_experiment` showed a traceback."""
    from nla_lens.toy import sae_experiment

    monkeypatch.setattr(sae_experiment, "token_features", lambda *a, **k: (0, []))
    with pytest.raises(SystemExit) as info:
        sae_experiment.main(["--training-tokens", "1024"])
    assert info.value.code == 2
    assert ("error: no live feature fires >= 80% on one token after 1024 training tokens: train the SAE longer "
            "(--training-tokens, default 100000)") in capsys.readouterr().err


def sae_experiment_result():
    """A small SAEExperimentResult, built directly (running the experiment takes minutes)."""
    from nla_lens.toy.sae_experiment import FeatureRow, SAEExperimentConfig, SAEExperimentResult

    rows = [FeatureRow(3, " the", 0.9, "The token \" the\"", None, "The token", True, False, False, " a", False),
            FeatureRow(7, "\n", 0.85, None, "The token \"\n\"", None, False, True, False, " the", False)]
    return SAEExperimentResult(500, 40, 2, 0.5, 0.5, 0.0, 0.0, 0.81, 0.72, 0.1, 0.3, 9.5, 12.0,
                               SAEExperimentConfig(seed=3, training_tokens=4096), rows)


@NEEDS_SAE_LENS
def test_an_sae_experiment_result_saved_as_json_loads_back_with_its_headline_figures(tmp_path):
    """A saved result held the rows only: the agreements, control, cosines and SAE figures it prints were lost."""
    from nla_lens.toy.sae_experiment import SAEExperimentResult

    result = sae_experiment_result()
    path = result.save(tmp_path / "run.json")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["agreement"] == 0.5 and saved["cosine"] == 0.81 and saved["sae_l0"] == 9.5
    assert saved["train_seconds"] == 12.0 and saved["config"]["training_tokens"] == 4096 and len(saved["rows"]) == 2
    loaded = SAEExperimentResult.load(path)
    assert loaded == result and loaded.summary() == result.summary()
    assert pq.read_table(result.save(tmp_path / "rows.parquet")).num_rows == 2  # the other suffixes: as before
    with pytest.raises(nl.InputError, match="rows.parquet: only the .json file save wrote loads back") as refused:
        SAEExperimentResult.load(tmp_path / "rows.parquet")  # was a UnicodeDecodeError inside the message
    # It said a .parquet holds "the rows alone"; it also keeps the result type and summary, which read_result gives.
    pointed = re.search(r"nl\.read_result\('([^']+)'\) reads this file's rows as a DataFrame, with the result type "
                        r"and summary line in df\.attrs", str(refused.value))
    assert pointed is not None and "rows alone" not in str(refused.value)
    table = nl.read_result(pointed.group(1))
    assert table.equals(result.to_pandas()) and table.attrs["summary"] == result.summary()
    assert table.attrs["result_type"] == "SAEExperimentResult"
    result.save(tmp_path / "rows.jsonl")
    with pytest.raises(nl.InputError, match=r"read_result\('.*rows\.jsonl'\) reads this file's rows as a DataFrame$"):
        SAEExperimentResult.load(tmp_path / "rows.jsonl")
    (tmp_path / "rows.json").write_text(json.dumps(result.to_records()))
    with pytest.raises(nl.InputError, match="rows.json is no SAE experiment result that SAEExperimentResult.save "):
        SAEExperimentResult.load(tmp_path / "rows.json")


@NEEDS_SAE_LENS
def test_the_sae_experiment_command_saves_to_output_and_writes_the_bundled_scores_only_when_asked(
        monkeypatch, tmp_path, capsys):
    """The only way to keep a run was --write, which overwrote the package's sae_scores.json."""
    from nla_lens.toy import sae_experiment
    from nla_lens.toy.demo import TOY_DIR

    result = sae_experiment_result()
    bundled = (TOY_DIR / sae_experiment.SCORES_FILE).read_bytes()
    monkeypatch.setattr(sae_experiment, "run_sae_experiment", lambda *a, **k: result)
    sae_experiment.main(["--output", str(tmp_path / "run.json")])
    out = capsys.readouterr().out
    assert result.summary() in out and f"wrote {tmp_path / 'run.json'}" in out
    assert sae_experiment.SAEExperimentResult.load(tmp_path / "run.json") == result
    assert (TOY_DIR / sae_experiment.SCORES_FILE).read_bytes() == bundled
    sae_experiment.main(["--checkpoint", str(tmp_path), "--write"])
    scores = json.loads((tmp_path / sae_experiment.SCORES_FILE).read_text())
    # As before --output: the figures without the rows and the machine's training time, which made every rerun
    # rewrite the bundled file.
    assert scores == {k: v for k, v in json.loads((tmp_path / "run.json").read_text()).items()
                      if k not in ("rows", "train_seconds")} and "agreement" in scores
    # An output that cannot be written is refused before the run (minutes), not after it.
    monkeypatch.setattr(sae_experiment, "run_sae_experiment", lambda *a, **k: pytest.fail("the experiment ran"))
    for argv, error in ((["--output", str(tmp_path / "gone" / "run.json")], "the folder"),
                        (["--output", str(tmp_path / "run.parquet")], "must end in .json"),
                        (["--checkpoint", str(tmp_path / "gone"), "--write"], "--write")):
        with pytest.raises(SystemExit) as info:
            sae_experiment.main(argv)
        assert info.value.code == 2 and error in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sae_experiment.main(["--help"])
    assert "maintainers' use" in " ".join(capsys.readouterr().out.split())


@NEEDS_SAE_LENS
def test_toy_sae_features_are_named_by_the_av_well_above_control():
    """The README's numbers: a real sae-lens training run on the toy base, then the AV on every token feature."""
    from nla_lens.toy.demo import TOY_DIR
    from nla_lens.toy.sae_experiment import SCORES_FILE, run_sae_experiment

    result = run_sae_experiment()
    assert result.n_token_features >= 50
    assert result.agreement >= 0.3 and result.agreement >= 2 * result.control
    assert result.agreement_offset >= 2 * result.control
    assert result.cosine >= result.control_cosine + 0.3  # the AR rebuilds the feature's row, not just any row
    assert len(result.to_pandas()) == result.n_token_features and repr(result).startswith("SAEExperimentResult: ")
    # The numbers stored beside the checkpoints (and quoted in the README) are the ones this checkpoint gives;
    # after retraining the toy, re-run `python -m nla_lens.toy.sae_experiment --write`.
    recorded = json.loads((TOY_DIR / SCORES_FILE).read_text())
    assert result.agreement == pytest.approx(recorded["agreement"], abs=0.05)
    assert result.agreement_offset == pytest.approx(recorded["agreement_offset"], abs=0.05)
    assert result.agreement_top_context == pytest.approx(recorded["agreement_top_context"], abs=0.05)
    # Where the feature fires most, the real residual is named far more often than the decoder row is.
    assert result.agreement_top_context >= result.agreement + 0.2
    # The guide's table, read from the page (not only from the file the experiment rewrites).
    page = docs_text.guide("sae")
    for label, value in (("bare decoder row", result.agreement), ("mean residual + spread", result.agreement_offset)):
        quoted = re.search(rf"^\| {re.escape(label)}[^|]*\| \**([\d.]+)%", page, re.MULTILINE)
        assert quoted is not None and value == pytest.approx(float(quoted.group(1)) / 100, abs=0.05), label


@NEEDS_SAE_LENS
def test_readme_sae_snippet_runs_on_the_toy(toy):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## SAE features through the NLA")[1].split("```python\n")[1].split("```")[0]
    # The block loads your SAE and names your texts; here a made-up SAE of the toy's layer and the toy's texts.
    lines = block.splitlines()
    block = "\n".join(line for line in lines if not line.startswith(("sae = SAE.load_from_disk(", "texts = [")))
    assert len(block.splitlines()) == len(lines) - 2
    K = toy.av.meta.layer
    namespace = {"nl": nl, "nla": nl.NLA(toy.av, toy.ar), "sae": make_sae(128, 1024, f"blocks.{K}.hook_resid_post"),
                 "base": toy.base, "texts": TOY_TEXTS, "K": K,
                 "tokens": torch.tensor([toy.av.tokenizer.encode(TOY_TEXTS[0])])}
    exec(compile(block, "README.md", "exec"), namespace)
    assert len(namespace["feats"]) == 3 and namespace["shifted"].offset
    assert namespace["card"].feature == 12 and namespace["cap"].vectors.shape == (1, 128)
    assert no_hooks_left(namespace["sae_model"])


@NEEDS_SAE_LENS
def test_a_scan_of_a_model_with_an_sae_attached_where_it_reads_says_to_take_the_sae_off(av_karvonen, base):
    """`add_sae` puts the SAE in its hook point's place, so a card or residual_stats of the README's sae_model said
    "'blocks.K.hook_resid_post' is not a hook point of this model; pass a name in model.hook_dict"."""
    sae_model = nl.hooked_sae_transformer(base)
    texts = ["The cat sat on the mat.", "A dog ran in the park"]
    for hook in (f"blocks.{LAYER}.hook_resid_post", f"blocks.{LAYER}.hook_mlp_out"):
        sae = make_sae(D_MODEL, 8, hook)
        sae_model.add_sae(sae)
        off = rf"an SAE is attached to this model at '{hook}'.*pass the model without SAEs.*model.reset_saes\(\)"
        with pytest.raises(nl.InputError, match=off):
            nl.feature_card(sae, sae_model, texts, 1, av_karvonen, allow_other_hook=True, max_new_tokens=2,
                            progress=False)
        if hook.endswith("resid_post"):
            with pytest.raises(nl.InputError, match=off):
                nl.residual_stats(sae_model, texts, LAYER)
        sae_model.reset_saes()  # as the message says: the scan is the plain base's
        card, plain = (nl.feature_card(sae, model, texts, 1, av_karvonen, allow_other_hook=True, max_new_tokens=2,
                                       progress=False) for model in (sae_model, base))
        assert card.contexts and [(c.text, c.position) for c in card.contexts] == [
            (c.text, c.position) for c in plain.contexts]
        assert [c.activation for c in card.contexts] == pytest.approx([c.activation for c in plain.contexts],
                                                                      abs=1e-5)
    assert no_hooks_left(base)


@NEEDS_SAE_LENS
def test_hooked_sae_transformer_shares_the_weights_but_not_the_settings(base):
    """The two models held one `cfg`: `set_use_attn_result(True)` on the SAE model turned it on in the
    user's base too, whose every later run then computed (and `run_with_cache` kept) per-head results."""
    model = nl.hooked_sae_transformer(base)
    assert model.W_E.data_ptr() == base.W_E.data_ptr()  # still no copy of the weights
    model.set_use_attn_result(True)
    try:
        assert not base.cfg.use_attn_result
        _, cache = base.run_with_cache(torch.tensor([[5, 6, 7]]))
        assert not any(name.endswith("hook_result") for name in cache)
    finally:
        model.set_use_attn_result(False)  # the old shared cfg must not outlive this test


@NEEDS_SAE_LENS
def test_sae_cosine_phrases_write_tiny_and_huge_numbers_in_e_notation():
    """The summaries of verbalize_sae_features, a feature card and the toy SAE experiment wrote cosines to 3 decimals
    (2e-6 as 0.000, where the table's cell writes 2.00e-06) and the experiment's FVU with every digit (1e57 as 58).
    Ordinary values print as before."""
    from nla_lens.feature_cards import FeatureCard
    from nla_lens.sae import FeatureVerbalizations

    said, hook = nl.Verbalization("<explanation>\na\n</explanation>", "a", [1]), f"blocks.{LAYER}.hook_resid_post"
    features = FeatureVerbalizations([3, 5], [said, said], torch.zeros(2, 4), hook, False, torch.tensor([2e-6, 2e-6]),
                                     torch.zeros(2, 4))
    assert features.summary().endswith("0 failed parses, mean AR cosine to the decoder row 2.00e-06")
    assert FeatureCard(3, hook, said, -3e-7, [], 10, 0).summary().endswith("; AR cosine to the decoder row -3.00e-07")
    experiment = replace(sae_experiment_result(), cosine=2e-6, control_cosine=-1e-9, sae_fvu=1e57, sae_l0=52.68)
    assert ("Mean AR cosine to the decoder row 2.00e-06 (0.720 with the offset; -1.00e-09 to the control's row). SAE: "
            "d_sae 512, L0 52.7, FVU 1.00e+57, trained in 12 s") in experiment.summary()
    assert ("Mean AR cosine to the decoder row 0.810 (0.720 with the offset; 0.100 to the control's row). SAE: d_sae "
            "512, L0 9.5, FVU 0.300, trained in 12 s") in sae_experiment_result().summary()
