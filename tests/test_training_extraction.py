"""Activation extraction: the stored vectors are the base model's resid_post, with provenance, resumable."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import torch
import yaml
from conftest import D_MODEL, LAYER, NEEDS_TL3, cut_write_text_short
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nla_lens as nl
from nla_lens import loading, testing
from nla_lens.sidecar import SIDECAR_NAME, check_tokenizer
from nla_lens.training import (
    Document,
    extract_activations,
    extraction,
    label_activations,
    load_activations,
    save_explanations,
)
from nla_lens.training.extraction import DOCUMENTS_KEY, SETTINGS_KEY, sample_positions, shard_path, token_facts


@pytest.fixture(scope="module")
def base_tl(base_folder):
    tokenizer = loading.load_tokenizer(base_folder)
    return loading.load_hooked_transformer(base_folder, tokenizer, dtype=torch.float32, device="cpu"), tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    # Uneven lengths (so batches are padded) and one document too short to yield any row.
    docs = testing.tiny_corpus(11, words_per_doc=12, seed=3)
    return [*docs[:4], Document("short", "the sea"), *[Document(d.id, d.text * 2) for d in docs[4:]]]


@NEEDS_TL3
def test_extraction_stores_unbatched_resid_post_with_provenance(tmp_path, base_tl, corpus, extract_config):
    model, tokenizer = base_tl
    acts = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    assert acts.vectors.dtype == torch.float32 and acts.vectors.shape == (len(acts), D_MODEL)
    texts = {d.id: d.text for d in corpus}
    hook = f"blocks.{LAYER}.hook_resid_post"
    for doc_id in texts:
        ids = tokenizer(texts[doc_id])["input_ids"][:extract_config.max_tokens]
        rows = [i for i, r in enumerate(acts.records) if r.doc_id == doc_id]
        assert len(rows) == max(0, min(extract_config.positions_per_doc, len(ids) - extract_config.min_context))
        if not rows:
            continue
        _, cache = model.run_with_cache(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        names_filter=hook)
        for i in rows:
            record = acts.records[i]
            assert record.position >= extract_config.min_context
            assert record.token_id == ids[record.position]
            assert record.token == tokenizer.decode([ids[record.position]])
            assert record.prefix == tokenizer.decode(ids[:record.position])
            assert (acts.vectors[i] - cache[hook][0, record.position]).abs().max() < 1e-5


@NEEDS_TL3
def test_dataset_sidecar_is_nanonla_dialect_and_matches_the_tokenizer(tmp_path, base_tl, corpus, extract_config):
    model, tokenizer = base_tl
    meta = load_activations(extract_activations(model, tokenizer, corpus[:3], tmp_path, extract_config,
                                                progress=False)).meta
    assert (meta.kind, meta.schema_version, meta.layer, meta.d_model) == ("nla_dataset", 1, LAYER, D_MODEL)
    assert meta.injection == nl.InjectionSpec("karvonen", "blocks.1.hook_resid_post")
    # The derived token facts agree with the fixtures' own derivation, and pass the loader's checks.
    assert meta.raw["tokens"] == testing.token_facts(tokenizer)
    check_tokenizer(meta, tokenizer)


def test_positions_are_seeded_by_document_and_past_min_context(extract_config):
    picks = sample_positions(30, "doc-7", extract_config)
    assert picks == sorted(picks) and len(set(picks)) == extract_config.positions_per_doc
    assert min(picks) >= extract_config.min_context
    assert picks == sample_positions(30, "doc-7", extract_config)
    reseeded = dataclasses.replace(extract_config, seed=extract_config.seed + 1)
    assert any(sample_positions(30, f"doc-{i}", reseeded) != sample_positions(30, f"doc-{i}", extract_config)
               for i in range(5))


@NEEDS_TL3
def test_extraction_resumes_by_skipping_written_shards(tmp_path, base_tl, corpus, extract_config, caplog):
    model, tokenizer = base_tl
    extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)
    shards = sorted((tmp_path / "shards").glob("*.safetensors"))
    assert len(shards) == 3  # 11 documents, 5 per shard
    original = [p.read_bytes() for p in shards]
    shard_path(tmp_path, 1).unlink()

    forwarded = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: forwarded.append(x.shape[0]))]):
        extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)
        assert sum(forwarded) == 5  # only the missing shard's documents ran
        forwarded.clear()
        with caplog.at_level(logging.INFO, logger=extraction.__name__):
            extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)
        assert forwarded == []
    assert "in 3 shards, 3 of them from an earlier run of this extraction" in caplog.messages[-1]  # said nothing
    assert [p.read_bytes() for p in shards] == original

    with pytest.raises(nl.ConfigError, match="other settings"):
        extract_activations(model, tokenizer, corpus, tmp_path, dataclasses.replace(extract_config, layer=1),
                            progress=False)


@NEEDS_TL3
def test_resuming_with_other_settings_names_each_one_with_both_values(tmp_path, base_tl, corpus, extract_config):
    """The refusal said only "other settings (base model, layer, positions, tokenizer or templates)"."""
    model, tokenizer = base_tl
    extract_activations(model, tokenizer, corpus[:3], tmp_path, extract_config, progress=False)
    with pytest.raises(nl.ConfigError, match=r"other settings \(extraction\.seed: 0 on disk, 1 requested\); resume "
                                             r"with the same config"):
        extract_activations(model, tokenizer, corpus[:3], tmp_path, dataclasses.replace(extract_config, seed=1),
                            progress=False)
    sidecar = yaml.safe_load((tmp_path / SIDECAR_NAME).read_text())
    del sidecar["tokenization"]
    sidecar["extraction"]["norm"] = None
    (tmp_path / SIDECAR_NAME).write_text(yaml.safe_dump(sidecar))
    with pytest.raises(nl.ConfigError, match=r"other settings \(extraction\.norm: None on disk, 'none' requested; "
                                             r"tokenization: absent on disk, \{.*\} requested\)"):
        extract_activations(model, tokenizer, corpus[:3], tmp_path, extract_config, progress=False)


def _changed(corpus: list[Document], change: str) -> list[Document]:
    """`corpus` with document 6 (in shard 1 of 3) edited or renamed, or cut to its first shard."""
    doc = corpus[6]
    edited = {"text": Document(doc.id, doc.text + " the sea"), "id": Document("renamed", doc.text)}
    return corpus[:5] if change == "shorter" else [*corpus[:6], edited[change], *corpus[7:]]


@NEEDS_TL3
@pytest.mark.parametrize("change", ["text", "id", "shorter"])
def test_resuming_with_another_corpus_is_refused(tmp_path, base_tl, corpus, extract_config, change):
    model, tokenizer = base_tl
    extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)
    with pytest.raises(nl.ConfigError, match="use a new out_dir"):
        extract_activations(model, tokenizer, _changed(corpus, change), tmp_path, extract_config, progress=False)


@NEEDS_TL3
def test_shards_written_without_a_documents_record_are_checked_by_their_rows_doc_ids(tmp_path, base_tl, corpus,
                                                                                    extract_config):
    model, tokenizer = base_tl
    extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)
    for path in (tmp_path / "shards").glob("*.safetensors"):  # as nla_lens wrote them before the record
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = {k: v for k, v in load_file(path).items() if k != DOCUMENTS_KEY}
        save_file(tensors, path, metadata=metadata)
    extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)
    with pytest.raises(nl.ConfigError, match="other documents"):
        extract_activations(model, tokenizer, _changed(corpus, "id"), tmp_path, extract_config, progress=False)


@NEEDS_TL3
def test_a_shard_of_another_layers_extraction_copied_in_is_refused_on_load_and_on_resume(tmp_path, base_tl, corpus,
                                                                                         extract_config):
    """An extraction of the same corpus at another layer holds the same documents, positions and tokens in each shard:
    its shard 1 copied over this one's loaded as this extraction's layer, and a resume kept it, without a word."""
    model, tokenizer = base_tl
    whole = load_activations(extract_activations(model, tokenizer, corpus, tmp_path / "a", extract_config,
                                                 progress=False))
    other_layer = dataclasses.replace(extract_config, layer=extract_config.layer - 1)
    other = load_activations(extract_activations(model, tokenizer, corpus, tmp_path / "b", other_layer,
                                                 progress=False))
    assert other.records == whole.records and not torch.allclose(other.vectors, whole.vectors, atol=1e-3)
    copied = shard_path(tmp_path / "a", 1)
    shard_path(tmp_path / "b", 1).replace(copied)
    for run in (lambda: load_activations(tmp_path / "a"),
                lambda: extract_activations(model, tokenizer, corpus, tmp_path / "a", extract_config, progress=False)):
        with pytest.raises(nl.ConfigError, match=r"acts-00001\.safetensors was written by another extraction than "
                                                 r".*another layer, base model or sampling .*Delete it and rerun"):
            run()
    copied.unlink()
    again = load_activations(extract_activations(model, tokenizer, corpus, tmp_path / "a", extract_config,
                                                 progress=False))
    assert torch.equal(again.vectors, whole.vectors) and again.records == whole.records


def _without_settings_record(folder):
    """The folder's shards as nla_lens wrote them before they recorded their extraction (`SETTINGS_KEY`)."""
    for path in (folder / "shards").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        save_file({k: v for k, v in load_file(path).items() if k != SETTINGS_KEY}, path, metadata=metadata)


