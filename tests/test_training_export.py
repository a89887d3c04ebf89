"""The TL -> HF weight converter is the exact inverse of the loader, for every supported family."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import NEEDS_TL3, as_exported_with_a_stray_bos
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import nla_lens as nl
from nla_lens import loading, testing
from nla_lens.training import hf_state_dict
from nla_lens.training.export import freeze_weights_hf_lacks, has_qkv_bias

SHAPE = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
         "max_position_embeddings": 64}


def _hf_model(family: str, tokenizer):
    if family == "qwen3":
        return testing.build_base_model(tokenizer, n_layers=3, d_model=32)
    if family == "qwen2":  # no GQA here, so TL names the k/v weights W_K / W_V (no underscore)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), num_key_value_heads=4, **SHAPE))
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=2, **SHAPE))


@pytest.fixture(params=["qwen3", "qwen2", "llama"])
def hf_folder(request, tmp_path):
    tokenizer = testing.build_tokenizer(tmp_path)
    model = _hf_model(request.param, tokenizer)
    with torch.no_grad():  # every tensor random, so a swapped or transposed weight cannot hide
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    model.save_pretrained(tmp_path)
    return tmp_path, model


def _load(folder, n_layers=None):
    return loading.load_hooked_transformer(folder, loading.load_tokenizer(folder), dtype=torch.float32,
                                           device="cpu", n_layers=n_layers)


@NEEDS_TL3
def test_hf_state_dict_inverts_the_loader(hf_folder):
    folder, hf = hf_folder
    expected = hf.state_dict()
    exported = hf_state_dict(_load(folder), qkv_bias=has_qkv_bias(hf.config))
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name


@NEEDS_TL3
def test_hf_state_dict_of_a_truncated_model_has_no_final_norm_or_head(hf_folder):
    folder, hf = hf_folder
    exported = hf_state_dict(_load(folder, n_layers=2), qkv_bias=has_qkv_bias(hf.config))
    expected = {k: v for k, v in hf.state_dict().items()
                if k == "model.embed_tokens.weight" or k.startswith(("model.layers.0.", "model.layers.1."))}
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], v) for k, v in expected.items())


@NEEDS_TL3
def test_only_biases_the_hf_model_lacks_are_frozen(hf_folder):
    folder, hf = hf_folder
    model = _load(folder)
    frozen = freeze_weights_hf_lacks(model, hf.config)
    qkv = {n for n, _ in model.named_parameters() if n.split(".")[-1].lstrip("_") in ("b_Q", "b_K", "b_V")}
    tl_only = {n for n, _ in model.named_parameters() if n.endswith(("b_O", "b_in", "b_out", "b_U"))}
    assert set(frozen) == (tl_only if has_qkv_bias(hf.config) else tl_only | qkv)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)


@NEEDS_TL3
def test_export_refuses_a_nonzero_bias_the_hf_model_cannot_hold(hf_folder):
    folder, hf = hf_folder
    model = _load(folder)
    with torch.no_grad():
        model.blocks[0].attn.b_O.add_(1.0)
    with pytest.raises(nl.CheckpointError, match="blocks.0.attn.b_O is not zero"):
        hf_state_dict(model, qkv_bias=has_qkv_bias(hf.config))


@NEEDS_TL3
def test_a_gemma3_base_is_refused_before_training_with_the_reason(bos_paths):
    """init_av / init_ar (and train_rl, which freezes the same way) said only "no HF counterpart known for
    'blocks.0.ln1_post.w'"; the exporter, which has no inverse of TL's Gemma weights, is why."""
    from nla_lens.testing_families import AV_TEMPLATE, GEMMA_MARKER
    from nla_lens.training import ExtractConfig, init_ar, init_av
    from nla_lens.training.extraction import dataset_sidecar

    folder = bos_paths["gemma_av"]
    config = ExtractConfig(layer=2, injection_char=GEMMA_MARKER, av_template=AV_TEMPLATE,
                           ar_template=testing.AR_TEMPLATE)
    meta = nl.parse_meta(dataset_sidecar(loading.load_tokenizer(folder), config, base_model=str(folder), d_model=64))
    for init in (init_av, init_ar):
        with pytest.raises(nl.CheckpointError, match="training and exporting a Gemma-3 NLA is not supported yet"):
            init(folder, meta)
    with pytest.raises(nl.CheckpointError, match="Gemma-3 NLA is not supported yet"):
        hf_state_dict(_load(folder), qkv_bias=False)


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@NEEDS_TL3
def test_an_export_cut_short_leaves_the_earlier_export_as_it_was_and_nothing_beside_it(tmp_path, base_folder,
                                                                                      dataset_meta, monkeypatch):
    """A re-export interrupted (Ctrl-C) after the weights were written left the new weights under the old sidecar
    and tokenizer: a folder that loads and is neither export."""
    from nla_lens.training import export, export_ar, init_ar

    ar = init_ar(base_folder, dataset_meta)
    folder = export_ar(ar, tmp_path / "ar", base_folder)
    before = _files(folder)
    with torch.no_grad():
        ar.readout.weight.mul_(2.0)
        next(ar.model.parameters()).add_(1.0)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "copy_tokenizer_files", interrupted)  # after the weights, before the sidecar
    with pytest.raises(KeyboardInterrupt):
        export_ar(ar, folder, base_folder)
    assert _files(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ar"]  # no temporary folder left behind
    monkeypatch.undo()
    export_ar(ar, folder, base_folder)
    reloaded = nl.ActivationReconstructor.from_pretrained(folder)
    torch.testing.assert_close(reloaded.readout.weight, ar.readout.weight, rtol=0, atol=0)


@NEEDS_TL3
def test_a_re_export_replaces_the_folder_whole(tmp_path, base_folder, dataset_meta):
    """An earlier export's file the new one does not write (a tokenizer saved in another format) stayed beside it."""
    from nla_lens.training import export_ar, init_ar

    ar = init_ar(base_folder, dataset_meta)
    folder = export_ar(ar, tmp_path / "ar", base_folder)
    written = set(_files(folder))
    (folder / "vocab.json").write_text("{}")  # an earlier tokenizer's file
    export_ar(ar, folder, base_folder)
    assert set(_files(folder)) == written


@NEEDS_TL3
@pytest.mark.parametrize("what", ["file", "folder"])
def test_an_export_into_a_file_or_a_folder_of_other_files_is_refused_and_leaves_them(tmp_path, base_folder,
                                                                                     dataset_meta, what):
    from nla_lens.training import export_av, init_av

    av = init_av(base_folder, dataset_meta)
    target = tmp_path / "out"
    if what == "file":
        target.write_text("notes")
        message = "is a file, and an export writes a folder there; export into a new folder"
    else:
        target.mkdir()
        (target / "notes.txt").write_text("notes")
        message = (r"holds files but no nla_meta.yaml, so it is no NLA export, and an export replaces its folder "
                   r"whole: they would be deleted. Export into a new or empty folder \(or, if it is an export that "
                   r"was cut short, delete it\)$")
    before = target.read_bytes() if what == "file" else _files(target)
    with pytest.raises(nl.ConfigError, match=message):
        export_av(av, target, base_folder)
    assert (target.read_bytes() if what == "file" else _files(target)) == before
    (tmp_path / "empty").mkdir()  # an empty folder is taken
    assert nl.ActivationVerbalizer.from_pretrained(export_av(av, tmp_path / "empty", base_folder)).meta.role == "av"


@NEEDS_TL3
def test_a_re_export_refuses_files_beside_the_earlier_export_naming_them_and_leaves_them(tmp_path, base_folder,
                                                                                         dataset_meta):
    """An earlier export's folder holding the user's files too (notes, a results table, a folder of runs) was
    replaced whole, and those files deleted without a word."""
    from nla_lens.training import export_av, init_av

    av = init_av(base_folder, dataset_meta)
    folder = export_av(av, tmp_path / "av", base_folder)
    exported = _files(folder)
    for name in ("notes.txt", "results.parquet", "README.md"):
        (folder / name).write_text("mine")
    (folder / "runs").mkdir()
    (folder / "runs" / "a.json").write_text("{}")
    before = _files(folder)
    with pytest.raises(nl.ConfigError) as info:
        export_av(av, folder, base_folder)
    assert str(info.value) == (f"{folder} holds 4 files that no export writes (README.md, notes.txt, results.parquet, "
                               "and 1 more), and an export replaces its folder whole: they would be deleted. Move "
                               f"them out of {folder}, or export into another folder")
    assert _files(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["av"]  # nothing staged
    for name in ("notes.txt", "results.parquet", "README.md", "runs/a.json"):
        (folder / name).unlink()
    (folder / "runs").rmdir()
    export_av(av, folder, base_folder)  # the earlier export's own files alone: replaced without a word
    assert _files(folder) == exported


@NEEDS_TL3
def test_the_oss_metadata_files_block_no_re_export_and_go_with_the_folder_but_a_users_file_still_does(
        tmp_path, base_folder, dataset_meta):
    """A .DS_Store (macOS Finder), Thumbs.db / desktop.ini (Windows) or AppleDouble ._* file, which the OS writes
    into a folder the user merely opens, was taken for the user's file and refused the re-export, also into an empty
    folder that held nothing else."""
    from nla_lens.training import export_av, init_av

    os_files = (".DS_Store", "Thumbs.db", "desktop.ini", "._model.safetensors")
    av = init_av(base_folder, dataset_meta)
    folder = export_av(av, tmp_path / "av", base_folder)
    exported = _files(folder)
    for name in os_files:
        (folder / name).write_bytes(b"\x00\x05\x16\x07")
    export_av(av, folder, base_folder)
    assert _files(folder) == exported  # removed with the folder
    for name in os_files:
        (folder / name).write_bytes(b"\x00\x05\x16\x07")
    (folder / "notes.txt").write_text("mine")
    before = _files(folder)
    with pytest.raises(nl.ConfigError, match=re.escape(f"{folder} holds 1 file that no export writes (notes.txt), and "
                                                       "an export replaces its folder whole")):
        export_av(av, folder, base_folder)
    assert _files(folder) == before
    fresh = tmp_path / "fresh"  # a new folder the user opened before exporting into it
    fresh.mkdir()
    (fresh / ".DS_Store").write_bytes(b"\x00")
    assert _files(export_av(av, fresh, base_folder)) == exported


@NEEDS_TL3
def test_every_file_an_export_writes_is_one_a_re_export_replaces(tmp_path, base_folder, dataset_meta):
    """check_export_folder takes any name outside EXPORT_FILES for the user's: an export that wrote one could not be
    exported over again."""
    from nla_lens.training import export_ar, export_av, init_ar, init_av
    from nla_lens.training.export import EXPORT_FILES

    folders = (export_av(init_av(base_folder, dataset_meta), tmp_path / "av", base_folder),
               export_ar(init_ar(base_folder, dataset_meta), tmp_path / "ar", base_folder))
    for folder in folders:
        written = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "nla_meta.yaml", "tokenizer.json"} <= written <= EXPORT_FILES


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The folder's files but the model's, the readout's and the sidecar."""
    others = {"config.json", "model.safetensors", "generation_config.json", "value_head.safetensors", "nla_meta.yaml"}
    return {name: data for name, data in _files(folder).items() if name not in others}


def _exported_pair(tmp_path: Path, base_folder: Path, dataset_meta: nl.NLAMeta) -> tuple[Path, Path]:
    from nla_lens.training import export_pair, init_ar, init_av

    return export_pair(init_av(base_folder, dataset_meta), init_ar(base_folder, dataset_meta),
                       (tmp_path / "av", tmp_path / "ar"), (base_folder, base_folder))


@NEEDS_TL3
def test_an_export_carries_the_bases_tokenizer_files_byte_for_byte_with_no_bos_the_base_lacks(
        tmp_path, base_folder, dataset_meta):
    """The export saved the live tokenizer, to which TransformerLens had given a BOS (its EOS) the Qwen base has
    none of: every exported AV / AR recorded `bos_token: <|im_end|>`, and TransformerLens, loading the folder, put
    it first in every text."""
    base_files = _tokenizer_files(base_folder)
    assert "tokenizer_config.json" in base_files
    text = "the cat sat"
    expected = loading.load_tokenizer(base_folder).encode(text)
    for folder in _exported_pair(tmp_path, base_folder, dataset_meta):
        assert _tokenizer_files(folder) == base_files
        assert AutoTokenizer.from_pretrained(folder).bos_token is None
    av = nl.ActivationVerbalizer.from_pretrained(tmp_path / "av", backend="hooked")
    assert av.model.tokenizer.encode(text) == expected  # TransformerLens's tokenizer, as the base's


@NEEDS_TL3
def test_a_bos_family_export_carries_its_tokenizer_files_and_keeps_the_bos(tmp_path, bos_paths):
    """Llama puts `<|begin_of_text|>` first: the exported AV's tokenizer must too, from the same files."""
    from nla_lens.training import export_av

    source = bos_paths["llama_av"]
    folder = export_av(nl.ActivationVerbalizer.from_pretrained(source, backend="hooked"), tmp_path / "av", source)
    assert _tokenizer_files(folder) == _tokenizer_files(source) != {}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]


