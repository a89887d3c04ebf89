"""Dataset building: activations paired with explanations, split by document, as AV and AR rows.

Splits are by document, never by row: rows of one document share context, and a row-level split
let nanoNLA's held-out FVE climb from about 20% to about 38% through the leak alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from nla_lens import loading
from nla_lens.checks import check_output_path, counted, file_path, jsonl_objects, warn_at_caller
from nla_lens.errors import (
    ChatTemplateError,
    ConfigError,
    InputError,
    PromptTooLongError,
    SplitLeakError,
    VectorError,
)
from nla_lens.injection import directionless_rows
from nla_lens.sidecar import NLAMeta, ar_prompt_ids, av_prompt_ids
from nla_lens.training.extraction import ActivationDataset, ActivationRecord

logger = logging.getLogger(__name__)
_FINGERPRINT_CHUNK = 1 << 24  # values hashed per float32 copy (64 MiB)
_WEIGHT_STRIDE = 997  # every 997th value of each parameter: another checkpoint differs there too
Labeler = Callable[[ActivationRecord], "str | None"]
RECORD_KEY = "extraction"  # the key of the line `save_explanations` writes first: the extraction it labels
_ROWS_NAMED = 5  # rows a warning names before it counts the rest
Row = TypeVar("Row")
_IN_MEMORY = "(an extraction in memory)"  # an extraction's name in messages where it has no folder
_NOT_TEXT_WORDS = {  # check_labels_are_text's words per source: what gave the values, and how to give a row's label
    "labeler": ("the labeler returned", "a labeler returns each row's explanation as a str, or None to leave the row "
                "out (a pandas lookup of a missing label gives NaN: return None for it)"),
    "mapping": ("the explanations mapping holds", "a mapping holds each row's explanation as a str, or None to leave "
                "the row out (pandas gives NaN for a missing label: drop those keys)"),
}
_TURN_PROBE = "NLA turn probe"  # an assistant message's text, found again in the template's rendering


@dataclass(frozen=True)
class ExtractionIdentity:
    """What identifies the extraction a set of explanations labels, recorded by `save_explanations`: a label
    file's (doc_id, position) keys match every extraction of the same corpus and seed, at any layer of any base.
    Read from what `load_activations` has in memory (no shard is hashed again). `folder` is named in messages,
    never compared: a moved extraction is the same one. `base_model` is compared by name: other weights saved
    under the same path or hub id pass as the same base."""

    folder: str | None  # absolute; None for an extraction built in memory
    base_model: str | None
    layer: int
    rows: int
    rows_digest: str  # of every row's doc id, position and token id, in order

    @classmethod
    def of(cls, dataset: ActivationDataset) -> ExtractionIdentity:
        rows = json.dumps([[r.doc_id, r.position, r.token_id] for r in dataset.records]).encode()
        folder = None if dataset.folder is None else str(Path(dataset.folder).absolute())
        return cls(folder, dataset.meta.base_model, dataset.meta.layer, len(dataset),
                   hashlib.blake2b(rows, digest_size=16).hexdigest())

    def differences(self, other: ExtractionIdentity) -> list[str]:
        """Where `other` (the activations) is another extraction than this one (the explanations'), with both
        values; empty when they are one."""
        found = [f"{name}: {getattr(self, name)!r} in the explanations, {getattr(other, name)!r} in the activations"
                 for name in ("base_model", "layer", "rows") if getattr(self, name) != getattr(other, name)]
        if not found and self.rows_digest != other.rows_digest:
            found.append(f"rows: {self.rows} in both, but other documents, positions or tokens")
        return found


@dataclass(frozen=True)
class LabelledActivations:
    """Vectors with their explanation and the document each came from."""

    vectors: Float[Tensor, "n d_model"]
    doc_ids: list[str]
    positions: list[int]
    explanations: list[str]
    extraction: ExtractionIdentity | None = None  # the extraction labelled (None: rows built in memory)

    def __post_init__(self) -> None:
        n = self.vectors.shape[0]
        if not len(self.doc_ids) == len(self.positions) == len(self.explanations) == n:
            raise InputError("vectors, doc_ids, positions and explanations must have one entry per row")

    def __len__(self) -> int:
        return len(self.doc_ids)

    def select(self, index: Sequence[int]) -> LabelledActivations:
        index = list(index)
        return LabelledActivations(self.vectors[index], [self.doc_ids[i] for i in index],
                                   [self.positions[i] for i in index], [self.explanations[i] for i in index],
                                   self.extraction)


def label_activations(dataset: ActivationDataset,
                      explanations: str | Path | Labeler | Mapping[tuple[str, int], str | None],
                      ) -> LabelledActivations:
    """Pair rows with explanations from a JSONL file, a mapping or a `labeler(record) -> str | None`.

    JSONL lines are ``{"doc_id", "position", "explanation"}``, after the record of the extraction labelled that
    `save_explanations` writes first: explanations of another extraction (another layer or base, other rows) are a
    `ConfigError`, and a file without the record (older, or written by other code) loads with a warning. A mapping
    is keyed as those lines are, ``{(doc_id, position): explanation}`` with the row's document id as text (records
    nothing, as a labeler does). A labeler or mapping gives None for a row to leave out. Rows left without an
    explanation are dropped (and counted in the log); a JSONL line or mapping key that matches no row is an error.
    """
    if isinstance(explanations, Mapping):
        identity = ExtractionIdentity.of(dataset)
        texts = _texts_of_mapping(dataset, explanations)
    elif callable(explanations):
        identity = ExtractionIdentity.of(dataset)
        texts = [explanations(record) for record in dataset.records]
        check_labels_are_text(dataset, texts, "labeler")
    elif isinstance(explanations, (str, PathLike)):
        by_key, recorded = _read_explanations(Path(explanations))  # the file's own problems first
        identity = ExtractionIdentity.of(dataset)
        check_labelled_extraction(recorded, identity, explanations)
        texts = _pop_texts(dataset, by_key)
        if by_key:
            doc_id, position = next(iter(by_key))
            raise InputError(
                f"{counted(len(by_key), 'explanation')} in {explanations} match{'es' if len(by_key) == 1 else ''} no "
                f"activation row, e.g. doc_id "
                f"{doc_id!r} position {position}; label the extraction folder you train on"
            )
    else:
        raise InputError(f"explanations must be the path of a JSONL file, a mapping {{(doc_id, position): "
                         f"explanation}} or a labeler(record) -> str | None; got {type(explanations).__name__} "
                         f"{explanations!r:.60} (a pandas Series indexed by doc_id and position: pass .to_dict())")
    check_not_blank(dataset, texts)
    keep = [i for i, text in enumerate(texts) if text is not None]
    if not keep:
        raise InputError("no activation row has an explanation; nothing to train on")
    if len(keep) < len(texts):
        logger.info("%d of %d activation rows have no explanation and are left out", len(texts) - len(keep),
                    len(texts))
    check_directions(dataset, keep)
    return LabelledActivations(dataset.vectors[keep], [dataset.records[i].doc_id for i in keep],
                               [dataset.records[i].position for i in keep], [t for t in texts if t is not None],
                               identity)


def _pop_texts(dataset: ActivationDataset, by_key: dict[Any, Any]) -> list[Any]:
    """Each row's explanation (None: it has none), taken out of `by_key`: what is left there matches no row."""
    return [by_key.pop((r.doc_id, r.position), None) for r in dataset.records]