@NEEDS_TL3
def test_resuming_an_extraction_in_another_dtype_is_refused_naming_both(tmp_path, base_tl, base_folder, corpus,
                                                                        extract_config):
    """The sidecar did not record the dtype the base ran in: a resume in bfloat16 of a float32 extraction wrote its
    missing shards in bfloat16 beside the float32 ones, one dataset of two precisions, without a word."""
    model, tokenizer = base_tl
    extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)
    recorded = yaml.safe_load((tmp_path / SIDECAR_NAME).read_text(encoding="utf-8"))["extraction"]
    assert recorded["dtype"] == "float32"
    assert recorded["base_fingerprint"] == loading.folder_fingerprint(base_folder, extraction.WEIGHT_FILES)
    shard_path(tmp_path, 1).unlink()
    half = loading.load_hooked_transformer(base_folder, tokenizer, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(nl.ConfigError, match=rf"{tmp_path} was extracted with the base model in float32, and this run "
                                             r"has it in bfloat16: its shards would mix the two precisions\. Resume in "
                                             r"float32 \(dtype: float32 in the extract config.*or extract into a new "
                                             r"out_dir"):
        extract_activations(half, tokenizer, corpus, tmp_path, extract_config, progress=False)
    assert not shard_path(tmp_path, 1).exists()  # refused before any shard was written
    extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)  # as the message says
    assert len(load_activations(tmp_path)) > 0


