"""Sidecar parsing (both dialects), injection rules, scale resolution and tokenizer drift checks."""

from __future__ import annotations

import copy
import math
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

import nla_lens as nl
from nla_lens import loading, sharded
from nla_lens.sidecar import InjectionSpec, check_tokenizer, load_meta, parse_meta
from nla_lens.testing import AR_TEMPLATE, AV_TEMPLATE, build_tokenizer, token_facts


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def model_dialect(**overrides):
    data = {
        "kind": "nla_model", "schema_version": 2, "role": "av", "d_model": 4096, "extraction_layer_index": 24,
        "extraction": {"injection_scale": 150.0, "mse_scale": None},
        "tokens": {"injection_char": "㈎", "injection_token_id": 149705, "injection_left_neighbor_id": 29,
                   "injection_right_neighbor_id": 522, "critic_suffix_ids": [1318, 29, 366, 1708, 29]},
        "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
    }
    data.update(overrides)
    return data


def dataset_dialect(**extraction):
    return {
        "kind": "nla_dataset", "schema_version": 1,
        "extraction": {"base_model": "Qwen/Qwen3-8B", "d_model": 4096, "layer_index": 24, **extraction},
        "tokens": model_dialect()["tokens"],
        "prompt_templates": {"actor": AV_TEMPLATE, "critic": AR_TEMPLATE},
    }


def test_dataset_dialect_means_karvonen_at_layer_1_output():
    meta = parse_meta(dataset_dialect())
    assert (meta.role, meta.d_model, meta.layer) == (None, 4096, 24)
    assert meta.injection == InjectionSpec("karvonen", "blocks.1.hook_resid_post")
    assert meta.mse_scale == 64.0 and meta.injection_scale is None
    assert meta.critic_suffix_ids == (1318, 29, 366, 1708, 29)
    assert meta.av_template == AV_TEMPLATE and meta.ar_template == AR_TEMPLATE


def test_model_dialect_with_injection_scale_means_embedding_replacement():
    meta = parse_meta(model_dialect())
    assert meta.role == "av" and meta.layer == 24
    assert meta.injection == InjectionSpec("embedding", "hook_embed")
    assert meta.injection_scale == 150.0
    # The rule is an AV's: an AR's sidecar with the pair's injection_scale injects nothing.
    assert parse_meta(model_dialect(role="ar")).injection is None


@pytest.mark.parametrize("role, expected", [("actor", "av"), ("av", "av"), ("critic", "ar"), ("ar", "ar")])
def test_roles_and_template_keys_of_both_namings(role, expected):
    data = model_dialect(role=role, prompt_templates={"actor": AV_TEMPLATE, "critic": AR_TEMPLATE})
    meta = parse_meta(data)
    assert meta.role == expected and meta.av_template == AV_TEMPLATE and meta.ar_template == AR_TEMPLATE


@pytest.mark.parametrize("layer_keys", [
    {"extraction_layer_index": 24},
    {"critic": {"extraction_layer_index": 24}},
    {"critic": {"num_hidden_layers": 25}},
    {"ar": {"num_hidden_layers": 25}},
])
def test_layer_is_read_from_every_known_key(layer_keys):
    data = model_dialect(role="ar")
    del data["extraction_layer_index"]
    data.update(layer_keys)
    assert parse_meta(data).layer == 24


def test_explicit_injection_block_wins_over_the_dialect_rule():
    meta = parse_meta({**dataset_dialect(), "injection": {"method": "embedding", "hook_point": "hook_embed"}})
    assert meta.injection == InjectionSpec("embedding", "hook_embed")
    meta = parse_meta(model_dialect(injection={"method": "karvonen", "hook_point": "blocks.2.hook_resid_post"}))
    assert meta.injection == InjectionSpec("karvonen", "blocks.2.hook_resid_post")


@pytest.mark.parametrize("raw, expected", [
    (None, 64.0), ("sqrt_d_model", 64.0), (12.5, 12.5), (3, 3.0),
])
def test_mse_scale_resolution(raw, expected):
    extraction = {"injection_scale": None} if raw is None else {"injection_scale": None, "mse_scale": raw}
    assert parse_meta(model_dialect(extraction=extraction)).mse_scale == expected
    assert parse_meta(dataset_dialect(mse_scale=raw)).mse_scale == expected