def _texts_of_mapping(dataset: ActivationDataset, explanations: Mapping[Any, Any]) -> list[str | None]:
    """Each row's explanation from a mapping keyed as the JSONL is: a key that matches no row (a doc_id given as a
    number, keys by row index) is refused by name, as a JSONL line that matches none is."""
    by_key = dict(explanations)
    texts = _pop_texts(dataset, by_key)
    if by_key:
        rows = [(r.doc_id, r.position) for r in dataset.records[:1]]
        example = f", as in {rows[0]!r}" if rows else ""
        raise InputError(f"{counted(len(by_key), 'key')} of the explanations mapping match"
                         f"{'es' if len(by_key) == 1 else ''} no activation row, e.g. {next(iter(by_key))!r:.60}: key "
                         f"each explanation by (doc_id, position), the row's document id as text and its token "
                         f"index{example}")
    check_labels_are_text(dataset, texts, "mapping")
    return texts


def _named(found: Sequence[Row], name: Callable[[Row], str]) -> str:
    """The first `_ROWS_NAMED` of `found` as `name` writes them, then how many more: how the checks of labelled rows
    name them."""
    more = f"; and {len(found) - _ROWS_NAMED} more" if len(found) > _ROWS_NAMED else ""
    return "; ".join(map(name, found[:_ROWS_NAMED])) + more


