"""Activation extraction: base-model residuals at layer K, with provenance, in resumable shards.

A folder holds `nla_meta.yaml` (``kind: nla_dataset``, ``schema_version: 1``) and
``shards/acts-00000.safetensors``, ... Each shard is one file: `vectors` [n, d_model] float32 and
`positions` / `token_ids` [n], with the per-row provenance (doc id, position, token, prefix) as JSON
in the safetensors metadata, so a shard is written (and counted as done) atomically; its
`documents_digest` [16] uint8 lets a resumed run check the shard holds the corpus's documents, and its
`extraction_digest` [16] uint8 that it was written under the folder's sidecar (layer, base, sampling).
While shards are being written the folder also holds `extraction.in_progress`, so a run killed midway
is not read as a finished, smaller dataset; a finished run writes `extraction.complete.json` (its shard and row
counts), so a shard lost afterwards, the last one included, is named on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import numbers
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import yaml
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nla_lens import backends, loading
from nla_lens.capture import resid_post_name
from nla_lens.checks import blocks_phrase, counted, warn_at_caller
from nla_lens.errors import ConfigError, InputError, NLAError, SidecarError, TokenizerDriftError
from nla_lens.sidecar import (
    SIDECAR_NAME,
    NLAMeta,
    av_prompt_ids,
    check_tokenizer,
    load_meta,
    parse_meta,
    text_ids,
    tokenization_record,
)
from nla_lens.training.config import ExtractConfig
from nla_lens.training.padding import pad
from nla_lens.vector_files import save_tensors, write_atomic

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)
SHARD_DIR = "shards"
IN_PROGRESS = "extraction.in_progress"  # present while shards are being written: load_activations refuses the folder
COMPLETE = "extraction.complete.json"  # {"shards": n, "rows": n} of the finished run: what load_activations expects
DOCUMENTS_KEY = "documents_digest"  # the shard tensor `documents_digest` of the documents it holds
SETTINGS_KEY = "extraction_digest"  # the shard tensor `extraction_digest` of the sidecar it was written under
# What the sidecar's `extraction` block records of the base as it ran (`base_run_facts`). Absent from extractions
# written before nla_lens recorded them, which still resume (unchecked, with a warning).
BASE_RUN_KEYS = ("dtype", "base_fingerprint")
WEIGHT_FILES = (".safetensors", ".bin")  # the base folder's files its fingerprint reads: a README added changes none


@dataclass(frozen=True)
class Document:
    """One corpus line: the explanations file keys its rows by this `id` (and a position), never by line number."""

    id: str  # an integer is stored as its digits, as the explanations file's ids are read
    text: str


@dataclass(frozen=True)
class ActivationRecord:
    """Where one vector came from. The vector has seen `prefix` followed by `token`."""

    doc_id: str
    position: int  # token index in the tokenized document
    token_id: int
    token: str  # the token at `position`, detokenized
    prefix: str  # the detokenized tokens before `position`


@dataclass(frozen=True)
class ActivationDataset:
    """All rows of an extraction folder, in corpus order."""

    meta: NLAMeta
    vectors: Float[Tensor, "n d_model"]
    records: list[ActivationRecord]
    folder: Path | None = None  # where `load_activations` read it (None: built in memory), named in messages

    def __len__(self) -> int:
        return len(self.records)


def token_facts(tokenizer: PreTrainedTokenizerBase, injection_char: str, av_template: str,
                ar_template: str) -> dict[str, Any]:
    """The sidecar's `tokens:` block, derived from the live tokenizer as the training code derives it."""
    marker_ids = tokenizer.encode(injection_char, add_special_tokens=False)
    if len(marker_ids) != 1:
        raise TokenizerDriftError(
            f"the marker {injection_char!r} encodes to {len(marker_ids)} tokens; pick an injection_char "
            "that is a single token in this tokenizer"
        )
    draft = {"injection_char": injection_char, "injection_token_id": marker_ids[0],
             "injection_left_neighbor_id": -1, "injection_right_neighbor_id": -1}
    prompt = av_prompt_ids(_draft_meta(draft, av_template, ar_template), tokenizer)
    if prompt.count(marker_ids[0]) != 1 or prompt.index(marker_ids[0]) in (0, len(prompt) - 1):
        raise TokenizerDriftError(
            f"the AV prompt built from {av_template!r} must hold the marker exactly once, with a token "
            "on each side; change av_template"
        )
    at = prompt.index(marker_ids[0])
    # The suffix's first token can merge with the explanation's last characters; the rest cannot.
    suffix = tokenizer.encode(ar_template.split("{explanation}")[1], add_special_tokens=False)[1:]
    facts = {**draft, "injection_left_neighbor_id": prompt[at - 1], "injection_right_neighbor_id": prompt[at + 1],
             "critic_suffix_ids": suffix or None}
    check_tokenizer(_draft_meta(facts, av_template, ar_template), tokenizer)
    return facts