def test_injection_scale_resolution():
    assert parse_meta(model_dialect(extraction={"injection_scale": "sqrt_d_model"})).injection_scale == 64.0
    assert parse_meta(model_dialect(extraction={"injection_scale": None})).injection_scale is None
    assert parse_meta(model_dialect(extraction={})).injection is None  # AV: the user must say how


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(kind="something_else"), "unknown sidecar kind"),
    (lambda d: d.update(schema_version=3), "schema_version 2"),
    (lambda d: d.update(role="judge"), "role must be one of"),
    (lambda d: d.pop("tokens"), "section 'tokens'"),
    (lambda d: d["tokens"].update(injection_token_id="x"), "injection_token_id must be an integer"),
    (lambda d: d.update(d_model=None), "d_model must be an integer"),
    (lambda d: d["extraction"].update(mse_scale="big"), "mse_scale must be a positive finite number"),
    (lambda d: d["extraction"].update(mse_scale=float("inf")), "mse_scale must be a positive finite number"),
    (lambda d: d["extraction"].update(injection_scale=-1), "injection_scale must be a positive finite number"),
    (lambda d: d["extraction"].update(injection_scale=float("inf")), "injection_scale must be a positive finite"),
    (lambda d: d.update(fve_baseline={"value": float("inf"), "n": 10}), "fve_baseline must be a mapping"),
    # Both keys are required: a misspelt one is refused as missing, so an unknown key cannot hide it.
    (lambda d: d.update(fve_baseline={"valeu": 0.7, "n": 10}), "fve_baseline must be a mapping"),
    (lambda d: d.update(fve_baseline={"value": 0.7, "n": 1}), "fve_baseline must be a mapping"),  # no spread in one
    (lambda d: d.update(d_model=0), "d_model must be >= 1, got 0"),
    (lambda d: d.update(extraction_layer_index=-1), "layer index must be >= 0, got -1"),
    (lambda d: d["tokens"].update(critic_suffix_ids=5), "critic_suffix_ids must be a non-empty list"),
    (lambda d: d["tokens"].update(critic_suffix_ids=[]), "critic_suffix_ids must be a non-empty list"),
    (lambda d: d["prompt_templates"].update(ar=7), "AR prompt template must be a string, got 7"),
    (lambda d: d["prompt_templates"].update(av="no placeholder"), "no '{injection_char}' placeholder.*restore the"),
    (lambda d: d["prompt_templates"].update(ar="no placeholder"), "no '{explanation}' placeholder.*restore the"),
    (lambda d: d.update(injection={"method": "telepathy"}), "unknown injection method"),
    (lambda d: d.update(role=["av"]), "role must be one of"),  # a YAML list, not a TypeError
    (lambda d: d.update(injection={"method": ["karvonen"]}), "unknown injection method"),
    (lambda d: d.update(injection={"method": "karvonen", "hook_point": 1}), "injection.hook_point must be a"),
    (lambda d: d.update(injection={"method": "karvonen", "hook_point": " "}), "injection.hook_point must be a"),
    (lambda d: d["prompt_templates"].update(actor=AV_TEMPLATE + " "), "av and prompt_templates.actor are two"),
    (lambda d: d["prompt_templates"].update(critic="x {explanation}"), "ar and prompt_templates.critic are two"),
    (lambda d: d.update(base_model=7), "base_model must be the base model's hub id or folder path"),
    (lambda d: d.pop("extraction_layer_index"), "no extraction layer; the sidecar needs extraction_layer_index"),
    (lambda d: d.update(base_model=["Qwen/Qwen3-8B"]), "base_model must be"),
])
def test_malformed_sidecars_raise_sidecar_error(mutate, match):
    data = copy.deepcopy(model_dialect())
    mutate(data)
    with pytest.raises(nl.SidecarError, match=match):
        parse_meta(data)