def check_labels_are_text(dataset: ActivationDataset, texts: list[Any], source: Literal["labeler", "mapping"]) -> None:
    """Refuse what a labeler returned or a mapping holds that is neither a string nor None (NaN from a pandas lookup of
    a missing label, an int): `check_not_blank` failed on it with a bare AttributeError naming no row."""
    wrong = [i for i, text in enumerate(texts) if text is not None and not isinstance(text, str)]
    if not wrong:
        return
    given, fix = _NOT_TEXT_WORDS[source]
    where = _named(wrong, lambda i: f"doc_id {dataset.records[i].doc_id!r} position {dataset.records[i].position}: "
                                    f"{type(texts[i]).__name__} {texts[i]!r:.40}")
    raise InputError(f"{given} {counted(len(wrong), 'value')} that {'is' if len(wrong) == 1 else 'are'} not a string "
                     f"({where}): {fix}")


def check_not_blank(dataset: ActivationDataset, texts: list[str | None]) -> None:
    """Refuse explanations that are empty or only whitespace (a labeler that answered nothing): the AV learned to
    write `<explanation>` with nothing in it, and the AR to read nothing as a vector, without a word."""
    blank = [i for i, text in enumerate(texts) if text is not None and not text.strip()]
    if not blank:
        return
    where = _named(blank, lambda i: f"doc_id {dataset.records[i].doc_id!r} position {dataset.records[i].position}")
    raise InputError(f"{counted(len(blank), 'explanation')} {'is' if len(blank) == 1 else 'are'} empty or only "
                     f"whitespace ({where}): the AV would learn to explain nothing. Label those rows again, or "
                     "leave them out (delete their lines; a labeler returns None for a row to leave out)")


def check_directions(dataset: ActivationDataset, rows: list[int]) -> None:
    """Refuse labelled rows whose vector holds NaN or Inf (a float16 extraction overflows) or is zero: the AV cannot
    inject them and the AR scores nothing against them. Else AV SFT stopped at the first batch holding one, naming
    its index in that batch, and AR SFT skipped every step holding one with a logged warning (a NaN loss)."""
    non_finite, zero = directionless_rows(dataset.vectors[rows])
    for found, what in ((non_finite, "hold NaN or Inf"), (zero, "are zero: no direction")):
        if not found:
            continue
        records = [dataset.records[rows[i]] for i in found]
        where = _named(records, lambda r: f"doc_id {r.doc_id!r} position {r.position}")
        raise VectorError(f"{counted(len(found), 'labelled activation row')} of "
                          f"{dataset.folder or _IN_MEMORY} {what} ({where}), so they cannot train an AV or an "
                          "AR. Extract again in float32 or bfloat16 (float16 overflows residuals), or leave those rows "
                          "out of the explanations (a row without one is not trained on)")


def check_labelled_extraction(recorded: ExtractionIdentity | None, activations: ExtractionIdentity,
                              path: str | Path) -> None:
    """Refuse explanations recorded for another extraction than `activations`: their keys match any extraction
    of the same corpus and seed, so another layer's vectors trained on them without a word. A file without the
    record is warned of (once per file and process, as Python shows a warning), not refused: files written before
    the record, and by other code, must still load."""
    here = activations.folder or _IN_MEMORY
    if recorded is None:
        warn_at_caller(f"{path} does not record which extraction it labels (written before nla_lens recorded it, or "
                       f"by other code), so nothing checks that its explanations describe the activations {here}; "
                       f"once you know they do, save_explanations(label_activations(load_activations("
                       f"{'...' if activations.folder is None else repr(here)}), {str(path)!r}), {str(path)!r}) "
                       "records it")
        return
    differences = recorded.differences(activations)
    if not differences:
        return
    labelled = recorded.folder or _IN_MEMORY
    if labelled == here:  # the folder was extracted again since
        subject, fix = f"the extraction {labelled} held when they were written", f"label {here} again"
    else:
        subject = f"the extraction {labelled}"
        fix = f"label {here} and train on those explanations, or point activations at {labelled}"
    raise ConfigError(f"explanations {path} label {subject}, not activations {here} ({'; '.join(differences)}): "
                      f"they describe other vectors. To fix it, {fix}")