@NEEDS_TL3
def test_resuming_an_extraction_whose_base_weights_were_replaced_is_refused(tmp_path, base_tl, base_folder, corpus,
                                                                            extract_config):
    """Other weights saved into the base folder (a re-export, a re-download of another revision) resumed as the same
    base: the sidecar compared the folder's path alone."""
    model, tokenizer = base_tl
    base = tmp_path / "base"
    shutil.copytree(base_folder, base)
    out = tmp_path / "acts"
    extract_activations(model, tokenizer, corpus, out, extract_config, base_model=str(base), progress=False)
    shard_path(out, 1).unlink()
    (base / "README.md").write_text("notes", encoding="utf-8")  # not a weight file: the same base
    extract_activations(model, tokenizer, corpus, out, extract_config, base_model=str(base), progress=False)
    shard_path(out, 1).unlink()
    testing.save_base_model(base, d_model=D_MODEL, seed=1)
    with pytest.raises(nl.ConfigError, match=r"was extracted from other weight files of base model .*base than this "
                                             r"run reads \(fingerprint [0-9a-f]{64} on disk, [0-9a-f]{64} now.*mix "
                                             r"two models' activations"):
        extract_activations(model, tokenizer, corpus, out, extract_config, base_model=str(base), progress=False)
    assert not shard_path(out, 1).exists()