@pytest.mark.parametrize("keys", [
    {"critic": {"extraction_layer_index": 23}},
    {"ar": {"num_hidden_layers": 24}},
    {"extraction": {"injection_scale": 150.0, "layer_index": 20}},
], ids=["critic_index", "ar_blocks", "extraction_index"])
def test_layer_keys_that_disagree_are_refused_not_one_picked(keys):
    """extraction_layer_index 24 beside a key giving another K: the top-level key silently won, so a damaged
    sidecar served the AR truncated at a layer it was not trained on."""
    with pytest.raises(nl.SidecarError, match=r"extraction layer disagree \(extraction_layer_index -> K=24, .*restore"):
        parse_meta(model_dialect(**keys))
    agreeing = parse_meta(model_dialect(critic={"extraction_layer_index": 24}, ar={"num_hidden_layers": 25}))
    assert agreeing.layer == 24


@pytest.mark.parametrize("block", [{"method": "karvonen", "hookpoint": "blocks.2.hook_resid_post"},
                                   {"method": "karvonen", "hook_point": "blocks.2.hook_resid_post", "scale": 2.0}])
def test_an_injection_block_key_nla_lens_does_not_read_is_refused_not_ignored(block):
    """`hookpoint:` (misspelt) was ignored: the AV was served at the method's default site, blocks.1, not the
    blocks.2 the sidecar meant."""
    with pytest.raises(nl.SidecarError, match=r"injection has keys \['(hookpoint|scale)'\] that nla_lens does not "
                                              r"read; it reads \['method', 'hook_point'\]\. Fix the spelling"):
        parse_meta(model_dialect(injection=block))


@pytest.mark.parametrize(("keys", "told"), [
    ({"extraction": {"injection_scale": 150.0, "d_model": 2048}}, "d_model is 4096 but extraction.d_model is 2048"),
    ({"base_model": "Qwen/Qwen3-4B", "extraction": {"injection_scale": 150.0, "base_model": "Qwen/Qwen3-8B"}},
     "extraction.base_model is 'Qwen/Qwen3-8B' but base_model is 'Qwen/Qwen3-4B'"),
], ids=["d_model", "base_model"])
def test_a_model_sidecar_that_contradicts_itself_is_refused_naming_both_values_and_the_file(tmp_path, keys, told):
    """The top-level d_model silently won over extraction.d_model (and extraction.base_model over base_model): a
    damaged sidecar served the checkpoint at a width, or with a base, it may not have been trained with."""
    (tmp_path / "nla_meta.yaml").write_text(yaml.safe_dump(model_dialect(**keys)), encoding="utf-8")
    with pytest.raises(nl.SidecarError, match=re.escape(f"{tmp_path / 'nla_meta.yaml'} contradicts itself: {told}; "
                                                        "restore the released nla_meta.yaml")):
        load_meta(tmp_path)
    agreeing = parse_meta(model_dialect(base_model="Qwen/Qwen3-8B", extraction={
        "injection_scale": 150.0, "d_model": 4096, "base_model": "Qwen/Qwen3-8B"}))
    assert (agreeing.d_model, agreeing.base_model) == (4096, "Qwen/Qwen3-8B")
    only_extraction = model_dialect(extraction={"injection_scale": 150.0, "d_model": 2048})
    del only_extraction["d_model"]
    assert parse_meta(only_extraction).d_model == 2048


@pytest.mark.parametrize(("key", "value", "told"), [
    ("d_model", 2048, "extraction.d_model is 4096 but d_model is 2048"),
    ("extraction_layer_index", 20, "extraction.layer_index is 24 but extraction_layer_index is 20"),
    ("base_model", "Qwen/Qwen3-4B", "extraction.base_model is 'Qwen/Qwen3-8B' but base_model is 'Qwen/Qwen3-4B'"),
])
def test_a_dataset_sidecars_top_level_key_that_contradicts_its_extraction_block_is_refused(key, value, told):
    """The nla_dataset dialect reads extraction.d_model and extraction.layer_index: a top-level d_model or
    extraction_layer_index (the nla_model spelling) of another value was ignored without a word. One that agrees
    is read as before."""
    with pytest.raises(nl.SidecarError, match=re.escape(f"sidecar contradicts itself: {told}")):
        parse_meta({**dataset_dialect(), key: value})
    agreeing = parse_meta({**dataset_dialect(), "d_model": 4096, "extraction_layer_index": 24,
                           "base_model": "Qwen/Qwen3-8B"})
    assert (agreeing.d_model, agreeing.layer, agreeing.base_model) == (4096, 24, "Qwen/Qwen3-8B")


