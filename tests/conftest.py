"""Tiny NLA checkpoints written as real HF folders once per session, loaded through the public API."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pyarrow.parquet as pq
import pytest
import torch
from base_batches import load_base

import nla_lens as nl
from nla_lens import backends
from nla_lens.testing import make_tiny_nla

D_MODEL = 64
LAYER = 2
TL4 = backends.transformer_lens_major() >= 4
HAS_SAE_LENS = not TL4 and importlib.util.find_spec("sae_lens") is not None
# nla_lens.training drives HookedTransformer (start_at_layer, TL parameter names, the HF exporter).
NEEDS_TL3 = pytest.mark.skipif(backends.default_backend() == "bridge",
                               reason="needs the TL 3.x backend (HookedTransformer): pip install 'nla_lens[tl3]'")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """torch on one thread: for d_model=64 the OpenMP hand-off costs more than the matmuls
    (measured on 2 cores: the tiny-model suites ran up to 4x slower on 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def group_umask() -> int:
    """umask 002 (group-writable files, common on shared clusters) for one test; the mode `open()` then gives a
    file, 0664, is neither the usual 0644 nor safetensors' 0600, so a file with it shows the umask applied."""
    previous = os.umask(0o002)
    yield 0o664
    os.umask(previous)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_nla(tmp_path_factory.mktemp("tiny_nla"), layer=LAYER, d_model=D_MODEL)


@pytest.fixture(scope="session")
def av_karvonen(tiny_paths) -> nl.ActivationVerbalizer:
    return nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"])


@pytest.fixture(scope="session")
def av_embedding(tiny_paths) -> nl.ActivationVerbalizer:
    return nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_embedding"])


@pytest.fixture(scope="session")
def ar_nanonla(tiny_paths) -> nl.ActivationReconstructor:
    return nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])


@pytest.fixture(scope="session")
def ar_paper(tiny_paths) -> nl.ActivationReconstructor:
    return nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_paper"])


@pytest.fixture()
def vectors() -> torch.Tensor:
    return torch.randn(4, D_MODEL, generator=torch.Generator().manual_seed(1234)) * 3.0


# --- training (issue #5): a plain tiny base model, its dataset sidecar, a label-determined task ---

@pytest.fixture(scope="session")
def base_folder(tmp_path_factory) -> Path:
    from nla_lens.testing import save_base_model

    return save_base_model(tmp_path_factory.mktemp("base"), d_model=D_MODEL)


@pytest.fixture(scope="session")
def extract_config():
    from nla_lens.testing import AR_TEMPLATE, AV_TEMPLATE
    from nla_lens.training import ExtractConfig

    return ExtractConfig(layer=LAYER, positions_per_doc=3, min_context=4, max_tokens=32, batch_size=4,
                         docs_per_shard=5, av_template=AV_TEMPLATE, ar_template=AR_TEMPLATE)


@pytest.fixture(scope="session")
def dataset_meta(base_folder, extract_config) -> nl.NLAMeta:
    from nla_lens.loading import load_tokenizer
    from nla_lens.training.extraction import dataset_sidecar

    sidecar = dataset_sidecar(load_tokenizer(base_folder), extract_config, base_model="tiny", d_model=D_MODEL)
    return nl.parse_meta(sidecar)


@pytest.fixture(scope="session")
def label_split():
    """(train, eval) of a synthetic task where the label fully determines the vector; split by document."""
    from nla_lens.testing import label_determined_vectors
    from nla_lens.training import split_by_document

    return split_by_document(label_determined_vectors(60, d_model=D_MODEL), eval_fraction=0.2, seed=0)


# --- the BOS families (issue #13): tiny Gemma-3 AV / AR (text-only and multimodal) and a Llama AR ---

@pytest.fixture(scope="session")
def bos_paths(tmp_path_factory) -> dict[str, Path]:
    from nla_lens.testing_families import make_tiny_bos_nlas

    return make_tiny_bos_nlas(tmp_path_factory.mktemp("tiny_bos"), layer=LAYER, d_model=D_MODEL)