@NEEDS_TL3
def test_an_extraction_written_before_it_recorded_the_base_dtype_still_loads_and_resumes_with_a_warning(
        tmp_path, base_tl, corpus, extract_config):
    model, tokenizer = base_tl
    whole = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    sidecar = yaml.safe_load((tmp_path / SIDECAR_NAME).read_text(encoding="utf-8"))
    for key in extraction.BASE_RUN_KEYS:  # as an earlier version wrote it, its shards under that sidecar
        del sidecar["extraction"][key]
    (tmp_path / SIDECAR_NAME).write_text(yaml.safe_dump(sidecar, sort_keys=False), encoding="utf-8")
    _with_settings_record(tmp_path, extraction.extraction_digest(nl.load_meta(tmp_path)))
    assert torch.equal(load_activations(tmp_path).vectors, whole.vectors)
    shard_path(tmp_path, 1).unlink()
    with pytest.warns(UserWarning, match=rf"{tmp_path} records no dtype nor base_fingerprint of the base model "
                                         r"\(extracted before nla_lens recorded them\), so nothing checks"):
        again = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config,
                                                     progress=False))
    assert torch.equal(again.vectors, whole.vectors) and again.records == whole.records
    assert yaml.safe_load((tmp_path / SIDECAR_NAME).read_text(encoding="utf-8")) == sidecar  # kept as it was written


def _with_settings_record(folder, settings):
    """The folder's shards recording `settings` as the `extraction_digest` they were written under."""
    for path in (folder / "shards").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        save_file({**load_file(path), SETTINGS_KEY: settings}, path, metadata=metadata)


@NEEDS_TL3
def test_shards_written_before_they_recorded_their_extraction_still_load(tmp_path, base_tl, corpus, extract_config):
    model, tokenizer = base_tl
    whole = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    _without_settings_record(tmp_path)
    again = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    assert torch.equal(again.vectors, whole.vectors) and again.records == whole.records


@NEEDS_TL3
def test_a_damaged_shard_is_named_with_the_fix_on_load_and_on_resume(tmp_path, base_tl, corpus, extract_config):
    """A shard cut short after its rename (a crash before its data reached the disk, an interrupted copy) was
    safetensors' bare 'incomplete metadata' error, which names no file, from load_activations and from resuming."""
    model, tokenizer = base_tl
    whole = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    damaged = shard_path(tmp_path, 1)
    damaged.write_bytes(damaged.read_bytes()[:-10])
    for run in (lambda: load_activations(tmp_path),
                lambda: extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)):
        with pytest.raises(nl.ConfigError, match=r"acts-00001\.safetensors cannot be read.*Delete it and rerun"):
            run()
    damaged.unlink()
    again = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    assert torch.equal(again.vectors, whole.vectors) and again.records == whole.records


@NEEDS_TL3
def test_an_extraction_killed_midway_is_refused_until_resumed(tmp_path, base_tl, corpus, extract_config, monkeypatch):
    """load_activations read the shards a killed run had written as if they were the whole corpus."""
    model, tokenizer = base_tl
    whole = load_activations(extract_activations(model, tokenizer, corpus, tmp_path / "whole", extract_config,
                                                 progress=False))
    write = extraction._write_shard

    def write_then_die(*args, **kwargs):
        row_docs = write(*args, **kwargs)
        if args[3] == shard_path(tmp_path / "out", 1):
            raise KeyboardInterrupt("killed after the second shard")
        return row_docs

    monkeypatch.setattr(extraction, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract_activations(model, tokenizer, corpus, tmp_path / "out", extract_config, progress=False)
    with pytest.raises(nl.ConfigError, match=r"did not finish.*rerun it with the same config"):
        load_activations(tmp_path / "out")
    with pytest.raises(nl.ConfigError, match="use a new out_dir"):  # a refused resume writes nothing
        extract_activations(model, tokenizer, corpus[:5], tmp_path / "whole", extract_config, progress=False)
    assert len(load_activations(tmp_path / "whole")) == len(whole)
    resumed = load_activations(extract_activations(model, tokenizer, corpus, tmp_path / "out", extract_config,
                                                   progress=False))
    assert torch.equal(resumed.vectors, whole.vectors) and resumed.records == whole.records


@NEEDS_TL3
def test_a_sidecar_write_cut_short_does_not_block_the_rerun(tmp_path, base_tl, corpus, extract_config, monkeypatch):
    """The sidecar was written in place: half of it (a full disk, a kill) made the rerun refuse the folder as
    "an extraction with other settings"."""
    model, tokenizer = base_tl
    cut_write_text_short(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False)
    monkeypatch.undo()
    assert len(load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config,
                                                    progress=False))) > 0