def _read_explanations(path: Path) -> tuple[dict[tuple[str, int], str], ExtractionIdentity | None]:
    """The explanations by (doc_id, position), and the extraction the file records (None: no record)."""
    out: dict[tuple[str, int], str] = {}
    recorded: tuple[int, ExtractionIdentity] | None = None  # the line that records it first, and what it records
    for line_no, row in jsonl_objects(path, "explanations",
                                      "write one JSON object per line, with doc_id, position and explanation"):
        where = f"{path}:{line_no}"
        if is_extraction_record(row):
            identity = _recorded_extraction(where, row[RECORD_KEY])
            if recorded is not None and recorded[1].differences(identity):
                folders = (f"{identity.folder}; line {recorded[0]}: {recorded[1].folder}"
                           if identity.folder != recorded[1].folder else
                           f"both of {identity.folder or _IN_MEMORY}, extracted again in between")
                raise InputError(f"{where}: records another extraction than line {recorded[0]} ({folders}): the file "
                                 "joins the explanations of two extractions; keep those of the extraction you train on")
            recorded = recorded or (line_no, identity)
            continue
        key, text = _explanation_line(where, row)
        if key in out:
            raise InputError(f"{where}: a second explanation for doc_id {key[0]!r} position {key[1]}")
        out[key] = text
    return out, None if recorded is None else recorded[1]


def is_extraction_record(row: dict[str, Any]) -> bool:
    """Whether a line is the record `save_explanations` writes first. pandas (`read_json(lines=True)`, then
    `to_json(orient="records", lines=True)`) writes it back with null doc_id, position and explanation, and every
    explanation line with a null record."""
    return row.get(RECORD_KEY) is not None and all(row.get(key) is None for key in ("doc_id", "position",
                                                                                      "explanation"))


def _recorded_extraction(where: str, value: Any) -> ExtractionIdentity:
    try:
        return ExtractionIdentity(**value)
    except TypeError as exc:  # not a mapping, or other keys
        raise InputError(f"{where}: a damaged record of the extraction labelled ({json.dumps(value)[:80]}); write "
                         "the file again with save_explanations, or delete the line (nothing then checks which "
                         "extraction the explanations label)") from exc


def _explanation_line(where: str, row: dict[str, Any]) -> tuple[tuple[str, int], str]:
    """One line's (doc_id, position) and explanation; what is wrong with it, in words (not Python's)."""
    missing = [key for key in ("doc_id", "position", "explanation") if key not in row]
    if missing:
        raise InputError(f"{where}: the object lacks {', '.join(missing)}; each line needs doc_id, position and "
                         "explanation")
    position, text = _position(row["position"]), row["explanation"]
    if position is None:
        raise InputError(f"{where}: position must be the row's token index, a whole number >= 0; got "
                         f"{json.dumps(row['position'])}")
    if not isinstance(text, str):
        raise InputError(f"{where}: explanation must be a string, got {json.dumps(text)}")
    doc_id = row["doc_id"]
    if isinstance(doc_id, float) and doc_id.is_integer():  # pandas: ids "0", "1" as 0.0, 1.0 beside the record
        doc_id = int(doc_id)
    return (str(doc_id), position), text


def _position(value: Any) -> int | None:
    """A line's token index: a JSON integer, or a whole float or digit string as some writers give them. None
    otherwise: `int()` read true and 1.7 as 1, another row's position."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def data_fingerprint(*parts: LabelledActivations | Tensor | nn.Module) -> str:
    """A digest of the rows a run trains and evaluates on (vectors by shape and float32 bytes; documents,
    positions and explanations) and of the weights it starts from (every parameter's name, shape and a
    strided sample), kept in its checkpoints: resuming on other data or another start is refused."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, nn.Module):
            for name, param in part.named_parameters():
                digest.update(f"{name}{tuple(param.shape)}".encode())
                sample = param.detach().flatten()[::_WEIGHT_STRIDE].to("cpu", torch.float32).contiguous()
                digest.update(sample.numpy().data)
            continue
        tensors, lists = ((part.vectors,), (part.doc_ids, part.positions, part.explanations)) if isinstance(
            part, LabelledActivations) else ((part,), ())
        for tensor in tensors:
            digest.update(f"{tuple(tensor.shape)}".encode())
            for chunk in tensor.detach().flatten().split(_FINGERPRINT_CHUNK):  # float32 copies, a chunk at a time
                digest.update(chunk.to("cpu", torch.float32).contiguous().numpy().data)
        for values in lists:
            digest.update(json.dumps(values).encode())
    return digest.hexdigest()