def stray_byte_verbalization(tokenizer) -> nl.Verbalization:
    """A finished AV sample whose explanation retokenizes longer than it was sampled: a sampled byte token of a split
    character decodes to U+FFFD, three byte tokens in the test tokenizer. Its AR prompt is over an AR n_ctx of the
    empty explanation's prompt + `len(.tokens)`, which `check_sample_fits` lets through for that many tokens."""
    stray = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd")  # one byte of a character
    ids = [*tokenizer.encode("<explanation>\n", add_special_tokens=False), *[stray] * 20,
           *tokenizer.encode("\n</explanation>", add_special_tokens=False), tokenizer.eos_token_id]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return nl.Verbalization(text, nl.verbalizer.parse_explanation(text), ids)


def as_exported_with_a_stray_bos(folder: Path) -> Path:
    """`folder`'s tokenizer_config.json as an export wrote it before nla_lens copied the base's files: the EOS recorded
    as the BOS (TransformerLens had set it on the live tokenizer), which TransformerLens, reading the folder, put
    first."""
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": config["eos_token"]}),
                                                  encoding="utf-8")
    return folder


def saved_without(result: nl.TabularResult, path: Path, column: str) -> Path:
    """`result` saved to `path` (.parquet or .jsonl) as a save from before its rows had `column`: the file `save`
    writes, that column taken out (a .parquet keeps its recorded type, summary and warnings)."""
    path = result.save(path)
    if path.suffix == ".parquet":
        pq.write_table(pq.read_table(path).drop_columns([column]), path)
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert rows and all(column in row for row in rows)
        path.write_text("".join(json.dumps({k: v for k, v in row.items() if k != column}) + "\n" for row in rows),
                        encoding="utf-8")
    return path


def cut_write_text_short(patch: pytest.MonkeyPatch) -> None:
    """Make `Path.write_text` under `patch` write half its text and then fail as a full disk does: what an in-place
    write leaves behind, for the tests that an atomic write leaves the earlier file whole."""
    write_text = Path.write_text

    def half_then_disk_full(self, text, *args, **kwargs):
        write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    patch.setattr(Path, "write_text", half_then_disk_full)


def record_postfixes(patch: pytest.MonkeyPatch, module: ModuleType) -> list[dict[str, str]]:
    """Replace `module`'s tqdm under `patch` by a bar that records, in order, what each `set_postfix` call wrote: the
    training loops' progress bars, read without a terminal."""
    postfixes: list[dict[str, str]] = []

    class RecordingBar:
        def __init__(self, iterable, **_):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, **values):
            postfixes.append(values)

    patch.setattr(module, "tqdm", RecordingBar)
    return postfixes


def make_sae(d_in: int, d_sae: int, hook_name: str, seed: int = 0):
    """A sae-lens StandardSAE with seeded random weights, reading `hook_name` (needs the `sae` extra)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name))).eval()


def make_transcoder(d_in: int, d_out: int, d_sae: int, hook_name: str | None, hook_name_out: str | None, seed: int = 0):
    """A sae-lens Transcoder with seeded random weights, reading `hook_name` and writing `hook_name_out`."""
    from sae_lens import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name=hook_name, hook_name_out=hook_name_out)
    return Transcoder(TranscoderConfig(d_in=d_in, d_sae=d_sae, d_out=d_out, apply_b_dec_to_input=False,
                                       metadata=metadata)).eval()


@pytest.fixture(scope="module")
def base(tiny_paths):
    """The tiny base model the tiny NLA reads, without weight processing; one per test module, so a
    hook a module leaves on it cannot reach another module."""
    return load_base(tiny_paths["av_karvonen"])


@pytest.fixture(scope="module")
def nla(av_karvonen, ar_nanonla) -> nl.NLA:
    return nl.NLA(av_karvonen, ar_nanonla)