@NEEDS_TL3
@pytest.mark.parametrize("lost", [1, 2])
def test_a_missing_shard_the_last_included_is_named_until_the_rerun_writes_it(tmp_path, base_tl, corpus,
                                                                             extract_config, lost):
    """A folder missing its last shard loaded, silently, as a smaller dataset: only gaps below the last shard on
    disk were seen."""
    model, tokenizer = base_tl
    whole = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    shard_path(tmp_path, lost).unlink()
    with pytest.raises(nl.ConfigError, match=rf"lacks 1 shard of the 3 the extraction wrote "
                                             rf"\(acts-0000{lost}\.safetensors\); rerun the extraction"):
        load_activations(tmp_path)
    again = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    assert torch.equal(again.vectors, whole.vectors) and again.records == whole.records


@NEEDS_TL3
def test_a_shard_replaced_by_one_with_other_rows_is_refused(tmp_path, base_tl, corpus, extract_config):
    model, tokenizer = base_tl
    whole = load_activations(extract_activations(model, tokenizer, corpus, tmp_path / "a", extract_config,
                                                 progress=False))
    first = load_activations(extract_activations(model, tokenizer, corpus[:5], tmp_path / "b", extract_config,
                                                 progress=False))
    last_rows = sum(r.doc_id in {d.id for d in corpus[10:]} for r in whole.records)  # shard 2: documents 10 and 11
    shard_path(tmp_path / "b", 0).replace(shard_path(tmp_path / "a", 2))
    with pytest.raises(nl.ConfigError, match=rf"holds {len(whole) - last_rows + len(first)} rows, but the "
                                             rf"extraction wrote {len(whole)}: shards were replaced"):
        load_activations(tmp_path / "a")


@NEEDS_TL3
@pytest.mark.parametrize("edit", ["wider", "a row short"])
def test_a_shard_whose_vectors_do_not_fit_its_rows_and_d_model_is_refused(tmp_path, base_tl, corpus, extract_config,
                                                                           edit):
    """A shard of another extraction of the corpus (another base of the tokenizer: wider rows) passed the checks of
    its rows and failed in training, after the model loaded (AR SFT: a bare RuntimeError on the shapes)."""
    model, tokenizer = base_tl
    folder = extract_activations(model, tokenizer, corpus[:3], tmp_path, extract_config, progress=False)
    path = shard_path(folder, 0)
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    vectors = tensors["vectors"]
    n = len(vectors)
    tensors["vectors"] = torch.cat([vectors, vectors[:, :8]], 1) if edit == "wider" else vectors[:-1]
    save_file(tensors, str(path), metadata=metadata)
    found = [n, D_MODEL + 8] if edit == "wider" else [n - 1, D_MODEL]
    with pytest.raises(nl.ConfigError, match=rf"holds vectors of shape \[{found[0]}, {found[1]}\], but its {n} rows "
                                             rf"and the extraction's d_model {D_MODEL} \(its nla_meta.yaml\) need "
                                             rf"\[{n}, {D_MODEL}\]: the shard is another extraction's"):
        load_activations(folder)


@NEEDS_TL3
def test_a_damaged_completion_record_is_named_and_rewritten_by_the_rerun(tmp_path, base_tl, corpus, extract_config):
    model, tokenizer = base_tl
    whole = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    (tmp_path / extraction.COMPLETE).write_text('{"shards": 3')
    with pytest.raises(nl.ConfigError, match=r"extraction\.complete\.json is damaged .*rerun the extraction"):
        load_activations(tmp_path)
    assert load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config,
                                                progress=False)).records == whole.records


@NEEDS_TL3
def test_an_extraction_written_before_the_completion_record_is_checked_up_to_its_last_shard(
        tmp_path, base_tl, corpus, extract_config):
    model, tokenizer = base_tl
    whole = load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config, progress=False))
    (tmp_path / extraction.COMPLETE).unlink()  # as nla_lens wrote a finished extraction before the record
    assert load_activations(tmp_path).records == whole.records
    shard_path(tmp_path, 1).unlink()
    with pytest.raises(nl.ConfigError, match=r"lacks 1 shard before its last one \(acts-00001\.safetensors\)"):
        load_activations(tmp_path)
    shard_path(tmp_path, 2).unlink()  # nothing on disk tells the last shards are gone: the rows before them load
    assert load_activations(tmp_path).records == [r for r in whole.records if r.doc_id in {d.id for d in corpus[:5]}]