@pytest.mark.parametrize(("block", "match"), [
    ("add_special_tokens", r"tokenization must be a mapping \{base_text, ar_prompt, bos_token_id\} .*got "
                           r"'add_special_tokens'; restore"),
    ([{"bos_token_id": 7}], r"tokenization must be a mapping .*got \[\{'bos_token_id': 7\}\]"),
    ({"bos_token": 7}, r"tokenization has keys \['bos_token'\] that nla_lens does not read; it reads \['base_text', "
                       r"'ar_prompt', 'bos_token_id'\]\. Fix the spelling"),
    ({"bos_token_id": "2"}, r"tokenization.bos_token_id must be an integer, got '2'"),
], ids=["string", "list", "misspelt_key", "id_as_text"])
def test_a_tokenization_block_whose_bos_cannot_be_checked_is_refused_not_skipped(block, match):
    """`check_tokenizer` compares the block's bos_token_id with the live tokenizer's BOS: a block that was not a
    mapping, or spelt the key otherwise, skipped that check without a word (and '2' was drift from BOS 2)."""
    with pytest.raises(nl.SidecarError, match=match):
        parse_meta({**dataset_dialect(), "tokenization": block})
    written = {"base_text": "add_special_tokens", "ar_prompt": "add_special_tokens", "bos_token_id": None}
    assert parse_meta({**dataset_dialect(), "tokenization": written}).raw["tokenization"] == written


def test_schema_version_true_is_not_schema_1_and_2_0_reads_as_2():
    with pytest.raises(nl.SidecarError, match="schema_version 1, found True"):
        parse_meta({**dataset_dialect(), "schema_version": True})
    assert parse_meta(model_dialect(schema_version=2.0)).schema_version == 2
    assert type(parse_meta(model_dialect(schema_version=2.0)).schema_version) is int


@pytest.mark.parametrize("text", ["", "# emptied\n"])
def test_an_empty_sidecar_says_so_and_how_to_fix_it(tmp_path, text):
    (tmp_path / "nla_meta.yaml").write_text(text)
    with pytest.raises(nl.SidecarError, match=r"nla_meta.yaml is empty \(or holds only comments\); restore the"):
        load_meta(tmp_path)


def test_a_key_given_twice_is_refused_not_the_last_one_kept(tmp_path):
    """PyYAML keeps the last of two equal keys: a hand-edited sidecar with two layer lines loaded silently."""
    text = yaml.safe_dump(model_dialect())
    (tmp_path / "nla_meta.yaml").write_text(text + "extraction_layer_index: 20\n")
    with pytest.raises(nl.SidecarError, match="not valid YAML.*the key 'extraction_layer_index' is given twice"):
        load_meta(tmp_path)
    (tmp_path / "nla_meta.yaml").write_text(text)
    assert load_meta(tmp_path).layer == 24


def test_yaml_merge_keys_load_and_may_override_a_merged_key(tmp_path):
    """The repeated-key check ran before merge keys were expanded: any `<<: *anchor` was a SidecarError / ConfigError
    ('could not determine a constructor'), and an unhashable key a bare TypeError."""
    data = model_dialect()
    tokens = {**data.pop("tokens"), "injection_token_id": 7}
    merged = yaml.safe_dump({"token_defaults": tokens}, allow_unicode=True).replace("token_defaults:",
                                                                                    "token_defaults: &tokens")
    text = yaml.safe_dump(data, allow_unicode=True) + merged + "tokens:\n  <<: *tokens\n  injection_token_id: 149705\n"
    (tmp_path / "nla_meta.yaml").write_text(text, encoding="utf-8")
    meta = load_meta(tmp_path)
    assert (meta.injection_token_id, meta.injection_right_neighbor_id) == (149705, 522)
    (tmp_path / "nla_meta.yaml").write_text(text + "  injection_token_id: 1\n", encoding="utf-8")
    with pytest.raises(nl.SidecarError, match="the key 'injection_token_id' is given twice"):
        load_meta(tmp_path)
    (tmp_path / "nla_meta.yaml").write_text(text + "? [1, 2]\n: 3\n", encoding="utf-8")
    with pytest.raises(nl.SidecarError, match="(?s)not valid YAML.*found unhashable key"):
        load_meta(tmp_path)