def save_explanations(data: LabelledActivations, path: str | Path) -> Path:
    """Write `data`'s explanations as the JSONL that `label_activations` and the CLI read, after a first line
    recording the extraction they label (where `data` knows it), which training checks its activations against.
    The path is checked first, so a missing folder is an InputError that says so, not open()'s FileNotFoundError."""
    path = file_path(path, "save_explanations")
    check_output_path(path, (".jsonl",), "explanations file")
    with path.open("w", encoding="utf-8") as f:
        if data.extraction is not None:
            f.write(json.dumps({RECORD_KEY: asdict(data.extraction)}, ensure_ascii=False) + "\n")
        for doc_id, position, text in zip(data.doc_ids, data.positions, data.explanations, strict=True):
            f.write(json.dumps({"doc_id": doc_id, "position": position, "explanation": text},
                               ensure_ascii=False) + "\n")
    return path


def eval_documents(doc_ids: Sequence[str], eval_fraction: float, seed: int = 0) -> set[str]:
    """The documents `split_by_document` puts on the eval side: a seeded `eval_fraction` of the distinct
    ids (at least one, never all). Depends only on the set of ids, so it can be recomputed without the rows."""
    docs = sorted(set(doc_ids))
    if not 0 < eval_fraction < 1:
        raise InputError(f"eval_fraction must be in (0, 1), the share of documents held out; got {eval_fraction}")
    if len(docs) < 2:
        rows = (f"all {len(doc_ids)} labelled rows are of document {docs[0]!r}" if docs
                else "there are no labelled rows")
        raise InputError(f"the split holds out whole documents, so it needs labelled rows of at least 2 documents, "
                         f"but {rows}; label rows of more documents (the rows of a document without an explanation "
                         "are left out)")
    random.Random(seed).shuffle(docs)
    return set(docs[:min(len(docs) - 1, max(1, round(eval_fraction * len(docs))))])


def split_by_document(data: LabelledActivations, eval_fraction: float,
                      seed: int = 0) -> tuple[LabelledActivations, LabelledActivations]:
    """(train, eval) with every document on one side only; the same seed gives the AV and AR one split."""
    held_out = eval_documents(data.doc_ids, eval_fraction, seed)
    is_eval = [d in held_out for d in data.doc_ids]
    train = data.select([i for i, e in enumerate(is_eval) if not e])
    evaluation = data.select([i for i, e in enumerate(is_eval) if e])
    check_document_disjoint(train, evaluation)
    return train, evaluation


def check_document_disjoint(train: LabelledActivations, evaluation: LabelledActivations) -> None:
    """Raise `SplitLeakError` when a document has rows on both sides."""
    shared = sorted(set(train.doc_ids) & set(evaluation.doc_ids))
    if shared:
        raise SplitLeakError(
            f"{counted(len(shared), 'document')} {'has' if len(shared) == 1 else 'have'} rows in both train and eval "
            f"(e.g. {shared[:5]}); "
            "held-out scores would be inflated. Split with split_by_document."
        )


@dataclass(frozen=True)
class AVRows:
    """AV SFT rows: the canonical prompt (one marker) then `<explanation>\\n{text}\\n</explanation>` and the chat
    template's turn end (`turn_end_ids`)."""

    prompt: Int[Tensor, " prompt_len"]
    responses: list[list[int]]
    vectors: Float[Tensor, "n d_model"]
    explanations: list[str]
    doc_ids: list[str]
    positions: list[int]

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def lengths(self) -> list[int]:
        return [self.prompt.numel() + len(response) for response in self.responses]


def response_text(explanation: str) -> str:
    """The AV's target text; `parsing.parse_explanation` reads it back."""
    return f"<explanation>\n{explanation}\n</explanation>"


def turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the chat template writes after an assistant message, up to and including its first special token
    (Qwen's `<|im_end|>`, Gemma's `<end_of_turn>`, Llama's `<|eot_id|>`): the AV writes these to end its turn and
    stops on the last. The paper's AV SFT ends each row as the template ends the turn (kitft `sft_actor.py`, through
    miles' `MultiTurnLossMaskGenerator`), not with the tokenizer's EOS, which may be a token the template never writes
    (`<eos>` on Gemma-3). The template's tokens after the stop (a newline on Qwen and Gemma, which the paper's rows
    also hold) are never generated; leaving them out keeps the rows the bundled toy was trained on."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _TURN_PROBE}]
    text = cast(str, tokenizer.apply_chat_template(messages, tokenize=False))
    at = text.rfind(_TURN_PROBE)
    fix = "use the base model's own tokenizer files (an instruct model's chat template)"
    if at < 0:
        raise ChatTemplateError("the tokenizer's chat template does not write an assistant message's text, so the "
                                f"AV's training rows cannot end its turn as the template does; {fix}")
    closing = text[at + len(_TURN_PROBE):]
    after = tokenizer(closing, add_special_tokens=False)["input_ids"]
    specials = set(cast(list[int], tokenizer.convert_tokens_to_ids(special_token_texts(tokenizer))))
    ends = [n for n, i in enumerate(after) if i in specials]
    if not ends:
        raise ChatTemplateError(f"the tokenizer's chat template ends an assistant turn with {closing!r}, which holds "
                                f"no special token, so an AV trained with it would have no token to stop on; {fix}")
    return after[:ends[0] + 1]


def av_rows(data: LabelledActivations, meta: NLAMeta, tokenizer: PreTrainedTokenizerBase) -> AVRows:
    warn_special_token_text(data, tokenizer, "the AV learns to write those tokens, but verbalize ends an explanation "
                                             "at an EOS and leaves special tokens out of the text it decodes")
    return encoded_av_rows(data, meta, tokenizer)


def encoded_av_rows(data: LabelledActivations, meta: NLAMeta, tokenizer: PreTrainedTokenizerBase) -> AVRows:
    """`av_rows` without its warning: what `init_av` checks against the context before the weights load."""
    prompt = av_prompt_ids(meta, tokenizer)  # first: its error names a tokenizer without a chat template
    turn_end = turn_end_ids(tokenizer)
    encoded = tokenizer([response_text(e) for e in data.explanations], add_special_tokens=False)["input_ids"]
    return AVRows(torch.tensor(prompt), [row + turn_end for row in encoded], data.vectors.float(), data.explanations,
                  data.doc_ids, data.positions)


@dataclass(frozen=True)
class ARRows:
    """AR SFT rows: the critic prompt (`meta.ar_prompt`, with special tokens: BOS first on Gemma / Llama, as
    `reconstruct` reads it) and its target vector."""

    prompts: list[list[int]]
    vectors: Float[Tensor, "n d_model"]
    explanations: list[str]
    doc_ids: list[str]
    positions: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> list[int]:
        return list(map(len, self.prompts))


def ar_rows(data: LabelledActivations, meta: NLAMeta, tokenizer: PreTrainedTokenizerBase) -> ARRows:
    warn_special_token_text(data, tokenizer, "the AR learns to read those tokens, which the AV's explanations never "
                                             "hold (verbalize decodes without special tokens)")
    return encoded_ar_rows(data, meta, tokenizer)