@NEEDS_TL3
def test_the_documents_dropped_as_too_short_are_counted_in_the_log(tmp_path, base_tl, corpus, extract_config,
                                                                   caplog):
    model, tokenizer = base_tl
    with caplog.at_level(logging.INFO, logger=extraction.__name__):
        rows = len(load_activations(extract_activations(model, tokenizer, corpus, tmp_path, extract_config,
                                                        progress=False)))
    assert (f"{rows} activation rows from 11 of 12 documents in 3 shards; the other 1 dropped as too short (at most "
            "min_context = 4 tokens)") in caplog.messages  # a first run names no rows of an earlier one


@NEEDS_TL3
def test_a_fresh_extraction_of_long_enough_documents_logs_no_zero_counts(tmp_path, base_tl, corpus, extract_config,
                                                                         caplog):
    """It said "0 of them from an earlier run of this extraction; 0 document(s) dropped as too short"."""
    model, tokenizer = base_tl
    long_enough = [doc for doc in corpus if len(tokenizer.encode(doc.text)) > extract_config.min_context]
    with caplog.at_level(logging.INFO, logger=extraction.__name__):
        rows = len(load_activations(extract_activations(model, tokenizer, long_enough, tmp_path, extract_config,
                                                        progress=False)))
    assert caplog.messages[-1].startswith(f"{rows} activation rows from {len(long_enough)} documents in ")
    assert caplog.messages[-1].endswith(" shards")


@NEEDS_TL3
def test_an_extraction_into_one_shard_logs_it_in_the_singular(tmp_path, base_tl, corpus, extract_config, caplog):
    """`nla-lens extract examples/extract.yaml`, the README's first training command, said "in 1 shards"."""
    model, tokenizer = base_tl
    config = dataclasses.replace(extract_config, docs_per_shard=len(corpus))
    with caplog.at_level(logging.INFO, logger=extraction.__name__):
        extract_activations(model, tokenizer, corpus, tmp_path, config, progress=False)
    assert " in 1 shard; the other 1 dropped as too short" in caplog.messages[-1]


@NEEDS_TL3
@pytest.mark.parametrize(("texts", "dropped"), [([], 0), (["the sea", "a cat"], 2)])
def test_a_corpus_that_gives_no_row_is_refused_with_its_counts(tmp_path, base_tl, extract_config, texts, dropped):
    """An empty corpus, or one of documents all too short, finished with no rows, and training later said only
    "run the extraction first"."""
    model, tokenizer = base_tl
    with pytest.raises(nl.InputError, match=rf"no activations: {len(texts)} documents read, {dropped} of them "
                                            rf"dropped as too short \(a document needs more than min_context = 4 "
                                            rf"tokens\); give more or longer documents or lower extract\.min_context"):
        extract_activations(model, tokenizer, texts, tmp_path, extract_config, progress=False)
    assert not (tmp_path / extraction.COMPLETE).exists()


@NEEDS_TL3
def test_max_tokens_over_the_base_models_context_is_refused(tmp_path, base_tl, corpus, extract_config):
    model, tokenizer = base_tl
    config = dataclasses.replace(extract_config, max_tokens=model.cfg.n_ctx + 1)
    with pytest.raises(nl.ConfigError, match=f"n_ctx={model.cfg.n_ctx}; set max_tokens <= {model.cfg.n_ctx}"):
        extract_activations(model, tokenizer, corpus, tmp_path, config, progress=False)


@NEEDS_TL3
def test_duplicate_document_ids_are_rejected(tmp_path, base_tl, extract_config):
    model, tokenizer = base_tl
    docs = [Document("a", "the cat sat on the mat " * 3), Document("a", "a dog ran in the park " * 3)]
    with pytest.raises(nl.InputError, match="occurs twice"):
        extract_activations(model, tokenizer, docs, tmp_path, extract_config, progress=False)