def test_missing_and_unparseable_sidecar_files(tmp_path):
    with pytest.raises(nl.SidecarError, match="no nla_meta.yaml") as info:
        load_meta(tmp_path)
    assert "base model" not in str(info.value)
    (tmp_path / "config.json").write_text("{}")  # a model folder without a sidecar: say it may be the base
    with pytest.raises(nl.SidecarError, match="It holds a model \\(config.json\\): a base model is not an NLA"):
        load_meta(tmp_path)
    (tmp_path / "config.json").unlink()
    for export in ("model", "av", "ar"):  # a training run's out_dir given for the checkpoint (train-rl's av: / ar:)
        (tmp_path / export).mkdir()
        (tmp_path / export / "nla_meta.yaml").write_text("kind: nla_model\n")
    with pytest.raises(nl.SidecarError, match=r"It is a training run's out_dir \(nla-lens curve .* shows the run\); "
                                              r"its export: .*model or .*av or .*ar\."):
        load_meta(tmp_path)
    (tmp_path / "nla_meta.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(nl.SidecarError, match="not valid YAML"):
        load_meta(tmp_path)
    (tmp_path / "nla_meta.yaml").write_bytes("kind: nla_model\n".encode("utf-16"))
    with pytest.raises(nl.SidecarError, match="not UTF-8 text.*save it as UTF-8"):
        load_meta(tmp_path)
    (tmp_path / "nla_meta.yaml").write_text("- a list\n")
    with pytest.raises(nl.SidecarError, match="mapping"):
        load_meta(tmp_path)
    (tmp_path / "nla_meta.yaml").write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(nl.SidecarError):  # safe_load refuses to build objects
        load_meta(tmp_path)


def test_live_tokenizer_check_passes_for_matching_facts(tokenizer):
    data = dataset_dialect()
    data["tokens"] = token_facts(tokenizer)
    check_tokenizer(parse_meta(data), tokenizer)


@pytest.mark.parametrize("field, match", [
    ("injection_token_id", "encodes to"),
    ("injection_left_neighbor_id", "but the sidecar records"),
    ("injection_right_neighbor_id", "but the sidecar records"),
    ("critic_suffix_ids", "critic_suffix_ids"),
])
def test_tokenizer_drift_is_detected(tokenizer, field, match):
    data = dataset_dialect()
    data["tokens"] = token_facts(tokenizer)
    value = data["tokens"][field]
    data["tokens"][field] = [t + 1 for t in value] if isinstance(value, list) else value + 1
    with pytest.raises(nl.TokenizerDriftError, match=match):
        check_tokenizer(parse_meta(data), tokenizer)


def test_the_marker_written_into_the_av_template_is_a_sidecar_error_not_drift(tokenizer):
    """A template holding the marker char besides its placeholder was reported as tokenizer drift ('the tokenizer
    or chat template differs from training'), though the tokenizer was the checkpoint's own."""
    data = dataset_dialect()
    data["tokens"] = token_facts(tokenizer)
    marker = data["tokens"]["injection_char"]
    data["prompt_templates"]["actor"] = AV_TEMPLATE + " and " + AV_TEMPLATE.replace("{injection_char}", marker)
    with pytest.raises(nl.SidecarError, match=f"holds the marker '{marker}' itself besides the '{{injection_char}}' "
                                              "placeholder.*write the marker only as the placeholder"):
        check_tokenizer(parse_meta(data), tokenizer)


def test_the_marker_written_into_the_av_template_names_the_sidecar_file(tiny_paths, tmp_path):
    """The error quoted the template but not the file that holds it."""
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    path = folder / "nla_meta.yaml"
    meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    marker = meta["tokens"]["injection_char"]
    meta["prompt_templates"]["actor"] += f" and <c>{marker}</c>"
    path.write_text(yaml.safe_dump(meta, allow_unicode=True), encoding="utf-8")
    with pytest.raises(nl.SidecarError, match=rf"^{re.escape(str(path))}: the AV template .* holds the marker"):
        nl.ActivationVerbalizer.from_pretrained(folder)


def test_neighbour_drift_names_the_live_and_the_recorded_ids(tiny_paths, tmp_path):
    """A tokenizer whose vocab moved the marker's left neighbour said "found 0 neighbour-anchored marker site(s)
    ... but 1 vector(s) to inject. Build prompts with av.prompt_tokens(n)", advice for a call the user never made,
    and named neither the id that moved nor the fix."""
    import json

    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    meta = load_meta(folder)
    vocab_file = folder / "tokenizer.json"
    data = json.loads(vocab_file.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    left = next(token for token, i in vocab.items() if i == meta.injection_left_neighbor_id)
    other = next(token for token, i in vocab.items() if i == meta.injection_left_neighbor_id + 1)
    vocab[left], vocab[other] = vocab[other], vocab[left]  # an edited vocab: '>' now has another id
    vocab_file.write_text(json.dumps(data), encoding="utf-8")
    moved, right = meta.injection_left_neighbor_id + 1, meta.injection_right_neighbor_id
    expected = (f"has the marker {meta.injection_token_id} between {moved} ('>') and {right} ('</'), but the sidecar "
                f"records {meta.injection_left_neighbor_id} and {right}")
    with pytest.raises(nl.TokenizerDriftError, match=re.escape(expected) + ".*Load the tokenizer saved with the "
                                                                           "checkpoint"):
        nl.ActivationVerbalizer.from_pretrained(folder)


@pytest.mark.parametrize("name, loader", [("av_karvonen", nl.ActivationVerbalizer),
                                          ("ar_nanonla", nl.ActivationReconstructor)])
def test_a_checkpoints_tokenizer_drift_advises_the_tokenizer_saved_with_it(tiny_paths, tmp_path, name, loader):
    """A checkpoint's sidecar was written for the tokenizer saved beside it: that is the fix, not a base model."""
    folder = shutil.copytree(tiny_paths[name], tmp_path / name)
    path = folder / "nla_meta.yaml"
    sidecar = yaml.safe_load(path.read_text(encoding="utf-8"))
    sidecar["tokens"]["injection_token_id"] += 1
    path.write_text(yaml.safe_dump(sidecar, allow_unicode=True), encoding="utf-8")
    with pytest.raises(nl.TokenizerDriftError, match=r"encodes to .* but the sidecar says .*: the tokenizer is not "
                                                     "the one this NLA was trained with. Load the tokenizer saved "
                                                     "with the checkpoint") as refused:
        loader.from_pretrained(folder)
    assert "extract" not in str(refused.value)


@pytest.mark.parametrize("drifted", ["av_karvonen", "ar_nanonla", "cli", "cli explain", "round-trip file"])
def test_a_drifted_folder_loaded_for_you_is_blamed_on_its_tokenizer_not_on_tokenizer_equals(tiny_paths, tmp_path,
                                                                                          drifted, capsys):
    """`NLA.from_pretrained` and the CLI load a folder's tokenizer and hand it on: a drift in the folder said
    "tokenizer= is not the tokenizer of ... (leave it out ...)", an argument the user never gave. The CLI and file
    jobs check the tokenizer they hand on once, before handing it (`..._check_each_tokenizer_..._once`)."""
    from nla_lens.cli import main

    name = {"cli": "av_karvonen", "cli explain": "av_karvonen", "round-trip file": "ar_nanonla"}.get(drifted, drifted)
    folders = {role: tiny_paths[role] for role in ("av_karvonen", "ar_nanonla")}
    folders[name] = shutil.copytree(tiny_paths[name], tmp_path / name)
    path = folders[name] / "nla_meta.yaml"
    sidecar = yaml.safe_load(path.read_text(encoding="utf-8"))
    sidecar["tokens"]["injection_token_id"] += 1
    path.write_text(yaml.safe_dump(sidecar, allow_unicode=True), encoding="utf-8")
    base = str(tiny_paths["av_karvonen"])
    if drifted.startswith("cli"):
        pair = ["explain", "--ar", str(folders["ar_nanonla"])] if drifted == "cli explain" else ["verbalize"]
        assert main([*pair, "--av", str(folders["av_karvonen"]), "--text", "a cat", "--base", base]) == 2
        said = capsys.readouterr().err
    else:
        with pytest.raises(nl.TokenizerDriftError) as refused:
            if drifted == "round-trip file":
                vectors = tmp_path / "v.safetensors"
                save_file({"vectors": torch.randn(2, 64)}, vectors)
                sharded.round_trip_file(folders["av_karvonen"], folders["ar_nanonla"], vectors,
                                        tmp_path / "o.parquet", baseline=0.5)
            else:
                nl.NLA.from_pretrained(folders["av_karvonen"], folders["ar_nanonla"])
        said = str(refused.value)
    assert "Load the tokenizer saved with the checkpoint" in said and "tokenizer=" not in said


def test_a_twice_placed_marker_placeholder_is_a_sidecar_error_not_drift():
    data = dataset_dialect()
    data["prompt_templates"]["actor"] = AV_TEMPLATE + " and " + AV_TEMPLATE
    with pytest.raises(nl.SidecarError, match="placeholder 2 times.*exactly once"):
        parse_meta(data)


def test_a_twice_placed_explanation_placeholder_is_refused_naming_the_file(tmp_path):
    """It loaded: the AR then read every explanation twice (`ar_prompt` fills each placeholder), a prompt it was
    never trained on, and extraction took the critic suffix from between the two."""
    data = dataset_dialect()
    data["prompt_templates"]["critic"] = AR_TEMPLATE + " " + AR_TEMPLATE
    (tmp_path / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(nl.SidecarError, match=rf"^{re.escape(str(tmp_path / 'nla_meta.yaml'))}: the AR template "
                                              r"holds the '\{explanation\}' placeholder 2 times.*exactly once"):
        load_meta(tmp_path)


def test_tokenizer_without_chat_template_is_a_typed_error(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    config = folder / "tokenizer_config.json"
    text = config.read_text()
    import json

    data = json.loads(text)
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    for extra in folder.glob("chat_template*"):
        extra.unlink()
    with pytest.raises(nl.ChatTemplateError, match="no chat template"):
        nl.ActivationVerbalizer.from_pretrained(folder)


def test_sidecar_d_model_must_match_the_model(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    meta["extraction"]["d_model"] = 128
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    with pytest.raises(nl.SidecarError, match="d_model=128"):
        nl.ActivationVerbalizer.from_pretrained(folder)


def test_a_dataset_sidecar_without_its_layer_names_the_key():
    data = dataset_dialect()
    del data["extraction"]["layer_index"]
    with pytest.raises(nl.SidecarError, match="no extraction layer; the sidecar needs extraction.layer_index"):
        parse_meta(data)


def test_sqrt_d_model_scale_matches_sqrt():
    assert parse_meta(dataset_dialect(mse_scale="sqrt_d_model")).mse_scale == math.sqrt(4096)


def test_a_recorded_bos_the_tokenizer_does_not_put_first_names_the_fix(tiny_paths):
    meta = load_meta(tiny_paths["ar_nanonla"])
    drifted = parse_meta({**meta.raw, "tokenization": {"bos_token_id": 7}})
    with pytest.raises(nl.TokenizerDriftError,
                       match=r"records BOS 7 first.*Load the tokenizer saved with the checkpoint"):
        check_tokenizer(drifted, loading.load_tokenizer(tiny_paths["ar_nanonla"]), role="ar")