def encoded_ar_rows(data: LabelledActivations, meta: NLAMeta, tokenizer: PreTrainedTokenizerBase) -> ARRows:
    """`ar_rows` without its warning: what `init_ar` checks against the context before the weights load."""
    prompts = [ar_prompt_ids(meta, tokenizer, e) for e in data.explanations]  # as the AR reads them
    return ARRows(prompts, data.vectors.float(), data.explanations, data.doc_ids, data.positions)


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The strings a tokenizer reads as one special token wherever they stand in a text (HF tokenizers parse them
    unless called with split_special_tokens=True): its named special tokens and every added token marked special
    (Qwen's <|im_start|> is only the latter)."""
    added = (token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return sorted({*tokenizer.all_special_tokens, *added})


def texts_holding(texts: Sequence[str], strings: Sequence[str]) -> list[tuple[int, list[str]]]:
    """Each text that holds any of `strings`, with those it holds (in `strings`' order). One regex search a text
    finds the few that do: a real tokenizer has hundreds of special tokens (Gemma-3 thousands), and a substring
    search for each in each of 100k labels took seconds to a minute."""
    if not strings:
        return []
    any_of = re.compile(_trie_pattern(strings))
    return [(i, [s for s in strings if s in text]) for i, text in enumerate(texts) if any_of.search(text)]


def _trie_pattern(strings: Sequence[str]) -> str:
    """A regex matching any of `strings`, their common prefixes factored out: a search follows one branch a character,
    where a plain alternation tries every string at each position that could begin one (special tokens share '<')."""
    trie: dict[str, Any] = {}
    for string in strings:
        node = trie
        for char in string:
            node = node.setdefault(char, {})
        node[""] = {}  # a string ends here

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


def warn_special_token_text(data: LabelledActivations, tokenizer: PreTrainedTokenizerBase, consequence: str) -> None:
    """Warn of explanations holding special-token text (a label quoting '<|im_end|>'): their rows hold that special
    token, not its characters. Kept so, since the paper's training code tokenizes labels the same way (kitft
    `nla/rollout/sft_actor.py`, `sft_critic.py`: HF's default parsing); `consequence` says what the rows teach."""
    found = texts_holding(data.explanations, special_token_texts(tokenizer))
    if not found:
        return
    where = _named(found, lambda row: f"doc_id {data.doc_ids[row[0]]!r} position {data.positions[row[0]]} "
                                      f"({', '.join(row[1])})")
    warn_at_caller(f"{counted(len(found), 'explanation')} of {len(data)} hold special-token text, which the tokenizer "
                   f"reads as the special token itself (as the paper's training code does): {where}. So "
                   f"{consequence}; remove or reword that text in the explanations")


def check_fits(n_ctx: int, *rows: AVRows | ARRows) -> None:
    """Refuse rows longer than the model's context rather than let them be truncated, naming them (document and
    position) as the other checks of labelled rows do."""
    too_long = [(r.doc_ids[i], r.positions[i], length) for r in rows for i, length in enumerate(r.lengths)
                if length > n_ctx]
    if not too_long:
        return
    where = _named(too_long, lambda row: f"doc_id {row[0]!r} position {row[1]}: {row[2]} tokens")
    raise PromptTooLongError(f"{counted(len(too_long), 'training row')} {'is' if len(too_long) == 1 else 'are'} "
                             f"longer than the model's context of n_ctx={n_ctx} tokens ({where}); shorten "
                             "those explanations, or leave the rows out (delete their lines; a labeler returns None "
                             "for a row to leave out)")



def check_base_fits(hf_config: Any, dataset: NLAMeta, base_model: str | Path, *, folder: Path, role: str) -> None:
    """Refuse a `base_model` whose width (or, for the AR, depth) cannot hold the extraction's vectors, read from
    its config.json before any weight loads: else the AV / AR fails only once the weights are in, blaming a sidecar.
    Warn when the extraction names another local folder (`folder` is where `base_model` resolved to). An NLA AR
    folder is refused by its sidecar: its missing final blocks read as "an incomplete download" once loading."""
    loading.check_base_folder(folder, f"base_model {base_model}", dataset.base_model)
    config = hf_config.get_text_config()  # a Gemma-3 wrapper keeps the sizes in text_config
    fix = f"set base_model to the model the activations were extracted from ({dataset.base_model})"
    d_model, n_layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if d_model is not None and d_model != dataset.d_model:
        raise ConfigError(f"base_model {base_model} has d_model={d_model}, but the activations are "
                          f"{dataset.d_model}-d vectors of layer {dataset.layer}; {fix}")
    if role == "ar" and n_layers is not None and n_layers <= dataset.layer:
        raise ConfigError(f"base_model {base_model} has {n_layers} layers, but the AR needs its first "
                          f"{dataset.layer + 1} (the activations are layer {dataset.layer}'s); {fix}")
    # Recorded absolute since extraction sidecars resolve local folders; a hub id or a folder not on this machine
    # (extracted elsewhere) cannot be compared.
    recorded = Path(str(dataset.base_model)) if dataset.base_model is not None else None
    if recorded is not None and recorded.is_absolute() and recorded.is_dir() and recorded.resolve() != folder.resolve():
        warn_at_caller(f"the activations were extracted from base model {recorded}, but base_model is {folder}: the "
                       f"{role.upper()} would learn another model's activations; set base_model to {recorded}, or "
                       "ignore this if the two folders hold one model")