@NEEDS_TL3
@pytest.mark.parametrize("stray_bos", [False, True], ids=["exported-now", "exported-with-a-stray-bos"])
def test_an_exported_av_as_the_base_warns_and_explains(tmp_path, base_folder, dataset_meta, stray_bos):
    """The README: an AV passed as the base runs, with a warning. With the BOS the export recorded, TransformerLens
    gave the AV's model a tokenizer that put it first, and explain refused the pair ("puts a BOS first"). A folder
    exported so before the fix (simulated: its EOS recorded as its BOS) loads as one exported now."""
    av_folder, ar_folder = _exported_pair(tmp_path, base_folder, dataset_meta)
    if stray_bos:
        config = json.loads((av_folder / "tokenizer_config.json").read_text())
        (av_folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": config["eos_token"]}))
    nla = nl.NLA.from_pretrained(av_folder, ar_folder, backend="hooked")
    with pytest.warns(UserWarning, match="the AV's own model, a fine-tuned copy"):
        table = nla.explain(nla.av.model, "the cat", positions=-1, baseline=1.0, max_new_tokens=2)
    assert len(table.rows) == 1


@NEEDS_TL3
@pytest.mark.parametrize("drift", ["stray-bos", "another-chat-template"])
def test_an_export_whose_base_tokenizes_otherwise_than_training_is_refused_and_writes_nothing(tmp_path, base_folder,
                                                                                              dataset_meta, drift):
    """The export copies `base_model`'s tokenizer files: a base_model other than the one the model was trained from
    (another tokenizer, or its files replaced since) gave the export a tokenizer it was never trained with, in silence.
    The files written must tokenize the sidecar's prompts as the tokenizer training used, read either way."""
    from nla_lens.training import export_av, init_av

    av = init_av(base_folder, dataset_meta)
    other = Path(shutil.copytree(base_folder, tmp_path / "other_base"))
    if drift == "stray-bos":
        as_exported_with_a_stray_bos(other)
        expected = ("read as TransformerLens reads a folder (add_bos_token=True), tokenize the AV template's text "
                    "otherwise than the tokenizer training used")
    else:
        template = other / "chat_template.jinja"
        template.write_text(template.read_text(encoding="utf-8").replace("<|im_start|>{% endif %}",
                                                                         "<|im_start|>\n{% endif %}"), encoding="utf-8")
        expected = "read as nla_lens reads them, tokenize the AV prompt otherwise than the tokenizer training used"
    with pytest.raises(nl.TokenizerDriftError, match=rf"^the tokenizer files of {re.escape(str(other))}, "
                                                     rf"{re.escape(expected)} \({re.escape(str(base_folder))}\): "
                                                     r"from token \d+, .* where training had .*Export with the "
                                                     r"tokenizer files of the base model the checkpoint was trained "
                                                     r"from"):
        export_av(av, tmp_path / "av", other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_base"]  # nothing written, no staged folder left


@NEEDS_TL3
def test_an_export_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path, base_folder, dataset_meta):
    """The rename replaced the link with a new folder and left the folder it pointed at holding the old export."""
    from nla_lens.training import export_av, init_av

    av = init_av(base_folder, dataset_meta)
    target = export_av(av, tmp_path / "exports" / "av", base_folder)
    earlier = _files(target)
    link = tmp_path / "av"
    link.symlink_to(Path("exports") / "av", target_is_directory=True)
    with torch.no_grad():
        next(av.model.parameters()).add_(1.0)
    assert export_av(av, link, base_folder) == link
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert _files(target) == _files(export_av(av, tmp_path / "fresh", base_folder)) != earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["av", "exports", "fresh"]
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["av"]  # nothing staged or set aside left


@NEEDS_TL3
def test_non_finite_weights_past_three_are_named_first_three_then_counted(tmp_path, base_folder, dataset_meta):
    """The refusal listed three tensors then "...", where every other list of names says how many more."""
    from nla_lens.training import export_ar, init_ar

    ar = init_ar(base_folder, dataset_meta)
    with torch.no_grad():
        for name, param in ar.model.named_parameters():
            if not name.rsplit(".", 1)[-1].lstrip("_").startswith("b_"):  # biases HF lacks: refused first
                param.fill_(float("nan"))
    with pytest.raises(nl.ConfigError) as info:
        export_ar(ar, tmp_path / "nan", base_folder)
    said = re.search(r"(\d+) of (\d+) weight tensors hold NaN or inf in float32 \(([^()]*)\)\. The training diverged",
                     str(info.value))
    assert said is not None and said[1] == said[2]
    names = said[3].split(", ")
    assert len(names) == 4 and names[0] == "model.embed_tokens.weight"
    assert names[3] == f"and {int(said[1]) - 3} more" and int(said[1]) > 3
    assert not (tmp_path / "nan").exists()


@NEEDS_TL3
@pytest.mark.parametrize("loop", ["self", "pair"])
def test_an_export_into_a_symlink_loop_is_refused_naming_the_link_and_writes_nothing(tmp_path, base_folder,
                                                                                   dataset_meta, loop):
    """Path.resolve raised a bare RuntimeError ("Symlink loop from ...") out of the export's replaced_folders."""
    from nla_lens.training import export_av, init_av

    av = init_av(base_folder, dataset_meta)
    link = tmp_path / "av"
    if loop == "self":
        link.symlink_to("av", target_is_directory=True)
    else:
        link.symlink_to("other", target_is_directory=True)
        (tmp_path / "other").symlink_to("av", target_is_directory=True)
    before = sorted((p.name, os.readlink(p)) for p in tmp_path.iterdir())
    refusal = (f"{link} is a symlink that leads round a loop of links, so there is no folder there to write into: "
               "point it at a folder, or remove it")
    with pytest.raises(nl.ConfigError) as info:
        export_av(av, link, base_folder)
    assert str(info.value) == refusal
    assert sorted((p.name, os.readlink(p)) for p in tmp_path.iterdir()) == before  # nothing staged, links kept


def test_a_symlink_loop_is_refused_by_the_check_run_before_training(tmp_path):
    """The training commands and the toy check their export folders before training; a loop passed that check
    (nothing exists behind it) and was refused only by the export, after the run."""
    from nla_lens.training.export import check_export_folder

    link = tmp_path / "model"
    link.symlink_to("model", target_is_directory=True)
    with pytest.raises(nl.ConfigError, match=rf"^{re.escape(str(link))} is a symlink that leads round a loop"):
        check_export_folder(link, "av")