@NEEDS_TL3
def test_integer_document_ids_are_stored_as_text_so_saved_explanations_find_their_rows(tmp_path, base_tl, corpus,
                                                                                       extract_config):
    """`Document(i, text)` stored the id as a JSON number, and a saved explanations file (read as text) matched none
    of the extraction's rows: "explanations ... match no activation row", for the very folder they were saved from."""
    model, tokenizer = base_tl
    docs = [Document(i, doc.text) for i, doc in enumerate(corpus)]
    extract_activations(model, tokenizer, docs, tmp_path / "acts", extract_config, progress=False)
    acts = load_activations(tmp_path / "acts")
    assert {r.doc_id for r in acts.records} <= {str(i) for i in range(len(docs))}
    labelled = label_activations(acts, lambda record: f"{record.doc_id}/{record.position}")
    saved = label_activations(acts, save_explanations(labelled, tmp_path / "explanations.jsonl"))
    assert saved.explanations == labelled.explanations == [f"{r.doc_id}/{r.position}" for r in acts.records]


@NEEDS_TL3
def test_an_extraction_an_earlier_version_wrote_with_integer_ids_loads_them_as_text(tmp_path, base_tl, corpus,
                                                                                    extract_config):
    """Its shards record the ids as JSON numbers: loaded as such, no explanation saved for it matched a row."""
    model, tokenizer = base_tl
    docs = [Document(str(i), doc.text) for i, doc in enumerate(corpus)]
    whole = load_activations(extract_activations(model, tokenizer, docs, tmp_path, extract_config, progress=False))
    for path in (tmp_path / "shards").glob("*.safetensors"):  # as an earlier version wrote Document(i, text)'s
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        records = [{**r, "doc_id": int(r["doc_id"])} for r in json.loads(metadata["records"])]
        save_file(load_file(path), path, metadata={**metadata, "records": json.dumps(records)})
    acts = load_activations(tmp_path)
    assert acts.records == whole.records
    labelled = label_activations(acts, lambda record: f"{record.doc_id}/{record.position}")
    assert label_activations(acts, save_explanations(labelled, tmp_path / "labels.jsonl")).explanations == (
        labelled.explanations)


@NEEDS_TL3
def test_a_document_id_given_as_a_number_and_as_its_digits_is_one_id(tmp_path, base_tl, extract_config):
    """`Document(1, ...)` and `Document("1", ...)` were two documents whose rows share one key in an explanations
    file ("1" and a position both sample alike): one label line named rows of both."""
    model, tokenizer = base_tl
    docs = [Document(1, "the cat sat on the mat " * 3), Document("1", "a dog ran in the park " * 3)]
    with pytest.raises(nl.InputError, match="document id '1' occurs twice"):
        extract_activations(model, tokenizer, docs, tmp_path, extract_config, progress=False)
    with pytest.raises(nl.InputError, match=r"document 0 has id 1\.5, a float: ids are text .*Document\(str"):
        extract_activations(model, tokenizer, [Document(1.5, "the cat sat")], tmp_path, extract_config,
                            progress=False)


@NEEDS_TL3
def test_an_error_mid_extraction_closes_the_progress_bar(tmp_path, base_tl, corpus, extract_config, capsys):
    """The bar stayed open while the error was handled, so `nla-lens extract` printed the error line (or Ctrl-C's)
    onto the bar's line."""
    model, tokenizer = base_tl
    config = dataclasses.replace(extract_config, docs_per_shard=1)
    docs = [*corpus[:2], corpus[0]]  # the repeated id is found at the third document, after two shards
    try:
        extract_activations(model, tokenizer, docs, tmp_path, config, progress=True)
    except nl.InputError as error:  # read while the error is handled, as the CLI prints it
        assert "occurs twice" in str(error)
        bar = capsys.readouterr().err
    assert "extract:" in bar and "2/3" in bar and bar.endswith("\n"), repr(bar)


@NEEDS_TL3
def test_a_marker_that_is_not_one_token_is_rejected(base_tl):
    _, tokenizer = base_tl
    with pytest.raises(nl.TokenizerDriftError, match="single token"):
        token_facts(tokenizer, "☃", testing.AV_TEMPLATE, testing.AR_TEMPLATE)