def _draft_meta(tokens: dict[str, Any], av_template: str, ar_template: str) -> NLAMeta:
    return parse_meta({"kind": "nla_dataset", "schema_version": 1, "tokens": tokens,
                       "extraction": {"d_model": 1, "layer_index": 0},
                       "prompt_templates": {"actor": av_template, "critic": ar_template}},
                      source="the extract config's injection_char, av_template and ar_template")


def dataset_sidecar(tokenizer: PreTrainedTokenizerBase, config: ExtractConfig, *, base_model: str,
                    d_model: int, base_run: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The `nla_dataset` sidecar of an extraction (the key layout nanoNLA copies into checkpoints). A local
    `base_model` folder is recorded by its absolute path: a relative one named nothing once read from elsewhere.
    The dataset is named after the folder as given (a link's name, not its target's), as earlier versions did.
    `base_run` (`base_run_facts`: the base's dtype and weights fingerprint) goes into the `extraction` block."""
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("layer", "batch_size", "injection_char", "av_template", "ar_template")}
    return {
        "dataset_id": f"{Path(base_model).name or base_model}-L{config.layer}",
        "stage": "activations",
        "kind": "nla_dataset",
        "schema_version": 1,
        "extraction": {"base_model": loading.recorded_path(base_model), "d_model": d_model,
                       "layer_index": config.layer, "hook_point": resid_post_name(config.layer),
                       "norm": "none", **settings, **(base_run or {})},
        "tokens": token_facts(tokenizer, config.injection_char, config.av_template, config.ar_template),
        "prompt_templates": {"actor": config.av_template, "critic": config.ar_template},
        "tokenization": tokenization_record(tokenizer),
    }


def base_run_facts(dtype: torch.dtype, base_model: str) -> dict[str, str | None]:
    """The base as this extraction runs it (`BASE_RUN_KEYS`): `dtype`, its weights' dtype, which the residuals are
    computed in, and the `loading.folder_fingerprint` of the weight files of the folder `base_model` names (None where
    it names none here). A resume checks both: each shard's vectors come from the run that wrote it, so another dtype
    or other weights at the same path would leave shards of two precisions or two models in one dataset, in silence."""
    try:
        fingerprint: str | None = loading.folder_fingerprint(loading.named_base_folder(base_model), WEIGHT_FILES)
    except NLAError:  # a name that is no folder here, nor a hub id in the local cache: nothing to fingerprint
        fingerprint = None
    return {"dtype": str(dtype).removeprefix("torch."), "base_fingerprint": fingerprint}


def check_resume_before_loading(out: Path, dtype: torch.dtype, base_model: str) -> None:
    """Refuse resuming `out` with the base in another dtype or from other weight files than its sidecar records, from
    the extract config, before the base loads: `extract_activations` refuses it too, but only once the weights have
    loaded (minutes for an 8B base)."""
    path = out / SIDECAR_NAME
    if not path.is_file():
        return
    try:
        recorded = _as_recorded_now(yaml.safe_load(path.read_text(encoding="utf-8")))["extraction"]
    except (yaml.YAMLError, TypeError, KeyError):  # no extraction sidecar: `extract_activations` names what is wrong
        return
    if isinstance(recorded, dict):
        _refuse_another_base_run(out, recorded, {"base_model": loading.recorded_path(base_model),
                                                 **base_run_facts(dtype, base_model)})


def sample_positions(n_tokens: int, doc_id: str, config: ExtractConfig) -> list[int]:
    """Sorted positions past `min_context`, seeded by (seed, doc id) so they do not depend on order."""
    eligible = range(config.min_context, n_tokens)
    rng = random.Random(f"{config.seed}:{doc_id}")
    return sorted(rng.sample(eligible, min(config.positions_per_doc, len(eligible))))


def extract_activations(
    model: HookedTransformer,
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[Document | str],
    out_dir: str | Path,
    config: ExtractConfig,
    *,
    base_model: str | None = None,
    progress: bool = True,
) -> Path:
    """Write `blocks.{layer}.hook_resid_post` at sampled positions of each document to `out_dir`.

    Resumable: shards already on disk are skipped (their documents are not even tokenized) once
    their recorded documents are this corpus's, and the sidecar must match the one on disk, the base's dtype and
    weights (`base_run_facts`, recorded in it) included: a resume in another dtype or from other weights is a
    `ConfigError` naming both, as its shards would mix them. Plain strings get their corpus index as doc id. A
    corpus that gives no row (empty, or every document at most `min_context` tokens) is an `InputError`.
    """
    backends.require_hooked("training", model)
    if not 0 <= config.layer < model.cfg.n_layers:
        raise ConfigError(f"layer {config.layer} is outside the model's {blocks_phrase(model.cfg.n_layers)}")
    if config.max_tokens > model.cfg.n_ctx:
        raise ConfigError(f"max_tokens={config.max_tokens} is over the base model's context n_ctx={model.cfg.n_ctx}; "
                          f"set max_tokens <= {model.cfg.n_ctx}")
    out = Path(out_dir)
    check_extraction_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    base_model = base_model or model.cfg.model_name
    sidecar = dataset_sidecar(tokenizer, config, base_model=base_model, d_model=model.cfg.d_model,
                              base_run=base_run_facts(model.W_E.dtype, base_model))
    _write_or_check_sidecar(out, sidecar)
    settings = extraction_digest(load_meta(out))  # of the sidecar on disk, which a resume keeps as it was written
    (out / SHARD_DIR).mkdir(exist_ok=True)
    total = len(documents) if hasattr(documents, "__len__") else None  # type: ignore[arg-type]
    n_shards = n_docs = kept = rows = reused = 0
    # A with block: a bar left open by an error or Ctrl-C took the message onto its line.
    with tqdm(total=total, desc="extract", unit="doc", disable=not progress) as bar:
        for index, chunk in enumerate(_chunks(_as_documents(documents), config.docs_per_shard)):
            path = shard_path(out, index)
            if path.is_file():
                _check_written_shard(path, chunk, settings)
                row_docs = _row_doc_ids(path)
                reused += 1
            else:
                # Only once writing: a refused resume leaves a finished folder loadable. The old record goes, so
                # shards kept after a kill (the in-progress marker deleted by hand) are not checked against it.
                (out / IN_PROGRESS).touch()
                (out / COMPLETE).unlink(missing_ok=True)
                row_docs = _write_shard(model, tokenizer, chunk, path, config, settings)
            bar.update(len(chunk))
            n_shards, n_docs = index + 1, n_docs + len(chunk)
            kept, rows = kept + len(set(row_docs)), rows + len(row_docs)
    _check_no_extra_shards(out, n_shards)
    if not rows:  # else it is "finished", and training says only "run the extraction first"
        raise InputError(f"the corpus gave no activations: {counted(n_docs, 'document')} read, {n_docs - kept} of them "
                         f"dropped as too short (a document needs more than min_context = {config.min_context} "
                         "tokens); give more or longer documents or lower extract.min_context, and extract into a "
                         f"new out_dir (or delete {out})")
    earlier = f", {reused} of them from an earlier run of this extraction" if reused else ""
    # "rows from 3 documents; 1 dropped" read as three documents giving rows
    source = f"{kept} of {n_docs} documents" if n_docs > kept else f"{n_docs} documents"
    dropped = (f"; the other {n_docs - kept} dropped as too short (at most min_context = {config.min_context} "
               "tokens)") if n_docs > kept else ""
    logger.info("%d activation rows from %s in %s%s%s", rows, source, counted(n_shards, "shard"), earlier, dropped)
    text = json.dumps({"shards": n_shards, "rows": rows})
    write_atomic(out / COMPLETE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    (out / IN_PROGRESS).unlink(missing_ok=True)
    return out


def check_extraction_folder(out: Path) -> None:
    """Refuse an `out_dir` holding files an extraction does not write (an exported model, a training run's
    checkpoints, anything else), before anything is written there: the shards and sidecar would mix with them,
    and deleting the folder, the way to redo an extraction, would take them along. Hidden files (a killed write's
    temporary ones) do not count; an earlier extraction's own files are resumed."""
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    foreign = [name for name in names if name not in (SIDECAR_NAME, SHARD_DIR, IN_PROGRESS, COMPLETE)]
    if foreign:
        listed = ", ".join(foreign[:6]) + (" ..." if len(foreign) > 6 else "")
        raise ConfigError(f"{out} holds {listed}, which no extraction writes (an exported model? a training run's "
                          "checkpoints?): extract writes into a new or empty folder, or into an earlier extraction "
                          "to resume it. Point out_dir at a new folder, or move those files out")


def documents_digest(docs: list[Document]) -> Tensor:
    """A digest of a shard's document ids and texts, in order, as uint8: what resuming checks a written
    shard by. A tensor, not metadata: safetensors writes metadata keys in hash order, and a second key
    would make a rewritten shard differ byte for byte."""
    return _digest(json.dumps([doc.id, doc.text], ensure_ascii=False) for doc in docs)


def extraction_digest(meta: NLAMeta) -> Tensor:
    """A digest of an extraction sidecar's `extraction` block (base model, layer, positions sampled, ...), as uint8:
    what each shard keeps of the settings its vectors were taken with. A shard of another extraction of the same
    corpus (another layer, another base of the tokenizer and width) holds the same documents, positions and tokens,
    so every other check passed it, and its vectors loaded as this extraction's."""
    return _digest([json.dumps(meta.raw.get("extraction"), sort_keys=True, ensure_ascii=False, default=str)])


def _digest(parts: Iterable[str]) -> Tensor:
    """The 16-byte blake2b digest of `parts` in order, as a uint8 tensor a shard holds."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def _check_shard_settings(path: Path, f: Any, settings: Tensor) -> None:
    """The open shard `f` was written under the sidecar whose `extraction_digest` is `settings` (shards written before
    they recorded it pass: nothing tells)."""
    if SETTINGS_KEY in f.keys() and not torch.equal(f.get_tensor(SETTINGS_KEY), settings):
        raise ConfigError(f"{path} was written by another extraction than {path.parent.parent} (other settings than "
                          f"the `extraction` block of its {SIDECAR_NAME}: another layer, base model or sampling of the "
                          "same documents; its file copied in), so its vectors are not this extraction's. Delete it "
                          "and rerun the extraction with the same config and corpus to write that shard again")


def _check_written_shard(path: Path, docs: list[Document], settings: Tensor) -> None:
    """A shard on disk is skipped only if this corpus would have written it from the same documents, under this
    folder's sidecar."""
    with _open_shard(path) as f:
        _check_shard_settings(path, f, settings)
        if DOCUMENTS_KEY in f.keys():
            same = torch.equal(f.get_tensor(DOCUMENTS_KEY), documents_digest(docs))
        else:
            # Written before shards recorded their documents: the ids of its rows are all there is to check.
            same = {r["doc_id"] for r in json.loads(f.metadata()["records"])} <= {doc.id for doc in docs}
    if not same:
        raise ConfigError(
            f"{path} was written from other documents than this corpus puts in it ({docs[0].id!r} .. "
            f"{docs[-1].id!r}); resume with the same corpus, or use a new out_dir (or delete {path.parent.parent})"
        )


def _row_doc_ids(path: Path) -> list[str]:
    """The document id of each row of a written shard."""
    with _open_shard(path) as f:
        return [r["doc_id"] for r in json.loads(f.metadata()["records"])]


def _check_no_extra_shards(out: Path, n_shards: int) -> None:
    extra = sorted(p for p in (out / SHARD_DIR).glob("acts-*.safetensors") if _shard_index(p) >= n_shards)
    if extra:
        raise ConfigError(
            f"{out} holds {counted(len(extra), 'shard')} past the {n_shards} this corpus makes ({extra[0].name} ...), "
            "written from a longer corpus; use a new out_dir (or delete this one) and extract again"
        )


def _write_or_check_sidecar(out: Path, sidecar: dict[str, Any]) -> None:
    path = out / SIDECAR_NAME
    if path.is_file():
        on_disk = _as_recorded_now(yaml.safe_load(path.read_text(encoding="utf-8")))
        differences = _differences(_without_base_run(on_disk), _without_base_run(sidecar))
        if differences:
            raise ConfigError(f"{out} holds an extraction with other settings ({'; '.join(differences)}); resume "
                              "with the same config or use a new out_dir")
        _check_base_run(out, on_disk["extraction"], sidecar["extraction"])
        return
    text = yaml.safe_dump(sidecar, allow_unicode=True, sort_keys=False)
    # Atomically: a sidecar cut short (a full disk, a kill) made every resume "an extraction with other settings".
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _without_base_run(sidecar: Any) -> Any:
    """`sidecar` less what it records of the base's run (`BASE_RUN_KEYS`), which `_check_base_run` compares."""
    extraction = sidecar.get("extraction") if isinstance(sidecar, dict) else None
    if not isinstance(extraction, dict):
        return sidecar
    return {**sidecar, "extraction": {k: v for k, v in extraction.items() if k not in BASE_RUN_KEYS}}


def _check_base_run(out: Path, recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse resuming `out` with another base run than its shards were extracted with (`_refuse_another_base_run`).
    An extraction written before nla_lens recorded its base's run resumes, with a warning that nothing checks it."""
    _refuse_another_base_run(out, recorded, now)
    unrecorded = [key for key in BASE_RUN_KEYS if key not in recorded]
    if unrecorded:
        warn_at_caller(f"{out} records no {' nor '.join(unrecorded)} of the base model (extracted before nla_lens "
                       f"recorded them), so nothing checks that this run's base ({now['dtype']}) is the one its shards "
                       "were extracted with; resume it only with the same base_model weights and dtype")


def _refuse_another_base_run(out: Path, recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse resuming `out` with the base in another dtype, or from other weight files, than its shards were
    extracted with (its sidecar's `extraction` block is `recorded`; `now` is this run's), naming both. What `recorded`
    lacks, and a fingerprint this run cannot take (its base_model names no folder here), is not checked."""
    if "dtype" in recorded and recorded["dtype"] != now["dtype"]:
        raise ConfigError(f"{out} was extracted with the base model in {recorded['dtype']}, and this run has it in "
                          f"{now['dtype']}: its shards would mix the two precisions. Resume in {recorded['dtype']} "
                          f"(dtype: {recorded['dtype']} in the extract config; from Python, load the base in it), or "
                          "extract into a new out_dir")
    fingerprints = recorded.get("base_fingerprint"), now["base_fingerprint"]
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        raise ConfigError(f"{out} was extracted from other weight files of base model {now['base_model']} than this "
                          f"run reads (fingerprint {fingerprints[0]} on disk, {fingerprints[1]} now: the folder's "
                          "weights were replaced since): its shards would mix two models' activations. Resume with the "
                          "weights the extraction started with, or extract into a new out_dir")


def _differences(on_disk: Any, requested: Any, key: str = "sidecar") -> list[str]:
    """Each setting where two sidecars differ, by its dotted key, with both values."""
    if not (isinstance(on_disk, dict) and isinstance(requested, dict)):
        return [] if on_disk == requested else [f"{key}: {on_disk!r} on disk, {requested!r} requested"]
    return [line for name in dict.fromkeys([*on_disk, *requested])
            for line in _differences(on_disk.get(name, _ABSENT), requested.get(name, _ABSENT),
                                     name if key == "sidecar" else f"{key}.{name}")]


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()  # a key one sidecar lacks, shown as such (None is a value a sidecar may hold)


def _as_recorded_now(written: Any) -> Any:
    """A sidecar as this version records it: earlier ones kept a local `base_model` as written (relative), which
    resuming from the same folder with the same config names too."""
    extraction = written.get("extraction") if isinstance(written, dict) else None
    if isinstance(extraction, dict) and isinstance(extraction.get("base_model"), str):
        extraction["base_model"] = loading.recorded_path(extraction["base_model"])
    return written


def _as_documents(documents: Iterable[Document | str]) -> Iterator[Document]:
    seen: set[str] = set()
    for index, doc in enumerate(documents):
        doc = _as_document(doc, index)
        if doc.id in seen:
            raise InputError(f"document id {doc.id!r} occurs twice; document ids must be unique "
                             "(splits are made by document)")
        seen.add(doc.id)
        yield doc


def _as_document(doc: Document | str, index: int) -> Document:
    """A corpus item as a `Document` whose id is text, as `read_corpus` reads ids: an integer id (`Document(i, text)`)
    was stored as a JSON number, which no line of a saved explanations file matched (they are read as text), and
    `Document(1, ...)` beside `Document("1", ...)` made two documents that one explanation line keyed."""
    if not isinstance(doc, Document):
        return Document(str(index), doc)
    if isinstance(doc.id, str):
        return doc
    if isinstance(doc.id, numbers.Integral) and not isinstance(doc.id, bool):
        return Document(str(doc.id), doc.text)
    raise InputError(f"document {index} has id {doc.id!r}, a {type(doc.id).__name__}: ids are text (a whole number is "
                     "read as its digits), and explanations find their rows by it; pass Document(str(...), text)")


def _chunks(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def shard_path(out: Path, index: int) -> Path:
    return out / SHARD_DIR / f"acts-{index:05d}.safetensors"


@torch.inference_mode()
def _write_shard(model: HookedTransformer, tokenizer: PreTrainedTokenizerBase, docs: list[Document],
                 path: Path, config: ExtractConfig, settings: Tensor) -> list[str]:
    """Run the chunk's documents in length-sorted batches and save one shard atomically, with the `extraction_digest`
    (`settings`) of the sidecar it is written under; the document id of each row it holds."""
    ids = [text_ids(tokenizer, d.text)[:config.max_tokens] for d in docs]  # BOS first where the tokenizer has one
    picks = [sample_positions(len(row), doc.id, config) for row, doc in zip(ids, docs, strict=True)]
    vectors: list[Tensor | None] = [None] * len(docs)
    order = sorted((i for i in range(len(docs)) if picks[i]), key=lambda i: len(ids[i]))
    device = model.W_E.device
    for start in range(0, len(order), config.batch_size):
        batch = order[start:start + config.batch_size]
        tokens, mask = pad([ids[i] for i in batch], 0, side="right")
        # Right padding under a causal mask: real positions never see the pads.
        resid = model(tokens.to(device), attention_mask=mask.to(device), stop_at_layer=config.layer + 1)
        rows = torch.cat([torch.full((len(picks[i]),), b) for b, i in enumerate(batch)])
        cols = torch.tensor([p for i in batch for p in picks[i]])
        taken = resid[rows.to(device), cols.to(device)].float().cpu()
        for i, part in zip(batch, taken.split([len(picks[i]) for i in batch]), strict=True):
            vectors[i] = part
    records = [ActivationRecord(doc.id, p, row[p], cast(str, tokenizer.decode([row[p]])),
                                cast(str, tokenizer.decode(row[:p])))
               for doc, row, positions in zip(docs, ids, picks, strict=True) for p in positions]
    tensors = {
        "vectors": torch.cat([v for v in vectors if v is not None]) if records
        else torch.zeros(0, model.cfg.d_model),
        "positions": torch.tensor([r.position for r in records], dtype=torch.int64),
        "token_ids": torch.tensor([r.token_id for r in records], dtype=torch.int64),
        DOCUMENTS_KEY: documents_digest(docs),
        SETTINGS_KEY: settings,
    }
    metadata = {"records": json.dumps([{"doc_id": r.doc_id, "token": r.token, "prefix": r.prefix}
                                       for r in records], ensure_ascii=False)}
    save_tensors(tensors, path, metadata)
    return [r.doc_id for r in records]


def load_activations(folder: str | Path) -> ActivationDataset:
    """Read an extraction folder (sidecar + every shard) into memory.

    A folder still holding `extraction.in_progress` (a run killed, failed or still writing), lacking a shard the
    finished run recorded (before the last one on disk, for folders written before that record), holding other
    rows than it recorded, or a shard written under another sidecar (`extraction_digest`) is a `ConfigError`: rerun
    the same extraction (config and corpus) to finish it.
    """
    folder = Path(folder)
    if not (folder / SIDECAR_NAME).is_file():  # load_meta's own message asks for an AV or AR folder
        raise SidecarError(f"{folder} is not an extraction folder: it has no {SIDECAR_NAME}. Point `activations` "
                           "at the out_dir that nla-lens extract (extract_activations) wrote")
    meta = load_meta(folder)
    if meta.kind != "nla_dataset":
        raise SidecarError(f"{folder} holds a {meta.kind} sidecar; point at an extraction folder")
    if (folder / IN_PROGRESS).exists():
        raise ConfigError(f"the extraction in {folder} did not finish (killed, failed, or still running): rerun it "
                          f"with the same config and corpus to finish it, or delete {folder / IN_PROGRESS} to use the "
                          "shards written so far")
    shards = sorted((folder / SHARD_DIR).glob("acts-*.safetensors"))
    if not shards:
        raise InputError(f"{folder}/{SHARD_DIR} holds no shards; run the extraction first")
    complete = _completion_record(folder)
    _check_no_gaps(folder, shards, complete)
    vectors, records = [], []
    settings = extraction_digest(meta)
    for path in shards:
        with _open_shard(path) as f:
            _check_shard_settings(path, f, settings)
            provenance = json.loads(f.metadata()["records"])
            positions, token_ids = f.get_tensor("positions").tolist(), f.get_tensor("token_ids").tolist()
            vectors.append(_shard_vectors(path, f.get_tensor("vectors"), len(provenance), meta.d_model))
        # str: before `_as_document`, an integer Document id was kept as a JSON number, which no explanation matched
        records += [ActivationRecord(str(r["doc_id"]), p, t, r["token"], r["prefix"])
                    for r, p, t in zip(provenance, positions, token_ids, strict=True)]
    if complete is not None and len(records) != complete["rows"]:
        raise ConfigError(f"{folder / SHARD_DIR} holds {len(records)} rows, but the extraction wrote "
                          f"{complete['rows']}: shards were replaced since. Extract again into a new out_dir (or "
                          "delete this one)")
    return ActivationDataset(meta, torch.cat(vectors), records, folder)


def _shard_vectors(path: Path, vectors: Tensor, n_rows: int, d_model: int) -> Float[Tensor, "n d_model"]:
    """A shard's vectors, checked to hold one `d_model`-wide row per recorded row: a shard of another extraction of
    the corpus (another base of the same tokenizer) passed the rows' checks and failed in training, after the model
    loaded (AR SFT: a bare RuntimeError)."""
    if tuple(vectors.shape) != (n_rows, d_model):
        raise ConfigError(f"{path} holds vectors of shape {list(vectors.shape)}, but its {n_rows} rows and the "
                          f"extraction's d_model {d_model} (its {SIDECAR_NAME}) need [{n_rows}, {d_model}]: the shard "
                          "is another extraction's. Extract again into a new out_dir")
    return vectors


def _completion_record(folder: Path) -> dict[str, int] | None:
    """What the finished extraction recorded (`COMPLETE`); None for a folder written before that record."""
    path = folder / COMPLETE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {"shards": int(record["shards"]), "rows": int(record["rows"])}
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{path} is damaged ({exc!r}); rerun the extraction with the same config and corpus to "
                          "write it again") from exc


def _check_no_gaps(folder: Path, shards: list[Path], complete: dict[str, int] | None) -> None:
    """Every shard the finished run recorded (or, without that record, up to the last one on disk): a deleted or
    lost shard would silently drop its documents' rows."""
    present = {_shard_index(p) for p in shards}
    if complete is None:
        expected, which = max(present), "before its last one"
    else:
        expected, which = complete["shards"], f"of the {complete['shards']} the extraction wrote"
    missing = [i for i in range(expected) if i not in present]
    if missing:
        names = ", ".join(shard_path(folder, i).name for i in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ConfigError(f"{folder / SHARD_DIR} lacks {counted(len(missing), 'shard')} {which} ({names}); rerun the "
                          "extraction with the same config and corpus to write them")


def _shard_index(path: Path) -> int:
    return int(path.stem.split("-")[1])


@contextlib.contextmanager
def _open_shard(path: Path) -> Iterator[Any]:
    """A shard's reader; a file cut short after its rename (a crash before its data reached the disk, an
    interrupted copy of the folder) is named, with the fix, instead of safetensors' bare header error."""
    try:
        reader = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise ConfigError(f"{path} cannot be read ({exc}): it is damaged or cut short. Delete it and rerun the "
                          "extraction with the same config and corpus to write that shard again") from exc
    with reader as f:
        yield f