def test_default_templates_give_the_released_qwen3_token_facts():
    from test_qwen3_tokenizer_facts import _tokenizer_dir
    from transformers import AutoTokenizer

    from nla_lens.training.config import DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE, DEFAULT_INJECTION_CHAR

    folder = _tokenizer_dir()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no Qwen3 tokenizer in {folder}; run .ci/fetch_qwen3_tokenizer.sh")
    facts = token_facts(AutoTokenizer.from_pretrained(str(folder)), DEFAULT_INJECTION_CHAR, DEFAULT_AV_TEMPLATE,
                        DEFAULT_AR_TEMPLATE)
    assert facts == {"injection_char": "㈎", "injection_token_id": 149705, "injection_left_neighbor_id": 29,
                     "injection_right_neighbor_id": 522, "critic_suffix_ids": [1318, 29, 366, 1708, 29]}


def test_activations_folder_without_a_sidecar_names_the_extraction(tmp_path):
    """`activations:` at a folder with no sidecar said "Pass an AV or AR folder" (load_meta's message)."""
    with pytest.raises(nl.SidecarError, match="is not an extraction folder.*nla-lens extract") as error:
        load_activations(tmp_path)  # a folder, but no extraction
    assert "AV or AR" not in str(error.value)


@NEEDS_TL3
def test_an_extraction_recorded_with_a_relative_base_model_resumes(tmp_path, base_tl, base_folder, corpus,
                                                                   extract_config, monkeypatch):
    """Earlier versions recorded a relative base_model as written; now it is recorded absolute, so resuming such a
    folder with the same config was refused as "an extraction with other settings"."""
    model, tokenizer = base_tl
    monkeypatch.chdir(base_folder.parent)
    out = tmp_path / "acts"
    extract_activations(model, tokenizer, corpus, out, extract_config, base_model=base_folder.name, progress=False)
    sidecar = yaml.safe_load((out / SIDECAR_NAME).read_text(encoding="utf-8"))
    assert sidecar["extraction"]["base_model"] == str(base_folder.resolve())
    sidecar["extraction"]["base_model"] = base_folder.name  # as an earlier version wrote it
    (out / SIDECAR_NAME).write_text(yaml.safe_dump(sidecar, sort_keys=False), encoding="utf-8")
    _without_settings_record(out)
    shard_path(out, 1).unlink()
    extract_activations(model, tokenizer, corpus, out, extract_config, base_model=base_folder.name, progress=False)
    assert len(load_activations(out)) > 0
    with pytest.raises(nl.ConfigError, match="other settings"):  # another base is still another extraction
        extract_activations(model, tokenizer, corpus, out, extract_config, base_model=str(tmp_path), progress=False)


@NEEDS_TL3
@pytest.mark.parametrize("absolute", [False, True])
def test_an_extraction_an_earlier_version_recorded_through_a_linked_base_folder_resumes(
        tmp_path, base_tl, base_folder, corpus, extract_config, monkeypatch, absolute):
    """The dataset_id was taken from the recorded (resolved) folder, the link's target, where earlier versions
    named the folder as given, the link: such an unfinished extraction was refused as "other settings"."""
    model, tokenizer = base_tl
    link = tmp_path / "base-link"
    link.symlink_to(base_folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    given = str(link) if absolute else link.name
    out = tmp_path / "acts"
    extract_activations(model, tokenizer, corpus, out, extract_config, base_model=given, progress=False)
    sidecar = yaml.safe_load((out / SIDECAR_NAME).read_text(encoding="utf-8"))
    assert sidecar["extraction"]["base_model"] == str(base_folder.resolve())
    # as an earlier version wrote it: the folder as given, and the dataset named after it
    sidecar["extraction"]["base_model"] = given
    sidecar["dataset_id"] = f"base-link-L{extract_config.layer}"
    (out / SIDECAR_NAME).write_text(yaml.safe_dump(sidecar, sort_keys=False), encoding="utf-8")
    _without_settings_record(out)
    shard_path(out, 1).unlink()
    extract_activations(model, tokenizer, corpus, out, extract_config, base_model=given, progress=False)
    assert len(load_activations(out)) > 0
